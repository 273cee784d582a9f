"""
``payflux serve``: the node in the foreground, exactly ``twistd -n payflux`` (options, exit
statuses, signals), no pidfile, logs on stdout per ``log_format`` / ``log_level``, and a bounded
number of log lines while its Redis is down under load.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import threading
import time

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests.support.process import PAYFLUX, NodeProcesses, clean_env, http_request, wait_ready
from tests.support.redis import RedisProcess, find_redis_binaries

SECRET = "serve-test-secret-0123456789"
AUTH = {"Content-Type": "application/json", "Authorization": f"Bearer {SECRET}"}


class ServeTests(NodeProcesses, SynchronousTestCase):
    dir_prefix = "payflux-serve-"

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def serve(self, *extra: str) -> subprocess.Popen:
        args = [*PAYFLUX, "serve", "--listen", f"tcp:{self.port}:interface=127.0.0.1", "--metrics-listen", "none",
                "--data-dir", self.data_dir, "--api-keys", f"tester:{SECRET}", *extra]
        self.log_path = os.path.join(self.dir, f"serve-{len(self.procs)}.log")
        log = open(self.log_path, "wb")
        self.addCleanup(log.close)
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=self.dir, env=clean_env())
        self.procs.append(proc)
        wait_ready(self, proc, self.base + "/ready", self.log_text)
        return proc

    def log_text(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def post(self) -> int:
        from payflux.cli import sample_event

        return http_request(self.base + "/v1/events/payment_exhaust", json.dumps(sample_event()).encode(), AUTH)[0]

    def stop(self, proc: subprocess.Popen) -> None:
        proc.send_signal(signal.SIGTERM)
        # as under twistd: a clean stop re-raises SIGTERM (systemd counts it as success)
        self.assertEqual(proc.wait(timeout=30), -signal.SIGTERM, self.log_text()[-3000:])

    def wait_for(self, predicate, what: str, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                self.fail(f"timed out waiting for {what}:\n{self.log_text()[-3000:]}")
            time.sleep(0.05)

    def test_serves_with_json_logs_no_pidfile_and_twistds_signals(self):
        export = os.path.join(self.dir, "export.ndjson")
        config = os.path.join(self.dir, "payflux.toml")
        with open(config, "w") as f:
            f.write('roles = ["ingest", "consumers"]\n\n[[consumers]]\nname = "audit"\ngroup = "audit"\n'
                    f'handler = "file"\noptions = {{ path = "{export}" }}\n')
        proc = self.serve("--config", config)
        self.assertEqual(self.post(), 202)
        self.wait_for(lambda: os.path.exists(export) and os.path.getsize(export) > 0, "the exported event")
        os.rename(export, export + ".1")
        proc.send_signal(signal.SIGHUP)  # as under twistd -n: the file exporter reopens its file
        self.wait_for(lambda: os.path.exists(export), "the reopened export file")
        self.assertIsNone(proc.poll())
        self.stop(proc)

        text = self.log_text()
        docs = [json.loads(line) for line in text.splitlines()]  # auto: stdout is a file, so JSON, every line
        messages = [d["message"] for d in docs]
        self.assertTrue(any(m.startswith("using Redis at unix://") for m in messages), messages)
        self.assertTrue(any(m.startswith("reopened ") for m in messages), messages)
        self.assertTrue(any(m.startswith("draining") for m in messages), messages)
        self.assertFalse([m for m in messages if "Starting factory" in m or "Stopping factory" in m])
        self.assertFalse([d for d in docs if d["level"] == "debug"])
        self.assertNotIn(SECRET, text)
        self.assertFalse(os.path.exists(os.path.join(self.dir, "twistd.pid")))

    def test_text_logs_and_debug_level(self):
        proc = self.serve("--log-format", "text", "--log-level", "debug")
        self.stop(proc)
        text = self.log_text()
        self.assertIn("[payflux.node#info] using Redis at unix://", text)
        self.assertIn("Starting factory", text)
        self.assertIn("#debug]", text)

    def run_serve(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*PAYFLUX, "serve", *args], capture_output=True, text=True, timeout=60, cwd=self.dir,
                              env=clean_env())

    def test_exit_statuses_and_one_line_errors(self):
        bad = self.run_serve("--partitions", "x")
        self.assertEqual(bad.returncode, 2)
        self.assertEqual(bad.stderr.splitlines(), ["payflux: invalid --partitions (PAYFLUX_PARTITIONS / partitions in "
                                                   "the config file): must be an integer from 1 to 1024, got 'x'"])
        level = self.run_serve("--log-level", "loud")
        self.assertEqual(level.returncode, 2)
        self.assertIn("--log-level", level.stderr)
        self.assertIn("debug, info, warn, error", level.stderr)
        unknown = self.run_serve("--bogus")
        self.assertEqual(unknown.returncode, 1)  # twistd's status for a usage error
        self.assertEqual(unknown.stderr.splitlines(),
                         ["payflux serve: option --bogus not recognized (see payflux serve --help)"])
        helped = self.run_serve("--help")
        self.assertEqual(helped.returncode, 0)
        self.assertTrue(helped.stdout.startswith("Usage: payflux serve [options]\n"), helped.stdout[:200])
        for flag in ("--listen=", "--log-format=", "--log-level=", "--log-summary-interval=", "--config="):
            self.assertIn(flag, helped.stdout)
        # a failed start: one line, status 1, like twistd -n
        import socket

        taken = socket.socket()
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        self.addCleanup(taken.close)
        started = self.run_serve("--insecure-dev-mode", "--listen", f"tcp:{taken.getsockname()[1]}:interface=127.0.0.1",
                                 "--metrics-listen", "none", "--data-dir", self.data_dir)
        self.assertEqual(started.returncode, 1, started.stdout + started.stderr)
        # as under twistd -n, stderr goes to the log once logging began: one line on stdout
        self.assertEqual([json.loads(line)["message"] for line in started.stdout.splitlines()
                          if "cannot start" in line],
                         [f"payflux: cannot start: Couldn't listen on 127.0.0.1:{taken.getsockname()[1]}: "
                          "[Errno 98] Address already in use."])
        self.assertNotIn("Traceback", started.stdout + started.stderr)


class OutageLogVolumeTests(SynchronousTestCase):
    """Redis SIGKILLed for 4 s under load: a few dozen lines, every failed append still counted."""

    OUTAGE = 4.0
    INTERVAL = 1.0

    def test_log_lines_are_bounded_while_redis_is_down(self):
        binaries = find_redis_binaries()
        if not binaries:
            raise SkipTest("no redis-server binary")
        redis = RedisProcess(binaries.get("7") or binaries["6.2"], testcase=self)
        case = ServeTests("run")
        case.setUp()
        self.addCleanup(case._reap)
        proc = case.serve("--redis-url", redis.url, "--redis-timeout", "0.3",
                          "--log-summary-interval", str(self.INTERVAL))
        statuses: collections.Counter = collections.Counter()
        lock = threading.Lock()
        stop = threading.Event()

        def load() -> None:
            while not stop.is_set():
                try:
                    status = case.post()
                except OSError:
                    status = "error"
                with lock:
                    statuses[status] += 1

        threads = [threading.Thread(target=load, daemon=True) for _ in range(4)]
        for t in threads:
            t.start()
        self.addCleanup(stop.set)
        case.wait_for(lambda: statuses[202] >= 20, "traffic before the outage")
        before = len(case.log_text().splitlines())
        redis.kill()
        time.sleep(self.OUTAGE)
        during = case.log_text().splitlines()[before:]
        redis.start()
        accepted = statuses[202]
        case.wait_for(lambda: statuses[202] > accepted + 20, "traffic after the outage", timeout=20)
        stop.set()
        for t in threads:
            t.join(10)
        case.stop(proc)

        self.assertGreater(statuses[503], 50, statuses)  # a real flood: one 503 every few ms
        # unsummarised (log_summary_interval 0): 2 lines per 503 plus one per reconnect attempt of
        # each pooled connection, ~140 lines in these 4 s; summarised ~14 (one per kind per second)
        self.assertLessEqual(len(during), 40, "\n".join(during))
        docs = [json.loads(line) for line in case.log_text().splitlines()]
        appends = [d for d in docs if d["message"].startswith("append failed") or d.get("summary_of") == "append failed"]
        self.assertTrue([d for d in appends if "more like this" in d["message"]], appends)
        # nothing lost: the first line plus every summary's count is every 503 answered
        self.assertEqual(sum(d.get("repeated", 1) for d in appends), statuses[503], (statuses, appends))
