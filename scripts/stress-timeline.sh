#!/usr/bin/env bash
# A timeline of a stress run's memory: resident guest RAM, the balloon's
# target and actual size, virtio-mem's requested and plugged size, and the
# faults served per second, sampled by `vmm top` from the run's metrics
# endpoint. Writes OUT/stress-timeline.svg (default docs/plots) and the
# samples beside it (.tsv). Extra arguments go to `vmm stress` (default: 30 s,
# 256 MiB virtio-mem region, the default balloon and hotplug rates).
set -euo pipefail
set -E
trap '__st=$?; if [ "$BASHPID" = "$$" ]; then printf "%s: line %s: \"%s\" failed (status %s)\n" "${BASH_SOURCE[0]##*/}" "$LINENO" "$BASH_COMMAND" "$__st" >&2; fi' ERR
cd "$(dirname "$0")/.."
out=${OUT:-docs/plots}
scripts/setup.sh
cargo build --release -p vmm-cli >/dev/null
mkdir -p "$out"
if ! command -v gnuplot >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq --no-install-recommends gnuplot-nox >/dev/null
fi
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
args=("$@")
[ ${#args[@]} -gt 0 ] || args=(--duration 30s --hotplug 256M)
echo "\$ vmm stress ${args[*]} --metrics-addr 127.0.0.1:$port"
log=$(mktemp)
trap 'rm -f "$log" "$log.top"' EXIT
target/release/vmm stress "${args[@]}" --metrics-addr "127.0.0.1:$port" --metrics-linger 0s \
  >"$log" 2>&1 &
stress=$!
for _ in $(seq 100); do
  target/release/vmm top --once --interval 0.05 --metrics-url "http://127.0.0.1:$port" >/dev/null 2>&1 && break
  sleep 0.1
done
# Plain frames (stdout is a file) every 250 ms until the endpoint goes away.
target/release/vmm top --interval 0.25 --metrics-url "http://127.0.0.1:$port" >"$out/.frames" 2>"$log.top" ||
  { cat "$log.top" >&2; kill "$stress" 2>/dev/null || true; echo "stress-timeline: vmm top failed" >&2; exit 1; }
wait $stress || { cat "$log" >&2; echo "the stress run failed" >&2; exit 1; }
# (display only: a log with nothing but the metrics line is no error)
grep -v 'metrics on' "$log" | tail -n 15 || true
# One line per frame: seconds, resident, balloon target/actual, virtio-mem
# requested/plugged (MiB), faults/s of all threads.
awk '
  /^mode / {
    for (i = 1; i <= NF; i++) {
      if ($i == "resident") res = $(i + 1)
      if ($i == "interval") { iv = $(i + 1); sub("s", "", iv); t += iv }
    }
    faults = 0; inrows = 0; next
  }
  /^balloon / {
    for (i = 1; i <= NF; i++) {
      if ($i == "target") bt = $(i + 1)
      if ($i == "actual") ba = $(i + 1)
      if ($i == "requested") rq = $(i + 1)
      if ($i == "plugged") pl = $(i + 1)
    }
    next
  }
  /^thread / { inrows = 1; next }
  inrows && NF > 2 { faults += $3 }
  /^$/ && inrows { printf "%.2f\t%s\t%s\t%s\t%s\t%s\t%d\n", t, res, bt, ba, rq, pl, faults; inrows = 0 }
' "$out/.frames" >"$out/stress-timeline.tsv"
rm -f "$out/.frames"
echo "$(wc -l <"$out/stress-timeline.tsv") samples in $out/stress-timeline.tsv"
gnuplot <<GP
set terminal svg size 900,480 dynamic font "sans,11" background "white"
set output "$out/stress-timeline.svg"
set title "vmm stress: guest memory while the balloon and virtio-mem churn (sampled by vmm top every 250 ms)"
set datafile separator "\t"
set xlabel "seconds"
set ylabel "MiB"
set y2label "faults/s (all threads)"
set y2tics
set format y2 "%.0s%c"
set ytics nomirror
set grid
set key outside bottom center horizontal
plot "$out/stress-timeline.tsv" using 1:2 with lines lw 2 lc rgb "#7b2cbf" title "resident", \
     "" using 1:3 with lines dt 2 lc rgb "#1f77b4" title "balloon target", \
     "" using 1:4 with lines lw 2 lc rgb "#1f77b4" title "balloon actual", \
     "" using 1:5 with lines dt 2 lc rgb "#e67e00" title "virtio-mem requested", \
     "" using 1:6 with lines lw 2 lc rgb "#e67e00" title "virtio-mem plugged", \
     "" using 1:7 axes x1y2 with lines lc rgb "#999999" title "faults/s"
GP
echo "$out/stress-timeline.svg"
