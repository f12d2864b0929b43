#!/usr/bin/env bash
# Where the three-node p99 comes from (BENCHMARKS.md, "Where the three-node
# tail comes from"): the fixed-rate fan-out (2,000 TCP members, 50 msg/s,
# 300 messages) on one node with 2, 3 and 6 tokio worker threads, and on
# three nodes sharing one redis-server with 2 and 1 workers each,
# interleaved, ROUNDS times. Three nodes of two workers run six worker
# threads; one node of six runs as many without any cluster path.
#
#   examples/scripts/bench_threads.sh [ROUNDS]     (default 5)
#
# Prints one line per run: the label (w<N>: one node, N workers; w<N>x3:
# three nodes, N workers each), p50 and p99, the whole machine's CPU busy
# and context switches a second over two seconds of the run, and whether
# the run was correct. Environment: REDIS_PORT (default 6397), SKIP_BUILD=1.
set -euo pipefail
cd "$(dirname "$0")/../.."
rounds=${1:-5}
ulimit -n 20000 || true
command -v redis-server > /dev/null || { echo "redis-server is missing: apt-get install -y --no-install-recommends redis-server" >&2; exit 1; }
[ "${SKIP_BUILD:-}" = 1 ] || cargo build --release -p comet-bench
bin=${CARGO_TARGET_DIR:-target}/release/comet-bench
rport=${REDIS_PORT:-6397}
pids=()
dir=""
stop() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  pids=()
  [ -z "$dir" ] || rm -rf "$dir"
}
trap stop EXIT

# shellcheck source=examples/scripts/lib.sh
. examples/scripts/lib.sh

# cpu_sample: "busy_ticks total_ticks context_switches" now.
cpu_sample() {
  local _c u n s i w x y
  read -r _c u n s i w x y _ < /proc/stat
  echo "$((u + n + s + x + y)) $((u + n + s + i + w + x + y)) $(awk '/^ctxt/{print $2}' /proc/stat)"
}

# one LABEL NODES WORKERS
one() {
  local label=$1 nodes=$2 workers=$3 addr more=()
  dir=$(mktemp -d -t comet-threads.XXXXXX)
  if [ "$nodes" = 1 ]; then
    TOKIO_WORKER_THREADS=$workers "$bin" serve --server comet --tcp 127.0.0.1:4901 \
      --users 2010 --groups 1 --group-size 2000 > "$dir/node.log" 2>&1 & pids+=($!)
    addr=127.0.0.1:4901
    wait_port 4901
  else
    redis-server --port "$rport" --bind 127.0.0.1 --save '' --appendonly yes --dir "$dir" \
      --daemonize no > "$dir/redis.log" 2>&1 & pids+=($!)
    wait_port "$rport"
    for i in 0 1 2; do
      TOKIO_WORKER_THREADS=$workers "$bin" serve --server comet --tcp "127.0.0.1:$((4811 + 2 * i))" \
        --store redis --redis-url "redis://127.0.0.1:$rport/" --node-id "t$i" \
        --users 2010 --groups 1 --group-size 2000 > "$dir/node$i.log" 2>&1 & pids+=($!)
    done
    for _ in $(seq 100); do
      [ "$(redis-cli -p "$rport" PUBSUB NUMSUB comet:all | tail -n1)" = 3 ] && break
      sleep 0.1
    done
    addr=127.0.0.1:4811
    more=(--more-addrs 127.0.0.1:4813,127.0.0.1:4815)
  fi
  sleep 0.5
  "$bin" run --addr "$addr" "${more[@]}" --quiet fanout --members 2000 --messages 300 --rate 50 \
    > "$dir/out.json" 2> /dev/null &
  local gen=$!
  # After the logins and the settle, two seconds of the steady part.
  sleep 3.5
  local before after
  before=$(cpu_sample)
  sleep 2
  after=$(cpu_sample)
  wait "$gen"
  python3 - "$label" "$dir/out.json" $before $after <<'EOF'
import json, sys
label, out, b1, t1, c1, b2, t2, c2 = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:])
v = json.load(open(out))
l = v["latency"]
print(f"{label} p50 {l['p50_us'] / 1000:.1f} p99 {l['p99_us'] / 1000:.1f} ms "
      f"busy {100 * (b2 - b1) / (t2 - t1):.0f}% ctxt/s {(c2 - c1) // 2} ok {v['ok']}")
EOF
  stop
}

for _ in $(seq "$rounds"); do
  one w2 1 2
  one w3 1 3
  one w6 1 6
  one w2x3 3 2
  one w1x3 3 1
done
