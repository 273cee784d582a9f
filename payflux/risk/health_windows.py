"""
The lazily rolled windows of processor health and retry insight (:mod:`payflux.risk.health`).

A :class:`Window` holds one key's counts: the open second's, the closed seconds still in the
window (a deque: only seconds with events take room), their totals, and an EWMA baseline of
the counts of the seconds that left the window (the rule of docs/risk.md, "The rate rule": the
baseline describes the time before the window).  Nothing is closed every second: a key's open
second is moved into the deque when the key is next touched (:func:`roll`) or read
(:func:`advance`), and the seconds leaving the window are folded into the baseline then, with
the decay of the seconds in between, so a key costs nothing in the seconds it has no events.
Pure Python, no clock: time is the bucket numbers the caller passes.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

OTHER_GEO = "<other>"  # a processor's geos beyond the geo_bucket cap, in its baseline's entropy


class Window:
    """
    Lazily rolled counts of one key: ``cur`` is its open second ``cur_b``; ``hist`` the closed
    seconds still in the window (``(bucket, counts, geo_counts)``), ``sums`` their totals; ``ewma``
    the baseline, an EWMA of the counts of the seconds that left the window, last folded at
    second ``folded``; ``secs`` the same EWMA of the number of seconds (so ``ewma / secs`` is a
    per-second rate).  ``geo``: failures by geo_bucket (processors only; None otherwise).
    """

    __slots__ = ("key", "first", "last_seen", "cur_b", "cur", "cur_geo", "hist", "sums", "geo_sums", "ewma",
                 "geo_ewma", "secs", "folded", "hot", "scores", "children")

    def __init__(self, key: Any, bucket: int, size: int, geo: bool = False) -> None:
        self.key = key
        self.first = bucket
        self.last_seen = bucket
        self.cur_b = bucket
        self.cur = [0] * size
        self.cur_geo: dict | None = {} if geo else None
        self.hist: deque = deque()
        self.sums = [0] * size
        self.geo_sums: dict | None = {} if geo else None
        self.ewma = [0.0] * size
        self.geo_ewma: dict | None = {} if geo else None
        self.secs = 0.0
        self.folded = bucket - 1       # every second up to this one has left the window
        self.hot = False               # band >= high at the last score: the baseline is frozen
        self.scores: Any = None    # processors: deque of (second, score) of the last trajectory_seconds
        self.children: Any = None  # processors: their _Followed merchants and geos


def push(s: Window) -> None:
    """Close ``s``'s open second into ``hist`` (called when the key moves to a later second)."""
    cur = s.cur
    if any(cur):
        sums = s.sums
        for i in range(len(cur)):
            sums[i] += cur[i]
        g = s.cur_geo
        if g is not None:
            gs = s.geo_sums
            for k, v in g.items():
                gs[k] = gs.get(k, 0) + v  # type: ignore[union-attr]
            s.cur_geo = {}
        s.hist.append((s.cur_b, cur, g))
        s.cur = [0] * len(cur)


def expire(s: Window, last_closed: int, window: int, decay: float, geo_cap: int) -> None:
    """Fold the seconds up to ``last_closed - window`` (they left the window) into the baseline."""
    hist = s.hist
    edge = last_closed - window
    while hist and hist[0][0] <= edge:
        b, counts, geo = hist.popleft()
        sums = s.sums
        for i in range(len(counts)):
            sums[i] -= counts[i]
        if geo is not None:
            gs = s.geo_sums
            for k, v in geo.items():
                left = gs[k] - v  # type: ignore[index]
                if left:
                    gs[k] = left  # type: ignore[index]
                else:
                    del gs[k]  # type: ignore[union-attr]
        _fold(s, b, counts, geo, decay, geo_cap)


def _fold(s: Window, b: int, counts: list | None, geo: dict | None, decay: float, geo_cap: int) -> None:
    """The baseline after second ``b`` left the window with ``counts`` (None: an empty second)."""
    gap = b - s.folded
    if gap <= 0:
        return
    s.folded = b
    if s.hot:
        return  # frozen: an incident never becomes the baseline
    f = decay ** gap
    e = s.ewma
    for i in range(len(e)):
        e[i] *= f
    if counts is not None:
        for i in range(len(e)):
            e[i] += counts[i]
    s.secs = s.secs * f + (1.0 - f) / (1.0 - decay)
    ge = s.geo_ewma
    if ge is not None:
        if f != 1.0:
            for k in list(ge):
                v = ge[k] * f
                if v < 1e-3:
                    del ge[k]
                else:
                    ge[k] = v
        if geo:
            for k, v in geo.items():
                if k not in ge and len(ge) >= geo_cap:
                    k = OTHER_GEO
                ge[k] = ge.get(k, 0.0) + v


def roll(s: Window, b: int, window: int, decay: float, geo_cap: int = 0) -> None:
    """``s`` is touched in second ``b``: close its open second if that is an earlier one."""
    if s.cur_b < b:
        push(s)
        s.cur_b = b
        expire(s, b - 1, window, decay, geo_cap)


def advance(s: Window, last_closed: int, window: int, decay: float, geo_cap: int = 0) -> None:
    """Bring ``s`` to the moment second ``last_closed`` closed: its window is the ``window``
    seconds ending there, its baseline everything before."""
    if s.cur_b <= last_closed:
        push(s)
        s.cur_b = last_closed + 1
    expire(s, last_closed, window, decay, geo_cap)
    _fold(s, last_closed - window, None, None, decay, geo_cap)


def entropy(counts: Any) -> float:
    total = sum(counts)
    if total <= 0:
        return 0.0
    h = 0.0
    for c in counts:
        if c > 0:
            p = c / total
            h -= p * math.log2(p)
    return h
