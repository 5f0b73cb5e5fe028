//! [`DirtyBitmap`]: the in-memory dirty bitmap of one volume, one bit per chunk of
//! `granularity` bytes, and its run-length encoding for the replication wire.
//!
//! Invariant (the one that keeps a mirror safe): a bit may be set when its chunk is clean
//! (a wasted resync of that chunk), but never clear when its chunk may differ. Hence
//! [`DirtyBitmap::set`] rounds *outward* (any chunk a range touches becomes dirty) and
//! [`DirtyBitmap::clear`] rounds *inward* (only chunks the range covers completely are
//! cleared; the last chunk counts as covered when the range reaches the end of the device).

use std::ops::Range;

/// Smallest bitmap granularity: one bit per 4 KiB (DRBD's classic value).
pub const MIN_GRANULARITY: u32 = 4096;
/// Largest bitmap granularity: one bit per 1 MiB.
pub const MAX_GRANULARITY: u32 = 1 << 20;
/// Default bitmap granularity: one bit per 64 KiB (a 1 TiB volume needs 2 MiB of bitmap).
pub const DEFAULT_GRANULARITY: u32 = 64 * 1024;
/// Most chunks a bitmap may have (2^32: 16 TiB at 4 KiB, 4 PiB at 1 MiB; 512 MiB of RAM).
pub const MAX_CHUNKS: u64 = 1 << 32;

/// Bytes of device covered by one bit.
///
/// Invariant: a power of two in [`MIN_GRANULARITY`]..=[`MAX_GRANULARITY`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub struct Granularity(u32);

impl Granularity {
    /// The default, 64 KiB.
    pub const DEFAULT: Granularity = Granularity(DEFAULT_GRANULARITY);

    /// Checks `bytes` is a power of two between 4 KiB and 1 MiB.
    pub fn new(bytes: u32) -> Result<Self, BitmapError> {
        if bytes.is_power_of_two() && (MIN_GRANULARITY..=MAX_GRANULARITY).contains(&bytes) {
            Ok(Granularity(bytes))
        } else {
            Err(BitmapError::BadGranularity(u64::from(bytes)))
        }
    }

    /// Bytes per bit.
    pub fn bytes(self) -> u32 {
        self.0
    }

    /// log2 of [`Self::bytes`].
    pub fn shift(self) -> u32 {
        self.0.trailing_zeros()
    }
}

impl Default for Granularity {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// What a bitmap covers: a device size and a granularity.
///
/// Invariant: `device_size > 0` and `chunks() <= MAX_CHUNKS`. The last chunk may be partial.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct BitmapGeometry {
    device_size: u64,
    granularity: Granularity,
}

impl BitmapGeometry {
    /// Checks the device is non-empty and not too large for the granularity.
    pub fn new(device_size: u64, granularity: Granularity) -> Result<Self, BitmapError> {
        if device_size == 0 {
            return Err(BitmapError::EmptyDevice);
        }
        let chunks = device_size.div_ceil(u64::from(granularity.bytes()));
        if chunks > MAX_CHUNKS {
            return Err(BitmapError::TooManyChunks {
                device_size,
                granularity: granularity.bytes(),
                chunks,
            });
        }
        Ok(Self {
            device_size,
            granularity,
        })
    }

    /// Bytes covered.
    pub fn device_size(&self) -> u64 {
        self.device_size
    }

    /// Bytes per bit.
    pub fn granularity(&self) -> Granularity {
        self.granularity
    }

    /// Number of bits.
    pub fn chunks(&self) -> u64 {
        self.device_size
            .div_ceil(u64::from(self.granularity.bytes()))
    }

    /// Byte range of chunk `i` (clamped to the device size).
    pub fn chunk_range(&self, i: u64) -> Range<u64> {
        let shift = self.granularity.shift();
        (i << shift)..((i + 1) << shift).min(self.device_size)
    }
}

/// Errors of bitmap operations and of the run-length decoder.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BitmapError {
    /// Granularity outside the allowed set.
    #[error("bitmap granularity {0} bytes is invalid: use a power of two from 4 KiB to 1 MiB (e.g. 65536)")]
    BadGranularity(u64),
    /// A zero-sized device.
    #[error("the device size is 0 bytes; a dirty bitmap needs a non-empty device")]
    EmptyDevice,
    /// Too many bits.
    #[error("a {device_size}-byte device at {granularity}-byte granularity needs {chunks} bits, more than 2^32; use a larger granularity")]
    TooManyChunks {
        /// Device size.
        device_size: u64,
        /// Granularity in bytes.
        granularity: u32,
        /// Bits needed.
        chunks: u64,
    },
    /// A byte range that does not fit in the device.
    #[error("byte range {offset}+{len} is outside the {device_size}-byte device")]
    OutOfRange {
        /// Start.
        offset: u64,
        /// Length.
        len: u64,
        /// Device size.
        device_size: u64,
    },
    /// Two bitmaps of different geometry.
    #[error("bitmaps differ in geometry (ours {ours:?}, theirs {theirs:?}); both nodes must use the same data size and granularity")]
    GeometryMismatch {
        /// This bitmap.
        ours: BitmapGeometry,
        /// The other.
        theirs: BitmapGeometry,
    },
    /// Malformed run-length encoding.
    #[error("malformed run-length bitmap at byte {at}: {what}")]
    Malformed {
        /// Byte offset in the input.
        at: usize,
        /// What is wrong.
        what: &'static str,
    },
    /// The encoding describes another geometry than the receiver's.
    #[error("run-length bitmap is for a {found_size}-byte device at {found_granularity}-byte granularity, expected {expected:?}")]
    WireGeometry {
        /// Receiver's geometry.
        expected: BitmapGeometry,
        /// Device size in the encoding.
        found_size: u64,
        /// Granularity in the encoding.
        found_granularity: u64,
    },
}

/// One bit per chunk; a set bit means the chunk may differ from the peer.
///
/// Invariants: `words.len() == chunks.div_ceil(64)`; bits at or beyond `chunks` are zero;
/// `dirty == popcount(words)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    geometry: BitmapGeometry,
    words: Vec<u64>,
    dirty: u64,
}

impl DirtyBitmap {
    /// An all-clean bitmap.
    pub fn new(geometry: BitmapGeometry) -> Self {
        let words = vec![0u64; words_for(geometry.chunks())];
        Self {
            geometry,
            words,
            dirty: 0,
        }
    }

    /// What the bitmap covers.
    pub fn geometry(&self) -> BitmapGeometry {
        self.geometry
    }

    /// The bit words, bit `i % 64` of word `i / 64` for chunk `i`.
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// Replaces words `start..start + src.len()` (used when loading bitmap pages); bits past
    /// the last chunk are dropped so the invariants hold whatever `src` contains.
    pub fn load_words(&mut self, start: usize, src: &[u64]) {
        let end = (start + src.len()).min(self.words.len());
        if start >= end {
            return;
        }
        let before: u64 = self.words[start..end]
            .iter()
            .map(|w| u64::from(w.count_ones()))
            .sum();
        self.words[start..end].copy_from_slice(&src[..end - start]);
        if end == self.words.len() {
            self.mask_tail();
        }
        let after: u64 = self.words[start..end]
            .iter()
            .map(|w| u64::from(w.count_ones()))
            .sum();
        self.dirty = self.dirty - before + after;
    }

    fn mask_tail(&mut self) {
        let chunks = self.geometry.chunks();
        let rem = chunks % 64;
        if rem != 0 {
            if let Some(last) = self.words.last_mut() {
                *last &= (1u64 << rem) - 1;
            }
        }
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), BitmapError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.geometry.device_size => Ok(()),
            _ => Err(BitmapError::OutOfRange {
                offset,
                len,
                device_size: self.geometry.device_size,
            }),
        }
    }

    /// Chunks touched by a byte range (outward rounding). Empty for `len == 0`.
    pub fn touched_chunks(&self, offset: u64, len: u64) -> Range<u64> {
        if len == 0 {
            return 0..0;
        }
        let shift = self.geometry.granularity.shift();
        (offset >> shift)..((offset + len - 1) >> shift) + 1
    }

    /// Chunks fully covered by a byte range (inward rounding); the partial last chunk of the
    /// device counts as covered when the range reaches the device end.
    pub fn covered_chunks(&self, offset: u64, len: u64) -> Range<u64> {
        let g = u64::from(self.geometry.granularity.bytes());
        let shift = self.geometry.granularity.shift();
        let first = offset.div_ceil(g);
        let end = offset + len;
        let last = if end == self.geometry.device_size {
            self.geometry.chunks()
        } else {
            end >> shift
        };
        if last <= first {
            first..first
        } else {
            first..last
        }
    }

    /// Marks every chunk the range touches dirty; returns how many were clean before.
    pub fn set(&mut self, offset: u64, len: u64) -> Result<u64, BitmapError> {
        self.check(offset, len)?;
        let r = self.touched_chunks(offset, len);
        Ok(self.set_chunks(r))
    }

    /// Marks chunks dirty; returns how many were clean before. `r` must be within the bitmap.
    pub fn set_chunks(&mut self, r: Range<u64>) -> u64 {
        let added = self.update_chunks(r, true);
        self.dirty += added;
        added
    }

    /// Clears only the chunks the range covers completely; returns how many were dirty.
    pub fn clear(&mut self, offset: u64, len: u64) -> Result<u64, BitmapError> {
        self.check(offset, len)?;
        let r = self.covered_chunks(offset, len);
        let removed = self.update_chunks(r, false);
        self.dirty -= removed;
        Ok(removed)
    }

    /// Sets (or clears) bits of `r`, returning how many changed.
    fn update_chunks(&mut self, r: Range<u64>, set: bool) -> u64 {
        let end = r.end.min(self.geometry.chunks());
        let mut i = r.start;
        let mut changed = 0u64;
        while i < end {
            let w = (i / 64) as usize;
            let bit = i % 64;
            let n = (64 - bit).min(end - i);
            let mask = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << bit
            };
            let old = self.words[w];
            let new = if set { old | mask } else { old & !mask };
            changed += u64::from((old ^ new).count_ones());
            self.words[w] = new;
            i += n;
        }
        changed
    }

    /// True when any chunk the range touches is dirty.
    pub fn is_dirty(&self, offset: u64, len: u64) -> Result<bool, BitmapError> {
        self.check(offset, len)?;
        let r = self.touched_chunks(offset, len);
        Ok(r.clone().any(|i| self.test_chunk(i)))
    }

    /// Whether chunk `i` is dirty (false beyond the end).
    pub fn test_chunk(&self, i: u64) -> bool {
        self.words
            .get((i / 64) as usize)
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    /// Number of dirty chunks.
    pub fn dirty_chunks(&self) -> u64 {
        self.dirty
    }

    /// Bytes in dirty chunks (the partial last chunk counts only its real bytes).
    pub fn dirty_bytes(&self) -> u64 {
        self.dirty_chunk_runs()
            .map(|r| self.byte_range(r))
            .map(|r| r.end - r.start)
            .sum()
    }

    /// Marks everything dirty (the safe state when the on-disk bitmap is unreadable).
    pub fn set_all(&mut self) {
        let chunks = self.geometry.chunks();
        self.set_chunks(0..chunks);
    }

    /// Clears everything.
    pub fn clear_all(&mut self) {
        self.words.iter_mut().for_each(|w| *w = 0);
        self.dirty = 0;
    }

    /// ORs `other` into `self` (a failover: both sides' changes must be resynced).
    pub fn merge(&mut self, other: &DirtyBitmap) -> Result<(), BitmapError> {
        if self.geometry != other.geometry {
            return Err(BitmapError::GeometryMismatch {
                ours: self.geometry,
                theirs: other.geometry,
            });
        }
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= *b;
        }
        self.dirty = self.words.iter().map(|w| u64::from(w.count_ones())).sum();
        Ok(())
    }

    /// Maximal runs of dirty chunks, in chunk numbers, ascending.
    pub fn dirty_chunk_runs(&self) -> ChunkRuns<'_> {
        ChunkRuns {
            bitmap: self,
            next: 0,
        }
    }

    /// Maximal dirty byte ranges, ascending, clamped to the device size.
    pub fn dirty_runs(&self) -> impl Iterator<Item = Range<u64>> + '_ {
        self.dirty_chunk_runs().map(|r| self.byte_range(r))
    }

    fn byte_range(&self, r: Range<u64>) -> Range<u64> {
        let shift = self.geometry.granularity.shift();
        (r.start << shift)..(r.end << shift).min(self.geometry.device_size)
    }

    /// First chunk `>= from` whose bit equals `value`, or `chunks()`.
    fn find(&self, from: u64, value: bool) -> u64 {
        let chunks = self.geometry.chunks();
        let mut i = from;
        while i < chunks {
            let w = (i / 64) as usize;
            let word = if value { self.words[w] } else { !self.words[w] };
            let masked = word & (u64::MAX << (i % 64));
            if masked != 0 {
                return ((w as u64) * 64 + u64::from(masked.trailing_zeros())).min(chunks);
            }
            i = (w as u64 + 1) * 64;
        }
        chunks
    }

    /// Run-length encoding for the wire (see docs/FORMAT.md, "Bitmap on the wire"):
    /// `version u8 = 1`, `granularity shift u8`, `device size varint`, `run count varint`,
    /// then the run lengths in chunks as varints, alternating clean, dirty, clean... starting
    /// with a clean run that may be 0. Runs sum to `chunks()`.
    pub fn encode_rle(&self) -> Vec<u8> {
        let mut runs = Vec::new();
        let chunks = self.geometry.chunks();
        let mut pos = 0;
        let mut value = false;
        while pos < chunks {
            let next = self.find(pos, !value);
            runs.push(next - pos);
            pos = next;
            value = !value;
        }
        if runs.is_empty() {
            runs.push(0);
        }
        let mut out = Vec::with_capacity(12 + runs.len() * 2);
        out.push(RLE_VERSION);
        out.push(self.geometry.granularity.shift() as u8);
        put_varint(&mut out, self.geometry.device_size);
        put_varint(&mut out, runs.len() as u64);
        for r in runs {
            put_varint(&mut out, r);
        }
        out
    }

    /// Decodes [`Self::encode_rle`] output for a receiver whose geometry is `expected`.
    /// Never panics and never allocates more than the expected bitmap: malformed input gives
    /// [`BitmapError::Malformed`] naming the byte offset.
    pub fn decode_rle(bytes: &[u8], expected: BitmapGeometry) -> Result<Self, BitmapError> {
        let mut at = 0usize;
        let version = *bytes.first().ok_or(BitmapError::Malformed {
            at: 0,
            what: "empty input",
        })?;
        if version != RLE_VERSION {
            return Err(BitmapError::Malformed {
                at: 0,
                what: "unknown version (expected 1)",
            });
        }
        at += 1;
        let shift = *bytes.get(at).ok_or(BitmapError::Malformed {
            at,
            what: "truncated before granularity",
        })?;
        at += 1;
        let size = get_varint(bytes, &mut at)?;
        let found_granularity = if shift < 64 { 1u64 << shift } else { 0 };
        if size != expected.device_size
            || found_granularity != u64::from(expected.granularity.bytes())
        {
            return Err(BitmapError::WireGeometry {
                expected,
                found_size: size,
                found_granularity,
            });
        }
        let count_at = at;
        let count = get_varint(bytes, &mut at)?;
        let chunks = expected.chunks();
        // Every run but the first is at least 1 chunk and every varint at least 1 byte.
        if count == 0 || count > chunks + 1 || count > (bytes.len() - at) as u64 {
            return Err(BitmapError::Malformed {
                at: count_at,
                what: "run count impossible for this input",
            });
        }
        let mut bm = DirtyBitmap::new(expected);
        let mut pos = 0u64;
        for i in 0..count {
            let run_at = at;
            let run = get_varint(bytes, &mut at)?;
            if run == 0 && i != 0 {
                return Err(BitmapError::Malformed {
                    at: run_at,
                    what: "zero-length run after the first",
                });
            }
            let end =
                pos.checked_add(run)
                    .filter(|e| *e <= chunks)
                    .ok_or(BitmapError::Malformed {
                        at: run_at,
                        what: "runs extend past the last chunk",
                    })?;
            if i % 2 == 1 {
                bm.set_chunks(pos..end);
            }
            pos = end;
        }
        if pos != chunks {
            return Err(BitmapError::Malformed {
                at,
                what: "runs end before the last chunk",
            });
        }
        if at != bytes.len() {
            return Err(BitmapError::Malformed {
                at,
                what: "trailing bytes after the last run",
            });
        }
        Ok(bm)
    }
}

/// Iterator over maximal dirty chunk runs.
pub struct ChunkRuns<'a> {
    bitmap: &'a DirtyBitmap,
    next: u64,
}

impl Iterator for ChunkRuns<'_> {
    type Item = Range<u64>;
    fn next(&mut self) -> Option<Range<u64>> {
        let start = self.bitmap.find(self.next, true);
        if start >= self.bitmap.geometry.chunks() {
            self.next = start;
            return None;
        }
        let end = self.bitmap.find(start, false);
        self.next = end;
        Some(start..end)
    }
}

const RLE_VERSION: u8 = 1;

fn words_for(chunks: u64) -> usize {
    chunks.div_ceil(64) as usize
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_varint(bytes: &[u8], at: &mut usize) -> Result<u64, BitmapError> {
    let start = *at;
    let mut v = 0u64;
    for i in 0..10 {
        let b = *bytes.get(*at).ok_or(BitmapError::Malformed {
            at: *at,
            what: "truncated varint",
        })?;
        *at += 1;
        if i == 9 && b > 1 {
            return Err(BitmapError::Malformed {
                at: start,
                what: "varint overflows 64 bits",
            });
        }
        v |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            if b == 0 && i > 0 {
                return Err(BitmapError::Malformed {
                    at: start,
                    what: "non-minimal varint",
                });
            }
            return Ok(v);
        }
    }
    Err(BitmapError::Malformed {
        at: start,
        what: "varint longer than 10 bytes",
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The model: one bool per chunk, with the documented rounding rules.
    struct Model {
        bits: Vec<bool>,
        g: u64,
        size: u64,
    }

    impl Model {
        fn set(&mut self, off: u64, len: u64) {
            for (i, b) in self.bits.iter_mut().enumerate() {
                let (s, e) = (i as u64 * self.g, ((i as u64 + 1) * self.g).min(self.size));
                if len > 0 && s < off + len && off < e {
                    *b = true;
                }
            }
        }
        fn clear(&mut self, off: u64, len: u64) {
            for (i, b) in self.bits.iter_mut().enumerate() {
                let (s, e) = (i as u64 * self.g, ((i as u64 + 1) * self.g).min(self.size));
                if off <= s && e <= off + len {
                    *b = false;
                }
            }
        }
        fn runs(&self) -> Vec<Range<u64>> {
            let mut out: Vec<Range<u64>> = Vec::new();
            for (i, b) in self.bits.iter().enumerate() {
                if *b {
                    let r = (i as u64 * self.g)..((i as u64 + 1) * self.g).min(self.size);
                    match out.last_mut() {
                        Some(last) if last.end == r.start => last.end = r.end,
                        _ => out.push(r),
                    }
                }
            }
            out
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Set(u64, u64),
        Clear(u64, u64),
    }

    fn geometry(size: u64, gshift: u32) -> BitmapGeometry {
        BitmapGeometry::new(size, Granularity::new(1 << gshift).unwrap()).unwrap()
    }

    fn ops(size: u64) -> impl Strategy<Value = Vec<Op>> {
        let range = (0..size).prop_flat_map(move |o| (Just(o), 0..=(size - o)));
        proptest::collection::vec(
            prop_oneof![
                range.clone().prop_map(|(o, l)| Op::Set(o, l)),
                range.prop_map(|(o, l)| Op::Clear(o, l))
            ],
            0..40,
        )
    }

    proptest! {
        #[test]
        fn bitmap_matches_vec_bool_model(gshift in 12u32..=14, size in 1u64..(300 * 4096), seed_ops in ops(300 * 4096)) {
            let g = geometry(size, gshift);
            let mut bm = DirtyBitmap::new(g);
            let mut model = Model { bits: vec![false; g.chunks() as usize], g: 1 << gshift, size };
            for op in seed_ops {
                match op {
                    Op::Set(o, l) if o + l <= size => { bm.set(o, l).unwrap(); model.set(o, l); }
                    Op::Clear(o, l) if o + l <= size => { bm.clear(o, l).unwrap(); model.clear(o, l); }
                    Op::Set(o, l) | Op::Clear(o, l) => {
                        let refused = matches!(bm.set(o, l), Err(BitmapError::OutOfRange { .. }));
                        prop_assert!(refused, "out of range accepted");
                    }
                }
            }
            let runs: Vec<_> = bm.dirty_runs().collect();
            prop_assert_eq!(&runs, &model.runs());
            prop_assert_eq!(bm.dirty_chunks(), model.bits.iter().filter(|b| **b).count() as u64);
            prop_assert_eq!(bm.dirty_bytes(), model.runs().iter().map(|r| r.end - r.start).sum::<u64>());
            for (i, b) in model.bits.iter().enumerate() {
                prop_assert_eq!(bm.test_chunk(i as u64), *b);
            }
            let decoded = DirtyBitmap::decode_rle(&bm.encode_rle(), g).unwrap();
            prop_assert_eq!(decoded, bm);
        }

        #[test]
        fn set_range_is_dirty_and_clear_never_clears_a_partially_covered_chunk(off in 0u64..100_000, len in 1u64..100_000) {
            let g = geometry(300_000, 12);
            let mut bm = DirtyBitmap::new(g);
            bm.set_all();
            bm.clear(off, len).unwrap();
            // A byte inside a chunk that is not fully covered stays dirty.
            if off % 4096 != 0 { prop_assert!(bm.is_dirty(off, 1).unwrap()); }
            if (off + len) % 4096 != 0 { prop_assert!(bm.is_dirty(off + len - 1, 1).unwrap()); }
            let mut bm = DirtyBitmap::new(g);
            bm.set(off, len).unwrap();
            prop_assert!(bm.is_dirty(off, 1).unwrap() && bm.is_dirty(off + len - 1, 1).unwrap());
        }

        #[test]
        fn merge_is_bitwise_or(a in ops(64 * 4096), b in ops(64 * 4096)) {
            let g = geometry(64 * 4096, 12);
            let (mut x, mut y) = (DirtyBitmap::new(g), DirtyBitmap::new(g));
            for op in a { if let Op::Set(o, l) = op { x.set(o, l).unwrap(); } }
            for op in b { if let Op::Set(o, l) = op { y.set(o, l).unwrap(); } }
            let mut m = x.clone();
            m.merge(&y).unwrap();
            for i in 0..g.chunks() {
                prop_assert_eq!(m.test_chunk(i), x.test_chunk(i) || y.test_chunk(i));
            }
        }

        #[test]
        fn rle_decoder_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = DirtyBitmap::decode_rle(&bytes, geometry(1 << 20, 12));
        }

        #[test]
        fn rle_round_trips_random_bitmaps(words in proptest::collection::vec(any::<u64>(), 1..20), size_pad in 0u64..4096) {
            let size = (words.len() as u64 * 64 - 1) * 4096 + 1 + size_pad;
            let g = geometry(size, 12);
            let mut bm = DirtyBitmap::new(g);
            bm.load_words(0, &words);
            prop_assert_eq!(DirtyBitmap::decode_rle(&bm.encode_rle(), g).unwrap(), bm);
        }
    }

    #[test]
    fn granularity_outside_4k_to_1m_or_not_power_of_two_is_refused() {
        for bad in [0, 2048, 3 * 4096, 2 << 20] {
            assert_eq!(
                Granularity::new(bad),
                Err(BitmapError::BadGranularity(u64::from(bad)))
            );
        }
        assert_eq!(Granularity::new(65536).unwrap().shift(), 16);
        assert_eq!(Granularity::default().bytes(), 64 * 1024);
    }

    #[test]
    fn clear_to_device_end_clears_the_partial_last_chunk() {
        let g = geometry(3 * 4096 + 100, 12);
        let mut bm = DirtyBitmap::new(g);
        bm.set_all();
        assert_eq!(bm.dirty_chunks(), 4);
        assert_eq!(bm.dirty_bytes(), 3 * 4096 + 100);
        assert_eq!(bm.clear(3 * 4096, 100).unwrap(), 1);
        assert_eq!(bm.dirty_runs().collect::<Vec<_>>(), vec![0..3 * 4096]);
    }

    #[test]
    fn merge_of_different_geometry_is_refused() {
        let mut a = DirtyBitmap::new(geometry(1 << 20, 12));
        let b = DirtyBitmap::new(geometry(1 << 20, 13));
        assert!(matches!(
            a.merge(&b),
            Err(BitmapError::GeometryMismatch { .. })
        ));
    }

    #[test]
    fn malformed_rle_inputs_name_what_is_wrong() {
        let g = geometry(10 * 4096, 12);
        let mut bm = DirtyBitmap::new(g);
        bm.set(4096, 4096).unwrap();
        let good = bm.encode_rle();
        assert_eq!(good, vec![1, 12, 0x80, 0xC0, 0x02, 3, 1, 1, 8]);
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![], "empty input"),
            (vec![2], "unknown version (expected 1)"),
            (good[..4].to_vec(), "truncated varint"),
            (
                good[..good.len() - 1].to_vec(),
                "run count impossible for this input",
            ),
            (
                [&good[..], &[0]].concat(),
                "trailing bytes after the last run",
            ),
            (
                vec![1, 12, 0x80, 0xC0, 0x02, 3, 1, 1, 9],
                "runs extend past the last chunk",
            ),
            (
                vec![1, 12, 0x80, 0xC0, 0x02, 3, 1, 1, 7],
                "runs end before the last chunk",
            ),
            (
                vec![1, 12, 0x80, 0xC0, 0x02, 3, 1, 0, 9],
                "zero-length run after the first",
            ),
            (
                vec![1, 12, 0x80, 0xC0, 0x02, 200, 1],
                "run count impossible for this input",
            ),
            (
                vec![1, 12, 0x80, 0xC0, 0x02, 3, 0x81, 0, 1, 8],
                "non-minimal varint",
            ),
        ];
        for (input, what) in cases {
            match DirtyBitmap::decode_rle(&input, g) {
                Err(BitmapError::Malformed { what: w, .. }) => {
                    assert_eq!(w, what, "input {input:?}")
                }
                other => panic!("input {input:?}: expected Malformed({what}), got {other:?}"),
            }
        }
        let other_size = DirtyBitmap::new(geometry(11 * 4096, 12)).encode_rle();
        assert!(matches!(
            DirtyBitmap::decode_rle(&other_size, g),
            Err(BitmapError::WireGeometry { .. })
        ));
    }

    #[test]
    fn clean_bitmap_encodes_in_a_few_bytes() {
        let g = geometry(1 << 40, 16);
        let bm = DirtyBitmap::new(g);
        let enc = bm.encode_rle();
        // version, shift, size (6-byte varint), count 1, one run of 2^24 chunks (4 bytes)
        assert_eq!(enc.len(), 13, "{enc:?}");
        assert_eq!(DirtyBitmap::decode_rle(&enc, g).unwrap().dirty_chunks(), 0);
    }
}
