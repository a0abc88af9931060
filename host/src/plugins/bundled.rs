//! Plugins built into the binary by `host/build.rs` (every crate under `plugins/`).

/// (name, component bytes) for each bundled plugin.
pub const BUNDLED: &[(&str, &[u8])] = include!(concat!(env!("OUT_DIR"), "/bundled.rs"));

/// The component bytes of bundled plugin `name`.
pub fn get(name: &str) -> Option<&'static [u8]> {
    BUNDLED.iter().find(|(n, _)| *n == name).map(|(_, bytes)| *bytes)
}

/// Names of the bundled plugins.
pub fn names() -> impl Iterator<Item = &'static str> {
    BUNDLED.iter().map(|(n, _)| *n)
}
