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
# what it touches).
#
#   scripts/bench-migrate.sh [REPEAT]   (default 3)
set -euo pipefail
cd "$(dirname "$0")/.."
repeat=${1:-3}
scripts/setup.sh >/dev/null
cargo build --release -p vmm-cli -p vmm-guests >/dev/null
vmm=target/release/vmm
guest=$(ls -t target/release/build/vmm-guests-*/out/guests/memstress.elf | head -n 1)
work=$(mktemp -d)
trap 'pkill -P $$ 2>/dev/null || true; rm -rf "$work"' EXIT
head -c 32 /dev/urandom >"$work/key"
chmod 600 "$work/key"
python3 - "$vmm" "$guest" "$work" "$repeat" <<'PY'
import json, os, socket, subprocess, sys, time
vmm, guest, work, repeat = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
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

def one(cmdline, addr, touched_mib, extra=(), dst_api=None):
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
    src = subprocess.Popen([vmm, "run", "--vcpus", "2", "--mem", "1G", "--kernel", guest,
                            "--cmdline", cmdline, "--api-socket", sock],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait(lambda: os.path.exists(sock), "the source's API")
    def resident():
        rc, out, _ = api(sock, "vm", "show")
        return json.loads(out)["memory"]["resident_mib"] if rc == 0 else 0
    wait(lambda: resident() >= touched_mib, "guest memory")
    rc, out, err = api(sock, "migrate", "start", "--to", addr, "--key", key, *extra)
    src.wait(60)
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
        raise SystemExit(f"migration failed: {err}")
    return json.loads(out), seen

rows = [
    ("idle, 1 GiB touched", "mode=0 rounds=1 bytes=1008M stride=4096 hold=1", 1000),
    ("writer 64 MiB", "mode=0 rounds=100000 bytes=64M stride=4096", 60),
    ("writer 256 MiB", "mode=0 rounds=100000 bytes=256M stride=4096", 250),
]
port = 47000 + os.getpid() % 1000
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
PY
