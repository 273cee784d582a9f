"""
An example PayFlux handler: counts events by type and fails events it can't use.

Configure it with ``handler = "count_handler:CountHandler"`` (with docs/examples on the
Python path) and ``options = { label = "risk" }`` in a ``[[consumers]]`` table.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from twisted.logger import Logger

from payflux.consumers.handlers import EntriesFailed, Entry

VERSION = "1"


class CountHandler:
    """Counts events per type; an event without an ``amount`` fails alone (it will be retried, then dead-lettered)."""

    log = Logger()

    def __init__(self, reactor: Any, label: str = "count") -> None:
        self.reactor = reactor
        self.label = label
        self.counts: Counter[str] = Counter()

    async def handle(self, entries: list[Entry]) -> None:
        failures = {}
        for entry in entries:
            if "amount" not in entry.event:
                failures[entry.stream_id] = ValueError("event has no amount")
                continue
            self.counts[entry.type] += 1
        if failures:
            raise EntriesFailed(failures)  # the other entries are acknowledged

    def close(self) -> None:
        self.log.info("{label}: counted {counts}", label=self.label, counts=dict(self.counts))
