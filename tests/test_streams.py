"""Key naming, the partition function and Redis URL parsing (no Redis needed)."""

from __future__ import annotations

import zlib

from hypothesis import given, strategies as st
from twisted.trial import unittest

from payflux.redis.target import RedisTarget, parse_redis_url
from payflux.streams.keys import StreamKeys, partition_for


class StreamKeysTests(unittest.TestCase):
    def test_default_layout(self):
        k = StreamKeys()
        self.assertEqual(k.events(0), "payflux:{0}:events")
        self.assertEqual(k.dlq(3), "payflux:{3}:dlq")
        self.assertEqual(k.seen(7, "evt_123"), "payflux:{7}:seen:evt_123")

    def test_custom_prefix(self):
        self.assertEqual(StreamKeys("acme:prod").events(1), "acme:prod:{1}:events")

    def test_bad_prefixes(self):
        for bad in ["", "a{b", "a}b", "a b", "a\tb", "a\n"]:
            with self.assertRaises(ValueError, msg=repr(bad)):
                StreamKeys(bad)

    def test_bad_partition(self):
        with self.assertRaises(ValueError):
            StreamKeys().events(-1)

    def test_keys_of_a_partition_share_a_hash_tag(self):
        k = StreamKeys()
        tags = {key.split("{", 1)[1].split("}", 1)[0] for key in (k.events(5), k.dlq(5), k.seen(5, "x{y}"))}
        self.assertEqual(tags, {"5"})

    def test_seed_layout_names_the_go_payflux_keys(self):
        for k in (StreamKeys(layout="seed"), StreamKeys("acme:prod", layout="seed")):
            self.assertEqual(k.events(0), "events_stream")
            self.assertEqual(k.dlq(0), "events_stream_dlq")
            self.assertEqual(k.seen(0, "evt_123"), "{events_stream}:seen:evt_123")
        self.assertEqual(StreamKeys("acme:prod", layout="seed").prefix, "acme:prod")  # alerts etc. stay under it

    def test_seed_layout_has_one_partition(self):
        k = StreamKeys(layout="seed")
        for p in (1, 2, -1):
            for name in (k.events, k.dlq, lambda p: k.seen(p, "e")):
                with self.assertRaises(ValueError, msg=(name, p)):
                    name(p)

    def test_layouts(self):
        self.assertEqual(StreamKeys().layout, "payflux")
        self.assertEqual(StreamKeys(layout="payflux"), StreamKeys())
        self.assertNotEqual(StreamKeys(layout="seed"), StreamKeys())
        for bad in ("", "go", "SEED", None):
            with self.assertRaises((ValueError, TypeError), msg=repr(bad)):
                StreamKeys(layout=bad)


class PartitionTests(unittest.TestCase):
    # Fixed vectors: these are part of stream-format v1 and must never change.
    VECTORS = [
        ("merchant-a", 2, 1),
        ("merchant-a", 4, 3),
        ("merchant-a", 16, 15),
        ("abc123", 16, 12),
        ("abc123", 4, 0),
        ("m_1", 16, 0),
        ("", 16, 0),
        ("mérchant", 7, zlib.crc32("mérchant".encode()) % 7),
    ]

    def test_fixed_vectors(self):
        for merchant, partitions, expected in self.VECTORS:
            self.assertEqual(partition_for(merchant, partitions), expected, (merchant, partitions))

    def test_crc32_values(self):
        self.assertEqual(zlib.crc32(b"merchant-a"), 1462205343)
        self.assertEqual(zlib.crc32(b"abc123"), 3473062748)

    def test_one_partition_is_always_zero(self):
        self.assertEqual(partition_for("anything", 1), 0)

    def test_bad_partition_count(self):
        for bad in (0, -1):
            with self.assertRaises(ValueError):
                partition_for("m", bad)

    @given(st.text(), st.integers(min_value=1, max_value=1024))
    def test_in_range_and_matches_documented_formula(self, merchant, partitions):
        p = partition_for(merchant, partitions)
        self.assertTrue(0 <= p < partitions)
        self.assertEqual(p, zlib.crc32(merchant.encode("utf-8")) % partitions)


class ParseRedisUrlTests(unittest.TestCase):
    def test_plain(self):
        # the URL grammar's default port, parsed only: no test connects to 6379 (tests/support/redis.py)
        self.assertEqual(parse_redis_url("redis://localhost"), RedisTarget("redis", "localhost", 6379))

    def test_full(self):
        t = parse_redis_url("redis://user:p%40ss@redis.internal:7000/3")
        self.assertEqual((t.host, t.port, t.db, t.username, t.password), ("redis.internal", 7000, 3, "user", "p@ss"))
        self.assertFalse(t.tls)

    def test_password_only(self):
        t = parse_redis_url("redis://:secret@h:1/0")
        self.assertEqual((t.username, t.password), (None, "secret"))

    def test_ipv6(self):
        t = parse_redis_url("redis://[::1]:6380")
        self.assertEqual((t.host, t.port), ("::1", 6380))
        self.assertEqual(t.redacted(), "redis://[::1]:6380/0")

    def test_tls(self):
        t = parse_redis_url("rediss://h:6380/1?ca_file=/etc/ca.pem")
        self.assertTrue(t.tls)
        self.assertEqual((t.port, t.db, t.ca_file), (6380, 1, "/etc/ca.pem"))

    def test_unix(self):
        t = parse_redis_url("unix:///var/lib/payflux/redis.sock?db=2&password=s%20cret")
        self.assertEqual((t.scheme, t.path, t.db, t.password), ("unix", "/var/lib/payflux/redis.sock", 2, "s cret"))

    def test_unix_defaults(self):
        t = parse_redis_url("unix:///tmp/r.sock")
        self.assertEqual((t.db, t.password), (0, None))

    def test_errors(self):
        cases = {
            "": "empty",
            "localhost:6390": "scheme",
            "http://h": "scheme",
            "redis://": "missing host",
            "redis://h:0": "port",
            "redis://h:65536": "port",
            "redis://h:abc": "port",
            "redis://h:": "empty port",
            "redis://h/x": "database",
            "redis://h/-1": "database",
            "redis://h/1/2": "path",
            "redis://h/0?foo=1": "unknown parameter",
            "unix://relative/path": "three slashes",
            "unix:///": "absolute",
            "unix:///tmp/r.sock?db=x": "database",
            "unix:///tmp/r.sock?timeout=1": "unknown parameter",
        }
        for url, fragment in cases.items():
            with self.assertRaises(ValueError, msg=url) as ctx:
                parse_redis_url(url)
            message = str(ctx.exception)
            self.assertIn(fragment, message, url)
            self.assertNotIn("\n", message)

    def test_errors_never_show_the_password(self):
        for url in ["redis://u:hunter2@h:99999", "redis://:hunter2@h/x", "ftp://:hunter2@h"]:
            with self.assertRaises(ValueError) as ctx:
                parse_redis_url(url)
            self.assertNotIn("hunter2", str(ctx.exception))

    def test_password_redacted(self):
        for url in ["redis://u:hunter2@h:1/2", "rediss://:hunter2@h", "unix:///s.sock?password=hunter2"]:
            t = parse_redis_url(url)
            self.assertEqual(t.password, "hunter2")
            for text in (repr(t), str(t), t.redacted(), f"{t}"):
                self.assertNotIn("hunter2", text)
            self.assertIn("***", t.redacted())
        self.assertEqual(parse_redis_url("redis://u:hunter2@h:1/2").redacted(), "redis://u:***@h:1/2")


class TlsOptionsTests(unittest.TestCase):
    def test_rediss_gets_a_verifying_connection_creator(self):
        from twisted.internet.interfaces import IOpenSSLClientConnectionCreator

        from payflux.redis.target import tls_options

        creator = tls_options(parse_redis_url("rediss://redis.example.com:6380"))
        self.assertTrue(IOpenSSLClientConnectionCreator.providedBy(creator))


class ReportRefusalTests(unittest.TestCase):
    """A pool whose AUTH/SELECT failed: one log line saying which case, waiting commands fail."""

    def pool(self):
        from twisted.internet import defer

        class Queue:
            def __init__(self):
                self.waiting, self.peekers = [defer.Deferred()], [defer.Deferred()]

        class Factory:
            deferred = defer.Deferred()
            isLazy = True
            connectionQueue = Queue()

        return Factory()

    def run_case(self, reason: str) -> tuple[str, list]:
        import txredisapi
        from twisted.logger import globalLogPublisher, formatEvent

        from payflux.redis.txadapter import _report_refusal

        factory = self.pool()
        waiting = factory.connectionQueue.waiting + factory.connectionQueue.peekers
        events: list = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        _report_refusal(factory, parse_redis_url("redis://app:s3cret-pw@10.0.0.5:7000/2"))
        factory.deferred.errback(ValueError(f"Redis error: {reason}"))
        for d in waiting:
            self.failureResultOf(d, txredisapi.ConnectionError)
        lines = [formatEvent(e) for e in events if e.get("log_namespace", "").startswith("payflux.redis")]
        self.assertEqual(len(lines), 1, lines)
        self.assertNotIn("s3cret-pw", lines[0])
        return lines[0], waiting

    def test_a_refused_login_names_the_credentials(self):
        line, _ = self.run_case("could not auth: WRONGPASS invalid username-password pair")
        self.assertIn("refused PayFlux", line)
        self.assertIn("redis_password_file", line)

    def test_a_connection_lost_during_the_handshake_is_not_called_a_refusal(self):
        line, _ = self.run_case("could not set dbid=2: Lost connection")
        self.assertIn("closed the connection during AUTH/SELECT", line)
        self.assertNotIn("refused", line)
