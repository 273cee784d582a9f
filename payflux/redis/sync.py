"""
The operator CLI's blocking Redis clients: a thin layer over redis-py (middle layer of
:mod:`payflux.redis`).

The daemon talks to Redis through txredisapi on the reactor; the CLI is a short-lived,
synchronous program that only needs "send a command, read the reply".  It used to carry its own
RESP2 client, a second copy of the cluster routing and a blocking sentinel resolver, and those
had drifted from the async ones (a literal redirect limit and TRYAGAIN sleep, no slot refresh on
a lost connection).  redis-py is a well-kept blocking client with cluster support, so the CLI
uses it instead: that deletes the hand-written protocol code and the routing, and what is left
here is configuration, reply decoding and error translation.

:func:`open_target` opens every topology of the URL grammar (:mod:`payflux.redis.target`):
``redis://`` and ``rediss://`` (certificate and hostname verification against the platform trust
store, plus ``ca_file`` when given), ``unix://``, ``redis+cluster://`` / ``rediss+cluster://``
(:class:`SyncCluster`) and ``redis+sentinel://`` / ``rediss+sentinel://`` (the sentinels are asked
``SENTINEL get-master-addr-by-name``, as the async resolver does, and the node they name must
answer ``ROLE`` ``master``).  ``timeout`` bounds the connect and every reply.  AUTH (password or
ACL user) and SELECT happen on connect; when Redis refuses them, :class:`RedisReplyError`.

Reply decoding (the contract the CLI's parsers rely on: raw replies, none of redis-py's
per-command response callbacks or cluster result merging):

- simple strings (``+OK``) -> ``str``; integers -> ``int``; nil -> ``None``; arrays -> ``list``;
- bulk strings -> ``str`` when they are valid UTF-8 (every key, id and field PayFlux writes),
  otherwise the raw ``bytes`` (so foreign binary data is never mangled);
- an error reply at the top level raises :class:`RedisReplyError` (``str()`` is the reply text,
  ``NOSCRIPT ...``); errors nested inside an array (e.g. from ``EXEC``) are returned as
  ``RedisReplyError`` instances, not raised.

Connection problems (refused, unreachable, TLS failure, timeout, closed socket) raise
:class:`RedisConnectionError`, whose message is one line fit for operator output (never the
password).  Nothing is resent: a command whose connection failed may have run.  The next command
reconnects; after :meth:`SyncClient.close` the client refuses commands.

On a cluster, keyless ``PING`` and ``SCRIPT`` go to every master (the first master's reply is
returned), other keyless commands to one; keyed commands go to the master owning their key's slot,
the key named by :func:`payflux.redis.slots.command_key` exactly as for the daemon (``EVAL``/
``EVALSHA`` by their first key, ``XINFO``/``XGROUP`` by the key at index 2, ...).  redis-py
follows ``MOVED`` (updating its slot table), ``ASK`` and ``TRYAGAIN``, and refreshes the table
after a lost connection.  Scripts: :func:`payflux.redis.scripts.evalsha_sync`.
"""

from __future__ import annotations

import ssl
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import InvalidResponse, SlotNotCoveredError
from redis.retry import Retry

from payflux.redis.discovery import NoPrimary, primary_steps
from payflux.redis.slots import BROADCAST, command_key, command_name, key_slot
from payflux.redis.steps import run_sync
from payflux.redis.target import Address, RedisTarget, parse_redis_url, primary_target, sentinel_node_target


class RedisReplyError(Exception):
    """Redis answered with an error reply; ``str()`` is the reply text (e.g. ``NOSCRIPT ...``)."""


class RedisConnectionError(Exception):
    """Redis could not be reached or stopped answering; ``str()`` is one line for the operator."""


_REDIS_ERRORS = (redis.RedisError, redis.RedisClusterException)
# what redis-py raises when the connection, not Redis, failed (InvalidResponse: not a Redis server)
_CONNECTION_ERRORS = (redis.ConnectionError, redis.TimeoutError, redis.RedisClusterException, InvalidResponse)


def _options(target: RedisTarget, timeout: float) -> dict[str, Any]:
    """redis-py's connection options for ``target`` (every client here is built from these)."""
    options: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "protocol": 2,  # RESP2 replies, which the CLI's parsers read (redis-py 8 defaults to RESP3)
        "retry": Retry(NoBackoff(), 0),  # never resend: a command whose connection failed may have run
        "password": target.password,
        "username": target.username if target.password is not None else None,  # no AUTH without a password
    }
    if target.tls:
        options.update(ssl=True, ssl_cert_reqs="required", ssl_check_hostname=True, ssl_ca_certs=target.ca_file)
    return options


def _raw_replies(client: Any) -> Any:
    """
    Replies as Redis sent them (then :func:`_decode`): the one place redis-py's reply shaping is
    turned off -- a ``Redis``'s per-command response callbacks (PING -> True, XRANGE -> tuples,
    XPENDING -> dicts, ...), a ``RedisCluster``'s own callbacks and its merging of multi-node results.
    """
    for callbacks in ("response_callbacks", "cluster_response_callbacks", "result_callbacks"):
        getattr(client, callbacks, {}).clear()
    return client


def _decode(reply: Any) -> Any:
    if isinstance(reply, bytes):
        try:
            return reply.decode("utf-8")
        except UnicodeDecodeError:
            return reply
    if isinstance(reply, list):
        return [_decode(r) for r in reply]
    if isinstance(reply, redis.RedisError):  # an error reply nested in an array
        return RedisReplyError(_reply_text(reply))
    return reply


def _reply_text(e: BaseException) -> str:
    """The error reply as Redis sent it: redis-py strips the code it maps to an exception class."""
    code = getattr(e, "status_code", None)
    return f"{code} {e}" if code else str(e)


def _error(e: BaseException, where: str, timeout: float, opening: bool) -> Exception:
    """redis-py's exception ``e`` as RedisReplyError, RedisConnectionError (one line) or TypeError."""
    if isinstance(e, redis.RedisClusterException) and isinstance(e.__cause__, _REDIS_ERRORS):
        e = e.__cause__  # "Redis Cluster cannot be connected": why the last member failed
    if isinstance(e, redis.DataError):  # an argument redis-py cannot send
        return TypeError(str(e))
    if isinstance(e, SlotNotCoveredError):
        return RedisReplyError(f"CLUSTERDOWN {e}")
    if getattr(e, "status_code", None) or not isinstance(e, _CONNECTION_ERRORS):
        return RedisReplyError(_reply_text(e))  # an error reply, incl. a refused AUTH or SELECT
    cause = e.__context__ if isinstance(e.__context__, OSError) else None  # the socket error redis-py wrapped
    timed_out = isinstance(e, redis.TimeoutError) or isinstance(cause, TimeoutError)
    if isinstance(cause, ssl.SSLError):
        message = f"TLS to Redis at {where} failed: {cause.reason or cause}"
    elif opening:
        reason = f"timed out after {timeout:g}s" if timed_out else (cause and cause.strerror) or str(e).rstrip(".")
        message = f"cannot connect to Redis at {where}: {reason}"
    elif timed_out:
        message = f"Redis at {where}: no reply (timed out)"
    else:
        message = f"Redis at {where}: " + (f"connection lost ({cause.strerror})" if cause and cause.strerror
                                           else str(e).rstrip("."))
    return RedisConnectionError(" ".join(message.split()))


class SyncClient:
    """
    A blocking client (:func:`open_target`): ``command(*args)``, ``close()`` (idempotent), and a
    context manager (``with open_target(...) as client:``).
    """

    def __init__(self, client: Any, where: str, timeout: float) -> None:
        self._client = client
        self.where = where  # redacted target, for error messages
        self.timeout = timeout

    def __enter__(self) -> "SyncClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Close the connections; safe to call twice."""
        client, self._client = self._client, None
        if client is not None:
            client.close()

    def command(self, *args: Any) -> Any:
        """Send one command and return its decoded reply (see the module docstring)."""
        if self._client is None:
            raise RedisConnectionError(f"Redis at {self.where}: connection is closed")
        try:
            reply = self._send(args)
        except _REDIS_ERRORS as e:
            raise _error(e, self.where, self.timeout, opening=False) from None
        return _decode(reply)

    def _send(self, args: tuple) -> Any:
        return self._client.execute_command(*args)


class SyncRedis(SyncClient):
    """One blocking connection to one Redis.  Use :meth:`from_url` or :meth:`connect`."""

    @classmethod
    def from_url(cls, url: str, timeout: float = 5.0) -> "SyncRedis":
        """
        Connect, AUTH and SELECT as ``url`` says.  ``timeout`` (seconds) bounds the connect and
        every later reply.  Raises ValueError for a bad URL, :class:`RedisConnectionError` when
        Redis can't be reached, :class:`RedisReplyError` when AUTH/SELECT are refused.
        """
        return cls.connect(parse_redis_url(url), timeout)

    @classmethod
    def connect(cls, target: RedisTarget, timeout: float = 5.0) -> "SyncRedis":
        """Like :meth:`from_url` for an already parsed target (its host and port, or its socket)."""
        where = target.redacted()
        place = {"unix_socket_path": target.path} if target.scheme == "unix" else {"host": target.host, "port": target.port}
        try:  # single_connection_client: connect (AUTH, SELECT) now, not on the first command
            client = redis.Redis(**place, db=target.db, single_connection_client=True, **_options(target, timeout))
        except _REDIS_ERRORS as e:
            raise _error(e, where, timeout, opening=True) from None
        return cls(_raw_replies(client), where, timeout)


class _RawRedisCluster(RedisCluster):
    """redis-py's cluster client, routing by PayFlux's key rule and handing back raw replies."""

    _raw = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)  # redis-py reads (parses) the COMMAND table here, before nodes go raw
        _raw_replies(self)
        self._raw = True

    def get_redis_connection(self, node: ClusterNode) -> redis.Redis:
        client = super().get_redis_connection(node)
        return _raw_replies(client) if self._raw else client

    def determine_slot(self, *args: Any) -> int | None:
        key = command_key(args)
        return None if key is None else key_slot(key)


class SlotOwners:
    """``owner(slot) -> (host, port)`` of the master serving ``slot`` as the client knows it, or None."""

    def __init__(self, cluster: RedisCluster) -> None:
        self._cluster = cluster

    def owner(self, slot: int) -> Address | None:
        try:
            node = self._cluster.nodes_manager.get_node_from_slot(slot)
        except SlotNotCoveredError:
            return None
        return node.host, int(node.port)


class SyncCluster(SyncClient):
    """The CLI's client for a Redis Cluster (see the module docstring for the routing)."""

    @classmethod
    def connect(cls, target: RedisTarget, timeout: float = 5.0) -> "SyncCluster":
        """Ask the seeds for the slot table (and the masters for their command table)."""
        where = target.redacted()
        try:
            cluster = _RawRedisCluster(
                startup_nodes=[ClusterNode(host, port) for host, port in target.seeds],
                require_full_coverage=False, **_options(target, timeout),
            )
        except _REDIS_ERRORS as e:
            raise _error(e, where, timeout, opening=True) from None
        return cls(cluster, where, timeout)

    @property
    def slots(self) -> SlotOwners:
        """Who serves each slot, as the client knows it now (e.g. after following a ``MOVED``)."""
        return SlotOwners(self._client)

    def _send(self, args: tuple) -> Any:
        cluster = self._client
        key = command_key(args)
        if key is None:
            masters = sorted(cluster.get_primaries(), key=lambda n: (n.host, n.port))
            if not masters:
                raise RedisReplyError("CLUSTERDOWN no master serves a slot")
            if command_name(args[0]) not in BROADCAST:
                masters = masters[:1]
            return [cluster.execute_command(*args, target_nodes=node) for node in masters][0]
        slot = key_slot(key)
        try:
            node = cluster.nodes_manager.get_node_from_slot(slot)
        except SlotNotCoveredError:
            cluster.nodes_manager.initialize()
            node = cluster.nodes_manager.get_node_from_slot(slot)
        return cluster.execute_command(*args, target_nodes=node)


def _open_sentinel(target: RedisTarget, timeout: float) -> SyncRedis:
    """Ask each sentinel where the primary is; connect to the first one that answers ROLE master."""
    nodes: dict[Address, SyncRedis] = {}

    def ask(kind: str, addr: Address) -> Any:
        if kind == "SENTINEL":
            with SyncRedis.connect(sentinel_node_target(target, addr), timeout) as sentinel:
                return sentinel.command("SENTINEL", "get-master-addr-by-name", target.master_name)
        node = nodes.get(addr) or nodes.setdefault(addr, SyncRedis.connect(primary_target(target, addr), timeout))
        return node.command("ROLE")

    try:
        _, primary = run_sync(primary_steps(target.seeds, target.master_name, True), ask)
    except BaseException as e:
        for node in nodes.values():
            node.close()
        if isinstance(e, NoPrimary):
            raise RedisConnectionError(f"no primary found through the sentinels of {target.redacted()}: {e}") from None
        raise
    for addr, node in nodes.items():
        if addr != primary:
            node.close()
    return nodes[primary]


def open_target(target: RedisTarget, timeout: float = 5.0) -> SyncClient:
    """
    The CLI's blocking client for ``target``: a :class:`SyncCluster` for a cluster target, for a
    sentinel target a :class:`SyncRedis` to the primary the sentinels name, else a
    :class:`SyncRedis`.  Raises :class:`RedisConnectionError` when Redis can't be reached,
    :class:`RedisReplyError` when it refuses AUTH/SELECT.
    """
    if target.sentinel:
        return _open_sentinel(target, timeout)
    if target.cluster:
        return SyncCluster.connect(target, timeout)
    return SyncRedis.connect(target, timeout)
