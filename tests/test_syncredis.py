"""The CLI's blocking Redis client against real servers."""

from __future__ import annotations

import socket
import threading

from twisted.trial import unittest

from payflux.redis.scripts import Script, evalsha_sync
from payflux.redis.sync import RedisConnectionError, RedisReplyError, SyncRedis
from tests.support.redis import free_port, redis_test_cases


class SyncRedisMixin:
    def test_tcp_unix_replies_and_errors(self):
        server = self.start_redis()
        with SyncRedis.from_url(server.url) as r:
            self.assertEqual(r.command("PING"), "PONG")
            self.assertEqual(r.command("SET", "k", "välue"), "OK")
            self.assertEqual(r.command("GET", "k"), "välue")
            r.command("SET", "b", b"\xff\x00")
            self.assertEqual(r.command("GET", "b"), b"\xff\x00")  # not UTF-8: raw bytes
            self.assertEqual(r.command("INCRBY", "n", 5), 5)
            self.assertIsNone(r.command("GET", "missing"))
            self.assertEqual(r.command("XADD", "s", "1-1", "f", "v"), "1-1")
            self.assertEqual(r.command("XRANGE", "s", "-", "+"), [["1-1", ["f", "v"]]])
            with self.assertRaises(RedisReplyError) as e:
                r.command("XADD", "k", "*", "f", "v")
            self.assertTrue(str(e.exception).startswith("WRONGTYPE"))
            self.assertEqual(r.command("PING"), "PONG")  # usable after an error reply
        with SyncRedis.from_url(f"unix://{server.unix_path}?db=3") as r:
            r.command("SET", "only-in-3", "1")
        self.assertEqual(server.sync_command("SELECT", "3"), "OK")
        with SyncRedis.from_url(f"{server.url[:-2]}/3") as r:
            self.assertEqual(r.command("GET", "only-in-3"), "1")

    def test_auth_password_and_acl_user(self):
        server = self.start_redis(extra_args=["--requirepass", "s3cret pass"])
        with self.assertRaises(RedisReplyError):
            SyncRedis.from_url(server.url.replace("redis://", "redis://:wrong@"))
        with SyncRedis.from_url(server.url.replace("redis://", "redis://:s3cret%20pass@")) as r:
            self.assertEqual(r.command("PING"), "PONG")
            r.command("ACL", "SETUSER", "ops", "on", ">opspass", "~*", "+@all")
        with SyncRedis.from_url(server.url.replace("redis://", "redis://ops:opspass@")) as r:
            self.assertEqual(r.command("ACL", "WHOAMI"), "ops")

    def test_evalsha_sync_reloads_on_noscript(self):
        server = self.start_redis()
        with SyncRedis.from_url(server.url) as r:
            script = Script("test", "return {KEYS[1], ARGV[1]}")
            self.assertEqual(evalsha_sync(r, script, ["k"], ["a"]), ["k", "a"])
            r.command("SCRIPT", "FLUSH")
            self.assertEqual(evalsha_sync(r, script, ["k"], ["b"]), ["k", "b"])
            with self.assertRaises(RedisReplyError):
                evalsha_sync(r, Script("nope", "return redis.call('NOPE')"), [], [])

    def test_timeout_when_redis_stops_answering(self):
        server = self.start_redis()
        r = SyncRedis.from_url(server.url, timeout=0.3)
        self.addCleanup(r.close)
        server.pause()
        self.addCleanup(server.resume)
        with self.assertRaises(RedisConnectionError) as e:
            r.command("PING")
        self.assertIn("timed out", str(e.exception))
        self.assertNotIn("\n", str(e.exception))


redis_test_cases(SyncRedisMixin, globals())


class ConnectErrorTests(unittest.TestCase):
    def test_refused_and_bad_url(self):
        with self.assertRaises(RedisConnectionError) as e:
            SyncRedis.from_url(f"redis://:secret@127.0.0.1:{free_port()}/0")
        self.assertIn("cannot connect", str(e.exception))
        self.assertNotIn("secret", str(e.exception))
        self.assertRaises(ValueError, SyncRedis.from_url, "http://x")
        with self.assertRaises(RedisConnectionError):
            SyncRedis.from_url("unix:///nonexistent/redis.sock")

    def test_tls_failure_is_one_line(self):
        """rediss:// to a server that isn't TLS (here: one that closes at once) fails cleanly."""
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        self.addCleanup(listener.close)

        def accept_and_close():
            conn, _ = listener.accept()
            conn.sendall(b"-ERR not tls\r\n")
            conn.close()

        threading.Thread(target=accept_and_close, daemon=True).start()
        with self.assertRaises(RedisConnectionError) as e:
            SyncRedis.from_url(f"rediss://127.0.0.1:{listener.getsockname()[1]}/0", timeout=2)
        self.assertNotIn("\n", str(e.exception))
