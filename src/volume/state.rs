//! The mutable state of a mirrored volume: outstanding sequence numbers, the session's send
//! side, the resync run and the held-write guard. Borrowed only between `.await`s on the
//! volume's data-path thread.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ops::Range;
use std::rc::Rc;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot, Notify};

use super::{link_health, Connection, Counters, ResyncRole, Role, VerifyStatus};
use crate::fibhash::FibMap;
use crate::meta::bitmap::DirtyBitmap;
use crate::repl::resync::{Progress, RateController};
use crate::repl::wire::{Message, VerifyReply};

/// What an outstanding sequence number stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum PendingKind {
    /// An application write (Data).
    App,
    /// A resync piece (ResyncData).
    Resync,
    /// A ResyncDone.
    Control,
    /// A Flush of the peer's device.
    Flush,
    /// An application write served by the peer alone (this node's disk is detached).
    Through,
}

#[derive(Debug)]
pub(super) struct Pending {
    pub(super) kind: PendingKind,
    pub(super) sent_at: Instant,
    pub(super) range: Range<u64>,
    pub(super) local_done: bool,
    pub(super) peer_ok: Option<bool>,
    pub(super) waiter: Option<oneshot::Sender<bool>>,
    /// An application write still counted in the activity log (see
    /// [`MirroredVolume::complete_write`]); false once ended there.
    pub(super) al_held: bool,
}

/// The sending side of the current session.
#[derive(Debug, Clone)]
pub(super) struct SessionTx {
    pub(super) id: u64,
    pub(super) tx: mpsc::UnboundedSender<Message>,
    pub(super) kill: Rc<Notify>,
}

#[derive(Debug)]
pub(super) struct ResyncRun {
    pub(super) role: ResyncRole,
    pub(super) progress: Progress,
}

#[derive(Debug)]
pub(super) struct State {
    pub(super) role: Role,
    pub(super) connection: Connection,
    pub(super) session: Option<SessionTx>,
    pub(super) next_session: u64,
    pub(super) next_seq: u64,
    pub(super) pending: FibMap<u64, Pending>,
    pub(super) inflight_bytes: u64,
    pub(super) ahead: bool,
    /// Chunks written while connected but not sent (ahead): no ack may clear them.
    pub(super) unsent: DirtyBitmap,
    pub(super) app_ranges: FibMap<u64, Range<u64>>,
    pub(super) next_app: u64,
    pub(super) resync_lock: Option<Range<u64>>,
    /// The region an online verify is comparing: application writes to it wait.
    pub(super) verify_lock: Option<Range<u64>>,
    /// VerifyRequests sent, by seq, waiting for the peer's digests.
    pub(super) verify_waiters: HashMap<u64, oneshot::Sender<VerifyReply>>,
    /// The running or last online verify.
    pub(super) verify: Option<VerifyStatus>,
    pub(super) resync: Option<ResyncRun>,
    pub(super) rate: RateController,
    pub(super) counters: Counters,
    pub(super) oldest_unreplicated: Option<Instant>,
    pub(super) peer_primary: bool,
    /// The peer's copy is known Outdated since the connection was last lost.
    pub(super) peer_outdated: bool,
    /// When held writes complete alone: `outdate_wait` after the first write held since the
    /// connection was last lost.
    pub(super) hold_until: Option<Instant>,
    /// That wait ended without the peer outdated: writes complete alone until the next loss.
    pub(super) hold_expired: bool,
    /// Writes whose completion is being held.
    pub(super) held_writes: u64,
    /// Why the link is down, if it failed since the last connection.
    pub(super) link_health: link_health::LinkHealth,
    /// This Secondary failed to store a replicated write and has not been resynced since
    /// (its copy is Outdated); the failure was logged once.
    pub(super) apply_failed: bool,
    /// The peer failed a write during this connection (logged once per connection).
    pub(super) peer_failed_logged: bool,
    /// This resync target failed to store resync data during the current resync: the resync
    /// must not finish (logged once per resync).
    pub(super) resync_apply_failed: bool,
    /// This source sent ResyncDone of a resync by generation and has not recorded its end:
    /// the peer may have adopted this node's current generation, so losing the connection
    /// now needs a new one (see `teardown`).
    pub(super) peer_may_hold_current: bool,
    /// This Primary's disk failed and was detached (why): I/O goes through the peer.
    pub(super) detached: Option<String>,
    /// ReadRequests sent (a detached Primary's reads), by seq, waiting for the peer's bytes.
    pub(super) read_waiters: HashMap<u64, oneshot::Sender<crate::repl::wire::ReadReply>>,
    /// The connected peer serves a detached Primary (its Hello's features).
    pub(super) peer_serves_detached: bool,
    /// The connected peer's copy was up to date when it connected and has not failed a write.
    pub(super) peer_up_to_date: bool,
    /// A disk error that could not be detached was logged.
    pub(super) detach_refusal_logged: bool,
    /// Regions the peer acknowledged since its last good flush (sync mode): a failed flush
    /// makes them dirty here.
    pub(super) peer_unflushed: DirtyBitmap,
    /// This Primary lost a peer that may hold its current generation: the first write it
    /// issues alone starts a new one (DRBD's lazy new current UUID), so a node that wrote
    /// nothing alone never looks like a split brain.
    pub(super) new_current_due: bool,
    /// Since the connection was lost this node wrote alone as Primary (or had writes in
    /// flight then): the peer may lack acknowledged writes.
    pub(super) wrote_alone: bool,
}

/// One write in [`State::held_writes`] for as long as this lives.
pub(super) struct HeldWrite<'a>(&'a RefCell<State>);

impl<'a> HeldWrite<'a> {
    pub(super) fn new(st: &'a RefCell<State>) -> Self {
        st.borrow_mut().held_writes += 1;
        Self(st)
    }
}

impl Drop for HeldWrite<'_> {
    fn drop(&mut self) {
        if let Ok(mut st) = self.0.try_borrow_mut() {
            st.held_writes = st.held_writes.saturating_sub(1);
        }
    }
}
