"""Consumer groups over the payment-event streams: runtime, reclaim, dead letters, retention."""
