#!/usr/bin/env bash
# Fault benchmark: the same guest under vcpu, handler, prefault and kernel
# modes (plus fault-around and memslot churn rows), side by side in one run.
# Extra arguments go to `vmm bench faults` (e.g. --pages 50000 --vcpus 1,2).
# Plots of the run (pages/s and cost per page by row and vCPU count, each
# row's fault-latency distribution) go to $OUT (default docs/plots/bench).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-docs/plots/bench}
scripts/setup.sh
cargo build --release -p vmm-cli >/dev/null
data=$(mktemp -d)
trap 'rm -rf "$data"' EXIT
echo "\$ vmm bench faults $*"
target/release/vmm bench faults "$@" --plot-data "$data"
scripts/plot-faults.sh "$data" "$out"
