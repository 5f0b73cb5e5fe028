//! The on-disk metadata format (docs/FORMAT.md has the picture). Pure codecs: bytes in,
//! values or a [`FormatError`] naming the block and what is wrong out. All integers are
//! little-endian. Every block is 4 KiB and carries a CRC32 (crc32fast, IEEE) computed over
//! the whole block with its CRC field zeroed.
//!
//! The metadata *area* ends at the end of its device (rounded down to 4 KiB), so the
//! superblock is always found in the device's last 8 KiB whatever the geometry:
//!
//! ```text
//! area start                                                               device end
//! | bitmap pages (P x 4 KiB) | AL ring (R x 4 KiB) | superblock A | superblock B |
//! ```

use super::al::{AlGeometry, AlRecord, CONTEXT_PER_TXN, MAX_UPDATES};
use super::bitmap::{BitmapGeometry, Granularity};
use super::gen::{DiskFlags, GenIds};

/// Size of every metadata block.
pub const BLOCK: usize = 4096;
/// Superblock magic.
pub const SB_MAGIC: [u8; 8] = *b"TWVOLMD\0";
/// Format version written and accepted.
pub const FORMAT_VERSION: u32 = 1;
/// Bitmap page magic ("TVBM").
pub const BM_MAGIC: u32 = u32::from_le_bytes(*b"TVBM");
/// Activity-log block magic ("TVAL").
pub const AL_MAGIC: u32 = u32::from_le_bytes(*b"TVAL");
/// Bitmap bytes before the bit words in a page.
pub const BM_HEADER: usize = 32;
/// u64 words of bits in one bitmap page.
pub const BM_WORDS_PER_PAGE: usize = (BLOCK - BM_HEADER) / 8;
/// Bits (chunks) per bitmap page: 32512.
pub const BM_BITS_PER_PAGE: u64 = (BM_WORDS_PER_PAGE * 64) as u64;
/// Offset of the AL update array.
const AL_UPDATES_AT: usize = 48;
/// Offset of the AL context array.
const AL_CONTEXT_AT: usize = AL_UPDATES_AT + MAX_UPDATES * 8;

/// Where the metadata lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Placement {
    /// At the tail of the data device; the exported size shrinks to `data_size`.
    Internal,
    /// On a separate device or file.
    External,
}

/// A 4 KiB block of the area, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockId {
    /// Superblock slot 0 (A) or 1 (B).
    SuperblockSlot(u8),
    /// Bitmap page n.
    BitmapPage(u64),
    /// Activity-log ring block n.
    AlBlock(u32),
}

impl std::fmt::Display for BlockId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BlockId::SuperblockSlot(s) => {
                write!(f, "superblock slot {}", if *s == 0 { 'A' } else { 'B' })
            }
            BlockId::BitmapPage(n) => write!(f, "bitmap page {n}"),
            BlockId::AlBlock(n) => write!(f, "activity-log block {n}"),
        }
    }
}

/// A block that does not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// All zero: never written.
    #[error("{block} is blank (never written)")]
    Blank {
        /// Which block.
        block: BlockId,
    },
    /// Wrong magic.
    #[error("{block} has magic {found:#x}, not twinvol metadata (expected {expected:#x})")]
    BadMagic {
        /// Which block.
        block: BlockId,
        /// Expected magic.
        expected: u64,
        /// Found magic.
        found: u64,
    },
    /// Checksum mismatch: a torn or corrupted write.
    #[error("{block} is corrupted: stored CRC32 {stored:#010x}, contents give {computed:#010x} (torn write or media error)")]
    Crc {
        /// Which block.
        block: BlockId,
        /// CRC in the block.
        stored: u32,
        /// CRC of the contents.
        computed: u32,
    },
    /// Unknown format version.
    #[error("{block} has format version {found}; this twinvol reads version {FORMAT_VERSION} (upgrade twinvol)")]
    Version {
        /// Which block.
        block: BlockId,
        /// Found version.
        found: u32,
    },
    /// A field with an impossible value.
    #[error("{block}: field {field} = {value} is invalid ({why})")]
    Field {
        /// Which block.
        block: BlockId,
        /// Field name.
        field: &'static str,
        /// Its value.
        value: u64,
        /// Why it is wrong.
        why: &'static str,
    },
    /// A block of another volume (left over from an earlier create-md).
    #[error("{block} belongs to another volume (uuid {found}, expected {expected})")]
    WrongVolume {
        /// Which block.
        block: BlockId,
        /// Expected volume uuid.
        expected: String,
        /// Found volume uuid.
        found: String,
    },
}

/// Formats a 16-byte volume uuid as 8-4-4-4-12 hex.
pub fn uuid_string(u: &[u8; 16]) -> String {
    let h: String = u.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Sizes of the parts of a metadata area, derived from the geometry.
///
/// Invariant: `area_size == (bitmap_pages + al_blocks + 2) * BLOCK`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct AreaLayout {
    /// Bitmap pages.
    pub bitmap_pages: u64,
    /// Activity-log ring blocks.
    pub al_blocks: u32,
    /// Total bytes.
    pub area_size: u64,
}

impl AreaLayout {
    /// Layout for a bitmap over `data_size` bytes and an activity log.
    pub fn new(bitmap: BitmapGeometry, al: AlGeometry) -> Self {
        let bitmap_pages = bitmap.chunks().div_ceil(BM_BITS_PER_PAGE);
        let al_blocks = al.ring_blocks();
        let area_size = (bitmap_pages + u64::from(al_blocks) + 2) * BLOCK as u64;
        Self {
            bitmap_pages,
            al_blocks,
            area_size,
        }
    }

    /// Offset of bitmap page `n` from the area start.
    pub fn bitmap_page_offset(&self, n: u64) -> u64 {
        n * BLOCK as u64
    }

    /// Offset of AL ring block `n` from the area start.
    pub fn al_block_offset(&self, n: u32) -> u64 {
        (self.bitmap_pages + u64::from(n)) * BLOCK as u64
    }

    /// Offset of superblock slot 0 or 1 from the area start.
    pub fn superblock_offset(&self, slot: u8) -> u64 {
        self.area_size - (2 - u64::from(slot.min(1))) * BLOCK as u64
    }
}

/// Offset of superblock slot 0 or 1 on a device of `device_len` bytes (the last 8 KiB).
pub fn superblock_offset_on_device(device_len: u64, slot: u8) -> Option<u64> {
    let end = device_len / BLOCK as u64 * BLOCK as u64;
    end.checked_sub((2 - u64::from(slot.min(1))) * BLOCK as u64)
}

/// Where internal metadata goes on a data device of `device_len` bytes: returns the layout,
/// the exported data size and the area start, or `None` when the device is too small.
/// Invariant of the result: `data_size <= area_start`, `area_start + area_size` is the device
/// length rounded down to 4 KiB, and `data_size` is a multiple of 4 KiB.
pub fn internal_placement(
    device_len: u64,
    granularity: Granularity,
    al: AlGeometry,
) -> Option<(AreaLayout, u64, u64)> {
    let end = device_len / BLOCK as u64 * BLOCK as u64;
    let upper = AreaLayout::new(BitmapGeometry::new(end.max(1), granularity).ok()?, al);
    let data_size = end.checked_sub(upper.area_size)?;
    if data_size == 0 {
        return None;
    }
    let layout = AreaLayout::new(BitmapGeometry::new(data_size, granularity).ok()?, al);
    Some((layout, data_size, end - layout.area_size))
}

/// The superblock: everything needed to interpret the rest of the area.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Superblock {
    /// Write sequence; the valid slot with the highest value is current. Written to slot
    /// `seq % 2`.
    pub seq: u64,
    /// Identity of the replicated volume (same on both nodes).
    #[serde(serialize_with = "ser_uuid")]
    pub volume_uuid: [u8; 16],
    /// This node's id.
    pub node_id: u32,
    /// The peer's id.
    pub peer_node_id: u32,
    /// Bytes of data the bitmap covers (the exported size).
    pub data_size: u64,
    /// Bitmap granularity.
    pub granularity: Granularity,
    /// Activity-log geometry.
    pub al: AlGeometry,
    /// Internal or external.
    pub placement: Placement,
    /// Bytes of the metadata area.
    pub area_size: u64,
    /// Generation identifiers.
    pub gen: GenIds,
    /// Disk-state flags.
    pub flags: DiskFlags,
}

fn ser_uuid<S: serde::Serializer>(u: &[u8; 16], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&uuid_string(u))
}

impl Superblock {
    /// Geometry of the bitmap this superblock describes.
    pub fn bitmap_geometry(&self) -> Result<BitmapGeometry, FormatError> {
        BitmapGeometry::new(self.data_size, self.granularity).map_err(|_| FormatError::Field {
            block: BlockId::SuperblockSlot((self.seq % 2) as u8),
            field: "data_size",
            value: self.data_size,
            why: "zero or too many chunks for the granularity",
        })
    }

    /// Layout of the area.
    pub fn layout(&self) -> Result<AreaLayout, FormatError> {
        Ok(AreaLayout::new(self.bitmap_geometry()?, self.al))
    }
}

fn crc_of(block: &[u8; BLOCK], crc_at: usize) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&block[..crc_at]);
    h.update(&[0; 4]);
    h.update(&block[crc_at + 4..]);
    h.finalize()
}

fn seal(block: &mut [u8; BLOCK], crc_at: usize) {
    let crc = crc_of(block, crc_at);
    block[crc_at..crc_at + 4].copy_from_slice(&crc.to_le_bytes());
}

fn u32_at(b: &[u8; BLOCK], at: usize) -> u32 {
    let mut a = [0; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8; BLOCK], at: usize) -> u64 {
    let mut a = [0; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn put32(b: &mut [u8; BLOCK], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put64(b: &mut [u8; BLOCK], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

fn uuid_at(b: &[u8; BLOCK], at: usize) -> [u8; 16] {
    let mut u = [0; 16];
    u.copy_from_slice(&b[at..at + 16]);
    u
}

/// Checks blank, magic (at 0, `magic_len` bytes) and CRC (at `crc_at`), in that order.
fn check_block(
    b: &[u8; BLOCK],
    block: BlockId,
    magic: u64,
    magic_len: usize,
    crc_at: usize,
) -> Result<(), FormatError> {
    if b.iter().all(|x| *x == 0) {
        return Err(FormatError::Blank { block });
    }
    let found = if magic_len == 8 {
        u64_at(b, 0)
    } else {
        u64::from(u32_at(b, 0))
    };
    if found != magic {
        return Err(FormatError::BadMagic {
            block,
            expected: magic,
            found,
        });
    }
    let stored = u32_at(b, crc_at);
    let computed = crc_of(b, crc_at);
    if stored != computed {
        return Err(FormatError::Crc {
            block,
            stored,
            computed,
        });
    }
    Ok(())
}

// Superblock field offsets (docs/FORMAT.md).
mod sb {
    pub const MAGIC: usize = 0;
    pub const VERSION: usize = 8;
    pub const CRC: usize = 12;
    pub const SEQ: usize = 16;
    pub const VOLUME_UUID: usize = 24;
    pub const NODE_ID: usize = 40;
    pub const PEER_NODE_ID: usize = 44;
    pub const DATA_SIZE: usize = 48;
    pub const GRANULARITY: usize = 56;
    pub const AL_EXTENT_SIZE: usize = 60;
    pub const AL_SLOTS: usize = 64;
    pub const PLACEMENT: usize = 68;
    pub const AREA_SIZE: usize = 72;
    pub const GEN_CURRENT: usize = 80;
    pub const GEN_BITMAP: usize = 88;
    pub const GEN_HISTORY0: usize = 96;
    pub const GEN_HISTORY1: usize = 104;
    pub const FLAGS: usize = 112;
}

/// Encodes a superblock into one 4 KiB block.
pub fn encode_superblock(s: &Superblock) -> [u8; BLOCK] {
    let mut b = [0u8; BLOCK];
    b[sb::MAGIC..sb::MAGIC + 8].copy_from_slice(&SB_MAGIC);
    put32(&mut b, sb::VERSION, FORMAT_VERSION);
    put64(&mut b, sb::SEQ, s.seq);
    b[sb::VOLUME_UUID..sb::VOLUME_UUID + 16].copy_from_slice(&s.volume_uuid);
    put32(&mut b, sb::NODE_ID, s.node_id);
    put32(&mut b, sb::PEER_NODE_ID, s.peer_node_id);
    put64(&mut b, sb::DATA_SIZE, s.data_size);
    put32(&mut b, sb::GRANULARITY, s.granularity.bytes());
    put32(&mut b, sb::AL_EXTENT_SIZE, s.al.extent_size());
    put32(&mut b, sb::AL_SLOTS, s.al.slots());
    put32(
        &mut b,
        sb::PLACEMENT,
        if s.placement == Placement::Internal {
            0
        } else {
            1
        },
    );
    put64(&mut b, sb::AREA_SIZE, s.area_size);
    put64(&mut b, sb::GEN_CURRENT, s.gen.current);
    put64(&mut b, sb::GEN_BITMAP, s.gen.bitmap);
    put64(&mut b, sb::GEN_HISTORY0, s.gen.history[0]);
    put64(&mut b, sb::GEN_HISTORY1, s.gen.history[1]);
    put32(&mut b, sb::FLAGS, s.flags.0);
    seal(&mut b, sb::CRC);
    b
}

/// Decodes superblock slot `slot` (0 = A, 1 = B), checking magic, CRC, version and that
/// every field is in range and consistent with the others.
pub fn decode_superblock(b: &[u8; BLOCK], slot: u8) -> Result<Superblock, FormatError> {
    let block = BlockId::SuperblockSlot(slot);
    check_block(b, block, u64::from_le_bytes(SB_MAGIC), 8, sb::CRC)?;
    let version = u32_at(b, sb::VERSION);
    if version != FORMAT_VERSION {
        return Err(FormatError::Version {
            block,
            found: version,
        });
    }
    let field = |field, value: u64, why| FormatError::Field {
        block,
        field,
        value,
        why,
    };
    let g = u32_at(b, sb::GRANULARITY);
    let granularity = Granularity::new(g).map_err(|_| {
        field(
            "granularity",
            g.into(),
            "must be a power of two 4096..=1048576",
        )
    })?;
    let (es, slots) = (u32_at(b, sb::AL_EXTENT_SIZE), u32_at(b, sb::AL_SLOTS));
    let al = AlGeometry::new(es.into(), slots.into()).map_err(|_| {
        field(
            "al_extent_size/al_slots",
            u64::from(es),
            "extent size 1 MiB..1 GiB, 1..=65536 slots",
        )
    })?;
    let placement = match u32_at(b, sb::PLACEMENT) {
        0 => Placement::Internal,
        1 => Placement::External,
        v => return Err(field("placement", v.into(), "0 internal or 1 external")),
    };
    let flags = u32_at(b, sb::FLAGS);
    if flags & !DiskFlags::ALL != 0 {
        return Err(field("flags", flags.into(), "unknown flag bits"));
    }
    let current = u64_at(b, sb::GEN_CURRENT);
    if current == 0 {
        return Err(field(
            "gen_current",
            0,
            "the current generation id is never 0",
        ));
    }
    let s = Superblock {
        seq: u64_at(b, sb::SEQ),
        volume_uuid: uuid_at(b, sb::VOLUME_UUID),
        node_id: u32_at(b, sb::NODE_ID),
        peer_node_id: u32_at(b, sb::PEER_NODE_ID),
        data_size: u64_at(b, sb::DATA_SIZE),
        granularity,
        al,
        placement,
        area_size: u64_at(b, sb::AREA_SIZE),
        gen: GenIds {
            current,
            bitmap: u64_at(b, sb::GEN_BITMAP),
            history: [u64_at(b, sb::GEN_HISTORY0), u64_at(b, sb::GEN_HISTORY1)],
        },
        flags: DiskFlags(flags),
    };
    if s.seq % 2 != u64::from(slot) {
        return Err(field(
            "seq",
            s.seq,
            "an even sequence belongs in slot A, an odd one in slot B",
        ));
    }
    let bg = BitmapGeometry::new(s.data_size, granularity).map_err(|_| {
        field(
            "data_size",
            s.data_size,
            "zero or too many chunks for the granularity",
        )
    })?;
    if s.data_size > u64::from(u32::MAX) * u64::from(al.extent_size()) {
        return Err(field(
            "data_size",
            s.data_size,
            "more extents than the activity log can name",
        ));
    }
    if AreaLayout::new(bg, al).area_size != s.area_size {
        return Err(field(
            "area_size",
            s.area_size,
            "does not match the size derived from data_size and geometry",
        ));
    }
    Ok(s)
}

// Bitmap page field offsets.
const BM_CRC: usize = 4;
const BM_INDEX: usize = 8;
const BM_UUID: usize = 16;

/// Encodes bitmap page `index` holding `words` (at most [`BM_WORDS_PER_PAGE`]; missing
/// words are zero).
pub fn encode_bitmap_page(volume_uuid: &[u8; 16], index: u64, words: &[u64]) -> [u8; BLOCK] {
    let mut b = [0u8; BLOCK];
    put32(&mut b, 0, BM_MAGIC);
    put32(&mut b, BM_INDEX, index as u32);
    b[BM_UUID..BM_UUID + 16].copy_from_slice(volume_uuid);
    for (i, w) in words.iter().take(BM_WORDS_PER_PAGE).enumerate() {
        put64(&mut b, BM_HEADER + i * 8, *w);
    }
    seal(&mut b, BM_CRC);
    b
}

/// Decodes bitmap page `index` of volume `volume_uuid` into its words.
pub fn decode_bitmap_page(
    b: &[u8; BLOCK],
    volume_uuid: &[u8; 16],
    index: u64,
) -> Result<Vec<u64>, FormatError> {
    let block = BlockId::BitmapPage(index);
    check_block(b, block, u64::from(BM_MAGIC), 4, BM_CRC)?;
    let found = uuid_at(b, BM_UUID);
    if &found != volume_uuid {
        return Err(FormatError::WrongVolume {
            block,
            expected: uuid_string(volume_uuid),
            found: uuid_string(&found),
        });
    }
    let stored_index = u32_at(b, BM_INDEX);
    if u64::from(stored_index) != index & u64::from(u32::MAX) {
        return Err(FormatError::Field {
            block,
            field: "page_index",
            value: stored_index.into(),
            why: "page written at another position",
        });
    }
    Ok((0..BM_WORDS_PER_PAGE)
        .map(|i| u64_at(b, BM_HEADER + i * 8))
        .collect())
}

// AL block field offsets.
const AL_CRC: usize = 4;
const AL_SEQ: usize = 8;
const AL_UUID: usize = 16;
const AL_N_UPDATES: usize = 32;
const AL_N_CONTEXT: usize = 34;
const AL_CONTEXT_START: usize = 36;
const AL_SLOTS: usize = 40;

/// Encodes an activity-log transaction (at most [`MAX_UPDATES`] updates and
/// [`CONTEXT_PER_TXN`] context entries are written; the invariants of [`AlRecord`] hold for
/// what `ActivityLog` produces).
pub fn encode_al_block(volume_uuid: &[u8; 16], slots: u32, r: &AlRecord) -> [u8; BLOCK] {
    let mut b = [0u8; BLOCK];
    put32(&mut b, 0, AL_MAGIC);
    put64(&mut b, AL_SEQ, r.seq);
    b[AL_UUID..AL_UUID + 16].copy_from_slice(volume_uuid);
    let nu = r.updates.len().min(MAX_UPDATES);
    let nc = r.context.len().min(CONTEXT_PER_TXN);
    b[AL_N_UPDATES..AL_N_UPDATES + 2].copy_from_slice(&(nu as u16).to_le_bytes());
    b[AL_N_CONTEXT..AL_N_CONTEXT + 2].copy_from_slice(&(nc as u16).to_le_bytes());
    put32(&mut b, AL_CONTEXT_START, r.context_start);
    put32(&mut b, AL_SLOTS, slots);
    for (i, (s, e)) in r.updates.iter().take(nu).enumerate() {
        put32(&mut b, AL_UPDATES_AT + i * 8, *s);
        put32(&mut b, AL_UPDATES_AT + i * 8 + 4, *e);
    }
    for (i, e) in r.context.iter().take(nc).enumerate() {
        put32(&mut b, AL_CONTEXT_AT + i * 4, *e);
    }
    seal(&mut b, AL_CRC);
    b
}

/// Decodes activity-log ring block `index` of a ring of `ring_blocks` blocks for a log of
/// `slots` slots, checking the block sits where its sequence number says.
pub fn decode_al_block(
    b: &[u8; BLOCK],
    volume_uuid: &[u8; 16],
    slots: u32,
    index: u32,
    ring_blocks: u32,
) -> Result<AlRecord, FormatError> {
    let block = BlockId::AlBlock(index);
    check_block(b, block, u64::from(AL_MAGIC), 4, AL_CRC)?;
    let found = uuid_at(b, AL_UUID);
    if &found != volume_uuid {
        return Err(FormatError::WrongVolume {
            block,
            expected: uuid_string(volume_uuid),
            found: uuid_string(&found),
        });
    }
    let field = |field, value: u64, why| FormatError::Field {
        block,
        field,
        value,
        why,
    };
    let seq = u64_at(b, AL_SEQ);
    if ring_blocks == 0 || seq % u64::from(ring_blocks) != u64::from(index) {
        return Err(field(
            "seq",
            seq,
            "transaction written at another ring position",
        ));
    }
    let stored_slots = u32_at(b, AL_SLOTS);
    if stored_slots != slots {
        return Err(field(
            "slots",
            stored_slots.into(),
            "differs from the superblock's activity-log size",
        ));
    }
    let nu = usize::from(u16::from_le_bytes([b[AL_N_UPDATES], b[AL_N_UPDATES + 1]]));
    let nc = usize::from(u16::from_le_bytes([b[AL_N_CONTEXT], b[AL_N_CONTEXT + 1]]));
    if nu > MAX_UPDATES {
        return Err(field("n_updates", nu as u64, "more than 64"));
    }
    if nc > CONTEXT_PER_TXN || nc > slots as usize {
        return Err(field(
            "n_context",
            nc as u64,
            "more than 884 or than the slot count",
        ));
    }
    let context_start = u32_at(b, AL_CONTEXT_START);
    if context_start >= slots {
        return Err(field(
            "context_start",
            context_start.into(),
            "beyond the last slot",
        ));
    }
    let mut updates = Vec::with_capacity(nu);
    for i in 0..nu {
        let s = u32_at(b, AL_UPDATES_AT + i * 8);
        if s >= slots {
            return Err(field("update slot", s.into(), "beyond the last slot"));
        }
        updates.push((s, u32_at(b, AL_UPDATES_AT + i * 8 + 4)));
    }
    let context = (0..nc).map(|i| u32_at(b, AL_CONTEXT_AT + i * 4)).collect();
    Ok(AlRecord {
        seq,
        updates,
        context_start,
        context,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample(seq: u64) -> Superblock {
        let bg = BitmapGeometry::new(1 << 30, Granularity::DEFAULT).unwrap();
        let al = AlGeometry::default();
        Superblock {
            seq,
            volume_uuid: [7; 16],
            node_id: 1,
            peer_node_id: 2,
            data_size: 1 << 30,
            granularity: Granularity::DEFAULT,
            al,
            placement: Placement::Internal,
            area_size: AreaLayout::new(bg, al).area_size,
            gen: GenIds {
                current: 0xA,
                bitmap: 0xB,
                history: [0xC, 0xD],
            },
            flags: DiskFlags(DiskFlags::CONSISTENT | DiskFlags::WAS_PRIMARY),
        }
    }

    #[test]
    fn superblock_round_trips_and_field_offsets_match_the_documentation() {
        let s = sample(6);
        let b = encode_superblock(&s);
        assert_eq!(&b[0..8], b"TWVOLMD\0");
        assert_eq!(u32_at(&b, 8), 1);
        assert_eq!(u64_at(&b, 16), 6);
        assert_eq!(u64_at(&b, 48), 1 << 30);
        assert_eq!(u32_at(&b, 56), 65536);
        assert_eq!(u64_at(&b, 80), 0xA);
        assert_eq!(decode_superblock(&b, 0).unwrap(), s);
    }

    #[test]
    fn a_flipped_bit_in_a_superblock_is_reported_as_a_crc_mismatch_of_that_slot() {
        let mut b = encode_superblock(&sample(7));
        b[100] ^= 1;
        let e = decode_superblock(&b, 1).unwrap_err();
        assert!(
            matches!(
                e,
                FormatError::Crc {
                    block: BlockId::SuperblockSlot(1),
                    ..
                }
            ),
            "{e}"
        );
        assert!(
            e.to_string()
                .starts_with("superblock slot B is corrupted: stored CRC32"),
            "{e}"
        );
    }

    #[test]
    fn a_superblock_in_the_wrong_slot_is_refused() {
        let b = encode_superblock(&sample(7));
        assert!(matches!(
            decode_superblock(&b, 0),
            Err(FormatError::Field { field: "seq", .. })
        ));
    }

    #[test]
    fn blank_and_foreign_blocks_are_named() {
        assert_eq!(
            decode_superblock(&[0; BLOCK], 0),
            Err(FormatError::Blank {
                block: BlockId::SuperblockSlot(0)
            })
        );
        let mut b = [0u8; BLOCK];
        b[0] = 0xEB; // a boot sector
        assert!(matches!(
            decode_superblock(&b, 0),
            Err(FormatError::BadMagic { .. })
        ));
    }

    #[test]
    fn bitmap_page_round_trips_and_rejects_other_volumes_and_positions() {
        let words: Vec<u64> = (0..BM_WORDS_PER_PAGE as u64)
            .map(|i| i * 0x0101_0101)
            .collect();
        let b = encode_bitmap_page(&[1; 16], 3, &words);
        assert_eq!(decode_bitmap_page(&b, &[1; 16], 3).unwrap(), words);
        assert!(matches!(
            decode_bitmap_page(&b, &[2; 16], 3),
            Err(FormatError::WrongVolume { .. })
        ));
        assert!(matches!(
            decode_bitmap_page(&b, &[1; 16], 4),
            Err(FormatError::Field {
                field: "page_index",
                ..
            })
        ));
        let mut torn = b;
        torn[2000..].fill(0);
        assert!(matches!(
            decode_bitmap_page(&torn, &[1; 16], 3),
            Err(FormatError::Crc {
                block: BlockId::BitmapPage(3),
                ..
            })
        ));
    }

    #[test]
    fn internal_placement_puts_the_area_at_the_tail_and_shrinks_the_export() {
        let dev = 10u64 << 30;
        let (layout, data, start) =
            internal_placement(dev, Granularity::DEFAULT, AlGeometry::default()).unwrap();
        assert_eq!(start + layout.area_size, dev);
        assert!(data <= start && data % 4096 == 0);
        // 10 GiB at 64 KiB: 163840 bits = 6 pages; AL ring 4 blocks; 2 superblocks.
        assert_eq!(layout.area_size, (6 + 4 + 2) * 4096);
        assert_eq!(
            superblock_offset_on_device(dev, 0),
            Some(start + layout.superblock_offset(0))
        );
        assert!(
            internal_placement(24 * 1024, Granularity::DEFAULT, AlGeometry::default()).is_none()
        );
    }

    proptest! {
        #[test]
        fn superblock_round_trips_any_valid_values(
            seq in any::<u64>(), uuid in any::<[u8; 16]>(), node in any::<u32>(), peer in any::<u32>(),
            data_size in 1u64..(1 << 44), gshift in 12u32..=20, eshift in 20u32..=30, slots in 1u64..=65536,
            external in any::<bool>(), current in 1u64.., bitmap in any::<u64>(), h in any::<[u64; 2]>(),
            flags in 0u32..=DiskFlags::ALL,
        ) {
            let granularity = Granularity::new(1 << gshift).unwrap();
            let al = AlGeometry::new(1 << eshift, slots).unwrap();
            let bg = BitmapGeometry::new(data_size, granularity).unwrap();
            let s = Superblock {
                seq, volume_uuid: uuid, node_id: node, peer_node_id: peer, data_size, granularity, al,
                placement: if external { Placement::External } else { Placement::Internal },
                area_size: AreaLayout::new(bg, al).area_size,
                gen: GenIds { current, bitmap, history: h }, flags: DiskFlags(flags),
            };
            prop_assert_eq!(decode_superblock(&encode_superblock(&s), (seq % 2) as u8).unwrap(), s);
        }

        #[test]
        fn al_block_round_trips(seq in 0u64..1000, updates in proptest::collection::vec((0u32..1024, any::<u32>()), 0..=64),
                                start in 0u32..1024, context in proptest::collection::vec(any::<u32>(), 0..=884)) {
            let ring = 4;
            let r = AlRecord { seq, updates, context_start: start, context };
            let b = encode_al_block(&[9; 16], 1024, &r);
            prop_assert_eq!(decode_al_block(&b, &[9; 16], 1024, (seq % ring) as u32, ring as u32).unwrap(), r);
        }

        #[test]
        fn decoders_never_panic_on_arbitrary_blocks(bytes in proptest::collection::vec(any::<u8>(), BLOCK), seal_it in any::<bool>()) {
            let mut b = [0u8; BLOCK];
            b.copy_from_slice(&bytes);
            for (magic, crc_at) in [(None, sb::CRC), (Some(BM_MAGIC), BM_CRC), (Some(AL_MAGIC), AL_CRC)] {
                let mut x = b;
                match magic { None => x[..8].copy_from_slice(&SB_MAGIC), Some(m) => put32(&mut x, 0, m) }
                if seal_it { seal(&mut x, crc_at); }
                let _ = decode_superblock(&x, 0);
                let _ = decode_bitmap_page(&x, &[0; 16], 0);
                let _ = decode_al_block(&x, &[0; 16], 1024, 0, 4);
            }
        }
    }
}
