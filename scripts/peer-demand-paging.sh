#!/usr/bin/env bash
# The peer row: KVM's own demand_paging_test (tools/testing/selftests/kvm in
# Debian's linux-source-6.12), built here, run with the host kernel serving
# faults and with `-u MISSING` (a userfaultfd handler thread per vCPU), on 1
# and 2 vCPUs; then `vmm bench faults` on the same machine in the same run.
# Prints each side's per-fault overhead of serving a missing page in user
# space over the host kernel's own anonymous fault (1/rate - 1/kernel-rate,
# microseconds), side by side.
#
#   scripts/peer-demand-paging.sh [PAGES_PER_VCPU]   (default 32768 = 128 MiB)
#
# The source tree and the build are cached under /var/cache/vmm (the tree is
# the one guest-images/build.sh extracts for the micro kernel, if present).
set -euo pipefail
set -E
trap '__st=$?; if [ "$BASHPID" = "$$" ]; then printf "%s: line %s: \"%s\" failed (status %s)\n" "${BASH_SOURCE[0]##*/}" "$LINENO" "$BASH_COMMAND" "$__st" >&2; fi' ERR
cd "$(dirname "$0")/.."
pages=${1:-32768}
cache=/var/cache/vmm
out=$cache/peer-kvm-selftests
series=6.12

# gcc, make, libclang (cargo); and what the kernel's headers_install (rsync)
# and the source package (xz) need: a fresh machine has neither.
scripts/setup.sh >/dev/null
missing=()
command -v rsync >/dev/null || missing+=(rsync)
command -v xz >/dev/null || missing+=(xz-utils)
if [ ${#missing[@]} -gt 0 ]; then
	echo "peer: installing ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1 ||
		{ apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; } ||
		{ echo "peer: cannot install ${missing[*]}" >&2; exit 1; }
fi

# (none is fine: then the package is extracted here)
tree=$(ls -d "$cache"/guest-images/linux-source-$series-* 2>/dev/null | head -n1 || true)
if [ -z "$tree" ] || [ ! -f "$tree/tools/testing/selftests/kvm/demand_paging_test.c" ]; then
	tree=$cache/peer-linux-source-$series
	if [ ! -f "$tree/tools/testing/selftests/kvm/demand_paging_test.c" ]; then
		echo "peer: extracting linux-source-$series into $tree"
		tmp=$(mktemp -d)
		# No package lists yet on a fresh machine: update once and retry.
		(cd "$tmp" && apt-get download "linux-source-$series" >/dev/null) ||
			{ apt-get update -qq && (cd "$tmp" && apt-get download "linux-source-$series" >/dev/null); } ||
			{ echo "peer: apt-get download linux-source-$series failed" >&2; exit 1; }
		dpkg-deb -x "$tmp"/linux-source-"$series"_*.deb "$tmp/x"
		mkdir -p "$tree"
		tar -xf "$tmp/x/usr/src/linux-source-$series.tar.xz" -C "$tree" --strip-components=1
		rm -rf "$tmp"
	fi
fi
bin=$out/out/demand_paging_test
if [ ! -x "$bin" ]; then
	echo "peer: building demand_paging_test from $tree"
	mkdir -p "$out/hdr"
	make -s -C "$tree" headers_install INSTALL_HDR_PATH="$out/hdr" >"$out/build.log" 2>&1 ||
		{ tail -n 30 "$out/build.log" >&2; echo "peer: make headers_install failed (log: $out/build.log)" >&2; exit 1; }
	make -s -C "$tree/tools/testing/selftests/kvm" OUTPUT="$out/out" \
		LINUX_HDR_PATH="$out/hdr/include/" "$bin" >>"$out/build.log" 2>&1 ||
		{ tail -n 30 "$out/build.log" >&2; echo "peer: building demand_paging_test failed (log: $out/build.log)" >&2; exit 1; }
fi

# demand_paging_test's -b is memory per vCPU.
mib=$((pages * 4 / 1024))
declare -A rate
for v in 1 2; do
	for u in kernel uffd; do
		args=(-b "${mib}M" -v "$v")
		[ "$u" = uffd ] && args+=(-u MISSING)
		echo "\$ demand_paging_test ${args[*]}"
		res=$("$bin" "${args[@]}" 2>&1) ||
			{ printf '%s\n' "$res" | tail -n 20 >&2; echo "peer: demand_paging_test ${args[*]} failed" >&2; exit 1; }
		r=$(sed -n 's/^Overall demand paging rate:[[:space:]]*\([0-9.]*\).*/\1/p' <<<"$res")
		[ -n "$r" ] || { printf '%s\n' "$res" | tail -n 20 >&2; echo "peer: demand_paging_test ${args[*]} printed no rate" >&2; exit 1; }
		rate[$u,$v]=$r
		printf '  %s vcpus=%s: %.0f pages/s\n' "$u" "$v" "$r"
	done
done

cargo build --release -p vmm-cli >/dev/null
ours=$(mktemp)
trap 'rm -f "$ours"' EXIT
echo "\$ vmm bench faults --vcpus 1,2 --pages $pages --repeat 3"
target/release/vmm bench faults --vcpus 1,2 --pages "$pages" --repeat 3 2>/dev/null | tee "$ours"

row() { awk -v m="$1" -v v="$2" '$1 == m && $2 == v { print $3 }' "$ours"; }
# (a row the bench did not print, or a zero rate: "-", not a division by zero)
us() { awk -v a="$1" -v b="$2" 'BEGIN { if (a + 0 > 0 && b + 0 > 0) printf "%.1f", 1e6 / a - 1e6 / b; else printf "-" }'; }
echo
echo "per-fault overhead over the host kernel's own fault (us), same run:"
printf '%-6s %22s %22s %22s %22s\n' vcpus "peer -u MISSING" "vmm handler/r" "vmm vcpu/r" "vmm vcpu-nofa (seq)"
for v in 1 2; do
	printf '%-6s %22s %22s %22s %22s\n' "$v" \
		"$(us "${rate[uffd,$v]}" "${rate[kernel,$v]}")" \
		"$(us "$(row handler/r "$v")" "$(row kernel/r "$v")")" \
		"$(us "$(row vcpu/r "$v")" "$(row kernel/r "$v")")" \
		"$(us "$(row vcpu-nofa "$v")" "$(row kernel "$v")")"
done
