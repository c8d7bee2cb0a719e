//! Links `weir` with packed relative relocations (DT_RELR) where the C library can load them.
//!
//! A position-independent Rust binary carries one 24-byte RELA entry for every pointer in
//! its static data (vtables, string slices, the GOT): 2.6 MiB of the `dist` binary's 50.6.
//! The dynamic loader reads all of them at start-up, so they are resident for the life of
//! the process. `-z pack-relative-relocs` stores them as a bitmap of a few KiB instead.
//!
//! glibc loads such binaries from 2.36 on, and refuses to start them before that. So this is
//! done only for a native glibc build whose own C library is 2.36 or later (the binary needs
//! at least the build machine's glibc anyway); `WEIR_PACK_RELOCS=0` turns it off, for a
//! binary meant to run on an older system.

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=WEIR_PACK_RELOCS");
    let wanted = std::env::var("WEIR_PACK_RELOCS").map_or(true, |value| value.trim() != "0");
    let target = std::env::var("TARGET").unwrap_or_default();
    let host = std::env::var("HOST").unwrap_or_default();
    let glibc_target = target == host
        && std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux")
        && std::env::var("CARGO_CFG_TARGET_ENV").as_deref() == Ok("gnu");
    if wanted && glibc_target && host_glibc().is_some_and(|version| version >= (2, 36)) {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}

/// The build machine's glibc version, from `getconf GNU_LIBC_VERSION` ("glibc 2.36").
fn host_glibc() -> Option<(u32, u32)> {
    let output = Command::new("getconf")
        .arg("GNU_LIBC_VERSION")
        .output()
        .ok()?;
    let text = String::from_utf8(output.stdout).ok()?;
    let version = text.trim().strip_prefix("glibc ")?;
    let mut parts = version.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}
