"""
The node's log output: JSON or text lines, a level, Twisted's chatter and repeated lines tamed.

``payflux serve`` and ``twistd -n payflux`` log through :func:`build_observer`, chosen by the
settings ``log_format`` (``auto``: JSON lines unless stdout is a terminal, ``json``, ``text``),
``log_level`` (``debug``/``info``/``warn``/``error``) and ``log_summary_interval``
(:mod:`payflux.observability.logsummary`).  An explicit ``twistd --logger`` wins;
``--logger=payflux.observability.logs.json_observer`` (older units) is JSON with the level.

JSON lines hold ``time`` (RFC 3339 UTC), ``level``, ``namespace``, ``message`` (the formatted
event) and the event's own structured fields, minus twisted.logger internals.  Exceptions add
``failure`` (the traceback as text).  Fields are whatever the code logs: PayFlux never logs
event payloads or secrets, only ids, counts, reasons and key ids.

Below ``debug``: Twisted's "Starting factory"/"Stopping factory" lines (one per connection
attempt), "reactor class" and "(TCP Port N Closed)".  Summarised like PayFlux's own repeated
lines: ClientService's "Scheduling retry" (every pooled Redis connection, every attempt),
txredisapi's "Discarding dead connection.", the writer's "redis unavailable" and the script
reloads after a Redis restart (:data:`payflux.redis.scripts.LOAD_LINE`).
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from typing import IO

from twisted.logger import (FilteringLogObserver, ILogFilterPredicate, ILogObserver, PredicateResult,
                            formatEvent, textFileLogObserver)
from zope.interface import implementer, provider

from payflux.observability import logsummary
from payflux.redis import scripts

_SKIP = {"log_logger", "log_source", "log_format", "log_level", "log_namespace", "log_time", "log_failure",
         "log_io", "log_text", "log_system", "log_flattened", "log_trace", "log_legacy", "message", "format",
         "isError", "system", "time", "why", "failure"}


def event_to_json(event: dict) -> str:
    level = event.get("log_level")
    doc = {
        "time": datetime.fromtimestamp(event.get("log_time", 0), timezone.utc).isoformat(timespec="milliseconds"),
        "level": getattr(level, "name", "info"),
        "namespace": event.get("log_namespace", ""),
        "message": formatEvent(event),
    }
    for key, value in event.items():
        if key in _SKIP or key.startswith("_"):
            continue
        doc[key] = value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)
    failure = event.get("log_failure")
    if failure is not None:
        doc["failure"] = failure.getTraceback()
    return json.dumps(doc, default=repr)


def json_observer_for(stream: IO[str]):
    @provider(ILogObserver)
    def observe(event: dict) -> None:
        stream.write(event_to_json(event) + "\n")
        stream.flush()

    return observe


FORMATS = ("auto", "json", "text")
LEVELS = ("debug", "info", "warn", "error")
_RANK = {"debug": 0, "info": 1, "warn": 2, "error": 3, "critical": 4}


def resolve_format(log_format: str, stream: IO[str]) -> str:
    """``json`` or ``text``: ``auto`` is JSON unless ``stream`` is a terminal."""
    if log_format != "auto":
        return log_format
    isatty = getattr(stream, "isatty", None)
    try:
        return "text" if isatty is not None and isatty() else "json"
    except ValueError:  # a closed stream
        return "json"


def is_chatter(event: dict) -> bool:
    """Twisted's info lines that say nothing an operator needs (shown at ``log_level = debug`` only)."""
    fmt = event.get("log_format") or ""
    if fmt.startswith(("Starting factory", "Stopping factory", "reactor class:")):
        return True
    text = event.get("log_text") if fmt == "{log_text}" else None  # legacy log.msg()
    return isinstance(text, str) and text.startswith("(") and text.endswith(" Closed)") and " Port " in text


def repeated_kind(event: dict) -> str | None:
    """The kind of a repeated line logged outside PayFlux's own RepeatedLog call sites, if it is one."""
    fmt = event.get("log_format") or ""
    if fmt.startswith("Scheduling retry "):  # twisted ClientService: each pooled connection, each attempt
        return "connect retry"
    if fmt == "{log_text}" and event.get("log_text") == "Discarding dead connection.":  # txredisapi
        return "dead connection"
    if event.get("log_namespace") == "payflux.streams.writer" and fmt.startswith("redis unavailable,"):
        return "redis unavailable"
    if fmt == scripts.LOAD_LINE:  # once per connection and script after a Redis restart
        return "script reload"
    return None


@implementer(ILogFilterPredicate)
class LevelPredicate:
    """Events at ``level`` or above pass, except Twisted's chatter (debug only)."""

    def __init__(self, level: str):
        if level not in _RANK:
            raise ValueError(f"log level must be one of {', '.join(LEVELS)}, got {level!r}")
        self.minimum = _RANK[level]

    def __call__(self, event: dict) -> PredicateResult:
        if self.minimum == 0:
            return PredicateResult.yes
        if is_chatter(event):
            return PredicateResult.no
        level = getattr(event.get("log_level"), "name", "info")
        return PredicateResult.yes if _RANK.get(level, 1) >= self.minimum else PredicateResult.no


@implementer(ILogObserver)
class RepeatSummarizer:
    """Passes events on to ``observer``, summarising the :func:`repeated_kind` ones with counts."""

    def __init__(self, observer, interval: float | None = None, clock=None):
        self.observer = observer
        self.interval = interval
        self.clock = clock
        self._kinds: dict[str, logsummary.RepeatedLog] = {}

    def __call__(self, event: dict) -> None:
        kind = repeated_kind(event)
        if kind is None:
            self.observer(event)
            return
        repeated = self._kinds.get(kind)
        if repeated is None:
            repeated = self._kinds[kind] = logsummary.RepeatedLog(kind, self.interval, self.clock)
        repeated.observe(event, self.observer)


def build_observer(log_format: str, stream: IO[str], level: str = "info", interval: float | None = None,
                   clock=None):
    """The node's observer: ``log_format`` lines on ``stream``, ``level`` and above, repeats summarised."""
    fmt = resolve_format(log_format, stream)
    inner = json_observer_for(stream) if fmt == "json" else textFileLogObserver(stream)
    return FilteringLogObserver(RepeatSummarizer(inner, interval, clock), [LevelPredicate(level)])


class _Configured:
    level = "info"


_configured = _Configured()


def configure(level: str | None = None, summary_interval: float | None = None) -> None:
    """The settings' ``log_level`` and ``log_summary_interval``, for observers made by twistd's ``--logger``."""
    if level is not None:
        LevelPredicate(level)  # validates
        _configured.level = level
    if summary_interval is not None:
        logsummary.configure(interval=summary_interval)


def json_observer():
    """Factory named by ``twistd --logger``: JSON lines on standard output, at the configured level."""
    return build_observer("json", sys.stdout, _configured.level)


def text_observer():
    """Factory named by ``twistd --logger``: text lines on standard output, at the configured level."""
    return build_observer("text", sys.stdout, _configured.level)
