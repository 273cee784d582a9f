"""
RiskHandler: the built-in ``risk`` consumer handler (``handler = "risk"`` in a [[consumers]]
table).  It feeds each entry's event to :class:`payflux.risk.engine.RiskEngine` at the entry's
``received_at`` and sends the resulting alert transitions to the log, the Prometheus metrics,
the alerts stream in Redis and (optionally) a signed webhook.  Operator guide: docs/risk.md.

Wiring (the factory is called as ``RiskHandler(reactor=reactor, **options)``):

- ``bind_metrics(metrics, consumer)``: the node's :class:`payflux.observability.metrics.Metrics`;
  the ``payflux_risk_*`` families are registered in ``metrics.registry``.
- ``bind_redis(redis, keys)``: a txredisapi-like connection (``execute_command``; the node's
  pool) and the node's :class:`payflux.streams.keys.StreamKeys`; alerts go to
  ``<prefix>:alerts`` (or the ``alerts_stream`` option).  Unbound = no alerts stream.

Time: the detectors run on stream time (``received_at``).  When no entry has arrived for
``idle_after_seconds`` of the reactor's clock, an idle tick (every second) moves the stream
clock on by the reactor time elapsed since the last entry, so windows empty and alerts
resolve on a quiet stream.  The handler never reads the system clock itself.

``handle`` never fails a batch (see :mod:`payflux.risk.sinks`); it returns once the batch's
alert transitions are in the alerts stream (or kept for retry after a Redis error).
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import defer, task
from twisted.logger import Logger

from payflux.consumers.handlers import Entry
from payflux.risk.alerts import OPEN, RESOLVE, Transition, iso_ms
from payflux.risk.config import parse_options
from payflux.risk.engine import RiskEngine
from payflux.risk.metrics import RiskMetrics
from payflux.risk.sinks import AlertStream, AlertWebhook

TICK_SECONDS = 1.0


class RiskHandler:
    def __init__(self, reactor: Any = None, **options: Any) -> None:
        """``options``: the [[consumers]] table's options (docs/risk.md).  The webhook posts with
        ``treq`` (``self.webhook.http``: tests put a ``treq.testing.StubTreq`` there)."""
        # set per instance: a Logger class attribute is renamed after the class by its descriptor
        self.log = Logger(namespace="payflux.risk")
        self.config = parse_options(options)
        if reactor is None:
            from twisted.internet import reactor  # type: ignore[no-redef]
        self.reactor = reactor
        self.engine = RiskEngine(self.config.engine)
        self.metrics = RiskMetrics.unbound()
        self.stream: AlertStream | None = None
        c = self.config
        self.webhook = None
        if c.webhook_url is not None:
            assert c.webhook_secret is not None
            self.webhook = AlertWebhook(
                c.webhook_url, c.webhook_secret, reactor, c.webhook_timeout, c.webhook_max_attempts,
                c.webhook_queue, on_failure=lambda: self.metrics.delivery_failed("webhook"),
                on_drop=lambda n: self.metrics.dropped("webhook", n))
        self._tick: task.LoopingCall | None = None
        self._last_arrival: float | None = None   # reactor time of the last batch
        self._anchor_ms = 0                       # stream time at the last batch
        self._warned_unbound = False
        self._closed = False

    # -- wiring --------------------------------------------------------------------------------

    def bind_metrics(self, metrics: Any, consumer: str) -> None:
        """Count into the node's registry (``metrics.registry``), labelled ``consumer``."""
        self.metrics = RiskMetrics(metrics.registry, consumer)
        self.metrics.update(self.engine, [])

    def bind_redis(self, redis: Any, keys: Any) -> None:
        """Write alerts to ``alerts_stream`` (default ``<keys.prefix>:alerts``) through ``redis``."""
        c = self.config
        key = c.alerts_stream or f"{keys.prefix}:alerts"
        self.stream = AlertStream(redis, key, c.alerts_maxlen, c.outbox_max,
                                  on_failure=lambda: self.metrics.delivery_failed("stream"),
                                  on_drop=lambda n: self.metrics.dropped("stream", n))

    # -- the handler protocol ------------------------------------------------------------------

    def handle(self, entries: list[Entry]) -> defer.Deferred:
        observe = self.engine.observe
        for e in entries:
            observe(e.event, e.received_at_ms)
        if self.engine.now_ms is not None:
            self._anchor_ms = self.engine.now_ms
            self._last_arrival = self.reactor.seconds()
        if self._tick is None and not self._closed and self.config.idle_after_seconds > 0:
            self._tick = task.LoopingCall(self._on_tick)
            self._tick.clock = self.reactor
            self._tick.start(TICK_SECONDS, now=False).addErrback(
                lambda f: self.log.failure("risk idle tick stopped", f))
        return self._publish()

    def close(self) -> defer.Deferred:
        """Stop the tick, resolve open alerts (``consumer_stopped``: the state dies with the
        process), flush them, and give the webhook up to ``webhook_timeout`` seconds."""
        self._closed = True
        if self._tick is not None and self._tick.running:
            self._tick.stop()
        self.engine.stop()
        d = self._publish()
        if self.webhook is not None:
            webhook = self.webhook
            d.addCallback(lambda _: webhook.close(self.config.webhook_timeout))
        return d

    # -- internals -----------------------------------------------------------------------------

    def _on_tick(self) -> defer.Deferred | None:
        if self._last_arrival is None:
            return None
        quiet = self.reactor.seconds() - self._last_arrival
        if quiet < self.config.idle_after_seconds:
            return None
        self.engine.advance(self._anchor_ms + int(quiet * 1000))
        return self._publish()

    def _publish(self) -> defer.Deferred:
        transitions = self.engine.take()
        self.metrics.update(self.engine, transitions)
        if transitions:
            if self.config.log_alerts:
                for tr in transitions:
                    self._log(tr)
            if self.webhook is not None:
                self.webhook.publish(transitions)
        if self.stream is None:
            if transitions and not self._warned_unbound:
                self._warned_unbound = True
                self.log.warn("risk: no Redis bound (bind_redis); alerts go to the log and metrics only")
            return defer.succeed(None)
        if not transitions and not self.stream.outbox:
            return defer.succeed(None)
        return defer.ensureDeferred(self.stream.publish(transitions))

    def _log(self, tr: Transition) -> None:
        a = tr.alert
        fields = dict(
            alert_id=a.alert_id, action=tr.action, alert_type=a.type, alert_key=a.key_text,
            severity=a.severity, reason=tr.reason, window_seconds=a.window_seconds, at=iso_ms(tr.at_ms),
            numbers=json.dumps(tr.numbers, sort_keys=True, separators=(",", ":")),
        )
        if tr.action == OPEN:
            self.log.warn("risk alert opened: {alert_type} {alert_key} ({severity}) {numbers}", **fields)
        elif tr.action == RESOLVE:
            self.log.info("risk alert resolved: {alert_type} {alert_key} ({reason}) {numbers}", **fields)
        else:
            self.log.warn("risk alert escalated: {alert_type} {alert_key} ({severity}) {numbers}", **fields)
