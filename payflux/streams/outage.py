"""
Logging the failed step of a background loop: an outage or a bug.

A consumer, reclaim pass, trimmer or sampler that fails because Redis is down, restarting or
too slow (:func:`payflux.redis.replies.is_outage`, the one classifier) logs one warning line with
the reason (no traceback, metrics still count it; repeats summarised with counts,
:mod:`payflux.observability.logsummary`) and tries again on its next step; anything else is
unexpected and logged with its traceback.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger
from twisted.python.failure import Failure

from payflux.observability.logsummary import repeated
from payflux.redis.replies import is_outage

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
