"""Processor health and retry insight (payflux.risk.health): scores, bands, drivers, trajectory,
retry advice, caps, the payflux_risk_processor_* metrics and the snapshot the handler writes."""

from __future__ import annotations

import json
from collections import deque
from typing import Any

import txredisapi
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.trial import unittest

from payflux.observability import logsummary
from payflux.observability.metrics import Metrics
from payflux.risk.config import parse_options
from payflux.risk.engine import RiskEngine
from payflux.risk.health import (
    BANDS, DRIVERS, WEIGHTS, _trajectory, advice_of, band_of, processors_answer, retry_advice, wilson_upper,
)
from payflux.risk.handler import HEALTH_TTL_MS, RiskHandler
from tests.support.consumers import KEYS, RedisFixture, wait_for
from tests.support.redis import redis_test_cases
from tests.test_risk import T0, Traffic, engine
from tests.test_risk_handler import RecordingRedis, entries, payments

HEALTH_KEY = "pf:{alerts}:risk:health"
RETRY_KEYS = {"processor", "failure_category", "advice", "retry_success_rate", "baseline", "sample_size",
              "window_seconds"}


def contributions(e: RiskEngine, processor: str = "stripe") -> dict[str, float]:
    return {d["name"]: d["contribution"] for d in e.health.results[processor]["drivers"]}  # type: ignore[union-attr]


def result(e: RiskEngine, processor: str = "stripe") -> dict:
    return e.health.results[processor]  # type: ignore[union-attr]


class NearMixin:
    def assertNear(self, got: float, want: float, delta: float) -> None:
        self.assertLessEqual(abs(got - want), delta, f"{got} is not within {delta} of {want}")  # type: ignore


def warmed(rate: int = 500, seconds: int = 120, **options: Any) -> tuple[RiskEngine, Traffic]:
    e = engine(**options)
    tr = Traffic(seed=7, rates={"stripe": rate})
    tr.run(e, seconds)
    return e, tr


class BandTests(unittest.TestCase):
    def test_bands_at_their_boundaries(self):
        cases = [(0.0, "low"), (0.2999, "low"), (0.3, "elevated"), (0.5999, "elevated"), (0.6, "high"),
                 (0.7999, "high"), (0.8, "critical"), (1.0, "critical")]
        for score, band in cases:
            self.assertEqual(band_of(score, 0.3, 0.6, 0.8), band, score)
        self.assertEqual(BANDS, ("low", "elevated", "high", "critical"))

    def test_configured_thresholds(self):
        e = engine(health={"elevated": 0.1, "high": 0.2, "critical": 0.95})
        c = e.health.config  # type: ignore[union-attr]
        self.assertEqual((c.elevated, c.high, c.critical), (0.1, 0.2, 0.95))
        tr = Traffic(seed=7, rates={"stripe": 500})
        tr.run(e, 120)
        tr.fail["stripe"] = 0.4
        tr.run(e, 15)
        r = result(e)
        self.assertEqual(r["score"], 0.9)  # high_failure_rate alone: its whole weight
        self.assertEqual(r["band"], "high")  # 0.9 < critical 0.95
        self.assertEqual(e.health.snapshot()["bands"], {"elevated": 0.1, "high": 0.2, "critical": 0.95})

    def test_option_errors_name_the_option(self):
        def error(options: dict, text: str) -> None:
            with self.assertRaises(ValueError) as cm:
                parse_options(options)
            self.assertIn(text, str(cm.exception))

        error({"health": {"high": 0.3}}, "risk option health.high must be above health.elevated (0.3)")
        error({"health": {"high": 0.85}}, "risk option health.critical must be above health.high (0.85)")
        error({"health": {"elevated": 0.7, "high": 0.6}}, "risk option health.high must be above health.elevated")
        error({"health": {"critical": 1.0}}, "risk option health.critical must be a number above 0 and below 1")
        error({"health": {"elevated": 0}}, "risk option health.elevated must be a number above 0 and below 1")
        error({"health": {"high": "0.6"}}, "risk option health.high must be a number above 0 and below 1")
        error({"health": {"high": True}}, "risk option health.high must be a number")
        error({"health": {"window_seconds": 0}}, "risk option health.window_seconds must be an integer from 1")
        error({"health": {"timeout_categories": "timeout"}}, "risk option health.timeout_categories must be a list")
        error({"health": {"auth_categories": [""]}}, "risk option health.auth_categories must be a list")
        error({"health": {"bands": {}}}, "risk option health.bands is not a known option")
        error({"health": []}, "risk option health must be a table")
        error({"retry_insight": {"avoid_below": 2}}, "risk option retry_insight.avoid_below must be a number")
        error({"retry_insight": {"min_samples": 0}}, "risk option retry_insight.min_samples must be an integer")

    def test_defaults(self):
        c = parse_options({}).engine
        h, r = c.health, c.retry_insight
        self.assertEqual((h.elevated, h.high, h.critical, h.window_seconds, h.min_events, h.top_n),
                         (0.3, 0.6, 0.8, 10, 100, 10))
        self.assertIn("processor_timeout", h.timeout_categories)
        self.assertIn("do_not_honor", h.auth_categories)
        self.assertNotIn("insufficient_funds", h.auth_categories)
        self.assertEqual((r.window_seconds, r.min_samples, r.avoid_below, r.wait_fraction), (60, 20, 0.1, 0.5))
        # categories compare lower-cased
        c = parse_options({"health": {"auth_categories": ["Card_Declined"]}}).engine
        self.assertEqual(c.health.auth_categories, {"card_declined"})


class DriverTests(NearMixin, unittest.TestCase):
    """Each driver moves when its signal moves, and only then (the others stay at 0)."""

    def assertOnly(self, e: RiskEngine, driver: str, weight: float | None = None) -> None:
        got = contributions(e)
        self.assertEqual(set(got), set(DRIVERS))
        self.assertGreater(got[driver], 0, got)
        if weight is not None:
            self.assertEqual(got[driver], weight, got)
        self.assertEqual({k: v for k, v in got.items() if k != driver and v}, {}, got)

    def test_steady_traffic_moves_nothing(self):
        e, _ = warmed()
        r = result(e)
        self.assertEqual(r["score"], 0.0)
        self.assertEqual((r["band"], r["insufficient_volume"]), ("low", False))
        self.assertEqual(set(contributions(e).values()), {0.0})
        by_name = {d["name"]: d for d in r["drivers"]}
        self.assertNear(by_name["high_failure_rate"]["value"], 0.05, 0.02)
        self.assertNear(by_name["high_failure_rate"]["baseline"], 0.05, 0.01)
        self.assertNear(by_name["traffic_volatility"]["value"], 500, 1)
        self.assertNear(by_name["traffic_volatility"]["baseline"], 500, 1)
        self.assertNear(by_name["geo_entropy_increase"]["baseline"], 2.32, 0.05)  # log2(5) geos

    def test_high_failure_rate(self):
        e, tr = warmed()
        tr.fail["stripe"] = 0.4
        tr.run(e, 12)
        self.assertOnly(e, "high_failure_rate", WEIGHTS["high_failure_rate"])
        self.assertEqual(result(e)["band"], "critical")

    def test_retry_pressure_spike(self):
        e, tr = warmed()
        tr.retry["stripe"] = 0.3
        tr.retry_fail["stripe"] = 0.05  # retries fail like the rest: the failure rate stays put
        tr.run(e, 12)
        self.assertOnly(e, "retry_pressure_spike", WEIGHTS["retry_pressure_spike"])

    def test_timeout_clustering(self):
        e, tr = warmed()
        tr.categories["stripe"] = {"timeout": 17.0, "insufficient_funds": 1.0, "do_not_honor": 1.0,
                                   "fraud_suspected": 1.0}  # 85% of failures, at the same failure rate
        tr.run(e, 12)
        self.assertOnly(e, "timeout_clustering", WEIGHTS["timeout_clustering"])

    def test_auth_failure_cluster(self):
        e, tr = warmed()
        tr.categories["stripe"] = {"do_not_honor": 17.0, "insufficient_funds": 1.0, "timeout": 1.0,
                                   "fraud_suspected": 1.0}
        tr.run(e, 12)
        self.assertOnly(e, "auth_failure_cluster", WEIGHTS["auth_failure_cluster"])

    def test_traffic_volatility(self):
        e, tr = warmed()
        tr.rates["stripe"] = 2500  # 5x
        tr.run(e, 12)
        self.assertOnly(e, "traffic_volatility", WEIGHTS["traffic_volatility"])
        e, tr = warmed()
        tr.rates["stripe"] = 100  # a fifth: a drop counts as much as a surge
        tr.run(e, 12)
        self.assertOnly(e, "traffic_volatility", WEIGHTS["traffic_volatility"])
        e, tr = warmed()
        tr.rates["stripe"] = 650  # +30%: inside the dead band
        tr.run(e, 12)
        self.assertEqual(result(e)["score"], 0.0)

    def test_geo_entropy_increase(self):
        e = engine()
        tr = Traffic(seed=7, rates={"stripe": 500})
        tr.geo_fail = {"US": 0.21, "EU-west": 0.01, "GB": 0.01, "BR": 0.01, "IN": 0.01}  # 5% overall, mostly US
        tr.run(e, 120)
        self.assertEqual(result(e)["score"], 0.0)
        tr.geo_fail = {}  # the same 5%, spread over every geo
        tr.run(e, 12)
        self.assertOnly(e, "geo_entropy_increase", WEIGHTS["geo_entropy_increase"])

    def test_contributions_add_up_to_the_score(self):
        e, tr = warmed()
        tr.fail["stripe"] = 0.4
        tr.retry["stripe"] = 0.3
        tr.run(e, 12)
        r = result(e)
        self.assertEqual(r["score"], 1.0)
        self.assertAlmostEqual(sum(contributions(e).values()), 1.0, places=3)  # scaled down to the cap


class ScoreTests(unittest.TestCase):
    def test_steady_noisy_traffic_for_10_minutes_never_reaches_high(self):
        e = engine()
        tr = Traffic(seed=11, rates={"stripe": 1000, "adyen": 300, "checkout": 100})
        tr.noise = 0.2
        tr.run(e, 60)
        worst = 0.0
        for _ in range(540):
            tr.run(e, 1)
            for r in e.health.results.values():
                worst = max(worst, r["score"])
        self.assertLess(worst, 0.3)  # not even elevated

    def test_a_spike_reaches_high_within_5_seconds(self):
        e = engine()
        tr = Traffic(seed=5, rates={"stripe": 1000})
        tr.noise = 0.2
        tr.run(e, 120)
        tr.fail["stripe"] = 0.4
        for second in range(1, 6):
            tr.run(e, 1)
            if result(e)["band"] in ("high", "critical"):
                break
        self.assertIn(result(e)["band"], ("high", "critical"))
        self.assertLessEqual(second, 5)

    def test_too_few_events_stay_low_and_say_so(self):
        e = engine()
        tr = Traffic(seed=3, rates={"stripe": 5})  # 50 outcomes in the 10 s window < min_events 100
        tr.run(e, 120)
        tr.fail["stripe"] = 0.6
        tr.run(e, 12)
        r = result(e)
        self.assertEqual((r["score"], r["band"], r["insufficient_volume"]), (0.0, "low", True))
        self.assertLess(r["sample_size"], 100)
        self.assertGreater({d["name"]: d["value"] for d in r["drivers"]}["high_failure_rate"], 0.3)  # still shown
        self.assertEqual(set(contributions(e).values()), {0.0})

    def test_warm_up_stays_low(self):
        e = engine()
        tr = Traffic(seed=3, rates={"stripe": 1000})
        tr.fail["stripe"] = 0.5
        tr.run(e, 30)  # younger than warmup_seconds (60): no baseline to compare with
        r = result(e)
        self.assertEqual((r["score"], r["insufficient_volume"]), (0.0, True))

    def test_a_processor_leaves_the_results_when_its_window_empties(self):
        e, tr = warmed()
        self.assertIn("stripe", e.health.results)
        e.advance(tr.t + 11_000)
        self.assertNotIn("stripe", e.health.results)

    def test_the_baseline_is_frozen_while_high(self):
        e, tr = warmed()
        tr.fail["stripe"] = 0.4
        tr.run(e, 300)  # five minutes of incident: it never becomes the normal
        by_name = {d["name"]: d for d in result(e)["drivers"]}
        self.assertLess(by_name["high_failure_rate"]["baseline"], 0.07)
        self.assertEqual(result(e)["band"], "critical")

    def test_merchants_and_geos_are_scored_under_their_processor(self):
        e = engine()
        tr = Traffic(seed=7, rates={"stripe": 1000, "adyen": 500}, merchants=50)
        tr.run(e, 120)
        snap = e.health.snapshot()
        stripe = [p for p in snap["processors"] if p["processor"] == "stripe"][0]
        self.assertEqual(len(stripe["merchants"]), 10)  # top_n
        self.assertEqual(stripe["merchants"][0]["merchant_id_hash"], "mer_000000")  # the busiest first
        self.assertEqual(len(stripe["geos"]), 5)
        self.assertEqual({g["geo_bucket"] for g in stripe["geos"]}, {"US", "EU-west", "GB", "BR", "IN"})
        m = stripe["merchants"][0]
        self.assertEqual(set(m), {"merchant_id_hash", "score", "band", "drivers", "sample_size",
                                  "insufficient_volume"})
        # geo_entropy_increase is a processor driver; merchants and geos carry the other five
        self.assertEqual([d["name"] for d in m["drivers"]], [d for d in DRIVERS if d != "geo_entropy_increase"])
        self.assertEqual((m["band"], m["insufficient_volume"]), ("low", False))
        # a processor incident shows on its merchants too
        tr.fail["stripe"] = 0.4
        tr.run(e, 12)
        snap = e.health.snapshot()
        stripe = [p for p in snap["processors"] if p["processor"] == "stripe"][0]
        self.assertEqual(stripe["merchants"][0]["band"], "critical")
        adyen = [p for p in snap["processors"] if p["processor"] == "adyen"][0]
        self.assertEqual({m["band"] for m in adyen["merchants"]}, {"low"})


class TrajectoryTests(unittest.TestCase):
    def test_slope_and_dead_band(self):
        def points(*scores: float) -> deque:
            return deque(enumerate(scores))

        self.assertEqual(_trajectory(points(0.1), 0.01), "steady")
        self.assertEqual(_trajectory(points(0.1, 0.1, 0.1, 0.1), 0.01), "steady")
        self.assertEqual(_trajectory(points(0.0, 0.1, 0.2, 0.3), 0.01), "accelerating")
        self.assertEqual(_trajectory(points(0.3, 0.2, 0.1, 0.0), 0.01), "decelerating")
        self.assertEqual(_trajectory(points(0.10, 0.105, 0.11, 0.115), 0.01), "steady")  # 0.005/s: in the band
        self.assertEqual(_trajectory(points(0.10, 0.105, 0.11, 0.115), 0.001), "accelerating")

    def test_onset_saturation_recovery(self):
        e, tr = warmed(rate=1000)
        self.assertEqual(result(e)["trajectory"], "steady")
        tr.fail["stripe"] = 0.4
        seen = []
        for _ in range(25):
            tr.run(e, 1)
            seen.append(result(e)["trajectory"])
        self.assertIn("accelerating", seen[:6])
        self.assertEqual(seen[-1], "steady")  # saturated at 0.9 for over 10 s
        tr.fail["stripe"] = 0.05
        seen = []
        for _ in range(25):
            tr.run(e, 1)
            seen.append(result(e)["trajectory"])
        self.assertIn("decelerating", seen[:15])
        self.assertNotIn("accelerating", seen)


class RetryInsightTests(NearMixin, unittest.TestCase):
    def snapshot(self, **row: Any) -> dict:
        base = {"processor": "stripe", "failure_category": "timeout", "retry_success_rate": 0.9, "baseline": 0.9,
                "sample_size": 200, "window_seconds": 60}
        return {"retry": [{**base, **row}],
                "retry_rule": {"min_samples": 20, "confidence_z": 2.0, "avoid_below": 0.1, "wait_fraction": 0.5,
                               "window_seconds": 60}}

    def advice(self, **row: Any) -> dict:
        out = retry_advice(self.snapshot(**row), "stripe", "timeout")
        self.assertEqual(set(out), RETRY_KEYS)
        return out

    def test_each_branch_of_the_rule(self):
        self.assertEqual(self.advice()["advice"], "retry")  # at its baseline
        self.assertEqual(self.advice(retry_success_rate=0.0, sample_size=100)["advice"], "avoid")
        self.assertEqual(self.advice(retry_success_rate=0.3, sample_size=200)["advice"], "wait")  # < 0.45
        self.assertEqual(self.advice(retry_success_rate=0.4, sample_size=10)["advice"], "retry")  # too few
        self.assertEqual(self.advice(retry_success_rate=0.3, baseline=None)["advice"], "retry")  # no baseline yet
        # the bounds decide, not the point estimate: 0 of 20 might still be a 16% rate
        self.assertEqual(self.advice(retry_success_rate=0.0, sample_size=20, baseline=0.2)["advice"], "retry")
        self.assertEqual(self.advice(retry_success_rate=0.0, sample_size=40)["advice"], "avoid")
        self.assertLess(wilson_upper(0, 40, 2.0), 0.1)
        self.assertGreater(wilson_upper(0, 20, 2.0), 0.1)
        out = self.advice(retry_success_rate=0.3, sample_size=200, baseline=0.9)
        self.assertEqual(out, {"processor": "stripe", "failure_category": "timeout", "advice": "wait",
                               "retry_success_rate": 0.3, "baseline": 0.9, "sample_size": 200, "window_seconds": 60})

    def test_a_pair_without_samples(self):
        out = retry_advice(self.snapshot(), "adyen", "timeout")
        self.assertEqual(out, {"processor": "adyen", "failure_category": "timeout", "advice": "retry",
                               "retry_success_rate": None, "baseline": None, "sample_size": 0, "window_seconds": 60})
        self.assertEqual(retry_advice(None, "stripe", "timeout")["advice"], "retry")
        self.assertEqual(advice_of(None, 0.9, 0, {"min_samples": 1, "confidence_z": 2.0, "avoid_below": 0.1,
                                                  "wait_fraction": 0.5}), "retry")

    def test_live_rates_against_their_baseline(self):
        e = engine()
        tr = Traffic(seed=9, rates={"stripe": 1000})
        tr.retry["stripe"] = 0.1
        tr.retry_fail["stripe"] = 0.2  # 80% of retries work
        tr.run(e, 200)
        rows = {r["failure_category"]: r for r in e.health.retry_rows()}
        # successful retries carry no failure_category here: they count under their intent's last failure
        self.assertEqual(set(rows), {"insufficient_funds", "do_not_honor", "timeout", "fraud_suspected"})
        row = rows["timeout"]
        self.assertEqual(set(row), RETRY_KEYS - {"advice"})
        # 80% of retries work; here a little less is seen: a successful retry of an intent whose
        # failure was never seen has no category to count under (retry_unattributed)
        self.assertNear(row["retry_success_rate"], 0.75, 0.1)
        self.assertNear(row["baseline"], 0.75, 0.05)
        self.assertGreater(row["sample_size"], 100)
        snap = e.health.snapshot()
        self.assertEqual(retry_advice(snap, "stripe", "timeout")["advice"], "retry")
        tr.retry_fail["stripe"] = 0.7  # retries mostly fail now: a third of the usual success
        tr.run(e, 60)
        out = retry_advice(e.health.snapshot(), "stripe", "timeout")
        self.assertEqual(out["advice"], "wait", out)
        tr.retry_fail["stripe"] = 1.0
        tr.run(e, 62)  # the whole window
        out = retry_advice(e.health.snapshot(), "stripe", "timeout")
        self.assertEqual(out["advice"], "avoid", out)
        self.assertEqual(out["retry_success_rate"], 0.0)

    def test_retries_without_a_result_or_a_category_are_not_samples(self):
        e = engine()
        base = {"processor": "stripe", "event_type": "payment_succeeded", "retry_count": 1}
        e.observe({**base}, T0)  # no retry_result
        e.observe({**base, "retry_result": "maybe"}, T0)
        e.observe({**base, "retry_result": "success"}, T0)  # no category, no known intent
        e.observe({**base, "retry_result": "success", "retry_count": 0, "failure_category": "timeout"}, T0)
        e.observe({**base, "retry_result": "Approved", "failure_category": "timeout"}, T0)
        e.observe({**base, "event_type": "payment_failed", "retry_result": "DECLINED", "failure_category": "timeout"},
                  T0)
        e.advance(T0 + 1000)
        self.assertEqual(e.health.retry_unattributed, 1)
        self.assertEqual([(r["failure_category"], r["sample_size"], r["retry_success_rate"])
                          for r in e.health.retry_rows()], [("timeout", 2, 0.5)])


class CapTests(unittest.TestCase):
    def test_processors_pairs_and_intents_are_capped(self):
        e = engine(max_keys={"processor": 2, "failure_category": 3, "payment_intent_id_hash": 50})
        h = e.health
        for i in range(5):
            for j in range(10):
                e.observe({"processor": f"p{i}", "event_type": "payment_failed", "failure_category": f"c{j}",
                           "payment_intent_id_hash": f"pi_{i}_{j}", "retry_count": 1, "retry_result": "failed"},
                          T0 + i)
        e.advance(T0 + 1000)
        self.assertEqual(len(h.processors), 2)
        self.assertEqual(h.processors.evicted, 3)
        self.assertLessEqual(len(h.results), 2)
        self.assertEqual(len(h.retry_pairs), 3)
        self.assertLessEqual(len(h.retry_rows()), 3)
        self.assertEqual(len(h.intents), 50)
        tables = {(d, dim): t for d, dim, t in e.tables()}
        self.assertIs(tables[("health", "processor")], h.processors)
        self.assertIs(tables[("retry_insight", "failure_category")], h.retry_pairs)

    def test_followed_merchants_and_geos_are_bounded(self):
        e = engine(health={"top_n": 3}, max_keys={"merchant_id_hash": 100})
        tr = Traffic(seed=7, rates={"stripe": 1000}, merchants=5000)
        tr.run(e, 30)
        s = e.health.processors.items["stripe"]
        self.assertLessEqual(len(s.children.merchants), 12)  # 4 x top_n at most
        self.assertLessEqual(len(s.children.merchant_volume), 100)  # the merchant cap, per processor
        snap = e.health.snapshot()
        self.assertEqual(len(snap["processors"][0]["merchants"]), 3)
        self.assertLessEqual(len(snap["processors"][0]["geos"]), 3)

    def test_health_can_be_turned_off(self):
        e = engine(health={"enabled": False})
        self.assertIsNone(e.health)
        Traffic(seed=1, rates={"stripe": 100}).run(e, 3)
        self.assertNotIn("health", {d for d, _, _ in e.tables()})


class FailingSetRedis(RecordingRedis):
    """Takes XADDs; every SET fails (``error`` decides how) until ``healthy``."""

    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.error = error
        self.healthy = False

    def execute_command(self, *args: Any) -> defer.Deferred:
        if args[0] == "SET" and not self.healthy:
            return defer.fail(self.error)
        return super().execute_command(*args)


def health_handler(clock: Any, redis: Any = None, **options: Any) -> tuple[RiskHandler, Any]:
    options = {"idle_after_seconds": 0, "retry_storm": {"enabled": False}, "failure_cluster": {"enabled": False},
               "failure_rate": {"min_events": 50, "warmup_seconds": 20}, **options}
    h = RiskHandler(reactor=clock, **options)
    redis = redis if redis is not None else RecordingRedis()
    h.bind_redis(redis, KEYS)
    return h, redis


class PublishingTests(unittest.TestCase):
    def test_metrics_are_exported(self):
        clock = task.Clock()
        h, _ = health_handler(clock)
        metrics = Metrics()
        h.bind_metrics(metrics, "risk")
        e = h.engine
        tr = Traffic(seed=7, rates={"stripe": 500})
        tr.retry["stripe"] = 0.1
        tr.run(e, 120)
        tr.fail["stripe"] = 0.4
        tr.run(e, 12)
        self.successResultOf(h.handle([]))
        m = metrics.registry
        labels = {"consumer": "risk", "processor": "stripe"}
        self.assertEqual(m.get_sample_value("payflux_risk_processor_score", labels), 0.9)
        self.assertEqual({b: m.get_sample_value("payflux_risk_processor_band", {**labels, "band": b}) for b in BANDS},
                         {"low": 0, "elevated": 0, "high": 0, "critical": 1})
        drivers = {d: m.get_sample_value("payflux_risk_processor_driver", {**labels, "driver": d}) for d in DRIVERS}
        self.assertEqual(drivers["high_failure_rate"], 0.9)
        self.assertEqual(set(drivers) - {"high_failure_rate"}, {d for d in DRIVERS if d != "high_failure_rate"})
        rate = m.get_sample_value("payflux_risk_retry_success_rate", {**labels, "failure_category": "timeout"})
        self.assertIsNotNone(rate)
        self.assertTrue(0 <= rate <= 1)
        text = metrics.render().decode()
        for name in ("payflux_risk_processor_score", "payflux_risk_processor_band", "payflux_risk_processor_driver",
                     "payflux_risk_retry_success_rate"):
            self.assertIn(f"# TYPE {name} gauge", text)
        # the processor leaves the window: its series go
        e.advance(tr.t + 70_000)
        self.successResultOf(h.handle([]))
        self.assertIsNone(m.get_sample_value("payflux_risk_processor_score", labels))
        self.assertIsNone(m.get_sample_value("payflux_risk_processor_band", {**labels, "band": "critical"}))
        self.assertIsNone(m.get_sample_value("payflux_risk_processor_driver", {**labels, "driver": "high_failure_rate"}))
        self.assertIsNone(m.get_sample_value("payflux_risk_retry_success_rate",
                                             {**labels, "failure_category": "timeout"}))

    def test_snapshot_is_written_with_px_at_most_once_per_second(self):
        clock = task.Clock()
        clock.advance(1000)
        h, redis = health_handler(clock)
        events = payments(80, 50, 0.05, T0)
        self.successResultOf(h.handle(entries(events[:2000])))
        self.assertEqual(len(redis.sets), 1)
        cmd = redis.sets[0]
        self.assertEqual(cmd[0:2], ("SET", HEALTH_KEY))
        self.assertEqual(cmd[3:], ("PX", str(HEALTH_TTL_MS)))
        self.assertEqual(HEALTH_TTL_MS, 30_000)
        self.successResultOf(h.handle(entries(events[2000:3000])))
        self.assertEqual(len(redis.sets), 1)  # same reactor second: its write waits for the end of it
        clock.advance(1)
        self.assertEqual(len(redis.sets), 2)  # the trailing write: never more than a second behind a batch
        self.assertNotEqual(redis.sets[1][2], redis.sets[0][2])
        self.successResultOf(h.handle(entries(events[3000:])))
        self.assertEqual(len(redis.sets), 2)
        clock.advance(1)
        self.assertEqual(len(redis.sets), 3)
        clock.advance(10)
        self.assertEqual(len(redis.sets), 3)  # nothing new came: nothing more is written (no idle tick here)
        snap = json.loads(redis.sets[-1][2])
        # a throttled write still waiting when the consumer stops is not left behind on the reactor
        closing, _ = health_handler(clock)
        self.successResultOf(closing.handle(entries(events[:2000])))
        self.successResultOf(closing.handle(entries(events[2000:3000])))
        self.assertTrue([c for c in clock.getDelayedCalls() if c.func == closing._trailing_health])
        self.successResultOf(closing.close())
        self.assertFalse([c for c in clock.getDelayedCalls() if c.func == closing._trailing_health])
        self.assertEqual(set(snap), {"v", "as_of", "as_of_ms", "bands", "processors", "retry", "retry_rule"})
        self.assertEqual(snap["v"], 1)
        last_closed = events[-1][0] // 1000 - 1
        self.assertEqual(snap["as_of_ms"], (last_closed + 1) * 1000)
        self.assertRegex(snap["as_of"], r"^2026-01-01T00:01:1\d\.000Z$")
        self.assertEqual(snap["bands"], {"elevated": 0.3, "high": 0.6, "critical": 0.8})
        (p,) = snap["processors"]
        self.assertEqual(set(p), {"processor", "score", "band", "drivers", "trajectory", "sample_size",
                                  "insufficient_volume", "merchants", "geos"})
        self.assertEqual(p["processor"], "stripe")
        self.assertEqual([d["name"] for d in p["drivers"]], list(DRIVERS))
        self.assertEqual(set(p["drivers"][0]), {"name", "value", "baseline", "contribution"})
        self.assertIn(p["trajectory"], ("accelerating", "decelerating", "steady"))
        self.assertEqual(p["geos"], [])  # these events carry no geo_bucket
        self.assertLessEqual(len(p["merchants"]), 10)
        self.assertEqual(processors_answer(snap), {"as_of": snap["as_of"], "processors": snap["processors"]})
        self.assertEqual(processors_answer(None), {"as_of": None, "processors": []})
        # the idle tick writes it too
        h2, redis2 = health_handler(clock, idle_after_seconds=5)
        self.successResultOf(h2.handle(entries(events)))
        clock.advance(1)
        clock.advance(5)
        clock.advance(1)
        self.assertGreaterEqual(len(redis2.sets), 2)
        self.successResultOf(h2.close())

    def test_no_snapshot_without_redis_or_health(self):
        clock = task.Clock()
        h = RiskHandler(reactor=clock, idle_after_seconds=0)
        self.successResultOf(h.handle(entries(payments(3, 50, 0.05, T0))))  # unbound: nothing to write to
        h, redis = health_handler(clock, health={"enabled": False})
        self.successResultOf(h.handle(entries(payments(3, 50, 0.05, T0))))
        self.assertEqual(redis.sets, [])

    def test_a_failing_snapshot_write_never_fails_the_batch(self):
        # outage lines are summarised process-wide per kind: an earlier test's would hold this one back
        logsummary.forget_shared()
        self.addCleanup(logsummary.forget_shared)
        clock = task.Clock()
        redis = FailingSetRedis(txredisapi.ConnectionError("Not connected"))
        h, _ = health_handler(clock, redis)
        logged: list[dict] = []
        h.log = Logger(namespace="payflux.risk", observer=logged.append)
        events, _ = self.spike_events()
        batches = [events[i:i + 500] for i in range(0, len(events), 500)]
        for batch in batches:
            self.successResultOf(h.handle(entries(batch)))
            clock.advance(1)
        self.assertEqual([r["action"] for r in redis.records()], ["open"])  # alerts still go out
        self.assertEqual(len(redis.sets), 0)
        failed = [e for e in logged if "SET failed" in e.get("log_format", "")]
        self.assertEqual(len(failed), 1, [e.get("log_format") for e in logged])  # one line per outage
        redis.healthy = True
        self.successResultOf(h.handle(entries(payments(1, 1, 0.0, events[-1][0] + 1000, seed=3))))
        self.assertEqual(len(redis.sets), 1)
        self.assertTrue([e for e in logged if "writing again" in e.get("log_format", "")])

    def test_a_broken_snapshot_is_logged_not_raised(self):
        clock = task.Clock()
        redis = FailingSetRedis(RuntimeError("boom"))
        h, _ = health_handler(clock, redis)
        logged: list[dict] = []
        h.log = Logger(namespace="payflux.risk", observer=logged.append)
        self.successResultOf(h.handle(entries(payments(3, 50, 0.05, T0))))
        self.assertEqual(len([e for e in logged if e.get("log_failure") is not None]), 1)

    @staticmethod
    def spike_events() -> tuple[list[tuple[int, dict]], int]:
        calm = payments(40, 50, 0.05, T0, seed=1)
        storm = payments(20, 50, 0.3, T0 + 40_000, seed=2)
        return calm + storm, T0 + 40_000


class SnapshotRedisMixin(RedisFixture):
    """The snapshot against a real redis-server: the key, its JSON and its expiry."""

    def setUp(self) -> None:
        self.setup_redis()

    async def test_the_snapshot_key_holds_the_json_and_expires(self):
        h = RiskHandler(reactor=task.Clock(), idle_after_seconds=0)
        h.bind_redis(self.redis, KEYS)
        await h.handle(entries(payments(80, 50, 0.05, T0)))
        await wait_for(lambda: not h._health_busy, what="the SET answered")
        ttl = self.server.sync_command("PTTL", HEALTH_KEY)
        self.assertTrue(0 < ttl <= HEALTH_TTL_MS, ttl)
        snap = json.loads(self.server.sync_command("GET", HEALTH_KEY))
        self.assertEqual(snap["processors"][0]["processor"], "stripe")
        self.assertEqual(retry_advice(snap, "stripe", "do_not_honor")["advice"], "retry")


redis_test_cases(SnapshotRedisMixin, globals())
