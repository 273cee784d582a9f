"""
``payflux_risk_*`` metrics of the risk consumer, labelled by ``consumer`` (the [[consumers]]
name), so several risk consumers can share one node registry.

The handler starts with a private registry (:meth:`RiskMetrics.unbound`; tests read it) and
moves to the node's registry when the node calls ``handler.bind_metrics(metrics, consumer)``.
The families are registered once per registry.  Label values are bounded: ``processor`` by the
processor cardinality cap (a processor's series is removed when it leaves the window or is
evicted), ``type``/``severity``/``reason``/``sink``/``detector``/``dimension``/``origin`` by
fixed sets (``origin``: :data:`payflux.risk.engine.ORIGINS`, ``other``, ``none``).
The health families (``payflux_risk_processor_*``) carry ``processor`` (the health processor
table's cap; a processor's series are removed when it leaves the health window), ``band`` and
``driver`` (fixed sets: :data:`payflux.risk.health.BANDS`, :data:`~payflux.risk.health.DRIVERS`);
``payflux_risk_retry_success_rate`` carries ``processor`` × ``failure_category`` pairs, at most
``max_keys.failure_category`` of them (a pair's series is removed when it has no retry in the
retry_insight window).
"""

from __future__ import annotations

import weakref
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from payflux.risk.alerts import ALERT_TYPES, ESCALATE, OPEN, RESOLVE, Transition
from payflux.risk.health import BANDS

_FAMILIES: "weakref.WeakKeyDictionary[CollectorRegistry, _Families]" = weakref.WeakKeyDictionary()


class _Families:
    def __init__(self, r: CollectorRegistry) -> None:
        c = ["consumer"]
        self.failure_rate = Gauge(
            "payflux_risk_failure_rate",
            "Failure rate per processor over the failure_rate window (failed / (failed + succeeded)).",
            c + ["processor"], registry=r)
        self.failure_rate_baseline = Gauge(
            "payflux_risk_failure_rate_baseline",
            "The processor's adaptive (EWMA) failure-rate baseline the window is compared with.",
            c + ["processor"], registry=r)
        self.active = Gauge("payflux_risk_active_alerts", "Open risk alerts by type.", c + ["type"], registry=r)
        self.opened = Counter("payflux_risk_alerts_opened", "Risk alerts opened.", c + ["type", "severity"],
                              registry=r)
        self.escalated = Counter("payflux_risk_alerts_escalated", "Open warnings that became critical.",
                                 c + ["type"], registry=r)
        self.resolved = Counter("payflux_risk_alerts_resolved", "Risk alerts resolved, by reason.",
                                c + ["type", "reason"], registry=r)
        self.events = Counter("payflux_risk_events", "Payment events counted by the detectors.", c, registry=r)
        self.failures = Counter("payflux_risk_failures",
                                "Failed payment events counted by the detectors, by failure_origin (processor, "
                                "network, issuer, merchant, customer; other: any other value; none: not sent).",
                                c + ["origin"], registry=r)
        self.ignored = Counter("payflux_risk_events_ignored",
                               "Entries without a string processor field (not payment events).", c, registry=r)
        self.stream_time = Gauge("payflux_risk_stream_time_seconds",
                                 "The detectors' stream clock (received_at of the newest event, or idle-advanced).",
                                 c, registry=r)
        self.tracked = Gauge("payflux_risk_tracked_keys", "Keys held per detector and dimension.",
                             c + ["detector", "dimension"], registry=r)
        self.evicted = Counter("payflux_risk_evicted_keys",
                               "Keys evicted (least recently seen first) by a cardinality cap.",
                               c + ["detector", "dimension"], registry=r)
        self.suppressed = Counter("payflux_risk_intent_alerts_suppressed",
                                  "Per-intent retry storms not opened because max_intent_alerts were open.",
                                  c, registry=r)
        self.delivery_failed = Counter("payflux_risk_alert_delivery_failures",
                                       "Failed attempts to deliver an alert transition (retried).",
                                       c + ["sink"], registry=r)
        self.dropped = Counter("payflux_risk_alerts_dropped",
                               "Alert transitions given up on (queue full or attempts exhausted).",
                               c + ["sink"], registry=r)
        self.processor_score = Gauge("payflux_risk_processor_score",
                                     "Processor health score, 0 (healthy) to 1 (docs/risk.md, \"Processor health\").",
                                     c + ["processor"], registry=r)
        self.processor_band = Gauge("payflux_risk_processor_band",
                                    "1 for the processor's current health band (low, elevated, high, critical), "
                                    "0 for the others.", c + ["processor", "band"], registry=r)
        self.processor_driver = Gauge("payflux_risk_processor_driver",
                                      "What each named driver contributes to the processor's health score.",
                                      c + ["processor", "driver"], registry=r)
        self.retry_success_rate = Gauge("payflux_risk_retry_success_rate",
                                        "Share of retries (retry_count > 0 with a retry_result) that succeeded, "
                                        "per processor and failure_category, over the retry_insight window.",
                                        c + ["processor", "failure_category"], registry=r)


def _families(registry: CollectorRegistry) -> _Families:
    f = _FAMILIES.get(registry)
    if f is None:
        f = _FAMILIES[registry] = _Families(registry)
    return f


class RiskMetrics:
    """The label children of one risk consumer; :meth:`update` mirrors the engine after each step."""

    def __init__(self, registry: CollectorRegistry, consumer: str) -> None:
        self.registry = registry
        self.consumer = consumer
        self.f = _families(registry)
        self._processors: set[str] = set()
        self._evicted: dict[tuple[str, str], int] = {}
        self._events = 0
        self._ignored = 0
        self._failures: dict[str, int] = {}
        self._suppressed = 0
        self._health_at: int | None = None        # the health second last mirrored
        self._health_processors: dict[str, list[str]] = {}  # processor -> its driver names
        self._retry_pairs: set[tuple[str, str]] = set()
        for t in ALERT_TYPES:
            self.f.active.labels(consumer, t).set(0)

    @classmethod
    def unbound(cls) -> "RiskMetrics":
        return cls(CollectorRegistry(auto_describe=True), "")

    def update(self, engine: Any, transitions: list[Transition]) -> None:
        f, c = self.f, self.consumer
        for tr in transitions:
            t = tr.alert.type
            if tr.action == OPEN:
                f.opened.labels(c, t, tr.alert.severity).inc()
            elif tr.action == ESCALATE:
                f.escalated.labels(c, t).inc()
            elif tr.action == RESOLVE:
                f.resolved.labels(c, t, tr.reason).inc()
        for t, n in engine.active_alerts().items():
            f.active.labels(c, t).set(n)
        rates = engine.processor_failure_rates()
        for p in self._processors - rates.keys():
            f.failure_rate.remove(c, p)
            f.failure_rate_baseline.remove(c, p)
        for p, (rate, baseline) in rates.items():
            f.failure_rate.labels(c, p).set(rate)
            f.failure_rate_baseline.labels(c, p).set(baseline)
        self._processors = set(rates)
        for detector, dimension, table in engine.tables():
            f.tracked.labels(c, detector, dimension).set(len(table))
            seen = self._evicted.get((detector, dimension), 0)
            if table.evicted > seen:
                f.evicted.labels(c, detector, dimension).inc(table.evicted - seen)
                self._evicted[(detector, dimension)] = table.evicted
        self._events = _add(f.events.labels(c), engine.events, self._events)
        self._ignored = _add(f.ignored.labels(c), engine.ignored, self._ignored)
        for origin, n in engine.failures_by_origin.items():
            self._failures[origin] = _add(f.failures.labels(c, origin), n, self._failures.get(origin, 0))
        if engine.retry_storm is not None:
            self._suppressed = _add(f.suppressed.labels(c), engine.retry_storm.suppressed, self._suppressed)
        if engine.now_ms is not None:
            f.stream_time.labels(c).set(engine.now_ms / 1000)
        health = getattr(engine, "health", None)
        if health is not None and health.closed != self._health_at:
            self._health_at = health.closed
            self._update_health(health)

    def _update_health(self, health: Any) -> None:
        """Mirror the processors' scores (every closed second) and the retry success rates."""
        f, c = self.f, self.consumer
        results = health.results
        for p in self._health_processors.keys() - results.keys():
            f.processor_score.remove(c, p)
            for band in BANDS:
                f.processor_band.remove(c, p, band)
            for name in self._health_processors[p]:
                f.processor_driver.remove(c, p, name)
        seen = {}
        for p, r in results.items():
            f.processor_score.labels(c, p).set(r["score"])
            for band in BANDS:
                f.processor_band.labels(c, p, band).set(1 if band == r["band"] else 0)
            names = []
            for d in r["drivers"]:
                f.processor_driver.labels(c, p, d["name"]).set(d["contribution"])
                names.append(d["name"])
            seen[p] = names
        self._health_processors = seen
        pairs = set()
        for row in health.retry_rows():
            if row["retry_success_rate"] is None:
                continue
            key = (row["processor"], row["failure_category"])
            f.retry_success_rate.labels(c, *key).set(row["retry_success_rate"])
            pairs.add(key)
        for key in self._retry_pairs - pairs:
            f.retry_success_rate.remove(c, *key)
        self._retry_pairs = pairs

    def delivery_failed(self, sink: str) -> None:
        self.f.delivery_failed.labels(self.consumer, sink).inc()

    def dropped(self, sink: str, count: int = 1) -> None:
        self.f.dropped.labels(self.consumer, sink).inc(count)


def _add(counter: Any, total: int, seen: int) -> int:
    if total > seen:
        counter.inc(total - seen)
    return total
