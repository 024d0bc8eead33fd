#!/usr/bin/env bash
# Plant each defect the fault protocol must not have into a copy of the
# `memslots` crate and run its loom models there: every planted defect must
# make its named model fail for its named reason (the checks in the
# production code have teeth). First a control: the same models on the
# unplanted copy must pass in this run, else no catch means anything.
# Prints which model caught each defect and why; exits non-zero if a defect
# went unnoticed or was "caught" only by the wrong model or for the wrong
# reason.
#
#   scripts/mutants.sh            # all mutants
#   scripts/mutants.sh I1         # only those whose name contains "I1"
set -euo pipefail
set -E
trap 'rc=$?; printf "%s: line %s: \"%s\" failed (status %s)\n" "${BASH_SOURCE[0]##*/}" "$LINENO" "$BASH_COMMAND" "$rc" >&2' ERR
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
# Outside the clone (like the image cache): loom and its dependencies stay
# built across clones (VMM_CARGO_CACHE moves it).
export CARGO_TARGET_DIR=${VMM_CARGO_CACHE:-/var/cache/vmm/cargo}/loom-mutants
export RUSTFLAGS="--cfg loom"
export RUST_BACKTRACE=0

# name | file | python regex to delete or replace (must match once) | replacement
#      | the model that must fail | the panic message it must fail with
MUTANTS=(
  "no I3 re-check under the guard|src/driver.rs|        Content::Source\(_\) if slot\.is_discarded\(index\) => Content::Zero,\n||i3_discarded_page_refaults_as_zero|I3 violated"
  "no I6 plugged check under the guard|src/driver.rs|    if !slot\.is_plugged\(index\) \{\n        return Err\(ResolveError::NotPlugged \{ gpa \}\);\n    \}\n||i6_no_install_into_an_unplugged_block|I6 violated"
  "the faulting access is never completed (I2)|src/driver.rs|    installer\.complete\(slot, guard\);\n||i2_two_writers_one_install_no_lost_write|I2 violated"
  # A removal both marks the slot invalid and bumps the generation, so
  # either check alone keeps I1 in every interleaving the model explores
  # (without the validity check only its coverage count fails: no bail
  # names an invalid slot). I1 itself breaks when trylock checks neither.
  "trylock ignores a slot being removed (I1)|src/slot.rs|        if !self\.valid\.load\(Ordering::Acquire\) \{\n            return Err\(Bail::SlotInvalid\);\n        \}\n        // I1: a table changed since the snapshot may no longer hold the slot\.\n        if current\.load\(Ordering::Acquire\) != generation \{\n            return Err\(Bail::GenerationChanged\);\n        \}\n|        let _ = (generation, current);\n|i1_no_install_after_removal|I1 violated"
  # Without the generation check nothing unsafe happens in the model (a
  # removal is also seen as an invalid slot); what fails is the protocol's
  # own promise that a table change makes a speculative install retry.
  "trylock ignores the generation|src/slot.rs|        if current\.load\(Ordering::Acquire\) != generation \{\n            return Err\(Bail::GenerationChanged\);\n        \}\n||generation_change_retries_and_installs|no interleaving made the installer retry"
)

# copy: a standalone copy of the memslots crate in $WORK/memslots.
copy() {
  rm -rf "$WORK/memslots"
  cp -r vmm/memslots "$WORK/memslots"
  # Standalone copy: its own lints table instead of the workspace's.
  sed -i '/^\[lints\]/,$d' "$WORK/memslots/Cargo.toml"
  printf '[lints.rust]\nunexpected_cfgs = { level = "warn", check-cfg = ["cfg(loom)"] }\n\n[workspace]\n' >>"$WORK/memslots/Cargo.toml"
}
# models: run the loom models of the copy; output in $WORK/out, status echoed.
models() {
  local status=0
  (cd "$WORK/memslots" && cargo test --release --lib -- --test-threads=1 model::) >"$WORK/out" 2>&1 || status=$?
  echo "$status"
}
# failed_for TEST: the panic message(s) of a failed model TEST (its section
# of the failures list), empty if it did not fail.
failed_for() {
  python3 - "$WORK/out" "$1" <<'PY'
import re, sys
out, test = open(sys.argv[1]).read(), sys.argv[2]
if not re.search(rf'^test model::{test} \.\.\. FAILED$', out, re.M):
    sys.exit()
m = re.search(rf'^---- model::{test} stdout ----\n(.*?)(?=^---- |^failures:$)', out, re.M | re.S)
# The panic message: the lines after "panicked at", up to the note.
msg = re.search(r"panicked at [^\n]*\n(.*?)(?=^note: |\Z)", m.group(1), re.M | re.S) if m else None
print(msg.group(1).strip() if msg else '(no panic message)')
PY
}

copy
status=$(models)
if [ "$status" -ne 0 ]; then
  tail -n 30 "$WORK/out"
  echo "mutants.sh: control run failed: the models fail on the unplanted tree (status $status), so no catch would mean anything" >&2
  exit 1
fi
echo "control: every loom model passes on the unplanted tree"

ONLY=${1:-}
fails=0
for m in "${MUTANTS[@]}"; do
  IFS='|' read -r name file pattern replacement test reason <<<"$m"
  [[ -z $ONLY || $name == *"$ONLY"* ]] || continue
  copy
  python3 - "$WORK/memslots/$file" "$pattern" "$replacement" <<'PY'
import re, sys
path, pattern, repl = sys.argv[1], sys.argv[2], sys.argv[3].encode().decode('unicode_escape')
s = open(path).read()
new, n = re.subn(pattern, lambda _: repl, s)
if n != 1:
    sys.exit(f"mutant pattern matched {n} times in {path}: {pattern!r}")
open(path, 'w').write(new)
PY
  status=$(models)
  msg=$(failed_for "$test")
  others=$(sed -n 's/^test model::\([a-z0-9_]*\) \.\.\. FAILED$/\1/p' "$WORK/out" | paste -sd, -)
  if [ "$status" -ne 0 ] && [ -n "$msg" ] && grep -qF -- "$reason" <<<"$msg"; then
    printf 'mutant caught   %-46s by %s: %s\n' "$name" "$test" \
      "$(grep -F -m1 -- "$reason" <<<"$msg" | cut -c1-100)"
  else
    printf 'MUTANT SURVIVED %-46s %s did not fail with "%s" (status %s; failed: %s)\n' \
      "$name" "$test" "$reason" "$status" "${others:-none}"
    tail -n 20 "$WORK/out"
    fails=$((fails + 1))
  fi
done
[ "$fails" -eq 0 ] || { echo "mutants.sh: $fails planted defect(s) went unnoticed or were caught for the wrong reason" >&2; exit 1; }
echo "mutants.sh: every planted defect was caught by its model, for its reason"
