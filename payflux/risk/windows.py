"""
The building blocks of the detector core (pure Python, no Twisted, no clock of its own):

- :class:`KeyTable`: the keys of one dimension, least recently seen first, at most ``cap``
  of them; adding one more evicts the least recently seen (counted in ``evicted``).
- :class:`RateState`: a sliding window of one-second buckets (a ring of ``window`` counts of
  events ``n`` and of matching events ``k``) plus an EWMA baseline of both counts.
- :class:`RateAlerts`: the rate rule (window rate vs baseline, volume floor, Wilson lower
  bound, hysteresis) applied to RateStates, emitting alert transitions.

Buckets are whole seconds of stream time, numbered ``t_ms // 1000``.  The engine closes every
bucket in order; a key's window is the last ``window`` *closed* buckets.  The math is in
docs/risk.md, "The rate rule".
"""

from __future__ import annotations

from collections import OrderedDict
from math import sqrt
from typing import Any, Callable, Iterator

import attrs

from payflux.risk.alerts import (
    ESCALATE, INSUFFICIENT_VOLUME, OPEN, RECOVERED, RESOLVE, THRESHOLD, Alert, Key, Transition,
)
from payflux.risk.config import RateRule

BUCKET_MS = 1000


def wilson_lower(k: int, n: int, z: float) -> float:
    """Lower end of the Wilson score interval of ``k`` successes in ``n`` trials at ``z`` sigmas."""
    if n <= 0:
        return 0.0
    p = k / n
    z2 = z * z
    centre = p + z2 / (2 * n)
    margin = z * sqrt(max(0.0, p * (1 - p) / n + z2 / (4 * n * n)))
    return max(0.0, (centre - margin) / (1 + z2 / n))


class KeyTable:
    """
    ``key -> state`` in least-recently-seen order, bounded by ``cap``.

    States carry ``last_seen`` (the bucket of their last event); the order is kept sorted by it
    (a state already seen in the current bucket is not moved again), which lets :meth:`live`
    stop at the first state seen too long ago.
    """

    __slots__ = ("dimension", "cap", "items", "evicted", "on_evict")

    def __init__(self, dimension: str, cap: int, on_evict: Callable[[Any, Any], None] | None = None) -> None:
        self.dimension = dimension
        self.cap = cap
        self.items: OrderedDict = OrderedDict()
        self.evicted = 0
        self.on_evict = on_evict

    def touch(self, key: Any, bucket: int, make: Callable[[Any, int], Any]) -> Any:
        """The state of ``key`` (created by ``make(key, bucket)`` if new), marked as seen in ``bucket``."""
        items = self.items
        s = items.get(key)
        if s is None:
            if len(items) >= self.cap:
                old_key, old = items.popitem(last=False)
                self.evicted += 1
                if self.on_evict is not None:
                    self.on_evict(old_key, old)
            s = items[key] = make(key, bucket)
        elif s.last_seen != bucket:
            items.move_to_end(key)
            s.last_seen = bucket
        return s

    def remove(self, key: Any) -> None:
        self.items.pop(key, None)

    def live(self, since: int) -> Iterator[Any]:
        """States seen in bucket ``since`` or later, most recent first."""
        for s in reversed(self.items.values()):
            if s.last_seen < since:
                return
            yield s

    def newest_seen(self) -> int | None:
        if not self.items:
            return None
        return self.items[next(reversed(self.items))].last_seen

    def __len__(self) -> int:
        return len(self.items)


class RateState:
    """One key's window and baseline.  ``cur_*`` count the open bucket; ``closed`` is the last closed bucket.

    ``*_e`` (only with ``expected=True``): the sum over the key's events of the rate its
    processor had at the time, i.e. how many matching events the processors "explain".
    """

    __slots__ = ("key", "cur_n", "cur_k", "cur_e", "ring_n", "ring_k", "ring_e", "sum_n", "sum_k", "sum_e",
                 "ewma_n", "ewma_k", "first", "last_seen", "closed", "last_n", "last_k", "streak", "alert", "peak",
                 "children", "parent")

    def __init__(self, key: Key, bucket: int, window: int, expected: bool = False) -> None:
        self.key = key
        self.cur_n = 0
        self.cur_k = 0
        self.cur_e = 0.0
        self.ring_n = [0] * window
        self.ring_k = [0] * window
        self.ring_e = [0.0] * window if expected else None
        self.sum_n = 0
        self.sum_k = 0
        self.sum_e = 0.0
        self.ewma_n = 0.0
        self.ewma_k = 0.0
        self.first = bucket
        self.last_seen = bucket
        self.closed = bucket - 1
        self.last_n = 0                 # events of the last closed bucket (the clustering parent's feed)
        self.last_k = 0
        self.streak = 0
        self.alert: Alert | None = None
        self.peak = 0.0
        self.children: dict | None = None
        self.parent: RateState | None = None


class RateAlerts:
    """
    The rate rule of one detector: closes buckets of :class:`RateState` s and opens/resolves
    alerts of ``alert_type`` through ``emit``.  ``names`` label the numbers of an alert:
    (matching events, all events, rate, baseline), e.g. ("failures", "events", "failure_rate",
    "baseline_rate").

    The baseline a key is judged against is its own EWMA rate; for a key whose state tracks an
    expected rate (merchants and geos under failure_rate), the higher of that and the rate its
    processors currently have, so a processor incident alerts once, on the processor, and a
    merchant or geo alerts only for failures beyond what its processors explain.
    """

    def __init__(self, rule: RateRule, alert_type: str, names: tuple[str, str, str, str],
                 emit: Callable[[Transition], None]) -> None:
        self.rule = rule
        self.type = alert_type
        self.window = rule.window_seconds
        self.decay = rule.decay
        self.names = names
        self.emit = emit
        self.open: dict[Key, RateState] = {}

    def close(self, s: RateState, b: int) -> None:
        """Move the open bucket's counts into the window as bucket ``b`` and update the baseline."""
        n, k = s.cur_n, s.cur_k
        i = b % self.window
        ring_n, ring_k = s.ring_n, s.ring_k
        old_n, old_k = ring_n[i], ring_k[i]  # bucket b - window, leaving the window
        s.sum_n += n - old_n
        s.sum_k += k - old_k
        ring_n[i] = n
        ring_k[i] = k
        ring_e = s.ring_e
        if ring_e is not None:
            s.sum_e += s.cur_e - ring_e[i]
            ring_e[i] = s.cur_e
            s.cur_e = 0.0
            if s.sum_n == 0:
                s.sum_e = 0.0  # no float drift across an empty window
        s.cur_n = s.cur_k = 0
        s.last_n = n
        s.last_k = k
        # The baseline learns from the buckets leaving the window, so it describes the time before
        # the window it is compared with; frozen while an alert is open, so an incident never
        # becomes the baseline.
        if s.alert is None:
            gap = b - s.closed
            f = self.decay if gap == 1 else self.decay ** gap
            s.ewma_n = s.ewma_n * f + old_n
            s.ewma_k = s.ewma_k * f + old_k
        s.closed = b

    def baseline(self, s: RateState) -> float:
        """The rate ``s`` is judged against (see the class docstring)."""
        own = s.ewma_k / s.ewma_n if s.ewma_n > 0 else 0.0
        if s.ring_e is not None and s.sum_n:
            expected = s.sum_e / s.sum_n
            if expected > own:
                return expected
        return own

    def numbers(self, s: RateState) -> dict:
        count, total, rate, baseline = self.names
        n, k = s.sum_n, s.sum_k
        own = s.ewma_k / s.ewma_n if s.ewma_n > 0 else 0.0
        out = {
            count: k,
            total: n,
            rate: round(k / n, 6) if n else None,
            baseline: round(own, 6),
            "threshold": round(self.threshold(self.baseline(s)), 6),
            "lower_bound": round(wilson_lower(k, n, self.rule.confidence_z), 6),
        }
        if s.ring_e is not None:
            out["expected_" + rate] = round(s.sum_e / n, 6) if n else None
        return out

    def threshold(self, base: float) -> float:
        r = self.rule
        return max(r.floor, base * r.ratio, base + r.min_increase)

    def evaluate(self, s: RateState, b: int) -> None:
        """Apply the rule to ``s`` after closing bucket ``b``; may emit one transition."""
        r = self.rule
        n = s.sum_n
        if s.alert is None:
            if n < r.min_events or b - s.first < r.warmup_seconds or s.ewma_n < r.min_events:
                s.streak = 0
                return
            base = self.baseline(s)
            threshold = self.threshold(base)
            if threshold < 1.0 and wilson_lower(s.sum_k, n, r.confidence_z) >= threshold:
                s.streak += 1
                if s.streak >= r.open_after_seconds:
                    self._open(s, b, base)
            else:
                s.streak = 0
            return
        rate = s.sum_k / n if n else 0.0
        if rate > s.peak:
            s.peak = rate
        base = self.baseline(s)
        threshold = self.threshold(base)
        low_volume = n < r.min_events
        if s.alert.severity != "critical" and not low_volume and self._critical(s, base):
            s.alert = attrs.evolve(s.alert, severity="critical")
            self.emit(Transition(ESCALATE, s.alert, (b + 1) * BUCKET_MS, THRESHOLD, self.numbers(s)))
        if low_volume or rate <= base + (threshold - base) * r.resolve_fraction:
            s.streak += 1
            if s.streak >= r.resolve_after_seconds:
                self.resolve(s, (b + 1) * BUCKET_MS, INSUFFICIENT_VOLUME if low_volume else RECOVERED)
        else:
            s.streak = 0

    def _open(self, s: RateState, b: int, base: float) -> None:
        numbers = self.numbers(s)
        severity = "critical" if self._critical(s, base) else "warning"
        at = (b + 1) * BUCKET_MS
        s.alert = Alert(self.type, s.key, severity, self.window, at, numbers)
        s.streak = 0
        s.peak = s.sum_k / s.sum_n
        self.open[s.key] = s
        self.emit(Transition(OPEN, s.alert, at, THRESHOLD, numbers))

    def _critical(self, s: RateState, base: float) -> bool:
        """Critical: the window rate is, with the rule's confidence, ``critical_increase`` above baseline."""
        return wilson_lower(s.sum_k, s.sum_n, self.rule.confidence_z) - base >= self.rule.critical_increase

    def resolve(self, s: RateState, at_ms: int, reason: str) -> None:
        """Resolve the open alert of ``s`` (no-op if none)."""
        if s.alert is None:
            return
        numbers = self.numbers(s)
        numbers["peak_" + self.names[2]] = round(s.peak, 6)
        alert, s.alert = s.alert, None
        s.streak = 0
        self.open.pop(s.key, None)
        self.emit(Transition(RESOLVE, alert, at_ms, reason, numbers))

    def stale_open(self, b: int) -> list[RateState]:
        """Open alerts whose state was not closed at bucket ``b`` by the live pass (their key went quiet)."""
        return [s for s in self.open.values() if s.closed < b]
