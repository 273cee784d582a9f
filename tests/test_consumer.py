"""ConsumerService and the handler protocol against real redis-server processes (6.2 and 7.x)."""

from __future__ import annotations

import json
import os
import socket
import sys
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from payflux.consumers.handlers import (
    EntriesFailed,
    Entry,
    LogHandler,
    MalformedEntry,
    NoopHandler,
    decode_entry,
    load_handler,
)
from payflux.consumers.service import ConsumerService, backoff, default_consumer_name
from tests.support.consumers import KEYS, RecordingHandler, RedisFixture, config, metric, sleep, wait_for
from tests.support.redis import redis_test_cases

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "examples"))


class CountingRedis:
    """Delegates to a txredisapi handler, counting XGROUP CREATE calls; ``fail_create`` injects errors."""

    def __init__(self, redis: Any) -> None:
        self.redis = redis
        self.creates = 0
        self.fail_create: Exception | None = None

    def execute_command(self, *args: Any) -> defer.Deferred:
        if args[:2] == ("XGROUP", "CREATE"):
            self.creates += 1
            if self.fail_create is not None:
                return defer.fail(self.fail_create)
        return self.redis.execute_command(*args)


class ConsumerMixin(RedisFixture):
    def setUp(self) -> None:
        self.setup_redis()

    def service(self, handler: Any, clock: Any = reactor, redis: Any = None, partitions: int = 1,
                grace: float = 10.0, **kw: Any) -> ConsumerService:
        svc = ConsumerService(config(**kw), handler, redis or self.redis, self.open_blocking, KEYS, partitions,
                              self.metrics.consumers, clock, grace=grace)
        svc.startService()
        self.addCleanup(lambda: svc.stopService() if svc.running else None)
        return svc

    async def test_reads_own_pending_first_then_new(self):
        self.create_group()
        old = self.add(5, prefix="old")
        # a previous incarnation of worker-1 read them and died before acking
        self.server.sync_command("XREADGROUP", "GROUP", "g", "worker-1", "COUNT", "10", "STREAMS", KEYS.events(0), ">")
        new = self.add(3, prefix="new")
        h = RecordingHandler()
        svc = self.service(h, batch_size=2)
        await wait_for(lambda: len(h.entries) == 8, what="8 entries")
        self.assertEqual([e.stream_id for e in h.entries], old + new)
        # replayed entries carry XPENDING's count (reading pending history with XREADGROUP counts as a delivery)
        self.assertEqual([e.deliveries for e in h.entries], [2] * 5 + [1] * 3)
        await wait_for(lambda: not self.pending(), what="all acked")
        self.assertEqual(metric(self.metrics, "payflux_consumer_acked_total"), 8)
        self.assertEqual(metric(self.metrics, "payflux_consumer_processed_total"), 8)
        first = h.entries[0]
        self.assertEqual((first.event_id, first.type, first.partition, first.schema_version, first.received_at_ms),
                         ("old0", "authorization", 0, "1", 1700000000000))
        self.assertEqual(first.event, {"event_id": "old0", "amount": 0})
        await svc.stopService()
        self.assertTrue(h.closed)

    async def test_acks_only_after_handler_succeeded(self):
        self.create_group()
        h = RecordingHandler()
        h.gate = defer.Deferred()
        svc = self.service(h)
        ids = self.add(3)
        await wait_for(lambda: len(h.entries) == 3, what="batch handed over")
        await sleep(0.1)
        self.assertEqual(set(self.pending()), set(ids), "acked before the handler finished")
        h.gate.callback(None)
        await wait_for(lambda: not self.pending(), what="acked after success")
        await svc.stopService()

    async def test_entries_failed_acks_the_rest(self):
        self.create_group()
        h = RecordingHandler(fail=lambda e: ValueError("bad amount") if e.event_id == "e1" else None)
        svc = self.service(h)
        ids = self.add(3)
        await wait_for(lambda: len(self.pending()) == 1 and len(h.entries) == 3, what="partial ack")
        self.assertEqual(list(self.pending()), [ids[1]])
        self.assertEqual(svc.last_errors[(0, ids[1])], ("ValueError", "bad amount"))
        self.assertEqual(metric(self.metrics, "payflux_consumer_failed_total"), 1)
        self.assertEqual(metric(self.metrics, "payflux_consumer_acked_total"), 2)

    async def test_handler_exception_acks_nothing(self):
        self.create_group()
        h = RecordingHandler(whole_batch_error=RuntimeError("downstream is down"))
        svc = self.service(h)
        ids = self.add(4)
        await wait_for(lambda: len(h.entries) == 4, what="batch handed over")
        await sleep(0.1)
        self.assertEqual(set(self.pending()), set(ids))
        self.assertEqual(svc.last_errors[(0, ids[0])], ("RuntimeError", "downstream is down"))
        self.assertEqual(metric(self.metrics, "payflux_consumer_acked_total"), 0)
        self.assertEqual(metric(self.metrics, "payflux_consumer_failed_total"), 4)
        self.flushLoggedErrors(RuntimeError)

    async def test_coroutine_handler(self):
        self.create_group()
        seen = []

        class Async:
            async def handle(self, entries):
                await sleep(0.01)
                seen.extend(e.event_id for e in entries)

        svc = self.service(Async())
        self.add(3)
        await wait_for(lambda: not self.pending() and len(seen) == 3, what="coroutine handler")
        await svc.stopService()

    async def test_malformed_entries_fail_without_reaching_the_handler(self):
        self.create_group()
        h = RecordingHandler()
        svc = self.service(h)
        good = self.add(1)
        bad_json = self.server.sync_command("XADD", KEYS.events(0), "*", "v", "1", "event_id", "x", "type", "t",
                                            "received_at", "1", "data", "{nope").decode()
        missing = self.server.sync_command("XADD", KEYS.events(0), "*", "v", "1", "event_id", "y").decode()
        await wait_for(lambda: len(self.pending()) == 2, what="malformed entries left pending")
        self.assertEqual([e.stream_id for e in h.entries], good)
        self.assertEqual(svc.last_errors[(0, bad_json)][0], "MalformedEntry")
        self.assertIn("missing field(s): type, received_at, data", svc.last_errors[(0, missing)][1])

    async def test_concurrency_bound(self):
        self.create_group()
        gates: list[defer.Deferred] = []

        class Slow:
            def handle(self, entries):
                gates.append(defer.Deferred())
                return gates[-1]

        svc = self.service(Slow(), batch_size=1, concurrency=2)
        self.add(6)
        await wait_for(lambda: len(gates) == 2, what="two batches in flight")
        await sleep(0.2)
        self.assertEqual(len(gates), 2, "a third batch was handed over while two were in flight")
        gates[0].callback(None)
        await wait_for(lambda: len(gates) == 3, what="third batch after a slot freed")
        await sleep(0.1)
        self.assertEqual(len(gates), 3)
        released = 1
        while released < 6:
            await wait_for(lambda: len(gates) > released, what="next batch")
            self.assertLessEqual(len(gates) - released, 2)
            gates[released].callback(None)
            released += 1
        await wait_for(lambda: not self.pending(), what="all acked")
        await svc.stopService()

    async def test_multiple_partitions(self):
        self.create_group(partitions=3)
        h = RecordingHandler()
        svc = self.service(h, partitions=3)
        ids = {p: self.add(2, partition=p, prefix=f"p{p}-") for p in range(3)}
        await wait_for(lambda: len(h.entries) == 6 and not any(self.pending(p) for p in range(3)), what="3 partitions")
        self.assertEqual({(e.partition, e.stream_id) for e in h.entries},
                         {(p, i) for p, l in ids.items() for i in l})
        await svc.stopService()

    async def test_creates_missing_group_on_start(self):
        h = RecordingHandler()
        svc = self.service(h, partitions=2, start_id="0")
        await wait_for(lambda: metric(self.metrics, "payflux_consumer_group_recreated_total") == 1, what="created")
        ids = self.add(2, partition=1)
        await wait_for(lambda: len(h.entries) == 2, what="entries after create")
        self.assertEqual([e.stream_id for e in h.entries], ids)
        groups = self.server.sync_command("XINFO", "GROUPS", KEYS.events(0))
        self.assertEqual(groups[0][1], b"g")
        await svc.stopService()

    async def test_group_destroyed_under_running_consumer_is_recreated_with_backoff(self):
        clock = task.Clock()
        counting = CountingRedis(self.redis)
        self.create_group()
        h = RecordingHandler()
        svc = self.service(h, clock=clock, redis=counting, block_ms=50)
        self.add(1, prefix="before")
        await wait_for(lambda: len(h.entries) == 1, what="first entry")
        self.server.sync_command("XGROUP", "DESTROY", KEYS.events(0), "g")
        await wait_for(lambda: counting.creates == 1, what="recreation")  # the first NOGROUP: no delay
        self.assertEqual(metric(self.metrics, "payflux_consumer_group_recreated_total"), 1)
        self.add(1, prefix="after")
        # the group is recreated at start_id "0": the whole stream again (duplicates, never a loss)
        await wait_for(lambda: "after0" in [e.event_id for e in h.entries], what="entry after recreation")

        # now creation keeps failing: attempts follow the backoff, never a tight loop
        counting.fail_create = RuntimeError("injected: XGROUP CREATE refused")
        self.server.sync_command("XGROUP", "DESTROY", KEYS.events(0), "g")
        await wait_for(lambda: counting.creates == 2, what="first retry")
        for _ in range(600):  # 60 s of clock time in 0.1 s steps, real I/O in between
            clock.advance(0.1)
            await sleep(0.002)
        # delays 0.1, 0.2, 0.4, ... 25.6 s: 1 + 9 attempts fit in 60 s
        self.assertLessEqual(counting.creates - 2, 10)
        self.assertGreaterEqual(counting.creates - 2, 6)
        self.assertEqual(metric(self.metrics, "payflux_consumer_group_recreated_total"), 1)
        self.assertGreater(metric(self.metrics, "payflux_consumer_read_errors_total"), 5)
        counting.fail_create = None
        for _ in range(400):
            clock.advance(0.1)
            await sleep(0.002)
            if metric(self.metrics, "payflux_consumer_group_recreated_total") == 2:
                break
        self.assertEqual(metric(self.metrics, "payflux_consumer_group_recreated_total"), 2)
        self.flushLoggedErrors(RuntimeError)
        await svc.stopService()

    async def test_stop_waits_for_an_ack_in_flight(self):
        """A synchronous handler's batch stays in flight until its XACK replies; stop waits."""
        gate: defer.Deferred = defer.Deferred()

        class SlowAck(CountingRedis):
            def execute_command(self, *args: Any) -> defer.Deferred:
                if args[0] == "XACK":
                    return gate.addCallback(lambda _: self.redis.execute_command(*args))
                return super().execute_command(*args)

        self.create_group()
        h = RecordingHandler()
        svc = self.service(h, redis=SlowAck(self.redis), block_ms=50)
        self.add(1)
        await wait_for(lambda: len(h.entries) == 1, what="entry handled")
        stopping = svc.stopService()
        await sleep(0.2)
        self.assertFalse(stopping.called, "stop did not wait for the XACK in flight")
        gate.callback(None)
        await stopping
        self.assertEqual(self.pending(), {})
        self.assertEqual(metric(self.metrics, "payflux_consumer_acked_total"), 1)

    async def test_read_errors_back_off_and_never_end_the_loop(self):
        clock = task.Clock()
        self.create_group()
        # WRONGTYPE on every read: a persistent error that isn't NOGROUP
        self.server.sync_command("SET", KEYS.events(1), "not a stream")
        h = RecordingHandler()
        svc = self.service(h, clock=clock, partitions=2)
        await wait_for(lambda: metric(self.metrics, "payflux_consumer_read_errors_total") == 1, what="first error")
        await sleep(0.2)
        self.assertEqual(metric(self.metrics, "payflux_consumer_read_errors_total"), 1, "retried without backoff")
        clock.advance(0.1)
        await wait_for(lambda: metric(self.metrics, "payflux_consumer_read_errors_total") == 2, what="retry")
        self.server.sync_command("DEL", KEYS.events(1))
        self.server.sync_command("XGROUP", "CREATE", KEYS.events(1), "g", "0", "MKSTREAM")
        clock.advance(0.2)
        self.add(1)
        await wait_for(lambda: len(h.entries) == 1, what="loop alive after errors")
        self.flushLoggedErrors()
        await svc.stopService()

    async def test_graceful_stop_acks_what_finished_within_grace(self):
        self.create_group()
        fast_gate, slow_gate = defer.Deferred(), defer.Deferred()
        calls = []

        class TwoSpeeds:
            def handle(self, entries):
                calls.append([e.stream_id for e in entries])
                return fast_gate if len(calls) == 1 else slow_gate

            def close(self):
                calls.append("closed")

        svc = self.service(TwoSpeeds(), batch_size=1, concurrency=2, grace=0.5)
        fast, slow = self.add(2)
        await wait_for(lambda: len(calls) == 2, what="two batches in flight")
        stopped = svc.stopService()
        reactor.callLater(0.1, fast_gate.callback, None)  # finishes within grace
        await stopped
        self.assertEqual(list(self.pending()), [slow])
        self.assertEqual(calls[-1], "closed")
        slow_gate.callback(None)  # finishes after the grace period: must not be acked
        await sleep(0.1)
        self.assertEqual(list(self.pending()), [slow])
        self.assertTrue(self.blocking_opened[0]._factory.disconnectCalled)

    async def test_docs_example_handler_runs(self):
        self.create_group()
        handler = load_handler("count_handler:CountHandler", {"label": "docs"}, reactor)
        svc = self.service(handler)
        ids = self.add(3)
        no_amount = self.server.sync_command(
            "XADD", KEYS.events(0), "*", "v", "1", "event_id", "z", "type", "refund", "received_at", "1",
            "data", '{"event_id":"z"}').decode()
        await wait_for(lambda: list(self.pending()) == [no_amount] and handler.counts["authorization"] == 3,
                       what="example handled 3, failed 1")
        self.assertEqual(svc.last_errors[(0, no_amount)], ("ValueError", "event has no amount"))
        self.assertEqual(len(ids), 3)
        await svc.stopService()

    async def test_stop_while_blocked_in_read_is_prompt(self):
        self.create_group()
        svc = self.service(RecordingHandler(), block_ms=5000)
        await sleep(0.2)
        started = reactor.seconds()
        await svc.stopService()
        self.assertLess(reactor.seconds() - started, 1.0)


redis_test_cases(ConsumerMixin, globals())


class HandlerProtocolTests(unittest.TestCase):
    def test_load_builtins(self):
        self.assertIsInstance(load_handler("log", {}, reactor), LogHandler)
        self.assertIsInstance(load_handler("noop", {}, reactor), NoopHandler)

    def test_load_dotted_path_passes_options_and_reactor(self):
        h = load_handler("count_handler:CountHandler", {"label": "x"}, reactor)
        self.assertEqual((h.label, h.reactor), ("x", reactor))

    def test_load_errors_are_one_line_value_errors(self):
        cases = {
            "nosuch": "not a built-in",
            "no_such_module_xyz:f": "cannot import no_such_module_xyz",
            "count_handler:Missing": "has no attribute Missing",
            "count_handler:VERSION": "is not callable",
            "builtins:dict": "has no handle()",
        }
        for spec, expected in cases.items():
            with self.assertRaises(ValueError) as cm:
                load_handler(spec, {}, reactor)
            self.assertIn(expected, str(cm.exception))
            self.assertNotIn("\n", str(cm.exception))
        # an option the factory has no parameter for, or a required one missing: one line naming it
        with self.assertRaises(ValueError) as cm:
            load_handler("count_handler:CountHandler", {"bogus": 1}, reactor)
        self.assertEqual(str(cm.exception), "unknown option 'bogus' for handler count_handler:CountHandler (known: label)")
        with self.assertRaises(ValueError) as cm:
            load_handler("webhook", {"urll": "https://example.com/", "secret": "0123456789abcdef0123"}, reactor)
        self.assertTrue(str(cm.exception).startswith(
            "unknown option 'urll' for handler webhook (known: url, secret, secret_file, mode, "), str(cm.exception))
        with self.assertRaises(ValueError) as cm:
            load_handler("tests.support.handlers:RecordingHandler", {}, reactor)
        self.assertEqual(str(cm.exception), "missing option 'key' for handler tests.support.handlers:RecordingHandler "
                                            "(known: key, fail_types)")
        # a factory taking **options checks its own; other constructor errors still name the type
        with self.assertRaises(ValueError) as cm:
            load_handler("risk", {"urll": 1}, reactor)
        self.assertIn("handler 'risk': building it failed: ValueError: risk option urll", str(cm.exception))
        with self.assertRaises(ValueError) as cm:
            load_handler("builtins:int", {"base": 10}, reactor)  # no signature to check; int() says why
        self.assertIn("building it failed: TypeError", str(cm.exception))

    def test_decode_entry_rejects_unusable_entries(self):
        ok = ["v", "1", "event_id", "e", "type", "t", "received_at", "5", "data", json.dumps({"a": 1})]
        self.assertEqual(decode_entry("1-0", 0, ok, 1).event, {"a": 1})
        # the append script's layout takes a fast path; any other field order the general one
        self.assertEqual(decode_entry("1-0", 3, ok, 2), Entry("1-0", 3, "e", 5, "1", {"a": 1}, 2, "t"))
        self.assertEqual(decode_entry("1-0", 3, ok[2:4] + ok[:2] + ok[4:], 2), decode_entry("1-0", 3, ok, 2))
        for fields, why in [
            (None, "deleted"),
            (ok[:8], "missing field(s): data"),
            (["v", "2"] + ok[2:], "unsupported stream format version"),
            (ok[:7] + ["x"] + ok[8:], "received_at is not an integer"),
            (ok[:9] + ["[1]"], "not a JSON object"),
            (ok[:9] + ["{"], "not valid JSON"),
            (["data", "{"], "not valid JSON"),
            (["data", "[1]"], "not a JSON object"),
            (["data", json.dumps({"event_type": "x"})], "needs event_id and event_type"),
            (["data", json.dumps({"event_id": "", "event_type": "x"})], "needs event_id and event_type"),
        ]:
            with self.assertRaises(MalformedEntry) as cm:
                decode_entry("1-0", 0, fields, 1)
            self.assertIn(why, str(cm.exception))

    def test_decode_entry_reads_the_go_payfluxs_data_only_entries(self):
        event = {"event_id": "uuid-123", "event_type": "payment_failed", "processor": "stripe"}
        self.assertEqual(decode_entry("1767657600000-3", 0, ["data", json.dumps(event)], 1),
                         Entry("1767657600000-3", 0, "uuid-123", 1767657600000, "go", event, 1, "payment_failed"))

    def test_entries_failed_carries_failures(self):
        e = EntriesFailed({"1-0": ValueError("x")})
        self.assertEqual(list(e.failures), ["1-0"])

    def test_default_consumer_name_and_backoff(self):
        self.assertEqual(default_consumer_name(), f"{socket.gethostname()}-{os.getpid()}")
        self.assertEqual([backoff(n) for n in (1, 2, 3)], [0.1, 0.2, 0.4])
        self.assertEqual(backoff(100), 30.0)


class HandlerOptionErrorTests(unittest.TestCase):
    """A bad exporter option is one config-error line and exit 2 at load time, like every other."""

    def test_unknown_option_at_load_time(self):
        import subprocess
        import tempfile

        from tests.support.process import PAYFLUX, clean_env

        fd, path = tempfile.mkstemp(suffix=".toml")
        with os.fdopen(fd, "w") as f:
            f.write('roles = ["consumers"]\n[[consumers]]\nname = "x"\ngroup = "x"\nhandler = "webhook"\n'
                    'options = { urll = "https://example.com/", secret = "0123456789abcdef0123" }\n')
        self.addCleanup(os.unlink, path)
        result = subprocess.run([*PAYFLUX, "check-config", "--config", path, "--insecure-dev-mode"],
                                capture_output=True, text=True, timeout=60, env=clean_env())
        self.assertEqual(result.returncode, 2)
        self.assertEqual(result.stderr.count("\n"), 1, result.stderr)
        self.assertTrue(result.stderr.startswith("payflux: invalid [[consumers]] 'x': unknown option 'urll' for "
                                                 "handler webhook (known: url, secret, "), result.stderr)
        self.assertNotIn("TypeError", result.stderr)


class ConsumerIdleCleanupConfigTests(unittest.TestCase):
    def test_default_seconds_deprecated_ms_and_errors(self):
        from payflux.consumers.config import consumer_from_table

        base = {"name": "c", "group": "g", "handler": "noop"}
        self.assertEqual(consumer_from_table(base, 0).idle_cleanup_ms(), 3_600_000)  # on by default: 1 h
        self.assertEqual(consumer_from_table({**base, "consumer_idle_cleanup": 90}, 0).idle_cleanup_ms(), 90_000)
        self.assertEqual(consumer_from_table({**base, "consumer_idle_cleanup": 0}, 0).idle_cleanup_ms(), 0)
        self.assertEqual(consumer_from_table({**base, "idle_consumer_cleanup_ms": 5000}, 0).idle_cleanup_ms(), 5000)
        for table, expected in (
            ({"consumer_idle_cleanup": -1}, "consumer_idle_cleanup must be 0 (never) or a number of seconds"),
            ({"consumer_idle_cleanup": "1h"}, "consumer_idle_cleanup must be 0 (never)"),
            ({"consumer_idle_cleanup": 1, "block_ms": 2000}, "consumer_idle_cleanup must be longer than block_ms"),
            ({"idle_consumer_cleanup_ms": 100, "block_ms": 200}, "idle_consumer_cleanup_ms must be longer than"),
        ):
            with self.assertRaises(ValueError) as cm:
                consumer_from_table({**base, **table}, 0)
            self.assertIn(expected, str(cm.exception))
