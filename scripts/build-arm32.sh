#!/usr/bin/env bash
# Builds postling for 32-bit ARM without Docker:
#
#   scripts/build-arm32.sh [TARGET]
#     TARGET: arm-unknown-linux-musleabihf (default; ARMv6 + VFP: every Pi on
#             a 32-bit OS, Zero/1 included) or armv7-unknown-linux-musleabihf
#
# giving target/TARGET/release/postling, a static binary, with the release
# profile (as `scripts/build-deb.sh armhf` packages it).
#
# When `rustup target add TARGET` works, that is a plain cross build (clang
# for ring's C code and rust-lld, from .cargo/config.toml). Where rustup
# cannot download the target's standard library (these CI machines' mirror
# answers 404 for the 32-bit ARM ones), the script makes what that
# component would have brought:
#
#   - the C library: musl 1.2.3 from Debian's source tarball (checksum
#     pinned below), built with clang for the target's CPU;
#   - libunwind, from the LLVM copy in rustup's rust-src component;
#   - empty crtbegin.o/crtend.o (musl's own crt files do the work);
#
# and builds std itself from rust-src with `-Z build-std` (RUSTC_BOOTSTRAP=1
# enables it on the stable toolchain). All of it goes into
# target/arm32-sysroot/TARGET, and the link finds the crt objects, libc.a
# and libunwind.a there through the library search path: rustc looks for a
# musl target's crt objects in `-L` directories as well as in the
# toolchain's own `lib/rustlib/TARGET/lib/self-contained`, so nothing is
# written into the toolchain (which a later `rustup target add` owns).
# The C library is built once per target. Needs network access to
# deb.debian.org for the tarball the first time, and installs clang, llvm,
# make and curl with apt-get when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
target=${1:-arm-unknown-linux-musleabihf}

case "$target" in
  arm-unknown-linux-musleabihf)
    clang_target=arm-linux-musleabihf
    cpu_flags="-march=armv6 -mfpu=vfpv2 -mfloat-abi=hard -marm" ;;
  armv7-unknown-linux-musleabihf)
    clang_target=armv7-linux-musleabihf
    cpu_flags="-march=armv7-a -mfpu=vfpv3-d16 -mfloat-abi=hard" ;;
  *) echo "build-arm32: unknown target '$target'" >&2; exit 64 ;;
esac

if rustup target add "$target" >/dev/null 2>&1; then
  echo "== $target: rustup has the target; plain cross build"
  exec cargo build --release --locked --target "$target"
fi
echo "== $target: rustup cannot add the target; building musl, libunwind and std here"

need=()
for tool in clang:clang llvm-ar:llvm make:make curl:curl; do
  command -v "${tool%%:*}" >/dev/null || need+=("${tool#*:}")
done
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
rustup component add rust-src >/dev/null

musl=musl-1.2.3
musl_url=http://deb.debian.org/debian/pool/main/m/musl/musl_1.2.3.orig.tar.gz
musl_sha256=7d5b0b6062521e4627e099e4c9dc8248d32a30285e959b7eecaa780cf8cfd4a4
root=$PWD/target/arm32-sysroot
prefix=$root/$target
cc="clang --target=$clang_target $cpu_flags"

if [ ! -f "$prefix/lib/libc.a" ]; then
  mkdir -p "$root/src"
  tarball=$root/src/$musl.tar.gz
  if [ ! -f "$tarball" ]; then
    curl -sSf -o "$tarball.part" "$musl_url"
    mv "$tarball.part" "$tarball"
  fi
  echo "$musl_sha256  $tarball" | sha256sum -c --quiet
  build=$root/build-$target
  rm -rf "$build" && mkdir -p "$build"
  tar -xzf "$tarball" -C "$build" --strip-components=1
  echo "== $target: musl ($cc)"
  (cd "$build" &&
    CC="$cc" AR=llvm-ar RANLIB=llvm-ranlib ./configure --target="$clang_target" \
      --prefix="$prefix" --disable-shared >"$root/configure-$target.log" 2>&1 &&
    make -j"$(nproc)" >"$root/make-$target.log" 2>&1 &&
    make install >>"$root/make-$target.log" 2>&1) ||
    { echo "build-arm32: musl failed; see $root/*-$target.log" >&2; exit 1; }
fi

if [ ! -f "$prefix/lib/libunwind.a" ]; then
  echo "== $target: libunwind"
  src=$(rustc --print sysroot)/lib/rustlib/src/rust/src/llvm-project/libunwind
  obj=$root/unwind-$target
  rm -rf "$obj" && mkdir -p "$obj"
  flags=(--target="$clang_target" $cpu_flags -O2 -fPIC -nostdinc
    -isystem "$prefix/include" -isystem "$(clang -print-resource-dir)/include"
    -I"$src/include" -funwind-tables -fvisibility=hidden
    -D_LIBUNWIND_DISABLE_VISIBILITY_ANNOTATIONS -D_LIBUNWIND_IS_NATIVE_ONLY -DNDEBUG)
  for f in UnwindLevel1.c UnwindLevel1-gcc-ext.c Unwind-sjlj.c; do
    clang "${flags[@]}" -std=c99 -c "$src/src/$f" -o "$obj/${f%.*}.o"
  done
  for f in libunwind.cpp Unwind-EHABI.cpp; do
    clang "${flags[@]}" -x c++ -std=c++17 -nostdinc++ -fno-exceptions -fno-rtti \
      -c "$src/src/$f" -o "$obj/${f%.*}.o"
  done
  for f in UnwindRegistersRestore.S UnwindRegistersSave.S; do
    clang "${flags[@]}" -c "$src/src/$f" -o "$obj/${f%.*}.o"
  done
  llvm-ar rcs "$prefix/lib/libunwind.a" "$obj"/*.o
fi

if [ ! -f "$prefix/lib/crtbegin.o" ]; then
  : >"$root/empty.c"
  $cc -c "$root/empty.c" -o "$prefix/lib/crtbegin.o"
  cp "$prefix/lib/crtbegin.o" "$prefix/lib/crtend.o"
fi

echo "== $target: cargo build --release --locked -Z build-std=std,panic_abort"
RUSTC_BOOTSTRAP=1 cargo build --release --locked --target "$target" \
  --config "target.$target.rustflags = ['-L', 'native=$prefix/lib']" \
  -Z build-std=std,panic_abort
