#!/usr/bin/env bash
# Run every test binary of the workspace (what `cargo test --workspace
# --release` runs) in LANES parallel lanes: most integration tests spend
# their time in one guest's vCPU or waiting on a guest, so two or three
# binaries at once fill the cores that one binary leaves idle. Each binary
# runs as cargo would run it (in its package's directory, its own test
# threads), longest first; its whole output is printed when it ends, and
# every binary runs even when others fail. Ends with a table (binary,
# status, tests, seconds) and one line `N passed, N failed`; exits 1 if any
# binary failed. Arguments after LANES go to every test binary (a test
# name filter, --nocapture, ...).
#
# The durations of a whole run are kept outside the clone (VMM_TEST_TIMES,
# default /var/cache/vmm/test-lanes-times, like the image cache), so that a
# fresh clone also starts with its longest binaries; without them the known
# long ones (Linux guests) go first.
#
#   scripts/test-lanes.sh [LANES] [-- TEST-ARGS...]
set -euo pipefail
set -E
trap 'rc=$?; printf "%s: line %s: \"%s\" failed (status %s)\n" "${BASH_SOURCE[0]##*/}" "$LINENO" "$BASH_COMMAND" "$rc" >&2' ERR
cd "$(dirname "$0")/.."
ROOT=$PWD
LANES=${1:-3}
shift || true
[ "${1:-}" = -- ] && shift
[[ $LANES =~ ^[1-9][0-9]*$ ]] || { echo "test-lanes.sh: LANES must be a positive number, not '$LANES'" >&2; exit 2; }
DIR=$ROOT/target/test-lanes
mkdir -p "$DIR/logs"
TIMES=${VMM_TEST_TIMES:-/var/cache/vmm/test-lanes-times}
mkdir -p "$(dirname "$TIMES")"

# The test binaries, as cargo builds them: name, executable, package dir.
cargo test --workspace --release --no-run --message-format=json-render-diagnostics \
  >"$DIR/build.json"
python3 - "$DIR/build.json" "$TIMES" >"$DIR/plan" <<'PY'
import json, os, sys
build, times = sys.argv[1], sys.argv[2]
# Without a record (a new machine), the binaries that boot Linux or run
# long guests, roughly as measured on a 2-core PVM host.
last = {f"vmm-cli:test:{n}": t for n, t in [
    ("hotplug", 190), ("balloon", 180), ("stress", 160), ("snapshot", 160),
    ("linux_userland", 150), ("top", 150), ("linux_boot", 140), ("migrate", 130),
    ("linux_snapshot", 60), ("fault_stress", 25), ("metrics", 15)]}
if os.path.exists(times):
    for line in open(times):
        name, _, secs = line.strip().partition(' ')
        try:
            last[name] = float(secs)
        except ValueError:
            pass
bins = []
for line in open(build):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") != "compiler-artifact" or not m.get("profile", {}).get("test"):
        continue
    exe = m.get("executable")
    if not exe:
        continue
    t = m["target"]
    kind = "lib" if "lib" in t["kind"] else t["kind"][0]
    url, _, ver = m["package_id"].partition("#")
    pkg = ver.split("@")[0] if "@" in ver else url.rstrip("/").rsplit("/", 1)[-1]
    name = f'{pkg}:{kind}:{t["name"]}'
    bins.append((name, exe, os.path.dirname(m["manifest_path"])))
# Longest first (unknown ones first of all: they may be long).
bins.sort(key=lambda b: -last.get(b[0], 1e9))
for b in bins:
    print("\t".join(b))
PY
n=$(wc -l <"$DIR/plan")
[ "$n" -gt 0 ] || { echo "test-lanes.sh: cargo built no test binary" >&2; exit 1; }
echo "test-lanes: $n test binaries in $LANES lanes (longest first)"

# run_one NAME EXE CWD: one binary; its log, status and seconds in $DIR.
run_one() {
  local name=$1 exe=$2 cwd=$3 safe t0 status=0
  safe=${name//[^A-Za-z0-9_.-]/_}
  t0=$(date +%s)
  (cd "$cwd" && "$exe" "${TEST_ARGS[@]}") >"$DIR/logs/$safe.log" 2>&1 </dev/null || status=$?
  printf '%s %s %s\n' "$status" $(($(date +%s) - t0)) "$name" >"$DIR/logs/$safe.done"
}
TEST_ARGS=("$@")
rm -f "$DIR"/logs/*
declare -A PID_NAME=()
finished() {
  local name=$1 safe status secs
  safe=${name//[^A-Za-z0-9_.-]/_}
  read -r status secs _ <"$DIR/logs/$safe.done"
  printf '\n---- %s: %s in %s s ----\n' "$name" "$([ "$status" = 0 ] && echo ok || echo "FAILED (status $status)")" "$secs"
  cat "$DIR/logs/$safe.log"
}
running=0
while IFS=$'\t' read -r name exe cwd; do
  if [ "$running" -ge "$LANES" ]; then
    wait -n -p done_pid || true
    finished "${PID_NAME[$done_pid]}"
    unset "PID_NAME[$done_pid]"
    running=$((running - 1))
  fi
  run_one "$name" "$exe" "$cwd" &
  PID_NAME[$!]=$name
  running=$((running + 1))
done <"$DIR/plan"
while [ "$running" -gt 0 ]; do
  wait -n -p done_pid || true
  finished "${PID_NAME[$done_pid]}"
  unset "PID_NAME[$done_pid]"
  running=$((running - 1))
done

# The table, the totals, the durations for the next run's order.
python3 - "$DIR" "$TIMES" "${#TEST_ARGS[@]}" <<'PY'
import glob, os, re, sys
d, times = sys.argv[1], sys.argv[2]
rows, passed, failed, bad = [], 0, 0, []
for f in glob.glob(os.path.join(d, "logs", "*.done")):
    status, secs, name = open(f).read().strip().split(" ", 2)
    log = open(f[:-5] + ".log", errors="replace").read()
    p = sum(int(x) for x in re.findall(r"^test result: \w+\. (\d+) passed", log, re.M))
    fl = sum(int(x) for x in re.findall(r"^test result: \w+\. \d+ passed; (\d+) failed", log, re.M))
    if status != "0" and fl == 0:
        fl = 1  # the binary failed without a test result (crashed, killed)
    passed, failed = passed + p, failed + fl
    rows.append((int(secs), name, status, p, fl))
    if status != "0":
        bad.append(name)
rows.sort(reverse=True)
print("\n==> test binaries (longest first)")
for secs, name, status, p, fl in rows:
    print(f"  {secs:5d} s  {'ok    ' if status == '0' else 'FAILED'}  {p:3d} passed {fl:2d} failed  {name}")
if sys.argv[3] == "0":  # a whole run (no test filter): remember it
    with open(times, "w") as t:
        for secs, name, *_ in rows:
            t.write(f"{name} {secs}\n")
if bad:
    print("\nfailed: " + ", ".join(bad))
print(f"\n{passed} passed, {failed} failed")
sys.exit(1 if bad else 0)
PY
