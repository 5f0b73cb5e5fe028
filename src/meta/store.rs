//! [`MetaStore`]: the metadata area of one volume on a [`MetaDevice`], kept crash-safe.
//!
//! Durability rules (each public mutating call returns `Ok` only after they hold):
//! - the superblock is written to the slot *not* holding the newest good copy, then flushed,
//!   so a torn write leaves the previous copy intact;
//! - [`MetaStore::prepare_write`] returns [`Prepared::Ready`] only when every extent the write
//!   touches is in a durable activity-log transaction, and those extents stay in the log until
//!   [`MetaStore::complete_write`]; bitmap pages covering an extent are durable before the
//!   transaction that evicts it is written;
//! - after any I/O error the store refuses further changes ([`StoreError::Failed`]): the
//!   only way on is to reopen, which replays the log.
//!
//! Opening ([`MetaStore::open`]) loads the newest valid superblock slot, the bitmap pages (a
//! page that fails its checks counts as all dirty) and replays the activity log (every logged
//! extent becomes dirty; an unrecoverable log makes the whole device dirty), then persists
//! the result. [`inspect`] does the same reading without writing anything (for `show-md`).

use std::io;

use super::al::{self, ActivityLog, AlError, AlGeometry, AlRecord, Replayed, WritePlan};
use super::bitmap::{BitmapError, BitmapGeometry, DirtyBitmap, Granularity};
use super::device::MetaDevice;
use super::format::{
    self, AreaLayout, BlockId, FormatError, Placement, Superblock, BLOCK, BM_WORDS_PER_PAGE,
};
use super::gen::{DiskFlags, GenIds};

/// Errors of the metadata store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Device I/O failed.
    #[error("metadata I/O failed while {what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Neither superblock slot holds valid metadata.
    #[error("no valid twinvol metadata: {a}; {b} (wrong device, or run `twinvol create-md`; internal metadata sits in the device's last blocks, so a grown device no longer shows it: resizing is not supported yet)")]
    NoSuperblock {
        /// Why slot A was refused.
        a: Box<FormatError>,
        /// Why slot B was refused.
        b: Box<FormatError>,
    },
    /// The device cannot hold the metadata.
    #[error("the device is too small: {len} bytes, the metadata area needs {needed} bytes plus some data")]
    DeviceTooSmall {
        /// Device length.
        len: u64,
        /// Area size.
        needed: u64,
    },
    /// The superblock does not fit this device.
    #[error("the metadata describes a {area_size}-byte area but the device has {len} bytes (truncated or wrong device?)")]
    AreaMismatch {
        /// Area size in the superblock.
        area_size: u64,
        /// Device length.
        len: u64,
    },
    /// Bad bitmap parameters or range.
    #[error(transparent)]
    Bitmap(#[from] BitmapError),
    /// Bad activity-log parameters or write.
    #[error(transparent)]
    Al(#[from] AlError),
    /// An earlier write or flush failed.
    #[error("an earlier metadata write failed; the in-memory state may be ahead of the disk: reopen the metadata")]
    Failed,
}

/// What [`MetaStore::prepare_write`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prepared {
    /// The write may be issued; this many metadata blocks were written (0 on a hit).
    Ready(u32),
    /// Every activity-log slot the write could take holds writes in flight: nothing was
    /// written; try again once one of them completes.
    Wait,
}

/// How to lay out new metadata.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Volume identity (random when `None`).
    pub volume_uuid: Option<[u8; 16]>,
    /// This node's id.
    pub node_id: u32,
    /// The peer's id.
    pub peer_node_id: u32,
    /// Bitmap granularity.
    pub granularity: Granularity,
    /// Activity-log geometry.
    pub al: AlGeometry,
    /// `None`: internal metadata at the tail of the device (the data size follows from the
    /// device size). `Some(size)`: external metadata for a data device of `size` bytes.
    pub external_data_size: Option<u64>,
}

impl Default for CreateOptions {
    fn default() -> Self {
        Self {
            volume_uuid: None,
            node_id: 0,
            peer_node_id: 1,
            granularity: Granularity::DEFAULT,
            al: AlGeometry::default(),
            external_data_size: None,
        }
    }
}

/// Something found wrong (and handled) while reading metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    /// A superblock slot was refused; the other one is used.
    SuperblockSlot(FormatError),
    /// A bitmap page was refused; its chunks count as dirty.
    BitmapPage(FormatError),
    /// An activity-log block was refused (blank blocks are normal and not reported).
    AlBlock(FormatError),
    /// The log could not be rebuilt; the whole device counts as dirty.
    AlIncomplete,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Finding::SuperblockSlot(e) => write!(f, "{e}; the other slot holds the last good copy"),
            Finding::BitmapPage(e) => write!(f, "{e}; its chunks are treated as dirty"),
            Finding::AlBlock(e) => write!(f, "{e}; ignored"),
            Finding::AlIncomplete => f.write_str(
                "the activity log cannot be rebuilt; the whole device is treated as dirty",
            ),
        }
    }
}

/// Everything read from a metadata area, before any repair is written.
#[derive(Debug, Clone)]
pub struct Inspection {
    /// Offset of the area on the device.
    pub area_start: u64,
    /// Sizes of the area's parts.
    pub layout: AreaLayout,
    /// The newest valid superblock.
    pub superblock: Superblock,
    /// The bitmap as stored (bad pages all dirty), *before* the activity log is applied.
    pub stored_bitmap: DirtyBitmap,
    /// Pages that failed their checks.
    pub bad_pages: Vec<u64>,
    /// The rebuilt activity log.
    pub al: Replayed,
    /// Problems found.
    pub findings: Vec<Finding>,
}

impl Inspection {
    /// The bitmap after recovery: stored bits plus every logged extent (or everything when
    /// the log is incomplete).
    pub fn recovered_bitmap(&self) -> DirtyBitmap {
        let mut bm = self.stored_bitmap.clone();
        if !self.al.complete {
            bm.set_all();
            return bm;
        }
        let g = self.superblock.al;
        let size = self.superblock.data_size;
        for e in self.al.table.iter().copied().filter(|e| *e != al::EMPTY) {
            let r = g.extent_bytes(e);
            if r.start < size {
                let _ = bm.set(r.start, r.end.min(size) - r.start);
            }
        }
        bm
    }

    /// Whether this is metadata as `create-md` left it: fresh generation ids, no dirty
    /// bits, no activity-log transaction beyond the initial ones.
    pub fn is_fresh(&self) -> bool {
        self.superblock.gen.is_fresh()
            && self.stored_bitmap.dirty_chunks() == 0
            && self.al.complete
            && self.al.last_seq == u64::from(self.superblock.al.coverage())
            && self.al.table.iter().all(|e| *e == al::EMPTY)
    }
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> StoreError {
    let what = what.into();
    move |source| StoreError::Io { what, source }
}

fn read_block<D: MetaDevice>(
    dev: &mut D,
    offset: u64,
    what: BlockId,
) -> Result<[u8; BLOCK], StoreError> {
    let mut b = [0u8; BLOCK];
    dev.read_at(offset, &mut b)
        .map_err(io_err(format!("reading {what} at offset {offset}")))?;
    Ok(b)
}

/// What a device's tail holds, for commands that must not serve a mirrored volume's device
/// behind its metadata's back (`twinvol export`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probed {
    /// No twinvol superblock: blank, another format, or too small to hold one.
    Nothing,
    /// Valid twinvol metadata.
    Metadata {
        /// The device's length in bytes.
        device_len: u64,
        /// Bytes of data before the metadata area.
        data_size: u64,
        /// The current generation id.
        current: u64,
        /// The disk-state flags.
        flags: DiskFlags,
    },
    /// A twinvol superblock that fails its checks (torn, corrupted, or newer format): still
    /// twinvol's, so nothing may serve the device as plain data.
    Damaged(String),
}

/// Looks for twinvol metadata at the device's tail, writing nothing.
pub fn probe<D: MetaDevice>(dev: &mut D) -> Result<Probed, StoreError> {
    let ours =
        |e: &FormatError| !matches!(e, FormatError::Blank { .. } | FormatError::BadMagic { .. });
    match inspect(dev) {
        Ok(i) => Ok(Probed::Metadata {
            device_len: dev.len(),
            data_size: i.superblock.data_size,
            current: i.superblock.gen.current,
            flags: i.superblock.flags,
        }),
        Err(StoreError::DeviceTooSmall { .. }) => Ok(Probed::Nothing),
        Err(StoreError::NoSuperblock { a, b }) if !ours(&a) && !ours(&b) => Ok(Probed::Nothing),
        Err(e @ (StoreError::NoSuperblock { .. } | StoreError::AreaMismatch { .. })) => {
            Ok(Probed::Damaged(e.to_string()))
        }
        Err(e) => Err(e),
    }
}

/// [`probe`] on the file or block device at `path`, opened read-only (not claimed).
pub fn probe_path(path: &std::path::Path) -> Result<Probed, StoreError> {
    let mut dev = super::device::FileDevice::open(path, false).map_err(|e| StoreError::Io {
        what: format!("opening {} to look for twinvol metadata", path.display()),
        source: match e {
            crate::engine::claim::ClaimError::Open { source, .. } => source,
            other => io::Error::other(other.to_string()),
        },
    })?;
    probe(&mut dev)
}

/// Reads and checks a metadata area without writing anything.
pub fn inspect<D: MetaDevice>(dev: &mut D) -> Result<Inspection, StoreError> {
    let len = dev.len();
    let mut slots = Vec::new();
    for slot in 0..2u8 {
        let off = format::superblock_offset_on_device(len, slot)
            .ok_or(StoreError::DeviceTooSmall { len, needed: 8192 })?;
        let b = read_block(dev, off, BlockId::SuperblockSlot(slot))?;
        slots.push(format::decode_superblock(&b, slot));
    }
    let mut findings = Vec::new();
    let b = slots.pop().unwrap_or(Err(FormatError::Blank {
        block: BlockId::SuperblockSlot(1),
    }));
    let a = slots.pop().unwrap_or(Err(FormatError::Blank {
        block: BlockId::SuperblockSlot(0),
    }));
    let superblock = match (a, b) {
        (Ok(a), Ok(b)) => {
            if a.seq > b.seq {
                a
            } else {
                b
            }
        }
        (Ok(a), Err(e)) | (Err(e), Ok(a)) => {
            findings.push(Finding::SuperblockSlot(e));
            a
        }
        (Err(a), Err(b)) => {
            return Err(StoreError::NoSuperblock {
                a: Box::new(a),
                b: Box::new(b),
            })
        }
    };
    let layout = superblock.layout().map_err(|e| StoreError::NoSuperblock {
        a: Box::new(e.clone()),
        b: Box::new(e),
    })?;
    let end = len / BLOCK as u64 * BLOCK as u64;
    let area_start = end
        .checked_sub(layout.area_size)
        .filter(|s| superblock.placement == Placement::External || superblock.data_size <= *s)
        .ok_or(StoreError::AreaMismatch {
            area_size: layout.area_size,
            len,
        })?;
    let uuid = superblock.volume_uuid;

    let bg = superblock
        .bitmap_geometry()
        .map_err(|e| StoreError::NoSuperblock {
            a: Box::new(e.clone()),
            b: Box::new(e),
        })?;
    let mut stored_bitmap = DirtyBitmap::new(bg);
    let mut bad_pages = Vec::new();
    for p in 0..layout.bitmap_pages {
        let b = read_block(
            dev,
            area_start + layout.bitmap_page_offset(p),
            BlockId::BitmapPage(p),
        )?;
        let start = p as usize * BM_WORDS_PER_PAGE;
        match format::decode_bitmap_page(&b, &uuid, p) {
            Ok(words) => stored_bitmap.load_words(start, &words),
            Err(e) => {
                findings.push(Finding::BitmapPage(e));
                bad_pages.push(p);
                stored_bitmap.load_words(start, &[u64::MAX; BM_WORDS_PER_PAGE]);
            }
        }
    }

    let mut records = Vec::new();
    for i in 0..layout.al_blocks {
        let b = read_block(
            dev,
            area_start + layout.al_block_offset(i),
            BlockId::AlBlock(i),
        )?;
        match format::decode_al_block(&b, &uuid, superblock.al.slots(), i, layout.al_blocks) {
            Ok(r) => records.push(r),
            Err(FormatError::Blank { .. }) => {}
            Err(e) => findings.push(Finding::AlBlock(e)),
        }
    }
    let replayed = al::replay(superblock.al, &records);
    if !replayed.complete {
        findings.push(Finding::AlIncomplete);
    }
    Ok(Inspection {
        area_start,
        layout,
        superblock,
        stored_bitmap,
        bad_pages,
        al: replayed,
        findings,
    })
}

/// An open, writable metadata area.
///
/// Invariants: `changed[p]` is false only if bitmap page `p` on disk equals the in-memory
/// words; `al_seq` is the sequence of the newest durable AL transaction; the on-disk slot
/// `superblock.seq % 2` holds `superblock`.
pub struct MetaStore<D: MetaDevice> {
    dev: D,
    area_start: u64,
    layout: AreaLayout,
    superblock: Superblock,
    bitmap: DirtyBitmap,
    al: ActivityLog,
    al_seq: u64,
    changed: Vec<bool>,
    failed: bool,
}

impl<D: MetaDevice> MetaStore<D> {
    /// Writes fresh metadata (clean bitmap, empty log, fresh generation ids, both superblock
    /// slots) and returns it open. The old superblocks are blanked first, so a crash during
    /// create leaves "no metadata", never a mix of old and new.
    pub fn create(mut dev: D, opts: &CreateOptions) -> Result<Self, StoreError> {
        let len = dev.len();
        let end = len / BLOCK as u64 * BLOCK as u64;
        let (layout, data_size, area_start, placement) = match opts.external_data_size {
            None => {
                let (layout, data, start) =
                    format::internal_placement(len, opts.granularity, opts.al).ok_or(
                        StoreError::DeviceTooSmall {
                            len,
                            needed: 16 * BLOCK as u64,
                        },
                    )?;
                (layout, data, start, Placement::Internal)
            }
            Some(data) => {
                let layout = AreaLayout::new(BitmapGeometry::new(data, opts.granularity)?, opts.al);
                let start =
                    end.checked_sub(layout.area_size)
                        .ok_or(StoreError::DeviceTooSmall {
                            len,
                            needed: layout.area_size,
                        })?;
                (layout, data, start, Placement::External)
            }
        };
        if data_size > u64::from(u32::MAX) * u64::from(opts.al.extent_size()) {
            return Err(AlError::OffsetTooLarge { offset: data_size }.into());
        }
        let volume_uuid = match opts.volume_uuid {
            Some(u) => u,
            None => {
                let mut u = [0u8; 16];
                getrandom::fill(&mut u).map_err(|e| StoreError::Io {
                    what: "drawing a random volume uuid".into(),
                    source: io::Error::other(e.to_string()),
                })?;
                u
            }
        };
        let superblock = Superblock {
            seq: 0,
            volume_uuid,
            node_id: opts.node_id,
            peer_node_id: opts.peer_node_id,
            data_size,
            granularity: opts.granularity,
            al: opts.al,
            placement,
            area_size: layout.area_size,
            gen: GenIds::FRESH,
            flags: DiskFlags::default(),
        };
        for slot in 0..2u8 {
            let off = area_start + layout.superblock_offset(slot);
            dev.write_at(off, &[0; BLOCK])
                .map_err(io_err("blanking the old superblocks"))?;
        }
        dev.flush()
            .map_err(io_err("flushing the blanked superblocks"))?;
        let bitmap = DirtyBitmap::new(superblock.bitmap_geometry().map_err(|e| {
            StoreError::NoSuperblock {
                a: Box::new(e.clone()),
                b: Box::new(e),
            }
        })?);
        let mut store = Self {
            dev,
            area_start,
            layout,
            superblock,
            changed: vec![true; layout.bitmap_pages as usize],
            bitmap,
            al: ActivityLog::new(opts.al),
            al_seq: 0,
            failed: false,
        };
        store.write_changed_pages()?;
        // The log's ring: blank the stale blocks, then a full table of empty slots.
        for i in 0..layout.al_blocks {
            let off = area_start + layout.al_block_offset(i);
            store
                .dev
                .write_at(off, &[0; BLOCK])
                .map_err(io_err(format!("blanking activity-log block {i}")))?;
        }
        store.write_full_al_table()?;
        store.flush("creating the metadata")?;
        for seq in 0..2 {
            store.superblock.seq = seq;
            store.write_superblock_block()?;
        }
        store.flush("writing the superblocks")?;
        Ok(store)
    }

    /// Opens existing metadata: reads it ([`inspect`]), marks every logged extent dirty,
    /// persists the recovered bitmap and repairs a bad superblock slot. Returns the findings.
    pub fn open(mut dev: D) -> Result<(Self, Vec<Finding>), StoreError> {
        let ins = inspect(&mut dev)?;
        let bitmap = ins.recovered_bitmap();
        let mut changed = vec![false; ins.layout.bitmap_pages as usize];
        for p in &ins.bad_pages {
            changed[*p as usize] = true;
        }
        // Pages whose words differ from what was stored (the replayed extents).
        for (p, c) in changed.iter_mut().enumerate() {
            let r = p * BM_WORDS_PER_PAGE..((p + 1) * BM_WORDS_PER_PAGE).min(bitmap.words().len());
            if bitmap.words()[r.clone()] != ins.stored_bitmap.words()[r] {
                *c = true;
            }
        }
        let al = if ins.al.complete {
            ActivityLog::from_table(ins.superblock.al, ins.al.table.clone())
        } else {
            ActivityLog::new(ins.superblock.al)
        };
        let mut store = Self {
            dev,
            area_start: ins.area_start,
            layout: ins.layout,
            superblock: ins.superblock.clone(),
            bitmap,
            al,
            al_seq: ins.al.last_seq,
            changed,
            failed: false,
        };
        store.write_changed_pages()?;
        store.flush("persisting the recovered bitmap")?;
        if !ins.al.complete {
            store.write_full_al_table()?;
            store.flush("rewriting the activity log")?;
        }
        if ins
            .findings
            .iter()
            .any(|f| matches!(f, Finding::SuperblockSlot(_)))
        {
            store.write_superblock()?;
        }
        Ok((store, ins.findings))
    }

    fn guard(&self) -> Result<(), StoreError> {
        if self.failed {
            Err(StoreError::Failed)
        } else {
            Ok(())
        }
    }

    fn flush(&mut self, what: &str) -> Result<(), StoreError> {
        let r = self
            .dev
            .flush()
            .map_err(io_err(format!("flushing after {what}")));
        self.failed |= r.is_err();
        r
    }

    fn write(&mut self, offset: u64, block: &[u8; BLOCK], what: BlockId) -> Result<(), StoreError> {
        let r = self
            .dev
            .write_at(offset, block)
            .map_err(io_err(format!("writing {what} at offset {offset}")));
        self.failed |= r.is_err();
        r
    }

    fn write_page(&mut self, p: u64) -> Result<(), StoreError> {
        let words = self.bitmap.words();
        let s = (p as usize * BM_WORDS_PER_PAGE).min(words.len());
        let e = (s + BM_WORDS_PER_PAGE).min(words.len());
        let block = format::encode_bitmap_page(&self.superblock.volume_uuid, p, &words[s..e]);
        self.write(
            self.area_start + self.layout.bitmap_page_offset(p),
            &block,
            BlockId::BitmapPage(p),
        )?;
        self.changed[p as usize] = false;
        Ok(())
    }

    fn write_changed_pages(&mut self) -> Result<u64, StoreError> {
        let mut n = 0;
        for p in 0..self.layout.bitmap_pages {
            if self.changed[p as usize] {
                self.write_page(p)?;
                n += 1;
            }
        }
        Ok(n)
    }

    fn write_al_record(&mut self, r: &AlRecord) -> Result<(), StoreError> {
        let i = (r.seq % u64::from(self.layout.al_blocks)) as u32;
        let block =
            format::encode_al_block(&self.superblock.volume_uuid, self.superblock.al.slots(), r);
        self.write(
            self.area_start + self.layout.al_block_offset(i),
            &block,
            BlockId::AlBlock(i),
        )
    }

    /// Writes the whole slot table as context-only transactions (not flushed).
    fn write_full_al_table(&mut self) -> Result<(), StoreError> {
        for _ in 0..self.superblock.al.coverage() {
            let r = self.al.context_record(self.al_seq + 1);
            self.write_al_record(&r)?;
            self.al_seq += 1;
        }
        Ok(())
    }

    fn write_superblock_block(&mut self) -> Result<(), StoreError> {
        let slot = (self.superblock.seq % 2) as u8;
        let block = format::encode_superblock(&self.superblock);
        self.write(
            self.area_start + self.layout.superblock_offset(slot),
            &block,
            BlockId::SuperblockSlot(slot),
        )
    }

    /// Writes the superblock with the next sequence number into the other slot and flushes.
    fn write_superblock(&mut self) -> Result<(), StoreError> {
        self.superblock.seq += 1;
        self.write_superblock_block()?;
        self.flush("writing the superblock")
    }

    /// The newest superblock.
    pub fn superblock(&self) -> &Superblock {
        &self.superblock
    }

    /// The in-memory bitmap.
    pub fn bitmap(&self) -> &DirtyBitmap {
        &self.bitmap
    }

    /// The activity log.
    pub fn activity_log(&self) -> &ActivityLog {
        &self.al
    }

    /// Offset of the area on the device.
    pub fn area_start(&self) -> u64 {
        self.area_start
    }

    /// The device.
    pub fn device(&self) -> &D {
        &self.dev
    }

    /// Marks a range dirty in memory (before the data write is issued).
    pub fn mark_dirty(&mut self, offset: u64, len: u64) -> Result<(), StoreError> {
        let chunks = self.bitmap.touched_chunks(offset, len);
        if self.bitmap.set(offset, len)? > 0 {
            self.mark_pages(chunks);
        }
        Ok(())
    }

    /// Clears fully covered chunks in memory (after both copies hold the data).
    pub fn clear_dirty(&mut self, offset: u64, len: u64) -> Result<(), StoreError> {
        let chunks = self.bitmap.covered_chunks(offset, len);
        if self.bitmap.clear(offset, len)? > 0 {
            self.mark_pages(chunks);
        }
        Ok(())
    }

    /// Replaces the whole bitmap in memory (e.g. after merging the peer's). Only in memory:
    /// call [`Self::persist_bitmap`] before relying on it surviving a crash.
    pub fn replace_bitmap(&mut self, bitmap: DirtyBitmap) -> Result<(), StoreError> {
        if bitmap.geometry() != self.bitmap.geometry() {
            return Err(BitmapError::GeometryMismatch {
                ours: self.bitmap.geometry(),
                theirs: bitmap.geometry(),
            }
            .into());
        }
        self.bitmap = bitmap;
        self.changed.iter_mut().for_each(|c| *c = true);
        Ok(())
    }

    fn mark_pages(&mut self, chunks: std::ops::Range<u64>) {
        if chunks.is_empty() {
            return;
        }
        let bits = format::BM_BITS_PER_PAGE;
        for p in chunks.start / bits..=(chunks.end - 1) / bits {
            if let Some(c) = self.changed.get_mut(p as usize) {
                *c = true;
            }
        }
    }

    /// Makes the activity log cover a write before it is issued: nothing to do on a hit;
    /// otherwise persists the bitmap pages of evicted extents, then writes and flushes one
    /// transaction. On [`Prepared::Ready`] the write counts as in flight in its extents, which
    /// stay in the log until [`Self::complete_write`] of the same range; on
    /// [`Prepared::Wait`] nothing changed (every slot the write could take has writes in
    /// flight): call again after another write completes.
    pub fn prepare_write(&mut self, offset: u64, len: u64) -> Result<Prepared, StoreError> {
        self.guard()?;
        if offset
            .checked_add(len)
            .is_none_or(|e| e > self.superblock.data_size)
        {
            return Err(BitmapError::OutOfRange {
                offset,
                len,
                device_size: self.superblock.data_size,
            }
            .into());
        }
        let updates = match self.al.access(offset, len)? {
            WritePlan::Hit => {
                self.al.acquire(offset, len);
                return Ok(Prepared::Ready(0));
            }
            WritePlan::Wait => return Ok(Prepared::Wait),
            WritePlan::Transaction(u) => u,
        };
        let mut written = 0;
        let g = self.superblock.al;
        let shift = self.superblock.granularity.shift();
        let mut pages = Vec::new();
        for ev in updates.iter().filter_map(|u| u.evicted) {
            let r = g.extent_bytes(ev);
            let first = (r.start >> shift) / format::BM_BITS_PER_PAGE;
            let last = ((r.end - 1) >> shift) / format::BM_BITS_PER_PAGE;
            pages.extend(
                (first..=last).filter(|p| self.changed.get(*p as usize).copied().unwrap_or(false)),
            );
        }
        pages.sort_unstable();
        pages.dedup();
        if !pages.is_empty() {
            for p in pages {
                self.write_page(p)?;
                written += 1;
            }
            self.flush("writing bitmap pages of evicted extents")?;
        }
        let record = self.al.record(self.al_seq + 1, &updates);
        self.write_al_record(&record)?;
        self.flush("writing an activity-log transaction")?;
        self.al_seq += 1;
        self.al.apply(&updates);
        self.al.acquire(offset, len);
        Ok(Prepared::Ready(written + 1))
    }

    /// Ends a write that [`Self::prepare_write`] made ready: call it once the write is on both
    /// copies, or once its chunks are dirty in the bitmap (in memory is enough: an eviction
    /// persists them first). Its extents may then leave the activity log. No I/O. Returns
    /// false, changing nothing, for a range with no write in flight.
    pub fn complete_write(&mut self, offset: u64, len: u64) -> bool {
        self.al.release(offset, len)
    }

    /// Writes every changed bitmap page and flushes. Returns pages written.
    pub fn persist_bitmap(&mut self) -> Result<u64, StoreError> {
        self.guard()?;
        let n = self.write_changed_pages()?;
        if n > 0 {
            self.flush("persisting bitmap pages")?;
        }
        Ok(n)
    }

    /// Changes generation ids and flags durably (one superblock write + flush).
    pub fn update_state(
        &mut self,
        f: impl FnOnce(&mut GenIds, &mut DiskFlags),
    ) -> Result<(), StoreError> {
        self.guard()?;
        f(&mut self.superblock.gen, &mut self.superblock.flags);
        self.write_superblock()
    }

    /// Clean shutdown: persists the bitmap, empties the activity log (no write can be in
    /// flight) and clears the crashed-primary flag.
    pub fn close_clean(mut self) -> Result<D, StoreError> {
        self.persist_bitmap()?;
        self.al.clear();
        self.write_full_al_table()?;
        self.flush("emptying the activity log")?;
        self.update_state(|_, flags| flags.set(DiskFlags::CRASHED_PRIMARY, false))?;
        Ok(self.dev)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::device::{Fault, MemDevice};

    const MIB: u64 = 1 << 20;

    fn opts() -> CreateOptions {
        CreateOptions {
            volume_uuid: Some([5; 16]),
            granularity: Granularity::new(4096).unwrap(),
            al: AlGeometry::new(MIB, 4).unwrap(),
            ..Default::default()
        }
    }

    #[test]
    fn create_then_open_gives_fresh_clean_metadata() {
        let dev = MemDevice::new(300 * MIB);
        let s = MetaStore::create(dev.clone(), &opts()).unwrap();
        let data = s.superblock().data_size;
        assert!(data < 300 * MIB && data > 299 * MIB);
        drop(s);
        let ins = inspect(&mut dev.reboot()).unwrap();
        assert!(ins.is_fresh(), "{ins:?}");
        assert!(ins.findings.is_empty(), "{:?}", ins.findings);
        assert_eq!(ins.layout.bitmap_pages, 3);
        let (s, findings) = MetaStore::open(dev.reboot()).unwrap();
        assert!(findings.is_empty());
        assert_eq!(s.bitmap().dirty_chunks(), 0);
    }

    #[test]
    fn a_write_after_reopen_is_dirty_even_without_a_bitmap_flush() {
        let dev = MemDevice::new(300 * MIB);
        let mut s = MetaStore::create(dev.clone(), &opts()).unwrap();
        s.mark_dirty(5 * MIB + 4096, 4096).unwrap();
        assert_eq!(
            s.prepare_write(5 * MIB + 4096, 4096).unwrap(),
            Prepared::Ready(1)
        );
        assert_eq!(
            s.prepare_write(5 * MIB, 4096).unwrap(),
            Prepared::Ready(0),
            "a hit writes nothing"
        );
        // crash: no persist_bitmap
        let (s2, _) = MetaStore::open(dev.reboot()).unwrap();
        assert!(s2.bitmap().is_dirty(5 * MIB + 4096, 4096).unwrap());
        // The whole logged extent is dirty, nothing else.
        assert_eq!(
            s2.bitmap().dirty_runs().collect::<Vec<_>>(),
            vec![5 * MIB..6 * MIB]
        );
    }

    #[test]
    fn eviction_persists_the_evicted_extents_bitmap_page_first() {
        let dev = MemDevice::new(300 * MIB);
        let mut s = MetaStore::create(dev.clone(), &opts()).unwrap();
        for e in 0..4 {
            s.mark_dirty(e * MIB, 4096).unwrap();
            assert_eq!(s.prepare_write(e * MIB, 4096).unwrap(), Prepared::Ready(1));
        }
        s.mark_dirty(200 * MIB, 4096).unwrap();
        // Every slot holds a write in flight: nothing may be evicted, nothing is written.
        assert_eq!(s.prepare_write(200 * MIB, 4096).unwrap(), Prepared::Wait);
        for e in 0..4 {
            assert!(s.complete_write(e * MIB, 4096));
        }
        assert!(!s.complete_write(0, 4096), "completed twice");
        // Evicts extent 0 (page 0 changed): page write + transaction.
        assert_eq!(
            s.prepare_write(200 * MIB, 4096).unwrap(),
            Prepared::Ready(2)
        );
        let (s2, _) = MetaStore::open(dev.reboot()).unwrap();
        assert!(s2.bitmap().is_dirty(0, 4096).unwrap());
        assert!(!s2.activity_log().is_hot(0));
    }

    #[test]
    fn close_clean_leaves_only_the_bitmap_bits() {
        let dev = MemDevice::new(300 * MIB);
        let mut s = MetaStore::create(dev.clone(), &opts()).unwrap();
        s.update_state(|_, f| f.set(DiskFlags::CRASHED_PRIMARY, true))
            .unwrap();
        s.mark_dirty(3 * MIB, 4096).unwrap();
        s.prepare_write(3 * MIB, 4096).unwrap();
        s.clear_dirty(3 * MIB, 4096).unwrap();
        s.close_clean().unwrap();
        let ins = inspect(&mut dev.reboot()).unwrap();
        assert_eq!(ins.recovered_bitmap().dirty_chunks(), 0);
        assert!(!ins.superblock.flags.has(DiskFlags::CRASHED_PRIMARY));
    }

    #[test]
    fn after_a_failed_flush_the_store_refuses_changes_until_reopened() {
        let dev = MemDevice::new(300 * MIB);
        let mut s = MetaStore::create(dev.clone(), &opts()).unwrap();
        dev.arm(Fault::FailFlush);
        assert!(matches!(
            s.prepare_write(0, 4096),
            Err(StoreError::Io { .. })
        ));
        assert!(matches!(s.prepare_write(0, 4096), Err(StoreError::Failed)));
        assert!(matches!(s.persist_bitmap(), Err(StoreError::Failed)));
    }

    #[test]
    fn external_metadata_lives_at_the_tail_of_its_own_device() {
        let dev = MemDevice::new(MIB);
        let o = CreateOptions {
            external_data_size: Some(10 << 30),
            ..opts()
        };
        let s = MetaStore::create(dev.clone(), &o).unwrap();
        assert_eq!(s.superblock().data_size, 10 << 30);
        assert_eq!(s.superblock().placement, Placement::External);
        let (s2, f) = MetaStore::open(dev.reboot()).unwrap();
        assert!(f.is_empty());
        assert_eq!(s2.bitmap().geometry().device_size(), 10 << 30);
        let tiny = MemDevice::new(16 * 1024);
        assert!(matches!(
            MetaStore::create(tiny, &o),
            Err(StoreError::DeviceTooSmall { .. })
        ));
    }

    #[test]
    fn a_blank_device_is_no_metadata_naming_both_slots() {
        let e = inspect(&mut MemDevice::new(MIB)).unwrap_err();
        assert!(e.to_string().contains("superblock slot A is blank"), "{e}");
        assert!(e.to_string().contains("superblock slot B is blank"), "{e}");
    }
}
