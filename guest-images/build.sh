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
#   linux-source-X.Y), SKIP_32=1 (no 32-bit init), TICK (seconds between the
#   progress lines of the kernel build, default 30).
# Runs as root on Debian 12 (installs its own build dependencies with apt).
#
# BUILD_STANDIN=1 (scripts/check-cold-build.sh; needs BUILD_DIR and OUT, both
#   new temporary directories, never the real cache): all of this script's
#   logic runs, only apt is a stand-in (see "stand-in apt" below): nothing is
#   installed or downloaded, the "packages" are tiny .debs made on the spot
#   (a cloud kernel image, a linux-source tarball whose tree has a stub
#   Makefile and merge_config.sh and the files the patches touch, a
#   busybox-static whose busybox is a shell script listing a few applets).
#   The .debs are unpacked, the tree patched, configured and "built" (by its
#   stub Makefile, which writes vmlinux, bzImage, .config, a "  CC" log and a
#   release) by the same code as a real build, in seconds. The host needs the
#   tools this script would otherwise install: gcc make patch cpio xz python3
#   (scripts/check-cold-build.sh installs them).
set -euo pipefail
# Say what failed, and where (a failure in a subshell is reported by the
# command that ran it).
set -E
trap '__st=$?; if [ "$BASHPID" = "$$" ]; then printf "%s: line %s: \"%s\" failed (status %s)\n" "${BASH_SOURCE[0]##*/}" "$LINENO" "$BASH_COMMAND" "$__st" >&2; fi' ERR

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SRC=$HERE/linux
SELF=$HERE/build.sh
STANDIN=${BUILD_STANDIN:-0}
if [ "$STANDIN" = 1 ] && { [ -z "${1:-}" ] || [ -z "${BUILD_DIR:-}" ]; }; then
	printf 'build.sh: error: BUILD_STANDIN=1 needs BUILD_DIR and OUT (temporary directories)\n' >&2
	exit 1
fi
OUT=${1:-$HERE/out/linux}
BUILD=${BUILD_DIR:-/var/cache/vmm/guest-images}
if [ "$STANDIN" = 1 ]; then # (checked before anything is made there)
	case "$(realpath -m "$BUILD")/" in /var/cache/vmm/*)
		printf 'build.sh: error: BUILD_STANDIN=1 must not use the real cache (%s)\n' "$BUILD" >&2
		exit 1 ;;
	esac
	[ "$(realpath -m "$OUT")" != "$HERE/out/linux" ] ||
		{ printf 'build.sh: error: BUILD_STANDIN=1 must not write %s\n' "$OUT" >&2; exit 1; }
fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
mkdir -p "$BUILD"
BUILD=$(cd "$BUILD" && pwd)
JOBS=${JOBS:-2}
FORCE=${FORCE:-0}
if [ "$STANDIN" = 1 ]; then TICK=${TICK:-0.5}; else TICK=${TICK:-30}; fi
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
# mktempdir VAR: a new directory under $BUILD in VAR, removed at exit (not
# called in $(...): the list of directories to remove is this shell's).
mktempdir() {
	local d
	d=$(mktemp -d "$BUILD/tmp.XXXXXX") || die "cannot make a directory in $BUILD"
	chmod 0755 "$d"
	TMPDIRS+=("$d")
	printf -v "$1" '%s' "$d"
}

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
# Every use of apt goes through these six; BUILD_STANDIN=1 replaces them.
apt_update() { apt-get update -qq; }
apt_install() { DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@"; }
apt_policy() { apt-cache policy "$1" 2>/dev/null; }
apt_show() { apt-cache show --no-all-versions "$1"; }
apt_pkgnames() { apt-cache pkgnames "$1"; }
apt_download() { apt-get download -q "$1" >&2; } # PKG=VER, into the current directory

APT_UPDATED=0
apt_update_once() {
	if [ "$APT_UPDATED" = 0 ]; then
		log "apt-get update"
		apt_update
		APT_UPDATED=1
	fi
}
is_installed() {
	case "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)" in
	*' ok installed') return 0 ;;
	*) return 1 ;;
	esac
}
# need_pkgs PKG...: install the missing ones (returns apt-get's status).
need_pkgs() {
	local missing=() p
	for p in "$@"; do is_installed "$p" || missing+=("$p"); done
	[ ${#missing[@]} -eq 0 ] && return 0
	[ "$(id -u)" = 0 ] || die "need root to install: ${missing[*]}"
	apt_update_once
	log "apt-get install ${missing[*]}"
	apt_install "${missing[@]}"
}
# candidate PKG: CAND= the version apt would install ("" if none). Sets a
# variable (no $(...)) so that an apt-get update here is done once and its
# log line is not taken for the version.
candidate() {
	# An unknown package is no error here: CAND stays empty and the caller
	# says what is missing.
	CAND=$(apt_policy "$1" | sed -n 's/^ *Candidate: //p' | head -n1 || true)
	if [ -z "$CAND" ] || [ "$CAND" = "(none)" ]; then
		apt_update_once
		CAND=$(apt_policy "$1" | sed -n 's/^ *Candidate: //p' | head -n1 || true)
	fi
	[ "$CAND" != "(none)" ] || CAND=
}
# download_deb PKG VERSION DIR: apt-get download into DIR; DEB= its path.
download_deb() {
	local pkg=$1 ver=$2 dir=$3
	mkdir -p "$dir"
	if id _apt >/dev/null 2>&1; then chown _apt "$dir" 2>/dev/null || true; fi
	if ! (cd "$dir" && apt_download "$pkg=$ver"); then
		apt_update_once
		(cd "$dir" && apt_download "$pkg=$ver") || die "apt-get download $pkg=$ver failed"
	fi
	cached_deb "$dir" "$pkg" "$ver"
	# (the callers empty DIR of other versions of PKG first)
	[ -n "$DEB" ] || cached_deb "$dir" "$pkg" ""
	[ -n "$DEB" ] || die "apt-get download $pkg=$ver left no ${pkg}_*.deb in $dir"
}
# cached_deb DIR PKG VERSION: DEB= DIR's .deb of PKG at VERSION as apt-get
# download names it (an epoch's ':' is '%3a'; VERSION "": any), or "".
cached_deb() {
	local f v=${3//:/%3a}
	DEB=
	for f in "$1/$2_${v:+${v}_}"*.deb; do
		if [ -e "$f" ]; then DEB=$f; return 0; fi
	done
}

# ------------------------------------------------------------- stand-in apt
# BUILD_STANDIN=1: apt is replaced, nothing else. The package look-ups answer
# as apt would for a few fixed stand-in versions (an epoch, '~' and '+'
# included, for the file and cache names); a download makes a tiny real .deb
# with the layout of the real package, which the code above and below
# unpacks and uses as it would the real one.
if [ "$STANDIN" = 1 ]; then
	log "BUILD_STANDIN=1: stand-in apt (no downloads, no installs) into $BUILD and $OUT"
	standin_version() {
		case "$1" in
		linux-image-cloud-amd64) echo 6.1.999+standin1 ;;
		linux-image-6.1.0-99-cloud-amd64) echo 6.1.999-1~standin ;;
		linux-source-[0-9]*.[0-9]*) echo "${1#linux-source-}.999-1~standin" ;;
		busybox-static) echo 1:1.99.0-1~standin ;;
		esac
	}
	apt_update() { note "stand-in: no apt-get update"; }
	apt_install() { note "stand-in: not installing $*"; }
	apt_policy() {
		local v
		v=$(standin_version "$1")
		[ -n "$v" ] || return 0 # apt-cache policy prints nothing for an unknown package
		printf '%s:\n  Installed: (none)\n  Candidate: %s\n  Version table:\n     %s 500\n' "$1" "$v" "$v"
	}
	apt_show() {
		case "$1" in
		linux-image-cloud-amd64=*)
			printf 'Package: linux-image-cloud-amd64\nVersion: %s\nDepends: linux-image-6.1.0-99-cloud-amd64 (= 6.1.999-1~standin)\n' "${1#*=}" ;;
		*) echo "E: stand-in apt_show: no $1" >&2; return 100 ;;
		esac
	}
	apt_pkgnames() { printf '%s\n' linux-source-6.1 linux-source-6.12 | grep "^$1"; }
	# apt_download PKG=VER: PKG_VER_amd64.deb (':' as '%3a') in the current directory.
	apt_download() {
		local pkg=${1%%=*} ver=${1#*=} r series
		[ "$ver" = "$(standin_version "$pkg")" ] || { echo "E: stand-in: no $1" >&2; return 100; }
		r=$(mktemp -d "$BUILD/standin.XXXXXX")
		case "$pkg" in
		linux-image-*-cloud-amd64)
			mkdir -p "$r/boot"
			printf 'CONFIG_STANDIN=y\n' >"$r/boot/config-${pkg#linux-image-}"
			# A bzImage's setup header (setup_sects, payload_offset,
			# payload_length) before an LZ4 payload holding an "ELF".
			python3 - "$r/boot/vmlinuz-${pkg#linux-image-}" <<'PY'
import subprocess, sys
elf = b"\x7fELF\x02\x01\x01" + bytes(9) + b"stand-in vmlinux (BUILD_STANDIN=1)\n"
try:
    payload = subprocess.run(["lz4", "-l", "-c"], input=elf, capture_output=True, check=True).stdout
except (OSError, subprocess.CalledProcessError):
    payload = b"no lz4 here: vmlinux-cloud will not be extracted"
sects, poff = 4, 0x100
hdr = bytearray((sects + 1) * 512)
hdr[0x1f1] = sects
hdr[0x248:0x24c] = poff.to_bytes(4, "little")
hdr[0x24c:0x250] = len(payload).to_bytes(4, "little")
open(sys.argv[1], "wb").write(bytes(hdr) + bytes(poff) + payload + len(elf).to_bytes(4, "little"))
PY
			;;
		linux-source-*)
			series=${pkg#linux-source-}
			standin_tree "$r/t/linux-source-$series" "$series.999-standin"
			mkdir -p "$r/usr/src"
			tar -C "$r/t" -cJf "$r/usr/src/linux-source-$series.tar.xz" "linux-source-$series"
			rm -rf "$r/t"
			;;
		busybox-static)
			mkdir -p "$r/bin"
			printf '%s\n' '#!/bin/sh' '# stand-in busybox (BUILD_STANDIN=1)' \
				'[ "$1" = --list-full ] && printf "%s\n" bin/sh bin/ls sbin/poweroff usr/bin/awk usr/sbin/chroot' \
				>"$r/bin/busybox"
			chmod 0755 "$r/bin/busybox"
			;;
		esac
		mkdir -p "$r/DEBIAN"
		printf 'Package: %s\nVersion: %s\nArchitecture: amd64\nMaintainer: stand-in <nobody@invalid>\nDescription: stand-in (guest-images/build.sh BUILD_STANDIN=1)\n' \
			"$pkg" "$ver" >"$r/DEBIAN/control"
		chmod -R u+rwX,go+rX,go-w "$r"
		dpkg-deb --root-owner-group -Zgzip -z1 -b "$r" "${pkg}_${ver//:/%3a}_amd64.deb" >/dev/null
		rm -rf "$r"
	}
	# standin_tree DIR RELEASE: a "kernel source tree": a Makefile with the
	# targets this script runs (tinyconfig, olddefconfig, vmlinux, bzImage,
	# kernelrelease; vmlinux prints "  CC" lines over ~1.5 s, so the progress
	# lines run too), a merge_config.sh, and each file the patches change, as
	# the patches expect to find it (their context and removed lines).
	standin_tree() {
		local t=$1 p f
		mkdir -p "$t/scripts/kconfig"
		{
			printf '# stand-in kernel Makefile (guest-images/build.sh BUILD_STANDIN=1)\n'
			printf 'tinyconfig:\n\t@printf "%%s\\n" "# stand-in tinyconfig" CONFIG_STANDIN_TINY=y >.config\n'
			# Keeps each option's last value; drops the last option (as
			# Kconfig drops one whose dependencies are unmet), so the
			# dropped-options report runs too.
			printf 'olddefconfig:\n\t@awk -F= %s .config >.config.new && mv .config.new .config\n' \
				"'/^CONFIG_/ { if (!(\$\$1 in v)) o[n++] = \$\$1; v[\$\$1] = \$\$0 } END { for (i = 0; i < n - 1; i++) print v[o[i]] }'"
			printf 'vmlinux:\n\t@for f in init/main kernel/fork mm/memory arch/x86/mm/fault drivers/virtio/virtio_mmio; do echo "  CC      $$f.o"; sleep 0.3; done\n'
			printf '\t@printf "\\177ELF stand-in vmlinux\\n" >vmlinux\n'
			printf 'bzImage: vmlinux\n\t@mkdir -p arch/x86/boot && printf "stand-in bzImage\\n" >arch/x86/boot/bzImage\n'
			printf 'kernelrelease:\n\t@echo %s\n' "$2"
			printf '.PHONY: tinyconfig olddefconfig vmlinux bzImage kernelrelease\n'
		} >"$t/Makefile"
		printf '%s\n' '#!/bin/sh' '# stand-in merge_config.sh -m BASE FRAGMENT...: appends the fragments' \
			'set -e' '[ "$1" = -m ] && shift' 'base=$1' 'shift' 'cat "$@" >>"$base"' >"$t/scripts/kconfig/merge_config.sh"
		chmod 0755 "$t/scripts/kconfig/merge_config.sh"
		for p in "$PATCHES"/*.patch; do
			[ -e "$p" ] || continue
			awk -v t="$t" '
				!h && /^\+\+\+ / { f = $2; sub(/^[^\/]*\//, "", f); d = f; sub(/\/[^\/]*$/, "", d)
					if (d != f) system("mkdir -p \"" t "/" d "\""); next }
				!h && /^@@ / { split($2, a, ","); split($3, b, ","); o = (2 in a) ? a[2] : 1; n = (2 in b) ? b[2] : 1; h = 1; next }
				h && /^\\/ { next }
				h { c = substr($0, 1, 1); if (c == "" || c == " " || c == "-") { print substr($0, 2) >>(t "/" f); o-- }
					if (c == "" || c == " " || c == "+") n--
					if (o <= 0 && n <= 0) h = 0 }' "$p"
		done
	}
fi

# ------------------------------------------------------------ build deps
log "checking build dependencies (dpkg -s)"
need_pkgs build-essential bc bison flex libelf-dev libssl-dev cpio xz-utils \
	zstd lz4 gzip dwarves kmod python3 file binutils util-linux

# ------------------------------------------------------ 1. Debian cloud kernel
# (candidate updates the package lists once if they do not know a package:
# fresh images often ship without them.)
CLOUD_META=linux-image-cloud-amd64
candidate "$CLOUD_META"
CLOUD_META_VER=$CAND
[ -n "$CLOUD_META_VER" ] || die "apt has no $CLOUD_META"
# No match is no error here: the check below says what is missing.
CLOUD_PKG=$(apt_show "$CLOUD_META=$CLOUD_META_VER" |
	sed -n 's/^Depends: //p' | head -n1 | tr ',|' '\n\n' |
	grep -o 'linux-image-[^ ]*-cloud-amd64' | head -n1 || true)
[ -n "$CLOUD_PKG" ] || die "cannot resolve $CLOUD_META's kernel image package"
candidate "$CLOUD_PKG"
CLOUD_VER=$CAND
[ -n "$CLOUD_VER" ] || die "apt has no candidate for $CLOUD_PKG"
CLOUD_KREL=${CLOUD_PKG#linux-image-}
CLOUD_CACHE=$BUILD/cloud-$(printf '%s' "$CLOUD_PKG=$CLOUD_VER" | tr '~:+=' '____')
log "1. cloud kernel: $CLOUD_META $CLOUD_META_VER -> $CLOUD_PKG $CLOUD_VER ($CLOUD_KREL)"
if [ "$FORCE" != 1 ] && [ -s "$CLOUD_CACHE/vmlinuz" ] && [ -s "$CLOUD_CACHE/config" ]; then
	note "cached: $CLOUD_CACHE"
else
	mktempdir tmp
	note "apt-get download $CLOUD_PKG=$CLOUD_VER (not installed on the host)"
	download_deb "$CLOUD_PKG" "$CLOUD_VER" "$tmp/deb"
	deb=$DEB
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
elif candidate linux-source-6.12 && [ -n "$CAND" ]; then
	SRC_PKG=linux-source-6.12
else
	# No match is no error here: the check below says what is missing.
	SRC_PKG=$(apt_pkgnames linux-source- | grep -E '^linux-source-[0-9]+\.[0-9]+$' | sort -V | tail -n1 || true)
fi
[ -n "$SRC_PKG" ] || die "apt offers no linux-source-X.Y package"
candidate "$SRC_PKG"
SRC_VER=$CAND
[ -n "$SRC_VER" ] || die "apt has no candidate for $SRC_PKG"
SRC_SERIES=${SRC_PKG#linux-source-}
TREE=$BUILD/$SRC_PKG-$(printf '%s' "$SRC_VER" | tr '~:+' '___')
log "2. micro kernel: $SRC_PKG $SRC_VER, tree $TREE"
if [ "$FORCE" != 1 ] && [ "$(cat "$TREE/.vmm-extracted" 2>/dev/null)" = "$SRC_PKG=$SRC_VER" ]; then
	note "source tree already extracted"
else
	debdir=$BUILD/debs
	cached_deb "$debdir" "$SRC_PKG" "$SRC_VER"
	if [ -z "$DEB" ]; then
		note "apt-get download $SRC_PKG=$SRC_VER"
		rm -f "$debdir/${SRC_PKG}"_*.deb
		download_deb "$SRC_PKG" "$SRC_VER" "$debdir"
	fi
	deb=$DEB
	mktempdir tmp
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
	# (a fragment without CONFIG_X= lines has nothing to check: no error)
	{ grep -E '^CONFIG_[A-Za-z0-9_]+=' "$1" || true; } | while IFS='=' read -r name val; do
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
	local applied=$TREE/.vmm-patches p prev i
	if [ -d "$applied" ]; then
		# In reverse order (the glob sorts them, LC_ALL=C); none is fine.
		prev=("$applied"/*.patch)
		for ((i = ${#prev[@]} - 1; i >= 0; i--)); do
			p=${prev[i]}
			[ -e "$p" ] || continue
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
	mktempdir tmp
	check_config "$FRAGMENT" "$TREE/.config" >"$tmp/dropped"
	if [ -s "$tmp/dropped" ]; then
		note "WARNING: fragment options not in the final .config (unmet dependencies):"
		sed 's/^/      /' "$tmp/dropped"
	else
		note "all fragment options are in the final .config"
	fi
	note "make -j$JOBS vmlinux bzImage (log: $MICRO_LOG; ~11 min on 2 cores from scratch)"
	t0=$(date +%s)
	# Progress: a line every $TICK (30) s while make runs (it is silent
	# otherwise), against the file count of the last build of any tree here
	# (1114 for linux-source-6.12's tinyconfig + microvm.config; none on a
	# first run: the glob matches nothing).
	expect=1114
	for f in "$BUILD"/micro-*/cc-files; do
		[ -s "$f" ] && expect=$(tail -n 1 "$f")
	done
	[ "$expect" -gt 0 ] 2>/dev/null || expect=1114
	( while sleep "$TICK"; do
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
	mktempdir stage
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
candidate busybox-static
BB_VER=$CAND
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
	cached_deb "$debdir" busybox-static "$BB_VER"
	if [ -z "$DEB" ]; then
		note "apt-get download busybox-static=$BB_VER"
		rm -f "$debdir"/busybox-static_*.deb
		download_deb busybox-static "$BB_VER" "$debdir"
	fi
	deb=$DEB
	# Freestanding, raw system calls (sys.h): ~10 KB each instead of ~0.8 MB
	# of static glibc for the guest kernel to unpack.
	CFLAGS_FREE=(-O2 -Wall -Wextra -static -nostdlib -ffreestanding -fno-stack-protector -fno-pie -no-pie)
	gcc "${CFLAGS_FREE[@]}" -o "$OUT/memtest" "$USERLAND/memtest.c"
	gcc "${CFLAGS_FREE[@]}" -o "$OUT/ymmcheck" "$USERLAND/ymmcheck.c"
	mktempdir stage
	dpkg-deb -x "$deb" "$stage/deb"
	bb=$stage/deb/bin/busybox
	[ -x "$bb" ] || die "no /bin/busybox in $deb"
	(cd "$stage" && mkdir -p root/bin root/sbin root/usr/bin root/usr/sbin root/dev root/proc \
		root/sys root/tmp root/etc root/root)
	install -m 0755 "$bb" "$stage/root/bin/busybox"
	# Applet paths as busybox lists them (bin/sh, sbin/poweroff, usr/bin/awk, ...).
	"$bb" --list-full | while read -r applet; do
		[ -e "$stage/root/$applet" ] || ln -s /bin/busybox "$stage/root/$applet"
	done || die "$bb --list-full failed (or an applet link could not be made)"
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
# The test programs check themselves on the host first. (Their output is
# taken whole, then searched: a grep -q reading the pipe could end a
# program with SIGPIPE before it finished, a failure under pipefail.)
got=$("$OUT/memtest" 1) || die "memtest 1 fails on the host: $got"
grep -q '^VMM-MEMTEST: ok mib=1 ' <<<"$got" || die "memtest 1 on the host printed no ok line: $got"
got=$("$OUT/ymmcheck" 200) || die "ymmcheck 200 fails on the host: $got"
grep -q '^VMM-YMM: result \(ok\|skipped\)' <<<"$got" || die "ymmcheck fails on the host: $got"
EXPECTED_MEMTEST_16=$(python3 -c '
K = 0x9E3779B97F4A7C15
s = 0
for i in range(16 * 1024 * 1024 // 8):
    s ^= ((i ^ 0x5EED) * K) & 0xFFFFFFFFFFFFFFFF
print("0x%016x" % s)')
got=$("$OUT/memtest" 16) || die "memtest 16 fails on the host: $got"
grep -q "^VMM-MEMTEST: ok mib=16 words=2097152 checksum=$EXPECTED_MEMTEST_16 " <<<"$got" ||
	die "memtest's checksum on the host is not $EXPECTED_MEMTEST_16: $got"

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
	grep -qx 'VMM-INIT-MARKER: /init started' <<<"$got" &&
		grep -qx "VMM-INIT-CHECKSUM: ok words=8388608 checksum=$EXPECTED" <<<"$got"
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
