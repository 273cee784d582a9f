"""
Repeated log lines, summarised with counts.

A fault repeats one line many times a second: Redis down (every failed append, every reconnect
attempt of every pooled connection), a handler failing every entry, a flood of dead letters.
:class:`RepeatedLog` keeps one *kind* of line bounded: the first occurrence is logged at once,
then at most one line per ``interval`` seconds, ``"N more like this in the last Ts: <the last
one>"`` (with the last one's fields, plus ``repeated``, ``window`` and ``summary_of``).  An
``interval`` of 0 logs every line.

It never schedules timers of its own (so it can live at module level, in tests too): lines held
back are reported by the next occurrence once the interval is over, by :func:`flush_due` (which
:class:`SummaryFlusher` calls every second under ``twistd payflux`` / ``payflux serve``), or by
:func:`flush_all` at shutdown.  Defaults for instances created without an explicit interval or
clock come from :func:`configure` (``log_summary_interval``, set once at start).
"""

from __future__ import annotations

import threading
import time
import weakref
from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger, LogLevel, formatEvent

SUMMARY = "{repeated} more like this in the last {window:g}s: {last}"
DEFAULT_INTERVAL = 10.0

# event keys that belong to one event only (its text, traceback, legacy form), never copied
# from the last held-back event into a summary
_OWN_KEYS = frozenset({"log_format", "log_failure", "log_text", "log_io", "log_flattened", "log_trace",
                       "log_legacy", "log_time", "log_level", "message", "format", "failure", "isError",
                       "why", "time"})


class _MonotonicClock:
    @staticmethod
    def seconds() -> float:
        return time.monotonic()


class _Defaults:
    interval: float = DEFAULT_INTERVAL
    clock: Any = None


_defaults = _Defaults()
_instances: "weakref.WeakSet[RepeatedLog]" = weakref.WeakSet()


def configure(interval: float | None = None, clock: Any = None) -> tuple[float, Any]:
    """Set the defaults (interval in seconds, clock with ``seconds()``); returns the previous ones."""
    previous = (_defaults.interval, _defaults.clock)
    if interval is not None:
        _defaults.interval = float(interval)
    if clock is not None:
        _defaults.clock = clock
    return previous


def reset(previous: tuple[float, Any]) -> None:
    """Restore defaults returned by :func:`configure` (tests)."""
    _defaults.interval, _defaults.clock = previous


_shared: dict[str, "RepeatedLog"] = {}


def forget_shared() -> None:
    """Drop every process-wide :class:`RepeatedLog` of :func:`repeated` (tests: the next line of
    each kind is then written at once, to the logger its next caller passes)."""
    _shared.clear()


def repeated(kind: str, logger: Logger | None = None) -> "RepeatedLog":
    """The process-wide :class:`RepeatedLog` of ``kind`` (created on first use, default interval and clock)."""
    found = _shared.get(kind)
    if found is None:
        found = _shared.setdefault(kind, RepeatedLog(kind, logger=logger))
    return found


def flush_due() -> None:
    """Write the summary of every kind whose interval is over and that held lines back."""
    for repeated in list(_instances):
        repeated.flush_due()


def flush_all() -> None:
    """Write every pending summary now (shutdown)."""
    for repeated in list(_instances):
        repeated.flush()


class RepeatedLog:
    """
    One kind of repeated log line: the first at once, then one summary line per ``interval``.

    ``logger`` (default: a ``payflux.logsummary`` Logger) is where :meth:`emit` and its
    shortcuts write; :meth:`observe` summarises events logged elsewhere (a log observer).
    """

    def __init__(self, kind: str, interval: float | None = None, clock: Any = None,
                 logger: Logger | None = None):
        self.kind = kind
        self._interval = interval
        self._clock = clock
        self._logger = logger if logger is not None else Logger(namespace="payflux.logsummary")
        self._lock = threading.Lock()
        self._last_line: float | None = None  # when this kind last wrote a line
        self._held = 0  # occurrences since then, not written
        self._summarise: Callable[[int, float], None] | None = None  # writes the summary of the last held one
        _instances.add(self)

    @property
    def interval(self) -> float:
        return _defaults.interval if self._interval is None else self._interval

    def _now(self) -> float:
        return (self._clock or _defaults.clock or _MonotonicClock).seconds()

    @property
    def held(self) -> int:
        """Occurrences not written yet (reported by the next summary)."""
        return self._held

    # --- producing lines ---

    def emit(self, level: LogLevel, format: str, **fields: Any) -> bool:
        """Log ``format`` with ``fields`` at ``level`` now, or count it; True if it was written now."""
        logger = self._logger

        def write() -> None:
            logger.emit(level, format, **fields)

        def summarise(count: int, window: float) -> None:
            extra = {k: v for k, v in fields.items() if k not in ("repeated", "window", "last", "summary_of")}
            logger.emit(level, SUMMARY, repeated=count, window=window, summary_of=self.kind,
                        last=formatEvent({"log_format": format, **fields}), **extra)

        return self._offer(write, summarise)

    def debug(self, format: str, **fields: Any) -> bool:
        return self.emit(LogLevel.debug, format, **fields)

    def info(self, format: str, **fields: Any) -> bool:
        return self.emit(LogLevel.info, format, **fields)

    def warn(self, format: str, **fields: Any) -> bool:
        return self.emit(LogLevel.warn, format, **fields)

    def error(self, format: str, **fields: Any) -> bool:
        return self.emit(LogLevel.error, format, **fields)

    def observe(self, event: dict, forward: Callable[[dict], None]) -> bool:
        """Forward ``event`` (logged elsewhere) now, or count it; True if it was forwarded now."""

        def write() -> None:
            forward(event)

        def summarise(count: int, window: float) -> None:
            summary = {k: v for k, v in event.items() if k not in _OWN_KEYS}
            summary.update(log_format=SUMMARY, log_level=event.get("log_level", LogLevel.info),
                           log_time=time.time(), repeated=count, window=window, summary_of=self.kind,
                           last=formatEvent(event))
            forward(summary)

        return self._offer(write, summarise)

    # --- the window ---

    def _offer(self, write: Callable[[], None], summarise: Callable[[int, float], None]) -> bool:
        now = self._now()
        with self._lock:
            interval = self.interval
            due = self._last_line is None or interval <= 0 or now - self._last_line >= interval
            if not due:
                self._held += 1
                self._summarise = summarise
                return False
            held, since = self._held, self._last_line
            self._last_line, self._held, self._summarise = now, 0, None
        if held:
            # the interval is over with lines held back: one summary, this occurrence included
            summarise(held + 1, _window(now, since))
        else:
            write()
        return True

    def flush_due(self) -> None:
        """Write the summary if the interval is over and lines were held back."""
        now = self._now()
        with self._lock:
            if not self._held or self._last_line is None or now - self._last_line < self.interval:
                return
            action = self._take(now)
        action()

    def flush(self) -> None:
        """Write the summary of the lines held back now, whatever the interval (shutdown)."""
        now = self._now()
        with self._lock:
            if not self._held:
                return
            action = self._take(now)
        action()

    def _take(self, now: float) -> Callable[[], None]:
        held, since, summarise = self._held, self._last_line, self._summarise
        self._last_line, self._held, self._summarise = now, 0, None
        window = _window(now, since)
        return lambda: summarise(held, window)


def _window(now: float, since: float | None) -> float:
    return round(max(0.0, now - (since if since is not None else now)), 1)


class SummaryFlusher(Service):
    """Reports held-back lines within about a second of their interval ending; flushes all at stop."""

    def __init__(self, clock: Any, tick: float = 1.0):
        self.clock = clock
        self.tick = tick
        self._loop: LoopingCall | None = None

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(flush_due)
        self._loop.clock = self.clock
        self._loop.start(self.tick, now=False)

    def stopService(self):
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        flush_all()
