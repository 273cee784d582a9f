"""
What the processor webhook handlers share: the result the HTTP route acts on, the keyed id hash,
and the buckets every processor maps to (docs/producers.md, "Processor webhooks").

The handlers are transport-free: they get the request's headers (lower-case names), its raw body
and the receiver's clock (``now``, Unix seconds), and return a :class:`WebhookResult`; they never
read the clock, log, or touch Redis.  The route turns a result into an answer:

- ``rejected``: answer ``error.http_status`` with ``error.body()``; nothing was mapped, so
  nothing may be appended or recorded.
- ``accepted`` / ``ignored``: validate and append ``events`` (2xx only after Redis replied),
  record ``signals``, count ``ignored``, then answer :meth:`WebhookResult.ack`.

Nothing here puts a secret, a raw id or the body into an error, a label or an event: ids leave
as keyed hashes, everything else as a bucket from a small documented vocabulary.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from datetime import datetime, timedelta, timezone
from typing import Mapping, Protocol

import attrs

from payflux.pan import contains_pan

ACCEPTED, IGNORED, REJECTED = "accepted", "ignored", "rejected"

#: Shortest ``id_hash_key`` accepted (the Python client's ``hash_id`` rule too).
MIN_ID_HASH_KEY_BYTES = 16

#: What a processor did, as the alerts outcome API names it (payflux/risk/store.py OUTCOME_TYPES).
OUTCOME_TYPES = ("throttle", "review", "hold", "auth_degradation", "rate_limit", "other", "none")


@attrs.frozen
class WebhookError:
    """Why a delivery was refused: the HTTP status (400 malformed, 401 not authentic, 413 too
    large), a stable ``code`` and a message that states the rule, never a value, a secret or the
    body."""

    http_status: int
    code: str
    message: str

    def body(self) -> bytes:
        """The house error body: ``{"error": code, "message": message}``."""
        return json.dumps({"error": self.code, "message": self.message}, separators=(",", ":")).encode()


@attrs.frozen
class Ignored:
    """A verified notification (or one item of it) that maps to no event: ``type`` is the
    processor's event type as a safe label (:func:`type_label`), ``reason`` one of
    ``unmapped_type`` (a type PayFlux does not map), ``covered_by_payment_intent`` (a Stripe
    charge whose PaymentIntent's own event is the outcome) or ``not_processed`` (Adyen
    ``success: "false"`` on a modification: nothing happened)."""

    type: str
    reason: str


@attrs.frozen
class OutcomeSignal:
    """A processor's dispute or fraud signal, for the risk loop's outcome API.

    :meth:`outcome` is the body of ``POST /v1/alerts/{alert_id}/outcome``; ``processor``,
    ``merchant_id_hash`` and ``event_id`` (the PayFlux event's id, to correlate) say which
    alert it may belong to."""

    processor: str
    outcome_type: str
    observed_at: str
    source: str
    notes: str
    event_id: str
    merchant_id_hash: str | None = None

    def outcome(self) -> dict:
        return {"outcome_type": self.outcome_type, "observed_at": self.observed_at,
                "source": self.source, "notes": self.notes}


@attrs.frozen
class ItemCheck:
    """One Adyen notification item's HMAC check: its position (0-based), its eventCode as a safe
    label, and whether any configured key verified it."""

    index: int
    event_code: str
    verified: bool


@attrs.frozen
class WebhookResult:
    """What a handler made of one delivery (module docstring: what the route does with it)."""

    status: str
    events: list[dict] = attrs.field(factory=list)
    signals: list[OutcomeSignal] = attrs.field(factory=list)
    ignored: list[Ignored] = attrs.field(factory=list)
    items: list[ItemCheck] = attrs.field(factory=list)
    error: WebhookError | None = None
    ack_content_type: str = "application/json"
    ack_body: bytes = b'{"received":true}'

    def ack(self) -> tuple[int, str, bytes]:
        """``(200, content type, body)`` to answer once the events are appended (accepted or
        ignored deliveries only)."""
        if self.status == REJECTED:
            raise ValueError("a rejected delivery has no acknowledgement; answer its error")
        return 200, self.ack_content_type, self.ack_body


class ProcessorWebhook(Protocol):
    """What a route needs of a processor's handler (StripeWebhook, AdyenWebhook)."""

    processor: str
    mapped_types: tuple[str, ...]

    def handle(self, headers: Mapping[str, str], body: bytes, now: float) -> WebhookResult:
        """``headers`` with lower-case names, ``body`` the raw bytes as received (signatures
        cover them), ``now`` the receiver's clock in Unix seconds."""


def rejected(http_status: int, code: str, message: str, items: list[ItemCheck] | None = None) -> WebhookResult:
    return WebhookResult(REJECTED, error=WebhookError(http_status, code, message), items=items or [])


# --- ids ----------------------------------------------------------------------------------------

def hash_id(key: bytes, value: str) -> str:
    """HMAC-SHA256 of ``value`` (UTF-8) keyed with ``key``, base64url without padding: 43
    characters, inside the event schema's ``hash`` rule.  The same function as
    ``payflux.client.hash_id``, so a webhook and a producer using one key agree on hashes."""
    digest = hmac.new(key, value.encode("utf-8"), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


class IdHasher:
    """:func:`hash_id` with the node's ``id_hash_key`` bound; ``None`` and non-strings hash to
    ``None`` (the field is left out), so a missing id never becomes the hash of ``"None"``."""

    def __init__(self, key: bytes):
        if not isinstance(key, bytes) or len(key) < MIN_ID_HASH_KEY_BYTES:
            raise ValueError(f"id_hash_key must be at least {MIN_ID_HASH_KEY_BYTES} bytes")
        self._key = key

    def __call__(self, value: object) -> str | None:
        if not isinstance(value, str) or not value:
            return None
        return hash_id(self._key, value)


_EVENT_ID = re.compile(r"[A-Za-z0-9._:{}-]{1,128}").fullmatch


def safe_event_id(raw: object) -> bool:
    """True if ``raw`` may be an ``event_id`` as it is: the schema's characters and nothing the
    PAN guard would refuse (docs/events.md, "Numeric identifiers")."""
    return isinstance(raw, str) and _EVENT_ID(raw) is not None and not contains_pan(raw)


# --- labels and buckets --------------------------------------------------------------------------

_LABEL = re.compile(r"[A-Za-z0-9._:-]{1,64}").fullmatch
_TOKEN_CHARS = re.compile(r"[^a-z0-9]+")
_DIGITS4 = re.compile(r"[0-9]{4,}")


def type_label(value: object) -> str:
    """A processor's event type as a metric-safe label: itself if it is 1..64 of
    ``[A-Za-z0-9._:-]``, else ``<other>`` (the type comes from a signed body, but a label must
    never carry arbitrary text)."""
    return value if isinstance(value, str) and _LABEL(value) else "<other>"


def token(value: object) -> str | None:
    """``value`` as a lower-case ``snake_case`` token (``"Not enough balance"`` ->
    ``not_enough_balance``), or None if it is not a string, is empty, is longer than 64
    characters, or holds a run of 4 or more digits (which could be card or account data)."""
    if not isinstance(value, str) or _DIGITS4.search(value):
        return None
    out = _TOKEN_CHARS.sub("_", value.lower()).strip("_")
    return out if 0 < len(out) <= 64 else None


#: Bucket upper bounds in major units, and their labels (the seed's ``amount_bucket`` style).
AMOUNT_BUCKETS = ((10, "<10"), (50, "10-50"), (200, "50-200"), (1000, "200-1000"))
AMOUNT_TOP = "1000+"


def amount_bucket(minor: object, currency: str | None, exponents: dict[str, int]) -> str | None:
    """The ``amount_bucket`` of an amount in minor units: converted to major units with the
    processor's decimals for ``currency`` (``exponents``; 2 when not listed), not converted
    between currencies.  None if ``minor`` is not a non-negative integer."""
    if not isinstance(minor, int) or isinstance(minor, bool) or minor < 0:
        return None
    scale = 10 ** exponents.get((currency or "").upper(), 2)
    for bound, label in AMOUNT_BUCKETS:
        if minor < bound * scale:
            return label
    return AMOUNT_TOP


_CURRENCY = re.compile(r"[A-Za-z]{3}").fullmatch
_COUNTRY = re.compile(r"[A-Za-z]{2}").fullmatch


def currency(value: object) -> str | None:
    return value.upper() if isinstance(value, str) and _CURRENCY(value) else None


def country(*candidates: object) -> str | None:
    """The first candidate that is a 2-letter country code, upper case (``geo_bucket``)."""
    for value in candidates:
        if isinstance(value, str) and _COUNTRY(value):
            return value.upper()
    return None


#: ``payment_method_bucket`` values.
PAYMENT_METHOD_BUCKETS = ("credit_card", "debit_card", "prepaid_card", "card", "wallet", "bank", "bnpl", "other")
_FUNDING = {"credit": "credit_card", "debit": "debit_card", "prepaid": "prepaid_card",
            "deferred_debit": "debit_card", "charge": "credit_card"}


def card_bucket(funding: object) -> str:
    """A card's bucket from its funding (Stripe ``card.funding``, Adyen ``fundingSource``)."""
    return _FUNDING.get(funding.lower(), "card") if isinstance(funding, str) else "card"


# --- time ----------------------------------------------------------------------------------------

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_RFC3339 = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{1,9})?(?:[Zz]|[+-][0-9]{2}:[0-9]{2})"
).fullmatch


def iso_from_unix(seconds: object) -> str | None:
    """``YYYY-MM-DDTHH:MM:SS.mmmZ`` of a Unix time in whole seconds (Stripe's ``created``)."""
    if not isinstance(seconds, int) or isinstance(seconds, bool) or not 0 < seconds < 253402300800:
        return None
    return (_EPOCH + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def iso_from_rfc3339(text: object) -> str | None:
    """An RFC 3339 timestamp with offset (Adyen's ``eventDate``) in UTC, milliseconds, ``Z``
    (fractions truncated, as the event schema's canonical form does); None if it is not one."""
    if not isinstance(text, str) or len(text) > 64 or _RFC3339(text) is None:
        return None
    head, frac, tail = text.upper(), "", ""
    if "." in head:
        head, rest = head.split(".", 1)
        digits = re.match(r"[0-9]+", rest).group(0)
        frac, tail = digits[:3].ljust(3, "0"), rest[len(digits):]
    else:
        head, tail = head[:19], head[19:]
        frac = "000"
    try:
        dt = datetime.fromisoformat(head + ("+00:00" if tail == "Z" else tail)).astimezone(timezone.utc)
    except (ValueError, OverflowError):
        return None
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + frac + "Z"


def get(obj: object, *path: str) -> object:
    """``obj[path[0]][path[1]]...``, or None as soon as a step is not a dict holding the key."""
    for name in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(name)
    return obj


def compact(event: dict) -> dict:
    """The event without its absent (None) fields."""
    return {k: v for k, v in event.items() if v is not None}
