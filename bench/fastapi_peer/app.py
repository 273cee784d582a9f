"""FastAPI peer of PayFlux's ingest contract, used only by the benchmark.

This is the "same contract, done idiomatically in FastAPI" reference that PayFlux's
performance targets are expressed against (PROOF-load-test.md):
uvicorn (uvloop + httptools) + pydantic v2 + redis.asyncio with hiredis.

It implements the PayFlux HTTP contract closely enough that both sides do comparable
work per request:

* ``POST /v1/events/payment_exhaust`` (``application/json``, one event)
* ``POST /v1/events/payment_exhaust/batch`` (``application/x-ndjson`` or a JSON array)
* checks in the contract's order: 401 -> 413 (1 MiB, enforced while reading) -> 415 ->
  400 (malformed JSON) -> 422 (pydantic field errors, PAN guard) -> 409 (same event_id,
  different payload) -> 503 (Redis unavailable) -> 202
* the event schema of docs/events.md (the Go seed's 15 fields plus PayFlux's 4 optional
  ones, the same character rules): ``event_type``, ``event_timestamp``, ``event_id`` and
  ``processor`` required; ``""`` or null is an absent field; ``processor`` stored lower case
  and ``currency`` upper case; ``event_timestamp`` stored as canonical UTC milliseconds
  (``...T..:..:...mmmZ``); the deprecated input names ``occurred_at`` and ``payment_method``
  accepted and stored under the seed's names; unknown fields dropped (PayFlux's default
  ``unknown_fields = "drop"``)
* one Lua call (EVALSHA via ``redis.asyncio`` ``Script``) per request or per batch that
  dedupes on ``event_id`` and XADDs; conflicts are checked for the whole batch before
  anything is written.

Configuration (environment): ``PEER_API_KEY`` (bearer secret, required),
``PEER_REDIS_URL`` (default ``redis://127.0.0.1:6379/0`` -- the benchmark always passes
its own port), ``PEER_PREFIX`` (default ``bench``), ``PEER_MAX_BATCH`` (default 1000),
``PEER_DEDUPE_MS`` (default 86400000).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from contextlib import asynccontextmanager
from datetime import datetime, timedelta, timezone
from typing import Annotated, Any, Optional

import orjson
import redis.asyncio as aioredis
from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import (
    AliasChoices,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    TypeAdapter,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)

# PayFlux's own PAN guard (payflux/pan.py, docs/events.md "PAN guard"): pure Python, stdlib
# only, importable because the peer runs from the repository root (run.sh, bench/run.py), so
# both sides accept and reject exactly the same strings (hex digests, UUIDs) at the same cost.
# (It used to be a copy of the rule; a copy drifts whenever the rule changes.)
from payflux.pan import contains_pan

MAX_BODY = 1024 * 1024
MAX_BATCH = int(os.environ.get("PEER_MAX_BATCH", "1000"))
DEDUPE_MS = int(os.environ.get("PEER_DEDUPE_MS", "86400000"))
PREFIX = os.environ.get("PEER_PREFIX", "bench")
REDIS_URL = os.environ.get("PEER_REDIS_URL", "redis://127.0.0.1:6379/0")
API_KEY = os.environ.get("PEER_API_KEY", "").encode()
FUTURE_SKEW = timedelta(seconds=300)

STREAM_KEY = f"{PREFIX}:{{0}}:events"
SEEN_PREFIX = f"{PREFIX}:{{0}}:seen:"

# --------------------------------------------------------------------------- schema

# The character rules of payflux/events.py (STRING_FIELDS).
_LABEL = "A-Za-z0-9._:/+<>=,()-"


def _label(cap: int) -> Any:
    """A free-form label: no @, quotes, backslashes or control characters; inner spaces."""
    return Annotated[str, Field(pattern=f"^[{_LABEL}][ {_LABEL}]{{0,{cap - 1}}}$")]


Hash = Annotated[str, Field(pattern=r"^[A-Za-z0-9._:=+/-]{1,128}$")]
Label64, Label128 = _label(64), _label(128)

_OPTIONAL_STRINGS = (
    "merchant_id_hash", "payment_intent_id_hash", "failure_category", "geo_bucket", "amount_bucket",
    "system_source", "payment_method_bucket", "channel", "retry_result", "failure_origin",
    "customer_id_hash", "currency", "failure_code",
)


class PaymentExhaustEvent(BaseModel):
    # extra="ignore": unknown fields are dropped, as PayFlux's default unknown_fields = "drop"
    model_config = ConfigDict(extra="ignore", frozen=True)

    # the seed's 15 fields, in the seed's order
    event_type: Label128
    event_timestamp: AwareDatetime = Field(validation_alias=AliasChoices("event_timestamp", "occurred_at"))
    event_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9._:{}-]{1,128}$")]
    merchant_id_hash: Optional[Hash] = None
    payment_intent_id_hash: Optional[Hash] = None
    processor: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")]
    failure_category: Optional[Label128] = None
    retry_count: Annotated[StrictInt, Field(ge=0, le=1000)] = 0
    geo_bucket: Optional[Annotated[str, Field(pattern=r"^[A-Za-z0-9_:-]{1,32}$")]] = None
    amount_bucket: Optional[Label64] = None
    system_source: Optional[Label128] = None
    payment_method_bucket: Optional[Label64] = Field(
        None, validation_alias=AliasChoices("payment_method_bucket", "payment_method"))
    channel: Optional[Label64] = None
    retry_result: Optional[Label64] = None
    failure_origin: Optional[Label64] = None
    # PayFlux's additions
    customer_id_hash: Optional[Hash] = None
    currency: Optional[Annotated[str, Field(pattern=r"^[A-Z]{3}$")]] = None
    failure_code: Optional[Annotated[str, Field(pattern=r"^[A-Za-z0-9._:-]{1,64}$")]] = None
    processor_latency_ms: Optional[Annotated[StrictInt, Field(ge=0, le=600000)]] = None

    @field_validator(*_OPTIONAL_STRINGS, mode="before")
    @classmethod
    def _empty_is_absent(cls, v: Any) -> Any:
        return None if v == "" else v

    @field_validator("retry_count", mode="before")
    @classmethod
    def _retry_default(cls, v: Any) -> Any:
        return 0 if v is None else v

    @field_validator("processor", mode="before")
    @classmethod
    def _lower(cls, v: Any) -> Any:
        return v.lower() if isinstance(v, str) and v.isascii() else v

    @field_validator("currency", mode="before")
    @classmethod
    def _upper(cls, v: Any) -> Any:
        return v.upper() if isinstance(v, str) and v.isascii() else v

    @field_validator("event_timestamp")
    @classmethod
    def _not_in_future(cls, v: datetime) -> datetime:
        if v - datetime.now(timezone.utc) > FUTURE_SKEW:
            raise ValueError("event_timestamp is more than 300 s in the future")
        return v

    @field_serializer("event_timestamp")
    def _canonical_timestamp(self, v: datetime) -> str:
        u = v.astimezone(timezone.utc)
        return f"{u:%Y-%m-%dT%H:%M:%S}.{u.microsecond // 1000:03d}Z"

    @model_validator(mode="after")
    def _pan_guard(self) -> "PaymentExhaustEvent":
        for name, value in self.__dict__.items():
            if isinstance(value, str) and contains_pan(value):
                # Name the field, never echo the value.
                raise ValueError(f"{name} looks like a card number (PAN); hashes only")
        return self

    def canonical(self) -> bytes:
        """Canonical JSON: absent optionals dropped, sorted keys, compact separators."""
        return orjson.dumps(
            self.model_dump(mode="json", exclude_none=True), option=orjson.OPT_SORT_KEYS
        )


EventList = TypeAdapter(list[PaymentExhaustEvent])

# --------------------------------------------------------------------------- redis

# KEYS[1] = stream, KEYS[1+i] = seen key of event i
# ARGV[1] = received_at ms, ARGV[2] = dedupe window ms,
# then per event i: ARGV[3+(i-1)*4 ..] = event_id, event_type, fingerprint, data
# Returns {1, id1, dup1, id2, dup2, ...} or {0, index_of_conflicting_event}.
APPEND_LUA = """
local stream = KEYS[1]
local received_at = ARGV[1]
local window = ARGV[2]
local n = #KEYS - 1
local existing = {}
local batch_fp = {}
for i = 1, n do
  local key = KEYS[i + 1]
  local fp = ARGV[3 + (i - 1) * 4 + 2]
  local seen = redis.call('GET', key)
  if seen then
    local sp = string.find(seen, ' ', 1, true)
    if string.sub(seen, 1, sp - 1) ~= fp then
      return {0, i}
    end
    existing[i] = string.sub(seen, sp + 1)
  elseif batch_fp[key] then
    if batch_fp[key] ~= fp then
      return {0, i}
    end
  else
    batch_fp[key] = fp
  end
end
local out = {1}
local written = {}
for i = 1, n do
  local key = KEYS[i + 1]
  local base = 3 + (i - 1) * 4
  local id = existing[i] or written[key]
  if id then
    out[#out + 1] = id
    out[#out + 1] = 1
  else
    id = redis.call('XADD', stream, '*', 'v', '1', 'event_id', ARGV[base],
                    'type', ARGV[base + 1], 'received_at', received_at,
                    'data', ARGV[base + 3])
    redis.call('SET', key, ARGV[base + 2] .. ' ' .. id, 'PX', window)
    written[key] = id
    out[#out + 1] = id
    out[#out + 1] = 0
  end
end
return out
"""


class Conflict(Exception):
    def __init__(self, index: int):
        self.index = index


async def append_events(app: FastAPI, events: list[PaymentExhaustEvent]) -> list[tuple[str, bool]]:
    keys = [STREAM_KEY]
    args: list[Any] = [int(time.time() * 1000), DEDUPE_MS]
    for ev in events:
        data = ev.canonical()
        keys.append(SEEN_PREFIX + ev.event_id)
        args += (ev.event_id, ev.event_type, hashlib.sha256(data).hexdigest(), data)
    reply = await app.state.append(keys=keys, args=args)
    if reply[0] == 0:
        raise Conflict(int(reply[1]) - 1)
    return [
        (reply[j].decode(), bool(reply[j + 1])) for j in range(1, len(reply), 2)
    ]


# --------------------------------------------------------------------------- http


@asynccontextmanager
async def lifespan(app: FastAPI):
    if not API_KEY:
        raise RuntimeError("PEER_API_KEY must be set")
    client = aioredis.Redis.from_url(REDIS_URL, socket_timeout=5, socket_connect_timeout=2)
    app.state.redis = client
    app.state.append = client.register_script(APPEND_LUA)
    yield
    await client.aclose()


app = FastAPI(title="PayFlux FastAPI peer (benchmark only)", lifespan=lifespan)

_BEARER = b"Bearer "


class HTTPError(Exception):
    def __init__(self, status: int, code: str, message: str, details: list | None = None,
                 headers: dict | None = None):
        self.status, self.code, self.message = status, code, message
        self.details = details or []
        self.headers = headers


@app.exception_handler(HTTPError)
async def _http_error(request: Request, exc: HTTPError) -> Response:
    body = {"error": exc.code, "message": exc.message, "details": exc.details}
    return Response(orjson.dumps(body), status_code=exc.status,
                    media_type="application/json", headers=exc.headers)


def _json(status: int, body: dict) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def _check_auth(request: Request) -> None:
    header = request.headers.get("authorization", "").encode()
    if not (header.startswith(_BEARER) and hmac.compare_digest(header[len(_BEARER):], API_KEY)):
        raise HTTPError(401, "unauthorized", "missing or invalid bearer token",
                        headers={"WWW-Authenticate": "Bearer"})


async def _read_body(request: Request) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY:
        raise HTTPError(413, "payload_too_large", f"body exceeds {MAX_BODY} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise HTTPError(413, "payload_too_large", f"body exceeds {MAX_BODY} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def _field_errors(exc: ValidationError, line: int | None = None) -> list[dict]:
    out = []
    for err in exc.errors(include_url=False, include_input=False, include_context=False):
        loc = list(err["loc"])
        entry = {"field": ".".join(str(p) for p in loc) or None, "message": err["msg"],
                 "type": err["type"]}
        if line is not None:
            entry["line"] = line
        out.append(entry)
    return out


def _is_json_error(exc: ValidationError) -> bool:
    return any(e["type"] == "json_invalid" for e in exc.errors(include_url=False))


async def _append_or_error(request: Request, events: list[PaymentExhaustEvent]):
    try:
        return await append_events(request.app, events)
    except Conflict as c:
        raise HTTPError(409, "conflict",
                        "event_id already recorded with a different payload",
                        [{"line": c.index + 1, "event_id": events[c.index].event_id}])
    except (aioredis.ConnectionError, aioredis.TimeoutError, OSError):
        raise HTTPError(503, "unavailable", "event store unavailable",
                        headers={"Retry-After": "1"})


@app.post("/v1/events/payment_exhaust", status_code=202)
async def ingest_one(request: Request) -> Response:
    _check_auth(request)
    body = await _read_body(request)
    if _media_type(request) != "application/json":
        raise HTTPError(415, "unsupported_media_type", "use application/json")
    try:
        event = PaymentExhaustEvent.model_validate_json(body)
    except ValidationError as exc:
        if _is_json_error(exc):
            raise HTTPError(400, "malformed_json", "body is not valid JSON")
        raise HTTPError(422, "invalid_event", "event failed validation", _field_errors(exc))
    [(stream_id, duplicate)] = await _append_or_error(request, [event])
    return _json(202, {"status": "accepted", "id": stream_id, "duplicate": duplicate})


@app.post("/v1/events/payment_exhaust/batch", status_code=202)
async def ingest_batch(request: Request) -> Response:
    _check_auth(request)
    body = await _read_body(request)
    media = _media_type(request)
    events: list[PaymentExhaustEvent] = []
    details: list[dict] = []
    if media in ("application/x-ndjson", "application/ndjson"):
        lines = [ln for ln in body.split(b"\n") if ln.strip()]
        if len(lines) > MAX_BATCH:
            raise HTTPError(413, "batch_too_large", f"at most {MAX_BATCH} events per batch")
        for n, line in enumerate(lines, 1):
            try:
                events.append(PaymentExhaustEvent.model_validate_json(line))
            except ValidationError as exc:
                if _is_json_error(exc):
                    raise HTTPError(400, "malformed_json", f"line {n} is not valid JSON",
                                    [{"line": n}])
                details += _field_errors(exc, n)
    elif media == "application/json":
        try:
            raw = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise HTTPError(400, "malformed_json", "body is not valid JSON")
        if not isinstance(raw, list):
            raise HTTPError(422, "invalid_batch", "a JSON batch must be an array of events")
        if len(raw) > MAX_BATCH:
            raise HTTPError(413, "batch_too_large", f"at most {MAX_BATCH} events per batch")
        try:
            events = EventList.validate_python(raw)
        except ValidationError as exc:
            for e in _field_errors(exc):
                idx, _, field = (e["field"] or "").partition(".")
                e["line"], e["field"] = int(idx) + 1 if idx.isdigit() else None, field or None
                details.append(e)
    else:
        raise HTTPError(415, "unsupported_media_type",
                        "use application/x-ndjson or a JSON array (application/json)")
    if details:
        raise HTTPError(422, "invalid_event", "batch rejected; nothing was written", details)
    if not events:
        raise HTTPError(422, "invalid_batch", "batch is empty")
    results = await _append_or_error(request, events)
    dups = sum(1 for _, d in results if d)
    return _json(202, {
        "status": "accepted",
        "count": len(results),
        "accepted": len(results) - dups,
        "duplicates": dups,
        "results": [{"id": i, "duplicate": d} for i, d in results],
    })


@app.get("/health")
async def health() -> Response:
    return _json(200, {"status": "ok"})


@app.get("/ready")
async def ready(request: Request) -> Response:
    try:
        await request.app.state.redis.ping()
    except Exception:
        return _json(503, {"status": "unavailable"})
    return _json(200, {"status": "ready"})
