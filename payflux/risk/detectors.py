"""
The three detectors.  Each keeps its own key tables (one per dimension, capped) and windows,
is fed classified events by :class:`payflux.risk.engine.RiskEngine` and closes one-second
buckets when the engine's stream clock passes them.  Pure Python: no Twisted, no clock.
"""

from __future__ import annotations

from typing import Callable

import attrs

from payflux.risk.alerts import (
    ESCALATE, EVICTED, FAILURE_CLUSTER, FAILURE_RATE_SPIKE, OPEN, RECOVERED, RESOLVE, RETRY_STORM, THRESHOLD,
    Alert, Transition,
)
from payflux.risk.config import FailureClusterConfig, FailureRateConfig, RetryStormConfig
from payflux.risk.windows import BUCKET_MS, KeyTable, RateAlerts, RateState

Emit = Callable[[Transition], None]
EXPECTED_MIN_EVENTS = 50  # outcomes in a processor's last second for its per-second rate to be used
Now = Callable[[], int]


class FailureRateDetector:
    """
    ``failure_rate_spike``: failed / (failed + succeeded) per key vs the key's own baseline.

    Merchants and geos are also compared with what their processors explain: each of their
    events adds its processor's current failure rate to an "expected failures" sum (see
    :class:`payflux.risk.windows.RateAlerts`), so one processor incident is one alert.
    """

    def __init__(self, config: FailureRateConfig, caps: dict, emit: Emit, now: Now) -> None:
        self.alerts = RateAlerts(config.rule, FAILURE_RATE_SPIKE,
                                 ("failures", "events", "failure_rate", "baseline_rate"), emit)
        self.window = config.rule.window_seconds
        self.min_events = config.rule.min_events
        self.now = now
        self.processors: KeyTable | None = None
        self.others: list[tuple[str, KeyTable, Callable]] = []
        relative = "processor" in config.dimensions
        for dim in config.dimensions:
            table = KeyTable(dim, caps[dim], self._evicted)
            if dim == "processor":
                self.processors = table
            else:
                self.others.append((dim, table, lambda v, b, dim=dim: RateState(((dim, v),), b, self.window,
                                                                                 expected=relative)))
        w = self.window
        self._make_processor = lambda v, b: RateState((("processor", v),), b, w)
        self.expected: dict[str, float] = {}  # processor -> failure rate as of the last closed second

    @property
    def tables(self) -> list[tuple[str, KeyTable]]:
        out = [("processor", self.processors)] if self.processors is not None else []
        return out + [(dim, t) for dim, t, _ in self.others]

    def observe(self, event: dict, processor: str, failed: bool, b: int) -> None:
        if self.processors is not None:
            s = self.processors.touch(processor, b, self._make_processor)
            s.cur_n += 1
            if failed:
                s.cur_k += 1
        expected = self.expected.get(processor, 0.0)
        for dim, table, make in self.others:
            v = event.get(dim)
            if v and type(v) is str:  # "" is absent
                s = table.touch(v, b, make)
                s.cur_n += 1
                s.cur_e += expected
                if failed:
                    s.cur_k += 1

    def close(self, b: int) -> None:
        alerts = self.alerts
        since = b - self.window
        if self.processors is not None:
            expected = {}
            for s in self.processors.live(since):
                alerts.close(s, b)
                alerts.evaluate(s, b)
                # the processor's rate in the second just closed (its window rate would lag the
                # merchants' own windows by several seconds), unless that second is too thin
                if s.last_n >= EXPECTED_MIN_EVENTS:
                    expected[s.key[0][1]] = s.last_k / s.last_n
                elif s.sum_n >= self.min_events:
                    expected[s.key[0][1]] = s.sum_k / s.sum_n
                elif s.ewma_n > 0:
                    expected[s.key[0][1]] = s.ewma_k / s.ewma_n
            self.expected = expected
        for _, table, _ in self.others:
            for s in table.live(since):
                alerts.close(s, b)
                alerts.evaluate(s, b)
        for s in alerts.stale_open(b):
            alerts.close(s, b)
            alerts.evaluate(s, b)

    def busy(self, b: int) -> bool:
        if self.alerts.open:
            return True
        since = b - self.window
        for _, table in self.tables:
            newest = table.newest_seen()
            if newest is not None and newest >= since:
                return True
        return False

    def _evicted(self, key: str, s: RateState) -> None:
        self.alerts.resolve(s, self.now(), EVICTED)

    def table(self, dim: str) -> KeyTable | None:
        for d, t in self.tables:
            if d == dim:
                return t
        return None


class _Intent:
    """Attempts of one payment intent: a sliding-window counter (this window and the previous one)."""

    __slots__ = ("last_seen", "w", "cur", "prev", "processor", "merchant", "max_retry", "streak", "alert")

    def __init__(self, key: str, bucket: int) -> None:
        self.last_seen = bucket
        self.w = -1
        self.cur = 0
        self.prev = 0
        self.processor = ""
        self.merchant = None
        self.max_retry = 0
        self.streak = 0
        self.alert: Alert | None = None


class RetryStormDetector:
    """
    ``retry_storm``, two ways:

    - per ``payment_intent_id_hash``: attempts (failed or retry events) of one intent within the
      window reach ``intent_attempts``;
    - per ``processor``: the share of retry events (``retry_count > 0`` or a retry event type)
      among all its events vs its own baseline (the rate rule).

    Retries whose ``retry_result`` says they succeeded are left out of both (the engine passes
    ``retry=False`` for them): a storm is retries failing again, or of unknown result.
    """

    def __init__(self, config: RetryStormConfig, caps: dict, emit: Emit, now: Now) -> None:
        self.alerts = RateAlerts(config.rule, RETRY_STORM, ("retries", "events", "retry_share", "baseline_share"), emit)
        self.window = config.rule.window_seconds
        self.window_ms = self.window * BUCKET_MS
        self.rule = config.rule
        self.emit = emit
        self.now = now
        self.intent_attempts = config.intent_attempts
        self.critical_attempts = config.intent_critical_attempts
        self.max_intent_alerts = config.max_intent_alerts
        self.processors = KeyTable("processor", caps["processor"], self._evicted_processor)
        self.intents = KeyTable("payment_intent_id_hash", caps["payment_intent_id_hash"], self._evicted_intent)
        self.open_intents: dict[str, _Intent] = {}
        self.suppressed = 0  # intent alerts not opened because max_intent_alerts were open
        w = self.window
        self._make = lambda v, b: RateState((("processor", v),), b, w)

    def observe(self, event: dict, processor: str, failed: bool, retry: bool, retry_count: int,
                t_ms: int, b: int) -> None:
        s = self.processors.touch(processor, b, self._make)
        s.cur_n += 1
        if retry:
            s.cur_k += 1
        if not (retry or failed) or not self.intent_attempts:
            return
        key = event.get("payment_intent_id_hash")
        if not key or type(key) is not str:  # optional; "" is absent
            return
        i = self.intents.touch(key, b, _Intent)
        w = t_ms // self.window_ms
        if w > i.w:
            i.prev = i.cur if w == i.w + 1 else 0
            i.cur = 0
            i.w = w
        i.cur += 1  # an event older than the intent's current window counts in it (no reordering)
        i.processor = processor
        merchant = event.get("merchant_id_hash")
        if merchant and type(merchant) is str:
            i.merchant = merchant
        if retry_count > i.max_retry:
            i.max_retry = retry_count
        attempts = self._estimate(i, t_ms)
        if i.alert is None:
            if attempts >= self.intent_attempts:
                if len(self.open_intents) >= self.max_intent_alerts:
                    self.suppressed += 1
                else:
                    self._open_intent(key, i, t_ms, attempts)
        elif i.alert.severity != "critical" and attempts >= self.critical_attempts:
            i.alert = _evolve_severity(i.alert)
            self.emit(Transition(ESCALATE, i.alert, t_ms, THRESHOLD, self._intent_numbers(i, attempts)))

    def _estimate(self, i: _Intent, t_ms: int) -> float:
        """Attempts in the window ending at ``t_ms``: the current window's count plus the
        previous window's, weighted by how much of it the sliding window still covers."""
        w = t_ms // self.window_ms
        frac = (t_ms - w * self.window_ms) / self.window_ms
        if w <= i.w:
            return i.cur + i.prev * (1.0 - frac)
        if w == i.w + 1:
            return i.cur * (1.0 - frac)
        return 0.0

    def _intent_numbers(self, i: _Intent, attempts: float) -> dict:
        return {"attempts": round(attempts, 2), "intent_attempts": self.intent_attempts,
                "processor": i.processor, "merchant_id_hash": i.merchant, "max_retry_count": i.max_retry}

    def _open_intent(self, key: str, i: _Intent, t_ms: int, attempts: float) -> None:
        numbers = self._intent_numbers(i, attempts)
        severity = "critical" if attempts >= self.critical_attempts else "warning"
        i.alert = Alert(RETRY_STORM, (("payment_intent_id_hash", key),), severity, self.window, t_ms, numbers)
        i.streak = 0
        self.open_intents[key] = i
        self.emit(Transition(OPEN, i.alert, t_ms, THRESHOLD, numbers))

    def _resolve_intent(self, key: str, i: _Intent, at_ms: int, reason: str) -> None:
        if i.alert is None:
            return
        alert, i.alert = i.alert, None
        self.open_intents.pop(key, None)
        self.emit(Transition(RESOLVE, alert, at_ms, reason, self._intent_numbers(i, self._estimate(i, at_ms))))

    def close(self, b: int) -> None:
        alerts = self.alerts
        for s in self.processors.live(b - self.window):
            alerts.close(s, b)
            alerts.evaluate(s, b)
        for s in alerts.stale_open(b):
            alerts.close(s, b)
            alerts.evaluate(s, b)
        if self.open_intents:
            end = (b + 1) * BUCKET_MS
            limit = self.intent_attempts * self.rule.resolve_fraction
            for key, i in list(self.open_intents.items()):
                if self._estimate(i, end) <= limit:
                    i.streak += 1
                    if i.streak >= self.rule.resolve_after_seconds:
                        self._resolve_intent(key, i, end, RECOVERED)
                else:
                    i.streak = 0

    def busy(self, b: int) -> bool:
        newest = self.processors.newest_seen()
        return bool(self.alerts.open or self.open_intents) or (newest is not None and newest >= b - self.window)

    def _evicted_processor(self, key: str, s: RateState) -> None:
        self.alerts.resolve(s, self.now(), EVICTED)

    def _evicted_intent(self, key: str, i: _Intent) -> None:
        self._resolve_intent(key, i, self.now(), EVICTED)

    def stop(self, at_ms: int, reason: str) -> None:
        for key, i in list(self.open_intents.items()):
            self._resolve_intent(key, i, at_ms, reason)


def _evolve_severity(alert: Alert) -> Alert:
    return attrs.evolve(alert, severity="critical")


class FailureClusterDetector:
    """
    ``failure_cluster``: the share of one ``failure_category`` (or ``geo_bucket``, or
    ``failure_origin``) among a processor's failures vs that pair's own baseline share.

    Children ``(processor, value)`` are closed with their parent processor: their window total
    is the processor's failures, so a child's baseline is updated every second its processor is
    live, including seconds the child itself had no failures.  A child first seen under a
    warmed-up processor starts with the processor's baseline volume and a share of 0, so a new
    category that suddenly dominates alerts without waiting for a warm-up of its own.
    """

    def __init__(self, config: FailureClusterConfig, caps: dict, emit: Emit, now: Now) -> None:
        self.alerts = RateAlerts(config.rule, FAILURE_CLUSTER,
                                 ("cluster_failures", "failures", "share", "baseline_share"), emit)
        self.window = config.rule.window_seconds
        self.now = now
        self.parents = KeyTable("processor", caps["processor"], self._evicted_parent)
        self.children = [(dim, KeyTable(dim, caps[dim], self._evicted_child)) for dim in config.dimensions]
        self._parent: RateState | None = None
        self._dim = ""
        w = self.window
        self._make_parent = lambda v, b: _parent_state(v, b, w)

    def _make_child(self, key: tuple[str, str], b: int) -> RateState:
        parent = self._parent
        assert parent is not None
        s = RateState((("processor", key[0]), (self._dim, key[1])), b, self.window)
        s.first = parent.first
        s.ring_n = parent.ring_n[:]  # the processor's failures are the child's window total
        s.sum_n = parent.sum_n
        s.ewma_n = parent.ewma_n
        s.closed = parent.closed
        s.parent = parent
        parent.children[(self._dim, key[1])] = s
        return s

    def observe(self, event: dict, processor: str, b: int) -> None:
        parent = self.parents.touch(processor, b, self._make_parent)
        parent.cur_n += 1
        self._parent = parent
        for dim, table in self.children:
            v = event.get(dim)
            if v and type(v) is str:  # "" is absent
                self._dim = dim
                table.touch((processor, v), b, self._make_child).cur_k += 1

    def close(self, b: int) -> None:
        alerts = self.alerts
        for parent in self.parents.live(b - self.window):
            alerts.close(parent, b)
            n = parent.last_n
            for s in parent.children.values():
                s.cur_n = n
                alerts.close(s, b)
                alerts.evaluate(s, b)
        for s in alerts.stale_open(b):  # processor quiet: no failures to share
            s.cur_n = 0
            alerts.close(s, b)
            alerts.evaluate(s, b)

    def busy(self, b: int) -> bool:
        newest = self.parents.newest_seen()
        return bool(self.alerts.open) or (newest is not None and newest >= b - self.window)

    def _evicted_child(self, key: tuple[str, str], s: RateState) -> None:
        self.alerts.resolve(s, self.now(), EVICTED)
        if s.parent is not None and s.parent.children is not None:
            s.parent.children.pop((s.key[1][0], key[1]), None)

    def _evicted_parent(self, key: str, parent: RateState) -> None:
        tables = dict(self.children)
        for (dim, value), s in parent.children.items():
            tables[dim].remove((key, value))
            self.alerts.resolve(s, self.now(), EVICTED)
        parent.children.clear()


def _parent_state(processor: str, b: int, window: int) -> RateState:
    s = RateState((("processor", processor),), b, window)
    s.children = {}
    return s

