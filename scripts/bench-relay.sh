#!/usr/bin/env bash
# Relay throughput: smtp-source sends M messages of 4 KiB into postling,
# which relays them through a smarthost that is Postfix's smtp-sink (no
# disk). Measures from the first message sent until postling's queue is
# empty again. Loopback only; bounded; stops what it started by PID.
#
#   scripts/bench-relay.sh [MESSAGES] [SESSIONS...]   (default 1000, sessions 1 10)
# Needs Debian's postfix package for smtp-source and smtp-sink. BIN=path
# measures another build.
set -euo pipefail
messages=${1:-1000}
shift || true
if [ $# -gt 0 ]; then sessions=("$@"); else sessions=(1 10); fi
cd "$(dirname "$0")/.."
command -v smtp-source >/dev/null || PATH=$PATH:/usr/sbin
if [ -n "${BIN:-}" ]; then
  bin=$(realpath "$BIN")
else
  cargo build --release --quiet
  bin=$PWD/target/release/postling
fi
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null && wait "$p" 2>/dev/null; done; rm -rf "$work"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
sink_port=$(free_port)
# As root, smtp-sink wants a user to drop to.
sink_user=(); [ "$(id -u)" = 0 ] && sink_user=(-u nobody)
smtp-sink "${sink_user[@]}" 127.0.0.1:"$sink_port" 1000 &
pids+=($!)
sleep 0.5
kill -0 "${pids[0]}" || { echo "smtp-sink did not start" >&2; exit 1; }

for s in "${sessions[@]}"; do
  rm -rf "$work/data"
  cat >"$work/postling.toml" <<TOML
[limits]
max_connections = 200
max_connections_per_ip = 200
[relay]
smarthost = "127.0.0.1:$sink_port"
smarthost_tls = "none"
TOML
  "$bin" serve --config "$work/postling.toml" --listen 127.0.0.1:0 --data-dir "$work/data" 2>"$work/log" &
  pid=$!
  pids+=($pid)
  for _ in $(seq 200); do grep -q 'listening addr=' "$work/log" 2>/dev/null && break; sleep 0.05; done
  port=$(grep -o 'listening addr=[^ ]*' "$work/log" | head -1 | cut -d: -f2)
  [ -n "$port" ] || { echo "postling did not start:" >&2; cat "$work/log" >&2; exit 1; }
  start=$(date +%s.%N)
  timeout 600 smtp-source -s "$s" -m "$messages" -l 4096 -f a@bench.test -t user@remote.test 127.0.0.1:"$port"
  [ -n "${BENCH_VERBOSE:-}" ] && echo "received after $(python3 -c "import time; print(round(time.time()-$start,2))") s, queue $(ls "$work/data/queue" | wc -l)" >&2
  # Until every queued message has been relayed (bounded: 10 minutes).
  for _ in $(seq 12000); do
    [ -z "$(ls -A "$work/data/queue" 2>/dev/null)" ] && break
    sleep 0.05
  done
  end=$(date +%s.%N)
  cpu=$(awk '{print $14 + $15}' "/proc/$pid/stat")
  ticks=$(getconf CLK_TCK)
  python3 - "$start" "$end" "$messages" "$s" "$cpu" "$ticks" <<'PY'
import sys
start, end, m, s, cpu, ticks = map(float, sys.argv[1:])
secs = end - start
print(f"| {int(s)} | {int(m)} | {secs:.2f} s | {m/secs:.0f} msg/s | {cpu/ticks/m*1e6:.0f} µs |")
PY
  kill "$pid"; wait "$pid" 2>/dev/null || true
done
