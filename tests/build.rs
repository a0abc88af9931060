//! Builds the hostile test plugins:
//! - tests/hostile-plugin for wasm32-wasip2, twice: as is, and with its `fs` feature (a
//!   component that imports wasi:filesystem): `HOSTILE_WASM`, `HOSTILE_FS_WASM`;
//! - plugins/syscall-latency with its `variant` feature (other buckets, one more label),
//!   the second build the hot-swap tests alternate with the bundled one:
//!   `SYSCALL_LATENCY_VARIANT_WASM`;
//! - a component with 17 linear memories (no Rust target emits one), assembled here from
//!   a core module and the WIT world: `MULTI_MEMORY_WASM`.

use std::{env, fs, path::PathBuf, process::Command};

/// A core module that implements the handler world (every call traps) and has 16 extra
/// memories of 4 MiB each, turned into a component against `wit/`.
fn multi_memory_component(root: &std::path::Path) -> Vec<u8> {
    use wasm_encoder::{CodeSection, ExportKind, ExportSection, Function, FunctionSection, MemorySection, MemoryType, Module, TypeSection, ValType::*};
    let mut resolve = wit_parser::Resolve::default();
    let (package, _) = resolve.push_dir(root.join("wit")).expect("wit/ parses");
    let version = resolve.packages[package].name.version.as_ref().expect("a versioned package").to_string();
    let mut types = TypeSection::new();
    types.ty().function([I32; 4], [I32]); // cabi_realloc
    types.ty().function([I32; 10], [I32]); // init(host-info: 3 strings + a list, config: a list)
    types.ty().function([I32, I32, I32, I32, I32, I64], []); // on-batch(kind, record-size, records, dropped)
    types.ty().function([I64], []); // tick
    let mut functions = FunctionSection::new();
    for t in 0..4 {
        functions.function(t);
    }
    let mut memories = MemorySection::new();
    let memory = |pages| MemoryType { minimum: pages, maximum: None, memory64: false, shared: false, page_size_log2: None };
    memories.memory(memory(1));
    for _ in 0..16 {
        memories.memory(memory(64));
    }
    let mut exports = ExportSection::new();
    exports.export("memory", ExportKind::Memory, 0).export("cabi_realloc", ExportKind::Func, 0);
    for (i, name) in ["init", "on-batch", "tick"].iter().enumerate() {
        exports.export(&format!("wasmtap:plugin/handler@{version}#{name}"), ExportKind::Func, i as u32 + 1);
    }
    let mut code = CodeSection::new();
    let mut realloc = Function::new([]);
    realloc.instructions().i32_const(8).end();
    code.function(&realloc);
    for _ in 0..3 {
        let mut trap = Function::new([]);
        trap.instructions().unreachable().end();
        code.function(&trap);
    }
    let mut module = Module::new();
    module.section(&types).section(&functions).section(&memories).section(&exports).section(&code);
    let mut module = module.finish();

    let world = resolve.select_world(&[package], Some("plugin")).expect("the plugin world");
    wit_component::embed_component_metadata(&mut module, &resolve, world, wit_component::StringEncoding::UTF8, false).expect("embed");
    wit_component::ComponentEncoder::default().module(&module).expect("module").validate(true).encode().expect("encode")
}

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest_dir.parent().unwrap().to_path_buf();
    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    for dir in ["tests/hostile-plugin", "tests/compat-plugin", "plugins/syscall-latency", "sdk", "wit", "host-ebpf/common"] {
        println!("cargo:rerun-if-changed={}", root.join(dir).display());
    }
    let target_dir = out_dir.join("hostile-target");
    for (package, features, file, var) in [
        ("hostile-plugin", None, "hostile.wasm", "HOSTILE_WASM"),
        ("hostile-plugin", Some("fs"), "hostile-fs.wasm", "HOSTILE_FS_WASM"),
        ("compat-plugin", None, "compat.wasm", "COMPAT_WASM"),
        ("syscall-latency", Some("variant"), "syscall-latency-variant.wasm", "SYSCALL_LATENCY_VARIANT_WASM"),
    ] {
        let mut cargo = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cargo.current_dir(&root).args(["build", "--release", "--target", "wasm32-wasip2", "--package", package, "--target-dir"]).arg(&target_dir);
        if let Some(features) = features {
            cargo.args(["--features", features]);
        }
        for key in ["CARGO_ENCODED_RUSTFLAGS", "RUSTFLAGS", "RUSTC_WORKSPACE_WRAPPER", "CARGO_BUILD_TARGET"] {
            cargo.env_remove(key);
        }
        let status = cargo.status().expect("spawning cargo for the hostile plugin");
        assert!(status.success(), "building the test plugin {package} failed; run `./dev setup` to add the wasm32-wasip2 target");
        let built = target_dir.join(format!("wasm32-wasip2/release/{}.wasm", package.replace('-', "_")));
        let dest = out_dir.join(file);
        fs::copy(&built, &dest).expect("copy the hostile plugin");
        println!("cargo:rustc-env={var}={}", dest.display());
    }
    let dest = out_dir.join("multi-memory.wasm");
    fs::write(&dest, multi_memory_component(&root)).expect("write the multi-memory component");
    println!("cargo:rustc-env=MULTI_MEMORY_WASM={}", dest.display());
}
