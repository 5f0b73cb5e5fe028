//! Online verify of a connected pair (`twinvol verify`): the node whose peer is not Primary
//! walks the device in [`VERIFY_REGION`]s; for each, it holds new application writes to the
//! region back, sends a VerifyRequest, reads its own copy and computes per-block CRC32s while
//! the peer does the same (the peer reads only after every earlier Data frame to the region
//! was applied: frames are admitted in arrival order), and compares the digests. A block that
//! differs in a clean chunk is marked dirty; once the walk is done, a resync (without a
//! disconnect) copies the marked chunks from this node to the peer. Chunks already dirty are
//! skipped: a resync will copy them anyway.

use std::ops::Range;
use std::rc::Rc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::{MirroredVolume, ResyncRole, VerifyStatus};
use crate::block::BlockTarget;
use crate::meta::device::MetaDevice;
use crate::repl::verify::{
    block_crcs, block_range, differing_blocks, regions, VERIFY_BLOCK, VERIFY_REGION,
};
use crate::repl::wire::{Message, VerifyReply, VerifyRequest};

/// Why a verify could not run or did not finish.
#[derive(Debug, Clone, thiserror::Error)]
pub enum VerifyError {
    /// No replication connection.
    #[error("volume {volume}: verify needs a connected peer; wait until the status shows connection.state = connected")]
    NotConnected {
        /// Volume.
        volume: String,
    },
    /// The peer is Primary: the Primary's copy is the reference, so it runs the verify.
    #[error("volume {volume}: the peer is Primary; run `twinvol verify` on the Primary node")]
    PeerIsPrimary {
        /// Volume.
        volume: String,
    },
    /// Another verify is running.
    #[error(
        "volume {volume}: a verify is already running; wait for it (see `verify` in the status)"
    )]
    AlreadyRunning {
        /// Volume.
        volume: String,
    },
    /// The connection ended, the peer did not answer, or answered another region.
    #[error("volume {volume}: verify stopped at offset {offset}: {why}; run it again once the peer is connected")]
    Interrupted {
        /// Volume.
        volume: String,
        /// Where it stopped.
        offset: u64,
        /// Why.
        why: String,
    },
    /// Reading the local copy failed.
    #[error("volume {volume}: verify could not read {offset}+{len} of the local copy: {why}")]
    Read {
        /// Volume.
        volume: String,
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Why.
        why: String,
    },
}

impl<T: BlockTarget + 'static, D: MetaDevice + 'static> MirroredVolume<T, D> {
    /// Runs one online verify to the end and returns its result (also kept in the status
    /// snapshot as `verify`). Differing blocks are marked dirty and a resync to the peer is
    /// started before this returns; it runs in the background on the same connection.
    pub async fn verify(self: &Rc<Self>) -> Result<VerifyStatus, VerifyError> {
        let volume = self.settings.volume.clone();
        let session_id = {
            let mut st = self.st.borrow_mut();
            let Some(s) = st.session.as_ref().map(|s| s.id) else {
                return Err(VerifyError::NotConnected { volume });
            };
            if st.peer_primary {
                return Err(VerifyError::PeerIsPrimary { volume });
            }
            if st.verify.as_ref().is_some_and(|v| v.running) {
                return Err(VerifyError::AlreadyRunning { volume });
            }
            st.verify = Some(VerifyStatus {
                running: true,
                block_size: VERIFY_BLOCK,
                total_bytes: self.info.size,
                ..VerifyStatus::default()
            });
            s
        };
        tracing::info!(volume = %volume, "online verify started");
        let r = self.verify_walk(session_id).await;
        let mut st = self.st.borrow_mut();
        let v = st.verify.get_or_insert_with(VerifyStatus::default);
        v.running = false;
        match &r {
            Ok(()) => {
                tracing::info!(volume = %volume, checked = v.checked_bytes, differing_blocks = v.differing_blocks, "online verify finished");
            }
            Err(e) => {
                v.error = Some(e.to_string());
                tracing::error!(volume = %volume, error = %e, "online verify failed");
            }
        }
        let v = v.clone();
        r.map(|()| v)
    }

    async fn verify_walk(self: &Rc<Self>, session_id: u64) -> Result<(), VerifyError> {
        let started = Instant::now();
        for region in regions(self.info.size, VERIFY_REGION) {
            // Hold new application writes to the region; wait for those in progress.
            self.st.borrow_mut().verify_lock = Some(region.clone());
            self.wait_app_writes_clear(&region).await;
            let r = self.verify_region(session_id, region.clone()).await;
            self.st.borrow_mut().verify_lock = None;
            self.wake.notify_waiters();
            let (differing, skipped) = r?;
            let mut st = self.st.borrow_mut();
            if let Some(v) = st.verify.as_mut() {
                v.checked_bytes += region.end - region.start;
                v.differing_blocks += differing;
                v.skipped_dirty_bytes += skipped;
                v.elapsed_secs = started.elapsed().as_secs_f64();
            }
        }
        let differing = self
            .st
            .borrow()
            .verify
            .as_ref()
            .map_or(0, |v| v.differing_blocks);
        if differing > 0 {
            self.start_resync(session_id).await;
        }
        Ok(())
    }

    /// Compares one region with the peer; returns (differing blocks marked dirty, bytes of
    /// differing blocks skipped because their chunk was dirty already).
    async fn verify_region(
        self: &Rc<Self>,
        session_id: u64,
        region: Range<u64>,
    ) -> Result<(u64, u64), VerifyError> {
        let len = region.end - region.start;
        let interrupted = |why: String| VerifyError::Interrupted {
            volume: self.settings.volume.clone(),
            offset: region.start,
            why,
        };
        let Some((seq, rx)) = self.request_digests(session_id, &region) else {
            return Err(interrupted("the replication connection ended".into()));
        };
        let buf = self.local.alloc_buf_for_overwrite(len as usize);
        let (r, buf) = self.local.read(region.start, buf).await;
        if let Err(e) = r {
            self.st.borrow_mut().verify_waiters.remove(&seq);
            return Err(VerifyError::Read {
                volume: self.settings.volume.clone(),
                offset: region.start,
                len,
                why: e.to_string(),
            });
        }
        let ours = block_crcs(&buf, VERIFY_BLOCK);
        drop(buf);
        let theirs = self
            .await_digests(seq, rx, &region)
            .await
            .map_err(interrupted)?;
        let Some(diff) = differing_blocks(&ours, &theirs) else {
            return Err(interrupted(
                "the peer sent a wrong number of digests".into(),
            ));
        };
        let (mut marked, mut skipped) = (0u64, 0u64);
        let mut m = self.meta.borrow_mut();
        for i in diff {
            let b = block_range(region.start, len, VERIFY_BLOCK, i);
            let blen = b.end - b.start;
            if m.bitmap().is_dirty(b.start, blen).unwrap_or(true) {
                skipped += blen;
                continue;
            }
            tracing::warn!(volume = %self.settings.volume, offset = b.start, len = blen, "online verify: block differs from the peer; marked for resync");
            if m.mark_dirty(b.start, blen).is_ok() {
                marked += 1;
            }
        }
        drop(m);
        if marked > 0 {
            let mut st = self.st.borrow_mut();
            if st.oldest_unreplicated.is_none() {
                st.oldest_unreplicated = Some(Instant::now());
            }
        }
        Ok((marked, skipped))
    }

    /// Sends a VerifyRequest for `range` (in [`VERIFY_BLOCK`] blocks) on session
    /// `session_id`; `None` when that session is gone.
    fn request_digests(
        &self,
        session_id: u64,
        range: &Range<u64>,
    ) -> Option<(u64, oneshot::Receiver<VerifyReply>)> {
        let mut st = self.st.borrow_mut();
        let s = st.session.clone().filter(|s| s.id == session_id)?;
        let seq = st.next_seq;
        st.next_seq += 1;
        let (tx, rx) = oneshot::channel();
        st.verify_waiters.insert(seq, tx);
        let req = Message::VerifyRequest(VerifyRequest {
            seq,
            offset: range.start,
            length: (range.end - range.start) as u32,
            block_size: VERIFY_BLOCK,
        });
        if s.tx.send(req).is_err() {
            st.verify_waiters.remove(&seq);
            return None;
        }
        Some((seq, rx))
    }

    /// Waits for the peer's digests answering `seq` and checks they describe `range`.
    async fn await_digests(
        &self,
        seq: u64,
        rx: oneshot::Receiver<VerifyReply>,
        range: &Range<u64>,
    ) -> Result<Vec<u32>, String> {
        let wait = (self.settings.ping_timeout * 4).max(Duration::from_secs(2));
        let reply = match tokio::time::timeout(wait, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => return Err("the replication connection ended".into()),
            Err(_) => {
                self.st.borrow_mut().verify_waiters.remove(&seq);
                return Err(format!(
                    "the peer sent no digests within {wait:?} (does it support online verify?)"
                ));
            }
        };
        if reply.offset != range.start
            || u64::from(reply.length) != range.end - range.start
            || reply.digests.block_size != VERIFY_BLOCK
        {
            return Err(format!(
                "the peer answered {}+{} in {}-byte blocks",
                reply.offset, reply.length, reply.digests.block_size
            ));
        }
        Ok(reply.digests.crcs)
    }

    /// Checksum resync: the [`VERIFY_BLOCK`] blocks of `range` whose CRC differs between
    /// `local` (this copy of the range, read under the resync lock) and the peer's copy;
    /// `None` when the peer gave no usable answer (the caller then sends everything).
    pub(super) async fn peer_differing_blocks(
        &self,
        session_id: u64,
        range: Range<u64>,
        local: &[u8],
    ) -> Option<Vec<usize>> {
        let (seq, rx) = self.request_digests(session_id, &range)?;
        let ours = block_crcs(local, VERIFY_BLOCK);
        match self.await_digests(seq, rx, &range).await {
            Ok(theirs) => differing_blocks(&ours, &theirs),
            Err(why) => {
                tracing::warn!(volume = %self.settings.volume, offset = range.start, why, "checksum resync: no digests from the peer; sending the region");
                None
            }
        }
    }

    /// Starts a resync of the dirty chunks to the peer on the running connection, after any
    /// resync in progress finished (that one may have started before the marks were made).
    async fn start_resync(self: &Rc<Self>, session_id: u64) {
        self.wait_until(|v| !v.session_is(session_id) || v.st.borrow().resync.is_none())
            .await;
        if !self.session_is(session_id) {
            return;
        }
        self.st.borrow_mut().resync = Some(self.resync_run(ResyncRole::Source));
        tracing::info!(volume = %self.settings.volume, "online verify: resyncing the differing blocks");
        tokio::task::spawn_local(self.clone().resync_source(session_id, false, false));
    }
}
