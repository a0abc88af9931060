//! From ring buffers to plugins: the reader drains each probe's ring buffer into
//! batches and the router fans them out to the plugins that subscribed.

pub mod filter;
pub mod reader;
pub mod ring;
pub mod route;
pub mod scope;

use std::sync::Arc;

pub use filter::{CompiledFilters, EventFilter};
pub use reader::Reader;
pub use route::{Router, Subscriber};
pub use scope::CgroupScope;

/// Kinds of event; one ring buffer (probe family) each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Syscall,
}

/// Raw records of one kind, back to back, shared by every plugin that gets them whole.
#[derive(Debug, Clone)]
pub struct Batch {
    pub kind: EventKind,
    pub records: Arc<Vec<u8>>,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.records.len() / wasmtap_events::SyscallRecord::SIZE
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
}
