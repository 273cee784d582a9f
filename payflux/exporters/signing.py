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
"""

from __future__ import annotations

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
