#!/usr/bin/env bash
# Measures the resident memory of `postling serve`: idle, and with N sessions
# open at once (each in the middle of DATA). Loopback only; bounded; stops
# the server it started by its PID.
#
#   scripts/bench-rss.sh [SESSIONS]      (default 50)
set -euo pipefail
sessions=${1:-50}
cd "$(dirname "$0")/.."
cargo build --release --quiet
bin=target/release/postling
work=$(mktemp -d)
trap 'kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null; rm -rf "$work"' EXIT

# The defaults, except that all sessions come from one address here.
printf '[limits]\nmax_connections = %d\nmax_connections_per_ip = %d\n' \
  $((sessions + 8)) $((sessions + 8)) >"$work/postling.toml"
"$bin" serve --config "$work/postling.toml" --listen 127.0.0.1:0 --data-dir "$work/data" 2>"$work/log" &
pid=$!
for _ in $(seq 100); do
  grep -q 'listening addr=' "$work/log" && break
  sleep 0.1
done
addr=$(grep -o 'listening addr=[^ ]*' "$work/log" | head -1 | cut -d= -f2)
sleep 1
rss() { awk '/^VmRSS/ {print $2}' "/proc/$pid/status"; }
idle=$(rss)

loaded=$(python3 - "$addr" "$sessions" "$pid" <<'PY'
import socket, sys, time
host, port = sys.argv[1].rsplit(":", 1)
n, pid = int(sys.argv[2]), sys.argv[3]
socks = []
for i in range(n):
    s = socket.create_connection((host, int(port)), timeout=10)
    f = s.makefile("rb")
    def reply():
        while True:
            line = f.readline()
            if line[3:4] != b"-":
                return line
    reply()
    s.sendall(b"EHLO bench.test\r\n"); reply()
    s.sendall(b"MAIL FROM:<a@bench.test>\r\n"); reply()
    s.sendall(b"RCPT TO:<alice@localhost>\r\n"); reply()
    s.sendall(b"DATA\r\n"); reply()
    s.sendall(b"Subject: held open\r\n\r\n" + b"x" * 70 + b"\r\n")
    socks.append((s, f))
time.sleep(1)
with open(f"/proc/{pid}/status") as st:
    print([l.split()[1] for l in st if l.startswith("VmRSS")][0])
for s, f in socks:
    s.sendall(b".\r\nQUIT\r\n")
    s.close()
PY
)
echo "| postling serve, idle | ${idle} KiB |"
echo "| postling serve, ${sessions} sessions in DATA | ${loaded} KiB |"
