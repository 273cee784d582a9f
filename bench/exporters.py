"""
Exporter throughput: events/s through the handler API (``handle(batch)`` until it fires), per case.

Every case builds one exporter as the runtime would (``load_handler(name, options, reactor)``),
then the same batches go through it: realistic payment_exhaust events (``payflux.cli.sample_event``,
canonical JSON ~520 bytes with the seed schema's fields, ~420 before it, decoded into ``Entry``
objects by the consumer's own ``decode_entry``),
``--batch`` events per batch (the consumer's default ``batch_size`` is 100), at most
``--concurrency`` batches in flight (the runtime's ``concurrency``).  After a short warm-up the
clock runs from the first ``handle`` to the last batch's completion; afterwards the destination is
checked to hold every event (a case that loses events fails instead of reporting a number).
Each case runs ``--repeat`` times; the median run is printed, with the range of all runs.

Cases (``CASES``; add one as ``CASES["kafka"] = kafka_case``, an ``async (Bench) -> Target``):

- ``file-always`` / ``file-always-inline`` / ``file-interval`` / ``file-never``: the file
  exporter in a temp dir with each fsync policy (``-inline``: fsync on the reactor thread
  instead of the thread pool);
- ``webhook-batch`` / ``webhook-single``: the webhook exporter POSTing to a local twisted.web
  receiver that this script starts as a child process (``--serve-receiver``) so it doesn't share
  the exporter's CPU; the receiver verifies every signature and counts the events.
- ``kafka``: the Kafka exporter producing to librdkafka's mock cluster (3 brokers, acks=all,
  idempotent producer), run in a child process (``--serve-kafka-mock``); counted by the topic's
  offsets;
- ``parquet`` / ``parquet-per-batch``: the Parquet exporter in a temp dir, rolling a file per
  ``--concurrency`` batches (``max_batches`` = concurrency, the documented setting) or per batch;
  counted by reading the files' metadata.

Usage (from the repository root):
    python bench/exporters.py [--events 50000] [--single-events 5000] [--batch 100]
                              [--concurrency 1] [--repeat 3] [--cases file-always,webhook-batch,...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Awaitable, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import attrs  # noqa: E402
from twisted.internet import defer, reactor, task  # noqa: E402

from payflux.cli import sample_event  # noqa: E402
from payflux.consumers.handlers import Entry, decode_entry, load_handler  # noqa: E402
from payflux.events import canonical_json  # noqa: E402


@attrs.define
class Target:
    """One exporter under test: its handler, how many events its destination holds, how to stop it."""

    handler: Any
    delivered: Callable[[], Awaitable[int]]
    stop: Callable[[], Awaitable[None]]


@attrs.define
class Bench:
    """What a case factory gets: a scratch directory (removed afterwards) and the command-line options."""

    workdir: str
    args: argparse.Namespace

    def path(self, name: str) -> str:
        return os.path.join(self.workdir, name)


# -- cases ---------------------------------------------------------------------------------------


def file_case(**options: Any) -> Callable[[Bench], Awaitable[Target]]:
    async def build(bench: Bench) -> Target:
        path = bench.path(f"events-{time.monotonic_ns()}.ndjson")
        handler = load_handler("file", {"path": path, **options}, reactor)

        async def delivered() -> int:
            with open(path, "rb") as f:
                return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))

        async def stop() -> None:
            await handler.close()

        return Target(handler, delivered, stop)

    return build


class Receiver:
    """The webhook receiver child process (``--serve-receiver``): a twisted.web server on a loopback port."""

    def __init__(self, bench: Bench) -> None:
        self.secret_file = bench.path("webhook.secret")
        with open(self.secret_file, "w") as f:
            f.write("bench-secret-0123456789abcdef")
        os.chmod(self.secret_file, 0o600)
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve-receiver", self.secret_file],
                                     stdout=subprocess.PIPE)
        self.port = int(self.proc.stdout.readline())  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{self.port}/hooks/payflux"

    async def count(self) -> int:
        import treq

        response = await treq.get(f"http://127.0.0.1:{self.port}/count", persistent=False)
        counts = json.loads(await response.content())
        if counts["bad_signatures"]:
            raise AssertionError(f"the receiver saw {counts['bad_signatures']} badly signed requests")
        return counts["events"]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def webhook_case(**options: Any) -> Callable[[Bench], Awaitable[Target]]:
    async def build(bench: Bench) -> Target:
        receiver = Receiver(bench)
        handler = load_handler("webhook", {"url": receiver.url, "secret_file": receiver.secret_file, **options},
                               reactor)

        async def stop() -> None:
            await handler.close()
            receiver.stop()

        return Target(handler, receiver.count, stop)

    return build


class KafkaMock:
    """librdkafka's mock cluster in a child process (``--serve-kafka-mock``): its brokers don't share our CPU."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve-kafka-mock"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.bootstrap = self.proc.stdout.readline().decode().strip()  # type: ignore[union-attr]

    async def count(self, topic: str) -> int:
        """Messages in ``topic``: the sum of its partitions' high watermarks."""
        from confluent_kafka import Consumer, TopicPartition

        consumer = Consumer({"bootstrap.servers": self.bootstrap, "group.id": "payflux-bench", "log_level": 3})
        try:
            partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
            return sum(consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in partitions)
        finally:
            consumer.close()

    def stop(self) -> None:
        self.proc.stdin.close()  # type: ignore[union-attr]
        self.proc.wait(10)


def kafka_case(**options: Any) -> Callable[[Bench], Awaitable[Target]]:
    async def build(bench: Bench) -> Target:
        mock = KafkaMock()
        handler = load_handler("kafka", {"topic": "payments", "bootstrap_servers": mock.bootstrap, **options}, reactor)

        async def stop() -> None:
            await handler.close()
            mock.stop()

        return Target(handler, lambda: mock.count("payments"), stop)

    return build


def parquet_case(per_batch: bool = False, **options: Any) -> Callable[[Bench], Awaitable[Target]]:
    async def build(bench: Bench) -> Target:
        directory = bench.path(f"parquet-{time.monotonic_ns()}")
        held = 1 if per_batch else bench.args.concurrency
        # max_age 1 s: only the warm-up's last, incomplete group of batches waits for it
        handler = load_handler("parquet", {"directory": directory, "max_batches": held,
                                           "max_rows": held * bench.args.batch, "max_age": 1.0, **options}, reactor)

        async def delivered() -> int:
            import glob

            import pyarrow.parquet as pq

            files = glob.glob(os.path.join(directory, "**", "*.parquet"), recursive=True)
            return sum(pq.read_metadata(f).num_rows for f in files)

        async def stop() -> None:
            await handler.close()

        return Target(handler, delivered, stop)

    return build


CASES: dict[str, Callable[[Bench], Awaitable[Target]]] = {
    "file-always": file_case(fsync="always"),
    "file-always-inline": file_case(fsync="always", fsync_thread=False),
    "file-interval": file_case(fsync="interval", fsync_interval=1.0),
    "file-never": file_case(fsync="never"),
    "webhook-batch": webhook_case(mode="batch", max_in_flight=4),
    "webhook-single": webhook_case(mode="single", max_in_flight=16),
    "kafka": kafka_case(),
    "parquet": parquet_case(),
    "parquet-per-batch": parquet_case(per_batch=True),
}
SINGLE_EVENT_CASES = {"webhook-single"}  # one request per event: run with --single-events


# -- the run -------------------------------------------------------------------------------------


def make_batches(n: int, size: int) -> list[list[Entry]]:
    """``n`` entries decoded from real v1 stream fields, in batches of ``size``."""
    entries = []
    for i in range(n):
        event = sample_event(i, event_id=f"evt_bench_{i:08d}")
        fields = ["v", "1", "event_id", event["event_id"], "type", event["event_type"],
                  "received_at", str(1_700_000_000_000 + i), "data", canonical_json(event).decode()]
        entries.append(decode_entry(f"{1_700_000_000_000 + i}-0", 0, fields, 1))
    return [entries[i:i + size] for i in range(0, n, size)]


async def push(handler: Any, batches: list[list[Entry]], concurrency: int) -> tuple[float, list[float]]:
    """Hand every batch to ``handler`` with at most ``concurrency`` in flight; (seconds, per-batch latencies)."""
    slots = defer.DeferredSemaphore(concurrency)
    latencies: list[float] = []

    async def one(batch: list[Entry]) -> None:
        started = time.perf_counter()
        result = handler.handle(batch)
        if result is not None:
            await result
        latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await defer.gatherResults([slots.run(lambda b=b: defer.ensureDeferred(one(b))) for b in batches],
                              consumeErrors=True)
    return time.perf_counter() - started, latencies


async def run_case(name: str, bench: Bench) -> dict:
    events = bench.args.single_events if name in SINGLE_EVENT_CASES else bench.args.events
    batches = make_batches(events, bench.args.batch)
    warmup = make_batches(min(events, 5 * bench.args.batch), bench.args.batch)
    target = await CASES[name](bench)
    try:
        await push(target.handler, warmup, bench.args.concurrency)
        seconds, latencies = await push(target.handler, batches, bench.args.concurrency)
        delivered = await target.delivered()
    finally:
        await target.stop()
    expected = events + sum(len(b) for b in warmup)
    if delivered < expected:
        raise AssertionError(f"{name}: the destination holds {delivered} events, expected {expected}")
    latencies.sort()
    return {
        "case": name, "events": events, "batch": bench.args.batch, "concurrency": bench.args.concurrency,
        "seconds": seconds, "events_per_s": events / seconds,
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000,
    }


async def run(args: argparse.Namespace) -> None:
    names = args.cases.split(",") if args.cases else list(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise SystemExit(f"unknown case(s): {', '.join(unknown)}; known: {', '.join(CASES)}")
    workdir = tempfile.mkdtemp(prefix="payflux-bench-exporters-", dir=args.dir)
    try:
        print(f"{'case':<20} {'events':>8} {'batch':>6} {'conc':>5} {'seconds':>8} {'events/s':>10} "
              f"{'min-max events/s':>19} {'p50 ms':>8} {'p99 ms':>8}", flush=True)
        for name in names:
            runs = sorted([await run_case(name, Bench(workdir, args)) for _ in range(args.repeat)],
                          key=lambda r: r["events_per_s"])
            r = runs[len(runs) // 2]  # the median run
            spread = f"{runs[0]['events_per_s']:,.0f}-{runs[-1]['events_per_s']:,.0f}"
            print(f"{r['case']:<20} {r['events']:>8} {r['batch']:>6} {r['concurrency']:>5} {r['seconds']:>8.2f} "
                  f"{r['events_per_s']:>10,.0f} {spread:>19} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f}", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# -- the webhook receiver (child process) --------------------------------------------------------


def serve_receiver(secret_file: str) -> None:
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    from payflux.exporters.signing import SIGNATURE_HEADER, TIMESTAMP_HEADER, verify

    with open(secret_file, "rb") as f:
        secret = f.read().strip()
    counts = {"events": 0, "requests": 0, "bad_signatures": 0}

    class Hooks(Resource):
        isLeaf = True

        def render_POST(self, request: Any) -> bytes:
            body = request.content.read()
            timestamp = request.getHeader(TIMESTAMP_HEADER) or ""
            if not (timestamp.isdigit() and verify(secret, int(timestamp), body,
                                                   request.getHeader(SIGNATURE_HEADER) or "", time.time())):
                counts["bad_signatures"] += 1
                request.setResponseCode(401)
                return b""
            payload = json.loads(body)
            counts["requests"] += 1
            counts["events"] += len(payload["events"]) if "events" in payload else 1
            request.setResponseCode(204)
            return b""

        def render_GET(self, request: Any) -> bytes:
            return json.dumps(counts).encode()

    site = Site(Hooks())
    site.noisy = False
    port = reactor.listenTCP(0, site, backlog=1024, interface="127.0.0.1")
    print(port.getHost().port, flush=True)
    reactor.run()


def serve_kafka_mock() -> None:
    from confluent_kafka import Producer

    owner = Producer({"test.mock.num.brokers": 3, "log_level": 3})
    brokers = owner.list_topics(timeout=10).brokers.values()
    print(",".join(f"{b.host}:{b.port}" for b in brokers), flush=True)
    sys.stdin.read()  # serve until the parent closes our stdin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=50_000, help="events per case (default 50000)")
    parser.add_argument("--single-events", type=int, default=5_000,
                        help="events for one-request-per-event cases (default 5000)")
    parser.add_argument("--batch", type=int, default=100, help="events per handler batch (default 100)")
    parser.add_argument("--concurrency", type=int, default=1, help="batches in flight (default 1)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per case; the median is shown (default 3)")
    parser.add_argument("--cases", default="", help=f"comma-separated, default all: {','.join(CASES)}")
    parser.add_argument("--dir", default=None, help="where the file cases write (default: the temp dir)")
    parser.add_argument("--serve-receiver", metavar="SECRET_FILE", help=argparse.SUPPRESS)
    parser.add_argument("--serve-kafka-mock", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_receiver:
        serve_receiver(args.serve_receiver)
        return
    if args.serve_kafka_mock:
        serve_kafka_mock()
        return
    task.react(lambda _: defer.ensureDeferred(run(args)))


if __name__ == "__main__":
    main()
