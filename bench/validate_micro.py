#!/usr/bin/env python3
"""Micro-benchmark of the ingest hot path: decode, validate, canonical JSON, fingerprint.

    python bench/validate_micro.py [--repeat 7] [--seed 1]

Prints µs per event for each stage, (a) for one 15-field event (the single-event path) and
(b) for a 500-event NDJSON batch (the batch path, like bench/wrk/batch.lua sends), plus the
events/s of the whole batch pipeline as the HTTP layer runs it (``IngestApp._validate`` on
the decoded items, which also builds the ``PreparedEvent`` objects).  Each number is the
best of ``--repeat`` timeit runs; the events are generated from a fixed seed, so runs on the
same machine are comparable.  Numbers are in docs/events.md ("Speed").
"""

from __future__ import annotations

import argparse
import json
import random
import string
import sys
import timeit
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from payflux import events  # noqa: E402
from payflux.events import (  # noqa: E402
    EventValidator, ValidationPolicy, canonical_json, decode_batch_body, decode_event_body,
    fingerprint,
)
from payflux.ingest.app import IngestApp  # noqa: E402

NOW = 1_767_225_600.0  # 2026-01-01T00:00:00Z
BATCH = 500
LETTERS = "abcdefghijkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ"


def token(rng: random.Random, n: int) -> str:
    """Letters and digits alternating, like bench/wrk/common.lua: never a 13-digit run."""
    return "".join(rng.choice(LETTERS) if k % 2 == 0 else rng.choice(string.digits) for k in range(n))


def make_event(rng: random.Random, i: int) -> dict:
    """All 19 fields (the seed's 15 and PayFlux's 4), the shape bench/wrk/common.lua sends."""
    return {
        "event_id": f"b1700000000_t0_1_l{i}",
        "event_type": rng.choice(["payment_failed", "payment_intent.payment_failed", "payment_retried",
                                  "charge.failed"]),
        "event_timestamp": "2025-12-31T23:59:00Z",
        "merchant_id_hash": "m_" + token(rng, 22),
        "payment_intent_id_hash": "pi_" + token(rng, 30),
        "processor": rng.choice(["stripe", "adyen", "braintree", "checkout_com"]),
        "failure_category": rng.choice(["insufficient_funds", "do_not_honor", "expired_card", "processor_timeout"]),
        "retry_count": i % 4,
        "geo_bucket": rng.choice(["US:CA", "DE:BE", "GB:LDN", "BR:SP"]),
        "amount_bucket": rng.choice(["0-10", "10-50", "50-200", "200-500", "500+"]),
        "system_source": rng.choice(["checkout_api", "mobile_sdk", "subscriptions"]),
        "payment_method_bucket": rng.choice(["credit_card", "debit_card", "wallet", "bank_transfer"]),
        "channel": rng.choice(["web", "ios", "android", "pos"]),
        "retry_result": rng.choice(["failed", "fail", "declined"]),
        "failure_origin": rng.choice(["processor", "network", "issuer", "merchant"]),
        "customer_id_hash": "cus_" + token(rng, 26),
        "currency": "USD",
        "failure_code": f"card_declined:{i % 50}",
        "processor_latency_ms": 37 + (i * 13) % 900,
    }


def best_us(fn, number: int, repeat: int) -> float:
    """Best-of-``repeat`` seconds per call of ``fn``, in µs."""
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    validator = EventValidator(ValidationPolicy(), now=lambda: NOW)
    validate = validator.validate

    one = make_event(rng, 1)
    one_body = json.dumps(one, separators=(",", ":")).encode()
    batch = [make_event(rng, i) for i in range(BATCH)]
    ndjson = b"".join(json.dumps(e, separators=(",", ":")).encode() + b"\n" for e in batch)
    r = args.repeat

    print(f"python {sys.version.split()[0]}, orjson {'yes' if events._orjson else 'no'}, "
          f"seed {args.seed}, best of {r}")
    print(f"(a) one event, {len(one_body)} bytes: µs per event")
    decoded = decode_event_body(one_body)
    valid = validate(decoded)
    canonical = canonical_json(valid)
    stages = {
        "decode_event_body": best_us(lambda: decode_event_body(one_body), 20000, r),
        "validate": best_us(lambda: validate(decoded), 20000, r),
        "canonical_json": best_us(lambda: canonical_json(valid), 20000, r),
        "fingerprint": best_us(lambda: fingerprint(canonical), 20000, r),
    }
    stages["total (the 4 above in one call)"] = best_us(
        lambda: fingerprint(canonical_json(validate(decode_event_body(one_body)))), 20000, r)
    for name, us in stages.items():
        print(f"  {name:<40} {us:7.2f}")

    print(f"(b) NDJSON batch of {BATCH} events, {len(ndjson)} bytes: µs per event")
    items = decode_batch_body(ndjson, "ndjson")
    valids = [validate(e) for e in items]
    canonicals = [canonical_json(e) for e in valids]
    n = 20
    stages = {
        "decode_batch_body": best_us(lambda: decode_batch_body(ndjson, "ndjson"), n, r) / BATCH,
        "validate (per event)": best_us(lambda: [validate(e) for e in items], n, r) / BATCH,
        "canonical_json": best_us(lambda: [canonical_json(e) for e in valids], n, r) / BATCH,
        "fingerprint": best_us(lambda: [fingerprint(c) for c in canonicals], n, r) / BATCH,
    }
    validate_batch = getattr(validator, "validate_batch", None)  # absent before the fast path
    if validate_batch is not None:
        stages["validate_batch (validate+canonical+fp)"] = best_us(
            lambda: validate_batch(items), n, r) / BATCH
    app = SimpleNamespace(validator=validator)
    stages["IngestApp._validate (+PreparedEvent)"] = best_us(
        lambda: IngestApp._validate(app, items, True), n, r) / BATCH
    whole = best_us(
        lambda: IngestApp._validate(app, decode_batch_body(ndjson, "ndjson"), True), n, r) / BATCH
    stages["pipeline: decode + IngestApp._validate"] = whole
    for name, us in stages.items():
        print(f"  {name:<40} {us:7.2f}")
    print(f"batch pipeline (decode + validate + canonical + fingerprint + PreparedEvent): "
          f"{1e6 / whole:,.0f} events/s on one core")


if __name__ == "__main__":
    main()
