"""PayFlux: a payment-event gateway on Twisted and Redis Streams."""

__version__ = "0.1.0"
