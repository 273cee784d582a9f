"""
The fault suite's load driver: concurrent producers posting payment events over real HTTP.

``LoadDriver`` runs ``producers`` loops in the test's reactor, each posting one event at a time
(a fresh connection per request, as a worst-case client) to a real node or ``twistd`` process, and
records every attempt of every ``event_id``: a 2xx with its stream id, a 4xx/5xx with its status
and latency, or a connection error by kind (``refused``, ``lost``, ``timeout``). With ``retry``
a producer resends the *same* event (same ``event_id``, same payload) after the listed outcomes,
until it is accepted or ``retry_deadline`` passes, as a producer honouring PayFlux's idempotency
contract would.

``stream_entries`` reads a stream back (event_id -> stream ids) and ``Verdict`` compares the two:
every 2xx'd event must be in the stream under the id it was acknowledged with (``lost``), and no
event_id may be appended twice (``duplicates``). ``Verdict.line`` is the one summary line each
fault test prints, so CI logs carry the measured numbers.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Callable

import attrs
import treq
from twisted.internet import defer, error as terror, reactor as default_reactor
from twisted.internet.task import deferLater
from twisted.web.client import ResponseFailed, ResponseNeverReceived

from payflux.send import sample_event
from tests.support.node import API_SECRET
from tests.support.redis import sync_command_at

SINGLE = "/v1/events/payment_exhaust"

REFUSED, LOST, TIMEOUT = "refused", "lost", "timeout"


@attrs.define
class Attempt:
    """One HTTP request for an event: ``status`` (None for a connection error) or ``error``."""

    started: float
    ended: float
    status: int | None = None
    stream_id: str | None = None
    duplicate: bool = False
    error: str | None = None  # REFUSED / LOST / TIMEOUT
    body: Any = None
    worker: str | None = None  # X-PayFlux-Worker ("<index>/<pid>") with --workers

    @property
    def latency(self) -> float:
        return self.ended - self.started

    @property
    def accepted(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


@attrs.define
class EventRecord:
    event: dict
    attempts: list[Attempt] = attrs.Factory(list)

    @property
    def accepted(self) -> Attempt | None:
        """The first 2xx attempt (its stream id is the one the producer was given), if any."""
        return next((a for a in self.attempts if a.accepted), None)


def _classify(failure) -> str:
    if failure.check(terror.ConnectionRefusedError):
        return REFUSED
    if failure.check(defer.CancelledError, terror.TimeoutError, defer.TimeoutError):
        return TIMEOUT
    if failure.check(ResponseNeverReceived, ResponseFailed, terror.ConnectionLost, terror.ConnectionDone,
                     terror.ConnectionClosed):
        return LOST
    return f"other:{failure.type.__name__}"


class LoadDriver:
    """
    ``producers`` concurrent loops posting single events to ``base`` until ``stop()``.

    ``retry``: outcomes after which the same event is resent (status codes such as 503, and/or
    connection error kinds such as ``LOST``); ``retry_deadline`` (seconds after ``stop()``)
    bounds that. Every request has ``request_timeout``; nothing waits unbounded.
    """

    def __init__(self, base: str, secret: str = API_SECRET, producers: int = 8, retry: tuple = (),
                 retry_deadline: float = 10.0, request_timeout: float = 10.0, pause: float = 0.0,
                 make_event: Callable[[int], dict] = sample_event, reactor: Any = default_reactor) -> None:
        self.base = base
        self.secret = secret
        self.producers = producers
        self.retry = set(retry)
        self.retry_deadline = retry_deadline
        self.request_timeout = request_timeout
        self.pause = pause
        self.make_event = make_event
        self.reactor = reactor
        self.records: dict[str, EventRecord] = {}
        self._posting: dict[object, float] = {}  # requests on the wire -> when they started
        self._stopped_at: float | None = None
        self._running: defer.Deferred | None = None
        self._n = 0

    # --- driving ---

    def start(self) -> defer.Deferred:
        """Start the producers; the Deferred fires once ``stop()`` was called and they all finished."""
        self._running = defer.gatherResults([defer.ensureDeferred(self._producer()) for _ in range(self.producers)],
                                            consumeErrors=True)
        return self._running

    def stop(self) -> defer.Deferred:
        """No new events; producers finish (and retry, within ``retry_deadline``) the current one."""
        if self._stopped_at is None:
            self._stopped_at = time.monotonic()
        if self._running is None:
            return defer.succeed(None)
        return self._running

    async def run_for(self, seconds: float) -> None:
        """Drive load for ``seconds``, then stop and wait for the producers."""
        done = self.start()
        await deferLater(self.reactor, seconds, lambda: None)
        self.stop()
        await done

    async def until(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        """Poll ``condition`` every 20 ms while the load runs; AssertionError after ``timeout``."""
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}")
            await deferLater(self.reactor, 0.02, lambda: None)

    async def _producer(self) -> None:
        while self._stopped_at is None:
            self._n += 1
            event = self.make_event(self._n)
            record = self.records[event["event_id"]] = EventRecord(event)
            while True:
                attempt = await self.post(event)
                record.attempts.append(attempt)
                outcome = attempt.status if attempt.status is not None else attempt.error
                if attempt.accepted or outcome not in self.retry:
                    break
                if self._stopped_at is not None and time.monotonic() > self._stopped_at + self.retry_deadline:
                    break
                await deferLater(self.reactor, 0.05, lambda: None)  # a producer's retry backoff
            if self.pause:
                await deferLater(self.reactor, self.pause, lambda: None)

    async def post(self, event: dict) -> Attempt:
        """One POST over a fresh connection; never raises, always returns the outcome."""
        started = time.monotonic()
        token = object()
        self._posting[token] = started
        headers = {"Content-Type": ["application/json"], "Authorization": [f"Bearer {self.secret}"]}
        try:
            response = await treq.post(self.base + SINGLE, data=json.dumps(event).encode(), headers=headers,
                                       persistent=False, timeout=self.request_timeout)
            raw = await treq.content(response)
        except Exception:
            from twisted.python.failure import Failure

            return Attempt(started, time.monotonic(), error=_classify(Failure()))
        finally:
            del self._posting[token]
        ended = time.monotonic()
        try:
            body = json.loads(raw)
        except ValueError:
            body = raw
        worker = response.headers.getRawHeaders(b"X-PayFlux-Worker", [None])[0]
        attempt = Attempt(started, ended, status=response.code, body=body,
                          worker=worker.decode() if worker is not None else None)
        if attempt.accepted:
            attempt.stream_id = body["id"]
            attempt.duplicate = bool(body.get("duplicate"))
        return attempt

    def oldest_pending_age(self) -> float:
        """Seconds the longest-waiting request on the wire has waited (0 when none is)."""
        return time.monotonic() - min(self._posting.values()) if self._posting else 0.0

    # --- reading results ---

    def attempts(self) -> list[Attempt]:
        return [a for r in self.records.values() for a in r.attempts]

    def acknowledged(self) -> dict[str, str]:
        """event_id -> the stream id its first 2xx named."""
        return {eid: r.accepted.stream_id for eid, r in self.records.items() if r.accepted is not None}

    def count(self, outcome: Any) -> int:
        return sum(1 for a in self.attempts() if (a.status if a.status is not None else a.error) == outcome)

    def max_latency(self, status: int) -> float:
        return max((a.latency for a in self.attempts() if a.status == status), default=0.0)


def stream_entries(address: tuple[str, int] | str, key: str = "payflux:{0}:events") -> dict[str, list[str]]:
    """event_id -> every stream id carrying it, read with XRANGE in pages (blocking; after the load)."""
    found: dict[str, list[str]] = {}
    start = "-"
    while True:
        page = sync_command_at(address, "XRANGE", key, start, "+", "COUNT", "1000", timeout=10)
        for stream_id, fields in page:
            flat = dict(zip(fields[::2], fields[1::2]))
            found.setdefault(flat[b"event_id"].decode(), []).append(stream_id.decode())
        if len(page) < 1000:
            return found
        start = "(" + page[-1][0].decode()


@attrs.define
class Verdict:
    """What the load sent against what the stream holds; ``lost`` and ``duplicates`` must be 0."""

    name: str
    sent: int
    acknowledged: int
    found: int
    lost: list[str]
    duplicates: int
    max_503_latency: float
    outcomes: dict[str, int]
    extra: dict[str, Any] = attrs.Factory(dict)

    @classmethod
    def of(cls, name: str, driver: LoadDriver, stored: dict[str, list[str]], **extra: Any) -> "Verdict":
        acked = driver.acknowledged()
        lost = sorted(eid for eid, sid in acked.items() if sid not in stored.get(eid, []))
        outcomes: dict[str, int] = {}
        for a in driver.attempts():
            key = str(a.status if a.status is not None else a.error)
            outcomes[key] = outcomes.get(key, 0) + 1
        return cls(name=name, sent=len(driver.records), acknowledged=len(acked),
                   found=sum(1 for eid in acked if eid in stored), lost=lost,
                   duplicates=sum(len(ids) - 1 for ids in stored.values()),
                   max_503_latency=driver.max_latency(503), outcomes=outcomes, extra=extra)

    def line(self) -> str:
        extra = " ".join(f"{k}={v}" for k, v in self.extra.items())
        outcomes = ",".join(f"{k}:{v}" for k, v in sorted(self.outcomes.items()))
        return (f"FAULT {self.name}: sent={self.sent} acknowledged={self.acknowledged} found={self.found} "
                f"lost={len(self.lost)} duplicates={self.duplicates} max_503_latency={self.max_503_latency:.3f}s "
                f"attempts=[{outcomes}] {extra}").rstrip()

    def print(self) -> None:
        print("\n  " + self.line(), file=sys.stderr)
