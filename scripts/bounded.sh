#!/usr/bin/env bash
# Runs `cargo test ARGS` under a wall-clock limit, and once more if (and
# only if) it hit the limit. For the suites that run under qemu-user: a
# guest process that forks while it has other threads can deadlock inside
# qemu (seen once in CI: a test's child stuck in a futex in
# qemu-aarch64-static before its exec), and without a limit that hangs CI
# until the machine's own. A failing test is never retried; only a hang is.
#
#   scripts/bounded.sh [CARGO TEST ARG]...
#
# The tests are built first (`--no-run`), outside the limit, so a cold
# build is not counted. TEST_TIME_LIMIT sets the limit in seconds (default
# 600; the slowest suite, aarch64 under qemu, takes about a minute here).
# The run is in its own process group, and the whole group is stopped when
# the time is up (TERM, then KILL 30 s later), so no server a test started
# survives.
set -euo pipefail
cd "$(dirname "$0")/.."
limit=${TEST_TIME_LIMIT:-600}

cargo test "$@" --no-run
for attempt in 1 2; do
  rc=0
  timeout --kill-after=30 "$limit" cargo test "$@" || rc=$?
  # 124: stopped by TERM at the limit; 137: by KILL after it.
  if [ "$rc" -ne 124 ] && [ "$rc" -ne 137 ]; then exit "$rc"; fi
  echo "bounded: 'cargo test $*' was still running after ${limit}s (attempt $attempt of 2) and was stopped" >&2
done
exit "$rc"
