"""
twistd glue: ``twistd -n payflux [options]``.

Wiring only.  ``Options`` is generated from :data:`payflux.config.OPTIONS` so ``--help`` lists
every setting; ``postOptions`` merges file, environment and command line into validated
:class:`~payflux.config.Settings` and exits with one clear line on any invalid value.
``makeService`` hands the settings to :func:`payflux.node.build_node`.
"""

from __future__ import annotations

import sys

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
        # Build consumer handlers now, so a handler that can't be imported or built is one
        # line and exit 2 here rather than a traceback from inside twistd.
        self.handlers = {}
        if "consumers" in self.settings.roles:
            from twisted.internet import reactor

            from payflux.consumers.handlers import load_handler

            for consumer in self.settings.consumers:
                try:
                    self.handlers[consumer.name] = load_handler(consumer.handler, consumer.options, reactor)
                except ValueError as e:
                    sys.stderr.write(f"payflux: invalid [[consumers]] {consumer.name!r}: {e}\n")
                    raise SystemExit(2)


def makeService(options: Options, reactor=None):
    from payflux.node import build_node

    if reactor is None:
        from twisted.internet import reactor
    if options.settings.workers > 1:
        from payflux.workers import build_supervisor

        # Workers log in the supervisor's format, to its stdout (twistd -n).
        json_logs = any("payflux.observability.logs.json_observer" in arg for arg in sys.argv)
        return build_supervisor(
            options.settings, reactor, handlers=options.handlers, log_format="json" if json_logs else "text"
        )
    return build_node(options.settings, reactor, handlers=options.handlers)
