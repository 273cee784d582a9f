"""
Redis conversations written once, run by a blocking client or by the reactor (bottom layer).

A *step generator* yields a command (a tuple of arguments), receives its reply (or has the
command's exception thrown into it), and finally returns its result.  :func:`run_sync` drives one
with a blocking ``command(*args)`` (the CLI's :mod:`payflux.redis.sync` client),
:func:`run_deferred` with an ``execute_command(*args) -> Deferred`` (the daemon's pool), so one
implementation serves both: the stream/group facts of :mod:`payflux.consumers.inspect` and the
NOSCRIPT reload of :mod:`payflux.redis.scripts` are written this way.

:class:`SharedRound` is the other shape both async clients share: one round trip in flight at a
time (the cluster's ``CLUSTER SLOTS`` refresh, the sentinel pool's asking of the sentinels),
whose result every caller that asked meanwhile gets.
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


class SharedRound:
    """
    ``start()`` (returning a Deferred) run once for all who :meth:`join` while it runs: the first
    caller starts a round, later ones wait for it, each gets its result (or failure).  A caller's
    Deferred that was cancelled meanwhile is skipped.  :meth:`idle` fires once no round runs.
    """

    def __init__(self, start: Callable[[], defer.Deferred]) -> None:
        self._start = start
        self._waiters: list[defer.Deferred] = []
        self._idle: list[defer.Deferred] = []

    def join(self) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self._waiters.append(d)
        if len(self._waiters) == 1:
            self._start().addBoth(self._done)
        return d

    def _done(self, result: Any) -> None:
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            if d.called:  # cancelled by its caller
                continue
            d.errback(result) if isinstance(result, Failure) else d.callback(result)
        idle, self._idle = self._idle, []
        for d in idle:
            d.callback(None)

    def idle(self) -> defer.Deferred:
        """Fires once no round is in flight (at once if none is)."""
        if not self._waiters:
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        self._idle.append(d)
        return d
