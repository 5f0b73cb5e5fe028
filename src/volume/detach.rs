//! A Primary whose own disk fails (`replication.on_disk_error = "detach"` or `"failover"`,
//! DRBD's `on-io-error detach`): the local copy is marked failed and every read, write and
//! flush is served by the peer's copy, so the application sees no error. An impaired EBS
//! volume is the most common failure on AWS; the peer holds everything while it is connected,
//! up to date and nothing is dirty here.
//!
//! - Writes go out as Data frames flagged [`DataFlags::LOCAL_MISSING`] and complete on the
//!   peer's acknowledgement. The peer records each region dirty and, at the first one, starts a
//!   new generation on its own (healthy) disk, so that whatever happens to this node's metadata
//!   the next connection resyncs this copy from the peer.
//! - Reads are [`ReadRequest`]s answered by the peer's copy, after every earlier write to the
//!   region (the peer applies in arrival order).
//! - A detached Primary has no copy of its own without the peer: with the connection lost,
//!   I/O fails with EIO. Its Hello says it is detached; a connection plan never resyncs to or
//!   from a detached node.
//!
//! Invariant: once detached, nothing reads or writes the local device until the volume is
//! demoted (after a switchover the copy is resynced from the new Primary).

use std::time::Instant;

use bytes::Bytes;
use tokio::sync::oneshot;

use super::state::PendingKind;
use super::{MirroredVolume, Role};
use crate::block::{BlockError, BlockResult, BlockTarget};
use crate::config::DiskErrorPolicy;
use crate::engine::buf::AlignedBuf;
use crate::meta::device::MetaDevice;
use crate::meta::gen::DiskFlags;
use crate::repl::wire::{Data, DataFlags, Message, ReadRequest, MAX_READ};

fn no_copy(volume: &str, what: &str) -> BlockError {
    BlockError::errno(
        format!("{what} on volume {volume}: this node's disk is detached and the peer is not connected: no copy to serve it"),
        libc::EIO,
    )
}

impl<T: BlockTarget, D: MetaDevice> MirroredVolume<T, D> {
    /// Why the local disk was detached, if it was.
    pub fn detached(&self) -> Option<String> {
        self.st.borrow().detached.clone()
    }

    /// The local disk failed `what` with `err` on the Primary: detach it when the policy asks
    /// and the peer's copy can serve everything (connected, able, up to date, nothing dirty
    /// here, no resync running). Returns whether I/O now goes through the peer; otherwise the
    /// error goes to the application (logged once with the reason).
    pub(super) fn try_detach(&self, what: &str, err: &BlockError) -> bool {
        if self.role() != Role::Primary {
            return false;
        }
        let dirty = self.meta.borrow().bitmap().dirty_chunks();
        let mut st = self.st.borrow_mut();
        if st.detached.is_some() {
            return true;
        }
        st.counters.local_disk_errors += 1;
        let why_not = if self.settings.on_disk_error == DiskErrorPolicy::PassThrough {
            Some("on_disk_error is \"pass-through\"")
        } else if st.session.is_none() {
            Some("the peer is not connected")
        } else if !st.peer_serves_detached {
            Some("the peer's twinvol cannot serve a detached Primary (upgrade it)")
        } else if !st.peer_up_to_date {
            Some("the peer's copy is not up to date")
        } else if dirty > 0 || st.resync.is_some() || st.ahead {
            Some("the peer's copy lacks regions this copy holds (dirty bitmap or resync)")
        } else {
            None
        };
        if let Some(why_not) = why_not {
            if !std::mem::replace(&mut st.detach_refusal_logged, true) {
                tracing::error!(volume = %self.settings.volume, what, error = %err, why_not, "this node's disk FAILED and cannot be detached: the error goes to the application (logged once; count: local_disk_errors)");
            }
            return false;
        }
        st.detached = Some(format!("{what} failed: {err}"));
        drop(st);
        // Best effort: the metadata may sit on the failing disk. The peer records the
        // divergence on its own disk (see the module doc).
        let recorded = self.meta.borrow_mut().update_state(|_, f| {
            f.set(DiskFlags::CONSISTENT, false);
            f.set(DiskFlags::UP_TO_DATE, false);
        });
        tracing::error!(volume = %self.settings.volume, what, error = %err, recorded = recorded.is_ok(), "this node's disk FAILED: DETACHED; every read and write is served by the peer's copy. Replace the disk, then switch the service over (`twinvol switchover`): this copy is resynced from the peer");
        true
    }

    /// A write served by the peer's copy alone: completes on the peer's acknowledgement.
    pub(super) async fn write_through_peer(
        &self,
        offset: u64,
        data: Bytes,
        fua: bool,
    ) -> BlockResult<()> {
        let len = data.len() as u64;
        let sent = {
            let mut st = self.st.borrow_mut();
            let epoch = st.session.as_ref().map(|s| s.id).unwrap_or(0);
            let flags = DataFlags::LOCAL_MISSING | if fua { DataFlags::FUA } else { 0 };
            Self::send_tracked(
                &mut st,
                PendingKind::Through,
                offset..offset + len,
                Instant::now(),
                |seq| {
                    Message::Data(Data {
                        seq,
                        epoch,
                        offset,
                        flags: DataFlags(flags),
                        data,
                    })
                },
            )
        };
        let Some((_, rx)) = sent else {
            return Err(no_copy(&self.settings.volume, "write"));
        };
        match rx.await {
            Ok(true) => {
                self.st.borrow_mut().counters.data_bytes_sent += len;
                Ok(())
            }
            _ => Err(BlockError::errno(
                format!(
                    "write {offset}+{len} on volume {}: the peer did not store it and this node's disk is detached",
                    self.settings.volume
                ),
                libc::EIO,
            )),
        }
    }

    /// A read served by the peer's copy.
    pub(super) async fn read_through_peer(
        &self,
        offset: u64,
        mut buf: AlignedBuf,
    ) -> (BlockResult<()>, AlignedBuf) {
        let total = buf.len();
        let mut done = 0usize;
        while done < total {
            let len = (total - done).min(MAX_READ as usize);
            let at = offset + done as u64;
            let (tx, rx) = oneshot::channel();
            let asked = {
                let mut st = self.st.borrow_mut();
                let seq = st.next_seq;
                st.next_seq += 1;
                let sent = st.session.as_ref().is_some_and(|s| {
                    s.tx.send(Message::ReadRequest(ReadRequest {
                        seq,
                        offset: at,
                        length: len as u32,
                    }))
                    .is_ok()
                });
                if sent {
                    st.read_waiters.insert(seq, tx);
                }
                sent
            };
            if !asked {
                return (Err(no_copy(&self.settings.volume, "read")), buf);
            }
            match rx.await {
                Ok(r) if r.status == 0 && r.data.len() == len => {
                    buf[done..done + len].copy_from_slice(&r.data);
                    done += len;
                }
                Ok(r) => {
                    let errno = if r.status == 0 {
                        libc::EIO
                    } else {
                        r.status as i32
                    };
                    let e = BlockError::errno(
                        format!(
                            "read {at}+{len} on volume {}: the peer's copy could not be read and this node's disk is detached",
                            self.settings.volume
                        ),
                        errno,
                    );
                    return (Err(e), buf);
                }
                Err(_) => return (Err(no_copy(&self.settings.volume, "read")), buf),
            }
        }
        (Ok(()), buf)
    }

    /// A flush of the peer's copy (the only one).
    pub(super) async fn flush_through_peer(&self) -> BlockResult<()> {
        let sent = {
            let mut st = self.st.borrow_mut();
            Self::send_tracked(&mut st, PendingKind::Flush, 0..0, Instant::now(), |seq| {
                Message::Flush { seq }
            })
        };
        let Some((_, rx)) = sent else {
            return Err(no_copy(&self.settings.volume, "flush"));
        };
        match rx.await {
            Ok(true) => Ok(()),
            _ => Err(BlockError::errno(
                format!(
                    "flush on volume {}: the peer's flush failed and this node's disk is detached",
                    self.settings.volume
                ),
                libc::EIO,
            )),
        }
    }

    /// Secondary: the Primary's disk does not hold the write at `offset` (it is detached).
    /// This copy is the only one with it: the region is recorded dirty, and the first time a
    /// new generation begins here, durably, so the next connection resyncs the Primary's
    /// copy from this one.
    pub(super) fn record_primary_missing(&self, offset: u64, len: u64) {
        let mut m = self.meta.borrow_mut();
        if m.superblock().gen.bitmap == 0 {
            match crate::meta::gen::random_id() {
                Ok(new) => {
                    if let Err(e) = m.update_state(|g, _| g.new_current(new)) {
                        tracing::error!(volume = %self.settings.volume, error = %e, "cannot record the new generation for the detached Primary's writes");
                    } else {
                        tracing::warn!(volume = %self.settings.volume, generation = format!("{new:016x}"), "the Primary's disk is detached: this copy alone holds its writes (new generation; its copy is resynced from this one later)");
                    }
                }
                Err(e) => {
                    tracing::error!(volume = %self.settings.volume, error = %e, "no randomness for a generation id")
                }
            }
        }
        let _ = m.mark_dirty(offset, len);
    }
}
