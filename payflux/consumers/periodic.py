"""A Service that runs one pass of some work every ``interval`` seconds on an injected clock."""

from __future__ import annotations

from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.logger import Logger

log = Logger()


class PeriodicService(Service):
    """
    Runs ``run_pass()`` (returns a Deferred) every ``interval`` seconds of ``reactor`` time,
    starting at once — after ``ready`` (a Deferred, or a callable returning one) fires, when given.
    A pass that fails is the subclass's to log; the loop itself never stops on an error.
    ``stopService`` stops the loop and waits for a pass in progress.
    """

    interval: float
    reactor: Any
    ready: Callable[[], defer.Deferred] | defer.Deferred | None = None
    _loop: task.LoopingCall | None = None
    _pass: defer.Deferred | None = None

    def run_pass(self) -> defer.Deferred:
        raise NotImplementedError

    def startService(self) -> None:
        super().startService()
        self._loop = task.LoopingCall(self._run_pass)
        self._loop.clock = self.reactor
        if self.ready is None:
            self._loop.start(self.interval, now=True)
            return
        ready = self.ready() if callable(self.ready) else self.ready
        ready.addCallback(self._start_loop)
        ready.addErrback(lambda f: log.failure("not starting {what}: Redis never became ready", f,
                                               what=type(self).__name__))

    def _start_loop(self, result: Any) -> None:
        if self.running and self._loop is not None and not self._loop.running:
            self._loop.start(self.interval, now=True)

    def stopService(self) -> defer.Deferred:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        current, self._pass = self._pass, None
        if current is None:
            return defer.succeed(None)
        done: defer.Deferred = defer.Deferred()
        current.addBoth(lambda _: done.callback(None))
        return done

    def _run_pass(self) -> defer.Deferred:
        self._pass = self.run_pass()
        return self._pass
