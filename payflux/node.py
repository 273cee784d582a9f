"""
Assembles one PayFlux node: a MultiService holding, in start order,

1. the embedded redis-server (only when no ``redis_url`` is set),
2. the Redis connection pool (connects once that Redis answers),
3. the metrics side listener and (role ``ingest``) the HTTP ingest listener,
4. the drain guard (on stop: /ready and new ingests turn 503, in-flight appends finish),
5. (role ``consumers``) a ConsumerService and a ReclaimService per configured consumer,
6. the retention trimmer and the consumer-group sampler,
7. the stream sampler (XLEN per partition and a Redis probe, every ``stats_interval``).

:class:`Node` stops children one at a time in reverse order, so on SIGTERM the node first stops
its samplers and consumers (in-flight handlers finish and are acked), then drains ingest, then
closes its listeners, then its Redis connections, and stops the embedded Redis last.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Any

import attrs
import txredisapi
from prometheus_client.core import CounterMetricFamily
from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.logger import Logger

from payflux.config import Settings
from payflux.consumers.handlers import load_handler
from payflux.consumers.reclaim import ReclaimService
from payflux.consumers.service import ConsumerService, default_consumer_name, open_read_connection
from payflux.consumers.stats import GroupStatsSampler
from payflux.consumers.trim import TrimService
from payflux.events import EventValidator, ValidationPolicy
from payflux.exporters.metrics import bind_exporter_metrics
from payflux.goenv import log_go_env
from payflux.ingest.app import IngestApp, IngestLimits
from payflux.ingest.auth import Authenticator, RateLimiter
from payflux.ingest.http import BoundedRequest, IngestSite
from payflux.ingest.side import SideApp
from payflux.observability.metrics import Metrics
from payflux.observability.status import alerts_stream_key
from payflux.streams.connection import RedisTarget, connect, parse_redis_url
from payflux.streams.embedded import EmbeddedRedis, EmbeddedRedisError
from payflux.streams.keys import StreamKeys
from payflux.streams.writer import StreamWriter

log = Logger()


class Node(MultiService):
    """
    A MultiService that stops its children one after another, in reverse start order, each
    waiting for the previous one: MultiService's own stopService stops them all at once, which
    would close the listeners while in-flight appends are still draining.
    """

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
        Service.stopService(self)
        for service in self:
            if isinstance(service, DrainGuard):
                # new ingests get 503 from the first moment of the stop, not only once the
                # consumers and samplers stopped before the guard (they may wait on Redis)
                service.refuse_new()
        for service in reversed(list(self)):
            try:
                yield service.stopService()
            except Exception:  # noqa: BLE001 - one failing child must not keep the rest running
                log.failure("error stopping {service}", service=service)


class RedisPool(Service):
    """
    The node's txredisapi pool, connected once its Redis is known to answer.

    Until then (and after stop) command methods raise ``txredisapi.ConnectionError`` at once, so
    callers answer 503 instead of waiting.  ``ready`` is a Deferred yielding the Redis URL
    (the embedded Redis's socket URL, or the configured one).
    """

    def __init__(self, target_source, poolsize: int, reply_timeout: float, connect_timeout: float):
        self._target_source = target_source
        self._poolsize = poolsize
        self._reply_timeout = reply_timeout
        self._connect_timeout = connect_timeout
        self.handler: Any = None
        self.target: RedisTarget | None = None
        self.url: str | None = None
        self._waiting: list[Deferred] = []

    def startService(self) -> None:
        super().startService()
        d = self._target_source()
        d.addCallback(self._connect)
        d.addErrback(lambda f: log.failure("Redis is not available; ingest answers 503", f))

    def _connect(self, url: str) -> None:
        if not self.running:
            return
        self.target = parse_redis_url(url)
        self.url = url
        log.info("using Redis at {redis}", redis=self.target.redacted())
        self.handler = connect(self.target, self._poolsize, self._connect_timeout, self._reply_timeout)
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
        super().stopService()
        handler, self.handler = self.handler, None
        if handler is None:
            return succeed(None)
        return handler.disconnect()

    def __getattr__(self, name: str):
        handler = self.__dict__.get("handler")
        if handler is None:
            if name.startswith("_"):
                raise AttributeError(name)

            def not_connected(*args, **kwargs):
                raise txredisapi.ConnectionError("Redis connection not established")

            return not_connected
        return getattr(handler, name)


class DrainGuard(Service):
    """On stop, makes the app refuse new ingests and waits for in-flight appends (bounded)."""

    def __init__(self, app: IngestApp, grace: float, reactor):
        self._app = app
        self._grace = grace
        self._reactor = reactor

    def refuse_new(self) -> None:
        """Make new ingests (and /ready) answer 503 at once; ``stopService`` then waits for in-flight ones."""
        self._app.start_draining()

    def stopService(self):
        super().stopService()
        log.info("draining: refusing new ingests, waiting up to {grace}s for {inflight} in-flight requests",
                 grace=self._grace, inflight=self._app.inflight_requests)
        d = self._app.start_draining()
        d.addTimeout(self._grace, self._reactor)
        d.addErrback(lambda f: log.warn("grace period over with {n} requests in flight", n=self._app.inflight_requests))
        return d


def _sampler(pool: RedisPool, keys: StreamKeys, partitions: int, metrics: Metrics, timeout: float, reactor):
    @inlineCallbacks
    def sample():
        try:
            d = pool.execute_command("PING")
            d.addTimeout(timeout, reactor)
            yield d
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
    """One ConsumerService + ReclaimService per configured consumer, stopped before the pool."""
    for config in settings.consumers:
        name = config.consumer_name or default_consumer_name()
        config = attrs.evolve(config, consumer_name=name)
        handler = handlers.get(config.name) or load_handler(config.handler, config.options, reactor)
        bind_exporter_metrics(handler, metrics, config.name)
        bind_redis = getattr(handler, "bind_redis", None)  # handlers that write to Redis (risk alerts)
        if bind_redis is not None:
            bind_redis(pool, keys)
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
        self._factory = factory
        self.port = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self.port = self._reactor.adoptStreamPort(self._fd, self._family, self._factory)
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
    )
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
    """Consumers (role ``consumers``), the trimmer and the samplers: one set per node (or supervisor)."""
    if "consumers" in settings.roles:
        _add_consumers(node, settings, pool, keys, metrics, reactor, handlers or {})
    if settings.retention_interval > 0:
        TrimService(
            settings.retention(), pool, keys, settings.partitions, metrics.consumers, reactor, ready=pool.whenConnected
        ).setServiceParent(node)
    GroupStatsSampler(
        pool, keys, settings.partitions, metrics.consumers, reactor, interval=settings.stats_interval,
        ready=pool.whenConnected,
    ).setServiceParent(node)

    sample = _sampler(pool, keys, settings.partitions, metrics, settings.redis_timeout, reactor)
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
    The node's services; ``handlers`` maps consumer names to prebuilt handlers (tap builds them).

    A worker process (see :mod:`payflux.workers`) passes ``ingest_fd``, the listening socket it
    inherited, and ``worker_tag``: it then runs the ingest role only, on the adopted socket, and
    leaves consumers, the trimmer and the samplers to its supervisor.
    """
    node = Node()
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

    def ping() -> Deferred:
        d = pool.execute_command("PING")
        return d.addTimeout(settings.redis_timeout, reactor)

    if settings.insecure_dev_mode:
        log.warn("INSECURE DEV MODE: requests without an API key are accepted (key id 'dev')")
    if ingest_fd is None:  # a --workers supervisor logs it once, never each worker
        log_go_env(settings)
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
    )

    node.side_listener = None
    if settings.metrics_listen:
        side = SideApp(app, alerts_stream=alerts_stream_key(settings.stream_prefix, settings.consumers))
        node.side_listener = _listener(reactor, settings.metrics_listen, side.site())
        node.side_listener.setServiceParent(node)
    node.ingest_listener = None
    if "ingest" in settings.roles or ingest_fd is not None:
        site = IngestSite(app.resource(), app.body_limit, app.preflight, app.on_early_reject,
                          header_timeout=settings.header_timeout)
        if ingest_fd is None:
            node.ingest_listener = _listener(reactor, settings.listen, site)
        else:
            site.requestFactory = type("WorkerRequest", (_TaggedRequest,), {"worker_tag": (worker_tag or "").encode()})
            node.ingest_listener = AdoptedListener(reactor, ingest_fd, ingest_family, site)
        node.ingest_listener.setServiceParent(node)
        DrainGuard(app, settings.shutdown_grace, reactor).setServiceParent(node)

    if ingest_fd is None:
        add_background(node, settings, pool, keys, metrics, reactor, handlers)

    node.app = app  # for tests and tools: the wired app
    node.metrics = metrics
    node.pool = pool
    return node
