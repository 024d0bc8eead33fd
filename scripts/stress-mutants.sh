#!/usr/bin/env bash
# Plant each defect the checks exist to find into a copy of the VMM, build
# it, and require the matching check to fail: for the stress invariants a
# short `vmm stress` must report violations of that invariant (and fail;
# the snapshot mutants run it across a snapshot and restore,
# `--restore-at`); a `test:` mutant's unit test must fail (a race a short
# stress run hits only sometimes, the dirty ring's defences against a host
# that writes past it); an `itest:` mutant's integration test must fail
# (live migration between two vmm processes: the destination's guest finds
# bad words). Exits non-zero if a planted defect went unseen.
#
#   scripts/stress-mutants.sh            # all mutants (a build and a short run each)
#   scripts/stress-mutants.sh prefetch   # only those whose name contains "prefetch"
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=$ROOT/target/stress-mutants/src
export CARGO_TARGET_DIR=$ROOT/target/stress-mutants/target

# name | expected invariant | file | python regex (must match once) | replacement | extra stress args
MUTANTS=(
  "a discard does not zap the pages|I3|vmm/memory/src/manager.rs|let r = madvise\(hva, len, libc::MADV_DONTNEED, \"MADV_DONTNEED\"\);\n(\s*)slot\.backing\.mark_changed\(gpa - slot\.gpa, len\);\n(\s*)drop\(exclusive\);\n(\s*)r\n\}|let r: Result<(), MemError> = Ok(());\n\1slot.backing.mark_changed(gpa - slot.gpa, len);\n\2drop(exclusive);\n\3r\n}"
  "an unplug does not zap the block|I6|vmm/memory/src/manager.rs|let r = madvise\(hva, len, libc::MADV_DONTNEED, \"MADV_DONTNEED\"\);\n(\s*)slot\.backing\.mark_changed\(gpa - slot\.gpa, len\);\n(\s*)drop\(exclusive\);\n(\s*)r\n(\s*)\}\n\n(\s*)fn range_in_slot|let r: Result<(), MemError> = Ok(());\n\1slot.backing.mark_changed(gpa - slot.gpa, len);\n\2drop(exclusive);\n\3r\n\4}\n\n\5fn range_in_slot"
  "neither unplug nor slot removal drops pages|I1|vmm/memory/src/manager.rs|let zapped = madvise\(hva, slot\.size, libc::MADV_DONTNEED, \"MADV_DONTNEED\"\);|let zapped: Result<(), MemError> = Ok(()); let _ = hva; if false { let _ = madvise(hva, 0, 0, \"\"); }"
  "a write completed through an exit is dropped|I2|vmm/fault/src/engine.rs|unsafe \{ std::ptr::write_volatile\(\(hva \+ i as u64\) as \*mut u8, \*b\) \};|let _ = (hva, i, b);"
  "a speculative install is not counted|I4|vmm/fault/src/engine.rs|Path::Speculative => stats\.add\(ThreadStat::SpeculativeInstalls, 1\),|Path::Speculative => {}"
  "a restore skips the vCPU's registers|I2|vmm/src/vcpu/state.rs|        kvm\(\"KVM_SET_REGS\", fd\.set_regs\(&self\.regs\)\)\?;\n||--restore-at 3s"
  "a prefetch overwrites a page a vCPU installed|test:vmm-fault:prefetch_keeps_what_a_vcpu_installed|vmm/fault/src/engine.rs|Ok\(uffd::Install::Exists\(_\)\) => \{\n|Ok(uffd::Install::Exists(_)) => {\nif self.prefetch { unsafe { std::ptr::copy_nonoverlapping(self.ctx.bounce.as_ptr().cast::<u8>(), hva as *mut u8, PAGE_SIZE as usize) }; }\n|"
  "a copy restore fills the holes|R1|vmm/memory/src/snapshot.rs|for \(p, n\) in s\.data_runs\(RUN\)|for (p, n) in (0..s.pages()).step_by(RUN as usize).zip(std::iter::repeat(RUN))|--restore-at 3s --restore-mode copy"
  # The dirty ring's defences against a host that writes past it (unit
  # tests against a model of the kernel's ring).
  "an overflowed dirty ring is not counted whole|test:vmm-memory:a_ring_written_past_its_end|vmm/memory/src/ring.rs|            bits\.fill\(u64::MAX\);|            let _ = &mut bits;"
  "a full vCPU's astray ring is not scanned|test:vmm-memory:a_full_vcpu_with_entries_away|vmm/memory/src/ring.rs|let astray = full == Some\(i\)|let astray = false && full == Some(i)"
  "KVM's reset count is not checked|test:vmm-memory:an_entry_overwritten_between|vmm/memory/src/ring.rs|if in_step && cleared < marked \{|if false && in_step && cleared < marked {"
  "a wedged vCPU spins on its full ring|test:vmm-memory:a_vcpu_whose_full_ring_never_yields|vmm/memory/src/ring.rs|if r\.empty_fulls >= WEDGED \{|if false && r.empty_fulls >= WEDGED {"
  # Live migration, between two vmm processes (the integration test fails:
  # the destination's guest finds bad words).
  "a migration round skips the pages KVM logged|itest:vmm-cli:migrate:a_guest_migrated_while_writing_finds_every_page|vmm/memory/src/migrate.rs|if !first && !bit\(&changed, p\) \{|if !first { let _ = &changed;"
  "a vCPU reads a page post-copy has not brought|itest:vmm-cli:migrate:postcopy_runs_the_guest_at_once_and_every_page_follows|vmm/src/snapshot/postcopy.rs|g = self\.cond\.wait\(g\)\.unwrap_or_else\(.e. e\.into_inner\(\)\);|return Ok(());"
)
# The I1 mutant also needs the unplug one (blocks must still hold pages
# when their slice goes): applied together.
EXTRA_FOR_I1=1

ONLY=${1:-}
fails=0
for m in "${MUTANTS[@]}"; do
  IFS='|' read -r name inv file pattern replacement extra <<<"$m"
  [[ -z $ONLY || $name == *"$ONLY"* ]] || continue
  rm -rf "$WORK"
  mkdir -p "$WORK"
  # The tree as git sees it (tracked and untracked, not ignored files).
  git ls-files -z -co --exclude-standard | tar --null -T - -cf - | tar -xf - -C "$WORK"
  plant() {
    python3 - "$WORK/$1" "$2" "$3" <<'PY'
import re, sys
path, pattern, repl = sys.argv[1], sys.argv[2], sys.argv[3]
s = open(path).read()
new, n = re.subn(pattern, repl.replace('\\n', '\n'), s)
if n != 1:
    sys.exit(f"mutant pattern matched {n} times in {path}: {pattern!r}")
open(path, 'w').write(new)
PY
  }
  plant "$file" "$pattern" "$replacement"
  if [ "$inv" = I1 ] && [ "$EXTRA_FOR_I1" = 1 ]; then
    IFS='|' read -r _ _ f2 p2 r2 <<<"${MUTANTS[1]}"
    plant "$f2" "$p2" "$r2"
  fi
  if [[ $inv == test:* || $inv == itest:* ]]; then
    # A race a short stress run hits only sometimes: a unit test that sets
    # it up every time (real userfaultfd, no KVM) must fail instead. An
    # `itest` is an integration test (real KVM, vmm processes).
    if [[ $inv == test:* ]]; then
      IFS=: read -r _ crate test <<<"$inv"
      which=(--lib)
    else
      IFS=: read -r _ crate file test <<<"$inv"
      which=(--test "$file")
    fi
    if (cd "$WORK" && cargo test --release -q -p "$crate" "${which[@]}" -- "$test" \
      >"$WORK/test.log" 2>&1); then
      printf 'MUTANT SURVIVED %-46s %s passed\n' "$name" "$test"; fails=$((fails + 1))
    elif grep -q "panicked" "$WORK/test.log"; then
      printf 'mutant caught   %-46s %s failed\n' "$name" "$test"
    else
      echo "MUTANT DID NOT BUILD: $name"; tail -n 20 "$WORK/test.log"; fails=$((fails + 1))
    fi
    continue
  fi
  if ! (cd "$WORK" && cargo build --release -q -p vmm-cli 2>"$WORK/build.log"); then
    echo "MUTANT DID NOT BUILD: $name"; tail -n 20 "$WORK/build.log"; fails=$((fails + 1)); continue
  fi
  # I1's mutant shows only where a removed slot still held pages: a few
  # in 800 removals in 8 s (none in one loaded run), so it runs longer.
  duration=8s
  [ "$inv" = I1 ] && duration=30s
  out=$("$CARGO_TARGET_DIR/release/vmm" stress --json --duration $duration --vcpus 2 --mem 256M \
    --hotplug 256M --seed 3 $extra 2>/dev/null) && status=0 || status=$?
  printf '%s' "$out" >"$WORK/report.json"
  verdict=$(printf '%s' "$out" | python3 -c '
import json, sys
inv = sys.argv[1]
try:
    r = json.load(sys.stdin)
except Exception:
    print("no-report 0 False"); sys.exit()
i = next(x for x in r["invariants"] if x["name"] == inv)
print(i["violations"], i["checks"], r["ok"])' "$inv")
  read -r violations checks ok <<<"$verdict"
  if [ "$status" -ne 0 ] && [ "$violations" != no-report ] && [ "$violations" -gt 0 ]; then
    printf 'mutant caught   %-46s %s: %s violations in %s checks (exit %s)\n' "$name" "$inv" "$violations" "$checks" "$status"
  else
    printf 'MUTANT SURVIVED %-46s %s: %s (exit %s)\n' "$name" "$inv" "$verdict" "$status"
    fails=$((fails + 1))
  fi
done
[ "$fails" -eq 0 ] || { echo "stress-mutants.sh: $fails planted defect(s) went unseen" >&2; exit 1; }
echo "stress-mutants.sh: every planted defect was seen by its invariant"
