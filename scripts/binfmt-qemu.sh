#!/usr/bin/env bash
# Lets the kernel run foreign ELF files through qemu (binfmt_misc), so
# tests can start an ARM postling binary directly:
#   scripts/binfmt-qemu.sh NAME      (NAME: aarch64, arm, ... as in
#                                     /usr/lib/binfmt.d/qemu-NAME.conf)
# Mounts binfmt_misc if needed and registers qemu-NAME from Debian's
# qemu-user-static config. Exits 0 if NAME is registered afterwards, 1 if
# this machine cannot do it (no binfmt_misc, no permission).
set -euo pipefail
name=$1
binfmt=/proc/sys/fs/binfmt_misc
if [ ! -e "$binfmt/register" ]; then
  mount -t binfmt_misc binfmt_misc "$binfmt" 2>/dev/null || true
fi
if [ -e "$binfmt/register" ] && [ ! -e "$binfmt/qemu-$name" ]; then
  for conf in "/usr/lib/binfmt.d/qemu-$name.conf" "/usr/lib/binfmt.d/qemu-$name-static.conf"; do
    if [ -f "$conf" ]; then
      grep -v '^#' "$conf" >"$binfmt/register" 2>/dev/null || true
      break
    fi
  done
fi
[ -e "$binfmt/qemu-$name" ]
