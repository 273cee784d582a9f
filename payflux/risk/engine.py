"""
RiskEngine: the detector core.  Feed it events with their stream time; it keeps the windows,
runs the detectors once per closed one-second bucket and collects alert transitions.

Pure and synchronous (no Twisted, no I/O, no clock of its own): time is only what the caller
passes (``observe(event, t_ms)``, ``advance(t_ms)``), so tests and benchmarks drive it at any
rate.  :class:`payflux.risk.handler.RiskHandler` adapts consumer entries to it.

Outcomes (docs/risk.md, "What counts as a failure"): an event is a failure if its
``event_type`` is in ``failure_event_types``; otherwise, with ``outcome_fields`` (the default),
if its ``retry_result`` is a failure value (:data:`FAILED_RESULTS`, any case), or, unless its
``retry_result`` is a success value (:data:`SUCCEEDED_RESULTS`), if it carries a
``failure_category``, ``failure_origin`` or ``failure_code``.  It is a success if it is not a
failure and its ``event_type`` is in ``success_event_types`` or its ``retry_result`` is a
success value.  Anything else is not an outcome (failure_rate doesn't count it).  A retry
(``retry_count > 0`` or a ``retry_event_types`` type) whose ``retry_result`` is a success
value is a retry that worked: retry_storm doesn't count it.  "" counts as absent everywhere.

Stream clock: ``now_ms`` is the largest time seen.  An event older than that is counted in the
current bucket (no reordering, nothing dropped); buckets close in order when the clock passes
them.  After a gap in which no key has anything left in any window, the empty seconds are
skipped in one step (baselines decay by the gap when their key is seen again).

Processor health and retry insight (``health``, a :class:`payflux.risk.health.HealthTracker`;
None with ``health.enabled = false``) are fed the same classified events and closed after the
detectors in the same seconds; they emit no transitions (the handler publishes their snapshot).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from payflux.risk.alerts import CONSUMER_STOPPED, Transition
from payflux.risk.config import (  # noqa: F401 (FAILED_RESULTS, SUCCEEDED_RESULTS: re-exported)
    FAILED_RESULTS, SUCCEEDED_RESULTS, EngineConfig, parse_options,
)
from payflux.risk.detectors import FailureClusterDetector, FailureRateDetector, RetryStormDetector
from payflux.risk.health import HealthTracker
from payflux.risk.windows import BUCKET_MS

#: ``failure_origin`` values (lower-cased) that are their own label of
#: ``payflux_risk_failures_total{origin}``; any other value is "other", none sent is "none".
ORIGINS = ("processor", "network", "issuer", "merchant", "customer")
_ORIGIN_LABELS = {o: o for o in ORIGINS}


class RiskEngine:
    """See the module docstring.  ``take()`` returns (and forgets) the transitions so far."""

    def __init__(self, config: EngineConfig | None = None) -> None:
        self.config = config if config is not None else parse_options({}).engine
        c = self.config
        self.now_ms: int | None = None
        self.bucket: int | None = None     # the open (not yet closed) bucket
        self.events = 0                    # events observed
        self.ignored = 0                   # events without a string ``processor`` (not payment events)
        self.failures_by_origin: Counter = Counter()  # failures by failure_origin label (ORIGINS, other, none)
        self.transitions: list[Transition] = []
        emit = self.transitions.append
        now = self._now
        caps = c.max_keys
        self.failure_rate = FailureRateDetector(c.failure_rate, caps, emit, now) if c.failure_rate.enabled else None
        self.retry_storm = RetryStormDetector(c.retry_storm, caps, emit, now) if c.retry_storm.enabled else None
        self.failure_cluster = (FailureClusterDetector(c.failure_cluster, caps, emit, now)
                                if c.failure_cluster.enabled else None)
        self.detectors: list[Any] = [d for d in (self.failure_rate, self.retry_storm, self.failure_cluster) if d]
        self.health = (HealthTracker(c.health, c.retry_insight if c.retry_insight.enabled else None, caps)
                       if c.health.enabled else None)
        self._failure = c.failure_event_types
        self._success = c.success_event_types
        self._retry = c.retry_event_types
        self._fields = c.outcome_fields

    def _now(self) -> int:
        return self.now_ms if self.now_ms is not None else 0

    def observe(self, event: dict, t_ms: int) -> None:
        """Count one payment event that PayFlux received at ``t_ms`` (Unix ms)."""
        if self.bucket is None:
            self.now_ms = t_ms
            self.bucket = t_ms // BUCKET_MS
        elif t_ms > self.now_ms:  # type: ignore[operator]
            self.now_ms = t_ms
            b = t_ms // BUCKET_MS
            if b > self.bucket:
                self._roll(b)
        processor = event.get("processor")
        if type(processor) is not str:
            self.ignored += 1
            return
        self.events += 1
        b = self.bucket
        get = event.get
        kind = get("event_type")
        failed = kind in self._failure
        worked = False  # not a failure, and retry_result says the attempt succeeded
        if self._fields and not failed:
            result = get("retry_result")
            if result and type(result) is str:
                result = result.lower()
                if result in FAILED_RESULTS:
                    failed = True
                elif result in SUCCEEDED_RESULTS:
                    worked = True
            if not (failed or worked):
                failed = bool(get("failure_category") or get("failure_origin") or get("failure_code"))
        rc = get("retry_count")
        retry_count = rc if type(rc) is int else 0
        retry = retry_count > 0 or kind in self._retry
        if failed:
            origin = get("failure_origin")
            self.failures_by_origin[
                _ORIGIN_LABELS.get(origin.lower(), "other") if origin and type(origin) is str else "none"] += 1
        if self.failure_rate is not None and (failed or worked or kind in self._success):
            self.failure_rate.observe(event, processor, failed, b)
        if self.retry_storm is not None:
            self.retry_storm.observe(event, processor, failed, retry and not worked, retry_count, t_ms, b)
        if self.failure_cluster is not None and failed:
            self.failure_cluster.observe(event, processor, b)
        if self.health is not None:
            self.health.observe(event, processor, failed, failed or worked or kind in self._success, retry, b)

    def advance(self, t_ms: int) -> None:
        """Move the stream clock to ``t_ms`` without an event (a quiet stream); never backwards."""
        if self.bucket is None:
            self.now_ms = t_ms
            self.bucket = t_ms // BUCKET_MS
            return
        if t_ms > self.now_ms:  # type: ignore[operator]
            self.now_ms = t_ms
            b = t_ms // BUCKET_MS
            if b > self.bucket:
                self._roll(b)

    def _roll(self, b: int) -> None:
        """Close buckets ``self.bucket .. b-1`` in order; skip a stretch in which nothing is live."""
        cur = self.bucket
        detectors = self.detectors
        health = self.health
        while cur < b:  # type: ignore[operator]
            for d in detectors:
                d.close(cur)
            if health is not None:
                health.close(cur)
            cur += 1  # type: ignore[operator]
            if cur < b and not any(d.busy(cur) for d in detectors) and not (health and health.busy(cur)):
                cur = b
        if health is not None:
            health.closed = b - 1  # skipped seconds were empty: its (empty) results hold for them too
        self.bucket = b

    def take(self) -> list[Transition]:
        """The transitions emitted since the last call, in order."""
        out = self.transitions[:]
        del self.transitions[:]
        return out

    def stop(self, reason: str = CONSUMER_STOPPED) -> None:
        """Resolve every open alert (``reason``) at the current stream time: the state is in memory only."""
        at = self._now()
        for d in self.detectors:
            for s in list(d.alerts.open.values()):
                d.alerts.resolve(s, at, reason)
        if self.retry_storm is not None:
            self.retry_storm.stop(at, reason)

    # -- what the metrics show ------------------------------------------------------------------

    def processor_failure_rates(self) -> dict[str, tuple[float, float]]:
        """``processor -> (failure rate in the failure_rate window, baseline)`` for processors with
        outcome events in that window (empty if failure_rate is off or has no processor dimension)."""
        d = self.failure_rate
        table = d.table("processor") if d is not None else None
        if table is None or self.bucket is None:
            return {}
        out = {}
        for s in table.live(self.bucket - d.window):
            if s.sum_n:
                out[s.key[0][1]] = (s.sum_k / s.sum_n, s.ewma_k / s.ewma_n if s.ewma_n else 0.0)
        return out

    def active_alerts(self) -> Counter:
        """Open alerts by type."""
        c: Counter = Counter()
        for d in self.detectors:
            c[d.alerts.type] += len(d.alerts.open)
        if self.retry_storm is not None:
            c[self.retry_storm.alerts.type] += len(self.retry_storm.open_intents)
        return c

    def tables(self) -> list[tuple[str, str, Any]]:
        """``(detector, dimension, KeyTable)`` of every key table (sizes and eviction counts)."""
        out = []
        if self.failure_rate is not None:
            out += [("failure_rate", dim, t) for dim, t in self.failure_rate.tables]
        if self.retry_storm is not None:
            out += [("retry_storm", "processor", self.retry_storm.processors),
                    ("retry_storm", "payment_intent_id_hash", self.retry_storm.intents)]
        if self.failure_cluster is not None:
            out += [("failure_cluster", "processor", self.failure_cluster.parents)]
            out += [("failure_cluster", dim, t) for dim, t in self.failure_cluster.children]
        if self.health is not None:
            out += [(detector, dim, t) for detector, dim, t in self.health.tables()]
        return out
