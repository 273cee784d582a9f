-- wrk script: one event per request, POST /v1/events/payment_exhaust.
-- Each request carries a unique event_id: "s<nonce>_t<thread>_<counter>".
-- Usage: BENCH_API_KEY=... wrk -t1 -c64 -d20s --latency -s bench/wrk/single.lua http://127.0.0.1:PORT
local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local C = dofile(dir .. "common.lua")

local path = os.getenv("BENCH_PATH") or "/v1/events/payment_exhaust"
local headers = {}
for k, v in pairs(C.headers) do headers[k] = v end
headers["Content-Type"] = "application/json"

local counter = 0
local prefix
local variants = {}
local NV = 64

function setup(thread) C.setup(thread) end

function init(args)
  prefix = C.id_prefix("s")
  for i = 1, NV do
    local before, after = C.event_parts(i)
    variants[i] = {before .. prefix, after}
  end
end

function request()
  counter = counter + 1
  local v = variants[(counter % NV) + 1]
  return wrk.format("POST", path, headers, v[1] .. counter .. v[2])
end

C.install_hooks(false, 1)
