"""
Prometheus metrics of one PayFlux process.

All metrics live in a :class:`Metrics` object with its own ``CollectorRegistry`` so that every
test (and every node in one process) counts on its own.  Label values are bounded: key ids come
from configuration, reasons from the fixed set of error codes.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from payflux.exporters.metrics import ExporterMetrics

#: Alert lead times: 1 s to 24 h.
LEAD_TIME_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 14400, 28800, 43200, 86400)
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


IGNORED_FIELD_LABELS = 64
#: Distinct ``event_type`` labels of ``payflux_webhook_events_total`` per processor, then ``<other>``.
WEBHOOK_TYPE_LABELS = 64


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.events_accepted = Counter(
            "payflux_events_accepted", "Events appended to the stream.", ["key_id"], registry=r
        )
        self.events_duplicate = Counter(
            "payflux_events_duplicate",
            "Events answered as duplicates of an earlier event_id (nothing appended).",
            ["key_id"],
            registry=r,
        )
        self.requests_rejected = Counter(
            "payflux_requests_rejected",
            "Ingest requests answered with an error, by error code.",
            ["reason", "key_id"],
            registry=r,
        )
        self.events_rejected = Counter(
            "payflux_events_rejected",
            "Events in rejected ingest requests, by error code.",
            ["reason", "key_id"],
            registry=r,
        )
        self.ignored_fields = Counter(
            "payflux_events_ignored_fields",
            "Unknown event fields dropped at ingest (accepted, never stored), by field name; "
            f"at most {IGNORED_FIELD_LABELS} names, then <other>.",
            ["field"],
            registry=r,
        )
        self._ignored_labels: set[str] = set()
        self.request_latency = Histogram(
            "payflux_request_duration_seconds",
            "Time from a request's arrival in the app to its response.",
            ["endpoint", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.append_latency = Histogram(
            "payflux_redis_append_duration_seconds",
            "Time one append (one Lua call per partition) waited for Redis.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.http_fallbacks = Counter(
            "payflux_http_fallbacks_total",
            "Ingest connections handed from the fast path to the full HTTP stack, by why "
            "(route: not an ingest POST; refused: 401/429/503 at the end of the head; framing, "
            "too_large, head, head_size, expect, header_timeout: see docs/security.md).",
            ["reason"],
            registry=r,
        )
        self.inflight_requests = Gauge(
            "payflux_inflight_requests", "Ingest requests waiting for Redis.", registry=r
        )
        self.inflight_events = Gauge(
            "payflux_inflight_events", "Events in requests waiting for Redis.", registry=r
        )
        self.stream_length = Gauge(
            "payflux_stream_length", "XLEN of each partition's stream (sampled).", ["partition"], registry=r
        )
        self.redis_up = Gauge("payflux_redis_up", "1 if the last Redis probe answered.", registry=r)
        self.draining = Gauge("payflux_draining", "1 while the node drains for shutdown.", registry=r)
        self.consumers = ConsumerMetrics(r)
        self.exporters = ExporterMetrics(r)
        self.outcome_lead_time = Histogram(
            "payflux_alert_outcome_lead_time_seconds",
            "Seconds from an alert opening to the processor action an operator recorded for it "
            "(POST /v1/alerts/{id}/outcome, or a processor webhook's signal: observed_at - opened_at).",
            ["alert_type", "outcome_type"],
            buckets=LEAD_TIME_BUCKETS,
            registry=r,
        )
        self.outcomes_late = Counter(
            "payflux_alert_outcomes_late",
            "Recorded outcomes observed before their alert opened (negative lead time; not in the histogram).",
            ["alert_type", "outcome_type"],
            registry=r,
        )
        self._webhook_metrics(r)

    def _webhook_metrics(self, r: CollectorRegistry) -> None:
        """The processor webhooks' families (docs/producers.md, "Processor webhooks": "Metrics")."""
        self.webhook_requests = Counter(
            "payflux_webhook_requests",
            "Processor webhook deliveries by processor and result (accepted, duplicate, ignored, invalid_event, "
            "conflict, rejected_signature, rejected_malformed, too_large, unavailable).",
            ["processor", "result"],
            registry=r,
        )
        self.webhook_events = Counter(
            "payflux_webhook_events",
            "Events of processor webhook deliveries by processor, processor event type and outcome (accepted, "
            "duplicate, invalid, conflict, or the reason it was ignored).",
            ["processor", "event_type", "outcome"],
            registry=r,
        )
        self._webhook_types: dict[str, set[str]] = {}
        self.webhook_outcomes = Counter(
            "payflux_webhook_outcomes_recorded",
            "Outcomes recorded on open alerts from processor webhook signals (disputes, fraud notices, reviews).",
            ["processor"],
            registry=r,
        )
        self.webhook_outcome_failures = Counter(
            "payflux_webhook_outcome_failures",
            "Outcome signals of processor webhooks that could not be recorded (Redis unavailable, alert full, ...); "
            "the delivery was acknowledged anyway.",
            ["processor"],
            registry=r,
        )

    def count_webhook_event(self, processor: str, event_type: str, outcome: str, count: int = 1) -> None:
        """Count ``count`` events of one processor webhook delivery; at most
        :data:`WEBHOOK_TYPE_LABELS` event types per processor, then ``<other>``."""
        known = self._webhook_types.setdefault(processor, set())
        if event_type not in known:
            if len(known) >= WEBHOOK_TYPE_LABELS:
                event_type = "<other>"
            else:
                known.add(event_type)
        self.webhook_events.labels(processor, event_type, outcome).inc(count)

    def count_ignored(self, labels: list[str]) -> None:
        """Count dropped unknown fields; label cardinality stays bounded (``<other>``)."""
        known = self._ignored_labels
        for label in labels:
            if label not in known:
                if len(known) >= IGNORED_FIELD_LABELS:
                    label = "<other>"
                else:
                    known.add(label)
            self.ignored_fields.labels(label).inc()

    def observe_outcome(self, alert_type: str, outcome_type: str, lead_time_seconds: float) -> None:
        """One recorded outcome: its lead time in the histogram, or, if negative, counted as late."""
        if lead_time_seconds < 0:
            self.outcomes_late.labels(alert_type, outcome_type).inc()
        else:
            self.outcome_lead_time.labels(alert_type, outcome_type).observe(lead_time_seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class ConsumerMetrics:
    """
    Metrics of the consumer side (consumer groups, reclaim, dead letters, retention).

    Registered in the node's :class:`Metrics` registry so one ``/metrics`` shows both sides.
    Gauges whose value is unknown (e.g. lag that Redis 6.2 can't report and we couldn't compute)
    are *removed* for that label set, never set to 0.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        cg = ["consumer", "group"]
        self.processed = Counter("payflux_consumer_processed", "Entries a handler completed.", cg, registry=r)
        self.failed = Counter("payflux_consumer_failed", "Entries a handler failed (left pending).", cg, registry=r)
        self.acked = Counter("payflux_consumer_acked", "Entries acknowledged (XACK).", cg, registry=r)
        self.reclaimed = Counter(
            "payflux_consumer_reclaimed", "Entries claimed from idle consumers (XAUTOCLAIM).", cg, registry=r
        )
        self.dead_lettered = Counter(
            "payflux_consumer_dead_lettered",
            "Entries moved to the dead-letter stream after max_deliveries.",
            cg + ["error_class"],
            registry=r,
        )
        self.deleted_pending = Counter(
            "payflux_consumer_deleted_pending",
            "Pending entries whose stream entry was already deleted (counted as lost, then acked).",
            cg,
            registry=r,
        )
        self.group_recreated = Counter(
            "payflux_consumer_group_recreated", "Consumer groups (re)created after NOGROUP.", cg, registry=r
        )
        self.read_errors = Counter(
            "payflux_consumer_read_errors", "Failed XREADGROUP/XACK/XAUTOCLAIM steps (retried).", cg, registry=r
        )
        self.handler_latency = Histogram(
            "payflux_consumer_handler_duration_seconds",
            "Time a handler took for one batch.",
            cg,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "payflux_consumer_batch_size",
            "Entries per handler batch.",
            cg,
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000),
            registry=r,
        )
        self.lost_unconsumed = Counter(
            "payflux_stream_lost_unconsumed",
            "Entries trimmed at the hard cap before every group had them delivered and acked.",
            ["partition"],
            registry=r,
        )
        self.trimmed = Counter(
            "payflux_stream_trimmed", "Entries removed by retention (age/length/hard cap).", ["partition"], registry=r
        )
        self.lag = Gauge(
            "payflux_group_lag",
            "Entries in the stream not yet delivered to the group (absent when unknown).",
            ["group", "partition"],
            registry=r,
        )
        self.pending = Gauge(
            "payflux_group_pending", "Entries delivered but not acknowledged.", ["group", "partition"], registry=r
        )
        self.oldest_pending_age = Gauge(
            "payflux_group_oldest_pending_age_seconds",
            "Age (by stream id time) of the oldest pending entry; absent when nothing is pending.",
            ["group", "partition"],
            registry=r,
        )
        self.idle = Gauge(
            "payflux_group_idle_seconds",
            "Seconds since any consumer of the group last read or claimed on the partition (XINFO CONSUMERS); "
            "absent for a group without consumers.",
            ["group", "partition"],
            registry=r,
        )
        self.idle_warning = Gauge(
            "payflux_group_idle_warning_seconds",
            "The node's group_idle_warning: a group idle longer than this is stale (PayfluxConsumerGroupStale).",
            registry=r,
        )
        self.dlq_depth = Gauge("payflux_dlq_depth", "Entries in the dead-letter stream.", ["partition"], registry=r)


# --- multi-worker aggregation (``--workers N``): the supervisor's /metrics ---

#: Families each worker process counts for itself (the ingest path).  The supervisor's /metrics
#: shows them summed over its workers; every other family (Redis probe, stream length, consumers,
#: retention, the worker pool itself) is the supervisor's own.
WORKER_FAMILIES = frozenset(
    {
        "payflux_events_accepted",
        "payflux_events_duplicate",
        "payflux_requests_rejected",
        "payflux_events_rejected",
        "payflux_request_duration_seconds",
        "payflux_redis_append_duration_seconds",
        "payflux_inflight_requests",
        "payflux_inflight_events",
        "payflux_http_fallbacks",
        "payflux_draining",
        "payflux_webhook_requests",
        "payflux_webhook_events",
        "payflux_webhook_outcomes_recorded",
        "payflux_webhook_outcome_failures",
    }
)

#: Families both the supervisor (the alerts API on its side listener) and its workers (the
#: processor webhooks' outcome signals) count: the supervisor's /metrics shows its own samples
#: plus the workers'.
SHARED_FAMILIES = frozenset({"payflux_alert_outcome_lead_time_seconds", "payflux_alert_outcomes_late"})

#: Gauges combined with max instead of sum: "is any worker draining".
_MAX_GAUGES = frozenset({"payflux_draining"})


class SupervisorMetrics:
    """The worker pool's own metrics, registered in the supervisor's :class:`Metrics` registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.workers_running = Gauge(
            "payflux_workers_running", "Worker processes currently running.", registry=registry
        )
        self.workers_configured = Gauge(
            "payflux_workers_configured", "Worker processes the supervisor keeps running (--workers).",
            registry=registry,
        )
        self.worker_restarts = Counter(
            "payflux_worker_restarts",
            "Worker processes restarted after an unexpected exit.",
            ["worker"],
            registry=registry,
        )


_SampleKey = tuple  # (sample name, sorted label items)


class WorkerTotals:
    """
    Sums the worker-local families (:data:`WORKER_FAMILIES`) of several workers' /metrics texts.

    Counters and histograms of a worker that exited are folded into a *retired* total from its
    last snapshot (:meth:`retire`), so the summed counters never go down when a worker is
    restarted; increments a worker made after its last snapshot are lost with it.
    """

    def __init__(self) -> None:
        self._retired: dict[str, dict[_SampleKey, float]] = {}
        self._meta: dict[str, tuple[str, str]] = {}

    @staticmethod
    def _parse(text: str):
        from prometheus_client.parser import text_string_to_metric_families

        for family in text_string_to_metric_families(text):
            if family.name in WORKER_FAMILIES or family.name in SHARED_FAMILIES:
                yield family

    def retire(self, text: str) -> None:
        """Fold the last snapshot of a worker that has exited into the retired totals."""
        for family in self._parse(text):
            if family.type not in ("counter", "histogram"):
                continue
            self._meta[family.name] = (family.documentation, family.type)
            samples = self._retired.setdefault(family.name, {})
            for s in family.samples:
                key = (s.name, tuple(sorted(s.labels.items())))
                samples[key] = samples.get(key, 0.0) + s.value

    def render(self, own: CollectorRegistry, texts: list[str]) -> bytes:
        """Prometheus text: ``own`` minus the worker families, plus those families summed."""
        from prometheus_client.metrics_core import Metric

        totals: dict[str, dict[_SampleKey, float]] = {
            name: dict(samples) for name, samples in self._retired.items()
        }
        meta = dict(self._meta)
        for text in texts:
            for family in self._parse(text):
                meta[family.name] = (family.documentation, family.type)
                samples = totals.setdefault(family.name, {})
                combine = max if family.name in _MAX_GAUGES else (lambda a, b: a + b)
                for s in family.samples:
                    key = (s.name, tuple(sorted(s.labels.items())))
                    samples[key] = combine(samples[key], s.value) if key in samples else s.value

        families = []
        for family in own.collect():
            if family.name in SHARED_FAMILIES:
                meta.setdefault(family.name, (family.documentation, family.type))
                samples = totals.setdefault(family.name, {})
                for s in family.samples:
                    if not s.name.endswith("_created"):
                        key = (s.name, tuple(sorted(s.labels.items())))
                        samples[key] = samples.get(key, 0.0) + s.value
            elif family.name not in WORKER_FAMILIES:
                families.append(family)
        for name in sorted(totals):
            documentation, kind = meta[name]
            metric = Metric(name, documentation, kind)
            for (sample_name, labels), value in totals[name].items():
                metric.add_sample(sample_name, dict(labels), value)
            families.append(metric)

        class _Families:
            def collect(self):
                return families

        return generate_latest(_Families())  # type: ignore[arg-type]
