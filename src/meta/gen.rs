//! Generation identifiers (DRBD's "UUIDs") and the resync decision made when two nodes meet.
//!
//! Each node keeps `(current, bitmap, history[0], history[1])`. `current` names the data
//! generation on this disk; `bitmap` names the generation the peer had when this node started
//! tracking differences in its bitmap (0 when it tracks nothing); `history` holds older
//! generations. The decision is [`decide`], a pure function of both sides' ids and flags;
//! its table is in docs/FORMAT.md ("Generation identifiers").

/// The `current` of metadata that has never held data (DRBD's `UUID_JUST_CREATED`).
pub const JUST_CREATED: u64 = 4;

/// The generation identifiers of one disk.
///
/// Invariants: `current != 0`; `bitmap == 0` means "no bitmap generation"; history slots
/// hold 0 when unused. Generated ids are never 0 or [`JUST_CREATED`]. In JSON each id is a
/// 16-digit hex string (64-bit integers lose precision in JSON tools such as jq).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(into = "GenIdsHex", try_from = "GenIdsHex")]
pub struct GenIds {
    /// Generation of the data on this disk.
    pub current: u64,
    /// The peer's generation when this node's bitmap started (0: none).
    pub bitmap: u64,
    /// Older generations, most recent first.
    pub history: [u64; 2],
}

/// JSON form of [`GenIds`].
#[derive(serde::Serialize, serde::Deserialize)]
struct GenIdsHex {
    current: String,
    bitmap: String,
    history: [String; 2],
}

impl From<GenIds> for GenIdsHex {
    fn from(g: GenIds) -> Self {
        let h = |v: u64| format!("{v:016x}");
        GenIdsHex {
            current: h(g.current),
            bitmap: h(g.bitmap),
            history: [h(g.history[0]), h(g.history[1])],
        }
    }
}

impl TryFrom<GenIdsHex> for GenIds {
    type Error = String;
    fn try_from(g: GenIdsHex) -> Result<Self, String> {
        let p = |s: &str| {
            u64::from_str_radix(s, 16).map_err(|_| format!("generation id '{s}' is not hex"))
        };
        Ok(GenIds {
            current: p(&g.current)?,
            bitmap: p(&g.bitmap)?,
            history: [p(&g.history[0])?, p(&g.history[1])?],
        })
    }
}

impl GenIds {
    /// Ids of freshly created metadata.
    pub const FRESH: GenIds = GenIds {
        current: JUST_CREATED,
        bitmap: 0,
        history: [0, 0],
    };

    /// Pushes `id` onto the history (dropping the oldest); 0 is not pushed.
    fn push_history(&mut self, id: u64) {
        if id != 0 {
            self.history = [id, self.history[0]];
        }
    }

    /// A new data generation begins on this node while it cannot reach its peer (promotion
    /// while disconnected, a primary losing its peer before the first write the peer misses,
    /// `new-current-uuid`): from now on the bitmap records what the peer lacks. If no bitmap generation exists the old current becomes it; if one exists (a
    /// second generation while still apart) the bitmap keeps accumulating since that older
    /// point and the old current goes to history.
    pub fn new_current(&mut self, new: u64) {
        if self.bitmap == 0 {
            self.bitmap = self.current;
        } else {
            self.push_history(self.current);
        }
        self.current = new;
    }

    /// This node was the resync source and the resync completed: the peer now has our
    /// current generation, the bitmap generation retires to history.
    pub fn resync_finished_as_source(&mut self) {
        let old = self.bitmap;
        self.bitmap = 0;
        self.push_history(old);
    }

    /// This node was the resync target and the resync completed: it now holds the source's
    /// generation. A full sync adopts the source's history as well; a bitmap resync keeps
    /// our old current as history.
    pub fn resync_finished_as_target(&mut self, source: &GenIds, full: bool) {
        if full {
            self.history = source.history;
        } else if self.current != source.current {
            self.push_history(self.current);
        }
        self.current = source.current;
        self.bitmap = 0;
    }

    /// Whether these are the ids of metadata that never held a data generation.
    pub fn is_fresh(&self) -> bool {
        *self == Self::FRESH
    }
}

/// A fresh random generation id (never 0 or [`JUST_CREATED`]).
pub fn random_id() -> Result<u64, getrandom::Error> {
    loop {
        let v = getrandom::u64()?;
        if v != 0 && v != JUST_CREATED {
            return Ok(v);
        }
    }
}

/// Disk-state flags kept in the superblock, as a bit set.
///
/// Invariant: only the bits of the associated constants are ever set.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
pub struct DiskFlags(pub u32);

impl DiskFlags {
    /// The data is a consistent (possibly old) image: not in the middle of a resync.
    pub const CONSISTENT: u32 = 1 << 0;
    /// The data is the newest known generation.
    pub const UP_TO_DATE: u32 = 1 << 1;
    /// The peer (or an operator) declared this copy outdated: it must not be promoted.
    pub const OUTDATED: u32 = 1 << 2;
    /// The node was primary the last time the metadata was written.
    pub const WAS_PRIMARY: u32 = 1 << 3;
    /// The first full sync (or its skip by `new-current-uuid --clear-bitmap`) completed.
    pub const INITIAL_SYNC_DONE: u32 = 1 << 4;
    /// The node is primary and has not closed cleanly: found set at open, it means the
    /// primary crashed and the activity-log extents may differ from the peer.
    pub const CRASHED_PRIMARY: u32 = 1 << 5;
    /// This node recorded the peer's copy as Outdated (the peer said so in its heartbeat,
    /// stopped while connected, or was fenced by this node's promotion): the peer cannot be
    /// promoted without force, so this copy is the newest. Cleared when the peer is in sync
    /// again or this copy becomes a resync target.
    pub const PEER_OUTDATED: u32 = 1 << 6;
    /// This node stopped cleanly as Primary with no peer able to take the service over: its
    /// copy is the newest. Cleared at the next promotion or connection to the peer.
    pub const PRIMARY_CLEAN_STOP: u32 = 1 << 7;
    /// All known bits.
    pub const ALL: u32 = (1 << 8) - 1;

    /// Names of the bits, in bit order.
    pub const NAMES: [(u32, &'static str); 8] = [
        (Self::CONSISTENT, "consistent"),
        (Self::UP_TO_DATE, "up-to-date"),
        (Self::OUTDATED, "outdated"),
        (Self::WAS_PRIMARY, "was-primary"),
        (Self::INITIAL_SYNC_DONE, "initial-sync-done"),
        (Self::CRASHED_PRIMARY, "crashed-primary"),
        (Self::PEER_OUTDATED, "peer-outdated"),
        (Self::PRIMARY_CLEAN_STOP, "primary-clean-stop"),
    ];

    /// Whether `bit` is set.
    pub fn has(self, bit: u32) -> bool {
        self.0 & bit == bit
    }

    /// Sets or clears `bit`.
    pub fn set(&mut self, bit: u32, on: bool) {
        if on {
            self.0 |= bit;
        } else {
            self.0 &= !bit;
        }
    }

    /// Names of the set bits.
    pub fn names(self) -> Vec<&'static str> {
        Self::NAMES
            .iter()
            .filter(|(b, _)| self.has(*b))
            .map(|(_, n)| *n)
            .collect()
    }
}

/// One side's view for the decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeGen {
    /// Node id (the lower one is the tie-break winner).
    pub node_id: u32,
    /// Generation identifiers.
    pub ids: GenIds,
    /// Disk-state flags.
    pub flags: DiskFlags,
}

/// Which way data flows in a resync.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Direction {
    /// This node is the source.
    LocalToPeer,
    /// The peer is the source.
    PeerToLocal,
}

impl Direction {
    /// The same flow seen from the other node.
    pub fn reversed(self) -> Direction {
        match self {
            Direction::LocalToPeer => Direction::PeerToLocal,
            Direction::PeerToLocal => Direction::LocalToPeer,
        }
    }
}

/// Which generation ids matched when the decision found a split brain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SplitBrainEvidence {
    /// Both bitmap ids are the same (the common ancestor) but the currents differ: both
    /// sides wrote since they parted. Automatic recovery policies may apply.
    BitmapIdsEqual {
        /// The shared bitmap id.
        common: u64,
        /// Local current.
        local_current: u64,
        /// Peer current.
        peer_current: u64,
    },
    /// Only history ids match: both sides moved on from a common ancestor more than once.
    /// The match reported is the most recent one (smallest `local_slot + peer_slot`, then
    /// the smaller id), so both nodes name the same ancestor.
    HistoryMatch {
        /// The shared id.
        common: u64,
        /// Local history slot (0 = most recent).
        local_slot: usize,
        /// Peer history slot.
        peer_slot: usize,
    },
    /// Each side's current generation is one the other side has already moved on from (in
    /// its bitmap id or history): each claims to be newer, so neither can be trusted as the
    /// source and no bitmap bounds the differences. Valid histories never produce this
    /// (generated ids are random); it means metadata was copied or edited.
    CurrentsCrossed {
        /// Local current.
        local_current: u64,
        /// Peer current.
        peer_current: u64,
    },
}

impl SplitBrainEvidence {
    /// The same evidence seen from the other node (local and peer fields swapped).
    pub fn mirrored(self) -> SplitBrainEvidence {
        match self {
            SplitBrainEvidence::BitmapIdsEqual {
                common,
                local_current,
                peer_current,
            } => SplitBrainEvidence::BitmapIdsEqual {
                common,
                local_current: peer_current,
                peer_current: local_current,
            },
            SplitBrainEvidence::HistoryMatch {
                common,
                local_slot,
                peer_slot,
            } => SplitBrainEvidence::HistoryMatch {
                common,
                local_slot: peer_slot,
                peer_slot: local_slot,
            },
            SplitBrainEvidence::CurrentsCrossed {
                local_current,
                peer_current,
            } => SplitBrainEvidence::CurrentsCrossed {
                local_current: peer_current,
                peer_current: local_current,
            },
        }
    }
}

/// The outcome of comparing two nodes' generation identifiers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case", tag = "decision")]
pub enum Decision {
    /// Same generation, nothing to copy.
    NoResync,
    /// Copy the chunks dirty in either side's bitmap (their union, see `DirtyBitmap::merge`).
    BitmapResync {
        /// Source to target.
        direction: Direction,
    },
    /// Copy everything: the target's generation is too old for a bitmap to cover it, or it
    /// never held data.
    FullSync {
        /// Source to target.
        direction: Direction,
    },
    /// Both sides are freshly created: a full sync from whichever side is promoted first,
    /// unless both run `new-current-uuid --clear-bitmap` with the same id.
    InitialSyncPending,
    /// Both sides wrote independently: an operator (or a split-brain policy) must choose.
    SplitBrain {
        /// What matched.
        evidence: SplitBrainEvidence,
    },
    /// Nothing matches: these disks never belonged to the same volume.
    UnrelatedData,
    /// The decided source is not consistent (an interrupted resync target): refuse.
    SourceInconsistent {
        /// The direction that would have been used.
        direction: Direction,
    },
    /// Both sides carry the same node id: a node never pairs with itself, and the
    /// crashed-primary tie-break (lower node id) could not choose. Refuse; the node ids in
    /// the configuration or metadata must differ.
    SameNodeId {
        /// The id both sides reported.
        node_id: u32,
    },
}

impl Decision {
    /// The same decision seen from the other node: directions reversed, local and peer
    /// fields of the evidence swapped. [`decide`] satisfies
    /// `decide(b, a) == decide(a, b).mirrored()` for every input.
    pub fn mirrored(self) -> Decision {
        match self {
            Decision::BitmapResync { direction } => Decision::BitmapResync {
                direction: direction.reversed(),
            },
            Decision::FullSync { direction } => Decision::FullSync {
                direction: direction.reversed(),
            },
            Decision::SourceInconsistent { direction } => Decision::SourceInconsistent {
                direction: direction.reversed(),
            },
            Decision::SplitBrain { evidence } => Decision::SplitBrain {
                evidence: evidence.mirrored(),
            },
            d @ (Decision::NoResync
            | Decision::InitialSyncPending
            | Decision::UnrelatedData
            | Decision::SameNodeId { .. }) => d,
        }
    }
}

/// Decides the resync between `local` and `peer` (DRBD's `uuid_compare` rules, in order):
///
/// 0. both node ids equal -> [`Decision::SameNodeId`] (refuse);
/// 1. both currents fresh -> [`Decision::InitialSyncPending`];
/// 2. one current fresh -> full sync from the other;
/// 3. currents equal:
///    - exactly one side has a bitmap id -> bitmap resync from that side (a resync source
///      that crashed before recording "resync finished"; DRBD rules 34-37);
///    - else a side crashed as primary (its activity-log extents may differ) -> bitmap
///      resync from the crashed primary (lower node id if both);
///    - else no resync;
/// 4. the peer is ahead (local current == peer bitmap, or local current in peer history)
///    and the local side is not, or the reverse (local bitmap == peer current, or peer
///    current in local history) -> resync from the side that is ahead: a bitmap resync when
///    its bitmap id is the other's current, or when the other holds no bitmap id and has the
///    ahead side's bitmap id in its history (a finished resync whose end the source never
///    saw acknowledged), else a full sync;
/// 5. both are ahead of each other -> split brain, evidence `CurrentsCrossed`;
/// 6. bitmap ids equal (non-zero) -> split brain;
/// 7. any history id in common -> split brain (the most recent common id is reported);
/// 8. otherwise unrelated data.
///
/// Id 0 never matches anything but an equal current. A resync whose source is not marked
/// consistent becomes [`Decision::SourceInconsistent`].
///
/// The decision is antisymmetric: `decide(peer, local) == decide(local, peer).mirrored()`
/// for all inputs, so both nodes, each deciding from its own point of view, agree on the
/// source, the target and the evidence.
pub fn decide(local: &NodeGen, peer: &NodeGen) -> Decision {
    let decision = compare(local, peer);
    let source_consistent = |d: Direction| match d {
        Direction::LocalToPeer => local.flags.has(DiskFlags::CONSISTENT),
        Direction::PeerToLocal => peer.flags.has(DiskFlags::CONSISTENT),
    };
    match decision {
        Decision::BitmapResync { direction } | Decision::FullSync { direction }
            if !source_consistent(direction) =>
        {
            Decision::SourceInconsistent { direction }
        }
        d => d,
    }
}

/// Whether the non-zero `id` is one of `history`.
fn in_history(id: u64, history: &[u64; 2]) -> bool {
    id != 0 && history.contains(&id)
}

/// How `behind` relates to a node that moved on from `behind`'s current generation: via the
/// other node's bitmap id (`Some(false)`: a bitmap covers the difference), via its history
/// only (`Some(true)`: full sync), or not at all (`None`).
fn ahead_of(ahead: &GenIds, behind: &GenIds) -> Option<bool> {
    if ahead.bitmap != 0 && ahead.bitmap == behind.current {
        Some(false)
    } else if in_history(behind.current, &ahead.history) {
        // `behind` finished a resync to a generation `ahead` has left since (the source lost
        // the acknowledgement of the resync's end and moved on), wrote nothing after it (no
        // bitmap id), and passed through `ahead`'s bitmap generation before it: `ahead`'s
        // bitmap, tracking since then, covers every difference.
        let bitmap_covers =
            ahead.bitmap != 0 && behind.bitmap == 0 && in_history(ahead.bitmap, &behind.history);
        Some(!bitmap_covers)
    } else {
        None
    }
}

fn compare(local: &NodeGen, peer: &NodeGen) -> Decision {
    use Direction::*;
    let (l, p) = (&local.ids, &peer.ids);
    if local.node_id == peer.node_id {
        return Decision::SameNodeId {
            node_id: local.node_id,
        };
    }
    match (l.current == JUST_CREATED, p.current == JUST_CREATED) {
        (true, true) => return Decision::InitialSyncPending,
        (true, false) => {
            return Decision::FullSync {
                direction: PeerToLocal,
            }
        }
        (false, true) => {
            return Decision::FullSync {
                direction: LocalToPeer,
            }
        }
        (false, false) => {}
    }
    if l.current == p.current {
        match (l.bitmap != 0, p.bitmap != 0) {
            (true, false) => {
                return Decision::BitmapResync {
                    direction: LocalToPeer,
                }
            }
            (false, true) => {
                return Decision::BitmapResync {
                    direction: PeerToLocal,
                }
            }
            _ => {}
        }
        let lc = local.flags.has(DiskFlags::CRASHED_PRIMARY);
        let pc = peer.flags.has(DiskFlags::CRASHED_PRIMARY);
        // Node ids differ here (rule 0), so the tie-break is the same from both sides.
        let local_wins_tie = local.node_id < peer.node_id;
        return match (lc, pc) {
            (false, false) => Decision::NoResync,
            (true, false) => Decision::BitmapResync {
                direction: LocalToPeer,
            },
            (false, true) => Decision::BitmapResync {
                direction: PeerToLocal,
            },
            (true, true) if local_wins_tie => Decision::BitmapResync {
                direction: LocalToPeer,
            },
            (true, true) => Decision::BitmapResync {
                direction: PeerToLocal,
            },
        };
    }
    let resync = |direction: Direction, full: bool| {
        if full {
            Decision::FullSync { direction }
        } else {
            Decision::BitmapResync { direction }
        }
    };
    match (ahead_of(l, p), ahead_of(p, l)) {
        (Some(full), None) => return resync(LocalToPeer, full),
        (None, Some(full)) => return resync(PeerToLocal, full),
        (Some(_), Some(_)) => {
            return Decision::SplitBrain {
                evidence: SplitBrainEvidence::CurrentsCrossed {
                    local_current: l.current,
                    peer_current: p.current,
                },
            }
        }
        (None, None) => {}
    }
    if l.bitmap != 0 && l.bitmap == p.bitmap {
        return Decision::SplitBrain {
            evidence: SplitBrainEvidence::BitmapIdsEqual {
                common: l.bitmap,
                local_current: l.current,
                peer_current: p.current,
            },
        };
    }
    // The most recent common ancestor: smallest slot sum, then the smaller id. The key is
    // unchanged when the sides swap, so both nodes report the same match.
    let mut best: Option<(usize, u64, usize, usize)> = None;
    for (ls, &lh) in l.history.iter().enumerate() {
        for (ps, &ph) in p.history.iter().enumerate() {
            if lh != 0 && lh == ph {
                let candidate = (ls + ps, lh, ls, ps);
                if best.is_none_or(|b| (candidate.0, candidate.1) < (b.0, b.1)) {
                    best = Some(candidate);
                }
            }
        }
    }
    match best {
        Some((_, common, local_slot, peer_slot)) => Decision::SplitBrain {
            evidence: SplitBrainEvidence::HistoryMatch {
                common,
                local_slot,
                peer_slot,
            },
        },
        None => Decision::UnrelatedData,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Direction::*;

    const OK: DiskFlags =
        DiskFlags(DiskFlags::CONSISTENT | DiskFlags::UP_TO_DATE | DiskFlags::INITIAL_SYNC_DONE);

    fn node(id: u32, current: u64, bitmap: u64, history: [u64; 2]) -> NodeGen {
        NodeGen {
            node_id: id,
            ids: GenIds {
                current,
                bitmap,
                history,
            },
            flags: OK,
        }
    }

    #[test]
    fn both_fresh_waits_for_the_first_promotion() {
        let (a, b) = (
            node(1, JUST_CREATED, 0, [0, 0]),
            node(2, JUST_CREATED, 0, [0, 0]),
        );
        assert_eq!(decide(&a, &b), Decision::InitialSyncPending);
    }

    #[test]
    fn a_fresh_side_gets_a_full_sync_from_the_side_with_data() {
        let (a, b) = (node(1, 0xA, 0, [0, 0]), node(2, JUST_CREATED, 0, [0, 0]));
        assert_eq!(
            decide(&a, &b),
            Decision::FullSync {
                direction: LocalToPeer
            }
        );
        assert_eq!(
            decide(&b, &a),
            Decision::FullSync {
                direction: PeerToLocal
            }
        );
    }

    #[test]
    fn equal_currents_need_no_resync() {
        let (a, b) = (node(1, 0xA, 0, [0x9, 0]), node(2, 0xA, 0, [0x9, 0]));
        assert_eq!(decide(&a, &b), Decision::NoResync);
    }

    #[test]
    fn equal_currents_with_a_leftover_bitmap_id_resync_from_the_side_holding_it() {
        // The source crashed after the target adopted its generation but before it retired
        // its own bitmap id: finish with a bitmap resync from the source (its ids get fixed).
        let (a, b) = (node(1, 0xB, 0xA, [0, 0]), node(2, 0xB, 0, [0xA, 0]));
        assert_eq!(
            decide(&a, &b),
            Decision::BitmapResync {
                direction: LocalToPeer
            }
        );
        assert_eq!(
            decide(&b, &a),
            Decision::BitmapResync {
                direction: PeerToLocal
            }
        );
    }

    #[test]
    fn equal_currents_after_a_primary_crash_resync_from_the_crashed_primary() {
        let (mut a, b) = (node(1, 0xA, 0, [0, 0]), node(2, 0xA, 0, [0, 0]));
        a.flags.set(DiskFlags::CRASHED_PRIMARY, true);
        assert_eq!(
            decide(&a, &b),
            Decision::BitmapResync {
                direction: LocalToPeer
            }
        );
        assert_eq!(
            decide(&b, &a),
            Decision::BitmapResync {
                direction: PeerToLocal
            }
        );
        let mut b2 = b;
        b2.flags.set(DiskFlags::CRASHED_PRIMARY, true);
        // Both crashed as primary: the lower node id is the source, seen the same from both sides.
        assert_eq!(
            decide(&a, &b2),
            Decision::BitmapResync {
                direction: LocalToPeer
            }
        );
        assert_eq!(
            decide(&b2, &a),
            Decision::BitmapResync {
                direction: PeerToLocal
            }
        );
    }

    #[test]
    fn current_equal_to_peer_bitmap_is_a_bitmap_resync_from_the_peer() {
        // The peer was promoted while apart: its old current (= ours) became its bitmap id.
        let (a, b) = (node(1, 0xA, 0, [0, 0]), node(2, 0xB, 0xA, [0, 0]));
        assert_eq!(
            decide(&a, &b),
            Decision::BitmapResync {
                direction: PeerToLocal
            }
        );
        assert_eq!(
            decide(&b, &a),
            Decision::BitmapResync {
                direction: LocalToPeer
            }
        );
    }

    #[test]
    fn bitmap_ids_equal_but_currents_differ_is_split_brain() {
        let (a, b) = (node(1, 0xB, 0xA, [0, 0]), node(2, 0xC, 0xA, [0, 0]));
        assert_eq!(
            decide(&a, &b),
            Decision::SplitBrain {
                evidence: SplitBrainEvidence::BitmapIdsEqual {
                    common: 0xA,
                    local_current: 0xB,
                    peer_current: 0xC
                }
            }
        );
    }

    #[test]
    fn only_history_matching_is_split_brain_with_the_slots_named() {
        let (a, b) = (node(1, 0xB, 0x7, [0x5, 0x3]), node(2, 0xC, 0x8, [0x6, 0x5]));
        assert_eq!(
            decide(&a, &b),
            Decision::SplitBrain {
                evidence: SplitBrainEvidence::HistoryMatch {
                    common: 0x5,
                    local_slot: 0,
                    peer_slot: 1
                }
            }
        );
    }

    #[test]
    fn current_found_in_peer_history_is_a_full_sync_from_the_peer() {
        // The peer moved on twice without us: its bitmap no longer starts at our generation.
        let (a, b) = (node(1, 0xA, 0, [0, 0]), node(2, 0xC, 0xB, [0xA, 0]));
        assert_eq!(
            decide(&a, &b),
            Decision::FullSync {
                direction: PeerToLocal
            }
        );
        assert_eq!(
            decide(&b, &a),
            Decision::FullSync {
                direction: LocalToPeer
            }
        );
    }

    #[test]
    fn nothing_matching_is_unrelated_data() {
        let (a, b) = (node(1, 0xA, 0x1, [0x2, 0x3]), node(2, 0xB, 0x4, [0x5, 0x6]));
        assert_eq!(decide(&a, &b), Decision::UnrelatedData);
        // Zero bitmap / history slots never count as a match.
        let (a, b) = (node(1, 0xA, 0, [0, 0]), node(2, 0xB, 0, [0, 0]));
        assert_eq!(decide(&a, &b), Decision::UnrelatedData);
    }

    #[test]
    fn a_resync_whose_end_the_source_never_saw_acknowledged_converges_with_a_bitmap_resync() {
        // a (source, Primary) at X tracking since Y; b resynced from Y and adopted X, but a
        // lost the connection before the acknowledgement and began generation Z.
        let (x, y, z) = (0x1111, 0x2222, 0x3333);
        let mut a = GenIds {
            current: x,
            bitmap: y,
            history: [0x99, 0],
        };
        let mut b = GenIds {
            current: y,
            bitmap: 0,
            history: [0x99, 0],
        };
        b.resync_finished_as_target(&a, false);
        a.new_current(z);
        let d = decide(
            &node(0, a.current, a.bitmap, a.history),
            &node(1, b.current, b.bitmap, b.history),
        );
        assert_eq!(
            d,
            Decision::BitmapResync {
                direction: LocalToPeer
            },
            "{a:?} {b:?}"
        );
        // The same again: the second resync's end is lost too.
        b.resync_finished_as_target(&a, false);
        a.new_current(0x4444);
        let d = decide(
            &node(0, a.current, a.bitmap, a.history),
            &node(1, b.current, b.bitmap, b.history),
        );
        assert_eq!(
            d,
            Decision::BitmapResync {
                direction: LocalToPeer
            },
            "{a:?} {b:?}"
        );
    }

    #[test]
    fn an_old_generation_from_before_the_bitmap_still_needs_a_full_sync() {
        // b is at q, older than a's bitmap generation y: a's bitmap does not cover q..y.
        let (q, y, x) = (0x10, 0x20, 0x30);
        let a = node(0, x, y, [q, 0]);
        let b = node(1, q, 0, [0, 0]);
        assert_eq!(
            decide(&a, &b),
            Decision::FullSync {
                direction: LocalToPeer
            }
        );
    }

    #[test]
    fn resync_from_an_inconsistent_source_is_refused() {
        let (a, mut b) = (node(1, 0xA, 0, [0, 0]), node(2, 0xB, 0xA, [0, 0]));
        b.flags.set(DiskFlags::CONSISTENT, false);
        assert_eq!(
            decide(&a, &b),
            Decision::SourceInconsistent {
                direction: PeerToLocal
            }
        );
    }

    #[test]
    fn promotion_while_disconnected_then_resync_brings_both_back_to_no_resync() {
        let mut a = GenIds {
            current: 0xA,
            bitmap: 0,
            history: [0x9, 0x8],
        };
        let mut b = a;
        a.new_current(0xB);
        assert_eq!(
            a,
            GenIds {
                current: 0xB,
                bitmap: 0xA,
                history: [0x9, 0x8]
            }
        );
        let (na, nb) = (
            NodeGen {
                node_id: 1,
                ids: a,
                flags: OK,
            },
            NodeGen {
                node_id: 2,
                ids: b,
                flags: OK,
            },
        );
        assert_eq!(
            decide(&na, &nb),
            Decision::BitmapResync {
                direction: LocalToPeer
            }
        );
        let source_before = a;
        a.resync_finished_as_source();
        b.resync_finished_as_target(&source_before, false);
        assert_eq!(
            a,
            GenIds {
                current: 0xB,
                bitmap: 0,
                history: [0xA, 0x9]
            }
        );
        assert_eq!(
            b,
            GenIds {
                current: 0xB,
                bitmap: 0,
                history: [0xA, 0x9]
            }
        );
        let (na, nb) = (
            NodeGen {
                node_id: 1,
                ids: a,
                flags: OK,
            },
            NodeGen {
                node_id: 2,
                ids: b,
                flags: OK,
            },
        );
        assert_eq!(decide(&na, &nb), Decision::NoResync);
    }

    #[test]
    fn second_promotion_while_still_apart_keeps_the_bitmap_generation() {
        let mut a = GenIds {
            current: 0xA,
            bitmap: 0,
            history: [0, 0],
        };
        a.new_current(0xB);
        a.new_current(0xC);
        assert_eq!(
            a,
            GenIds {
                current: 0xC,
                bitmap: 0xA,
                history: [0xB, 0]
            }
        );
        // The peer still at 0xA gets a bitmap resync, not a full sync.
        let (na, nb) = (
            node(1, a.current, a.bitmap, a.history),
            node(2, 0xA, 0, [0, 0]),
        );
        assert_eq!(
            decide(&na, &nb),
            Decision::BitmapResync {
                direction: LocalToPeer
            }
        );
    }

    #[test]
    fn both_sides_promoted_while_apart_is_split_brain() {
        let mut a = GenIds {
            current: 0xA,
            bitmap: 0,
            history: [0, 0],
        };
        let mut b = a;
        a.new_current(0xB);
        b.new_current(0xC);
        let (na, nb) = (
            node(1, a.current, a.bitmap, a.history),
            node(2, b.current, b.bitmap, b.history),
        );
        assert!(matches!(
            decide(&na, &nb),
            Decision::SplitBrain {
                evidence: SplitBrainEvidence::BitmapIdsEqual { common: 0xA, .. }
            }
        ));
    }

    #[test]
    fn currents_in_each_others_history_are_split_brain_seen_alike_from_both_sides() {
        // Each side claims to have moved on from the other's current: neither may be the
        // source, and both nodes must name the same evidence (mirrored).
        let (a, b) = (node(1, 11, 0, [0, 12]), node(2, 12, 0, [0, 11]));
        let seen_by_a = decide(&a, &b);
        assert_eq!(
            seen_by_a,
            Decision::SplitBrain {
                evidence: SplitBrainEvidence::CurrentsCrossed {
                    local_current: 11,
                    peer_current: 12
                }
            }
        );
        assert_eq!(decide(&b, &a), seen_by_a.mirrored());
    }

    #[test]
    fn currents_equal_to_each_others_bitmap_are_split_brain_not_two_sources() {
        // Before the fix each side took rule 4 and named the other as the source.
        let (a, b) = (node(1, 0xA, 0xB, [0, 0]), node(2, 0xB, 0xA, [0, 0]));
        assert!(matches!(
            decide(&a, &b),
            Decision::SplitBrain {
                evidence: SplitBrainEvidence::CurrentsCrossed { .. }
            }
        ));
        assert_eq!(decide(&b, &a), decide(&a, &b).mirrored());
    }

    #[test]
    fn bitmap_evidence_one_way_and_history_evidence_the_other_way_is_split_brain() {
        // a's current is b's bitmap id (b ahead), b's current is in a's history (a ahead).
        let (a, b) = (node(1, 0xA, 0, [0xB, 0]), node(2, 0xB, 0xA, [0, 0]));
        assert!(matches!(
            decide(&a, &b),
            Decision::SplitBrain {
                evidence: SplitBrainEvidence::CurrentsCrossed { .. }
            }
        ));
        assert_eq!(decide(&b, &a), decide(&a, &b).mirrored());
    }

    #[test]
    fn history_match_reports_the_same_most_recent_ancestor_from_both_sides() {
        // Two common ids in crossed slots: both views must pick the same one.
        let (a, b) = (node(1, 0xB, 0x7, [0x5, 0x6]), node(2, 0xC, 0x8, [0x6, 0x5]));
        assert_eq!(
            decide(&a, &b),
            Decision::SplitBrain {
                evidence: SplitBrainEvidence::HistoryMatch {
                    common: 0x5,
                    local_slot: 0,
                    peer_slot: 1
                }
            }
        );
        assert_eq!(decide(&b, &a), decide(&a, &b).mirrored());
        // A match in both most recent slots beats an older one.
        let (a, b) = (node(1, 0xB, 0x7, [0x6, 0x5]), node(2, 0xC, 0x8, [0x6, 0x5]));
        assert!(matches!(
            decide(&a, &b),
            Decision::SplitBrain {
                evidence: SplitBrainEvidence::HistoryMatch {
                    common: 0x6,
                    local_slot: 0,
                    peer_slot: 0
                }
            }
        ));
    }

    #[test]
    fn equal_node_ids_are_refused_even_when_both_crashed_as_primary() {
        let (mut a, mut b) = (node(3, 0xA, 0, [0, 0]), node(3, 0xA, 0, [0, 0]));
        a.flags.set(DiskFlags::CRASHED_PRIMARY, true);
        b.flags.set(DiskFlags::CRASHED_PRIMARY, true);
        assert_eq!(decide(&a, &b), Decision::SameNodeId { node_id: 3 });
        assert_eq!(decide(&b, &a), Decision::SameNodeId { node_id: 3 });
    }

    #[test]
    fn zero_ids_never_match_a_bitmap_or_history() {
        let (a, b) = (node(1, 0, 0, [0, 0]), node(2, 0xB, 0, [0, 0]));
        assert_eq!(decide(&a, &b), Decision::UnrelatedData);
        assert_eq!(decide(&b, &a), Decision::UnrelatedData);
    }

    /// Ids from a small space (0, JUST_CREATED and four others) so both sides often share
    /// ids in every position; full 64-bit ids would almost never match.
    fn arb_node() -> impl proptest::strategy::Strategy<Value = NodeGen> {
        use proptest::prelude::*;
        let id = prop_oneof![Just(0u64), Just(JUST_CREATED), 10u64..14];
        (
            0u32..3,
            id.clone(),
            id.clone(),
            id.clone(),
            id,
            0u32..=DiskFlags::ALL,
        )
            .prop_map(|(node_id, current, bitmap, h0, h1, flags)| NodeGen {
                node_id,
                ids: GenIds {
                    current,
                    bitmap,
                    history: [h0, h1],
                },
                flags: DiskFlags(flags),
            })
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(20_000))]

        /// Each node decides from its own point of view; the two answers must be mirror
        /// images for every input, valid or not: never two sources, never two targets,
        /// never different evidence.
        #[test]
        fn decide_is_antisymmetric_for_all_inputs(a in arb_node(), b in arb_node()) {
            let ab = decide(&a, &b);
            proptest::prop_assert_eq!(decide(&b, &a), ab.mirrored());
            proptest::prop_assert_eq!(ab.mirrored().mirrored(), ab);
        }

        /// Full 64-bit ids (rarely matching): antisymmetry holds there too.
        #[test]
        fn decide_is_antisymmetric_for_random_ids(
            ia in proptest::array::uniform4(proptest::num::u64::ANY),
            ib in proptest::array::uniform4(proptest::num::u64::ANY),
            na in 0u32..3, nb in 0u32..3, fa in 0u32..64, fb in 0u32..64,
        ) {
            let mk = |n: u32, i: [u64; 4], f: u32| NodeGen {
                node_id: n,
                ids: GenIds { current: i[0], bitmap: i[1], history: [i[2], i[3]] },
                flags: DiskFlags(f),
            };
            let (a, b) = (mk(na, ia, fa), mk(nb, ib, fb));
            proptest::prop_assert_eq!(decide(&b, &a), decide(&a, &b).mirrored());
        }

        /// A resync is only ever decided from a Consistent source, and only between
        /// different generations or after a crash / an unfinished resync.
        #[test]
        fn resyncs_come_from_consistent_sources(a in arb_node(), b in arb_node()) {
            match decide(&a, &b) {
                Decision::BitmapResync { direction } | Decision::FullSync { direction } => {
                    let source = if direction == Direction::LocalToPeer { &a } else { &b };
                    proptest::prop_assert!(source.flags.has(DiskFlags::CONSISTENT));
                }
                Decision::NoResync => proptest::prop_assert_eq!(a.ids.current, b.ids.current),
                _ => {}
            }
        }
    }

    #[test]
    fn generation_ids_are_hex_strings_in_json() {
        let g = GenIds {
            current: u64::MAX - 1,
            bitmap: 0,
            history: [0xA, 0],
        };
        let j = serde_json::to_string(&g).unwrap();
        assert_eq!(
            j,
            r#"{"current":"fffffffffffffffe","bitmap":"0000000000000000","history":["000000000000000a","0000000000000000"]}"#
        );
        assert_eq!(serde_json::from_str::<GenIds>(&j).unwrap(), g);
        assert!(serde_json::from_str::<GenIds>(
            r#"{"current":"zz","bitmap":"0","history":["0","0"]}"#
        )
        .is_err());
    }

    #[test]
    fn random_ids_are_never_reserved_values() {
        for _ in 0..1000 {
            let v = random_id().unwrap();
            assert!(v != 0 && v != JUST_CREATED);
        }
    }
}
