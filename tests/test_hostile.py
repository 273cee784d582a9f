"""
Hostile and malformed input against a real node (real sockets on 127.0.0.1, real redis-server).

Each attack gets the documented answer (a 4xx, or a closed connection where HTTP gives no
better choice), within a bounded time, without growing the node's memory past a generous
bound, without writing anything to Redis, and without starving well-behaved clients.  The node
runs in this process, so the RSS measured here is the node's.  The numbers behind
docs/security.md ("Hostile input") are printed by these tests (``trial`` shows them in
``_trial_temp/test.log``).
"""

from __future__ import annotations

import json
import socket
import statistics
import time

import psutil
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.interfaces import IHalfCloseableDescriptor
from twisted.internet.task import Clock, LoopingCall, deferLater
from twisted.internet.testing import StringTransport, StringTransportWithDisconnection
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from zope.interface import implementer

from payflux.cli import sample_event
from payflux.ingest.http import LINGER_BYTES, LINGER_SECONDS, IngestSite
from tests.support.node import API_SECRET, read_json, start_node
from tests.support.redis import redis_test_cases

log = Logger()

SINGLE = "/v1/events/payment_exhaust"
BATCH = "/v1/events/payment_exhaust/batch"
STREAM = "payflux:{0}:events"
MB = 1024 * 1024
#: Generous bound on the node's RSS growth across one attack (the node process is this process).
RSS_BOUND = 64 * MB


def _rss() -> int:
    return psutil.Process().memory_info().rss


def _raw_exchange(port: int, data: bytes, timeout: float = 10.0, chunks=None) -> tuple[bytes, float, int]:
    """
    Send ``data`` (then, if given, the byte strings of ``chunks`` until the server stops
    reading), read until the server closes; returns (response, seconds until closed, bytes sent).
    Runs in a thread; bounded by ``timeout``.
    """
    started = time.monotonic()
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(data)
            sent += len(data)
            for chunk in chunks or ():
                if time.monotonic() - started > timeout:
                    break
                s.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass  # the server answered and closed while we were still sending
        received = []
        try:
            while time.monotonic() - started < timeout:
                part = s.recv(65536)
                if not part:
                    break
                received.append(part)
        except (socket.timeout, ConnectionResetError):
            pass
        return b"".join(received), time.monotonic() - started, sent


def _status(response: bytes) -> int | None:
    if not response.startswith(b"HTTP/1."):
        return None
    return int(response.split(b" ", 2)[1])


def _json_body(response: bytes) -> dict:
    return json.loads(response.split(b"\r\n\r\n", 1)[1])


class _Trickler(Protocol):
    """A slowloris connection: sends a request head one byte per tick and never finishes it."""

    HEAD = b"POST /v1/events/payment_exhaust HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 10_000

    def __init__(self):
        self.sent = 0
        self.received = b""
        self.opened_at: float | None = None
        self.closed_at: float | None = None
        self.done = Deferred()

    def connectionMade(self):
        self.opened_at = time.monotonic()

    def tick(self):
        if self.closed_at is None and self.transport is not None and self.sent < len(self.HEAD):
            self.transport.write(self.HEAD[self.sent : self.sent + 1])
            self.sent += 1

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason):
        self.closed_at = time.monotonic()
        self.done.callback(None)


class HostileMixin:
    @inlineCallbacks
    def node(self, **options):
        self.redis = self.start_redis()
        node = yield start_node(self, self.redis.url, **options)
        self.port = node.ingest_port
        return node

    def xlen(self) -> int:
        return self.redis.sync_command("XLEN", STREAM)

    def raw(self, data: bytes, timeout: float = 10.0, chunks=None):
        return deferToThread(_raw_exchange, self.port, data, timeout, chunks)

    def head(self, path: str = SINGLE, content_type: str = "application/json", extra: str = "", **kw) -> bytes:
        lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", f"Authorization: Bearer {API_SECRET}",
                 f"Content-Type: {content_type}", "Connection: close"]
        lines += [f"{k.replace('_', '-')}: {v}" for k, v in kw.items()]
        return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode("latin-1")

    @inlineCallbacks
    def assertResponsive(self, node, bound: float = 1.0):
        """A good client still gets its 202 within ``bound`` seconds; returns the latency."""
        started = time.monotonic()
        response = yield node.post(SINGLE, sample_event())
        latency = time.monotonic() - started
        self.assertEqual(response.code, 202)
        yield response.content()
        self.assertLess(latency, bound)
        return latency

    # --- slowloris ---

    @inlineCallbacks
    def test_slowloris_connections_get_408_while_good_clients_are_served(self):
        """
        200 connections trickle request heads one byte at a time; each is answered 408 and
        closed ``header_timeout`` after its first byte (twisted.web alone would keep them for as
        long as a byte arrives every 60 s), while a good client's requests are answered fast.
        """
        connections, timeout, tick = 200, 3.0, 0.2
        node = yield self.node(header_timeout=str(timeout))
        baseline = []
        for _ in range(10):
            baseline.append((yield self.assertResponsive(node)))
        rss_before = _rss()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port, timeout=5)
        tricklers = []
        for _ in range(connections):
            tricklers.append((yield connectProtocol(endpoint, _Trickler())))
        self.addCleanup(lambda: [t.transport.abortConnection() for t in tricklers if t.closed_at is None])
        loop = LoopingCall(lambda: [t.tick() for t in tricklers])
        loop.clock = reactor
        loop.start(tick)
        self.addCleanup(lambda: loop.running and loop.stop())
        attack_started = time.monotonic()
        during = []
        while time.monotonic() - attack_started < timeout * 0.5 and len(during) < 40:
            during.append((yield self.assertResponsive(node)))
            yield deferLater(reactor, 0.02, lambda: None)
        open_during = sum(1 for t in tricklers if t.closed_at is None)
        self.assertEqual(open_during, connections)  # the good client was measured *during* the attack
        # every slowloris connection is answered and closed, bounded in time
        deadline = time.monotonic() + timeout + 5
        while any(t.closed_at is None for t in tricklers) and time.monotonic() < deadline:
            yield deferLater(reactor, 0.1, lambda: None)
        loop.stop()
        held = [t.closed_at - t.opened_at for t in tricklers if t.closed_at is not None]
        self.assertEqual(len(held), connections, "slowloris connections still open after header_timeout")
        self.assertLess(max(held), timeout + 2.5)  # twisted.web alone: until a byte is 60 s late
        for t in tricklers:
            self.assertEqual(_status(t.received), 408)
            self.assertEqual(_json_body(t.received)["error"], "request_timeout")
        growth = _rss() - rss_before
        self.assertLess(growth, RSS_BOUND)
        after = yield self.assertResponsive(node)
        self.assertEqual(self.xlen(), 10 + len(during) + 1)
        log.info(
            "slowloris: {n} connections; good-client latency ms baseline median {b:.1f} / during attack "
            "median {m:.1f} max {x:.1f} ({k} requests) / after {a:.1f}; connections held {lo:.2f}-{hi:.2f} s; "
            "RSS growth {g:.1f} MiB",
            n=connections, b=statistics.median(baseline) * 1000, m=statistics.median(during) * 1000,
            x=max(during) * 1000, k=len(during), a=after * 1000, lo=min(held), hi=max(held), g=growth / MB,
        )
        print(f"\nslowloris numbers: baseline median {statistics.median(baseline) * 1000:.1f} ms, during median "
              f"{statistics.median(during) * 1000:.1f} ms max {max(during) * 1000:.1f} ms over {len(during)} requests, "
              f"held {min(held):.2f}-{max(held):.2f} s, RSS growth {growth / MB:.1f} MiB")

    @inlineCallbacks
    def test_header_timeout_spares_idle_keepalive_and_slow_bodies(self):
        """The clock runs from a head's first byte to its end only: not while idle, not over a body."""
        yield self.node(header_timeout="0.5")
        body = json.dumps(sample_event()).encode()

        def exchange():
            with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
                s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                first = s.recv(65536)
                time.sleep(1.0)  # idle keep-alive, twice the header timeout
                s.sendall(self.head(Content_Length=len(body)))
                time.sleep(1.0)  # a slow body after a complete head
                s.sendall(body)
                second = s.recv(65536)
                return first, second

        first, second = yield deferToThread(exchange)
        self.assertEqual(_status(first), 200)
        self.assertEqual(_status(second), 202, second[:200])
        self.assertEqual(self.xlen(), 1)

    # --- huge headers ---

    @inlineCallbacks
    def test_huge_headers_are_refused_and_closed(self):
        """
        One 1 MiB header line, 1000 small headers, 20 KiB of 8 KiB headers: 431; a 1 MiB request
        line: 414; each as JSON, closed, fast (twisted.web alone: a bare 400, or a silent close).
        """
        node = yield self.node()
        rss_before = _rss()
        cases = [
            ("one huge header", self.head(Content_Length=2, X_Big="b" * MB) + b"{}", 431, "headers_too_large"),
            ("many headers", self.head(Content_Length=2, extra="".join(f"X-H{i}: v\r\n" for i in range(1000))) + b"{}",
             431, "headers_too_large"),
            ("large head", self.head(Content_Length=2, X_A="a" * 8000, X_B="b" * 8000, X_C="c" * 8000) + b"{}",
             431, "headers_too_large"),
            ("huge request line", b"GET /" + b"a" * MB + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "uri_too_long"),
        ]
        slowest = 0.0
        for name, data, status, code in cases:
            response, seconds, _ = yield self.raw(data)
            slowest = max(slowest, seconds)
            self.assertEqual(_status(response), status, (name, response[:200]))
            phrase = {431: b"Request Header Fields Too Large", 414: b"Request-URI Too Long"}[status]
            self.assertTrue(response.startswith(b"HTTP/1.1 %d %s\r\n" % (status, phrase)), response[:80])
            self.assertEqual(_json_body(response)["error"], code, name)
            self.assertIn(b"Connection: close", response)
            self.assertLess(seconds, 3.0, name)
        growth = _rss() - rss_before
        self.assertLess(growth, RSS_BOUND)
        self.assertEqual(self.xlen(), 0)
        yield self.assertResponsive(node)
        print(f"\nhuge heads: slowest answer {slowest * 1000:.0f} ms, RSS growth {growth / MB:.1f} MiB")

    # --- bodies ---

    @inlineCallbacks
    def test_oversize_content_length_is_413_before_any_body(self):
        node = yield self.node()
        slowest = 0.0
        for length in (64 * 1024 + 1, 10**12, 10**30):
            response, seconds, _ = yield self.raw(self.head(Content_Length=length))
            slowest = max(slowest, seconds)
            self.assertEqual(_status(response), 413, (length, response[:200]))
            self.assertEqual(_json_body(response)["error"], "payload_too_large")
            self.assertIn(b"Connection: close", response)
            self.assertLess(seconds, 3.0)
        self.assertEqual(self.xlen(), 0)
        yield self.assertResponsive(node)
        print(f"\noversize Content-Length: slowest 413 in {slowest * 1000:.0f} ms")

    @inlineCallbacks
    def test_endless_chunked_body_is_cut_at_the_cap(self):
        """64 MiB of chunks offered: 413 after ~the 1 MiB cap, the rest never read, RSS bounded."""
        node = yield self.node(max_body_bytes=str(MB))
        head = self.head(BATCH, "application/x-ndjson", Transfer_Encoding="chunked")
        chunk = b"10000\r\n" + b"y" * 0x10000 + b"\r\n"
        rss_before = _rss()
        response, seconds, sent = yield self.raw(head, timeout=15, chunks=[chunk] * 1024)
        self.assertEqual(_status(response), 413, response[:200])
        self.assertLess(seconds, 10.0)
        self.assertLess(sent, 64 * MB)  # the node stopped reading long before the end
        growth = _rss() - rss_before
        self.assertLess(growth, RSS_BOUND)
        self.assertEqual(self.xlen(), 0)
        yield self.assertResponsive(node)
        print(f"\nendless chunked: 413 after {seconds:.2f} s, {sent / MB:.1f} MiB sent before the close, "
              f"RSS growth {growth / MB:.1f} MiB")

    # --- malformed JSON ---

    @inlineCallbacks
    def test_hostile_json_is_400_fast_and_writes_nothing(self):
        node = yield self.node(max_body_bytes=str(4 * MB))
        event = sample_event(processor_latency_ms=None)  # the numbers below go in that field
        good = json.dumps(event)
        open_end = good[:-1].encode()
        digits = b"1" + b"0" * 5000
        bodies = {  # name: (path, body, what the message says)
            "nested arrays 60k": (SINGLE, b"[" * 30_000 + b"]" * 30_000, "nesting"),
            "nested objects": (SINGLE, b'{"a":' * 10_000 + b"1" + b"}" * 10_000, "nesting"),
            "nested batch 2M": (BATCH, b"[" * MB + b"]" * MB, "nesting"),
            "float 1e400": (SINGLE, open_end + b',"processor_latency_ms":1e400}', "out of range"),
            "int 5001 digits": (SINGLE, open_end + b',"processor_latency_ms":' + digits + b"}", "digits"),
            "float 5001 digits": (SINGLE, open_end + b',"processor_latency_ms":1.' + digits + b"}", "digits"),
            "batch of huge ints": (BATCH, b"[" + b",".join([digits] * 500) + b"]", "digits"),
            "invalid utf-8": (SINGLE, good.encode().replace(b"stripe", b"str\xffpe"), "UTF-8"),
            "overlong utf-8": (SINGLE, good.encode().replace(b"stripe", b"str\xc0\xafpe"), "UTF-8"),
            "lone surrogate": (SINGLE, good.encode().replace(b"stripe", b"str\xed\xa0\x80pe"), "UTF-8"),
            "duplicate keys": (SINGLE, open_end + b',"event_id":"evt_other_0001"}', "duplicate"),
            "raw NUL in a string": (SINGLE, good.encode().replace(b"stripe", b"str\x00pe"), "control character"),
            "NUL outside JSON": (SINGLE, good.encode() + b"\x00", "Extra data"),
        }
        rss_before = _rss()
        slowest = 0.0
        for name, (path, body, says) in bodies.items():
            started = time.monotonic()
            response = yield node.post(path, body, "application/json")
            seconds = time.monotonic() - started
            doc = yield read_json(response)
            self.assertEqual((response.code, doc["error"]), (400, "malformed_json"), name)
            self.assertIn(says, doc["message"], name)
            self.assertNotIn("stripe", json.dumps(doc))  # no input echoed
            self.assertLess(seconds, 2.0, name)
            slowest = max(slowest, seconds)
        growth = _rss() - rss_before
        self.assertLess(growth, RSS_BOUND)
        print(f"\nhostile JSON: slowest 400 in {slowest * 1000:.0f} ms, RSS growth {growth / MB:.1f} MiB")
        # an escaped NUL is valid JSON: the schema refuses it
        response = yield node.post(SINGLE, {**event, "processor": "str\x00pe"})
        self.assertEqual(response.code, 422)
        self.assertEqual((yield read_json(response))["details"][0]["field"], "processor")
        self.assertEqual(self.xlen(), 0)
        yield self.assertResponsive(node)

    @inlineCallbacks
    def test_wrong_content_types_are_415(self):
        node = yield self.node()
        body = json.dumps(sample_event()).encode()
        for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                             "application/jsonx", "application/json-patch+json", ""):
            response, _, _ = yield self.raw(self.head(content_type=content_type, Content_Length=len(body)) + body)
            self.assertEqual(_status(response), 415, (content_type, response[:200]))
            self.assertIn(b'"error":"unsupported_media_type"', response)
        # no Content-Type at all
        data = self.head(Content_Length=len(body)).replace(b"Content-Type: application/json\r\n", b"") + body
        response, _, _ = yield self.raw(data)
        self.assertEqual(_status(response), 415)
        self.assertEqual(self.xlen(), 0)
        yield self.assertResponsive(node)

    @inlineCallbacks
    def test_nul_and_garbage_in_the_head_are_400_and_closed(self):
        node = yield self.node()
        for data, code in ((b"POST /v1/events/payment_exhaust\x00 HTTP/1.1\r\nHost: x\r\n\r\n", "bad_request"),
                           (self.head(content_type="application/json\x00", Content_Length=2) + b"{}", "bad_request"),
                           (self.head(X_Nul="a\x00b", Content_Length=2) + b"{}", "bad_request"),
                           (b"\x00\x01\x02\x03\r\n\r\n", "bad_request"),
                           (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
                            "bad_content_length")):
            response, seconds, _ = yield self.raw(data)
            self.assertEqual(_status(response), 400, (data, response[:200]))
            self.assertEqual(_json_body(response)["error"], code, data)
            self.assertLess(seconds, 3.0)
        self.assertEqual(self.xlen(), 0)
        yield self.assertResponsive(node)

    # --- HTTP framing edges ---

    @inlineCallbacks
    def test_malformed_framing_is_a_json_400_naming_the_fault(self):
        """
        Every 400 twisted.web alone answers with an empty body (bad, repeated or conflicting
        Content-Length / Transfer-Encoding, a bad chunk, a bad request line or header line) is
        JSON with a code naming the fault, closed, fast, echoes nothing and writes nothing; a
        Content-Length of 5000 digits (twisted.web alone: a traceback, no answer) is a 413.
        """
        node = yield self.node()
        auth = f"Authorization: Bearer {API_SECRET}\r\n"
        chunked = self.head(Transfer_Encoding="chunked")
        cases = [
            ("bad Content-Length", self.head(Content_Length="12abc") + b"{}", 400, "bad_content_length"),
            ("negative Content-Length", self.head(Content_Length="-2") + b"{}", 400, "bad_content_length"),
            ("two Content-Lengths", self.head(extra="Content-Length: 2\r\nContent-Length: 2\r\n") + b"{}",
             400, "bad_content_length"),
            ("Content-Length, then chunked", self.head(Content_Length=2, Transfer_Encoding="chunked") + b"{}",
             400, "bad_framing"),
            ("chunked, then Content-Length", self.head(Transfer_Encoding="chunked", Content_Length=2) + b"{}",
             400, "bad_framing"),
            ("gzip coding", self.head(Transfer_Encoding="gzip, chunked") + b"{}", 400, "bad_transfer_encoding"),
            ("bad chunk size", chunked + b"zz\r\n{}\r\n0\r\n\r\n", 400, "bad_chunk"),
            ("bad chunk extension", chunked + b"2;secret\x01value\r\n{}\r\n0\r\n\r\n", 400, "bad_chunk"),
            ("chunk without CRLF", chunked + b"2\r\n{}XX0\r\n\r\n", 400, "bad_chunk"),
            ("bad request line", b"GARBAGE\r\n\r\n", 400, "bad_request"),
            ("header without colon", f"POST {SINGLE} HTTP/1.1\r\n{auth}secret value\r\n\r\n".encode(),
             400, "bad_request"),
            ("5000-digit Content-Length", self.head(Content_Length="9" * 5000), 413, "payload_too_large"),
        ]
        slowest = 0.0
        for name, data, status, code in cases:
            response, seconds, _ = yield self.raw(data)
            slowest = max(slowest, seconds)
            self.assertEqual(_status(response), status, (name, response[:300]))
            self.assertEqual(_json_body(response)["error"], code, name)
            self.assertIn(b"Content-Type: application/json\r\n", response, name)
            self.assertIn(b"Connection: close\r\n", response, name)
            self.assertNotIn(b"secret", response, name)  # no input echoed
            self.assertLess(seconds, 3.0, name)
        metrics = node.metrics.render().decode()
        self.assertIn('payflux_requests_rejected_total{key_id="-",reason="bad_chunk"} 3.0', metrics)
        self.assertEqual(self.xlen(), 0)
        yield self.assertResponsive(node)
        print(f"\nmalformed framing: {len(cases)} cases, slowest JSON answer {slowest * 1000:.0f} ms")

    @inlineCallbacks
    def test_401_429_503_are_answered_at_the_end_of_the_head(self):
        """
        A caller refused by preflight that declares a 1000-byte body and sends none of it is
        answered as soon as its head is in (twisted.web alone waited for the body: 60 s), with
        no ``100 Continue``, and nothing is written.
        """
        node = yield self.node(rate_limit="0.01", rate_burst="1")
        key_line = f"Authorization: Bearer {API_SECRET}\r\n".encode()
        no_key = self.head(Content_Length=1000).replace(key_line, b"")
        cases = [
            ("no key", no_key, 401, "unauthorized"),
            ("wrong key", self.head(Content_Length=1000).replace(API_SECRET.encode(), b"wrong-secret-0123456789"),
             401, "unauthorized"),
            ("key in the query", self.head(SINGLE + "?api_key=x", Content_Length=1000), 401, "unauthorized"),
            ("no key, Expect: 100-continue",
             self.head(BATCH, "application/x-ndjson", extra="Expect: 100-continue\r\n", Content_Length=1000)
             .replace(key_line, b""), 401, "unauthorized"),
            ("no key, chunked", self.head(Transfer_Encoding="chunked").replace(key_line, b""), 401, "unauthorized"),
        ]
        for name, data, status, code in cases:
            response, seconds, _ = yield self.raw(data)
            self.assertEqual(_status(response), status, (name, response[:300]))
            self.assertEqual(_json_body(response)["error"], code, name)
            self.assertIn(b'WWW-Authenticate: Bearer realm="payflux"\r\n', response, name)
            self.assertNotIn(b"100 Continue", response, name)
            self.assertLess(seconds, 1.0, name)  # not the 60 s idle timeout
        yield self.assertResponsive(node)  # spends the only token
        response, seconds, _ = yield self.raw(self.head(Content_Length=1000))
        self.assertEqual((_status(response), _json_body(response)["error"]), (429, "rate_limited"), response[:300])
        self.assertIn(b"Retry-After: ", response)
        self.assertLess(seconds, 1.0)
        yield node.app.start_draining()
        response, seconds, _ = yield self.raw(self.head(Content_Length=1000))
        self.assertEqual((_status(response), _json_body(response)["error"]), (503, "draining"), response[:300])
        self.assertLess(seconds, 1.0)
        self.assertEqual(self.xlen(), 1)

    @inlineCallbacks
    def test_two_authorization_headers_are_400(self):
        """Two Authorization headers are ambiguous (twisted.web alone: the last one wins), in either order."""
        node = yield self.node()
        body = json.dumps(sample_event()).encode()
        good = f"Authorization: Bearer {API_SECRET}\r\n"
        bad = "Authorization: Bearer wrong-secret-0123456789\r\n"
        for extra in (bad, good):  # the good key first, then a wrong one / the good key twice
            response, _, _ = yield self.raw(self.head(extra=extra, Content_Length=len(body)) + body)
            self.assertEqual(_status(response), 400, response[:300])
            self.assertEqual(_json_body(response)["error"], "duplicate_authorization")
        data = self.head(Content_Length=len(body)).replace(good.encode(), (bad + good).encode()) + body
        response, _, _ = yield self.raw(data)  # a wrong key first, then the good one
        self.assertEqual(_status(response), 400, response[:300])
        self.assertEqual(self.xlen(), 0)
        yield self.assertResponsive(node)

    @inlineCallbacks
    def test_chunk_size_over_the_cap_is_413_before_its_data(self):
        """
        A chunk announcing more than the cap leaves is answered 413 as soon as its size line is
        in (twisted.web alone waited for the data: 60 s); chunks within the cap are accepted.
        """
        yield self.node()
        head = self.head(Transfer_Encoding="chunked")
        half = b"8000\r\n" + b" " * 0x8000 + b"\r\n"  # 32 KiB of the 64 KiB single-event cap
        for name, data in (("one chunk of 64 KiB + 1", head + b"10001\r\n"),
                           ("a 96-bit chunk size", head + b"ffffffffffffffffffffffff\r\n"),
                           ("32 KiB, then 32 KiB + 1", head + half + b"8001\r\n")):
            response, seconds, _ = yield self.raw(data)
            self.assertEqual(_status(response), 413, (name, response[:300]))
            self.assertEqual(_json_body(response)["error"], "payload_too_large", name)
            self.assertLess(seconds, 1.0, name)  # not the 60 s idle timeout
        event = json.dumps(sample_event()).encode()
        body = b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (10, event[:10], len(event) - 10, event[10:])
        response, _, _ = yield self.raw(head + body)
        self.assertEqual(_status(response), 202, response[:300])
        self.assertEqual(self.xlen(), 1)

    @inlineCallbacks
    def test_a_refused_upload_reads_its_status(self):
        """
        A client writing a 5 MB body in one go against the 64 KiB cap reads the 413 (lingering
        close) instead of failing its write with a reset/broken pipe, as http.client (and so
        ``requests``) did 20 times out of 20 when the node closed at once.
        """
        import http.client

        node = yield self.node()
        big = b"x" * (5 * MB)

        def upload():
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            try:
                connection.request("POST", SINGLE, body=big, headers={
                    "Content-Type": "application/json", "Authorization": f"Bearer {API_SECRET}"})
                response = connection.getresponse()
                return response.status, json.loads(response.read())["error"]
            finally:
                connection.close()

        for _ in range(3):
            started = time.monotonic()
            result = yield deferToThread(upload)
            self.assertEqual(result, (413, "payload_too_large"))
            self.assertLess(time.monotonic() - started, 3.0)
        response, seconds, sent = yield self.raw(self.head(Content_Length=len(big)) + big)
        self.assertEqual(sent, len(big) + len(self.head(Content_Length=len(big))))  # the write completed
        self.assertEqual(_status(response), 413)
        self.assertLess(seconds, 3.0)
        self.assertEqual(self.xlen(), 0)
        yield self.assertResponsive(node)

    @inlineCallbacks
    def test_keepalive_and_pipelining_still_work_for_good_requests(self):
        """Three requests pipelined in one write, then a fourth: one connection, four answers."""
        yield self.node()

        def post() -> bytes:
            body = json.dumps(sample_event()).encode()  # a new event_id each time
            return self.head(Content_Length=len(body)).replace(b"Connection: close\r\n", b"") + body

        health = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"

        def exchange():
            with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
                s.sendall(post() + health + post())
                first = _read_responses(s, 3)
                s.sendall(health)
                return first + _read_responses(s, 1)

        responses = yield deferToThread(exchange)
        self.assertEqual([_status(r) for r in responses], [202, 200, 202, 200])
        self.assertEqual(self.xlen(), 2)


def _read_responses(s: socket.socket, n: int) -> list[bytes]:
    """Read ``n`` responses (each with a Content-Length or a chunked body) from ``s``."""
    buffer, responses = b"", []
    while len(responses) < n:
        head_end = buffer.find(b"\r\n\r\n")
        if head_end >= 0:
            head = buffer[:head_end].lower()
            if b"\r\ncontent-length: " in head:
                end = head_end + 4 + int(head.split(b"\r\ncontent-length: ", 1)[1].split(b"\r\n", 1)[0])
            else:  # chunked: up to the last chunk (the bodies here hold no "0\r\n\r\n")
                last = buffer.find(b"\r\n0\r\n\r\n", head_end)
                end = last + 7 if last >= 0 else len(buffer) + 1
            if len(buffer) >= end:
                responses.append(buffer[:end])
                buffer = buffer[end:]
                continue
        part = s.recv(65536)
        if not part:
            raise AssertionError(f"closed after {len(responses)} responses")
        buffer += part
    return responses


redis_test_cases(HostileMixin, globals(), versions=("7",))


@implementer(IHalfCloseableDescriptor)
class _HalfCloseTransport(StringTransportWithDisconnection):
    write_closed = False

    def loseWriteConnection(self):
        self.write_closed = True


class LingeringCloseTests(SynchronousTestCase):
    """The lingering close after an early answer, on a clock: bounded in time and in bytes."""

    def connect(self, transport=None):
        self.clock = Clock()
        self.rejected = []
        site = IngestSite(Resource(), body_limit=lambda path: 100, preflight=lambda request: None,
                          on_early_reject=lambda request, error: self.rejected.append((request, error.code)))
        protocol = site.buildProtocol(None)
        protocol.callLater = self.clock.callLater
        transport = transport or _HalfCloseTransport()
        transport.protocol = protocol
        protocol.makeConnection(transport)
        return protocol, transport

    def test_write_side_shut_input_discarded_closed_after_linger_seconds(self):
        protocol, transport = self.connect()
        protocol.dataReceived(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b"a" * 500)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 413 "), transport.value()[:100])
        self.assertIn(b'"error":"payload_too_large"', transport.value())
        self.assertTrue(transport.write_closed)  # FIN after the answer
        self.assertTrue(transport.connected)  # ... but still reading
        self.assertEqual([code for _, code in self.rejected], ["payload_too_large"])
        answer = transport.value()
        protocol.dataReceived(b"b" * (MB) + b"GET / HTTP/1.1\r\n\r\n")  # discarded, never parsed
        self.assertEqual(transport.value(), answer)
        self.clock.advance(LINGER_SECONDS * 0.9)
        self.assertTrue(transport.connected)
        self.clock.advance(LINGER_SECONDS * 0.2)
        self.assertFalse(transport.connected)
        self.assertEqual(self.clock.getDelayedCalls(), [])  # the abort backstop was cancelled

    def test_closed_once_linger_bytes_are_discarded(self):
        protocol, transport = self.connect()
        protocol.dataReceived(b"BAD\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 400 "), transport.value()[:100])
        chunk = b"z" * MB
        for _ in range(LINGER_BYTES // MB):
            protocol.dataReceived(chunk)
        self.assertTrue(transport.connected)
        protocol.dataReceived(b"z")
        self.assertFalse(transport.connected)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_without_half_close_still_lingers_then_closes(self):
        """A transport without half-close (TLS): no FIN, but the same bounded read-and-discard."""
        transport = StringTransportWithDisconnection()
        protocol, transport = self.connect(transport)
        protocol.dataReceived(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 413 "))
        self.assertTrue(transport.connected)
        self.clock.advance(LINGER_SECONDS + 0.1)
        self.assertFalse(transport.connected)

    def test_a_client_that_never_reads_is_aborted_after_a_second_linger(self):
        protocol, transport = self.connect(_UnflushedTransport())
        protocol.dataReceived(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
        self.clock.advance(LINGER_SECONDS + 0.1)
        self.assertTrue(transport.disconnecting and not transport.aborted)  # close asked, not done
        self.clock.advance(LINGER_SECONDS)
        self.assertTrue(transport.aborted)


@implementer(IHalfCloseableDescriptor)
class _UnflushedTransport(StringTransport):
    """A transport whose answer never flushes: loseConnection never completes."""

    aborted = False

    def loseWriteConnection(self):
        pass

    def abortConnection(self):
        self.aborted = True
        super().abortConnection()
