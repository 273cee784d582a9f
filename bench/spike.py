"""
Spike and soak runs behind PROOF-load-test.md ("Spike" and "Soak").

Starts its own redis-server (free port, persistence off) and one PayFlux node running ingest
*and* a consumer (built-in ``noop`` handler, its own group) with retention on, then offers an
open-loop load of batch requests at a fixed event rate from client threads:

  spike: ``--base`` events/s for ``--before`` s, 10x that for ``--spike`` s, base again for
         ``--after`` s; every second it records acknowledged events/s, XLEN, the group's lag
         and pending count, and the node's RSS; writes ``spike.csv`` and ``spike.png``.
  soak:  ``--base`` events/s for ``--soak`` s, sampling RSS every 5 s; writes ``soak.csv`` and
         prints min/max RSS and the drift between the first and last minute.

Every loop is bounded in time; all traffic goes to 127.0.0.1.

    python bench/spike.py spike --base 2000 --before 20 --spike 30 --after 40
    python bench/spike.py soak --base 2000 --soak 300
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from tests.support.redis import RedisProcess, find_redis_binaries, free_port  # noqa: E402

SECRET = "bench-" + secrets.token_hex(12)
BATCH = 50  # events per request


def _event(n: int, run: str) -> bytes:
    """A seed-shaped event (docs/events.md): the seed's 15 fields (failure fields only on
    failures) plus currency."""
    failed = n % 10 == 0
    event = {
        "event_type": "payment_failed" if failed else "payment_succeeded",
        "event_timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "event_id": f"sp_{run}_{n}",
        "merchant_id_hash": f"m_{n % 97:04d}_Q2xvdWRz",
        "payment_intent_id_hash": f"pi_{run}_{n}_aB",
        "processor": ("stripe", "adyen", "braintree", "checkout")[n % 4],
        "retry_count": n % 3,
        "geo_bucket": "US",
        "amount_bucket": "10-50",
        "system_source": "checkout_api",
        "payment_method_bucket": "credit_card",
        "channel": "web",
        "retry_result": "failed" if failed else "success",
        "currency": "USD",
    }
    if failed:
        event.update(failure_category="insufficient_funds", failure_origin="issuer")
    return json.dumps(event).encode()


class Load:
    """Open-loop batch sender: keeps ``rate`` events/s regardless of response time (threads)."""

    def __init__(self, port: int, threads: int = 8):
        self.port = port
        self.rate = 0.0
        self.run = secrets.token_hex(4)
        self.counter = 0
        self.lock = threading.Lock()
        self.acked = 0
        self.errors = 0
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._worker, daemon=True) for _ in range(threads)]
        self.started = time.monotonic()
        self.sent_requests = 0

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def _next_batch(self) -> bytes | None:
        with self.lock:
            if self.rate <= 0:
                return None
            # Requests due so far at the current rate (open loop: based on time, not replies).
            due = int((time.monotonic() - self.started) * self.rate / BATCH)
            if self.sent_requests >= due:
                return None
            self.sent_requests += 1
            first, self.counter = self.counter, self.counter + BATCH
        return b"\n".join(_event(n, self.run) for n in range(first, first + BATCH))

    def set_rate(self, rate: float) -> None:
        with self.lock:
            self.started = time.monotonic()
            self.sent_requests = 0
            self.rate = rate

    def _worker(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        while not self.stop.is_set():
            body = self._next_batch()
            if body is None:
                time.sleep(0.002)
                continue
            try:
                conn.request("POST", "/v1/events/payment_exhaust/batch", body,
                             {"Content-Type": "application/x-ndjson", "Authorization": f"Bearer {SECRET}"})
                response = conn.getresponse()
                response.read()
                with self.lock:
                    if response.status == 202:
                        self.acked += BATCH
                    else:
                        self.errors += 1
            except OSError:
                with self.lock:
                    self.errors += 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _group_facts(redis: RedisProcess) -> tuple[int, int]:
    """(lag, pending) of the bench group, computed from XINFO GROUPS / XPENDING (works on 6.2)."""
    length = redis.sync_command("XLEN", "payflux:{0}:events")
    groups = redis.sync_command("XINFO", "GROUPS", "payflux:{0}:events")
    for g in groups:
        info = dict(zip(g[::2], g[1::2]))
        if info.get(b"name") == b"bench":
            pending = info[b"pending"]
            if info.get(b"lag") is not None:  # Redis 7 reports it
                return info[b"lag"], pending
            last = info[b"last-delivered-id"].decode()
            after = redis.sync_command("XRANGE", "payflux:{0}:events", "(" + last, "+", "COUNT", "200000")
            return len(after), pending
    return length, 0


def start_node(redis: RedisProcess, out: str, retention_max_length: int) -> tuple[subprocess.Popen, int]:
    port = free_port()
    config = os.path.join(out, "bench.toml")
    with open(config, "w") as f:
        f.write(
            'roles = ["ingest", "consumers"]\n'
            f"retention_max_length = {retention_max_length}\nretention_interval = 2.0\nrate_limit = 0\n"
            '[[consumers]]\nname = "drain"\ngroup = "bench"\nhandler = "noop"\nbatch_size = 500\n'
        )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAYFLUX_")}
    env["PAYFLUX_API_KEYS"] = f"bench:{SECRET}"
    log = open(os.path.join(out, "payflux.log"), "wb")
    proc = subprocess.Popen(
        [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=", "payflux",
         "--config", config, "--listen", f"tcp:{port}:interface=127.0.0.1", "--metrics-listen", "none",
         "--redis-url", redis.url],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            c.request("GET", "/ready")
            if c.getresponse().status == 200:
                return proc, port
        except OSError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("payflux did not become ready; see " + log.name)


def spike(args, redis, proc, load, out) -> None:
    phases = [(args.before, args.base), (args.spike, args.base * 10), (args.after, args.base)]
    rows = []
    t0 = time.monotonic()
    last_acked = 0
    for duration, rate in phases:
        load.set_rate(rate)
        end = time.monotonic() + duration
        while time.monotonic() < end:
            time.sleep(1.0)
            with load.lock:
                acked, errors = load.acked, load.errors
            lag, pending = _group_facts(redis)
            rows.append((round(time.monotonic() - t0, 1), rate, acked - last_acked, errors,
                         redis.sync_command("XLEN", "payflux:{0}:events"), lag, pending, _rss_kb(proc.pid)))
            last_acked = acked
            print("t={:5.1f}s offered={:6.0f}/s acked={:6d}/s errors={} xlen={} lag={} pending={} rss={}MB".format(
                *rows[-1][:7], rows[-1][7] // 1024), flush=True)
    path = os.path.join(out, "spike.csv")
    with open(path, "w") as f:
        f.write("t_s,offered_events_per_s,acked_events_per_s,errors_total,xlen,group_lag,group_pending,rss_kb\n")
        for r in rows:
            f.write(",".join(map(str, r)) + "\n")
    _plot(rows, os.path.join(out, "spike.png"), args)
    print("wrote", path, "and", os.path.join(out, "spike.png"))


def _plot(rows, path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [r[0] for r in rows]
    fig, (a, b) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    a.plot(t, [r[1] for r in rows], "--", label="offered events/s")
    a.plot(t, [r[2] for r in rows], label="acknowledged (202) events/s")
    a.set_ylabel("events/s")
    a.legend(loc="upper right")
    a.set_title(f"PayFlux spike: {args.base:g} -> {args.base * 10:g} events/s for {args.spike:g} s (1 process + consumer)")
    b.plot(t, [r[4] for r in rows], label="stream length (XLEN)")
    b.plot(t, [r[5] for r in rows], label="consumer group lag")
    b.set_ylabel("entries")
    b.set_xlabel("seconds")
    b.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def soak(args, redis, proc, load, out) -> None:
    load.set_rate(args.base)
    rows = []
    t0 = time.monotonic()
    end = t0 + args.soak
    while time.monotonic() < end:
        time.sleep(5.0)
        with load.lock:
            acked, errors = load.acked, load.errors
        rows.append((round(time.monotonic() - t0, 1), acked, errors, redis.sync_command("XLEN", "payflux:{0}:events"),
                     _rss_kb(proc.pid)))
        print("t={:5.1f}s acked={} errors={} xlen={} rss={}kB".format(*rows[-1]), flush=True)
    with open(os.path.join(out, "soak.csv"), "w") as f:
        f.write("t_s,acked_total,errors_total,xlen,rss_kb\n")
        for r in rows:
            f.write(",".join(map(str, r)) + "\n")
    rss = [r[4] for r in rows]
    first = [r[4] for r in rows if r[0] <= 60] or rss[:1]
    last = [r[4] for r in rows if r[0] >= rows[-1][0] - 60] or rss[-1:]
    drift = (sum(last) / len(last)) / (sum(first) / len(first)) - 1
    print(f"soak: {rows[-1][1]} events acknowledged in {rows[-1][0]:.0f}s, errors {rows[-1][2]}, "
          f"RSS min {min(rss) // 1024} MB max {max(rss) // 1024} MB, first-minute -> last-minute drift {drift:+.1%}, "
          f"XLEN max {max(r[3] for r in rows)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["spike", "soak"])
    parser.add_argument("--base", type=float, default=1000, help="events/s offered outside the spike")
    parser.add_argument("--before", type=float, default=20)
    parser.add_argument("--spike", type=float, default=30)
    parser.add_argument("--after", type=float, default=40)
    parser.add_argument("--soak", type=float, default=300)
    parser.add_argument("--retention-max-length", type=int, default=200_000)
    parser.add_argument("--redis", choices=["6.2", "7"], default="7")
    parser.add_argument("--out", default=os.path.join(HERE, "results", time.strftime("%Y%m%d-%H%M%S") + "-spike"))
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    binary = find_redis_binaries().get(args.redis) or sys.exit(f"no redis-server {args.redis}")
    redis = RedisProcess(binary)
    proc = None
    try:
        proc, port = start_node(redis, args.out, args.retention_max_length)
        load = Load(port)
        load.start()
        (spike if args.mode == "spike" else soak)(args, redis, proc, load, args.out)
        load.stop.set()
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        redis.cleanup()


if __name__ == "__main__":
    main()
