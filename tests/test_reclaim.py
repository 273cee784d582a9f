"""ReclaimService against real redis-server processes (6.2 and 7.x): XAUTOCLAIM, DLQ, deleted entries."""

from __future__ import annotations

import time
from typing import Any

from twisted.internet import reactor, task

from payflux.consumers.handlers import Entry
from payflux.consumers.dlq import DEAD_LETTER
from payflux.redis.scripts import evalsha
from payflux.consumers.reclaim import ReclaimService
from payflux.consumers.service import ConsumerService
from tests.support.consumers import KEYS, RecordingHandler, RedisFixture, config, metric, sleep, wait_for
from tests.support.redis import redis_test_cases


class ReclaimMixin(RedisFixture):
    def setUp(self) -> None:
        self.setup_redis()
        self.create_group()

    def reclaimer(self, handler: Any, clock: Any = reactor, last_errors: dict | None = None,
                  consumer: str = "reclaimer", **kw: Any) -> ReclaimService:
        kw.setdefault("min_idle_ms", 0)
        return ReclaimService(config(**kw), handler, self.redis, KEYS, 1, self.metrics.consumers, clock,
                              consumer, {} if last_errors is None else last_errors)

    def deliver(self, consumer: str = "dead", count: int = 100_000) -> None:
        """Another consumer reads entries and never acks them (it crashed)."""
        self.server.sync_command("XREADGROUP", "GROUP", "g", consumer, "COUNT", str(count), "STREAMS",
                                 KEYS.events(0), ">")

    async def test_reclaims_thousands_in_one_pass(self):
        ids = []
        for chunk in range(6):
            ids += self.add(500, start=chunk * 500)
        self.deliver()
        h = RecordingHandler()
        svc = self.reclaimer(h, reclaim_count=100)
        result = await svc.reclaim_once()
        self.assertEqual([e.stream_id for e in h.entries], ids)
        self.assertEqual(len(h.batches), 30)
        self.assertEqual(set(e.deliveries for e in h.entries), {2})
        self.assertEqual(result["reclaimed"], 3000)
        self.assertGreaterEqual(result["calls"], 30)
        self.assertEqual(self.pending(), {})
        self.assertEqual(metric(self.metrics, "payflux_consumer_reclaimed_total"), 3000)
        self.assertEqual(metric(self.metrics, "payflux_consumer_acked_total"), 3000)

    async def test_min_idle_is_respected(self):
        self.add(2)
        self.deliver()
        h = RecordingHandler()
        svc = self.reclaimer(h, min_idle_ms=60_000)
        await svc.reclaim_once()
        self.assertEqual(h.entries, [])
        self.assertEqual({c for c, _ in self.pending().values()}, {"dead"})

    async def test_always_failing_handler_sees_entry_exactly_max_deliveries_times_then_dlq(self):
        [bad] = self.add(1)
        h = RecordingHandler(fail=lambda e: ValueError(f"cannot handle {e.event_id}"))
        last_errors: dict = {}
        consumer = ConsumerService(config(max_deliveries=3), h, self.redis, self.open_blocking, KEYS, 1,
                                   self.metrics.consumers, reactor, last_errors=last_errors)
        consumer.startService()
        await wait_for(lambda: len(h.entries) == 1, what="first delivery")
        await consumer.stopService()
        svc = self.reclaimer(h, last_errors=last_errors, max_deliveries=3)
        before = int(time.time() * 1000)
        for _ in range(5):
            await svc.reclaim_once()
        self.assertEqual([e.deliveries for e in h.entries], [1, 2, 3])
        self.assertEqual(self.pending(), {})
        [(dlq_id, record)] = self.dlq()
        self.assertGreaterEqual(int(record.pop("dead_lettered_at")), before - 5)
        self.assertLessEqual(int(dlq_id.split("-")[0]), int(time.time() * 1000) + 5)
        data = record.pop("data")
        self.assertEqual(record, {
            "original_id": bad, "group": "g", "consumer": "reclaimer", "deliveries": "3",
            "error_class": "ValueError", "error_message": "cannot handle e0",
            "source_stream": KEYS.events(0), "v": "1", "event_id": "e0", "type": "authorization",
            "received_at": "1700000000000",
        })
        self.assertEqual(data, '{"event_id":"e0","amount":0}')
        # the original is never deleted
        self.assertEqual(self.server.sync_command("XLEN", KEYS.events(0)), 1)
        self.assertEqual(metric(self.metrics, "payflux_consumer_dead_lettered_total", error_class="ValueError"), 1)
        self.assertEqual(last_errors, {})

    async def test_crashed_consumer_entry_dead_lettered_without_recorded_error(self):
        [eid] = self.add(1)
        self.deliver()
        h = RecordingHandler(whole_batch_error=None)
        svc = self.reclaimer(h, max_deliveries=1)
        await svc.reclaim_once()
        self.assertEqual(h.entries, [])
        [(_, record)] = self.dlq()
        self.assertEqual((record["original_id"], record["deliveries"], record["error_class"]),
                         (eid, "1", "DeliveryLimitExceeded"))

    async def test_dead_letter_script_is_a_noop_when_already_acked(self):
        [eid] = self.add(1)
        self.deliver()
        self.server.sync_command("XACK", KEYS.events(0), "g", eid)
        args = ["g", eid, "c", "E", "m"]
        result = await evalsha(self.redis, DEAD_LETTER, [KEYS.events(0), KEYS.dlq(0)], args)
        self.assertEqual(int(result), 0)
        self.assertEqual(self.dlq(), [])
        svc = self.reclaimer(RecordingHandler())
        self.assertFalse(await svc.dead_letter(0, eid))
        self.assertEqual(self.server.sync_command("XLEN", KEYS.events(0)), 1)

    async def test_script_reloaded_after_flush(self):
        [eid] = self.add(1)
        self.deliver()
        self.server.sync_command("SCRIPT", "FLUSH")
        svc = self.reclaimer(RecordingHandler())
        self.assertTrue(await svc.dead_letter(0, eid))
        self.assertEqual(len(self.dlq()), 1)

    async def test_deleted_pending_entries_are_counted_and_cleared(self):
        ids = self.add(5)
        self.deliver()
        self.server.sync_command("XDEL", KEYS.events(0), ids[1], ids[3])
        h = RecordingHandler()
        svc = self.reclaimer(h)
        result = await svc.reclaim_once()
        self.assertEqual([e.stream_id for e in h.entries], [ids[0], ids[2], ids[4]])
        self.assertEqual(result["deleted"], 2)
        self.assertEqual(metric(self.metrics, "payflux_consumer_deleted_pending_total"), 2)
        # 6.2: we acked them; 7.x: XAUTOCLAIM removed them from the PEL itself
        self.assertEqual(self.pending(), {})
        self.assertEqual(self.dlq(), [])

    async def test_deleted_entries_do_not_ack_own_live_entries(self):
        ids = self.add(4)
        self.deliver(consumer="dead", count=2)
        await sleep(0.3)
        self.deliver(consumer="reclaimer", count=2)  # our own, being handled right now (not idle)
        self.server.sync_command("XDEL", KEYS.events(0), ids[0])
        h = RecordingHandler()
        svc = self.reclaimer(h, min_idle_ms=200)
        await svc.reclaim_once()
        self.assertEqual(metric(self.metrics, "payflux_consumer_deleted_pending_total"), 1)
        self.assertEqual([e.stream_id for e in h.entries], [ids[1]])
        self.assertEqual(self.pending(), {ids[2]: ("reclaimer", 1), ids[3]: ("reclaimer", 1)})

    async def test_malformed_entry_reaches_dlq(self):
        eid = self.server.sync_command("XADD", KEYS.events(0), "*", "v", "1", "event_id", "x").decode()
        self.deliver()
        h = RecordingHandler()
        svc = self.reclaimer(h, max_deliveries=2)
        for _ in range(3):
            await svc.reclaim_once()
        self.assertEqual(h.entries, [])
        [(_, record)] = self.dlq()
        self.assertEqual((record["original_id"], record["error_class"]), (eid, "MalformedEntry"))
        self.assertIn("missing field(s)", record["error_message"])

    async def test_looping_call_on_clock_and_errors_never_stop_it(self):
        clock = task.Clock()
        self.add(2)
        self.deliver()
        calls = []

        class Flaky:
            def handle(self, entries: list[Entry]) -> None:
                calls.append(len(entries))
                if len(calls) == 1:
                    raise RuntimeError("transient")

        svc = self.reclaimer(Flaky(), clock=clock, reclaim_interval=5.0)
        svc.startService()
        self.addCleanup(svc.stopService)
        await sleep(0.05)
        self.assertEqual(calls, [])
        clock.advance(5)
        await wait_for(lambda: calls == [2], what="first pass")
        await sleep(0.05)
        clock.advance(5)
        await wait_for(lambda: calls == [2, 2], what="second pass")
        await wait_for(lambda: not self.pending(), what="acked on the second pass")
        self.flushLoggedErrors(RuntimeError)

    async def test_idle_consumer_cleanup_spares_consumers_with_pending(self):
        self.add(1)
        self.deliver(consumer="busy")
        self.server.sync_command("XGROUP", "CREATECONSUMER", KEYS.events(0), "g", "idle")
        await sleep(0.1)
        svc = self.reclaimer(RecordingHandler(), idle_consumer_cleanup_ms=50, min_idle_ms=60_000)
        await svc.reclaim_once()
        names = {dict(zip(r[::2], r[1::2]))[b"name"] for r in
                 self.server.sync_command("XINFO", "CONSUMERS", KEYS.events(0), "g")}
        self.assertEqual(names, {b"busy"})

    async def test_a_stream_not_created_yet_is_no_failure(self):
        """Before the reader's XGROUP CREATE MKSTREAM there is no stream nor group: nothing to reclaim, no error."""
        self.server.sync_command("DEL", KEYS.events(0))
        svc = self.reclaimer(RecordingHandler(), idle_consumer_cleanup_ms=50)
        failed: list = []
        svc._step_failed = lambda failure, what: failed.append((what, failure.getErrorMessage()))
        result = await svc.reclaim_once()
        self.assertEqual(failed, [])
        self.assertEqual((result["reclaimed"], result["consumers_removed"]), (0, 0))


redis_test_cases(ReclaimMixin, globals())
