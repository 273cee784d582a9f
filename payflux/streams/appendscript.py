"""
The append scripts: the Lua that Redis runs for each partition of a flush, and their calling convention.

A script checks every event's dedupe record and, only if no event of a
segment conflicts, appends that segment's new events and records them
(docs/stream-format.md is the contract).  ``append_args`` builds its KEYS and
ARGV from the segments of one flush and ``segment_replies`` splits its reply
back into one reply per segment; the StreamWriter (payflux/streams/writer.py)
sends the call and turns each segment reply into results or errors.  Why a
flush writes all of its accepted segments or nothing is in writer.py's
docstring, which the scripts' headers point to.

Two scripts, one per key layout:

- ``APPEND_SCRIPT`` (v3, layout "payflux"): compact dedupe records.  Each
  record is one field of a small hash: field = the packed event id
  (:func:`pack_event_id`, exact), value = the first 8 bytes of the
  fingerprint + the stream id packed (6 bytes of milliseconds + the decimal
  sequence).  Records are grouped in *generations* (time slices of half a
  window, or less when one fills up) and, inside a generation, in ``B``
  *buckets* by ``crc32(packed id) mod B``; a bucket is one hash key
  ``<prefix>:{p}:dd:<g>:<b>`` that expires as a whole (``PEXPIREAT`` end of
  its generation + window + 1 s), so it stays a listpack/ziplist of ~50
  entries.  The partition's generation table is the hash
  ``<prefix>:{p}:dd``.  A record counts only while it is younger than the
  window (its stream id's milliseconds against the script's ``TIME``), so
  the window is exact whatever slice it sits in.  Every key a call touches
  must be declared in KEYS (Redis Cluster slot migration), so the writer
  keeps a :class:`DedupeView` of the generation table per partition and
  declares the buckets of every live generation; the script checks that
  view and, if it is out of date, writes nothing and answers ``stale`` with
  the table: the writer refreshes its view and sends the call again.
- ``SEED_APPEND_SCRIPT`` (v2, layout "seed", unchanged): one string key per
  event, ``SET <seen key> "<fingerprint> <stream id>" PX <window>``.

``APPEND_SCRIPT_SHA`` is the sha1 of the script text, so any edit to it,
comments included, changes the sha Redis knows it by.
"""

from __future__ import annotations

import re
import time
import zlib
from typing import Any, Protocol, Sequence

import attrs

from payflux.redis.scripts import Script
from payflux.streams.keys import StreamKeys

# The stream format version: the entry field ``v``, which the scripts write as
# the literal '1' (docs/stream-format.md); change both together.
FORMAT_VERSION = "1"

#: Average records per bucket at which a generation counts as full (the script's FILL; the
#: hash encodings' limits are 512 entries and 64-byte fields/values by default).
DEDUPE_FILL = 64
#: Average records per bucket a new generation is sized for.
DEDUPE_TARGET = 32
#: Most buckets a generation may have.
DEDUPE_MAX_BUCKETS = 1 << 24
#: A writer keeps a generation in its view this long past what its clock says is its end of
#: life, so a Redis clock a little behind the writer's does not make the call stale.
VIEW_SLACK_MS = 2000

#: The Lua both append scripts run at the end of each segment's checks, before any write: the
#: segment's reply is its conflicts, or 'full' when it would grow the stream past the cap,
#: else it is accepted and its new event ids join ``pending`` (what later segments of the same
#: call see as already appended).  One text, so the two scripts cannot drift.
_SEGMENT_VERDICT = r"""  if #conflicts > 0 then
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
"""

#: The Lua both append scripts run after their own header: the segments of the call (where each
#: starts, its received_at) and the state their checks share.  ``{FIRST}`` is the ARGV index of
#: segment 2's start (after the per-event arguments, which the two layouts lay out differently).
_SEGMENTS = r"""local stream = KEYS[1]
local starts, stamps = {1}, {ARGV[1]}
for j = {FIRST}, #ARGV, 2 do
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
"""


def _segments(first: str) -> str:
    return _SEGMENTS.replace("{FIRST}", first)


APPEND_SCRIPT = r"""
-- PayFlux append v3: compact dedupe records (appendscript.py docstring,
-- docs/stream-format.md).  One partition, one or more segments (one segment =
-- the events of one StreamWriter.append call).
-- KEYS[1] = stream, KEYS[2] = dedupe table <prefix>:{p}:dd, then G keys per
-- event i, KEYS[2+G(i-1)+k]: k = 1..V its bucket in the k-th generation of
-- the caller's view, then its bucket in the proposed generation (if any),
-- then its v1 seen key (if ARGV[6] = '1').  The script touches no other key.
-- ARGV[1] = received_at (ms) of segment 1, ARGV[2] = window W (ms),
-- ARGV[3] = max stream length (0 = no cap), ARGV[4] = the caller's view: the
-- V generations "g:end:B,..." it declared, ARGV[5] = '' (reserved),
-- ARGV[6] = '1' if the v1 seen keys are declared, else '',
-- ARGV[7] = proposed new generation "g:end:B" or '', ARGV[8] = event count n,
-- ARGV[9+5(i-1) .. 13+5(i-1)] = event_id, packed id, fingerprint (8 bytes),
-- type, canonical JSON; then per segment 2..S: index of its first event, its
-- received_at (ms).
-- A segment's reply: {'ok', id, dup, ...} | {'conflict', i, ...} (i counts
-- within the segment) | {'full', len}; the reply is the segment's reply for
-- S = 1, else an array of the S segment replies.  If the caller's view is out
-- of date nothing is written and the reply is
-- {'stale', now, top, n, legacy_until, "g:end:B:start", ...}.
-- Segments behave like sequential calls.  Every check happens before the
-- first write, and the first write is an XADD (see writer.py docstring).
local FILL = 64
local W = tonumber(ARGV[2])
local S = math.max(1, math.floor(W / 2))
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local meta = redis.call('HGETALL', KEYS[2])
local top, count, legacy = nil, 0, 0
local gens = {}        -- g -> {end, B, start, "end:B"}
for j = 1, #meta, 2 do
  local f, v = meta[j], meta[j + 1]
  if f == 'top' then top = v
  elseif f == 'n' then count = tonumber(v)
  elseif f == 'legacy' then legacy = tonumber(v)
  elseif string.sub(f, 1, 1) == 'g' then
    local e, b, st = string.match(v, '^(%d+):(%d+):(%d+)$')
    if not e then
      return redis.error_reply('PAYFLUXCORRUPT malformed dedupe generation ' .. f .. ' in ' .. KEYS[2])
    end
    gens[string.sub(f, 2)] = {tonumber(e), tonumber(b), tonumber(st), e .. ':' .. b}
  end
end
local fresh = #meta == 0
if fresh and redis.call('EXISTS', KEYS[1]) == 1 then
  legacy = now + 2 * W  -- an upgrade: v2 seen keys may exist (stream-format.md, "Upgrading")
end
local stale = false
local view, vpos = {}, {}
local nview = 0
for g, e, b in string.gmatch(ARGV[4], '(%d+):(%d+):(%d+)') do
  nview = nview + 1
  view[g] = e .. ':' .. b
  vpos[g] = nview
end
local live = {}        -- view positions of the generations that can hold a record of the window
for g, G in pairs(gens) do
  if G[1] + W > now then
    if view[g] ~= G[4] then stale = true else live[#live + 1] = vpos[g] end
  end
end
local use_legacy = ARGV[6] ~= ''
if legacy > now and not use_legacy then stale = true end
local G = nview + (ARGV[7] ~= '' and 1 or 0) + (use_legacy and 1 or 0)
if #KEYS ~= 2 + G * tonumber(ARGV[8]) then
  return redis.error_reply('PAYFLUXARGS expected ' .. (2 + G * tonumber(ARGV[8])) .. ' keys')
end
local total = tonumber(ARGV[8])
local T = top and gens[top]
local writable = T ~= nil and now < T[1] and count + total <= T[2] * FILL
local wg, wend, wpos, created = nil, nil, nil, false
if ARGV[7] ~= '' then
  local pg, pe, pb = string.match(ARGV[7], '^(%d+):(%d+):(%d+)$')
  local ok = pg ~= nil and (fresh or (top ~= nil and tonumber(pg) == tonumber(top) + 1))
  if ok then
    local e, b = tonumber(pe), tonumber(pb)
    ok = e > now and e <= now + S + 1000 and b >= 1 and b <= 16777216 and b * FILL >= total
    if ok and writable and now < T[1] - math.min(1000, S / 10) then ok = false end
  end
  if ok then wg, wend, wpos, created = pg, pe, nview + 1, true else stale = true end
elseif writable then
  wg, wend, wpos = top, string.match(T[4], '^(%d+)'), vpos[top]
else
  stale = true
end
if stale then
  local r = {'stale', string.format('%.0f', now), top or '', count, string.format('%.0f', legacy)}
  for g, G in pairs(gens) do r[#r + 1] = g .. ':' .. G[4] .. ':' .. string.format('%.0f', G[3]) end
  return r
end
local n = total
""" + _segments("5 * n + 9") + r"""local nlive = #live
for s = 1, nseg do
  local first_fp = {}  -- event_id -> fingerprint of its first new occurrence in s
  local conflicts = {}
  local new_count = 0
  local first = starts[s] - 1
  for i = starts[s], starts[s + 1] - 1 do
    local b = 5 * (i - 1) + 8
    local kb = 2 + G * (i - 1)
    local eid, fld, fp = ARGV[b + 1], ARGV[b + 2], ARGV[b + 3]
    local rec, at = nil, nil
    for k = 1, nlive do
      local r = redis.call('HGET', KEYS[kb + live[k]], fld)
      if r then
        if #r < 15 then
          return redis.error_reply('PAYFLUXCORRUPT malformed dedupe record in ' .. KEYS[kb + live[k]])
        end
        local ms = struct.unpack('>I6', r, 9)
        if now - ms < W then rec, at = r, ms break end
      end
    end
    local known = nil
    if rec then
      if string.sub(rec, 1, 8) ~= fp then known = false
      else recorded[i] = string.format('%.0f', at) .. '-' .. string.sub(rec, 15) known = true end
    elseif use_legacy then
      local old = redis.call('GET', KEYS[kb + G])
      if old then
        local sp = string.find(old, ' ', 1, true)
        if not sp then
          return redis.error_reply('PAYFLUXCORRUPT malformed dedupe record at ' .. KEYS[kb + G])
        end
        if string.sub(old, 1, 16) ~= string.format(string.rep('%02x', 8), string.byte(fp, 1, 8)) then
          known = false
        else
          recorded[i] = string.sub(old, sp + 1) known = true
        end
      end
    end
    if known == false then
      conflicts[#conflicts + 1] = i - first
    elseif known == nil then
      local f = pending[eid] or first_fp[eid]
      if f == nil then
        first_fp[eid] = fp
        new_count = new_count + 1
      elseif f ~= fp then
        conflicts[#conflicts + 1] = i - first
      end
    end
  end
""" + _SEGMENT_VERDICT + r"""local order, fields = {}, {}  -- bucket keys in first-write order, key -> {field, value, ...}
for s = 1, nseg do
  if accepted[s] then
    local out = {'ok'}
    for i = starts[s], starts[s + 1] - 1 do
      local b = 5 * (i - 1) + 8
      local eid = ARGV[b + 1]
      local id = recorded[i] or added[eid]
      if id then
        out[#out + 1] = id
        out[#out + 1] = 1
      else
        id = redis.call('XADD', stream, '*', 'v', '1', 'event_id', eid, 'type', ARGV[b + 4],
                        'received_at', stamps[s], 'data', ARGV[b + 5])
        added[eid] = id
        out[#out + 1] = id
        out[#out + 1] = 0
        local dash = string.find(id, '-', 1, true)
        local key = KEYS[2 + G * (i - 1) + wpos]
        local p = fields[key]
        if p == nil then p = {'', '1'} fields[key] = p order[#order + 1] = key end
        p[#p + 1] = ARGV[b + 2]
        p[#p + 1] = ARGV[b + 3] .. struct.pack('>I6', tonumber(string.sub(id, 1, dash - 1))) .. string.sub(id, dash + 1)
      end
    end
    replies[s] = out
  end
end
local written = 0
local expire_at = string.format('%.0f', tonumber(wend) + W + 1000)
for _, key in ipairs(order) do
  local p = fields[key]
  written = written + #p / 2 - 1
  -- the marker field '' is new only in a new key: give it its expiry once
  if redis.call('HSET', key, unpack(p)) == #p / 2 then
    redis.call('PEXPIREAT', key, expire_at)
  end
end
if written > 0 then
  if created then
    local upd = {'g' .. wg, string.sub(ARGV[7], #wg + 2) .. ':' .. string.format('%.0f', now), 'top', wg, 'n', written}
    if fresh or (legacy > 0 and legacy <= now) then
      upd[#upd + 1] = 'legacy'
      upd[#upd + 1] = string.format('%.0f', legacy > now and legacy or 0)
    end
    redis.call('HSET', KEYS[2], unpack(upd))
    for g, G in pairs(gens) do
      if G[1] + W + 1000 <= now then redis.call('HDEL', KEYS[2], 'g' .. g) end
    end
  else
    redis.call('HINCRBY', KEYS[2], 'n', written)
  end
end
if nseg == 1 then
  return replies[1]
end
return replies
"""

APPEND = Script("append", APPEND_SCRIPT)
APPEND_SCRIPT_SHA = APPEND.sha

SEED_APPEND_SCRIPT = r"""
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
""" + _segments("4 * n + 4") + r"""for s = 1, nseg do
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
""" + _SEGMENT_VERDICT + r"""for s = 1, nseg do
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

SEED_APPEND = Script("append-seed", SEED_APPEND_SCRIPT)
SEED_APPEND_SCRIPT_SHA = SEED_APPEND.sha


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


_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")
_HEX_TAIL = re.compile(r"(.{0,255}?)((?:[0-9a-f]{2}){8,})\Z", re.S)


def pack_event_id(event_id: str) -> bytes:
    """
    The dedupe record's field for ``event_id``: an exact, reversible (so injective) encoding.

    - ``\\x01`` + 16 bytes: a lowercase hyphenated UUID;
    - ``\\x02`` + prefix length (1 byte) + prefix + bytes: a prefix of at most 255 characters
      (the shortest possible) followed by an even-length run of at least 16 lowercase hex
      digits to the end (``evt_<32 hex>`` becomes 22 bytes);
    - else the UTF-8 id itself, behind a ``\\x00`` only if it starts with a byte below 0x20
      (so it cannot be read as one of the packed forms; HTTP event ids never do).

    Never empty: the empty field is each bucket's marker.
    """
    if len(event_id) == 36 and _UUID.match(event_id):
        return b"\x01" + bytes.fromhex(event_id.replace("-", ""))
    m = _HEX_TAIL.match(event_id)
    if m:
        prefix = m.group(1).encode("utf-8")
        if len(prefix) < 256:
            return b"\x02" + bytes((len(prefix),)) + prefix + bytes.fromhex(m.group(2))
    raw = event_id.encode("utf-8")
    return raw if raw[:1] >= b"\x20" else b"\x00" + raw


def unpack_event_id(packed: bytes) -> str:
    """The event id a record field stands for (the inverse of :func:`pack_event_id`)."""
    if packed[:1] == b"\x01":
        h = packed[1:].hex()
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
    if packed[:1] == b"\x02":
        n = packed[1]
        return packed[2 : 2 + n].decode("utf-8") + packed[2 + n :].hex()
    if packed[:1] == b"\x00":
        return packed[1:].decode("utf-8")
    return packed.decode("utf-8")


def unpack_record(value: bytes) -> tuple[bytes, str]:
    """A record value: (the fingerprint's first 8 bytes, the stream id)."""
    return value[:8], f"{int.from_bytes(value[8:14], 'big')}-{value[14:].decode()}"


def _pow2(n: float) -> int:
    b = 1
    while b < n:
        b <<= 1
    return b


@attrs.define
class Generation:
    """One generation of a partition's dedupe records (a field ``g<g>`` = ``end:B:start`` of the table)."""

    g: str
    end: int
    buckets: int
    start: int

    @property
    def spec(self) -> str:
        return f"{self.g}:{self.end}:{self.buckets}"


@attrs.define
class DedupeView:
    """
    A writer's picture of one partition's dedupe table (``<prefix>:{p}:dd``), refreshed from
    the script's ``stale`` replies; it only decides which keys a call declares, the script
    checks it.  ``offset_ms`` is Redis's clock minus ours, as of the last refresh.
    """

    gens: dict[str, Generation] = attrs.Factory(dict)
    top: str | None = None
    count: int = 0
    legacy_until: int = 0
    offset_ms: int = 0
    refreshes: int = 0

    def refresh(self, reply: Sequence[Any], local_now_ms: int) -> None:
        """Take the table from a ``stale`` reply."""
        now = int(reply[1])
        self.offset_ms = now - local_now_ms
        top = reply[2].decode() if isinstance(reply[2], bytes) else str(reply[2])
        self.top = top or None
        self.count = int(reply[3])
        self.legacy_until = int(reply[4])
        gens = {}
        for item in reply[5:]:
            g, end, b, start = (item.decode() if isinstance(item, bytes) else str(item)).split(":")
            gens[g] = Generation(g, int(end), int(b), int(start))
        self.gens = gens
        self.refreshes += 1

    def plan(self, window_ms: int, total: int, local_now_ms: int) -> tuple[list[Generation], Generation | None, bool]:
        """
        What a call of ``total`` events declares: the generations to look up, the new
        generation to propose (or None) and whether to declare the legacy seen keys.
        """
        now = local_now_ms + self.offset_ms
        slice_ms = max(1, window_ms // 2)
        live = [G for G in self.gens.values() if G.end + window_ms > now - VIEW_SLACK_MS]
        top = self.gens.get(self.top) if self.top is not None else None
        legacy = self.legacy_until > now - VIEW_SLACK_MS
        if top is not None and now < top.end and self.count + total <= top.buckets * DEDUPE_FILL:
            return live, None, legacy
        end = (now // slice_ms + 1) * slice_ms
        need = _pow2(total / DEDUPE_FILL)
        if top is None:
            buckets = need
        else:
            # size for the rate seen in the previous generation over what is left of this slice;
            # from less than 10 s of history grow by at most 64x
            elapsed = max(1000, min(now, top.end) - top.start)
            buckets = _pow2(self.count / elapsed * (end - now) / DEDUPE_TARGET)
            if elapsed < 10_000:
                buckets = min(buckets, top.buckets * 64)
            if now < top.end:  # it filled up
                buckets = max(buckets, top.buckets * 2)
        g = str(int(self.top) + 1) if self.top is not None else str(now)
        return live, Generation(g, end, max(need, min(buckets, DEDUPE_MAX_BUCKETS)), now), legacy

    def accepted(self, proposal: Generation | None, written: int) -> None:
        """Account for a call that was not stale: it created ``proposal`` (if any) and wrote ``written`` records."""
        if proposal is not None and written > 0:
            if self.top is None or int(proposal.g) > int(self.top):
                self.gens[proposal.g] = proposal
                self.top = proposal.g
                self.count = written
                return
        self.count += written


def append_args(
    keys: StreamKeys,
    partition: int,
    segments: Sequence[ScriptSegment],
    dedupe_window_ms: int,
    max_stream_length: int | None,
    view: DedupeView | None = None,
    local_now_ms: int | None = None,
) -> tuple[list[Any], Generation | None]:
    """
    The whole EVALSHA command for ``segments`` (at least one) of ``partition``, in the
    layout's script's layout, and the generation it proposes (None: none, or the seed layout).
    ``view`` (layout "payflux") is the partition's :class:`DedupeView`; ``local_now_ms``
    defaults to ``time.time()``.
    """
    if keys.layout == "seed":
        return _seed_args(keys, partition, segments, dedupe_window_ms, max_stream_length), None
    if view is None:
        view = DedupeView()
    if local_now_ms is None:
        local_now_ms = int(time.time() * 1000)
    events = [e for s in segments for e in s.events]
    n = len(events)
    live, proposal, legacy = view.plan(dedupe_window_ms, n, local_now_ms)
    base = keys.dedupe_bucket_base(partition)
    lookups = [(f"{base}{g.g}:", g.buckets) for g in live]
    if proposal is not None:
        lookups.append((f"{base}{proposal.g}:", proposal.buckets))
    seen = keys.seen
    declared: list[Any] = []
    per_event: list[Any] = []
    for e in events:
        p = pack_event_id(e.event_id)
        h = zlib.crc32(p)
        declared.extend(f"{prefix}{h % b}" for prefix, b in lookups)
        if legacy:
            declared.append(seen(partition, e.event_id))
        per_event.extend((e.event_id, p, bytes.fromhex(e.fingerprint[:16]), e.event_type, e.canonical))
    args: list[Any] = ["EVALSHA", APPEND_SCRIPT_SHA, 2 + len(declared), keys.events(partition), keys.dedupe(partition)]
    args.extend(declared)
    args.extend((
        segments[0].received_at_ms, dedupe_window_ms, max_stream_length or 0,
        ",".join(g.spec for g in live), "", "1" if legacy else "", proposal.spec if proposal is not None else "", n,
    ))
    args.extend(per_event)
    start = 1 + len(segments[0].events)
    for s in segments[1:]:
        args.extend((start, s.received_at_ms))
        start += len(s.events)
    return args, proposal


def _seed_args(
    keys: StreamKeys,
    partition: int,
    segments: Sequence[ScriptSegment],
    dedupe_window_ms: int,
    max_stream_length: int | None,
) -> list[Any]:
    seen = keys.seen
    n = sum(len(s.events) for s in segments)
    args: list[Any] = ["EVALSHA", SEED_APPEND_SCRIPT_SHA, n + 1, keys.events(partition)]
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


def script_for(keys: StreamKeys) -> Script:
    """The append script of ``keys``'s layout."""
    return SEED_APPEND if keys.layout == "seed" else APPEND


def is_stale(reply: Any) -> bool:
    """Whether ``reply`` is the v3 script's "your view of the dedupe table is out of date" (nothing written)."""
    if not isinstance(reply, list) or not reply:
        return False
    kind = reply[0]
    return kind in ("stale", b"stale")


def written_records(replies: Sequence[Any]) -> int:
    """How many events the segment replies say were appended (each one got a new dedupe record)."""
    n = 0
    for r in replies:
        if isinstance(r, list) and r and r[0] in ("ok", b"ok"):
            n += sum(1 for d in r[2::2] if int(d) == 0)
    return n


def segment_replies(reply: Any, segments: int) -> list[Any]:
    """One reply per segment: for a single segment the script returns that segment's reply bare (the v1 reply)."""
    replies = [reply] if segments == 1 else reply
    if not isinstance(replies, list) or len(replies) != segments:
        raise RuntimeError(f"unexpected reply from append script: {reply!r:.200}")
    return replies
