#!/usr/bin/env bash
# The cost of metrics (issue 13): server CPU per fan-out delivery with the
# Prometheus recorder installed (`comet-bench serve --metrics`) against
# without it (every `metrics` handle a no-op), in the same run.
#
#   examples/scripts/bench_metrics.sh [REPS] [MEMBERS] [MESSAGES]   (default 6 2000 2000)
#
# 1. REPS alternating pairs of fan-outs, each on a fresh server: off then on
#    in odd pairs, on then off in even ones, so a drift of the machine falls
#    on both alike. Prints the median, min and max CPU ns per delivery of
#    each setting and the on/off ratio of every pair.
# 2. The same under `valgrind --tool=callgrind` (instructions executed, which
#    do not depend on the machine's load): fan-outs of CG_LOW and CG_HIGH
#    (default 100 and 400) messages to CG_MEMBERS (default 200) members per
#    setting; the difference of the
#    two totals over the difference of deliveries is the instructions per
#    delivery, start-up and logins cancelled out (no periodic render there,
#    so that renders are not counted per delivery). CALLGRIND=0 skips it.
#
# REPS=0 runs only the callgrind part.
#
# Output: target/bench/metrics.jsonl (every run) and a summary on stdout.
set -euo pipefail
cd "$(dirname "$0")/../.."
reps=${1:-6}
members=${2:-2000}
messages=${3:-2000}
ulimit -n 20000
cargo build --release -p comet-bench
bin=target/release/comet-bench
out=target/bench
mkdir -p "$out"
results="$out/metrics.jsonl"
: > "$results"
port=4601
# Seconds between two renders of the exposition with metrics on.
scrape=5

server_pid=""
start() { # command... (a server on $port)
  "$@" > "$out/server-metrics.log" 2>&1 &
  server_pid=$!
  for _ in $(seq 1200); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "server did not start: $*" >&2
  exit 1
}
stop() {
  kill -TERM "$server_pid" 2>/dev/null || true
  wait "$server_pid" 2>/dev/null || true
  sleep 1
}
serve() { # on|off users [wrapper...]
  local m=$1 users=$2
  shift 2
  local flag=()
  [ "$m" = on ] && flag=(--metrics --scrape-secs "$scrape")
  start "$@" "$bin" serve --server comet --tcp "127.0.0.1:$port" \
    --users "$users" --groups 1 --group-size "$users" "${flag[@]}"
}
fanout() { # on|off members messages
  "$bin" run fanout --members "$2" --messages "$3" --addr "127.0.0.1:$port" \
    --server-pid "$server_pid" --label "metrics=$1" --quiet
}

for rep in $(seq "$reps"); do
  order="off on"
  [ $((rep % 2)) = 0 ] && order="on off"
  for m in $order; do
    serve "$m" "$members"
    fanout "$m" "$members" "$messages" | jq -c --argjson rep "$rep" '. + {rep: $rep}' >> "$results"
    stop
  done
done

if [ "$reps" -gt 0 ]; then
echo "fan-out to $members members, $messages messages, $reps alternating pairs:"
jq -s -r '
  def med: sort | if length % 2 == 1 then .[length/2|floor] else (.[length/2-1] + .[length/2]) / 2 end;
  group_by(.metrics) | .[] |
  (map(.server_cpu_ns_per_delivery)) as $c |
  "  metrics=\(.[0].metrics): CPU ns/delivery median \($c|med) min \($c|min) max \($c|max) (\($c|length) runs, all ok: \(all(.ok)))"
' "$results"
# Each pair's on/off ratio: the machine's drift between pairs cancels.
jq -s -r '
  def med: sort | if length % 2 == 1 then .[length/2|floor] else (.[length/2-1] + .[length/2]) / 2 end;
  [group_by(.rep)[] |
    (map(select(.metrics == "on"))[0].server_cpu_ns_per_delivery) /
    (map(select(.metrics == "off"))[0].server_cpu_ns_per_delivery)] as $r |
  "  on/off per pair: \($r | map(. * 1000 | round / 1000)), median \($r | med * 1000 | round / 1000)"
' "$results"
fi

[ "${CALLGRIND:-1}" = 0 ] && exit 0
cg_members=${CG_MEMBERS:-200}
lo=${CG_LOW:-100}
hi=${CG_HIGH:-400}
# One render at start only: the difference of two runs of different
# lengths would otherwise count renders as per-delivery work.
scrape=3600
declare -A ir
for m in off on; do
  for n in "$lo" "$hi"; do
    file="$out/callgrind-metrics-$m-$n.out"
    rm -f "$file"
    serve "$m" "$cg_members" valgrind --tool=callgrind --callgrind-out-file="$file"
    fanout "$m" "$cg_members" "$n" > /dev/null
    stop
    ir[$m-$n]=$(sed -n 's/^\(summary\|totals\): *\([0-9]*\).*/\2/p' "$file" | head -1)
  done
  per=$(((ir[$m-$hi] - ir[$m-$lo]) / ((hi - lo) * (cg_members - 1))))
  echo "callgrind metrics=$m, $cg_members members: Ir with $lo msgs ${ir[$m-$lo]}, with $hi msgs ${ir[$m-$hi]}: $per instructions per delivery"
done
