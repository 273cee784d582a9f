"""
The risk alerting quick start (docs/risk.md, "Quick start") end to end, with real processes.

``RiskWalkthrough*`` follows the walkthrough: a real node (``start_node``, a real redis-server)
with the consumer table of etc/examples/risk-quickstart.toml, the real ``payflux send`` (the
console script's code, ``python -m payflux.cli``, as a child process) for the baseline and then
the spike on one processor, and checks the three places an operator looks: the alerts stream,
the log line, and ``payflux_risk_active_alerts`` on the side port's /metrics; then it runs the
Quick start's alerts API and risk report commands as the document writes them (``curl`` with the
example's admin key, recording an outcome, ``payflux risk report``: bash, curl and the CLI as child
processes, with the side port and the Redis URL of the test node).

Time is scaled down so it runs in ~13 s instead of ~2 minutes: the example's options get
``warmup_seconds`` 3 instead of 60 and ``window_seconds`` 4 for failure_rate (6 for the two
30 s detectors) instead of 10, and the baseline lasts 7 s and the spike 5 s at 300 events/s
instead of 90 s and 30 s at 200 (so stripe's window still holds well over ``min_events``, which
stays 100). The failure_rate window stays longer than ``open_after_seconds`` (2) plus a second:
a shorter one would let the spike's first seconds leave the window into the baseline before
the alert opens, which the real 10 s window never does. Every other option is the example's,
i.e. the detector defaults.  Detectors run on ``received_at``, the node's wall clock, so the
traffic has to be real time; the pacing itself is unit-tested with a fake clock in
tests/test_cli.py.

``QuickstartDocsTests`` runs the exact ``payflux send`` commands of the Quick start through the
CLI's send function with a fake clock and a fake node (instantly), and checks the example config
is a valid node config that leaves the detector defaults alone.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from payflux.send import _send
from payflux.config import load_settings
from payflux.risk.config import parse_options
from tests.support.consumers import wait_for
from tests.support.node import API_SECRET, start_node
from tests.support.process import PAYFLUX, clean_env
from tests.support.redis import RedisReplyError, redis_test_cases

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "etc", "examples", "risk-quickstart.toml")
DOCS = os.path.join(ROOT, "docs", "risk.md")
SCALED = {
    "failure_rate": {"window_seconds": 4, "warmup_seconds": 3},
    "retry_storm": {"window_seconds": 6, "warmup_seconds": 3},
    "failure_cluster": {"window_seconds": 6, "warmup_seconds": 3},
}
BASELINE = ["--rate", "300", "--duration", "7", "--failure-rate", "0.05", "--processor", "stripe,adyen,checkout",
            "--merchants", "200", "--seed", "1"]
SPIKE = ["--rate", "300", "--duration", "5", "--failure-rate", "0.4", "--processor", "stripe", "--merchants", "200",
         "--seed", "2"]


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float, str)):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(type(v))


def scaled_example() -> str:
    """etc/examples/risk-quickstart.toml with SCALED merged into its consumer's options, as TOML."""
    with open(EXAMPLE, "rb") as f:
        config = tomllib.load(f)
    lines = [f"{k} = {_toml_value(v)}" for k, v in config.items() if k != "consumers"]
    for table in config["consumers"]:
        options = table.setdefault("options", {})
        for detector, values in SCALED.items():
            options[detector] = {**options.get(detector, {}), **values}
        lines += ["[[consumers]]"] + [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def _payflux_send(base: str, argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([*PAYFLUX, "send", "--url", base, "--api-key", API_SECRET, "--quiet", *argv],
                          capture_output=True, timeout=60, env=clean_env())


def quickstart_text() -> str:
    with open(DOCS, encoding="utf-8") as f:
        return f.read().split("## Quick start\n", 1)[1].split("\n## ", 1)[0]


def alerts_api_scripts() -> list[str]:
    """The Quick start's ``sh`` blocks that use the alerts API, as scripts: comment lines dropped."""
    blocks = re.findall(r"```sh\n(.*?)```", quickstart_text(), re.S)
    return ["\n".join(line for line in block.splitlines() if not line.lstrip().startswith("#"))
            for block in blocks if "/v1/alerts" in block]


def _run_documented(script: str, side: str, redis_url: str) -> subprocess.CompletedProcess:
    """``script`` as written, against the test node: its side port, its Redis, this checkout's CLI."""
    script = script.replace("http://127.0.0.1:9464", side).replace(".venv/bin/payflux", f"{sys.executable} -m payflux.cli")
    return subprocess.run(["bash", "-euo", "pipefail", "-c", script], capture_output=True, timeout=60,
                          env=clean_env(PAYFLUX_REDIS_URL=redis_url), cwd=ROOT)


def _fields(entry: list) -> dict:
    values = entry[1]
    return {k.decode(): v.decode() for k, v in zip(values[::2], values[1::2])}


class RiskWalkthroughMixin:
    @defer.inlineCallbacks
    def test_injected_spike_alerts_in_the_stream_the_log_and_metrics(self):
        redis = self.start_redis()
        logged: list[dict] = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        node = yield start_node(self, redis.url, config_text=scaled_example())

        def group_ready() -> bool:  # start_id "$": send once the group exists
            try:
                return any(b"risk" in g for g in redis.sync_command("XINFO", "GROUPS", "payflux:{0}:events"))
            except RedisReplyError:
                return False

        yield defer.ensureDeferred(wait_for(group_ready, 10, "the risk group"))

        baseline = yield deferToThread(_payflux_send, node.base, BASELINE)
        self.assertEqual(baseline.returncode, 0, baseline.stderr)
        self.assertRegex(baseline.stdout.decode(), r"^sent 70 requests \(2100/2100 events, \d\.\d% payment_failed\)")
        self.assertEqual(redis.sync_command("XLEN", "payflux:alerts"), 0)  # 5% everywhere: nothing to see
        spike = yield deferToThread(_payflux_send, node.base, SPIKE)
        self.assertEqual(spike.returncode, 0, spike.stderr)

        def alerts() -> list[dict]:
            return [_fields(e) for e in redis.sync_command("XRANGE", "payflux:alerts", "-", "+")]

        yield defer.ensureDeferred(wait_for(lambda: any(a["action"] == "open" for a in alerts()), 10, "an alert"))
        opened = [a for a in alerts() if a["action"] == "open"]
        # one alert, on the processor that failed: its merchants and geo are explained by it
        self.assertEqual([(a["type"], a["key"]) for a in opened], [("failure_rate_spike", "processor=stripe")])
        record = json.loads(opened[0]["data"])
        self.assertEqual((record["key"], record["type"], record["v"]), ({"processor": "stripe"}, "failure_rate_spike", 1))
        numbers = record["numbers"]
        self.assertGreaterEqual(numbers["lower_bound"], numbers["threshold"])
        self.assertLess(numbers["baseline_rate"], 0.2)  # the baseline's 5%, give or take: not the spike's 40%

        lines = [formatEvent(e) for e in logged if e.get("log_namespace", "").startswith("payflux.risk")]
        self.assertIn(f"risk alert opened: failure_rate_spike processor=stripe ({opened[0]['severity']}) ", "\n".join(lines))

        response = yield node.get("/metrics", side=True)
        text = (yield response.content()).decode()
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for family in text_string_to_metric_families(text) for s in family.samples}
        active = samples[("payflux_risk_active_alerts", (("consumer", "risk"), ("type", "failure_rate_spike")))]
        self.assertGreater(active, 0)
        rate = samples[("payflux_risk_failure_rate", (("consumer", "risk"), ("processor", "stripe")))]
        self.assertGreater(rate, 0.2)

        # the alerts API and the risk report, as the Quick start runs them
        listing, record = alerts_api_scripts()
        self.assertIn("Bearer quickstart-admin-0123456789", listing)  # the example's admin key
        listed = yield deferToThread(_run_documented, listing, node.side, redis.url)
        self.assertEqual(listed.returncode, 0, listed.stderr)
        doc = json.loads(listed.stdout)
        self.assertEqual([(a["alert_id"], a["state"], [t["action"] for t in a["transitions"]][0])
                          for a in doc["alerts"]], [(opened[0]["alert_id"], "open", "opened")])
        self.assertIsNone(doc["next_cursor"])
        recorded = yield deferToThread(_run_documented, record, node.side, redis.url)
        self.assertEqual(recorded.returncode, 0, recorded.stderr)
        out = recorded.stdout.decode()
        outcome, end = json.JSONDecoder().raw_decode(out)  # curl -s: no newline after the body
        lead = outcome["lead_time_seconds"]
        self.assertEqual((outcome["alert_id"], outcome["outcome_type"], outcome["source"]),
                         (opened[0]["alert_id"], "throttle", "manual"))
        self.assertTrue(0 <= lead < 60, lead)  # observed "now", seconds after the alert opened
        report = out[end:].splitlines()
        self.assertTrue(report[0].startswith("risk report: alerts opened since "), report)
        row = next(line for line in report if line.startswith("failure_rate_spike")).split()
        self.assertEqual(row[:5], ["failure_rate_spike", "1", "1", "1", "100%"])
        self.assertEqual(row[-1], "0")
        labels = {"alert_type": "failure_rate_spike", "outcome_type": "throttle"}
        self.assertEqual(node.metrics.registry.get_sample_value("payflux_alert_outcome_lead_time_seconds_count",
                                                                labels), 1)


redis_test_cases(RiskWalkthroughMixin, globals(), versions=("6.2",))


class FakeNode:
    def __init__(self) -> None:
        self.events: list[dict] = []

    def post(self, url: str, body: bytes, content_type: str, api_key: Any, timeout: float) -> tuple[int, str]:
        self.events += [json.loads(line) for line in body.splitlines()]
        return 202, '{"status":"accepted"}'


class QuickstartDocsTests(unittest.TestCase):
    def quickstart(self) -> str:
        return quickstart_text()

    def test_example_config_is_a_risk_node_with_the_detector_defaults(self):
        self.assertIn("etc/examples/risk-quickstart.toml", self.quickstart())
        settings = load_settings({"insecure_dev_mode": True}, env={}, config_path=EXAMPLE)
        self.assertEqual(set(settings.roles), {"ingest", "consumers"})
        [consumer] = settings.consumers
        self.assertEqual((consumer.handler, consumer.start_id), ("risk", "$"))
        self.assertEqual(parse_options(consumer.options).engine, parse_options({}).engine)

    def test_the_documented_send_commands_run(self):
        text = re.sub(r"\\\n\s*", " ", self.quickstart())
        commands = [shlex.split(line)[2:] for line in text.splitlines() if line.startswith(".venv/bin/payflux send ")]
        self.assertEqual(len(commands), 2, commands)
        for argv, (duration, share, processors) in zip(commands, [(90, 0.05, {"stripe", "adyen", "checkout"}),
                                                                  (30, 0.4, {"stripe"})]):
            node, now = FakeNode(), [0.0]

            def sleep(seconds: float) -> None:
                now[0] += seconds

            with contextlib.redirect_stdout(io.StringIO()) as out:
                rc = _send(argv, post=node.post, now=lambda: now[0], sleep=sleep)
            self.assertEqual(rc, 0, argv)
            self.assertEqual(len(node.events), 200 * duration)
            self.assertAlmostEqual(now[0], duration, places=6)
            failed = sum(e["event_type"] == "payment_failed" for e in node.events) / len(node.events)
            self.assertTrue(abs(failed - share) < 0.03, (argv, failed))
            self.assertEqual({e["processor"] for e in node.events}, processors)
            # seed-shaped events: the failures say where they failed, the retry_result agrees with the type
            self.assertEqual({(e["event_type"], e["retry_result"]) for e in node.events},
                             {("payment_failed", "failed"), ("payment_succeeded", "success")})
            self.assertEqual({e.get("failure_origin") for e in node.events}, {"issuer", "processor", None})
            self.assertIn("(target 200): ", out.getvalue().splitlines()[-1])
