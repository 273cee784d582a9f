"""
The ingest HTTP API (Klein).

Checks run in the order README.md documents ("HTTP API": "Checks, in this order"), each
answered with a JSON error:
401 auth -> 429 per-key rate -> 413 body cap (enforced while reading, see ``http.py``) ->
415 content type -> 400 malformed JSON -> 422 schema -> 409 idempotency conflict ->
503 Redis unavailable / overloaded (with Retry-After) -> 202 once Redis replied to the append.

A draining node (SIGTERM received) answers 503 to every new ingest request at once.

The processor webhook routes (``POST /v1/webhooks/stripe`` / ``adyen``, on only when configured)
take no API key and have their own order of checks: :mod:`payflux.ingest.webhooks`, which
reuses this app's validation (:meth:`IngestApp.prepare_each`) and append path.
"""

from __future__ import annotations

import json
import math
import time
from http import HTTPStatus
from typing import Callable

import attrs
from klein import Klein
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.server import Request
from werkzeug.exceptions import MethodNotAllowed, NotFound

from payflux.events import EventValidator, MalformedJSON, decode_batch_body, decode_event_body
from payflux.ingest.auth import Authenticator
from payflux.ingest.errors import ApiError, unavailable
from payflux.ingest.http import SMALL_BODY_LIMIT
from payflux.ingest.openapi import openapi_document
from payflux.ingest.ratelimit import RateLimiter
from payflux.observability.logsummary import repeated
from payflux.observability.metrics import Metrics
from payflux.streams.writer import IdempotencyConflict, PreparedEvent, RedisUnavailable, StreamWriter

log = Logger()

# twisted.web has no reason phrase for these and would send "Unknown Status".
for _status in (HTTPStatus.UNPROCESSABLE_ENTITY, HTTPStatus.TOO_MANY_REQUESTS,
                HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE):
    http.RESPONSES.setdefault(_status.value, _status.phrase.encode("ascii"))

SINGLE_PATH = b"/v1/events/payment_exhaust"
BATCH_PATH = b"/v1/events/payment_exhaust/batch"


@attrs.frozen
class IngestLimits:
    max_event_bytes: int
    max_body_bytes: int
    max_batch_events: int
    max_inflight_events: int
    redis_timeout: float


def json_response(request: Request, status: int, doc: object) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    return json.dumps(doc, separators=(",", ":")).encode("utf-8")


def media_type(content_type: bytes | None) -> str:
    """A Content-Type's media type, lowercased, without parameters ("" when absent)."""
    raw = content_type or b""
    return raw.split(b";", 1)[0].strip().lower().decode("latin-1")


class IngestApp:
    """The HTTP API of an ingest node; all collaborators are injected."""

    app = Klein()

    def __init__(
        self,
        *,
        validator: EventValidator,
        writer: StreamWriter,
        authenticator: Authenticator,
        limiter: RateLimiter,
        metrics: Metrics,
        limits: IngestLimits,
        ping: Callable[[], Deferred],
        seconds: Callable[[], float] = time.time,
        serve_metrics: bool = False,
        webhooks=None,
    ):
        self.validator = validator
        self.writer = writer
        self.authenticator = authenticator
        self.limiter = limiter
        self.metrics = metrics
        self.limits = limits
        self.ping = ping
        self.seconds = seconds
        self.serve_metrics = serve_metrics
        #: the processor webhook routes (a payflux.ingest.webhooks.WebhookReceiver); None: all off
        self.webhooks = webhooks
        self.draining = False
        self.inflight_events = 0
        self.inflight_requests = 0
        self._idle: list[Deferred] = []
        # read when scraped, not set twice per request
        metrics.inflight_events.set_function(lambda: self.inflight_events)
        metrics.inflight_requests.set_function(lambda: self.inflight_requests)
        # label children looked up once (prometheus-client's labels() takes a lock per call)
        self._latency_histograms: dict = {}
        self._accepted_counters: dict = {}

    # --- plumbing used by the Site (early answers, see http.py) ---

    def body_limit(self, path: bytes) -> int:
        if path == BATCH_PATH:
            return self.limits.max_body_bytes
        if path == SINGLE_PATH:
            return self.limits.max_event_bytes
        if self.webhooks is not None:
            limit = self.webhooks.body_limit(path)
            if limit is not None:
                return limit
        return SMALL_BODY_LIMIT

    def preflight(self, request: Request) -> str | None:
        """
        The checks that need only the head (:meth:`admit`) for a twisted.web request.  Returns
        the caller's key id; None for a request that takes no key (anything but a POST to an
        ingest path).  IngestSite runs it as soon as a head is in, before any body byte, and
        keeps the key id on the request (``payflux_key_id``): asked again, it returns that.
        """
        key_id = getattr(request, "payflux_key_id", None)
        if key_id is not None:
            return key_id
        if request.method != b"POST" or (request.path != SINGLE_PATH and request.path != BATCH_PATH):
            return None
        return self.admit(request.requestHeaders.getRawHeaders(b"authorization"), request.args)

    def admit(self, authorization: list[bytes] | None, query_args: dict | None) -> str:
        """
        The checks that need only the head of an ingest POST, in the documented order: 503
        draining, 401 auth (400 ``duplicate_authorization`` for two Authorization headers), 429
        rate.  ``authorization``: every Authorization header value (None: none); returns the
        caller's key id, or raises the ApiError to answer before any body byte.
        """
        if self.draining:
            raise unavailable("draining", "node is shutting down; retry on another node", 1)
        if authorization is not None and len(authorization) > 1:
            raise ApiError(400, "duplicate_authorization", "more than one Authorization header; send exactly one")
        key_id = self.authenticator.authenticate(authorization[0] if authorization else None, query_args)
        self.limiter.check(key_id)
        return key_id

    def on_early_reject(self, request: Request | None, error: ApiError) -> None:
        """IngestSite's hook: see :meth:`count_early_answer`."""
        self.count_early_answer(getattr(request, "path", None), error)

    def count_early_answer(self, path: bytes | None, error: ApiError) -> None:
        """
        Count an answer the HTTP layer gave before the app saw the request (preflight's errors
        at the end of the head, 413, 400 framing, 408/414/431); on an ingest path it is also
        observed in the request histogram, as it was when the app gave it.
        """
        self._count_rejection(error, "-", 0)
        if path == SINGLE_PATH or path == BATCH_PATH:
            self._observe("batch" if path == BATCH_PATH else "single", error.status, self.seconds())
        elif self.webhooks is not None:
            self.webhooks.count_early_answer(path, error)

    def resource(self):
        return self.app.resource()

    # --- lifecycle ---

    def start_draining(self) -> Deferred:
        """Refuse new ingests; fire once no append is in flight."""
        self.draining = True
        self.metrics.draining.set(1)
        d = Deferred()
        if self.inflight_requests == 0:
            d.callback(None)
        else:
            self._idle.append(d)
        return d

    # --- routes ---

    @app.handle_errors(ApiError)
    def _api_error(self, request: Request, failure) -> bytes:
        error: ApiError = failure.value
        request.setResponseCode(error.status)
        request.setHeader(b"Content-Type", b"application/json")
        for name, value in error.headers.items():
            request.setHeader(name.encode("ascii"), value.encode("ascii"))
        return error.body()

    @app.handle_errors(NotFound)
    def _not_found(self, request: Request, failure) -> bytes:
        return json_response(request, 404, {"error": "not_found", "message": "no such endpoint"})

    @app.handle_errors(MethodNotAllowed)
    def _method_not_allowed(self, request: Request, failure) -> bytes:
        allowed = ", ".join(failure.value.valid_methods or [])
        request.setHeader(b"Allow", allowed.encode("ascii"))
        return json_response(request, 405, {"error": "method_not_allowed", "message": f"allowed methods: {allowed}"})

    @app.handle_errors(Exception)
    def _unexpected(self, request: Request, failure) -> bytes:
        log.failure("unexpected error handling {method} {path}", failure, method=request.method, path=request.path)
        return json_response(request, 500, {"error": "internal", "message": "internal error; see the server log"})

    @app.route("/health", methods=["GET"])
    def health(self, request: Request) -> bytes:
        return json_response(request, 200, {"status": "ok"})

    @app.route("/ready", methods=["GET"])
    async def ready(self, request: Request) -> bytes:
        refusal = await not_ready(request, self.draining, self.ping)
        return refusal if refusal is not None else json_response(request, 200, {"status": "ready"})

    @app.route("/metrics", methods=["GET"])
    def metrics_route(self, request: Request) -> bytes:
        """404 unless ``ingest_metrics``: metrics belong on the side listener (see docs/security.md)."""
        if not self.serve_metrics:
            raise NotFound()
        return self.render_metrics(request)

    def render_metrics(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", self.metrics.content_type.encode("ascii"))
        return self.metrics.render()

    @app.route("/openapi.json", methods=["GET"])
    def openapi(self, request: Request) -> bytes:
        return json_response(request, 200, openapi_document(self.limits))

    @app.route("/v1/events/payment_exhaust", methods=["POST"])
    def single(self, request: Request):
        return self._ingest(request, batch=False)

    @app.route("/v1/events/payment_exhaust/batch", methods=["POST"])
    def batch(self, request: Request):
        return self._ingest(request, batch=True)

    @app.route("/v1/webhooks/stripe", methods=["POST"])
    def stripe_webhook(self, request: Request):
        return self._webhook(request, "stripe")

    @app.route("/v1/webhooks/adyen", methods=["POST"])
    def adyen_webhook(self, request: Request):
        return self._webhook(request, "adyen")

    def _webhook(self, request: Request, processor: str):
        """A processor's webhook (payflux/ingest/webhooks.py); 404 unless its secret is configured."""
        if self.webhooks is None or processor not in self.webhooks.hooks:
            raise NotFound()

        def answer(ack: tuple[int, str, bytes]) -> bytes:
            status, content_type, body = ack
            request.setResponseCode(status)
            request.setHeader(b"Content-Type", content_type.encode("ascii"))
            return body

        return Deferred.fromCoroutine(self.webhooks.receive(self, processor, request)).addCallback(answer)

    # --- the ingest path ---

    def _ingest(self, request: Request, batch: bool):
        key_id = self.preflight(request)  # ran at the end of the head (IngestSite): its key id
        d = self.ingest(batch, key_id, media_type(request.getHeader(b"content-type")), request.content.read())

        def accepted(body: bytes) -> bytes:
            request.setResponseCode(202)
            request.setHeader(b"Content-Type", b"application/json")
            return body

        return d.addCallback(accepted)

    def ingest(self, batch: bool, key_id: str, media: str, body: bytes) -> Deferred:
        """
        The body checks of an admitted ingest request (:meth:`admit` ran at the end of its head)
        and the append: raises the ApiError of a 415/400/422 at once; else a Deferred firing
        with the 202 body once Redis holds the events, or failing with the 409/503 ApiError.
        ``media`` is the Content-Type's media type, lowercased, without parameters.
        """
        started = self.seconds()
        endpoint = "batch" if batch else "single"
        events = 0
        try:
            if self.draining:
                raise unavailable("draining", "node is shutting down; retry on another node", 1)
            raw = self._decode(media, body, batch)
            events = len(raw)
            self.limiter.spend(key_id, events)
            prepared, ignored = self._validate(raw, batch)
        except ApiError as error:
            self._count_rejection(error, key_id, events)
            self._observe(endpoint, error.status, started)
            raise
        return self._append(key_id, prepared, ignored, batch, endpoint, started)

    def _decode(self, media: str, body: bytes, batch: bool) -> list:
        if batch:
            if media in ("application/x-ndjson", "application/ndjson", "application/jsonl"):
                kind = "ndjson"
            elif media == "application/json":
                kind = "array"
            else:
                raise ApiError(
                    415,
                    "unsupported_media_type",
                    "batch Content-Type must be application/x-ndjson or application/json (array)",
                )
            try:
                items = decode_batch_body(body, kind)
            except MalformedJSON as e:
                raise ApiError(400, "malformed_json", str(e), details=_line_detail(e)) from None
            if not items:
                raise ApiError(422, "invalid_event", "batch holds no events")
            if len(items) > self.limits.max_batch_events:
                raise ApiError(
                    422,
                    "too_many_events",
                    f"batch holds {len(items)} events; the limit is {self.limits.max_batch_events}",
                )
            return items
        if media != "application/json":
            raise ApiError(415, "unsupported_media_type", "Content-Type must be application/json")
        try:
            return [decode_event_body(body)]
        except MalformedJSON as e:
            raise ApiError(400, "malformed_json", str(e)) from None

    def _validate(self, items: list, batch: bool) -> tuple[list[PreparedEvent], list[str]]:
        """The prepared events and the labels of the unknown fields dropped from them."""
        rows, invalid, ignored = self.validator.validate_batch(items)
        if invalid:
            details = [{"line": n, **d} if batch else d for n, event_details in invalid for d in event_details]
            message = f"{len(invalid)} of {len(items)} events are invalid; nothing was written" if batch else "invalid event"
            raise ApiError(422, "invalid_event", message, details=details)
        return [
            PreparedEvent(event_id=e, merchant_id_hash=m, event_type=t, canonical=c, fingerprint=f)
            for e, m, t, c, f in rows
        ], ignored

    def prepare_each(self, items: list) -> tuple[list[PreparedEvent], list[tuple[int, list[dict]]]]:
        """
        Each item validated on its own (a webhook delivery's events: one refused event does not
        refuse the others): the prepared valid ones, in order, and ``(index, details)`` (0-based)
        of each invalid one.  Unknown fields are dropped as :meth:`_validate` drops them.
        """
        prepared, invalid = [], []
        for n, item in enumerate(items):
            rows, bad, _ = self.validator.validate_batch([item])
            if bad:
                invalid.append((n, bad[0][1]))
                continue
            e, m, t, c, f = rows[0]
            prepared.append(PreparedEvent(event_id=e, merchant_id_hash=m, event_type=t, canonical=c, fingerprint=f))
        return prepared, invalid

    def _append(self, key_id, prepared, ignored, batch, endpoint, started, answer: bool = True) -> Deferred:
        """Append ``prepared``: a Deferred of the 202 body (``answer``), or of the writer's
        AppendResults, counted the same way (``answer`` False: a webhook delivery builds its own)."""
        count = len(prepared)
        if self.inflight_events + count > self.limits.max_inflight_events:
            error = unavailable("overloaded", "too many events in flight to Redis; retry shortly", 1)
            self._count_rejection(error, key_id, count)
            self._observe(endpoint, 503, started)
            raise error
        self.inflight_events += count
        self.inflight_requests += 1
        append_started = self.seconds()
        d = self.writer.append(prepared, int(append_started * 1000))
        return d.addBoth(self._appended, key_id, count, ignored, batch, endpoint, started, append_started, answer)

    def _appended(self, results, key_id, count, ignored, batch, endpoint, started, append_started, answer):
        """The writer's answer to :meth:`_append`: the 202 body (or the results themselves, without
        ``answer``), or the 409/503 ApiError raised."""
        self.metrics.append_latency.observe(self.seconds() - append_started)
        self.inflight_events -= count
        self.inflight_requests -= 1
        if self.inflight_requests == 0 and self._idle:
            idle, self._idle = self._idle, []
            for d in idle:
                d.callback(None)
        if isinstance(results, Failure):
            e = results.value
            if isinstance(e, IdempotencyConflict):
                error = ApiError(
                    409,
                    "conflict",
                    "event_id already used for a different payload",
                    details=[{"field": "event_id", "code": "conflict", "event_id": i} for i in e.event_ids],
                )
            elif isinstance(e, RedisUnavailable):
                repeated("append failed", log).warn("append failed, answering 503: {reason}", reason=str(e), key_id=key_id)
                error = unavailable(
                    getattr(e, "code", "redis_unavailable"),  # ReplicasNotAcked: written, not yet on replicas
                    getattr(e, "client_message", "event store unavailable; nothing was written"),
                    max(1, math.ceil(self.limits.redis_timeout)),
                )
            else:
                return results
            self._count_rejection(error, key_id, count)
            self._observe(endpoint, error.status, started)
            raise error

        duplicates = sum(1 for r in results if r.duplicate)
        accepted = self._accepted_counters.get(key_id)
        if accepted is None:
            accepted = self._accepted_counters[key_id] = self.metrics.events_accepted.labels(key_id)
        if count - duplicates:
            accepted.inc(count - duplicates)
        if duplicates:
            self.metrics.events_duplicate.labels(key_id).inc(duplicates)
        self._observe(endpoint, 202, started)
        if ignored:
            self.metrics.count_ignored(ignored)
        if not answer:
            return results
        # What json.dumps gives for these documents, formatted directly (a stream id is digits
        # and a dash); ignored_fields, which carry labels, still go through json.dumps.
        if not batch and not ignored:
            r = results[0]
            return b'{"status":"accepted","id":"%s","duplicate":%s}' % (
                r.stream_id.encode("ascii"), b"true" if r.duplicate else b"false")
        if batch and not ignored:
            items = b",".join([b'{"id":"%s","duplicate":%s}' % (r.stream_id.encode("ascii"), b"true" if r.duplicate else b"false")
                               for r in results])
            return b'{"status":"accepted","count":%d,"accepted":%d,"duplicates":%d,"results":[%s]}' % (
                count, count - duplicates, duplicates, items)
        if batch:
            doc = {
                "status": "accepted",
                "count": count,
                "accepted": count - duplicates,
                "duplicates": duplicates,
                "results": [{"id": r.stream_id, "duplicate": r.duplicate} for r in results],
            }
        else:
            doc = {"status": "accepted", "id": results[0].stream_id, "duplicate": results[0].duplicate}
        if ignored:
            doc["ignored_fields"] = sorted(set(ignored))
        return json.dumps(doc, separators=(",", ":")).encode("utf-8")

    def _count_rejection(self, error: ApiError, key_id: str, events: int) -> None:
        self.metrics.requests_rejected.labels(error.code, key_id).inc()
        if events:
            self.metrics.events_rejected.labels(error.code, key_id).inc(events)

    def _observe(self, endpoint: str | None, status: int, started: float) -> None:
        if endpoint is None:  # a webhook delivery: observed whole by payflux/ingest/webhooks.py
            return
        histogram = self._latency_histograms.get((endpoint, status))
        if histogram is None:
            histogram = self.metrics.request_latency.labels(endpoint, str(status))
            self._latency_histograms[(endpoint, status)] = histogram
        histogram.observe(self.seconds() - started)


async def not_ready(request: Request, draining: bool, ping: Callable[[], Deferred]) -> bytes | None:
    """
    The 503 body (with Retry-After) of a readiness probe when the node drains or Redis doesn't
    answer ``ping``; None when both are fine.  Shared by the ingest and side listeners.

    ``ping`` must answer fast (the node's is :meth:`payflux.node.RedisHealth.check`: within
    50 ms); the ``message`` is its failure as a sentence, e.g. "cannot connect to Redis at
    10.0.0.5:6379: connection refused (last success 12 s ago)".
    """
    if draining:
        request.setHeader(b"Retry-After", b"5")
        return json_response(request, 503, {"status": "draining"})
    try:
        await ping()
    except Exception as e:  # noqa: BLE001 - any failure means not ready
        request.setHeader(b"Retry-After", b"1")
        return json_response(request, 503, {"status": "redis_unavailable", "message": _reason(e)})
    return None


def _line_detail(e: MalformedJSON) -> list:
    line = getattr(e, "line", None)
    return [{"line": line, "code": "malformed_json", "message": str(e)}] if line else []


def _reason(e: BaseException) -> str:
    """A failed readiness ping as words: never a repr such as ``(2.0, 'Deferred')``."""
    from twisted.internet import defer

    if isinstance(e, defer.TimeoutError):  # Deferred.addTimeout's, whose str() is its args tuple
        seconds = e.args[0] if e.args and isinstance(e.args[0], (int, float)) else None
        return f"no answer from Redis within {seconds:g} s" if seconds is not None else "no answer from Redis in time"
    if isinstance(e, defer.CancelledError):
        return "the Redis check was cancelled"
    text = str(e).strip()
    if not text or (text.startswith("(") and text.endswith(")")):
        return f"Redis check failed ({type(e).__name__})"
    return text.removeprefix("Redis error: ")
