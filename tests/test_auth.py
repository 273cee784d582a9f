"""Authentication and the per-key event rate limit, driven by a fake clock."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from payflux.config import ApiKey
from payflux.ingest.auth import Authenticator
from payflux.ingest.errors import ApiError
from payflux.ingest.ratelimit import RateLimiter

OLD = ApiKey("old", b"old-secret-0123456789")
NEW = ApiKey("new", b"new-secret-0123456789")


class AuthenticatorTests(SynchronousTestCase):
    def assertUnauthorized(self, auth, header, query=None, contains=""):
        with self.assertRaises(ApiError) as cm:
            auth.authenticate(header, query)
        self.assertEqual(cm.exception.status, 401)
        self.assertIn(contains, cm.exception.message)
        self.assertEqual(cm.exception.headers["WWW-Authenticate"], 'Bearer realm="payflux"')

    def test_rotation_both_keys_work(self):
        auth = Authenticator([OLD, NEW])
        self.assertEqual(auth.authenticate(b"Bearer old-secret-0123456789"), "old")
        self.assertEqual(auth.authenticate(b"bearer new-secret-0123456789"), "new")

    def test_refusals(self):
        auth = Authenticator([OLD, NEW], revoked=["old"])
        self.assertUnauthorized(auth, None, contains="missing")
        self.assertUnauthorized(auth, b"Basic b2xkOnNlY3JldA==", contains="Bearer")
        self.assertUnauthorized(auth, b"Bearer ", contains="Bearer")
        self.assertUnauthorized(auth, b"Bearer new-secret-012345678", contains="unknown")  # a prefix
        self.assertUnauthorized(auth, b"Bearer new-secret-01234567890", contains="unknown")  # longer
        self.assertUnauthorized(auth, b"Bearer old-secret-0123456789", contains="revoked")
        self.assertUnauthorized(auth, b"Bearer new-secret-0123456789", {b"api_key": [b"x"]}, contains="query")

    def test_dev_mode_without_keys_accepts_any_caller(self):
        auth = Authenticator([], dev_mode=True)
        self.assertEqual(auth.authenticate(None), "dev")
        self.assertEqual(auth.authenticate(b"Bearer any-key-the-producer-has"), "dev")
        self.assertUnauthorized(auth, b"Bearer x", {b"api_key": [b"x"]}, contains="query")

    def test_dev_mode_with_keys_accepts_missing_key_but_not_a_wrong_one(self):
        auth = Authenticator([ApiKey("a", b"right-secret-0123456789")], dev_mode=True)
        self.assertEqual(auth.authenticate(None), "dev")
        self.assertEqual(auth.authenticate(b"Bearer right-secret-0123456789"), "a")
        self.assertUnauthorized(auth, b"Bearer wrong-secret-0123456789", contains="unknown")

    def test_every_key_is_compared(self):
        """No early exit: the matching key's position doesn't change how many compares run."""
        import hmac

        calls = []
        real = hmac.compare_digest

        def counting(a, b):
            calls.append(1)
            return real(a, b)

        self.patch(hmac, "compare_digest", counting)
        auth = Authenticator([OLD, NEW, ApiKey("third", b"third-secret-0123456789")])
        auth.authenticate(b"Bearer old-secret-0123456789")
        self.assertEqual(len(calls), 3)


class RateLimiterTests(SynchronousTestCase):
    def test_batch_spends_its_events_and_retry_after_says_when(self):
        clock = Clock()
        limiter = RateLimiter(rate=100, burst=200, seconds=clock.seconds)
        limiter.check("k")
        limiter.spend("k", 500)  # admitted with 200 tokens, now 300 in debt
        with self.assertRaises(ApiError) as cm:
            limiter.check("k")
        self.assertEqual(cm.exception.status, 429)
        self.assertEqual(cm.exception.headers["Retry-After"], "4")  # (1 + 300) / 100 -> 4 s
        clock.advance(3)
        with self.assertRaises(ApiError):
            limiter.check("k")
        clock.advance(1.1)
        limiter.check("k")

    def test_keys_are_independent_and_bucket_caps_at_burst(self):
        clock = Clock()
        limiter = RateLimiter(rate=10, burst=5, seconds=clock.seconds)
        limiter.spend("a", 5)
        with self.assertRaises(ApiError):
            limiter.check("a")
        limiter.check("b")
        clock.advance(1000)
        limiter.spend("a", 5)  # refilled to burst (5), not 10,000
        with self.assertRaises(ApiError):
            limiter.check("a")

    def test_zero_rate_disables(self):
        limiter = RateLimiter(rate=0, burst=1, seconds=Clock().seconds)
        limiter.spend("a", 10**6)
        limiter.check("a")


class _NoEquality(bytes):
    """A secret that fails the test if anything compares it with ``==`` / ``!=``."""

    def __eq__(self, other):
        raise AssertionError("an API key secret was compared with ==, not hmac.compare_digest")

    __ne__ = __eq__
    __hash__ = bytes.__hash__


class ConstantTimeCompareTests(SynchronousTestCase):
    def test_every_key_goes_through_hmac_compare_digest_and_nothing_else(self):
        """Whichever key matches (or none), each configured secret is compared once, in order,
        by ``hmac.compare_digest`` against the presented token; ``==`` is never used."""
        import hmac

        keys = [ApiKey(f"k{i}", _NoEquality(f"secret-{i}-0123456789abcdef".encode())) for i in range(4)]
        calls = []
        real = hmac.compare_digest

        def recording(a, b):
            calls.append((a, b))
            return real(a, b)

        self.patch(hmac, "compare_digest", recording)
        auth = Authenticator(keys)
        presented = [bytes(k.secret) for k in keys] + [b"secret-9-0123456789abcdef", b"secret-0"]
        for token in presented:
            del calls[:]
            try:
                auth.authenticate(b"Bearer " + token)
            except ApiError as e:
                self.assertEqual(e.status, 401)
            self.assertEqual(len(calls), len(keys), token)
            for (secret, given), key in zip(calls, keys):
                self.assertIs(secret, key.secret)
                self.assertEqual(bytes(given), token)

    def test_credentials_in_the_query_string_are_refused_even_with_a_good_header(self):
        auth = Authenticator([OLD])
        for name in (b"api_key", b"apikey", b"API_KEY", b"api-key", b"key", b"token", b"access_token", b"secret",
                     b"authorization", b"bearer"):
            with self.assertRaises(ApiError) as cm:
                auth.authenticate(b"Bearer old-secret-0123456789", {name: [b"old-secret-0123456789"]})
            self.assertEqual(cm.exception.status, 401, name)
            self.assertIn("query string", cm.exception.message)
            self.assertNotIn("old-secret", str(cm.exception))
        # an unrelated query parameter is not a credential
        self.assertEqual(auth.authenticate(b"Bearer old-secret-0123456789", {b"trace": [b"1"]}), "old")


class NodeSecretsTests(SynchronousTestCase):
    """
    A real ``twistd -n payflux`` child with JSON logs, a password-protected redis-server, and
    every kind of request a secret can ride on: good, wrong, revoked and Basic keys, keys in
    the query string, secrets in bodies, paths and oversize or unfinished heads, and a Redis
    outage.  Afterwards no secret (API keys, the wrong key, the Redis password) is anywhere in
    the node's output; and /status is served on the side port only.
    """

    def test_no_secret_in_logs_and_status_only_on_the_side_port(self):
        import json
        import os
        import secrets
        import signal
        import socket
        import subprocess
        import tempfile
        import time
        import urllib.error
        import urllib.request

        from payflux.cli import sample_event
        from tests.support.process import TWISTD, clean_env
        from tests.support.redis import RedisProcess, find_redis_binaries, free_port

        binaries = find_redis_binaries()
        binary = binaries.get("7") or binaries.get("6.2")
        if binary is None:
            self.skipTest("no redis-server binary found")
        good, other, revoked, wrong, redis_pw = (secrets.token_urlsafe(24) for _ in range(5))
        redis = RedisProcess(binary, testcase=self, extra_args=["--requirepass", redis_pw])
        port, side = free_port(), free_port()
        workdir = tempfile.mkdtemp(prefix="payflux-secrets-")
        log_path = os.path.join(workdir, "twistd.log")
        log_file = open(log_path, "wb")
        self.addCleanup(log_file.close)
        args = [*TWISTD, "-n", "--pidfile=", "--logger=payflux.observability.logs.json_observer", "payflux",
                "--listen", f"tcp:{port}:interface=127.0.0.1", "--metrics-listen", f"tcp:{side}:interface=127.0.0.1",
                "--redis-url", f"redis://:{redis_pw}@127.0.0.1:{redis.port}/0", "--redis-timeout", "0.5",
                "--api-keys", f"producer:{good},other:{other},old:{revoked}", "--revoked-keys", "old",
                "--header-timeout", "0.5", "--max-event-bytes", "2048"]
        proc = subprocess.Popen(args, stdout=log_file, stderr=subprocess.STDOUT, cwd=workdir, env=clean_env())
        self.addCleanup(lambda: proc.poll() is None and (proc.kill(), proc.wait()))

        def log_text() -> str:
            with open(log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")

        def request(path, body=None, headers=None, base=port):
            req = urllib.request.Request(f"http://127.0.0.1:{base}{path}", data=body, headers=headers or {},
                                         method="POST" if body is not None else "GET")
            try:
                with urllib.request.urlopen(req, timeout=5) as r:
                    return r.status
            except urllib.error.HTTPError as e:
                return e.code

        def raw(data: bytes, wait: float = 0.0) -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(data)
                time.sleep(wait)
                chunks = []
                try:
                    while chunk := s.recv(65536):
                        chunks.append(chunk)
                except OSError:
                    pass
                return b"".join(chunks)

        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            self.assertIsNone(proc.poll(), log_text())
            try:
                if request("/ready") == 200:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        else:
            self.fail("node did not become ready:\n" + log_text())

        ev = json.dumps(sample_event()).encode()
        js = {"Content-Type": "application/json"}
        self.assertEqual(request("/v1/events/payment_exhaust", ev, {**js, "Authorization": f"Bearer {good}"}), 202)
        for header in (f"Bearer {wrong}", f"Bearer {revoked}", f"Basic {good}", f"Bearer {good}{good}", good):
            self.assertEqual(request("/v1/events/payment_exhaust", ev, {**js, "Authorization": header}), 401, header)
        for query in (f"?api_key={good}", f"?token={good}", f"?key={other}"):
            self.assertEqual(request("/v1/events/payment_exhaust" + query, ev, js), 401, query)
            self.assertEqual(
                request("/v1/events/payment_exhaust" + query, ev, {**js, "Authorization": f"Bearer {good}"}), 401)
        auth = {**js, "Authorization": f"Bearer {good}"}
        self.assertEqual(request("/v1/events/payment_exhaust", b'{"event_id": "' + good.encode(), auth), 400)
        unknown_field = json.dumps({**sample_event(), "x": good}).encode()  # dropped, never stored
        self.assertEqual(request("/v1/events/payment_exhaust", unknown_field, auth), 202)
        bad_value = json.dumps({**sample_event(), "channel": good + "@"}).encode()
        self.assertEqual(request("/v1/events/payment_exhaust", bad_value, auth), 422)
        self.assertEqual(request("/v1/events/payment_exhaust", b"x" * 5000, auth), 413)
        self.assertEqual(request(f"/v1/{good}?q={other}", ev, auth), 404)
        unfinished = f"POST / HTTP/1.1\r\nAuthorization: Bearer {good}".encode()
        self.assertTrue(raw(unfinished, wait=1.0).startswith(b"HTTP/1.1 408"))
        big = f"POST / HTTP/1.1\r\nAuthorization: Bearer {good}\r\nX-Pad: {'p' * 20000}\r\n\r\n".encode()
        self.assertTrue(raw(big).startswith(b"HTTP/1.1 431"))
        # status page and its JSON: side port only
        self.assertEqual(request("/status"), 404)
        self.assertEqual(request("/status.json"), 404)
        self.assertEqual(request("/status.json", base=side), 200)
        # an outage makes the node log the append failure (with the key id, never the key)
        redis.kill()
        self.assertEqual(request("/v1/events/payment_exhaust", json.dumps(sample_event()).encode(), auth), 503)
        self.assertEqual(request("/ready"), 503)

        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        text = log_text()
        lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
        warned = [line for line in lines if line.get("key_id") == "producer" and line["level"] == "warn"]
        self.assertTrue(warned, text[-3000:])  # the outage was logged, with the key id
        self.assertTrue(any("using Redis at" in line["message"] for line in lines), text[-3000:])
        for name, secret in [("good key", good), ("other key", other), ("revoked key", revoked),
                             ("wrong key", wrong), ("redis password", redis_pw)]:
            self.assertNotIn(secret, text, name)
            self.assertNotIn(secret[-12:], text, name)  # nor a recognisable part of it


class MetricsPortTests(SynchronousTestCase):
    def test_ingest_metrics_option_defaults_off(self):
        from payflux.config import load_settings

        self.assertIs(load_settings({"api_keys": "a:0123456789abcdef0123"}, env={}).ingest_metrics, False)
        self.assertIs(load_settings({"api_keys": "a:0123456789abcdef0123", "ingest_metrics": "true"}, env={}).ingest_metrics, True)
