"""
Issue 7's fault scenarios against PayFlux's own processes (4 worker killed, 5 consumers killed in
a loop, 7 SIGTERM under load): real ``twistd`` / consumer processes, load over real HTTP, then
every 2xx'd event_id compared with the stream (or with what the consumers handled).

Each test prints one ``FAULT <scenario>: ...`` summary line (docs/reliability.md). Redis-side
scenarios (1, 2, 6) are in tests/test_fault_suite.py.

Builds on: tests/test_workers.py (a sequential producer around a worker SIGKILL) and
tests/test_consumer_faults.py (three consumer SIGKILLs over a pre-filled stream, whose consumer
process, tests/support/consumer_proc.py, this reuses); tests/test_daemon.py checks a SIGTERM
without load.
"""

from __future__ import annotations

import collections
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import treq
from twisted.internet import reactor
from twisted.internet.task import deferLater

from tests.support.consumers import consumer_started
from tests.support.load import LOST, REFUSED, TIMEOUT, Verdict, stream_entries
from tests.support.node import start_node
from tests.support.process import TWISTD, clean_env, reap_supervisor, worker_pids
from tests.support.redis import free_port
from tests.test_consumer_faults import PROC as CONSUMER_PROC
from tests.test_fault_suite import FaultCase

SECRET = "fault-suite-secret-0123456789"


async def poll(condition, timeout: float, what: str, interval: float = 0.05) -> None:
    """Await ``condition()`` (may return a Deferred/coroutine result) true; AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if hasattr(result, "__await__") or hasattr(result, "addCallback"):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await deferLater(reactor, interval, lambda: None)


class Daemon:
    """``twistd -n payflux`` as a child, logs in its own temp dir, killed (with its workers) at cleanup."""

    def __init__(self, testcase, *args: str, redis_url: str | None = None) -> None:
        self.dir = tempfile.mkdtemp(prefix="pf-fault-")
        testcase.addCleanup(shutil.rmtree, self.dir, True)
        self.data_dir = os.path.join(self.dir, "data")
        self.port, self.side_port = free_port(), free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = clean_env(PAYFLUX_API_KEYS=f"tester:{SECRET}")
        argv = [*TWISTD, "-n", "--pidfile=", "payflux", "--listen", f"tcp:{self.port}:interface=127.0.0.1",
                "--metrics-listen", f"tcp:{self.side_port}:interface=127.0.0.1", "--data-dir", self.data_dir,
                "--stats-interval", "0.5", *args]
        if redis_url:
            argv += ["--redis-url", redis_url]
        self.log = open(os.path.join(self.dir, "twistd.log"), "wb")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, cwd=self.dir, env=env)
        testcase.addCleanup(self.reap)

    def reap(self) -> None:
        reap_supervisor(self.proc, self.data_dir)
        self.log.close()

    def log_text(self) -> str:
        with open(os.path.join(self.dir, "twistd.log"), "rb") as f:
            return f.read().decode("utf-8", "replace")

    def worker_pids(self) -> list[int]:
        """Live ``payflux.workerprocess`` children of the supervisor."""
        return worker_pids(self.proc.pid)

    async def side(self, path: str) -> tuple[int, bytes]:
        response = await treq.get(f"http://127.0.0.1:{self.side_port}{path}", persistent=False, timeout=5)
        return response.code, await response.content()

    async def inflight_requests(self) -> int:
        """``payflux_inflight_requests`` from the side port (summed over workers with ``--workers``)."""
        code, text = await self.side("/metrics")
        if code != 200:
            raise AssertionError(f"/metrics answered {code}")
        for line in text.decode().splitlines():
            if line.startswith("payflux_inflight_requests "):
                return int(float(line.split()[1]))
        raise AssertionError("no payflux_inflight_requests in /metrics")

    async def wait_ready(self, timeout: float = 20) -> None:
        async def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError("payflux exited:\n" + self.log_text()[-3000:])
            try:
                return (await self.side("/ready"))[0] == 200
            except Exception:
                return False

        await poll(ready, timeout, "payflux ready")

    async def wait_exit(self, timeout: float) -> int:
        await poll(lambda: self.proc.poll() is not None, timeout, "payflux to exit", interval=0.01)
        return self.proc.returncode


def connections_of(pid: int, port: int) -> int:
    """Established TCP connections on local ``port`` whose socket ``pid`` holds (from /proc)."""
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    except OSError:
        return 0
    count = 0
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if int(fields[1].split(":")[1], 16) == port and fields[3] == "01" and fields[9] in inodes:
                count += 1
    return count


class WorkerKilledUnderLoad(FaultCase):
    """
    Scenario 4: one of ``--workers 2`` SIGKILLed under load (12 concurrent producers).

    Producers retry connection errors and 503s with the same event_id. The supervisor restarts
    the worker; only the requests in flight on the victim see a connection error;
    nothing acknowledged is lost and no event_id is appended twice.
    """

    PRODUCERS = 12
    HOLD = 0.3  # seconds Redis is SIGSTOPped before the kill, well under redis_timeout (2 s)

    async def test_restarted_no_loss_no_duplicates(self):
        daemon = Daemon(self, "--workers", "2", "--shutdown-grace", "5")
        await daemon.wait_ready()
        driver = self.load(daemon.base, secret=SECRET, producers=self.PRODUCERS,
                           retry=(503, LOST, REFUSED, TIMEOUT), retry_deadline=10, request_timeout=5)
        driver.start()
        await driver.until(lambda: len(driver.acknowledged()) >= 200, 15, "200 events accepted before the kill")
        # Hold the embedded Redis for a moment so requests are surely in flight on both workers
        # (their appends sent or queued) when the victim dies: the retries of those then meet
        # appends that did happen, which is what idempotency must absorb.
        redis_pid = int(open(os.path.join(daemon.data_dir, "redis.pid")).read())
        self.addCleanup(lambda: os.kill(redis_pid, signal.SIGCONT) if os.path.exists(f"/proc/{redis_pid}") else None)
        os.kill(redis_pid, signal.SIGSTOP)
        held = time.monotonic()
        await driver.until(lambda: time.monotonic() - held >= self.HOLD, 1 + self.HOLD, "requests to pile up")
        # the victim: the worker holding the most client connections (the kernel may have
        # handed them all to one worker)
        victim = max(daemon.worker_pids(), key=lambda pid: connections_of(pid, daemon.port))
        in_flight_on_victim = connections_of(victim, daemon.port)
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        os.kill(redis_pid, signal.SIGCONT)
        await driver.until(lambda: len(daemon.worker_pids()) == 2 and victim not in daemon.worker_pids(), 15,
                           "the supervisor to restart the worker")
        restarted_after = time.monotonic() - killed
        new_pids = {str(p) for p in daemon.worker_pids()}

        def served_by_both_after_restart() -> bool:
            return {a.worker.split("/")[1] for a in driver.attempts() if a.accepted and a.worker} >= new_pids

        await driver.until(served_by_both_after_restart, 15, "both live workers (one of them new) serving")
        await driver.stop()
        await daemon.wait_ready()
        _, metrics = await daemon.side("/metrics")
        restarts = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.decode().splitlines()
                       if line.startswith("payflux_worker_restarts_total"))

        stored = stream_entries(os.path.join(daemon.data_dir, "redis.sock"))
        connection_errors = sum(driver.count(kind) for kind in (LOST, REFUSED, TIMEOUT))
        verdict = Verdict.of("4 worker SIGKILL (--workers 2)", driver, stored, connection_errors=connection_errors,
                             in_flight_on_victim=in_flight_on_victim,
                             restarted_in=f"{restarted_after:.2f}s", restarts=int(restarts),
                             retries_answered_duplicate=sum(1 for a in driver.attempts() if a.duplicate))
        verdict.print()
        self.assertNothingLost(verdict)
        self.assertEqual(verdict.acknowledged, verdict.sent, verdict.line())  # every retried id got in
        self.assertEqual(set(stored) - set(driver.records), set())
        # only the requests in flight on the victim (no producer starts another while Redis is held)
        self.assertLessEqual(connection_errors, in_flight_on_victim, verdict.line())
        self.assertGreater(in_flight_on_victim, 0)
        self.assertGreater(driver.count(LOST), 0, verdict.line())  # the kill did cut requests in flight
        self.assertEqual(driver.count(TIMEOUT), 0, verdict.line())
        self.assertEqual(restarts, 1)
        self.assertIn("exited unexpectedly", daemon.log_text())
        daemon.proc.send_signal(signal.SIGTERM)
        self.assertIn(await daemon.wait_exit(20), (0, -signal.SIGTERM))


class NodeSigtermUnderLoad(FaultCase):
    """
    Scenario 7: SIGTERM to a single-process node (``twistd``) under load.

    Redis is held (SIGSTOP) for 0.6 s around the SIGTERM so that appends are surely in flight
    when it lands; those the node holds (its payflux_inflight_requests gauge, read just before)
    must finish with 202 (redis_timeout 5 s > the hold). Requests of two
    more producers starting after the SIGTERM must get 503 draining; once the listener closed, connections are refused, and no request
    started after the first refusal is ever answered 2xx. The process exits within
    ``shutdown_grace``; every 2xx'd event is in the stream (an external Redis, which outlives it).
    With ``--workers 2`` connections made after the workers closed wait in the supervisor's
    backlog and are reset when it closes the socket (``lost``, never processed), never 2xx.
    """

    GRACE = 5.0
    HOLD = 0.6

    async def test_in_flight_finish_no_2xx_after_close_exit_within_grace(self):
        await self.sigterm_under_load("7 node SIGTERM")

    async def test_workers_in_flight_finish_no_2xx_after_close_exit_within_grace(self):
        """The same with ``--workers 2``: SIGTERM to the supervisor, which drains both workers."""
        await self.sigterm_under_load("7 node SIGTERM (--workers 2)", "--workers", "2")

    async def sigterm_under_load(self, name: str, *args: str) -> None:
        server = self.redis()
        # redis_timeout above the longest the hold below can last (late 503s may take up to 3 s to
        # show under a loaded CI box), so the appends in flight at SIGTERM wait instead of 503ing
        daemon = Daemon(self, "--shutdown-grace", str(int(self.GRACE)), "--redis-timeout", "5", *args,
                        redis_url=server.url)
        await daemon.wait_ready()
        driver = self.load(daemon.base, secret=SECRET, producers=12, request_timeout=5)
        driver.start()
        await driver.until(lambda: len(driver.acknowledged()) >= 200, 15, "200 events accepted before SIGTERM")
        server.pause()
        held = time.monotonic()
        # appends pile up on the held Redis; the node's own gauge says how many it holds (a client's
        # clock alone cannot tell: a request it sent may still sit unread in a socket buffer)
        await driver.until(lambda: driver.oldest_pending_age() >= 0.2, 3, "appends to pile up")
        deadline = time.monotonic() + 5
        while (inside := await daemon.inflight_requests()) == 0 and time.monotonic() < deadline:
            await deferLater(reactor, 0.02, lambda: None)  # a loaded box: sent, not yet read by the node
        asked = time.monotonic()
        daemon.proc.send_signal(signal.SIGTERM)
        sigterm = time.monotonic()
        # new producers arriving while the node drains (its in-flight appends wait on Redis)
        late = self.load(daemon.base, secret=SECRET, producers=2, request_timeout=5, pause=0.02)
        late.start()
        await late.until(lambda: late.count(503) >= 4, 3, "503 draining for new requests")
        await driver.until(lambda: time.monotonic() - held >= self.HOLD, 1, "the rest of the hold")
        server.resume()
        code = await daemon.wait_exit(self.GRACE + 5)
        exited = time.monotonic() - sigterm
        await driver.until(lambda: driver.count(REFUSED) >= 5 and late.count(REFUSED) >= 2, 5,
                           "refused connections after exit")
        await driver.stop()
        await late.stop()

        attempts = driver.attempts()
        # on the wire when SIGTERM landed; ``inside`` of them (at least) were inside the node by then
        in_flight = [a for a in attempts if a.started <= asked and a.ended > sigterm]
        refused_at = min(a.ended for a in attempts if a.error == REFUSED)
        after_close = [a for a in attempts if a.started >= refused_at]
        late_2xx = [a for a in after_close if a.accepted]
        late_attempts = late.attempts()
        drained = sum(1 for a in late_attempts if a.status == 503 and a.body.get("error") == "draining")
        verdict = Verdict.of(name, driver, stream_entries(("127.0.0.1", server.port)),
                             in_flight_at_sigterm=len(in_flight), inside_node=inside, draining_503=drained,
                             exit_after=f"{exited:.2f}s", grace=self.GRACE, exit_code=code,
                             twoxx_after_close=len(late_2xx),
                             draining_503_max_latency=f"{late.max_latency(503):.3f}s")
        verdict.print()
        self.assertNothingLost(verdict)
        self.assertGreater(inside, 0)
        # the appends inside the node finished with 202; the rest of what was on the wire was read
        # after SIGTERM and got 503 draining
        self.assertGreaterEqual(sum(1 for a in in_flight if a.status == 202), inside, verdict.line())
        self.assertEqual({a.status for a in in_flight} - {202, 503}, set(), verdict.line())
        self.assertEqual(late_2xx, [])
        self.assertLess(exited, self.GRACE, verdict.line())
        self.assertIn(code, (0, -signal.SIGTERM))
        # before the close: 202 or 503 draining; after it: refused (or reset while closing), never 2xx
        self.assertEqual(set(verdict.outcomes) - {"202", "503", REFUSED, LOST}, set(), verdict.line())
        self.assertEqual([a for a in attempts if a.error == LOST and a.started < sigterm], [])
        self.assertTrue(all(a.body.get("error") == "draining" for a in attempts + late_attempts if a.status == 503))
        # requests started after SIGTERM: 503 draining, then refused; never a 2xx
        self.assertEqual({a.status or a.error for a in late_attempts} - {503, REFUSED, LOST}, set())
        self.assertEqual(late.acknowledged(), {})

    async def test_new_ingests_refused_at_once_while_a_sampler_waits_on_redis(self):
        """
        Regression: the node stops its children one by one, and the stream sampler, trimmer and
        consumers stop *before* the drain guard. With Redis unresponsive a sample in flight held
        the stop for up to redis_timeout per command, and new ingests were still accepted (and
        answered 202 once Redis came back) after SIGTERM. Now the stop refuses them at once.
        """
        server = self.redis()
        node = await start_node(self, server.url, stats_interval="0.1", redis_timeout="1.0")
        driver = self.load(node.base, producers=1)
        self.assertEqual((await driver.post(driver.make_event(0))).status, 202)
        server.pause()
        self.addCleanup(server.resume)
        paused = time.monotonic()
        await poll(lambda: time.monotonic() - paused >= 0.3, 1, "a stream sample to wait on the paused Redis")
        stopping = node.node.stopService()
        attempt = await driver.post(driver.make_event(1))
        server.resume()
        await stopping
        self.assertEqual((attempt.status, attempt.body.get("error")), (503, "draining"), attempt)
        self.assertLess(attempt.latency, 0.5)


class ConsumerChaosLoop(FaultCase):
    """
    Scenario 5: a consumer process SIGKILLed 5 times mid-batch, at random points, while the
    load runs (extends tests/test_consumer_faults.py's three scripted kills with the same
    consumer process and group).

    An in-process node (prefix ``pf``, the consumer process's) takes the load; two consumer
    processes share group ``g``. Each round waits a random 0.05-0.5 s, then until the victim
    has entries pending (a batch in flight), SIGKILLs it and starts it again, alternately under
    its old name (it replays its own pending entries) and a new one (the survivor reclaims
    them). Every acknowledged event must be handled at least once; duplicates are counted.
    """

    KILLS = 5

    def spawn(self, url: str, name: str) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, CONSUMER_PROC, url, name, "handled", "0.05"],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.addCleanup(lambda: proc.poll() is None and (proc.kill(), proc.wait()))
        return proc

    async def test_every_acknowledged_event_handled_at_least_once(self):
        seed = int(os.environ.get("PAYFLUX_CHAOS_SEED", time.time_ns() % 100000))
        rng = random.Random(seed)
        server = self.redis()
        node = await start_node(self, server.url, stream_prefix="pf", redis_timeout="2")
        victim, survivor = self.spawn(server.url, "victim-0"), self.spawn(server.url, "survivor")
        driver = self.load(node.base, producers=6, retry=(503,), retry_deadline=10)
        driver.start()

        def pending_of(consumer: str) -> int:
            try:
                summary = server.sync_command("XPENDING", "pf:{0}:events", "g")
            except Exception:
                return 0  # the group isn't created yet
            return sum(int(n) for c, n in (summary[3] or []) if c.decode() == consumer)

        def handled() -> list[str]:
            return [b.decode() for b in server.sync_command("LRANGE", "handled", "0", "-1")]

        name, in_flight_at_kills = "victim-0", 0
        for round_ in range(self.KILLS):
            await deferLater(reactor, rng.uniform(0.05, 0.5), lambda: None)  # the random kill point
            await driver.until(lambda: pending_of(name) > 0, 10, f"a batch in flight on {name}")
            in_flight_at_kills += pending_of(name)
            victim.kill()
            victim.wait(5)
            name = "victim-0" if round_ % 2 == 1 else f"victim-{round_ + 1}"
            victim = self.spawn(server.url, name)
        await driver.stop()

        acknowledged = set(driver.acknowledged())
        await poll(lambda: set(handled()) >= acknowledged, 30, "every acknowledged event handled")
        await poll(lambda: int(server.sync_command("XPENDING", "pf:{0}:events", "g")[0]) == 0, 15, "nothing pending")
        for proc in (victim, survivor):
            await consumer_started(proc)
            proc.send_signal(signal.SIGTERM)
        for proc in (victim, survivor):
            self.assertEqual(proc.wait(10), 0)

        counts = collections.Counter(handled())
        stored = stream_entries(("127.0.0.1", server.port), "pf:{0}:events")
        verdict = Verdict.of("5 consumer SIGKILL chaos loop", driver, stored, kills=self.KILLS, seed=seed,
                             handled=sum(counts.values()), not_handled=len(acknowledged - set(counts)),
                             handled_twice_or_more=sum(1 for c in counts.values() if c > 1),
                             entries_in_flight_at_kills=in_flight_at_kills)
        verdict.print()
        self.assertNothingLost(verdict)
        self.assertEqual(acknowledged - set(counts), set())  # every acknowledged event handled >= 1 time
        self.assertEqual(set(counts) - set(stored), set())  # nothing handled that isn't in the stream
        self.assertEqual(server.sync_command("XLEN", "pf:{0}:dlq"), 0)
        self.assertGreaterEqual(in_flight_at_kills, self.KILLS)
