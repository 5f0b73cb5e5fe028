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
pub fn plan(local: &Side, peer: &Side, policy: &SplitBrainPolicy) -> Plan {
    if local.primary && peer.primary {
        return Plan::Refuse(Refusal::BothPrimary);
    }
    let p = match gen::decide(&local.gen, &peer.gen) {
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
