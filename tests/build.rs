//! The build itself: `cargo build -p weir` and `cargo build --workspace` must ask for the same
//! features of every crate they share. Cargo builds a crate once for each feature set it is
//! asked for, so a crate built with different features by the two (say `object_store` with
//! and without `aws`) rebuilds DataFusion and everything above it each time a user goes from
//! one command to the other.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

/// The one crate whose features differ on purpose: the hub service (`weir-hub`'s `server`
/// feature) is in a `--workspace` build and out of `weir`'s own.
const DIFFERS_ON_PURPOSE: &[&str] = &["weir-hub"];

#[test]
fn weir_and_the_workspace_build_the_crates_they_share_with_the_same_features() {
    let weir = features_by_crate(&["-p", "weir"]);
    let workspace = features_by_crate(&["--workspace"]);
    assert!(
        weir.len() > 100 && weir.keys().any(|name| name.starts_with("datafusion ")),
        "cargo tree listed too little to judge: {weir:?}"
    );
    let mut drift = Vec::new();
    for (krate, in_weir) in &weir {
        let name = krate.split(' ').next().unwrap_or_default();
        if DIFFERS_ON_PURPOSE.contains(&name) {
            continue;
        }
        match workspace.get(krate) {
            Some(in_workspace) if in_workspace == in_weir => {}
            Some(in_workspace) => drift.push(format!(
                "{krate}: `-p weir` builds it with {in_weir:?}, `--workspace` with {in_workspace:?}"
            )),
            None => drift.push(format!("{krate}: `--workspace` does not build it at all")),
        }
    }
    assert!(
        drift.is_empty(),
        "`cargo build -p weir` and `cargo build --workspace` would rebuild each other. Turn \
         the missing features on in the block of `weir`'s dependencies that aligns them \
         (Cargo.toml):\n{}",
        drift.join("\n")
    );
}

/// Every crate (name and version) that `cargo build` with `selection` compiles for this
/// host, with the feature sets it compiles it with (a crate built both for a build script
/// and for the binary may have two).
fn features_by_crate(selection: &[&str]) -> BTreeMap<String, BTreeSet<String>> {
    let output = Command::new(env!("CARGO"))
        .arg("tree")
        .args(selection)
        .args([
            "--edges",
            "normal,build",
            "--prefix",
            "none",
            "--format",
            "{p}|{f}",
        ])
        .arg("--locked")
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")))
        .output()
        .expect("cannot run cargo tree");
    assert!(
        output.status.success(),
        "cargo tree {selection:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let mut crates: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        // `name v1.2.3 (/path)|features`, with ` (*)` after a crate already listed.
        let line = line.trim_end_matches(" (*)");
        let Some((package, features)) = line.split_once('|') else {
            continue;
        };
        let mut words = package.split_whitespace();
        let (Some(name), Some(version)) = (words.next(), words.next()) else {
            continue;
        };
        crates
            .entry(format!("{name} {version}"))
            .or_default()
            .insert(features.to_owned());
    }
    crates
}

/// `build.rs` links `weir` with packed relative relocations where the build machine's glibc
/// loads them (2.36 and later) and leaves them unpacked before that, where glibc would refuse
/// to start the binary. Either way the binary must start.
#[test]
fn weir_packs_its_relative_relocations_where_glibc_can_load_them() {
    let weir = env!("CARGO_BIN_EXE_weir");
    let started = Command::new(weir)
        .arg("--version")
        .output()
        .expect("cannot run weir");
    assert!(
        started.status.success(),
        "weir --version failed: {}",
        String::from_utf8_lossy(&started.stderr)
    );
    let Ok(getconf) = Command::new("getconf").arg("GNU_LIBC_VERSION").output() else {
        return; // not glibc: build.rs leaves the relocations as they are
    };
    let glibc = String::from_utf8_lossy(&getconf.stdout).trim().to_owned();
    let Some((major, minor)) = glibc
        .strip_prefix("glibc ")
        .and_then(|version| version.split_once('.'))
        .and_then(|(major, minor)| Some((major.parse::<u32>().ok()?, minor.parse::<u32>().ok()?)))
    else {
        return;
    };
    let dynamic = Command::new("readelf")
        .args(["--dynamic", weir])
        .output()
        .expect("cannot run readelf (binutils)");
    let dynamic = String::from_utf8_lossy(&dynamic.stdout);
    let packed = dynamic.contains("(RELR)");
    let turned_off = std::env::var("WEIR_PACK_RELOCS").is_ok_and(|value| value.trim() == "0");
    if (major, minor) >= (2, 36) && !turned_off {
        assert!(
            packed,
            "{glibc} loads DT_RELR, but weir has none:\n{dynamic}"
        );
    } else {
        assert!(
            !packed,
            "{glibc} cannot load DT_RELR, but weir has it:\n{dynamic}"
        );
    }
}
