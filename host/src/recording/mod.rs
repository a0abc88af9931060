//! Recordings: raw batches of event records as the probes delivered them, with each
//! kind's record layout, so that plugins can be run over real events without root
//! (`wasmtap record`, `wasmtap replay`, and the SDK's test kit).
//!
//! Format, version 1 (integers little-endian):
//! - the line `wasmtap-recording 1`;
//! - one line of JSON, the [`Header`]: who recorded, when, and each kind's name and
//!   record size (its layout: a layout only ever grows at the end);
//! - frames, one per batch: kind index (`u16`, into the header's kinds), record size
//!   (`u32`), record count (`u32`), records dropped before this batch (`u64`), then the
//!   records, count × size bytes.

pub mod record;
pub mod replay;

use std::{
    fs::File,
    io::{BufRead as _, BufReader, BufWriter, Read as _, Write as _},
    path::Path,
};

use anyhow::{Context as _, bail, ensure};
use serde::{Deserialize, Serialize};

use crate::probes::{self, Kind};

const MAGIC: &str = "wasmtap-recording 1\n";
/// Largest frame a reader accepts (a batch is at most 4096 records).
const MAX_FRAME_BYTES: usize = 16 << 20;
/// Longest header line.
const MAX_HEADER_BYTES: u64 = 64 << 10;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Header {
    /// The recording host's version.
    pub wasmtap: String,
    /// The WIT package the recording host offered.
    pub wit: String,
    pub node: String,
    /// The recording host's architecture: syscall numbers are per architecture.
    pub arch: String,
    /// Wall-clock start, nanoseconds since the Unix epoch.
    pub started_unix_ns: u64,
    pub kinds: Vec<KindLayout>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KindLayout {
    pub name: String,
    pub record_size: usize,
}

/// One recorded batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    pub kind: Kind,
    pub records: Vec<u8>,
    pub dropped: u64,
}

/// The WIT package version this host offers (`wasmtap:plugin@X`).
pub fn wit_version() -> &'static str {
    let wit = include_str!("../../../wit/wasmtap.wit");
    wit.lines().find_map(|l| l.strip_prefix("package wasmtap:plugin@")).and_then(|v| v.strip_suffix(';')).unwrap_or("unknown")
}

pub struct Writer {
    out: BufWriter<File>,
    kinds: Vec<Kind>,
    bytes: u64,
}

impl Writer {
    /// Creates `path` (not overwriting a file there) for batches of `kinds`.
    pub fn create(path: &Path, kinds: &[Kind], node: &str) -> anyhow::Result<Self> {
        // 0600: it holds what every process did (exec paths, peers, query texts).
        let file = std::os::unix::fs::OpenOptionsExt::mode(File::options().write(true).create_new(true), 0o600)
            .open(path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        let header = Header {
            wasmtap: env!("CARGO_PKG_VERSION").into(),
            wit: wit_version().into(),
            node: node.into(),
            arch: std::env::consts::ARCH.into(),
            started_unix_ns: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64),
            kinds: kinds.iter().map(|k| KindLayout { name: k.name.into(), record_size: k.record_size }).collect(),
        };
        let mut out = BufWriter::new(file);
        let head = format!("{MAGIC}{}\n", serde_json::to_string(&header)?);
        out.write_all(head.as_bytes())?;
        Ok(Self { out, kinds: kinds.to_vec(), bytes: head.len() as u64 })
    }

    /// Appends one batch of `kind`.
    pub fn write(&mut self, kind: Kind, records: &[u8], dropped: u64) -> anyhow::Result<()> {
        let index = self.kinds.iter().position(|k| *k == kind).context("a batch of a kind the recording does not have")? as u16;
        let count = (records.len() / kind.record_size) as u32;
        let mut head = Vec::with_capacity(18);
        head.extend_from_slice(&index.to_le_bytes());
        head.extend_from_slice(&(kind.record_size as u32).to_le_bytes());
        head.extend_from_slice(&count.to_le_bytes());
        head.extend_from_slice(&dropped.to_le_bytes());
        self.out.write_all(&head)?;
        self.out.write_all(&records[..count as usize * kind.record_size])?;
        self.bytes += (head.len() + count as usize * kind.record_size) as u64;
        Ok(())
    }

    /// Bytes written so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn finish(mut self) -> anyhow::Result<()> {
        self.out.flush().context("writing the recording")
    }
}

pub struct Reader {
    input: BufReader<File>,
    pub header: Header,
    /// This host's kind for each of the header's.
    kinds: Vec<Kind>,
}

impl Reader {
    /// Opens a recording; its kinds must be this host's, with the same layouts.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let mut input = BufReader::new(file);
        let mut magic = String::new();
        (&mut input).take(MAGIC.len() as u64).read_line(&mut magic)?;
        ensure!(magic == MAGIC, "{} is not a wasmtap recording (version 1)", path.display());
        let mut line = String::new();
        (&mut input).take(MAX_HEADER_BYTES).read_line(&mut line)?;
        let header: Header = serde_json::from_str(&line).with_context(|| format!("{}: the recording's header", path.display()))?;
        ensure!(
            header.arch == std::env::consts::ARCH,
            "the recording was made on {} and this host is {}: its syscall numbers would be read wrong; replay it on {}",
            header.arch,
            std::env::consts::ARCH,
            header.arch
        );
        let kinds = header
            .kinds
            .iter()
            .map(|layout| {
                let kind =
                    probes::kind(&layout.name).with_context(|| format!("the recording has events of kind {:?}, which this host does not know", layout.name))?;
                if kind.record_size != layout.record_size {
                    bail!(
                        "the recording's {} records are {} bytes, this host's are {} (recorded by wasmtap {}): replay it with that version",
                        kind.name,
                        layout.record_size,
                        kind.record_size,
                        header.wasmtap
                    );
                }
                Ok(kind)
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Self { input, header, kinds })
    }

    /// The next batch, or None at the end.
    pub fn next_frame(&mut self) -> anyhow::Result<Option<Frame>> {
        let mut head = [0u8; 18];
        match self.input.read_exact(&mut head[..1]) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        self.input.read_exact(&mut head[1..]).context("the recording ends inside a frame")?;
        let index = u16::from_le_bytes([head[0], head[1]]) as usize;
        let size = u32::from_le_bytes(head[2..6].try_into().expect("4 bytes")) as usize;
        let count = u32::from_le_bytes(head[6..10].try_into().expect("4 bytes")) as usize;
        let dropped = u64::from_le_bytes(head[10..18].try_into().expect("8 bytes"));
        let kind = *self.kinds.get(index).context("a frame names a kind the header does not have")?;
        ensure!(size == kind.record_size, "a frame's record size {size} is not its kind's {}", kind.record_size);
        let len = size.checked_mul(count).filter(|&n| n <= MAX_FRAME_BYTES).context("a frame larger than any batch")?;
        let mut records = vec![0u8; len];
        self.input.read_exact(&mut records).context("the recording ends inside a frame")?;
        Ok(Some(Frame { kind, records, dropped }))
    }
}

#[cfg(test)]
mod tests {
    use wasmtap_events::{Record as _, RecordHeader, SyscallRecord};

    use super::*;
    use crate::probes::{process, syscall};

    #[test]
    fn frames_come_back_as_written_and_damage_is_an_error() {
        let dir = std::env::temp_dir().join(format!("wasmtap-recording-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("r.wtrec");
        let _ = std::fs::remove_file(&path);
        let records: Vec<u8> =
            (1..=3).flat_map(|pid| SyscallRecord { header: RecordHeader { pid, ..Default::default() }, ..Default::default() }.as_bytes().to_vec()).collect();
        let mut w = Writer::create(&path, &[&syscall::KIND, &process::KIND], "n").unwrap();
        w.write(&syscall::KIND, &records, 5).unwrap();
        w.write(&syscall::KIND, &records[..64], 0).unwrap();
        w.finish().unwrap();
        assert!(Writer::create(&path, &[&syscall::KIND], "n").is_err(), "never overwrites");
        let mut r = Reader::open(&path).unwrap();
        assert_eq!((r.header.node.as_str(), r.header.wit.as_str()), ("n", wit_version()));
        assert_eq!(r.next_frame().unwrap(), Some(Frame { kind: &syscall::KIND, records: records.clone(), dropped: 5 }));
        assert_eq!(r.next_frame().unwrap().unwrap().records, records[..64]);
        assert_eq!(r.next_frame().unwrap(), None);
        // Cut inside the last frame.
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();
        let mut r = Reader::open(&path).unwrap();
        r.next_frame().unwrap();
        assert!(r.next_frame().unwrap_err().to_string().contains("ends inside a frame"));
        std::fs::write(&path, b"not a recording").unwrap();
        assert!(Reader::open(&path).err().unwrap().to_string().contains("not a wasmtap recording"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
