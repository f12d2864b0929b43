#!/usr/bin/env bash
# Runs every fuzz target for a bounded time (default 60 s each).
#   comet-core/fuzz/run.sh [SECONDS] [TARGET...]
# Needs cargo-fuzz (`cargo install cargo-fuzz`). libFuzzer needs nightly
# flags; on a stable toolchain RUSTC_BOOTSTRAP=1 enables them.
# A crash leaves its input in artifacts/<target>/; copy it into
# regressions/<target>/ (as crash-<name>) so `cargo test`
# (tests/fuzz_regressions.rs) keeps checking it forever. regressions/ also
# holds a few tens of inputs per target that fuzzing found to add coverage
# (cov-*): libFuzzer's -merge with -merge_control_file over corpus/ and
# work/, then a greedy pick of the inputs adding the most edges.
set -euo pipefail
cd "$(dirname "$0")"
seconds=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(tcp_decoder json_frame payloads batch_reader session)
export RUSTC_BOOTSTRAP=${RUSTC_BOOTSTRAP:-1}
status=0
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t" "artifacts/$t" "work/$t"
  echo "== $t for ${seconds}s"
  # New corpus entries go to work/; the seeds in corpus/ stay as committed.
  if ! cargo fuzz run "$t" "work/$t" "corpus/$t" "regressions/$t" -- \
      -max_total_time="$seconds" -max_len=4096 -rss_limit_mb=2048 \
      -artifact_prefix="artifacts/$t/" -print_final_stats=1; then
    if [ -n "$(ls -A "artifacts/$t" 2>/dev/null)" ]; then
      echo "!! $t found a crash: see artifacts/$t/"
    else
      echo "!! $t failed to build or run"
    fi
    status=1
  fi
done
exit $status
