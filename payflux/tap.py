"""
twistd glue: ``twistd -n payflux [options]`` and ``payflux serve [options]``.

Wiring only.  ``Options`` is generated from :data:`payflux.config.OPTIONS` so ``--help`` lists
every setting; ``postOptions`` merges file, environment and command line into validated
:class:`~payflux.config.Settings` and exits with one clear line on any invalid value.
``makeService`` hands the settings to :func:`payflux.node.build_node` (which builds the
consumers' handlers; one that can't be built is one line and exit 2) and, under twistd, picks
the log observer the settings ask for (``log_format``, ``log_level``, ``log_summary_interval``;
an explicit ``twistd --logger`` or ``--syslog`` wins).  :func:`serve` is ``payflux serve``: twistd's
own machinery, in this process, as ``twistd --nodaemon --pidfile= payflux [options]``.
"""

from __future__ import annotations

import sys

from typing import Sequence

from twisted.application.service import MultiService
from twisted.logger import ILogObserver
from twisted.python import usage

from payflux.config import OPTIONS, ConfigError, load_settings


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _show_default(option) -> str:
    if option.secret or option.default in (None, ()):
        return "unset"
    if isinstance(option.default, tuple):
        return ",".join(option.default)
    return str(option.default)


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "PayFlux ingest node. Every option can also be set as PAYFLUX_<NAME> in the environment "
        "or as <name> in the TOML file given with --config; the command line wins."
    )
    optParameters = [["config", "c", None, "TOML config file (also PAYFLUX_CONFIG)."]] + [
        [_flag(o.name), None, None, f"{o.help} [default: {_show_default(o)}]"]
        for o in OPTIONS
        if o.parse.__name__ != "_bool"
    ]
    optFlags = [[_flag(o.name), None, o.help] for o in OPTIONS if o.parse.__name__ == "_bool"]

    def postOptions(self) -> None:
        cli = {}
        for o in OPTIONS:
            value = self.get(_flag(o.name))
            if o.parse.__name__ == "_bool":
                cli[o.name] = True if value else None
            else:
                cli[o.name] = value
        try:
            self.settings = load_settings(cli, config_path=self["config"])
        except ConfigError as e:
            sys.stderr.write(f"payflux: {e}\n")
            raise SystemExit(2)


def makeService(options: Options, reactor=None):
    """
    The node (or ``--workers`` supervisor) for ``options.settings``.  The consumers' handlers
    are built here, by the node (:func:`payflux.consumers.handlers.build_handlers`), never while
    parsing options: one that can't be imported or built is one line on stderr and exit 2, not
    a traceback from inside twistd.
    """
    from payflux.consumers.handlers import HandlerError
    from payflux.node import build_node, freeze_after_start
    from payflux.observability import logs

    if reactor is None:
        from twisted.internet import reactor
    settings = options.settings
    logs.configure(level=settings.log_level, summary_interval=settings.log_summary_interval)
    twistd = getattr(options, "parent", None)  # twistd's ServerOptions; None when called directly
    try:
        if settings.workers > 1:
            from payflux.supervisor import build_supervisor

            service = build_supervisor(settings, reactor)
        else:
            service = build_node(settings, reactor)
    except HandlerError as e:
        sys.stderr.write(f"payflux: {e}\n")
        raise SystemExit(2) from None
    # after the build: a start refused above leaves no log file behind
    observer, log_format = _log_observer(settings, twistd)
    if settings.workers > 1:
        service.workers.log_format = log_format  # workers log in the supervisor's format, to its stdout
    if twistd is None:
        return service
    freeze_after_start(reactor)
    return LoggingRoot(service, observer, reactor)


def _log_observer(settings, twistd) -> tuple[object | None, str]:
    """
    (the observer for twistd's application, or None to leave twistd's choice; "json" or "text").

    Mirrors twistd's own destination rules: stdout under ``--nodaemon`` without ``--logfile``
    (or with ``--logfile -``), else the file (default ``twistd.log``, rotated on SIGUSR1 when
    daemonized).  ``--logger`` and ``--syslog`` keep twistd's observer.
    """
    from payflux.observability import logs

    if twistd is None:
        return None, logs.resolve_format(settings.log_format, sys.stdout)
    chosen = twistd.get("logger")
    if chosen is not None:
        return None, "json" if chosen is logs.json_observer else "text"
    if twistd.get("syslog"):
        return None, "text"
    logfile, nodaemon = twistd.get("logfile"), twistd.get("nodaemon")
    if logfile == "-" and not nodaemon:
        return None, "text"  # twistd refuses this combination itself
    if logfile == "-" or (nodaemon and not logfile):
        stream = sys.stdout
    else:
        from twisted.python.logfile import LogFile

        stream = LogFile.fromFullPath(logfile or "twistd.log")
        if not nodaemon:
            import signal

            if not signal.getsignal(signal.SIGUSR1):
                def rotate(signum, frame, stream=stream):
                    from twisted.internet import reactor

                    reactor.callFromThread(stream.rotate)

                signal.signal(signal.SIGUSR1, rotate)
    log_format = logs.resolve_format(settings.log_format, stream)
    return logs.build_observer(log_format, stream, settings.log_level), log_format


class LoggingRoot(MultiService):
    """
    What twistd runs: the node, with the log observer chosen by the settings (registered on
    twistd's application, which twistd's AppLogger then installs) and the flusher of held-back
    repeated log lines, which reports the last summaries once the node has stopped.
    """

    def __init__(self, node, observer, clock):
        super().__init__()
        from payflux.observability.logsummary import SummaryFlusher

        self.node = node
        self.observer = observer
        self.flusher = SummaryFlusher(clock)
        node.setServiceParent(self)

    def setServiceParent(self, parent) -> None:
        if self.observer is not None and hasattr(parent, "setComponent"):
            parent.setComponent(ILogObserver, self.observer)
        super().setServiceParent(parent)

    def startService(self) -> None:
        super().startService()
        self.flusher.startService()

    def stopService(self):
        d = super().stopService()
        d.addBoth(lambda result: (self.flusher.stopService(), result)[1])
        return d


class _ServeOptions(Options):
    """The node's options under ``payflux serve`` (its own usage line)."""

    def getSynopsis(self) -> str:
        return "Usage: payflux serve [options]"


class _ServeMaker:
    tapname = "payflux"
    description = "PayFlux payment-event gateway: HTTP ingest into Redis Streams."

    def makeService(self, options: Options):
        return makeService(options)


def serve(argv: Sequence[str]) -> int:
    """
    ``payflux serve [options]``: ``twistd --nodaemon --pidfile= payflux [options]`` in this
    process (foreground, no pidfile, logs on stdout per ``log_format``), the same options, exit
    statuses (2 and one line for a bad setting, 1 for a failed start or a usage error, killed by
    SIGTERM after a clean stop) and signal handling.  Needs no twistd plugin lookup.
    """
    from twisted.scripts.twistd import ServerOptions, runApp

    maker = _ServeMaker()

    class ServeServerOptions(ServerOptions):
        @property
        def subCommands(self):
            self.loadedPlugins = {maker.tapname: maker}
            yield (maker.tapname, None, _ServeOptions, maker.description)

    config = ServeServerOptions()
    try:
        config.parseOptions(["--nodaemon", "--pidfile=", maker.tapname, *argv])
    except usage.UsageError as e:
        sys.stderr.write(f"payflux serve: {e} (see payflux serve --help)\n")
        return 1
    runApp(config)
    return 0
