"""
Fakes shipped beside the real client, for PayFlux's tests and for producers' own: a transport
that answers from a script and records what was posted, and clocks whose time only moves when a
test says so (``advance``), for the thread and the asyncio flavour.
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Iterable

from payflux.client.delivery import Response, TransportError


def accepted(body: bytes) -> Response:
    """The gateway's 202 for an NDJSON batch ``body`` (fresh stream ids, no duplicates)."""
    n = body.count(b"\n")
    results = ",".join(f'{{"id":"1-{i}","duplicate":false}}' for i in range(n))
    return Response(202, {"content-type": "application/json"},
                    f'{{"status":"accepted","count":{n},"accepted":{n},"duplicates":0,"results":[{results}]}}'.encode())


def error(status: int, code: str, message: str = "", details: list | None = None,
          retry_after: str | None = None) -> Response:
    headers = {"content-type": "application/json"}
    if retry_after is not None:
        headers["retry-after"] = retry_after
    doc = {"error": code, "message": message or code, "details": details or []}
    return Response(status, headers, json.dumps(doc).encode())


class FakeTransport:
    """``post`` answers with the next entry of ``script`` (a Response, an exception to raise, or a
    callable taking the body), then with :func:`accepted`; every body is kept in ``bodies``."""

    def __init__(self, script: Iterable = ()) -> None:
        self.script = list(script)
        self.bodies: list[bytes] = []
        self.closed = False
        self.lock = threading.Lock()

    def answer(self, body: bytes) -> Response:
        with self.lock:
            self.bodies.append(body)
            step = self.script.pop(0) if self.script else accepted
        if isinstance(step, BaseException):
            raise step
        if callable(step):
            return step(body)
        return step

    def post(self, body: bytes) -> Response:
        return self.answer(body)

    def close(self) -> None:
        self.closed = True

    def events(self, n: int | None = None) -> list[list[dict]]:
        """The posted batches (or the ``n``-th one) decoded."""
        batches = [[json.loads(line) for line in body.splitlines()] for body in self.bodies]
        return batches if n is None else batches[n]


class FakeAsyncTransport(FakeTransport):
    async def post(self, body: bytes) -> Response:  # type: ignore[override]
        return self.answer(body)

    async def close(self) -> None:  # type: ignore[override]
        self.closed = True


def refused() -> TransportError:
    return TransportError("ConnectionRefusedError: [Errno 111] Connection refused")


class FakeClock:
    """A :class:`payflux.client.sync.ThreadClock` whose time moves only with :meth:`advance`.
    ``waiting`` holds the deadlines threads currently wait for (None: until notified)."""

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self._lock = threading.Lock()
        self._conditions: set[threading.Condition] = set()
        self.waiting: list[float | None] = []

    def now(self) -> float:
        return self._now

    def wait(self, condition: threading.Condition, timeout: float | None) -> None:
        deadline = None if timeout is None else self._now + timeout
        with self._lock:
            self._conditions.add(condition)
            self.waiting.append(deadline)
        try:
            condition.wait(5.0)  # real seconds: only a safety net, advance() and notify wake it
        finally:
            with self._lock:
                self.waiting.remove(deadline)

    def advance(self, seconds: float) -> None:
        self._now += seconds
        with self._lock:
            conditions = list(self._conditions)
        for c in conditions:
            with c:
                c.notify_all()


class FakeAsyncClock:
    """The asyncio twin of :class:`FakeClock`."""

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self._conditions: set[asyncio.Condition] = set()
        self.waiting: list[float | None] = []

    def now(self) -> float:
        return self._now

    async def wait(self, condition: asyncio.Condition, timeout: float | None) -> None:
        deadline = None if timeout is None else self._now + timeout
        self._conditions.add(condition)
        self.waiting.append(deadline)
        try:
            await condition.wait()
        finally:
            self.waiting.remove(deadline)

    async def advance(self, seconds: float) -> None:
        self._now += seconds
        for c in list(self._conditions):
            async with c:
                c.notify_all()
        await settle()


async def settle(rounds: int = 20) -> None:
    """Let the loop run everything that is ready (the client task's next steps)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


__all__ = ["FakeAsyncClock", "FakeAsyncTransport", "FakeClock", "FakeTransport", "accepted", "error", "refused",
           "settle"]
