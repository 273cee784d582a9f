"""
Property tests of the HTTP layer: whatever JSON (or bytes) a producer sends, the answer is a
2xx or a JSON 4xx naming the problem, never a 5xx or a traceback.  The app runs in memory
(treq's StubTreq) with a recording writer; the real writer is covered against real Redis in
test_writer.py and test_ingest.py.
"""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from treq.testing import StubTreq
from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from payflux.cli import sample_event
from payflux.events import EventValidator, ValidationPolicy
from payflux.ingest.app import IngestApp, IngestLimits
from payflux.ingest.auth import Authenticator
from payflux.ingest.ratelimit import RateLimiter
from payflux.observability.metrics import Metrics
from payflux.streams.writer import AppendResult

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=20), children, max_size=6),
    max_leaves=30,
)
event_fields = list(sample_event())
mutated_events = st.builds(
    lambda overrides, drop: {k: v for k, v in {**sample_event(), **overrides}.items() if k not in drop},
    st.dictionaries(st.sampled_from(event_fields + ["extra", ""]), json_values, max_size=4),
    st.sets(st.sampled_from(event_fields), max_size=3),
)


class RecordingWriter:
    def __init__(self):
        self.calls = []

    def append(self, events, received_at_ms):
        self.calls.append(events)
        return succeed([AppendResult(f"1-{i}", False) for i, _ in enumerate(events)])


class HttpPropertyTests(SynchronousTestCase):
    def setUp(self):
        clock = Clock()
        clock.advance(1_780_000_000)
        self.writer = RecordingWriter()
        app = IngestApp(
            validator=EventValidator(ValidationPolicy(), now=clock.seconds),
            writer=self.writer,
            authenticator=Authenticator([], dev_mode=True),
            limiter=RateLimiter(0, 1, clock.seconds),
            metrics=Metrics(),
            limits=IngestLimits(65536, 1 << 20, 100, 10_000, 1.0),
            ping=lambda: succeed("PONG"),
            seconds=clock.seconds,
        )
        self.stub = StubTreq(app.resource())

    def post(self, path: str, body: bytes, content_type: str = "application/json"):
        d = self.stub.post("http://payflux" + path, data=body, headers={"Content-Type": [content_type]})
        self.stub.flush()
        response = self.successResultOf(d)
        raw = self.successResultOf(response.content())
        return response.code, raw

    def check(self, code: int, raw: bytes):
        self.assertLess(code, 500, raw)
        doc = json.loads(raw)
        if code >= 400:
            self.assertIn(code, (400, 409, 413, 415, 422, 429))
            self.assertIsInstance(doc["error"], str)
            self.assertIsInstance(doc["message"], str)
        else:
            self.assertEqual(code, 202)

    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(json_values)
    def test_any_json_single(self, value):
        code, raw = self.post("/v1/events/payment_exhaust", json.dumps(value).encode())
        self.check(code, raw)
        self.assertIn(code, (400, 422))  # never valid: 422, or 400 for numbers past the size limit

    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(mutated_events)
    def test_mutated_events_single(self, event):
        before = len(self.writer.calls)
        code, raw = self.post("/v1/events/payment_exhaust", json.dumps(event).encode())
        self.check(code, raw)
        self.assertEqual(len(self.writer.calls) - before, 1 if code == 202 else 0)

    @settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.lists(mutated_events | json_values, min_size=1, max_size=5))
    def test_batches_are_all_or_nothing(self, items):
        before = len(self.writer.calls)
        body = "\n".join(json.dumps(i) for i in items).encode()
        code, raw = self.post("/v1/events/payment_exhaust/batch", body, "application/x-ndjson")
        self.check(code, raw)
        if code == 202:
            self.assertEqual(len(self.writer.calls[-1]), len(items))
        else:
            self.assertEqual(len(self.writer.calls), before)

    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.binary(max_size=300))
    def test_any_bytes(self, body):
        for path, ctype in [("/v1/events/payment_exhaust", "application/json"),
                            ("/v1/events/payment_exhaust/batch", "application/x-ndjson"),
                            ("/v1/events/payment_exhaust/batch", "application/json")]:
            code, raw = self.post(path, body, ctype)
            self.check(code, raw)
