"""
Lua scripts: ``EVALSHA``, and on ``NOSCRIPT`` ``SCRIPT LOAD`` and once more — the one path.

A Redis that restarted (or ran ``SCRIPT FLUSH``) holds none of PayFlux's scripts; the first
``EVALSHA`` after that is answered ``NOSCRIPT`` and did not run, so loading the script and sending
the call again never runs it twice.  :func:`script_steps` is that conversation, written once as
steps (:mod:`payflux.redis.steps`); :func:`evalsha` runs it on the daemon's pools (single node,
cluster: ``SCRIPT`` goes to every master, sentinel), :func:`evalsha_sync` on the CLI's blocking
client.  Every script caller goes through one of the two: the append script (whose call the
writer encodes itself, hence ``send``), the dead-letter, idle-consumer, trim and rate-limit
scripts, and the CLI's DLQ replay and purge.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Sequence

import attrs
from twisted.internet import defer
from twisted.logger import Logger

from payflux.redis.replies import is_noscript
from payflux.redis.steps import Steps, run_deferred, run_sync

log = Logger()

_SEND = ()  # the step "send this call's EVALSHA" (an empty command)

#: The line logged when a script is loaded after NOSCRIPT (once per connection after a Redis
#: restart: the node's log observer summarises it, payflux.observability.logs.repeated_kind).
LOAD_LINE = "loading the {name} script {sha} into redis"


@attrs.frozen
class Script:
    """A Lua script and its SHA1 (what ``EVALSHA`` names it by)."""

    name: str
    source: str
    sha: str = attrs.field(init=False)

    @sha.default
    def _sha(self) -> str:
        return hashlib.sha1(self.source.encode("utf-8")).hexdigest()


def script_steps(script: Script) -> Steps:
    """Send the call; on NOSCRIPT load ``script`` (checking its SHA) and send it once more."""
    try:
        return (yield _SEND)
    except Exception as e:  # noqa: BLE001 - only NOSCRIPT is ours to handle
        if not is_noscript(e):
            raise
    log.info(LOAD_LINE, name=script.name, sha=script.sha)
    sha = yield ("SCRIPT", "LOAD", script.source)
    if str(sha) != script.sha:
        raise RuntimeError(f"redis returned script sha {sha} for {script.name}, expected {script.sha}")
    return (yield _SEND)


def _call(script: Script, keys: Sequence[Any], args: Sequence[Any]) -> tuple:
    return ("EVALSHA", script.sha, len(keys), *keys, *args)


def evalsha(redis: Any, script: Script, keys: Sequence[Any] = (), args: Sequence[Any] = (),
            send: Callable[[], defer.Deferred] | None = None) -> defer.Deferred:
    """
    ``script`` on ``redis`` (anything with ``execute_command(*args) -> Deferred``), reloaded on
    NOSCRIPT.  ``send`` replaces the plain ``EVALSHA sha numkeys keys... args...`` for a caller
    that sends its call itself (the writer: encoded, and only for the appends still waiting).
    """
    call = _call(script, keys, args)

    def execute(*command: Any) -> defer.Deferred:
        if command:
            return redis.execute_command(*command)
        return send() if send is not None else redis.execute_command(*call)

    return run_deferred(script_steps(script), execute)


def call_steps(script: Script, keys: Sequence[Any] = (), args: Sequence[Any] = ()) -> Steps:
    """
    :func:`script_steps` with the call spelled out: steps that yield only real commands, for a
    conversation of several commands that includes a script (``yield from call_steps(...)``),
    driven like any other by ``run_sync`` or ``run_deferred``.
    """
    call = _call(script, keys, args)
    steps = script_steps(script)
    reply: Any = None
    error: BaseException | None = None
    while True:
        try:
            command = steps.throw(error) if error is not None else steps.send(reply)
        except StopIteration as stop:
            return stop.value
        error = None
        try:
            reply = yield (command or call)
        except Exception as e:  # noqa: BLE001 - handed to the script's steps (NOSCRIPT), which re-raise the rest
            error = e


def evalsha_sync(client: Any, script: Script, keys: Sequence[Any] = (), args: Sequence[Any] = ()) -> Any:
    """:func:`evalsha` for a blocking ``client.command(*args)`` (the CLI)."""
    call = _call(script, keys, args)
    return run_sync(script_steps(script), lambda *command: client.command(*(command or call)))
