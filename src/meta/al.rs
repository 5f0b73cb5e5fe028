//! The activity log (AL): the bounded set of "hot" extents in which writes may be in flight.
//!
//! Rule that keeps a crash cheap and safe: before a write to an extent that is not hot is
//! issued, a transaction naming the extent is durable on disk; after a crash every extent
//! the log names is treated as dirty. A write to a hot extent (a *hit*) costs no metadata
//! I/O at all. An extent leaves the log (eviction) only in a transaction written after the
//! bitmap pages covering it are durable, so its dirty bits are never lost. An extent with
//! writes in flight is never evicted ([`ActivityLog::acquire`] and [`ActivityLog::release`]
//! count them, as DRBD's activity log does): a crash may interrupt such a write on either
//! copy, and only the log tells the next open to resync it. A write that finds every slot it
//! could take busy waits ([`WritePlan::Wait`]) until one of those writes ends.
//!
//! On disk each transaction carries its updates (slot <- extent) plus a rotating slice of the
//! whole slot table (the *context*), so the last [`AlGeometry::coverage`] transactions
//! rebuild the table ([`replay`]). Everything here is pure; `store` does the I/O.

use crate::fibhash::FibMap;
use std::ops::Range;

/// Default extent size: 4 MiB (DRBD's AL extent).
pub const DEFAULT_EXTENT_SIZE: u32 = 4 << 20;
/// Default number of hot extents (1024 x 4 MiB = 4 GiB of hot data).
pub const DEFAULT_SLOTS: u32 = 1024;
/// A slot that holds no extent.
pub const EMPTY: u32 = u32::MAX;
/// Most updates one transaction carries.
pub const MAX_UPDATES: usize = 64;
/// Table entries one transaction carries as context.
pub const CONTEXT_PER_TXN: usize = 884;

/// Size and count of hot extents.
///
/// Invariants: `extent_size` is a power of two in 1 MiB..=1 GiB; `slots` in 1..=65536.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct AlGeometry {
    extent_size: u32,
    slots: u32,
}

/// Errors of activity-log planning.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AlError {
    /// Invalid extent size or count.
    #[error("activity log of {slots} x {extent_size} bytes is invalid: extent size must be a power of two from 1 MiB to 1 GiB and the count 1..=65536")]
    BadGeometry {
        /// Extent size asked for.
        extent_size: u64,
        /// Extent count asked for.
        slots: u64,
    },
    /// A write touching more extents than the log holds (or than one transaction carries).
    #[error("a write over {extents} extents cannot be logged by a {slots}-slot activity log (at most {MAX_UPDATES} new extents per write); raise --al-extents")]
    WriteTooWide {
        /// Extents the write needs hot.
        extents: u64,
        /// Slots in the log.
        slots: u32,
    },
    /// An extent number that does not fit the on-disk u32.
    #[error("offset {offset} is beyond the 2^32 extents the activity log can name")]
    OffsetTooLarge {
        /// Byte offset.
        offset: u64,
    },
}

impl AlGeometry {
    /// Checks the extent size and count.
    pub fn new(extent_size: u64, slots: u64) -> Result<Self, AlError> {
        let ok_size =
            extent_size.is_power_of_two() && ((1 << 20)..=(1 << 30)).contains(&extent_size);
        if !ok_size || !(1..=65536).contains(&slots) {
            return Err(AlError::BadGeometry { extent_size, slots });
        }
        Ok(Self {
            extent_size: extent_size as u32,
            slots: slots as u32,
        })
    }

    /// Bytes per extent.
    pub fn extent_size(&self) -> u32 {
        self.extent_size
    }

    /// Number of hot extents.
    pub fn slots(&self) -> u32 {
        self.slots
    }

    /// Transactions needed to carry the whole table as context.
    pub fn coverage(&self) -> u32 {
        self.slots.div_ceil(CONTEXT_PER_TXN as u32)
    }

    /// Blocks in the on-disk ring: two more than [`Self::coverage`], so a torn newest block
    /// never destroys a block the replay needs.
    pub fn ring_blocks(&self) -> u32 {
        self.coverage() + 2
    }

    /// Extent numbers a byte range touches.
    pub fn extents_of(&self, offset: u64, len: u64) -> Range<u64> {
        if len == 0 {
            return 0..0;
        }
        let shift = self.extent_size.trailing_zeros();
        (offset >> shift)..((offset + len - 1) >> shift) + 1
    }

    /// Byte range of an extent (not clamped to the device).
    pub fn extent_bytes(&self, extent: u32) -> Range<u64> {
        let s = u64::from(extent) * u64::from(self.extent_size);
        s..s + u64::from(self.extent_size)
    }
}

impl Default for AlGeometry {
    fn default() -> Self {
        Self {
            extent_size: DEFAULT_EXTENT_SIZE,
            slots: DEFAULT_SLOTS,
        }
    }
}

/// One change of the slot table: `slot` now holds `extent`; `evicted` is what it held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AlUpdate {
    /// Slot index.
    pub slot: u32,
    /// New extent.
    pub extent: u32,
    /// Extent leaving the log (its bitmap bits must be durable first), if any.
    pub evicted: Option<u32>,
}

/// What a write needs before it may be issued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WritePlan {
    /// Every extent is hot: issue the write now.
    Hit,
    /// These extents must enter the log first (persist evicted extents' bitmap pages, write
    /// the transaction, then [`ActivityLog::apply`]).
    Transaction(Vec<AlUpdate>),
    /// Too few slots hold no write in flight to take this write's cold extents: retry after
    /// a write ends ([`ActivityLog::release`]).
    Wait,
}

/// One transaction as written to disk.
///
/// Invariants: `updates.len() <= MAX_UPDATES`, `context.len() <= CONTEXT_PER_TXN`,
/// context entry `i` is the extent of slot `(context_start + i) % slots`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlRecord {
    /// Sequence number, +1 per transaction.
    pub seq: u64,
    /// (slot, extent) pairs.
    pub updates: Vec<(u32, u32)>,
    /// First slot of the context slice.
    pub context_start: u32,
    /// Extents of the context slots ([`EMPTY`] for none).
    pub context: Vec<u32>,
}

/// The in-memory slot table with LRU eviction.
///
/// Invariants: `index[e] == s` iff `table[s] == e` and `e != EMPTY`; an extent is in at most
/// one slot. Every slot is on the doubly linked list `prev`/`next` from `head` (the next
/// victim: empty slots first, then least recently used) to `tail` (most recently used), so a
/// hit is O(1) and a victim choice walks past only the slots this write uses and the slots
/// with writes in flight (those were used recently, so they sit near the tail). `refs[s]` is
/// the number of writes in flight in slot `s`'s extent (0 for an empty slot); a slot with
/// `refs[s] > 0` is never a victim.
#[derive(Debug, Clone)]
pub struct ActivityLog {
    geometry: AlGeometry,
    table: Vec<u32>,
    index: ExtentMap,
    prev: Vec<u32>,
    next: Vec<u32>,
    head: u32,
    tail: u32,
    context_cursor: u32,
    refs: Vec<u32>,
}

/// End of the LRU list.
const NIL: u32 = u32::MAX;

/// Extent number -> slot (see [`crate::fibhash`] for why one multiply is enough).
type ExtentMap = FibMap<u32, u32>;

impl ActivityLog {
    /// An empty log.
    pub fn new(geometry: AlGeometry) -> Self {
        Self::from_table(geometry, vec![EMPTY; geometry.slots as usize])
    }

    /// A log holding `table` (from [`replay`]); entries beyond `slots` are ignored, missing
    /// ones are empty, duplicates keep their first slot.
    pub fn from_table(geometry: AlGeometry, mut table: Vec<u32>) -> Self {
        table.resize(geometry.slots as usize, EMPTY);
        let mut index = ExtentMap::with_capacity_and_hasher(table.len(), Default::default());
        for (s, e) in table.iter_mut().enumerate() {
            if *e != EMPTY && index.contains_key(e) {
                *e = EMPTY;
            } else if *e != EMPTY {
                index.insert(*e, s as u32);
            }
        }
        let n = table.len();
        let mut log = Self {
            geometry,
            table,
            index,
            prev: vec![NIL; n],
            next: vec![NIL; n],
            head: NIL,
            tail: NIL,
            context_cursor: 0,
            refs: vec![0; n],
        };
        // Empty slots at the victim end, occupied ones after them, each in slot order.
        for want_empty in [true, false] {
            for s in 0..n as u32 {
                if (log.table[s as usize] == EMPTY) == want_empty {
                    log.push_back(s);
                }
            }
        }
        log
    }

    fn unlink(&mut self, s: u32) {
        let (p, n) = (self.prev[s as usize], self.next[s as usize]);
        if p == NIL {
            self.head = n;
        } else {
            self.next[p as usize] = n;
        }
        if n == NIL {
            self.tail = p;
        } else {
            self.prev[n as usize] = p;
        }
        self.prev[s as usize] = NIL;
        self.next[s as usize] = NIL;
    }

    fn push_back(&mut self, s: u32) {
        self.prev[s as usize] = self.tail;
        self.next[s as usize] = NIL;
        if self.tail == NIL {
            self.head = s;
        } else {
            self.next[self.tail as usize] = s;
        }
        self.tail = s;
    }

    fn push_front(&mut self, s: u32) {
        self.next[s as usize] = self.head;
        self.prev[s as usize] = NIL;
        if self.head == NIL {
            self.tail = s;
        } else {
            self.prev[self.head as usize] = s;
        }
        self.head = s;
    }

    /// Marks slot `s` most recently used.
    fn touch(&mut self, s: u32) {
        if self.tail != s {
            self.unlink(s);
            self.push_back(s);
        }
    }

    /// Size and count of extents.
    pub fn geometry(&self) -> AlGeometry {
        self.geometry
    }

    /// Extents currently hot, in slot order.
    pub fn hot_extents(&self) -> impl Iterator<Item = u32> + '_ {
        self.table.iter().copied().filter(|e| *e != EMPTY)
    }

    /// The slot table.
    pub fn table(&self) -> &[u32] {
        &self.table
    }

    /// Whether `extent` is hot.
    pub fn is_hot(&self, extent: u32) -> bool {
        self.index.contains_key(&extent)
    }

    /// Plans a write of `len` bytes at `offset`: [`WritePlan::Hit`] when all its extents are
    /// hot (their LRU age refreshed), otherwise the updates to log, or [`WritePlan::Wait`]
    /// when the victims would have to include a slot with writes in flight. Does not change
    /// the table.
    pub fn access(&mut self, offset: u64, len: u64) -> Result<WritePlan, AlError> {
        let extents = self.geometry.extents_of(offset, len);
        if extents.end > u64::from(u32::MAX) {
            return Err(AlError::OffsetTooLarge { offset });
        }
        let mut cold = Vec::new();
        for e in extents.clone() {
            match self.index.get(&(e as u32)) {
                Some(&s) => self.touch(s),
                None => cold.push(e as u32),
            }
        }
        if cold.is_empty() {
            return Ok(WritePlan::Hit);
        }
        let width = extents.end - extents.start;
        if width > u64::from(self.geometry.slots) || cold.len() > MAX_UPDATES {
            return Err(AlError::WriteTooWide {
                extents: width,
                slots: self.geometry.slots,
            });
        }
        // Victims from the head of the LRU list (empty slots first, then least recently
        // used), skipping slots this write uses and slots with writes in flight: both were
        // used recently, so they sit towards the tail and the walk is short.
        let mut updates: Vec<AlUpdate> = Vec::with_capacity(cold.len());
        let mut cursor = self.head;
        for extent in cold {
            while cursor != NIL {
                let e = self.table[cursor as usize];
                if e == EMPTY
                    || (self.refs[cursor as usize] == 0 && !extents.contains(&u64::from(e)))
                {
                    break;
                }
                cursor = self.next[cursor as usize];
            }
            let slot = cursor;
            if slot == NIL {
                return Ok(WritePlan::Wait);
            }
            cursor = self.next[slot as usize];
            let old = self.table[slot as usize];
            updates.push(AlUpdate {
                slot,
                extent,
                evicted: (old != EMPTY).then_some(old),
            });
        }
        Ok(WritePlan::Transaction(updates))
    }

    /// Applies updates once their transaction is durable.
    pub fn apply(&mut self, updates: &[AlUpdate]) {
        for u in updates {
            let s = u.slot as usize;
            if s >= self.table.len() {
                continue;
            }
            let old = self.table[s];
            if old != EMPTY {
                self.index.remove(&old);
            }
            if let Some(prev) = self.index.insert(u.extent, u.slot) {
                if prev != u.slot {
                    // The extent moves: so do its writes in flight.
                    self.refs[s] += std::mem::take(&mut self.refs[prev as usize]);
                    self.table[prev as usize] = EMPTY;
                    self.unlink(prev);
                    self.push_front(prev);
                }
            }
            self.table[s] = u.extent;
            self.touch(u.slot);
        }
    }

    /// Counts a write of `len` bytes at `offset` as in flight in each of its extents, which
    /// must all be hot (after [`WritePlan::Hit`], or once the transaction is applied): none of
    /// them is evicted until [`Self::release`] of the same range. Returns false, counting
    /// nothing, if one is not hot.
    pub fn acquire(&mut self, offset: u64, len: u64) -> bool {
        let extents = self.geometry.extents_of(offset, len);
        if !extents.clone().all(|e| self.slot_of(e).is_some()) {
            return false;
        }
        for e in extents {
            if let Some(s) = self.slot_of(e) {
                self.refs[s as usize] += 1;
            }
        }
        true
    }

    /// Ends a write [`Self::acquire`]d with the same range: its extents may be evicted once no
    /// other write is in flight in them. Returns false, changing nothing, if some extent does
    /// not count a write in flight (a release without its acquire).
    pub fn release(&mut self, offset: u64, len: u64) -> bool {
        let extents = self.geometry.extents_of(offset, len);
        let held = |e| self.slot_of(e).is_some_and(|s| self.refs[s as usize] > 0);
        if !extents.clone().all(held) {
            return false;
        }
        for e in extents {
            if let Some(s) = self.slot_of(e) {
                self.refs[s as usize] -= 1;
            }
        }
        true
    }

    /// The slot holding extent `e`, if it is hot.
    fn slot_of(&self, e: u64) -> Option<u32> {
        u32::try_from(e)
            .ok()
            .and_then(|e| self.index.get(&e).copied())
    }

    /// The least recently used extent with writes in flight, other than `exclude` (extent
    /// numbers): the one to free first when every slot is busy.
    pub fn lru_busy_extent(&self, exclude: Range<u64>) -> Option<u32> {
        let mut cursor = self.head;
        while cursor != NIL {
            let e = self.table[cursor as usize];
            if e != EMPTY && self.refs[cursor as usize] > 0 && !exclude.contains(&u64::from(e)) {
                return Some(e);
            }
            cursor = self.next[cursor as usize];
        }
        None
    }

    /// Writes in flight, summed over the extents they touch.
    pub fn in_flight(&self) -> u64 {
        self.refs.iter().map(|r| u64::from(*r)).sum()
    }

    /// The record to write for `updates`, carrying the next context slice of the table as
    /// it will be after the updates. Advances the context cursor.
    pub fn record(&mut self, seq: u64, updates: &[AlUpdate]) -> AlRecord {
        let mut after = self.table.clone();
        for u in updates {
            if let Some(slot) = after.get_mut(u.slot as usize) {
                *slot = u.extent;
            }
        }
        self.record_of(
            seq,
            updates.iter().map(|u| (u.slot, u.extent)).collect(),
            &after,
        )
    }

    /// A record that changes nothing and only carries context (used to write a whole table).
    pub fn context_record(&mut self, seq: u64) -> AlRecord {
        let table = self.table.clone();
        self.record_of(seq, Vec::new(), &table)
    }

    fn record_of(&mut self, seq: u64, updates: Vec<(u32, u32)>, table: &[u32]) -> AlRecord {
        let slots = self.geometry.slots;
        let n = (slots as usize).min(CONTEXT_PER_TXN);
        let start = self.context_cursor;
        let context = (0..n as u32)
            .map(|i| table[((start + i) % slots) as usize])
            .collect();
        self.context_cursor = (start + n as u32) % slots;
        AlRecord {
            seq,
            updates,
            context_start: start,
            context,
        }
    }

    /// Empties the table (clean shutdown: nothing can be in flight).
    pub fn clear(&mut self) {
        *self = Self::new(self.geometry);
    }
}

/// What [`replay`] recovered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replayed {
    /// Slot table as of the newest valid transaction.
    pub table: Vec<u32>,
    /// False when some slot was not written by the newest contiguous run of transactions:
    /// the table cannot be trusted and the whole device must be treated as dirty.
    pub complete: bool,
    /// Newest valid sequence number (0 if none).
    pub last_seq: u64,
}

/// Rebuilds the slot table from the valid transactions found on disk (any order).
pub fn replay(geometry: AlGeometry, records: &[AlRecord]) -> Replayed {
    let slots = geometry.slots as usize;
    let mut sorted: Vec<&AlRecord> = records.iter().collect();
    sorted.sort_by_key(|r| r.seq);
    sorted.dedup_by_key(|r| r.seq);
    let Some(last) = sorted.last() else {
        return Replayed {
            table: vec![EMPTY; slots],
            complete: false,
            last_seq: 0,
        };
    };
    let last_seq = last.seq;
    // The newest run of consecutive sequence numbers.
    let mut first = sorted.len() - 1;
    while first > 0 && sorted[first - 1].seq + 1 == sorted[first].seq {
        first -= 1;
    }
    let mut table = vec![EMPTY; slots];
    let mut written = vec![false; slots];
    for r in &sorted[first..] {
        for &(s, e) in &r.updates {
            if let Some(t) = table.get_mut(s as usize) {
                *t = e;
                written[s as usize] = true;
            }
        }
        for (i, &e) in r.context.iter().enumerate() {
            let s = (r.context_start as usize + i) % slots;
            table[s] = e;
            written[s] = true;
        }
    }
    Replayed {
        table,
        complete: written.iter().all(|w| *w),
        last_seq,
    }
}

/// Metadata writes caused by a stream of writes (the cost model of the benchmark).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct MetaWriteCount {
    /// Data writes simulated.
    pub writes: u64,
    /// AL hits (no metadata I/O).
    pub hits: u64,
    /// AL transactions written.
    pub al_transactions: u64,
    /// Bitmap pages written before evictions.
    pub bitmap_page_writes: u64,
}

/// Simulates `count` writes of `write_len` bytes at offsets from `next_offset` on a volume
/// whose peer is disconnected (every written chunk stays dirty: the worst case for bitmap
/// writes), counting the metadata writes the AL rules demand. A bitmap page is written
/// before an eviction only if a bit in it changed since it was last written (as the store
/// does).
pub fn simulate(
    geometry: AlGeometry,
    granularity_shift: u32,
    bits_per_page: u64,
    count: u64,
    write_len: u64,
    mut next_offset: impl FnMut() -> u64,
) -> Result<MetaWriteCount, AlError> {
    let mut al = ActivityLog::new(geometry);
    let mut changed_pages = std::collections::HashSet::new();
    let mut dirty_chunks = std::collections::HashSet::new();
    let mut out = MetaWriteCount::default();
    for _ in 0..count {
        let off = next_offset();
        out.writes += 1;
        // As the volume does: bits first, then the log.
        for chunk in (off >> granularity_shift)..=((off + write_len - 1) >> granularity_shift) {
            if dirty_chunks.insert(chunk) {
                changed_pages.insert(chunk / bits_per_page);
            }
        }
        match al.access(off, write_len)? {
            WritePlan::Hit => out.hits += 1,
            // No write is ever acquired here, so every slot can be a victim.
            WritePlan::Wait => unreachable!("simulate holds no write in flight"),
            WritePlan::Transaction(updates) => {
                for ev in updates.iter().filter_map(|u| u.evicted) {
                    let r = geometry.extent_bytes(ev);
                    let p0 = (r.start >> granularity_shift) / bits_per_page;
                    let p1 = ((r.end - 1) >> granularity_shift) / bits_per_page;
                    for p in p0..=p1 {
                        if changed_pages.remove(&p) {
                            out.bitmap_page_writes += 1;
                        }
                    }
                }
                out.al_transactions += 1;
                al.apply(&updates);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MIB: u64 = 1 << 20;

    fn small() -> AlGeometry {
        AlGeometry::new(4 * MIB, 3).unwrap()
    }

    #[test]
    fn bad_geometry_is_refused() {
        assert!(AlGeometry::new(3 * MIB, 10).is_err());
        assert!(AlGeometry::new(512 * 1024, 10).is_err());
        assert!(AlGeometry::new(4 * MIB, 0).is_err());
        assert!(AlGeometry::new(4 * MIB, 65537).is_err());
        assert_eq!(AlGeometry::default().coverage(), 2);
    }

    #[test]
    fn first_write_to_a_cold_extent_needs_a_transaction_then_hits() {
        let mut al = ActivityLog::new(small());
        let WritePlan::Transaction(u) = al.access(4 * MIB + 10, 4096).unwrap() else {
            panic!("expected a transaction")
        };
        assert_eq!(
            u,
            vec![AlUpdate {
                slot: 0,
                extent: 1,
                evicted: None
            }]
        );
        // Not applied yet: still cold.
        assert!(!al.is_hot(1));
        al.apply(&u);
        assert_eq!(al.access(4 * MIB, 4096).unwrap(), WritePlan::Hit);
    }

    #[test]
    fn full_log_evicts_the_least_recently_used_extent() {
        let mut al = ActivityLog::new(small());
        for e in 0..3u64 {
            let WritePlan::Transaction(u) = al.access(e * 4 * MIB, 1).unwrap() else {
                panic!()
            };
            al.apply(&u);
        }
        al.access(0, 1).unwrap(); // extent 0 is now the most recent; 1 is the LRU
        let WritePlan::Transaction(u) = al.access(10 * 4 * MIB, 1).unwrap() else {
            panic!()
        };
        assert_eq!(u.len(), 1);
        assert_eq!(u[0].extent, 10);
        assert_eq!(u[0].evicted, Some(1));
    }

    #[test]
    fn a_write_never_evicts_an_extent_it_uses_itself() {
        let mut al = ActivityLog::new(AlGeometry::new(4 * MIB, 2).unwrap());
        let WritePlan::Transaction(u) = al.access(0, 1).unwrap() else {
            panic!()
        };
        al.apply(&u);
        let WritePlan::Transaction(u) = al.access(8 * MIB, 1).unwrap() else {
            panic!()
        };
        al.apply(&u);
        // Spans extents 0 and 1: 0 is hot and LRU, but must stay.
        let WritePlan::Transaction(u) = al.access(4 * MIB - 1, 2).unwrap() else {
            panic!()
        };
        assert_eq!(
            u,
            vec![AlUpdate {
                slot: 1,
                extent: 1,
                evicted: Some(2)
            }]
        );
    }

    #[test]
    fn a_write_wider_than_the_log_is_refused() {
        let mut al = ActivityLog::new(AlGeometry::new(MIB, 2).unwrap());
        assert!(matches!(
            al.access(0, 3 * MIB),
            Err(AlError::WriteTooWide {
                extents: 3,
                slots: 2
            })
        ));
    }

    #[test]
    fn an_extent_with_a_write_in_flight_is_never_evicted() {
        let mut al = ActivityLog::new(AlGeometry::new(4 * MIB, 2).unwrap());
        for e in 0..2u64 {
            let WritePlan::Transaction(u) = al.access(e * 4 * MIB, 1).unwrap() else {
                panic!()
            };
            al.apply(&u);
            assert!(al.acquire(e * 4 * MIB, 1));
        }
        assert_eq!(al.in_flight(), 2);
        // Both slots hold a write in flight: a third extent waits.
        assert_eq!(al.access(8 * MIB, 1).unwrap(), WritePlan::Wait);
        // A hit needs no slot and proceeds.
        assert_eq!(al.access(4 * MIB + 7, 1).unwrap(), WritePlan::Hit);
        assert!(al.acquire(4 * MIB + 7, 1));
        // Extent 1 (the more recent) is free of writes first: it is the victim, not extent 0.
        assert!(al.release(4 * MIB, 1));
        assert_eq!(al.access(8 * MIB, 1).unwrap(), WritePlan::Wait);
        assert!(al.release(4 * MIB + 7, 1));
        let WritePlan::Transaction(u) = al.access(8 * MIB, 1).unwrap() else {
            panic!()
        };
        assert_eq!(u[0].evicted, Some(1));
        // Extent 0 is the only one with a write in flight (extent 1 has none left).
        assert_eq!(al.lru_busy_extent(0..0), Some(0));
        assert_eq!(al.lru_busy_extent(0..1), None);
        // A release without its acquire changes nothing.
        assert!(!al.release(4 * MIB, 1));
        assert!(!al.release(40 * MIB, 1));
        assert_eq!(al.in_flight(), 1);
    }

    #[test]
    fn acquire_needs_every_extent_hot() {
        let mut al = ActivityLog::new(small());
        assert!(!al.acquire(0, 1));
        let WritePlan::Transaction(u) = al.access(0, 1).unwrap() else {
            panic!()
        };
        al.apply(&u);
        // Spans extents 0 (hot) and 1 (cold): nothing is counted.
        assert!(!al.acquire(4 * MIB - 1, 2));
        assert_eq!(al.in_flight(), 0);
    }

    proptest! {
        #[test]
        fn eviction_order_matches_a_recency_list_model(slots in 1u64..20, writes in proptest::collection::vec(0u64..40, 1..400)) {
            let mut al = ActivityLog::new(AlGeometry::new(MIB, slots).unwrap());
            let mut order: Vec<u32> = Vec::new(); // front = least recently used
            for w in writes {
                let e = w as u32;
                match al.access(w * MIB, 1).unwrap() {
                    WritePlan::Hit => {
                        let i = order.iter().position(|x| *x == e);
                        prop_assert!(i.is_some(), "hit on cold extent {}", e);
                        order.remove(i.unwrap());
                    }
                    WritePlan::Transaction(u) => {
                        prop_assert!(!order.contains(&e));
                        prop_assert_eq!(u.len(), 1);
                        let expected = if order.len() as u64 == slots { Some(order.remove(0)) } else { None };
                        prop_assert_eq!(u[0].evicted, expected);
                        al.apply(&u);
                    }
                    WritePlan::Wait => prop_assert!(false, "no write is in flight, yet extent {} waits", e),
                }
                order.push(e);
                let mut hot: Vec<u32> = al.hot_extents().collect();
                hot.sort_unstable();
                let mut model = order.clone();
                model.sort_unstable();
                prop_assert_eq!(hot, model);
            }
        }

        #[test]
        fn no_extent_with_a_write_in_flight_is_ever_evicted(
            slots in 1u64..8,
            ops in proptest::collection::vec((any::<bool>(), 0u64..16), 1..400),
        ) {
            let mut al = ActivityLog::new(AlGeometry::new(MIB, slots).unwrap());
            // Extents of the writes in flight, one entry per write.
            let mut in_flight: Vec<u32> = Vec::new();
            for (start, x) in ops {
                if !start && !in_flight.is_empty() {
                    let e = in_flight.swap_remove(x as usize % in_flight.len());
                    prop_assert!(al.release(u64::from(e) * MIB, 1));
                    continue;
                }
                let e = x as u32;
                match al.access(x * MIB, 1).unwrap() {
                    WritePlan::Hit => {}
                    WritePlan::Transaction(u) => {
                        for ev in u.iter().filter_map(|u| u.evicted) {
                            prop_assert!(!in_flight.contains(&ev), "evicted extent {} with a write in flight", ev);
                        }
                        al.apply(&u);
                    }
                    WritePlan::Wait => {
                        // Only when every slot holds an extent with a write in flight.
                        let hot: Vec<u32> = al.hot_extents().collect();
                        prop_assert_eq!(hot.len() as u64, slots);
                        prop_assert!(hot.iter().all(|h| in_flight.contains(h)));
                        continue;
                    }
                }
                prop_assert!(al.acquire(x * MIB, 1));
                in_flight.push(e);
                prop_assert_eq!(al.in_flight(), in_flight.len() as u64);
            }
        }

        #[test]
        fn replay_of_the_records_rebuilds_the_table(
            slots in 1u64..2000,
            writes in proptest::collection::vec(0u64..5000, 1..300),
        ) {
            let g = AlGeometry::new(MIB, slots).unwrap();
            let mut al = ActivityLog::new(g);
            let mut records = Vec::new();
            let mut seq = 1;
            for _ in 0..g.coverage() {
                records.push(al.context_record(seq));
                seq += 1;
            }
            for w in writes {
                if let WritePlan::Transaction(u) = al.access(w * MIB, 1).unwrap() {
                    records.push(al.record(seq, &u));
                    seq += 1;
                    al.apply(&u);
                }
            }
            // Only the ring survives on disk; older blocks were overwritten.
            let ring = g.ring_blocks() as usize;
            let on_disk: Vec<_> = records.iter().rev().take(ring).cloned().collect();
            let r = replay(g, &on_disk);
            prop_assert!(r.complete);
            prop_assert_eq!(&r.table, &al.table().to_vec());
            // A torn newest block (lost) still leaves a complete older table.
            let without_newest: Vec<_> = on_disk.iter().skip(1).cloned().collect();
            let r2 = replay(g, &without_newest);
            prop_assert!(r2.complete || without_newest.len() < g.coverage() as usize);
        }
    }

    #[test]
    fn replay_with_no_records_is_incomplete() {
        let r = replay(small(), &[]);
        assert!(!r.complete);
    }

    #[test]
    fn simulated_writes_inside_the_hot_set_cost_one_transaction_per_extent() {
        let g = AlGeometry::default();
        let mut x = 0u64;
        let c = simulate(g, 16, 32512, 10_000, 4096, || {
            x = (x + 7919 * 4096) % (1 << 30);
            x
        })
        .unwrap();
        assert_eq!(c.al_transactions, 256); // 1 GiB / 4 MiB extents, each entered once
        assert_eq!(c.bitmap_page_writes, 0);
        assert_eq!(c.hits, 10_000 - 256);
    }
}
