"""
Producer authentication and the per-key event rate limit.

Keys are ``id:secret`` pairs.  A producer sends ``Authorization: Bearer <secret>``; the secret is
compared with *every* configured key using :func:`hmac.compare_digest`, without stopping at the
first match, so the time taken does not reveal which key (or how much of one) matched.  Only
the key id ever reaches logs and metrics.
"""

from __future__ import annotations

import hmac
import math
from typing import Callable, Iterable

from payflux.config import ApiKey
from payflux.ingest.errors import rate_limited, unauthorized

DEV_KEY_ID = "dev"

#: Query parameters refused outright (matched case-insensitively): a key in a URL ends up in
#: proxy and access logs, browser history and Referer headers.
QUERY_CREDENTIALS = frozenset({
    b"api_key", b"apikey", b"api-key", b"key", b"token", b"access_token", b"secret", b"authorization", b"bearer",
})


class Authenticator:
    def __init__(self, keys: Iterable[ApiKey], revoked: Iterable[str] = (), dev_mode: bool = False):
        self._keys = tuple(keys)
        self._revoked = frozenset(revoked)
        self.dev_mode = dev_mode

    def authenticate(self, authorization: bytes | None, query_args: dict | None = None) -> str:
        """Return the key id of the caller or raise a 401 :class:`ApiError`."""
        if query_args and any(k.lower() in QUERY_CREDENTIALS for k in query_args):
            raise unauthorized("credentials in the query string are refused; use the Authorization header")
        if authorization is None or (self.dev_mode and not self._keys):
            # Insecure dev mode without keys takes any caller, with or without a key (a producer
            # written for the Go PayFlux always sends one), as key id "dev".
            if self.dev_mode:
                return DEV_KEY_ID
            raise unauthorized("missing Authorization: Bearer <api key>")
        scheme, _, token = authorization.partition(b" ")
        token = token.strip()
        if scheme.lower() != b"bearer" or not token:
            raise unauthorized("Authorization must be 'Bearer <api key>'")
        found: ApiKey | None = None
        for key in self._keys:
            if hmac.compare_digest(key.secret, token):
                found = key
        if found is None:
            raise unauthorized("unknown API key")
        if found.key_id in self._revoked:
            raise unauthorized("API key revoked")
        return found.key_id


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

