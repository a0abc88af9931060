//! The plugin author's loop, from outside the daemon: `wasmtap plugin check` on
//! components as an author would build them.

use std::process::Command;

use wasmtap_tests::{HOSTILE_WASM, TempDir, built};

fn check(file: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(built("wasmtap")).args(["plugin", "check", file]).args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn plugin_check_names_each_import_with_the_std_feature_behind_it_and_dry_runs_init() {
    // The component uses println! (mode "std" prints at init).
    let (ok, report) = check(HOSTILE_WASM, &["--set", "mode = \"std\""]);
    assert!(ok, "{report}");
    let stdout = report.lines().find(|l| l.contains("wasi:cli/stdout@")).unwrap_or_else(|| panic!("names wasi:cli/stdout:\n{report}"));
    assert!(stdout.contains("println!") && stdout.contains("log record"), "{stdout}");
    assert!(report.contains("wasi:random/insecure-seed") && report.contains("HashMap::new()"), "{report}");
    assert!(report.contains("WIT wasmtap:plugin@0.2.6: this host offers 0.2.6, compatible"), "{report}");
    assert!(report.contains("subscribes to syscall (every event)"), "{report}");
    assert!(report.contains("declares hostile_std_ok gauge"), "{report}");
}

#[test]
fn plugin_check_refuses_a_component_that_would_be_refused_at_load_naming_the_cause() {
    let (ok, report) = check(env!("HOSTILE_FS_WASM"), &[]);
    assert!(!ok, "{report}");
    let refused = report.lines().find(|l| l.contains("PROBLEM refused import wasi:filesystem/")).unwrap_or_else(|| panic!("{report}"));
    assert!(refused.contains("std::fs"), "{refused}");
    // init refusing is a problem too, with the plugin's reason.
    let (ok, report) = check(HOSTILE_WASM, &["--set", "mode = \"init-fail\""]);
    assert!(!ok && report.contains("init refused on purpose"), "{report}");
    // Not a component at all.
    let dir = TempDir::new();
    let junk = dir.0.join("junk.wasm");
    std::fs::write(&junk, b"\0asm junk").unwrap();
    let (ok, report) = check(junk.to_str().unwrap(), &[]);
    assert!(!ok && report.contains("PROBLEM not loadable"), "{report}");
}

/// `wasmtap plugin new` outside the repository: the crate's own test passes with a
/// plain `cargo test`, it builds for wasm32-wasip2, and `plugin check` finds it sound.
#[test]
fn a_scaffolded_plugin_builds_outside_the_repository_and_passes_its_own_test() {
    let dir = TempDir::new();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    assert!(!dir.0.starts_with(root), "outside the checkout");
    let new = Command::new(built("wasmtap")).args(["plugin", "new", "demo-enricher", "--dir"]).arg(&dir.0).output().unwrap();
    assert!(new.status.success(), "{}", String::from_utf8_lossy(&new.stderr));
    let krate = dir.0.join("demo-enricher");
    let manifest = std::fs::read_to_string(krate.join("Cargo.toml")).unwrap();
    assert!(manifest.contains("wasmtap-sdk = { version = \"0.1.0\", path = "), "depends on the SDK by version and path: {manifest}");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let run = |args: &[&str]| {
        let out = Command::new(&cargo).args(args).current_dir(&krate).env("CARGO_TARGET_DIR", dir.0.join("target")).output().unwrap();
        assert!(out.status.success(), "cargo {args:?}:\n{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let tests = run(&["test", "--quiet"]);
    assert!(tests.contains("1 passed"), "its own test ran and passed: {tests}");
    run(&["build", "--quiet", "--release", "--target", "wasm32-wasip2"]);
    let component = dir.0.join("target/wasm32-wasip2/release/demo_enricher.wasm");
    let (ok, report) = check(component.to_str().unwrap(), &[]);
    assert!(ok, "{report}");
    assert!(report.contains("declares demo_enricher_calls_total counter") && report.contains("subscribes to syscall"), "{report}");
}
