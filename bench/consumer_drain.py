"""
Consumer drain: how fast one ConsumerService empties a backlog with the no-op handler.

Starts its own redis-server (tests/support, free port, never 6379, persistence off), fills
``<prefix>:{0}:events`` with N entries in the real v1 format (fields v, event_id, type,
received_at, data = a ~330-byte canonical event JSON; pipelined XADD, 10k per round trip),
creates the group at ``0``, then starts ONE ConsumerService with the built-in ``noop``
handler and measures the time until every entry is acknowledged (acked metric == N, checked
every 50 ms).  Each entry is read with XREADGROUP, decoded (JSON parsed into Entry), handed
to the handler and XACKed: the whole consumer path except the handler's own work.

Usage: python bench/consumer_drain.py [--events 1000000] [--batch-size 1000] [--concurrency 2]
                                      [--redis 7|6.2]
Run from the repository root.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import hiredis  # noqa: E402
from twisted.internet import defer, reactor, task  # noqa: E402

from payflux.consumers.config import ConsumerConfig  # noqa: E402
from payflux.consumers.handlers import load_handler  # noqa: E402
from payflux.consumers.service import ConsumerService, open_read_connection  # noqa: E402
from payflux.observability.metrics import Metrics  # noqa: E402
from payflux.redis.connect import connect  # noqa: E402
from payflux.redis.target import parse_redis_url
from payflux.streams.keys import StreamKeys  # noqa: E402
from tests.support.redis import RedisProcess, _encode_command, find_redis_binaries  # noqa: E402

KEYS = StreamKeys("payflux")


def canonical(i: int) -> str:
    event = {  # a stored event of the seed's schema (docs/events.md): its 15 fields and PayFlux's 4
        "amount_bucket": "10-50", "channel": "web", "currency": "USD", "customer_id_hash": "cu_4e9a1c7d",
        "event_id": f"evt_{i:032x}", "event_timestamp": "2026-01-15T10:00:00.000Z", "event_type": "payment_failed",
        "failure_category": "insufficient_funds", "failure_code": "card_declined", "failure_origin": "issuer",
        "geo_bucket": "US", "merchant_id_hash": "m_5f2b9c1e", "payment_intent_id_hash": f"pi_{i:016x}",
        "payment_method_bucket": "credit_card", "processor": "stripe", "processor_latency_ms": 230,
        "retry_count": 0, "retry_result": "failed", "system_source": "checkout_api",
    }
    return json.dumps(event, sort_keys=True, separators=(",", ":"))


def fill(port: int, n: int, chunk: int = 10_000) -> float:
    """Pipelined XADDs of ``n`` v1 entries; returns seconds taken."""
    started = time.monotonic()
    key = KEYS.events(0)
    received_at = str(int(time.time() * 1000))
    with socket.create_connection(("127.0.0.1", port)) as sock:
        reader = hiredis.Reader()
        for base in range(0, n, chunk):
            count = min(chunk, n - base)
            payload = b"".join(
                _encode_command(("XADD", key, "*", "v", "1", "event_id", f"evt_{i:032x}", "type", "payment_failed",
                                 "received_at", received_at, "data", canonical(i)))
                for i in range(base, base + count)
            )
            sock.sendall(payload)
            got = 0
            while got < count:
                reader.feed(sock.recv(1 << 20))
                while (reply := reader.gets()) is not False:
                    if isinstance(reply, hiredis.ReplyError):
                        raise RuntimeError(f"XADD failed: {reply}")
                    got += 1
    return time.monotonic() - started


async def drain(server: RedisProcess, n: int, batch_size: int, concurrency: int) -> tuple[float, float]:
    target = parse_redis_url(server.url)
    redis = connect(target, 2, 5.0, 30.0)
    server.sync_command("XGROUP", "CREATE", KEYS.events(0), "bench", "0")
    metrics = Metrics()
    config = ConsumerConfig(name="drain", group="bench", handler="noop", batch_size=batch_size, block_ms=1000,
                            concurrency=concurrency, consumer_name="bench-1")
    acked = metrics.consumers.acked.labels(consumer="drain", group="bench")
    service = ConsumerService(config, load_handler("noop", {}, reactor), redis,
                              lambda: open_read_connection(target, config.block_ms), KEYS, 1, metrics.consumers, reactor)
    redis0 = redis_cpu(server)
    cpu0 = time.process_time()
    started = time.monotonic()
    service.startService()
    while acked._value.get() < n:
        await task.deferLater(reactor, 0.05, lambda: None)
    elapsed = time.monotonic() - started
    cpu = time.process_time() - cpu0
    redis_used = redis_cpu(server) - redis0
    await service.stopService()
    await redis.disconnect()
    return elapsed, cpu, redis_used


def redis_cpu(server: RedisProcess) -> float:
    """The server's own CPU seconds so far (INFO cpu: used_cpu_sys + used_cpu_user)."""
    info = server.sync_command("INFO", "cpu").decode()
    return sum(float(line.split(":")[1]) for line in info.splitlines()
               if line.startswith(("used_cpu_sys:", "used_cpu_user:")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--redis", default="7", choices=["7", "6.2"])
    args = parser.parse_args()
    binary = find_redis_binaries().get(args.redis)
    if binary is None:
        sys.exit(f"no redis-server {args.redis} binary found")
    server = RedisProcess(binary)
    try:
        print(f"command: python bench/consumer_drain.py --events {args.events} --batch-size {args.batch_size} "
              f"--concurrency {args.concurrency} --redis {args.redis}")
        print(f"redis-server {server.version} ({binary}), python {sys.version.split()[0]}, {os.cpu_count()} cpus")
        fill_s = fill(server.port, args.events)
        print(f"filled {args.events:,} entries in {fill_s:.1f}s "
              f"(XLEN {server.sync_command('XLEN', KEYS.events(0)):,})")
        result: dict = {}

        async def run() -> None:
            result["elapsed"], result["cpu"], result["redis"] = await drain(server, args.events, args.batch_size, args.concurrency)

        task.react(lambda _: defer.ensureDeferred(run()))
    except SystemExit as e:
        if e.code not in (0, None):
            raise
        elapsed, cpu, redis_used = result["elapsed"], result["cpu"], result["redis"]
        pending = server.sync_command("XPENDING", KEYS.events(0), "bench")[0]
        print(f"drained {args.events:,} entries in {elapsed:.2f}s: {args.events / elapsed:,.0f} events/s "
              f"(consumer process CPU {cpu / elapsed:.0%} of one core, {cpu / args.events * 1e6:.1f} µs/event; "
              f"Redis {redis_used / elapsed:.0%}, {redis_used / args.events * 1e6:.1f} µs/event; pending after: {pending})")
    finally:
        server.cleanup()


if __name__ == "__main__":
    main()
