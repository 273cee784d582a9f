"""
Processor health and retry insight: scores computed from PayFlux's own windows, fed by
:class:`payflux.risk.engine.RiskEngine` with each classified event and each closed second.
Pure and synchronous like the engine (no Twisted, no I/O, stream time only).

- :class:`HealthTracker`: per processor (every closed second) and per (processor, merchant) and
  (processor, geo) pair (on demand, the ``top_n`` by window volume of each processor), a score
  in 0..1 made of six named drivers, its band (low < elevated < high < critical) and, for
  processors, a trajectory (accelerating / decelerating / steady).
- Retry insight: per (processor, failure_category), the success rate of retries in a window
  against its own EWMA baseline, and :func:`retry_advice` ("retry" / "wait" / "avoid").
- :func:`processors_answer` and :func:`retry_advice` are pure functions of the snapshot JSON
  (:meth:`HealthTracker.snapshot`) the risk handler writes to Redis, so an HTTP route can answer
  from Redis without the engine.

Every definition and default is in docs/risk.md, "Processor health" and "Retry insight".

Windows are lazy (:mod:`payflux.risk.health_windows`): a key costs nothing in the seconds it
has no events and is never closed every second like the detectors' keys.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict, deque

from payflux.risk.alerts import iso_ms
from payflux.risk.config import FAILED_RESULTS, SUCCEEDED_RESULTS, HealthConfig, RetryInsightConfig, parse_options
from payflux.risk.health_windows import Window, advance, entropy, roll
from payflux.risk.windows import BUCKET_MS, KeyTable, wilson_lower

SNAPSHOT_VERSION = 1

BANDS = ("low", "elevated", "high", "critical")
HIGH_FAILURE_RATE = "high_failure_rate"
RETRY_PRESSURE_SPIKE = "retry_pressure_spike"
TIMEOUT_CLUSTERING = "timeout_clustering"
TRAFFIC_VOLATILITY = "traffic_volatility"
AUTH_FAILURE_CLUSTER = "auth_failure_cluster"
GEO_ENTROPY_INCREASE = "geo_entropy_increase"
DRIVERS = (HIGH_FAILURE_RATE, RETRY_PRESSURE_SPIKE, TIMEOUT_CLUSTERING, TRAFFIC_VOLATILITY,
           AUTH_FAILURE_CLUSTER, GEO_ENTROPY_INCREASE)
#: The most each driver adds to the score (its weight); the score is their sum, at most 1.
WEIGHTS = {HIGH_FAILURE_RATE: 0.9, RETRY_PRESSURE_SPIKE: 0.5, TIMEOUT_CLUSTERING: 0.5,
           TRAFFIC_VOLATILITY: 0.3, AUTH_FAILURE_CLUSTER: 0.4, GEO_ENTROPY_INCREASE: 0.25}
#: For the share drivers: the rise of the share's Wilson lower bound over its baseline at which
#: the driver gives its whole weight (linear from 0 below that).
SPANS = {HIGH_FAILURE_RATE: 0.15, RETRY_PRESSURE_SPIKE: 0.2, TIMEOUT_CLUSTERING: 0.3, AUTH_FAILURE_CLUSTER: 0.3}
#: traffic_volatility: |ln(rate / baseline rate)| from ln 1.5 (nothing) to ln 4 (whole weight).
TRAFFIC_DEAD = math.log(1.5)
TRAFFIC_FULL = math.log(4.0)
#: geo_entropy_increase: from 0.1 bit of Shannon entropy over the baseline's (nothing: the
#: estimate's own wobble) to 1.1 bits (the whole weight).
ENTROPY_DEAD_BITS = 0.1
ENTROPY_SPAN_BITS = 1.0
ADVICE_RETRY, ADVICE_WAIT, ADVICE_AVOID = "retry", "wait", "avoid"
ACCELERATING, DECELERATING, STEADY = "accelerating", "decelerating", "steady"
TRAJECTORIES = (ACCELERATING, DECELERATING, STEADY)

# counter slots of a health window
EV, OUT, FAIL, RETRY, TMO, AUTH = range(6)
_SIZE = 6


def _clamp(x: float) -> float:
    return 0.0 if x <= 0.0 else 1.0 if x >= 1.0 else x


def band_of(score: float, elevated: float, high: float, critical: float) -> str:
    """``low`` < elevated <= ``elevated`` < high <= ``high`` < critical <= ``critical``."""
    if score >= critical:
        return "critical"
    if score >= high:
        return "high"
    if score >= elevated:
        return "elevated"
    return "low"


def _r(x: float | None, digits: int = 6) -> float | None:
    return None if x is None else round(x, digits)


class HealthTracker:
    """See the module docstring.  ``observe`` per event (in the engine's open second ``b``),
    ``close(b)`` per closed second; ``results`` holds each live processor's last score.

    Merchants and geos: each processor counts its merchants' and geos' events per
    ``window_seconds`` period (at most ``max_keys`` of each per processor); at the end of a period
    the ``2 × top_n`` busiest, plus those already followed that are still in the ``4 × top_n``
    busiest, are followed with a window of their own (so a steady top merchant keeps its
    baseline), the rest are dropped.  Only followed pairs cost more than a dict increment.
    """

    def __init__(self, config: HealthConfig, retry: RetryInsightConfig | None, caps: dict) -> None:
        self.config = config
        c = config
        self.window = c.window_seconds
        self.decay = c.decay
        self.geo_cap = caps["geo_bucket"]
        self.merchant_cap = caps["merchant_id_hash"]
        self.timeouts = c.timeout_categories
        self.auth = c.auth_categories
        self.processors = KeyTable("processor", caps["processor"], self._evicted_processor)
        self.results: dict[str, dict] = {}
        self.closed: int | None = None     # the last closed second
        self._period_end: int | None = None
        self.retry = retry
        if retry is not None:
            self.retry_pairs = KeyTable("failure_category", caps["failure_category"])
            self.intents: OrderedDict = OrderedDict()  # intent -> failure_category of its last failure
            self.intent_cap = caps["payment_intent_id_hash"]
            self.retry_unattributed = 0
            self._make_retry = lambda v, b: Window(v, b, 2)

    # -- feeding -------------------------------------------------------------------------------

    def observe(self, event: dict, processor: str, failed: bool, outcome: bool, retry: bool, b: int) -> None:
        """Count one event of ``processor`` in second ``b`` (``outcome``: a failure or a success)."""
        get = event.get
        s = self.processors.items.get(processor)
        if s is None or s.last_seen != b:  # (KeyTable.touch's fast path, inlined: most events)
            s = self.processors.touch(processor, b, _processor_window)
        if s.cur_b != b:
            roll(s, b, self.window, self.decay, self.geo_cap)
        c = s.cur
        c[EV] += 1
        timeout = auth = False
        category = None
        geo = get("geo_bucket")
        if not geo or type(geo) is not str:
            geo = None
        if outcome:
            c[OUT] += 1
            if failed:
                c[FAIL] += 1
                category = get("failure_category")
                if category and type(category) is str:
                    lc = category.lower()
                    if lc in self.timeouts:
                        c[TMO] += 1
                        timeout = True
                    if lc in self.auth:
                        c[AUTH] += 1
                        auth = True
                else:
                    category = None
                if geo is not None:
                    g = s.cur_geo
                    g[geo] = g.get(geo, 0) + 1  # type: ignore[index]
        if retry:
            c[RETRY] += 1
        ext = s.children
        merchant = get("merchant_id_hash")
        if merchant and type(merchant) is str:
            vol = ext.merchant_volume
            n = vol.get(merchant)
            if n is not None:
                vol[merchant] = n + 1
            elif len(vol) < self.merchant_cap:
                vol[merchant] = 1
            w = ext.merchants.get(merchant)
            if w is not None:
                self._count(w, b, failed, outcome, retry, timeout, auth)
        if geo is not None:
            vol = ext.geo_volume
            n = vol.get(geo)
            if n is not None:
                vol[geo] = n + 1
            elif len(vol) < self.geo_cap:
                vol[geo] = 1
            w = ext.geos.get(geo)
            if w is not None:
                self._count(w, b, failed, outcome, retry, timeout, auth)
        if self.retry is not None and (retry or failed):
            self._observe_retry(event, processor, failed, retry, category, b)

    def _count(self, s: Window, b: int, failed: bool, outcome: bool, retry: bool, timeout: bool,
               auth: bool) -> None:
        if s.cur_b != b:
            roll(s, b, self.window, self.decay, self.geo_cap)
        c = s.cur
        c[EV] += 1
        if outcome:
            c[OUT] += 1
            if failed:
                c[FAIL] += 1
                if timeout:
                    c[TMO] += 1
                if auth:
                    c[AUTH] += 1
        if retry:
            c[RETRY] += 1

    def _observe_retry(self, event: dict, processor: str, failed: bool, retry: bool, category: str | None,
                       b: int) -> None:
        intent = event.get("payment_intent_id_hash")
        if not intent or type(intent) is not str:
            intent = None
        if failed and category is not None and intent is not None:
            intents = self.intents
            if intent in intents:
                intents.move_to_end(intent)
            elif len(intents) >= self.intent_cap:
                intents.popitem(last=False)
            intents[intent] = category
        if not retry:
            return
        result = event.get("retry_result")
        if not result or type(result) is not str:
            return
        result = result.lower()
        if result in SUCCEEDED_RESULTS:
            worked = True
        elif result in FAILED_RESULTS:
            worked = False
        else:
            return
        if category is None:
            cat = event.get("failure_category")
            category = cat if cat and type(cat) is str else (self.intents.get(intent) if intent is not None else None)
        if category is None:
            self.retry_unattributed += 1
            return
        s = self.retry_pairs.touch((processor, category), b, self._make_retry)
        if s.cur_b != b:
            roll(s, b, self.retry.window_seconds, self.retry.decay)  # type: ignore[union-attr]
        s.cur[0] += 1
        if worked:
            s.cur[1] += 1

    def close(self, b: int) -> None:
        """Second ``b`` closed: score every processor with events in the window."""
        self.closed = b
        c = self.config
        since = b - self.window + 1
        refresh = self._period_end is None or b >= self._period_end
        if refresh:
            self._period_end = b + self.window
        results = {}
        for s in self.processors.live(since):
            advance(s, b, self.window, self.decay, self.geo_cap)
            r = self._score(s, b, True)
            scores = s.scores
            while scores and scores[0][0] <= b - c.trajectory_seconds:
                scores.popleft()
            scores.append((b, r["score"]))
            r["trajectory"] = _trajectory(scores, c.trajectory_dead_band)
            s.hot = r["band"] in ("high", "critical")
            results[s.key] = r
            if refresh:
                s.children.refresh(b, c.top_n)
        self.results = results

    def busy(self, b: int) -> bool:
        """Whether a processor still has a second in its window at ``b`` (retry pairs need no
        closing: their windows are read lazily, as of :attr:`closed`)."""
        newest = self.processors.newest_seen()
        return newest is not None and newest >= b - self.window

    # -- scoring -------------------------------------------------------------------------------

    def _score(self, s: Window, b: int, processor: bool) -> dict:
        c = self.config
        z = c.confidence_z
        sums, e = s.sums, s.ewma
        n_out, n_fail, n_ev = sums[OUT], sums[FAIL], sums[EV]
        insufficient = n_out < c.min_events or e[OUT] < c.min_events or b - s.first < c.warmup_seconds
        mix_ok = n_fail >= c.min_failures and e[FAIL] >= c.min_failures
        drivers = []

        def share(name: str, k: int, n: int, ek: float, en: float, judged: bool) -> None:
            value = k / n if n else None
            base = ek / en if en > 0 else None
            sev = 0.0
            if judged and value is not None and base is not None:
                sev = _clamp((wilson_lower(k, n, z) - base) / SPANS[name])
            drivers.append([name, value, base, sev])

        share(HIGH_FAILURE_RATE, n_fail, n_out, e[FAIL], e[OUT], True)
        share(RETRY_PRESSURE_SPIKE, sums[RETRY], n_ev, e[RETRY], e[EV], True)
        share(TIMEOUT_CLUSTERING, sums[TMO], n_fail, e[TMO], e[FAIL], mix_ok)
        rate = n_ev / self.window
        base_rate = e[EV] / s.secs if s.secs > 0 else None  # advance() decayed both to this second
        sev = 0.0
        if base_rate and rate > 0:
            sev = _clamp((abs(math.log(rate / base_rate)) - TRAFFIC_DEAD) / (TRAFFIC_FULL - TRAFFIC_DEAD))
        elif base_rate:
            sev = 1.0
        drivers.append([TRAFFIC_VOLATILITY, rate, base_rate, sev])
        share(AUTH_FAILURE_CLUSTER, sums[AUTH], n_fail, e[AUTH], e[FAIL], mix_ok)
        if processor:
            h = entropy(s.geo_sums.values()) if n_fail else None  # type: ignore[union-attr]
            hb = entropy(s.geo_ewma.values()) if e[FAIL] > 0 else None  # type: ignore[union-attr]
            sev = _clamp((h - hb - ENTROPY_DEAD_BITS) / ENTROPY_SPAN_BITS) if mix_ok and h is not None and hb is not None else 0.0
            drivers.append([GEO_ENTROPY_INCREASE, h, hb, sev])
        total = 0.0
        for d in drivers:
            d[3] = 0.0 if insufficient else WEIGHTS[d[0]] * d[3]
            total += d[3]
        scale = 1.0 / total if total > 1.0 else 1.0
        score = min(1.0, total)
        return {
            "score": round(score, 4),
            "band": band_of(score, c.elevated, c.high, c.critical),
            "drivers": [{"name": name, "value": _r(v), "baseline": _r(bl), "contribution": round(con * scale, 4)}
                        for name, v, bl, con in drivers],
            "sample_size": n_out,
            "insufficient_volume": insufficient,
        }

    # -- reading -------------------------------------------------------------------------------

    def top(self, s: Window, dimension: str) -> list[tuple[str, dict]]:
        """The ``top_n`` followed merchants (or geos) of processor ``s`` by events in the window, scored."""
        b = self.closed
        if b is None or not self.config.top_n:
            return []
        followed = s.children.merchants if dimension == "merchant_id_hash" else s.children.geos
        live = []
        for value, child in followed.items():
            advance(child, b, self.window, self.decay)
            if child.sums[EV]:
                live.append((child.sums[EV], value, child))
        best = heapq.nlargest(self.config.top_n, live, key=lambda t: (t[0], t[1]))
        return [(value, self._score(child, b, False)) for _, value, child in best]

    def retry_rows(self) -> list[dict]:
        """Per (processor, failure_category) with retry samples in the window or a baseline."""
        r = self.retry
        b = self.closed
        if r is None or b is None:
            return []
        out = []
        for s in self.retry_pairs.items.values():
            advance(s, b, r.window_seconds, r.decay)
            n, k = s.sums[0], s.sums[1]
            base = s.ewma[1] / s.ewma[0] if s.ewma[0] >= r.min_samples else None
            if not n and base is None:
                continue
            out.append({"processor": s.key[0], "failure_category": s.key[1],
                        "retry_success_rate": _r(k / n) if n else None, "baseline": _r(base),
                        "sample_size": n, "window_seconds": r.window_seconds})
        out.sort(key=lambda row: (row["processor"], row["failure_category"]))
        return out

    def snapshot(self) -> dict:
        """The JSON-ready snapshot (docs/risk.md, "The health snapshot"), as of the last closed second."""
        c = self.config
        as_of_ms = (self.closed + 1) * BUCKET_MS if self.closed is not None else 0
        processors = []
        for name in sorted(self.results):
            s = self.processors.items.get(name)
            entry = {"processor": name, **self.results[name]}
            entry["merchants"] = [{"merchant_id_hash": v, **x} for v, x in self.top(s, "merchant_id_hash")] if s else []
            entry["geos"] = [{"geo_bucket": v, **x} for v, x in self.top(s, "geo_bucket")] if s else []
            processors.append(entry)
        out = {
            "v": SNAPSHOT_VERSION,
            "as_of": iso_ms(as_of_ms),
            "as_of_ms": as_of_ms,
            "bands": {"elevated": c.elevated, "high": c.high, "critical": c.critical},
            "processors": processors,
            "retry": self.retry_rows(),
        }
        if self.retry is not None:
            out["retry_rule"] = retry_rule(self.retry)
        return out

    def tables(self) -> list[tuple[str, str, KeyTable]]:
        """``(detector, dimension, KeyTable)`` for payflux_risk_tracked_keys / _evicted_keys_total."""
        out = [("health", "processor", self.processors)]
        if self.retry is not None:
            out.append(("retry_insight", "failure_category", self.retry_pairs))
        return out

    def _evicted_processor(self, key: str, s: Window) -> None:
        self.results.pop(key, None)


class _Followed:
    """A processor's merchant and geo volumes this period and the pairs it follows (see HealthTracker)."""

    __slots__ = ("merchant_volume", "geo_volume", "merchants", "geos")

    def __init__(self) -> None:
        self.merchant_volume: dict[str, int] = {}
        self.geo_volume: dict[str, int] = {}
        self.merchants: dict[str, Window] = {}
        self.geos: dict[str, Window] = {}

    def refresh(self, b: int, top_n: int) -> None:
        self.merchants = _follow(self.merchant_volume, self.merchants, b, top_n)
        self.geos = _follow(self.geo_volume, self.geos, b, top_n)
        self.merchant_volume = {}
        self.geo_volume = {}


def _follow(volume: dict[str, int], followed: dict[str, Window], b: int, top_n: int) -> dict[str, Window]:
    """The ``2 × top_n`` busiest of ``volume``, and the ``followed`` ones still in the ``4 × top_n`` busiest."""
    if not top_n:
        return {}
    ranked = heapq.nlargest(4 * top_n, volume.items(), key=lambda kv: (kv[1], kv[0]))
    out = {}
    for i, (key, _) in enumerate(ranked):
        w = followed.get(key)
        if w is not None:
            out[key] = w
        elif i < 2 * top_n:
            out[key] = Window(key, b + 1, _SIZE)
    return out


def _processor_window(name: str, b: int) -> Window:
    s = Window(name, b, _SIZE, geo=True)
    s.scores = deque()
    s.children = _Followed()
    return s


def _trajectory(scores: deque, dead_band: float) -> str:
    """Least-squares slope of the score over the last ``trajectory_seconds`` (per second)."""
    if len(scores) < 2:
        return STEADY
    n = len(scores)
    mx = sum(t for t, _ in scores) / n
    my = sum(v for _, v in scores) / n
    sxx = sum((t - mx) ** 2 for t, _ in scores)
    if sxx == 0:
        return STEADY
    slope = sum((t - mx) * (v - my) for t, v in scores) / sxx
    if slope > dead_band:
        return ACCELERATING
    if slope < -dead_band:
        return DECELERATING
    return STEADY


# -- answers from a snapshot (pure; the HTTP routes call these) ------------------------------------

def processors_answer(snapshot: dict | None) -> dict:
    """What ``GET /v1/risk/processors`` returns: ``{"as_of", "processors"}`` (``as_of`` null and no
    processors when there is no snapshot: no risk consumer running, or it stopped 30 s ago)."""
    if not snapshot:
        return {"as_of": None, "processors": []}
    return {"as_of": snapshot.get("as_of"), "processors": snapshot.get("processors", [])}


def retry_rule(r: RetryInsightConfig) -> dict:
    """The options :func:`retry_advice` applies, as the snapshot's ``retry_rule`` carries them."""
    return {"min_samples": r.min_samples, "confidence_z": r.confidence_z, "avoid_below": r.avoid_below,
            "wait_fraction": r.wait_fraction, "window_seconds": r.window_seconds}


#: retry_advice's rule when the snapshot carries none: the retry_insight options' defaults.
DEFAULT_RETRY_RULE = retry_rule(parse_options({}).engine.retry_insight)


def wilson_upper(k: int, n: int, z: float) -> float:
    """Upper end of the Wilson score interval of ``k`` successes in ``n`` trials."""
    if n <= 0:
        return 1.0
    return 1.0 - wilson_lower(n - k, n, z)


def advice_of(rate: float | None, baseline: float | None, n: int, rule: dict) -> str:
    """The rule (docs/risk.md, "Retry insight"): fewer than ``min_samples`` retries in the window:
    ``retry``; the success rate's Wilson upper bound under ``avoid_below``: ``avoid``; under
    ``baseline × wait_fraction``: ``wait``; else ``retry``."""
    if rate is None or n < rule["min_samples"]:
        return ADVICE_RETRY
    upper = wilson_upper(round(rate * n), n, rule["confidence_z"])
    if upper < rule["avoid_below"]:
        return ADVICE_AVOID
    if baseline is not None and upper < baseline * rule["wait_fraction"]:
        return ADVICE_WAIT
    return ADVICE_RETRY


def retry_advice(snapshot: dict | None, processor: str, failure_category: str) -> dict:
    """``{"processor", "failure_category", "advice", "retry_success_rate", "baseline",
    "sample_size", "window_seconds"}`` for one pair, from the snapshot (a pair it doesn't hold:
    no samples, rate and baseline null, advice ``retry``)."""
    snapshot = snapshot or {}
    rule = {**DEFAULT_RETRY_RULE, **(snapshot.get("retry_rule") or {})}
    row = None
    for r in snapshot.get("retry") or ():
        if r.get("processor") == processor and r.get("failure_category") == failure_category:
            row = r
            break
    rate = row.get("retry_success_rate") if row else None
    baseline = row.get("baseline") if row else None
    n = int(row.get("sample_size") or 0) if row else 0
    return {
        "processor": processor,
        "failure_category": failure_category,
        "advice": advice_of(rate, baseline, n, rule),
        "retry_success_rate": rate,
        "baseline": baseline,
        "sample_size": n,
        "window_seconds": row.get("window_seconds", rule["window_seconds"]) if row else rule["window_seconds"],
    }
