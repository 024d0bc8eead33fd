#!/usr/bin/env bash
# Plots of a fault benchmark's data (`vmm bench faults --plot-data DIR`):
#   OUT/faults-rate.svg          pages/s by row, one bar per vCPU count
#   OUT/faults-overhead.svg      us per faulted page over the no-fault baseline
#   OUT/faults-latency-Nvcpu.svg each faulting row's latency distribution
# Usage: scripts/plot-faults.sh DIR OUT. Draws with gnuplot (Debian's
# gnuplot-nox, installed if missing).
set -euo pipefail
set -E
trap '__st=$?; if [ "$BASHPID" = "$$" ]; then printf "%s: line %s: \"%s\" failed (status %s)\n" "${BASH_SOURCE[0]##*/}" "$LINENO" "$BASH_COMMAND" "$__st" >&2; fi' ERR
dir=${1:?usage: scripts/plot-faults.sh DIR OUT}
out=${2:?usage: scripts/plot-faults.sh DIR OUT}
for f in faults.tsv latency.tsv; do
  [ -f "$dir/$f" ] || { echo "plot-faults: no $dir/$f (vmm bench faults --plot-data DIR writes it)" >&2; exit 1; }
done
mkdir -p "$out"
if ! command -v gnuplot >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq --no-install-recommends gnuplot-nox >/dev/null
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# Wide tables: one line per row, one column per vCPU count (gnuplot's
# clustered histograms want series as columns).
vcpus=$(awk -F'\t' '!/^#/ {print $2}' "$dir/faults.tsv" | sort -nu | tr '\n' ' ')
for col in 3 4; do
  awk -F'\t' -v col=$col -v counts="$vcpus" '
    /^#/ {next}
    { if (!($1 in seen)) { seen[$1] = 1; order[n++] = $1 } v[$1, $2] = $col }
    END {
      k = split(counts, c, " ")
      printf "row"; for (j = 1; j <= k; j++) printf "\t%s vCPU%s", c[j], (c[j] == 1 ? "" : "s"); printf "\n"
      for (i = 0; i < n; i++) {
        printf "%s", order[i]
        for (j = 1; j <= k; j++) printf "\t%s", ((order[i], c[j]) in v ? v[order[i], c[j]] : "NaN")
        printf "\n"
      }
    }' "$dir/faults.tsv" >"$tmp/wide$col.tsv"
done
ncols=$(head -1 "$tmp/wide3.tsv" | awk -F'\t' '{print NF}')

common='set terminal svg size 900,420 dynamic font "sans,11" background "white"
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.85 border -1
set datafile separator "\t"
set key top right
set grid ytics
set xtics rotate by -35 scale 0
set boxwidth 0.9'

gnuplot <<GP
$common
set output "$out/faults-rate.svg"
set title "Guest pages touched per second (one store per 4 KiB page; higher is better)"
set ylabel "pages/s"
set format y "%.0s%c"
plot for [i=2:$ncols] "$tmp/wide3.tsv" using i:xtic(1) title columnheader(i)
set output "$out/faults-overhead.svg"
set title "Cost per faulted page over the no-fault run of the same pattern (lower is better)"
set ylabel "us/page"
set format y "%g"
plot for [i=2:$ncols] "$tmp/wide4.tsv" using i:xtic(1) title columnheader(i)
GP

# Latency distributions: one plot per vCPU count, one line per faulting row.
for n in $vcpus; do
  awk -F'\t' -v n="$n" '!/^#/ && NF == 4 && $2 == n && $3 > 0 {
      if ($1 != last) { if (last != "") printf "\n\n"; printf "\"%s\"\n", $1; last = $1 }
      print $3 "\t" $4 }' "$dir/latency.tsv" >"$tmp/lat$n.tsv"
  blocks=$(grep -c '^"' "$tmp/lat$n.tsv" || true)
  [ "$blocks" -gt 0 ] || continue
  gnuplot <<GP
set terminal svg size 900,420 dynamic font "sans,11" background "white"
set output "$out/faults-latency-${n}vcpu.svg"
set title "Fault latency, exit to re-entry ($n vCPU$( [ "$n" = 1 ] || echo s)): share of faults per power-of-two bucket"
set datafile separator "\t"
set logscale x 2
set xlabel "latency bucket upper bound (us)"
set ylabel "share of faults"
set format x "%g"
set grid
set key outside right
plot for [i=0:$((blocks - 1))] "$tmp/lat$n.tsv" index i using 1:2 with linespoints title columnheader(1)
GP
done
ls "$out"/faults-*.svg
