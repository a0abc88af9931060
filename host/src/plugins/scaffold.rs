//! `wasmtap plugin new NAME`: a plugin crate of its own, outside any checkout, that
//! depends on `wasmtap-sdk` as an outside author's would, builds for `wasm32-wasip2`,
//! and passes its own test (the SDK's test kit) with a plain `cargo test`.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};

/// Where this build's SDK sits, when the binary runs beside its checkout.
fn checkout_sdk() -> Option<PathBuf> {
    let sdk = Path::new(env!("CARGO_MANIFEST_DIR")).parent()?.join("sdk");
    sdk.join("Cargo.toml").is_file().then_some(sdk)
}

/// Creates `parent/name`; `sdk`: a path to the SDK crate (default: this build's
/// checkout's, if there, else the published version). Returns what to do next.
pub fn new_plugin(name: &str, parent: &Path, sdk: Option<PathBuf>) -> anyhow::Result<String> {
    if name.is_empty()
        || name.len() > 64
        || !name.starts_with(|c: char| c.is_ascii_lowercase())
        || !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        bail!("plugin name {name:?}: use 1 to 64 of a-z 0-9 -, starting with a letter (it names the crate and the instance)");
    }
    let dir = parent.join(name);
    if dir.exists() {
        bail!("{} already exists", dir.display());
    }
    let version = env!("CARGO_PKG_VERSION");
    let dependency = match sdk.or_else(checkout_sdk) {
        Some(path) => {
            let path = std::path::absolute(&path).with_context(|| format!("{}", path.display()))?;
            format!("{{ version = \"{version}\", path = {} }}", toml::Value::from(path.display().to_string()))
        }
        None => format!("\"{version}\""),
    };
    let ty: String = name.split('-').filter(|w| !w.is_empty()).map(|w| w[..1].to_uppercase() + &w[1..]).collect();
    let file = name.replace('-', "_");
    std::fs::create_dir_all(dir.join("src")).with_context(|| format!("cannot create {}", dir.display()))?;
    let write = |path: &str, text: String| std::fs::write(dir.join(path), text).with_context(|| format!("writing {path}"));
    write("Cargo.toml", CARGO_TOML.replace("{name}", name).replace("{sdk}", &dependency))?;
    write("src/lib.rs", LIB_RS.replace("{name}", name).replace("{Type}", &ty))?;
    write("README.md", README.replace("{name}", name).replace("{file}", &file))?;
    write(".gitignore", "/target\n".into())?;
    Ok(format!(
        "created {dir}\n  cd {dir}\n  cargo test                                          # natively, against the SDK's test kit\n  \
         cargo build --release --target wasm32-wasip2        # target/wasm32-wasip2/release/{file}.wasm\n  \
         wasmtap plugin check target/wasm32-wasip2/release/{file}.wasm\n",
        dir = dir.display()
    ))
}

const CARGO_TOML: &str = r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2024"
publish = false

[lib]
# cdylib: the component (cargo build --target wasm32-wasip2); rlib: the native tests.
crate-type = ["cdylib", "rlib"]

[dependencies]
wasmtap-sdk = {sdk}

# A workspace of its own, wherever it sits.
[workspace]

[profile.release]
lto = true
codegen-units = 1
strip = true
"#;

const LIB_RS: &str = r#"//! {name}: a wasmtap plugin. Counts system calls and their latency per command name and
//! syscall. Config: `comms` (names) narrows it to some commands.

use wasmtap_sdk::{names::syscall_label, *};

/// Command name (as one integer: comparing keys stays cheap) and syscall number.
type Key = (u128, u32);

pub struct {Type} {
    calls: CounterVec<Key>,
    latency: HistogramVec<Key>,
}

fn labels(&(comm, nr): &Key) -> Vec<String> {
    let comm = comm.to_le_bytes();
    let len = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    vec![String::from_utf8_lossy(&comm[..len]).into_owned(), syscall_label(&Wit, nr)]
}

impl Plugin for {Type} {
    fn init(_host: &HostInfo, config: &Config) -> Result<(Self, Manifest), String> {
        let names = ["comm", "syscall"];
        let calls = CounterVec::declare(Wit, "calls", "System calls.", &names)?;
        // Upper bounds in nanoseconds (powers of two from 1 µs to ~1 s), reported in seconds.
        let bounds = (10..=30).map(|shift| 1u64 << shift).collect();
        let latency = HistogramVec::declare(Wit, "seconds", "System call latency.", &names, bounds, 1e-9)?;
        let filter = Filter { comms: config.list("comms")?, ..Filter::default() };
        let subscriptions = vec![Subscription { kind: SyscallRecord::KIND.into(), filter }];
        Ok((Self { calls, latency }, Manifest { subscriptions, tick_interval_ms: 0 }))
    }

    fn on_syscalls(&mut self, batch: SyscallBatch<'_>) {
        for r in batch.records() {
            let key = (u128::from_le_bytes(r.header.comm), r.syscall_nr);
            self.calls.add(key, 1, labels);
            self.latency.observe(key, r.latency_ns, labels);
        }
        // One host call per family for every series the batch touched.
        self.calls.flush();
        self.latency.flush();
    }
}

export_plugin!({Type});

#[cfg(test)]
mod tests {
    use wasmtap_sdk::testkit::*;

    use super::*;

    #[test]
    fn counts_calls_and_latency_per_command_and_syscall() {
        let host = TestHost::new();
        host.name_syscall(110, "getppid");
        let mut plugin = host.init::<{Type}>("comms = [\"app\"]").unwrap();
        let call = |nr, latency_ns| SyscallRecord { syscall_nr: nr, latency_ns, ..Default::default() }.pid(42).comm("app");
        host.deliver(&mut plugin, &[call(110, 1500), call(110, 3000), call(3, 700)]);
        assert_eq!(host.counter("calls", &["app", "getppid"]), Some(2));
        assert_eq!(host.counter("calls", &["app", "syscall_3"]), Some(1));
        let latency = host.histogram("seconds", &["app", "getppid"]).unwrap();
        assert_eq!((latency.count, latency.counts[1], latency.counts[2]), (2, 1, 1));
    }
}
"#;

const README: &str = r#"# {name}

A [wasmtap](https://github.com/wasmtap/wasmtap) plugin.

    cargo test                                       # natively, against wasmtap-sdk's test kit
    cargo build --release --target wasm32-wasip2     # the component
    wasmtap plugin check target/wasm32-wasip2/release/{file}.wasm
    wasmtap replay run.wtrec --path target/wasm32-wasip2/release/{file}.wasm   # over a `wasmtap record` recording
    wasmtap plugin load {name} --path $PWD/target/wasm32-wasip2/release/{file}.wasm   # into a running daemon

Needs the `wasm32-wasip2` target: `rustup target add wasm32-wasip2`.
"#;

#[cfg(test)]
mod tests {
    #[test]
    fn the_scaffold_asks_for_the_sdk_version_this_host_speaks() {
        let sdk = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../sdk/Cargo.toml")).unwrap();
        let version = sdk.lines().find_map(|l| l.strip_prefix("version = ")).unwrap().trim_matches('"');
        assert_eq!(version, env!("CARGO_PKG_VERSION"), "sdk/Cargo.toml's version is the host's (the scaffold writes it)");
    }
}
