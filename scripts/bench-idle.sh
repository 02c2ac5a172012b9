#!/usr/bin/env bash
# Start-up time and idle behaviour of `postling serve`, for SD-card boxes:
#
# 1. Start-up: from exec to the first SMTP greeting read on a fixed
#    loopback port, RUNS times (fresh data_dir each time, and again with
#    the data_dir of the previous run), printing the median and the worst.
# 2. Idle writes: attaches `strace -f` to a server that has been idle for
#    2 s and records every write-like system call (write, fsync, rename,
#    unlink, mkdir, open for writing...) for IDLE seconds. A server that
#    leaves an SD card alone records nothing.
#
#   scripts/bench-idle.sh [RUNS] [IDLE]     (default 20 runs, 60 s)
#   BIN=path/to/postling scripts/bench-idle.sh
# Loopback only; bounded; stops what it started by PID.
set -euo pipefail
runs=${1:-20}
idle=${2:-60}
cd "$(dirname "$0")/.."
if [ -z "${BIN:-}" ]; then
  cargo build --release --quiet
  BIN=target/release/postling
fi
command -v strace >/dev/null || { apt-get update -qq && apt-get install -y -qq strace >/dev/null; }
work=$(mktemp -d)
pid=
stop() { if [ -n "$pid" ]; then kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null; fi; pid=; }
trap 'stop; rm -rf "$work"' EXIT

echo "binary: $BIN ($(stat -c %s "$BIN") bytes)"
timeout 300 python3 - "$BIN" "$work" "$runs" <<'PY'
import os, socket, statistics, subprocess, sys, time
binary, work, runs = sys.argv[1], sys.argv[2], int(sys.argv[3])
def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p
def once(data):
    port = free_port()
    t0 = time.perf_counter()
    p = subprocess.Popen([binary, "serve", "--listen", f"127.0.0.1:{port}", "--data-dir", data],
                         stderr=subprocess.DEVNULL)
    try:
        deadline = t0 + 10
        while time.perf_counter() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                    if s.recv(512).startswith(b"220"):
                        return (time.perf_counter() - t0) * 1000
            except OSError:
                time.sleep(0.0005)
        raise SystemExit("no greeting within 10 s")
    finally:
        p.terminate(); p.wait(timeout=30)
for label, fresh in (("new data_dir", True), ("existing data_dir", False)):
    times = []
    for i in range(runs):
        data = os.path.join(work, f"data{i}" if fresh else "data")
        times.append(once(data))
    print(f"| start-up to first greeting, {label} | median {statistics.median(times):.1f} ms | worst {max(times):.1f} ms | {runs} runs |")
PY

"$BIN" serve --listen 127.0.0.1:0 --data-dir "$work/idle" 2>"$work/log" &
pid=$!
sleep 2
timeout "$((idle + 10))" strace -f -qq -p "$pid" -o "$work/trace" \
  -e trace=write,writev,pwrite64,fsync,fdatasync,sync,syncfs,rename,renameat,renameat2,unlink,unlinkat,mkdir,mkdirat,creat,truncate,ftruncate &
spid=$!
sleep "$idle"
kill -INT "$spid" 2>/dev/null; wait "$spid" 2>/dev/null || true
calls=$(grep -vc -e '+++ exited' -e '^$' "$work/trace" || true)
echo "| write-like system calls in ${idle} s of idle (strace -f) | ${calls} |"
if [ "$calls" != 0 ]; then sed -n 1,20p "$work/trace"; fi
