#!/usr/bin/env bash
# Fault benchmark: the same guest under vcpu, handler, prefault and kernel
# modes (plus fault-around and memslot churn rows), side by side in one run.
# Extra arguments go to `vmm bench faults` (e.g. --pages 50000 --vcpus 1,2).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release -p vmm-cli >/dev/null
echo "\$ vmm bench faults $*"
exec target/release/vmm bench faults "$@"
