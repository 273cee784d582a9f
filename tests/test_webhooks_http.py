"""
The processor webhook routes, end to end (payflux/ingest/webhooks.py; docs/producers.md,
"Processor webhooks"): a real node on real sockets, a real redis-server.  Deliveries are the
fixtures of tests/fixtures/webhooks/ signed here as Stripe and Adyen sign them; the tests read
the stream and every Redis key back, and the node's metrics.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import time
from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from payflux.cli import main as cli_main
from payflux.config import ConfigError, load_settings
from payflux.observability.metrics import WEBHOOK_TYPE_LABELS, Metrics, WorkerTotals
from payflux.risk.alerts import Alert, Transition
from payflux.risk.store import AlertStore
from payflux.webhooks import hash_id
from tests.support.node import start_node
from tests.support.redis import redis_test_cases
from tests.test_ingest import _raw_http
from tests.test_webhooks_mapping import ADYEN_KEY, KEY, SECRET, adyen_body, adyen_doc, raw, secrets_of, stripe_header

STREAM = "payflux:{0}:events"
STRIPE, ADYEN = "/v1/webhooks/stripe", "/v1/webhooks/adyen"
ADYEN_HEX = ADYEN_KEY.hex().upper()
OPTIONS = {"stripe_webhook_secret": SECRET.decode(), "adyen_hmac_key": ADYEN_HEX, "id_hash_key": KEY.decode()}


def stripe_doc(name: str) -> dict:
    return json.loads(raw("stripe", name))


def opened(type_: str, key: tuple, opened_ms: int) -> Transition:
    a = Alert(type_, key, "warning", 60, opened_ms, {"failure_rate": 0.3})
    return Transition("open", a, opened_ms, "threshold", {"failure_rate": 0.3})


class WebhookHttpMixin:
    async def node(self, **options: Any):
        self.redis = getattr(self, "redis", None) or self.start_redis()
        for name, value in OPTIONS.items():
            options.setdefault(name, value)
        options = {k: v for k, v in options.items() if v is not None}
        running = await start_node(self, self.redis.url, **options)
        await running.node.pool.whenConnected()
        self.running = running
        self.store = AlertStore(running.node.pool, "payflux", 30, reactor.seconds)
        return running

    def stripe(self, body: bytes, header: str | None = "sign", t: int | None = None) -> Any:
        headers = {"Content-Type": ["application/json; charset=utf-8"], "User-Agent": ["Stripe/1.0 (+https://stripe.com/docs/webhooks)"]}
        if header == "sign":
            header = stripe_header(body, SECRET, int(time.time()) if t is None else t)
        if header is not None:
            headers["Stripe-Signature"] = [header]
        return treq.post(self.running.base + STRIPE, data=body, headers=headers, persistent=False)

    def adyen(self, body: bytes) -> Any:
        return treq.post(self.running.base + ADYEN, data=body, headers={"Content-Type": ["application/json"]},
                         persistent=False)

    async def answer(self, d) -> tuple[int, str, bytes]:
        response = await d
        body = await response.content()
        self.last_headers = response.headers
        return response.code, (response.headers.getRawHeaders("content-type") or [""])[0], body

    def xlen(self) -> int:
        return self.redis.sync_command("XLEN", STREAM)

    def stored(self) -> list[dict]:
        entries = self.redis.sync_command("XRANGE", STREAM, "-", "+")
        return [json.loads(dict(zip(f[::2], f[1::2]))[b"data"]) for _, f in entries]

    def everything_in_redis(self) -> str:
        """Every key and every value of every key, as one text."""
        out = []
        for key in self.redis.sync_command("KEYS", "*"):
            kind = self.redis.sync_command("TYPE", key)
            kind = kind.decode() if isinstance(kind, bytes) else str(kind)
            value = {"string": ("GET",), "hash": ("HGETALL",), "stream": ("XRANGE", "-", "+"),
                     "zset": ("ZRANGE", "0", "-1"), "set": ("SMEMBERS",), "list": ("LRANGE", "0", "-1")}[kind]
            out.append(repr(key) + repr(self.redis.sync_command(value[0], key, *value[1:])))
        return "\n".join(out)

    def sample(self, name: str, **labels: str) -> float:
        return self.running.metrics.registry.get_sample_value(name, labels) or 0.0

    def requests(self, processor: str, result: str) -> float:
        return self.sample("payflux_webhook_requests_total", processor=processor, result=result)

    # --- a delivery lands ---

    async def test_stripe_delivery_lands_as_a_seed_shaped_event_with_hashed_ids(self):
        await self.node()
        body = raw("stripe", "payment_intent.payment_failed")  # the bytes as Stripe sends them
        code, ctype, answer = await self.answer(self.stripe(body))
        self.assertEqual((code, ctype, answer), (200, "application/json", b'{"received":true}'))
        doc = stripe_doc("payment_intent.payment_failed")
        pi = doc["data"]["object"]
        [event] = self.stored()
        self.assertEqual({k: event[k] for k in ("event_id", "event_type", "processor", "system_source",
                                                "retry_result", "failure_category", "failure_origin")},
                         {"event_id": doc["id"], "event_type": "payment_intent.payment_failed", "processor": "stripe",
                          "system_source": "stripe_webhook", "retry_result": "failed",
                          "failure_category": "insufficient_funds", "failure_origin": "issuer"})
        self.assertEqual(event["merchant_id_hash"], hash_id(KEY, doc["account"]))
        self.assertEqual(event["payment_intent_id_hash"], hash_id(KEY, pi["id"]))
        self.assertEqual(event["customer_id_hash"], hash_id(KEY, pi["customer"]))
        leaks = secrets_of(doc) - {doc["id"]}  # the evt_ id is the event_id, deliberately
        self.assertTrue(leaks)
        everything = self.everything_in_redis()
        self.assertEqual([s for s in leaks if s in everything], [])
        self.assertEqual(self.requests("stripe", "accepted"), 1)
        self.assertEqual(self.sample("payflux_webhook_events_total", processor="stripe",
                                     event_type="payment_intent.payment_failed", outcome="accepted"), 1)
        self.assertEqual(self.sample("payflux_events_accepted_total", key_id="webhook:stripe"), 1)
        self.assertEqual(self.sample("payflux_request_duration_seconds_count", endpoint="webhook_stripe",
                                     status="200"), 1)

    async def test_adyen_delivery_answers_accepted_with_hashed_ids(self):
        await self.node()
        doc = adyen_doc("batch_mixed")
        code, ctype, answer = await self.answer(self.adyen(adyen_body(doc)))
        self.assertEqual((code, ctype, answer), (200, "text/plain; charset=utf-8", b"[accepted]"))
        stored = self.stored()
        items = [w["NotificationRequestItem"] for w in doc["notificationItems"]]
        mapped = [i for i in items if i["eventCode"] in ("AUTHORISATION", "REFUND", "CHARGEBACK",
                                                          "NOTIFICATION_OF_FRAUD")
                  and (i["success"] == "true" or i["eventCode"] == "AUTHORISATION")]
        self.assertTrue(stored)
        self.assertEqual(len(stored), len(mapped))
        for event, item in zip(stored, mapped):
            self.assertEqual((event["processor"], event["system_source"], event["event_type"]),
                             ("adyen", "adyen_webhook", item["eventCode"]))
            self.assertTrue(event["event_id"].startswith("adyen:"))
            self.assertEqual(event["merchant_id_hash"], hash_id(KEY, item["merchantAccountCode"]))
        everything = self.everything_in_redis()
        leaks = secrets_of(doc)
        self.assertIn(items[0]["pspReference"], leaks)
        self.assertEqual([s for s in leaks if s in everything], [])
        self.assertEqual(self.requests("adyen", "accepted"), 1)

    # --- refused deliveries write nothing ---

    async def test_bad_stale_missing_signatures_write_nothing_and_secrets_stay_out_of_logs(self):
        lines: list[str] = []

        def observe(event: dict) -> None:
            lines.append(str(formatEvent(event)) + repr(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        await self.node()
        body = raw("stripe", "charge.dispute.created")
        now = int(time.time())
        for header, status, error in [
            (None, 401, "missing_signature"),
            (stripe_header(body, b"whsec_wrong_secret_0123456789", now), 401, "signature_mismatch"),
            (stripe_header(body, SECRET, now - 3600), 401, "stale_timestamp"),
            (stripe_header(body, SECRET, now + 3600), 401, "stale_timestamp"),
            ("garbage", 400, "malformed_signature"),
            (f"t={now}", 400, "no_v1_signature"),
        ]:
            code, ctype, answer = await self.answer(self.stripe(body, header))
            self.assertEqual((code, ctype, json.loads(answer)["error"]), (status, "application/json", error), header)
        signed = stripe_header(body, SECRET, now)
        code, _, answer = await self.answer(self.stripe(body.replace(b"12500", b"12501"), signed))
        self.assertEqual((code, json.loads(answer)["error"]), (401, "signature_mismatch"))  # body changed in transit
        # Adyen: one item signed with another key refuses the whole notification
        doc = adyen_doc("batch_mixed")
        code, _, answer = await self.answer(self.adyen(adyen_body(doc, keys={1: b"\x01" * 32})))
        self.assertEqual((code, json.loads(answer)["error"]), (401, "signature_mismatch"))
        code, _, answer = await self.answer(self.adyen(b'{"live":"false"}'))
        self.assertEqual((code, json.loads(answer)["error"]), (400, "malformed_notification"))
        self.assertEqual(self.xlen(), 0)
        self.assertEqual(self.requests("stripe", "rejected_signature"), 7)
        self.assertEqual(self.requests("adyen", "rejected_signature"), 1)
        self.assertEqual(self.requests("adyen", "rejected_malformed"), 1)
        self.assertEqual(self.sample("payflux_request_duration_seconds_count", endpoint="webhook_stripe",
                                     status="401"), 5)
        text = "\n".join(lines)
        self.assertIn("processor webhooks on", text)
        for secret in (SECRET.decode(), KEY.decode(), ADYEN_HEX, ADYEN_HEX.lower()):
            self.assertNotIn(secret, text)

    async def test_redelivery_is_a_duplicate_and_still_acknowledged(self):
        await self.node()
        body = raw("stripe", "payment_intent.succeeded")
        for _ in range(2):  # Stripe signs each delivery afresh
            code, _, _ = await self.answer(self.stripe(body))
            self.assertEqual(code, 200)
        adyen = adyen_body(adyen_doc("refund"))
        for _ in range(2):
            code, _, answer = await self.answer(self.adyen(adyen))
            self.assertEqual((code, answer), (200, b"[accepted]"))
        self.assertEqual(self.xlen(), 2)
        for processor in ("stripe", "adyen"):
            self.assertEqual((self.requests(processor, "accepted"), self.requests(processor, "duplicate")), (1, 1))
        self.assertEqual(self.sample("payflux_webhook_events_total", processor="adyen", event_type="REFUND",
                                     outcome="duplicate"), 1)

    async def test_same_event_id_with_another_payload_is_a_conflict_acknowledged_and_the_rest_appended(self):
        await self.node()
        doc = stripe_doc("payment_intent.succeeded")
        code, _, _ = await self.answer(self.stripe(json.dumps(doc).encode()))
        self.assertEqual(code, 200)
        doc["data"]["object"]["amount_received"] = 99_999_00  # another payload under the same evt_ id
        code, _, answer = await self.answer(self.stripe(json.dumps(doc).encode()))
        self.assertEqual((code, answer), (200, b'{"received":true}'))
        self.assertEqual(self.requests("stripe", "conflict"), 1)
        refund = adyen_doc("refund")
        code, _, _ = await self.answer(self.adyen(adyen_body(refund)))
        self.assertEqual(code, 200)
        changed = copy.deepcopy(refund)
        changed["notificationItems"][0]["NotificationRequestItem"]["amount"]["currency"] = "SEK"  # another payload
        changed["notificationItems"].append(adyen_doc("authorisation_success")["notificationItems"][0])
        code, _, answer = await self.answer(self.adyen(adyen_body(changed)))
        self.assertEqual((code, answer), (200, b"[accepted]"))
        self.assertEqual(self.xlen(), 3)  # the first Stripe event, the refund, the new authorisation
        self.assertEqual([e["event_type"] for e in self.stored()], ["payment_intent.succeeded", "REFUND",
                                                                   "AUTHORISATION"])
        self.assertEqual(self.sample("payflux_webhook_events_total", processor="adyen", event_type="REFUND",
                                     outcome="conflict"), 1)
        self.assertEqual(self.requests("adyen", "accepted"), 2)

    async def test_unmapped_type_is_acknowledged_counted_and_not_rate_limited(self):
        await self.node(rate_limit="1", rate_burst="1")
        body = raw("stripe", "customer.created")
        for _ in range(3):
            code, _, answer = await self.answer(self.stripe(body))
            self.assertEqual((code, answer), (200, b'{"received":true}'))
        code, _, _ = await self.answer(self.stripe(raw("stripe", "payment_intent.succeeded")))
        self.assertEqual(code, 200)  # webhooks spend no producer key's rate
        self.assertEqual(self.xlen(), 1)
        self.assertEqual(self.requests("stripe", "ignored"), 3)
        self.assertEqual(self.sample("payflux_webhook_events_total", processor="stripe", event_type="customer.created",
                                     outcome="unmapped_type"), 3)

    async def test_mapped_event_the_validator_refuses_is_acknowledged_counted_not_written(self):
        await self.node()
        doc = stripe_doc("payment_intent.succeeded")
        doc["created"] = int(time.time()) + 3600  # beyond future_skew (300 s)
        code, _, answer = await self.answer(self.stripe(json.dumps(doc).encode()))
        self.assertEqual((code, answer), (200, b'{"received":true}'))
        self.assertEqual(self.xlen(), 0)
        self.assertEqual(self.requests("stripe", "invalid_event"), 1)
        self.assertEqual(self.sample("payflux_webhook_events_total", processor="stripe",
                                     event_type="payment_intent.succeeded", outcome="invalid"), 1)

    async def test_routes_are_404_unless_their_secret_is_configured(self):
        await self.node(stripe_webhook_secret=None, adyen_hmac_key=None, id_hash_key=None)
        for path in (STRIPE, ADYEN):
            response = await treq.post(self.running.base + path, data=b"{}", persistent=False)
            self.assertEqual((response.code, json.loads(await response.content())["error"]), (404, "not_found"))
        await self.running.node.stopService()
        await self.node(adyen_hmac_key=None)
        code, _, answer = await self.answer(self.adyen(adyen_body(adyen_doc("refund"))))
        self.assertEqual((code, json.loads(answer)["error"]), (404, "not_found"))
        code, _, _ = await self.answer(self.stripe(raw("stripe", "payment_intent.succeeded")))
        self.assertEqual(code, 200)

    async def test_oversize_body_is_413_before_it_is_read(self):
        running = await self.node()
        head = (b"POST /v1/webhooks/stripe HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Stripe-Signature: t=1,v1=00\r\nContent-Length: %d\r\n\r\n" % (256 * 1024 + 1))
        started = time.monotonic()
        reply = await deferToThread(_raw_http, running.ingest_port, head)  # no body byte sent
        self.assertTrue(reply.startswith(b"HTTP/1.1 413 "), reply[:200])
        self.assertLess(time.monotonic() - started, 2.0)
        # Adyen's cap is 1 MiB: a chunked body past it is refused as it arrives
        chunk = b"x" * 65536
        chunked = (b"POST /v1/webhooks/adyen HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                   + (b"%x\r\n%s\r\n" % (len(chunk), chunk)) * 17)
        reply = await deferToThread(_raw_http, running.ingest_port, chunked)
        self.assertTrue(reply.startswith(b"HTTP/1.1 413 "), reply[:200])
        self.assertEqual(self.xlen(), 0)
        self.assertEqual((self.requests("stripe", "too_large"), self.requests("adyen", "too_large")), (1, 1))

    async def test_redis_down_is_503_with_retry_after_then_the_retry_lands(self):
        await self.node(redis_timeout="0.3")
        body = raw("stripe", "payment_intent.succeeded")
        self.redis.pause()
        self.addCleanup(self.redis.resume)
        code, _, answer = await self.answer(self.stripe(body))
        self.assertEqual(code, 503, answer)
        self.assertTrue(self.last_headers.getRawHeaders("retry-after"))
        code, _, answer = await self.answer(self.adyen(adyen_body(adyen_doc("refund"))))
        self.assertEqual(code, 503, answer)
        self.redis.resume()
        for _ in range(50):
            code, _, _ = await self.answer(self.stripe(body))
            if code == 200:
                break
            await deferLater(reactor, 0.1, lambda: None)
        self.assertEqual((code, self.xlen()), (200, 1))
        self.assertGreaterEqual(self.requests("stripe", "unavailable"), 1)
        self.assertEqual(self.requests("adyen", "unavailable"), 1)

    async def test_draining_node_answers_503(self):
        running = await self.node()
        await running.app.start_draining()
        code, _, answer = await self.answer(self.stripe(raw("stripe", "payment_intent.succeeded")))
        self.assertEqual((code, json.loads(answer)["error"]), (503, "draining"))

    # --- outcome signals ---

    async def test_disputes_fraud_warnings_and_chargebacks_record_outcomes_on_open_alerts(self):
        running = await self.node()
        efw, dispute = stripe_doc("radar.early_fraud_warning.created"), stripe_doc("charge.dispute.created")
        merchant = hash_id(KEY, dispute["account"])
        opened_ms = (efw["created"] - 600) * 1000
        stripe_alert = opened("failure_rate_spike", (("processor", "stripe"),), opened_ms)
        merchant_alert = opened("failure_cluster", (("merchant_id_hash", merchant), ("processor", "paypal")), opened_ms)
        adyen_alert = opened("failure_rate_spike", (("processor", "adyen"),), 1766235600_000 - 300_000)
        closed = opened("failure_rate_spike", (("processor", "stripe"),), opened_ms - 60_000)
        for tr in (stripe_alert, merchant_alert, adyen_alert, closed):
            await self.store.record(tr)
        await self.store.record(Transition("resolve", closed.alert, opened_ms, "recovered", {}))

        code, _, _ = await self.answer(self.stripe(json.dumps(efw).encode()))
        self.assertEqual(code, 200)
        await running.app.webhooks.settled()
        doc = await self.store.get(stripe_alert.alert.alert_id)
        [outcome] = doc["outcomes"]
        self.assertEqual({k: v for k, v in outcome.items() if k != "recorded_at"}, {
            "outcome_type": "other", "observed_at": "2025-12-03T22:00:01.000Z", "source": "stripe_webhook",
            "notes": "radar.early_fraud_warning.created fraud_type=made_with_stolen_card",
            "lead_time_seconds": 600.0, "event_id": efw["id"]})
        self.assertEqual(len((await self.store.get(merchant_alert.alert.alert_id))["outcomes"]), 1)
        self.assertEqual((await self.store.get(adyen_alert.alert.alert_id))["outcomes"], [])
        self.assertEqual((await self.store.get(closed.alert.alert_id))["outcomes"], [])
        lead = {"alert_type": "failure_rate_spike", "outcome_type": "other"}
        self.assertEqual(self.sample("payflux_alert_outcome_lead_time_seconds_count", **lead), 1)
        self.assertEqual(self.sample("payflux_alert_outcome_lead_time_seconds_sum", **lead), 600.0)
        self.assertEqual(self.sample("payflux_alert_outcome_lead_time_seconds_count", alert_type="failure_cluster",
                                     outcome_type="other"), 1)

        for _ in range(2):  # the dispute, then its redelivery: recorded once
            code, _, _ = await self.answer(self.stripe(raw("stripe", "charge.dispute.created")))
            self.assertEqual(code, 200)
            await running.app.webhooks.settled()
        doc = await self.store.get(stripe_alert.alert.alert_id)
        self.assertEqual([o["notes"].split()[0] for o in doc["outcomes"]],
                         ["radar.early_fraud_warning.created", "charge.dispute.created"])
        self.assertEqual(self.sample("payflux_webhook_outcomes_recorded_total", processor="stripe"), 4)

        code, _, _ = await self.answer(self.adyen(adyen_body(adyen_doc("chargeback"))))
        self.assertEqual(code, 200)
        await running.app.webhooks.settled()
        [outcome] = (await self.store.get(adyen_alert.alert.alert_id))["outcomes"]
        self.assertEqual((outcome["source"], outcome["notes"], outcome["lead_time_seconds"]),
                         ("adyen_webhook", "CHARGEBACK reason_code=10_4", 300.0))
        self.assertEqual(self.sample("payflux_alert_outcome_lead_time_seconds_count", **lead), 3)
        self.assertEqual(self.sample("payflux_webhook_outcomes_recorded_total", processor="adyen"), 1)
        self.assertEqual(self.sample("payflux_webhook_outcome_failures_total", processor="stripe"), 0)

    async def test_an_outcome_that_cannot_be_recorded_never_fails_the_delivery(self):
        running = await self.node()
        efw = stripe_doc("radar.early_fraud_warning.created")
        tr = opened("failure_rate_spike", (("processor", "stripe"),), (efw["created"] - 60) * 1000)
        await self.store.record(tr)
        for _ in range(100):  # the most outcomes an alert holds
            await self.store.record_outcome(tr.alert.alert_id, {"outcome_type": "none", "lead_time_seconds": 1.0})
        code, _, answer = await self.answer(self.stripe(json.dumps(efw).encode()))
        self.assertEqual((code, answer), (200, b'{"received":true}'))
        await running.app.webhooks.settled()
        self.assertEqual(self.xlen(), 1)
        self.assertEqual(self.sample("payflux_webhook_outcome_failures_total", processor="stripe"), 1)
        self.assertEqual(self.sample("payflux_webhook_outcomes_recorded_total", processor="stripe"), 0)


redis_test_cases(WebhookHttpMixin, globals(), versions=("7",))


class WebhookSettingsTests(unittest.TestCase):
    def settings(self, env: dict | None = None, **cli: Any):
        return load_settings({"insecure_dev_mode": True, **cli}, env=env or {})

    def refused(self, **cli: Any) -> ConfigError:
        with self.assertRaises(ConfigError) as e:
            self.settings(**cli)
        return e.exception

    def test_options_env_files_and_flags(self):
        s = self.settings(stripe_webhook_secret="whsec_new_0123,whsec_old_4567", adyen_hmac_key=ADYEN_HEX,
                          id_hash_key=KEY.decode())
        self.assertEqual((s.stripe_webhook_secret, s.adyen_hmac_key, s.id_hash_key),
                         ((b"whsec_new_0123", b"whsec_old_4567"), (ADYEN_KEY,), KEY))
        for secret in ("whsec_new_0123", KEY.decode(), ADYEN_HEX):
            self.assertNotIn(secret, repr(s))
        s = self.settings(env={"PAYFLUX_STRIPE_WEBHOOK_SECRET": "whsec_env_0123", "PAYFLUX_ID_HASH_KEY": KEY.decode(),
                               "PAYFLUX_ADYEN_HMAC_KEY": ADYEN_HEX.lower()})
        self.assertEqual((s.stripe_webhook_secret, s.adyen_hmac_key), ((b"whsec_env_0123",), (ADYEN_KEY,)))
        stripe_file, adyen_file, key_file = self.mktemp(), self.mktemp(), self.mktemp()
        with open(stripe_file, "w") as f:
            f.write("# rolling\nwhsec_file_new\n\nwhsec_file_old\n")
        with open(adyen_file, "w") as f:
            f.write(ADYEN_HEX + "\n")
        with open(key_file, "w") as f:
            f.write(KEY.decode() + "\n")
        s = self.settings(stripe_webhook_secret="whsec_inline", stripe_webhook_secret_file=stripe_file,
                          adyen_hmac_key_file=adyen_file, id_hash_key_file=key_file)
        self.assertEqual(s.stripe_webhook_secret, (b"whsec_inline", b"whsec_file_new", b"whsec_file_old"))
        self.assertEqual((s.adyen_hmac_key, s.id_hash_key), ((ADYEN_KEY,), KEY))
        from payflux.tap import Options

        options = Options()
        options.parseOptions(["--insecure-dev-mode", "--stripe-webhook-secret", "whsec_flag",
                              "--id-hash-key", KEY.decode()])
        self.assertEqual(options.settings.stripe_webhook_secret, (b"whsec_flag",))

    def test_config_errors_name_the_field_never_the_secret(self):
        e = self.refused(stripe_webhook_secret="whsec_x")
        self.assertEqual(e.option, "id_hash_key")
        self.assertIn("required", str(e))
        self.assertNotIn("whsec_x", str(e))
        self.assertEqual(self.refused(adyen_hmac_key=ADYEN_HEX).option, "id_hash_key")
        e = self.refused(adyen_hmac_key="not-hex-secretish", id_hash_key=KEY.decode())
        self.assertEqual(e.option, "adyen_hmac_key")
        self.assertIn("hexadecimal", str(e))
        self.assertNotIn("secretish", str(e))
        e = self.refused(stripe_webhook_secret="whsec_x", id_hash_key="short-key")
        self.assertEqual(e.option, "id_hash_key")
        self.assertIn("at least 16 bytes", str(e))
        self.assertNotIn("short-key", str(e))
        bad = self.mktemp()
        with open(bad, "w") as f:
            f.write("zz-not-hex\n")
        self.assertEqual(self.refused(adyen_hmac_key_file=bad, id_hash_key=KEY.decode()).option, "adyen_hmac_key_file")
        self.assertEqual(self.refused(stripe_webhook_secret_file=bad + ".missing", id_hash_key=KEY.decode()).option,
                         "stripe_webhook_secret_file")
        key_file = self.mktemp()
        with open(key_file, "w") as f:
            f.write(KEY.decode())
        self.assertEqual(self.refused(id_hash_key=KEY.decode(), id_hash_key_file=key_file).option, "id_hash_key_file")
        # an id_hash_key alone (no webhook) is fine: the producers' hash_id may share it
        self.assertEqual(self.settings(id_hash_key=KEY.decode()).id_hash_key, KEY)

    def test_check_config_shows_no_secret(self):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = cli_main(["check-config", "--insecure-dev-mode", "--stripe-webhook-secret", "whsec_shown_never",
                             "--adyen-hmac-key", ADYEN_HEX, "--id-hash-key", KEY.decode()])
        text = out.getvalue()
        self.assertEqual(code, 0, text)
        for name in ("stripe_webhook_secret", "adyen_hmac_key", "id_hash_key"):
            line = next(line for line in text.splitlines() if line.split()[:1] == [name])
            self.assertIn("(set, redacted)", line)
        for secret in ("whsec_shown_never", ADYEN_HEX, KEY.decode()):
            self.assertNotIn(secret, text)



class WorkerMetricsTests(unittest.TestCase):
    def test_supervisor_metrics_add_its_workers_webhook_counts_and_lead_times_to_its_own(self):
        """Under --workers the webhooks run in the workers, the alerts API in the supervisor: both
        observe the lead-time histogram, and the supervisor's /metrics shows the sum."""
        supervisor, worker = Metrics(), Metrics()
        supervisor.observe_outcome("failure_rate_spike", "other", 30.0)  # the alerts API
        worker.observe_outcome("failure_rate_spike", "other", 600.0)  # a webhook's signal
        worker.webhook_requests.labels("stripe", "accepted").inc()
        worker.count_webhook_event("stripe", "charge.dispute.created", "accepted")
        text = WorkerTotals().render(supervisor.registry, [worker.render().decode()]).decode()
        lead = 'payflux_alert_outcome_lead_time_seconds_count{alert_type="failure_rate_spike",outcome_type="other"}'
        self.assertIn(lead + " 2.0", text)
        self.assertIn('payflux_alert_outcome_lead_time_seconds_sum{alert_type="failure_rate_spike",'
                      'outcome_type="other"} 630.0', text)
        self.assertIn('payflux_webhook_requests_total{processor="stripe",result="accepted"} 1.0', text)
        self.assertIn('payflux_webhook_events_total{event_type="charge.dispute.created",outcome="accepted",'
                      'processor="stripe"} 1.0', text)
        self.assertEqual(text.count("# TYPE payflux_alert_outcome_lead_time_seconds histogram"), 1)

    def test_event_type_labels_are_bounded(self):
        m = Metrics()
        for n in range(WEBHOOK_TYPE_LABELS + 5):
            m.count_webhook_event("stripe", f"type.{n}", "unmapped_type")
        sample = m.registry.get_sample_value
        self.assertEqual(sample("payflux_webhook_events_total", {"processor": "stripe", "event_type": "<other>",
                                                                 "outcome": "unmapped_type"}), 5)
