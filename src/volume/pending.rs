//! Outstanding sequence numbers: queuing tracked messages, the peer's acks and what a
//! completed or failed one does to the bitmap.

use std::ops::Range;
use std::time::Instant;

use tokio::sync::oneshot;

use super::state::{Pending, PendingKind, State};
use super::{MirroredVolume, Role};
use crate::block::BlockTarget;
use crate::meta::device::MetaDevice;
use crate::meta::gen;
use crate::repl::wire::Message;

impl<T: BlockTarget, D: MetaDevice> MirroredVolume<T, D> {
    /// Queues `msg` on the session (sent at `now`); returns its seq and a receiver for the
    /// peer's verdict.
    pub(super) fn send_tracked(
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

    /// Clears the bits of `range` except chunks an unsent write touched.
    pub(super) fn clear_synced(&self, st: &State, range: Range<u64>) {
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
    pub(super) fn complete_write(&self, range: Range<u64>) {
        if !self
            .meta
            .borrow_mut()
            .complete_write(range.start, range.end - range.start)
        {
            tracing::error!(volume = %self.settings.volume, offset = range.start, len = range.end - range.start, "activity log: a write ended that was not in flight (bookkeeping bug; the log stays conservative)");
            debug_assert!(false, "complete_write without prepare_write: {range:?}");
        }
    }

    pub(super) fn try_finish(&self, seq: u64) {
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
    pub(super) fn on_ack(&self, seq: u64, status: u32) {
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
    pub(super) fn peer_copy_diverged(&self) {
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

    pub(super) fn local_done(&self, seq: u64) {
        if let Some(p) = self.st.borrow_mut().pending.get_mut(&seq) {
            p.local_done = true;
        }
        self.try_finish(seq);
    }
}
