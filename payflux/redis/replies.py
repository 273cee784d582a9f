"""
What Redis's answers and failures mean (bottom layer of :mod:`payflux.redis`): pure functions.

- :func:`outage_reason` / :func:`is_outage` — the one place that decides "Redis is unreachable,
  not answering or refusing to serve right now" (a 503, a retry on the next loop step) apart from
  a bug: a lost or refused connection, a reply timeout, an error reply with an availability code
  (:data:`UNAVAILABLE_CODES`: LOADING, READONLY, CLUSTERDOWN, ...), or :class:`RedisUnavailable`.
  :func:`is_connection_failure` is the connection half of it (the cluster client refreshes its
  slot table on one).
- :func:`is_noscript` — the ``NOSCRIPT`` reply of an ``EVALSHA`` whose script the server does not
  hold (after a restart or ``SCRIPT FLUSH``); :mod:`payflux.redis.scripts` reloads on it.
- :func:`describe_connect_failure` — a failed connection attempt as a person reads it.
- :func:`parse_master_reply`, :func:`is_primary` — Sentinel's and ``ROLE``'s replies.
"""

from __future__ import annotations

import re
from typing import Any

import txredisapi
from twisted.internet import defer, error as terror
from twisted.python.failure import Failure

Address = tuple[str, int]


class RedisUnavailable(Exception):
    """Redis could not take the command in time or refused it (HTTP 503); str() says why."""


# Error replies that mean "Redis can't serve right now" rather than a bug.
UNAVAILABLE_CODES = re.compile(
    r"(?:^|[\s:\-])(OOM|READONLY|MISCONF|LOADING|BUSY|MASTERDOWN|NOREPLICAS|TRYAGAIN|CLUSTERDOWN)\b"
)

CONNECTION_ERRORS = (
    txredisapi.ConnectionError,  # includes txredisapi.TimeoutError (no reply in time)
    defer.TimeoutError,
    terror.ConnectError,
    terror.ConnectionLost,
    terror.ConnectionDone,
    terror.TimeoutError,
)


def _value(failure: Failure | BaseException) -> BaseException:
    return failure.value if isinstance(failure, Failure) else failure


def is_connection_failure(failure: Failure | BaseException) -> bool:
    """True for a lost, refused or timed-out connection (the command may or may not have run)."""
    return isinstance(_value(failure), CONNECTION_ERRORS)


def outage_reason(failure: Failure | BaseException, what: str = "the command") -> str | None:
    """
    Why ``failure`` means Redis can't serve right now, as one line ("connection to redis failed:
    ...", "redis refused <what>: LOADING ..."), or None when it is something else (a bug, a
    script error, a wrong type).
    """
    value = _value(failure)
    if isinstance(value, RedisUnavailable):
        return str(value)
    if isinstance(value, CONNECTION_ERRORS):
        return f"connection to redis failed: {str(value) or type(value).__name__}"
    if isinstance(value, txredisapi.ResponseError) and UNAVAILABLE_CODES.search(str(value)):
        return f"redis refused {what}: {value}"
    return None


def is_outage(failure: Failure | BaseException) -> bool:
    """True when the failure means Redis is unreachable, not answering or refusing to serve (not a bug)."""
    return outage_reason(failure) is not None


def is_noscript(failure: Failure | BaseException) -> bool:
    """An ``EVALSHA`` the server has no script for (any client's error reply type)."""
    value = _value(failure)
    return str(value).startswith("NOSCRIPT") or any(str(a).startswith("NOSCRIPT") for a in getattr(value, "args", ()))


def describe_connect_failure(failure: Failure) -> str:
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


def parse_master_reply(reply: Any) -> Address | None:
    """``SENTINEL get-master-addr-by-name`` -> (host, port); None when the sentinel doesn't know the name."""
    if not reply:
        return None
    host, port = reply[0], reply[1]
    host = host.decode() if isinstance(host, bytes) else str(host)
    return host, int(port)


def is_primary(role_reply: Any) -> bool:
    """True when a ``ROLE`` reply says ``master``."""
    if not role_reply:
        return False
    role = role_reply[0]
    return (role.decode() if isinstance(role, bytes) else str(role)) == "master"
