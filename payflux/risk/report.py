"""
Lead time and precision of the risk alerts: the summary ``payflux risk report`` prints and the
status page's Risk loop panel shows, from the alert store's documents
(:mod:`payflux.risk.store`; docs/risk.md, "Lead time and the risk report").  Pure: no I/O.
"""

from __future__ import annotations

import math
from typing import Iterable

from payflux.risk.alerts import ALERT_TYPES


def _nearest_rank(sorted_values: list[float], q: float) -> float:
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]


def _median(sorted_values: list[float]) -> float:
    n = len(sorted_values)
    mid = n // 2
    return sorted_values[mid] if n % 2 else (sorted_values[mid - 1] + sorted_values[mid]) / 2


def first_action(doc: dict) -> dict | None:
    """The earliest outcome (by observed_at) that is a processor action (not ``none``)."""
    actions = [o for o in doc.get("outcomes") or () if o.get("outcome_type") != "none"]
    return min(actions, key=lambda o: o.get("lead_time_seconds", 0.0)) if actions else None


def summarize(docs: Iterable[dict]) -> dict:
    """
    Per alert type (all three always present) and for all: ``alerts`` raised, ``outcomes``
    recorded, ``with_outcome``, ``no_outcome``, ``followed_by_action`` (an outcome other than
    ``none``) and its ``action_share`` of the alerts, and the median and p90 (nearest rank) of
    the lead time of each such alert's first action (``lead_time_median_seconds``,
    ``lead_time_p90_seconds``; null without any).
    """
    groups: dict[str, list[dict]] = {t: [] for t in ALERT_TYPES}
    everything: list[dict] = []
    for doc in docs:
        groups.setdefault(doc.get("type") or "unknown", []).append(doc)
        everything.append(doc)

    def one(items: list[dict]) -> dict:
        leads = sorted(a["lead_time_seconds"] for a in map(first_action, items) if a is not None)
        followed = len(leads)
        with_outcome = sum(1 for d in items if d.get("outcomes"))
        return {
            "alerts": len(items),
            "outcomes": sum(len(d.get("outcomes") or ()) for d in items),
            "with_outcome": with_outcome,
            "no_outcome": len(items) - with_outcome,
            "followed_by_action": followed,
            "action_share": round(followed / len(items), 4) if items else None,
            "lead_time_median_seconds": round(_median(leads), 3) if leads else None,
            "lead_time_p90_seconds": round(_nearest_rank(leads, 0.9), 3) if leads else None,
        }

    return {"by_type": {t: one(items) for t, items in groups.items()}, "all": one(everything)}
