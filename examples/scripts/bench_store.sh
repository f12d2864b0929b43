#!/usr/bin/env bash
# The durable-store rows of BENCHMARKS.md, measured in one run: comet on
# the memory store vs the embedded store (fsync "interval"), interleaved;
# "always" with 100 concurrent senders; sync replay; store-fill with
# 1,000,000 messages (open time, disk bytes per message).
#
#   examples/scripts/bench_store.sh [RUNS]      (default 3)
#
# Output: target/bench/store.jsonl (every run). Needs a quiet machine.
set -euo pipefail
cd "$(dirname "$0")/../.."
runs=${1:-3}
ulimit -n 20000
cargo build --release -p comet-bench
bin=target/release/comet-bench
out=target/bench
mkdir -p "$out"
results="$out/store.jsonl"
: > "$results"

server_pid=""
start() { # store fsync extra-args...
  local store=$1 fsync=$2; shift 2
  "$bin" serve --server comet --tcp 127.0.0.1:4101 --store "$store" --fsync "$fsync" \
    --store-path "$out/store" "$@" > "$out/server-store.log" 2>&1 &
  server_pid=$!
  for _ in $(seq 100); do
    (exec 3<>/dev/tcp/127.0.0.1/4101) 2>/dev/null && return 0
    sleep 0.1
  done
  echo "server did not start" >&2; exit 1
}
stop() { kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; sleep 1; }
run() { # label scenario args...
  local label=$1; shift
  "$bin" run "$@" --addr 127.0.0.1:4101 --server-pid "$server_pid" --label "store=$label" \
    --quiet >> "$results" || echo "run failed: $label $*" >&2
}

for _ in $(seq "$runs"); do
  for store in memory embedded; do
    start "$store" interval --users 20000 --groups 50 --group-size 20
    run "$store" pairs --pairs 100 --seconds 5
    stop
    start "$store" interval --users 2010 --groups 1 --group-size 2000
    run "$store" fanout --members 2000 --messages 2000
    stop
    start "$store" interval --users 200 --groups 1 --group-size 100 --history 1000
    run "$store" sync --messages 1000 --rounds 300
    stop
  done
  for fsync in interval always; do
    start embedded "$fsync" --users 200 --groups 1 --group-size 100
    run "embedded-$fsync" senders --senders 100 --seconds 5
    stop
  done
done
"$bin" store-fill --messages 1000000 --path "$out/fill" >> "$results"
echo "results: $results"
