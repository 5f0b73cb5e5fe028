//! `volume`: the mirrored volume, a local leg plus a peer leg with dirty tracking.
//!
//! - [`MirroredVolume`] implements [`BlockTarget`]: the NBD server exports it on the Primary.
//! - [`plan`]: what a connection does after the Hellos (resync direction, split-brain policy).
//! - [`session`]: one replication connection: bitmap exchange, apply (secondary), acks, resync.
//! - [`status`]: the status snapshot.
//! - [`run`]: `twinvol mirror`, one node of a volume as a process.
//! - [`verify`]: online verify (block digests compared with the peer's, no disconnect).
//! - [`control`]: the control socket of `twinvol mirror` and the `twinvol verify` client.
//!
//! A write on the Primary: `prepare_write` (activity log: a crash of this node marks the hot
//! extents dirty at the next open) -> Data frame queued to the peer (sequence numbers give the
//! order) and the local write, in parallel -> sync mode waits for the peer's Ack, async mode
//! does not. Bits are set (`mark_dirty`, before the local write is issued) only for a write the
//! peer will not receive (disconnected, or async "ahead"), and when a sent write fails or its
//! connection drops before the Ack (DRBD's rule), and in async mode for sent writes whose
//! activity-log extent must make room for a new one (the volume then goes ahead; see
//! `make_room_by_going_ahead`): a bitmap granularity coarser than the
//! writes then never leaves stale bits behind. Resync acks clear the chunks they cover,
//! except chunks an unsent write touched meanwhile.
//! Everything runs on the volume's data-path thread: state sits in `RefCell`s that are never
//! borrowed across an `.await`.

pub mod control;
pub mod degraded;
mod detach;
pub mod link_health;
pub mod plan;
pub mod run;
pub mod session;
pub mod status;
pub mod verify;

use std::cell::RefCell;
use std::collections::HashMap;
use std::ops::Range;
use std::rc::Rc;
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, Notify};

use crate::block::{BlockError, BlockResult, BlockTarget, Extent, TargetInfo, ZeroFlags};
use crate::config::{ReplicationMode, SplitBrainPolicy};
use crate::engine::buf::AlignedBuf;
use crate::fibhash::FibMap;
use crate::meta::bitmap::DirtyBitmap;
use crate::meta::device::MetaDevice;
use crate::meta::gen::{self, DiskFlags, JUST_CREATED};
use crate::meta::store::{MetaStore, Prepared, StoreError};
use crate::repl::resync::{Progress, RateController};
use crate::repl::wire::{Data, DataFlags, Message, VerifyReply};

pub use status::{
    Connection, Counters, NewestProof, ResyncRole, ResyncStatus, Role, VerifyStatus, VolumeStatus,
};

/// Largest payload of one Data frame made from WRITE_ZEROES/TRIM.
const ZERO_PIECE: u64 = 1 << 20;

/// Errors of role changes.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// Promotion of a copy that is not known to be up to date.
    #[error("volume {volume}: refusing to promote: this copy is {disk}; wait for the resync to finish, or promote with --force if the peer's copy is lost (writes the peer has and this node lacks are then discarded)")]
    NotUpToDate {
        /// Volume.
        volume: String,
        /// Disk state.
        disk: &'static str,
    },
    /// Promotion while the connected peer is Primary.
    #[error(
        "volume {volume}: the peer is Primary; demote it first (two Primaries must never serve)"
    )]
    PeerIsPrimary {
        /// Volume.
        volume: String,
    },
    /// The metadata could not be written.
    #[error("volume {volume}: metadata: {source}")]
    Meta {
        /// Volume.
        volume: String,
        /// Why.
        #[source]
        source: StoreError,
    },
    /// Discarding the data of a Primary.
    #[error("volume {volume}: refusing to discard the data of the Primary; demote it first (the service would lose its data)")]
    DiscardPrimary {
        /// Volume.
        volume: String,
    },
    /// A random generation id could not be drawn.
    #[error("volume {volume}: no randomness for a generation id: {why}")]
    Random {
        /// Volume.
        volume: String,
        /// Why.
        why: String,
    },
}

/// Fixed settings of a mirrored volume.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Volume name.
    pub volume: String,
    /// This node's `node.id`.
    pub node: String,
    /// The peer's `node.id`.
    pub peer: String,
    /// sync or async.
    pub mode: ReplicationMode,
    /// Async: bound of bytes sent and not acknowledged before going "ahead".
    pub max_inflight_bytes: u64,
    /// Resync ceiling, bytes/s.
    pub resync_rate_max: u64,
    /// Resync floor, bytes/s.
    pub resync_rate_min: u64,
    /// Split-brain policy.
    pub split_brain_policy: SplitBrainPolicy,
    /// Seconds of silence before the peer counts as lost.
    pub ping_timeout: std::time::Duration,
    /// Bitmap resyncs compare block CRCs with the peer first and send only chunks that
    /// differ (`replication.checksum_resync`).
    pub checksum_resync: bool,
    /// Sync mode: how long a Primary without a connection holds a write's completion until
    /// the peer is known Outdated ([`MirroredVolume::peer_outdated`]) or the connection is
    /// back (`replication.outdate_wait_ms`; zero holds nothing).
    pub outdate_wait: std::time::Duration,
    /// What a Primary does when its own disk fails (`replication.on_disk_error`).
    pub on_disk_error: crate::config::DiskErrorPolicy,
}

/// What an outstanding sequence number stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum PendingKind {
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
struct Pending {
    kind: PendingKind,
    sent_at: Instant,
    range: Range<u64>,
    local_done: bool,
    peer_ok: Option<bool>,
    waiter: Option<oneshot::Sender<bool>>,
    /// An application write still counted in the activity log (see
    /// [`MirroredVolume::complete_write`]); false once ended there.
    al_held: bool,
}

/// The sending side of the current session.
#[derive(Debug, Clone)]
struct SessionTx {
    id: u64,
    tx: mpsc::UnboundedSender<Message>,
    kill: Rc<Notify>,
}

#[derive(Debug)]
struct ResyncRun {
    role: ResyncRole,
    progress: Progress,
}

#[derive(Debug)]
struct State {
    role: Role,
    connection: Connection,
    session: Option<SessionTx>,
    next_session: u64,
    next_seq: u64,
    pending: FibMap<u64, Pending>,
    inflight_bytes: u64,
    ahead: bool,
    /// Chunks written while connected but not sent (ahead): no ack may clear them.
    unsent: DirtyBitmap,
    app_ranges: FibMap<u64, Range<u64>>,
    next_app: u64,
    resync_lock: Option<Range<u64>>,
    /// The region an online verify is comparing: application writes to it wait.
    verify_lock: Option<Range<u64>>,
    /// VerifyRequests sent, by seq, waiting for the peer's digests.
    verify_waiters: HashMap<u64, oneshot::Sender<VerifyReply>>,
    /// The running or last online verify.
    verify: Option<VerifyStatus>,
    resync: Option<ResyncRun>,
    rate: RateController,
    counters: Counters,
    oldest_unreplicated: Option<Instant>,
    peer_primary: bool,
    /// The peer's copy is known Outdated since the connection was last lost.
    peer_outdated: bool,
    /// When held writes complete alone: `outdate_wait` after the first write held since the
    /// connection was last lost.
    hold_until: Option<Instant>,
    /// That wait ended without the peer outdated: writes complete alone until the next loss.
    hold_expired: bool,
    /// Writes whose completion is being held.
    held_writes: u64,
    /// Why the link is down, if it failed since the last connection.
    link_health: link_health::LinkHealth,
    /// This Secondary failed to store a replicated write and has not been resynced since
    /// (its copy is Outdated); the failure was logged once.
    apply_failed: bool,
    /// The peer failed a write during this connection (logged once per connection).
    peer_failed_logged: bool,
    /// This resync target failed to store resync data during the current resync: the resync
    /// must not finish (logged once per resync).
    resync_apply_failed: bool,
    /// This source sent ResyncDone of a resync by generation and has not recorded its end:
    /// the peer may have adopted this node's current generation, so losing the connection
    /// now needs a new one (see `teardown`).
    peer_may_hold_current: bool,
    /// This Primary's disk failed and was detached (why): I/O goes through the peer.
    detached: Option<String>,
    /// ReadRequests sent (a detached Primary's reads), by seq, waiting for the peer's bytes.
    read_waiters: HashMap<u64, oneshot::Sender<crate::repl::wire::ReadReply>>,
    /// The connected peer serves a detached Primary (its Hello's features).
    peer_serves_detached: bool,
    /// The connected peer's copy was up to date when it connected and has not failed a write.
    peer_up_to_date: bool,
    /// A disk error that could not be detached was logged.
    detach_refusal_logged: bool,
    /// Regions the peer acknowledged since its last good flush (sync mode): a failed flush
    /// makes them dirty here.
    peer_unflushed: DirtyBitmap,
    /// This Primary lost a peer that may hold its current generation: the first write it
    /// issues alone starts a new one (DRBD's lazy new current UUID), so a node that wrote
    /// nothing alone never looks like a split brain.
    new_current_due: bool,
    /// Since the connection was lost this node wrote alone as Primary (or had writes in
    /// flight then): the peer may lack acknowledged writes.
    wrote_alone: bool,
}

/// One write in [`State::held_writes`] for as long as this lives.
struct HeldWrite<'a>(&'a RefCell<State>);

impl<'a> HeldWrite<'a> {
    fn new(st: &'a RefCell<State>) -> Self {
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

/// A local device mirrored to a peer.
///
/// Invariants: a chunk is clean in the bitmap only if both copies hold its data (or no write
/// touched it since the last resync); writes are refused unless the role is Primary; `State`
/// and the metadata are never borrowed across an `.await`.
pub struct MirroredVolume<T, D: MetaDevice> {
    local: T,
    meta: RefCell<MetaStore<D>>,
    st: RefCell<State>,
    info: TargetInfo,
    wake: Notify,
    settings: Settings,
    /// Frames and bytes the connection writers sent, cumulative over connections.
    sent_traffic: crate::repl::link::SentTraffic,
    /// The data device's claim when the metadata (which claims its own device) lives
    /// elsewhere: this process owns both for the volume's lifetime.
    _data_claim: Option<crate::engine::claim::DeviceClaim>,
}

fn eio(what: String, e: impl std::fmt::Display) -> BlockError {
    BlockError::new(what.clone(), std::io::Error::other(format!("{what}: {e}")))
}

impl<T: BlockTarget, D: MetaDevice> MirroredVolume<T, D> {
    /// A volume over `local` with its metadata `meta`, starting as Secondary and disconnected.
    /// The local target must export exactly the metadata's data size.
    pub fn new(local: T, meta: MetaStore<D>, settings: Settings) -> Self {
        let mut info = local.info().clone();
        info.description = format!("twinvol mirrored volume {}", settings.volume);
        // Trim is served as zeroes on both legs, so both copies stay identical.
        info.can_fast_zero = false;
        let geometry = meta.bitmap().geometry();
        let now = Instant::now();
        let st = State {
            role: Role::Secondary,
            connection: Connection::Connecting,
            session: None,
            next_session: 1,
            next_seq: 1,
            pending: FibMap::default(),
            inflight_bytes: 0,
            ahead: false,
            unsent: DirtyBitmap::new(geometry),
            app_ranges: FibMap::default(),
            next_app: 0,
            resync_lock: None,
            verify_lock: None,
            verify_waiters: HashMap::new(),
            verify: None,
            resync: None,
            rate: RateController::new(settings.resync_rate_max, settings.resync_rate_min, now),
            counters: Counters::default(),
            oldest_unreplicated: (meta.bitmap().dirty_chunks() > 0).then_some(now),
            peer_primary: false,
            peer_outdated: false,
            hold_until: None,
            hold_expired: false,
            held_writes: 0,
            link_health: link_health::LinkHealth::default(),
            apply_failed: false,
            peer_failed_logged: false,
            resync_apply_failed: false,
            peer_may_hold_current: false,
            detached: None,
            read_waiters: HashMap::new(),
            peer_serves_detached: false,
            peer_up_to_date: false,
            detach_refusal_logged: false,
            peer_unflushed: DirtyBitmap::new(geometry),
            new_current_due: false,
            wrote_alone: false,
        };
        Self {
            local,
            meta: RefCell::new(meta),
            st: RefCell::new(st),
            info,
            wake: Notify::new(),
            settings,
            sent_traffic: Default::default(),
            _data_claim: None,
        }
    }

    /// Keeps `claim` (the data device's, see [`crate::engine::claim`]) for the volume's
    /// lifetime.
    pub fn holding(mut self, claim: Option<crate::engine::claim::DeviceClaim>) -> Self {
        self._data_claim = claim;
        self
    }

    /// Fixed settings.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The local leg.
    pub fn local(&self) -> &T {
        &self.local
    }

    /// Current role.
    pub fn role(&self) -> Role {
        self.st.borrow().role
    }

    fn meta_err(&self, source: StoreError) -> VolumeError {
        VolumeError::Meta {
            volume: self.settings.volume.clone(),
            source,
        }
    }

    fn disk_word(flags: DiskFlags) -> &'static str {
        // Inconsistent first: an Outdated copy being resynced is incomplete, not just behind.
        if !flags.has(DiskFlags::CONSISTENT) {
            "inconsistent"
        } else if flags.has(DiskFlags::OUTDATED) {
            "outdated"
        } else if flags.has(DiskFlags::UP_TO_DATE) {
            "up-to-date"
        } else {
            "consistent"
        }
    }

    /// What the flags prove about this copy being the newest (see [`NewestProof`]).
    fn newest_of(flags: DiskFlags) -> Option<NewestProof> {
        let usable = flags.has(DiskFlags::CONSISTENT)
            && flags.has(DiskFlags::UP_TO_DATE)
            && !flags.has(DiskFlags::OUTDATED);
        if !usable {
            None
        } else if flags.has(DiskFlags::PRIMARY_CLEAN_STOP) {
            Some(NewestProof::PrimaryAtCleanStop)
        } else if flags.has(DiskFlags::PEER_OUTDATED) {
            Some(NewestProof::PeerOutdated)
        } else {
            None
        }
    }

    /// The refusal a promotion would meet now because of the peer (its link shows it Primary).
    pub fn promote_refusal(&self) -> Option<VolumeError> {
        let st = self.st.borrow();
        (st.peer_primary && st.session.is_some()).then(|| VolumeError::PeerIsPrimary {
            volume: self.settings.volume.clone(),
        })
    }

    /// Waits up to `limit` until the replication link no longer shows a Primary peer (the peer
    /// demoted and dropped its connection, or the connection was lost). Returns whether it
    /// happened: the cluster may hear the peer's demotion in a heartbeat a moment before the
    /// link's end reaches this node.
    pub async fn wait_peer_not_primary(&self, limit: std::time::Duration) -> bool {
        tokio::time::timeout(
            limit,
            self.wait_until(|v| {
                let st = v.st.borrow();
                !(st.peer_primary && st.session.is_some())
            }),
        )
        .await
        .is_ok()
    }

    /// Makes this node Primary. Without `force` the copy must be consistent and up to date.
    /// Starts a new data generation (the peer learns of it at the next connection, which this
    /// call forces by dropping the current one).
    pub fn promote(&self, force: bool) -> Result<(), VolumeError> {
        if self.role() == Role::Primary {
            return Ok(());
        }
        if let Some(e) = self.promote_refusal() {
            return Err(e);
        }
        let (flags, ids) = {
            let m = self.meta.borrow();
            (m.superblock().flags, m.superblock().gen)
        };
        let failed_apply = self.st.borrow().apply_failed;
        let ok = flags.has(DiskFlags::CONSISTENT)
            && flags.has(DiskFlags::UP_TO_DATE)
            && ids.current != JUST_CREATED
            && !failed_apply;
        if !ok && !force {
            return Err(VolumeError::NotUpToDate {
                volume: self.settings.volume.clone(),
                disk: if ids.current == JUST_CREATED {
                    "freshly created (never synced)"
                } else if failed_apply {
                    "outdated (it failed to store a replicated write)"
                } else {
                    Self::disk_word(flags)
                },
            });
        }
        if force && !ok {
            tracing::warn!(volume = %self.settings.volume, disk = Self::disk_word(flags), "FORCED promotion: this copy becomes the newest; the peer's differing data will be overwritten at the next resync");
        }
        let new = gen::random_id().map_err(|e| VolumeError::Random {
            volume: self.settings.volume.clone(),
            why: e.to_string(),
        })?;
        self.meta
            .borrow_mut()
            .update_state(|g, f| {
                if g.current == JUST_CREATED {
                    g.current = new;
                } else {
                    g.new_current(new);
                }
                f.set(DiskFlags::WAS_PRIMARY, true);
                f.set(DiskFlags::CRASHED_PRIMARY, true);
                f.set(DiskFlags::OUTDATED, false);
                f.set(DiskFlags::PRIMARY_CLEAN_STOP, false);
                if force {
                    f.set(DiskFlags::CONSISTENT, true);
                    f.set(DiskFlags::UP_TO_DATE, true);
                    f.set(DiskFlags::INITIAL_SYNC_DONE, true);
                }
            })
            .map_err(|e| self.meta_err(e))?;
        {
            let mut st = self.st.borrow_mut();
            st.role = Role::Primary;
            st.new_current_due = false;
        }
        tracing::info!(volume = %self.settings.volume, generation = format!("{new:016x}"), "promoted to Primary");
        self.drop_session("promoted");
        Ok(())
    }

    /// Makes this node Secondary: persists the bitmap, clears the crashed-primary flag and
    /// reconnects so the peer learns the new role. The caller stops the export first.
    pub fn demote(&self) -> Result<(), VolumeError> {
        if self.role() == Role::Secondary {
            return Ok(());
        }
        let was_detached = {
            let mut st = self.st.borrow_mut();
            st.role = Role::Secondary;
            st.new_current_due = false;
            // A detached disk is resynced from the new Primary (or fails again, and is then
            // Outdated): it is this node's disk again.
            st.detached.take().is_some()
        };
        let recorded = {
            let mut m = self.meta.borrow_mut();
            m.persist_bitmap()
                .and_then(|_| m.update_state(|_, f| f.set(DiskFlags::CRASHED_PRIMARY, false)))
        };
        match recorded {
            Ok(()) => {}
            // The failed disk may refuse its metadata too; the peer holds the truth.
            Err(e) if was_detached => {
                tracing::warn!(volume = %self.settings.volume, error = %e, "demoting the detached copy: its metadata could not be written (the peer's generation says it is behind)")
            }
            Err(e) => return Err(self.meta_err(e)),
        }
        tracing::info!(volume = %self.settings.volume, "demoted to Secondary");
        self.drop_session("demoted");
        Ok(())
    }

    /// Throws this Secondary's copy away (the manual split-brain recovery on the node whose
    /// changes are to be lost, DRBD's `--discard-my-data`): its generation becomes "just
    /// created" and it is flagged Inconsistent, so the next connection copies the whole
    /// device from the peer; until then it refuses promotion without force.
    pub fn discard_local_data(&self) -> Result<(), VolumeError> {
        if self.role() != Role::Secondary {
            return Err(VolumeError::DiscardPrimary {
                volume: self.settings.volume.clone(),
            });
        }
        self.meta
            .borrow_mut()
            .update_state(|g, f| {
                g.current = JUST_CREATED;
                g.bitmap = 0;
                g.history = [0, 0];
                f.set(DiskFlags::CONSISTENT, false);
                f.set(DiskFlags::UP_TO_DATE, false);
                f.set(DiskFlags::INITIAL_SYNC_DONE, false);
            })
            .map_err(|e| self.meta_err(e))?;
        tracing::warn!(volume = %self.settings.volume, "this copy was DISCARDED by the operator: a full resync from the peer follows");
        self.drop_session("local data discarded");
        Ok(())
    }

    /// Marks this Secondary's copy Outdated (persisted): the Primary said it acknowledged
    /// writes this copy lacks. Promotion then needs force until a resync from the Primary
    /// clears it. Returns whether the flag was newly set; a Primary is never outdated.
    pub fn mark_outdated(&self) -> Result<bool, VolumeError> {
        // A connected Secondary is kept current by the connection itself (or is being
        // resynced); a late heartbeat must not outdate it.
        if self.role() != Role::Secondary || self.st.borrow().session.is_some() {
            return Ok(false);
        }
        if !self.flag_outdated().map_err(|e| self.meta_err(e))? {
            return Ok(false);
        }
        tracing::warn!(volume = %self.settings.volume, "this copy is OUTDATED: the Primary acknowledged writes it lacks; it cannot be promoted until resynced");
        Ok(true)
    }

    /// Sets Outdated and clears UpToDate in the superblock (in memory even when the write
    /// fails), unless they are so already. Returns whether the flags changed.
    fn flag_outdated(&self) -> Result<bool, StoreError> {
        let flags = self.meta.borrow().superblock().flags;
        if flags.has(DiskFlags::OUTDATED) && !flags.has(DiskFlags::UP_TO_DATE) {
            return Ok(false);
        }
        self.meta.borrow_mut().update_state(|_, f| {
            f.set(DiskFlags::OUTDATED, true);
            f.set(DiskFlags::UP_TO_DATE, false);
        })?;
        Ok(true)
    }

    /// This Secondary failed to store a replicated write (`errno`): its copy lacks a write the
    /// Primary completes on its own copy. Marks it Outdated before the failure is acknowledged
    /// to the Primary, so that it is never promoted without force while it lacks the write (in
    /// memory even if the metadata cannot be written). A resync from the Primary (the next
    /// connection; `twinvol resync` starts one) clears it. Logged once until then.
    fn apply_failed(&self, offset: u64, len: u64, errno: u32) {
        let first = {
            let mut st = self.st.borrow_mut();
            st.counters.local_apply_errors += 1;
            !std::mem::replace(&mut st.apply_failed, true)
        };
        let durable = self.flag_outdated();
        let error = std::io::Error::from_raw_os_error(errno as i32);
        if first {
            tracing::error!(volume = %self.settings.volume, offset, len, %error, "this copy failed to store a replicated write: it is OUTDATED and cannot be promoted without force until a resync from the Primary; check the device, then run `twinvol resync` (logged once; count: local_apply_errors)");
        }
        if let Err(e) = durable {
            tracing::error!(volume = %self.settings.volume, error = %e, "cannot record the Outdated flag on disk either: do not promote this node; this process refuses to");
        }
    }

    /// A Secondary connected to a Primary stops as planned: its copy is marked Outdated on disk
    /// first (it will lack what the Primary writes from now on), then the Primary is told, so
    /// it neither waits for this copy nor holds writes for it. The session ends. Returns
    /// whether that was done (a Primary, or a Secondary not connected to a Primary, does
    /// nothing: its copy's state is as it was).
    pub async fn leave_outdated(&self) -> bool {
        let (tx, kill) = {
            let st = self.st.borrow();
            match &st.session {
                Some(s) if st.role == Role::Secondary && st.peer_primary => {
                    (s.tx.clone(), s.kill.clone())
                }
                _ => return false,
            }
        };
        match self.flag_outdated() {
            Ok(_) => {
                tracing::warn!(volume = %self.settings.volume, "stopping while connected to the Primary: this copy is marked OUTDATED (it will lack the Primary's next writes) and is resynced when it returns")
            }
            Err(e) => {
                tracing::error!(volume = %self.settings.volume, error = %e, "stopping: cannot record the Outdated flag on disk; not telling the Primary (its writes wait for `outdate_wait_ms` as after any loss)");
                return false;
            }
        }
        let _ = tx.send(Message::Disconnect {
            reason: crate::repl::wire::DisconnectReason::OutdatedStop,
            detail: format!(
                "node {} stops; its copy is marked Outdated",
                self.settings.node
            ),
        });
        drop(tx);
        // The Primary ends the connection when it has read the Disconnect: waiting for that
        // (rather than cutting the connection at once) makes sure it was delivered.
        let wait = std::time::Duration::from_secs(2);
        let closed = |v: &Self| v.st.borrow().session.is_none();
        if tokio::time::timeout(wait, self.wait_until(closed))
            .await
            .is_ok()
        {
            return true;
        }
        kill.notify_one();
        tokio::time::timeout(wait, self.wait_until(closed))
            .await
            .is_ok()
    }

    /// Persists the bitmap and records a clean shutdown (no write may be in flight).
    pub fn close(self) -> Result<D, StoreError> {
        self.meta.into_inner().close_clean()
    }

    /// Persists changed bitmap pages (called periodically and at shutdown).
    pub fn persist_bitmap(&self) -> Result<u64, StoreError> {
        self.meta.borrow_mut().persist_bitmap()
    }

    /// Asks the current session (if any) to end; the connection loop reconnects.
    pub fn drop_session(&self, why: &str) {
        if let Some(s) = &self.st.borrow().session {
            tracing::info!(volume = %self.settings.volume, why, "dropping the replication connection");
            s.kill.notify_one();
        }
    }

    /// The status snapshot.
    pub fn status(&self) -> VolumeStatus {
        let now = Instant::now();
        let m = self.meta.borrow();
        let st = self.st.borrow();
        let sb = m.superblock();
        VolumeStatus {
            volume: self.settings.volume.clone(),
            node: self.settings.node.clone(),
            role: st.role,
            connection: st.connection.clone(),
            disk: if st.detached.is_some() {
                "detached"
            } else if st.apply_failed && sb.flags.has(DiskFlags::CONSISTENT) {
                // Outdated in memory even when the flag could not be written.
                "outdated"
            } else {
                Self::disk_word(sb.flags)
            },
            mode: match self.settings.mode {
                ReplicationMode::Sync => "sync",
                ReplicationMode::Async => "async",
            },
            ahead: st.ahead,
            held_writes: st.held_writes,
            peer_outdated: st.peer_outdated,
            rpo_bytes: m.bitmap().dirty_bytes() + st.inflight_bytes,
            rpo_seconds: st
                .pending
                .values()
                .filter(|p| p.kind == PendingKind::App)
                .map(|p| p.sent_at)
                .chain(
                    st.oldest_unreplicated
                        .filter(|_| m.bitmap().dirty_chunks() > 0),
                )
                .min()
                .map(|t| now.saturating_duration_since(t).as_secs_f64())
                .unwrap_or(0.0),
            inflight_bytes: st.inflight_bytes,
            resync: st.resync.as_ref().map(|r| ResyncStatus {
                role: r.role,
                progress: r.progress.report(now),
            }),
            counters: {
                let t = self.sent_traffic.lock().map(|t| *t).unwrap_or_default();
                Counters {
                    frames_sent: t.frames,
                    payload_bytes_sent: t.payload_bytes,
                    wire_bytes_sent: t.wire_bytes,
                    writes_sent: t.writes,
                    ..st.counters
                }
            },
            verify: st.verify.clone(),
            current_generation: format!("{:016x}", sb.gen.current),
            link_error: st.link_health.report(now),
            newest: Self::newest_of(sb.flags),
            detached: st.detached.clone(),
            wrote_alone: st.wrote_alone,
        }
    }

    /// Records a failed attempt to connect, authenticate or keep the connection, for status
    /// (`link_error`). Returns `true` when it is not the same kind of failure as the attempt
    /// before (log it then: a retry loop logs each problem once).
    fn link_failed(&self, kind: &'static str, message: String, needs_operator: bool) -> bool {
        self.st
            .borrow_mut()
            .link_health
            .failed(kind, message, needs_operator, Instant::now())
    }

    async fn wait_until(&self, mut ready: impl FnMut(&Self) -> bool) {
        loop {
            let n = self.wake.notified();
            tokio::pin!(n);
            n.as_mut().enable();
            if ready(self) {
                return;
            }
            n.await;
        }
    }

    fn overlaps(a: &Range<u64>, b: &Range<u64>) -> bool {
        a.start < b.end && b.start < a.end
    }

    /// Waits until no application write to `range` is in progress (the caller has locked the
    /// range against new ones: `resync_lock` or `verify_lock`).
    async fn wait_app_writes_clear(&self, range: &Range<u64>) {
        self.wait_until(|v| {
            v.st.borrow()
                .app_ranges
                .values()
                .all(|r| !Self::overlaps(r, range))
        })
        .await;
    }

    /// A resync run in `role` over the bytes the bitmap holds dirty now.
    fn resync_run(&self, role: ResyncRole) -> ResyncRun {
        let total = self.meta.borrow().bitmap().dirty_bytes();
        ResyncRun {
            role,
            progress: Progress::new(total, Instant::now()),
        }
    }

    /// Queues `msg` on the session (sent at `now`); returns its seq and a receiver for the
    /// peer's verdict.
    fn send_tracked(
        st: &mut State,
        kind: PendingKind,
        range: Range<u64>,
        now: Instant,
        make: impl FnOnce(u64) -> Message,
    ) -> Option<(u64, oneshot::Receiver<bool>)> {
        let seq = st.next_seq;
        // Borrowed, not cloned: a clone and drop of the sender per write were atomic increments
        // and decrements of the channel's counts (0.55% of node a's core in async 4k, session
        // 11 in docs/BENCHMARKS.md).
        let sent = st.session.as_ref()?.tx.send(make(seq)).is_ok();
        st.next_seq += 1;
        if !sent {
            return None;
        }
        let (tx, rx) = oneshot::channel();
        let bytes = range.end - range.start;
        if !matches!(kind, PendingKind::Control | PendingKind::Flush) {
            st.inflight_bytes += bytes;
        }
        st.pending.insert(
            seq,
            Pending {
                local_done: kind != PendingKind::App,
                al_held: kind == PendingKind::App,
                sent_at: now,
                kind,
                range,
                peer_ok: None,
                waiter: Some(tx),
            },
        );
        Some((seq, rx))
    }

    /// Registers an application write and queues it to the peer when that is allowed.
    fn replicate(
        &self,
        offset: u64,
        data: Bytes,
        fua: bool,
    ) -> Option<(u64, oneshot::Receiver<bool>)> {
        let len = data.len() as u64;
        let range = offset..offset + len;
        let mut st = self.st.borrow_mut();
        let st = &mut *st;
        let now = Instant::now();
        st.rate.on_app_write(now);
        if st.session.is_some()
            && !st.ahead
            && self.settings.mode == ReplicationMode::Async
            && st.inflight_bytes + len > self.settings.max_inflight_bytes
        {
            self.go_ahead(st, "the replication queue is full");
        }
        if st.session.is_none() || st.ahead {
            if st.session.is_none() {
                st.wrote_alone = true;
                if std::mem::take(&mut st.new_current_due) {
                    self.begin_lone_generation();
                }
            }
            self.mark_unsent(st, offset, len);
            return None;
        }
        let epoch = st.session.as_ref().map(|s| s.id).unwrap_or(0);
        let r = Self::send_tracked(st, PendingKind::App, range, now, |seq| {
            Message::Data(Data {
                seq,
                epoch,
                offset,
                flags: DataFlags(if fua { DataFlags::FUA } else { 0 }),
                data,
            })
        });
        match r {
            Some(r) => {
                st.counters.data_bytes_sent += len;
                Some(r)
            }
            None => {
                self.mark_unsent(st, offset, len);
                None
            }
        }
    }

    /// The first write this Primary issues alone since it lost a peer that may hold its
    /// current generation: a new generation begins, durably, before the write touches the
    /// disk, so the next connection tells this node's lone writes from a promotion of the peer.
    fn begin_lone_generation(&self) {
        let r = gen::random_id().map_err(|e| e.to_string()).and_then(|new| {
            self.meta
                .borrow_mut()
                .update_state(|g, _| g.new_current(new))
                .map(|_| new)
                .map_err(|e| e.to_string())
        });
        match r {
            Ok(new) => {
                tracing::info!(volume = %self.settings.volume, generation = format!("{new:016x}"), "writing without the peer: a new generation begins")
            }
            Err(e) => {
                tracing::error!(volume = %self.settings.volume, error = %e, "cannot record the new generation of writes made without the peer")
            }
        }
    }

    /// Async mode stops sending Data (`why`): writes stay dirty until the link has caught up
    /// and the ahead watch resyncs them.
    fn go_ahead(&self, st: &mut State, why: &str) {
        st.ahead = true;
        st.counters.ahead_events += 1;
        tracing::warn!(volume = %self.settings.volume, inflight = st.inflight_bytes, bound = self.settings.max_inflight_bytes, "{why}: going ahead (data stays dirty, resync when the link catches up)");
    }

    /// A write the peer will not receive: its chunks become dirty (before the local write is
    /// issued) and no resync ack may clear them while this connection lasts.
    fn mark_unsent(&self, st: &mut State, offset: u64, len: u64) {
        let _ = st.unsent.set(offset, len);
        self.mark_unreplicated(st, offset, len);
    }

    /// A write the peer may not hold: its chunks become dirty, and the RPO clock starts if it
    /// was not running.
    fn mark_unreplicated(&self, st: &mut State, offset: u64, len: u64) {
        let _ = self.meta.borrow_mut().mark_dirty(offset, len);
        if st.oldest_unreplicated.is_none() {
            st.oldest_unreplicated = Some(Instant::now());
        }
    }

    /// Clears the bits of `range` except chunks an unsent write touched.
    fn clear_synced(&self, st: &State, range: Range<u64>) {
        let mut m = self.meta.borrow_mut();
        let len = range.end - range.start;
        if !st.unsent.is_dirty(range.start, len).unwrap_or(true) {
            let _ = m.clear_dirty(range.start, len);
            return;
        }
        let chunks = st.unsent.covered_chunks(range.start, len);
        let g = st.unsent.geometry();
        for c in chunks {
            if !st.unsent.test_chunk(c) {
                let r = g.chunk_range(c);
                let _ = m.clear_dirty(r.start, r.end - r.start);
            }
        }
    }

    /// Ends an application write in the activity log (see [`MetaStore::complete_write`]).
    fn complete_write(&self, range: Range<u64>) {
        if !self
            .meta
            .borrow_mut()
            .complete_write(range.start, range.end - range.start)
        {
            tracing::error!(volume = %self.settings.volume, offset = range.start, len = range.end - range.start, "activity log: a write ended that was not in flight (bookkeeping bug; the log stays conservative)");
            debug_assert!(false, "complete_write without prepare_write: {range:?}");
        }
    }

    /// Async mode, every activity-log slot busy: the sent writes in the least recently used
    /// busy extent (other than the new write's own) become dirty and leave the log, and the
    /// volume goes ahead, so the resync after the link catches up sends them again. Returns
    /// false when no sent write held such an extent (the slots are busy with local writes,
    /// which end on their own).
    fn make_room_by_going_ahead(&self, offset: u64, len: u64) -> bool {
        let victim = {
            let m = self.meta.borrow();
            let al = m.activity_log();
            let g = al.geometry();
            match al.lru_busy_extent(g.extents_of(offset, len)) {
                Some(e) => g.extent_bytes(e),
                None => return false,
            }
        };
        let released: Vec<Range<u64>> = {
            let mut st = self.st.borrow_mut();
            let st = &mut *st;
            let released: Vec<Range<u64>> = st
                .pending
                .values_mut()
                .filter(|p| p.al_held && Self::overlaps(&p.range, &victim))
                .map(|p| {
                    p.al_held = false;
                    p.range.clone()
                })
                .collect();
            if released.is_empty() {
                return false;
            }
            if !st.ahead {
                self.go_ahead(
                    st,
                    "the activity log is full of writes the peer has not acknowledged (a larger --al-extents avoids this)",
                );
            }
            for r in &released {
                self.mark_unreplicated(st, r.start, r.end - r.start);
            }
            released
        };
        for r in released {
            self.complete_write(r);
        }
        true
    }

    fn try_finish(&self, seq: u64) {
        let mut st = self.st.borrow_mut();
        let ready = st
            .pending
            .get(&seq)
            .is_some_and(|p| p.local_done && p.peer_ok.is_some());
        if !ready {
            return;
        }
        let Some(mut p) = st.pending.remove(&seq) else {
            return;
        };
        let ok = p.peer_ok == Some(true);
        let bytes = p.range.end - p.range.start;
        if !matches!(p.kind, PendingKind::Control | PendingKind::Flush) {
            st.inflight_bytes = st.inflight_bytes.saturating_sub(bytes);
        }
        match (ok, &p.kind) {
            // Resync pieces are chunk-aligned: both copies now hold every chunk they cover.
            (true, PendingKind::Resync) => self.clear_synced(&st, p.range.clone()),
            // On the peer's disk, durable at its next good flush.
            (true, PendingKind::App) => {
                let _ = st
                    .peer_unflushed
                    .set(p.range.start, p.range.end - p.range.start);
            }
            // Every write the peer acknowledged before this flush is durable there (it applies
            // and acknowledges in order).
            (true, PendingKind::Flush) => st.peer_unflushed.clear_all(),
            // The peer's flush failed: what it acknowledged since its last good flush may be
            // lost there, so those regions become dirty here.
            (false, PendingKind::Flush) => {
                let runs: Vec<Range<u64>> = st.peer_unflushed.dirty_runs().collect();
                st.peer_unflushed.clear_all();
                let mut m = self.meta.borrow_mut();
                for r in runs {
                    let _ = m.mark_dirty(r.start, r.end - r.start);
                }
                st.oldest_unreplicated.get_or_insert(p.sent_at);
            }
            // A write the peer alone holds, or a resync's end.
            (true, _) | (false, PendingKind::Control) => {}
            (false, _) => {
                let _ = self
                    .meta
                    .borrow_mut()
                    .mark_dirty(p.range.start, p.range.end - p.range.start);
                // The peer lacks it: the RPO clock runs until a resync clears the bits.
                st.oldest_unreplicated.get_or_insert(p.sent_at);
            }
        }
        if p.al_held {
            // On both copies, or dirty just above (or earlier, by `make_room_by_going_ahead`).
            self.complete_write(p.range.clone());
        }
        if ok && p.kind == PendingKind::Resync {
            if let Some(r) = st.resync.as_mut() {
                r.progress.advance(bytes);
            }
        }
        if self.meta.borrow().bitmap().dirty_chunks() == 0 {
            st.oldest_unreplicated = None;
        }
        if let Some(w) = p.waiter.take() {
            let _ = w.send(ok);
        }
        drop(st);
        self.wake.notify_waiters();
    }

    /// The peer acknowledged `seq` (status 0 = durable).
    fn on_ack(&self, seq: u64, status: u32) {
        {
            let mut st = self.st.borrow_mut();
            match st.pending.get_mut(&seq) {
                Some(p) => p.peer_ok = Some(status == 0),
                None => {
                    tracing::warn!(volume = %self.settings.volume, seq, "ack for an unknown sequence number");
                    return;
                }
            }
            if status != 0 {
                st.counters.peer_write_errors += 1;
                st.peer_up_to_date = false;
                if !std::mem::replace(&mut st.peer_failed_logged, true) {
                    tracing::error!(volume = %self.settings.volume, seq, errno = status, error = %std::io::Error::from_raw_os_error(status as i32), "the peer failed to store a write: its copy is Outdated (Inconsistent during a resync), the region stays dirty here and is resynced at the next connection (logged once per connection; count: peer_write_errors)");
                    drop(st);
                    self.peer_copy_diverged();
                }
            }
        }
        self.try_finish(seq);
    }

    /// The peer's copy lacks a write this Primary completes (the peer failed to store it): a
    /// new generation begins here, durably and before that write completes, as when the peer
    /// is lost. The next connection then sees this copy ahead of the peer's by the bitmap and
    /// resyncs it, whatever happens to either process before.
    fn peer_copy_diverged(&self) {
        if self.role() != Role::Primary {
            return;
        }
        let r = gen::random_id().map_err(|e| e.to_string()).and_then(|new| {
            self.meta
                .borrow_mut()
                .update_state(|g, _| g.new_current(new))
                .map_err(|e| e.to_string())
        });
        if let Err(e) = r {
            tracing::error!(volume = %self.settings.volume, error = %e, "cannot record the new generation after the peer failed a write; drop the connection (`twinvol resync`) to resync it");
        }
    }

    fn local_done(&self, seq: u64) {
        if let Some(p) = self.st.borrow_mut().pending.get_mut(&seq) {
            p.local_done = true;
        }
        self.try_finish(seq);
    }

    /// A write on the Primary. `data` is shared, not copied, by the local write and the Data
    /// frame (an aligned buffer from the NBD server goes to the disk and to the socket as is).
    async fn write_primary(&self, offset: u64, data: Bytes, fua: bool) -> BlockResult<()> {
        if self.st.borrow().detached.is_some() {
            return self.write_through_peer(offset, data, fua).await;
        }
        // Without the peer, a write waits before it touches this disk while the peer could
        // still take over (`outdate_wait`, DRBD's I/O freeze): if this node is fenced meanwhile,
        // its copy holds nothing the new Primary lacks and no generation of its own.
        self.hold_while_peer_may_take_over().await;
        let len = data.len() as u64;
        let range = offset..offset + len;
        // The activity log covers the write against a crash of this node until both copies
        // hold it or its bits are set (`complete_write`); bits are set only for a write the
        // peer will not receive, or that fails on either side. Taken in the same step as the
        // check of the locks, so no resync or verify can lock the range in between.
        let mut prepared = Ok(());
        let mut counted_wait = false;
        self.wait_until(|v| {
            let free = {
                let st = v.st.borrow();
                // Bound first: the iterator borrows `st`, which must outlive it.
                #[allow(clippy::let_and_return)]
                let free = [&st.resync_lock, &st.verify_lock]
                    .into_iter()
                    .flatten()
                    .all(|l| !Self::overlaps(l, &range));
                free
            };
            if !free {
                return false;
            }
            let mut r = v.meta.borrow_mut().prepare_write(offset, len);
            // Async mode never holds the application for the peer: sent writes make room in
            // the log by becoming dirty instead.
            while matches!(r, Ok(Prepared::Wait))
                && v.settings.mode == ReplicationMode::Async
                && v.make_room_by_going_ahead(offset, len)
            {
                r = v.meta.borrow_mut().prepare_write(offset, len);
            }
            match r {
                Ok(Prepared::Ready(_)) => true,
                Ok(Prepared::Wait) => {
                    if !counted_wait {
                        counted_wait = true;
                        v.st.borrow_mut().counters.activity_log_waits += 1;
                    }
                    false
                }
                Err(e) => {
                    prepared = Err(e);
                    true
                }
            }
        })
        .await;
        if let Err(e) = prepared {
            let e = eio(
                format!(
                    "recording write {offset}+{len} in the metadata of {}",
                    self.settings.volume
                ),
                e,
            );
            // The metadata sits on this node's disk (or another local one): a failure there
            // is a disk error like any other.
            if self.try_detach("metadata write", &e) {
                return self.write_through_peer(offset, data, fua).await;
            }
            return Err(e);
        }
        let app_id = {
            let mut st = self.st.borrow_mut();
            let id = st.next_app;
            st.next_app += 1;
            st.app_ranges.insert(id, range.clone());
            id
        };
        let sent = self.replicate(offset, data.clone(), fua);
        let retry = data.clone();
        let res = self.local.write_bytes(offset, data, fua).await;
        self.st.borrow_mut().app_ranges.remove(&app_id);
        // This disk failed the write: detached, the peer serves it (and everything after);
        // otherwise the peer may or may not apply its copy, so the region is dirty and a
        // resync settles it.
        let detached = match &res {
            Err(e) => {
                let d = self.try_detach("write", e);
                if !d {
                    let _ = self.meta.borrow_mut().mark_dirty(offset, len);
                }
                d
            }
            Ok(()) => false,
        };
        if sent.is_none() {
            // Never sent: its bits are set (`mark_unsent`), so the log may let it go. A sent
            // write is let go when it leaves `pending` (`try_finish`, `teardown`).
            self.complete_write(range.clone());
        }
        self.wake.notify_waiters();
        if res.is_err() {
            if let Some((seq, _)) = sent {
                self.local_done(seq);
            }
            if detached {
                // Sent again, as one this disk lacks: the peer records it for this copy.
                return self.write_through_peer(offset, retry, fua).await;
            }
            return res;
        }
        if let Some((seq, rx)) = sent {
            self.local_done(seq);
            if self.settings.mode == ReplicationMode::Sync {
                // false or a dropped sender: the peer was lost; the region stays dirty and
                // the write completes on the local copy alone (the peer resyncs later).
                let _ = rx.await;
            }
        }
        // Without the peer (never sent, or lost before its ack): with `outdate_wait`, not
        // before the peer's copy is known outdated or the connection is back.
        self.hold_while_peer_may_take_over().await;
        Ok(())
    }

    /// The peer's copy can no longer be promoted without force (its heartbeat says it is not
    /// UpToDate, it stopped as Outdated, or this node fenced it before promoting): writes this
    /// Primary completes alone can no longer be lost by a promotion of the peer. Releases held
    /// writes and records [`DiskFlags::PEER_OUTDATED`] on a Primary (the start-up gate's proof
    /// that this copy is the newest).
    pub fn peer_outdated(&self) {
        let mut st = self.st.borrow_mut();
        if st.session.is_none() && !st.peer_outdated {
            st.peer_outdated = true;
            if st.held_writes > 0 {
                tracing::info!(volume = %self.settings.volume, held = st.held_writes, "the peer's copy is outdated: held writes complete on this copy alone");
            }
        }
        let record = st.session.is_none() && st.role == Role::Primary;
        drop(st);
        if record {
            self.record_peer_outdated(true);
        }
        self.wake.notify_waiters();
    }

    /// Sets or clears [`DiskFlags::PEER_OUTDATED`] durably (logged when the write fails).
    fn record_peer_outdated(&self, on: bool) {
        if self
            .meta
            .borrow()
            .superblock()
            .flags
            .has(DiskFlags::PEER_OUTDATED)
            == on
        {
            return;
        }
        if let Err(e) = self
            .meta
            .borrow_mut()
            .update_state(|_, f| f.set(DiskFlags::PEER_OUTDATED, on))
        {
            tracing::error!(volume = %self.settings.volume, error = %e, "cannot record whether the peer's copy is outdated");
        }
    }

    /// A Primary stops cleanly and no peer can take the service over: records
    /// [`DiskFlags::PRIMARY_CLEAN_STOP`], so that it may promote again after a start without
    /// hearing its peer. Returns whether it was recorded (a Secondary records nothing).
    pub fn record_clean_primary_stop(&self) -> Result<bool, VolumeError> {
        if self.role() != Role::Primary {
            return Ok(false);
        }
        self.meta
            .borrow_mut()
            .update_state(|_, f| f.set(DiskFlags::PRIMARY_CLEAN_STOP, true))
            .map_err(|e| self.meta_err(e))?;
        tracing::info!(volume = %self.settings.volume, "recorded: Primary at a clean stop with no peer to hand over to (this copy is the newest)");
        Ok(true)
    }

    /// Whether a write completing now would be acknowledged on this copy alone while the peer
    /// might still be promoted with a copy that lacks it (sync mode with `outdate_wait`).
    fn peer_may_take_over(&self, st: &State) -> bool {
        self.settings.mode == ReplicationMode::Sync
            && !self.settings.outdate_wait.is_zero()
            && st.role == Role::Primary
            && st.session.is_none()
            && !st.peer_outdated
    }

    /// Holds a write's completion while [`Self::peer_may_take_over`], at most until
    /// `outdate_wait` after the first write held since the connection was lost; after that
    /// deadline writes complete alone until the connection is lost again (said once in the log;
    /// status shows held writes).
    async fn hold_while_peer_may_take_over(&self) {
        let deadline = {
            let mut st = self.st.borrow_mut();
            if st.hold_expired || !self.peer_may_take_over(&st) {
                return;
            }
            *st.hold_until
                .get_or_insert_with(|| Instant::now() + self.settings.outdate_wait)
        };
        // Counted while held, also when the request is dropped (its client went away).
        let _held = HeldWrite::new(&self.st);
        let wait = deadline.saturating_duration_since(Instant::now());
        let released = tokio::time::timeout(
            wait,
            self.wait_until(|v| !v.peer_may_take_over(&v.st.borrow())),
        )
        .await
        .is_ok();
        let mut st = self.st.borrow_mut();
        if !released && !st.hold_expired {
            st.hold_expired = true;
            tracing::warn!(volume = %self.settings.volume, wait = ?self.settings.outdate_wait, "the peer's copy was not confirmed outdated in time: writes now complete on this copy alone, and a promotion of the peer would lack them");
        }
    }

    fn refuse_write(&self, what: &str) -> BlockError {
        BlockError::errno(
            format!(
                "{what} on volume {} refused: this node is Secondary",
                self.settings.volume
            ),
            libc::EROFS,
        )
    }

    async fn write_zero_pieces(&self, offset: u64, len: u64, fua: bool) -> BlockResult<()> {
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let n = (end - pos).min(ZERO_PIECE);
            let zeroes = self.local.alloc_buf(n as usize).into_bytes();
            self.write_primary(pos, zeroes, fua).await?;
            pos += n;
        }
        Ok(())
    }
}

impl<T: BlockTarget, D: MetaDevice> BlockTarget for MirroredVolume<T, D> {
    fn info(&self) -> &TargetInfo {
        &self.info
    }

    fn alloc_buf(&self, len: usize) -> AlignedBuf {
        self.local.alloc_buf(len)
    }

    fn alloc_buf_for_overwrite(&self, len: usize) -> AlignedBuf {
        self.local.alloc_buf_for_overwrite(len)
    }

    async fn read(&self, offset: u64, buf: AlignedBuf) -> (BlockResult<()>, AlignedBuf) {
        if self.st.borrow().detached.is_some() {
            return self.read_through_peer(offset, buf).await;
        }
        let (r, buf) = self.local.read(offset, buf).await;
        match &r {
            Err(e) if self.try_detach("read", e) => self.read_through_peer(offset, buf).await,
            _ => (r, buf),
        }
    }

    async fn write(
        &self,
        offset: u64,
        buf: AlignedBuf,
        fua: bool,
    ) -> (BlockResult<()>, AlignedBuf) {
        if self.role() != Role::Primary {
            let e = self.refuse_write("write");
            return (Err(e), buf);
        }
        // The payload is shared with the Data frame, which may outlive this call: the buffer
        // handed back is an empty one.
        let r = self.write_primary(offset, buf.into_bytes(), fua).await;
        (r, self.local.alloc_buf_for_overwrite(0))
    }

    async fn write_bytes(&self, offset: u64, data: Bytes, fua: bool) -> BlockResult<()> {
        if self.role() != Role::Primary {
            return Err(self.refuse_write("write"));
        }
        self.write_primary(offset, data, fua).await
    }

    async fn flush(&self) -> BlockResult<()> {
        if self.role() != Role::Primary {
            return self.local.flush().await;
        }
        if self.st.borrow().detached.is_some() {
            return self.flush_through_peer().await;
        }
        let sent = if self.settings.mode == ReplicationMode::Sync {
            let mut st = self.st.borrow_mut();
            Self::send_tracked(&mut st, PendingKind::Flush, 0..0, Instant::now(), |seq| {
                Message::Flush { seq }
            })
        } else {
            None
        };
        let r = self.local.flush().await;
        if let Some((_, rx)) = sent {
            let _ = rx.await;
        }
        match &r {
            // Writes this disk acknowledged may be lost: the peer holds them all.
            Err(e) if self.try_detach("flush", e) => self.flush_through_peer().await,
            _ => r,
        }
    }

    async fn trim(&self, offset: u64, len: u64, fua: bool) -> BlockResult<()> {
        if self.role() != Role::Primary {
            return Err(self.refuse_write("trim"));
        }
        self.write_zero_pieces(offset, len, fua).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> BlockResult<()> {
        if self.role() != Role::Primary {
            return Err(self.refuse_write("write-zeroes"));
        }
        if flags.fast {
            return Err(BlockError::errno(
                "fast zero is not offered by a mirrored volume",
                libc::ENOTSUP,
            ));
        }
        self.write_zero_pieces(offset, len, flags.fua).await
    }

    async fn cache(&self, offset: u64, len: u64) -> BlockResult<()> {
        if self.st.borrow().detached.is_some() {
            return Ok(());
        }
        self.local.cache(offset, len).await
    }

    async fn block_status(&self, offset: u64, len: u64) -> BlockResult<Vec<Extent>> {
        if self.st.borrow().detached.is_some() {
            // The local allocation map is not the peer's: report plain data.
            return Ok(vec![Extent {
                length: len,
                hole: false,
                zero: false,
            }]);
        }
        self.local.block_status(offset, len).await
    }
}

/// Shared handle used by the session and the runner.
pub type VolumeRc<T, D> = Rc<MirroredVolume<T, D>>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::mem::MemTarget;
    use crate::meta::al::AlGeometry;
    use crate::meta::bitmap::Granularity;
    use crate::meta::device::MemDevice;
    use crate::meta::store::CreateOptions;
    use crate::repl::wire::ResyncPayload;

    const MIB: u64 = 1 << 20;

    fn volume() -> MirroredVolume<MemTarget, MemDevice> {
        volume_with(ReplicationMode::Sync, std::time::Duration::ZERO)
    }

    fn volume_with(
        mode: ReplicationMode,
        outdate_wait: std::time::Duration,
    ) -> MirroredVolume<MemTarget, MemDevice> {
        volume_on(MemTarget::new(8 * MIB), mode, outdate_wait)
    }

    /// A volume of 8 MiB on `target` (4 KiB bitmap granularity, four 1 MiB activity-log
    /// extents).
    fn volume_on<T: BlockTarget>(
        target: T,
        mode: ReplicationMode,
        outdate_wait: std::time::Duration,
    ) -> MirroredVolume<T, MemDevice> {
        let opts = CreateOptions {
            granularity: Granularity::new(4096).unwrap(),
            al: AlGeometry::new(MIB, 4).unwrap(),
            external_data_size: Some(8 * MIB),
            ..Default::default()
        };
        let meta = MetaStore::create(MemDevice::new(4 * MIB), &opts).unwrap();
        let settings = Settings {
            volume: "data".into(),
            node: "a".into(),
            peer: "b".into(),
            mode,
            max_inflight_bytes: MIB,
            resync_rate_max: 100 * MIB,
            resync_rate_min: MIB,
            split_brain_policy: SplitBrainPolicy::Disconnect,
            ping_timeout: std::time::Duration::from_secs(1),
            checksum_resync: false,
            outdate_wait,
            on_disk_error: crate::config::DiskErrorPolicy::Detach,
        };
        MirroredVolume::new(target, meta, settings)
    }

    fn run<F: std::future::Future>(f: F) -> F::Output {
        crate::engine::block_on(crate::engine::EngineKind::Sync, f).unwrap()
    }

    #[test]
    fn a_secondary_refuses_writes_with_erofs_and_keeps_its_data() {
        run(async {
            let v = volume();
            let (r, _) = v
                .write(0, AlignedBuf::from_slice(&[7; 4096], 512), false)
                .await;
            assert_eq!(r.unwrap_err().raw_errno(), libc::EROFS);
            assert_eq!(v.local().snapshot(0, 4096), vec![0; 4096]);
        });
    }

    #[test]
    fn a_fresh_copy_is_promoted_only_with_force() {
        let v = volume();
        let e = v.promote(false).unwrap_err().to_string();
        assert!(e.contains("--force") && e.contains("never synced"), "{e}");
        assert_eq!(v.role(), Role::Secondary);
        v.promote(true).unwrap();
        assert_eq!(v.role(), Role::Primary);
        assert_eq!(v.status().disk, "up-to-date");
    }

    #[test]
    fn an_inconsistent_copy_refuses_promotion_unless_forced() {
        let v = volume();
        v.meta
            .borrow_mut()
            .update_state(|g, f| {
                g.current = 0x77;
                f.set(DiskFlags::CONSISTENT, false);
            })
            .unwrap();
        let e = v.promote(false).unwrap_err().to_string();
        assert!(e.contains("inconsistent"), "{e}");
        v.promote(true).unwrap();
        assert_ne!(v.meta.borrow().superblock().gen.current, 0x77);
    }

    #[test]
    fn a_disconnected_primary_writes_locally_and_tracks_what_the_peer_lacks() {
        run(async {
            let v = volume();
            v.promote(true).unwrap();
            let (r, _) = v
                .write(5 * 4096, AlignedBuf::from_slice(&[9; 8192], 512), true)
                .await;
            r.unwrap();
            assert_eq!(v.local().snapshot(5 * 4096, 8192), vec![9; 8192]);
            let s = v.status();
            assert_eq!(s.rpo_bytes, 8192);
            assert!(s.rpo_seconds >= 0.0);
            assert!(v.meta.borrow().bitmap().is_dirty(5 * 4096, 8192).unwrap());
            assert!(!v.meta.borrow().bitmap().is_dirty(0, 4096).unwrap());
        });
    }

    #[test]
    fn write_zeroes_is_a_tracked_write_and_fast_zero_is_refused() {
        run(async {
            let v = volume();
            v.promote(true).unwrap();
            let (r, _) = v
                .write(0, AlignedBuf::from_slice(&[1; 4096], 512), false)
                .await;
            r.unwrap();
            v.write_zeroes(0, 4096, ZeroFlags::default()).await.unwrap();
            assert_eq!(v.local().snapshot(0, 4096), vec![0; 4096]);
            let fast = ZeroFlags {
                fast: true,
                ..Default::default()
            };
            assert_eq!(
                v.write_zeroes(0, 4096, fast).await.unwrap_err().raw_errno(),
                libc::ENOTSUP
            );
        });
    }

    /// Writes a 4 KiB block at `block` on `v` and reports whether it completed within `ms`.
    async fn completes_within(
        v: &MirroredVolume<MemTarget, MemDevice>,
        block: u64,
        ms: u64,
    ) -> Option<BlockResult<()>> {
        let w = v.write_bytes(block * 4096, Bytes::from(vec![block as u8; 4096]), false);
        tokio::time::timeout(std::time::Duration::from_millis(ms), w)
            .await
            .ok()
    }

    /// Sync mode with `outdate_wait`, Primary, no connection: a write does not touch this copy
    /// (and is not acknowledged) until the peer's copy is known outdated, so a node fenced while
    /// it holds writes has nothing the new Primary lacks; after that, writes complete at once
    /// until the connection is lost again.
    #[test]
    fn a_write_without_the_peer_waits_for_the_peer_to_be_outdated() {
        run(async {
            let v = volume_with(ReplicationMode::Sync, std::time::Duration::from_secs(30));
            v.promote(true).unwrap();
            let w = v.write_bytes(0, Bytes::from(vec![7u8; 4096]), false);
            tokio::pin!(w);
            let early = tokio::time::timeout(std::time::Duration::from_millis(300), &mut w).await;
            assert!(early.is_err(), "acknowledged before the peer was outdated");
            assert_eq!(
                v.local().snapshot(0, 4096),
                vec![0; 4096],
                "written to this copy while the peer could still take over"
            );
            let s = v.status();
            assert_eq!(s.held_writes, 1);
            assert!(!s.peer_outdated);
            v.peer_outdated();
            tokio::time::timeout(std::time::Duration::from_secs(5), &mut w)
                .await
                .expect("still held after the peer was outdated")
                .unwrap();
            assert_eq!(v.local().snapshot(0, 4096), vec![7; 4096]);
            assert_eq!(v.status().held_writes, 0);
            assert!(v.status().peer_outdated);
            completes_within(&v, 1, 100)
                .await
                .expect("held although the peer is outdated")
                .unwrap();
            // A new loss forgets the confirmation: the next write waits again.
            v.st.borrow_mut().session = Some(SessionTx {
                id: 7,
                tx: tokio::sync::mpsc::unbounded_channel().0,
                kill: Rc::new(Notify::new()),
            });
            v.teardown(7, false);
            assert!(
                completes_within(&v, 2, 200).await.is_none(),
                "a new loss did not hold"
            );
        });
    }

    /// The wait ends at `outdate_wait` after the first held write; later writes then complete
    /// at once. Async mode, and sync mode without the setting, never hold.
    #[test]
    fn the_hold_ends_at_its_deadline_and_only_sync_mode_with_the_setting_holds() {
        run(async {
            let v = volume_with(ReplicationMode::Sync, std::time::Duration::from_millis(400));
            v.promote(true).unwrap();
            let t0 = Instant::now();
            let (a, b) = tokio::join!(completes_within(&v, 0, 5000), async {
                tokio::time::sleep(std::time::Duration::from_millis(150)).await;
                completes_within(&v, 1, 5000).await
            });
            a.expect("never completed").unwrap();
            b.expect("never completed").unwrap();
            let took = t0.elapsed();
            assert!(
                took >= std::time::Duration::from_millis(390)
                    && took < std::time::Duration::from_millis(2000),
                "both writes should end at the first one's deadline, took {took:?}"
            );
            completes_within(&v, 2, 100)
                .await
                .expect("held after the deadline")
                .unwrap();
            for v in [
                volume_with(ReplicationMode::Async, std::time::Duration::from_secs(30)),
                volume_with(ReplicationMode::Sync, std::time::Duration::ZERO),
            ] {
                v.promote(true).unwrap();
                completes_within(&v, 0, 100)
                    .await
                    .expect("held without sync mode and outdate_wait")
                    .unwrap();
            }
        });
    }

    /// A connected session whose frames land in the returned receiver.
    fn connect_fake<T: BlockTarget>(
        v: &MirroredVolume<T, MemDevice>,
        id: u64,
    ) -> tokio::sync::mpsc::UnboundedReceiver<Message> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        v.st.borrow_mut().session = Some(SessionTx {
            id,
            tx,
            kill: Rc::new(Notify::new()),
        });
        rx
    }

    fn in_flight(v: &MirroredVolume<MemTarget, MemDevice>) -> u64 {
        v.meta.borrow().activity_log().in_flight()
    }

    /// Sync mode: the activity log keeps a sent write's extent until the peer's ack; a write
    /// that finds all four slots busy waits, counted, and proceeds once an ack frees one. A
    /// write never sent releases its extent at once; the loss of the peer sets the bits of
    /// what was in flight and releases it.
    #[test]
    fn sync_mode_keeps_a_sent_write_in_the_activity_log_until_its_ack() {
        run(async {
            let v = volume_with(ReplicationMode::Sync, std::time::Duration::ZERO);
            v.promote(true).unwrap();
            // Not connected: written locally, bits set, extent released.
            completes_within(&v, 0, 1000).await.unwrap().unwrap();
            assert_eq!(in_flight(&v), 0);
            let mut rx = connect_fake(&v, 3);
            let done = std::cell::Cell::new(0u32);
            let write = |block: u64| {
                let (v, done) = (&v, &done);
                async move {
                    v.write_bytes(block * 4096, Bytes::from(vec![block as u8; 4096]), false)
                        .await
                        .unwrap();
                    done.set(done.get() + 1);
                }
            };
            // Four writes, one per 1 MiB extent, then a fifth in a fifth extent.
            let writes = async {
                tokio::join!(write(0), write(256), write(512), write(768), async {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    write(1024).await
                });
            };
            let peer = async {
                let mut seqs = Vec::new();
                while seqs.len() < 4 {
                    if let Some(Message::Data(d)) = rx.recv().await {
                        seqs.push((d.seq, d.offset));
                    }
                }
                tokio::time::sleep(std::time::Duration::from_millis(150)).await;
                assert_eq!(in_flight(&v), 4);
                assert_eq!(done.get(), 0);
                assert_eq!(v.status().counters.activity_log_waits, 1);
                assert!(
                    rx.try_recv().is_err(),
                    "the fifth write was sent before a slot freed"
                );
                // The peer acks the write in extent 1: its slot frees, the fifth write goes.
                let (seq1, _) = seqs.iter().copied().find(|(_, o)| *o == MIB).unwrap();
                v.on_ack(seq1, 0);
                let Some(Message::Data(d5)) = rx.recv().await else {
                    panic!("no fifth Data frame")
                };
                assert_eq!(d5.offset, 4 * MIB);
                assert!(!v.meta.borrow().activity_log().is_hot(1));
                v.on_ack(d5.seq, 0);
                // The loss of the peer sets the bits of the rest and releases them.
                v.teardown(3, false);
            };
            tokio::join!(writes, peer);
            assert_eq!(done.get(), 5);
            assert_eq!(in_flight(&v), 0);
            assert!(v.meta.borrow().bitmap().is_dirty(2 * MIB, 4096).unwrap());
            assert!(!v.meta.borrow().bitmap().is_dirty(MIB, 4096).unwrap());
            assert!(!v.meta.borrow().bitmap().is_dirty(4 * MIB, 4096).unwrap());
        });
    }

    /// Async mode never holds the application for the peer: with all four slots busy with
    /// sent, unacknowledged writes, a write to a fifth extent makes the least recently used
    /// one's writes dirty, releases them and goes ahead; their later acks release nothing
    /// twice.
    #[test]
    fn async_mode_makes_room_in_the_activity_log_by_going_ahead() {
        run(async {
            let v = volume_with(ReplicationMode::Async, std::time::Duration::ZERO);
            v.promote(true).unwrap();
            let mut rx = connect_fake(&v, 4);
            for e in 0..4u64 {
                completes_within(&v, e * 256, 1000).await.unwrap().unwrap();
            }
            assert_eq!(in_flight(&v), 4);
            completes_within(&v, 1024, 100)
                .await
                .expect("async write held by the activity log")
                .unwrap();
            let s = v.status();
            assert_eq!(s.counters.activity_log_waits, 0);
            assert_eq!(s.counters.ahead_events, 1);
            assert!(s.ahead);
            // Extent 0's sent write is dirty now; the fifth write was not sent (ahead) and
            // left the log after its local write.
            assert!(v.meta.borrow().bitmap().is_dirty(0, 4096).unwrap());
            assert!(v.meta.borrow().bitmap().is_dirty(4 * MIB, 4096).unwrap());
            assert!(!v.meta.borrow().activity_log().is_hot(0));
            assert_eq!(in_flight(&v), 3);
            let mut seqs = Vec::new();
            while let Ok(m) = rx.try_recv() {
                if let Message::Data(d) = m {
                    seqs.push(d.seq);
                }
            }
            assert_eq!(
                seqs.len(),
                4,
                "the fifth write must not be sent while ahead"
            );
            for seq in seqs {
                v.on_ack(seq, 0);
            }
            assert_eq!(in_flight(&v), 0);
            // The acks do not clear what going ahead marked: the resync sends it.
            assert!(v.meta.borrow().bitmap().is_dirty(0, 4096).unwrap());
        });
    }

    /// A [`MemTarget`] whose reads, while `hold` is set, take their copy of the data and then
    /// wait for `release` before returning: a resync read that holds its snapshot of a piece
    /// and has not sent it yet.
    struct HeldReads {
        mem: MemTarget,
        hold: std::cell::Cell<bool>,
        took: Notify,
        release: Notify,
    }

    impl BlockTarget for HeldReads {
        fn info(&self) -> &TargetInfo {
            self.mem.info()
        }
        fn alloc_buf(&self, len: usize) -> AlignedBuf {
            self.mem.alloc_buf(len)
        }
        async fn read(&self, offset: u64, buf: AlignedBuf) -> (BlockResult<()>, AlignedBuf) {
            let r = self.mem.read(offset, buf).await;
            if self.hold.get() {
                self.took.notify_one();
                self.release.notified().await;
            }
            r
        }
        async fn write(
            &self,
            offset: u64,
            buf: AlignedBuf,
            fua: bool,
        ) -> (BlockResult<()>, AlignedBuf) {
            self.mem.write(offset, buf, fua).await
        }
        async fn flush(&self) -> BlockResult<()> {
            self.mem.flush().await
        }
        async fn trim(&self, offset: u64, len: u64, fua: bool) -> BlockResult<()> {
            self.mem.trim(offset, len, fua).await
        }
        async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> BlockResult<()> {
            self.mem.write_zeroes(offset, len, flags).await
        }
        async fn cache(&self, offset: u64, len: u64) -> BlockResult<()> {
            self.mem.cache(offset, len).await
        }
        async fn block_status(&self, offset: u64, len: u64) -> BlockResult<Vec<Extent>> {
            self.mem.block_status(offset, len).await
        }
    }

    /// The resync lock: an application write to a piece the resync has read but not yet sent
    /// waits until the piece is on its way, so its Data frame follows the ResyncData frame
    /// and the peer ends with the new bytes. (Were the write to go first, the peer would apply
    /// it and then the resync's older snapshot over it, and the bit would be cleared.)
    #[test]
    fn an_application_write_waits_for_the_resync_piece_it_overlaps() {
        run(async {
            let target = HeldReads {
                mem: MemTarget::new(8 * MIB),
                hold: std::cell::Cell::new(false),
                took: Notify::new(),
                release: Notify::new(),
            };
            let v = Rc::new(volume_on(
                target,
                ReplicationMode::Sync,
                std::time::Duration::ZERO,
            ));
            v.promote(true).unwrap();
            // Written while disconnected: block 0 holds 1s and is dirty.
            v.write_bytes(0, Bytes::from(vec![1u8; 4096]), false)
                .await
                .unwrap();
            assert!(v.meta.borrow().bitmap().is_dirty(0, 4096).unwrap());
            let mut rx = connect_fake(&v, 5);
            v.local().hold.set(true);
            let resync = tokio::task::spawn_local(v.clone().resync_source(5, false, false));
            // The resync holds its snapshot of block 0 (1s); the application writes 2s there.
            v.local().took.notified().await;
            v.local().hold.set(false);
            let w = {
                let v = v.clone();
                tokio::task::spawn_local(async move {
                    v.write_bytes(0, Bytes::from(vec![2u8; 4096]), false).await
                })
            };
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            v.local().release.notify_one();
            // The peer applies what arrives, in order, and acknowledges it.
            let mut peer = vec![0u8; 4096];
            let mut order = Vec::new();
            while !(w.is_finished() && resync.is_finished()) {
                let m = tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv())
                    .await
                    .expect("nothing sent for 5 s")
                    .expect("session channel closed");
                match m {
                    Message::Data(d) => {
                        peer[d.offset as usize..][..d.data.len()].copy_from_slice(&d.data);
                        order.push("data");
                        v.on_ack(d.seq, 0);
                    }
                    Message::ResyncData(r) => {
                        if let ResyncPayload::Bytes(b) = r.payload {
                            peer[r.offset as usize..][..b.len()].copy_from_slice(&b);
                        }
                        order.push("resync");
                        v.on_ack(r.seq, 0);
                    }
                    Message::ResyncDone { seq } => v.on_ack(seq, 0),
                    other => panic!("unexpected {:?}", other.kind()),
                }
                tokio::task::yield_now().await;
            }
            w.await.unwrap().unwrap();
            resync.await.unwrap();
            assert_eq!(v.local().mem.snapshot(0, 4096), vec![2u8; 4096]);
            assert!(
                peer == vec![2u8; 4096],
                "the peer's copy differs (frames in the order {order:?})"
            );
            assert_eq!(
                order,
                ["resync", "data"],
                "the write overtook the resync piece"
            );
            assert!(!v.meta.borrow().bitmap().is_dirty(0, 4096).unwrap());
        });
    }
}
