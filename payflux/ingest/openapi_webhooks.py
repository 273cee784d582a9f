"""
The processor webhook part of the OpenAPI document (:mod:`payflux.ingest.openapi`): ``POST
/v1/webhooks/stripe`` and ``POST /v1/webhooks/adyen`` on the ingest listener
(:mod:`payflux.ingest.webhooks`).  No bearer security: the processor's signature is the
authentication.  Limits come from the handlers' own constants so the two can't drift.  The
ingest listener's HTTP-layer answers (408, 414, 431, 500) are added by
:func:`payflux.ingest.openapi.listener_errors`.
"""

from __future__ import annotations

from payflux.webhooks import adyen, stripe

NO_KEY = []  # no API key: signed by the processor instead


def _error(description: str, retry_after: bool = False) -> dict:
    response: dict = {"description": description,
                      "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    if retry_after:
        response["headers"] = {"Retry-After": {"schema": {"type": "integer"}, "description": "Seconds to wait."}}
    return response


def _answers(ack: dict, signature: str, cap: int) -> dict:
    return {
        "200": ack,
        "400": _error("Malformed: " + signature + ", or the body is not strict JSON (malformed_json) / not a "
                      "notification of this processor; nothing was written. Or a malformed request head or chunked "
                      "body (bad_request, bad_content_length, bad_transfer_encoding, bad_framing, bad_chunk)."),
        "401": _error("Not authentic: missing_signature, signature_mismatch (no configured secret matches), "
                      "stale_timestamp (Stripe: t more than 300 s from the node's clock); nothing was written."),
        "404": _error("not_found: the route is off (its secret is not configured)."),
        "413": _error(f"payload_too_large: body larger than {cap} bytes (checked while reading)."),
        "503": _error("redis_unavailable, replicas_not_acked, overloaded (too many events in flight) or draining: "
                      "nothing acknowledged, the processor delivers again.", retry_after=True),
    }


STRIPE_ACK = {
    "description": "Taken: the mapped events are in Redis (or were duplicates of a redelivery), or the "
                   "type is not mapped, or a mapped event was refused by the event validator (counted, "
                   "not written; a redelivery would not change it).",
    "content": {"application/json": {"schema": {
        "type": "object", "required": ["received"], "properties": {"received": {"type": "boolean", "enum": [True]}},
        "example": {"received": True}}}},
}
ADYEN_ACK = {
    "description": "Taken (as for Stripe); Adyen's documented answer.",
    "content": {"text/plain": {"schema": {"type": "string", "enum": ["[accepted]"], "example": "[accepted]"}}},
}

PATHS = {
    "/v1/webhooks/stripe": {
        "post": {
            "operationId": "receiveStripeWebhook",
            "tags": ["webhooks"],
            "security": NO_KEY,
            "summary": "A Stripe webhook event, verified (Stripe-Signature) and mapped to payment_exhaust "
                       "events (docs/producers.md, \"Processor webhooks\"); on only with stripe_webhook_secret.",
            "parameters": [{
                "name": "Stripe-Signature", "in": "header", "required": True,
                "description": "t=<unix>,v1=<hex HMAC-SHA256 of \"<t>.\" + body with the endpoint secret>[,v1=...]",
                "schema": {"type": "string", "maxLength": stripe.MAX_HEADER_CHARS},
            }],
            "requestBody": {
                "required": True,
                "description": f"A Stripe event object, at most {stripe.MAX_BODY_BYTES} bytes, signed as sent.",
                "content": {"application/json": {"schema": {
                    "type": "object", "required": ["id", "type", "created", "data"],
                    "properties": {"id": {"type": "string"}, "type": {"type": "string"},
                                   "created": {"type": "integer"}, "account": {"type": "string"},
                                   "data": {"type": "object", "required": ["object"],
                                            "properties": {"object": {"type": "object"}}}}}}},
            },
            "responses": _answers(STRIPE_ACK, "a Stripe-Signature header that is not t=...,v1=... "
                                              "(malformed_signature, no_v1_signature)", stripe.MAX_BODY_BYTES),
        }
    },
    "/v1/webhooks/adyen": {
        "post": {
            "operationId": "receiveAdyenWebhook",
            "tags": ["webhooks"],
            "security": NO_KEY,
            "summary": "An Adyen standard notification, every item's additionalData.hmacSignature verified "
                       "(all or nothing) and mapped to payment_exhaust events; on only with adyen_hmac_key.",
            "requestBody": {
                "required": True,
                "description": f"At most {adyen.MAX_BODY_BYTES} bytes and {adyen.MAX_ITEMS} items.",
                "content": {"application/json": {"schema": {
                    "type": "object", "required": ["notificationItems"],
                    "properties": {
                        "live": {"type": "string"},
                        "notificationItems": {"type": "array", "minItems": 1, "maxItems": adyen.MAX_ITEMS, "items": {
                            "type": "object", "required": ["NotificationRequestItem"],
                            "properties": {"NotificationRequestItem": {
                                "type": "object", "required": ["pspReference", "eventCode", "success"],
                                "properties": {"pspReference": {"type": "string"}, "eventCode": {"type": "string"},
                                               "success": {"type": "string", "enum": ["true", "false"]},
                                               "additionalData": {"type": "object", "properties": {
                                                   "hmacSignature": {"type": "string"}}}}}}}}}}}},
            },
            "responses": _answers(ADYEN_ACK, "malformed_notification", adyen.MAX_BODY_BYTES),
        }
    },
}
