"""Tests for payflux.pan, the PAN guard (rule in its module docstring and docs/events.md).

Corpora are generated here with fixed seeds: digests and ids must never be refused, card
numbers in every usual form always.  The exact pre-filter and the candidate finder are checked
against a naive character-by-character reference implementation of the rule.
"""

from __future__ import annotations

import base64
import hashlib
import random
import uuid

from twisted.trial.unittest import SynchronousTestCase

from payflux import pan
from payflux.pan import (
    MAX_PAN_DIGITS, MIN_PAN_DIGITS, SEPARATORS, candidate_runs_possible, contains_pan, luhn_valid,
    run_has_luhn_window,
)

DIGITS = "0123456789"
BASE62 = DIGITS + "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
CROCKFORD = DIGITS + "ABCDEFGHJKMNPQRSTVWXYZ"
LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


# --- reference implementation of the rule, one character at a time ---------------------------

def reference_candidates(s: str) -> list[str]:
    """The candidates of the module doc, written as directly as possible (slow, obvious)."""
    groups = []  # (start, end) of every maximal ASCII digit run
    i = 0
    while i < len(s):
        if "0" <= s[i] <= "9":
            j = i
            while j < len(s) and "0" <= s[j] <= "9":
                j += 1
            groups.append((i, j))
            i = j
        else:
            i += 1
    out, chain, prev_end = [], None, None

    def close():
        nonlocal chain
        if chain is not None and len(chain) >= MIN_PAN_DIGITS:
            out.append(chain)
        chain = None

    for start, end in groups:
        digits, n = s[start:end], end - start
        if not (prev_end is not None and start == prev_end + 1 and s[prev_end] in SEPARATORS):
            close()  # not joined to the previous group by exactly one separator
        prev_end = end
        touches_letter = (start > 0 and s[start - 1] in LETTERS) or (end < len(s) and s[end] in LETTERS)
        if touches_letter:
            close()
        elif n >= 8:
            close()
            if n >= MIN_PAN_DIGITS:
                out.append(digits)
        elif n >= 3:
            chain = digits if chain is None else chain + digits
        elif chain is not None:  # 1 or 2 digits: the final group of an open chain
            chain += digits
            close()
    close()
    return out


def naive_has_window(digits: str) -> bool:
    return any(luhn_valid(digits[i:i + n]) for n in range(MIN_PAN_DIGITS, MAX_PAN_DIGITS + 1)
               for i in range(len(digits) - n + 1))


def no_window_digits(rng: random.Random, n: int) -> str:
    """``n`` digits without any Luhn-valid 13..19 window: each new digit closes 7 windows at
    most, and each window excludes one value of it, so some digit always fits."""
    out = ""
    for _ in range(n):
        for d in rng.sample(DIGITS, 10):
            tail = out[-(MAX_PAN_DIGITS - 1):] + d
            if not any(luhn_valid(tail[-k:]) for k in range(MIN_PAN_DIGITS, len(tail) + 1)):
                out += d
                break
        else:
            raise AssertionError("no digit fits")
    return out


def lone_window_pan(rng: random.Random, length: int) -> str:
    """A Luhn-valid number whose only valid 13..19 window is itself."""
    while True:
        number = make_pan(rng, "", length)
        windows = [number[i:i + k] for k in range(MIN_PAN_DIGITS, length + 1)
                   for i in range(length - k + 1)]
        if sum(map(luhn_valid, windows)) == 1:
            return number


def candidates(s: str) -> list[str]:
    raw = s.encode("utf-8", "surrogatepass")
    classes = raw.translate(pan._CLASSES)
    joined = classes.replace(b" 0", b"0")
    return [c.decode("ascii") for c in pan._candidates(raw, classes, joined)]


# --- corpora ---------------------------------------------------------------------------------

def check_digit(body: str) -> str:
    for d in DIGITS:
        if luhn_valid(body + d):
            return d
    raise AssertionError(body)


def make_pan(rng: random.Random, prefix: str, length: int) -> str:
    body = prefix + "".join(rng.choices(DIGITS, k=length - 1 - len(prefix)))
    return body + check_digit(body)


BRANDS = [  # (brand, prefixes, lengths)
    ("visa", ["4"], [13, 16, 19]),
    ("mastercard-2", ["2221", "2500", "2720"], [16]),
    ("mastercard-5", ["51", "53", "55"], [16]),
    ("amex", ["34", "37"], [15]),
    ("discover", ["6011", "644", "65"], [16, 19]),
    ("diners", ["300", "305", "36", "38"], [14]),
    ("jcb", ["3528", "3589"], [16, 17, 18, 19]),
    ("unionpay", ["62"], [16, 17, 18, 19]),
    ("maestro", ["5018", "5020", "6304", "6759"], [13, 14, 15, 16, 17, 18, 19]),
]


def groupings(brand: str, length: int) -> list[list[int]]:
    fours = [4] * (length // 4) + ([length % 4] if length % 4 else [])  # 19: 4-4-4-4-3
    out = [fours, [4, 4, 4, length - 12]]  # 4-4-4-rest (19: 4-4-4-7, 13: 4-4-4-1)
    if brand == "amex":
        out.append([4, 6, 5])
    if length == 14:
        out.append([4, 6, 4])
    if length == 13:
        out.append([4, 4, 5])
    return out


def group(digits: str, sizes: list[int], sep: str) -> str:
    parts, at = [], 0
    for size in sizes:
        parts.append(digits[at:at + size])
        at += size
    assert at == len(digits)
    return sep.join(parts)


def card_forms(rng: random.Random, brand: str, number: str) -> list[str]:
    """Every form a card number must be refused in."""
    forms = [number]
    for sizes in groupings(brand, len(number)):
        for sep in SEPARATORS:
            grouped = group(number, sizes, sep)
            forms += [grouped, f"card {grouped} declined", f"{grouped} 12/27"]
    spaced = group(number, groupings(brand, len(number))[0], " ")
    dashed = group(number, groupings(brand, len(number))[0], "-")
    mm, yy = f"{rng.randint(1, 12):02d}", f"{rng.randint(26, 35):02d}"
    cvv = "".join(rng.choices(DIGITS, k=4 if brand == "amex" else 3))
    forms += [
        f"card {number} declined", f"pan={number}", f"card_number:{dashed}", f"card_number={number}",
        f'{{"pan": "{number}"}}', number + mm + yy, number + cvv, f"{number}/{mm}/{yy}",
        f"{spaced} {mm}/{yy}", f"{number} {mm}{yy} {cvv}", "0000" + number, f"card_{number}",
        f"ref 12 {spaced}", f"xy12 {spaced}", f"{spaced} ab", f"{number}\x00other",
    ]
    return forms


def digest_kinds(rng: random.Random) -> dict[str, str]:
    u = uuid.UUID(bytes=rng.randbytes(16), version=4)
    seed = rng.randbytes(16)
    value = rng.getrandbits(128) >> 2  # ULID: 26 Crockford characters, 130 bits
    return {
        "hex sha256": hashlib.sha256(seed).hexdigest(),
        "hex sha1": hashlib.sha1(seed).hexdigest(),
        "hex md5": hashlib.md5(seed).hexdigest(),
        "uuid": str(u), "UUID": str(u).upper(), "uuid hex": u.hex, "UUID HEX": u.hex.upper(),
        "base64url sha256": base64.urlsafe_b64encode(hashlib.sha256(seed).digest()).rstrip(b"=").decode(),
        "ulid": "".join(CROCKFORD[(value >> (5 * k)) & 31] for k in range(25, -1, -1)),
        "pi": "pi_3N" + "".join(rng.choices(BASE62, k=22)),
        "ch": "ch_" + "".join(rng.choices(BASE62, k=rng.randint(14, 24))),
        "cus": "cus_" + "".join(rng.choices(BASE62, k=rng.randint(14, 24))),
    }


def random_text(rng: random.Random, size: int) -> str:
    """Digit groups, separators (single and double), letters, NUL and other characters."""
    parts, length = [], 0
    while length < size:
        roll = rng.random()
        if roll < 0.15:  # a grouped number: groups of 1..9 digits joined by single separators
            part = rng.choice(SEPARATORS).join(
                "".join(rng.choices(DIGITS, k=rng.choice([1, 2, 3, 4, 4, 5, 6, 7, 8, 9])))
                for _ in range(rng.randint(2, 6)))
        elif roll < 0.45:
            n = rng.choice([1, 2, 3, 4, 4, 4, 5, 6, 7, 8, 12, 13, 16, 19, 20])
            part = "".join(rng.choices(DIGITS, k=n))
        elif roll < 0.75:
            part = rng.choice(SEPARATORS) * rng.choice([1, 1, 1, 2])
        elif roll < 0.88:
            part = "".join(rng.choices("abcXYZ", k=rng.randint(1, 3)))
        else:
            part = rng.choice(["\x00", "=", ",", "+", "#", "é", "٤", "４", "\ud800", "\t"])
        parts.append(part)
        length += len(part)
    return "".join(parts)


# --- tests -----------------------------------------------------------------------------------

class DigestsAndIdsTests(SynchronousTestCase):
    def test_no_digest_or_id_is_refused(self):
        rng = random.Random(20261202)
        refused: dict[str, int] = {}
        for _ in range(2000):
            for kind, value in digest_kinds(rng).items():
                if contains_pan(value) or candidate_runs_possible(value):
                    refused[kind] = refused.get(kind, 0) + 1
        self.assertEqual(refused, {})

    def test_uuid_made_of_digits_is_no_candidate(self):
        # 8-4-4-4-12: the 8 and 12 groups never chain, 4+4+4 = 12 digits is too short.
        for value in ("12345678-1234-4234-8234-123456789012", "00000000-0000-0000-0000-000000000000"):
            self.assertFalse(candidate_runs_possible(value), value)
            self.assertFalse(candidate_runs_possible(value.replace("-", " ")), value)

    def test_hex_digest_runs_touch_letters(self):
        # A hex digest opening with 16 digits of a valid PAN: the run touches "a".
        value = "4111111111111111" + "a" * 48
        self.assertFalse(contains_pan(value))
        self.assertFalse(contains_pan("0123456789abcdef" + "4111111111111111"))
        self.assertFalse(contains_pan("sha256:4111111111111111abcdef"))
        # ...but a "digest" made only of digits is a number.
        self.assertTrue(contains_pan("4111111111111111" + "0" * 48))

    def test_timestamps_phones_and_addresses(self):
        for value in (
            "2026-12-02T10:00:00.123456Z", "2026-12-02 10:00:00", "2026-12-02 10:00:00.123456",
            "+1 415-555-0100", "+44 20 7946 0958", "(415) 555-0100 ext 4111", "10.0.0.1:6380",
            "00:1a:2b:3c:4d:5e", "ab:cd:12:34:56:78:90:12:34:56:78:90", "v1.2.3-rc.4+build.5678",
        ):
            self.assertFalse(candidate_runs_possible(value), value)


class CardNumberTests(SynchronousTestCase):
    def test_every_brand_length_and_form_is_refused(self):
        rng = random.Random(4111)
        accepted, count = [], 0
        for brand, prefixes, lengths in BRANDS:
            for length in lengths:
                for prefix in prefixes:
                    for _ in range(3):
                        number = make_pan(rng, prefix, length)
                        for form in card_forms(rng, brand, number):
                            count += 1
                            if not (contains_pan(form) and candidate_runs_possible(form)):
                                accepted.append((brand, length, form))
        self.assertEqual(accepted, [])
        self.assertGreater(count, 10_000)

    def test_known_test_pans(self):
        for number in ("4111111111111111", "4242424242424242", "4222222222222", "5555555555554444",
                       "2223003122003222", "378282246310005", "371449635398431", "6011111111111117",
                       "6011000990139424", "30569309025904", "3566002020360505", "6200000000000005",
                       "6759649826438453", "4111111111111111110"):
            self.assertTrue(luhn_valid(number), number)
            for form in card_forms(random.Random(0), "amex" if number[:2] in ("34", "37") else "", number):
                self.assertTrue(contains_pan(form), form)

    def test_lengths(self):
        rng = random.Random(13)
        self.assertTrue(contains_pan(make_pan(rng, "4", 13)))
        self.assertTrue(contains_pan(make_pan(rng, "62", 19)))
        self.assertFalse(contains_pan(make_pan(rng, "4", 12)))  # Luhn-valid, but 12 digits
        self.assertFalse(candidate_runs_possible("411111111111"))
        self.assertFalse(candidate_runs_possible("4111 1111 1111"))
        # 20+ digits: refused iff some 13..19 window passes Luhn.
        for digits in ("93645074952883143667", "722888950484478785998838"):
            self.assertTrue(candidate_runs_possible(digits))
            self.assertFalse(contains_pan(digits), digits)
        self.assertTrue(contains_pan("4111111111111111" + "0000"))

    def test_luhn_failing_numbers(self):
        self.assertFalse(luhn_valid("4111111111111112"))
        self.assertFalse(contains_pan("6260181590830166"))  # fails Luhn, and so does every window
        self.assertFalse(contains_pan("6260 1815 9083 0166"))
        self.assertTrue(contains_pan("0" * 13))  # a run of 13 zeros passes Luhn
        self.assertFalse(contains_pan("0" * 12))


class RuleEdgeTests(SynchronousTestCase):
    def test_letter_bounded_groups_are_ignored(self):
        for value in ("abc4111111111111111", "4111111111111111abc", "x4111111111111111y",
                      "0x4111111111111111", "2025-06-01T10:00:00.4111111111111111Z",
                      "4111 1111 1111 1111a", "a4111 1111 1111 1111", "4111 1111x1111 1111"):
            self.assertFalse(contains_pan(value), value)
            self.assertFalse(candidate_runs_possible(value), value)
        # An ignored group is dropped, not the chain next to it.
        self.assertTrue(contains_pan("ab12 4111 1111 1111 1111"))
        self.assertTrue(contains_pan("4111 1111 1111 1111 12ab"))

    def test_non_letters_around_a_pan(self):
        for value in ("é4111111111111111", "4111111111111111é", "#4111111111111111", "(4111111111111111)",
                      "\t4111111111111111\n", "'4111 1111 1111 1111'", "=4111-1111-1111-1111;"):
            self.assertTrue(contains_pan(value), value)

    def test_separators(self):
        for sep in SEPARATORS:
            self.assertTrue(contains_pan(sep.join(["4111", "1111", "1111", "1111"])), sep)
            self.assertFalse(contains_pan((sep * 2).join(["4111", "1111", "1111", "1111"])), sep)
        self.assertTrue(contains_pan("4111 1111-1111.1111"))  # mixed separators
        self.assertFalse(contains_pan("4111 - 1111 1111 1111"))  # space, dash, space
        for other in ",;+|\\\t#\x00":
            self.assertFalse(contains_pan(other.join(["4111", "1111", "1111", "1111"])), repr(other))

    def test_group_sizes(self):
        self.assertTrue(contains_pan("3056930 9025904"))  # 7 + 7 digits
        self.assertFalse(candidate_runs_possible("41111111 11111111"))  # 8 + 8: never chained
        self.assertFalse(candidate_runs_possible("4 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1"))
        self.assertFalse(candidate_runs_possible("41 11 11 11 11 11 11 11"))
        self.assertFalse(candidate_runs_possible("4111 1111 11 11 1111"))  # a 2-digit group ends it
        self.assertTrue(contains_pan("4111 1111 1111 1111 1 12/27"))
        self.assertTrue(contains_pan("1 12 4111 1111 1111 1111"))  # 1..2 digits cannot start one
        self.assertTrue(contains_pan("12345678-4111-1111-1111-1111"))

    def test_nul_breaks_runs(self):
        values = ["4111111", "111111111", "4111 1111", "1111 1111", "card"]
        joined = "\x00".join(values)
        self.assertFalse(candidate_runs_possible(joined))
        self.assertFalse(any(map(contains_pan, values)))
        self.assertTrue(candidate_runs_possible("\x00".join(values + ["4111-1111-1111-1111"])))

    def test_only_ascii_digits_count(self):
        for value in ("٤١١١١١١١١١١١١١١١", "４１１１１１１１１１１１１１１１", "۴۱۱۱۱۱۱۱۱۱۱۱۱۱۱۱",
                      "4111١١١١١١١١١١١١", "411111٤111111111", "4111 1111 ١١١١ 1111"):
            self.assertFalse(candidate_runs_possible(value), value)
            self.assertFalse(contains_pan(value), value)
        self.assertFalse(contains_pan("\ud800" * 3))  # lone surrogates are fine
        self.assertTrue(contains_pan("\ud8004111111111111111\ud800"))

    def test_public_api(self):
        self.assertEqual((MIN_PAN_DIGITS, MAX_PAN_DIGITS), (13, 19))
        self.assertTrue(run_has_luhn_window("004111111111111111"))
        self.assertFalse(run_has_luhn_window("411111111111"))
        for value in (True, False):
            self.assertIs(type(contains_pan("4111111111111111" if value else "x")), bool)
            self.assertIs(type(candidate_runs_possible("4111111111111111" if value else "x")), bool)


class ReferenceModelTests(SynchronousTestCase):
    def test_candidates_match_reference(self):
        rng = random.Random(7)
        for _ in range(3000):
            s = random_text(rng, rng.randint(0, 80))
            self.assertEqual(candidates(s), reference_candidates(s), repr(s))

    def test_prefilter_is_exact(self):
        rng = random.Random(8)
        for _ in range(3000):
            s = random_text(rng, rng.randint(0, 80))
            expected = reference_candidates(s)
            self.assertEqual(candidate_runs_possible(s), bool(expected), repr(s))
            found = contains_pan(s)
            self.assertEqual(found, any(map(naive_has_window, expected)), repr(s))
            if not candidate_runs_possible(s):
                self.assertFalse(found, repr(s))

    def test_prefilter_on_joined_values(self):
        rng = random.Random(9)
        for _ in range(500):
            values = [random_text(rng, rng.randint(0, 30)) for _ in range(rng.randint(1, 8))]
            joined = "\x00".join(values)
            if not candidate_runs_possible(joined):
                self.assertFalse(any(map(contains_pan, values)), repr(values))
            self.assertEqual(candidate_runs_possible(joined), any(map(candidate_runs_possible, values)))

    def test_long_runs_checked_across_chunk_boundaries(self):
        rng = random.Random(12)
        quiet = no_window_digits(rng, 2 * pan._CHUNK + 300)
        self.assertFalse(run_has_luhn_window(quiet))
        self.assertFalse(contains_pan(quiet))
        for length in (13, 19):
            number = lone_window_pan(rng, length)
            for boundary in (pan._CHUNK, 2 * pan._CHUNK, len(quiet)):
                for at in range(boundary - length - 2, boundary + 3):
                    if 0 <= at <= len(quiet) - length:
                        planted = quiet[:at] + number + quiet[at + length:]
                        self.assertTrue(run_has_luhn_window(planted), (length, at))

    def test_chunks_cover_every_window(self):
        self.patch(pan, "_CHUNK", 32)
        for n in range(MIN_PAN_DIGITS, 200):
            bounds = pan._chunk_bounds(n)
            for k in range(MIN_PAN_DIGITS, min(n, MAX_PAN_DIGITS) + 1):
                for i in range(n - k + 1):
                    self.assertTrue(any(a <= i and i + k <= b for a, b in bounds), (n, k, i))
        rng = random.Random(13)
        for _ in range(300):  # and the chunked check agrees with the naive one
            digits = no_window_digits(rng, rng.randint(40, 120))
            at = rng.randrange(len(digits) - 19)
            digits = digits[:at] + lone_window_pan(rng, rng.randint(13, 19)) + digits[at + 19:]
            self.assertEqual(run_has_luhn_window(digits), naive_has_window(digits), digits)

    def test_windows_match_naive_luhn(self):
        rng = random.Random(10)
        for _ in range(500):
            digits = "".join(rng.choices(DIGITS, k=rng.randint(0, 60)))
            self.assertEqual(run_has_luhn_window(digits), naive_has_window(digits), digits)


class AdversarialInputTests(SynchronousTestCase):
    """1 MB inputs: each completes (the method is linear); timings are in bench/pan_corpus.py."""

    MB = 1_000_000

    def test_long_digit_run_is_detected(self):
        self.assertTrue(contains_pan("4111111111111111" * (self.MB // 16)))
        self.assertTrue(contains_pan("9" * 12 + "0" * self.MB))
        self.assertTrue(contains_pan(" ".join(["4111"] * (self.MB // 5))))

    def test_alternating_patterns_complete(self):
        for s in ("1 " * (self.MB // 2), ("0" * 13 + "a") * (self.MB // 14),
                  ("1 " + "0" * 12 + "a") * (self.MB // 15), "12345678 " * (self.MB // 9),
                  "12-" * (self.MB // 3), ("4111 1111 1111 111a ") * (self.MB // 20)):
            self.assertFalse(contains_pan(s))
            self.assertFalse(candidate_runs_possible(s))

    def test_work_is_linear(self):
        # Every joined run of 13+ digits is visited once, and the group-by-group walk only sees
        # runs with separators inside, each once: total walked digits <= digits of the input.
        calls, walked = [0], [0]
        find_end, parse = pan._NOT_DIGIT, pan._parse_groups

        def counting_find_end(joined, at):
            calls[0] += 1
            return find_end(joined, at)

        def counting_parse(digits, lengths, left, right):
            walked[0] += len(digits)
            return parse(digits, lengths, left, right)

        self.patch(pan, "_NOT_DIGIT", counting_find_end)
        self.patch(pan, "_parse_groups", counting_parse)
        rng = random.Random(11)
        s = random_text(rng, 200_000) + "4111 1111 1111 111a " * 5000 + ("0" * 13 + "a") * 5000
        contains_pan(s)
        digits = sum(ch in DIGITS for ch in s)
        self.assertLessEqual(calls[0], digits // MIN_PAN_DIGITS + 1)
        self.assertLessEqual(walked[0], digits)
        self.assertGreater(walked[0], 0)
