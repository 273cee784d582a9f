-- wrk script: NDJSON batches, POST /v1/events/payment_exhaust/batch.
-- BENCH_BATCH_SIZE events per request (default 500), each with a unique event_id
-- "b<nonce>_t<thread>_<request>_l<line>". The lines are precomputed in init(); a request
-- only splices the request counter into them, so wrk stays cheap per request.
-- Usage: BENCH_API_KEY=... wrk -t1 -c8 -d20s --latency -s bench/wrk/batch.lua http://127.0.0.1:PORT
local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local C = dofile(dir .. "common.lua")

local path = os.getenv("BENCH_PATH") or "/v1/events/payment_exhaust/batch"
local size = tonumber(os.getenv("BENCH_BATCH_SIZE") or "500")
local headers = {}
for k, v in pairs(C.headers) do headers[k] = v end
headers["Content-Type"] = "application/x-ndjson"

local counter = 0
local heads, tails = {}, {}
local pieces = {}

function setup(thread) C.setup(thread) end

function init(args)
  local prefix = C.id_prefix("b")
  for i = 1, size do
    local before, after = C.event_parts(i)
    heads[i] = before .. prefix
    tails[i] = "_l" .. i .. after .. "\n"
  end
end

function request()
  counter = counter + 1
  local c = tostring(counter)
  local n = 0
  for i = 1, size do
    pieces[n + 1] = heads[i]
    pieces[n + 2] = c
    pieces[n + 3] = tails[i]
    n = n + 3
  end
  return wrk.format("POST", path, headers, table.concat(pieces, "", 1, n))
end

C.install_hooks(true, size)
