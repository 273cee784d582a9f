"""
Retention: the trimmer that keeps the event streams and dead-letter streams bounded.

The append path never trims (docs/stream-format.md, "Retention").  ``TrimService`` runs one
pass every ``retention.interval`` seconds on the injected reactor and, per partition:

1. **Age / length** (``max_age``, ``max_length``): the trim point is the newer of
   ``<now - max_age in ms>-0`` and the id that keeps the newest ``max_length`` entries; it is
   then clamped to the **safe floor**, the smallest of every group's ``last-delivered-id``
   (``XINFO GROUPS``) and every group's oldest pending id (``XPENDING`` summary).  The clamp
   and ``XTRIM <stream> MINID <point>`` (exact, Redis >= 6.2) run in one Lua call, so a group
   can't move the floor between reading it and trimming.  Entries at or after the floor are
   never removed by age or length.  A stream with **no groups** has no floor (+inf): nothing
   consumes it through a group, so age/length trim freely.
2. **Hard cap** (``hard_cap``): if the stream is still longer, the oldest entries are removed
   down to ``hard_cap`` even past the floor, in chunks of ``hard_cap_chunk``, each chunk one
   Lua call that first counts, exactly, the doomed entries some group has not delivered and
   acknowledged (id > that group's last-delivered-id, or in its pending list) and then trims.
   Those are added to ``payflux_stream_lost_unconsumed`` and reported in one warning log line
   per partition and pass (``trim_hard_cap_loss``) with the count and the removed id range.
3. **DLQ**: ``XTRIM <dlq> MINID <now - dlq_max_age>`` and ``XTRIM <dlq> MAXLEN
   <dlq_max_length>`` (0 = no limit).  The DLQ has no consumer groups, so no floor; removed
   dead letters are logged (``trim_dlq``), not counted in ``payflux_stream_trimmed``, which is
   about the event streams.

``payflux_stream_trimmed{partition}`` counts every event-stream entry removed (age, length and
hard cap).  An error in a pass is logged with ``log.failure`` and the loop keeps running.  Time
comes from ``reactor.seconds()`` (interval and age cut-off), so tests drive both with a Clock.
``retention.interval <= 0`` disables the loop (``trim_once`` still works when called).
"""

from __future__ import annotations

from typing import Any, Callable, Generator, Union

from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from payflux.consumers.config import RetentionConfig
from payflux.consumers.inspect import entry_id, format_id, parse_id, text
from payflux.consumers.periodic import PeriodicService
from payflux.observability.metrics import ConsumerMetrics
from payflux.redis.scripts import Script, evalsha
from payflux.streams.keys import StreamKeys
from payflux.streams.outage import log_step_failure

log = Logger()

# a Deferred, or a callable returning one (e.g. a pool's whenConnected), fired when Redis answers
ReadyArg = Union[defer.Deferred, Callable[[], defer.Deferred], None]

# Lua helpers: ids compared as (ms, seq) decimal strings without float rounding.
_LUA_IDS = r"""
local function split(id)
  local d = string.find(id, '-', 1, true)
  if not d then return id, '0' end
  return string.sub(id, 1, d - 1), string.sub(id, d + 1)
end
local function numlt(a, b)
  if #a ~= #b then return #a < #b end
  return a < b
end
local function idlt(a, b)
  local am, as = split(a)
  local bm, bs = split(b)
  if am ~= bm then return numlt(am, bm) end
  return numlt(as, bs)
end
local function groups_of(key)
  local out = {}
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', key)) do
    local t = {}
    for i = 1, #g, 2 do t[g[i]] = g[i + 1] end
    out[#out + 1] = t
  end
  return out
end
"""

SOFT_TRIM_SCRIPT = _LUA_IDS + r"""
-- KEYS[1] = stream; ARGV[1] = trim point (remove ids < it), clamped here to the safe floor.
-- Returns {removed, floor or false (no groups), point actually used}.
local key = KEYS[1]
if redis.call('EXISTS', key) == 0 then return {0, false, false} end
local floor = nil
for _, g in ipairs(groups_of(key)) do
  local ldi = g['last-delivered-id']
  if floor == nil or idlt(ldi, floor) then floor = ldi end
  local p = redis.call('XPENDING', key, g['name'])
  if p[2] and idlt(p[2], floor) then floor = p[2] end
end
local point = ARGV[1]
if floor and idlt(floor, point) then point = floor end
local removed = redis.call('XTRIM', key, 'MINID', point)
return {removed, floor or false, point}
"""

HARD_CAP_SCRIPT = _LUA_IDS + r"""
-- KEYS[1] = stream; ARGV[1] = cap, ARGV[2] = most entries to remove in this call.
-- Counts, exactly, the doomed entries some group has not delivered+acked, then trims them.
-- Returns {removed, lost, first removed id, last removed id, remaining length}.
local key = KEYS[1]
local cap, most = tonumber(ARGV[1]), tonumber(ARGV[2])
local len = redis.call('XLEN', key)
local n = math.min(len - cap, most)
if n <= 0 then return {0, 0, false, false, len} end
local doomed = redis.call('XRANGE', key, '-', '+', 'COUNT', n)
local first, last = doomed[1][1], doomed[#doomed][1]
local min_ldi = nil
local pending = {}
for _, g in ipairs(groups_of(key)) do
  local ldi = g['last-delivered-id']
  if min_ldi == nil or idlt(ldi, min_ldi) then min_ldi = ldi end
  if tonumber(g['pending']) > 0 then
    for _, p in ipairs(redis.call('XPENDING', key, g['name'], first, last, g['pending'])) do
      pending[p[1]] = true
    end
  end
end
local lost = 0
for _, e in ipairs(doomed) do
  if (min_ldi and idlt(min_ldi, e[1])) or pending[e[1]] then lost = lost + 1 end
end
redis.call('XTRIM', key, 'MAXLEN', len - #doomed)
return {#doomed, lost, first, last, len - #doomed}
"""

SOFT_TRIM = Script("soft trim", SOFT_TRIM_SCRIPT)
HARD_CAP = Script("hard cap", HARD_CAP_SCRIPT)


class TrimService(PeriodicService):
    """
    Trims every partition's stream and DLQ once per ``retention.interval`` (see module doc).

    ``redis`` is a txredisapi handler; ``reactor`` provides ``seconds()`` and ``callLater``
    (a Clock in tests); ``ready``, when given, is a Deferred, or a callable returning one (e.g. a
    pool's ``whenConnected``), that the first pass waits for.  ``trim_once()`` never fails: errors are logged.
    """

    hard_cap_chunk = 1000      # entries counted+removed per hard-cap Lua call (bounds script time)
    length_scan_limit = 100_000  # entries read per pass to find the max_length trim point

    def __init__(self, retention: RetentionConfig, redis: Any, keys: StreamKeys, partitions: int,
                 metrics: ConsumerMetrics, reactor: Any, ready: ReadyArg = None) -> None:
        self.retention = retention
        self.redis = redis
        self.keys = keys
        self.partitions = partitions
        self.metrics = metrics
        self.reactor = reactor
        self.ready = ready
        if retention.hard_cap > 0:
            # exposed at 0 from the start, so an alert on its increase sees the first loss
            for p in range(partitions):
                metrics.lost_unconsumed.labels(partition=str(p))

    @property
    def interval(self) -> float:
        return self.retention.interval

    def startService(self) -> None:
        if self.retention.interval <= 0:
            Service.startService(self)
            log.info("retention trimming disabled (interval {interval})", interval=self.retention.interval)
            return
        super().startService()

    def run_pass(self) -> defer.Deferred:
        return self.trim_once()

    @defer.inlineCallbacks
    def trim_once(self) -> Generator:
        """One pass over every partition; fires with None, errors are logged per partition."""
        now = self.reactor.seconds()
        for p in range(self.partitions):
            try:
                yield self._trim_events(p, now)
            except Exception:
                log_step_failure(log, Failure(), "trim pass failed for {stream}", stream=self.keys.events(p))
            try:
                yield self._trim_dlq(p, now)
            except Exception:
                log_step_failure(log, Failure(), "DLQ trim failed for {stream}", stream=self.keys.dlq(p))

    @defer.inlineCallbacks
    def _length_point(self, stream: str, length: int) -> Generator:
        """The id of the first entry to keep so that ``max_length`` remain (None = nothing to do)."""
        excess = length - self.retention.max_length
        if excess <= 0:
            return None
        # Read at most length_scan_limit entries per pass; a huge first backlog shrinks over passes.
        to_skip = min(excess, self.length_scan_limit)
        start, seen = "-", 0
        while True:
            count = min(1000, to_skip - seen + 1)
            entries = yield self.redis.execute_command("XRANGE", stream, start, "+", "COUNT", count)
            if not entries:
                return None
            if seen + len(entries) > to_skip:
                return entry_id(entries[to_skip - seen])
            seen += len(entries)
            if len(entries) < count:
                return None
            start = "(" + entry_id(entries[-1])

    @defer.inlineCallbacks
    def _trim_events(self, p: int, now: float) -> Generator:
        r, stream, label = self.retention, self.keys.events(p), str(p)
        length = int((yield self.redis.execute_command("XLEN", stream)))
        if length == 0:
            return
        points = []
        if r.max_age > 0:
            points.append((max(0, int((now - r.max_age) * 1000)), 0))
        if r.max_length > 0:
            point = yield self._length_point(stream, length)
            if point is not None:
                points.append(parse_id(point))
        if points:
            wanted = format_id(max(points))
            removed, floor, used = yield evalsha(self.redis, SOFT_TRIM, [stream], [wanted])
            removed = int(removed)
            if removed:
                self.metrics.trimmed.labels(partition=label).inc(removed)
                log.info("trimmed {count} entries of {stream} below {point} (wanted {wanted}, floor {floor})",
                         count=removed, stream=stream, point=text(used), wanted=wanted,
                         floor=text(floor) if floor is not None else "none")
            length -= removed
        if r.hard_cap > 0 and length > r.hard_cap:
            yield self._enforce_hard_cap(stream, label)

    @defer.inlineCallbacks
    def _enforce_hard_cap(self, stream: str, label: str) -> Generator:
        total_removed = total_lost = 0
        first_id = last_id = None
        while True:
            removed, lost, first, last, remaining = yield evalsha(
                self.redis, HARD_CAP, [stream], [self.retention.hard_cap, self.hard_cap_chunk])
            removed, lost = int(removed), int(lost)
            if removed == 0:
                break
            total_removed += removed
            total_lost += lost
            first_id = first_id or text(first)
            last_id = text(last)
            self.metrics.trimmed.labels(partition=label).inc(removed)
            if lost:
                self.metrics.lost_unconsumed.labels(partition=label).inc(lost)
            if int(remaining) <= self.retention.hard_cap:
                break
        if total_removed:
            log.warn(
                "hard cap {hard_cap} reached on {stream}: trimmed {removed} entries {first_id}..{last_id}, "
                "{lost} of them not yet delivered and acknowledged by every group (lost unconsumed)",
                event="trim_hard_cap_loss", hard_cap=self.retention.hard_cap, stream=stream,
                removed=total_removed, lost=total_lost, first_id=first_id, last_id=last_id,
            )

    @defer.inlineCallbacks
    def _trim_dlq(self, p: int, now: float) -> Generator:
        r, dlq = self.retention, self.keys.dlq(p)
        removed = 0
        if r.dlq_max_age > 0:
            cutoff = f"{max(0, int((now - r.dlq_max_age) * 1000))}-0"
            removed += int((yield self.redis.execute_command("XTRIM", dlq, "MINID", cutoff)))
        if r.dlq_max_length > 0:
            removed += int((yield self.redis.execute_command("XTRIM", dlq, "MAXLEN", r.dlq_max_length)))
        if removed:
            log.warn("trimmed {count} dead letters from {stream} (dlq_max_age {max_age}s, dlq_max_length {max_length})",
                     event="trim_dlq", count=removed, stream=dlq, max_age=r.dlq_max_age,
                     max_length=r.dlq_max_length)
