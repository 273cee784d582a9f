"""
Redis Sentinel (issue 7, fault scenario 3): PayFlux follows a failover, and the WAIT-based
durability option (``min_replicas_ack``) keeps every acknowledged event through it.

A real topology per test: one primary, one replica (``--replicaof``) and three sentinels
(``redis-server <conf> --sentinel``, quorum 2, ``down-after-milliseconds`` 1000), all on free
127.0.0.1 ports in temp dirs, with the redis-server >= 7 found on PATH (skipped without one).
The failover tests drive batches through a real node, SIGKILL the primary, and count every
2xx'd event_id that is missing from the promoted replica's stream afterwards.  Run with
``.venv/bin/python -m twisted.trial tests.test_sentinel``; ``PAYFLUX_SENTINEL_REPORT=<file>``
appends each failover run's numbers to that file as one JSON line (docs/sentinel.md).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import txredisapi
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred, fail, gatherResults, succeed
from twisted.internet.task import deferLater
from twisted.trial import unittest

from payflux.config import ConfigError, load_settings
from payflux.send import sample_event
from payflux.redis.connect import connect
from payflux.redis.target import parse_redis_url
from payflux.streams.keys import StreamKeys
from payflux.redis.replies import is_primary, parse_master_reply
from payflux.redis.connect import open_sync
from payflux.streams.writer import PreparedEvent, RedisUnavailable, ReplicasNotAcked, StreamWriter, fingerprint_of
from tests.support.node import read_json, start_node
from tests.support.redis import RedisProcess, RedisReplyError, find_redis_binaries

BATCH = "/v1/events/payment_exhaust/batch"
SINGLE = "/v1/events/payment_exhaust"
MASTER = "mymaster"
REDIS7 = find_redis_binaries().get("7")
NO_REDIS7 = None if REDIS7 else "no redis-server >= 7 on PATH (.ci/run installs Debian's redis-server)"


def sleep(seconds: float):
    return deferLater(reactor, seconds, lambda: None)


def bounded(d: Deferred, seconds: float) -> Deferred:
    """``d``'s result, or a TimeoutError after ``seconds`` (``d`` itself is left alone, not cancelled)."""
    result: Deferred = Deferred()
    d.addBoth(lambda r: None if result.called else result.callback(r))
    timer = reactor.callLater(seconds, lambda: result.called or result.errback(TimeoutError(f"no result in {seconds:g}s")))
    return result.addBoth(lambda r: (timer.cancel() if timer.active() else None, r)[1])


async def until(condition, timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``condition()`` (may raise) until it returns something truthy; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            value = condition()
            if isinstance(value, Deferred):
                value = await bounded(value, max(0.1, deadline - time.monotonic()))
            if value:
                return value
        except Exception as e:  # noqa: BLE001 - not there yet
            last = e
        await sleep(interval)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what} (last error: {last})")


class SentinelProcess(RedisProcess):
    """``redis-server sentinel.conf --sentinel`` monitoring the primary at ``primary_port`` as ``mymaster``."""

    def __init__(self, binary: str, testcase: unittest.TestCase, primary_port: int) -> None:
        self.primary_port = primary_port
        super().__init__(binary, testcase=testcase)

    def _args(self) -> list[str]:
        conf = os.path.join(self.dir, "sentinel.conf")
        with open(conf, "w") as f:
            f.write(
                f"port {self.port}\nbind 127.0.0.1\ndaemonize no\ndir {self.dir}\n"
                f"logfile {os.path.join(self.dir, 'redis.log')}\n"
                f"sentinel monitor {MASTER} 127.0.0.1 {self.primary_port} 2\n"
                f"sentinel down-after-milliseconds {MASTER} 1000\n"
                f"sentinel failover-timeout {MASTER} 3000\n"
                f"sentinel parallel-syncs {MASTER} 1\n"
            )
        return [self.binary, conf, "--sentinel"]


def _info(node: RedisProcess, section: str) -> dict[str, str]:
    text = node.sync_command("INFO", section).decode()
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


class SentinelTopology:
    """A primary, one replica and three sentinels; ``url`` is the ``redis+sentinel://`` URL."""

    def __init__(self, binary: str, testcase: unittest.TestCase, sentinels: int = 3) -> None:
        self.binary = binary
        # no 5 s pause before a full sync (Redis 7's repl-diskless-sync-delay default): the old
        # primary, restarted as a replica, is in sync about a second after it comes back
        fast_sync = ["--repl-diskless-sync-delay", "0"]
        self.primary = RedisProcess(binary, testcase=testcase, extra_args=fast_sync)
        self.replica = RedisProcess(binary, testcase=testcase,
                                    extra_args=[*fast_sync, "--replicaof", "127.0.0.1", str(self.primary.port)])
        self.wait_replicating(self.replica, timeout=10)
        self.sentinels = [SentinelProcess(binary, testcase, self.primary.port) for _ in range(sentinels)]
        self.url = "redis+sentinel://" + ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels) + f"/{MASTER}"
        deadline = time.monotonic() + 15
        while not all(self._sees_everyone(s, sentinels - 1) for s in self.sentinels):
            if time.monotonic() > deadline:
                raise RuntimeError("sentinels did not discover each other and the replica in 15 s")
            time.sleep(0.1)

    @staticmethod
    def wait_replicating(node: RedisProcess, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while _info(node, "replication").get("master_link_status") != "up":
            if time.monotonic() > deadline:
                raise RuntimeError(f"replica on {node.port} did not connect to its primary")
            time.sleep(0.05)

    @staticmethod
    def _sees_everyone(sentinel: SentinelProcess, others: int) -> bool:
        try:
            reply = sentinel.sync_command("SENTINEL", "MASTER", MASTER)
        except (OSError, RedisReplyError):
            return False
        state = dict(zip(reply[::2], reply[1::2]))
        return int(state[b"num-other-sentinels"]) >= others and int(state[b"num-slaves"]) >= 1

    def master_port(self) -> int | None:
        """The primary's port as the first sentinel that answers names it."""
        for s in self.sentinels:
            try:
                addr = parse_master_reply(s.sync_command("SENTINEL", "get-master-addr-by-name", MASTER))
            except (OSError, RedisReplyError):
                continue
            if addr is not None:
                return addr[1]
        return None


def stream_ids(node: RedisProcess) -> list[str]:
    """event_id of every entry of partition 0, in stream order."""
    entries = node.sync_command("XRANGE", "payflux:{0}:events", "-", "+")
    ids = []
    for _, fields in entries:
        fields = dict(zip(fields[::2], fields[1::2]))
        ids.append(fields[b"event_id"].decode())
    return ids


class Load:
    """``workers`` producers posting batches of ``batch`` new events until stopped; remembers every 2xx."""

    def __init__(self, node: Any, workers: int = 6, batch: int = 10) -> None:
        self.node = node
        self.workers = workers
        self.batch = batch
        self.acked: set[str] = set()
        self.statuses: dict[str, int] = {}
        self.acked_at: list[tuple[float, float]] = []  # (sent, answered) monotonic times of every 2xx
        self.slowest = 0.0
        self.stopped = False
        self.running: Any = None

    def start(self) -> None:
        self.running = gatherResults([ensureDeferred(self._worker(w)) for w in range(self.workers)])

    async def _worker(self, w: int) -> None:
        n = 0
        while not self.stopped:
            events = [sample_event(w * 1_000_000 + n + i) for i in range(self.batch)]
            n += self.batch
            started = time.monotonic()
            response = await self.node.post(BATCH, "\n".join(json.dumps(e) for e in events), "application/x-ndjson")
            body = await read_json(response)
            self.slowest = max(self.slowest, time.monotonic() - started)
            reason = str(response.code) if response.code != 503 else f"503 {body.get('error')}"
            self.statuses[reason] = self.statuses.get(reason, 0) + 1
            if response.code == 202:
                self.acked.update(e["event_id"] for e in events)
                self.acked_at.append((started, time.monotonic()))
            elif response.code == 503:
                await sleep(0.05)
            else:
                raise AssertionError(f"unexpected {response.code}: {body}")

    def acked_after(self, t: float) -> int:
        """2xx answers to requests sent after ``t``."""
        return sum(1 for sent, _ in self.acked_at if sent > t)

    async def stop(self) -> None:
        self.stopped = True
        await self.running


class FailoverTests(unittest.TestCase):
    """Kill -9 the primary under load, with WAIT off and on (one fresh topology each)."""

    skip = NO_REDIS7
    timeout = 50

    async def _failover(self, min_replicas_ack: int) -> dict[str, Any]:
        topo = SentinelTopology(REDIS7, self)
        node = await start_node(self, topo.url, redis_timeout="1.0", min_replicas_ack=str(min_replicas_ack),
                                replica_ack_timeout="300")

        def ready():
            return node.get("/ready", side=True).addCallback(lambda r: r.code == 200)

        await until(ready, 10, "/ready 200 before the failover")
        load = Load(node)
        load.start()
        await until(lambda: len(load.acked) >= 300, 10, "300 acknowledged events before the kill")
        await sleep(0.3)

        old, new = topo.primary, topo.replica
        killed = time.monotonic()
        old.kill()
        await until(lambda: topo.master_port() == new.port, 20, "the sentinels to promote the replica")
        promoted = time.monotonic()
        # the operator brings the dead primary back as a replica of the new one, so that
        # min_replicas_ack=1 can be met again
        old.extra_args = [*old.extra_args[:2], "--replicaof", "127.0.0.1", str(new.port)]
        old.start()
        await until(lambda: load.acked_after(promoted) >= 3, 15, "appends to succeed on the new primary")
        recovered = min(answered for sent, answered in load.acked_at if sent > killed)
        await until(ready, 5, "/ready 200 after the failover")
        await sleep(0.3)
        await load.stop()

        self.assertEqual(node.node.pool.handler.primary, ("127.0.0.1", new.port))
        self.assertTrue(is_primary(new.sync_command("ROLE")))
        stored = stream_ids(new)
        self.assertEqual(len(stored), len(set(stored)), "an event was appended twice")
        lost = load.acked - set(stored)
        self.assertLess(load.slowest, 5.0, "a request hung instead of a bounded 503")
        result = {
            "min_replicas_ack": min_replicas_ack,
            "acknowledged": len(load.acked),
            "requests": load.statuses,
            "in_new_primary": len(stored),
            "acknowledged_lost": len(lost),
            "failover_s": round(promoted - killed, 2),
            "first_2xx_after_kill_s": round(recovered - killed, 2),  # of a request sent after the kill
            "slowest_request_s": round(load.slowest, 3),
        }
        report = os.environ.get("PAYFLUX_SENTINEL_REPORT")
        if report:
            with open(report, "a") as f:
                f.write(json.dumps(result) + "\n")
        return result

    async def test_follows_failover_without_wait(self):
        """WAIT off: PayFlux follows the new primary; acknowledged loss is measured, not asserted."""
        result = await self._failover(0)
        self.assertGreater(result["acknowledged"], 300)
        self.assertLess(result["first_2xx_after_kill_s"], 15)

    async def test_wait_loses_no_acknowledged_event(self):
        """WAIT on (min_replicas_ack=1): every 2xx'd event is on the promoted replica."""
        result = await self._failover(1)
        self.assertEqual(result["acknowledged_lost"], 0, result)
        self.assertGreater(result["acknowledged"], 300)


class ReplicaAckTests(unittest.TestCase):
    """min_replicas_ack against a real primary and replica (no sentinels needed)."""

    skip = NO_REDIS7
    timeout = 30

    async def test_replica_that_never_acks_gets_503_and_retry_is_duplicate(self):
        primary = RedisProcess(REDIS7, testcase=self)
        replica = RedisProcess(REDIS7, testcase=self, extra_args=["--replicaof", "127.0.0.1", str(primary.port)])
        SentinelTopology.wait_replicating(replica, timeout=10)
        node = await start_node(self, primary.url, redis_timeout="1.0", min_replicas_ack="1",
                                replica_ack_timeout="200")
        good = sample_event(1)
        response = await node.post(SINGLE, good)
        self.assertEqual(response.code, 202, await response.text())

        replica.pause()  # connected, but never acknowledges anything
        self.addCleanup(replica.resume)
        event = sample_event(2)
        started = time.monotonic()
        response = await node.post(SINGLE, event)
        body = await read_json(response)
        self.assertEqual(response.code, 503, body)
        self.assertLess(time.monotonic() - started, 1.0)  # WAIT's 200 ms, not redis_timeout
        self.assertEqual(body["error"], "replicas_not_acked")
        self.assertIn("written on the primary", body["message"])
        self.assertIn("0 of the 1 required replicas", body["message"])
        self.assertIn("same event_id", body["message"])
        self.assertTrue(response.headers.hasHeader("Retry-After"))
        self.assertEqual(stream_ids(primary), [good["event_id"], event["event_id"]])  # written all the same

        response = await node.post(SINGLE, event)  # still no ack: still 503, still one entry
        self.assertEqual(response.code, 503)
        self.assertEqual(len(stream_ids(primary)), 2)

        replica.resume()
        response = await node.post(SINGLE, event)
        body = await read_json(response)
        self.assertEqual(response.code, 202, body)
        self.assertTrue(body["duplicate"])
        self.assertEqual(stream_ids(primary), [good["event_id"], event["event_id"]])
        await until(lambda: stream_ids(replica) == stream_ids(primary), 5, "the replica to catch up")

    async def _writer_commands(self, min_replicas_ack: int, wait_error: str | None = None) -> tuple[list[str], Any]:
        redis = RedisProcess(REDIS7, testcase=self)  # no replica at all
        conn = await txredisapi.Connection("127.0.0.1", redis.port, reconnect=False, convertNumbers=False)
        self.addCleanup(conn.disconnect)
        sent: list[str] = []

        class Recording:  # a single connection that logs each command's name
            def execute_command(self, *args: Any, **kwargs: Any):
                sent.append(str(args[0]))
                if args[0] == "WAIT" and wait_error:
                    return fail(txredisapi.ResponseError(wait_error))
                return conn.execute_command(*args, **kwargs)

        writer = StreamWriter(Recording(), StreamKeys("payflux"), 1, 60, timeout=2.0, reactor=reactor,
                              min_replicas_ack=min_replicas_ack, replica_ack_timeout_ms=50)
        canonical = json.dumps(sample_event(3), sort_keys=True).encode()
        event = PreparedEvent("evt_wait_unit", "m_1", "payment_failed", canonical, fingerprint_of(canonical))
        try:
            result: Any = await writer.append([event], int(time.time() * 1000))
        except RedisUnavailable as e:
            result = e
        return sent, (result, redis)

    async def test_wait_off_sends_nothing_extra(self):
        sent, (result, _) = await self._writer_commands(0)
        self.assertNotIn("WAIT", sent)
        self.assertEqual(sent.count("EVALSHA"), 2)  # NOSCRIPT, SCRIPT LOAD, EVALSHA
        self.assertFalse(result[0].duplicate)

    async def test_wait_reply_below_required_fails_the_append(self):
        sent, (result, redis) = await self._writer_commands(1)
        self.assertEqual(sent[-2:], ["EVALSHA", "WAIT"])  # pipelined right behind the append
        self.assertIsInstance(result, ReplicasNotAcked)
        self.assertEqual((result.acked, result.required), (0, 1))
        self.assertEqual(stream_ids(redis), ["evt_wait_unit"])

    async def test_wait_refused_is_unavailable(self):
        """A WAIT error reply (a demoted primary ran a write-free script) is a 503, not a 500."""
        _, (result, _) = await self._writer_commands(1, "ERR WAIT cannot be used with replica instances")
        self.assertIsInstance(result, RedisUnavailable)
        self.assertIn("redis refused WAIT: ERR WAIT cannot be used", str(result))


class ConfirmedPrimaryTests(unittest.TestCase):
    """Only a connection that answered ROLE master moves the pool's primary (a stale sentinel answer does not)."""

    def endpoint(self):
        from payflux.redis.sentinel import SentinelEndpoint, SentinelResolver

        target = parse_redis_url("redis+sentinel://127.0.0.1:27000/mymaster")
        endpoint = SentinelEndpoint(target, SentinelResolver(target, 1.0), 1.0, reactor=None)

        class Transport:
            closed = False

            def loseConnection(self):
                self.closed = True

        class Conn:
            def __init__(self, addr):
                self.payflux_address, self.transport = addr, Transport()

        class Factory:
            pool = [Conn(("10.0.0.1", 7000)), Conn(("10.0.0.2", 7000))]

        endpoint.factory = Factory()
        return endpoint, Factory.pool

    def test_confirming_a_new_primary_drops_the_connections_elsewhere(self):
        endpoint, (old, new) = self.endpoint()
        endpoint.confirmed(("10.0.0.1", 7000))
        self.assertEqual((endpoint.current, endpoint.switches), (("10.0.0.1", 7000), 0))
        self.assertEqual((old.transport.closed, new.transport.closed), (False, True))
        new.transport.closed = False
        endpoint.confirmed(("10.0.0.2", 7000))  # the failover: a connection to the new one answered master
        self.assertEqual((endpoint.current, endpoint.switches), (("10.0.0.2", 7000), 1))
        self.assertEqual((old.transport.closed, new.transport.closed), (True, False))
        endpoint.confirmed(("10.0.0.2", 7000))  # more connections to it: nothing changes
        self.assertEqual(endpoint.switches, 1)

    def test_a_connection_refused_by_role_changes_nothing(self):
        from twisted.logger import formatEvent

        from payflux.redis.sentinel import primary_only

        endpoint, (old, new) = self.endpoint()
        endpoint.confirmed(("10.0.0.2", 7000))
        new.transport.closed = old.transport.closed = False

        class Peer:
            host, port = "10.0.0.1", 7000  # what a sentinel still naming the old primary sent us to

        class Handler:
            pass

        Handler.endpoint = endpoint

        class Transport:
            lost = False

            def getPeer(self):
                return Peer()

            def loseConnection(self):
                self.lost = True

        protocol = primary_only(None).__new__(primary_only(None))
        protocol.transport, protocol.password = Transport(), None
        protocol.factory = type("F", (), {"handler": Handler})()
        protocol.execute_command = lambda *args: succeed(["slave", "10.0.0.2", 7000, "connected", 100])
        events: list = []
        from twisted.logger import globalLogPublisher

        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        protocol.connectionMade()
        self.assertTrue(protocol.transport.lost)
        self.assertIn("10.0.0.1:7000 is not a primary", " ".join(formatEvent(e) for e in events))
        self.assertEqual((endpoint.current, endpoint.switches), (("10.0.0.2", 7000), 0))
        self.assertFalse(new.transport.closed)


class SentinelUrlTests(unittest.TestCase):
    def test_parse(self):
        t = parse_redis_url("redis+sentinel://app:p%40ss@10.0.0.1:5000,[::1]:5001/mymaster"
                            "?db=3&sentinel_password=s3cret&sentinel_username=watcher")
        self.assertTrue(t.sentinel)
        self.assertFalse(t.cluster or t.tls)
        self.assertEqual(t.seeds, (("10.0.0.1", 5000), ("::1", 5001)))
        self.assertEqual((t.master_name, t.db, t.username, t.password), ("mymaster", 3, "app", "p@ss"))
        self.assertEqual((t.sentinel_username, t.sentinel_password), ("watcher", "s3cret"))
        shown = t.redacted()
        self.assertNotIn("s3cret", shown + repr(t))
        self.assertNotIn("p@ss", shown + repr(t))
        self.assertEqual(shown, "redis+sentinel://app:***@10.0.0.1:5000,[::1]:5001/mymaster"
                                "?db=3&sentinel_username=watcher&sentinel_password=***")

    def test_tls_and_defaults(self):
        t = parse_redis_url("rediss+sentinel://s1:5000/pay-primary?ca_file=/etc/ca.pem")
        self.assertTrue(t.tls and t.sentinel)
        self.assertEqual((t.db, t.password, t.sentinel_password, t.ca_file), (0, None, None, "/etc/ca.pem"))

    def test_rejected(self):
        for url, words in [
            ("redis+sentinel://10.0.0.1:5000", "master-name"),
            ("redis+sentinel://10.0.0.1:5000/", "master-name"),
            ("redis+sentinel://10.0.0.1:5000/a/b", "master-name"),
            ("redis+sentinel://10.0.0.1/mymaster", "must be host:port"),
            ("redis+sentinel://10.0.0.1:0/mymaster", "port of 10.0.0.1"),
            ("redis+sentinel://10.0.0.1:5000,/mymaster", "host:port"),
            ("redis+sentinel://10.0.0.1:5000/mymaster?db=x", "database"),
            ("redis+sentinel://10.0.0.1:5000/mymaster?ca_file=/x", "unknown parameter"),
            ("redis+sentinel://10.0.0.1:5000/mymaster?sentinel_password=a&sentinel_password=b", "more than once"),
        ]:
            with self.assertRaises(ValueError, msg=url) as caught:
                parse_redis_url(url)
            self.assertIn(words, str(caught.exception), url)

    def test_settings(self):
        url = "redis+sentinel://127.0.0.1:5000/mymaster"
        settings = load_settings({"redis_url": url, "insecure_dev_mode": True, "min_replicas_ack": "1",
                                  "replica_ack_timeout": "250"}, env={})
        self.assertEqual((settings.min_replicas_ack, settings.replica_ack_timeout), (1, 250))
        self.assertFalse(settings.redis_cluster)
        default = load_settings({"redis_url": url, "insecure_dev_mode": True}, env={})
        self.assertEqual((default.min_replicas_ack, default.replica_ack_timeout), (0, 500))
        for cli, option in [
            ({"min_replicas_ack": "1"}, "min_replicas_ack"),  # embedded Redis: no replicas
            ({"redis_url": url, "min_replicas_ack": "1", "replica_ack_timeout": "2000"}, "replica_ack_timeout"),
            ({"redis_url": "redis+cluster://127.0.0.1:7000", "min_replicas_ack": "1"}, "min_replicas_ack"),
            ({"redis_url": url, "min_replicas_ack": "-1"}, "min_replicas_ack"),
            ({"redis_url": url, "replica_ack_timeout": "0"}, "replica_ack_timeout"),
        ]:
            with self.assertRaises(ConfigError, msg=cli) as caught:
                load_settings({"insecure_dev_mode": True, **cli}, env={})
            self.assertEqual(caught.exception.option, option)


class SentinelClientTests(unittest.TestCase):
    """The async pool and the CLI's resolver against real sentinels, without a failover."""

    skip = NO_REDIS7
    timeout = 30

    async def test_pool_and_cli_reach_the_primary(self):
        topo = SentinelTopology(REDIS7, self)
        handler = connect(parse_redis_url(topo.url + "?db=2"), 2, 2.0, 2.0)
        self.addCleanup(handler.disconnect)
        self.assertEqual(await handler.execute_command("SET", "k", "v"), "OK")
        self.assertIn(b"db2:keys=1", topo.primary.sync_command("INFO", "keyspace"))
        self.assertEqual(handler.primary, ("127.0.0.1", topo.primary.port))
        with open_sync(topo.url) as client:
            self.assertTrue(is_primary(client.command("ROLE")))
            self.assertEqual(client.command("INFO", "server").count(f"tcp_port:{topo.primary.port}"), 1)

    async def test_dead_sentinels_are_skipped_and_replicas_refused(self):
        topo = SentinelTopology(REDIS7, self)
        topo.sentinels[0].kill()
        handler = connect(parse_redis_url(topo.url), 1, 1.0, 2.0)
        self.addCleanup(handler.disconnect)
        self.assertEqual(await handler.execute_command("PING"), "PONG")
        self.assertEqual(handler.primary, ("127.0.0.1", topo.primary.port))
        # a demoted primary: READONLY reaches the caller, and the pool reconnects through the
        # sentinels (which still name it, so it is refused by ROLE until it is a primary again)
        topo.primary.sync_command("REPLICAOF", "127.0.0.1", topo.replica.port)
        with self.assertRaises(txredisapi.ResponseError) as caught:
            await handler.execute_command("SET", "k", "v")
        self.assertIn("READONLY", str(caught.exception))
        topo.primary.sync_command("REPLICAOF", "NO", "ONE")
        self.assertEqual(await until(lambda: handler.execute_command("SET", "k", "v"), 10, "a primary again"), "OK")

    def test_cli_without_a_known_master(self):
        from payflux.redis.sync import RedisConnectionError

        if not REDIS7:
            raise unittest.SkipTest(NO_REDIS7)
        sentinel = SentinelProcess(REDIS7, self, primary_port=1)
        with self.assertRaises(RedisConnectionError) as caught:
            open_sync(f"redis+sentinel://127.0.0.1:{sentinel.port}/other-name", timeout=2.0)
        self.assertIn("does not monitor 'other-name'", str(caught.exception))
