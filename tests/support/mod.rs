//! Test support shared by the integration tests: the server harness (the
//! `graphrag-kv-harness` crate in `harness/`, re-exported here: real `redis-server` and
//! `valkey-server` processes, cluster, Sentinel, TLS) and what needs graphrag-kv itself: the
//! backend-independent conformance suite (`support::conformance`) and [`example_bin`].
//!
//! Each test binary declares `mod support;` at its root and uses the part it needs
//! (`support::RedisServer`, `support::cluster::RedisCluster`, `support::conformance::...`).
//!
//! `redis-server` must be installed: when it is missing, the tests that need it FAIL with a
//! message saying how to install it; they never skip. Set `REDIS_SERVER_BIN` to use a binary
//! that is not `redis-server` on `PATH`; `VALKEY_SERVER` names `valkey-server` 8.1 (see the
//! harness crate).
#![allow(dead_code, unused_macros, unused_imports)]

pub mod conformance;
pub mod conformance_typed;

pub use graphrag_kv_harness::*;

use std::path::{Path, PathBuf};
use std::process::Command;

/// The binary of example `name`, built once per test binary with `features` (`cargo test` does
/// not build examples by itself), in the profile of the running test (release under
/// `cargo test --release`).
///
/// # Panics
/// When the build fails.
pub fn example_bin(name: &str, features: &[&str]) -> PathBuf {
    static BUILT: std::sync::Mutex<Vec<(String, PathBuf)>> = std::sync::Mutex::new(Vec::new());
    // Held across the build: two tests asking for the same example build it once.
    let mut built = BUILT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some((_, bin)) = built.iter().find(|(n, _)| n == name) {
        return bin.clone();
    }
    // target/<profile>/deps/<test>-<hash> -> target/<profile>/examples/<name>
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary in target/<profile>/deps");
    let mut cargo = Command::new(env!("CARGO"));
    cargo
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["build", "--example", name]);
    // The variables cargo sets for this test (CARGO_PKG_NAME, CARGO_MANIFEST_DIR, ...) were
    // unset for the `cargo test` that built the dependencies: inherited, they make ring's
    // build script rerun, and ring, rustls and redis were rebuilt at every example build and
    // again at the next `cargo test`.
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        if [
            "CARGO_PKG_",
            "CARGO_MANIFEST_",
            "CARGO_CRATE_",
            "CARGO_BIN_",
            "CARGO_PRIMARY_PACKAGE",
            "CARGO_TARGET_TMPDIR",
            "CARGO_RUSTC_CURRENT_DIR",
        ]
        .iter()
        .any(|p| key.starts_with(p))
        {
            cargo.env_remove(key);
        }
    }
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        cargo.arg("--release");
    }
    if !features.is_empty() {
        cargo.args(["--features", &features.join(",")]);
    }
    let status = cargo.status().expect("running cargo build");
    assert!(status.success(), "cargo build --example {name} failed");
    let bin = profile_dir
        .join("examples")
        .join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(bin.exists(), "{} missing after the build", bin.display());
    built.push((name.to_string(), bin.clone()));
    bin
}
