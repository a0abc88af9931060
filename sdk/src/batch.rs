//! Typed, zero-copy views over the raw record bytes of a batch.
//!
//! The host sends records at a stride of `record-size` bytes. When that is this SDK's
//! layout size (the usual case) the bytes are viewed in place; otherwise each record is
//! copied: a longer stride (a newer host whose layout grew) is read as the prefix this
//! SDK knows, a shorter one (an older host) has the fields it lacks read as 0.

use std::borrow::Cow;

use wasmtap_events::Record;

/// A batch of records of one kind as delivered by the host.
pub struct Batch<'a, R: Record> {
    records: Cow<'a, [R]>,
    dropped: u64,
}

/// A batch of `syscall` records.
pub type SyscallBatch<'a> = Batch<'a, wasmtap_events::SyscallRecord>;
/// A batch of `process` records.
pub type ProcessBatch<'a> = Batch<'a, wasmtap_events::ProcessRecord>;
/// A batch of `sched` records.
pub type SchedBatch<'a> = Batch<'a, wasmtap_events::SchedRecord>;
/// A batch of `tcp` records.
pub type TcpBatch<'a> = Batch<'a, wasmtap_events::TcpRecord>;
/// A batch of `uprobe` records.
pub type UprobeBatch<'a> = Batch<'a, wasmtap_events::UprobeRecord>;

impl<'a, R: Record> Batch<'a, R> {
    /// Views `bytes` as records `record_size` bytes apart. Borrowed when the stride is
    /// `R`'s size and the buffer is aligned (it is when the host delivers it: the guest
    /// allocator returns 8-byte aligned blocks), copied otherwise. Trailing bytes that
    /// do not form a whole record are ignored; a stride of 0 yields no records (and is
    /// reported to the host's log: the host never sends one).
    pub fn new(bytes: &'a [u8], record_size: u32, dropped: u64) -> Self {
        let stride = record_size as usize;
        if stride == 0 {
            if !bytes.is_empty() {
                crate::log(crate::logs::Level::Error, &format!("a batch of {} bytes came with record size 0", bytes.len()));
            }
            return Self { records: Cow::Owned(Vec::new()), dropped };
        }
        let count = bytes.len() / stride;
        let records = if stride == R::SIZE && bytes.as_ptr().align_offset(align_of::<R>()) == 0 {
            // SAFETY: aligned (checked), `count` whole records in bounds, and every bit
            // pattern is a valid `R` (the `Record` contract).
            Cow::Borrowed(unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<R>(), count) })
        } else {
            Cow::Owned(bytes.chunks_exact(stride).map(R::read).collect())
        };
        Self { records, dropped }
    }

    /// The records, oldest first.
    pub fn records(&self) -> &[R] {
        &self.records
    }

    /// Records the host dropped for this plugin since the previous batch (queue full).
    pub fn dropped(&self) -> u64 {
        self.dropped
    }
}

#[cfg(test)]
mod tests {
    use wasmtap_events::{ProcessRecord, RecordHeader, SyscallRecord, process};

    use super::*;

    fn record(nr: u32) -> SyscallRecord {
        SyscallRecord { syscall_nr: nr, latency_ns: 100 * nr as u64, ret: -2, header: RecordHeader { pid: nr, ..Default::default() }, reserved: 0 }
    }

    fn bytes_of<R: Record>(records: &[R], stride: usize) -> Vec<u8> {
        records
            .iter()
            .flat_map(|r| {
                let mut b = r.as_bytes().to_vec();
                b.resize(stride, 0xAA);
                b
            })
            .collect()
    }

    #[test]
    fn views_aligned_and_unaligned_buffers_alike() {
        let records = [record(1), record(2), record(3)];
        let bytes = bytes_of(&records, 64);
        let mut shifted = vec![0u8];
        shifted.extend_from_slice(&bytes);
        for buf in [&bytes[..], &shifted[1..]] {
            let batch = SyscallBatch::new(buf, 64, 7);
            assert_eq!(batch.records(), &records);
            assert_eq!(batch.dropped(), 7);
            assert_eq!(batch.records()[1].errno(), Some(2));
        }
        assert_eq!(SyscallBatch::new(&bytes[..63], 64, 0).records().len(), 0, "a partial record is not one");
    }

    #[test]
    fn reads_the_known_prefix_of_a_longer_stride() {
        let records = [record(1), record(2)];
        let bytes = bytes_of(&records, 72);
        let batch = SyscallBatch::new(&bytes, 72, 0);
        assert_eq!(batch.records(), &records);
    }

    #[test]
    fn zero_fills_what_a_shorter_stride_lacks() {
        let mut exit = ProcessRecord { event: process::event::EXIT, exit_code: 3, lifetime_ns: 99, ..Default::default() };
        exit.header.pid = 42;
        let old = bytes_of(&[exit, exit], process::SIZE_0_2_0);
        let batch = ProcessBatch::new(&old[..process::SIZE_0_2_0 * 2], process::SIZE_0_2_0 as u32, 0);
        assert_eq!(batch.records().len(), 2);
        assert_eq!((batch.records()[1].header.pid, batch.records()[1].exit_code), (42, 3));
        assert_eq!(batch.records()[1].lifetime_ns, 0, "not sent by a 0.2.0 host");
    }
}
