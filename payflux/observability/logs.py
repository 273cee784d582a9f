"""
JSON logs: one JSON object per line, via twisted.logger.

Use with ``twistd --logger payflux.observability.logs.json_observer -n payflux``.  Each line
holds ``time`` (RFC 3339 UTC), ``level``, ``namespace``, ``message`` (the formatted event) and
the event's own structured fields, minus twisted.logger internals.  Exceptions add ``failure``
(the traceback as text).  Fields are whatever the code logs: PayFlux never logs event
payloads or secrets, only ids, counts, reasons and key ids.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from typing import IO

from twisted.logger import ILogObserver, formatEvent
from zope.interface import provider

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


def json_observer():
    """Factory named by ``twistd --logger``: JSON lines on standard output."""
    return json_observer_for(sys.stdout)
