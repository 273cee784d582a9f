"""PAN guard: detect primary account numbers (card numbers) in free text.

payment_exhaust events carry hashes and buckets only, so any string that looks like a card
number is treated as a leak and the event is rejected (see docs/events.md, "PAN guard").

The rule.  Characters fall in four classes: *digits* (ASCII ``0-9`` only), *separators*
(space ``-`` ``.`` ``_`` ``:`` ``/``), *letters* (ASCII ``A-Z a-z``) and everything else
(other punctuation, NUL, any non-ASCII character), which only breaks things apart.

* A *group* is a maximal run of digits.  A group with a letter immediately before its first
  digit or after its last digit is **ignored**: it is part of a word, a hex digest or an id.
* A *candidate* is either
  - a *long run*: one group of 13 or more digits (a group of 8..12 digits is never part of a
    candidate), or
  - a *chain*: two or more groups of 3..7 digits, consecutive groups separated by exactly one
    separator (any mix), optionally followed by one separator and a final group of 1 or 2
    digits, and 13 or more digits in total.  Chains are maximal: an ignored group, a group
    of 8+ digits, two separators in a row or any other character ends a chain, and a group
    of 1 or 2 digits ends it (as its last group) but cannot start one.
* Every window of 13..19 consecutive digits of a candidate (separators removed) is
  Luhn-checked; if any window passes, the string contains a PAN.  Windows catch a PAN glued to
  other digits: an expiry (``41111111111111111227``, ``4111 1111 1111 1111 12/27``), a CVV,
  zero padding.

What it deliberately does not catch: a PAN touching a letter (``abc4111111111111111``,
``4111111111111111EXP``, ``0x4111...``), digits grouped one or two at a time or in groups of
8+ (``41111111 11111111``), and double separators.  That is what makes digests and ids pass:
every digit run of a hex digest, ULID or base62 id touches a letter unless the whole value is
digits, and a UUID's groups are 8-4-4-4-12, so at most 4+4+4 = 12 of its digits can form a
chain.

Cost.  ``candidate_runs_possible`` is exact (True iff the string has a candidate, Luhn
aside), and ``contains_pan`` starts the same way.  A string without 13 consecutive
digit-or-separator bytes costs an encode, a translate and a substring test; one without 13
digits joined by single separators, another translate, a replace and a substring test, all
C-level bytes operations.  Otherwise each such joined run is located and mapped back with
C-level find/count calls: a run that is one group is decided by its two neighbours (a hex
digest's run touches a letter: dismissed on the spot), and only a run with separators inside
is walked group by group in Python, O(groups).  Luhn windows are checked with prefix sums,
O(n) with the comparisons done in C, in chunks, so a megabyte of adversarial digits and
separators stays well under a second.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from itertools import accumulate
from operator import eq

__all__ = [
    "contains_pan", "candidate_runs_possible", "run_has_luhn_window", "luhn_valid",
    "MIN_PAN_DIGITS", "MAX_PAN_DIGITS", "SEPARATORS",
]

MIN_PAN_DIGITS = 13
MAX_PAN_DIGITS = 19
SEPARATORS = " -._:/"

_SEPARATOR_BYTES = SEPARATORS.encode("ascii")
# Byte classes: digit -> "0", separator -> " ", letter -> "a", anything else -> "x".  Bytes of
# a UTF-8 multi-byte character are >= 0x80, so non-ASCII characters (digits or letters of
# other scripts included) are "x".
_CLASSES = bytearray(b"x" * 256)
_CLASSES[ord("0") : ord("9") + 1] = b"0" * 10
_CLASSES[ord("A") : ord("Z") + 1] = b"a" * 26
_CLASSES[ord("a") : ord("z") + 1] = b"a" * 26
for _sep in _SEPARATOR_BYTES:
    _CLASSES[_sep] = ord(" ")
_CLASSES = bytes(_CLASSES)
# Coarser classes for the first test: digit or separator -> "0", anything else -> "x".  A
# candidate spans 13+ consecutive digit-or-separator bytes.
_DIGIT_OR_SEPARATOR = bytes(ord("0") if c in b"0 " else ord("x") for c in _CLASSES)
_LETTER = ord("a")
_THIRTEEN_DIGITS = b"0" * MIN_PAN_DIGITS
_NOT_DIGIT = re.compile(rb"[^0]").search  # on the class string
_CHUNK = 4096
_PLAIN = bytes.maketrans(b"0123456789", bytes(range(10)))
_DOUBLED = bytes.maketrans(b"0123456789", bytes([0, 2, 4, 6, 8, 1, 3, 5, 7, 9]))


def contains_pan(s: str) -> bool:
    """True if a candidate of ``s`` has a Luhn-valid 13..19 digit window (see module doc)."""
    prepared = _prepare(s)
    return prepared is not None and any(map(_luhn_window, _candidates(*prepared)))


def candidate_runs_possible(s: str) -> bool:
    """Exact test for "has a candidate" (module doc); False means contains_pan(s) is False.

    A string without 13 consecutive digit-or-separator bytes costs one encode, one translate
    and one substring test; one without 13 digits joined by single separators, one more
    translate and a replace.  NUL is in the "anything else" class, so values joined by NUL
    never form a run across the join.
    """
    prepared = _prepare(s)
    return prepared is not None and next(_candidates(*prepared), None) is not None


def _prepare(s: str) -> tuple[bytes, bytes, bytes] | None:
    """``(raw, classes, joined)`` for ``_candidates``, or None if ``s`` has no candidate."""
    raw = s.encode("utf-8", "surrogatepass")
    if _THIRTEEN_DIGITS not in raw.translate(_DIGIT_OR_SEPARATOR):
        return None
    classes = raw.translate(_CLASSES)
    # Delete every separator followed by a digit: digits joined by single separators become
    # one run of "0"s (two separators in a row stay a break).  Every candidate lies inside one
    # such run of 13+ "0"s.
    joined = classes.replace(b" 0", b"0")
    if _THIRTEEN_DIGITS not in joined:
        return None
    return raw, classes, joined


def _candidates(raw: bytes, classes: bytes, joined: bytes) -> Iterator[bytes]:
    """The digits (ASCII bytes, separators removed) of every candidate, in order.

    ``raw`` is the UTF-8 string, ``classes`` its byte classes, ``joined`` the classes with
    each separator followed by a digit deleted.  Each run of 13+ "0"s of ``joined`` is mapped
    back to ``raw``; one group is decided by its two neighbours, several groups (separators
    inside) are parsed group by group.
    """
    # Same deletions, but the digit after a deleted separator becomes "1": the count of "1"s
    # up to a position of ``joined`` maps it back to ``raw``.
    marks = classes.replace(b" 0", b"1")
    size = len(raw)
    ones = counted = 0  # ones == marks.count(b"1", 0, counted)
    start = joined.find(_THIRTEEN_DIGITS)
    while start >= 0:
        found = _NOT_DIGIT(joined, start + MIN_PAN_DIGITS)
        end = found.start() if found is not None else len(joined)
        ones += marks.count(b"1", counted, start + 1)
        first = start + ones  # raw index of the run's first digit
        inner = marks.count(b"1", start + 1, end)  # separators inside the run
        ones += inner
        counted = end
        stop = end + ones  # raw index just after the run's last digit
        left_letter = first > 0 and classes[first - 1] == _LETTER
        right_letter = stop < size and classes[stop] == _LETTER
        if not inner:  # one group of 13+ digits: a long run unless it touches a letter
            if not (left_letter or right_letter):
                yield raw[first:stop]
        else:
            yield from _parse_groups(
                raw[first:stop].translate(None, _SEPARATOR_BYTES),
                list(map(len, classes[first:stop].split(b" "))),
                left_letter,
                right_letter,
            )
        start = joined.find(_THIRTEEN_DIGITS, end)


def _parse_groups(
    digits: bytes, lengths: list[int], left_letter: bool, right_letter: bool
) -> Iterator[bytes]:
    """Candidates among groups separated by single separators (``lengths`` of each group).

    Only the first group can touch a letter on its left and only the last on its right.
    """
    if left_letter:
        lengths[0] = -lengths[0]  # ignored; its digits are still skipped below
    if right_letter:
        lengths[-1] = -lengths[-1]
    offset = 0
    chain = -1  # offset of the open chain's first digit, -1: no open chain
    for n in lengths:
        if n < 0:  # ignored group: closes the chain
            n = -n
            if chain >= 0 and offset - chain >= MIN_PAN_DIGITS:
                yield digits[chain:offset]
            chain = -1
        elif n >= 8:  # closes the chain; a long run if 13+
            if chain >= 0 and offset - chain >= MIN_PAN_DIGITS:
                yield digits[chain:offset]
            chain = -1
            if n >= MIN_PAN_DIGITS:
                yield digits[offset : offset + n]
        elif n >= 3:  # opens or extends a chain
            if chain < 0:
                chain = offset
        elif chain >= 0:  # 1 or 2 digits: the final group of an open chain
            if offset + n - chain >= MIN_PAN_DIGITS:
                yield digits[chain : offset + n]
            chain = -1
        offset += n
    if chain >= 0 and offset - chain >= MIN_PAN_DIGITS:
        yield digits[chain:offset]


def run_has_luhn_window(digits: str) -> bool:
    """True if any 13..19 long window of the ASCII digit string ``digits`` passes Luhn."""
    return _luhn_window(digits.encode("ascii"))


def _luhn_window(raw: bytes) -> bool:
    """``run_has_luhn_window`` on ASCII digit bytes.

    Luhn doubles every second digit counting from the rightmost one.  For a window ending at
    index j-1 the doubled positions are those with the same parity as j, so with two prefix-sum
    arrays (one doubling even positions, one doubling odd ones) a window [i, j) is valid iff
    the matching prefix sums agree modulo 10.  O(n) work, the comparisons done in C; a long
    run is checked in overlapping chunks, so it stops soon after the first valid window.
    """
    n = len(raw)
    if n < MIN_PAN_DIGITS:
        return False
    if n > _CHUNK + MAX_PAN_DIGITS:  # long runs in overlapping chunks: stop at the first hit
        return any(_luhn_window(raw[i:j]) for i, j in _chunk_bounds(n))
    plain = raw.translate(_PLAIN)
    doubled = raw.translate(_DOUBLED)
    even_doubled = bytearray(plain)
    even_doubled[0::2] = doubled[0::2]
    odd_doubled = bytearray(plain)
    odd_doubled[1::2] = doubled[1::2]
    by_parity = (
        [x % 10 for x in accumulate(even_doubled, initial=0)],  # windows with j even
        [x % 10 for x in accumulate(odd_doubled, initial=0)],  # windows with j odd
    )
    for length in range(MIN_PAN_DIGITS, min(MAX_PAN_DIGITS, n) + 1):
        for parity in (0, 1):
            first_end = length + ((parity - length) % 2)
            sums = by_parity[parity]
            if any(map(eq, sums[first_end::2], sums[first_end - length :: 2])):
                return True
    return False


def _chunk_bounds(n: int) -> list[tuple[int, int]]:
    """Slices of a run of ``n`` digits such that every 13..19 window lies inside one of them:
    one slice per window start i = 0, _CHUNK, 2 * _CHUNK, ..., reaching 18 digits further."""
    reach = _CHUNK + MAX_PAN_DIGITS - 1
    return [(i, min(n, i + reach)) for i in range(0, max(n - MAX_PAN_DIGITS + 1, 1), _CHUNK)]


def luhn_valid(digits: str) -> bool:
    """Plain Luhn check of a whole digit string (used by tests and tools)."""
    total = 0
    for position, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if position % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0
