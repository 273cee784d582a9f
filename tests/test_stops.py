"""
Stops that always stop, and a fast ``/ready`` (issue 12).

Real ``twistd`` processes, one per state: Redis never reachable, the embedded Redis never ready,
Redis paused (SIGSTOP) with appends unsent, Redis killed (and back), consumers mid-batch with a
handler that never finishes, a ``--workers 2`` supervisor. Each must exit on SIGTERM within
``shutdown_grace`` + 5 s (grace 1 s here), and ``/ready`` must answer 503 with a readable reason
within 100 ms (asserted < 0.5 s for a loaded CI box; the measured time is printed).

Plus unit tests on a Clock: the node's bounded stop, the readiness probe, the bounded pool close
and the consumer's stop budget.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from twisted.internet import defer, task
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from payflux.ingest.app import _reason
from payflux.node import STOP_MARGIN, Node, RedisHealth, RedisNotReady
from payflux.redis.target import RedisTarget
from payflux.redis.txadapter import close_pool
from tests.support.process import TWISTD, clean_env, http_request, reap_supervisor, worker_pids
from tests.support.redis import RedisProcess, find_redis_binaries, free_port

GRACE = 1.0
EXIT_WITHIN = GRACE + 5.0
READY_WITHIN = 0.5  # the issue asks for 100 ms; room for a loaded CI box (each time is printed)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- handlers a twistd consumer node loads as "tests.test_stops:..." -------------------------

class NeverFinishes:
    """A handler whose batches and close() never complete (a hung downstream)."""

    def __init__(self, reactor: Any = None, **options: Any) -> None:
        pass

    def handle(self, entries):
        print(f"NeverFinishes got {len(entries)} entries", flush=True)
        return defer.Deferred()

    def close(self):
        return defer.Deferred()


# --- real processes ------------------------------------------------------------------------

def _redis_binary() -> str | None:
    found = find_redis_binaries()
    return found.get("7") or found.get("6.2")


class StopCase(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="payflux-stops-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.data_dir = os.path.join(self.dir, "data")
        self.port = free_port()
        self.side_port = free_port()
        self.proc: subprocess.Popen | None = None
        self.addCleanup(lambda: reap_supervisor(self.proc, self.data_dir))

    def redis(self) -> RedisProcess:
        binary = _redis_binary()
        if binary is None:
            raise unittest.SkipTest("no redis-server binary")
        return RedisProcess(binary, testcase=self)

    def start(self, *extra: str, twistd: list[str] = TWISTD, env: dict | None = None) -> subprocess.Popen:
        args = [*twistd, "-n", "--pidfile=", "payflux", "--insecure-dev-mode",
                "--listen", f"tcp:{self.port}:interface=127.0.0.1",
                "--metrics-listen", f"tcp:{self.side_port}:interface=127.0.0.1",
                "--data-dir", self.data_dir, "--shutdown-grace", str(GRACE), *extra]
        log = open(os.path.join(self.dir, "twistd.log"), "wb")
        self.addCleanup(log.close)
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=self.dir,
                                     env=env or clean_env())
        return self.proc

    def log_text(self) -> str:
        with open(os.path.join(self.dir, "twistd.log"), "rb") as f:
            return f.read().decode("utf-8", "replace")

    def wait_side(self, want: int | None = None, timeout: float = 20) -> tuple[int, dict]:
        """Poll the side port's /ready until it answers (``want``, if given); returns (status, body)."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            self.assertIsNone(self.proc.poll(), self.log_text())
            try:
                status, body = http_request(f"http://127.0.0.1:{self.side_port}/ready", timeout=5)
                last = (status, json.loads(body))
                if want is None or status == want:
                    return last
            except OSError:
                pass
            time.sleep(0.05)
        self.fail(f"/ready never answered {want} (last: {last}):\n{self.log_text()[-3000:]}")

    def ready(self, what: str, side: bool = True) -> tuple[int, dict]:
        """One /ready, timed: asserted within READY_WITHIN, printed."""
        port = self.side_port if side else self.port
        started = time.monotonic()
        status, body = http_request(f"http://127.0.0.1:{port}/ready", timeout=5)
        took = time.monotonic() - started
        print(f"/ready ({what}, {'side' if side else 'ingest'} port): {status} in {took * 1000:.1f} ms: "
              f"{body.decode()}")
        self.assertLess(took, READY_WITHIN, f"/ready took {took:.3f}s ({what})")
        return status, json.loads(body)

    def assert_unavailable(self, what: str, *words: str) -> str:
        for side in (True, False):
            status, body = self.ready(what, side=side)
            self.assertEqual((status, body["status"]), (503, "redis_unavailable"), body)
            message = body["message"]
            for word in words:
                self.assertIn(word, message)
            self.assertNotIn("Deferred", message)
            self.assertFalse(message.startswith("("), message)
        return message

    def sigterm(self) -> float:
        """SIGTERM; asserts a clean exit within shutdown_grace + 5 s; returns the seconds it took."""
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=EXIT_WITHIN + 10)
        except subprocess.TimeoutExpired:
            self.fail(f"still running {EXIT_WITHIN + 10:.0f}s after SIGTERM:\n{self.log_text()[-4000:]}")
        took = time.monotonic() - started
        print(f"exit {code} {took:.2f}s after SIGTERM")
        self.assertIn(code, (0, -signal.SIGTERM), self.log_text()[-3000:])
        self.assertLess(took, EXIT_WITHIN, self.log_text()[-4000:])
        return took


class StopInEveryState(StopCase):
    def test_redis_never_reachable(self):
        closed = free_port()
        self.start("--redis-url", f"redis://127.0.0.1:{closed}/0", "--stats-interval", "0.2")
        self.wait_side(503)
        time.sleep(0.5)  # samplers and the trimmer now wait on a pool that never connects
        message = self.assert_unavailable("never reachable", f"127.0.0.1:{closed}", "connection refused",
                                          "no answer since PayFlux started")
        self.assertTrue(message.startswith(f"no connection to Redis at 127.0.0.1:{closed}: "), message)
        self.sigterm()
        self.assertIn("gave up waiting for", self.log_text())  # what was abandoned is logged

    def test_embedded_redis_never_ready(self):
        """A redis-server that never answers and ignores SIGTERM: SIGKILLed, the node exits in time."""
        fake = os.path.join(self.dir, "redis-server")
        pidfile = os.path.join(self.dir, "fake.pid")
        with open(fake, "w") as f:
            f.write(f"#!/bin/sh\necho $$ > {pidfile}\ntrap '' TERM\nexec sleep 600\n")
        os.chmod(fake, 0o755)
        twistd = [sys.executable, "-c",
                  "import payflux.streams.embedded as e; "
                  f"e.find_redis_server = lambda: {fake!r}; "
                  "from twisted.scripts.twistd import run; run()"]
        self.start(twistd=twistd)
        status, body = self.wait_side()
        self.assertEqual(status, 503, body)
        status, body = self.ready("embedded never ready")
        self.assertEqual((status, body["message"]), (503, "the embedded Redis is not ready yet"))
        for _ in range(100):
            if os.path.exists(pidfile):
                break
            time.sleep(0.02)
        fake_pid = int(open(pidfile).read())
        self.sigterm()
        self.assertIn("sending SIGKILL", self.log_text())
        with self.assertRaises(OSError):
            os.kill(fake_pid, 0)  # killed and reaped, not left behind

    def test_redis_paused_with_appends_unsent(self):
        """SIGSTOP while batches are being written: the drain gives up, the pool aborts, the node exits."""
        from payflux.cli import sample_event

        server = self.redis()
        self.start("--redis-url", server.url, "--redis-timeout", "30", "--stats-interval", "0.2")
        self.wait_side(200)
        server.pause()
        self.addCleanup(server.resume)
        batch = ("\n".join(json.dumps(sample_event(n, failure_reason="x" * 300)) for n in range(1000))).encode()

        def post() -> None:
            try:
                http_request(f"http://127.0.0.1:{self.port}/v1/events/payment_exhaust/batch", batch,
                             {"Content-Type": "application/x-ndjson"}, timeout=30)
            except OSError:
                pass

        posters = [threading.Thread(target=post, daemon=True) for _ in range(12)]
        for t in posters:
            t.start()
        time.sleep(1.0)  # megabytes of appends queued towards the paused Redis
        self.assert_unavailable("paused", f"127.0.0.1:{server.port}", "within 50 ms", "last success")
        self.sigterm()
        self.assertIn("grace period over with", self.log_text())

    def test_redis_killed_then_back_then_killed(self):
        server = self.redis()
        self.start("--redis-url", server.url, "--stats-interval", "0.2")
        self.wait_side(200)
        server.kill()
        time.sleep(1.5)  # the pool's first reconnect attempt (after ~0.5 s) is refused
        message = self.assert_unavailable("killed", f"127.0.0.1:{server.port}", "connection refused", "last success")
        self.assertRegex(message, r"last success [0-9.]+ s ago")
        server.start()
        self.wait_side(200, timeout=10)  # the pool reconnects (backoff at most 2 s)
        status, body = self.ready("back")
        self.assertEqual((status, body), (200, {"status": "ready"}))
        server.kill()
        time.sleep(0.5)  # sampler passes waiting for a connection that never comes
        self.sigterm()

    def test_consumer_mid_batch_with_a_handler_that_never_finishes(self):
        from payflux.cli import sample_event

        server = self.redis()
        config = os.path.join(self.dir, "payflux.toml")
        with open(config, "w") as f:
            f.write('roles = ["ingest", "consumers"]\n[[consumers]]\nname = "hung"\ngroup = "hung"\n'
                    'handler = "tests.test_stops:NeverFinishes"\nconcurrency = 2\nbatch_size = 1\n'
                    'min_idle_ms = 100\nreclaim_interval = 0.2\nblock_ms = 200\n')
        self.start("--redis-url", server.url, "--config", config,
                   env=clean_env(PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))))
        self.wait_side(200)
        for n in range(3):
            status, body = http_request(f"http://127.0.0.1:{self.port}/v1/events/payment_exhaust",
                                        json.dumps(sample_event(n)).encode(), {"Content-Type": "application/json"})
            self.assertEqual(status, 202, body)
        deadline = time.monotonic() + 10
        while self.log_text().count("NeverFinishes got") < 3 and time.monotonic() < deadline:
            time.sleep(0.05)  # two batches with the consumer, one more with the reclaim pass
        self.assertGreaterEqual(self.log_text().count("NeverFinishes got"), 3, self.log_text()[-3000:])
        self.sigterm()
        log = self.log_text()
        self.assertIn("left pending for reclaim", log)
        self.assertIn("close() did not finish", log)
        pending = server.sync_command("XPENDING", "payflux:{0}:events", "hung")
        # the two entries read (the third waits for a free slot) stay pending: never acked unfinished
        self.assertEqual(int(pending[0]), 2)

    def test_workers_supervisor_redis_killed(self):
        server = self.redis()
        self.start("--redis-url", server.url, "--workers", "2", "--stats-interval", "0.5")
        status, body = self.wait_side(200)
        self.assertEqual(body["workers_ready"], 2)
        workers = worker_pids(self.proc.pid)
        server.kill()
        time.sleep(1.5)
        status, body = self.ready("killed, --workers 2")
        self.assertEqual((status, body["status"]), (503, "redis_unavailable"), body)
        self.assertIn("connection refused", body["message"])
        self.sigterm()
        for pid in workers:
            with self.assertRaises(OSError):
                os.kill(pid, 0)


# --- unit tests on a Clock -----------------------------------------------------------------

def _child(name: str, clock: task.Clock, log: list, stopped: defer.Deferred | None = None):
    from twisted.application.service import Service

    class Child(Service):
        def stopService(self):
            super().stopService()
            log.append((name, clock.seconds()))
            return stopped if stopped is not None else defer.Deferred()  # never fires

    child = Child()
    child.name = name
    return child


class NodeStopTests(unittest.TestCase):
    def capture_logs(self) -> list[dict]:
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        return events

    def test_children_that_never_stop_are_abandoned_in_order_within_the_budget(self):
        clock = task.Clock()
        events = self.capture_logs()
        node = Node(grace=3.0, clock=clock)
        order: list = []
        for name in ("last", "middle"):
            _child(name, clock, order).setServiceParent(node)
        _child("first", clock, order, stopped=defer.succeed(None)).setServiceParent(node)
        node.startService()
        stopping = node.stopService()
        self.assertEqual(order, [("first", 0.0), ("middle", 0.0)])  # "first" stopped at once
        clock.advance(0.25)  # SERVICE_STOP_LIMIT: "middle" abandoned
        self.assertEqual(order[-1], ("last", 0.25))
        clock.pump([0.05] * 20)
        self.assertTrue(stopping.called)
        self.assertLessEqual(clock.seconds(), 3.0 + STOP_MARGIN)
        warnings = [e for e in events if e.get("log_level") and e["log_level"].name == "warn"]
        self.assertEqual([e["service"] for e in warnings], ["middle", "last"])
        self.assertIn("gave up waiting for", warnings[0]["log_format"])

    def test_the_whole_stop_is_bounded_by_grace_plus_margin(self):
        """Children that each would take forever, draining ones included: the stop still ends."""
        clock = task.Clock()
        self.capture_logs()
        node = Node(grace=2.0, clock=clock)
        order: list = []
        for i in range(6):
            child = _child(f"c{i}", clock, order)
            if i % 2:
                child.drains_work = True  # as consumers, the drain guard and a supervisor's workers
            child.setServiceParent(node)
        node.startService()
        stopping = node.stopService()
        while not stopping.called and clock.seconds() < 60:
            clock.advance(0.05)
        self.assertTrue(stopping.called)
        self.assertLessEqual(clock.seconds(), 2.0 + STOP_MARGIN + 0.05)
        self.assertEqual([name for name, _ in order], [f"c{i}" for i in reversed(range(6))])

    def test_stop_within_gets_the_limit(self):
        from twisted.application.service import Service

        clock = task.Clock()
        node = Node(grace=5.0, clock=clock)
        given: list = []

        class Budgeted(Service):
            drains_work = True

            def stop_within(self, seconds):
                super().stopService()
                given.append(seconds)
                return defer.succeed(None)

        Budgeted().setServiceParent(node)
        node.startService()
        self.successResultOf(node.stopService())
        self.assertEqual(given, [5.0 + 1.5])  # grace + SETTLE_LIMIT


class FakePool:
    def __init__(self, target: RedisTarget | None) -> None:
        self.target = target
        self.handler = object() if target is not None else None
        self.unavailable = "the embedded Redis is not ready yet"
        self.watch = None
        self.sent: list[defer.Deferred] = []

    def execute_command(self, *args):
        d: defer.Deferred = defer.Deferred()
        self.sent.append(d)
        return d


class FakeWatch:
    def __init__(self, connected: bool, failure: str | None) -> None:
        self.connected, self.failure = connected, failure


class ReadinessProbeTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.clock.advance(1000)
        self.pool = FakePool(RedisTarget(scheme="redis", host="127.0.0.1", port=6390))
        self.health = RedisHealth(self.pool, self.clock)

    def reason(self, d: defer.Deferred) -> str:
        return str(self.failureResultOf(d, RedisNotReady).value)

    def test_answered_ping_is_ready(self):
        d = self.health.check()
        self.pool.sent[0].callback("PONG")
        self.assertIsNone(self.successResultOf(d))

    def test_no_answer_within_50_ms_one_probe_shared(self):
        self.health.record_success()
        self.clock.advance(12)
        first = self.health.check()
        self.clock.advance(0.02)
        second = self.health.check()  # shares the PING in flight: never two at once
        self.assertEqual(len(self.pool.sent), 1)
        self.clock.advance(0.03)
        expected = "no answer from Redis at 127.0.0.1:6390 within 50 ms (last success 12 s ago)"
        self.assertEqual(self.reason(first), expected)
        self.assertEqual(self.reason(second), expected)
        later = self.health.check()  # the probe is still unanswered: an answer at once
        self.assertEqual(self.reason(later), expected)
        self.assertEqual(len(self.pool.sent), 1)
        self.pool.sent[0].callback("PONG")  # Redis is back
        d = self.health.check()
        self.pool.sent[1].callback("PONG")
        self.assertIsNone(self.successResultOf(d))

    def test_slow_ping_right_after_an_answer_is_ready(self):
        """A PING late by more than 50 ms on a busy machine is not an outage while Redis answered 0.5 s ago."""
        self.health.record_success()
        self.clock.advance(0.3)
        d = self.health.check()
        self.clock.advance(0.05)
        self.assertIsNone(self.successResultOf(d))
        self.clock.advance(0.1)  # still unanswered, last answer 0.45 s ago
        self.assertIsNone(self.successResultOf(self.health.check()))
        self.clock.advance(0.06)  # over 0.5 s since Redis last answered: unavailable
        self.assertEqual(self.reason(self.health.check()),
                         "no answer from Redis at 127.0.0.1:6390 within 50 ms (last success 0.5 s ago)")

    def test_connection_refused_answers_at_once(self):
        self.pool.watch = FakeWatch(connected=False, failure="connection refused")
        d = self.health.check()
        self.assertEqual(self.reason(d), "no connection to Redis at 127.0.0.1:6390: connection refused "
                                         "(no answer since PayFlux started)")

    def test_error_reply_and_timeouts_read_as_words(self):
        import txredisapi

        d = self.health.check()
        self.pool.sent[0].errback(txredisapi.ResponseError("LOADING Redis is loading the dataset in memory"))
        self.assertEqual(self.reason(d), "Redis at 127.0.0.1:6390: PING answered with an error: LOADING Redis is "
                                         "loading the dataset in memory (no answer since PayFlux started)")
        d = self.health.check()
        self.pool.sent[1].errback(txredisapi.TimeoutError("Not received Redis response in 2.0 seconds"))
        self.assertEqual(self.reason(d), "Redis at 127.0.0.1:6390: no answer to PING in 2.0 s "
                                         "(no answer since PayFlux started)")

    def test_no_pool_yet_says_why(self):
        health = RedisHealth(FakePool(None), self.clock)
        self.assertEqual(self.reason(health.check()), "the embedded Redis is not ready yet")

    def test_app_reason_never_a_repr(self):
        self.assertEqual(_reason(defer.TimeoutError(2.0, "Deferred")), "no answer from Redis within 2 s")
        self.assertEqual(_reason(RedisNotReady("cannot connect: connection refused")), "cannot connect: connection refused")
        self.assertEqual(_reason(ValueError()), "Redis check failed (ValueError)")


class _Transport:
    def __init__(self) -> None:
        self.aborted = False

    def abortConnection(self) -> None:
        self.aborted = True


class _Conn:
    def __init__(self) -> None:
        self.transport = _Transport()


class _Queue:
    def __init__(self, waiting: list) -> None:
        self.waiting = waiting
        self.peekers: list = []


class _Factory:
    def __init__(self) -> None:
        self.pool = [_Conn()]
        self.slots: list = []
        self.waiter: defer.Deferred = defer.Deferred()
        self.connectionQueue = _Queue([self.waiter])


class _Handler:
    """A pool handler whose disconnect() never fires (a connection to a paused Redis never closes)."""

    def __init__(self) -> None:
        self._factory = _Factory()

    def disconnect(self) -> defer.Deferred:
        return defer.Deferred()


class ClosePoolTests(unittest.TestCase):
    def test_close_is_bounded_fails_waiters_and_aborts(self):
        import txredisapi

        clock = task.Clock()
        handler = _Handler()
        done = close_pool(handler, 1.0, clock)
        self.failureResultOf(handler._factory.waiter, txredisapi.ConnectionError)
        self.assertNoResult(done)
        clock.advance(1.0)
        self.successResultOf(done)
        self.assertTrue(handler._factory.pool[0].transport.aborted)


class ConsumerStopBudgetTests(unittest.TestCase):
    def test_stop_within_ends_in_time_with_a_hung_handler(self):
        from payflux.consumers.config import ConsumerConfig
        from payflux.consumers.service import ConsumerService
        from payflux.observability.metrics import Metrics
        from payflux.streams.keys import StreamKeys

        clock = task.Clock()
        handler = NeverFinishes()
        svc = ConsumerService(ConsumerConfig(name="hung", group="hung", handler="x"), handler, object(),
                              lambda: None, StreamKeys("pf"), 1, Metrics().consumers, clock,
                              ready=lambda: defer.Deferred(), grace=30.0)
        svc.startService()
        svc._in_flight.add(defer.Deferred())  # a batch the handler never finishes
        stopping = svc.stop_within(3.0)
        clock.pump([0.1] * 30)
        self.successResultOf(stopping)
        self.flushLoggedErrors()
