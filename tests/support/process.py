"""How tests run PayFlux's own commands as child processes (the interpreter running the tests)."""

import sys

TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
PAYFLUX = [sys.executable, "-m", "payflux.cli"]
