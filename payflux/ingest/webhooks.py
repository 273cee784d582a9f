"""
The processor webhook routes of the ingest listener, ``POST /v1/webhooks/stripe`` and
``POST /v1/webhooks/adyen`` (docs/producers.md, "Processor webhooks"): the transport around the
transport-free handlers of :mod:`payflux.webhooks`.

A route exists only while its processor's secret is configured (else 404, like any unknown
path).  No API key: the processor's signature is the authentication, and the per-key rate
limiter does not apply (a webhook has no key; ``max_inflight_events`` and the body cap bound it).
What a delivery gets, in order:

1. 503 ``draining`` (``Retry-After``) while the node stops: the processor delivers again.
2. The body cap, ``max_body_bytes`` of the handler, enforced while reading (``IngestApp.body_limit``):
   413 before the body is read past it.
3. ``handle(headers, body, now)``: ``rejected`` -> its error (400, 401, 413) as the house JSON
   body; nothing is written or recorded.
4. Each mapped event is validated on its own by the ingest validator (PAN guard included).  An
   event it refuses (say, a timestamp beyond ``future_skew``) is counted and logged without any
   value, and is **not** written; the delivery is still acknowledged, because the processor's
   next delivery of it would be refused the same way.
5. The valid events go to Redis in one append (the batch endpoint's path: dedupe on
   ``event_id``, inflight bound, the same metrics with key id ``webhook:<processor>``); the
   acknowledgement is sent only once Redis holds them.  A redelivery is a duplicate: nothing is
   appended and the processor gets its 2xx, so it stops retrying.  Redis unavailable: 503 with
   ``Retry-After`` (the processor retries).  An ``event_id`` already stored with a different
   payload (``id_hash_key`` or the mapping changed since): counted as ``conflict``, logged,
   acknowledged (a retry cannot change it); the delivery's other events are appended one by one.
6. The acknowledgement: Stripe ``{"received":true}``, Adyen ``[accepted]``.
7. Then, without delaying the answer, each outcome signal of a newly appended event (not of a
   duplicate: a redelivery records nothing twice) is recorded, by the outcome API's rules, on
   every open alert of its processor and every open alert of its ``merchant_id_hash``, with the
   lead time observed in ``payflux_alert_outcome_lead_time_seconds``.  A failure is counted
   (``payflux_webhook_outcome_failures_total``) and logged, never answered.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.server import Request

from payflux.ingest.alerts import check_outcome, stored_outcome
from payflux.ingest.errors import ApiError, unavailable
from payflux.observability.logsummary import repeated
from payflux.observability.metrics import Metrics
from payflux.redis.replies import is_outage
from payflux.risk.store import AlertFull, AlertQuery, AlertStore, decode_cursor
from payflux.webhooks import REJECTED, AdyenWebhook, OutcomeSignal, ProcessorWebhook, StripeWebhook

log = Logger()

#: The route of each processor.
PATHS = {"stripe": b"/v1/webhooks/stripe", "adyen": b"/v1/webhooks/adyen"}
PROCESSOR_OF_PATH = {path: name for name, path in PATHS.items()}
#: The error codes of a handler that mean "not authentic" (the rest of its 400s are malformed bodies).
SIGNATURE_CODES = frozenset({"missing_signature", "signature_mismatch", "stale_timestamp", "malformed_signature",
                             "no_v1_signature"})
#: Open alerts one signal is recorded on at most (a page of the store's listing each round trip).
MAX_ALERTS_PER_SIGNAL = 1000
ALERT_PAGE = 500


def build_hooks(stripe_secrets: tuple[bytes, ...], adyen_keys: tuple[bytes, ...],
                id_hash_key: bytes | None) -> dict[str, ProcessorWebhook]:
    """The handlers of the configured processors (none without a secret)."""
    hooks: dict[str, ProcessorWebhook] = {}
    if stripe_secrets and id_hash_key:
        hooks["stripe"] = StripeWebhook(stripe_secrets, id_hash_key)
    if adyen_keys and id_hash_key:
        hooks["adyen"] = AdyenWebhook(adyen_keys, id_hash_key)
    return hooks


def request_headers(request: Request) -> dict[str, str]:
    """The request's headers with lower-case names; a repeated header's values joined by ``,``."""
    return {name.decode("latin-1").lower(): ",".join(v.decode("latin-1") for v in values)
            for name, values in request.requestHeaders.getAllRawHeaders()}


class WebhookReceiver:
    """
    The webhook routes' logic for :class:`payflux.ingest.app.IngestApp` (module docstring).

    ``hooks`` maps processor names to handlers (:func:`build_hooks`); ``alerts`` is the node's
    alert store (None: outcome signals are counted as failures); ``seconds`` the clock handed to
    the handlers and the outcome rules; ``timeout`` bounds each alert store call (on ``reactor``).
    """

    def __init__(self, hooks: Mapping[str, ProcessorWebhook], alerts: AlertStore | None, metrics: Metrics,
                 seconds: Callable[[], float], timeout: float = 2.0, reactor: Any = None) -> None:
        self.hooks = dict(hooks)
        self.alerts = alerts
        self.metrics = metrics
        self.seconds = seconds
        self.timeout = timeout
        self.reactor = reactor
        #: outcome recordings still running (tests wait for them with :meth:`settled`)
        self.recording: set[defer.Deferred] = set()

    def body_limit(self, path: bytes) -> int | None:
        """The body cap of a webhook route that is on; None for any other path."""
        hook = self.hooks.get(PROCESSOR_OF_PATH.get(path, ""))
        return hook.max_body_bytes if hook is not None else None

    def count_early_answer(self, path: bytes | None, error: ApiError) -> None:
        """The HTTP layer answered a webhook route before the app saw it (413, a framing 400)."""
        processor = PROCESSOR_OF_PATH.get(path or b"")
        if processor in self.hooks:
            self._count(processor, "too_large" if error.status == 413 else "rejected_malformed")

    def settled(self) -> defer.Deferred:
        """Fires once every outcome recording started so far has finished."""
        return defer.DeferredList(list(self.recording), consumeErrors=True)

    # --- a delivery ---

    async def receive(self, app: Any, processor: str, request: Request) -> tuple[int, str, bytes]:
        """``(status, content type, body)`` of the acknowledgement, or raises the ApiError to answer;
        observed in ``payflux_request_duration_seconds{endpoint="webhook_<processor>"}``."""
        started = self.seconds()
        try:
            ack = await self._receive(app, processor, request)
        except ApiError as e:
            app._observe(f"webhook_{processor}", e.status, started)
            raise
        app._observe(f"webhook_{processor}", ack[0], started)
        return ack

    async def _receive(self, app: Any, processor: str, request: Request) -> tuple[int, str, bytes]:
        hook = self.hooks[processor]
        if app.draining:
            self._count(processor, "unavailable")
            raise unavailable("draining", "node is shutting down; retry on another node", 1)
        body = request.content.read() if request.content is not None else b""
        result = hook.handle(request_headers(request), body, self.seconds())
        if result.status == REJECTED:
            error = result.error
            kind = ("too_large" if error.http_status == 413 else
                    "rejected_signature" if error.code in SIGNATURE_CODES else "rejected_malformed")
            self._count(processor, kind)
            raise ApiError(error.http_status, error.code, error.message)
        for ignored in result.ignored:
            self.metrics.count_webhook_event(processor, ignored.type, ignored.reason)

        prepared, invalid = app.prepare_each(result.events)
        for n, details in invalid:
            event_type = result.events[n].get("event_type", "<other>")
            self.metrics.count_webhook_event(processor, event_type, "invalid")
            repeated("webhook event refused", log).warn(
                "{processor} webhook: a mapped {event_type} event was refused by the event validator "
                "({problems}); acknowledged, not written", processor=processor, event_type=event_type,
                problems=", ".join(f"{d.get('field')}:{d.get('code')}" for d in details))
        outcomes = await self._append(app, processor, prepared)
        new = {event_id for event_id, outcome in outcomes.items() if outcome == "accepted"}
        by_id = {p.event_id: p.event_type for p in prepared}
        for event_id, outcome in outcomes.items():
            self.metrics.count_webhook_event(processor, by_id[event_id], outcome)
        for kind in ("accepted", "duplicate", "conflict"):
            if kind in outcomes.values():
                break
        else:
            kind = "invalid_event" if invalid else "ignored"
        self._count(processor, kind)
        for signal in result.signals:
            if signal.event_id in new:
                self._record_later(signal)
        return result.ack()

    async def _append(self, app: Any, processor: str, prepared: list) -> dict[str, str]:
        """Append ``prepared`` (one call); each event_id's outcome: accepted, duplicate or conflict."""
        if not prepared:
            return {}
        key_id, endpoint = f"webhook:{processor}", None  # receive() observes the whole request
        try:
            return await self._append_once(app, key_id, endpoint, prepared)
        except ApiError as e:
            if e.status == 503:
                self._count(processor, "unavailable")
            if e.status != 409:
                raise
        # An event_id stored with another payload fails its whole append: take the others one by one.
        outcomes: dict[str, str] = {}
        for p in prepared:
            try:
                outcomes.update(await self._append_once(app, key_id, endpoint, [p]))
            except ApiError as e:
                if e.status != 409:
                    if e.status == 503:
                        self._count(processor, "unavailable")
                    raise
                outcomes[p.event_id] = "conflict"
                repeated("webhook event conflict", log).warn(
                    "{processor} webhook: a {event_type} event's event_id is stored with a different payload "
                    "(id_hash_key or the mapping changed?); acknowledged, not written",
                    processor=processor, event_type=p.event_type)
        return outcomes

    @staticmethod
    async def _append_once(app: Any, key_id: str, endpoint: str | None, prepared: list) -> dict[str, str]:
        results = await app._append(key_id, prepared, [], True, endpoint, app.seconds(), answer=False)
        return {p.event_id: "duplicate" if r.duplicate else "accepted" for p, r in zip(prepared, results)}

    def _count(self, processor: str, result: str) -> None:
        self.metrics.webhook_requests.labels(processor, result).inc()

    # --- outcome signals ---

    def _record_later(self, signal: OutcomeSignal) -> None:
        d = defer.ensureDeferred(self._record(signal))
        d.addErrback(self._record_failed, signal)
        if not d.called:
            self.recording.add(d)
            d.addBoth(lambda _: self.recording.discard(d))

    def _record_failed(self, failure: Any, signal: OutcomeSignal) -> None:
        self.metrics.webhook_outcome_failures.labels(signal.processor).inc()
        e = failure.value
        if isinstance(e, ApiError):
            reason = f"the outcome was refused ({e.message})"
        elif is_outage(e) or isinstance(e, defer.TimeoutError):
            reason = "Redis is unavailable"
        else:
            reason = type(e).__name__
        repeated("webhook outcome failed", log).warn(
            "{processor} webhook: could not record an outcome signal on open alerts: {reason}; "
            "the delivery was acknowledged", processor=signal.processor, reason=reason)

    async def _record(self, signal: OutcomeSignal) -> None:
        if self.alerts is None:
            raise RuntimeError("no alert store")
        fields = check_outcome(signal.outcome(), self.seconds())
        failed = 0
        for doc in await self._open_alerts(signal):
            outcome = {**stored_outcome(fields, doc["opened_at_ms"], self.alerts.now_ms()),
                       "event_id": signal.event_id}
            try:
                stored = await self._redis(self.alerts.record_outcome(doc["alert_id"], outcome))
            except AlertFull:
                failed += 1
                continue
            if stored:
                self.metrics.webhook_outcomes.labels(signal.processor).inc()
                self.metrics.observe_outcome(doc["type"], outcome["outcome_type"], outcome["lead_time_seconds"])
        if failed:
            raise AlertFull(f"{failed} alert(s) hold the most outcomes they can")

    async def _open_alerts(self, signal: OutcomeSignal) -> list[dict]:
        """The open alerts of the signal's processor and of its merchant, each once."""
        queries = [AlertQuery(state="open", processor=signal.processor, limit=ALERT_PAGE)]
        if signal.merchant_id_hash:
            queries.append(AlertQuery(state="open", merchant=signal.merchant_id_hash, limit=ALERT_PAGE))
        found: dict[str, dict] = {}
        for query in queries:
            cursor = None
            while len(found) < MAX_ALERTS_PER_SIGNAL:
                docs, next_cursor = await self._redis(self.alerts.list(query, cursor))
                for doc in docs:
                    found.setdefault(doc["alert_id"], doc)
                if next_cursor is None:
                    break
                cursor = decode_cursor(next_cursor)
        return list(found.values())[:MAX_ALERTS_PER_SIGNAL]

    async def _redis(self, d: defer.Deferred) -> Any:
        if self.reactor is not None:
            d.addTimeout(self.timeout, self.reactor)
        return await d
