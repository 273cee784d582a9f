"""
The append script: the Lua that Redis runs for each partition of a flush, and its calling convention.

The script checks every event's dedupe record and, only if no event of a
segment conflicts, appends that segment's new events and records them
(docs/stream-format.md is the contract).  ``append_args`` builds its KEYS and
ARGV from the segments of one flush and ``segment_replies`` splits its reply
back into one reply per segment; the StreamWriter (payflux/streams/writer.py)
sends the call and turns each segment reply into results or errors.  Why a
flush writes all of its accepted segments or nothing is in writer.py's
docstring, which the script's header points to.

``APPEND_SCRIPT_SHA`` is the sha1 of the script text, so any edit to it,
comments included, changes the sha Redis knows it by.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence

from payflux.redis.scripts import Script
from payflux.streams.keys import StreamKeys

# The stream format version: the entry field ``v``, which the script writes as
# the literal '1' (docs/stream-format.md); change both together.
FORMAT_VERSION = "1"

APPEND_SCRIPT = r"""
-- PayFlux append v2: one partition, one or more segments (one segment = the
-- events of one StreamWriter.append call; group commit puts several in a call).
-- KEYS[1] = stream, KEYS[1+i] = dedupe key of event i (all segments, in order).
-- ARGV[1] = received_at (ms) of segment 1, ARGV[2] = dedupe window (ms),
-- ARGV[3] = max stream length (0 = no cap),
-- ARGV[4+4(i-1) .. 7+4(i-1)] = event_id, fingerprint, type, canonical JSON,
-- then per segment 2..S: index of its first event, its received_at (ms).
-- A segment's reply: {'ok', id, dup, ...} | {'conflict', i, ...} (i counts
-- within the segment) | {'full', len}.  The reply is the segment's reply for
-- S = 1 (the v1 layout and reply), else an array of the S segment replies.
-- Segments behave like sequential calls.  Every check happens before the
-- first write (see writer.py docstring).
local n = #KEYS - 1
local stream = KEYS[1]
local starts, stamps = {1}, {ARGV[1]}
for j = 4 * n + 4, #ARGV, 2 do
  starts[#starts + 1] = tonumber(ARGV[j])
  stamps[#stamps + 1] = ARGV[j + 1]
end
local nseg = #starts
starts[nseg + 1] = n + 1
local cap = tonumber(ARGV[3])
local len = nil        -- XLEN, read at most once
local growth = 0       -- entries the accepted segments will add
local recorded = {}    -- i -> stream id of an earlier append with the same payload
local pending = {}     -- event_id -> fingerprint, new in an accepted segment
local accepted = {}
local replies = {}
for s = 1, nseg do
  local first_fp = {}  -- event_id -> fingerprint of its first new occurrence in s
  local conflicts = {}
  local new_count = 0
  local base = starts[s] - 1
  for i = starts[s], starts[s + 1] - 1 do
    local b = 4 * (i - 1) + 3
    local eid, fp = ARGV[b + 1], ARGV[b + 2]
    local rec = redis.call('GET', KEYS[1 + i])
    if rec then
      local sp = string.find(rec, ' ', 1, true)
      if not sp then
        return redis.error_reply('PAYFLUXCORRUPT malformed dedupe record at ' .. KEYS[1 + i])
      end
      if string.sub(rec, 1, sp - 1) ~= fp then
        conflicts[#conflicts + 1] = i - base
      else
        recorded[i] = string.sub(rec, sp + 1)
      end
    else
      local f = pending[eid] or first_fp[eid]
      if f == nil then
        first_fp[eid] = fp
        new_count = new_count + 1
      elseif f ~= fp then
        conflicts[#conflicts + 1] = i - base
      end
    end
  end
  if #conflicts > 0 then
    local r = {'conflict'}
    for _, i in ipairs(conflicts) do r[#r + 1] = i end
    replies[s] = r
  else
    if cap > 0 and new_count > 0 and len == nil then
      len = redis.call('XLEN', stream)
    end
    if cap > 0 and new_count > 0 and len + growth + new_count > cap then
      replies[s] = {'full', len + growth}
    else
      accepted[s] = true
      growth = growth + new_count
      for eid, fp in pairs(first_fp) do pending[eid] = fp end
    end
  end
end
local added = {}       -- event_id -> stream id appended by this call
for s = 1, nseg do
  if accepted[s] then
    local out = {'ok'}
    for i = starts[s], starts[s + 1] - 1 do
      local b = 4 * (i - 1) + 3
      local eid = ARGV[b + 1]
      local id = recorded[i] or added[eid]
      if id then
        out[#out + 1] = id
        out[#out + 1] = 1
      else
        id = redis.call('XADD', stream, '*', 'v', '1', 'event_id', eid, 'type', ARGV[b + 3],
                        'received_at', stamps[s], 'data', ARGV[b + 4])
        redis.call('SET', KEYS[1 + i], ARGV[b + 2] .. ' ' .. id, 'PX', ARGV[2])
        added[eid] = id
        out[#out + 1] = id
        out[#out + 1] = 0
      end
    end
    replies[s] = out
  end
end
if nseg == 1 then
  return replies[1]
end
return replies
"""

APPEND = Script("append", APPEND_SCRIPT)
APPEND_SCRIPT_SHA = APPEND.sha


class ScriptEvent(Protocol):
    """What the script needs of an event (``PreparedEvent`` has it)."""

    @property
    def event_id(self) -> str: ...

    @property
    def fingerprint(self) -> str: ...

    @property
    def event_type(self) -> str: ...

    @property
    def canonical(self) -> bytes: ...


class ScriptSegment(Protocol):
    """What the script needs of a segment: the events of one append call, and when it was received."""

    @property
    def events(self) -> Sequence[ScriptEvent]: ...

    @property
    def received_at_ms(self) -> int: ...


def append_args(
    keys: StreamKeys,
    partition: int,
    segments: Sequence[ScriptSegment],
    dedupe_window_ms: int,
    max_stream_length: int | None,
) -> list[Any]:
    """The whole EVALSHA command for ``segments`` (at least one) of ``partition``, in the script's layout."""
    seen = keys.seen
    n = sum(len(s.events) for s in segments)
    args: list[Any] = ["EVALSHA", APPEND_SCRIPT_SHA, n + 1, keys.events(partition)]
    args.extend(seen(partition, e.event_id) for s in segments for e in s.events)
    args.extend((segments[0].received_at_ms, dedupe_window_ms, max_stream_length or 0))
    for s in segments:
        for e in s.events:
            args.extend((e.event_id, e.fingerprint, e.event_type, e.canonical))
    start = 1 + len(segments[0].events)
    for s in segments[1:]:
        args.extend((start, s.received_at_ms))
        start += len(s.events)
    return args


def segment_replies(reply: Any, segments: int) -> list[Any]:
    """One reply per segment: for a single segment the script returns that segment's reply bare (the v1 reply)."""
    replies = [reply] if segments == 1 else reply
    if not isinstance(replies, list) or len(replies) != segments:
        raise RuntimeError(f"unexpected reply from append script: {reply!r:.200}")
    return replies
