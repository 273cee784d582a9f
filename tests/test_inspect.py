"""Stream/group facts (payflux.consumers.inspect) against real Redis 6.2 and 7.x."""

from __future__ import annotations

from twisted.trial import unittest

import time

from payflux.consumers.inspect import (count_after_steps, group_idle, id_age, parse_id, parse_xinfo_consumers,
                                       parse_xinfo_groups, partition_steps)
from payflux.redis.steps import run_sync
from payflux.redis.sync import SyncRedis
from payflux.streams.keys import StreamKeys
from tests.support.redis import redis_test_cases

KEYS = StreamKeys("payflux")
STREAM = KEYS.events(0)


class PureTests(unittest.TestCase):
    def test_ids_and_ages(self):
        self.assertEqual(parse_id("1700000000000-3"), (1700000000000, 3))
        self.assertEqual(parse_id(b"5"), (5, 0))
        for bad in ("", "a-1", "1-", "-1", None, "1-2-3"):
            self.assertRaises(ValueError, parse_id, bad)
        self.assertEqual(id_age("1000000-0", 1010.5), 10.5)
        self.assertEqual(id_age("2000000-0", 1000.0), 0.0)  # ids from a clock ahead of ours: not negative

    def test_xinfo_groups_62_and_7(self):
        v62 = [["name", "g", "consumers", 1, "pending", 2, "last-delivered-id", "5-0"]]
        v7 = [["name", "g", "consumers", 1, "pending", 2, "last-delivered-id", "5-0", "entries-read", 5,
               "lag", None]]
        for reply in (v62, v7):
            [g] = parse_xinfo_groups(reply)
            self.assertEqual((g["name"], g["pending"], g["last_delivered_id"], g["lag"]), ("g", 2, "5-0", None))


    def test_xinfo_consumers_and_group_idle(self):
        v62 = [["name", "a", "pending", 0, "idle", 5000], ["name", "b", "pending", 2, "idle", 1500]]
        v72 = [["name", "a", "pending", 0, "idle", 5000, "inactive", -1]]
        self.assertEqual(parse_xinfo_consumers(v62), [{"name": "a", "pending": 0, "idle_ms": 5000},
                                                      {"name": "b", "pending": 2, "idle_ms": 1500}])
        self.assertEqual(group_idle(parse_xinfo_consumers(v62)), 1.5)  # the most recent reader
        self.assertEqual(group_idle(parse_xinfo_consumers(v72)), 5.0)
        self.assertIsNone(group_idle([]))


class InspectMixin:
    def setUp(self):
        self.server = self.start_redis()
        self.redis = SyncRedis.from_url(self.server.url)
        self.addCleanup(self.redis.close)

    def add(self, seconds: range) -> None:
        for s in seconds:
            self.redis.command("XADD", STREAM, f"{s * 1000}-0", "v", "1", "event_id", f"e{s}", "type", "t",
                               "received_at", str(s * 1000), "data", "{}")

    def facts(self, now: float = 2000.0, **kw):
        return run_sync(partition_steps(KEYS, 0, now, **kw), self.redis.command)

    def computed_lag(self, group: str, max_scan: int = 10_000, chunk: int = 1000):
        f = self.facts()
        [g] = [g for g in f.groups if g.name == group]
        steps = count_after_steps(STREAM, g.last_delivered_id, f.length, f.first_id, f.last_id, max_scan, chunk)
        return run_sync(steps, self.redis.command)

    def test_missing_stream_and_dlq(self):
        f = self.facts()
        self.assertEqual((f.length, f.first_id, f.last_id, f.groups, f.dlq_depth), (0, None, None, (), 0))
        self.redis.command("XADD", KEYS.dlq(0), "*", "original_id", "1-0")
        self.assertEqual(self.facts().dlq_depth, 1)

    def test_wrong_type_is_a_clear_error(self):
        self.redis.command("SET", STREAM, "x")
        with self.assertRaises(ValueError) as e:
            self.facts()
        self.assertIn("is a string, not a stream", str(e.exception))

    def test_lag_computed_equals_lag_reported(self):
        """The same scenario on both servers: 6.2 computes 30, 7.x reports 30 and computing agrees."""
        self.add(range(1000, 1050))
        self.redis.command("XGROUP", "CREATE", STREAM, "half", "0")
        self.redis.command("XGROUP", "CREATE", STREAM, "none", "0")
        self.redis.command("XGROUP", "CREATE", STREAM, "all", "$")
        self.redis.command("XREADGROUP", "GROUP", "half", "c", "COUNT", "20", "STREAMS", STREAM, ">")
        f = self.facts()
        self.assertEqual((f.length, f.first_id, f.last_id), (50, "1000000-0", "1049000-0"))
        lags = {g.name: (g.lag, g.lag_source) for g in f.groups}
        source = "redis" if self.redis_version_label == "7" else "computed"
        self.assertEqual(lags, {"half": (30, source), "none": (50, source), "all": (0, source)})
        for group, lag in (("half", 30), ("none", 50), ("all", 0)):
            self.assertEqual(self.computed_lag(group), lag)
            self.assertEqual(self.computed_lag(group, max_scan=5, chunk=4), lag if group != "half" else None)
        # "half" is 20 entries behind its last-delivered id and 30 ahead of it:
        self.assertEqual(self.computed_lag("half", max_scan=30, chunk=4), 30)  # counted forward
        self.assertEqual(self.computed_lag("half", max_scan=25, chunk=4), 30)  # 50 - 20 counted backward
        self.assertIsNone(self.computed_lag("half", max_scan=19, chunk=4))     # both sides too long: unknown

    def test_lag_after_deleting_an_unread_entry(self):
        """7.x reports nil lag after an XDEL in the unread range; we compute it like on 6.2."""
        self.add(range(1000, 1050))
        self.redis.command("XGROUP", "CREATE", STREAM, "g", "0")
        self.redis.command("XREADGROUP", "GROUP", "g", "c", "COUNT", "20", "STREAMS", STREAM, ">")
        self.redis.command("XDEL", STREAM, "1030000-0")
        [g] = self.facts().groups
        self.assertEqual((g.lag, g.lag_source), (29, "computed"))
        [g] = self.facts(max_scan=5).groups
        self.assertEqual((g.lag, g.lag_source), (None, None))

    def test_pending_and_oldest_pending_age(self):
        self.add(range(1000, 1010))
        self.redis.command("XGROUP", "CREATE", STREAM, "g", "0")
        self.redis.command("XREADGROUP", "GROUP", "g", "c1", "COUNT", "3", "STREAMS", STREAM, ">")
        self.redis.command("XREADGROUP", "GROUP", "g", "c2", "COUNT", "3", "STREAMS", STREAM, ">")
        self.redis.command("XACK", STREAM, "g", "1000000-0")
        [g] = self.facts(now=1100.25).groups
        self.assertEqual((g.consumers, g.pending, g.last_delivered_id), (2, 5, "1005000-0"))
        self.assertEqual((g.oldest_pending_id, g.oldest_pending_age), ("1001000-0", 99.25))
        self.redis.command("XACK", STREAM, "g", *[f"{s * 1000}-0" for s in range(1001, 1006)])
        [g] = self.facts().groups
        self.assertEqual((g.pending, g.oldest_pending_id, g.oldest_pending_age), (0, None, None))
        as_dict = self.facts().as_dict()
        self.assertEqual(as_dict["groups"][0]["name"], "g")
        self.assertIsInstance(as_dict["groups"], list)

    def test_group_idle_is_since_the_most_recent_read(self):
        self.add(range(1000, 1004))
        self.redis.command("XGROUP", "CREATE", STREAM, "g", "0")
        self.redis.command("XGROUP", "CREATE", STREAM, "unread", "0")
        self.redis.command("XREADGROUP", "GROUP", "g", "old", "COUNT", "1", "STREAMS", STREAM, ">")
        time.sleep(0.1)
        self.redis.command("XREADGROUP", "GROUP", "g", "new", "COUNT", "1", "STREAMS", STREAM, ">")
        groups = {g.name: g for g in self.facts().groups}
        idle = {c["name"]: c["idle_ms"] / 1000 for c in
                parse_xinfo_consumers(self.redis.command("XINFO", "CONSUMERS", STREAM, "g"))}
        self.assertLess(groups["g"].idle, idle["old"])  # the newer reader counts
        self.assertLess(groups["g"].idle, 10)
        self.assertIsNone(groups["unread"].idle)  # no consumer names: unknown, not 0
        self.assertIn("idle", self.facts().as_dict()["groups"][0])


redis_test_cases(InspectMixin, globals())
