"""What every ``payflux`` subcommand shares: one-line errors with an exit status, and a parser that makes them."""

from __future__ import annotations

import argparse
from typing import NoReturn


class CommandError(Exception):
    """One line for stderr and the exit status of a failed operator command."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a usage error as a CommandError (exit 2, one line, no usage dump)."""

    def error(self, message: str) -> NoReturn:
        raise CommandError(f"{message} (see {self.prog} --help)", 2)
