"""
The handler protocol: what a consumer hands to user code, and how it reads the answer.

A handler is any object with

- ``handle(entries: list[Entry]) -> Deferred | coroutine | None`` — called with one batch of
  decoded entries (all well-formed; see below).  Returning (or firing) normally means every
  entry of the batch is done and will be acknowledged.  Raising (or failing the Deferred)
  :class:`EntriesFailed` fails only the entries it names; the rest are acknowledged.  Any other
  exception fails the whole batch: nothing is acknowledged.
- optionally ``start() -> None`` — called once when the consumer service starts, before the
  first batch: where a handler starts its threads (the Kafka exporter's poller) or anything
  else that must not exist before ``twistd`` daemonizes (forks), which happens after the
  handlers are built and before the services start.
- optionally ``close() -> Deferred | None`` — called once when the consumer stops, after the
  last batch it will hand over.

Failed entries stay pending in the consumer group; the reclaim loop redelivers them later and
dead-letters them after ``max_deliveries`` (docs/stream-format.md, "Consumer groups").
Delivery is at-least-once: a handler must tolerate seeing an entry again (``event_id`` is the
producer's idempotency key).

Entries whose stream fields are missing, of an unsupported format version or whose ``data``
is not a JSON object are never handed to the handler: they fail with :class:`MalformedEntry`
in their batch and so reach the dead-letter stream through the normal path.

``load_handler`` builds a handler from a config string: a built-in name (``log``, ``noop``, or
one of :data:`LAZY_BUILTINS`: the exporters ``file``, ``webhook``, ``kafka``, ``parquet`` and
the risk consumer ``risk``) or
``package.module:attr``, where ``attr(reactor=reactor, **options)`` returns the handler.
:func:`build_handlers` builds every configured consumer's handler: the one place the node
(:func:`payflux.node.add_background`, under ``makeService``) and ``payflux check-config`` do
it; a handler that can't be imported or built is a :class:`HandlerError` naming the consumer.
"""

from __future__ import annotations

import importlib
import inspect
import time
from typing import Any, Callable, Iterable

import attrs
from twisted.internet import defer
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from payflux.observability.logsummary import repeated

try:  # orjson decodes payment events ~2x faster than json; same results for valid JSON
    from orjson import loads as _loads
except ImportError:  # pragma: no cover - orjson is an optional extra
    from json import loads as _loads

log = Logger()

SUPPORTED_VERSIONS = frozenset({"1"})
REQUIRED_FIELDS = ("v", "event_id", "type", "received_at", "data")


@attrs.frozen
class Entry:
    """One stream entry, decoded.  ``deliveries`` is 1 on a first read, XPENDING's count when redelivered."""

    stream_id: str
    partition: int
    event_id: str
    received_at_ms: int
    schema_version: str
    event: dict
    deliveries: int
    type: str = ""


class EntriesFailed(Exception):
    """
    Raised by a handler to fail only some entries: failures maps stream_id -> exception; the rest are acked.

    Stream ids are unique within a partition only: with several partitions a key may also be a
    ``(partition, stream_id)`` tuple; a plain stream id fails that id in every partition of the batch.
    """

    def __init__(self, failures: dict[str, BaseException]) -> None:
        self.failures = dict(failures)
        super().__init__(f"{len(self.failures)} entries failed")


class MalformedEntry(Exception):
    """A stream entry that can't be decoded into an :class:`Entry` (missing field, bad JSON, unknown ``v``)."""


def decode_entry(stream_id: str, partition: int, fields: list[str] | None, deliveries: int) -> Entry:
    """Decode one XREADGROUP/XAUTOCLAIM entry (a flat field/value list); MalformedEntry if unusable."""
    if fields is None:
        raise MalformedEntry("entry was deleted from the stream")
    if len(fields) == 10 and fields[0] == "v" and fields[1] == "1" and fields[2] == "event_id" \
            and fields[4] == "type" and fields[6] == "received_at" and fields[8] == "data":
        # the append script's exact layout (stream-format v1): no dict, same checks
        try:
            event = _loads(fields[9])
            received_at_ms = int(fields[7])
        except ValueError:
            pass  # the general path below says which field is wrong
        else:
            if type(event) is dict:
                return Entry(stream_id, partition, fields[3], received_at_ms, "1", event, deliveries, fields[5])
    if len(fields) == 2 and fields[0] == "data":
        return _go_entry(stream_id, partition, fields[1], deliveries)
    f = dict(zip(fields[::2], fields[1::2]))
    missing = [name for name in REQUIRED_FIELDS if name not in f]
    if missing:
        raise MalformedEntry(f"missing field(s): {', '.join(missing)}")
    if f["v"] not in SUPPORTED_VERSIONS:
        raise MalformedEntry(f"unsupported stream format version v={f['v']!r:.20}")
    try:
        received_at_ms = int(f["received_at"])
    except ValueError:
        raise MalformedEntry("received_at is not an integer") from None
    try:
        event = _loads(f["data"])
    except ValueError as e:
        raise MalformedEntry(f"data is not valid JSON: {e}") from None
    if not isinstance(event, dict):
        raise MalformedEntry("data is not a JSON object")
    return Entry(stream_id, partition, f["event_id"], received_at_ms, f["v"], event, deliveries, f["type"])


def _go_entry(stream_id: str, partition: int, data: str, deliveries: int) -> Entry:
    """An entry the Go PayFlux wrote (``XADD events_stream * data <json>``; v ``"go"``): the
    event id and type come from its JSON, ``received_at`` from the entry id's milliseconds."""
    try:
        event = _loads(data)
    except ValueError as e:
        raise MalformedEntry(f"data is not valid JSON: {e}") from None
    if not isinstance(event, dict):
        raise MalformedEntry("data is not a JSON object")
    event_id, event_type = event.get("event_id"), event.get("event_type")
    if not isinstance(event_id, str) or not event_id or not isinstance(event_type, str):
        raise MalformedEntry("a data-only (Go PayFlux) entry needs event_id and event_type strings in data")
    return Entry(stream_id, partition, event_id, int(stream_id.split("-", 1)[0]), "go", event, deliveries,
                 event_type)


@attrs.frozen
class BatchOutcome:
    """What became of one batch: ``done`` (partition, id) to ack, ``failed`` (partition, id) -> exception."""

    done: list[tuple[int, str]]
    failed: dict[tuple[int, str], BaseException]
    seconds: float  # handler wall time (0 if the handler wasn't called)


def _as_deferred(result: Any) -> defer.Deferred:
    if inspect.isawaitable(result) and not isinstance(result, defer.Deferred):
        return defer.ensureDeferred(result)
    return defer.succeed(result) if not isinstance(result, defer.Deferred) else result


def run_handler(
    handler: Any, raw: Iterable[tuple[str, int, list[str] | None, int]]
) -> defer.Deferred:
    """
    Decode ``raw`` (stream id, partition, fields, deliveries) and hand the good entries to
    ``handler`` as one batch; fires with a :class:`BatchOutcome`, never errbacks.
    """
    entries: list[Entry] = []
    failed: dict[tuple[int, str], BaseException] = {}
    for stream_id, partition, fields, deliveries in raw:
        try:
            entries.append(decode_entry(stream_id, partition, fields, deliveries))
        except MalformedEntry as e:
            failed[(partition, stream_id)] = e
    if not entries:
        return defer.succeed(BatchOutcome([], failed, 0.0))
    started = time.perf_counter()
    try:
        d = _as_deferred(handler.handle(entries))
    except BaseException:
        d = defer.fail()

    def done(result: Any) -> BatchOutcome:
        seconds = time.perf_counter() - started
        ids = [(e.partition, e.stream_id) for e in entries]
        if not isinstance(result, Failure):
            return BatchOutcome(ids, failed, seconds)
        if result.check(EntriesFailed):
            named = result.value.failures
            done = []
            for i in ids:
                exc = named.get(i, named.get(i[1]))
                if exc is None:
                    done.append(i)
                else:
                    failed[i] = exc
            return BatchOutcome(done, failed, seconds)
        # one line with the error class and message, one per log_summary_interval while it keeps
        # failing (with counts); the traceback only at log_level debug
        repeated(f"handler failed {type(handler).__name__}", log).warn(
            "handler failed a batch of {count} entries: {error_class}: {error}", count=len(ids),
            error_class=result.type.__name__, error=result.getErrorMessage())
        log.failure("handler failed a batch of {count} entries", result, level=LogLevel.debug, count=len(ids))
        for i in ids:
            failed[i] = result.value
        return BatchOutcome([], failed, seconds)

    return d.addBoth(done)


def start_handler(handler: Any) -> None:
    """Call the handler's optional ``start()``; errors are logged, never raised."""
    start = getattr(handler, "start", None)
    if start is None:
        return
    try:
        start()
    except Exception:
        log.failure("handler start() failed")


def close_handler(handler: Any) -> defer.Deferred:
    """Call the handler's optional ``close()``; errors are logged, never raised."""
    close = getattr(handler, "close", None)
    if close is None:
        return defer.succeed(None)
    d = defer.maybeDeferred(close)
    d.addCallback(lambda r: _as_deferred(r))
    d.addErrback(lambda f: log.failure("handler close() failed", f))
    return d


class LogHandler:
    """Built-in ``log``: one structured log line per entry (ids and type only, never the payload)."""

    def __init__(self, reactor: Any = None, namespace: str = "payflux.consumers.log") -> None:
        self.log = Logger(namespace=namespace)

    def handle(self, entries: list[Entry]) -> None:
        for e in entries:
            self.log.info(
                "event {event_id} ({event_type}) at {stream_id} partition {partition}, delivery {deliveries}",
                event_id=e.event_id, event_type=e.type, stream_id=e.stream_id, partition=e.partition,
                deliveries=e.deliveries,
            )


class NoopHandler:
    """Built-in ``noop``: completes every entry without doing anything (benchmarks)."""

    def __init__(self, reactor: Any = None) -> None:
        pass

    def handle(self, entries: list[Entry]) -> None:
        return None


BUILTINS: dict[str, Callable[..., Any]] = {"log": LogHandler, "noop": NoopHandler}

# Built-in exporters and the risk consumer, imported only when configured (kafka and parquet
# need optional extras):
# name -> ("package.module:attr", the pip extra that provides its dependencies or None).
LAZY_BUILTINS: dict[str, tuple[str, str | None]] = {
    "file": ("payflux.exporters.file:FileExporter", None),
    "webhook": ("payflux.exporters.webhook:WebhookExporter", None),
    "kafka": ("payflux.exporters.kafka:KafkaExporter", "kafka"),
    "parquet": ("payflux.exporters.warehouse:ParquetExporter", "warehouse"),
    "risk": ("payflux.risk.handler:RiskHandler", None),
}


def _check_options(spec: str, factory: Callable[..., Any], options: dict) -> None:
    """
    Options the factory's signature can't take, or required ones missing: one line naming the
    option and the known ones (instead of Python's ``__init__() got an unexpected keyword
    argument``).  A factory taking ``**options`` checks its own (the exporters, risk).
    """
    try:
        params = list(inspect.signature(factory).parameters.values())
    except (TypeError, ValueError):  # a builtin or C callable without a signature: let it say
        return
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    named = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "reactor"]
    known = ", ".join(p.name for p in named) or "none"
    for key in options:
        if key not in {p.name for p in named}:
            raise ValueError(f"unknown option {key!r} for handler {spec} (known: {known})")
    for p in named:
        if p.default is p.empty and p.name not in options:
            raise ValueError(f"missing option {p.name!r} for handler {spec} (known: {known})")


def load_handler(spec: str, options: dict, reactor: Any) -> Any:
    """
    Build the handler named by ``spec``: a key of :data:`BUILTINS` or ``package.module:attr``;
    the factory is called as ``factory(reactor=reactor, **options)``.  Any failure is a
    ValueError with a one-line message naming ``spec`` (an option the factory's signature has
    no parameter for, or a required one missing: ``unknown option 'urll' for handler webhook
    (known: url, secret, ...)``).
    """
    extra = None
    if spec in BUILTINS:
        factory = BUILTINS[spec]
    else:
        target = spec
        if spec in LAZY_BUILTINS:
            target, extra = LAZY_BUILTINS[spec]
        module_name, sep, attr = target.partition(":")
        if not sep or not module_name or not attr:
            raise ValueError(
                f"handler {spec!r}: not a built-in ({', '.join(sorted([*BUILTINS, *LAZY_BUILTINS]))})"
                " nor 'package.module:attr'"
            )
        try:
            module = importlib.import_module(module_name)
        except Exception as e:
            hint = f" (install the extra: pip install 'payflux[{extra}]')" if extra and isinstance(e, ImportError) else ""
            raise ValueError(
                f"handler {spec!r}: cannot import {module_name}: {type(e).__name__}: {e}{hint}"
            ) from None
        factory = module
        for part in attr.split("."):
            factory = getattr(factory, part, None)
            if factory is None:
                raise ValueError(f"handler {spec!r}: {module_name} has no attribute {attr}")
        if not callable(factory):
            raise ValueError(f"handler {spec!r}: {attr} is not callable")
    options = dict(options or {})
    _check_options(spec, factory, options)
    try:
        handler = factory(reactor=reactor, **options)
    except Exception as e:
        raise ValueError(f"handler {spec!r}: building it failed: {type(e).__name__}: {e}") from None
    if not callable(getattr(handler, "handle", None)):
        raise ValueError(f"handler {spec!r}: the factory returned {type(handler).__name__}, which has no handle()")
    return handler


class HandlerError(ValueError):
    """A consumer's handler can't be imported or built: one line, ``invalid [[consumers]] 'name': ...``."""


def build_handlers(consumers: Iterable[Any], reactor: Any, prebuilt: dict[str, Any] | None = None) -> dict[str, Any]:
    """
    ``{consumer name: handler}`` for ``consumers`` (:class:`~payflux.consumers.config.ConsumerConfig`):
    the handler ``prebuilt`` has for a name (tests), else :func:`load_handler`'s.  The first one
    that fails raises :class:`HandlerError` naming the consumer (``payflux:`` + it is the startup
    error line, exit 2).  Building starts nothing: threads and the like wait for ``start()``.
    """
    prebuilt = prebuilt or {}
    handlers: dict[str, Any] = {}
    for consumer in consumers:
        handler = prebuilt.get(consumer.name)
        if handler is None:
            try:
                handler = load_handler(consumer.handler, consumer.options, reactor)
            except ValueError as e:
                raise HandlerError(f"invalid [[consumers]] {consumer.name!r}: {e}") from None
        handlers[consumer.name] = handler
    return handlers
