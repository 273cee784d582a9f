"""
A whole node with the consumers role: events posted over HTTP reach a configured handler, are
acked, failing ones reach the DLQ, and the consumer metrics show it.
"""

from __future__ import annotations

import json
import shutil
import tempfile

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial import unittest

from payflux.cli import sample_event
from tests.support import handlers
from tests.support.node import start_node
from tests.support.process import kill_embedded_redis
from tests.support.redis import redis_test_cases

BATCH = "/v1/events/payment_exhaust/batch"


def _config(key: str, **extra) -> str:
    lines = [
        'roles = ["ingest", "consumers"]',
        "[[consumers]]",
        'name = "rec"',
        'group = "recorders"',
        'handler = "tests.support.handlers:RecordingHandler"',
        "block_ms = 200",
    ]
    lines += [f"{k} = {json.dumps(v)}" for k, v in extra.items()]
    lines.append(f'options = {{ key = "{key}", fail_types = ["payment_disputed"] }}')
    return "\n".join(lines) + "\n"


class ConsumerNodeMixin:
    @inlineCallbacks
    def wait_for(self, predicate, timeout: float = 10.0):
        for _ in range(int(timeout / 0.05)):
            if predicate():
                return
            yield deferLater(reactor, 0.05, lambda: None)
        self.fail("condition not reached in time")

    @inlineCallbacks
    def test_posted_events_are_handled_acked_and_counted(self):
        redis = self.start_redis()
        key = f"{self.id()}"
        node = yield start_node(self, redis.url, config_text=_config(key))
        events = [sample_event(n) for n in range(20)]
        response = yield node.post(BATCH, "\n".join(json.dumps(e) for e in events), "application/x-ndjson")
        self.assertEqual(response.code, 202)
        yield self.wait_for(lambda: len(handlers.SEEN[key]) == 20)
        self.assertEqual({e.event_id for e in handlers.SEEN[key]}, {e["event_id"] for e in events})
        yield self.wait_for(lambda: redis.sync_command("XPENDING", "payflux:{0}:events", "recorders")[0] == 0)
        yield deferLater(reactor, 0.5, lambda: None)  # a stats sample
        text = yield (yield node.get("/metrics", side=True)).text()
        self.assertIn('payflux_consumer_processed_total{consumer="rec",group="recorders"} 20.0', text)
        self.assertIn('payflux_consumer_acked_total{consumer="rec",group="recorders"} 20.0', text)
        self.assertIn('payflux_group_pending{group="recorders",partition="0"} 0.0', text)
        self.assertIn('payflux_group_lag{group="recorders",partition="0"} 0.0', text)

    @inlineCallbacks
    def test_failing_events_reach_the_dlq_after_max_deliveries(self):
        redis = self.start_redis()
        key = f"{self.id()}"
        node = yield start_node(
            # min_idle_ms 500, not 50: a delivery slowed by a loaded box must not be reclaimed mid-flight
            self, redis.url, config_text=_config(key, max_deliveries=2, min_idle_ms=500, reclaim_interval=0.1)
        )
        good, bad = sample_event(1), sample_event(2, event_type="payment_disputed")
        response = yield node.post(BATCH, json.dumps(good) + "\n" + json.dumps(bad), "application/x-ndjson")
        self.assertEqual(response.code, 202)
        yield self.wait_for(lambda: redis.sync_command("XLEN", "payflux:{0}:dlq") == 1)
        record = redis.sync_command("XRANGE", "payflux:{0}:dlq", "-", "+")[0][1]
        fields = {k.decode(): v.decode() for k, v in zip(record[::2], record[1::2])}
        self.assertEqual((fields["event_id"], fields["group"], fields["error_class"]),
                         (bad["event_id"], "recorders", "RuntimeError"))
        self.assertEqual(fields["deliveries"], "2")
        self.assertEqual([e.event_id for e in handlers.SEEN[key]], [good["event_id"]])
        yield self.wait_for(lambda: redis.sync_command("XPENDING", "payflux:{0}:events", "recorders")[0] == 0)


redis_test_cases(ConsumerNodeMixin, globals())


class EmbeddedSamplingTests(unittest.TestCase):
    @inlineCallbacks
    def test_redis_up_is_sampled_as_soon_as_the_pool_connects(self):
        # the embedded Redis: the timer's first pass runs before it is up, its next is a minute away
        data_dir = tempfile.mkdtemp(prefix="pf-")  # short: the unix socket path has a length limit
        self.addCleanup(shutil.rmtree, data_dir, True)
        self.addCleanup(kill_embedded_redis, data_dir)  # only if the node's own stop didn't
        node = yield start_node(self, None, data_dir=data_dir, stats_interval=60)
        for _ in range(200):
            if node.metrics.redis_up._value.get() == 1:
                break
            yield deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(node.metrics.redis_up._value.get(), 1)
