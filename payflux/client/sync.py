"""
The blocking producer client: :class:`Client` (``send`` from any thread, one background thread
delivers) over :class:`HttpTransport` (``http.client``, one keep-alive connection).

What it promises (docs/producers.md): every event ``send()`` took is reported exactly once as
accepted, rejected or dropped (``on_result``, ``flush()``, ``close()``, ``stats``); memory is
bounded by ``max_buffered_events``; batches are NDJSON of up to ``batch_size`` events sent when
full or after ``linger_ms``; the retry policy is :mod:`payflux.client.delivery`'s.  Time comes
from a :class:`ThreadClock`, so tests drive linger and backoff with a fake one.
"""

from __future__ import annotations

import atexit
import http.client
import logging
import random
import ssl
import threading
import time
import weakref
from typing import Any, Callable, Protocol
from urllib.parse import urlsplit

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

BATCH_PATH = "/v1/events/payment_exhaust/batch"
USER_AGENT = "payflux-client-python/1"
log = logging.getLogger("payflux.client")


def endpoint(url: str) -> tuple[str, str, int, str]:
    """``(scheme, host, port, batch path)`` of a node's base URL (``http(s)://host[:port][/prefix]``)."""
    parts = urlsplit(url.rstrip("/"))
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"url {url!r}: expected http(s)://host[:port]")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.scheme, parts.hostname, port, parts.path + BATCH_PATH


def request_headers(api_key: str | None, host: str) -> dict[str, str]:
    headers = {"Content-Type": "application/x-ndjson", "User-Agent": USER_AGENT, "Host": host}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


class ThreadClock(Protocol):
    def now(self) -> float: ...
    def wait(self, condition: threading.Condition, timeout: float | None) -> None:
        """Wait on ``condition`` (held by the caller) for a notify or ``timeout`` seconds of this clock."""


class RealClock:
    def now(self) -> float:
        return time.monotonic()

    def wait(self, condition: threading.Condition, timeout: float | None) -> None:
        condition.wait(timeout)


class HttpTransport:
    """POSTs to the batch endpoint over one keep-alive ``http.client`` connection, reconnecting
    after any error.  Every failure without an HTTP answer is a :class:`TransportError`."""

    def __init__(self, url: str, api_key: str | None, timeout: float = 10.0,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.scheme, self.host, self.port, self.path = endpoint(url)
        self.headers = request_headers(api_key, f"{self.host}:{self.port}")
        self.timeout = timeout
        self.ssl_context = ssl_context
        self._conn: http.client.HTTPConnection | None = None

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            if self.scheme == "https":
                self._conn = http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout,
                                                         context=self.ssl_context or ssl.create_default_context())
            else:
                self._conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        return self._conn

    def post(self, body: bytes) -> Response:
        """One POST; a reused connection the server closed before answering gets the request once
        more on a new one at once (safe: the gateway deduplicates), any other failure without an
        answer is a TransportError."""
        reused = self._conn is not None
        try:
            try:
                return self._exchange(body)
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                if not reused:
                    raise
                self.close()
                return self._exchange(body)
        except (OSError, http.client.HTTPException) as e:
            self.close()
            raise TransportError(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__) from e

    def _exchange(self, body: bytes) -> Response:
        conn = self._connection()
        conn.request("POST", self.path, body=body, headers=self.headers)
        answer = conn.getresponse()
        data = answer.read()
        headers = {k.lower(): v for k, v in answer.getheaders()}
        if answer.will_close:
            self.close()
        return Response(answer.status, headers, data)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class Client(ClientCore):
    """
    ``Client(url, api_key)``: ``send(event)`` enqueues (a dict, e.g. from :func:`build_event`);
    a background thread posts batches to ``url``'s batch endpoint.  ``flush(timeout)`` waits until
    everything sent so far is settled, ``close(timeout)`` flushes and stops (also a context
    manager, and at interpreter exit).  Parameters and policies: docs/producers.md.
    """

    def __init__(self, url: str, api_key: str | None = None, *, batch_size: int = 500, linger_ms: float = 50,
                 max_batch_bytes: int = 1024 * 1024, max_buffered_events: int = 100_000,
                 overflow: str = "block", block_timeout: float = 5.0, request_timeout: float = 10.0,
                 delivery_timeout: float | None = 120.0, backoff_base: float = 0.1, backoff_max: float = 10.0,
                 on_result: Callable[[Delivery], Any] | None = None, keep_failures: int = 100,
                 ssl_context: ssl.SSLContext | None = None, transport: Any = None,
                 clock: ThreadClock | None = None, uniform: Callable[[float, float], float] = random.uniform,
                 close_at_exit: bool = True) -> None:
        super().__init__(batch_size, linger_ms, max_batch_bytes, max_buffered_events, overflow, block_timeout,
                         delivery_timeout, backoff_base, backoff_max, on_result, keep_failures, uniform)
        self._transport = transport if transport is not None else HttpTransport(url, api_key, request_timeout,
                                                                                ssl_context)
        self._clock = clock or RealClock()
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="payflux-client", daemon=True)
        self._thread.start()
        self._exit_hook = None
        if close_at_exit:
            ref = weakref.ref(self)
            self._exit_hook = lambda: (c := ref()) is not None and c.close(timeout=10.0)
            atexit.register(self._exit_hook)

    # -- the producer's side --------------------------------------------------------------------

    def send(self, event: dict) -> None:
        """Enqueue ``event``.  Raises at once what could never be delivered (encode_event), ClientClosed
        after close(), and BufferFull when ``max_buffered_events`` wait: at once with
        ``overflow="raise"``, after ``block_timeout`` seconds with ``overflow="block"`` (default)."""
        event_id, line = encode_event(event)
        clock = self._clock
        with self._cond:
            if self._closing:
                raise ClientClosed("send() after close()")
            deadline = clock.now() + self._block_timeout
            while (left := self._room_wait(deadline, clock.now())) is not None:
                clock.wait(self._cond, left)
            if self._outbox.add(event, event_id, line, clock.now()):
                self._cond.notify_all()

    def flush(self, timeout: float | None = None) -> FlushResult:
        """Wait until every event sent so far is accepted or finally rejected/dropped, without
        lingering; return what settled since the previous flush()/close() returned.  FlushTimeout
        after ``timeout`` seconds (the events stay queued and keep being delivered)."""
        with self._cond:
            self._flush_wait(timeout)
            return self._outbox.drain_window()

    def close(self, timeout: float | None = None) -> FlushResult:
        """Flush, then stop the thread and the connection.  After ``timeout`` seconds, what is still
        queued is reported dropped at once, and the batch in flight ends with its current attempt
        (at most ``request_timeout`` more).  Returns the last window; ``stats`` stay readable."""
        with self._cond:
            if self._final is not None:
                return self._final
            self._closing = True
            self._cond.notify_all()
            try:
                self._flush_wait(timeout)
            except FlushTimeout:
                self._abort = True
                self._cond.notify_all()
        self._thread.join()
        with self._cond:
            dropped = self._outbox.drop_queued()
        self._report(dropped)
        self._transport.close()
        if self._exit_hook is not None:
            atexit.unregister(self._exit_hook)
        with self._cond:
            self._final = self._outbox.drain_window()
            return self._final

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def stats(self) -> Stats:
        with self._cond:
            s = self._outbox.stats
            return Stats(**vars(s))

    # -- the background thread ------------------------------------------------------------------

    def _flush_wait(self, timeout: float | None) -> None:
        outbox, clock = self._outbox, self._clock
        target = outbox.next_seq
        outbox.flush_to = max(outbox.flush_to, target)
        self._cond.notify_all()
        deadline = None if timeout is None else clock.now() + timeout
        while outbox.settled_upto < target:
            if not self._thread.is_alive():
                break
            left = None if deadline is None else deadline - clock.now()
            if left is not None and left <= 0:
                raise FlushTimeout(target - outbox.settled_upto)
            clock.wait(self._cond, left)

    def _run(self) -> None:
        outbox, clock = self._outbox, self._clock
        while True:
            with self._cond:
                while True:
                    if self._abort:
                        return
                    now = clock.now()
                    if outbox.due(now):
                        break
                    if self._closing and not outbox.queue:
                        return
                    wake = outbox.wake_at()
                    clock.wait(self._cond, None if wake is None else max(0.0, wake - now))
                batch = outbox.take()
            reports = self._drive(deliver(batch, self._backoff, clock.now, self._delivery_timeout))
            with self._cond:
                outbox.settle(batch, reports)
                self._cond.notify_all()
            self._report(reports)

    def _drive(self, steps) -> list[Delivery]:
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
                with self._cond:
                    self._outbox.stats.requests += 1
                try:
                    answer = self._transport.post(step.body)
                except TransportError as e:
                    answer = e
                except Exception as e:  # a transport's bug: retried like a lost connection, never fatal
                    log.exception("transport failed")
                    answer = TransportError(repr(e))
            elif isinstance(step, Sleep):
                with self._cond:
                    self._outbox.stats.retries += 1
                    deadline = self._clock.now() + step.seconds
                    while not self._abort and (left := deadline - self._clock.now()) > 0:
                        self._clock.wait(self._cond, left)
                    answer = not self._abort
