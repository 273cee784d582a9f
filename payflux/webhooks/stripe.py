"""
Stripe webhooks, natively: ``Stripe-Signature`` verified as Stripe documents it, the event mapped
to PayFlux's seed-shaped event (docs/events.md) and, for disputes and fraud, an outcome signal
for the risk loop.  The contract and the mapping tables: docs/producers.md, "Processor webhooks".

Verification (https://docs.stripe.com/webhooks#verify-manually): the header is
``t=<unix>,v1=<hex>[,v1=<hex>...][,v0=...]``; the signed payload is ``f"{t}.".encode() + body``
(the raw body, byte for byte); the expected signature is the hex HMAC-SHA256 of it keyed with the
endpoint secret (the whole ``whsec_...`` string); the delivery is authentic if any ``v1`` equals
it (constant-time compare) for any configured secret (rotation: Stripe signs with every active
secret).  Then the timestamp must be within ``tolerance`` seconds of ``now``, either side (Stripe's
libraries only refuse old ones; a timestamp far in the future is as suspect).  ``v0`` and other
schemes are ignored.  The body is parsed only after it is authentic.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from typing import Callable, Mapping, Sequence

from payflux.jsonbody import MalformedJSON, decode_event_body
from payflux.webhooks.common import (
    ACCEPTED, IGNORED, REJECTED, IdHasher, Ignored, OutcomeSignal, WebhookError, WebhookResult, amount_bucket,
    card_bucket, compact, country, currency, get, iso_from_unix, rejected, safe_event_id, token, type_label,
)
from payflux.webhooks.failures import stripe_charge_failure, stripe_payment_error

PROCESSOR, SOURCE = "stripe", "stripe_webhook"
#: Default seconds between the signed timestamp and the receiver's clock (Stripe's default).
DEFAULT_TOLERANCE = 300.0
#: Largest body accepted: Stripe's events of the mapped types are a few KiB.
MAX_BODY_BYTES = 256 * 1024
MAX_HEADER_CHARS = 4096
MAX_HEADER_ELEMENTS = 64

#: Stripe's zero- and three-decimal currencies (https://docs.stripe.com/currencies#minor-units).
EXPONENTS = {**{c: 0 for c in "BIF CLP DJF GNF JPY KMF KRW MGA PYG RWF UGX VND VUV XAF XOF XPF".split()},
             **{c: 3 for c in "BHD JOD KWD OMR TND".split()}}

_T = re.compile(r"[0-9]{1,12}").fullmatch


def verify_signature(header: str | None, body: bytes, secrets: Sequence[bytes], now: float,
                     tolerance: float = DEFAULT_TOLERANCE) -> WebhookError | None:
    """None if ``header`` authenticates ``body``; else the error the route answers with."""
    if not header:
        return WebhookError(401, "missing_signature", "the Stripe-Signature header is required")
    elements = header.split(",")
    if len(header) > MAX_HEADER_CHARS or len(elements) > MAX_HEADER_ELEMENTS:
        return WebhookError(400, "malformed_signature", "the Stripe-Signature header is too long")
    timestamp, signed_t, signatures = None, "", []
    for element in elements:
        name, sep, value = element.strip().partition("=")
        if not sep or not name:
            return WebhookError(400, "malformed_signature",
                                "the Stripe-Signature header must be comma-separated name=value elements")
        if name == "t":
            if timestamp is not None or not _T(value):
                return WebhookError(400, "malformed_signature",
                                    "the Stripe-Signature header must carry one t= Unix timestamp")
            timestamp, signed_t = int(value), value  # signed as sent
        elif name == "v1":
            signatures.append(value.encode("utf-8", "replace"))
    if timestamp is None:
        return WebhookError(400, "malformed_signature", "the Stripe-Signature header has no t= timestamp")
    if not signatures:
        return WebhookError(400, "no_v1_signature",
                            "the Stripe-Signature header has no v1 signature (only v1, HMAC-SHA256, is accepted)")
    signed = signed_t.encode() + b"." + body
    matched = False
    for secret in secrets:
        expected = hmac.new(secret, signed, hashlib.sha256).hexdigest().encode()
        for signature in signatures:
            matched |= hmac.compare_digest(expected, signature)
    if not matched:
        return WebhookError(401, "signature_mismatch",
                            "no v1 signature matches the body with any configured webhook secret")
    if abs(now - timestamp) > tolerance:
        return WebhookError(401, "stale_timestamp",
                            f"the signed timestamp is more than {tolerance:g} seconds from the receiver's clock")
    return None


def _id(value: object) -> str | None:
    """A Stripe reference: an id string, or an expanded object's ``id``."""
    if isinstance(value, dict):
        value = value.get("id")
    return value if isinstance(value, str) and value else None


_WALLETS = frozenset("link cashapp paypal wechat_pay alipay amazon_pay revolut_pay mobilepay grabpay kakao_pay "
                     "naver_pay samsung_pay twint swish".split())
_BANK = frozenset("us_bank_account sepa_debit bacs_debit au_becs_debit acss_debit nz_bank_account ideal sofort "
                  "bancontact giropay eps p24 fpx blik customer_balance pay_by_bank pix promptpay".split())
_BNPL = frozenset("klarna afterpay_clearpay affirm zip alma billie".split())
_CARDS = frozenset({"card", "card_present", "interac_present"})


def method_bucket(kind: object, details: object) -> str | None:
    """``payment_method_bucket`` of a payment method ``type`` and its ``card`` (or other) part."""
    if not isinstance(kind, str):
        return None
    if kind in _CARDS:
        return "wallet" if get(details, "wallet") else card_bucket(get(details, "funding"))
    if kind in _WALLETS:
        return "wallet"
    if kind in _BANK:
        return "bank"
    return "bnpl" if kind in _BNPL else "other"


def _payment_method(pm: object) -> tuple[str | None, str | None]:
    """(bucket, card or billing country) of an expanded PaymentMethod (None, None for an id)."""
    kind = get(pm, "type")
    details = get(pm, kind) if isinstance(kind, str) else None
    return method_bucket(kind, details), country(get(details, "country"),
                                                 get(pm, "billing_details", "address", "country"))


def _charge_method(charge: object) -> tuple[str | None, str | None]:
    pmd = get(charge, "payment_method_details")
    kind = get(pmd, "type")
    details = get(pmd, kind) if isinstance(kind, str) else None
    return method_bucket(kind, details), country(get(details, "country"),
                                                 get(charge, "billing_details", "address", "country"))


class StripeWebhook:
    """``POST /v1/webhooks/stripe``'s logic: ``handle(headers, body, now)`` -> WebhookResult.

    ``secrets``: the endpoint's signing secrets (bytes, several while rotating); ``id_hash_key``:
    the key of every ``*_hash`` (at least 16 bytes); ``tolerance``: seconds of clock difference
    accepted; ``max_body_bytes``: larger bodies are refused (413) before any work."""

    processor = PROCESSOR

    def __init__(self, secrets: Sequence[bytes], id_hash_key: bytes, tolerance: float = DEFAULT_TOLERANCE,
                 max_body_bytes: int = MAX_BODY_BYTES):
        self.secrets = tuple(secrets)
        if not self.secrets or not all(isinstance(s, bytes) and s for s in self.secrets):
            raise ValueError("at least one Stripe webhook secret (non-empty bytes) is required")
        if tolerance <= 0:
            raise ValueError("tolerance must be positive")
        self.tolerance = float(tolerance)
        self.max_body_bytes = max_body_bytes
        self._hash = IdHasher(id_hash_key)
        self._mappers: dict[str, Callable[[dict, dict, dict], WebhookResult]] = {
            "payment_intent.payment_failed": self._intent_failed,
            "payment_intent.succeeded": self._intent_succeeded,
            "charge.failed": self._charge_outcome,
            "charge.succeeded": self._charge_outcome,
            "charge.refunded": self._charge_refunded,
            "charge.dispute.created": self._dispute,
            "radar.early_fraud_warning.created": self._early_fraud_warning,
            "review.opened": self._review,
        }

        self.mapped_types = tuple(self._mappers)

    def handle(self, headers: Mapping[str, str], body: bytes, now: float) -> WebhookResult:
        if len(body) > self.max_body_bytes:
            return rejected(413, "body_too_large", f"the body exceeds {self.max_body_bytes} bytes")
        error = verify_signature(headers.get("stripe-signature"), body, self.secrets, now, self.tolerance)
        if error is not None:
            return WebhookResult(REJECTED, error=error)
        try:
            event = decode_event_body(body)
        except MalformedJSON as e:
            return rejected(400, "malformed_json", f"the body is not valid JSON: {e.message}")
        obj = get(event, "data", "object")
        kind = get(event, "type")
        if not (isinstance(event, dict) and isinstance(event.get("id"), str) and event["id"]
                and isinstance(kind, str) and isinstance(obj, dict) and iso_from_unix(event.get("created"))):
            return rejected(400, "invalid_event", "the body is not a Stripe event (id, type, created, data.object)")
        mapper = self._mappers.get(kind)
        if mapper is None:
            return WebhookResult(IGNORED, ignored=[Ignored(type_label(kind), "unmapped_type")])
        return mapper(event, obj, self._base(event, kind))

    # --- mapping --------------------------------------------------------------------------------

    def _base(self, event: dict, kind: str) -> dict:
        raw = event["id"]
        return {
            "event_id": raw if safe_event_id(raw) else "stripe:" + self._hash(raw),
            "event_type": kind,
            "event_timestamp": iso_from_unix(event["created"]),
            "processor": PROCESSOR,
            "system_source": SOURCE,
            "merchant_id_hash": self._hash(event.get("account")),
        }

    def _money(self, amount: object, obj: dict) -> dict:
        cur = currency(obj.get("currency"))
        return {"amount_bucket": amount_bucket(amount, cur, EXPONENTS), "currency": cur}

    @staticmethod
    def _accept(event: dict, signal: OutcomeSignal | None = None) -> WebhookResult:
        return WebhookResult(ACCEPTED, events=[compact(event)], signals=[signal] if signal else [])

    def _signal(self, base: dict, outcome_type: str, detail: str | None) -> OutcomeSignal:
        notes = base["event_type"] + (f" {detail}" if detail else "")
        return OutcomeSignal(PROCESSOR, outcome_type, base["event_timestamp"], SOURCE, notes,
                             base["event_id"], base.get("merchant_id_hash"))

    def _intent(self, pi: dict, base: dict, pm: object) -> dict:
        bucket, geo = _payment_method(pm)
        if bucket is None:
            types = pi.get("payment_method_types")
            if isinstance(types, list) and len(types) == 1:
                bucket = method_bucket(types[0], None)
        return {**base, "payment_intent_id_hash": self._hash(_id(pi.get("id"))),
                "customer_id_hash": self._hash(_id(pi.get("customer"))),
                "geo_bucket": geo, "payment_method_bucket": bucket}

    def _intent_failed(self, event: dict, pi: dict, base: dict) -> WebhookResult:
        error = pi.get("last_payment_error")
        out = self._intent(pi, base, get(error, "payment_method") or pi.get("payment_method"))
        out.update(self._money(pi.get("amount"), pi), retry_result="failed", **stripe_payment_error(error).fields())
        return self._accept(out)

    def _intent_succeeded(self, event: dict, pi: dict, base: dict) -> WebhookResult:
        out = self._intent(pi, base, pi.get("payment_method"))
        received = pi.get("amount_received")
        out.update(self._money(received if isinstance(received, int) else pi.get("amount"), pi),
                   retry_result="success")
        return self._accept(out)

    def _charge(self, charge: dict, base: dict, amount: object) -> dict:
        bucket, geo = _charge_method(charge)
        return {**base, "payment_intent_id_hash": self._hash(_id(charge.get("payment_intent")) or _id(charge.get("id"))),
                "customer_id_hash": self._hash(_id(charge.get("customer"))),
                "geo_bucket": geo, "payment_method_bucket": bucket, **self._money(amount, charge)}

    def _charge_outcome(self, event: dict, charge: dict, base: dict) -> WebhookResult:
        # A charge made by a PaymentIntent is counted once, from the PaymentIntent's own event:
        # counting both would double every attempt (retry_storm counts attempts per intent).
        if _id(charge.get("payment_intent")):
            return WebhookResult(IGNORED, ignored=[Ignored(base["event_type"], "covered_by_payment_intent")])
        out = self._charge(charge, base, charge.get("amount"))
        if base["event_type"] == "charge.failed":
            out.update(retry_result="failed", **stripe_charge_failure(charge).fields())
        else:
            out["retry_result"] = "success"
        return self._accept(out)

    def _charge_refunded(self, event: dict, charge: dict, base: dict) -> WebhookResult:
        return self._accept(self._charge(charge, base, charge.get("amount_refunded")))

    def _related(self, obj: dict, base: dict) -> dict:
        """Disputes, fraud warnings, reviews: hashed to their payment (intent, else charge)."""
        return {**base, "payment_intent_id_hash": self._hash(_id(obj.get("payment_intent")) or _id(obj.get("charge")))}

    def _dispute(self, event: dict, dispute: dict, base: dict) -> WebhookResult:
        out = self._related(dispute, base)
        pmd = dispute.get("payment_method_details")
        kind = get(pmd, "type")
        out.update(self._money(dispute.get("amount"), dispute),
                   payment_method_bucket=method_bucket(kind, get(pmd, kind) if isinstance(kind, str) else None))
        reason = token(dispute.get("reason"))
        return self._accept(out, self._signal(out, "other", reason and f"reason={reason}"))

    def _early_fraud_warning(self, event: dict, warning: dict, base: dict) -> WebhookResult:
        out = self._related(warning, base)
        fraud_type = token(warning.get("fraud_type"))
        return self._accept(out, self._signal(out, "other", fraud_type and f"fraud_type={fraud_type}"))

    def _review(self, event: dict, review: dict, base: dict) -> WebhookResult:
        out = self._related(review, base)
        out["geo_bucket"] = country(get(review, "ip_address_location", "country"))
        opened = token(review.get("opened_reason")) or token(review.get("reason"))
        # Radar's rules opened it: the processor's review.  "manual": the merchant's own staff did.
        outcome_type = "review" if opened == "rule" else "other"
        return self._accept(out, self._signal(out, outcome_type, opened and f"reason={opened}"))


__all__ = ["StripeWebhook", "verify_signature", "method_bucket", "EXPONENTS", "DEFAULT_TOLERANCE",
           "MAX_BODY_BYTES"]
