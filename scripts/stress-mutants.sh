#!/usr/bin/env bash
# Plant each defect the checks exist to find into a copy of the VMM and
# require the named check to fail for the named reason: for the stress
# invariants a short `vmm stress` must report violations of that invariant
# found by its own checks (I2 "lost": bad words the guest re-read, not a
# guest that merely never reported, unless the mutant names that reason;
# the snapshot mutants run it across a snapshot and restore, `--restore-at`);
# a `test:` mutant's unit test must fail with its named message (a race a
# short stress run hits only sometimes, the dirty ring's defences against a
# host that writes past it); an `itest:` mutant's integration test must fail
# with its named message (live migration between two vmm processes: the
# destination's guest finds bad words).
#
# A catch counts only against a control: the same stress runs and tests on
# the unplanted tree (the main tree's own build), in the same run, first,
# must pass; the script says so when one does not, and fails. With
# CONTROL_LOGS=DIR (scripts/test.sh: its test binaries' logs), a unit or
# migration test that passed there in this run is its own control.
#
# All mutants are planted into one copy at once, each behind a switch read
# from the environment (VMM_MUTANT=ID[,ID]: a mutant schema, as mutation
# testers build them), so the copy is built once instead of once per
# mutant (which took ~2 min each on 2 cores); each run switches on only its
# own mutant. The production tree never holds a switch.
#
# Exits non-zero if a planted defect went unseen, was seen for another
# reason, or its control failed.
#
#   scripts/stress-mutants.sh            # all mutants
#   scripts/stress-mutants.sh prefetch   # only those whose name contains "prefetch"
set -euo pipefail
set -E
trap 'rc=$?; printf "%s: line %s: \"%s\" failed (status %s)\n" "${BASH_SOURCE[0]##*/}" "$LINENO" "$BASH_COMMAND" "$rc" >&2' ERR
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=$ROOT/target/stress-mutants/src
LOGS=$ROOT/target/stress-mutants/logs
SCHEMA_TARGET=$ROOT/target/stress-mutants/target

# id | name | check | file | python regex (must match once) | replacement
#    | extra stress args | more ids switched on with it
# check: INVARIANT[:REASON] for a stress run (I2:lost = bad words the guest
# re-read; I2:no-report = the guest never reported, named as such);
# test:CRATE:TEST:MESSAGE (a unit test must fail with MESSAGE, a regex);
# itest:CRATE:FILE:TEST:MESSAGE (an integration test, likewise; " OR "
# between alternatives, as "|" separates the fields here).
# In the replacement, GUARD is the mutant's switch (a bool expression) and
# \1.. the pattern's groups; \n is a newline.
MUTANTS=(
  "discard|a discard does not zap the pages|I3|vmm/memory/src/manager.rs|(\n    let r = )(madvise\(hva, len, libc::MADV_DONTNEED, \"MADV_DONTNEED\"\));(\n    slot\.backing\.mark_changed\(gpa - slot\.gpa, len\);\n    drop\(exclusive\);\n    r\n\})|\1if GUARD { Ok(()) } else { \2 };\3||"
  "unplug|an unplug does not zap the block|I6|vmm/memory/src/manager.rs|(\n        let r = )(madvise\(hva, len, libc::MADV_DONTNEED, \"MADV_DONTNEED\"\));(\n        slot\.backing\.mark_changed\(gpa - slot\.gpa, len\);\n        drop\(exclusive\);\n        r\n    \}\n\n    fn range_in_slot)|\1if GUARD { Ok(()) } else { \2 };\3||"
  # Blocks must still hold pages when their slice goes: the unplug mutant
  # is switched on with it.
  "removal|neither unplug nor slot removal drops pages|I1|vmm/memory/src/manager.rs|let zapped = (madvise\(hva, slot\.size, libc::MADV_DONTNEED, \"MADV_DONTNEED\"\));|let zapped = if GUARD { Ok(()) } else { \1 };||unplug"
  "lostwrite|a write completed through an exit is dropped|I2:lost|vmm/fault/src/engine.rs|(unsafe \{ std::ptr::write_volatile\(\(hva \+ i as u64\) as \*mut u8, \*b\) \};)|if GUARD { let _ = (hva, i, b); } else { \1 }||"
  "uncounted|a speculative install is not counted|I4|vmm/fault/src/engine.rs|Path::Speculative => (stats\.add\(ThreadStat::SpeculativeInstalls, 1\)),|Path::Speculative => if !GUARD { \1 },||"
  "regs|a restore skips the vCPU's registers|I2:no-report|vmm/src/vcpu/state.rs|(        kvm\(\"KVM_SET_REGS\", fd\.set_regs\(&self\.regs\)\)\?;\n)|        if !GUARD {\n\1        }\n|--restore-at 3s|"
  "prefetch|a prefetch overwrites a page a vCPU installed|test:vmm-fault:prefetch_keeps_what_a_vcpu_installed:page 40 after the prefetch|vmm/fault/src/engine.rs|(Ok\(uffd::Install::Exists\(_\)\) => \{\n)|\1if GUARD && self.prefetch { unsafe { std::ptr::copy_nonoverlapping(self.ctx.bounce.as_ptr().cast::<u8>(), hva as *mut u8, PAGE_SIZE as usize) }; }\n||"
  "holes|a copy restore fills the holes|R1|vmm/memory/src/snapshot.rs|for \(p, n\) in s\.data_runs\(RUN\)|for (p, n) in s.data_runs(RUN).take(if GUARD { 0 } else { usize::MAX }).chain((0..if GUARD { s.pages() } else { 0 }).step_by(RUN as usize).zip(std::iter::repeat(RUN)))|--restore-at 3s --restore-mode copy|"
  # The dirty ring's defences against a host that writes past it (unit
  # tests against a model of the kernel's ring).
  "ringfill|an overflowed dirty ring is not counted whole|test:vmm-memory:a_ring_written_past_its_end:all pages, once|vmm/memory/src/ring.rs|(            bits\.fill\(u64::MAX\);)|            if !GUARD {\n\1\n            }||"
  "astray|a full vCPU's astray ring is not scanned|test:vmm-memory:a_full_vcpu_with_entries_away:is scanned for entries away|vmm/memory/src/ring.rs|let astray = full == Some\(i\)|let astray = !GUARD && full == Some(i)||"
  "resetcount|KVM's reset count is not checked|test:vmm-memory:an_entry_overwritten_between:an entry overwritten before the reset|vmm/memory/src/ring.rs|if in_step \&\& cleared < marked \{|if !GUARD && in_step && cleared < marked {||"
  "wedged|a wedged vCPU spins on its full ring|test:vmm-memory:a_vcpu_whose_full_ring_never_yields:is reported stuck|vmm/memory/src/ring.rs|if r\.empty_fulls >= WEDGED \{|if !GUARD && r.empty_fulls >= WEDGED {||"
  # Live migration, between two vmm processes (the integration test fails:
  # the destination's guest finds bad words).
  "dirtyskip|a migration round skips the pages KVM logged|itest:vmm-cli:migrate:a_guest_migrated_while_writing_finds_every_page:errors=[1-9]|vmm/memory/src/migrate.rs|if !first \&\& !bit\(&changed, p\) \{|if !first && !(!GUARD && bit(&changed, p)) {||"
  # Reading a page before it arrives shows as bad words in the guest's
  # data, or (about one run in six) as the guest's own code read as zeros:
  # the destination's guest triple-faults. Both are this defect, named.
  "postcopyread|a vCPU reads a page post-copy has not brought|itest:vmm-cli:migrate:postcopy_runs_the_guest_at_once_and_every_page_follows:errors=[1-9] OR triple-faulted|vmm/src/snapshot/postcopy.rs|(            g = self\.cond\.wait\(g\)\.unwrap_or_else\(.e. e\.into_inner\(\)\);)|            if GUARD {\n                return Ok(());\n            }\n\1||"
)

ONLY=${1:-}
SELECTED=()
for m in "${MUTANTS[@]}"; do
  IFS='|' read -r _ name _ <<<"$m"
  [[ -z $ONLY || $name == *"$ONLY"* ]] && SELECTED+=("$m")
done
[ ${#SELECTED[@]} -gt 0 ] || { echo "stress-mutants.sh: no mutant matches '$ONLY'" >&2; exit 1; }
mkdir -p "$LOGS"
rm -f "$LOGS"/*

# parse CHECK: "kind crate file test message" (stress: "stress - - - -").
parse() {
  local kind crate file test msg
  case $1 in
    test:*) IFS=: read -r kind crate test msg <<<"$1"; file=- ;;
    itest:*) IFS=: read -r kind crate file test msg <<<"$1" ;;
    *) echo "stress - - - -"; return ;;
  esac
  printf '%s %s %s %s %s\n' "$kind" "$crate" "$file" "$test" "${msg// OR /|}"
}
# stress_args CHECK EXTRA: the stress command's arguments for a mutant.
stress_args() {
  # I1's mutant shows only where a removed slot still held pages: a few
  # in 800 removals in 8 s (none in one loaded run), so it runs longer.
  local duration=8s
  [ "${1%%:*}" = I1 ] && duration=30s
  echo "--json --duration $duration --vcpus 2 --mem 256M --hotplug 256M --seed 3 $2"
}
# stress VMM LOG ARGS...: run `VMM stress ARGS`; the JSON report in LOG.json,
# stderr in LOG.err, the exit status echoed.
stress() {
  local vmm=$1 log=$2 status=0
  shift 2
  # shellcheck disable=SC2068
  "$vmm" stress $@ >"$log.json" 2>"$log.err" || status=$?
  echo "$status"
}
# run_test DIR TARGET_DIR LOG KIND CRATE FILE TEST: one unit (test) or
# integration (itest) test of the tree in DIR; its output in LOG, the
# status echoed.
run_test() {
  local dir=$1 tdir=$2 log=$3 kind=$4 crate=$5 file=$6 test=$7 which=(--lib) status=0
  [ "$kind" = itest ] && which=(--test "$file")
  (cd "$dir" && CARGO_TARGET_DIR=$tdir cargo test --release -q -p "$crate" "${which[@]}" -- "$test") \
    >"$log" 2>&1 || status=$?
  echo "$status"
}
# verdict CHECK REPORT: "<evidence> <checks> <ok>" for CHECK's invariant
# (evidence: violations found by the named reason's own checks), or
# "no-report 0 False".
verdict() {
  python3 - "$1" "$2" <<'PY'
import json, sys
check, path = sys.argv[1], sys.argv[2]
inv, _, reason = check.partition(':')
try:
    r = json.load(open(path))
except Exception:
    print("no-report 0 False"); sys.exit()
i = next(x for x in r["invariants"] if x["name"] == inv)
g = r.get("guest", {})
if reason == "lost":
    # Bad words the guest found on re-reading, not a guest that stopped.
    evidence = (g.get("worker_bad", 0) + g.get("pattern_bad", 0)) if g else 0
elif reason == "no-report":
    evidence = 0 if g else 1
else:
    evidence = i["violations"]
print(evidence, i["checks"], r["ok"])
PY
}
# clean REPORT: empty if the report is whole and clean, else what is wrong.
clean() {
  python3 - "$1" <<'PY'
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except Exception:
    print("no report"); sys.exit()
v = [f'{i["name"]}: {i["violations"]} violations' for i in r["invariants"] if i["violations"]]
if not r.get("guest"):
    v.append("the guest gave no report")
print("; ".join(v))
PY
}
key_of() { # key_of KIND CHECK EXTRA TEST: what a control stands for.
  if [ "$1" = stress ]; then echo "stress $(stress_args "$2" "$3")"; else echo "$1 $4"; fi
}

# ------------------------------------------- controls: the unplanted tree
t0=$(date +%s)
echo "control: the unplanted tree (the main tree's own build)"
cargo build --release -q -p vmm-cli
declare -A CONTROL=()
n=0
for m in "${SELECTED[@]}"; do
  IFS='|' read -r id name check file pattern replacement extra also <<<"$m"
  read -r kind crate tfile test msg <<<"$(parse "$check")"
  key=$(key_of "$kind" "$check" "$extra" "$test")
  [ -n "${CONTROL[$key]:-}" ] && continue
  n=$((n + 1))
  log=$LOGS/control-$n
  if [ "$kind" = stress ]; then
    # shellcheck disable=SC2046
    status=$(stress "$ROOT/target/release/vmm" "$log" $(stress_args "$check" "$extra"))
    bad=$(clean "$log.json")
    if [ "$status" -eq 0 ] && [ -z "$bad" ]; then CONTROL[$key]=pass; else CONTROL[$key]="fail (exit $status: ${bad:-?}; $log.err)"; fi
  elif [ -n "${CONTROL_LOGS:-}" ] && grep -lqE "^test (\S*::)?$test\S* \.\.\. ok$" "$CONTROL_LOGS"/*.log 2>/dev/null; then
    # The same test passed on the unplanted tree earlier in this run
    # (scripts/test.sh's test binaries): that is its control.
    CONTROL[$key]="pass (in $(grep -lE "^test (\S*::)?$test\S* \.\.\. ok$" "$CONTROL_LOGS"/*.log | head -n1))"
  else
    status=$(run_test "$ROOT" "$ROOT/target" "$log" "$kind" "$crate" "$tfile" "$test")
    if [ "$status" -eq 0 ] && grep -q "test result: ok. [1-9]" "$log"; then
      CONTROL[$key]=pass
    else
      CONTROL[$key]="fail (exit $status; $log)"
    fi
  fi
  printf 'control %-74s %s\n' "$key" "${CONTROL[$key]}"
done
echo "controls done in $(($(date +%s) - t0)) s"

# ------------------------------------------- the schema: every mutant, switched
t1=$(date +%s)
rm -rf "$WORK"
mkdir -p "$WORK" "$SCHEMA_TARGET"
# The tree as git sees it (tracked and untracked, not ignored files), file
# times kept; its build starts from the main tree's (same sources, same
# times: cargo takes it as built), so only the planted crates and their
# dependents are compiled.
git ls-files -z -co --exclude-standard | tar --null -T - -cf - | tar -xf - -C "$WORK"
rm -rf "$SCHEMA_TARGET/release"
cp -a target/release "$SCHEMA_TARGET/release"
for m in "${MUTANTS[@]}"; do
  IFS='|' read -r id name check file pattern replacement extra also <<<"$m"
  python3 - "$WORK/$file" "$id" "$pattern" "$replacement" <<'PY'
import re, sys
path, mid, pattern, repl = sys.argv[1:5]
guard = ('{ static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new(); '
         '*ON.get_or_init(|| std::env::var("VMM_MUTANT")'
         f'.is_ok_and(|v| v.split(\',\').any(|m| m == "{mid}"))) }}')
s = open(path).read()
repl = repl.replace('\\n', '\n').replace('GUARD', guard)
# Groups by hand (\1..\9): the Rust code is no regex template.
new, n = re.subn(pattern, lambda m: re.sub(r'\\([1-9])', lambda g: m.group(int(g.group(1))), repl), s)
if n != 1:
    sys.exit(f"mutant {mid}: pattern matched {n} times in {path}: {pattern!r}")
open(path, 'w').write(new)
PY
done
echo "schema: building the copy with every mutant behind its switch"
if ! (cd "$WORK" && CARGO_TARGET_DIR=$SCHEMA_TARGET cargo build --release -q -p vmm-cli 2>"$LOGS/build.log"); then
  tail -n 30 "$LOGS/build.log"; echo "stress-mutants.sh: the mutant schema does not build" >&2; exit 1
fi
echo "schema built in $(($(date +%s) - t1)) s"

# ------------------------------------------------------------------ mutants
fails=0
for m in "${SELECTED[@]}"; do
  IFS='|' read -r id name check file pattern replacement extra also <<<"$m"
  read -r kind crate tfile test msg <<<"$(parse "$check")"
  key=$(key_of "$kind" "$check" "$extra" "$test")
  if [[ ${CONTROL[$key]} != pass* ]]; then
    printf 'NOT COUNTED     %-46s its control failed on the unplanted tree: %s\n' "$name" "${CONTROL[$key]}"
    fails=$((fails + 1)); continue
  fi
  export VMM_MUTANT=$id${also:+,$also}
  log=$LOGS/$id
  if [ "$kind" != stress ]; then
    # A race a short stress run hits only sometimes: a unit test that sets
    # it up every time (real userfaultfd, no KVM) must fail instead. An
    # `itest` is an integration test (real KVM, vmm processes).
    status=$(run_test "$WORK" "$SCHEMA_TARGET" "$log" "$kind" "$crate" "$tfile" "$test")
    if [ "$status" -eq 0 ]; then
      printf 'MUTANT SURVIVED %-46s %s passed\n' "$name" "$test"; fails=$((fails + 1))
    elif grep -q "error\[E[0-9]*\]\|could not compile" "$log"; then
      echo "MUTANT DID NOT BUILD: $name"; tail -n 20 "$log"; fails=$((fails + 1))
    elif grep -qE -- "$msg" "$log"; then
      printf 'mutant caught   %-46s %s failed: %s\n' "$name" "$test" "$(grep -oE -m1 -- ".{0,30}$msg.{0,30}" "$log" | head -n1)"
    else
      printf 'WRONG REASON    %-46s %s failed, but not with /%s/ (%s)\n' "$name" "$test" "$msg" "$log"
      grep -A3 "panicked" "$log" | head -n 12; fails=$((fails + 1))
    fi
  else
    # shellcheck disable=SC2046
    status=$(stress "$SCHEMA_TARGET/release/vmm" "$log" $(stress_args "$check" "$extra"))
    read -r evidence checks ok <<<"$(verdict "$check" "$log.json")"
    if [ "$status" -ne 0 ] && [ "$evidence" != no-report ] && [ "$evidence" -gt 0 ]; then
      printf 'mutant caught   %-46s %s: %s found in %s checks (exit %s)\n' "$name" "$check" "$evidence" "$checks" "$status"
    else
      printf 'MUTANT SURVIVED %-46s %s: evidence %s, checks %s, ok %s (exit %s; %s.err)\n' "$name" "$check" "$evidence" "$checks" "$ok" "$status" "$log"
      fails=$((fails + 1))
    fi
  fi
  unset VMM_MUTANT
done
echo "stress-mutants.sh: $(($(date +%s) - t0)) s"
[ "$fails" -eq 0 ] || { echo "stress-mutants.sh: $fails planted defect(s) went unseen, were seen for another reason, or had a failing control" >&2; exit 1; }
echo "stress-mutants.sh: every planted defect was seen by its check, each against a passing control"
