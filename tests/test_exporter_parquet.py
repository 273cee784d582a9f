"""
The Parquet exporter: files read back with pyarrow equal the events (typed columns), rolls by
row count, age (a Clock), held batches and shutdown, a crash between write and rename (an
exception, and a real SIGKILL of a child process) leaves nothing a loader would read, and the
exporter under the real consumer runtime (``twistd -n payflux --roles consumers``, a real
redis-server) loses nothing when SIGKILLed mid-export.
"""

from __future__ import annotations

import collections
import datetime
import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

import pyarrow.dataset as ds
import pyarrow.parquet as pq
from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from payflux.consumers.handlers import EntriesFailed, Entry, load_handler
from payflux.events import FIELDS, EventValidator, ValidationPolicy
from payflux.exporters import warehouse
from payflux.exporters.warehouse import SCHEMA, ParquetExporter, RowRejected, WriteFailed
from payflux.observability.metrics import Metrics
from payflux.streams.keys import StreamKeys
from tests.support.consumers import wait_for
from tests.support.daemon import ConsumerDaemon, append_events
from tests.support.redis import find_redis_binaries, redis_test_cases

VALIDATOR = EventValidator(ValidationPolicy(), now=lambda: 1.8e9)
RECEIVED_AT = 1_768_471_200_000  # 2026-01-15T10:00:00Z
UTC = datetime.timezone.utc


def payment_event(i: int, merchants: int = 12) -> dict:
    """A valid payment_exhaust event (normalised by the real validator); optional fields on odd i,
    no merchant or intent hash on every fifth."""
    event = {
        "event_id": f"evt_{i:06d}",
        "event_type": ("payment_failed", "payment_intent.succeeded", "payment_retried")[i % 3],
        "event_timestamp": f"2026-01-15T09:{(i // 60) % 60:02d}:{i % 60:02d}.{i % 1000:03d}+00:00",
        "processor": ("stripe", "adyen")[i % 2],
    }
    if i % 5:
        event.update(merchant_id_hash=f"mh_{i % merchants:04d}_x", payment_intent_id_hash=f"pi_{i:08d}")
    if i % 4:
        event["retry_count"] = i % 4
    if i % 2:
        event.update(currency="EUR", amount_bucket="10-50", payment_method_bucket="credit_card", geo_bucket="EU-west",
                     customer_id_hash=f"cu_{i % 97:05d}", failure_category="insufficient_funds",
                     failure_code="card_declined", processor_latency_ms=(i * 7) % 600_000,
                     system_source="checkout_api", channel="web", retry_result="failed", failure_origin="issuer")
    return VALIDATOR.validate(event)


def entry(i: int, received_at_ms: int | None = None, **overrides: Any) -> Entry:
    event = {**payment_event(i), **overrides}
    at = RECEIVED_AT + i if received_at_ms is None else received_at_ms
    return Entry(f"{at}-{i}", i % 2, event.get("event_id", f"evt_{i:06d}"), at, "1", event, 1,
                 event.get("event_type", "payment_failed"))


def expected_row(e: Entry) -> dict:
    """What pyarrow must read back for ``e``: every field typed, absent (or "") optional ones None."""
    row = {name: e.event.get(name) or None for name in FIELDS}
    row["retry_count"] = e.event.get("retry_count", 0)
    row["event_timestamp"] = datetime.datetime.strptime(e.event["event_timestamp"], "%Y-%m-%dT%H:%M:%S.%f%z")
    row.update(stream_id=e.stream_id, stream_partition=e.partition,
               received_at=datetime.datetime.fromtimestamp(e.received_at_ms / 1000, UTC))
    return row


def visible_files(directory: str) -> list[str]:
    """What a loader globbing ``**/*.parquet`` picks up."""
    return sorted(glob.glob(os.path.join(directory, "**", "*.parquet"), recursive=True))


def read_rows(directory: str) -> list[dict]:
    return [row for path in visible_files(directory) for row in pq.read_table(path).to_pylist()]


class ThreadedClock(task.Clock):
    """A Clock for the exporter's roll timers; file writes still run in the real reactor's thread pool."""

    def getThreadPool(self) -> Any:
        return reactor.getThreadPool()

    def callFromThread(self, f: Any, *args: Any, **kwargs: Any) -> None:
        reactor.callFromThread(f, *args, **kwargs)


class ParquetExporterTests(unittest.TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="payflux-parquet-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.clock = ThreadedClock()
        self.clock.advance(RECEIVED_AT / 1000)

    def exporter(self, **options: Any) -> ParquetExporter:
        exporter = ParquetExporter(reactor=self.clock, **{"directory": self.dir, **options})
        self.addCleanup(exporter.close)
        return exporter

    async def test_rows_read_back_equal_the_events(self):
        exporter = self.exporter(max_rows=1000, file_mode="0604")
        metrics = Metrics()
        exporter.bind_metrics(metrics, "c1")
        entries = [entry(i) for i in range(300)]
        self.assertIsNone(await exporter.handle(entries))
        files = visible_files(self.dir)
        self.assertEqual(len(files), 1)
        self.assertRegex(os.path.relpath(files[0], self.dir),
                         r"^dt=2026-01-15/part-\d{8}T\d{6}Z-[0-9a-f]{16}\.parquet$")
        self.assertEqual(os.stat(files[0]).st_mode & 0o777, 0o604)  # exactly, whatever the umask
        table = pq.read_table(files[0])
        self.assertEqual(table.schema, SCHEMA)
        self.assertEqual(pq.read_schema(files[0]).metadata[b"payflux.schema"], b"payment_exhaust/2")
        self.assertEqual(str(table.schema.field("event_timestamp").type), "timestamp[ms, tz=UTC]")
        self.assertEqual(str(table.schema.field("retry_count").type), "int32")
        self.assertEqual(table.to_pylist(), [expected_row(e) for e in entries])
        self.assertEqual(set(FIELDS) - set(SCHEMA.names), set())  # every event field has its column
        # the seed's 15 fields in the seed's order, then PayFlux's four, then the stream's three
        self.assertEqual(SCHEMA.names, [*FIELDS, "stream_id", "stream_partition", "received_at"])
        self.assertEqual([f.name for f in SCHEMA if not f.nullable],
                         ["event_type", "event_timestamp", "event_id", "processor", "retry_count", "stream_id",
                          "stream_partition", "received_at"])
        self.assertIsNone(table.column("merchant_id_hash")[0].as_py())  # i = 0: no merchant
        # the hive-style date partition is what a loader sees, and only complete files
        dataset = ds.dataset(self.dir, format="parquet", partitioning="hive").to_table()
        self.assertEqual(set(dataset.column("dt").to_pylist()), {"2026-01-15"})
        self.assertEqual(dataset.num_rows, 300)
        labels = {"exporter": "parquet", "consumer": "c1"}
        self.assertEqual(metrics.registry.get_sample_value("payflux_exporter_exported_total", labels), 300)
        self.assertEqual(metrics.registry.get_sample_value("payflux_exporter_last_success_timestamp_seconds",
                                                           labels), RECEIVED_AT / 1000)

    async def test_roll_by_row_count_splits_batches(self):
        exporter = self.exporter(max_rows=100, max_batches=0, max_age=60)
        entries = [entry(i) for i in range(250)]
        d = exporter.handle(entries)
        await wait_for(lambda: len(visible_files(self.dir)) == 2, what="two full files")
        self.assertFalse(d.called)  # its last 50 rows wait for the next roll
        self.assertEqual(sorted(pq.read_metadata(f).num_rows for f in visible_files(self.dir)), [100, 100])
        self.clock.advance(60)
        await d
        self.assertEqual(sorted(pq.read_metadata(f).num_rows for f in visible_files(self.dir)), [50, 100, 100])
        self.assertEqual(sorted(r["event_id"] for r in read_rows(self.dir)), [e.event_id for e in entries])

    async def test_roll_by_age_on_the_reactor_clock(self):
        exporter = self.exporter(max_rows=10_000, max_batches=0, max_age=5)
        first = exporter.handle([entry(i) for i in range(10)])
        await wait_for(lambda: exporter.buffered_rows == 10, what="rows built")  # the file's age starts here
        self.clock.advance(3)
        second = exporter.handle([entry(i) for i in range(10, 20)])
        await wait_for(lambda: exporter.buffered_rows == 20, what="rows built")
        self.clock.advance(1.9)
        self.assertEqual(visible_files(self.dir), [])
        self.assertFalse(first.called or second.called)  # not durable yet: nothing may be acked
        self.clock.advance(0.1)  # 5 s after the first row
        await defer.gatherResults([first, second])
        self.assertEqual([pq.read_metadata(f).num_rows for f in visible_files(self.dir)], [20])
        third = exporter.handle([entry(20)])  # a new file, timed from its own first row
        await wait_for(lambda: exporter.buffered_rows == 1, what="rows built")
        self.clock.advance(4.9)
        self.assertFalse(third.called)
        self.clock.advance(0.1)
        await third
        self.assertEqual(len(visible_files(self.dir)), 2)

    async def test_max_batches_rolls_once_the_runtime_can_send_no_more(self):
        exporter = self.exporter(max_rows=10_000, max_batches=3, max_age=60)
        held = [exporter.handle([entry(i)]) for i in range(2)]
        await wait_for(lambda: exporter.buffered_rows == 2, what="rows built")
        self.assertEqual(visible_files(self.dir), [])
        self.assertFalse(any(d.called for d in held))
        held.append(exporter.handle([entry(2)]))  # third batch: the consumer's concurrency is used up
        await defer.gatherResults(held)
        self.assertEqual([pq.read_metadata(f).num_rows for f in visible_files(self.dir)], [3])

    async def test_rows_that_do_not_fit_fail_alone(self):
        exporter = self.exporter()
        metrics = Metrics()
        exporter.bind_metrics(metrics, "c1")
        bad = [
            (entry(1, event_id=None), "event_id: required"),
            (entry(2, retry_count="3"), "retry_count: must be a 32-bit integer"),
            (entry(3, processor_latency_ms=2**40), "processor_latency_ms: must be a 32-bit integer"),
            (entry(4, currency=978), "currency: must be a string"),
            (entry(5, event_timestamp="yesterday"), "event_timestamp: must be an RFC 3339 timestamp"),
        ]
        good = [entry(i) for i in (0, 6, 7)]
        entries = [bad[0][0], good[0], *(e for e, _ in bad[1:]), *good[1:]]
        failure = await self.assertFailure(defer.maybeDeferred(exporter.handle, entries), EntriesFailed)
        self.assertEqual({k: str(v) for k, v in failure.failures.items()},
                         {(e.partition, e.stream_id): message for e, message in bad})
        self.assertTrue(all(isinstance(v, RowRejected) for v in failure.failures.values()))
        self.assertEqual(read_rows(self.dir), [expected_row(e) for e in good])
        self.assertEqual(metrics.registry.get_sample_value(
            "payflux_exporter_failed_total", {"exporter": "parquet", "consumer": "c1"}), 5)

    async def test_entries_from_before_the_seed_schema_and_of_layout_seed(self):
        exporter = self.exporter()
        seed_fields = FIELDS[:15]
        new = entry(1)
        # written before the seed schema: occurred_at and payment_method, no event_timestamp
        old_event = {k: v for k, v in entry(3).event.items() if k not in ("event_timestamp", "payment_method_bucket")}
        old = entry(3, received_at_ms=RECEIVED_AT + 3)
        old = Entry(old.stream_id, old.partition, old.event_id, old.received_at_ms, "1",
                    {**old_event, "occurred_at": "2026-01-15T09:00:03.003Z", "payment_method": "card"}, 1, old.type)
        # layout = "seed": every seed field present, an absent one as ""
        seed = entry(4)
        seed = Entry(seed.stream_id, seed.partition, seed.event_id, seed.received_at_ms, "1",
                     {**{name: "" for name in seed_fields}, **seed.event}, 1, seed.type)
        self.assertEqual(seed.event["failure_origin"], "")
        self.assertIsNone(await exporter.handle([new, old, seed]))  # max_batches 1: rolled
        rows = read_rows(self.dir)
        self.assertEqual(rows[0], expected_row(new))
        self.assertEqual((rows[1]["event_timestamp"], rows[1]["payment_method_bucket"]),
                         (datetime.datetime(2026, 1, 15, 9, 0, 3, 3000, UTC), "card"))
        self.assertNotIn("occurred_at", rows[1])
        self.assertEqual(rows[2], expected_row(seed))
        self.assertEqual([name for name in seed_fields if rows[2][name] is None],
                         [name for name in seed_fields if name not in entry(4).event])

    async def test_one_file_per_received_date(self):
        exporter = self.exporter()
        midnight = 1_768_521_600_000  # 2026-01-16T00:00:00Z
        entries = [entry(0, midnight - 1), entry(1, midnight), entry(2, midnight + 5)]
        await exporter.handle(entries)
        files = visible_files(self.dir)
        self.assertEqual([os.path.basename(os.path.dirname(f)) for f in files], ["dt=2026-01-15", "dt=2026-01-16"])
        self.assertEqual(os.path.basename(files[0]), os.path.basename(files[1]))  # one roll, one name
        self.assertEqual([pq.read_metadata(f).num_rows for f in files], [1, 2])

    async def test_failed_rename_leaves_nothing_visible_and_a_retry_succeeds(self):
        exporter = self.exporter()
        metrics = Metrics()
        exporter.bind_metrics(metrics, "c1")
        real_replace = os.replace

        def crash(src: str, dst: str) -> None:
            raise OSError(28, "No space left on device")

        self.patch(warehouse.os, "replace", crash)
        entries = [entry(i) for i in range(20)]
        failure = await self.assertFailure(defer.maybeDeferred(exporter.handle, entries), EntriesFailed)
        self.assertEqual(set(failure.failures), {(e.partition, e.stream_id) for e in entries})
        self.assertTrue(all(isinstance(v, WriteFailed) for v in failure.failures.values()))
        self.assertIn("No space left on device", str(failure.failures[(0, entries[0].stream_id)]))
        self.assertEqual(visible_files(self.dir), [])
        self.assertEqual(glob.glob(os.path.join(self.dir, "**", ".*"), recursive=True), [])  # temp file removed
        self.assertEqual(metrics.registry.get_sample_value(
            "payflux_exporter_failed_total", {"exporter": "parquet", "consumer": "c1"}), 20)
        self.patch(warehouse.os, "replace", real_replace)
        await exporter.handle(entries)  # the runtime's redelivery
        self.assertEqual(len(read_rows(self.dir)), 20)

    def test_sigkill_between_write_and_rename_leaves_nothing_visible(self):
        script = f"""
import os, signal, sys
sys.path.insert(0, {os.getcwd()!r})
sys.path.insert(0, {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))!r})
from payflux.exporters import warehouse
from tests.test_exporter_parquet import entry
batch, keys, failures = warehouse.rows_of([entry(i) for i in range(500)])
assert not failures
def die(src, dst):
    print(os.path.getsize(src), flush=True)  # the temp file is complete and fsynced here
    os.kill(os.getpid(), signal.SIGKILL)
warehouse.os.replace = die
warehouse.write_files(warehouse.pa.Table.from_batches([batch]), {self.dir!r}, "part-crash", "snappy", 0o640)
"""
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
        self.assertEqual(proc.returncode, -signal.SIGKILL, proc.stderr)
        self.assertGreater(int(proc.stdout), 1000)
        leftovers = glob.glob(os.path.join(self.dir, "dt=*", "*"), recursive=True) + \
            glob.glob(os.path.join(self.dir, "dt=*", ".*"))
        self.assertEqual([os.path.basename(p) for p in leftovers], [".part-crash.parquet.tmp"])
        self.assertEqual(visible_files(self.dir), [])
        self.assertEqual(ds.dataset(self.dir, format="parquet", partitioning="hive").to_table().num_rows, 0)

    async def test_close_writes_what_is_buffered(self):
        exporter = ParquetExporter(reactor=self.clock, directory=self.dir, max_batches=0, max_age=600)
        d = exporter.handle([entry(i) for i in range(5)])
        await wait_for(lambda: exporter.buffered_rows == 5, what="rows built")
        self.assertFalse(d.called)
        await exporter.close()
        await d
        self.assertEqual(len(read_rows(self.dir)), 5)
        self.assertRaises(RuntimeError, exporter.handle, [entry(9)])

    def test_options_are_validated(self):
        blocker = os.path.join(self.dir, "a-file")
        open(blocker, "w").close()
        bad = [
            ({}, "option directory is required"),
            ({"directory": os.path.join(blocker, "sub")}, "option directory"),
            ({"directory": self.dir, "max_rows": 0}, "option max_rows"),
            ({"directory": self.dir, "max_rows": "10"}, "option max_rows"),
            ({"directory": self.dir, "max_age": 0}, "option max_age"),
            ({"directory": self.dir, "max_age": True}, "option max_age"),
            ({"directory": self.dir, "max_batches": -1}, "option max_batches"),
            ({"directory": self.dir, "compression": "lzma"}, "option compression"),
            ({"directory": self.dir, "file_mode": 0o1777}, "option file_mode"),
            ({"directory": self.dir, "file_mode": "rw-r-----"}, "option file_mode"),
            ({"directory": self.dir, "max_row": 5}, "unknown option 'max_row'"),
        ]
        for options, message in bad:
            with self.assertRaises(ValueError, msg=repr(options)) as caught:
                ParquetExporter(reactor=self.clock, **options)
            self.assertIn(message, str(caught.exception))
        with self.assertRaises(ValueError) as caught:
            load_handler("parquet", {"max_rows": 5}, self.clock)
        self.assertIn("option directory is required", str(caught.exception))
        exporter = load_handler("parquet", {"directory": os.path.join(self.dir, "new", "dir")}, self.clock)
        self.addCleanup(exporter.close)
        self.assertIsInstance(exporter, ParquetExporter)
        self.assertTrue(os.path.isdir(os.path.join(self.dir, "new", "dir")))


# -- under the real consumer runtime ------------------------------------------------------------

KEYS = StreamKeys("payflux")
N = 1200


class ParquetRuntimeMixin:
    timeout = 60

    def pending(self) -> int:
        return int(self.server.sync_command("XPENDING", KEYS.events(0), "warehouse")[0])

    def acked(self) -> int:
        """Entries the group has acknowledged: delivered (up to last-delivered-id) minus pending."""
        for group in self.server.sync_command("XINFO", "GROUPS", KEYS.events(0)):
            info = {k.decode(): v for k, v in zip(group[::2], group[1::2])}
            if info["name"] == b"warehouse":
                delivered = len(self.server.sync_command("XRANGE", KEYS.events(0), "-", info["last-delivered-id"]))
                return delivered - self.pending()
        return 0

    async def append(self, events: list[dict]) -> None:
        await append_events(self.server.url, KEYS, 1, events, RECEIVED_AT)

    def daemon(self, directory: str, max_age: float, max_batches: int) -> ConsumerDaemon:
        self.server.sync_command("XGROUP", "CREATE", KEYS.events(0), "warehouse", "0", "MKSTREAM")
        return ConsumerDaemon(self, self.server.url, f"""
[[consumers]]
name = "warehouse"
group = "warehouse"
handler = "parquet"
batch_size = 20
concurrency = 2
block_ms = 200
min_idle_ms = 5000
reclaim_interval = 0.2
consumer_name = "exporter-1"
options = {{ directory = "{directory}", max_rows = 1000, max_batches = {max_batches}, max_age = {max_age} }}
""")

    async def test_sigkill_mid_export_loses_nothing(self):
        self.server = self.start_redis()
        events = [payment_event(i) for i in range(N)]
        await self.append(events)
        out = tempfile.mkdtemp(prefix="payflux-warehouse-")
        self.addCleanup(shutil.rmtree, out, True)
        # rolls every 0.1 s only (the 2 x 20 rows in flight never reach max_rows): batches wait,
        # so a kill finds some in flight
        daemon = self.daemon(out, max_age=0.1, max_batches=0)
        daemon.start()
        in_flight_at_kills = await daemon.kill_mid_export(self.acked, self.pending)
        expected = {e["event_id"] for e in events}

        def ids() -> collections.Counter:
            # every file a loader can see is complete: read_table raises on a truncated one
            return collections.Counter(r["event_id"] for r in read_rows(out))

        await daemon.wait_for(lambda: set(ids()) >= expected, timeout=25, what="every event in a file")
        await daemon.wait_for(lambda: self.pending() == 0, timeout=10, what="nothing pending")
        daemon.proc.send_signal(signal.SIGTERM)
        self.assertIn(daemon.proc.wait(20), (0, -signal.SIGTERM))
        counts = ids()
        self.assertEqual(set(counts), expected)
        self.assertGreater(in_flight_at_kills, 0)
        self.assertEqual(self.server.sync_command("XLEN", KEYS.dlq(0)), 0)
        rows = {r["event_id"]: r for r in read_rows(out)}
        self.assertEqual(rows["evt_000007"]["processor_latency_ms"], 49)  # typed columns survive the trip
        temp = glob.glob(os.path.join(out, "dt=*", ".*.tmp"))
        duplicates = sum(c - 1 for c in counts.values())
        print(f"\n  parquet: {N} events, 2 SIGKILLs, {sum(counts.values())} rows in {len(visible_files(out))} files, "
              f"{duplicates} duplicates, {in_flight_at_kills} entries in flight at the kills, "
              f"{len(temp)} hidden temp files left by the kills", file=sys.stderr)

    async def test_sigterm_writes_held_rows_before_the_grace_period(self):
        self.server = self.start_redis()
        await self.append([payment_event(i) for i in range(5)])
        out = tempfile.mkdtemp(prefix="payflux-warehouse-")
        self.addCleanup(shutil.rmtree, out, True)
        daemon = self.daemon(out, max_age=300, max_batches=2)  # far beyond the shutdown grace (10 s)
        daemon.start()
        await daemon.wait_for(lambda: self.pending() == 5, timeout=20, what="the batch held by the exporter")
        self.assertEqual(visible_files(out), [])
        started = time.monotonic()
        daemon.proc.send_signal(signal.SIGTERM)
        self.assertIn(daemon.proc.wait(20), (0, -signal.SIGTERM))
        self.assertLess(time.monotonic() - started, 8.0, daemon.log_text())
        self.assertEqual(sorted(r["event_id"] for r in read_rows(out)), [f"evt_{i:06d}" for i in range(5)])
        self.assertEqual(self.pending(), 0)  # written, then acknowledged before the process ended


# one Redis version: the exporter doesn't depend on it (the runtime's own tests cover both)
redis_test_cases(ParquetRuntimeMixin, globals(), versions=("7",) if "7" in find_redis_binaries() else ("6.2",))
