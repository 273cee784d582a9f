"""
Per-exporter metrics: ``payflux_exporter_*{exporter, consumer}``.

An exporter is built (``load_handler``) without the node's registry (the factory takes only
``reactor`` and its options; tests and benchmarks build one alone), so it starts
with :meth:`ExporterStats.unbound` (counting into a private registry, which tests read), and
the node calls ``handler.bind_metrics(metrics, consumer_name)`` with its
:class:`payflux.observability.metrics.Metrics` once the node's registry is there
(:func:`bind_exporter_metrics`); an exporter then takes ``metrics.exporters.stats(...)``, and
any other handler with metrics of its own (the risk consumer) registers them in
``metrics.registry``.  Counts are in events.
"""

from __future__ import annotations

from typing import Any

import attrs
from prometheus_client import CollectorRegistry, Counter, Gauge


class ExporterMetrics:
    """The metric families, registered once per registry (the node's :class:`Metrics` holds one)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["exporter", "consumer"]
        self.exported = Counter(
            "payflux_exporter_exported", "Events the destination confirmed.", labels, registry=registry
        )
        self.retried = Counter(
            "payflux_exporter_retried", "Delivery attempts retried (events x retries).", labels, registry=registry
        )
        self.failed = Counter(
            "payflux_exporter_failed",
            "Events whose delivery failed for this batch (left pending: reclaimed, then dead-lettered).",
            labels,
            registry=registry,
        )
        self.last_success = Gauge(
            "payflux_exporter_last_success_timestamp_seconds",
            "Unix time of the destination's last confirmed delivery.",
            labels,
            registry=registry,
        )

    def stats(self, exporter: str, consumer: str) -> "ExporterStats":
        """The label children for one exporter of one consumer."""
        return ExporterStats(
            exported=self.exported.labels(exporter, consumer),
            retried=self.retried.labels(exporter, consumer),
            failed=self.failed.labels(exporter, consumer),
            last_success=self.last_success.labels(exporter, consumer),
        )


@attrs.define
class ExporterStats:
    """What one exporter counts; ``succeeded(n, now)`` is the usual call after a confirmed delivery."""

    exported: Any
    retried: Any
    failed: Any
    last_success: Any

    @classmethod
    def unbound(cls, exporter: str, consumer: str = "") -> "ExporterStats":
        """Stats in a private registry: for an exporter not (yet) attached to a node, and for tests."""
        return ExporterMetrics(CollectorRegistry(auto_describe=True)).stats(exporter, consumer)

    def succeeded(self, count: int, now: float) -> None:
        self.exported.inc(count)
        self.last_success.set(now)


def bind_exporter_metrics(handler: Any, metrics: Any, consumer: str) -> None:
    """Point ``handler``'s counting at the node's :class:`Metrics`, if it has ``bind_metrics``."""
    bind = getattr(handler, "bind_metrics", None)
    if bind is not None:
        bind(metrics, consumer)
