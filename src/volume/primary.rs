//! The Primary's write path: replication of application writes, zeroes and trims, and the
//! [`BlockTarget`](crate::block::BlockTarget) the NBD server exports.

use std::ops::Range;
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::oneshot;

use super::state::{HeldWrite, PendingKind, State};
use super::{eio, MirroredVolume, Role, VolumeError};
use crate::block::{BlockError, BlockResult, BlockTarget, Extent, TargetInfo, ZeroFlags};
use crate::config::ReplicationMode;
use crate::engine::buf::AlignedBuf;
use crate::meta::device::MetaDevice;
use crate::meta::gen::{self, DiskFlags};
use crate::meta::store::Prepared;
use crate::repl::wire::{Data, DataFlags, Message};

/// Largest payload of one Data frame made from WRITE_ZEROES/TRIM.
const ZERO_PIECE: u64 = 1 << 20;

impl<T: BlockTarget, D: MetaDevice> MirroredVolume<T, D> {
    /// Registers an application write and queues it to the peer when that is allowed.
    pub(super) fn replicate(
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
    pub(super) fn begin_lone_generation(&self) {
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
    pub(super) fn go_ahead(&self, st: &mut State, why: &str) {
        st.ahead = true;
        st.counters.ahead_events += 1;
        tracing::warn!(volume = %self.settings.volume, inflight = st.inflight_bytes, bound = self.settings.max_inflight_bytes, "{why}: going ahead (data stays dirty, resync when the link catches up)");
    }

    /// A write the peer will not receive: its chunks become dirty (before the local write is
    /// issued) and no resync ack may clear them while this connection lasts.
    pub(super) fn mark_unsent(&self, st: &mut State, offset: u64, len: u64) {
        let _ = st.unsent.set(offset, len);
        self.mark_unreplicated(st, offset, len);
    }

    /// A write the peer may not hold: its chunks become dirty, and the RPO clock starts if it
    /// was not running.
    pub(super) fn mark_unreplicated(&self, st: &mut State, offset: u64, len: u64) {
        let _ = self.meta.borrow_mut().mark_dirty(offset, len);
        if st.oldest_unreplicated.is_none() {
            st.oldest_unreplicated = Some(Instant::now());
        }
    }

    /// Async mode, every activity-log slot busy: the sent writes in the least recently used
    /// busy extent (other than the new write's own) become dirty and leave the log, and the
    /// volume goes ahead, so the resync after the link catches up sends them again. Returns
    /// false when no sent write held such an extent (the slots are busy with local writes,
    /// which end on their own).
    pub(super) fn make_room_by_going_ahead(&self, offset: u64, len: u64) -> bool {
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

    /// A write on the Primary. `data` is shared, not copied, by the local write and the Data
    /// frame (an aligned buffer from the NBD server goes to the disk and to the socket as is).
    pub(super) async fn write_primary(
        &self,
        offset: u64,
        data: Bytes,
        fua: bool,
    ) -> BlockResult<()> {
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
    pub(super) fn record_peer_outdated(&self, on: bool) {
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
    pub(super) fn peer_may_take_over(&self, st: &State) -> bool {
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
    pub(super) async fn hold_while_peer_may_take_over(&self) {
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

    pub(super) fn refuse_write(&self, what: &str) -> BlockError {
        BlockError::errno(
            format!(
                "{what} on volume {} refused: this node is Secondary",
                self.settings.volume
            ),
            libc::EROFS,
        )
    }

    pub(super) async fn write_zero_pieces(
        &self,
        offset: u64,
        len: u64,
        fua: bool,
    ) -> BlockResult<()> {
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
