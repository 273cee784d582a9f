"""
Stream and consumer-group facts from raw Redis replies, for the CLI and the metrics sampler.

Nothing here does I/O.  The parsers take replies as either client returns them (the CLI's
:mod:`payflux.redis.sync` or txredisapi with ``convertNumbers=False``:
strings, ints, nested lists, ``None``).  Questions that need several round trips are written
once as *step generators* (:mod:`payflux.redis.steps`): a generator yields a command (a tuple
of arguments), receives its reply, and finally returns the facts; ``run_sync`` drives one with
the CLI's blocking client, ``run_deferred`` with the daemon's pool, so the CLI and the async
sampler share one implementation.

Lag (entries in the stream that the group has not been delivered yet):

- Redis >= 7.0 reports it in ``XINFO GROUPS`` (``lag``), computed from entry counters; it is nil
  when Redis can't know it (e.g. after XDEL/XTRIM inside the unread range or after
  ``XGROUP SETID`` to an arbitrary id).
- Redis 6.2 has no ``lag`` field.  In both cases we compute it as the number of entries whose
  id is greater than the group's ``last-delivered-id``: 0 if that id is at/after the last entry,
  the whole length if it is before the first entry, otherwise by counting ids with ``XRANGE
  (<last-delivered-id> +`` in chunks; if that side has more than ``max_scan`` entries we count
  the other side (``XREVRANGE <last-delivered-id> -``) and subtract from ``XLEN``.  Cost: reads
  at most ``2 * (max_scan + 1)`` entries (bodies included, Redis has no id-only range) in chunks of
  ``chunk``; when both sides exceed ``max_scan`` the lag is **unknown** (``None``), never a
  guess.  The commands are not one atomic snapshot, so appends during the count can make it
  differ from an instant value by the number of concurrent appends.

Group idle time (``GroupFacts.idle``) is how long ago any consumer of the group last read or
claimed: the smallest ``idle`` of ``XINFO CONSUMERS`` (one more command per group).  A running
consumer reads at least every ``block_ms``, so a large value means nobody runs the group any
more (``payflux group list``, ``payflux_group_idle_seconds``, ``group_idle_warning``).

Oldest pending age is measured by stream id time: ``now - ms part of the smallest pending id``,
i.e. how long ago the oldest unacknowledged entry was appended (clamped at 0).
"""

from __future__ import annotations

from typing import Any, Sequence

import attrs

from payflux.redis.steps import Steps
from payflux.streams.keys import StreamKeys

_INF_ID = (float("inf"), 0)


def text(value: Any) -> Any:
    """``bytes`` -> ``str`` (UTF-8); anything else unchanged."""
    return value.decode("utf-8", "replace") if isinstance(value, (bytes, bytearray)) else value


def parse_id(stream_id: Any) -> tuple[int, int]:
    """``"<ms>-<seq>"`` (or ``"<ms>"``) -> ``(ms, seq)``; ValueError for anything else."""
    s = text(stream_id)
    if not isinstance(s, str):
        raise ValueError(f"not a stream id: {stream_id!r}")
    ms, sep, seq = s.partition("-")
    if not ms.isdigit() or (sep and not seq.isdigit()):
        raise ValueError(f"not a stream id: {s!r}")
    return int(ms), int(seq) if sep else 0


def format_id(parsed: tuple[int, int]) -> str:
    return f"{parsed[0]}-{parsed[1]}"


def id_age(stream_id: Any, now: float) -> float:
    """Seconds between the time part of ``stream_id`` and ``now`` (epoch seconds), >= 0."""
    return max(0.0, now - parse_id(stream_id)[0] / 1000.0)


def pairs(flat: Sequence[Any]) -> dict[str, Any]:
    """A RESP2 flat ``[k1, v1, k2, v2, ...]`` list -> dict with ``str`` keys."""
    return {text(flat[i]): flat[i + 1] for i in range(0, len(flat) - 1, 2)}


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)


def parse_xinfo_groups(reply: Sequence[Any]) -> list[dict[str, Any]]:
    """
    ``XINFO GROUPS`` -> ``[{name, consumers, pending, last_delivered_id, entries_read, lag}]``.

    ``entries_read``/``lag`` are None on Redis 6.2 (absent) and when 7.x reports nil.
    """
    groups = []
    for raw in reply or ():
        g = pairs(raw)
        groups.append({
            "name": text(g["name"]),
            "consumers": int(g["consumers"]),
            "pending": int(g["pending"]),
            "last_delivered_id": text(g["last-delivered-id"]),
            "entries_read": _int_or_none(g.get("entries-read")),
            "lag": _int_or_none(g.get("lag")),
        })
    return groups


def parse_xinfo_consumers(reply: Sequence[Any]) -> list[dict[str, Any]]:
    """``XINFO CONSUMERS`` -> ``[{name, pending, idle_ms}]`` (``idle``: ms since the last attempted read or claim)."""
    out = []
    for raw in reply or ():
        c = pairs(raw)
        out.append({"name": text(c["name"]), "pending": int(c["pending"]), "idle_ms": int(c["idle"])})
    return out


def group_idle(consumers: Sequence[dict[str, Any]]) -> float | None:
    """Seconds since any of ``consumers`` last read: the smallest idle time; None without consumers."""
    return min(c["idle_ms"] for c in consumers) / 1000.0 if consumers else None


def parse_xpending_summary(reply: Sequence[Any]) -> tuple[int, str | None, str | None]:
    """``XPENDING key group`` -> ``(count, smallest id or None, greatest id or None)``."""
    count = int(reply[0])
    if not count:
        return 0, None, None
    return count, text(reply[1]), text(reply[2])


def entry_id(entry: Sequence[Any]) -> str:
    """The id of one ``XRANGE`` entry ``[id, [field, value, ...]]``."""
    return text(entry[0])


@attrs.frozen
class GroupFacts:
    name: str
    consumers: int
    pending: int
    last_delivered_id: str
    lag: int | None               # None = unknown (never reported as 0)
    lag_source: str | None        # "redis" (7.x XINFO), "computed" or None when unknown
    oldest_pending_id: str | None
    oldest_pending_age: float | None  # seconds, by stream id time; None when nothing pending
    # seconds since any consumer of the group last read or claimed (the smallest XINFO CONSUMERS
    # "idle"); None when the group has no consumer names (never read, or every name deleted)
    idle: float | None = None


@attrs.frozen
class PartitionFacts:
    partition: int
    stream: str
    length: int
    first_id: str | None
    last_id: str | None
    groups: tuple[GroupFacts, ...]
    dlq: str
    dlq_depth: int

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (the ``payflux stream info --json`` contract)."""
        out = attrs.asdict(self)
        out["groups"] = list(out["groups"])
        return out


def count_after_steps(stream: str, after_id: str, length: int, first_id: str | None, last_id: str | None,
                      max_scan: int = 10_000, chunk: int = 1000) -> Steps:
    """Steps returning the number of entries with id > ``after_id`` (None if too costly; see module doc)."""
    if length == 0 or first_id is None or last_id is None:
        return 0
    after = parse_id(after_id)
    if after >= parse_id(last_id):
        return 0
    if after < parse_id(first_id):
        return length
    forward = 0
    start = "(" + format_id(after)
    while forward <= max_scan:
        count = min(chunk, max_scan + 1 - forward)
        entries = yield ("XRANGE", stream, start, "+", "COUNT", count)
        forward += len(entries)
        if len(entries) < count:
            return forward
        start = "(" + entry_id(entries[-1])
    backward = 0
    end = format_id(after)
    while backward <= max_scan:
        count = min(chunk, max_scan + 1 - backward)
        entries = yield ("XREVRANGE", stream, end, "-", "COUNT", count)
        backward += len(entries)
        if len(entries) < count:
            return max(0, length - backward)
        end = "(" + entry_id(entries[-1])
    return None


def partition_steps(keys: StreamKeys, partition: int, now: float, max_scan: int = 10_000,
                    chunk: int = 1000) -> Steps:
    """
    Steps returning the :class:`PartitionFacts` of one partition at ``now`` (epoch seconds).

    A missing stream is reported as length 0 with no groups (not an error); a key of another
    type raises ValueError.
    """
    stream, dlq = keys.events(partition), keys.dlq(partition)
    kind = text((yield ("TYPE", stream)))
    groups: list[GroupFacts] = []
    length, first_id, last_id = 0, None, None
    if kind == "stream":
        info = pairs((yield ("XINFO", "STREAM", stream)))
        length = int(info["length"])
        first_entry, last_entry = info.get("first-entry"), info.get("last-entry")
        first_id = entry_id(first_entry) if first_entry else None
        last_id = entry_id(last_entry) if last_entry else None
        for g in parse_xinfo_groups((yield ("XINFO", "GROUPS", stream))):
            lag, source = g["lag"], "redis"
            if lag is None:
                lag = yield from count_after_steps(stream, g["last_delivered_id"], length, first_id, last_id,
                                                   max_scan, chunk)
                source = "computed" if lag is not None else None
            oldest = None
            if g["pending"]:
                _, oldest, _ = parse_xpending_summary((yield ("XPENDING", stream, g["name"])))
            idle = None
            if g["consumers"]:
                idle = group_idle(parse_xinfo_consumers((yield ("XINFO", "CONSUMERS", stream, g["name"]))))
            groups.append(GroupFacts(
                name=g["name"], consumers=g["consumers"], pending=g["pending"],
                last_delivered_id=g["last_delivered_id"], lag=lag, lag_source=source,
                oldest_pending_id=oldest,
                oldest_pending_age=id_age(oldest, now) if oldest is not None else None,
                idle=idle,
            ))
    elif kind != "none":
        raise ValueError(f"{stream} is a {kind}, not a stream")
    dlq_depth = int((yield ("XLEN", dlq)))
    return PartitionFacts(partition=partition, stream=stream, length=length, first_id=first_id,
                          last_id=last_id, groups=tuple(groups), dlq=dlq, dlq_depth=dlq_depth)
