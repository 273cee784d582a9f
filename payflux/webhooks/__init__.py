"""
Processor webhooks, natively (docs/producers.md, "Processor webhooks"): Stripe and Adyen
deliveries verified as each processor documents it and mapped to PayFlux's seed-shaped event,
plus outcome signals for the risk loop.  Transport-free: the HTTP routes call
``StripeWebhook.handle`` / ``AdyenWebhook.handle`` and act on the :class:`WebhookResult`.
"""

from payflux.webhooks.adyen import AdyenWebhook, parse_hmac_key
from payflux.webhooks.common import (
    ACCEPTED, IGNORED, REJECTED, Ignored, ItemCheck, OutcomeSignal, ProcessorWebhook, WebhookError, WebhookResult,
    hash_id,
)
from payflux.webhooks.stripe import StripeWebhook

__all__ = [
    "StripeWebhook", "AdyenWebhook", "parse_hmac_key", "WebhookResult", "WebhookError", "Ignored", "ItemCheck",
    "OutcomeSignal", "ProcessorWebhook", "hash_id", "ACCEPTED", "IGNORED", "REJECTED",
]
