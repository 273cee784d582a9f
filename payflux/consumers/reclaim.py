"""
ReclaimService: redeliver entries left pending too long, dead-letter the hopeless ones.

Every ``config.reclaim_interval`` seconds (a LoopingCall on the injected reactor), one pass
over every partition: ``XAUTOCLAIM <events> <group> <this consumer> <min_idle_ms> <cursor>
COUNT <reclaim_count>`` from ``0-0`` until Redis returns the cursor ``0-0``.  For each call:

- Entries whose stream entry was deleted (XDEL or trimming) can never be delivered: they are
  counted in ``deleted_pending`` (lost).  Redis 6.2 returns them as nil in the entry list and
  keeps them pending (now on this consumer), so we find and XACK them; Redis 7.x removes them
  from the pending list itself and lists their ids in a third reply element.
- The delivery count of every claimed entry comes from XPENDING (XAUTOCLAIM has already
  incremented it for this claim).  "After max_deliveries": an entry whose count is now
  ``> max_deliveries`` has been handed out ``max_deliveries`` times already; it is moved to
  ``keys.dlq(p)`` by one Lua call (XADD to the DLQ + XACK of the original, only if it is still
  pending in the group: :func:`payflux.consumers.dlq.move_to_dlq`, where the dead-letter script
  and record live) instead of being delivered again.  So a handler that always fails sees
  an entry exactly ``max_deliveries`` times.  The original entry is never XDELed.
- The other claimed entries go to the handler as one batch (``reclaimed``); completed ones
  are acked, failed ones stay pending for the next pass.

Idle-consumer cleanup (``consumer_idle_cleanup`` seconds, default 3600; 0 = off), in the same
pass but as its own step: every consumer name of the group on the partition (``XINFO
CONSUMERS``) other than this consumer's own that is idle longer than that and owns no pending
entry is deleted (``XGROUP DELCONSUMER``), the "no pending entry" checked again atomically in
Lua.  So a SIGKILLed or replaced process's name goes away once reclaim has taken its entries,
instead of staying in the group forever; a live consumer reads at least every ``block_ms``, so
it never looks idle that long (and would just be recreated by its next read).

``min_idle_ms`` must exceed the longest a handler may take on a batch, or entries still being
handled are redelivered elsewhere (at-least-once allows that; it costs duplicates).
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from payflux.consumers.config import ConsumerConfig
from payflux.consumers.dlq import NO_ERROR, move_to_dlq
from payflux.consumers.handlers import run_handler
from payflux.consumers.inspect import text
from payflux.consumers.service import ack, is_error, remember_errors
from payflux.observability.logsummary import repeated
from payflux.observability.metrics import ConsumerMetrics
from payflux.redis.scripts import Script, evalsha
from payflux.streams.keys import StreamKeys
from payflux.streams.outage import log_step_failure

log = Logger()

# KEYS[1] = events stream; ARGV = group, consumer.  Deletes the consumer only if it owns no
# pending entry (DELCONSUMER would drop them from the group: never redelivered).
DELETE_IDLE_CONSUMER_SCRIPT = r"""
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) > 0 then return -1 end
return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
"""
DELETE_IDLE_CONSUMER = Script("delete idle consumer", DELETE_IDLE_CONSUMER_SCRIPT)


class ReclaimService(Service):
    """See the module docstring; ``reclaim_once()`` is one full pass (what the LoopingCall runs)."""

    def __init__(
        self,
        config: ConsumerConfig,
        handler: Any,
        redis: Any,
        keys: StreamKeys,
        partitions: int,
        metrics: ConsumerMetrics,
        reactor: Any,
        consumer_name: str,
        last_errors: dict,
        ready: Callable[[], defer.Deferred] | None = None,
    ) -> None:
        self.config = config
        self.name = f"reclaim:{config.name}"
        self.handler = handler
        self.redis = redis
        self.keys = keys
        self.partitions = partitions
        self.reactor = reactor
        self.consumer_name = consumer_name
        self.last_errors = last_errors
        self.ready = ready
        labels = dict(consumer=config.name, group=config.group)
        self.metrics = metrics
        self.m_reclaimed = metrics.reclaimed.labels(**labels)
        self.m_deleted = metrics.deleted_pending.labels(**labels)
        self.m_processed = metrics.processed.labels(**labels)
        self.m_failed = metrics.failed.labels(**labels)
        self.m_acked = metrics.acked.labels(**labels)
        self.m_latency = metrics.handler_latency.labels(**labels)
        self.m_batch = metrics.batch_size.labels(**labels)
        self.m_errors = metrics.read_errors.labels(**labels)
        self._loop: task.LoopingCall | None = None
        self._done: defer.Deferred | None = None
        self._pass: defer.Deferred | None = None

    def startService(self) -> None:
        super().startService()
        self._loop = task.LoopingCall(self._tick)
        self._loop.clock = self.reactor
        d = self.ready() if self.ready is not None else defer.succeed(None)

        def start(_: Any) -> None:
            if self.running and self._loop is not None:
                self._done = self._loop.start(self.config.reclaim_interval, now=False)

        d.addCallback(start)
        d.addErrback(lambda f: log.failure("reclaim {consumer}: not started", f, consumer=self.config.name))

    def stopService(self) -> defer.Deferred:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        # let a running pass finish its current step; its handler batch is bounded by the caller's grace
        return self._pass if self._pass is not None and not self._pass.called else defer.succeed(None)

    def _tick(self) -> defer.Deferred:
        # errors never end the LoopingCall: they are logged and the next tick tries again
        d = self.reclaim_once()
        d.addErrback(self._step_failed, "reclaim pass")
        return d

    def _step_failed(self, failure: Failure, what: str) -> None:
        self.m_errors.inc()
        log_step_failure(log, failure, "reclaim {consumer}: {what} failed", consumer=self.config.name, what=what)

    def reclaim_once(self) -> defer.Deferred:
        """One pass over every partition; fires with a dict of counts (reclaimed, dead_lettered, deleted)."""
        d = defer.ensureDeferred(self._reclaim_once())
        self._pass = d
        return d

    async def _reclaim_once(self) -> dict[str, int]:
        totals = {"reclaimed": 0, "dead_lettered": 0, "deleted": 0, "calls": 0, "consumers_removed": 0}
        cleanup_ms = self.config.idle_cleanup_ms()
        for p in range(self.partitions):
            steps = [(f"partition {p}", self._partition(p, totals))]
            if cleanup_ms > 0:
                # its own step: a failed reclaim never skips the cleanup, nor the other way round
                steps.append((f"idle consumer cleanup of partition {p}",
                              self._cleanup_idle_consumers(p, cleanup_ms, totals)))
            for what, step in steps:
                try:
                    await step
                except Exception:
                    failure = Failure()
                    if is_error(failure, "NOGROUP") or is_error(failure, "ERR no such key"):
                        # no group (or no stream yet, before the reader's XGROUP CREATE MKSTREAM):
                        # the reader creates it; nothing can be pending in it
                        continue
                    self._step_failed(failure, what)
        return totals

    async def _partition(self, p: int, totals: dict[str, int]) -> None:
        key = self.keys.events(p)
        group = self.config.group
        cursor = "0-0"
        while True:
            reply = await self.redis.execute_command(
                "XAUTOCLAIM", key, group, self.consumer_name, str(self.config.min_idle_ms), cursor,
                "COUNT", str(self.config.reclaim_count),
            )
            totals["calls"] += 1
            next_cursor, entries = reply[0], reply[1] or []
            claimed = [e for e in entries if e is not None and e[1] is not None]
            lost = len(reply[2]) if len(reply) > 2 and reply[2] else 0  # 7.x: already out of the PEL
            if len(claimed) < len(entries):
                # 6.2: deleted entries come back as nil (without id) and are now pending on us
                lost += await self._ack_deleted_62(key, cursor, next_cursor, {e[0] for e in claimed}, entries)
            if lost:
                self.m_deleted.inc(lost)
                totals["deleted"] += lost
                log.warn("reclaim {consumer}: {count} pending entries of {stream} were deleted before being "
                         "handled (lost)", consumer=self.config.name, count=lost, stream=key)
            if claimed:
                await self._handle_claimed(p, key, claimed, totals)
            if next_cursor == "0-0":
                return
            cursor = next_cursor

    async def _ack_deleted_62(self, key: str, start: str, end: str, claimed: set[str], entries: list) -> int:
        stop = "+" if end == "0-0" else "(" + end
        rows = await self.redis.execute_command(
            "XPENDING", key, self.config.group, start, stop, str(len(entries) + 10_000), self.consumer_name
        )
        gone = []
        for row in rows:
            if row[0] not in claimed and not await self.redis.execute_command("XRANGE", key, row[0], row[0]):
                gone.append(row[0])
        if gone:
            await ack(self.redis, self.keys, self.config.group, {self._partition_of(key): gone})
        return len(gone)

    def _partition_of(self, key: str) -> int:
        return next(p for p in range(self.partitions) if self.keys.events(p) == key)

    async def _deliveries(self, key: str, claimed: list) -> dict[str, int]:
        """XPENDING delivery counts of ``claimed`` (one range call, per-id calls for any it missed)."""
        first, last = claimed[0][0], claimed[-1][0]
        rows = await self.redis.execute_command(
            "XPENDING", key, self.config.group, first, last, str(len(claimed) + 1000), self.consumer_name
        )
        counts = {row[0]: int(row[3]) for row in rows}
        for stream_id, _ in claimed:
            if stream_id not in counts:
                one = await self.redis.execute_command("XPENDING", key, self.config.group, stream_id, stream_id, "1")
                if one:
                    counts[stream_id] = int(one[0][3])
        return counts

    async def _handle_claimed(self, p: int, key: str, claimed: list, totals: dict[str, int]) -> None:
        counts = await self._deliveries(key, claimed)
        deliver = []
        for stream_id, fields in claimed:
            n = counts.get(stream_id)
            if n is None:
                continue  # acked by someone since the claim: nothing to do
            if n > self.config.max_deliveries:
                if await self.dead_letter(p, stream_id):
                    totals["dead_lettered"] += 1
            else:
                deliver.append((stream_id, p, fields, n))
        if not deliver:
            return
        self.m_reclaimed.inc(len(deliver))
        totals["reclaimed"] += len(deliver)
        self.m_batch.observe(len(deliver))
        outcome = await run_handler(self.handler, deliver)
        if outcome.seconds:
            self.m_latency.observe(outcome.seconds)
        if outcome.failed:
            self.m_failed.inc(len(outcome.failed))
            remember_errors(self.last_errors, outcome.failed)
        if outcome.done:
            self.m_processed.inc(len(outcome.done))
            done = [i for _, i in outcome.done]
            self.m_acked.inc(await ack(self.redis, self.keys, self.config.group, {p: done}))

    async def dead_letter(self, p: int, stream_id: str) -> bool:
        """Move ``stream_id`` of partition ``p`` to the DLQ (:func:`payflux.consumers.dlq.move_to_dlq`,
        one Lua call) with its last handler error, counted and logged; False if it wasn't pending."""
        error_class, message = self.last_errors.get((p, stream_id), NO_ERROR)
        result = await move_to_dlq(self.redis, self.keys, p, stream_id, self.config.group, self.consumer_name,
                                   error_class, message)
        if result == 1:
            self.last_errors.pop((p, stream_id), None)
            self.metrics.dead_lettered.labels(
                consumer=self.config.name, group=self.config.group, error_class=error_class
            ).inc()
            # a flood of dead letters is one line per log_summary_interval per consumer, with counts
            repeated(f"dead letter {self.config.name}", log).warn(
                "reclaim {consumer}: {stream_id} dead-lettered after {max} deliveries ({error_class})",
                consumer=self.config.name, stream_id=stream_id, max=self.config.max_deliveries,
                error_class=error_class)
        elif result == -1:
            self.m_deleted.inc()
        return result == 1

    async def _cleanup_idle_consumers(self, p: int, idle_ms: int, totals: dict[str, int]) -> None:
        """Delete the group's other consumer names on partition ``p`` idle over ``idle_ms`` with nothing pending."""
        key = self.keys.events(p)
        rows = await self.redis.execute_command("XINFO", "CONSUMERS", key, self.config.group)
        for row in rows or ():
            info = {text(k): v for k, v in zip(row[::2], row[1::2])}
            name = text(info.get("name"))
            if name == self.consumer_name or int(info.get("pending", 1)) > 0:
                continue
            # "idle": ms since the consumer's last (attempted) read or claim; 7.2+ also has
            # "inactive" (last successful one), which a live consumer on a quiet stream grows
            if int(info.get("idle", 0)) <= idle_ms:
                continue
            deleted = await evalsha(self.redis, DELETE_IDLE_CONSUMER, [key], [self.config.group, name])
            if int(deleted) == 0:
                totals["consumers_removed"] += 1
                log.info("reclaim {consumer}: removed idle consumer {name} from {stream}",
                         consumer=self.config.name, name=name, stream=key)
