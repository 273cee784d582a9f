"""
The one error type of the HTTP layer.

Every rejection is an :class:`ApiError` carrying its status code, a stable machine-readable
``code``, a human ``message`` and optional field-level ``details``; the app turns it into the
JSON body ``{"error": code, "message": ..., "details": [...]}`` in exactly one place.  Messages
and details never contain request values (a rejected value may be a card number).
"""

from __future__ import annotations

import json

import attrs


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
