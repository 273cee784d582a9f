"""
The per-key event rate limit: :class:`RateLimiter` (one token bucket per key id, in one process)
and :class:`SharedRateLimiter` (``--workers N``: each worker admits from its share of one bucket
per key kept in Redis, :data:`SHARED_BUCKET_SCRIPT`, so a key's limit holds across workers).

Both are counted in events and checked after authentication (:mod:`payflux.ingest.auth`), before
the body is read: ``check(key_id)`` raises the 429 (with Retry-After), ``spend(key_id, events)``
charges a request's events once they are known.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from payflux.ingest.errors import rate_limited
from payflux.redis.scripts import Script, evalsha


class RateLimiter:
    """
    One token bucket per key id, counted in events.

    A request is admitted while the bucket holds at least one token; once its events are known
    it spends one token per event, and the bucket may go into debt (a batch of 500 against a
    bucket of 100 is admitted, then the key waits until the debt is repaid).  This keeps the
    documented check order (429 before the body is parsed) while still charging by events.
    ``rate == 0`` disables limiting.
    """

    def __init__(self, rate: float, burst: int, seconds: Callable[[], float]):
        self.rate = rate
        self.burst = float(burst)
        self._seconds = seconds
        self._buckets: dict[str, tuple[float, float]] = {}

    def _level(self, key_id: str) -> float:
        now = self._seconds()
        tokens, stamp = self._buckets.get(key_id, (self.burst, now))
        tokens = min(self.burst, tokens + (now - stamp) * self.rate)
        self._buckets[key_id] = (tokens, now)
        return tokens

    def check(self, key_id: str) -> None:
        """Raise a 429 :class:`ApiError` with Retry-After if ``key_id`` has no token left."""
        if not self.rate:
            return
        tokens = self._level(key_id)
        if tokens < 1.0:
            raise rate_limited(max(1, math.ceil((1.0 - tokens) / self.rate)))

    def spend(self, key_id: str, events: int) -> None:
        if not self.rate:
            return
        tokens = self._level(key_id)
        self._buckets[key_id] = (tokens - events, self._buckets[key_id][1])


# KEYS[1] = the key's bucket (a hash: tokens, ms).  ARGV = rate (tokens/s), burst, tokens spent.
# Refills by Redis's own clock (one clock for every worker), charges the spend (the bucket may go
# into debt, as in RateLimiter), and returns the level as a string (Lua numbers lose their
# fraction in an integer reply).  The hash expires once it would be full again anyway.
SHARED_BUCKET_SCRIPT = r"""
local rate, burst, spent = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local b = redis.call('HMGET', KEYS[1], 'tokens', 'ms')
local tokens, ms = tonumber(b[1]), tonumber(b[2])
if tokens == nil or ms == nil then tokens, ms = burst, now end
if now > ms then
  tokens = math.min(burst, tokens + (now - ms) * rate / 1000)
  ms = now
end
tokens = tokens - spent
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ms', tostring(ms))
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) * 1000 / rate) + 1000)
return tostring(tokens)
"""
SHARED_BUCKET = Script("shared rate-limit bucket", SHARED_BUCKET_SCRIPT)

#: Seconds between two syncs of one key's bucket from one worker (while the key is busy).
SYNC_INTERVAL = 0.05


class _Share:
    """One worker's view of one key's shared bucket."""

    __slots__ = ("level", "stamp", "unsent", "inflight", "synced_at", "timer")

    def __init__(self, level: float, now: float) -> None:
        self.level = level         # the shared bucket's level at the last sync (all workers' spend in it)
        self.stamp = now           # when that was (this process's clock)
        self.unsent = 0.0          # this worker's spend not yet sent
        self.inflight = 0.0        # this worker's spend in the sync on the wire
        self.synced_at = -math.inf  # when the last sync was sent
        self.timer: Any = None     # a delayed sync, when one is scheduled


class SharedRateLimiter:
    """
    The per-key token bucket of ``--workers N``, shared by the N worker processes through Redis,
    so a key's limit is the same with 1 worker or N (README, Workers).

    The bucket lives in Redis (``<prefix>:ratelimit:<key id>``, :data:`SHARED_BUCKET_SCRIPT`),
    refilled at ``rate`` by Redis's clock.  ``check``/``spend`` stay synchronous (``check`` runs
    before the body is read): each worker admits from **its share** of the bucket, ``1/N`` of
    the level it last read plus ``1/N`` of the refill since, minus its own spend since, and syncs
    with Redis in the background (one script call that charges its spend and returns the new
    level) at most every :data:`SYNC_INTERVAL` seconds per key, and at once when a key starts
    being used.  The shares add up to the shared level, so N workers together admit what one
    bucket would (debt included: a batch bigger than the share is admitted and repaid), whichever
    worker the key's connections land on: a key whose traffic all reaches one worker gets that
    worker's share plus, at each sync, a share of what the idle workers left in the bucket, which
    converges to the whole rate within a few syncs.  Cost: at most ``1/SYNC_INTERVAL`` script
    calls per second per busy key and worker, none per request.  If Redis can't be reached the
    worker goes on with its share (``rate/N``), which is what it would have had anyway.
    """

    def __init__(self, rate: float, burst: int, seconds: Callable[[], float], redis: Any, reactor: Any,
                 workers: int, key_prefix: str, interval: float = SYNC_INTERVAL) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._seconds = seconds
        self._redis = redis
        self._reactor = reactor
        self.workers = max(1, int(workers))
        self._prefix = key_prefix
        self.interval = interval
        self._shares: dict[str, _Share] = {}
        self.syncs = 0  # script calls sent (tests, measurements)

    def key(self, key_id: str) -> str:
        return f"{self._prefix}:ratelimit:{key_id}"

    def _share(self, key_id: str) -> _Share:
        share = self._shares.get(key_id)
        if share is None:
            share = self._shares[key_id] = _Share(self.burst, self._seconds())
        return share

    def available(self, key_id: str) -> float:
        """This worker's share of ``key_id``'s bucket now (may be negative: debt)."""
        share = self._share(key_id)
        level = min(self.burst, share.level + (self._seconds() - share.stamp) * self.rate)
        return level / self.workers - share.unsent - share.inflight

    def check(self, key_id: str) -> None:
        """Raise a 429 :class:`ApiError` with Retry-After if this worker's share of ``key_id`` is spent."""
        if not self.rate:
            return
        tokens = self.available(key_id)
        if tokens < 1.0:
            self._sync_soon(key_id)  # the others may have left tokens: find out before the next request
            raise rate_limited(max(1, math.ceil((1.0 - tokens) * self.workers / self.rate)))

    def spend(self, key_id: str, events: int) -> None:
        if not self.rate:
            return
        self._share(key_id).unsent += events
        self._sync_soon(key_id)

    # --- syncing with Redis ---

    def _sync_soon(self, key_id: str) -> None:
        share = self._share(key_id)
        if share.inflight or share.timer is not None:
            return  # the running sync (or the scheduled one) is followed by another if needed
        wait = share.synced_at + self.interval - self._seconds()
        if wait <= 0:
            self._sync(key_id)
        else:
            share.timer = self._reactor.callLater(wait, self._sync, key_id)

    def _sync(self, key_id: str) -> None:
        share = self._share(key_id)
        share.timer = None
        share.inflight, share.unsent = share.unsent, 0.0
        share.synced_at = self._seconds()
        self.syncs += 1
        args = (str(self.rate), str(self.burst), repr(share.inflight))
        d = evalsha(self._redis, SHARED_BUCKET, [self.key(key_id)], args)
        d.addCallbacks(self._synced, self._sync_failed, callbackArgs=(key_id,), errbackArgs=(key_id,))

    def _synced(self, level: Any, key_id: str) -> None:
        share = self._share(key_id)
        if isinstance(level, bytes):
            level = level.decode()
        share.level, share.stamp, share.inflight = float(level), self._seconds(), 0.0
        if share.unsent:
            self._sync_soon(key_id)

    def _sync_failed(self, failure: Any, key_id: str) -> None:
        # Redis unreachable or slow: keep this worker's own accounting (its spend stays charged
        # to its share) and try again with the next spend; ingest answers 503 meanwhile anyway
        share = self._share(key_id)
        share.level -= share.inflight * self.workers
        share.inflight = 0.0
