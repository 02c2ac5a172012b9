#!/usr/bin/env bash
# Resident memory of ARM builds of postling on a real ARM Linux kernel, the
# measurements of scripts/bench-rss.sh made inside a virtual Pi: idle
# VmRSS; N sessions open at once, each parked in the middle of DATA; and
# the peak (VmHWM) while one 4 KiB and one 100 MiB message are received
# into a Maildir, each on a fresh server.
#
#   scripts/bench-rss-arm.sh [-n SESSIONS] BIN...     (default 100 sessions)
#
# e.g. target/aarch64-unknown-linux-musl/release/postling (the arm64
# package) or target/arm-unknown-linux-musleabihf/release/postling (armhf,
# the Pi Zero's). The qemu-user runner of the tests cannot measure this:
# there the guest binary lives inside qemu's own process. So this boots
# Debian 12's arm64 kernel (the cloud flavour, 4 KiB pages, as on a Pi 3,
# 4 or Zero 2) under qemu-system-aarch64, TCG, 2 CPUs, 512 MiB, with a
# busybox initramfs as PID 1; the binaries and the data directory are on an
# ext4 disk image, as on an SD card. 32-bit binaries run as compat tasks of
# the 64-bit kernel, whose page size and fault-around are those of a Pi
# Zero's 32-bit kernel.
#
# Downloads, once, into target/vm/: the kernel package and busybox-static
# for arm64 from deb.debian.org, each checked against the SHA256 in the
# archive's Packages index. Installs qemu-system-arm and e2fsprogs when
# they are missing (as root). The VM has no network device: its servers
# listen on its own loopback. Bounded: the VM is stopped after 30 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."

sessions=100
if [ "${1:-}" = -n ]; then
  sessions=$2
  shift 2
fi
[ $# -gt 0 ] || { echo "usage: $0 [-n SESSIONS] BIN..." >&2; exit 2; }
for bin in "$@"; do
  file -b "$bin" | grep -q 'ARM.*statically linked\|aarch64.*statically linked\|ARM.*static-pie\|aarch64.*static-pie' ||
    { echo "$bin: not a static ARM binary ($(file -b "$bin"))" >&2; exit 2; }
done

need=()
command -v qemu-system-aarch64 >/dev/null || need+=(qemu-system-arm)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
command -v cpio >/dev/null || need+=(cpio)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

cache=target/vm
mkdir -p "$cache"
mirror=http://deb.debian.org/debian
index=$cache/Packages-arm64
if [ ! -s "$index" ]; then
  curl -sSf --max-time 300 "$mirror/dists/bookworm/main/binary-arm64/Packages.xz" | xz -dc >"$index.new"
  mv "$index.new" "$index"
fi
# fetch PACKAGE-REGEX: the newest matching package's .deb, checked, unpacked
# into target/vm/<package>/; prints that directory.
fetch() {
  local entry name file sum
  entry=$(awk -v re="^($1)\$" '
    /^Package: / { keep = ($2 ~ re); name = $2 }
    keep && /^Version: / { version = $2 }
    keep && /^Filename: / { file = $2 }
    keep && /^SHA256: / { print name, version, file, $2 }' "$index" |
    sort -k2,2V | tail -1)
  [ -n "$entry" ] || { echo "no package matching $1 in the arm64 index" >&2; return 1; }
  read -r name _ file sum <<<"$entry"
  if [ ! -d "$cache/$name" ]; then
    curl -sSf --max-time 600 -o "$cache/$name.deb" "$mirror/$file"
    echo "$sum  $cache/$name.deb" | sha256sum -c --quiet
    dpkg-deb -x "$cache/$name.deb" "$cache/$name.tmp"
    mv "$cache/$name.tmp" "$cache/$name"
  fi
  echo "$cache/$name"
}
kpkg=$(fetch 'linux-image-[0-9.]+-[0-9]+-cloud-arm64-unsigned')
bbpkg=$(fetch busybox-static)
kernel=$(ls "$kpkg"/boot/vmlinuz-*)
modules=$(ls -d "$kpkg"/lib/modules/*)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work"/root/{bin,dev,proc,sys,tmp,mnt,mod} "$work/disk"
cp "$bbpkg/bin/busybox" "$work/root/bin/"
for m in drivers/virtio/virtio drivers/virtio/virtio_ring drivers/virtio/virtio_mmio drivers/block/virtio_blk; do
  cp "$modules/kernel/$m.ko" "$work/root/mod/"
done
i=0
for bin in "$@"; do
  i=$((i + 1))
  cp "$bin" "$work/disk/postling-$i"
  echo "$bin" >"$work/disk/postling-$i.name"
done
echo "$sessions" >"$work/disk/sessions"

cat >"$work/root/init" <<'EOF'
#!/bin/busybox sh
# PID 1 of the VM: for each /mnt/postling-N, print "result N what KiB"
# lines on the console, then power off.
/bin/busybox --install -s /bin
mount -t devtmpfs dev /dev
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t tmpfs tmp /tmp
for m in virtio virtio_ring virtio_mmio virtio_blk; do insmod /mod/$m.ko; done
for _ in $(seq 50); do [ -b /dev/vda ] && break; sleep 0.1; done
mount -t ext4 /dev/vda /mnt
ip link set lo up
sessions=$(cat /mnt/sessions)
pid=

start() {
  rm -rf /mnt/d && mkdir -p /mnt/d
  printf '[limits]\nmax_connections = %d\nmax_connections_per_ip = %d\nmax_message_size = "200M"\n' \
    $((sessions + 8)) $((sessions + 8)) >/mnt/d/postling.toml
  "$1" serve --config /mnt/d/postling.toml --listen 127.0.0.1:2525 --data-dir /mnt/d/data 2>/mnt/d/log &
  pid=$!
  for _ in $(seq 300); do grep -q 'listening addr=' /mnt/d/log && break; sleep 0.1; done
  grep -q 'listening addr=' /mnt/d/log || { echo "result $2 error the server did not start"; cat /mnt/d/log; }
  sleep 1
}
stop() { kill "$pid"; wait "$pid"; pid=; }
status() { awk -v k="$1:" '$1 == k {print $2}' "/proc/$pid/status"; }
# The client side of an SMTP dialogue from a file of lines: after the
# greeting, one line at a time, as a client that waits for replies does.
dialogue() {
  sleep 1
  while IFS= read -r l; do printf '%s\r\n' "$l"; sleep 0.3; done <"$1"
}

printf 'EHLO vm.test\nMAIL FROM:<a@vm.test>\nRCPT TO:<alice@localhost>\nDATA\n' >/tmp/head.txt
{ cat /tmp/head.txt; printf 'Subject: held open\n\nxxxxxxxx\n'; } >/tmp/open.txt
# 4 KiB and 100 MiB messages of 78-octet lines.
line=$(printf '%076d\r' 0)
{ printf 'Subject: size test\r\n\r\n'; yes "$line" | head -n 52; } >/mnt/small.eml
{ printf 'Subject: size test\r\n\r\n'; yes "$line" | head -n 1344328; } >/mnt/large.eml

peak_for() {
  start "$1" "$2"
  { dialogue /tmp/head.txt; cat "$3"; printf '.\r\n'; sleep 2; printf 'QUIT\r\n'; sleep 1; } |
    nc 127.0.0.1 2525 >/tmp/reply.txt
  [ "$(ls /mnt/d/data/mail/alice/new | wc -l)" = 1 ] ||
    { echo "result $2 error the $4 message was not delivered"; cat /tmp/reply.txt /mnt/d/log; }
  echo "result $2 peak-$4 $(status VmHWM)"
  stop
}

for bin in /mnt/postling-?; do
  n=${bin#/mnt/postling-}
  start "$bin" "$n"
  for k in VmRSS RssAnon RssFile; do echo "result $n idle-$k $(status $k)"; done
  i=0
  while [ $i -lt "$sessions" ]; do
    { dialogue /tmp/open.txt; sleep 60; } | nc 127.0.0.1 2525 >/dev/null &
    i=$((i + 1))
  done
  # Every session has its thread (the acceptor, the relay thread and one
  # per session), then the dialogues (eight lines, 0.3 s apart) reach DATA.
  for _ in $(seq 120); do
    [ "$(ls /proc/$pid/task | wc -l)" -gt "$sessions" ] && break
    sleep 1
  done
  sleep 15
  echo "result $n sessions $(status VmRSS)"
  stop
  kill $(jobs -p) 2>/dev/null
  wait 2>/dev/null
  peak_for "$bin" "$n" /mnt/small.eml 4k
  peak_for "$bin" "$n" /mnt/large.eml 100m
done
echo "result - done"
umount /mnt
poweroff -f
EOF
chmod +x "$work/root/init"
(cd "$work/root" && find . | cpio -o -H newc --quiet | gzip -1) >"$work/initrd.gz"
# Room for the binaries, two copies of the 100 MiB message (the file and
# the delivered one) and the servers' data.
mkfs.ext4 -q -d "$work/disk" "$work/disk.img" 512M

echo "booting $(basename "$kernel") under qemu-system-aarch64 (TCG; this takes several minutes)" >&2
timeout 1800 qemu-system-aarch64 -M virt -cpu cortex-a72 -smp 2 -m 512M \
  -nographic -no-reboot -kernel "$kernel" -initrd "$work/initrd.gz" \
  -append "console=ttyAMA0 quiet panic=-1 rdinit=/init" \
  -drive "file=$work/disk.img,format=raw,if=none,id=d0" -device virtio-blk-device,drive=d0 \
  >"$work/console.log" 2>&1 || true
tr -d '\r' <"$work/console.log" >"$work/console.txt"
if ! grep -q '^result - done' "$work/console.txt" || grep -q '^result [0-9]* error' "$work/console.txt"; then
  echo "the measurement failed; the VM's console:" >&2
  cat "$work/console.txt" >&2
  exit 1
fi

get() { awk -v n="$1" -v k="$2" '$1 == "result" && $2 == n && $3 == k {print $4}' "$work/console.txt"; }
echo "kernel: $(basename "$kernel") ($(basename "$kpkg")), qemu-system-aarch64 $(qemu-system-aarch64 --version | awk 'NR==1 {print $4}')"
echo "| binary | bytes | idle VmRSS | of it anon / file | $sessions sessions in DATA | peak, 4 KiB message | peak, 100 MiB message |"
echo "|---|---|---|---|---|---|---|"
i=0
for bin in "$@"; do
  i=$((i + 1))
  echo "| $bin | $(stat -c %s "$bin") | $(get $i idle-VmRSS) | $(get $i idle-RssAnon) / $(get $i idle-RssFile) | $(get $i sessions) | $(get $i peak-4k) | $(get $i peak-100m) |"
done
