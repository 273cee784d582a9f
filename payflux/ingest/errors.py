"""
The one error type of the HTTP layer.

Every rejection is an :class:`ApiError` carrying its status code, a stable machine-readable
``code``, a human ``message`` and optional field-level ``details``; the app turns it into the
JSON body ``{"error": code, "message": ..., "details": [...]}`` in exactly one place.  Messages
and details never contain request values (a rejected value may be a card number).

:data:`ERROR_CODES` is the registry of every ``error`` code PayFlux answers with, on either
listener: the OpenAPI document's ``ErrorCode`` enum, so a generated client can parse ``error``
into an enumeration.  ``tests/test_error_codes.py`` scans payflux/ for every code that can reach
an answer and fails on one missing here, on one listed here that nothing sends, and on a new call
site that passes a code through a variable until that site is reviewed.
"""

from __future__ import annotations

import json

import attrs

#: Every ``error`` code of an answer, with its status and where it comes from.  Grouped by the
#: code that sends it; a code may be sent from more than one place (the first one is named).
ERROR_CODES: dict[str, str] = {
    # the ingest listener's HTTP layer, before any route (payflux/ingest/http.py, fastpath.py)
    "bad_request": "400: a malformed request line or header line",
    "bad_content_length": "400: Content-Length not a decimal number, or given twice",
    "bad_transfer_encoding": "400: a Transfer-Encoding other than chunked, or given twice",
    "bad_framing": "400: both Content-Length and Transfer-Encoding",
    "bad_chunk": "400: a malformed chunked body",
    "request_timeout": "408: the request head was not complete within header_timeout",
    "payload_too_large": "413: the body is over the path's cap (checked while reading; the alerts API too)",
    "uri_too_long": "414: the request line is over 16 KiB",
    "headers_too_large": "431: the headers are over 16 KiB or 500 fields",
    # routing, on both listeners (payflux/ingest/app.py, side.py)
    "not_found": "404: no such endpoint (a webhook route that is off, /metrics without ingest_metrics), "
                 "or no such alert",
    "method_not_allowed": "405: the path takes other methods (Allow lists them)",
    "internal": "500: an unexpected failure on the ingest listener (logged)",
    # the ingest endpoints (payflux/ingest/app.py, auth.py, ratelimit.py)
    "unauthorized": "401: a missing, malformed, unknown or revoked key, or a key in the query string "
                    "(the alerts API's admin keys too)",
    "duplicate_authorization": "400: more than one Authorization header",
    "rate_limited": "429: the key's event rate is spent (Retry-After)",
    "unsupported_media_type": "415: a Content-Type the endpoint does not take (the alerts API too)",
    "malformed_json": "400: the body is not strict JSON / NDJSON (the alerts API and the webhooks too)",
    "invalid_event": "422: an event breaks the schema (details name each field); a webhook's 400: "
                     "not an event of the processor",
    "too_many_events": "422: a batch over max_batch_events",
    "conflict": "409: an event_id already stored with a different payload",
    "draining": "503: the node is shutting down (Retry-After; the webhooks too)",
    "overloaded": "503: too many events in flight to Redis (Retry-After; the webhooks too)",
    "redis_unavailable": "503: Redis unavailable or slow; nothing was written (Retry-After; every API)",
    "replicas_not_acked": "503: written on the primary, not acknowledged by min_replicas_ack replicas "
                          "in time (Retry-After)",
    # the alerts API on the side listener (payflux/ingest/alerts.py, auth.py)
    "forbidden": "403: a producer key where an admin key is needed",
    "invalid_request": "400: a bad query parameter (details name each)",
    "invalid_outcome": "422: an outcome breaks its rules (details name each field)",
    "too_many_outcomes": "409: the alert holds the most outcomes it can (100)",
    "internal_error": "500: an unexpected failure of the alerts API (logged)",
    # the processor webhooks (payflux/webhooks/stripe.py, adyen.py; answered by payflux/ingest/webhooks.py)
    "missing_signature": "401: no Stripe-Signature header / an Adyen item without hmacSignature",
    "signature_mismatch": "401: no configured secret matches the signature",
    "stale_timestamp": "401: Stripe's signed t is too far from the node's clock",
    "malformed_signature": "400: a Stripe-Signature header that is not t=...,v1=...",
    "no_v1_signature": "400: a Stripe-Signature header without a v1 signature",
    "malformed_notification": "400: the body is not an Adyen notification",
    "body_too_large": "413: the webhook handler's own body cap (the HTTP layer's payload_too_large "
                      "normally answers first)",
}


@attrs.define
class ApiError(Exception):
    status: int
    code: str
    message: str
    details: list = attrs.field(factory=list)
    headers: dict = attrs.field(factory=dict)

    def body(self) -> bytes:
        doc: dict = {"error": self.code, "message": self.message}
        if self.details:
            doc["details"] = self.details
        return json.dumps(doc, separators=(",", ":")).encode("utf-8")

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.message}"


def unauthorized(message: str) -> ApiError:
    return ApiError(401, "unauthorized", message, headers={"WWW-Authenticate": 'Bearer realm="payflux"'})


def rate_limited(retry_after: int) -> ApiError:
    return ApiError(
        429,
        "rate_limited",
        "per-key event rate exceeded; retry later",
        headers={"Retry-After": str(retry_after)},
    )


def too_large(limit: int) -> ApiError:
    return ApiError(413, "payload_too_large", f"request body exceeds {limit} bytes")


def unavailable(code: str, message: str, retry_after: int) -> ApiError:
    return ApiError(503, code, message, headers={"Retry-After": str(retry_after)})
