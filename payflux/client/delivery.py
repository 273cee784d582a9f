"""
Delivering one batch: what an answer means and when to try again, written once as a step
generator that the blocking :class:`payflux.client.Client` and the asyncio
:class:`payflux.client.AsyncClient` both drive (as ``payflux.redis.steps`` does for Redis).

:func:`deliver` yields :class:`Post` (answered with a :class:`Response`, a
:class:`TransportError` or :data:`ABORTED`) and :class:`Sleep` (answered True, or False when the
client is closing and gave up waiting), and returns the :class:`Delivery` reports that settle every
event of the batch.  The policy (docs/producers.md, "Retries"):

- ``2xx``: accepted (``"duplicate": true`` included: the gateway already holds that event).
- ``408``, ``429``, ``5xx``, a connection error or a timeout: the same bytes again after
  exponential backoff with full jitter, never sooner than ``Retry-After``.  Safe because every
  event keeps its ``event_id`` and the gateway deduplicates on it.  An event's retries end
  ``delivery_timeout`` after its ``send()``: it is reported ``dropped`` with the last answer.
- ``422``/``400`` naming lines, ``409`` naming event ids: the gateway refused the whole request
  atomically because of those events; they are reported ``rejected`` with their details, and the
  other events are sent again at once as a new request (so one bad event never sinks 499 good
  ones).
- ``413``, or ``422 too_many_events``: the request was too big for this gateway; it is split in
  halves, down to single events (a single event still too big is rejected).
- any other ``4xx``: rejected, the server's JSON error attached, not retried.
"""

from __future__ import annotations

import email.utils
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Generator, Mapping

ACCEPTED, REJECTED, DROPPED = "accepted", "rejected", "dropped"

#: The answer to a :class:`Post` or :class:`Sleep` step while the client gives up (close timeout).
ABORTED = object()

#: Longest Retry-After honoured, in seconds: a larger one is taken as this.
MAX_RETRY_AFTER = 300.0


class ClientError(Exception):
    """Base of what the PayFlux client raises."""


class BufferFull(ClientError):
    """``send()`` could not enqueue: ``max_buffered_events`` are waiting (overflow policy)."""


class ClientClosed(ClientError):
    """``send()`` after ``close()``."""


class FlushTimeout(ClientError, TimeoutError):
    """``flush(timeout)`` returned before every event was settled; ``pending`` are still on their way."""

    def __init__(self, pending: int) -> None:
        super().__init__(f"{pending} events still pending")
        self.pending = pending


class TransportError(Exception):
    """No HTTP answer: connection refused or reset, timeout, a malformed response."""


@dataclass(frozen=True)
class Response:
    status: int
    headers: Mapping[str, str]    # lower-case names
    body: bytes

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:
            return None


@dataclass(frozen=True)
class Post:
    """Step: POST ``body`` (NDJSON) to the batch endpoint."""
    body: bytes
    events: int


@dataclass(frozen=True)
class Sleep:
    """Step: wait ``seconds`` before the next attempt."""
    seconds: float


@dataclass
class Pending:
    """One event accepted by ``send()``: its bytes are fixed then and never re-encoded."""
    seq: int
    event: Any
    event_id: str
    line: bytes
    enqueued_at: float


@dataclass(frozen=True)
class Delivery:
    """
    How some events of a batch ended.  ``outcome`` is ``accepted``, ``rejected`` (the gateway
    refused them: don't resend unchanged) or ``dropped`` (the client gave up: delivery_timeout or
    close; they may or may not be in the stream, and resending them with the same event_id is
    safe).  ``status`` is the last HTTP status (None: no answer), ``error`` the server's JSON error
    body (``{"error", "message", "details"}``; for a batch ``422`` the details of these events,
    each naming its ``line`` in the refused request and its ``field``), or for a client-side end
    ``{"error": "connection" | "closed", "message": ...}``.  ``stream_ids`` (accepted) are each
    event's stream id, in order; ``duplicates`` how many were already there; ``ignored_fields``
    the unknown field names the gateway dropped from them (a typo shows up here).
    """
    outcome: str
    events: tuple
    event_ids: tuple[str, ...]
    status: int | None = None
    error: dict | None = None
    attempts: int = 1
    stream_ids: tuple[str, ...] = ()
    duplicates: int = 0
    ignored_fields: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.event_ids)


@dataclass
class FlushResult:
    """What settled since the previous ``flush()``/``close()`` returned: event counts, and the
    rejected or dropped :class:`Delivery` reports (the last ``keep_failures`` of them)."""
    accepted: int = 0
    rejected: int = 0
    dropped: int = 0
    failures: list = field(default_factory=list)


@dataclass
class Stats:
    """Counts since the client started.  Every event ``send()`` took ends in exactly one of
    accepted, rejected and dropped; ``pending`` are not settled yet."""
    sent: int = 0            # events send() took
    accepted: int = 0
    rejected: int = 0
    dropped: int = 0
    duplicates: int = 0      # accepted events the gateway already held (a retry of a written batch)
    requests: int = 0        # HTTP attempts
    retries: int = 0         # attempts after a retryable answer
    buffer_full: int = 0     # send() calls refused with BufferFull

    @property
    def pending(self) -> int:
        return self.sent - self.accepted - self.rejected - self.dropped


@dataclass
class Backoff:
    """Exponential backoff with full jitter: attempt n (0-based) waits uniform(0, min(cap, base·2ⁿ)),
    and never less than the server's Retry-After."""
    base: float = 0.1
    cap: float = 10.0
    uniform: Callable[[float, float], float] = random.uniform

    def delay(self, retry: int, retry_after: float | None = None) -> float:
        jittered = self.uniform(0.0, min(self.cap, self.base * (2 ** min(retry, 62))))
        if retry_after is not None:
            return max(jittered, retry_after)
        return jittered


def retry_after(headers: Mapping[str, str], now: Callable[[], float] = time.time) -> float | None:
    """Seconds of a ``Retry-After`` header (delta-seconds or an HTTP date), capped; None if absent or bad."""
    value = headers.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(int(value))
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - now()
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def _retryable(status: int) -> bool:
    return status in (408, 429) or status >= 500


def _lines_named(error: Any, size: int) -> dict[int, list[dict]] | None:
    """1-based line -> its details, when every detail of a 400/422 names a line of the request."""
    details = error.get("details") if isinstance(error, dict) else None
    if not details or not isinstance(details, list):
        return None
    named: dict[int, list[dict]] = {}
    for d in details:
        line = d.get("line") if isinstance(d, dict) else None
        if not isinstance(line, int) or isinstance(line, bool) or not 1 <= line <= size:
            return None
        named.setdefault(line, []).append(d)
    return named


def _ids_named(error: Any, part: list[Pending]) -> set[str] | None:
    """The event ids a 409 names, when each is one of the request's."""
    details = error.get("details") if isinstance(error, dict) else None
    if not details or not isinstance(details, list):
        return None
    ids = {d.get("event_id") for d in details if isinstance(d, dict)}
    return ids if ids and ids <= {p.event_id for p in part} else None


def _delivery(outcome: str, part: list[Pending], **kwargs: Any) -> Delivery:
    return Delivery(outcome, tuple(p.event for p in part), tuple(p.event_id for p in part), **kwargs)


def _accepted(part: list[Pending], response: Response, attempts: int) -> Delivery:
    doc = response.json()
    results = doc.get("results") if isinstance(doc, dict) else None
    ids: tuple[str, ...] = ()
    duplicates = 0
    if isinstance(results, list) and len(results) == len(part):
        ids = tuple(str(r.get("id", "")) for r in results if isinstance(r, dict))
        duplicates = sum(1 for r in results if isinstance(r, dict) and r.get("duplicate") is True)
    ignored = doc.get("ignored_fields") if isinstance(doc, dict) else None
    return _delivery(ACCEPTED, part, status=response.status, attempts=attempts, stream_ids=ids,
                     duplicates=duplicates, ignored_fields=tuple(ignored) if isinstance(ignored, list) else ())


def _error_body(response: Response) -> dict:
    doc = response.json()
    if isinstance(doc, dict) and "error" in doc:
        return doc
    return {"error": f"http_{response.status}", "message": response.body[:200].decode("utf-8", "replace")}


def deliver(batch: list[Pending], backoff: Backoff, clock: Callable[[], float],
            delivery_timeout: float | None) -> Generator[Post | Sleep, Any, list[Delivery]]:
    """Send ``batch`` until every event in it is settled (module docstring); returns the reports,
    in the batch's order except that rejected events are reported as soon as they are known."""
    reports: list[Delivery] = []
    work = [list(batch)]
    while work:
        part = work.pop(0)
        body = b"".join([p.line + b"\n" for p in part])
        deadline = None if delivery_timeout is None else min(p.enqueued_at for p in part) + delivery_timeout
        attempts = retries = 0
        while True:
            attempts += 1
            answer = yield Post(body, len(part))
            if answer is ABORTED:
                reports.append(_closed(part, attempts - 1))
                reports.extend(_closed(rest, 0) for rest in work)
                return reports
            if isinstance(answer, Response) and 200 <= answer.status < 300:
                reports.append(_accepted(part, answer, attempts))
                break
            if isinstance(answer, Response) and not _retryable(answer.status):
                refused, resend = _refused(part, answer, attempts)
                reports.extend(refused)
                work[0:0] = resend
                break
            # retryable: 408/429/5xx or no answer at all
            if isinstance(answer, Response):
                status, error, wait_at_least = answer.status, _error_body(answer), retry_after(answer.headers)
            else:
                status, error, wait_at_least = None, {"error": "connection", "message": str(answer)}, None
            delay = backoff.delay(retries, wait_at_least)
            if deadline is not None and clock() + delay > deadline:
                reports.append(_delivery(DROPPED, part, status=status, attempts=attempts, error={
                    **error, "message": f"gave up after delivery_timeout ({delivery_timeout} s); last answer: "
                                        f"{error.get('message', '')}"}))
                break
            retries += 1
            if not (yield Sleep(delay)):
                reports.append(_closed(part, attempts))
                reports.extend(_closed(rest, 0) for rest in work)
                return reports
    return reports


def _refused(part: list[Pending], answer: Response, attempts: int) -> tuple[list[Delivery], list[list[Pending]]]:
    """A 4xx that is not retried: ``(reports of the events refused, parts to send next)``."""
    error = _error_body(answer)
    status = answer.status
    if (status == 413 or error.get("error") == "too_many_events") and len(part) > 1:
        half = len(part) // 2
        return [], [part[:half], part[half:]]
    lines = _lines_named(error, len(part)) if status in (400, 422) else None
    ids = _ids_named(error, part) if status == 409 else None
    if lines:
        bad = {part[n - 1].seq: {**error, "details": details} for n, details in lines.items()}
    elif ids:
        bad = {p.seq: {**error, "details": [d for d in error["details"] if d.get("event_id") == p.event_id]}
               for p in part if p.event_id in ids}
    else:
        return [_delivery(REJECTED, part, status=status, attempts=attempts, error=error)], []
    reports = [_delivery(REJECTED, [p], status=status, attempts=attempts, error=bad[p.seq])
               for p in part if p.seq in bad]
    rest = [p for p in part if p.seq not in bad]
    return reports, [rest] if rest else []


def _closed(part: list[Pending], attempts: int) -> Delivery:
    return _delivery(DROPPED, part, attempts=attempts, error={
        "error": "closed", "message": "client closed before the gateway accepted these events"})
