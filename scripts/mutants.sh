#!/usr/bin/env bash
# Plant each defect the fault protocol must not have into a copy of the
# `memslots` crate and run its loom models there: every planted defect must
# make a model fail (the checks in the production code have teeth). Prints
# which model caught each one; exits non-zero if a defect went unnoticed.
#
#   scripts/mutants.sh            # all mutants
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export CARGO_TARGET_DIR=$ROOT/target/loom-mutants
export RUSTFLAGS="--cfg loom"
export RUST_BACKTRACE=0

# name | file | python regex to delete or replace (must match once) | replacement
MUTANTS=(
  "no I3 re-check under the guard|src/driver.rs|        Content::Source\(_\) if slot\.is_discarded\(index\) => Content::Zero,\n|"
  "no I6 plugged check under the guard|src/driver.rs|    if !slot\.is_plugged\(index\) \{\n        return Err\(ResolveError::NotPlugged \{ gpa \}\);\n    \}\n|"
  "the faulting access is never completed (I2)|src/driver.rs|    installer\.complete\(slot, guard\);\n|"
  "trylock ignores a slot being removed (I1)|src/slot.rs|        if !self\.valid\.load\(Ordering::Acquire\) \{\n            return Err\(Bail::SlotInvalid\);\n        \}\n        // I1: a table changed|        // I1: a table changed"
  "trylock ignores the generation|src/slot.rs|        if current\.load\(Ordering::Acquire\) != generation \{\n            return Err\(Bail::GenerationChanged\);\n        \}\n|"
)

fails=0
for m in "${MUTANTS[@]}"; do
  IFS='|' read -r name file pattern replacement <<<"$m"
  rm -rf "$WORK/memslots"
  cp -r vmm/memslots "$WORK/memslots"
  # Standalone copy: its own lints table instead of the workspace's.
  sed -i '/^\[lints\]/,$d' "$WORK/memslots/Cargo.toml"
  printf '[lints.rust]\nunexpected_cfgs = { level = "warn", check-cfg = ["cfg(loom)"] }\n\n[workspace]\n' >>"$WORK/memslots/Cargo.toml"
  python3 - "$WORK/memslots/$file" "$pattern" "$replacement" <<'PY'
import re, sys
path, pattern, repl = sys.argv[1], sys.argv[2], sys.argv[3].encode().decode('unicode_escape')
s = open(path).read()
new, n = re.subn(pattern, lambda _: repl, s)
if n != 1:
    sys.exit(f"mutant pattern matched {n} times in {path}: {pattern!r}")
open(path, 'w').write(new)
PY
  out=$(cd "$WORK/memslots" && cargo test --release --lib -- --test-threads=1 model:: 2>&1) && status=0 || status=$?
  caught=$(printf '%s\n' "$out" | sed -n 's/^test model::\([a-z0-9_]*\) \.\.\. FAILED$/\1/p' | paste -sd, -)
  if [ "$status" -ne 0 ] && [ -n "$caught" ]; then
    printf 'mutant caught   %-55s by %s\n' "$name" "$caught"
  else
    printf 'MUTANT SURVIVED %-55s (status %s)\n' "$name" "$status"
    printf '%s\n' "$out" | tail -n 20
    fails=$((fails + 1))
  fi
done
[ "$fails" -eq 0 ] || { echo "mutants.sh: $fails planted defect(s) went unnoticed" >&2; exit 1; }
echo "mutants.sh: every planted defect was caught"
