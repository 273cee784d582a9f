"""
A client generated from the node's own /openapi.json works: openapi-python-client (the ``test``
extra) generates a package from a live node's document into a temp dir, in a child process
(so this reactor keeps serving the document), and the test imports it and talks to the node
with it: the generated ``ingest_event`` and ``ingest_batch`` functions (operationIds ingestEvent,
ingestBatch) with its ``AuthenticatedClient``.

Asserted: the 202s parse into the generated SingleAccepted / BatchAccepted models (status
accepted, the stream ids, duplicate), the events are in the Redis stream, and error answers (422
invalid_event, 409 conflict, 401 unauthorized) parse into the generated Error model with its
``error`` as the generated ``ErrorCode`` enum.  The generator's warnings are compared with
:data:`EXPECTED_WARNINGS`: a new one fails the test, to be fixed in the document or recorded
there with its reason.

The generated client is synchronous (httpx): it runs in a thread (``deferToThread``) while the
reactor serves the node.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import sys
import tempfile
import uuid

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue

from payflux.ingest.openapi import EXAMPLE_EVENT

from tests.support.node import API_SECRET, start_node
from tests.support.redis import redis_test_cases

STREAM = "payflux:{0}:events"
PACKAGE = "payflux_generated_client"
# post_hooks: [] skips the default ruff formatting of the output (not needed to import it)
CONFIG = f"post_hooks: []\nproject_name_override: payflux-generated-client\npackage_name_override: {PACKAGE}\n"

#: (operation, warning) the generator still reports for the document, and why each is left.
EXPECTED_WARNINGS = {
    # openapi-python-client knows JSON, form, multipart and octet-stream bodies only; the NDJSON
    # form of the batch body is correct OpenAPI (a text body) and is skipped: the generated
    # ingest_batch sends the JSON-array form, which the node takes the same way.  (Mapping it
    # with content_type_overrides to application/octet-stream makes the generator emit a body
    # union it cannot dispatch: `isinstance(body, list[PaymentExhaustEvent])`, a TypeError.)
    ("POST /v1/events/payment_exhaust/batch", "Unsupported content type application/x-ndjson"),
}

WARNING = re.compile(r"WARNING parsing (\S+ \S+) within \S+?\.\s*\n\s*\n([^\n]+)")


def _generator() -> str | None:
    path = os.path.join(os.path.dirname(sys.executable), "openapi-python-client")
    return path if os.access(path, os.X_OK) else shutil.which("openapi-python-client")


def _event(**fields) -> dict:
    return {**EXAMPLE_EVENT, "event_id": str(uuid.uuid4()), **fields}


def _exchange(base: str) -> dict:
    """Talk to the node with the generated package (blocking: run in a thread)."""
    client_module = importlib.import_module(f"{PACKAGE}.client")
    models = importlib.import_module(f"{PACKAGE}.models")
    ingest_event = importlib.import_module(f"{PACKAGE}.api.ingest.ingest_event")
    ingest_batch = importlib.import_module(f"{PACKAGE}.api.ingest.ingest_batch")
    get_health = importlib.import_module(f"{PACKAGE}.api.operations.get_health")
    event = models.PaymentExhaustEvent.from_dict(_event())
    batch = [models.PaymentExhaustEvent.from_dict(_event(retry_count=n)) for n in (1, 2)]
    out: dict = {"event": event.event_id, "batch": [e.event_id for e in batch]}
    with client_module.AuthenticatedClient(base_url=base, token=API_SECRET, timeout=10.0) as client:
        out["single"] = ingest_event.sync_detailed(client=client, body=event)
        out["again"] = ingest_event.sync(client=client, body=event)  # a duplicate: same id, no append
        out["many"] = ingest_batch.sync_detailed(client=client, body=batch)
        bad = models.PaymentExhaustEvent.from_dict(_event(currency="US"))  # the generator checks no pattern
        out["invalid"] = ingest_event.sync_detailed(client=client, body=bad)
        changed = models.PaymentExhaustEvent.from_dict({**event.to_dict(), "retry_count": 3})
        out["conflict"] = ingest_event.sync_detailed(client=client, body=changed)
        out["health"] = get_health.sync_detailed(client=client)
    with client_module.AuthenticatedClient(base_url=base, token="not-a-key-0123456789") as client:
        stranger = models.PaymentExhaustEvent.from_dict(_event())
        out["unauthorized"] = ingest_event.sync_detailed(client=client, body=stranger)
    out["models"] = models
    return out


class GeneratedClientMixin:
    timeout = 180

    @inlineCallbacks
    def test_a_generated_client_ingests_and_parses_errors(self):
        generator = _generator()
        if generator is None:
            self.skipTest("openapi-python-client is not installed (pip install -e '.[test]')")
        redis = self.start_redis()
        node = yield start_node(self, redis.url)
        work = tempfile.mkdtemp(prefix="payflux-client-")
        self.addCleanup(shutil.rmtree, work, True)
        config = os.path.join(work, "config.yaml")
        with open(config, "w", encoding="utf-8") as f:
            f.write(CONFIG)
        args = ["generate", "--url", node.base + "/openapi.json", "--config", config, "--meta", "none",
                "--output-path", os.path.join(work, PACKAGE)]
        env = {**os.environ, "NO_COLOR": "1", "TERM": "dumb", "COLUMNS": "200"}
        # coreutils timeout bounds the run even if the generator hangs (exit 124)
        out, err, code = yield getProcessOutputAndValue(
            shutil.which("timeout") or "/usr/bin/timeout", ["120", generator, *args], env=env, reactor=reactor,
            path=work)
        text = (out + err).decode("utf-8", "replace")
        self.assertEqual(code, 0, text[-4000:])
        self.assertEqual(set(WARNING.findall(text)), EXPECTED_WARNINGS, text[-4000:])

        sys.path.insert(0, work)
        self.addCleanup(self._forget, work)
        result = yield deferToThread(_exchange, node.base)
        models = result["models"]

        single = result["single"]
        self.assertEqual(single.status_code, 202)
        self.assertIsInstance(single.parsed, models.SingleAccepted)
        self.assertEqual(single.parsed.status, models.SingleAcceptedStatus.ACCEPTED)
        self.assertRegex(single.parsed.id, r"^[0-9]+-[0-9]+$")
        self.assertFalse(single.parsed.duplicate)
        again = result["again"]
        self.assertIsInstance(again, models.SingleAccepted)
        self.assertEqual((again.id, again.duplicate), (single.parsed.id, True))

        many = result["many"]
        self.assertEqual(many.status_code, 202)
        self.assertIsInstance(many.parsed, models.BatchAccepted)
        self.assertEqual((many.parsed.status, many.parsed.count, many.parsed.accepted, many.parsed.duplicates),
                         (models.BatchAcceptedStatus.ACCEPTED, 2, 2, 0))
        self.assertEqual([r.duplicate for r in many.parsed.results], [False, False])

        entries = redis.sync_command("XRANGE", STREAM, "-", "+")
        stored = {entry_id.decode(): json.loads(dict(zip(f[::2], f[1::2]))[b"data"])["event_id"]
                  for entry_id, f in entries}
        self.assertEqual(stored, {single.parsed.id: result["event"],
                                  **{r.id: i for r, i in zip(many.parsed.results, result["batch"])}})

        invalid = result["invalid"]
        self.assertEqual(invalid.status_code, 422)
        self.assertIsInstance(invalid.parsed, models.Error)
        self.assertIs(invalid.parsed.error, models.ErrorCode.INVALID_EVENT)
        self.assertEqual([(d.field, d.code) for d in invalid.parsed.details], [("currency", "format")])
        conflict = result["conflict"]
        self.assertEqual(conflict.status_code, 409)
        self.assertIs(conflict.parsed.error, models.ErrorCode.CONFLICT)
        self.assertEqual([d.event_id for d in conflict.parsed.details], [result["event"]])
        unauthorized = result["unauthorized"]
        self.assertEqual(unauthorized.status_code, 401)
        self.assertIsInstance(unauthorized.parsed, models.Error)
        self.assertIs(unauthorized.parsed.error, models.ErrorCode.UNAUTHORIZED)
        self.assertEqual(unauthorized.parsed.message, "unknown API key")
        self.assertEqual((result["health"].status_code, result["health"].parsed.status), (200, "ok"))
        self.assertEqual(redis.sync_command("XLEN", STREAM), 3)  # nothing of the refused ones

    @staticmethod
    def _forget(work: str) -> None:
        sys.path.remove(work)
        for name in [m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + ".")]:
            del sys.modules[name]


redis_test_cases(GeneratedClientMixin, globals(), versions=("7",))
