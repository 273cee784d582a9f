-- Shared by single.lua and batch.lua (loaded with dofile from the same directory).
--
-- Environment (set by bench/run.py):
--   BENCH_API_KEY      bearer secret (required)
--   BENCH_NONCE        unique per wrk invocation, so event_ids never repeat across phases
--   BENCH_EVENT_TIMESTAMP  RFC3339 timestamp used as event_timestamp (default: now, UTC;
--                      BENCH_OCCURRED_AT, its name before the seed schema, is read too)
--   BENCH_BATCH_SIZE   events per batch request (batch.lua only, default 500)
--
-- Every thread counts response status codes and the events the server says it accepted;
-- done() prints them together with wrk's own summary as one line prefixed "BENCH_JSON ",
-- so non-2xx responses are always reported, never hidden.

local M = {}

M.api_key = os.getenv("BENCH_API_KEY") or error("BENCH_API_KEY is not set")
M.nonce = os.getenv("BENCH_NONCE") or tostring(os.time())
M.event_timestamp = os.getenv("BENCH_EVENT_TIMESTAMP") or os.getenv("BENCH_OCCURRED_AT")
  or os.date("!%Y-%m-%dT%H:%M:%SZ")

local event_types = {"payment_failed", "payment_intent.payment_failed", "payment_retried", "charge.failed"}
local processors = {"stripe", "adyen", "braintree", "checkout_com"}
local failures = {"insufficient_funds", "do_not_honor", "expired_card", "processor_timeout"}
local geos = {"US:CA", "DE:BE", "GB:LDN", "BR:SP", "IN:MH"}
local buckets = {"0-10", "10-50", "50-200", "200-500", "500+"}
local sources = {"checkout_api", "mobile_sdk", "subscriptions"}
local methods = {"credit_card", "debit_card", "wallet", "bank_transfer"}
local channels = {"web", "ios", "android", "pos"}
local results = {"failed", "fail", "declined", "failed"}
local origins = {"processor", "network", "issuer", "merchant"}

-- An opaque hash-like token: letters and digits alternate, so it never contains a long
-- digit run (an all-digit run of 13+ could trip the server's PAN/Luhn guard).
local alphabet = "abcdefghijkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ"
local function token(seed, len)
  local out, x = {}, seed
  for k = 1, len do
    x = (x * 1103515245 + 12345) % 2147483648
    if k % 2 == 0 then
      out[k] = tostring(x % 10)
    else
      local j = (x % #alphabet) + 1
      out[k] = string.sub(alphabet, j, j)
    end
  end
  return table.concat(out)
end

-- All 19 fields (the seed's 15 and PayFlux's 4; docs/events.md), so the server does the full
-- validation work on every event. Returns the JSON text before and after the event_id value.
function M.event_parts(i)
  local function pick(t) return t[(i % #t) + 1] end
  local before = '{"event_id":"'
  local after = '","event_type":"' .. pick(event_types) ..
    '","event_timestamp":"' .. M.event_timestamp ..
    '","merchant_id_hash":"m_' .. token(i % 97 + 1, 22) ..
    '","payment_intent_id_hash":"pi_' .. token(i * 7919 + 3, 30) ..
    '","processor":"' .. pick(processors) ..
    '","failure_category":"' .. pick(failures) ..
    '","retry_count":' .. (i % 4) ..
    ',"geo_bucket":"' .. pick(geos) ..
    '","amount_bucket":"' .. pick(buckets) ..
    '","system_source":"' .. pick(sources) ..
    '","payment_method_bucket":"' .. pick(methods) ..
    '","channel":"' .. pick(channels) ..
    '","retry_result":"' .. pick(results) ..
    '","failure_origin":"' .. pick(origins) ..
    '","customer_id_hash":"cus_' .. token(i * 104729 + 5, 26) ..
    '","currency":"USD","failure_code":"card_declined:' .. (i % 50) ..
    '","processor_latency_ms":' .. (37 + (i * 13) % 900) .. '}'
  return before, after
end

-- event_id prefix "<kind><nonce>_t<thread>_". Digit groups are joined with letters and "_",
-- never "-" or " ", so ids can't form the separated 13+ digit runs a PAN guard looks for
-- ("4111-1111-1111-1111").
function M.id_prefix(kind)
  return kind .. M.nonce .. "_t" .. tostring(tid or 0) .. "_"
end

M.headers = {
  ["Authorization"] = "Bearer " .. M.api_key,
  ["Connection"] = "keep-alive",
}

-- ---------------------------------------------------------------- per-thread counting
statuses = {}
accepted_events = 0
duplicate_events = 0

first_error = nil

function M.count_response(status, body, batch)
  statuses[status] = (statuses[status] or 0) + 1
  if (status < 200 or status > 299) and not first_error then
    first_error = status .. " " .. string.sub(body or "", 1, 600)
  end
  if status >= 200 and status < 300 and body then
    if batch then
      local a = string.match(body, '"accepted":%s*(%d+)')
      local d = string.match(body, '"duplicates":%s*(%d+)')
      if a then accepted_events = accepted_events + tonumber(a) end
      if d then duplicate_events = duplicate_events + tonumber(d) end
    elseif string.find(body, '"duplicate":%s*true') then
      duplicate_events = duplicate_events + 1
    else
      accepted_events = accepted_events + 1
    end
  end
end

-- ---------------------------------------------------------------- main-state reporting
local threads = {}
local next_id = 0

function M.setup(thread)
  next_id = next_id + 1
  thread:set("tid", next_id)
  table.insert(threads, thread)
end

local function json_obj(t)
  local parts = {}
  for k, v in pairs(t) do
    parts[#parts + 1] = string.format('"%s":%s', tostring(k), tostring(v))
  end
  return "{" .. table.concat(parts, ",") .. "}"
end

function M.done(summary, latency, requests, events_per_request)
  local codes, acc, dup = {}, 0, 0
  for _, t in ipairs(threads) do
    for code, n in pairs(t:get("statuses") or {}) do
      codes[code] = (codes[code] or 0) + n
    end
    acc = acc + (t:get("accepted_events") or 0)
    dup = dup + (t:get("duplicate_events") or 0)
  end
  for _, t in ipairs(threads) do
    local fe = t:get("first_error")
    if fe then io.write("first non-2xx response: ", fe, "\n") end
  end
  local non2xx = 0
  for code, n in pairs(codes) do
    if code < 200 or code > 299 then non2xx = non2xx + n end
  end
  local e = summary.errors
  local out = {
    duration_us = summary.duration,
    requests = summary.requests,
    bytes = summary.bytes,
    events_per_request = events_per_request,
    accepted_events = acc,
    duplicate_events = dup,
    non2xx = non2xx,
    err_connect = e.connect, err_read = e.read, err_write = e.write,
    err_status = e.status, err_timeout = e.timeout,
    lat_mean_us = latency.mean, lat_stdev_us = latency.stdev, lat_max_us = latency.max,
    lat_p50_us = latency:percentile(50), lat_p90_us = latency:percentile(90),
    lat_p99_us = latency:percentile(99), lat_p999_us = latency:percentile(99.9),
  }
  io.write("BENCH_JSON {", string.sub(json_obj(out), 2, -2),
           ',"status_counts":', json_obj(codes), "}\n")
  local line = {}
  for code, n in pairs(codes) do line[#line + 1] = code .. "=" .. n end
  io.write("status codes: ", table.concat(line, " "), "  (non-2xx: ", non2xx, ")\n")
end

-- wrk's response and done hooks (globals wrk looks for): count each answer (batch answers when
-- batch is true) and print the summary for events_per_request events a request.
function M.install_hooks(batch, events_per_request)
  function response(status, hdrs, body)
    M.count_response(status, body, batch)
  end
  function done(summary, latency, requests)
    M.done(summary, latency, requests, events_per_request)
  end
end

return M
