"""
Redis Cluster's key routing, as pure functions (bottom layer of :mod:`payflux.redis`).

- :func:`key_slot` is Redis Cluster's CRC16 (XMODEM) of the key, or of its hash tag, mod 16384.
- :func:`command_key` names the key a command is routed by: the first key of ``EVAL``/``EVALSHA``,
  ``XGROUP``/``XINFO <sub> key``, the first stream after ``STREAMS`` of ``XREAD[GROUP]``, the
  first argument of every other keyed command; ``None`` for keyless commands.  Keyless ``PING``
  and ``SCRIPT`` go to *every* master (:data:`BROADCAST`: a script must be loaded on the node
  that runs it, and readiness means every master answers); other keyless commands go to any.
- :func:`parse_redirect` reads ``MOVED``/``ASK`` error replies, :func:`parse_slots` a
  ``CLUSTER SLOTS`` reply, and :class:`SlotTable` keeps slot -> master address.

The daemon's :class:`payflux.redis.cluster.ClusterClient` and the CLI's blocking client route
with these.
"""

from __future__ import annotations

from typing import Any, Sequence

Address = tuple[str, int]

SLOTS = 16384

Address = tuple[str, int]


def _crc16_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
        table.append(crc & 0xFFFF)
    return table


_CRC16 = _crc16_table()


def crc16(data: bytes) -> int:
    """CRC16-CCITT (XMODEM), the checksum Redis Cluster hashes keys with."""
    crc = 0
    for b in data:
        crc = ((crc << 8) & 0xFF00) ^ _CRC16[((crc >> 8) ^ b) & 0xFF]
    return crc


def key_slot(key: str | bytes) -> int:
    """The hash slot of ``key``: of its hash tag (first ``{...}``, non-empty) if it has one."""
    data = key.encode("utf-8") if isinstance(key, str) else bytes(key)
    start = data.find(b"{")
    if start >= 0:
        end = data.find(b"}", start + 1)
        if end > start + 1:
            data = data[start + 1:end]
    return crc16(data) % SLOTS


def command_name(arg: Any) -> str:
    return (arg.decode("ascii", "replace") if isinstance(arg, (bytes, bytearray)) else str(arg)).upper()


# Keyless commands sent to every master; anything else keyless goes to one.
BROADCAST = frozenset({"PING", "SCRIPT"})
KEYLESS = frozenset({"PING", "SCRIPT", "INFO", "CLUSTER", "ASKING", "AUTH", "SELECT", "TIME", "DBSIZE",
                     "CONFIG", "CLIENT", "COMMAND", "HELLO", "ECHO", "LASTSAVE", "ROLE", "WAIT"})


def command_key(args: Sequence[Any]) -> Any:
    """The key ``args`` is routed by, or None for a keyless command (see the module docstring)."""
    name = command_name(args[0])
    if name in KEYLESS:
        return None
    if name in ("EVAL", "EVALSHA", "EVAL_RO", "EVALSHA_RO", "FCALL", "FCALL_RO"):
        return args[3] if len(args) > 3 and int(args[2]) > 0 else None
    if name in ("XGROUP", "XINFO", "OBJECT", "MEMORY"):
        return args[2] if len(args) > 2 else None
    if name in ("XREAD", "XREADGROUP"):
        for i, a in enumerate(args):
            if command_name(a) == "STREAMS" and i + 1 < len(args):
                return args[i + 1]
        return None
    return args[1] if len(args) > 1 else None


def parse_redirect(message: str) -> tuple[str, int, Address] | None:
    """``("MOVED"|"ASK", slot, (host, port))`` from a redirection error reply, else None."""
    parts = message.split()
    if len(parts) != 3 or parts[0] not in ("MOVED", "ASK"):
        return None
    host, _, port = parts[2].rpartition(":")
    if not host or not port.isdigit():
        return None
    return parts[0], int(parts[1]), (host.strip("[]"), int(port))


def parse_slots(reply: Any, default_host: str) -> dict[int, Address]:
    """
    ``CLUSTER SLOTS`` -> {slot: master address} (each ``[start, end, master, replicas...]`` row
    expanded).  An empty host (a node that doesn't know its own address) means the node we asked.
    """
    ranges: dict[int, Address] = {}
    for row in reply or []:
        start, end, master = int(row[0]), int(row[1]), row[2]
        host = master[0].decode() if isinstance(master[0], bytes) else str(master[0])
        addr = (host or default_host, int(master[1]))
        for slot in range(start, end + 1):
            ranges[slot] = addr
    return ranges


class SlotTable:
    """slot -> master address, with the set of masters it names."""

    def __init__(self) -> None:
        self._owner: list[Address | None] = [None] * SLOTS

    @property
    def loaded(self) -> bool:
        return any(a is not None for a in self._owner)

    def load(self, owners: dict[int, Address]) -> None:
        table: list[Address | None] = [None] * SLOTS
        for slot, addr in owners.items():
            table[slot] = addr
        self._owner = table

    def owner(self, slot: int) -> Address | None:
        return self._owner[slot]

    def move(self, slot: int, addr: Address) -> None:
        self._owner[slot] = addr

    def masters(self) -> list[Address]:
        return sorted({a for a in self._owner if a is not None})
