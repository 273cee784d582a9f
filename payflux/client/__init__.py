"""
The Python producer client for PayFlux (docs/producers.md, "The Python client").

``Client`` (blocking, a background thread) and ``AsyncClient`` (asyncio, a task) batch events
to ``POST /v1/events/payment_exhaust/batch`` as NDJSON, retry what may be retried with the same
bytes, and account for every event: accepted, rejected or dropped, never silently lost.
``build_event`` and ``hash_id`` make seed-shaped events with keyed hashes.  Standard library
only: importing it needs neither Twisted nor the rest of PayFlux.

Layers, bottom to top: ``events`` (shapes, hashing, the encoded line), ``delivery`` (results,
errors, backoff, the retry policy as steps), ``outbox`` (buffering and batching), then the two
drivers ``sync`` and ``aio``; ``testing`` holds the fakes.
"""

from payflux.client.aio import AsyncClient, AsyncHttpTransport
from payflux.client.delivery import (
    ACCEPTED,
    DROPPED,
    REJECTED,
    Backoff,
    BufferFull,
    ClientClosed,
    ClientError,
    Delivery,
    FlushResult,
    FlushTimeout,
    Response,
    Stats,
    TransportError,
)
from payflux.client.events import build_event, encode_event, format_timestamp, hash_id
from payflux.client.sync import Client, HttpTransport

__all__ = [
    "Client", "AsyncClient", "HttpTransport", "AsyncHttpTransport", "build_event", "hash_id", "encode_event",
    "format_timestamp", "Delivery", "FlushResult", "Stats", "Backoff", "Response", "BufferFull", "ClientClosed",
    "ClientError", "FlushTimeout", "TransportError", "ACCEPTED", "REJECTED", "DROPPED",
]
