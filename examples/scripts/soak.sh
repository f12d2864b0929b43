#!/usr/bin/env bash
# Soak: steady mixed load with churn for SECONDS (default 600), sampling RSS,
# open fds and queue depths every second into soak.csv; exits non-zero if
# memory or descriptors keep growing after the warm-up.
#   examples/scripts/soak.sh [SECONDS] [CLIENTS] [RATE]
set -euo pipefail
cd "$(dirname "$0")/../.."
ulimit -n 20000 2>/dev/null || true
cargo run --release --example soak -- --seconds "${1:-600}" --clients "${2:-2000}" --rate "${3:-2000}" --warmup 30 --csv soak.csv
