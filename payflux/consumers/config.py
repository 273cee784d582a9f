"""
Typed configuration of consumers and retention.

Consumers are configured in the TOML file as ``[[consumers]]`` tables (see etc/payflux.toml);
``payflux.config`` parses and validates them into :class:`ConsumerConfig` values.
"""

from __future__ import annotations

from typing import Any

import attrs


@attrs.frozen
class ConsumerConfig:
    name: str                      # unique per node; label in metrics and logs
    group: str                     # Redis consumer group
    handler: str                   # built-in name ("log", "noop") or "package.module:attr"
    options: dict = attrs.field(factory=dict, eq=False, hash=False)  # handler factory kwargs
    batch_size: int = 100          # XREADGROUP COUNT per partition
    block_ms: int = 2000           # XREADGROUP BLOCK; the read connection's reply timeout exceeds it
    concurrency: int = 1           # handler batches in flight at once
    max_deliveries: int = 5        # after this many deliveries a failing entry goes to the DLQ
    min_idle_ms: int = 60_000      # reclaim entries pending at least this long on any consumer
    reclaim_interval: float = 5.0  # seconds between reclaim passes
    reclaim_count: int = 100       # XAUTOCLAIM COUNT per call
    start_id: str = "0"            # where a (re)created group starts: "0" = whole stream, "$" = new only
    consumer_name: str | None = None  # default: "<hostname>-<pid>"
    # seconds: the reclaim loop deletes other consumer names of the group idle this long with
    # nothing pending (a SIGKILLed or replaced process's name); 0 = never
    consumer_idle_cleanup: float = 3600.0
    idle_consumer_cleanup_ms: int | None = None  # deprecated: the same in milliseconds; wins when set

    def idle_cleanup_ms(self) -> int:
        """Idle milliseconds after which a consumer name with nothing pending is deleted; 0 = never."""
        if self.idle_consumer_cleanup_ms is not None:
            return self.idle_consumer_cleanup_ms
        return int(self.consumer_idle_cleanup * 1000)


@attrs.frozen
class RetentionConfig:
    max_age: float = 7 * 86400     # seconds; entries older may be trimmed (0 = no age limit)
    max_length: int = 0            # entries per partition beyond which old ones may be trimmed (0 = none)
    hard_cap: int = 0              # entries per partition never exceeded, even if unconsumed (0 = none)
    interval: float = 30.0         # seconds between trim passes
    dlq_max_age: float = 30 * 86400
    dlq_max_length: int = 100_000


def consumer_from_table(table: dict[str, Any], index: int) -> ConsumerConfig:
    """Build one ConsumerConfig from a TOML table; ValueError says which key and why."""
    where = f"consumers[{index}]"
    if not isinstance(table, dict):
        raise ValueError(f"{where} must be a table")
    known = {f.name for f in attrs.fields(ConsumerConfig)}
    for key in table:
        if key not in known:
            raise ValueError(f"{where}: unknown key {key!r}; known: {', '.join(sorted(known))}")
    for key in ("name", "group", "handler"):
        value = table.get(key)
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{where}: {key} is required (a non-empty string)")
        if any(c.isspace() for c in value):
            raise ValueError(f"{where}: {key} must not contain whitespace")
    ints = {"batch_size": (1, 10_000), "block_ms": (1, 60_000), "concurrency": (1, 64),
            "max_deliveries": (1, 1000), "min_idle_ms": (0, 86_400_000), "reclaim_count": (1, 10_000),
            "idle_consumer_cleanup_ms": (0, 30 * 86_400_000)}
    for key, (lo, hi) in ints.items():
        if key in table:
            value = table[key]
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise ValueError(f"{where}: {key} must be an integer from {lo} to {hi}")
    if "reclaim_interval" in table:
        value = table["reclaim_interval"]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.01 <= value <= 3600:
            raise ValueError(f"{where}: reclaim_interval must be a number of seconds from 0.01 to 3600")
    if "consumer_idle_cleanup" in table:
        value = table["consumer_idle_cleanup"]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value == 0 or 1 <= value <= 30 * 86400):
            raise ValueError(f"{where}: consumer_idle_cleanup must be 0 (never) or a number of seconds "
                             f"from 1 to {30 * 86400}")
        table = {**table, "consumer_idle_cleanup": float(value)}
    defaults = attrs.fields(ConsumerConfig)
    cleanup_key = "idle_consumer_cleanup_ms" if "idle_consumer_cleanup_ms" in table else "consumer_idle_cleanup"
    cleanup_ms = table.get("idle_consumer_cleanup_ms",
                           table.get("consumer_idle_cleanup", defaults.consumer_idle_cleanup.default) * 1000)
    block_ms = table.get("block_ms", defaults.block_ms.default)
    if 0 < cleanup_ms <= block_ms:
        # a live consumer blocked in XREADGROUP looks idle for up to block_ms: never delete it
        raise ValueError(f"{where}: {cleanup_key} must be longer than block_ms ({block_ms} ms), or 0 (never)")
    if "start_id" in table and table["start_id"] not in ("0", "$"):
        raise ValueError(f"{where}: start_id must be \"0\" (whole stream) or \"$\" (new entries only)")
    if "options" in table and not isinstance(table["options"], dict):
        raise ValueError(f"{where}: options must be a table")
    if "consumer_name" in table and (not isinstance(table["consumer_name"], str) or not table["consumer_name"]):
        raise ValueError(f"{where}: consumer_name must be a non-empty string")
    return ConsumerConfig(**table)
