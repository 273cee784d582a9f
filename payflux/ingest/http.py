"""
The HTTP server plumbing under the Klein app: a Site whose requests enforce the body cap
*while the body arrives*.

twisted.web buffers a whole request body before any resource sees it.  :class:`BoundedRequest`
runs the app's ``preflight`` (503 draining, 401, 429) as soon as the head is in, before any
body byte, and keeps the key id it returns for the app; it checks the declared
``Content-Length`` at the same moment, each chunk's declared size as soon as its size line is
parsed, and the running count of body bytes; past the cap it stops buffering and answers 413
at once, so neither a huge declared length nor an endless chunked body costs memory.  The
early answers follow the documented check order: only an authenticated, admitted caller gets
the 413.

:class:`IngestChannel` bounds the header phase: twisted.web's only clock is an idle timeout
that every received byte resets, so a client trickling a request head one byte at a time
(slowloris) could hold a connection forever.  A request's head must be complete within
``header_timeout`` seconds of its first byte, else 408.  An oversize head gets 414 (request
line) or 431 (headers); a malformed one (bad request line or header, a bad, duplicate or
conflicting ``Content-Length``/``Transfer-Encoding``) and a malformed chunked body get 400.
Every one of these answers is JSON (:class:`~payflux.ingest.errors.ApiError`), where
twisted.web alone sends a bare 400 or nothing.

Every early answer ends the connection with a *lingering close*: the response is flushed,
the write side is shut down (FIN), and whatever the client still sends is read and discarded
for at most :data:`LINGER_SECONDS` / :data:`LINGER_BYTES` before the socket is closed.  A
client still uploading a body it was refused (a 5 MB body in one write against a 64 KiB cap)
thus reads the status instead of a connection reset, which closing a socket with unread
input would send.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Callable

from twisted.internet.interfaces import IHalfCloseableDescriptor
from twisted.logger import Logger
from twisted.web import http, server

# Bound here: twisted.web.http is a deprecation proxy module, whose every attribute lookup costs
# ~1 µs; these run per request.
from twisted.web.http import (  # isort: skip
    _ChunkedTransferDecoder, _IdentityTransferDecoder, _MalformedChunkedDataError, parse_qs,
)

from payflux.ingest.errors import ApiError, too_large

log = Logger()

#: The body cap (bytes) of every path of the ingest listener without its own (the ingest and
#: webhook paths have theirs): /health, /ready, /metrics, /openapi.json, unknown paths.
SMALL_BODY_LIMIT = 8192
#: The body cap of an alert outcome (``POST /v1/alerts/{id}/outcome`` on the side listener).
OUTCOME_BODY_LIMIT = 16 * 1024

#: After an early answer, how long (seconds) and how many bytes the client may still send,
#: read and discarded, before the connection is closed (see "lingering close" above).
LINGER_SECONDS = 2.0
LINGER_BYTES = 16 * 1024 * 1024


class BoundedRequest(server.Request):
    _payflux_received = 0
    _payflux_limit: int | None = None
    _payflux_rejected = False
    #: The caller's key id once ``preflight`` admitted it at the end of the head (None: not run,
    #: or not a path that takes a key); the app's ``preflight`` returns it instead of re-checking.
    payflux_key_id: str | None = None

    def gotLength(self, length: int | None) -> None:
        channel = self.channel
        site: IngestSite = channel.site
        # What requestReceived sets once the body is in, set now for preflight's sake (it is
        # set again, identically, later).
        try:
            self.method = channel._command
            path, has_query, query = channel._path.partition(b"?")
        except AttributeError:  # not an HTTP/1 channel (an HTTP/2 stream)
            path, has_query, query = b"", b"", b""
        self.path = path
        if has_query:
            self.args = parse_qs(query, 1)
        limit = self._payflux_limit = site.body_limit(path)
        try:
            self.payflux_key_id = site.preflight(self)
            if length is not None and length > limit:
                raise too_large(limit)
        except ApiError as error:
            # Don't even allocate the buffer (twisted would create a temp file).
            self._payflux_reject(error)
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._payflux_rejected:
            return
        self._payflux_received += len(data)
        if self._payflux_limit is not None and self._payflux_received > self._payflux_limit:
            self._payflux_reject(too_large(self._payflux_limit))
            return
        self.content.write(data)

    def chunk_announced(self, size: int) -> bool:
        """
        A chunk of ``size`` bytes was announced (its size line parsed, none of its data read):
        answer 413 now if it would take the body past the cap.  False once rejected.
        """
        if self._payflux_rejected:
            return False
        if self._payflux_limit is not None and self._payflux_received + size > self._payflux_limit:
            self._payflux_reject(too_large(self._payflux_limit))
            return False
        return True

    def process(self) -> None:
        if self._payflux_rejected:
            return  # already answered; the connection is closing
        super().process()

    def _payflux_reject(self, error: ApiError) -> None:
        self._payflux_rejected = True
        self.content = _NullContent()
        self.channel._payflux_refuse(error)


class _NullContent:
    """A write-only sink that replaces the body buffer once a request is rejected."""

    def write(self, data: bytes) -> None:
        pass

    def seek(self, *args) -> int:
        return 0

    def tell(self) -> int:
        return 0

    def read(self, *args) -> bytes:
        return b""

    def close(self) -> None:
        pass


class _BoundedChunkedDecoder(_ChunkedTransferDecoder):
    """
    twisted.web's chunked decoder, telling the request each chunk's size before its data, and
    keeping what was wrong with a malformed body (``error``) for the channel's JSON 400.
    """

    error: str | None = None

    def __init__(self, request: BoundedRequest, finishCallback: Callable[[bytes], None]):
        super().__init__(request.handleContentChunk, finishCallback)
        self._payflux_request = request

    def dataReceived(self, data: bytes) -> None:
        try:
            super().dataReceived(data)
        except _MalformedChunkedDataError as e:
            # twisted.web's message, cut before any quoted input (chunk extensions are quoted)
            self.error = str(e).split(":", 1)[0].rstrip(".")
            raise  # HTTPChannel.rawDataReceived answers it: _respondToBadRequestAndDisconnect

    def _dataReceived_CHUNK_LENGTH(self) -> bool:
        if not super()._dataReceived_CHUNK_LENGTH():
            return False
        if self.state == "BODY" and not self._payflux_request.chunk_announced(self.length):
            del self._buffer[:]  # refused: stop decoding (nothing more is fed to this decoder)
            return False
        return True


class IngestChannel(http.HTTPChannel):
    """
    An HTTPChannel whose request heads must arrive within ``header_timeout`` seconds, and that
    answers an oversize head with a JSON 414/431 instead of twisted.web's bare 400 (too many or
    too large headers) or a silent close (one line over ``MAX_LENGTH``).  The size limits are
    twisted.web's: 16 KiB per line and for the whole head, 500 headers.  A malformed head or
    chunked body gets a JSON 400 naming what is wrong; every early answer closes lingering.
    """

    header_timeout: float | None = None
    linger_seconds: float = LINGER_SECONDS
    linger_bytes: int = LINGER_BYTES
    _payflux_head_deadline = None
    _payflux_head_open = False  # a head has begun and its headers are not all in yet
    _payflux_refused = False  # answered early: the rest of the input is discarded
    _payflux_linger_call = None
    _payflux_discarded = 0
    _payflux_closed = False

    def dataReceived(self, data: bytes) -> None:
        if self._payflux_refused:
            self._payflux_discard(data)
            return
        # line mode = reading a request line or headers (raw mode: a body, or a request being
        # handled); the clock starts at the first byte of a head, not at connect, so an idle
        # keep-alive connection is left to the factory's idle timeout.
        if self.line_mode and not self._payflux_head_open:
            self._payflux_head_open = True
        super().dataReceived(data)
        # Only a head still incomplete after this chunk needs a clock: most requests arrive
        # whole in one read, so most requests schedule and cancel no timer at all.
        if self._payflux_head_open and self._payflux_head_deadline is None and self.header_timeout \
                and not self._payflux_refused:
            self._payflux_head_deadline = self.callLater(self.header_timeout, self._payflux_head_timed_out)

    def lineReceived(self, line: bytes) -> None:
        if self._receivedHeaderSize + len(line) > self.totalHeadersSize:
            return self._payflux_head_too_large()
        super().lineReceived(line)

    def headerReceived(self, line: bytes) -> bool:
        if self._receivedHeaderCount >= self.maxHeaders:
            self._payflux_head_too_large()
            return False
        return super().headerReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._payflux_head_too_large()

    def _maybeChooseTransferDecoder(self, header: bytes, data: bytes) -> bool:
        """
        twisted.web's choice of body framing from a ``Content-Length`` / ``Transfer-Encoding``
        header, answering a bad, repeated or conflicting one with a JSON 400 that says which
        (twisted.web: a bare 400); chunked bodies get :class:`_BoundedChunkedDecoder`.
        """
        if header == b"Content-Length":
            if not data.isdigit():
                return self._payflux_bad_framing("bad_content_length", "Content-Length must be a decimal number")
            if self._transferDecoder is not None:
                if isinstance(self._transferDecoder, _IdentityTransferDecoder):
                    return self._payflux_bad_framing("bad_content_length", "more than one Content-Length")
                return self._payflux_bad_framing("bad_framing", "both Transfer-Encoding and Content-Length; send one")
            # More digits than any cap has: over every cap (and int() refuses > 4300 digits).
            length = int(data) if len(data.lstrip(b"0")) <= 18 else 10**18
            decoder = _IdentityTransferDecoder(length, self.requests[-1].handleContentChunk, self._finishRequestBody)
        elif header == b"Transfer-Encoding":
            coding = data.lower()
            if coding == b"identity":
                return True
            if coding != b"chunked":
                return self._payflux_bad_framing("bad_transfer_encoding", "the only Transfer-Encoding accepted is chunked")
            if self._transferDecoder is not None:
                if isinstance(self._transferDecoder, _IdentityTransferDecoder):
                    return self._payflux_bad_framing("bad_framing", "both Content-Length and Transfer-Encoding; send one")
                return self._payflux_bad_framing("bad_transfer_encoding", "more than one Transfer-Encoding")
            length = None
            decoder = _BoundedChunkedDecoder(self.requests[-1], self._finishRequestBody)
        else:
            return True
        self.length = length
        self._transferDecoder = decoder
        return True

    def _payflux_bad_framing(self, code: str, message: str) -> bool:
        self._payflux_refuse(ApiError(400, code, message))
        return False

    def _respondToBadRequestAndDisconnect(self) -> None:
        """
        twisted.web's answer to a request line, header line or chunked body it can't parse (a
        bare 400), as JSON.
        """
        decoder = self._transferDecoder
        if "_command" not in self.__dict__:  # set once the request line parsed
            error = ApiError(400, "bad_request", "malformed request line")
        elif isinstance(decoder, _BoundedChunkedDecoder) and decoder.error is not None:
            error = ApiError(400, "bad_chunk", f"malformed chunked body: {decoder.error}")
        else:
            error = ApiError(400, "bad_request", "malformed header line (no colon, a bad name, or NUL/CR/LF in a value)")
        self._payflux_refuse(error)

    def allHeadersReceived(self) -> None:
        self._payflux_head_open = False
        self._payflux_cancel_head_deadline()
        super().allHeadersReceived()

    def _send100Continue(self) -> None:
        if not self._payflux_refused:  # no "100 Continue" after an early answer
            super()._send100Continue()

    def connectionLost(self, reason) -> None:
        self._payflux_cancel_head_deadline()
        call, self._payflux_linger_call = self._payflux_linger_call, None
        if call is not None and call.active():
            call.cancel()
        lingering = getattr(getattr(self, "site", None), "lingering", None)
        if lingering is not None:
            lingering.discard(self)
        super().connectionLost(reason)

    def _payflux_cancel_head_deadline(self) -> None:
        deadline, self._payflux_head_deadline = self._payflux_head_deadline, None
        if deadline is not None and deadline.active():
            deadline.cancel()

    def _payflux_head_too_large(self) -> None:
        if getattr(self, "_HTTPChannel__first_line", 0):  # still on the request line
            self._payflux_refuse(ApiError(414, "uri_too_long", f"request line longer than {self.MAX_LENGTH} bytes"))
        else:
            self._payflux_refuse(ApiError(
                431, "headers_too_large",
                f"request headers exceed {self.totalHeadersSize} bytes or {self.maxHeaders} fields",
            ))

    def _payflux_head_timed_out(self) -> None:
        self._payflux_head_deadline = None
        message = f"request headers not received within {self.header_timeout:g} s"
        self._payflux_refuse(ApiError(408, "request_timeout", message))

    def _payflux_refuse(self, error: ApiError) -> None:
        """
        Answer ``error`` as JSON and close lingering; nothing more of this connection is parsed.
        The site's ``on_early_reject`` hears of it (with the request, once one was begun).
        """
        if self._payflux_refused:
            return
        self._payflux_refused = True
        self.paused = True  # LineReceiver: parse nothing more of the data at hand
        self._buffer = b""
        # Not 0, so that a refused head without a body is not handed on as a complete request
        # (HTTPChannel.lineReceived; its own _failChooseTransferDecoder does the same).
        self.length = None
        self._payflux_cancel_head_deadline()
        body = error.body()
        head = b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n" % (
            error.status, HTTPStatus(error.status).phrase.encode("ascii"), len(body))
        for name, value in error.headers.items():
            head += b"%s: %s\r\n" % (name.encode("ascii"), value.encode("ascii"))
        self.transport.write(head + b"\r\n" + body)
        site = getattr(self, "site", None)
        if site is not None:
            try:
                site.on_early_reject(self.requests[-1] if self.requests else None, error)
            except Exception:  # noqa: BLE001 - counting must not stop the answer
                log.failure("on_early_reject failed")
        self._payflux_linger()

    def _payflux_linger(self) -> None:
        """Shut the write side once the answer is flushed; read and discard for a bounded while."""
        transport = self.transport
        self._networkProducer.unregisterProducer()  # as HTTPChannel.loseConnection does
        if IHalfCloseableDescriptor.providedBy(transport):  # TCP, UNIX; not TLS: no FIN then
            transport.loseWriteConnection()
        transport.resumeProducing()  # twisted.web pauses reading while a request is handled
        self._payflux_linger_call = self.callLater(self.linger_seconds, self._payflux_close)
        lingering = getattr(getattr(self, "site", None), "lingering", None)
        if lingering is not None:
            lingering.add(self)

    def _payflux_discard(self, data: bytes) -> None:
        self._payflux_discarded += len(data)
        if self._payflux_discarded > self.linger_bytes and not self._payflux_closed:
            self._payflux_close()

    def _payflux_close(self) -> None:
        call, self._payflux_linger_call = self._payflux_linger_call, None
        if call is not None and call.active():
            call.cancel()
        if self._payflux_closed:
            return
        self._payflux_closed = True
        # The answer is normally flushed by now, and the close is immediate; a client that
        # reads nothing could keep it unflushed: abort after another linger (set before the
        # close, whose connectionLost may run at once and cancels it).
        self._payflux_linger_call = self.callLater(self.linger_seconds, self._payflux_abort)
        self.transport.loseConnection()

    def _payflux_abort(self) -> None:
        self._payflux_closed = True
        self.transport.abortConnection()


class IngestSite(server.Site):
    """
    A Site that knows the body cap of each path and how to run the app's preflight checks.

    ``body_limit(path)`` returns the cap in bytes for a request path; ``preflight(request)``
    runs at the end of every head (``request.method``, ``path``, ``args`` and the headers are
    set) and raises the ``ApiError`` the request gets before its body (401, 429, ...), else
    returns the caller's key id (None where none is needed), kept as
    ``request.payflux_key_id``.  ``on_early_reject(request, error)`` hears of every early
    answer (``request`` is None when the request line was not even complete).
    ``header_timeout`` bounds the time from a request's first byte to the end of its headers
    (None: no bound).
    """

    requestFactory = BoundedRequest

    def __init__(
        self,
        resource,
        body_limit: Callable[[bytes], int],
        preflight: Callable[[server.Request], object],
        on_early_reject: Callable[[server.Request, ApiError], None] = lambda r, e: None,
        header_timeout: float | None = None,
    ):
        # PayFlux bodies are JSON/NDJSON, never forms: skip twisted.web's form parsing, which
        # runs every POST's Content-Type through the email package (13-17% of a single-event
        # request's CPU in the profile in PROOF-load-test.md).
        super().__init__(resource, parsePOSTFormSubmission=False)
        self.body_limit = body_limit
        self.preflight = preflight
        self.on_early_reject = on_early_reject
        self.header_timeout = header_timeout
        #: connections answered early and lingering; aborted when the listener stops
        self.lingering: set[IngestChannel] = set()

    def stopFactory(self) -> None:
        """The listener is gone (node stopping): the lingering connections were answered; end them."""
        for channel in list(self.lingering):
            channel._payflux_abort()
        super().stopFactory()

    def protocol(self):
        channel = IngestChannel()
        channel.header_timeout = self.header_timeout
        return http._GenericHTTPChannelProtocol(channel)

    def log(self, request) -> None:
        """No per-request access log: metrics count requests; logs carry exceptions only."""
