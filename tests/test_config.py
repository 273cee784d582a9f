"""Settings: precedence, validation, and the one-line errors operators see."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from tests.support.process import TWISTD, clean_env

from payflux.config import OPTIONS, ConfigError, load_settings

KEYS = "a:0123456789abcdef0123"


def _file(testcase, text: str, suffix: str = ".toml") -> str:
    fd, path = tempfile.mkstemp(suffix=suffix)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    testcase.addCleanup(os.unlink, path)
    return path


class PrecedenceTests(SynchronousTestCase):
    def test_defaults(self):
        s = load_settings({"api_keys": KEYS}, env={})
        self.assertEqual(s.listen, "tcp:8080")
        self.assertEqual(s.partitions, 1)
        self.assertIsNone(s.redis_url)
        self.assertEqual([k.key_id for k in s.api_keys], ["a"])

    def test_file_then_env_then_cli(self):
        path = _file(self, 'partitions = 2\nmax_batch_events = 10\nlisten = "tcp:9000"\napi_keys = ["f:fileeeeeeeeeeeeeeeeee"]\n')
        env = {"PAYFLUX_PARTITIONS": "3", "PAYFLUX_MAX_BATCH_EVENTS": "20"}
        s = load_settings({"max_batch_events": "30"}, env=env, config_path=path)
        self.assertEqual(s.listen, "tcp:9000")  # file
        self.assertEqual(s.partitions, 3)  # env beats file
        self.assertEqual(s.max_batch_events, 30)  # cli beats env
        self.assertEqual([k.key_id for k in s.api_keys], ["f"])

    def test_config_path_from_env_and_payflux_table(self):
        path = _file(self, "[payflux]\npartitions = 4\ninsecure_dev_mode = true\n")
        s = load_settings({}, env={"PAYFLUX_CONFIG": path})
        self.assertEqual(s.partitions, 4)
        self.assertTrue(s.insecure_dev_mode)

    def test_api_keys_file_and_rotation(self):
        path = _file(self, "# producers\nold:oldsecret-0123456789\nnew:newsecret-0123456789\n", ".keys")
        s = load_settings({"api_keys_file": path, "revoked_keys": "old"}, env={})
        self.assertEqual([k.key_id for k in s.api_keys], ["old", "new"])
        self.assertEqual(s.revoked_keys, ("old",))

    def test_secrets_not_in_repr(self):
        s = load_settings({"api_keys": KEYS, "redis_url": "redis://:hunter2-pass@h:6380/0"}, env={})
        self.assertNotIn("0123456789abcdef0123", repr(s))
        self.assertNotIn("hunter2", repr(s))

    def test_every_option_has_help_and_parses_its_default(self):
        for option in OPTIONS:
            self.assertTrue(option.help, option.name)
            if option.default is not None:
                self.assertEqual(option.parse(option.default), option.default, option.name)


class DocumentationTests(SynchronousTestCase):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def read(self, name: str) -> str:
        with open(os.path.join(self.root, name), encoding="utf-8") as f:
            return f.read()

    def test_every_option_is_in_the_readme_table_and_example_file(self):
        readme = self.read("README.md")
        example = self.read("etc/payflux.toml")
        for option in OPTIONS:
            self.assertIn(f"| `{option.name}` |", readme, option.name)
            self.assertRegex(example, rf"(?m)^#? ?{option.name} = ", option.name)

    def test_example_file_loads_with_the_defaults(self):
        path = os.path.join(self.root, "etc", "payflux.toml")
        self.assertEqual(
            load_settings({"api_keys": KEYS}, env={}, config_path=path),
            load_settings({"api_keys": KEYS}, env={}),
        )


class ErrorTests(SynchronousTestCase):
    def assertConfigError(self, option, cli=None, env=None, path=None, contains=""):
        with self.assertRaises(ConfigError) as cm:
            load_settings({"api_keys": KEYS, **(cli or {})}, env=env or {}, config_path=path)
        self.assertEqual(cm.exception.option, option)
        text = str(cm.exception)
        self.assertIn("--" + option.replace("_", "-"), text)
        self.assertIn("PAYFLUX_" + option.upper(), text)
        self.assertIn(contains, text)
        self.assertNotIn("\n", text)
        return text

    def test_bad_values_name_the_option_and_accepted_values(self):
        self.assertConfigError("partitions", {"partitions": "0"}, contains="from 1 to 1024")
        self.assertConfigError("partitions", env={"PAYFLUX_PARTITIONS": "two"}, contains="integer")
        self.assertConfigError("redis_timeout", {"redis_timeout": "fast"}, contains="number")
        self.assertConfigError("listen", {"listen": "bogus:1"}, contains="endpoint")
        self.assertConfigError("roles", {"roles": "ingest,dance"}, contains="accepted: ingest")
        self.assertConfigError("allow_unknown_fields", {"allow_unknown_fields": "maybe"}, contains="true or false")
        self.assertConfigError("unknown_fields", {"unknown_fields": "ignore"}, contains="drop, reject")
        self.assertConfigError("layout", {"layout": "go"}, contains="payflux, seed")
        self.assertConfigError("partitions", {"layout": "seed", "partitions": "4"}, contains="partitions = 1")
        self.assertConfigError("layout", {"layout": "seed", "redis_url": "redis+cluster://127.0.0.1:7000"},
                               contains="single Redis or Sentinel")

    def test_unknown_fields_and_its_deprecated_spelling(self):
        def policy(**cli):
            return load_settings({"api_keys": KEYS, **cli}, env={}).unknown_fields

        self.assertEqual(policy(), "drop")
        self.assertEqual(policy(allow_unknown_fields="false"), "reject")
        self.assertEqual(policy(allow_unknown_fields="true"), "drop")
        self.assertEqual(policy(allow_unknown_fields="false", unknown_fields="drop"), "drop")
        self.assertEqual(policy(unknown_fields="REJECT"), "reject")
        self.assertConfigError("stream_prefix", {"stream_prefix": "a{b}"}, contains="braces")

    def test_toml_types_are_checked(self):
        path = _file(self, "partitions = 1.5\n")
        self.assertConfigError("partitions", path=path, contains="integer")
        path = _file(self, "partitions = true\n")
        self.assertConfigError("partitions", path=path)

    def test_redis_url_error_does_not_echo_password(self):
        text = self.assertConfigError("redis_url", {"redis_url": "http://:sekrit@host/"})
        self.assertNotIn("sekrit", text)

    def test_unknown_key_in_file(self):
        path = _file(self, "partitons = 2\n")
        with self.assertRaises(ConfigError) as cm:
            load_settings({"api_keys": KEYS}, env={}, config_path=path)
        self.assertIn("partitons", str(cm.exception))

    def test_unreadable_and_invalid_files(self):
        with self.assertRaises(ConfigError):
            load_settings({}, env={}, config_path="/nonexistent/payflux.toml")
        path = _file(self, "partitions = [\n")
        with self.assertRaises(ConfigError) as cm:
            load_settings({}, env={}, config_path=path)
        self.assertIn("not valid TOML", str(cm.exception))

    def test_no_keys_without_dev_mode_is_an_error(self):
        with self.assertRaises(ConfigError) as cm:
            load_settings({}, env={})
        self.assertIn("--insecure-dev-mode", str(cm.exception))
        load_settings({"insecure_dev_mode": True}, env={})

    def test_bad_key_entries(self):
        for keys, contains in [("nocolon", "id:secret"), ("a:short", "16"), ("a b:0123456789abcdef", "key id"),
                               (f"{KEYS},{KEYS}", "twice")]:
            with self.assertRaises(ConfigError) as cm:
                load_settings({"api_keys": keys}, env={})
            self.assertIn(contains, str(cm.exception))
            self.assertNotIn("0123456789abcdef", str(cm.exception).replace("0123456789abcdef0123", ""))


def _run(*args, env=None):
    return subprocess.run(args, capture_output=True, text=True, timeout=60, env=clean_env(**(env or {})))


class CommandLineTests(SynchronousTestCase):
    def test_twistd_help_lists_every_option(self):
        result = _run(*TWISTD, "payflux", "--help")
        self.assertEqual(result.returncode, 0, result.stderr)
        for option in OPTIONS:
            self.assertIn("--" + option.name.replace("_", "-"), result.stdout)

    def test_twistd_invalid_option_exits_nonzero_with_one_line(self):
        result = _run(*TWISTD, "payflux", "--partitions", "0", "--insecure-dev-mode")
        self.assertEqual(result.returncode, 2)
        self.assertEqual(result.stderr.strip().count("\n"), 0, result.stderr)
        self.assertIn("--partitions", result.stderr)
        self.assertNotIn("Traceback", result.stderr + result.stdout)

    def test_twistd_unloadable_handler_is_one_line(self):
        path = _file(self, 'roles = ["consumers"]\n[[consumers]]\nname = "a"\ngroup = "g"\nhandler = "nope.mod:X"\n')
        result = _run(*TWISTD, "-n", "--pidfile=", "payflux", "--config", path)
        self.assertEqual(result.returncode, 2)
        self.assertIn("invalid [[consumers]] 'a'", result.stderr)
        self.assertIn("cannot import nope.mod", result.stderr)
        self.assertEqual(result.stderr.strip().count("\n"), 0, result.stderr)
        self.assertNotIn("Traceback", result.stderr + result.stdout)

    def test_handlers_are_built_by_make_service_not_by_option_parsing(self):
        import io

        from twisted.internet import reactor

        from payflux.tap import Options, makeService
        from tests.support import handlers

        table = '[[consumers]]\nname = "{name}"\ngroup = "g"\nhandler = "{handler}"\n'
        good = table.format(name="rec", handler="tests.support.handlers:RecordingHandler")
        good += 'options = { key = "built-by-make-service" }\n'
        path = _file(self, 'roles = ["consumers"]\n' + good)
        options = Options()
        options.parseOptions(["--config", path, "--redis-url", "redis://127.0.0.1:1"])
        self.assertNotIn("built-by-make-service", handlers.SEEN)  # parsing built nothing
        node = makeService(options, reactor)
        self.assertIn("built-by-make-service", handlers.SEEN)
        [consumer] = [s for s in node if getattr(s, "name", "") == "consumer:rec"]
        self.assertIsInstance(consumer.handler, handlers.RecordingHandler)
        # one that can't be built: parsing still passes, makeService is the one line and exit 2
        path = _file(self, 'roles = ["consumers"]\n' + good + table.format(name="bad", handler="nope.mod:X"))
        options = Options()
        options.parseOptions(["--config", path, "--redis-url", "redis://127.0.0.1:1"])
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        with self.assertRaises(SystemExit) as caught:
            makeService(options, reactor)
        self.assertEqual(caught.exception.code, 2)
        self.assertEqual(stderr.getvalue(), "payflux: invalid [[consumers]] 'bad': handler 'nope.mod:X': cannot "
                                            "import nope.mod: ModuleNotFoundError: No module named 'nope'\n")

    def test_check_config(self):
        result = _run(sys.executable, "-m", "payflux.cli", "check-config", "--api-keys", KEYS)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("configuration OK", result.stdout)
        self.assertIn("ids: a", result.stdout)
        self.assertNotIn("0123456789abcdef0123", result.stdout)
        result = _run(sys.executable, "-m", "payflux.cli", "check-config", env={"PAYFLUX_RATE_LIMIT": "-1",
                                                                                  "PAYFLUX_API_KEYS": KEYS})
        self.assertEqual(result.returncode, 2)
        self.assertIn("PAYFLUX_RATE_LIMIT", result.stderr)
        self.assertNotIn("Traceback", result.stderr)


class ConsumerConfigTests(SynchronousTestCase):
    def load(self, text: str, **cli):
        return load_settings({"api_keys": KEYS, **cli}, env={}, config_path=_file(self, text))

    def test_consumer_tables(self):
        s = self.load(
            'roles = ["ingest", "consumers"]\n'
            '[[consumers]]\nname = "audit"\ngroup = "audit"\nhandler = "log"\n'
            '[[consumers]]\nname = "risk"\ngroup = "risk"\nhandler = "noop"\nbatch_size = 500\nstart_id = "$"\n'
            'options = {threshold = 3}\n'
        )
        self.assertEqual([c.name for c in s.consumers], ["audit", "risk"])
        self.assertEqual((s.consumers[1].batch_size, s.consumers[1].start_id), (500, "$"))
        self.assertEqual(s.consumers[1].options, {"threshold": 3})
        self.assertEqual(s.consumers[0].max_deliveries, 5)

    def test_consumer_only_node_needs_no_api_keys(self):
        path = _file(self, '[[consumers]]\nname = "a"\ngroup = "g"\nhandler = "log"\n')
        s = load_settings({"roles": "consumers"}, env={}, config_path=path)
        self.assertEqual(s.roles, ("consumers",))

    def test_consumer_errors_are_one_line(self):
        cases = [
            ('[[consumers]]\nname = "a"\ngroup = "g"\n', "handler is required"),
            ('[[consumers]]\nname = "a"\ngroup = "g"\nhandler = "log"\nbatchsize = 3\n', "unknown key 'batchsize'"),
            ('[[consumers]]\nname = "a"\ngroup = "g"\nhandler = "log"\nstart_id = "1-0"\n', "start_id"),
            ('[[consumers]]\nname = "a"\ngroup = "g"\nhandler = "log"\nmax_deliveries = 0\n', "max_deliveries"),
            ('[[consumers]]\nname = "a"\ngroup = "g"\nhandler = "log"\n'
             '[[consumers]]\nname = "a"\ngroup = "h"\nhandler = "log"\n', "used twice"),
            ('consumers = "x"\n', "[[consumers]]"),
        ]
        for text, contains in cases:
            with self.assertRaises(ConfigError) as cm:
                self.load(text)
            self.assertIn(contains, str(cm.exception))
            self.assertIn("[[consumers]]", str(cm.exception))
            self.assertNotIn("\n", str(cm.exception))

    def test_consumers_role_needs_tables_and_cap_covers_length(self):
        with self.assertRaises(ConfigError) as cm:
            load_settings({"api_keys": KEYS, "roles": "ingest,consumers"}, env={})
        self.assertIn("[[consumers]]", str(cm.exception))
        with self.assertRaises(ConfigError) as cm:
            load_settings({"api_keys": KEYS, "retention_max_length": "100", "retention_hard_cap": "10"}, env={})
        self.assertEqual(cm.exception.option, "retention_hard_cap")

    def test_retention_config(self):
        s = load_settings({"api_keys": KEYS, "retention_max_age": "60", "dlq_max_length": "5"}, env={})
        r = s.retention()
        self.assertEqual((r.max_age, r.dlq_max_length, r.hard_cap), (60.0, 5, 0))
