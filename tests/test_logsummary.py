"""RepeatedLog: the first line of a kind at once, then at most one summary line per interval."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from payflux.observability import logsummary
from payflux.observability.logsummary import RepeatedLog, SummaryFlusher
from tests.support.consumers import RedisFixture
from tests.support.redis import redis_test_cases


class RepeatedLogTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.events: list[dict] = []
        self.log = Logger(namespace="payflux.test", observer=self.events.append)

    def repeated(self, interval: float = 10.0) -> RepeatedLog:
        return RepeatedLog("append failed", interval=interval, clock=self.clock, logger=self.log)

    def lines(self) -> list[str]:
        return [formatEvent(e) for e in self.events]

    def test_first_at_once_then_one_summary_per_interval(self):
        r = self.repeated()
        self.assertTrue(r.warn("append failed: {reason}", reason="timeout 0", key_id="a"))
        for n in range(1, 50):
            self.clock.advance(0.1)
            self.assertFalse(r.warn("append failed: {reason}", reason=f"timeout {n}", key_id="a"))
        self.assertEqual(self.lines(), ["append failed: timeout 0"])
        self.assertEqual(r.held, 49)
        r.flush_due()  # 4.9 s in: the interval is not over
        self.assertEqual(len(self.events), 1)
        self.clock.advance(5.11)  # 10 s after the first line (float steps)
        r.flush_due()
        self.assertEqual(self.lines()[1], "49 more like this in the last 10s: append failed: timeout 49")
        summary = self.events[1]
        self.assertEqual((summary["repeated"], summary["window"], summary["summary_of"]), (49, 10.0, "append failed"))
        self.assertEqual((summary["key_id"], summary["log_level"], summary["log_namespace"]),
                         ("a", LogLevel.warn, "payflux.test"))
        r.flush_due()  # nothing held: nothing written
        self.assertEqual(len(self.events), 2)

    def test_a_new_burst_after_a_quiet_interval_logs_its_first_line_at_once(self):
        r = self.repeated()
        r.warn("x {n}", n=1)
        self.clock.advance(11)
        r.flush_due()
        self.assertTrue(r.warn("x {n}", n=2))
        self.assertEqual(self.lines(), ["x 1", "x 2"])

    def test_without_a_flusher_the_next_occurrence_reports_the_held_ones(self):
        r = self.repeated()
        r.warn("x {n}", n=1)
        self.clock.advance(1)
        r.warn("x {n}", n=2)
        r.warn("x {n}", n=3)
        self.clock.advance(29)
        self.assertTrue(r.warn("x {n}", n=4))  # the summary includes this one
        self.assertEqual(self.lines(), ["x 1", "3 more like this in the last 30s: x 4"])
        self.assertEqual(r.held, 0)

    def test_line_count_is_bounded_by_the_interval(self):
        r = self.repeated(interval=2.0)
        for _ in range(6000):  # 100 lines a second for 60 s
            r.warn("retry {n}", n=1)
            self.clock.advance(0.01)
            r.flush_due()
        r.flush()
        self.assertLessEqual(len(self.events), 1 + 60 / 2 + 1)
        total = 1 + sum(e.get("repeated", 0) for e in self.events[1:])
        self.assertEqual(total, 6000)  # every occurrence counted, none lost

    def test_flush_reports_what_is_held_at_once(self):
        r = self.repeated()
        r.error("x")
        r.error("x")
        r.flush()
        self.assertEqual(self.lines(), ["x", "1 more like this in the last 0s: x"])
        self.assertEqual(self.events[1]["log_level"], LogLevel.error)

    def test_interval_zero_logs_every_line(self):
        r = self.repeated(interval=0)
        for n in range(5):
            self.assertTrue(r.warn("x {n}", n=n))
        self.assertEqual(len(self.events), 5)

    def test_observe_summarises_events_logged_elsewhere(self):
        r = RepeatedLog("connect retry", interval=10, clock=self.clock)
        forwarded: list[dict] = []
        for n in range(1, 6):
            r.observe({"log_format": "Scheduling retry {attempt} in {delay} seconds.", "attempt": n, "delay": 1,
                       "log_level": LogLevel.info, "log_namespace": "twisted.application.internet.ClientService",
                       "log_failure": object()}, forwarded.append)
        self.clock.advance(10)
        r.flush_due()
        self.assertEqual([formatEvent(e) for e in forwarded],
                         ["Scheduling retry 1 in 1 seconds.",
                          "4 more like this in the last 10s: Scheduling retry 5 in 1 seconds."])
        self.assertNotIn("log_failure", forwarded[1])  # a summary never repeats a traceback
        self.assertEqual(forwarded[1]["log_namespace"], "twisted.application.internet.ClientService")

    def test_defaults_come_from_configure(self):
        previous = logsummary.configure(interval=5, clock=self.clock)
        self.addCleanup(logsummary.reset, previous)
        r = RepeatedLog("defaults", logger=self.log)
        r.warn("x")
        r.warn("x")
        self.clock.advance(5)
        logsummary.flush_due()
        self.assertEqual(self.lines(), ["x", "1 more like this in the last 5s: x"])

    def test_repeated_is_one_instance_per_kind(self):
        self.assertIs(logsummary.repeated("test kind", self.log), logsummary.repeated("test kind"))
        self.assertIsNot(logsummary.repeated("test kind"), logsummary.repeated("other test kind"))


class SummaryFlusherTests(SynchronousTestCase):
    def test_flushes_every_tick_and_everything_at_stop(self):
        clock = Clock()
        events: list[dict] = []
        r = RepeatedLog("flusher", interval=3, clock=clock, logger=Logger(observer=events.append))
        flusher = SummaryFlusher(clock)
        flusher.startService()
        r.warn("x")
        r.warn("x")
        clock.advance(1)
        clock.advance(1)
        self.assertEqual(len(events), 1)
        clock.advance(1)  # the interval is over: reported by the next tick
        self.assertEqual(formatEvent(events[1]), "1 more like this in the last 3s: x")
        r.warn("x")
        flusher.stopService()
        self.assertEqual(formatEvent(events[2]), "1 more like this in the last 0s: x")
        self.assertEqual(clock.getDelayedCalls(), [])


class DeadLetterFloodMixin(RedisFixture):
    """A flood of dead letters: one line, then one summary with the count (was one line each)."""

    DEAD_LETTERS = 1000

    async def test_a_flood_of_dead_letters_logs_two_lines(self):
        from twisted.internet import reactor
        from twisted.logger import globalLogPublisher

        from payflux.consumers.reclaim import ReclaimService
        from tests.support.consumers import KEYS, RecordingHandler, config, metric

        self.setup_redis()
        self.create_group()
        clock = Clock()
        self.addCleanup(logsummary.reset, logsummary.configure(clock=clock))
        for i in range(self.DEAD_LETTERS):
            self.server.sync_command("XADD", KEYS.events(0), "*", "v", "1", "event_id", f"e{i}", "type",
                                     "authorization", "received_at", "1700000000000", "data", '{"event_id":"e%d"}' % i)
        self.server.sync_command("XREADGROUP", "GROUP", "g", "crashed", "COUNT", str(self.DEAD_LETTERS), "STREAMS", KEYS.events(0), ">")
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        svc = ReclaimService(config(name="dlq-flood", max_deliveries=1, min_idle_ms=0, reclaim_count=500),
                             RecordingHandler(), self.redis, KEYS, 1, self.metrics.consumers, reactor, "reclaimer", {})
        await svc.reclaim_once()
        clock.advance(10)
        logsummary.flush_due()
        lines = [formatEvent(e) for e in events if e.get("log_namespace") == "payflux.consumers.reclaim"
                 and "dead-lettered" in formatEvent(e)]
        self.assertEqual(len(lines), 2, lines[:5])
        self.assertRegex(lines[0], r"^reclaim dlq-flood: \d+-\d+ dead-lettered after 1 deliveries \(DeliveryLimitExceeded\)$")
        self.assertRegex(lines[1], rf"^{self.DEAD_LETTERS - 1} more like this in the last 10s: reclaim dlq-flood: \d+-\d+ dead-lettered")
        self.assertEqual(metric(self.metrics, "payflux_consumer_dead_lettered_total", consumer="dlq-flood",
                                error_class="DeliveryLimitExceeded"), self.DEAD_LETTERS)  # the metric counts every one


redis_test_cases(DeadLetterFloodMixin, globals(), versions=("7",))
