"""
The alert store: every alert, with its transitions and the outcomes operators recorded, kept in
Redis for ``alerts_retention_days`` after its last activity, so alerts outlive the risk
consumer's memory and a node's restart (docs/risk.md, "Alerts API").

Layout (one hash tag, so a Redis Cluster keeps them in one slot and a script may touch them all):

- ``<prefix>:{alerts}:alert:<alert_id>``: a hash, the alert document in parts: ``alert`` (JSON:
  alert_id, type, key, window_seconds, opened_at, opened_at_ms, opened_numbers; written once),
  ``severity``, ``state`` (``open`` | ``resolved``), ``updated_at_ms``, ``transitions`` and
  ``outcomes`` (JSON arrays, appended to as text by the scripts: Redis's cjson would re-encode
  the numbers and turn ``[]`` into ``{}``), and one ``seen:<action>:<at_ms>`` field per
  transition recorded, so a transition written twice (a reply lost in an outage, then the
  retry) is recorded once.
- ``<prefix>:{alerts}:alerts``: the index, a sorted set of alert_ids scored by ``opened_at`` (ms).
- ``<prefix>:{alerts}:activity``: the same ids scored by their last write (ms), for retention.

Every write (a transition, an outcome) is one Lua script: read-modify-write of the hash,
``PEXPIREAT`` of the alert key at ``now + retention``, and the index and activity entries of
alerts whose last activity is older than the retention removed (at most :data:`TRIM_LIMIT` per
write; their keys have expired already).  ``now`` is the writer's clock (the reactor's), passed
in, never Redis's ``TIME``.

Reads are written once as step generators (:mod:`payflux.redis.steps`): the side listener's API
drives them with the node's pool (``run_deferred``), ``payflux risk report`` with the CLI's
blocking client (``run_sync``); what the report makes of them is :mod:`payflux.risk.report`.
"""

from __future__ import annotations

import base64
import json
import re
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

import attrs
from twisted.internet import defer

from payflux.redis.scripts import Script, call_steps, evalsha
from payflux.redis.steps import Steps, run_deferred
from payflux.risk.alerts import ESCALATE, OPEN, RESOLVE, Transition, iso_ms

DAY_MS = 86_400_000
#: Index entries of expired alerts one write removes at most (the rest go with later writes).
TRIM_LIMIT = 100
#: Outcomes one alert holds at most.
MAX_OUTCOMES = 100
#: Index entries one listing request reads at most; past it the page ends early with a cursor.
MAX_SCAN = 10_000
#: Ids read per round trip (one read script per chunk).
CHUNK = 200

#: The transition actions of the alerts stream (``open``, ...) as the store names them.
ACTIONS = {OPEN: "opened", ESCALATE: "escalated", RESOLVE: "resolved"}
STATES = ("open", "resolved")
#: What a processor did after an alert (an outcome's ``outcome_type``; ``none``: nothing).
OUTCOME_TYPES = ("throttle", "review", "hold", "auth_degradation", "rate_limit", "other", "none")
#: Where an operator learnt it (an outcome's ``source``).
SOURCES = ("manual", "stripe_webhook", "adyen_webhook", "other_webhook", "other")

_TRIM = """
local cutoff, limit = ARGV[#ARGV - 1], tonumber(ARGV[#ARGV])
local old = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', '(' .. cutoff, 'LIMIT', 0, limit)
for _, member in ipairs(old) do
  redis.call('ZREM', KEYS[2], member)
  redis.call('ZREM', KEYS[3], member)
end
"""

_APPEND = """
local function append(list, item)
  if not list then return '[' .. item .. ']' end
  return string.sub(list, 1, -2) .. ',' .. item .. ']'
end
"""

#: KEYS: alert, index, activity.  ARGV: alert_id, alert JSON, opened_at_ms, transition JSON,
#: signature, severity, state, now_ms, expire_at_ms, cutoff_ms, trim limit.
#: Returns 1 when recorded, 0 when this transition was recorded before.
RECORD = Script("risk-alert-record", _APPEND + """
if redis.call('HSETNX', KEYS[1], 'seen:' .. ARGV[5], '1') == 0 then return 0 end
redis.call('HSETNX', KEYS[1], 'alert', ARGV[2])
local transitions = append(redis.call('HGET', KEYS[1], 'transitions') or nil, ARGV[4])
redis.call('HSET', KEYS[1], 'transitions', transitions, 'severity', ARGV[6], 'state', ARGV[7],
           'updated_at_ms', ARGV[8])
redis.call('PEXPIREAT', KEYS[1], ARGV[9])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[8], ARGV[1])
""" + _TRIM + "return 1\n")

#: KEYS: alert, index, activity.  ARGV: alert_id, outcome JSON, max outcomes, now_ms,
#: expire_at_ms, cutoff_ms, trim limit.  Returns 1 (recorded), 0 (no such alert), -1 (full).
OUTCOME = Script("risk-alert-outcome", _APPEND + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if tonumber(redis.call('HGET', KEYS[1], 'outcome_count') or '0') >= tonumber(ARGV[3]) then return -1 end
local outcomes = redis.call('HGET', KEYS[1], 'outcomes') or nil
redis.call('HSET', KEYS[1], 'outcomes', append(outcomes, ARGV[2]), 'updated_at_ms', ARGV[4])
redis.call('HINCRBY', KEYS[1], 'outcome_count', 1)
redis.call('PEXPIREAT', KEYS[1], ARGV[5])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[1])
""" + _TRIM + "return 1\n")

#: KEYS: alert hashes (one slot).  Returns each one's HGETALL (empty for a missing key).
READ = Script("risk-alert-read", """
local out = {}
for i, key in ipairs(KEYS) do out[i] = redis.call('HGETALL', key) end
return out
""")


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_RFC3339 = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{1,9})?(?:[Zz]|[+-][0-9]{2}:[0-9]{2})"
).fullmatch


def rfc3339_ms(text: str) -> int:
    """Unix milliseconds of an RFC 3339 timestamp with offset; ValueError for anything else."""
    if not isinstance(text, str) or len(text) > 64 or _RFC3339(text) is None:
        raise ValueError("must be an RFC 3339 timestamp with offset, e.g. 2026-01-06T00:00:00Z")
    try:
        dt = datetime.fromisoformat(text.upper().replace("Z", "+00:00"))
        return (dt - _EPOCH) // timedelta(milliseconds=1)
    except (ValueError, OverflowError):
        raise ValueError("must be a real calendar date and time, offset below 24:00") from None


def _text(value: Any) -> Any:
    return value.decode("utf-8", "replace") if isinstance(value, (bytes, bytearray)) else value


def _compact(doc: Any) -> str:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=False)


@attrs.frozen
class AlertKeys:
    """The store's Redis keys under ``prefix`` (the node's ``stream_prefix``)."""

    prefix: str

    def alert(self, alert_id: str) -> str:
        return f"{self.prefix}:{{alerts}}:alert:{alert_id}"

    @property
    def index(self) -> str:
        return f"{self.prefix}:{{alerts}}:alerts"

    @property
    def activity(self) -> str:
        return f"{self.prefix}:{{alerts}}:activity"

    @property
    def health(self) -> str:
        """The risk consumer's processor-health snapshot (:class:`payflux.risk.handler.RiskHandler`
        writes it, ``GET /v1/risk/...`` reads it)."""
        return f"{self.prefix}:{{alerts}}:risk:health"

    def of(self, alert_id: str) -> tuple[str, str, str]:
        return self.alert(alert_id), self.index, self.activity


def record_args(tr: Transition) -> tuple[dict, list[str]]:
    """The alert part and the script arguments (before the time ones) of recording ``tr``."""
    a = tr.alert
    alert = {
        "alert_id": a.alert_id, "type": a.type, "key": dict(a.key), "window_seconds": a.window_seconds,
        "opened_at": iso_ms(a.opened_at_ms), "opened_at_ms": a.opened_at_ms, "opened_numbers": a.opened_numbers,
    }
    transition = {"action": ACTIONS[tr.action], "at": iso_ms(tr.at_ms), "at_ms": tr.at_ms,
                  "reason": tr.reason, "severity": a.severity, "numbers": tr.numbers}
    state = "resolved" if tr.action == RESOLVE else "open"
    return alert, [a.alert_id, _compact(alert), str(a.opened_at_ms), _compact(transition),
                   f"{tr.action}:{tr.at_ms}", a.severity, state]


def document(flat: Any) -> dict | None:
    """The alert document from its hash's HGETALL (a flat list or a dict); None if it is gone."""
    if isinstance(flat, dict):
        fields = {_text(k): _text(v) for k, v in flat.items()}
    else:
        flat = list(flat or [])
        fields = {_text(flat[i]): _text(flat[i + 1]) for i in range(0, len(flat) - 1, 2)}
    if "alert" not in fields:
        return None
    doc = json.loads(fields["alert"])
    doc["severity"] = fields.get("severity")
    doc["state"] = fields.get("state")
    doc["transitions"] = json.loads(fields.get("transitions") or "[]")
    doc["outcomes"] = json.loads(fields.get("outcomes") or "[]")
    updated = fields.get("updated_at_ms")
    doc["updated_at"] = iso_ms(int(updated)) if updated and updated.isdigit() else None
    return doc


# --- reading: steps for both drivers -----------------------------------------------------------


def read_steps(keys: AlertKeys, ids: list[str]) -> Steps:
    """The documents of ``ids`` (None for each one that is gone), one round trip."""
    if not ids:
        return []
    replies = yield from call_steps(READ, [keys.alert(i) for i in ids])
    return [document(r) for r in replies]


def get_steps(keys: AlertKeys, alert_id: str) -> Steps:
    """One alert's document, or None."""
    return (yield from read_steps(keys, [alert_id]))[0]


@attrs.frozen
class AlertQuery:
    """A listing's filters (docs/risk.md, "Alerts API"); None = any."""

    state: str | None = None
    type: str | None = None
    processor: str | None = None
    merchant: str | None = None
    since_ms: int | None = None
    limit: int = 50

    def matches(self, doc: dict) -> bool:
        if self.state is not None and doc.get("state") != self.state:
            return False
        if self.type is not None and doc.get("type") != self.type:
            return False
        key, numbers = doc.get("key") or {}, doc.get("opened_numbers") or {}
        # a per-intent retry_storm names its processor and merchant in its numbers, not its key
        if self.processor is not None and key.get("processor", numbers.get("processor")) != self.processor:
            return False
        if self.merchant is not None and key.get("merchant_id_hash", numbers.get("merchant_id_hash")) != self.merchant:
            return False
        return True


def encode_cursor(score: int, alert_id: str) -> str:
    raw = _compact([score, alert_id]).encode("utf-8")
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def decode_cursor(cursor: str) -> tuple[int, str]:
    """ValueError unless ``cursor`` came from :func:`encode_cursor`."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        score, alert_id = json.loads(raw)
    except (ValueError, TypeError, UnicodeDecodeError):
        raise ValueError("not a cursor of this API") from None
    if not isinstance(score, int) or isinstance(score, bool) or not isinstance(alert_id, str):
        raise ValueError("not a cursor of this API")
    return score, alert_id


def list_steps(keys: AlertKeys, query: AlertQuery, cursor: tuple[int, str] | None = None,
               max_scan: int = MAX_SCAN) -> Steps:
    """
    ``(documents, next_cursor)``: the newest ``query.limit`` matching alerts (by opened_at, then
    alert_id, both descending: the index's own order) after ``cursor``.  A cursor is the
    position of the last alert returned, so alerts opened meanwhile never shift a page: no
    duplicates, no gaps.  At most ``max_scan`` index entries are read; past that the page ends
    early with a cursor where the scan stopped.
    """
    top = "+inf" if cursor is None else str(cursor[0])
    bottom = "-inf" if query.since_ms is None else str(query.since_ms)
    out: list[dict] = []
    offset = scanned = 0
    last: tuple[int, str] | None = None
    while scanned < max_scan:
        count = min(CHUNK, max_scan - scanned)
        rows = yield ("ZREVRANGEBYSCORE", keys.index, top, bottom, "WITHSCORES", "LIMIT", str(offset), str(count))
        rows = list(rows or [])
        if not rows:
            return out, None
        page = [(_text(rows[i]), int(float(_text(rows[i + 1])))) for i in range(0, len(rows) - 1, 2)]
        offset += len(page)
        scanned += len(page)
        wanted = []
        for member, score in page:
            if cursor is not None and score == cursor[0] and member >= cursor[1]:
                continue  # at or before the cursor: returned on an earlier page
            if query.type is not None and not member.startswith(query.type + ":"):
                last = (score, member)
                continue
            wanted.append((member, score))
        docs = yield from read_steps(keys, [m for m, _ in wanted])
        for (member, score), doc in zip(wanted, docs):
            if doc is not None and query.matches(doc):
                if len(out) == query.limit:
                    return out, encode_cursor(*last)  # one more exists: the page ends at ``last``
                out.append(doc)
            last = (score, member)
        if len(page) < count:
            return out, None
    return out, (encode_cursor(*last) if last is not None else None)


def since_steps(keys: AlertKeys, since_ms: int | None) -> Steps:
    """Every stored alert opened at or after ``since_ms`` (all, if None), oldest first."""
    bottom = "-inf" if since_ms is None else str(since_ms)
    out: list[dict] = []
    offset = 0
    while True:
        rows = yield ("ZRANGEBYSCORE", keys.index, bottom, "+inf", "LIMIT", str(offset), str(CHUNK))
        ids = [_text(r) for r in rows or []]
        offset += len(ids)
        out.extend(d for d in (yield from read_steps(keys, ids)) if d is not None)
        if len(ids) < CHUNK:
            return out


# --- the store as the daemon uses it ---------------------------------------------------------


class AlertFull(Exception):
    """The alert holds :data:`MAX_OUTCOMES` outcomes already."""


class AlertStore:
    """
    The alert store on the daemon's pool (``redis``: ``execute_command(*args) -> Deferred``),
    with retention ``retention_days`` counted on ``seconds`` (the reactor's clock).
    """

    def __init__(self, redis: Any, prefix: str, retention_days: int, seconds: Callable[[], float]) -> None:
        self.redis = redis
        self.keys = AlertKeys(prefix)
        self.retention_ms = retention_days * DAY_MS
        self.seconds = seconds

    def _times(self) -> tuple[int, list[str]]:
        now = int(self.seconds() * 1000)
        return now, [str(now), str(now + self.retention_ms), str(now - self.retention_ms), str(TRIM_LIMIT)]

    def record(self, tr: Transition) -> defer.Deferred:
        """Record one transition (fires with 1, or 0 if it was recorded before)."""
        _, args = record_args(tr)
        _, times = self._times()
        return evalsha(self.redis, RECORD, self.keys.of(tr.alert.alert_id), args + times)

    def record_outcome(self, alert_id: str, outcome: dict) -> defer.Deferred:
        """Append ``outcome`` to the alert; fires with True, False (no such alert), or fails with AlertFull."""
        now, times = self._times()

        def done(result: Any) -> bool:
            if int(result) < 0:
                raise AlertFull(alert_id)
            return int(result) == 1

        return evalsha(self.redis, OUTCOME, self.keys.of(alert_id),
                       [alert_id, _compact(outcome), str(MAX_OUTCOMES), *times]).addCallback(done)

    def now_ms(self) -> int:
        return int(self.seconds() * 1000)

    def get(self, alert_id: str) -> defer.Deferred:
        return run_deferred(get_steps(self.keys, alert_id), self.redis.execute_command)

    def list(self, query: AlertQuery, cursor: tuple[int, str] | None = None) -> defer.Deferred:
        return run_deferred(list_steps(self.keys, query, cursor), self.redis.execute_command)

    def since(self, since_ms: int | None) -> defer.Deferred:
        return run_deferred(since_steps(self.keys, since_ms), self.redis.execute_command)

    def health(self) -> defer.Deferred:
        """The latest processor-health snapshot (a dict), or None: no risk consumer wrote one in
        the last 30 s (its ``PX``), or what is there is not a snapshot."""
        def parsed(raw: Any) -> dict | None:
            if raw is None:
                return None
            try:
                doc = json.loads(raw)
            except ValueError:
                return None
            return doc if isinstance(doc, dict) and doc.get("v") == 1 else None

        return defer.maybeDeferred(self.redis.execute_command, "GET", self.keys.health).addCallback(parsed)
