"""JSON log lines: one object per line with the structured fields."""

from __future__ import annotations

import io
import json

from twisted.logger import Logger, LogLevel
from twisted.trial.unittest import SynchronousTestCase

from payflux.observability.logs import json_observer_for


class JsonLogTests(SynchronousTestCase):
    def test_one_object_per_line_with_fields(self):
        out = io.StringIO()
        log = Logger(namespace="payflux.test", observer=json_observer_for(out))
        log.info("appended {count} events", count=3, key_id="producer-a")
        log.warn("redis {state}", state="down\nnext line")
        lines = out.getvalue().splitlines()
        self.assertEqual(len(lines), 2)
        first, second = (json.loads(line) for line in lines)
        self.assertEqual(first["message"], "appended 3 events")
        self.assertEqual((first["level"], first["namespace"]), ("info", "payflux.test"))
        self.assertEqual((first["count"], first["key_id"]), (3, "producer-a"))
        self.assertTrue(first["time"].endswith("+00:00"))
        self.assertEqual(second["level"], "warn")

    def test_failures_carry_the_traceback(self):
        out = io.StringIO()
        log = Logger(namespace="payflux.test", observer=json_observer_for(out))
        try:
            1 / 0
        except ZeroDivisionError:
            log.failure("step failed", level=LogLevel.error)
        doc = json.loads(out.getvalue())
        self.assertEqual(doc["level"], "error")
        self.assertIn("ZeroDivisionError", doc["failure"])
