"""The `payflux send` command against a real node."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread

from payflux.cli import sample_event
from tests.support.node import API_SECRET, start_node
from tests.support.process import PAYFLUX, clean_env
from tests.support.redis import redis_test_cases


def _run(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    env = clean_env()
    return subprocess.run([*PAYFLUX, *args], input=stdin, capture_output=True, timeout=60, env=env)


class SendMixin:
    @inlineCallbacks
    def test_send_generated_events_single_and_batched(self):
        redis = self.start_redis()
        node = yield start_node(self, redis.url)
        result = yield deferToThread(_run, "send", "--url", node.base, "--api-key", API_SECRET, "--count", "3",
                                     "--processor", "adyen", "--event-type", "payment_retried")
        self.assertEqual(result.returncode, 0, result.stderr)
        lines = result.stdout.decode().splitlines()
        self.assertEqual(sum(1 for line in lines if line.startswith("202 ")), 3)
        self.assertEqual(lines[-1], "sent 3 requests (3 events): 3x 202")
        result = yield deferToThread(_run, "send", "--url", node.base, "--api-key", API_SECRET, "--count", "5",
                                     "--batch-size", "2", "--quiet")
        self.assertEqual(result.stdout.decode().strip(), "sent 3 requests (5 events): 3x 202")
        entries = redis.sync_command("XRANGE", "payflux:{0}:events", "-", "+")
        self.assertEqual(len(entries), 8)
        first = json.loads(dict(zip(entries[0][1][::2], entries[0][1][1::2]))[b"data"])
        self.assertEqual((first["processor"], first["event_type"]), ("adyen", "payment_retried"))

    @inlineCallbacks
    def test_send_file_and_failures(self):
        redis = self.start_redis()
        node = yield start_node(self, redis.url)
        events = [sample_event(n) for n in range(2)]
        fd, path = tempfile.mkstemp(suffix=".ndjson")
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(json.dumps(e) for e in events))
        self.addCleanup(os.unlink, path)
        result = yield deferToThread(_run, "send", "--url", node.base, "--api-key", API_SECRET, "--file", path,
                                     "--quiet")
        self.assertEqual((result.returncode, result.stdout.decode().strip()), (0, "sent 2 requests (2 events): 2x 202"))
        # a wrong key: exit 1, the 401 is printed
        result = yield deferToThread(_run, "send", "--url", node.base, "--api-key", "wrong-key-0123456789abc")
        self.assertEqual(result.returncode, 1)
        self.assertIn(b"401", result.stdout)
        # a file that isn't NDJSON: one line naming the line, exit 2
        with open(path, "w") as f:
            f.write(json.dumps(events[0]) + "\n{oops\n")
        result = yield deferToThread(_run, "send", "--url", node.base, "--file", path)
        self.assertEqual(result.returncode, 2)
        self.assertIn(b"line 2 is not JSON", result.stderr)
        self.assertNotIn(b"Traceback", result.stderr)
        # nothing listening: one line, exit 1
        result = yield deferToThread(_run, "send", "--url", "http://127.0.0.1:1", "--api-key", API_SECRET)
        self.assertEqual(result.returncode, 1)
        self.assertIn(b"cannot reach", result.stderr)
        self.assertNotIn(b"Traceback", result.stderr)


redis_test_cases(SendMixin, globals(), versions=("6.2",))
