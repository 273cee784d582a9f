"""
The events a client holds between ``send()`` and their settling, and when they make a batch:
the part of the producer that is the same with a thread or an asyncio task around it.

Not thread-safe: :class:`payflux.client.Client` calls it under its lock, the asyncio client from
its loop.  One batch is in flight at a time and batches are taken from the front, so events reach
the gateway in ``send()`` order (retries included) and the settled events are always a prefix of
the sequence numbers: ``flush`` waits for ``settled_upto`` to reach the count it saw.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from payflux.client.delivery import ACCEPTED, DROPPED, REJECTED, Delivery, FlushResult, Pending, Stats, _closed


class Outbox:
    def __init__(self, batch_size: int, linger: float, max_buffered: int, max_batch_bytes: int,
                 keep_failures: int = 100) -> None:
        if batch_size < 1 or max_buffered < 1 or max_batch_bytes < 1 or linger < 0:
            raise ValueError("batch_size, max_buffered_events and max_batch_bytes must be >= 1, linger_ms >= 0")
        self.batch_size = batch_size
        self.linger = linger
        self.max_buffered = max_buffered
        self.max_batch_bytes = max_batch_bytes
        self.keep_failures = keep_failures
        self.queue: deque[Pending] = deque()
        self.queued_bytes = 0
        self.in_flight = 0
        self.settled_upto = 0      # every event with seq < this is settled
        self.flush_to = 0          # events with seq < this go without lingering (flush, close)
        self.stats = Stats()
        self.window = FlushResult()

    @property
    def next_seq(self) -> int:
        return self.stats.sent

    @property
    def unsettled(self) -> int:
        return len(self.queue) + self.in_flight

    def has_room(self) -> bool:
        return self.unsettled < self.max_buffered

    def add(self, event: Any, event_id: str, line: bytes, now: float) -> bool:
        """Enqueue; True when the sender should wake the worker (a new linger deadline, or a full batch)."""
        was_empty = not self.queue
        self.queue.append(Pending(self.stats.sent, event, event_id, line, now))
        self.queued_bytes += len(line) + 1
        self.stats.sent += 1
        return was_empty or len(self.queue) == self.batch_size or self.queued_bytes >= self.max_batch_bytes

    def due(self, now: float) -> bool:
        """Is a batch ready: full (events or bytes), flushed, or its oldest event lingered long enough?"""
        if not self.queue or self.in_flight:
            return False
        first = self.queue[0]
        return (len(self.queue) >= self.batch_size or self.queued_bytes >= self.max_batch_bytes
                or first.seq < self.flush_to or now >= first.enqueued_at + self.linger)

    def wake_at(self) -> float | None:
        """When the oldest queued event has lingered enough (None: nothing queued)."""
        return self.queue[0].enqueued_at + self.linger if self.queue else None

    def take(self) -> list[Pending]:
        """The next batch: up to ``batch_size`` events and ``max_batch_bytes`` (at least one event)."""
        batch: list[Pending] = []
        size = 0
        while self.queue and len(batch) < self.batch_size:
            p = self.queue[0]
            if batch and size + len(p.line) + 1 > self.max_batch_bytes:
                break
            self.queue.popleft()
            size += len(p.line) + 1
            batch.append(p)
        self.queued_bytes -= size
        self.in_flight = len(batch)
        return batch

    def settle(self, batch: list[Pending], reports: list[Delivery]) -> None:
        """Count the reports of the batch :meth:`take` gave; they cover each of its events once."""
        for report in reports:
            n = len(report)
            if report.outcome == ACCEPTED:
                self.stats.accepted += n
                self.stats.duplicates += report.duplicates
                self.window.accepted += n
            else:
                if report.outcome == REJECTED:
                    self.stats.rejected += n
                    self.window.rejected += n
                else:
                    self.stats.dropped += n
                    self.window.dropped += n
                self.window.failures.append(report)
                del self.window.failures[:-self.keep_failures or None]
        self.in_flight = 0
        if batch:
            self.settled_upto = batch[-1].seq + 1

    def drop_queued(self) -> list[Delivery]:
        """Give up on everything still queued (close timed out): one ``dropped`` report, counted."""
        if not self.queue:
            return []
        batch = list(self.queue)
        self.queue.clear()
        self.queued_bytes = 0
        reports = [_closed(batch, 0)]
        self.settle(batch, reports)
        return reports

    def drain_window(self) -> FlushResult:
        window, self.window = self.window, FlushResult()
        return window


__all__ = ["Outbox", "ACCEPTED", "REJECTED", "DROPPED"]
