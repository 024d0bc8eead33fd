#!/usr/bin/env bash
# Restore benchmark: a 1 GiB and a 4 GiB guest snapshotted after touching all
# of their RAM, restored in every mode (copy, map-private with a warm and a
# cold page cache, ondemand on the vCPU thread, ondemand on handler threads,
# ondemand with the recorded working set prefetched), then touching a 256 MiB
# working set (sequential, then random); side by side with the same guest in
# memory, in one run. Snapshots go to /var/tmp (sparse, as large as the RAM).
# Extra arguments go to `vmm bench restore` (e.g. --mem-mib 1024 --ws-mib 64).
set -euo pipefail
set -E
trap '__st=$?; if [ "$BASHPID" = "$$" ]; then printf "%s: line %s: \"%s\" failed (status %s)\n" "${BASH_SOURCE[0]##*/}" "$LINENO" "$BASH_COMMAND" "$__st" >&2; fi' ERR
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release -p vmm-cli >/dev/null
echo "\$ vmm bench restore $*"
target/release/vmm bench restore "$@"

# The micro Linux at its shell (the snapshot the tests cache; made by
# `cargo test --test linux_snapshot` or scripts/test.sh): restore call →
# the shell's answer to a command typed at once, in each way.
snap=$(ls -d /var/cache/vmm/snapshots/micro-shell-* 2>/dev/null | head -n 1 || true)
if [ -z "$snap" ]; then
  echo "no cached micro Linux snapshot (run scripts/test.sh once): Linux rows skipped"
  exit 0
fi
echo
echo "micro Linux at its shell ($(du -sh "$snap/memory" | cut -f1) of RAM in the snapshot): restore → answer"
python3 - "$snap" <<'PY'
import os, subprocess, sys, time
snap = sys.argv[1]
ways = [
    ("ondemand handler", ["--fault-mode", "handler"]),
    ("ondemand vcpu + prefetch all", ["--prefetch", "all"]),
    ("copy", ["--restore-mode", "copy"]),
    ("map-private", ["--restore-mode", "map-private", "--fault-mode", "kernel"]),
]
print(f"{'restore':<30} {'answer ms':>10}")
for name, args in ways:
    fd = os.open(os.path.join(snap, "memory"), os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    t0 = time.monotonic()
    p = subprocess.Popen(["target/release/vmm", "restore", "--snapshot", snap, "--quiet", *args],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    p.stdin.write(b"echo RESTORED-$((40+2))\n")
    p.stdin.flush()
    answer = None
    for line in p.stdout:
        if b"RESTORED-42" in line:
            answer = time.monotonic() - t0
            break
    p.kill()
    p.wait()
    print(f"{name:<30} {answer * 1e3 if answer else float('nan'):>10.1f}")
PY
