"""
Alerts and their transitions: the value types the detector core emits, and their wire form
(the JSON record written to the alerts stream and POSTed to the webhook; docs/risk.md, "Alerts").
"""

from __future__ import annotations

import json
from datetime import datetime, timezone

import attrs

FORMAT_VERSION = "1"

FAILURE_RATE_SPIKE = "failure_rate_spike"
RETRY_STORM = "retry_storm"
FAILURE_CLUSTER = "failure_cluster"
ALERT_TYPES = (FAILURE_RATE_SPIKE, RETRY_STORM, FAILURE_CLUSTER)

OPEN = "open"
ESCALATE = "escalate"  # an open warning became critical (same alert_id); severities never go down
RESOLVE = "resolve"

# Why an alert changed state.
THRESHOLD = "threshold"                    # open: the rule held for open_after_seconds
RECOVERED = "recovered"                    # resolve: back under the resolve threshold
INSUFFICIENT_VOLUME = "insufficient_volume"  # resolve: too few events to judge, for resolve_after_seconds
EVICTED = "evicted"                        # resolve: the key was evicted by its cardinality cap
CONSUMER_STOPPED = "consumer_stopped"      # resolve: the risk consumer stopped (its state is in memory)

Key = tuple[tuple[str, str], ...]


def _escape(value: str) -> str:
    """``%``, ``,`` and ``=`` of a key value as ``%25``, ``%2C``, ``%3D`` (label fields such as
    ``failure_category`` may contain them); every other character as it is."""
    if "%" in value or "," in value or "=" in value:
        return value.replace("%", "%25").replace(",", "%2C").replace("=", "%3D")
    return value


def key_text(key: Key) -> str:
    """``processor=stripe,failure_category=timeout``: ``name=value`` pairs joined by ``,``, a
    value's ``%``, ``,`` and ``=`` percent-encoded (so the text is unambiguous)."""
    return ",".join(f"{name}={_escape(value)}" for name, value in key)


def iso_ms(ms: int) -> str:
    """Unix milliseconds as ``YYYY-MM-DDTHH:MM:SS.mmmZ`` (the events' canonical timestamp form)."""
    dt = datetime.fromtimestamp(ms // 1000, timezone.utc)
    return f"{dt:%Y-%m-%dT%H:%M:%S}.{ms % 1000:03d}Z"


@attrs.frozen
class Alert:
    """One alert, from opening to resolution.  ``alert_id`` is stable: ``<type>:<key>:<opened_at_ms>``."""

    type: str
    key: Key
    severity: str                  # "warning" or "critical", decided when it opens
    window_seconds: int
    opened_at_ms: int              # stream time (see docs/risk.md, "Time")
    opened_numbers: dict = attrs.field(eq=False, hash=False)

    @property
    def key_text(self) -> str:
        return key_text(self.key)

    @property
    def alert_id(self) -> str:
        return f"{self.type}:{self.key_text}:{self.opened_at_ms}"


@attrs.frozen
class Transition:
    """An alert opening or resolving at stream time ``at_ms``, with the numbers at that moment."""

    action: str                    # OPEN or RESOLVE
    alert: Alert
    at_ms: int
    reason: str
    numbers: dict = attrs.field(eq=False, hash=False)

    def record(self) -> dict:
        """The JSON-ready record (stream ``data`` field and webhook body)."""
        a = self.alert
        return {
            "v": int(FORMAT_VERSION),
            "alert_id": a.alert_id,
            "action": self.action,
            "type": a.type,
            "key": dict(a.key),
            "severity": a.severity,
            "window_seconds": a.window_seconds,
            "opened_at": iso_ms(a.opened_at_ms),
            "at": iso_ms(self.at_ms),
            "at_ms": self.at_ms,
            "reason": self.reason,
            "numbers": self.numbers,
            "opened_numbers": a.opened_numbers,
        }

    def body(self) -> bytes:
        """``record()`` as compact JSON with sorted keys (the bytes the webhook signature covers)."""
        return json.dumps(self.record(), sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")

    def stream_fields(self) -> list[str]:
        """XADD field/value pairs, flat fields first so readers can filter without decoding ``data``."""
        a = self.alert
        return [
            "v", FORMAT_VERSION,
            "alert_id", a.alert_id,
            "action", self.action,
            "type", a.type,
            "key", a.key_text,
            "severity", a.severity,
            "at", str(self.at_ms),
            "data", self.body().decode("utf-8"),
        ]
