"""RiskHandler: the risk consumer under the real consumer runtime, its sinks, metrics and idle clock."""

from __future__ import annotations

import json
import random
import socket
from typing import Any

import txredisapi
from twisted.internet import defer, reactor, task
from twisted.logger import Logger
from twisted.trial import unittest
from twisted.web import server
from twisted.web.resource import Resource
from treq.testing import StubTreq

from payflux.consumers.handlers import Entry, load_handler
from payflux.consumers.service import ConsumerService
from payflux.exporters.signing import SIGNATURE_HEADER, TIMESTAMP_HEADER, verify
from payflux.observability.metrics import Metrics
from payflux.risk.handler import RiskHandler
from tests.support.consumers import KEYS, RedisFixture, config, wait_for
from tests.support.redis import _encode_command, _RespReader, redis_test_cases

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
ALERTS = "pf:alerts"
# Small windows and volumes so a test needs a few thousand entries, not a million.
SMALL = {
    "idle_after_seconds": 0,
    "failure_rate": {"window_seconds": 10, "min_events": 50, "warmup_seconds": 20},
    "retry_storm": {"enabled": False},
    "failure_cluster": {"enabled": False},
}


def payments(seconds: int, rate: int, fail: float, t0: int, seed: int = 1) -> list[tuple[int, dict]]:
    """``(received_at_ms, event)`` for ``seconds`` of one processor's traffic (no geo: one key to judge)."""
    rng = random.Random(seed)
    out = []
    for s in range(seconds):
        for j in range(rate):
            failed = rng.random() < fail
            n = len(out)
            ev = {
                "event_id": f"evt_{t0}_{n:08d}", "event_type": "payment_failed" if failed else "payment_succeeded",
                "event_timestamp": "2026-01-01T00:00:00.000Z", "processor": "stripe",
                "merchant_id_hash": f"mer_{rng.randrange(500):06d}", "payment_intent_id_hash": f"pi_{t0}_{n:08d}",
                "retry_count": 0, "payment_method_bucket": "credit_card", "channel": "web",
                "system_source": "checkout_api",
            }
            if failed:
                ev["failure_category"] = "do_not_honor"
                ev["failure_origin"] = "issuer"
            out.append((t0 + s * 1000 + j * 1000 // rate, ev))
    return out


def spike(fail: float = 0.3, t0: int = T0) -> tuple[list[tuple[int, dict]], int]:
    """40 s at 5% then 20 s at ``fail``, 50 events/s; returns the events and the spike's start (ms).
    30% opens a warning that stays one; 60% also escalates it to critical."""
    calm = payments(40, 50, 0.05, t0, seed=1)
    storm = payments(20, 50, fail, t0 + 40_000, seed=2)
    return calm + storm, t0 + 40_000


def entries(events: list[tuple[int, dict]]) -> list[Entry]:
    return [Entry(f"{t}-{i}", 0, ev["event_id"], t, "1", ev, 1, ev["event_type"]) for i, (t, ev) in enumerate(events)]


def sample(metrics: Any, name: str, **labels: str) -> float | None:
    registry = metrics.registry if hasattr(metrics, "registry") else metrics
    return registry.get_sample_value(name, labels)


class RecordingRedis:
    """Records XADDs (``commands``) and the health snapshot's SETs (``sets``, tests/test_risk_health.py);
    ``failures`` makes the next N commands fail like a lost connection."""

    def __init__(self) -> None:
        self.commands: list[tuple] = []
        self.sets: list[tuple] = []
        self.failures = 0

    def execute_command(self, *args: Any) -> defer.Deferred:
        if self.failures:
            self.failures -= 1
            return defer.fail(txredisapi.ConnectionError("Not connected"))
        if args[0] == "SET":
            self.sets.append(args)
            return defer.succeed("OK")
        self.commands.append(args)
        return defer.succeed(f"{len(self.commands)}-0")

    def records(self) -> list[dict]:
        out = []
        for cmd in self.commands:
            fields = dict(zip(cmd[6::2], cmd[7::2]))
            self.assert_shape(cmd)
            out.append(json.loads(fields["data"]))
        return out

    @staticmethod
    def assert_shape(cmd: tuple) -> None:
        assert cmd[:6] == ("XADD", ALERTS, "MAXLEN", "~", "10000", "*"), cmd[:6]


def handler(clock: Any = None, **options: Any) -> tuple[RiskHandler, RecordingRedis]:
    merged = {**SMALL, **options}
    h = RiskHandler(reactor=clock or task.Clock(), **merged)
    redis = RecordingRedis()
    h.bind_redis(redis, KEYS)
    return h, redis


class RiskRuntimeMixin(RedisFixture):
    """The handler as the node runs it: loaded by name, under ConsumerService, against a real Redis."""

    def setUp(self) -> None:
        self.setup_redis()

    def xadd_all(self, events: list[tuple[int, dict]]) -> None:
        """Pipelined XADDs of v1 entries (explicit ids from received_at, so stream order = time order)."""
        payload = []
        for i, (t, ev) in enumerate(events):
            data = json.dumps(ev, sort_keys=True, separators=(",", ":"))
            payload.append(_encode_command(("XADD", KEYS.events(0), f"{t}-{i}", "v", "1", "event_id", ev["event_id"],
                                            "type", ev["event_type"], "received_at", str(t), "data", data)))
        with socket.create_connection(("127.0.0.1", self.server.port)) as sock:
            sock.sendall(b"".join(payload))
            reader = _RespReader(sock)
            replies = [reader.read() for _ in payload]
        self.assertFalse([r for r in replies if not isinstance(r, bytes)])

    def alerts(self) -> list[dict[str, str]]:
        rows = self.server.sync_command("XRANGE", ALERTS, "-", "+")
        return [{k.decode(): v.decode() for k, v in zip(f[::2], f[1::2])} for _, f in rows]

    async def test_spike_becomes_an_alert_in_the_stream_and_the_gauges(self):
        events, spike_at = spike(fail=0.6)
        self.xadd_all(events)
        self.create_group()
        h = load_handler("risk", SMALL, reactor)
        self.assertIsInstance(h, RiskHandler)
        h.bind_metrics(self.metrics, "c1")
        h.bind_redis(self.redis, KEYS)
        svc = ConsumerService(config(handler="risk", batch_size=500), h, self.redis, self.open_blocking, KEYS, 1,
                              self.metrics.consumers, reactor)
        svc.startService()
        self.addCleanup(lambda: svc.stopService() if svc.running else None)
        await wait_for(lambda: not self.pending() and sample(self.metrics, "payflux_consumer_acked_total",
                                                             consumer="c1", group="g") == len(events),
                       what="every entry acked")
        await wait_for(lambda: len(self.alerts()) == 2, what="the alert in the stream")
        opened, escalated = self.alerts()
        record = json.loads(opened.pop("data"))
        self.assertEqual({k: v for k, v in opened.items() if k not in ("alert_id", "at")},
                         {"v": "1", "action": "open", "type": "failure_rate_spike", "key": "processor=stripe",
                          "severity": "warning"})
        alert_id = f"failure_rate_spike:processor=stripe:{opened['at']}"
        self.assertEqual(opened["alert_id"], alert_id)
        self.assertEqual((record["alert_id"], record["action"], record["key"], record["at_ms"]),
                         (alert_id, "open", {"processor": "stripe"}, int(opened["at"])))
        self.assertTrue(spike_at < int(opened["at"]) <= spike_at + 5000, int(opened["at"]) - spike_at)
        self.assertGreater(record["numbers"]["failure_rate"], 0.1)
        self.assertEqual((escalated["action"], escalated["alert_id"], escalated["severity"]),
                         ("escalate", alert_id, "critical"))

        m = self.metrics
        self.assertGreater(sample(m, "payflux_risk_failure_rate", consumer="c1", processor="stripe"), 0.4)
        baseline = sample(m, "payflux_risk_failure_rate_baseline", consumer="c1", processor="stripe")
        self.assertLess(abs(baseline - 0.05), 0.03)
        self.assertEqual(sample(m, "payflux_risk_active_alerts", consumer="c1", type="failure_rate_spike"), 1)
        self.assertEqual(sample(m, "payflux_risk_active_alerts", consumer="c1", type="retry_storm"), 0)
        self.assertEqual(sample(m, "payflux_risk_alerts_opened_total", consumer="c1", type="failure_rate_spike",
                                severity="warning"), 1)
        self.assertEqual(sample(m, "payflux_risk_alerts_escalated_total", consumer="c1", type="failure_rate_spike"), 1)
        self.assertEqual(sample(m, "payflux_risk_events_total", consumer="c1"), len(events))
        failed = sum(1 for _, ev in events if ev["event_type"] == "payment_failed")
        self.assertEqual(sample(m, "payflux_risk_failures_total", consumer="c1", origin="issuer"), failed)
        self.assertEqual(sample(m, "payflux_risk_stream_time_seconds", consumer="c1"), events[-1][0] / 1000)
        self.assertIn(b'payflux_risk_active_alerts{consumer="c1",type="failure_rate_spike"} 1.0', m.render())

        # stopping the consumer resolves what it can no longer watch
        await svc.stopService()
        rows = self.alerts()
        self.assertEqual([(r["action"], r["alert_id"]) for r in rows],
                         [("open", alert_id), ("escalate", alert_id), ("resolve", alert_id)])
        self.assertEqual(json.loads(rows[2]["data"])["reason"], "consumer_stopped")
        self.assertEqual(sample(m, "payflux_risk_active_alerts", consumer="c1", type="failure_rate_spike"), 0)


redis_test_cases(RiskRuntimeMixin, globals())


class HandlerTests(unittest.TestCase):
    def test_quiet_stream_resolves_on_the_idle_tick(self):
        clock = task.Clock()
        h, redis = handler(clock, idle_after_seconds=5)
        events, _ = spike()
        self.successResultOf(h.handle(entries(events)))
        self.assertEqual([r["action"] for r in redis.records()], ["open"])
        self.assertIsNotNone(sample(h.metrics, "payflux_risk_failure_rate", consumer="", processor="stripe"))
        clock.advance(4)
        self.assertEqual(len(redis.commands), 1)  # not idle yet: stream time stands still
        for _ in range(60):
            clock.advance(1)
        records = redis.records()
        self.assertEqual([(r["action"], r["reason"]) for r in records], [("open", "threshold"),
                                                                         ("resolve", "insufficient_volume")])
        # stream time moved with the reactor clock: window (10 s) + resolve_after_seconds (30 s)
        self.assertLessEqual(records[1]["at_ms"] - events[-1][0], 45_000)
        self.assertIsNone(sample(h.metrics, "payflux_risk_failure_rate", consumer="", processor="stripe"))
        self.assertEqual(sample(h.metrics, "payflux_risk_active_alerts", consumer="", type="failure_rate_spike"), 0)
        self.successResultOf(h.close())
        self.assertFalse(clock.getDelayedCalls())

    def test_without_idle_advance_stream_time_only_moves_with_events(self):
        clock = task.Clock()
        h, redis = handler(clock)  # SMALL: idle_after_seconds = 0
        events, _ = spike()
        self.successResultOf(h.handle(entries(events)))
        clock.advance(600)
        self.assertEqual([r["action"] for r in redis.records()], ["open"])
        self.assertFalse(clock.getDelayedCalls())

    def test_redis_errors_keep_alerts_for_the_next_batch(self):
        h, redis = handler()
        events, _ = spike()
        redis.failures = 1
        self.successResultOf(h.handle(entries(events)))  # the batch itself succeeds (no double counting)
        self.assertEqual(redis.commands, [])
        self.assertEqual(sample(h.metrics, "payflux_risk_alert_delivery_failures_total", consumer="", sink="stream"), 1)
        self.assertEqual(len(h.stream.outbox), 1)
        later = payments(1, 1, 0.0, events[-1][0] + 1000, seed=3)
        self.successResultOf(h.handle(entries(later)))
        self.assertEqual([r["action"] for r in redis.records()], ["open"])
        self.assertEqual(len(h.stream.outbox), 0)

    def test_outbox_is_bounded(self):
        h, redis = handler(outbox_max=1)
        redis.failures = 100
        events, _ = spike()
        self.successResultOf(h.handle(entries(events)))
        h.engine.stop()  # a second transition (the resolve) for a one-slot outbox
        self.successResultOf(h.handle([]))
        self.assertEqual(len(h.stream.outbox), 1)
        self.assertEqual(h.stream.outbox[0].action, "resolve")
        self.assertEqual(sample(h.metrics, "payflux_risk_alerts_dropped_total", consumer="", sink="stream"), 1)

    def test_alerts_are_logged_with_structured_fields(self):
        h, _ = handler()
        self.assertEqual(h.log.namespace, "payflux.risk")  # what docs/risk.md tells operators to filter on
        logged: list[dict] = []
        h.log = Logger(namespace="payflux.risk", observer=logged.append)
        events, _ = spike()
        self.successResultOf(h.handle(entries(events)))
        opened = [e for e in logged if e.get("action") == "open"]
        self.assertEqual(len(opened), 1)
        e = opened[0]
        self.assertEqual((e["alert_type"], e["alert_key"], e["reason"], e["window_seconds"], e["log_level"].name),
                         ("failure_rate_spike", "processor=stripe", "threshold", 10, "warn"))
        self.assertTrue(e["alert_id"].startswith("failure_rate_spike:processor=stripe:"))
        self.assertGreater(json.loads(e["numbers"])["failure_rate"], 0.1)
        self.assertRegex(e["at"], r"^2026-01-01T00:00:4\d\.000Z$")

    def test_bind_metrics_registers_in_the_node_registry(self):
        metrics = Metrics()
        a, b = RiskHandler(reactor=task.Clock()), RiskHandler(reactor=task.Clock())
        a.bind_metrics(metrics, "risk-a")
        b.bind_metrics(metrics, "risk-b")  # the families are registered once per registry
        text = metrics.render().decode()
        for consumer in ("risk-a", "risk-b"):
            for t in ("failure_rate_spike", "retry_storm", "failure_cluster"):
                self.assertIn(f'payflux_risk_active_alerts{{consumer="{consumer}",type="{t}"}} 0.0', text)
        self.successResultOf(a.handle(entries(spike()[0])))
        self.assertIsNotNone(metrics.registry.get_sample_value(
            "payflux_risk_failure_rate", {"consumer": "risk-a", "processor": "stripe"}))
        self.assertIsNone(metrics.registry.get_sample_value(
            "payflux_risk_failure_rate", {"consumer": "risk-b", "processor": "stripe"}))

    def test_failures_are_counted_by_origin(self):
        h, _ = handler()
        events = [(T0 + i, {"event_type": "payment_failed", "processor": "stripe", "failure_origin": origin})
                  for i, origin in enumerate(["issuer", "Network", "network", "acquirer", "", "processor"])]
        events += [(T0 + 10, {"event_type": "payment_succeeded", "processor": "stripe"}),
                   (T0 + 11, {"event_type": "payment_failed", "processor": "stripe"}),
                   # an entry written before the seed schema: occurred_at, no origin
                   (T0 + 12, {"event_type": "payment_failed", "processor": "stripe",
                              "occurred_at": "2025-12-31T23:59:59.000Z", "payment_method": "card"})]
        self.successResultOf(h.handle([Entry(f"{t}-0", 0, f"e{i}", t, "1", ev, 1, ev["event_type"])
                                       for i, (t, ev) in enumerate(events)]))
        counts = {o: sample(h.metrics, "payflux_risk_failures_total", consumer="", origin=o)
                  for o in ("issuer", "network", "processor", "merchant", "customer", "other", "none")}
        self.assertEqual(counts, {"issuer": 1, "network": 2, "processor": 1, "merchant": None, "customer": None,
                                  "other": 1, "none": 3})
        self.assertEqual(sample(h.metrics, "payflux_risk_events_total", consumer=""), 9)

    def test_evictions_are_counted(self):
        h, _ = handler(max_keys={"merchant_id_hash": 10})
        self.successResultOf(h.handle(entries(payments(2, 50, 0.05, T0))))
        self.assertEqual(sample(h.metrics, "payflux_risk_tracked_keys", consumer="", detector="failure_rate",
                                dimension="merchant_id_hash"), 10)
        evicted = h.engine.failure_rate.table("merchant_id_hash").evicted
        self.assertGreater(evicted, 0)
        self.assertEqual(sample(h.metrics, "payflux_risk_evicted_keys_total", consumer="", detector="failure_rate",
                                dimension="merchant_id_hash"), evicted)

    def test_bad_options_fail_at_load_with_the_option_name(self):
        with self.assertRaises(ValueError) as cm:
            load_handler("risk", {"failure_rate": {"window_seconds": 0}}, reactor)
        self.assertIn("handler 'risk': building it failed: ValueError: risk option failure_rate.window_seconds",
                      str(cm.exception))


class Hook(Resource):
    """A webhook receiver: answers with ``codes`` in turn (None = never answer)."""

    isLeaf = True

    def __init__(self, codes: list[int | None]) -> None:
        super().__init__()
        self.codes = list(codes)
        self.requests: list[tuple[dict[str, str], bytes]] = []

    def render_POST(self, request: Any) -> Any:
        headers = {k.decode().lower(): v[0].decode() for k, v in request.requestHeaders.getAllRawHeaders()}
        self.requests.append((headers, request.content.read()))
        code = self.codes.pop(0) if self.codes else 204
        if code is None:
            return server.NOT_DONE_YET
        request.setResponseCode(code)
        return b""


class WebhookTests(unittest.TestCase):
    SECRET = "whsec_test_0123456789"

    def hooked(self, codes: list[int | None], **options: Any) -> tuple[RiskHandler, Hook, task.Clock]:
        clock = task.Clock()
        clock.advance(1_767_225_700)  # the signing timestamp comes from this clock
        h, _ = handler(clock, webhook_url="https://hooks.example/risk", webhook_secret=self.SECRET, **options)
        hook = Hook(codes)
        h.webhook.http = StubTreq(hook)
        return h, hook, clock

    def test_alerts_are_posted_signed(self):
        h, hook, clock = self.hooked([204])
        self.successResultOf(h.handle(entries(spike()[0])))
        self.assertEqual(len(hook.requests), 1)
        headers, body = hook.requests[0]
        self.assertEqual(headers["content-type"], "application/json")
        self.assertEqual(headers[TIMESTAMP_HEADER.lower()], "1767225700")
        self.assertTrue(verify(self.SECRET.encode(), int(headers[TIMESTAMP_HEADER.lower()]), body,
                               headers[SIGNATURE_HEADER.lower()], now=clock.seconds()))
        self.assertFalse(verify(b"another secret", int(headers[TIMESTAMP_HEADER.lower()]), body,
                                headers[SIGNATURE_HEADER.lower()], now=clock.seconds()))
        record = json.loads(body)
        self.assertEqual((record["action"], record["type"], record["key"]),
                         ("open", "failure_rate_spike", {"processor": "stripe"}))
        self.assertEqual(body, json.dumps(record, sort_keys=True, separators=(",", ":")).encode())
        self.assertEqual(h.webhook.delivered, 1)

    def test_server_errors_are_retried_with_backoff(self):
        h, hook, clock = self.hooked([500, 503, 204])
        self.successResultOf(h.handle(entries(spike()[0])))
        self.assertEqual(len(hook.requests), 1)
        clock.advance(1)
        self.assertEqual(len(hook.requests), 2)
        clock.advance(1)
        self.assertEqual(len(hook.requests), 2)  # the second backoff is 2 s
        clock.advance(1)
        self.assertEqual(len(hook.requests), 3)
        self.assertEqual(h.webhook.delivered, 1)
        self.assertEqual(sample(h.metrics, "payflux_risk_alert_delivery_failures_total", consumer="",
                                sink="webhook"), 2)
        # each attempt is signed afresh
        self.assertEqual([int(r[0][TIMESTAMP_HEADER.lower()]) for r in hook.requests], [1767225700, 1767225701, 1767225703])
        self.assertEqual(len({r[1] for r in hook.requests}), 1)

    def test_client_errors_and_redirects_are_not_retried(self):
        for code in (400, 301):
            h, hook, clock = self.hooked([code])
            self.successResultOf(h.handle(entries(spike()[0])))
            clock.advance(60)
            self.assertEqual(len(hook.requests), 1)
            self.assertEqual(sample(h.metrics, "payflux_risk_alerts_dropped_total", consumer="", sink="webhook"), 1)

    def test_a_hanging_receiver_times_out_and_is_retried(self):
        h, hook, clock = self.hooked([None, 204], webhook_timeout=2.0)
        self.successResultOf(h.handle(entries(spike()[0])))  # the consumer is not held up
        self.assertEqual(len(hook.requests), 1)
        clock.advance(2)  # timeout
        clock.advance(1)  # backoff
        self.assertEqual(len(hook.requests), 2)
        self.assertEqual(h.webhook.delivered, 1)

    def test_gives_up_after_max_attempts(self):
        h, hook, clock = self.hooked([500] * 10, webhook_max_attempts=3)
        self.successResultOf(h.handle(entries(spike()[0])))
        clock.advance(1)
        clock.advance(2)
        clock.advance(60)
        self.assertEqual(len(hook.requests), 3)
        self.assertEqual(sample(h.metrics, "payflux_risk_alerts_dropped_total", consumer="", sink="webhook"), 1)

    def test_close_waits_for_the_last_alerts_then_gives_up(self):
        h, hook, clock = self.hooked([204, None], webhook_timeout=5.0)
        self.successResultOf(h.handle(entries(spike()[0])))
        d = h.close()  # resolves the open alert (consumer_stopped) and posts it; the receiver hangs
        self.assertNoResult(d)
        self.assertEqual([json.loads(b)["action"] for _, b in hook.requests], ["open", "resolve"])
        clock.advance(5)
        self.successResultOf(d)
