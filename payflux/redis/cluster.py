"""
Redis Cluster routing: which node owns a command's key, and following the cluster when it moves.

Every key of one PayFlux partition carries the hash tag ``{p}`` (payflux/streams/keys.py), so a
partition's stream, dedupe records and dead letters live in one hash slot and the append script,
the dead-letter script and every per-partition command run on one node.  A deployment with N
partitions spreads them over the masters that own their N slots.

Routing by key (:mod:`payflux.redis.slots`: key slots, which key a command is routed by, keyless
``PING``/``SCRIPT`` to every master) and:

- The slot table comes from ``CLUSTER SLOTS`` (asked of a known master, then of the seed
  addresses).  ``MOVED <slot> <addr>`` updates that slot at once, re-sends the command there and
  refreshes the whole table in the background; ``ASK <slot> <addr>`` (a slot being migrated)
  sends ``ASKING`` and the command on one connection to ``addr`` without touching the table;
  ``TRYAGAIN`` (a multi-key command while the slot's keys are split between two nodes during a
  migration) is retried after ``tryagain_delay``.  At most ``max_redirects`` redirections per
  command; past them the command fails with a ``TRYAGAIN``-coded error, which the append path
  answers with 503.
- A MOVED/ASK reply means the command did *not* run, so following it never runs a command twice.
  A lost connection is not retried here (the command may have run): the error goes to the caller
  as on a single Redis, and the slot table is refreshed so the next command finds the new owner.
"""

from __future__ import annotations

import random
from typing import Any, Callable, Iterable, Sequence

import txredisapi
from twisted.internet import defer
from twisted.logger import Logger

from payflux.redis.replies import is_connection_failure
from payflux.redis.slots import Address, BROADCAST, SlotTable, command_key, command_name, key_slot, parse_redirect, parse_slots
from payflux.redis.steps import SharedRound
from payflux.redis.target import RedisTarget, node_target
from payflux.redis.txadapter import accepts_encoded, wait_for_connection

log = Logger()

DEFAULT_MAX_REDIRECTS = 16
DEFAULT_TRYAGAIN_DELAY = 0.05


class ClusterError(txredisapi.ResponseError):
    """Routing gave up (no slot owner known, too many redirections); the text starts with a Redis-like code."""


class ClusterClient:
    """
    A txredisapi-like handler for a Redis Cluster: ``execute_command(*args) -> Deferred`` routed
    by key (module docstring), ``disconnect()``.  ``connect_node(target)`` builds the lazy,
    reconnecting txredisapi pool of one member (``payflux.redis.connect.connect`` with this
    client's pool size and timeouts); a pool per master, created on first use.
    """

    cluster = True
    routes_encoded = True  # execute_command(Encoded(...), route_key=key): see StreamWriter._send

    def __init__(
        self,
        target: RedisTarget,
        connect_node: Callable[[RedisTarget], Any],
        reactor: Any = None,
        max_redirects: int = DEFAULT_MAX_REDIRECTS,
        tryagain_delay: float = DEFAULT_TRYAGAIN_DELAY,
        connect_timeout: float = 5.0,
    ) -> None:
        if not target.seeds:
            raise ValueError("a cluster target needs at least one seed address")
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.target = target
        self.reactor = reactor
        self.max_redirects = max_redirects
        self.tryagain_delay = tryagain_delay
        self.connect_timeout = connect_timeout
        self.slots = SlotTable()
        self._connect_node = connect_node
        self._nodes: dict[Address, Any] = {}
        self._refresh_round = SharedRound(lambda: defer.ensureDeferred(self._refresh()))
        self._closed = False
        self._waits: set[defer.Deferred] = set()  # callers waiting for a member's connection
        self.redirects = {"MOVED": 0, "ASK": 0, "TRYAGAIN": 0}  # followed so far (tests, logs)

    # -- nodes and the slot table ------------------------------------------------------------

    def node(self, addr: Address) -> Any:
        """The pool of the member at ``addr`` (created on first use)."""
        if self._closed:
            raise txredisapi.ConnectionError("cluster client is closed")
        pool = self._nodes.get(addr)
        if pool is None:
            pool = self._nodes[addr] = self._connect_node(node_target(self.target, addr))
        return pool

    def refresh(self) -> defer.Deferred:
        """Reload the slot table; concurrent callers share one CLUSTER SLOTS round."""
        return self._refresh_round.join()

    async def _refresh(self) -> None:
        candidates = list(dict.fromkeys([*self.slots.masters(), *self.target.seeds]))
        last: Exception | None = None
        for addr in candidates:
            try:
                reply = await (await self._connection(addr)).execute_command("CLUSTER", "SLOTS")
            except Exception as e:  # noqa: BLE001 - try the next member
                last = e
                continue
            owners = parse_slots(reply, addr[0])
            if not owners:
                last = ClusterError(f"CLUSTERDOWN {addr[0]}:{addr[1]} reports no slots")
                continue
            before = self.slots.masters()
            self.slots.load(owners)
            if self.slots.masters() != before:
                log.info("redis cluster: {count} masters {masters}", count=len(self.slots.masters()),
                         masters=", ".join(f"{h}:{p}" for h, p in self.slots.masters()))
            self._drop_unused()
            return
        raise txredisapi.ConnectionError(f"no cluster member answered CLUSTER SLOTS (last error: {last})")

    def _drop_unused(self) -> None:
        masters = set(self.slots.masters())
        for addr in [a for a in self._nodes if a not in masters and a not in self.target.seeds]:
            d = defer.maybeDeferred(self._nodes.pop(addr).disconnect)
            d.addErrback(lambda f, a=addr: log.debug("closing {h}:{p} failed: {e}", h=a[0], p=a[1],
                                                     e=f.getErrorMessage()))

    def _refresh_soon(self) -> None:
        self.refresh().addErrback(lambda f: log.debug("slot refresh failed: {e}", e=f.getErrorMessage()))

    async def _owner(self, slot: int) -> Address:
        addr = self.slots.owner(slot)
        if addr is None:
            await self.refresh()
            addr = self.slots.owner(slot)
            if addr is None:
                raise ClusterError(f"CLUSTERDOWN hash slot {slot} is not served by any known master")
        return addr

    # -- commands ------------------------------------------------------------------------------

    def execute_command(self, *args: Any, route_key: Any = None, **kwargs: Any) -> defer.Deferred:
        """
        Send ``args`` to the master owning its key.  ``route_key`` names the key for a command
        already RESP-encoded by PayFlux (``resp.Encoded``), which can't be parsed for one.
        """
        return defer.ensureDeferred(self._execute(args, route_key))

    async def _execute(self, args: Sequence[Any], route_key: Any = None) -> Any:
        key = route_key if route_key is not None else command_key(args)
        if key is None:
            return await self._keyless(args)
        slot = key_slot(key)
        asking: Address | None = None
        last = ""
        for _ in range(self.max_redirects + 1):
            addr = asking or await self._owner(slot)
            try:
                conn = await self._connection(addr)
                if route_key is not None:
                    accepts_encoded(conn)
                if asking is not None:
                    return await self._asking(conn, args)
                return await conn.execute_command(*args)
            except txredisapi.ResponseError as e:
                message = str(e)
                redirect = parse_redirect(message)
                code = redirect[0] if redirect is not None else message.split(" ", 1)[0]
                if code in self.redirects:
                    self.redirects[code] += 1
                if redirect is not None and redirect[0] == "MOVED":
                    self.slots.move(redirect[1], redirect[2])
                    self._refresh_soon()
                    asking = None
                elif redirect is not None:
                    asking = redirect[2]
                elif message.startswith("TRYAGAIN"):
                    asking = None
                    await _sleep(self.reactor, self.tryagain_delay)
                else:
                    raise
                last = message
            except Exception as e:
                if is_connection_failure(e):
                    self._refresh_soon()
                raise
        raise ClusterError(f"TRYAGAIN slot {slot}: still redirected after {self.max_redirects} tries ({last})")

    async def _connection(self, addr: Address) -> Any:
        """
        A live connection of the member at ``addr``, waiting at most ``connect_timeout`` for one:
        txredisapi would wait forever for a member that is down, and every caller (an append,
        a consumer's read, a shutdown waiting for either) must hear "down" instead.
        """
        return await wait_for_connection(self.node(addr), self.connect_timeout, self.reactor, self._waits,
                                         f"redis cluster member {addr[0]}:{addr[1]} is not reachable")

    async def _asking(self, conn: Any, args: Sequence[Any]) -> Any:
        # ASKING only lasts for the next command on the same connection: send both on one.
        asking = conn.execute_command("ASKING")
        reply = conn.execute_command(*args)
        await asking
        return await reply

    async def _keyless(self, args: Sequence[Any]) -> Any:
        if not self.slots.loaded:
            await self.refresh()
        masters = self.slots.masters()
        if command_name(args[0]) not in BROADCAST:
            return await (await self._connection(random.choice(masters))).execute_command(*args)

        async def one(addr: Address) -> Any:
            return await (await self._connection(addr)).execute_command(*args)

        replies = await defer.gatherResults(
            [defer.ensureDeferred(one(a)) for a in masters], consumeErrors=True
        ).addErrback(lambda f: f.value.subFailure if f.check(defer.FirstError) else f)
        return replies[0]

    def disconnect(self) -> defer.Deferred:
        self._closed = True
        for waiting in list(self._waits):
            if not waiting.called:
                waiting.errback(txredisapi.ConnectionError("cluster client is closed"))
        nodes, self._nodes = self._nodes, {}
        return defer.DeferredList([n.disconnect() for n in nodes.values()], consumeErrors=True)

    def partition_owners(self, keys: Iterable[str]) -> dict[str, Address | None]:
        """Which master serves each key now (for logs, the CLI and tests)."""
        return {k: self.slots.owner(key_slot(k)) for k in keys}


def _sleep(reactor: Any, seconds: float) -> defer.Deferred:
    d: defer.Deferred = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d
