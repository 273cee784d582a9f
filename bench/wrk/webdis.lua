-- wrk script for the webdis peer (C HTTP -> Redis, no validation, no auth, no dedupe):
-- one XADD per request, the same event JSON as single.lua as the PUT body (webdis takes the
-- last command argument from a PUT body). Only a floor for "HTTP in, XADD out".
local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local C = dofile(dir .. "common.lua")

local stream = os.getenv("BENCH_WEBDIS_STREAM") or "webdis:events"
local headers = {["Content-Type"] = "application/json", ["Connection"] = "keep-alive"}

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
  local id = prefix .. counter
  return wrk.format("PUT", "/XADD/" .. stream .. "/*/v/1/event_id/" .. id ..
                    "/type/payment_failed/data", headers, v[1] .. counter .. v[2])
end

C.install_hooks(false, 1)
