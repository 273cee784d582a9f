-- wrk script: the Go seed's own seed_single.lua (the seed's 15-field event, a UUIDv4 event_id
-- per request), run unchanged, plus common.lua's per-status counting and BENCH_JSON summary,
-- so bench/run.py can send PayFlux, the FastAPI peer and the Go seed the same requests.
-- Environment (set by bench/run.py):
--   BENCH_SEED_SCRIPT  path of seed_single.lua (required)
--   PAYFLUX_KEY        bearer secret seed_single.lua sends; WRK_PATH its request path
--   BENCH_API_KEY      common.lua requires it (the same secret)
-- seed_single.lua's ids are unique per wrk run only with -t1: every thread state sees its
-- chunk-local tid as 0, so all threads seed math.random alike and send the same ids.
-- Usage: BENCH_SEED_SCRIPT=../shared/peers/seed_single.lua PAYFLUX_KEY=k BENCH_API_KEY=k \
--        wrk -t1 -c64 -d20s --latency -s bench/wrk/seed.lua http://127.0.0.1:PORT
local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local C = dofile(dir .. "common.lua")

dofile(os.getenv("BENCH_SEED_SCRIPT") or error("BENCH_SEED_SCRIPT is not set"))

local seed_setup = setup
function setup(thread)
  C.setup(thread)
  if seed_setup then seed_setup(thread) end
end

-- The Go seed answers 202 with an empty body, duplicates too: every 2xx counts as accepted
-- there; PayFlux's and the FastAPI peer's "duplicate": true answers count as duplicates.
C.install_hooks(false, 1)
