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
- ``bind_alert_store(store)``: the node's :class:`payflux.risk.store.AlertStore`; every
  transition is also recorded there (what the alerts API on the side listener reads), after
  the alerts stream, through its own ordered outbox (:class:`payflux.risk.sinks.AlertRecords`).

Time: the detectors run on stream time (``received_at``).  When no entry has arrived for
``idle_after_seconds`` of the reactor's clock, an idle tick (every second) moves the stream
clock on by the reactor time elapsed since the last entry, so windows empty and alerts
resolve on a quiet stream.  The handler never reads the system clock itself.

``handle`` never fails a batch (see :mod:`payflux.risk.sinks`); it returns once the batch's
alert transitions are in the alerts stream and the alert store (or kept for retry after a Redis
error).

Health snapshot: after a batch or an idle tick, at most once per second of the reactor's clock,
``SET <prefix>:{alerts}:risk:health <json> PX 30000`` (:meth:`payflux.risk.health.HealthTracker.snapshot`;
docs/risk.md, "The health snapshot"), so a stopped consumer's snapshot expires.  A batch that
comes within that second (or while a write is in flight) schedules one trailing write for the
end of it, so the snapshot never lags the last batch by more than about a second.  A failed write
is logged once per outage and never fails or holds up the batch; at most one write is in flight.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from payflux.consumers.handlers import Entry
from payflux.risk.alerts import OPEN, RESOLVE, Transition, iso_ms
from payflux.risk.config import parse_options
from payflux.risk.engine import RiskEngine
from payflux.risk.metrics import RiskMetrics
from payflux.risk.sinks import AlertRecords, AlertStream, AlertWebhook
from payflux.risk.store import AlertKeys
from payflux.streams.outage import log_step_failure

TICK_SECONDS = 1.0
HEALTH_EVERY_SECONDS = 1.0   # at most one health snapshot write per reactor second
HEALTH_TTL_MS = 30_000       # PX of the snapshot: a stopped consumer's snapshot expires


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
        self.records: AlertRecords | None = None
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
        self._redis: Any = None
        self.health_key: str | None = None        # <prefix>:{alerts}:risk:health once bound
        self._health_written: float | None = None  # reactor time of the last snapshot write
        self._health_busy = False
        self._health_failing = False
        self._health_trailing: Any = None         # the DelayedCall of a trailing snapshot write

    # -- wiring --------------------------------------------------------------------------------

    def bind_metrics(self, metrics: Any, consumer: str) -> None:
        """Count into the node's registry (``metrics.registry``), labelled ``consumer``."""
        self.metrics = RiskMetrics(metrics.registry, consumer)
        self.metrics.update(self.engine, [])

    def bind_redis(self, redis: Any, keys: Any) -> None:
        """Write alerts to ``alerts_stream`` (default ``<keys.prefix>:alerts``) through ``redis``."""
        c = self.config
        key = c.alerts_stream or f"{keys.prefix}:alerts"
        self._redis = redis
        self.health_key = AlertKeys(keys.prefix).health
        self.stream = AlertStream(redis, key, c.alerts_maxlen, c.outbox_max,
                                  on_failure=lambda: self.metrics.delivery_failed("stream"),
                                  on_drop=lambda n: self.metrics.dropped("stream", n))

    def bind_alert_store(self, store: Any) -> None:
        """Record every transition in ``store`` (an :class:`~payflux.risk.store.AlertStore`) too."""
        self.records = AlertRecords(store, self.config.outbox_max,
                                    on_failure=lambda: self.metrics.delivery_failed("store"),
                                    on_drop=lambda n: self.metrics.dropped("store", n))

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
        if self._health_trailing is not None and self._health_trailing.active():
            self._health_trailing.cancel()
        self._health_trailing = None
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
        d = self._publish_alerts()
        self._write_health()  # after the alerts' commands went out: it never delays them
        return d

    def _publish_alerts(self) -> defer.Deferred:
        transitions = self.engine.take()
        self.metrics.update(self.engine, transitions)
        if transitions:
            if self.config.log_alerts:
                for tr in transitions:
                    self._log(tr)
            if self.webhook is not None:
                self.webhook.publish(transitions)
        sinks = [s for s in (self.stream, self.records) if s is not None]
        if not sinks:
            if transitions and not self._warned_unbound:
                self._warned_unbound = True
                self.log.warn("risk: no Redis bound (bind_redis); alerts go to the log and metrics only")
            return defer.succeed(None)
        if not transitions and not any(s.outbox for s in sinks):
            return defer.succeed(None)

        async def publish() -> None:  # the stream first, then the store; each keeps what Redis refused
            for sink in sinks:
                await sink.publish(transitions)

        return defer.ensureDeferred(publish())

    def _write_health(self) -> None:
        """Write the health snapshot if one is due (see the module docstring); never raises."""
        health = self.engine.health
        if self._redis is None or health is None or health.closed is None:
            return
        now = self.reactor.seconds()
        due = HEALTH_EVERY_SECONDS if self._health_written is None else self._health_written + HEALTH_EVERY_SECONDS - now
        if self._health_busy or (self._health_written is not None and due > 0):
            if self._health_trailing is None and not self._closed:
                # a write still in flight: look again a whole period later (never a hot loop)
                delay = max(due, HEALTH_EVERY_SECONDS) if self._health_busy else max(due, 0.0)
                self._health_trailing = self.reactor.callLater(delay, self._trailing_health)
            return
        self._health_written = now
        try:
            body = json.dumps(health.snapshot(), separators=(",", ":"), allow_nan=False)
            d = defer.maybeDeferred(self._redis.execute_command, "SET", self.health_key, body,
                                    "PX", str(HEALTH_TTL_MS))
        except Exception:
            d = defer.fail(Failure())
        self._health_busy = True
        d.addCallbacks(self._health_ok, self._health_failed)

    def _trailing_health(self) -> None:
        self._health_trailing = None
        self._write_health()

    def _health_ok(self, _: Any) -> None:
        self._health_busy = False
        if self._health_failing:
            self._health_failing = False
            self.log.info("risk health snapshot {key}: writing again", key=self.health_key)

    def _health_failed(self, f: Failure) -> None:
        self._health_busy = False
        if not self._health_failing:  # one line per outage, not one per second
            self._health_failing = True
            log_step_failure(self.log, f, "risk health snapshot {key}: SET failed", key=self.health_key)

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
