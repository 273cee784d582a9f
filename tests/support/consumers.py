"""Shared helpers of the consumer tests: entries in a real Redis, recording handlers, waiting."""

from __future__ import annotations

import json
import time
from typing import Any, Callable

from twisted.internet import defer, reactor, task

from payflux.consumers.config import ConsumerConfig
from payflux.consumers.handlers import EntriesFailed, Entry
from payflux.consumers.service import open_read_connection
from payflux.observability.metrics import Metrics
from payflux.redis.connect import connect
from payflux.redis.target import parse_redis_url
from payflux.streams.keys import StreamKeys

KEYS = StreamKeys("pf")


def sleep(seconds: float) -> defer.Deferred:
    return task.deferLater(reactor, seconds, lambda: None)


async def wait_for(condition: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await sleep(0.01)


async def consumer_started(proc: Any, timeout: float = 15.0) -> None:
    """
    Wait (bounded) for tests/support/consumer_proc.py's "ready" line: a SIGTERM before it has no
    handler installed yet and kills the process with a non-zero status.  ``proc.stdout`` must be
    a pipe; it is switched to non-blocking here.
    """
    import os

    os.set_blocking(proc.stdout.fileno(), False)
    seen = getattr(proc, "_payflux_stdout", bytearray())
    proc._payflux_stdout = seen

    def ready() -> bool:
        seen.extend(proc.stdout.read() or b"")
        return b"ready" in seen

    await wait_for(ready, timeout, "the consumer process to start")


def config(**kw: Any) -> ConsumerConfig:
    base = dict(name="c1", group="g", handler="noop", consumer_name="worker-1", block_ms=200)
    base.update(kw)
    return ConsumerConfig(**base)


def metric(metrics: Metrics, name: str, **labels: str) -> float:
    labels = {"consumer": "c1", "group": "g", **labels}
    return metrics.registry.get_sample_value(name, labels) or 0.0


class RecordingHandler:
    """Records every batch; ``fail`` decides per entry: None = ok, an exception = fail it."""

    def __init__(self, fail: Callable[[Entry], BaseException | None] | None = None,
                 whole_batch_error: BaseException | None = None) -> None:
        self.batches: list[list[Entry]] = []
        self.fail = fail
        self.whole_batch_error = whole_batch_error
        self.gate: defer.Deferred | None = None  # set to hold batches until fired
        self.closed = False

    @property
    def entries(self) -> list[Entry]:
        return [e for b in self.batches for e in b]

    def handle(self, entries: list[Entry]) -> Any:
        self.batches.append(entries)
        if self.whole_batch_error is not None:
            raise self.whole_batch_error
        failures = {}
        if self.fail is not None:
            failures = {e.stream_id: exc for e in entries if (exc := self.fail(e)) is not None}

        def finish(_: Any = None) -> None:
            if failures:
                raise EntriesFailed(failures)

        if self.gate is not None:
            return self.gate.addCallback(finish)
        finish()
        return None

    def close(self) -> None:
        self.closed = True


class RedisFixture:
    """Per-test Redis state: server, pool, blocking-connection factory, metrics."""

    def setup_redis(self) -> None:
        self.server = self.start_redis()  # type: ignore[attr-defined]
        self.target = parse_redis_url(self.server.url)
        self.redis = connect(self.target, poolsize=2, connect_timeout=1.0, reply_timeout=5.0)
        self.addCleanup(self.redis.disconnect)  # type: ignore[attr-defined]
        self.metrics = Metrics()
        self.blocking_opened: list[Any] = []

    def open_blocking(self) -> Any:
        conn = open_read_connection(self.target, block_ms=5000, connect_timeout=1.0)
        self.blocking_opened.append(conn)
        # the service disconnects it on stop; a second disconnect of a txredisapi pool raises
        self.addCleanup(lambda: None if conn._factory.disconnectCalled else conn.disconnect())  # type: ignore
        return conn

    def add(self, n: int, partition: int = 0, prefix: str = "e", start: int = 0) -> list[str]:
        """XADD n well-formed v1 entries; returns their stream ids."""
        ids = []
        for i in range(start, start + n):
            data = json.dumps({"event_id": f"{prefix}{i}", "amount": i}, separators=(",", ":"))
            ids.append(self.server.sync_command(
                "XADD", KEYS.events(partition), "*", "v", "1", "event_id", f"{prefix}{i}", "type", "authorization",
                "received_at", "1700000000000", "data", data,
            ).decode())
        return ids

    def pending(self, partition: int = 0, group: str = "g") -> dict[str, tuple[str, int]]:
        """stream id -> (consumer, deliveries) of the group's pending entries."""
        rows = self.server.sync_command("XPENDING", KEYS.events(partition), group, "-", "+", "100000")
        return {r[0].decode(): (r[1].decode(), int(r[3])) for r in rows}

    def dlq(self, partition: int = 0) -> list[tuple[str, dict[str, str]]]:
        raw = self.server.sync_command("XRANGE", KEYS.dlq(partition), "-", "+")
        return [(i.decode(), {k.decode(): v.decode() for k, v in zip(f[::2], f[1::2])}) for i, f in raw]

    def create_group(self, partitions: int = 1, group: str = "g") -> None:
        for p in range(partitions):
            self.server.sync_command("XGROUP", "CREATE", KEYS.events(p), group, "0", "MKSTREAM")
