#!/usr/bin/env bash
# Host probe: how guest code at CPL3 vs CPL0 runs on this KVM, what exit a
# missing userfaultfd page gives at each level, and what KVM's dirty log
# (KVM_MEM_LOG_DIRTY_PAGES, KVM_GET_DIRTY_LOG) sees and costs (docs/ARCHITECTURE.md,
# docs/FAULT-PATH.md). Needs root and /dev/kvm.
set -euo pipefail
set -E
trap '__st=$?; if [ "$BASHPID" = "$$" ]; then printf "%s: line %s: \"%s\" failed (status %s)\n" "${BASH_SOURCE[0]##*/}" "$LINENO" "$BASH_COMMAND" "$__st" >&2; fi' ERR
cd "$(dirname "$0")"
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
gcc -O2 probes/cpl3.c -o "$out/cpl3"
# (|| true: on some hosts these runs end in an error; what they print is the finding)
echo "== 100M-iteration loop at CPL3 (native under PVM)"; "$out/cpl3" 100000000 0 || true
echo "== 1M-iteration loop at CPL0 (emulated under PVM)"; CPL0=1 "$out/cpl3" 1000000 0 || true
echo "== 20000 pages, host kernel fills, CPL3"; "$out/cpl3" 1 20000
echo "== 20000 pages, userfaultfd SIGBUS, CPL3 (expect a bare EFAULT)"; UFFD=1 "$out/cpl3" 1 20000 || true
echo "== 20000 pages, userfaultfd SIGBUS, CPL0 (expect MMIO exits)"; CPL0=1 UFFD=1 "$out/cpl3" 1 20000
echo "== 20000 pages written 3 times, no dirty log (rewrites run natively)"; PASSES=3 "$out/cpl3" 1 20000
echo "== the same with KVM's dirty log on the slot, fetched after each pass"; DIRTY=1 "$out/cpl3" 1 20000
echo "== the same at CPL0"; DIRTY=1 CPL0=1 "$out/cpl3" 1 20000
