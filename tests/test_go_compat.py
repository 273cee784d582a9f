"""
PayFlux as a drop-in for the Go PayFlux (issue 11, "done when"), with real processes:

- the quick-start node (embedded Redis, ``twistd -n payflux --insecure-dev-mode``, as ``make
  run`` starts it) accepts the seed's example verbatim and 10,000 generated seed-shaped events
  (UUID ids, hex SHA-256 hashes);
- the Stripe webhook forwarder that ships with the Go PayFlux (``../shared/peers``, built
  unchanged) logs "Successfully forwarded" for every event it is sent;
- a Go PayFlux deployment's environment (``REDIS_ADDR``, ``HTTP_ADDR``, ``PAYFLUX_API_KEY``,
  ``PAYFLUX_LAYOUT=seed``) serves the same traffic into ``events_stream``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timedelta, timezone

from twisted.trial.unittest import SynchronousTestCase

from tests.support.process import TWISTD, clean_env, http_request, reap_supervisor, wait_ready
from tests.support.redis import RedisProcess, find_redis_binaries, free_port, sync_command_at

HERE = os.path.dirname(os.path.abspath(__file__))
PEERS = os.path.join(HERE, "..", "..", "shared", "peers")
FORWARDER = os.path.join(PEERS, "run-stripe-forwarder.sh")
SEND_STRIPE = os.path.join(PEERS, "send-stripe-event.py")
with open(os.path.join(HERE, "fixtures", "seed-example.json"), "rb") as f:
    SEED_EXAMPLE_BYTES = f.read()
GO_KEY = "go-style-bare-secret-0123456789"
SINGLE = "/v1/events/payment_exhaust"
BATCH = "/v1/events/payment_exhaust/batch"


def _post(url: str, body: bytes, content_type: str = "application/json", key: str | None = None):
    headers = {"Content-Type": content_type}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    status, raw = http_request(url, body, headers, timeout=30)
    return status, json.loads(raw)


def seed_shaped_events(n: int, seed: int = 11) -> list[dict]:
    """``n`` events with the seed's 15 fields, UUID ids and hex SHA-256 hashes."""
    now = datetime.now(timezone.utc)
    processors = ("stripe", "adyen", "checkout", "internal")
    out = []
    for i in range(n):
        digest = hashlib.sha256(f"{seed}:{i}".encode()).hexdigest
        out.append({
            "event_type": "payment_failed" if i % 3 else "payment_succeeded",
            "event_timestamp": (now - timedelta(seconds=i % 600)).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "event_id": str(uuid.UUID(int=(seed << 64) + i, version=4)),
            "merchant_id_hash": hashlib.sha256(f"merchant-{i % 97}".encode()).hexdigest(),
            "payment_intent_id_hash": digest(),
            "processor": processors[i % 4],
            "failure_category": "processor_timeout",
            "retry_count": i % 3,
            "geo_bucket": "US",
            "amount_bucket": "50-200",
            "system_source": "checkout_api",
            "payment_method_bucket": "credit_card",
            "channel": "web",
            "retry_result": "failed",
            "failure_origin": "processor",
        })
    return out


class GoCompatTests(SynchronousTestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="payflux-gocompat-")
        self.data_dir = os.path.join(self.dir, "data")

    def spawn(self, name: str, args: list[str], env: dict) -> subprocess.Popen:
        log = open(os.path.join(self.dir, f"{name}.log"), "wb")
        self.addCleanup(log.close)
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=self.dir, env=env)
        self.addCleanup(reap_supervisor, proc, self.data_dir)
        return proc

    def log(self, name: str) -> str:
        with open(os.path.join(self.dir, f"{name}.log"), "rb") as f:
            return f.read().decode("utf-8", "replace")

    def wait_ready(self, proc: subprocess.Popen, port: int, name: str) -> str:
        base = f"http://127.0.0.1:{port}"
        wait_ready(self, proc, base + "/ready", lambda: self.log(name), timeout=30, what=name)
        return base

    def quick_start_node(self) -> tuple[str, str]:
        """The node ``make run`` starts: embedded Redis, insecure dev mode. (base url, redis socket)"""
        port = free_port()
        proc = self.spawn("node", [*TWISTD, "-n", "--pidfile=", "payflux", "--insecure-dev-mode",
                                   "--listen", f"tcp:{port}:interface=127.0.0.1", "--metrics-listen", "none",
                                   "--data-dir", self.data_dir], clean_env())
        return self.wait_ready(proc, port, "node"), os.path.join(self.data_dir, "redis.sock")

    def send_generated(self, base: str, events: list[dict], key: str | None = None) -> None:
        for start in range(0, len(events), 500):
            body = "\n".join(json.dumps(e) for e in events[start:start + 500]).encode()
            status, doc = _post(base + BATCH, body, "application/x-ndjson", key)
            self.assertEqual(status, 202, doc)
            self.assertEqual(doc["accepted"], len(events[start:start + 500]))

    def forward_stripe_events(self, ingest_url: str, key: str, count: int) -> None:
        """Run the Go PayFlux's Stripe forwarder against ``ingest_url`` and send it ``count`` events."""
        port = free_port()
        secret = "whsec_test_0123456789abcdef"
        env = clean_env(PORT=str(port), STRIPE_WEBHOOK_SECRET=secret, PAYFLUX_API_KEY=key,
                        PAYFLUX_INGEST_URL=ingest_url)
        proc = self.spawn("forwarder", ["bash", FORWARDER], env)
        deadline = time.monotonic() + 20
        sent = 0
        while sent < count and time.monotonic() < deadline:
            self.assertIsNone(proc.poll(), self.log("forwarder"))
            result = subprocess.run([sys.executable, SEND_STRIPE, str(port), secret, f"evt_1NgoCompat{sent:04d}"],
                                    capture_output=True, text=True, timeout=15)
            if result.returncode == 0:
                sent += 1
            else:
                time.sleep(0.2)  # not listening yet
        self.assertEqual(sent, count, self.log("forwarder"))
        while time.monotonic() < deadline and self.log("forwarder").count("Successfully forwarded") < count:
            time.sleep(0.1)
        text = self.log("forwarder")
        self.assertEqual(text.count("Successfully forwarded"), count, text)
        self.assertNotIn("payflux returned", text)

    # --- the tests ---

    def test_quick_start_node_takes_the_seed_example_and_generated_traffic(self):
        base, sock = self.quick_start_node()
        status, doc = _post(base + SINGLE, SEED_EXAMPLE_BYTES)
        self.assertEqual((status, doc["duplicate"]), (202, False), doc)
        status, doc = _post(base + SINGLE, SEED_EXAMPLE_BYTES)
        self.assertEqual((status, doc["duplicate"]), (202, True), doc)
        self.send_generated(base, seed_shaped_events(10_000))
        self.assertEqual(sync_command_at(sock, "XLEN", "payflux:{0}:events"), 10_001)

    def test_the_seeds_stripe_forwarder_is_accepted(self):
        if not os.path.exists(FORWARDER):
            self.skipTest(f"no Stripe forwarder at {FORWARDER} (../shared/peers)")
        base, sock = self.quick_start_node()
        self.forward_stripe_events(base + SINGLE, "any-key-in-dev-mode", 5)
        entries = sync_command_at(sock, "XRANGE", "payflux:{0}:events", "-", "+")
        self.assertEqual(len(entries), 5)
        data = json.loads(dict(zip(entries[0][1][::2], entries[0][1][1::2]))[b"data"])
        self.assertEqual((data["event_type"], data["event_id"], data["currency"]),
                         ("payment_intent.payment_failed", "evt_1NgoCompat0000", "USD"))
        self.assertNotIn("amount_cents", data)

    def test_a_go_deployments_environment_serves_the_same_traffic_into_events_stream(self):
        binary = find_redis_binaries().get("6.2") or find_redis_binaries().get("7")
        redis = RedisProcess(binary, testcase=self)
        port = free_port()
        env = clean_env(REDIS_ADDR=f"127.0.0.1:{redis.port}", HTTP_ADDR=f"127.0.0.1:{port}",
                        PAYFLUX_API_KEY=GO_KEY, PAYFLUX_LAYOUT="seed")
        proc = self.spawn("go-env-node", [*TWISTD, "-n", "--pidfile=", "payflux", "--metrics-listen", "none"], env)
        base = self.wait_ready(proc, port, "go-env-node")
        status, doc = _post(base + SINGLE, SEED_EXAMPLE_BYTES, key=GO_KEY)
        self.assertEqual(status, 202, doc)
        self.assertEqual(_post(base + SINGLE, SEED_EXAMPLE_BYTES, key="wrong-key-0123456789")[0], 401)
        self.send_generated(base, seed_shaped_events(2_000), key=GO_KEY)
        if os.path.exists(FORWARDER):
            self.forward_stripe_events(base + SINGLE, GO_KEY, 3)
            expected = 2_004
        else:
            expected = 2_001
        self.assertEqual(redis.sync_command("XLEN", "events_stream"), expected)
        entries = redis.sync_command("XRANGE", "events_stream", "-", "+", "COUNT", "1")
        data = json.loads(dict(zip(entries[0][1][::2], entries[0][1][1::2]))[b"data"])
        self.assertEqual(data, {**json.loads(SEED_EXAMPLE_BYTES), "event_timestamp": "2026-01-06T00:00:00.000Z"})
        self.assertEqual(redis.sync_command("EXISTS", "payflux:{0}:events"), 0)
        self.assertNotIn(GO_KEY, self.log("go-env-node"))
