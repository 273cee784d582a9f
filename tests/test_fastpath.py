"""
The ingest fast path (payflux/ingest/fastpath.py): what it answers itself, in which order, and
what it hands to the full HTTP stack, byte for byte from the request at hand.

Unit tests drive the protocol over a StringTransport with a Clock and a fake app; the last
class runs it in a real node and reads the fallback counter.
"""

from __future__ import annotations

import json
import re
import socket

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase

from payflux.cli import sample_event
from payflux.ingest.errors import ApiError, unauthorized
from payflux.ingest.fastpath import MAX_PIPELINE, FastIngestFactory
from tests.support.node import API_SECRET, start_node
from tests.support.redis import redis_test_cases

SINGLE = b"/v1/events/payment_exhaust"


class _Limits:
    max_event_bytes = 100
    max_body_bytes = 1000


class _FakeApp:
    limits = _Limits()

    def __init__(self):
        self.calls: list[tuple] = []
        self.pending: list[Deferred] = []
        self.refuse: ApiError | None = None
        self.raise_error: Exception | None = None

    def admit(self, authorization, query_args):
        if self.refuse is not None:
            raise self.refuse
        return "key-a"

    def ingest(self, batch, key_id, media, body):
        self.calls.append((batch, key_id, media, body))
        if self.raise_error is not None:
            raise self.raise_error
        d = Deferred()
        self.pending.append(d)
        return d


class _Channel:
    def __init__(self):
        self.refused: list[ApiError] = []

    def _payflux_refuse(self, error):
        self.refused.append(error)


class _FullStack:
    """The full stack's protocol: records what it is given."""

    def __init__(self):
        self.received = b""
        self.transport = None
        self.lost = False
        self._channel = _Channel()

    def makeConnection(self, transport):
        self.transport = transport

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason):
        self.lost = True


class _Site:
    timeOut = 60

    def __init__(self):
        self.built: list[_FullStack] = []

    def buildProtocol(self, addr):
        self.built.append(_FullStack())
        return self.built[-1]


def _post(body: bytes = b'{"a":1}', path: bytes = SINGLE, extra: bytes = b"", version: bytes = b"1.1") -> bytes:
    return (b"POST %s HTTP/%s\r\nHost: x\r\nAuthorization: Bearer s\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n%s\r\n%s" % (path, version, len(body), extra, body))


class FastPathUnitTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.app = _FakeApp()
        self.site = _Site()
        self.fallbacks: list[str] = []
        self.factory = FastIngestFactory(self.app, self.site, self.clock, header_timeout=2.0,
                                         on_fallback=self.fallbacks.append)
        self.protocol = self.factory.buildProtocol(None)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)

    def answers(self) -> list[tuple[int, bytes]]:
        out, data = [], self.transport.value()
        while data:
            head, _, rest = data.partition(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            out.append((int(head.split(b" ")[1]), rest[:length]))
            data = rest[length:]
        return out

    def test_pipelined_requests_are_appended_at_once_and_answered_in_order(self):
        self.protocol.dataReceived(_post(b'{"n":1}') + _post(b'{"n":2}') + _post(b'{"n":3}', SINGLE + b"/batch"))
        self.assertEqual([c[3] for c in self.app.calls], [b'{"n":1}', b'{"n":2}', b'{"n":3}'])
        self.assertEqual([c[0] for c in self.app.calls], [False, False, True])
        self.assertEqual(self.app.calls[0][1:3], ("key-a", "application/json"))
        self.app.pending[2].callback(b'{"third":1}')
        self.app.pending[1].errback(ApiError(422, "invalid_event", "invalid event"))
        self.assertEqual(self.transport.value(), b"")  # the first is not answered yet
        self.app.pending[0].callback(b'{"first":1}')
        answers = self.answers()
        self.assertEqual([a[0] for a in answers], [202, 422, 202])
        self.assertEqual(answers[0][1], b'{"first":1}')
        self.assertEqual(json.loads(answers[1][1])["error"], "invalid_event")
        self.assertEqual(self.fallbacks, [])
        self.assertFalse(self.transport.disconnecting)

    def test_a_body_in_pieces_and_a_head_split_anywhere(self):
        request = _post(b'{"event":"x"}')
        for i in range(len(request)):
            self.protocol.dataReceived(request[i:i + 1])
        self.assertEqual(self.app.calls, [(False, "key-a", "application/json", b'{"event":"x"}')])

    def test_connection_close_is_honoured_and_later_input_ignored(self):
        self.protocol.dataReceived(_post(extra=b"Connection: close\r\n") + _post())
        self.assertEqual(len(self.app.calls), 1)
        self.app.pending[0].callback(b"{}")
        self.assertIn(b"\r\nConnection: close\r\n", self.transport.value())
        self.assertTrue(self.transport.disconnecting)

    def test_http10_closes_unless_keep_alive_is_asked(self):
        self.protocol.dataReceived(_post(version=b"1.0", extra=b"Connection: Keep-Alive\r\n"))
        self.app.pending[0].callback(b"{}")
        self.assertIn(b"\r\nConnection: keep-alive\r\n", self.transport.value())
        self.assertFalse(self.transport.disconnecting)
        self.protocol.dataReceived(_post(version=b"1.0"))
        self.app.pending[1].callback(b"{}")
        self.assertTrue(self.transport.disconnecting)

    def test_100_continue_before_the_body(self):
        request = _post(extra=b"Expect: 100-continue\r\n")
        head, body = request.split(b"\r\n\r\n")
        self.protocol.dataReceived(head + b"\r\n\r\n")
        self.assertEqual(self.transport.value(), b"HTTP/1.1 100 Continue\r\n\r\n")
        self.protocol.dataReceived(body)
        self.assertEqual(self.app.calls[0][3], body)

    def test_other_requests_are_handed_over_after_the_earlier_answers(self):
        get = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
        self.protocol.dataReceived(_post() + get + _post())
        self.assertEqual(len(self.app.calls), 1)
        self.assertEqual(self.site.built, [])  # the POST's answer goes first
        self.app.pending[0].callback(b"{}")
        self.assertEqual(self.answers()[0][0], 202)
        self.assertEqual(self.fallbacks, ["route"])
        stack = self.site.built[0]
        self.assertIs(stack.transport, self.transport)
        self.assertEqual(stack.received, get + _post())  # from the request at hand on, unchanged
        self.protocol.dataReceived(b"more")
        self.assertEqual(stack.received, get + _post() + b"more")
        self.assertEqual(len(self.app.calls), 1)

    def test_every_unusual_request_is_handed_over_whole(self):
        cases = [
            ("route", b"GET /v1/events/payment_exhaust HTTP/1.1\r\n\r\n"),
            ("route", b"GARBAGE\r\n\r\n"),
            ("route", b"POST /v1/events/payment_exhaust HTTP/2.0\r\n\r\n"),
            ("head", b"POST /v1/events/payment_exhaust HTTP/1.1\r\nbad header\r\n\r\n"),
            ("head", b"POST /v1/events/payment_exhaust HTTP/1.1\r\nX: a\x00b\r\n\r\n"),
            ("head", b"POST /v1/events/payment_exhaust HTTP/1.1\r\n folded: x\r\n\r\n"),
            ("framing", _post(extra=b"Transfer-Encoding: chunked\r\n")),
            ("framing", _post(extra=b"Content-Length: 7\r\n")),
            ("framing", _post().replace(b"Content-Length: 7", b"Content-Length: -7")),
            ("too_large", _post(b"x" * 101)),
            ("expect", _post(extra=b"Expect: something\r\n")),
            ("head_size", b"POST /v1/events/payment_exhaust HTTP/1.1\r\nX: " + b"a" * 17000),
        ]
        for reason, request in cases:
            self.setUp()
            self.protocol.dataReceived(request)
            self.assertEqual(self.fallbacks, [reason], request[:80])
            self.assertEqual(self.site.built[0].received, request, reason)
            self.assertEqual(self.app.calls, [], reason)

    def test_a_refused_caller_is_answered_by_the_full_stack(self):
        self.app.refuse = unauthorized("unknown API key")
        self.protocol.dataReceived(_post())
        self.assertEqual(self.fallbacks, ["refused"])
        self.assertEqual(self.site.built[0].received, _post())

    def test_a_slow_head_is_handed_over_and_refused_408(self):
        self.protocol.dataReceived(b"POST /v1/events/payment_exhaust HTTP/1.1\r\nHost")
        self.clock.advance(1.9)
        self.assertEqual(self.site.built, [])
        self.protocol.dataReceived(b":")  # more bytes do not restart the clock
        self.clock.advance(0.2)
        stack = self.site.built[0]
        self.assertEqual([(e.status, e.code) for e in stack._channel.refused], [(408, "request_timeout")])
        self.assertEqual(self.fallbacks, ["header_timeout"])

    def test_slow_bodies_and_idle_keep_alive_have_no_head_clock(self):
        request = _post(b'{"n":1}')
        self.protocol.dataReceived(request[:-3])
        self.clock.advance(30)
        self.protocol.dataReceived(request[-3:])
        self.app.pending[0].callback(b"{}")
        self.clock.advance(30)
        self.assertEqual(self.site.built, [])
        self.assertFalse(self.transport.disconnecting)

    def test_idle_connections_are_closed_after_the_idle_timeout_but_not_while_owed_an_answer(self):
        self.protocol.dataReceived(_post())
        self.clock.advance(61)
        self.assertFalse(self.transport.disconnecting)  # its answer is still owed
        self.app.pending[0].callback(b"{}")
        self.clock.advance(61)
        self.assertTrue(self.transport.disconnecting)

    def test_reading_pauses_while_too_many_answers_are_owed(self):
        self.protocol.dataReceived(_post() * (MAX_PIPELINE + 4))
        self.assertEqual(len(self.app.calls), MAX_PIPELINE)
        self.assertEqual(self.transport.producerState, "paused")
        for d in list(self.app.pending):
            d.callback(b"{}")
        self.assertEqual(self.transport.producerState, "producing")
        self.assertEqual(len(self.app.calls), MAX_PIPELINE + 4)

    def test_a_paused_connection_gets_no_header_clock(self):
        self.protocol.dataReceived(_post() * (MAX_PIPELINE + 2))
        self.assertEqual(self.transport.producerState, "paused")
        self.clock.advance(5.0)  # header_timeout is 2 s; Redis is slow
        self.assertEqual(self.site.built, [])
        for d in list(self.app.pending):
            d.callback(b"{}")
        self.assertEqual(len(self.app.calls), MAX_PIPELINE + 2)
        self.assertEqual(self.fallbacks, [])

    def test_a_head_that_times_out_behind_owed_answers_is_still_refused_408(self):
        self.protocol.dataReceived(_post() + b"POST /v1/events/payment_exhaust HTTP/1.1\r\nHo")
        self.clock.advance(2.1)
        self.assertEqual(self.site.built, [])  # the first answer is still owed
        self.app.pending[0].callback(b"{}")
        [stack] = self.site.built
        self.assertEqual([e.status for e in stack._channel.refused], [408])

    def test_a_client_that_does_not_read_its_answers_stops_being_read(self):
        self.assertIs(self.transport.producer, self.protocol)
        self.protocol.pauseProducing()  # what the transport does when its write buffer is full
        self.assertEqual(self.transport.producerState, "paused")
        self.protocol.dataReceived(_post() * (MAX_PIPELINE + 2))  # already read: still handled
        for d in list(self.app.pending):
            d.callback(b"{}")
        self.assertEqual(self.transport.producerState, "paused")  # owed answers drained, buffer not
        self.protocol.resumeProducing()
        self.assertEqual(self.transport.producerState, "producing")
        self.assertEqual(len(self.app.calls), MAX_PIPELINE + 2)

    def test_the_full_stack_can_register_itself_after_a_hand_over(self):
        self.protocol.dataReceived(b"GET /health HTTP/1.1\r\n\r\n")
        self.assertIsNone(self.transport.producer)

    def test_an_unexpected_error_is_a_json_500(self):
        self.app.raise_error = RuntimeError("boom")
        self.protocol.dataReceived(_post())
        [(status, body)] = self.answers()
        self.assertEqual(status, 500)
        self.assertEqual(json.loads(body)["error"], "internal")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_worker_tag_and_date_on_every_answer(self):
        factory = FastIngestFactory(self.app, self.site, self.clock, worker_tag="1/42")
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(_post())
        self.app.pending[0].callback(b"{}")
        self.assertIn(b"\r\nX-PayFlux-Worker: 1/42\r\n", transport.value())
        self.assertIn(b"\r\nDate: Thu, 01 Jan 1970 00:00:00 GMT\r\n", transport.value())


def _exchange(port: int, data: bytes) -> bytes:
    """Send ``data`` (its last request asks to close); everything read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        received = b""
        while True:
            part = s.recv(65536)
            if not part:
                return received
            received += part


class FastPathNodeMixin:
    @inlineCallbacks
    def test_producers_are_served_by_the_fast_path_and_probes_by_klein(self):
        """
        Keep-alive and pipelined POSTs never leave the fast path; a GET on the same
        connection is answered by the full stack, and so is every request after it.
        """
        self.redis = self.start_redis()
        node = yield start_node(self, self.redis.url)

        def request(method: str, path: str, body: bytes = b"", last: bool = False) -> bytes:
            return (f"{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_SECRET}\r\n"
                    f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                    f"{'Connection: close' if last else 'X-Keep: 1'}\r\n\r\n").encode() + body

        events = [json.dumps(sample_event()).encode() for _ in range(3)]
        posts = b"".join(request("POST", "/v1/events/payment_exhaust", e, last=e is events[-1]) for e in events)
        response = yield deferToThread(_exchange, node.ingest_port, posts)
        self.assertEqual(response.count(b"HTTP/1.1 202 Accepted\r\n"), 3)
        self.assertEqual(self.redis.sync_command("XLEN", "payflux:{0}:events"), 3)
        metrics = node.metrics.render().decode()
        self.assertNotIn("payflux_http_fallbacks_total{", metrics)

        mixed = request("POST", "/v1/events/payment_exhaust", events[0]) + request("GET", "/health") + \
            request("POST", "/v1/events/payment_exhaust", json.dumps(sample_event()).encode(), last=True)
        response = yield deferToThread(_exchange, node.ingest_port, mixed)
        statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", response)
        self.assertEqual(statuses, [b"202", b"200", b"202"], response)
        self.assertIn(b'{"status":"ok"}', response)
        self.assertIn(b'"duplicate":true', response)
        self.assertEqual(self.redis.sync_command("XLEN", "payflux:{0}:events"), 4)
        self.assertIn('payflux_http_fallbacks_total{reason="route"} 1.0', node.metrics.render().decode())


redis_test_cases(FastPathNodeMixin, globals())


class FreezeAfterStartTests(SynchronousTestCase):
    """node.freeze_after_start: what is alive shortly after the reactor starts leaves the GC's generations."""

    def test_objects_alive_after_start_are_frozen(self):
        import gc

        from payflux.node import freeze_after_start

        class Reactor(Clock):
            def callWhenRunning(self, f, *args):
                self.running_calls = (f, args)

        reactor = Reactor()
        self.addCleanup(gc.unfreeze)
        gc.unfreeze()
        freeze_after_start(reactor, delay=2.0)
        f, args = reactor.running_calls
        f(*args)  # the reactor runs
        reactor.advance(1.9)
        self.assertEqual(gc.get_freeze_count(), 0)
        reactor.advance(0.2)
        self.assertGreater(gc.get_freeze_count(), 1000)

