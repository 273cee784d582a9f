"""
ConsumerService: one consumer of one consumer group over every partition's event stream.

Contract (docs/stream-format.md, "Consumer groups"):

- At-least-once.  Entries are read with XREADGROUP, never in its no-ack form (every entry read
  stays pending until acked), on a dedicated blocking connection: first this consumer's own
  pending entries (id ``0``, then the last id read, per partition until that partition returns
  none), then new entries (``>``).
- One XREADGROUP names every partition's stream.  On a Redis Cluster (``per_partition_reads``)
  the partitions' streams live in different slots, which one command can't span: each partition
  is then read by its own XREADGROUP on its own connection, all outstanding at once, and
  whichever answer first are handed over together (nothing read is ever dropped: replies that
  arrive while the handler is busy wait for the next free slot).
- At most ``config.concurrency`` batches are with the handler at once; the next read is only
  sent when a slot is free.
- An entry is acknowledged (XACK, batched per partition) only after the handler completed it.
  Failed entries stay pending; their last error (class, message) is remembered in
  ``last_errors`` for the dead-letter record, and the reclaim loop redelivers them.
- NOGROUP: the group is (re)created on every partition (``XGROUP CREATE ... MKSTREAM`` at
  ``config.start_id``, BUSYGROUP tolerated), logged and counted in ``group_recreated``.
- Any failed step is logged, counted in ``read_errors`` and retried after an exponential
  backoff (``reactor.callLater``, capped at ``MAX_BACKOFF``); nothing ends the loop but
  ``stopService``.
- ``startService`` calls the handler's optional ``start()`` (its threads, if any, start in the
  running process, never before ``twistd`` daemonizes), then starts reading.
- ``stopService``: stop reading (the blocking connection is closed, within CLOSE_LIMIT even if
  Redis doesn't answer), wait up to ``grace`` seconds for batches with the handler, ack what
  finished, leave the rest pending, close the handler (waiting at most HANDLER_CLOSE_LIMIT for
  its ``close()``).  ``stop_within(seconds)`` is the same within an overall budget (the node's
  bounded stop): the grace shrinks to fit, ``close()`` gets what is left (at least CLOSE_LIMIT),
  so the stop ends within ``seconds`` whatever the handler and Redis do.
"""

from __future__ import annotations

import os
import socket
from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from payflux.consumers.config import ConsumerConfig
from payflux.consumers.handlers import BatchOutcome, close_handler, run_handler, start_handler
from payflux.deadlines import settled_within
from payflux.observability.metrics import ConsumerMetrics
from payflux.redis.connect import connect
from payflux.redis.txadapter import close_pool, decoding_protocol
from payflux.streams.keys import StreamKeys
from payflux.streams.outage import log_step_failure

log = Logger()

FIRST_BACKOFF = 0.1
MAX_BACKOFF = 30.0
LAST_ERRORS_LIMIT = 100_000  # stream ids whose last error we remember (oldest forgotten first)
CLOSE_LIMIT = 0.5  # seconds a stop waits for the read connections to close (and, at least, for the handler's close())
HANDLER_CLOSE_LIMIT = 10.0  # seconds a stop without a budget waits for the handler's close()


def default_consumer_name() -> str:
    """``<hostname>-<pid>``: stable for the life of a process, distinct between processes."""
    return f"{socket.gethostname()}-{os.getpid()}"


def backoff(failures: int) -> float:
    """Delay before retry number ``failures`` (1, 2, ...): 0.1 s doubling up to MAX_BACKOFF."""
    return min(MAX_BACKOFF, FIRST_BACKOFF * 2 ** max(0, failures - 1))


def remember_errors(last_errors: dict, failed: dict[tuple[int, str], BaseException]) -> None:
    """Record ``(error_class, message)`` per failed (partition, stream id), bounded to LAST_ERRORS_LIMIT."""
    for where, exc in failed.items():
        last_errors.pop(where, None)
        last_errors[where] = (type(exc).__name__, str(exc)[:1000])
    while len(last_errors) > LAST_ERRORS_LIMIT:
        del last_errors[next(iter(last_errors))]


def is_error(failure: Failure, code: str) -> bool:
    """True if ``failure`` is a Redis error reply starting with ``code`` (e.g. NOGROUP)."""
    return failure.getErrorMessage().startswith(code) and type(failure.value).__name__ == "ResponseError"


def _first_error(failure: Failure) -> Failure:
    """gatherResults wraps the first failure in FirstError; callers want the Redis error itself."""
    if failure.check(defer.FirstError):
        return failure.value.subFailure
    return failure


def ack(redis: Any, keys: StreamKeys, group: str, ids_by_partition: dict[int, list[str]]) -> defer.Deferred:
    """XACK per partition, all sent at once; fires with the number Redis says it acknowledged."""
    calls = [redis.execute_command("XACK", keys.events(p), group, *ids) for p, ids in ids_by_partition.items() if ids]
    if not calls:
        return defer.succeed(0)
    d = defer.gatherResults(calls, consumeErrors=True)
    d.addCallbacks(lambda counts: sum(int(c) for c in counts), _first_error)
    return d


def create_group(redis: Any, keys: StreamKeys, partitions: int, group: str, start_id: str) -> defer.Deferred:
    """XGROUP CREATE <events> group start_id MKSTREAM on every partition; BUSYGROUP counts as done."""

    def tolerate_busy(failure: Failure) -> None:
        if not is_error(failure, "BUSYGROUP"):
            return failure  # type: ignore[return-value]
        return None

    calls = [
        redis.execute_command("XGROUP", "CREATE", keys.events(p), group, start_id, "MKSTREAM").addErrback(tolerate_busy)
        for p in range(partitions)
    ]
    return defer.gatherResults(calls, consumeErrors=True).addErrback(_first_error)


def open_read_connection(target: Any, block_ms: int, connect_timeout: float = 5.0) -> Any:
    """
    The dedicated connection for XREADGROUP BLOCK: one reconnecting txredisapi connection whose
    reply timeout (BLOCK + 5 s) exceeds BLOCK.  With hiredis, replies are decoded to str by
    hiredis itself instead of txredisapi's per-element Python walk (about 2x the read rate).
    """
    return connect(target, 1, connect_timeout, reply_timeout=block_ms / 1000 + 5, protocol=_DecodingProtocol)


_DecodingProtocol = decoding_protocol()


class ConsumerService(Service):
    """See the module docstring; ``name`` of the twisted Service is the consumer config's name."""

    def __init__(
        self,
        config: ConsumerConfig,
        handler: Any,
        redis: Any,
        open_blocking: Callable[[], Any],
        keys: StreamKeys,
        partitions: int,
        metrics: ConsumerMetrics,
        reactor: Any,
        ready: Callable[[], defer.Deferred] | None = None,
        grace: float = 10.0,
        last_errors: dict | None = None,
        per_partition_reads: bool = False,
    ) -> None:
        if partitions < 1:
            raise ValueError("partitions must be >= 1")
        self.config = config
        self.name = f"consumer:{config.name}"
        self.handler = handler
        self.redis = redis
        self.open_blocking = open_blocking
        self.keys = keys
        self.partitions = partitions
        self.reactor = reactor
        self.ready = ready
        self.grace = grace
        self.consumer_name = config.consumer_name or default_consumer_name()
        self.last_errors: dict = {} if last_errors is None else last_errors
        labels = dict(consumer=config.name, group=config.group)
        self.m_processed = metrics.processed.labels(**labels)
        self.m_failed = metrics.failed.labels(**labels)
        self.m_acked = metrics.acked.labels(**labels)
        self.m_latency = metrics.handler_latency.labels(**labels)
        self.m_batch = metrics.batch_size.labels(**labels)
        self.m_recreated = metrics.group_recreated.labels(**labels)
        self.m_errors = metrics.read_errors.labels(**labels)
        self._streams = [keys.events(p) for p in range(partitions)]
        self._partition_of = {k: p for p, k in enumerate(self._streams)}
        # streams read together by one XREADGROUP (each group on its own connection)
        self._read_groups = [[k] for k in self._streams] if per_partition_reads else [self._streams]
        self._blocking: list[Any] | None = None
        self._outstanding: dict[int, defer.Deferred] = {}
        self._replies: list[Any] = []  # read replies (or failures) not yet returned by _read
        self._wake: defer.Deferred | None = None
        self._loop: defer.Deferred | None = None
        self._sleep: defer.Deferred | None = None
        self._slot_waiter: defer.Deferred | None = None
        self._in_flight: set[defer.Deferred] = set()
        self._stopping = False
        self._acks_allowed = True

    # -- lifecycle -----------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        # the handler's threads (if any) start now, in the process that runs (after a fork)
        start_handler(self.handler)
        self._stopping = False
        self._acks_allowed = True
        self._loop = defer.ensureDeferred(self._run())
        self._loop.addErrback(lambda f: log.failure("consumer {consumer} loop ended", f, consumer=self.config.name))

    def stopService(self) -> defer.Deferred:
        return self.stop_within(None)

    def stop_within(self, seconds: float | None) -> defer.Deferred:
        """``stopService``, ending within ``seconds`` (None: grace + the close limits)."""
        super().stopService()
        self._stopping = True
        for d in (self._sleep, self._slot_waiter, self._wake):
            if d is not None and not d.called:
                d.cancel()
        blocking, self._blocking = self._blocking, None
        grace, deadline = self.grace, None
        if seconds is not None:
            # room for closing the read connections (in parallel) and the handler, and the last acks
            grace = max(min(grace, seconds - 2 * CLOSE_LIMIT - 0.25), 0.0)
            deadline = self.reactor.seconds() + seconds
        return defer.ensureDeferred(self._drain(blocking or [], grace, deadline))

    async def _drain(self, blocking: list[Any], grace: float, deadline: float | None) -> None:
        if blocking:
            await defer.DeferredList([close_pool(c, CLOSE_LIMIT, self.reactor, what=f"consumer {self.config.name}'s "
                                                 "read connection") for c in blocking])
        pending = list(self._in_flight)
        if pending:
            log.info("consumer {consumer} stopping: waiting up to {grace:.1f}s for {count} batches",
                     consumer=self.config.name, grace=grace, count=len(pending))
            # wait without cancelling: a handler past the grace period keeps running, unacked
            if not await settled_within(defer.DeferredList(pending, consumeErrors=True), grace, self.reactor):
                log.warn("consumer {consumer}: {count} batches still with the handler after {grace:.1f}s; "
                         "left pending for reclaim", consumer=self.config.name, count=len(self._in_flight),
                         grace=grace)
        self._acks_allowed = False
        limit = HANDLER_CLOSE_LIMIT if deadline is None else max(deadline - self.reactor.seconds() - 0.1, CLOSE_LIMIT)
        if not await settled_within(close_handler(self.handler), limit, self.reactor):
            log.warn("consumer {consumer}: the handler's close() did not finish within {limit:.1f}s; "
                     "abandoned it and carried on with the stop", consumer=self.config.name, limit=limit)

    # -- the read loop -------------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            await self._read_loop()
        except defer.CancelledError:
            pass  # stopService cancelled a backoff sleep or a wait for a free slot

    async def _read_loop(self) -> None:
        if self.ready is not None:
            await self.ready()
        # per partition: the id to read after; "0".. while replaying own pending entries, then ">"
        cursors = {k: "0" for k in self._streams}
        failures = 0
        while not self._stopping:
            try:
                await self._free_slot()
                if self._stopping:
                    break
                if self._blocking is None:
                    self._blocking = [self.open_blocking() for _ in self._read_groups]
                reply = await self._read(cursors)
                failures = 0
            except Exception:
                if self._stopping or isinstance(Failure().value, defer.CancelledError):
                    break
                failure = Failure()
                failures += 1
                if is_error(failure, "NOGROUP"):
                    await self._sleep_for(backoff(failures) if failures > 1 else 0)
                    await self._recreate_group()
                    cursors.update({k: "0" for k in self._streams})  # in place: reads in flight share it
                else:
                    self.m_errors.inc()
                    log_step_failure(log, failure, "consumer {consumer}: read failed, retrying in {delay}s",
                                     consumer=self.config.name, delay=backoff(failures))
                    await self._sleep_for(backoff(failures))
                continue
            if self._stopping:
                break  # entries read during shutdown stay pending: reclaimed later
            if reply:
                self._dispatch(reply, cursors)

    async def _read(self, cursors: dict[str, str]) -> list:
        """
        The next entries read: one read per read group outstanding at a time; returns what the
        groups that answered first read (merged), raises the first failure among them (their
        entries are kept for the next call).
        """
        if not self._replies:
            for i, streams in enumerate(self._read_groups):
                if i not in self._outstanding:
                    d = defer.ensureDeferred(self._read_group(self._blocking[i], streams, cursors))
                    self._outstanding[i] = d
                    d.addBoth(self._read_done, i)
        while not self._replies:
            self._wake = defer.Deferred()
            try:
                await self._wake
            finally:
                self._wake = None
        finished, self._replies = self._replies, []
        merged = [item for r in finished if not isinstance(r, Failure) and r for item in r]
        failures = [f for f in finished if isinstance(f, Failure)]
        if failures:
            if merged:
                self._replies.append(merged)
            failures[0].raiseException()
        return merged

    def _read_done(self, result: Any, i: int) -> None:
        self._outstanding.pop(i, None)
        self._replies.append(result)
        wake = self._wake
        if wake is not None and not wake.called:
            wake.callback(None)

    async def _read_group(self, connection: Any, streams: list[str], cursors: dict[str, str]) -> Any:
        replaying = [k for k in streams if cursors[k] != ">"]
        if replaying:
            # own pending entries first; XREADGROUP ignores BLOCK for non-">" ids anyway
            streams, ids = replaying, [cursors[k] for k in replaying]
            block: tuple[str, ...] = ()
        else:
            ids = [">"] * len(streams)
            block = ("BLOCK", str(self.config.block_ms))
        reply = await connection.execute_command(
            "XREADGROUP", "GROUP", self.config.group, self.consumer_name,
            "COUNT", str(self.config.batch_size), *block, "STREAMS", *streams, *ids,
        )
        if replaying:
            got = {key: entries for key, entries in (reply or [])}
            for key in replaying:
                entries = got.get(key)
                cursors[key] = entries[-1][0] if entries else ">"
            if reply:
                reply = await self._with_deliveries(reply)
        return reply

    async def _with_deliveries(self, reply: list) -> list:
        """Attach XPENDING delivery counts to replayed own-pending entries (never counted in memory)."""
        out = []
        for key, entries in reply:
            if not entries:
                continue
            pending = await self.redis.execute_command(
                "XPENDING", key, self.config.group, entries[0][0], entries[-1][0], str(len(entries) + 100),
                self.consumer_name,
            )
            counts = {row[0]: int(row[3]) for row in pending}
            out.append((key, [(i, f, counts.get(i, 1)) for i, f in entries]))
        return out

    async def _free_slot(self) -> None:
        while len(self._in_flight) >= self.config.concurrency and not self._stopping:
            self._slot_waiter = defer.Deferred()
            await self._slot_waiter

    def _release_slot(self) -> None:
        waiter, self._slot_waiter = self._slot_waiter, None
        if waiter is not None and not waiter.called:
            waiter.callback(None)

    async def _sleep_for(self, seconds: float) -> None:
        if seconds <= 0:
            return
        self._sleep = defer.Deferred()
        call = self.reactor.callLater(seconds, self._sleep.callback, None)
        try:
            await self._sleep
        finally:
            if call.active():
                call.cancel()
            self._sleep = None

    async def _recreate_group(self) -> None:
        try:
            await create_group(self.redis, self.keys, self.partitions, self.config.group, self.config.start_id)
        except Exception:
            self.m_errors.inc()
            log.failure("consumer {consumer}: could not create group {group}", Failure(),
                        consumer=self.config.name, group=self.config.group)
            return
        self.m_recreated.inc()
        log.warn("consumer {consumer}: group {group} was missing; created on {partitions} partition(s) at {start_id}",
                 consumer=self.config.name, group=self.config.group, partitions=self.partitions,
                 start_id=self.config.start_id)

    # -- batches -------------------------------------------------------------------------------

    def _dispatch(self, reply: list, cursors: dict[str, str]) -> None:
        raw = []
        for item in reply:
            key, entries = item[0], item[1]
            p = self._partition_of[key]
            for e in entries:
                raw.append((e[0], p, e[1], e[2] if len(e) > 2 else 1))
        if not raw:
            return
        self.m_batch.observe(len(raw))
        d = run_handler(self.handler, raw)
        d.addCallback(self._settle)
        d.addErrback(lambda f: log.failure("consumer {consumer}: batch bookkeeping failed", f,
                                           consumer=self.config.name))
        # Still in flight while the handler runs *or* while its XACK is on the wire: a handler
        # that finished synchronously leaves ``d`` called but paused on the ack, and stopService
        # must wait for that ack too (else closing the pool kills it: a needless redelivery).
        if not d.called or d.paused:
            self._in_flight.add(d)
            d.addBoth(self._finished, d)

    def _finished(self, result: Any, d: defer.Deferred) -> Any:
        self._in_flight.discard(d)
        self._release_slot()
        return result

    def _settle(self, outcome: BatchOutcome) -> defer.Deferred | None:
        if outcome.seconds:
            self.m_latency.observe(outcome.seconds)
        if outcome.failed:
            self.m_failed.inc(len(outcome.failed))
            remember_errors(self.last_errors, outcome.failed)
        if not outcome.done:
            return None
        self.m_processed.inc(len(outcome.done))
        if not self._acks_allowed:
            return None  # finished after the grace period: stays pending
        by_partition: dict[int, list[str]] = {}
        for p, i in outcome.done:
            by_partition.setdefault(p, []).append(i)
        d = ack(self.redis, self.keys, self.config.group, by_partition)
        d.addCallback(self.m_acked.inc)
        d.addErrback(self._ack_failed, len(outcome.done))
        return d

    def _ack_failed(self, failure: Failure, count: int) -> None:
        # the entries stay pending and are redelivered by reclaim: a duplicate, never a loss
        self.m_errors.inc()
        log_step_failure(log, failure, "consumer {consumer}: XACK of {count} entries failed",
                         consumer=self.config.name, count=count)
