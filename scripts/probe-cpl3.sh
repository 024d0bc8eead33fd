#!/usr/bin/env bash
# Host probe: how guest code at CPL3 vs CPL0 runs on this KVM, and what exit a
# missing userfaultfd page gives at each level (docs/ARCHITECTURE.md,
# docs/FAULT-PATH.md). Needs root and /dev/kvm.
set -euo pipefail
cd "$(dirname "$0")"
out=$(mktemp -d)
gcc -O2 probes/cpl3.c -o "$out/cpl3"
echo "== 100M-iteration loop at CPL3 (native under PVM)"; "$out/cpl3" 100000000 0 || true
echo "== 1M-iteration loop at CPL0 (emulated under PVM)"; CPL0=1 "$out/cpl3" 1000000 0 || true
echo "== 20000 pages, host kernel fills, CPL3"; "$out/cpl3" 1 20000
echo "== 20000 pages, userfaultfd SIGBUS, CPL3 (expect a bare EFAULT)"; UFFD=1 "$out/cpl3" 1 20000 || true
echo "== 20000 pages, userfaultfd SIGBUS, CPL0 (expect MMIO exits)"; CPL0=1 UFFD=1 "$out/cpl3" 1 20000
rm -rf "$out"
