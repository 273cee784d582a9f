"""
Micro-benchmark of StreamWriter alone (no HTTP): events/s of the append path.

Starts its own redis-server (tests/support, never 6379; Redis 7 if present,
else 6.2), then for each writer variant:

- batch:  ``--batches`` appends of ``--batch-size`` events, ``--concurrency``
  appends in flight at a time (like 8 wrk connections posting batches);
- single: ``--singles`` appends of one event each, ``--single-concurrency``
  in flight (like 64 connections posting single events).

Variants: group commit on/off x EVALSHA encoded by PayFlux / by txredisapi.
Also reports the Python CPU time per event (process time, excludes Redis).

Usage: python bench/writer_micro.py [--batches 200] [--singles 20000] [--rounds 3]
Run from the repository root.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import defer, task  # noqa: E402

from payflux.redis.connect import connect  # noqa: E402

from payflux.redis.target import parse_redis_url
from payflux.streams.keys import StreamKeys  # noqa: E402
from payflux.streams.writer import PreparedEvent, StreamWriter, fingerprint_of  # noqa: E402
from tests.support.redis import RedisProcess, find_redis_binaries  # noqa: E402

KEYS = StreamKeys("bench")

VARIANTS = [
    ("group commit, own encoding", dict(group_commit=True, encode=True)),
    ("group commit, txredisapi encoding", dict(group_commit=True, encode=False)),
    ("per call, own encoding", dict(group_commit=False, encode=True)),
    ("per call, txredisapi encoding", dict(group_commit=False, encode=False)),
]


def make_event(n: int) -> PreparedEvent:
    event_id = f"evt_{uuid.uuid4().hex}"
    body = {
        "amount_bucket": "10-50",
        "card_bin_hash": "b" * 64,
        "currency": "EUR",
        "event_id": event_id,
        "event_type": "authorization",
        "merchant_id_hash": f"{n % 1000:064x}",
        "event_timestamp": "2026-11-24T10:00:00.000Z",
        "schema_version": 1,
    }
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return PreparedEvent(event_id, body["merchant_id_hash"], "authorization", canonical, fingerprint_of(canonical))


async def run_appends(writer: StreamWriter, calls: list[list[PreparedEvent]], concurrency: int) -> tuple[float, float]:
    """Wall seconds and process CPU seconds for all ``calls``, ``concurrency`` in flight."""
    it = iter(calls)

    async def lane() -> None:
        for events in it:
            await writer.append(events, int(time.time() * 1000))

    wall, cpu = time.perf_counter(), time.process_time()
    await defer.gatherResults([defer.ensureDeferred(lane()) for _ in range(concurrency)], consumeErrors=True)
    return time.perf_counter() - wall, time.process_time() - cpu


async def main(reactor, args: argparse.Namespace) -> None:
    binaries = find_redis_binaries()
    binary = binaries.get("7") or binaries.get("6.2")
    if binary is None:
        raise SystemExit("no redis-server binary found")
    server = RedisProcess(binary, extra_args=["--save", "", "--appendonly", "no"])
    try:
        redis = connect(parse_redis_url(server.url), poolsize=1, connect_timeout=2.0, reply_timeout=30.0)
        await redis._factory.getConnection(peek=True)
        print(f"redis-server {server.version} at {server.url}; batch {args.batches} x {args.batch_size} events "
              f"({args.concurrency} in flight), single {args.singles} ({args.single_concurrency} in flight), "
              f"best of {args.rounds}")
        print(f"{'variant':36} {'batch ev/s':>11} {'µs CPU/ev':>10} {'single ev/s':>12} {'µs CPU/ev':>10}")
        for name, options in VARIANTS:
            best: dict[str, tuple[float, float]] = {}
            for _ in range(args.rounds):
                server.sync_command("FLUSHALL")
                writer = StreamWriter(redis, KEYS, 1, 3600, 30.0, reactor, **options)
                batches = [[make_event(i) for i in range(args.batch_size)] for _ in range(args.batches)]
                singles = [[make_event(i)] for i in range(args.singles)]
                for mode, calls, conc in (("batch", batches, args.concurrency), ("single", singles, args.single_concurrency)):
                    wall, cpu = await run_appends(writer, calls, conc)
                    events = sum(len(c) for c in calls)
                    rate, cpu_us = events / wall, cpu / events * 1e6
                    if mode not in best or rate > best[mode][0]:
                        best[mode] = (rate, cpu_us)
            (br, bc), (sr, sc) = best["batch"], best["single"]
            print(f"{name:36} {br:>11,.0f} {bc:>10.1f} {sr:>12,.0f} {sc:>10.1f}", flush=True)
        await redis.disconnect()
    finally:
        server.cleanup()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--singles", type=int, default=20000)
    ap.add_argument("--single-concurrency", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    parsed = ap.parse_args()
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, parsed)))
