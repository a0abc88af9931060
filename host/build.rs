//! Builds what the daemon embeds: the kernel object (aya-build, nightly, bpf-linker)
//! and the bundled plugins (stable, wasm32-wasip2). `./dev setup` installs the toolchain
//! pieces both need; the error below says so if they are missing.

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let root = manifest_dir.parent().context("host/ has a parent")?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);

    let ebpf_dir = root.join("host-ebpf");
    aya_build::build_ebpf(
        [aya_build::Package { name: "wasmtap-ebpf", root_dir: ebpf_dir.to_str().context("utf-8 path")?, ..Default::default() }],
        aya_build::Toolchain::default(),
    )
    .context("building the kernel programs failed; run `./dev setup` to install the nightly rust-src and bpf-linker")?;
    println!("cargo:rerun-if-changed={}", root.join("host-ebpf/common").display());

    build_plugins(root, &out_dir)
}

/// Builds every crate under `plugins/` for wasm32-wasip2 and writes `bundled.rs`, a table
/// of (name, component bytes) that `plugins::bundled` includes.
fn build_plugins(root: &Path, out_dir: &Path) -> anyhow::Result<()> {
    for dir in ["plugins", "sdk", "wit", "host-ebpf/common"] {
        println!("cargo:rerun-if-changed={}", root.join(dir).display());
    }
    let mut names: Vec<String> = fs::read_dir(root.join("plugins"))?
        .filter_map(Result::ok)
        .filter(|e| e.path().join("Cargo.toml").is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();

    let target_dir = out_dir.join("plugins-target");
    let mut cargo = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cargo.current_dir(root).args(["build", "--release", "--target", "wasm32-wasip2", "--target-dir"]).arg(&target_dir);
    for name in &names {
        cargo.args(["--package", name]);
    }
    // Plugins are small: whole-program optimisation across plugin, SDK and layout crates
    // is cheap to build and inlines the per-event path.
    cargo.env("CARGO_PROFILE_RELEASE_LTO", "true").env("CARGO_PROFILE_RELEASE_CODEGEN_UNITS", "1");
    // The outer build's flags are for the host target, not for the plugins.
    for key in ["CARGO_ENCODED_RUSTFLAGS", "RUSTFLAGS", "RUSTC_WORKSPACE_WRAPPER", "CARGO_BUILD_TARGET"] {
        cargo.env_remove(key);
    }
    let status = cargo.status().context("spawning cargo for the plugins")?;
    if !status.success() {
        bail!("building the bundled plugins failed ({status}); run `./dev setup` to add the wasm32-wasip2 target");
    }

    let mut table = String::from("&[\n");
    for name in &names {
        let wasm = target_dir.join("wasm32-wasip2/release").join(format!("{}.wasm", name.replace('-', "_")));
        if !wasm.is_file() {
            bail!("plugin {name} built no component at {}", wasm.display());
        }
        table.push_str(&format!("    ({name:?}, include_bytes!({:?}).as_slice()),\n", wasm.display().to_string()));
    }
    table.push(']');
    fs::write(out_dir.join("bundled.rs"), table)?;
    Ok(())
}
