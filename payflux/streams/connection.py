"""
Redis URLs and connection pools.

``parse_redis_url`` accepts exactly these forms (anything else is a
``ValueError`` with a one-line message suitable for "invalid config" output):

- ``redis://[[user]:password@]host[:port][/db]``   plain TCP, port 6379 by default
- ``rediss://[[user]:password@]host[:port][/db][?ca_file=/path.pem]``
  TLS with certificate and hostname verification against the platform trust
  store, or against ``ca_file`` when given
- ``unix:///path/to.sock[?db=N&password=...&username=...]``
- ``redis+cluster://[[user]:password@]host:port[,host:port...]`` a Redis Cluster: the listed
  members are seeds for ``CLUSTER SLOTS``, commands go to the master owning their key's slot
  (payflux/streams/cluster.py); ``rediss+cluster://`` the same over TLS (``?ca_file=`` as above).
  No database number: a cluster has only database 0.
- ``redis+sentinel://[[user]:password@]host:port[,host:port...]/<master-name>[?db=N&sentinel_password=...
  &sentinel_username=...]`` a primary found through Redis Sentinel: the listed sentinels are asked
  ``SENTINEL get-master-addr-by-name <master-name>`` and PayFlux follows a failover to the new
  primary (payflux/streams/sentinel.py).  user/password are the data nodes' credentials,
  ``sentinel_password`` (and ``sentinel_username``) the sentinels' own.  Every sentinel needs an
  explicit port.  ``rediss+sentinel://`` speaks TLS to sentinels and primary (``?ca_file=``).

User names and passwords may be percent-encoded. The password never appears
in ``repr``/``str`` of a RedisTarget; log ``target.redacted()``.

``connect`` builds a lazy, reconnecting txredisapi pool.  Note: while Redis is
down, a txredisapi handler waits *forever* for a pooled connection; callers
on a request path must bound their own operations (StreamWriter does).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit, urlunsplit

import attrs
import txredisapi
from twisted.internet import defer, error as terror
from twisted.logger import Logger
from twisted.python.failure import Failure

_log = Logger()

DEFAULT_PORT = 6379


@attrs.frozen
class RedisTarget:
    """Where and how to connect; ``password`` is kept out of repr/str."""

    scheme: str  # "redis", "rediss", "unix", "redis+cluster" or "rediss+cluster"
    host: str | None = None
    port: int | None = None
    path: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = attrs.field(default=None, repr=False)
    ca_file: str | None = None
    seeds: tuple[tuple[str, int], ...] = ()  # cluster members to ask for the slot table; or the sentinels
    master_name: str | None = None  # sentinel targets: the monitored primary's name
    sentinel_username: str | None = None
    sentinel_password: str | None = attrs.field(default=None, repr=False)

    @property
    def tls(self) -> bool:
        return self.scheme in ("rediss", "rediss+cluster", "rediss+sentinel")

    @property
    def cluster(self) -> bool:
        return self.scheme.endswith("+cluster")

    @property
    def sentinel(self) -> bool:
        return self.scheme.endswith("+sentinel")

    def redacted(self) -> str:
        """The target as a URL with the password replaced by ``***`` (for logs)."""
        if self.scheme == "unix":
            params = [f"db={self.db}"]
            if self.username:
                params.append(f"username={self.username}")
            if self.password is not None:
                params.append("password=***")
            return f"unix://{self.path}?{'&'.join(params)}"
        auth = ""
        if self.password is not None:
            auth = f"{self.username or ''}:***@"
        elif self.username:
            auth = f"{self.username}@"
        extra = f"?ca_file={self.ca_file}" if self.ca_file else ""
        if self.sentinel:
            params = [f"db={self.db}"]
            if self.sentinel_username:
                params.append(f"sentinel_username={self.sentinel_username}")
            if self.sentinel_password is not None:
                params.append("sentinel_password=***")
            if self.ca_file:
                params.append(f"ca_file={self.ca_file}")
            hosts = ",".join(_hostport(h, p) for h, p in self.seeds)
            return f"{self.scheme}://{auth}{hosts}/{self.master_name}?{'&'.join(params)}"
        if self.cluster:
            return f"{self.scheme}://{auth}{','.join(_hostport(h, p) for h, p in self.seeds)}{extra}"
        return f"{self.scheme}://{auth}{_hostport(self.host, self.port)}/{self.db}{extra}"

    def __str__(self) -> str:
        return self.redacted()


def _hostport(host: str | None, port: int | None) -> str:
    return f"[{host}]:{port}" if host and ":" in host else f"{host}:{port}"


def _parse_db(raw: str, url_for_error: str) -> int:
    if not raw.isdigit():
        raise ValueError(f"invalid Redis URL {url_for_error}: database must be a non-negative integer, got {raw!r}")
    return int(raw)


def _single(query: dict[str, list[str]], name: str, url_for_error: str) -> str | None:
    values = query.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise ValueError(f"invalid Redis URL {url_for_error}: {name} given more than once")
    return values[0]


def parse_redis_url(url: str) -> RedisTarget:
    """Parse a Redis URL (see module docstring) or raise ValueError naming the problem."""
    if not isinstance(url, str) or not url.strip():
        raise ValueError("invalid Redis URL: empty")
    try:
        parts = urlsplit(url.strip())
    except ValueError as e:
        raise ValueError(f"invalid Redis URL: {e}") from None
    scheme = parts.scheme.lower()
    # what we show in errors: never the password
    shown = f"{scheme}://{parts.hostname or ''}{parts.path}" if scheme else "(no scheme)"
    try:
        query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError:
        raise ValueError(f"invalid Redis URL {shown}: malformed query string") from None
    if parts.fragment:
        raise ValueError(f"invalid Redis URL {shown}: unexpected fragment")

    if scheme == "unix":
        if parts.netloc:
            raise ValueError(f"invalid Redis URL {shown}: use unix:///absolute/path.sock (three slashes)")
        if not parts.path.startswith("/") or parts.path == "/":
            raise ValueError(f"invalid Redis URL {shown}: unix socket path must be absolute")
        unknown = set(query) - {"db", "password", "username"}
        if unknown:
            raise ValueError(f"invalid Redis URL {shown}: unknown parameter(s) {', '.join(sorted(unknown))}")
        db_raw = _single(query, "db", shown)
        return RedisTarget(
            scheme="unix",
            path=unquote(parts.path),
            db=_parse_db(db_raw, shown) if db_raw is not None else 0,
            username=_single(query, "username", shown) or None,
            password=_single(query, "password", shown),
        )

    if scheme in ("redis+cluster", "rediss+cluster"):
        return _parse_cluster(scheme, parts, query, shown)
    if scheme in ("redis+sentinel", "rediss+sentinel"):
        return _parse_sentinel(scheme, parts, query)
    if scheme not in ("redis", "rediss"):
        raise ValueError(
            f"invalid Redis URL {shown}: scheme must be redis://, rediss://, unix://, redis+cluster:// "
            "or redis+sentinel://"
        )
    if not parts.hostname:
        raise ValueError(f"invalid Redis URL {shown}: missing host")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"invalid Redis URL {shown}: port must be an integer in 1-65535") from None
    if port is None:
        if parts.netloc.rsplit("@", 1)[-1].endswith(":"):
            raise ValueError(f"invalid Redis URL {shown}: empty port")
        port = DEFAULT_PORT
    if not 1 <= port <= 65535:
        raise ValueError(f"invalid Redis URL {shown}: port must be an integer in 1-65535")
    path = parts.path.strip("/")
    if "/" in path:
        raise ValueError(f"invalid Redis URL {shown}: path must be /<db>")
    db = _parse_db(path, shown) if path else 0
    allowed = {"ca_file"} if scheme == "rediss" else set()
    unknown = set(query) - allowed
    if unknown:
        raise ValueError(f"invalid Redis URL {shown}: unknown parameter(s) {', '.join(sorted(unknown))}")
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    return RedisTarget(
        scheme=scheme,
        host=parts.hostname,
        port=port,
        db=db,
        username=username,
        password=password,
        ca_file=_single(query, "ca_file", shown),
    )


def url_with_password(url: str, password: str) -> str:
    """
    ``url`` with ``password`` put in (percent-encoded), for a password read from a file
    (``redis_password_file``).  The URL must not carry a password already (ValueError, without
    the password in the message).  The user name, if any, stays.
    """
    target = parse_redis_url(url)
    if target.password is not None:
        raise ValueError("the Redis URL already carries a password; give it in one place only")
    parts = urlsplit(url.strip())
    if target.scheme == "unix":
        query = f"{parts.query}&" if parts.query else ""
        return f"unix://{parts.path}?{query}password={quote(password, safe='')}"
    userinfo, _, hosts = parts.netloc.rpartition("@")
    netloc = f"{userinfo}:{quote(password, safe='')}@{hosts}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))


def _host_list(hosts: str, shown: str, what: str) -> list[tuple[str, int]]:
    """``host:port[,host:port...]`` (``[v6]:port`` too); every member needs its port."""
    seeds: list[tuple[str, int]] = []
    for item in hosts.split(","):
        item = item.strip()
        if item.startswith("["):
            host, _, rest = item[1:].partition("]")
            port_text = rest[1:] if rest.startswith(":") else ""
        else:
            host, _, port_text = item.rpartition(":")
        if not host:
            raise ValueError(f"invalid Redis URL {shown}: each {what} must be host:port")
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise ValueError(f"invalid Redis URL {shown}: port of {host} must be an integer in 1-65535")
        seeds.append((host, int(port_text)))
    return seeds


def _parse_sentinel(scheme: str, parts: Any, query: dict[str, list[str]]) -> RedisTarget:
    """``redis+sentinel://[[user]:password@]host:port[,host:port...]/<master-name>[?db=N&...]``."""
    userinfo, at, hosts = parts.netloc.rpartition("@")
    shown = f"{scheme}://{hosts}{parts.path}"
    seeds = _host_list(hosts, shown, "sentinel")
    name = unquote(parts.path.strip("/"))
    if not name or "/" in name or any(c.isspace() for c in name):
        raise ValueError(f"invalid Redis URL {shown}: path must be /<master-name> (the name sentinels monitor)")
    allowed = {"db", "sentinel_password", "sentinel_username"} | ({"ca_file"} if scheme == "rediss+sentinel" else set())
    unknown = set(query) - allowed
    if unknown:
        raise ValueError(f"invalid Redis URL {shown}: unknown parameter(s) {', '.join(sorted(unknown))}")
    db_raw = _single(query, "db", shown)
    username, password = _userinfo(userinfo) if at else (None, None)
    return RedisTarget(
        scheme=scheme,
        host=seeds[0][0],
        port=seeds[0][1],
        db=_parse_db(db_raw, shown) if db_raw is not None else 0,
        username=username,
        password=password,
        ca_file=_single(query, "ca_file", shown),
        seeds=tuple(dict.fromkeys(seeds)),
        master_name=name,
        sentinel_username=_single(query, "sentinel_username", shown) or None,
        sentinel_password=_single(query, "sentinel_password", shown),
    )


def _userinfo(userinfo: str) -> tuple[str | None, str | None]:
    """(username, password) of a URL's ``user:password`` part, percent-decoded; empty user = None."""
    user, colon, secret = userinfo.partition(":")
    return unquote(user) or None, unquote(secret) if colon else None


def _parse_cluster(scheme: str, parts: Any, query: dict[str, list[str]], shown: str) -> RedisTarget:
    """``redis+cluster://[[user]:password@]host:port[,host:port...]`` (``rediss+cluster`` for TLS)."""
    shown = f"{scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"
    userinfo, at, hosts = parts.netloc.rpartition("@")
    if parts.path.strip("/"):
        raise ValueError(f"invalid Redis URL {shown}: a cluster has no database number (only database 0)")
    seeds = _host_list(hosts, shown, "cluster member")
    allowed = {"ca_file"} if scheme == "rediss+cluster" else set()
    unknown = set(query) - allowed
    if unknown:
        raise ValueError(f"invalid Redis URL {shown}: unknown parameter(s) {', '.join(sorted(unknown))}")
    username, password = _userinfo(userinfo) if at else (None, None)
    return RedisTarget(
        scheme=scheme,
        host=seeds[0][0],
        port=seeds[0][1],
        username=username,
        password=password,
        ca_file=_single(query, "ca_file", shown),
        seeds=tuple(dict.fromkeys(seeds)),
    )


def tls_options(target: RedisTarget) -> Any:
    """A verifying TLS client connection creator for a rediss:// target."""
    from twisted.internet import ssl

    trust_root = None
    if target.ca_file:
        with open(target.ca_file, "rb") as f:
            trust_root = ssl.Certificate.loadPEM(f.read())
    assert target.host is not None
    return ssl.optionsForClientTLS(target.host, trustRoot=trust_root)


def connect(
    target: RedisTarget,
    poolsize: int,
    connect_timeout: float,
    reply_timeout: float | None,
    max_retry_delay: float = 2.0,
    protocol: Any = None,
) -> Any:
    """
    A lazy txredisapi pool handler for ``target``, reconnecting forever; for a cluster target a
    :class:`payflux.streams.cluster.ClusterClient` with one such pool per master; for a sentinel
    target a pool whose every (re)connection asks the sentinels where the primary is
    (:func:`payflux.streams.sentinel.connect_sentinel`).

    ``convertNumbers`` is off: bulk replies are ``str`` (utf-8), never guessed
    into ints (an all-digit event id stays a string).  Reconnect backoff is
    capped at ``max_retry_delay`` seconds so the gateway is back soon after
    Redis is.  Close with ``handler.disconnect()``.
    """
    if target.sentinel:
        from payflux.streams.sentinel import connect_sentinel

        return connect_sentinel(target, poolsize, connect_timeout, reply_timeout, max_retry_delay, protocol)
    if target.cluster:
        from payflux.streams.cluster import ClusterClient

        return ClusterClient(
            target,
            lambda node: connect(node, poolsize, connect_timeout, reply_timeout, max_retry_delay, protocol),
            connect_timeout=connect_timeout,
        )
    common: dict[str, Any] = dict(
        dbid=target.db or None,
        poolsize=poolsize,
        reconnect=True,
        password=target.password,
        username=target.username,
        connectTimeout=connect_timeout,
        replyTimeout=reply_timeout,
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
        tune_factory(factory, target, max_retry_delay, protocol)
    return handler


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
        queue = factory.connectionQueue
        waiting, queue.waiting = list(queue.waiting), []
        peekers, queue.peekers = list(getattr(queue, "peekers", [])), []
        for d in waiting + peekers:
            d.errback(txredisapi.ConnectionError(f"Redis refused PayFlux: {reason}"))

    refused.addErrback(on_refusal)


def _factories_of(handler: Any) -> list[Any]:
    """The txredisapi factories behind a handler ``connect`` returned (one per master for a cluster)."""
    factory = getattr(handler, "__dict__", {}).get("_factory")  # a ConnectionHandler's __getattr__ makes commands
    if factory is not None:
        return [factory]
    nodes = getattr(handler, "__dict__", {}).get("_nodes") or {}
    return [f for node in nodes.values() for f in _factories_of(node)]


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
    factories = _factories_of(handler)
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


def describe_connect_failure(failure: Any) -> str:
    """A connection attempt's failure as a person reads it: "connection refused", "timed out"..."""
    if failure.check(terror.ConnectionRefusedError):
        return "connection refused"
    if failure.check(terror.TimeoutError, terror.TCPTimedOutError):
        return "connection attempt timed out"
    if failure.check(terror.DNSLookupError):
        return "host name not found"
    if failure.check(terror.NoRouteError):
        return "no route to host"
    message = failure.getErrorMessage().strip().rstrip(".")
    return message or failure.type.__name__


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
        factories = _factories_of(handler)
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
