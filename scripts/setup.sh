#!/usr/bin/env bash
# Install what building and testing need on a fresh Debian machine (as root).
# Idempotent: skips what is already there.
set -euo pipefail
set -E
trap '__st=$?; if [ "$BASHPID" = "$$" ]; then printf "%s: line %s: \"%s\" failed (status %s)\n" "${BASH_SOURCE[0]##*/}" "$LINENO" "$BASH_COMMAND" "$__st" >&2; fi' ERR
need=()
command -v gcc >/dev/null || need+=(gcc)
command -v make >/dev/null || need+=(make)
command -v ld >/dev/null || need+=(binutils)
# userfaultfd-sys generates its bindings with bindgen, which loads libclang
# itself (libclang.so / libclang-N.so.M from libclang1-N; libclang-dev adds the
# unversioned name). libclang-cpp*.so is a different library: not enough.
has_libclang() {
  local f
  for f in /usr/lib/llvm-*/lib/libclang.so* /usr/lib/*-linux-gnu/libclang-[0-9]*.so*; do
    [ -e "$f" ] && return 0
  done
  return 1
}
has_libclang || need+=(libclang-dev)
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null
fi
# tests/monitoring.rs: promtool checks and unit-tests the alerting rules, and
# a real Prometheus scrapes a running vmm for the dashboard's queries
# (without recommends: no node exporter).
if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
if [ ! -e /dev/kvm ]; then
  echo "setup: /dev/kvm is missing: the tests need KVM" >&2
  exit 1
fi
