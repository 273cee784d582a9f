"""
``--workers N`` for real: ``twistd -n payflux --workers 2`` as a child process with its embedded
Redis; requests reach both workers through the one shared port, a SIGKILLed worker comes back,
SIGTERM drains everything, and the side port's /metrics sums the workers.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from twisted.trial.unittest import SynchronousTestCase

from tests.support.process import TWISTD, clean_env, reap_supervisor, worker_pids
from tests.support.redis import free_port, sync_command_at

SECRET = "workers-test-secret-0123456789"


def _request(url: str, body: bytes | None = None, headers: dict | None = None):
    """(status, body, X-PayFlux-Worker header) over a fresh connection."""
    req = urllib.request.Request(url, data=body, headers=headers or {}, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read(), r.headers.get("X-PayFlux-Worker")
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers.get("X-PayFlux-Worker")


def _metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


class WorkersTests(SynchronousTestCase):
    def setUp(self):
        from payflux.cli import sample_event

        self.sample_event = sample_event
        self.dir = tempfile.mkdtemp(prefix="payflux-workers-test-")
        self.data_dir = os.path.join(self.dir, "data")
        self.port = free_port()
        self.side_port = free_port()
        self.proc: subprocess.Popen | None = None
        self.addCleanup(self._reap)

    def _reap(self):
        reap_supervisor(self.proc, self.data_dir)

    def worker_pids(self) -> list[int]:
        """Live worker processes: children of the supervisor running payflux.worker."""
        return worker_pids(self.proc.pid)

    def log_text(self) -> str:
        with open(os.path.join(self.dir, "twistd.log"), "rb") as f:
            return f.read().decode("utf-8", "replace")

    def start(self, *extra: str) -> None:
        env = clean_env()
        env["PAYFLUX_API_KEYS"] = f"tester:{SECRET}"
        args = [*TWISTD, "-n", "--pidfile=", "payflux", "--workers", "2",
                "--listen", f"tcp:{self.port}:interface=127.0.0.1",
                "--metrics-listen", f"tcp:{self.side_port}:interface=127.0.0.1",
                "--data-dir", self.data_dir, "--stats-interval", "0.5", "--shutdown-grace", "5", *extra]
        log = open(os.path.join(self.dir, "twistd.log"), "wb")
        self.addCleanup(log.close)
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=self.dir, env=env)
        self.wait_ready()

    def wait_ready(self, timeout: float = 20) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.assertIsNone(self.proc.poll(), self.log_text())
            try:
                status, body, _ = _request(f"http://127.0.0.1:{self.side_port}/ready")
                if status == 200:
                    return json.loads(body)
            except OSError:
                pass
            time.sleep(0.1)
        self.fail("supervisor did not become ready:\n" + self.log_text())

    def post(self, event: dict):
        status, body, worker = _request(
            f"http://127.0.0.1:{self.port}/v1/events/payment_exhaust",
            json.dumps(event).encode(),
            {"Content-Type": "application/json", "Authorization": f"Bearer {SECRET}"},
        )
        return status, json.loads(body), worker

    def post_until_accepted(self, event: dict, deadline: float):
        """Retry (same event_id) through connection errors and 503s, as a producer would."""
        while True:
            try:
                status, body, worker = self.post(event)
                if status == 202:
                    return body, worker
            except OSError:
                pass
            self.assertLess(time.monotonic(), deadline, "no 202 before the deadline")
            time.sleep(0.05)

    def side(self, path: str) -> tuple[int, bytes]:
        status, body, _ = _request(f"http://127.0.0.1:{self.side_port}{path}")
        return status, body

    def xlen(self) -> int:
        return sync_command_at(os.path.join(self.data_dir, "redis.sock"), "XLEN", "payflux:{0}:events")

    def stop(self) -> float:
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        self.assertIn(self.proc.wait(timeout=20), (0, -signal.SIGTERM))
        return time.monotonic() - started

    def test_two_workers_share_the_port_metrics_sum_and_sigterm_drains(self):
        self.start()
        self.assertEqual(self.wait_ready(), {"status": "ready", "workers_ready": 2, "workers": 2})
        events = [self.sample_event() for _ in range(60)]
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(self.post, events))
        self.assertEqual({r[0] for r in results}, {202}, results[:3])
        workers = {r[2] for r in results}
        pids = set(self.worker_pids())
        self.assertEqual(len(pids), 2)
        self.assertEqual({int(w.split("/")[1]) for w in workers}, pids)  # both workers accepted
        self.assertEqual(self.xlen(), 60)

        # the side port sums the workers' counters; the ingest port shows one worker's
        status, text = self.side("/metrics")
        self.assertEqual(status, 200)
        text = text.decode()
        self.assertEqual(_metric(text, "payflux_events_accepted_total"), 60)
        self.assertEqual(_metric(text, "payflux_request_duration_seconds_count"), 60)
        self.assertEqual(_metric(text, "payflux_workers_running"), 2)
        self.assertEqual(_metric(text, "payflux_redis_up"), 1)
        self.assertEqual(self.side("/health")[0], 200)

        redis_pid = int(open(os.path.join(self.data_dir, "redis.pid")).read())
        self.assertLess(self.stop(), 10)
        for pid in [*pids, redis_pid]:
            with self.assertRaises(OSError):
                os.kill(pid, 0)
        log = self.log_text()
        self.assertEqual(log.count("draining: refusing new ingests"), 2)
        self.assertIn("embedded redis-server stopped", log)
        self.assertNotIn("Traceback", log)

    def test_killed_worker_is_restarted_and_retries_do_not_duplicate(self):
        self.start()
        victim = self.worker_pids()[0]
        deadline = time.monotonic() + 20
        sent = []
        seen_workers = set()
        for n in range(80):
            if n == 20:
                os.kill(victim, signal.SIGKILL)
            event = self.sample_event()
            body, worker = self.post_until_accepted(event, deadline)
            sent.append((event, body["id"]))
            seen_workers.add(worker)
            if n % 10 == 0:
                # a retry of an accepted event (as after a lost response): same id, nothing appended
                again, _ = self.post_until_accepted(event, deadline)
                self.assertEqual((again["id"], again["duplicate"]), (body["id"], True))
        self.assertEqual(self.xlen(), len(sent))

        # the supervisor restarted the worker: two live workers again, one of them new
        ready = self.wait_ready()
        self.assertEqual(ready["workers_ready"], 2)
        pids = self.worker_pids()
        self.assertEqual(len(pids), 2)
        self.assertNotIn(victim, pids)
        status, text = self.side("/metrics")
        self.assertEqual(_metric(text.decode(), "payflux_worker_restarts_total"), 1)
        self.assertIn("exited unexpectedly", self.log_text())
        self.stop()

    def test_invalid_workers_exit_2_with_one_line(self):
        env = clean_env()
        for args, expected in (
            (["--workers", "0"], "invalid --workers"),
            (["--workers", "lots"], "invalid --workers"),
            (["--workers", "2", "--listen", f"unix:{self.dir}/s.sock"], "needs a tcp: or tcp6: listen endpoint"),
        ):
            result = subprocess.run(
                [*TWISTD, "-n", "--pidfile=", "payflux", "--insecure-dev-mode", "--data-dir", self.data_dir, *args],
                capture_output=True, text=True, timeout=30, cwd=self.dir, env=env,
            )
            output = (result.stdout + result.stderr).strip()
            self.assertEqual(result.returncode, 2, output)
            self.assertEqual(len(output.splitlines()), 1, output)
            self.assertIn(expected, output)
