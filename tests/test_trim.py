"""Retention (TrimService) against real Redis 6.2 and 7.x servers, time driven by a Clock."""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from twisted.internet import task
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from payflux.consumers.config import RetentionConfig
from payflux.consumers.trim import TrimService
from payflux.observability.metrics import ConsumerMetrics
from payflux.redis.connect import connect
from payflux.redis.target import parse_redis_url
from payflux.streams.keys import StreamKeys
from tests.support.redis import redis_test_cases

KEYS = StreamKeys("payflux")
STREAM = KEYS.events(0)
DLQ = KEYS.dlq(0)
NO_LIMITS = dict(max_age=0, max_length=0, hard_cap=0, dlq_max_age=0, dlq_max_length=0)


def add_entries(server, key: str, seconds: range) -> list[str]:
    """XADD one v1 entry per second in ``seconds`` with id ``<s*1000>-0``; returns the ids."""
    ids = []
    for s in seconds:
        ids.append(server.sync_command("XADD", key, f"{s * 1000}-0", "v", "1", "event_id", f"e{s}",
                                       "type", "payment_failed", "received_at", str(s * 1000),
                                       "data", "{}").decode())
    return ids


def stream_ids(server, key: str) -> list[str]:
    return [e[0].decode() for e in server.sync_command("XRANGE", key, "-", "+")]


def slow_group(server) -> None:
    """
    100 entries (seconds 1000..1099).  Group ``slow`` got the first 30 delivered and acked all of
    them except 1020 and 1025 (pending); 70 were never delivered.  Group ``fast`` has everything
    delivered and acked.  Safe floor = 1020000-0.
    """
    add_entries(server, STREAM, range(1000, 1100))
    server.sync_command("XGROUP", "CREATE", STREAM, "slow", "0")
    server.sync_command("XGROUP", "CREATE", STREAM, "fast", "0")
    delivered = server.sync_command("XREADGROUP", "GROUP", "slow", "c1", "COUNT", "30", "STREAMS", STREAM, ">")
    ids = [e[0].decode() for e in delivered[0][1]]
    server.sync_command("XACK", STREAM, "slow", *[i for i in ids if i not in ("1020000-0", "1025000-0")])
    everything = server.sync_command("XREADGROUP", "GROUP", "fast", "c2", "STREAMS", STREAM, ">")
    server.sync_command("XACK", STREAM, "fast", *[e[0] for e in everything[0][1]])


class TrimMixin:
    def setUp(self):
        self.server = self.start_redis()
        self.redis = connect(parse_redis_url(self.server.url), poolsize=2, connect_timeout=2.0, reply_timeout=10.0)
        self.addCleanup(self.redis.disconnect)
        self.metrics = ConsumerMetrics(CollectorRegistry())
        self.clock = task.Clock()
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def service(self, **retention) -> TrimService:
        config = RetentionConfig(**{**NO_LIMITS, "interval": 30.0, **retention})
        return TrimService(config, self.redis, KEYS, 1, self.metrics, self.clock)

    def counter(self, metric) -> float:
        return metric.labels(partition="0")._value.get()

    @inlineCallbacks
    def test_age_and_length_never_pass_the_floor(self):
        slow_group(self.server)
        self.clock.advance(10_000)  # now = 10000 s: every entry is older than max_age
        yield self.service(max_age=60).trim_once()
        ids = stream_ids(self.server, STREAM)
        self.assertEqual(ids[0], "1020000-0")
        self.assertEqual(len(ids), 80)
        yield self.service(max_length=5).trim_once()
        self.assertEqual(len(stream_ids(self.server, STREAM)), 80)
        self.assertEqual(self.counter(self.metrics.trimmed), 20)
        self.assertEqual(self.counter(self.metrics.lost_unconsumed), 0)

    @inlineCallbacks
    def test_length_trim_below_the_floor(self):
        slow_group(self.server)
        yield self.service(max_length=90).trim_once()  # keeps the newest 90: removes 1000..1009
        self.assertEqual(stream_ids(self.server, STREAM)[0], "1010000-0")
        self.assertEqual(self.counter(self.metrics.trimmed), 10)

    @inlineCallbacks
    def test_floor_from_a_group_that_read_nothing(self):
        add_entries(self.server, STREAM, range(1000, 1010))
        self.server.sync_command("XGROUP", "CREATE", STREAM, "new", "0")
        self.clock.advance(10_000)
        yield self.service(max_age=1, max_length=1).trim_once()
        self.assertEqual(len(stream_ids(self.server, STREAM)), 10)

    @inlineCallbacks
    def test_hard_cap_counts_the_loss_exactly_and_logs_it(self):
        slow_group(self.server)
        svc = self.service(hard_cap=50)
        svc.hard_cap_chunk = 7  # several Lua calls, one total
        yield svc.trim_once()
        ids = stream_ids(self.server, STREAM)
        self.assertEqual((len(ids), ids[0]), (50, "1050000-0"))
        # removed 1000..1049: 1020 and 1025 pending in "slow", 1030..1049 never delivered to it
        self.assertEqual(self.counter(self.metrics.lost_unconsumed), 22)
        self.assertEqual(self.counter(self.metrics.trimmed), 50)
        [line] = [e for e in self.events if e.get("event") == "trim_hard_cap_loss"]
        self.assertEqual((line["lost"], line["removed"], line["first_id"], line["last_id"], line["stream"]),
                         (22, 50, "1000000-0", "1049000-0", STREAM))

    @inlineCallbacks
    def test_soft_trims_then_hard_cap(self):
        slow_group(self.server)
        self.clock.advance(10_000)
        yield self.service(max_age=60, hard_cap=50).trim_once()
        self.assertEqual(stream_ids(self.server, STREAM)[0], "1050000-0")
        self.assertEqual(self.counter(self.metrics.trimmed), 50)
        self.assertEqual(self.counter(self.metrics.lost_unconsumed), 22)

    @inlineCallbacks
    def test_hard_cap_without_groups_loses_nothing(self):
        add_entries(self.server, STREAM, range(1000, 1020))
        yield self.service(hard_cap=5).trim_once()
        self.assertEqual(len(stream_ids(self.server, STREAM)), 5)
        self.assertEqual(self.counter(self.metrics.lost_unconsumed), 0)
        [line] = [e for e in self.events if e.get("event") == "trim_hard_cap_loss"]
        self.assertEqual(line["lost"], 0)

    @inlineCallbacks
    def test_no_groups_trims_freely(self):
        add_entries(self.server, STREAM, range(1000, 1100))
        yield self.service(max_length=10).trim_once()
        self.assertEqual(stream_ids(self.server, STREAM)[0], "1090000-0")
        self.clock.advance(1095 + 60)
        yield self.service(max_age=60).trim_once()  # cutoff 1095 s
        self.assertEqual(stream_ids(self.server, STREAM)[0], "1095000-0")
        self.assertEqual(self.counter(self.metrics.trimmed), 95)

    @inlineCallbacks
    def test_length_point_scans_in_pieces(self):
        add_entries(self.server, STREAM, range(1000, 1100))
        svc = self.service(max_length=10)
        svc.length_scan_limit = 40  # a big backlog shrinks over several passes
        yield svc.trim_once()
        self.assertEqual(len(stream_ids(self.server, STREAM)), 60)
        yield svc.trim_once()
        yield svc.trim_once()
        self.assertEqual(len(stream_ids(self.server, STREAM)), 10)

    @inlineCallbacks
    def test_dlq_retention(self):
        add_entries(self.server, DLQ, range(1000, 1020))
        self.clock.advance(1010 + 3600)
        yield self.service(dlq_max_age=3600).trim_once()  # removes 1000..1009
        self.assertEqual(stream_ids(self.server, DLQ)[0], "1010000-0")
        yield self.service(dlq_max_age=3600, dlq_max_length=3).trim_once()
        self.assertEqual(stream_ids(self.server, DLQ), ["1017000-0", "1018000-0", "1019000-0"])
        self.assertEqual(self.counter(self.metrics.trimmed), 0)  # the metric is about event streams
        self.assertEqual(sum(e["count"] for e in self.events if e.get("event") == "trim_dlq"), 17)

    @inlineCallbacks
    def test_clock_drives_the_interval_and_the_age_cutoff(self):
        add_entries(self.server, STREAM, range(1000, 1100))
        self.clock.advance(1550)
        svc = self.service(max_age=500, interval=30.0)
        svc.startService()
        self.addCleanup(svc.stopService)
        first = svc._pass
        yield first  # first pass at start: cutoff 1050 s
        self.assertEqual(stream_ids(self.server, STREAM)[0], "1050000-0")
        self.clock.advance(29)
        self.assertIs(svc._pass, first)  # no pass before the interval
        self.assertEqual(stream_ids(self.server, STREAM)[0], "1050000-0")
        self.clock.advance(1)  # now 1580: cutoff 1080 s
        yield svc._pass
        self.assertEqual(stream_ids(self.server, STREAM)[0], "1080000-0")
        yield svc.stopService()

    @inlineCallbacks
    def test_first_pass_waits_for_ready(self):
        add_entries(self.server, STREAM, range(1000, 1010))
        ready = Deferred()
        svc = self.service(max_length=2)
        svc.ready = lambda: ready
        svc.startService()
        self.addCleanup(svc.stopService)
        self.clock.advance(100)
        self.assertIsNone(svc._pass)
        ready.callback(None)
        yield svc._pass
        self.assertEqual(len(stream_ids(self.server, STREAM)), 2)

    @inlineCallbacks
    def test_errors_are_logged_and_the_loop_goes_on(self):
        self.server.sync_command("SET", STREAM, "not a stream")
        add_entries(self.server, DLQ, range(1000, 1010))
        svc = self.service(dlq_max_length=2, max_length=1)
        yield svc.trim_once()
        self.assertEqual(len(stream_ids(self.server, DLQ)), 2)  # the other step of the pass still ran
        self.assertEqual(len(self.flushLoggedErrors()), 1)
        self.server.sync_command("DEL", STREAM)
        add_entries(self.server, STREAM, range(1000, 1010))
        svc.startService()
        self.addCleanup(svc.stopService)
        yield svc._pass
        self.assertEqual(len(stream_ids(self.server, STREAM)), 1)


redis_test_cases(TrimMixin, globals())


class LostUnconsumedSeriesTests(SynchronousTestCase):
    def test_exposed_at_zero_per_partition_when_a_hard_cap_is_set(self):
        from payflux.observability.metrics import Metrics

        metrics = Metrics()
        TrimService(RetentionConfig(**{**NO_LIMITS, "hard_cap": 10}), None, KEYS, 3, metrics.consumers, task.Clock())
        text = metrics.render().decode()
        for p in range(3):
            self.assertIn(f'payflux_stream_lost_unconsumed_total{{partition="{p}"}} 0.0', text)
        other = Metrics()
        TrimService(RetentionConfig(**NO_LIMITS), None, KEYS, 3, other.consumers, task.Clock())
        self.assertNotIn("payflux_stream_lost_unconsumed_total{", other.render().decode())
