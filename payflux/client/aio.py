"""
The asyncio producer client: :class:`AsyncClient` (``await send(...)``; one task delivers) over
:class:`AsyncHttpTransport` (asyncio streams, one keep-alive HTTP/1.1 connection).  Standard
library only.  Same outbox, same delivery steps and so the same policies as the blocking
:class:`payflux.client.Client`; only the waiting differs, through an :class:`AsyncClock`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
from typing import Any, Callable, Protocol

from payflux.client.delivery import (
    ABORTED,
    ClientClosed,
    Delivery,
    FlushResult,
    FlushTimeout,
    Post,
    Response,
    Sleep,
    Stats,
    TransportError,
    deliver,
)
from payflux.client.events import encode_event
from payflux.client.outbox import ClientCore
from payflux.client.sync import endpoint, request_headers

log = logging.getLogger("payflux.client")
MAX_HEAD = 64 * 1024


class AsyncClock(Protocol):
    def now(self) -> float: ...
    async def wait(self, condition: asyncio.Condition, timeout: float | None) -> None:
        """Wait on ``condition`` (held) for a notify or ``timeout`` seconds of this clock."""


class RealAsyncClock:
    def now(self) -> float:
        return time.monotonic()

    async def wait(self, condition: asyncio.Condition, timeout: float | None) -> None:
        try:
            await asyncio.wait_for(condition.wait(), timeout)
        except asyncio.TimeoutError:
            pass


class AsyncHttpTransport:
    """POSTs over one keep-alive connection (asyncio streams); a request on a reused connection
    that the server closed before answering is sent once more on a new one at once (safe: the
    gateway deduplicates).  Any other failure without an answer is a TransportError."""

    def __init__(self, url: str, api_key: str | None, timeout: float = 10.0,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.scheme, self.host, self.port, self.path = endpoint(url)
        self.head = "".join(f"{k}: {v}\r\n" for k, v in request_headers(api_key, f"{self.host}:{self.port}").items())
        self.timeout = timeout
        self.ssl_context = (ssl_context or ssl.create_default_context()) if self.scheme == "https" else None
        self._stream_in: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def post(self, body: bytes) -> Response:
        reused = self._writer is not None
        try:
            try:
                return await asyncio.wait_for(self._exchange(body), self.timeout)
            except (ConnectionError, asyncio.IncompleteReadError):
                if not reused:
                    raise
                await self.close()
                return await asyncio.wait_for(self._exchange(body), self.timeout)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError) as e:
            await self.close()
            raise TransportError(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__) from e

    async def _exchange(self, body: bytes) -> Response:
        if self._writer is None:
            self._stream_in, self._writer = await asyncio.open_connection(
                self.host, self.port, ssl=self.ssl_context, limit=MAX_HEAD)
        reader, writer = self._stream_in, self._writer
        assert reader is not None
        writer.write(f"POST {self.path} HTTP/1.1\r\n{self.head}Content-Length: {len(body)}\r\n\r\n".encode("latin-1")
                     + body)
        await writer.drain()
        status_line = await reader.readline()
        if not status_line:
            raise ConnectionError("server closed the connection")
        parts = status_line.decode("latin-1").split(None, 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise ValueError("malformed HTTP status line")
        status = int(parts[1])
        headers: dict[str, str] = {}
        while True:
            line = await reader.readline()
            if line in (b"\r\n", b"\n"):
                break
            if not line:
                raise ConnectionError("server closed the connection in the response head")
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        if "chunked" in headers.get("transfer-encoding", "").lower():
            chunks = []
            while True:
                size = int((await reader.readline()).split(b";")[0].strip() or b"x", 16)
                if size == 0:
                    while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(await reader.readexactly(size))
                await reader.readline()
            data = b"".join(chunks)
        elif "content-length" in headers:
            data = await reader.readexactly(int(headers["content-length"]))
        else:
            data = await reader.read()
            headers["connection"] = "close"
        if headers.get("connection", "").lower() == "close" or parts[0] == "HTTP/1.0":
            await self.close()
        return Response(status, headers, data)

    async def close(self) -> None:
        writer, self._stream_in, self._writer = self._writer, None, None
        if writer is not None:
            writer.close()
            try:
                await writer.wait_closed()
            except (OSError, ssl.SSLError):
                pass


class AsyncClient(ClientCore):
    """
    The asyncio twin of :class:`payflux.client.Client`: ``await send(event)``, ``await flush()``,
    ``await close()`` (or ``async with``); the same parameters and policies (docs/producers.md).
    Use it from one event loop; its task starts at the first ``send``.
    """

    def __init__(self, url: str, api_key: str | None = None, *, batch_size: int = 500, linger_ms: float = 50,
                 max_batch_bytes: int = 1024 * 1024, max_buffered_events: int = 100_000,
                 overflow: str = "block", block_timeout: float = 5.0, request_timeout: float = 10.0,
                 delivery_timeout: float | None = 120.0, backoff_base: float = 0.1, backoff_max: float = 10.0,
                 on_result: Callable[[Delivery], Any] | None = None, keep_failures: int = 100,
                 ssl_context: ssl.SSLContext | None = None, transport: Any = None,
                 clock: AsyncClock | None = None, uniform: Callable[[float, float], float] = random.uniform) -> None:
        super().__init__(batch_size, linger_ms, max_batch_bytes, max_buffered_events, overflow, block_timeout,
                         delivery_timeout, backoff_base, backoff_max, on_result, keep_failures, uniform)
        self._transport = transport if transport is not None else AsyncHttpTransport(url, api_key, request_timeout,
                                                                                     ssl_context)
        self._clock = clock or RealAsyncClock()
        self._cond = asyncio.Condition()
        self._task: asyncio.Task | None = None

    def _start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="payflux-client")

    async def send(self, event: dict) -> None:
        """Enqueue ``event``; raises as :meth:`payflux.client.Client.send` does (BufferFull after
        ``block_timeout`` seconds with ``overflow="block"``, at once with ``"raise"``)."""
        event_id, line = encode_event(event)
        clock = self._clock
        async with self._cond:
            if self._closing:
                raise ClientClosed("send() after close()")
            self._start()
            deadline = clock.now() + self._block_timeout
            while (left := self._room_wait(deadline, clock.now())) is not None:
                await clock.wait(self._cond, left)
            if self._outbox.add(event, event_id, line, clock.now()):
                self._cond.notify_all()

    async def flush(self, timeout: float | None = None) -> FlushResult:
        """As :meth:`payflux.client.Client.flush`."""
        async with self._cond:
            await self._flush_wait(timeout)
            return self._outbox.drain_window()

    async def close(self, timeout: float | None = None) -> FlushResult:
        """As :meth:`payflux.client.Client.close`."""
        async with self._cond:
            if self._final is not None:
                return self._final
            self._closing = True
            self._cond.notify_all()
            try:
                await self._flush_wait(timeout)
            except FlushTimeout:
                self._abort = True
                self._cond.notify_all()
        if self._task is not None:
            await self._task
        async with self._cond:
            dropped = self._outbox.drop_queued()
        self._report(dropped)
        await self._transport.close()
        async with self._cond:
            self._final = self._outbox.drain_window()
            return self._final

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    @property
    def stats(self) -> Stats:
        return Stats(**vars(self._outbox.stats))

    async def _flush_wait(self, timeout: float | None) -> None:
        outbox, clock = self._outbox, self._clock
        target = outbox.next_seq
        outbox.flush_to = max(outbox.flush_to, target)
        self._cond.notify_all()
        deadline = None if timeout is None else clock.now() + timeout
        while outbox.settled_upto < target and self._task is not None and not self._task.done():
            left = None if deadline is None else deadline - clock.now()
            if left is not None and left <= 0:
                raise FlushTimeout(target - outbox.settled_upto)
            await clock.wait(self._cond, left)

    async def _run(self) -> None:
        outbox, clock = self._outbox, self._clock
        while True:
            async with self._cond:
                while True:
                    if self._abort:
                        return
                    now = clock.now()
                    if outbox.due(now):
                        break
                    if self._closing and not outbox.queue:
                        return
                    wake = outbox.wake_at()
                    await clock.wait(self._cond, None if wake is None else max(0.0, wake - now))
                batch = outbox.take()
            reports = await self._drive(deliver(batch, self._backoff, clock.now, self._delivery_timeout))
            async with self._cond:
                outbox.settle(batch, reports)
                self._cond.notify_all()
            self._report(reports)

    async def _drive(self, steps) -> list[Delivery]:
        answer: Any = None
        while True:
            try:
                step = steps.send(answer)
            except StopIteration as stop:
                return stop.value
            if isinstance(step, Post):
                if self._abort:
                    answer = ABORTED
                    continue
                self._outbox.stats.requests += 1
                try:
                    answer = await self._transport.post(step.body)
                except TransportError as e:
                    answer = e
                except Exception as e:  # a transport's bug: retried like a lost connection, never fatal
                    log.exception("transport failed")
                    answer = TransportError(repr(e))
            elif isinstance(step, Sleep):
                self._outbox.stats.retries += 1
                async with self._cond:
                    deadline = self._clock.now() + step.seconds
                    while not self._abort and (left := deadline - self._clock.now()) > 0:
                        await self._clock.wait(self._cond, left)
                    answer = not self._abort
