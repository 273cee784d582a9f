"""
The OpenAPI 3.0 document served at ``/openapi.json``.

It is written by hand to say exactly what the app does; ``tests/test_openapi.py`` checks it
against the validator's field rules and the app's real responses.  The alerts API of the side
listener and the risk feeds' schemas are in :mod:`payflux.ingest.openapi_risk`, the processor
webhook routes in :mod:`payflux.ingest.openapi_webhooks`.
"""

from __future__ import annotations

from typing import Any

from payflux.events import ALIASES, CASE_FOLDED, FIELDS, INT_FIELDS, REQUIRED, SCHEMA_VERSION, STRING_FIELDS
from payflux.ingest import openapi_risk, openapi_webhooks

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
        "400": _error(
            "Malformed JSON (invalid UTF-8, duplicate keys, NaN, too deep, bad NDJSON line), or a bad request"
            " head: bad or duplicate Content-Length, Content-Length with Transfer-Encoding, bad chunk size,"
            " two Authorization headers."
        ),
        "401": _error("Missing, unknown or revoked API key."),
        "409": _error("event_id already used with a different payload; nothing was written."),
        "413": _error("Body larger than the configured cap (checked while reading)."),
        "415": _error("Unsupported Content-Type."),
        "422": _error("Schema violation; details list every bad field (and line, for batches)."),
        "429": _error("Per-key event rate exceeded.", retry_after=True),
        "503": _error("Redis unavailable or slow, node overloaded or draining; nothing was written.", retry_after=True),
    }


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
    return {
        "openapi": "3.0.3",
        "info": {"title": "PayFlux ingest API", "version": "1"},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "description": "An api_keys secret."},
                                "admin": openapi_risk.ADMIN_SCHEME},
            "schemas": {
                "PaymentExhaustEvent": EVENT_SCHEMA,
                "Error": ERROR_SCHEMA,
                "SingleAccepted": single_ok,
                "BatchResult": batch_result,
                "BatchAccepted": batch_ok,
                **openapi_risk.SCHEMAS,
            },
        },
        "security": [{"bearer": []}],
        "paths": {
            **openapi_risk.PATHS,
            **openapi_webhooks.PATHS,
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
