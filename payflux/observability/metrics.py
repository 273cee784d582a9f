"""
Prometheus metrics of one PayFlux process.

All metrics live in a :class:`Metrics` object with its own ``CollectorRegistry`` so that every
test (and every node in one process) counts on its own.  Label values are bounded: key ids come
from configuration, reasons from the fixed set of error codes.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


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

    def render(self) -> bytes:
        return generate_latest(self.registry)
