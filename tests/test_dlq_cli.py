"""`payflux dlq ...` and `payflux stream info` as subprocesses against real Redis 6.2 and 7.x."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile

from twisted.trial import unittest

from payflux.consumers.dlq import replay
from payflux.streams.keys import StreamKeys
from payflux.redis.sync import SyncRedis
from tests.support.process import PAYFLUX, clean_env
from tests.support.redis import free_port, redis_test_cases

KEYS = StreamKeys("payflux")
STREAM, DLQ = KEYS.events(0), KEYS.dlq(0)


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    clean = clean_env()
    result = subprocess.run([*PAYFLUX, *args], capture_output=True, timeout=60, env={**clean, **(env or {})},
                            text=True)
    assert "Traceback" not in result.stderr, result.stderr
    return result


def dead_letter(r: SyncRedis, n: int, key: str = DLQ, source: str = STREAM, **drop: bool) -> str:
    """XADD one DLQ record in the documented format (metadata, then the original fields)."""
    fields = {"original_id": f"{1000 + n}-0", "group": "risk", "consumer": "host-1", "deliveries": "5",
              "error_class": "ValueError", "error_message": f"bad amount {n}", "dead_lettered_at": "1700000000000",
              "source_stream": source, "v": "1", "event_id": f"evt_{n}", "type": "payment_failed",
              "received_at": "1699999999000", "data": json.dumps({"event_id": f"evt_{n}", "n": n})}
    for name in drop:
        fields.pop(name)
    return r.command("XADD", key, "*", *[x for kv in fields.items() for x in kv])


class DlqCliMixin:
    def setUp(self):
        self.server = self.start_redis()
        self.r = SyncRedis.from_url(self.server.url)
        self.addCleanup(self.r.close)
        self.url = ("--redis-url", self.server.url)

    def test_list_human_and_json(self):
        ids = [dead_letter(self.r, n) for n in range(3)]
        result = run("dlq", "list", *self.url)
        self.assertEqual(result.returncode, 0, result.stderr)
        lines = result.stdout.splitlines()
        self.assertEqual(lines[0].split()[:4], ["partition", "dlq", "id", "original"])
        self.assertIn(ids[0], lines[1])
        self.assertIn("1000-0", lines[1])
        self.assertIn("ValueError: bad amount 0", lines[1])
        self.assertIn("2023-11-14 22:13:20Z", lines[1])
        self.assertEqual(lines[-1], "3 of 3 dead letters shown")
        result = run("dlq", "list", "--limit", "2", "--json", *self.url)
        doc = json.loads(result.stdout)
        self.assertEqual(doc["total"], 3)
        self.assertEqual([d["id"] for d in doc["dead_letters"]], ids[:2])
        first = doc["dead_letters"][0]
        self.assertEqual((first["original_id"], first["group"], first["deliveries"], first["event_id"],
                          first["source_stream"], first["fields"]["v"]),
                         ("1000-0", "risk", 5, "evt_0", STREAM, "1"))
        self.assertEqual(run("dlq", "list", "--limit", "0", *self.url).returncode, 2)

    def test_replay_ids(self):
        ids = [dead_letter(self.r, n) for n in range(3)]
        result = run("dlq", "replay", "--id", ids[1], *self.url)
        self.assertEqual(result.returncode, 0, result.stderr)
        [entry] = self.r.command("XRANGE", STREAM, "-", "+")
        self.assertIn(f"replayed {ids[1]} (partition 0) as {entry[0]}", result.stdout)
        fields = entry[1]
        self.assertEqual(fields[0::2], ["v", "event_id", "type", "received_at", "data"])  # stream-format order
        self.assertEqual(fields[3], "evt_1")
        self.assertEqual(json.loads(fields[9])["n"], 1)
        self.assertEqual([e[0] for e in self.r.command("XRANGE", DLQ, "-", "+")], [ids[0], ids[2]])
        # again: gone from the DLQ, so nothing is appended twice; exit 1 names it
        result = run("dlq", "replay", "--id", ids[1], "--id", ids[0], "--json", *self.url)
        self.assertEqual(result.returncode, 1)
        doc = json.loads(result.stdout)
        self.assertEqual((len(doc["replayed"]), doc["missing"]), (1, [ids[1]]))
        self.assertEqual(self.r.command("XLEN", STREAM), 2)
        # an id that isn't there: said once, nothing claimed to be replayed (no "replayed 1/1")
        result = run("dlq", "replay", "--id", "1-0", *self.url)
        self.assertEqual((result.returncode, result.stdout), (1, "not found 1-0\n0 replayed, 0 skipped, 1 not found\n"))
        self.assertEqual(result.stderr, "")
        # a bad id: one line, exit 2, nothing done
        result = run("dlq", "replay", "--id", "yesterday", *self.url)
        self.assertEqual(result.returncode, 2)
        self.assertEqual(result.stderr.count("\n"), 1)
        self.assertIn("not a stream id: 'yesterday'", result.stderr)

    def test_replay_skips_records_it_cannot_restore(self):
        bad = dead_letter(self.r, 1, data=True)
        foreign = dead_letter(self.r, 2, source="other:{0}:events")
        result = run("dlq", "replay", "--id", bad, "--id", foreign, *self.url)
        self.assertEqual(result.returncode, 1)
        self.assertIn(f"skipped {bad} (partition 0): no field data", result.stdout)
        self.assertIn(f"skipped {foreign} (partition 0): source_stream is other:{{0}}:events", result.stdout)
        self.assertEqual(self.r.command("XLEN", DLQ), 2)
        self.assertEqual(self.r.command("XLEN", STREAM), 0)

    def test_replay_all_with_progress(self):
        for n in range(2500):
            dead_letter(self.r, n)
        self.assertEqual(run("dlq", "replay", "--all", *self.url).returncode, 2)  # needs --yes
        result = run("dlq", "replay", "--all", "--yes", *self.url)
        self.assertEqual(result.returncode, 0, result.stderr)
        progress = [line for line in result.stdout.splitlines() if line.startswith("progress: ")]
        self.assertEqual(progress, ["progress: 1000/2500 handled, 1000 replayed",
                                    "progress: 2000/2500 handled, 2000 replayed"])
        self.assertTrue(result.stdout.endswith("2500 replayed, 0 skipped, 0 not found\n"))
        self.assertEqual((self.r.command("XLEN", DLQ), self.r.command("XLEN", STREAM)), (0, 2500))
        events = [e[1][3] for e in self.r.command("XRANGE", STREAM, "-", "+")]
        self.assertEqual(events, [f"evt_{n}" for n in range(2500)])  # DLQ order kept

    def test_purge_requires_yes(self):
        for n in range(3):
            dead_letter(self.r, n)
        result = run("dlq", "purge", *self.url)
        self.assertEqual(result.returncode, 2)
        self.assertIn("add --yes", result.stderr)
        self.assertEqual(self.r.command("XLEN", DLQ), 3)
        result = run("dlq", "purge", "--yes", *self.url)
        self.assertEqual((result.returncode, result.stdout), (0, "purged 3 dead letters from 1 partition(s)\n"))
        self.assertEqual(self.r.command("EXISTS", DLQ), 0)
        self.assertEqual(run("dlq", "list", *self.url).stdout, "no dead letters\n")

    def test_stream_info_human_and_json(self):
        for s in range(1000, 1010):
            self.r.command("XADD", STREAM, f"{s * 1000}-0", "v", "1", "event_id", f"e{s}", "type", "t",
                           "received_at", str(s * 1000), "data", "{}")
        self.r.command("XGROUP", "CREATE", STREAM, "risk", "0")
        self.r.command("XREADGROUP", "GROUP", "risk", "c1", "COUNT", "4", "STREAMS", STREAM, ">")
        self.r.command("XACK", STREAM, "risk", "1000000-0")
        dead_letter(self.r, 0)
        result = run("stream", "info", *self.url)
        self.assertEqual(result.returncode, 0, result.stderr)
        lines = result.stdout.splitlines()
        self.assertEqual(lines[0], "partition 0  payflux:{0}:events")
        self.assertEqual(lines[1].split(), ["length", "10", "first", "1000000-0", "last", "1009000-0",
                                            "dead", "letters", "1", "(payflux:{0}:dlq)"])
        self.assertEqual(lines[2].split(), ["group", "consumers", "pending", "lag", "last", "delivered", "last",
                                            "read", "oldest", "pending", "age"])
        self.assertEqual(lines[3].split()[:5], ["risk", "1", "3", "6", "1003000-0"])
        self.assertRegex(lines[3], r"1003000-0 +\d+\.\ds ago +\d+d \d+h$")  # read just now; ids from 1970: days old
        self.assertEqual(len(lines), 4)  # nobody stale
        doc = json.loads(run("stream", "info", "--json", *self.url).stdout)
        [p] = doc["partitions"]
        self.assertEqual((p["length"], p["first_id"], p["last_id"], p["dlq_depth"]), (10, "1000000-0", "1009000-0", 1))
        [g] = p["groups"]
        self.assertEqual((g["name"], g["consumers"], g["pending"], g["lag"], g["oldest_pending_id"]),
                         ("risk", 1, 3, 6, "1001000-0"))
        self.assertGreater(g["oldest_pending_age"], 1e9)
        self.assertLess(g["idle"], 60)
        self.assertIs(g["stale"], False)
        self.assertEqual(doc["group_idle_warning"], 86400)

    def test_settings_from_config_file_env_and_embedded_socket(self):
        prefix = StreamKeys("shop")
        self.r.command("XADD", prefix.events(1), "*", "v", "1")
        dead_letter(self.r, 0, key=prefix.dlq(1), source=prefix.events(1))
        fd, path = tempfile.mkstemp(suffix=".toml")
        with os.fdopen(fd, "w") as f:
            f.write(f'redis_url = "{self.server.url}"\nstream_prefix = "shop"\npartitions = 2\n')
        self.addCleanup(os.unlink, path)
        doc = json.loads(run("stream", "info", "--json", "--config", path).stdout)
        self.assertEqual([(p["stream"], p["length"], p["dlq_depth"]) for p in doc["partitions"]],
                         [("shop:{0}:events", 0, 0), ("shop:{1}:events", 1, 1)])
        doc = json.loads(run("dlq", "list", "--json", env={"PAYFLUX_CONFIG": path}).stdout)
        self.assertEqual([d["partition"] for d in doc["dead_letters"]], [1])
        # no redis_url anywhere: the embedded socket <data_dir>/redis.sock (here the test server's)
        data_dir = os.path.dirname(self.server.unix_path)
        result = run("stream", "info", "--json", "--partitions", "2", "--stream-prefix", "shop",
                     env={"PAYFLUX_DATA_DIR": data_dir})
        self.assertEqual(json.loads(result.stdout)["partitions"][1]["dlq_depth"], 1)


redis_test_cases(DlqCliMixin, globals())


class CliErrorTests(unittest.TestCase):
    def test_errors_are_one_line(self):
        cases = [
            (("stream", "info", "--redis-url", f"redis://127.0.0.1:{free_port()}/0"), 1, "cannot connect to Redis"),
            (("dlq", "list", "--redis-url", "http://x"), 2, "invalid --redis-url"),
            (("dlq", "list", "--data-dir", "/nonexistent-payflux"), 1, "no embedded Redis socket at"),
            (("dlq", "list", "--partitions", "0", "--redis-url", "redis://127.0.0.1:1/0"), 2, "invalid --partitions"),
            (("dlq", "replay", "--redis-url", "redis://127.0.0.1:1/0"), 2, "give --id ID"),
            (("dlq", "purge", "--redis-url", "redis://127.0.0.1:1/0"), 2, "add --yes"),
            (("dlq", "list", "--id", "1-0", "--redis-url", "redis://127.0.0.1:1/0"), 2, "options of replay"),
            (("dlq", "frobnicate"), 2, "invalid choice"),
            (("stream", "info", "--config", "/nonexistent.toml"), 2, "cannot read"),
            (("group", "delete", "--redis-url", "redis://127.0.0.1:1/0"), 2, "delete needs the group name"),
            (("group", "list", "--force", "--redis-url", "redis://127.0.0.1:1/0"), 2, "list takes no group name"),
            (("group", "rename", "x"), 2, "invalid choice"),
        ]
        for args, status, text in cases:
            result = run(*args)
            self.assertEqual((result.returncode, result.stderr.count("\n")), (status, 1), (args, result.stderr))
            self.assertIn(text, result.stderr)


class ReplayApiTests(unittest.TestCase):
    def test_arguments(self):
        self.assertRaises(ValueError, replay, None, KEYS, 1)
        self.assertRaises(ValueError, replay, None, KEYS, 1, ids=["1-0"], all=True)
        self.assertRaises(ValueError, replay, None, KEYS, 1, ids=["1-0"], partition=3)
