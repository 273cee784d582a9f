"""The payment_exhaust event: schema, validation, canonical encoding, PAN guard.

This is the ingest hot path.  The contract (fields, caps, error codes, canonical form, the
false-positive rate of the PAN guard, decoder timings) is documented in docs/events.md.
Strict JSON decoding of request bodies lives in payflux.jsonbody; its public names
(MalformedJSON, decode_event_body, decode_batch_body, MAX_DEPTH, MAX_NUMBER_DIGITS) are
re-exported here, so callers keep importing them from payflux.events.

Nothing here ever puts an input value into an error message or detail: messages name the
field and the rule, never what was sent, because the value may be a card number or PII.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from datetime import date, datetime, timezone
from operator import itemgetter
from typing import Callable

import attrs

from payflux.jsonbody import (
    MAX_DEPTH, MAX_NUMBER_DIGITS, MalformedJSON, decode_batch_body, decode_event_body,
)
from payflux.pan import candidate_runs_possible, contains_pan

try:  # optional fast path; results are byte-identical without it (tested)
    import orjson as _orjson
except ImportError:  # pragma: no cover - exercised by patching _orjson to None in tests
    _orjson = None

__all__ = [
    "SCHEMA_VERSION", "ValidationPolicy", "EventInvalid", "MalformedJSON", "EventValidator",
    "canonical_json", "fingerprint", "contains_pan", "decode_event_body", "decode_batch_body",
    "MAX_DEPTH", "MAX_NUMBER_DIGITS", "FIELDS", "PreparedRow",
]

SCHEMA_VERSION = 1

UNKNOWN_FIELD_POLICIES = ("drop", "reject")


@attrs.frozen
class ValidationPolicy:
    """How strict the validator is (``docs/events.md``).

    ``unknown_fields``: ``"drop"`` (the seed's behaviour: accepted, never stored, reported
    as ignored) or ``"reject"`` (422 ``unknown_field``).  ``fill_seed_fields``: store every
    one of the seed's 15 fields, an absent string as ``""`` (the Go PayFlux's ``data``
    shape, for ``layout = "seed"``).
    """

    future_skew_seconds: float = 300.0
    unknown_fields: str = attrs.field(default="drop", validator=attrs.validators.in_(UNKNOWN_FIELD_POLICIES))
    fill_seed_fields: bool = False


class EventInvalid(Exception):
    """details: list of {"field": str, "code": str, "message": str}; never contains input values."""

    def __init__(self, details: list[dict]):
        self.details = details
        summary = ", ".join(f"{d['field']}: {d['code']}" for d in details)
        super().__init__(f"invalid event ({summary})")


# --- the schema ----------------------------------------------------------------------------
#
# Schema v1 is the Go seed's event (its 15 fields, names and meaning), plus four optional
# PayFlux fields.  Character classes are ASCII and never include a quote, a backslash, "@"
# or a control character; ids and hashes also exclude whitespace.

_HASH_RX = r"[A-Za-z0-9._:=+/-]{1,128}"
_HASH_RULE = "a hash or id token: 1..128 characters of [A-Za-z0-9._:=+/-] (no whitespace, no @)"
_LABEL_CHARS = "A-Za-z0-9._:/+<>=,()-"


def _label(cap: int, example: str = "", required: bool = False) -> tuple[bool, str, int, str]:
    """A free-form label field: no @, quotes, backslashes or control characters; inner spaces."""
    rule = f"a label: 1..{cap} characters of [{_LABEL_CHARS}] and inner spaces (no @)"
    return (required, f"[{_LABEL_CHARS}][ {_LABEL_CHARS}]{{0,{cap - 1}}}", cap,
            f"{rule}, e.g. {example}" if example else rule)


# name -> (required, regex, max length, rule text); public so the OpenAPI document is built
# from the same rules the validator applies.  Regex-checked string fields only;
# event_timestamp, retry_count and processor_latency_ms have their own code below.
STRING_FIELDS: dict[str, tuple[bool, str, int, str]] = {
    "event_type": _label(128, "payment_failed or payment_intent.payment_failed (as the processor names it)",
                         required=True),
    "event_id": (True, r"[A-Za-z0-9._:{}-]{1,128}", 128,
                 "1..128 characters of [A-Za-z0-9._:{}-], e.g. a UUID; the idempotency key"),
    "merchant_id_hash": (False, _HASH_RX, 128, _HASH_RULE),
    "payment_intent_id_hash": (False, _HASH_RX, 128, _HASH_RULE),
    "processor": (True, r"[a-z0-9][a-z0-9._-]{0,63}", 64,
                  "1..64 characters of [a-z0-9._-], e.g. stripe (case-insensitive, stored lower case)"),
    "failure_category": _label(128, "processor_timeout"),
    "geo_bucket": (False, r"[A-Za-z0-9_:-]{1,32}", 32, "1..32 characters of [A-Za-z0-9_:-], e.g. US, EU-west"),
    "amount_bucket": _label(64, "50-200"),
    "system_source": _label(128, "checkout_api"),
    "payment_method_bucket": _label(64, "credit_card"),
    "channel": _label(64, "web"),
    "retry_result": _label(64, "failed"),
    "failure_origin": _label(64, "processor"),
    "customer_id_hash": (False, _HASH_RX, 128, _HASH_RULE),
    "currency": (False, r"[A-Z]{3}", 3, "an ISO 4217 code: 3 letters (case-insensitive, stored upper case)"),
    "failure_code": (False, r"[A-Za-z0-9._:-]{1,64}", 64, "1..64 characters of [A-Za-z0-9._:-]"),
}
INT_FIELDS = {"retry_count": (0, 1000), "processor_latency_ms": (0, 600_000)}
# The seed's 15 fields in the seed's order, then PayFlux's additions.
SEED_FIELDS = ("event_type", "event_timestamp", "event_id", "merchant_id_hash", "payment_intent_id_hash",
               "processor", "failure_category", "retry_count", "geo_bucket", "amount_bucket",
               "system_source", "payment_method_bucket", "channel", "retry_result", "failure_origin")
EXTRA_FIELDS = ("customer_id_hash", "currency", "failure_code", "processor_latency_ms")
FIELDS = SEED_FIELDS + EXTRA_FIELDS
REQUIRED = ("event_type", "event_timestamp", "event_id", "processor")  # what the Go PayFlux requires
# Deprecated input names (PayFlux's pre-seed schema) -> the seed's name they are stored under.
ALIASES = {"occurred_at": "event_timestamp", "payment_method": "payment_method_bucket"}
# Fields whose case carries no meaning: folded before the rule is checked, stored folded.
CASE_FOLDED = {"processor": str.lower, "currency": str.upper}

_KNOWN = frozenset(FIELDS)
_SEED_SET = frozenset(SEED_FIELDS)
_ACCEPTED = _KNOWN | frozenset(ALIASES)
_ALIAS_OF = {name: alias for alias, name in ALIASES.items()}
_STRING_CHECKS = tuple(
    (name, req, re.compile(rx).fullmatch, cap, CASE_FOLDED.get(name), _ALIAS_OF.get(name))
    for name, (req, rx, cap, _) in STRING_FIELDS.items()
)
_FORMAT_MESSAGES = {name: f"must be {rule}" for name, (_, _, _, rule) in STRING_FIELDS.items()}

_TIMESTAMP = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}([Tt])[0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{1,9})?([Zz]|[+-][0-9]{2}:[0-9]{2})"
).fullmatch
_TIMESTAMP_MAX = 64
_EPOCH_2000 = 946_684_800.0
_UTC = timezone.utc
_SAFE_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}").fullmatch
_UNKNOWN_MESSAGE = "is not a field of payment_exhaust v1"
_PAN_MESSAGE = "looks like a card number (see docs/events.md, PAN guard); send hashes or buckets only"
_ORDER = {name: i for i, name in enumerate(FIELDS)}
_ORDER.update({alias: _ORDER[name] for alias, name in ALIASES.items()})

# --- the fast path: tables ------------------------------------------------------------------
#
# The common event (every value a non-empty string of the right shape or absent, processor
# and currency already folded, a `...Z` timestamp, no unknown or alias field, integers in
# range, no digit run that could be a PAN) is checked with one combined regex over its 17
# string values joined by NUL, an absent optional field standing as \x01 (neither character
# is in any field's character class, so the join is unambiguous).  Anything else goes to the
# detailed validator, which alone writes error details; the fast path only ever says "valid,
# and here is the same output" or "ask the detailed validator" (property-tested).

_ABSENT = "\x01"
_FAST_NAMES = ("event_timestamp",) + tuple(STRING_FIELDS)
_FAST_DEFAULTS = (_ABSENT,) * len(_FAST_NAMES)
_FAST_TIMESTAMP = (  # UTC, uppercase T/Z, field ranges checked; the calendar day is checked below
    r"[0-9]{4}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12][0-9]|3[01])"
    r"T(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]{1,9})?Z"
)
_FAST_SHAPE = re.compile("\x00".join(
    [_FAST_TIMESTAMP]
    + [f"(?:{rx})" if req else f"(?:\x01|{rx})" for req, rx, _, _ in STRING_FIELDS.values()]
)).fullmatch
_IDX = {name: i for i, name in enumerate(_FAST_NAMES)}
_EVENT_ID, _EVENT_TYPE, _MERCHANT = _IDX["event_id"], _IDX["event_type"], _IDX["merchant_id_hash"]
_SEED_STRING_IDX = tuple(_IDX[name] for name in SEED_FIELDS if name in _IDX)
_EPOCH_2000_SECONDS = 946_684_800
_RETRY_LOW, _RETRY_HIGH = INT_FIELDS["retry_count"]
_LATENCY_LOW, _LATENCY_HIGH = INT_FIELDS["processor_latency_ms"]
_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()
_MINUTE_CACHE: dict[str, int] = {}  # "YYYY-MM-DDTHH:MM" -> Unix seconds, or -1: no such day
_MINUTE_CACHE_MAX = 4096
# Canonical form: keys sorted.  The string keys fall in two runs around the two integers
# ("processor_latency_ms" < "retry_count"): run A before both, run B after both.
_SORTED_STRINGS = sorted(_FAST_NAMES)
_RUN_A = [n for n in _SORTED_STRINGS if n < "processor_latency_ms"]
_RUN_B = [n for n in _SORTED_STRINGS if n > "retry_count"]
assert len(_RUN_A) + len(_RUN_B) == len(_SORTED_STRINGS) and "event_id" in _RUN_A
_VALUES_A = itemgetter(*(_IDX[n] for n in _RUN_A))
_VALUES_B = itemgetter(*(_IDX[n] for n in _RUN_B))
_PREFIXES_A = tuple(f'"{n}":"' for n in _RUN_A)
_PREFIXES_B = tuple(f'"{n}":"' for n in _RUN_B)
# (event_id, merchant_id_hash or "", event_type, canonical, fingerprint): what an append needs.
PreparedRow = tuple[str, str, str, bytes, str]


def _minute_seconds(minute: str) -> int:
    """Unix seconds of a "YYYY-MM-DDTHH:MM" prefix (fields already range-checked), -1 if no such day."""
    seconds = _MINUTE_CACHE.get(minute)
    if seconds is None:
        try:
            day = date(int(minute[:4]), int(minute[5:7]), int(minute[8:10])).toordinal()
            seconds = (day - _EPOCH_ORDINAL) * 86400 + int(minute[11:13]) * 3600 + int(minute[14:16]) * 60
        except ValueError:  # Feb 30, year 0000
            seconds = -1
        if len(_MINUTE_CACHE) >= _MINUTE_CACHE_MAX:
            _MINUTE_CACHE.clear()
        _MINUTE_CACHE[minute] = seconds
    return seconds


def _canonical_text(values: list, retry: int, latency: int | None) -> str:
    """canonical_json of a fast-path event: every value is ASCII without quotes or backslashes
    (the regexes guarantee it), so JSON encoding is plain concatenation."""
    a = ",".join([p + v + '"' for p, v in zip(_PREFIXES_A, _VALUES_A(values)) if v != _ABSENT])
    b = ",".join([p + v + '"' for p, v in zip(_PREFIXES_B, _VALUES_B(values)) if v != _ABSENT])
    ints = f',"retry_count":{retry}' if latency is None else f',"processor_latency_ms":{latency},"retry_count":{retry}'
    return "{" + a + ints + ("," + b if b else "") + "}"


def _detail(field: str, code: str, message: str) -> dict:
    return {"field": field, "code": code, "message": message}


def field_label(index: int, key: object) -> str:
    """An unknown key is echoed (in errors, ``ignored_fields`` and metrics) only if it is a
    short identifier and not a PAN; otherwise it is ``<field #N>`` (1-based position)."""
    if isinstance(key, str) and _SAFE_KEY(key) is not None and not contains_pan(key):
        return key
    return f"<field #{index}>"


def _strings(value: object, out: list[str]) -> list[str]:
    """Append every string (values and keys) nested in ``value``; iterative and cycle-safe."""
    stack, seen = [value], set()
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            out.append(v)
        elif isinstance(v, (dict, list, tuple)) and id(v) not in seen:
            seen.add(id(v))  # ids are stable: every container is kept alive by ``value``
            if isinstance(v, dict):
                stack.extend(v.keys())
                stack.extend(v.values())
            else:
                stack.extend(v)
    return out


def _absent(v: object) -> bool:
    """null and "" mean "not sent" (the Go PayFlux cannot tell them apart from absence)."""
    return v is None or v == ""


class EventValidator:
    """Validate decoded payment_exhaust events against the schema and a policy.

    ``now`` returns the current Unix time; it is called at most once per event, and only
    when ``event_timestamp`` is well-formed (tests inject a fixed clock).
    """

    def __init__(self, policy: ValidationPolicy, now: Callable[[], float] = time.time):
        self.policy = policy
        self._now = now
        self._reject_unknown = policy.unknown_fields == "reject"
        self._fill = policy.fill_seed_fields

    def validate(self, obj: object, ignored: list[str] | None = None) -> dict:
        """Return the normalised event (only known fields under the seed's names, canonical
        values) or raise EventInvalid listing EVERY bad field (not just the first).  Dropped
        unknown fields are appended (as labels, see ``field_label``) to ``ignored``."""
        fast = self._fast(obj, None)
        if fast is not None and not candidate_runs_possible(fast[3]):
            values, retry, latency, _ = fast
            out = {name: v for name, v in zip(_FAST_NAMES, values) if v != _ABSENT}
            out["retry_count"] = retry
            if latency is not None:
                out["processor_latency_ms"] = latency
            return out
        return self.validate_detailed(obj, ignored)

    def validate_batch(
        self, items: list
    ) -> tuple[list[PreparedRow], list[tuple[int, list[dict]]], list[str]]:
        """Validate, encode and fingerprint a batch: ``(rows, invalid, ignored)``.

        ``rows`` holds one ``(event_id, merchant_id_hash, event_type, canonical, fingerprint)``
        per item, in order, when every item is valid (``merchant_id_hash`` is "" when absent);
        ``invalid`` lists ``(position, details)`` (1-based position) for every invalid item,
        with the same details ``validate`` raises; ``ignored`` has one label per dropped
        unknown field of the valid items.  Once an item is invalid, rows are no longer built.
        ``now`` is called once per batch for the fast path (and once per event that needs the
        detailed validator).
        """
        if not items:
            return [], [], []
        latest = self._now() + self.policy.future_skew_seconds - 1
        fast_path = self._fast
        fast = [fast_path(obj, latest) for obj in items]
        # One PAN pre-filter pass over the whole batch; only on a hit is each event re-checked.
        texts = [f[3] for f in fast if f is not None]
        suspicious = bool(texts) and candidate_runs_possible("\x00".join(texts))
        rows: list[PreparedRow] = []
        invalid: list[tuple[int, list[dict]]] = []
        ignored: list[str] = []
        sha256 = hashlib.sha256
        for n, (obj, f) in enumerate(zip(items, fast), 1):
            if f is not None and not (suspicious and candidate_runs_possible(f[3])):
                if invalid:
                    continue
                values, retry, latency, _ = f
                canonical = _canonical_text(values, retry, latency).encode("ascii")
                merchant = values[_MERCHANT]
                rows.append((values[_EVENT_ID], "" if merchant == _ABSENT else merchant, values[_EVENT_TYPE],
                             canonical, sha256(canonical).hexdigest()))
                continue
            try:
                event = self.validate_detailed(obj, ignored)
            except EventInvalid as e:
                invalid.append((n, e.details))
                continue
            if not invalid:
                canonical = canonical_json(event)
                rows.append((event["event_id"], event.get("merchant_id_hash", ""), event["event_type"],
                             canonical, sha256(canonical).hexdigest()))
        return ([] if invalid else rows), invalid, ignored

    def _fast(self, obj: object, latest: float | None) -> tuple[list, int, int | None, str] | None:
        """``(values, retry_count, processor_latency_ms, joined)`` if ``obj`` is a common-shape
        valid event apart from the PAN guard (the caller runs it on ``joined``); else None.

        ``values`` follows ``_FAST_NAMES`` with ``event_timestamp`` canonical and \x01 for
        absent (or "" for an absent seed field under ``fill_seed_fields``).
        ``latest``: the last accepted whole second (``now + skew - 1``), or None to ask ``now``.
        Timestamps within a second of a limit go to the detailed validator, so the fraction
        never needs to be compared.
        """
        if type(obj) is not dict:
            return None
        values = list(map(obj.get, _FAST_NAMES, _FAST_DEFAULTS))
        try:
            joined = "\x00".join(values)
        except TypeError:  # a non-string (or null) value
            return None
        if _FAST_SHAPE(joined) is None or not _KNOWN.issuperset(obj):
            return None
        get = obj.get
        retry = get("retry_count")
        if retry is None:
            retry = 0
        elif type(retry) is not int or not _RETRY_LOW <= retry <= _RETRY_HIGH:
            return None
        latency = get("processor_latency_ms")
        if latency is not None and (type(latency) is not int or not _LATENCY_LOW <= latency <= _LATENCY_HIGH):
            return None
        ts = values[0]
        seconds = _minute_seconds(ts[:16])
        if seconds < 0:
            return None
        seconds += int(ts[17:19])
        if latest is None:
            latest = self._now() + self.policy.future_skew_seconds - 1
        if seconds < _EPOCH_2000_SECONDS or seconds > latest:
            return None
        values[0] = f"{ts[:19]}.{(ts[20:-1] + '00')[:3]}Z" if len(ts) > 20 else f"{ts[:19]}.000Z"
        if self._fill:
            for i in _SEED_STRING_IDX:
                if values[i] == _ABSENT:
                    values[i] = ""
        return values, retry, latency, joined

    def validate_detailed(self, obj: object, ignored: list[str] | None = None) -> dict:
        """``validate`` field by field: the reference, and the only path that writes error details."""
        if not isinstance(obj, dict):
            raise EventInvalid([_detail("$", "not_an_object", "the event must be a JSON object")])
        errors: dict[str, dict] = {}
        out: dict = {}
        get = obj.get
        flat = True  # no containers anywhere: the PAN pre-filter only needs the str values
        fill = self._fill

        label, v = self._source(obj, "event_timestamp", "occurred_at", errors)
        if _absent(v):
            errors[label] = _detail(label, "required", "is required")
        elif type(v) is str:
            self._timestamp(label, v, out, errors)
        else:
            errors[label] = _detail(label, "type", "must be an RFC 3339 timestamp string")
            flat = False

        for name, required, match, cap, fold, alias in _STRING_CHECKS:
            label, v = self._source(obj, name, alias, errors)
            if _absent(v):
                if required:
                    errors[label] = _detail(label, "required", "is required")
                elif fill and name in _SEED_SET:
                    out[name] = ""
                continue
            if type(v) is not str:
                errors[label] = _detail(label, "type", "must be a string")
                flat = False
                continue
            if fold is not None and v.isascii():
                v = fold(v)
            if match(v) is not None:
                out[name] = v
            elif len(v) > cap:
                errors[label] = _detail(label, "too_long", f"must be at most {cap} characters")
            else:
                errors[label] = _detail(label, "format", _FORMAT_MESSAGES[label if label in STRING_FIELDS else name])

        for name, (low, high) in INT_FIELDS.items():
            v = get(name)
            if v is None:
                if name == "retry_count":
                    out[name] = 0
            elif type(v) is not int:
                errors[name] = _detail(name, "type", "must be a JSON integer")
                flat = False
            elif low <= v <= high:
                out[name] = v
            else:
                errors[name] = _detail(name, "out_of_range", f"must be between {low} and {high}")

        dropped: list[str] = []
        if not _ACCEPTED.issuperset(obj):
            flat = False
            for index, key in enumerate(obj, 1):
                if key not in _ACCEPTED:
                    label = field_label(index, key)
                    if self._reject_unknown:
                        errors[label] = _detail(label, "unknown_field", _UNKNOWN_MESSAGE)
                    else:
                        dropped.append(label)

        texts = [v for v in obj.values() if type(v) is str] if flat else _strings(obj, [])
        if texts and candidate_runs_possible("\x00".join(texts)):
            for index, (key, value) in enumerate(obj.items(), 1):
                if any(map(contains_pan, _strings(value, [key] if isinstance(key, str) else []))):
                    label = key if key in _ACCEPTED else field_label(index, key)
                    errors[label] = _detail(label, "pan_detected", _PAN_MESSAGE)
        if errors:
            raise EventInvalid(sorted(errors.values(), key=lambda d: _ORDER.get(d["field"], 99)))
        if ignored is not None:
            ignored.extend(dropped)
        return out

    @staticmethod
    def _source(obj: dict, name: str, alias: str | None, errors: dict) -> tuple[str, object]:
        """``(the name the producer used, its value)`` for a field that may come under a
        deprecated alias; sending both names is a ``duplicate_field`` error on the alias."""
        v = obj.get(name)
        if alias is None or alias not in obj:
            return name, v
        if not _absent(v):
            if not _absent(obj[alias]):
                errors[alias] = _detail(alias, "duplicate_field", f"is a deprecated name of {name}; send only {name}")
            return name, v
        return alias, obj[alias]

    def _timestamp(self, label: str, v: str, out: dict, errors: dict) -> None:
        m = _TIMESTAMP(v)
        if m is None:
            if len(v) > _TIMESTAMP_MAX:
                errors[label] = _detail(label, "too_long", f"must be at most {_TIMESTAMP_MAX} characters")
            else:
                errors[label] = _detail(
                    label, "format", "must be an RFC 3339 timestamp with offset, e.g. 2026-01-06T00:00:00Z")
            return
        t, zone = m.groups()
        try:  # the regex fixed the shape; fromisoformat checks the calendar and offset range
            dt = datetime.fromisoformat(v if t == "T" and zone != "z" else v.upper())
            ts = dt.timestamp()
        except (ValueError, OverflowError):
            errors[label] = _detail(
                label, "format", "must be a real calendar date and time (no leap seconds), offset below 24:00")
            return
        if ts < _EPOCH_2000:
            errors[label] = _detail(label, "out_of_range", "must not be before 2000-01-01T00:00:00Z")
        elif ts - self._now() > self.policy.future_skew_seconds:
            errors[label] = _detail(
                label, "future_timestamp",
                f"must not be more than {self.policy.future_skew_seconds:g} seconds in the future")
        elif zone in "Zz":  # already UTC: keep the digits, truncate the fraction to milliseconds
            out["event_timestamp"] = f"{v[:10]}T{v[11:19]}.{dt.microsecond // 1000:03d}Z"
        else:
            try:
                out["event_timestamp"] = dt.astimezone(_UTC).isoformat(timespec="milliseconds")[:-6] + "Z"
            except OverflowError:
                errors[label] = _detail(label, "out_of_range", "must be before year 10000 in UTC")


# --- canonical encoding --------------------------------------------------------------------


def _canonical_stdlib(event: dict) -> bytes:
    return json.dumps(event, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def canonical_json(event: dict) -> bytes:
    """Sorted keys, no whitespace, UTF-8, deterministic; used for storage AND fingerprint.

    Defined on validated events (str keys; ASCII str and int values), for which orjson and
    the stdlib produce identical bytes, so nodes with and without orjson agree.
    """
    if _orjson is not None:
        try:
            return _orjson.dumps(event, option=_orjson.OPT_SORT_KEYS)
        except TypeError:
            pass  # e.g. ints beyond 64 bits: let the stdlib decide
    return _canonical_stdlib(event)


def fingerprint(canonical: bytes) -> str:
    """Hex SHA-256 of the canonical bytes (the idempotency comparison value)."""
    return hashlib.sha256(canonical).hexdigest()
