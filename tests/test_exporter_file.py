"""
The ``file`` exporter: exact NDJSON lines, file mode, fsync policies, rotation (reopen and a real
SIGHUP to ``twistd``) without loss or duplicates, bad options, and a SIGKILLed consumer process.
"""

from __future__ import annotations

import collections
import errno
import json
import os
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time

import attrs
from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from payflux.consumers.handlers import Entry, load_handler
from payflux.exporters import file as file_module
from payflux.exporters.file import FileExporter
from payflux.exporters.records import export_record, ndjson_lines
from payflux.node import ReopenOnSighup
from payflux.observability.metrics import Metrics
from tests.support.consumers import sleep, wait_for
from tests.support.process import TWISTD, clean_env
from tests.support.redis import _binaries, redis_test_cases

PROC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "support", "consumer_proc.py")
ONE_REDIS = ("7",) if "7" in _binaries() else ("6.2",)  # these tests are about files, not Redis versions


def entry(i: int, partition: int = 0) -> Entry:
    event = {"event_id": f"evt-{i:05d}", "event_timestamp": "2026-01-06T00:00:00.000Z", "amount_bucket": "10-50",
             "payment_method_bucket": "credit_card", "currency": "EUR", "retry_count": i % 3,
             "note": "caf\u00e9 \u2713", "nested": {"b": 1, "a": [1, 2]}}
    return Entry(f"17000000{i:05d}-0", partition, event["event_id"], 1700000000000 + i, "1", event, 1,
                 "payment_failed")


def batch(start: int, n: int) -> list[Entry]:
    return [entry(i) for i in range(start, start + n)]


def ids_in(*paths: str) -> list[str]:
    """event_id of every complete line of the files, in order."""
    out = []
    for path in paths:
        with open(path, "rb") as f:
            for line in f.read().split(b"\n")[:-1]:
                out.append(json.loads(line)["event_id"])
    return out


def sample(metrics: Metrics, name: str, consumer: str = "audit") -> float | None:
    return metrics.registry.get_sample_value(name, {"exporter": "file", "consumer": consumer})


class FsyncRecorder:
    """Stands in for os.fsync: records descriptors; while ``gate`` is clear, fsync blocks (in its thread)."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.gate = threading.Event()
        self.gate.set()
        self._real = os.fsync

    def __call__(self, fd: int) -> None:
        self.gate.wait(10)
        self.calls.append(fd)
        self._real(fd)


class FileExporterTests(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="payflux-file-")
        self.path = os.path.join(self.dir, "events.ndjson")
        self.addCleanup(lambda: subprocess.run(["rm", "-rf", self.dir]))
        self.fsync = FsyncRecorder()
        self.patch(os, "fsync", self.fsync)
        self.addCleanup(self.fsync.gate.set)  # never leave a pool thread blocked

    def exporter(self, clock=reactor, **options) -> FileExporter:
        exp = FileExporter(reactor=clock, path=options.pop("path", self.path), **options)
        self.addCleanup(exp.close)
        return exp

    def test_lines_are_exactly_the_events(self):
        clock = task.Clock()
        exp = self.exporter(clock, fsync="never")
        entries = batch(0, 5) + [entry(5, partition=3)]
        clock.advance(1234.5)
        self.assertIsNone(exp.handle(entries))
        with open(self.path, "rb") as f:
            data = f.read()
        lines = data.split(b"\n")
        self.assertEqual(lines[-1], b"")  # every line ends with \n, nothing after
        self.assertEqual(len(lines) - 1, len(entries))
        for line, e in zip(lines, entries):
            obj = json.loads(line)
            self.assertEqual(obj, {"v": 1, "stream_id": e.stream_id, "partition": e.partition,
                                   "event_id": e.event_id, "type": "payment_failed",
                                   "received_at": e.received_at_ms, "event": e.event})
            # canonical: sorted keys at every level, no whitespace, UTF-8 (not \u escapes)
            self.assertEqual(line, json.dumps(obj, sort_keys=True, separators=(",", ":"),
                                              ensure_ascii=False).encode("utf-8"))
        self.assertIn("caf\u00e9".encode("utf-8"), data)
        self.assertEqual(data, ndjson_lines(entries))
        self.assertEqual(exp.stats.exported._value.get(), 6)
        self.assertEqual(exp.stats.last_success._value.get(), 1234.5)
        self.assertEqual(export_record(entries[5])["partition"], 3)

    def test_appends_to_an_existing_file_and_keeps_its_mode(self):
        with open(self.path, "wb") as f:
            f.write(b'{"earlier":true}\n')
        os.chmod(self.path, 0o644)
        exp = self.exporter(task.Clock(), fsync="never")
        exp.handle(batch(0, 2))
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), b'{"earlier":true}\n' + ndjson_lines(batch(0, 2)))
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o644)

    def test_new_file_mode_is_0600_by_default_and_exact_whatever_the_umask(self):
        old = os.umask(0)
        self.addCleanup(os.umask, old)
        self.exporter(task.Clock(), fsync="never").handle(batch(0, 1))
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        os.umask(0o077)
        other = os.path.join(self.dir, "group-readable.ndjson")
        self.exporter(task.Clock(), path=other, fsync="never", mode="0640").handle(batch(0, 1))
        self.assertEqual(stat.S_IMODE(os.stat(other).st_mode), 0o640)
        third = os.path.join(self.dir, "octal-int.ndjson")
        self.exporter(task.Clock(), path=third, fsync="never", mode=0o400).handle(batch(0, 1))
        self.assertEqual(stat.S_IMODE(os.stat(third).st_mode), 0o400)

    async def test_fsync_always_acks_only_after_fsync_and_shares_one_fsync(self):
        exp = self.exporter(fsync="always")
        self.fsync.gate.clear()
        first = exp.handle(batch(0, 10))
        self.assertTrue(exp._current._syncing)  # in a pool thread, blocked on the gate
        second, third = exp.handle(batch(10, 10)), exp.handle(batch(20, 10))
        self.assertEqual(ids_in(self.path), [f"evt-{i:05d}" for i in range(30)])  # written already...
        self.assertEqual((first.called, second.called, third.called), (False, False, False))  # ...not acked
        self.assertEqual(exp.stats.exported._value.get(), 0)
        self.fsync.gate.set()
        await defer.gatherResults([first, second, third])
        fd = exp._current.fd
        self.assertEqual(self.fsync.calls, [fd, fd])  # batch 1, then one fsync for batches 2 and 3
        self.assertEqual(exp.stats.exported._value.get(), 30)

    def test_fsync_interval_syncs_on_the_clock_and_at_close(self):
        clock = task.Clock()
        exp = self.exporter(clock, fsync="interval", fsync_interval=2.0, fsync_thread=False)
        self.assertIsNone(exp.handle(batch(0, 3)))  # acked without waiting for a flush
        self.assertEqual(self.fsync.calls, [])
        clock.advance(1.9)
        self.assertEqual(self.fsync.calls, [])
        clock.advance(0.1)
        self.assertEqual(len(self.fsync.calls), 1)
        clock.advance(2.0)  # nothing new written: no fsync
        self.assertEqual(len(self.fsync.calls), 1)
        exp.handle(batch(3, 1))
        self.successResultOf(exp.close())
        self.assertEqual(len(self.fsync.calls), 2)
        self.assertEqual(clock.getDelayedCalls(), [])  # close() stopped the timer

    def test_fsync_never_never_syncs(self):
        clock = task.Clock()
        exp = self.exporter(clock, fsync="never", fsync_thread=False)
        for i in range(5):
            self.assertIsNone(exp.handle(batch(i * 2, 2)))
        clock.advance(3600)
        self.successResultOf(exp.close())
        self.assertEqual(self.fsync.calls, [])
        self.assertEqual(len(ids_in(self.path)), 10)

    async def test_reopen_while_fsyncs_are_running_loses_and_duplicates_nothing(self):
        exp = self.exporter(fsync="always")
        rotated: list[str] = []
        n = 0
        for round_ in range(6):
            self.fsync.gate.clear()  # the fsyncs of this round's batches hang until the reopen happened
            before = [exp.handle(batch(n + k * 7, 7)) for k in range(4)]
            n += 28
            self.assertTrue(exp._current._syncing)  # in a pool thread, blocked on the gate
            old = exp._current
            rotated.append(f"{self.path}.{round_ + 1}")
            os.rename(self.path, rotated[-1])
            reopened = exp.reopen()
            after = [exp.handle(batch(n + k * 5, 5)) for k in range(3)]
            n += 15
            self.assertFalse(reopened.called)  # the old file stays open until its batches are fsynced
            self.assertFalse(old.closed)
            self.fsync.gate.set()
            await defer.gatherResults([*before, *after, reopened])
            self.assertTrue(old.closed)
            self.assertEqual(ids_in(rotated[-1])[-28:], [f"evt-{i:05d}" for i in range(n - 43, n - 15)])
        await exp.close()
        counts = collections.Counter(ids_in(*rotated, self.path))
        self.assertEqual(set(counts), {f"evt-{i:05d}" for i in range(n)})
        self.assertEqual(max(counts.values()), 1)
        for path in [*rotated, self.path]:
            self.assertTrue(ids_in(path))

    def test_reopen_failure_keeps_writing_to_the_previous_file_and_retries(self):
        exp = self.exporter(task.Clock(), fsync="never")
        exp.handle(batch(0, 2))
        os.rename(self.path, self.path + ".1")
        os.mkdir(self.path)  # the new file can't be created
        self.successResultOf(exp.reopen())
        exp.handle(batch(2, 2))
        os.rmdir(self.path)
        exp.handle(batch(4, 2))  # the reopen is retried first
        self.assertEqual(ids_in(self.path + ".1"), [f"evt-{i:05d}" for i in range(4)])
        self.assertEqual(ids_in(self.path), [f"evt-{i:05d}" for i in range(4, 6)])

    def test_a_deleted_file_is_recreated_before_the_next_batch(self):
        exp = self.exporter(task.Clock(), fsync="never")
        exp.handle(batch(0, 2))
        os.unlink(self.path)
        exp.handle(batch(2, 2))
        self.assertEqual(ids_in(self.path), ["evt-00002", "evt-00003"])

    def test_a_failed_write_leaves_no_partial_line_and_fails_the_batch(self):
        exp = self.exporter(task.Clock(), fsync="never")
        exp.handle(batch(0, 2))
        real_write = os.write
        calls = []

        def disk_fills_up(fd, data):
            calls.append(len(data))
            if len(calls) == 1:
                return real_write(fd, bytes(data[:37]))
            raise OSError(errno.ENOSPC, "No space left on device")

        self.patch(os, "write", disk_fills_up)
        with self.assertRaises(OSError):
            exp.handle(batch(2, 3))
        self.patch(os, "write", real_write)
        self.assertEqual(len(calls), 2)  # a partial write happened...
        self.assertEqual(ids_in(self.path), ["evt-00000", "evt-00001"])  # ...and was truncated away
        with open(self.path, "rb") as f:
            self.assertTrue(f.read().endswith(b"\n"))
        self.assertEqual(exp.stats.failed._value.get(), 3)
        exp.handle(batch(2, 3))  # redelivered later: written whole
        self.assertEqual(len(ids_in(self.path)), 5)

    def test_metrics_bound_to_the_node_registry(self):
        clock = task.Clock()
        clock.advance(99)
        metrics = Metrics()
        exp = self.exporter(clock, fsync="never")
        exp.bind_metrics(metrics, "audit")
        exp.handle(batch(0, 4))
        self.assertEqual(sample(metrics, "payflux_exporter_exported_total"), 4)
        self.assertEqual(sample(metrics, "payflux_exporter_last_success_timestamp_seconds"), 99)
        exp2 = self.exporter(clock, path=os.path.join(self.dir, "x.ndjson"), fsync="never")
        exp2.bind_metrics(metrics, "other")
        os.mkdir(os.path.join(self.dir, "x.ndjson"))  # open fails: EISDIR
        with self.assertRaises(OSError):
            exp2.handle(batch(0, 2))
        self.assertEqual(sample(metrics, "payflux_exporter_failed_total", "other"), 2)

    def test_handle_after_close_fails(self):
        exp = self.exporter(task.Clock(), fsync="never")
        exp.handle(batch(0, 1))
        self.successResultOf(exp.close())
        with self.assertRaises(RuntimeError):
            exp.handle(batch(1, 1))
        self.assertEqual(len(ids_in(self.path)), 1)

    def test_bad_options_name_the_option(self):
        cases = [
            ({}, "path is required"),
            ({"path": "/no/such/dir/events.ndjson"}, "path: directory /no/such/dir does not exist"),
            ({"path": self.dir}, "is a directory"),
            ({"mode": "rw-------"}, "mode must be"),
            ({"mode": 0o4777}, "mode must be"),
            ({"fsync": "sometimes"}, "fsync must be one of always, interval, never"),
            ({"fsync_interval": 0}, "fsync_interval must be"),
            ({"fsync_interval": "1s"}, "fsync_interval must be"),
            ({"fsync_thread": "yes"}, "fsync_thread must be"),
        ]
        for options, message in cases:
            options = {"path": self.path, **options} if "path" not in options and options else options
            with self.assertRaises(ValueError) as caught:
                FileExporter(reactor=task.Clock(), **options)
            self.assertIn(message, str(caught.exception), options)
        # through the config path: one line naming the handler and the option
        with self.assertRaises(ValueError) as caught:
            load_handler("file", {"path": self.path, "fsync": "sometimes"}, task.Clock())
        self.assertEqual(str(caught.exception).count("\n"), 0)
        self.assertIn("handler 'file': building it failed: ValueError: fsync must be", str(caught.exception))
        with self.assertRaises(ValueError) as caught:
            load_handler("file", {"path": self.path, "fsynk": "always"}, task.Clock())
        self.assertIn("fsynk", str(caught.exception))

    def test_stdout(self):
        code = (
            "from twisted.internet import task\n"
            "from payflux.consumers.handlers import Entry\n"
            "from payflux.exporters.file import FileExporter\n"
            f"entries = [Entry(*args) for args in {[tuple(attrs.astuple(e)) for e in batch(0, 5)]!r}]\n"
            "e = FileExporter(reactor=task.Clock(), path='-', fsync='always')\n"
            "for d in (e.handle(entries[:3]), e.handle(entries[3:])):\n"
            "    assert d.called and d.result is None  # no fsync of a pipe: done at once\n"
            "e.close()\n"
        )
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, timeout=30)
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertEqual(out.stdout, ndjson_lines(batch(0, 5)))

    def sighup_service(self, scheduled: list) -> ReopenOnSighup:
        """The node's SIGHUP service on a reactor that records what the handler hands over."""

        class FakeReactor:
            def callFromThread(self, f, *args):
                scheduled.append(f)

        original = signal.getsignal(signal.SIGHUP)
        self.addCleanup(signal.signal, signal.SIGHUP, original)
        return ReopenOnSighup(FakeReactor())

    def test_sighup_handler_reopens_every_file_exporter_from_the_reactor_thread(self):
        scheduled = []
        service = self.sighup_service(scheduled)
        exp = self.exporter(task.Clock(), fsync="never")
        self.assertTrue(file_module.reopens_on_sighup(exp))
        exp.handle(batch(0, 1))
        service.startService()
        self.addCleanup(service.stopService)
        os.rename(self.path, self.path + ".1")
        signal.getsignal(signal.SIGHUP)(signal.SIGHUP, None)  # what the process's SIGHUP runs
        self.assertEqual(scheduled, [file_module.reopen_all])  # nothing done in the signal handler itself
        self.assertFalse(os.path.exists(self.path))
        scheduled[0]()
        exp.handle(batch(1, 1))
        self.assertEqual(ids_in(self.path), ["evt-00001"])

    def test_sighup_handler_is_the_nodes_while_it_runs_and_chains_to_the_previous_one(self):
        scheduled, previous_calls = [], []

        def previous(signum, frame):
            previous_calls.append(signum)

        service = self.sighup_service(scheduled)
        signal.signal(signal.SIGHUP, previous)
        FileExporter(reactor=task.Clock(), path=self.path).close()  # building one installs nothing
        self.assertIs(signal.getsignal(signal.SIGHUP), previous)
        service.startService()
        self.assertEqual(signal.getsignal(signal.SIGHUP), service._on_sighup)
        signal.getsignal(signal.SIGHUP)(signal.SIGHUP, None)
        self.assertEqual((scheduled, previous_calls), ([file_module.reopen_all], [signal.SIGHUP]))
        service.stopService()
        self.assertIs(signal.getsignal(signal.SIGHUP), previous)
        # a stdout exporter, or a closed one, is not reopened
        self.assertFalse(file_module.reopens_on_sighup(FileExporter(reactor=task.Clock(), path="-")))
        closed = FileExporter(reactor=task.Clock(), path=self.path)
        closed.close()
        self.assertFalse(file_module.reopens_on_sighup(closed))

    def test_the_node_owns_sighup_only_with_a_file_exporter(self):
        from payflux.config import load_settings
        from payflux.consumers.handlers import close_handler
        from payflux.consumers.service import ConsumerService
        from payflux.node import build_node

        def node(handler: str, options: str):
            fd, config = tempfile.mkstemp(suffix=".toml")
            with os.fdopen(fd, "w") as f:
                f.write(f'roles = ["consumers"]\n[[consumers]]\nname = "c"\ngroup = "g"\nhandler = "{handler}"\n'
                        f"options = {{ {options} }}\n")
            self.addCleanup(os.unlink, config)
            built = build_node(load_settings({"redis_url": "redis://127.0.0.1:1"}, env={}, config_path=config),
                               reactor)
            self.addCleanup(lambda: [close_handler(s.handler) for s in built if isinstance(s, ConsumerService)])
            return [type(s).__name__ for s in built]

        services = node("file", f'path = "{self.path}"')
        # after the consumer services (so stopped before they close their exporters)
        self.assertEqual(services[services.index("ReclaimService") + 1], "ReopenOnSighup")
        self.assertNotIn("ReopenOnSighup", node("file", 'path = "-"'))
        self.assertNotIn("ReopenOnSighup", node("noop", ""))

    def test_sighup_handler_not_installable_is_one_warning(self):
        from twisted.logger import formatEvent, globalLogPublisher

        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        service = self.sighup_service([])
        before = signal.getsignal(signal.SIGHUP)
        thread = threading.Thread(target=service.startService)  # signal.signal: main thread only
        thread.start()
        thread.join()
        self.assertIs(signal.getsignal(signal.SIGHUP), before)
        lines = [formatEvent(e) for e in events if "SIGHUP" in formatEvent(e)]
        self.assertEqual(len(lines), 1, lines)
        self.assertTrue(lines[0].startswith("SIGHUP will not reopen export files: signal only works in main thread"),
                        lines)
        service.stopService()
        self.assertIs(signal.getsignal(signal.SIGHUP), before)


def _xadd(server, prefix: str, i: int) -> None:
    data = json.dumps({"event_id": f"evt-{i:05d}", "amount": i}, separators=(",", ":"))
    server.sync_command("XADD", f"{prefix}:{{0}}:events", "*", "v", "1", "event_id", f"evt-{i:05d}",
                        "type", "authorization", "received_at", str(int(time.time() * 1000)), "data", data)


def complete_ids(*paths: str) -> list[str]:
    out = []
    for path in paths:
        if os.path.exists(path):
            with open(path, "rb") as f:
                out += [json.loads(line)["event_id"] for line in f.read().split(b"\n")[:-1]]
    return out


class FileExporterProcessMixin:
    timeout = 60

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="payflux-file-proc-")
        self.addCleanup(lambda: subprocess.run(["rm", "-rf", self.dir]))
        self.path = os.path.join(self.dir, "events.ndjson")

    def reap(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    async def test_sighup_to_twistd_rotates_under_a_stream_without_loss_or_duplicates(self):
        """The whole path an operator uses: config file only, ``twistd -n payflux``, logrotate's rename + SIGHUP."""
        server = self.start_redis()
        config = os.path.join(self.dir, "payflux.toml")
        with open(config, "w") as f:
            f.write('roles = ["consumers"]\n[[consumers]]\nname = "ndjson"\ngroup = "export"\nhandler = "file"\n'
                    f'block_ms = 50\nbatch_size = 25\noptions = {{ path = "{self.path}", fsync = "always" }}\n')
        log = open(os.path.join(self.dir, "twistd.log"), "wb")
        self.addCleanup(log.close)
        proc = subprocess.Popen([*TWISTD, "-n", "--pidfile=", "payflux", "--config", config, "--redis-url", server.url,
                                 "--metrics-listen", "none"], stdout=log, stderr=subprocess.STDOUT, cwd=self.dir,
                                env=clean_env())
        self.addCleanup(self.reap, proc)
        produced = 0
        rotated = []
        # a steady stream (25 events every 10 ms) while the file is renamed and SIGHUP sent 4 times
        for round_ in range(4):
            for _ in range(8):
                for i in range(produced, produced + 25):
                    _xadd(server, "payflux", i)
                produced += 25
                await sleep(0.01)
            await wait_for(lambda: len(complete_ids(*rotated, self.path)) > produced - 200, timeout=20,
                           what="the exporter keeping up")
            rotated.append(f"{self.path}.{round_ + 1}")
            os.rename(self.path, rotated[-1])
            proc.send_signal(signal.SIGHUP)
        for i in range(produced, produced + 100):
            _xadd(server, "payflux", i)
        produced += 100
        await wait_for(lambda: len(complete_ids(*rotated, self.path)) >= produced, timeout=20, what="every event")
        proc.send_signal(signal.SIGTERM)
        # twistd re-raises SIGTERM after its clean shutdown (exit status "killed by SIGTERM")
        self.assertIn(proc.wait(15), (0, -signal.SIGTERM))
        counts = collections.Counter(complete_ids(*rotated, self.path))
        self.assertEqual(set(counts), {f"evt-{i:05d}" for i in range(produced)})
        self.assertEqual(max(counts.values()), 1, "a rotation duplicated events")
        for path in [*rotated, self.path]:
            self.assertTrue(complete_ids(path), f"{path} got no lines: the reopen didn't happen")
            self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        with open(os.path.join(self.dir, "twistd.log"), encoding="utf-8", errors="replace") as f:
            self.assertEqual(f.read().count("reopened " + self.path), 4)

    async def test_sigkill_mid_export_then_restart_every_event_is_in_the_file(self):
        server = self.start_redis()
        n = 1500
        for i in range(n):
            _xadd(server, "pf", i)
        spec = json.dumps({"handler": "file", "options": {"path": self.path, "fsync": "always"}})

        def spawn(name: str) -> subprocess.Popen:
            proc = subprocess.Popen([sys.executable, PROC, server.url, name, "unused", "0.03", spec],
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            self.addCleanup(self.reap, proc)
            return proc

        def pending_ids(consumer: str) -> set[str]:
            rows = server.sync_command("XPENDING", "pf:{0}:events", "g", "-", "+", "10000", consumer)
            return {r[0].decode() for r in rows}

        def stream_ids_in_file() -> collections.Counter:
            counts: collections.Counter = collections.Counter()
            with open(self.path, "rb") as f:
                for line in f.read().split(b"\n")[:-1]:
                    counts[json.loads(line)["stream_id"]] += 1
            return counts

        proc = spawn("exporter-0")
        exported_unacked: set[str] = set()
        for kill in range(2):
            name = "exporter-0"
            progress = len(complete_ids(self.path))
            await wait_for(lambda: len(complete_ids(self.path)) >= progress + 300 and bool(pending_ids(name)),
                           timeout=20, what="progress and a batch in flight")
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            # written to the file but never acked: these must be exported again after the restart
            exported_unacked |= pending_ids(name) & set(stream_ids_in_file())
            # first restart under the same name (replays its own pending entries), then a new one
            # (reclaims them from the dead consumer)
            proc = spawn("exporter-0" if kill == 0 else "exporter-1")
        await wait_for(lambda: len(set(complete_ids(self.path))) >= n, timeout=30, what="every event in the file")
        await wait_for(lambda: int(server.sync_command("XPENDING", "pf:{0}:events", "g")[0]) == 0,
                       timeout=10, what="nothing pending")
        proc.send_signal(signal.SIGTERM)
        self.assertEqual(proc.wait(10), 0)
        counts = collections.Counter(complete_ids(self.path))
        self.assertEqual(set(counts), {f"evt-{i:05d}" for i in range(n)})
        self.assertTrue(exported_unacked, "no kill landed between export and ack")
        by_stream_id = stream_ids_in_file()
        self.assertTrue(all(by_stream_id[i] >= 2 for i in exported_unacked))  # at-least-once, visibly
        duplicates = sum(c - 1 for c in counts.values())
        self.assertGreaterEqual(duplicates, len(exported_unacked))
        print(f"\n  file exporter: {n} events, 2 SIGKILLs, {duplicates} duplicates, "
              f"{len(exported_unacked)} exported-but-unacked at the kills", file=sys.stderr)


redis_test_cases(FileExporterProcessMixin, globals(), versions=ONE_REDIS)
