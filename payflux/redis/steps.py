"""
Redis conversations written once, run by a blocking client or by the reactor (bottom layer).

A *step generator* yields a command (a tuple of arguments), receives its reply (or has the
command's exception thrown into it), and finally returns its result.  :func:`run_sync` drives one
with a blocking ``command(*args)`` (the CLI's :mod:`payflux.redis.sync` client),
:func:`run_deferred` with an ``execute_command(*args) -> Deferred`` (the daemon's pool), so one
implementation serves both: the stream/group facts of :mod:`payflux.consumers.inspect` and the
NOSCRIPT reload of :mod:`payflux.redis.scripts` are written this way.
"""

from __future__ import annotations

from typing import Any, Callable, Generator

from twisted.internet import defer
from twisted.python.failure import Failure

Command = tuple
Steps = Generator[Command, Any, Any]


@defer.inlineCallbacks
def run_deferred(steps: Steps, execute: Callable[..., defer.Deferred]) -> Generator[Any, Any, Any]:
    """Drive ``steps`` with an ``execute(*args) -> Deferred`` (e.g. txredisapi ``execute_command``)."""
    reply: Any = None
    error: BaseException | None = None
    try:
        while True:
            cmd = steps.throw(error) if error is not None else steps.send(reply)
            error = None
            try:
                reply = yield execute(*cmd)
            except Exception as e:
                error = e
    except StopIteration as stop:
        return stop.value


def run_sync(steps: Steps, command: Callable[..., Any]) -> Any:
    """
    Drive ``steps`` with a blocking ``command(*args)``; exceptions propagate into the steps.
    (:func:`run_deferred` over already-fired Deferreds: it runs to the end before returning.)
    """
    outcome: list[Any] = []
    run_deferred(steps, lambda *cmd: defer.maybeDeferred(command, *cmd)).addBoth(outcome.append)
    if isinstance(outcome[0], Failure):
        outcome[0].raiseException()
    return outcome[0]
