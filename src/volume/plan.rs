//! What a connection does after the Hellos and bitmaps are exchanged: a pure function of both
//! sides' state and the split-brain policy. Both nodes compute it from the same inputs (their
//! own view and the peer's), so they agree without another round trip.

use crate::config::SplitBrainPolicy;
use crate::meta::gen::{self, Decision, Direction, DiskFlags, NodeGen, SplitBrainEvidence};

/// One side as the plan sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Side {
    /// The node's `node.id`.
    pub name: String,
    /// Generation ids and flags.
    pub gen: NodeGen,
    /// Dirty chunks in its bitmap (changes the other side lacks, or may lack).
    pub dirty_chunks: u64,
    /// The node is Primary now.
    pub primary: bool,
    /// The node's disk is detached after a failure: its I/O goes through the peer.
    pub detached: bool,
}

/// Why a connection is refused; kept in the status until the next attempt.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case", tag = "refused")]
pub enum Refusal {
    /// Both sides wrote independently and the policy does not resolve it.
    SplitBrain {
        /// Which ids matched.
        evidence: SplitBrainEvidence,
        /// What the operator can do.
        hint: String,
    },
    /// The disks never belonged to the same volume.
    UnrelatedData,
    /// The resync source is itself inconsistent (an interrupted resync target).
    SourceInconsistent,
    /// The resync target is Primary: its data would change under its users.
    TargetIsPrimary {
        /// The node that would be overwritten.
        node: String,
    },
    /// Both sides are Primary.
    BothPrimary,
    /// Both sides carry the same node name or node id: a node never pairs with itself, and
    /// no tie-break could tell the two apart. Check `node.id` and `replication.peer_id`.
    SameNode {
        /// The name both sides reported.
        node: String,
    },
}

/// The outcome of the connect decision for this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Same data: replicate from now on.
    InSync,
    /// Both sides were just created and neither is Primary: wait for a promotion.
    AwaitInitialSync,
    /// This node copies to the peer.
    Source {
        /// Every block, not only the union of both bitmaps.
        full: bool,
    },
    /// The peer copies to this node.
    Target {
        /// Every block.
        full: bool,
    },
    /// No connection.
    Refuse(Refusal),
}

fn direction_plan(direction: Direction, full: bool) -> Plan {
    match direction {
        Direction::LocalToPeer => Plan::Source { full },
        Direction::PeerToLocal => Plan::Target { full },
    }
}

/// Decides for `local` meeting `peer` under `policy`.
///
/// Both nodes compute it, each from its own point of view; the answers always agree
/// (`plan(b, a)` is the mirror image of `plan(a, b)`: one Source and one Target with the same
/// `full`, or the same non-copying outcome), because [`gen::decide`] is antisymmetric and every
/// tie-break here depends only on the pair, not on which side asks. Further invariants: a
/// Primary is never a Target; a Source is Consistent; unrelated data, split brain under
/// `disconnect`, and two Primaries never copy anything; a bitmap (non-full) resync happens only
/// when a bitmap bounds the differences; nothing is copied to or from a detached node.
pub fn plan(local: &Side, peer: &Side, policy: &SplitBrainPolicy) -> Plan {
    if local.primary && peer.primary {
        return Plan::Refuse(Refusal::BothPrimary);
    }
    if local.name == peer.name {
        return Plan::Refuse(Refusal::SameNode {
            node: local.name.clone(),
        });
    }
    // A detached node has no disk to resync to or from: it only uses the peer's copy.
    if local.detached || peer.detached {
        return Plan::InSync;
    }
    let p = match gen::decide(&local.gen, &peer.gen) {
        Decision::NoResync => Plan::InSync,
        Decision::InitialSyncPending => Plan::AwaitInitialSync,
        Decision::BitmapResync { direction } => direction_plan(direction, false),
        Decision::FullSync { direction } => direction_plan(direction, true),
        Decision::UnrelatedData => Plan::Refuse(Refusal::UnrelatedData),
        Decision::SourceInconsistent { .. } => Plan::Refuse(Refusal::SourceInconsistent),
        Decision::SameNodeId { .. } => Plan::Refuse(Refusal::SameNode {
            node: local.name.clone(),
        }),
        Decision::SplitBrain { evidence } => split_brain(local, peer, policy, evidence),
    };
    match &p {
        // A split-brain policy may name an interrupted resync target as the survivor.
        Plan::Source { .. } if !local.gen.flags.has(DiskFlags::CONSISTENT) => {
            Plan::Refuse(Refusal::SourceInconsistent)
        }
        Plan::Target { .. } if !peer.gen.flags.has(DiskFlags::CONSISTENT) => {
            Plan::Refuse(Refusal::SourceInconsistent)
        }
        Plan::Target { .. } if local.primary => Plan::Refuse(Refusal::TargetIsPrimary {
            node: local.name.clone(),
        }),
        Plan::Source { .. } if peer.primary => Plan::Refuse(Refusal::TargetIsPrimary {
            node: peer.name.clone(),
        }),
        _ => p,
    }
}

fn split_brain(
    local: &Side,
    peer: &Side,
    policy: &SplitBrainPolicy,
    evidence: SplitBrainEvidence,
) -> Plan {
    // With equal bitmap ids both bitmaps together cover every difference since the split,
    // unless that common id is "just created" (two fresh disks, each promoted on its own:
    // they never shared data). Otherwise nothing bounds the differences: copy everything.
    let full = !matches!(
        evidence,
        SplitBrainEvidence::BitmapIdsEqual { common, .. } if common != gen::JUST_CREATED
    );
    let refuse = |hint: &str| {
        Plan::Refuse(Refusal::SplitBrain {
            evidence,
            hint: hint.into(),
        })
    };
    match policy {
        SplitBrainPolicy::Disconnect => refuse(
            "no data was copied; choose the copy to discard: on that node demote, then `twinvol resync --discard-local` (it is copied in full from the other), or set split_brain_policy = \"discard-node:<id>\" (or \"discard-zero-changes\") on both nodes and restart",
        ),
        SplitBrainPolicy::DiscardZeroChanges => {
            match (local.dirty_chunks == 0, peer.dirty_chunks == 0) {
                (true, false) => Plan::Target { full },
                (false, true) => Plan::Source { full },
                (true, true) => {
                    // Neither wrote: either copy will do; the lower name keeps its data.
                    if local.name < peer.name {
                        Plan::Source { full }
                    } else {
                        Plan::Target { full }
                    }
                }
                (false, false) => refuse(
                    "both nodes wrote since the split, so discard-zero-changes cannot choose; use discard-node:<id>",
                ),
            }
        }
        SplitBrainPolicy::DiscardNode(victim) => {
            if *victim == local.name {
                Plan::Target { full }
            } else if *victim == peer.name {
                Plan::Source { full }
            } else {
                refuse("split_brain_policy names neither node; fix discard-node:<id>")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::gen::GenIds;

    const OK: DiskFlags = DiskFlags(DiskFlags::CONSISTENT | DiskFlags::UP_TO_DATE);

    fn side(name: &str, id: u32, ids: GenIds, dirty: u64, primary: bool) -> Side {
        Side {
            name: name.into(),
            gen: NodeGen {
                node_id: id,
                ids,
                flags: OK,
            },
            dirty_chunks: dirty,
            primary,
            detached: false,
        }
    }

    fn split() -> (GenIds, GenIds) {
        let a = GenIds {
            current: 0xa1,
            bitmap: 0x50,
            history: [0, 0],
        };
        let b = GenIds {
            current: 0xb1,
            bitmap: 0x50,
            history: [0, 0],
        };
        (a, b)
    }

    /// Both views of the same meeting must agree: one Source, one Target, or both the same.
    fn agree(a: &Side, b: &Side, policy: &SplitBrainPolicy) -> (Plan, Plan) {
        let pa = plan(a, b, policy);
        let pb = plan(b, a, policy);
        match (&pa, &pb) {
            (Plan::Source { full: f1 }, Plan::Target { full: f2 })
            | (Plan::Target { full: f1 }, Plan::Source { full: f2 }) => assert_eq!(f1, f2),
            (Plan::InSync, Plan::InSync)
            | (Plan::AwaitInitialSync, Plan::AwaitInitialSync)
            | (Plan::Refuse(_), Plan::Refuse(_)) => {}
            _ => panic!("views disagree: {pa:?} vs {pb:?}"),
        }
        (pa, pb)
    }

    #[test]
    fn split_brain_with_disconnect_policy_refuses_and_copies_nothing() {
        let (a, b) = split();
        let (pa, _) = agree(
            &side("a", 0, a, 3, false),
            &side("b", 1, b, 2, false),
            &SplitBrainPolicy::Disconnect,
        );
        assert!(
            matches!(pa, Plan::Refuse(Refusal::SplitBrain { .. })),
            "{pa:?}"
        );
    }

    #[test]
    fn discard_zero_changes_makes_the_idle_side_the_target() {
        let (a, b) = split();
        let (pa, pb) = agree(
            &side("a", 0, a, 3, true),
            &side("b", 1, b, 0, false),
            &SplitBrainPolicy::DiscardZeroChanges,
        );
        assert_eq!(
            (pa, pb),
            (Plan::Source { full: false }, Plan::Target { full: false })
        );
    }

    #[test]
    fn discard_zero_changes_refuses_when_both_wrote() {
        let (a, b) = split();
        let (pa, _) = agree(
            &side("a", 0, a, 3, false),
            &side("b", 1, b, 1, false),
            &SplitBrainPolicy::DiscardZeroChanges,
        );
        assert!(matches!(pa, Plan::Refuse(Refusal::SplitBrain { .. })));
    }

    #[test]
    fn discard_node_makes_that_node_the_target() {
        let (a, b) = split();
        let pol = SplitBrainPolicy::DiscardNode("a".into());
        let (pa, pb) = agree(&side("a", 0, a, 3, false), &side("b", 1, b, 9, true), &pol);
        assert_eq!(
            (pa, pb),
            (Plan::Target { full: false }, Plan::Source { full: false })
        );
    }

    #[test]
    fn a_primary_is_never_made_a_resync_target() {
        let (a, b) = split();
        let pol = SplitBrainPolicy::DiscardNode("a".into());
        let (pa, _) = agree(&side("a", 0, a, 3, true), &side("b", 1, b, 9, false), &pol);
        assert_eq!(
            pa,
            Plan::Refuse(Refusal::TargetIsPrimary { node: "a".into() })
        );
    }

    #[test]
    fn primary_that_moved_on_resyncs_the_returning_secondary_by_bitmap() {
        let old = GenIds {
            current: 0x50,
            bitmap: 0,
            history: [0, 0],
        };
        let mut newer = old;
        newer.new_current(0x77);
        let (pa, pb) = agree(
            &side("a", 0, newer, 5, true),
            &side("b", 1, old, 0, false),
            &SplitBrainPolicy::Disconnect,
        );
        assert_eq!(
            (pa, pb),
            (Plan::Source { full: false }, Plan::Target { full: false })
        );
    }

    #[test]
    fn fresh_pair_waits_and_unrelated_data_refuses() {
        let (pa, _) = agree(
            &side("a", 0, GenIds::FRESH, 0, false),
            &side("b", 1, GenIds::FRESH, 0, false),
            &SplitBrainPolicy::Disconnect,
        );
        assert_eq!(pa, Plan::AwaitInitialSync);
        let x = GenIds {
            current: 0x11,
            bitmap: 0,
            history: [0, 0],
        };
        let y = GenIds {
            current: 0x22,
            bitmap: 0,
            history: [0, 0],
        };
        let (pa, _) = agree(
            &side("a", 0, x, 0, false),
            &side("b", 1, y, 0, false),
            &SplitBrainPolicy::DiscardNode("a".into()),
        );
        assert_eq!(pa, Plan::Refuse(Refusal::UnrelatedData));
    }

    fn arb_ids() -> impl proptest::strategy::Strategy<Value = GenIds> {
        use proptest::prelude::*;
        // A small id space so that matches between the two sides are frequent.
        let id = prop_oneof![Just(0u64), Just(crate::meta::gen::JUST_CREATED), 10u64..14];
        (id.clone(), id.clone(), id.clone(), id).prop_map(|(c, b, h0, h1)| GenIds {
            current: if c == 0 { 10 } else { c },
            bitmap: b,
            history: [h0, h1],
        })
    }

    proptest::proptest! {
        /// Both nodes compute the plan from their own point of view; they must always agree:
        /// one source and one target (same full/bitmap choice), or the same non-copying outcome.
        #[test]
        fn both_nodes_always_reach_the_same_plan(
            ia in arb_ids(), ib in arb_ids(),
            fa in 0u32..64, fb in 0u32..64,
            da in 0u64..3, db in 0u64..3,
            pa in proptest::bool::ANY, pb in proptest::bool::ANY,
            pol in 0u8..4,
        ) {
            let policy = match pol {
                0 => SplitBrainPolicy::Disconnect,
                1 => SplitBrainPolicy::DiscardZeroChanges,
                2 => SplitBrainPolicy::DiscardNode("a".into()),
                _ => SplitBrainPolicy::DiscardNode("b".into()),
            };
            let mut a = side("a", 0, ia, da, pa);
            a.gen.flags = DiskFlags(fa);
            let mut b = side("b", 1, ib, db, pb);
            b.gen.flags = DiskFlags(fb);
            let (plan_a, plan_b) = agree(&a, &b, &policy);
            // A Primary is never overwritten.
            let a_target = matches!(plan_a, Plan::Target { .. });
            proptest::prop_assert!(!(pa && a_target), "Primary a made a target");
            let b_target = matches!(plan_b, Plan::Target { .. });
            proptest::prop_assert!(!(pb && b_target), "Primary b made a target");
            // The source is always Consistent, whatever the policy chose.
            for (s, p) in [(&a, &plan_a), (&b, &plan_b)] {
                if matches!(p, Plan::Source { .. }) {
                    proptest::prop_assert!(s.gen.flags.has(DiskFlags::CONSISTENT));
                }
            }
            // Unrelated data and split brain under `disconnect` never copy anything.
            let d = gen::decide(&a.gen, &b.gen);
            let refuses = matches!(d, Decision::UnrelatedData)
                || (matches!(d, Decision::SplitBrain { .. }) && policy == SplitBrainPolicy::Disconnect);
            if refuses {
                proptest::prop_assert!(matches!(plan_a, Plan::Refuse(_)), "{:?} -> {:?}", d, plan_a);
            }
        }
    }

    #[test]
    fn currents_in_each_others_history_are_a_split_brain_the_policy_resolves_by_full_sync() {
        let a = GenIds {
            current: 11,
            bitmap: 0,
            history: [0, 12],
        };
        let b = GenIds {
            current: 12,
            bitmap: 0,
            history: [0, 11],
        };
        let (pa, _) = agree(
            &side("a", 0, a, 0, false),
            &side("b", 1, b, 0, false),
            &SplitBrainPolicy::Disconnect,
        );
        assert!(
            matches!(
                pa,
                Plan::Refuse(Refusal::SplitBrain {
                    evidence: SplitBrainEvidence::CurrentsCrossed {
                        local_current: 11,
                        peer_current: 12
                    },
                    ..
                })
            ),
            "{pa:?}"
        );
        // No bitmap bounds the differences: the operator's choice copies everything.
        let (pa, pb) = agree(
            &side("a", 0, a, 0, false),
            &side("b", 1, b, 0, false),
            &SplitBrainPolicy::DiscardNode("b".into()),
        );
        assert_eq!(
            (pa, pb),
            (Plan::Source { full: true }, Plan::Target { full: true })
        );
    }

    #[test]
    fn two_fresh_disks_promoted_apart_resolve_by_full_sync_not_bitmaps() {
        let (mut a, mut b) = (GenIds::FRESH, GenIds::FRESH);
        a.new_current(0x21);
        b.new_current(0x22);
        let (pa, pb) = agree(
            &side("a", 0, a, 1, false),
            &side("b", 1, b, 1, false),
            &SplitBrainPolicy::DiscardNode("a".into()),
        );
        assert_eq!(
            (pa, pb),
            (Plan::Target { full: true }, Plan::Source { full: true })
        );
    }

    #[test]
    fn a_node_never_pairs_with_itself() {
        let x = GenIds {
            current: 0x11,
            bitmap: 0,
            history: [0, 0],
        };
        let (pa, _) = agree(
            &side("a", 0, x, 0, false),
            &side("a", 1, x, 0, false),
            &SplitBrainPolicy::DiscardNode("a".into()),
        );
        assert_eq!(pa, Plan::Refuse(Refusal::SameNode { node: "a".into() }));
        let mut crashed = side("a", 7, x, 0, false);
        crashed.gen.flags.set(DiskFlags::CRASHED_PRIMARY, true);
        let mut other = side("b", 7, x, 0, false);
        other.gen.flags.set(DiskFlags::CRASHED_PRIMARY, true);
        let (pa, pb) = agree(&crashed, &other, &SplitBrainPolicy::Disconnect);
        assert_eq!(pa, Plan::Refuse(Refusal::SameNode { node: "a".into() }));
        assert_eq!(pb, Plan::Refuse(Refusal::SameNode { node: "b".into() }));
    }

    #[test]
    fn two_primaries_never_connect() {
        let x = GenIds {
            current: 0x11,
            bitmap: 0,
            history: [0, 0],
        };
        let (pa, _) = agree(
            &side("a", 0, x, 0, true),
            &side("b", 1, x, 0, true),
            &SplitBrainPolicy::Disconnect,
        );
        assert_eq!(pa, Plan::Refuse(Refusal::BothPrimary));
    }
}
