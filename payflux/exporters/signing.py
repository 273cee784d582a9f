"""
Webhook request signing: HMAC-SHA256 over ``<timestamp>.<body>``.

A signed request carries two headers:

- ``X-PayFlux-Timestamp``: Unix seconds (an integer) when the request was signed;
- ``X-PayFlux-Signature``: ``v1=<hex HMAC-SHA256(secret, b"<timestamp>." + body)>``.

The timestamp is inside the MAC, so a captured request can't be replayed with a fresh
timestamp; a receiver rejects timestamps more than ``tolerance`` seconds from its own clock
(replay window).  The signature header may list several comma-separated ``v1=`` values (a
secret rotation signs with both secrets); :func:`verify` accepts the request if any matches.
The ``v1`` prefix names the scheme so a later one can be added without breaking receivers.

This module is the contract for every PayFlux component that signs or verifies webhooks (the
webhook exporter, the risk-alert consumer) and for receivers: docs/exporters.md has a
standalone verification snippet that mirrors :func:`verify`.

The webhook exporter can sign the Standard Webhooks way instead (standardwebhooks.com, the
scheme of Svix and Convoy receivers; ``signature_scheme = "standard_webhooks"``), so an
off-the-shelf receiver library verifies PayFlux's deliveries:

- ``webhook-id``: the message id, the same on every attempt of the same body
  (:func:`standard_message_id`: ``msg_`` + the first 32 hex digits of SHA-256 of the body);
- ``webhook-timestamp``: Unix seconds, signed afresh for every attempt;
- ``webhook-signature``: ``v1,<base64 HMAC-SHA256(key, "<id>.<timestamp>.<body>")>``, where the
  key is the base64-decoded part of a ``whsec_<base64>`` secret (:func:`standard_key`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

SIGNATURE_HEADER = "X-PayFlux-Signature"
TIMESTAMP_HEADER = "X-PayFlux-Timestamp"
SCHEME = "v1"


def _mac(secret: bytes, timestamp: int, body: bytes) -> str:
    return hmac.new(secret, b"%d." % timestamp + body, hashlib.sha256).hexdigest()


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    """The signature header value for ``body`` sent at ``timestamp``: ``"v1=<64 hex digits>"``."""
    if not secret:
        raise ValueError("secret must not be empty")
    return f"{SCHEME}={_mac(secret, int(timestamp), body)}"


def verify(secret: bytes, timestamp: int, body: bytes, signature: str, now: float, tolerance: float = 300) -> bool:
    """
    True if ``signature`` (a header value, possibly ``v1=a,v1=b``) signs ``body`` at ``timestamp``
    with ``secret`` and ``timestamp`` is within ``tolerance`` seconds of ``now``.

    Digests are compared with :func:`hmac.compare_digest` (constant time); every candidate is
    compared, so the time taken doesn't reveal which one matched.
    """
    if not secret or not signature:
        return False
    try:
        timestamp = int(timestamp)
    except (TypeError, ValueError):
        return False
    if abs(now - timestamp) > tolerance:
        return False
    expected = _mac(secret, timestamp, body).encode("ascii")
    matched = False
    for part in signature.split(","):
        scheme, sep, digest = part.strip().partition("=")
        if sep and scheme == SCHEME:
            matched |= hmac.compare_digest(expected, digest.strip().encode("ascii", "replace"))
    return matched


def signed_headers(secret: bytes, body: bytes, now: float) -> dict[str, str]:
    """Both headers for ``body`` signed at ``now`` (truncated to whole seconds)."""
    timestamp = int(now)
    return {TIMESTAMP_HEADER: str(timestamp), SIGNATURE_HEADER: sign(secret, timestamp, body)}


STANDARD_ID_HEADER = "webhook-id"
STANDARD_TIMESTAMP_HEADER = "webhook-timestamp"
STANDARD_SIGNATURE_HEADER = "webhook-signature"
STANDARD_SECRET_PREFIX = "whsec_"


def standard_key(secret: str) -> bytes:
    """The HMAC key of a Standard Webhooks secret ``whsec_<base64>``; ValueError if it is not one."""
    if not secret.startswith(STANDARD_SECRET_PREFIX):
        raise ValueError("a standard_webhooks secret is 'whsec_' followed by base64 (the form the receiver is given)")
    encoded = secret[len(STANDARD_SECRET_PREFIX):].strip()
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the part after 'whsec_' must be base64") from None
    if len(key) < 16:
        raise ValueError("a standard_webhooks secret must decode to at least 16 bytes (24 to 64 recommended)")
    return key


def standard_message_id(body: bytes) -> str:
    """``webhook-id`` for ``body``: the same for every attempt of the same request."""
    return "msg_" + hashlib.sha256(body).hexdigest()[:32]


def standard_sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value: ``v1,<base64 HMAC-SHA256(key, "<id>.<timestamp>.<body>")>``."""
    mac = hmac.new(key, b"%s.%d." % (msg_id.encode("ascii"), int(timestamp)) + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode("ascii")


def standard_headers(key: bytes, body: bytes, now: float) -> dict[str, str]:
    """The three Standard Webhooks headers for ``body`` signed at ``now`` (whole seconds)."""
    timestamp = int(now)
    msg_id = standard_message_id(body)
    return {STANDARD_ID_HEADER: msg_id, STANDARD_TIMESTAMP_HEADER: str(timestamp),
            STANDARD_SIGNATURE_HEADER: standard_sign(key, msg_id, timestamp, body)}
