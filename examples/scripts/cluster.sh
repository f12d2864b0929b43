#!/usr/bin/env bash
# A local comet cluster: one redis-server and N chat_server nodes sharing
# it (cluster mode, `[store] backend = "redis"`). Ctrl-C stops them all.
#
#   examples/scripts/cluster.sh [NODES] [BASE_PORT] [REDIS_PORT]
#                                (default 3, 3101, 6390)
#
# Node i (0-based) listens on TCP BASE_PORT+2i and WebSocket BASE_PORT+2i+1
# (`/sub`); a client may log in on any of them and talk to users on the
# others. Users 1..4 (mkey "k<mid>") and group 100 = {1, 2, 3}, as in
# examples/chat_server.toml. Redis keeps its AOF in a temporary directory
# removed at exit; logs go to that directory too (printed at start).
# Nodes sharing this machine get TOKIO_WORKER_THREADS = cores / NODES (at
# least 1) each, as docs/CLUSTER.md advises; NODE_WORKERS overrides it.
set -euo pipefail
cd "$(dirname "$0")/../.."
nodes=${1:-3}
base=${2:-3101}
redis_port=${3:-6390}

if ! command -v redis-server >/dev/null 2>&1; then
    echo "redis-server is missing: apt-get install -y --no-install-recommends redis-server" >&2
    exit 1
fi
# PROFILE=debug skips the release build (quicker to start, slower to run).
profile=${PROFILE:-release}
if [ "$profile" = release ]; then
    cargo build --release --example chat_server
else
    cargo build --example chat_server
fi
bin=target/$profile/examples/chat_server
cores=$(nproc)
workers=${NODE_WORKERS:-$(( cores / nodes > 0 ? cores / nodes : 1 ))}

dir=$(mktemp -d -t comet-cluster.XXXXXX)
pids=()
keep=0
stop() {
    trap - INT TERM EXIT
    echo "stopping ${#pids[@]} processes"
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    wait || true
    if [ "$keep" = 1 ]; then echo "logs kept in $dir" >&2; else rm -rf "$dir"; fi
}
trap 'stop; exit 0' INT TERM
trap stop EXIT

redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly yes \
    --dir "$dir" --daemonize no >"$dir/redis.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$redis_port") 2>/dev/null; then break; fi
    sleep 0.05
done

for i in $(seq 0 $((nodes - 1))); do
    tcp=$((base + 2 * i))
    ws=$((tcp + 1))
    cfg="$dir/node$i.toml"
    {
        printf '[server]\ntcp = "127.0.0.1:%d"\nwebsocket = "127.0.0.1:%d"\n' "$tcp" "$ws"
        printf '[store]\nbackend = "redis"\nurl = "redis://127.0.0.1:%d/"\n' "$redis_port"
        printf '[cluster]\nnode_id = "node%d"\n' "$i"
        for mid in 1 2 3 4; do printf '[[users]]\nmid = %d\nmkey = "k%d"\n' "$mid" "$mid"; done
        printf '[[groups]]\nid = 100\nmembers = [1, 2, 3]\n'
    } >"$cfg"
    TOKIO_WORKER_THREADS=$workers "$bin" --config "$cfg" >"$dir/node$i.log" 2>&1 &
    pids+=($!)
    echo "node$i: tcp 127.0.0.1:$tcp  ws ws://127.0.0.1:$ws/sub  ($workers worker threads)"
done
echo "redis on 127.0.0.1:$redis_port; logs in $dir; Ctrl-C stops all"
wait -n || true
keep=1
echo "a process exited early; stopping the rest" >&2
