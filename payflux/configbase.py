"""
The two types every settings module shares: :class:`ConfigError` and :class:`ApiKey`.

They live apart from :mod:`payflux.config` so that the modules config reads from (the Go
PayFlux's environment, :mod:`payflux.goenv`) can raise and build them without importing config
back.  ``payflux.config`` re-exports both.
"""

from __future__ import annotations

import attrs


class ConfigError(Exception):
    """An option has an invalid value; ``str()`` is one line meant for the operator."""

    def __init__(self, option: str, message: str):
        super().__init__(option, message)
        self.option = option
        self.message = message

    def __str__(self) -> str:
        if self.option == "consumers":
            return f"invalid [[consumers]] in the config file: {self.message}"
        env = "PAYFLUX_" + self.option.upper()
        flag = "--" + self.option.replace("_", "-")
        return f"invalid {flag} ({env} / {self.option} in the config file): {self.message}"


@attrs.frozen(repr=False)
class ApiKey:
    """One producer credential. ``key_id`` appears in logs and metrics; the secret never does."""

    key_id: str
    secret: bytes

    def __repr__(self) -> str:
        return f"ApiKey(key_id={self.key_id!r}, secret=<redacted>)"
