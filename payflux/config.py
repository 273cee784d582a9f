"""
Settings for a PayFlux node.

Precedence, lowest to highest: built-in defaults < TOML config file (``--config``) <
``PAYFLUX_<NAME>`` environment variables < command-line options.  Every option has the same
name in all four places (``--max-body-bytes``, ``PAYFLUX_MAX_BODY_BYTES``, ``max_body_bytes``).

Validation happens here, once, and fails with :class:`ConfigError` naming the option and the
accepted values.  Secrets (API keys, Redis passwords) are never echoed back in errors.
"""

from __future__ import annotations

import hmac
import os
import tomllib
from typing import Any, Callable, Iterable, Mapping

import attrs

from payflux.configbase import ApiKey, ConfigError
from payflux.consumers.config import ConsumerConfig, RetentionConfig, consumer_from_table
from payflux.goenv import translate
from payflux.redis.target import parse_redis_url, url_with_password
from payflux.webhooks import parse_hmac_key
from payflux.webhooks.common import MIN_ID_HASH_KEY_BYTES


# --- value parsers: each takes a str (CLI/env) or a TOML value and returns the typed value ---


def _int(lo: int, hi: int) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if isinstance(value, (bool, float)):
            raise ValueError(f"must be an integer from {lo} to {hi}, got {value!r}")
        try:
            number = int(value)
        except (TypeError, ValueError):
            raise ValueError(f"must be an integer from {lo} to {hi}, got {value!r}") from None
        if not lo <= number <= hi:
            raise ValueError(f"must be an integer from {lo} to {hi}, got {number}")
        return number

    return parse


def _float(lo: float, hi: float) -> Callable[[Any], float]:
    def parse(value: Any) -> float:
        if isinstance(value, bool):
            raise ValueError(f"must be a number from {lo:g} to {hi:g}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"must be a number from {lo:g} to {hi:g}, got {value!r}") from None
        if not lo <= number <= hi or number != number:
            raise ValueError(f"must be a number from {lo:g} to {hi:g}, got {value!r}")
        return number

    return parse


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"must be true or false, got {value!r}")


def _optional_bool(value: Any) -> bool | None:
    if isinstance(value, str) and not value.strip():
        return None
    return _bool(value)


def _choice(*accepted: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        text = _str(value).strip().lower()
        if text not in accepted:
            raise ValueError(f"must be one of {', '.join(accepted)}, got {value!r}")
        return text

    return parse


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be a string, got {type(value).__name__}")
    return value


def _optional_str(value: Any) -> str | None:
    text = _str(value).strip()
    return text or None


def _endpoint(value: Any) -> str:
    text = _str(value).strip()
    if not text:
        raise ValueError("must be a Twisted endpoint string such as tcp:8080 or unix:/run/payflux.sock")
    from twisted.internet.endpoints import _parseServer  # validation only, no socket

    try:
        _parseServer(text, None)
    except Exception as e:  # noqa: BLE001 - any parse failure is a config error
        raise ValueError(
            f"must be a Twisted endpoint string such as tcp:8080 or unix:/run/payflux.sock ({e})"
        ) from None
    return text


def _optional_endpoint(value: Any) -> str | None:
    text = _str(value).strip()
    if text.lower() in ("", "none", "off"):
        return None
    return _endpoint(text)


def _list(value: Any) -> tuple[str, ...]:
    if isinstance(value, (list, tuple)):
        items = [_str(v) for v in value]
    else:
        items = _str(value).split(",")
    return tuple(i.strip() for i in items if i.strip())


_ROLES = ("ingest", "consumers")


def _roles(value: Any) -> tuple[str, ...]:
    roles = _list(value)
    if not roles:
        raise ValueError(f"must name at least one role; accepted: {', '.join(_ROLES)}")
    for role in roles:
        if role not in _ROLES:
            raise ValueError(f"unknown role {role!r}; accepted: {', '.join(_ROLES)}")
    return roles


def _secret_list(value: Any) -> tuple[str, ...]:
    """Secrets separated by commas or newlines (a TOML list too); never echoed in an error."""
    if isinstance(value, (list, tuple)):
        items = [_str(v) for v in value]
    else:
        items = _str(value).replace("\n", ",").split(",")
    return tuple(i.strip() for i in items if i.strip())


def _optional_secret(value: Any) -> str | None:
    if not isinstance(value, str):
        raise ValueError("must be a string")
    return value.strip() or None


def _redis_url(value: Any) -> str | None:
    text = _optional_str(value)
    if text is None:
        return None
    try:
        parse_redis_url(text)
    except ValueError as e:
        raise ValueError(str(e)) from None
    return text


MAX_WORKERS = 64


def _workers(value: Any) -> int:
    """An integer 1..64, or ``auto``: one worker per core (at most 64)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return max(1, min(MAX_WORKERS, os.cpu_count() or 1))
    if isinstance(value, (bool, float)):
        raise ValueError(f"must be an integer from 1 to {MAX_WORKERS} or 'auto', got {value!r}")
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"must be an integer from 1 to {MAX_WORKERS} or 'auto', got {value!r}") from None
    if not 1 <= number <= MAX_WORKERS:
        raise ValueError(f"must be an integer from 1 to {MAX_WORKERS} or 'auto', got {number}")
    return number


def _prefix(value: Any) -> str:
    text = _str(value)
    if not text or any(c in text for c in "{} \t\r\n"):
        raise ValueError("must be non-empty without braces or whitespace")
    return text


@attrs.frozen
class Option:
    name: str
    default: Any
    parse: Callable[[Any], Any]
    help: str
    secret: bool = False
    placeholder: str = ""


OPTIONS: tuple[Option, ...] = (
    Option("listen", "tcp:8080", _endpoint, "HTTP ingest listener (Twisted endpoint string)."),
    Option(
        "metrics_listen",
        "tcp:9464:interface=127.0.0.1",
        _optional_endpoint,
        "Side listener for /metrics, /health and /ready; 'none' disables it.",
    ),
    Option(
        "redis_url",
        None,
        _redis_url,
        "redis://[user:pass@]host:port/db, rediss://..., unix:///path.sock, redis+cluster://..., "
        "redis+sentinel://host:port,.../master-name; unset = embedded Redis.",
        secret=True,
    ),
    Option(
        "redis_password_file",
        None,
        _optional_str,
        "File holding the Redis password (e.g. a systemd credential); redis_url then carries none.",
    ),
    Option(
        "ingest_metrics",
        False,
        _bool,
        "Also serve /metrics on the ingest listener (default: only on the side listener).",
    ),
    Option("data_dir", "payflux-data", _str, "Directory of the embedded Redis (AOF, socket)."),
    Option("roles", ("ingest",), _roles, "Comma-separated roles of this node: ingest, consumers."),
    Option(
        "workers",
        1,
        _workers,
        "Worker processes sharing the ingest socket (tcp listen only); 'auto' = one per core.",
    ),
    Option(
        "api_keys",
        (),
        _list,
        "Comma-separated id:secret producer keys (several at once for rotation).",
        secret=True,
    ),
    Option("api_keys_file", None, _optional_str, "File of id:secret lines ('#' comments)."),
    Option(
        "admin_keys",
        (),
        _list,
        "Comma-separated id:secret operator keys for the alerts API on the side listener (distinct from api_keys).",
        secret=True,
    ),
    Option("admin_keys_file", None, _optional_str, "File of id:secret operator key lines ('#' comments)."),
    Option(
        "stripe_webhook_secret",
        (),
        _secret_list,
        "Stripe webhook signing secret(s) (whsec_...), comma-separated while rolling; unset = POST "
        "/v1/webhooks/stripe is off.",
        secret=True,
    ),
    Option("stripe_webhook_secret_file", None, _optional_str, "File of Stripe webhook secrets, one per line ('#' comments)."),
    Option(
        "adyen_hmac_key",
        (),
        _secret_list,
        "Adyen webhook HMAC key(s), hex as the Customer Area shows them, comma-separated while rotating; "
        "unset = POST /v1/webhooks/adyen is off.",
        secret=True,
    ),
    Option("adyen_hmac_key_file", None, _optional_str, "File of Adyen HMAC keys (hex), one per line ('#' comments)."),
    Option(
        "id_hash_key",
        None,
        _optional_secret,
        f"Key (at least {MIN_ID_HASH_KEY_BYTES} bytes) of every *_hash the processor webhooks make; required "
        "when a webhook is on.",
        secret=True,
    ),
    Option("id_hash_key_file", None, _optional_str, "File holding id_hash_key (one line; a trailing newline is dropped)."),
    Option("revoked_keys", (), _list, "Comma-separated key ids that are refused (401)."),
    Option(
        "insecure_dev_mode",
        False,
        _bool,
        "Accept requests without an API key (quick start only; logged loudly).",
    ),
    Option("stream_prefix", "payflux", _prefix, "Prefix of every Redis key PayFlux writes."),
    Option("partitions", 1, _int(1, 1024), "Stream partitions; partition = crc32(merchant_id_hash) % N."),
    Option(
        "dedupe_window",
        86400,
        _int(1, 30 * 86400),
        "Seconds an event_id is remembered for idempotency.",
    ),
    Option("max_batch_events", 1000, _int(1, 100_000), "Most events in one batch request."),
    Option("max_body_bytes", 4 * 1024 * 1024, _int(1024, 256 * 1024 * 1024), "Batch body cap in bytes."),
    Option("max_event_bytes", 64 * 1024, _int(256, 16 * 1024 * 1024), "Single-event body cap in bytes."),
    Option(
        "header_timeout",
        10.0,
        _float(0.1, 3600),
        "Seconds from a request's first byte to the end of its headers, then 408 and close (slowloris).",
    ),
    Option(
        "future_skew",
        300.0,
        _float(0, 86400),
        "Seconds event_timestamp may lie in the future before an event is rejected.",
    ),
    Option(
        "unknown_fields",
        "drop",
        _choice("drop", "reject"),
        "Unknown event fields: drop (accepted, never stored, listed in ignored_fields) or reject (422).",
    ),
    Option(
        "allow_unknown_fields",
        None,
        _optional_bool,
        "Deprecated: true = unknown_fields drop, false = unknown_fields reject.",
    ),
    Option(
        "layout",
        "payflux",
        _choice("payflux", "seed"),
        "Redis layout: payflux (hash-tagged, partitioned) or seed (the Go PayFlux's events_stream).",
    ),
    Option("rate_limit", 10_000.0, _float(0, 1e9), "Events per second per API key; 0 = unlimited."),
    Option("rate_burst", 20_000, _int(1, 1_000_000_000), "Token-bucket size per API key, in events."),
    Option("redis_timeout", 2.0, _float(0.05, 60), "Seconds an append may wait for Redis before 503."),
    Option("redis_pool_size", 8, _int(1, 256), "Redis connections in the ingest pool."),
    Option(
        "min_replicas_ack",
        0,
        _int(0, 64),
        "Replicas that must confirm each append (WAIT) before 2xx; else 503 (written on the primary). 0 = off.",
    ),
    Option(
        "replica_ack_timeout",
        500,
        _int(1, 60_000),
        "Milliseconds an append waits for min_replicas_ack replicas (WAIT timeout); below redis_timeout.",
    ),
    Option(
        "max_inflight_events",
        50_000,
        _int(1, 10_000_000),
        "Events in flight to Redis before new requests get 503.",
    ),
    Option("shutdown_grace", 10.0, _float(0, 600), "Seconds SIGTERM waits for in-flight appends."),
    Option("stats_interval", 5.0, _float(0.1, 3600), "Seconds between stream-length samples."),
    Option(
        "log_format",
        "auto",
        _choice("auto", "json", "text"),
        "Log lines: json (one object per line), text, or auto (json unless stdout is a terminal).",
    ),
    Option(
        "log_level",
        "info",
        _choice("debug", "info", "warn", "error"),
        "Lowest level logged: debug, info, warn, error (Twisted's factory chatter only at debug).",
    ),
    Option(
        "log_summary_interval",
        10.0,
        _float(0, 3600),
        "Seconds per summary of a repeated log line (first logged at once, then counts); 0 = log every line.",
    ),
    Option(
        "retention_max_age",
        7 * 86400.0,
        _float(0, 10 * 365 * 86400),
        "Seconds after which consumed entries may be trimmed; 0 = no age limit.",
    ),
    Option(
        "retention_max_length",
        0,
        _int(0, 10**12),
        "Entries per partition beyond which consumed entries may be trimmed; 0 = no limit.",
    ),
    Option(
        "retention_hard_cap",
        0,
        _int(0, 10**12),
        "Entries per partition never exceeded, even unconsumed (losses counted); 0 = no cap.",
    ),
    Option("retention_interval", 30.0, _float(0, 86400), "Seconds between trim passes; 0 disables trimming."),
    Option("dlq_max_age", 30 * 86400.0, _float(0, 10 * 365 * 86400), "Seconds dead letters are kept; 0 = forever."),
    Option("dlq_max_length", 100_000, _int(0, 10**12), "Dead letters kept per partition; 0 = no limit."),
    Option(
        "alerts_retention_days",
        30,
        _int(1, 3650),
        "Days an alert (its transitions and outcomes) is kept in Redis after its last activity.",
    ),
    Option(
        "group_idle_warning",
        86400.0,
        _float(1, 365 * 86400),
        "Seconds without any consumer reading a group before payflux group list / stream info call it stale.",
    ),
)

OPTIONS_BY_NAME = {o.name: o for o in OPTIONS}


@attrs.frozen
class Settings:
    """Validated, typed settings of one node.  Build with :func:`load_settings`."""

    listen: str
    metrics_listen: str | None
    redis_url: str | None = attrs.field(repr=False)
    redis_password_file: str | None
    ingest_metrics: bool
    data_dir: str
    roles: tuple[str, ...]
    workers: int
    api_keys: tuple[ApiKey, ...] = attrs.field(repr=False)
    api_keys_file: str | None
    admin_keys: tuple[ApiKey, ...] = attrs.field(repr=False)
    admin_keys_file: str | None
    stripe_webhook_secret: tuple[bytes, ...] = attrs.field(repr=False)
    stripe_webhook_secret_file: str | None
    adyen_hmac_key: tuple[bytes, ...] = attrs.field(repr=False)
    adyen_hmac_key_file: str | None
    id_hash_key: bytes | None = attrs.field(repr=False)
    id_hash_key_file: str | None
    revoked_keys: tuple[str, ...]
    insecure_dev_mode: bool
    stream_prefix: str
    partitions: int
    dedupe_window: int
    max_batch_events: int
    max_body_bytes: int
    max_event_bytes: int
    header_timeout: float
    future_skew: float
    unknown_fields: str
    allow_unknown_fields: bool | None
    layout: str
    rate_limit: float
    rate_burst: int
    redis_timeout: float
    redis_pool_size: int
    min_replicas_ack: int
    replica_ack_timeout: int
    max_inflight_events: int
    shutdown_grace: float
    stats_interval: float
    log_format: str
    log_level: str
    log_summary_interval: float
    retention_max_age: float
    retention_max_length: int
    retention_hard_cap: int
    retention_interval: float
    dlq_max_age: float
    dlq_max_length: int
    alerts_retention_days: int
    group_idle_warning: float
    consumers: tuple[ConsumerConfig, ...] = ()
    # what load_settings took from the Go PayFlux's environment (payflux/goenv.py), logged once at start
    legacy_env: tuple[str, ...] = attrs.field(default=(), repr=False, eq=False)
    legacy_warnings: tuple[str, ...] = attrs.field(default=(), repr=False, eq=False)
    legacy_ignored: tuple[str, ...] = attrs.field(default=(), repr=False, eq=False)

    @property
    def redis_cluster(self) -> bool:
        """True when ``redis_url`` names a Redis Cluster (``redis+cluster://``)."""
        return bool(self.redis_url) and parse_redis_url(self.redis_url).cluster

    def retention(self) -> RetentionConfig:
        return RetentionConfig(
            max_age=self.retention_max_age,
            max_length=self.retention_max_length,
            hard_cap=self.retention_hard_cap,
            interval=self.retention_interval,
            dlq_max_age=self.dlq_max_age,
            dlq_max_length=self.dlq_max_length,
        )


def parse_api_keys(lines: Iterable[str], source: str) -> list[ApiKey]:
    """Parse ``id:secret`` entries; ``source`` names where they came from, for errors."""
    keys = []
    for n, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key_id, sep, secret = line.partition(":")
        key_id, secret = key_id.strip(), secret.strip()
        where = f"{source} entry {n}"
        if not sep or not key_id or not secret:
            raise ValueError(f"{where} must look like id:secret")
        if not key_id.replace("-", "").replace("_", "").isalnum() or len(key_id) > 64:
            raise ValueError(f"{where}: key id must be 1-64 of [A-Za-z0-9_-]")
        if len(secret) < 16:
            raise ValueError(f"{where} (id {key_id}): secret must be at least 16 characters")
        if any(c.isspace() for c in secret):
            raise ValueError(f"{where} (id {key_id}): secret must not contain whitespace")
        keys.append(ApiKey(key_id, secret.encode("utf-8")))
    return keys


def _keys_of(values: dict[str, Any], option: str) -> list[ApiKey]:
    """The keys of ``option`` (``api_keys`` or ``admin_keys``) and of its ``<option>_file``, in that order."""
    keys: list[ApiKey] = []
    try:
        keys.extend(parse_api_keys(values[option], option))
    except ValueError as e:
        raise ConfigError(option, str(e)) from None
    file_option = option + "_file"
    if values[file_option]:
        path = values[file_option]
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(file_option, f"cannot read {path}: {e}") from None
        try:
            keys.extend(parse_api_keys(lines, path))
        except ValueError as e:
            raise ConfigError(file_option, str(e)) from None
    return keys


def _admin_keys(values: dict[str, Any], producer_keys: list[ApiKey]) -> tuple[ApiKey, ...]:
    """
    The operator keys of the alerts API: ``admin_keys`` then ``admin_keys_file``, ids unique,
    and no secret that is also a producer key's (a producer must never be able to read or
    annotate alerts, and an operator's key must not be usable to ingest).  The error names the
    option the clashing admin key came from, never the secret.
    """
    inline = len(_keys_of({**values, "admin_keys_file": None}, "admin_keys"))
    admin = _keys_of(values, "admin_keys")
    seen: set[str] = set()
    producer_secrets = [k.secret for k in producer_keys]
    for n, key in enumerate(admin):
        option = "admin_keys" if n < inline else "admin_keys_file"
        if key.key_id in seen:
            raise ConfigError(option, f"admin key id {key.key_id!r} is defined twice")
        seen.add(key.key_id)
        if any(hmac.compare_digest(key.secret, s) for s in producer_secrets):
            raise ConfigError(option, f"admin key {key.key_id!r} has the secret of a producer key (api_keys); "
                                      "admin keys must be distinct from producer keys")
    return tuple(admin)


def _secret_file(option: str, path: str) -> str:
    """The text of a secret file; the error names ``option`` and the path, never the content."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read(65537)
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
        raise ConfigError(option, f"cannot read {path}: {reason}") from None


def _secret_lines(option: str, path: str) -> list[str]:
    lines = [line.strip() for line in _secret_file(option, path).splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def _webhook_secrets(values: dict[str, Any]) -> None:
    """
    The processor webhooks' secrets (docs/producers.md, "Processor webhooks"): each option and
    its ``_file`` together (the option's first), as bytes; Adyen's keys hex-decoded; and
    ``id_hash_key`` (at least 16 bytes), required once a webhook is on.  Errors name the option
    (and the entry's position), never a secret.
    """
    stripe = list(values["stripe_webhook_secret"])
    if values["stripe_webhook_secret_file"]:
        path = values["stripe_webhook_secret_file"]
        stripe.extend(_secret_lines("stripe_webhook_secret_file", path))
        if not stripe:
            raise ConfigError("stripe_webhook_secret_file", f"{path} holds no secret")
    values["stripe_webhook_secret"] = tuple(s.encode("utf-8") for s in stripe)

    adyen: list[bytes] = []
    sources = [("adyen_hmac_key", list(values["adyen_hmac_key"]))]
    if values["adyen_hmac_key_file"]:
        path = values["adyen_hmac_key_file"]
        lines = _secret_lines("adyen_hmac_key_file", path)
        if not lines:
            raise ConfigError("adyen_hmac_key_file", f"{path} holds no key")
        sources.append(("adyen_hmac_key_file", lines))
    for option, texts in sources:
        for n, text in enumerate(texts, 1):
            try:
                adyen.append(parse_hmac_key(text))
            except ValueError as e:
                raise ConfigError(option, f"entry {n}: {e}") from None
    values["adyen_hmac_key"] = tuple(adyen)

    key, option = values["id_hash_key"], "id_hash_key"
    if values["id_hash_key_file"]:
        if key is not None:
            raise ConfigError("id_hash_key_file", "set id_hash_key or id_hash_key_file, not both")
        path, option = values["id_hash_key_file"], "id_hash_key_file"
        key = _secret_file(option, path).removesuffix("\n").removesuffix("\r")
        if not key:
            raise ConfigError(option, f"{path} is empty")
    if key is not None:
        raw = key.encode("utf-8")
        if len(raw) < MIN_ID_HASH_KEY_BYTES:
            raise ConfigError(option, f"must be at least {MIN_ID_HASH_KEY_BYTES} bytes")
        values["id_hash_key"] = raw
    elif stripe or adyen:
        on = " and ".join(n for n, v in (("stripe_webhook_secret", stripe), ("adyen_hmac_key", adyen)) if v)
        raise ConfigError("id_hash_key", f"is required when a processor webhook is on ({on} is set): the key of "
                                         f"every *_hash the webhooks make, at least {MIN_ID_HASH_KEY_BYTES} bytes")


_CREDENTIALS = ("$CREDENTIALS_DIRECTORY", "${CREDENTIALS_DIRECTORY}")


def _credential_path(option: str, path: str, env: Mapping[str, str]) -> str:
    """
    A secret file's path, with a leading ``$CREDENTIALS_DIRECTORY`` (or ``${...}``) replaced by
    that environment variable: systemd's ``LoadCredential=`` directory, which a unit names as
    ``%d`` but a TOML file can only name this way.
    """
    for token in _CREDENTIALS:
        if path.startswith(token + "/"):
            base = env.get("CREDENTIALS_DIRECTORY")
            if not base:
                raise ConfigError(option, f"{path} names $CREDENTIALS_DIRECTORY, which is not set "
                                          "(set by systemd for units with LoadCredential=)")
            return os.path.join(base, path[len(token) + 1:])
    return path


def _with_password_file(url: str | None, path: str) -> str:
    """``url`` with the password read from ``path``; the password never appears in an error."""
    if url is None:
        raise ConfigError("redis_password_file", "needs redis_url (the embedded Redis listens on a "
                                                 "private unix socket and takes no password)")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(4097)
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
        raise ConfigError("redis_password_file", f"cannot read {path}: {reason}") from None
    password = text.removesuffix("\n").removesuffix("\r")
    if not password:
        raise ConfigError("redis_password_file", f"{path} is empty")
    if len(text) > 4096 or any(c in password for c in "\r\n\0"):
        raise ConfigError("redis_password_file", f"{path} must hold one line of at most 4096 characters")
    try:
        return url_with_password(url, password)
    except ValueError as e:
        raise ConfigError("redis_password_file", str(e)) from None


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError("config", f"cannot read {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("config", f"{path} is not valid TOML: {e}") from None
    # Allow either top-level keys or a [payflux] table.
    section = data.get("payflux", data)
    if not isinstance(section, dict):
        raise ConfigError("config", f"{path}: [payflux] must be a table")
    return section


def load_settings(
    cli: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_path: str | None = None,
) -> Settings:
    """
    Merge the four sources and validate.  ``cli`` maps option names (underscored) to values;
    ``None`` values mean "not given".  ``config_path`` may also come from ``PAYFLUX_CONFIG``.
    Raises :class:`ConfigError`.
    """
    cli = {k: v for k, v in (cli or {}).items() if v is not None}
    env = os.environ if env is None else env
    config_path = config_path or env.get("PAYFLUX_CONFIG") or None

    raw: dict[str, tuple[Any, str]] = {}
    consumer_tables: list = []
    if config_path:
        for key, value in _read_toml(config_path).items():
            if key == "consumers":
                if not isinstance(value, list):
                    raise ConfigError("consumers", f"{config_path}: use [[consumers]] tables")
                consumer_tables = value
                continue
            if key not in OPTIONS_BY_NAME:
                known = ", ".join(sorted(OPTIONS_BY_NAME))
                raise ConfigError("config", f"{config_path}: unknown key {key!r}; known keys: {known}")
            raw[key] = (value, "file")
    for option in OPTIONS:
        env_name = "PAYFLUX_" + option.name.upper()
        if env_name in env:
            raw[option.name] = (env[env_name], "env")
    for key, value in cli.items():
        if key not in OPTIONS_BY_NAME:
            raise ConfigError(key, "unknown option")
        raw[key] = (value, "cli")
    legacy = translate(env, raw)  # the Go PayFlux's variables: the weakest source of their settings
    raw.update((name, (value, "go-env")) for name, value in legacy.overrides.items())

    values: dict[str, Any] = {}
    for option in OPTIONS:
        if option.name in raw:
            value = raw[option.name][0]
            try:
                values[option.name] = option.parse(value)
            except ValueError as e:
                message = str(e)
                if option.secret:
                    message = message.split(", got ")[0]
                raise ConfigError(option.name, message) from None
        else:
            values[option.name] = option.default

    for name in ("api_keys_file", "admin_keys_file", "redis_password_file", "stripe_webhook_secret_file",
                 "adyen_hmac_key_file", "id_hash_key_file"):
        if values[name]:
            values[name] = _credential_path(name, values[name], env)
    if values["redis_password_file"]:
        values["redis_url"] = _with_password_file(values["redis_url"], values["redis_password_file"])

    keys = _keys_of(values, "api_keys")
    keys.extend(legacy.api_keys)
    seen: set[str] = set()
    for key in keys:
        if key.key_id in seen:
            raise ConfigError("api_keys", f"key id {key.key_id!r} is defined twice")
        seen.add(key.key_id)
    values["api_keys"] = tuple(keys)
    values["admin_keys"] = _admin_keys(values, keys)
    values["revoked_keys"] = legacy.revoke(values["revoked_keys"], keys)
    _webhook_secrets(values)

    consumers = []
    for index, table in enumerate(consumer_tables):
        try:
            consumers.append(consumer_from_table(table, index))
        except (TypeError, ValueError) as e:
            raise ConfigError("consumers", str(e)) from None
    names = [c.name for c in consumers]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError("consumers", f"consumer name {name!r} is used twice")
    values["consumers"] = tuple(consumers)
    if "consumers" in values["roles"] and not consumers:
        raise ConfigError("roles", "role 'consumers' needs at least one [[consumers]] table in the config file")
    if values["retention_hard_cap"] and values["retention_max_length"] > values["retention_hard_cap"]:
        raise ConfigError("retention_hard_cap", "must be at least retention_max_length")

    if "ingest" in values["roles"] and not keys and not values["insecure_dev_mode"]:
        raise ConfigError(
            "api_keys",
            "no API keys configured; set --api-keys id:secret (or --api-keys-file), "
            "or pass --insecure-dev-mode for a local trial without auth",
        )
    if values["workers"] > 1 and "ingest" not in values["roles"]:
        raise ConfigError("workers", "more than one worker needs the ingest role (workers only ingest)")
    if values["workers"] > 1:
        kind = values["listen"].split(":", 1)[0].strip().lower()
        if kind not in ("tcp", "tcp6"):
            raise ConfigError(
                "workers",
                f"more than one worker needs a tcp: or tcp6: listen endpoint (one shared socket), "
                f"got {kind}:; use --workers 1 or a tcp listener",
            )
    if values["min_replicas_ack"]:
        if not values["redis_url"]:
            raise ConfigError("min_replicas_ack", "needs redis_url naming a primary with replicas "
                                                  "(the embedded Redis has none)")
        if parse_redis_url(values["redis_url"]).cluster:
            raise ConfigError("min_replicas_ack", "is not supported with redis+cluster:// yet; use 0")
        if values["replica_ack_timeout"] >= values["redis_timeout"] * 1000:
            raise ConfigError("replica_ack_timeout", f"must be below redis_timeout "
                                                     f"({values['redis_timeout'] * 1000:g} ms) when min_replicas_ack is set")
    if values["allow_unknown_fields"] is not None and "unknown_fields" not in raw:
        values["unknown_fields"] = "drop" if values["allow_unknown_fields"] else "reject"
    if values["layout"] == "seed" and values["partitions"] != 1:
        raise ConfigError("partitions", "layout seed has one stream (events_stream); use partitions = 1")
    if values["layout"] == "seed" and values["redis_url"]:
        if parse_redis_url(values["redis_url"]).cluster:
            raise ConfigError("layout", "seed needs a single Redis or Sentinel: events_stream and "
                                        "events_stream_dlq are in different cluster slots")
    if values["rate_limit"] and values["rate_burst"] < 1:
        raise ConfigError("rate_burst", "must be at least 1 when rate_limit is set")
    return Settings(**values, legacy_env=tuple(legacy.lines), legacy_warnings=tuple(legacy.warnings),
                    legacy_ignored=legacy.ignored)
