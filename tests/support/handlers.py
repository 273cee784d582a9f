"""Handlers for node-level consumer tests, loaded by ``package.module:attr`` like a user's."""

from __future__ import annotations

from typing import Any

from payflux.consumers.handlers import EntriesFailed

SEEN: dict[str, list] = {}


class RecordingHandler:
    """Records every entry it handles under ``SEEN[key]``; fails event types listed in ``fail_types``."""

    def __init__(self, reactor: Any, key: str, fail_types: tuple = ()):
        self.key = key
        self.fail_types = set(fail_types)
        SEEN.setdefault(key, [])

    def handle(self, entries):
        failures = {e.stream_id: RuntimeError("boom") for e in entries if e.type in self.fail_types}
        SEEN[self.key].extend(e for e in entries if e.stream_id not in failures)
        if failures:
            raise EntriesFailed(failures)
