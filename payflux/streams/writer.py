"""
The append path: idempotent, ordered appends of payment events to Redis Streams.

One Lua call per partition checks every event's dedupe record and, only if no
event conflicts, appends the new ones and records them (docs/stream-format.md
is the contract).  With one partition a whole ``append`` is atomic: all new
events are written, or none.

Partial writes inside a script: the script performs every check (dedupe
records, in-call duplicates, stream length cap) before its first write, and
its first write is the first XADD.  Scripts here carry no ``#!lua`` flags, so
Redis 6.2 and 7.x both apply the legacy rule: when ``used_memory`` exceeded
``maxmemory`` as the script started (with ``noeviction``), the *first*
write command fails with ``OOM`` (the script aborts with nothing written);
once a script has written, later writes in it are never rejected for memory.
Other mid-script failures (WRONGTYPE on the stream key) also hit the first
XADD.  So a batch is either fully written or not at all; ``test_writer``
checks this against real servers filled to ``maxmemory``.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import attrs
import txredisapi
from twisted.internet import defer, error as terror
from twisted.logger import Logger
from twisted.python.failure import Failure

from payflux.streams.keys import StreamKeys, partition_for

log = Logger()

FORMAT_VERSION = "1"

APPEND_SCRIPT = r"""
-- PayFlux append v1. KEYS[1] = stream, KEYS[1+i] = dedupe key of event i.
-- ARGV[1] = received_at (ms), ARGV[2] = dedupe window (ms),
-- ARGV[3] = max stream length (0 = no cap),
-- ARGV[4+4(i-1) .. 7+4(i-1)] = event_id, fingerprint, type, canonical JSON.
-- Every check happens before the first write (see writer.py docstring).
local n = #KEYS - 1
local stream = KEYS[1]
local recorded = {}   -- i -> stream id of an earlier append with the same payload
local first_fp = {}   -- event_id -> fingerprint of its first occurrence in this call
local conflicts = {}
local new_count = 0
for i = 1, n do
  local b = 4 * (i - 1) + 3
  local eid, fp = ARGV[b + 1], ARGV[b + 2]
  local rec = redis.call('GET', KEYS[1 + i])
  if rec then
    local sp = string.find(rec, ' ', 1, true)
    if not sp then
      return redis.error_reply('PAYFLUXCORRUPT malformed dedupe record at ' .. KEYS[1 + i])
    end
    if string.sub(rec, 1, sp - 1) ~= fp then
      conflicts[#conflicts + 1] = i
    else
      recorded[i] = string.sub(rec, sp + 1)
    end
  else
    local f = first_fp[eid]
    if f == nil then
      first_fp[eid] = fp
      new_count = new_count + 1
    elseif f ~= fp then
      conflicts[#conflicts + 1] = i
    end
  end
end
if #conflicts > 0 then
  local r = {'conflict'}
  for _, i in ipairs(conflicts) do r[#r + 1] = i end
  return r
end
local cap = tonumber(ARGV[3])
if cap > 0 and new_count > 0 then
  local len = redis.call('XLEN', stream)
  if len + new_count > cap then
    return {'full', len}
  end
end
local out = {'ok'}
local added = {}      -- event_id -> stream id appended in this call
for i = 1, n do
  local b = 4 * (i - 1) + 3
  local eid = ARGV[b + 1]
  local id = recorded[i] or added[eid]
  if id then
    out[#out + 1] = id
    out[#out + 1] = 1
  else
    id = redis.call('XADD', stream, '*', 'v', '1', 'event_id', eid, 'type', ARGV[b + 3],
                    'received_at', ARGV[1], 'data', ARGV[b + 4])
    redis.call('SET', KEYS[1 + i], ARGV[b + 2] .. ' ' .. id, 'PX', ARGV[2])
    added[eid] = id
    out[#out + 1] = id
    out[#out + 1] = 0
  end
end
return out
"""

APPEND_SCRIPT_SHA = hashlib.sha1(APPEND_SCRIPT.encode("utf-8")).hexdigest()

# Error replies that mean "Redis can't take writes right now" rather than a bug.
_UNAVAILABLE_CODES = re.compile(
    r"(?:^|[\s:\-])(OOM|READONLY|MISCONF|LOADING|BUSY|MASTERDOWN|NOREPLICAS|TRYAGAIN|CLUSTERDOWN)\b"
)


@attrs.frozen
class PreparedEvent:
    """A validated event, ready to append (built by the HTTP layer)."""

    event_id: str
    merchant_id_hash: str
    event_type: str
    canonical: bytes  # canonical JSON of the event
    fingerprint: str  # hex sha256 of canonical


@attrs.frozen
class AppendResult:
    """Where an event lives; ``duplicate`` if it was appended by an earlier call."""

    stream_id: str
    duplicate: bool


class IdempotencyConflict(Exception):
    """Some event_ids were already used with a different payload (HTTP 409)."""

    def __init__(self, event_ids: list[str]) -> None:
        self.event_ids = list(event_ids)
        super().__init__(f"event_id already used with a different payload: {', '.join(self.event_ids)}")


class RedisUnavailable(Exception):
    """Redis could not take the append in time or refused it (HTTP 503); str() says why."""


class _Abandoned:
    """Set once the caller has given up, so late connections don't send stale appends."""

    abandoned = False


def _unavailable_reason(failure: Failure) -> str | None:
    """Why ``failure`` means Redis is unavailable, or None if it's something else."""
    if failure.check(txredisapi.ConnectionError, terror.ConnectError, terror.ConnectionLost, terror.ConnectionDone):
        return f"connection to redis failed: {failure.getErrorMessage()}"
    if failure.check(txredisapi.ResponseError):
        message = failure.getErrorMessage()
        if _UNAVAILABLE_CODES.search(message):
            return f"redis refused the append: {message}"
    return None


class StreamWriter:
    """
    Appends prepared events; see ``append`` for the contract.

    ``redis`` is a txredisapi handler (``payflux.streams.connection.connect``),
    an object delegating attribute access to one (``_factory`` is used to take
    a pooled connection first, so nothing is sent after a caller gave up), or
    a single connected txredisapi protocol.  ``timeout`` bounds every
    ``append`` as a whole: waiting for a pooled connection, EVALSHA and a
    NOSCRIPT reload.  ``max_stream_length`` (None = no cap) makes an append
    that would grow a stream past it fail with RedisUnavailable, writing
    nothing: a guard for when trimming falls behind; the append path never trims.
    """

    def __init__(
        self,
        redis: Any,
        keys: StreamKeys,
        partitions: int,
        dedupe_window_seconds: int,
        timeout: float,
        reactor: Any,
        max_stream_length: int | None = None,
    ) -> None:
        if partitions < 1:
            raise ValueError("partitions must be >= 1")
        if dedupe_window_seconds < 1:
            raise ValueError("dedupe_window_seconds must be >= 1")
        if timeout <= 0:
            raise ValueError("timeout must be > 0")
        if max_stream_length is not None and max_stream_length < 1:
            raise ValueError("max_stream_length must be >= 1 or None")
        self.redis = redis
        self.keys = keys
        self.partitions = partitions
        self.dedupe_window_ms = int(dedupe_window_seconds * 1000)
        self.timeout = timeout
        self.reactor = reactor
        self.max_stream_length = max_stream_length

    def append(self, events: list[PreparedEvent], received_at_ms: int) -> defer.Deferred:
        """
        Append ``events``; fires with one AppendResult per event, in input order.

        Events are grouped by ``partition_for(merchant_id_hash)``, one EVALSHA
        per partition; within a partition the call is atomic.  A duplicate
        (same event_id and fingerprint within the window, or earlier in this
        call) gets the original stream id and ``duplicate=True`` and appends
        nothing.  Errbacks with IdempotencyConflict (listing every conflicting
        event_id; nothing written in that partition) or RedisUnavailable
        (timeout after ``timeout`` seconds, lost connection, OOM/READONLY/...).
        With several partitions, partitions without a conflict or error are
        still written.
        """
        if not events:
            return defer.succeed([])
        groups: dict[int, list[int]] = {}
        for index, event in enumerate(events):
            groups.setdefault(partition_for(event.merchant_id_hash, self.partitions), []).append(index)

        state = _Abandoned()

        def abandon(_: defer.Deferred) -> None:
            state.abandoned = True

        outer: defer.Deferred = defer.Deferred(abandon)
        work = defer.DeferredList(
            [self._append_partition(p, [events[i] for i in idxs], received_at_ms, state) for p, idxs in groups.items()],
            consumeErrors=True,
        )
        work.addCallback(self._combine, groups, len(events))

        def finish(result: Any) -> None:
            # txredisapi's pool Deferreds can't be cancelled safely, so the
            # timeout cancels only ``outer``; late results are dropped here.
            if outer.called:
                if isinstance(result, Failure):
                    log.debug("append finished after its caller gave up: {f}", f=result.getErrorMessage())
                return None
            if isinstance(result, Failure):
                outer.errback(result)
            else:
                outer.callback(result)
            return None

        work.addBoth(finish)

        def on_timeout(result: Any, timeout: float) -> Any:
            # addTimeout hands us the CancelledError its cancel() produced
            if isinstance(result, Failure) and result.check(defer.CancelledError):
                raise RedisUnavailable(f"no reply from redis within {timeout:g}s")
            return result

        outer.addTimeout(self.timeout, self.reactor, onTimeoutCancel=on_timeout)
        outer.addErrback(self._log_unavailable, len(events))
        return outer

    def _log_unavailable(self, failure: Failure, count: int) -> Failure:
        if failure.check(RedisUnavailable):
            log.warn("redis unavailable, {count} events not appended: {reason}", count=count, reason=str(failure.value))
        return failure

    def _combine(self, outcomes: list[tuple[bool, Any]], groups: dict[int, list[int]], total: int) -> list[AppendResult]:
        results: list[AppendResult | None] = [None] * total
        conflicts: list[str] = []
        first_error: Failure | None = None
        for (ok, value), idxs in zip(outcomes, groups.values()):
            if ok:
                for i, r in zip(idxs, value):
                    results[i] = r
            elif value.check(IdempotencyConflict):
                conflicts.extend(value.value.event_ids)
            elif first_error is None:
                first_error = value
        if first_error is not None:
            first_error.raiseException()
        if conflicts:
            raise IdempotencyConflict(list(dict.fromkeys(conflicts)))
        return [r for r in results if r is not None]

    def _append_partition(
        self, partition: int, events: list[PreparedEvent], received_at_ms: int, state: _Abandoned
    ) -> defer.Deferred:
        keys = [self.keys.events(partition)] + [self.keys.seen(partition, e.event_id) for e in events]
        args: list[Any] = [str(received_at_ms), str(self.dedupe_window_ms), str(self.max_stream_length or 0)]
        for e in events:
            args.extend((e.event_id, e.fingerprint, e.event_type, e.canonical))
        d = self._connection()
        d.addCallback(self._evalsha, keys, args, state)
        d.addCallback(self._parse_reply, events, keys[0])
        d.addErrback(self._map_error)
        return d

    def _connection(self) -> defer.Deferred:
        # A pool handler would pick a connection and send in one step; we need
        # the connection first so nothing is sent after the caller gave up.
        factory = getattr(self.redis, "_factory", None)
        if factory is None:
            return defer.succeed(self.redis)
        return factory.getConnection(peek=True)

    def _evalsha(self, conn: Any, keys: list[str], args: list[Any], state: _Abandoned) -> defer.Deferred | None:
        if state.abandoned:
            return None

        def reload(failure: Failure) -> Any:
            failure.trap(txredisapi.ResponseError)
            if not failure.getErrorMessage().startswith("NOSCRIPT") or state.abandoned:
                return failure
            log.info("loading append script {sha} into redis", sha=APPEND_SCRIPT_SHA)
            d = conn.execute_command("SCRIPT", "LOAD", APPEND_SCRIPT)
            d.addCallback(self._check_sha)
            d.addCallback(lambda _: None if state.abandoned else self._send(conn, keys, args))
            return d

        return self._send(conn, keys, args).addErrback(reload)

    @staticmethod
    def _send(conn: Any, keys: list[str], args: list[Any]) -> defer.Deferred:
        return conn.execute_command("EVALSHA", APPEND_SCRIPT_SHA, len(keys), *keys, *args)

    @staticmethod
    def _check_sha(sha: Any) -> None:
        if str(sha) != APPEND_SCRIPT_SHA:
            raise RuntimeError(f"redis returned script sha {sha}, expected {APPEND_SCRIPT_SHA}")

    def _parse_reply(self, reply: Any, events: list[PreparedEvent], stream: str) -> list[AppendResult]:
        if reply is None:  # abandoned before sending; the caller has its timeout already
            return []
        kind = str(reply[0])
        if kind == "conflict":
            ids = [events[int(i) - 1].event_id for i in reply[1:]]
            raise IdempotencyConflict(list(dict.fromkeys(ids)))
        if kind == "full":
            raise RedisUnavailable(
                f"stream {stream} is full ({reply[1]} entries, max_stream_length {self.max_stream_length})"
            )
        if kind != "ok" or len(reply) != 1 + 2 * len(events):
            raise RuntimeError(f"unexpected reply from append script: {reply!r:.200}")
        return [AppendResult(str(reply[1 + 2 * i]), int(reply[2 + 2 * i]) == 1) for i in range(len(events))]

    @staticmethod
    def _map_error(failure: Failure) -> Failure:
        reason = _unavailable_reason(failure)
        if reason is not None:
            raise RedisUnavailable(reason)
        return failure


def fingerprint_of(canonical: bytes) -> str:
    """The fingerprint PreparedEvent expects: hex sha256 of the canonical JSON."""
    return hashlib.sha256(canonical).hexdigest()

