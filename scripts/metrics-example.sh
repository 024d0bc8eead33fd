#!/usr/bin/env bash
# Produce the scrape example in docs/METRICS.md: a 2-vCPU memstress guest
# touches 2048 pages and holds; its /metrics is scraped once, then vmm is
# stopped. Prints the exposition on stdout.
set -euo pipefail
set -E
trap '__st=$?; if [ "$BASHPID" = "$$" ]; then printf "%s: line %s: \"%s\" failed (status %s)\n" "${BASH_SOURCE[0]##*/}" "$LINENO" "$BASH_COMMAND" "$__st" >&2; fi' ERR
cd "$(dirname "$0")/.."
scripts/setup.sh >/dev/null
cargo build -q --release -p vmm-cli >/dev/null
out=$(mktemp -d)
pid=
trap 'if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; fi; rm -rf "$out"' EXIT
make -s -C guest-images OUT="$out" >/dev/null
port=$((20000 + RANDOM % 20000))
target/release/vmm run --kernel "$out/memstress.elf" --vcpus 2 --mem 128M \
  --fault-mode vcpu --metrics-addr 127.0.0.1:$port \
  --cmdline "mode=0 rounds=1 bytes=8M stride=4096 hold=1" >"$out/serial" 2>"$out/err" &
pid=$!
for _ in $(seq 100); do grep -q "memstress: done" "$out/serial" 2>/dev/null && break; sleep 0.1; done
grep -q "memstress: done" "$out/serial" || {
  echo "metrics-example: the guest did not finish in 10 s; vmm said:" >&2
  cat "$out/err" >&2
  exit 1
}
echo "# guest: $(grep 'memstress: done' "$out/serial")"
echo "\$ curl -s http://127.0.0.1:$port/metrics"
python3 - "$port" <<'PY'
import sys, urllib.request
print(urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics").read().decode(), end="")
PY
