//! The Secondary's side: applying received writes in sequence order, flushes, marking the
//! copy Outdated, and finishing as a resync target.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::ops::Range;
use std::rc::Rc;
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::Notify;

use super::session::from_generations;
use super::state::ResyncRun;
use super::{MirroredVolume, ResyncRole};
use crate::block::BlockTarget;
use crate::meta::bitmap::DirtyBitmap;
use crate::meta::device::MetaDevice;
use crate::meta::gen::DiskFlags;
use crate::meta::store::StoreError;
use crate::repl::resync::Progress;
use crate::repl::wire::Hello;

/// Received writes being applied: writes to disjoint ranges run concurrently (at most
/// [`APPLY_WINDOW`]); a write overlapping one in progress waits for it, so the device ends
/// exactly as if every frame were applied one by one in sequence order. Flush and ResyncDone
/// wait for all of them.
#[derive(Default, Clone)]
pub(super) struct Applying {
    ranges: Rc<RefCell<HashMap<u64, Range<u64>>>>,
    next: Rc<Cell<u64>>,
    done: Rc<Notify>,
}

/// Received writes applied concurrently.
pub(super) const APPLY_WINDOW: usize = 64;

/// A write's place among those being applied; released on drop.
pub(super) struct ApplySlot {
    owner: Applying,
    id: u64,
}

impl Drop for ApplySlot {
    fn drop(&mut self) {
        self.owner.ranges.borrow_mut().remove(&self.id);
        self.owner.done.notify_waiters();
    }
}

impl Applying {
    pub(super) async fn wait(&self, ready: impl Fn(&HashMap<u64, Range<u64>>) -> bool) {
        loop {
            let n = self.done.notified();
            tokio::pin!(n);
            n.as_mut().enable();
            if ready(&self.ranges.borrow()) {
                return;
            }
            n.await;
        }
    }

    /// Waits until `range` overlaps no write in progress and the window has room, then takes
    /// a slot.
    pub(super) async fn admit(&self, range: Range<u64>) -> ApplySlot {
        self.wait(|m| {
            m.len() < APPLY_WINDOW
                && m.values()
                    .all(|r| !(r.start < range.end && range.start < r.end))
        })
        .await;
        let id = self.next.get();
        self.next.set(id + 1);
        self.ranges.borrow_mut().insert(id, range);
        ApplySlot {
            owner: self.clone(),
            id,
        }
    }

    /// Waits until every write in progress completed.
    pub(super) async fn drain(&self) {
        self.wait(|m| m.is_empty()).await;
    }
}

impl<T: BlockTarget, D: MetaDevice> MirroredVolume<T, D> {
    /// Sets Outdated and clears UpToDate in the superblock (in memory even when the write
    /// fails), unless they are so already. Returns whether the flags changed.
    pub(super) fn flag_outdated(&self) -> Result<bool, StoreError> {
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
    pub(super) fn apply_failed(&self, offset: u64, len: u64, errno: u32) {
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

    /// Flushes this Secondary's device after the writes applied so far; returns the Ack status.
    /// A failed flush may have lost every write acknowledged since the last good one: they
    /// become dirty here and the copy Outdated before the failure is acknowledged, so the next
    /// connection resyncs them.
    pub(super) async fn flush_applied(&self, unflushed: &RefCell<DirtyBitmap>) -> u32 {
        match self.local.flush().await {
            Ok(()) => {
                unflushed.borrow_mut().clear_all();
                0
            }
            Err(e) => {
                let errno = e.raw_errno() as u32;
                let runs: Vec<Range<u64>> = unflushed.borrow().dirty_runs().collect();
                unflushed.borrow_mut().clear_all();
                {
                    let mut m = self.meta.borrow_mut();
                    for r in &runs {
                        let _ = m.mark_dirty(r.start, r.end - r.start);
                    }
                    let _ = m.persist_bitmap();
                }
                let bytes: u64 = runs.iter().map(|r| r.end - r.start).sum();
                self.apply_failed(0, bytes, errno);
                errno
            }
        }
    }

    /// Marks this copy Inconsistent (durably) when a resync begins without a connect-time plan
    /// (async catch-up after "ahead").
    pub(super) async fn mark_target(&self) {
        let needs = {
            let m = self.meta.borrow();
            m.superblock().flags.has(DiskFlags::CONSISTENT)
        };
        if needs {
            let r = self.meta.borrow_mut().update_state(|_, f| {
                f.set(DiskFlags::CONSISTENT, false);
                f.set(DiskFlags::UP_TO_DATE, false);
            });
            if let Err(e) = r {
                tracing::error!(volume = %self.settings.volume, error = %e, "cannot mark the resync target inconsistent");
            }
            let mut st = self.st.borrow_mut();
            if st.resync.is_none() {
                st.resync = Some(ResyncRun {
                    role: ResyncRole::Target,
                    progress: Progress::new(u64::MAX / 2, Instant::now()),
                });
            }
        }
    }

    /// Writes one received region; returns the Ack status (0 or errno). A payload the link
    /// received aligned goes to the disk without a copy.
    pub(super) async fn apply(&self, offset: u64, data: Bytes, fua: bool) -> u32 {
        if offset
            .checked_add(data.len() as u64)
            .is_none_or(|e| e > self.info.size)
        {
            tracing::error!(volume = %self.settings.volume, offset, len = data.len(), "peer wrote beyond the device; refused");
            return libc::EINVAL as u32;
        }
        match self.local.write_bytes(offset, data, fua).await {
            Ok(()) => 0,
            Err(e) => {
                // The callers mark the copy and log the first failure; this is every one.
                tracing::debug!(volume = %self.settings.volume, error = %e, "applying a replicated write failed");
                e.raw_errno() as u32
            }
        }
    }

    /// This resync target failed to store resync data (`errno`): the resync must not finish,
    /// so this copy stays Inconsistent (it is already, since the resync began) and the source
    /// keeps the region dirty. Logged once per resync.
    pub(super) fn resync_apply_failed(&self, offset: u64, len: u64, errno: u32) {
        let mut st = self.st.borrow_mut();
        st.counters.local_apply_errors += 1;
        if !std::mem::replace(&mut st.resync_apply_failed, true) {
            let error = std::io::Error::from_raw_os_error(errno as i32);
            tracing::error!(volume = %self.settings.volume, offset, len, %error, "this copy failed to store resync data: it stays INCONSISTENT and the resync will not finish; check the device, then run `twinvol resync` (logged once per resync; count: local_apply_errors)");
        }
    }

    pub(super) async fn finish_as_target(&self, source: &Hello) -> u32 {
        // Every piece before ResyncDone has been applied (the receiver drained them).
        if std::mem::replace(&mut self.st.borrow_mut().resync_apply_failed, false) {
            self.st.borrow_mut().resync = None;
            return libc::EIO as u32;
        }
        if let Err(e) = self.local.flush().await {
            return e.raw_errno() as u32;
        }
        let src = from_generations(&source.generations);
        let mut m = self.meta.borrow_mut();
        let mut clean = m.bitmap().clone();
        clean.clear_all();
        let r = m
            .replace_bitmap(clean)
            .and_then(|_| m.persist_bitmap().map(|_| ()))
            .and_then(|_| {
                m.update_state(|g, f| {
                    let full = g.current == crate::meta::gen::JUST_CREATED;
                    g.resync_finished_as_target(&src, full);
                    f.set(DiskFlags::CONSISTENT, true);
                    f.set(DiskFlags::UP_TO_DATE, true);
                    f.set(DiskFlags::OUTDATED, false);
                    f.set(DiskFlags::INITIAL_SYNC_DONE, true);
                })
            });
        drop(m);
        self.st.borrow_mut().resync = None;
        match r {
            Ok(()) => {
                self.st.borrow_mut().apply_failed = false;
                tracing::info!(volume = %self.settings.volume, "resync finished: this copy is up to date");
                0
            }
            Err(e) => {
                tracing::error!(volume = %self.settings.volume, error = %e, "cannot record the finished resync");
                libc::EIO as u32
            }
        }
    }
}
