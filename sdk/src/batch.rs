//! Typed, zero-copy views over the raw record bytes of a batch.

use std::borrow::Cow;

use wasmtap_events::SyscallRecord;

/// A batch of syscall records as delivered by the host.
pub struct SyscallBatch<'a> {
    records: Cow<'a, [SyscallRecord]>,
    dropped: u64,
}

impl<'a> SyscallBatch<'a> {
    /// Views `bytes` as records. Borrowed when the buffer is suitably aligned (it is when
    /// the host delivers it: the guest allocator returns 8-byte aligned blocks), copied
    /// otherwise. Trailing bytes that do not form a whole record are ignored, as is a
    /// `record_size` this SDK version does not know.
    pub fn new(bytes: &'a [u8], record_size: u32, dropped: u64) -> Self {
        if record_size as usize != SyscallRecord::SIZE {
            return Self { records: Cow::Owned(Vec::new()), dropped };
        }
        let count = bytes.len() / SyscallRecord::SIZE;
        let records = if bytes.as_ptr().align_offset(align_of::<SyscallRecord>()) == 0 {
            // SAFETY: aligned (checked), `count` whole records in bounds, and every bit
            // pattern is a valid `SyscallRecord` (integers only).
            Cow::Borrowed(unsafe {
                std::slice::from_raw_parts(bytes.as_ptr().cast::<SyscallRecord>(), count)
            })
        } else {
            Cow::Owned(bytes.chunks_exact(SyscallRecord::SIZE).filter_map(SyscallRecord::read).collect())
        };
        Self { records, dropped }
    }

    /// The records, oldest first.
    pub fn records(&self) -> &[SyscallRecord] {
        &self.records
    }

    /// Records the host dropped for this plugin since the previous batch (queue full).
    pub fn dropped(&self) -> u64 {
        self.dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(nr: u32) -> SyscallRecord {
        SyscallRecord { syscall_nr: nr, latency_ns: 100 * nr as u64, ret: -2, ..Default::default() }
    }

    fn bytes_of(records: &[SyscallRecord]) -> Vec<u8> {
        records.iter().flat_map(|r| *r.as_bytes()).collect()
    }

    #[test]
    fn views_aligned_and_unaligned_buffers_alike() {
        let records = [record(1), record(2), record(3)];
        let bytes = bytes_of(&records);
        let mut shifted = vec![0u8];
        shifted.extend_from_slice(&bytes);
        for buf in [&bytes[..], &shifted[1..]] {
            let batch = SyscallBatch::new(buf, 64, 7);
            assert_eq!(batch.records(), &records);
            assert_eq!(batch.dropped(), 7);
            assert_eq!(batch.records()[1].errno(), Some(2));
        }
    }

    #[test]
    fn ignores_partial_records_and_unknown_sizes() {
        let bytes = bytes_of(&[record(1)]);
        assert_eq!(SyscallBatch::new(&bytes[..63], 64, 0).records().len(), 0);
        assert_eq!(SyscallBatch::new(&bytes, 72, 0).records().len(), 0);
    }
}
