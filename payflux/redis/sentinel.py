"""
Redis Sentinel: find the primary through the sentinels, and follow it when it fails over.

``redis+sentinel://[[user]:password@]host:port[,host:port...]/<master-name>[?db=N&sentinel_password=...]``
(payflux/redis/target.py parses it) gives :func:`connect_sentinel`: an ordinary lazy,
reconnecting txredisapi pool (same ``execute_command``/``disconnect`` surface as any other pool,
built by :func:`payflux.redis.txadapter.sentinel_factory`), whose every connection attempt goes through
:class:`SentinelEndpoint`:

1. ask the sentinels, in order (the last one that answered first), ``SENTINEL
   get-master-addr-by-name <master-name>``; a sentinel that is down, slow (``connect_timeout``)
   or doesn't know the name is skipped (:func:`payflux.redis.discovery.primary_steps`, the
   conversation the CLI's client has too);
2. connect to the address it names (TLS for ``rediss+sentinel``);
3. before the connection joins the pool, AUTH and ``ROLE``: anything but ``master`` (a replica
   not promoted yet, a demoted old primary) closes it, and the pool's backoff asks again.

Failures that mean "the primary moved" all end in a closed connection, and txredisapi reconnects
it -- through step 1 again -- with PayFlux's capped backoff (``max_retry_delay``):

- connection lost / refused (primary killed, or sentinel's ``CLIENT KILL TYPE normal`` when it
  reconfigures an instance);
- a reply timeout (txredisapi aborts the connection);
- a ``READONLY`` error reply (a demoted primary that still has our connection): the reply goes to
  its caller (the append path answers 503) and then the connection is closed;
- when a connection to a new address is confirmed primary (ROLE), the pool's connections to the
  old one are closed at once instead of each waiting for its own error (a sentinel that names
  the old primary for a moment after a failover changes nothing: ROLE refuses it).

Nothing is retried here: a command whose connection failed may have run, so its caller gets the
error, exactly as with a single Redis (the append path answers 503; a retry with the same
event_id is idempotent).  Acknowledged writes that the old primary had not replicated yet are
lost in a failover unless the writer's ``min_replicas_ack`` (WAIT) is on: docs/sentinel.md.
"""

from __future__ import annotations

from typing import Any

import txredisapi
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger
from zope.interface import implementer

from payflux.redis.discovery import NoPrimary, primary_steps
from payflux.redis.replies import is_primary
from payflux.redis.steps import SharedRound, run_deferred
from payflux.redis.target import Address, PoolOptions, RedisTarget, primary_target, sentinel_node_target, tls_options
from payflux.redis.txadapter import pooled_connections, sentinel_factory

log = Logger()


class MasterNotFound(txredisapi.ConnectionError):
    """No sentinel named a primary for the master name."""


class SentinelResolver:
    """
    Asks the sentinels of ``target`` where its primary is.  Concurrent callers share one round;
    each sentinel gets ``timeout`` seconds to connect and to answer.
    """

    def __init__(self, target: RedisTarget, timeout: float) -> None:
        if not target.seeds or not target.master_name:
            raise ValueError("a sentinel target needs sentinel addresses and a master name")
        self.target = target
        self.timeout = timeout
        self._order: list[Address] = list(target.seeds)
        self._round = SharedRound(lambda: defer.ensureDeferred(self._ask()))

    def master_address(self) -> defer.Deferred:
        return self._round.join()

    def idle(self) -> defer.Deferred:
        """Fires once no round is in flight (so closing the pool leaves no sentinel connection open)."""
        return self._round.idle()

    async def _ask(self) -> Address:
        try:
            addr, master = await run_deferred(primary_steps(list(self._order), self.target.master_name, False),
                                              lambda _, sentinel: defer.ensureDeferred(self._query(sentinel)))
        except NoPrimary as e:
            raise MasterNotFound(f"no sentinel named a primary for {self.target.master_name!r}: {e}") from None
        if self._order[0] != addr:  # ask the one that answered first next time
            self._order.remove(addr)
            self._order.insert(0, addr)
        return master

    async def _query(self, addr: Address) -> Any:
        node = sentinel_node_target(self.target, addr)
        conn = await txredisapi.Connection(
            host=addr[0], port=addr[1], dbid=None, reconnect=False, password=node.password, username=node.username,
            ssl_context_factory=tls_options(node) if node.tls else False,
            connectTimeout=self.timeout, replyTimeout=self.timeout, convertNumbers=False,
        )
        try:
            return await conn.execute_command("SENTINEL", "get-master-addr-by-name", self.target.master_name)
        finally:
            conn.disconnect().addErrback(lambda f: None)


@implementer(IStreamClientEndpoint)
class SentinelEndpoint:
    """Connects to whatever the sentinels name as primary right now (see the module docstring)."""

    def __init__(self, target: RedisTarget, resolver: SentinelResolver, connect_timeout: float, reactor: Any) -> None:
        self.target = target
        self.resolver = resolver
        self.connect_timeout = connect_timeout
        self.reactor = reactor
        self.current: Address | None = None
        self.switches = 0  # primary address changes seen (tests, logs)
        self.factory: Any = None  # the txredisapi factory whose connections this makes

    def connect(self, protocolFactory: Any) -> defer.Deferred:
        d = self.resolver.master_address()
        d.addCallback(self._connect, protocolFactory)
        return d

    def _connect(self, addr: Address, protocolFactory: Any) -> defer.Deferred:
        endpoint: Any = HostnameEndpoint(self.reactor, addr[0], addr[1], timeout=self.connect_timeout)
        if self.target.tls:
            endpoint = wrapClientTLS(tls_options(primary_target(self.target, addr)), endpoint)
        return endpoint.connect(protocolFactory)

    def confirmed(self, addr: Address) -> None:
        """
        A connection to ``addr`` answered ROLE ``master``: it is the primary now.  Only then
        does ``current`` change and are the pool's connections elsewhere closed, so a sentinel
        still naming the old primary for a moment (its answer refused by ROLE) neither moves
        ``current`` back nor drops the connections to the real one.
        """
        if addr == self.current:
            return
        if self.current is not None:
            self.switches += 1
            log.warn("redis sentinel: primary of {name} moved from {old} to {new}", name=self.target.master_name,
                     old=f"{self.current[0]}:{self.current[1]}", new=f"{addr[0]}:{addr[1]}")
        else:
            log.info("redis sentinel: primary of {name} is {new}", name=self.target.master_name,
                     new=f"{addr[0]}:{addr[1]}")
        self.current = addr
        self._drop_other(addr)

    def _drop_other(self, addr: Address) -> None:
        for conn in pooled_connections(self.factory):
            if getattr(conn, "payflux_address", addr) != addr:
                conn.transport.loseConnection()


class _PrimaryOnly:
    """
    Protocol mixin: AUTH and ``ROLE`` before the connection is handed to the pool (non-primaries
    are closed), and close the connection after a ``READONLY`` reply (our primary was demoted).
    """

    payflux_address: Address | None = None

    @defer.inlineCallbacks
    def connectionMade(self) -> Any:
        # where this connection went: the peer (the factory's protocols are handed to the pool
        # through ClientService's proxies, so nothing set on them from outside reaches them)
        peer = self.transport.getPeer()
        self.payflux_address = (getattr(peer, "host", "?"), getattr(peer, "port", 0))
        where = "%s:%s" % self.payflux_address
        try:
            if self.password is not None:
                yield self.auth(self.password, self.username)
            role = yield self.execute_command("ROLE")
        except Exception as e:  # noqa: BLE001 - the pool asks the sentinels again
            log.warn("redis sentinel: {where} did not answer ROLE: {e}", where=where, e=e)
            self.transport.loseConnection()
            return None
        if not is_primary(role):
            log.warn("redis sentinel: {where} is not a primary (ROLE {role}); asking the sentinels again",
                     where=where, role=role[0] if role else None)
            self.transport.loseConnection()
            return None
        endpoint = getattr(getattr(getattr(self, "factory", None), "handler", None), "endpoint", None)
        if endpoint is not None:
            endpoint.confirmed(self.payflux_address)
        yield super().connectionMade()

    def replyReceived(self, reply: Any) -> None:
        super().replyReceived(reply)
        if isinstance(reply, txredisapi.ResponseError) and str(reply).startswith("READONLY"):
            log.warn("redis sentinel: READONLY from {where}: the primary was demoted; reconnecting",
                     where="%s:%s" % (self.payflux_address or ("?", "?")))
            self.transport.loseConnection()


_PROTOCOLS: dict[Any, type] = {}


def primary_only(protocol: Any) -> type:
    """``protocol`` (a txredisapi protocol class; None = txredisapi's default) with :class:`_PrimaryOnly`."""
    base = protocol or txredisapi.RedisProtocol
    cls = _PROTOCOLS.get(base)
    if cls is None:
        cls = _PROTOCOLS[base] = type(f"PrimaryOnly{base.__name__}", (_PrimaryOnly, base), {})
    return cls


class SentinelHandler(txredisapi.ConnectionHandler):
    """A txredisapi pool handler; ``endpoint`` knows the current primary (``endpoint.current``)."""

    sentinel = True
    endpoint: SentinelEndpoint | None = None

    @property
    def primary(self) -> Address | None:
        """The primary the pool's connections last confirmed (ROLE master), as connected to (host, port)."""
        return self.endpoint.current if self.endpoint is not None else None

    def disconnect(self) -> defer.Deferred:
        """Close the pool, then wait for a sentinel round still in flight (bounded by its timeouts)."""
        d = super().disconnect()
        if self.endpoint is not None:
            resolver = self.endpoint.resolver
            d.addBoth(lambda result: resolver.idle().addCallback(lambda _: result))
        return d


def connect_sentinel(target: RedisTarget, options: PoolOptions, reactor: Any = None) -> SentinelHandler:
    """A lazy pool to the primary the sentinels of ``target`` name (see the module docstring)."""
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    timeout = options.connect_timeout
    endpoint = SentinelEndpoint(target, SentinelResolver(target, timeout), timeout, reactor)
    return sentinel_factory(target, options, SentinelHandler, primary_only(options.protocol), endpoint)
