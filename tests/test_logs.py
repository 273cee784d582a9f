"""Log lines: JSON objects with the structured fields, the node's observer (format, level, summaries)."""

from __future__ import annotations

import io
import json
import sys

from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from payflux.observability import logs
from payflux.observability.logs import build_observer, json_observer_for


class JsonLogTests(SynchronousTestCase):
    def test_one_object_per_line_with_fields(self):
        out = io.StringIO()
        log = Logger(namespace="payflux.test", observer=json_observer_for(out))
        log.info("appended {count} events", count=3, key_id="producer-a")
        log.warn("redis {state}", state="down\nnext line")
        lines = out.getvalue().splitlines()
        self.assertEqual(len(lines), 2)
        first, second = (json.loads(line) for line in lines)
        self.assertEqual(first["message"], "appended 3 events")
        self.assertEqual((first["level"], first["namespace"]), ("info", "payflux.test"))
        self.assertEqual((first["count"], first["key_id"]), (3, "producer-a"))
        self.assertTrue(first["time"].endswith("+00:00"))
        self.assertEqual(second["level"], "warn")

    def test_failures_carry_the_traceback(self):
        out = io.StringIO()
        log = Logger(namespace="payflux.test", observer=json_observer_for(out))
        try:
            1 / 0
        except ZeroDivisionError:
            log.failure("step failed", level=LogLevel.error)
        doc = json.loads(out.getvalue())
        self.assertEqual(doc["level"], "error")
        self.assertIn("ZeroDivisionError", doc["failure"])


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _event(fmt: str, level=LogLevel.info, namespace: str = "payflux.test", **fields) -> dict:
    return {"log_format": fmt, "log_level": level, "log_namespace": namespace, "log_time": 0.0, **fields}


class NodeObserverTests(SynchronousTestCase):
    """build_observer: the format, the level, Twisted's chatter below info, repeats summarised."""

    def test_auto_is_json_unless_the_stream_is_a_terminal(self):
        from payflux.observability.logs import resolve_format

        self.assertEqual(resolve_format("auto", io.StringIO()), "json")
        self.assertEqual(resolve_format("auto", _Terminal()), "text")
        self.assertEqual(resolve_format("text", io.StringIO()), "text")
        self.assertEqual(resolve_format("json", _Terminal()), "json")
        out = _Terminal()
        build_observer("auto", out)(_event("hello {who}", who="you"))
        self.assertIn("[payflux.test#info] hello you", out.getvalue())

    def test_level_filter_and_twisted_chatter(self):
        out = io.StringIO()
        observe = build_observer("json", out, "info")
        observe(_event("sample failed: {reason}", LogLevel.debug, reason="x"))
        observe(_event("Starting factory {factory!r}", factory=object(), namespace="twisted.web.server.Site"))
        observe(_event("Stopping factory {factory!r}", factory=object(), namespace="twisted.web.server.Site"))
        observe(_event("{log_text}", log_text="(TCP Port 8080 Closed)", namespace="log_legacy"))
        observe(_event("reactor class: {reactor}.", reactor="x"))
        observe(_event("using Redis at {redis}", redis="unix:///x"))
        observe(_event("Redis down", LogLevel.warn))
        messages = [json.loads(line)["message"] for line in out.getvalue().splitlines()]
        self.assertEqual(messages, ["using Redis at unix:///x", "Redis down"])

        out = io.StringIO()
        observe = build_observer("text", out, "warn")
        observe(_event("using Redis at {redis}", redis="unix:///x"))
        observe(_event("Redis down", LogLevel.warn))
        observe(_event("bug", LogLevel.critical))
        self.assertEqual([line.split("] ", 1)[1] for line in out.getvalue().splitlines()], ["Redis down", "bug"])

        out = io.StringIO()
        observe = build_observer("text", out, "debug")
        observe(_event("Starting factory {factory}", factory="f"))
        observe(_event("sample failed", LogLevel.debug))
        self.assertEqual(len(out.getvalue().splitlines()), 2)

    def test_twisted_reconnect_lines_are_summarised(self):
        clock = Clock()
        out = io.StringIO()
        observe = build_observer("json", out, "info", interval=10, clock=clock)
        for attempt in range(1, 101):  # 8 pooled connections retrying: dozens of lines a second
            observe(_event("Scheduling retry {attempt} to connect {endpoint} in {delay} seconds.", attempt=attempt,
                           endpoint="<HostnameEndpoint 127.0.0.1:6390>", delay=0.5,
                           namespace="twisted.application.internet.ClientService"))
            clock.advance(0.05)
        observe(_event("draining", LogLevel.info))
        docs = [json.loads(line) for line in out.getvalue().splitlines()]
        self.assertEqual([d["message"] for d in docs],
                         ["Scheduling retry 1 to connect <HostnameEndpoint 127.0.0.1:6390> in 0.5 seconds.", "draining"])
        clock.advance(10.001 - clock.seconds())  # 10 s after the first line
        observe(_event("Scheduling retry {attempt} to connect {endpoint} in {delay} seconds.", attempt=101,
                       endpoint="e", delay=1, namespace="twisted.application.internet.ClientService"))
        summary = json.loads(out.getvalue().splitlines()[-1])
        self.assertEqual(summary["message"], "100 more like this in the last 10s: Scheduling retry 101 to connect e "
                                             "in 1 seconds.")
        self.assertEqual((summary["repeated"], summary["summary_of"], summary["level"]), (100, "connect retry", "info"))

    def test_script_reloads_after_a_redis_restart_are_summarised(self):
        from payflux.redis.scripts import LOAD_LINE

        clock = Clock()
        out = io.StringIO()
        observe = build_observer("json", out, "info", interval=10, clock=clock)
        for _ in range(8):  # every pooled connection's first append after the restart
            observe(_event(LOAD_LINE, name="append", sha="abc", namespace="payflux.redis.scripts"))
        clock.advance(10)
        observe(_event(LOAD_LINE, name="append", sha="abc", namespace="payflux.redis.scripts"))
        docs = [json.loads(line) for line in out.getvalue().splitlines()]
        self.assertEqual([d["message"] for d in docs], ["loading the append script abc into redis",
                                                        "8 more like this in the last 10s: loading the append "
                                                        "script abc into redis"])
        self.assertEqual(docs[1]["summary_of"], "script reload")

    def test_json_observer_factory_takes_the_configured_level(self):
        self.addCleanup(logs.configure, level="info")
        logs.configure(level="error")
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        observe = logs.json_observer()
        observe(_event("Redis down", LogLevel.warn))
        observe(_event("bug", LogLevel.error))
        self.assertEqual([json.loads(line)["message"] for line in out.getvalue().splitlines()], ["bug"])
        with self.assertRaises(ValueError):
            logs.configure(level="loud")


class TwistdLoggingTests(SynchronousTestCase):
    """tap.makeService under twistd: the observer the settings ask for, unless --logger/--syslog say otherwise."""

    def settings(self, **cli):
        from payflux.config import load_settings

        return load_settings({"insecure_dev_mode": True, **cli}, env={})

    def test_destination_rules(self):
        from payflux.tap import _log_observer

        twistd = {"nodaemon": True, "logfile": None, "logger": None, "syslog": False}
        observer, fmt = _log_observer(self.settings(log_format="json"), twistd)
        self.assertIsNotNone(observer)
        self.assertEqual(fmt, "json")
        self.assertEqual(_log_observer(self.settings(log_format="text"), dict(twistd, logfile="-"))[1], "text")
        # an explicit --logger or --syslog wins: twistd's observer, workers told the format
        self.assertEqual(_log_observer(self.settings(log_format="text"), dict(twistd, logger=logs.json_observer)),
                         (None, "json"))
        self.assertEqual(_log_observer(self.settings(), dict(twistd, syslog=True)), (None, "text"))
        # --logfile: the file, which is no terminal (auto = JSON)
        path = self.mktemp()
        observer, fmt = _log_observer(self.settings(), dict(twistd, logfile=path))
        self.assertEqual(fmt, "json")
        observer(_event("to the file"))
        with open(path) as f:
            self.assertEqual(json.loads(f.read())["message"], "to the file")

    def test_logging_root_registers_the_observer_on_twistds_application(self):
        from twisted.application.service import Application, IServiceCollection, MultiService
        from twisted.logger import ILogObserver

        from payflux.tap import LoggingRoot

        node = MultiService()
        observer = build_observer("json", io.StringIO())
        application = Application("payflux")
        root = LoggingRoot(node, observer, Clock())
        root.setServiceParent(application)
        self.assertIs(application.getComponent(ILogObserver), observer)
        self.assertEqual(list(IServiceCollection(application)), [root])
        self.assertIs(node.parent, root)


class HandlerErrorLogTests(SynchronousTestCase):
    def test_a_failing_handler_logs_one_line_with_class_and_message(self):
        from twisted.logger import globalLogPublisher

        from payflux.consumers.handlers import run_handler

        class Exploding:
            def handle(self, entries):
                raise KeyError("amount missing")

        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        fields = ["v", "1", "event_id", "e-1", "type", "payment_intent.payment_failed", "received_at", "1",
                  "data", "{}"]
        outcome = self.successResultOf(run_handler(Exploding(), [("1-0", 0, fields, 1)]))
        self.assertEqual(outcome.done, [])
        self.flushLoggedErrors(KeyError)
        mine = [e for e in events if e.get("log_namespace") == "payflux.consumers.handlers"]
        shown = [e for e in mine if e["log_level"] != LogLevel.debug]
        self.assertEqual([formatEvent(e) for e in shown],
                         ["handler failed a batch of 1 entries: KeyError: 'amount missing'"])
        self.assertNotIn("log_failure", shown[0])
        # the traceback is there, at debug only
        self.assertTrue([e for e in mine if e["log_level"] == LogLevel.debug and "log_failure" in e])
