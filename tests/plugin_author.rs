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
