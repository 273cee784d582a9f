"""
Decline and error codes of the processors mapped to one small ``failure_category`` vocabulary,
each with the ``failure_origin`` the risk consumer counts failures by (docs/risk.md; the table is
docs/producers.md, "failure_category").

A code PayFlux does not know becomes ``other`` with no origin, and the processor's own code still
travels, as a token, in ``failure_code``: a new decline code shows up in the stream, not in a
silent bucket.
"""

from __future__ import annotations

import attrs

from payflux.webhooks.common import get, token

ISSUER, CUSTOMER, PROCESSOR, MERCHANT, NETWORK = "issuer", "customer", "processor", "merchant", "network"

#: failure_category -> the failure_origin it has unless the processor says better.
CATEGORIES = {
    "insufficient_funds": ISSUER,
    "limit_exceeded": ISSUER,
    "card_declined": ISSUER,
    "fraud_suspected": ISSUER,
    "card_restricted": ISSUER,
    "issuer_unavailable": ISSUER,
    "card_expired": CUSTOMER,
    "invalid_card_details": CUSTOMER,
    "authentication_required": CUSTOMER,
    "cancelled": CUSTOMER,
    "processor_error": PROCESSOR,
    "invalid_request": MERCHANT,
    "other": None,
}


@attrs.frozen
class Failure:
    """``failure_category``, ``failure_origin`` (None: unknown) and ``failure_code`` (the
    processor's code as a token, None if it had none usable) of one failed attempt."""

    category: str
    origin: str | None
    code: str | None

    def fields(self) -> dict:
        return {"failure_category": self.category, "failure_origin": self.origin, "failure_code": self.code}


def _table(spec: dict[str, str]) -> dict[str, tuple[str, str | None]]:
    out = {}
    for category, codes in spec.items():
        for code in codes.split():
            out[code] = (category, CATEGORIES[category])
    return out


# Stripe's decline codes (https://docs.stripe.com/declines/codes) and error codes
# (https://docs.stripe.com/error-codes) as they appear in last_payment_error.decline_code / .code,
# charge.failure_code and charge.outcome.reason.
STRIPE_CODES = _table({
    "insufficient_funds": "insufficient_funds",
    "limit_exceeded": "card_velocity_exceeded withdrawal_count_limit_exceeded",
    "card_declined": "card_declined generic_decline do_not_honor do_not_try_again call_issuer no_action_taken "
                     "approve_with_id revocation_of_all_authorizations revocation_of_authorization "
                     "stop_payment_order new_account_information_available reenter_transaction "
                     "duplicate_transaction testmode_decline",
    "fraud_suspected": "fraudulent lost_card stolen_card pickup_card security_violation",
    "card_restricted": "card_not_supported currency_not_supported transaction_not_allowed not_permitted "
                       "service_not_allowed restricted_card invalid_account",
    "issuer_unavailable": "issuer_not_available try_again_later",
    "card_expired": "expired_card",
    "invalid_card_details": "incorrect_number invalid_number incorrect_cvc invalid_cvc invalid_expiry_month "
                            "invalid_expiry_year incorrect_zip incorrect_address incorrect_pin invalid_pin "
                            "pin_try_exceeded",
    "authentication_required": "authentication_required payment_intent_authentication_failure "
                               "offline_pin_required online_or_offline_pin_required",
    "processor_error": "processing_error api_error",
    "invalid_request": "amount_too_large amount_too_small invalid_amount invalid_charge_amount "
                       "parameter_invalid_integer parameter_missing payment_intent_unexpected_state",
})
# Codes whose origin is the processor itself, whatever their category's default.
STRIPE_PROCESSOR_CODES = frozenset({"merchant_blacklist", "card_decline_rate_limit_exceeded",
                                    "highest_risk_level", "elevated_risk_level"})
STRIPE_CODES.update({
    "merchant_blacklist": ("fraud_suspected", PROCESSOR),  # the merchant's Radar block list
    "highest_risk_level": ("fraud_suspected", PROCESSOR),  # Radar's default block rule
    "elevated_risk_level": ("fraud_suspected", PROCESSOR),
    "card_decline_rate_limit_exceeded": ("limit_exceeded", PROCESSOR),  # Stripe stops retries of one card
})
# last_payment_error.type when no code is known.
_STRIPE_ERROR_TYPES = {"card_error": ("card_declined", ISSUER), "api_error": ("processor_error", PROCESSOR),
                       "invalid_request_error": ("invalid_request", MERCHANT)}
# charge.outcome.type -> failure_origin.
_STRIPE_OUTCOME_ORIGINS = {"issuer_declined": ISSUER, "blocked": PROCESSOR, "invalid": MERCHANT}


def _stripe(codes: list[object], fallback: tuple[str, str | None] | None) -> Failure:
    tokens = [t for t in (token(c) for c in codes) if t]
    for t in tokens:
        if t in STRIPE_CODES:
            category, origin = STRIPE_CODES[t]
            return Failure(category, origin, t)
    category, origin = fallback or ("other", None)
    return Failure(category, origin, tokens[0] if tokens else None)


def stripe_payment_error(error: object) -> Failure:
    """A PaymentIntent's ``last_payment_error``: ``decline_code``, then ``code``, then ``type``."""
    fallback = _STRIPE_ERROR_TYPES.get(get(error, "type"))  # type: ignore[arg-type]
    return _stripe([get(error, "decline_code"), get(error, "code")], fallback)


def stripe_charge_failure(charge: object) -> Failure:
    """A failed Charge: ``outcome.reason`` (the decline code, or Radar's rule), then
    ``failure_code``; a charge Radar blocked (``outcome.type: blocked``) is ``fraud_suspected``
    from the ``processor``; otherwise ``outcome.type`` says who declined."""
    outcome = get(charge, "outcome")
    kind = get(outcome, "type")
    failure = _stripe([get(outcome, "reason"), get(charge, "failure_code")], None)
    if kind == "blocked":
        return Failure("fraud_suspected", PROCESSOR, failure.code)
    origin = _STRIPE_OUTCOME_ORIGINS.get(kind) if isinstance(kind, str) else None
    if origin and failure.code not in STRIPE_PROCESSOR_CODES:
        return attrs.evolve(failure, origin=origin)
    return failure


# Adyen's refusal reasons (https://docs.adyen.com/development-resources/refusal-reasons):
# refusalReasonCode -> (the reason text Adyen sends in `reason`, category, origin).
ADYEN_REFUSALS: dict[str, tuple[str, str, str | None]] = {
    "0": ("Unknown", "other", None),
    "2": ("Refused", "card_declined", ISSUER),
    "3": ("Referral", "card_declined", ISSUER),
    "4": ("Acquirer Error", "processor_error", PROCESSOR),
    "5": ("Blocked Card", "card_restricted", ISSUER),
    "6": ("Expired Card", "card_expired", CUSTOMER),
    "7": ("Invalid Amount", "invalid_request", MERCHANT),
    "8": ("Invalid Card Number", "invalid_card_details", CUSTOMER),
    "9": ("Issuer Unavailable", "issuer_unavailable", ISSUER),
    "10": ("Not supported", "card_restricted", ISSUER),
    "11": ("3D Not Authenticated", "authentication_required", CUSTOMER),
    "12": ("Not enough balance", "insufficient_funds", ISSUER),
    "14": ("Acquirer Fraud", "fraud_suspected", PROCESSOR),
    "15": ("Cancelled", "cancelled", MERCHANT),
    "16": ("Shopper Cancelled", "cancelled", CUSTOMER),
    "17": ("Invalid Pin", "invalid_card_details", CUSTOMER),
    "18": ("Pin tries exceeded", "invalid_card_details", CUSTOMER),
    "19": ("Pin validation not possible", "card_declined", ISSUER),
    "20": ("FRAUD", "fraud_suspected", PROCESSOR),  # Adyen's risk rules refused it
    "21": ("Not Submitted", "processor_error", PROCESSOR),
    "22": ("FRAUD-CANCELLED", "fraud_suspected", PROCESSOR),
    "23": ("Transaction Not Permitted", "card_restricted", ISSUER),
    "24": ("CVC Declined", "invalid_card_details", CUSTOMER),
    "25": ("Restricted Card", "card_restricted", ISSUER),
    "26": ("Revocation Of Auth", "card_declined", ISSUER),
    "27": ("Declined Non Generic", "card_declined", ISSUER),
    "28": ("Withdrawal amount exceeded", "limit_exceeded", ISSUER),
    "29": ("Withdrawal count exceeded", "limit_exceeded", ISSUER),
    "31": ("Issuer Suspected Fraud", "fraud_suspected", ISSUER),
    "32": ("AVS Declined", "invalid_card_details", CUSTOMER),
    "33": ("Card requires online pin", "authentication_required", CUSTOMER),
    "34": ("No checking account available on Card", "card_restricted", ISSUER),
    "35": ("No savings account available on Card", "card_restricted", ISSUER),
    "36": ("Mobile pin required", "authentication_required", CUSTOMER),
    "37": ("Contactless fallback", "authentication_required", CUSTOMER),
    "38": ("Authentication required", "authentication_required", CUSTOMER),
    "39": ("RReq not received from DS", "processor_error", NETWORK),
    "40": ("Current AID is in Penalty Box", "card_declined", ISSUER),
    "41": ("CVM Required Restart Payment", "authentication_required", CUSTOMER),
    "42": ("3DS Authentication Error", "processor_error", NETWORK),
    "43": ("Online PIN required", "authentication_required", CUSTOMER),
    "44": ("Try another interface", "authentication_required", CUSTOMER),
    "45": ("Offline Decline", "card_declined", ISSUER),
}
_ADYEN_BY_TEXT = {token(text): (token(text), category, origin)
                  for text, category, origin in ADYEN_REFUSALS.values()}


def adyen_refusal(item: object) -> Failure:
    """A refused AUTHORISATION: ``additionalData.refusalReasonCode`` when it is one Adyen lists,
    else the ``reason`` text (Adyen's refusal reason, e.g. ``Not enough balance``)."""
    code = get(item, "additionalData", "refusalReasonCode")
    if isinstance(code, int) and not isinstance(code, bool):
        code = str(code)
    if isinstance(code, str) and code in ADYEN_REFUSALS:
        text, category, origin = ADYEN_REFUSALS[code]
        return Failure(category, origin, token(text))
    reason = token(get(item, "reason"))
    if reason in _ADYEN_BY_TEXT:
        code_token, category, origin = _ADYEN_BY_TEXT[reason]
        return Failure(category, origin, code_token)
    return Failure("other", None, reason)
