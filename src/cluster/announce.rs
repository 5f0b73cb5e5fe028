//! What this node's heartbeats carry besides its state: the round's sequence number, the
//! acknowledgement of the newest peer heartbeat processed here, and the bookkeeping of a
//! promotion announcement ([`FLAG_PROMOTING`]) until the peer acknowledges it. Pure: the
//! daemon's sender task and its control loop share one behind a mutex, and the two-node
//! model in `tests` drives two of them over a lossy, reordering network.
//!
//! Invariant: [`Announcer::intent_acked`] is true only when the peer's newest heartbeat
//! acknowledges a round of this incarnation that carried the promotion flag, sent after the
//! flag was last raised: the peer's control loop had processed the announcement before it
//! sent that heartbeat.

use super::heartbeat::{Ack, DiskState, Heartbeat, Role, FLAG_PROMOTING, VERSION, VERSION_1};
use super::liveness::PeerStatus;

/// One node's heartbeat sequence and acknowledgements.
#[derive(Debug, Clone)]
pub struct Announcer {
    node_id: String,
    priority: u16,
    incarnation: u64,
    seq: u64,
    /// The first round that carried [`FLAG_PROMOTING`] since the flag was last off.
    intent_from: Option<u64>,
    /// The newest peer heartbeat processed by the control loop.
    heard: Ack,
    /// The peer's heartbeat version (answered in kind).
    peer_version: u8,
}

impl Announcer {
    /// A sender for node `node_id` with a random `incarnation` (per daemon start).
    pub fn new(node_id: &str, priority: u16, incarnation: u64) -> Self {
        Self {
            node_id: node_id.to_string(),
            priority,
            incarnation,
            seq: 0,
            intent_from: None,
            heard: Ack::default(),
            peer_version: VERSION,
        }
    }

    /// This daemon's incarnation.
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// The heartbeat of the next round (path 0; the caller sets each path's index), carrying
    /// `role`, `disk`, `flags` and the acknowledgement of the newest peer heartbeat processed.
    pub fn next_round(&mut self, role: Role, disk: DiskState, flags: u8) -> Heartbeat {
        self.seq += 1;
        if flags & FLAG_PROMOTING != 0 {
            self.intent_from.get_or_insert(self.seq);
        } else {
            self.intent_from = None;
        }
        Heartbeat {
            node_id: self.node_id.clone(),
            path: 0,
            role,
            disk,
            flags,
            priority: self.priority,
            incarnation: self.incarnation,
            seq: self.seq,
            ack: self.heard,
            version: if self.peer_version == VERSION_1 {
                VERSION_1
            } else {
                VERSION
            },
        }
    }

    /// The control loop processed `hb`, the peer's newest heartbeat: the next rounds
    /// acknowledge it.
    pub fn heard(&mut self, hb: &Heartbeat) {
        self.heard = Ack {
            incarnation: hb.incarnation,
            seq: hb.seq,
        };
        self.peer_version = hb.version;
    }

    /// Whether `peer` (its newest heartbeat) acknowledges a round that announced this node's
    /// promotion. A version-1 peer acknowledges nothing: the announcement cannot be confirmed,
    /// and the promotion goes ahead as before the announcement existed.
    pub fn intent_acked(&self, peer: &PeerStatus) -> bool {
        if peer.version == VERSION_1 {
            return true;
        }
        match self.intent_from {
            Some(from) => peer.ack.incarnation == self.incarnation && peer.ack.seq >= from,
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::decide::{Action, Controller, Inputs, Params, WitnessView};
    use crate::cluster::liveness::{PeerMonitor, PeerView};
    use crate::config::cluster::{FenceMode, Switchback};
    use proptest::prelude::*;
    use std::time::Duration;

    fn peer(ack: Ack) -> PeerStatus {
        PeerStatus {
            role: Role::Secondary,
            disk: DiskState::UpToDate,
            priority: 20,
            yielding: false,
            wants_primary: false,
            promoting: false,
            cannot_promote: false,
            ack,
            version: VERSION,
        }
    }

    #[test]
    fn an_announcement_counts_as_heard_only_from_its_first_flagged_round_on() {
        let mut a = Announcer::new("a", 10, 77);
        a.next_round(Role::Secondary, DiskState::UpToDate, 0); // seq 1, no flag
        let flagged = a.next_round(Role::Secondary, DiskState::UpToDate, FLAG_PROMOTING); // 2
        assert_eq!(flagged.seq, 2);
        let ack = |seq| Ack {
            incarnation: 77,
            seq,
        };
        assert!(
            !a.intent_acked(&peer(ack(1))),
            "an older round says nothing"
        );
        assert!(a.intent_acked(&peer(ack(2))));
        assert!(
            !a.intent_acked(&peer(Ack {
                incarnation: 5,
                seq: 2
            })),
            "an acknowledgement of another incarnation"
        );
        // Withdrawn, then announced again: only the new announcement counts.
        a.next_round(Role::Secondary, DiskState::UpToDate, 0); // 3
        a.next_round(Role::Secondary, DiskState::UpToDate, FLAG_PROMOTING); // 4
        assert!(!a.intent_acked(&peer(ack(3))));
        assert!(a.intent_acked(&peer(ack(4))));
    }

    #[test]
    fn a_version_1_peer_is_answered_in_version_1() {
        let mut a = Announcer::new("a", 10, 1);
        let mut old = a.next_round(Role::Primary, DiskState::UpToDate, 0);
        old.version = VERSION_1;
        a.heard(&old);
        assert_eq!(
            a.next_round(Role::Secondary, DiskState::UpToDate, 0)
                .version,
            VERSION_1
        );
    }

    /// One daemon of the model: its decisions, heartbeats, view of the peer and state.
    struct Node {
        c: Controller,
        ann: Announcer,
        mon: PeerMonitor,
        role: Role,
        disk: DiskState,
    }

    impl Node {
        fn new(priority: u16, peer_priority: u16, incarnation: u64, disk: DiskState) -> Self {
            let p = Params {
                priority,
                peer_priority,
                fence: FenceMode::Cloud,
                fence_delay: Duration::from_secs(3),
                fence_retry: Duration::from_secs(5),
                isolation_grace: Duration::from_secs(10),
                switchback: Switchback::Intelligent,
            };
            Self {
                c: Controller::new(p),
                ann: Announcer::new(&format!("n{priority}"), priority, incarnation),
                // A timeout longer than any run: the peer stays alive, the race is about
                // decisions on heartbeats that are late, reordered or lost.
                mon: PeerMonitor::new(1, Duration::from_secs(1_000_000)),
                role: Role::Secondary,
                disk,
            }
        }

        fn send(&mut self) -> Heartbeat {
            let flags = if self.c.promoting() {
                FLAG_PROMOTING
            } else {
                0
            };
            self.ann.next_round(self.role, self.disk, flags)
        }

        fn receive(&mut self, now: Duration, hb: &Heartbeat) {
            self.mon.on_heartbeat(now, 0, hb);
            if self.mon.is_newest(hb) {
                self.ann.heard(hb);
            }
        }

        fn tick(&mut self, now: Duration) {
            let peer = self.mon.view();
            let acked = match peer {
                PeerView::Alive(s) => self.ann.intent_acked(&s),
                _ => false,
            };
            let i = Inputs {
                now,
                role: self.role,
                disk: self.disk,
                peer,
                witness: WitnessView::Reachable,
                heard_since_start: self.mon.heard_since_start(),
                newest: None,
                link_connected: false,
                intent_acked: acked,
                copies_compared: true,
            };
            match self.c.decide(i) {
                Action::Promote => {
                    self.role = Role::Primary;
                    self.c.promotion_done();
                }
                Action::Demote => self.role = Role::Secondary,
                _ => {}
            }
        }
    }

    /// Runs the model: each step (a byte of `script`) sends a round, delivers or drops an
    /// in-flight datagram (any of them: the network reorders), ticks a node, brings a node's
    /// copy up to date (a resync finished) or asks for an operator promotion. Returns the
    /// step at which both nodes were Primary, if any.
    fn run(script: &[u8], disks: [DiskState; 2]) -> Option<usize> {
        let mut n = [
            Node::new(10, 20, 1001, disks[0]),
            Node::new(20, 10, 2002, disks[1]),
        ];
        // Both have heard each other once.
        for (from, to) in [(0, 1), (1, 0)] {
            let hb = n[from].send();
            n[to].receive(Duration::ZERO, &hb);
        }
        let mut net: Vec<(usize, Heartbeat)> = Vec::new();
        let mut now = Duration::ZERO;
        for (step, b) in script.iter().enumerate() {
            now += Duration::from_millis(10);
            let who = usize::from(b & 1);
            match (b >> 1) % 6 {
                0 => {
                    let hb = n[who].send();
                    net.push((1 - who, hb));
                }
                1 if !net.is_empty() => {
                    let (to, hb) = net.remove(usize::from(b >> 4) % net.len());
                    n[to].receive(now, &hb);
                }
                2 if !net.is_empty() => {
                    net.remove(usize::from(b >> 4) % net.len());
                }
                3 => n[who].tick(now),
                4 => n[who].disk = DiskState::UpToDate,
                5 if b >> 7 == 1 => n[who].c.request_promotion(false),
                _ => n[who].tick(now),
            }
            if n[0].role == Role::Primary && n[1].role == Role::Primary {
                return Some(step);
            }
        }
        None
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]
        #[test]
        fn two_secondaries_deciding_on_late_or_lost_heartbeats_never_both_promote(
            script in proptest::collection::vec(any::<u8>(), 1..300),
            a_disk in 0u8..3, b_disk in 0u8..3,
        ) {
            let d = |x: u8| [DiskState::UpToDate, DiskState::Outdated, DiskState::Inconsistent][x as usize];
            prop_assert_eq!(run(&script, [d(a_disk), d(b_disk)]), None);
        }
    }

    #[test]
    fn the_race_the_announcement_closes_is_reachable_in_the_model() {
        // node-a (preferred) is Outdated when node-b decides to take the service; node-a
        // becomes UpToDate before node-b's next heartbeat reaches it. Without the
        // announcement both would promote (each on the other's last heartbeat); with it
        // node-a has heard node-b's announcement and does not announce one of its own.
        let mut n = [
            Node::new(10, 20, 1001, DiskState::Outdated),
            Node::new(20, 10, 2002, DiskState::UpToDate),
        ];
        for (from, to) in [(0, 1), (1, 0)] {
            let hb = n[from].send();
            n[to].receive(Duration::ZERO, &hb);
        }
        let t = Duration::from_millis(10);
        n[1].tick(t); // b announces
        assert!(n[1].c.promoting());
        let hb = n[1].send();
        n[0].receive(t, &hb);
        n[0].disk = DiskState::UpToDate;
        n[0].tick(t);
        assert!(!n[0].c.promoting(), "a heard b's announcement first");
        // Without the announcement, node-a (preferred, now UpToDate, b's last heartbeat says
        // Secondary) would promote here while node-b promotes on a's old Outdated heartbeat.
        // With it: rounds go on until one is Primary, never both.
        for round in 0..20 {
            for (from, to) in [(0, 1), (1, 0)] {
                let hb = n[from].send();
                n[to].receive(t, &hb);
            }
            n[0].tick(t);
            n[1].tick(t);
            assert!(
                !(n[0].role == Role::Primary && n[1].role == Role::Primary),
                "both Primary in round {round}"
            );
            if n[0].role == Role::Primary || n[1].role == Role::Primary {
                // node-b saw node-a UpToDate and preferred, withdrew; node-a then announced.
                assert_eq!(n[0].role, Role::Primary, "the preferred node takes it");
                return;
            }
        }
        panic!("nobody promoted in 20 rounds");
    }
}
