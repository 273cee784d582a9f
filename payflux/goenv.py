"""
The Go PayFlux's environment, read by a PayFlux node (docs/migrating-from-go.md).

A team moving off the Go program starts PayFlux with its environment unchanged: each Go
variable with a PayFlux counterpart becomes that setting (with PayFlux's semantics, which are
the safer ones where they differ), the Go-only ones are named in one warning, and nothing fails
except a value the Go program's own pre-flight check refused too (garbage numbers, zero rates).

Precedence: a Go variable is the weakest source of its setting.  A PayFlux setting given in the
config file, as ``PAYFLUX_<NAME>`` (non-empty) or on the command line wins, and the Go variable
is then logged as ignored.  Two names are shared with PayFlux's own settings:

- ``PAYFLUX_API_KEYS``: an entry that parses as PayFlux ``id:secret`` (id 1-64 of
  ``[A-Za-z0-9_-]``, secret >= 16 characters without whitespace) is read the PayFlux way; any
  other entry is a bare Go secret, given the key id :func:`key_id_for` (``k_`` + 12 hex of its
  SHA-256, never a part of it).  A bare secret that itself looks like ``id:secret`` is read the
  PayFlux way: that is the one ambiguity, documented.
- ``PAYFLUX_REVOKED_KEYS``: an entry equal to a configured key id revokes that id; any other
  entry is a bare Go secret and revokes every configured key holding it (and its derived id).

Everything here is pure: :func:`translate` takes the environment and the raw settings already
given, :meth:`GoEnv.revoke` the final key list; :func:`log_go_env` logs what they found, once
per node (the node, or a ``--workers`` supervisor, never each worker).  No secret value appears
in any log line or error: secrets are shown as ``<secret>`` and named by key id.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from typing import Any, Iterable, Mapping

import attrs

from payflux.configbase import ApiKey, ConfigError
from payflux.redis.target import parse_redis_url, url_with_password

#: Go variables PayFlux maps onto its own settings.
MAPPED = (
    "HTTP_ADDR",
    "PAYFLUX_API_KEY",
    "PAYFLUX_API_KEYS",
    "PAYFLUX_INGEST_BURST",
    "PAYFLUX_INGEST_RPS",
    "PAYFLUX_RATELIMIT_BURST",
    "PAYFLUX_RATELIMIT_RPS",
    "PAYFLUX_RAW_EVENT_TTL_DAYS",
    "PAYFLUX_REVOKED_KEYS",
    "PAYFLUX_STREAM_MAXLEN",
    "REDIS_ADDR",
    "REDIS_PASSWORD",
    "REDIS_TLS",
)

#: Every other variable the Go program's main.go reads (its startup path, the config fingerprint
#: in internal/startup, the consumer and the /checkout handler): PayFlux has no counterpart.
GO_ONLY = (
    "CONSUMER_NAME",
    "DATABASE_URL",
    "GROUP_NAME",
    "PAYFLUX_BACKPRESSURE_THRESHOLD",
    "PAYFLUX_CONSUMER_NAME",
    "PAYFLUX_ENV",
    "PAYFLUX_EXPORT_FILE",
    "PAYFLUX_EXPORT_MODE",
    "PAYFLUX_INGEST_ENABLED",
    "PAYFLUX_OUTCOME_BURST",
    "PAYFLUX_OUTCOME_RPS",
    "PAYFLUX_PANIC_MODE",
    "PAYFLUX_PILOT_MODE",
    "PAYFLUX_RISK_SCORE_ENABLED",
    "PAYFLUX_RISK_SCORE_THRESHOLDS",
    "PAYFLUX_RISK_SCORE_WINDOW_SEC",
    "PAYFLUX_TIER",
    "PAYFLUX_TIER2_ENABLED",
    "PAYFLUX_WARNINGS_ENABLED",
    "PRICE_CENTS",
    "PRODUCT_NAME",
    "SITE_URL",
    "STREAM_KEY",
    "STRIPE_API_KEY",
)

SHORT_SECRET = 16
_KEY_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_GO_INT = re.compile(r"[+-]?[0-9]+")
_SOURCE = {"env": "PAYFLUX_{upper}", "file": "the config file", "cli": "--{flag}"}


class GoEnvError(ConfigError):
    """A Go variable's value is invalid; ``str()`` names the variable (never a secret value)."""

    def __init__(self, variable: str, option: str, message: str):
        super().__init__(option, message)
        self.variable = variable

    def __str__(self) -> str:
        return f"invalid {self.variable} (Go PayFlux variable, read as {self.option}): {self.message}"


def key_id_for(secret: str) -> str:
    """The stable key id of a bare Go secret: ``k_`` + the first 12 hex of its SHA-256."""
    return "k_" + hashlib.sha256(secret.encode("utf-8")).hexdigest()[:12]


def is_payflux_key(entry: str) -> bool:
    """True if ``entry`` is a PayFlux ``id:secret`` key (see the module docstring)."""
    key_id, sep, secret = entry.partition(":")
    key_id, secret = key_id.strip(), secret.strip()
    return (bool(sep) and _KEY_ID.fullmatch(key_id) is not None and len(secret) >= SHORT_SECRET
            and not any(c.isspace() for c in secret))


@attrs.define
class GoEnv:
    """What :func:`translate` found: raw option values, extra keys, log lines, ignored names."""

    overrides: dict[str, Any] = attrs.Factory(dict)  # option -> raw value (source "go-env")
    api_keys: list[ApiKey] = attrs.Factory(list)  # bare Go secrets, with derived key ids
    lines: list[str] = attrs.Factory(list)  # one info line per Go variable used or overridden
    warnings: list[str] = attrs.Factory(list)  # short secrets, Go defaults PayFlux doesn't share
    ignored: tuple[str, ...] = ()  # Go-only variables that are set
    revoke_from_env: bool = False  # revoked_keys came from PAYFLUX_REVOKED_KEYS

    def revoke(self, entries: Iterable[str], keys: Iterable[ApiKey]) -> tuple[str, ...]:
        """
        The revoked key ids: ``entries`` as they are unless they came from
        ``PAYFLUX_REVOKED_KEYS``, where an entry that is no configured key id is a bare Go
        secret, replaced by the ids of the keys holding it and its derived id.
        """
        entries = tuple(entries)
        if not self.revoke_from_env:
            return entries
        keys = tuple(keys)
        ids = {k.key_id for k in keys}
        revoked: list[str] = []
        for n, entry in enumerate(entries, 1):
            if entry in ids:
                revoked.append(entry)
                continue
            secret = entry.encode("utf-8")
            holders = [k.key_id for k in keys if hmac.compare_digest(k.secret, secret)]
            derived = key_id_for(entry)
            matched = [derived] + [i for i in holders if i != derived]
            revoked.extend(matched)
            self.lines.append(f"PAYFLUX_REVOKED_KEYS entry {n}=<secret> -> revoked_keys "
                              f"(key id {', '.join(matched)})")
        return tuple(dict.fromkeys(revoked))


def _shown(option: str, source: str) -> str:
    return _SOURCE.get(source, source).format(upper=option.upper(), flag=option.replace("_", "-"))


def _given(raw: Mapping[str, tuple[Any, str]], option: str) -> str | None:
    """The source that gave ``option`` a value (an empty string counts as not given), or None."""
    if option not in raw:
        return None
    value, source = raw[option]
    if isinstance(value, str) and not value.strip():
        return None
    if isinstance(value, (list, tuple)) and not value:
        return None
    return source


def _go_int(variable: str, option: str, text: str, lo: int, hi: int) -> int:
    """A Go ``strconv.Atoi`` integer from ``lo`` to ``hi``, else a GoEnvError naming ``variable``."""
    if not _GO_INT.fullmatch(text):
        shown = text if len(text) <= 40 else text[:40] + "..."
        raise GoEnvError(variable, option, f"must be a whole number from {lo} to {hi}, got {shown!r}")
    number = int(text)
    if not lo <= number <= hi:
        raise GoEnvError(variable, option, f"must be a whole number from {lo} to {hi}, got {number}")
    return number


_HOST = re.compile(r"[A-Za-z0-9._-]*")
_IPV6 = re.compile(r"[0-9A-Fa-f:.]+(%[A-Za-z0-9_.-]+)?")


def _host_port(variable: str, option: str, text: str) -> tuple[str, int]:
    """
    Go's ``host:port`` / ``[ipv6]:port`` (host may be empty: all interfaces, or the local
    system for a client).  The value is echoed in errors only when it can't hold a credential.
    """
    if "@" in text or "/" in text:
        raise GoEnvError(variable, option, "must be host:port (no scheme or credentials; the Redis "
                                           "password goes in REDIS_PASSWORD)")
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else None
        if not _IPV6.fullmatch(host) or ":" not in host:
            port = None
    else:
        host, sep, port = text.rpartition(":")
        if not sep or not _HOST.fullmatch(host):
            port = None  # no port, an IPv6 address without brackets, or odd characters
    if port is None:
        raise GoEnvError(variable, option, f"must be host:port or [ipv6]:port, got {text[:80]!r}")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise GoEnvError(variable, option, f"port must be a number from 0 to 65535, got {text[:80]!r}")
    return host, int(port)


def _twisted_listen(text: str) -> str:
    """Go ``net.Listen("tcp", HTTP_ADDR)`` as a Twisted endpoint string."""
    host, port = _host_port("HTTP_ADDR", "listen", text)
    if not host:
        return f"tcp:{port}"  # Go's ":8080" (all interfaces; PayFlux: all IPv4 interfaces)
    if ":" in host:
        escaped = host.replace(":", "\\:")  # Twisted endpoint strings escape colons
        return f"tcp6:{port}:interface={escaped}"
    return f"tcp:{port}:interface={host}"


def _redis(addr: str, password: str, tls: str) -> tuple[str, list[str]]:
    """The redis_url for Go's REDIS_ADDR/REDIS_PASSWORD/REDIS_TLS, and what to log about it."""
    if tls not in ("", "true", "false"):
        raise GoEnvError("REDIS_TLS", "redis_url", f"must be true or false, got {tls[:20]!r} "
                                                   "(the Go program read anything but true as false)")
    host, port = _host_port("REDIS_ADDR", "redis_url", addr or "localhost:6379")
    if port == 0:
        raise GoEnvError("REDIS_ADDR", "redis_url", f"port must be a number from 1 to 65535, got {addr!r}")
    host = host or "localhost"  # go-redis dials the local system for ":6379"
    url = f"{'rediss' if tls == 'true' else 'redis'}://{f'[{host}]' if ':' in host else host}:{port}/0"
    try:
        parse_redis_url(url)
    except ValueError as e:
        raise GoEnvError("REDIS_ADDR", "redis_url", str(e)) from None
    if addr:
        lines = [f"REDIS_ADDR={addr} -> redis_url {url}"]
    else:
        lines = [f"REDIS_ADDR unset -> redis_url {url} (the Go default, as REDIS_PASSWORD or REDIS_TLS is set)"]
    if password:
        url = url_with_password(url, password)
        lines.append("REDIS_PASSWORD=<secret> -> redis_url password")
    if tls == "true":
        lines.append("REDIS_TLS=true -> redis_url rediss:// (TLS, server certificate verified)")
    return url, lines


def translate(env: Mapping[str, str], raw: Mapping[str, tuple[Any, str]]) -> GoEnv:
    """
    The Go variables in ``env`` as PayFlux raw option values, given ``raw``: what the config
    file, ``PAYFLUX_<NAME>`` and the command line already set (option -> (value, source)).
    Raises :class:`GoEnvError` for a value the Go program would have refused.
    """
    out = GoEnv()
    value = {name: env.get(name, "").strip() for name in MAPPED + GO_ONLY}
    value["REDIS_PASSWORD"] = env.get("REDIS_PASSWORD", "")  # taken as is, like Go

    def ignored_line(variable: str, option: str, shown: str) -> None:
        out.lines.append(f"{variable}={shown} ignored: {option} is set by {_shown(option, _given(raw, option))}")

    # Redis: REDIS_ADDR, REDIS_PASSWORD, REDIS_TLS (a password or TLS alone means Go's localhost:6379)
    redis_vars = [v for v in ("REDIS_ADDR", "REDIS_PASSWORD", "REDIS_TLS") if value[v]]
    if not value["REDIS_ADDR"] and not value["REDIS_PASSWORD"] and value["REDIS_TLS"] != "true":
        _redis("", "", value["REDIS_TLS"])  # validated; "false" alone is the default spelled out
        redis_vars = []
    if redis_vars:
        password_file = _given(raw, "redis_password_file") is not None
        url, lines = _redis(value["REDIS_ADDR"], "" if password_file else value["REDIS_PASSWORD"], value["REDIS_TLS"])
        if _given(raw, "redis_url"):
            for v in redis_vars:
                ignored_line(v, "redis_url", "<secret>" if v == "REDIS_PASSWORD" else value[v])
        else:
            out.overrides["redis_url"] = url
            out.lines.extend(lines)
            if password_file and value["REDIS_PASSWORD"]:
                ignored_line("REDIS_PASSWORD", "redis_password_file", "<secret>")

    if value["HTTP_ADDR"]:
        endpoint = _twisted_listen(value["HTTP_ADDR"])
        if _given(raw, "listen"):
            ignored_line("HTTP_ADDR", "listen", value["HTTP_ADDR"])
        else:
            out.overrides["listen"] = endpoint
            out.lines.append(f"HTTP_ADDR={value['HTTP_ADDR']} -> listen {endpoint}")

    # Rate limit: the Go ingest path enforces PAYFLUX_INGEST_RPS/_BURST (getRateLimiter);
    # PAYFLUX_RATELIMIT_RPS/_BURST were only logged there, so they are the fallback here.
    for option, ingest, legacy in (("rate_limit", "PAYFLUX_INGEST_RPS", "PAYFLUX_RATELIMIT_RPS"),
                                   ("rate_burst", "PAYFLUX_INGEST_BURST", "PAYFLUX_RATELIMIT_BURST")):
        numbers = {v: _go_int(v, option, value[v], 1, 1_000_000_000) for v in (ingest, legacy) if value[v]}
        unit = " events/s per key" if option == "rate_limit" else " events"
        for n, variable in enumerate(v for v in (ingest, legacy) if v in numbers):
            if _given(raw, option):
                ignored_line(variable, option, value[variable])
            elif n:
                out.lines.append(f"{variable}={value[variable]} ignored: {ingest} is set (and wins, as in the "
                                 "Go ingest path)")
            else:
                out.overrides[option] = str(numbers[variable])
                out.lines.append(f"{variable}={value[variable]} -> {option} {numbers[variable]}{unit}")

    if value["PAYFLUX_STREAM_MAXLEN"]:
        length = _go_int("PAYFLUX_STREAM_MAXLEN", "retention_max_length", value["PAYFLUX_STREAM_MAXLEN"], 0, 10**12)
        if _given(raw, "retention_max_length"):
            ignored_line("PAYFLUX_STREAM_MAXLEN", "retention_max_length", value["PAYFLUX_STREAM_MAXLEN"])
        else:
            out.overrides["retention_max_length"] = str(length)
            note = " (0 = no limit)" if not length else " (trims only entries every consumer group has consumed)"
            out.lines.append(f"PAYFLUX_STREAM_MAXLEN={value['PAYFLUX_STREAM_MAXLEN']} -> retention_max_length "
                             f"{length}{note}")
    if value["PAYFLUX_RAW_EVENT_TTL_DAYS"]:
        days = _go_int("PAYFLUX_RAW_EVENT_TTL_DAYS", "retention_max_age", value["PAYFLUX_RAW_EVENT_TTL_DAYS"], 0, 3650)
        if _given(raw, "retention_max_age"):
            ignored_line("PAYFLUX_RAW_EVENT_TTL_DAYS", "retention_max_age", value["PAYFLUX_RAW_EVENT_TTL_DAYS"])
        else:
            out.overrides["retention_max_age"] = str(days * 86400)
            note = " (0 = no age limit)" if not days else " (trims only entries every consumer group has consumed)"
            out.lines.append(f"PAYFLUX_RAW_EVENT_TTL_DAYS={value['PAYFLUX_RAW_EVENT_TTL_DAYS']} -> retention_max_age "
                             f"{days * 86400}s{note}")

    _keys(value, raw, out)
    out.revoke_from_env = raw.get("revoked_keys", (None, None))[1] == "env"

    out.ignored = tuple(sorted(name for name in GO_ONLY if value[name]))
    go_style = out.ignored or any(value[v] for v in MAPPED if not v.startswith(("PAYFLUX_API_KEY", "PAYFLUX_REVOKED")))
    if go_style and not redis_vars and not _given(raw, "redis_url"):
        out.warnings.append("REDIS_ADDR is not set: the Go program used localhost:6379 then, PayFlux runs its "
                            "embedded Redis; set REDIS_ADDR=localhost:6379 to keep using that Redis")
    return out


def _bare(variable: str, secret: str, out: GoEnv) -> None:
    key = ApiKey(key_id_for(secret), secret.encode("utf-8"))
    if all(k.key_id != key.key_id for k in out.api_keys):  # Go accepts a key listed twice
        out.api_keys.append(key)
    out.lines.append(f"{variable}=<secret> -> api_keys (key id {key.key_id})")
    if len(secret) < SHORT_SECRET:
        out.warnings.append(f"{variable}: the secret of key id {key.key_id} is shorter than {SHORT_SECRET} characters "
                            "(accepted, as the Go program did outside PAYFLUX_ENV=prod); rotate to a longer one")


def _keys(value: Mapping[str, str], raw: Mapping[str, tuple[Any, str]], out: GoEnv) -> None:
    """PAYFLUX_API_KEYS bare entries, and the PAYFLUX_API_KEY fallback (Go: used only without the list)."""
    keys_value, keys_source = raw.get("api_keys", ((), None))
    if keys_source == "env":
        entries = [e.strip() for e in str(keys_value).split(",") if e.strip()]
        if not all(is_payflux_key(e) for e in entries):
            out.overrides["api_keys"] = tuple(e for e in entries if is_payflux_key(e))
            for n, entry in enumerate(entries, 1):
                if not is_payflux_key(entry):
                    _bare(f"PAYFLUX_API_KEYS entry {n}", entry, out)
    single = value["PAYFLUX_API_KEY"]
    if not single:
        return
    listed = _given(raw, "api_keys") and (keys_source != "env" or any(e.strip() for e in str(keys_value).split(",")))
    if listed and keys_source == "env":
        out.lines.append("PAYFLUX_API_KEY=<secret> ignored: PAYFLUX_API_KEYS is set (the Go program ignored it too)")
    elif listed or _given(raw, "api_keys_file"):
        option = "api_keys" if listed else "api_keys_file"
        out.lines.append(f"PAYFLUX_API_KEY=<secret> ignored: {option} is set by {_shown(option, _given(raw, option))}")
    else:
        _bare("PAYFLUX_API_KEY", single, out)


def log_go_env(settings: Any) -> None:
    """Log, once at start, what the node took from the Go PayFlux's environment."""
    from twisted.logger import Logger

    log = Logger(namespace="payflux.goenv")
    for line in getattr(settings, "legacy_env", ()):
        log.info("go env: {line}", line=line, event="go_env")
    for line in getattr(settings, "legacy_warnings", ()):
        log.warn("go env: {line}", line=line, event="go_env")
    ignored = getattr(settings, "legacy_ignored", ())
    if ignored:
        log.warn("go env: Go PayFlux variables PayFlux does not implement, ignored: {names} "
                 "(see docs/migrating-from-go.md)", names=", ".join(ignored), event="go_env_ignored")
