"""GroupStatsSampler: consumer-group gauges from real Redis 6.2 and 7.x, interval on a Clock."""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from twisted.internet import task
from twisted.internet.defer import inlineCallbacks

from payflux.consumers.stats import GroupStatsSampler
from payflux.observability.metrics import ConsumerMetrics
from payflux.redis.connect import connect
from payflux.redis.target import parse_redis_url
from payflux.streams.keys import StreamKeys
from tests.support.redis import redis_test_cases

KEYS = StreamKeys("payflux")
STREAM = KEYS.events(0)


class StatsMixin:
    def setUp(self):
        self.server = self.start_redis()
        self.redis = connect(parse_redis_url(self.server.url), poolsize=1, connect_timeout=2.0, reply_timeout=5.0)
        self.addCleanup(self.redis.disconnect)
        self.registry = CollectorRegistry()
        self.metrics = ConsumerMetrics(self.registry)
        self.clock = task.Clock()
        self.clock.advance(1100)
        self.sampler = GroupStatsSampler(self.redis, KEYS, 1, self.metrics, self.clock, interval=5.0)

    def value(self, name: str, **labels):
        return self.registry.get_sample_value(name, {"partition": "0", **labels})

    def cmd(self, *args):
        return self.server.sync_command(*args)

    def add(self, seconds: range) -> None:
        for s in seconds:
            self.cmd("XADD", STREAM, f"{s * 1000}-0", "v", "1", "event_id", f"e{s}", "type", "t",
                     "received_at", str(s * 1000), "data", "{}")

    @inlineCallbacks
    def test_gauges_set_and_removed(self):
        self.add(range(1000, 1010))
        self.cmd("XGROUP", "CREATE", STREAM, "g", "0")
        self.cmd("XREADGROUP", "GROUP", "g", "c", "COUNT", "4", "STREAMS", STREAM, ">")
        self.cmd("XACK", STREAM, "g", "1000000-0")
        self.cmd("XADD", KEYS.dlq(0), "*", "original_id", "1-0")
        yield self.sampler.sample_once()
        self.assertEqual(self.value("payflux_group_lag", group="g"), 6)
        self.assertEqual(self.value("payflux_group_pending", group="g"), 3)
        self.assertEqual(self.value("payflux_group_oldest_pending_age_seconds", group="g"), 99.0)
        self.assertEqual(self.value("payflux_dlq_depth"), 1)

        # nothing pending: the age is absent (not 0); pending is a real 0
        self.cmd("XACK", STREAM, "g", "1001000-0", "1002000-0", "1003000-0")
        yield self.sampler.sample_once()
        self.assertIsNone(self.value("payflux_group_oldest_pending_age_seconds", group="g"))
        self.assertEqual(self.value("payflux_group_pending", group="g"), 0)

        # lag that can't be known is absent, never 0: 7.x reports nil after an XDEL in the unread
        # range, and counting is capped at max_scan entries per side
        self.cmd("XDEL", STREAM, "1008000-0")
        self.sampler.max_scan = 2
        yield self.sampler.sample_once()
        self.assertIsNone(self.value("payflux_group_lag", group="g"))
        self.sampler.max_scan = 10_000
        yield self.sampler.sample_once()
        self.assertEqual(self.value("payflux_group_lag", group="g"), 5)

        # a deleted group disappears from every gauge
        self.cmd("XGROUP", "DESTROY", STREAM, "g")
        yield self.sampler.sample_once()
        self.assertIsNone(self.value("payflux_group_lag", group="g"))
        self.assertIsNone(self.value("payflux_group_pending", group="g"))

    @inlineCallbacks
    def test_unreadable_partition_removes_its_gauges_and_the_loop_goes_on(self):
        self.add(range(1000, 1003))
        self.cmd("XGROUP", "CREATE", STREAM, "g", "0")
        self.sampler.startService()
        self.addCleanup(self.sampler.stopService)
        yield self.sampler._pass
        self.assertEqual(self.value("payflux_group_lag", group="g"), 3)
        self.cmd("DEL", STREAM)
        self.cmd("SET", STREAM, "not a stream")
        self.clock.advance(5)
        yield self.sampler._pass
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.assertIsNone(self.value("payflux_group_lag", group="g"))
        self.assertIsNone(self.value("payflux_group_pending", group="g"))
        self.assertIsNone(self.value("payflux_dlq_depth"))
        self.cmd("DEL", STREAM)
        self.add(range(1000, 1002))
        self.cmd("XGROUP", "CREATE", STREAM, "g", "0")
        self.clock.advance(5)
        yield self.sampler._pass
        self.assertEqual(self.value("payflux_group_lag", group="g"), 2)
        self.assertEqual(self.value("payflux_dlq_depth"), 0)

    @inlineCallbacks
    def test_group_idle_gauge(self):
        self.add(range(1000, 1003))
        self.cmd("XGROUP", "CREATE", STREAM, "read", "0")
        self.cmd("XGROUP", "CREATE", STREAM, "unread", "0")
        self.cmd("XREADGROUP", "GROUP", "read", "c", "COUNT", "1", "STREAMS", STREAM, ">")
        yield self.sampler.sample_once()
        idle = self.value("payflux_group_idle_seconds", group="read")
        self.assertIsNotNone(idle)
        self.assertTrue(0 <= idle < 10, idle)
        self.assertIsNone(self.value("payflux_group_idle_seconds", group="unread"))  # no consumers: absent
        self.cmd("XGROUP", "DESTROY", STREAM, "read")
        yield self.sampler.sample_once()
        self.assertIsNone(self.value("payflux_group_idle_seconds", group="read"))

    def test_idle_warning_gauge_carries_the_option(self):
        """PayfluxConsumerGroupStale compares against it: default a day, else the node's option."""
        self.assertEqual(self.registry.get_sample_value("payflux_group_idle_warning_seconds"), 86400.0)
        registry = CollectorRegistry()
        GroupStatsSampler(self.redis, KEYS, 1, ConsumerMetrics(registry), self.clock, idle_warning=600.0)
        self.assertEqual(registry.get_sample_value("payflux_group_idle_warning_seconds"), 600.0)


redis_test_cases(StatsMixin, globals())
