"""
The Kafka exporter against librdkafka's built-in mock cluster (three brokers in this process,
reached over TCP; their addresses come from the owning producer's ``list_topics()``), read back
by a separate confluent-kafka Consumer.  The last test runs the exporter under the real
consumer runtime (``twistd -n payflux --roles consumers``) with a real redis-server, SIGKILLs
it mid-export and checks that the topic ends up with every event.
"""

from __future__ import annotations

import collections
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition
from twisted.internet import defer, reactor
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from payflux.consumers.config import ConsumerConfig
from payflux.consumers.handlers import EntriesFailed, Entry, load_handler
from payflux.consumers.service import ConsumerService
from payflux.events import EventValidator, ValidationPolicy, canonical_json
from payflux.exporters.kafka import HEADERS, KafkaExporter, message_key, producer_config
from payflux.observability.metrics import Metrics
from payflux.streams.keys import StreamKeys
from tests.support.consumers import wait_for
from tests.support.daemon import ConsumerDaemon, append_events
from tests.support.process import TWISTD, clean_env
from tests.support.redis import find_redis_binaries, redis_test_cases

VALIDATOR = EventValidator(ValidationPolicy(), now=lambda: 1.8e9)
RECEIVED_AT = 1_768_471_200_000  # 2026-01-15T10:00:00Z


def payment_event(i: int, merchants: int = 12) -> dict:
    """A valid payment_exhaust event (normalised by the real validator); merchant = i % merchants."""
    event = {
        "event_id": f"evt_{i:06d}",
        "event_type": ("payment_failed", "payment_succeeded", "payment_retried")[i % 3],
        "event_timestamp": f"2026-01-15T09:{(i // 60) % 60:02d}:{i % 60:02d}.{i % 1000:03d}Z",
        "processor": ("stripe", "adyen")[i % 2],
        "merchant_id_hash": f"mh_{i % merchants:04d}_x",
        "payment_intent_id_hash": f"pi_{i:08d}",
        "retry_count": i % 4,
    }
    if i % 2:
        event.update(currency="EUR", amount_bucket="10-50", payment_method_bucket="credit_card", geo_bucket="EU-west",
                     customer_id_hash=f"cu_{i % 97:05d}", processor_latency_ms=i * 7, system_source="checkout_api",
                     channel="web", retry_result="failed", failure_origin="issuer")
    return VALIDATOR.validate(event)


def entry(i: int, merchants: int = 12, **overrides: Any) -> Entry:
    event = {**payment_event(i, merchants), **overrides}
    return Entry(f"{RECEIVED_AT + i}-0", 0, event["event_id"], RECEIVED_AT + i, "1", event, 1, event["event_type"])


class MockCluster:
    """librdkafka's mock cluster (``test.mock.num.brokers``), owned by a producer in this process."""

    def __init__(self, testcase: unittest.TestCase, **config: Any) -> None:
        self.owner = Producer({"test.mock.num.brokers": 3, "log_level": 3, **config})
        brokers = self.owner.list_topics(timeout=10).brokers.values()
        self.bootstrap = ",".join(f"{b.host}:{b.port}" for b in brokers)
        testcase.addCleanup(self.stop)

    def stop(self) -> None:
        """Destroy the cluster: its brokers stop listening."""
        if self.owner is not None:
            self.owner.close()
            self.owner = None

    def create_topic(self, topic: str) -> int:
        """A metadata request for ``topic`` creates it (the mock auto-creates); returns its partition count."""
        return len(self.owner.list_topics(topic, timeout=10).topics[topic].partitions)


class TopicReader:
    """A separate Consumer reading a whole topic from the beginning (no group coordination)."""

    def __init__(self, testcase: unittest.TestCase, cluster: MockCluster, topic: str) -> None:
        partitions = cluster.create_topic(topic)
        self.consumer = Consumer({"bootstrap.servers": cluster.bootstrap, "group.id": "payflux-test-reader",
                                  "enable.auto.commit": False, "log_level": 3})
        self.consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
        self.messages: list[Any] = []
        testcase.addCleanup(self.consumer.close)

    def poll(self) -> int:
        """Take what the consumer has fetched so far (never blocks); returns the count read."""
        for message in self.consumer.consume(10_000, 0):
            if message.error() is None:
                self.messages.append(message)
        return len(self.messages)

    async def read(self, count: int, timeout: float = 15.0) -> list[Any]:
        await wait_for(lambda: self.poll() >= count, timeout=timeout, what=f"{count} messages in the topic")
        return self.messages


def sample(metrics: Metrics, name: str, consumer: str = "c1") -> float:
    return metrics.registry.get_sample_value(name, {"exporter": "kafka", "consumer": consumer}) or 0.0


class KafkaExporterTests(unittest.TestCase):
    timeout = 30

    def exporter(self, **options: Any) -> KafkaExporter:
        exporter = KafkaExporter(reactor=reactor, flush_timeout=2.0, **options)
        self.addCleanup(exporter.close)
        return exporter

    async def test_every_event_arrives_keyed_and_in_merchant_order(self):
        cluster = MockCluster(self)
        reader = TopicReader(self, cluster, "payments")
        exporter = self.exporter(topic="payments", bootstrap_servers=cluster.bootstrap)
        metrics = Metrics()
        exporter.bind_metrics(metrics, "c1")
        entries = [entry(i) for i in range(1200)]
        # four batches in flight at once, as with the runtime's concurrency = 4
        results = await defer.gatherResults([
            defer.maybeDeferred(exporter.handle, entries[b:b + 300]) for b in range(0, 1200, 300)])
        self.assertEqual(results, [None] * 4)
        messages = await reader.read(1200)
        reader.poll()
        self.assertEqual(len(reader.messages), 1200)  # nothing twice
        by_id = {e.event_id: e for e in entries}
        partitions_of_merchant: dict[bytes, set[int]] = collections.defaultdict(set)
        order: dict[bytes, list[str]] = collections.defaultdict(list)
        for m in sorted(messages, key=lambda m: (m.partition(), m.offset())):
            headers = {k: v.decode() for k, v in m.headers()}
            e = by_id[headers["payflux.event_id"]]
            self.assertEqual(m.value(), canonical_json(e.event))
            self.assertEqual(m.key(), e.event["merchant_id_hash"].encode())
            self.assertEqual(m.timestamp()[1], e.received_at_ms)
            self.assertEqual(set(headers), set(HEADERS))
            self.assertEqual((headers["payflux.stream_id"], headers["payflux.partition"], headers["payflux.event_type"],
                              headers["payflux.received_at"], headers["payflux.schema_version"]),
                             (e.stream_id, "0", e.type, str(e.received_at_ms), "1"))
            partitions_of_merchant[m.key()].add(m.partition())
            order[m.key()].append(e.event_id)
        self.assertEqual(len(order), 12)
        for merchant, ids in order.items():
            self.assertEqual(len(partitions_of_merchant[merchant]), 1, merchant)
            self.assertEqual(ids, sorted(ids), merchant)  # the order handle() was given
        self.assertEqual(sample(metrics, "payflux_exporter_exported_total"), 1200)
        self.assertEqual(sample(metrics, "payflux_exporter_failed_total"), 0)
        self.assertGreater(sample(metrics, "payflux_exporter_last_success_timestamp_seconds"), 1.7e9)

    async def test_an_event_without_a_merchant_is_keyed_by_its_event_id(self):
        cluster = MockCluster(self)
        reader = TopicReader(self, cluster, "payments")
        exporter = self.exporter(topic="payments", bootstrap_servers=cluster.bootstrap)
        without = {k: v for k, v in payment_event(1).items() if k != "merchant_id_hash"}
        entries = [
            entry(0),
            Entry(f"{RECEIVED_AT + 1}-0", 0, without["event_id"], RECEIVED_AT + 1, "1", without, 1, "payment_failed"),
            entry(2, merchant_id_hash=""),  # layout = "seed": an absent merchant is ""
        ]
        self.assertIsNone(await exporter.handle(entries))
        messages = await reader.read(3)
        keys = {m.key() for m in messages}
        self.assertEqual(keys, {b"mh_0000_x", b"evt_000001", b"evt_000002"})
        self.assertEqual([message_key(e) for e in entries], [b"mh_0000_x", b"evt_000001", b"evt_000002"])

    async def test_full_producer_queue_waits_and_keeps_order(self):
        cluster = MockCluster(self)
        reader = TopicReader(self, cluster, "payments")
        # room for 5 messages: produce() raises BufferError until reports free the queue
        exporter = self.exporter(topic="payments", bootstrap_servers=cluster.bootstrap,
                                 librdkafka={"queue.buffering.max.messages": 5})
        entries = [entry(i, merchants=3) for i in range(200)]
        await defer.gatherResults([defer.maybeDeferred(exporter.handle, entries[b:b + 50]) for b in range(0, 200, 50)])
        messages = await reader.read(200)
        order = collections.defaultdict(list)
        for m in sorted(messages, key=lambda m: (m.partition(), m.offset())):
            order[m.key()].append(dict(m.headers())["payflux.event_id"].decode())
        self.assertEqual(sum(len(ids) for ids in order.values()), 200)
        for ids in order.values():
            self.assertEqual(ids, sorted(ids))

    async def test_unknown_topic_fails_every_entry(self):
        cluster = MockCluster(self)
        exporter = self.exporter(topic="no-such-topic", bootstrap_servers=cluster.bootstrap, librdkafka={
            "allow.auto.create.topics": False, "topic.metadata.propagation.max.ms": 200})
        metrics = Metrics()
        exporter.bind_metrics(metrics, "c1")
        entries = [entry(i) for i in range(5)]
        failure = await self.assertFailure(defer.maybeDeferred(exporter.handle, entries), EntriesFailed)
        self.assertEqual(set(failure.failures), {(0, e.stream_id) for e in entries})
        self.assertIn("UNKNOWN_TOPIC_OR_PART", str(failure.failures[(0, entries[0].stream_id)]))
        self.assertEqual(sample(metrics, "payflux_exporter_failed_total"), 5)
        self.assertEqual(sample(metrics, "payflux_exporter_exported_total"), 0)

    async def test_cluster_down_fails_entries_after_message_timeout(self):
        cluster = MockCluster(self)
        exporter = self.exporter(topic="payments", bootstrap_servers=cluster.bootstrap,
                                 librdkafka={"message.timeout.ms": 1500})
        await exporter.handle([entry(0)])  # connected, producer id assigned
        cluster.stop()
        entries = [entry(i) for i in range(1, 4)]
        started = time.monotonic()
        # librdkafka keeps retrying (reconnecting) until message.timeout.ms, then reports failure
        failure = await self.assertFailure(defer.maybeDeferred(exporter.handle, entries), EntriesFailed)
        self.assertGreaterEqual(time.monotonic() - started, 1.0)
        self.assertEqual(set(failure.failures), {(0, e.stream_id) for e in entries})
        self.assertTrue(all("_MSG_TIMED_OUT" in str(e) for e in failure.failures.values()), failure.failures)

    async def test_refused_message_fails_alone(self):
        cluster = MockCluster(self)
        reader = TopicReader(self, cluster, "payments")
        exporter = self.exporter(topic="payments", bootstrap_servers=cluster.bootstrap,
                                 librdkafka={"message.max.bytes": 1000})
        entries = [entry(i) for i in range(10)]
        entries[4] = entry(4, failure_code="x" * 2000)  # > message.max.bytes: produce() refuses it
        failure = await self.assertFailure(defer.maybeDeferred(exporter.handle, entries), EntriesFailed)
        self.assertEqual(list(failure.failures), [(0, entries[4].stream_id)])
        self.assertIn("MSG_SIZE_TOO_LARGE", str(failure.failures[(0, entries[4].stream_id)]))
        messages = await reader.read(9)
        self.assertEqual(sorted(dict(m.headers())["payflux.event_id"].decode() for m in messages),
                         sorted(e.event_id for i, e in enumerate(entries) if i != 4))

    async def test_fatal_producer_error_replaces_the_producer(self):
        cluster = MockCluster(self)
        reader = TopicReader(self, cluster, "payments")
        exporter = self.exporter(topic="payments", bootstrap_servers=cluster.bootstrap)
        await exporter.handle([entry(0)])
        old = exporter._link
        # what librdkafka's error_cb delivers when the idempotent producer hits a fatal error
        exporter._producer_error(old, KafkaError(KafkaError._FATAL, "injected fatal error", fatal=True))
        self.assertIsNot(exporter._link, old)
        await old.stopped
        self.assertFalse(old.thread.is_alive())
        await exporter.handle([entry(1)])
        messages = await reader.read(2)
        self.assertEqual(sorted(dict(m.headers())["payflux.event_id"].decode() for m in messages),
                         ["evt_000000", "evt_000001"])

    async def test_close_is_bounded_and_fails_what_is_unconfirmed(self):
        cluster = MockCluster(self)
        exporter = KafkaExporter(reactor=reactor, topic="payments", bootstrap_servers=cluster.bootstrap,
                                 flush_timeout=0.3)
        await exporter.handle([entry(0)])
        cluster.stop()  # nothing will be confirmed any more; message.timeout.ms is 30 s
        d = defer.maybeDeferred(exporter.handle, [entry(i) for i in range(3)])
        started = time.monotonic()
        await exporter.close()
        self.assertLess(time.monotonic() - started, 2.0)
        self.assertFalse(exporter._link.thread.is_alive())
        failure = await self.assertFailure(d, EntriesFailed)
        self.assertEqual(len(failure.failures), 3)
        self.assertTrue(all("PURGE" in str(e) for e in failure.failures.values()), failure.failures)
        self.assertRaises(RuntimeError, exporter.handle, [entry(9)])

    async def test_secrets_never_logged(self):
        cluster = MockCluster(self)
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        secret = "Hunter2-do-not-log"
        # the mock has no SASL: the producer logs and reports an authentication error
        exporter = self.exporter(topic="payments", bootstrap_servers=cluster.bootstrap, librdkafka={
            "security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "PLAIN", "sasl.username": "payflux",
            "sasl.password": secret, "message.timeout.ms": 500})
        await self.assertFailure(defer.maybeDeferred(exporter.handle, [entry(0)]), EntriesFailed)
        texts = [formatEvent(e) for e in events]
        self.assertTrue(any("_AUTHENTICATION" in t for t in texts), texts)
        self.assertFalse([t for t in texts if secret in t])
        self.assertFalse([e for e in events if secret in repr(e)])

    def test_options_are_validated(self):
        good = dict(topic="payments", bootstrap_servers="k1:9092,k2:9092")
        bad = [
            (dict(good, topic="bad topic"), "option topic"),
            (dict(good, topic=""), "option topic"),
            ({"topic": "payments"}, "option bootstrap_servers is required"),
            (dict(good, bootstrap_servers="k1"), "option bootstrap_servers"),
            (dict(good, bootstrap_servers="k1:99999"), "option bootstrap_servers"),
            (dict(good, bootstrap_servers=[]), "option bootstrap_servers"),
            (dict(good, librdkafka="acks=1"), "option librdkafka must be a table"),
            (dict(good, librdkafka={"enable.idempotence": False}), "option librdkafka.enable.idempotence"),
            (dict(good, librdkafka={"acks": 1}), "option librdkafka.acks"),
            (dict(good, librdkafka={"bootstrap.servers": "x:1"}), "option librdkafka.bootstrap.servers"),
            (dict(good, librdkafka={"delivery.report.only.error": True}), "option librdkafka.delivery.report.only.error"),
            (dict(good, librdkafka={"linger.ms": [1]}), "option librdkafka.linger.ms"),
            (dict(good, librdkafka={"no.such.setting": 1}), "option librdkafka"),
            (dict(good, librdkafka={"linger.ms": -5}), "option librdkafka"),
            (dict(good, flush_timeout=-1), "option flush_timeout"),
            (dict(good, flush_timeout=True), "option flush_timeout"),
            (dict(good, sasl_password_file="/nonexistent/payflux-password"), "option sasl_password_file"),
            (dict(good, tpoic="x"), "unknown option 'tpoic'"),
        ]
        for options, message in bad:
            with self.assertRaises(ValueError, msg=repr(options)) as caught:
                KafkaExporter(reactor=reactor, **options)
            self.assertIn(message, str(caught.exception))

    def test_password_file_and_passthrough_settings(self):
        secret = "s3cret-from-file"
        fd, path = tempfile.mkstemp()
        with os.fdopen(fd, "w") as f:
            f.write(secret + "\n")
        self.addCleanup(os.unlink, path)
        topic, config, flush_timeout = producer_config(dict(
            topic="payments", bootstrap_servers=["k1:9092", "[::1]:9093"], sasl_password_file=path, flush_timeout=3,
            librdkafka={"security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512", "sasl.username": "pf",
                        "ssl.ca.location": "/etc/ssl/certs/ca.pem", "linger.ms": 20}))
        self.assertEqual((topic, flush_timeout), ("payments", 3.0))
        self.assertEqual(config["sasl.password"], secret)
        self.assertEqual(config["bootstrap.servers"], "k1:9092,[::1]:9093")
        self.assertEqual((config["enable.idempotence"], config["acks"], config["linger.ms"]), (True, "all", 20))
        self.assertEqual(config["message.timeout.ms"], 30_000)
        with self.assertRaises(ValueError) as caught:
            producer_config(dict(topic="t", bootstrap_servers="k:1", sasl_password_file=path,
                                 librdkafka={"sasl.password": "other"}))
        self.assertNotIn(secret, str(caught.exception))
        # an invalid value next to a password: librdkafka's complaint is passed on without the password
        with self.assertRaises(ValueError) as caught:
            KafkaExporter(reactor=reactor, topic="t", bootstrap_servers="k:1", sasl_password_file=path,
                          librdkafka={"security.protocol": "NOPE"})
        self.assertIn("option librdkafka: Invalid value", str(caught.exception))
        self.assertNotIn(secret, str(caught.exception))

    async def test_built_in_name_loads_the_exporter(self):
        cluster = MockCluster(self)
        exporter = load_handler("kafka", {"topic": "payments", "bootstrap_servers": cluster.bootstrap}, reactor)
        self.addCleanup(exporter.close)
        self.assertIsInstance(exporter, KafkaExporter)
        with self.assertRaises(ValueError) as caught:
            load_handler("kafka", {"topic": "payments"}, reactor)
        self.assertIn("option bootstrap_servers", str(caught.exception))

    async def test_building_starts_no_thread_starting_the_service_does(self):
        """twistd builds the handlers before it daemonizes (a fork keeps no thread): the producer and
        its poller thread start with the consumer service (``startService``), not when built."""
        cluster = MockCluster(self)

        def tasks() -> set[str]:  # every thread of the process, librdkafka's own included
            return set(os.listdir("/proc/self/task"))

        def pollers() -> set[threading.Thread]:
            return {t for t in threading.enumerate() if t.name == "payflux-kafka-poller" and t.is_alive()}

        tasks_before, pollers_before = tasks(), pollers()
        exporter = load_handler("kafka", {"topic": "payments", "bootstrap_servers": cluster.bootstrap,
                                          "flush_timeout": 2.0}, reactor)
        self.addCleanup(exporter.close)
        self.assertEqual(tasks() - tasks_before, set())
        self.assertEqual(pollers(), pollers_before)
        reader = TopicReader(self, cluster, "payments")

        ready: defer.Deferred = defer.Deferred()  # the read loop waits for "Redis": it never reads
        service = ConsumerService(ConsumerConfig("kafka-export", "kafka", "kafka"), exporter, None, lambda: None,
                                  StreamKeys("payflux"), 1, Metrics().consumers, reactor, ready=lambda: ready)
        self.addCleanup(lambda: ready.called or ready.cancel())
        service.startService()
        started = pollers() - pollers_before
        self.assertEqual(len(started), 1)
        self.assertGreater(len(tasks() - tasks_before), 1)  # the poller and librdkafka's threads
        self.assertIsNone(await exporter.handle([entry(0)]))
        self.assertEqual(len(await reader.read(1)), 1)
        await service.stopService()  # closes the exporter: its poller ends
        self.assertFalse(started.pop().is_alive())


# -- under the real consumer runtime ------------------------------------------------------------

KEYS = StreamKeys("payflux")
PARTITIONS = 2
N = 1200


class KafkaRuntimeMixin:
    timeout = 60

    def pending(self) -> int:
        return sum(int(self.server.sync_command("XPENDING", KEYS.events(p), "kafka")[0]) for p in range(PARTITIONS))

    def acked(self) -> int:
        """Entries the group has acknowledged: delivered (up to last-delivered-id) minus pending."""
        delivered = 0
        for p in range(PARTITIONS):
            for group in self.server.sync_command("XINFO", "GROUPS", KEYS.events(p)):
                info = {k.decode(): v for k, v in zip(group[::2], group[1::2])}
                if info["name"] == b"kafka":
                    delivered += len(self.server.sync_command("XRANGE", KEYS.events(p), "-", info["last-delivered-id"]))
        return delivered - self.pending()

    async def test_sigkill_mid_export_loses_nothing(self):
        self.server = self.start_redis()
        events = [payment_event(i) for i in range(N)]
        await append_events(self.server.url, KEYS, PARTITIONS, events, RECEIVED_AT)
        for p in range(PARTITIONS):
            self.server.sync_command("XGROUP", "CREATE", KEYS.events(p), "kafka", "0")
        # every produce request takes >= 50 ms: batches are in flight when the consumer dies
        cluster = MockCluster(self, **{"test.mock.broker.rtt": 50})
        reader = TopicReader(self, cluster, "payments")
        daemon = ConsumerDaemon(self, self.server.url, extra_args=("--partitions", str(PARTITIONS)),
                                consumer_table=f"""
[[consumers]]
name = "kafka-export"
group = "kafka"
handler = "kafka"
batch_size = 20
concurrency = 2
block_ms = 200
min_idle_ms = 2000
reclaim_interval = 0.2
consumer_name = "exporter-1"
options = {{ topic = "payments", bootstrap_servers = "{cluster.bootstrap}", flush_timeout = 2.0 }}
""")
        daemon.start()
        in_flight_at_kills = await daemon.kill_mid_export(self.acked, self.pending)
        expected = {e["event_id"] for e in events}

        def ids() -> collections.Counter:
            reader.poll()
            return collections.Counter(dict(m.headers())["payflux.event_id"].decode() for m in reader.messages)

        await daemon.wait_for(lambda: set(ids()) >= expected, timeout=25, what="every event in Kafka")
        await daemon.wait_for(lambda: self.pending() == 0, timeout=10, what="nothing pending")
        daemon.proc.send_signal(signal.SIGTERM)
        self.assertIn(daemon.proc.wait(20), (0, -signal.SIGTERM))
        counts = ids()
        self.assertEqual(set(counts), expected)
        self.assertGreater(in_flight_at_kills, 0)
        for p in range(PARTITIONS):
            self.assertEqual(self.server.sync_command("XLEN", KEYS.dlq(p)), 0)
        duplicates = sum(c - 1 for c in counts.values())
        print(f"\n  kafka: {N} events, 2 SIGKILLs, {sum(counts.values())} messages, {duplicates} duplicates, "
              f"{in_flight_at_kills} entries in flight at the kills", file=sys.stderr)

    async def test_daemonized_twistd_exports(self):
        """Without ``-n`` twistd forks after ``makeService`` built the handlers (a fork keeps no thread):
        the producer and its poller start in the daemon, with the consumer service, and events arrive."""
        self.server = self.start_redis()
        events = [payment_event(i) for i in range(60)]
        await append_events(self.server.url, KEYS, PARTITIONS, events, RECEIVED_AT)
        cluster = MockCluster(self)
        reader = TopicReader(self, cluster, "payments")
        directory = tempfile.mkdtemp(prefix="payflux-kafka-daemon-")
        self.addCleanup(shutil.rmtree, directory, True)
        config = os.path.join(directory, "payflux.toml")
        with open(config, "w") as f:
            f.write('[[consumers]]\nname = "kafka-export"\ngroup = "kafka"\nhandler = "kafka"\nblock_ms = 200\n'
                    f'options = {{ topic = "payments", bootstrap_servers = "{cluster.bootstrap}", flush_timeout = 2.0 }}\n')
        pidfile, logfile = os.path.join(directory, "twistd.pid"), os.path.join(directory, "twistd.log")
        # twistd's first process exits once the daemon has started its services
        started = subprocess.run([*TWISTD, f"--pidfile={pidfile}", f"--logfile={logfile}", "payflux",
                                  "--roles", "consumers", "--redis-url", self.server.url, "--partitions",
                                  str(PARTITIONS), "--config", config, "--metrics-listen", "none"],
                                 cwd=directory, env=clean_env(), capture_output=True, timeout=30)
        self.assertEqual(started.returncode, 0, started.stderr)
        with open(pidfile) as f:
            pid = int(f.read())

        def kill() -> None:
            if os.path.exists(pidfile):
                os.kill(pid, signal.SIGKILL)

        self.addCleanup(kill)

        def log_text() -> str:
            with open(logfile, errors="replace") as f:
                return f.read()

        try:
            await wait_for(lambda: reader.poll() >= len(events), timeout=20, what="every event in Kafka")
        except AssertionError as e:
            raise AssertionError(f"{e}\n{log_text()[-3000:]}") from None
        self.assertEqual({dict(m.headers())["payflux.event_id"].decode() for m in reader.messages},
                         {e["event_id"] for e in events})
        os.kill(pid, signal.SIGTERM)
        await wait_for(lambda: not os.path.exists(pidfile), timeout=20, what="the daemon's clean stop")


# one Redis version: the exporter doesn't depend on it (the runtime's own tests cover both)
redis_test_cases(KafkaRuntimeMixin, globals(), versions=("7",) if "7" in find_redis_binaries() else ("6.2",))
