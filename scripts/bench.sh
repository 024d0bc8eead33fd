#!/usr/bin/env bash
# Fault benchmark: the same guest under vcpu, handler, prefault and kernel
# modes (plus fault-around and memslot churn rows), side by side in one run.
# Extra arguments go to `vmm bench faults` (e.g. --pages 50000 --vcpus 1,2).
# Plots of the run (pages/s and cost per page by row and vCPU count, each
# row's fault-latency distribution) go to $OUT: by default docs/plots/bench,
# or docs/plots/bench-<flags> for another table (--source file, --hugepages,
# --busy N; sizes and repeats do not change the table's rows).
set -euo pipefail
set -E
trap '__st=$?; if [ "$BASHPID" = "$$" ]; then printf "%s: line %s: \"%s\" failed (status %s)\n" "${BASH_SOURCE[0]##*/}" "$LINENO" "$BASH_COMMAND" "$__st" >&2; fi' ERR
cd "$(dirname "$0")/.."
variant=""
skip=0
for a in "$@"; do
  if [ $skip = 1 ]; then skip=0; continue; fi
  case $a in
    --vcpus|--pages|--repeat|--fault-around|--churn-hz) skip=1 ;;
    --vcpus=*|--pages=*|--repeat=*|--fault-around=*|--churn-hz=*) ;;
    *) variant="$variant-$(printf '%s' "$a" | tr -c 'a-zA-Z0-9' '-' | sed 's/^-*//')" ;;
  esac
done
out=${OUT:-docs/plots/bench$variant}
scripts/setup.sh
cargo build --release -p vmm-cli >/dev/null
data=$(mktemp -d)
trap 'rm -rf "$data"' EXIT
echo "\$ vmm bench faults $*"
target/release/vmm bench faults "$@" --plot-data "$data"
scripts/plot-faults.sh "$data" "$out"
