"""
Telling "Redis is unreachable" apart from real bugs in background loops.

A consumer, reclaim pass, trimmer or sampler that fails because Redis is down, restarting or
too slow logs one warning line with the reason (no traceback, metrics still count it; repeats
summarised with counts, :mod:`payflux.observability.logsummary`) and tries again on its next
step; anything else is unexpected and logged with its traceback.
"""

from __future__ import annotations

from typing import Any

import txredisapi
from twisted.internet import defer, error
from twisted.logger import Logger
from twisted.python.failure import Failure

from payflux.observability.logsummary import repeated

_OUTAGE = (
    txredisapi.ConnectionError,  # includes txredisapi.TimeoutError (no reply in time)
    defer.TimeoutError,
    error.ConnectError,
    error.ConnectionLost,
    error.ConnectionDone,
    error.TimeoutError,
)


def is_outage(failure: Failure | BaseException) -> bool:
    """True when the failure means Redis is unreachable, not answering or refusing to serve (not a bug)."""
    value = failure.value if isinstance(failure, Failure) else failure
    if isinstance(value, _OUTAGE):
        return True
    from payflux.streams.writer import _UNAVAILABLE_CODES, RedisUnavailable

    # error replies of a Redis that can't serve right now: LOADING, CLUSTERDOWN (a cluster
    # that lost a master), TRYAGAIN, READONLY, MASTERDOWN, ...
    if isinstance(value, txredisapi.ResponseError) and _UNAVAILABLE_CODES.search(str(value)):
        return True
    return isinstance(value, RedisUnavailable)


def log_step_failure(log: Logger, failure: Failure, message: str, **fields: Any) -> None:
    """
    Log a failed background step: a warning with the reason for an outage, else a traceback.

    Outage warnings of one step (message and consumer) are summarised: the first at once, then
    one line per ``log_summary_interval`` with the count and the last reason, however often
    the loop retries while Redis is down.
    """
    if is_outage(failure):
        reason = failure.getErrorMessage() or type(failure.value).__name__
        kind = f"{log.namespace}: {message} [{fields.get('consumer', '')}]"
        repeated(kind, log).warn(message + " (Redis unavailable: {reason})", reason=reason, **fields)
    else:
        log.failure(message, failure, **fields)
