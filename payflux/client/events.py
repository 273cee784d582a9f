"""
Building events the way the gateway wants them, on the producer's side.

:func:`build_event` makes a ``payment_exhaust`` event with the seed's field names (docs/events.md):
a fresh UUID4 ``event_id`` (the idempotency key every retry reuses) and an RFC 3339 UTC
``event_timestamp`` with milliseconds, the gateway's canonical form.  :func:`hash_id` turns a raw
processor or customer id into the value of a ``*_hash`` field.  :func:`encode_event` is the one
place an event becomes the NDJSON line that is sent, and resent, byte for byte.

Standard library only: producers need neither Twisted nor the rest of PayFlux.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import uuid
from datetime import datetime, timezone
from typing import Any, Callable

#: The seed's 15 fields and PayFlux's 4 optional additions (docs/events.md, "Fields").
SEED_FIELDS = (
    "event_type", "event_timestamp", "event_id", "merchant_id_hash", "payment_intent_id_hash",
    "processor", "failure_category", "retry_count", "geo_bucket", "amount_bucket", "system_source",
    "payment_method_bucket", "channel", "retry_result", "failure_origin",
)
PAYFLUX_FIELDS = ("customer_id_hash", "currency", "failure_code", "processor_latency_ms")
FIELDS = frozenset(SEED_FIELDS + PAYFLUX_FIELDS)

#: Shortest hashing key :func:`hash_id` accepts: a key an attacker can guess is no key.
MIN_KEY_BYTES = 16


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


def format_timestamp(moment: datetime) -> str:
    """``moment`` as the gateway's canonical RFC 3339 form, ``YYYY-MM-DDTHH:MM:SS.mmmZ`` (UTC).

    A naive datetime is refused (ValueError): its offset would be a guess."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError("event_timestamp must be timezone-aware (use datetime.now(timezone.utc))")
    utc = moment.astimezone(timezone.utc)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


def build_event(event_type: str, processor: str, *, event_id: str | None = None,
                event_timestamp: datetime | str | None = None,
                now: Callable[[], datetime] = _utc_now, **fields: Any) -> dict:
    """
    A seed-shaped ``payment_exhaust`` event.

    ``event_id`` defaults to a new UUID4 and ``event_timestamp`` to ``now()`` (UTC, milliseconds);
    a datetime is formatted, a string is kept as given.  ``fields`` are the other fields under their
    seed names (``merchant_id_hash=hash_id(...)``, ``failure_category=...``); a name that is not a
    field of docs/events.md raises TypeError here, because the gateway would drop it silently.
    ``None`` values are left out (the gateway treats them as absent anyway).
    """
    unknown = sorted(set(fields) - FIELDS)
    if unknown:
        raise TypeError(f"not payment_exhaust fields: {', '.join(unknown)} (docs/events.md lists them)")
    if event_timestamp is None:
        event_timestamp = now()
    if isinstance(event_timestamp, datetime):
        event_timestamp = format_timestamp(event_timestamp)
    event = {
        "event_type": event_type,
        "event_timestamp": event_timestamp,
        "event_id": event_id if event_id is not None else str(uuid.uuid4()),
        "processor": processor,
    }
    event.update((name, value) for name, value in fields.items() if value is not None)
    return event


def hash_id(value: str | bytes, key: str | bytes) -> str:
    """
    The recommended ``*_hash`` of a raw id: HMAC-SHA256 keyed with the producer's secret hashing
    key, base64url without padding (43 characters, inside the gateway's ``hash`` rule and never
    mistaken for a card number).

    Keyed, not a bare SHA-256: merchant, customer and payment ids come from small or guessable
    spaces (``cus_`` + a few characters, sequential numbers), so an unkeyed digest could be
    reversed by hashing every candidate; without the key nobody can.  The raw id never leaves the
    producer, and the same id always gives the same hash (for one key), so consumers can still
    group by it.  Keep the key out of PayFlux and rotate it as you would any secret (a new key
    gives new hashes: a merchant's history splits at the rotation).
    """
    if isinstance(key, str):
        key = key.encode("utf-8")
    if isinstance(value, str):
        value = value.encode("utf-8")
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"hashing key must be at least {MIN_KEY_BYTES} bytes")
    digest = hmac.new(key, value, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def encode_event(event: dict) -> tuple[str, bytes]:
    """
    ``(event_id, line)``: the event as one compact JSON line (no newline), fixed at ``send()`` so
    every retry sends the same bytes.  ValueError/TypeError at once for what could never be
    delivered safely: not a dict, no string ``event_id`` (a retry without one could duplicate),
    or a value JSON can't carry (NaN, an object).
    """
    if not isinstance(event, dict):
        raise TypeError(f"an event is a dict, not {type(event).__name__}")
    event_id = event.get("event_id")
    if not isinstance(event_id, str) or not event_id:
        raise ValueError("event has no event_id: retries are only safe with one (build_event makes one)")
    line = json.dumps(event, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")
    return event_id, line
