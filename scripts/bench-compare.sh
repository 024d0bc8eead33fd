#!/usr/bin/env bash
# Compare the fault benchmark of an older commit with the working tree, in
# one run: the old commit is built in a worktree beside this one, then both
# binaries run `vmm bench faults` alternately (old, new, old, new) so drift
# in the shared machine's load hits both alike.
#
#   scripts/bench-compare.sh OLD_REV [bench args, e.g. --vcpus 2 --pages 20000]
set -euo pipefail
set -E
trap '__st=$?; if [ "$BASHPID" = "$$" ]; then printf "%s: line %s: \"%s\" failed (status %s)\n" "${BASH_SOURCE[0]##*/}" "$LINENO" "$BASH_COMMAND" "$__st" >&2; fi' ERR
cd "$(dirname "$0")/.."
old=${1:?usage: scripts/bench-compare.sh OLD_REV [bench args]}
shift
args=("$@")
[ ${#args[@]} -gt 0 ] || args=(--vcpus 2 --pages 20000 --repeat 3)
scripts/setup.sh
cargo build --release -p vmm-cli >/dev/null
dir=${BENCH_OLD_DIR:-/tmp/vmm-bench-old}
if [ ! -d "$dir/.git" ] && [ ! -f "$dir/.git" ]; then
  git worktree add -f "$dir" "$old" >/dev/null
else
  git -C "$dir" checkout -q --detach "$old"
fi
echo "building $old in $dir"
# The binary's package: vmm-cli since the workspace split, vmm before.
(cd "$dir" && { cargo build --release -p vmm-cli >/dev/null 2>&1 || cargo build --release -p vmm >/dev/null; })
for round in 1 2; do
  for side in old new; do
    bin=target/release/vmm
    [ "$side" = old ] && bin=$dir/target/release/vmm
    echo "--- round $round: $side ($([ "$side" = old ] && echo "$old" || git rev-parse --short HEAD))"
    "$bin" bench faults "${args[@]}" | grep -E 'ratios|^vcpu |^handler |^kernel |^prefault ' || {
      echo "bench-compare: $side ($bin): vmm bench faults failed or printed none of the rows compared" >&2
      exit 1
    }
  done
done
