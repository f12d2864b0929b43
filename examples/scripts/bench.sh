#!/usr/bin/env bash
# Regenerates BENCHMARKS.md's numbers and plots: comet (TCP and WebSocket),
# the socketioxide peer and the bare tokio ceiling, each scenario several
# times (the report shows medians).
#
#   examples/scripts/bench.sh [RUNS]        (default 3)
#
# Output: target/bench/results.jsonl (every run), target/bench/report.md
# (the tables pasted into BENCHMARKS.md) and docs/bench/*.svg (the plots).
# Needs a quiet machine: nothing else should run meanwhile.
set -euo pipefail
cd "$(dirname "$0")/../.."
runs=${1:-3}
ulimit -n 20000
cargo build --release -p comet-bench
bin=target/release/comet-bench
out=target/bench
mkdir -p "$out"
results="$out/results.jsonl"

server_pid=""
start() { # kind port extra-args...
  local kind=$1 port=$2; shift 2
  local ws=()
  case $kind in comet | ceiling) ws=(--ws "127.0.0.1:$((port + 1))") ;; esac
  "$bin" serve --server "$kind" --tcp "127.0.0.1:$port" "${ws[@]}" "$@" > "$out/server-$kind.log" 2>&1 &
  server_pid=$!
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "server $kind did not start" >&2; exit 1
}
stop() { kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; sleep 1; }
run() { # kind transport port scenario args... (port: the server's base port; $runs times)
  local kind=$1 transport=$2 port=$3; shift 3
  # comet and the ceiling serve WebSocket on the port after their TCP one.
  case $transport in ws-*) port=$((port + 1)) ;; esac
  for _ in $(seq "$runs"); do
    "$bin" run "$@" --addr "127.0.0.1:$port" --transport "$transport" --server-pid "$server_pid" \
      --label "server=$kind" --quiet >> "$results" || echo "run failed: $kind $transport $*" >&2
  done
}

targets=("comet tcp 4101" "comet ws-binary 4101" "comet ws-json 4101" "ceiling tcp 4201" "ceiling ws-binary 4201" "peer socket-io 4301")

# Four more fixed-rate fan-outs per server: their p99 swings most with the
# machine's spells (over TCP, 19-48 ms for one server within minutes).
fixed_rate_extra() {
  for _ in 1 2 3 4; do
    for t in "${targets[@]}"; do
      set -- $t
      start "$1" "$3" --users 2010 --groups 1 --group-size 2000
      runs=1 run "$1" "$2" "$3" fanout --members 2000 --messages 500 --rate 50
      stop
    done
  done
}

# FIXED_RATE_ONLY=1 adds just these runs to the existing results.
if [ "${FIXED_RATE_ONLY:-}" = 1 ]; then
  fixed_rate_extra
  "$bin" report "$results" --plots docs/bench > "$out/report.md"
  exit 0
fi
: > "$results"

# Runs interleave across servers (run 1 of every server, then run 2, ...),
# each on a fresh server, so the slow and fast spells of a shared machine
# fall on all of them alike instead of on whichever server ran then.

# Fan-out by group size (the group layout is fixed when a server starts).
for _ in $(seq "$runs"); do
  for size in 100 1000 2000 5000 10000; do
    msgs=$(( 4000000 / size )); [ "$msgs" -gt 4000 ] && msgs=4000
    for t in "${targets[@]}"; do
      set -- $t
      start "$1" "$3" --users $((size + 10)) --groups 1 --group-size "$size"
      runs=1 run "$1" "$2" "$3" fanout --members "$size" --messages "$msgs"
      if [ "$size" = 2000 ]; then
        runs=1 run "$1" "$2" "$3" fanout --members 2000 --messages 500 --rate 50
      fi
      stop
    done
  done
done

fixed_rate_extra

# Idle connections and the connect+auth rate (a fresh server for every run,
# so RSS starts from the same place).
for _ in $(seq "$runs"); do
  for n in 1000 5000 10000 15000; do
    for t in "${targets[@]}"; do
      set -- $t
      start "$1" "$3" --users 20000 --groups 50 --group-size 20
      runs=1 run "$1" "$2" "$3" idle --connections "$n" --hold-secs 2
      stop
    done
  done
done

# Pairs (two more runs: a ping-pong is the most sensitive to the machine's
# spells) and mixed.
for r in $(seq $((runs + 2))); do
  for t in "${targets[@]}"; do
    set -- $t
    start "$1" "$3" --users 20000 --groups 50 --group-size 20
    runs=1 run "$1" "$2" "$3" pairs --pairs 100 --seconds 5
    [ "$r" -le "$runs" ] && runs=1 run "$1" "$2" "$3" mixed --groups 50 --group-size 20 --rate 2 --seconds 10
    stop
  done
done

"$bin" report "$results" --plots docs/bench > "$out/report.md"
echo "tables: $out/report.md; plots: docs/bench/*.svg"
