#!/usr/bin/env bash
# The hostile-crowd test at a larger scale than CI runs it:
#   examples/scripts/hostile_crowd.sh [SCALE]     (default 10: 1,000 good clients, 100 bad of each kind)
# The test asserts delivery exactly once and in order for every acknowledged
# message, no good client disconnected, every bad client's outcome, and an
# RSS growth bound; it prints the counters at the end.
set -euo pipefail
cd "$(dirname "$0")/../.."
scale=${1:-10}
ulimit -n 20000 2>/dev/null || true
COMET_CROWD_SCALE=$scale cargo test --release --test hostile_crowd -- --nocapture
