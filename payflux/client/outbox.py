"""
The events a client holds between ``send()`` and their settling, and when they make a batch:
the part of the producer that is the same with a thread or an asyncio task around it.

Not thread-safe: :class:`payflux.client.Client` calls it under its lock, the asyncio client from
its loop.  One batch is in flight at a time and batches are taken from the front, so events reach
the gateway in ``send()`` order (retries included) and the settled events are always a prefix of
the sequence numbers: ``flush`` waits for ``settled_upto`` to reach the count it saw.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any, Callable

from payflux.client.delivery import (
    ACCEPTED, DROPPED, REJECTED, Backoff, BufferFull, ClientClosed, Delivery, FlushResult, Pending, Stats, _closed,
)

log = logging.getLogger("payflux.client")


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


class ClientCore:
    """
    What :class:`payflux.client.Client` and :class:`payflux.client.AsyncClient` share apart from
    how they wait and do I/O: the options, the outbox, the overflow rule and the reporting of
    results.  The subclass sets ``_transport``, ``_clock`` and ``_cond`` and calls the methods
    below with ``_cond`` held where they say so.
    """

    def __init__(self, batch_size: int, linger_ms: float, max_batch_bytes: int, max_buffered_events: int,
                 overflow: str, block_timeout: float, delivery_timeout: float | None, backoff_base: float,
                 backoff_max: float, on_result: Callable[[Delivery], Any] | None, keep_failures: int,
                 uniform: Callable[[float, float], float]) -> None:
        if overflow not in ("block", "raise"):
            raise ValueError("overflow must be 'block' or 'raise'")
        self._outbox = Outbox(batch_size, linger_ms / 1000.0, max_buffered_events, max_batch_bytes, keep_failures)
        self._overflow = overflow
        self._block_timeout = block_timeout
        self._delivery_timeout = delivery_timeout
        self._backoff = Backoff(backoff_base, backoff_max, uniform)
        self._on_result = on_result
        self._closing = False
        self._abort = False
        self._final: FlushResult | None = None

    def _room_wait(self, deadline: float, now: float) -> float | None:
        """With ``_cond`` held, in ``send()``: None when the outbox has room for one more event,
        else the seconds ``send()`` may still wait for some (``deadline``: when it started waiting
        plus ``block_timeout``).  Raises BufferFull (``overflow="raise"``, or the time is up) or
        ClientClosed (closed while it waited), counting ``buffer_full``."""
        outbox = self._outbox
        if outbox.has_room():
            return None
        if self._overflow == "raise":
            outbox.stats.buffer_full += 1
            raise BufferFull(f"{outbox.unsettled} events buffered (max_buffered_events)")
        left = deadline - now
        if left <= 0 or self._closing:
            outbox.stats.buffer_full += 1
            if self._closing:
                raise ClientClosed("client closed while send() waited for room")
            raise BufferFull(f"{outbox.unsettled} events buffered for {self._block_timeout} s")
        return left

    def _report(self, reports: list[Delivery]) -> None:
        """Each report to ``on_result`` (not under ``_cond``); a callback's bug never stops the rest."""
        if self._on_result is None:
            return
        for report in reports:
            try:
                self._on_result(report)
            except Exception:
                log.exception("on_result callback failed")
