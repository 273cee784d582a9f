"""
The OpenAPI 3.0 document served at ``/openapi.json``.

It is written by hand to say exactly what the app does; ``tests/test_openapi.py`` checks it
against the validator's field rules and the app's real responses.
"""

from __future__ import annotations

from typing import Any

from payflux.events import FIELDS, INT_FIELDS, SCHEMA_VERSION, STRING_FIELDS

REQUIRED = ("event_id", "event_type", "occurred_at", "processor", "merchant_id_hash", "payment_intent_id_hash")


def _event_schema() -> dict[str, Any]:
    """The event schema, built from the validator's own field tables so the two can't drift."""
    properties: dict[str, Any] = {}
    for name in FIELDS:
        if name in STRING_FIELDS:
            _, regex, _, rule = STRING_FIELDS[name]
            prop = {"type": "string", "pattern": f"^{regex}$", "description": rule}
        elif name in INT_FIELDS:
            low, high = INT_FIELDS[name]
            prop = {"type": "integer", "minimum": low, "maximum": high}
            if name == "retry_count":
                prop["default"] = 0
        else:  # occurred_at
            prop = {
                "type": "string",
                "format": "date-time",
                "description": "RFC 3339 with offset; at most future_skew seconds ahead of the server clock; "
                "stored as UTC with milliseconds.",
            }
        if name not in REQUIRED:
            prop["nullable"] = True
        properties[name] = prop
    properties["event_id"]["description"] = "Idempotency key."
    return {
        "type": "object",
        "additionalProperties": False,
        "required": list(REQUIRED),
        "description": (
            f"A payment_exhaust event (schema version {SCHEMA_VERSION}). Hashes and buckets only: any string "
            "holding a 13-19 digit run that passes the Luhn check is rejected (pan_detected). Optional "
            "fields sent as null count as absent. Unknown fields are rejected unless the node runs with "
            "allow_unknown_fields (then dropped)."
        ),
        "properties": properties,
        "example": {
            "event_id": "evt_3Xk9tQ2mR7vLp0aZ",
            "event_type": "payment_failed",
            "occurred_at": "2026-11-25T09:14:03.120Z",
            "processor": "stripe",
            "merchant_id_hash": "m_0042_5f2b9c1e",
            "payment_intent_id_hash": "Vb3kQ9xLrT2mN8pZ",
            "amount_bucket": "10-50",
            "currency": "USD",
            "payment_method": "card",
            "geo_bucket": "US",
            "failure_category": "insufficient_funds",
            "failure_code": "card_declined",
            "retry_count": 0,
            "processor_latency_ms": 230,
        },
    }


EVENT_SCHEMA = _event_schema()

ERROR_SCHEMA = {
    "type": "object",
    "required": ["error", "message"],
    "properties": {
        "error": {"type": "string"},
        "message": {"type": "string"},
        "details": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "line": {"type": "integer", "description": "1-based event position in a batch."},
                    "field": {"type": "string"},
                    "code": {"type": "string"},
                    "message": {"type": "string"},
                    "event_id": {"type": "string"},
                },
            },
        },
    },
}


def _error(description: str, retry_after: bool = False) -> dict:
    response: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }
    if retry_after:
        response["headers"] = {"Retry-After": {"schema": {"type": "integer"}, "description": "Seconds to wait."}}
    return response


def _ingest_errors() -> dict:
    return {
        "400": _error("Malformed JSON (invalid UTF-8, duplicate keys, NaN, too deep, bad NDJSON line)."),
        "401": _error("Missing, unknown or revoked API key."),
        "409": _error("event_id already used with a different payload; nothing was written."),
        "413": _error("Body larger than the configured cap (checked while reading)."),
        "415": _error("Unsupported Content-Type."),
        "422": _error("Schema violation; details list every bad field (and line, for batches)."),
        "429": _error("Per-key event rate exceeded.", retry_after=True),
        "503": _error("Redis unavailable or slow, node overloaded or draining; nothing was written.", retry_after=True),
    }


def openapi_document(limits) -> dict:
    single_ok = {
        "type": "object",
        "required": ["status", "id", "duplicate"],
        "properties": {
            "status": {"type": "string", "enum": ["accepted"]},
            "id": {"type": "string", "description": "Redis stream entry id."},
            "duplicate": {"type": "boolean"},
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
        },
    }
    status_doc = {"type": "object", "properties": {"status": {"type": "string"}, "message": {"type": "string"}}}
    return {
        "openapi": "3.0.3",
        "info": {"title": "PayFlux ingest API", "version": "1"},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "PaymentExhaustEvent": EVENT_SCHEMA,
                "Error": ERROR_SCHEMA,
                "SingleAccepted": single_ok,
                "BatchResult": batch_result,
                "BatchAccepted": batch_ok,
            },
        },
        "security": [{"bearer": []}],
        "paths": {
            "/v1/events/payment_exhaust": {
                "post": {
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
                        **_ingest_errors(),
                    },
                }
            },
            "/v1/events/payment_exhaust/batch": {
                "post": {
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
                        **_ingest_errors(),
                    },
                }
            },
            "/health": {
                "get": {
                    "security": [],
                    "summary": "Liveness: the process is up.",
                    "responses": {"200": {"description": "Up.", "content": {"application/json": {"schema": status_doc}}}},
                }
            },
            "/ready": {
                "get": {
                    "security": [],
                    "summary": "Readiness: Redis answers and the node is not draining.",
                    "responses": {
                        "200": {"description": "Ready.", "content": {"application/json": {"schema": status_doc}}},
                        "503": {
                            "description": "Redis unreachable or draining.",
                            "headers": {"Retry-After": {"schema": {"type": "integer"}}},
                            "content": {"application/json": {"schema": status_doc}},
                        },
                    },
                }
            },
            "/metrics": {
                "get": {
                    "security": [],
                    "summary": "Prometheus text exposition (always on the side listener; here only with ingest_metrics).",
                    "responses": {
                        "200": {"description": "Metrics.", "content": {"text/plain": {"schema": {"type": "string"}}}},
                        "404": _error("Not served on the ingest listener (ingest_metrics is off)."),
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "security": [],
                    "summary": "This document.",
                    "responses": {"200": {"description": "OpenAPI 3 document.", "content": {"application/json": {"schema": {"type": "object"}}}}},
                }
            },
        },
    }
