"""
The Kafka / Redpanda exporter: built-in handler ``kafka`` (extra ``kafka`` = confluent-kafka).

Contract (docs/exporters.md, "Kafka / Redpanda"):

- One Kafka message per stream entry: key = ``merchant_id_hash`` (UTF-8; so one merchant's
  events share a Kafka partition and keep their order), or ``event_id`` for an event without
  one (the field is optional; ``""`` is absent), so such events spread over the partitions and a
  redelivered copy lands in the partition of the first (:func:`message_key`); value = the
  canonical event JSON (the bytes PayFlux stored), timestamp = ``received_at`` (ms), headers
  :data:`HEADERS`.
- The producer always runs with ``enable.idempotence=true`` and ``acks=all``; librdkafka
  retries retriable errors itself (broker down, leader change, timeouts) until
  ``message.timeout.ms`` (30 s here unless set), so a failed delivery report is final for this
  attempt.
- ``handle()`` fires only after every message of the batch has a delivery report.  Failed
  reports (and messages librdkafka refused at ``produce()``) fail exactly those entries with
  :class:`EntriesFailed`; they stay pending and the runtime redelivers them (a redelivery can
  put a second copy in the topic: consumers dedupe on the ``payflux.event_id`` header).
- The producer (librdkafka's own threads) and its poller thread are created by ``start()``,
  which the consumer service calls in its ``startService`` (or the first ``handle()``), never
  when the exporter is built: ``twistd`` builds handlers before it daemonizes, and a thread
  does not survive the fork.  Building only lets librdkafka check the settings
  (:func:`check_producer_config`: a producer created and closed at once).
- Delivery reports reach the reactor without blocking it: a dedicated thread per producer
  calls ``poll(0.1)`` (delivery, error and log callbacks only ever run inside ``poll``, so only
  in that thread); each ``poll`` that collected reports hands them over with one
  ``reactor.callFromThread``.  Measured against a reactor ``LoopingCall`` of ``poll(0)``
  (docs/exporters.md): as fast as a 1 ms loop with one batch in flight, 1.4x a 5 ms loop
  with four, and no polling at all while idle.
- A fatal producer error (the idempotent producer can't guarantee order any more) replaces the
  producer: messages of the old one fail and are redelivered, later batches use the new one.
- ``close()`` waits up to ``flush_timeout`` seconds for outstanding reports, then purges what
  is left (those entries fail and stay pending) and stops the poller thread.

Options are validated when the exporter is built (ValueError naming the option); secrets
(``sasl.password``, ``sasl_password_file``'s content, key passwords) never appear in a log line
or an error message.
"""

from __future__ import annotations

import collections
import functools
import logging
import re
import threading
from typing import Any, Callable

import confluent_kafka
from twisted.internet import defer
from twisted.logger import Logger

from payflux.consumers.handlers import EntriesFailed, Entry
from payflux.events import canonical_json
from payflux.exporters.metrics import ExporterStats

log = Logger()

POLL_SECONDS = 0.1
LOG_INTERVAL = 10.0  # seconds: at most one librdkafka log line / error per facility or code in this window
BUFFER_RETRY_SECONDS = 0.01  # produce() again after this long when librdkafka's queue is full

HEADERS = (
    "payflux.event_id", "payflux.event_type", "payflux.stream_id", "payflux.partition",
    "payflux.received_at", "payflux.schema_version",
)


def message_key(entry: Entry) -> bytes:
    """The Kafka key of an entry: its ``merchant_id_hash`` (UTF-8), or, for an event without one
    (optional since the seed schema; ``""`` is absent), its ``event_id``: such events spread
    over the partitions instead of piling into the one of an empty key, and a redelivered copy
    goes to the partition of the first (the same key), where a consumer deduplicating on
    ``payflux.event_id`` meets both."""
    merchant = entry.event.get("merchant_id_hash")
    if merchant and isinstance(merchant, str):
        return merchant.encode()
    return entry.event_id.encode()


# librdkafka settings applied unless the ``librdkafka`` table sets them
DEFAULTS: dict[str, Any] = {
    "message.timeout.ms": 30_000,       # well below the runtime's default min_idle_ms (60 s)
    "partitioner": "murmur2_random",    # Java client's partitioner: same key -> same partition as Java producers
    # a batch completes when its last report arrives, so linger.ms is added to every batch's time:
    # 1 ms measured 3.4x librdkafka's default 5 ms at one batch in flight (bench/exporters.py)
    "linger.ms": 1,
}
# settings the exporter owns: the values the ``librdkafka`` table may repeat (none: may not be set)
_ALL = ("all", "-1", -1)
MANAGED: dict[str, tuple[tuple[Any, ...], str]] = {
    "bootstrap.servers": ((), "use the bootstrap_servers option"),
    "metadata.broker.list": ((), "use the bootstrap_servers option"),
    "enable.idempotence": ((True, "true"), "the exporter always runs the idempotent producer"),
    "acks": (_ALL, "the exporter always waits for all in-sync replicas"),
    "request.required.acks": (_ALL, "the exporter always waits for all in-sync replicas"),
    "delivery.report.only.error": ((False, "false"), "entries are acknowledged on successful delivery reports"),
    "transactional.id": ((), "transactions are not used"),
    "on_delivery": ((), "set by the exporter"),
    "error_cb": ((), "set by the exporter"),
    "logger": ((), "set by the exporter"),
    "stats_cb": ((), "not supported"),
    "throttle_cb": ((), "not supported"),
    "oauth_cb": ((), "not supported"),
}
OPTIONS = ("topic", "bootstrap_servers", "librdkafka", "sasl_password_file", "flush_timeout")
_SECRET_KEY = re.compile(r"password|secret|\.pem$|jaas|oauthbearer\.config")
_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}")
_KEY = re.compile(r"[a-z0-9_.]{1,128}")
_HOST_PORT = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):([0-9]{1,5})")


def producer_config(options: dict[str, Any]) -> tuple[str, dict[str, Any], float]:
    """
    Check the exporter's options and build the librdkafka configuration:
    ``(topic, config, flush_timeout)``.  ValueError names the option, never a secret value.
    """
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"unknown option {unknown[0]!r}; known: {', '.join(OPTIONS)}")
    topic = options.get("topic")
    if not isinstance(topic, str) or not _TOPIC.fullmatch(topic) or topic in (".", ".."):
        raise ValueError("option topic must be a Kafka topic name: 1..249 characters of [A-Za-z0-9._-]")
    table = options.get("librdkafka", {})
    if not isinstance(table, dict):
        raise ValueError("option librdkafka must be a table of librdkafka settings")
    config: dict[str, Any] = dict(DEFAULTS)
    for key, value in table.items():
        if not isinstance(key, str) or not _KEY.fullmatch(key):
            raise ValueError("option librdkafka: keys must be librdkafka setting names (e.g. security.protocol)")
        if not isinstance(value, (bool, int, float, str)):
            raise ValueError(f"option librdkafka.{key} must be a string, number or boolean")
        if key in MANAGED:
            allowed, why = MANAGED[key]
            if not any(value == a and type(value) is type(a) for a in allowed):
                raise ValueError(f"option librdkafka.{key} can't be set: {why}")
            continue
        config[key] = value
    if "delivery.timeout.ms" in table and "message.timeout.ms" not in table:
        del config["message.timeout.ms"]  # the user's alias wins over our default
    mock = "test.mock.num.brokers" in config
    servers = options.get("bootstrap_servers")
    if servers is None and not mock:
        raise ValueError("option bootstrap_servers is required (host:port[,host:port...])")
    if servers is not None:
        if isinstance(servers, str):
            servers = [s.strip() for s in servers.split(",")]
        if not isinstance(servers, list) or not servers:
            raise ValueError("option bootstrap_servers must be a host:port string or a list of them")
        for server in servers:
            m = _HOST_PORT.fullmatch(server) if isinstance(server, str) else None
            if m is None or not 0 < int(m.group(2)) < 65536:
                raise ValueError("option bootstrap_servers: each server must be host:port with a port from 1 to 65535")
        config["bootstrap.servers"] = ",".join(servers)
    password_file = options.get("sasl_password_file")
    if password_file is not None:
        if "sasl.password" in config:
            raise ValueError("option sasl_password_file: librdkafka.sasl.password is set too; use one of them")
        if not isinstance(password_file, str) or not password_file:
            raise ValueError("option sasl_password_file must be a file path")
        try:
            with open(password_file, encoding="utf-8") as f:
                password = f.read().rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"option sasl_password_file: can't read {password_file}: {type(e).__name__}") from None
        if not password:
            raise ValueError(f"option sasl_password_file: {password_file} is empty")
        config["sasl.password"] = password
    flush_timeout = options.get("flush_timeout", 10.0)
    if isinstance(flush_timeout, bool) or not isinstance(flush_timeout, (int, float)) or not 0 <= flush_timeout <= 600:
        raise ValueError("option flush_timeout must be a number of seconds from 0 to 600")
    config["enable.idempotence"] = True
    config["acks"] = "all"
    return topic, config, float(flush_timeout)


def redact(text: str, config: dict[str, Any]) -> str:
    """``text`` with the value of every secret setting in ``config`` replaced by ``***``."""
    for key, value in config.items():
        if _SECRET_KEY.search(key) and isinstance(value, str) and value:
            text = text.replace(value, "***")
    return text


def check_producer_config(config: dict[str, Any]) -> None:
    """
    Let librdkafka check ``config`` (every setting, and their combinations) without keeping a
    producer: one is created and closed at once, so its threads are gone when this returns.
    Raises what ``confluent_kafka.Producer`` raises (KafkaException, ValueError, TypeError).
    """
    silent = logging.Logger("payflux.exporters.kafka.check", logging.CRITICAL)  # private, never shown
    silent.addHandler(logging.NullHandler())
    producer = confluent_kafka.Producer(dict(config, error_cb=lambda err: None, logger=silent))
    close = getattr(producer, "close", None)  # confluent-kafka >= 2.x; else destroyed when collected
    if close is not None:
        close()
    del producer


class _Batch:
    """One handle() call: its entries, their delivery outcome, and the Deferred handle() returned."""

    __slots__ = ("entries", "left", "failures", "deferred", "next", "full_since")

    def __init__(self, entries: list[Entry]) -> None:
        self.entries = entries
        self.left = len(entries)
        self.failures: dict[tuple[int, str], BaseException] = {}
        self.deferred: defer.Deferred = defer.Deferred()
        self.next = 0  # index of the next entry to produce
        self.full_since: float | None = None  # when produce() first found the queue full


class DeliveryFailed(Exception):
    """A delivery report (or produce()) said the message was not written; str() is librdkafka's reason."""


class _ReactorLogHandler(logging.Handler):
    """librdkafka log lines (emitted inside poll(), in the poller thread) -> the reactor's Logger."""

    def __init__(self, forward: Callable[[int, str, str], None]) -> None:
        super().__init__(logging.DEBUG)
        self.forward = forward

    def emit(self, record: logging.LogRecord) -> None:
        args = record.args if isinstance(record.args, tuple) else ()
        facility, message = (str(args[0]), str(args[2])) if len(args) == 3 else ("LOG", record.getMessage())
        self.forward(record.levelno, facility, message)


class _ProducerLink:
    """One confluent-kafka Producer plus the thread that polls it (see the module docstring)."""

    def __init__(self, config: dict[str, Any], reactor: Any, exporter: "KafkaExporter") -> None:
        self.reactor = reactor
        self.outstanding = 0  # messages produced and not yet reported (reactor thread only)
        self._reports: list[tuple[_Batch, int, Any]] = []  # poller thread only
        self._stop = threading.Event()
        self.stopped: defer.Deferred = defer.Deferred()
        self.on_reports = exporter._reports
        logger = logging.Logger("payflux.exporters.kafka", logging.INFO)  # private: not in logging's tree
        logger.addHandler(_ReactorLogHandler(
            lambda level, facility, message: reactor.callFromThread(exporter._librdkafka_log, level, facility, message)))
        self.producer = confluent_kafka.Producer(dict(
            config,
            error_cb=lambda err: reactor.callFromThread(exporter._producer_error, self, err),
            logger=logger,
        ))
        self.thread = threading.Thread(target=self._poll, name="payflux-kafka-poller", daemon=True)
        self.thread.start()

    def collect(self, batch: _Batch, index: int, err: Any, msg: Any) -> None:
        """on_delivery callback: runs inside poll(), in the poller thread."""
        self._reports.append((batch, index, err))

    def _hand_over(self) -> None:
        if self._reports:
            reports, self._reports = self._reports, []
            self.reactor.callFromThread(self.on_reports, self, reports)

    def _poll(self) -> None:
        try:
            while not self._stop.is_set():
                self.producer.poll(POLL_SECONDS)
                self._hand_over()
            self.producer.poll(0)  # reports of purged messages
            self._hand_over()
        finally:
            self.reactor.callFromThread(self._ended)

    def _ended(self) -> None:
        self.thread.join(1.0)  # it has nothing left to do but return
        self.stopped.callback(None)

    def stop(self) -> defer.Deferred:
        """Purge what is still queued or in flight (those reports fail) and end the poller thread."""
        if not self._stop.is_set():
            try:
                self.producer.purge(in_queue=True, in_flight=True)
            except confluent_kafka.KafkaException:
                pass
            self._stop.set()
        return self.stopped


class KafkaExporter:
    """See the module docstring.  ``KafkaExporter(reactor=reactor, topic=..., bootstrap_servers=..., ...)``."""

    name = "kafka"

    def __init__(self, reactor: Any, **options: Any) -> None:
        self.reactor = reactor
        self.topic, config, self.flush_timeout = producer_config(options)
        self._config = config
        self.stats = ExporterStats.unbound(self.name)
        self._closed = False
        self._log_times: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        try:
            check_producer_config(config)
        except (confluent_kafka.KafkaException, ValueError, TypeError) as e:
            reason = e.args[0].str() if e.args and hasattr(e.args[0], "str") else str(e)
            raise ValueError(f"option librdkafka: {redact(reason, config)}") from None
        # the producer and its poller thread: created by start(), never while the exporter is
        # built (twistd builds it before it daemonizes, and a fork keeps no thread)
        self._link: _ProducerLink | None = None
        # librdkafka accepted it, so it is a number: how long a full queue may hold a batch back
        timeout_ms = config.get("delivery.timeout.ms", config.get("message.timeout.ms", 300_000))
        self.message_timeout = float(timeout_ms) / 1000
        self._retired: set[_ProducerLink] = set()
        self._backlog: collections.deque[_Batch] = collections.deque()  # batches not fully produced yet
        self._retry: Any = None  # the delayed _drain() while the queue is full

    def bind_metrics(self, metrics: Any, consumer: str) -> None:
        self.stats = metrics.exporters.stats(self.name, consumer)

    def start(self) -> None:
        """Create the producer and start its poller thread (the consumer service's ``startService``;
        without one, such as in a test or a benchmark, the first ``handle()`` does it)."""
        if self._link is None and not self._closed:
            self._link = _ProducerLink(self._config, self.reactor, self)

    # -- handle ------------------------------------------------------------------------------

    def handle(self, entries: list[Entry]) -> defer.Deferred | None:
        if self._closed:
            raise RuntimeError("the kafka exporter is closed")
        if not entries:
            return None
        if self._link is None:
            self.start()
        redelivered = sum(1 for e in entries if e.deliveries > 1)
        if redelivered:
            self.stats.retried.inc(redelivered)
        batch = _Batch(entries)
        self._backlog.append(batch)
        if self._retry is None:
            self._drain()
        return batch.deferred

    def _drain(self) -> None:
        """Produce the backlog's batches in order; a batch that met a full queue holds back later ones."""
        self._retry = None
        while self._backlog:
            if not self._produce(self._backlog[0]):
                self._retry = self.reactor.callLater(BUFFER_RETRY_SECONDS, self._drain)
                return
            self._backlog.popleft()

    def _produce(self, batch: _Batch) -> bool:
        """produce() every remaining entry of ``batch``; False if librdkafka's queue is full (retry later)."""
        link = self._link
        produce = link.producer.produce
        topic = self.topic
        entries = batch.entries
        while batch.next < len(entries):
            i = batch.next
            e = entries[i]
            try:
                produce(
                    topic,
                    value=canonical_json(e.event),
                    key=message_key(e),
                    headers=[
                        ("payflux.event_id", e.event_id), ("payflux.event_type", e.type),
                        ("payflux.stream_id", e.stream_id), ("payflux.partition", str(e.partition)),
                        ("payflux.received_at", str(e.received_at_ms)), ("payflux.schema_version", e.schema_version),
                    ],
                    timestamp=e.received_at_ms,
                    on_delivery=functools.partial(link.collect, batch, i),
                )
            except BufferError:
                # librdkafka's queue is full (queue.buffering.max.messages/kbytes): wait for reports
                now = self.reactor.seconds()
                if batch.full_since is None:
                    batch.full_since = now
                if now - batch.full_since < self.message_timeout:
                    return False
                self._settle(batch, i, DeliveryFailed("librdkafka's producer queue stayed full"))
            except Exception as exc:  # KafkaException (e.g. message too large), TypeError: this entry fails
                err = exc.args[0] if exc.args else None
                reason = f"{err.name()}: {err.str()}" if isinstance(err, confluent_kafka.KafkaError) else str(exc)
                self._settle(batch, i, DeliveryFailed(reason))
            else:
                link.outstanding += 1
                batch.full_since = None
            batch.next = i + 1
        return True

    # -- delivery reports (reactor thread) ---------------------------------------------------

    def _reports(self, link: _ProducerLink, reports: list[tuple[_Batch, int, Any]]) -> None:
        link.outstanding -= len(reports)
        for batch, index, err in reports:
            self._settle(batch, index, None if err is None else DeliveryFailed(f"{err.name()}: {err.str()}"))

    def _settle(self, batch: _Batch, index: int, error: BaseException | None) -> None:
        if error is not None:
            e = batch.entries[index]
            batch.failures[(e.partition, e.stream_id)] = error
        batch.left -= 1
        if batch.left:
            return
        done = len(batch.entries) - len(batch.failures)
        if done:
            self.stats.succeeded(done, self.reactor.seconds())
        if not batch.failures:
            batch.deferred.callback(None)
            return
        self.stats.failed.inc(len(batch.failures))
        first = next(iter(batch.failures.values()))
        log.warn("kafka: {failed} of {count} events not delivered to {topic} (first error: {error})",
                 failed=len(batch.failures), count=len(batch.entries), topic=self.topic, error=str(first))
        batch.deferred.errback(EntriesFailed(batch.failures))

    # -- producer errors and logs (reactor thread) -------------------------------------------

    def _producer_error(self, link: _ProducerLink, err: Any) -> None:
        text = f"{err.name()}: {redact(err.str(), self._config)}"
        if err.fatal() and link is self._link and not self._closed:
            log.critical("kafka: fatal producer error ({error}); replacing the producer, its undelivered "
                         "messages fail and are redelivered", error=text)
            self._link = _ProducerLink(self._config, self.reactor, self)
            self._retired.add(link)
            link.stop().addBoth(lambda _: self._retired.discard(link))
            return
        self._rate_limited(f"error:{err.code()}", "warn", "kafka: producer error {error}", error=text)

    def _librdkafka_log(self, level: int, facility: str, message: str) -> None:
        method = "warn" if level >= logging.WARNING else "info" if level >= logging.INFO else "debug"
        self._rate_limited(f"log:{facility}", method, "librdkafka {facility}: {message}",
                           facility=facility, message=redact(message, self._config))

    def _rate_limited(self, key: str, method: str, fmt: str, **fields: Any) -> None:
        now = self.reactor.seconds()
        last = self._log_times.get(key)
        if last is not None and now - last < LOG_INTERVAL:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        self._log_times[key] = now
        suppressed = self._suppressed.pop(key, 0)
        if suppressed:
            fmt += " ({suppressed} similar lines suppressed)"
        getattr(log, method)(fmt, suppressed=suppressed, **fields)

    # -- close -------------------------------------------------------------------------------

    def close(self) -> defer.Deferred:
        """Wait up to ``flush_timeout`` for outstanding delivery reports, then purge and stop."""
        self._closed = True
        return defer.ensureDeferred(self._close())

    async def _close(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        while self._backlog:
            batch = self._backlog.popleft()
            for i in range(batch.next, len(batch.entries)):
                self._settle(batch, i, DeliveryFailed("the kafka exporter was closed"))
        links = [link for link in (self._link, *self._retired) if link is not None]  # None: never started
        deadline = self.reactor.seconds() + self.flush_timeout
        while any(link.outstanding > 0 for link in links) and self.reactor.seconds() < deadline:
            waiter: defer.Deferred = defer.Deferred()
            self.reactor.callLater(min(0.01, max(0.0, deadline - self.reactor.seconds())), waiter.callback, None)
            await waiter
        left = sum(max(0, link.outstanding) for link in links)
        if left:
            log.warn("kafka: {count} messages still unconfirmed after {timeout}s; their entries stay pending",
                     count=left, timeout=self.flush_timeout)
        await defer.gatherResults([link.stop() for link in links])

