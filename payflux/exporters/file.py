"""
The ``file`` exporter: payment events as NDJSON, one canonical JSON object per line, for a log
shipper (Vector, Fluent Bit, Filebeat) to tail.

Line shape (``v`` 1; keys sorted, no whitespace, UTF-8, one ``\\n`` after each object)::

    {"event":{...},"event_id":"evt_1","partition":0,"received_at":1700000000000,
     "stream_id":"1700000000000-0","type":"payment_failed","v":1}

``event`` is the event object exactly as stored in the stream; ``received_at`` is Unix epoch
milliseconds (the stream's field); ``stream_id`` + ``partition`` locate the entry.  Nothing
delivery-specific (such as the delivery count) is in a line, so an event exported twice (the
runtime is at-least-once) is the same line twice: deduplicate downstream on ``event_id``.

Delivery: ``handle()`` writes the whole batch with one ``write(2)`` on an ``O_APPEND`` file
descriptor and, with ``fsync = "always"``, waits for ``fsync(2)`` before the batch is
acknowledged.  If a write fails part-way (disk full), the file is truncated back to where the
batch started, so no half line is ever left for the shipper; the batch stays pending and is
written again later.  ``fsync`` policies (what an acknowledged event survives):

- ``always``: fsynced before the ack; survives a crash of PayFlux, the kernel or the machine.
- ``interval``: in the kernel page cache at the ack, fsynced every ``fsync_interval`` seconds;
  a power loss or kernel crash can lose the last ``fsync_interval`` seconds of acked events.
- ``never``: in the page cache at the ack, flushed when the kernel decides (typically within
  30 s); survives a PayFlux crash, not a power loss.

Rotation: :meth:`FileExporter.reopen` (and SIGHUP, for logrotate's ``postrotate``) opens
``path`` anew and switches writing to it; the previous descriptor is closed only after the
batches written to it were fsynced (per policy).  Writes happen on the reactor thread and the
reopen does too, so every batch lands entirely in the old file or entirely in the new one:
nothing is lost or written twice by a rotation.  SIGHUP is handled by the node that runs the
exporter (:class:`payflux.node.ReopenOnSighup`: installed while the node runs, in the main
thread, as under ``twistd``), which calls :func:`reopen_all` on the reactor thread: every file
exporter of the process not yet closed (the registry they join when built) reopens its file.

Threads: writes are done on the reactor thread (they go to the page cache: microseconds for
a batch), fsyncs in the reactor's thread pool (``fsync_thread``, default true), because a flush
can stall for long on a busy disk and the reactor also serves ingest.  Concurrent batches share
one fsync (group commit).  ``bench/exporters.py`` measures both choices.

A file deleted (not renamed) under a running exporter is noticed before the next batch and
recreated.  Exactly one exporter (one process) should write one ``path``; ``path = "-"`` writes to
standard output (no fsync, no reopen; under ``twistd -n`` also give ``--logfile``, or the logs
go to stdout too).
"""

from __future__ import annotations

import os
import stat
import weakref
from typing import Any

from twisted.internet import defer, task, threads
from twisted.logger import Logger
from twisted.python.failure import Failure

from payflux.consumers.handlers import Entry
from payflux.exporters.metrics import ExporterStats
from payflux.exporters.records import ndjson_lines

log = Logger()

FSYNC_POLICIES = ("always", "interval", "never")
STDOUT = "-"


def _parse_mode(value: Any) -> int:
    if isinstance(value, str):
        try:
            value = int(value, 8)
        except ValueError:
            raise ValueError(f"mode must be an octal file mode such as \"0600\", not {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0o777:
        raise ValueError(f"mode must be a file mode from 0 to 0o777 (e.g. 0o600), not {value!r}")
    return value


def _parse_positive(name: str, value: Any, upper: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= upper:
        raise ValueError(f"{name} must be a number of seconds above 0 and at most {upper:g}, not {value!r}")
    return float(value)


class _OpenFile:
    """
    One open descriptor and its fsync bookkeeping.  ``written`` counts batches written,
    ``synced`` the batches covered by the last successful fsync; waiters are woken in order.
    Only one fsync runs at a time; batches written meanwhile share the next one.
    """

    def __init__(self, fd: int, path: str, regular: bool, sync: Any, owned: bool = True) -> None:
        self.fd = fd
        self.path = path
        self.regular = regular  # fsync and truncate only regular files (not pipes, ttys)
        self.owned = owned  # False for standard output: never closed
        self._sync = sync  # fd -> Deferred firing after fsync(fd)
        self.written = 0
        self.synced = 0
        self._waiters: list[tuple[int, defer.Deferred]] = []
        self._syncing = False
        self.closed = False

    def write(self, data: bytes) -> int:
        """Write all of ``data`` or nothing (partial writes are truncated away); the batch's sequence number."""
        start = os.fstat(self.fd).st_size if self.regular else 0
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self.fd, view):]
        except OSError:
            if self.regular and len(view) != len(data):
                try:
                    os.ftruncate(self.fd, start)
                except OSError:
                    log.failure("could not truncate a partial batch off {path}", path=self.path)
            raise
        self.written += 1
        return self.written

    def sync_upto(self, seq: int) -> defer.Deferred:
        """Fires once batch ``seq`` is fsynced (immediately if it already is or can't be: pipes, ttys)."""
        if not self.regular or self.synced >= seq:
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        self._waiters.append((seq, d))
        self._kick()
        return d

    def _kick(self) -> None:
        if self._syncing or not self._waiters:
            return
        self._syncing = True
        target = self.written
        d = self._sync(self.fd)

        def settle(result: Any) -> None:
            self._syncing = False
            ok = not isinstance(result, Failure)
            if ok:
                self.synced = max(self.synced, target)
            ready = [(s, w) for s, w in self._waiters if s <= target]
            self._waiters = [(s, w) for s, w in self._waiters if s > target]
            for _, w in ready:
                w.callback(None) if ok else w.errback(result)
            self._kick()

        d.addBoth(settle)

    def close(self, final_sync: bool) -> defer.Deferred:
        """Fsync what was written since the last fsync (if ``final_sync``), then close the descriptor."""
        if self.closed or not self.owned:
            return defer.succeed(None)
        if final_sync:
            d = self.sync_upto(self.written)
        elif self._syncing:  # never close a descriptor a thread is fsyncing
            d = defer.Deferred()
            self._waiters.insert(0, (0, d))
        else:
            d = defer.succeed(None)

        def close(_: Any) -> None:
            if not self.closed:
                self.closed = True
                os.close(self.fd)

        def close_anyway(failure: Any) -> Any:
            close(None)
            return failure

        return d.addCallbacks(close, close_anyway)


class FileExporter:
    """
    NDJSON file/stdout exporter; see the module docstring for the line shape and guarantees.

    Options (``[[consumers]] options``): ``path`` (required; ``"-"`` = stdout), ``mode``
    (of a file it creates; default ``0o600``, applied exactly, regardless of the umask),
    ``fsync`` (``"always"`` | ``"interval"`` | ``"never"``), ``fsync_interval`` (seconds,
    for ``"interval"``), ``fsync_thread`` (fsync in the reactor's thread pool; default true).
    """

    exporter = "file"

    def __init__(
        self,
        reactor: Any,
        path: Any = None,
        mode: Any = 0o600,
        fsync: Any = "always",
        fsync_interval: Any = 1.0,
        fsync_thread: Any = True,
    ) -> None:
        if not isinstance(path, str) or not path:
            raise ValueError("path is required: a file path, or \"-\" for standard output")
        if path != STDOUT:
            path = os.path.abspath(path)
            directory = os.path.dirname(path)
            if not os.path.isdir(directory):
                raise ValueError(f"path: directory {directory} does not exist")
            if os.path.isdir(path):
                raise ValueError(f"path: {path} is a directory")
            if not os.access(directory, os.W_OK | os.X_OK) and not os.path.exists(path):
                raise ValueError(f"path: directory {directory} is not writable")
        self.mode = _parse_mode(mode)
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync must be one of {', '.join(FSYNC_POLICIES)}, not {fsync!r}")
        self.fsync_interval = _parse_positive("fsync_interval", fsync_interval, 3600)
        if not isinstance(fsync_thread, bool):
            raise ValueError(f"fsync_thread must be true or false, not {fsync_thread!r}")
        self.reactor = reactor
        self.path = path
        self.fsync = fsync
        self.fsync_thread = fsync_thread
        self.stats = ExporterStats.unbound(self.exporter)
        self._current: _OpenFile | None = None
        self._retired: set[_OpenFile] = set()
        self._reopen_wanted = False
        self._closed = False
        self._timer: task.LoopingCall | None = None
        if path != STDOUT:
            _EXPORTERS.add(self)  # reopened on SIGHUP (reopen_all) until closed

    def bind_metrics(self, metrics: Any, consumer: str) -> None:
        self.stats = metrics.exporters.stats(self.exporter, consumer)

    # -- the handler protocol ------------------------------------------------------------------

    def handle(self, entries: list[Entry]) -> defer.Deferred | None:
        """Write the batch (all of it, on this reactor turn); fires after the fsync its policy asks for."""
        if not entries:
            return None
        if self._closed:
            raise RuntimeError(f"file exporter for {self.path} is closed")
        try:
            data = ndjson_lines(entries)
            if self._reopen_wanted or self._unlinked():
                self.reopen()
            f = self._file()
            seq = f.write(data)
        except Exception:
            self.stats.failed.inc(len(entries))
            raise
        if self.fsync != "always":
            self.stats.succeeded(len(entries), self.reactor.seconds())
            return None
        d = f.sync_upto(seq)

        def synced(_: Any) -> None:
            self.stats.succeeded(len(entries), self.reactor.seconds())

        def failed(failure: Any) -> Any:
            self.stats.failed.inc(len(entries))
            log.error("fsync of {path} failed: {error}; the batch stays pending", path=f.path,
                      error=failure.getErrorMessage())
            return failure

        return d.addCallbacks(synced, failed)

    def close(self) -> defer.Deferred:
        """Fsync (unless ``never``) and close the file; called once by the runtime on shutdown."""
        self._closed = True
        _EXPORTERS.discard(self)
        if self._timer is not None and self._timer.running:
            self._timer.stop()
        current, self._current = self._current, None
        closing = [self._close(f) for f in [*self._retired, *([current] if current else [])]]
        return defer.DeferredList(closing, consumeErrors=True).addCallback(lambda _: None)

    # -- rotation ------------------------------------------------------------------------------

    def reopen(self) -> defer.Deferred:
        """
        Reopen ``path`` (after logrotate renamed it): later batches go to the new file; the old
        descriptor closes once the batches written to it are fsynced.  Fires when it is closed.
        If ``path`` can't be opened now, writing continues to the old file and the reopen is
        tried again before the next batch.
        """
        if self.path == STDOUT or self._closed or self._current is None:
            return defer.succeed(None)
        try:
            return self._reopen_now()
        except OSError as e:
            self._reopen_wanted = True
            log.error("reopening {path} failed ({error}); still writing to the previous file, retrying "
                      "at the next batch", path=self.path, error=str(e))
            return defer.succeed(None)

    def _reopen_now(self) -> defer.Deferred:
        old = self._current
        self._current = self._open()
        self._reopen_wanted = False
        log.info("reopened {path}", path=self.path)
        if old is None:
            return defer.succeed(None)
        return self._close(old)

    def _close(self, f: _OpenFile) -> defer.Deferred:
        self._retired.add(f)
        d = f.close(final_sync=self.fsync != "never")
        d.addErrback(lambda failure: log.error("closing {path} failed: {error}", path=f.path,
                                               error=failure.getErrorMessage()))
        d.addBoth(lambda _: self._retired.discard(f))
        return d

    # -- files ---------------------------------------------------------------------------------

    def _file(self) -> _OpenFile:
        if self._current is None:
            self._current = self._open()
            if self.fsync == "interval" and self._timer is None:
                self._timer = task.LoopingCall(self._sync_current)
                self._timer.clock = self.reactor
                self._timer.start(self.fsync_interval, now=False)
        return self._current

    def _open(self) -> _OpenFile:
        if self.path == STDOUT:
            return _OpenFile(1, STDOUT, False, self._fsync, owned=False)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC
        try:
            fd = os.open(self.path, flags)
        except FileNotFoundError:
            fd = os.open(self.path, flags | os.O_CREAT, self.mode)
            os.fchmod(fd, self.mode)  # exactly ``mode``, whatever the umask
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
        return _OpenFile(fd, self.path, regular, self._fsync)

    def _unlinked(self) -> bool:
        """True if the open file was deleted (not renamed): lines written to it would reach no one."""
        f = self._current
        return f is not None and f.regular and os.fstat(f.fd).st_nlink == 0

    def _fsync(self, fd: int) -> defer.Deferred:
        if self.fsync_thread:
            return threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), os.fsync, fd)
        try:
            os.fsync(fd)
        except OSError:
            return defer.fail()
        return defer.succeed(None)

    def _sync_current(self) -> defer.Deferred | None:
        f = self._current
        if f is None or f.synced >= f.written:
            return None
        d = f.sync_upto(f.written)
        d.addErrback(lambda failure: log.error(
            "periodic fsync of {path} failed: {error}; acknowledged events may not be on disk",
            path=f.path, error=failure.getErrorMessage()))
        return d


# -- SIGHUP: the registry of file exporters the node's SIGHUP handler reopens ---------------------
# (the handler itself is payflux.node.ReopenOnSighup: installed in its startService, the previous
# one restored in its stopService; this module never touches signal handlers)

_EXPORTERS: "weakref.WeakSet[FileExporter]" = weakref.WeakSet()


def reopens_on_sighup(handler: Any) -> bool:
    """True for a file exporter writing to a file (not standard output) and not closed yet."""
    return handler in _EXPORTERS


def reopen_all() -> defer.Deferred:
    """Reopen the file of every open file exporter of this process (what SIGHUP does)."""
    exporters = list(_EXPORTERS)
    log.info("reopening {count} export file(s)", count=len(exporters))
    return defer.DeferredList([e.reopen() for e in exporters], consumeErrors=True)

