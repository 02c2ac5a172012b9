#!/usr/bin/env bash
# Resident memory of `postling serve`: idle; with N sessions open at once
# (each parked in the middle of DATA); and the peak (VmHWM) while receiving
# one 4 KiB message and one 100 MiB message, each on a fresh server, to show
# that a message's size does not change the memory it costs. Loopback only;
# bounded; stops every server it started by its PID.
#
#   scripts/bench-rss.sh [SESSIONS]      (default 100)
#   BIN=path/to/postling scripts/bench-rss.sh   (e.g. the static musl build)
set -euo pipefail
sessions=${1:-100}
cd "$(dirname "$0")/.."
if [ -z "${BIN:-}" ]; then
  cargo build --release --quiet
  BIN=target/release/postling
fi
work=$(mktemp -d)
pid=
stop() { if [ -n "$pid" ]; then kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null; fi; pid=; }
trap 'stop; rm -rf "$work"' EXIT

# The defaults, except that all sessions come from one address here and
# the size limit admits the 100 MiB message.
start() {
  rm -rf "$work/data"
  printf '[limits]\nmax_connections = %d\nmax_connections_per_ip = %d\nmax_message_size = "200M"\n' \
    $((sessions + 8)) $((sessions + 8)) >"$work/postling.toml"
  "$BIN" serve --config "$work/postling.toml" --listen 127.0.0.1:0 --data-dir "$work/data" 2>"$work/log" &
  pid=$!
  for _ in $(seq 100); do
    grep -q 'listening addr=' "$work/log" && break
    sleep 0.1
  done
  addr=$(grep -o 'listening addr=[^ ]*' "$work/log" | head -1 | cut -d= -f2)
  [ -n "$addr" ] || { echo "postling did not start:" >&2; cat "$work/log" >&2; exit 1; }
  sleep 1
}
status() { awk -v k="$1:" '$1 == k {print $2}' "/proc/$pid/status"; }

start
idle=$(status VmRSS)
loaded=$(timeout 120 python3 - "$addr" "$sessions" "$pid" <<'PY'
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
stop

# Peak memory while one message of SIZE bytes is received and delivered.
peak_for() {
  start
  timeout 300 python3 - "$addr" "$1" <<'PY'
import smtplib, sys
host, port = sys.argv[1].rsplit(":", 1)
size = int(sys.argv[2])
line = b"x" * 76 + b"\r\n"
body = b"Subject: size test\r\n\r\n" + line * (size // len(line))
with smtplib.SMTP(host, int(port), timeout=120) as s:
    s.sendmail("a@bench.test", ["alice@localhost"], body)
PY
  local n
  n=$(find "$work/data/mail/alice/new" -type f | wc -l)
  [ "$n" = 1 ] || { echo "the $1-byte message was not delivered" >&2; exit 1; }
  status VmHWM
  stop
}
small=$(peak_for 4096)
large=$(peak_for $((100 * 1024 * 1024)))

echo "binary: $BIN ($(stat -c %s "$BIN") bytes)"
echo "| measurement | KiB |"
echo "|---|---|"
echo "| idle (VmRSS) | ${idle} |"
echo "| ${sessions} sessions in DATA (VmRSS) | ${loaded} |"
echo "| peak while receiving one 4 KiB message (VmHWM) | ${small} |"
echo "| peak while receiving one 100 MiB message (VmHWM) | ${large} |"
