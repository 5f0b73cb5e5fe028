//! The resync source: walks the dirty bitmap in pieces, sends them (or InSync when a block
//! digest matches), and the async-mode watch that resyncs what an "ahead" volume left behind.

use std::ops::Range;
use std::rc::Rc;
use std::time::Instant;

use super::state::{PendingKind, ResyncRun};
use super::{MirroredVolume, ResyncRole};
use crate::block::BlockTarget;
use crate::config::ReplicationMode;
use crate::meta::device::MetaDevice;
use crate::meta::gen::DiskFlags;
use crate::repl::resync::{pieces, Progress};
use crate::repl::verify::{chunk_runs, VERIFY_BLOCK};
use crate::repl::wire::{Message, ResyncData, ResyncPayload};

/// Largest resync piece.
const RESYNC_PIECE: u64 = 1 << 20;
/// Resync pieces in flight.
const RESYNC_WINDOW: usize = 8;

impl<T: BlockTarget + 'static, D: MetaDevice + 'static> MirroredVolume<T, D> {
    /// A resync run in `role` over the bytes the bitmap holds dirty now.
    pub(super) fn resync_run(&self, role: ResyncRole) -> ResyncRun {
        let total = self.meta.borrow().bitmap().dirty_bytes();
        ResyncRun {
            role,
            progress: Progress::new(total, Instant::now()),
        }
    }

    /// Async mode: when the volume went ahead and everything sent was acknowledged, resync
    /// the bits left behind.
    pub(super) async fn ahead_watch(self: Rc<Self>, session_id: u64) {
        loop {
            self.wait_until(|v| {
                let st = v.st.borrow();
                st.ahead && st.inflight_bytes == 0 && st.resync.is_none()
            })
            .await;
            if !self.session_is(session_id) {
                return;
            }
            {
                let mut st = self.st.borrow_mut();
                st.ahead = false;
                st.resync = Some(self.resync_run(ResyncRole::Source));
            }
            tracing::info!(volume = %self.settings.volume, "link caught up: resyncing what was left behind");
            self.clone().resync_source(session_id, false, false).await;
        }
    }

    /// Sends every dirty region as ResyncData (rate-limited, windowed), then ResyncDone; on
    /// success records the finished resync (`by_generation`: the resync came from the
    /// connect decision and the generation ids move on). `checksum`: each piece's block CRCs
    /// are compared with the peer's first (VerifyRequest), chunks without a differing block
    /// go as InSync (no data), the others as bytes.
    pub(super) async fn resync_source(
        self: Rc<Self>,
        session_id: u64,
        by_generation: bool,
        checksum: bool,
    ) {
        let runs: Vec<Range<u64>> = self.meta.borrow().bitmap().dirty_runs().collect();
        let gran = u64::from(self.meta.borrow().superblock().granularity.bytes());
        for run in runs {
            for piece in pieces(run, RESYNC_PIECE, gran) {
                if !self.session_is(session_id) {
                    return;
                }
                let len = piece.end - piece.start;
                let wait = self.st.borrow_mut().rate.take(len, Instant::now());
                if !wait.is_zero() {
                    tokio::time::sleep(wait).await;
                }
                // The window, and in async mode also the in-flight bound shared with the
                // application's Data frames (one piece may always go when nothing is in flight).
                let bound = (self.settings.mode == ReplicationMode::Async)
                    .then_some(self.settings.max_inflight_bytes);
                self.wait_until(|v| {
                    let st = v.st.borrow();
                    st.pending
                        .values()
                        .filter(|p| p.kind == PendingKind::Resync)
                        .count()
                        < RESYNC_WINDOW
                        && bound
                            .is_none_or(|b| st.inflight_bytes == 0 || st.inflight_bytes + len <= b)
                })
                .await;
                // Lock the piece against new application writes, wait for those in flight.
                self.st.borrow_mut().resync_lock = Some(piece.clone());
                self.wait_app_writes_clear(&piece).await;
                let buf = self.local.alloc_buf_for_overwrite(len as usize);
                let (r, buf) = self.local.read(piece.start, buf).await;
                if let Err(e) = r {
                    tracing::error!(volume = %self.settings.volume, error = %e, "resync read failed; dropping the connection");
                    self.st.borrow_mut().resync_lock = None;
                    self.wake.notify_waiters();
                    self.drop_session("resync read failed");
                    return;
                }
                let data = buf.into_bytes();
                let runs = match checksum {
                    true => self
                        .peer_differing_blocks(session_id, piece.clone(), &data)
                        .await
                        .map(|d| chunk_runs(piece.start, len, VERIFY_BLOCK, gran, &d)),
                    false => None,
                }
                .unwrap_or_else(|| vec![(piece.clone(), false)]);
                {
                    let mut st = self.st.borrow_mut();
                    let _ = st.unsent.clear(piece.start, len);
                    for (part, in_sync) in runs {
                        let (offset, plen) = (part.start, part.end - part.start);
                        let payload = if in_sync {
                            ResyncPayload::InSync
                        } else {
                            let at = (part.start - piece.start) as usize;
                            ResyncPayload::Bytes(data.slice(at..at + plen as usize))
                        };
                        let sent = Self::send_tracked(
                            &mut st,
                            PendingKind::Resync,
                            part,
                            Instant::now(),
                            |seq| {
                                Message::ResyncData(ResyncData {
                                    seq,
                                    offset,
                                    length: plen as u32,
                                    payload,
                                })
                            },
                        );
                        if sent.is_some() {
                            if in_sync {
                                st.counters.resync_bytes_in_sync += plen;
                            } else {
                                st.counters.resync_bytes_sent += plen;
                            }
                        }
                    }
                    st.resync_lock = None;
                }
                self.wake.notify_waiters();
            }
        }
        self.wait_until(|v| {
            !v.session_is(session_id)
                || v.st
                    .borrow()
                    .pending
                    .values()
                    .all(|p| p.kind != PendingKind::Resync)
        })
        .await;
        let done = {
            let mut st = self.st.borrow_mut();
            let sent =
                Self::send_tracked(&mut st, PendingKind::Control, 0..0, Instant::now(), |seq| {
                    Message::ResyncDone { seq }
                });
            if sent.is_some() && by_generation {
                st.peer_may_hold_current = true;
            }
            sent
        };
        let Some((_, rx)) = done else { return };
        match rx.await {
            Ok(true) => {}
            Ok(false) => {
                self.st.borrow_mut().peer_may_hold_current = false;
                // The peer failed to store some of it (or to record the end): it stays
                // Inconsistent, and the pieces it failed stay dirty here.
                tracing::error!(volume = %self.settings.volume, left = self.meta.borrow().bitmap().dirty_bytes(), "the peer could not finish the resync (it failed to store resync data or to record the end): its copy stays Inconsistent; after its device is fixed, `twinvol resync` copies what is left");
                if self.session_is(session_id) {
                    self.st.borrow_mut().resync = None;
                }
                return;
            }
            Err(_) => return,
        }
        if by_generation {
            let r = self.meta.borrow_mut().update_state(|g, f| {
                g.resync_finished_as_source();
                f.set(DiskFlags::INITIAL_SYNC_DONE, true);
                // The peer holds this copy's generation now.
                f.set(DiskFlags::PEER_OUTDATED, false);
            });
            if let Err(e) = r {
                tracing::error!(volume = %self.settings.volume, error = %e, "cannot record the finished resync");
            } else {
                self.st.borrow_mut().peer_may_hold_current = false;
            }
        }
        let _ = self.meta.borrow_mut().persist_bitmap();
        let current = self.session_is(session_id);
        {
            let mut st = self.st.borrow_mut();
            st.resync = None;
            if current {
                st.peer_up_to_date = true;
            }
        }
        tracing::info!(volume = %self.settings.volume, left = self.meta.borrow().bitmap().dirty_bytes(), "resync finished as source");
    }
}
