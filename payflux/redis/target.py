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
  (payflux/redis/cluster.py); ``rediss+cluster://`` the same over TLS (``?ca_file=`` as above).
  No database number: a cluster has only database 0.
- ``redis+sentinel://[[user]:password@]host:port[,host:port...]/<master-name>[?db=N&sentinel_password=...
  &sentinel_username=...]`` a primary found through Redis Sentinel: the listed sentinels are asked
  ``SENTINEL get-master-addr-by-name <master-name>`` and PayFlux follows a failover to the new
  primary (payflux/redis/sentinel.py).  user/password are the data nodes' credentials,
  ``sentinel_password`` (and ``sentinel_username``) the sentinels' own.  Every sentinel needs an
  explicit port.  ``rediss+sentinel://`` speaks TLS to sentinels and primary (``?ca_file=``).

User names and passwords may be percent-encoded. The password never appears
in ``repr``/``str`` of a RedisTarget; log ``target.redacted()``.

This is the bottom layer of :mod:`payflux.redis` (docs/architecture.md): no I/O, no
txredisapi; every client (async pool, cluster, sentinel, the CLI's blocking one) starts from a
``RedisTarget``.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit, urlunsplit

import attrs

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


@attrs.frozen
class PoolOptions:
    """How a pool connects (the "how" beside a target's "where"): the same for every topology."""

    poolsize: int
    connect_timeout: float
    reply_timeout: float | None
    max_retry_delay: float = 2.0  # reconnect backoff cap, seconds
    protocol: Any = None  # a txredisapi protocol class; None = txredisapi's default


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




Address = tuple[str, int]


def node_target(target: RedisTarget, addr: Address) -> RedisTarget:
    """The single-node target for one cluster member: same credentials and TLS settings."""
    return attrs.evolve(target, scheme="rediss" if target.tls else "redis", host=addr[0], port=addr[1], seeds=())


def sentinel_node_target(target: RedisTarget, addr: Address) -> RedisTarget:
    """How to talk to the sentinel at ``addr``: its own credentials, same TLS settings, no database."""
    return RedisTarget(
        scheme="rediss" if target.tls else "redis",
        host=addr[0],
        port=addr[1],
        username=target.sentinel_username,
        password=target.sentinel_password,
        ca_file=target.ca_file,
    )


def primary_target(target: RedisTarget, addr: Address) -> RedisTarget:
    """The single-node target of the primary at ``addr``: the URL's credentials, database and TLS."""
    return attrs.evolve(
        target, scheme="rediss" if target.tls else "redis", host=addr[0], port=addr[1], seeds=(),
        master_name=None, sentinel_username=None, sentinel_password=None,
    )
