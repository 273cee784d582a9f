"""StreamWriter against real redis-server processes (6.2 and 7.x)."""

from __future__ import annotations

import json
import time
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.trial import unittest as trial_unittest

from payflux.redis.connect import connect

from payflux.redis.target import parse_redis_url
from payflux.streams.appendscript import pack_event_id, unpack_event_id, unpack_record
from payflux.streams.keys import StreamKeys, partition_for
from payflux.streams.writer import (
    AppendResult,
    IdempotencyConflict,
    PreparedEvent,
    RedisUnavailable,
    StreamWriter,
    fingerprint_of,
)
from tests.support.redis import redis_test_cases

KEYS = StreamKeys("pf")


def event(event_id: str, merchant: str = "m1", amount: int = 100, size: int = 0) -> PreparedEvent:
    body: dict[str, Any] = {"event_id": event_id, "merchant_id_hash": merchant, "amount": amount}
    if size:
        body["pad"] = "x" * size
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return PreparedEvent(event_id, merchant, "authorization", canonical, fingerprint_of(canonical))


def sleep(seconds: float) -> defer.Deferred:
    return task.deferLater(reactor, seconds, lambda: None)


class WriterFixture:
    """A Redis server per test, a pooled connection to it, and helpers to look inside."""

    def setUp(self) -> None:
        self.server = self.start_redis()
        self.redis = connect(parse_redis_url(self.server.url), poolsize=2, connect_timeout=1.0, reply_timeout=5.0)
        self.addCleanup(self.redis.disconnect)

    def writer(self, partitions: int = 1, window: int = 3600, timeout: float = 5.0, **kw: Any) -> StreamWriter:
        return StreamWriter(self.redis, KEYS, partitions, window, timeout, reactor, **kw)

    def xlen(self, partition: int = 0) -> int:
        return self.server.sync_command("XLEN", KEYS.events(partition))

    def entries(self, partition: int = 0) -> list[tuple[str, dict[str, bytes]]]:
        raw = self.server.sync_command("XRANGE", KEYS.events(partition), "-", "+")
        return [(i.decode(), dict(zip(f[::2], f[1::2]))) for i, f in raw]

    def seen_keys(self) -> list[bytes]:
        """Legacy (stream-format v1) per-event dedupe keys: the default layout no longer writes any."""
        return sorted(self.server.sync_command("KEYS", "pf:*:seen:*"))

    def bucket_keys(self, partition: int | str = "*") -> list[bytes]:
        return sorted(self.server.sync_command("KEYS", f"pf:{{{partition}}}:dd:*"))

    def records(self, partition: int = 0) -> dict[str, tuple[bytes, str]]:
        """event_id -> (8-byte fingerprint, stream id) of every compact dedupe record of ``partition``."""
        out: dict[str, tuple[bytes, str]] = {}
        for key in self.bucket_keys(partition):
            flat = self.server.sync_command("HGETALL", key)
            for f, v in zip(flat[::2], flat[1::2]):
                if f != b"":
                    eid = unpack_event_id(f)
                    self.assertNotIn(eid, out, "one record per event_id")
                    out[eid] = unpack_record(v)
        return out

    def recorded_ids(self) -> list[str]:
        """Every event_id with a compact dedupe record, in any partition."""
        ids = []
        for key in self.bucket_keys():
            flat = self.server.sync_command("HGETALL", key)
            ids.extend(unpack_event_id(f) for f in flat[::2] if f != b"")
        return sorted(ids)

    async def assert_unavailable(self, d: defer.Deferred, within: float) -> RedisUnavailable:
        start = time.monotonic()
        try:
            await d
        except RedisUnavailable as e:
            elapsed = time.monotonic() - start
            self.assertLess(elapsed, within, f"RedisUnavailable after {elapsed:.2f}s")
            return e
        self.fail("append succeeded, expected RedisUnavailable")

    @defer.inlineCallbacks
    def retry_until_appended(self, w: StreamWriter, e: PreparedEvent, within: float = 15.0):
        deadline = time.monotonic() + within
        while True:
            try:
                [r] = yield w.append([e], 9)
                return r
            except RedisUnavailable:
                if time.monotonic() > deadline:
                    raise
                yield sleep(0.1)


class WriterContractMixin(WriterFixture):
    """The StreamWriter contract; mixed into one TestCase per Redis version."""

    @defer.inlineCallbacks
    def test_single_append(self):
        e = event("e1")
        [r] = yield self.writer().append([e], 1700000000123)
        self.assertIsInstance(r, AppendResult)
        self.assertFalse(r.duplicate)
        [(stream_id, fields)] = self.entries()
        self.assertEqual(stream_id, r.stream_id)
        self.assertEqual(
            fields,
            {
                b"v": b"1",
                b"event_id": b"e1",
                b"type": b"authorization",
                b"received_at": b"1700000000123",
                b"data": e.canonical,
            },
        )
        self.assertEqual(self.records(), {"e1": (bytes.fromhex(e.fingerprint[:16]), r.stream_id)})
        self.assertEqual(self.seen_keys(), [])  # no per-event keys any more

    @defer.inlineCallbacks
    def test_batch_keeps_input_order(self):
        events = [event(f"e{i}") for i in range(20)]
        results = yield self.writer().append(events, 1)
        ids = [r.stream_id for r in results]
        self.assertEqual([i for i, _ in self.entries()], ids)
        self.assertEqual([f[b"event_id"].decode() for _, f in self.entries()], [e.event_id for e in events])

    @defer.inlineCallbacks
    def test_duplicate_returns_original_id_and_appends_nothing(self):
        w = self.writer()
        [first] = yield w.append([event("e1")], 1)
        [again] = yield w.append([event("e1")], 2)
        self.assertEqual(again, AppendResult(first.stream_id, True))
        self.assertEqual(self.xlen(), 1)

    @defer.inlineCallbacks
    def test_conflict_writes_nothing(self):
        w = self.writer()
        yield w.append([event("e1")], 1)
        with self.assertRaises(IdempotencyConflict) as ctx:
            yield w.append([event("e2"), event("e1", amount=999), event("e3")], 2)
        self.assertEqual(ctx.exception.event_ids, ["e1"])
        self.assertEqual(self.xlen(), 1)
        self.assertEqual(self.recorded_ids(), ["e1"])

    @defer.inlineCallbacks
    def test_in_call_duplicate(self):
        results = yield self.writer().append([event("e1"), event("e2"), event("e1")], 1)
        self.assertEqual(results[2], AppendResult(results[0].stream_id, True))
        self.assertFalse(results[0].duplicate)
        self.assertEqual(self.xlen(), 2)

    @defer.inlineCallbacks
    def test_in_call_conflict_writes_nothing(self):
        with self.assertRaises(IdempotencyConflict) as ctx:
            yield self.writer().append(
                [event("e1"), event("e2"), event("e1", amount=5), event("e2", amount=6)], 1
            )
        self.assertEqual(ctx.exception.event_ids, ["e1", "e2"])
        self.assertEqual(self.xlen(), 0)
        self.assertEqual(self.bucket_keys(), [])

    @defer.inlineCallbacks
    def test_numeric_event_ids_stay_strings(self):
        w = self.writer()
        yield w.append([event("12345")], 1)
        with self.assertRaises(IdempotencyConflict) as ctx:
            yield w.append([event("12345", amount=1)], 2)
        self.assertEqual(ctx.exception.event_ids, ["12345"])

    @defer.inlineCallbacks
    def test_partitions_route_by_merchant(self):
        merchants = [f"merchant-{i}" for i in range(12)]
        parts = {partition_for(m, 4) for m in merchants}
        self.assertGreater(len(parts), 1)
        events = [event(f"e{i}", merchant=m) for i, m in enumerate(merchants)]
        results = yield self.writer(partitions=4).append(events, 1)
        for e, r in zip(events, results):
            p = partition_for(e.merchant_id_hash, 4)
            ids = {i: f[b"event_id"].decode() for i, f in self.entries(p)}
            self.assertEqual(ids[r.stream_id], e.event_id)
            self.assertEqual(self.records(p)[e.event_id][1], r.stream_id)
        self.assertEqual(sum(self.xlen(p) for p in range(4)), len(events))

    @defer.inlineCallbacks
    def test_multi_partition_conflict_lists_every_id(self):
        w = self.writer(partitions=4)
        a, b = "merchant-0", next(m for m in (f"merchant-{i}" for i in range(1, 50)) if partition_for(m, 4) != partition_for("merchant-0", 4))
        yield w.append([event("x", a), event("y", b)], 1)
        with self.assertRaises(IdempotencyConflict) as ctx:
            yield w.append([event("x", a, amount=1), event("y", b, amount=1)], 2)
        self.assertEqual(sorted(ctx.exception.event_ids), ["x", "y"])

    @defer.inlineCallbacks
    def test_noscript_reload_after_script_flush(self):
        w = self.writer()
        yield w.append([event("e1")], 1)
        self.server.sync_command("SCRIPT", "FLUSH")
        [r] = yield w.append([event("e2")], 2)
        self.assertFalse(r.duplicate)
        self.assertEqual(self.xlen(), 2)

    @defer.inlineCallbacks
    def test_dedupe_window_sets_pttl_and_expires(self):
        # window 1 s: a generation spans at most half a window and its buckets expire one
        # window (+1 s) after its end; the record itself counts for exactly one window
        w = self.writer(window=1)
        [first] = yield w.append([event("e1")], 1)
        [bucket] = self.bucket_keys()
        pttl = self.server.sync_command("PTTL", bucket)
        self.assertTrue(2000 <= pttl <= 2500, pttl)
        [again] = yield w.append([event("e1")], 2)
        self.assertEqual(again, AppendResult(first.stream_id, True))
        yield sleep(1.05)
        [second] = yield w.append([event("e1")], 3)
        self.assertFalse(second.duplicate)
        self.assertNotEqual(second.stream_id, first.stream_id)
        # forgotten only by age: the old record may still sit in its bucket until it expires,
        # and the new one is found from now on
        [third] = yield w.append([event("e1")], 4)
        self.assertEqual(third, AppendResult(second.stream_id, True))
        with self.assertRaises(IdempotencyConflict):
            yield w.append([event("e1", amount=2)], 5)

    @defer.inlineCallbacks
    def test_concurrent_duplicates_append_once(self):
        w = self.writer()
        d1 = w.append([event("race")], 1)
        d2 = w.append([event("race")], 1)
        (r1,), (r2,) = yield defer.gatherResults([d1, d2])
        self.assertEqual(r1.stream_id, r2.stream_id)
        self.assertEqual(sorted([r1.duplicate, r2.duplicate]), [False, True])
        self.assertEqual(self.xlen(), 1)

    @defer.inlineCallbacks
    def test_max_stream_length_refuses_whole_batch(self):
        w = self.writer(max_stream_length=3)
        yield w.append([event("e1"), event("e2")], 1)
        with self.assertRaises(RedisUnavailable) as ctx:
            yield w.append([event("e3"), event("e4")], 2)
        self.assertIn("full", str(ctx.exception))
        self.assertEqual(self.xlen(), 2)
        [dup] = yield w.append([event("e1")], 3)  # duplicates add nothing, so they pass
        self.assertTrue(dup.duplicate)

    @defer.inlineCallbacks
    def test_killed_redis_is_unavailable_within_timeout(self):
        w = self.writer(timeout=0.5)
        yield w.append([event("e1")], 1)
        self.server.kill()
        # first: the live connection drops; then: the pool has no connection at all
        yield defer.ensureDeferred(self.assert_unavailable(w.append([event("e2")], 2), within=1.5))
        e = yield defer.ensureDeferred(self.assert_unavailable(w.append([event("e3")], 3), within=1.5))
        self.assertTrue(str(e))

    @defer.inlineCallbacks
    def test_paused_redis_is_unavailable_then_recovers(self):
        w = self.writer(timeout=0.5)
        yield w.append([event("e1")], 1)
        self.server.pause()
        try:
            e = yield defer.ensureDeferred(self.assert_unavailable(w.append([event("e2")], 2), within=1.5))
            self.assertIn("0.5", str(e))
        finally:
            self.server.resume()
        r = yield self.retry_until_appended(w, event("e3"))
        self.assertFalse(r.duplicate)

    @defer.inlineCallbacks
    def test_writer_recovers_after_restart(self):
        w = self.writer(timeout=0.5)
        yield w.append([event("e1")], 1)
        self.server.restart()  # no AOF: data and scripts are gone, NOSCRIPT path again
        r = yield self.retry_until_appended(w, event("e2"))
        self.assertFalse(r.duplicate)
        self.assertEqual(self.xlen(), 1)

    @defer.inlineCallbacks
    def test_appends_that_timed_out_are_never_sent_later(self):
        w = self.writer(timeout=0.5)
        yield w.append([event("e1")], 1)
        self.server.kill()
        yield defer.ensureDeferred(self.assert_unavailable(w.append([event("lost-conn")], 2), within=1.5))
        # this one waits for a pooled connection when its caller gives up
        yield defer.ensureDeferred(self.assert_unavailable(w.append([event("stale")], 3), within=1.5))
        self.server.start()
        yield self.retry_until_appended(w, event("e3"))
        yield sleep(0.2)
        self.assertEqual([f[b"event_id"] for _, f in self.entries()], [b"e3"])

    @defer.inlineCallbacks
    def test_append_abandoned_while_reconnecting_is_not_sent(self):
        # Redis is down while the append waits for a pooled connection, so it gives up before any
        # connection exists (no timing race with the pool's reconnect); Redis then comes back
        # with its data (AOF, fsync always) and the abandoned append must never be sent.
        self.server = self.start_redis(appendonly=True, appendfsync="always")
        self.redis = connect(parse_redis_url(self.server.url), poolsize=2, connect_timeout=1.0, reply_timeout=5.0)
        self.addCleanup(self.redis.disconnect)
        w = self.writer(timeout=5.0)
        yield w.append([event("e1")], 1)  # first connection + SCRIPT LOAD, not under test
        w.timeout = 0.1
        self.server.kill()
        yield sleep(0.05)
        yield defer.ensureDeferred(self.assert_unavailable(w.append([event("stale")], 2), within=1.0))
        self.server.start()
        w.timeout = 5.0
        yield self.retry_until_appended(w, event("e3"))
        yield sleep(0.2)
        self.assertEqual([f[b"event_id"] for _, f in self.entries()], [b"e1", b"e3"])

    @defer.inlineCallbacks
    def test_oom_rejects_whole_batch(self):
        w = self.writer()
        yield w.append([event("warmup")], 1)
        self.server.sync_command("CONFIG", "SET", "maxmemory-policy", "noeviction")
        info = self.server.sync_command("INFO", "memory").decode()
        used = int(next(line.split(":")[1] for line in info.splitlines() if line.startswith("used_memory:")))
        self.server.sync_command("CONFIG", "SET", "maxmemory", str(used + 256 * 1024))
        error = None
        for batch in range(200):
            events = [event(f"b{batch}-{i}", size=2000) for i in range(20)]
            before = self.xlen()
            try:
                yield w.append(events, 2)
            except RedisUnavailable as e:
                error = e
                break
        self.assertIsNotNone(error, "redis never reached maxmemory")
        self.assertIn("OOM", str(error))
        self.assertEqual(self.xlen(), before)
        self.assertFalse([i for i in self.recorded_ids() if i.startswith(f"b{batch}-")])
        self.server.sync_command("CONFIG", "SET", "maxmemory", "0")
        [r] = yield w.append([event(f"b{batch}-0", size=2000)], 3)
        self.assertFalse(r.duplicate)

    @defer.inlineCallbacks
    def test_wrong_type_stream_key_writes_nothing(self):
        self.server.sync_command("SET", KEYS.events(0), "not a stream")
        with self.assertRaises(Exception) as ctx:
            yield self.writer().append([event("e1")], 1)
        self.assertNotIsInstance(ctx.exception, RedisUnavailable)
        self.assertIn("WRONGTYPE", str(ctx.exception))
        self.assertEqual(self.bucket_keys(), [])
        self.assertEqual(self.server.sync_command("EXISTS", KEYS.dedupe(0)), 0)

    @defer.inlineCallbacks
    def test_unix_socket_and_password(self):
        server = self.start_redis(extra_args=["--requirepass", "s3cr3t"])
        redis = connect(
            parse_redis_url(f"unix://{server.unix_path}?password=s3cr3t&db=2"),
            poolsize=1,
            connect_timeout=1.0,
            reply_timeout=5.0,
        )
        self.addCleanup(redis.disconnect)
        w = StreamWriter(redis, KEYS, 1, 60, 5.0, reactor)
        [r] = yield w.append([event("e1")], 1)
        self.assertFalse(r.duplicate)
        self.assertEqual(server.sync_command("AUTH", "s3cr3t"), "OK")


class GroupCommitMixin(WriterFixture):
    """Group commit: the appends of one reactor turn share one EVALSHA per partition."""

    @defer.inlineCallbacks
    def warm(self, w: StreamWriter):
        """Load the script and reset the command counters."""
        yield w.append([event("warmup", merchant="warm")], 1)
        self.server.sync_command("CONFIG", "RESETSTAT")

    def evalsha_calls(self) -> int:
        stats = self.server.sync_command("INFO", "commandstats").decode()
        line = next((ln for ln in stats.splitlines() if ln.startswith("cmdstat_evalsha:")), None)
        if line is None:
            return 0
        return int(dict(kv.split("=") for kv in line.split(":", 1)[1].split(","))["calls"])

    def by_event_id(self, partition: int = 0) -> dict[str, str]:
        return {f[b"event_id"].decode(): i for i, f in self.entries(partition)}

    @defer.inlineCallbacks
    def settle(self, calls: list[defer.Deferred]):
        """Wait for every call; each outcome is a result list or an exception."""
        outcomes = yield defer.DeferredList(calls, consumeErrors=True)
        return [value if ok else value.value for ok, value in outcomes]

    @defer.inlineCallbacks
    def test_one_evalsha_per_turn_and_each_call_gets_its_own_ids(self):
        w = self.writer()
        yield self.warm(w)
        calls = [w.append([event(f"s{i}")], 1000 + i) for i in range(50)]
        results = yield defer.gatherResults(calls)
        self.assertEqual(self.evalsha_calls(), 1)
        ids = self.by_event_id()
        for i, [r] in enumerate(results):
            self.assertEqual(r, AppendResult(ids[f"s{i}"], False))
        # in call order, each entry with its own call's received_at
        entries = self.entries()[1:]
        self.assertEqual([f[b"event_id"] for _, f in entries], [f"s{i}".encode() for i in range(50)])
        self.assertEqual([f[b"received_at"] for _, f in entries], [str(1000 + i).encode() for i in range(50)])

    @defer.inlineCallbacks
    def test_without_group_commit_one_evalsha_per_call(self):
        w = self.writer(group_commit=False)
        yield self.warm(w)
        yield defer.gatherResults([w.append([event(f"s{i}")], 1) for i in range(10)])
        self.assertEqual(self.evalsha_calls(), 10)

    @defer.inlineCallbacks
    def test_batches_keep_their_order_inside_a_flush(self):
        w = self.writer()
        batches = [[event(f"b{b}-{i}") for i in range(7)] for b in range(4)]
        results = yield defer.gatherResults([w.append(batch, 1) for batch in batches])
        ids = self.by_event_id()
        for batch, rs in zip(batches, results):
            self.assertEqual([r.stream_id for r in rs], [ids[e.event_id] for e in batch])
        self.assertEqual([f[b"event_id"].decode() for _, f in self.entries()], [e.event_id for b in batches for e in b])

    @defer.inlineCallbacks
    def test_conflict_fails_only_its_call_and_writes_nothing_of_it(self):
        w = self.writer()
        yield self.warm(w)
        yield w.append([event("e1")], 1)
        a, b, c = yield self.settle(
            [
                w.append([event("a1"), event("a2")], 2),
                w.append([event("b1"), event("e1", amount=999), event("b2")], 2),
                w.append([event("c1")], 2),
            ]
        )
        self.assertEqual(self.evalsha_calls(), 2)  # e1 alone, then the flush of three
        self.assertIsInstance(b, IdempotencyConflict)
        self.assertEqual(b.event_ids, ["e1"])
        ids = self.by_event_id()
        self.assertEqual(sorted(ids), ["a1", "a2", "c1", "e1", "warmup"])
        self.assertEqual([r.stream_id for r in a], [ids["a1"], ids["a2"]])
        self.assertEqual([r.stream_id for r in c], [ids["c1"]])
        self.assertEqual([i for i in self.recorded_ids() if i.startswith("b")], [])

    @defer.inlineCallbacks
    def test_same_event_id_in_two_calls_of_a_flush_behaves_like_sequential_calls(self):
        w = self.writer()
        yield self.warm(w)
        first, again, other, refused, later = yield self.settle(
            [
                w.append([event("x")], 1),
                w.append([event("y"), event("x")], 2),  # x: duplicate of the first call's x
                w.append([event("x", amount=5)], 3),  # x with another payload: conflict
                w.append([event("z"), event("x", amount=6)], 4),  # conflicts, so its z is not written
                w.append([event("z", amount=7)], 5),  # so this z is new, not a conflict
            ]
        )
        self.assertEqual(self.evalsha_calls(), 1)
        self.assertEqual(again[1], AppendResult(first[0].stream_id, True))
        self.assertFalse(again[0].duplicate)
        self.assertIsInstance(other, IdempotencyConflict)
        self.assertEqual(other.event_ids, ["x"])
        self.assertIsInstance(refused, IdempotencyConflict)
        self.assertEqual(refused.event_ids, ["x"])
        self.assertEqual(later, [AppendResult(self.by_event_id()["z"], False)])
        self.assertEqual([f[b"event_id"] for _, f in self.entries()[1:]], [b"x", b"y", b"z"])
        self.assertEqual(self.entries()[-1][1][b"data"], event("z", amount=7).canonical)

    @defer.inlineCallbacks
    def test_duplicates_of_earlier_flushes_and_within_a_call(self):
        w = self.writer()
        [old] = yield w.append([event("old")], 1)
        r1, r2 = yield defer.gatherResults(
            [w.append([event("old"), event("n"), event("n")], 2), w.append([event("n")], 3)]
        )
        self.assertEqual(r1[0], AppendResult(old.stream_id, True))
        self.assertFalse(r1[1].duplicate)
        self.assertEqual(r1[2], AppendResult(r1[1].stream_id, True))
        self.assertEqual(r2, [AppendResult(r1[1].stream_id, True)])
        self.assertEqual(self.xlen(), 2)

    @defer.inlineCallbacks
    def test_mixed_partitions_one_evalsha_per_partition(self):
        w = self.writer(partitions=4)
        yield self.warm(w)
        merchants = [f"merchant-{i}" for i in range(16)]
        parts = {partition_for(m, 4) for m in merchants}
        calls = [[event(f"c{c}-{i}", merchant=merchants[(c * 3 + i) % 16]) for i in range(5)] for c in range(6)]
        touched = {partition_for(e.merchant_id_hash, 4) for call in calls for e in call}
        results = yield defer.gatherResults([w.append(call, 1) for call in calls])
        self.assertEqual(self.evalsha_calls(), len(touched))
        self.assertGreater(len(parts), 1)
        for call, rs in zip(calls, results):
            for e, r in zip(call, rs):
                self.assertEqual(self.by_event_id(partition_for(e.merchant_id_hash, 4))[e.event_id], r.stream_id)
                self.assertFalse(r.duplicate)

    @defer.inlineCallbacks
    def test_full_stream_refuses_only_the_calls_that_do_not_fit(self):
        w = self.writer(max_stream_length=3)
        yield w.append([event("e1")], 1)
        fits, too_big, dup_only, small = yield self.settle(
            [
                w.append([event("e2")], 2),
                w.append([event("e3"), event("e4")], 2),  # 2 + 2 > 3
                w.append([event("e2")], 2),  # a duplicate of the first call adds nothing
                w.append([event("e5")], 2),  # still fits after the refused call
            ]
        )
        self.assertIsInstance(too_big, RedisUnavailable)
        self.assertIn("full (2 entries", str(too_big))
        self.assertEqual(dup_only, [AppendResult(fits[0].stream_id, True)])
        self.assertFalse(small[0].duplicate)
        self.assertEqual([f[b"event_id"] for _, f in self.entries()], [b"e1", b"e2", b"e5"])

    @defer.inlineCallbacks
    def test_flushes_at_once_past_max_flush_events(self):
        w = self.writer(max_flush_events=5)
        yield self.warm(w)
        calls = [w.append([event(f"c{c}-{i}") for i in range(4)], 1) for c in range(3)]
        # 4 waiting, then 8 >= 5: flushed inside the second append; the third waits for the turn
        self.assertEqual(w._pending_events, 4)
        yield defer.gatherResults(calls)
        self.assertEqual(self.evalsha_calls(), 2)
        self.assertEqual(self.xlen(), 13)

    @defer.inlineCallbacks
    def test_oom_fails_every_call_of_the_flush_and_writes_nothing(self):
        w = self.writer()
        yield w.append([event("warmup")], 1)
        self.server.sync_command("CONFIG", "SET", "maxmemory-policy", "noeviction")
        info = self.server.sync_command("INFO", "memory").decode()
        used = int(next(line.split(":")[1] for line in info.splitlines() if line.startswith("used_memory:")))
        self.server.sync_command("CONFIG", "SET", "maxmemory", str(used + 256 * 1024))
        for round_ in range(200):
            before = self.xlen()
            outcomes = yield self.settle([w.append([event(f"r{round_}-{c}-{i}", size=2000) for i in range(5)], 2) for c in range(4)])
            failed = [o for o in outcomes if isinstance(o, Exception)]
            if failed:
                break
        else:
            self.fail("redis never reached maxmemory")
        self.assertEqual(len(failed), 4, outcomes)
        for e in failed:
            self.assertIsInstance(e, RedisUnavailable)
            self.assertIn("OOM", str(e))
        self.assertEqual(self.xlen(), before)
        self.assertFalse([i for i in self.recorded_ids() if i.startswith(f"r{round_}-")])

    @defer.inlineCallbacks
    def test_killed_redis_fails_every_call_of_the_flush(self):
        w = self.writer(timeout=0.5)
        yield w.append([event("e1")], 1)
        self.server.kill()
        calls = [w.append([event(f"k{i}")], 2) for i in range(5)]
        for d in calls:
            yield defer.ensureDeferred(self.assert_unavailable(d, within=1.5))

    @defer.inlineCallbacks
    def test_call_that_timed_out_is_dropped_from_its_flush(self):
        # Both calls wait in one flush for a pooled connection while Redis is
        # down; only the one whose caller still waits is sent once it is back.
        w = self.writer(timeout=0.3)
        yield w.append([event("e1")], 1)
        self.server.kill()
        yield defer.ensureDeferred(self.assert_unavailable(w.append([event("lost-conn")], 2), within=1.5))
        stale = w.append([event("stale")], 3)
        w.timeout = 15.0
        patient = w.append([event("patient")], 3)
        yield defer.ensureDeferred(self.assert_unavailable(stale, within=1.0))
        self.server.start()
        [r] = yield patient
        self.assertFalse(r.duplicate)
        yield sleep(0.2)
        self.assertEqual([f[b"event_id"] for _, f in self.entries()], [b"patient"])


redis_test_cases(WriterContractMixin, globals())
redis_test_cases(GroupCommitMixin, globals())


class CompactDedupeMixin(WriterFixture):
    """The compact dedupe records (appendscript.py): exact across generations, buckets and upgrades."""

    @defer.inlineCallbacks
    def test_duplicates_and_conflicts_are_found_across_generations(self):
        # window 2 s: a generation ends on each 1 s boundary, so these land in two or three
        w = self.writer(window=2)
        first = yield w.append([event(f"g{i}") for i in range(50)], 1)
        yield sleep(1.1)
        second = yield w.append([event(f"h{i}") for i in range(50)], 2)
        table = self.server.sync_command("HGETALL", KEYS.dedupe(0))
        self.assertGreaterEqual(len([f for f in table[::2] if f.startswith(b"g")]), 2, table)
        again = yield w.append([event(f"g{i}") for i in range(50)] + [event(f"h{i}") for i in range(50)], 3)
        self.assertEqual(again, [AppendResult(r.stream_id, True) for r in first + second])
        for i in (0, 49):
            with self.assertRaises(IdempotencyConflict):
                yield w.append([event(f"g{i}", amount=7)], 4)
        self.assertEqual(self.xlen(), 100)

    @defer.inlineCallbacks
    def test_many_buckets_exact(self):
        # 3,000 events in growing generations and many buckets; uuid, evt_<hex> and plain ids
        import uuid as uuid_mod

        w = self.writer(max_flush_events=1000)
        ids = [str(uuid_mod.uuid4()) for _ in range(1000)] + [f"evt_{uuid_mod.uuid4().hex}" for _ in range(1000)]
        ids += [f"order-{i}" for i in range(1000)]
        first = []
        for start in range(0, len(ids), 250):
            first += yield w.append([event(i) for i in ids[start : start + 250]], 1)
        self.assertFalse(any(r.duplicate for r in first))
        self.assertEqual(len(set(r.stream_id for r in first)), len(ids))
        self.assertGreater(len(self.bucket_keys()), 8)
        records = self.records()
        self.assertEqual(sorted(records), sorted(ids))
        for eid, r in zip(ids, first):
            self.assertEqual(records[eid][1], r.stream_id)
        again = yield w.append([event(i) for i in ids[::7]], 2)
        self.assertEqual(again, [AppendResult(r.stream_id, True) for r in first[::7]])
        with self.assertRaises(IdempotencyConflict) as ctx:
            yield w.append([event(i, amount=3) for i in ids[1::500]], 3)
        self.assertEqual(ctx.exception.event_ids, ids[1::500])
        for key in self.bucket_keys():
            self.assertIn(self.server.sync_command("OBJECT", "ENCODING", key), (b"listpack", b"ziplist"))
            self.assertGreater(self.server.sync_command("PTTL", key), 3600_000)
        self.assertEqual(self.xlen(), len(ids))

    @defer.inlineCallbacks
    def test_window_edge(self):
        w = self.writer(window=1)
        [first] = yield w.append([event("edge")], 1)
        yield sleep(0.75)
        [dup] = yield w.append([event("edge")], 2)  # still inside the window
        self.assertEqual(dup, AppendResult(first.stream_id, True))
        yield sleep(0.4)  # 1.15 s after the first append: forgotten
        [new] = yield w.append([event("edge", amount=9)], 3)  # not a conflict any more
        self.assertFalse(new.duplicate)

    @defer.inlineCallbacks
    def test_two_writers_share_the_table(self):
        # each writer has its own view: the second one's first call is stale and retried
        w1, w2 = self.writer(), self.writer()
        [a] = yield w1.append([event("shared")], 1)
        [b] = yield w2.append([event("shared")], 2)
        self.assertEqual(b, AppendResult(a.stream_id, True))
        self.assertEqual(w2._views[0].refreshes, 1)
        [c] = yield w2.append([event("other")], 3)
        [d] = yield w1.append([event("other")], 4)
        self.assertEqual(d, AppendResult(c.stream_id, True))
        self.assertEqual(self.xlen(), 2)

    @defer.inlineCallbacks
    def test_upgrade_reads_the_v1_seen_keys(self):
        # a partition written by the per-event format: stream entries and seen keys
        e = event("legacy")
        old_id = self.server.sync_command("XADD", KEYS.events(0), "*", "v", "1", "event_id", "legacy").decode()
        self.server.sync_command("SET", KEYS.seen(0, "legacy"), f"{e.fingerprint} {old_id}", "PX", 3600_000)
        w = self.writer()
        [dup] = yield w.append([e], 1)
        self.assertEqual(dup, AppendResult(old_id, True))
        with self.assertRaises(IdempotencyConflict):
            yield w.append([event("legacy", amount=5)], 2)
        [new] = yield w.append([event("fresh")], 3)
        self.assertFalse(new.duplicate)
        legacy_until = int(self.server.sync_command("HGET", KEYS.dedupe(0), "legacy"))
        self.assertGreater(legacy_until, time.time() * 1000 + 2 * 3600_000 - 60_000)  # two windows
        self.assertEqual(self.seen_keys(), [KEYS.seen(0, "legacy").encode()])  # nothing new written there
        self.assertEqual(sorted(self.records()), ["fresh"])

    def test_pack_event_id_is_exact(self):
        import uuid as uuid_mod

        ids = [str(uuid_mod.uuid4()), str(uuid_mod.uuid4()).upper(), f"evt_{uuid_mod.uuid4().hex}", "a" * 33,
               "0123456789abcdef", "0123456789abcde", "x", "evt_" + "ab" * 8, "evt_" + "AB" * 8, "\x01abc", "é" + "00" * 8]
        packed = [pack_event_id(i) for i in ids]
        self.assertEqual(len(set(packed)), len(ids))
        self.assertEqual([unpack_event_id(p) for p in packed], ids)
        self.assertEqual(len(pack_event_id(ids[0])), 17)
        self.assertEqual(len(pack_event_id(ids[2])), 22)
        self.assertTrue(all(p for p in packed))


redis_test_cases(CompactDedupeMixin, globals())


class _NeverConnected(StreamWriter):
    """A writer whose pool never hands out a connection: every append waits until its timeout."""

    def _connection(self) -> defer.Deferred:
        return defer.Deferred()


class SharedTimeoutTests(trial_unittest.SynchronousTestCase):
    """One timer bounds every append (StreamWriter._watch/_expire), each at its own deadline."""

    def setUp(self):
        self.clock = task.Clock()
        self.writer = _NeverConnected(None, StreamKeys(), partitions=1, dedupe_window_seconds=60,
                                      timeout=1.0, reactor=self.clock)

    def outcome(self, d: defer.Deferred) -> list:
        seen: list = []
        d.addBoth(seen.append)
        return seen

    def test_each_append_times_out_at_its_own_deadline_and_no_timer_is_left(self):
        first = self.outcome(self.writer.append([event("a")], 1))
        self.clock.advance(0.6)
        second = self.outcome(self.writer.append([event("b")], 2))
        self.clock.advance(0.5)  # 1.1 s: the first is due, the second not
        self.assertIsInstance(first[0].value, RedisUnavailable)
        self.assertIn("within 1s", str(first[0].value))
        self.assertEqual(second, [])
        self.clock.advance(0.5)
        self.assertIsInstance(second[0].value, RedisUnavailable)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_shorter_timeout_is_honoured_behind_a_longer_one(self):
        self.writer.timeout = 5.0
        slow = self.outcome(self.writer.append([event("a")], 1))
        self.writer.timeout = 0.1
        fast = self.outcome(self.writer.append([event("b")], 2))
        self.clock.advance(0.2)
        self.assertIsInstance(fast[0].value, RedisUnavailable)
        self.assertEqual(slow, [])
        self.clock.advance(5.0)
        self.assertIsInstance(slow[0].value, RedisUnavailable)

    def test_a_caller_that_gives_up_is_not_a_timeout_and_leaves_no_timer(self):
        d = self.writer.append([event("a")], 1)
        seen = self.outcome(d)
        self.clock.advance(0)  # the group-commit flush
        d.cancel()
        self.assertTrue(seen[0].check(defer.CancelledError))
        self.assertEqual(self.clock.getDelayedCalls(), [])
