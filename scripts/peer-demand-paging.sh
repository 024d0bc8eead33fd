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
cd "$(dirname "$0")/.."
pages=${1:-32768}
cache=/var/cache/vmm
out=$cache/peer-kvm-selftests
series=6.12

tree=$(ls -d "$cache"/guest-images/linux-source-$series-* 2>/dev/null | head -n1 || true)
if [ -z "$tree" ] || [ ! -f "$tree/tools/testing/selftests/kvm/demand_paging_test.c" ]; then
	tree=$cache/peer-linux-source-$series
	if [ ! -f "$tree/tools/testing/selftests/kvm/demand_paging_test.c" ]; then
		echo "peer: extracting linux-source-$series into $tree"
		tmp=$(mktemp -d)
		(cd "$tmp" && apt-get download "linux-source-$series" >/dev/null)
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
	make -s -C "$tree" headers_install INSTALL_HDR_PATH="$out/hdr" >"$out/build.log" 2>&1
	make -s -C "$tree/tools/testing/selftests/kvm" OUTPUT="$out/out" \
		LINUX_HDR_PATH="$out/hdr/include/" "$bin" >>"$out/build.log" 2>&1 ||
		{ tail -n 30 "$out/build.log"; exit 1; }
fi

# demand_paging_test's -b is memory per vCPU.
mib=$((pages * 4 / 1024))
declare -A rate
for v in 1 2; do
	for u in kernel uffd; do
		args=(-b "${mib}M" -v "$v")
		[ "$u" = uffd ] && args+=(-u MISSING)
		echo "\$ demand_paging_test ${args[*]}"
		r=$("$bin" "${args[@]}" 2>&1 | sed -n 's/^Overall demand paging rate:[[:space:]]*\([0-9.]*\).*/\1/p')
		[ -n "$r" ] || { echo "peer: demand_paging_test ${args[*]} printed no rate" >&2; exit 1; }
		rate[$u,$v]=$r
		printf '  %s vcpus=%s: %.0f pages/s\n' "$u" "$v" "$r"
	done
done

cargo build --release -p vmm-cli >/dev/null
ours=$(mktemp)
echo "\$ vmm bench faults --vcpus 1,2 --pages $pages --repeat 3"
target/release/vmm bench faults --vcpus 1,2 --pages "$pages" --repeat 3 2>/dev/null | tee "$ours"

row() { awk -v m="$1" -v v="$2" '$1 == m && $2 == v { print $3 }' "$ours"; }
us() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", 1e6 / a - 1e6 / b }'; }
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
rm -f "$ours"
