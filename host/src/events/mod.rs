//! From ring buffers to plugins: the reader drains each kind's ring buffer into
//! batches and the router fans them out to the plugins that subscribed. Nothing here
//! knows a particular kind: records are read through the common header and the kind's
//! selector offset.

pub mod filter;
pub mod reader;
pub mod ring;
pub mod route;
pub mod scope;

use std::sync::Arc;

pub use filter::{CompiledFilters, EventFilter, RecordKeys};
pub use reader::Reader;
pub use route::{Router, Subscriber};
pub use scope::CgroupScope;

use crate::probes::Kind;

/// Raw records of one kind, back to back, shared by every plugin that gets them whole.
#[derive(Debug, Clone)]
pub struct Batch {
    pub kind: Kind,
    pub records: Arc<Vec<u8>>,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.records.len() / self.kind.record_size
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
}
