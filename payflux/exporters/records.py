"""
The exported shape of a stream entry, shared by the exporters that write JSON (file, webhook).

``export_record`` is one NDJSON line of the file exporter and one element of a webhook batch;
``FORMAT_VERSION`` is its ``v``.  The delivery count is left out on purpose: a redelivered entry
exports byte-identical JSON, so a destination can drop duplicates by comparing lines.
"""

from __future__ import annotations

from payflux.consumers.handlers import Entry
from payflux.events import canonical_json

FORMAT_VERSION = 1


def export_record(entry: Entry) -> dict:
    """The exported shape of one entry: a line of the file exporter, an element of a webhook batch."""
    return {
        "v": FORMAT_VERSION,
        "stream_id": entry.stream_id,
        "partition": entry.partition,
        "event_id": entry.event_id,
        "type": entry.type,
        "received_at": entry.received_at_ms,
        "event": entry.event,
    }


def ndjson_lines(entries: list[Entry]) -> bytes:
    """The NDJSON bytes of a batch: one canonical JSON object and ``\\n`` per entry."""
    return b"".join(canonical_json(export_record(e)) + b"\n" for e in entries)
