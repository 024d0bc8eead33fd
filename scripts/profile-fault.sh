#!/usr/bin/env bash
# Where a vCPU thread's time goes when every first touch is a fault: one vCPU
# runs memstress over PAGES pages in random order (no fault-around, so one
# exit per page) under `perf record -g`, and the vCPU thread's time is split
# into the VMM's own code, the userfaultfd install, and the host's KVM_RUN
# (the exit, the re-entry and, on a PVM host, the emulation of the guest's
# supervisor-mode loop). Needs perf (linux-perf, installed if missing).
#
#   scripts/profile-fault.sh [PAGES]   (default 65536)
set -euo pipefail
set -E
trap '__st=$?; if [ "$BASHPID" = "$$" ]; then printf "%s: line %s: \"%s\" failed (status %s)\n" "${BASH_SOURCE[0]##*/}" "$LINENO" "$BASH_COMMAND" "$__st" >&2; fi' ERR
cd "$(dirname "$0")/.."
pages=${1:-65536}
scripts/setup.sh >/dev/null
if ! command -v perf >/dev/null; then
	echo "profile-fault: installing linux-perf"
	export DEBIAN_FRONTEND=noninteractive
	apt-get install -y -qq --no-install-recommends linux-perf >/dev/null 2>&1 ||
		{ apt-get update -qq && apt-get install -y -qq --no-install-recommends linux-perf >/dev/null; } || true
	command -v perf >/dev/null || { echo "profile-fault: perf is missing (apt-get install linux-perf failed)" >&2; exit 1; }
fi
cargo build --release -p vmm-cli >/dev/null
make -s -C guest-images >/dev/null
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT; [ -n "${KEEP:-}" ] && trap - EXIT && echo "kept $tmp"
bytes=$((pages * 4096))
mem=$(((bytes >> 20) + 64))M
echo "\$ perf record -g -- vmm run --fault-mode vcpu --fault-around 1 --vcpus 1 --mem $mem memstress random=1 ($pages pages)"
perf record -q -g -o "$tmp/perf.data" -- target/release/vmm run --fault-mode vcpu --fault-around 1 \
	--vcpus 1 --mem "$mem" --kernel guest-images/out/memstress.elf \
	--cmdline "mode=0 rounds=1 base=16777216 bytes=$bytes stride=4096 random=1" >"$tmp/run.out" 2>&1
secs=$(sed -n 's/^fault summary: mode vcpu, \([0-9.]*\) s.*/\1/p' "$tmp/run.out")
faults=$(awk '$1 == "vcpu0" { print $2 }' "$tmp/run.out")
if [ -z "$secs" ] || [ -z "$faults" ] || [ "$faults" = 0 ]; then
	echo "profile-fault: the run printed no fault summary for vcpu0:" >&2
	tail -n 20 "$tmp/run.out" >&2
	exit 1
fi
perf report -i "$tmp/perf.data" --comm vcpu0 --children --sort sym -g none 2>/dev/null >"$tmp/children"
perf report -i "$tmp/perf.data" --no-children --sort comm,dso -g none 2>/dev/null >"$tmp/dso"
pct() { awk -v s="$1" '$NF == s { gsub("%", "", $1); print $1; exit }' "$tmp/children"; }
vmm_self=$(awk '$2 == "vcpu0" && ($3 == "vmm" || $3 == "libc.so.6") { gsub("%", "", $1); t += $1 } END { printf "%.2f", t }' "$tmp/dso")
run=$(pct kvm_arch_vcpu_ioctl_run)
emul=$(pct x86_emulate_instruction)
uffd=$(pct userfaultfd_ioctl)
per=$(awk -v s="$secs" -v f="$faults" 'BEGIN { printf "%.1f", s * 1e6 / f }')
echo "run: $secs s for $faults faults ($per us of vCPU thread per faulted page, under perf)"
printf '%-58s %6s %8s\n' "vCPU thread, share of all samples" "%" "us/page"
row() { awk -v n="$1" -v p="$2" -v u="$per" 'BEGIN { printf "%-58s %6.2f %8.2f\n", n, p, p * u / 100 }'; }
row "VMM user space (exit decode, resolve, install, complete)" "${vmm_self:-0}"
row "UFFDIO_ZEROPAGE/COPY in the host (allocate, zero, map)" "${uffd:-0}"
row "KVM_RUN (host: exit, re-entry, guest)" "${run:-0}"
row "  of which instruction emulation (PVM: guest CPL0 code)" "${emul:-0}"
row "  of which the rest (exit, re-entry, shadow MMU, ...)" "$(awk -v a="${run:-0}" -v b="${emul:-0}" 'BEGIN { print a - b }')"
