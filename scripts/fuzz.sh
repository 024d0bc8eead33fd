#!/usr/bin/env bash
# Run every cargo-fuzz target (vmm/fuzz) for SECONDS each (default 30) with
# libFuzzer and AddressSanitizer on the nightly toolchain, starting from the
# seed corpora in vmm/fuzz/corpus/<target> (new inputs go to a scratch copy
# under target/, the repository's corpora stay as committed). Prints the
# executions each target ran; exits non-zero on the first crash, whose input
# is left in vmm/fuzz/artifacts/<target>/ (make it a unit test), and when a
# target ran fewer than MIN_EXECS inputs (default 1000: a target that runs
# almost nothing proves nothing; libFuzzer's final stats must say how many).
#
#   scripts/fuzz.sh [SECONDS]
set -euo pipefail
set -E
trap 'rc=$?; printf "%s: line %s: \"%s\" failed (status %s)\n" "${BASH_SOURCE[0]##*/}" "$LINENO" "$BASH_COMMAND" "$rc" >&2' ERR
cd "$(dirname "$0")/.."
secs=${1:-30}
min_execs=${MIN_EXECS:-1000}
# The instrumented build lives outside the clone (like the image cache): a
# fresh clone then rebuilds only the workspace's own crates, not every
# dependency with ASan and coverage (VMM_CARGO_CACHE moves it).
target_dir=${VMM_CARGO_CACHE:-/var/cache/vmm/cargo}/fuzz
mkdir -p "$target_dir"
root=$PWD
if ! cargo +nightly --version >/dev/null 2>&1; then
	echo "fuzz.sh: the nightly toolchain is missing (rustup toolchain install nightly)" >&2
	exit 1
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
	echo "installing cargo-fuzz (cargo install)"
	cargo install --locked cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz
fi
cd vmm
results=()
targets=$(cargo +nightly fuzz list)
[ -n "$targets" ] || { echo "fuzz.sh: cargo fuzz list found no targets" >&2; exit 1; }
few=()
for t in $targets; do
	scratch=$root/target/fuzz-corpus/$t
	mkdir -p "$scratch"
	log=$root/target/fuzz-$t.log
	echo "== $t: ${secs}s"
	if ! cargo +nightly fuzz run --target-dir "$target_dir" "$t" "$scratch" "fuzz/corpus/$t" -- \
		-max_total_time="$secs" -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1; then
		tail -n 40 "$log"
		echo "fuzz.sh: $t crashed; input in vmm/fuzz/artifacts/$t/" >&2
		exit 1
	fi
	# Absent lines are reported below (no executions counted), not fatal here.
	runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n1)
	cov=$(grep -o 'cov: [0-9]*' "$log" | tail -n1 || true)
	results+=("$(printf '%-16s %10s executions in %ss, %s' "$t" "${runs:-none}" "$secs" "${cov:-cov: ?}")")
	if ! [ "${runs:-0}" -ge "$min_execs" ] 2>/dev/null; then
		few+=("$t (${runs:-no} executions counted; log: $log)")
	fi
done
printf '%s\n' "${results[@]}"
if [ ${#few[@]} -gt 0 ]; then
	printf 'fuzz.sh: fewer than %s executions: %s\n' "$min_execs" "${few[*]}" >&2
	exit 1
fi
