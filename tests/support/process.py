"""How tests run PayFlux's own commands as child processes (the interpreter running the tests)."""

import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

from payflux.goenv import GO_ONLY, MAPPED

TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
PAYFLUX = [sys.executable, "-m", "payflux.cli"]


#: The Go PayFlux's variables a node also reads (payflux/goenv.py): a runner that happens to set
#: one (REDIS_ADDR, HTTP_ADDR...) must not reach the nodes tests start.
GO_VARIABLES = frozenset(MAPPED + GO_ONLY)


def clean_env(**extra: str) -> dict:
    """The test runner's environment without any PAYFLUX_* or Go PayFlux setting, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAYFLUX_") and k not in GO_VARIABLES}
    env.update(extra)
    return env


def http_request(url: str, body: bytes | None = None, headers: dict | None = None,
                 timeout: float = 5.0) -> tuple[int, bytes]:
    """``(status, body)`` of a GET (or a POST when ``body`` is given) to a node under test."""
    req = urllib.request.Request(url, data=body, headers=headers or {}, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_ready(testcase, proc: subprocess.Popen, url: str, log_text, timeout: float = 20.0,
               what: str = "node") -> bytes:
    """
    GET ``url`` (a ``/ready``) until it answers 200 while ``proc`` runs, and return that body;
    fail ``testcase`` with ``log_text()`` if ``proc`` exits first or ``timeout`` seconds pass.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        testcase.assertIsNone(proc.poll(), log_text())
        try:
            status, body = http_request(url, timeout=2)
            if status == 200:
                return body
        except OSError:
            pass
        time.sleep(0.05)
    testcase.fail(f"{what} did not become ready:\n{log_text()}")


def kill_embedded_redis(data_dir: str) -> None:
    """SIGKILL an embedded redis-server a failed test may have left behind (by its pidfile)."""
    pidfile = os.path.join(data_dir, "redis.pid")
    if os.path.exists(pidfile):
        try:
            os.kill(int(open(pidfile).read().strip()), signal.SIGKILL)
        except (OSError, ValueError):
            pass


def worker_pids(supervisor_pid: int) -> list[int]:
    """Live ``payflux.workerprocess`` children of a ``--workers`` supervisor (read from /proc)."""
    try:
        children = open(f"/proc/{supervisor_pid}/task/{supervisor_pid}/children").read().split()
    except OSError:
        return []
    pids = []
    for pid in map(int, children):
        try:
            if b"payflux.workerprocess" in open(f"/proc/{pid}/cmdline", "rb").read():
                pids.append(pid)
        except OSError:
            pass
    return pids


def reap_supervisor(proc, data_dir: str) -> None:
    """A test's last word on a twistd process: SIGKILL it and its workers if still up, then its embedded Redis."""
    if proc is not None and proc.poll() is None:
        for pid in worker_pids(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        proc.kill()
        proc.wait()
    kill_embedded_redis(data_dir)


class NodeProcesses:
    """
    Mixin for a SynchronousTestCase that starts nodes as child processes: ``self.dir`` (a temp
    dir), ``self.data_dir`` (the embedded Redis's, inside it), ``self.port`` (free), and
    ``self.procs``, every one killed at cleanup along with an embedded Redis left behind.
    """

    dir_prefix = "payflux-node-"

    def setUp(self) -> None:
        from tests.support.redis import free_port

        self.dir = tempfile.mkdtemp(prefix=self.dir_prefix)
        self.data_dir = os.path.join(self.dir, "data")
        self.port = free_port()
        self.procs: list[subprocess.Popen] = []
        self.addCleanup(self._reap)

    def _reap(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        kill_embedded_redis(self.data_dir)
