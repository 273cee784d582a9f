"""
The ingest listener's fast path: the two ingest POSTs served without twisted.web.

twisted.web + Klein parse, route and answer a single-event request in Python at ~6,000
requests/s per core (PROOF-load-test.md, issue 14); the rest of a request (auth, validation,
the append) costs a fraction of that.  :class:`FastIngestProtocol` is a plain Twisted
``Protocol`` for the shape nearly every producer sends: ``POST /v1/events/payment_exhaust`` (or
``/batch``) over HTTP/1.1 with a ``Content-Length`` body, keep-alive, pipelined or not.  It
finds the head with one ``bytes.find``, checks the request line and the header block with two
compiled regular expressions (C), reads the body by its length, and answers with one write.
Pipelined requests are appended concurrently (the writer's group commit takes them in one
round trip) and answered in order.

Everything else is handed to the full stack at a request boundary: the connection, with the
bytes of the request at hand and all that follows, goes to the :class:`~payflux.ingest.http.
IngestChannel` that served every request before (Klein: ``/health``, ``/ready``,
``/openapi.json``, ``/metrics``, 404, 405).  So are the requests that get an *early answer*
there -- a malformed or oversize head (400/414/431), chunked or otherwise unusual framing
(400, the chunk-size 413), a declared length over the cap (413), and a request
:meth:`~payflux.ingest.app.IngestApp.admit` refuses at the end of its head (401, 429, 503
draining, two Authorization headers) -- and they get exactly the answers, metrics and
lingering close of ``http.py``: the hostile-input guarantees are that module's, unchanged.
A head still incomplete ``header_timeout`` after its first byte is handed over and refused 408
there.  A connection handed over stays with the full stack (``payflux_http_fallbacks_total``
counts them by reason).

Why not httptools (llhttp), which the issue proposed: a hand-over needs the byte offset where
a request begins, which httptools exposes only for protocol upgrades, and the early 413 of a
chunked body needs the chunk size before its data, which httptools does not expose at all;
the head checks here are two regular expressions over bytes that are already in memory
(PROOF-load-test.md has the A/B of the two).
"""

from __future__ import annotations

import re
from collections import deque
from http import HTTPStatus
from typing import Callable

from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.web.http import datetimeToString, parse_qs
from zope.interface import implementer

from payflux.ingest.app import IngestApp, media_type
from payflux.ingest.errors import ApiError

log = Logger()

#: Heads longer than this go to the full stack, which answers 414/431 (its limits are 16 KiB
#: for the request line and 16 KiB for the headers).
MAX_HEAD_BYTES = 16 * 1024
#: More header lines than this go to the full stack (which allows 500).
MAX_HEADER_LINES = 100
#: Responses a connection may have outstanding (pipelined requests appending) before reading
#: from it pauses.
MAX_PIPELINE = 16

_TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
#: The request line of an ingest POST (a query string is allowed and checked by admit).
_REQUEST_LINE = re.compile(rb"POST (/v1/events/payment_exhaust(/batch)?)(\?[\x21-\x7e]*)? HTTP/1\.([01])")
#: A header block (each line ending in CRLF): a token, a colon, a value of visible characters,
#: spaces and tabs (no NUL, CR, LF or other control characters; no obsolete line folding).
_HEADER_BLOCK = re.compile(rb"(?:" + _TOKEN + rb":[\t\x20-\x7e\x80-\xff]*\r\n)*")

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_REASONS = {s.value: s.phrase.encode("ascii") for s in HTTPStatus}


class _Answer:
    """One request's place in the connection's response order; ``data`` is set once it is known."""

    __slots__ = ("data", "close")

    def __init__(self, close: bool):
        self.data: bytes | None = None
        self.close = close


class FastIngestFactory(Factory):
    """
    The ingest listener's protocol factory: :class:`FastIngestProtocol` per connection, with
    ``site`` (the :class:`~payflux.ingest.http.IngestSite` of the full stack) for hand-overs.
    ``worker_tag`` (``--workers``) is sent as ``X-PayFlux-Worker`` on every fast answer.
    """

    def __init__(self, app: IngestApp, site, reactor, header_timeout: float | None = None,
                 idle_timeout: float | None = None, worker_tag: str | None = None,
                 on_fallback: Callable[[str], None] = lambda reason: None):
        self.app = app
        self.site = site
        self.reactor = reactor
        self.header_timeout = header_timeout
        self.idle_timeout = idle_timeout if idle_timeout is not None else site.timeOut
        self.extra_headers = b"X-PayFlux-Worker: %s\r\n" % worker_tag.encode("ascii") if worker_tag else b""
        self.on_fallback = on_fallback
        self._date_second = -1
        self._date = b""

    def buildProtocol(self, addr):
        return FastIngestProtocol(self)

    def startFactory(self) -> None:
        self.site.doStart()

    def stopFactory(self) -> None:
        self.site.doStop()  # ends the full stack's lingering connections

    def date_header(self) -> bytes:
        """``Date: ...\\r\\n`` for now, formatted once per second."""
        second = int(self.reactor.seconds())
        if second != self._date_second:
            self._date_second = second
            self._date = b"Date: %s\r\n" % datetimeToString(second)
        return self._date


@implementer(IPushProducer)
class FastIngestProtocol(Protocol):
    """
    One connection of the ingest listener; see the module docstring.  It is the transport's
    producer: a client that does not read its answers fills the transport's write buffer, which
    pauses reading from it (as twisted.web's channel does), so nothing piles up.
    """

    def __init__(self, factory: FastIngestFactory):
        self.factory = factory
        self._app = factory.app
        self._buffer = b""
        self._answers: deque[_Answer] = deque()
        self._delegate = None  # the full stack's protocol, once handed over
        self._handover: str | None = None  # the reason of a hand-over waiting for earlier answers
        self._handover_refusal: ApiError | None = None  # and the answer it then gives at once
        self._closing = False  # a request asked to close: nothing more is read
        self._lost = False
        self._paused = False  # MAX_PIPELINE answers owed: parse nothing more for now
        self._write_blocked = False  # the transport's write buffer is full
        self._reading_paused = False  # what the transport was last told
        self._parsing = False
        self._head_deadline = None
        self._idle_call = None
        self._last_input = 0.0
        # the request whose body is being read
        self._body_left = 0
        self._body_parts: list[bytes] = []
        self._request: tuple | None = None

    # --- connection events ---

    def connectionMade(self) -> None:
        self.transport.registerProducer(self, True)
        idle = self.factory.idle_timeout
        if idle:
            self._last_input = self.factory.reactor.seconds()
            self._idle_call = self.factory.reactor.callLater(idle, self._idle_check)

    def dataReceived(self, data: bytes) -> None:
        if self._delegate is not None:
            self._delegate.dataReceived(data)
            return
        if self._closing:
            return  # a request asked to close; its answer is on the way
        self._last_input = self.factory.reactor.seconds()
        if self._request is not None and not self._buffer:
            data = self._take_body(data)
            if not data:
                return
        self._buffer = self._buffer + data if self._buffer else data
        self._parse()

    def connectionLost(self, reason) -> None:
        self._lost = True
        self._cancel_timers()
        if self._delegate is not None:
            self._delegate.connectionLost(reason)

    # --- parsing ---

    def _parse(self) -> None:
        if self._parsing:
            return
        self._parsing = True
        try:
            while self._buffer and not (self._closing or self._paused or self._handover or self._delegate):
                if self._request is not None:
                    rest = self._take_body(self._buffer)
                    self._buffer = rest
                    continue
                if not self._head():
                    break
        finally:
            self._parsing = False
        if self._buffer and self._request is None and not (self._handover or self._delegate or self._closing) \
                and not self._paused and self._head_deadline is None and self.factory.header_timeout:
            # a head begun and not complete: it must be, within header_timeout of now
            self._head_deadline = self.factory.reactor.callLater(self.factory.header_timeout, self._head_timed_out)

    def _head(self) -> bool:
        """Take one request head off the buffer; False when it is not all in (or handed over)."""
        buffer = self._buffer
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(buffer) > MAX_HEAD_BYTES:
                self._hand_over("head_size")
            return False
        self._cancel_head_deadline()
        if end > MAX_HEAD_BYTES:
            self._hand_over("head_size")
            return False
        line_end = buffer.find(b"\r\n", 0, end + 2)
        line = _REQUEST_LINE.fullmatch(buffer, 0, line_end)
        if line is None:
            self._hand_over("route")  # not an ingest POST (or not one in HTTP/1.x form)
            return False
        if _HEADER_BLOCK.fullmatch(buffer, line_end + 2, end + 2) is None:
            self._hand_over("head")
            return False
        length = 0
        has_length = False
        authorization = None
        content_type = None
        connection = b""
        expect = False
        lines = buffer[line_end + 2:end].split(b"\r\n") if end > line_end else ()
        if len(lines) > MAX_HEADER_LINES:
            self._hand_over("head_size")
            return False
        for header in lines:
            name, _, value = header.partition(b":")
            name = name.lower()
            if name == b"content-length":
                value = value.strip(b" \t")
                if has_length or not value.isdigit() or len(value) > 18:
                    self._hand_over("framing")
                    return False
                has_length = True
                length = int(value)
            elif name == b"authorization":
                if authorization is None:
                    authorization = [value.strip(b" \t")]
                else:
                    authorization.append(value.strip(b" \t"))
            elif name == b"content-type":
                content_type = value
            elif name == b"connection":
                connection = value.lower()
            elif name == b"transfer-encoding":
                self._hand_over("framing")
                return False
            elif name == b"expect":
                if value.strip(b" \t").lower() != b"100-continue":
                    self._hand_over("expect")
                    return False
                expect = True
        batch = line.group(2) is not None
        query = line.group(3)
        app = self._app
        try:
            key_id = app.admit(authorization, parse_qs(query[1:], 1) if query else None)
        except ApiError:
            self._hand_over("refused")  # answered there, as at the end of any head
            return False
        if length > (app.limits.max_body_bytes if batch else app.limits.max_event_bytes):
            self._hand_over("too_large")
            return False
        http10 = line.group(4) == b"0"
        if http10:
            keep_alive = b"keep-alive" in connection
        else:
            keep_alive = b"close" not in connection
        if expect and not http10 and length:
            if self._answers:
                self._hand_over("expect")  # a 100 Continue must not overtake earlier answers
                return False
            self.transport.write(_CONTINUE)
        self._buffer = buffer[end + 4:]
        self._request = (batch, key_id, media_type(content_type), keep_alive, http10)
        self._body_left = length
        self._body_parts = []
        if not length:
            self._dispatch(b"")
        elif self._buffer:
            self._buffer = self._take_body(self._buffer)
        return True

    def _take_body(self, data: bytes) -> bytes:
        """Take the current request's body bytes off ``data``; returns what follows it."""
        left = self._body_left
        if len(data) < left:
            self._body_parts.append(data)
            self._body_left = left - len(data)
            return b""
        self._body_parts.append(data[:left] if len(data) > left else data)
        rest = data[left:]
        parts, self._body_parts = self._body_parts, []
        self._dispatch(parts[0] if len(parts) == 1 else b"".join(parts))
        return rest

    # --- answering ---

    def _dispatch(self, body: bytes) -> None:
        batch, key_id, media, keep_alive, http10 = self._request
        self._request = None
        self._body_left = 0
        answer = _Answer(close=not keep_alive)
        self._answers.append(answer)
        if not keep_alive:
            self._closing = True
            self._buffer = b""
        try:
            d = self._app.ingest(batch, key_id, media, body)
        except ApiError as error:
            self._error(error, answer, http10)
        except Exception:  # noqa: BLE001 - answered 500 like every other route
            log.failure("unexpected error handling an ingest request")
            self._error(_internal(), answer, http10)
        else:
            d.addCallbacks(self._accepted, self._failed, (answer, http10), None, (answer, http10), None)
        if len(self._answers) >= MAX_PIPELINE and not self._paused and not self._lost:
            self._paused = True
            self._sync_reading()

    def _accepted(self, body: bytes, answer: _Answer, http10: bool) -> None:
        answer.data = self._response(202, body, answer.close, http10)
        self._flush()

    def _failed(self, failure, answer: _Answer, http10: bool) -> None:
        error = failure.value
        if not isinstance(error, ApiError):
            log.failure("unexpected error handling an ingest request", failure)
            error = _internal()
        self._error(error, answer, http10)

    def _error(self, error: ApiError, answer: _Answer, http10: bool) -> None:
        extra = b"".join(b"%s: %s\r\n" % (k.encode("ascii"), v.encode("ascii")) for k, v in error.headers.items())
        answer.data = self._response(error.status, error.body(), answer.close, http10, extra)
        self._flush()

    def _response(self, status: int, body: bytes, close: bool, http10: bool, extra: bytes = b"") -> bytes:
        if close:
            extra += b"Connection: close\r\n"
        elif http10:
            extra += b"Connection: keep-alive\r\n"
        return b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s%s%s\r\n%s" % (
            status, _REASONS.get(status, b"Unknown"), len(body), self.factory.date_header(),
            self.factory.extra_headers, extra, body)

    def _flush(self) -> None:
        answers = self._answers
        if self._lost:
            answers.clear()
            return
        while answers and answers[0].data is not None:
            answer = answers.popleft()
            self.transport.write(answer.data)
            if answer.close:
                answers.clear()
                self._cancel_timers()
                self.transport.loseConnection()
                return
        if self._paused and len(answers) < MAX_PIPELINE // 2:
            self._paused = False
            self._sync_reading()
            self._parse()
        if self._handover and not answers:
            self._hand_over(self._handover)

    # --- hand-over to the full stack ---

    def _hand_over(self, reason: str, refuse: ApiError | None = None) -> None:
        """
        Give the connection, from the request at hand on, to the full stack; once the earlier
        answers are written (they must go first).  ``refuse``: the answer it gives at once.
        """
        if self._answers:
            self._handover = reason  # _flush comes back here
            self._handover_refusal = refuse
            return
        if refuse is None:
            refuse = self._handover_refusal
        self._handover = None
        self._handover_refusal = None
        self._cancel_timers()
        self.factory.on_fallback(reason)
        self._paused = self._write_blocked = False
        self._sync_reading()
        self.transport.unregisterProducer()  # the full stack's channel registers itself
        protocol = self.factory.site.buildProtocol(self.transport.getPeer())
        self._delegate = protocol
        data, self._buffer = self._buffer, b""
        protocol.makeConnection(self.transport)
        if refuse is not None:
            protocol._channel._payflux_refuse(refuse)
        if data:
            protocol.dataReceived(data)

    # --- reading: paused while too many answers are owed or the write buffer is full ---

    def _sync_reading(self) -> None:
        paused = self._paused or self._write_blocked
        if paused != self._reading_paused and not self._lost:
            self._reading_paused = paused
            if paused:
                self.transport.pauseProducing()
            else:
                self.transport.resumeProducing()

    def pauseProducing(self) -> None:
        """IPushProducer: the transport's write buffer is full."""
        self._write_blocked = True
        self._sync_reading()

    def resumeProducing(self) -> None:
        """IPushProducer: the write buffer drained."""
        self._write_blocked = False
        self._sync_reading()

    def stopProducing(self) -> None:
        """IPushProducer: the connection is going away (connectionLost follows)."""

    # --- timers ---

    def _head_timed_out(self) -> None:
        self._head_deadline = None
        message = f"request headers not received within {self.factory.header_timeout:g} s"
        self._hand_over("header_timeout", refuse=ApiError(408, "request_timeout", message))

    def _idle_check(self) -> None:
        self._idle_call = None
        if self._lost or self._delegate is not None:
            return
        idle = self.factory.idle_timeout
        quiet = self.factory.reactor.seconds() - self._last_input
        if quiet >= idle and not self._answers:
            self.transport.abortConnection()  # as twisted.web's idle timeout: nothing owed, nothing said
            return
        self._idle_call = self.factory.reactor.callLater(max(idle - quiet, 0.1), self._idle_check)

    def _cancel_head_deadline(self) -> None:
        deadline, self._head_deadline = self._head_deadline, None
        if deadline is not None and deadline.active():
            deadline.cancel()

    def _cancel_timers(self) -> None:
        self._cancel_head_deadline()
        call, self._idle_call = self._idle_call, None
        if call is not None and call.active():
            call.cancel()


def _internal() -> ApiError:
    return ApiError(500, "internal", "internal error; see the server log")
