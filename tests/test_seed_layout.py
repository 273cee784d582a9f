"""
``layout = "seed"``: a real node writes the Go PayFlux's Redis layout (``events_stream``, one
partition, every entry's ``data`` = the event JSON with the seed's field names), so a consumer
written for the Go program (redis-py: XREADGROUP on events_stream, ``json.loads(fields["data"])``,
XACK) works unchanged; PayFlux's own consumers, reclaim/DLQ (``events_stream_dlq``), dedupe and the
operator CLI work in that layout too; the default layout is unchanged.  Real redis-server 6.2 and 7.x.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from datetime import datetime

import redis as redispy
from twisted.internet import reactor, threads
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial import unittest

from payflux.consumers.handlers import EntriesFailed
from payflux.events import contains_pan
from payflux.redis.slots import key_slot
from payflux.streams.keys import StreamKeys
from tests.support.node import read_json, start_node
from tests.support.process import PAYFLUX, clean_env
from tests.support.redis import redis_test_cases

SINGLE = "/v1/events/payment_exhaust"
BATCH = "/v1/events/payment_exhaust/batch"

# The Go PayFlux's Event struct, in its order: json.Marshal writes every one of them.
SEED_FIELDS = (
    "event_type", "event_timestamp", "event_id", "merchant_id_hash", "payment_intent_id_hash", "processor",
    "failure_category", "retry_count", "geo_bucket", "amount_bucket", "system_source", "payment_method_bucket",
    "channel", "retry_result", "failure_origin",
)


def fresh_event_id() -> str:
    """A fresh uuid4, never one of the ~0.7% the PAN guard takes for a card number (e.g. the
    digits of ``...-4166-9039-1441988e...``): this module tests the layout, not that guard."""
    while contains_pan(event_id := str(uuid.uuid4())):
        pass
    return event_id


def seed_event(**changes) -> dict:
    """The seed's example event with a fresh uuid4 event_id."""
    event = {
        "event_type": "payment_failed", "event_timestamp": "2026-01-06T00:00:00Z", "event_id": fresh_event_id(),
        "merchant_id_hash": "abc123", "payment_intent_id_hash": "xyz456", "processor": "stripe",
        "failure_category": "processor_timeout", "retry_count": 0, "geo_bucket": "US", "amount_bucket": "50-200",
        "system_source": "checkout_api", "payment_method_bucket": "credit_card", "channel": "web",
        "retry_result": "failed", "failure_origin": "processor",
    }
    event.update(changes)
    return event


def ndjson(events: list[dict]) -> str:
    return "\n".join(json.dumps(e) for e in events)


def fields_of(raw: dict) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in raw.items()}


class FailIdsHandler:
    """A node-loaded handler (``tests.test_seed_layout:FailIdsHandler``): fails the listed event ids."""

    seen: dict[str, list] = {}

    def __init__(self, reactor, key: str, fail_ids: tuple = ()):
        self.key, self.fail_ids = key, set(fail_ids)
        self.seen.setdefault(key, [])

    def handle(self, entries):
        failures = {e.stream_id: RuntimeError("refused") for e in entries if e.event_id in self.fail_ids}
        self.seen[self.key].extend(e for e in entries if e.stream_id not in failures)
        if failures:
            raise EntriesFailed(failures)


def _consumer_config(key: str, fail_ids: list[str]) -> str:
    return "\n".join([
        'roles = ["ingest", "consumers"]',
        "[[consumers]]",
        'name = "pf"',
        'group = "payflux"',
        'handler = "tests.test_seed_layout:FailIdsHandler"',
        "block_ms = 200",
        "max_deliveries = 2",
        "min_idle_ms = 50",
        "reclaim_interval = 0.1",
        f"options = {{ key = {json.dumps(key)}, fail_ids = {json.dumps(fail_ids)} }}",
    ]) + "\n"


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    result = subprocess.run([*PAYFLUX, *args], capture_output=True, timeout=60, env=clean_env(**env), text=True)
    assert "Traceback" not in result.stderr, result.stderr
    return result


class SeedLayoutMixin:
    def setUp(self):
        self.server = self.start_redis()
        self.r = redispy.Redis(host="127.0.0.1", port=self.server.port, socket_timeout=10)
        self.addCleanup(self.r.close)

    @inlineCallbacks
    def wait_for(self, predicate, timeout: float = 10.0, what: str = "condition"):
        for _ in range(int(timeout / 0.05)):
            if predicate():
                return
            yield deferLater(reactor, 0.05, lambda: None)
        self.fail(f"timed out waiting for {what}")

    def assert_go_shape(self, data: dict, event: dict) -> None:
        """``data`` is what the Go program writes for ``event``: every seed field, the posted values."""
        self.assertEqual(sorted(data), sorted(SEED_FIELDS))
        self.assert_values(data, event)

    def assert_values(self, data: dict, event: dict) -> None:
        """The posted values; the timestamp may come back normalised (same instant, RFC 3339)."""
        self.assertEqual({k: data[k] for k in event if k != "event_timestamp"},
                         {k: v for k, v in event.items() if k != "event_timestamp"})
        self.assertEqual(datetime.fromisoformat(data["event_timestamp"].replace("Z", "+00:00")),
                         datetime.fromisoformat(event["event_timestamp"].replace("Z", "+00:00")))

    @inlineCallbacks
    def test_a_go_style_consumer_reads_single_and_batch_posts(self):
        # the Go consumer's start-up: XGROUP CREATE events_stream <group> ... MKSTREAM, then a
        # blocking XREADGROUP loop; here the group starts at $ before the node writes anything
        self.r.xgroup_create("events_stream", "g", id="$", mkstream=True)
        node = yield start_node(self, self.server.url, layout="seed")
        read = threads.deferToThread(
            self.r.xreadgroup, "g", "c", {"events_stream": ">"}, count=10, block=5000)
        single = seed_event()
        response = yield node.post(SINGLE, single)
        self.assertEqual(response.code, 202, (yield response.text()))
        first = yield read
        batch = [seed_event(merchant_id_hash=f"merchant{n:03d}", retry_count=n) for n in range(3)]
        response = yield node.post(BATCH, ndjson(batch), "application/x-ndjson")
        self.assertEqual(response.code, 202, (yield response.text()))
        doc = yield read_json(response)
        self.assertEqual(doc["accepted"], 3)
        rest = self.r.xreadgroup("g", "c", {"events_stream": ">"}, count=10)

        entries = first[0][1] + rest[0][1]
        self.assertEqual([s[0] for s in first + rest], [b"events_stream", b"events_stream"])
        events = [json.loads(fields[b"data"]) for _, fields in entries]
        self.assertEqual([e["event_id"] for e in events], [single["event_id"]] + [e["event_id"] for e in batch])
        for data, posted in zip(events, [single] + batch):
            self.assert_go_shape(data, posted)
        # PayFlux's own fields ride along; a Go consumer never looks at them
        fields = fields_of(entries[0][1])
        self.assertEqual((fields["v"], fields["event_id"], fields["type"]), ("1", single["event_id"], "payment_failed"))
        self.assertEqual(self.r.xack("events_stream", "g", *[i for i, _ in entries]), 4)
        self.assertEqual(self.r.xpending("events_stream", "g")["pending"], 0)

        # everything is in the Go program's keys: one stream, no PayFlux-layout stream, and the
        # dedupe records live in events_stream's hash slot (never Go's dedup:<id>)
        self.assertEqual(self.r.xlen("events_stream"), 4)
        self.assertEqual(self.r.exists("payflux:{0}:events"), 0)
        self.assertEqual(self.r.exists(f"{{events_stream}}:seen:{single['event_id']}"), 1)
        self.assertEqual(self.r.exists(f"dedup:{single['event_id']}"), 0)
        self.assertEqual(sorted(self.r.scan_iter("*events*")),
                         sorted([b"events_stream"] + [f"{{events_stream}}:seen:{e['event_id']}".encode()
                                                      for e in [single] + batch]))

    @inlineCallbacks
    def test_absent_fields_are_written_like_the_go_program_writes_them(self):
        node = yield start_node(self, self.server.url, layout="seed")
        event = seed_event()
        for name in ("failure_category", "geo_bucket", "amount_bucket", "system_source", "payment_method_bucket",
                     "channel", "retry_result", "failure_origin", "retry_count"):
            del event[name]
        response = yield node.post(SINGLE, event)
        self.assertEqual(response.code, 202, (yield response.text()))
        (_, fields), = self.r.xrange("events_stream")
        data = json.loads(fields[b"data"])
        self.assertEqual(sorted(data), sorted(SEED_FIELDS))
        self.assert_values(data, event)
        # Go's json.Marshal of the Event struct: "" for an unset string, 0 for retry_count (an int:
        # a Go consumer's json.Unmarshal into that struct refuses a string there)
        self.assertEqual({k: v for k, v in data.items() if k not in event},
                         {"failure_category": "", "geo_bucket": "", "amount_bucket": "", "system_source": "",
                          "payment_method_bucket": "", "channel": "", "retry_result": "", "failure_origin": "",
                          "retry_count": 0})

    @inlineCallbacks
    def test_duplicates_are_detected(self):
        node = yield start_node(self, self.server.url, layout="seed")
        event = seed_event()
        first = yield read_json((yield node.post(SINGLE, event)))
        again = yield read_json((yield node.post(SINGLE, event)))
        self.assertEqual((first["duplicate"], again["duplicate"], again["id"]), (False, True, first["id"]))
        other = seed_event()
        response = yield node.post(BATCH, ndjson([other, event, other]), "application/x-ndjson")
        doc = yield read_json(response)
        self.assertEqual((doc["accepted"], doc["duplicates"]), (1, 2))
        self.assertEqual([r["duplicate"] for r in doc["results"]], [False, True, True])
        self.assertEqual([json.loads(f[b"data"])["event_id"] for _, f in self.r.xrange("events_stream")],
                         [event["event_id"], other["event_id"]])
        conflict = yield node.post(SINGLE, {**event, "retry_count": 3})
        self.assertEqual(conflict.code, 409)
        self.assertEqual(self.r.xlen("events_stream"), 2)

    @inlineCallbacks
    def test_payflux_consumer_acks_dead_letters_and_the_cli_sees_it(self):
        good, bad = seed_event(), seed_event(retry_count=4)
        key = self.id()
        node = yield start_node(self, self.server.url, config_text=_consumer_config(key, [bad["event_id"]]),
                                layout="seed")
        response = yield node.post(BATCH, ndjson([good, bad]), "application/x-ndjson")
        self.assertEqual(response.code, 202, (yield response.text()))
        yield self.wait_for(lambda: self.r.xlen("events_stream_dlq") == 1, what="the dead letter")
        yield self.wait_for(lambda: self.r.xpending("events_stream", "payflux")["pending"] == 0, what="acks")
        handled = FailIdsHandler.seen[key]
        self.assertEqual([e.event_id for e in handled], [good["event_id"]])
        self.assertEqual((handled[0].partition, handled[0].event), (0, json.loads(
            fields_of(self.r.xrange("events_stream")[0][1])["data"])))
        self.assert_go_shape(handled[0].event, good)

        (dlq_id, raw), = self.r.xrange("events_stream_dlq")
        record = fields_of(raw)
        bad_stream_id = self.r.xrange("events_stream")[1][0].decode()
        # the Go program's DLQ readers use data and original_id; PayFlux adds its own fields
        self.assert_go_shape(json.loads(record["data"]), bad)
        self.assertEqual((record["original_id"], record["source_stream"], record["group"], record["event_id"],
                          record["error_class"], record["deliveries"]),
                         (bad_stream_id, "events_stream", "payflux", bad["event_id"], "RuntimeError", "2"))
        self.assertEqual(self.r.exists("payflux:{0}:dlq"), 0)

        # the operator CLI, told the layout by the environment or by --layout
        url = ("--redis-url", self.server.url)
        result = run_cli("stream", "info", "--json", *url, PAYFLUX_LAYOUT="seed")
        self.assertEqual(result.returncode, 0, result.stderr)
        (facts,) = json.loads(result.stdout)["partitions"]
        self.assertEqual((facts["stream"], facts["length"], facts["dlq"], facts["dlq_depth"]),
                         ("events_stream", 2, "events_stream_dlq", 1))
        self.assertEqual([g["name"] for g in facts["groups"]], ["payflux"])
        result = run_cli("dlq", "list", "--json", "--layout", "seed", *url)
        self.assertEqual(result.returncode, 0, result.stderr)
        doc = json.loads(result.stdout)
        self.assertEqual((doc["total"], [d["id"] for d in doc["dead_letters"]]), (1, [dlq_id.decode()]))
        self.assertEqual(doc["dead_letters"][0]["event_id"], bad["event_id"])
        result = run_cli("dlq", "replay", "--all", "--yes", "--json", "--layout", "seed", *url)
        self.assertEqual(result.returncode, 0, result.stderr)
        (replayed,) = json.loads(result.stdout)["replayed"]
        self.assertEqual(self.r.xlen("events_stream_dlq"), 0)
        (_, again), = self.r.xrange("events_stream", replayed["new_id"], replayed["new_id"])
        self.assertEqual(json.loads(again[b"data"])["event_id"], bad["event_id"])
        # the default layout's CLI looks elsewhere; seed with several partitions is refused
        result = run_cli("stream", "info", "--json", *url)
        self.assertEqual(json.loads(result.stdout)["partitions"][0]["stream"], "payflux:{0}:events")
        result = run_cli("stream", "info", "--layout", "seed", "--partitions", "2", *url)
        self.assertEqual(result.returncode, 2, result.stderr)
        self.assertIn("partitions", result.stderr)

    @inlineCallbacks
    def test_entries_and_dead_letters_the_go_program_wrote(self):
        # what docs/stream-format.md ("Seed layout", cut-over) says about the Go program's own
        # writes: PayFlux's consumers read its data-only entries, replay skips its DLQ records
        go_event = seed_event()
        go_id = self.r.xadd("events_stream", {"data": json.dumps(go_event)}).decode()
        go_dead = self.r.xadd("events_stream_dlq", {"data": json.dumps(seed_event()), "original_id": "1-0",
                                                    "reason": "export failed", "timestamp": "1700000000"})
        key = self.id()
        node = yield start_node(self, self.server.url, config_text=_consumer_config(key, []), layout="seed")
        posted = seed_event()
        response = yield node.post(SINGLE, posted)
        self.assertEqual(response.code, 202, (yield response.text()))
        yield self.wait_for(lambda: len(FailIdsHandler.seen[key]) == 2, what="both events")
        yield self.wait_for(lambda: self.r.xpending("events_stream", "payflux")["pending"] == 0, what="acks")
        go_entry, ours = FailIdsHandler.seen[key]
        self.assertEqual((go_entry.stream_id, go_entry.event_id, go_entry.schema_version, go_entry.event),
                         (go_id, go_event["event_id"], "go", go_event))
        self.assertEqual(go_entry.received_at_ms, int(go_id.split("-")[0]))
        self.assertEqual(ours.event_id, posted["event_id"])
        self.assertEqual(self.r.xlen("events_stream_dlq"), 1)  # only the Go program's own record
        result = run_cli("dlq", "replay", "--id", go_dead.decode(), "--json", "--layout", "seed",
                         "--redis-url", self.server.url)
        self.assertEqual(result.returncode, 1, result.stderr)
        (skipped,) = json.loads(result.stdout)["skipped"]
        self.assertEqual((skipped["id"], skipped["reason"]), (go_dead.decode(), "no field v"))

    @inlineCallbacks
    def test_the_default_layout_is_unchanged(self):
        node = yield start_node(self, self.server.url)
        event = seed_event()
        response = yield node.post(SINGLE, event)
        self.assertEqual(response.code, 202, (yield response.text()))
        self.assertEqual(self.r.exists("events_stream"), 0)
        (_, fields), = self.r.xrange("payflux:{0}:events")
        self.assertEqual(json.loads(fields[b"data"])["event_id"], event["event_id"])
        # its dedupe records are compact (docs/stream-format.md): a table and bucket hashes, no seen key
        self.assertEqual(self.r.exists(f"payflux:{{0}}:seen:{event['event_id']}"), 0)
        self.assertEqual(self.r.exists("payflux:{0}:dd"), 1)
        self.assertEqual(len(list(self.r.scan_iter("payflux:{0}:dd:*"))), 1)


redis_test_cases(SeedLayoutMixin, globals())


class SeedKeySlotTests(unittest.TestCase):
    """Redis Cluster slots of the seed layout's keys (CRC16 as CLUSTER KEYSLOT computes it)."""

    def test_the_append_scripts_keys_share_events_streams_slot(self):
        keys = StreamKeys(layout="seed")
        slot = key_slot(keys.events(0))
        self.assertEqual(slot, 2019)
        self.assertEqual({key_slot(keys.seen(0, e)) for e in ("a", "x{y}", str(uuid.uuid4()))}, {slot})

    def test_the_dlq_is_in_another_slot(self):
        # The Go name events_stream_dlq has no hash tag: a Lua call touching the stream and its
        # DLQ (dead-lettering, replay) cannot run on a Redis Cluster in this layout.
        self.assertEqual(key_slot(StreamKeys(layout="seed").dlq(0)), 7527)
