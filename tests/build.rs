//! Builds the hostile test plugin (tests/hostile-plugin) for wasm32-wasip2, twice: as is,
//! and with its `fs` feature (a component that imports wasi:filesystem). The tests find
//! them through `HOSTILE_WASM` and `HOSTILE_FS_WASM`.

use std::{env, fs, path::PathBuf, process::Command};

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest_dir.parent().unwrap().to_path_buf();
    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    for dir in ["tests/hostile-plugin", "sdk", "wit", "host-ebpf/common"] {
        println!("cargo:rerun-if-changed={}", root.join(dir).display());
    }
    let target_dir = out_dir.join("hostile-target");
    for (features, file, var) in [(None, "hostile.wasm", "HOSTILE_WASM"), (Some("fs"), "hostile-fs.wasm", "HOSTILE_FS_WASM")] {
        let mut cargo = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cargo
            .current_dir(&root)
            .args(["build", "--release", "--target", "wasm32-wasip2", "--package", "hostile-plugin", "--target-dir"])
            .arg(&target_dir);
        if let Some(features) = features {
            cargo.args(["--features", features]);
        }
        for key in ["CARGO_ENCODED_RUSTFLAGS", "RUSTFLAGS", "RUSTC_WORKSPACE_WRAPPER", "CARGO_BUILD_TARGET"] {
            cargo.env_remove(key);
        }
        let status = cargo.status().expect("spawning cargo for the hostile plugin");
        assert!(status.success(), "building the hostile test plugin failed; run `./dev setup` to add the wasm32-wasip2 target");
        let built = target_dir.join("wasm32-wasip2/release/hostile_plugin.wasm");
        let dest = out_dir.join(file);
        fs::copy(&built, &dest).expect("copy the hostile plugin");
        println!("cargo:rustc-env={var}={}", dest.display());
    }
}
