"""
Risk consumer benchmark: detector throughput and time-to-alert (docs/risk.md, "Performance").

1. engine: events/s through ``RiskEngine.observe`` (the pure detector core), default options.
2. handler: events/s through ``RiskHandler.handle`` (batches of ``--batch`` decoded entries, the
   core plus metrics and alert publishing; the alerts stream is an in-memory stand-in that
   answers at once, the webhook is off).
3. runtime (``--runtime-events N``, 0 = skip): a real redis-server (tests/support, free port,
   persistence off) filled with N v1 entries of the same traffic, drained by one
   ConsumerService with the ``risk`` handler (XREADGROUP, decode, handle, XACK), events/s.
4. time-to-alert: one processor at 1,000 events/s (plus two quieter ones), 300 s at 5%
   failures, then 40% from a random point inside a second; stream seconds from the spike's
   start to the failure_rate_spike alert on that processor, over ``--seeds`` seeds.
5. processor health (``--health-seeds``, 0 = skip): per seed and incident kind (failure_spike,
   retry_storm, timeout_cluster), steady noisy traffic on 3 processors (300/150/60 events/s,
   rates and probabilities jittered ±20% per second) for ``--steady-seconds``, then the incident
   on one processor (drawn per seed) for ``--incident-seconds``, RiskEngine driven directly at
   stream time.  Reports the stream seconds from the incident's start to that processor's band
   reaching high (median, p90, max), the share detected within the incident, and the false
   alarms per hour of steady traffic (a processor entering band >= high before the incident,
   after the first ``health.warmup_seconds``).

Traffic (1-3): 3 processors (60/30/10% of events), 10,000 merchants (Zipf-like), 5 geos,
4 failure categories and 3 failure origins, 5% failures, 3% retries (with their
``retry_result``), received_at advancing at ``--rate`` events/s of stream time.  Events have
the stored shape of the seed's schema (docs/events.md; optional fields absent).

Usage: python bench/risk.py [--events 1000000] [--rate 5000] [--batch 500] [--rounds 3]
                            [--runtime-events 200000] [--seeds 20] [--health-seeds 20]
                            [--steady-seconds 300] [--incident-seconds 60]
Run from the repository root.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import socket
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import defer, reactor, task  # noqa: E402

from payflux.consumers.config import ConsumerConfig  # noqa: E402
from payflux.consumers.handlers import Entry, load_handler  # noqa: E402
from payflux.consumers.service import ConsumerService, open_read_connection  # noqa: E402
from payflux.observability.metrics import Metrics  # noqa: E402
from payflux.risk.alerts import FAILURE_RATE_SPIKE, OPEN  # noqa: E402
from payflux.risk.engine import RiskEngine  # noqa: E402
from payflux.redis.connect import connect  # noqa: E402
from payflux.redis.target import parse_redis_url
from payflux.streams.keys import StreamKeys  # noqa: E402

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
PROCESSORS = (("stripe", 0.6), ("adyen", 0.3), ("checkout", 0.1))
GEOS = ("US", "EU-west", "GB", "BR", "IN")
CATEGORIES = ("insufficient_funds", "do_not_honor", "timeout", "fraud_suspected")
ORIGINS = ("issuer", "processor", "network")
KEYS = StreamKeys("payflux")


def traffic(n: int, rate: int, seed: int = 1) -> list[tuple[int, dict]]:
    """``n`` (received_at_ms, event) pairs, ``rate`` events per stream second."""
    rng = random.Random(seed)
    merchants = [f"mer_{i:06d}" for i in range(10_000)]
    weights = [1.0 / (i + 1) for i in range(len(merchants))]
    procs = rng.choices([p for p, _ in PROCESSORS], [w for _, w in PROCESSORS], k=n)
    mers = rng.choices(merchants, weights, k=n)
    recent: list[str] = []
    out = []
    for i in range(n):
        failed = rng.random() < 0.05
        retry = rng.random() < 0.03 and bool(recent)
        intent = recent.pop() if retry else f"pi_{i:012d}"
        ev = {
            "event_id": f"evt_{i:012d}", "event_type": "payment_failed" if failed else "payment_succeeded",
            "event_timestamp": "2026-01-01T00:00:00.000Z", "processor": procs[i], "merchant_id_hash": mers[i],
            "payment_intent_id_hash": intent, "geo_bucket": rng.choice(GEOS), "retry_count": 1 if retry else 0,
            "amount_bucket": "50-200", "system_source": "checkout_api", "payment_method_bucket": "credit_card",
            "channel": "web",
        }
        if retry:
            ev["retry_result"] = "failed" if failed else "success"
        if failed:
            ev["failure_category"] = rng.choice(CATEGORIES)
            ev["failure_origin"] = ORIGINS[i % 3]
            if len(recent) < 100:
                recent.append(intent)
        out.append((T0 + i * 1000 // rate, ev))
    return out


def bench_engine(events: list[tuple[int, dict]], rounds: int) -> list[float]:
    rates = []
    for _ in range(rounds):
        e = RiskEngine()
        observe = e.observe
        started = time.perf_counter()
        for t, ev in events:
            observe(ev, t)
        rates.append(len(events) / (time.perf_counter() - started))
    return rates


class InstantRedis:
    def execute_command(self, *args):
        return defer.succeed("1-0")


def bench_handler(events: list[tuple[int, dict]], batch: int, rounds: int) -> list[float]:
    entries = [Entry(f"{t}-{i}", 0, ev["event_id"], t, "1", ev, 1, ev["event_type"])
               for i, (t, ev) in enumerate(events)]
    batches = [entries[i:i + batch] for i in range(0, len(entries), batch)]
    rates = []
    for _ in range(rounds):
        h = load_handler("risk", {"idle_after_seconds": 0, "log_alerts": False}, task.Clock())
        h.bind_redis(InstantRedis(), KEYS)
        started = time.perf_counter()
        for b in batches:
            h.handle(b)
        rates.append(len(entries) / (time.perf_counter() - started))
    return rates


def fill(port: int, events: list[tuple[int, dict]], chunk: int = 10_000) -> None:
    import hiredis

    from tests.support.redis import _encode_command

    key = KEYS.events(0)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        reader = hiredis.Reader()
        for base in range(0, len(events), chunk):
            part = events[base:base + chunk]
            sock.sendall(b"".join(
                _encode_command(("XADD", key, "*", "v", "1", "event_id", ev["event_id"], "type", ev["event_type"],
                                 "received_at", str(t), "data", json.dumps(ev, sort_keys=True, separators=(",", ":"))))
                for t, ev in part))
            got = 0
            while got < len(part):
                reader.feed(sock.recv(1 << 20))
                while (reply := reader.gets()) is not False:
                    if isinstance(reply, hiredis.ReplyError):
                        raise RuntimeError(f"XADD failed: {reply}")
                    got += 1


def bench_runtime(events: list[tuple[int, dict]], batch: int) -> tuple[float, float, str]:
    from tests.support.redis import RedisProcess, find_redis_binaries

    binaries = find_redis_binaries()
    binary = binaries.get("7") or binaries.get("6.2")
    if binary is None:
        raise SystemExit("no redis-server binary found")
    server = RedisProcess(binary)
    result: dict = {}
    try:
        fill(server.port, events)
        server.sync_command("XGROUP", "CREATE", KEYS.events(0), "risk", "0")

        async def run() -> None:
            target = parse_redis_url(server.url)
            redis = connect(target, 2, 5.0, 30.0)
            metrics = Metrics()
            config = ConsumerConfig(name="risk", group="risk", handler="risk", batch_size=batch, block_ms=1000,
                                    consumer_name="bench-1")
            handler = load_handler("risk", {"idle_after_seconds": 0, "log_alerts": False}, reactor)
            handler.bind_metrics(metrics, "risk")
            handler.bind_redis(redis, KEYS)
            acked = metrics.consumers.acked.labels(consumer="risk", group="risk")
            service = ConsumerService(config, handler, redis, lambda: open_read_connection(target, 1000), KEYS, 1,
                                      metrics.consumers, reactor)
            cpu0, started = time.process_time(), time.monotonic()
            service.startService()
            while acked._value.get() < len(events):
                await task.deferLater(reactor, 0.05, lambda: None)
            result["elapsed"] = time.monotonic() - started
            result["cpu"] = time.process_time() - cpu0
            await service.stopService()
            await redis.disconnect()

        try:
            task.react(lambda _: defer.ensureDeferred(run()))
        except SystemExit as e:
            if e.code not in (0, None):
                raise
        return result["elapsed"], result["cpu"], server.version
    finally:
        server.cleanup()


def time_to_alert(seed: int) -> float | None:
    """Stream seconds from the 5% -> 40% spike to stripe's failure_rate_spike alert (None: no alert in 30 s)."""
    rng = random.Random(seed)
    e = RiskEngine()
    rates = {"stripe": 1000, "adyen": 300, "checkout": 100}
    spike_at = T0 + 300_000 + rng.randrange(1000)
    n = 0
    for second in range(330):
        for p, rate in rates.items():
            for j in range(rate):
                t = T0 + second * 1000 + j * 1000 // rate
                fail = 0.40 if p == "stripe" and t >= spike_at else 0.05
                failed = rng.random() < fail
                n += 1
                e.observe({"processor": p, "merchant_id_hash": f"mer_{rng.randrange(2000):06d}",
                           "geo_bucket": GEOS[n % 5], "payment_intent_id_hash": f"pi_{n:012d}",
                           "event_type": "payment_failed" if failed else "payment_succeeded",
                           **({"failure_category": CATEGORIES[n % 4], "failure_origin": ORIGINS[n % 3]}
                              if failed else {})}, t)
        for tr in e.take():
            if tr.action == OPEN and tr.alert.type == FAILURE_RATE_SPIKE and tr.alert.key_text == "processor=stripe":
                return (tr.at_ms - spike_at) / 1000
    return None


HEALTH_RATES = {"stripe": 300, "adyen": 150, "checkout": 60}
HEALTH_GEOS = ("US", "EU-west", "GB", "BR", "IN")
HEALTH_CATEGORIES = ("insufficient_funds", "do_not_honor", "processor_timeout", "fraud_suspected")
INCIDENTS = ("failure_spike", "retry_storm", "timeout_cluster")


def _health_second(rng: random.Random, e: RiskEngine, t0: int, p: str, rate: int, incident: str | None,
                   count: list[int]) -> None:
    """One stream second of ``p``'s traffic (jittered ±20%), with ``incident`` if not None:
    failure_spike 5% -> 25% failures; retry_storm 3% -> 25% retries, 70% of them failing;
    timeout_cluster 8 points of extra failures, all processor_timeout."""
    jitter = rng.uniform
    n = max(1, round(rate * jitter(0.8, 1.2)))
    fail = 0.05 * jitter(0.8, 1.2)
    retry = 0.03 * jitter(0.8, 1.2)
    retry_fail = fail
    extra_timeouts = 0.0
    if incident == "failure_spike":
        fail = 0.25
    elif incident == "retry_storm":
        retry, retry_fail = 0.25, 0.7
    elif incident == "timeout_cluster":
        extra_timeouts = 0.08
    step = 1000 / n
    for j in range(n):
        count[0] += 1
        i = count[0]
        is_retry = rng.random() < retry
        u = rng.random()
        failed = u < (retry_fail if is_retry else fail) + extra_timeouts
        ev = {"event_type": "payment_failed" if failed else "payment_succeeded", "processor": p,
              "merchant_id_hash": f"mer_{min(int(rng.paretovariate(1.2)), 5000):05d}",
              "geo_bucket": HEALTH_GEOS[int(rng.random() * 5)], "payment_intent_id_hash": f"pi_{i:010d}",
              "retry_count": 1 if is_retry else 0}
        if is_retry:
            ev["retry_result"] = "failed" if failed else "success"
        if failed:
            timeout = u >= (retry_fail if is_retry else fail)  # one of the extra failures
            ev["failure_category"] = "processor_timeout" if timeout else HEALTH_CATEGORIES[i % 4]
            ev["failure_origin"] = "processor" if timeout else "issuer"
        e.observe(ev, t0 + int(j * step))


def health_run(seed: int, kind: str, steady: int, length: int) -> tuple[float | None, int, float, float]:
    """``(seconds to band >= high on the incident's processor or None, false alarms, steady seconds
    measured, highest score of any processor in them)``."""
    rng = random.Random(seed * 7919 + INCIDENTS.index(kind))
    e = RiskEngine()
    health = e.health
    assert health is not None
    target = rng.choice(list(HEALTH_RATES))
    start_ms = T0 + steady * 1000 + rng.randrange(1000)
    warmup = health.config.warmup_seconds
    count = [0]
    alarms = 0
    worst = 0.0
    hot: set[str] = set()
    for second in range(steady + length + 1):
        t0 = T0 + second * 1000
        for p, rate in HEALTH_RATES.items():
            # the incident starts inside its first second: that second is part normal, part incident
            if p == target and second == steady:
                cut = start_ms - t0
                _health_second(rng, e, t0, p, round(rate * cut / 1000), None, count)
                _health_second(rng, e, start_ms, p, round(rate * (1000 - cut) / 1000), kind, count)
            else:
                _health_second(rng, e, t0, p, rate, kind if p == target and second > steady else None, count)
        e.advance(t0 + 1000)  # closes this second; health.results is as of its end
        now = {p for p, r in health.results.items() if r["band"] in ("high", "critical")}
        if warmup <= second < steady:
            alarms += len(now - hot)
            worst = max([worst] + [r["score"] for r in health.results.values()])
        elif second >= steady and target in now:
            return (t0 + 1000 - start_ms) / 1000, alarms, steady - warmup, worst
        hot = now
    return None, alarms, steady - warmup, worst


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))]


def bench_health(seeds: int, steady: int, length: int) -> None:
    total_alarms = 0
    total_seconds = 0.0
    worst = 0.0
    started = time.perf_counter()
    print(f"health: {seeds} seeds x {len(INCIDENTS)} incident kinds, {steady} s steady + {length} s incident, "
          f"3 processors at {'/'.join(str(r) for r in HEALTH_RATES.values())} events/s")
    for kind in INCIDENTS:
        delays = []
        for seed in range(seeds):
            delay, alarms, seconds, top = health_run(seed, kind, steady, length)
            worst = max(worst, top)
            total_alarms += alarms
            total_seconds += seconds
            if delay is not None:
                delays.append(delay)
        if delays:
            print(f"health {kind:16s}: detected {len(delays)}/{seeds} ({len(delays) / seeds:.0%}), time to band high "
                  f"median {statistics.median(delays):.2f} s, p90 {_pct(delays, 0.9):.2f} s, max {max(delays):.2f} s")
        else:
            print(f"health {kind:16s}: detected 0/{seeds}")
    hours = total_seconds / 3600
    print(f"health false alarms: {total_alarms} in {hours:.2f} h of steady traffic (3 processors) = "
          f"{total_alarms / hours if hours else 0:.2f} per hour; highest steady score {worst:.4f} "
          f"({time.perf_counter() - started:.0f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--rate", type=int, default=5000, help="events per second of stream time")
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runtime-events", type=int, default=200_000)
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--health-seeds", type=int, default=20, help="processor health seeds (0: skip)")
    parser.add_argument("--steady-seconds", type=int, default=300, help="steady traffic before each incident")
    parser.add_argument("--incident-seconds", type=int, default=60)
    args = parser.parse_args()
    print(f"command: python bench/risk.py --events {args.events} --rate {args.rate} --batch {args.batch} "
          f"--rounds {args.rounds} --runtime-events {args.runtime_events} --seeds {args.seeds} "
          f"--health-seeds {args.health_seeds} --steady-seconds {args.steady_seconds} "
          f"--incident-seconds {args.incident_seconds}")
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cpus")
    events = traffic(args.events, args.rate)
    span = (events[-1][0] - events[0][0]) / 1000
    print(f"traffic: {len(events):,} events over {span:,.0f} s of stream time")

    rates = bench_engine(events, args.rounds)
    print(f"engine : best {max(rates):,.0f} events/s, median {statistics.median(rates):,.0f} ({args.rounds} rounds)")
    rates = bench_handler(events, args.batch, args.rounds)
    print(f"handler: best {max(rates):,.0f} events/s, median {statistics.median(rates):,.0f} "
          f"(batches of {args.batch}, {args.rounds} rounds)")
    if args.runtime_events:
        part = events[:args.runtime_events]
        elapsed, cpu, version = bench_runtime(part, args.batch)
        print(f"runtime: {len(part):,} entries drained in {elapsed:.2f}s: {len(part) / elapsed:,.0f} events/s "
              f"(redis-server {version}, consumer CPU {cpu / elapsed:.0%} of one core)")
    delays = [time_to_alert(seed) for seed in range(args.seeds)]
    found = sorted(d for d in delays if d is not None)
    missed = len(delays) - len(found)
    if found:
        print(f"time-to-alert (5% -> 40% at 1,000 events/s, {args.seeds} seeds): min {found[0]:.3f} s, "
              f"median {statistics.median(found):.3f} s, max {found[-1]:.3f} s, missed {missed}")
    else:
        print(f"time-to-alert: no alert in any of {args.seeds} seeds")
    if args.health_seeds:
        bench_health(args.health_seeds, args.steady_seconds, args.incident_seconds)


if __name__ == "__main__":
    main()
