"""
The operator's status page on the side port: ``GET /status`` (``status.html`` beside this
module: one self-contained page, inline CSS and JS, nothing fetched from outside the machine)
and ``GET /status.json``, which the page polls every 2 seconds.

Every number comes from the same metric families ``/metrics`` serves, never from a second set
of counters: a node collects its own registry (``registry.collect()``); a ``--workers``
supervisor uses the text of its summed ``/metrics`` (its own families plus the workers' ingest
families summed, :meth:`payflux.supervisor.WorkerPool.render_metrics`), parsed back.  So what the
page says is exactly what Prometheus scrapes.

Throughput (events/s) is computed **server-side**: each ``status.json`` keeps a sample of the
counters with the time of the injected clock (``seconds``), and a rate is the difference to the
newest earlier sample at least ``min_window`` seconds old (or the oldest one kept, when none is
that old yet), divided by the elapsed time.  So several open pages (and ``curl``) share one set
of samples and each sees a rate over at least a second; the document says which window
(``rate_window_seconds``) and how many events (``accepted_in_window``) a rate is made of.
The first request after start has no rate yet (``null``).  Samples older than ``keep`` seconds
are dropped (at most ``max_samples`` are kept).

Active alerts: the counts come from the risk consumer's gauges (``payflux_risk_active_alerts``,
in memory, shown with Redis down).  Which alerts are open (type, key, severity, numbers) is read
from the alerts stream (``<prefix>:alerts``, docs/risk.md): the newest ``scan`` transitions, an
alert being open when its newest transition is ``open`` or ``escalate``.  That read is bounded
by a timeout; when Redis doesn't answer the page says "Redis unavailable" for that part only.
The stream is also how an ingest-only node shows alerts of a risk consumer running elsewhere.

The risk loop (``risk.loop``): the alert store's lead-time and precision summary, the one
``payflux risk report`` prints (:func:`payflux.risk.report.summarize`), plus ``health``, what
``GET /v1/risk/processors`` answers (the risk consumer's processor-health snapshot), injected by
the node as ``risk_loop`` (a callable returning a Deferred of it), read within the same timeout,
at most once per :data:`LOOP_CACHE_SECONDS` (several open pages share one read).

Never shown: event payloads, API keys or key ids, Redis URLs.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict, deque
from importlib import resources
from typing import Any, Callable, Iterable

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.server import Request

from payflux.consumers.inspect import pairs, text
from payflux.redis.replies import is_outage

log = Logger()

STATUS_FORMAT = 1
ALERTS_SCAN = 200
LOOP_CACHE_SECONDS = 2.0
OPEN_ACTIONS = ("open", "escalate")
HTML_HEADERS = {
    b"Content-Type": b"text/html; charset=utf-8",
    # The page may only talk to its own origin: no external scripts, styles, fonts or requests.
    b"Content-Security-Policy": b"default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                                b"connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'",
    b"X-Content-Type-Options": b"nosniff",
    b"Referrer-Policy": b"no-referrer",
    b"Cache-Control": b"no-store",
}


# --- reading metric families -----------------------------------------------------------------


class Samples:
    """The samples of some metric families, by sample name (``payflux_events_accepted_total``)."""

    def __init__(self, families: Iterable[Any]) -> None:
        self._by_name: dict[str, list[tuple[dict, float]]] = defaultdict(list)
        for family in families:
            for s in family.samples:
                self._by_name[s.name].append((dict(s.labels), float(s.value)))

    def has(self, name: str) -> bool:
        return bool(self._by_name.get(name))

    def rows(self, name: str) -> list[tuple[dict, float]]:
        return [(labels, v) for labels, v in self._by_name.get(name, ()) if not math.isnan(v)]

    def value(self, name: str) -> float | None:
        rows = self.rows(name)
        return sum(v for _, v in rows) if rows else None

    def total(self, name: str) -> float:
        return sum(v for _, v in self.rows(name))

    def by(self, name: str, *labels: str) -> dict[tuple[str, ...], float]:
        """Values summed over every label not in ``labels``, keyed by the values of ``labels``."""
        out: dict[tuple[str, ...], float] = defaultdict(float)
        for row, v in self.rows(name):
            out[tuple(row.get(label, "") for label in labels)] += v
        return dict(out)


def registry_families(registry: Any) -> Callable[[], defer.Deferred]:
    """A node's families: its own registry, collected at each request."""
    return lambda: defer.succeed(list(registry.collect()))


def text_families(render: Callable[[], defer.Deferred]) -> Callable[[], defer.Deferred]:
    """Families parsed from ``render()``'s Prometheus text (the supervisor's summed /metrics)."""
    from prometheus_client.parser import text_string_to_metric_families

    def families() -> defer.Deferred:
        d = defer.maybeDeferred(render)
        d.addCallback(lambda body: list(text_string_to_metric_families(text(body))))
        return d

    return families


# --- throughput --------------------------------------------------------------------------------


class RateTracker:
    """Per-second rates of counters between now and an earlier sample (see the module doc)."""

    def __init__(self, seconds: Callable[[], float], min_window: float = 1.0, keep: float = 60.0,
                 max_samples: int = 64) -> None:
        self.seconds = seconds
        self.min_window = min_window
        self.keep = keep
        self._samples: deque[tuple[float, dict]] = deque(maxlen=max_samples)

    def observe(self, totals: dict) -> tuple[float | None, dict]:
        """Record ``totals``; returns ``(window_seconds, {key: delta})`` against the chosen
        earlier sample, or ``(None, {})`` when there is none (or the clock didn't move)."""
        now = self.seconds()
        while len(self._samples) > 1 and now - self._samples[1][0] >= self.keep:
            self._samples.popleft()
        base = None
        for at, sample in reversed(self._samples):
            if now - at >= self.min_window:
                base = (at, sample)
                break
        if base is None and self._samples:
            base = self._samples[0]
        self._samples.append((now, dict(totals)))
        if base is None or now - base[0] <= 0:
            return None, {}
        at, sample = base
        # a counter that went down was reset (a restarted process): no rate for it this time
        return now - at, {k: v - sample[k] for k, v in totals.items() if k in sample and v >= sample[k]}


# --- open alerts from the alerts stream ------------------------------------------------------


class AlertsStreamReader:
    """The open alerts in the newest ``scan`` entries of the alerts stream, read within ``timeout``."""

    def __init__(self, redis: Any, key: str, timeout: float, reactor: Any, scan: int = ALERTS_SCAN) -> None:
        self.redis = redis
        self.key = key
        self.timeout = timeout
        self.reactor = reactor
        self.scan = scan

    async def read(self) -> dict:
        doc: dict[str, Any] = {"stream": self.key, "scanned": 0, "complete": True, "open": []}
        try:
            d = defer.maybeDeferred(self.redis.execute_command, "XREVRANGE", self.key, "+", "-", "COUNT",
                                    str(self.scan))
            d.addTimeout(self.timeout, self.reactor)
            entries = await d
        except Exception as e:  # noqa: BLE001 - any failure: the page says so, the rest still shows
            if is_outage(e):
                return {**doc, "status": "redis_unavailable", "complete": False}
            # e.g. WRONGTYPE: something else holds the key; say so instead of blaming Redis
            log.warn("status page: reading {key} failed: {reason}", key=self.key, reason=str(e) or type(e).__name__)
            return {**doc, "status": "error", "error": type(e).__name__, "complete": False}
        entries = entries or []
        seen: set[str] = set()
        for entry in entries:
            alert = _alert_of(entry)
            if alert is None or alert["alert_id"] in seen:
                continue
            seen.add(alert["alert_id"])
            if alert.pop("action") in OPEN_ACTIONS:
                doc["open"].append(alert)
        doc["open"].sort(key=lambda a: (a["severity"] != "critical", -(a["opened_at_ms"] or 0)))
        doc["scanned"] = len(entries)
        doc["complete"] = len(entries) < self.scan  # else older, still-open alerts may be beyond the scan
        return {**doc, "status": "ok"}


def _alert_of(entry: Any) -> dict | None:
    """One alerts-stream entry as the page shows it; None if it isn't a v1 transition."""
    try:
        fields = pairs(entry[1])
        fields = {k: text(v) for k, v in fields.items()}
        if fields.get("v") != "1" or not fields.get("alert_id"):
            return None
        record = json.loads(fields.get("data") or "{}")
    except (TypeError, ValueError, IndexError):
        return None
    opened_ms = fields["alert_id"].rsplit(":", 1)[-1]
    numbers = record.get("numbers") if isinstance(record.get("numbers"), dict) else {}
    return {
        "alert_id": fields["alert_id"],
        "action": fields.get("action"),
        "type": fields.get("type"),
        "key": fields.get("key"),
        "severity": fields.get("severity"),
        "opened_at_ms": int(opened_ms) if opened_ms.isdigit() else None,
        "at_ms": int(fields["at"]) if str(fields.get("at", "")).isdigit() else None,
        "window_seconds": record.get("window_seconds"),
        # only the numbers behind the alert (rates, counts), no free text
        "numbers": {k: v for k, v in numbers.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
    }


class RiskLoopReader:
    """The risk loop summary from ``summary()`` (a Deferred), within ``timeout``; failures are a status."""

    def __init__(self, summary: Callable[[], defer.Deferred], timeout: float, reactor: Any,
                 cache_seconds: float = LOOP_CACHE_SECONDS) -> None:
        self.summary = summary
        self.timeout = timeout
        self.reactor = reactor
        self.cache_seconds = cache_seconds
        self._cached: tuple[float, dict] | None = None

    async def read(self) -> dict:
        now = self.reactor.seconds()
        if self._cached is not None and now - self._cached[0] < self.cache_seconds:
            return self._cached[1]
        try:
            d = defer.maybeDeferred(self.summary)
            d.addTimeout(self.timeout, self.reactor)
            doc = {"status": "ok", **(await d)}
        except Exception as e:  # noqa: BLE001 - the page says so, the rest still shows
            if is_outage(e) or isinstance(e, defer.TimeoutError):
                return {"status": "redis_unavailable"}
            log.warn("status page: reading the alert store failed: {reason}", reason=str(e) or type(e).__name__)
            return {"status": "error", "error": type(e).__name__}
        self._cached = (now, doc)
        return doc


def alerts_stream_key(prefix: str, consumers: Iterable[Any] = ()) -> str:
    """The alerts stream of the first risk consumer configured (its ``alerts_stream`` option),
    or the default ``<prefix>:alerts``."""
    for c in consumers:
        if c.handler == "risk" and isinstance(c.options.get("alerts_stream"), str):
            return c.options["alerts_stream"]
    return f"{prefix}:alerts"


# --- the document ------------------------------------------------------------------------------


def _num(v: float | None) -> int | float | None:
    """Counts as ints (``20``, not ``20.0``), anything else as it is."""
    if v is None or not math.isfinite(v):
        return None
    return int(v) if v == int(v) and abs(v) < 2**53 else v


def _rate(delta: float | None, window: float | None) -> float | None:
    return None if delta is None or not window else round(delta / window, 3)


def _sorted_partition(p: str) -> tuple:
    return (0, int(p), "") if p.isdigit() else (1, 0, p)


def build_document(s: Samples, window: float | None, deltas: dict, now: float, alerts: dict | None,
                   loop: dict | None = None) -> dict:
    """``status.json`` from the samples, the rate window and the open alerts (see the module doc)."""
    accepted = s.total("payflux_events_accepted_total")
    rejected_requests = s.by("payflux_requests_rejected_total", "reason")
    rejected_events = s.by("payflux_events_rejected_total", "reason")
    ingest = {
        "events_accepted_total": _num(accepted),
        "events_duplicate_total": _num(s.total("payflux_events_duplicate_total")),
        "events_per_second": _rate(deltas.get("accepted"), window),
        "accepted_in_window": _num(deltas.get("accepted")) if window else None,
        "rate_window_seconds": round(window, 3) if window else None,
        "requests_rejected_total": _num(sum(rejected_requests.values())),
        "rejected_per_second": _rate(deltas.get("rejected"), window),
        "rejected": [
            {"reason": reason, "requests": _num(n), "events": _num(rejected_events.get((reason,), 0.0)),
             "requests_per_second": _rate(deltas.get(("rejected", reason)), window)}
            for (reason,), n in sorted(rejected_requests.items(), key=lambda kv: (-kv[1], kv[0]))
        ],
        "inflight_requests": _num(s.value("payflux_inflight_requests")),
    }

    lengths = s.by("payflux_stream_length", "partition")
    dlq = s.by("payflux_dlq_depth", "partition")
    streams = [
        {"partition": p, "length": _num(lengths.get((p,))), "dlq_depth": _num(dlq.get((p,)))}
        for p in sorted({k[0] for k in lengths} | {k[0] for k in dlq}, key=_sorted_partition)
    ]

    lag = s.by("payflux_group_lag", "group", "partition")
    pending = s.by("payflux_group_pending", "group", "partition")
    oldest = s.by("payflux_group_oldest_pending_age_seconds", "group", "partition")
    groups = [
        {"group": g, "partition": p, "lag": _num(lag.get((g, p))), "pending": _num(pending.get((g, p))),
         "oldest_pending_age_seconds": _num(oldest.get((g, p)))}
        for g, p in sorted(set(lag) | set(pending) | set(oldest), key=lambda k: (k[0], _sorted_partition(k[1])))
    ]

    processed = s.by("payflux_consumer_processed_total", "consumer", "group")
    failed = s.by("payflux_consumer_failed_total", "consumer", "group")
    dead = s.by("payflux_consumer_dead_lettered_total", "consumer", "group")
    consumers = [
        {"consumer": c, "group": g, "processed_total": _num(processed.get((c, g), 0.0)),
         "processed_per_second": _rate(deltas.get(("processed", c, g)), window),
         "failed_total": _num(failed.get((c, g), 0.0)), "dead_lettered_total": _num(dead.get((c, g), 0.0))}
        for c, g in sorted(set(processed) | set(failed) | set(dead))
    ]

    risk_running = s.has("payflux_risk_active_alerts")
    rates = s.by("payflux_risk_failure_rate", "consumer", "processor")
    baselines = s.by("payflux_risk_failure_rate_baseline", "consumer", "processor")
    by_type = s.by("payflux_risk_active_alerts", "type")
    risk = {
        "running": risk_running,
        "processors": [
            {"consumer": c, "processor": p, "failure_rate": round(v, 6),
             "baseline": round(baselines[(c, p)], 6) if (c, p) in baselines else None}
            for (c, p), v in sorted(rates.items(), key=lambda kv: (-kv[1], kv[0]))
        ],
        "active_alerts": {
            "total": _num(sum(by_type.values())) if risk_running else None,
            "by_type": {t: _num(n) for (t,), n in sorted(by_type.items())},
        },
        "alerts": alerts,
        "loop": loop,
    }

    workers = None
    if s.has("payflux_workers_configured"):
        workers = {"running": _num(s.value("payflux_workers_running")),
                   "configured": _num(s.value("payflux_workers_configured"))}
    up = s.value("payflux_redis_up")
    return {
        "v": STATUS_FORMAT,
        "generated_at": round(now, 3),
        "mode": "supervisor" if workers else "node",
        "workers": workers,
        "redis_up": None if up is None else up == 1,
        "draining": bool(s.value("payflux_draining")),
        "ingest": ingest,
        "streams": streams,
        "dlq_depth_total": _num(sum(dlq.values())),
        "groups": groups,
        "consumers": consumers,
        "risk": risk,
    }


def rate_totals(s: Samples) -> dict:
    """The counters the page turns into per-second rates."""
    totals: dict[Any, float] = {
        "accepted": s.total("payflux_events_accepted_total"),
        "rejected": s.total("payflux_requests_rejected_total"),
    }
    for (reason,), v in s.by("payflux_requests_rejected_total", "reason").items():
        totals[("rejected", reason)] = v
    for (c, g), v in s.by("payflux_consumer_processed_total", "consumer", "group").items():
        totals[("processed", c, g)] = v
    return totals


# --- the page ------------------------------------------------------------------------------------


class StatusPage:
    """``/status`` and ``/status.json`` of one side listener; see the module doc."""

    def __init__(self, families: Callable[[], defer.Deferred], seconds: Callable[[], float],
                 alerts: AlertsStreamReader | None = None, min_window: float = 1.0,
                 loop: RiskLoopReader | None = None) -> None:
        self.families = families
        self.seconds = seconds
        self.alerts = alerts
        self.loop = loop
        self.rates = RateTracker(seconds, min_window=min_window)
        self._html: bytes | None = None

    async def document(self) -> dict:
        samples = Samples(await self.families())
        window, deltas = self.rates.observe(rate_totals(samples))
        # both reads at once: with Redis down each waits its timeout, the page only the longer one
        reading = [defer.ensureDeferred(r.read()) if r is not None else None for r in (self.alerts, self.loop)]
        alerts, loop = [await d if d is not None else None for d in reading]
        return build_document(samples, window, deltas, self.seconds(), alerts, loop)

    def render_json(self, request: Request) -> defer.Deferred:
        async def render() -> bytes:
            doc = await self.document()
            request.setHeader(b"Content-Type", b"application/json")
            request.setHeader(b"Cache-Control", b"no-store")
            return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode("utf-8")

        return defer.ensureDeferred(render())

    def render_html(self, request: Request) -> bytes:
        if self._html is None:
            try:
                self._html = resources.files(__package__).joinpath("status.html").read_bytes()
            except FileNotFoundError:
                raise RuntimeError("payflux/observability/status.html is not installed: "
                                   "it must be listed in setup.py's package_data") from None
        for name, value in HTML_HEADERS.items():
            request.setHeader(name, value)
        return self._html


def node_status(ingest: Any, alerts_stream: str | None = None,
                risk_loop: Callable[[], defer.Deferred] | None = None) -> StatusPage:
    """The status page of a node's side listener, from its wired :class:`IngestApp`;
    ``alerts_stream`` defaults to ``<prefix>:alerts`` (see :func:`alerts_stream_key`);
    ``risk_loop`` gives the alert store's summary (none: no risk loop panel)."""
    writer = ingest.writer
    key = alerts_stream or alerts_stream_key(writer.keys.prefix)
    reader = AlertsStreamReader(writer.redis, key, ingest.limits.redis_timeout, writer.reactor)
    loop = RiskLoopReader(risk_loop, ingest.limits.redis_timeout, writer.reactor) if risk_loop else None
    return StatusPage(registry_families(ingest.metrics.registry), ingest.seconds, reader, loop=loop)


def supervisor_status(workers: Any, risk_loop: Callable[[], defer.Deferred] | None = None) -> StatusPage:
    """The status page of a ``--workers`` supervisor: its summed /metrics (see the module doc)."""
    settings = workers.settings
    reader = AlertsStreamReader(workers.redis, alerts_stream_key(settings.stream_prefix, settings.consumers),
                                settings.redis_timeout, workers.reactor)
    loop = RiskLoopReader(risk_loop, settings.redis_timeout, workers.reactor) if risk_loop else None
    return StatusPage(text_families(workers.render_metrics), workers.reactor.seconds, reader, loop=loop)
