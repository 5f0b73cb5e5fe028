//! What a connection does after the Hellos and bitmaps are exchanged: a pure function of both
//! sides' state and the split-brain policy. Both nodes compute it from the same inputs (their
//! own view and the peer's), so they agree without another round trip.

use crate::config::SplitBrainPolicy;
use crate::meta::gen::{self, Decision, Direction, NodeGen, SplitBrainEvidence};

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
    /// The two views of the generation ids disagree (each side's current generation is in the
    /// other's history): no side can be trusted as the source.
    Ambiguous,
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

/// The decision's kind and direction (seen from the other side when `swap`), without evidence.
fn shape(d: &Decision, swap: bool) -> (u8, Option<Direction>) {
    let dir = |x: Direction| {
        Some(match (x, swap) {
            (x, false) => x,
            (Direction::LocalToPeer, true) => Direction::PeerToLocal,
            (Direction::PeerToLocal, true) => Direction::LocalToPeer,
        })
    };
    match *d {
        Decision::NoResync => (0, None),
        Decision::BitmapResync { direction } => (1, dir(direction)),
        Decision::FullSync { direction } => (2, dir(direction)),
        Decision::InitialSyncPending => (3, None),
        Decision::SplitBrain {
            evidence: SplitBrainEvidence::BitmapIdsEqual { .. },
        } => (4, None),
        Decision::SplitBrain {
            evidence: SplitBrainEvidence::HistoryMatch { .. },
        } => (7, None),
        Decision::UnrelatedData => (5, None),
        Decision::SourceInconsistent { direction } => (6, dir(direction)),
    }
}

/// Decides for `local` meeting `peer` under `policy`.
pub fn plan(local: &Side, peer: &Side, policy: &SplitBrainPolicy) -> Plan {
    if local.primary && peer.primary {
        return Plan::Refuse(Refusal::BothPrimary);
    }
    let d = gen::decide(&local.gen, &peer.gen);
    // The peer runs the same decision with the roles swapped; act only when both views agree.
    if shape(&d, false) != shape(&gen::decide(&peer.gen, &local.gen), true) {
        return Plan::Refuse(Refusal::Ambiguous);
    }
    let p = match d {
        Decision::NoResync => Plan::InSync,
        Decision::InitialSyncPending => Plan::AwaitInitialSync,
        Decision::BitmapResync { direction } => direction_plan(direction, false),
        Decision::FullSync { direction } => direction_plan(direction, true),
        Decision::UnrelatedData => Plan::Refuse(Refusal::UnrelatedData),
        Decision::SourceInconsistent { .. } => Plan::Refuse(Refusal::SourceInconsistent),
        Decision::SplitBrain { evidence } => split_brain(local, peer, policy, evidence),
    };
    match &p {
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
    // With equal bitmap ids both bitmaps together cover every difference since the split;
    // when only history matches, nothing bounds the differences: copy everything.
    let full = matches!(evidence, SplitBrainEvidence::HistoryMatch { .. });
    let refuse = |hint: &str| {
        Plan::Refuse(Refusal::SplitBrain {
            evidence,
            hint: hint.into(),
        })
    };
    match policy {
        SplitBrainPolicy::Disconnect => refuse(
            "no data was copied; choose the copy to discard: set split_brain_policy = \"discard-node:<id>\" (or \"discard-zero-changes\") on both nodes, demote that node, and restart replication",
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
    use crate::meta::gen::{DiskFlags, GenIds};

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
        }
    }

    #[test]
    fn currents_in_each_others_history_are_refused_as_ambiguous() {
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
        assert_eq!(pa, Plan::Refuse(Refusal::Ambiguous));
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
