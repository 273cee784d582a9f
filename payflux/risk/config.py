"""
Options of the risk consumer (``handler = "risk"``), parsed from the ``[[consumers]]`` table's
``options`` and validated: every problem is a ValueError naming the option
(``risk option failure_rate.min_events must be an integer from 1 to 10000000``), so a typo stops
the node at start-up with one line.  Defaults and meanings: docs/risk.md, "Options".
"""

from __future__ import annotations

import math
import re
from typing import Any

import attrs

from payflux.events import STRING_FIELDS

#: Dimensions with a cardinality cap (``max_keys`` table); the keys are event field names.
CAP_DEFAULTS = {
    "processor": 1_000,
    "merchant_id_hash": 10_000,
    "geo_bucket": 1_000,
    "failure_category": 1_000,        # (processor, failure_category) pairs of failure_cluster
    "failure_origin": 1_000,          # (processor, failure_origin) pairs of failure_cluster
    "payment_intent_id_hash": 100_000,
}
FAILURE_RATE_DIMENSIONS = ("processor", "merchant_id_hash", "geo_bucket")
CLUSTER_DIMENSIONS = ("failure_category", "geo_bucket", "failure_origin")
#: Defaults of failure_event_types / success_event_types: PayFlux's own names and Stripe's
#: (event types are stored as the processor names them; docs/risk.md, "What counts as a failure").
FAILURE_EVENT_TYPES = ("payment_failed", "payment_intent.payment_failed", "charge.failed")
SUCCESS_EVENT_TYPES = ("payment_succeeded", "payment_intent.succeeded", "charge.succeeded")
#: ``retry_result`` values (compared lower-cased) that say the attempt failed / succeeded.
FAILED_RESULTS = frozenset(("failed", "fail", "failure", "declined"))
SUCCEEDED_RESULTS = frozenset(("success", "succeeded", "successful", "approved"))
MIN_SECRET_BYTES = 16  # as the webhook exporter requires
_EVENT_TYPE = re.compile(STRING_FIELDS["event_type"][1]).fullmatch  # the rule ingest applies to event_type
_STREAM_KEY = re.compile(r"^\S{1,256}$")


@attrs.frozen
class RateRule:
    """
    A rate compared with its own adaptive baseline (see docs/risk.md, "The rate rule").

    ``floor`` is the option ``min_rate`` (failure_rate) or ``min_share`` (the others).
    """

    window_seconds: int
    min_events: int
    ratio: float
    min_increase: float
    floor: float
    confidence_z: float
    open_after_seconds: int
    resolve_after_seconds: int
    resolve_fraction: float
    baseline_half_life_seconds: float
    warmup_seconds: int
    critical_increase: float

    @property
    def decay(self) -> float:
        """EWMA weight kept per one-second bucket."""
        return 0.5 ** (1.0 / self.baseline_half_life_seconds)


@attrs.frozen
class FailureRateConfig:
    enabled: bool
    dimensions: tuple[str, ...]
    rule: RateRule


@attrs.frozen
class RetryStormConfig:
    enabled: bool
    intent_attempts: int            # 0 disables the per-intent check
    intent_critical_attempts: int
    max_intent_alerts: int
    rule: RateRule                  # the retry share per processor (its window is also the intents')


@attrs.frozen
class FailureClusterConfig:
    enabled: bool
    dimensions: tuple[str, ...]
    rule: RateRule


#: Defaults of health.timeout_categories / health.auth_categories (failure_category values,
#: compared lower-cased; docs/risk.md, "Processor health").
TIMEOUT_CATEGORIES = ("timeout", "processor_timeout", "network_timeout", "issuer_timeout", "gateway_timeout",
                      "connection_timeout", "read_timeout", "request_timeout")
AUTH_CATEGORIES = ("card_declined", "do_not_honor", "generic_decline", "authentication_required",
                   "authentication_failed", "three_d_secure_failed", "incorrect_cvc", "invalid_cvc",
                   "incorrect_pin", "invalid_pin", "expired_card", "pickup_card", "restricted_card")


@attrs.frozen
class HealthConfig:
    """Processor health (payflux/risk/health.py; docs/risk.md, "Processor health")."""

    enabled: bool
    window_seconds: int
    min_events: int                 # outcomes in the window (and in the baseline) before a key is scored
    min_failures: int               # failures in the window (and baseline) before the failure-mix drivers count
    warmup_seconds: int
    baseline_half_life_seconds: float
    confidence_z: float
    top_n: int                      # merchants and geos scored per processor (by window volume)
    trajectory_seconds: int
    trajectory_dead_band: float     # score change per second under which the trajectory is "steady"
    elevated: float
    high: float
    critical: float
    timeout_categories: frozenset[str]
    auth_categories: frozenset[str]

    @property
    def decay(self) -> float:
        return 0.5 ** (1.0 / self.baseline_half_life_seconds)


@attrs.frozen
class RetryInsightConfig:
    """Retry success per processor x failure_category (payflux/risk/health.py; docs/risk.md, "Retry insight")."""

    enabled: bool
    window_seconds: int
    min_samples: int
    confidence_z: float
    avoid_below: float              # advice "avoid": the rate's Wilson upper bound is under this
    wait_fraction: float            # advice "wait": the upper bound is under baseline x this
    baseline_half_life_seconds: float

    @property
    def decay(self) -> float:
        return 0.5 ** (1.0 / self.baseline_half_life_seconds)


@attrs.frozen
class EngineConfig:
    """Everything the pure detector core needs (no I/O settings)."""

    failure_event_types: frozenset[str]
    success_event_types: frozenset[str]
    retry_event_types: frozenset[str]
    outcome_fields: bool            # retry_result and the failure fields classify events too
    max_keys: dict
    failure_rate: FailureRateConfig
    retry_storm: RetryStormConfig
    failure_cluster: FailureClusterConfig
    health: HealthConfig
    retry_insight: RetryInsightConfig


@attrs.frozen
class RiskConfig:
    engine: EngineConfig
    alerts_stream: str | None       # None: "<prefix>:alerts" of the bound StreamKeys
    alerts_maxlen: int
    outbox_max: int
    idle_after_seconds: float       # 0: stream time only moves with events
    log_alerts: bool
    webhook_url: str | None
    webhook_secret: bytes | None = attrs.field(repr=False)
    webhook_timeout: float
    webhook_max_attempts: int
    webhook_queue: int


# Per detector: (option name of the floor, defaults of every rule option).
_RULE_DEFAULTS: dict[str, tuple[str, dict[str, Any]]] = {
    "failure_rate": ("min_rate", dict(
        window_seconds=10, min_events=100, ratio=2.0, min_increase=0.05, floor=0.0, confidence_z=4.0,
        open_after_seconds=2, resolve_after_seconds=30, resolve_fraction=0.5,
        baseline_half_life_seconds=600.0, warmup_seconds=60, critical_increase=0.25)),
    "retry_storm": ("min_share", dict(
        window_seconds=30, min_events=200, ratio=2.0, min_increase=0.1, floor=0.2, confidence_z=4.0,
        open_after_seconds=2, resolve_after_seconds=30, resolve_fraction=0.5,
        baseline_half_life_seconds=600.0, warmup_seconds=60, critical_increase=0.3)),
    "failure_cluster": ("min_share", dict(
        window_seconds=30, min_events=50, ratio=1.5, min_increase=0.3, floor=0.5, confidence_z=3.0,
        open_after_seconds=2, resolve_after_seconds=30, resolve_fraction=0.5,
        baseline_half_life_seconds=600.0, warmup_seconds=60, critical_increase=0.5)),
}


class _Options:
    """Reads one options table; every error names ``<prefix><key>``."""

    def __init__(self, table: Any, prefix: str) -> None:
        if not isinstance(table, dict):
            raise ValueError(f"risk option {prefix.rstrip('.') or 'options'} must be a table")
        self.table = dict(table)
        self.prefix = prefix
        self.used: set[str] = set()

    def name(self, key: str) -> str:
        return f"{self.prefix}{key}"

    def fail(self, key: str, rule: str) -> ValueError:
        return ValueError(f"risk option {self.name(key)} {rule}")

    def get(self, key: str, default: Any) -> Any:
        self.used.add(key)
        return self.table.get(key, default)

    def int(self, key: str, default: int, lo: int, hi: int) -> int:
        v = self.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise self.fail(key, f"must be an integer from {lo} to {hi}")
        return v

    def number(self, key: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
        v = self.get(key, default)
        ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
        if not ok or not (v > lo if lo_open else v >= lo) or v > hi:
            raise self.fail(key, f"must be a number {'above' if lo_open else 'from'} {lo:g}"
                                 f"{' and at most' if lo_open else ' to'} {hi:g}")
        return float(v)

    def bool(self, key: str, default: bool) -> bool:
        v = self.get(key, default)
        if not isinstance(v, bool):
            raise self.fail(key, "must be true or false")
        return v

    def event_types(self, key: str, default: tuple[str, ...]) -> frozenset[str]:
        v = self.get(key, list(default))
        if not isinstance(v, (list, tuple)) or not all(isinstance(s, str) and _EVENT_TYPE(s) for s in v):
            raise self.fail(key, "must be a list of event types as processors name them "
                                 "(such as \"payment_failed\" or \"charge.failed\")")
        return frozenset(v)

    def choices(self, key: str, default: tuple[str, ...], allowed: tuple[str, ...]) -> tuple[str, ...]:
        v = self.get(key, list(default))
        if not isinstance(v, (list, tuple)) or not v or not all(s in allowed for s in v) or len(set(v)) != len(v):
            raise self.fail(key, f"must be a non-empty list of distinct names from: {', '.join(allowed)}")
        return tuple(v)

    def categories(self, key: str, default: tuple[str, ...]) -> frozenset[str]:
        v = self.get(key, list(default))
        if not isinstance(v, (list, tuple)) or not all(isinstance(c, str) and c.strip() for c in v):
            raise self.fail(key, "must be a list of failure_category values (non-empty strings)")
        return frozenset(c.lower() for c in v)

    def table_of(self, key: str) -> "_Options":
        return _Options(self.get(key, {}), f"{self.name(key)}.")

    def done(self) -> None:
        unknown = sorted(set(self.table) - self.used)
        if unknown:
            raise ValueError(f"risk option {self.name(unknown[0])} is not a known option"
                             f"{' (and ' + str(len(unknown) - 1) + ' more)' if len(unknown) > 1 else ''};"
                             f" see docs/risk.md")


def _rule(opts: _Options, detector: str) -> RateRule:
    floor_name, d = _RULE_DEFAULTS[detector]
    window = opts.int("window_seconds", d["window_seconds"], 1, 3600)
    rule = RateRule(
        window_seconds=window,
        min_events=opts.int("min_events", d["min_events"], 1, 10_000_000),
        ratio=opts.number("ratio", d["ratio"], 1.0, 1000.0),
        min_increase=opts.number("min_increase", d["min_increase"], 0.0, 1.0),
        floor=opts.number(floor_name, d["floor"], 0.0, 1.0),
        confidence_z=opts.number("confidence_z", d["confidence_z"], 0.0, 10.0),
        open_after_seconds=opts.int("open_after_seconds", d["open_after_seconds"], 1, 3600),
        resolve_after_seconds=opts.int("resolve_after_seconds", d["resolve_after_seconds"], 1, 86_400),
        resolve_fraction=opts.number("resolve_fraction", d["resolve_fraction"], 0.0, 1.0),
        baseline_half_life_seconds=opts.number(
            "baseline_half_life_seconds", d["baseline_half_life_seconds"], 1.0, 30 * 86_400.0),
        warmup_seconds=opts.int("warmup_seconds", d["warmup_seconds"], 0, 86_400),
        critical_increase=opts.number("critical_increase", d["critical_increase"], 0.0, 1.0),
    )
    if rule.min_increase == 0 and rule.ratio == 1.0 and rule.floor == 0:
        raise opts.fail("min_increase", "must be above 0 when ratio is 1 and "
                                        f"{floor_name} is 0 (the rule would fire on its own baseline)")
    return rule


def _health(opts: _Options) -> HealthConfig:
    bands = {}
    for name, default in (("elevated", 0.3), ("high", 0.6), ("critical", 0.8)):
        v = opts.get(name, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < v < 1.0:
            raise opts.fail(name, "must be a number above 0 and below 1")
        bands[name] = float(v)
    elevated, high, critical = bands["elevated"], bands["high"], bands["critical"]
    if not elevated < high:
        raise opts.fail("high", f"must be above {opts.name('elevated')} ({elevated:g})")
    if not high < critical:
        raise opts.fail("critical", f"must be above {opts.name('high')} ({high:g})")
    window = opts.int("window_seconds", 10, 1, 3600)
    return HealthConfig(
        enabled=opts.bool("enabled", True),
        window_seconds=window,
        min_events=opts.int("min_events", 100, 1, 10_000_000),
        min_failures=opts.int("min_failures", 20, 1, 10_000_000),
        warmup_seconds=opts.int("warmup_seconds", 60, 0, 86_400),
        baseline_half_life_seconds=opts.number("baseline_half_life_seconds", 600.0, 1.0, 30 * 86_400.0),
        confidence_z=opts.number("confidence_z", 3.0, 0.0, 10.0),
        top_n=opts.int("top_n", 10, 0, 1000),
        trajectory_seconds=opts.int("trajectory_seconds", 10, 2, 3600),
        trajectory_dead_band=opts.number("trajectory_dead_band", 0.01, 0.0, 1.0),
        elevated=elevated, high=high, critical=critical,
        timeout_categories=opts.categories("timeout_categories", TIMEOUT_CATEGORIES),
        auth_categories=opts.categories("auth_categories", AUTH_CATEGORIES),
    )


def _retry_insight(opts: _Options) -> RetryInsightConfig:
    return RetryInsightConfig(
        enabled=opts.bool("enabled", True),
        window_seconds=opts.int("window_seconds", 60, 1, 3600),
        min_samples=opts.int("min_samples", 20, 1, 10_000_000),
        confidence_z=opts.number("confidence_z", 2.0, 0.0, 10.0),
        avoid_below=opts.number("avoid_below", 0.1, 0.0, 1.0),
        wait_fraction=opts.number("wait_fraction", 0.5, 0.0, 1.0),
        baseline_half_life_seconds=opts.number("baseline_half_life_seconds", 600.0, 1.0, 30 * 86_400.0),
    )


def _secret(opts: _Options) -> bytes | None:
    inline = opts.get("webhook_secret", None)
    path = opts.get("webhook_secret_file", None)
    if inline is not None and path is not None:
        raise opts.fail("webhook_secret", "and webhook_secret_file are mutually exclusive")
    if inline is not None:
        if not isinstance(inline, str) or len(inline.encode("utf-8")) < MIN_SECRET_BYTES:
            raise opts.fail("webhook_secret", f"must be a string of at least {MIN_SECRET_BYTES} bytes")
        return inline.encode("utf-8")
    if path is not None:
        if not isinstance(path, str) or not path:
            raise opts.fail("webhook_secret_file", "must be a file path")
        try:
            with open(path, "rb") as f:
                secret = f.read().strip()
        except OSError as e:
            raise opts.fail("webhook_secret_file", f"cannot be read ({e.strerror})") from None
        if len(secret) < MIN_SECRET_BYTES:
            raise opts.fail("webhook_secret_file", f"must hold at least {MIN_SECRET_BYTES} bytes")
        return secret
    return None


def parse_options(options: dict) -> RiskConfig:
    """The validated :class:`RiskConfig` of a ``[[consumers]]`` options table (``{}``: all defaults)."""
    top = _Options(options, "")
    types = dict(
        failure_event_types=top.event_types("failure_event_types", FAILURE_EVENT_TYPES),
        success_event_types=top.event_types("success_event_types", SUCCESS_EVENT_TYPES),
        retry_event_types=top.event_types("retry_event_types", ("payment_retried",)),
        outcome_fields=top.bool("outcome_fields", True),
    )
    if types["failure_event_types"] & types["success_event_types"]:
        raise top.fail("success_event_types", "must not share an event type with failure_event_types")
    caps_opts = top.table_of("max_keys")
    caps = {dim: caps_opts.int(dim, default, 1, 10_000_000) for dim, default in CAP_DEFAULTS.items()}
    caps_opts.done()

    fr = top.table_of("failure_rate")
    failure_rate = FailureRateConfig(
        enabled=fr.bool("enabled", True),
        dimensions=fr.choices("dimensions", FAILURE_RATE_DIMENSIONS, FAILURE_RATE_DIMENSIONS),
        rule=_rule(fr, "failure_rate"),
    )
    fr.done()

    rs = top.table_of("retry_storm")
    intent_attempts = rs.int("intent_attempts", 10, 0, 1_000_000)
    retry_storm = RetryStormConfig(
        enabled=rs.bool("enabled", True),
        intent_attempts=intent_attempts,
        intent_critical_attempts=rs.int("intent_critical_attempts", max(1, intent_attempts) * 3,
                                        max(1, intent_attempts), 10_000_000),
        max_intent_alerts=rs.int("max_intent_alerts", 100, 1, 100_000),
        rule=_rule(rs, "retry_storm"),
    )
    rs.done()

    fc = top.table_of("failure_cluster")
    failure_cluster = FailureClusterConfig(
        enabled=fc.bool("enabled", True),
        dimensions=fc.choices("dimensions", CLUSTER_DIMENSIONS, CLUSTER_DIMENSIONS),
        rule=_rule(fc, "failure_cluster"),
    )
    fc.done()

    ht = top.table_of("health")
    health = _health(ht)
    ht.done()
    ri = top.table_of("retry_insight")
    retry_insight = _retry_insight(ri)
    ri.done()

    stream = top.get("alerts_stream", None)
    if stream is not None and (not isinstance(stream, str) or not _STREAM_KEY.match(stream)):
        raise top.fail("alerts_stream", "must be a Redis key without whitespace (1 to 256 characters)")
    url = top.get("webhook_url", None)
    if url is not None and (not isinstance(url, str) or not re.match(r"^https?://[^\s/]+", url)):
        raise top.fail("webhook_url", "must be an http:// or https:// URL")
    secret = _secret(top)
    if url is not None and secret is None:
        raise top.fail("webhook_url", "needs webhook_secret or webhook_secret_file (alerts are always signed)")

    config = RiskConfig(
        engine=EngineConfig(max_keys=caps, failure_rate=failure_rate, retry_storm=retry_storm,
                            failure_cluster=failure_cluster, health=health, retry_insight=retry_insight,
                            **types),
        alerts_stream=stream,
        alerts_maxlen=top.int("alerts_maxlen", 10_000, 100, 100_000_000),
        outbox_max=top.int("outbox_max", 10_000, 1, 10_000_000),
        idle_after_seconds=top.number("idle_after_seconds", 5.0, 0.0, 3600.0),
        log_alerts=top.bool("log_alerts", True),
        webhook_url=url,
        webhook_secret=secret,
        webhook_timeout=top.number("webhook_timeout", 5.0, 0.0, 300.0, lo_open=True),
        webhook_max_attempts=top.int("webhook_max_attempts", 5, 1, 100),
        webhook_queue=top.int("webhook_queue", 1000, 1, 1_000_000),
    )
    top.done()
    return config
