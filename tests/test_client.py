"""
payflux.client, the Python producer client (docs/producers.md).

Unit tests drive the blocking and asyncio clients with payflux.client.testing's fake transport
and fake clocks (no sleeping: linger, backoff and Retry-After are checked as the deadlines the
client waits for).  End-to-end tests run ``twistd -n payflux`` on a real redis-server (AOF on) and
check the stream: every event sent is there exactly once, through the sync and the asyncio
client, also across a Redis outage in the middle of the stream, and the docs' examples run as is.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import re
import subprocess
import sys
import threading
import textwrap
import time
from datetime import datetime, timedelta, timezone

from twisted.trial.unittest import SynchronousTestCase

from payflux.client import (
    ACCEPTED,
    DROPPED,
    REJECTED,
    AsyncClient,
    AsyncHttpTransport,
    Backoff,
    BufferFull,
    Client,
    ClientClosed,
    FlushTimeout,
    HttpTransport,
    TransportError,
    build_event,
    encode_event,
    hash_id,
)
from payflux.client.delivery import retry_after
from payflux.client.testing import (
    FakeAsyncClock,
    FakeAsyncTransport,
    FakeClock,
    FakeTransport,
    accepted,
    error,
    refused,
    settle,
)
from tests.support.load import stream_entries
from tests.support.process import TWISTD, NodeProcesses, clean_env, wait_ready
from tests.support.redis import RedisProcess, find_redis_binaries, free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def wait_until(condition, timeout: float = 5.0, what: str = "condition") -> None:
    """Real-time poll for what the client's thread does after a fake-clock step."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.002)


def event(n: int = 0, **fields) -> dict:
    return build_event("payment_failed", "stripe", event_id=f"evt-{n:06d}", merchant_id_hash="m1",
                       event_timestamp="2026-12-03T10:00:00.000Z", **fields)


def lines(n: int) -> bytes:
    return b"".join(encode_event(event(i))[1] + b"\n" for i in range(n))


class ClientCase(SynchronousTestCase):
    """A blocking Client on a FakeTransport and a FakeClock; ``uniform`` returns the upper bound."""

    def client(self, script=(), **kwargs) -> Client:
        self.transport = FakeTransport(script)
        self.clock = FakeClock()
        self.reports = []
        kwargs.setdefault("uniform", lambda low, high: high)
        client = Client("http://127.0.0.1:1", "key", transport=self.transport, clock=self.clock,
                        on_result=self.reports.append, close_at_exit=False, **kwargs)
        self.addCleanup(lambda: client.close(timeout=0) if not client._final else None)
        return client

    def posts(self, n: int, what: str = "") -> None:
        wait_until(lambda: len(self.transport.bodies) >= n, what=what or f"{n} posts")
        self.assertEqual(len(self.transport.bodies), n)

    def waits_until(self, deadline: float) -> None:
        """The client's thread waits on the fake clock until ``deadline`` (a linger or a backoff)."""
        wait_until(lambda: any(d is not None and abs(d - deadline) < 1e-9 for d in self.clock.waiting),
                   what=f"a wait until {deadline} (waiting: {self.clock.waiting})")

    def in_thread(self, fn, *args):
        box = {}

        def run():
            try:
                box["result"] = fn(*args)
            except BaseException as e:  # noqa: B036 - handed to the test
                box["error"] = e

        t = threading.Thread(target=run, daemon=True)
        t.start()
        return t, box


class Batching(ClientCase):
    def test_a_full_batch_goes_at_once_the_rest_after_linger(self):
        client = self.client(batch_size=3, linger_ms=1000)
        for i in range(7):
            client.send(event(i))
        self.posts(2, "two full batches")
        self.assertEqual(self.transport.bodies, [lines(7)[:len(lines(3))], lines(7)[len(lines(3)):len(lines(6))]])
        self.waits_until(1001.0)  # the 7th event lingers from its send() at t=1000
        self.clock.advance(1.0)
        self.posts(3, "the lingering one")
        self.assertEqual([len(b) for b in self.transport.events()], [3, 3, 1])
        self.assertEqual(self.transport.events(2)[0]["event_id"], "evt-000006")

    def test_linger_sends_a_partial_batch_only_when_it_elapsed(self):
        client = self.client(batch_size=500, linger_ms=50)
        client.send(event(0))
        self.clock.advance(0.03)
        client.send(event(1))
        self.waits_until(1000.05)  # the oldest event decides
        self.clock.advance(0.019)
        time.sleep(0.05)
        self.assertEqual(self.transport.bodies, [])
        self.clock.advance(0.001)
        self.posts(1)
        self.assertEqual(self.transport.bodies[0], lines(2))

    def test_max_batch_bytes_splits_batches(self):
        one = len(lines(1))
        client = self.client(batch_size=500, linger_ms=0, max_batch_bytes=2 * one)
        self.transport.script = [lambda body: (started.wait(5), accepted(body))[1]]
        started = threading.Event()
        for i in range(5):
            client.send(event(i))
        started.set()
        client.flush(timeout=10)
        self.assertTrue(all(len(b) <= 2 * one for b in self.transport.bodies), [len(b) for b in self.transport.bodies])
        self.assertEqual(b"".join(self.transport.bodies), lines(5))

    def test_ndjson_of_the_events_in_send_order(self):
        client = self.client(batch_size=4)
        for i in range(4):
            client.send(event(i))
        self.posts(1)
        body = self.transport.bodies[0]
        self.assertTrue(body.endswith(b"\n"))
        self.assertEqual([json.loads(x)["event_id"] for x in body.splitlines()],
                         ["evt-000000", "evt-000001", "evt-000002", "evt-000003"])


class Backoffs(SynchronousTestCase):
    def test_full_jitter_bounds(self):
        import random

        backoff = Backoff(0.1, 10.0, random.Random(7).uniform)
        for retry in range(12):
            bound = min(10.0, 0.1 * 2 ** retry)
            samples = [backoff.delay(retry) for _ in range(300)]
            self.assertTrue(all(0 <= s <= bound for s in samples), retry)
            self.assertGreater(max(samples), bound * 0.9)  # jitter spreads over the whole range
            self.assertLess(min(samples), bound * 0.1)

    def test_exponential_then_capped(self):
        top = Backoff(0.1, 10.0, lambda low, high: high)
        self.assertEqual([round(top.delay(n), 6) for n in range(9)], [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 10.0, 10.0])
        self.assertEqual(top.delay(10_000), 10.0)

    def test_retry_after_is_a_floor(self):
        low = Backoff(0.1, 10.0, lambda low, high: low)
        self.assertEqual(low.delay(0, 2.0), 2.0)
        self.assertEqual(Backoff(0.1, 10.0, lambda a, b: b).delay(8, 2.0), 10.0)

    def test_retry_after_header_forms(self):
        self.assertEqual(retry_after({"retry-after": "3"}), 3.0)
        self.assertEqual(retry_after({"retry-after": "100000"}), 300.0)
        self.assertIsNone(retry_after({"retry-after": "soon"}))
        self.assertIsNone(retry_after({}))
        date = "Thu, 03 Dec 2026 12:00:10 GMT"
        now = datetime(2026, 12, 3, 12, 0, 0, tzinfo=timezone.utc).timestamp()
        self.assertEqual(retry_after({"retry-after": date}, now=lambda: now), 10.0)


class Retries(ClientCase):
    def test_503_retry_after_honoured_same_bytes(self):
        client = self.client([error(503, "redis_unavailable", retry_after="3")], batch_size=1, backoff_base=0.1)
        client.send(event(0))
        self.posts(1)
        self.waits_until(1003.0)  # Retry-After 3 s > the jittered 0.1 s
        self.clock.advance(2.9)
        time.sleep(0.05)
        self.assertEqual(len(self.transport.bodies), 1)
        self.clock.advance(0.1)
        self.posts(2)
        self.assertEqual(self.transport.bodies[0], self.transport.bodies[1])
        result = client.flush(timeout=5)
        self.assertEqual((result.accepted, result.rejected, result.dropped), (1, 0, 0))
        self.assertEqual((client.stats.requests, client.stats.retries), (2, 1))
        self.assertEqual(self.reports[0].attempts, 2)

    def test_429_and_connection_errors_back_off_exponentially(self):
        client = self.client([refused(), error(429, "rate_limited"), error(503, "overloaded"), error(408, "timeout")],
                             batch_size=1, backoff_base=0.1)
        client.send(event(0))
        start = self.clock.now()
        for n, delay in enumerate([0.1, 0.2, 0.4, 0.8], 1):
            self.posts(n)
            self.waits_until(self.clock.now() + delay)
            self.clock.advance(delay)
        self.posts(5)
        self.assertEqual(len(set(self.transport.bodies)), 1)
        client.flush(timeout=5)
        self.assertAlmostEqual(self.clock.now() - start, 1.5)
        self.assertEqual(client.stats.accepted, 1)

    def test_4xx_is_not_retried_and_reported_with_the_error(self):
        client = self.client([error(401, "unauthorized", "missing or invalid API key")], batch_size=2)
        client.send(event(0))
        client.send(event(1))
        result = client.flush(timeout=5)
        self.assertEqual(len(self.transport.bodies), 1)
        self.assertEqual((result.accepted, result.rejected), (0, 2))
        [failure] = result.failures
        self.assertEqual((failure.outcome, failure.status, failure.error["error"]), (REJECTED, 401, "unauthorized"))
        self.assertEqual(failure.event_ids, ("evt-000000", "evt-000001"))
        self.assertEqual(self.reports, [failure])

    def test_one_invalid_event_rejected_with_its_details_the_rest_resent(self):
        details = [{"line": 2, "field": "event_timestamp", "code": "future_timestamp", "message": "too far ahead"}]
        client = self.client([error(422, "invalid_event", "1 of 3 events are invalid; nothing was written", details)],
                             batch_size=3)
        for i in range(3):
            client.send(event(i))
        result = client.flush(timeout=5)
        self.assertEqual((result.accepted, result.rejected, result.dropped), (2, 1, 0))
        [bad] = result.failures
        self.assertEqual(bad.event_ids, ("evt-000001",))
        self.assertEqual((bad.status, bad.error["error"], bad.error["details"]), (422, "invalid_event", details))
        # the resend is the other two events' very lines
        resent = encode_event(event(0))[1] + b"\n" + encode_event(event(2))[1] + b"\n"
        self.assertEqual(self.transport.bodies[1], resent)
        self.assertEqual([r.outcome for r in self.reports], [REJECTED, ACCEPTED])

    def test_409_conflict_rejects_those_ids_only(self):
        details = [{"field": "event_id", "code": "conflict", "event_id": "evt-000000"}]
        client = self.client([error(409, "conflict", "event_id already used for a different payload", details)],
                             batch_size=2)
        client.send(event(0))
        client.send(event(1))
        result = client.flush(timeout=5)
        self.assertEqual((result.accepted, result.rejected), (1, 1))
        self.assertEqual(result.failures[0].event_ids, ("evt-000000",))
        self.assertEqual(self.transport.events(1), [event(1)])

    def test_413_splits_in_halves(self):
        too_big = error(413, "body_too_large")
        client = self.client([too_big, too_big], batch_size=4)
        for i in range(4):
            client.send(event(i))
        result = client.flush(timeout=5)
        self.assertEqual([len(b) for b in self.transport.events()], [4, 2, 1, 1, 2])
        self.assertEqual(result.accepted, 4)
        one = self.client([too_big], batch_size=1)
        one.send(event(9))
        self.assertEqual(one.flush(timeout=5).rejected, 1)

    def test_gives_up_after_delivery_timeout_and_reports_dropped(self):
        forever = [error(503, "redis_unavailable", retry_after="1")] * 100
        client = self.client(forever, batch_size=1, delivery_timeout=3.5)
        client.send(event(0))
        for n in range(1, 4):
            self.posts(n)
            self.waits_until(self.clock.now() + 1.0)
            self.clock.advance(1.0)
        result = client.flush(timeout=5)  # a 4th wait would end past 1000 + 3.5
        self.assertEqual(len(self.transport.bodies), 4)
        self.assertEqual((result.accepted, result.dropped), (0, 1))
        self.assertEqual(result.failures[0].outcome, DROPPED)
        self.assertEqual(result.failures[0].status, 503)
        self.assertIn("delivery_timeout", result.failures[0].error["message"])


class Overflow(ClientCase):
    def stuck(self):
        """A transport whose first post waits for ``release``."""
        release = threading.Event()
        self.transport.script = [lambda body: (release.wait(10), accepted(body))[1]]
        return release

    def test_raise_refuses_at_once_when_full(self):
        client = self.client(batch_size=1, max_buffered_events=2, overflow="raise")
        release = self.stuck()
        client.send(event(0))
        self.posts(1)
        client.send(event(1))
        self.assertRaises(BufferFull, client.send, event(2))
        self.assertEqual(client.stats.buffer_full, 1)
        release.set()
        client.flush(timeout=5)
        client.send(event(3))
        client.close()
        self.assertEqual((client.stats.sent, client.stats.accepted), (3, 3))

    def test_block_waits_for_room(self):
        client = self.client(batch_size=1, max_buffered_events=2)
        release = self.stuck()
        client.send(event(0))
        self.posts(1)
        client.send(event(1))
        thread, box = self.in_thread(client.send, event(2))
        time.sleep(0.05)
        self.assertTrue(thread.is_alive())
        release.set()
        thread.join(5)
        self.assertEqual(box, {"result": None})
        client.close()
        self.assertEqual(client.stats.accepted, 3)

    def test_block_raises_after_block_timeout(self):
        client = self.client(batch_size=1, max_buffered_events=1, block_timeout=2.0)
        release = self.stuck()
        client.send(event(0))
        self.posts(1)
        thread, box = self.in_thread(client.send, event(1))
        self.waits_until(1002.0)
        self.clock.advance(2.0)
        thread.join(5)
        self.assertIsInstance(box.get("error"), BufferFull)
        self.assertEqual(client.stats.buffer_full, 1)
        release.set()
        client.close()
        self.assertEqual((client.stats.sent, client.stats.accepted), (1, 1))


class FlushAndClose(ClientCase):
    def test_flush_sends_without_lingering_and_returns_the_window(self):
        client = self.client(batch_size=500, linger_ms=60_000)
        for i in range(3):
            client.send(event(i))
        result = client.flush()
        self.assertEqual((result.accepted, result.rejected, result.dropped, result.failures), (3, 0, 0, []))
        self.assertEqual(client.flush().accepted, 0)  # drained
        self.assertEqual(client.stats.pending, 0)

    def test_flush_timeout_raises_and_events_keep_going(self):
        client = self.client([error(503, "redis_unavailable", retry_after="10")], batch_size=1)
        client.send(event(0))
        self.posts(1)
        thread, box = self.in_thread(client.flush, 2.0)
        self.waits_until(1002.0)
        self.clock.advance(2.0)
        thread.join(5)
        self.assertIsInstance(box.get("error"), FlushTimeout)
        self.assertEqual(box["error"].pending, 1)
        self.clock.advance(8.0)
        self.assertEqual(client.flush(timeout=5).accepted, 1)

    def test_close_flushes_then_refuses_sends(self):
        client = self.client(linger_ms=60_000)
        for i in range(5):
            client.send(event(i))
        result = client.close()
        self.assertEqual(result.accepted, 5)
        self.assertTrue(self.transport.closed)
        self.assertRaises(ClientClosed, client.send, event(9))
        self.assertFalse(client._thread.is_alive())
        self.assertEqual(client.close(), result)  # idempotent

    def test_close_timeout_reports_everything_left_as_dropped(self):
        client = self.client([error(503, "redis_unavailable", retry_after="30")] * 10, batch_size=2, linger_ms=60_000)
        for i in range(5):
            client.send(event(i))
        thread, box = self.in_thread(client.close, 1.0)
        self.posts(1)
        self.waits_until(self.clock.now() + 1.0)
        self.clock.advance(1.0)
        thread.join(5)
        result = box["result"]
        stats = client.stats
        self.assertEqual((stats.sent, stats.accepted, stats.rejected, stats.dropped), (5, 0, 0, 5))
        self.assertEqual(result.dropped, 5)
        self.assertEqual({r.error["error"] for r in self.reports}, {"closed"})
        self.assertEqual(sorted(i for r in self.reports for i in r.event_ids), [f"evt-{i:06d}" for i in range(5)])

    def test_a_failing_callback_does_not_stop_delivery(self):
        client = self.client(batch_size=1)
        client._on_result = lambda report: 1 / 0
        with self.assertLogs("payflux.client", "ERROR") as logged:
            for i in range(3):
                client.send(event(i))
            self.assertEqual(client.close(timeout=5).accepted, 3)
        self.assertEqual(len(logged.records), 3)
        self.assertIn("on_result callback failed", logged.output[0])


class Events(SynchronousTestCase):
    def test_hash_id_known_vector(self):
        # RFC 4231 test case 1: HMAC-SHA256(key=0x0b*20, "Hi There")
        digest = bytes.fromhex("b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7")
        self.assertEqual(hash_id("Hi There", b"\x0b" * 20), "sDRMYdjbOFNcqK_OrwvxK4gdwgDJgz2nJuk3bC4yz_c")
        self.assertEqual(hash_id(b"Hi There", b"\x0b" * 20), base64.urlsafe_b64encode(digest).rstrip(b"=").decode())
        self.assertEqual(hash_id("cus_1", "k" * 16),
                         base64.urlsafe_b64encode(hmac.new(b"k" * 16, b"cus_1", hashlib.sha256).digest())
                         .rstrip(b"=").decode())
        self.assertRegex(hash_id("acct_1", "s" * 32), r"^[A-Za-z0-9_-]{43}$")
        self.assertRaises(ValueError, hash_id, "x", "short")

    def test_build_event_is_seed_shaped(self):
        moment = datetime(2026, 1, 6, 1, 2, 3, 456789, tzinfo=timezone(timedelta(hours=2)))
        e = build_event("payment_failed", "stripe", now=lambda: moment, retry_count=1, geo_bucket="US", channel=None)
        self.assertEqual(e["event_timestamp"], "2026-01-05T23:02:03.456Z")
        self.assertRegex(e["event_id"], r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
        self.assertEqual({k: e[k] for k in ("event_type", "processor", "retry_count", "geo_bucket")},
                         {"event_type": "payment_failed", "processor": "stripe", "retry_count": 1, "geo_bucket": "US"})
        self.assertNotIn("channel", e)
        self.assertRegex(build_event("x", "y")["event_timestamp"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
        self.assertRaises(TypeError, build_event, "payment_failed", "stripe", merchant_id="raw")
        self.assertRaises(ValueError, build_event, "payment_failed", "stripe", event_timestamp=datetime(2026, 1, 1))

    def test_send_refuses_what_could_never_be_delivered_safely(self):
        self.assertRaises(ValueError, encode_event, {"event_type": "x"})
        self.assertRaises(ValueError, encode_event, {"event_id": "e1", "amount": float("nan")})
        self.assertRaises(TypeError, encode_event, {"event_id": "e1", "x": object()})
        self.assertRaises(TypeError, encode_event, ["not", "a", "dict"])

    def test_the_client_imports_the_standard_library_only(self):
        code = ("import sys; before = set(sys.modules); import payflux.client, payflux.client.testing; "
                "print(sorted(m for m in set(sys.modules) - before if m.split('.')[0] not in sys.stdlib_module_names "
                "and not m.startswith('payflux.client') and m != 'payflux'))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=30,
                             check=False)
        self.assertEqual(out.stdout.strip(), "[]", out.stderr)


class AsyncUnit(SynchronousTestCase):
    """The asyncio client on FakeAsyncTransport and FakeAsyncClock (each test one asyncio.run)."""

    def run_async(self, coro):
        return asyncio.run(coro)

    def client(self, script=(), **kwargs):
        self.transport = FakeAsyncTransport(script)
        self.clock = FakeAsyncClock()
        kwargs.setdefault("uniform", lambda low, high: high)
        return AsyncClient("http://127.0.0.1:1", "key", transport=self.transport, clock=self.clock, **kwargs)

    def test_size_then_linger(self):
        async def go():
            client = self.client(batch_size=2, linger_ms=50)
            for i in range(3):
                await client.send(event(i))
            await settle()
            self.assertEqual([len(b) for b in self.transport.events()], [2])
            self.assertIn(1000.05, self.clock.waiting)
            await self.clock.advance(0.049)
            self.assertEqual(len(self.transport.bodies), 1)
            await self.clock.advance(0.001)
            self.assertEqual([len(b) for b in self.transport.events()], [2, 1])
            result = await client.close()
            self.assertEqual(result.accepted, 3)
            self.assertTrue(self.transport.closed)
        self.run_async(go())

    def test_retry_after_and_4xx(self):
        async def go():
            details = [{"line": 1, "field": "processor", "code": "format", "message": "m"}]
            client = self.client([error(503, "redis_unavailable", retry_after="2"),
                                  error(422, "invalid_event", "1 of 2 events are invalid", details)], batch_size=2)
            await client.send(event(0))
            await client.send(event(1))
            await settle()
            self.assertIn(1002.0, self.clock.waiting)
            await self.clock.advance(1.9)
            self.assertEqual(len(self.transport.bodies), 1)
            await self.clock.advance(0.1)
            result = await client.flush(timeout=5)
            self.assertEqual(self.transport.bodies[0], self.transport.bodies[1])
            self.assertEqual((result.accepted, result.rejected), (1, 1))
            self.assertEqual(result.failures[0].error["details"], details)
            self.assertEqual(self.transport.events(2), [event(1)])
            await client.close()
        self.run_async(go())

    def test_overflow_raise_and_block(self):
        async def go():
            release = asyncio.Event()

            async def held(body):
                await release.wait()
                return accepted(body)

            client = self.client(batch_size=1, max_buffered_events=1, overflow="raise")
            self.transport.post = lambda body: (self.transport.bodies.append(body), held(body))[1]
            await client.send(event(0))
            await settle()
            with self.assertRaises(BufferFull):
                await client.send(event(1))
            blocking = self.client(batch_size=1, max_buffered_events=1, block_timeout=3)
            self.transport.post = lambda body: (self.transport.bodies.append(body), held(body))[1]
            await blocking.send(event(0))
            await settle()
            waiting = asyncio.ensure_future(blocking.send(event(1)))
            await settle()
            self.assertFalse(waiting.done())
            release.set()
            release.clear()  # the first post goes on, the next one (event 1's) waits again
            await settle()
            self.assertTrue(waiting.done())
            await waiting
            timed = asyncio.ensure_future(blocking.send(event(2)))
            await settle()
            await self.clock.advance(3.0)
            with self.assertRaises(BufferFull):
                await timed
            release.set()
            await client.close()
            await blocking.close()
            self.assertEqual((client.stats.accepted, blocking.stats.accepted, blocking.stats.buffer_full), (1, 2, 1))
        self.run_async(go())


class OneShotServer:
    """A loopback HTTP server that answers one request per connection and then closes it without
    saying so (as an idle keep-alive timeout does), recording each request's head and body."""

    def __init__(self, testcase, answer: bytes):
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.answer = answer
        self.requests: list[tuple[bytes, bytes]] = []
        self.connections = 0
        threading.Thread(target=self.serve, daemon=True).start()
        testcase.addCleanup(self.sock.close)

    def serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                head, body = data.split(b"\r\n\r\n", 1)
                length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
                while len(body) < length:
                    body += conn.recv(65536)
                self.requests.append((head, body))
                conn.sendall(self.answer)


class Transports(SynchronousTestCase):
    """HttpTransport and AsyncHttpTransport on the wire: the request, and a keep-alive connection
    the server closed between requests (sent again at once on a new one)."""

    ANSWER = (b"HTTP/1.1 202 Accepted\r\nContent-Type: application/json\r\nContent-Length: 22\r\n\r\n"
              b'{"status":"accepted"}\n')
    CHUNKED = (b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"5\r\n{\"err\r\n11\r\nor\":\"overloaded\"}\r\n0\r\n\r\n")

    def check_requests(self, server, body):
        self.assertEqual(len(server.requests), 2)
        head, sent = server.requests[0]
        self.assertEqual(sent, body)
        self.assertTrue(head.startswith(b"POST /prefix/v1/events/payment_exhaust/batch HTTP/1.1\r\n"), head)
        for header in (b"Content-Type: application/x-ndjson", b"Authorization: Bearer key-0123456789abcdef"):
            self.assertIn(header.lower(), head.lower())
        self.assertEqual(server.connections, 2)

    def test_sync_request_and_stale_connection(self):
        server = OneShotServer(self, self.ANSWER)
        transport = HttpTransport(server.url + "/prefix", "key-0123456789abcdef", timeout=5)
        body = lines(2)
        first = transport.post(body)
        second = transport.post(body)  # the server closed the first connection after answering
        self.assertEqual((first.status, second.status, first.json()), (202, 202, {"status": "accepted"}))
        self.check_requests(server, body)
        transport.close()
        self.assertRaises(TransportError, HttpTransport("http://127.0.0.1:1", None, timeout=2).post, body)

    def test_async_request_stale_connection_and_chunked_answer(self):
        server = OneShotServer(self, self.ANSWER)
        body = lines(2)

        async def go():
            transport = AsyncHttpTransport(server.url + "/prefix", "key-0123456789abcdef", timeout=5)
            first = await transport.post(body)
            second = await transport.post(body)
            await transport.close()
            chunked = OneShotServer(self, self.CHUNKED)
            transport = AsyncHttpTransport(chunked.url, None, timeout=5)
            third = await transport.post(body)
            await transport.close()
            with self.assertRaises(TransportError):
                await AsyncHttpTransport("http://127.0.0.1:1", None, timeout=2).post(body)
            return first, second, third

        first, second, third = asyncio.run(go())
        self.assertEqual((first.status, second.status), (202, 202))
        self.assertEqual((third.status, third.headers["retry-after"], third.json()),
                         (503, "1", {"error": "overloaded"}))
        self.check_requests(server, body)


# -- end to end: twistd + redis-server ------------------------------------------------------------

SECRET = "client-test-secret-0123456789"
HASH_KEY = "producer-hashing-key-0123456789"


class NodeCase(NodeProcesses, SynchronousTestCase):
    """``twistd -n payflux`` on its own redis-server (AOF on, so a restart keeps what it acknowledged)."""

    dir_prefix = "payflux-client-"

    def setUp(self):
        super().setUp()
        found = find_redis_binaries()
        binary = found.get("7") or found.get("6.2")
        if binary is None:
            raise self.skipTest("no redis-server binary found")
        self.redis = RedisProcess(binary, testcase=self, appendonly=True)
        self.side_port = free_port()
        env = clean_env(PAYFLUX_API_KEYS=f"producer:{SECRET}")
        args = [*TWISTD, "-n", "--pidfile=", "payflux", "--listen", f"tcp:{self.port}:interface=127.0.0.1",
                "--metrics-listen", f"tcp:{self.side_port}:interface=127.0.0.1", "--redis-url", self.redis.url,
                "--redis-timeout", "0.5", "--data-dir", self.data_dir]
        self.log_path = os.path.join(self.dir, "twistd.log")
        log = open(self.log_path, "wb")
        self.addCleanup(log.close)
        self.procs.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=self.dir, env=env))
        wait_ready(self, self.procs[0], f"http://127.0.0.1:{self.side_port}/ready", self.log_text)
        self.url = f"http://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")[-4000:]

    def events(self, n: int, prefix: str) -> list[dict]:
        return [build_event("payment_failed", "stripe", merchant_id_hash=hash_id(f"acct_{i % 7}", HASH_KEY),
                            payment_intent_id_hash=hash_id(f"pi_{prefix}_{i}", HASH_KEY), retry_count=i % 3)
                for i in range(n)]

    def assertExactlyOnce(self, sent: list[dict]) -> dict:
        found = stream_entries(("127.0.0.1", self.redis.port))
        ids = [e["event_id"] for e in sent]
        lost = [i for i in ids if i not in found]
        duplicated = {i: found[i] for i in ids if len(found.get(i, ())) > 1}
        self.assertEqual((lost, duplicated), ([], {}), f"lost {len(lost)}, duplicated {len(duplicated)}")
        self.assertEqual(set(found), set(ids))  # nothing else in the stream
        self.assertEqual(self.redis.sync_command("XLEN", "payflux:{0}:events"), len(ids))
        return found


class SyncEndToEnd(NodeCase):
    def test_every_event_in_the_stream_exactly_once(self):
        sent = self.events(1500, "sync")
        reports = []

        class Counting(HttpTransport):
            connections = 0

            def _connection(self):
                Counting.connections += self._conn is None
                return super()._connection()

        with Client(self.url, SECRET, batch_size=200, linger_ms=20, on_result=reports.append,
                    transport=Counting(self.url, SECRET)) as client:
            for e in sent:
                client.send(e)
        stats = client.stats
        self.assertEqual((stats.sent, stats.accepted, stats.rejected, stats.dropped, stats.duplicates),
                         (1500, 1500, 0, 0, 0))
        self.assertEqual(stats.retries, 0)
        self.assertGreaterEqual(stats.requests, 8)
        self.assertEqual(Counting.connections, 1)  # keep-alive: every batch on one connection
        found = self.assertExactlyOnce(sent)
        # the 202s' stream ids are the entries' ids
        self.assertEqual({i: [s] for r in reports for i, s in zip(r.event_ids, r.stream_ids)}, found)

    def test_an_invalid_event_is_rejected_with_its_line_and_field_the_batch_is_written(self):
        good = self.events(4, "mixed")
        bad = dict(good[2], event_timestamp="yesterday")
        batch = good[:2] + [bad] + good[3:]
        client = Client(self.url, SECRET, batch_size=4, close_at_exit=False)
        for e in batch:
            client.send(e)
        result = client.close(timeout=10)
        self.assertEqual((result.accepted, result.rejected), (3, 1))
        [failure] = result.failures
        self.assertEqual(failure.event_ids, (bad["event_id"],))
        self.assertEqual(failure.status, 422)
        self.assertEqual([(d["line"], d["field"], d["code"]) for d in failure.error["details"]],
                         [(3, "event_timestamp", "format")])
        self.assertExactlyOnce(good[:2] + good[3:])

    def test_resending_accepted_events_answers_duplicate_and_unknown_fields_are_named(self):
        sent = self.events(3, "again")
        with Client(self.url, SECRET, close_at_exit=False) as client:
            for e in sent:
                client.send(e)
            client.flush(timeout=10)
            for e in sent:  # what a retry after a lost 202 does
                client.send(e)
            client.send(dict(self.events(1, "typo")[0], amount_cents=1200))
        reports = client.close().failures
        self.assertEqual(reports, [])
        self.assertEqual((client.stats.accepted, client.stats.duplicates), (7, 3))

        seen = []
        with Client(self.url, SECRET, close_at_exit=False, on_result=seen.append) as client:
            client.send(dict(self.events(1, "typo2")[0], amount_cents=1200))
        self.assertEqual(seen[0].ignored_fields, ("amount_cents",))

    def test_a_client_never_closed_is_flushed_at_interpreter_exit(self):
        code = ("import os, sys; from payflux.client import Client, build_event\n"
                "c = Client(os.environ['URL'], os.environ['KEY'], linger_ms=60000)\n"
                "[c.send(build_event('payment_failed', 'stripe', event_id=f'exit-{n}')) for n in range(10)]\n")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=30,
                             env=clean_env(URL=self.url, KEY=SECRET), check=False)
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertEqual(sorted(stream_entries(("127.0.0.1", self.redis.port))), sorted(f"exit-{n}" for n in range(10)))

    def test_a_wrong_key_is_rejected_not_retried(self):
        client = Client(self.url, "not-the-secret-0123456789", close_at_exit=False)
        client.send(self.events(1, "auth")[0])
        result = client.close(timeout=10)
        self.assertEqual((result.rejected, client.stats.requests), (1, 1))
        self.assertEqual((result.failures[0].status, result.failures[0].error["error"]), (401, "unauthorized"))


class AsyncEndToEnd(NodeCase):
    def test_every_event_in_the_stream_exactly_once(self):
        sent = self.events(1500, "async")

        connections = [0]

        class Counting(AsyncHttpTransport):
            async def _exchange(self, body):
                connections[0] += self._writer is None
                return await super()._exchange(body)

        async def produce():
            async with AsyncClient(self.url, SECRET, batch_size=200, linger_ms=20,
                                   transport=Counting(self.url, SECRET)) as client:
                for e in sent:
                    await client.send(e)
                middle = await client.flush(timeout=30)
                self.assertEqual(middle.accepted, 1500)
            return client.stats

        stats = asyncio.run(produce())
        self.assertEqual((stats.sent, stats.accepted, stats.rejected, stats.dropped), (1500, 1500, 0, 0))
        self.assertEqual(connections, [1])  # keep-alive
        self.assertExactlyOnce(sent)


class RedisOutage(NodeCase):
    """Redis stopped in the middle of a stream of events (the node answers 503), started again on
    the same port and data dir; the clients keep retrying: 0 lost, 0 duplicated."""

    DOWN = 2.2  # seconds Redis stays down after the client's first retry (the node's Retry-After is 1 s)

    def outage(self, produce_in_thread, stats_of) -> None:
        done = threading.Event()
        producer = threading.Thread(target=lambda: (produce_in_thread(), done.set()), daemon=True)
        producer.start()
        wait_until(lambda: stats_of() is not None and stats_of().accepted >= 300, 20, "300 accepted before the outage")
        before = stats_of()
        self.redis.stop()
        wait_until(lambda: stats_of().retries > before.retries, 10, "the client to see 503s and retry")
        time.sleep(self.DOWN)  # from the first retry: two more 503s at least, Retry-After 1 s apart
        during = stats_of()
        self.redis.start()
        producer.join(45)
        self.assertTrue(done.is_set(), "producer did not finish")
        self.assertGreater(during.sent, before.sent, "no event sent during the outage")
        self.assertGreaterEqual(during.retries - before.retries, 2)
        self.assertIn(503, self.statuses)
        self.assertEqual(set(self.statuses) - {202, 503}, set())

    def transport(self, cls):
        """The real transport of ``cls``, recording every HTTP status it got."""
        self.statuses = statuses = []

        class Recording(cls):
            def post(self, body):
                answer = super().post(body)
                if hasattr(answer, "__await__"):
                    async def recorded():
                        response = await answer
                        statuses.append(response.status)
                        return response
                    return recorded()
                statuses.append(answer.status)
                return answer

        return Recording(self.url, SECRET)

    def test_sync_client_loses_and_duplicates_nothing(self):
        sent = self.events(1200, "outage")
        box = {}

        def produce():
            client = box["client"] = Client(self.url, SECRET, batch_size=50, linger_ms=10, backoff_base=0.05,
                                            backoff_max=0.5, close_at_exit=False,
                                            transport=self.transport(HttpTransport))
            for n, e in enumerate(sent):
                client.send(e)
                if n % 5 == 0:
                    time.sleep(0.01)  # a stream over a few seconds, so the outage lands in its middle
            box["result"] = client.close(timeout=40)

        self.outage(produce, lambda: box["client"].stats if "client" in box else None)
        stats = box["client"].stats
        print(f"\nCLIENT outage sync: sent={stats.sent} accepted={stats.accepted} rejected={stats.rejected} "
              f"dropped={stats.dropped} duplicates={stats.duplicates} requests={stats.requests} "
              f"retries={stats.retries}")
        self.assertEqual((stats.sent, stats.accepted, stats.rejected, stats.dropped), (1200, 1200, 0, 0))
        self.assertExactlyOnce(sent)

    def test_async_client_loses_and_duplicates_nothing(self):
        sent = self.events(1200, "outage-async")
        box = {}

        async def produce_async():
            client = box["client"] = AsyncClient(self.url, SECRET, batch_size=50, linger_ms=10, backoff_base=0.05,
                                                 backoff_max=0.5, transport=self.transport(AsyncHttpTransport))
            for n, e in enumerate(sent):
                await client.send(e)
                if n % 5 == 0:
                    await asyncio.sleep(0.01)
            box["result"] = await client.close(timeout=40)

        self.outage(lambda: asyncio.run(produce_async()), lambda: box["client"].stats if "client" in box else None)
        stats = box["client"].stats
        print(f"\nCLIENT outage async: sent={stats.sent} accepted={stats.accepted} rejected={stats.rejected} "
              f"dropped={stats.dropped} duplicates={stats.duplicates} requests={stats.requests} "
              f"retries={stats.retries}")
        self.assertEqual((stats.sent, stats.accepted, stats.rejected, stats.dropped), (1200, 1200, 0, 0))
        self.assertExactlyOnce(sent)


class DocsExamples(NodeCase):
    """docs/producers.md's sync and asyncio examples, run as written, in a fresh interpreter."""

    def examples(self, path: str = os.path.join("docs", "producers.md")) -> dict[str, str]:
        with open(os.path.join(ROOT, path), encoding="utf-8") as f:
            text = f.read()
        return {m.group(2): textwrap.dedent(m.group(1) + m.group(0).split("\n", 1)[1].rsplit("```", 1)[0])
                for m in re.finditer(r"( *)```python\n *# example: (\w+)\n.*?```", text, re.S)}

    def test_readme_example_runs_against_a_node(self):
        examples = self.examples("README.md")
        self.assertEqual(sorted(examples), ["readme"])
        env = clean_env(PAYFLUX_URL=self.url, PAYFLUX_API_KEY=SECRET, PAYFLUX_HASH_KEY=HASH_KEY)
        out = subprocess.run([sys.executable, "-c", examples["readme"]], capture_output=True, text=True, cwd=ROOT,
                             env=env, timeout=60)
        self.assertEqual(out.returncode, 0, f"{out.stdout}\n{out.stderr}")
        self.assertEqual(out.stdout.strip(), "accepted 1")
        self.assertEqual(self.redis.sync_command("XLEN", "payflux:{0}:events"), 1)

    def test_examples_run_against_a_node(self):
        examples = self.examples()
        self.assertEqual(sorted(examples), ["asyncio", "sync"])
        env = clean_env(PAYFLUX_URL=self.url, PAYFLUX_API_KEY=SECRET, PAYFLUX_HASH_KEY=HASH_KEY)
        for name, code in examples.items():
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env,
                                 timeout=60)
            self.assertEqual(out.returncode, 0, f"{name}: {out.stdout}\n{out.stderr}")
            self.assertIn("accepted 100", out.stdout, name)
        self.assertEqual(self.redis.sync_command("XLEN", "payflux:{0}:events"), 200)
