"""
Consumer processes SIGKILLed mid-batch: every appended event is still handled at least once.

Real redis-server, real StreamWriter, two real consumer processes (tests/support/consumer_proc.py);
one is SIGKILLed three times while batches are in flight and restarted (once under its old
consumer name, so its own pending entries are replayed; otherwise under a new one, so the
other process must reclaim them).
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time

from twisted.internet import reactor

from payflux.redis.connect import connect

from payflux.redis.target import parse_redis_url
from payflux.streams.keys import StreamKeys
from payflux.streams.writer import PreparedEvent, StreamWriter, fingerprint_of
from tests.support.consumers import consumer_started, sleep, wait_for
from tests.support.redis import redis_test_cases

PROC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "support", "consumer_proc.py")
KEYS = StreamKeys("pf")
N = 2000


def event(i: int) -> PreparedEvent:
    body = {"event_id": f"evt-{i:05d}", "merchant_id_hash": "m1", "amount": i, "currency": "EUR"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return PreparedEvent(body["event_id"], "m1", "authorization", canonical, fingerprint_of(canonical))


class ConsumerFaultsMixin:
    timeout = 60

    def spawn(self, name: str) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, PROC, self.server.url, name, "handled", "0.05"],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.addCleanup(lambda: proc.poll() is None and (proc.kill(), proc.wait()))
        return proc

    def pending_of(self, consumer: str) -> int:
        summary = self.server.sync_command("XPENDING", KEYS.events(0), "g")
        return sum(int(n) for c, n in (summary[3] or []) if c.decode() == consumer)

    def handled(self) -> list[str]:
        return [b.decode() for b in self.server.sync_command("LRANGE", "handled", "0", "-1")]

    async def test_sigkill_mid_batch_loses_nothing(self):
        self.server = self.start_redis()
        redis = connect(parse_redis_url(self.server.url), 2, 1.0, 5.0)
        self.addCleanup(redis.disconnect)
        writer = StreamWriter(redis, KEYS, 1, 3600, 10.0, reactor)
        started = time.monotonic()
        for b in range(0, N, 200):
            await writer.append([event(i) for i in range(b, b + 200)], int(time.time() * 1000))
        self.assertEqual(self.server.sync_command("XLEN", KEYS.events(0)), N)

        victim = self.spawn("victim-0")
        other = self.spawn("survivor")
        kills, in_flight_at_kill = 0, 0
        for round_ in range(3):
            progress = len(self.handled())
            name = "victim-0" if round_ <= 1 else f"victim-{round_ - 1}"
            await wait_for(lambda: len(self.handled()) >= progress + 150 and self.pending_of(name) > 0,
                           timeout=15, what="progress and a batch in flight before the kill")
            in_flight_at_kill += self.pending_of(name)
            os.kill(victim.pid, signal.SIGKILL)
            victim.wait()
            kills += 1
            # round 0 restarts under the same name: it replays its own pending entries first
            victim = self.spawn("victim-0" if round_ == 0 else f"victim-{round_}")

        def all_handled() -> bool:
            return set(self.handled()) >= {event(i).event_id for i in range(N)}

        await wait_for(all_handled, timeout=30, what="every event handled")
        await wait_for(lambda: int(self.server.sync_command("XPENDING", KEYS.events(0), "g")[0]) == 0,
                       timeout=10, what="nothing pending")
        for proc in (victim, other):
            await consumer_started(proc)  # the last victim may not have installed its handler yet
        for proc in (victim, other):
            proc.send_signal(signal.SIGTERM)
        for proc in (victim, other):
            proc.wait(10)
            self.assertEqual(proc.returncode, 0)

        handled = self.handled()
        counts = collections.Counter(handled)
        expected = {event(i).event_id for i in range(N)}
        self.assertEqual(set(counts), expected)  # nothing lost, nothing invented
        duplicates = sum(c - 1 for c in counts.values())
        self.assertEqual(self.server.sync_command("XLEN", KEYS.dlq(0)), 0)
        self.assertGreater(in_flight_at_kill, 0)
        print(f"\n  redis {self.server.version}: {N} events, {kills} SIGKILLs, {len(handled)} handled, "
              f"{duplicates} duplicates, {in_flight_at_kill} entries in flight at the kills, {time.monotonic() - started:.1f}s", file=sys.stderr)
        await sleep(0)


redis_test_cases(ConsumerFaultsMixin, globals())
