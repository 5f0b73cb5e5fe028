//! Unit tests of the mirrored volume: role changes, the disconnected Primary, held writes, the
//! activity log in both modes, resync and application writes.
use bytes::Bytes;

use super::state::SessionTx;
use super::*;
use crate::block::mem::MemTarget;
use crate::block::{BlockResult, Extent, ZeroFlags};
use crate::engine::buf::AlignedBuf;
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
