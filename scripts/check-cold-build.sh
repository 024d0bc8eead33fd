#!/usr/bin/env bash
# scripts/check-cold-build.sh — guest-images/build.sh's first run on a fresh
# machine, checked in seconds (run by scripts/test.sh on every run): build.sh
# with BUILD_STANDIN=1 (apt is a stand-in: nothing downloaded or installed,
# the kernel "built" by a stub Makefile; every other line runs as in a real
# build) against an empty temporary cache (BUILD_DIR) and OUT:
#   1. cold: exits 0 and leaves every output;
#   2. warm: the same directories again: everything comes from the cache;
#   3. fresh OUT, warm cache (a new clone on a machine that built before);
#   4. a changed config fragment (in a copy of guest-images/): a new kernel
#      in the same tree, its patches reverted and applied again;
#   5. teeth: a copy of guest-images/ whose build.sh carries the defect that
#      once ended a first run silently (`expect=$(cat "$BUILD"/micro-*/cc-files
#      2>/dev/null | tail -n 1)`: the glob matches nothing, the pipeline fails
#      under pipefail) must fail, with build.sh's report naming that line.
# Needs root (build.sh makes /dev/console with mknod) and gcc, make, patch,
# cpio, xz, lz4, python3 (installed with apt if missing). Exits 1 saying what
# went wrong; the logs are printed then.
set -euo pipefail
set -E
trap '__st=$?; if [ "$BASHPID" = "$$" ]; then printf "%s: line %s: \"%s\" failed (status %s)\n" "${BASH_SOURCE[0]##*/}" "$LINENO" "$BASH_COMMAND" "$__st" >&2; fi' ERR
cd "$(dirname "$0")/.."
ROOT=$PWD
t_start=${EPOCHREALTIME/./}

say() { printf 'check-cold-build: %s\n' "$*"; }
fail() { printf 'check-cold-build: FAIL: %s\n' "$*" >&2; exit 1; }
# secs SINCE: seconds (one decimal) from SINCE (microseconds) to now.
secs() { local d=$(( ${EPOCHREALTIME/./} - $1 )); printf '%d.%d' $((d / 1000000)) $((d / 100000 % 10)); }

[ "$(id -u)" = 0 ] || fail "needs root (build.sh makes dev/console with mknod)"

# The tools build.sh would install itself (in stand-in mode it installs nothing).
need=()
for t in gcc:gcc make:make patch:patch cpio:cpio xz:xz-utils lz4:lz4 python3:python3 \
	dpkg-deb:dpkg flock:util-linux; do
	command -v "${t%%:*}" >/dev/null || need+=("${t#*:}")
done
[ -e /usr/include/stdio.h ] || need+=(libc6-dev)
if [ ${#need[@]} -gt 0 ]; then
	say "installing ${need[*]}"
	export DEBIAN_FRONTEND=noninteractive
	# A fresh image may have no package lists: update and retry once.
	apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null 2>&1 ||
		{ apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null; } ||
		fail "cannot install ${need[*]}"
fi

work=$(mktemp -d -t check-cold-build.XXXXXX)
trap 'rm -rf "$work"' EXIT

# build LABEL SCRIPT BUILD_DIR OUT: run SCRIPT in stand-in mode (nothing from
# the caller's environment changes its course); RC, SECS, LOG.
build() {
	local t0=${EPOCHREALTIME/./}
	LOG=$work/$1.log
	mkdir -p "$3" "$4"
	if env -u FORCE -u SKIP_MICRO -u SKIP_32 -u LINUX_SOURCE_PKG -u TICK -u JOBS \
		BUILD_STANDIN=1 BUILD_DIR="$3" bash "$2" "$4" >"$LOG" 2>&1; then
		RC=0
	else
		RC=$?
	fi
	SECS=$(secs "$t0")
}
# show_fail WHAT: the log's end, then fail.
show_fail() {
	printf '%s\n' "--- last lines of $LOG:" >&2
	tail -n 30 "$LOG" | sed 's/^/    /' >&2
	fail "$1"
}
# has TEXT / hasnt TEXT: the log (does not) contain(s) the fixed string TEXT.
has() { grep -qF -- "$1" "$LOG" || show_fail "$STEP: the log has no \"$1\""; }
hasnt() { if grep -qF -- "$1" "$LOG"; then show_fail "$STEP: the log has \"$1\""; fi; }
# outputs DIR: every output of a stand-in build is in DIR, not empty.
outputs() {
	local f
	for f in vmlinuz-cloud vmlinuz-cloud.version config-cloud vmlinux-cloud \
		vmlinux-micro bzImage-micro config-micro config-micro.dropped vmlinux-micro.version \
		vmlinux-micro.key init init-hosttest initramfs.cpio initramfs-idle.cpio \
		initramfs-int80.cpio initramfs-userland.cpio memtest ymmcheck expected-checksum \
		versions.txt; do
		[ -s "$1/$f" ] || show_fail "$STEP: no $f in $1"
	done
	grep -q '^micro-kernel-release=.*standin' "$1/versions.txt" ||
		show_fail "$STEP: versions.txt names no stand-in micro kernel"
	cpio -it --quiet <"$1/initramfs-userland.cpio" >"$work/userland.list"
	grep -qx 'bin/sh' "$work/userland.list" && grep -qx 'init' "$work/userland.list" ||
		show_fail "$STEP: initramfs-userland.cpio has no bin/sh or init"
}
SCRIPT=$ROOT/guest-images/build.sh
B=$work/cache
O=$work/out

STEP="cold build"
build cold "$SCRIPT" "$B" "$O"
[ "$RC" = 0 ] || show_fail "$STEP: guest-images/build.sh (BUILD_STANDIN=1, empty cache) exited $RC"
outputs "$O"
has "apt-get download linux-image-"
has "apt-get download linux-source-"
has "apt-get download busybox-static="
has "... building the micro kernel:"
hasnt "cached:"
hasnt "failed (status"
say "cold: build.sh on an empty cache and OUT: exit 0, every output, in $SECS s"
cold_s=$SECS

STEP="warm build"
build warm "$SCRIPT" "$B" "$O"
[ "$RC" = 0 ] || show_fail "$STEP: guest-images/build.sh (BUILD_STANDIN=1, second run) exited $RC"
outputs "$O"
has "cached: $B/cloud-"
has "source tree already extracted"
has "cached: micro kernel"
has "up to date: initramfs-userland.cpio"
hasnt "apt-get download"
hasnt "building the micro kernel"
hasnt "failed (status"
say "warm: the same directories again: all cached, exit 0, in $SECS s"
warm_s=$SECS

STEP="fresh OUT, warm cache"
build fresh-out "$SCRIPT" "$B" "$work/out2"
[ "$RC" = 0 ] || show_fail "$STEP: guest-images/build.sh (BUILD_STANDIN=1, new OUT) exited $RC"
outputs "$work/out2"
has "cached: micro kernel"
has "3c. userland initramfs"
hasnt "apt-get download"
hasnt "failed (status"
cmp -s "$O/bzImage-micro" "$work/out2/bzImage-micro" || show_fail "$STEP: bzImage-micro differs"
say "fresh OUT, warm cache: kernels and .debs from the cache, exit 0, in $SECS s"
fresh_s=$SECS

# A changed fragment: a new micro kernel key, the cached tree's patches
# reverted and applied again, configured and built again.
STEP="changed fragment"
mkdir -p "$work/changed/guest-images"
tar -C guest-images --exclude=./out -cf - . | tar -xf - -C "$work/changed/guest-images"
printf '%s\n' '# check-cold-build.sh: a change' 'CONFIG_STANDIN_CHANGED=y' >>"$work/changed/guest-images/linux/microvm.config"
build changed "$work/changed/guest-images/build.sh" "$B" "$work/changed/out"
[ "$RC" = 0 ] || show_fail "$STEP: guest-images/build.sh (BUILD_STANDIN=1, changed microvm.config) exited $RC"
outputs "$work/changed/out"
has "source tree already extracted"
has "make tinyconfig"
hasnt "apt-get download"
hasnt "failed (status"
! cmp -s "$O/vmlinux-micro.key" "$work/changed/out/vmlinux-micro.key" || show_fail "$STEP: the micro kernel key did not change"
say "changed fragment: patches reverted and applied again, kernel rebuilt, exit 0, in $SECS s"
changed_s=$SECS

# The planted defect: the line the fix replaced, back in place of the loop
# that computes the progress lines' file count (in a copy of guest-images/).
STEP="planted defect"
mkdir -p "$work/planted/guest-images"
tar -C guest-images --exclude=./out -cf - . | tar -xf - -C "$work/planted/guest-images"
planted='	expect=$(cat "$BUILD"/micro-*/cc-files 2>/dev/null | tail -n 1)'
if ! awk -v planted="$planted" '
	skip { if ($0 ~ /^[[:space:]]*done[[:space:]]*$/) skip = 0; next }
	/^[[:space:]]*expect=1114[[:space:]]*$/ { held = $0; next }
	held != "" {
		if (index($0, "for f in \"$BUILD\"/micro-*/cc-files; do")) { print planted; n++; skip = 1; held = ""; next }
		print held; held = ""
	}
	{ print }
	END { exit n == 1 ? 0 : 3 }' "$SCRIPT" >"$work/planted/guest-images/build.sh"; then
	fail "cannot plant the defect: guest-images/build.sh has no 'expect=1114' + 'for f in \"\$BUILD\"/micro-*/cc-files' loop any more (update this check)"
fi
! cmp -s "$SCRIPT" "$work/planted/guest-images/build.sh" || fail "the planted copy of build.sh is unchanged"
build planted "$work/planted/guest-images/build.sh" "$work/planted/cache" "$work/planted/out"
if [ "$RC" = 0 ]; then
	show_fail "the cold-path check has no teeth: build.sh with the planted defect ($planted) passed"
fi
report=$(grep -F 'failed (status' "$LOG" | grep -F 'expect=$(cat' || true)
[ -n "$report" ] ||
	show_fail "$STEP: build.sh failed (status $RC) but did not report the planted line"
say "planted defect caught: build.sh (copy) with"
say "  $planted"
say "exited $RC after $SECS s, reporting:"
say "  $report"
planted_s=$SECS

say "OK in $(secs "$t_start") s (cold $cold_s s, warm $warm_s s, fresh OUT $fresh_s s, changed fragment $changed_s s, planted $planted_s s)"
