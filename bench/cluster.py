#!/usr/bin/env python3
"""PayFlux on one Redis vs on a 3-master Redis Cluster, same machine, same run.

    python bench/cluster.py [--duration 20] [--partitions 12] [--workers 1] [--masters 3]
                            [--batch-size 500] [--batch-connections 8] [--connections 64]

For each backend in turn -- ONE redis-server, then ``--masters`` redis-servers joined with
``redis-cli --cluster create`` (persistence off on all of them, as in bench/run.py) -- it starts
``twistd payflux`` with ``--partitions`` partitions and ``--redis-url`` pointing at the backend,
runs the contract smoke checks, warms up, then measures wrk batch-of-``--batch-size`` and
single-event load (bench/wrk/*.lua, the same scripts as bench/run.py). Recorded per phase:
events/s, p50/p99, non-2xx, the CPU of PayFlux and of every redis-server, and how the
appended entries spread over the masters (XLEN of every partition on the node that owns it;
their sum must equal the events wrk saw accepted, or the run says so). Raw outputs go to
bench/results/cluster-<timestamp>/.

On a 2-core machine the Redis side is not what limits PayFlux (see PROOF-load-test.md), so
this shows what cluster routing costs and that load spreads, not a speed-up; the speed-up
needs cores for the extra masters and workers.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.run import (  # noqa: E402
    BENCH, HOST, REPO, HttpTarget, find_redis_binary, fmt_ms, fmt_num, machine_info, run_wrk, smoke,
    tree_cpu, wait_quiet,
)
from payflux.redis.slots import key_slot  # noqa: E402


def cluster_port() -> int:
    """A free port <= 55535 whose cluster bus port (+10000) is free too."""
    import random
    import socket

    while True:
        port = random.randint(20000, 55535)
        with socket.socket() as a, socket.socket() as b:
            try:
                a.bind((HOST, port))
                b.bind((HOST, port + 10000))
            except OSError:
                continue
        return port


class Backend:
    """One redis-server, or ``masters`` of them joined into a cluster; persistence off."""

    def __init__(self, masters: int, outdir: Path):
        self.masters = masters
        self.binary = find_redis_binary("redis-server")
        self.dir = Path(tempfile.mkdtemp(prefix="payflux-bench-cluster-"))
        self.ports = [cluster_port() for _ in range(max(1, masters))]
        self.procs: list[subprocess.Popen] = []
        self.outdir = outdir

    @property
    def cluster(self) -> bool:
        return self.masters > 1

    @property
    def url(self) -> str:
        if self.cluster:
            return "redis+cluster://" + ",".join(f"{HOST}:{p}" for p in self.ports)
        return f"redis://{HOST}:{self.ports[0]}/0"

    def start(self) -> None:
        for port in self.ports:
            d = self.dir / str(port)
            d.mkdir()
            cmd = [self.binary, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no",
                   "--dir", str(d), "--logfile", str(d / "redis.log"), "--maxclients", "10000"]
            if self.cluster:
                cmd += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
            self.procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                               start_new_session=True))
        for port in self.ports:
            client = redis.Redis(host=HOST, port=port, socket_timeout=5)
            for _ in range(300):
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    time.sleep(0.05)
            else:
                raise SystemExit(f"redis-server on {port} did not answer PING")
        if self.cluster:
            cli = find_redis_binary("redis-cli")
            out = subprocess.run([cli, "--cluster", "create", *[f"{HOST}:{p}" for p in self.ports],
                                  "--cluster-replicas", "0", "--cluster-yes"],
                                 capture_output=True, text=True, timeout=60)
            (self.outdir / "cluster-create.txt").write_text(out.stdout + out.stderr)
            if out.returncode != 0:
                raise SystemExit("redis-cli --cluster create failed; see cluster-create.txt")
            for _ in range(600):
                if all(b"cluster_state:ok" in redis.Redis(host=HOST, port=p).execute_command("CLUSTER", "INFO")
                       for p in self.ports):
                    break
                time.sleep(0.05)
            else:
                raise SystemExit("cluster did not reach cluster_state:ok")

    def clients(self) -> list[redis.Redis]:
        return [redis.Redis(host=HOST, port=p, socket_timeout=10) for p in self.ports]

    def cpu(self) -> dict[int, float]:
        out = {}
        for port, c in zip(self.ports, self.clients()):
            info = c.info("cpu")
            out[port] = float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
        return out

    def owner(self, key: str) -> int:
        if not self.cluster:
            return self.ports[0]
        slot = key_slot(key)
        for start, end, master, *_ in self.clients()[0].execute_command("CLUSTER", "SLOTS"):
            if start <= slot <= end:
                return int(master[1])
        raise LookupError(slot)

    def lengths(self, partitions: int) -> dict[int, int]:
        """entries per master port, summed over the partitions it owns."""
        by_port = {p: 0 for p in self.ports}
        clients = dict(zip(self.ports, self.clients()))
        for p in range(partitions):
            key = f"payflux:{{{p}}}:events"
            port = self.owner(key)
            by_port[port] += clients[port].xlen(key)
        return by_port

    def flush(self) -> None:
        for c in self.clients():
            c.flushall()

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def payflux_target(args, backend: Backend, secret: str) -> HttpTarget:
    port = cluster_port()
    twistd = shutil.which("twistd", path=os.path.dirname(sys.executable)) or "twistd"
    cmd = [twistd, "-n", "--pidfile=", "payflux", "--listen", f"tcp:{port}:interface={HOST}",
           "--metrics-listen", f"tcp:0:interface={HOST}", "--redis-url", backend.url,
           "--api-keys", f"bench:{secret}", "--rate-limit", "0", "--partitions", str(args.partitions)]
    if args.workers != 1:
        cmd += ["--workers", str(args.workers)]
    name = f"payflux-{'cluster' + str(backend.masters) if backend.cluster else 'single'}"
    return HttpTarget(name=name, port=port, stream="payflux:{0}:events", cmd=cmd,
                      env={**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")})


def measure(args, backend: Backend, secret: str, outdir: Path) -> list[dict]:
    backend.flush()
    target = payflux_target(args, backend, secret)
    env = {**os.environ, "BENCH_API_KEY": secret, "BENCH_BATCH_SIZE": str(args.batch_size),
           "BENCH_OCCURRED_AT": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    rows = []
    print(f"== {target.name}: {backend.url}", flush=True)
    target.start(outdir, secret)
    try:
        target.wait_ready()
        failed = [c for c in smoke(target, secret) if not c["ok"]]
        if failed:
            raise RuntimeError(f"smoke checks failed: {failed}")
        run_wrk("single.lua", target.base, 1, args.connections, args.warmup,
                {**env, "BENCH_NONCE": f"w{int(time.time())}"}, outdir / f"{target.name}-warmup.txt")
        for mode in ("batch", "single"):
            wait_quiet(args.quiet_wait)
            before = sum(backend.lengths(args.partitions).values())
            c0, t0 = backend.cpu(), tree_cpu(target.proc.pid)
            conns = args.batch_connections if mode == "batch" else args.connections
            res = run_wrk("batch.lua" if mode == "batch" else "single.lua", target.base, 1, conns, args.duration,
                          {**env, "BENCH_NONCE": f"{mode[0]}{int(time.time() * 1000) % 10**9}"},
                          outdir / f"{target.name}-{mode}-wrk.txt")
            c1, t1 = backend.cpu(), tree_cpu(target.proc.pid)
            time.sleep(0.5)
            spread = backend.lengths(args.partitions)
            secs, wall = res["duration_us"] / 1e6, res["wrk_wall_s"]
            ok = sum(v for k, v in res["status_counts"].items() if 200 <= int(k) < 300)
            appended = sum(spread.values()) - before
            row = {
                "target": target.name, "mode": mode if mode == "single" else f"batch×{args.batch_size}",
                "connections": conns, "events_per_s": ok * res["events_per_request"] / secs,
                "p50_us": res["lat_p50_us"], "p99_us": res["lat_p99_us"], "non2xx": res["non2xx"],
                "accepted_events": res["accepted_events"], "appended": appended,
                "payflux_cpu": (t1 - t0) / wall,
                "redis_cpu": {str(p): (c1[p] - c0[p]) / wall for p in backend.ports},
                "spread": {str(p): n for p, n in spread.items()},
            }
            # wrk stops with requests in flight: those are appended but not counted as accepted
            in_flight = conns * res["events_per_request"]
            row["check"] = "ok" if 0 <= appended - res["accepted_events"] <= in_flight else \
                f"MISMATCH: appended {appended}, accepted {res['accepted_events']}"
            print(f"   {mode}: {fmt_num(row['events_per_s'])} events/s p50 {fmt_ms(row['p50_us'])} "
                  f"p99 {fmt_ms(row['p99_us'])} non-2xx {row['non2xx']} redis cpu "
                  f"{', '.join(f'{v:.2f}' for v in row['redis_cpu'].values())} ({row['check']})", flush=True)
            rows.append(row)
            (outdir / f"{target.name}-{mode}.json").write_text(json.dumps({**res, **row}, indent=2))
    finally:
        target.stop()
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| target | mode | conns | events/s | p50 | p99 | non-2xx | PayFlux CPU | Redis CPU per master | "
             "entries per master | appended vs accepted |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['target']} | {r['mode']} | {r['connections']} | {fmt_num(r['events_per_s'])} | "
            f"{fmt_ms(r['p50_us'])} | {fmt_ms(r['p99_us'])} | {r['non2xx']} | {r['payflux_cpu']:.2f} | "
            f"{' / '.join(f'{v:.2f}' for v in r['redis_cpu'].values())} | "
            f"{' / '.join(str(v) for v in r['spread'].values())} | {r['check']} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--partitions", type=int, default=12)
    ap.add_argument("--masters", type=int, default=3)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--batch-connections", type=int, default=8)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--quiet-wait", type=float, default=30)
    args = ap.parse_args()
    if not (1 <= args.duration <= 600 and 2 <= args.masters <= 9 and 1 <= args.partitions <= 1024):
        ap.error("--duration 1..600, --masters 2..9, --partitions 1..1024")
    if not shutil.which("wrk"):
        raise SystemExit("wrk not found: apt-get install -y wrk")
    outdir = BENCH / "results" / f"cluster-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / "machine.txt").write_text(machine_info())
    (outdir / "command.txt").write_text(" ".join([sys.executable] + sys.argv) + "\n")
    secret = secrets.token_urlsafe(24)
    rows: list[dict] = []
    for masters in (1, args.masters):
        backend = Backend(masters, outdir)
        try:
            backend.start()
            rows += measure(args, backend, secret, outdir)
        finally:
            backend.stop()
    md = table(rows)
    (outdir / "table.md").write_text(md)
    (outdir / "rows.json").write_text(json.dumps(rows, indent=2))
    print("\n" + md + f"raw outputs: {outdir}")
    return 0 if all(r["check"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
