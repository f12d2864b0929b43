#!/usr/bin/env bash
# Runs the SIGKILL crash test of the embedded store (tests/crash.rs) for
# many rounds: a real chat_server process is killed at a random moment while
# senders pipeline into it, restarted on the same store, and every
# acknowledged send must be in the op 22 replay with its chatId and bytes.
#
#   examples/scripts/crash_loop.sh [ROUNDS] [REPEATS]   (default 50 and 1)
#
# ROUNDS kill/restart rounds per test run (one store directory), REPEATS
# test runs (each a fresh directory).
set -euo pipefail
cd "$(dirname "$0")/../.."
rounds=${1:-50}
repeats=${2:-1}
# Builds the chat_server example too.
cargo build --example chat_server
cargo test --test crash --no-run
for i in $(seq 1 "$repeats"); do
    echo "crash run $i/$repeats: $rounds rounds"
    CRASH_ITERATIONS=$rounds cargo test -q --test crash -- --nocapture
done
