#!/usr/bin/env bash
# Device benchmarks, each in one run: the balloon (inflate/deflate rate for
# 256 MiB, fault latency of a faulting vCPU while inflating vs not) and
# virtio-mem (plug/unplug latency per block and per slice, fault latency
# while plugging/unplugging vs not). Extra arguments go to both.
set -euo pipefail
set -E
trap '__st=$?; if [ "$BASHPID" = "$$" ]; then printf "%s: line %s: \"%s\" failed (status %s)\n" "${BASH_SOURCE[0]##*/}" "$LINENO" "$BASH_COMMAND" "$__st" >&2; fi' ERR
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release -p vmm-cli >/dev/null
echo "\$ vmm bench balloon --mib 256"
target/release/vmm bench balloon --mib 256
echo
echo "\$ vmm bench hotplug --mib 1024"
target/release/vmm bench hotplug --mib 1024
