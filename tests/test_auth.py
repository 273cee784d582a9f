"""Authentication and the per-key event rate limit, driven by a fake clock."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from payflux.config import ApiKey
from payflux.ingest.auth import Authenticator, RateLimiter
from payflux.ingest.errors import ApiError

OLD = ApiKey("old", b"old-secret-0123456789")
NEW = ApiKey("new", b"new-secret-0123456789")


class AuthenticatorTests(SynchronousTestCase):
    def assertUnauthorized(self, auth, header, query=None, contains=""):
        with self.assertRaises(ApiError) as cm:
            auth.authenticate(header, query)
        self.assertEqual(cm.exception.status, 401)
        self.assertIn(contains, cm.exception.message)
        self.assertEqual(cm.exception.headers["WWW-Authenticate"], 'Bearer realm="payflux"')

    def test_rotation_both_keys_work(self):
        auth = Authenticator([OLD, NEW])
        self.assertEqual(auth.authenticate(b"Bearer old-secret-0123456789"), "old")
        self.assertEqual(auth.authenticate(b"bearer new-secret-0123456789"), "new")

    def test_refusals(self):
        auth = Authenticator([OLD, NEW], revoked=["old"])
        self.assertUnauthorized(auth, None, contains="missing")
        self.assertUnauthorized(auth, b"Basic b2xkOnNlY3JldA==", contains="Bearer")
        self.assertUnauthorized(auth, b"Bearer ", contains="Bearer")
        self.assertUnauthorized(auth, b"Bearer new-secret-012345678", contains="unknown")  # a prefix
        self.assertUnauthorized(auth, b"Bearer new-secret-01234567890", contains="unknown")  # longer
        self.assertUnauthorized(auth, b"Bearer old-secret-0123456789", contains="revoked")
        self.assertUnauthorized(auth, b"Bearer new-secret-0123456789", {b"api_key": [b"x"]}, contains="query")

    def test_dev_mode_accepts_missing_key_but_not_a_wrong_one(self):
        auth = Authenticator([], dev_mode=True)
        self.assertEqual(auth.authenticate(None), "dev")
        self.assertUnauthorized(auth, b"Bearer wrong-secret-0123456789", contains="unknown")

    def test_every_key_is_compared(self):
        """No early exit: the matching key's position doesn't change how many compares run."""
        import hmac

        calls = []
        real = hmac.compare_digest

        def counting(a, b):
            calls.append(1)
            return real(a, b)

        self.patch(hmac, "compare_digest", counting)
        auth = Authenticator([OLD, NEW, ApiKey("third", b"third-secret-0123456789")])
        auth.authenticate(b"Bearer old-secret-0123456789")
        self.assertEqual(len(calls), 3)


class RateLimiterTests(SynchronousTestCase):
    def test_batch_spends_its_events_and_retry_after_says_when(self):
        clock = Clock()
        limiter = RateLimiter(rate=100, burst=200, seconds=clock.seconds)
        limiter.check("k")
        limiter.spend("k", 500)  # admitted with 200 tokens, now 300 in debt
        with self.assertRaises(ApiError) as cm:
            limiter.check("k")
        self.assertEqual(cm.exception.status, 429)
        self.assertEqual(cm.exception.headers["Retry-After"], "4")  # (1 + 300) / 100 -> 4 s
        clock.advance(3)
        with self.assertRaises(ApiError):
            limiter.check("k")
        clock.advance(1.1)
        limiter.check("k")

    def test_keys_are_independent_and_bucket_caps_at_burst(self):
        clock = Clock()
        limiter = RateLimiter(rate=10, burst=5, seconds=clock.seconds)
        limiter.spend("a", 5)
        with self.assertRaises(ApiError):
            limiter.check("a")
        limiter.check("b")
        clock.advance(1000)
        limiter.spend("a", 5)  # refilled to burst (5), not 10,000
        with self.assertRaises(ApiError):
            limiter.check("a")

    def test_zero_rate_disables(self):
        limiter = RateLimiter(rate=0, burst=1, seconds=Clock().seconds)
        limiter.spend("a", 10**6)
        limiter.check("a")
