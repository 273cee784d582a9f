"""
A real consumer daemon for exporter fault tests: ``twistd -n payflux --roles consumers`` configured
by one ``[[consumers]]`` table (the exporter built from config alone), started, SIGKILLed and
restarted by the test; plus ``append_events`` to fill the stream through the real StreamWriter.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from typing import Any

from twisted.internet import reactor
from twisted.trial import unittest

from payflux.events import canonical_json
from payflux.redis.connect import connect
from payflux.redis.target import parse_redis_url
from payflux.streams.keys import StreamKeys
from payflux.streams.writer import PreparedEvent, StreamWriter, fingerprint_of
from tests.support.consumers import wait_for
from tests.support.process import TWISTD, clean_env


class ConsumerDaemon:
    """``twistd -n payflux --roles consumers`` with one [[consumers]] table; logs kept per run."""

    def __init__(self, testcase: unittest.TestCase, redis_url: str, consumer_table: str,
                 extra_args: tuple[str, ...] = ()) -> None:
        self.dir = tempfile.mkdtemp(prefix="payflux-daemon-")
        testcase.addCleanup(shutil.rmtree, self.dir, True)
        self.config = os.path.join(self.dir, "payflux.toml")
        with open(self.config, "w") as f:
            f.write(consumer_table)
        self.args = [*TWISTD, "-n", "--pidfile=", "payflux", "--roles", "consumers", "--redis-url", redis_url,
                     *extra_args, "--config", self.config, "--metrics-listen", "none",
                     "--listen", "tcp:0:interface=127.0.0.1"]
        self.testcase = testcase
        self.proc: subprocess.Popen | None = None
        self.runs = 0

    def start(self) -> None:
        log = open(os.path.join(self.dir, f"twistd-{self.runs}.log"), "wb")
        self.testcase.addCleanup(log.close)
        proc = self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, cwd=self.dir,
                                            env=clean_env())
        self.testcase.addCleanup(lambda: proc.poll() is None and (proc.kill(), proc.wait()))
        self.runs += 1

    def kill(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def log_text(self) -> str:
        return "".join(open(os.path.join(self.dir, f"twistd-{n}.log"), errors="replace").read()
                       for n in range(self.runs))

    async def kill_mid_export(self, acked: Any, pending: Any, targets: tuple[int, ...] = (200, 600)) -> int:
        """
        SIGKILL the daemon each time ``acked()`` reaches the next of ``targets`` while ``pending()``
        entries are in flight, restarting it under the same consumer name (its own pending
        entries are read again first); returns how many entries were in flight at the kills.
        """
        in_flight = 0
        for target in targets:
            await self.wait_for(lambda: acked() >= target and pending() > 0, timeout=20,
                                what=f"{target} events exported with a batch in flight")
            in_flight += pending()
            self.kill()
            self.start()
        return in_flight

    async def wait_for(self, condition: Any, timeout: float, what: str) -> None:
        try:
            await wait_for(condition, timeout=timeout, what=what)
        except AssertionError as e:
            raise AssertionError(f"{e}\n--- consumer logs ---\n{self.log_text()[-5000:]}") from None


async def append_events(redis_url: str, keys: StreamKeys, partitions: int, events: list[dict],
                        received_at_ms: int, chunk: int = 250) -> None:
    """Append validated event dicts through the real StreamWriter, ``chunk`` per call."""
    redis = connect(parse_redis_url(redis_url), 2, 1.0, 5.0)
    try:
        writer = StreamWriter(redis, keys, partitions, 3600, 10.0, reactor)
        for b in range(0, len(events), chunk):
            prepared = []
            for event in events[b:b + chunk]:
                canonical = canonical_json(event)
                prepared.append(PreparedEvent(event["event_id"], event.get("merchant_id_hash", ""), event["event_type"],
                                              canonical, fingerprint_of(canonical)))
            await writer.append(prepared, received_at_ms + b)
    finally:
        await redis.disconnect()
