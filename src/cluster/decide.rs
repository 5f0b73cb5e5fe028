//! The node's failover decisions as a pure state machine: inputs are the local role and disk
//! state, the peer as the heartbeats show it, the witness result and the time; outputs are
//! one [`Action`] and a sentence saying why.
//!
//! Invariants:
//! - A Secondary promotes only when its disk is UpToDate (or the operator forces it) and
//!   either the peer is alive and not Primary (and stands down, is less preferred, or the
//!   operator asked) and has acknowledged this node's promotion announcement without
//!   announcing one of its own first, or the peer is lost, this node is not isolated, and it
//!   has proof the peer is down (the peer was fenced, or with `fence = "off"` the cloud
//!   reports the peer instance stopped).
//! - Start-up gate: a node that has not heard its peer since it started neither fences nor
//!   promotes on its own unless its own metadata proves its copy is the newest
//!   ([`NewestProof`]); then it promotes without fencing the peer it never heard.
//! - Never fences while a replication link to the peer is connected (the peer is alive).
//! - An isolated node (no witness reachable and no peer heartbeat) never promotes; an
//!   isolated Primary demotes after the isolation grace.
//! - Only a non-isolated node fences, and only a Secondary fences. The less-preferred node
//!   waits `fence_delay` first, unless the peer was last seen Primary (a Primary never
//!   fences, so no race is possible and the standby fences at once).
//! - Of two Primaries that see each other, the less-preferred one demotes at once.
//! - Of two Secondaries that announce a promotion at the same time, the less-preferred one
//!   withdraws; a node that has heard the peer's announcement announces none of its own.

use std::time::Duration;

use super::heartbeat::{DiskState, Role};
use super::liveness::PeerView;
use crate::config::cluster::{FenceMode, Switchback};
pub use crate::volume::NewestProof;

/// What the witness probes last said.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum WitnessView {
    /// No witness is configured: never isolated.
    Disabled,
    /// No probe round finished yet.
    Unknown,
    /// At least one target answered 2xx/3xx in the last round.
    Reachable,
    /// No target answered since this time (time since start).
    Unreachable {
        /// When the first failing round ended.
        #[serde(skip)]
        since: Duration,
    },
}

/// Fixed parameters of this node.
#[derive(Debug, Clone)]
pub struct Params {
    /// This node's priority (lower preferred).
    pub priority: u16,
    /// The peer's configured priority.
    pub peer_priority: u16,
    /// Fencing mode.
    pub fence: FenceMode,
    /// Wait of the less-preferred node before fencing.
    pub fence_delay: Duration,
    /// Wait after a failed fencing before trying again.
    pub fence_retry: Duration,
    /// An isolated Primary demotes after this long.
    pub isolation_grace: Duration,
    /// Switchback policy.
    pub switchback: Switchback,
}

/// Progress of fencing the peer.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "state", content = "detail", rename_all = "kebab-case")]
pub enum FenceState {
    /// Nothing under way.
    Idle,
    /// The less-preferred node waits until this time before fencing.
    Waiting(#[serde(skip)] Duration),
    /// The provider is stopping the peer.
    InProgress,
    /// The peer is stopped: proof for promotion.
    Fenced,
    /// `fence = "off"`: the provider is asked whether the peer instance is stopped.
    Querying,
    /// `fence = "off"`: the provider reported the peer instance stopped (how): proof.
    PeerStopped(String),
    /// The last attempt failed; retried after `fence_retry`.
    Failed(String, #[serde(skip)] Duration),
}

/// What the daemon must do now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Nothing.
    None,
    /// Ask the cloud provider to fence the peer, then report with [`Controller::fence_done`].
    Fence,
    /// Ask the cloud provider whether the peer instance is stopped (no change made), then
    /// report with [`Controller::peer_instance_done`].
    QueryPeer,
    /// Bring the service up here.
    Promote,
    /// Take the service down here.
    Demote,
}

/// Everything one decision looks at.
#[derive(Debug, Clone, Copy)]
pub struct Inputs {
    /// Time since start.
    pub now: Duration,
    /// Local role.
    pub role: Role,
    /// Local disk state.
    pub disk: DiskState,
    /// The peer.
    pub peer: PeerView,
    /// The witness.
    pub witness: WitnessView,
    /// The peer was heard at least once since this daemon started.
    pub heard_since_start: bool,
    /// This node's metadata proves its copy is the newest (every mirrored volume's does).
    pub newest: Option<NewestProof>,
    /// A replication link to the peer is connected: the peer's process is alive.
    pub link_connected: bool,
    /// The peer's newest heartbeat acknowledged one of ours that announced this node's
    /// promotion ([`Controller::promoting`]); always true for a peer too old to acknowledge.
    pub intent_acked: bool,
    /// Every mirrored volume's replication link is connected, so both copies were compared
    /// (a copy behind the peer's is then a resync target, not UpToDate); true without
    /// mirrored volumes.
    pub copies_compared: bool,
}

/// The decision state of one node.
#[derive(Debug, Clone)]
pub struct Controller {
    p: Params,
    fence: FenceState,
    /// Set by operator demote/switchover: stand down for the peer, do not take the service
    /// back while the peer is alive.
    yielding: bool,
    /// Set by operator switchover on a Secondary: ask the Primary to hand over.
    wants_primary: bool,
    reason: String,
    /// The peer's role in its last heartbeat.
    last_peer_role: Option<Role>,
    /// This node announces that it is about to promote (heartbeat flag).
    promoting: bool,
    /// The operator asked for a promotion while the peer is alive (`force`: accept a disk
    /// that is not UpToDate).
    operator_promote: Option<bool>,
}

impl Controller {
    /// A controller with nothing under way.
    pub fn new(p: Params) -> Self {
        Self {
            p,
            fence: FenceState::Idle,
            yielding: false,
            wants_primary: false,
            reason: "starting".into(),
            last_peer_role: None,
            promoting: false,
            operator_promote: None,
        }
    }

    /// Whether this node announces a promotion (heartbeat flag).
    pub fn promoting(&self) -> bool {
        self.promoting
    }

    /// Operator promote while the peer is alive as a Secondary: the promotion goes through the
    /// announcement like any other, ahead of the preference order.
    pub fn request_promotion(&mut self, force: bool) {
        self.yielding = false;
        self.operator_promote = Some(force);
    }

    /// Whether an operator promotion is pending.
    pub fn promotion_requested(&self) -> bool {
        self.operator_promote.is_some()
    }

    /// Whether the pending promotion is an operator's `promote --force` (the bring-up then
    /// accepts a disk that is not UpToDate).
    pub fn promotion_forced(&self) -> bool {
        self.operator_promote == Some(true)
    }

    /// Why the last decision was taken (for status).
    pub fn reason(&self) -> &str {
        &self.reason
    }
    /// Fencing progress.
    pub fn fence_state(&self) -> &FenceState {
        &self.fence
    }
    /// Whether this node stands down for the peer (heartbeat flag).
    pub fn yielding(&self) -> bool {
        self.yielding
    }
    /// Whether this node asks the peer to hand over (heartbeat flag).
    pub fn wants_primary(&self) -> bool {
        self.wants_primary
    }

    /// Operator demote or switchover on the Primary: stand down and let the peer take over.
    pub fn stand_down(&mut self) {
        self.yielding = true;
        self.wants_primary = false;
        self.promoting = false;
        self.operator_promote = None;
    }
    /// Operator switchover on the Secondary: ask the Primary to hand over.
    pub fn request_handover(&mut self) {
        self.yielding = false;
        self.wants_primary = true;
    }
    /// Operator promote (or a completed promotion): no longer standing down.
    pub fn clear_operator_flags(&mut self) {
        self.yielding = false;
        self.wants_primary = false;
    }

    /// The provider finished fencing: `Ok` = peer stopped (proof), `Err` = why not.
    pub fn fence_done(&mut self, now: Duration, result: Result<(), String>) {
        self.fence = match result {
            Ok(()) => FenceState::Fenced,
            Err(why) => FenceState::Failed(why, now),
        };
    }

    /// The provider answered whether the peer instance is stopped. Ignored unless a query is
    /// under way (the peer came back meanwhile: a late answer is no proof).
    pub fn peer_instance_done(&mut self, now: Duration, answer: crate::cloud::PeerInstance) {
        use crate::cloud::PeerInstance;
        if self.fence != FenceState::Querying {
            return;
        }
        self.fence = match answer {
            PeerInstance::Stopped(how) => FenceState::PeerStopped(how),
            PeerInstance::Running(what) => FenceState::Failed(what, now),
            PeerInstance::Unknown(why) => FenceState::Failed(format!("unknown: {why}"), now),
        };
    }

    /// A promotion finished (either way): the fencing proof and the announcement are used up.
    pub fn promotion_done(&mut self) {
        self.fence = FenceState::Idle;
        self.wants_primary = false;
        self.promoting = false;
        self.operator_promote = None;
    }

    /// Takes back a promotion announcement (and a pending operator request, whose reason is
    /// then the decision's).
    fn withdraw(&mut self) {
        self.promoting = false;
    }

    fn isolated(&self, i: &Inputs) -> Option<Duration> {
        match (i.peer, i.witness) {
            (PeerView::Alive(_), _) => None,
            (_, WitnessView::Unreachable { since }) => Some(i.now.saturating_sub(since)),
            (_, WitnessView::Unknown) => Some(Duration::ZERO),
            _ => None,
        }
    }

    fn say(&mut self, a: Action, why: impl Into<String>) -> Action {
        self.reason = why.into();
        a
    }

    /// Decides what to do now.
    pub fn decide(&mut self, i: Inputs) -> Action {
        if let PeerView::Alive(st) = i.peer {
            self.last_peer_role = Some(st.role);
            // A stand-down (operator demote or switchover, a failed bring-up, check or disk,
            // automatic switchback) has done its work once the peer serves: this node is an
            // ordinary standby again, which takes over if the peer stands down in turn.
            if st.role == Role::Primary && i.role == Role::Secondary {
                self.yielding = false;
            }
            // A fence under way finishes (its answer is kept); any other proof or query
            // is void once the peer is heard again.
            if !matches!(self.fence, FenceState::InProgress) {
                self.fence = FenceState::Idle;
            }
        }
        let preferred = self.p.priority < self.p.peer_priority;
        match i.role {
            Role::Primary => self.decide_primary(i, preferred),
            Role::Secondary => self.decide_secondary(i, preferred),
        }
    }

    fn decide_primary(&mut self, i: Inputs, preferred: bool) -> Action {
        if let Some(for_how_long) = self.isolated(&i) {
            if for_how_long >= self.p.isolation_grace {
                return self.say(
                    Action::Demote,
                    format!(
                        "isolated: no heartbeat and no witness reachable for {} ms (grace {} ms): stopping the service here",
                        for_how_long.as_millis(),
                        self.p.isolation_grace.as_millis()
                    ),
                );
            }
            if matches!(i.witness, WitnessView::Unreachable { .. }) {
                return self.say(
                    Action::None,
                    format!(
                        "Primary; peer lost and witness unreachable for {} ms: will stand down after {} ms",
                        for_how_long.as_millis(),
                        self.p.isolation_grace.as_millis()
                    ),
                );
            }
        }
        match i.peer {
            PeerView::Alive(s) if s.role == Role::Primary => {
                if preferred {
                    self.say(
                        Action::None,
                        "both nodes Primary: the peer is less preferred and must stand down",
                    )
                } else {
                    self.say(
                        Action::Demote,
                        "both nodes Primary: this node is less preferred and stands down",
                    )
                }
            }
            PeerView::Alive(s) if s.wants_primary && s.disk == DiskState::UpToDate => {
                self.yielding = true;
                self.say(
                    Action::Demote,
                    "switchover requested by the peer: handing over",
                )
            }
            PeerView::Alive(s)
                if self.p.switchback == Switchback::Automatic
                    && s.priority < self.p.priority
                    && s.disk == DiskState::UpToDate
                    && !s.yielding =>
            {
                self.yielding = true;
                self.say(
                    Action::Demote,
                    "automatic switchback: the preferred node is back and UpToDate",
                )
            }
            PeerView::Alive(_) => self.say(Action::None, "Primary; peer alive as Secondary"),
            PeerView::Unknown => {
                self.say(Action::None, "Primary; waiting for the peer's heartbeat")
            }
            PeerView::Lost => self.say(Action::None, "Primary; peer lost, this node keeps serving"),
        }
    }

    fn decide_secondary(&mut self, i: Inputs, preferred: bool) -> Action {
        let forced = self.operator_promote == Some(true);
        if i.disk != DiskState::UpToDate && !forced {
            self.withdraw();
            return self.say(
                Action::None,
                format!(
                    "Secondary; disk is {:?}: promotion only with `twinvol promote --force`",
                    i.disk
                ),
            );
        }
        match i.peer {
            PeerView::Alive(s) => {
                if s.role == Role::Primary {
                    self.withdraw();
                    self.operator_promote = None;
                    if self.wants_primary {
                        return self.say(
                            Action::None,
                            "Secondary; switchover asked, waiting for the peer to hand over",
                        );
                    }
                    return self.say(Action::None, "Secondary; peer is Primary");
                }
                if self.yielding {
                    self.withdraw();
                    return self.say(Action::None, "Secondary; standing down by operator request (run `twinvol promote` to take the service)");
                }
                // The peer announced first (this node had not announced when it heard it), or
                // both announced at once and the peer is preferred: it takes the service.
                if s.promoting && !(self.promoting && preferred) {
                    self.withdraw();
                    self.operator_promote = None;
                    return self.say(
                        Action::None,
                        "Secondary; the peer announced its promotion: it takes the service",
                    );
                }
                let why = if self.operator_promote.is_some() {
                    "operator promote"
                } else if s.yielding {
                    "both Secondary and the peer stands down: taking the service"
                } else if s.disk != DiskState::UpToDate {
                    "both Secondary and only this node is UpToDate: taking the service"
                } else if preferred {
                    "both Secondary: this node is preferred"
                } else {
                    self.withdraw();
                    return self.say(
                        Action::None,
                        "Secondary; both Secondary, the preferred peer takes the service",
                    );
                };
                // Both say UpToDate, but only the replication link's comparison of the
                // generations tells which copy is newer (after a double failure the peer may
                // have served after this node): unless this node's metadata proves it newest,
                // or the operator forces it, wait until every copy is compared.
                if !i.copies_compared
                    && i.newest.is_none()
                    && s.disk == DiskState::UpToDate
                    && !forced
                {
                    self.withdraw();
                    return self.say(
                        Action::None,
                        format!(
                            "{why}; waiting for the replication link to compare both copies first"
                        ),
                    );
                }
                self.announce_then_promote(i, why, s.cannot_promote)
            }
            PeerView::Unknown => {
                self.withdraw();
                self.say(Action::None, "Secondary; waiting for the peer's heartbeat")
            }
            PeerView::Lost => {
                self.withdraw();
                self.peer_lost(i, preferred)
            }
        }
    }

    /// A promotion while the peer is alive: first announced in the heartbeats, carried out
    /// once the peer's heartbeat acknowledges the announcement (the peer then knows, and does
    /// not promote itself: two decisions on stale heartbeats cannot both go through). A peer
    /// that says it cannot promote (stopping, or cut off: it may never hear the announcement)
    /// is not waited for; the announcement still goes out, so that a peer that changes its
    /// mind meanwhile hears it, or sees this node Primary, before it acts.
    fn announce_then_promote(&mut self, i: Inputs, why: &str, peer_cannot_promote: bool) -> Action {
        if peer_cannot_promote {
            self.promoting = true;
            return self.say(
                Action::Promote,
                format!("{why}; the peer says it cannot promote"),
            );
        }
        if !self.promoting {
            self.promoting = true;
            return self.say(
                Action::None,
                format!("{why}; announcing the promotion to the peer first"),
            );
        }
        if !i.intent_acked {
            return self.say(
                Action::None,
                format!("{why}; promotion announced, waiting for the peer to acknowledge it"),
            );
        }
        self.say(Action::Promote, format!("{why}; the peer acknowledged"))
    }

    fn peer_lost(&mut self, i: Inputs, preferred: bool) -> Action {
        if self.isolated(&i).is_some() {
            return self.say(
                Action::None,
                "Secondary; peer lost but no witness is reachable: this node may be the isolated one and will not promote",
            );
        }
        if i.link_connected {
            self.fence = FenceState::Idle;
            return self.say(
                Action::None,
                "Secondary; no heartbeat on any path, but the replication link to the peer is connected: the peer is alive, so it is neither fenced nor replaced (check the heartbeat paths)",
            );
        }
        if !i.heard_since_start {
            return self.gate(i);
        }
        if self.p.fence == FenceMode::Off {
            return self.peer_lost_without_fencing(i);
        }
        match self.fence.clone() {
            FenceState::Idle if preferred || self.last_peer_role == Some(Role::Primary) => {
                self.fence = FenceState::InProgress;
                self.say(Action::Fence, "peer lost: fencing it before promotion")
            }
            FenceState::Idle => {
                self.fence = FenceState::Waiting(i.now + self.p.fence_delay);
                self.say(
                    Action::None,
                    format!(
                        "peer lost: this node is less preferred and waits {} ms before fencing",
                        self.p.fence_delay.as_millis()
                    ),
                )
            }
            FenceState::Waiting(until) if i.now >= until => {
                self.fence = FenceState::InProgress;
                self.say(Action::Fence, "peer lost: fence delay over, fencing it before promotion")
            }
            FenceState::Waiting(_) => self.say(Action::None, "peer lost: waiting the fence delay"),
            FenceState::InProgress => self.say(Action::None, "peer lost: fencing under way"),
            FenceState::Fenced => self.say(Action::Promote, "peer fenced: promoting"),
            FenceState::Failed(why, at) if i.now.saturating_sub(at) >= self.p.fence_retry => {
                self.fence = FenceState::InProgress;
                self.say(Action::Fence, format!("retrying fencing (last attempt: {why})"))
            }
            FenceState::Failed(why, _) => self.say(
                Action::None,
                format!("Secondary; fencing the peer failed ({why}): no proof the peer is down, not promoting"),
            ),
            FenceState::Querying | FenceState::PeerStopped(_) => {
                // Left over from a `fence = "off"` query: fence as usual.
                self.fence = FenceState::Idle;
                self.say(Action::None, "peer lost: fencing starts at the next decision")
            }
        }
    }

    /// The start-up gate: the peer was never heard since this daemon started. Without proof
    /// that this copy is the newest, wait; with it, promote, without fencing a peer this node
    /// never heard (`fence = "off"` still asks the cloud first).
    fn gate(&mut self, i: Inputs) -> Action {
        match i.newest {
            None => self.say(
                Action::None,
                "Secondary; waiting for the peer (start-up gate): not heard since this daemon started, and this copy may lack writes the peer acknowledged. Start the peer; or, after checking that it is down and holds nothing newer, run `twinvol promote --force`",
            ),
            Some(proof) if self.p.fence == FenceMode::Off => {
                let a = self.peer_lost_without_fencing(i);
                if a == Action::Promote {
                    self.say(
                        Action::Promote,
                        format!("peer never heard since start, reported stopped, and this copy is the newest ({proof}): promoting"),
                    )
                } else {
                    a
                }
            }
            Some(proof) => self.say(
                Action::Promote,
                format!("peer never heard since start and this copy is the newest ({proof}): promoting without fencing a peer this node never heard"),
            ),
        }
    }

    /// `fence = "off"`: the only proof is the provider reporting the peer instance stopped.
    fn peer_lost_without_fencing(&mut self, i: Inputs) -> Action {
        match self.fence.clone() {
            FenceState::PeerStopped(how) => self.say(
                Action::Promote,
                format!("peer instance reported stopped ({how}): promoting"),
            ),
            FenceState::Fenced => self.say(Action::Promote, "peer stopped: promoting"),
            FenceState::Querying => self.say(
                Action::None,
                "peer lost, fence = \"off\": asking the cloud whether the peer instance is stopped",
            ),
            FenceState::Failed(what, at) if i.now.saturating_sub(at) < self.p.fence_retry => {
                self.say(
                    Action::None,
                    format!("Secondary; peer lost but fence = \"off\" and no proof it is down ({what}); asking again shortly, or check it and run `twinvol promote --force`"),
                )
            }
            _ => {
                self.fence = FenceState::Querying;
                self.say(
                    Action::QueryPeer,
                    "peer lost, fence = \"off\": asking the cloud whether the peer instance is stopped",
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::liveness::PeerStatus;

    fn params(priority: u16) -> Params {
        Params {
            priority,
            peer_priority: if priority == 10 { 20 } else { 10 },
            fence: FenceMode::Cloud,
            fence_delay: Duration::from_secs(3),
            fence_retry: Duration::from_secs(5),
            isolation_grace: Duration::from_secs(10),
            switchback: Switchback::Intelligent,
        }
    }

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn status(role: Role, priority: u16) -> PeerStatus {
        PeerStatus {
            role,
            disk: DiskState::UpToDate,
            priority,
            yielding: false,
            wants_primary: false,
            promoting: false,
            cannot_promote: false,
            ack: Default::default(),
            version: crate::cluster::heartbeat::VERSION,
        }
    }

    fn alive(role: Role, priority: u16) -> PeerView {
        PeerView::Alive(status(role, priority))
    }

    /// Inputs of a node that has heard its peer since start, holds no newest-copy proof, has
    /// no replication link up, and whose promotion announcements are acknowledged at once.
    fn inputs(now: u64, role: Role, peer: PeerView, witness: WitnessView) -> Inputs {
        Inputs {
            now: s(now),
            role,
            disk: DiskState::UpToDate,
            peer,
            witness,
            heard_since_start: true,
            newest: None,
            link_connected: false,
            intent_acked: true,
            copies_compared: true,
        }
    }

    /// Decides twice (announce, then act on the acknowledgement) and returns the second.
    fn decide_acked(c: &mut Controller, i: Inputs) -> Action {
        let first = c.decide(i);
        if first != Action::None || !c.promoting() {
            return first;
        }
        c.decide(i)
    }

    #[test]
    fn standby_with_a_live_primary_peer_stays_secondary() {
        let mut c = Controller::new(params(10));
        let a = c.decide(inputs(
            1,
            Role::Secondary,
            alive(Role::Primary, 20),
            WitnessView::Reachable,
        ));
        assert_eq!(a, Action::None);
        assert!(c.reason().contains("peer is Primary"));
    }

    #[test]
    fn lost_peer_is_fenced_then_the_standby_promotes() {
        let mut c = Controller::new(params(10));
        let i = inputs(6, Role::Secondary, PeerView::Lost, WitnessView::Reachable);
        assert_eq!(c.decide(i), Action::Fence);
        assert_eq!(
            c.decide(i),
            Action::None,
            "no second fence while one is under way"
        );
        c.fence_done(s(7), Ok(()));
        assert_eq!(
            c.decide(inputs(
                7,
                Role::Secondary,
                PeerView::Lost,
                WitnessView::Reachable
            )),
            Action::Promote
        );
    }

    #[test]
    fn standby_of_a_lost_primary_fences_at_once_even_when_less_preferred() {
        let mut c = Controller::new(params(20));
        let i = inputs(
            1,
            Role::Secondary,
            alive(Role::Primary, 10),
            WitnessView::Reachable,
        );
        assert_eq!(c.decide(i), Action::None);
        let lost = inputs(5, Role::Secondary, PeerView::Lost, WitnessView::Reachable);
        assert_eq!(
            c.decide(lost),
            Action::Fence,
            "a Primary never fences, so there is no race to guard"
        );
    }

    #[test]
    fn less_preferred_node_waits_the_fence_delay_before_fencing() {
        let mut c = Controller::new(params(20));
        assert_eq!(
            c.decide(inputs(
                6,
                Role::Secondary,
                PeerView::Lost,
                WitnessView::Reachable
            )),
            Action::None
        );
        assert!(c.reason().contains("waits 3000 ms"), "{}", c.reason());
        assert_eq!(
            c.decide(inputs(
                8,
                Role::Secondary,
                PeerView::Lost,
                WitnessView::Reachable
            )),
            Action::None
        );
        assert_eq!(
            c.decide(inputs(
                9,
                Role::Secondary,
                PeerView::Lost,
                WitnessView::Reachable
            )),
            Action::Fence
        );
    }

    #[test]
    fn fence_race_only_the_preferred_node_fences_when_both_lose_each_other() {
        let mut a = Controller::new(params(10));
        let mut b = Controller::new(params(20));
        let lost = |c: &mut Controller, t| {
            c.decide(inputs(
                t,
                Role::Secondary,
                PeerView::Lost,
                WitnessView::Reachable,
            ))
        };
        assert_eq!(lost(&mut a, 5), Action::Fence);
        assert_eq!(lost(&mut b, 5), Action::None);
        // A's fencing stops B within the delay; had B's heartbeat returned, B resets.
        assert_eq!(
            b.decide(inputs(
                6,
                Role::Secondary,
                alive(Role::Primary, 10),
                WitnessView::Reachable
            )),
            Action::None
        );
        assert_eq!(b.fence_state(), &FenceState::Idle);
    }

    #[test]
    fn isolated_standby_never_promotes_and_never_fences() {
        let mut c = Controller::new(params(10));
        for t in 5..100 {
            let a = c.decide(inputs(
                t,
                Role::Secondary,
                PeerView::Lost,
                WitnessView::Unreachable { since: s(5) },
            ));
            assert_eq!(a, Action::None);
        }
        assert!(c.reason().contains("isolated"), "{}", c.reason());
    }

    #[test]
    fn isolated_primary_demotes_after_the_grace() {
        let mut c = Controller::new(params(10));
        let w = WitnessView::Unreachable { since: s(10) };
        assert_eq!(
            c.decide(inputs(19, Role::Primary, PeerView::Lost, w)),
            Action::None
        );
        assert_eq!(
            c.decide(inputs(20, Role::Primary, PeerView::Lost, w)),
            Action::Demote
        );
        assert!(c.reason().contains("isolated"));
    }

    #[test]
    fn primary_with_a_live_peer_keeps_serving_when_only_the_witness_is_down() {
        let mut c = Controller::new(params(10));
        let w = WitnessView::Unreachable { since: s(0) };
        assert_eq!(
            c.decide(inputs(100, Role::Primary, alive(Role::Secondary, 20), w)),
            Action::None
        );
    }

    #[test]
    fn fence_off_means_no_promotion_without_proof() {
        use crate::cloud::PeerInstance;
        let mut p = params(10);
        p.fence = FenceMode::Off;
        let mut c = Controller::new(p);
        let lost = |c: &mut Controller, t| {
            c.decide(inputs(
                t,
                Role::Secondary,
                PeerView::Lost,
                WitnessView::Reachable,
            ))
        };
        assert_eq!(lost(&mut c, 9), Action::QueryPeer, "{}", c.reason());
        assert_eq!(lost(&mut c, 9), Action::None, "one query at a time");
        c.peer_instance_done(
            s(9),
            PeerInstance::Running("instance i-b is running".into()),
        );
        assert_eq!(lost(&mut c, 10), Action::None);
        assert!(c.reason().contains("no proof"), "{}", c.reason());
        assert!(c.reason().contains("i-b is running"), "{}", c.reason());
        // Asked again after the retry interval; an unknown answer is no proof either.
        assert_eq!(lost(&mut c, 15), Action::QueryPeer);
        c.peer_instance_done(s(15), PeerInstance::Unknown("timeout".into()));
        assert_eq!(lost(&mut c, 16), Action::None);
        assert_eq!(lost(&mut c, 21), Action::QueryPeer);
        c.peer_instance_done(
            s(21),
            PeerInstance::Stopped("instance i-b is stopped".into()),
        );
        assert_eq!(lost(&mut c, 21), Action::Promote, "stopped is proof");
        assert!(c.reason().contains("reported stopped"), "{}", c.reason());
    }

    #[test]
    fn a_late_peer_stopped_answer_after_the_peer_returned_is_no_proof() {
        use crate::cloud::PeerInstance;
        let mut p = params(10);
        p.fence = FenceMode::Off;
        let mut c = Controller::new(p);
        assert_eq!(
            c.decide(inputs(
                9,
                Role::Secondary,
                PeerView::Lost,
                WitnessView::Reachable
            )),
            Action::QueryPeer
        );
        // The peer is heard again before the answer arrives.
        c.decide(inputs(
            10,
            Role::Secondary,
            alive(Role::Primary, 20),
            WitnessView::Reachable,
        ));
        c.peer_instance_done(s(10), PeerInstance::Stopped("stale".into()));
        assert_eq!(c.fence_state(), &FenceState::Idle);
        assert_eq!(
            c.decide(inputs(
                14,
                Role::Secondary,
                PeerView::Lost,
                WitnessView::Reachable
            )),
            Action::QueryPeer,
            "a fresh query, not the stale answer"
        );
    }

    #[test]
    fn failed_fencing_blocks_promotion_and_is_retried() {
        let mut c = Controller::new(params(10));
        assert_eq!(
            c.decide(inputs(
                6,
                Role::Secondary,
                PeerView::Lost,
                WitnessView::Reachable
            )),
            Action::Fence
        );
        c.fence_done(s(7), Err("pid file unreadable".into()));
        assert_eq!(
            c.decide(inputs(
                8,
                Role::Secondary,
                PeerView::Lost,
                WitnessView::Reachable
            )),
            Action::None
        );
        assert!(c.reason().contains("pid file unreadable"));
        assert_eq!(
            c.decide(inputs(
                12,
                Role::Secondary,
                PeerView::Lost,
                WitnessView::Reachable
            )),
            Action::Fence
        );
    }

    #[test]
    fn two_primaries_the_less_preferred_stands_down() {
        let mut a = Controller::new(params(10));
        let mut b = Controller::new(params(20));
        assert_eq!(
            a.decide(inputs(
                1,
                Role::Primary,
                alive(Role::Primary, 20),
                WitnessView::Reachable
            )),
            Action::None
        );
        assert_eq!(
            b.decide(inputs(
                1,
                Role::Primary,
                alive(Role::Primary, 10),
                WitnessView::Reachable
            )),
            Action::Demote
        );
    }

    #[test]
    fn both_secondary_the_preferred_node_promotes() {
        let mut a = Controller::new(params(10));
        let mut b = Controller::new(params(20));
        assert_eq!(
            decide_acked(
                &mut a,
                inputs(
                    1,
                    Role::Secondary,
                    alive(Role::Secondary, 20),
                    WitnessView::Reachable
                )
            ),
            Action::Promote
        );
        assert_eq!(
            decide_acked(
                &mut b,
                inputs(
                    1,
                    Role::Secondary,
                    alive(Role::Secondary, 10),
                    WitnessView::Reachable
                )
            ),
            Action::None
        );
    }

    #[test]
    fn intelligent_switchback_stays_put_automatic_moves_back() {
        let mut b = Controller::new(params(20));
        assert_eq!(
            b.decide(inputs(
                1,
                Role::Primary,
                alive(Role::Secondary, 10),
                WitnessView::Reachable
            )),
            Action::None
        );
        let mut p = params(20);
        p.switchback = Switchback::Automatic;
        let mut b = Controller::new(p);
        assert_eq!(
            b.decide(inputs(
                1,
                Role::Primary,
                alive(Role::Secondary, 10),
                WitnessView::Reachable
            )),
            Action::Demote
        );
        assert!(
            b.yielding(),
            "the node that moved back does not grab the service again"
        );
    }

    #[test]
    fn operator_demote_makes_the_preferred_node_stand_down_for_the_peer() {
        let mut a = Controller::new(params(10));
        a.stand_down();
        assert_eq!(
            a.decide(inputs(
                1,
                Role::Secondary,
                alive(Role::Secondary, 20),
                WitnessView::Reachable
            )),
            Action::None
        );
        let mut b = Controller::new(params(20));
        let yielding_a = PeerView::Alive(PeerStatus {
            yielding: true,
            ..status(Role::Secondary, 10)
        });
        assert_eq!(
            decide_acked(
                &mut b,
                inputs(1, Role::Secondary, yielding_a, WitnessView::Reachable)
            ),
            Action::Promote
        );
    }

    #[test]
    fn switchover_from_the_standby_makes_the_primary_hand_over() {
        let mut a = Controller::new(params(10));
        let wants = PeerView::Alive(PeerStatus {
            wants_primary: true,
            ..status(Role::Secondary, 20)
        });
        assert_eq!(
            a.decide(inputs(1, Role::Primary, wants, WitnessView::Reachable)),
            Action::Demote
        );
        assert!(a.yielding());
    }

    #[test]
    fn inconsistent_disk_never_promotes_on_its_own() {
        let mut c = Controller::new(params(10));
        let mut i = inputs(9, Role::Secondary, PeerView::Lost, WitnessView::Reachable);
        i.disk = DiskState::Inconsistent;
        assert_eq!(c.decide(i), Action::None);
        assert!(c.reason().contains("--force"));
    }

    fn never_heard(now: u64) -> Inputs {
        Inputs {
            heard_since_start: false,
            ..inputs(now, Role::Secondary, PeerView::Lost, WitnessView::Reachable)
        }
    }

    #[test]
    fn a_node_that_never_heard_its_peer_neither_fences_nor_promotes_without_proof() {
        for priority in [10, 20] {
            let mut c = Controller::new(params(priority));
            for t in 5..60 {
                assert_eq!(c.decide(never_heard(t)), Action::None);
            }
            assert_eq!(c.fence_state(), &FenceState::Idle, "never fenced");
            assert!(c.reason().contains("start-up gate"), "{}", c.reason());
            assert!(c.reason().contains("promote --force"), "{}", c.reason());
        }
    }

    #[test]
    fn a_node_whose_metadata_proves_it_newest_promotes_alone_without_fencing() {
        for proof in [NewestProof::PrimaryAtCleanStop, NewestProof::PeerOutdated] {
            let mut c = Controller::new(params(20));
            let i = Inputs {
                newest: Some(proof),
                ..never_heard(5)
            };
            assert_eq!(c.decide(i), Action::Promote, "{proof:?}");
            assert_eq!(
                c.fence_state(),
                &FenceState::Idle,
                "no fence of a peer never heard"
            );
            assert!(c.reason().contains("newest"), "{}", c.reason());
        }
    }

    #[test]
    fn with_fence_off_a_proven_newest_node_still_asks_whether_the_peer_is_stopped() {
        use crate::cloud::PeerInstance;
        let mut p = params(10);
        p.fence = FenceMode::Off;
        let mut c = Controller::new(p);
        let i = Inputs {
            newest: Some(NewestProof::PeerOutdated),
            ..never_heard(5)
        };
        assert_eq!(c.decide(i), Action::QueryPeer);
        c.peer_instance_done(s(5), PeerInstance::Stopped("stopped".into()));
        assert_eq!(c.decide(i), Action::Promote);
    }

    #[test]
    fn a_peer_heard_once_since_start_is_fenced_as_before_when_lost() {
        let mut c = Controller::new(params(10));
        assert_eq!(
            c.decide(inputs(
                9,
                Role::Secondary,
                PeerView::Lost,
                WitnessView::Reachable
            )),
            Action::Fence
        );
    }

    #[test]
    fn a_connected_replication_link_is_proof_of_life_and_nothing_is_fenced() {
        let mut c = Controller::new(params(10));
        let i = Inputs {
            link_connected: true,
            ..inputs(9, Role::Secondary, PeerView::Lost, WitnessView::Reachable)
        };
        for _ in 0..5 {
            assert_eq!(c.decide(i), Action::None);
        }
        assert!(c.reason().contains("replication link"), "{}", c.reason());
        assert_eq!(c.fence_state(), &FenceState::Idle);
    }

    #[test]
    fn a_promotion_waits_for_the_peer_to_acknowledge_its_announcement() {
        let mut c = Controller::new(params(10));
        let mut i = inputs(
            1,
            Role::Secondary,
            alive(Role::Secondary, 20),
            WitnessView::Reachable,
        );
        i.intent_acked = false;
        assert_eq!(c.decide(i), Action::None);
        assert!(c.promoting(), "announced");
        assert_eq!(c.decide(i), Action::None, "not before the acknowledgement");
        assert!(c.reason().contains("acknowledge"), "{}", c.reason());
        i.intent_acked = true;
        assert_eq!(c.decide(i), Action::Promote);
    }

    #[test]
    fn a_node_that_heard_the_peers_announcement_does_not_announce_its_own() {
        let mut a = Controller::new(params(10));
        let b_promoting = PeerView::Alive(PeerStatus {
            promoting: true,
            ..status(Role::Secondary, 20)
        });
        let i = inputs(1, Role::Secondary, b_promoting, WitnessView::Reachable);
        assert_eq!(decide_acked(&mut a, i), Action::None);
        assert!(
            !a.promoting(),
            "even the preferred node lets the first announcer go"
        );
        assert!(a.reason().contains("announced"), "{}", a.reason());
    }

    #[test]
    fn of_two_simultaneous_announcements_the_less_preferred_withdraws() {
        let mut a = Controller::new(params(10));
        let mut b = Controller::new(params(20));
        let quiet = |p| {
            inputs(
                1,
                Role::Secondary,
                alive(Role::Secondary, p),
                WitnessView::Reachable,
            )
        };
        // Both announce before hearing the other.
        let mut ib = quiet(10);
        ib.peer = PeerView::Alive(PeerStatus {
            disk: DiskState::Outdated,
            ..status(Role::Secondary, 10)
        });
        ib.intent_acked = false;
        let mut ia = quiet(20);
        ia.intent_acked = false;
        assert_eq!(a.decide(ia), Action::None);
        assert_eq!(b.decide(ib), Action::None);
        assert!(a.promoting() && b.promoting());
        // Each hears the other's announcement.
        let promoting = |p| {
            PeerView::Alive(PeerStatus {
                promoting: true,
                ..status(Role::Secondary, p)
            })
        };
        ia.peer = promoting(20);
        ia.intent_acked = true;
        ib.peer = promoting(10);
        ib.intent_acked = true;
        assert_eq!(b.decide(ib), Action::None);
        assert!(!b.promoting(), "the less preferred withdraws");
        assert_eq!(a.decide(ia), Action::Promote);
    }

    #[test]
    fn an_operator_promotion_with_the_peer_alive_goes_through_the_announcement() {
        let mut b = Controller::new(params(20));
        b.request_promotion(false);
        let i = inputs(
            1,
            Role::Secondary,
            alive(Role::Secondary, 10),
            WitnessView::Reachable,
        );
        assert_eq!(decide_acked(&mut b, i), Action::Promote, "{}", b.reason());
        assert!(b.reason().contains("operator"), "{}", b.reason());
    }
}

#[cfg(test)]
mod stand_down_tests {
    use super::*;
    use crate::cluster::liveness::PeerStatus;

    fn p(priority: u16) -> Params {
        Params {
            priority,
            peer_priority: if priority == 10 { 20 } else { 10 },
            fence: FenceMode::Cloud,
            fence_delay: Duration::from_secs(3),
            fence_retry: Duration::from_secs(5),
            isolation_grace: Duration::from_secs(10),
            switchback: Switchback::Intelligent,
        }
    }

    fn peer(role: Role, yielding: bool) -> PeerView {
        PeerView::Alive(PeerStatus {
            role,
            disk: DiskState::UpToDate,
            priority: 10,
            yielding,
            wants_primary: false,
            promoting: false,
            cannot_promote: false,
            ack: Default::default(),
            version: crate::cluster::heartbeat::VERSION,
        })
    }

    fn at(peer: PeerView) -> Inputs {
        Inputs {
            now: Duration::from_secs(1),
            role: Role::Secondary,
            disk: DiskState::UpToDate,
            peer,
            witness: WitnessView::Reachable,
            heard_since_start: true,
            newest: None,
            link_connected: false,
            intent_acked: true,
            copies_compared: true,
        }
    }

    #[test]
    fn a_stand_down_ends_once_the_peer_serves_so_two_stand_downs_never_leave_the_pair_idle() {
        // node-b stood down (its disk failed and it handed over); node-a serves.
        let mut b = Controller::new(p(20));
        b.stand_down();
        assert_eq!(b.decide(at(peer(Role::Primary, false))), Action::None);
        assert!(!b.yielding(), "the hand-over is done");
        // Later node-a stands down in turn: node-b takes the service.
        let i = at(peer(Role::Secondary, true));
        assert_eq!(b.decide(i), Action::None, "announces first");
        assert_eq!(b.decide(i), Action::Promote, "{}", b.reason());
    }
}

#[cfg(test)]
mod comparison_tests {
    use super::*;
    use crate::cluster::liveness::PeerStatus;

    #[test]
    fn both_up_to_date_after_a_restart_nobody_promotes_before_the_copies_are_compared() {
        let p = Params {
            priority: 10,
            peer_priority: 20,
            fence: FenceMode::Cloud,
            fence_delay: Duration::from_secs(3),
            fence_retry: Duration::from_secs(5),
            isolation_grace: Duration::from_secs(10),
            switchback: Switchback::Intelligent,
        };
        let mut a = Controller::new(p);
        let peer = PeerView::Alive(PeerStatus {
            role: Role::Secondary,
            disk: DiskState::UpToDate,
            priority: 20,
            yielding: false,
            wants_primary: false,
            promoting: false,
            cannot_promote: false,
            ack: Default::default(),
            version: crate::cluster::heartbeat::VERSION,
        });
        let mut i = Inputs {
            now: Duration::from_secs(1),
            role: Role::Secondary,
            disk: DiskState::UpToDate,
            peer,
            witness: WitnessView::Reachable,
            heard_since_start: true,
            newest: None,
            link_connected: false,
            intent_acked: true,
            copies_compared: false,
        };
        for _ in 0..3 {
            assert_eq!(a.decide(i), Action::None);
            assert!(!a.promoting());
        }
        assert!(a.reason().contains("compare"), "{}", a.reason());
        // With the copies compared (this one was not made a resync target) it goes ahead.
        i.copies_compared = true;
        assert_eq!(a.decide(i), Action::None);
        assert_eq!(a.decide(i), Action::Promote);
        // Or with proof that this copy is the newest.
        let mut b = Controller::new(p_clone());
        i.copies_compared = false;
        i.newest = Some(NewestProof::PeerOutdated);
        assert_eq!(b.decide(i), Action::None);
        assert_eq!(b.decide(i), Action::Promote);
    }

    fn p_clone() -> Params {
        Params {
            priority: 10,
            peer_priority: 20,
            fence: FenceMode::Cloud,
            fence_delay: Duration::from_secs(3),
            fence_retry: Duration::from_secs(5),
            isolation_grace: Duration::from_secs(10),
            switchback: Switchback::Intelligent,
        }
    }
}
