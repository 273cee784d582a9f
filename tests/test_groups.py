"""
Consumer-group hygiene against real Redis 6.2 and 7.x: the reclaim loop deletes idle consumer
names with nothing pending (never its own), a SIGKILLed consumer node's names go away, and
``payflux group list|delete`` / ``payflux stream info`` name stale groups.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from typing import Any

from twisted.internet import reactor
from twisted.trial import unittest

from payflux.consumers.reclaim import ReclaimService
from tests.support.consumers import KEYS, RecordingHandler, RedisFixture, config, metric, sleep
from tests.support.daemon import ConsumerDaemon
from tests.support.process import PAYFLUX, clean_env
from tests.support.redis import redis_test_cases

STREAM = KEYS.events(0)
NODE_STREAM = "payflux:{0}:events"  # the node's (and the CLI's) default prefix


def consumer_names(server: Any, stream: str = STREAM, group: str = "g") -> set[str]:
    return {dict(zip(r[::2], r[1::2]))[b"name"].decode() for r in server.sync_command("XINFO", "CONSUMERS", stream, group)}


class FailingAutoclaim:
    """The pool, except that every XAUTOCLAIM fails (a reclaim step that keeps failing)."""

    def __init__(self, redis: Any) -> None:
        self._redis = redis

    def execute_command(self, *args: Any) -> Any:
        if args[0] == "XAUTOCLAIM":
            from twisted.internet import defer

            return defer.fail(RuntimeError("XAUTOCLAIM refused (test)"))
        return self._redis.execute_command(*args)


class IdleConsumerCleanupMixin(RedisFixture):
    def setUp(self) -> None:
        self.setup_redis()
        self.create_group()

    def reclaimer(self, redis: Any = None, **kw: Any) -> ReclaimService:
        kw.setdefault("min_idle_ms", 0)
        return ReclaimService(config(**kw), RecordingHandler(), redis or self.redis, KEYS, 1, self.metrics.consumers,
                              reactor, "me", {})

    def read(self, consumer: str, count: int = 100) -> None:
        self.server.sync_command("XREADGROUP", "GROUP", "g", consumer, "COUNT", str(count), "STREAMS", STREAM, ">")

    async def test_idle_names_go_once_their_entries_are_reclaimed_never_our_own(self):
        self.add(3)
        self.read("crashed", 2)  # a SIGKILLed consumer: 2 entries pending on it
        self.read("replaced", 1)  # a consumer that acked everything, then its process went away
        self.server.sync_command("XACK", STREAM, "g", *[i for i, (c, _) in self.pending().items() if c == "replaced"])
        self.server.sync_command("XGROUP", "CREATECONSUMER", STREAM, "g", "me")
        await sleep(0.1)
        # the default threshold (an hour): nobody is idle that long
        totals = await self.reclaimer(min_idle_ms=60_000).reclaim_once()
        self.assertEqual((totals["consumers_removed"], consumer_names(self.server)), (0, {"crashed", "replaced", "me"}))
        # 50 ms: "replaced" (nothing pending) goes; "crashed" still owns entries; our own name stays
        totals = await self.reclaimer(min_idle_ms=60_000, consumer_idle_cleanup=0.05).reclaim_once()
        self.assertEqual((totals["consumers_removed"], consumer_names(self.server)), (1, {"crashed", "me"}))
        # once reclaim has taken its entries (min_idle_ms 0), "crashed" goes too, in the same pass
        totals = await self.reclaimer(consumer_idle_cleanup=0.05).reclaim_once()
        self.assertEqual((totals["reclaimed"], totals["consumers_removed"]), (2, 1))
        self.assertEqual((consumer_names(self.server), self.pending()), ({"me"}, {}))
        # 0 = never
        self.server.sync_command("XGROUP", "CREATECONSUMER", STREAM, "g", "other")
        await sleep(0.1)
        self.assertEqual((await self.reclaimer(consumer_idle_cleanup=0).reclaim_once())["consumers_removed"], 0)
        self.assertEqual(consumer_names(self.server), {"me", "other"})

    async def test_cleanup_runs_even_when_the_reclaim_step_fails(self):
        self.server.sync_command("XGROUP", "CREATECONSUMER", STREAM, "g", "gone")
        await sleep(0.1)
        svc = self.reclaimer(FailingAutoclaim(self.redis), consumer_idle_cleanup=0.05)
        totals = await svc.reclaim_once()
        self.assertEqual(totals["consumers_removed"], 1)
        self.assertEqual(consumer_names(self.server), set())
        self.assertEqual(metric(self.metrics, "payflux_consumer_read_errors_total"), 1)
        self.flushLoggedErrors(RuntimeError)


redis_test_cases(IdleConsumerCleanupMixin, globals())


class KilledConsumerNodeTests(unittest.TestCase):
    """A consumers node SIGKILLed again and again: its old names leave the group (7 after 6 kills before)."""

    timeout = 60

    async def test_names_of_killed_processes_are_removed(self):
        from tests.support.redis import RedisProcess, find_redis_binaries

        found = find_redis_binaries()
        binary = found.get("7") or found.get("6.2")
        if binary is None:
            raise unittest.SkipTest("no redis-server binary found")
        server = RedisProcess(binary, testcase=self)
        daemon = ConsumerDaemon(self, server.url, """
[[consumers]]
name = "c"
group = "g"
handler = "noop"
block_ms = 200
reclaim_interval = 0.2
min_idle_ms = 200
consumer_idle_cleanup = 1
""")
        def names() -> set[str]:
            try:
                return consumer_names(server, NODE_STREAM)
            except Exception:  # noqa: BLE001 - the group isn't there yet
                return set()

        seen: set[str] = set()
        for run in range(3):
            daemon.start()
            await daemon.wait_for(lambda: len(names() - seen) == 1, timeout=20, what=f"run {run} reading")
            seen |= names()
            if run < 2:
                daemon.kill()
        self.assertEqual(len(seen), 3)  # three processes, three names
        await daemon.wait_for(lambda: len(names()) == 1, timeout=20, what="the killed processes' names removed")
        self.assertIn("removed idle consumer", daemon.log_text())


class GroupCliMixin:
    """`payflux group list|delete` and the stale line of `payflux stream info`, as subprocesses."""

    def setUp(self):
        self.server = self.start_redis()
        self.cmd = self.server.sync_command
        fd, self.config = tempfile.mkstemp(suffix=".toml")
        with os.fdopen(fd, "w") as f:
            f.write(f'redis_url = "{self.server.url}"\ngroup_idle_warning = 3\n'
                    '[[consumers]]\nname = "configured"\ngroup = "cfg"\nhandler = "noop"\n')
        self.addCleanup(os.unlink, self.config)

    def run_cli(self, *args: str, **env: str) -> subprocess.CompletedProcess:
        # "fresh" is read by a live consumer: it polls again right before every look
        self.cmd("XREADGROUP", "GROUP", "fresh", "live", "COUNT", "10", "STREAMS", NODE_STREAM, ">")
        result = subprocess.run([*PAYFLUX, *args, "--config", self.config], capture_output=True, text=True, timeout=60,
                                env=clean_env(**env))
        self.assertNotIn("Traceback", result.stderr)
        return result

    def groups(self) -> set[str]:
        return {dict(zip(g[::2], g[1::2]))[b"name"].decode() for g in self.cmd("XINFO", "GROUPS", NODE_STREAM)}

    def test_list_flags_stale_groups_and_delete_refuses_live_ones(self):
        for n in range(5):
            self.cmd("XADD", NODE_STREAM, "*", "v", "1", "event_id", f"e{n}", "type", "t", "received_at", "1", "data", "{}")
        for group in ("old", "busy", "nobody", "fresh", "cfg"):
            self.cmd("XGROUP", "CREATE", NODE_STREAM, group, "$" if group == "cfg" else "0")
        self.cmd("XREADGROUP", "GROUP", "old", "gone-1", "COUNT", "10", "STREAMS", NODE_STREAM, ">")
        self.cmd("XACK", NODE_STREAM, "old", *[e[0] for e in self.cmd("XRANGE", NODE_STREAM, "-", "+")])
        self.cmd("XREADGROUP", "GROUP", "busy", "gone-2", "COUNT", "2", "STREAMS", NODE_STREAM, ">")
        time.sleep(3.1)  # group_idle_warning = 3 s: "old" and "busy" are stale now
        self.cmd("XREADGROUP", "GROUP", "fresh", "live", "COUNT", "10", "STREAMS", NODE_STREAM, ">")
        self.cmd("XACK", NODE_STREAM, "fresh", *[e[0] for e in self.cmd("XRANGE", NODE_STREAM, "-", "+")])

        result = self.run_cli("group", "list")
        self.assertEqual(result.returncode, 0, result.stderr)
        lines = result.stdout.splitlines()
        self.assertEqual(lines[0].split(), ["group", "stream", "consumers", "pending", "lag", "last", "delivered",
                                            "last", "read", "state"])
        rows = {line.split()[0]: line for line in lines[1:-1]}
        self.assertEqual(set(rows), {"busy", "cfg", "fresh", "nobody", "old"})
        self.assertEqual(rows["busy"].split()[1:5], [NODE_STREAM, "1", "2", "3"])
        self.assertTrue(rows["busy"].endswith(" stale"), rows["busy"])
        self.assertTrue(rows["old"].endswith(" stale"), rows["old"])
        self.assertRegex(rows["fresh"], r" \d+\.\ds ago +ok$")
        self.assertRegex(rows["nobody"], r" 0-0 +- +no consumers$")
        self.assertEqual(lines[-1], "5 group(s); stale (not read for over 3.0s, group_idle_warning): busy, old")
        doc = json.loads(self.run_cli("group", "list", "--json").stdout)
        by_name = {g["group"]: g for g in doc["groups"]}
        self.assertEqual(doc["group_idle_warning"], 3)
        self.assertEqual((by_name["busy"]["lag"], by_name["busy"]["pending"], by_name["busy"]["consumers"],
                          by_name["busy"]["stale"]), (3, 2, 1, True))
        self.assertGreater(by_name["old"]["idle"], 3)
        self.assertIsNone(by_name["nobody"]["idle"])
        self.assertIs(by_name["fresh"]["stale"], False)

        info = self.run_cli("stream", "info")
        stale = [line for line in info.stdout.splitlines() if line.startswith("stale group ")]
        self.assertEqual(sorted(line.split()[2].rstrip(":") for line in stale), ["busy", "old"])
        self.assertTrue(any(line.endswith(": payflux group delete old") for line in stale), stale)
        self.assertEqual({g["name"]: g["stale"] for g in json.loads(self.run_cli("stream", "info", "--json").stdout)
                          ["partitions"][0]["groups"] if g["name"] in ("old", "fresh")}, {"old": True, "fresh": False})

        # delete refuses a group with lag or pending entries, one read just now, or one this
        # configuration's [[consumers]] read; exit 1, one line, nothing deleted. (A minute's
        # warning here: "read just now" is then within the last minute, however slow this host.)
        for name, why in (("busy", "partition 0: lag 3, 2 pending"), ("nobody", "partition 0: lag 5"),
                          ("fresh", "a consumer read it"), ("cfg", "[[consumers]] 'configured'")):
            result = self.run_cli("group", "delete", name, PAYFLUX_GROUP_IDLE_WARNING="60")
            self.assertEqual((result.returncode, result.stderr.count("\n")), (1, 1), (name, result.stderr))
            self.assertIn(f"refusing to delete group {name!r}: ", result.stderr)
            self.assertIn(why, result.stderr)
            self.assertIn("add --force", result.stderr)
        self.assertEqual(self.groups(), {"old", "busy", "nobody", "fresh", "cfg"})

        result = self.run_cli("group", "delete", "old")
        self.assertEqual((result.returncode, result.stdout), (0, "deleted group old from 1 partition(s)\n"), result.stderr)
        result = self.run_cli("group", "delete", "busy", "--force", "--json")
        self.assertEqual(json.loads(result.stdout), {"deleted": "busy", "partitions": [0], "forced": True})
        self.assertEqual(self.groups(), {"nobody", "fresh", "cfg"})
        result = self.run_cli("group", "delete", "old")
        self.assertEqual(result.returncode, 1)
        self.assertIn("no consumer group 'old' on any of the 1 partition(s)", result.stderr)


redis_test_cases(GroupCliMixin, globals())
