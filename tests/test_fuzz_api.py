"""
Schemathesis fuzzes the HTTP API from the node's own /openapi.json: a real node on a loopback
port, a real redis-server, the ``schemathesis`` CLI in a child process (so this reactor keeps
serving), a fixed seed and a bounded number of examples per operation.

Asserted: no 5xx; every response conforms to the document (status code, content type, headers,
JSON body schema); unauthenticated requests are refused; schema-invalid requests get a 4xx
(``positive_data_acceptance`` is left out on purpose: a schema-valid event may still be refused
with 422 -- event_timestamp too far ahead, a Luhn-valid digit run -- as the document says in
words); and no write for any rejected
request: the stream grows by exactly the number of new (non-duplicate) events the node
acknowledged with a 202, read from the run's HAR report.  The alerts API operations of the same
document are served by the side listener: a second run fuzzes them there (``--url`` the side
port, an admin key), with the same checks.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SynchronousTestCase

from payflux.events import EventValidator, ValidationPolicy
from payflux.ingest.openapi import EVENT_SCHEMA

from tests.support.node import API_SECRET, start_node
from tests.support.redis import redis_test_cases

STREAM = "payflux:{0}:events"
ADMIN_SECRET = "admin-secret-0123456789abcdef"
SEED = 20261125
MAX_EXAMPLES = 200
CHECKS = ",".join([
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
    "ignored_auth",
    "unsupported_method",
    "negative_data_rejection",
    "missing_required_header",
])


def _schemathesis() -> str | None:
    path = os.path.join(os.path.dirname(sys.executable), "schemathesis")
    return path if os.access(path, os.X_OK) else shutil.which("schemathesis")


def _new_events(entries: list) -> int:
    """New (non-duplicate) events the node acknowledged with a 202 in a HAR log."""
    count = 0
    for entry in entries:
        response = entry["response"]
        if response["status"] != 202:
            continue
        doc = json.loads(response["content"]["text"])
        count += doc["accepted"] if "accepted" in doc else (0 if doc["duplicate"] else 1)
    return count


class DocumentedExampleTests(SynchronousTestCase):
    def test_the_documented_example_event_is_valid(self):
        """The examples phase sends it: the fuzz run always has at least one accepted event."""
        EventValidator(ValidationPolicy()).validate(EVENT_SCHEMA["example"])


class FuzzApiMixin:
    timeout = 240  # trial's default is 120 s; schemathesis alone is bounded at 150 s below

    @inlineCallbacks
    def schemathesis(self, binary: str, document: str, secret: str, max_examples: int, select: list[str]):
        """One schemathesis run of ``document``'s operations (``select``: their address and paths)
        with ``secret`` as the bearer key, every phase and CHECKS; fails on a non-zero exit or any
        5xx. Returns (the HAR entries of its requests, their statuses, sorted)."""
        report = tempfile.mkdtemp(prefix="payflux-fuzz-")
        self.addCleanup(shutil.rmtree, report, True)
        har = os.path.join(report, "run.har")
        args = [
            "run", document, *select,
            "--checks", CHECKS,
            "--max-examples", str(max_examples),
            "--seed", str(SEED),
            "--workers", "1",
            "--phases", "examples,coverage,fuzzing",
            "--request-timeout", "5",
            "--header", f"Authorization: Bearer {secret}",
            "--report", "har",
            "--report-har-path", har,
            "--no-color",
            "--suppress-health-check", "all",
        ]
        env = {**os.environ, "SCHEMATHESIS_HOOKS": "", "NO_COLOR": "1"}
        # coreutils timeout bounds the run even if schemathesis misbehaves (exit 124)
        out, err, code = yield getProcessOutputAndValue(
            shutil.which("timeout") or "/usr/bin/timeout", ["150", binary, *args], env=env, reactor=reactor, path=report
        )
        text = (out + err).decode("utf-8", "replace")
        self.assertEqual(code, 0, text[-6000:])
        with open(har, encoding="utf-8") as f:
            entries = json.load(f)["log"]["entries"]
        statuses = sorted({e["response"]["status"] for e in entries})
        self.assertFalse([s for s in statuses if s >= 500], text[-3000:])
        return entries, statuses

    @inlineCallbacks
    def test_schemathesis_finds_no_5xx_no_spec_violation_and_no_write_on_rejection(self):
        binary = _schemathesis()
        if binary is None:
            self.skipTest("schemathesis is not installed (pip install -e '.[test]')")
        redis = self.start_redis()
        # no rate limit: a 429 would be correct but would hide the checks behind it; the processor
        # webhook routes on, so they are fuzzed too (every fuzzed delivery fails its signature)
        node = yield start_node(self, redis.url, rate_limit="0", stripe_webhook_secret="whsec_fuzz_0123456789",
                                adyen_hmac_key="00112233445566778899AABBCCDDEEFF", id_hash_key="fuzz-id-hash-key-0123")
        before = redis.sync_command("XLEN", STREAM)
        entries, statuses = yield self.schemathesis(
            binary, node.base + "/openapi.json", API_SECRET, MAX_EXAMPLES,
            ["--exclude-path-regex", "^/v1/(alerts|risk/)"])  # the side listener's: fuzzed there, below
        self.assertGreater(len(entries), 100)
        new = _new_events(entries)
        self.assertGreater(new, 0)  # at least the documented example event was accepted
        after = redis.sync_command("XLEN", STREAM)
        self.assertEqual(after - before, new)
        print(f"\nschemathesis: {len(entries)} requests, statuses {statuses}, {new} new events appended")

    @inlineCallbacks
    def test_schemathesis_on_the_alerts_api_of_the_side_listener(self):
        """The alerts API (side listener, admin key) from the same document: no 5xx, every answer as
        documented, unauthenticated requests refused, schema-invalid requests a 4xx."""
        binary = _schemathesis()
        if binary is None:
            self.skipTest("schemathesis is not installed (pip install -e '.[test]')")
        redis = self.start_redis()
        node = yield start_node(self, redis.url, admin_keys=f"ops:{ADMIN_SECRET}")
        entries, statuses = yield self.schemathesis(
            binary, node.base + "/openapi.json", ADMIN_SECRET, 100,
            ["--url", node.side, "--include-path-regex", "^/v1/(alerts|risk/)"])
        self.assertGreater(len(entries), 50)
        self.assertTrue({e["request"]["url"].split("?")[0] for e in entries} >= {
            node.side + "/v1/alerts", node.side + "/v1/risk/processors", node.side + "/v1/risk/retry-advice"})
        print(f"\nschemathesis (alerts API): {len(entries)} requests, statuses {statuses}")


redis_test_cases(FuzzApiMixin, globals(), versions=("7",))
