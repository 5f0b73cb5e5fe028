//! One replication connection of a [`MirroredVolume`], and the loop that keeps one up.
//!
//! After the link's handshake (Hellos + HMAC): both sides send their dirty bitmap (RLE in
//! BitmapChunks), both compute [`plan::plan`] from the same facts, then:
//! - InSync / AwaitInitialSync: replicate (the Primary sends Data, the Secondary applies);
//! - Source: the union of both bitmaps (or everything) becomes this node's bitmap and the
//!   resync task sends it as ResyncData, then ResyncDone;
//! - Target: this copy is marked Inconsistent durably before the first resync byte lands, and
//!   becomes consistent (adopting the source's generation) at ResyncDone;
//! - Refuse: a Disconnect with the reason; nothing is copied.
//!
//! The receiving side applies Data, ResyncData, Flush and ResyncDone strictly in arrival order
//! (the sender's sequence order) and acks each after its write completed (FUA and FLUSH carried
//! through). A frame that fails a CRC never reaches a message, so it is never written: the
//! connection is reset, the sender keeps the region dirty, and the next connection resyncs it.

use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, Notify};

use super::bitmap_exchange::recv_bitmap;
use super::plan::{self, Plan, Refusal, Side};
use super::secondary::Applying;
use super::state::{PendingKind, SessionTx};
use super::{Connection, MirroredVolume, ResyncRole, Role};
use crate::block::BlockTarget;
use crate::config::ReplicationMode;
use crate::meta::bitmap::DirtyBitmap;
use crate::meta::device::MetaDevice;
use crate::meta::gen::{DiskFlags, GenIds, NodeGen};
use crate::repl::link::{self, Link, LinkConfig, LinkError, LinkListener, ThreadedReader};
use crate::repl::verify::{block_crcs, valid_block_size, VERIFY_REGION};
use crate::repl::wire::bitmap::split;
use crate::repl::wire::{
    message::features, DisconnectReason, Generations, Hello, Message, ResyncPayload, VerifyReply,
    PROTOCOL_VERSION,
};

/// Bit of `Hello::disk_state` above the metadata flags: the sender is Primary now.
pub const HELLO_PRIMARY: u32 = 1 << 31;
/// Bit of `Hello::disk_state`: the sender's disk is detached (its I/O goes through the peer);
/// no resync runs to or from it.
pub const HELLO_DETACHED: u32 = 1 << 30;
/// Largest bitmap chunk payload.
const BITMAP_CHUNK: usize = 1 << 20;
/// Wait after a refused connection before trying again.
const REFUSED_RETRY: Duration = Duration::from_secs(2);

/// The 16-byte volume identity both nodes put in their Hello: derived from the volume name,
/// so two nodes configured for the same volume agree without exchanging anything.
pub fn volume_uuid(name: &str) -> [u8; 16] {
    use sha2::Digest;
    let d = sha2::Sha256::digest(format!("twinvol volume {name}").as_bytes());
    let mut u = [0u8; 16];
    u.copy_from_slice(&d[..16]);
    u
}

/// A stable small id per node name for the decision's tie-break: the smaller name is 0.
fn tie_id(me: &str, other: &str) -> u32 {
    u32::from(me > other)
}

fn to_generations(g: &GenIds) -> Generations {
    Generations {
        current: g.current,
        bitmap: g.bitmap,
        history1: g.history[0],
        history2: g.history[1],
    }
}

pub(super) fn from_generations(g: &Generations) -> GenIds {
    GenIds {
        current: g.current,
        bitmap: g.bitmap,
        history: [g.history1, g.history2],
    }
}

/// Aborts a helper task when the session that owns it ends, even by cancellation.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How a session ended.
#[derive(Debug)]
pub enum SessionEnd {
    /// The link failed or the peer left (reconnect at once).
    Lost(String),
    /// The two nodes do not describe the same volume (device size, bitmap granularity):
    /// only the operator can fix it (retry later, as after a refusal).
    Misconfigured(String),
    /// The connection was refused by the plan (retry later).
    Refused(Refusal),
    /// Asked to stop (role change): reconnect at once.
    Dropped,
    /// The peer, a Secondary, stopped as planned and marked its copy Outdated first.
    PeerLeftOutdated(String),
    /// This node's metadata could not record what the plan needs (a failing disk): only the
    /// operator can fix it (retry later, as after a refusal).
    LocalMetadata(String),
}

impl<T: BlockTarget + 'static, D: MetaDevice + 'static> MirroredVolume<T, D> {
    /// The Hello describing this node now.
    pub fn hello(&self) -> Hello {
        let m = self.meta.borrow();
        let sb = m.superblock();
        let primary = self.role() == Role::Primary;
        let detached = self.st.borrow().detached.is_some();
        Hello {
            proto_min: PROTOCOL_VERSION,
            proto_max: PROTOCOL_VERSION,
            volume_uuid: volume_uuid(&self.settings.volume),
            node_id: self.settings.node.clone(),
            peer_node_id: self.settings.peer.clone(),
            generations: to_generations(&sb.gen),
            disk_state: sb.flags.0
                | if primary { HELLO_PRIMARY } else { 0 }
                | if detached { HELLO_DETACHED } else { 0 },
            bitmap_granularity: sb.granularity.bytes(),
            device_size: sb.data_size,
            features: features::VERIFY
                | features::DETACHED_PRIMARY
                | if self.settings.checksum_resync {
                    features::CHECKSUM_RESYNC
                } else {
                    0
                },
        }
    }

    fn side_local(&self) -> Side {
        let m = self.meta.borrow();
        Side {
            name: self.settings.node.clone(),
            gen: NodeGen {
                node_id: tie_id(&self.settings.node, &self.settings.peer),
                ids: m.superblock().gen,
                flags: m.superblock().flags,
            },
            dirty_chunks: m.bitmap().dirty_chunks(),
            primary: self.role() == Role::Primary,
            detached: self.st.borrow().detached.is_some(),
        }
    }

    /// Runs one connection until it ends. Never panics on peer input. `sent` is the Hello the
    /// link handshake sent: if this node's role or generation changed since (a promotion while
    /// the connection was being made), the peer decided on stale facts, so the session ends at
    /// once and the next connection carries the current Hello.
    pub async fn run_session(self: &Rc<Self>, link: Link, sent: &Hello) -> SessionEnd {
        let vol = &self.settings.volume;
        tracing::debug!(volume = %vol, peer = %link.peer_addr(), "replication link authenticated; session starting");
        let end = self.threaded_session(link, sent).await;
        tracing::debug!(volume = %vol, end = ?end, "replication session ended");
        end
    }

    /// [`Self::run_session`] on a link split into this thread's reader and a writer thread.
    async fn threaded_session(self: &Rc<Self>, link: Link, sent: &Hello) -> SessionEnd {
        // Async mode: no application write waits for the link, so its sender yields the CPU
        // to the data path.
        let background = self.settings.mode == ReplicationMode::Async;
        let (info, mut reader, writer) =
            match link.into_threaded(self.sent_traffic.clone(), background) {
                Ok(parts) => parts,
                Err(e) => return SessionEnd::Lost(e.to_string()),
            };
        // Everything this session sends goes through the writer thread's channel, in order.
        let Some(tx) = writer.sender() else {
            return SessionEnd::Lost("replication writer has no channel".into());
        };
        let end = self.session_body(&mut reader, tx, info.hello, sent).await;
        // Give the writer a moment to push a final Disconnect or acks, then stop it.
        writer.finish(Duration::from_millis(100)).await;
        end
    }

    async fn session_body(
        self: &Rc<Self>,
        reader: &mut ThreadedReader,
        tx: mpsc::UnboundedSender<Message>,
        peer_hello: Hello,
        sent: &Hello,
    ) -> SessionEnd {
        let ours = self.hello();
        let vol = &self.settings.volume;
        if peer_hello.device_size != ours.device_size
            || peer_hello.bitmap_granularity != ours.bitmap_granularity
        {
            let detail = format!(
                "volume {vol}: data size {} / bitmap granularity {} here, {} / {} on the peer; create the metadata of both nodes with the same device size and --granularity",
                ours.device_size, ours.bitmap_granularity, peer_hello.device_size, peer_hello.bitmap_granularity
            );
            let _ = tx.send(Message::Disconnect {
                reason: DisconnectReason::VolumeMismatch,
                detail: detail.clone(),
            });
            return SessionEnd::Misconfigured(detail);
        }
        // Bitmap exchange.
        let encoded = Bytes::from(self.meta.borrow().bitmap().encode_rle());
        for c in split(&encoded, BITMAP_CHUNK) {
            if tx.send(Message::BitmapChunk(c)).is_err() {
                return SessionEnd::Lost("replication writer stopped".into());
            }
        }
        if crate::failpoint::hit("cut-during-bitmap-exchange") {
            return SessionEnd::Lost("fail point: cut during the bitmap exchange".into());
        }
        let geometry = self.meta.borrow().bitmap().geometry();
        let peer_bitmap = match recv_bitmap(reader, geometry, self.settings.ping_timeout * 2).await
        {
            Ok(b) => b,
            Err(e) => {
                if e.is_corrupt_frame() {
                    self.st.borrow_mut().counters.corrupt_frames += 1;
                }
                return SessionEnd::Lost(e.to_string());
            }
        };
        // No await from here to the session's registration below: a role change after this
        // check finds the session registered and drops it.
        let now = self.hello();
        if now.generations != sent.generations || now.disk_state != sent.disk_state {
            tracing::info!(volume = %vol, "role or generation changed while connecting; reconnecting so the peer decides on the current state");
            return SessionEnd::Dropped;
        }
        let local = self.side_local();
        let peer = Side {
            name: peer_hello.node_id.clone(),
            gen: NodeGen {
                node_id: tie_id(&peer_hello.node_id, &self.settings.node),
                ids: from_generations(&peer_hello.generations),
                flags: DiskFlags(peer_hello.disk_state & DiskFlags::ALL),
            },
            dirty_chunks: peer_bitmap.dirty_chunks(),
            primary: peer_hello.disk_state & HELLO_PRIMARY != 0,
            detached: peer_hello.disk_state & HELLO_DETACHED != 0,
        };
        let decided = plan::plan(&local, &peer, &self.settings.split_brain_policy);
        tracing::info!(volume = %vol, plan = ?decided, local = ?local.gen.ids, peer = ?peer.gen.ids, "replication connection plan");
        if let Plan::Refuse(r) = decided {
            let reason = match &r {
                Refusal::SplitBrain { .. } => DisconnectReason::SplitBrain,
                Refusal::UnrelatedData => DisconnectReason::UnrelatedData,
                _ => DisconnectReason::Other(1),
            };
            tracing::error!(volume = %vol, refusal = ?r, "replication refused: no data is copied");
            let _ = tx.send(Message::Disconnect {
                reason,
                detail: format!("{r:?}"),
            });
            {
                // `connection` explains a refusal; the link itself works.
                let mut st = self.st.borrow_mut();
                st.connection = Connection::Refused { refusal: r.clone() };
                st.link_health.connected();
            }
            return SessionEnd::Refused(r);
        }
        // Apply the plan's bitmap and state changes before any data moves.
        let resync = match decided {
            Plan::Source { full } | Plan::Target { full } => {
                let mut m = self.meta.borrow_mut();
                let mut union = m.bitmap().clone();
                if full {
                    union.set_all();
                } else if union.merge(&peer_bitmap).is_err() {
                    return SessionEnd::Lost("peer bitmap geometry differs".into());
                }
                if let Err(e) = m
                    .replace_bitmap(union)
                    .and_then(|_| m.persist_bitmap().map(|_| ()))
                {
                    return SessionEnd::LocalMetadata(e.to_string());
                }
                if matches!(decided, Plan::Target { .. }) {
                    if let Err(e) = m.update_state(|_, f| {
                        f.set(DiskFlags::CONSISTENT, false);
                        f.set(DiskFlags::UP_TO_DATE, false);
                    }) {
                        return SessionEnd::LocalMetadata(e.to_string());
                    }
                }
                Some((matches!(decided, Plan::Source { .. }), full, true))
            }
            // Same generation, but regions may differ (writes in flight when the last
            // connection was lost, on either side): the Primary resyncs their union, as after
            // an async catch-up; the generations do not move.
            Plan::InSync
                if local.primary
                    && !local.detached
                    && !peer.detached
                    && (local.dirty_chunks > 0 || peer.dirty_chunks > 0) =>
            {
                let mut m = self.meta.borrow_mut();
                let mut union = m.bitmap().clone();
                if union.merge(&peer_bitmap).is_err() {
                    return SessionEnd::Lost("peer bitmap geometry differs".into());
                }
                if let Err(e) = m
                    .replace_bitmap(union)
                    .and_then(|_| m.persist_bitmap().map(|_| ()))
                {
                    return SessionEnd::LocalMetadata(e.to_string());
                }
                Some((true, false, false))
            }
            _ => None,
        };
        if let Err(e) = self.settle_newest(&decided, &peer) {
            return SessionEnd::LocalMetadata(e.to_string());
        }
        let kill = Rc::new(Notify::new());
        let session_id = {
            let mut st = self.st.borrow_mut();
            let id = st.next_session;
            st.next_session += 1;
            st.session = Some(SessionTx {
                id,
                tx: tx.clone(),
                kill: kill.clone(),
            });
            st.peer_primary = peer.primary;
            // The peer is back: the plan decided on the current ids (and resyncs what it
            // lacks).
            st.new_current_due = false;
            st.wrote_alone = false;
            st.peer_serves_detached = peer_hello.features & features::DETACHED_PRIMARY != 0;
            st.peer_up_to_date = peer.gen.flags.has(DiskFlags::UP_TO_DATE)
                && !peer.gen.flags.has(DiskFlags::OUTDATED)
                && !peer.detached
                && decided == Plan::InSync;
            st.connection = Connection::Connected;
            st.link_health.connected();
            st.peer_failed_logged = false;
            st.counters.connections += 1;
            st.ahead = false;
            st.unsent.clear_all();
            if let Some((source, _, _)) = resync {
                st.resync = Some(self.resync_run(if source {
                    ResyncRole::Source
                } else {
                    ResyncRole::Target
                }));
            }
            id
        };
        // Writes held while the peer was away complete now (the peer resyncs what it lacks).
        self.wake.notify_waiters();
        tracing::info!(volume = %vol, peer = %peer.name, session = session_id, "replication connected");
        // Checksum mode for bitmap resyncs (not full syncs) when configured here and the peer
        // answers digest requests.
        let checksum = |full: bool| {
            !full && self.settings.checksum_resync && peer_hello.features & features::VERIFY != 0
        };
        let resync_task = match resync {
            Some((true, full, by_generation)) => Some(AbortOnDrop(tokio::task::spawn_local(
                self.clone()
                    .resync_source(session_id, by_generation, checksum(full)),
            ))),
            _ => None,
        };
        let ahead_task = AbortOnDrop(tokio::task::spawn_local(
            self.clone().ahead_watch(session_id),
        ));
        let end = tokio::select! {
            e = self.read_loop(reader, &tx, &peer_hello) => e,
            _ = kill.notified() => SessionEnd::Dropped,
        };
        drop(resync_task);
        drop(ahead_task);
        drop(tx);
        self.teardown(session_id, matches!(end, SessionEnd::PeerLeftOutdated(_)));
        tracing::warn!(volume = %vol, end = ?end, "replication disconnected");
        end
    }

    /// What a connection settles about which copy is the newest (the start-up gate's proofs,
    /// [`DiskFlags::PRIMARY_CLEAN_STOP`] and [`DiskFlags::PEER_OUTDATED`]): the peer now knows
    /// this node's generation, so a clean-stop record has served; a peer in sync and up to date,
    /// or this copy about to be resynced from the peer, means the peer is not behind this one.
    fn settle_newest(
        &self,
        decided: &Plan,
        peer: &Side,
    ) -> Result<(), crate::meta::store::StoreError> {
        let peer_current =
            peer.gen.flags.has(DiskFlags::UP_TO_DATE) && !peer.gen.flags.has(DiskFlags::OUTDATED);
        let peer_caught_up =
            matches!(decided, Plan::Target { .. }) || (*decided == Plan::InSync && peer_current);
        let flags = self.meta.borrow().superblock().flags;
        let stale_stop = flags.has(DiskFlags::PRIMARY_CLEAN_STOP);
        let stale_outdated = peer_caught_up && flags.has(DiskFlags::PEER_OUTDATED);
        if !stale_stop && !stale_outdated {
            return Ok(());
        }
        self.meta.borrow_mut().update_state(|_, f| {
            f.set(DiskFlags::PRIMARY_CLEAN_STOP, false);
            if stale_outdated {
                f.set(DiskFlags::PEER_OUTDATED, false);
            }
        })
    }

    /// Ends the session: every outstanding item stays (or becomes again) dirty; a Primary
    /// starts a new generation so a later promotion of the peer is detected as such.
    /// `peer_left_outdated`: the peer stopped as planned with its copy marked Outdated, so
    /// this node's writes need not wait for it (and the fact is recorded).
    pub(super) fn teardown(&self, session_id: u64, peer_left_outdated: bool) {
        let (pendings, peer_may_hold_current): (Vec<_>, bool) = {
            let mut st = self.st.borrow_mut();
            if st.session.as_ref().map(|s| s.id) != Some(session_id) {
                return;
            }
            st.session = None;
            // A new loss: the peer is not known outdated until it says so again (its planned
            // stop just did).
            st.peer_outdated = peer_left_outdated;
            st.hold_until = None;
            st.hold_expired = false;
            st.inflight_bytes = 0;
            st.ahead = false;
            st.resync_lock = None;
            st.verify_lock = None;
            st.resync_apply_failed = false;
            let peer_may_hold_current = std::mem::take(&mut st.peer_may_hold_current);
            // Writes in flight when the connection went: the peer may lack them (in async mode
            // they were acknowledged already).
            if st.role == Role::Primary && st.pending.values().any(|p| p.kind == PendingKind::App) {
                st.wrote_alone = true;
            }
            // Dropping the senders ends a verify waiting for digests, and a detached Primary's
            // reads.
            st.verify_waiters.clear();
            st.read_waiters.clear();
            st.resync = None;
            if matches!(st.connection, Connection::Connected) {
                st.connection = Connection::Connecting;
            }
            (st.pending.drain().collect(), peer_may_hold_current)
        };
        {
            let mut m = self.meta.borrow_mut();
            for (_, p) in &pendings {
                if !matches!(p.kind, PendingKind::Control | PendingKind::Flush)
                    && p.range.end > p.range.start
                {
                    let _ = m.mark_dirty(p.range.start, p.range.end - p.range.start);
                }
            }
            // A new generation is due when the peer may hold this node's current one (in sync,
            // or a resync whose end was sent); it begins at the first write issued alone
            // (`begin_lone_generation`), so a later promotion of the peer is told from this
            // node's own writes, and a node fenced before it wrote alone is simply resynced.
            // A source still tracking since the peer's generation (bitmap id set, end not sent)
            // needs none: the peer is behind and Inconsistent, and a new generation per cut
            // would push the peer's out of the two-slot history.
            let due = self.role() == Role::Primary
                && (m.superblock().gen.bitmap == 0 || peer_may_hold_current);
            self.st.borrow_mut().new_current_due = due;
            let _ = m.persist_bitmap();
        }
        if peer_left_outdated {
            tracing::info!(volume = %self.settings.volume, "the peer stopped as planned and marked its copy Outdated: writes complete here without waiting for it, and it is resynced when it returns");
            if self.role() == Role::Primary {
                self.record_peer_outdated(true);
            }
        }
        for (_, mut p) in pendings {
            if p.al_held {
                // Dirty above: the activity log may let it go.
                self.complete_write(p.range.clone());
            }
            if let Some(w) = p.waiter.take() {
                let _ = w.send(false);
            }
        }
        self.wake.notify_waiters();
    }

    async fn read_loop(
        self: &Rc<Self>,
        reader: &mut ThreadedReader,
        tx: &mpsc::UnboundedSender<Message>,
        peer_hello: &Hello,
    ) -> SessionEnd {
        let interval = (self.settings.ping_timeout / 4).max(Duration::from_millis(100));
        let mut last_rx = Instant::now();
        let mut nonce = 0u64;
        let applying = Applying::default();
        // Regions this Secondary acknowledged since its last good flush.
        let unflushed = Rc::new(std::cell::RefCell::new(DirtyBitmap::new(
            self.meta.borrow().bitmap().geometry(),
        )));
        loop {
            // Messages already read (a batch of acks arrives in one read) are taken without a
            // timer and a clock reading each; `last_rx` is when the stream last gave bytes.
            let next = match reader.try_recv_buffered() {
                Some(r) => Ok(r),
                None => {
                    let r = tokio::time::timeout(interval, reader.recv()).await;
                    if matches!(r, Ok(Ok(_))) {
                        last_rx = Instant::now();
                    }
                    r
                }
            };
            let msg = match next {
                Err(_) => {
                    if last_rx.elapsed() >= self.settings.ping_timeout {
                        return SessionEnd::Lost(format!(
                            "peer silent for {:?} (ping timeout)",
                            last_rx.elapsed()
                        ));
                    }
                    nonce += 1;
                    let _ = tx.send(Message::Ping { nonce });
                    continue;
                }
                Ok(Err(e)) => {
                    if e.is_corrupt_frame() {
                        self.st.borrow_mut().counters.corrupt_frames += 1;
                        tracing::error!(volume = %self.settings.volume, error = %e, "corrupt replication frame refused (never written); resetting the connection");
                    }
                    return SessionEnd::Lost(e.to_string());
                }
                Ok(Ok(m)) => m,
            };
            match msg {
                Message::Ack { seq, status } => self.on_ack(seq, status),
                Message::Ping { nonce } => {
                    let _ = tx.send(Message::Pong { nonce });
                }
                Message::Pong { .. } => {}
                Message::Disconnect {
                    reason: DisconnectReason::OutdatedStop,
                    detail,
                } => return SessionEnd::PeerLeftOutdated(detail),
                Message::Disconnect { reason, detail } => {
                    return SessionEnd::Lost(format!("peer disconnected: {reason:?}: {detail}"));
                }
                Message::Data(d) => {
                    if self.role() == Role::Primary {
                        return SessionEnd::Lost("peer sent Data to a Primary".into());
                    }
                    if d.flags.flush() {
                        applying.drain().await;
                        let status = self.flush_applied(&unflushed).await;
                        if status != 0 {
                            let _ = tx.send(Message::Ack { seq: d.seq, status });
                            continue;
                        }
                    }
                    let range = d.offset..d.offset + d.data.len() as u64;
                    if d.flags.local_missing() {
                        self.record_primary_missing(range.start, range.end - range.start);
                    }
                    let slot = applying.admit(range).await;
                    let (vol, tx, unflushed) = (self.clone(), tx.clone(), unflushed.clone());
                    tokio::task::spawn_local(async move {
                        let len = d.data.len() as u64;
                        let fua = d.flags.fua();
                        let status = vol.apply(d.offset, d.data, fua).await;
                        if status == 0 {
                            vol.st.borrow_mut().counters.data_bytes_applied += len;
                            if !fua {
                                // Acknowledged, but durable only at the next good flush.
                                let _ = unflushed.borrow_mut().set(d.offset, len);
                            }
                        } else {
                            // Outdated before the Primary hears of the failure and completes
                            // the write on its copy alone.
                            vol.apply_failed(d.offset, len, status);
                        }
                        let _ = tx.send(Message::Ack { seq: d.seq, status });
                        drop(slot);
                    });
                }
                Message::ResyncData(r) => {
                    if self.role() == Role::Primary {
                        return SessionEnd::Lost("peer sent resync data to a Primary".into());
                    }
                    if crate::failpoint::hit("cut-during-resync") {
                        return SessionEnd::Lost("fail point: cut during the resync".into());
                    }
                    let b = match r.payload {
                        ResyncPayload::Bytes(b) => b,
                        ResyncPayload::InSync => {
                            let _ = tx.send(Message::Ack {
                                seq: r.seq,
                                status: 0,
                            });
                            continue;
                        }
                    };
                    self.mark_target().await;
                    let slot = applying.admit(r.offset..r.offset + b.len() as u64).await;
                    let (vol, tx) = (self.clone(), tx.clone());
                    tokio::task::spawn_local(async move {
                        let len = b.len() as u64;
                        let s = vol.apply(r.offset, b, false).await;
                        if s == 0 {
                            // This copy now holds the region: a later connection must not ask
                            // for it again.
                            let _ = vol.meta.borrow_mut().clear_dirty(r.offset, len);
                            vol.st.borrow_mut().counters.resync_bytes_applied += len;
                        } else {
                            vol.resync_apply_failed(r.offset, len, s);
                        }
                        {
                            let mut st = vol.st.borrow_mut();
                            if let Some(run) = st.resync.as_mut() {
                                run.progress.advance(len);
                            }
                        }
                        let _ = tx.send(Message::Ack {
                            seq: r.seq,
                            status: s,
                        });
                        drop(slot);
                    });
                }
                Message::VerifyRequest(v) => {
                    let range = v.offset..v.offset.saturating_add(u64::from(v.length));
                    if !valid_block_size(v.block_size)
                        || u64::from(v.length) > VERIFY_REGION
                        || range.end > self.info.size
                    {
                        return SessionEnd::Lost(format!(
                            "peer sent an invalid verify request ({}+{} in {}-byte blocks)",
                            v.offset, v.length, v.block_size
                        ));
                    }
                    // Admitted in arrival order: every earlier write to the region is applied
                    // before the digests are taken.
                    let slot = applying.admit(range).await;
                    let (vol, tx) = (self.clone(), tx.clone());
                    tokio::task::spawn_local(async move {
                        let buf = vol.local.alloc_buf_for_overwrite(v.length as usize);
                        let (r, buf) = vol.local.read(v.offset, buf).await;
                        drop(slot);
                        match r {
                            Ok(()) => {
                                let crcs = block_crcs(&buf, v.block_size);
                                let _ = tx.send(Message::VerifyReply(VerifyReply {
                                    seq: v.seq,
                                    offset: v.offset,
                                    length: v.length,
                                    digests: crate::repl::wire::Digests {
                                        block_size: v.block_size,
                                        crcs,
                                    },
                                }));
                            }
                            Err(e) => {
                                tracing::error!(volume = %vol.settings.volume, error = %e, "reading for the peer's verify failed");
                                vol.drop_session("verify read failed");
                            }
                        }
                    });
                }
                Message::ReadRequest(q) => {
                    let range = q.offset..q.offset.saturating_add(u64::from(q.length));
                    if self.role() == Role::Primary || range.end > self.info.size {
                        return SessionEnd::Lost(format!(
                            "peer sent a read request this node cannot serve ({}+{})",
                            q.offset, q.length
                        ));
                    }
                    // Admitted in arrival order: every earlier write to the region is applied
                    // before it is read.
                    let slot = applying.admit(range).await;
                    let (vol, tx) = (self.clone(), tx.clone());
                    tokio::task::spawn_local(async move {
                        let buf = vol.local.alloc_buf_for_overwrite(q.length as usize);
                        let (r, buf) = vol.local.read(q.offset, buf).await;
                        drop(slot);
                        let (status, data) = match r {
                            Ok(()) => (0, buf.into_bytes()),
                            Err(e) => {
                                tracing::error!(volume = %vol.settings.volume, error = %e, "reading for the detached Primary failed");
                                (e.raw_errno() as u32, Bytes::new())
                            }
                        };
                        let _ = tx.send(Message::ReadReply(crate::repl::wire::ReadReply {
                            seq: q.seq,
                            offset: q.offset,
                            status,
                            data,
                        }));
                    });
                }
                Message::ReadReply(r) => {
                    let waiter = self.st.borrow_mut().read_waiters.remove(&r.seq);
                    match waiter {
                        Some(w) => {
                            let _ = w.send(r);
                        }
                        None => {
                            tracing::warn!(volume = %self.settings.volume, seq = r.seq, "read reply nobody waits for ignored");
                        }
                    }
                }
                Message::VerifyReply(r) => {
                    let waiter = self.st.borrow_mut().verify_waiters.remove(&r.seq);
                    match waiter {
                        Some(w) => {
                            let _ = w.send(r);
                        }
                        None => {
                            tracing::warn!(volume = %self.settings.volume, seq = r.seq, "verify digests nobody waits for ignored");
                        }
                    }
                }
                Message::Flush { seq } => {
                    applying.drain().await;
                    let status = self.flush_applied(&unflushed).await;
                    let _ = tx.send(Message::Ack { seq, status });
                }
                Message::ResyncDone { seq } => {
                    applying.drain().await;
                    if crate::failpoint::hit("cut-before-resync-end") {
                        return SessionEnd::Lost("fail point: cut before the resync's end".into());
                    }
                    let status = self.finish_as_target(peer_hello).await;
                    if crate::failpoint::hit("cut-before-resync-end-ack") {
                        return SessionEnd::Lost(
                            "fail point: cut before the resync's end was acknowledged".into(),
                        );
                    }
                    let _ = tx.send(Message::Ack { seq, status });
                }
                other => {
                    tracing::warn!(volume = %self.settings.volume, kind = ?other.kind(), "unexpected replication message ignored");
                }
            }
        }
    }

    pub(super) fn session_is(&self, id: u64) -> bool {
        self.st.borrow().session.as_ref().map(|s| s.id) == Some(id)
    }
}

/// Keeps a replication connection up for `vol` forever: the node with the smaller id listens,
/// the other connects with backoff. Each connection carries a fresh Hello.
pub async fn keep_connected<T: BlockTarget + 'static, D: MetaDevice + 'static>(
    vol: Rc<MirroredVolume<T, D>>,
    mut cfg: LinkConfig,
) -> Result<(), LinkError> {
    let listen = vol.settings.node < vol.settings.peer;
    let after = |end: &SessionEnd| match end {
        SessionEnd::Refused(_) | SessionEnd::Misconfigured(_) | SessionEnd::LocalMetadata(_) => {
            REFUSED_RETRY
        }
        _ => Duration::from_millis(100),
    };
    if listen {
        cfg.hello = vol.hello();
        let mut l = LinkListener::bind(cfg)?;
        loop {
            let sent = vol.hello();
            l.set_hello(sent.clone());
            match l.accept().await {
                Ok(link) => {
                    let end = vol.run_session(link, &sent).await;
                    session_ended(&vol, &end);
                    tokio::time::sleep(after(&end)).await;
                }
                Err(e) => {
                    link_failed(&vol, &e, "replication accept failed");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    } else {
        let mut backoff = link::Backoff::new(link::BackoffPolicy::default());
        loop {
            cfg.hello = vol.hello();
            match link::connect(&cfg).await {
                Ok(l) => {
                    backoff = link::Backoff::new(link::BackoffPolicy::default());
                    let sent = cfg.hello.clone();
                    let end = vol.run_session(l, &sent).await;
                    session_ended(&vol, &end);
                    tokio::time::sleep(after(&end)).await;
                }
                Err(e) => {
                    let d = backoff.next_delay_random().min(Duration::from_secs(1));
                    link_failed(&vol, &e, "replication connect failed");
                    tracing::trace!(volume = %vol.settings.volume, retry_in = ?d, "replication connect retry");
                    tokio::time::sleep(d).await;
                }
            }
        }
    }
}

/// Records a failed connect or accept for status and logs it: at error level the first time
/// a problem only the operator can fix appears (keys, version, identity, addresses), at warn
/// the first time another one does, and at debug when it repeats, so a retry loop does not
/// flood the log.
fn link_failed<T: BlockTarget + 'static, D: MetaDevice + 'static>(
    vol: &MirroredVolume<T, D>,
    e: &LinkError,
    what: &str,
) {
    let operator = e.needs_operator();
    let new = vol.link_failed(e.kind(), e.to_string(), operator);
    let v = &vol.settings.volume;
    match (new, operator) {
        (true, true) => {
            tracing::error!(volume = %v, error = %e, "{what}; retrying, but only the operator can fix this")
        }
        (true, false) => tracing::warn!(volume = %v, error = %e, "{what}; retrying"),
        (false, _) => tracing::debug!(volume = %v, error = %e, "{what} again"),
    }
}

/// Records why a session ended, for status, when the link (not the plan or a role change)
/// ended it.
fn session_ended<T: BlockTarget + 'static, D: MetaDevice + 'static>(
    vol: &MirroredVolume<T, D>,
    end: &SessionEnd,
) {
    let (kind, message, operator) = match end {
        SessionEnd::Lost(m) => ("session-lost", m, false),
        SessionEnd::Misconfigured(m) => ("volume-mismatch", m, true),
        SessionEnd::LocalMetadata(m) => ("local-metadata", m, true),
        SessionEnd::Refused(_) | SessionEnd::Dropped | SessionEnd::PeerLeftOutdated(_) => return,
    };
    if vol.link_failed(kind, message.clone(), operator) && operator {
        tracing::error!(volume = %vol.settings.volume, error = %message, "replication session refused; only the operator can fix this");
    }
}
