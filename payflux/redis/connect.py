"""
Opening Redis, whatever the URL says (top layer of :mod:`payflux.redis`).

:func:`connect` gives the daemon's async handler (``execute_command(*args) -> Deferred``,
``disconnect()``) and :func:`open_sync` the CLI's blocking client, for every topology the URL
grammar (:mod:`payflux.redis.target`) names: a single node, a Redis Cluster, a primary found
through Sentinel.  A new topology is a new middle-layer module and one branch here.
"""

from __future__ import annotations

from typing import Any

from payflux.redis.cluster import ClusterClient
from payflux.redis.sentinel import connect_sentinel
from payflux.redis.sync import SyncClient, open_target
from payflux.redis.target import PoolOptions, RedisTarget, parse_redis_url
from payflux.redis.txadapter import lazy_pool


def connect(
    target: RedisTarget,
    poolsize: int,
    connect_timeout: float,
    reply_timeout: float | None,
    max_retry_delay: float = 2.0,
    protocol: Any = None,
) -> Any:
    """
    A lazy txredisapi pool handler for ``target``, reconnecting forever
    (:func:`payflux.redis.txadapter.lazy_pool`); for a cluster target a
    :class:`payflux.redis.cluster.ClusterClient` with one such pool per master; for a sentinel
    target a pool whose every (re)connection asks the sentinels where the primary is
    (:func:`payflux.redis.sentinel.connect_sentinel`).

    Reconnect backoff is capped at ``max_retry_delay`` seconds so the gateway is back soon after
    Redis is.  Close with ``handler.disconnect()`` (bounded: :func:`payflux.redis.txadapter.close_pool`).
    """
    options = PoolOptions(poolsize, connect_timeout, reply_timeout, max_retry_delay, protocol)
    if target.sentinel:
        return connect_sentinel(target, options)
    if target.cluster:
        return ClusterClient(target, lambda node: lazy_pool(node, options), connect_timeout=connect_timeout)
    return lazy_pool(target, options)


def open_sync(url: str, timeout: float = 5.0) -> SyncClient:
    """
    The CLI's blocking client for ``url`` (any topology; :mod:`payflux.redis.sync`).  Raises
    ValueError for a bad URL, :class:`payflux.redis.sync.RedisConnectionError` when Redis can't
    be reached, :class:`payflux.redis.sync.RedisReplyError` when it refuses AUTH/SELECT.
    """
    return open_target(parse_redis_url(url), timeout)
