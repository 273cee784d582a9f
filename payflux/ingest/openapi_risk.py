"""
The risk part of the OpenAPI document (:mod:`payflux.ingest.openapi`): the alerts API of the side
listener (:mod:`payflux.ingest.alerts`, admin keys) and the two risk feeds beside it
(``GET /v1/risk/processors``, ``GET /v1/risk/retry-advice``, read from the risk consumer's
health snapshot).  Enumerations come from the code's own tables so the two can't drift.
"""

from __future__ import annotations

from typing import Any

from payflux.ingest.http import OUTCOME_BODY_LIMIT
from payflux.risk.alerts import ALERT_TYPES
from payflux.risk.health import BANDS, DRIVERS, TRAJECTORIES
from payflux.risk.store import ACTIONS, OUTCOME_TYPES, SOURCES, STATES

# the side listener's default address; the path's own ``servers`` entry says where it is served
SIDE_SERVERS = [{"url": "http://127.0.0.1:9464", "description": "the side listener (metrics_listen), not the "
                                                                "ingest listener"}]
ADMIN_SECURITY = [{"admin": []}]
ADMIN_SCHEME = {
    "type": "http",
    "scheme": "bearer",
    "description": "An admin_keys secret (Authorization: Bearer <secret>). A producer key (api_keys) is "
                   "answered 403; without admin_keys configured every request is answered 401.",
}
TIME = {"type": "string", "format": "date-time"}
NUMBERS = {"type": "object", "additionalProperties": {"type": "number", "nullable": True},
           "description": "The detector's numbers (docs/risk.md, \"The alerts stream\"); per-intent retry_storm "
                          "numbers also carry processor and merchant_id_hash strings."}


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict:
    return _json(_ref("Error"), description)


SCHEMAS: dict[str, Any] = {
    "AlertTransition": {
        "type": "object",
        "required": ["action", "at", "reason", "numbers"],
        "properties": {
            "action": {"type": "string", "enum": list(ACTIONS.values())},
            "at": TIME,
            "at_ms": {"type": "integer", "description": "Stream time, Unix ms."},
            "reason": {"type": "string", "enum": ["threshold", "recovered", "insufficient_volume", "evicted",
                                                  "consumer_stopped"]},
            "severity": {"type": "string", "enum": ["warning", "critical"]},
            "numbers": NUMBERS,
        },
    },
    "AlertOutcomeRequest": {
        "type": "object",
        "additionalProperties": False,
        "required": ["outcome_type", "observed_at"],
        "properties": {
            "outcome_type": {"type": "string", "enum": list(OUTCOME_TYPES),
                             "description": "What the processor did; none = nothing followed the alert."},
            "observed_at": {**TIME, "description": "When it was seen (RFC 3339 with offset); at most 300 s ahead "
                                                   "of the node's clock."},
            "source": {"type": "string", "enum": list(SOURCES), "default": "manual"},
            "notes": {"type": "string", "maxLength": 1000},
        },
    },
    "AlertOutcome": {
        "type": "object",
        "required": ["outcome_type", "observed_at", "source", "recorded_at", "lead_time_seconds"],
        "properties": {
            "alert_id": {"type": "string", "description": "In the POST answer only."},
            "outcome_type": {"type": "string", "enum": list(OUTCOME_TYPES)},
            "observed_at": TIME,
            "source": {"type": "string", "enum": list(SOURCES)},
            "notes": {"type": "string"},
            "recorded_at": TIME,
            "lead_time_seconds": {"type": "number", "description": "observed_at - opened_at; negative when the "
                                                                   "processor acted before the alert opened."},
            "event_id": {"type": "string", "description": "Outcomes a processor webhook recorded: the event_id "
                                                          "of the notification's event."},
        },
    },
    "Alert": {
        "type": "object",
        "required": ["alert_id", "type", "key", "severity", "state", "opened_at", "window_seconds",
                     "opened_numbers", "transitions", "outcomes"],
        "properties": {
            "alert_id": {"type": "string", "description": "<type>:<key>:<opened_at_ms>; send it percent-encoded "
                                                          "in a path."},
            "type": {"type": "string", "enum": list(ALERT_TYPES)},
            "key": {"type": "object", "additionalProperties": {"type": "string"},
                    "description": "The alert's key fields, values as sent (e.g. {\"processor\": \"stripe\"})."},
            "severity": {"type": "string", "enum": ["warning", "critical"]},
            "state": {"type": "string", "enum": list(STATES)},
            "opened_at": TIME,
            "opened_at_ms": {"type": "integer"},
            "window_seconds": {"type": "integer"},
            "opened_numbers": NUMBERS,
            "transitions": {"type": "array", "items": _ref("AlertTransition")},
            "outcomes": {"type": "array", "items": _ref("AlertOutcome")},
            "updated_at": {**TIME, "nullable": True},
        },
    },
    "AlertList": {
        "type": "object",
        "required": ["alerts", "next_cursor"],
        "properties": {
            "alerts": {"type": "array", "items": _ref("Alert")},
            "next_cursor": {"type": "string", "nullable": True,
                            "description": "Pass as cursor for the next page; null on the last one."},
        },
    },
    # --- the risk feeds (docs/risk.md, "Processor health", "Retry insight") ---
    "HealthDriver": {
        "type": "object", "required": ["name", "value", "baseline", "contribution"],
        "properties": {"name": {"type": "string", "enum": list(DRIVERS)},
                       "value": {"type": "number", "nullable": True},
                       "baseline": {"type": "number", "nullable": True},
                       "contribution": {"type": "number", "minimum": 0, "maximum": 1}},
    },
    "HealthScore": {
        "type": "object",
        "description": "A processor's, merchant's (merchant_id_hash) or geo's (geo_bucket) score and band.",
        "required": ["score", "band", "drivers", "sample_size", "insufficient_volume"],
        "properties": {
            "merchant_id_hash": {"type": "string"},
            "geo_bucket": {"type": "string"},
            "score": {"type": "number", "minimum": 0, "maximum": 1},
            "band": {"type": "string", "enum": list(BANDS)},
            "drivers": {"type": "array", "items": _ref("HealthDriver")},
            "sample_size": {"type": "integer", "minimum": 0},
            "insufficient_volume": {"type": "boolean"},
        },
    },
    "RiskProcessors": {
        "type": "object",
        "description": "GET /v1/risk/processors: each processor's risk score as of the risk consumer's latest "
                       "snapshot (as_of null and no processors: no risk consumer wrote one in the last 30 s).",
        "required": ["as_of", "processors"],
        "properties": {
            "as_of": {**TIME, "nullable": True},
            "processors": {"type": "array", "items": {
                "type": "object",
                "required": ["processor", "score", "band", "drivers", "trajectory", "sample_size",
                             "insufficient_volume", "merchants", "geos"],
                "properties": {
                    "processor": {"type": "string"},
                    "score": {"type": "number", "minimum": 0, "maximum": 1},
                    "band": {"type": "string", "enum": list(BANDS)},
                    "drivers": {"type": "array", "items": _ref("HealthDriver")},
                    "trajectory": {"type": "string", "enum": list(TRAJECTORIES)},
                    "sample_size": {"type": "integer", "minimum": 0},
                    "insufficient_volume": {"type": "boolean"},
                    "merchants": {"type": "array", "items": _ref("HealthScore")},
                    "geos": {"type": "array", "items": _ref("HealthScore")},
                },
            }},
        },
    },
    "RetryAdvice": {
        "type": "object",
        "description": "GET /v1/risk/retry-advice?processor=...&failure_category=...: whether retrying this "
                       "failure on this processor works now (docs/risk.md, \"Retry insight\").",
        "required": ["processor", "failure_category", "advice", "retry_success_rate", "baseline", "sample_size",
                     "window_seconds", "as_of"],
        "properties": {
            "as_of": {**TIME, "nullable": True, "description": "The snapshot's time; null: no snapshot (no risk "
                                                                "consumer running), so no samples."},
            "processor": {"type": "string"},
            "failure_category": {"type": "string"},
            "advice": {"type": "string", "enum": ["retry", "wait", "avoid"]},
            "retry_success_rate": {"type": "number", "minimum": 0, "maximum": 1, "nullable": True},
            "baseline": {"type": "number", "minimum": 0, "maximum": 1, "nullable": True},
            "sample_size": {"type": "integer", "minimum": 0},
            "window_seconds": {"type": "integer"},
        },
    },
}

_AUTH_ERRORS = {
    "401": _error("unauthorized: no admin key, an unknown one, or admin_keys not configured on the node."),
    "403": _error("forbidden: a producer key (api_keys); the alerts API takes an admin key."),
    "500": _error("internal_error: an unexpected failure (logged; the answer never carries a traceback)."),
    "503": {**_error("redis_unavailable: Redis unavailable."),
            "headers": {"Retry-After": {"schema": {"type": "integer"}}}},
}
_ALERT_ID = {"name": "alert_id", "in": "path", "required": True, "schema": {"type": "string"},
             "description": "The alert_id, percent-encoded (it holds ':', ',', '=' and may hold '%')."}


def _query(name: str, schema: dict, description: str) -> dict:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


PATHS: dict[str, Any] = {
    "/v1/alerts": {
        "get": {
            "operationId": "listAlerts",
            "tags": ["alerts"],
            "summary": "Stored alerts, newest first (by opened_at), with cursor paging.",
            "servers": SIDE_SERVERS,
            "security": ADMIN_SECURITY,
            "parameters": [
                _query("state", {"type": "string", "enum": list(STATES)}, "Only open or only resolved alerts."),
                _query("type", {"type": "string", "enum": list(ALERT_TYPES)}, "Only this alert type."),
                _query("processor", {"type": "string"}, "key.processor (a per-intent retry_storm: its numbers' "
                                                        "processor)."),
                _query("merchant", {"type": "string"}, "key.merchant_id_hash (a per-intent retry_storm: its "
                                                       "numbers' merchant)."),
                _query("since", {"type": "string"}, "Opened at or after: RFC 3339 with offset, or Unix ms."),
                _query("limit", {"type": "integer", "minimum": 1, "maximum": 500, "default": 50}, "Page size."),
                _query("cursor", {"type": "string"}, "next_cursor of the previous page."),
            ],
            "responses": {
                "200": _json(_ref("AlertList"), "A page of alerts."),
                "400": _error("invalid_request: a bad query parameter; details name each (field, code, message)."),
                **_AUTH_ERRORS,
            },
        }
    },
    "/v1/alerts/{alert_id}": {
        "get": {
            "operationId": "getAlert",
            "tags": ["alerts"],
            "summary": "One alert with its transitions and outcomes.",
            "servers": SIDE_SERVERS,
            "security": ADMIN_SECURITY,
            "parameters": [_ALERT_ID],
            "responses": {
                "200": _json(_ref("Alert"), "The alert."),
                "404": _error("not_found: no such alert (unknown, or past alerts_retention_days)."),
                **_AUTH_ERRORS,
            },
        }
    },
    "/v1/alerts/{alert_id}/outcome": {
        "post": {
            "operationId": "recordAlertOutcome",
            "tags": ["alerts"],
            "summary": "Record what the processor did after the alert; answers its lead time.",
            "servers": SIDE_SERVERS,
            "security": ADMIN_SECURITY,
            "parameters": [_ALERT_ID],
            "requestBody": {"required": True, "description": f"At most {OUTCOME_BODY_LIMIT} bytes.",
                            "content": {"application/json": {"schema": _ref("AlertOutcomeRequest")}}},
            "responses": {
                "201": _json(_ref("AlertOutcome"), "Stored on the alert; lead_time_seconds observed in "
                                                   "payflux_alert_outcome_lead_time_seconds."),
                "400": _error("malformed_json: the body is not strict JSON."),
                "404": _error("not_found: no such alert."),
                "409": _error("too_many_outcomes: the alert holds 100 outcomes already."),
                "413": _error(f"payload_too_large: body larger than {OUTCOME_BODY_LIMIT} bytes (checked while reading)."),
                "415": _error("unsupported_media_type: Content-Type is not application/json."),
                "422": _error("invalid_outcome: unknown field, wrong type or bad value; details name each field."),
                **_AUTH_ERRORS,
            },
        }
    },
    "/v1/risk/processors": {
        "get": {
            "operationId": "getProcessorHealth",
            "tags": ["risk"],
            "summary": "Processor health now: score, band, drivers and trajectory per processor, with its top "
                       "merchants and geos.",
            "servers": SIDE_SERVERS,
            "security": ADMIN_SECURITY,
            "responses": {
                "200": _json(_ref("RiskProcessors"), "The latest snapshot of the risk consumer."),
                "400": _error("invalid_request: a query parameter (this endpoint takes none)."),
                **_AUTH_ERRORS,
            },
        }
    },
    "/v1/risk/retry-advice": {
        "get": {
            "operationId": "getRetryAdvice",
            "tags": ["risk"],
            "summary": "Retry, wait or avoid: the live success rate of retries of one failure category on one "
                       "processor against its baseline.",
            "servers": SIDE_SERVERS,
            "security": ADMIN_SECURITY,
            "parameters": [
                {**_query("processor", {"type": "string", "minLength": 1, "maxLength": 256}, "The processor."),
                 "required": True},
                {**_query("failure_category", {"type": "string", "minLength": 1, "maxLength": 256},
                          "The failure_category of the failed attempt."), "required": True},
            ],
            "responses": {
                "200": _json(_ref("RetryAdvice"), "The advice and the numbers behind it."),
                "400": _error("invalid_request: a missing, empty, repeated or unknown query parameter; details "
                              "name each."),
                **_AUTH_ERRORS,
            },
        }
    },
}
