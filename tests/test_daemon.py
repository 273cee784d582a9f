"""
The quick start, for real: ``twistd -n payflux`` as a child process with its embedded Redis,
a request, SIGTERM, a restart on the same data dir, and the event still there.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

from twisted.trial.unittest import SynchronousTestCase

from tests.support.process import TWISTD, NodeProcesses, clean_env, http_request, wait_ready
from tests.support.redis import free_port, sync_command_at

SECRET = "daemon-test-secret-0123456789"


class DaemonTests(NodeProcesses, SynchronousTestCase):
    dir_prefix = "payflux-daemon-"

    def start(self, *extra: str, logger: bool = False) -> subprocess.Popen:
        env = clean_env()
        env["PAYFLUX_API_KEYS"] = f"tester:{SECRET}"
        args = [*TWISTD, "-n", "--pidfile="]
        if logger:
            args.append("--logger=payflux.observability.logs.json_observer")
        args += ["payflux", "--listen", f"tcp:{self.port}:interface=127.0.0.1", "--metrics-listen", "none",
                 "--data-dir", self.data_dir, *extra]
        log = open(os.path.join(self.dir, f"twistd-{len(self.procs)}.log"), "wb")
        self.addCleanup(log.close)
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=self.dir, env=env)
        self.procs.append(proc)
        index = len(self.procs) - 1
        wait_ready(self, proc, f"http://127.0.0.1:{self.port}/ready", lambda: self.log_text(index))
        return proc

    def run_until_exit(self, port: int) -> subprocess.CompletedProcess:
        """Run a node expected to refuse to start; returns its completed process."""
        env = clean_env()
        return subprocess.run(
            [*TWISTD, "-n", "--pidfile=", "payflux", "--insecure-dev-mode",
             "--listen", f"tcp:{port}:interface=127.0.0.1", "--metrics-listen", "none",
             "--data-dir", self.data_dir],
            capture_output=True, text=True, timeout=60, cwd=self.dir, env=env,
        )

    def log_text(self, n: int) -> str:
        with open(os.path.join(self.dir, f"twistd-{n}.log"), "rb") as f:
            return f.read().decode("utf-8", "replace")

    def stop(self, proc: subprocess.Popen) -> float:
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        # twistd re-raises the signal that stopped it once shutdown completed, so a clean stop
        # exits "killed by SIGTERM" (systemd counts that as success for its own stop).
        self.assertIn(proc.wait(timeout=30), (0, -signal.SIGTERM))
        return time.monotonic() - started

    def post(self, event: dict) -> tuple[int, dict]:
        status, body = http_request(
            f"http://127.0.0.1:{self.port}/v1/events/payment_exhaust",
            json.dumps(event).encode(),
            {"Content-Type": "application/json", "Authorization": f"Bearer {SECRET}"},
        )
        return status, json.loads(body)

    def test_embedded_redis_quick_start_persists_across_restart(self):
        from payflux.cli import sample_event

        proc = self.start(logger=True)
        event = sample_event()
        status, body = self.post(event)
        self.assertEqual(status, 202, body)
        socket_path = os.path.join(self.data_dir, "redis.sock")
        entries = sync_command_at(socket_path, "XRANGE", "payflux:{0}:events", "-", "+")
        self.assertEqual(entries[0][0].decode(), body["id"])
        redis_pid = int(open(os.path.join(self.data_dir, "redis.pid")).read())

        self.assertLess(self.stop(proc), 15)
        with self.assertRaises(OSError):
            os.kill(redis_pid, 0)  # the embedded Redis stopped with the daemon
        self.assertFalse(os.path.exists(socket_path))

        # logs: one JSON object per line, naming the Redis in use, never the secret
        lines = [line for line in self.log_text(0).splitlines() if line.strip()]
        docs = [json.loads(line) for line in lines]
        self.assertTrue(any("using Redis at unix://" in d["message"] for d in docs))
        self.assertNotIn(SECRET, self.log_text(0))
        self.assertNotIn(event["payment_intent_id_hash"], self.log_text(0))

        self.start()
        status, again = self.post(event)
        self.assertEqual((status, again["id"], again["duplicate"]), (202, body["id"], True))
        entries = sync_command_at(socket_path, "XLEN", "payflux:{0}:events")
        self.assertEqual(entries, 1)

    def test_sigterm_drains_and_exits_within_grace(self):
        proc = self.start("--shutdown-grace", "5")
        elapsed = self.stop(proc)
        self.assertLess(elapsed, 10)
        self.assertIn("draining", self.log_text(0))

    def test_port_in_use_fails_the_start(self):
        import socket

        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        self.addCleanup(s.close)
        result = self.run_until_exit(s.getsockname()[1])
        self.assertEqual(result.returncode, 1)
        # twistd routes stderr into its log (stdout with -n)
        self.assertIn("payflux: cannot start:", result.stdout + result.stderr)
        self.assertIn("Address already in use", result.stdout + result.stderr)
        self.assertNotIn("Traceback", result.stdout + result.stderr)

    def test_data_dir_owned_by_a_live_redis_fails_the_start(self):
        first = self.start()
        result = self.run_until_exit(free_port())
        self.assertEqual(result.returncode, 1)
        self.assertIn("payflux: cannot start:", result.stdout + result.stderr)
        self.assertIn("already running on", result.stdout + result.stderr)
        self.assertNotIn("Traceback", result.stdout + result.stderr)
        self.stop(first)
