#!/usr/bin/env bash
# Linux boot milestones, side by side: the micro kernel (guest-images) and
# Debian's cloud kernel, each under vmm (all RAM demand-paged) and under QEMU
# (-enable-kvm, PVH boot of the same vmlinux), with the busybox userland
# initramfs running `memtest 16`. Prints host wall-clock seconds to each
# milestone (banner, Run /init, first userland output, the program's
# result), then vmm's fault summary and SYSCALL assist counts per kernel.
#
# Environment: KERNELS="micro cloud" (default both), LIMIT=seconds per boot
# (default 900), VCPUS (default 1), VMMS="vmm qemu" (default both),
# RUN="memtest 16" (the userland command), EXTRA="..." (more kernel
# command line for both VMMs).
#
# On a PVM host: the micro kernel completes user-mode SYSCALL itself (its
# patch); the cloud kernel needs vmm's SYSCALL assist, which QEMU does not
# have, so QEMU's cloud boot stops at /init's first system call.
#
# No `set -e`: a boot that times out or a milestone that never shows is a
# result, not an error. What must work first exits with a message.
set -uo pipefail
cd "$(dirname "$0")/.."
LIMIT=${LIMIT:-900}
VCPUS=${VCPUS:-1}
KERNELS=${KERNELS:-micro cloud}
VMMS=${VMMS:-vmm qemu}
RUN=${RUN:-memtest 16}
EXTRA=${EXTRA:-}
L=guest-images/out/linux
INITRD=$L/initramfs-userland.cpio
if [ ! -f "$INITRD" ] || [ ! -f $L/bzImage-micro ]; then
	guest-images/build.sh >/dev/null || { echo "linux-boot: guest-images/build.sh failed" >&2; exit 1; }
fi
scripts/setup.sh >/dev/null || { echo "linux-boot: scripts/setup.sh failed" >&2; exit 1; }
cargo build --release -p vmm-cli >/dev/null 2>&1 || { echo "cargo build failed" >&2; exit 1; }
# apt_get_install PKG...: quietly; a fresh machine has no package lists: update once and retry.
apt_get_install() {
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null 2>&1 ||
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null 2>&1; }
}
# bc: the milestone times below.
if ! command -v bc >/dev/null; then
	apt_get_install bc || { echo "linux-boot: cannot install bc" >&2; exit 1; }
fi
if [[ " $VMMS " == *" qemu "* ]] && ! command -v qemu-system-x86_64 >/dev/null; then
	echo "installing qemu-system-x86 (apt) for the side-by-side runs"
	apt_get_install qemu-system-x86 || echo "(qemu-system-x86 could not be installed: vmm only)"
fi
milestones=("Linux version" "Run /init as init process" "VMM-USERLAND: up" "VMM-MEMTEST: ok" "reboot: Power down")
labels=("banner" "Run /init" "first userland output" "memtest done" "power off")
stamp() { # prefix each line with seconds since $1
	local t0=$1
	while IFS= read -r l; do printf '%.1f %s\n' "$(echo "$(date +%s.%N) - $t0" | bc)" "$l"; done
}
out=$(mktemp -d)
echo "initramfs $INITRD, vmm_run=\"$RUN\", $VCPUS vCPU, limit ${LIMIT}s per boot; logs in $out"
cols=()
for k in $KERNELS; do
	case $k in
	micro) BZ=$L/bzImage-micro ELF=$L/vmlinux-micro ;;
	cloud) BZ=$L/vmlinuz-cloud ELF=$L/vmlinux-cloud ;;
	*) echo "unknown kernel $k (micro, cloud)" >&2; exit 2 ;;
	esac
	for v in $VMMS; do
		log=$out/$k-$v.log
		cols+=("$k-$v")
		case $v in
		vmm)
			echo "== $k under vmm"
			t0=$(date +%s.%N)
			timeout "$LIMIT" target/release/vmm run --kernel "$BZ" --initrd "$INITRD" --mem 512M \
				--vcpus "$VCPUS" --cmdline "console=ttyS0 vmm_run=\"$RUN\" $EXTRA" \
				2>"$out/$k-vmm.err" </dev/null | stamp "$t0" >"$log"
			;;
		qemu)
			if ! command -v qemu-system-x86_64 >/dev/null || [ ! -f "$ELF" ]; then
				echo "(qemu or $ELF not available)" >"$log"
				continue
			fi
			echo "== $k under qemu"
			# The kernel command line vmm used (its defaults included),
			# and the same CPUID fix (no CX16); -cpu host fails here (QEMU
			# cannot set MSR 0x10a).
			cmdline=$(grep -m1 'Command line:' "$out/$k-vmm.log" 2>/dev/null | sed 's/.*Command line: //')
			[ -n "$cmdline" ] || cmdline="console=ttyS0 vmm_run=\"$RUN\" $EXTRA"
			t0=$(date +%s.%N)
			# On a KVM internal error QEMU stops the VM and waits: end it.
			(timeout "$LIMIT" qemu-system-x86_64 -enable-kvm -machine microvm,acpi=on -cpu qemu64,-cx16 \
				-smp "$VCPUS" -m 512M -kernel "$ELF" -initrd "$INITRD" -nographic -no-reboot \
				-append "$cmdline" </dev/null 2>"$out/$k-qemu.err" | stamp "$t0" >"$log") &
			qpid=$!
			while kill -0 $qpid 2>/dev/null; do
				if grep -q "KVM internal error" "$out/$k-qemu.err" 2>/dev/null; then
					sleep 1
					pkill -f -- "qemu-system-x86_64 .*-initrd $INITRD" || true
					echo "$(echo "$(date +%s.%N) - $t0" | bc | xargs printf '%.1f') QEMU: $(grep -m1 'KVM internal error' "$out/$k-qemu.err"), code: $(grep -m1 '^Code=' "$out/$k-qemu.err" | cut -c1-80)" >>"$log"
					break
				fi
				sleep 1
			done
			wait $qpid
			;;
		*) echo "unknown VMM $v (vmm, qemu)" >&2; exit 2 ;;
		esac
	done
done
echo
printf '%-24s' "seconds to"
for c in "${cols[@]}"; do printf ' %12s' "$c"; done
echo
for i in "${!milestones[@]}"; do
	printf '%-24s' "${labels[$i]}"
	for c in "${cols[@]}"; do
		t=$(grep -m1 -F "${milestones[$i]}" "$out/$c.log" | cut -d' ' -f1)
		printf ' %12s' "${t:--}"
	done
	echo
done
echo
for c in "${cols[@]}"; do
	echo "$c: last console line: $(grep -v '^$' "$out/$c.log" | tail -n1 | cut -c1-110)"
	grep -m1 "VMM-MEMTEST: ok" "$out/$c.log" | sed 's/^/    /'
done
for k in $KERNELS; do
	[ -f "$out/$k-vmm.err" ] || continue
	echo "== vmm, $k kernel"
	grep -E "^vmm: " "$out/$k-vmm.err" | tail -n1
	grep -v unclaimed "$out/$k-vmm.err" | grep -A8 "fault summary" | grep -E "fault summary|thread|vcpu|assists" || echo "(no fault summary)"
done
echo "logs: $out"
