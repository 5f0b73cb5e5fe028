//! `meta`: the persistent state of one replicated volume (docs/FORMAT.md).
//!
//! - [`bitmap`]: in-memory dirty bitmap and its run-length wire encoding (pure).
//! - [`gen`]: generation identifiers and the resync decision (pure).
//! - [`format`]: on-disk superblock, bitmap pages and activity-log blocks (pure codecs).
//! - [`al`]: the activity log: which extents are hot, what a write must record (pure).
//! - [`store`]: the metadata area on a [`store::MetaDevice`]: create, open, persist.
//! - [`cli`]: `create-md`, `show-md`, `dump-bitmap`, `new-current-uuid`.

pub mod al;
pub mod bitmap;
pub mod cli;
pub mod device;
pub mod format;
pub mod gen;
pub mod store;
