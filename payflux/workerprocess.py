"""
One ingest worker process of ``--workers N`` (the supervisor is :mod:`payflux.supervisor`).

Started by the supervisor as ``python -m payflux.workerprocess``. Reads a pickled :class:`WorkerSpec`
from stdin (a pipe: secrets never appear in argv, the environment or a file), dies with the
supervisor, adopts the shared listening socket on file descriptor :data:`INHERITED_FD` and runs
the ingest role with ``build_node``. The spec's settings point ``metrics_listen`` at a private
unix socket (``<tmp>/payflux-workers-*/worker-<i>.sock``, directory 0700), so the node's side
listener is the metrics/ready socket the supervisor scrapes. Responses carry
``X-PayFlux-Worker: <index>/<pid>``. Its per-key rate limit is the one bucket all workers share
(:func:`share_rate_limit`).
"""

from __future__ import annotations

import os
import pickle
import signal
import sys

import attrs

from payflux.config import Settings

INHERITED_FD = 3


@attrs.frozen
class WorkerSpec:
    """What the supervisor hands one worker on its stdin (pickled)."""

    index: int
    settings: Settings
    family: int
    supervisor_pid: int
    log_format: str  # "json" or "text"
    workers: int = 1  # how many workers share the socket (and every key's rate limit)


def _die_with_parent(supervisor_pid: int) -> None:
    """Linux: SIGTERM this worker if the supervisor dies, so no orphan keeps serving the port."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - best effort, other platforms
        pass
    if os.getppid() != supervisor_pid:
        raise SystemExit(1)


def _start_logging(spec: WorkerSpec) -> None:
    """The supervisor's log format, the settings' log_level and log_summary_interval, tagged ``worker N``."""
    from twisted.logger import globalLogBeginner

    from payflux.observability import logs

    settings = spec.settings
    logs.configure(level=settings.log_level, summary_interval=settings.log_summary_interval)
    inner = logs.build_observer(spec.log_format, sys.stdout, settings.log_level)
    system = f"worker {spec.index}"

    def observe(event: dict) -> None:
        event["log_system"] = system
        if spec.log_format == "json":
            event.setdefault("worker", spec.index)
        inner(event)

    globalLogBeginner.beginLoggingTo([observe], redirectStandardIO=False)


def share_rate_limit(node, spec: WorkerSpec, reactor) -> None:
    """
    Give the worker's ingest app the rate limiter shared by all workers through Redis
    (:class:`payflux.ingest.ratelimit.SharedRateLimiter`) instead of a per-process one, which would
    let a key through N times its limit with N workers.
    """
    settings = spec.settings
    if spec.workers <= 1 or not settings.rate_limit:
        return
    from payflux.ingest.ratelimit import SharedRateLimiter

    node.app.limiter = SharedRateLimiter(settings.rate_limit, settings.rate_burst, reactor.seconds, node.pool,
                                         reactor, spec.workers, settings.stream_prefix)


def main() -> None:
    spec: WorkerSpec = pickle.loads(sys.stdin.buffer.read())
    _die_with_parent(spec.supervisor_pid)
    _start_logging(spec)

    from twisted.internet import reactor

    from payflux.node import build_node, freeze_after_start

    node = build_node(
        spec.settings,
        reactor,
        ingest_fd=INHERITED_FD,
        ingest_family=spec.family,
        worker_tag=f"{spec.index}/{os.getpid()}",
    )
    share_rate_limit(node, spec, reactor)
    node.privilegedStartService()
    node.startService()
    reactor.addSystemEventTrigger("before", "shutdown", node.stopService)
    freeze_after_start(reactor)
    reactor.run()


if __name__ == "__main__":
    main()
