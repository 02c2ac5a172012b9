//! Release binaries linked by LLVM's lld (the aarch64 musl build, see
//! .cargo/config.toml) leave out the unwind tables, .eh_frame and
//! .eh_frame_hdr: about 290 KB of the 1.5 MB budget. The release profile
//! has panic = "abort", so nothing unwinds; a panic still prints its message
//! and location, only the backtrace comes out empty (the binary is stripped,
//! so it held bare addresses at best). Debug and test builds, other
//! profiles and other linkers are untouched: tests need unwinding.

use std::{env, fs, path::PathBuf};

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=RUSTC_LINKER");
    let release = env::var("PROFILE").is_ok_and(|p| p == "release");
    let linux = env::var("CARGO_CFG_TARGET_OS").is_ok_and(|os| os == "linux");
    // Plain `ld` arguments, as rustc passes them to rust-lld or ld.lld.
    let lld = env::var("RUSTC_LINKER").is_ok_and(|l| {
        let name = l.rsplit('/').next().unwrap_or_default();
        name == "rust-lld" || name == "ld.lld"
    });
    if !(release && linux && lld) {
        return;
    }
    let script = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR")).join("no-eh-frame.ld");
    fs::write(
        &script,
        "SECTIONS { /DISCARD/ : { *(.eh_frame) *(.eh_frame_hdr) } }\nINSERT AFTER .text;\n",
    )
    .expect("write the linker script");
    println!("cargo:rustc-link-arg-bins=--no-eh-frame-hdr");
    println!("cargo:rustc-link-arg-bins=-T{}", script.display());
}
