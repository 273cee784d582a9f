"""
Adyen standard notifications, natively: each item's HMAC signature verified as Adyen documents
it, each item mapped to PayFlux's seed-shaped event (docs/events.md) and, for chargebacks and
fraud notifications, an outcome signal for the risk loop.  The contract and the mapping tables:
docs/producers.md, "Processor webhooks".

The body is ``{"live": "false", "notificationItems": [{"NotificationRequestItem": {...}}, ...]}``;
Adyen expects the answer ``[accepted]`` once the notification is taken, and delivers it again
otherwise.

HMAC (https://docs.adyen.com/development-resources/webhooks/secure-webhooks/verify-hmac-signatures,
"Verify using your own solution"): the signing string is the item's ``pspReference``,
``originalReference``, ``merchantAccountCode``, ``merchantReference``, ``amount.value``,
``amount.currency``, ``eventCode`` and ``success`` joined with ``:``, an absent value as the empty
string; HMAC-SHA256 of it (UTF-8) keyed with the hex-decoded HMAC key, base64; equal (constant
time) to ``additionalData.hmacSignature``.  The values are **not** escaped: the ``\\`` and ``:``
escaping of Adyen's HMAC page applies to the key-value signatures of its classic payment pages
(sorted ``key:...:value`` strings), not to notifications — Adyen's own libraries join the eight
values as they are (adyen-node-api-library ``src/utils/hmacValidator.ts`` ``getDataToSign``,
adyen-python-api-library ``Adyen/util.py`` ``generate_notification_sig``).  Tested against
Adyen's published example (``7914073381342284::TestMerchant:TestPayment-1407325143704:1130:EUR:
AUTHORISATION:true`` -> ``coqCmt/IZ4E3CzPvMY8zTjQVL5hYJUiBRg8UU+iCWo0=``) and the Node library's
test vector.

All or nothing: if any item fails (no signature, or none matches any key), the whole
notification is refused with 401 and nothing is mapped.  Adyen then delivers the whole batch
again, and the items already taken are deduplicated by their ``event_id``; taking part of a
batch would answer ``[accepted]`` for items PayFlux refused, and Adyen would never resend them.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import Mapping, Sequence

from payflux.jsonbody import MalformedJSON, decode_event_body
from payflux.webhooks.common import (
    ACCEPTED, IGNORED, IdHasher, Ignored, ItemCheck, OutcomeSignal, WebhookResult, amount_bucket, card_bucket,
    compact, country, currency, get, iso_from_rfc3339, rejected, token, type_label,
)
from payflux.webhooks.failures import adyen_refusal

PROCESSOR, SOURCE = "adyen", "adyen_webhook"
#: Largest body accepted, and most items in one notification.
MAX_BODY_BYTES = 1024 * 1024
MAX_ITEMS = 100
ACK_BODY, ACK_CONTENT_TYPE = b"[accepted]", "text/plain; charset=utf-8"

#: Adyen's zero- and three-decimal currencies (https://docs.adyen.com/development-resources/currency-codes).
EXPONENTS = {**{c: 0 for c in "CVE DJF GNF IDR JPY KMF KRW PYG RWF UGX VND VUV XAF XOF XPF".split()},
             **{c: 3 for c in "BHD IQD JOD KWD LYD OMR TND".split()}}

SIGNED_FIELDS = ("pspReference", "originalReference", "merchantAccountCode", "merchantReference",
                 "amount.value", "amount.currency", "eventCode", "success")


def parse_hmac_key(text: str) -> bytes:
    """An HMAC key as the Customer Area shows it (hex) -> its bytes; ValueError naming the rule."""
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        raise ValueError("an Adyen HMAC key must be hexadecimal, as the Customer Area shows it") from None
    if not key:
        raise ValueError("an Adyen HMAC key must not be empty")
    return key


def _signed_value(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def signing_string(item: dict) -> str:
    """The item's HMAC signing string (module docstring)."""
    return ":".join(_signed_value(get(item, *name.split("."))) for name in SIGNED_FIELDS)


def item_signature(item: dict, key: bytes) -> str:
    """The base64 HMAC-SHA256 Adyen puts in ``additionalData.hmacSignature`` (``key`` hex-decoded)."""
    digest = hmac.new(key, signing_string(item).encode("utf-8"), hashlib.sha256).digest()
    return base64.b64encode(digest).decode("ascii")


_CARDS = frozenset("visa mc amex discover diners jcb maestro cup cartebancaire bcmc dankort visadankort elo "
                   "hipercard mir interac_card eftpos_australia uatp girocard accel nyce pulse star "
                   "card scheme".split())
_WALLETS = frozenset("applepay googlepay paywithgoogle samsungpay paypal amazonpay alipay alipay_hk wechatpay "
                     "wechatpayqr mobilepay vipps twint swish mbway gcash kakaopay cashapp clicktopay".split())
_BANK = frozenset("ideal sepadirectdebit ach directebanking giropay trustly eps dotpay blik paybybank "
                  "onlinebanking_pl bacs bankTransfer_IBAN pix".split())
_BANK_PREFIXES = ("banktransfer", "onlinebanking", "ebanking", "directdebit", "openbanking")
_BNPL = frozenset("klarna klarna_paynow klarna_account affirm afterpaytouch clearpay zip atome paybright "
                  "ratepay riverty".split())
_WALLET_VARIANTS = ("applepay", "googlepay", "paywithgoogle", "samsungpay")


def method_bucket(item: dict) -> str | None:
    """``payment_method_bucket`` of an item: ``paymentMethod``, ``additionalData.fundingSource``
    and ``paymentMethodVariant`` (``visa_applepay`` is a wallet)."""
    method = item.get("paymentMethod")
    if not isinstance(method, str) or not method:
        return None
    variant = get(item, "additionalData", "paymentMethodVariant")
    if isinstance(variant, str) and any(w in variant.lower() for w in _WALLET_VARIANTS):
        return "wallet"
    lower = method.lower()
    if lower in _CARDS:
        return card_bucket(get(item, "additionalData", "fundingSource"))
    if lower in _WALLETS:
        return "wallet"
    if lower in _BANK or lower.startswith(_BANK_PREFIXES):
        return "bank"
    return "bnpl" if lower in _BNPL or lower.startswith("klarna") else "other"


def _shape_error(body: object, max_items: int) -> str | None:
    """Why ``body`` is not a standard notification (a message without values), or None."""
    items = get(body, "notificationItems")
    if not isinstance(items, list) or not items:
        return "the body must be an object with a non-empty notificationItems array"
    if len(items) > max_items:
        return f"a notification may carry at most {max_items} items"
    for n, wrapper in enumerate(items, 1):
        item = get(wrapper, "NotificationRequestItem")
        if not isinstance(item, dict):
            return f"item {n}: must be an object holding a NotificationRequestItem object"
        for name in ("pspReference", "eventCode"):
            if not isinstance(item.get(name), str) or not item[name]:
                return f"item {n}: {name} must be a non-empty string"
        if item.get("success") not in ("true", "false"):
            return f'item {n}: success must be "true" or "false"'
    return None


class AdyenWebhook:
    """``POST /v1/webhooks/adyen``'s logic: ``handle(headers, body, now)`` -> WebhookResult.

    ``hmac_keys``: the webhook's HMAC keys, hex-decoded (:func:`parse_hmac_key`; several while
    rotating); ``id_hash_key``: the key of every ``*_hash`` (at least 16 bytes).  ``headers`` and
    ``now`` are not used by Adyen's scheme (the signature is in the body and signs no time); they
    keep one signature for every processor's handler."""

    processor = PROCESSOR
    mapped_types = ("AUTHORISATION", "REFUND", "CHARGEBACK", "NOTIFICATION_OF_FRAUD")

    def __init__(self, hmac_keys: Sequence[bytes], id_hash_key: bytes, max_body_bytes: int = MAX_BODY_BYTES,
                 max_items: int = MAX_ITEMS):
        self.hmac_keys = tuple(hmac_keys)
        if not self.hmac_keys or not all(isinstance(k, bytes) and k for k in self.hmac_keys):
            raise ValueError("at least one Adyen HMAC key (non-empty bytes, hex-decoded) is required")
        self.max_body_bytes = max_body_bytes
        self.max_items = max_items
        self._hash = IdHasher(id_hash_key)

    def _result(self, status: str, **kw) -> WebhookResult:
        return WebhookResult(status, ack_content_type=ACK_CONTENT_TYPE, ack_body=ACK_BODY, **kw)

    def verify(self, item: dict) -> bool:
        signature = get(item, "additionalData", "hmacSignature")
        if not isinstance(signature, str) or not signature:
            return False
        given = signature.encode("utf-8", "replace")
        matched = False
        for key in self.hmac_keys:
            matched |= hmac.compare_digest(item_signature(item, key).encode("ascii"), given)
        return matched

    def handle(self, headers: Mapping[str, str], body: bytes, now: float) -> WebhookResult:
        if len(body) > self.max_body_bytes:
            return rejected(413, "body_too_large", f"the body exceeds {self.max_body_bytes} bytes")
        try:
            doc = decode_event_body(body)
        except MalformedJSON as e:
            return rejected(400, "malformed_json", f"the body is not valid JSON: {e.message}")
        problem = _shape_error(doc, self.max_items)
        if problem is not None:
            return rejected(400, "malformed_notification", problem)
        items = [wrapper["NotificationRequestItem"] for wrapper in doc["notificationItems"]]
        checks = [ItemCheck(n, type_label(item["eventCode"]), self.verify(item)) for n, item in enumerate(items)]
        failed = [c for c in checks if not c.verified]
        if failed:
            unsigned = [c for c in failed if not get(items[c.index], "additionalData", "hmacSignature")]
            code = "missing_signature" if len(unsigned) == len(failed) else "signature_mismatch"
            where = ", ".join(str(c.index + 1) for c in failed[:10])
            return rejected(401, code, f"notification item(s) {where} of {len(items)} failed HMAC verification; "
                                       "the whole notification is refused so that Adyen delivers it again",
                            items=checks)
        events, signals, ignored = [], [], []
        for item in items:
            self._map(item, events, signals, ignored)
        return self._result(ACCEPTED if events else IGNORED, events=events, signals=signals, ignored=ignored,
                            items=checks)

    # --- mapping --------------------------------------------------------------------------------

    def _map(self, item: dict, events: list, signals: list, ignored: list) -> None:
        code, success = item["eventCode"], item["success"] == "true"
        if code not in self.mapped_types:
            ignored.append(Ignored(type_label(code), "unmapped_type"))
            return
        if not success and code != "AUTHORISATION":
            ignored.append(Ignored(code, "not_processed"))
            return
        timestamp = iso_from_rfc3339(item.get("eventDate"))
        if timestamp is None:
            ignored.append(Ignored(code, "unmappable"))
            return
        extra = get(item, "additionalData")
        cur = currency(get(item, "amount", "currency"))
        event = {
            # pspReference is digits: as an id of its own it could pass Luhn and be refused as a
            # card number, and it is the processor's payment id, so it travels hashed.
            "event_id": "adyen:" + self._hash(f"{item['pspReference']}:{code}:{item['success']}"),
            "event_type": code,
            "event_timestamp": timestamp,
            "processor": PROCESSOR,
            "system_source": SOURCE,
            "merchant_id_hash": self._hash(item.get("merchantAccountCode")),
            "payment_intent_id_hash": self._hash(item.get("originalReference") or item["pspReference"]),
            "customer_id_hash": self._hash(get(extra, "shopperReference")),
            "amount_bucket": amount_bucket(get(item, "amount", "value"), cur, EXPONENTS),
            "currency": cur,
            "geo_bucket": country(get(extra, "cardIssuingCountry"), get(extra, "issuerCountry"),
                                  get(extra, "billingAddress.country"), get(extra, "shopperCountry")),
            "payment_method_bucket": method_bucket(item),
        }
        if code == "AUTHORISATION":
            if success:
                event["retry_result"] = "success"
            else:
                event.update(retry_result="failed", **adyen_refusal(item).fields())
        events.append(compact(event))
        if code in ("CHARGEBACK", "NOTIFICATION_OF_FRAUD"):
            detail = token(get(extra, "chargebackReasonCode")) if code == "CHARGEBACK" else token(item.get("reason"))
            label = "reason_code" if code == "CHARGEBACK" else "reason"
            signals.append(OutcomeSignal(PROCESSOR, "other", timestamp, SOURCE,
                                         code + (f" {label}={detail}" if detail else ""),
                                         event["event_id"], event.get("merchant_id_hash")))


__all__ = ["AdyenWebhook", "parse_hmac_key", "signing_string", "item_signature", "method_bucket",
           "EXPONENTS", "MAX_BODY_BYTES", "MAX_ITEMS", "ACK_BODY", "ACK_CONTENT_TYPE"]
