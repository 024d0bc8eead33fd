#!/usr/bin/env bash
# A long stress run, with a churn-free baseline before it (same script run):
# the baseline gives the fault latency without churn; the soak (default 10
# minutes, memslot changes at 100/s) must see >= 10^4 memslot changes and
# >= 10^6 faults with every invariant held.
#
#   scripts/soak.sh [DURATION]        # e.g. 10m (default), 30m
set -euo pipefail
set -E
trap '__st=$?; if [ "$BASHPID" = "$$" ]; then printf "%s: line %s: \"%s\" failed (status %s)\n" "${BASH_SOURCE[0]##*/}" "$LINENO" "$BASH_COMMAND" "$__st" >&2; fi' ERR
cd "$(dirname "$0")/.."
d=${1:-10m}
scripts/setup.sh
cargo build --release -p vmm-cli >/dev/null
common=(--vcpus 3 --mem 512M --hotplug 512M --seed 11 --pattern mixed)
echo "== baseline: no churn, 60 s"
target/release/vmm stress "${common[@]}" --duration 60s --balloon-rate 0 --hotplug-rate 0 --memslot-rate 0
echo
echo "== soak: $d, balloon 2/s, hotplug 2/s, memslots 100/s"
target/release/vmm stress "${common[@]}" --duration "$d" --balloon-rate 2 --hotplug-rate 2 --memslot-rate 100
