"""
The alerts API on the side listener (payflux/ingest/alerts.py) and the alert store behind it
(payflux/risk/store.py): admin-key auth, the filters, cursor paging, bad input per field,
outcomes and their lead-time histogram, durability across a node and a Redis restart,
retention on a clock, the store's recording through a Redis outage, ``payflux risk report``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import time
from typing import Any
from urllib.parse import quote

import attrs
import treq
import txredisapi
from twisted.internet import defer, reactor, task
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from payflux.cli import main as cli_main
from payflux.config import ApiKey, ConfigError, load_settings
from payflux.ingest.auth import AdminAuthenticator
from payflux.ingest.errors import ApiError
from payflux.risk.alerts import Alert, Transition, iso_ms as iso
from payflux.risk.engine import RiskEngine
from payflux.risk.handler import RiskHandler
from payflux.risk.health import processors_answer
from payflux.observability.metrics import Metrics
from payflux.redis.connect import open_sync
from payflux.redis.scripts import evalsha_sync
from payflux.risk.report import summarize
from payflux.risk.store import DAY_MS, RECORD, AlertKeys, AlertStore, record_args
from tests.support.node import API_KEYS, API_SECRET, start_node
from tests.test_hostile import _raw_exchange
from tests.support.process import TWISTD, clean_env, http_request
from tests.support.redis import RedisProcess, find_redis_binaries, free_port, redis_test_cases

ADMIN_SECRET = "admin-secret-0123456789abcdef"
ADMIN_KEYS = f"ops:{ADMIN_SECRET}"
T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z


def alert(type_: str = "failure_rate_spike", key: tuple = (("processor", "stripe"),), opened: int = T0,
          severity: str = "warning", numbers: dict | None = None) -> Alert:
    return Alert(type_, key, severity, 10, opened, numbers or {"failure_rate": 0.3})


def opened(a: Alert, **numbers: Any) -> Transition:
    return Transition("open", a, a.opened_at_ms, "threshold", numbers or {"failure_rate": 0.3})


def resolved(a: Alert, after_ms: int = 40_000) -> Transition:
    return Transition("resolve", a, a.opened_at_ms + after_ms, "recovered", {"peak_failure_rate": 0.5})


class AdminAuthTests(unittest.TestCase):
    def setUp(self):
        self.auth = AdminAuthenticator([ApiKey("ops", ADMIN_SECRET.encode())], [ApiKey("producer-a", API_SECRET.encode())])

    def status(self, auth: AdminAuthenticator, header: bytes | None, query: dict | None = None) -> tuple[int, str]:
        try:
            return 200, auth.authenticate(header, query)
        except ApiError as e:
            return e.status, e.message

    def test_admin_key_only(self):
        self.assertEqual(self.status(self.auth, b"Bearer " + ADMIN_SECRET.encode()), (200, "ops"))
        self.assertEqual(self.status(self.auth, b"Bearer " + API_SECRET.encode()),
                         (403, "this is a producer key; the alerts API takes an admin key"))
        self.assertEqual(self.status(self.auth, b"Bearer not-a-key-0123456789")[0], 401)
        self.assertEqual(self.status(self.auth, None)[0], 401)
        self.assertEqual(self.status(self.auth, b"Basic abc")[0], 401)
        self.assertEqual(self.status(self.auth, b"Bearer " + ADMIN_SECRET.encode(), {b"token": [b"x"]})[0], 401)

    def test_without_admin_keys_nothing_is_open(self):
        auth = AdminAuthenticator([], [ApiKey("producer-a", API_SECRET.encode())])
        for header in (None, b"Bearer " + API_SECRET.encode(), b"Bearer anything-0123456789"):
            code, message = self.status(auth, header)
            self.assertEqual(code, 401)
            self.assertIn("admin_keys is not configured", message)


class AdminKeySettingsTests(unittest.TestCase):
    def test_option_env_file_and_flag(self):
        s = load_settings({"admin_keys": ADMIN_KEYS, "insecure_dev_mode": True}, env={})
        self.assertEqual([k.key_id for k in s.admin_keys], ["ops"])
        self.assertNotIn(ADMIN_SECRET, repr(s))
        s = load_settings({"insecure_dev_mode": True}, env={"PAYFLUX_ADMIN_KEYS": ADMIN_KEYS + ",ops2:" + "y" * 20})
        self.assertEqual([k.key_id for k in s.admin_keys], ["ops", "ops2"])
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("# operators\nops3:" + "z" * 20 + "\n")
        s = load_settings({"admin_keys_file": path, "insecure_dev_mode": True}, env={})
        self.assertEqual([k.key_id for k in s.admin_keys], ["ops3"])
        self.assertEqual((s.alerts_retention_days, load_settings({"insecure_dev_mode": True, "alerts_retention_days": "7"},
                                                                 env={}).alerts_retention_days), (30, 7))
        from payflux.tap import Options

        options = Options()
        options.parseOptions(["--admin-keys", ADMIN_KEYS, "--insecure-dev-mode"])
        self.assertEqual([k.key_id for k in options.settings.admin_keys], ["ops"])

    def test_admin_secret_that_is_a_producer_secret_is_refused_naming_the_field(self):
        with self.assertRaises(ConfigError) as e:
            load_settings({"api_keys": f"producer-a:{API_SECRET}", "admin_keys": f"ops:{API_SECRET}"}, env={})
        self.assertEqual(e.exception.option, "admin_keys")
        self.assertNotIn(API_SECRET, str(e.exception))
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(f"ops:{API_SECRET}\n")
        with self.assertRaises(ConfigError) as e:
            load_settings({"api_keys": f"producer-a:{API_SECRET}", "admin_keys_file": path}, env={})
        self.assertEqual(e.exception.option, "admin_keys_file")
        with self.assertRaises(ConfigError) as e:
            load_settings({"insecure_dev_mode": True, "admin_keys": "ops:short"}, env={})
        self.assertEqual(e.exception.option, "admin_keys")
        with self.assertRaises(ConfigError) as e:
            load_settings({"insecure_dev_mode": True, "alerts_retention_days": "0"}, env={})
        self.assertEqual(e.exception.option, "alerts_retention_days")


class SummaryTests(unittest.TestCase):
    def test_summary_numbers(self):
        def doc(type_: str, *outcomes: tuple[str, float]) -> dict:
            return {"type": type_, "outcomes": [{"outcome_type": t, "lead_time_seconds": s} for t, s in outcomes]}

        docs = [doc("failure_rate_spike", ("throttle", 60.0)), doc("failure_rate_spike", ("none", 5.0)),
                doc("failure_rate_spike", ("review", 300.0), ("hold", 120.0)), doc("failure_rate_spike"),
                doc("retry_storm", ("rate_limit", 30.0))]
        report = summarize(docs)
        self.assertEqual(report["by_type"]["failure_rate_spike"], {
            "alerts": 4, "outcomes": 4, "with_outcome": 3, "no_outcome": 1, "followed_by_action": 2,
            "action_share": 0.5, "lead_time_median_seconds": 90.0, "lead_time_p90_seconds": 120.0})
        self.assertEqual(report["by_type"]["failure_cluster"]["alerts"], 0)
        self.assertIsNone(report["by_type"]["failure_cluster"]["action_share"])
        self.assertEqual((report["all"]["alerts"], report["all"]["followed_by_action"],
                          report["all"]["lead_time_median_seconds"]), (5, 3, 60.0))


class FlakyRedis:
    """A real connection that fails every command like a lost connection while ``down``."""

    def __init__(self, redis: Any) -> None:
        self.redis = redis
        self.down = False

    def execute_command(self, *args: Any) -> defer.Deferred:
        if self.down:
            return defer.fail(txredisapi.ConnectionError("Not connected"))
        return self.redis.execute_command(*args)


class AlertsApiMixin:
    async def node(self, **options: Any):
        self.redis = getattr(self, "redis", None) or self.start_redis(appendonly=True)
        options.setdefault("admin_keys", ADMIN_KEYS)
        running = await start_node(self, self.redis.url, **options)
        await running.node.pool.whenConnected()
        self.store = AlertStore(running.node.pool, "payflux", 30, reactor.seconds)
        return running

    def get(self, running, path: str, secret: str | None = ADMIN_SECRET) -> defer.Deferred:
        headers = {"Authorization": [f"Bearer {secret}"]} if secret else {}
        return treq.get(running.side + path, headers=headers, persistent=False)

    def post(self, running, path: str, body: Any, secret: str | None = ADMIN_SECRET,
             content_type: str = "application/json") -> defer.Deferred:
        headers = {"Content-Type": [content_type]}
        if secret:
            headers["Authorization"] = [f"Bearer {secret}"]
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return treq.post(running.side + path, data=data, headers=headers, persistent=False)

    async def answer(self, d: defer.Deferred) -> tuple[int, Any]:
        response = await d
        body = await response.content()
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/json"], body[:200])
        return response.code, json.loads(body)

    async def record(self, *transitions: Transition) -> None:
        for tr in transitions:
            await self.store.record(tr)

    def fields(self, doc: dict) -> list[str]:
        return sorted(d["field"] for d in doc.get("details", []))

    # --- auth ---

    async def test_auth_no_key_producer_key_unknown_key_admin_key(self):
        running = await self.node()
        for path in ("/v1/alerts", "/v1/alerts/x"):
            code, doc = await self.answer(self.get(running, path, secret=None))
            self.assertEqual((code, doc["error"]), (401, "unauthorized"))
            code, doc = await self.answer(self.get(running, path, secret=API_SECRET))
            self.assertEqual((code, doc["error"], doc["message"]),
                             (403, "forbidden", "this is a producer key; the alerts API takes an admin key"))
            code, doc = await self.answer(self.get(running, path, secret="unknown-secret-0123456789"))
            self.assertEqual((code, doc["message"]), (401, "unknown admin key"))
        code, doc = await self.answer(self.post(running, "/v1/alerts/x/outcome", {}, secret=API_SECRET))
        self.assertEqual(code, 403)
        code, doc = await self.answer(self.get(running, "/v1/alerts"))
        self.assertEqual((code, doc), (200, {"alerts": [], "next_cursor": None}))
        # the admin key is not a producer key either
        response = await running.post("/v1/events/payment_exhaust", {}, secret=ADMIN_SECRET)
        self.assertEqual(response.code, 401)

    async def test_without_admin_keys_the_api_is_closed_even_in_dev_mode(self):
        running = await self.node(admin_keys="", insecure_dev_mode=True)
        for secret in (None, API_SECRET, "anything-0123456789abc"):
            code, doc = await self.answer(self.get(running, "/v1/alerts", secret=secret))
            self.assertEqual(code, 401)
            self.assertIn("admin_keys is not configured", doc["message"])

    # --- listing ---

    async def test_filters(self):
        running = await self.node()
        stripe = alert(opened=T0)
        adyen = alert(key=(("processor", "adyen"),), opened=T0 + 1000, severity="critical")
        merchant = alert(key=(("merchant_id_hash", "mer_1"),), opened=T0 + 2000)
        intent = alert("retry_storm", (("payment_intent_id_hash", "pi_9"),), T0 + 3000,
                       numbers={"attempts": 12, "processor": "checkout", "merchant_id_hash": "mer_2"})
        cluster = alert("failure_cluster", (("processor", "stripe"), ("failure_category", "a,b=c")), T0 + 4000)
        await self.record(opened(stripe), opened(adyen), opened(merchant), opened(intent), opened(cluster),
                          resolved(adyen))

        async def ids(query: str) -> list[str]:
            code, doc = await self.answer(self.get(running, "/v1/alerts" + query))
            self.assertEqual(code, 200, doc)
            return [a["alert_id"] for a in doc["alerts"]]

        everything = [cluster.alert_id, intent.alert_id, merchant.alert_id, adyen.alert_id, stripe.alert_id]
        self.assertEqual(await ids(""), everything)  # newest first
        self.assertEqual(await ids("?state=resolved"), [adyen.alert_id])
        self.assertEqual(await ids("?state=open"), [a for a in everything if a != adyen.alert_id])
        self.assertEqual(await ids("?type=retry_storm"), [intent.alert_id])
        self.assertEqual(await ids("?type=failure_cluster"), [cluster.alert_id])
        self.assertEqual(await ids("?processor=stripe"), [cluster.alert_id, stripe.alert_id])
        self.assertEqual(await ids("?processor=checkout"), [intent.alert_id])  # a per-intent storm's processor
        self.assertEqual(await ids("?merchant=mer_1"), [merchant.alert_id])
        self.assertEqual(await ids("?merchant=mer_2"), [intent.alert_id])
        self.assertEqual(await ids(f"?since={T0 + 2000}"), everything[:3])
        self.assertEqual(await ids("?since=" + quote(iso(T0 + 3000))), everything[:2])
        self.assertEqual(await ids("?since=2026-01-01T01:00:03%2B01:00"), everything[:2])  # an offset
        self.assertEqual(await ids("?limit=2"), everything[:2])
        self.assertEqual(await ids("?processor=stripe&type=failure_rate_spike&state=open"), [stripe.alert_id])
        code, doc = await self.answer(self.get(running, "/v1/alerts?type=failure_rate_spike&state=resolved"))
        [only] = doc["alerts"]
        self.assertEqual((only["state"], only["severity"], [t["action"] for t in only["transitions"]]),
                         ("resolved", "critical", ["opened", "resolved"]))

    async def test_paging_across_pages_has_no_duplicates_or_gaps(self):
        running = await self.node()
        # 23 alerts, some opened in the same millisecond (ties ordered by alert_id)
        alerts = [alert(key=(("processor", f"p{n:02d}"),), opened=T0 + (n // 3) * 1000) for n in range(23)]
        await self.record(*map(opened, alerts))
        expected = [a.alert_id for a in sorted(alerts, key=lambda a: (a.opened_at_ms, a.alert_id), reverse=True)]
        seen: list[str] = []
        cursor = None
        pages = 0
        while True:
            query = "?limit=5" + (f"&cursor={cursor}" if cursor else "")
            code, doc = await self.answer(self.get(running, "/v1/alerts" + query))
            self.assertEqual(code, 200, doc)
            seen += [a["alert_id"] for a in doc["alerts"]]
            pages += 1
            if pages == 2:  # alerts opened meanwhile (newer) don't shift the pages
                await self.record(opened(alert(key=(("processor", "late"),), opened=T0 + 99_000)))
            cursor = doc["next_cursor"]
            if cursor is None:
                break
        self.assertEqual(seen, expected)
        self.assertEqual(pages, 5)
        # a filter with paging: only the matches, in order, across pages
        seen, cursor = [], None
        while True:
            code, doc = await self.answer(self.get(running, "/v1/alerts?limit=2&since=" + str(T0 + 3000)
                                                   + (f"&cursor={cursor}" if cursor else "")))
            seen += [a["alert_id"] for a in doc["alerts"]]
            cursor = doc["next_cursor"]
            if cursor is None:
                break
        self.assertEqual(seen, [a for a in [self._late_id()] + expected if int(a.rsplit(":", 1)[1]) >= T0 + 3000])

    def _late_id(self) -> str:
        return alert(key=(("processor", "late"),), opened=T0 + 99_000).alert_id

    async def test_bad_query_values_name_the_field(self):
        running = await self.node()
        for query, field in [("state=closed", "state"), ("type=spike", "type"), ("limit=0", "limit"),
                             ("limit=501", "limit"), ("limit=ten", "limit"), ("limit=-1", "limit"),
                             ("since=yesterday", "since"), ("since=2026-02-30T00:00:00Z", "since"),
                             ("cursor=!!", "cursor"), ("cursor=eyJ4IjoxfQ", "cursor"), ("processor=", "processor"),
                             ("merchant=" + "m" * 300, "merchant"), ("colour=red", "colour"),
                             ("limit=1&limit=2", "limit")]:
            code, doc = await self.answer(self.get(running, "/v1/alerts?" + query))
            self.assertEqual((code, doc["error"], self.fields(doc)), (400, "invalid_request", [field]), query)
        code, doc = await self.answer(self.get(running, "/v1/alerts?state=x&limit=0"))
        self.assertEqual(self.fields(doc), ["limit", "state"])

    # --- one alert, outcomes ---

    async def test_get_one_alert_with_encoded_id_and_404(self):
        running = await self.node()
        a = alert("failure_cluster", (("processor", "stripe"), ("failure_category", "50%,off=yes")), T0)
        await self.record(opened(a), resolved(a))
        self.assertEqual(a.alert_id, f"failure_cluster:processor=stripe,failure_category=50%25%2Coff%3Dyes:{T0}")
        code, doc = await self.answer(self.get(running, "/v1/alerts/" + quote(a.alert_id, safe="")))
        self.assertEqual(code, 200, doc)
        self.assertEqual((doc["alert_id"], doc["key"], doc["state"], doc["opened_at"], doc["window_seconds"]),
                         (a.alert_id, {"processor": "stripe", "failure_category": "50%,off=yes"}, "resolved",
                          "2026-01-01T00:00:00.000Z", 10))
        self.assertEqual([(t["action"], t["reason"], t["at"]) for t in doc["transitions"]],
                         [("opened", "threshold", iso(T0)), ("resolved", "recovered", iso(T0 + 40_000))])
        self.assertEqual(doc["outcomes"], [])
        # ':' ',' '=' may be sent as they are; '%' must be encoded
        plain = alert(opened=T0 + 5)
        await self.record(opened(plain))
        code, doc = await self.answer(self.get(running, "/v1/alerts/" + plain.alert_id))
        self.assertEqual((code, doc["alert_id"]), (200, plain.alert_id))
        for path in ("/v1/alerts/failure_rate_spike:processor=nobody:1", "/v1/alerts/a/b"):
            code, doc = await self.answer(self.get(running, path))
            self.assertEqual((code, doc["error"]), (404, "not_found"), path)

    async def test_outcome_is_stored_with_lead_time_and_observed(self):
        running = await self.node()
        now_ms = int(time.time() * 1000)
        a = alert(opened=now_ms - 600_000)
        await self.record(opened(a))
        path = "/v1/alerts/" + quote(a.alert_id, safe="") + "/outcome"
        code, doc = await self.answer(self.post(running, path, {
            "outcome_type": "throttle", "observed_at": iso(now_ms - 300_000), "source": "stripe_webhook",
            "notes": "stripe throttled us"}))
        self.assertEqual(code, 201, doc)
        self.assertEqual({k: v for k, v in doc.items() if k != "recorded_at"}, {
            "alert_id": a.alert_id, "outcome_type": "throttle", "observed_at": iso(now_ms - 300_000),
            "source": "stripe_webhook", "notes": "stripe throttled us", "lead_time_seconds": 300.0})
        code, doc2 = await self.answer(self.post(running, path, {"outcome_type": "none",
                                                                 "observed_at": iso(now_ms - 590_000)}))
        self.assertEqual((code, doc2["source"], doc2["lead_time_seconds"]), (201, "manual", 10.0))
        # a late alert: the processor acted before it opened
        code, doc3 = await self.answer(self.post(running, path, {"outcome_type": "review",
                                                                 "observed_at": iso(now_ms - 660_000)}))
        self.assertEqual((code, doc3["lead_time_seconds"]), (201, -60.0))
        code, stored = await self.answer(self.get(running, "/v1/alerts/" + quote(a.alert_id, safe="")))
        self.assertEqual(stored["outcomes"], [{k: v for k, v in d.items() if k != "alert_id"} for d in (doc, doc2, doc3)])
        sample = running.metrics.registry.get_sample_value
        labels = {"alert_type": "failure_rate_spike", "outcome_type": "throttle"}
        self.assertEqual(sample("payflux_alert_outcome_lead_time_seconds_count", labels), 1)
        self.assertEqual(sample("payflux_alert_outcome_lead_time_seconds_sum", labels), 300.0)
        self.assertEqual(sample("payflux_alert_outcome_lead_time_seconds_bucket", {**labels, "le": "300.0"}), 1)
        self.assertEqual(sample("payflux_alert_outcome_lead_time_seconds_bucket", {**labels, "le": "120.0"}), 0)
        self.assertEqual(sample("payflux_alert_outcome_lead_time_seconds_bucket", {**labels, "le": "86400.0"}), 1)
        self.assertEqual(sample("payflux_alert_outcomes_late_total", {"alert_type": "failure_rate_spike",
                                                                      "outcome_type": "review"}), 1)
        text = (await (await running.get("/metrics", side=True)).content()).decode()
        self.assertIn('payflux_alert_outcome_lead_time_seconds_count{alert_type="failure_rate_spike",'
                      'outcome_type="throttle"} 1.0', text)

    async def test_bad_outcomes_name_the_field(self):
        running = await self.node()
        a = alert(opened=int(time.time() * 1000) - 60_000)
        await self.record(opened(a))
        path = "/v1/alerts/" + quote(a.alert_id, safe="") + "/outcome"
        good = {"outcome_type": "hold", "observed_at": iso(a.opened_at_ms + 1000)}
        for body, status, error, fields in [
            (b"{not json", 400, "malformed_json", []),
            (b'{"outcome_type":"hold","outcome_type":"hold"}', 400, "malformed_json", []),
            (b"[1, 2]", 422, "invalid_outcome", ["(body)"]),
            ({}, 422, "invalid_outcome", ["observed_at", "outcome_type"]),
            ({**good, "outcome_type": "panic"}, 422, "invalid_outcome", ["outcome_type"]),
            ({**good, "outcome_type": 3}, 422, "invalid_outcome", ["outcome_type"]),
            ({**good, "observed_at": "yesterday"}, 422, "invalid_outcome", ["observed_at"]),
            ({**good, "observed_at": 1767225600000}, 422, "invalid_outcome", ["observed_at"]),
            ({**good, "observed_at": "2099-01-01T00:00:00Z"}, 422, "invalid_outcome", ["observed_at"]),
            ({**good, "source": "pager"}, 422, "invalid_outcome", ["source"]),
            ({**good, "notes": "x" * 1001}, 422, "invalid_outcome", ["notes"]),
            ({**good, "notes": ["x"]}, 422, "invalid_outcome", ["notes"]),
            ({**good, "notes": "card 4111 1111 1111 1111"}, 422, "invalid_outcome", ["notes"]),
            ({**good, "severity": "high"}, 422, "invalid_outcome", ["severity"]),
        ]:
            code, doc = await self.answer(self.post(running, path, body))
            self.assertEqual((code, doc["error"], self.fields(doc)), (status, error, fields), body)
        code, doc = await self.answer(self.post(running, path, good, content_type="text/plain"))
        self.assertEqual((code, doc["error"]), (415, "unsupported_media_type"))
        code, doc = await self.answer(self.post(running, path, {**good, "notes": "x" * 20_000}))
        self.assertEqual((code, doc["error"]), (413, "payload_too_large"))
        code, doc = await self.answer(self.post(running, "/v1/alerts/nope:1/outcome", good))
        self.assertEqual((code, doc["error"]), (404, "not_found"))
        code, doc = await self.answer(self.post(running, path, {**good, "notes": "x" * 1000}))
        self.assertEqual(code, 201, doc)
        code, stored = await self.answer(self.get(running, "/v1/alerts/" + quote(a.alert_id, safe="")))
        self.assertEqual(len(stored["outcomes"]), 1)  # nothing of the refused ones was stored

    async def test_other_paths_and_methods_answer_json(self):
        running = await self.node()
        code, doc = await self.answer(self.get(running, "/v1/alerts/"))
        self.assertEqual((code, doc["error"]), (404, "not_found"))
        code, doc = await self.answer(self.post(running, "/v1/alerts", {}))
        self.assertEqual((code, doc["error"]), (405, "method_not_allowed"))
        code, doc = await self.answer(self.post(running, "/v1/alerts/x/outcome/more", {}))
        self.assertEqual((code, doc["error"]), (404, "not_found"))
        code, doc = await self.answer(treq.delete(running.side + "/v1/alerts/x", persistent=False))
        self.assertEqual(code, 405)

    async def test_the_side_listener_answers_hostile_heads_and_bodies_with_json(self):
        """The side port is on the ingest listener's HTTP layer: JSON 400/408/413/414/431, the
        outcome body capped while it is read (docs/security.md)."""
        running = await self.node(header_timeout="0.5")
        port = int(running.side.rsplit(":", 1)[1])
        auth = f"Authorization: Bearer {ADMIN_SECRET}\r\n".encode()
        cases = [
            (b"GET /v1/alerts?" + b"x" * 20000 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414, "uri_too_long"),
            (b"GET /v1/alerts HTTP/1.1\r\nHost: a\r\n" + b"X-Pad: " + b"y" * 70000 + b"\r\n\r\n", 431,
             "headers_too_large"),
            (b"GET /v1/alerts HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400, None),
            (b"POST /v1/alerts/x/outcome HTTP/1.1\r\nHost: a\r\n" + auth +
             b"Content-Type: application/json\r\nContent-Length: 20000\r\n\r\n", 413, "payload_too_large"),
            (b"GET /v1/alerts HTTP/1.1\r\nHost: a\r\n", 408, "request_timeout"),  # never finished
        ]
        for data, status, code in cases:
            answer, seconds, _ = await deferToThread(_raw_exchange, port, data, 5.0)
            head, _, body = answer.partition(b"\r\n\r\n")
            self.assertTrue(head.startswith(b"HTTP/1.1 %d " % status), (status, answer[:200]))
            self.assertIn(b"content-type: application/json", head.lower(), status)
            doc = json.loads(body)
            if code is not None:
                self.assertEqual(doc["error"], code)
            self.assertLess(seconds, 4.5, status)  # answered and closed, not left hanging
        # a body over the cap sent in full is refused too, and nothing was stored
        big = json.dumps({"outcome_type": "throttle", "observed_at": iso(T0), "notes": "n" * 20000}).encode()
        code, doc = await self.answer(self.post(running, "/v1/alerts/x/outcome", big))
        self.assertEqual((code, doc["error"]), (413, "payload_too_large"))

    async def test_redis_down_is_503_not_a_traceback(self):
        running = await self.node(redis_timeout="0.3")
        self.redis.pause()
        self.addCleanup(self.redis.resume)
        for path in ("/v1/alerts", "/v1/risk/processors", "/v1/risk/retry-advice?processor=a&failure_category=b"):
            code, doc = await self.answer(self.get(running, path))
            self.assertEqual((code, doc["error"]), (503, "redis_unavailable"), path)

    # --- the risk feeds: processor health and retry advice, from the risk consumer's snapshot ---

    async def test_risk_feeds_answer_from_the_health_snapshot(self):
        running = await self.node()
        advice_path = "/v1/risk/retry-advice?processor=stripe&failure_category=card_declined"
        for path in ("/v1/risk/processors", advice_path):
            code, doc = await self.answer(self.get(running, path, secret=None))
            self.assertEqual(code, 401, path)
            code, doc = await self.answer(self.get(running, path, secret=API_SECRET))
            self.assertEqual((code, doc["error"]), (403, "forbidden"), path)
        # no risk consumer has written a snapshot: nothing to show, and no samples behind the advice
        code, doc = await self.answer(self.get(running, "/v1/risk/processors"))
        self.assertEqual((code, doc), (200, {"as_of": None, "processors": []}))
        code, doc = await self.answer(self.get(running, advice_path))
        self.assertEqual((code, doc), (200, {"processor": "stripe", "failure_category": "card_declined",
                                             "advice": "retry", "retry_success_rate": None, "baseline": None,
                                             "sample_size": 0, "window_seconds": 60, "as_of": None}))
        # a real snapshot, as the risk consumer makes it: stripe failing 5% then 50%
        engine = RiskEngine()
        t0 = 1_700_000_000_000
        for second in range(200):
            for i in range(50):
                fail = (i % 20 == 0) if second < 150 else (i % 2 == 0)
                engine.observe({"processor": "stripe", "event_type": "payment_failed" if fail else "payment_succeeded",
                                "merchant_id_hash": f"m{i % 5}", "geo_bucket": "US",
                                "failure_category": "card_declined" if fail else None}, t0 + second * 1000 + i * 20)
        engine.advance(t0 + 201_000)
        snapshot = engine.health.snapshot()
        snapshot["retry"] = [{"processor": "stripe", "failure_category": "card_declined", "retry_success_rate": 0.02,
                              "baseline": 0.5, "sample_size": 200, "window_seconds": 60}]
        key = AlertKeys("payflux").health
        self.assertEqual(key, "payflux:{alerts}:risk:health")
        await running.node.pool.execute_command("SET", key, json.dumps(snapshot), "PX", "30000")
        code, doc = await self.answer(self.get(running, "/v1/risk/processors"))
        self.assertEqual(code, 200)
        self.assertEqual(doc, processors_answer(json.loads(json.dumps(snapshot))))
        [stripe] = doc["processors"]
        self.assertEqual((stripe["processor"], stripe["band"]), ("stripe", "critical"))
        self.assertEqual(stripe["drivers"][0]["name"], "high_failure_rate")
        self.assertGreater(stripe["drivers"][0]["contribution"], 0)
        self.assertEqual(doc["as_of"], iso(t0 + 201_000))
        code, doc = await self.answer(self.get(running, advice_path))
        self.assertEqual((code, doc["advice"], doc["sample_size"], doc["as_of"]), (200, "avoid", 200, iso(t0 + 201_000)))
        code, doc = await self.answer(self.get(running, "/v1/risk/retry-advice?processor=adyen&failure_category=card_declined"))
        self.assertEqual((doc["advice"], doc["sample_size"], doc["retry_success_rate"]), ("retry", 0, None))
        # what is there is not a snapshot: as if none
        await running.node.pool.execute_command("SET", key, "not json", "PX", "30000")
        code, doc = await self.answer(self.get(running, "/v1/risk/processors"))
        self.assertEqual((code, doc), (200, {"as_of": None, "processors": []}))

    async def test_risk_feeds_bad_queries_name_the_field(self):
        running = await self.node()
        cases = [
            ("/v1/risk/retry-advice", ["failure_category", "processor"]),
            ("/v1/risk/retry-advice?processor=stripe", ["failure_category"]),
            ("/v1/risk/retry-advice?processor=&failure_category=timeout", ["processor"]),
            ("/v1/risk/retry-advice?processor=a&processor=b&failure_category=timeout", ["processor"]),
            ("/v1/risk/retry-advice?processor=a&failure_category=" + "x" * 300, ["failure_category"]),
            ("/v1/risk/retry-advice?processor=a&failure_category=b&since=1", ["since"]),
            ("/v1/risk/processors?band=high", ["band"]),
        ]
        for path, fields in cases:
            code, doc = await self.answer(self.get(running, path))
            self.assertEqual((code, doc["error"], self.fields(doc)), (400, "invalid_request", fields), path)
        code, doc = await self.answer(self.post(running, "/v1/risk/processors", {}))
        self.assertEqual(code, 405)

    # --- durability, retention, outage ---

    async def test_alerts_survive_a_node_restart_and_a_redis_restart(self):
        running = await self.node()
        a = alert(opened=int(time.time() * 1000))
        await self.record(opened(a))
        await running.node.stopService()
        self.redis.restart()  # AOF on: the data comes back
        running = await self.node()
        code, doc = await self.answer(self.get(running, "/v1/alerts"))
        self.assertEqual([x["alert_id"] for x in doc["alerts"]], [a.alert_id])

    async def test_retention_expires_alerts_and_trims_the_index(self):
        running = await self.node()
        clock = task.Clock()
        clock.advance(time.time())
        store = AlertStore(running.node.pool, "payflux", 30, clock.seconds)
        keys = AlertKeys("payflux")
        old = alert(opened=int(clock.seconds() * 1000) - 40 * DAY_MS)
        kept = alert(key=(("processor", "adyen"),), opened=int(clock.seconds() * 1000) - 10 * DAY_MS)
        clock.advance(-40 * 86400)  # written 40 days ago
        await store.record(opened(old))
        clock.advance(30 * 86400)  # written 10 days ago
        await store.record(opened(kept))
        clock.advance(10 * 86400)  # now
        self.assertEqual(self.redis.sync_command("EXISTS", keys.alert(old.alert_id)), 0)  # expired in Redis
        self.assertEqual(self.redis.sync_command("ZCARD", keys.index), 2)  # until the next write trims it
        ttl = self.redis.sync_command("PTTL", keys.alert(kept.alert_id))
        self.assertLess(abs(ttl / DAY_MS - 20), 0.1)
        new = alert(key=(("processor", "checkout"),), opened=int(clock.seconds() * 1000))
        await store.record(opened(new))
        members = {m.decode() for m in self.redis.sync_command("ZRANGE", keys.index, "0", "-1")}
        self.assertEqual(members, {kept.alert_id, new.alert_id})
        self.assertLess(abs(self.redis.sync_command("PTTL", keys.alert(new.alert_id)) / DAY_MS - 30), 0.1)
        # an outcome is activity: the kept alert's retention starts again
        self.assertTrue(await store.record_outcome(kept.alert_id, {"outcome_type": "none", "lead_time_seconds": 1.0}))
        self.assertLess(abs(self.redis.sync_command("PTTL", keys.alert(kept.alert_id)) / DAY_MS - 30), 0.1)
        code, doc = await self.answer(self.get(running, "/v1/alerts"))
        self.assertEqual([x["alert_id"] for x in doc["alerts"]], [new.alert_id, kept.alert_id])

    async def test_store_keeps_transitions_through_an_outage_and_writes_them_in_order(self):
        running = await self.node()
        flaky = FlakyRedis(running.node.pool)
        h = RiskHandler(reactor=task.Clock(), idle_after_seconds=0)
        metrics = Metrics()
        h.bind_metrics(metrics, "risk")
        h.bind_alert_store(AlertStore(flaky, "payflux", 30, reactor.seconds))
        a = alert(opened=int(time.time() * 1000))
        escalate = Transition("escalate", attrs.evolve(a, severity="critical"), a.opened_at_ms + 2000, "threshold", {})
        resolve = Transition("resolve", attrs.evolve(a, severity="critical"), a.opened_at_ms + 40_000, "recovered", {})
        flaky.down = True
        h.engine.take = lambda: [opened(a)]
        await h.handle([])  # the batch succeeds: the transition waits in the outbox
        h.engine.take = lambda: [escalate]
        await h.handle([])
        self.assertEqual([t.action for t in h.records.outbox], ["open", "escalate"])
        self.assertEqual(metrics.registry.get_sample_value("payflux_risk_alert_delivery_failures_total",
                                                           {"consumer": "risk", "sink": "store"}), 2)
        self.assertIsNone(await self.store.get(a.alert_id))
        flaky.down = False
        h.engine.take = lambda: [resolve]
        await h.handle([])
        self.assertEqual(len(h.records.outbox), 0)
        doc = await self.store.get(a.alert_id)
        self.assertEqual([t["action"] for t in doc["transitions"]], ["opened", "escalated", "resolved"])
        self.assertEqual((doc["state"], doc["severity"]), ("resolved", "critical"))
        # a transition sent twice (a lost reply, then the retry) is recorded once
        await h.records.publish([resolve])
        self.assertEqual(len((await self.store.get(a.alert_id))["transitions"]), 3)

    async def test_risk_report_numbers_on_known_data(self):
        running = await self.node()
        now = int(time.time() * 1000)
        spikes = [alert(key=(("processor", f"p{n}"),), opened=now - 3_600_000 + n) for n in range(4)]
        storm = alert("retry_storm", (("processor", "stripe"),), now - 7_200_000)
        old = alert(key=(("processor", "old"),), opened=now - 3 * DAY_MS)
        await self.record(*map(opened, spikes + [storm, old]))
        for a, outcome, lead in [(spikes[0], "throttle", 60), (spikes[1], "none", 5), (spikes[2], "review", 300),
                                 (spikes[2], "hold", 120), (storm, "rate_limit", 30)]:
            code, _ = await self.answer(self.post(running, "/v1/alerts/" + quote(a.alert_id, safe="") + "/outcome",
                                                  {"outcome_type": outcome, "observed_at": iso(a.opened_at_ms + lead * 1000)}))
            self.assertEqual(code, 201)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            rc = cli_main(["risk", "report", "--redis-url", self.redis.url, "--since", "24h", "--json"])
        self.assertEqual(rc, 0)
        report = json.loads(out.getvalue())
        self.assertEqual(report["by_type"]["failure_rate_spike"], {
            "alerts": 4, "outcomes": 4, "with_outcome": 3, "no_outcome": 1, "followed_by_action": 2,
            "action_share": 0.5, "lead_time_median_seconds": 90.0, "lead_time_p90_seconds": 120.0})
        self.assertEqual(report["by_type"]["retry_storm"]["lead_time_median_seconds"], 30.0)
        self.assertEqual(report["all"]["alerts"], 5)  # the 3-day-old one is before --since
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            self.assertEqual(cli_main(["risk", "report", "--redis-url", self.redis.url]), 0)
        lines = out.getvalue().splitlines()
        self.assertIn("every stored alert", lines[0])
        row = next(line for line in lines if line.startswith("failure_rate_spike"))
        self.assertEqual(row.split(), ["failure_rate_spike", "5", "4", "2", "40%", "1m", "30s", "2m", "0s", "2"])
        # the status page's risk loop panel: the same summary
        response = await running.get("/status.json", side=True)
        loop = json.loads(await response.content())["risk"]["loop"]
        self.assertEqual(loop["status"], "ok")
        self.assertEqual(loop["by_type"], summarize([await self.store.get(a.alert_id) for a in spikes + [storm, old]])
                         ["by_type"])
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            self.assertEqual(cli_main(["risk", "report", "--redis-url", self.redis.url, "--since", "soon"]), 2)
        self.assertIn("--since must be", err.getvalue())


redis_test_cases(AlertsApiMixin, globals())


class WorkersAlertsApiTests(unittest.SynchronousTestCase):
    """``twistd -n payflux --workers 2`` for real: the supervisor's side port serves the alerts API on
    its own Redis pool, and its /metrics has the lead-time histogram."""

    def setUp(self):
        binaries = find_redis_binaries()
        binary = binaries.get("7") or binaries.get("6.2")
        if binary is None:
            raise unittest.SkipTest("no redis-server binary found")
        self.redis = RedisProcess(binary, testcase=self)

    def request(self, url: str, secret: str, body: dict | None = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {secret}", "Content-Type": "application/json"}
        status, raw = http_request(url, None if body is None else json.dumps(body).encode(), headers)
        return status, json.loads(raw)

    def test_supervisor_serves_the_alerts_api(self):
        port, side_port, workdir = free_port(), free_port(), self.mktemp()
        os.makedirs(workdir)
        log = open(os.path.join(workdir, "twistd.log"), "wb")
        self.addCleanup(log.close)
        proc = subprocess.Popen(
            [*TWISTD, "-n", "--pidfile=", "payflux", "--workers", "2", "--redis-url", self.redis.url,
             "--listen", f"tcp:{port}:interface=127.0.0.1", "--metrics-listen", f"tcp:{side_port}:interface=127.0.0.1",
             "--shutdown-grace", "2"],
            stdout=log, stderr=subprocess.STDOUT, cwd=workdir,
            env=clean_env(PAYFLUX_API_KEYS=API_KEYS, PAYFLUX_ADMIN_KEYS=ADMIN_KEYS))
        self.addCleanup(lambda: (proc.poll() is None and proc.kill(), proc.wait()))
        side = f"http://127.0.0.1:{side_port}"
        deadline = time.monotonic() + 20
        while http_request_or_none(side + "/ready") != 200:
            self.assertIsNone(proc.poll(), "the supervisor exited; see " + log.name)
            self.assertLess(time.monotonic(), deadline, "the workers did not become ready")
            time.sleep(0.05)
        a = alert(opened=int(time.time() * 1000) - 30_000)
        client = open_sync(self.redis.url, timeout=5)
        with client:
            _, args = record_args(opened(a))
            now = int(time.time() * 1000)
            evalsha_sync(client, RECORD, AlertKeys("payflux").of(a.alert_id),
                         args + [str(now), str(now + DAY_MS), str(now - DAY_MS), "100"])
        status, doc = self.request(side + "/v1/alerts", ADMIN_SECRET)
        self.assertEqual((status, [x["alert_id"] for x in doc["alerts"]]), (200, [a.alert_id]))
        self.assertEqual(self.request(side + "/v1/alerts", API_SECRET)[0], 403)
        status, doc = self.request(side + "/v1/alerts/" + quote(a.alert_id, safe="") + "/outcome", ADMIN_SECRET,
                                   {"outcome_type": "hold", "observed_at": iso(a.opened_at_ms + 20_000)})
        self.assertEqual((status, doc["lead_time_seconds"]), (201, 20.0))
        metrics = http_request(side + "/metrics")[1].decode()
        self.assertIn('payflux_alert_outcome_lead_time_seconds_count{alert_type="failure_rate_spike",'
                      'outcome_type="hold"} 1.0', metrics)


def http_request_or_none(url: str) -> int | None:
    try:
        return http_request(url)[0]
    except OSError:
        return None
