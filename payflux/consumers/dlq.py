"""
Dead letters: how an entry gets into a partition's DLQ, and the operator CLI's tools for it.

- Dead-lettering (the daemon): :func:`move_to_dlq` moves one pending entry to the DLQ with one
  Lua call (:data:`DEAD_LETTER_SCRIPT`).  The reclaim loop
  (:meth:`payflux.consumers.reclaim.ReclaimService.dead_letter`) decides when: an entry handed
  out ``max_deliveries`` times already, with the handler's last error (or :data:`NO_ERROR`).
- The CLI (``payflux dlq``): list, replay, purge (blocking, over SyncRedis).

A DLQ entry (``<prefix>:{p}:dlq``, written by :data:`DEAD_LETTER_SCRIPT`; docs/stream-format.md,
"Dead-letter records") holds ``original_id, group, consumer, deliveries, error_class,
error_message, dead_lettered_at, source_stream`` followed by the original entry's fields
``v, event_id, type, received_at, data``.

Replay is one Lua call per batch of DLQ ids (``REPLAY_SCRIPT``): for each id still in the DLQ
it ``XADD``s the original fields, in stream-format order, to the partition's event stream
(a **new** stream id: every group sees it again as a new entry) and ``XDEL``s the DLQ entry, in
the same atomic step.  An id no longer in the DLQ is a no-op (``missing``), so running a replay
twice, or two operators at once, never duplicates an event.  An entry whose ``source_stream``
isn't this partition's event stream, or that lacks an original field, is left in place
(``skipped``) and reported.  Ids are DLQ stream ids, looked up in every partition unless a
partition is given (two partitions' DLQs can hold the same id).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import attrs
from twisted.internet import defer

from payflux.consumers.inspect import pairs, parse_id, text
from payflux.redis.scripts import Script, evalsha, evalsha_sync
from payflux.streams.keys import StreamKeys

# -- moving an entry to the DLQ (the daemon's reclaim loop) ------------------------------------

# KEYS[1] = events stream, KEYS[2] = DLQ stream.
# ARGV = group, stream id, consumer, error_class, error_message.
# Returns 1 (moved), 0 (not pending in the group any more: someone acked it; nothing done),
# -1 (pending but the stream entry is gone: acked, nothing written).
DEAD_LETTER_SCRIPT = r"""
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
if #p == 0 then return 0 end
local e = redis.call('XRANGE', KEYS[1], ARGV[2], ARGV[2])
if #e == 0 then
  redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
  return -1
end
local t = redis.call('TIME')
local now_ms = tostring(tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
local f = {'original_id', ARGV[2], 'group', ARGV[1], 'consumer', ARGV[3],
           'deliveries', tostring(tonumber(p[1][4]) - 1), 'error_class', ARGV[4], 'error_message', ARGV[5],
           'dead_lettered_at', now_ms, 'source_stream', KEYS[1]}
local orig = e[1][2]
for i = 1, #orig do f[#f + 1] = orig[i] end
redis.call('XADD', KEYS[2], '*', unpack(f))
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
return 1
"""
DEAD_LETTER = Script("dead-letter", DEAD_LETTER_SCRIPT)

NO_ERROR = ("DeliveryLimitExceeded", "no handler error recorded (the consumer stopped or crashed while handling it)")


def move_to_dlq(redis: Any, keys: StreamKeys, partition: int, stream_id: str, group: str, consumer: str,
                error_class: str, error_message: str) -> defer.Deferred:
    """
    Move ``stream_id`` of ``partition`` to the partition's DLQ: one :data:`DEAD_LETTER_SCRIPT`
    call (XADD of the dead-letter record to ``keys.dlq(partition)`` + XACK of the original, only
    if it is still pending in ``group``; the original entry is never XDELed).  Fires with 1
    (moved), 0 (not pending in the group any more: someone acked it; nothing done) or -1
    (pending but the stream entry is gone: acked, nothing written).
    """
    d = evalsha(redis, DEAD_LETTER, [keys.events(partition), keys.dlq(partition)],
                [group, stream_id, consumer, error_class, error_message])
    return d.addCallback(int)


# -- the operator CLI's tools: list, replay, purge (blocking, over SyncRedis) ---------------------

ORIGINAL_FIELDS = ("v", "event_id", "type", "received_at", "data")

# KEYS[1] = DLQ stream, KEYS[2] = the partition's event stream; ARGV = DLQ ids.
# Returns one reply per id: the new stream id, or 'missing', or 'skipped:<reason>'.
REPLAY_SCRIPT = r"""
local names = {'v', 'event_id', 'type', 'received_at', 'data'}
local out = {}
for i, id in ipairs(ARGV) do
  local e = redis.call('XRANGE', KEYS[1], id, id)
  if #e == 0 then
    out[i] = 'missing'
  else
    local f = {}
    local raw = e[1][2]
    for j = 1, #raw, 2 do f[raw[j]] = raw[j + 1] end
    if f['source_stream'] and f['source_stream'] ~= KEYS[2] then
      out[i] = 'skipped:source_stream is ' .. f['source_stream']
    else
      local args = {}
      local bad = nil
      for _, name in ipairs(names) do
        if f[name] == nil then bad = name break end
        args[#args + 1] = name
        args[#args + 1] = f[name]
      end
      if bad then
        out[i] = 'skipped:no field ' .. bad
      else
        out[i] = redis.call('XADD', KEYS[2], '*', unpack(args))
        redis.call('XDEL', KEYS[1], id)
      end
    end
  end
end
return out
"""
REPLAY = Script("dlq replay", REPLAY_SCRIPT)

PURGE_SCRIPT = r"""
local n = redis.call('XLEN', KEYS[1])
redis.call('DEL', KEYS[1])
return n
"""
PURGE = Script("dlq purge", PURGE_SCRIPT)


@attrs.frozen
class DeadLetter:
    """One DLQ entry as the CLI shows it; ``fields`` keeps every raw field."""

    partition: int
    id: str
    original_id: str | None
    group: str | None
    consumer: str | None
    deliveries: int | None
    error_class: str | None
    error_message: str | None
    dead_lettered_at: int | None  # epoch ms
    source_stream: str | None
    event_id: str | None
    type: str | None
    fields: dict[str, Any] = attrs.field(eq=False)

    def as_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def dead_letter_from_entry(partition: int, entry: Sequence[Any]) -> DeadLetter:
    """An ``XRANGE`` entry of a DLQ stream -> :class:`DeadLetter` (missing fields -> None)."""
    f = {k: text(v) for k, v in pairs(entry[1]).items()}
    return DeadLetter(
        partition=partition, id=text(entry[0]), original_id=f.get("original_id"), group=f.get("group"),
        consumer=f.get("consumer"), deliveries=_int(f.get("deliveries")), error_class=f.get("error_class"),
        error_message=f.get("error_message"), dead_lettered_at=_int(f.get("dead_lettered_at")),
        source_stream=f.get("source_stream"), event_id=f.get("event_id"), type=f.get("type"), fields=f,
    )


def check_ids(ids: Iterable[str]) -> list[str]:
    """Validate DLQ ids (``<ms>-<seq>``); ValueError names the first bad one."""
    out = []
    for i in ids:
        try:
            ms, seq = parse_id(i)
        except ValueError:
            raise ValueError(f"not a stream id: {i!r} (expected <ms>-<seq>, e.g. 1700000000000-0)") from None
        if "-" not in i:
            raise ValueError(f"not a full stream id: {i!r} (expected <ms>-<seq>)")
        out.append(f"{ms}-{seq}")
    return out


def _partitions(partitions: int, only: int | None) -> range:
    if only is None:
        return range(partitions)
    if not 0 <= only < partitions:
        raise ValueError(f"partition {only} does not exist (partitions: {partitions})")
    return range(only, only + 1)


def dlq_depths(sync_redis: Any, keys: StreamKeys, partitions: int) -> dict[int, int]:
    """``{partition: XLEN of its DLQ}``."""
    return {p: int(sync_redis.command("XLEN", keys.dlq(p))) for p in range(partitions)}


def list_dead_letters(sync_redis: Any, keys: StreamKeys, partitions: int, limit: int = 50) -> list[DeadLetter]:
    """The oldest ``limit`` dead letters over all partitions (oldest first by DLQ id)."""
    found: list[DeadLetter] = []
    for p in range(partitions):
        for entry in sync_redis.command("XRANGE", keys.dlq(p), "-", "+", "COUNT", limit):
            found.append(dead_letter_from_entry(p, entry))
    found.sort(key=lambda d: (parse_id(d.id), d.partition))
    return found[:limit]


@attrs.define
class ReplayResult:
    replayed: list[tuple[int, str, str]] = attrs.field(factory=list)  # (partition, dlq id, new stream id)
    missing: list[str] = attrs.field(factory=list)                    # ids found in no DLQ
    skipped: list[tuple[int, str, str]] = attrs.field(factory=list)   # (partition, dlq id, reason)

    def as_dict(self) -> dict[str, Any]:
        return {
            "replayed": [{"partition": p, "id": i, "new_id": n} for p, i, n in self.replayed],
            "missing": list(self.missing),
            "skipped": [{"partition": p, "id": i, "reason": r} for p, i, r in self.skipped],
        }


def _replay_batch(sync_redis: Any, keys: StreamKeys, p: int, ids: list[str], result: ReplayResult) -> set[str]:
    """Replay ``ids`` of partition ``p``; returns the ids that were present (replayed or skipped)."""
    replies = evalsha_sync(sync_redis, REPLAY, [keys.dlq(p), keys.events(p)], ids)
    present = set()
    for dlq_id, reply in zip(ids, replies):
        reply = text(reply)
        if reply == "missing":
            continue
        present.add(dlq_id)
        if reply.startswith("skipped:"):
            result.skipped.append((p, dlq_id, reply[len("skipped:"):]))
        else:
            result.replayed.append((p, dlq_id, reply))
    return present


def replay(sync_redis: Any, keys: StreamKeys, partitions: int, ids: Sequence[str] | None = None,
           all: bool = False, progress: Callable[[int, int, int], None] | None = None,
           partition: int | None = None, batch: int = 100, progress_every: int = 1000) -> ReplayResult:
    """
    Replay the given DLQ ``ids`` or, with ``all=True``, every dead letter (see module doc).

    ``progress(handled, total, replayed)`` is called each time another ``progress_every`` ids
    have been handled (looked up: replayed, skipped or not found; ``total`` = DLQ entries when
    the replay began, or ``len(ids)``), with how many of them were really replayed; never for a
    replay shorter than that (the result says what happened).  ValueError for a bad id or
    partition, or when neither/both of ``ids`` and ``all`` are given.
    """
    if all == bool(ids):
        raise ValueError("give either ids or all=True")
    targets = _partitions(partitions, partition)
    result = ReplayResult()
    done = reported = 0

    def tick(n: int, total: int) -> None:
        nonlocal done, reported
        done += n
        if progress is not None and done - reported >= progress_every:
            reported = done
            progress(done, total, len(result.replayed))

    if ids:
        wanted = check_ids(ids)
        total = len(wanted)
        found: set[str] = set()
        for i in range(0, len(wanted), batch):
            chunk = wanted[i:i + batch]
            for p in targets:
                found |= _replay_batch(sync_redis, keys, p, chunk, result)
            tick(len(chunk), total)
        result.missing = [i for i in wanted if i not in found]
    else:
        total = sum(int(sync_redis.command("XLEN", keys.dlq(p))) for p in targets)
        for p in targets:
            start = "-"
            while True:
                entries = sync_redis.command("XRANGE", keys.dlq(p), start, "+", "COUNT", batch)
                if not entries:
                    break
                chunk = [text(e[0]) for e in entries]
                _replay_batch(sync_redis, keys, p, chunk, result)
                tick(len(chunk), total)
                start = "(" + chunk[-1]
    return result


def purge(sync_redis: Any, keys: StreamKeys, partitions: int) -> dict[int, int]:
    """Delete every partition's DLQ stream; ``{partition: entries deleted}`` (atomic per partition)."""
    return {p: int(evalsha_sync(sync_redis, PURGE, [keys.dlq(p)])) for p in range(partitions)}
