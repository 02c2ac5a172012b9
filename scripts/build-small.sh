#!/usr/bin/env bash
# The smallest postling: for a router or a Pi where every 100 KB of flash
# counts. Same code and release profile as `cargo build --release`, plus:
#
#   - the standard library is rebuilt with that profile (`-Z build-std`),
#     so LTO reaches into it and drops what postling never calls;
#   - panic = "immediate-abort": no panic messages and no backtrace code;
#   - identical functions folded into one by the linker (lld --icf=all;
#     Rust promises nothing about function addresses being distinct).
#
# The price: the release build prints a panic's message and location before
# it aborts; this one aborts at once (SIGILL or SIGTRAP, no message). Either
# way systemd restarts the daemon and nothing acknowledged is lost, but a
# bug report from this build has no message to quote: reproduce it with the
# normal build.
#
# Both are unstable cargo/rustc features; RUSTC_BOOTSTRAP=1 enables them on
# the stable toolchain (which needs its rust-src component). The build goes
# to target/small/, so the normal target/ is left alone.
#
#   scripts/build-small.sh [--test] [TARGET]     (default aarch64-unknown-linux-musl)
#
# Prints the binary's path and size, and fails if it is larger than
# BUDGET bytes (default 1500000). --test then runs the whole integration
# suite against it (POSTLING_TEST_BIN), under qemu for an ARM target
# (scripts/test-aarch64.sh sets up binfmt_misc for aarch64).
set -euo pipefail
cd "$(dirname "$0")/.."

run_tests=0
if [ "${1:-}" = --test ]; then
  run_tests=1
  shift
fi
target=${1:-aarch64-unknown-linux-musl}
budget=${BUDGET:-1500000}

rustup component add rust-src >/dev/null
rustup target add "$target" >/dev/null

export RUSTC_BOOTSTRAP=1 CARGO_PROFILE_RELEASE_PANIC=immediate-abort
RUSTFLAGS="${RUSTFLAGS:-} -C link-arg=--icf=all" CARGO_TARGET_DIR=target/small \
  cargo build --release --target "$target" -Z build-std=std,panic_abort -Z panic-immediate-abort
unset RUSTC_BOOTSTRAP CARGO_PROFILE_RELEASE_PANIC

bin=$PWD/target/small/$target/release/postling
size=$(stat -c %s "$bin")
echo "$target small build: $bin, $size bytes (budget $budget)"
if [ "$size" -gt "$budget" ]; then
  echo "build-small: $size bytes is over the budget of $budget" >&2
  exit 1
fi

if [ "$run_tests" = 1 ]; then
  echo "$target small build: running the integration suite against it"
  POSTLING_TEST_BIN=$bin scripts/bounded.sh --target "$target" --test it
fi
