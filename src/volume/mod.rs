//! `volume`: the mirrored volume, a local leg plus a peer leg with dirty tracking.
//!
//! - [`MirroredVolume`] implements [`BlockTarget`]: the NBD server exports it on the Primary.
//! - [`plan`]: what a connection does after the Hellos (resync direction, split-brain policy).
//! - [`session`]: one replication connection: handshake, bitmap exchange, the read loop.
//! - `state`, `pending`: the volume's mutable state and its outstanding sequence numbers.
//! - `primary`, `secondary`, `resync`: the write path, the apply path, the resync source.
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

pub mod bitmap_exchange;
pub mod control;
pub mod degraded;
mod detach;
pub mod link_health;
mod pending;
pub mod plan;
mod primary;
mod resync;
pub mod run;
mod secondary;
pub mod session;
mod state;
pub mod status;
pub mod verify;

use std::cell::RefCell;
use std::collections::HashMap;
use std::ops::Range;
use std::rc::Rc;
use std::time::Instant;

use tokio::sync::Notify;

use crate::block::{BlockError, BlockTarget, TargetInfo};
use crate::config::{ReplicationMode, SplitBrainPolicy};
use crate::fibhash::FibMap;
use crate::meta::bitmap::DirtyBitmap;
use crate::meta::device::MetaDevice;
use crate::meta::gen::{self, DiskFlags, JUST_CREATED};
use crate::meta::store::{MetaStore, StoreError};
use crate::repl::resync::RateController;
use crate::repl::wire::Message;

use state::{PendingKind, State};

pub use status::{
    Connection, Counters, NewestProof, ResyncRole, ResyncStatus, Role, VerifyStatus, VolumeStatus,
};

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
}

/// Shared handle used by the session and the runner.
pub type VolumeRc<T, D> = Rc<MirroredVolume<T, D>>;

#[cfg(test)]
mod tests;
