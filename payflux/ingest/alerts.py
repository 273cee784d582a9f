"""
The alerts API on the side listener (docs/risk.md, "Alerts API"): the alert store
(:mod:`payflux.risk.store`) for operators, with an admin key (:class:`AdminAuthenticator`).

- ``GET /v1/alerts``: filters ``state``, ``type``, ``processor``, ``merchant``, ``since``,
  ``limit``; newest first; ``cursor`` paging (``next_cursor``).
- ``GET /v1/alerts/{alert_id}``: one alert with its transitions and outcomes.
- ``POST /v1/alerts/{alert_id}/outcome``: what the processor did after the alert (throttle,
  review, ...), stored on the alert with its lead time (``observed_at - opened_at``), observed in
  ``payflux_alert_outcome_lead_time_seconds``.
- ``GET /v1/risk/processors`` and ``GET /v1/risk/retry-advice?processor=&failure_category=``:
  processor health and retry advice from the risk consumer's latest snapshot
  (:func:`payflux.risk.health.processors_answer`, :func:`payflux.risk.health.retry_advice`).

An alert_id holds ``:``, ``,`` and ``=`` (and ``%`` from its key's escaping): it is taken from
the raw request path and percent-decoded once, so any id can be sent percent-encoded.

Checks, in order: 401/403 (key) -> 404 (route) -> 413 (body cap) -> 415 (content type) -> 400
(malformed JSON, bad query parameter) -> 422 (outcome fields) -> 404 (no such alert) -> 503
(Redis unavailable, ``Retry-After``).  Every error is the house JSON body
(:class:`payflux.ingest.errors.ApiError`); an unexpected failure is a logged 500, never a
traceback in the answer.
"""

from __future__ import annotations

from typing import Any, Callable
from urllib.parse import unquote

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.server import Request

from payflux.ingest.app import json_response, media_type
from payflux.ingest.auth import AdminAuthenticator
from payflux.ingest.errors import ApiError, too_large, unavailable
from payflux.ingest.http import OUTCOME_BODY_LIMIT
from payflux.jsonbody import MalformedJSON, decode_event_body
from payflux.observability.metrics import Metrics
from payflux.pan import contains_pan
from payflux.redis.replies import is_outage
from payflux.risk.alerts import ALERT_TYPES, iso_ms
from payflux.risk.health import processors_answer, retry_advice
from payflux.risk.store import (OUTCOME_TYPES, SOURCES, STATES, AlertFull, AlertQuery, AlertStore, decode_cursor,
                                rfc3339_ms)

log = Logger()

PREFIX = b"/v1/alerts"
MAX_LIMIT = 500
DEFAULT_LIMIT = 50
#: Bytes an outcome body may have.
MAX_OUTCOME_BYTES = OUTCOME_BODY_LIMIT
MAX_NOTES = 1000
MAX_FILTER = 256
#: Seconds an outcome's observed_at may lie ahead of the node's clock.
FUTURE_SKEW = 300.0
QUERY_FIELDS = ("state", "type", "processor", "merchant", "since", "limit", "cursor")
ADVICE_FIELDS = ("processor", "failure_category")
OUTCOME_FIELDS = ("outcome_type", "observed_at", "source", "notes")


def _detail(field: str, code: str, message: str) -> dict:
    return {"field": field, "code": code, "message": message}


def _bad_request(details: list[dict]) -> ApiError:
    return ApiError(400, "invalid_request", "bad query parameter: " + ", ".join(d["field"] for d in details),
                    details=details)


def _not_found(alert_id: str | None = None) -> ApiError:
    return ApiError(404, "not_found", "no such alert (unknown, or past alerts_retention_days)"
                    if alert_id is not None else "no such resource")


def query_values(args: dict, accepted: tuple[str, ...], endpoint: str) -> tuple[dict[str, str], list[dict]]:
    """``request.args`` as one text value per ``accepted`` parameter, and a detail for each that is
    unknown, repeated or not UTF-8 (the caller checks the values and raises the 400)."""
    details = []
    values: dict[str, str] = {}
    for raw, given in args.items():
        name = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
        if name not in accepted:
            details.append(_detail(name if len(name) <= 64 else name[:64], "unknown_field",
                                   f"is not a parameter of {endpoint} ({', '.join(accepted)})"))
        elif len(given) != 1:
            details.append(_detail(name, "duplicate_field", "must be given once"))
        else:
            try:
                values[name] = given[0].decode("utf-8") if isinstance(given[0], bytes) else str(given[0])
            except UnicodeDecodeError:
                details.append(_detail(name, "format", "must be UTF-8"))
    return values, details


def parse_query(args: dict) -> tuple[AlertQuery, tuple[int, str] | None]:
    """The listing's filters from ``request.args``; a 400 ApiError naming every bad field."""
    values, details = query_values(args, QUERY_FIELDS, "GET /v1/alerts")
    query: dict[str, Any] = {}
    if "state" in values:
        if values["state"] not in STATES:
            details.append(_detail("state", "invalid_value", f"must be one of {', '.join(STATES)}"))
        query["state"] = values["state"]
    if "type" in values:
        if values["type"] not in ALERT_TYPES:
            details.append(_detail("type", "invalid_value", f"must be one of {', '.join(ALERT_TYPES)}"))
        query["type"] = values["type"]
    for name in ("processor", "merchant"):
        if name in values:
            if not values[name] or len(values[name]) > MAX_FILTER:
                details.append(_detail(name, "format", f"must be 1 to {MAX_FILTER} characters"))
            query[name] = values[name]
    if "since" in values:
        text = values["since"]
        if text.isascii() and text.isdigit() and len(text) <= 15:
            query["since_ms"] = int(text)
        else:
            try:
                query["since_ms"] = rfc3339_ms(text)
            except ValueError:
                details.append(_detail("since", "format", "must be an RFC 3339 timestamp with offset "
                                                          "(2026-01-06T00:00:00Z) or Unix milliseconds"))
    if "limit" in values:
        text = values["limit"]
        if not (text.isascii() and text.isdigit() and len(text) <= 3 and 1 <= int(text) <= MAX_LIMIT):
            details.append(_detail("limit", "out_of_range", f"must be an integer from 1 to {MAX_LIMIT}"))
        else:
            query["limit"] = int(text)
    cursor = None
    if "cursor" in values:
        try:
            cursor = decode_cursor(values["cursor"])
        except ValueError:
            details.append(_detail("cursor", "format", "must be a next_cursor of an earlier answer"))
    if details:
        raise _bad_request(details)
    return AlertQuery(**query), cursor


def parse_advice_query(args: dict) -> tuple[str, str]:
    """``processor`` and ``failure_category`` of a retry-advice request; a 400 naming every bad field."""
    values, details = query_values(args, ADVICE_FIELDS, "GET /v1/risk/retry-advice")
    for name in ADVICE_FIELDS:
        if name in values:
            if not values[name] or len(values[name]) > MAX_FILTER:
                details.append(_detail(name, "format", f"must be 1 to {MAX_FILTER} characters"))
        elif not any(d["field"] == name for d in details):
            details.append(_detail(name, "required", "is required"))
    if details:
        raise _bad_request(details)
    return values["processor"], values["failure_category"]


def parse_outcome(body: bytes, now: float) -> dict:
    """The outcome request's fields, checked: 400 for malformed JSON, 422 naming each bad field."""
    try:
        doc = decode_event_body(body)
    except MalformedJSON as e:
        raise ApiError(400, "malformed_json", str(e)) from None
    return check_outcome(doc, now)


def check_outcome(doc: Any, now: float) -> dict:
    """An outcome document's fields, checked by the rules of the outcome API (422 naming each bad
    field): the API's body once decoded, and a processor webhook's outcome signal alike."""
    if not isinstance(doc, dict):
        raise ApiError(422, "invalid_outcome", "the body must be a JSON object",
                       details=[_detail("(body)", "type", "must be a JSON object")])
    details = []
    for name in doc:
        if name not in OUTCOME_FIELDS:
            label = name if len(name) <= 64 and name.isprintable() else "(unknown field)"
            details.append(_detail(label, "unknown_field", f"is not a field of an outcome ({', '.join(OUTCOME_FIELDS)})"))
    out: dict[str, Any] = {}

    def choice(name: str, accepted: tuple[str, ...], default: str | None) -> None:
        value = doc.get(name, default)
        if value is None:
            details.append(_detail(name, "required", "is required"))
        elif not isinstance(value, str):
            details.append(_detail(name, "type", "must be a string"))
        elif value not in accepted:
            details.append(_detail(name, "invalid_value", f"must be one of {', '.join(accepted)}"))
        else:
            out[name] = value

    choice("outcome_type", OUTCOME_TYPES, None)
    observed = doc.get("observed_at")
    if observed is None:
        details.append(_detail("observed_at", "required", "is required"))
    elif not isinstance(observed, str):
        details.append(_detail("observed_at", "type", "must be a string"))
    else:
        try:
            ms = rfc3339_ms(observed)
        except ValueError as e:
            details.append(_detail("observed_at", "format", str(e)))
        else:
            if ms / 1000 - now > FUTURE_SKEW:
                details.append(_detail("observed_at", "future_timestamp",
                                       f"must not be more than {FUTURE_SKEW:g} seconds in the future"))
            out["observed_at_ms"] = ms
    choice("source", SOURCES, "manual")
    notes = doc.get("notes")
    if notes is not None:
        if not isinstance(notes, str):
            details.append(_detail("notes", "type", "must be a string"))
        elif len(notes) > MAX_NOTES:
            details.append(_detail("notes", "too_long", f"must be at most {MAX_NOTES} characters"))
        elif contains_pan(notes):  # the PAN guard of events applies to what operators write too
            details.append(_detail("notes", "pan_detected", "looks like a card number (docs/events.md, PAN guard); "
                                                            "never write card numbers into notes"))
        else:
            out["notes"] = notes
    if details:
        raise ApiError(422, "invalid_outcome", "invalid outcome: " + ", ".join(d["field"] for d in details),
                       details=details)
    return out


def stored_outcome(fields: dict, opened_at_ms: int, recorded_ms: int) -> dict:
    """What an alert stores of checked outcome ``fields`` (:func:`check_outcome`): its lead time
    is ``observed_at - opened_at`` in seconds (negative: the processor acted first)."""
    observed_ms = fields["observed_at_ms"]
    return {
        "outcome_type": fields["outcome_type"],
        "observed_at": iso_ms(observed_ms),
        "source": fields["source"],
        **({"notes": fields["notes"]} if "notes" in fields else {}),
        "recorded_at": iso_ms(recorded_ms),
        "lead_time_seconds": round((observed_ms - opened_at_ms) / 1000, 3),
    }


def alert_id_of(path: bytes, suffix: bytes = b"") -> str | None:
    """The percent-decoded alert_id of ``/v1/alerts/<id><suffix>`` (raw path), or None."""
    if not path.startswith(PREFIX + b"/") or not path.endswith(suffix):
        return None
    raw = path[len(PREFIX) + 1:len(path) - len(suffix)]
    if not raw or b"/" in raw:
        return None
    try:
        alert_id = unquote(raw.decode("ascii"), errors="strict")
    except UnicodeDecodeError:
        return None
    return alert_id if 0 < len(alert_id) <= 2048 else None


class AlertsApi:
    """The three endpoints, for :class:`payflux.ingest.side.SideApp` and ``WorkersSideApp`` to route to."""

    def __init__(self, store: AlertStore, authenticator: AdminAuthenticator, metrics: Metrics,
                 seconds: Callable[[], float], timeout: float = 2.0, reactor: Any = None) -> None:
        self.store = store
        self.authenticator = authenticator
        self.metrics = metrics
        self.seconds = seconds
        self.timeout = timeout
        self.reactor = reactor

    # --- the endpoints ---

    def list(self, request: Request) -> defer.Deferred:
        async def answer() -> bytes:
            self._auth(request)
            query, cursor = parse_query(request.args)
            alerts, next_cursor = await self._redis(self.store.list(query, cursor))
            return json_response(request, 200, {"alerts": alerts, "next_cursor": next_cursor})

        return self._run(request, answer)

    def get(self, request: Request) -> defer.Deferred:
        async def answer() -> bytes:
            self._auth(request)
            alert_id = alert_id_of(request.path)
            if alert_id is None:
                raise _not_found()
            doc = await self._redis(self.store.get(alert_id))
            if doc is None:
                raise _not_found(alert_id)
            return json_response(request, 200, doc)

        return self._run(request, answer)

    def post(self, request: Request) -> defer.Deferred:
        async def answer() -> bytes:
            self._auth(request)
            alert_id = alert_id_of(request.path, b"/outcome")
            if alert_id is None:
                raise _not_found()
            length = request.getHeader(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > MAX_OUTCOME_BYTES):
                raise too_large(MAX_OUTCOME_BYTES)
            body = request.content.read(MAX_OUTCOME_BYTES + 1) if request.content is not None else b""
            if len(body) > MAX_OUTCOME_BYTES:
                raise too_large(MAX_OUTCOME_BYTES)
            if media_type(request.getHeader(b"content-type")) != "application/json":
                raise ApiError(415, "unsupported_media_type", "Content-Type must be application/json")
            fields = parse_outcome(body, self.seconds())
            doc = await self._redis(self.store.get(alert_id))
            if doc is None:
                raise _not_found(alert_id)
            lead = (fields["observed_at_ms"] - doc["opened_at_ms"]) / 1000
            outcome = stored_outcome(fields, doc["opened_at_ms"], self.store.now_ms())
            try:
                stored = await self._redis(self.store.record_outcome(alert_id, outcome))
            except AlertFull:
                raise ApiError(409, "too_many_outcomes", "this alert holds the most outcomes it can "
                                                         "(100)") from None
            if not stored:  # expired between the read and the write
                raise _not_found(alert_id)
            self.metrics.observe_outcome(doc["type"], outcome["outcome_type"], lead)
            return json_response(request, 201, {"alert_id": alert_id, **outcome})

        return self._run(request, answer)

    def processors(self, request: Request) -> defer.Deferred:
        async def answer() -> bytes:
            self._auth(request)
            if request.args:
                names = sorted(k.decode("utf-8", "replace") if isinstance(k, bytes) else str(k) for k in request.args)
                raise _bad_request([_detail(n[:64], "unknown_field", "GET /v1/risk/processors takes no parameters")
                                    for n in names])
            return json_response(request, 200, processors_answer(await self._redis(self.store.health())))

        return self._run(request, answer)

    def retry_advice(self, request: Request) -> defer.Deferred:
        async def answer() -> bytes:
            self._auth(request)
            processor, category = parse_advice_query(request.args)
            snapshot = await self._redis(self.store.health())
            advice = retry_advice(snapshot, processor, category)
            return json_response(request, 200, {**advice, "as_of": snapshot.get("as_of") if snapshot else None})

        return self._run(request, answer)

    # --- plumbing ---

    def _auth(self, request: Request) -> str:
        return self.authenticator.authenticate(request.getHeader(b"authorization"), request.args)

    async def _redis(self, d: defer.Deferred) -> Any:
        if self.reactor is not None:
            d.addTimeout(self.timeout, self.reactor)
        try:
            return await d
        except (ApiError, AlertFull):
            raise
        except Exception as e:  # noqa: BLE001 - an outage is a 503, anything else a logged 500
            if is_outage(e) or isinstance(e, defer.TimeoutError):
                raise unavailable("redis_unavailable", "Redis is unavailable; retry later", 1) from None
            raise

    def _run(self, request: Request, answer: Callable[[], Any]) -> defer.Deferred:
        async def run() -> bytes:
            try:
                return await answer()
            except ApiError as e:
                for name, value in e.headers.items():
                    request.setHeader(name.encode("ascii"), value.encode("ascii"))
                request.setResponseCode(e.status)
                request.setHeader(b"Content-Type", b"application/json")
                return e.body()
            except Exception:  # noqa: BLE001 - logged; the caller gets JSON, never a traceback
                log.failure("alerts API: {method} {path} failed", method=request.method.decode("ascii", "replace"),
                            path=request.path[:200].decode("ascii", "replace"))
                request.setResponseCode(500)
                request.setHeader(b"Content-Type", b"application/json")
                return ApiError(500, "internal_error", "the request failed; see the node's log").body()

        return defer.ensureDeferred(run())
