//! `meta`: the persistent state of one replicated volume (docs/FORMAT.md).
//!
//! - [`bitmap`]: in-memory dirty bitmap and its run-length wire encoding (pure).
//! - [`gen`]: generation identifiers and the resync decision (pure).
//! - [`format`](mod@format): on-disk superblock, bitmap pages and activity-log blocks (pure codecs).
//! - [`al`]: the activity log: which extents are hot, what a write must record (pure).
//! - [`device`]: the [`device::MetaDevice`] I/O contract, for files/block devices and a
//!   fault-injecting memory device.
//! - [`store`]: the metadata area on a device: create, open (replay), persist.
//! - [`cli`]: `create-md`, `show-md`, `dump-bitmap`, `new-current-uuid`.
//!
//! The volume's write path: [`store::MetaStore::mark_dirty`], then
//! [`store::MetaStore::prepare_write`] (no I/O on an activity-log hit), then the data write,
//! then [`store::MetaStore::complete_write`] once both copies hold it or its bits are set
//! (until then its extents stay in the activity log); bits are cleared with
//! [`store::MetaStore::clear_dirty`] once both copies hold the data.
//! Internal metadata shrinks the exported size to [`internal_placement`](format::internal_placement)'s
//! `data_size` (give the engine `reserved_tail = device_len - data_size`).

pub mod al;
pub mod bitmap;
pub mod cli;
pub mod device;
pub mod format;
pub mod gen;
pub mod store;
