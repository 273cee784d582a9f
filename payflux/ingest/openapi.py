"""
The OpenAPI 3.0 document served at ``/openapi.json``.

It is written by hand to say exactly what the app does; ``tests/test_openapi.py`` checks it
against the validator's field rules and the app's real responses, ``tests/test_generated_client.py``
against a client generated from it.  The alerts API of the side listener and the risk feeds'
schemas are in :mod:`payflux.ingest.openapi_risk`, the processor webhook routes in
:mod:`payflux.ingest.openapi_webhooks`.

Every operation has a stable ``operationId`` (a generated client's function names: renaming one
breaks its callers) and one tag; every status it can be answered with is listed, the ingest
listener's HTTP-layer answers included (:func:`listener_errors`); the ``error`` of every error
body is the ``ErrorCode`` enum, :data:`payflux.ingest.errors.ERROR_CODES`.
"""

from __future__ import annotations

from typing import Any

from payflux.config import OPTIONS
from payflux.events import ALIASES, CASE_FOLDED, FIELDS, INT_FIELDS, REQUIRED, SCHEMA_VERSION, STRING_FIELDS
from payflux.ingest import openapi_risk, openapi_webhooks
from payflux.ingest.errors import ERROR_CODES
from payflux.ingest.http import OUTCOME_BODY_LIMIT, SMALL_BODY_LIMIT, IngestChannel

# RFC 3339 with offset, the shape payflux.events checks (it also checks the calendar and range).
TIMESTAMP_PATTERN = (r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?"
                     r"([Zz]|[+-][0-9]{2}:[0-9]{2})")

# The seed's example event with a real UUID (docs/sample-event.json holds the same).
EXAMPLE_EVENT = {
    "event_type": "payment_failed",
    "event_timestamp": "2026-01-06T00:00:00Z",
    "event_id": "5b0c2f9e-3a4d-4e7b-9c1a-2f6d8e0b7a41",
    "merchant_id_hash": "abc123",
    "payment_intent_id_hash": "xyz456",
    "processor": "stripe",
    "failure_category": "processor_timeout",
    "retry_count": 0,
    "geo_bucket": "US",
    "amount_bucket": "50-200",
    "system_source": "checkout_api",
    "payment_method_bucket": "credit_card",
    "channel": "web",
    "retry_result": "failed",
    "failure_origin": "processor",
}


def _event_schema() -> dict[str, Any]:
    """The event schema, built from the validator's own field tables so the two can't drift."""
    properties: dict[str, Any] = {}
    for name in FIELDS:
        if name in STRING_FIELDS:
            _, regex, _, rule = STRING_FIELDS[name]
            if name in CASE_FOLDED:  # the pattern is checked after folding; any case is accepted
                regex = regex.replace("a-z", "A-Za-z").replace("[A-Z]", "[A-Za-z]")
            prop = {"type": "string", "pattern": f"^{regex}$", "description": rule}
        elif name in INT_FIELDS:
            low, high = INT_FIELDS[name]
            prop = {"type": "integer", "minimum": low, "maximum": high}
            if name == "retry_count":
                prop["default"] = 0
        else:  # event_timestamp
            prop = {
                "type": "string",
                "format": "date-time",
                "description": "RFC 3339 with offset; at most future_skew seconds ahead of the server clock; "
                "stored as UTC with milliseconds.",
            }
        if name not in REQUIRED:
            prop["nullable"] = True
            if "pattern" in prop:  # "" means absent, as in the Go PayFlux
                prop["pattern"] = f"^(?:|{prop['pattern'][1:-1]})$"
        properties[name] = prop
    for alias, name in ALIASES.items():
        prop = {**properties[name], "nullable": True, "deprecated": True,
                "description": f"Deprecated name of {name} (stored as {name}); null or \"\" = absent."}
        if prop.pop("format", None) == "date-time":  # optional here, so "" must pass too
            prop["pattern"] = f"^(?:|{TIMESTAMP_PATTERN})$"
        properties[alias] = prop
    properties["event_id"]["description"] = "Idempotency key, e.g. a UUID."
    return {
        "type": "object",
        "additionalProperties": True,
        "required": list(REQUIRED),
        "description": (
            f"A payment_exhaust event (schema version {SCHEMA_VERSION}): the Go PayFlux seed's event "
            "with its 15 field names, plus optional customer_id_hash, currency, failure_code and "
            "processor_latency_ms. Hashes and buckets only: any string holding a card number is "
            "rejected (pan_detected; see docs/events.md). Optional fields sent as null or \"\" count "
            "as absent. Unknown fields are accepted, never stored, and listed in ignored_fields "
            "(unknown_fields = \"reject\" answers 422 instead)."
        ),
        "properties": properties,
        "example": EXAMPLE_EVENT,
    }


EVENT_SCHEMA = _event_schema()

ERROR_CODE_SCHEMA = {
    "type": "string",
    "enum": list(ERROR_CODES),
    "description": "What went wrong, machine-readable and stable; every code either listener sends "
                   "(payflux/ingest/errors.py, ERROR_CODES, says which status and where). A new code is "
                   "a new version of this document.",
}

ERROR_SCHEMA = {
    "type": "object",
    "required": ["error", "message"],
    "description": "Every error answer's body. message is for people (it never quotes a request value).",
    "properties": {
        "error": {"$ref": "#/components/schemas/ErrorCode"},
        "message": {"type": "string"},
        "details": {
            "type": "array",
            "description": "Field-level problems (422, and the alerts API's 400), each one listed.",
            "items": {
                "type": "object",
                "properties": {
                    "line": {"type": "integer", "description": "1-based event position in a batch."},
                    "field": {"type": "string"},
                    "code": {"type": "string", "description": "The field's problem, e.g. required, format, "
                                                              "type, out_of_range, pan_detected: a free string, "
                                                              "not an enum (new field checks may add codes)."},
                    "message": {"type": "string"},
                    "event_id": {"type": "string"},
                },
            },
        },
    },
}

#: The ingest listener's default address (config.py's ``listen`` default, every interface).
INGEST_PORT = next(o.default for o in OPTIONS if o.name == "listen").rsplit(":", 1)[1]
SERVERS = [{"url": f"http://localhost:{INGEST_PORT}",
            "description": "the ingest listener (listen, default tcp:%s on every interface)" % INGEST_PORT}]

TAGS = [
    {"name": "ingest", "description": "Producers append payment_exhaust events (an api_keys key)."},
    {"name": "webhooks", "description": "Stripe and Adyen deliver their webhooks (signed by the processor, "
                                        "no key); on only when their secret is configured."},
    {"name": "alerts", "description": "Operators read alerts and record outcomes (side listener, admin key)."},
    {"name": "risk", "description": "Processor health and retry advice (side listener, admin key)."},
    {"name": "operations", "description": "Liveness, readiness, metrics and this document (no key)."},
]


def _error(description: str, retry_after: bool = False) -> dict:
    response: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }
    if retry_after:
        response["headers"] = {"Retry-After": {"schema": {"type": "integer"}, "description": "Seconds to wait."}}
    return response


HEAD_400 = ("A malformed request head or chunked body: bad_request (request line, header line), "
            "bad_content_length (not a number, twice), bad_transfer_encoding (not chunked, twice), bad_framing "
            "(Content-Length with Transfer-Encoding), bad_chunk.")


def listener_errors(cap: str, head_400: str = HEAD_400) -> dict:
    """
    What any request on the ingest listener can be answered by its HTTP layer before (or beside)
    its route (payflux/ingest/http.py, docs/security.md): a bad head (400), a head too slow (408),
    too long (414) or too large (431), a body over ``cap`` (413); and the route-independent 500.
    Each ends the connection, except the 500.
    """
    return {
        "400": _error(head_400),
        "408": _error("request_timeout: the request head was not complete within header_timeout seconds of its "
                      "first byte."),
        "413": _error(f"payload_too_large: body larger than {cap} (checked while reading)."),
        "414": _error(f"uri_too_long: request line longer than {IngestChannel.MAX_LENGTH} bytes."),
        "431": _error(f"headers_too_large: headers over {IngestChannel.totalHeadersSize} bytes or "
                      f"{IngestChannel.maxHeaders} fields."),
        "500": _error("internal: an unexpected failure (logged; the answer never carries a traceback)."),
    }


def responses(*groups: dict) -> dict:
    """``groups`` merged (a later group's status wins), in status order."""
    merged: dict = {}
    for group in groups:
        merged.update(group)
    return dict(sorted(merged.items()))


def _on_ingest_listener(paths: dict) -> dict:
    """``paths`` (their own answers win) with the ingest listener's HTTP-layer answers added."""
    return {path: {method: {**operation, "responses": responses(listener_errors("the path's cap"),
                                                                operation["responses"])}
                   for method, operation in item.items()}
            for path, item in paths.items()}


def _on_side_listener(paths: dict) -> dict:
    """The side listener's ``paths`` with the answers of its HTTP layer, the ingest listener's
    (``side_site``): a body over the outcome's 16384 bytes, or 8192 elsewhere."""
    return {path: {method: {**operation, "responses": responses(
                listener_errors(f"{OUTCOME_BODY_LIMIT} bytes" if method == "post" else f"{SMALL_BODY_LIMIT} bytes"),
                operation["responses"])}
                   for method, operation in item.items()}
            for path, item in paths.items()}


def _ingest_errors(cap: str) -> dict:
    return responses(listener_errors(cap, HEAD_400[:-1] + "; malformed_json: the body is not strict JSON (invalid "
                                     "UTF-8, duplicate keys, NaN, too deep, a bad NDJSON line); "
                                     "duplicate_authorization: two Authorization headers."), {
        "401": _error("unauthorized: missing, unknown or revoked API key, or a key in the query string."),
        "409": _error("conflict: event_id already used with a different payload; nothing was written."),
        "415": _error("unsupported_media_type: unsupported Content-Type."),
        "422": _error("invalid_event: schema violation, details list every bad field (and line, for batches); "
                      "too_many_events: a batch over max_batch_events."),
        "429": _error("rate_limited: per-key event rate exceeded.", retry_after=True),
        "503": _error("draining, overloaded, redis_unavailable or replicas_not_acked: nothing was acknowledged; "
                      "retry (with the same event_id) after Retry-After.", retry_after=True),
    })


IGNORED_FIELDS = {
    "type": "array",
    "items": {"type": "string"},
    "description": "Unknown fields that were dropped (not stored); absent when there were none.",
}


def openapi_document(limits) -> dict:
    single_ok = {
        "type": "object",
        "required": ["status", "id", "duplicate"],
        "properties": {
            "status": {"type": "string", "enum": ["accepted"]},
            "id": {"type": "string", "description": "Redis stream entry id."},
            "duplicate": {"type": "boolean"},
            "ignored_fields": IGNORED_FIELDS,
        },
    }
    batch_result = {
        "type": "object",
        "required": ["id", "duplicate"],
        "properties": {
            "id": {"type": "string", "description": "Redis stream entry id (the original one for a duplicate)."},
            "duplicate": {"type": "boolean"},
        },
    }
    batch_ok = {
        "type": "object",
        "required": ["status", "count", "accepted", "duplicates", "results"],
        "properties": {
            "status": {"type": "string", "enum": ["accepted"]},
            "count": {"type": "integer"},
            "accepted": {"type": "integer"},
            "duplicates": {"type": "integer"},
            "results": {"type": "array", "items": {"$ref": "#/components/schemas/BatchResult"}},
            "ignored_fields": IGNORED_FIELDS,
        },
    }
    status_doc = {"type": "object", "properties": {"status": {"type": "string"}, "message": {"type": "string"}}}
    small = f"{SMALL_BODY_LIMIT} bytes"
    return {
        "openapi": "3.0.3",
        "info": {"title": "PayFlux ingest API", "version": "1"},
        "servers": SERVERS,
        "tags": TAGS,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "description": "An api_keys secret."},
                                "admin": openapi_risk.ADMIN_SCHEME},
            "schemas": {
                "PaymentExhaustEvent": EVENT_SCHEMA,
                "Error": ERROR_SCHEMA,
                "ErrorCode": ERROR_CODE_SCHEMA,
                "SingleAccepted": single_ok,
                "BatchResult": batch_result,
                "BatchAccepted": batch_ok,
                **openapi_risk.SCHEMAS,
            },
        },
        "security": [{"bearer": []}],
        "paths": {
            **_on_side_listener(openapi_risk.PATHS),
            **_on_ingest_listener(openapi_webhooks.PATHS),
            "/v1/events/payment_exhaust": {
                "post": {
                    "operationId": "ingestEvent",
                    "tags": ["ingest"],
                    "summary": "Append one event; 202 only after Redis holds it.",
                    "requestBody": {
                        "required": True,
                        "description": f"At most {limits.max_event_bytes} bytes.",
                        "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/PaymentExhaustEvent"}}
                        },
                    },
                    "responses": {
                        "202": {
                            "description": "Appended, or a duplicate of an earlier identical event.",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/SingleAccepted"}}},
                        },
                        **_ingest_errors(f"{limits.max_event_bytes} bytes (max_event_bytes)"),
                    },
                }
            },
            "/v1/events/payment_exhaust/batch": {
                "post": {
                    "operationId": "ingestBatch",
                    "tags": ["ingest"],
                    "summary": "Append a batch atomically per partition; any invalid event -> 422, nothing written.",
                    "requestBody": {
                        "required": True,
                        "description": (
                            f"At most {limits.max_batch_events} events and {limits.max_body_bytes} bytes; "
                            "NDJSON (one event per line) or a JSON array."
                        ),
                        "content": {
                            "application/x-ndjson": {"schema": {"type": "string"}},
                            "application/json": {
                                "schema": {
                                    "type": "array",
                                    "items": {"$ref": "#/components/schemas/PaymentExhaustEvent"},
                                }
                            },
                        },
                    },
                    "responses": {
                        "202": {
                            "description": "All events appended or recognised as duplicates.",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/BatchAccepted"}}},
                        },
                        **_ingest_errors(f"{limits.max_body_bytes} bytes (max_body_bytes)"),
                    },
                }
            },
            "/health": {
                "get": {
                    "operationId": "getHealth",
                    "tags": ["operations"],
                    "security": [],
                    "summary": "Liveness: the process is up.",
                    "responses": responses(
                        {"200": {"description": "Up.", "content": {"application/json": {"schema": status_doc}}}},
                        listener_errors(small)),
                }
            },
            "/ready": {
                "get": {
                    "operationId": "getReady",
                    "tags": ["operations"],
                    "security": [],
                    "summary": "Readiness: Redis answers and the node is not draining.",
                    "responses": responses(listener_errors(small), {
                        "200": {"description": "Ready.", "content": {"application/json": {"schema": status_doc}}},
                        "503": {
                            "description": "Redis unreachable or draining (status redis_unavailable or draining; "
                                           "not an Error body).",
                            "headers": {"Retry-After": {"schema": {"type": "integer"}}},
                            "content": {"application/json": {"schema": status_doc}},
                        },
                    }),
                }
            },
            "/metrics": {
                "get": {
                    "operationId": "getMetrics",
                    "tags": ["operations"],
                    "security": [],
                    "summary": "Prometheus text exposition (always on the side listener; here only with ingest_metrics).",
                    "responses": responses(listener_errors(small), {
                        "200": {"description": "Metrics.", "content": {"text/plain": {"schema": {"type": "string"}}}},
                        "404": _error("not_found: not served on the ingest listener (ingest_metrics is off)."),
                    }),
                }
            },
            "/openapi.json": {
                "get": {
                    "operationId": "getOpenapi",
                    "tags": ["operations"],
                    "security": [],
                    "summary": "This document.",
                    "responses": responses(
                        {"200": {"description": "OpenAPI 3 document.",
                                 "content": {"application/json": {"schema": {"type": "object"}}}}},
                        listener_errors(small)),
                }
            },
        },
    }
