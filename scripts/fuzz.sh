#!/usr/bin/env bash
# Run every cargo-fuzz target (vmm/fuzz) for SECONDS each (default 30) with
# libFuzzer and AddressSanitizer on the nightly toolchain, starting from the
# seed corpora in vmm/fuzz/corpus/<target> (new inputs go to a scratch copy
# under target/, the repository's corpora stay as committed). Prints the
# executions each target ran; exits non-zero on the first crash, whose input
# is left in vmm/fuzz/artifacts/<target>/ (make it a unit test).
#
#   scripts/fuzz.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-30}
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
for t in $(cargo +nightly fuzz list); do
	scratch=$root/target/fuzz-corpus/$t
	mkdir -p "$scratch"
	log=$root/target/fuzz-$t.log
	echo "== $t: ${secs}s"
	if ! cargo +nightly fuzz run "$t" "$scratch" "fuzz/corpus/$t" -- \
		-max_total_time="$secs" -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1; then
		tail -n 40 "$log"
		echo "fuzz.sh: $t crashed; input in vmm/fuzz/artifacts/$t/" >&2
		exit 1
	fi
	runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n1)
	cov=$(grep -o 'cov: [0-9]*' "$log" | tail -n1)
	results+=("$(printf '%-12s %10s executions in %ss, %s' "$t" "${runs:-?}" "$secs" "${cov:-cov: ?}")")
done
printf '%s\n' "${results[@]}"
