#!/usr/bin/env bash
# Live migration benchmark (pre-copy, two vmm processes on this machine):
# a 1 GiB guest with all of its RAM touched, idle (memstress hold=1 after one
# round) and with a writer rewriting 64/256 MiB in rounds, migrated over a
# Unix socket and over TCP loopback. Prints total time, guest downtime,
# rounds and pages sent per round, side by side in one run. Then post-copy
# (Unix socket): time until the guest runs on the destination, the total,
# the destination's page requests (latency p50/p99, from its own status)
# and each vCPU's blocktime, with the background push unlimited, held to
# 100 MiB/s, and held to 1 MiB/s (nearly off: the guest's requests bring
# what it touches). Then the dirty log (Unix socket): KVM's dirty bitmap
# against its dirty ring (`--dirty-log ring:N --force-dirty-ring`; refused
# on a PVM host otherwise): total, downtime, rounds, pages sent, time spent
# reading the log, full-ring exits, overflows seen, and how many rounds the
# guest's writer finished per second while it was moved.
#
#   scripts/bench-migrate.sh [REPEAT] [precopy|postcopy|dirty]   (default 3, all)
set -euo pipefail
set -E
trap '__st=$?; if [ "$BASHPID" = "$$" ]; then printf "%s: line %s: \"%s\" failed (status %s)\n" "${BASH_SOURCE[0]##*/}" "$LINENO" "$BASH_COMMAND" "$__st" >&2; fi' ERR
cd "$(dirname "$0")/.."
repeat=${1:-3}
only=${2:-}
scripts/setup.sh >/dev/null
cargo build --release -p vmm-cli -p vmm-guests >/dev/null
vmm=target/release/vmm
# The newest build's guest (none: the check below says so; head may end ls early).
guest=$(ls -t target/release/build/vmm-guests-*/out/guests/memstress.elf 2>/dev/null | head -n 1 || true)
[ -n "$guest" ] || { echo "bench-migrate: no target/release/build/vmm-guests-*/out/guests/memstress.elf after cargo build" >&2; exit 1; }
work=$(mktemp -d)
trap 'pkill -P $$ 2>/dev/null || true; rm -rf "$work"' EXIT
head -c 32 /dev/urandom >"$work/key"
chmod 600 "$work/key"
python3 - "$vmm" "$guest" "$work" "$repeat" "$only" <<'PY'
import json, os, socket, subprocess, sys, time
vmm, guest, work, repeat, only = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
def section(name):
    return only in ("", name)
key = os.path.join(work, "key")

def wait(cond, what, limit=120):
    t = time.time()
    while not cond():
        if time.time() - t > limit:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.05)

def api(sock, *args):
    r = subprocess.run([vmm, "ctl", "--api-socket", sock, "--json", *args],
                       capture_output=True, text=True)
    return r.returncode, r.stdout, r.stderr

def http_get(sock, path):
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock)
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: vmm\r\nConnection: close\r\n\r\n".encode())
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    return json.loads(data.split(b"\r\n\r\n", 1)[1])

def one(cmdline, addr, touched_mib, extra=(), dst_api=None, src_extra=(), tolerate=False):
    sock = os.path.join(work, "src.sock")
    for p in (sock, os.path.join(work, "dst.sock")):
        if os.path.exists(p):
            os.unlink(p)
    dargs = [vmm, "run", "--incoming", addr, "--migration-key", key]
    if dst_api:
        if os.path.exists(dst_api):
            os.unlink(dst_api)
        dargs += ["--api-socket", dst_api]
    dst = subprocess.Popen(dargs, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    dst.stderr.readline()
    src_out = open(os.path.join(work, "src.out"), "w+")
    src_err = open(os.path.join(work, "src.err"), "w+")
    src = subprocess.Popen([vmm, "run", "--vcpus", "2", "--mem", "1G", "--kernel", guest,
                            "--cmdline", cmdline, "--api-socket", sock, *src_extra],
                           stdout=src_out, stderr=src_err)
    wait(lambda: os.path.exists(sock), "the source's API")
    def resident():
        rc, out, _ = api(sock, "vm", "show")
        return json.loads(out)["memory"]["resident_mib"] if rc == 0 else 0
    wait(lambda: resident() >= touched_mib, "guest memory")
    def guest_rounds():
        src_out.flush()
        with open(src_out.name) as f:
            return sum(1 for line in f if "memstress round=" in line)
    before = guest_rounds()
    rc, out, err = api(sock, "migrate", "start", "--to", addr, "--key", key, *extra)
    src.wait(60)
    during = guest_rounds() - before
    seen = None
    if rc == 0 and dst_api:
        def complete():
            r, o, _ = api(dst_api, "migrate", "show")
            return r == 0 and (json.loads(o).get("incoming") or {}).get("state") == "complete"
        wait(complete, "the destination's post-copy")
        seen = (json.loads(api(dst_api, "migrate", "show")[1])["incoming"],
                http_get(dst_api, "/vm/metrics"))
    dst.kill()
    dst.wait()
    if rc != 0:
        with open(src_err.name) as f:
            why = [l.strip() for l in f if l.startswith("vmm:")]
        if tolerate:
            return None, why[-1] if why else err.strip()
        raise SystemExit(f"migration failed: {err} {why}")
    status = json.loads(out)
    status["guest_rounds"] = during
    return status, seen

rows = [
    ("idle, 1 GiB touched", "mode=0 rounds=1 bytes=1008M stride=4096 hold=1", 1000),
    ("writer 64 MiB", "mode=0 rounds=100000 bytes=64M stride=4096", 60),
    ("writer 256 MiB", "mode=0 rounds=100000 bytes=256M stride=4096", 250),
]
port = 47000 + os.getpid() % 1000
if section("precopy"):
    print(f"{'guest':22} {'stream':6} {'total s':>8} {'downtime ms':>12} {'rounds':>6} {'pages sent':>11}  pages per round")
    for name, cmdline, mib in rows:
        for kind in ("unix", "tcp"):
            res = []
            for _ in range(repeat):
                addr = f"unix:{work}/dst.sock" if kind == "unix" else f"tcp:127.0.0.1:{port}"
                port += 1
                res.append(one(cmdline, addr, mib)[0])
            res.sort(key=lambda r: r["total_ms"])
            m = res[len(res) // 2]
            print(f"{name:22} {kind:6} {m['total_ms']/1e3:8.2f} {m['downtime_ms']:12.1f} "
                  f"{len(m['pages_per_round']):6} {m['pages_sent']:11}  {m['pages_per_round'][:8]}")
    print(f"(median of {repeat} by total time; downtime: vCPUs parked on the source to Go sent, "
          "which includes the destination's restore)")
    print()
if section("postcopy"):
    print(f"{'post-copy':22} {'push':>9} {'resume ms':>9} {'total s':>8} {'requests':>8} "
          f"{'asked':>7} {'pushed':>7} {'p50 us':>7} {'p99 us':>7}  blocktime ms per vCPU")
    for name, cmdline, mib in rows:
        for push in ("0", "100", "1"):
            res = []
            for _ in range(repeat):
                res.append(one(cmdline, f"unix:{work}/dst.sock", mib,
                               ("--mode", "postcopy", "--max-postcopy-bandwidth", push),
                               os.path.join(work, "dst-api.sock")))
            res.sort(key=lambda r: r[1][0]["request_latency_p50_us"] or 0)
            s, (inc, metrics) = res[len(res) // 2]
            block = [round(v["blocktime_seconds"] * 1e3, 1) for v in metrics["vcpus"]]
            label = "unlimited" if push == "0" else f"{push} MiB/s"
            f = lambda v: f"{v:7.0f}" if v is not None else "      -"
            print(f"{name:22} {label:>9} {s['downtime_ms']:9.1f} {s['total_ms']/1e3:8.2f} "
                  f"{inc['requests']:8} {inc['pages_requested']:7} {inc['pages_pushed']:7} "
                  f"{f(inc['request_latency_p50_us'])} {f(inc['request_latency_p99_us'])}  {block}")
    print(f"(median of {repeat} by request latency p50; latency: the destination's request to "
          "the answer's arrival; blocktime: time each vCPU waited for memory, all its faults)")
    print()
if section("dirty"):
    # The writers write without pause (check=0) and are held in pre-copy
    # for 20 rounds (a 1 ms downtime budget is never met), so each kind
    # logs seconds of steady writing.
    steady = [rows[0]] + [(n, c + " check=0", m) for n, c, m in rows[1:]] + [
        ("writer 16 MiB, 16/page", "mode=0 rounds=100000 bytes=16M stride=256 check=0", 14)]
    print(f"{'dirty log':22} {'kind':10} {'total s':>8} {'rounds':>6} {'pages/round':>11} "
          f"{'entries/round':>13} {'log us/round':>12} {'full exits':>10} {'lost':>4} "
          f"{'guest rounds/s':>14}")
    for name, cmdline, mib in steady:
        for kind in ("bitmap", "ring:65536", "ring:4096"):
            extra = () if kind == "bitmap" else ("--dirty-log", kind, "--force-dirty-ring")
            held = () if mib > 500 else ("--max-downtime", "1", "--max-rounds", "20")
            res, failed = [], []
            for _ in range(repeat):
                s, why = one(cmdline, f"unix:{work}/dst.sock", mib, held, src_extra=extra,
                             tolerate=True)
                (res.append(s) if s else failed.append(why))
            if not res:
                print(f"{name:22} {kind:10} failed {len(failed)} of {repeat}: {failed[0][:100]}")
                continue
            res.sort(key=lambda r: r["total_ms"])
            m = res[len(res) // 2]
            later = m["pages_per_round"][1:] or [0]
            rate = m["guest_rounds"] / (m["total_ms"] / 1e3)
            note = f"  ({len(failed)} of {repeat} failed: {failed[0][:60]})" if failed else ""
            n = len(m["pages_per_round"])
            print(f"{name:22} {kind:10} {m['total_ms']/1e3:8.2f} {n:6} "
                  f"{sum(later) / len(later):11.0f} {m['dirty_ring_entries'] / n:13.0f} "
                  f"{m['dirty_log_ms'] * 1e3 / n:12.0f} "
                  f"{m['dirty_ring_full']:10} {m['dirty_ring_lost']:4} {rate:14.2f}{note}")
    print(f"(median of the runs that finished, by total time; pages/round: after the first; "
          "entries/round: ring entries harvested; log us/round: reading the log; "
          "guest rounds/s: the source's writer while it was moved)")
PY
