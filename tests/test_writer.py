"""StreamWriter against real redis-server processes (6.2 and 7.x)."""

from __future__ import annotations

import json
import time
from typing import Any

from twisted.internet import defer, reactor, task

from payflux.streams.connection import connect, parse_redis_url
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


class WriterContractMixin:
    """The StreamWriter contract; mixed into one TestCase per Redis version."""

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
        return sorted(self.server.sync_command("KEYS", "pf:*:seen:*"))

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
        record = self.server.sync_command("GET", KEYS.seen(0, "e1"))
        self.assertEqual(record, f"{e.fingerprint} {r.stream_id}".encode())

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
        self.assertEqual(self.seen_keys(), [KEYS.seen(0, "e1").encode()])

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
        self.assertEqual(self.seen_keys(), [])

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
            self.assertIsNotNone(self.server.sync_command("GET", KEYS.seen(p, e.event_id)))
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
        w = self.writer(window=1)
        [first] = yield w.append([event("e1")], 1)
        pttl = self.server.sync_command("PTTL", KEYS.seen(0, "e1"))
        self.assertTrue(0 < pttl <= 1000, pttl)
        self.server.sync_command("PEXPIRE", KEYS.seen(0, "e1"), 1)
        yield sleep(0.05)
        [second] = yield w.append([event("e1")], 2)
        self.assertFalse(second.duplicate)
        self.assertNotEqual(second.stream_id, first.stream_id)

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
        # Redis keeps running (script cached); only our connections drop, and
        # the pool reconnects after ~0.5 s, well after this append gave up.
        w = self.writer(timeout=0.1)
        yield w.append([event("e1")], 1)
        self.server.sync_command("CLIENT", "KILL", "TYPE", "normal")
        yield sleep(0.05)
        yield defer.ensureDeferred(self.assert_unavailable(w.append([event("stale")], 2), within=1.0))
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
        self.assertEqual(self.server.sync_command("KEYS", f"pf:*:seen:b{batch}-*"), [])
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
        self.assertEqual(self.seen_keys(), [])

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


redis_test_cases(WriterContractMixin, globals())
