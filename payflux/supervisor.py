"""
``--workers N``: one supervisor process and N ingest worker processes, one SO_REUSEPORT socket each.

With ``workers > 1`` the ``twistd`` process is the **supervisor**. It owns

- the embedded redis-server (when no ``redis_url`` is set) and a Redis pool of its own,
- the ingest listening sockets (``listen`` must be a ``tcp:``/``tcp6:`` endpoint): one per
  worker, all bound to the same address with ``SO_REUSEPORT`` (:class:`WorkerSockets`), never
  accepted on by the supervisor itself; worker ``i`` gets socket ``i`` as file descriptor 3 and
  adopts it (``reactor.adoptStreamPort``). The kernel spreads connections over the workers;
  the supervisor keeps every socket open, so connections that arrive while a worker restarts
  wait in its backlog for the new worker, and a taken port fails the start once, with one line;
- the side listener (``metrics_listen``): ``/metrics`` sums the workers' ingest metrics,
  ``/ready`` is 200 only when Redis answers and every worker answers its own ``/ready``,
  ``/health`` is the supervisor's liveness, ``/v1/alerts...`` the alerts API (on the
  supervisor's pool);
- the consumers role, the retention trimmer and the stream/group samplers (one set per node,
  never one per worker: workers only ingest).

Each **worker** (``python -m payflux.workerprocess``, see :mod:`payflux.workerprocess`) gets its settings
pickled on its stdin (a pipe from the supervisor: secrets never appear in argv, the environment
or a file), with the Redis URL resolved by the supervisor, and serves the ingest role on the adopted socket plus its own
side listener on a private unix socket (``<tmp>/payflux-workers-*/worker-<i>.sock``, directory
0700) that the supervisor scrapes. Responses carry ``X-PayFlux-Worker: <index>/<pid>``.

The supervisor restarts a worker that exits unexpectedly after a backoff (0.5 s, doubling to
30 s, reset once a worker has run for 10 s), logs it and counts it in
``payflux_worker_restarts_total``. On SIGTERM it sends SIGTERM to every worker at once (each
drains like a single node: 503 to new requests, in-flight appends finish), stops its consumers,
waits for the workers (until its own stop budget says so, about ``shutdown_grace`` + 1.5 s after
the SIGTERM, then SIGKILL), closes the socket and the side listener, and stops the embedded
Redis last: the whole stop ends within ``shutdown_grace`` + 5 s (see :class:`payflux.node.Node`).
"""

from __future__ import annotations

import os
import pickle
import shutil
import socket
import sys
import tempfile
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet import protocol
from twisted.internet.defer import Deferred, DeferredList, gatherResults, inlineCallbacks, succeed
from twisted.internet.endpoints import TCP6ServerEndpoint, UNIXClientEndpoint, serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from payflux.config import Settings
from payflux.deadlines import settled_within
from payflux.goenv import log_go_env
from payflux.ingest.side import WorkersSideApp
from payflux.node import Node, RedisPool, _listener, add_background, add_redis, alerts_api
from payflux.observability.metrics import Metrics, SupervisorMetrics, WorkerTotals
from payflux.streams.keys import StreamKeys
from payflux.workerprocess import INHERITED_FD, WorkerSpec

log = Logger()

BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
STABLE_AFTER = 10.0
#: seconds after SIGKILLing the workers still left that the supervisor waits for them to be reaped
REAP_LIMIT = 0.5
#: seconds the supervisor's /ready waits for each worker's own /ready
WORKER_READY_TIMEOUT = 0.08


class WorkerSockets(Service):
    """
    The ingest endpoint, bound in the supervisor as one listening socket per worker, all with
    ``SO_REUSEPORT`` on the same address; the supervisor never accepts on them.

    The kernel spreads new connections over the sockets by a hash of their addresses, so each
    worker gets its share of a client's connections.  One socket shared by all workers (what
    this replaced) let whichever worker woke first accept a whole burst: with wrk's 64
    connections, one of two workers held ~60 of them (PROOF-load-test.md, 2026-12-03).  Worker
    ``i`` always gets socket ``i``, which the supervisor keeps open, so connections hashed to
    it while worker ``i`` restarts wait in its backlog for the new worker.  Before binding, the
    address is bound once *without* ``SO_REUSEPORT``: if anything holds it (another PayFlux
    included, which would otherwise join the group silently), the start fails with one line.
    """

    def __init__(self, reactor, description: str, count: int):
        self._reactor = reactor
        self._description = description
        self._count = count
        self.sockets: list[socket.socket] = []
        self.family = socket.AF_INET

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        if self.sockets:
            return
        endpoint = serverFromString(self._reactor, self._description)
        # TCP4ServerEndpoint / TCP6ServerEndpoint (config allows only tcp: and tcp6: with workers)
        port, backlog, interface = endpoint._port, endpoint._backlog, endpoint._interface
        self.family = socket.AF_INET6 if isinstance(endpoint, TCP6ServerEndpoint) else socket.AF_INET
        host = interface or ("::" if self.family == socket.AF_INET6 else "0.0.0.0")
        try:
            with socket.socket(self.family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as twisted: TIME_WAIT is no holder
                probe.bind((host, port))
                port = probe.getsockname()[1]
            for _ in range(self._count):
                sock = socket.socket(self.family, socket.SOCK_STREAM)
                self.sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                sock.bind((host, port))
                sock.listen(backlog)
                sock.setblocking(False)
        except OSError as e:
            self._close()
            raise CannotListenError(interface, port, e) from None  # Node: one line, exit 1
        self.address = self.sockets[0].getsockname()

    def startService(self) -> None:
        self.privilegedStartService()
        super().startService()

    def fileno(self, index: int) -> int:
        return self.sockets[index].fileno()

    def _close(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.sockets = []

    def stopService(self):
        super().stopService()
        self._close()
        return succeed(None)


@implementer(IAgentEndpointFactory)
class _UnixEndpoints:
    def __init__(self, reactor, path: str, timeout: float):
        self._reactor, self._path, self._timeout = reactor, path, timeout

    def endpointForURI(self, uri):
        return UNIXClientEndpoint(self._reactor, self._path, timeout=self._timeout)


class _WorkerProcess(protocol.ProcessProtocol):
    def __init__(self, pool: "WorkerPool", index: int, payload: bytes):
        self.pool = pool
        self.index = index
        self.payload = payload
        self.started = pool.reactor.seconds()
        self.ended: Deferred = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.payload)
        self.transport.closeStdin()

    def processEnded(self, reason: Failure) -> None:
        self.pool._ended(self, reason)
        self.ended.callback(None)


class WorkerPool(Service):
    """Spawns, watches, restarts and stops the worker processes; scrapes their side sockets."""

    # for payflux.node.Node's bounded stop: the workers drain for shutdown_grace, then get this
    # much longer to close their listeners and pools before the supervisor SIGKILLs them
    drains_work = True
    settle_limit = 2.0

    def __init__(
        self,
        settings: Settings,
        reactor,
        shared: WorkerSockets,
        redis: RedisPool,
        metrics: Metrics,
        log_format: str,
    ):
        self.settings = settings
        self.reactor = reactor
        self.shared = shared
        self.redis = redis
        self.metrics = metrics
        self.supervisor_metrics = SupervisorMetrics(metrics.registry)
        self.supervisor_metrics.workers_configured.set(settings.workers)
        self.log_format = log_format
        self.count = settings.workers
        self.run_dir = ""
        self.procs: dict[int, _WorkerProcess] = {}
        self.failures = [0] * self.count
        self.restarts: dict[int, Any] = {}
        self.snapshots: dict[int, str] = {}
        self.totals = WorkerTotals()
        self.stopping = False
        self._scraper: LoopingCall | None = None
        self._http = HTTPConnectionPool(reactor, persistent=False)

    # --- lifecycle ---

    def startService(self) -> None:
        super().startService()
        self.run_dir = tempfile.mkdtemp(prefix="payflux-workers-")  # 0700
        d = self.redis.whenConnected()
        d.addCallback(lambda _: self._spawn_all())
        d.addErrback(lambda f: log.failure("could not start workers", f))

    def _spawn_all(self) -> None:
        if self.stopping:
            return
        for index in range(self.count):
            self._spawn(index)
        self._scraper = LoopingCall(self._snapshot_all)
        self._scraper.clock = self.reactor
        self._scraper.start(self.settings.stats_interval, now=False).addErrback(
            lambda f: log.failure("worker metrics snapshots stopped", f)
        )

    def socket_path(self, index: int) -> str:
        return os.path.join(self.run_dir, f"worker-{index}.sock")

    def _spawn(self, index: int) -> None:
        self.restarts.pop(index, None)
        if self.stopping:
            return
        path = self.socket_path(index)
        if os.path.exists(path):
            os.unlink(path)
        worker_settings = attrs.evolve(
            self.settings,
            redis_url=self.redis.url,
            roles=("ingest",),
            workers=1,
            metrics_listen=f"unix:{path}:mode=600",
            consumers=(),
        )
        # workers=: each worker admits from its share of every key's rate-limit bucket, shared
        # through Redis (payflux.ingest.ratelimit.SharedRateLimiter), so a key's limit holds across workers
        spec = WorkerSpec(index, worker_settings, self.shared.family, os.getpid(), self.log_format,
                          workers=self.count)
        proc = _WorkerProcess(self, index, pickle.dumps(spec))
        self.reactor.spawnProcess(
            proc,
            sys.executable,
            [sys.executable, "-m", "payflux.workerprocess"],
            env=dict(os.environ),
            childFDs={0: "w", 1: 1, 2: 2, INHERITED_FD: self.shared.fileno(index)},
        )
        self.procs[index] = proc
        self.supervisor_metrics.workers_running.set(len(self.procs))
        log.info("worker {worker} started (pid {pid})", worker=index, pid=proc.transport.pid)

    def _ended(self, proc: _WorkerProcess, reason: Failure) -> None:
        index = proc.index
        if self.procs.get(index) is proc:
            del self.procs[index]
        self.supervisor_metrics.workers_running.set(len(self.procs))
        snapshot = self.snapshots.pop(index, None)
        if snapshot:
            self.totals.retire(snapshot)
        status = getattr(reason.value, "exitCode", None)
        sig = getattr(reason.value, "signal", None)
        if self.stopping:
            log.info("worker {worker} exited (status {status}, signal {signal})", worker=index, status=status,
                     signal=sig)
            return
        lived = self.reactor.seconds() - proc.started
        self.failures[index] = 1 if lived >= STABLE_AFTER else self.failures[index] + 1
        delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (self.failures[index] - 1))
        log.error("worker {worker} exited unexpectedly (status {status}, signal {signal}); restarting in {delay}s",
                  worker=index, status=status, signal=sig, delay=delay)
        self.supervisor_metrics.worker_restarts.labels(str(index)).inc()
        self.restarts[index] = self.reactor.callLater(delay, self._spawn, index)

    def begin_stop(self) -> None:
        """SIGTERM every worker now (they drain in parallel with the supervisor's consumers)."""
        if self.stopping:
            return
        self.stopping = True
        for call in self.restarts.values():
            if call.active():
                call.cancel()
        self.restarts.clear()
        if self._scraper is not None and self._scraper.running:
            self._scraper.stop()
        for proc in list(self.procs.values()):
            self._signal(proc, "TERM")

    @staticmethod
    def _signal(proc: _WorkerProcess, name: str) -> None:
        try:
            proc.transport.signalProcess(name)
        except Exception:  # noqa: BLE001 - already gone
            pass

    def stopService(self):
        return self.stop_within(self.settings.shutdown_grace + 5.0)

    @inlineCallbacks
    def stop_within(self, seconds: float):
        """SIGTERM the workers (if not yet), SIGKILL those still running ``seconds`` - REAP_LIMIT later."""
        super().stopService()
        self.begin_stop()
        running = list(self.procs.values())
        if running:
            wait = max(seconds - REAP_LIMIT, 0.0)
            log.info("waiting up to {wait:.1f}s for {n} workers to drain", wait=wait, n=len(running))
            timer = self.reactor.callLater(wait, self._kill, running)
            yield settled_within(DeferredList([p.ended for p in running]), max(seconds - 0.1, wait), self.reactor)
            if timer.active():
                timer.cancel()
        yield self._http.closeCachedConnections()
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def _kill(self, procs: list[_WorkerProcess]) -> None:
        for proc in procs:
            if not proc.ended.called:
                log.warn("worker {worker} did not stop within the grace period; killing it", worker=proc.index)
                self._signal(proc, "KILL")

    # --- talking to the workers' private side sockets ---

    def fetch(self, index: int, path: str, timeout: float | None = None) -> Deferred:
        """GET ``path`` on worker ``index``'s side socket; fires with (status, body)."""
        if timeout is None:
            timeout = self.settings.redis_timeout + 1.0
        agent = Agent.usingEndpointFactory(
            self.reactor, _UnixEndpoints(self.reactor, self.socket_path(index), timeout), pool=self._http
        )
        d = agent.request(b"GET", b"http://worker" + path.encode())
        d.addCallback(lambda r: readBody(r).addCallback(lambda body: (r.code, body)))
        d.addTimeout(timeout, self.reactor)
        return d

    def _snapshot(self, index: int) -> Deferred:
        proc = self.procs.get(index)

        def got(result):
            status, body = result
            if status == 200 and self.procs.get(index) is proc:
                self.snapshots[index] = body.decode("utf-8")
            return self.snapshots.get(index)

        d = self.fetch(index, "/metrics")
        d.addCallback(got)
        d.addErrback(lambda f: self.snapshots.get(index))
        return d

    def _snapshot_all(self) -> Deferred:
        return gatherResults([self._snapshot(i) for i in list(self.procs)])

    @inlineCallbacks
    def render_metrics(self):
        """The supervisor's registry plus the workers' ingest metrics summed (see WorkerTotals)."""
        texts = yield self._snapshot_all()
        return self.totals.render(self.metrics.registry, [t for t in texts if t])

    @inlineCallbacks
    def workers_ready(self):
        """How many workers answer 200 on their own /ready (within WORKER_READY_TIMEOUT each, all at once)."""

        def status(index):
            d = self.fetch(index, "/ready", WORKER_READY_TIMEOUT)
            d.addCallback(lambda r: r[0] == 200)
            d.addErrback(lambda f: False)
            return d

        results = yield gatherResults([status(i) for i in list(self.procs)])
        return sum(1 for ok in results if ok)


class _StopSignal(Service):
    """Started last, so stopped first: marks the supervisor draining and SIGTERMs the workers."""

    def __init__(self, workers: WorkerPool, side: WorkersSideApp):
        self._workers = workers
        self._side = side

    def stopService(self):
        super().stopService()
        self._side.draining = True
        self._workers.begin_stop()
        return succeed(None)


def build_supervisor(settings: Settings, reactor, handlers: dict | None = None, log_format: str = "text") -> Node:
    """The supervisor's services (see the module docstring); ``settings.workers`` > 1."""
    log_go_env(settings)  # once here, not in each worker (build_node skips it with ingest_fd)
    node = Node(settings.shutdown_grace, reactor)
    metrics = Metrics()
    pool = add_redis(node, settings, reactor, metrics)
    keys = StreamKeys(settings.stream_prefix, layout=settings.layout)
    ping = pool.health.check  # /ready: within 50 ms, with a readable reason

    shared = WorkerSockets(reactor, settings.listen, settings.workers)
    workers = WorkerPool(settings, reactor, shared, pool, metrics, log_format)
    api, risk_loop = alerts_api(settings, pool, metrics, reactor)
    side = WorkersSideApp(workers, ping, metrics.content_type, alerts=api, risk_loop=risk_loop)

    node.side_listener = None
    if settings.metrics_listen:
        node.side_listener = _listener(reactor, settings.metrics_listen, side.site(settings.header_timeout))
        node.side_listener.setServiceParent(node)
    shared.setServiceParent(node)
    workers.setServiceParent(node)
    add_background(node, settings, pool, keys, metrics, reactor, handlers)
    _StopSignal(workers, side).setServiceParent(node)

    node.metrics = metrics
    node.pool = pool
    node.workers = workers
    node.ingest_listener = shared
    return node
