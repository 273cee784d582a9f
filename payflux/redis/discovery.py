"""
Finding the primary through Redis Sentinel, written once (bottom layer of :mod:`payflux.redis`).

:func:`primary_steps` is the conversation both sentinel clients have: ask each sentinel in turn
``SENTINEL get-master-addr-by-name <name>``, skip one that is down, slow or does not monitor the
name, and (when asked to) check that the node it names answers ``ROLE`` ``master``.  It is a
step generator (:mod:`payflux.redis.steps`) whose steps name *where* a command goes:

- ``("SENTINEL", addr)`` — ask the sentinel at ``addr``; the reply is
  ``get-master-addr-by-name``'s, or the exception of a sentinel that could not answer;
- ``("ROLE", addr)`` — ``ROLE`` of the node at ``addr`` (only with ``check_role``).

The daemon's pool (:mod:`payflux.redis.sentinel`) drives it on the reactor and checks ROLE on
every connection it makes instead (``check_role=False``); the CLI (:mod:`payflux.redis.sync`)
drives it blocking, with ``check_role=True``.  Either way the result is ``(sentinel, primary)``
addresses, or :class:`NoPrimary` listing what each sentinel said.
"""

from __future__ import annotations

from typing import Sequence

from payflux.redis.replies import is_primary, parse_master_reply
from payflux.redis.steps import Steps

Address = tuple[str, int]


class NoPrimary(Exception):
    """No sentinel named a usable primary; ``str()`` lists what each one said, ``; ``-separated."""


def primary_steps(sentinels: Sequence[Address], master_name: str, check_role: bool) -> Steps:
    """Ask ``sentinels`` in order where ``master_name``'s primary is (see the module docstring)."""
    problems = []
    for addr in sentinels:
        try:
            master = parse_master_reply((yield ("SENTINEL", addr)))
        except Exception as e:  # noqa: BLE001 - try the next sentinel
            problems.append(f"{addr[0]}:{addr[1]}: {e}")
            continue
        if master is None:
            problems.append(f"{addr[0]}:{addr[1]} does not monitor {master_name!r}")
            continue
        if check_role and not is_primary((yield ("ROLE", master))):
            problems.append(f"{addr[0]}:{addr[1]} names {master[0]}:{master[1]}, which is not a primary "
                            "(failover running?)")
            continue
        return addr, master
    raise NoPrimary("; ".join(problems))
