"""
Producer authentication: which API key (if any) a request carries (:class:`Authenticator`).
The per-key rate limit checked next is :mod:`payflux.ingest.ratelimit`.

Keys are ``id:secret`` pairs.  A producer sends ``Authorization: Bearer <secret>``; the secret is
compared with *every* configured key using :func:`hmac.compare_digest`, without stopping at the
first match, so the time taken does not reveal which key (or how much of one) matched.  Only
the key id ever reaches logs and metrics.
"""

from __future__ import annotations

import hmac
from typing import Iterable

from payflux.config import ApiKey
from payflux.ingest.errors import ApiError, unauthorized

DEV_KEY_ID = "dev"

#: Query parameters refused outright (matched case-insensitively): a key in a URL ends up in
#: proxy and access logs, browser history and Referer headers.
QUERY_CREDENTIALS = frozenset({
    b"api_key", b"apikey", b"api-key", b"key", b"token", b"access_token", b"secret", b"authorization", b"bearer",
})


def refuse_query_credentials(query_args: dict | None) -> None:
    """A 401 for a request carrying a key in its query string (:data:`QUERY_CREDENTIALS`)."""
    if query_args and any(k.lower() in QUERY_CREDENTIALS for k in query_args):
        raise unauthorized("credentials in the query string are refused; use the Authorization header")


def bearer_token(authorization: bytes, kind: str) -> bytes:
    """The token of ``Authorization: Bearer <token>``; a 401 naming ``kind`` for any other form."""
    scheme, _, token = authorization.partition(b" ")
    token = token.strip()
    if scheme.lower() != b"bearer" or not token:
        raise unauthorized(f"Authorization must be 'Bearer <{kind}>'")
    return token


def matching_key(keys: Iterable[ApiKey], token: bytes) -> ApiKey | None:
    """The key whose secret is ``token``, compared with every key in constant time (no early
    exit, so the time taken does not tell which key, or how much of one, matched)."""
    found: ApiKey | None = None
    for key in keys:
        if hmac.compare_digest(key.secret, token):
            found = key
    return found


class Authenticator:
    def __init__(self, keys: Iterable[ApiKey], revoked: Iterable[str] = (), dev_mode: bool = False):
        self._keys = tuple(keys)
        self._revoked = frozenset(revoked)
        self.dev_mode = dev_mode

    def authenticate(self, authorization: bytes | None, query_args: dict | None = None) -> str:
        """Return the key id of the caller or raise a 401 :class:`ApiError`."""
        refuse_query_credentials(query_args)
        if authorization is None or (self.dev_mode and not self._keys):
            # Insecure dev mode without keys takes any caller, with or without a key (a producer
            # written for the Go PayFlux always sends one), as key id "dev".
            if self.dev_mode:
                return DEV_KEY_ID
            raise unauthorized("missing Authorization: Bearer <api key>")
        found = matching_key(self._keys, bearer_token(authorization, "api key"))
        if found is None:
            raise unauthorized("unknown API key")
        if found.key_id in self._revoked:
            raise unauthorized("API key revoked")
        return found.key_id



class AdminAuthenticator:
    """
    Operator authentication for the alerts API on the side listener: ``Authorization: Bearer
    <secret>`` of an ``admin_keys`` entry, compared like :class:`Authenticator` (every key, admin
    and producer alike, with :func:`hmac.compare_digest`, no early exit).  There is no dev mode:
    without ``admin_keys`` every request is refused, so the API is never open.
    """

    def __init__(self, admin_keys: Iterable[ApiKey], producer_keys: Iterable[ApiKey] = ()):
        self._admin = tuple(admin_keys)
        self._producer = tuple(producer_keys)

    def authenticate(self, authorization: bytes | None, query_args: dict | None = None) -> str:
        """The admin key id of the caller; a 401 (no, bad or unknown key) or 403 (a producer key) ApiError."""
        refuse_query_credentials(query_args)
        if not self._admin:
            raise unauthorized("admin_keys is not configured on this node; the alerts API takes an admin key "
                               "(docs/risk.md, \"Alerts API\")")
        if authorization is None:
            raise unauthorized("missing Authorization: Bearer <admin key>")
        token = bearer_token(authorization, "admin key")
        admin = matching_key(self._admin, token)
        producer = matching_key(self._producer, token)  # compared whatever the first found
        if admin is not None:
            return admin.key_id
        if producer is not None:
            raise ApiError(403, "forbidden", "this is a producer key; the alerts API takes an admin key")
        raise unauthorized("unknown admin key")
