#!/usr/bin/env bash
# Checks systemd/postling.service with `systemd-analyze verify`. The unit
# names /usr/local/bin/postling; a temporary copy points at the binary
# built here instead, since verify checks that ExecStart is executable.
#   scripts/verify-unit.sh [BINARY]   (default target/debug/postling)
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$(realpath "${1:-target/debug/postling}")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
sed "s|/usr/local/bin/postling|$bin|" systemd/postling.service >"$work/postling.service"
out=$(systemd-analyze verify "$work/postling.service" 2>&1) || { echo "$out" >&2; exit 1; }
# verify prints warnings without failing; treat any line about our unit as an error.
if echo "$out" | grep -q "postling.service"; then
  echo "$out" >&2
  exit 1
fi
echo "systemd-analyze verify: systemd/postling.service OK"
