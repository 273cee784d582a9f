"""Tests for payflux.events (schema v1 = the Go seed's event, canonical form, the PAN guard as the
validator applies it) and payflux.jsonbody (strict JSON).  The PAN rule itself: tests/test_pan.py."""

from __future__ import annotations

import json
import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from payflux import events, jsonbody
from payflux.events import (
    SCHEMA_VERSION, EventInvalid, EventValidator, MalformedJSON, ValidationPolicy,
    canonical_json, decode_batch_body, decode_event_body, fingerprint,
)

NOW = 1_767_225_600.0  # 2026-01-01T00:00:00Z
SEED_NOW = 1_767_657_600.0 + 3600  # 2026-01-06T01:00:00Z, an hour after the seed example's timestamp
PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
UNKNOWN = {True: "drop", False: "reject"}

with open(os.path.join(os.path.dirname(__file__), "fixtures", "seed-example.json"), encoding="utf-8") as f:
    SEED_EXAMPLE = json.load(f)  # the Go seed README's example, verbatim

VALID = {  # what the Go PayFlux requires, and no more
    "event_id": "evt_01HX:a.b-c",
    "event_type": "payment_failed",
    "event_timestamp": "2025-12-31T23:59:00.123Z",
    "processor": "stripe",
}
FULL = dict(
    VALID, merchant_id_hash="Xq3v9Lw0aZ-_bT6yYp2mN8cR4kD1fG7hJ5sU0eQ9iOo",
    payment_intent_id_hash="aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3zA5bC7dE9f",
    failure_category="insufficient_funds", retry_count=2, geo_bucket="EU-west", amount_bucket="10-50",
    system_source="checkout_api", payment_method_bucket="credit_card", channel="web",
    retry_result="failed", failure_origin="processor", customer_id_hash="Zz9Yy8Xx7Ww6Vv5U",
    currency="EUR", failure_code="card_declined:51", processor_latency_ms=812,
)
STRING_LABELS = ("failure_category", "amount_bucket", "system_source", "payment_method_bucket", "channel",
                 "retry_result", "failure_origin")
# Known test PANs (all Luhn-valid) in forms every version of the guard refuses.
PANS = [
    "4111111111111111", "4242424242424242", "5555555555554444", "378282246310005", "30569309025904",
    "6011000990139424124", "4111 1111 1111 1111", "4111-1111-1111-1111", "3782 822463 10005",
]
HASHES = ("merchant_id_hash", "payment_intent_id_hash", "customer_id_hash")


def validator(now: float = NOW, **policy) -> EventValidator:
    return EventValidator(ValidationPolicy(**policy), now=lambda: now)


class ValidatorMixin:
    def errors(self, event, **kw) -> list[tuple[str, str]]:
        with self.assertRaises(EventInvalid) as cm:
            validator(**kw).validate(event)
        return [(d["field"], d["code"]) for d in cm.exception.details]

    def assertFieldError(self, field, value, code, **kw):
        self.assertEqual(self.errors(dict(VALID, **{field: value}), **kw), [(field, code)], (field, value))

    def assertFieldValid(self, field, value, expected=None, now=NOW):
        out = validator(now).validate(dict(VALID, **{field: value}))
        self.assertEqual(out[field], value if expected is None else expected, (field, value))


class SeedContractTests(ValidatorMixin, SynchronousTestCase):
    """The Go seed's event is schema v1: its example verbatim is valid and stored under its names."""

    def test_seed_example_verbatim(self):
        out = validator(SEED_NOW).validate(dict(SEED_EXAMPLE))
        self.assertEqual(out, dict(SEED_EXAMPLE, event_timestamp="2026-01-06T00:00:00.000Z"))
        self.assertEqual(json.loads(canonical_json(out)), out)
        self.assertEqual(list(json.loads(canonical_json(out))), sorted(SEED_EXAMPLE))

    def test_seed_example_in_a_batch(self):
        rows, invalid, ignored = validator(SEED_NOW).validate_batch([dict(SEED_EXAMPLE)] * 2)
        self.assertEqual((invalid, ignored), ([], []))
        self.assertEqual([r[:3] for r in rows], [("uuid-123", "abc123", "payment_failed")] * 2)

    def test_field_names_are_the_seeds(self):
        self.assertEqual(events.SEED_FIELDS, tuple(SEED_EXAMPLE))
        self.assertEqual(events.FIELDS, events.SEED_FIELDS + (
            "customer_id_hash", "currency", "failure_code", "processor_latency_ms"))
        self.assertEqual(set(events.REQUIRED), {"event_id", "event_type", "event_timestamp", "processor"})

    def test_what_the_go_seed_requires_and_no_more(self):
        out = validator().validate(dict(VALID))
        self.assertEqual(out, dict(VALID, retry_count=0))
        for field in events.REQUIRED:
            event = dict(VALID)
            del event[field]
            self.assertEqual(self.errors(event), [(field, "required")])
            self.assertFieldError(field, None, "required")
            self.assertFieldError(field, "", "required")

    def test_go_caps_fit(self):
        """Every value within the Go program's caps and PayFlux's characters is accepted."""
        for field in HASHES:
            self.assertFieldValid(field, "h" * 100)
        self.assertFieldValid("failure_category", "c" * 100)
        self.assertFieldValid("geo_bucket", "G" * 20)
        self.assertFieldValid("retry_count", 100)

    def test_forwarder_event(self):
        """What the Go PayFlux's Stripe webhook forwarder sends (../shared/peers/README.md)."""
        sent = {"event_type": "payment_intent.payment_failed", "event_timestamp": "2026-01-06T00:30:00+00:00",
                "event_id": "evt_1NfakeStripeEvent01", "merchant_id_hash": "9f86d081884c7d65",
                "payment_intent_id_hash": "none", "processor": "stripe", "failure_category": "card_declined",
                "retry_count": 0, "geo_bucket": "unknown", "amount_bucket": "medium", "amount_cents": 5000,
                "currency": "usd", "system_source": "stripe_webhook_forwarder", "payment_method_bucket": "",
                "channel": "web", "retry_result": "fail", "failure_origin": "processor"}
        ignored: list[str] = []
        out = validator(SEED_NOW).validate(sent, ignored)
        self.assertEqual(ignored, ["amount_cents"])
        self.assertEqual(out["currency"], "USD")
        self.assertNotIn("payment_method_bucket", out)  # "" is absent
        self.assertEqual(out["event_timestamp"], "2026-01-06T00:30:00.000Z")

    def test_event_without_merchant_has_a_partition_key(self):
        rows, invalid, _ = validator().validate_batch([dict(VALID)])
        self.assertEqual((rows[0][1], invalid), ("", []))

    def test_fill_seed_fields(self):
        """layout = "seed": every seed field is stored, an absent string as "" (the Go data shape)."""
        v = validator(fill_seed_fields=True)
        out = v.validate(dict(VALID))
        self.assertEqual(set(out), set(events.SEED_FIELDS))
        self.assertEqual(out["merchant_id_hash"], "")
        self.assertEqual(out["retry_count"], 0)
        rows, _, _ = v.validate_batch([dict(VALID), dict(VALID, occurred_at=VALID["event_timestamp"],
                                                         event_timestamp=None)])
        self.assertEqual(rows[0][3], canonical_json(out))
        self.assertEqual(rows[1][3], rows[0][3])
        self.assertNotIn("currency", out)  # PayFlux's additions stay optional and omitted


class SchemaTests(ValidatorMixin, SynchronousTestCase):
    def test_schema_version(self):
        self.assertEqual(SCHEMA_VERSION, 1)
        self.assertEqual(len(events.FIELDS), 19)

    def test_full_event(self):
        self.assertEqual(validator().validate(dict(FULL)), FULL)

    def test_optional_null_and_empty_are_absent(self):
        for blank in (None, ""):
            fill = {f: blank for f in events.FIELDS if f not in VALID and f not in events.INT_FIELDS}
            out = validator().validate(dict(VALID, **fill))
            self.assertEqual(out, validator().validate(dict(VALID)))
        self.assertNotIn("processor_latency_ms", validator().validate(dict(VALID, processor_latency_ms=None)))

    def test_not_an_object(self):
        for value in ([], "x", 1, None, True, [VALID]):
            self.assertEqual(self.errors(value), [("$", "not_an_object")])

    def test_type_errors(self):
        for field in ("event_id", "event_type", "event_timestamp", "processor", "merchant_id_hash",
                      "currency", "geo_bucket", "failure_code", "amount_bucket", "channel"):
            for value in (1, 1.5, True, [], {}, ["a"]):
                self.assertFieldError(field, value, "type")

    def test_event_id(self):
        for ok in ("uuid-123", "a", "A.b_c:d-e", "x" * 128, "0123", "5b0c2f9e-3a4d-4e7b-9c1a-2f6d8e0b7a41",
                   "{5B0C2F9E-3A4D-4E7B-9C1A-2F6D8E0B7A41}", "urn:uuid:5b0c2f9e-3a4d-4e7b-9c1a-2f6d8e0b7a41",
                   "evt_1NfakeStripeEvent01"):
            self.assertFieldValid("event_id", ok)
        for bad in ("a b", "a/b", "é", "a\n", "a@b"):
            self.assertFieldError("event_id", bad, "format")
        self.assertFieldError("event_id", "x" * 129, "too_long")

    def test_event_type_takes_processor_names(self):
        for ok in ("payment_failed", "payment_intent.payment_failed", "charge.failed", "charge.dispute.created",
                   "radar.early_fraud_warning.created", "AUTHORISATION", "NOTIFICATION_OF_FRAUD",
                   "Payment Failed", "a" * 128):
            self.assertFieldValid("event_type", ok)
        for bad in (" payment_failed", "a@b", "a\tb", 'a"b', "a\\b", "café", "a\nb"):
            self.assertFieldError("event_type", bad, "format")
        self.assertFieldError("event_type", "a" * 129, "too_long")

    def test_processor_is_case_insensitive(self):
        for given_value, stored in (("stripe", "stripe"), ("Stripe", "stripe"), ("ADYEN", "adyen"),
                                    ("checkout", "checkout"), ("some_new_psp", "some_new_psp"), ("psp-2.eu", "psp-2.eu")):
            self.assertFieldValid("processor", given_value, stored)
        for bad in ("str ipe", "a@b", "_a", "ſtripe", "Kelvin\u212a"):
            self.assertFieldError("processor", bad, "format")
        self.assertFieldError("processor", "a" * 65, "too_long")

    def test_hashes(self):
        for field in HASHES:
            for ok in ("abc123", "xyz456", "none", "f" * 64, "x" * 128, "aGVsbG8+/w==", "A-_b.c:d"):
                self.assertFieldValid(field, ok)
            for bad in ("a b", "a@b.com", "é", "a\tb", " abc"):
                self.assertFieldError(field, bad, "format")
            self.assertFieldError(field, "x" * 129, "too_long")

    def test_labels(self):
        for field in STRING_LABELS:
            cap = events.STRING_FIELDS[field][2]
            for ok in ("processor_timeout", "Card Declined", "50-200", "<10", "1000+", "web", "x" * cap):
                self.assertFieldValid(field, ok)
            for bad in ("a@b", " x", 'a"b', "a\\b", "a\tb", "é", "a\u0000b"):
                self.assertFieldError(field, bad, "format")
            self.assertFieldError(field, "x" * (cap + 1), "too_long")

    def test_currency_is_case_insensitive(self):
        for given_value in ("USD", "usd", "Usd"):
            self.assertFieldValid("currency", given_value, "USD")
        for bad in ("US", "U$D", "ÄÖÜ", "u d"):
            self.assertFieldError("currency", bad, "format")
        self.assertFieldError("currency", "USDX", "too_long")

    def test_geo_bucket(self):
        for ok in ("US", "EU-west", "eu:1_x", "unknown"):
            self.assertFieldValid("geo_bucket", ok)
        for bad in ("EU west", "EU.west"):
            self.assertFieldError("geo_bucket", bad, "format")
        self.assertFieldError("geo_bucket", "A" * 33, "too_long")

    def test_failure_code(self):
        for ok in ("51", "card_declined:do_not_honor", "E.1-2"):
            self.assertFieldValid("failure_code", ok)
        for bad in ("a b", "a,b"):
            self.assertFieldError("failure_code", bad, "format")
        self.assertFieldError("failure_code", "x" * 65, "too_long")

    def test_retry_count(self):
        for ok in (0, 1, 100, 1000):
            self.assertFieldValid("retry_count", ok)
        for bad in (-1, 1001, 10**30):
            self.assertFieldError("retry_count", bad, "out_of_range")
        for bad in (True, False, 1.0, 0.0, "1", [1]):
            self.assertFieldError("retry_count", bad, "type")

    def test_processor_latency_ms(self):
        for ok in (0, 600_000):
            self.assertFieldValid("processor_latency_ms", ok)
        for bad in (-1, 600_001):
            self.assertFieldError("processor_latency_ms", bad, "out_of_range")
        for bad in (True, 1.5, 12.0, "12"):
            self.assertFieldError("processor_latency_ms", bad, "type")

    def test_multiple_errors_reported_in_schema_order(self):
        event = dict(VALID, event_id="a b", currency="u$d", retry_count=True, zz=1)
        del event["processor"]
        self.assertEqual(self.errors(event, unknown_fields="reject"), [
            ("event_id", "format"), ("processor", "required"), ("retry_count", "type"),
            ("currency", "format"), ("zz", "unknown_field")])


class AliasTests(ValidatorMixin, SynchronousTestCase):
    """occurred_at and payment_method (PayFlux's pre-seed names) are accepted, stored under the seed's."""

    def test_stored_under_the_seed_names(self):
        event = dict(VALID, payment_method="card")
        event["occurred_at"] = event.pop("event_timestamp")
        out = validator().validate(event)
        self.assertEqual(out, validator().validate(dict(VALID, payment_method_bucket="card")))
        self.assertNotIn("occurred_at", out)
        self.assertNotIn("payment_method", out)

    def test_errors_name_the_field_sent(self):
        event = dict(VALID, occurred_at="yesterday", payment_method="a@b")
        del event["event_timestamp"]
        self.assertEqual(self.errors(event), [("occurred_at", "format"), ("payment_method", "format")])
        del event["occurred_at"]
        self.assertEqual(self.errors(event), [("event_timestamp", "required"), ("payment_method", "format")])

    def test_both_names_is_an_error(self):
        self.assertEqual(self.errors(dict(VALID, occurred_at=VALID["event_timestamp"])),
                         [("occurred_at", "duplicate_field")])
        self.assertEqual(self.errors(dict(VALID, payment_method="card", payment_method_bucket="card")),
                         [("payment_method", "duplicate_field")])
        # an absent/null/"" alias next to the real name is no conflict
        self.assertEqual(validator().validate(dict(VALID, occurred_at=None, payment_method="")),
                         validator().validate(dict(VALID)))


class TimestampTests(ValidatorMixin, SynchronousTestCase):
    def test_normalised_to_utc_milliseconds(self):
        cases = {
            "2026-01-01T10:00:00+02:00": "2026-01-01T08:00:00.000Z",
            "2025-12-31T20:00:00-03:30": "2025-12-31T23:30:00.000Z",
            "2025-06-01T00:00:00Z": "2025-06-01T00:00:00.000Z",
            "2025-06-01t00:00:00.5z": "2025-06-01T00:00:00.500Z",
            "2025-06-01T00:00:00.123456789Z": "2025-06-01T00:00:00.123Z",
            "2025-06-01T00:00:00.9999+00:00": "2025-06-01T00:00:00.999Z",  # truncated
            "2000-01-01T00:00:00Z": "2000-01-01T00:00:00.000Z",
            "2024-02-29T12:00:00Z": "2024-02-29T12:00:00.000Z",
        }
        for given_value, expected in cases.items():
            self.assertFieldValid("event_timestamp", given_value, expected, now=NOW + 86400)

    def test_format(self):
        for bad in ("2026-01-01T10:00:00", "2026-01-01 10:00:00Z", "2026-01-01", "20260101T100000Z",
                    "2025-02-30T00:00:00Z", "2025-06-01T24:00:00Z", "2025-06-01T10:00:60Z",
                    "2025-06-01T10:00:00+24:00", "2025-06-01T10:00:00+0200", "2025-06-01T10:00:00.Z",
                    "2025-06-01T10:00:00.1234567890Z", "yesterday", "0000-01-01T00:00:00Z"):
            self.assertFieldError("event_timestamp", bad, "format")
        self.assertFieldError("event_timestamp", "2025-06-01T10:00:00Z" + " " * 60, "too_long")

    def test_before_2000(self):
        self.assertFieldError("event_timestamp", "1999-12-31T23:59:59.999Z", "out_of_range")
        self.assertFieldError("event_timestamp", "2000-01-01T00:30:00+01:00", "out_of_range")
        self.assertFieldValid("event_timestamp", "1999-12-31T23:30:00-01:00", "2000-01-01T00:30:00.000Z")

    def test_future_skew(self):
        self.assertFieldValid("event_timestamp", "2026-01-01T00:05:00Z", "2026-01-01T00:05:00.000Z")
        self.assertFieldError("event_timestamp", "2026-01-01T00:05:00.001Z", "future_timestamp")
        self.assertFieldError("event_timestamp", "2026-01-01T02:05:01+02:00", "future_timestamp")
        self.assertFieldError("event_timestamp", "2026-01-01T00:00:11Z", "future_timestamp",
                              future_skew_seconds=10)
        self.assertFieldError("event_timestamp", "9999-12-31T23:59:59-23:59", "future_timestamp")

    def test_now_is_injected(self):
        out = validator(now=NOW + 3600).validate(dict(VALID, event_timestamp="2026-01-01T01:00:00Z"))
        self.assertEqual(out["event_timestamp"], "2026-01-01T01:00:00.000Z")

    def test_far_future_with_far_future_clock(self):
        self.assertFieldError("event_timestamp", "9999-12-31T23:59:59-23:59", "out_of_range", now=1e12)


class UnknownFieldTests(ValidatorMixin, SynchronousTestCase):
    def test_dropped_by_default_and_reported(self):
        ignored: list[str] = []
        out = validator().validate(dict(VALID, amount=12, meta={"a": [1]}, extra=None), ignored)
        self.assertEqual(out, validator().validate(dict(VALID)))
        self.assertEqual(ignored, ["amount", "meta", "extra"])

    def test_dropped_fields_are_not_fingerprinted(self):
        v = validator()
        rows_a, _, ignored = v.validate_batch([dict(FULL, amount_cents=5000)])
        rows_b, _, _ = v.validate_batch([dict(FULL)])
        self.assertEqual(rows_a, rows_b)
        self.assertEqual(ignored, ["amount_cents"])

    def test_rejected_on_request(self):
        self.assertEqual(self.errors(dict(VALID, amount=12, extra=None), unknown_fields="reject"),
                         [("amount", "unknown_field"), ("extra", "unknown_field")])

    def test_unsafe_keys_are_not_echoed(self):
        event = dict(VALID, **{"a b": 1, "x" * 65: 2, "é": 3})
        self.assertEqual([f for f, _ in self.errors(event, unknown_fields="reject")],
                         ["<field #5>", "<field #6>", "<field #7>"])
        ignored: list[str] = []
        validator().validate(event, ignored)
        self.assertEqual(ignored, ["<field #5>", "<field #6>", "<field #7>"])

    def test_pan_checked_even_when_dropped(self):
        event = dict(VALID, meta={"note": ["card 4111 1111 1111 1111"]})
        self.assertEqual(self.errors(event), [("meta", "pan_detected")])

    def test_policy_values(self):
        with self.assertRaises(ValueError):
            ValidationPolicy(unknown_fields="ignore")


class PanInEventTests(ValidatorMixin, SynchronousTestCase):
    """How the validator applies the PAN guard (payflux.pan; the rule: tests/test_pan.py)."""

    def test_every_field_is_guarded(self):
        for field in ("event_id",) + HASHES + ("geo_bucket", "failure_code"):
            self.assertFieldError(field, "4111111111111111", "pan_detected")
        for field in ("event_type",) + STRING_LABELS:
            self.assertFieldError(field, "card 4111 1111 1111 1111", "pan_detected")
            self.assertFieldError(field, "4111.1111.1111.1111", "pan_detected")
        self.assertFieldError("failure_code", "4111-1111-1111-1111", "pan_detected")
        self.assertFieldError("event_id", ["4111111111111111"], "pan_detected")
        self.assertFieldError("occurred_at", "4111111111111111", "pan_detected")

    def test_digests_and_uuids_are_not_cards(self):
        for field, value in [("merchant_id_hash", "4471590812347765" + "a" * 48),
                             ("payment_intent_id_hash", "a" + "4111111111111111" + "b"),
                             ("event_id", "41111111-1111-1111-1111-111111111111")]:
            self.assertFieldValid(field, value)

    def test_unknown_field_and_key(self):
        self.assertEqual(self.errors(dict(VALID, note="4242 4242 4242 4242")), [("note", "pan_detected")])
        self.assertEqual(self.errors(dict(VALID, **{"4111111111111111": 1})), [("<field #5>", "pan_detected")])
        self.assertEqual(self.errors(dict(VALID, **{"card_4111111111111111": None})),
                         [("<field #5>", "pan_detected")])

    def test_pan_never_echoed(self):
        raw = "card 4111-1111-1111-1111 declined"
        event = dict(VALID, failure_code=raw, event_id=raw, note=raw, **{raw: raw})
        for policy in ("drop", "reject"):
            with self.assertRaises(EventInvalid) as cm:
                validator(unknown_fields=policy).validate(event)
            text = json.dumps(cm.exception.details) + str(cm.exception) + repr(cm.exception)
            for needle in ("4111", "1111", "declined"):
                self.assertNotIn(needle, text)


class CanonicalTests(SynchronousTestCase):
    def test_sorted_compact_utf8(self):
        out = validator().validate(dict(FULL))
        raw = canonical_json(out)
        self.assertEqual(raw, json.dumps(out, sort_keys=True, separators=(",", ":")).encode())
        self.assertTrue(raw.startswith(b'{"amount_bucket":"10-50","channel":"web","currency":"EUR",'))

    def test_key_order_irrelevant(self):
        reordered = dict(reversed(list(FULL.items())))
        v = validator()
        self.assertEqual(canonical_json(v.validate(reordered)), canonical_json(v.validate(dict(FULL))))

    def test_timestamp_normalisation_gives_same_bytes(self):
        v = validator(now=NOW + 86400)
        a = v.validate(dict(VALID, event_timestamp="2026-01-01T10:00:00+02:00"))
        b = v.validate(dict(VALID, event_timestamp="2026-01-01T08:00:00.000Z"))
        self.assertEqual(canonical_json(a), canonical_json(b))
        self.assertEqual(fingerprint(canonical_json(a)), fingerprint(canonical_json(b)))

    def test_case_folding_gives_same_bytes(self):
        v = validator()
        self.assertEqual(canonical_json(v.validate(dict(FULL, processor="Stripe", currency="eur"))),
                         canonical_json(v.validate(dict(FULL))))

    def test_retry_count_default_is_explicit(self):
        v = validator()
        self.assertEqual(canonical_json(v.validate(dict(VALID))),
                         canonical_json(v.validate(dict(VALID, retry_count=0))))
        self.assertIn(b'"retry_count":0', canonical_json(v.validate(dict(VALID))))

    def test_fingerprint(self):
        self.assertEqual(fingerprint(b"{}"),
                         "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a")

    def test_stdlib_fallback_is_byte_identical(self):
        out = validator().validate(dict(FULL))
        fast = canonical_json(out)
        self.patch(events, "_orjson", None)
        self.assertEqual(canonical_json(out), fast)


def body(obj) -> bytes:
    return json.dumps(obj).encode()


class DecodeTests(SynchronousTestCase):
    def test_reexported_from_events(self):
        """The decoder lives in payflux.jsonbody; payflux.events re-exports the same objects."""
        for name in ("MalformedJSON", "decode_event_body", "decode_batch_body", "MAX_DEPTH",
                     "MAX_NUMBER_DIGITS"):
            self.assertIs(getattr(events, name), getattr(jsonbody, name))
            self.assertIn(name, events.__all__)

    def malformed(self, raw: bytes) -> MalformedJSON:
        with self.assertRaises(MalformedJSON) as cm:
            decode_event_body(raw)
        return cm.exception

    def test_valid(self):
        self.assertEqual(decode_event_body(body(FULL)), FULL)
        self.assertEqual(decode_event_body(b' {"a" : "b",\n "c":[1, {"d": null}]}\r\n'),
                         {"a": "b", "c": [1, {"d": None}]})
        self.assertEqual(decode_event_body(b'{"a":"\\u00e9\\"x"}'), {"a": 'é"x'})

    def test_strictness(self):
        for raw in (b"", b"   ", b'{"a":1,"a":2}', b'{"a":1, "a" :2}', b'{"x":{"a":1,"a":2}}',
                    b'{"a\\u0062":1,"ab":2}', b'{"a": NaN}', b'{"a": Infinity}', b'-Infinity',
                    b'{"a": 1e400}', b"\xff", b'{"a":"\xc3"}', b"\xef\xbb\xbf{}", b"{} x", b"{}{}",
                    b'{"a":1,}', b"{'a':1}", b'{"a":01}', b"1" * 101, b'{"a":-' + b"9" * 101 + b"}",
                    b"0." + b"1" * 100, b"[" * 33 + b"]" * 33, b'{"a":' * 40 + b"1" + b"}" * 40,
                    b"[" * 100_000, '{"a":"é"}'.encode("utf-16")):
            exc = self.malformed(raw)
            self.assertIsNone(exc.line)

    def test_limits_are_inclusive(self):
        self.assertEqual(decode_event_body(b"1" * 100), int("1" * 100))
        nested = decode_event_body(b"[" * 32 + b"]" * 32)
        for _ in range(31):
            nested = nested[0]
        self.assertEqual(nested, [])
        self.assertEqual(decode_event_body(b'"' + b"[" * 100 + b'"'), "[" * 100)
        # an escaped quote must not confuse the depth pre-scan: outer array + 31 nested = 32
        self.assertEqual(len(decode_event_body(b'["\\"]", ' + b"[" * 31 + b"]" * 32)), 2)

    def test_messages_do_not_echo_input(self):
        for raw in (b'{"card":4111111111111111x}', b'{"card":"4111111111111111}', b'{"4111":1,"4111":2}'):
            self.assertNotIn("4111", str(self.malformed(raw)))

    def test_ndjson(self):
        raw = body(VALID) + b"\n\n  \r\n" + body(FULL) + b"\r\n"
        self.assertEqual(decode_batch_body(raw, "ndjson"), [VALID, FULL])
        with self.assertRaises(MalformedJSON) as cm:
            decode_batch_body(b'{}\n\n{"a":1}\n{"a":1,"a":2}\n', "ndjson")
        self.assertEqual(cm.exception.line, 4)
        with self.assertRaises(MalformedJSON) as cm:
            decode_batch_body(b'{}\n\xff\n', "ndjson")
        self.assertEqual(cm.exception.line, 2)
        for raw in (b"", b"\n \n"):
            self.assertRaises(MalformedJSON, decode_batch_body, raw, "ndjson")

    def test_ndjson_string_may_not_span_lines(self):
        with self.assertRaises(MalformedJSON) as cm:
            decode_batch_body(b'{"a":"x\ny"}\n{},{}', "ndjson")
        self.assertEqual(cm.exception.line, 1)

    def test_array(self):
        self.assertEqual(decode_batch_body(b"[" + body(VALID) + b",\n" + body(FULL) + b"]", "array"),
                         [VALID, FULL])
        self.assertEqual(decode_batch_body(b"[]", "array"), [])
        for raw in (b"{}", b"1", b"", b"[{}]x", b'[{"a":1,"a":2}]', b"[" * 34 + b"]" * 34):
            self.assertRaises(MalformedJSON, decode_batch_body, raw, "array")
        self.assertEqual(len(decode_batch_body(b"[" * 33 + b"]" * 33, "array")), 1)
        with self.assertRaises(MalformedJSON) as cm:
            decode_batch_body(b"[{},\n{},\n{x}]", "array")
        self.assertEqual(cm.exception.line, 3)

    def test_unknown_kind(self):
        self.assertRaises(ValueError, decode_batch_body, b"[]", "csv")


# --- property tests ------------------------------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers(-(10**30), 10**30) | st.floats(
    allow_nan=False, allow_infinity=False) | st.text(max_size=30)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=20,
)
field_values = st.sampled_from([
    "payment_failed", "abcdefgh1234", "2025-06-01T10:00:00Z", "EUR", "10-50", 0, 5, -1, True, None,
    1.0, "", "4111 1111 1111 1111", [], {}])
event_like = st.dictionaries(
    st.sampled_from(list(events.FIELDS) + list(events.ALIASES) + ["extra", "4111111111111111"]),
    field_values | json_values)
pans = st.sampled_from(PANS)


class PropertyTests(SynchronousTestCase):
    def check_pipeline(self, raw: bytes, allow_unknown: bool = False) -> None:
        v = validator(unknown_fields=UNKNOWN[allow_unknown])
        try:
            obj = decode_event_body(raw)
        except MalformedJSON:
            return
        try:
            out = v.validate(obj)
        except EventInvalid as e:
            self.assertTrue(e.details)
            for d in e.details:
                self.assertEqual(set(d), {"field", "code", "message"})
            return
        canonical = canonical_json(out)
        self.assertEqual(decode_event_body(canonical), out)
        self.assertEqual(canonical_json(v.validate(decode_event_body(canonical))), canonical)

    @PROPERTY
    @given(json_values | event_like, st.booleans())
    def test_arbitrary_json(self, value, allow_unknown):
        self.check_pipeline(json.dumps(value).encode(), allow_unknown)

    @PROPERTY
    @given(event_like.map(lambda e: dict(VALID, **e)), st.booleans())
    def test_mostly_valid_events(self, value, allow_unknown):
        self.check_pipeline(json.dumps(value).encode(), allow_unknown)

    @PROPERTY
    @given(st.binary(max_size=200))
    def test_arbitrary_bytes(self, raw):
        self.check_pipeline(raw)
        try:
            decode_batch_body(raw, "ndjson")
            decode_batch_body(raw, "array")
        except MalformedJSON:
            pass

    @PROPERTY
    @given(json_values | event_like, st.sampled_from([None, 0, 2]))
    def test_fast_path_matches_reference(self, value, indent):
        raw = json.dumps(value, indent=indent).encode()
        for raw in (raw, raw.replace(b"}", b', "k": 1, "k": 2}', 1)):
            try:
                expected = jsonbody._decode_reference(raw, jsonbody.MAX_DEPTH)
            except MalformedJSON:
                expected = MalformedJSON
            try:
                got = decode_event_body(raw)
            except MalformedJSON:
                got = MalformedJSON
            self.assertEqual(repr(got), repr(expected))

    @PROPERTY
    @given(event_like.map(lambda e: dict(VALID, **e)), pans, st.sampled_from(sorted(FULL) + ["x", "k"]),
           st.text(max_size=5), st.booleans())
    def test_pan_never_in_errors(self, event, card, field, prefix, as_key):
        prefix += " "  # a card number touching a letter is deliberately not a candidate (docs/events.md)
        if as_key:
            event[prefix + card] = prefix
        else:
            event[field] = prefix + card
        with self.assertRaises(EventInvalid) as cm:
            validator().validate(event)
        digits = card.replace(" ", "").replace("-", "")
        text = json.dumps(cm.exception.details) + str(cm.exception)
        self.assertNotIn(card, text)
        self.assertNotIn(digits, text)
        self.assertIn("pan_detected", [d["code"] for d in cm.exception.details])


class DecodeWithoutOrjsonTests(DecodeTests):
    """The same decoding contract holds when orjson is not installed (stdlib reference only)."""

    def setUp(self):
        self.patch(jsonbody, "_orjson", None)
        self.patch(events, "_orjson", None)


# --- the fast path agrees with the detailed validator ---------------------------------------

def _timestamps():
    """event_timestamp values around every limit the fast path decides on, in every accepted shape."""
    seconds = st.one_of(
        st.integers(946_684_800, int(NOW) + 300),  # the usual: since 2000, not in the future
        st.integers(946_684_800 - 90_000, 946_684_800 + 90_000),  # 2000-01-01, with offsets
        st.integers(int(NOW) - 4000, int(NOW) + 4000),  # now + skew, with offsets
        st.integers(0, 253_402_300_799),  # year 1970..9999
    )
    fraction = st.sampled_from(["", ".0", ".5", ".999", ".1234", ".999999", ".123456789", ".9999999999"])
    zone = st.sampled_from(["Z"] * 6 + ["z", "+00:00", "+02:00", "-03:30", "+23:59"])
    sep = st.sampled_from(["T"] * 8 + ["t", " "])

    def fmt(s, f, z, t):
        from datetime import datetime, timezone
        return datetime.fromtimestamp(s, timezone.utc).strftime(f"%Y-%m-%d{t}%H:%M:%S") + f + z
    fixed = st.sampled_from(["2025-02-29T00:00:00Z", "2024-02-29T23:59:59.5Z", "2025-04-31T00:00:00Z",
                             "0000-01-01T00:00:00Z", "2025-06-01T10:00:60Z", "2025-13-01T00:00:00Z"])
    built = st.builds(fmt, seconds, fraction, zone, sep)
    return st.one_of([built] * 4 + [fixed])


def _from(rx):
    return st.from_regex(rx, fullmatch=True)


valid_event = st.fixed_dictionaries(
    {name: _from(rx) for name, (req, rx, _, _) in events.STRING_FIELDS.items() if req}
    | {"event_timestamp": _timestamps()},
    optional={name: _from(rx) | st.sampled_from([None, ""]) for name, (req, rx, _, _) in events.STRING_FIELDS.items() if not req}
    | {"retry_count": st.integers(0, 1000) | st.sampled_from([-1, 1001, 10**30]) | st.none(),
       "processor_latency_ms": st.integers(0, 600_000) | st.sampled_from([-1, 600_001]) | st.none()},
)
mutations = st.lists(st.tuples(
    st.sampled_from(list(events.FIELDS) + list(events.ALIASES) + ["extra", "4111111111111111"]),
    field_values | json_values | st.sampled_from(["DELETE", "4111111111111111", "x" * 200, "é"]),
), max_size=3)


def _mutate(event: dict, changes) -> dict:
    event = dict(event)
    for name, value in changes:
        if value == "DELETE":
            event.pop(name, None)
        else:
            event[name] = value
    return event


class FastPathTests(SynchronousTestCase):
    def assertSameAsDetailed(self, event, **policy):
        v = validator(**policy)
        try:
            expected = v.validate_detailed(event)
        except EventInvalid as e:
            expected_details = e.details
            with self.assertRaises(EventInvalid) as cm:
                v.validate(event)
            self.assertEqual(cm.exception.details, expected_details)
            rows, invalid, _ = v.validate_batch([event])
            self.assertEqual((rows, invalid), ([], [(1, expected_details)]))
            return False
        got = v.validate(event)
        self.assertEqual(got, expected)
        self.assertEqual(list(got), list(expected))  # same key order too
        canonical = canonical_json(expected)
        rows, invalid, _ = v.validate_batch([event])
        self.assertEqual(invalid, [])
        self.assertEqual(rows, [(expected["event_id"], expected.get("merchant_id_hash", ""),
                                 expected["event_type"], canonical, fingerprint(canonical))])
        return True

    @PROPERTY
    @given(valid_event, st.booleans())
    def test_valid_events(self, event, allow_unknown):
        self.assertSameAsDetailed(event, unknown_fields=UNKNOWN[allow_unknown])

    @PROPERTY
    @given(valid_event, mutations, st.booleans())
    def test_mutated_events(self, event, changes, allow_unknown):
        self.assertSameAsDetailed(_mutate(event, changes), unknown_fields=UNKNOWN[allow_unknown])

    def test_fast_path_taken_for_common_events(self):
        v = validator()
        for event in (VALID, FULL, dict(SEED_EXAMPLE, event_timestamp="2025-12-31T00:00:00Z"), dict(FULL, event_timestamp="2025-12-31T23:59:00Z", retry_count=None)):
            self.assertIsNotNone(v._fast(event, None))
            self.assertTrue(self.assertSameAsDetailed(event))

    def test_batch_mixes_paths_and_reports_every_invalid_event(self):
        v = validator()
        items = [FULL, dict(VALID, event_timestamp="2026-01-01T01:00:00+01:00"),  # detailed, valid
                 dict(VALID, currency="u$d"), dict(VALID, note="4111 1111 1111 1111"), "x"]
        rows, invalid, _ = v.validate_batch(items)
        self.assertEqual(rows, [])
        self.assertEqual([(n, [(d["field"], d["code"]) for d in ds]) for n, ds in invalid], [
            (3, [("currency", "format")]), (4, [("note", "pan_detected")]), (5, [("$", "not_an_object")])])
        rows, invalid, _ = v.validate_batch(items[:2])
        self.assertEqual(invalid, [])
        self.assertEqual([r[3] for r in rows], [canonical_json(v.validate_detailed(i)) for i in items[:2]])
        self.assertEqual(v.validate_batch([]), ([], [], []))

    def test_pan_in_one_event_of_a_batch(self):
        v = validator()
        bad = dict(VALID, failure_code="x:4242424242424242")
        near_miss = dict(VALID, failure_code="6260181590830166")  # 16 digits, no Luhn window
        rows, invalid, _ = v.validate_batch([FULL, near_miss, bad])
        self.assertEqual([(n, [d["code"] for d in ds]) for n, ds in invalid], [(3, ["pan_detected"])])
        rows, invalid, _ = v.validate_batch([FULL, near_miss])
        self.assertEqual((len(rows), invalid), (2, []))


ndjson_lines = st.lists(
    st.one_of(
        (json_values | event_like | st.just(VALID)).map(lambda v: json.dumps(v)),
        st.sampled_from(["", "  ", "\r", '{"a":1,"a":2}', '{"a":1},{"b":2}', '{"a":1}  {"b":2}',
                         '{"a":"x', '"b":2}', '{"a":1.5}', '{"a":' + "9" * 30 + "}", "{}", "[{}]",
                         '{"a":"\\"b\\":1"}', '{"a" : "b" ,"c":[]}', '{"a":"]"}', '{"a":1}]']),
    ),
    max_size=6,
)


class NdjsonFastPathTests(SynchronousTestCase):
    def test_taken_for_flat_objects(self):
        raw = body(VALID) + b"\n\n  \r\n" + body(FULL) + b"\r\n"
        self.assertEqual(jsonbody._decode_ndjson_fast(raw), [VALID, FULL])
        for raw in (b'{"a":1}\n{"a":1,"a":2}', b'{"a":"x\ny"}', b'{"a":1,\n"b":2}', b"{},{}",
                    b'{"a":{"b":1}}', b'{"a":1.0}', b"\n\n", b'{"a":"\\u0041"}'):
            self.assertIsNone(jsonbody._decode_ndjson_fast(raw), raw)

    @PROPERTY
    @given(ndjson_lines, st.sampled_from(["\n", "\r\n"]), st.booleans())
    def test_whole_body_parse_matches_line_by_line(self, lines, newline, trailing):
        raw = (newline.join(lines) + (newline if trailing else "")).encode()
        got = jsonbody._decode_ndjson_fast(raw)
        if got is None:
            return  # line by line decides
        self.assertEqual(repr(got), repr([decode_event_body(line) for line in raw.split(b"\n")
                                          if line.strip(b" \t\r")]))
