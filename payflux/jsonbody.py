"""Strict JSON decoding of ingest request bodies: one event, NDJSON or a JSON array.

Strict means: UTF-8 only, no duplicate object keys, no NaN/Infinity, nesting at most
``MAX_DEPTH`` levels per event, numbers with at most ``MAX_NUMBER_DIGITS`` digits.  The
contract is documented in docs/events.md; ``payflux.events`` re-exports the public names.

Errors never echo input beyond position info: the body may hold a card number or PII.
"""

from __future__ import annotations

import json
import math
import re
from itertools import chain

try:  # optional fast path; results are identical without it (tested)
    import orjson as _orjson
except ImportError:  # pragma: no cover - exercised by patching _orjson to None in tests
    _orjson = None

__all__ = ["MalformedJSON", "decode_event_body", "decode_batch_body", "MAX_DEPTH", "MAX_NUMBER_DIGITS"]

MAX_DEPTH = 32
MAX_NUMBER_DIGITS = 100


class MalformedJSON(Exception):
    """message: str (no input echoed beyond position info); line: int | None (1-based, for NDJSON/batch)"""

    def __init__(self, message: str, line: int | None = None):
        self.message = message
        self.line = line
        super().__init__(message if line is None else f"line {line}: {message}")


# The stdlib decoder below is the reference: it defines what is accepted.  When orjson is
# installed, a fast path handles the common shape (flat objects, or an array of flat objects)
# and gives up -- falling back to the reference -- whenever it cannot prove that the reference
# would return the same value: nested containers, floats (orjson turns huge ints into floats),
# backslashes (escaped quotes hide keys from the duplicate-key count), or any orjson error.


class _Reject(ValueError):
    pass


def _pairs(pairs: list) -> dict:
    d = dict(pairs)
    if len(d) != len(pairs):
        raise _Reject("duplicate object key")
    return d


def _constant(name: str) -> float:
    raise _Reject("NaN and Infinity are not JSON")


def _int(s: str) -> int:
    if len(s) > MAX_NUMBER_DIGITS + (s[0] == "-"):
        raise _Reject(f"number with more than {MAX_NUMBER_DIGITS} digits")
    return int(s)


def _float(s: str) -> float:
    if sum(c.isdigit() for c in s) > MAX_NUMBER_DIGITS:
        raise _Reject(f"number with more than {MAX_NUMBER_DIGITS} digits")
    f = float(s)
    if not math.isfinite(f):
        raise _Reject("number out of range for a double")
    return f


_DECODER = json.JSONDecoder(object_pairs_hook=_pairs, parse_constant=_constant,
                            parse_int=_int, parse_float=_float)
_STRING_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_KEY_END = re.compile(rb'"[ \t\n\r]*:')
_QUOTE_WS = re.compile(rb'"[ \t\n\r]').search


def _check_depth(text: str, limit: int) -> None:
    if text.count("{") + text.count("[") <= limit:
        return
    depth = 0
    for ch in re.findall(r"[\[\]{}]", _STRING_TOKEN.sub("", text)):
        if ch in "[{":
            depth += 1
            if depth > limit:
                raise MalformedJSON(f"nesting deeper than {MAX_DEPTH} levels")
        else:
            depth -= 1


def _decode_reference(body: bytes, depth_limit: int) -> object:
    if not body.strip(b" \t\r\n"):
        raise MalformedJSON("empty body")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MalformedJSON(f"invalid UTF-8 at byte {e.start}") from None
    _check_depth(text, depth_limit)
    try:
        return _DECODER.decode(text)
    except json.JSONDecodeError as e:
        raise MalformedJSON(f"{e.msg} at line {e.lineno} column {e.colno}") from None
    except _Reject as e:
        raise MalformedJSON(str(e)) from None
    except RecursionError:
        raise MalformedJSON("nesting too deep") from None


def _decode_fast(body: bytes, array: bool) -> object:
    """orjson for flat objects (or an array of them); None means 'ask the reference decoder'."""
    if b"\\" in body or body.count(b"[") != array:
        return None
    try:
        value = _orjson.loads(body)
    except _orjson.JSONDecodeError:
        return None
    objects = value if array else [value]
    if type(objects) is not list or body.count(b"{") != len(objects):
        return None
    keys = 0
    for obj in objects:
        if type(obj) is not dict or float in map(type, obj.values()):
            return None
        keys += len(obj)
    # Without backslashes every `"<ws>:` ends a key, so fewer dict entries => duplicate key.
    # Compact and json.dumps-default bodies have no `"<ws>`, so a plain count is exact.
    if _QUOTE_WS(body) is not None:
        found = len(_KEY_END.findall(body))
    else:
        found = body.count(b'":')
    return value if found == keys else None


def _decode_ndjson_fast(body: bytes) -> list | None:
    """orjson over a whole NDJSON body of flat objects; None means 'decode line by line'.

    Each line becomes its own array (``\n`` -> ``\n],[``, keeping the newline so a string
    still cannot span lines), so one parse yields one list per line: a blank line is ``[]``,
    a line with two values or half an object is a list of the wrong length or a syntax error.
    Without backslashes a string cannot hold a quote, so the quotes in the body number exactly
    2 x (keys + string values); a duplicate key drops one of each and shows up as a shortfall.
    """
    if b"\\" in body or b"[" in body:
        return None
    try:
        lines = _orjson.loads(b"[[" + body.replace(b"\n", b"\n],[") + b"]]")
    except _orjson.JSONDecodeError:
        return None
    if max(map(len, lines)) != 1:  # some line holds two values, or every line is blank
        return None
    events = list(chain.from_iterable(lines))
    if set(map(type, events)) != {dict}:
        return None
    types = list(map(type, chain.from_iterable(map(dict.values, events))))
    if float in types or dict in types:  # nested objects or floats: the reference decides
        return None
    if body.count(b'"') != 2 * (sum(map(len, events)) + types.count(str)):
        return None
    return events


def decode_event_body(body: bytes) -> object:
    """Strict JSON decode of a single-event body: UTF-8 only (invalid UTF-8 -> MalformedJSON), reject duplicate object keys, NaN/Infinity, nesting deeper than 32, numbers with > 100 digits (no huge-int DoS); raise MalformedJSON."""
    if _orjson is not None:
        value = _decode_fast(body, False)
        if value is not None:
            return value
    return _decode_reference(body, MAX_DEPTH)


def decode_batch_body(body: bytes, kind: str) -> list[object]:
    """kind 'ndjson' (one JSON value per non-empty line; MalformedJSON.line set) or 'array' (a top-level JSON array; anything else -> MalformedJSON). Same strictness.

    Nesting is limited per event, so an array body may be one level deeper than a single
    event.  An empty body (or only blank lines) is MalformedJSON; ``[]`` decodes to ``[]``.
    For the array form, ``line`` is the line of the body where the error was found, if known.
    """
    if kind == "ndjson":
        if _orjson is not None:
            fast = _decode_ndjson_fast(body)
            if fast is not None:
                return fast
        events = []
        for number, line in enumerate(body.split(b"\n"), 1):
            if not line.strip(b" \t\r"):
                continue
            try:
                events.append(decode_event_body(line))
            except MalformedJSON as e:
                raise MalformedJSON(e.message, line=number) from None
        if not events:
            raise MalformedJSON("empty body")
        return events
    if kind != "array":
        raise ValueError(f"unknown batch kind {kind!r}")
    if _orjson is not None:
        value = _decode_fast(body, True)
        if value is not None:
            return value
    try:
        value = _decode_reference(body, MAX_DEPTH + 1)
    except MalformedJSON as e:
        m = re.search(r" at line (\d+) column \d+$", e.message)
        raise MalformedJSON(e.message, line=int(m.group(1)) if m else None) from None
    if type(value) is not list:
        raise MalformedJSON("batch body must be a JSON array")
    return value
