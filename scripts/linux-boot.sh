#!/usr/bin/env bash
# Boot Debian's cloud kernel under vmm (all RAM demand-paged, vcpu mode) and,
# in the same run, under QEMU (-enable-kvm, PVH boot of the same vmlinux and
# initramfs); print host wall-clock time to each console milestone side by
# side, and the stage-2 faults vmm served. Each VMM gets LIMIT seconds
# (default 600). KERNEL=cloud (default: Debian's vmlinuz-cloud) or micro
# (bzImage-micro; build it with guest-images/build.sh without SKIP_MICRO);
# INITRD=initramfs.cpio (default), initramfs32.cpio or initramfs-int80.cpio.
set -uo pipefail
cd "$(dirname "$0")/.."
LIMIT=${LIMIT:-600}
L=guest-images/out/linux
KERNEL=${KERNEL:-cloud}
INITRD=${INITRD:-initramfs.cpio}
case $KERNEL in
  cloud) BZ=$L/vmlinuz-cloud; ELF=$L/vmlinux-cloud ;;
  micro) BZ=$L/bzImage-micro; ELF=$L/vmlinux-micro ;;
  *) echo "KERNEL must be cloud or micro" >&2; exit 2 ;;
esac
echo "kernel $BZ, initramfs $L/$INITRD, limit ${LIMIT}s per VMM"
[ -f $L/vmlinuz-cloud ] || guest-images/build.sh >/dev/null
scripts/setup.sh >/dev/null
cargo build --release -p vmm >/dev/null 2>&1
if ! command -v qemu-system-x86_64 >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-system-x86 >/dev/null 2>&1 || true
fi
milestones=("Linux version" "Memory: " "smp: Brought up" "Run /init as init process" "VMM-INIT-MARKER: /init started" "VMM-INIT-CHECKSUM: ok")
stamp() { # read lines, prefix with seconds since $1
  local t0=$1; while IFS= read -r l; do printf '%.1f %s\n' "$(echo "$(date +%s.%N) - $t0" | bc)" "$l"; done
}
out=$(mktemp -d)
t0=$(date +%s.%N)
timeout "$LIMIT" target/release/vmm run --kernel $BZ --initrd $L/$INITRD \
  --mem 512M --vcpus 2 --fault-mode vcpu --cmdline "console=ttyS0 earlyprintk=serial,ttyS0" 2>"$out/vmm.err" </dev/null | stamp "$t0" >"$out/vmm.log"
if command -v qemu-system-x86_64 >/dev/null && [ -f $ELF ]; then
  # The same kernel command line vmm used (its defaults included), and the
  # same CPUID fix (no CX16); -cpu host fails here (QEMU cannot set MSR 0x10a).
  cmdline=$(grep -m1 'Command line:' "$out/vmm.log" | sed 's/.*Command line: //')
  t0=$(date +%s.%N)
  timeout "$LIMIT" qemu-system-x86_64 -enable-kvm -machine microvm,acpi=on -cpu qemu64,-cx16 -smp 2 -m 512M \
    -kernel $ELF -initrd $L/$INITRD -nographic -no-reboot \
    -append "${cmdline:-console=ttyS0}" </dev/null 2>"$out/qemu.err" | stamp "$t0" >"$out/qemu.log"
else
  echo "(qemu-system-x86_64 not available)" >"$out/qemu.log"
fi
printf '%-34s %12s %12s\n' "milestone (s since start)" "vmm" "qemu"
for m in "${milestones[@]}"; do
  v=$(grep -m1 -F "$m" "$out/vmm.log" | cut -d' ' -f1); q=$(grep -m1 -F "$m" "$out/qemu.log" | cut -d' ' -f1)
  printf '%-34s %12s %12s\n' "$m" "${v:--}" "${q:--}"
done
echo "vmm last console line:  $(tail -n1 "$out/vmm.log" | cut -c1-100)"
echo "qemu last console line: $(tail -n1 "$out/qemu.log" | cut -c1-100)"
echo "qemu stderr: $(grep -v '^$' "$out/qemu.err" | head -3 | tr '\n' ' ' | cut -c1-200)"
grep -v unclaimed "$out/vmm.err" | grep -A6 "fault summary" || echo "(no fault summary)"
grep -E "^vmm: " "$out/vmm.err" | tail -1
echo "logs: $out"
