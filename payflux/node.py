"""
Assembles one PayFlux node: a MultiService holding, in start order,

1. the embedded redis-server (only when no ``redis_url`` is set),
2. the Redis connection pool (connects once that Redis answers),
3. the metrics side listener and (role ``ingest``) the HTTP ingest listener,
4. the drain guard (on stop: /ready and new ingests turn 503, in-flight appends finish),
5. (role ``consumers``) a ConsumerService and a ReclaimService per configured consumer (their
   handlers built here, started by the ConsumerService), then, with a file exporter among
   them, :class:`ReopenOnSighup` (the process's SIGHUP handler, installed while it runs),
6. the retention trimmer and the consumer-group sampler,
7. the stream sampler (XLEN per partition and a Redis probe, every ``stats_interval``).

:class:`Node` stops children one at a time in reverse order, so on SIGTERM the node first stops
its samplers and consumers (in-flight handlers finish and are acked), then drains ingest, then
closes its listeners, then its Redis connections, and stops the embedded Redis last.

Every step of that stop is bounded, whatever state Redis is in (never reachable, paused, gone):
consumers and in-flight appends get ``shutdown_grace`` from the SIGTERM, the other steps a
fraction of a second each, the whole stop at most ``shutdown_grace`` + :data:`STOP_MARGIN`; a
step still busy at its limit is abandoned with a warning naming it, and the stop carries on
(:meth:`Node.stopService`).  ``/ready`` answers from :class:`RedisHealth` within ~50 ms.
"""

from __future__ import annotations

import gc
import os
import signal
import socket
import sys
from typing import Any

import attrs
import txredisapi
from prometheus_client.core import CounterMetricFamily
from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, fail, inlineCallbacks, maybeDeferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.python.failure import Failure

from payflux.config import Settings
from payflux.consumers.handlers import build_handlers
from payflux.consumers.reclaim import ReclaimService
from payflux.consumers.service import ConsumerService, default_consumer_name, open_read_connection
from payflux.consumers.stats import GroupStatsSampler
from payflux.consumers.trim import TrimService
from payflux.deadlines import settled_within
from payflux.events import EventValidator, ValidationPolicy
from payflux.exporters import file as file_exporter
from payflux.exporters.metrics import bind_exporter_metrics
from payflux.goenv import log_go_env
from payflux.ingest.alerts import AlertsApi
from payflux.ingest.app import IngestApp, IngestLimits
from payflux.ingest.auth import AdminAuthenticator, Authenticator
from payflux.ingest.fastpath import FastIngestFactory
from payflux.ingest.http import BoundedRequest, IngestSite
from payflux.ingest.ratelimit import RateLimiter
from payflux.ingest.side import SideApp
from payflux.ingest.webhooks import WebhookReceiver, build_hooks
from payflux.observability.metrics import Metrics
from payflux.observability.status import alerts_stream_key
from payflux.redis.connect import connect
from payflux.redis.target import RedisTarget, parse_redis_url
from payflux.redis.txadapter import ConnectionWatch, close_pool
from payflux.risk.health import processors_answer
from payflux.risk.report import summarize
from payflux.risk.store import AlertStore
from payflux.streams.embedded import EmbeddedRedis, EmbeddedRedisError
from payflux.streams.keys import StreamKeys
from payflux.streams.writer import StreamWriter

log = Logger()

#: Seconds a stop may take beyond ``shutdown_grace``: SIGTERM ends the process within
#: ``shutdown_grace`` + 5 s whatever Redis does (the last second is the reactor's and Python's).
STOP_MARGIN = 4.0
#: Seconds, out of STOP_MARGIN, kept for closing the Redis pool and for the embedded Redis.
POOL_CLOSE_LIMIT = 1.0
EMBEDDED_RESERVE = 1.0
#: Seconds a step that drains nothing (a sampler, the trimmer, a listener) gets to stop.
SERVICE_STOP_LIMIT = 0.25
#: Seconds past the grace period a draining step (consumer, reclaim, ingest drain) gets to settle.
SETTLE_LIMIT = 1.5
#: Seconds /ready waits for Redis to answer its PING.
READY_PROBE_TIMEOUT = 0.05
#: A PING slower than READY_PROBE_TIMEOUT still reads as ready while Redis answered something
#: (a PING, a stream sample) within this many seconds on a connected pool: a busy machine is not
#: a Redis outage, and a paused or unreachable Redis still reads as unavailable half a second on.
READY_SLOW_GRACE = 0.5

#: What is left behind when a step's stop is abandoned, for the log line.
_ABANDONED = {
    "ConsumerService": "its handler batches and read connection",
    "ReclaimService": "a reclaim pass in progress",
    "GroupStatsSampler": "a consumer-group sample waiting on Redis",
    "TrimService": "a trim pass waiting on Redis",
    "TimerService": "a stream sample waiting on Redis",
    "DrainGuard": "in-flight appends",
    "RedisPool": "Redis connections still closing",
    "EmbeddedRedis": "the embedded redis-server",
    "WorkerPool": "worker processes",
}


def _service_name(service) -> str:
    return getattr(service, "name", None) or type(service).__name__


class Node(MultiService):
    """
    A MultiService that stops its children one after another, in reverse start order, each
    waiting for the previous one: MultiService's own stopService stops them all at once, which
    would close the listeners while in-flight appends are still draining.

    Each wait is bounded (see :meth:`stopService`), so a stop always ends: ``grace`` is the
    node's ``shutdown_grace``, ``clock`` the reactor its deadlines run on.
    """

    def __init__(self, grace: float = 10.0, clock=None):
        super().__init__()
        self.grace = grace
        self.clock = clock

    def privilegedStartService(self) -> None:
        """
        Runs before the reactor (twistd): bind the listeners and check the embedded Redis. A
        failure here is an operator error (port taken, data dir owned by a live Redis, no
        redis-server binary): one line on stderr and exit status 1, no traceback.
        """
        try:
            super().privilegedStartService()
        except (CannotListenError, EmbeddedRedisError) as e:
            sys.stderr.write(f"payflux: cannot start: {e}\n")
            raise SystemExit(1) from None

    @inlineCallbacks
    def stopService(self):
        """
        Stop the children in reverse start order, each within a limit: draining steps
        (consumers, reclaim, the ingest drain guard, a supervisor's workers) until ``grace``
        seconds after the stop began plus SETTLE_LIMIT, other steps SERVICE_STOP_LIMIT, the pool
        POOL_CLOSE_LIMIT, the embedded Redis what is left, all within ``grace`` + STOP_MARGIN.
        A child that defines ``stop_within(seconds)`` is given its limit that way (it bounds its
        own waits); any child still busy at its limit is abandoned with a warning.
        """
        Service.stopService(self)
        clock = self._clock()
        began = clock.seconds()
        work_end, hard = began + self.grace, began + self.grace + STOP_MARGIN
        for service in self:
            if isinstance(service, DrainGuard):
                # new ingests get 503 from the first moment of the stop, not only once the
                # consumers and samplers stopped before the guard (they may wait on Redis)
                service.refuse_new()
        for service in reversed(list(self)):
            limit = self._stop_limit(service, clock.seconds(), work_end, hard)
            yield self._stop_child(service, limit, clock)

    def _clock(self):
        if self.clock is None:
            from twisted.internet import reactor

            self.clock = reactor
        return self.clock

    @staticmethod
    def _stop_limit(service, now: float, work_end: float, hard: float) -> float:
        """Seconds ``service`` may take to stop now (see :meth:`stopService`)."""
        if isinstance(service, EmbeddedRedis):
            return max(hard - now, 0.0)
        if isinstance(service, RedisPool):
            return max(min(POOL_CLOSE_LIMIT, hard - EMBEDDED_RESERVE - now), 0.0)
        # what the steps after this one need: the pool, the embedded Redis, and (for a draining
        # step) one SERVICE_STOP_LIMIT each for the listeners still to close
        reserve = EMBEDDED_RESERVE + POOL_CLOSE_LIMIT
        if isinstance(service, (ConsumerService, ReclaimService, DrainGuard)) or getattr(service, "drains_work", False):
            # a step that bounds its own waits (stop_within) may settle after the grace period;
            # one that doesn't (a reclaim pass stuck in a handler) gets the grace period only
            settle = getattr(service, "settle_limit", SETTLE_LIMIT) if hasattr(service, "stop_within") else 0.0
            own = max(work_end - now, 0.0) + settle
            reserve += 2 * SERVICE_STOP_LIMIT
        else:
            own = SERVICE_STOP_LIMIT
        # never 0: a listener's stopListening fires on the next reactor turn
        return max(min(own, hard - reserve - now), 0.05)

    def _stop_child(self, service, limit: float, clock) -> Deferred:
        """Stop ``service``; fires once it stopped or ``limit`` seconds passed (then logged), never errbacks."""
        stop_within = getattr(service, "stop_within", None)
        stopping = maybeDeferred(stop_within, limit) if stop_within is not None else maybeDeferred(service.stopService)
        stopping.addErrback(lambda f: log.failure("error stopping {service}", f, service=_service_name(service)))

        def settled(in_time: bool) -> None:
            if not in_time:
                log.warn("stopping: gave up waiting for {service} after {limit:.1f}s, abandoning {what}; "
                         "carrying on with the stop", service=_service_name(service), limit=limit,
                         what=_ABANDONED.get(type(service).__name__, "its stop"))

        return settled_within(stopping, limit, clock).addCallback(settled)


class RedisPool(Service):
    """
    The node's txredisapi pool, connected once its Redis is known to answer.

    Until then (and after stop) command methods raise ``txredisapi.ConnectionError`` at once, so
    callers answer 503 instead of waiting.  ``ready`` is a Deferred yielding the Redis URL
    (the embedded Redis's socket URL, or the configured one).
    """

    def __init__(self, target_source, poolsize: int, reply_timeout: float, connect_timeout: float, reactor=None):
        self._target_source = target_source
        self._poolsize = poolsize
        self._reply_timeout = reply_timeout
        self._connect_timeout = connect_timeout
        self._reactor = reactor
        self.handler: Any = None
        self.target: RedisTarget | None = None
        self.url: str | None = None
        self.watch: ConnectionWatch | None = None
        #: why there is no pool yet, for /ready ("the embedded Redis is not ready yet", ...)
        self.unavailable = "the embedded Redis is not ready yet"
        self._waiting: list[Deferred] = []

    def startService(self) -> None:
        super().startService()
        d = self._target_source()
        d.addCallback(self._connect)
        d.addErrback(self._unavailable)

    def _unavailable(self, failure) -> None:
        self.unavailable = failure.getErrorMessage()
        if self.running:  # an embedded Redis that exits because the node stops is no news
            log.error("Redis is not available; ingest and /ready answer 503: {reason}", reason=self.unavailable)

    def _connect(self, url: str) -> None:
        if not self.running:
            return
        self.target = parse_redis_url(url)
        self.url = url
        log.info("using Redis at {redis}", redis=self.target.redacted())
        self.handler = connect(self.target, self._poolsize, self._connect_timeout, self._reply_timeout)
        self.watch = ConnectionWatch.of(self.handler, self._reactor)
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(self.target)

    def whenConnected(self) -> Deferred:
        """Fires with the RedisTarget once the pool exists (immediately if it does)."""
        if self.handler is not None:
            return succeed(self.target)
        d = Deferred()
        self._waiting.append(d)
        return d

    def stopService(self):
        return self.stop_within(POOL_CLOSE_LIMIT)

    def stop_within(self, seconds: float) -> Deferred:
        """Close the pool (see :func:`close_pool`): fires within ``seconds``, whatever Redis does."""
        super().stopService()
        self.unavailable = "the node is stopping"
        handler, self.handler = self.handler, None
        if handler is None:
            return succeed(None)
        where = self.target.redacted() if self.target is not None else "Redis"
        # a little inside ``seconds``, so close_pool's own abort (and its log line) comes first
        return close_pool(handler, max(seconds - 0.1, 0.0), self._reactor, what=f"the Redis pool ({where})")

    def __getattr__(self, name: str):
        handler = self.__dict__.get("handler")
        if handler is None:
            if name.startswith("_"):
                raise AttributeError(name)

            def not_connected(*args, **kwargs):
                raise txredisapi.ConnectionError("Redis connection not established")

            return not_connected
        return getattr(handler, name)


class RedisNotReady(Exception):
    """Why /ready says 503 about Redis: ``str()`` is a sentence for a person (and the JSON ``message``)."""


def _location(target: RedisTarget | None) -> str:
    """Where Redis is, for people: ``10.0.0.5:6379``, a socket path, or the redacted URL."""
    if target is None:
        return "Redis"
    if target.scheme in ("redis", "rediss"):
        return f"Redis at {target.host}:{target.port}"
    if target.scheme == "unix":
        return f"Redis at {target.path}"
    return f"Redis at {target.redacted()}"


def _ago(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"


class RedisHealth:
    """
    What the node knows about its Redis, for ``/ready``: an answer within ``timeout`` (50 ms)
    in every state, with a reason a person can read.

    :meth:`check` sends one PING (never more than one at a time: while a PING is unanswered,
    every check shares it) and waits for it at most ``timeout`` seconds from when it was sent;
    so while Redis is down or paused each check answers at once or within ``timeout``, with
    what the pool last saw ("connection refused", "no answer ... within 50 ms") and how long ago
    Redis last answered (the probe's and the stream sampler's successes count).  A PING that is
    only slow (Redis answered within :data:`READY_SLOW_GRACE`, the connection is up, the last
    PING succeeded) reads as ready.
    """

    def __init__(self, pool: RedisPool, reactor, timeout: float = READY_PROBE_TIMEOUT):
        self._pool = pool
        self._reactor = reactor
        self.timeout = timeout
        self.last_success: float | None = None
        self._probe: Deferred | None = None  # the PING in flight
        self._probe_sent = 0.0
        self._last_error: str | None = None  # why the last PING failed; None if it was answered
        self._waiters: list = []

    def record_success(self) -> None:
        self.last_success = self._reactor.seconds()

    def _since(self) -> str:
        if self.last_success is None:
            return "no answer since PayFlux started"
        return f"last success {_ago(self._reactor.seconds() - self.last_success)} ago"

    def _reason(self, waiting: bool) -> RedisNotReady:
        where = _location(self._pool.target)
        watch = self._pool.watch
        if watch is not None and not watch.connected and watch.failure:
            return RedisNotReady(f"no connection to {where}: {watch.failure} ({self._since()})")
        if not waiting and self._last_error:
            return RedisNotReady(f"{where}: {self._last_error} ({self._since()})")
        return RedisNotReady(f"no answer from {where} within {self.timeout * 1000:.0f} ms ({self._since()})")

    def _slow_but_alive(self) -> bool:
        """The probe is late, but what the node last knew of Redis is good and recent."""
        watch = self._pool.watch
        return (self._last_error is None and self.last_success is not None
                and self._reactor.seconds() - self.last_success < READY_SLOW_GRACE
                and (watch is None or watch.connected))

    def _late(self) -> Deferred:
        return succeed(None) if self._slow_but_alive() else fail(self._reason(waiting=True))

    def _outcome(self) -> Deferred:
        return succeed(None) if self._last_error is None else fail(self._reason(waiting=False))

    def _probe_done(self, result, probe: Deferred) -> None:
        if isinstance(result, Failure):
            self._last_error = _ping_error(result)
        else:
            self._last_error = None
            self.record_success()
        if self._probe is probe:
            self._probe = None
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter()

    def check(self) -> Deferred:
        """Fires with None if Redis answered PING within ``timeout``, else fails with RedisNotReady."""
        if self._pool.handler is None:
            return fail(RedisNotReady(self._pool.unavailable))
        now = self._reactor.seconds()
        if self._probe is None:
            try:
                probe = self._pool.execute_command("PING")
            except Exception:  # noqa: BLE001 - e.g. txredisapi's "Not connected" once it stopped reconnecting
                self._last_error = _ping_error(Failure())
                return fail(self._reason(waiting=False))
            self._probe, self._probe_sent = probe, now
            probe.addBoth(self._probe_done, probe)
            if self._probe is None:  # settled at once
                return self._outcome()
        remaining = self._probe_sent + self.timeout - now
        watch = self._pool.watch
        if watch is not None and not watch.connected and watch.failure:
            # no PING can be answered before the pool reconnects: say so now (the probe stays
            # in flight, answered once a connection is back)
            return fail(self._reason(waiting=True))
        if remaining <= 0:
            return self._late()
        answer = Deferred()

        def answered() -> None:
            if not answer.called:
                timer.cancel()
                self._outcome().chainDeferred(answer)

        def timed_out() -> None:
            if not answer.called:
                self._waiters.remove(answered)
                self._late().chainDeferred(answer)

        timer = self._reactor.callLater(remaining, timed_out)
        self._waiters.append(answered)
        return answer


def _ping_error(failure: Failure) -> str:
    """A failed PING as words (never a repr): "no answer to PING within 2.0 s", "not connected"..."""
    message = failure.getErrorMessage().strip()
    if failure.check(txredisapi.TimeoutError) or message.startswith("Not received Redis response"):
        return "no answer to PING " + message.removeprefix("Not received Redis response ").replace(" seconds", " s")
    if failure.check(txredisapi.ResponseError):
        return f"PING answered with an error: {message}"
    if failure.check(txredisapi.ConnectionError):
        text = message.removeprefix("Redis error: ")
        return "not connected" if text in ("Not connected", "Lost connection") else text
    return message or failure.type.__name__


class DrainGuard(Service):
    """On stop, makes the app refuse new ingests and waits for in-flight appends (bounded)."""

    def __init__(self, app: IngestApp, grace: float, reactor):
        self._app = app
        self._grace = grace
        self._reactor = reactor

    _refusing_since: float | None = None

    def refuse_new(self) -> None:
        """Make new ingests (and /ready) answer 503 at once; ``stopService`` then waits for in-flight ones."""
        if self._refusing_since is None:
            self._refusing_since = self._reactor.seconds()
        self._app.start_draining()

    def stopService(self):
        return self.stop_within(None)

    def stop_within(self, seconds: float | None) -> Deferred:
        """Wait for in-flight appends until ``grace`` seconds after :meth:`refuse_new` (at most ``seconds``)."""
        super().stopService()
        self.refuse_new()
        grace = max(self._refusing_since + self._grace - self._reactor.seconds(), 0.0)
        if seconds is not None:
            grace = min(grace, seconds)
        log.info("draining: refusing new ingests, waiting up to {grace:.1f}s for {inflight} in-flight requests",
                 grace=grace, inflight=self._app.inflight_requests)
        d = self._app.start_draining()
        d.addTimeout(grace, self._reactor)
        d.addErrback(lambda f: log.warn("grace period over with {n} requests in flight", n=self._app.inflight_requests))
        return d


def _sampler(pool: RedisPool, keys: StreamKeys, partitions: int, metrics: Metrics, timeout: float, reactor,
             health: RedisHealth | None = None):
    @inlineCallbacks
    def sample():
        try:
            d = pool.execute_command("PING")
            d.addTimeout(timeout, reactor)
            yield d
            if health is not None:
                health.record_success()
            for p in range(partitions):
                d = pool.execute_command("XLEN", keys.events(p))
                d.addTimeout(timeout, reactor)
                metrics.stream_length.labels(str(p)).set((yield d))
            metrics.redis_up.set(1)
        except Exception as e:  # noqa: BLE001 - a failed probe is a metric, not a crash
            metrics.redis_up.set(0)
            log.debug("stream sample failed: {reason}", reason=str(e) or type(e).__name__)

    return sample


def _add_consumers(
    node: Node, settings: Settings, pool: RedisPool, keys: StreamKeys, metrics: Metrics, reactor, handlers: dict
) -> None:
    """
    One ConsumerService + ReclaimService per configured consumer (``handlers``: each one's
    handler, by name), stopped before the pool; then, if a file exporter is among the
    handlers, the :class:`ReopenOnSighup` service.
    """
    for config in settings.consumers:
        name = config.consumer_name or default_consumer_name()
        config = attrs.evolve(config, consumer_name=name)
        handler = handlers[config.name]
        bind_exporter_metrics(handler, metrics, config.name)
        bind_redis = getattr(handler, "bind_redis", None)  # handlers that write to Redis (risk alerts)
        if bind_redis is not None:
            bind_redis(pool, keys)
        bind_alert_store = getattr(handler, "bind_alert_store", None)  # the risk consumer: the alerts API's store
        if bind_alert_store is not None:
            bind_alert_store(alert_store(settings, pool, reactor))
        consumer = ConsumerService(
            config,
            handler,
            pool,
            lambda config=config: open_read_connection(pool.target, config.block_ms, settings.redis_timeout),
            keys,
            settings.partitions,
            metrics.consumers,
            reactor,
            ready=pool.whenConnected,
            grace=settings.shutdown_grace,
            per_partition_reads=settings.redis_cluster,
        )
        consumer.setServiceParent(node)
        ReclaimService(
            config,
            handler,
            pool,
            keys,
            settings.partitions,
            metrics.consumers,
            reactor,
            consumer_name=name,
            last_errors=consumer.last_errors,
            ready=pool.whenConnected,
        ).setServiceParent(node)
        log.info("consumer {consumer} reads group {group} as {name} with handler {handler}",
                 consumer=config.name, group=config.group, name=name, handler=config.handler)
    if any(file_exporter.reopens_on_sighup(h) for h in handlers.values()):
        # started after the consumers (their handlers are there), stopped before them
        ReopenOnSighup(reactor).setServiceParent(node)


class ReopenOnSighup(Service):
    """
    SIGHUP (logrotate's ``postrotate``, ``systemctl reload``): every file exporter of the process
    reopens its file (:func:`payflux.exporters.file.reopen_all`, on the reactor thread).

    ``startService`` installs the process's SIGHUP handler (possible in the main thread only, as
    under ``twistd``; otherwise one warning line and SIGHUP stays as it was), which chains to a
    previously installed Python handler; ``stopService`` puts the previous handler back.  The
    node adds this service only when one of its consumers is a file exporter: elsewhere SIGHUP
    keeps its default (an ingest worker dies of it; see etc/payflux.service).
    """

    def __init__(self, reactor):
        if not hasattr(reactor, "callFromThread"):
            from twisted.internet import reactor  # e.g. a task.Clock in tests
        self._reactor = reactor
        self._installed = False
        self._previous: Any = None

    def startService(self) -> None:
        super().startService()
        if self._installed:
            return
        try:
            previous = signal.getsignal(signal.SIGHUP)
            signal.signal(signal.SIGHUP, self._on_sighup)
        except (ValueError, OSError, AttributeError) as e:  # not the main thread, or no SIGHUP here
            log.warn("SIGHUP will not reopen export files: {error}", error=str(e))
            return
        self._previous, self._installed = previous, True

    def stopService(self):
        super().stopService()
        if self._installed:
            self._installed = False
            previous, self._previous = self._previous, None
            try:
                # None: the previous handler was not installed from Python; the default is what is known
                signal.signal(signal.SIGHUP, signal.SIG_DFL if previous is None else previous)
            except (ValueError, OSError) as e:
                log.warn("could not restore the previous SIGHUP handler: {error}", error=str(e))

    def _on_sighup(self, signum: int, frame: Any) -> None:
        # a signal handler may interrupt the reactor thread anywhere: only hand over to the reactor
        self._reactor.callFromThread(file_exporter.reopen_all)
        previous = self._previous
        if callable(previous) and not isinstance(getattr(previous, "__self__", None), ReopenOnSighup):
            previous(signum, frame)  # another node's is the same reopen_all: once is enough


def freeze_after_start(reactor, delay: float = 2.0) -> None:
    """
    ``delay`` seconds after the reactor starts, move every object alive then into the garbage
    collector's permanent generation (:func:`gc.freeze`): modules, settings, services, pools,
    metric families live as long as the process.  A full collection then scans only what was
    allocated since, instead of ~all of PayFlux: py-spy and wrk showed those collections as the
    single-event p99 (63 ms with, 19 ms without them, PROOF-load-test.md).  For daemons only
    (tap.py, workerprocess.py): a test process that starts many nodes would keep their garbage.
    """
    reactor.callWhenRunning(reactor.callLater, delay, gc.freeze)


def _listener(reactor, description: str, factory) -> StreamServerEndpointService:
    service = StreamServerEndpointService(serverFromString(reactor, description), factory)
    # Fail the start (twistd exits non-zero) when the port can't be bound, instead of running
    # a node that listens nowhere.
    service._raiseSynchronously = True
    return service


class AdoptedListener(Service):
    """
    The ingest listener of a worker process: accepts on a listening socket inherited from the
    supervisor (``fd``) instead of binding one, so all workers share one accept queue.
    """

    def __init__(self, reactor, fd: int, family: int, factory):
        self._reactor = reactor
        self._fd = fd
        self._family = family
        self._protocol_factory = factory
        self.port = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self.port = self._reactor.adoptStreamPort(self._fd, self._family, self._protocol_factory)
        # adoptStreamPort dup()s the descriptor; the inherited one is no longer needed.
        os.close(self._fd)

    def startService(self) -> None:
        if self.port is None:
            self.privilegedStartService()
        super().startService()

    def stopService(self):
        super().stopService()
        port, self.port = self.port, None
        return port.stopListening() if port is not None else succeed(None)


class _TaggedRequest(BoundedRequest):
    """A request whose responses name the worker that served them (``X-PayFlux-Worker``)."""

    worker_tag = b""

    def process(self) -> None:
        self.setHeader(b"X-PayFlux-Worker", self.worker_tag)
        super().process()


def alert_store(settings: Settings, pool: RedisPool, reactor) -> AlertStore:
    """The alert store (``<prefix>:{alerts}:...``) on ``pool``, retention on the reactor's clock."""
    return AlertStore(pool, settings.stream_prefix, settings.alerts_retention_days, reactor.seconds)


def alerts_api(settings: Settings, pool: RedisPool, metrics: Metrics, reactor) -> tuple[AlertsApi, Any]:
    """The side listener's alerts API (admin keys only) and the status page's risk loop summary."""
    store = alert_store(settings, pool, reactor)
    api = AlertsApi(store, AdminAuthenticator(settings.admin_keys, settings.api_keys), metrics, reactor.seconds,
                    timeout=settings.redis_timeout, reactor=reactor)
    def risk_loop() -> Deferred:
        """The status page's risk panels: the report's summary and, as ``health``, processor health."""
        return store.since(None).addCallback(summarize).addCallback(
            lambda summary: store.health().addCallback(lambda snapshot: {**summary, "health": processors_answer(snapshot)}))

    return api, risk_loop


def add_redis(node: Node, settings: Settings, reactor, metrics: Metrics | None = None) -> RedisPool:
    """The embedded redis-server (when no ``redis_url``) and the pool, added to ``node``."""
    if settings.redis_url:
        url = settings.redis_url

        def target_source() -> Deferred:
            return succeed(url)
    else:
        embedded = EmbeddedRedis(settings.data_dir, reactor=reactor)
        embedded.setServiceParent(node)

        def target_source() -> Deferred:
            return embedded.whenReady().addCallback(lambda _: embedded.url)

    pool = RedisPool(
        target_source,
        poolsize=settings.redis_pool_size,
        reply_timeout=max(settings.redis_timeout, 1.0),
        connect_timeout=settings.redis_timeout,
        reactor=reactor,
    )
    if settings.redis_url:
        pool.unavailable = f"not connected to {_location(parse_redis_url(settings.redis_url))} yet"
    pool.health = RedisHealth(pool, reactor)
    pool.setServiceParent(node)
    if settings.redis_cluster and metrics is not None:
        metrics.registry.register(ClusterRedirects(pool))
    return pool


class ClusterRedirects:
    """``payflux_redis_cluster_redirects_total{kind}``: MOVED/ASK/TRYAGAIN the node's pool followed."""

    def __init__(self, pool: RedisPool):
        self._pool = pool

    def describe(self):
        return [CounterMetricFamily("payflux_redis_cluster_redirects", "Cluster redirections followed.",
                                    labels=["kind"])]

    def collect(self):
        family = CounterMetricFamily("payflux_redis_cluster_redirects",
                                     "Cluster redirections followed (MOVED, ASK) and TRYAGAIN retries.",
                                     labels=["kind"])
        counts = getattr(self._pool.handler, "redirects", None) or {}
        for kind in ("MOVED", "ASK", "TRYAGAIN"):
            family.add_metric([kind], counts.get(kind, 0))
        yield family


def add_background(node: Node, settings: Settings, pool: RedisPool, keys: StreamKeys, metrics: Metrics, reactor,
                   handlers: dict | None) -> None:
    """
    Consumers (role ``consumers``), the trimmer and the samplers: one set per node (or supervisor).

    The consumers' handlers are built here (:func:`~payflux.consumers.handlers.build_handlers`;
    ``handlers`` maps consumer names to prebuilt ones): under twistd that is in ``makeService``,
    before twistd daemonizes, so building one starts no thread (a handler's ``start()`` runs in
    its ConsumerService's ``startService``).  A handler that can't be built raises
    :class:`~payflux.consumers.handlers.HandlerError` before any consumer service is added.
    """
    if "consumers" in settings.roles:
        handlers = build_handlers(settings.consumers, reactor, handlers)
        _add_consumers(node, settings, pool, keys, metrics, reactor, handlers)
    if settings.retention_interval > 0:
        TrimService(
            settings.retention(), pool, keys, settings.partitions, metrics.consumers, reactor, ready=pool.whenConnected
        ).setServiceParent(node)
    GroupStatsSampler(
        pool, keys, settings.partitions, metrics.consumers, reactor, interval=settings.stats_interval,
        ready=pool.whenConnected, idle_warning=settings.group_idle_warning,
    ).setServiceParent(node)

    sample = _sampler(pool, keys, settings.partitions, metrics, settings.redis_timeout, reactor, pool.health)
    sampler = TimerService(settings.stats_interval, sample)
    sampler.clock = reactor
    sampler.setServiceParent(node)
    # the timer's first pass usually runs before Redis is connected: sample again once it is,
    # so payflux_redis_up doesn't read 0 for a whole stats_interval after every start
    pool.whenConnected().addCallback(lambda _: sample())


def build_node(
    settings: Settings,
    reactor,
    handlers: dict | None = None,
    *,
    ingest_fd: int | None = None,
    ingest_family: int = socket.AF_INET,
    worker_tag: str | None = None,
) -> Node:
    """
    The node's services; ``handlers`` maps consumer names to prebuilt handlers (tests), the
    others are built by :func:`add_background` (HandlerError if one can't be).

    A worker process (see :mod:`payflux.workerprocess`) passes ``ingest_fd``, the listening socket it
    inherited, and ``worker_tag``: it then runs the ingest role only, on the adopted socket, and
    leaves consumers, the trimmer and the samplers to its supervisor.
    """
    node = Node(settings.shutdown_grace, reactor)
    metrics = Metrics()
    pool = add_redis(node, settings, reactor, metrics)

    keys = StreamKeys(settings.stream_prefix, layout=settings.layout)
    writer = StreamWriter(
        pool,
        keys,
        partitions=settings.partitions,
        dedupe_window_seconds=settings.dedupe_window,
        timeout=settings.redis_timeout,
        reactor=reactor,
        min_replicas_ack=settings.min_replicas_ack,
        replica_ack_timeout_ms=settings.replica_ack_timeout,
    )

    ping = pool.health.check  # /ready: within 50 ms, with a readable reason

    if settings.insecure_dev_mode:
        log.warn("INSECURE DEV MODE: requests without an API key are accepted (key id 'dev')")
    if ingest_fd is None:  # a --workers supervisor logs it once, never each worker
        log_go_env(settings)
    hooks = build_hooks(settings.stripe_webhook_secret, settings.adyen_hmac_key, settings.id_hash_key)
    webhooks = None
    if hooks:
        # outcome signals are recorded on the alert store, as the side listener's alerts API does
        webhooks = WebhookReceiver(hooks, alert_store(settings, pool, reactor), metrics, reactor.seconds,
                                   timeout=settings.redis_timeout, reactor=reactor)
        if ingest_fd is None:
            log.info("processor webhooks on: {routes}", routes=", ".join(f"POST /v1/webhooks/{p}" for p in hooks))
    app = IngestApp(
        validator=EventValidator(
            ValidationPolicy(settings.future_skew, settings.unknown_fields, settings.layout == "seed"),
            now=reactor.seconds,
        ),
        writer=writer,
        authenticator=Authenticator(settings.api_keys, settings.revoked_keys, settings.insecure_dev_mode),
        limiter=RateLimiter(settings.rate_limit, settings.rate_burst, reactor.seconds),
        metrics=metrics,
        limits=IngestLimits(
            max_event_bytes=settings.max_event_bytes,
            max_body_bytes=settings.max_body_bytes,
            max_batch_events=settings.max_batch_events,
            max_inflight_events=settings.max_inflight_events,
            redis_timeout=settings.redis_timeout,
        ),
        ping=ping,
        seconds=reactor.seconds,
        serve_metrics=settings.ingest_metrics,
        webhooks=webhooks,
    )

    node.side_listener = None
    if settings.metrics_listen:
        api, risk_loop = alerts_api(settings, pool, metrics, reactor)
        side = SideApp(app, alerts_stream=alerts_stream_key(settings.stream_prefix, settings.consumers),
                       alerts=api, risk_loop=risk_loop)
        node.side_listener = _listener(reactor, settings.metrics_listen, side.site(settings.header_timeout))
        node.side_listener.setServiceParent(node)
    node.ingest_listener = None
    if "ingest" in settings.roles or ingest_fd is not None:
        site = IngestSite(app.resource(), app.body_limit, app.preflight, app.on_early_reject,
                          header_timeout=settings.header_timeout)
        if ingest_fd is not None:
            site.requestFactory = type("WorkerRequest", (_TaggedRequest,), {"worker_tag": (worker_tag or "").encode()})
        factory = FastIngestFactory(app, site, reactor, header_timeout=settings.header_timeout,
                                    worker_tag=worker_tag if ingest_fd is not None else None,
                                    on_fallback=lambda reason: metrics.http_fallbacks.labels(reason).inc())
        if ingest_fd is None:
            node.ingest_listener = _listener(reactor, settings.listen, factory)
        else:
            node.ingest_listener = AdoptedListener(reactor, ingest_fd, ingest_family, factory)
        node.ingest_listener.setServiceParent(node)
        DrainGuard(app, settings.shutdown_grace, reactor).setServiceParent(node)

    if ingest_fd is None:
        add_background(node, settings, pool, keys, metrics, reactor, handlers)

    node.app = app  # for tests and tools: the wired app
    node.metrics = metrics
    node.pool = pool
    return node
