//! Per-path liveness and the peer's state, as pure state machines over a caller-given clock
//! (`now` is the time since the daemon started), so they are tested with a fake clock.
//!
//! Invariants: a path is up only while a heartbeat arrived on it within the timeout; the peer
//! is lost exactly when every path is down (or, at start-up, when none was ever up within
//! the timeout); a replayed or stale sequence number on a path is ignored; within one
//! incarnation of the peer, its state is that of its newest heartbeat on any path, so a
//! datagram delayed on one path never rolls it back.
//!
//! Incarnations are random, so they cannot be ordered: a heartbeat of an incarnation other
//! than the current one always counts (the peer restarted). Refusing "earlier" incarnations
//! would let one replayed datagram of an incarnation this monitor never saw retire the real
//! one, whose heartbeats would then be refused: a forged peer loss, worse than the stale
//! state (for at most one heartbeat interval) it would prevent.

use std::time::Duration;

use super::heartbeat::{
    Ack, DiskState, Heartbeat, Role, FLAG_CANNOT_PROMOTE, FLAG_PROMOTING, FLAG_WANTS_PRIMARY,
    FLAG_YIELDING,
};

/// What the last heartbeat said about the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct PeerStatus {
    /// Its role.
    pub role: Role,
    /// Its disk state.
    pub disk: DiskState,
    /// Its priority.
    pub priority: u16,
    /// It stands down for us.
    pub yielding: bool,
    /// It asks us to hand over.
    pub wants_primary: bool,
    /// It announced that it is about to promote.
    pub promoting: bool,
    /// It will not promote whatever it hears (stopping, or cut off from this node).
    pub cannot_promote: bool,
    /// The newest heartbeat of ours it had received when it sent this one.
    #[serde(skip)]
    pub ack: Ack,
    /// Its heartbeat version (1: it sends no acknowledgements).
    pub version: u8,
}

/// The peer as the heartbeats show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum PeerView {
    /// At least one path is up.
    Alive(PeerStatus),
    /// No path up since start-up, and the start-up timeout has not run out.
    Unknown,
    /// Every path is down (or none ever came up within the timeout).
    Lost,
}

/// A change worth a log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A path came up.
    PathUp(usize),
    /// A path went down while others stay up: a warning.
    PathDown(usize),
    /// The first path came up (peer found or back).
    PeerFound,
    /// The last path went down or none came up within the timeout.
    PeerLost,
    /// A heartbeat came from the incarnation the current one replaced: two processes send
    /// heartbeats as the peer (or an old datagram was replayed). Reported, never acted on.
    TwoSenders {
        /// The incarnation heard before.
        earlier: u64,
        /// The current one.
        current: u64,
    },
}

/// One path's state.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct PathState {
    /// Last valid heartbeat, time since start.
    #[serde(skip)]
    pub last_rx: Option<Duration>,
    /// Whether the path is up.
    pub up: bool,
    /// Valid heartbeats received.
    pub received: u64,
    /// Datagrams refused (bad MAC, wrong node, stale sequence).
    pub refused: u64,
    #[serde(skip)]
    last: Option<(u64, u64)>,
}

/// The peer monitor over all paths.
#[derive(Debug, Clone)]
pub struct PeerMonitor {
    paths: Vec<PathState>,
    timeout: Duration,
    last_status: Option<PeerStatus>,
    /// `(incarnation, seq)` of the heartbeat `last_status` came from: the newest seen.
    status_from: Option<(u64, u64)>,
    lost: bool,
    ever_found: bool,
    /// The incarnation the current one replaced.
    retired: Option<u64>,
}

impl PeerMonitor {
    /// A monitor of `paths` paths, all down, with the given timeout.
    pub fn new(paths: usize, timeout: Duration) -> Self {
        Self {
            paths: vec![PathState::default(); paths],
            timeout,
            last_status: None,
            status_from: None,
            lost: false,
            ever_found: false,
            retired: None,
        }
    }

    /// Whether a valid heartbeat of the peer arrived since this monitor started (the
    /// start-up gate: a node that never heard its peer neither fences nor promotes on its own).
    pub fn heard_since_start(&self) -> bool {
        self.ever_found
    }

    /// Counts a refused datagram on `path`.
    pub fn refused(&mut self, path: usize) {
        if let Some(p) = self.paths.get_mut(path) {
            p.refused += 1;
        }
    }

    /// Feeds a verified heartbeat from the peer received on `path`; returns the events.
    /// A sequence number not above the last one of the same incarnation on that path is a
    /// replay and is ignored. A heartbeat older than one another path delivered keeps its
    /// path up but leaves the peer's state as is.
    pub fn on_heartbeat(&mut self, now: Duration, path: usize, hb: &Heartbeat) -> Vec<Event> {
        let mut ev = Vec::new();
        let Some(p) = self.paths.get_mut(path) else {
            return ev;
        };
        if let Some((inc, seq)) = p.last {
            if inc == hb.incarnation && hb.seq <= seq {
                p.refused += 1;
                return ev;
            }
        }
        p.last = Some((hb.incarnation, hb.seq));
        p.last_rx = Some(now);
        p.received += 1;
        let was_up = p.up;
        p.up = true;
        let newest = match self.status_from {
            Some((inc, seq)) if inc == hb.incarnation => hb.seq > seq,
            // First heartbeat, or the peer restarted (see the module doc).
            _ => true,
        };
        if let Some((inc, _)) = self.status_from {
            if inc != hb.incarnation {
                if self.retired == Some(hb.incarnation) {
                    ev.push(Event::TwoSenders {
                        earlier: hb.incarnation,
                        current: inc,
                    });
                }
                self.retired = Some(inc);
            }
        }
        if newest {
            self.status_from = Some((hb.incarnation, hb.seq));
            self.last_status = Some(PeerStatus {
                role: hb.role,
                disk: hb.disk,
                priority: hb.priority,
                yielding: hb.flags & FLAG_YIELDING != 0,
                wants_primary: hb.flags & FLAG_WANTS_PRIMARY != 0,
                promoting: hb.flags & FLAG_PROMOTING != 0,
                cannot_promote: hb.flags & FLAG_CANNOT_PROMOTE != 0,
                ack: hb.ack,
                version: hb.version,
            });
        }
        if !was_up {
            ev.push(Event::PathUp(path));
            if self.lost || !self.ever_found {
                ev.push(Event::PeerFound);
            }
            self.lost = false;
            self.ever_found = true;
        }
        ev
    }

    /// Advances the clock: paths without a heartbeat within the timeout go down.
    pub fn tick(&mut self, now: Duration) -> Vec<Event> {
        let mut ev = Vec::new();
        for (i, p) in self.paths.iter_mut().enumerate() {
            if p.up
                && p.last_rx
                    .is_none_or(|t| now.saturating_sub(t) >= self.timeout)
            {
                p.up = false;
                ev.push(Event::PathDown(i));
            }
        }
        let any_up = self.paths.iter().any(|p| p.up);
        if !any_up && !self.lost && (self.ever_found || now >= self.timeout) {
            self.lost = true;
            ev.push(Event::PeerLost);
        }
        ev
    }

    /// Whether `hb` (already fed to [`PeerMonitor::on_heartbeat`]) is the heartbeat the peer's
    /// state now comes from, the newest seen on any path: a datagram delayed on one path,
    /// older than what another path already delivered, is not (its state is stale).
    pub fn is_newest(&self, hb: &Heartbeat) -> bool {
        self.status_from == Some((hb.incarnation, hb.seq))
    }

    /// The peer as of the last tick.
    pub fn view(&self) -> PeerView {
        match (self.paths.iter().any(|p| p.up), self.lost, self.last_status) {
            (true, _, Some(s)) => PeerView::Alive(s),
            (_, true, _) => PeerView::Lost,
            _ => PeerView::Unknown,
        }
    }

    /// The per-path states, in configuration order.
    pub fn paths(&self) -> &[PathState] {
        &self.paths
    }

    /// Number of paths down while the peer is alive (the warning count).
    pub fn paths_down(&self) -> usize {
        self.paths.iter().filter(|p| !p.up).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(5);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn hb(seq: u64, path: u8) -> Heartbeat {
        Heartbeat {
            node_id: "b".into(),
            path,
            role: Role::Primary,
            disk: DiskState::UpToDate,
            flags: 0,
            priority: 20,
            incarnation: 7,
            seq,
            ack: Ack::default(),
            version: crate::cluster::heartbeat::VERSION,
        }
    }

    #[test]
    fn an_incarnation_heard_again_after_it_was_replaced_is_reported_as_two_senders() {
        let mut m = PeerMonitor::new(1, T);
        m.on_heartbeat(ms(0), 0, &hb(1, 0));
        let mut other = hb(1, 0);
        other.incarnation = 99;
        assert!(!m
            .on_heartbeat(ms(10), 0, &other)
            .iter()
            .any(|e| matches!(e, Event::TwoSenders { .. })));
        let ev = m.on_heartbeat(ms(20), 0, &hb(2, 0));
        assert!(
            ev.contains(&Event::TwoSenders {
                earlier: 7,
                current: 99
            }),
            "{ev:?}"
        );
    }

    #[test]
    fn a_heartbeat_older_than_one_another_path_delivered_is_not_the_newest() {
        let mut m = PeerMonitor::new(2, T);
        m.on_heartbeat(Duration::ZERO, 0, &hb(10, 0));
        assert!(m.is_newest(&hb(10, 0)));
        // Path 1 delivers round 8 late: accepted on its path, but older than round 10.
        m.on_heartbeat(Duration::ZERO, 1, &hb(8, 1));
        assert!(!m.is_newest(&hb(8, 1)));
        m.on_heartbeat(Duration::ZERO, 1, &hb(11, 1));
        assert!(m.is_newest(&hb(11, 1)));
        // A new incarnation (the peer restarted) starts its own count.
        let mut fresh = hb(1, 0);
        fresh.incarnation = 8;
        m.on_heartbeat(Duration::ZERO, 0, &fresh);
        assert!(m.is_newest(&fresh));
    }

    #[test]
    fn peer_is_unknown_until_the_startup_timeout_then_lost() {
        let mut m = PeerMonitor::new(2, T);
        assert!(m.tick(ms(4_999)).is_empty());
        assert_eq!(m.view(), PeerView::Unknown);
        assert_eq!(m.tick(ms(5_000)), vec![Event::PeerLost]);
        assert_eq!(m.view(), PeerView::Lost);
    }

    #[test]
    fn one_path_down_is_a_warning_and_the_peer_stays_alive() {
        let mut m = PeerMonitor::new(2, T);
        let ev = m.on_heartbeat(ms(100), 0, &hb(1, 0));
        assert_eq!(ev, vec![Event::PathUp(0), Event::PeerFound]);
        m.on_heartbeat(ms(100), 1, &hb(1, 1));
        for s in 2..10u64 {
            m.on_heartbeat(ms(s * 1000), 0, &hb(s, 0)); // path 1 silent from now on
        }
        let ev = m.tick(ms(9_000));
        assert_eq!(ev, vec![Event::PathDown(1)]);
        assert!(matches!(m.view(), PeerView::Alive(_)));
        assert_eq!(m.paths_down(), 1);
    }

    #[test]
    fn all_paths_down_for_the_timeout_loses_the_peer_and_a_heartbeat_finds_it_again() {
        let mut m = PeerMonitor::new(2, T);
        m.on_heartbeat(ms(1000), 0, &hb(1, 0));
        m.on_heartbeat(ms(1000), 1, &hb(1, 1));
        assert!(m.tick(ms(5_999)).is_empty());
        let ev = m.tick(ms(6_000));
        assert_eq!(
            ev,
            vec![Event::PathDown(0), Event::PathDown(1), Event::PeerLost]
        );
        assert_eq!(m.view(), PeerView::Lost);
        let ev = m.on_heartbeat(ms(7_000), 1, &hb(2, 1));
        assert_eq!(ev, vec![Event::PathUp(1), Event::PeerFound]);
        assert!(matches!(m.view(), PeerView::Alive(_)));
    }

    #[test]
    fn replayed_sequence_numbers_do_not_keep_a_path_up() {
        let mut m = PeerMonitor::new(2, T);
        m.on_heartbeat(ms(0), 0, &hb(5, 0));
        // An attacker replays the captured datagram later: refused, the path times out.
        assert!(m.on_heartbeat(ms(4_000), 0, &hb(5, 0)).is_empty());
        assert_eq!(m.paths()[0].refused, 1);
        let ev = m.tick(ms(5_000));
        assert!(ev.contains(&Event::PathDown(0)) && ev.contains(&Event::PeerLost));
    }

    #[test]
    fn a_heartbeat_delayed_on_one_path_does_not_roll_the_peers_state_back() {
        let mut m = PeerMonitor::new(2, T);
        let mut now = hb(10, 0);
        now.role = Role::Secondary;
        now.disk = DiskState::Outdated;
        m.on_heartbeat(ms(0), 0, &now);
        // Round 8, sent while the peer was still Primary and UpToDate, arrives late on path 1.
        let ev = m.on_heartbeat(ms(10), 1, &hb(8, 1));
        assert_eq!(ev, vec![Event::PathUp(1)], "the path itself is alive");
        let PeerView::Alive(s) = m.view() else {
            panic!("peer not alive: {:?}", m.view())
        };
        assert_eq!((s.role, s.disk), (Role::Secondary, DiskState::Outdated));
        // The next round on path 1 is newer and counts.
        m.on_heartbeat(ms(20), 1, &hb(11, 1));
        let PeerView::Alive(s) = m.view() else {
            panic!("peer not alive")
        };
        assert_eq!((s.role, s.disk), (Role::Primary, DiskState::UpToDate));
    }

    #[test]
    fn a_restarted_peer_with_a_new_incarnation_is_accepted_from_sequence_one() {
        let mut m = PeerMonitor::new(2, T);
        m.on_heartbeat(ms(0), 0, &hb(500, 0));
        let mut h = hb(1, 0);
        h.incarnation = 8;
        h.role = Role::Secondary;
        m.on_heartbeat(ms(1000), 0, &h);
        assert_eq!(m.paths()[0].received, 2);
        // Its state counts at once, although its sequence number is far below the old one's.
        let PeerView::Alive(s) = m.view() else {
            panic!("peer not alive")
        };
        assert_eq!(s.role, Role::Secondary);
        assert!(m.is_newest(&h));
    }
}
