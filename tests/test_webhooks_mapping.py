"""Tests for payflux.webhooks: Stripe and Adyen deliveries verified as each processor documents
it, mapped to events PayFlux's own validator accepts, ids hashed and never leaked, outcome signals
for disputes and fraud (docs/producers.md, "Processor webhooks").

The fixtures (tests/fixtures/webhooks/) are shaped like the processors' documented objects, with
realistic ids, e-mails and fingerprints; the tests sign them here (Stripe: the Stripe-Signature
header; Adyen: each item's hmacSignature) with test secrets."""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import json
import os
import re

from twisted.trial.unittest import SynchronousTestCase

from payflux.events import EventValidator, ValidationPolicy
from payflux.webhooks import ACCEPTED, IGNORED, REJECTED, AdyenWebhook, Ignored, StripeWebhook, hash_id
from payflux.webhooks.adyen import item_signature, parse_hmac_key, signing_string
from payflux.webhooks.common import IdHasher, amount_bucket, iso_from_rfc3339, token
from payflux.webhooks.failures import ADYEN_REFUSALS, CATEGORIES, STRIPE_CODES, adyen_refusal, stripe_payment_error
from payflux.webhooks.stripe import EXPONENTS as STRIPE_EXPONENTS, verify_signature

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "webhooks")
KEY = b"payflux-test-id-hash-key-0123456789"
SECRET = b"whsec_test_5f3b8c2a9d4e7f1a6b0c3d8e2f5a9b7c"
OLD_SECRET = b"whsec_test_old_0a1b2c3d4e5f60718293a4b5c6d7e8f9"
ADYEN_KEY = bytes.fromhex("6A3F0C9D2B7E4A1158C6D0E3F2A9B7C41D8E5F60A3B2C1D0E9F8A7B6C5D4E3F2")
ADYEN_OLD_KEY = bytes.fromhex("0F1E2D3C4B5A69788796A5B4C3D2E1F00112233445566778899AABBCCDDEEFF0")
T = 1764756000  # the fixtures' base time, 2025-12-03T10:00:00Z
NOW = T + 90 * 86400  # the validator's clock: after every fixture's event time

STRIPE_TYPES = ("payment_intent.payment_failed", "payment_intent.succeeded", "charge.failed", "charge.succeeded",
                "charge.refunded", "charge.dispute.created", "radar.early_fraud_warning.created", "review.opened")
ADYEN_FILES = ("authorisation_success", "authorisation_refused", "refund", "chargeback", "notification_of_fraud")
OUTCOME_FIELDS = ("failure_category", "failure_origin", "failure_code", "retry_result")
RISK_ORIGINS = {"processor", "network", "issuer", "merchant", "customer"}


def raw(kind: str, name: str) -> bytes:
    with open(os.path.join(FIXTURES, kind, name + ".json"), "rb") as f:
        return f.read()


def stripe_header(body: bytes, secret: bytes = SECRET, t: int | None = None, *extra: str) -> str:
    sig = hmac.new(secret, f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return ",".join([f"t={t}", f"v1={sig}", *extra])


def validator() -> EventValidator:
    # "reject": an event carrying any field outside the schema fails, so the mapping's output is
    # proven to be schema fields only.
    return EventValidator(ValidationPolicy(unknown_fields="reject"), now=lambda: NOW)


def secrets_of(doc: object) -> set[str]:
    """Every id, e-mail, fingerprint and other personal or processor-identifying string of a
    fixture, found by key name (and any e-mail anywhere)."""
    keys = {"id", "account", "customer", "charge", "payment_intent", "payment_method", "latest_charge", "email",
            "receipt_email", "customer_email_address", "name", "customer_name", "fingerprint", "ip_address",
            "customer_purchase_ip", "last4", "dynamic_last4", "phone", "line1", "postal_code", "billing_zip",
            "billing_address", "client_secret", "idempotency_key", "balance_transaction", "order_id", "description",
            "pspReference", "originalReference", "merchantAccountCode", "merchantReference", "shopperReference",
            "shopperEmail", "shopperIP", "alias", "cardHolderName", "authCode", "cardSummary", "expiryDate",
            "cardBin", "refusalReasonRaw", "invoice_prefix", "url"}
    found: set[str] = set()

    def walk(value: object, key: str | None) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, k)
        elif isinstance(value, list):
            for v in value:
                walk(v, key)
        elif isinstance(value, str):
            if key in keys and len(value) >= 4:
                found.add(value)
            found.update(re.findall(r"[^\s\"@]+@[^\s\"@]+", value))

    walk(doc, None)
    return found


class HashTests(SynchronousTestCase):
    def test_known_vector(self):
        """RFC 4231 test case 2 (key "Jefe"), as base64url without padding."""
        out = hash_id(b"Jefe", "what do ya want for nothing?")
        self.assertEqual(out, "W9zBRr9gdU5qBCQmCJV1x1oAPwidJzmDnexYuWTsOEM")
        self.assertEqual(base64.urlsafe_b64decode(out + "=").hex(),
                         "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843")

    def test_same_as_the_python_client(self):
        try:
            from payflux.client import hash_id as client_hash_id
        except ImportError:  # pragma: no cover - the client is optional here
            raise self.skipTest("payflux.client is not importable")
        self.assertEqual(hash_id(KEY, "acct_1NwXcLQ8p5Y2rTzA"), client_hash_id("acct_1NwXcLQ8p5Y2rTzA", KEY))

    def test_hasher_refuses_short_keys_and_absent_ids(self):
        self.assertRaises(ValueError, IdHasher, b"short")
        self.assertRaises(ValueError, StripeWebhook, [SECRET], b"short")
        self.assertRaises(ValueError, AdyenWebhook, [ADYEN_KEY], b"short")
        h = IdHasher(KEY)
        self.assertIsNone(h(None))
        self.assertIsNone(h(""))
        self.assertIsNone(h(12))
        self.assertEqual(len(h("cus_PfT8qW3eRtYuIo")), 43)


class DocumentedTests(SynchronousTestCase):
    def test_mapped_types_are_the_documented_ones(self):
        self.assertEqual(StripeWebhook([SECRET], KEY).mapped_types, STRIPE_TYPES)
        self.assertEqual(AdyenWebhook([ADYEN_KEY], KEY).mapped_types,
                         ("AUTHORISATION", "REFUND", "CHARGEBACK", "NOTIFICATION_OF_FRAUD"))
        with open(os.path.join(os.path.dirname(__file__), "..", "docs", "producers.md"), encoding="utf-8") as f:
            doc = f.read().split("## Processor webhooks", 1)[1]
        for kind in STRIPE_TYPES:
            self.assertIn(f"| Stripe `{kind}` |", doc)
        for code in AdyenWebhook.mapped_types:
            self.assertIn(f"| Adyen `{code}`", doc)
        for category in CATEGORIES:
            self.assertIn(f"| `{category}` |", doc)


class BucketTests(SynchronousTestCase):
    def test_amount_buckets_in_major_units(self):
        cases = [(0, "usd", "<10"), (999, "usd", "<10"), (1000, "usd", "10-50"), (4999, "USD", "10-50"),
                 (5000, "usd", "50-200"), (19999, "usd", "50-200"), (20000, "usd", "200-1000"),
                 (99999, "usd", "200-1000"), (100000, "usd", "1000+"),
                 (999, "jpy", "200-1000"), (1000, "jpy", "1000+"), (9999, "kwd", "<10"), (10000, "kwd", "10-50")]
        for minor, cur, label in cases:
            self.assertEqual(amount_bucket(minor, cur, STRIPE_EXPONENTS), label, (minor, cur))
        for bad in (None, -1, 1.5, True, "100"):
            self.assertIsNone(amount_bucket(bad, "usd", STRIPE_EXPONENTS))

    def test_adyen_timestamps_to_utc(self):
        self.assertEqual(iso_from_rfc3339("2025-12-03T11:02:45+01:00"), "2025-12-03T10:02:45.000Z")
        self.assertEqual(iso_from_rfc3339("2025-12-03T10:02:45.123789Z"), "2025-12-03T10:02:45.123Z")
        for bad in ("2025-12-03 10:02:45", "2025-12-03T10:02:45", "2025-02-30T00:00:00Z", None, 5):
            self.assertIsNone(iso_from_rfc3339(bad), bad)

    def test_token_drops_digit_runs(self):
        self.assertEqual(token("Not enough balance"), "not_enough_balance")
        self.assertEqual(token("10.4"), "10_4")
        self.assertIsNone(token("083712:1142:03/2030"))
        self.assertIsNone(token(""))


class FailureVocabularyTests(SynchronousTestCase):
    def test_every_origin_is_one_the_risk_consumer_counts(self):
        origins = {o for o in CATEGORIES.values() if o} | {o for _, o in STRIPE_CODES.values() if o} \
            | {o for _, _, o in ADYEN_REFUSALS.values() if o}
        self.assertLessEqual(origins, RISK_ORIGINS)
        categories = {c for c, _ in STRIPE_CODES.values()} | {c for _, c, _ in ADYEN_REFUSALS.values()}
        self.assertLessEqual(categories, set(CATEGORIES))

    def test_stripe_codes(self):
        f = stripe_payment_error({"type": "card_error", "code": "card_declined", "decline_code": "stolen_card"})
        self.assertEqual((f.category, f.origin, f.code), ("fraud_suspected", "issuer", "stolen_card"))
        f = stripe_payment_error({"type": "card_error", "code": "expired_card"})
        self.assertEqual((f.category, f.origin, f.code), ("card_expired", "customer", "expired_card"))
        f = stripe_payment_error({"type": "card_error", "code": "card_declined", "decline_code": "brand_new_code"})
        self.assertEqual((f.category, f.origin, f.code), ("card_declined", "issuer", "card_declined"))
        f = stripe_payment_error({"type": "api_error"})
        self.assertEqual((f.category, f.origin, f.code), ("processor_error", "processor", None))
        f = stripe_payment_error(None)
        self.assertEqual((f.category, f.origin, f.code), ("other", None, None))

    def test_adyen_refusals(self):
        f = adyen_refusal({"reason": "CVC Declined"})
        self.assertEqual((f.category, f.origin, f.code), ("invalid_card_details", "customer", "cvc_declined"))
        f = adyen_refusal({"reason": "whatever", "additionalData": {"refusalReasonCode": "20"}})
        self.assertEqual((f.category, f.origin, f.code), ("fraud_suspected", "processor", "fraud"))
        f = adyen_refusal({"reason": "Some New Reason"})
        self.assertEqual((f.category, f.origin, f.code), ("other", None, "some_new_reason"))
        f = adyen_refusal({"reason": "083712:1142:03/2030"})  # never a card's data as a code
        self.assertEqual((f.category, f.origin, f.code), ("other", None, None))


class StripeSignatureTests(SynchronousTestCase):
    body = raw("stripe", "payment_intent.payment_failed")

    def setUp(self):
        self.hook = StripeWebhook([SECRET], KEY)
        self.now = float(T + 5)

    def handle(self, header, body=None, now=None):
        headers = {} if header is None else {"stripe-signature": header}
        return self.hook.handle(headers, self.body if body is None else body, self.now if now is None else now)

    def assertRejected(self, result, status, code):
        self.assertEqual(result.status, REJECTED)
        self.assertEqual((result.error.http_status, result.error.code), (status, code))
        self.assertEqual((result.events, result.signals, result.ignored), ([], [], []))
        body = result.error.body()
        self.assertEqual(json.loads(body)["error"], code)
        for secret in (SECRET, OLD_SECRET):
            self.assertNotIn(secret, body)
        self.assertNotIn(b"pi_3Oq", body)
        self.assertRaises(ValueError, result.ack)

    def test_valid_signature(self):
        result = self.handle(stripe_header(self.body, t=T))
        self.assertEqual(result.status, ACCEPTED)
        self.assertEqual(len(result.events), 1)
        self.assertEqual(result.ack(), (200, "application/json", b'{"received":true}'))

    def test_missing_header(self):
        self.assertRejected(self.handle(None), 401, "missing_signature")
        self.assertRejected(self.handle(""), 401, "missing_signature")

    def test_malformed_header(self):
        good = stripe_header(self.body, t=T)
        for header in ("garbage", "t=abc," + good.split(",")[1], "t=1,t=2," + good.split(",")[1],
                       good.split(",")[1], good + ",novalue", "=x," + good, "t=" + "9" * 13 + ",v1=00",
                       good + "," + ",".join(["v0=00"] * 70)):
            self.assertRejected(self.handle(header), 400, "malformed_signature")

    def test_no_v1(self):
        v1 = hmac.new(SECRET, f"{T}.".encode() + self.body, hashlib.sha256).hexdigest()
        self.assertRejected(self.handle(f"t={T},v0={v1}"), 400, "no_v1_signature")

    def test_stale_and_future_timestamps(self):
        self.assertRejected(self.handle(stripe_header(self.body, t=T), now=T + 301), 401, "stale_timestamp")
        self.assertRejected(self.handle(stripe_header(self.body, t=T), now=T - 301), 401, "stale_timestamp")
        self.assertEqual(self.handle(stripe_header(self.body, t=T), now=T + 300).status, ACCEPTED)
        hook = StripeWebhook([SECRET], KEY, tolerance=10)
        result = hook.handle({"stripe-signature": stripe_header(self.body, t=T)}, self.body, T + 11)
        self.assertEqual(result.error.code, "stale_timestamp")

    def test_no_match(self):
        self.assertRejected(self.handle(stripe_header(self.body, OLD_SECRET, t=T)), 401, "signature_mismatch")
        tampered = self.body.replace(b"insufficient_funds", b"generic_decline")
        self.assertRejected(self.handle(stripe_header(self.body, t=T), body=tampered), 401, "signature_mismatch")
        # A forged signature with a stale timestamp is a mismatch: "stale" means authentic but old.
        self.assertRejected(self.handle(stripe_header(self.body, OLD_SECRET, t=T), now=T + 1000), 401,
                            "signature_mismatch")

    def test_rotation(self):
        both = StripeWebhook([OLD_SECRET, SECRET], KEY)
        for secret in (OLD_SECRET, SECRET):
            result = both.handle({"stripe-signature": stripe_header(self.body, secret, t=T)}, self.body, self.now)
            self.assertEqual(result.status, ACCEPTED)
        # Stripe signs with every active secret during a roll: several v1 elements, any may match.
        old_sig = hmac.new(OLD_SECRET, f"{T}.".encode() + self.body, hashlib.sha256).hexdigest()
        header = f"t={T},v1={old_sig}," + stripe_header(self.body, t=T).split(",")[1] + ",v0=deadbeef"
        self.assertEqual(self.handle(header).status, ACCEPTED)

    def test_body_too_large(self):
        hook = StripeWebhook([SECRET], KEY, max_body_bytes=100)
        result = hook.handle({"stripe-signature": stripe_header(self.body, t=T)}, self.body, self.now)
        self.assertEqual((result.error.http_status, result.error.code), (413, "body_too_large"))

    def test_signed_but_not_an_event(self):
        for body, code in ((b"{not json", "malformed_json"), (b'{"a":1,"a":2}', "malformed_json"),
                           (b'{"id":"evt_1","type":"charge.failed"}', "invalid_event"), (b"[]", "invalid_event")):
            self.assertRejected(self.handle(stripe_header(body, t=T), body=body), 400, code)

    def test_verify_signature_directly(self):
        self.assertIsNone(verify_signature(stripe_header(b"x", t=T), b"x", [SECRET], T))
        self.assertEqual(verify_signature(None, b"x", [SECRET], T).http_status, 401)


class StripeMappingTests(SynchronousTestCase):
    def setUp(self):
        self.hook = StripeWebhook([SECRET], KEY)

    def deliver(self, kind: str, t_offset: int = 2, body: bytes | None = None):
        body = raw("stripe", kind) if body is None else body
        created = json.loads(body)["created"]
        return self.hook.handle({"stripe-signature": stripe_header(body, t=created + t_offset)}, body, created + 5)

    def event(self, kind: str) -> dict:
        result = self.deliver(kind)
        self.assertEqual(result.status, ACCEPTED, result)
        self.assertEqual(len(result.events), 1)
        out = result.events[0]
        validated = validator().validate(out)
        self.assertEqual({k: v for k, v in validated.items() if k != "retry_count"}, out)
        self.assertEqual(validated["retry_count"], 0)
        return out

    def test_payment_intent_payment_failed(self):
        self.assertEqual(self.event("payment_intent.payment_failed"), {
            "event_id": "evt_3OqBvW2eZvKYlo2C1a8XyZ9Q", "event_type": "payment_intent.payment_failed",
            "event_timestamp": "2025-12-03T10:00:00.000Z", "processor": "stripe", "system_source": "stripe_webhook",
            "merchant_id_hash": hash_id(KEY, "acct_1NwXcLQ8p5Y2rTzA"),
            "payment_intent_id_hash": hash_id(KEY, "pi_3OqBvW2eZvKYlo2C1gHJkLmN"),
            "customer_id_hash": hash_id(KEY, "cus_PfT8qW3eRtYuIo"),
            "amount_bucket": "50-200", "currency": "USD", "geo_bucket": "US", "payment_method_bucket": "credit_card",
            "retry_result": "failed", "failure_category": "insufficient_funds", "failure_origin": "issuer",
            "failure_code": "insufficient_funds"})

    def test_payment_intent_succeeded(self):
        self.assertEqual(self.event("payment_intent.succeeded"), {
            "event_id": "evt_3OqD4k2eZvKYlo2C0ZtR5uVw", "event_type": "payment_intent.succeeded",
            "event_timestamp": "2025-12-03T10:02:10.000Z", "processor": "stripe", "system_source": "stripe_webhook",
            "merchant_id_hash": hash_id(KEY, "acct_1NwXcLQ8p5Y2rTzA"),
            "payment_intent_id_hash": hash_id(KEY, "pi_3OqD4k2eZvKYlo2C0mNbVcXz"),
            "customer_id_hash": hash_id(KEY, "cus_Qa7Zr4Tb2WcXvN"),
            "amount_bucket": "10-50", "currency": "EUR", "payment_method_bucket": "card", "retry_result": "success"})

    def test_the_go_forwarders_test_event(self):
        """The event /work/shared/peers/send-stripe-event.py signs for the Go PayFlux's forwarder
        (api_version 2022-11-15, a payment method without card details): PayFlux takes it directly."""
        ev = {"id": "evt_1PeerTest0001", "object": "event", "api_version": "2022-11-15", "created": T,
              "livemode": False, "account": "acct_1Nmerchant01", "type": "payment_intent.payment_failed",
              "pending_webhooks": 1, "request": {"id": None, "idempotency_key": None},
              "data": {"object": {"id": "pi_3Nintent0001", "object": "payment_intent", "amount": 5000, "currency": "usd",
                                  "last_payment_error": {"type": "card_error", "code": "card_declined",
                                                         "decline_code": "insufficient_funds"},
                                  "payment_method": {"id": "pm_1Nabc", "object": "payment_method", "type": "card"}}}}
        out = self.event_of(json.dumps(ev).encode())
        self.assertEqual(out, {
            "event_id": "evt_1PeerTest0001", "event_type": "payment_intent.payment_failed",
            "event_timestamp": "2025-12-03T10:00:00.000Z", "processor": "stripe", "system_source": "stripe_webhook",
            "merchant_id_hash": hash_id(KEY, "acct_1Nmerchant01"), "payment_intent_id_hash": hash_id(KEY, "pi_3Nintent0001"),
            "amount_bucket": "50-200", "currency": "USD", "payment_method_bucket": "card", "retry_result": "failed",
            "failure_category": "insufficient_funds", "failure_origin": "issuer", "failure_code": "insufficient_funds"})

    def event_of(self, body: bytes) -> dict:
        created = json.loads(body)["created"]
        result = self.hook.handle({"stripe-signature": stripe_header(body, t=created)}, body, created + 1)
        self.assertEqual(result.status, ACCEPTED)
        validator().validate(result.events[0])
        return result.events[0]

    def test_charge_failed_without_payment_intent(self):
        """A Charges API charge (no PaymentIntent) Radar blocked: fraud_suspected, from the processor."""
        self.assertEqual(self.event("charge.failed"), {
            "event_id": "evt_1OqE7q2eZvKYlo2CbNmVcXzA", "event_type": "charge.failed",
            "event_timestamp": "2025-12-03T10:03:21.000Z", "processor": "stripe", "system_source": "stripe_webhook",
            "merchant_id_hash": hash_id(KEY, "acct_1NwXcLQ8p5Y2rTzA"),
            "payment_intent_id_hash": hash_id(KEY, "ch_1OqE7p2eZvKYlo2CgHtYuJiK"),
            "customer_id_hash": hash_id(KEY, "cus_Rk3Lm9Pq2TxWzA"),
            "amount_bucket": "200-1000", "currency": "GBP", "geo_bucket": "GB", "payment_method_bucket": "debit_card",
            "retry_result": "failed", "failure_category": "fraud_suspected", "failure_origin": "processor",
            "failure_code": "highest_risk_level"})

    def test_charge_of_a_payment_intent_is_counted_by_the_intent(self):
        result = self.deliver("charge.succeeded")
        self.assertEqual((result.status, result.events, result.signals), (IGNORED, [], []))
        self.assertEqual(result.ignored, [Ignored("charge.succeeded", "covered_by_payment_intent")])
        self.assertEqual(result.ack()[0], 200)

    def test_charge_succeeded_without_payment_intent(self):
        doc = json.loads(raw("stripe", "charge.succeeded"))
        doc["data"]["object"]["payment_intent"] = None
        body = json.dumps(doc).encode()
        result = self.deliver("charge.succeeded", body=body)
        self.assertEqual(result.status, ACCEPTED)
        out = result.events[0]
        validator().validate(out)
        self.assertEqual((out["payment_method_bucket"], out["geo_bucket"], out["retry_result"], out["amount_bucket"]),
                         ("wallet", "FR", "success", "10-50"))
        self.assertEqual(out["payment_intent_id_hash"], hash_id(KEY, "ch_3OqD4k2eZvKYlo2C0pLoKiJu"))

    def test_charge_refunded(self):
        self.assertEqual(self.event("charge.refunded"), {
            "event_id": "evt_3OqBvW2eZvKYlo2C1RfNdQ7a", "event_type": "charge.refunded",
            "event_timestamp": "2025-12-03T11:00:00.000Z", "processor": "stripe", "system_source": "stripe_webhook",
            "merchant_id_hash": hash_id(KEY, "acct_1NwXcLQ8p5Y2rTzA"),
            "payment_intent_id_hash": hash_id(KEY, "pi_3OqBvW2eZvKYlo2C1gHJkLmN"),
            "customer_id_hash": hash_id(KEY, "cus_PfT8qW3eRtYuIo"),
            "amount_bucket": "10-50", "currency": "USD", "geo_bucket": "US", "payment_method_bucket": "credit_card"})

    def test_dispute(self):
        result = self.deliver("charge.dispute.created")
        out = self.event("charge.dispute.created")
        self.assertEqual(out, {
            "event_id": "evt_1OqH2b2eZvKYlo2CdSpTcRtD", "event_type": "charge.dispute.created",
            "event_timestamp": "2025-12-04T10:00:01.000Z", "processor": "stripe", "system_source": "stripe_webhook",
            "merchant_id_hash": hash_id(KEY, "acct_1NwXcLQ8p5Y2rTzA"),
            "payment_intent_id_hash": hash_id(KEY, "pi_3OqBvW2eZvKYlo2C1gHJkLmN"),
            "amount_bucket": "50-200", "currency": "USD", "payment_method_bucket": "card"})
        [signal] = result.signals
        self.assertEqual(signal.outcome(), {"outcome_type": "other", "observed_at": "2025-12-04T10:00:01.000Z",
                                            "source": "stripe_webhook", "notes": "charge.dispute.created reason=fraudulent"})
        self.assertEqual((signal.processor, signal.merchant_id_hash, signal.event_id),
                         ("stripe", hash_id(KEY, "acct_1NwXcLQ8p5Y2rTzA"), "evt_1OqH2b2eZvKYlo2CdSpTcRtD"))

    def test_early_fraud_warning(self):
        result = self.deliver("radar.early_fraud_warning.created")
        self.assertEqual(self.event("radar.early_fraud_warning.created"), {
            "event_id": "evt_1OqG9y2eZvKYlo2CeFwCrEaT", "event_type": "radar.early_fraud_warning.created",
            "event_timestamp": "2025-12-03T22:00:01.000Z", "processor": "stripe", "system_source": "stripe_webhook",
            "merchant_id_hash": hash_id(KEY, "acct_1NwXcLQ8p5Y2rTzA"),
            "payment_intent_id_hash": hash_id(KEY, "pi_3OqBvW2eZvKYlo2C1gHJkLmN")})
        self.assertEqual([s.outcome() for s in result.signals], [{
            "outcome_type": "other", "observed_at": "2025-12-03T22:00:01.000Z", "source": "stripe_webhook",
            "notes": "radar.early_fraud_warning.created fraud_type=made_with_stolen_card"}])

    def test_review_opened(self):
        """No ``account`` (the platform's own account): no merchant_id_hash."""
        result = self.deliver("review.opened")
        self.assertEqual(self.event("review.opened"), {
            "event_id": "evt_1OqF3d2eZvKYlo2CrVwOpNd1", "event_type": "review.opened",
            "event_timestamp": "2025-12-03T10:00:31.000Z", "processor": "stripe", "system_source": "stripe_webhook",
            "payment_intent_id_hash": hash_id(KEY, "pi_3OqBvW2eZvKYlo2C1gHJkLmN"), "geo_bucket": "US"})
        [signal] = result.signals
        self.assertEqual(signal.outcome(), {"outcome_type": "review", "observed_at": "2025-12-03T10:00:31.000Z",
                                            "source": "stripe_webhook", "notes": "review.opened reason=rule"})
        self.assertIsNone(signal.merchant_id_hash)
        doc = json.loads(raw("stripe", "review.opened"))
        doc["data"]["object"]["opened_reason"] = "manual"
        manual = self.deliver("review.opened", body=json.dumps(doc).encode())
        self.assertEqual(manual.signals[0].outcome_type, "other")

    def test_unmapped_type_is_ignored(self):
        result = self.deliver("customer.created")
        self.assertEqual((result.status, result.events, result.signals), (IGNORED, [], []))
        self.assertEqual(result.ignored, [Ignored("customer.created", "unmapped_type")])
        self.assertEqual(result.ack()[0], 200)

    def test_only_payment_outcomes_carry_outcome_fields(self):
        """The risk consumer counts an event with a failure field or retry_result as an outcome
        (docs/risk.md): refunds, disputes, fraud warnings and reviews must carry none."""
        for kind in ("charge.refunded", "charge.dispute.created", "radar.early_fraud_warning.created", "review.opened"):
            out = self.event(kind)
            self.assertFalse(set(OUTCOME_FIELDS) & set(out), kind)

    def test_no_raw_id_email_or_fingerprint_in_the_output(self):
        for kind in STRIPE_TYPES + ("customer.created",):
            body = raw("stripe", kind)
            doc = json.loads(body)
            result = self.deliver(kind)
            text = json.dumps([result.events, [s.outcome() for s in result.signals],
                               [(s.merchant_id_hash, s.event_id) for s in result.signals],
                               [(i.type, i.reason) for i in result.ignored]])
            # The Stripe event id is the event_id by design (it is the delivery's id, not a
            # customer's, merchant's or payment's); everything else must be absent.
            leaks = [s for s in secrets_of(doc) - {doc["id"]} if s in text]
            self.assertEqual(leaks, [], kind)
            self.assertNotIn(body.decode(), text)

    def test_redelivery_is_the_same_event(self):
        first = self.deliver("payment_intent.payment_failed", t_offset=0)
        again = self.deliver("payment_intent.payment_failed", t_offset=3)  # a retry: new t, same event
        self.assertEqual(first.events, again.events)
        self.assertEqual(first.events[0]["event_id"], "evt_3OqBvW2eZvKYlo2C1a8XyZ9Q")

    def test_an_event_id_the_schema_would_refuse_is_hashed(self):
        doc = json.loads(raw("stripe", "payment_intent.payment_failed"))
        doc["id"] = "evt_4111111111111111"  # a Luhn-valid digit run: the PAN guard would refuse it
        out = self.deliver("payment_intent.payment_failed", body=json.dumps(doc).encode()).events[0]
        self.assertEqual(out["event_id"], "stripe:" + hash_id(KEY, "evt_4111111111111111"))
        validator().validate(out)

    def test_signals_fit_the_outcome_api(self):
        try:
            from payflux.ingest.alerts import parse_outcome
        except ImportError:  # pragma: no cover
            raise self.skipTest("payflux.ingest.alerts is not importable")
        for kind in ("charge.dispute.created", "radar.early_fraud_warning.created", "review.opened"):
            for signal in self.deliver(kind).signals:
                parsed = parse_outcome(json.dumps(signal.outcome()).encode(), NOW)
                self.assertEqual(parsed["outcome_type"], signal.outcome_type)


def adyen_body(doc: dict, keys: dict[int, bytes] | None = None, key: bytes = ADYEN_KEY) -> bytes:
    """``doc`` with each item's hmacSignature computed (``keys``: a key per item index)."""
    doc = copy.deepcopy(doc)
    for n, wrapper in enumerate(doc["notificationItems"]):
        item = wrapper["NotificationRequestItem"]
        item.setdefault("additionalData", {})["hmacSignature"] = item_signature(item, (keys or {}).get(n, key))
    return json.dumps(doc).encode()


def adyen_doc(name: str) -> dict:
    return json.loads(raw("adyen", name))


class AdyenSignatureTests(SynchronousTestCase):
    def setUp(self):
        self.hook = AdyenWebhook([ADYEN_KEY], KEY)

    def assertRejected(self, result, status, code):
        self.assertEqual(result.status, REJECTED)
        self.assertEqual((result.error.http_status, result.error.code), (status, code))
        self.assertEqual((result.events, result.signals, result.ignored), ([], [], []))
        self.assertNotIn(ADYEN_KEY.hex().encode(), result.error.body())
        self.assertNotIn(b"8535296650153317", result.error.body())

    def test_adyens_published_example(self):
        """docs.adyen.com "Verify HMAC signatures": the example notification and its key."""
        doc = adyen_doc("docs_example")
        item = doc["notificationItems"][0]["NotificationRequestItem"]
        self.assertEqual(signing_string(item),
                         "7914073381342284::TestMerchant:TestPayment-1407325143704:1130:EUR:AUTHORISATION:true")
        key = parse_hmac_key("44782DEF547AAA06C910C43932B1EB0C71FC68D9D0C057550C48EC2ACF6BA056")
        self.assertEqual(item_signature(item, key), "coqCmt/IZ4E3CzPvMY8zTjQVL5hYJUiBRg8UU+iCWo0=")
        result = AdyenWebhook([key], KEY).handle({}, raw("adyen", "docs_example"), NOW)
        self.assertEqual(result.status, ACCEPTED)
        self.assertEqual(result.ack(), (200, "text/plain; charset=utf-8", b"[accepted]"))

    def test_node_library_vector(self):
        """adyen-node-api-library's hmacValidator test: every signed field present."""
        item = {"pspReference": "pspReference", "originalReference": "originalReference",
                "merchantAccountCode": "merchantAccount", "merchantReference": "reference",
                "amount": {"currency": "EUR", "value": 1000}, "eventCode": "CAPTURE", "success": "true"}
        self.assertEqual(signing_string(item), "pspReference:originalReference:merchantAccount:reference:1000:EUR:CAPTURE:true")
        key = parse_hmac_key("DFB1EB5485895CFA84146406857104ABB4CBCABDC8AAF103A624C8F6A3EAAB00")
        self.assertEqual(item_signature(item, key), "xhpHvYq2u2Np0rstbZ6QjLGu7JWhvf7Iwaa6EviJSX0=")

    def test_values_are_not_escaped(self):
        item = {"pspReference": "X", "merchantReference": "a:b\\c", "eventCode": "AUTHORISATION", "success": "true",
                "amount": {"value": 1, "currency": "EUR"}}
        self.assertEqual(signing_string(item), "X:::a:b\\c:1:EUR:AUTHORISATION:true")

    def test_parse_hmac_key(self):
        self.assertEqual(parse_hmac_key(" 0aFF \n"), b"\x0a\xff")
        self.assertRaises(ValueError, parse_hmac_key, "xyz")
        self.assertRaises(ValueError, parse_hmac_key, "")

    def test_one_bad_item_refuses_the_whole_notification(self):
        doc = adyen_doc("batch_mixed")
        body = adyen_body(doc, keys={1: ADYEN_OLD_KEY})  # item 2 signed with a key not configured
        result = self.hook.handle({}, body, NOW)
        self.assertRejected(result, 401, "signature_mismatch")
        self.assertEqual([(c.index, c.event_code, c.verified) for c in result.items],
                         [(0, "AUTHORISATION", True), (1, "CAPTURE", False), (2, "REFUND", True)])
        self.assertIn("item(s) 2 of 3", result.error.message)

    def test_tampered_item(self):
        body = adyen_body(adyen_doc("authorisation_refused")).replace(b'"value": 4999', b'"value": 49')
        self.assertRejected(self.hook.handle({}, body, NOW), 401, "signature_mismatch")

    def test_missing_signature(self):
        doc = adyen_doc("refund")
        del doc["notificationItems"][0]["NotificationRequestItem"]["additionalData"]
        self.assertRejected(self.hook.handle({}, json.dumps(doc).encode(), NOW), 401, "missing_signature")

    def test_rotation(self):
        both = AdyenWebhook([ADYEN_OLD_KEY, ADYEN_KEY], KEY)
        body = adyen_body(adyen_doc("batch_mixed"), keys={0: ADYEN_OLD_KEY})  # items signed with either key
        self.assertEqual(both.handle({}, body, NOW).status, ACCEPTED)
        self.assertRejected(self.hook.handle({}, body, NOW), 401, "signature_mismatch")

    def test_malformed(self):
        good = adyen_doc("refund")
        too_many = {"live": "false", "notificationItems": good["notificationItems"] * 101}
        bad_success = copy.deepcopy(good)
        bad_success["notificationItems"][0]["NotificationRequestItem"]["success"] = True
        no_psp = copy.deepcopy(good)
        del no_psp["notificationItems"][0]["NotificationRequestItem"]["pspReference"]
        cases = [(b"{nope", "malformed_json"), (b"[]", "malformed_notification"),
                 (b'{"live":"false","notificationItems":[]}', "malformed_notification"),
                 (b'{"notificationItems":[{"x":{}}]}', "malformed_notification"),
                 (json.dumps(too_many).encode(), "malformed_notification"),
                 (json.dumps(bad_success).encode(), "malformed_notification"),
                 (json.dumps(no_psp).encode(), "malformed_notification")]
        for body, code in cases:
            self.assertRejected(self.hook.handle({}, body, NOW), 400, code)

    def test_body_too_large(self):
        hook = AdyenWebhook([ADYEN_KEY], KEY, max_body_bytes=64)
        self.assertRejected(hook.handle({}, adyen_body(adyen_doc("refund")), NOW), 413, "body_too_large")


class AdyenMappingTests(SynchronousTestCase):
    merchant = hash_id(KEY, "AcmeShopECOM")

    def setUp(self):
        self.hook = AdyenWebhook([ADYEN_KEY], KEY)

    def deliver(self, name: str):
        return self.hook.handle({}, adyen_body(adyen_doc(name)), NOW)

    def event(self, name: str) -> dict:
        result = self.deliver(name)
        self.assertEqual(result.status, ACCEPTED)
        self.assertEqual(result.ack(), (200, "text/plain; charset=utf-8", b"[accepted]"))
        [out] = result.events
        validated = validator().validate(out)
        self.assertEqual({k: v for k, v in validated.items() if k != "retry_count"}, out)
        return out

    def test_authorisation_success(self):
        self.assertEqual(self.event("authorisation_success"), {
            "event_id": "adyen:" + hash_id(KEY, "8535296650153317:AUTHORISATION:true"),
            "event_type": "AUTHORISATION", "event_timestamp": "2025-12-03T10:02:45.000Z", "processor": "adyen",
            "system_source": "adyen_webhook", "merchant_id_hash": self.merchant,
            "payment_intent_id_hash": hash_id(KEY, "8535296650153317"),
            "customer_id_hash": hash_id(KEY, "shopper-4411-de"),
            "amount_bucket": "50-200", "currency": "EUR", "geo_bucket": "DE", "payment_method_bucket": "debit_card",
            "retry_result": "success"})

    def test_authorisation_refused(self):
        self.assertEqual(self.event("authorisation_refused"), {
            "event_id": "adyen:" + hash_id(KEY, "QFQTPCQ8HXSKGK82:AUTHORISATION:false"),
            "event_type": "AUTHORISATION", "event_timestamp": "2025-12-03T09:15:00.000Z", "processor": "adyen",
            "system_source": "adyen_webhook", "merchant_id_hash": self.merchant,
            "payment_intent_id_hash": hash_id(KEY, "QFQTPCQ8HXSKGK82"),
            "customer_id_hash": hash_id(KEY, "shopper-9902-nl"),
            "amount_bucket": "10-50", "currency": "EUR", "geo_bucket": "NL", "payment_method_bucket": "credit_card",
            "retry_result": "failed", "failure_category": "insufficient_funds", "failure_origin": "issuer",
            "failure_code": "not_enough_balance"})

    def test_refund(self):
        """JPY has no minor unit at Adyen: 12000 is 12,000 yen."""
        self.assertEqual(self.event("refund"), {
            "event_id": "adyen:" + hash_id(KEY, "9914143893020014:REFUND:true"),
            "event_type": "REFUND", "event_timestamp": "2025-12-04T00:30:12.000Z", "processor": "adyen",
            "system_source": "adyen_webhook", "merchant_id_hash": hash_id(KEY, "AcmeShopJP"),
            "payment_intent_id_hash": hash_id(KEY, "9913140798220028"),
            "amount_bucket": "1000+", "currency": "JPY", "payment_method_bucket": "card"})

    def test_chargeback(self):
        out = self.event("chargeback")
        self.assertEqual(out, {
            "event_id": "adyen:" + hash_id(KEY, "9935296650159912:CHARGEBACK:true"),
            "event_type": "CHARGEBACK", "event_timestamp": "2025-12-20T13:00:00.000Z", "processor": "adyen",
            "system_source": "adyen_webhook", "merchant_id_hash": self.merchant,
            "payment_intent_id_hash": hash_id(KEY, "8535296650153317"),
            "customer_id_hash": hash_id(KEY, "shopper-4411-de"),
            "amount_bucket": "50-200", "currency": "EUR", "payment_method_bucket": "card"})
        [signal] = self.deliver("chargeback").signals
        self.assertEqual(signal.outcome(), {"outcome_type": "other", "observed_at": "2025-12-20T13:00:00.000Z",
                                            "source": "adyen_webhook", "notes": "CHARGEBACK reason_code=10_4"})
        self.assertEqual((signal.processor, signal.merchant_id_hash, signal.event_id),
                         ("adyen", self.merchant, out["event_id"]))

    def test_notification_of_fraud(self):
        out = self.event("notification_of_fraud")
        self.assertEqual(out["event_type"], "NOTIFICATION_OF_FRAUD")
        self.assertEqual(out["payment_intent_id_hash"], hash_id(KEY, "8535296650153317"))
        [signal] = self.deliver("notification_of_fraud").signals
        self.assertEqual(signal.outcome(), {"outcome_type": "other", "observed_at": "2025-12-10T07:00:00.000Z",
                                            "source": "adyen_webhook",
                                            "notes": "NOTIFICATION_OF_FRAUD reason=card_not_present_fraud"})

    def test_batch_maps_each_item(self):
        result = self.deliver("batch_mixed")
        self.assertEqual(result.status, ACCEPTED)
        self.assertEqual([e["event_type"] for e in result.events], ["AUTHORISATION"])
        self.assertEqual(result.ignored, [Ignored("CAPTURE", "unmapped_type"), Ignored("REFUND", "not_processed")])
        self.assertTrue(all(c.verified for c in result.items))

    def test_only_unmapped_items_is_ignored_and_acknowledged(self):
        doc = adyen_doc("batch_mixed")
        doc["notificationItems"] = doc["notificationItems"][1:]
        result = self.hook.handle({}, adyen_body(doc), NOW)
        self.assertEqual((result.status, result.events), (IGNORED, []))
        self.assertEqual(result.ack(), (200, "text/plain; charset=utf-8", b"[accepted]"))

    def test_item_without_event_date_is_ignored(self):
        doc = adyen_doc("refund")
        del doc["notificationItems"][0]["NotificationRequestItem"]["eventDate"]
        result = self.hook.handle({}, adyen_body(doc), NOW)
        self.assertEqual((result.status, result.ignored), (IGNORED, [Ignored("REFUND", "unmappable")]))

    def test_redelivery_is_the_same_event(self):
        first, again = self.deliver("authorisation_success"), self.deliver("authorisation_success")
        self.assertEqual(first.events, again.events)
        refused = adyen_doc("authorisation_success")
        refused["notificationItems"][0]["NotificationRequestItem"]["success"] = "false"
        other = self.hook.handle({}, adyen_body(refused), NOW)
        self.assertNotEqual(other.events[0]["event_id"], first.events[0]["event_id"])

    def test_only_payment_outcomes_carry_outcome_fields(self):
        for name in ("refund", "chargeback", "notification_of_fraud"):
            self.assertFalse(set(OUTCOME_FIELDS) & set(self.event(name)), name)

    def test_no_raw_id_email_or_card_data_in_the_output(self):
        for name in ADYEN_FILES + ("batch_mixed", "docs_example"):
            doc = adyen_doc(name)
            hook = self.hook if name != "docs_example" else AdyenWebhook(
                [parse_hmac_key("44782DEF547AAA06C910C43932B1EB0C71FC68D9D0C057550C48EC2ACF6BA056")], KEY)
            body = adyen_body(doc) if name != "docs_example" else raw("adyen", name)
            result = hook.handle({}, body, NOW)
            text = json.dumps([result.events, [s.outcome() for s in result.signals],
                               [(s.merchant_id_hash, s.event_id) for s in result.signals],
                               [(i.type, i.reason) for i in result.ignored]])
            self.assertEqual([s for s in secrets_of(doc) if s in text], [], name)
            self.assertNotIn("hmacSignature", text)

    def test_signals_fit_the_outcome_api(self):
        try:
            from payflux.ingest.alerts import parse_outcome
        except ImportError:  # pragma: no cover
            raise self.skipTest("payflux.ingest.alerts is not importable")
        for name in ("chargeback", "notification_of_fraud"):
            for signal in self.deliver(name).signals:
                self.assertEqual(parse_outcome(json.dumps(signal.outcome()).encode(), NOW)["source"], "adyen_webhook")
