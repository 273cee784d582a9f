"""
The OpenAPI 3.0 document served at ``/openapi.json``.

It is written by hand to say exactly what the app does; ``tests/test_openapi.py`` checks it
against the validator's field rules and the app's real responses.
"""

from __future__ import annotations

from typing import Any

HASH = {"type": "string", "pattern": "^[A-Za-z0-9_-]{8,128}$"}
SLUG = {"type": "string", "pattern": "^[a-z][a-z0-9_]{0,63}$"}

EVENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": [
        "event_id",
        "event_type",
        "occurred_at",
        "processor",
        "merchant_id_hash",
        "payment_intent_id_hash",
    ],
    "description": (
        "A payment_exhaust event (schema version 1). Hashes and buckets only: any string holding "
        "a 13-19 digit run that passes the Luhn check is rejected (pan_detected). Optional fields "
        "sent as null count as absent."
    ),
    "properties": {
        "event_id": {"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,128}$", "description": "Idempotency key."},
        "event_type": SLUG,
        "occurred_at": {
            "type": "string",
            "format": "date-time",
            "description": "RFC 3339 with offset; at most future_skew seconds ahead of the server clock.",
        },
        "processor": SLUG,
        "merchant_id_hash": HASH,
        "payment_intent_id_hash": HASH,
        "customer_id_hash": {**HASH, "nullable": True},
        "amount_bucket": {"type": "string", "pattern": "^[A-Za-z0-9._+-]{1,32}$", "nullable": True},
        "currency": {"type": "string", "pattern": "^[A-Z]{3}$", "nullable": True},
        "payment_method": {**SLUG, "nullable": True},
        "geo_bucket": {"type": "string", "pattern": "^[A-Za-z0-9_:-]{1,32}$", "nullable": True},
        "failure_category": {**SLUG, "nullable": True},
        "failure_code": {"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,64}$", "nullable": True},
        "retry_count": {"type": "integer", "minimum": 0, "maximum": 1000, "default": 0, "nullable": True},
        "processor_latency_ms": {"type": "integer", "minimum": 0, "maximum": 600000, "nullable": True},
    },
}

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
    batch_ok = {
        "type": "object",
        "required": ["status", "count", "accepted", "duplicates", "results"],
        "properties": {
            "status": {"type": "string", "enum": ["accepted"]},
            "count": {"type": "integer"},
            "accepted": {"type": "integer"},
            "duplicates": {"type": "integer"},
            "results": {"type": "array", "items": {"$ref": "#/components/schemas/SingleAccepted"}},
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
                    "summary": "Prometheus text exposition.",
                    "responses": {"200": {"description": "Metrics.", "content": {"text/plain": {"schema": {"type": "string"}}}}},
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
