"""
The HTTP server plumbing under the Klein app: a Site whose requests enforce the body cap
*while the body arrives*.

twisted.web buffers a whole request body before any resource sees it.  :class:`BoundedRequest`
checks the declared ``Content-Length`` as soon as the headers are in and counts bytes of
chunked bodies as they arrive; past the cap it stops buffering, answers at once and closes the
connection, so neither a huge declared length nor an endless chunked body costs memory.  The
early answer still follows the documented check order: the app's ``preflight`` (401, 429)
decides first, and only an authenticated, admitted caller gets the 413.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Callable

from twisted.logger import Logger
from twisted.web import server

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


class IngestSite(server.Site):
    """
    A Site that knows the body cap of each path and how to run the app's preflight checks.

    ``body_limit(path)`` returns the cap in bytes for a request path; ``preflight(request)``
    raises the 401/429 ``ApiError`` a request would get, if any.
    """

    requestFactory = BoundedRequest

    def __init__(
        self,
        resource,
        body_limit: Callable[[bytes], int],
        preflight: Callable[[server.Request], object],
        on_early_reject: Callable[[server.Request, ApiError], None] = lambda r, e: None,
    ):
        # PayFlux bodies are JSON/NDJSON, never forms: skip twisted.web's form parsing, which
        # runs every POST's Content-Type through the email package (13-17% of a single-event
        # request's CPU in the profile in PROOF-load-test.md).
        super().__init__(resource, parsePOSTFormSubmission=False)
        self.body_limit = body_limit
        self.preflight = preflight
        self.on_early_reject = on_early_reject

    def log(self, request) -> None:
        """No per-request access log: metrics count requests; logs carry exceptions only."""
