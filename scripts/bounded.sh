#!/usr/bin/env bash
# Runs a test command under a wall-clock limit, and once more if (and only
# if) it hit the limit. For the suites that run under qemu-user: a guest
# process that forks while it has other threads can deadlock inside qemu
# (seen once in CI: a test's child stuck in a futex in qemu-aarch64-static
# before its exec), and without a limit that hangs CI until the machine's
# own. A failing test is never retried; only a hang is.
#
#   scripts/bounded.sh COMMAND [ARG]...
#
# TEST_TIME_LIMIT sets the limit in seconds (default 600; the slowest
# suite, aarch64 under qemu, takes about a minute here). The command runs
# in its own process group, and the whole group is stopped when the time is
# up (TERM, then KILL 30 s later), so no server a test started survives.
set -uo pipefail
limit=${TEST_TIME_LIMIT:-600}
[ $# -gt 0 ] || { echo "usage: scripts/bounded.sh COMMAND [ARG]..." >&2; exit 2; }

for attempt in 1 2; do
  timeout --kill-after=30 "$limit" "$@"
  rc=$?
  # 124: stopped by TERM at the limit; 137: by KILL after it.
  if [ "$rc" -ne 124 ] && [ "$rc" -ne 137 ]; then exit "$rc"; fi
  echo "bounded: '$*' was still running after ${limit}s (attempt $attempt of 2) and was stopped" >&2
done
exit "$rc"
