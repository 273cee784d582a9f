"""
Log lines a node writes while its Redis is down under load (issue 12, "log volume under faults").

Starts its own redis-server (free port) and ``payflux serve`` against it (JSON logs to a file),
drives ``--producers`` threads posting single events, kills Redis for ``--outage`` seconds, starts
it again, and counts the lines written during the outage: once with the default
``log_summary_interval`` (10 s) and once with ``--log-summary-interval 0`` (every line, as before
summarising).  Prints one line per run and a JSON summary.

    .venv/bin/python bench/log_volume.py --outage 60 --producers 16
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from payflux.cli import sample_event  # noqa: E402
from tests.support.process import PAYFLUX, clean_env, http_request  # noqa: E402
from tests.support.redis import RedisProcess, find_redis_binaries, free_port  # noqa: E402

SECRET = "log-volume-bench-secret-0123456789"
AUTH = {"Content-Type": "application/json", "Authorization": f"Bearer {SECRET}"}


class _Case:
    """The bits of a TestCase RedisProcess wants (cleanups run at the end)."""

    def __init__(self) -> None:
        self.cleanups: list = []

    def addCleanup(self, f, *args, **kwargs) -> None:
        self.cleanups.append((f, args, kwargs))

    def run_cleanups(self) -> None:
        while self.cleanups:
            f, args, kwargs = self.cleanups.pop()
            try:
                f(*args, **kwargs)
            except Exception:  # noqa: BLE001 - best effort at the end of a bench
                pass


def run(binary: str, outage: float, producers: int, interval: str) -> dict:
    case = _Case()
    work = tempfile.mkdtemp(prefix="payflux-logvol-")
    try:
        redis = RedisProcess(binary, testcase=case)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        log_path = os.path.join(work, "node.log")
        log = open(log_path, "wb")
        proc = subprocess.Popen(
            [*PAYFLUX, "serve", "--listen", f"tcp:{port}:interface=127.0.0.1", "--metrics-listen", "none",
             "--redis-url", redis.url, "--api-keys", f"bench:{SECRET}", "--log-summary-interval", interval],
            stdout=log, stderr=subprocess.STDOUT, cwd=work, env=clean_env())
        deadline = time.monotonic() + 20
        while True:
            try:
                if http_request(base + "/ready", timeout=1)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit("node did not become ready")
            time.sleep(0.05)

        statuses: collections.Counter = collections.Counter()
        lock = threading.Lock()
        stop = threading.Event()

        def load() -> None:
            n = 0
            while not stop.is_set():
                n += 1
                try:
                    status = http_request(base + "/v1/events/payment_exhaust",
                                          json.dumps(sample_event()).encode(), AUTH)[0]
                except OSError:
                    status = "error"
                with lock:
                    statuses[status] += 1

        threads = [threading.Thread(target=load, daemon=True) for _ in range(producers)]
        for t in threads:
            t.start()
        time.sleep(2)
        before = len(open(log_path, "rb").read().splitlines())
        at_kill = dict(statuses)
        redis.kill()
        time.sleep(outage)
        during = len(open(log_path, "rb").read().splitlines()) - before
        answered = {k: v - at_kill.get(k, 0) for k, v in statuses.items()}
        redis.start()
        time.sleep(3)
        stop.set()
        for t in threads:
            t.join(10)
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        log.close()
        return {"log_summary_interval": interval, "outage_s": outage, "producers": producers,
                "lines_during_outage": during, "answers_during_outage": answered}
    finally:
        case.run_cleanups()
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--outage", type=float, default=60.0, help="seconds Redis stays down")
    parser.add_argument("--producers", type=int, default=16)
    parser.add_argument("--redis", default="7", help="redis-server version to use (7 or 6.2)")
    args = parser.parse_args()
    binaries = find_redis_binaries()
    binary = binaries.get(args.redis) or binaries.get("6.2") or sys.exit("no redis-server binary")
    results = []
    for interval in ("10", "0"):
        result = run(binary, args.outage, args.producers, interval)
        print(f"log_summary_interval={interval}: {result['lines_during_outage']} lines in {args.outage:.0f} s "
              f"of outage, answers {result['answers_during_outage']}", flush=True)
        results.append(result)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
