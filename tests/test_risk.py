"""The risk detector core (payflux.risk.engine), driven by synthetic traffic on a stream clock."""

from __future__ import annotations

import json
import os
import random
import tempfile
from typing import Any

from twisted.trial import unittest

from payflux.risk.alerts import (
    CONSUMER_STOPPED, ESCALATE, EVICTED, FAILURE_CLUSTER, FAILURE_RATE_SPIKE, INSUFFICIENT_VOLUME, OPEN,
    RECOVERED, RESOLVE, RETRY_STORM, Transition, key_text,
)
from payflux.risk.config import parse_options
from payflux.risk.engine import RiskEngine
from payflux.risk.windows import KeyTable, wilson_lower

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z, in ms
GEOS = ("US", "EU-west", "GB", "BR", "IN")
CATEGORIES = ("insufficient_funds", "do_not_honor", "timeout", "fraud_suspected")
ORIGINS = {"issuer": 6.0, "processor": 3.0, "network": 1.0}  # failure_origin weights of a failure


def engine(**options: Any) -> RiskEngine:
    return RiskEngine(parse_options(options).engine)


class Traffic:
    """
    Synthetic payment_exhaust traffic, one stream second at a time, from a seeded RNG.

    Per processor: ``rates`` events/s (spread evenly over the second), failure probability
    ``fail``, retry share ``retry``.  Failures get a category and every event a geo from the
    weights (uniform unless set), and failures a ``failure_origin`` (``origins`` weights, drawn
    independently of the category).  ``noise`` jitters each second's rate and probabilities by up
    to that fraction.  Merchants follow a heavy-tailed (Zipf-like) popularity so some of them
    have enough volume to be judged.  Normal retries reuse a recent failed intent (2-3 attempts)
    and carry ``retry_result`` ("failed" or "success"); a retry fails with the processor's
    ``retry_fail`` probability if set, else like any event.  Events are shaped as the stored
    ``data`` of the seed's schema (optional fields absent).  Origins and ``retry_fail`` draw from
    a second RNG, so the main one's sequence is that of traffic without them.
    """

    def __init__(self, seed: int = 1, rates: dict[str, int] | None = None, merchants: int = 200) -> None:
        self.rng = random.Random(seed)
        self.rng2 = random.Random(seed + 1_000_003)
        self.rates = dict(rates or {"stripe": 1000})
        self.fail = {p: 0.05 for p in self.rates}
        self.retry = {p: 0.03 for p in self.rates}
        self.categories: dict[str, dict[str, float]] = {p: {c: 1.0 for c in CATEGORIES} for p in self.rates}
        self.geos: dict[str, dict[str, float]] = {p: {g: 1.0 for g in GEOS} for p in self.rates}
        self.geo_fail: dict[str, float] = {}  # geo -> failure probability, on every processor
        self.retry_fail: dict[str, float] = {}  # processor -> failure probability of its retries
        self.origins: dict[str, dict[str, float]] = {p: dict(ORIGINS) for p in self.rates}
        weights = [1.0 / (i + 1) for i in range(merchants)]
        self.merchants = [f"mer_{i:06d}" for i in range(merchants)]
        self.merchant_weights = weights
        self.noise = 0.0
        self.t = T0
        self.count = 0
        self.recent_failed: list[tuple[str, int]] = []  # (intent, attempts so far)

    def _jitter(self, x: float) -> float:
        return x * (1 + self.rng.uniform(-self.noise, self.noise)) if self.noise else x

    def run(self, e: RiskEngine, seconds: int) -> list[Transition]:
        rng = self.rng
        out: list[Transition] = []
        for _ in range(seconds):
            for p, rate in self.rates.items():
                n = max(0, int(round(self._jitter(rate))))
                if not n:
                    continue
                fail, retry = min(1.0, self._jitter(self.fail[p])), min(1.0, self._jitter(self.retry[p]))
                merchants = rng.choices(self.merchants, self.merchant_weights, k=n)
                cats = rng.choices(list(self.categories[p]), list(self.categories[p].values()), k=n)
                geos = rng.choices(list(self.geos[p]), list(self.geos[p].values()), k=n)
                origins = self.rng2.choices(list(self.origins[p]), list(self.origins[p].values()), k=n)
                retry_fail = self.retry_fail.get(p)
                step = 1000 / n
                for j in range(n):
                    self.count += 1
                    failed = rng.random() < self.geo_fail.get(geos[j], fail)
                    is_retry = rng.random() < retry
                    if is_retry and retry_fail is not None:
                        failed = self.rng2.random() < retry_fail
                    if is_retry and self.recent_failed:
                        intent, attempts = self.recent_failed.pop(0)
                    else:
                        intent, attempts = f"pi_{self.count:010d}", 1
                    ev = {
                        "event_type": "payment_failed" if failed else "payment_succeeded",
                        "event_timestamp": "2026-01-01T00:00:00.000Z", "event_id": f"evt_{self.count:010d}",
                        "processor": p, "merchant_id_hash": merchants[j], "geo_bucket": geos[j],
                        "payment_intent_id_hash": intent,
                        "retry_count": rng.randint(1, 2) if is_retry else 0,
                    }
                    if is_retry:
                        ev["retry_result"] = "failed" if failed else "success"
                    if failed:
                        ev["failure_category"] = cats[j]
                        ev["failure_origin"] = origins[j]
                        if len(self.recent_failed) < 50 and attempts < 3:  # normal retries: 3 attempts at most
                            self.recent_failed.append((intent, attempts + 1))
                    e.observe(ev, self.t + int(j * step))
            self.t += 1000
            out += e.take()
        return out


def of(transitions: list[Transition], action: str | None = None, type: str | None = None,
       key: str | None = None) -> list[Transition]:
    return [tr for tr in transitions if (action is None or tr.action == action)
            and (type is None or tr.alert.type == type) and (key is None or tr.alert.key_text == key)]


class FailureRateSpikeTests(unittest.TestCase):
    def test_spike_from_5_to_40_percent_at_1k_per_second_alerts_within_5_seconds(self):
        e = engine()
        traffic = Traffic(seed=7, rates={"stripe": 1000, "adyen": 300})
        self.assertEqual(traffic.run(e, 180), [])
        spike_at = traffic.t
        traffic.fail["stripe"] = 0.40
        got = traffic.run(e, 20)
        opened = of(got, OPEN, FAILURE_RATE_SPIKE, "processor=stripe")
        self.assertEqual(len(opened), 1, got)
        tr = opened[0]
        self.assertLessEqual(tr.at_ms - spike_at, 5000)
        self.assertGreater(tr.at_ms, spike_at)
        a = tr.alert
        self.assertEqual((a.type, a.key, a.window_seconds), (FAILURE_RATE_SPIKE, (("processor", "stripe"),), 10))
        self.assertEqual(a.alert_id, f"failure_rate_spike:processor=stripe:{tr.at_ms}")
        n = tr.numbers
        self.assertLess(abs(n["baseline_rate"] - 0.05), 0.01)
        self.assertGreaterEqual(n["lower_bound"], n["threshold"])
        self.assertAlmostEqual(n["threshold"], max(2 * n["baseline_rate"], n["baseline_rate"] + 0.05), places=5)
        self.assertEqual(n["failure_rate"], round(n["failures"] / n["events"], 6))
        self.assertGreaterEqual(n["events"], 9000)
        # the window fills with 40% failures: the warning becomes critical, same alert
        escalated = of(got, ESCALATE, FAILURE_RATE_SPIKE, "processor=stripe")
        self.assertEqual(len(escalated), 1)
        self.assertEqual((escalated[0].alert.alert_id, escalated[0].alert.severity), (a.alert_id, "critical"))
        self.assertEqual(a.severity, "warning")
        # one incident, one alert: stripe's merchants and geos fail as much as stripe explains
        self.assertEqual([tr.alert.key_text for tr in of(got, OPEN)], ["processor=stripe"])
        self.assertEqual(e.active_alerts()[FAILURE_RATE_SPIKE], 1)

    def test_steady_noisy_traffic_for_10_minutes_raises_nothing(self):
        e = engine()
        traffic = Traffic(seed=2026, rates={"stripe": 400, "adyen": 150, "checkout": 50}, merchants=300)
        traffic.noise = 0.3  # each second: rate and probabilities +-30%
        got = traffic.run(e, 600)
        self.assertEqual(got, [])
        self.assertGreater(traffic.count, 300_000)
        # the detectors were judging, not starved: keys had volume and warmed-up baselines
        rates = e.processor_failure_rates()
        self.assertEqual(set(rates), {"stripe", "adyen", "checkout"})
        for rate, baseline in rates.values():
            self.assertLess(abs(baseline - 0.05), 0.01)
        merchants = e.failure_rate.table("merchant_id_hash")
        judged = [s for s in merchants.items.values() if s.sum_n >= 100]
        self.assertGreater(len(judged), 0)
        # and the same engine does alert once something really happens
        traffic.noise = 0.0
        traffic.fail["adyen"] = 0.5
        self.assertTrue(of(traffic.run(e, 10), OPEN, FAILURE_RATE_SPIKE, "processor=adyen"))

    def test_low_volume_never_alerts(self):
        e = engine()
        traffic = Traffic(seed=3, rates={"tiny": 5})  # 50 outcomes per 10 s window < min_events 100
        self.assertEqual(traffic.run(e, 120), [])
        traffic.fail["tiny"] = 1.0
        self.assertEqual(traffic.run(e, 120), [])
        # a handful of failures on a key never seen before: nothing either
        for i in range(30):
            e.observe({"processor": "newcomer", "event_type": "payment_failed", "merchant_id_hash": "mer_new00001",
                       "payment_intent_id_hash": f"pi_h{i:08d}"}, traffic.t + i * 10)
        e.advance(traffic.t + 60_000)
        self.assertEqual([tr for tr in e.take() if tr.alert.type == FAILURE_RATE_SPIKE], [])

    def test_just_under_the_threshold_never_alerts(self):
        e = engine()
        traffic = Traffic(seed=4, rates={"stripe": 1000})
        traffic.run(e, 120)
        traffic.fail["stripe"] = 0.09  # threshold is 2 x 5% = 10%; the lower bound must clear it
        self.assertEqual(of(traffic.run(e, 120), type=FAILURE_RATE_SPIKE), [])

    def test_resolves_after_recovery(self):
        e = engine()
        traffic = Traffic(seed=5)
        traffic.run(e, 120)
        traffic.fail["stripe"] = 0.4
        opened = of(traffic.run(e, 60), OPEN, key="processor=stripe")
        self.assertEqual(len(opened), 1)
        recovered_at = traffic.t
        traffic.fail["stripe"] = 0.05
        got = traffic.run(e, 90)
        resolved = of(got, RESOLVE, key="processor=stripe")
        self.assertEqual(len(resolved), 1, got)
        tr = resolved[0]
        self.assertEqual((tr.reason, tr.alert.alert_id), (RECOVERED, opened[0].alert.alert_id))
        # the window drains (10 s), then 30 s under the resolve threshold
        self.assertGreaterEqual(tr.at_ms - recovered_at, 30_000)
        self.assertLessEqual(tr.at_ms - recovered_at, 45_000)
        self.assertGreater(tr.numbers["peak_failure_rate"], 0.35)
        self.assertLess(tr.numbers["failure_rate"], 0.075)
        self.assertEqual(tr.alert.severity, "critical")  # resolves the escalated alert
        self.assertEqual(e.active_alerts()[FAILURE_RATE_SPIKE], 0)

    def test_no_flapping_around_the_threshold(self):
        e = engine()
        traffic = Traffic(seed=6)
        traffic.run(e, 120)
        got = []
        # 5 min: 10 s at 16%, 10 s at 4%; the 10 s window's rate swings from ~4% to ~16% and back,
        # across the open (10%) and resolve (7.5%) thresholds every cycle
        for _ in range(15):
            traffic.fail["stripe"] = 0.16
            got += traffic.run(e, 10)
            traffic.fail["stripe"] = 0.04
            got += traffic.run(e, 10)
        self.assertEqual([tr.alert.key_text for tr in of(got, OPEN)], ["processor=stripe"])
        self.assertEqual(of(got, RESOLVE), [])
        traffic.fail["stripe"] = 0.05
        got = traffic.run(e, 90)
        self.assertEqual([(tr.action, tr.reason) for tr in of(got, type=FAILURE_RATE_SPIKE)], [(RESOLVE, RECOVERED)])

    def test_stays_open_between_the_resolve_and_open_thresholds(self):
        e = engine()
        traffic = Traffic(seed=8)
        traffic.run(e, 120)
        traffic.fail["stripe"] = 0.3
        self.assertEqual(len(of(traffic.run(e, 20), OPEN, FAILURE_RATE_SPIKE, "processor=stripe")), 1)
        traffic.fail["stripe"] = 0.09  # under the 10% open threshold, above the 7.5% resolve threshold
        self.assertEqual(of(traffic.run(e, 180), RESOLVE), [])
        self.assertEqual(e.active_alerts()[FAILURE_RATE_SPIKE], 1)

    def test_quiet_stream_resolves_for_insufficient_volume(self):
        e = engine()
        traffic = Traffic(seed=9)
        traffic.run(e, 120)
        traffic.fail["stripe"] = 0.5
        opened = of(traffic.run(e, 10), OPEN, FAILURE_RATE_SPIKE)
        self.assertEqual([tr.alert.key_text for tr in opened], ["processor=stripe"])
        stopped = traffic.t
        e.advance(stopped + 29_000)
        self.assertEqual(of(e.take(), RESOLVE), [])
        e.advance(stopped + 45_000)
        resolved = of(e.take(), RESOLVE)
        self.assertEqual([tr.reason for tr in resolved], [INSUFFICIENT_VOLUME])
        self.assertEqual(resolved[0].numbers["events"], 0)

    def test_a_merchant_alerts_on_its_own(self):
        e = engine()
        traffic = Traffic(seed=10, rates={"stripe": 1000})
        traffic.run(e, 120)
        top = traffic.merchants[0]  # ~170 events/s
        got = []
        for i in range(20):  # 50 extra failures/s for the top merchant: its rate ~27%, stripe's ~9.5%
            for j in range(50):
                e.observe({"processor": "stripe", "merchant_id_hash": top, "event_type": "payment_failed",
                           "payment_intent_id_hash": f"pi_m{i:04d}{j:04d}", "failure_category": "do_not_honor"},
                          traffic.t + j * 20)
            got += traffic.run(e, 1)
        opened = of(got, OPEN, FAILURE_RATE_SPIKE)
        self.assertEqual([tr.alert.key_text for tr in opened], [f"merchant_id_hash={top}"])
        n = opened[0].numbers
        self.assertGreater(n["failure_rate"], 2 * n["expected_failure_rate"])

    def test_a_geo_failing_on_every_processor_alerts_as_the_geo(self):
        e = engine()
        traffic = Traffic(seed=21, rates={"stripe": 600, "adyen": 600})
        traffic.run(e, 120)
        traffic.geo_fail["BR"] = 0.5  # BR's issuers decline half the payments, whatever the processor
        opened = of(traffic.run(e, 20), OPEN, FAILURE_RATE_SPIKE)
        geos = [tr.alert.key_text for tr in opened if tr.alert.key[0][0] == "geo_bucket"]
        self.assertEqual(geos, ["geo_bucket=BR"])
        n = opened[[tr.alert.key_text for tr in opened].index("geo_bucket=BR")].numbers
        self.assertGreaterEqual(n["lower_bound"], n["threshold"])
        self.assertLess(n["expected_failure_rate"], n["failure_rate"] / 2)  # the processors explain only part


class RetryStormTests(unittest.TestCase):
    def test_one_intent_retried_in_a_loop(self):
        e = engine()
        traffic = Traffic(seed=11, rates={"stripe": 500})
        self.assertEqual(traffic.run(e, 90), [])
        got = []
        for i in range(15):  # a merchant's retry loop: 15 attempts in 15 s
            e.observe({"processor": "stripe", "merchant_id_hash": "mer_loop0001", "event_type": "payment_failed",
                       "payment_intent_id_hash": "pi_stormy000001", "failure_category": "do_not_honor",
                       "failure_origin": "issuer", "retry_count": i, "retry_result": "failed"}, traffic.t + 500)
            got += traffic.run(e, 1)
        opened = of(got, OPEN, RETRY_STORM)
        self.assertEqual([tr.alert.key_text for tr in opened], ["payment_intent_id_hash=pi_stormy000001"])
        n = opened[0].numbers
        self.assertEqual((n["processor"], n["merchant_id_hash"], n["intent_attempts"]),
                         ("stripe", "mer_loop0001", 10))
        self.assertGreaterEqual(n["attempts"], 10)
        self.assertEqual(n["max_retry_count"], 9)
        self.assertEqual(opened[0].alert.severity, "warning")
        got = traffic.run(e, 120)
        resolved = of(got, RESOLVE, RETRY_STORM)
        self.assertEqual([(tr.alert.key_text, tr.reason) for tr in resolved],
                         [("payment_intent_id_hash=pi_stormy000001", RECOVERED)])
        self.assertEqual(of(got, OPEN), [])

    def test_retry_share_of_a_processor(self):
        e = engine()
        traffic = Traffic(seed=12, rates={"stripe": 600, "adyen": 300})
        self.assertEqual(traffic.run(e, 120), [])
        # half of stripe's traffic becomes retries, and they fail again (retry_result "failed")
        traffic.retry["stripe"] = 0.5
        traffic.retry_fail["stripe"] = 0.9
        got = traffic.run(e, 30)
        opened = of(got, OPEN, RETRY_STORM)
        self.assertEqual([tr.alert.key_text for tr in opened], ["processor=stripe"])
        n = opened[0].numbers
        # the baseline counts the retries that did not succeed: 3% retries x 5% failing
        self.assertLess(n["baseline_share"], 0.01)
        self.assertGreaterEqual(n["lower_bound"], 0.2)  # min_share
        self.assertEqual(n["retry_share"], round(n["retries"] / n["events"], 6))
        # failing retries are failures too: stripe's failure rate spikes with them
        self.assertEqual([tr.alert.key_text for tr in of(got, OPEN, FAILURE_RATE_SPIKE)], ["processor=stripe"])

    def test_retries_that_succeed_are_not_a_storm(self):
        def surge(**options: Any) -> list[Transition]:
            e = engine(**options)
            traffic = Traffic(seed=12, rates={"stripe": 600, "adyen": 300})
            self.assertEqual(traffic.run(e, 120), [])
            traffic.retry["stripe"] = 0.5
            traffic.retry_fail["stripe"] = 0.0  # every retry says retry_result "success"
            return traffic.run(e, 30)

        self.assertEqual(surge(), [])  # nor a failure rate spike: the retries are successes
        # without outcome_fields only the event type and retry_count count: the surge is a storm
        self.assertEqual([tr.alert.key_text for tr in of(surge(outcome_fields=False), OPEN, RETRY_STORM)],
                         ["processor=stripe"])

    def test_an_intent_whose_retries_succeed_is_not_a_loop(self):
        e = engine()
        for j in range(15):
            e.observe({"processor": "stripe", "event_type": "payment_retried", "retry_count": j + 1,
                       "retry_result": "Succeeded", "payment_intent_id_hash": "pi_fine"}, T0 + j * 100)
            e.observe({"processor": "stripe", "event_type": "payment_retried", "retry_count": j + 1,
                       "retry_result": "DECLINED", "payment_intent_id_hash": "pi_loop"}, T0 + j * 100)
        self.assertEqual([tr.alert.key_text for tr in of(e.take(), OPEN, RETRY_STORM)],
                         ["payment_intent_id_hash=pi_loop"])
        self.assertNotIn("pi_fine", e.retry_storm.intents.items)

    def test_events_without_an_intent_are_never_one_intent(self):
        e = engine()  # layout = "seed" stores an absent payment_intent_id_hash as ""
        for j in range(30):
            e.observe({"processor": "stripe", "event_type": "payment_retried", "retry_count": 1,
                       "retry_result": "failed", "payment_intent_id_hash": "", "merchant_id_hash": "",
                       "geo_bucket": "", "failure_origin": ""}, T0 + j * 10)
            e.observe({"processor": "stripe", "event_type": "payment_failed"}, T0 + j * 10)
        e.advance(T0 + 2000)
        self.assertEqual(of(e.take(), OPEN), [])
        self.assertEqual(len(e.retry_storm.intents), 0)
        self.assertEqual(len(e.failure_rate.table("merchant_id_hash")), 0)
        self.assertEqual(len(e.failure_rate.table("geo_bucket")), 0)
        self.assertEqual([len(t) for _, t in e.failure_cluster.children], [0, 0, 0])
        self.assertEqual(e.failures_by_origin, {"none": 60})

    def test_intent_alerts_are_capped(self):
        e = engine(retry_storm={"max_intent_alerts": 2})
        for i in range(5):
            for j in range(10):
                e.observe({"processor": "stripe", "event_type": "payment_retried", "retry_count": j + 1,
                           "payment_intent_id_hash": f"pi_cap{i:06d}"}, T0 + j * 100)
        self.assertEqual(len(of(e.take(), OPEN, RETRY_STORM)), 2)
        self.assertEqual(e.retry_storm.suppressed, 3)


class FailureClusterTests(unittest.TestCase):
    def test_one_category_suddenly_dominates(self):
        e = engine()
        traffic = Traffic(seed=13, rates={"stripe": 1000, "adyen": 500})
        self.assertEqual(traffic.run(e, 120), [])
        traffic.categories["stripe"] = {"timeout": 9.0, "insufficient_funds": 0.33, "do_not_honor": 0.33,
                                        "fraud_suspected": 0.33}
        got = traffic.run(e, 40)
        opened = of(got, OPEN, FAILURE_CLUSTER)
        self.assertEqual([tr.alert.key_text for tr in opened], ["processor=stripe,failure_category=timeout"])
        n = opened[0].numbers
        self.assertLess(abs(n["baseline_share"] - 0.25), 0.03)
        self.assertGreaterEqual(n["lower_bound"], n["threshold"])
        self.assertEqual(n["share"], round(n["cluster_failures"] / n["failures"], 6))
        self.assertEqual(of(got, type=FAILURE_RATE_SPIKE), [])  # the failure rate itself did not move

    def test_one_geo_suddenly_dominates(self):
        e = engine()
        traffic = Traffic(seed=14)
        traffic.run(e, 120)
        traffic.geos["stripe"] = {"BR": 30.0, "US": 1.0, "EU-west": 1.0, "GB": 1.0, "IN": 1.0}
        # BR now carries most of the traffic; its failures dominate stripe's failures
        opened = of(traffic.run(e, 30), OPEN, FAILURE_CLUSTER)
        self.assertEqual([tr.alert.key_text for tr in opened], ["processor=stripe,geo_bucket=BR"])

    def test_a_new_category_that_dominates_alerts_without_its_own_warmup(self):
        e = engine()
        traffic = Traffic(seed=15)
        traffic.run(e, 120)
        traffic.categories["stripe"] = {"processor_unavailable": 1.0}
        got = traffic.run(e, 30)
        opened = of(got, OPEN, FAILURE_CLUSTER)
        self.assertEqual([tr.alert.key_text for tr in opened],
                         ["processor=stripe,failure_category=processor_unavailable"])
        self.assertEqual(opened[0].numbers["baseline_share"], 0.0)

    def test_one_failure_origin_suddenly_dominates(self):
        e = engine()
        traffic = Traffic(seed=22, rates={"stripe": 1000, "adyen": 500})
        self.assertEqual(traffic.run(e, 120), [])
        traffic.origins["stripe"] = {"network": 9.0, "issuer": 0.6, "processor": 0.3}  # was 10%, now ~91%
        got = traffic.run(e, 40)
        opened = of(got, OPEN, FAILURE_CLUSTER)
        self.assertEqual([tr.alert.key_text for tr in opened], ["processor=stripe,failure_origin=network"])
        n = opened[0].numbers
        self.assertLess(abs(n["baseline_share"] - 0.1), 0.03)
        self.assertEqual(of(got, type=FAILURE_RATE_SPIKE), [])
        self.assertEqual(set(e.failures_by_origin), {"issuer", "processor", "network"})

    def test_normal_mix_changes_do_not_alert(self):
        e = engine()
        traffic = Traffic(seed=16)
        traffic.categories["stripe"] = {"insufficient_funds": 6.0, "do_not_honor": 2.0, "timeout": 1.0,
                                        "fraud_suspected": 1.0}
        traffic.run(e, 120)
        # the dominant category gets a bit more dominant (60% -> 75%): not "sudden domination"
        traffic.categories["stripe"]["insufficient_funds"] = 12.0
        self.assertEqual(of(traffic.run(e, 120), type=FAILURE_CLUSTER), [])


class OutcomeTests(unittest.TestCase):
    """What counts as a failure or a success (docs/risk.md, "What counts as a failure")."""

    CASES = [  # (event fields, with outcome_fields, event types only)
        ({"event_type": "payment_failed"}, "failed", "failed"),
        ({"event_type": "charge.failed"}, "failed", "failed"),
        ({"event_type": "payment_intent.payment_failed", "retry_result": "success"}, "failed", "failed"),
        ({"event_type": "payment_succeeded"}, "succeeded", "succeeded"),
        ({"event_type": "payment_intent.succeeded"}, "succeeded", "succeeded"),
        ({"event_type": "payment_succeeded", "failure_category": "", "failure_origin": "", "retry_result": ""},
         "succeeded", "succeeded"),                                  # layout = "seed": "" is absent
        ({"event_type": "AUTHORISATION", "failure_category": "refused"}, "failed", None),
        ({"event_type": "AUTHORISATION", "failure_origin": "issuer"}, "failed", None),
        ({"event_type": "AUTHORISATION", "failure_code": "05"}, "failed", None),
        ({"event_type": "AUTHORISATION", "retry_result": "Declined"}, "failed", None),
        ({"event_type": "AUTHORISATION", "retry_result": "approved"}, "succeeded", None),
        ({"event_type": "AUTHORISATION"}, None, None),              # no outcome either way: not counted
        ({"event_type": "payment_retried", "retry_count": 1, "retry_result": "fail"}, "failed", None),
        ({"event_type": "payment_retried", "retry_count": 1, "retry_result": "SUCCESS",
          "failure_category": "processor_timeout", "failure_origin": "processor"}, "succeeded", None),
        ({"event_type": "payment_retried", "retry_count": 1, "retry_result": "pending",
          "failure_category": "processor_timeout"}, "failed", None),
        ({"event_type": "payment_succeeded", "failure_origin": "network"}, "failed", "succeeded"),
        ({"event_type": "payment_succeeded", "retry_result": "failure"}, "failed", "succeeded"),
    ]

    def outcome(self, event: dict, **options: Any) -> str | None:
        e = engine(**options)
        e.observe({"processor": "stripe", **event}, T0)
        e.advance(T0 + 1000)
        s = e.failure_rate.table("processor").items.get("stripe")
        if s is None or not s.sum_n:
            return None
        return "failed" if s.sum_k else "succeeded"

    def test_event_types_then_fields(self):
        for event, expected, by_type in self.CASES:
            self.assertEqual(self.outcome(event), expected, event)
            self.assertEqual(self.outcome(event, outcome_fields=False), by_type, event)

    def test_the_seed_example_is_a_failure_by_origin(self):
        with open(os.path.join(os.path.dirname(__file__), "..", "docs", "sample-event.json")) as f:
            event = json.load(f)
        e = engine()
        e.observe(event, T0)
        e.advance(T0 + 1000)
        s = e.failure_rate.table("processor").items["stripe"]
        self.assertEqual((s.sum_n, s.sum_k), (1, 1))
        self.assertEqual(e.failures_by_origin, {"processor": 1})
        e.observe({**event, "failure_origin": "Acquirer"}, T0 + 1000)
        e.observe({**event, "failure_origin": "ISSUER"}, T0 + 1000)
        self.assertEqual(e.failures_by_origin, {"processor": 1, "other": 1, "issuer": 1})

    def test_configured_event_types(self):
        options = {"failure_event_types": ["AUTHORISATION_FAILED"], "success_event_types": ["AUTHORISATION"]}
        self.assertEqual(self.outcome({"event_type": "AUTHORISATION"}, **options), "succeeded")
        self.assertEqual(self.outcome({"event_type": "AUTHORISATION", "failure_category": "refused"}, **options),
                         "failed")
        self.assertEqual(self.outcome({"event_type": "AUTHORISATION_FAILED"}, **options), "failed")
        self.assertIsNone(self.outcome({"event_type": "payment_failed"}, **options))  # no longer listed


class CardinalityTests(unittest.TestCase):
    def test_a_million_merchants_keep_at_most_cap_keys(self):
        e = engine(max_keys={"merchant_id_hash": 1000, "payment_intent_id_hash": 2000})
        observe = e.observe
        ev = {"processor": "stripe", "event_type": "payment_failed", "failure_category": "timeout"}
        for i in range(1_000_000):
            ev["merchant_id_hash"] = ev["payment_intent_id_hash"] = f"h_{i:09d}"
            observe(ev, T0 + i // 10)  # 10k events/s: 100 s of stream time
        merchants = e.failure_rate.table("merchant_id_hash")
        self.assertEqual(len(merchants), 1000)
        self.assertEqual(merchants.evicted, 999_000)
        self.assertEqual(len(e.retry_storm.intents), 2000)
        self.assertEqual(e.retry_storm.intents.evicted, 998_000)
        # the survivors are the most recently seen
        self.assertIn("h_000999999", merchants.items)
        self.assertNotIn("h_000998999", merchants.items)
        sizes = {(d, dim): len(t) for d, dim, t in e.tables()}
        self.assertLessEqual(max(sizes.values()), 2000)

    def test_evicting_a_key_with_an_open_alert_resolves_it(self):
        e = engine(max_keys={"processor": 2})
        traffic = Traffic(seed=17, rates={"stripe": 1000})
        traffic.run(e, 120)
        traffic.fail["stripe"] = 0.5
        opened = of(traffic.run(e, 10), OPEN, key="processor=stripe")
        self.assertEqual([tr.alert.type for tr in opened], [FAILURE_RATE_SPIKE])
        for i, p in enumerate(["p_one", "p_two"]):
            e.observe({"processor": p, "event_type": "payment_succeeded"}, traffic.t + i)
        resolved = of(e.take(), RESOLVE, key="processor=stripe")
        self.assertEqual({(tr.alert.type, tr.reason) for tr in resolved},
                         {(tr.alert.type, EVICTED) for tr in opened})
        self.assertEqual(sum(e.active_alerts().values()), 0)

    def test_key_table_evicts_least_recently_seen(self):
        evicted = []
        t = KeyTable("merchant_id_hash", 3, lambda k, s: evicted.append(k))

        class S:
            def __init__(self, key: str, bucket: int) -> None:
                self.last_seen = bucket

        for b, key in enumerate(["a", "b", "c", "a", "d", "e"]):
            t.touch(key, b, S)
        self.assertEqual(evicted, ["b", "c"])
        self.assertEqual(list(t.items), ["a", "d", "e"])
        self.assertEqual([s.last_seen for s in t.live(4)], [5, 4])


class StreamClockTests(unittest.TestCase):
    def test_a_long_gap_does_not_close_every_empty_second(self):
        e = engine()
        traffic = Traffic(seed=18)
        traffic.run(e, 30)
        closes = []
        for d in e.detectors:
            original = d.close
            d.close = lambda b, original=original: (closes.append(b), original(b))
        e.advance(traffic.t + 86_400_000)  # a day without events
        self.assertLess(len(closes), 3 * 61)  # at most each detector's window (and an open alert's hold)
        self.assertEqual(e.bucket, (traffic.t + 86_400_000) // 1000)

    def test_late_events_count_in_the_current_second(self):
        e = engine()
        e.observe({"processor": "stripe", "event_type": "payment_succeeded"}, T0 + 5000)
        e.observe({"processor": "stripe", "event_type": "payment_failed"}, T0 + 1000)  # 4 s late
        self.assertEqual(e.now_ms, T0 + 5000)
        e.advance(T0 + 6000)
        s = e.failure_rate.table("processor").items["stripe"]
        self.assertEqual((s.sum_n, s.sum_k), (2, 1))

    def test_events_without_a_processor_are_ignored(self):
        e = engine()
        e.observe({"event_id": "x", "amount": 1}, T0)
        e.observe({"processor": 7, "event_type": "payment_failed"}, T0)
        self.assertEqual((e.ignored, e.events), (2, 0))

    def test_stop_resolves_open_alerts(self):
        e = engine()
        traffic = Traffic(seed=19)
        traffic.run(e, 120)
        traffic.fail["stripe"] = 0.5
        opened = of(traffic.run(e, 10), OPEN)
        self.assertTrue(opened)
        e.stop()
        resolved = e.take()
        self.assertEqual({tr.alert.alert_id for tr in resolved}, {tr.alert.alert_id for tr in opened})
        self.assertEqual({tr.reason for tr in resolved}, {CONSUMER_STOPPED})


class WilsonTests(unittest.TestCase):
    def test_lower_bound(self):
        self.assertEqual(wilson_lower(0, 0, 4), 0.0)
        self.assertAlmostEqual(wilson_lower(50, 50, 4), 50 / 66, places=9)  # all successes: n / (n + z^2)
        self.assertAlmostEqual(wilson_lower(1200, 10000, 4), 0.107605, places=5)
        self.assertLess(wilson_lower(6, 10, 4), 0.6 - 0.3)


class AlertFormatTests(unittest.TestCase):
    def test_record_body_and_stream_fields(self):
        e = engine()
        traffic = Traffic(seed=20)
        traffic.run(e, 120)
        traffic.fail["stripe"] = 0.5
        tr = of(traffic.run(e, 10), OPEN, FAILURE_RATE_SPIKE, "processor=stripe")[0]
        record = json.loads(tr.body())
        self.assertEqual(set(record), {"v", "alert_id", "action", "type", "key", "severity", "window_seconds",
                                       "opened_at", "at", "at_ms", "reason", "numbers", "opened_numbers"})
        self.assertEqual((record["v"], record["action"], record["type"], record["key"], record["reason"]),
                         (1, "open", "failure_rate_spike", {"processor": "stripe"}, "threshold"))
        self.assertEqual(record["at"], record["opened_at"])
        self.assertRegex(record["at"], r"^2026-01-01T00:0\d:\d\d\.000Z$")
        self.assertEqual(tr.body(), json.dumps(record, sort_keys=True, separators=(",", ":")).encode())
        fields = tr.stream_fields()
        self.assertEqual(fields[0::2], ["v", "alert_id", "action", "type", "key", "severity", "at", "data"])
        self.assertEqual(fields[1::2][:7], ["1", tr.alert.alert_id, "open", "failure_rate_spike",
                                            "processor=stripe", tr.alert.severity, str(tr.at_ms)])
        self.assertEqual(json.loads(fields[-1]), record)

    def test_key_values_are_escaped_in_the_key_text(self):
        # label fields such as failure_category may hold "," and "=" (and "%"): the text stays unambiguous
        key = (("processor", "stripe"), ("failure_category", "a=b, 100%"))
        self.assertEqual(key_text(key), "processor=stripe,failure_category=a%3Db%2C 100%25")
        self.assertEqual(key_text((("processor", "stripe"), ("geo_bucket", "EU-west"))),
                         "processor=stripe,geo_bucket=EU-west")


class OptionTests(unittest.TestCase):
    def assertOptionError(self, options: dict, text: str) -> None:
        with self.assertRaises(ValueError) as cm:
            parse_options(options)
        self.assertIn(text, str(cm.exception))

    def test_defaults(self):
        c = parse_options({})
        self.assertEqual(c.engine.failure_rate.rule.window_seconds, 10)
        self.assertEqual(c.engine.failure_rate.rule.min_events, 100)
        self.assertEqual(c.engine.failure_rate.dimensions, ("processor", "merchant_id_hash", "geo_bucket"))
        self.assertEqual(c.engine.max_keys["merchant_id_hash"], 10_000)
        self.assertEqual(c.engine.failure_cluster.dimensions, ("failure_category", "geo_bucket", "failure_origin"))
        self.assertEqual(c.engine.max_keys["failure_origin"], 1000)
        self.assertTrue(c.engine.outcome_fields)
        self.assertEqual(c.engine.failure_event_types,
                         {"payment_failed", "payment_intent.payment_failed", "charge.failed"})
        self.assertEqual(c.engine.success_event_types,
                         {"payment_succeeded", "payment_intent.succeeded", "charge.succeeded"})
        # event types as processors name them
        c = parse_options({"failure_event_types": ["AUTHORISATION_FAILED", "charge.failed"]})
        self.assertEqual(c.engine.failure_event_types, {"AUTHORISATION_FAILED", "charge.failed"})
        self.assertEqual((c.alerts_stream, c.alerts_maxlen, c.webhook_url), (None, 10_000, None))

    def test_errors_name_the_option(self):
        self.assertOptionError({"failure_rate": {"min_events": 0}}, "risk option failure_rate.min_events must be")
        self.assertOptionError({"failure_rate": {"ratio": "2"}}, "risk option failure_rate.ratio must be a number")
        self.assertOptionError({"retry_storm": {"window": 60}}, "risk option retry_storm.window is not a known")
        self.assertOptionError({"max_keys": {"merchant_id_hash": True}}, "risk option max_keys.merchant_id_hash")
        self.assertOptionError({"failure_cluster": {"dimensions": ["merchant_id_hash"]}},
                               "risk option failure_cluster.dimensions must be")
        self.assertOptionError({"min_events": 5}, "risk option min_events is not a known option")
        self.assertOptionError({"failure_rate": []}, "risk option failure_rate must be a table")
        self.assertOptionError({"failure_event_types": ["payment@failed"]}, "risk option failure_event_types")
        self.assertOptionError({"failure_event_types": [""]}, "risk option failure_event_types")
        self.assertOptionError({"outcome_fields": "yes"}, "risk option outcome_fields must be true or false")
        self.assertOptionError({"success_event_types": ["payment_failed"]}, "risk option success_event_types")
        self.assertOptionError({"webhook_url": "ftp://x"}, "risk option webhook_url must be")
        self.assertOptionError({"webhook_url": "https://hooks.example"}, "needs webhook_secret")
        self.assertOptionError({"failure_rate": {"ratio": 1.0, "min_increase": 0.0}},
                               "risk option failure_rate.min_increase must be above 0")

    def test_secret_file_and_the_secret_is_never_in_messages(self):
        fd, path = tempfile.mkstemp()
        os.write(fd, b"s3cret-from-file\n")
        os.close(fd)
        self.addCleanup(os.remove, path)
        c = parse_options({"webhook_url": "https://hooks.example/risk", "webhook_secret_file": path})
        self.assertEqual(c.webhook_secret, b"s3cret-from-file")
        self.assertNotIn("s3cret", repr(c))
        self.assertOptionError({"webhook_secret": "hunter2hunter2hunter2", "webhook_secret_file": path},
                               "mutually exclusive")
        self.assertOptionError({"webhook_secret": "hunter2"}, "webhook_secret must be a string of at least 16 bytes")
        try:
            parse_options({"webhook_secret": "hunter2hunter2hunter2", "webhook_timeout": 0})
        except ValueError as e:
            self.assertNotIn("hunter2", str(e))
            self.assertIn("webhook_timeout", str(e))
        else:
            self.fail("webhook_timeout = 0 was accepted")
