"""
Waiting for a Deferred at most so long: the steps of the node's bounded stop.

:func:`settled_within` is the one way the node (each child's stop), the consumer service (its
batches still with the handler, the handler's ``close()``) and the ``--workers`` supervisor (its
workers exiting) wait with a limit: they learn whether the work ended in time and carry on
either way, never cancelling it (a handler past the grace period keeps running, unacked).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred


def settled_within(d: Deferred, seconds: float, clock: Any) -> Deferred:
    """
    Fires with True once ``d`` has fired, or with False ``seconds`` later if it has not yet;
    never errbacks.  ``d``'s result is consumed, a failure too: log it on ``d`` first if it
    matters.  ``clock`` provides ``callLater`` (the reactor, or a ``task.Clock`` in tests).
    """
    settled: Deferred = Deferred()
    timer = clock.callLater(max(seconds, 0.0), lambda: settled.called or settled.callback(False))

    def fired(_: Any) -> None:
        if timer.active():
            timer.cancel()
        if not settled.called:
            settled.callback(True)

    d.addBoth(fired)
    return settled
