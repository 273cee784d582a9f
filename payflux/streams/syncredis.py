"""
A tiny blocking RESP2 client for the ``payflux`` operator CLI (no extra dependency).

The daemon talks to Redis through txredisapi on the reactor; the CLI is a short-lived,
synchronous program and only needs "send a command, read the reply".  ``SyncRedis.from_url``
accepts exactly the URLs of :func:`payflux.streams.connection.parse_redis_url` (``redis://``,
``rediss://`` with certificate and hostname verification, ``unix://``; username/password AUTH,
database SELECT).

Reply decoding (the contract callers rely on):

- simple strings (``+OK``) -> ``str``; integers -> ``int``; nil -> ``None``; arrays -> ``list``;
- bulk strings -> ``str`` when they are valid UTF-8 (every key, id and field PayFlux writes),
  otherwise the raw ``bytes`` (so foreign binary data is never mangled);
- an error reply at the top level raises :class:`RedisReplyError`; errors nested inside an
  array (e.g. from ``EXEC``) are returned as ``RedisReplyError`` instances, not raised.

Connection problems (refused, unreachable, TLS failure, timeout, closed socket) raise
:class:`RedisConnectionError`, whose message is one line fit for operator output; after one
the client is closed and must not be reused.
"""

from __future__ import annotations

import hashlib
import socket
import time
import ssl
from typing import Any, Sequence

from payflux.streams.connection import RedisTarget, parse_redis_url


class RedisReplyError(Exception):
    """Redis answered with an error reply; ``str()`` is the reply text (e.g. ``NOSCRIPT ...``)."""


class RedisConnectionError(Exception):
    """Redis could not be reached or stopped answering; ``str()`` is one line for the operator."""


def _encode(args: Sequence[Any]) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for a in args:
        if isinstance(a, str):
            a = a.encode("utf-8")
        elif isinstance(a, (int, float)) and not isinstance(a, bool):
            a = repr(a).encode() if isinstance(a, float) else str(a).encode()
        elif not isinstance(a, (bytes, bytearray)):
            raise TypeError(f"cannot send {type(a).__name__} to Redis")
        parts.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(parts)


class SyncRedis:
    """One blocking connection.  Use :meth:`from_url`; close with :meth:`close` (or ``with``)."""

    def __init__(self, sock: socket.socket, where: str) -> None:
        self._sock: socket.socket | None = sock
        self._buf = b""
        self.where = where  # redacted target, for error messages

    @classmethod
    def from_url(cls, url: str, timeout: float = 5.0) -> "SyncRedis":
        """
        Connect, AUTH and SELECT as ``url`` says.  ``timeout`` (seconds) bounds the connect and
        every later reply.  Raises ValueError for a bad URL, :class:`RedisConnectionError` when
        Redis can't be reached, :class:`RedisReplyError` when AUTH/SELECT are refused.
        """
        target = parse_redis_url(url)
        return cls.connect(target, timeout)

    @classmethod
    def connect(cls, target: RedisTarget, timeout: float = 5.0) -> "SyncRedis":
        """Like :meth:`from_url` for an already parsed target."""
        where = target.redacted()
        sock: socket.socket | None = None
        try:
            if target.scheme == "unix":
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(timeout)
                sock.connect(target.path)
            else:
                sock = socket.create_connection((target.host, target.port), timeout=timeout)
                if target.tls:
                    context = ssl.create_default_context(cafile=target.ca_file)
                    sock = context.wrap_socket(sock, server_hostname=target.host)
            sock.settimeout(timeout)
        except ssl.SSLError as e:
            if sock is not None:
                sock.close()
            raise RedisConnectionError(f"TLS to Redis at {where} failed: {e.reason or e}") from None
        except socket.timeout:
            if sock is not None:
                sock.close()
            raise RedisConnectionError(f"cannot connect to Redis at {where}: timed out after {timeout:g}s") from None
        except OSError as e:
            if sock is not None:
                sock.close()
            raise RedisConnectionError(f"cannot connect to Redis at {where}: {e.strerror or e}") from None
        client = cls(sock, where)
        try:
            if target.password is not None:
                if target.username:
                    client.command("AUTH", target.username, target.password)
                else:
                    client.command("AUTH", target.password)
            if target.db:
                client.command("SELECT", target.db)
        except BaseException:
            client.close()
            raise
        return client

    def __enter__(self) -> "SyncRedis":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Close the socket; safe to call twice."""
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None

    # --- protocol ---

    def _fail(self, message: str) -> RedisConnectionError:
        self.close()
        return RedisConnectionError(f"Redis at {self.where}: {message}")

    def _fill(self) -> None:
        if self._sock is None:
            raise RedisConnectionError(f"Redis at {self.where}: connection is closed")
        try:
            chunk = self._sock.recv(65536)
        except socket.timeout:
            raise self._fail("no reply (timed out)") from None
        except OSError as e:
            raise self._fail(f"connection lost ({e.strerror or e})") from None
        if not chunk:
            raise self._fail("connection closed by the server")
        self._buf += chunk

    def _line(self) -> bytes:
        while True:
            i = self._buf.find(b"\r\n")
            if i >= 0:
                line, self._buf = self._buf[:i], self._buf[i + 2:]
                return line
            self._fill()

    def _read(self) -> Any:
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode("utf-8", "replace")
        if kind == b"-":
            return RedisReplyError(rest.decode("utf-8", "replace"))
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            while len(self._buf) < n + 2:
                self._fill()
            data, self._buf = self._buf[:n], self._buf[n + 2:]
            try:
                return data.decode("utf-8")
            except UnicodeDecodeError:
                return data
        if kind == b"*":
            n = int(rest)
            if n < 0:
                return None
            return [self._read() for _ in range(n)]
        raise self._fail(f"unexpected reply {line[:40]!r} (not a RESP2 server?)")

    def command(self, *args: Any) -> Any:
        """Send one command and return its decoded reply (see module docstring)."""
        if self._sock is None:
            raise RedisConnectionError(f"Redis at {self.where}: connection is closed")
        try:
            self._sock.sendall(_encode(args))
        except socket.timeout:
            raise self._fail("timed out sending a command") from None
        except OSError as e:
            raise self._fail(f"connection lost ({e.strerror or e})") from None
        reply = self._read()
        if isinstance(reply, RedisReplyError):
            raise reply
        return reply

    def eval_script(self, script: str, sha: str | None, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """
        ``EVALSHA sha`` and, when the server answers ``NOSCRIPT``, ``EVAL script`` (which also
        caches it).  ``sha`` may be None: it is then computed from ``script``.
        """
        sha = sha or hashlib.sha1(script.encode("utf-8")).hexdigest()
        try:
            return self.command("EVALSHA", sha, len(keys), *keys, *args)
        except RedisReplyError as e:
            if not str(e).startswith("NOSCRIPT"):
                raise
        return self.command("EVAL", script, len(keys), *keys, *args)


class SyncCluster:
    """
    The CLI's client for a Redis Cluster (``redis+cluster://``): the same ``command`` /
    ``eval_script`` interface as :class:`SyncRedis`, each command sent to the master owning its
    key's slot (routing and redirections as in :mod:`payflux.streams.cluster`); one
    :class:`SyncRedis` per member, opened on first use.
    """

    def __init__(self, target: RedisTarget, timeout: float = 5.0, max_redirects: int = 16) -> None:
        from payflux.streams.cluster import SlotTable

        self.target = target
        self.timeout = timeout
        self.max_redirects = max_redirects
        self.where = target.redacted()
        self.slots = SlotTable()
        self._nodes: dict[tuple[str, int], SyncRedis] = {}
        self._refresh()

    def __enter__(self) -> "SyncCluster":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        nodes, self._nodes = self._nodes, {}
        for node in nodes.values():
            node.close()

    def _node(self, addr: tuple[str, int]) -> SyncRedis:
        from payflux.streams.cluster import node_target

        node = self._nodes.get(addr)
        if node is None or node._sock is None:
            node = self._nodes[addr] = SyncRedis.connect(node_target(self.target, addr), self.timeout)
        return node

    def _refresh(self) -> None:
        from payflux.streams.cluster import parse_slots

        last: Exception | None = None
        for addr in dict.fromkeys([*self.slots.masters(), *self.target.seeds]):
            try:
                owners = parse_slots(self._node(addr).command("CLUSTER", "SLOTS"), addr[0])
            except (RedisConnectionError, RedisReplyError) as e:
                last = e
                continue
            if owners:
                self.slots.load(owners)
                return
        raise RedisConnectionError(f"no member of the Redis Cluster {self.where} answered CLUSTER SLOTS ({last})")

    def command(self, *args: Any) -> Any:
        """Send one command to the master owning its key (keyless PING/SCRIPT: every master)."""
        from payflux.streams.cluster import BROADCAST, _name, command_key, key_slot, parse_redirect

        key = command_key(args)
        if key is None:
            masters = self.slots.masters()
            if _name(args[0]) in BROADCAST:
                return [self._node(a).command(*args) for a in masters][0]
            return self._node(masters[0]).command(*args)
        slot = key_slot(key)
        asking: tuple[str, int] | None = None
        for _ in range(self.max_redirects + 1):
            addr = asking or self.slots.owner(slot)
            if addr is None:
                self._refresh()
                addr = self.slots.owner(slot)
                if addr is None:
                    raise RedisReplyError(f"CLUSTERDOWN hash slot {slot} is not served")
            node = self._node(addr)
            try:
                if asking is not None:
                    node.command("ASKING")
                return node.command(*args)
            except RedisReplyError as e:
                redirect = parse_redirect(str(e))
                if redirect is None:
                    if not str(e).startswith("TRYAGAIN"):
                        raise
                    asking = None
                    time.sleep(0.05)
                elif redirect[0] == "MOVED":
                    self.slots.move(redirect[1], redirect[2])
                    asking = None
                else:
                    asking = redirect[2]
        raise RedisReplyError(f"TRYAGAIN slot {slot}: still redirected after {self.max_redirects} tries")

    eval_script = SyncRedis.eval_script


def open_sync(url: str, timeout: float = 5.0) -> "SyncRedis | SyncCluster":
    """
    A :class:`SyncRedis`, a :class:`SyncCluster` for a ``redis+cluster://`` URL, or for a
    ``redis+sentinel://`` URL a :class:`SyncRedis` to the primary the sentinels name.
    """
    target = parse_redis_url(url)
    if target.sentinel:
        from payflux.streams.sentinel import sync_primary

        return sync_primary(target, timeout)
    if target.cluster:
        return SyncCluster(target, timeout)
    return SyncRedis.connect(target, timeout)
