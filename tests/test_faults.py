"""
Redis killed in the middle of a load: every request gets a 202 or a quick 503, never a hang,
and every event that got a 202 is in the stream after Redis restarts from its AOF.
"""

from __future__ import annotations

import json
import time

from twisted.internet import reactor
from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.internet.task import deferLater

from payflux.cli import sample_event
from tests.support.node import read_json, start_node
from tests.support.redis import redis_test_cases

SINGLE = "/v1/events/payment_exhaust"
BATCH = "/v1/events/payment_exhaust/batch"


class RedisKilledUnderLoadMixin:
    @inlineCallbacks
    def test_no_acknowledged_event_is_lost(self):
        redis = self.start_redis(appendonly=True, appendfsync="always")
        node = yield start_node(self, redis.url, redis_timeout="0.5")
        acknowledged: dict[str, str] = {}  # event_id -> stream id
        statuses: dict[int, int] = {}
        slowest = [0.0]

        @inlineCallbacks
        def one(n: int):
            event = sample_event(n)
            started = time.monotonic()
            if n % 4 == 0:
                events = [event] + [sample_event(n * 100 + i) for i in range(1, 5)]
                response = yield node.post(BATCH, "\n".join(json.dumps(e) for e in events),
                                           "application/x-ndjson")
            else:
                events = [event]
                response = yield node.post(SINGLE, event)
            slowest[0] = max(slowest[0], time.monotonic() - started)
            statuses[response.code] = statuses.get(response.code, 0) + 1
            body = yield read_json(response)
            if response.code == 202:
                ids = [body["id"]] if "id" in body else [r["id"] for r in body["results"]]
                for e, stream_id in zip(events, ids):
                    acknowledged[e["event_id"]] = stream_id
            else:
                self.assertEqual(response.code, 503, body)

        n = 0
        for wave in range(30):
            if wave == 8:
                redis.kill()
            if wave == 16:
                redis.start()
            yield gatherResults([one(n + i) for i in range(16)])
            n += 16
            yield deferLater(reactor, 0.05, lambda: None)

        self.assertGreater(statuses.get(503, 0), 0, statuses)
        self.assertGreater(statuses.get(202, 0), 0, statuses)
        self.assertLess(slowest[0], 3.0)  # bounded by redis_timeout, never a hang
        entries = redis.sync_command("XRANGE", "payflux:{0}:events", "-", "+")
        stored = {}
        for stream_id, fields in entries:
            fields = dict(zip(fields[::2], fields[1::2]))
            stored[fields[b"event_id"].decode()] = stream_id.decode()
        lost = {eid for eid in acknowledged if stored.get(eid) != acknowledged[eid]}
        self.assertEqual(lost, set(), f"{len(lost)} acknowledged events missing after restart")
        self.assertEqual(len(set(stored)), len(entries))  # no event appended twice


redis_test_cases(RedisKilledUnderLoadMixin, globals())
