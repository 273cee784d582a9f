"""
The ``webhook`` exporter: POSTs payment events to an HTTP(S) endpoint, signed with HMAC-SHA256.

Bodies (``Content-Type: application/json``, canonical JSON: sorted keys, no whitespace, UTF-8):

- ``mode = "batch"`` (default): one request per handler batch, ``{"events": [<record>, ...], "v": 1}``;
- ``mode = "single"``: one request per event, the body is one ``<record>``.

``<record>`` is :func:`payflux.exporters.records.export_record`: ``v``, ``stream_id``,
``partition``, ``event_id``, ``type``, ``received_at`` (epoch ms) and ``event``, the same object
as a line of the file exporter.  Every request carries ``X-PayFlux-Timestamp`` and
``X-PayFlux-Signature`` (:mod:`payflux.exporters.signing`; signed afresh for every attempt), or
with ``signature_scheme = "standard_webhooks"`` the Standard Webhooks headers ``webhook-id``,
``webhook-timestamp`` and ``webhook-signature`` instead (the secret then in ``whsec_`` form).

Outcomes of one request:

- 2xx: delivered; the entries are acknowledged.
- 408, 429, 5xx, a timeout (``timeout`` seconds for the whole exchange) or a connection error:
  retried after an exponential backoff with jitter (``retry_initial`` doubling up to
  ``retry_max``; each delay drawn from [delay/2, delay]), or after ``Retry-After`` (seconds or
  an HTTP date) when the response has one and it is longer.  Retries stop when the next attempt would start
  more than ``max_retry_time`` seconds after the first: the entries fail with
  :class:`WebhookUnavailable`, stay pending and are redelivered by the reclaim loop later.
- Any other status (400, 401, 404, 3xx, ...): permanent.  The entries fail with
  :class:`WebhookRejected`; the runtime redelivers them and dead-letters them after
  ``max_deliveries``.  In batch mode a 400, 413 or 422 for a batch of several events is first
  retried event by event, so one bad event doesn't take its whole batch to the dead-letter
  stream.

At most ``max_in_flight`` requests of one exporter are on the wire at once (across concurrent
batches); the rest wait for a slot.  Timers (timeouts, backoff) run on the ``reactor`` passed in,
so tests drive them with a ``task.Clock``.  The secret is never logged, nor is the URL's userinfo.
"""

from __future__ import annotations

import email.utils
import random
from typing import Any, Callable
from urllib.parse import urlsplit

import treq
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers

from payflux.consumers.handlers import EntriesFailed, Entry
from payflux.events import canonical_json
from payflux.exporters.records import FORMAT_VERSION, export_record
from payflux.exporters.metrics import ExporterStats
from payflux.exporters.signing import (
    STANDARD_ID_HEADER, STANDARD_SIGNATURE_HEADER, STANDARD_TIMESTAMP_HEADER, signed_headers, standard_headers,
    standard_key,
)

log = Logger()

MODES = ("batch", "single")
SIGNATURE_SCHEMES = ("payflux", "standard_webhooks")
RETRYABLE_STATUSES = frozenset({408, 429})  # plus every 5xx
SPLIT_STATUSES = frozenset({400, 413, 422})  # a batch rejected with these is retried event by event
USER_AGENT = "PayFlux-Webhook/1"


class WebhookRejected(Exception):
    """The receiver answered with a permanent (non-retryable) status; the entries fail."""

    def __init__(self, status: int, detail: str) -> None:
        self.status = status
        super().__init__(f"receiver answered {status}: {detail}" if detail else f"receiver answered {status}")


class WebhookUnavailable(Exception):
    """No 2xx within ``max_retry_time``; the entries fail for now and are redelivered later."""


class _Retry(Exception):
    """One attempt failed in a retryable way: ``reason`` for logs, ``retry_after`` if the receiver said so."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        self.reason = reason
        self.retry_after = retry_after
        super().__init__(reason)


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (delta-seconds or an HTTP date); None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None or when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - now)


def redact_url(url: str) -> str:
    """The URL without userinfo, query or fragment: what logs and errors may show."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        port = ":<invalid>"
    return f"{parts.scheme}://{host}{port}{parts.path}"


def _number(name: str, value: Any, low: float, high: float, low_inclusive: bool = False) -> float:
    ok = (not isinstance(value, bool) and isinstance(value, (int, float))
          and (low <= value if low_inclusive else low < value) and value <= high)
    if not ok:
        bound = ">=" if low_inclusive else ">"
        raise ValueError(f"{name} must be a number {bound} {low:g} and <= {high:g}, not {value!r}")
    return float(value)


def _read_secret(secret: Any, secret_file: Any) -> bytes:
    if (secret is None) == (secret_file is None):
        raise ValueError("exactly one of secret or secret_file is required (the HMAC signing key)")
    if secret is not None:
        if not isinstance(secret, str):
            raise ValueError("secret must be a string")
        value = secret.encode("utf-8")
        name = "secret"
    else:
        if not isinstance(secret_file, str) or not secret_file:
            raise ValueError("secret_file must be a file path")
        try:
            with open(secret_file, "rb") as f:
                value = f.read().strip()
        except OSError as e:
            raise ValueError(f"secret_file: cannot read {secret_file}: {e.strerror}") from None
        name = "secret_file"
    if len(value) < 16:
        raise ValueError(f"{name}: the secret must be at least 16 bytes")
    return value


class WebhookExporter:
    """
    Signed HTTP POST exporter; see the module docstring for bodies, retries and failures.

    Options: ``url`` (required, http or https), ``secret`` or ``secret_file`` (one of them,
    at least 16 bytes), ``mode`` (``"batch"`` | ``"single"``), ``timeout`` (seconds per
    request, default 10), ``max_in_flight`` (default 4), ``retry_initial`` (0.5 s),
    ``retry_max`` (30 s), ``max_retry_time`` (30 s; 0 = no retries), ``headers`` (extra request
    headers, e.g. an Authorization for a gateway in front of the receiver), ``signature_scheme``
    (``"payflux"``: X-PayFlux-Signature, the default; ``"standard_webhooks"``: webhook-id,
    webhook-timestamp and webhook-signature, with a ``whsec_<base64>`` secret).
    ``client`` (a treq ``HTTPClient``) is for tests and embedding, not for the config file.
    """

    exporter = "webhook"

    def __init__(
        self,
        reactor: Any,
        url: Any = None,
        secret: Any = None,
        secret_file: Any = None,
        mode: Any = "batch",
        timeout: Any = 10.0,
        max_in_flight: Any = 4,
        retry_initial: Any = 0.5,
        retry_max: Any = 30.0,
        max_retry_time: Any = 30.0,
        headers: Any = None,
        signature_scheme: Any = "payflux",
        client: Any = None,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        if not isinstance(url, str) or not url:
            raise ValueError("url is required (http:// or https://)")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"url must be an http:// or https:// URL with a host, not {redact_url(url)!r}")
        try:
            parts.port
        except ValueError:
            raise ValueError(f"url has an invalid port: {redact_url(url)!r}") from None
        if signature_scheme not in SIGNATURE_SCHEMES:
            raise ValueError(f"signature_scheme must be one of {', '.join(SIGNATURE_SCHEMES)}, not {signature_scheme!r}")
        if signature_scheme == "standard_webhooks":
            raw = _read_secret(secret, secret_file)
            try:
                self._secret = standard_key(raw.decode("utf-8", "replace"))
            except ValueError as e:
                raise ValueError(f"{'secret' if secret is not None else 'secret_file'}: {e}") from None
            self._sign = standard_headers
        else:
            self._secret = _read_secret(secret, secret_file)
            self._sign = signed_headers
        self.signature_scheme = signature_scheme
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        self.timeout = _number("timeout", timeout, 0, 600)
        if isinstance(max_in_flight, bool) or not isinstance(max_in_flight, int) or not 1 <= max_in_flight <= 256:
            raise ValueError(f"max_in_flight must be an integer from 1 to 256, not {max_in_flight!r}")
        self.retry_initial = _number("retry_initial", retry_initial, 0, 3600)
        self.retry_max = _number("retry_max", retry_max, 0, 3600)
        if self.retry_max < self.retry_initial:
            raise ValueError("retry_max must be >= retry_initial")
        self.max_retry_time = _number("max_retry_time", max_retry_time, 0, 86400, low_inclusive=True)
        extra = dict(headers or {}) if isinstance(headers, dict) or headers is None else None
        if extra is None or not all(isinstance(k, str) and isinstance(v, str) for k, v in extra.items()):
            raise ValueError("headers must be a table of header names to string values")
        reserved = {"content-type", "content-length", "host", "x-payflux-signature", "x-payflux-timestamp",
                    STANDARD_ID_HEADER, STANDARD_TIMESTAMP_HEADER, STANDARD_SIGNATURE_HEADER}
        clash = sorted(k for k in extra if k.lower() in reserved)
        if clash:
            raise ValueError(f"headers must not set {', '.join(clash)} (set by the exporter)")
        self.url = url
        self.mode = mode
        self.max_in_flight = max_in_flight
        self.reactor = reactor
        self.stats = ExporterStats.unbound(self.exporter)
        self._extra_headers = extra
        self._jitter = jitter  # uniform [0, 1): the backoff's jitter source
        self._slots = defer.DeferredSemaphore(max_in_flight)
        self._pool: HTTPConnectionPool | None = None
        if client is None:
            self._pool = HTTPConnectionPool(reactor, persistent=True)
            self._pool.maxPersistentPerHost = max_in_flight
            self._pool.retryAutomatically = False  # retries are ours, and POST isn't idempotent
            client = treq.client.HTTPClient(Agent(reactor, pool=self._pool, connectTimeout=self.timeout))
        self._client = client
        self._waiting: set[defer.Deferred] = set()  # requests and backoff sleeps, cancelled by close()
        self._closed = False

    def __repr__(self) -> str:
        return f"<WebhookExporter {redact_url(self.url)} mode={self.mode}>"

    def bind_metrics(self, metrics: Any, consumer: str) -> None:
        self.stats = metrics.exporters.stats(self.exporter, consumer)

    # -- the handler protocol ------------------------------------------------------------------

    def handle(self, entries: list[Entry]) -> defer.Deferred | None:
        if not entries:
            return None
        return defer.ensureDeferred(self._handle(entries))

    async def _handle(self, entries: list[Entry]) -> None:
        if self._closed:
            raise RuntimeError("webhook exporter is closed")
        started = self.reactor.seconds()
        if self.mode == "single":
            failures = await self._each(entries, started)
        else:
            try:
                await self._deliver(entries, started)
                failures = {}
            except WebhookRejected as error:
                if len(entries) > 1 and error.status in SPLIT_STATUSES:
                    log.warn("{url} rejected a batch of {count} events ({status}); retrying them one by one",
                             url=redact_url(self.url), count=len(entries), status=error.status)
                    failures = await self._each(entries, started)
                else:
                    failures = {(e.partition, e.stream_id): error for e in entries}
            except Exception as error:  # noqa: BLE001 - WebhookUnavailable, or cancelled by close()
                failures = {(e.partition, e.stream_id): error for e in entries}
        if failures:
            self.stats.failed.inc(len(failures))
            log.warn("{url}: {failed} of {count} events not delivered ({error})", url=redact_url(self.url),
                     failed=len(failures), count=len(entries), error=str(next(iter(failures.values()))))
            raise EntriesFailed(failures)

    async def _each(self, entries: list[Entry], started: float) -> dict[tuple[int, str], BaseException]:
        """Deliver every entry in its own request (bounded by the in-flight slots); (partition, id) -> error."""
        results = await defer.DeferredList(
            [defer.ensureDeferred(self._deliver([e], started)) for e in entries], consumeErrors=True)
        return {(e.partition, e.stream_id): result.value for e, (ok, result) in zip(entries, results) if not ok}

    def close(self) -> defer.Deferred:
        """Cancel requests and backoff sleeps still running (their entries stay pending); close connections."""
        self._closed = True
        for d in list(self._waiting):
            d.cancel()
        if self._pool is not None:
            return self._pool.closeCachedConnections()
        return defer.succeed(None)

    # -- delivery ------------------------------------------------------------------------------

    def body_of(self, entries: list[Entry]) -> bytes:
        """The request body for ``entries`` in this exporter's mode (``single``: exactly one entry)."""
        if self.mode == "single":
            return canonical_json(export_record(entries[0]))
        return canonical_json({"v": FORMAT_VERSION, "events": [export_record(e) for e in entries]})

    async def _deliver(self, entries: list[Entry], started: float) -> None:
        """POST ``entries`` as one request until a 2xx, a permanent status or the retry budget runs out."""
        body = self.body_of(entries)
        attempt = 0
        while True:
            attempt += 1
            try:
                await self._slots.run(lambda: defer.ensureDeferred(self._attempt(body)))
            except _Retry as retry:
                now = self.reactor.seconds()
                delay = self.backoff(attempt)
                if retry.retry_after is not None:  # never earlier than the receiver asked, nor in a hot loop
                    delay = max(delay, retry.retry_after)
                spent = now - started
                if spent + delay > self.max_retry_time or self._closed:
                    raise WebhookUnavailable(
                        f"no 2xx from {redact_url(self.url)} after {attempt} attempt(s) in {spent:.1f}s; "
                        f"last: {retry.reason}") from None
                self.stats.retried.inc(len(entries))
                log.info("{url}: {reason}; retrying {count} events in {delay:.2f}s (attempt {attempt})",
                         url=redact_url(self.url), reason=retry.reason, count=len(entries), delay=delay,
                         attempt=attempt + 1)
                await self._wait(task.deferLater(self.reactor, delay, lambda: None))
                continue
            self.stats.succeeded(len(entries), self.reactor.seconds())
            return

    def backoff(self, attempt: int) -> float:
        """Delay after failed attempt number ``attempt`` (1, 2, ...): exponential, capped, jittered to [d/2, d]."""
        delay = min(self.retry_max, self.retry_initial * 2 ** min(attempt - 1, 60))
        return delay * (0.5 + self._jitter() / 2)

    async def _attempt(self, body: bytes) -> None:
        """One request: returns on 2xx; raises _Retry (retryable) or WebhookRejected (permanent)."""
        if self._closed:
            raise _Retry("exporter closed")
        headers = Headers({"Content-Type": ["application/json"], "User-Agent": [USER_AGENT]})
        for name, value in {**self._extra_headers, **self._sign(self._secret, body, self.reactor.seconds())}.items():
            headers.setRawHeaders(name, [value])

        async def exchange() -> tuple[int, Headers, bytes]:
            response = await self._client.post(self.url, data=body, headers=headers, allow_redirects=False)
            content = await treq.content(response)
            return response.code, response.headers, content

        d = defer.ensureDeferred(exchange())
        d.addTimeout(self.timeout, self.reactor)
        try:
            status, response_headers, content = await self._wait(d)
        except defer.TimeoutError:
            raise _Retry(f"no response within {self.timeout:g}s") from None
        except defer.CancelledError:
            raise _Retry("cancelled") from None
        except Exception as e:  # noqa: BLE001 - connection refused/reset, DNS, TLS: all worth a retry
            raise _Retry(_describe(e)) from None
        if 200 <= status < 300:
            return
        detail = content[:200].decode("utf-8", "replace").strip()
        if status >= 500 or status in RETRYABLE_STATUSES:
            retry_after = parse_retry_after(
                (response_headers.getRawHeaders("Retry-After") or [None])[0], self.reactor.seconds())
            raise _Retry(f"receiver answered {status}", retry_after)
        raise WebhookRejected(status, detail)

    async def _wait(self, d: defer.Deferred) -> Any:
        self._waiting.add(d)
        try:
            return await d
        finally:
            self._waiting.discard(d)


def _describe(e: BaseException) -> str:
    """A one-line reason for a failed request; twisted.web wraps the cause in a list of Failures."""
    reasons = getattr(e, "reasons", None)
    if reasons:
        e = reasons[0].value
    text = str(e).strip()
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
