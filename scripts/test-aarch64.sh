#!/usr/bin/env bash
# Builds postling for 64-bit ARM (aarch64-unknown-linux-musl, the Pi 3/4/5
# target) without Docker and runs the whole test suite under qemu, as
# .cargo/config.toml sets up: clang compiles ring's C code, rust-lld links,
# qemu-aarch64-static runs the test binaries. The integration tests also
# start the ARM `postling` binary itself, which needs the kernel's
# binfmt_misc to hand ARM executables to qemu; when that cannot be set up,
# only the unit tests run, and the script says so.
set -euo pipefail
cd "$(dirname "$0")/.."
target=aarch64-unknown-linux-musl
export DEBIAN_FRONTEND=noninteractive

need=()
command -v clang >/dev/null || need+=(clang)
command -v qemu-aarch64-static >/dev/null || need+=(qemu-user-static)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null
fi
rustup target add "$target" >/dev/null

# binfmt_misc: mounted if needed, qemu registered for aarch64 ELF files.
if scripts/binfmt-qemu.sh aarch64; then
  echo "aarch64: running the whole test suite under qemu"
  suite=()
else
  echo "aarch64: binfmt_misc is not available here; running the unit tests only under qemu"
  suite=(--lib --test alloc)
fi
# With a time limit (qemu-user can deadlock a forking guest; a hang is
# stopped and retried once).
scripts/bounded.sh --target "$target" "${suite[@]}"
