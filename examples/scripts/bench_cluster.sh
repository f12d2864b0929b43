#!/usr/bin/env bash
# Cluster-mode benchmarks (BENCHMARKS.md, "Cluster mode"): the same
# scenarios on one comet node (memory store) and on 3 nodes sharing one
# redis-server (clients spread over the nodes: connection i goes to node
# i mod 3), in one run, plus Redis commands, round trips and Redis time per
# send from INFO commandstats (reset before each cluster scenario).
#
#   examples/scripts/bench_cluster.sh [RUNS]     (default 1)
#
# Each run also measures the fixed-rate fan-out on ONE node on Redis
# (setup=cluster1): the cluster path's own latency (script, pub/sub, the
# node's feed), apart from three node processes sharing this machine's
# cores.
#
# Environment: PAIRS (default 500 pairs; each pair has one message in
# flight, so enough pairs make the pairs scenario throughput-bound rather
# than latency-bound), FANOUT_MESSAGES (default 1000), RATE_MESSAGES
# (default 300, at 50 msg/s), PAIRS_SECONDS (default 5), NODE_WORKERS
# (tokio worker threads per cluster node; default: cores / nodes, at least
# one, as docs/CLUSTER.md advises for nodes sharing a machine: three nodes
# on two cores get one each, one node on Redis gets one per core like the
# single node), REDIS_PORT, SKIP_BUILD=1. One run takes about 2-5 minutes.
#
# Output: target/bench/cluster.jsonl (one JSON line per scenario run,
# labelled setup=single|cluster3, and one "redis-commands" line for the
# fan-out and one for the pairs: per send, after subtracting a short
# baseline run's logins and logouts), target/bench/cluster-commandstats-*.txt,
# and a summary table (ratio, target, met) on stdout.
set -euo pipefail
cd "$(dirname "$0")/../.."
runs=${1:-1}
pairs=${PAIRS:-500}
fanout_messages=${FANOUT_MESSAGES:-1000}
rate_messages=${RATE_MESSAGES:-300}
pairs_seconds=${PAIRS_SECONDS:-5}
ulimit -n 20000 || true
command -v redis-server > /dev/null || { echo "redis-server is missing: apt-get install -y --no-install-recommends redis-server" >&2; exit 1; }
command -v redis-cli > /dev/null || { echo "redis-cli is missing (package redis-tools)" >&2; exit 1; }
[ "${SKIP_BUILD:-}" = 1 ] || cargo build --release -p comet-bench
target=${CARGO_TARGET_DIR:-target}
bin=$target/release/comet-bench
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

# shellcheck source=examples/scripts/lib.sh
. examples/scripts/lib.sh
cores=$(nproc)
# node_workers COUNT: tokio workers of each of COUNT nodes on this machine.
node_workers() {
  echo "${NODE_WORKERS:-$(( cores / $1 > 0 ? cores / $1 : 1 ))}"
}
users=$(( 2 * pairs > 2010 ? 2 * pairs : 2010 ))
layout=(--users "$users" --groups 1 --group-size 2000)
run() { # label addr more-addrs scenario args...
  local label=$1 addr=$2 more=$3; shift 3
  local extra=()
  [ -n "$more" ] && extra=(--more-addrs "$more")
  local workers=$cores
  case $label in
    cluster1) workers=$(node_workers 1) ;;
    cluster3) workers=$(node_workers 3) ;;
  esac
  "$bin" run "$@" --addr "$addr" "${extra[@]}" --label "setup=$label" \
    --label "node_workers=$workers" --quiet >> "$results" \
    || { failed=1; echo "run failed: $label $*" >&2; }
}
fanout_max=(fanout --members 2000 --messages "$fanout_messages")
fanout_rate=(fanout --members 2000 --messages "$rate_messages" --rate 50)
pairs_run=(pairs --pairs "$pairs" --seconds "$pairs_seconds")

# Redis commands per send. Each scenario logs its clients in (and out) on
# top of its sends, so it runs twice: a short baseline, then the measured
# run; the difference between the two, divided by the difference in sends,
# is what a send costs. Writes one JSON line and keeps the raw stats.
redis_reset() { redis-cli -p "$rport" CONFIG RESETSTAT > /dev/null; }
redis_snap() { # file: once the run's logouts are done (script calls stop)
  local before=-1 now
  for _ in $(seq 60); do
    now=$(redis-cli -p "$rport" INFO commandstats | grep '^cmdstat_evalsha:' || true)
    [ "$now" = "$before" ] && break
    before=$now
    sleep 0.5
  done
  redis-cli -p "$rport" INFO commandstats > "$1"
}
commands() { # name label addr more-addrs baseline-args -- measured-args
  local name=$1 label=$2 addr=$3 more=$4; shift 4
  local base=() full=()
  while [ "$1" != -- ]; do base+=("$1"); shift; done
  shift; full=("$@")
  local extra=()
  [ -n "$more" ] && extra=(--more-addrs "$more")
  local bfile="$out/cluster-commandstats-$name-baseline.txt" file="$out/cluster-commandstats-$name.txt"
  redis_reset
  local bline
  bline=$("$bin" run "${base[@]}" --addr "$addr" "${extra[@]}" --quiet) \
    || { failed=1; echo "baseline failed: $name" >&2; return; }
  redis_snap "$bfile"
  redis_reset
  run "$label" "$addr" "$more" "${full[@]}"
  redis_snap "$file"
  python3 - "$name" "$bfile" "$file" "$bline" "$(tail -n 1 "$results")" >> "$results" <<'EOF'
import json, sys
name, bpath, path = sys.argv[1:4]
base, last = json.loads(sys.argv[4]), json.loads(sys.argv[5])
def stats(p):
    calls, usec = {}, {}
    for line in open(p):
        line = line.strip()
        if not line.startswith("cmdstat_"):
            continue
        cmd, kv = line[len("cmdstat_"):].split(":", 1)
        kv = dict(x.split("=") for x in kv.split(","))
        if cmd in ("info", "config|resetstat"):
            continue
        calls[cmd], usec[cmd] = int(kv["calls"]), int(kv["usec"])
    return calls, usec
def sends(v):
    return v.get("acked") or 2 * v.get("round_trips", 0)
(bc, bu), (c, u) = stats(bpath), stats(path)
n = max(sends(last) - sends(base), 1)
calls = {k: c.get(k, 0) - bc.get(k, 0) for k in set(c) | set(bc)}
scripts = calls.get("evalsha", 0) + calls.get("eval", 0)
inner = sum(v for k, v in calls.items() if k not in ("evalsha", "eval"))
us = u.get("evalsha", 0) + u.get("eval", 0) - bu.get("evalsha", 0) - bu.get("eval", 0)
# Script calls are the round trips; Redis counts the commands they run
# inside under their own names.
print(json.dumps({
    "scenario": "redis-commands", "setup": "cluster3", "of": name, "sends": n,
    "round_trips_per_send": round(scripts / n, 3),
    "commands_per_send": round(inner / n, 2),
    "redis_us_per_send": round(us / n, 1),
    "calls": {k: v for k, v in sorted(calls.items()) if v},
}))
EOF
}

cluster_up() { # nodes: a fresh redis-server and that many nodes, subscribed
  local count=$1 i port subs=0
  rm -rf "$dir/redis"; mkdir -p "$dir/redis"
  redis-server --port "$rport" --bind 127.0.0.1 --save '' --appendonly yes --dir "$dir/redis" \
    --daemonize no > "$dir/redis.log" 2>&1 &
  rpid=$!
  wait_port "$rport" 200
  nodes=()
  for i in $(seq 0 $((count - 1))); do
    port=$((4711 + 2 * i))
    TOKIO_WORKER_THREADS=$(node_workers "$count") "$bin" serve --server comet \
      --tcp "127.0.0.1:$port" --store redis --redis-url "redis://127.0.0.1:$rport/" \
      --node-id "bench$i" "${layout[@]}" > "$dir/node$i.log" 2>&1 &
    nodes+=($!)
    wait_port "$port" 200
  done
  pids+=("$rpid" "${nodes[@]}")
  # A node refuses logins until its feed is subscribed (and its previous
  # life's presence reset): wait for the subscriptions, then a moment.
  for _ in $(seq 100); do
    subs=$(redis-cli -p "$rport" PUBSUB NUMSUB comet:all | tail -n 1)
    [ "$subs" = "$count" ] && break
    sleep 0.1
  done
  [ "$subs" = "$count" ] || { echo "the nodes did not subscribe to their feeds" >&2; exit 1; }
  sleep 0.5
}
cluster_down() {
  for p in "${nodes[@]}" "$rpid"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  pids=()
  sleep 1
}

for _ in $(seq "$runs"); do
  # One node, memory store.
  "$bin" serve --server comet --tcp 127.0.0.1:4701 "${layout[@]}" > "$dir/single.log" 2>&1 &
  pids+=($!)
  wait_port 4701 200
  run single 127.0.0.1:4701 "" "${fanout_max[@]}"
  run single 127.0.0.1:4701 "" "${fanout_rate[@]}"
  run single 127.0.0.1:4701 "" "${pairs_run[@]}"
  kill "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null || true
  unset 'pids[-1]'
  sleep 1

  # Three nodes, one Redis (AOF on, appendfsync everysec), a fresh one per run.
  cluster_up 3
  addrs=(127.0.0.1:4711 127.0.0.1:4713,127.0.0.1:4715)
  commands fanout cluster3 "${addrs[@]}" fanout --members 2000 --messages 20 -- "${fanout_max[@]}"
  run cluster3 "${addrs[@]}" "${fanout_rate[@]}"
  commands pairs cluster3 "${addrs[@]}" pairs --pairs "$pairs" --seconds 1 -- "${pairs_run[@]}"
  cluster_down

  # One node on Redis: the cluster path's latency without co-located nodes.
  cluster_up 1
  run cluster1 127.0.0.1:4711 "" "${fanout_rate[@]}"
  cluster_down
done

# The summary: medians over the runs, single node vs 3 nodes, against the
# targets of issue 12.
python3 - "$results" <<'EOF'
import json, statistics, sys
lines = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
def pick(setup, scenario, rate=None, of=None):
    out = []
    for v in lines:
        if v.get("setup") != setup or v.get("scenario") != scenario:
            continue
        if scenario == "fanout" and v.get("rate") != rate:
            continue
        if of is not None and v.get("of") != of:
            continue
        out.append(v)
    return out
def med(vs, f):
    xs = [f(v) for v in vs if f(v) is not None]
    return statistics.median(xs) if xs else None
def fmt(x, unit=""):
    return "—" if x is None else (f"{x:,.0f}{unit}" if x >= 100 else f"{x:.2f}{unit}")
rows = []
s, c = pick("single", "fanout"), pick("cluster3", "fanout")
a, b = med(s, lambda v: v["delivered_per_s"]), med(c, lambda v: v["delivered_per_s"])
ratio = b / a if a and b else None
rows.append(("fan-out 2,000 members, max rate (deliveries/s)", fmt(a), fmt(b),
             fmt(ratio, "×"), "≥ 0.5× single", ratio is not None and ratio >= 0.5))
s, c = pick("single", "fanout", 50), pick("cluster3", "fanout", 50)
a, b = med(s, lambda v: v["latency"]["p99_us"]), med(c, lambda v: v["latency"]["p99_us"])
rows.append(("fan-out 2,000 members at 50 msg/s (p99 µs)", fmt(a), fmt(b),
             "—" if a is None or b is None else f"{(b - a) / 1000:+.1f} ms", "≤ single + 3 ms",
             a is not None and b is not None and b <= a + 3000))
c1 = pick("cluster1", "fanout", 50)
b1 = med(c1, lambda v: v["latency"]["p99_us"])
rows.append(("the same on ONE node on Redis (p99 µs): the cluster path alone", fmt(a), fmt(b1),
             "—" if a is None or b1 is None else f"{(b1 - a) / 1000:+.1f} ms", "≤ single + 3 ms",
             a is not None and b1 is not None and b1 <= a + 3000))
s, c = pick("single", "pairs"), pick("cluster3", "pairs")
a, b = med(s, lambda v: 2 * v["round_trips_per_s"]), med(c, lambda v: 2 * v["round_trips_per_s"])
rows.append(("1:1 pairs across nodes (sends/s)", fmt(a), fmt(b),
             fmt(b / a if a and b else None, "×"), "≥ 20,000 sends/s", b is not None and b >= 20000))
ok = all(v.get("ok", True) for v in lines)
print()
print("| scenario | one node, memory | 3 nodes + Redis | ratio | target | met |")
print("|---|---|---|---|---|---|")
for r in rows:
    print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]} | {'yes' if r[5] else '**no**'} |")
print()
# Logins and logouts (2,000 of each in the fan-out) are subtracted with the
# baseline run, but they dwarf a fan-out's sends, so its totals are noisy;
# the send script's own commands per send are not.
print("| cluster scenario | sends counted | round trips/send | Redis commands/send | Redis µs/send | INCR / XADD / SISMEMBER / PUBLISH / SMEMBERS / EXISTS per send |")
print("|---|---|---|---|---|---|")
for of in ("fanout", "pairs"):
    vs = pick("cluster3", "redis-commands", of=of)
    per = " / ".join(fmt(med(vs, lambda v, c=c: v["calls"].get(c, 0) / max(v["sends"], 1)))
                     for c in ("incr", "xadd", "sismember", "publish", "smembers", "exists"))
    print(f"| {of} | {fmt(med(vs, lambda v: v['sends']))} | {fmt(med(vs, lambda v: v['round_trips_per_send']))} "
          f"| {fmt(med(vs, lambda v: v['commands_per_send']))} | {fmt(med(vs, lambda v: v['redis_us_per_send']))} | {per} |")
print()
print(f"every run delivered exactly once and in order: {'yes' if ok else '**NO**'}")
EOF
echo "results in $results"
