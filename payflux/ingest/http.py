"""
The HTTP server plumbing under the Klein app: a Site whose requests enforce the body cap
*while the body arrives*.

twisted.web buffers a whole request body before any resource sees it.  :class:`BoundedRequest`
checks the declared ``Content-Length`` as soon as the headers are in and counts bytes of
chunked bodies as they arrive; past the cap it stops buffering, answers at once and closes the
connection, so neither a huge declared length nor an endless chunked body costs memory.  The
early answer still follows the documented check order: the app's ``preflight`` (401, 429)
decides first, and only an authenticated, admitted caller gets the 413.

:class:`IngestChannel` bounds the header phase: twisted.web's only clock is an idle timeout
that every received byte resets, so a client trickling a request head one byte at a time
(slowloris) could hold a connection forever.  A request's head must be complete within
``header_timeout`` seconds of its first byte, else 408 and the connection is closed.  An
oversize head gets 414 (request line) or 431 (headers), also as JSON, and a close.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Callable

from twisted.logger import Logger
from twisted.web import http, server

from payflux.ingest.errors import ApiError, too_large

log = Logger()


class BoundedRequest(server.Request):
    _payflux_received = 0
    _payflux_limit: int | None = None
    _payflux_rejected = False

    def gotLength(self, length: int | None) -> None:
        site: IngestSite = self.channel.site
        path = getattr(self.channel, "_path", b"") or b""
        self._payflux_limit = site.body_limit(path.split(b"?", 1)[0])
        if length is not None and length > self._payflux_limit:
            # Don't even allocate the buffer (twisted would create a temp file).
            self.content = _NullContent()
            self._payflux_reject()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._payflux_rejected:
            return
        self._payflux_received += len(data)
        if self._payflux_limit is not None and self._payflux_received > self._payflux_limit:
            self.content = _NullContent()
            self._payflux_reject()
            return
        self.content.write(data)

    def process(self) -> None:
        if self._payflux_rejected:
            return  # already answered; the connection is closing
        super().process()

    def _payflux_reject(self) -> None:
        self._payflux_rejected = True
        site: IngestSite = self.channel.site
        try:
            site.preflight(self)
            error = too_large(self._payflux_limit or 0)
        except ApiError as e:
            error = e
        site.on_early_reject(self, error)
        body = error.body()
        reason = HTTPStatus(error.status).phrase
        head = [
            f"HTTP/1.1 {error.status} {reason}",
            "Content-Type: application/json",
            f"Content-Length: {len(body)}",
            "Connection: close",
        ] + [f"{k}: {v}" for k, v in error.headers.items()]
        transport = self.channel.transport
        transport.write(("\r\n".join(head) + "\r\n\r\n").encode("ascii") + body)
        self.channel.loseConnection()


class _NullContent:
    """A write-only sink that replaces the body buffer once a request is rejected."""

    def write(self, data: bytes) -> None:
        pass

    def seek(self, *args) -> int:
        return 0

    def read(self, *args) -> bytes:
        return b""

    def close(self) -> None:
        pass


class IngestChannel(http.HTTPChannel):
    """
    An HTTPChannel whose request heads must arrive within ``header_timeout`` seconds, and that
    answers an oversize head with a JSON 414/431 instead of twisted.web's bare 400 (too many or
    too large headers) or a silent close (one line over ``MAX_LENGTH``).  The size limits are
    twisted.web's: 16 KiB per line and for the whole head, 500 headers.
    """

    header_timeout: float | None = None
    _payflux_head_deadline = None
    _payflux_head_open = False  # a head has begun and its headers are not all in yet
    _payflux_refused = False

    def dataReceived(self, data: bytes) -> None:
        if self._payflux_refused:
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

    def allHeadersReceived(self) -> None:
        self._payflux_head_open = False
        self._payflux_cancel_head_deadline()
        super().allHeadersReceived()

    def connectionLost(self, reason) -> None:
        self._payflux_cancel_head_deadline()
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
        """Answer ``error`` as JSON and close; nothing more is read from this connection."""
        if self._payflux_refused:
            return
        self._payflux_refused = True
        self._payflux_cancel_head_deadline()
        body = error.body()
        self.transport.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n%s" % (error.status, HTTPStatus(error.status).phrase.encode(), len(body), body)
        )
        self.loseConnection()


class IngestSite(server.Site):
    """
    A Site that knows the body cap of each path and how to run the app's preflight checks.

    ``body_limit(path)`` returns the cap in bytes for a request path; ``preflight(request)``
    raises the 401/429 ``ApiError`` a request would get, if any.  ``header_timeout`` bounds
    the time from a request's first byte to the end of its headers (None: no bound).
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

    def protocol(self):
        channel = IngestChannel()
        channel.header_timeout = self.header_timeout
        return http._GenericHTTPChannelProtocol(channel)

    def log(self, request) -> None:
        """No per-request access log: metrics count requests; logs carry exceptions only."""
