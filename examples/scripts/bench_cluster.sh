#!/usr/bin/env bash
# Cluster-mode benchmarks (BENCHMARKS.md, "Cluster mode"): the same
# scenarios on one comet node (memory store) and on 3 nodes sharing one
# redis-server (clients spread over the nodes: connection i goes to node
# i mod 3), in one run, plus Redis commands per send from INFO commandstats.
#
#   examples/scripts/bench_cluster.sh [RUNS]     (default 1)
#
# Output: target/bench/cluster.jsonl (one JSON line per run, labelled) and
# target/bench/cluster-commandstats-*.txt.
set -euo pipefail
cd "$(dirname "$0")/../.."
runs=${1:-1}
ulimit -n 20000 || true
[ "${SKIP_BUILD:-}" = 1 ] || cargo build --release -p comet-bench
bin=target/release/comet-bench
out=target/bench
mkdir -p "$out"
results="$out/cluster.jsonl"
: > "$results"
rport=${REDIS_PORT:-6395}
dir=$(mktemp -d -t comet-bench-cluster.XXXXXX)
pids=()
failed=0
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ "$failed" = 1 ]; then echo "a run failed: server logs kept in $dir" >&2; else rm -rf "$dir"; fi
}
trap cleanup EXIT

wait_port() {
  for _ in $(seq 200); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nothing listens on $1" >&2; exit 1
}
layout=(--users 2010 --groups 1 --group-size 2000)
run() { # label addr more-addrs scenario args...
  local label=$1 addr=$2 more=$3; shift 3
  local extra=()
  [ -n "$more" ] && extra=(--more-addrs "$more")
  for _ in $(seq "$runs"); do
    "$bin" run "$@" --addr "$addr" "${extra[@]}" --label "setup=$label" --quiet >> "$results" \
      || { failed=1; echo "run failed: $label $*" >&2; }
  done
}
scenarios() { # label addr more-addrs
  run "$@" fanout --members 2000 --messages 1000
  run "$@" fanout --members 2000 --messages 300 --rate 50
  run "$@" pairs --pairs 100 --seconds 5
}

# One node, memory store.
"$bin" serve --server comet --tcp 127.0.0.1:4701 "${layout[@]}" > "$dir/single.log" 2>&1 &
pids+=($!)
wait_port 4701
scenarios single 127.0.0.1:4701 ""
kill "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null || true
sleep 1

# Three nodes, one Redis.
redis-server --port "$rport" --bind 127.0.0.1 --save '' --appendonly yes --dir "$dir" \
  --daemonize no > "$dir/redis.log" 2>&1 &
pids+=($!)
wait_port "$rport"
for i in 0 1 2; do
  port=$((4711 + 2 * i))
  "$bin" serve --server comet --tcp "127.0.0.1:$port" --store redis \
    --redis-url "redis://127.0.0.1:$rport/" --node-id "bench$i" "${layout[@]}" > "$dir/node$i.log" 2>&1 &
  pids+=($!)
  wait_port "$port"
done
addrs=(127.0.0.1:4711 127.0.0.1:4713,127.0.0.1:4715)
stats() { redis-cli -p "$rport" INFO commandstats > "$out/cluster-commandstats-$1.txt"; }
redis-cli -p "$rport" CONFIG RESETSTAT > /dev/null
run cluster3 "${addrs[@]}" fanout --members 2000 --messages 1000
stats fanout
redis-cli -p "$rport" CONFIG RESETSTAT > /dev/null
run cluster3 "${addrs[@]}" fanout --members 2000 --messages 300 --rate 50
redis-cli -p "$rport" CONFIG RESETSTAT > /dev/null
run cluster3 "${addrs[@]}" pairs --pairs 100 --seconds 5
stats pairs
echo "results in $results"
