"""
The ingest HTTP contract, end to end: real node, real sockets, real redis-server (6.2 and 7).
"""

from __future__ import annotations

import json
import socket
import time

from twisted.internet import reactor
from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.internet.task import deferLater

from payflux.cli import sample_event
from tests.support.node import API_SECRET, read_json, start_node
from tests.support.redis import redis_test_cases

SINGLE = "/v1/events/payment_exhaust"
BATCH = "/v1/events/payment_exhaust/batch"
STREAM = "payflux:{0}:events"
with open(__file__.rsplit("/", 1)[0] + "/fixtures/seed-example.json", "rb") as _f:
    SEED_EXAMPLE_BYTES = _f.read()


def _ndjson(events) -> str:
    return "\n".join(json.dumps(e) for e in events) + "\n"


def _raw_http(port: int, data: bytes, read_timeout: float = 5.0) -> bytes:
    """Send raw bytes and read until the server closes; runs in a thread."""
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout) as s:
        try:
            s.sendall(data)
        except OSError:
            pass
        chunks = []
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        except (socket.timeout, ConnectionResetError):
            pass
        return b"".join(chunks)


class IngestMixin:
    @inlineCallbacks
    def node(self, **options):
        self.redis = self.start_redis()
        node = yield start_node(self, self.redis.url, **options)
        return node

    def xlen(self) -> int:
        return self.redis.sync_command("XLEN", STREAM)

    def stored(self) -> list[dict]:
        """The ``data`` of every entry of partition 0, decoded."""
        entries = self.redis.sync_command("XRANGE", STREAM, "-", "+")
        return [json.loads(dict(zip(f[::2], f[1::2]))[b"data"]) for _, f in entries]

    # --- the seed's contract ---

    @inlineCallbacks
    def test_seed_example_verbatim_single_batch_and_again(self):
        node = yield self.node()
        response = yield node.post(SINGLE, SEED_EXAMPLE_BYTES)  # the fixture's bytes, unchanged
        self.assertEqual((response.code, response.phrase), (202, b"Accepted"))
        first = yield read_json(response)
        self.assertEqual((first["duplicate"], "ignored_fields" in first), (False, False))
        response = yield node.post(SINGLE, SEED_EXAMPLE_BYTES)
        again = yield read_json(response)
        self.assertEqual((response.code, again["duplicate"], again["id"]), (202, True, first["id"]))
        seed = json.loads(SEED_EXAMPLE_BYTES)
        batch = [seed, {**seed, "event_id": "uuid-124"}]
        response = yield node.post(BATCH, _ndjson(batch), "application/x-ndjson")
        body = yield read_json(response)
        self.assertEqual((response.code, body["accepted"], body["duplicates"]), (202, 1, 1))
        response = yield node.post(BATCH, json.dumps(batch), "application/json")
        self.assertEqual(((yield read_json(response))["duplicates"]), 2)
        stored = self.stored()
        self.assertEqual(len(stored), 2)
        self.assertEqual(stored[0], {**seed, "event_timestamp": "2026-01-06T00:00:00.000Z"})

    @inlineCallbacks
    def test_unknown_fields_are_dropped_counted_and_listed(self):
        node = yield self.node()
        event = {**sample_event(), "amount_cents": 5000, "zz_note": "x", "a b": 1}
        response = yield node.post(SINGLE, event)
        self.assertEqual(response.code, 202)
        body = yield read_json(response)
        unsafe = f"<field #{list(event).index('a b') + 1}>"  # a key that is no identifier is not echoed
        self.assertEqual(body["ignored_fields"], sorted([unsafe, "amount_cents", "zz_note"]))
        self.assertNotIn("amount_cents", self.stored()[0])
        response = yield node.post(BATCH, _ndjson([{**sample_event(1), "amount_cents": 1}, sample_event(2)]),
                                   "application/x-ndjson")
        self.assertEqual((yield read_json(response))["ignored_fields"], ["amount_cents"])
        metrics = node.metrics.render().decode()
        self.assertIn('payflux_events_ignored_fields_total{field="amount_cents"} 2.0', metrics)
        self.assertIn('payflux_events_ignored_fields_total{field="zz_note"} 1.0', metrics)

    @inlineCallbacks
    def test_unknown_fields_reject(self):
        node = yield self.node(unknown_fields="reject")
        response = yield node.post(SINGLE, {**sample_event(), "amount_cents": 5000})
        self.assertEqual(response.code, 422)
        body = yield read_json(response)
        self.assertEqual([(d["field"], d["code"]) for d in body["details"]], [("amount_cents", "unknown_field")])
        self.assertEqual(self.redis.sync_command("DBSIZE"), 0)

    @inlineCallbacks
    def test_card_number_in_a_dropped_field_is_refused_and_not_stored(self):
        node = yield self.node()
        for form in ("4111.1111.1111.1111", "4111_1111_1111_1111", "4111:1111:1111:1111", "4111/1111/1111/1111"):
            response = yield node.post(SINGLE, {**sample_event(), "note": f"card {form}"})
            self.assertEqual(response.code, 422, form)
            raw = yield response.content()
            self.assertNotIn(b"4111", raw)
        self.assertEqual(self.redis.sync_command("DBSIZE"), 0)

    # --- 202 ---

    @inlineCallbacks
    def test_single_event_accepted_after_redis_holds_it(self):
        node = yield self.node()
        event = sample_event()
        response = yield node.post(SINGLE, event)
        self.assertEqual(response.code, 202)
        body = yield read_json(response)
        self.assertEqual(body["status"], "accepted")
        self.assertIs(body["duplicate"], False)
        entries = self.redis.sync_command("XRANGE", STREAM, "-", "+")
        self.assertEqual(len(entries), 1)
        entry_id, fields = entries[0]
        self.assertEqual(entry_id.decode(), body["id"])
        fields = dict(zip(fields[::2], fields[1::2]))
        self.assertEqual(fields[b"event_id"].decode(), event["event_id"])
        self.assertEqual(fields[b"v"], b"1")
        self.assertEqual(json.loads(fields[b"data"])["processor"], "stripe")

    @inlineCallbacks
    def test_duplicate_returns_original_id_and_appends_nothing(self):
        node = yield self.node()
        event = sample_event()
        first = yield read_json((yield node.post(SINGLE, event)))
        response = yield node.post(SINGLE, event)
        self.assertEqual(response.code, 202)
        second = yield read_json(response)
        self.assertEqual(second, {"status": "accepted", "id": first["id"], "duplicate": True})
        self.assertEqual(self.xlen(), 1)
        self.assertEqual(node.metrics.events_duplicate.labels("producer-a")._value.get(), 1)

    @inlineCallbacks
    def test_same_event_id_different_payload_is_409(self):
        node = yield self.node()
        event = sample_event()
        yield node.post(SINGLE, event)
        response = yield node.post(SINGLE, {**event, "retry_count": 3})
        self.assertEqual(response.code, 409)
        body = yield read_json(response)
        self.assertEqual(body["error"], "conflict")
        self.assertEqual(body["details"][0]["event_id"], event["event_id"])
        self.assertEqual(self.xlen(), 1)

    @inlineCallbacks
    def test_concurrent_duplicates_append_exactly_once(self):
        node = yield self.node()
        event = sample_event()
        responses = yield gatherResults([node.post(SINGLE, event) for _ in range(8)])
        self.assertEqual({r.code for r in responses}, {202})
        bodies = yield gatherResults([read_json(r) for r in responses])
        self.assertEqual(len({b["id"] for b in bodies}), 1)
        self.assertEqual(sum(1 for b in bodies if not b["duplicate"]), 1)
        self.assertEqual(self.xlen(), 1)

    @inlineCallbacks
    def test_batch_ndjson_and_array(self):
        node = yield self.node()
        events = [sample_event(n) for n in range(5)]
        response = yield node.post(BATCH, _ndjson(events), "application/x-ndjson")
        self.assertEqual(response.code, 202)
        body = yield read_json(response)
        self.assertEqual((body["count"], body["accepted"], body["duplicates"]), (5, 5, 0))
        ids = [r["id"] for r in body["results"]]
        self.assertEqual(ids, sorted(ids))  # stream order == request order
        more = [sample_event(n) for n in range(3)]
        response = yield node.post(BATCH, json.dumps(more + events[:2]), "application/json")
        body = yield read_json(response)
        self.assertEqual(response.code, 202)
        self.assertEqual((body["count"], body["accepted"], body["duplicates"]), (5, 3, 2))
        self.assertEqual(self.xlen(), 8)

    # --- 4xx in the documented order ---

    @inlineCallbacks
    def test_401_missing_unknown_revoked_and_query_keys(self):
        node = yield self.node(revoked_keys="producer-b")
        event = sample_event()
        for secret, message in [
            (None, "missing"),
            ("not-a-real-key-0123456789", "unknown"),
            ("other-secret-0123456789", "revoked"),
        ]:
            response = yield node.post(SINGLE, event, secret=secret)
            self.assertEqual(response.code, 401, secret)
            body = yield read_json(response)
            self.assertEqual(body["error"], "unauthorized")
            self.assertIn(message, body["message"])
            self.assertNotIn("0123456789", body["message"])
        response = yield node.post(SINGLE + "?api_key=" + API_SECRET, event, secret=None)
        self.assertEqual(response.code, 401)
        self.assertEqual(self.xlen(), 0)

    @inlineCallbacks
    def test_401_comes_before_everything_else(self):
        node = yield self.node()
        response = yield node.post(SINGLE, b"{not json", "text/plain", secret=None)
        self.assertEqual(response.code, 401)

    @inlineCallbacks
    def test_429_counts_events_and_says_when_to_retry(self):
        node = yield self.node(rate_limit="1", rate_burst="3")
        events = [sample_event(n) for n in range(5)]  # spends 5 of 3 tokens: admitted, then in debt
        response = yield node.post(BATCH, _ndjson(events), "application/x-ndjson")
        self.assertEqual(response.code, 202)
        response = yield node.post(SINGLE, sample_event())
        self.assertEqual((response.code, response.phrase), (429, b"Too Many Requests"))
        self.assertGreaterEqual(int(response.headers.getRawHeaders("Retry-After")[0]), 2)
        body = yield read_json(response)
        self.assertEqual(body["error"], "rate_limited")
        # the other key has its own bucket
        response = yield node.post(SINGLE, sample_event(), secret="other-secret-0123456789")
        self.assertEqual(response.code, 202)

    @inlineCallbacks
    def test_413_on_declared_length_before_reading_body(self):
        node = yield self.node(max_event_bytes="1024")
        response = yield node.post(SINGLE, json.dumps({**sample_event(), "pad": "x" * 2000}))
        self.assertEqual(response.code, 413)
        body = yield read_json(response)
        self.assertEqual(body["error"], "payload_too_large")
        # unauthenticated oversize requests get 401, not 413
        response = yield node.post(SINGLE, "x" * 5000, secret=None)
        self.assertEqual(response.code, 401)

    @inlineCallbacks
    def test_413_on_endless_chunked_body(self):
        node = yield self.node(max_body_bytes="4096")
        head = (
            f"POST {BATCH} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_SECRET}\r\n"
            "Content-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n"
        ).encode()
        chunk = b"%x\r\n%s\r\n" % (1000, b"y" * 1000)
        # 200 chunks = 200 kB offered; the server must answer after ~4 kB and close.
        raw = yield deferToThreadRaw(node.ingest_port, head + chunk * 200)
        self.assertTrue(raw.startswith(b"HTTP/1.1 413"), raw[:200])
        self.assertIn(b'"payload_too_large"', raw)
        self.assertEqual(self.xlen(), 0)

    @inlineCallbacks
    def test_415_content_type(self):
        node = yield self.node()
        response = yield node.post(SINGLE, sample_event(), content_type="text/plain")
        self.assertEqual(response.code, 415)
        response = yield node.post(BATCH, _ndjson([sample_event()]), content_type="text/csv")
        self.assertEqual(response.code, 415)
        self.assertEqual((yield read_json(response))["error"], "unsupported_media_type")

    @inlineCallbacks
    def test_400_malformed_json(self):
        node = yield self.node()
        for body in [b"{", b'{"a":1,"a":2}', b"\xff\xfe", b"", b"[1,2]]"]:
            response = yield node.post(SINGLE, body)
            self.assertEqual(response.code, 400, body)
            self.assertEqual((yield read_json(response))["error"], "malformed_json")
        good = json.dumps(sample_event())
        response = yield node.post(BATCH, good + "\n{oops\n", "application/x-ndjson")
        self.assertEqual(response.code, 400)
        body = yield read_json(response)
        self.assertEqual(body["details"][0]["line"], 2)
        self.assertEqual(self.xlen(), 0)

    @inlineCallbacks
    def test_422_lists_every_bad_field(self):
        node = yield self.node()
        event = {**sample_event(), "retry_count": True, "currency": "u$d"}
        del event["processor"]
        response = yield node.post(SINGLE, event)
        self.assertEqual(response.code, 422)
        body = yield read_json(response)
        self.assertEqual(body["error"], "invalid_event")
        fields = {d["field"] for d in body["details"]}
        self.assertEqual(fields, {"retry_count", "currency", "processor"})

    @inlineCallbacks
    def test_422_batch_with_one_bad_line_writes_nothing(self):
        node = yield self.node()
        events = [sample_event(n) for n in range(4)]
        events[2]["event_timestamp"] = "yesterday"
        response = yield node.post(BATCH, _ndjson(events), "application/x-ndjson")
        self.assertEqual(response.code, 422)
        self.assertEqual(response.phrase, b"Unprocessable Entity")
        body = yield read_json(response)
        self.assertEqual([(d["line"], d["field"]) for d in body["details"]], [(3, "event_timestamp")])
        self.assertEqual(self.xlen(), 0)
        self.assertEqual(self.redis.sync_command("DBSIZE"), 0)

    @inlineCallbacks
    def test_422_too_many_events(self):
        node = yield self.node(max_batch_events="3")
        response = yield node.post(BATCH, _ndjson([sample_event(n) for n in range(4)]), "application/x-ndjson")
        self.assertEqual(response.code, 422)
        self.assertEqual((yield read_json(response))["error"], "too_many_events")

    @inlineCallbacks
    def test_pan_is_rejected_and_never_echoed_or_stored(self):
        node = yield self.node()
        event = sample_event(failure_code="4111-1111-1111-1111")
        response = yield node.post(SINGLE, event)
        self.assertEqual(response.code, 422)
        raw = yield response.content()
        self.assertNotIn(b"4111", raw)
        self.assertIn(b"pan_detected", raw)
        self.assertEqual(self.redis.sync_command("DBSIZE"), 0)

    # --- 503 ---

    @inlineCallbacks
    def test_503_fast_when_redis_is_down_then_recovers(self):
        node = yield self.node(redis_timeout="0.5")
        response = yield node.post(SINGLE, sample_event())
        self.assertEqual(response.code, 202)
        self.redis.kill()
        started = time.monotonic()
        event = sample_event()
        response = yield node.post(SINGLE, event)
        self.assertEqual(response.code, 503)
        self.assertLess(time.monotonic() - started, 3.0)
        self.assertTrue(response.headers.getRawHeaders("Retry-After"))
        self.assertEqual((yield read_json(response))["error"], "redis_unavailable")
        ready = yield node.get("/ready")
        self.assertEqual(ready.code, 503)
        self.redis.start()
        for _ in range(100):  # txredisapi reconnects with backoff (max 10 s)
            response = yield node.post(SINGLE, event)
            if response.code == 202:
                break
            yield deferLater(reactor, 0.2, lambda: None)
        self.assertEqual(response.code, 202)

    @inlineCallbacks
    def test_503_when_redis_is_paused(self):
        node = yield self.node(redis_timeout="0.3")
        self.redis.pause()
        self.addCleanup(self.redis.resume)
        started = time.monotonic()
        response = yield node.post(SINGLE, sample_event())
        self.assertEqual(response.code, 503)
        self.assertLess(time.monotonic() - started, 2.0)

    @inlineCallbacks
    def test_503_overloaded_when_too_many_events_in_flight(self):
        node = yield self.node(max_inflight_events="2")
        response = yield node.post(BATCH, _ndjson([sample_event(n) for n in range(3)]), "application/x-ndjson")
        self.assertEqual(response.code, 503)
        self.assertEqual((yield read_json(response))["error"], "overloaded")
        self.assertEqual(self.xlen(), 0)

    @inlineCallbacks
    def test_draining_refuses_new_ingests_and_turns_unready(self):
        node = yield self.node()
        yield node.app.start_draining()
        response = yield node.post(SINGLE, sample_event())
        self.assertEqual(response.code, 503)
        self.assertEqual((yield read_json(response))["error"], "draining")
        ready = yield node.get("/ready", side=True)
        self.assertEqual(ready.code, 503)

    @inlineCallbacks
    def test_stop_finishes_inflight_appends_and_refuses_new_ones(self):
        node = yield self.node(redis_timeout="5")
        response = yield node.post(SINGLE, sample_event())  # connection up, script loaded
        self.assertEqual(response.code, 202)
        self.redis.pause()
        self.addCleanup(self.redis.resume)
        pending = node.post(SINGLE, sample_event())
        for _ in range(50):
            if node.app.inflight_requests:
                break
            yield deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(node.app.inflight_requests, 1)
        stopping = node.node.stopService()
        late = yield node.post(SINGLE, sample_event())
        self.assertEqual(late.code, 503)
        self.assertEqual((yield read_json(late))["error"], "draining")
        self.assertFalse(stopping.called)
        self.redis.resume()
        response = yield pending
        self.assertEqual(response.code, 202)
        yield stopping
        self.assertEqual(self.xlen(), 2)

    # --- operations endpoints ---

    @inlineCallbacks
    def test_health_ready_metrics_openapi(self):
        node = yield self.node()
        for side in (False, True):
            health = yield node.get("/health", side=side)
            self.assertEqual(health.code, 200)
            ready = yield node.get("/ready", side=side)
            self.assertEqual(ready.code, 200)
        yield node.post(SINGLE, sample_event())
        yield node.post(SINGLE, sample_event(), secret=None)
        yield deferLater(reactor, 0.5, lambda: None)  # let the sampler run
        ingest_port_metrics = yield node.get("/metrics")
        self.assertEqual(ingest_port_metrics.code, 404)  # side port only, unless ingest_metrics
        self.assertEqual((yield read_json(ingest_port_metrics))["error"], "not_found")
        for side in (True,):
            text = (yield (yield node.get("/metrics", side=side)).text())
            self.assertIn('payflux_events_accepted_total{key_id="producer-a"} 1.0', text)
            self.assertIn('payflux_requests_rejected_total{key_id="-",reason="unauthorized"} 1.0', text)
            self.assertIn('payflux_stream_length{partition="0"} 1.0', text)
            self.assertIn("payflux_redis_up 1.0", text)
            self.assertIn("payflux_request_duration_seconds_bucket", text)
            self.assertIn("payflux_redis_append_duration_seconds_count 1.0", text)
        doc = yield read_json((yield node.get("/openapi.json")))
        self.assertEqual(doc["openapi"], "3.0.3")
        self.assertIn("/v1/events/payment_exhaust/batch", doc["paths"])

    @inlineCallbacks
    def test_metrics_on_the_ingest_port_only_when_enabled(self):
        node = yield self.node(ingest_metrics=True)
        response = yield node.get("/metrics")
        self.assertEqual(response.code, 200)
        self.assertIn("payflux_redis_up", (yield response.text()))

    @inlineCallbacks
    def test_unknown_path_and_method_are_json(self):
        node = yield self.node()
        response = yield node.get("/nope")
        self.assertEqual(response.code, 404)
        self.assertEqual((yield read_json(response))["error"], "not_found")
        response = yield node.get(SINGLE)
        self.assertEqual(response.code, 405)
        self.assertEqual((yield read_json(response))["error"], "method_not_allowed")

    @inlineCallbacks
    def test_partitions_route_by_merchant(self):
        node = yield self.node(partitions="4")
        events = [sample_event(n) for n in range(40)]
        response = yield node.post(BATCH, _ndjson(events), "application/x-ndjson")
        self.assertEqual(response.code, 202)
        lengths = [self.redis.sync_command("XLEN", f"payflux:{{{p}}}:events") for p in range(4)]
        self.assertEqual(sum(lengths), 40)
        self.assertGreater(sum(1 for n in lengths if n), 1)

    @inlineCallbacks
    def test_event_without_merchant_goes_to_partition_zero(self):
        """crc32("") % N = 0: the documented partition of an event with no merchant_id_hash."""
        node = yield self.node(partitions="4")
        response = yield node.post(SINGLE, sample_event(merchant_id_hash=None))
        self.assertEqual(response.code, 202)
        self.assertEqual([self.redis.sync_command("XLEN", f"payflux:{{{p}}}:events") for p in range(4)],
                         [1, 0, 0, 0])


def deferToThreadRaw(port: int, data: bytes):
    from twisted.internet.threads import deferToThread

    return deferToThread(_raw_http, port, data)


redis_test_cases(IngestMixin, globals())
