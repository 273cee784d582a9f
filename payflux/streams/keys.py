"""
Redis key naming for PayFlux streams (part of the stream-format contract, v1).

Every key of a partition carries the hash tag ``{p}`` so the stream, its dedupe
keys and its dead-letter stream share one Redis Cluster slot and can be used
together in one Lua call::

    <prefix>:{<p>}:events              the partition's event stream
    <prefix>:{<p>}:dlq                 the partition's dead-letter stream
    <prefix>:{<p>}:dd                  dedupe table: the generations of the partition's records
    <prefix>:{<p>}:dd:<g>:<b>          dedupe bucket b of generation g: a hash of compact records
    <prefix>:{<p>}:seen:<event_id>     stream-format v1's dedupe record "<fingerprint> <stream id>"
                                       (no longer written; read for two windows after an upgrade)

``partition_for`` is the documented, stable partition function; changing it
would reorder a merchant's events across partitions, so it never changes
within stream-format v1.

``layout="seed"`` (setting ``layout = "seed"``) names the Go PayFlux's keys
instead; it has one partition (0) and the prefix is not used for them::

    events_stream                      the event stream
    events_stream_dlq                  the dead-letter stream
    {events_stream}:seen:<event_id>    dedupe record (hash tag: events_stream's slot)

Keys PayFlux adds that the Go program has no counterpart for (the alerts
stream, risk state, ...) stay under ``<prefix>:`` in both layouts.
"""

from __future__ import annotations

import re
import zlib

import attrs

_BAD_PREFIX = re.compile(r"[{}\s]")

LAYOUTS = ("payflux", "seed")
SEED_STREAM = "events_stream"
SEED_DLQ = "events_stream_dlq"


def _check_prefix(instance: object, attribute: attrs.Attribute, value: str) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError("stream key prefix must be a non-empty string")
    if _BAD_PREFIX.search(value):
        raise ValueError(f"stream key prefix {value!r} must not contain '{{', '}}' or whitespace")


@attrs.frozen
class StreamKeys:
    """
    Key names for one PayFlux deployment (``prefix`` separates deployments; ``layout`` is
    "payflux", the hash-tagged partitioned keys, or "seed", the Go PayFlux's ``events_stream``).
    """

    prefix: str = attrs.field(default="payflux", validator=_check_prefix)
    layout: str = attrs.field(default="payflux", kw_only=True, validator=attrs.validators.in_(LAYOUTS))

    def _base(self, p: int) -> str:
        if not isinstance(p, int) or p < 0:
            raise ValueError(f"partition must be a non-negative integer, not {p!r}")
        if self.layout == "seed":
            if p != 0:
                raise ValueError(f"layout seed has one partition (0), not {p!r}")
            return SEED_STREAM
        return f"{self.prefix}:{{{p}}}"

    def events(self, p: int) -> str:
        """The event stream of partition ``p``: ``<prefix>:{p}:events`` (seed: ``events_stream``)."""
        base = self._base(p)
        return base if self.layout == "seed" else f"{base}:events"

    def dlq(self, p: int) -> str:
        """The dead-letter stream of partition ``p``: ``<prefix>:{p}:dlq`` (seed: ``events_stream_dlq``)."""
        base = self._base(p)
        return SEED_DLQ if self.layout == "seed" else f"{base}:dlq"

    def dedupe(self, p: int) -> str:
        """The dedupe table of partition ``p``: ``<prefix>:{p}:dd`` (layout "payflux" only)."""
        return f"{self._compact_base(p)}:dd"

    def dedupe_bucket_base(self, p: int) -> str:
        """What the dedupe bucket keys of ``p`` start with: ``<prefix>:{p}:dd:`` (then ``<g>:<b>``)."""
        return f"{self._compact_base(p)}:dd:"

    def dedupe_bucket(self, p: int, generation: str | int, bucket: int) -> str:
        """Bucket ``bucket`` of dedupe generation ``generation`` of ``p``: ``<prefix>:{p}:dd:<g>:<b>``."""
        return f"{self.dedupe_bucket_base(p)}{generation}:{bucket}"

    def _compact_base(self, p: int) -> str:
        if self.layout == "seed":
            raise ValueError("layout seed keeps one {events_stream}:seen:<event_id> key per event")
        return self._base(p)

    def seen(self, p: int, event_id: str) -> str:
        """
        The per-event dedupe key of ``event_id`` in partition ``p``: ``<prefix>:{p}:seen:<event_id>``
        (seed: ``{events_stream}:seen:<event_id>``, in ``events_stream``'s cluster slot).  The seed
        layout writes these; layout "payflux" only reads them after an upgrade (``dedupe``).
        """
        base = self._base(p)
        return f"{{{base}}}:seen:{event_id}" if self.layout == "seed" else f"{base}:seen:{event_id}"


def partition_for(merchant_id_hash: str, partitions: int) -> int:
    """
    The partition of a merchant: ``zlib.crc32(merchant_id_hash.encode("utf-8")) % partitions``.

    CRC-32 (IEEE 802.3, as zlib and most languages compute it, unsigned) is
    stable across processes and Python versions (unlike ``hash()``), so every
    node and every consumer agrees on where a merchant's events live, and a
    merchant's events stay in one ordered stream.  ``partitions == 1`` always
    gives 0.
    """
    if not isinstance(partitions, int) or partitions < 1:
        raise ValueError(f"partitions must be a positive integer, not {partitions!r}")
    if partitions == 1:
        return 0
    return zlib.crc32(merchant_id_hash.encode("utf-8")) % partitions
