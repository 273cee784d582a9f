"""The `payflux send` command against a real node."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import tempfile
import urllib.error
import uuid

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from payflux.cli import main
from payflux.send import FAILURE_CATEGORIES, FAILURE_ORIGINS, _send, sample_event, send_paced
from payflux.events import EventValidator, ValidationPolicy
from payflux.risk.config import parse_options
from tests.support.node import API_SECRET, start_node
from tests.support.process import PAYFLUX, clean_env
from tests.support.redis import redis_test_cases


#: The seed's 15 fields (docs/events.md), every one in a generated event.
SEED_FIELDS = ("event_type", "event_timestamp", "event_id", "merchant_id_hash", "payment_intent_id_hash", "processor",
               "failure_category", "retry_count", "geo_bucket", "amount_bucket", "system_source",
               "payment_method_bucket", "channel", "retry_result", "failure_origin")


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
        self.assertRegex(first["event_timestamp"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
        self.assertEqual((first["payment_method_bucket"], first["retry_result"]), ("credit_card", "failed"))
        self.assertFalse({"occurred_at", "payment_method"} & set(first))

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


class FakeClock:
    """The ``now``/``sleep`` pair of ``payflux send --rate``: sleeping moves time on, instantly."""

    def __init__(self, start: float = 1000.0) -> None:
        self.t = start
        self.slept: list[float] = []

    def now(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        assert seconds > 0, seconds
        self.slept.append(seconds)
        self.t += seconds


class FakeNode:
    """Stands in for ``_post``: records (time, url, events) per request; ``latency`` seconds per
    request on ``clock``; ``status(n)`` answers request n (0-based)."""

    def __init__(self, clock: FakeClock, latency: float = 0.0, status=lambda n: 202) -> None:
        self.clock = clock
        self.latency = latency
        self.status = status
        self.requests: list[tuple[float, str, list[dict]]] = []

    def post(self, url: str, body: bytes, content_type: str, api_key, timeout: float) -> tuple[int, str]:
        events = [json.loads(line) for line in body.splitlines()] if content_type == "application/x-ndjson" \
            else [json.loads(body)]
        self.requests.append((self.clock.now(), url, events))
        self.clock.t += self.latency
        status = self.status(len(self.requests) - 1)
        return status, json.dumps({"status": "accepted"} if status == 202 else {"error": "unavailable"})

    def events(self) -> list[dict]:
        return [e for _, _, batch in self.requests for e in batch]


class SendTrafficTests(unittest.TestCase):
    """`payflux send` traffic options against a fake node and a fake clock: no sockets, no sleeping."""

    def send(self, *argv: str, latency: float = 0.0,
             status=lambda n: 202) -> tuple[int, FakeNode, list[str], list[str]]:
        clock = FakeClock()
        node = FakeNode(clock, latency, status)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = _send(["--url", "http://node.invalid:8080", *argv], post=node.post, now=clock.now, sleep=clock.sleep)
        self.clock = clock
        return rc, node, out.getvalue().splitlines(), err.getvalue().splitlines()

    def test_bad_options_are_one_line_naming_the_option_exit_2(self):
        cases = [
            (["--rate", "0", "--duration", "5"], "--rate must be above 0"),
            (["--rate", "nan", "--duration", "5"], "--rate must be above 0"),
            (["--rate", "fast", "--duration", "5"], "argument --rate: invalid float value"),
            (["--rate", "100", "--duration", "-1"], "--duration must be above 0"),
            (["--rate", "100", "--duration", "100000"], "--duration must be above 0 and at most 86400"),
            (["--rate", "100"], "--rate needs one of --duration or --count"),
            (["--duration", "10"], "--duration needs --rate"),
            (["--rate", "100", "--duration", "10", "--count", "5"], "--count can't be used with --duration"),
            (["--rate", "0.01", "--duration", "1"], "--rate x --duration must be at least one event"),
            (["--failure-rate", "1.5"], "--failure-rate must be a share from 0 to 1"),
            (["--failure-rate", "0.1", "--event-type", "payment_failed"],
             "--event-type can't be used with --failure-rate"),
            (["--merchants", "0"], "--merchants must be from 1"),
            (["--count", "0"], "--count must be from 1"),
            (["--batch-size", "-1"], "--batch-size must be from 0"),
            (["--processor", "stripe,,adyen"], "--processor must be processor names"),
            (["--progress-interval", "0", "--rate", "10", "--count", "5"], "--progress-interval must be above 0"),
            (["--file", "events.ndjson", "--failure-rate", "0.1"], "--failure-rate shapes generated events"),
            (["--file", "events.ndjson", "--rate", "10", "--duration", "1"], "--duration shapes generated events"),
        ]
        for argv, expected in cases:
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                # an unroutable URL: an option wrongly accepted fails fast with "cannot reach" (exit 1)
                rc = main(["send", "--url", "http://127.0.0.1:1", *argv])
            lines = err.getvalue().splitlines()
            self.assertEqual((rc, len(lines)), (2, 1), (argv, err.getvalue()))
            self.assertTrue(lines[0].startswith("payflux send: "), lines)
            self.assertIn(expected, lines[0], argv)
            self.assertEqual(out.getvalue(), "", argv)

    def test_rate_paces_the_requested_count_at_the_requested_rate(self):
        rc, node, out, err = self.send("--rate", "200", "--duration", "3", "--batch-size", "20",
                                       "--failure-rate", "0.05", "--seed", "1", "--progress-interval", "1")
        self.assertEqual((rc, err), (0, []))
        start = 1000.0
        self.assertEqual([len(batch) for _, _, batch in node.requests], [20] * 30)
        self.assertEqual({url for _, url, _ in node.requests},
                         {"http://node.invalid:8080/v1/events/payment_exhaust/batch"})
        # request i goes when its first event is due: start + 20 i / 200 s, never before
        for i, (at, _, _) in enumerate(node.requests):
            self.assertAlmostEqual(at, start + i * 0.1, places=9)
        # and the run lasts exactly --duration: the last batch's share is waited out
        self.assertAlmostEqual(self.clock.t - start, 3.0, places=9)
        self.assertAlmostEqual(sum(self.clock.slept), 3.0, places=9)
        progress = [line for line in out if line.startswith("progress: ")]
        self.assertEqual(len(progress), 2, out)  # at most one per --progress-interval (1 s of 3)
        self.assertRegex(out[-1], r"^sent 30 requests \(600/600 events, \d+\.\d% payment_failed\) in 3\.0 s "
                                  r"= 200\.0 events/s \(target 200\): 30x 202$")

    def test_default_batch_is_a_tenth_of_the_rate(self):
        _, node, _, _ = self.send("--rate", "200", "--count", "100", "--quiet")
        self.assertEqual([len(b) for _, _, b in node.requests], [20] * 5)
        self.assertAlmostEqual(self.clock.t - 1000.0, 0.5, places=9)
        _, node, _, _ = self.send("--rate", "5", "--count", "3", "--quiet")
        self.assertEqual([len(b) for _, _, b in node.requests], [1, 1, 1])
        self.assertAlmostEqual(self.clock.t - 1000.0, 0.6, places=9)

    def test_a_partial_last_batch_still_gets_only_its_share_of_time(self):
        calls = []
        clock = FakeClock(0.0)
        elapsed = send_paced([[1] * 20, [1] * 20, [1] * 5], lambda b: calls.append((clock.now(), len(b))), 200.0,
                             clock.now, clock.sleep)
        self.assertEqual([(round(t, 9), n) for t, n in calls], [(0.0, 20), (0.1, 20), (0.2, 5)])
        self.assertAlmostEqual(elapsed, 0.225, places=9)

    def test_a_slower_node_makes_the_run_longer_never_a_burst(self):
        # 0.25 s per request when one is due every 0.1 s: one request at a time, back to back
        rc, node, out, _ = self.send("--rate", "200", "--duration", "1", "--batch-size", "20", "--quiet",
                                     latency=0.25)
        self.assertEqual(rc, 0)
        times = [at for at, _, _ in node.requests]
        self.assertEqual(len(node.events()), 200)
        self.assertEqual(self.clock.slept, [])
        for a, b in zip(times, times[1:]):
            self.assertAlmostEqual(b - a, 0.25, places=9)
        self.assertEqual(out, ["sent 10 requests (200/200 events, 100.0% payment_failed) in 2.5 s = 80.0 events/s "
                               "(target 200): 10x 202"])

    def test_failure_share_merchants_and_processors_of_a_seeded_run(self):
        argv = ("--count", "20000", "--batch-size", "1000", "--failure-rate", "0.05", "--merchants", "7",
                "--processor", "stripe,adyen,checkout", "--seed", "3", "--quiet")
        rc, node, out, _ = self.send(*argv)
        self.assertEqual((rc, out), (0, ["sent 20 requests (20000 events): 20x 202"]))
        events = node.events()
        failed = [e for e in events if e["event_type"] == "payment_failed"]
        succeeded = [e for e in events if e["event_type"] == "payment_succeeded"]
        self.assertEqual(len(failed) + len(succeeded), 20000)
        share = len(failed) / 20000
        self.assertTrue(abs(share - 0.05) <= 0.006, share)  # 4 standard deviations
        # the event types the risk consumer counts by default, failures spread over the categories
        engine = parse_options({}).engine
        self.assertIn("payment_failed", engine.failure_event_types)
        self.assertIn("payment_succeeded", engine.success_event_types)
        codes = dict(FAILURE_CATEGORIES)
        self.assertEqual({e["failure_category"] for e in failed}, set(codes))
        self.assertTrue(all(e["failure_code"] == codes[e["failure_category"]] for e in failed))
        self.assertTrue(all(e["failure_origin"] == FAILURE_ORIGINS[e["failure_category"]] for e in failed))
        self.assertEqual({e["retry_result"] for e in failed}, {"failed"})
        self.assertEqual({e["retry_result"] for e in succeeded}, {"success"})
        self.assertFalse([e for e in succeeded if {"failure_category", "failure_code", "failure_origin"} & set(e)])
        # seed-shaped: every field of the seed's schema (a success has no failure fields), UUID event ids
        for e in failed[:10] + succeeded[:10]:
            missing = set(SEED_FIELDS) - set(e)
            failure_fields = {"failure_category", "failure_origin"}
            self.assertEqual(missing, set() if e["event_type"] == "payment_failed" else failure_fields)
            self.assertEqual(str(uuid.UUID(e["event_id"])), e["event_id"])
            self.assertNotIn("occurred_at", e)
            self.assertNotIn("payment_method", e)
        self.assertEqual(len({e["merchant_id_hash"] for e in events}), 7)
        self.assertEqual([e["processor"] for e in events[:4]], ["stripe", "adyen", "checkout", "stripe"])
        self.assertEqual(EventValidator(ValidationPolicy()).validate_batch(events[:1000])[1], [])
        # the seed repeats the traffic, not the event ids
        _, again, _, _ = self.send(*argv)
        self.assertEqual([e["event_type"] for e in again.events()], [e["event_type"] for e in events])
        self.assertFalse({e["event_id"] for e in again.events()} & {e["event_id"] for e in events})

    def test_one_failure_category_for_a_cluster(self):
        _, node, _, _ = self.send("--count", "400", "--batch-size", "100", "--failure-rate", "0.5",
                                  "--failure-category", "timeout", "--seed", "1", "--quiet")
        failed = [e for e in node.events() if e["event_type"] == "payment_failed"]
        self.assertTrue(failed)
        self.assertEqual({(e["failure_category"], e["failure_code"], e["failure_origin"]) for e in failed},
                         {("timeout", "processor_timeout", "processor")})

    def test_generated_events_of_one_type(self):
        _, node, _, _ = self.send("--count", "3", "--event-type", "payment_succeeded", "--quiet")
        self.assertEqual({(e["event_type"], e["retry_result"]) for e in node.events()},
                         {("payment_succeeded", "success")})
        self.assertFalse([e for e in node.events() if {"failure_category", "failure_code", "failure_origin"} & set(e)])
        _, node, _, _ = self.send("--count", "3", "--event-type", "payment_retried", "--failure-category",
                                  "do_not_honor", "--quiet")
        self.assertEqual({(e["event_type"], e["failure_category"], e["failure_origin"], e["retry_result"])
                          for e in node.events()}, {("payment_retried", "do_not_honor", "issuer", "failed")})

    def test_any_non_2xx_exits_1_and_each_error_is_printed_once(self):
        rc, node, out, err = self.send("--rate", "100", "--count", "50", "--batch-size", "10",
                                       status=lambda n: 503 if n in (1, 2) else 202)
        self.assertEqual((rc, len(node.requests)), (1, 5))
        self.assertEqual(err, ['payflux send: 503 {"error": "unavailable"}'])
        self.assertTrue(out[-1].endswith(": 3x 202, 2x 503"), out)

    def test_unreachable_node_stops_the_run(self):
        def refuse(*args):
            raise urllib.error.URLError("connection refused")

        out, err = io.StringIO(), io.StringIO()
        clock = FakeClock()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = _send(["--url", "http://node.invalid:8080", "--rate", "100", "--count", "50"], post=refuse,
                       now=clock.now, sleep=clock.sleep)
        self.assertEqual(rc, 1)
        self.assertEqual(err.getvalue(), "payflux send: cannot reach http://node.invalid:8080: connection refused\n")

    def test_interrupt_prints_what_was_sent(self):
        clock = FakeClock()
        node = FakeNode(clock)

        def post(*args):
            if len(node.requests) == 2:
                raise KeyboardInterrupt
            return node.post(*args)

        out = io.StringIO()
        with contextlib.redirect_stdout(out), self.assertRaises(KeyboardInterrupt):
            _send(["--url", "http://node.invalid:8080", "--rate", "100", "--count", "50", "--batch-size", "10"],
                  post=post, now=clock.now, sleep=clock.sleep)
        self.assertTrue(out.getvalue().startswith("interrupted: 2 requests (20/50 events"), out.getvalue())


class SendUrlTests(unittest.TestCase):
    """`payflux send --url` takes a full URL or the short host:port forms."""

    def test_short_forms_are_http(self):
        for given, base in (("127.0.0.1:28080", "http://127.0.0.1:28080"), (":28080", "http://127.0.0.1:28080"),
                            ("node-1:8080/payflux/", "http://node-1:8080/payflux"),
                            ("https://node-1:8443", "https://node-1:8443"), ("node-1", "http://node-1")):
            clock = FakeClock()
            node = FakeNode(clock)
            with contextlib.redirect_stdout(io.StringIO()):
                rc = _send(["--url", given, "--count", "1"], post=node.post, now=clock.now, sleep=clock.sleep)
            self.assertEqual((rc, [url for _, url, _ in node.requests]), (0, [f"{base}/v1/events/payment_exhaust"]),
                             given)

    def test_bad_urls_are_one_line_exit_2(self):
        for given, expected in (("ftp://node-1", "only http:// and https://"), ("node-1:99999", "expected http://"),
                                ("node-1:http", "expected http://"), ("", "expected http://")):
            err = io.StringIO()
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
                rc = main(["send", "--url", given])
            self.assertEqual((rc, err.getvalue().count("\n")), (2, 1), (given, err.getvalue()))
            self.assertIn(expected, err.getvalue())
            self.assertNotIn("unknown url type", err.getvalue())


class TopLevelTests(unittest.TestCase):
    """`payflux --help`, `--version`, unknown commands; the `make run` hint."""

    def test_help_lists_every_command_with_a_line(self):
        from payflux.cli import COMMANDS

        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            self.assertEqual(main(["--help"]), 0)
        text = out.getvalue()
        commands = text.split("commands:\n", 1)[1].split("\n\n", 1)[0].splitlines()
        described = {line.split()[0]: line.split(None, 1)[1] for line in commands}
        self.assertEqual(set(described), set(COMMANDS))
        for line in commands:
            self.assertGreater(len(line.split()), 3, line)  # a name (and action) and a description
        for action in ("stream info", "group list", "group delete", "dlq list", "dlq replay", "dlq purge"):
            self.assertIn(f"  {action} ", text)
        self.assertIn("--version", text)

    def test_version_unknown_command_and_no_command(self):
        from importlib.metadata import version

        result = subprocess.run([*PAYFLUX, "--version"], capture_output=True, text=True, timeout=30, env=clean_env())
        self.assertEqual((result.returncode, result.stdout, result.stderr), (0, f"payflux {version('payflux')}\n", ""))
        for argv, line in ((["bogus"], "payflux: unknown command 'bogus' (see payflux --help)\n"),
                           (["--frob"], "payflux: unknown option '--frob' (see payflux --help)\n")):
            result = subprocess.run([*PAYFLUX, *argv], capture_output=True, text=True, timeout=30, env=clean_env())
            self.assertEqual((result.returncode, result.stdout, result.stderr), (2, "", line))
        result = subprocess.run(PAYFLUX, capture_output=True, text=True, timeout=30, env=clean_env())
        self.assertEqual(result.returncode, 2)
        self.assertIn("commands:", result.stderr)

    def test_make_run_prints_the_real_listen_address(self):
        import shutil

        if shutil.which("make") is None:
            raise unittest.SkipTest("make not installed")
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        for listen, url in (("tcp:8080", "localhost:8080"), ("tcp:28080", "localhost:28080"),
                            ("tcp:28080:interface=127.0.0.1", "127.0.0.1:28080"),
                            ("ssl:8443:privateKey=k.pem:certKey=c.pem", "-k https://localhost:8443"),
                            ("unix:/tmp/payflux.sock", "--unix-socket /tmp/payflux.sock http://localhost")):
            result = subprocess.run(["make", "-s", "-n", "run", f"LISTEN={listen}"], cwd=root, capture_output=True,
                                    text=True, timeout=30)
            [curl] = [line for line in result.stdout.splitlines() if "curl" in line]
            self.assertIn(f"curl -i -X POST {url}/v1/events/payment_exhaust ", curl, listen)
