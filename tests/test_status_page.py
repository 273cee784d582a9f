"""
The status page on the side port (``/status``, ``/status.json``; payflux/observability/status.py):
numbers equal to the traffic driven through a real node and to its /metrics, the risk
consumer's failure rates and alerts, Redis down, the ``--workers`` supervisor's summed view,
a self-contained page, and the page rendered by headless Chromium (DOM and screenshot).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import socket
import struct
import subprocess
import time
import urllib.error
import urllib.request
import zlib
from html.parser import HTMLParser

import txredisapi
from twisted.application.internet import TimerService
from twisted.internet import defer, protocol, reactor, task
from twisted.trial import unittest
from treq.testing import StubTreq

from payflux.cli import sample_event
from payflux.config import load_settings
from payflux.consumers.stats import GroupStatsSampler
from payflux.ingest.side import WorkersSideApp
from payflux.observability.metrics import Metrics, SupervisorMetrics, WorkerTotals
from payflux.observability.status import RateTracker, StatusPage, registry_families
from payflux.risk.alerts import Alert, Transition
from payflux.risk.store import AlertStore
from tests.support.consumers import wait_for
from tests.support.node import API_KEYS, API_SECRET, read_json, start_node
from tests.support.process import TWISTD, clean_env
from tests.support.redis import (RedisProcess, _encode_command, _RespReader, find_redis_binaries, free_port,
                                 redis_test_cases)

BATCH = "/v1/events/payment_exhaust/batch"
EVENTS = "payflux:{0}:events"
DLQ = "payflux:{0}:dlq"
ALERTS = "payflux:alerts"
CHROMIUM = shutil.which("chromium")

RECORDER = """
[[consumers]]
name = "rec"
group = "recorders"
handler = "tests.support.handlers:RecordingHandler"
block_ms = 200
max_deliveries = 2
min_idle_ms = 50
reclaim_interval = 0.1
options = { key = "%s", fail_types = ["payment_disputed"] }
"""

# Small windows and volumes (docs/risk.md, "Options") so a spike takes a few thousand entries.
RISK = """
[[consumers]]
name = "risk"
group = "risk"
handler = "risk"
block_ms = 200
batch_size = 500

[consumers.options]
idle_after_seconds = 0

[consumers.options.failure_rate]
window_seconds = 10
min_events = 50
warmup_seconds = 20

[consumers.options.retry_storm]
enabled = false

[consumers.options.failure_cluster]
enabled = false

[consumers.options.health]
min_events = 50
warmup_seconds = 20
"""


def node_config(key: str, risk: bool = False) -> str:
    return 'roles = ["ingest", "consumers"]\n' + RECORDER % key + (RISK if risk else "")


# --- driving traffic ---------------------------------------------------------------------------


def ndjson(events: list[dict]) -> str:
    return "\n".join(json.dumps(e) for e in events)


async def post_traffic(node) -> None:
    """20 good and 2 failing-to-handle events accepted, 1 request refused for auth, 1 for bad JSON."""
    events = [sample_event(n) for n in range(20)] + [sample_event(n, event_type="payment_disputed") for n in (20, 21)]
    response = await node.post(BATCH, ndjson(events), "application/x-ndjson")
    assert response.code == 202, response.code
    refused = await node.post(BATCH, ndjson(events[:1]), "application/x-ndjson", secret="wrong-secret-000000")
    assert refused.code == 401, refused.code
    assert (await node.post(BATCH, "{not json", "application/x-ndjson")).code == 400


def spike_events(t0: int) -> list[tuple[int, dict]]:
    """(received_at_ms, event) of one processor: 40 s at 5% failures, then 20 s at 60%, 50/s."""
    rng = random.Random(7)
    out = []
    for second in range(60):
        fail = 0.05 if second < 40 else 0.6
        for j in range(50):
            failed = rng.random() < fail
            out.append((t0 + second * 1000 + j * 20, {
                "event_id": f"evt_spike_{second}_{j}",
                "event_type": "payment_failed" if failed else "payment_succeeded",
                "event_timestamp": "2026-01-01T00:00:00.000Z", "processor": "stripe",
                "merchant_id_hash": f"mer_{rng.randrange(50):04d}", "payment_intent_id_hash": f"pi_{second}_{j}",
                "retry_count": 0,
            }))
    return out


def xadd_events(redis: RedisProcess, events: list[tuple[int, dict]]) -> None:
    """Pipelined XADDs of v1 entries whose ``received_at`` is the given stream time (docs/risk.md, "Time")."""
    payload = b"".join(
        _encode_command(("XADD", EVENTS, "*", "v", "1", "event_id", ev["event_id"], "type", ev["event_type"],
                         "received_at", str(t), "data", json.dumps(ev, sort_keys=True, separators=(",", ":"))))
        for t, ev in events
    )
    with socket.create_connection(("127.0.0.1", redis.port)) as sock:
        sock.sendall(payload)
        reader = _RespReader(sock)
        replies = [reader.read() for _ in events]
    assert all(isinstance(r, bytes) for r in replies), replies[:3]


async def inject_spike(node, redis: RedisProcess) -> None:
    """A failure spike the node's risk consumer turns into an open (escalated) failure_rate_spike
    alert: entries appended with the stream times of 40 s at 5% failures then 20 s at 60%, as
    tests/test_risk_handler.py does (paced real-time traffic would take the warm-up's minutes)."""
    counted = node.metrics.registry.get_sample_value
    before = counted("payflux_risk_events_total", {"consumer": "risk"}) or 0
    # stream time after anything already in the stream: a whole minute of it, in the future
    events = spike_events(int(time.time() * 1000) + 1000)
    xadd_events(redis, events)
    await wait_for(lambda: counted("payflux_risk_events_total", {"consumer": "risk"}) == before + len(events),
                   what="the risk consumer to count the spike")
    await wait_for(lambda: redis.sync_command("XPENDING", EVENTS, "risk")[0] == 0, what="risk entries acked")


async def wait_for_deferred(check, what: str, attempts: int = 60) -> None:
    """Until ``check()`` (a Deferred of a bool) is true, every 0.25 s, at most ``attempts`` times."""
    for _ in range(attempts):
        if await check():
            return
        await task.deferLater(reactor, 0.25, lambda: None)
    raise AssertionError(f"timed out waiting for {what}")


async def wait_health(node, band: str) -> dict:
    """status.json's processor health once the risk consumer's snapshot shows stripe in ``band``
    (it is written at most once a second, so the last batch's state shows within about one)."""
    found: dict = {}

    async def check() -> bool:
        doc = await status_json(node)
        health = (doc["risk"].get("loop") or {}).get("health") or {}
        found.update(health)
        return any(p["band"] == band for p in health.get("processors", []))

    # the status page caches the risk loop for 2 s: 60 looks of 0.25 s cover several refreshes
    await wait_for_deferred(lambda: defer.ensureDeferred(check()), what=f"a processor in band {band}")
    return found


def open_audit_group(redis: RedisProcess, read: int) -> None:
    """A group nobody consumes: created at the start, ``read`` entries delivered and never acked."""
    redis.sync_command("XGROUP", "CREATE", EVENTS, "audit", "0")
    redis.sync_command("XREADGROUP", "GROUP", "audit", "auditor", "COUNT", str(read), "STREAMS", EVENTS, ">")


async def sample_now(node, groups: bool = True) -> None:
    """Run the stream sampler (and the group sampler) once now instead of waiting for their timers."""
    for service in node.node:
        if isinstance(service, GroupStatsSampler) and groups:
            await service.sample_once()
        elif isinstance(service, TimerService):
            fn, args, kwargs = service.call
            await fn(*args, **kwargs)


async def status_json(node) -> dict:
    response = await node.get("/status.json", side=True)
    assert response.code == 200, response.code
    assert response.headers.getRawHeaders("content-type") == ["application/json"]
    return await read_json(response)


def stream_alerts(redis: RedisProcess) -> dict[str, dict]:
    """The open alerts according to the alerts stream itself: newest transition per alert_id."""
    latest: dict[str, dict] = {}
    for _, flat in redis.sync_command("XRANGE", ALERTS, "-", "+"):
        fields = {k.decode(): v.decode() for k, v in zip(flat[::2], flat[1::2])}
        if fields["v"] == "1":
            latest[fields["alert_id"]] = fields
    return {i: f for i, f in latest.items() if f["action"] in ("open", "escalate")}


def transition(action: str, key: str, severity: str, opened: int, at: int, reason: str = "threshold") -> Transition:
    alert = Alert("failure_rate_spike", (("processor", key),), severity, 10, opened, {"failure_rate": 0.3})
    return Transition(action, alert, at, reason, {"failure_rate": 0.42, "events": 500, "baseline_rate": 0.05})


# --- the node's status.json -----------------------------------------------------------------------


class StatusNodeMixin:
    async def test_status_json_matches_the_traffic_and_metrics(self):
        redis = self.start_redis()
        node = await start_node(self, redis.url, config_text=node_config(self.id()))
        first = await status_json(node)
        self.assertIsNone(first["ingest"]["events_per_second"])  # no earlier sample yet

        await post_traffic(node)
        await wait_for(lambda: redis.sync_command("XLEN", DLQ) == 2, what="the 2 failing events in the DLQ")
        await wait_for(lambda: redis.sync_command("XPENDING", EVENTS, "recorders")[0] == 0, what="recorders acked")
        open_audit_group(redis, read=3)
        await sample_now(node)
        doc = await status_json(node)

        ingest = doc["ingest"]
        self.assertEqual((ingest["events_accepted_total"], ingest["accepted_in_window"]), (22, 22))
        window = ingest["rate_window_seconds"]
        self.assertGreater(window, 0)
        self.assertLess(abs(ingest["events_per_second"] - 22 / window), 0.01 * 22 / window)  # window rounded to ms
        self.assertEqual(ingest["requests_rejected_total"], 2)
        self.assertEqual({r["reason"]: (r["requests"], r["events"]) for r in ingest["rejected"]},
                         {"unauthorized": (1, 0), "malformed_json": (1, 0)})
        self.assertEqual(doc["streams"], [{"partition": "0", "length": 22, "dlq_depth": 2}])
        self.assertEqual(doc["dlq_depth_total"], 2)
        groups = {(g["group"], g["partition"]): g for g in doc["groups"]}
        self.assertEqual((groups["audit", "0"]["lag"], groups["audit", "0"]["pending"]), (19, 3))
        self.assertIsNotNone(groups["audit", "0"]["oldest_pending_age_seconds"])
        self.assertEqual((groups["recorders", "0"]["lag"], groups["recorders", "0"]["pending"]), (0, 0))
        self.assertIsNone(groups["recorders", "0"]["oldest_pending_age_seconds"])
        [rec] = doc["consumers"]
        self.assertEqual((rec["consumer"], rec["group"], rec["processed_total"], rec["dead_lettered_total"]),
                         ("rec", "recorders", 20, 2))
        self.assertEqual((doc["mode"], doc["redis_up"], doc["draining"]), ("node", True, False))
        self.assertEqual((doc["risk"]["running"], doc["risk"]["processors"], doc["risk"]["active_alerts"]["total"]),
                         (False, [], None))
        self.assertEqual((doc["risk"]["alerts"]["status"], doc["risk"]["alerts"]["open"]), ("ok", []))

        # ... and they are what /metrics says
        metrics = (await (await node.get("/metrics", side=True)).text())
        self.assertIn('payflux_group_lag{group="audit",partition="0"} 19.0', metrics)
        self.assertIn('payflux_group_pending{group="audit",partition="0"} 3.0', metrics)
        self.assertIn('payflux_dlq_depth{partition="0"} 2.0', metrics)
        self.assertIn('payflux_stream_length{partition="0"} 22.0', metrics)
        self.assertNotIn(node.base, json.dumps(doc))  # no addresses, no URLs
        self.assertNotIn("producer-a", json.dumps(doc))  # key ids are summed away

    async def test_open_alerts_are_read_from_the_alerts_stream(self):
        redis = self.start_redis()
        node = await start_node(self, redis.url)
        t = 1_767_225_600_000
        for tr in (transition("open", "stripe", "warning", t, t), transition("open", "adyen", "warning", t + 5, t + 5),
                   transition("escalate", "stripe", "critical", t, t + 9),
                   transition("resolve", "adyen", "warning", t + 5, t + 40_000, "recovered")):
            redis.sync_command("XADD", ALERTS, "*", *tr.stream_fields())
        redis.sync_command("XADD", ALERTS, "*", "v", "2", "alert_id", "future-format")  # not v1: ignored

        [alert] = (await status_json(node))["risk"]["alerts"]["open"]
        self.assertEqual(alert, {
            "alert_id": f"failure_rate_spike:processor=stripe:{t}", "type": "failure_rate_spike",
            "key": "processor=stripe", "severity": "critical", "opened_at_ms": t, "at_ms": t + 9,
            "window_seconds": 10, "numbers": {"failure_rate": 0.42, "events": 500, "baseline_rate": 0.05},
        })
        self.assertEqual(set(stream_alerts(redis)), {alert["alert_id"]})

    async def test_risk_consumer_failure_rate_and_active_alert(self):
        redis = self.start_redis()
        node = await start_node(self, redis.url, config_text=node_config(self.id(), risk=True))
        await inject_spike(node, redis)
        risk = (await status_json(node))["risk"]

        gauge = node.metrics.registry.get_sample_value
        [stripe] = risk["processors"]
        rate = gauge("payflux_risk_failure_rate", {"consumer": "risk", "processor": "stripe"})
        self.assertGreater(rate, 0.4)
        self.assertEqual((stripe["consumer"], stripe["processor"], stripe["failure_rate"]),
                         ("risk", "stripe", round(rate, 6)))
        self.assertLess(abs(stripe["baseline"] - 0.05), 0.03)
        self.assertTrue(risk["running"])
        self.assertEqual(risk["active_alerts"], {
            "total": 1, "by_type": {"failure_cluster": 0, "failure_rate_spike": 1, "retry_storm": 0}})
        [alert] = risk["alerts"]["open"]
        self.assertEqual((alert["type"], alert["key"], alert["severity"]),
                         ("failure_rate_spike", "processor=stripe", "critical"))
        self.assertEqual(set(stream_alerts(redis)), {alert["alert_id"]})
        self.assertGreater(alert["numbers"]["failure_rate"], 0.3)
        # the risk consumer recorded it in the alert store too: the risk loop panel counts it
        loop = risk["loop"]
        self.assertEqual((loop["status"], loop["by_type"]["failure_rate_spike"]["alerts"],
                          loop["by_type"]["failure_rate_spike"]["no_outcome"], loop["all"]["alerts"]), ("ok", 1, 1, 1))
        # and its processor-health snapshot: stripe at 60% failures against a 5% baseline
        health = await wait_health(node, "critical")
        [processor] = health["processors"]
        self.assertEqual((processor["processor"], processor["band"], processor["drivers"][0]["name"]),
                         ("stripe", "critical", "high_failure_rate"))
        self.assertGreater(processor["drivers"][0]["contribution"], 0.5)

    async def test_redis_unavailable_is_shown_not_failed(self):
        redis = self.start_redis()
        node = await start_node(self, redis.url, redis_timeout="0.5")
        await post_traffic(node)
        await sample_now(node)
        redis.pause()  # the socket stays open, nothing answers: only a timeout ends the read
        self.addCleanup(redis.resume)  # before the node stops (cleanups run last-added first)
        await sample_now(node, groups=False)  # payflux_redis_up 0 after the probe's timeout
        started = time.monotonic()
        doc = await status_json(node)
        self.assertLess(time.monotonic() - started, 0.5 + 1.5)
        self.assertEqual((doc["risk"]["alerts"]["status"], doc["risk"]["alerts"]["open"]), ("redis_unavailable", []))
        self.assertEqual((doc["redis_up"], doc["ingest"]["events_accepted_total"]), (False, 22))

    async def test_status_page_is_self_contained(self):
        redis = self.start_redis()
        node = await start_node(self, redis.url)
        response = await node.get("/status", side=True)
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["text/html; charset=utf-8"])
        csp = response.headers.getRawHeaders("content-security-policy")[0]
        self.assertIn("default-src 'none'", csp)
        self.assertIn("connect-src 'self'", csp)
        html = (await response.content()).decode("utf-8")
        self.assertNotRegex(html, r"(?i)\b(https?:|wss?:|ftp:)")
        self.assertNotIn("//cdn", html)
        self.assertNotRegex(html, r"(?i)@import|url\(|<link|<iframe|<img")
        references = re.findall(r"""(?:\bhref|\bsrc|\baction)\s*=\s*["']([^"']*)["']""", html)
        references += re.findall(r"""fetch\(\s*["']([^"']*)["']""", html)
        self.assertEqual(sorted(set(references)), ["metrics", "status.json"])  # relative: this listener only
        self.assertEqual((await node.get("/status", side=False)).code, 404)  # side port only


redis_test_cases(StatusNodeMixin, globals())


# --- throughput and the supervisor, without Redis ------------------------------------------------


class RateTests(unittest.TestCase):
    def test_rate_is_the_counter_difference_over_the_clock(self):
        clock, metrics = task.Clock(), Metrics()
        page = StatusPage(registry_families(metrics.registry), clock.seconds)
        accepted = metrics.events_accepted.labels("producer-a")

        def rate() -> tuple:
            ingest = self.successResultOf(defer.ensureDeferred(page.document()))["ingest"]
            return ingest["events_per_second"], ingest["rate_window_seconds"], ingest["accepted_in_window"]

        self.assertEqual(rate(), (None, None, None))
        accepted.inc(500)
        clock.advance(2.0)
        self.assertEqual(rate(), (250.0, 2.0, 500))
        # a second viewer 0.5 s later still gets a window of at least a second (back to t=0)
        accepted.inc(100)
        clock.advance(0.5)
        self.assertEqual(rate(), (240.0, 2.5, 600))
        clock.advance(0.9)  # t=3.4: the newest sample at least 1 s old is t=2.0
        self.assertEqual(rate(), (round(100 / 1.4, 3), 1.4, 100))

    def test_old_samples_are_dropped_and_resets_give_no_rate(self):
        clock = task.Clock()
        tracker = RateTracker(clock.seconds, min_window=1.0, keep=10.0)
        tracker.observe({"a": 0, "b": 50})
        for _ in range(30):
            clock.advance(1.0)
            window, deltas = tracker.observe({"a": 10 * clock.seconds(), "b": 50})
        self.assertEqual((window, deltas), (1.0, {"a": 10.0, "b": 0}))
        self.assertLessEqual(len(tracker._samples), 11)
        clock.advance(1.0)
        self.assertEqual(tracker.observe({"a": 3, "b": 51}), (1.0, {"b": 1}))


class FakeWorkerPool:
    """What WorkersSideApp and the status page use of payflux.supervisor.WorkerPool: ``render_metrics``
    (the real WorkerTotals over real worker registries), ``settings``, ``redis``, ``reactor``."""

    def __init__(self, worker_texts: list[bytes]) -> None:
        self.settings = load_settings({"workers": 2, "api_keys": "producer-a:secret-0123456789abcdef"}, env={})
        self.reactor = task.Clock()
        self.metrics = Metrics()
        supervisor = SupervisorMetrics(self.metrics.registry)
        supervisor.workers_configured.set(2)
        supervisor.workers_running.set(2)
        self.metrics.stream_length.labels("0").set(7)
        self.texts = [t.decode() for t in worker_texts]
        self.count = 2

        class DownRedis:
            def execute_command(self, *args):
                raise txredisapi.ConnectionError("Redis connection not established")  # as RedisPool does

        self.redis = DownRedis()

    def render_metrics(self) -> defer.Deferred:
        return defer.succeed(WorkerTotals().render(self.metrics.registry, self.texts))


class SupervisorTests(unittest.TestCase):
    def test_supervisor_status_sums_the_workers(self):
        workers = []
        for accepted, rejected in ((3, 1), (4, 2)):
            m = Metrics()
            m.events_accepted.labels("producer-a").inc(accepted)
            m.requests_rejected.labels("payload_too_large", "producer-a").inc(rejected)
            workers.append(m.render())
        pool = FakeWorkerPool(workers)
        side = WorkersSideApp(pool, lambda: defer.succeed("PONG"), pool.metrics.content_type)
        http = StubTreq(side.app.resource())
        response = self.successResultOf(http.get("http://supervisor/status.json"))
        doc = json.loads(self.successResultOf(response.content()))
        self.assertEqual((doc["mode"], doc["workers"]), ("supervisor", {"running": 2, "configured": 2}))
        self.assertEqual(doc["ingest"]["events_accepted_total"], 7)
        self.assertEqual(doc["ingest"]["rejected"],
                         [{"reason": "payload_too_large", "requests": 3, "events": 0, "requests_per_second": None}])
        self.assertEqual(doc["streams"], [{"partition": "0", "length": 7, "dlq_depth": None}])
        self.assertEqual(doc["risk"]["alerts"]["status"], "redis_unavailable")
        page = self.successResultOf(http.get("http://supervisor/status"))
        self.assertEqual(page.code, 200)
        self.assertIn(b"status.json", self.successResultOf(page.content()))


# --- headless Chromium ----------------------------------------------------------------------------


class _Collect(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.out, self.err = [], []
        self.done: defer.Deferred = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out.append(data)

    def errReceived(self, data: bytes) -> None:
        self.err.append(data)

    def processEnded(self, reason) -> None:
        self.done.callback((getattr(reason.value, "exitCode", None), b"".join(self.out), b"".join(self.err)))


def run_chromium(testcase, url: str, *mode: str, timeout: float = 30.0) -> defer.Deferred:
    """Headless Chromium on ``url`` (never blocking the reactor that serves the page)."""
    profile = testcase.mktemp()
    os.makedirs(profile)
    args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
            "--window-size=1280,900", "--virtual-time-budget=5000", *mode, url]
    proc = _Collect()
    transport = reactor.spawnProcess(proc, CHROMIUM, args, env=dict(os.environ))
    killer = reactor.callLater(timeout, transport.signalProcess, "KILL")
    proc.done.addBoth(lambda r: (killer.cancel() if killer.active() else None, r)[1])
    return proc.done


class _Dom(HTMLParser):
    """Text by element id, and the table cells of rows marked ``data-row`` (``data-col`` / ``data-value``)."""

    VOID = {"meta", "br", "img", "input", "link", "hr", "area", "base", "col", "source", "wbr"}

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[tuple[str, dict, list]] = []
        self.by_id: dict[str, str] = {}
        self.cells: dict[tuple[str, str], tuple[str, str | None]] = {}
        self.row: str | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "tr":
            self.row = a.get("data-row")
        if tag not in self.VOID:
            self.stack.append((tag, a, []))

    def handle_endtag(self, tag):
        while self.stack:
            t, a, parts = self.stack.pop()
            content = "".join(parts)
            if self.stack:
                self.stack[-1][2].append(content)
            if "id" in a:
                self.by_id[a["id"]] = " ".join(content.split())
            if t == "td" and self.row and "data-col" in a:
                self.cells[self.row, a["data-col"]] = (" ".join(content.split()), a.get("data-value"))
            if t == tag:
                return

    def handle_data(self, data):
        if self.stack:
            self.stack[-1][2].append(data)


def png_rows(data: bytes, decode_rows: int) -> tuple[int, int, int, list[bytes], bytes]:
    """(width, height, bytes per pixel, the first ``decode_rows`` rows of pixels, the filtered
    scanlines) of an 8-bit truecolour PNG, as Chromium writes them.  Only the top is decoded:
    unfiltering a whole 1280x900 picture in pure Python takes seconds."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat = 8, b""
    width = height = bpp = 0
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, colour = struct.unpack(">IIBB", chunk[:10])
            assert depth == 8 and colour in (2, 6), (depth, colour)
            bpp = 3 if colour == 2 else 4
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    raw, stride, rows, prev = zlib.decompress(idat), width * bpp, [], bytearray(width * bpp)
    for y in range(min(decode_rows, height)):
        f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        prev = line
    return width, height, bpp, rows, raw


def _any_redis() -> str | None:
    found = find_redis_binaries()
    return found.get("7") or found.get("6.2")


REDIS_BINARY = _any_redis()  # one Redis version is enough where the page, not Redis, is under test


class RealSupervisorTests(unittest.SynchronousTestCase):
    """``twistd -n payflux --workers 2`` for real (a child process, like tests/test_workers.py):
    the side port's status.json is the supervisor's summed view."""

    if REDIS_BINARY is None:
        skip = "no redis-server binary found"

    def get(self, url: str) -> tuple[int, bytes, str]:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return r.status, r.read(), r.headers.get("Content-Type")
        except urllib.error.HTTPError as e:
            return e.code, e.read(), e.headers.get("Content-Type")

    def test_supervisor_status_json_sums_real_workers(self):
        redis = RedisProcess(REDIS_BINARY, testcase=self)
        port, side_port, workdir = free_port(), free_port(), self.mktemp()
        os.makedirs(workdir)
        log = open(os.path.join(workdir, "twistd.log"), "wb")
        self.addCleanup(log.close)
        proc = subprocess.Popen(
            [*TWISTD, "-n", "--pidfile=", "payflux", "--workers", "2", "--redis-url", redis.url,
             "--listen", f"tcp:{port}:interface=127.0.0.1", "--metrics-listen", f"tcp:{side_port}:interface=127.0.0.1",
             "--stats-interval", "0.2", "--shutdown-grace", "2"],
            stdout=log, stderr=subprocess.STDOUT, cwd=workdir, env=clean_env(PAYFLUX_API_KEYS=API_KEYS))
        self.addCleanup(lambda: (proc.poll() is None and proc.kill(), proc.wait()))  # SIGKILL: workers die with it
        side = f"http://127.0.0.1:{side_port}"
        deadline = time.monotonic() + 20
        while True:
            self.assertIsNone(proc.poll(), "the supervisor exited; see " + log.name)
            try:
                if self.get(side + "/ready")[0] == 200:
                    break
            except OSError:
                pass
            self.assertLess(time.monotonic(), deadline, "the workers did not become ready")
            time.sleep(0.05)
        for n in range(6):
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}{BATCH}", data=ndjson([sample_event(n)]).encode(), method="POST",
                headers={"Content-Type": "application/x-ndjson", "Authorization": f"Bearer {API_SECRET}"})
            with urllib.request.urlopen(request, timeout=5) as r:
                self.assertEqual(r.status, 202)

        code, body, content_type = self.get(side + "/status.json")
        doc = json.loads(body)
        self.assertEqual((code, content_type), (200, "application/json"))
        self.assertEqual((doc["mode"], doc["workers"]), ("supervisor", {"running": 2, "configured": 2}))
        self.assertEqual(doc["ingest"]["events_accepted_total"], 6)
        self.assertIn(b'payflux_events_accepted_total{key_id="producer-a"} 6.0', self.get(side + "/metrics")[1])
        code, body, content_type = self.get(side + "/status")
        self.assertEqual((code, content_type), (200, "text/html; charset=utf-8"))
        self.assertIn(b'fetch("status.json"', body)


class ChromiumTests(unittest.TestCase):
    """The page as a browser shows it: a node with traffic, a DLQ, a lagging group and a risk alert."""

    if CHROMIUM is None:
        skip = "chromium is not installed (Debian: apt-get install -y chromium)"
    elif REDIS_BINARY is None:
        skip = "no redis-server binary found"

    async def test_page_renders_the_numbers_in_headless_chromium(self):
        redis = RedisProcess(REDIS_BINARY, testcase=self)
        node = await start_node(self, redis.url, config_text=node_config(self.id(), risk=True))
        await post_traffic(node)
        await wait_for(lambda: redis.sync_command("XLEN", DLQ) == 2, what="the 2 failing events in the DLQ")
        await inject_spike(node, redis)
        await wait_for(lambda: redis.sync_command("XPENDING", EVENTS, "recorders")[0] == 0, what="recorders acked")
        open_audit_group(redis, read=3)
        await sample_now(node)
        length = redis.sync_command("XLEN", EVENTS)
        rate = node.metrics.registry.get_sample_value("payflux_risk_failure_rate",
                                                      {"consumer": "risk", "processor": "stripe"})
        [alert_id] = stream_alerts(redis)
        store = AlertStore(node.node.pool, "payflux", 30, reactor.seconds)
        stored = await store.get(alert_id)
        self.assertEqual(stored["state"], "open")  # recorded by the risk consumer, after the stream
        self.assertTrue(await store.record_outcome(alert_id, {"outcome_type": "throttle", "lead_time_seconds": 90.0}))
        # the risk consumer's health snapshot has caught up with the spike (read from Redis, not
        # through status.json, whose risk loop is cached for 2 s and must show the outcome above)
        await wait_for_deferred(lambda: store.health().addCallback(
            lambda snap: bool(snap) and any(p["band"] == "critical" for p in snap["processors"])),
            what="stripe critical in the health snapshot")

        shot = os.path.abspath(self.mktemp() + ".png")
        url = node.side + "/status"
        (code, dom, err), (shot_code, _, shot_err) = await defer.gatherResults(
            [run_chromium(self, url, "--dump-dom"), run_chromium(self, url, f"--screenshot={shot}")])
        self.assertEqual(code, 0, err.decode(errors="replace")[-2000:])
        self.assertEqual(shot_code, 0, shot_err.decode(errors="replace")[-2000:])

        page = _Dom()
        page.feed(dom.decode("utf-8"))
        self.assertEqual(page.by_id["kpi-accepted"], "22")
        self.assertEqual(page.by_id["kpi-rejected"], "2")
        self.assertEqual(page.by_id["kpi-dlq"], "2")
        self.assertEqual(page.by_id["kpi-alerts"], "1")
        self.assertEqual(page.by_id["mode"], "single node")
        self.assertEqual(page.by_id["redis"], "Redis up")
        self.assertRegex(page.by_id["kpi-rate"], r"^\d[\d,.]*$")  # a number: two samples were taken
        self.assertEqual(page.cells["stream:0", "length"], (f"{length:,}", str(length)))
        self.assertEqual(page.cells["stream:0", "dlq_depth"], ("2", "2"))
        self.assertEqual(page.cells["group:audit:0", "lag"], (f"{length - 3:,}", str(length - 3)))
        self.assertEqual(page.cells["group:audit:0", "pending"], ("3", "3"))
        self.assertEqual(page.cells["group:recorders:0", "pending"], ("0", "0"))
        self.assertEqual(page.cells["rejected:unauthorized", "requests"], ("1", "1"))
        self.assertEqual(page.cells["consumer:rec:recorders", "dead_lettered_total"], ("2", "2"))
        failure = page.cells["processor:risk:stripe", "failure_rate"]
        self.assertEqual(failure, (f"{rate * 100:.1f}%", repr(round(rate, 6))))
        self.assertIn("processor=stripe", page.cells["alert:" + alert_id, "alert"][0])
        self.assertEqual(page.cells["alert:" + alert_id, "severity"][0], "critical")
        self.assertNotIn("not running", dom.decode("utf-8").split("<main")[1].split('id="risk-state"')[0])
        self.assertEqual(page.cells["loop:failure_rate_spike", "alerts"], ("1", "1"))
        self.assertEqual(page.cells["loop:failure_rate_spike", "followed_by_action"], ("1 (100%)", "1"))
        self.assertEqual(page.cells["loop:failure_rate_spike", "lead_time_median_seconds"], ("1m 30s", "90"))
        self.assertEqual(page.cells["loop:retry_storm", "alerts"], ("0", "0"))
        self.assertEqual(page.cells["health:stripe", "band"][0], "critical")
        self.assertIn("high failure rate +", page.cells["health:stripe", "drivers"][0])
        self.assertEqual(page.cells["health:stripe", "trajectory"][0] in ("accelerating", "decelerating", "steady"), True)
        self.assertEqual(page.by_id["banner"], "")  # every refresh reached status.json

        with open(shot, "rb") as f:
            width, height, bpp, top, filtered = png_rows(f.read(), decode_rows=120)
        self.assertEqual((width, height), (1280, 900))
        self.assertIn(b"\x17\x20\x33", {top[20][x:x + 3] for x in range(0, 400 * bpp, bpp)})  # the header bar
        colours = {row[x:x + 3] for row in top for x in range(0, len(row), bpp)}
        self.assertGreater(len(colours), 20, "the top of the screenshot is flat")
        # A blank page filters to (almost) all zero bytes; text, tables and cards don't.
        self.assertGreater(1 - filtered.count(0) / len(filtered), 0.02, "the screenshot looks blank")

    async def test_page_says_redis_unavailable_and_risk_consumer_not_running(self):
        redis = RedisProcess(REDIS_BINARY, testcase=self)
        node = await start_node(self, redis.url, redis_timeout="0.5")
        await post_traffic(node)
        await sample_now(node)
        redis.pause()
        self.addCleanup(redis.resume)
        await sample_now(node, groups=False)

        code, dom, err = await run_chromium(self, node.side + "/status", "--dump-dom")
        self.assertEqual(code, 0, err.decode(errors="replace")[-2000:])
        page = _Dom()
        page.feed(dom.decode("utf-8"))
        self.assertEqual(page.by_id["redis"], "Redis down")
        self.assertEqual(page.by_id["kpi-accepted"], "22")  # from memory: the metrics
        self.assertEqual(page.by_id["risk-state"],
                         "Risk consumer not running on this node (no payflux_risk_* metrics).")
        self.assertEqual(page.by_id["alerts-state"], "Redis unavailable: can't read the alerts stream payflux:alerts.")
        self.assertEqual(page.by_id["loop-state"], "Redis unavailable: can't read the alert store.")
        self.assertEqual(page.by_id["health-state"], "Redis unavailable: can't read the health snapshot.")
        self.assertEqual(page.by_id["kpi-alerts"], "—")
