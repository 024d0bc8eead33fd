#!/usr/bin/env bash
# guest-images/build.sh [OUT] — build the Linux guest images from Debian packages.
#
# OUT defaults to guest-images/out/linux. Produces (see guest-images/linux/README.md):
#   vmlinuz-cloud  vmlinuz-cloud.version  config-cloud  vmlinux-cloud
#   vmlinux-micro  bzImage-micro  config-micro  config-micro.dropped  vmlinux-micro.version
#   init  initramfs.cpio  init32  initramfs32.cpio  init-hosttest  init32-hosttest
#   expected-checksum  versions.txt
# Work already done is skipped: each output is rebuilt only when missing, older
# than its inputs, or when the Debian package version it came from changed.
# Slow work is cached outside the clone, in $BUILD_DIR (default
# /var/cache/vmm/guest-images): the Debian .debs, the kernel source tree and its
# objects, and each micro kernel built, keyed by a hash of its inputs (config
# fragment, patches, source package version). A fresh clone on a machine that
# built the same kernel before copies it in seconds; CI builds it once per
# machine (~12 min on 2 cores).
#
# Environment: BUILD_DIR, JOBS (make -j, default 2), FORCE=1 (redo every step), SKIP_MICRO=1 (no micro kernel),
#   LINUX_SOURCE_PKG (default: linux-source-6.12 if apt has it, else the newest
#   linux-source-X.Y), SKIP_32=1 (no 32-bit init).
# Runs as root on Debian 12 (installs its own build dependencies with apt).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SRC=$HERE/linux
SELF=$HERE/build.sh
OUT=${1:-$HERE/out/linux}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
BUILD=${BUILD_DIR:-/var/cache/vmm/guest-images}
mkdir -p "$BUILD"
BUILD=$(cd "$BUILD" && pwd)
JOBS=${JOBS:-2}
FORCE=${FORCE:-0}
FRAGMENT=$SRC/microvm.config
PATCHES=$SRC/patches
INIT_C=$SRC/init.c
export LC_ALL=C

log() { printf '==> %s\n' "$*"; }
note() { printf '    %s\n' "$*"; }
die() { printf 'build.sh: error: %s\n' "$*" >&2; exit 1; }

TMPDIRS=()
cleanup() { local d; for d in "${TMPDIRS[@]}"; do rm -rf -- "$d"; done; }
trap cleanup EXIT
mktempdir() { local d; d=$(mktemp -d "$BUILD/tmp.XXXXXX"); chmod 0755 "$d"; TMPDIRS+=("$d"); printf '%s\n' "$d"; }

# uptodate OUT... -- IN...: every OUT exists and is newer than every IN.
uptodate() {
	local outs=() o i
	while [ $# -gt 0 ] && [ "$1" != "--" ]; do outs+=("$1"); shift; done
	[ $# -gt 0 ] && shift
	[ "$FORCE" = 1 ] && return 1
	for o in "${outs[@]}"; do
		[ -e "$o" ] || return 1
		for i in "$@"; do
			[ -e "$i" ] || continue
			[ "$o" -nt "$i" ] || return 1
		done
	done
}

# One build.sh at a time per OUT.
exec 9>"$OUT/.build.lock"
if ! flock -n 9; then log "another build.sh is using $OUT; waiting"; flock 9; fi

[ -f "$FRAGMENT" ] || die "missing $FRAGMENT"
[ -f "$INIT_C" ] || die "missing $INIT_C"
[ "$(uname -m)" = x86_64 ] || die "needs an x86_64 host"

# ---------------------------------------------------------------- apt helpers
APT_UPDATED=0
apt_update_once() {
	if [ "$APT_UPDATED" = 0 ]; then
		log "apt-get update"
		apt-get update -qq
		APT_UPDATED=1
	fi
}
is_installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q ' ok installed$'; }
# need_pkgs PKG...: install the missing ones (returns apt-get's status).
need_pkgs() {
	local missing=() p
	for p in "$@"; do is_installed "$p" || missing+=("$p"); done
	[ ${#missing[@]} -eq 0 ] && return 0
	[ "$(id -u)" = 0 ] || die "need root to install: ${missing[*]}"
	apt_update_once
	log "apt-get install ${missing[*]}"
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
}
# candidate PKG: the version apt would install ("" if none).
candidate() {
	local v
	v=$(apt-cache policy "$1" 2>/dev/null | sed -n 's/^ *Candidate: //p' | head -n1)
	if [ -z "$v" ] || [ "$v" = "(none)" ]; then
		apt_update_once
		v=$(apt-cache policy "$1" 2>/dev/null | sed -n 's/^ *Candidate: //p' | head -n1)
	fi
	[ "$v" = "(none)" ] && v=
	printf '%s\n' "$v"
}
# download_deb PKG VERSION DIR: apt-get download into DIR, print the .deb path.
download_deb() {
	local pkg=$1 ver=$2 dir=$3
	mkdir -p "$dir"
	if id _apt >/dev/null 2>&1; then chown _apt "$dir" 2>/dev/null || true; fi
	(cd "$dir" && apt-get download -q "$pkg=$ver" >&2) || {
		apt_update_once
		(cd "$dir" && apt-get download -q "$pkg=$ver" >&2)
	}
	ls "$dir"/"${pkg}"_*.deb | head -n1
}

# ------------------------------------------------------------ build deps
log "checking build dependencies (dpkg -s)"
need_pkgs build-essential bc bison flex libelf-dev libssl-dev cpio xz-utils \
	zstd lz4 gzip dwarves kmod python3 file binutils util-linux

# Package lists present? (fresh images often ship without them.) Done here, in
# the main shell, so later look-ups in $(...) subshells need no update.
if [ -z "$(apt-cache policy linux-image-cloud-amd64 2>/dev/null | sed -n 's/^ *Candidate: \([^(]\)/\1/p')" ]; then
	apt_update_once
fi

# ------------------------------------------------------ 1. Debian cloud kernel
CLOUD_META=linux-image-cloud-amd64
CLOUD_META_VER=$(candidate "$CLOUD_META")
[ -n "$CLOUD_META_VER" ] || die "apt has no $CLOUD_META"
CLOUD_PKG=$(apt-cache show --no-all-versions "$CLOUD_META=$CLOUD_META_VER" |
	sed -n 's/^Depends: //p' | head -n1 | tr ',|' '\n\n' |
	grep -o 'linux-image-[^ ]*-cloud-amd64' | head -n1)
[ -n "$CLOUD_PKG" ] || die "cannot resolve $CLOUD_META's kernel image package"
CLOUD_VER=$(candidate "$CLOUD_PKG")
CLOUD_KREL=${CLOUD_PKG#linux-image-}
CLOUD_CACHE=$BUILD/cloud-$(printf '%s' "$CLOUD_PKG=$CLOUD_VER" | tr '~:+=' '____')
log "1. cloud kernel: $CLOUD_META $CLOUD_META_VER -> $CLOUD_PKG $CLOUD_VER ($CLOUD_KREL)"
if [ "$FORCE" != 1 ] && [ -s "$CLOUD_CACHE/vmlinuz" ] && [ -s "$CLOUD_CACHE/config" ]; then
	note "cached: $CLOUD_CACHE"
else
	tmp=$(mktempdir)
	note "apt-get download $CLOUD_PKG=$CLOUD_VER (not installed on the host)"
	deb=$(download_deb "$CLOUD_PKG" "$CLOUD_VER" "$tmp/deb")
	note "dpkg-deb -x $(basename "$deb")"
	dpkg-deb -x "$deb" "$tmp/x"
	[ -f "$tmp/x/boot/vmlinuz-$CLOUD_KREL" ] || die "no /boot/vmlinuz-$CLOUD_KREL in $deb"
	rm -rf "$CLOUD_CACHE"
	mkdir -p "$tmp/c"
	install -m 0644 "$tmp/x/boot/vmlinuz-$CLOUD_KREL" "$tmp/c/vmlinuz"
	install -m 0644 "$tmp/x/boot/config-$CLOUD_KREL" "$tmp/c/config"
	mv "$tmp/c" "$CLOUD_CACHE"
	rm -rf "$tmp"
fi
if ! cmp -s "$CLOUD_CACHE/vmlinuz" "$OUT/vmlinuz-cloud" 2>/dev/null; then
	install -m 0644 "$CLOUD_CACHE/vmlinuz" "$OUT/vmlinuz-cloud"
	rm -f "$OUT/vmlinux-cloud"
fi
install -m 0644 "$CLOUD_CACHE/config" "$OUT/config-cloud"
printf '%s\n' "$CLOUD_KREL" >"$OUT/vmlinuz-cloud.version"

# ------------------------------------------- 2. micro kernel from linux-source
# SKIP_MICRO=1 skips it (~12 min on 2 cores): the tests boot the cloud kernel.
if [ "${SKIP_MICRO:-0}" = 1 ]; then
	log "2. micro kernel: skipped (SKIP_MICRO=1)"
	SRC_PKG=linux-source
	SRC_VER=skipped
else
if [ -n "${LINUX_SOURCE_PKG:-}" ]; then
	SRC_PKG=$LINUX_SOURCE_PKG
elif [ -n "$(candidate linux-source-6.12)" ]; then
	SRC_PKG=linux-source-6.12
else
	SRC_PKG=$(apt-cache pkgnames linux-source- | grep -E '^linux-source-[0-9]+\.[0-9]+$' | sort -V | tail -n1)
fi
[ -n "$SRC_PKG" ] || die "apt offers no linux-source-X.Y package"
SRC_VER=$(candidate "$SRC_PKG")
[ -n "$SRC_VER" ] || die "apt has no candidate for $SRC_PKG"
SRC_SERIES=${SRC_PKG#linux-source-}
TREE=$BUILD/$SRC_PKG-$(printf '%s' "$SRC_VER" | tr '~:+' '___')
log "2. micro kernel: $SRC_PKG $SRC_VER, tree $TREE"
if [ "$FORCE" != 1 ] && [ "$(cat "$TREE/.vmm-extracted" 2>/dev/null)" = "$SRC_PKG=$SRC_VER" ]; then
	note "source tree already extracted"
else
	debdir=$BUILD/debs
	deb=$(ls "$debdir/${SRC_PKG}_$(printf '%s' "$SRC_VER" | sed 's/:/%3a/')_"*.deb 2>/dev/null | head -n1 || true)
	if [ -z "$deb" ]; then
		note "apt-get download $SRC_PKG=$SRC_VER"
		rm -f "$debdir/${SRC_PKG}"_*.deb
		deb=$(download_deb "$SRC_PKG" "$SRC_VER" "$debdir")
	fi
	tmp=$(mktempdir)
	note "dpkg-deb -x $(basename "$deb"), untar linux-source-$SRC_SERIES.tar.xz"
	dpkg-deb -x "$deb" "$tmp/x"
	tarball=$tmp/x/usr/src/linux-source-$SRC_SERIES.tar.xz
	[ -f "$tarball" ] || die "no $tarball in $deb"
	tar -xf "$tarball" -C "$tmp"
	[ -d "$tmp/linux-source-$SRC_SERIES" ] || die "unexpected tarball layout"
	# Remove trees of other source versions (each is ~1.5 GB with objects).
	for old in "$BUILD"/linux-source-*; do
		if [ -d "$old" ] && [ "$old" != "$TREE" ]; then note "removing old tree $old"; rm -rf "$old"; fi
	done
	rm -rf "$TREE"
	mv "$tmp/linux-source-$SRC_SERIES" "$TREE"
	printf '%s\n' "$SRC_PKG=$SRC_VER" >"$TREE/.vmm-extracted"
	rm -rf "$tmp"
fi

# check_config FRAGMENT DOTCONFIG: print every fragment option not honoured.
check_config() {
	local name val actual
	grep -E '^CONFIG_[A-Za-z0-9_]+=' "$1" | while IFS='=' read -r name val; do
		actual=$(grep -E "^$name=" "$2" | head -n1 | cut -d= -f2- || true)
		if [ "$val" = n ]; then
			[ -z "$actual" ] || [ "$actual" = n ] || echo "$name=n (final: $name=$actual)"
		elif [ "$actual" != "$val" ]; then
			echo "$name=$val (final: ${actual:+$name=$actual}${actual:-is not set})"
		fi
	done
}

KMAKE=(make -C "$TREE" KBUILD_BUILD_USER=vmm KBUILD_BUILD_HOST=guest-images)
MICRO_LOG=$BUILD/micro-kernel.log
# The kernel's identity: source package, config fragment, patches (in order).
MICRO_KEY=$({
	printf '%s\n' "$SRC_PKG=$SRC_VER"
	cat "$FRAGMENT"
	for p in "$PATCHES"/*.patch; do
		if [ -e "$p" ]; then printf '%s\n' "${p##*/}"; cat "$p"; fi
	done
} | sha256sum | cut -c1-16)
MICRO_CACHE=$BUILD/micro-$MICRO_KEY
# apply_patches: make the tree carry exactly the patches in $PATCHES (reverting
# the ones a previous build applied, from the copies it kept).
apply_patches() {
	local applied=$TREE/.vmm-patches p
	if [ -d "$applied" ]; then
		for p in $(ls "$applied"/*.patch 2>/dev/null | sort -r); do
			patch -d "$TREE" -p1 -R -s <"$p" || die "cannot revert $p"
		done
		rm -rf "$applied"
	fi
	mkdir -p "$applied"
	for p in "$PATCHES"/*.patch; do
		[ -e "$p" ] || continue
		patch -d "$TREE" -p1 -s --forward <"$p" || die "patch $p does not apply to $SRC_PKG $SRC_VER"
		cp "$p" "$applied/"
	done
}
if [ "$FORCE" != 1 ] && [ -s "$MICRO_CACHE/vmlinux" ] && [ -s "$MICRO_CACHE/bzImage" ]; then
	note "cached: micro kernel $MICRO_KEY ($(cat "$MICRO_CACHE/version"))"
else
	need_pkgs patch
	apply_patches
	note "make tinyconfig; merge_config.sh -m .config microvm.config; make olddefconfig"
	{
		"${KMAKE[@]}" tinyconfig
		(cd "$TREE" && scripts/kconfig/merge_config.sh -m .config "$FRAGMENT")
		"${KMAKE[@]}" olddefconfig
	} >"$MICRO_LOG.config" 2>&1 || { tail -n 40 "$MICRO_LOG.config"; die "kernel configuration failed (log: $MICRO_LOG.config)"; }
	tmp=$(mktempdir)
	check_config "$FRAGMENT" "$TREE/.config" >"$tmp/dropped"
	if [ -s "$tmp/dropped" ]; then
		note "WARNING: fragment options not in the final .config (unmet dependencies):"
		sed 's/^/      /' "$tmp/dropped"
	else
		note "all fragment options are in the final .config"
	fi
	note "make -j$JOBS vmlinux bzImage (log: $MICRO_LOG; ~11 min on 2 cores from scratch)"
	t0=$(date +%s)
	# Progress: a line every 30 s while make runs (it is silent otherwise),
	# against the file count of the last build of any tree here (1114 for
	# linux-source-6.12's tinyconfig + microvm.config).
	expect=1114
	for f in "$BUILD"/micro-*/cc-files; do
		[ -s "$f" ] && expect=$(tail -n 1 "$f")
	done
	[ "$expect" -gt 0 ] 2>/dev/null || expect=1114
	( while sleep 30; do
		n=$(grep -c '^  CC' "$MICRO_LOG" 2>/dev/null || true)
		n=${n:-0}
		note "... building the micro kernel: $n of ~$expect files compiled ($(( n * 100 / expect ))%), $(( $(date +%s) - t0 )) s"
	done ) &
	ticker=$!
	if ! "${KMAKE[@]}" -j"$JOBS" vmlinux bzImage >"$MICRO_LOG" 2>&1; then
		kill "$ticker" 2>/dev/null || true
		tail -n 40 "$MICRO_LOG"
		die "micro kernel build failed (log: $MICRO_LOG)"
	fi
	kill "$ticker" 2>/dev/null || true
	t1=$(date +%s)
	note "micro kernel built in $((t1 - t0)) s"
	printf '%s\n' "$((t1 - t0))" >"$tmp/build-seconds"
	grep -c '^  CC' "$MICRO_LOG" >"$tmp/cc-files" || true
	"${KMAKE[@]}" -s kernelrelease >"$tmp/version"
	install -m 0644 "$TREE/.config" "$tmp/config"
	install -m 0644 "$TREE/arch/x86/boot/bzImage" "$tmp/bzImage"
	install -m 0755 "$TREE/vmlinux" "$tmp/vmlinux"
	rm -rf "$MICRO_CACHE"
	mv "$tmp" "$MICRO_CACHE"
	chmod 0755 "$MICRO_CACHE"
fi
install -m 0755 "$MICRO_CACHE/vmlinux" "$OUT/vmlinux-micro"
install -m 0644 "$MICRO_CACHE/bzImage" "$OUT/bzImage-micro"
install -m 0644 "$MICRO_CACHE/config" "$OUT/config-micro"
install -m 0644 "$MICRO_CACHE/dropped" "$OUT/config-micro.dropped"
install -m 0644 "$MICRO_CACHE/version" "$OUT/vmlinux-micro.version"
printf '%s\n' "$MICRO_KEY" >"$OUT/vmlinux-micro.key"

fi

# vmlinux-cloud: the ELF inside vmlinuz-cloud (for QEMU's PVH boot in
# scripts/linux-boot.sh): the LZ4 payload at the setup header's
# payload_offset, decompressed with the lz4 tool. Optional: a failure warns.
extract_vmlinux() {
	local bz=$1 sects poff plen
	sects=$(od -An -tu1 -j $((0x1f1)) -N1 "$bz" | tr -d ' ')
	[ "$sects" = 0 ] && sects=4
	poff=$(od -An -tu4 -j $((0x248)) -N4 "$bz" | tr -d ' ')
	plen=$(od -An -tu4 -j $((0x24c)) -N4 "$bz" | tr -d ' ')
	# lz4 complains about the 4-byte size trailer after the frame: ignore its status.
	tail -c +$(((sects + 1) * 512 + poff + 1)) "$bz" | head -c "$plen" | lz4 -dc 2>/dev/null || true
}
need_pkgs lz4
if uptodate "$OUT/vmlinux-cloud" -- "$OUT/vmlinuz-cloud"; then
	note "up to date: vmlinux-cloud"
else
	log "extracting vmlinux-cloud from vmlinuz-cloud (lz4 payload)"
	if extract_vmlinux "$OUT/vmlinuz-cloud" >"$OUT/vmlinux-cloud.tmp" &&
		[ "$(head -c4 "$OUT/vmlinux-cloud.tmp" | od -An -c | tr -d ' ')" = '177ELF' ]; then
		mv "$OUT/vmlinux-cloud.tmp" "$OUT/vmlinux-cloud"
	else
		rm -f "$OUT/vmlinux-cloud.tmp"
		note "WARNING: could not extract vmlinux-cloud (skipped)"
	fi
fi

# --------------------------------------------------------- 3. /init + cpio
CFLAGS_INIT=(-static -Os -Wall -Wextra)
# mkcpio INIT_BINARY OUT.cpio: uncompressed newc with /dev/console and /init.
mkcpio() {
	local bin=$1 cpio=$2 stage
	stage=$(mktempdir)
	mkdir -m 0755 "$stage/dev"
	install -m 0755 "$bin" "$stage/init"
	mknod -m 0600 "$stage/dev/console" c 5 1 || die "mknod /dev/console failed (needs root / CAP_MKNOD)"
	touch -h -d @0 "$stage/dev/console" "$stage/init" "$stage/dev"
	(cd "$stage" && printf '%s\n' dev dev/console init |
		cpio -o -H newc -R 0:0 --reproducible --quiet) >"$cpio.tmp"
	mv "$cpio.tmp" "$cpio"
	rm -rf "$stage"
}

log "3. /init (gcc -static -Os $INIT_C) and initramfs.cpio"
if uptodate "$OUT/init" "$OUT/init-hosttest" "$OUT/initramfs.cpio" -- "$INIT_C" "$SELF"; then
	note "up to date: init initramfs.cpio"
else
	gcc "${CFLAGS_INIT[@]}" -o "$OUT/init" "$INIT_C"
	gcc "${CFLAGS_INIT[@]}" -DHOST_TEST -o "$OUT/init-hosttest" "$INIT_C"
	mkcpio "$OUT/init" "$OUT/initramfs.cpio"
fi

# idle: a /init that spins without system calls (guest-images/linux/idle.S),
# for tests that need a live kernel but no userland.
if uptodate "$OUT/initramfs-idle.cpio" -- "$SRC/idle.S" "$SELF"; then
	note "up to date: initramfs-idle.cpio"
else
	log "building idle (a /init that spins, no system calls)"
	gcc -nostdlib -static -no-pie -o "$OUT/idle" "$SRC/idle.S"
	mkcpio "$OUT/idle" "$OUT/initramfs-idle.cpio"
fi

# init80: a freestanding 32-bit /init using `int $0x80` system calls (no
# libc), to show what this host does with a software interrupt from guest
# user mode (scripts/linux-boot.sh INITRD=initramfs-int80.cpio).
if uptodate "$OUT/initramfs-int80.cpio" -- "$SRC/init80.c" "$SELF"; then
	note "up to date: initramfs-int80.cpio"
else
	log "building init80 (32-bit, int \$0x80, freestanding)"
	gcc -m32 -Os -ffreestanding -fno-pic -fno-pie -no-pie -nostdlib -static -mgeneral-regs-only \
		-fno-stack-protector -e start -o "$OUT/init80" "$SRC/init80.c"
	mkcpio "$OUT/init80" "$OUT/initramfs-int80.cpio"
fi

INIT32_STATUS="not built"
if [ "${SKIP_32:-0}" = 1 ]; then
	INIT32_STATUS="skipped (SKIP_32=1)"
	rm -f "$OUT/init32" "$OUT/init32-hosttest" "$OUT/initramfs32.cpio"
elif uptodate "$OUT/init32" "$OUT/init32-hosttest" "$OUT/initramfs32.cpio" -- "$INIT_C" "$SELF"; then
	note "up to date: init32 initramfs32.cpio"
	INIT32_STATUS=built
else
	log "3b. 32-bit /init (gcc -m32 -static -Os) and initramfs32.cpio"
	rm -f "$OUT/init32" "$OUT/init32-hosttest" "$OUT/initramfs32.cpio"
	if ! need_pkgs gcc-multilib libc6-dev-i386; then
		INIT32_STATUS="skipped: could not install gcc-multilib libc6-dev-i386"
	elif ! gcc -m32 "${CFLAGS_INIT[@]}" -o "$OUT/init32" "$INIT_C" ||
		! gcc -m32 "${CFLAGS_INIT[@]}" -DHOST_TEST -o "$OUT/init32-hosttest" "$INIT_C"; then
		rm -f "$OUT/init32" "$OUT/init32-hosttest"
		INIT32_STATUS="skipped: gcc -m32 -static failed"
	else
		mkcpio "$OUT/init32" "$OUT/initramfs32.cpio"
		INIT32_STATUS=built
	fi
	[ "$INIT32_STATUS" = built ] || note "WARNING: 32-bit variant $INIT32_STATUS"
fi

# ------------------------------------------- 3c. userland initramfs (busybox)
# initramfs-userland.cpio: Debian's busybox-static (apt-get download, never
# installed on the host), every applet as a symlink, /init and /etc/shrc from
# linux/userland/, and two static test programs: memtest (reads
# /proc/meminfo, writes and verifies N MiB, prints a checksum) and ymmcheck
# (do two processes' YMM registers survive each other?), both freestanding.
# Uncompressed: the
# guest unpacks it without running a decompressor under emulation.
USERLAND=$SRC/userland
BB_VER=$(candidate busybox-static)
[ -n "$BB_VER" ] || die "apt has no candidate for busybox-static"
BB_STAMP=$OUT/initramfs-userland.busybox
if [ "$(cat "$BB_STAMP" 2>/dev/null)" = "$BB_VER" ] &&
	uptodate "$OUT/initramfs-userland.cpio" "$OUT/memtest" "$OUT/ymmcheck" -- \
		"$USERLAND/init" "$USERLAND/shrc" "$USERLAND/memtest.c" "$USERLAND/ymmcheck.c" \
		"$USERLAND/sys.h" "$SELF"; then
	note "up to date: initramfs-userland.cpio (busybox-static $BB_VER)"
else
	log "3c. userland initramfs: busybox-static $BB_VER, memtest, ymmcheck"
	debdir=$BUILD/debs
	deb=$(ls "$debdir/busybox-static_$(printf '%s' "$BB_VER" | sed 's/:/%3a/')_"*.deb 2>/dev/null | head -n1 || true)
	if [ -z "$deb" ]; then
		note "apt-get download busybox-static=$BB_VER"
		rm -f "$debdir"/busybox-static_*.deb
		deb=$(download_deb busybox-static "$BB_VER" "$debdir")
	fi
	# Freestanding, raw system calls (sys.h): ~10 KB each instead of ~0.8 MB
	# of static glibc for the guest kernel to unpack.
	CFLAGS_FREE=(-O2 -Wall -Wextra -static -nostdlib -ffreestanding -fno-stack-protector -fno-pie -no-pie)
	gcc "${CFLAGS_FREE[@]}" -o "$OUT/memtest" "$USERLAND/memtest.c"
	gcc "${CFLAGS_FREE[@]}" -o "$OUT/ymmcheck" "$USERLAND/ymmcheck.c"
	stage=$(mktempdir)
	dpkg-deb -x "$deb" "$stage/deb"
	bb=$stage/deb/bin/busybox
	[ -x "$bb" ] || die "no /bin/busybox in $deb"
	(cd "$stage" && mkdir -p root/bin root/sbin root/usr/bin root/usr/sbin root/dev root/proc \
		root/sys root/tmp root/etc root/root)
	install -m 0755 "$bb" "$stage/root/bin/busybox"
	# Applet paths as busybox lists them (bin/sh, sbin/poweroff, usr/bin/awk, ...).
	"$bb" --list-full | while read -r applet; do
		[ -e "$stage/root/$applet" ] || ln -s /bin/busybox "$stage/root/$applet"
	done
	[ -L "$stage/root/bin/sh" ] || die "busybox has no sh applet"
	install -m 0755 "$USERLAND/init" "$stage/root/init"
	install -m 0644 "$USERLAND/shrc" "$stage/root/etc/shrc"
	install -m 0755 "$OUT/memtest" "$OUT/ymmcheck" "$stage/root/bin/"
	mknod -m 0600 "$stage/root/dev/console" c 5 1 || die "mknod /dev/console failed (needs root / CAP_MKNOD)"
	find "$stage/root" -exec touch -h -d @0 {} +
	(cd "$stage/root" && find . -mindepth 1 | sed 's|^\./||' | LC_ALL=C sort |
		cpio -o -H newc -R 0:0 --reproducible --quiet) >"$OUT/initramfs-userland.cpio.tmp"
	mv "$OUT/initramfs-userland.cpio.tmp" "$OUT/initramfs-userland.cpio"
	printf '%s\n' "$BB_VER" >"$BB_STAMP"
	note "initramfs-userland.cpio: $(stat -c %s "$OUT/initramfs-userland.cpio") bytes"
fi
# The test programs check themselves on the host first.
"$OUT/memtest" 1 | grep -q '^VMM-MEMTEST: ok mib=1 ' || die "memtest fails on the host"
"$OUT/ymmcheck" 200 | grep -q '^VMM-YMM: result \(ok\|skipped\)' || die "ymmcheck fails on the host"
EXPECTED_MEMTEST_16=$(python3 -c '
K = 0x9E3779B97F4A7C15
s = 0
for i in range(16 * 1024 * 1024 // 8):
    s ^= ((i ^ 0x5EED) * K) & 0xFFFFFFFFFFFFFFFF
print("0x%016x" % s)')
"$OUT/memtest" 16 | grep -q "^VMM-MEMTEST: ok mib=16 words=2097152 checksum=$EXPECTED_MEMTEST_16 " ||
	die "memtest's checksum on the host is not $EXPECTED_MEMTEST_16"

# ------------------------------------------------ 4. expected checksum + test
log "4. expected checksum (python3, independent of init.c)"
if uptodate "$OUT/expected-checksum" -- "$SELF"; then
	note "up to date: expected-checksum"
else
	python3 - >"$OUT/expected-checksum.tmp" <<'EOF'
K = 0x9E3779B97F4A7C15
s = 0
for i in range(64 * 1024 * 1024 // 8):
    s ^= (i ^ 0x5EED) * K
print("0x%016x" % (s & 0xFFFFFFFFFFFFFFFF))
EOF
	mv "$OUT/expected-checksum.tmp" "$OUT/expected-checksum"
fi
EXPECTED=$(cat "$OUT/expected-checksum")
note "expected: VMM-INIT-CHECKSUM: ok words=8388608 checksum=$EXPECTED"

# host_test BINARY: run a -DHOST_TEST build (never reboots) and check its lines.
host_test() {
	local bin=$1 got
	got=$("$bin") || { printf '%s\n' "$got"; return 1; }
	printf '%s\n' "$got" | sed 's/^/      /'
	printf '%s\n' "$got" | grep -qx 'VMM-INIT-MARKER: /init started' &&
		printf '%s\n' "$got" | grep -qx "VMM-INIT-CHECKSUM: ok words=8388608 checksum=$EXPECTED"
}
log "host test of init.c (-DHOST_TEST build: no reboot)"
host_test "$OUT/init-hosttest" || die "init-hosttest output does not match expected-checksum"
note "64-bit host test: OK"
if [ "$INIT32_STATUS" = built ]; then
	if host_test "$OUT/init32-hosttest"; then
		note "32-bit host test: OK"
	else
		note "WARNING: 32-bit host test failed (host without ia32 support?)"
	fi
fi

# ----------------------------------------------------------------- summary
{
	echo "# guest-images/build.sh $(date -u +%Y-%m-%dT%H:%M:%SZ)"
	echo "$CLOUD_META=$CLOUD_META_VER"
	echo "$CLOUD_PKG=$CLOUD_VER"
	echo "cloud-kernel-release=$CLOUD_KREL"
	echo "$SRC_PKG=$SRC_VER"
	echo "micro-kernel-release=$(cat "$OUT/vmlinux-micro.version" 2>/dev/null || echo absent)"
	echo "micro-kernel-key=$(cat "$OUT/vmlinux-micro.key" 2>/dev/null || echo absent)"
	echo "gcc=$(dpkg-query -W -f='${Version}' gcc-12 2>/dev/null || gcc -dumpversion)"
	echo "libc6-dev=$(dpkg-query -W -f='${Version}' libc6-dev 2>/dev/null || echo '?')"
	echo "init32=$INIT32_STATUS"
	echo "busybox-static=$BB_VER"
	echo "expected-checksum=$EXPECTED"
	echo "config-micro-dropped=$(paste -sd' ' "$OUT/config-micro.dropped" 2>/dev/null | sed 's/ (final[^)]*)//g')"
} >"$OUT/versions.txt"

log "summary ($OUT)"
sed 's/^/    /' "$OUT/versions.txt"
for f in vmlinuz-cloud vmlinuz-cloud.version config-cloud vmlinux-cloud \
	vmlinux-micro bzImage-micro config-micro config-micro.dropped vmlinux-micro.version \
	init initramfs.cpio init32 initramfs32.cpio init-hosttest init32-hosttest \
	initramfs-userland.cpio memtest ymmcheck \
	expected-checksum versions.txt; do
	if [ -e "$OUT/$f" ]; then
		printf '    %-22s %12s bytes\n' "$f" "$(stat -c %s "$OUT/$f")"
	else
		printf '    %-22s %12s\n' "$f" "(absent)"
	fi
done
log "done"
