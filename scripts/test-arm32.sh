#!/usr/bin/env bash
# 32-bit ARM proven without Docker or an ARM machine:
#   scripts/test-arm32.sh [TARGET]     (default arm-unknown-linux-musleabihf)
# builds the release binary (scripts/build-arm32.sh), checks that it is a
# static ARM executable whose code a Pi Zero/1 CPU runs (`--version` under
# `qemu-arm-static -cpu arm1176` for the ARMv6 target), then runs the
# whole integration suite, built for this machine, against that binary
# (POSTLING_TEST_BIN), which the kernel hands to qemu-arm (binfmt_misc).
set -euo pipefail
cd "$(dirname "$0")/.."
target=${1:-arm-unknown-linux-musleabihf}

need=()
for tool in qemu-arm-static:qemu-user-static readelf:binutils; do
  command -v "${tool%%:*}" >/dev/null || need+=("${tool#*:}")
done
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
scripts/build-arm32.sh "$target"
bin=$PWD/target/$target/release/postling

readelf -h "$bin" | grep -q 'Machine: *ARM$' || { echo "test-arm32: $bin is not an ARM executable" >&2; exit 1; }
if readelf -l "$bin" | grep -q INTERP; then
  echo "test-arm32: $bin is not static" >&2
  exit 1
fi
cpu=max
[ "$target" = arm-unknown-linux-musleabihf ] && cpu=arm1176
echo "$target: $(qemu-arm-static -cpu "$cpu" "$bin" --version) under qemu-arm -cpu $cpu, $(stat -c %s "$bin") bytes"

if scripts/binfmt-qemu.sh arm; then
  echo "$target: running the integration suite against $bin"
  POSTLING_TEST_BIN=$bin scripts/bounded.sh --test it
else
  echo "$target: binfmt_misc is not available here; only --version was run" >&2
fi
