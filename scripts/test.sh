#!/usr/bin/env bash
# Run every check: formatting, clippy (unsafe blocks must say why they are
# sound), unit tests, the loom models of the fault protocol and the planted
# defects they must catch, and the integration tests that boot guests on the
# machine's real /dev/kvm (test guests, the microVM kernel, Debian's cloud
# kernel). Installs what it needs first; arguments go to every test binary
# (a name filter, --nocapture). Test binaries run three at a time
# (TEST_LANES), every one even when another fails; the time of each step
# is printed at the end, whatever the outcome.
set -euo pipefail
set -E
trap 'rc=$?; printf "%s: line %s: \"%s\" failed (status %s)\n" "${BASH_SOURCE[0]##*/}" "$LINENO" "$BASH_COMMAND" "$rc" >&2' ERR
cd "$(dirname "$0")/.."

T0=$(date +%s)
LOGDIR=target/test-sh
mkdir -p "$LOGDIR"
TIMES_FILE=$LOGDIR/times
FAILED_FILE=$LOGDIR/failed
: >"$TIMES_FILE"
: >"$FAILED_FILE"
# cpu_ticks: busy and total jiffies of all CPUs (for each step's CPU use).
cpu_ticks() { awk '/^cpu /{print $2+$3+$4+$7+$8, $2+$3+$4+$5+$6+$7+$8}' /proc/stat; }
# step NAME CMD...: run one step, timed (wall time, and the machine's CPU
# use meanwhile). A failing step is recorded and the later steps still run
# (one failure must not hide another), except where `need` follows: what
# the rest depends on (set-up, images, the build).
step() {
  local name=$1 t0 rc=0 b0 a0 b1 a1
  shift
  t0=$(date +%s)
  read -r b0 a0 <<<"$(cpu_ticks)"
  printf '\n==> %s\n' "$name"
  "$@" || rc=$?
  read -r b1 a1 <<<"$(cpu_ticks)"
  printf '%6d s  cpu %3d%%  %s%s\n' $(($(date +%s) - t0)) $(((b1 - b0) * 100 / (a1 - a0 + 1))) \
    "$name" "$([ "$rc" = 0 ] || echo "  (FAILED, status $rc)")" >>"$TIMES_FILE"
  [ "$rc" = 0 ] || echo "$name" >>"$FAILED_FILE"
  return "$rc"
}
need() { exit 1; }
summary() {
  printf '\n==> step times (steps marked | ran beside the test binaries)\n'
  cat "$TIMES_FILE"
  printf '%6d s  total\n' $(($(date +%s) - T0))
  if [ -s "$FAILED_FILE" ]; then
    printf 'test.sh: failed: %s\n' "$(paste -sd';' "$FAILED_FILE")" >&2
  fi
}
trap summary EXIT

# The steps' own failures are reported by the steps; no ERR line for them.
trap - ERR
step "setup" scripts/setup.sh || need
step "cold image build, with stand-ins for the kernel build and downloads" scripts/check-cold-build.sh || true
step "guest images (cached outside the clone after the first build)" guest-images/build.sh || need
step "cargo fmt --check" cargo fmt --all -- --check || true
# Builds whose products nobody runs from the clone (clippy's checks, the
# loom models, the fuzz targets) live outside it, like the image cache: a
# fresh clone then compiles only the workspace's own crates there, not
# every dependency.
CARGO_CACHE=${VMM_CARGO_CACHE:-/var/cache/vmm/cargo}
mkdir -p "$CARGO_CACHE"
clippy() { CARGO_TARGET_DIR=$CARGO_CACHE/clippy cargo clippy --workspace --all-targets --release -- -D warnings; }
step "cargo clippy --all-targets -- -D warnings" clippy || true
build() { cargo build --release -p vmm-cli && cargo test --workspace --release --no-run; }
step "build (release: the vmm binary and every test binary)" build || need

# The loom models, their planted defects and the fuzz targets compile and
# compute while the test binaries mostly wait on guests: they run beside
# them, their output kept in a log printed after the tests'.
loom() {
  CARGO_TARGET_DIR=$CARGO_CACHE/loom RUSTFLAGS="--cfg loom" RUST_BACKTRACE=0 \
    cargo test --release -p memslots -- --test-threads=1
}
beside() {
  step "| loom models of the fault protocol (--cfg loom: own target dir)" loom || true
  step "| planted defects the loom models must catch" scripts/mutants.sh || true
  step "| fuzz targets, 30 s each (libFuzzer + ASan, nightly)" scripts/fuzz.sh 30 || true
}
beside >"$LOGDIR/beside.log" 2>&1 &
BESIDE=$!
step "unit and integration tests: every test binary, three at a time (scripts/test-lanes.sh)" \
  scripts/test-lanes.sh "${TEST_LANES:-3}" -- "$@" || true
step "doc tests" cargo test --workspace --release --doc || true
# The unit and migration tests that passed above are the controls of
# their planted defects.
step "planted defects the stress report, unit and migration tests must catch" \
  env CONTROL_LOGS=target/test-lanes/logs scripts/stress-mutants.sh || true
wait "$BESIDE" || true
printf '\n==> beside the tests: loom models, their planted defects, fuzz targets (%s)\n' "$LOGDIR/beside.log"
cat "$LOGDIR/beside.log"
[ ! -s "$FAILED_FILE" ]
