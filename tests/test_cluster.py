"""
Redis Cluster mode against a real 3-master cluster (tests/support/cluster.py), Redis 6.2 and 7:
key slots agree with the server, ingest spreads partitions over the masters and keeps each
merchant's order, consumers read every partition, a slot migration under load (MOVED / ASK /
TRYAGAIN) loses and duplicates nothing, and the node, its /ready and the CLI work on a cluster.
"""

from __future__ import annotations

import json
import random
import subprocess
from typing import Any

from twisted.internet import defer, reactor, task, threads
from twisted.trial import unittest

from payflux.cli import sample_event
from payflux.consumers.config import ConsumerConfig
from payflux.consumers.service import ConsumerService, create_group, open_read_connection
from payflux.observability.metrics import Metrics
from payflux.redis.slots import command_key, key_slot, parse_redirect, parse_slots
from payflux.redis.connect import connect
from payflux.redis.target import parse_redis_url
from payflux.streams.keys import StreamKeys, partition_for
from payflux.redis.connect import open_sync
from payflux.redis.scripts import Script, evalsha_sync
from payflux.redis.sync import SyncCluster
from payflux.streams.writer import PreparedEvent, RedisUnavailable, StreamWriter, fingerprint_of
from tests.support import handlers
from tests.support.cluster import RedisCluster
from tests.support.node import start_node
from tests.support.process import PAYFLUX, clean_env
from tests.support.consumers import RecordingHandler, wait_for
from tests.support.redis import redis_test_cases

KEYS = StreamKeys("pf")
PARTITIONS = 8  # crc16 puts the tags 0..7 on all three masters of an even 3-way split


def event(event_id: str, merchant: str, seq: int) -> PreparedEvent:
    canonical = json.dumps({"event_id": event_id, "merchant_id_hash": merchant, "seq": seq},
                           separators=(",", ":")).encode()
    return PreparedEvent(event_id, merchant, "authorization", canonical, fingerprint_of(canonical))


class RoutingTests(unittest.TestCase):
    """The routing rules, without a server."""

    def test_key_slot_known_values(self):
        # values from the Redis Cluster specification and CLUSTER KEYSLOT
        self.assertEqual(key_slot("foo"), 12182)
        self.assertEqual(key_slot("bar"), 5061)
        self.assertEqual(key_slot("{user1000}.following"), key_slot("user1000"))
        self.assertEqual(key_slot("foo{}{bar}"), key_slot(b"foo{}{bar}"))  # empty tag: whole key
        self.assertEqual(key_slot("foo{{bar}}zap"), key_slot("{bar"))
        self.assertEqual(key_slot("pf:{3}:events"), key_slot("pf:{3}:seen:e1"))
        self.assertEqual(key_slot("pf:{3}:events"), key_slot("pf:{3}:dlq"))

    def test_command_key(self):
        self.assertEqual(command_key(("XADD", "k", "*", "a", "1")), "k")
        self.assertEqual(command_key(("EVALSHA", "sha", 2, "k1", "k2", "arg")), "k1")
        self.assertIsNone(command_key(("EVALSHA", "sha", 0, "arg")))
        self.assertEqual(command_key(("XGROUP", "CREATE", "k", "g", "0", "MKSTREAM")), "k")
        self.assertEqual(command_key(("XINFO", "GROUPS", "k")), "k")
        self.assertEqual(command_key(("XREADGROUP", "GROUP", "g", "c", "COUNT", "1", "STREAMS", "k", ">")), "k")
        self.assertEqual(command_key((b"xack", b"k", b"g", b"1-0")), b"k")
        for keyless in (("PING",), ("SCRIPT", "LOAD", "return 1"), ("CLUSTER", "SLOTS"), ("INFO",)):
            self.assertIsNone(command_key(keyless))

    def test_parse_redirect(self):
        self.assertEqual(parse_redirect("MOVED 3999 127.0.0.1:6381"), ("MOVED", 3999, ("127.0.0.1", 6381)))
        self.assertEqual(parse_redirect("ASK 3999 [::1]:7000"), ("ASK", 3999, ("::1", 7000)))
        self.assertIsNone(parse_redirect("ERR unknown command"))
        self.assertIsNone(parse_redirect("MOVED 1 nonsense"))

    def test_parse_slots_empty_host_is_the_node_asked(self):
        owners = parse_slots([[0, 2, [b"", 7000, b"id"]], [3, 3, [b"10.0.0.2", 7001, b"id2"]]], "10.0.0.1")
        self.assertEqual(owners, {0: ("10.0.0.1", 7000), 1: ("10.0.0.1", 7000), 2: ("10.0.0.1", 7000),
                                  3: ("10.0.0.2", 7001)})

    def test_cluster_urls(self):
        t = parse_redis_url("redis+cluster://app:s%3Acret@10.0.0.1:7000,10.0.0.2:7001,[::1]:7002")
        self.assertTrue(t.cluster)
        self.assertFalse(t.tls)
        self.assertEqual(t.seeds, (("10.0.0.1", 7000), ("10.0.0.2", 7001), ("::1", 7002)))
        self.assertEqual((t.username, t.password), ("app", "s:cret"))
        self.assertNotIn("s:cret", repr(t) + str(t))
        self.assertEqual(str(t), "redis+cluster://app:***@10.0.0.1:7000,10.0.0.2:7001,[::1]:7002")
        self.assertTrue(parse_redis_url("rediss+cluster://h:7000?ca_file=/ca.pem").tls)
        for url, says in [
            ("redis+cluster://h", "host:port"),
            ("redis+cluster://h:7000/2", "no database number"),
            ("redis+cluster://h:99999", "1-65535"),
            ("redis+cluster://h:7000?ca_file=/x", "unknown parameter"),
        ]:
            with self.assertRaises(ValueError) as cm:
                parse_redis_url(url)
            self.assertIn(says, str(cm.exception))


class ClusterMixin:
    """Each test gets its own 3-master cluster (about 2 s to start)."""

    def setUp(self) -> None:
        self.cluster = RedisCluster(self.redis_binary, self)
        self.target = parse_redis_url(self.cluster.url)
        self.client = connect(self.target, 2, 2.0, 5.0)
        self.addCleanup(self.client.disconnect)

    def writer(self, **kw: Any) -> StreamWriter:
        return StreamWriter(self.client, KEYS, partitions=PARTITIONS, dedupe_window_seconds=3600, timeout=5.0,
                            reactor=reactor, **kw)

    def owners(self) -> dict[int, int]:
        """partition -> port of the master holding it."""
        return {p: self.cluster.owner(key_slot(KEYS.events(p))).port for p in range(PARTITIONS)}

    def stream(self, p: int, keys: StreamKeys = KEYS) -> list[tuple[str, dict]]:
        rows = self.cluster.command(keys.events(p), "XRANGE", keys.events(p), "-", "+")
        return [(i.decode(), json.loads(dict(zip(f[::2], f[1::2]))[b"data"])) for i, f in rows]

    def test_keyslot_matches_the_server(self):
        rng = random.Random(7)
        keys = [KEYS.events(p) for p in range(64)] + [KEYS.seen(3, f"evt-{i}") for i in range(20)]
        keys += ["".join(rng.choice("ab{}xyz01") for _ in range(rng.randint(1, 12))) for _ in range(200)]
        node = self.cluster.nodes[0]
        for k in keys:
            self.assertEqual(key_slot(k), node.sync_command("CLUSTER", "KEYSLOT", k), k)

    async def test_ingest_spreads_over_masters_and_keeps_merchant_order(self):
        w = self.writer()
        merchants = [f"merchant-{i}" for i in range(40)]

        async def produce(m: str) -> None:
            for seq in range(25):  # one merchant's events one after another, merchants concurrently
                await w.append([event(f"{m}-{seq}", m, seq)], received_at_ms=1_700_000_000_000)

        await defer.gatherResults([defer.ensureDeferred(produce(m)) for m in merchants])
        owners = self.owners()
        self.assertEqual(set(owners.values()), {n.port for n in self.cluster.nodes}, "partitions on every master")
        per_master = {n.port: 0 for n in self.cluster.nodes}
        by_merchant: dict[str, list[int]] = {}
        for p in range(PARTITIONS):
            entries = self.stream(p)
            per_master[owners[p]] += len(entries)
            for _, data in entries:
                self.assertEqual(partition_for(data["merchant_id_hash"], PARTITIONS), p)
                by_merchant.setdefault(data["merchant_id_hash"], []).append(data["seq"])
        self.assertTrue(all(n > 0 for n in per_master.values()), per_master)
        self.assertEqual(sum(per_master.values()), 40 * 25)
        for m in merchants:
            self.assertEqual(by_merchant[m], list(range(25)), m)
        # dedupe records live beside their stream: a retry is a duplicate with the original id
        again = await w.append([event("merchant-3-0", "merchant-3", 0)], received_at_ms=1)
        self.assertTrue(again[0].duplicate)

    async def test_consumer_reads_every_partition(self):
        await create_group(self.client, KEYS, PARTITIONS, "g", "0")
        handler = RecordingHandler()
        metrics = Metrics()
        config = ConsumerConfig(name="c1", group="g", handler="noop", batch_size=50, block_ms=200,
                                consumer_name="c1")
        svc = ConsumerService(config, handler, self.client, lambda: open_read_connection(self.target, 200, 2.0),
                              KEYS, PARTITIONS, metrics.consumers, reactor, per_partition_reads=True)
        svc.startService()
        w = self.writer()
        events = [event(f"e{i}", f"m{i % 30}", i) for i in range(400)]
        written = await w.append(events, received_at_ms=1_700_000_000_000)
        expected = {(partition_for(e.merchant_id_hash, PARTITIONS), r.stream_id) for e, r in zip(events, written)}
        self.assertEqual(len({p for p, _ in expected}), PARTITIONS)

        def all_acked() -> bool:
            return all(int(self.cluster.command(KEYS.events(p), "XPENDING", KEYS.events(p), "g")[0]) == 0
                       for p in range(PARTITIONS))

        await wait_for(lambda: len(handler.entries) >= 400 and all_acked(), what="every partition consumed")
        self.assertEqual({(e.partition, e.stream_id) for e in handler.entries}, expected)
        self.assertEqual(len(handler.entries), 400)
        await svc.stopService()

    async def test_slot_migration_under_load_loses_nothing(self):
        w = self.writer()
        moving = [p for p in range(PARTITIONS) if self.owners()[p] == self.owners()[0]][:2]
        destination = next(n for n in self.cluster.nodes if n.port != self.owners()[0])
        acked: dict[str, str] = {}
        retried = 0
        stop = False

        async def produce(m: str) -> None:
            nonlocal retried
            seq = 0
            while not stop or seq < 5:
                e = event(f"{m}-{seq}", m, seq)
                while True:  # a producer retries a 503 with the same event_id, as the docs tell it to
                    try:
                        [r] = await w.append([e], received_at_ms=1_700_000_000_000)
                        break
                    except RedisUnavailable:
                        retried += 1
                acked[e.event_id] = r.stream_id
                seq += 1

        # merchants that land on the partitions being moved, and a few elsewhere
        merchants = [m for m in (f"mm-{i}" for i in range(400)) if partition_for(m, PARTITIONS) in moving][:12]
        merchants += [m for m in (f"other-{i}" for i in range(50)) if partition_for(m, PARTITIONS) not in moving][:4]
        producers = [defer.ensureDeferred(produce(m)) for m in merchants]
        await wait_for(lambda: len(acked) >= 200, what="load before the migration")
        moved = 0
        for p in moving:  # in a thread: the reactor keeps appending while keys move in batches
            moved += await threads.deferToThread(self.cluster.migrate_slot, key_slot(KEYS.events(p)), destination, 5)
        await wait_for(lambda: self.client.redirects["MOVED"] > 0, what="a MOVED followed")
        before = len(acked)
        await wait_for(lambda: len(acked) >= before + 100, what="load after the migration")
        stop = True
        await defer.gatherResults(producers)

        # compact dedupe records: a few dozen bucket hashes + the table + the streams, moved 5 at a
        # time while the producers keep appending (it was one key per event before)
        self.assertGreater(moved, 20)
        for p in moving:
            self.assertEqual(self.owners()[p], destination.port)
        found: dict[str, list[str]] = {}
        by_merchant: dict[str, list[int]] = {}
        for p in range(PARTITIONS):
            for stream_id, data in self.stream(p):
                found.setdefault(data["event_id"], []).append(stream_id)
                by_merchant.setdefault(data["merchant_id_hash"], []).append(data["seq"])
        self.assertEqual({k: [v] for k, v in acked.items()}, found, "every acknowledged event once, nothing else")
        for m, seqs in by_merchant.items():
            self.assertEqual(seqs, sorted(seqs), m)
        # the dedupe records moved with the slot
        m = merchants[0]
        [again] = await w.append([event(f"{m}-0", m, 0)], received_at_ms=1)
        self.assertEqual((again.stream_id, again.duplicate), (acked[f"{m}-0"], True))

    def test_sync_cluster_client(self):
        with open_sync(self.cluster.url, timeout=5) as c:
            self.assertIsInstance(c, SyncCluster)
            for p in range(PARTITIONS):
                c.command("XADD", KEYS.events(p), "*", "p", str(p))
            self.assertEqual([c.command("XLEN", KEYS.events(p)) for p in range(PARTITIONS)], [1] * PARTITIONS)
            self.assertEqual(c.command("PING"), "PONG")
            self.assertEqual(evalsha_sync(c, Script("xlen", "return redis.call('XLEN', KEYS[1])"), [KEYS.events(5)], []), 1)
            slot = key_slot(KEYS.events(0))
            target = next(n for n in self.cluster.nodes if n is not self.cluster.owner(slot))
            self.cluster.migrate_slot(slot, target)
            self.assertEqual(c.command("XLEN", KEYS.events(0)), 1)  # followed the MOVED
            self.assertEqual(c.slots.owner(slot), ("127.0.0.1", target.port))


    async def test_node_ingests_consumes_dead_letters_and_reports_on_a_cluster(self):
        key = self.id()
        config = "\n".join([
            'roles = ["ingest", "consumers"]', "[[consumers]]", 'name = "rec"', 'group = "recorders"',
            'handler = "tests.support.handlers:RecordingHandler"', "block_ms = 200", "max_deliveries = 2",
            "min_idle_ms = 50", "reclaim_interval = 0.1",
            f'options = {{ key = "{key}", fail_types = ["payment_disputed"] }}',
        ]) + "\n"
        node = await start_node(self, self.cluster.url, config_text=config, partitions=PARTITIONS)
        # the node's pool learns the slots and reaches every master: /ready turns 200 (it answers
        # 503 "no answer since PayFlux started" until then, within 50 ms: poll it as a probe would)
        await wait_for_deferred(lambda: node.get("/ready", side=True), lambda r: r.code == 200)
        events = [sample_event(n) for n in range(60)]
        bad = sample_event(99, event_type="payment_disputed")
        moved_partition = partition_for(events[0]["merchant_id_hash"], PARTITIONS)
        slot = key_slot(KEYS.events(moved_partition))
        await threads.deferToThread(self.cluster.migrate_slot, slot,
                                    next(n for n in self.cluster.nodes if n is not self.cluster.owner(slot)))
        response = await node.post("/v1/events/payment_exhaust/batch",
                                   "\n".join(json.dumps(e) for e in [*events, bad]), "application/x-ndjson")
        self.assertEqual(response.code, 202, await response.text())
        self.assertEqual((await response.json())["accepted"], 61)
        lengths = {p: len(self.stream(p, StreamKeys("payflux"))) for p in range(PARTITIONS)}
        self.assertEqual(sum(lengths.values()), 61)
        self.assertGreater(len({self.owners()[p] for p, n in lengths.items() if n}), 1, "spread over masters")
        await wait_for(lambda: len(handlers.SEEN[key]) == 60, what="every good event handled")
        self.assertEqual({e.event_id for e in handlers.SEEN[key]}, {e["event_id"] for e in events})
        dlq = StreamKeys("payflux").dlq(partition_for(bad["merchant_id_hash"], PARTITIONS))
        await wait_for(lambda: self.cluster.command(dlq, "XLEN", dlq) == 1, what="the bad event dead-lettered")
        ready = await node.get("/ready", side=True)
        self.assertEqual(ready.code, 200)
        text = await (await node.get("/metrics", side=True)).text()
        moved = [line for line in text.splitlines() if line.startswith('payflux_redis_cluster_redirects_total{kind="MOVED"}')]
        self.assertEqual(len(moved), 1, text)
        self.assertGreaterEqual(float(moved[0].split()[-1]), 1.0)
        out = await threads.deferToThread(
            subprocess.run, [*PAYFLUX, "stream", "info", "--redis-url", self.cluster.url, "--partitions",
                             str(PARTITIONS), "--json"], capture_output=True, timeout=60, env=clean_env())
        self.assertEqual(out.returncode, 0, out.stderr)
        info = json.loads(out.stdout)["partitions"]
        self.assertEqual(sum(p["length"] for p in info), 61)
        self.assertEqual(sum(p["dlq_depth"] for p in info), 1)
        self.assertEqual({p["node"] for p in info}, {f"127.0.0.1:{n.port}" for n in self.cluster.nodes})
        # a master going away: /ready turns 503 (PING goes to every master)
        self.cluster.nodes[1].kill()
        await wait_for_deferred(lambda: node.get("/ready", side=True), lambda r: r.code == 503)


async def wait_for_deferred(call: Any, predicate: Any, timeout: float = 15.0) -> None:
    for _ in range(int(timeout / 0.1)):
        if predicate(await call()):
            return
        await task.deferLater(reactor, 0.1, lambda: None)
    raise AssertionError("condition not reached in time")


redis_test_cases(ClusterMixin, globals())


class FakeMember:
    """A cluster member double: CLUSTER SLOTS from ``slots``, other commands from ``script`` in order."""

    def __init__(self, slots: list, script: list | None = None, reachable: bool = True) -> None:
        self.slots = slots
        self.script = list(script or [])
        self.sent: list[tuple] = []
        if not reachable:
            self._factory = type("F", (), {"getConnection": lambda _self, peek=False: defer.Deferred()})()

    def execute_command(self, *args: Any) -> defer.Deferred:
        self.sent.append(args)
        if args[:2] == ("CLUSTER", "SLOTS"):
            return defer.succeed(self.slots)
        reply = self.script.pop(0) if self.script else "OK"
        return defer.fail(reply) if isinstance(reply, Exception) else defer.succeed(reply)

    def disconnect(self) -> defer.Deferred:
        return defer.succeed(None)


class ClusterClientTests(unittest.TestCase):
    """ClusterClient's redirect and failure handling with member doubles and a Clock."""

    A, B = ("10.0.0.1", 7000), ("10.0.0.2", 7000)
    SLOTS = [[0, 8191, [b"10.0.0.1", 7000, b"a"]], [8192, 16383, [b"10.0.0.2", 7000, b"b"]]]

    def client(self, members: dict, **kw: Any):
        from payflux.redis.cluster import ClusterClient

        self.clock = task.Clock()
        target = parse_redis_url("redis+cluster://10.0.0.1:7000")
        return ClusterClient(target, lambda t: members[(t.host, t.port)], reactor=self.clock, **kw)

    def test_moved_updates_the_slot_and_resends(self):
        import txredisapi

        slot = key_slot("foo")  # 12182: owned by B in the table
        b = FakeMember(self.SLOTS, [txredisapi.ResponseError(f"MOVED {slot} 10.0.0.1:7000")])
        a = FakeMember(self.SLOTS, ["v"])
        c = self.client({self.A: a, self.B: b})
        self.successResultOf(c.refresh())
        a.slots = b.slots = [[0, 16383, [b"10.0.0.1", 7000, b"a"]]]  # the cluster moved everything to A
        self.assertEqual(self.successResultOf(c.execute_command("GET", "foo")), "v")
        self.assertEqual(c.slots.owner(slot), self.A)
        self.assertEqual(c.redirects["MOVED"], 1)
        self.assertIn(("GET", "foo"), a.sent)

    def test_ask_sends_asking_on_the_target_and_keeps_the_table(self):
        import txredisapi

        slot = key_slot("foo")
        b = FakeMember(self.SLOTS, [txredisapi.ResponseError(f"ASK {slot} 10.0.0.1:7000")])
        a = FakeMember(self.SLOTS, ["OK", "v"])
        c = self.client({self.A: a, self.B: b})
        self.assertEqual(self.successResultOf(c.execute_command("GET", "foo")), "v")
        self.assertEqual([s for s in a.sent if s[0] != "CLUSTER"], [("ASKING",), ("GET", "foo")])
        self.assertEqual(c.slots.owner(slot), self.B)

    def test_tryagain_is_retried_then_gives_up_with_a_503_code(self):
        import txredisapi

        from payflux.redis.replies import UNAVAILABLE_CODES

        b = FakeMember(self.SLOTS, [txredisapi.ResponseError("TRYAGAIN split slot")] * 10)
        c = self.client({self.A: FakeMember(self.SLOTS), self.B: b}, max_redirects=3)
        d = c.execute_command("EVALSHA", "sha", 1, "foo")
        for _ in range(4):
            self.clock.advance(c.tryagain_delay)
        failure = self.failureResultOf(d)
        self.assertTrue(str(failure.value).startswith("TRYAGAIN"))
        self.assertTrue(UNAVAILABLE_CODES.search(str(failure.value)))
        self.assertEqual(len([s for s in b.sent if s[0] == "EVALSHA"]), 4)

    def test_an_unreachable_member_fails_within_connect_timeout(self):
        import txredisapi

        c = self.client({self.A: FakeMember(self.SLOTS), self.B: FakeMember(self.SLOTS, reachable=False)},
                        connect_timeout=2.0)
        d = c.execute_command("GET", "foo")
        self.assertNoResult(d)
        self.clock.advance(2.0)
        self.failureResultOf(d, txredisapi.ConnectionError)
        # the other master still answers
        self.assertEqual(self.successResultOf(c.execute_command("GET", "bar")), "OK")  # bar: slot 5061, A

    def test_disconnect_fails_callers_still_waiting_for_a_member(self):
        import txredisapi

        c = self.client({self.A: FakeMember(self.SLOTS), self.B: FakeMember(self.SLOTS, reachable=False)})
        self.successResultOf(c.execute_command("GET", "bar"))
        d = c.execute_command("GET", "foo")
        self.successResultOf(c.disconnect())
        self.failureResultOf(d, txredisapi.ConnectionError)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_ping_and_script_go_to_every_master(self):
        a, b = FakeMember(self.SLOTS, ["PONG"]), FakeMember(self.SLOTS, ["PONG"])
        c = self.client({self.A: a, self.B: b})
        self.assertEqual(self.successResultOf(c.execute_command("PING")), "PONG")
        self.assertIn(("PING",), a.sent)
        self.assertIn(("PING",), b.sent)
