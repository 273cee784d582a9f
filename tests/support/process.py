"""How tests run PayFlux's own commands as child processes (the interpreter running the tests)."""

import os
import signal
import sys

TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
PAYFLUX = [sys.executable, "-m", "payflux.cli"]


def clean_env(**extra: str) -> dict:
    """The test runner's environment without any PAYFLUX_* setting, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAYFLUX_")}
    env.update(extra)
    return env


def kill_embedded_redis(data_dir: str) -> None:
    """SIGKILL an embedded redis-server a failed test may have left behind (by its pidfile)."""
    pidfile = os.path.join(data_dir, "redis.pid")
    if os.path.exists(pidfile):
        try:
            os.kill(int(open(pidfile).read().strip()), signal.SIGKILL)
        except (OSError, ValueError):
            pass
