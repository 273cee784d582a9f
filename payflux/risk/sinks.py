"""
Where alert transitions go besides the log and the metrics: the alerts stream in Redis, the
alert store in Redis (:mod:`payflux.risk.store`, what the alerts API reads) and an optional
signed webhook.  Formats: docs/risk.md, "Alerts" and "Alerts API".

Neither sink ever fails a batch of the risk consumer: the detectors have already counted the
batch, and failing it would make the runtime deliver (and count) it again.  A transition that
can't be delivered is kept and retried (bounded), counted in
``payflux_risk_alert_delivery_failures_total{sink}``, and, when it must be given up,
in ``payflux_risk_alerts_dropped_total{sink}``.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable

from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from payflux.exporters.signing import signed_headers
from payflux.risk.alerts import Transition
from payflux.streams.outage import log_step_failure

log = Logger()

WEBHOOK_FIRST_BACKOFF = 1.0
WEBHOOK_MAX_BACKOFF = 30.0


class OrderedRedisSink:
    """
    Transitions written to Redis one at a time, in order (a pool may run concurrent commands
    on different connections, which could reorder an open and its resolve), by :meth:`write`.

    Transitions wait in an outbox of at most ``outbox_max`` (oldest dropped first) until Redis
    took them; after a failure the rest wait for the next :meth:`publish` (every batch and
    every idle tick calls it).  ``what`` names the sink in its log lines.
    """

    what = "risk alerts sink"

    def __init__(self, outbox_max: int, on_failure: Callable[[], None], on_drop: Callable[[int], None]) -> None:
        self.outbox: deque[Transition] = deque()
        self.outbox_max = outbox_max
        self.on_failure = on_failure
        self.on_drop = on_drop
        self._lock = defer.DeferredLock()
        self._failing = False

    def write(self, tr: Transition) -> defer.Deferred:
        raise NotImplementedError

    def _trim(self) -> None:
        extra = len(self.outbox) - self.outbox_max
        if extra > 0:
            for _ in range(extra):
                self.outbox.popleft()
            self.on_drop(extra)
            log.warn("{what}: outbox full, dropped the {count} oldest alert transitions",
                     what=self.what, count=extra)

    async def publish(self, transitions: list[Transition]) -> None:
        """Queue ``transitions`` and send everything queued; never raises."""
        self.outbox.extend(transitions)
        self._trim()
        if not self.outbox:
            return
        async with self._lock:
            while self.outbox:
                tr = self.outbox.popleft()
                try:
                    await self.write(tr)
                except Exception:
                    self.outbox.appendleft(tr)
                    self._trim()
                    self.on_failure()
                    if not self._failing:  # one line per outage, not one per batch
                        log_step_failure(log, Failure(), "{what}: write failed; {count} alert transitions "
                                         "kept for retry", what=self.what, count=len(self.outbox))
                    self._failing = True
                    return
                if self._failing:
                    log.info("{what}: writing again", what=self.what)
                    self._failing = False


class AlertStream(OrderedRedisSink):
    """
    ``XADD <key> MAXLEN ~ <maxlen> * v 1 alert_id .. action .. type .. key .. severity .. at .. data ..``,
    one transition at a time, in order, through :class:`OrderedRedisSink`'s outbox.
    """

    def __init__(self, redis: Any, key: str, maxlen: int, outbox_max: int,
                 on_failure: Callable[[], None], on_drop: Callable[[int], None]) -> None:
        super().__init__(outbox_max, on_failure, on_drop)
        self.redis = redis
        self.key = key
        self.maxlen = maxlen
        self.what = f"risk alerts stream {key}"

    def write(self, tr: Transition) -> defer.Deferred:
        return self.redis.execute_command("XADD", self.key, "MAXLEN", "~", str(self.maxlen), "*", *tr.stream_fields())


class AlertRecords(OrderedRedisSink):
    """
    Each transition recorded in the alert store (:class:`payflux.risk.store.AlertStore`: one
    Lua script per transition), one at a time, in order, through :class:`OrderedRedisSink`'s
    outbox, like the alerts stream and independently of it.  The store ignores a transition it
    recorded already, so one whose reply was lost is retried without harm.
    """

    def __init__(self, store: Any, outbox_max: int, on_failure: Callable[[], None],
                 on_drop: Callable[[int], None]) -> None:
        super().__init__(outbox_max, on_failure, on_drop)
        self.store = store
        self.what = f"risk alert store {store.keys.index}"

    def write(self, tr: Transition) -> defer.Deferred:
        return self.store.record(tr)


class AlertWebhook:
    """
    POSTs each transition's JSON (``Transition.body()``) to ``url``, signed with
    :func:`payflux.exporters.signing.signed_headers` (fresh timestamp per attempt), one request
    at a time, in order.  2xx = delivered.  Other answers, timeouts and connection errors are
    retried with backoff (1 s doubling, at most 30 s) up to ``max_attempts``; 3xx (redirects are
    not followed) and 4xx other than 408 and 429 are not retried.  At most ``queue_max`` transitions wait (oldest dropped).
    Delivery does not hold up the consumer.
    """

    def __init__(self, url: str, secret: bytes, clock: Any, timeout: float, max_attempts: int, queue_max: int,
                 on_failure: Callable[[], None], on_drop: Callable[[int], None], http: Any = None) -> None:
        if http is None:
            import treq as http
        self.url = url
        self._secret = secret
        self._signed_headers = signed_headers
        self.clock = clock
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.queue: deque[bytes] = deque()
        self.queue_max = queue_max
        self.on_failure = on_failure
        self.on_drop = on_drop
        self.http = http
        self._loop: defer.Deferred | None = None
        self._sleep: defer.Deferred | None = None
        self._stopping = False
        self.delivered = 0

    def publish(self, transitions: list[Transition]) -> None:
        if self._stopping:
            return
        self.queue.extend(tr.body() for tr in transitions)
        extra = len(self.queue) - self.queue_max
        if extra > 0:
            for _ in range(extra):
                self.queue.popleft()
            self.on_drop(extra)
            log.warn("risk webhook: queue full, dropped the {count} oldest alert transitions", count=extra)
        if self.queue and self._loop is None:
            self._loop = defer.ensureDeferred(self._drain())
            self._loop.addErrback(lambda f: log.failure("risk webhook: delivery loop failed", f))
            self._loop.addBoth(self._drained)

    def _drained(self, _: Any) -> None:
        self._loop = None

    async def _drain(self) -> None:
        while self.queue and not self._stopping:
            body = self.queue.popleft()
            if not await self._deliver(body):
                self.on_drop(1)

    async def _deliver(self, body: bytes) -> bool:
        delay = WEBHOOK_FIRST_BACKOFF
        for attempt in range(1, self.max_attempts + 1):
            headers = {"Content-Type": "application/json"}
            headers.update(self._signed_headers(self._secret, body, self.clock.seconds()))
            outcome = "error"
            try:
                response = await self.http.post(self.url, data=body, headers=headers, timeout=self.timeout,
                                                allow_redirects=False, reactor=self.clock)
                await response.content()
                outcome = str(response.code)
                if 200 <= response.code < 300:
                    self.delivered += 1
                    return True
                if 300 <= response.code < 500 and response.code not in (408, 429):
                    self.on_failure()  # a redirect or a refusal won't change on a retry
                    log.warn("risk webhook: {url} answered {code}; alert transition dropped (not retried)",
                             url=self.url, code=response.code)
                    return False
            except defer.CancelledError:
                outcome = "timeout"
            except Exception as e:
                outcome = f"{type(e).__name__}: {e}"
            self.on_failure()
            if attempt == self.max_attempts or self._stopping:
                break
            log.warn("risk webhook: attempt {attempt} failed ({outcome}); retrying in {delay}s",
                     attempt=attempt, outcome=outcome, delay=delay)
            try:
                self._sleep = task.deferLater(self.clock, delay, lambda: None)
                await self._sleep
            except defer.CancelledError:
                break
            finally:
                self._sleep = None
            delay = min(WEBHOOK_MAX_BACKOFF, delay * 2)
        log.warn("risk webhook: giving up on an alert transition after {attempts} attempts",
                 attempts=attempt)
        return False

    def close(self, grace: float) -> defer.Deferred:
        """Let queued transitions go out for up to ``grace`` seconds, then stop (the rest are dropped)."""
        if self._loop is None:
            return defer.succeed(None)
        done: defer.Deferred = defer.Deferred()
        loop = self._loop
        loop.addBoth(lambda r: done.called or done.callback(None))

        def give_up() -> None:
            if done.called:
                return
            self._stopping = True
            left = len(self.queue)
            self.queue.clear()
            if left:
                self.on_drop(left)
            if self._sleep is not None:
                self._sleep.cancel()  # may end the loop, and so fire ``done``, right here
            if not done.called:
                done.callback(None)

        timer = self.clock.callLater(grace, give_up)
        done.addBoth(lambda r: timer.cancel() if timer.active() else None)
        return done
