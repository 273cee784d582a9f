#!/usr/bin/env python3
"""PAN guard corpus: digests and ids must pass, card numbers in every usual form must not.

    python bench/pan_corpus.py [--n 100000] [--seed 1]

Generates ``--n`` values of each kind from a fixed seed and runs ``payflux.pan.contains_pan``
on every one.  Digest and id kinds (hex SHA-256/SHA-1/MD5, UUIDs, base64url SHA-256, ULIDs,
Stripe-shaped ids) must have 0 refused; every card form (Luhn-valid PANs of every brand and
length 13..19, bare, grouped, in text, as key=value, with an expiry or CVV glued on) must be
refused every time.  Prints one table (``slow path``: values that got past the pre-filter's
C-level bytes tests into its Python loop; ``candidates``: values for which the exact
pre-filter ``candidate_runs_possible`` is True), refusals by brand and length, then µs per
call on event-sized strings (with, for comparison, the previous rule's whole pre-filter) and
ms per call on 1 MB adversarial strings.  Exits 1 if
any digest or id is refused or any card form accepted.  Numbers are in docs/events.md
("PAN guard").
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import random
import sys
import time
import timeit
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from payflux.pan import _prepare, candidate_runs_possible, contains_pan  # noqa: E402

BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
ULID_EPOCH_MS = 1_796_169_600_000  # 2026-12-02T00:00:00Z


def base62(rng: random.Random, n: int) -> str:
    return "".join(rng.choices(BASE62, k=n))


def ulid(rng: random.Random) -> str:
    """26 Crockford base32 chars: 48-bit ms timestamp within a year of 2026-12-02, 80 random bits."""
    ms = ULID_EPOCH_MS + rng.randrange(-365 * 86_400_000, 365 * 86_400_000)
    value = ms << 80 | rng.getrandbits(80)
    return "".join(CROCKFORD[(value >> (5 * k)) & 31] for k in range(25, -1, -1))


def uuid4(rng: random.Random) -> uuid.UUID:
    return uuid.UUID(bytes=rng.randbytes(16), version=4)


def b64url(digest: bytes) -> str:
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


DIGEST_KINDS = {
    "hex SHA-256": lambda r: hashlib.sha256(r.randbytes(16)).hexdigest(),
    "hex SHA-1": lambda r: hashlib.sha1(r.randbytes(16)).hexdigest(),
    "hex MD5": lambda r: hashlib.md5(r.randbytes(16)).hexdigest(),
    "UUID lower": lambda r: str(uuid4(r)),
    "UUID upper": lambda r: str(uuid4(r)).upper(),
    "UUID 32-hex lower": lambda r: uuid4(r).hex,
    "UUID 32-hex upper": lambda r: uuid4(r).hex.upper(),
    "base64url SHA-256": lambda r: b64url(hashlib.sha256(r.randbytes(16)).digest()),
    "ULID": ulid,
    "pi_3N + 22 base62": lambda r: "pi_3N" + base62(r, 22),
    "ch_ + 14..24 base62": lambda r: "ch_" + base62(r, r.randint(14, 24)),
    "cus_ + 14..24 base62": lambda r: "cus_" + base62(r, r.randint(14, 24)),
}

# (brand, issuer prefixes, lengths); test PANs are prefix + random digits + Luhn check digit.
BRANDS = [
    ("Visa", ["4"], [13, 16, 19]),
    ("Mastercard 2-series", [str(p) for p in range(2221, 2721)], [16]),
    ("Mastercard 5-series", ["51", "52", "53", "54", "55"], [16]),
    ("Amex", ["34", "37"], [15]),
    ("Discover", ["6011", "644", "645", "646", "647", "648", "649", "65"], [16, 19]),
    ("Diners", ["300", "301", "302", "303", "304", "305", "36", "38", "39"], [14]),
    ("JCB", [str(p) for p in range(3528, 3590)], [16, 17, 18, 19]),
    ("UnionPay", ["62"], [16, 17, 18, 19]),
    ("Maestro", ["5018", "5020", "5038", "5893", "6304", "6759", "6761", "6762", "6763"],
     [13, 14, 15, 16, 17, 18, 19]),
]
CARD_TYPES = [(brand, prefixes, n) for brand, prefixes, lengths in BRANDS for n in lengths]


def luhn_check_digit(body: str) -> str:
    total = 0
    for position, ch in enumerate(reversed(body)):  # the check digit will be position 0
        d = ord(ch) - 48
        if position % 2 == 0:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return str(-total % 10)


def make_pan(rng: random.Random, prefixes: list[str], length: int) -> str:
    body = rng.choice(prefixes)
    body += "".join(rng.choices("0123456789", k=length - 1 - len(body)))
    return body + luhn_check_digit(body)


def usual_groups(brand: str, length: int) -> list[int]:
    """Amex 4-6-5, Diners 14 4-6-4, else fours with the remainder last (19: 4-4-4-4-3)."""
    if brand == "Amex":
        return [4, 6, 5]
    if brand == "Diners" and length == 14:
        return [4, 6, 4]
    return [4] * (length // 4) + ([length % 4] if length % 4 else [])


def gaps_4_8_12(brand: str, length: int) -> list[int]:
    """The 4-8-12 gaps of common card-formatting libraries: 4-4-4-rest (19: 4-4-4-7)."""
    return [4, 4, 4, length - 12]


def group(pan: str, sizes: list[int], sep: str) -> str:
    out, at = [], 0
    for size in sizes:
        out.append(pan[at : at + size])
        at += size
    return sep.join(out)


def expiry(rng: random.Random) -> tuple[str, str]:
    return f"{rng.randint(1, 12):02d}", f"{rng.randint(26, 35):02d}"


def cvv(rng: random.Random, brand: str) -> str:
    return "".join(rng.choices("0123456789", k=4 if brand == "Amex" else 3))


def _grouped(sep: str):
    return lambda r, b, p: group(p, usual_groups(b, len(p)), sep)


CARD_FORMS = {
    "bare": lambda r, b, p: p,
    "grouped, space": _grouped(" "),
    "grouped, dash": _grouped("-"),
    "grouped, dot": _grouped("."),
    "grouped, underscore": _grouped("_"),
    "grouped, colon": _grouped(":"),
    "grouped, slash": _grouped("/"),
    "grouped 4-4-4-rest, space": lambda r, b, p: group(p, gaps_4_8_12(b, len(p)), " "),
    "text: card <spaced> declined": lambda r, b, p: f"card {_grouped(' ')(r, b, p)} declined",
    "text: card <bare> declined": lambda r, b, p: f"card {p} declined",
    "pan=<bare>": lambda r, b, p: f"pan={p}",
    "card_number:<dashed>": lambda r, b, p: f"card_number:{_grouped('-')(r, b, p)}",
    "<bare><MMYY>": lambda r, b, p: p + "".join(expiry(r)),
    "<bare><CVV>": lambda r, b, p: p + cvv(r, b),
    "<bare>/<MM>/<YY>": lambda r, b, p: p + "/" + "/".join(expiry(r)),
    "<spaced> <MM>/<YY>": lambda r, b, p: _grouped(" ")(r, b, p) + " " + "/".join(expiry(r)),
}


def card_values(seed: int, form: str, n: int) -> list[tuple[str, int, str]]:
    """``n`` values of ``form``: (brand, length, value), cycling over every brand and length."""
    rng = random.Random(seed)
    make = CARD_FORMS[form]
    out = []
    for i in range(n):
        brand, prefixes, length = CARD_TYPES[i % len(CARD_TYPES)]
        out.append((brand, length, make(rng, brand, make_pan(rng, prefixes, length))))
    return out


def event_strings(rng: random.Random, hex_ids: bool) -> str:
    """An event's strings joined by NUL, as the validator joins them (~400 bytes)."""
    if hex_ids:
        ids = [hashlib.sha256(rng.randbytes(16)).hexdigest() for _ in range(3)]
    else:
        ids = [b64url(hashlib.sha256(rng.randbytes(16)).digest()) for _ in range(3)]
    values = [
        str(uuid4(rng)), "payment_failed", f"2026-12-02T10:{rng.randint(0, 59):02d}:00.123Z",
        "stripe", *ids, "10-50", "EUR", "card", "EU-west", "insufficient_funds",
        "card_declined:51", "2026-12-02T10:00:01Z", "pi_3N" + base62(rng, 22),
        "api-v2.3", "checkout", "web", "eu-central-1", "sdk-go/1.4.2", "retry:2",
        "authorization", "visa", "DE",
    ]
    return "\x00".join(values)


def slow_path(s: str) -> bool:
    """True if the pre-filter's C-level bytes tests pass ``s`` on to its Python loop."""
    return _prepare(s) is not None


# The previous rule's whole pre-filter (separators space and dash only), for comparison.
_PREVIOUS_CLASSES = bytes(48 if 48 <= c <= 57 else 32 if c in b" -" else 120 for c in range(256))


def previous_prefilter(s: str) -> bool:
    joined = s.encode("utf-8", "surrogatepass").translate(_PREVIOUS_CLASSES).replace(b" 0", b"0")
    return b"0" * 13 in joined


def mean_us(fn, values: list[str], repeat: int = 5) -> float:
    def run():
        for v in values:
            fn(v)

    return min(timeit.repeat(run, number=1, repeat=repeat)) / len(values) * 1e6


def adversarial(rng: random.Random) -> dict[str, str]:
    mb = 1_000_000
    return {
        "random digits": "".join(rng.choices("0123456789", k=mb)),
        "'1 ' alternating": "1 " * (mb // 2),
        "'4111 ' chain": "4111 " * (mb // 5),
        "'0'*13 + 'a' (many runs)": ("0" * 13 + "a") * (mb // 14),
        "'1 ' + '0'*12 + 'a' (many joined runs)": ("1 " + "0" * 12 + "a") * (mb // 15),
        "'12345678 ' (8-digit groups)": "12345678 " * (mb // 9),
        "random hex": "".join(rng.choices("0123456789abcdef", k=mb)),
        "random digits and separators": "".join(rng.choices("0123456789 -._:/", k=mb)),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--n", type=int, default=100_000, help="values per kind")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    failures = 0
    rows = []
    for k, (kind, make) in enumerate(DIGEST_KINDS.items()):
        rng = random.Random(args.seed * 1000 + k)
        values = [make(rng) for _ in range(args.n)]
        slow = sum(map(slow_path, values))
        hits = sum(map(candidate_runs_possible, values))
        refused = sum(map(contains_pan, values))
        failures += refused
        rows.append((kind, args.n, slow, hits, str(refused)))
    by_type: dict[tuple[str, int], list[int]] = {}
    for k, form in enumerate(CARD_FORMS):
        values = card_values(args.seed * 1000 + 100 + k, form, args.n)
        slow = hits = refused = 0
        for brand, length, value in values:
            slow += slow_path(value)
            hit, bad = candidate_runs_possible(value), contains_pan(value)
            hits += hit
            refused += bad
            counts = by_type.setdefault((brand, length), [0, 0])
            counts[0] += bad
            counts[1] += 1
        failures += args.n - refused
        rows.append((form, args.n, slow, hits, f"{refused}/{args.n}"))

    width = max(len(r[0]) for r in rows)
    print(f"{'kind':<{width}}  {'values':>7}  {'slow path':>9}  {'candidates':>10}  refused")
    for kind, n, slow, hits, refused in rows:
        print(f"{kind:<{width}}  {n:>7}  {slow:>9}  {hits:>10}  {refused}")
    print()
    print("card numbers by brand and length (all card forms): refused/total")
    for (brand, length), (bad, total) in by_type.items():
        print(f"  {brand:<20} {length:>2}  {bad}/{total}")

    rng = random.Random(args.seed)
    print()
    print("µs per call, mean over 1,000 distinct events (strings joined by NUL):")
    for label, hex_ids in (("base64url ids", False), ("hex SHA-256 ids", True)):
        events = [event_strings(rng, hex_ids) for _ in range(1000)]
        size = sum(map(len, events)) / len(events)
        print(f"  {label} (~{size:.0f} chars): "
              f"candidate_runs_possible {mean_us(candidate_runs_possible, events):.2f}, "
              f"contains_pan {mean_us(contains_pan, events):.2f}, "
              f"previous rule's pre-filter {mean_us(previous_prefilter, events):.2f}; "
              f"slow path {sum(map(slow_path, events))}/1000, "
              f"candidates {sum(map(candidate_runs_possible, events))}/1000")
    print("ms per contains_pan call on 1 MB adversarial strings:")
    for label, s in adversarial(rng).items():
        t0 = time.perf_counter()
        result = contains_pan(s)
        print(f"  {label:<40} {(time.perf_counter() - t0) * 1e3:7.1f} ms  -> {result}")

    print()
    print("FAIL" if failures else "OK", f"({failures} wrong)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
