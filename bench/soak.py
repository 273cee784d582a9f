#!/usr/bin/env python3
"""Soak: PayFlux's memory over a long single-event load (issue 14, target 6).

    python bench/soak.py [--minutes 10] [--connections 16] [--sample 10] [--workers 1]

Starts a throw-away redis-server and PayFlux exactly as bench/run.py does (persistence off,
``--stream-prefix payflux``), measures the peak single-event rate with the Go seed's wrk
script for ``--probe`` seconds at 64 connections, then loads it for ``--minutes`` with
``--connections`` connections (pick them so the rate is ~80% of the peak; the report says
what share it was) while sampling the RSS of every PayFlux process (supervisor and workers)
every ``--sample`` seconds.  Reports the samples, the RSS after the first minute (warm) and at
the end, and the change between them in percent; raw outputs in bench/results/soak-<ts>/.
The stream grows by every event (nothing trims it during the soak) -- that is Redis memory,
not PayFlux's, and is reported separately.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.run import BENCH, SEED_SCRIPT, RedisServer, build_targets, process_tree, run_wrk  # noqa: E402


def rss_of_tree(pid: int) -> int:
    """RSS of PayFlux's processes (the supervisor and its workers; an embedded redis-server not counted)."""
    total = 0
    for p in process_tree(pid):
        try:
            if "redis-server" not in " ".join(p.cmdline()):
                total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--probe", type=int, default=15, help="seconds of the peak-rate probe (64 connections)")
    ap.add_argument("--sample", type=float, default=10, help="seconds between RSS samples")
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()
    if not SEED_SCRIPT.exists():
        raise SystemExit(f"needs the seed's wrk script at {SEED_SCRIPT}")
    out = BENCH / "results" / f"soak-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True)
    rs = RedisServer(out)
    rs.start()
    secret = secrets.token_hex(16)
    targets = build_targets(SimpleNamespace(go_peer=Path("/nonexistent"), workers=args.workers, payflux_arg=[],
                                            single_script="seed", seed_script=SEED_SCRIPT), rs, secret)
    target = targets["payflux"]
    target.start(out, secret)
    env = {**os.environ, "PAYFLUX_KEY": secret, "BENCH_API_KEY": secret, "BENCH_SEED_SCRIPT": str(SEED_SCRIPT),
           "WRK_PATH": "/v1/events/payment_exhaust"}
    url = target.base + "/v1/events/payment_exhaust"
    report: dict = {"command": " ".join(sys.argv), "samples": []}
    try:
        target.wait_ready()
        peak = run_wrk("seed.lua", url, 1, 64, args.probe, env, out / "probe.txt")
        report["peak_rps"] = peak["requests"] / (peak["duration_us"] / 1e6)
        samples = report["samples"]
        started = time.monotonic()
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                samples.append({"t": round(time.monotonic() - started, 1), "rss": rss_of_tree(target.proc.pid),
                                "redis_used_memory": rs.client.info("memory")["used_memory"]})
                stop.wait(args.sample)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        soak = run_wrk("seed.lua", url, 1, args.connections, int(args.minutes * 60), env, out / "soak.txt")
        stop.set()
        sampler.join()
        report["soak"] = soak
    finally:
        target.stop()
        rs.stop()
    rate = soak["requests"] / (soak["duration_us"] / 1e6)
    warm = next((s for s in samples if s["t"] >= 60), samples[0])
    last = samples[-1]
    report["rate_rps"] = rate
    report["warm_rss"] = warm["rss"]
    report["end_rss"] = last["rss"]
    report["rss_change_pct"] = 100.0 * (last["rss"] - warm["rss"]) / warm["rss"]
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    mb = 1024 * 1024
    print(f"command: {report['command']}")
    print(f"peak (64 connections, {args.probe} s): {report['peak_rps']:,.0f} req/s")
    print(f"soak ({args.connections} connections, {args.minutes:g} min): {rate:,.0f} req/s = "
          f"{100 * rate / report['peak_rps']:.0f}% of peak; non-2xx {soak['non2xx']}")
    for s in samples:
        print(f"  t={s['t']:6.1f}s  PayFlux RSS {s['rss'] / mb:7.1f} MB  redis used_memory {s['redis_used_memory'] / mb:8.1f} MB")
    print(f"RSS after the first minute {warm['rss'] / mb:.1f} MB, at the end {last['rss'] / mb:.1f} MB: "
          f"{report['rss_change_pct']:+.1f}%  (raw: {out})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
