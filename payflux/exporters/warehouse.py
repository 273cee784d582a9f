"""
The warehouse exporter: built-in handler ``parquet`` (extra ``warehouse`` = pyarrow).

Contract (docs/exporters.md, "Parquet (warehouse)"):

- Rows have the fixed, typed schema :data:`SCHEMA`: one column per event field of
  docs/events.md (the seed's 15 fields in the seed's order, then PayFlux's 4 additions;
  strings, ``event_timestamp`` as a UTC millisecond timestamp, integers as int32) plus
  ``stream_id``, ``stream_partition`` and ``received_at``.  An absent optional field, or ``""``
  (``layout = "seed"`` stores every seed field), is null.  Entries written before the seed
  schema fill ``event_timestamp`` from ``occurred_at`` and ``payment_method_bucket`` from
  ``payment_method`` (:data:`LEGACY_NAMES`).  An entry whose event doesn't fit (missing required
  field, wrong type) fails alone (EntriesFailed: reclaimed, then dead-lettered); the others are
  written.
- Files: ``<directory>/dt=YYYY-MM-DD/part-<UTC roll time>-<random>.parquet``, ``dt`` being the
  UTC date of ``received_at`` (Hive-style, so BigQuery, Snowflake, DuckDB, Spark pick the date
  up as a partition column).  Written as ``.part-....parquet.tmp`` in the same directory (a
  dot file with a ``.tmp`` suffix: ignored by ``*.parquet`` globs and by Hive-style readers),
  fsynced, renamed with ``os.replace`` (atomic), then the directory is fsynced.  A crash at any
  point leaves either no file or a complete one under a ``.parquet`` name.
- Rows are buffered in memory (Arrow record batches) and a file is written ("rolled") when
  the buffer holds ``max_rows`` rows (a batch is split so no file has more), when the oldest
  row is ``max_age`` seconds old (the reactor's clock), when ``max_batches`` handle() calls
  have rows in it, at reactor shutdown and on close().
- At-least-once: handle() fires only once every row of its batch is in a renamed, fsynced
  file.  So a batch waits for its roll, and the runtime holds up to ``concurrency`` batches:
  ``max_batches`` = the consumer's ``concurrency`` rolls as soon as the runtime can't hand over
  another batch, instead of idling until ``max_age``.  ``max_age`` must stay well below the
  consumer's ``min_idle_ms`` (a held batch is otherwise reclaimed while held: duplicates).
- Off the reactor thread (the reactor's thread pool): building a batch's Arrow rows (~2-6 us
  per row of Python, so a 10,000-row batch would stall the reactor 20-30 ms) and writing files
  (write + 2 fsyncs: 1.5-60 ms measured, unbounded on a slow disk).  Only the bookkeeping of
  segments, timers and Deferreds runs on the reactor.
- At reactor shutdown (SIGTERM) the buffer is written at once and later batches roll as they
  arrive, so held batches complete within the runtime's grace period and are acknowledged.
"""

from __future__ import annotations

import datetime
import os
import time
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.failure import Failure

from payflux.consumers.handlers import EntriesFailed, Entry
from payflux.exporters.metrics import ExporterStats

log = Logger()

_TS = pa.timestamp("ms", tz="UTC")
_INT32 = (-(2**31), 2**31 - 1)
# (column, Arrow type, nullable); the seed's 15 fields in its order, PayFlux's 4 additions, then the stream's
EVENT_COLUMNS: tuple[tuple[str, pa.DataType, bool], ...] = (
    ("event_type", pa.string(), False),
    ("event_timestamp", _TS, False),
    ("event_id", pa.string(), False),
    ("merchant_id_hash", pa.string(), True),
    ("payment_intent_id_hash", pa.string(), True),
    ("processor", pa.string(), False),
    ("failure_category", pa.string(), True),
    ("retry_count", pa.int32(), False),  # absent means 0 (docs/events.md)
    ("geo_bucket", pa.string(), True),
    ("amount_bucket", pa.string(), True),
    ("system_source", pa.string(), True),
    ("payment_method_bucket", pa.string(), True),
    ("channel", pa.string(), True),
    ("retry_result", pa.string(), True),
    ("failure_origin", pa.string(), True),
    ("customer_id_hash", pa.string(), True),
    ("currency", pa.string(), True),
    ("failure_code", pa.string(), True),
    ("processor_latency_ms", pa.int32(), True),
)
#: Column -> the name it had before the seed schema, read from entries that lack the column.
LEGACY_NAMES = {"event_timestamp": "occurred_at", "payment_method_bucket": "payment_method"}
STREAM_COLUMNS: tuple[tuple[str, pa.DataType, bool], ...] = (
    ("stream_id", pa.string(), False),       # Redis stream entry id, unique within stream_partition
    ("stream_partition", pa.int32(), False),  # not "partition": a reserved word in BigQuery and Snowflake SQL
    ("received_at", _TS, False),              # when PayFlux accepted the event; dt=... is its UTC date
)
SCHEMA_ID = "payment_exhaust/2"  # /1: PayFlux's pre-seed columns (occurred_at, payment_method)
SCHEMA = pa.schema(
    [pa.field(name, type_, nullable=nullable) for name, type_, nullable in EVENT_COLUMNS + STREAM_COLUMNS],
    metadata={"payflux.schema": SCHEMA_ID},
)
COMPRESSIONS = ("snappy", "zstd", "gzip", "none")
OPTIONS = ("directory", "max_rows", "max_age", "max_batches", "compression", "file_mode")
_EPOCH_ORDINAL = datetime.date(1970, 1, 1).toordinal()
_EVENT_CHECKS = tuple((name, type_ == pa.int32(), nullable, LEGACY_NAMES.get(name))
                      for name, type_, nullable in EVENT_COLUMNS)
_TIMESTAMP = [name for name, _, _ in EVENT_COLUMNS].index("event_timestamp")


class RowRejected(Exception):
    """The entry's event doesn't fit :data:`SCHEMA`; str() names the column and the rule, never the value."""


class WriteFailed(Exception):
    """Writing, fsyncing or renaming the file that would hold the entry failed; str() says why."""


def _check_options(options: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"unknown option {unknown[0]!r}; known: {', '.join(OPTIONS)}")
    out: dict[str, Any] = {}
    directory = options.get("directory")
    if not isinstance(directory, str) or not directory:
        raise ValueError("option directory is required (the directory that receives dt=YYYY-MM-DD/*.parquet)")
    out["directory"] = os.path.abspath(directory)

    def integer(name: str, default: int, lo: int, hi: int) -> int:
        value = options.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise ValueError(f"option {name} must be an integer from {lo} to {hi}")
        return value

    out["max_rows"] = integer("max_rows", 100_000, 1, 10_000_000)
    out["max_batches"] = integer("max_batches", 1, 0, 10_000)
    mode = options.get("file_mode", 0o640)
    if isinstance(mode, str) and 3 <= len(mode) <= 4 and all(c in "01234567" for c in mode):
        mode = int(mode, 8)  # "0640", as file permissions are usually written
    if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o777:
        raise ValueError("option file_mode must be file permissions: an octal integer (0o640) or string (\"0640\")")
    out["file_mode"] = mode
    max_age = options.get("max_age", 10.0)
    if isinstance(max_age, bool) or not isinstance(max_age, (int, float)) or not 0 < max_age <= 86_400:
        raise ValueError("option max_age must be a number of seconds, more than 0 and at most 86400")
    out["max_age"] = float(max_age)
    compression = options.get("compression", "snappy")
    if compression not in COMPRESSIONS:
        raise ValueError(f"option compression must be one of {', '.join(COMPRESSIONS)}")
    out["compression"] = compression
    return out


def rows_of(entries: list[Entry]) -> tuple[pa.RecordBatch | None, list[tuple[int, str]], dict]:
    """
    The entries as one record batch of :data:`SCHEMA`: ``(batch or None, keys of its rows in
    order, failures)``, keys and failures by ``(partition, stream_id)``.
    """
    columns: list[list] = [[] for _ in range(len(SCHEMA))]
    keys: list[tuple[int, str]] = []
    failures: dict[tuple[int, str], BaseException] = {}
    for e in entries:
        key = (e.partition, e.stream_id)
        event = e.event
        row = []
        problem = None
        for name, is_int, nullable, legacy in _EVENT_CHECKS:
            value = event.get(name)
            if (value is None or value == "") and legacy is not None:
                value = event.get(legacy)
            if value is None or value == "":  # "": an absent field of layout = "seed"
                value = None
                if name == "retry_count":
                    value = 0
                elif not nullable:
                    problem = f"{name}: required"
                    break
            elif is_int:
                if type(value) is not int or not _INT32[0] <= value <= _INT32[1]:
                    problem = f"{name}: must be a 32-bit integer"
                    break
            elif type(value) is not str:  # strings and event_timestamp (parsed below, per column)
                problem = f"{name}: must be a string"
                break
            row.append(value)
        if problem is not None:
            failures[key] = RowRejected(problem)
            continue
        row.extend((e.stream_id, e.partition, e.received_at_ms))
        for column, value in zip(columns, row):
            column.append(value)
        keys.append(key)
    stamp = _TIMESTAMP
    try:
        stamps = pa.array(columns[stamp], pa.string()).cast(_TS)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        # rare: find the rows whose event_timestamp isn't an RFC 3339 timestamp, drop them, retry
        bad = set()
        for i, text in enumerate(columns[stamp]):
            try:
                pa.array([text], pa.string()).cast(_TS)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                bad.add(i)
        for i in bad:
            failures[keys[i]] = RowRejected("event_timestamp: must be an RFC 3339 timestamp")
        keep = [i for i in range(len(keys)) if i not in bad]
        columns = [[column[i] for i in keep] for column in columns]
        keys = [keys[i] for i in keep]
        stamps = pa.array(columns[stamp], pa.string()).cast(_TS)
    if not keys:
        return None, keys, failures
    arrays = [stamps if i == stamp else pa.array(column, field.type)
              for i, (column, field) in enumerate(zip(columns, SCHEMA))]
    return pa.RecordBatch.from_arrays(arrays, schema=SCHEMA), keys, failures


def _fsync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_directory(path: str) -> None:
    """mkdir -p whose new directory entries are durable (each created level's parent fsynced)."""
    if os.path.isdir(path):
        return
    parent = os.path.dirname(path)
    _make_directory(parent)
    try:
        os.mkdir(path)
    except FileExistsError:
        return
    _fsync_directory(parent)


def write_files(table: pa.Table, directory: str, name: str, compression: str, mode: int) -> list[str]:
    """
    Write ``table`` as one durable Parquet file per UTC date of ``received_at`` under
    ``directory/dt=YYYY-MM-DD/name.parquet`` (temp file, fsync, rename, fsync the directory);
    returns the paths.  Runs in a thread.  On any error the temp file is removed and nothing
    is left under a ``.parquet`` name for this call's failed date.
    """
    days = pc.divide(table.column("received_at").cast(pa.int64()), 86_400_000)
    unique_days = sorted(pc.unique(days).to_pylist())
    paths = []
    for day in unique_days:
        part = table if len(unique_days) == 1 else table.filter(pc.equal(days, day))
        dt = datetime.date.fromordinal(_EPOCH_ORDINAL + day).isoformat()
        where = os.path.join(directory, f"dt={dt}")
        _make_directory(where)
        temp = os.path.join(where, f".{name}.parquet.tmp")
        final = os.path.join(where, f"{name}.parquet")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        try:
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), mode)  # exactly ``mode``, whatever the umask
                pq.write_table(part, f, compression=compression)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temp, final)
        except BaseException:
            try:
                os.unlink(temp)
            except OSError:
                pass
            raise
        _fsync_directory(where)
        paths.append(final)
    return paths


class _Segment:
    """The rows of one future file (one per date at roll time) and the batches waiting for it."""

    __slots__ = ("batches", "rows", "waiters", "timer", "opened_at")

    def __init__(self, opened_at: float) -> None:
        self.batches: list[pa.RecordBatch] = []
        self.rows = 0
        self.waiters: list[defer.Deferred] = []
        self.timer: Any = None
        self.opened_at = opened_at


class ParquetExporter:
    """See the module docstring.  ``ParquetExporter(reactor=reactor, directory=..., max_rows=..., ...)``."""

    name = "parquet"

    def __init__(self, reactor: Any, **options: Any) -> None:
        settings = _check_options(options)
        self.reactor = reactor
        self.directory: str = settings["directory"]
        self.max_rows: int = settings["max_rows"]
        self.max_age: float = settings["max_age"]
        self.max_batches: int = settings["max_batches"]
        self.compression: str = settings["compression"]
        self.file_mode: int = settings["file_mode"]
        try:
            _make_directory(self.directory)
        except OSError as e:
            raise ValueError(f"option directory: can't create {self.directory}: {e.strerror}") from None
        if not os.access(self.directory, os.W_OK | os.X_OK):
            raise ValueError(f"option directory: {self.directory} is not writable")
        self.stats = ExporterStats.unbound(self.name)
        self._current: _Segment | None = None
        self._building: set[defer.Deferred] = set()  # rows_of() calls in the thread pool
        self._writing: set[defer.Deferred] = set()  # write_files() calls in the thread pool
        self._closed = False
        self._draining = False  # once the reactor shuts down, every batch rolls at once
        add_trigger = getattr(reactor, "addSystemEventTrigger", None)
        # SIGTERM: write what is buffered at once, so held batches finish within the runtime's grace
        self._trigger = add_trigger("before", "shutdown", self.drain) if add_trigger else None

    def bind_metrics(self, metrics: Any, consumer: str) -> None:
        self.stats = metrics.exporters.stats(self.name, consumer)

    # -- handle ------------------------------------------------------------------------------

    @property
    def buffered_rows(self) -> int:
        """Rows waiting for the next roll."""
        return self._current.rows if self._current is not None else 0

    def handle(self, entries: list[Entry]) -> defer.Deferred:
        if self._closed:
            raise RuntimeError("the parquet exporter is closed")
        redelivered = sum(1 for e in entries if e.deliveries > 1)
        if redelivered:
            self.stats.retried.inc(redelivered)
        # ~2-6 us per row of GIL-bound Python: in a thread the reactor still gets the GIL every
        # switch interval instead of stalling for a whole large batch
        d = threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), rows_of, entries)
        self._building.add(d)
        d.addBoth(self._built, d)
        d.addCallback(self._buffer)
        done: defer.Deferred = defer.Deferred()  # unfired until the rows are durable (d is merely paused)
        d.chainDeferred(done)
        return done

    def _built(self, result: Any, d: defer.Deferred) -> Any:
        self._building.discard(d)
        return result

    def _buffer(self, built: tuple[pa.RecordBatch | None, list[tuple[int, str]], dict]) -> defer.Deferred | None:
        """Add a batch's rows to the open file(s); fires once every row is in a durable file."""
        batch, keys, failures = built
        if batch is None:
            if failures:
                self.stats.failed.inc(len(failures))
                raise EntriesFailed(failures)
            return None
        parts: list[tuple[defer.Deferred, list[tuple[int, str]]]] = []
        offset = 0
        while offset < batch.num_rows:
            segment = self._current or self._open()
            take = min(batch.num_rows - offset, self.max_rows - segment.rows)
            segment.batches.append(batch.slice(offset, take))
            segment.rows += take
            waiter: defer.Deferred = defer.Deferred()
            segment.waiters.append(waiter)
            parts.append((waiter, keys[offset:offset + take]))
            offset += take
            if (segment.rows >= self.max_rows or self._draining
                    or (self.max_batches and len(segment.waiters) >= self.max_batches)):
                self.roll()
        d = defer.DeferredList([w for w, _ in parts], consumeErrors=True)
        d.addCallback(self._outcome, [k for _, k in parts], failures)
        return d

    def _outcome(self, results: list[tuple[bool, Any]], parts: list[list], failures: dict) -> None:
        for (ok, result), part_keys in zip(results, parts):
            if not ok:
                error = WriteFailed(result.getErrorMessage())
                for key in part_keys:
                    failures[key] = error
        if failures:
            self.stats.failed.inc(len(failures))
            raise EntriesFailed(failures)

    # -- rolling -----------------------------------------------------------------------------

    def _open(self) -> _Segment:
        segment = _Segment(self.reactor.seconds())
        segment.timer = self.reactor.callLater(self.max_age, self._roll_segment, segment)
        self._current = segment
        return segment

    def roll(self) -> None:
        """Write the buffered rows now (no-op when nothing is buffered)."""
        if self._current is not None:
            self._roll_segment(self._current)

    def drain(self) -> None:
        """Write what is buffered, and from now on every batch as soon as it arrives (shutdown)."""
        self._draining = True
        self.roll()

    def _roll_segment(self, segment: _Segment) -> None:
        if segment is self._current:
            self._current = None
        if segment.timer is not None and segment.timer.active():
            segment.timer.cancel()
        table = pa.Table.from_batches(segment.batches, schema=SCHEMA)
        stamp = datetime.datetime.fromtimestamp(self.reactor.seconds(), datetime.timezone.utc)
        name = f"part-{stamp:%Y%m%dT%H%M%S}Z-{uuid.uuid4().hex[:16]}"
        started = time.perf_counter()
        d = threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), write_files, table,
                                      self.directory, name, self.compression, self.file_mode)
        self._writing.add(d)
        d.addBoth(self._written, d, segment, started)

    def _written(self, result: Any, d: defer.Deferred, segment: _Segment, started: float) -> None:
        self._writing.discard(d)
        if isinstance(result, Failure):
            log.error("parquet: writing {rows} rows under {directory} failed: {error}; their entries stay "
                      "pending", rows=segment.rows, directory=self.directory, error=result.getErrorMessage())
            for waiter in segment.waiters:
                waiter.errback(result)
            return
        self.stats.succeeded(segment.rows, self.reactor.seconds())
        log.debug("parquet: wrote {rows} rows to {paths} in {seconds:.3f}s", rows=segment.rows, paths=result,
                  seconds=time.perf_counter() - started)
        for waiter in segment.waiters:
            waiter.callback(result)

    # -- close -------------------------------------------------------------------------------

    def close(self) -> defer.Deferred:
        """Write what is buffered (after the batches still being built) and wait for every write."""
        self._closed = True
        if self._trigger is not None:
            self.reactor.removeSystemEventTrigger(self._trigger)
            self._trigger = None
        return defer.ensureDeferred(self._close())

    async def _close(self) -> None:
        self._draining = True
        await defer.DeferredList(list(self._building), consumeErrors=True)
        self.roll()
        await defer.DeferredList(list(self._writing), consumeErrors=True)
