"""
The one module that touches txredisapi's internals (middle layer of :mod:`payflux.redis`).

txredisapi's public surface (``lazyConnectionPool``, ``execute_command``, ``disconnect``, its
exception types) is used everywhere; what it does not offer PayFlux does here, and only here, so
a txredisapi upgrade that moves any of it breaks one file (and ``tests/test_architecture.py``
fails when a private name is used anywhere else):

- :func:`lazy_pool` / :func:`tune_factory` — a pool with a capped reconnect backoff (the
  factory's ``maxDelay``/``initialDelay``), a protocol of our own, and refusal reporting
  (:func:`_report_refusal`: the factory's ``deferred``, ``isLazy``, ``connectionQueue``);
- :func:`sentinel_factory` — a pool whose connections come from an endpoint of ours
  (``RedisFactory.startConnecting``), and :func:`pooled_connections`;
- :func:`peek_connection` / :func:`wait_for_connection` — a pooled connection itself (the
  factory's ``getConnection(peek=True)``), so a caller can bound its wait and send on one
  connection;
- :func:`accepts_encoded` — a connection that sends PayFlux's own RESP bytes (wraps
  ``_build_command``);
- :func:`decoding_protocol` — hiredis decoding replies to ``str`` itself (the protocol's
  ``_reader``);
- :func:`close_pool`, :func:`fail_waiting_commands`, :class:`ConnectionWatch` — bounded closing
  and readable connection state (the factory's ``pool``, ``slots`` and their ``ClientService``).
"""

from __future__ import annotations

from typing import Any

import txredisapi
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from payflux.redis.replies import describe_connect_failure
from payflux.redis.resp import Encoded
from payflux.redis.target import PoolOptions, RedisTarget, tls_options

_log = Logger()


def lazy_pool(target: RedisTarget, options: PoolOptions) -> Any:
    """
    A lazy txredisapi pool handler for a single-node ``target`` (``redis://``, ``rediss://``,
    ``unix://``), reconnecting forever with a backoff capped at ``options.max_retry_delay``.

    ``convertNumbers`` is off: bulk replies are ``str`` (utf-8), never guessed into ints (an
    all-digit event id stays a string).  Note: while Redis is down, a txredisapi handler waits
    *forever* for a pooled connection; callers on a request path bound their own operations.
    """
    common: dict[str, Any] = dict(
        dbid=target.db or None,
        poolsize=options.poolsize,
        reconnect=True,
        password=target.password,
        username=target.username,
        connectTimeout=options.connect_timeout,
        replyTimeout=options.reply_timeout,
        convertNumbers=False,
    )
    if target.scheme == "unix":
        handler = txredisapi.lazyUnixConnectionPool(path=target.path, **common)
    else:
        handler = txredisapi.lazyConnectionPool(
            host=target.host,
            port=target.port,
            ssl_context_factory=tls_options(target) if target.tls else False,
            **common,
        )
    factory = getattr(handler, "_factory", None)
    if factory is not None:
        tune_factory(factory, target, options.max_retry_delay, options.protocol)
    return handler


def sentinel_factory(target: RedisTarget, options: PoolOptions, handler: type, protocol: Any, endpoint: Any) -> Any:
    """
    A lazy pool (``handler``, a ``txredisapi.ConnectionHandler`` subclass) whose every
    (re)connection goes through ``endpoint`` (``endpoint.factory`` is set to the factory), with
    ``protocol`` (``options.protocol`` wrapped by the caller) for its connections.
    """
    factory = txredisapi.RedisFactory(
        target.redacted(), target.db or None, options.poolsize, isLazy=True, handler=handler,
        password=target.password, replyTimeout=options.reply_timeout, convertNumbers=False, username=target.username,
    )
    tune_factory(factory, target, options.max_retry_delay, protocol)  # as every other pool
    endpoint.factory = factory
    factory.handler.endpoint = endpoint
    factory.startConnecting(endpoint)
    return factory.handler


def pooled_connections(factory: Any) -> list[Any]:
    """The connections a txredisapi factory holds now."""
    return list(getattr(factory, "pool", ()))


def peek_connection(handler: Any) -> defer.Deferred:
    """
    One live connection of ``handler``'s pool (it stays in the pool), or ``handler`` itself when
    it is a single connection: the caller sends on it only if it still wants to once it fires.
    """
    factory = getattr(handler, "_factory", None)
    if factory is None:
        return defer.succeed(handler)
    return factory.getConnection(peek=True)


async def wait_for_connection(handler: Any, timeout: float, reactor: Any, waits: set, unreachable: str) -> Any:
    """
    :func:`peek_connection`, waiting at most ``timeout``: txredisapi would wait forever for a
    member that is down, and every caller must hear "down" (``ConnectionError(unreachable)``)
    instead.  ``waits`` holds the waits in progress, so a closing client can fail them.
    """
    if getattr(handler, "_factory", None) is None:  # already a single connection
        return handler
    waiting = peek_connection(handler)
    if waiting.called:
        return await waiting
    result: defer.Deferred = defer.Deferred()
    waiting.addBoth(lambda r: None if result.called else result.callback(r))
    timer = reactor.callLater(timeout, lambda: result.called or result.errback(txredisapi.ConnectionError(unreachable)))
    waits.add(result)
    try:
        outcome = await result
    finally:
        waits.discard(result)
        if timer.active():
            timer.cancel()
    if isinstance(outcome, Failure):
        outcome.raiseException()
    return outcome


def accepts_encoded(conn: Any) -> bool:
    """
    Teach one txredisapi connection to send :class:`~payflux.redis.resp.Encoded` commands as
    they are.

    ``execute_command`` builds its bytes with ``self._build_command(*args)`` and then does all
    the bookkeeping we need (reply queue, reply timeout, pipelining); wrapping
    ``_build_command`` on the instance keeps all of it.  False for connections without it (test
    doubles): they get plain args.
    """
    build = getattr(conn, "_build_command", None)
    if build is None:
        return False
    if getattr(build, "payflux_encoded", False):
        return True

    def build_command(*args: Any, **kwargs: Any) -> bytes:
        if len(args) == 1 and type(args[0]) is Encoded:
            return args[0].data
        return build(*args, **kwargs)

    build_command.payflux_encoded = True  # type: ignore[attr-defined]
    conn._build_command = build_command
    return True


def decoding_protocol() -> Any:
    """
    A txredisapi protocol whose hiredis reader decodes replies to ``str`` itself, instead of
    txredisapi's per-element Python walk (about 2x a consumer's read rate); None without hiredis.
    """
    if txredisapi.hiredis is None:
        return None

    class DecodingHiredisProtocol(txredisapi.HiredisProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._reader = txredisapi.hiredis.Reader(
                protocolError=txredisapi.InvalidData, replyError=txredisapi.ResponseError,
                encoding="utf-8", errors="replace",
            )

        def tryConvertData(self, data: Any) -> Any:
            return data  # already str (or int/None/list of those) from hiredis

    return DecodingHiredisProtocol


def tune_factory(factory: Any, target: RedisTarget, max_retry_delay: float, protocol: Any = None) -> None:
    """
    What every PayFlux pool's txredisapi factory gets: a reconnect backoff capped at
    ``max_retry_delay`` (RedisFactory's default grows to 10 s; a payment gateway wants to notice a
    restarted Redis within a couple of seconds), ``protocol`` if given, and refusal reporting.
    """
    factory.maxDelay = max_retry_delay
    factory.initialDelay = min(factory.initialDelay, max_retry_delay / 4)
    if protocol is not None:
        factory.protocol = protocol
    _report_refusal(factory, target)


def _report_refusal(factory: Any, target: RedisTarget) -> None:
    """
    When Redis refuses the pool's AUTH or SELECT (wrong password, unknown ACL user, bad db):
    log it once, naming the redacted target, and fail every command waiting for a connection.

    txredisapi then stops reconnecting for good, and commands issued before the refusal would
    wait forever for a pooled connection (a sampler waiting so would hang the node's stop).  It
    would also log the refusal once per pooled connection; ``isLazy`` only gates those log
    lines and, with ``reconnect=True`` (always, here), nothing else.
    """
    refused = getattr(factory, "deferred", None)
    if refused is None:
        return
    factory.isLazy = False

    def on_refusal(failure: Any) -> None:
        reason = failure.getErrorMessage().removeprefix("Redis error: ")
        if reason.endswith("Lost connection"):
            # not a refusal: Redis went away in the middle of AUTH/SELECT, and txredisapi
            # stops reconnecting all the same
            _log.error("Redis at {redis} closed the connection during AUTH/SELECT ({reason}); this pool "
                       "no longer reconnects: restart PayFlux once Redis is back (until then 503)",
                       redis=target.redacted(), reason=reason)
        else:
            _log.error(
                "Redis at {redis} refused PayFlux: {reason}; fix the credentials (redis_url / "
                "redis_password_file) and restart: until then ingest and /ready answer 503",
                redis=target.redacted(), reason=reason,
            )
        fail_waiting_commands(factory, f"Redis refused PayFlux: {reason}")

    refused.addErrback(on_refusal)


def factories_of(handler: Any) -> list[Any]:
    """The txredisapi factories behind a handler ``connect`` returned (one per master for a cluster)."""
    factory = getattr(handler, "__dict__", {}).get("_factory")  # a ConnectionHandler's __getattr__ makes commands
    if factory is not None:
        return [factory]
    nodes = getattr(handler, "__dict__", {}).get("_nodes") or {}
    return [f for node in nodes.values() for f in factories_of(node)]


def fail_waiting_commands(factory: Any, reason: str) -> int:
    """
    Errback every command of ``factory`` that waits for a pooled connection (with
    ``txredisapi.ConnectionError(reason)``); returns how many there were.  Such a command would
    otherwise wait forever once the pool stops reconnecting.
    """
    queue = factory.connectionQueue
    waiting, queue.waiting = list(queue.waiting), []
    peekers, queue.peekers = list(getattr(queue, "peekers", [])), []
    for d in waiting + peekers:
        if not d.called:
            d.errback(txredisapi.ConnectionError(reason))
    return len(waiting) + len(peekers)


def close_pool(handler: Any, timeout: float, reactor: Any = None, what: str = "Redis") -> defer.Deferred:
    """
    ``handler.disconnect()``, bounded: stop (re)connecting, fail the commands still waiting for a
    connection, close the connections, and fire within ``timeout`` seconds whatever Redis does.

    txredisapi's own ``disconnect()`` waits until every connection is closed, and a connection
    to a paused Redis with unsent commands closes only once they are written, i.e. never; after
    ``timeout`` such connections are aborted, logged, and this fires anyway.  Never errbacks.
    """
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    factories = factories_of(handler)
    closing = defer.maybeDeferred(handler.disconnect)
    failed = sum(fail_waiting_commands(f, f"{what} is closed (stopping)") for f in factories)
    if failed:
        _log.info("closing {what}: failed {n} commands still waiting for a connection", what=what, n=failed)
    done: defer.Deferred = defer.Deferred()

    def finished(result: Any) -> None:
        if isinstance(result, Failure):
            _log.warn("closing {what} failed: {reason}", what=what, reason=result.getErrorMessage())
        if timer.active():
            timer.cancel()
        if not done.called:
            done.callback(None)

    def give_up() -> None:
        aborted = 0
        for factory in factories:
            transports = [getattr(c, "transport", None) for c in list(getattr(factory, "pool", ()))]
            transports += [getattr(getattr(s, "protocol", None), "transport", None) for s in getattr(factory, "slots", ())]
            for transport in {id(t): t for t in transports if t is not None}.values():
                abort = getattr(transport, "abortConnection", None) or transport.loseConnection
                abort()
                aborted += 1
        _log.warn("closing {what}: connections still open after {t:g}s (Redis not answering); aborted {n} "
                  "of them and carried on", what=what, t=timeout, n=aborted)
        if not done.called:
            done.callback(None)

    timer = reactor.callLater(max(timeout, 0.0), give_up)
    closing.addBoth(finished)
    return done


class ConnectionWatch:
    """
    The outcome of a pool's connection attempts, for readable readiness answers: ``failure`` is
    why the latest attempt failed ("connection refused", ...) or "connection lost,
    reconnecting", None while connected or before the first attempt ended.  Watches the first pool slot (all slots dial the same address)
    through ClientService's public ``whenConnected(failAfterFailures=1)``.
    """

    def __init__(self, factory: Any, reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.reactor = reactor
        self.failure: str | None = None
        self.connected = False
        slots = list(getattr(factory, "slots", ()))
        if slots and hasattr(slots[0], "service"):
            self._arm(slots[0])

    @classmethod
    def of(cls, handler: Any, reactor: Any = None) -> "ConnectionWatch | None":
        """A watch of ``handler``'s pool; None for a cluster client (several pools)."""
        nodes = getattr(handler, "__dict__", {}).get("_nodes")
        factories = factories_of(handler)
        return cls(factories[0], reactor) if factories and nodes is None else None

    def _arm(self, slot: Any) -> None:
        d = slot.service.whenConnected(failAfterFailures=1)
        d.addCallbacks(self._connected, self._failed, callbackArgs=(slot,), errbackArgs=(slot,))

    def _connected(self, protocol: Any, slot: Any) -> None:
        self.failure, self.connected = None, True
        lost = getattr(protocol, "whenDisconnected", None)
        if lost is not None:
            lost().addBoth(lambda _: self._lost(slot))

    def _lost(self, slot: Any) -> None:
        self.connected = False
        self.failure = "connection lost, reconnecting"
        # called from inside ClientService's state change: look again once it is done
        self.reactor.callLater(0, self._arm, slot)

    def _failed(self, failure: Any, slot: Any) -> None:
        self.connected = False
        if failure.check(defer.CancelledError):
            return None  # the slot stopped: nothing more to watch
        self.failure = describe_connect_failure(failure)
        self.reactor.callLater(0, self._arm, slot)
        return None
