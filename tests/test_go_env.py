"""
The Go PayFlux's environment (payflux/goenv.py, docs/migrating-from-go.md): every mapped
variable, precedence (PayFlux's names win), bare-secret key ids, revocation, failures naming the
Go variable, the one warning for Go-only names, no secret in any log line or error; plus a real
``twistd -n payflux`` started with nothing but a Go-style environment.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from urllib.parse import unquote, urlsplit

from twisted.internet import reactor
from twisted.internet.endpoints import _parseServer
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from payflux.config import ConfigError, _endpoint, load_settings
from payflux.goenv import GO_ONLY, MAPPED, GoEnvError, key_id_for, log_go_env
from payflux.ingest.auth import Authenticator
from payflux.ingest.errors import ApiError
from tests.support.process import TWISTD, clean_env, http_request, wait_ready
from tests.support.redis import RedisProcess, find_redis_binaries, free_port, sync_command_at

SECRET = "go-style-secret-0123456789abcdef"
NATIVE = "prod:0123456789abcdef0123"
EVENT = {
    "event_type": "payment_failed", "event_timestamp": "2026-01-06T00:00:00Z",
    "event_id": "0b7e6a0c-1d1f-4a8e-9d55-3f1f7a9b2c10", "merchant_id_hash": "abc123",
    "payment_intent_id_hash": "xyz456", "processor": "stripe", "failure_category": "processor_timeout",
    "retry_count": 0, "geo_bucket": "US", "amount_bucket": "50-200", "system_source": "checkout_api",
    "payment_method_bucket": "credit_card", "channel": "web", "retry_result": "failed",
    "failure_origin": "processor",
}


def settings(env: dict, cli: dict | None = None, config_path: str | None = None):
    return load_settings(cli or {}, env=env, config_path=config_path)


def everything_logged(s) -> str:
    return "\n".join((*s.legacy_env, *s.legacy_warnings, *s.legacy_ignored))


def capture_logs(testcase) -> list[str]:
    lines: list[str] = []

    def observer(event):
        if event.get("log_namespace") == "payflux.goenv":
            lines.append(f"{event['log_level'].name}: {formatEvent(event)}")

    globalLogPublisher.addObserver(observer)
    testcase.addCleanup(globalLogPublisher.removeObserver, observer)
    return lines


def authenticate(s, secret: str) -> str:
    return Authenticator(s.api_keys, s.revoked_keys).authenticate(b"Bearer " + secret.encode())


class RedisTests(SynchronousTestCase):
    def test_redis_addr(self):
        s = settings({"REDIS_ADDR": "127.0.0.1:6399", "PAYFLUX_API_KEY": SECRET})
        self.assertEqual(s.redis_url, "redis://127.0.0.1:6399/0")
        self.assertIn("REDIS_ADDR=127.0.0.1:6399 -> redis_url redis://127.0.0.1:6399/0", s.legacy_env)

    def test_ipv6_and_empty_host(self):
        self.assertEqual(settings({"REDIS_ADDR": "[::1]:6380", "PAYFLUX_API_KEY": SECRET}).redis_url,
                         "redis://[::1]:6380/0")
        self.assertEqual(settings({"REDIS_ADDR": ":6380", "PAYFLUX_API_KEY": SECRET}).redis_url,
                         "redis://localhost:6380/0")

    def test_password_and_tls(self):
        password = "p@ss:w/rd%secret"
        s = settings({"REDIS_ADDR": "redis.internal:6380", "REDIS_PASSWORD": password, "REDIS_TLS": "true",
                      "PAYFLUX_API_KEY": SECRET})
        parts = urlsplit(s.redis_url)
        self.assertEqual((parts.scheme, parts.hostname, parts.port, unquote(parts.password)),
                         ("rediss", "redis.internal", 6380, password))
        self.assertIn("REDIS_PASSWORD=<secret> -> redis_url password", s.legacy_env)
        self.assertIn("REDIS_TLS=true -> redis_url rediss:// (TLS, server certificate verified)", s.legacy_env)
        for text in (everything_logged(s), repr(s)):
            self.assertNotIn(password, text)
            self.assertNotIn("p%40ss", text)

    def test_password_or_tls_alone_mean_the_go_default_address(self):
        s = settings({"REDIS_PASSWORD": "hunter2hunter2", "PAYFLUX_API_KEY": SECRET})
        # the Go PayFlux's default address, translated and parsed only: nothing connects to it
        self.assertEqual(urlsplit(s.redis_url).hostname, "localhost")
        self.assertEqual(urlsplit(s.redis_url).port, 6379)
        self.assertTrue(settings({"REDIS_TLS": "true", "PAYFLUX_API_KEY": SECRET}).redis_url.startswith("rediss://"))
        # REDIS_TLS=false alone is the Go default spelled out: the embedded Redis stays
        s = settings({"REDIS_TLS": "false", "PAYFLUX_API_KEY": SECRET})
        self.assertIsNone(s.redis_url)
        self.assertFalse([line for line in s.legacy_env if "REDIS" in line])

    def test_tls_other_than_true_or_false_fails(self):
        for value in ("TRUE", "1", "yes"):
            with self.assertRaises(GoEnvError) as cm:
                settings({"REDIS_ADDR": "h:1", "REDIS_TLS": value, "PAYFLUX_API_KEY": SECRET})
            self.assertIn("REDIS_TLS", str(cm.exception))

    def test_bad_addresses_fail_naming_the_variable(self):
        for addr in ("nohost", "h:", "h:port", "h:70000", "::1:6380", "h:0", "a b:1"):
            with self.assertRaises(ConfigError) as cm:
                settings({"REDIS_ADDR": addr, "PAYFLUX_API_KEY": SECRET})
            self.assertTrue(str(cm.exception).startswith("invalid REDIS_ADDR "), str(cm.exception))
        # credentials in the address are refused without being echoed
        with self.assertRaises(ConfigError) as cm:
            settings({"REDIS_ADDR": "user:topsecretpw@h:6380", "PAYFLUX_API_KEY": SECRET})
        self.assertNotIn("topsecretpw", str(cm.exception))
        self.assertIn("REDIS_PASSWORD", str(cm.exception))

    def test_password_file_wins_over_redis_password(self):
        fd, path = tempfile.mkstemp()
        os.write(fd, b"from-the-file\n")
        os.close(fd)
        self.addCleanup(os.unlink, path)
        s = settings({"REDIS_ADDR": "h:6380", "REDIS_PASSWORD": "from-the-env", "PAYFLUX_API_KEY": SECRET,
                      "PAYFLUX_REDIS_PASSWORD_FILE": path})
        self.assertEqual(unquote(urlsplit(s.redis_url).password), "from-the-file")
        self.assertIn("REDIS_PASSWORD=<secret> ignored: redis_password_file is set by PAYFLUX_REDIS_PASSWORD_FILE",
                      s.legacy_env)

    def test_go_style_environment_without_redis_addr_warns(self):
        s = settings({"HTTP_ADDR": ":8080", "PAYFLUX_API_KEY": SECRET})
        self.assertIsNone(s.redis_url)
        self.assertTrue(any("REDIS_ADDR is not set" in w for w in s.legacy_warnings))
        # a PayFlux node with only PAYFLUX_API_KEY (also `payflux send`'s variable) is not nagged
        self.assertEqual(settings({"PAYFLUX_API_KEY": SECRET}).legacy_warnings, ())


class ListenTests(SynchronousTestCase):
    def test_http_addr_forms(self):
        for addr, endpoint, port, interface in [
            (":8080", "tcp:8080", 8080, None),
            ("127.0.0.1:8089", "tcp:8089:interface=127.0.0.1", 8089, "127.0.0.1"),
            ("0.0.0.0:80", "tcp:80:interface=0.0.0.0", 80, "0.0.0.0"),
            ("localhost:9000", "tcp:9000:interface=localhost", 9000, "localhost"),
            ("[::1]:8080", r"tcp6:8080:interface=\:\:1", 8080, "::1"),
            ("[::]:8080", r"tcp6:8080:interface=\:\:", 8080, "::"),
        ]:
            s = settings({"HTTP_ADDR": addr, "PAYFLUX_API_KEY": SECRET})
            self.assertEqual(s.listen, endpoint)
            self.assertEqual(_endpoint(s.listen), endpoint)
            parser, args, kwargs = _parseServer(s.listen, None)
            if endpoint.startswith("tcp6"):
                self.assertEqual((int(args[0]), kwargs.get("interface")), (port, interface))
            else:
                self.assertEqual((args[0], kwargs.get("interface") or None), (port, interface))
            self.assertIn(f"HTTP_ADDR={addr} -> listen {endpoint}", s.legacy_env)

    def test_bad_http_addr_fails_naming_it(self):
        for addr in ("8080", ":http", "::1:8080", "[::1]8080", "h:99999"):
            with self.assertRaises(ConfigError) as cm:
                settings({"HTTP_ADDR": addr, "PAYFLUX_API_KEY": SECRET})
            self.assertTrue(str(cm.exception).startswith("invalid HTTP_ADDR "), str(cm.exception))


class NumberTests(SynchronousTestCase):
    def test_ingest_rate(self):
        s = settings({"PAYFLUX_INGEST_RPS": "100", "PAYFLUX_INGEST_BURST": "500", "PAYFLUX_API_KEY": SECRET})
        self.assertEqual((s.rate_limit, s.rate_burst), (100.0, 500))
        self.assertIn("PAYFLUX_INGEST_RPS=100 -> rate_limit 100 events/s per key", s.legacy_env)

    def test_ratelimit_is_the_fallback_and_ingest_wins(self):
        s = settings({"PAYFLUX_RATELIMIT_RPS": "7", "PAYFLUX_RATELIMIT_BURST": "9", "PAYFLUX_API_KEY": SECRET})
        self.assertEqual((s.rate_limit, s.rate_burst), (7.0, 9))
        s = settings({"PAYFLUX_RATELIMIT_RPS": "7", "PAYFLUX_INGEST_RPS": "50", "PAYFLUX_RATELIMIT_BURST": "9",
                      "PAYFLUX_INGEST_BURST": "60", "PAYFLUX_API_KEY": SECRET})
        self.assertEqual((s.rate_limit, s.rate_burst), (50.0, 60))
        self.assertTrue(any(line.startswith("PAYFLUX_RATELIMIT_RPS=7 ignored: PAYFLUX_INGEST_RPS is set")
                            for line in s.legacy_env))

    def test_retention(self):
        s = settings({"PAYFLUX_STREAM_MAXLEN": "200000", "PAYFLUX_RAW_EVENT_TTL_DAYS": "3", "PAYFLUX_API_KEY": SECRET})
        self.assertEqual((s.retention_max_length, s.retention_max_age), (200000, 3 * 86400.0))
        self.assertEqual(s.retention().max_age, 3 * 86400.0)
        # 0 disables both, in the Go program and in PayFlux
        s = settings({"PAYFLUX_STREAM_MAXLEN": "0", "PAYFLUX_RAW_EVENT_TTL_DAYS": "0", "PAYFLUX_API_KEY": SECRET})
        self.assertEqual((s.retention_max_length, s.retention_max_age), (0, 0.0))

    def test_invalid_numbers_fail_naming_the_go_variable(self):
        cases = [
            ("PAYFLUX_INGEST_RPS", "abc"), ("PAYFLUX_INGEST_RPS", "0"), ("PAYFLUX_INGEST_RPS", "1.5"),
            ("PAYFLUX_INGEST_BURST", "-3"), ("PAYFLUX_RATELIMIT_RPS", "ten"), ("PAYFLUX_RATELIMIT_BURST", "0"),
            ("PAYFLUX_STREAM_MAXLEN", "-1"), ("PAYFLUX_STREAM_MAXLEN", "1e6"), ("PAYFLUX_STREAM_MAXLEN", "1_000"),
            ("PAYFLUX_RAW_EVENT_TTL_DAYS", "7d"), ("PAYFLUX_RAW_EVENT_TTL_DAYS", "99999"),
        ]
        for variable, value in cases:
            with self.assertRaises(ConfigError) as cm:
                settings({variable: value, "PAYFLUX_API_KEY": SECRET})
            text = str(cm.exception)
            self.assertTrue(text.startswith(f"invalid {variable} (Go PayFlux variable"), text)
            self.assertIsInstance(cm.exception, GoEnvError)
            self.assertEqual(cm.exception.variable, variable)

    def test_garbage_fails_even_when_a_payflux_name_wins(self):
        # the Go program's own start-up check refused it too: a mistake either way
        with self.assertRaises(GoEnvError):
            settings({"PAYFLUX_INGEST_RPS": "lots", "PAYFLUX_RATE_LIMIT": "10", "PAYFLUX_API_KEY": SECRET})

    def test_empty_values_are_unset(self):
        s = settings({"PAYFLUX_INGEST_RPS": "", "HTTP_ADDR": "  ", "REDIS_ADDR": "", "PAYFLUX_API_KEY": SECRET})
        self.assertEqual((s.rate_limit, s.listen, s.redis_url), (10_000.0, "tcp:8080", None))


class PrecedenceTests(SynchronousTestCase):
    def test_payflux_names_win(self):
        env = {"REDIS_ADDR": "go-redis:6380", "PAYFLUX_REDIS_URL": "redis://payflux-redis:6380/1",
               "HTTP_ADDR": "127.0.0.1:8089", "PAYFLUX_LISTEN": "tcp:9999",
               "PAYFLUX_INGEST_RPS": "100", "PAYFLUX_RATE_LIMIT": "42",
               "PAYFLUX_INGEST_BURST": "5", "PAYFLUX_RATE_BURST": "43",
               "PAYFLUX_STREAM_MAXLEN": "10", "PAYFLUX_RETENTION_MAX_LENGTH": "44",
               "PAYFLUX_RAW_EVENT_TTL_DAYS": "1", "PAYFLUX_RETENTION_MAX_AGE": "45",
               "PAYFLUX_API_KEY": SECRET}
        s = settings(env)
        self.assertEqual((s.redis_url, s.listen, s.rate_limit, s.rate_burst, s.retention_max_length,
                          s.retention_max_age), ("redis://payflux-redis:6380/1", "tcp:9999", 42.0, 43, 44, 45.0))
        self.assertIn("REDIS_ADDR=go-redis:6380 ignored: redis_url is set by PAYFLUX_REDIS_URL", s.legacy_env)
        self.assertIn("HTTP_ADDR=127.0.0.1:8089 ignored: listen is set by PAYFLUX_LISTEN", s.legacy_env)
        self.assertIn("PAYFLUX_INGEST_RPS=100 ignored: rate_limit is set by PAYFLUX_RATE_LIMIT", s.legacy_env)

    def test_file_and_cli_win(self):
        fd, path = tempfile.mkstemp(suffix=".toml")
        os.write(fd, b'listen = "tcp:7000"\n')
        os.close(fd)
        self.addCleanup(os.unlink, path)
        s = settings({"HTTP_ADDR": ":8081", "PAYFLUX_INGEST_RPS": "5", "PAYFLUX_API_KEY": SECRET},
                     cli={"rate_limit": "6"}, config_path=path)
        self.assertEqual((s.listen, s.rate_limit), ("tcp:7000", 6.0))
        self.assertIn("HTTP_ADDR=:8081 ignored: listen is set by the config file", s.legacy_env)
        self.assertIn("PAYFLUX_INGEST_RPS=5 ignored: rate_limit is set by --rate-limit", s.legacy_env)

    def test_go_values_beat_defaults_only(self):
        s = settings({"HTTP_ADDR": ":8081", "PAYFLUX_API_KEY": SECRET}, cli={"listen": None})
        self.assertEqual(s.listen, "tcp:8081")  # None = not given on the command line
        s = settings({"HTTP_ADDR": ":8081", "PAYFLUX_LISTEN": "", "PAYFLUX_API_KEY": SECRET})
        self.assertEqual(s.listen, "tcp:8081")  # an empty PAYFLUX_LISTEN is not a value

    def test_no_go_environment_changes_nothing(self):
        s = settings({"PAYFLUX_API_KEYS": NATIVE, "PAYFLUX_REVOKED_KEYS": "prod"})
        self.assertEqual(([k.key_id for k in s.api_keys], s.revoked_keys), (["prod"], ("prod",)))
        self.assertEqual((s.legacy_env, s.legacy_warnings, s.legacy_ignored), ((), (), ()))


class KeyTests(SynchronousTestCase):
    def test_single_key_id_is_a_stable_hash_never_a_part_of_the_secret(self):
        s = settings({"PAYFLUX_API_KEY": SECRET})
        (key,) = s.api_keys
        self.assertEqual(key.key_id, "k_" + hashlib.sha256(SECRET.encode()).hexdigest()[:12])
        self.assertEqual(key.key_id, key_id_for(SECRET))
        self.assertEqual(settings({"PAYFLUX_API_KEY": SECRET}).api_keys[0].key_id, key.key_id)  # stable
        self.assertEqual(key.secret, SECRET.encode())
        for n in (3, 4, 8, 12):  # Go logged key[:8]; no prefix of the secret is in the id
            self.assertNotIn(SECRET[:n], key.key_id)
        self.assertNotIn(key.key_id[2:], SECRET)
        self.assertIn(f"PAYFLUX_API_KEY=<secret> -> api_keys (key id {key.key_id})", s.legacy_env)
        self.assertEqual(authenticate(s, SECRET), key.key_id)
        with self.assertRaises(ApiError):
            authenticate(s, SECRET + "x")

    def test_key_id_is_not_a_prefix_for_any_secret(self):
        for secret in ("k_abcdef", "0123456789abcdef", "deadbeefdeadbeefdead", "x" * 40):
            key_id = key_id_for(secret)
            self.assertRegex(key_id, r"^k_[0-9a-f]{12}$")
            self.assertNotIn(secret[:8], key_id)
            self.assertNotIn(key_id[2:], secret)
        self.assertEqual(len({key_id_for(f"secret-{n}") for n in range(1000)}), 1000)

    def test_list_of_bare_secrets_and_native_entries(self):
        bare1, bare2 = "first-bare-secret-0123", "second-bare-secret-4567"
        s = settings({"PAYFLUX_API_KEYS": f" {bare1} ,{NATIVE},,{bare2},{bare1}"})
        ids = [k.key_id for k in s.api_keys]
        self.assertEqual(ids, ["prod", key_id_for(bare1), key_id_for(bare2)])  # bare1 twice: once
        self.assertEqual(authenticate(s, bare2), key_id_for(bare2))
        self.assertEqual(authenticate(s, "0123456789abcdef0123"), "prod")
        self.assertIn(f"PAYFLUX_API_KEYS entry 1=<secret> -> api_keys (key id {key_id_for(bare1)})", s.legacy_env)
        self.assertNotIn("entry 2", everything_logged(s))  # the native entry is PayFlux's own

    def test_ambiguous_entry_is_read_the_payflux_way(self):
        s = settings({"PAYFLUX_API_KEYS": "abc:0123456789abcdefXYZ"})
        self.assertEqual([k.key_id for k in s.api_keys], ["abc"])
        # ... but with a short part after the colon (or a bad id) it is a bare Go secret
        for entry in ("abc:short", "bad id:0123456789abcdefXYZ", "a" * 65 + ":0123456789abcdefXYZ"):
            s = settings({"PAYFLUX_API_KEYS": entry})
            self.assertEqual([k.key_id for k in s.api_keys], [key_id_for(entry)])
            self.assertEqual(authenticate(s, entry), key_id_for(entry))

    def test_short_bare_secret_is_accepted_with_a_warning(self):
        s = settings({"PAYFLUX_API_KEY": "dev-key"})
        self.assertEqual(authenticate(s, "dev-key"), key_id_for("dev-key"))
        (warning,) = s.legacy_warnings
        self.assertIn(key_id_for("dev-key"), warning)
        self.assertIn("shorter than 16", warning)
        self.assertNotIn("dev-key", everything_logged(s))

    def test_single_key_is_ignored_when_a_list_or_payflux_keys_are_set(self):
        s = settings({"PAYFLUX_API_KEYS": "list-secret-0123456789", "PAYFLUX_API_KEY": SECRET})
        self.assertEqual([k.key_id for k in s.api_keys], [key_id_for("list-secret-0123456789")])
        self.assertIn("PAYFLUX_API_KEY=<secret> ignored: PAYFLUX_API_KEYS is set (the Go program ignored it too)",
                      s.legacy_env)
        s = settings({"PAYFLUX_API_KEY": SECRET}, cli={"api_keys": NATIVE})
        self.assertEqual([k.key_id for k in s.api_keys], ["prod"])
        self.assertIn("PAYFLUX_API_KEY=<secret> ignored: api_keys is set by --api-keys", s.legacy_env)
        # an empty list is no list (Go: falls back to PAYFLUX_API_KEY)
        s = settings({"PAYFLUX_API_KEYS": " , ", "PAYFLUX_API_KEY": SECRET})
        self.assertEqual([k.key_id for k in s.api_keys], [key_id_for(SECRET)])

    def test_cli_keys_beat_the_env_list(self):
        s = settings({"PAYFLUX_API_KEYS": "bare-secret-0123456789"}, cli={"api_keys": NATIVE})
        self.assertEqual([k.key_id for k in s.api_keys], ["prod"])


class RevokedTests(SynchronousTestCase):
    def test_revoked_bare_secret_is_refused(self):
        old, new = "old-bare-secret-0123456789", "new-bare-secret-0123456789"
        s = settings({"PAYFLUX_API_KEYS": f"{old},{new}", "PAYFLUX_REVOKED_KEYS": old})
        self.assertEqual(s.revoked_keys, (key_id_for(old),))
        with self.assertRaises(ApiError) as cm:
            authenticate(s, old)
        self.assertEqual((cm.exception.status, cm.exception.message), (401, "API key revoked"))
        self.assertEqual(authenticate(s, new), key_id_for(new))
        self.assertIn(f"PAYFLUX_REVOKED_KEYS entry 1=<secret> -> revoked_keys (key id {key_id_for(old)})",
                      s.legacy_env)
        self.assertNotIn(old, everything_logged(s) + repr(s) + repr(s.revoked_keys))

    def test_revoked_key_ids_and_secrets_of_native_keys(self):
        s = settings({"PAYFLUX_API_KEYS": f"{NATIVE},other:abcdefabcdefabcdef00,{SECRET}",
                      "PAYFLUX_REVOKED_KEYS": f"other,0123456789abcdef0123,{key_id_for(SECRET)}"})
        # "other" is a key id; the next entry is prod's secret; the last a derived id
        self.assertEqual(set(s.revoked_keys), {"other", "prod", key_id_for("0123456789abcdef0123"),
                                               key_id_for(SECRET)})
        for secret in ("abcdefabcdefabcdef00", "0123456789abcdef0123", SECRET):
            with self.assertRaises(ApiError):
                authenticate(s, secret)
        self.assertNotIn("0123456789abcdef0123", "".join(s.revoked_keys) + everything_logged(s))

    def test_cli_revoked_keys_are_key_ids_as_before(self):
        s = settings({"PAYFLUX_API_KEYS": NATIVE}, cli={"revoked_keys": "gone,prod"})
        self.assertEqual(s.revoked_keys, ("gone", "prod"))


class GoOnlyTests(SynchronousTestCase):
    def test_go_only_names_are_listed_never_failed(self):
        env = {name: "some-value" for name in GO_ONLY}
        env.update(PAYFLUX_ENV="prod", PAYFLUX_PANIC_MODE="bogus", PAYFLUX_API_KEY=SECRET, PAYFLUX_TIER2_ENABLED="")
        s = settings(env)
        self.assertEqual(s.legacy_ignored, tuple(sorted(set(GO_ONLY) - {"PAYFLUX_TIER2_ENABLED"})))

    def test_the_list_is_main_gos(self):
        for name in ("PAYFLUX_ENV", "STRIPE_API_KEY", "PAYFLUX_TIER", "PAYFLUX_PILOT_MODE", "PAYFLUX_PANIC_MODE",
                     "PAYFLUX_RISK_SCORE_ENABLED", "PAYFLUX_RISK_SCORE_WINDOW_SEC", "PAYFLUX_RISK_SCORE_THRESHOLDS",
                     "PAYFLUX_EXPORT_MODE", "PAYFLUX_EXPORT_FILE", "PAYFLUX_INGEST_ENABLED", "DATABASE_URL"):
            self.assertIn(name, GO_ONLY)
        self.assertFalse(set(GO_ONLY) & set(MAPPED))
        # none of them is a PayFlux option's own variable
        from payflux.config import OPTIONS

        self.assertFalse(set(GO_ONLY) & {"PAYFLUX_" + o.name.upper() for o in OPTIONS})

    def test_one_warning_line_naming_them_all(self):
        logs = capture_logs(self)
        s = settings({"PAYFLUX_ENV": "dev", "STRIPE_API_KEY": "sk_live_topsecretstripe", "PAYFLUX_TIER": "tier2",
                      "REDIS_ADDR": "127.0.0.1:6399", "PAYFLUX_API_KEY": SECRET})
        log_go_env(s)
        warnings = [line for line in logs if "not implement" in line]
        self.assertEqual(warnings, ["warn: go env: Go PayFlux variables PayFlux does not implement, ignored: "
                                    "PAYFLUX_ENV, PAYFLUX_TIER, STRIPE_API_KEY (see docs/migrating-from-go.md)"])
        self.assertIn("info: go env: REDIS_ADDR=127.0.0.1:6399 -> redis_url redis://127.0.0.1:6399/0", logs)
        self.assertNotIn("sk_live", "\n".join(logs))


class NoSecretTests(SynchronousTestCase):
    SECRETS = ("alpha-secret-000000000000", "beta", "redis-password-zzz", "sk_live_stripe_secret",
               "postgres://u:dbpass@h/db", "gamma-revoked-0000000000")

    def test_no_secret_in_any_line_setting_or_error(self):
        alpha, beta, redis_pw, stripe, dsn, gamma = self.SECRETS
        env = {"PAYFLUX_API_KEYS": f"{alpha},{beta}", "PAYFLUX_API_KEY": "ignored-single-secret",
               "PAYFLUX_REVOKED_KEYS": gamma, "REDIS_ADDR": "h:6380", "REDIS_PASSWORD": redis_pw, "REDIS_TLS": "true",
               "STRIPE_API_KEY": stripe, "DATABASE_URL": dsn, "HTTP_ADDR": ":8080"}
        logs = capture_logs(self)
        s = settings(env)
        log_go_env(s)
        shown = "\n".join([everything_logged(s), repr(s), repr(s.api_keys), repr(s.revoked_keys), *logs])
        for secret in (*self.SECRETS, "ignored-single-secret", "dbpass"):
            self.assertNotIn(secret, shown)
        self.assertGreaterEqual(len(logs), 6)
        # errors with secrets around name variables, never values
        for bad in ({"REDIS_TLS": "maybe"}, {"PAYFLUX_INGEST_RPS": "x"}, {"HTTP_ADDR": "nope"}):
            with self.assertRaises(ConfigError) as cm:
                settings({**env, **bad})
            for secret in self.SECRETS:
                self.assertNotIn(secret, str(cm.exception))

    def test_duplicate_key_error_names_ids_only(self):
        with self.assertRaises(ConfigError) as cm:
            settings({"PAYFLUX_API_KEYS": f"{key_id_for(SECRET)}:abcdefabcdefabcdefab,{SECRET}"})
        self.assertIn("defined twice", str(cm.exception))
        self.assertNotIn(SECRET, str(cm.exception))


class StartupLogTests(SynchronousTestCase):
    """Logged once at start: by a node, or by a --workers supervisor but never by each worker."""

    def go_settings(self, **extra):
        return settings({"REDIS_ADDR": "127.0.0.1:6399", "PAYFLUX_API_KEY": SECRET, "PAYFLUX_ENV": "dev"},
                        cli={"metrics_listen": "none", **extra})

    def test_node_logs_once(self):
        from payflux.node import build_node

        logs = capture_logs(self)
        build_node(self.go_settings(), reactor)
        self.assertEqual(sum("REDIS_ADDR=127.0.0.1:6399 -> redis_url" in line for line in logs), 1)
        self.assertEqual(sum("not implement" in line for line in logs), 1)

    def test_supervisor_logs_once_and_workers_never(self):
        import socket

        from payflux.node import build_node
        from payflux.supervisor import build_supervisor

        logs = capture_logs(self)
        s = self.go_settings(workers="2", listen="tcp:0:interface=127.0.0.1")
        build_supervisor(s, reactor)
        self.assertEqual(sum("REDIS_ADDR=127.0.0.1:6399 -> redis_url" in line for line in logs), 1)
        del logs[:]
        sock = socket.socket()
        self.addCleanup(sock.close)
        build_node(s, reactor, ingest_fd=sock.fileno(), worker_tag="0/1")  # what each worker runs
        self.assertEqual(logs, [])




class GoEnvironmentDaemonTests(SynchronousTestCase):
    """``twistd -n payflux`` with only the Go program's variables in its environment."""

    def setUp(self):
        binaries = find_redis_binaries()
        if not binaries:
            raise SkipTest("no redis-server binary")
        self.redis = RedisProcess(sorted(binaries.values())[0], testcase=self)
        self.dir = tempfile.mkdtemp(prefix="payflux-goenv-")
        self.addCleanup(shutil.rmtree, self.dir, True)

    def start(self, **go_env: str):
        port = free_port()
        env = clean_env()
        env.update({"REDIS_ADDR": f"127.0.0.1:{self.redis.port}", "HTTP_ADDR": f"127.0.0.1:{port}",
                    "PAYFLUX_API_KEY": SECRET, "PAYFLUX_ENV": "dev", "STRIPE_API_KEY": "sk_test_not_used_here",
                    **go_env})
        # --metrics-listen none only because the default side port (9464) may be taken on a shared machine
        args = [*TWISTD, "-n", "--pidfile=", "payflux", "--metrics-listen", "none"]
        self.log_path = os.path.join(self.dir, f"twistd-{port}.log")
        log = open(self.log_path, "wb")
        self.addCleanup(log.close)
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=self.dir, env=env)
        self.addCleanup(lambda: proc.poll() is None and (proc.kill(), proc.wait()))
        base = f"http://127.0.0.1:{port}"
        wait_ready(self, proc, base + "/ready", self.log_text, timeout=30)
        return base

    def log_text(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def post(self, base: str, secret: str, event: dict) -> tuple[int, bytes]:
        return http_request(base + "/v1/events/payment_exhaust", json.dumps(event).encode(),
                        {"Content-Type": "application/json", "Authorization": f"Bearer {secret}"})

    def test_go_environment_ingests_into_the_go_redis(self):
        base = self.start()
        status, body = self.post(base, SECRET, EVENT)
        self.assertEqual(status, 202, body)
        entries = sync_command_at(("127.0.0.1", self.redis.port), "XRANGE", "payflux:{0}:events", "-", "+")
        self.assertEqual(len(entries), 1)
        self.assertIn(EVENT["event_id"].encode(), b"".join(entries[0][1]))
        other = dict(EVENT, event_id="1b7e6a0c-1d1f-4a8e-9d55-3f1f7a9b2c10")
        status, body = self.post(base, "not-the-" + SECRET, other)
        self.assertEqual(status, 401, body)
        self.assertEqual(sync_command_at(("127.0.0.1", self.redis.port), "XLEN", "payflux:{0}:events"), 1)

        text = self.log_text()
        port = self.redis.port
        # stdout is a file: JSON lines (log_format auto), one message each
        messages = [json.loads(line)["message"] for line in text.splitlines() if line.strip()]
        self.assertIn(f"REDIS_ADDR=127.0.0.1:{port} -> redis_url redis://127.0.0.1:{port}/0", text)
        self.assertIn(f"PAYFLUX_API_KEY=<secret> -> api_keys (key id {key_id_for(SECRET)})", text)
        warnings = [m for m in messages if "PayFlux does not implement" in m]
        self.assertEqual(len(warnings), 1, text)
        self.assertTrue(warnings[0].endswith("ignored: PAYFLUX_ENV, STRIPE_API_KEY (see docs/migrating-from-go.md)"),
                        warnings[0])
        self.assertNotIn(SECRET, text)
        self.assertNotIn("sk_test_not_used_here", text)

    def test_seed_layout_keeps_the_go_stream_names(self):
        base = self.start(PAYFLUX_LAYOUT="seed")
        status, body = self.post(base, SECRET, EVENT)
        self.assertEqual(status, 202, body)
        entries = sync_command_at(("127.0.0.1", self.redis.port), "XRANGE", "events_stream", "-", "+")
        self.assertEqual(len(entries), 1, self.log_text())
        self.assertEqual(sync_command_at(("127.0.0.1", self.redis.port), "EXISTS", "payflux:{0}:events"), 0)
