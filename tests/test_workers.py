"""
``--workers N`` for real: ``twistd -n payflux --workers 2`` as a child process with its embedded
Redis; requests reach both workers through the one shared port, a SIGKILLed worker comes back,
SIGTERM drains everything, and the side port's /metrics sums the workers.
"""

from __future__ import annotations

import collections
import json
import socket
import os
import sys
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from twisted.trial.unittest import SynchronousTestCase

from payflux.ingest.ratelimit import SHARED_BUCKET
from tests.support.process import TWISTD, clean_env, reap_supervisor, wait_ready, worker_pids
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
        """Live worker processes: children of the supervisor running payflux.workerprocess."""
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
        return json.loads(wait_ready(self, self.proc, f"http://127.0.0.1:{self.side_port}/ready", self.log_text,
                                     timeout=timeout, what="supervisor"))

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

    def test_concurrent_connections_are_spread_over_the_workers(self):
        """
        40 connections opened at once, then one POST on each: each worker serves a fair share
        (SO_REUSEPORT sockets; one shared socket let the first worker to wake take them all).
        """
        import http.client

        self.start()
        connections = [http.client.HTTPConnection("127.0.0.1", self.port, timeout=10) for _ in range(40)]
        for c in connections:
            c.connect()
        workers = []
        for c in connections:
            c.request("POST", "/v1/events/payment_exhaust", json.dumps(self.sample_event()),
                      {"Content-Type": "application/json", "Authorization": f"Bearer {SECRET}"})
            response = c.getresponse()
            response.read()
            self.assertEqual(response.status, 202)
            workers.append(response.headers["X-PayFlux-Worker"])
            c.close()
        counts = sorted(workers.count(w) for w in set(workers))
        self.assertEqual(len(counts), 2, counts)
        self.assertGreaterEqual(counts[0], 8, counts)  # Bin(40, 1/2) below 8: p < 1e-4
        self.stop()

    def test_a_taken_port_fails_the_start_with_one_line(self):
        """Held by anything -- a plain listener, or one with SO_REUSEPORT such as another PayFlux."""
        for reuseport in (False, True):
            holder = socket.socket()
            self.addCleanup(holder.close)
            if reuseport:
                holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            holder.bind(("127.0.0.1", self.port))
            holder.listen(8)
            env = clean_env()
            env["PAYFLUX_API_KEYS"] = f"tester:{SECRET}"
            proc = subprocess.run(
                [*TWISTD, "-n", "--pidfile=", "payflux", "--workers", "2", "--listen", f"tcp:{self.port}:interface=127.0.0.1",
                 "--metrics-listen", "none", "--data-dir", self.data_dir],
                capture_output=True, text=True, timeout=60, cwd=self.dir, env=env)
            self.assertEqual(proc.returncode, 1, (reuseport, proc.stdout[-2000:], proc.stderr[-2000:]))
            self.assertIn("payflux: cannot start:", proc.stderr + proc.stdout)
            self.assertNotIn("Traceback", proc.stderr + proc.stdout)
            holder.close()

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

    def test_a_keys_rate_limit_is_shared_by_the_workers(self):
        # 20 events of burst and (practically) no refill: one bucket admits 20 (plus, as with one
        # process, up to one request per connection admitted before the spend of the one before it
        # was counted: 8 here), whichever worker each request reaches; a bucket per worker, 40 and more
        self.start("--rate-limit", "0.001", "--rate-burst", "20")
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(self._post_fresh, [self.sample_event() for _ in range(80)]))
        statuses = [r[0] for r in results]
        accepted = statuses.count(202)
        self.assertEqual(set(statuses), {202, 429}, results[:3])
        print(f"\n  shared limit, burst 20: {accepted} of 80 accepted, by worker "
              f"{collections.Counter(r[2].split('/')[0] for r in results if r[0] == 202)}", file=sys.stderr)
        self.assertLessEqual(accepted, 20 + 8)
        self.assertGreaterEqual(accepted, 10)  # each worker had its share at least
        self.assertEqual(len({r[2] for r in results if r[0] == 202}), 2)  # both workers admitted some
        self.assertEqual(self.xlen(), accepted)
        # the one bucket, in Redis, is spent once the workers' last spends are synced (within 50 ms)
        deadline = time.monotonic() + 5
        while float(sync_command_at(os.path.join(self.data_dir, "redis.sock"), "HGET", "payflux:ratelimit:tester",
                                    "tokens")) >= 1:
            self.assertLess(time.monotonic(), deadline, "the shared bucket was never charged")
            time.sleep(0.05)
        self.stop()

    def _post_fresh(self, event: dict):
        """post() on a new connection (the kernel picks the worker), retrying only refused connects."""
        for _ in range(50):
            try:
                return self.post(event)
            except OSError:
                time.sleep(0.05)
        self.fail("could not connect")

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


class FakeBucketRedis:
    """The shared-bucket script (payflux.ingest.ratelimit.SHARED_BUCKET_SCRIPT) in Python on a Clock, with a
    reply latency; ``down`` makes every call fail, ``noscript`` every EVALSHA until SCRIPT LOAD."""

    def __init__(self, clock, latency: float = 0.001) -> None:
        self.clock, self.latency = clock, latency
        self.buckets: dict[str, tuple[float, float]] = {}
        self.calls: list[str] = []
        self.down = False
        self.noscript = False

    def execute_command(self, name, *args):
        from twisted.internet import defer
        from txredisapi import ConnectionError, ResponseError

        self.calls.append(name)
        if self.down:
            return defer.fail(ConnectionError("Redis down (test)"))
        if name == "EVALSHA" and self.noscript:
            return defer.fail(ResponseError("NOSCRIPT No matching script. Please use EVAL."))
        if name == "SCRIPT":  # SCRIPT LOAD <source>: what EVALSHA names it by from now on
            self.noscript = False
            return defer.succeed(SHARED_BUCKET.sha if args == ("LOAD", SHARED_BUCKET.source) else "wrong script")
        _, _, key, rate, burst, spent = args
        rate, burst, spent = float(rate), float(burst), float(spent)
        now = self.clock.seconds()
        tokens, stamp = self.buckets.get(key, (burst, now))
        tokens = min(burst, tokens + max(0.0, now - stamp) * rate) - spent
        self.buckets[key] = (tokens, max(now, stamp))
        d = defer.Deferred()
        self.clock.callLater(self.latency, d.callback, str(tokens))
        return d


class SharedRateLimiterTests(SynchronousTestCase):
    """SharedRateLimiter on a Clock: N workers admit what one bucket would, however traffic is spread."""

    def assertNear(self, value: float, expected: float, tolerance: float, msg: str = "") -> None:
        self.assertLessEqual(abs(value - expected), tolerance, f"{value} vs {expected} +- {tolerance} {msg}")

    def limiters(self, n: int, redis=None, rate: float = 1000, burst: int = 1000):
        from twisted.internet.task import Clock

        from payflux.ingest.ratelimit import SharedRateLimiter

        self.clock = clock = Clock()
        clock.advance(1000)
        self.redis = redis or FakeBucketRedis(clock)
        return [SharedRateLimiter(rate, burst, clock.seconds, self.redis, clock, n, "payflux") for _ in range(n)]

    def offer(self, limiters, share, seconds: float = 10.0, per_second: int = 3000, batch: int = 1) -> int:
        """Offer per_second events (as requests of ``batch``), request i to limiters[share(i)]; count admitted."""
        from payflux.ingest.errors import ApiError

        admitted, step = 0, 0.01
        per_step = int(per_second * step / batch)
        for tick in range(int(seconds / step)):
            for i in range(per_step):
                limiter = limiters[share(tick * per_step + i)]
                try:
                    limiter.check("k1")
                except ApiError as e:
                    self.assertEqual(e.status, 429)
                    continue
                limiter.spend("k1", batch)
                admitted += batch
            self.clock.advance(step)
        return admitted

    def test_spread_or_all_on_one_worker_admits_one_buckets_worth(self):
        one = self.offer(self.limiters(1), lambda i: 0)
        expected = 1000 + 1000 * 10  # the burst, then the rate
        self.assertNear(one, expected, expected * 0.02)
        for share, what in ((lambda i: i % 2, "round robin"), (lambda i: 0, "all on worker 0"),
                            (lambda i: 0 if i % 10 else 1, "9 of 10 on worker 0")):
            limiters = self.limiters(2)
            admitted = self.offer(limiters, share)
            self.assertNear(admitted, expected, expected * 0.05, what)
            self.assertLessEqual(admitted, expected + 50, what)
            # syncs are bounded per key and worker (every SYNC_INTERVAL), not one per request
            self.assertLessEqual(sum(lim.syncs for lim in limiters), 2 * 10 / limiters[0].interval + 4, what)
        four = self.offer(self.limiters(4), lambda i: i % 3)  # 4 workers, one idle
        self.assertNear(four, expected, expected * 0.05)

    def test_batches_go_into_debt_across_workers(self):
        limiters = self.limiters(2, rate=100, burst=100)
        admitted = self.offer(limiters, lambda i: i % 2, seconds=10, per_second=5000, batch=50)
        self.assertLessEqual(admitted, 100 + 100 * 10 + 2 * 50)  # at most one batch of debt per worker
        self.assertGreaterEqual(admitted, 900)

    def test_redis_down_falls_back_to_each_workers_share_and_noscript_reloads(self):
        from payflux.ingest.errors import ApiError

        limiters = self.limiters(2)
        self.redis.noscript = True
        self.offer(limiters, lambda i: 0, seconds=0.1)
        self.assertEqual(self.redis.calls[:3], ["EVALSHA", "SCRIPT", "EVALSHA"])  # loaded, then run
        self.redis.down = True
        self.clock.advance(100)  # the bucket refills; worker 0 alone, on its share: half the rate
        admitted = self.offer(limiters, lambda i: 0)
        self.assertNear(admitted, 500 + 500 * 10, 200)
        limiters[0].spend("k1", 1000)  # a batch deep into debt: 1000 events at its 500/s share
        with self.assertRaises(ApiError) as cm:
            limiters[0].check("k1")
        self.assertEqual(cm.exception.headers["Retry-After"], "2")
