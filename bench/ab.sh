#!/usr/bin/env bash
# A/B helper behind PROOF-load-test.md (2026-12-03): one PayFlux from a given checkout against a
# fresh redis-server (free port, persistence off), loaded by wrk; prints wrk's rate and
# latency, and PayFlux's and Redis's CPU per appended event (process CPU time over the
# measured run / XLEN growth), so commits can be compared run against run on a busy box.
#
#   bench/ab.sh single|batch CONNECTIONS SECONDS [CHECKOUT]      (CHECKOUT: default this repo)
#   e.g. git worktree add /tmp/base <commit>; for i in 1 2; do bench/ab.sh single 64 6 /tmp/base;
#        bench/ab.sh single 64 6; done
# single: the Go seed's seed_single.lua (../shared/peers); batch: bench/wrk/batch.lua, 500 events.
# PAYFLUX_ARGS adds options (e.g. PAYFLUX_ARGS="--workers 2"). Needs wrk, redis-server, redis-cli.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mode=${1:?single|batch} conns=${2:?connections} seconds=${3:?seconds} checkout=${4:-$here}
py="$here/.venv/bin/python"
free_port() { "$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
cpu_of() {  # the process and its children (--workers), redis-server excluded
  "$py" -c "import psutil; p = psutil.Process($1); ps = [p] + [c for c in p.children(recursive=True) if 'redis' not in c.name()]; print(sum(q.cpu_times().user + q.cpu_times().system for q in ps))"
}
redis_cpu() { redis-cli -p "$rport" info cpu | awk -F: '/used_cpu_(sys|user):/ {s += $2} END {print s}'; }
xlen() { redis-cli -p "$rport" XLEN 'payflux:{0}:events'; }
rport=$(free_port) hport=$(free_port) tmp=$(mktemp -d)
redis-server --port "$rport" --bind 127.0.0.1 --save "" --appendonly no --dir "$tmp" >/dev/null &
rpid=$!
trap 'kill $ppid $rpid 2>/dev/null; rm -rf "$tmp"' EXIT
sleep 0.3
key=bench-key-0123456789abcdef
# shellcheck disable=SC2086
(cd "$checkout" && PYTHONPATH="$checkout" exec "$here/.venv/bin/twistd" -n --pidfile= payflux \
  --listen "tcp:$hport:interface=127.0.0.1" --metrics-listen "tcp:0:interface=127.0.0.1" \
  --redis-url "redis://127.0.0.1:$rport/0" --api-keys "bench:$key" --rate-limit 0 ${PAYFLUX_ARGS:-}) \
  >"$tmp/payflux.log" 2>&1 &
ppid=$!
for _ in $(seq 100); do curl -sf -o /dev/null "http://127.0.0.1:$hport/ready" && break; sleep 0.1; done
if [ "$mode" = single ]; then
  script="$here/../shared/peers/seed_single.lua" path=/v1/events/payment_exhaust
else
  script="$here/bench/wrk/batch.lua" path=/v1/events/payment_exhaust/batch
fi
export PAYFLUX_KEY=$key BENCH_API_KEY=$key BENCH_BATCH_SIZE=500 WRK_PATH=$path
BENCH_NONCE=warm$RANDOM wrk -t1 -c"$conns" -d2s -s "$script" "http://127.0.0.1:$hport$path" >/dev/null
c0=$(cpu_of $ppid) r0=$(redis_cpu) x0=$(xlen)
BENCH_NONCE=run$RANDOM wrk -t1 -c"$conns" -d"${seconds}s" --latency -s "$script" "http://127.0.0.1:$hport$path" \
  | grep -E "Requests/sec|  50%|  99%|Non-2xx|requests in"
c1=$(cpu_of $ppid) r1=$(redis_cpu)
sleep 0.5
x1=$(xlen)
"$py" -c "n = $x1 - $x0; print(f'{n / $seconds:,.0f} events/s appended; PayFlux CPU {($c1 - $c0) * 1e6 / n:.1f} us/event, Redis CPU {($r1 - $r0) * 1e6 / n:.1f} us/event ({n} events; {\"$checkout\"})')"
