#!/usr/bin/env bash
# Builds Debian packages of postling with plain dpkg-deb:
#   scripts/build-deb.sh [--no-build] [ARCH[:RUST_TARGET]...]
#                                       (default: amd64 arm64 armhf)
# giving target/deb/postling_<version>_<arch>.deb. Each package holds one
# static musl binary, so it depends on no libc:
#   amd64  x86_64-unknown-linux-musl
#   arm64  aarch64-unknown-linux-musl      (Pi 3/4/5 on a 64-bit OS)
#   armhf  arm-unknown-linux-musleabihf    (ARMv6 + VFP: every Pi on a 32-bit
#                                            OS, Zero/1 included, as Raspbian's
#                                            armhf needs)
# ARCH:RUST_TARGET builds another target for that architecture, e.g.
# armhf:armv7-unknown-linux-musleabihf for Debian's own (ARMv7) armhf.
# The cross targets build without Docker as .cargo/config.toml sets up:
# rustup's target, clang for ring's C code, rust-lld to link.
# --no-build packages target/<target>/release/postling as it is (built
# before, e.g. by `cross`), after checking that it is a static binary for
# the architecture. DEB_MAINTAINER overrides the Maintainer field; SOURCE_DATE_EPOCH (default:
# the last commit's time) sets the files' dates.
set -euo pipefail
cd "$(dirname "$0")/.."

build=1
if [ "${1:-}" = "--no-build" ]; then
  build=0
  shift
fi
if [ $# -eq 0 ]; then
  set -- amd64 arm64 armhf
fi

pkgid=$(cargo pkgid --offline 2>/dev/null || cargo pkgid)
version=${pkgid##*[#@]}
maintainer=${DEB_MAINTAINER:-$(git log -1 --format='%an <%ae>' 2>/dev/null || true)}
maintainer=${maintainer:-postling maintainers <postling@users.noreply.github.com>}
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
out=target/deb
mkdir -p "$out"

# The Rust target and the ELF machine (readelf -h) for each Debian arch.
default_target() {
  case "$1" in
    amd64) echo x86_64-unknown-linux-musl ;;
    arm64) echo aarch64-unknown-linux-musl ;;
    armhf) echo arm-unknown-linux-musleabihf ;;
    *) echo "build-deb: unknown architecture '$1' (amd64, arm64, armhf)" >&2; return 1 ;;
  esac
}
elf_machine() {
  case "$1" in
    amd64) echo "Advanced Micro Devices X86-64" ;;
    arm64) echo "AArch64" ;;
    armhf) echo "ARM" ;;
  esac
}

build_one() {
  local arch=${1%%:*} target
  if [ "$1" != "$arch" ]; then target=${1#*:}; else target=$(default_target "$arch"); fi
  default_target "$arch" >/dev/null

  local bin=target/$target/release/postling
  if [ "$build" = 1 ] && [[ $target == arm*-unknown-linux-musleabihf ]]; then
    # 32-bit ARM: rustup's target where it can be had, else std and musl
    # built here (see the script).
    scripts/build-arm32.sh "$target"
  elif [ "$build" = 1 ]; then
    # What the build needs on a fresh machine: the target's standard
    # library and clang for ring (as scripts/test-aarch64.sh installs).
    rustup target add "$target" >/dev/null 2>&1 ||
      echo "build-deb: rustup could not add $target; building anyway" >&2
    if ! command -v clang >/dev/null; then
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq clang >/dev/null
    fi
    echo "== $arch: cargo build --release --locked --target $target"
    cargo build --release --locked --target "$target"
  elif [ ! -f "$bin" ]; then
    echo "build-deb: --no-build, but there is no $bin" >&2
    return 1
  fi

  # The package must hold a static binary for the right machine.
  local header
  header=$(readelf -h "$bin")
  if ! grep -q "Machine: *$(elf_machine "$arch")\$" <<<"$header"; then
    echo "build-deb: $bin is not an $arch binary:" >&2
    grep Machine <<<"$header" >&2
    return 1
  fi
  if readelf -l "$bin" | grep -q 'Requesting program interpreter'; then
    echo "build-deb: $bin is dynamically linked; expected a static musl binary" >&2
    return 1
  fi

  local stage=$out/stage-$arch
  local root=$stage/root
  rm -rf "$stage"
  mkdir -p "$root/DEBIAN"

  install -D -m 0755 "$bin" "$root/usr/sbin/postling"
  # sendmail(8) and mailq(1) are the same binary, chosen by argv[0].
  ln -s postling "$root/usr/sbin/sendmail"
  install -d -m 0755 "$root/usr/bin" "$root/usr/lib"
  ln -s ../sbin/postling "$root/usr/bin/mailq"
  ln -s ../sbin/postling "$root/usr/lib/sendmail"

  # The unit names /usr/local/bin/postling (a hand install); the package's
  # binary is /usr/sbin/postling.
  install -d -m 0755 "$root/lib/systemd/system"
  sed 's|/usr/local/bin/postling|/usr/sbin/postling|g' systemd/postling.service \
    >"$root/lib/systemd/system/postling.service"
  if grep -q /usr/local/bin "$root/lib/systemd/system/postling.service" ||
    ! grep -q '^ExecStart=/usr/sbin/postling serve ' "$root/lib/systemd/system/postling.service"; then
    echo "build-deb: unexpected ExecStart= in systemd/postling.service" >&2
    return 1
  fi

  install -D -m 0644 packaging/deb/postling.toml "$root/etc/postling/postling.toml"

  local doc=$root/usr/share/doc/postling
  install -d -m 0755 "$doc/examples"
  gzip -9n <README.md >"$doc/README.md.gz"
  install -m 0644 systemd/postling.toml.example "$doc/examples/postling.toml.example"
  install -m 0644 packaging/deb/copyright "$doc/copyright"
  {
    echo "postling ($version) unstable; urgency=medium"
    echo
    echo "  * Built from git commit $commit for $target."
    echo
    echo " -- $maintainer  $(date -u -R -d "@$SOURCE_DATE_EPOCH")"
  } | gzip -9n >"$doc/changelog.gz"

  install -D -m 0644 packaging/deb/lintian-overrides "$root/usr/share/lintian/overrides/postling"

  install -m 0755 packaging/deb/postinst packaging/deb/prerm packaging/deb/postrm "$root/DEBIAN/"
  install -m 0644 packaging/deb/conffiles "$root/DEBIAN/conffiles"

  # Modes and dates independent of the umask and the checkout.
  find "$root" -type d -exec chmod 0755 {} +
  find "$root" -type f ! -path "$root/DEBIAN/*" ! -path "$root/usr/sbin/*" -exec chmod 0644 {} +
  (cd "$root" && find . -type f ! -path './DEBIAN/*' -printf '%P\0' | LC_ALL=C sort -z |
    xargs -0 md5sum) >"$root/DEBIAN/md5sums"
  chmod 0644 "$root/DEBIAN/md5sums"

  local size
  size=$(du -k -s --apparent-size --exclude=DEBIAN "$root" | cut -f1)
  sed -e "s|@VERSION@|$version|" -e "s|@ARCH@|$arch|" \
    -e "s|@MAINTAINER@|$maintainer|" -e "s|@INSTALLED_SIZE@|$size|" \
    packaging/deb/control.in >"$root/DEBIAN/control"
  chmod 0644 "$root/DEBIAN/control"
  find "$root" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +

  local deb=$out/postling_${version}_${arch}.deb
  dpkg-deb --build --root-owner-group -Zxz "$root" "$deb" >/dev/null
  rm -rf "$stage"
  echo "== $arch: $deb ($(stat -c %s "$deb") bytes; binary $(stat -c %s "$bin") bytes)"
}

for a in "$@"; do
  build_one "$a"
done
