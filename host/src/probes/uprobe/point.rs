//! Probe points as plugins name them, and the sites each one resolves to:
//!
//! - `usdt:BINARY:PROVIDER:NAME`: a USDT probe, at every site its `.note.stapsdt`
//!   notes list, with the arguments they specify and their semaphore;
//! - `uprobe:BINARY:SYMBOL`, `uprobe:BINARY:SYMBOL+OFFSET`, `uprobe:BINARY:0xADDRESS`:
//!   an instruction in a binary (a function's entry), with the argument registers;
//!   `uretprobe:BINARY:SYMBOL`: the function's return, with its return value;
//! - `kprobe:FUNCTION`, `kretprobe:FUNCTION`: a kernel function, where the kernel has
//!   kprobes;
//!
//! each optionally ending in `:str=N`: copy the string argument N points at.

use std::{collections::BTreeSet, ffi::CString, io::Read as _, os::unix::fs::MetadataExt as _, path::Path};

use anyhow::{Context as _, bail, ensure};
use object::{
    Endianness, Object as _, ObjectSection as _, ObjectSymbol as _, SymbolKind,
    elf::{PT_LOAD, SHT_NOTE},
    read::elf::{ElfFile64, ProgramHeader as _, SectionHeader as _},
};
use wasmtap_events::uprobe::{ArgSpec, MAX_ARGS, MAX_SITES, NO_STRING, Site, arg};

use super::perf::Pmu;

/// A point's sites, and the binary they are in (as it was when they were found).
pub struct Resolved {
    pub sites: Vec<SiteTarget>,
    pub binary: Option<(String, FileId)>,
}

/// Which file a binary was: the sites found in it are valid for exactly that file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileId {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
}

impl FileId {
    pub fn of(meta: &std::fs::Metadata) -> Self {
        Self { dev: meta.dev(), ino: meta.ino(), size: meta.len(), mtime: (meta.mtime(), meta.mtime_nsec()) }
    }
}

/// One place the program is attached, and what it reads there.
pub struct SiteTarget {
    pub place: Place,
    pub retprobe: bool,
    pub site: Site,
}

/// Where a site is.
pub enum Place {
    /// At this file offset of the point's binary, with the file offset of its USDT
    /// semaphore (0: none).
    Binary { offset: u64, ref_ctr_offset: u64 },
    /// At the entry (or return) of a kernel function.
    Kernel { function: CString },
}

impl SiteTarget {
    /// The perf event PMU of the site, `binary` naming the point's binary.
    pub fn pmu<'a>(&'a self, binary: Option<&'a std::ffi::CStr>) -> anyhow::Result<Pmu<'a>> {
        Ok(match &self.place {
            Place::Binary { offset, ref_ctr_offset } => {
                Pmu::Uprobe { path: binary.context("a uprobe site without its binary")?, offset: *offset, ref_ctr_offset: *ref_ctr_offset }
            }
            Place::Kernel { function } => Pmu::Kprobe { function },
        })
    }
}

/// Binaries larger than this are not read for their symbols and notes.
const MAX_BINARY_BYTES: u64 = 512 << 20;
/// Longest point text.
pub const MAX_POINT_LEN: usize = 4096;

const GRAMMAR: &str = "usdt:BINARY:PROVIDER:NAME, uprobe:BINARY:SYMBOL[+OFFSET], uprobe:BINARY:0xADDRESS, uretprobe:BINARY:SYMBOL or \
                       kprobe:FUNCTION, optionally followed by :str=N";

/// The sites of the point `text`, whose records carry `probe`.
pub fn resolve(text: &str, probe: u32) -> anyhow::Result<Resolved> {
    ensure!(text.len() <= MAX_POINT_LEN, "a probe point of {} bytes; the limit is {MAX_POINT_LEN}", text.len());
    let (body, string_arg) = match text.rsplit_once(":str=") {
        Some((body, n)) => {
            let n = n.parse::<u32>().ok().filter(|&n| (n as usize) < MAX_ARGS).with_context(|| format!(":str= takes an argument number below {MAX_ARGS}"))?;
            (body, n)
        }
        None => (text, NO_STRING),
    };
    let (scheme, rest) = body.split_once(':').with_context(|| format!("a probe point is {GRAMMAR}"))?;
    let site = |args: [ArgSpec; MAX_ARGS], kernel: bool| Site { probe, string_arg, kernel: kernel.into(), _pad: 0, args };
    ensure!(cfg!(target_arch = "x86_64"), "probe point arguments are decoded for x86-64 only");
    match scheme {
        "usdt" => {
            let mut parts = rest.rsplitn(3, ':');
            let (name, provider, binary) = match (parts.next(), parts.next(), parts.next()) {
                (Some(name), Some(provider), Some(binary)) => (name, provider, binary),
                _ => bail!("a USDT point is usdt:BINARY:PROVIDER:NAME"),
            };
            let elf = Binary::read(binary)?;
            let notes = elf.usdt_notes()?;
            let sites: Vec<_> = notes.iter().filter(|n| n.provider == provider && n.name == name).collect();
            if sites.is_empty() {
                let offered: BTreeSet<String> = notes.iter().map(|n| format!("{}:{}", n.provider, n.name)).collect();
                let some = offered.iter().take(8).cloned().collect::<Vec<_>>().join(", ");
                bail!("{binary} has no USDT probe {provider}:{name} ({} probes, e.g. {some})", offered.len());
            }
            ensure!(sites.len() <= MAX_SITES as usize, "{provider}:{name} has {} sites; at most {MAX_SITES} are attached", sites.len());
            let sites = sites
                .into_iter()
                .map(|note| {
                    let args = parse_usdt_args(&note.args).with_context(|| format!("USDT {provider}:{name} at {:#x}: arguments {:?}", note.pc, note.args))?;
                    let count = note.args.split_whitespace().count();
                    ensure!(string_arg == NO_STRING || (string_arg as usize) < count, ":str={string_arg}, but {provider}:{name} has {count} arguments");
                    let ref_ctr_offset = match note.semaphore {
                        0 => 0,
                        at => elf.file_offset(at).with_context(|| format!("the semaphore of {provider}:{name} at {at:#x} is in no loaded segment"))?,
                    };
                    ensure!(ref_ctr_offset < 1 << 32, "the semaphore of {provider}:{name} is past 4 GiB into the file");
                    let offset = elf.file_offset(note.pc).with_context(|| format!("{provider}:{name} at {:#x} is in no loaded segment", note.pc))?;
                    Ok(SiteTarget { place: Place::Binary { offset, ref_ctr_offset }, retprobe: false, site: site(args, false) })
                })
                .collect::<anyhow::Result<_>>()?;
            Ok(Resolved { sites, binary: Some((binary.to_owned(), elf.id)) })
        }
        "uprobe" | "uretprobe" => {
            let (binary, at) = rest.rsplit_once(':').context("a uprobe point is uprobe:BINARY:SYMBOL[+OFFSET] or uprobe:BINARY:0xADDRESS")?;
            let elf = Binary::read(binary)?;
            let address = match at.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16).with_context(|| format!("{at:?} is not a hexadecimal address"))?,
                None => {
                    let (symbol, plus) = match at.split_once('+') {
                        Some((symbol, plus)) => (symbol, parse_number(plus).with_context(|| format!("{plus:?} is not an offset"))?),
                        None => (at, 0),
                    };
                    elf.symbol(symbol)?.checked_add(plus).context("offset overflows")?
                }
            };
            let offset = elf.file_offset(address).with_context(|| format!("{at} ({address:#x}) is in no loaded segment of {binary}"))?;
            let retprobe = scheme == "uretprobe";
            check_string_arg(string_arg, retprobe)?;
            let sites = vec![SiteTarget { place: Place::Binary { offset, ref_ctr_offset: 0 }, retprobe, site: site(abi_args(retprobe), false) }];
            Ok(Resolved { sites, binary: Some((binary.to_owned(), elf.id)) })
        }
        "kprobe" | "kretprobe" => {
            if let Err(e) = Pmu::perf_type("kprobe") {
                bail!("{text}: {e:#}, so kprobes are off (CONFIG_KPROBES); use {} instead", tracepoint_instead(rest));
            }
            let function = CString::new(rest).context("a kernel function name has no NUL")?;
            let retprobe = scheme == "kretprobe";
            check_string_arg(string_arg, retprobe)?;
            Ok(Resolved { sites: vec![SiteTarget { place: Place::Kernel { function }, retprobe, site: site(abi_args(retprobe), true) }], binary: None })
        }
        "fentry" | "fexit" => {
            bail!("{text}: wasmtap does not attach fentry/fexit programs (and many kernels refuse them); use {} instead", tracepoint_instead(rest))
        }
        other => bail!("unknown probe point type {other:?}: a probe point is {GRAMMAR}"),
    }
}

/// A return probe has one argument, the return value.
fn check_string_arg(string_arg: u32, retprobe: bool) -> anyhow::Result<()> {
    ensure!(!retprobe || string_arg == NO_STRING || string_arg == 0, "a return probe has one argument (the return value): :str=0");
    Ok(())
}

/// What to use where a kernel function cannot be probed: the tracepoint of the same
/// name if the kernel has one, else the kind that covers the function's subsystem.
fn tracepoint_instead(function: &str) -> String {
    let events = ["/sys/kernel/tracing/available_events", "/sys/kernel/debug/tracing/available_events"]
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok())
        .unwrap_or_default();
    if let Some(event) = events.lines().find(|e| e.split_once(':').is_some_and(|(_, name)| name == function)) {
        return format!("the tracepoint {event}");
    }
    let syscall = ["__x64_sys_", "__se_sys_", "__do_sys_", "do_sys_", "ksys_", "sys_"].iter().find_map(|p| function.strip_prefix(p));
    if let Some(name) = syscall {
        return format!("the syscall kind (tracepoints raw_syscalls:sys_enter/sys_exit) with syscalls = [\"{name}\"]");
    }
    if ["tcp_", "inet_", "sock_", "sk_"].iter().any(|p| function.starts_with(p)) {
        return "the tcp kind (tracepoints sock:inet_sock_set_state, tcp:tcp_retransmit_skb)".into();
    }
    "a tracepoint (the syscall, process, sched or tcp kind; tracefs's available_events lists the kernel's)".into()
}

/// The calling convention's argument registers (x86-64: rdi, rsi, rdx, rcx, r8, r9),
/// or a return probe's return value (rax).
fn abi_args(retprobe: bool) -> [ArgSpec; MAX_ARGS] {
    let mut args = [ArgSpec::default(); MAX_ARGS];
    let regs: &[&str] = if retprobe { &["rax"] } else { &["rdi", "rsi", "rdx", "rcx", "r8", "r9"] };
    for (spec, reg) in args.iter_mut().zip(regs) {
        *spec = ArgSpec { how: arg::REG, reg: register(reg).expect("a known register"), ..Default::default() };
    }
    args
}

/// A USDT note's argument specs (`N@%reg`, `N@OFFSET(%reg)`, `N@$IMMEDIATE`; N bytes,
/// negative when signed). Arguments past the sixth are not read.
pub fn parse_usdt_args(specs: &str) -> anyhow::Result<[ArgSpec; MAX_ARGS]> {
    let mut args = [ArgSpec::default(); MAX_ARGS];
    for (spec, token) in args.iter_mut().zip(specs.split_whitespace()) {
        *spec = parse_usdt_arg(token).with_context(|| format!("argument {token:?}"))?;
    }
    Ok(args)
}

fn parse_usdt_arg(token: &str) -> anyhow::Result<ArgSpec> {
    let (size, at) = token.split_once('@').context("no size@location")?;
    let size: i32 = size.parse().context("the size is not a number")?;
    let bytes = size.unsigned_abs();
    ensure!(matches!(bytes, 1 | 2 | 4 | 8), "a size of {bytes} bytes");
    let mut spec = ArgSpec { shift: (64 - 8 * bytes) as u8, signed: u8::from(size < 0), ..Default::default() };
    if let Some(immediate) = at.strip_prefix('$') {
        spec.how = arg::IMMEDIATE;
        spec.value = parse_signed(immediate).context("not an immediate")?;
    } else if let Some(reg) = at.strip_prefix('%') {
        spec.how = arg::REG;
        spec.reg = register(reg).with_context(|| format!("unknown register %{reg}"))?;
    } else if let Some((offset, reg)) = at.strip_suffix(')').and_then(|at| at.split_once("(%")) {
        spec.how = arg::MEMORY;
        spec.value = if offset.is_empty() { 0 } else { parse_signed(offset).context("not an offset")? };
        spec.reg = register(reg).with_context(|| format!("unsupported address (%{reg})"))?;
    } else {
        bail!("unsupported location {at:?}");
    }
    Ok(spec)
}

/// Offset in x86-64's `struct pt_regs` of a register, by any of its names (`rax`,
/// `eax`, `ax`, `al`, `r8d`, ...).
fn register(name: &str) -> Option<u16> {
    const REGS: [(&[&str], u16); 18] = [
        (&["r15", "r15d", "r15w", "r15b"], 0),
        (&["r14", "r14d", "r14w", "r14b"], 8),
        (&["r13", "r13d", "r13w", "r13b"], 16),
        (&["r12", "r12d", "r12w", "r12b"], 24),
        (&["rbp", "ebp", "bp", "bpl"], 32),
        (&["rbx", "ebx", "bx", "bl"], 40),
        (&["r11", "r11d", "r11w", "r11b"], 48),
        (&["r10", "r10d", "r10w", "r10b"], 56),
        (&["r9", "r9d", "r9w", "r9b"], 64),
        (&["r8", "r8d", "r8w", "r8b"], 72),
        (&["rax", "eax", "ax", "al"], 80),
        (&["rcx", "ecx", "cx", "cl"], 88),
        (&["rdx", "edx", "dx", "dl"], 96),
        (&["rsi", "esi", "si", "sil"], 104),
        (&["rdi", "edi", "di", "dil"], 112),
        (&["rip"], 128),
        (&["rsp", "esp", "sp", "spl"], 152),
        (&["eflags"], 144),
    ];
    REGS.iter().find(|(names, _)| names.contains(&name)).map(|&(_, offset)| offset)
}

fn parse_number(text: &str) -> Option<u64> {
    match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}

fn parse_signed(text: &str) -> Option<i64> {
    match text.strip_prefix('-') {
        Some(n) => parse_number(n).map(|n| (n as i64).wrapping_neg()),
        None => parse_number(text).map(|n| n as i64),
    }
}

/// One `.note.stapsdt` note.
#[derive(Debug)]
pub struct UsdtNote {
    pub provider: String,
    pub name: String,
    /// The probe's address (adjusted for prelinking by `.stapsdt.base`).
    pub pc: u64,
    /// The semaphore's address, 0 for none.
    pub semaphore: u64,
    pub args: String,
}

/// A binary's symbols, notes and loaded segments.
struct Binary {
    path: CString,
    id: FileId,
    data: Vec<u8>,
}

impl Binary {
    fn read(path: &str) -> anyhow::Result<Self> {
        ensure!(Path::new(path).is_absolute(), "the binary {path:?} is not an absolute path");
        let cannot = || format!("cannot read the binary {path}");
        let file = std::fs::File::open(path).with_context(cannot)?;
        // The size and type of the file opened, not of whatever the path names later.
        let meta = file.metadata().with_context(cannot)?;
        ensure!(meta.is_file(), "the binary {path} is not a regular file");
        ensure!(meta.len() <= MAX_BINARY_BYTES, "the binary {path} has {} bytes, more than the {MAX_BINARY_BYTES} wasmtap reads", meta.len());
        let mut data = Vec::with_capacity(meta.len() as usize);
        file.take(MAX_BINARY_BYTES).read_to_end(&mut data).with_context(cannot)?;
        Ok(Self { path: CString::new(path).context("a path has no NUL")?, id: FileId::of(&meta), data })
    }

    fn elf(&self) -> anyhow::Result<ElfFile64<'_, Endianness>> {
        ElfFile64::parse(&self.data[..]).with_context(|| format!("{} is not a 64-bit ELF binary", self.path.to_string_lossy()))
    }

    /// The file offset of virtual address `address`, through the loaded segments (as
    /// libbpf finds them).
    fn file_offset(&self, address: u64) -> Option<u64> {
        let elf = self.elf().ok()?;
        let endian = elf.endian();
        elf.elf_program_headers().iter().filter(|h| h.p_type(endian) == PT_LOAD).find_map(|h| {
            let (vaddr, size) = (h.p_vaddr(endian), h.p_memsz(endian));
            (vaddr..vaddr.checked_add(size)?).contains(&address).then(|| address - vaddr + h.p_offset(endian))
        })
    }

    fn symbol(&self, name: &str) -> anyhow::Result<u64> {
        let elf = self.elf()?;
        elf.symbols()
            .chain(elf.dynamic_symbols())
            .find(|s| s.kind() == SymbolKind::Text && s.address() != 0 && s.name() == Ok(name))
            .map(|s| s.address())
            .with_context(|| format!("{} has no function symbol {name:?}", self.path.to_string_lossy()))
    }

    fn usdt_notes(&self) -> anyhow::Result<Vec<UsdtNote>> {
        let elf = self.elf()?;
        let endian = elf.endian();
        let base = elf.section_by_name(".stapsdt.base").map(|s| s.address());
        let mut notes = Vec::new();
        for section in elf.elf_section_table().iter().filter(|s| s.sh_type(endian) == SHT_NOTE) {
            let Some(mut iter) = section.notes(endian, &self.data[..])? else { continue };
            while let Some(note) = iter.next()? {
                if note.name() != b"stapsdt" || note.n_type(endian) != 3 {
                    continue;
                }
                let desc = note.desc();
                let Some((addresses, strings)) = desc.split_at_checked(24) else { continue };
                let word = |i: usize| u64::from_le_bytes(addresses[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
                let (mut pc, note_base, semaphore) = (word(0), word(1), word(2));
                // A prelinked binary moved its sections; the note kept the old address of
                // `.stapsdt.base`.
                if let Some(base) = base {
                    pc = pc.wrapping_add(base).wrapping_sub(note_base);
                }
                let mut parts = strings.split(|&b| b == 0).map(|s| String::from_utf8_lossy(s).into_owned());
                let (provider, name, args) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
                notes.push(UsdtNote { provider, name, pc, semaphore, args });
            }
        }
        ensure!(!notes.is_empty(), "{} has no USDT probes (no .note.stapsdt notes)", self.path.to_string_lossy());
        Ok(notes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usdt_argument_specs_decode_like_libbpf() {
        let args = parse_usdt_args("8@%rbx -4@-144(%rbp) 2@$5 -1@%al 8@(%rdi) 4@$-3").unwrap();
        assert_eq!((args[0].how, args[0].reg, args[0].shift, args[0].signed), (arg::REG, 40, 0, 0));
        assert_eq!((args[1].how, args[1].reg, args[1].value, args[1].shift, args[1].signed), (arg::MEMORY, 32, -144, 32, 1));
        assert_eq!((args[2].how, args[2].value, args[2].shift), (arg::IMMEDIATE, 5, 48));
        assert_eq!((args[3].how, args[3].reg, args[3].shift, args[3].signed), (arg::REG, 80, 56, 1));
        assert_eq!((args[4].how, args[4].reg, args[4].value), (arg::MEMORY, 112, 0));
        assert_eq!(args[5].value, -3);
        for bad in ["8@%xyz", "3@%rax", "8@(%rax,%rbx,8)", "8", "8@foo"] {
            assert!(parse_usdt_args(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn points_that_cannot_be_probed_say_why() {
        let error = |text: &str| format!("{:#}", resolve(text, 1).err().expect(text));
        assert!(error("usdt:relative/path:p:n").contains("not an absolute path"));
        assert!(error("bogus:/bin/true").contains("unknown probe point type"));
        assert!(error("uprobe:/proc/self/exe:0xzz").contains("not a hexadecimal address"));
        assert!(error("usdt:/proc/self/exe:p:n:str=9").contains("argument number below 6"));
        assert!(error("fentry:tcp_connect").contains("does not attach fentry"));
        assert!(error("uprobe:/dev/zero:main").contains("not a regular file"));
        assert!(error(&format!("uretprobe:{}:main:str=1", std::env::current_exe().unwrap().display())).contains("one argument"));
    }

    #[test]
    fn resolves_a_function_of_this_test_binary() {
        let exe = std::env::current_exe().unwrap();
        let point = format!("uprobe:{}:main", exe.display());
        let sites = resolve(&point, 7).unwrap().sites;
        assert_eq!(sites.len(), 1);
        assert_eq!((sites[0].site.probe, sites[0].site.string_arg, sites[0].site.args[0].reg), (7, NO_STRING, 112));
        assert!(format!("{:#}", resolve(&format!("uprobe:{}:no_such_symbol_here", exe.display()), 7).err().unwrap()).contains("no function symbol"));
    }
}
