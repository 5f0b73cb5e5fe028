//! The metadata story of a failover, end to end on two in-memory devices: the primary
//! crashes with writes the peer never acknowledged, the secondary is promoted and writes,
//! the old primary returns. The generation ids must pick the promoted node as the source,
//! and the union of both bitmaps must cover every region where the two disks may differ;
//! after the resync both sides agree that nothing is left to do.

use twinvol::meta::al::AlGeometry;
use twinvol::meta::bitmap::{DirtyBitmap, Granularity};
use twinvol::meta::device::MemDevice;
use twinvol::meta::gen::{decide, Decision, Direction, DiskFlags, NodeGen};
use twinvol::meta::store::{CreateOptions, MetaStore};

const MIB: u64 = 1 << 20;

fn node(id: u32) -> (MemDevice, MetaStore<MemDevice>) {
    let dev = MemDevice::new(1024 * MIB);
    let opts = CreateOptions {
        volume_uuid: Some([1; 16]),
        node_id: id,
        peer_node_id: 1 - id,
        granularity: Granularity::new(64 * 1024).unwrap(),
        al: AlGeometry::new(4 * MIB, 16).unwrap(),
        external_data_size: None,
    };
    let mut s = MetaStore::create(dev.clone(), &opts).unwrap();
    // Both restored from the same snapshot: skip the initial sync with one shared id.
    s.update_state(|g, f| {
        g.current = 0x5EED;
        f.set(
            DiskFlags::CONSISTENT | DiskFlags::UP_TO_DATE | DiskFlags::INITIAL_SYNC_DONE,
            true,
        );
    })
    .unwrap();
    (dev, s)
}

fn view(s: &MetaStore<MemDevice>) -> NodeGen {
    let sb = s.superblock();
    NodeGen {
        node_id: sb.node_id,
        ids: sb.gen,
        flags: sb.flags,
    }
}

#[test]
fn failover_after_a_primary_crash_resyncs_the_union_from_the_promoted_node() {
    let (dev_a, mut a) = node(0);
    let (_dev_b, mut b) = node(1);
    assert_eq!(decide(&view(&a), &view(&b)), Decision::NoResync);

    // A is primary, connected, sync mode: writes are acknowledged by B and cleared, except
    // the last two, still in flight when A's machine dies.
    a.update_state(|_, f| f.set(DiskFlags::WAS_PRIMARY | DiskFlags::CRASHED_PRIMARY, true))
        .unwrap();
    let acked = [(0u64, 4096u64), (100 * MIB, 8192), (300 * MIB, 4096)];
    let in_flight = [(500 * MIB + 4096, 4096u64), (700 * MIB, 65536)];
    for (off, len) in acked.iter().chain(&in_flight) {
        a.mark_dirty(*off, *len).unwrap();
        a.prepare_write(*off, *len).unwrap();
    }
    for (off, len) in acked {
        a.clear_dirty(off, len).unwrap();
    }
    drop(a); // crash: no clean close, bitmap never persisted

    // B is promoted while A is away and writes.
    b.update_state(|g, f| {
        g.new_current(0xB0B);
        f.set(DiskFlags::WAS_PRIMARY, true);
    })
    .unwrap();
    let b_writes = [(200 * MIB, 4096u64), (500 * MIB, 4096)];
    for (off, len) in b_writes {
        b.mark_dirty(off, len).unwrap();
        b.prepare_write(off, len).unwrap();
    }

    // A returns: the activity log replay marks its in-flight regions dirty.
    let (mut a, _) = MetaStore::open(dev_a.reboot()).unwrap();
    for (off, len) in in_flight {
        assert!(
            a.bitmap().is_dirty(off, len).unwrap(),
            "A's unacknowledged write at {off} must be dirty"
        );
    }
    assert!(a.superblock().flags.has(DiskFlags::CRASHED_PRIMARY));

    // The decision: B is newer (A's current is B's bitmap id): bitmap resync B -> A.
    assert_eq!(
        decide(&view(&a), &view(&b)),
        Decision::BitmapResync {
            direction: Direction::PeerToLocal
        }
    );
    assert_eq!(
        decide(&view(&b), &view(&a)),
        Decision::BitmapResync {
            direction: Direction::LocalToPeer
        }
    );

    // The bitmaps travel run-length encoded; the resync set is their union.
    let wire = a.bitmap().encode_rle();
    let from_a = DirtyBitmap::decode_rle(&wire, b.bitmap().geometry()).unwrap();
    let mut resync = b.bitmap().clone();
    resync.merge(&from_a).unwrap();
    for (off, len) in in_flight.iter().chain(&b_writes) {
        assert!(
            resync.is_dirty(*off, *len).unwrap(),
            "region at {off} may differ and must be resynced"
        );
    }
    // Bounded by the activity log, not the device: a few extents, not 1 GiB.
    assert!(
        resync.dirty_bytes() <= 16 * 4 * MIB + 2 * 65536,
        "{} bytes",
        resync.dirty_bytes()
    );

    // Resync done: B retires its bitmap id, A adopts B's generation; both bitmaps clean.
    let source = b.superblock().gen;
    b.replace_bitmap(DirtyBitmap::new(resync.geometry()))
        .unwrap();
    b.update_state(|g, _| g.resync_finished_as_source())
        .unwrap();
    a.replace_bitmap(DirtyBitmap::new(resync.geometry()))
        .unwrap();
    a.update_state(|g, f| {
        g.resync_finished_as_target(&source, false);
        f.set(DiskFlags::CRASHED_PRIMARY | DiskFlags::WAS_PRIMARY, false);
    })
    .unwrap();
    a.persist_bitmap().unwrap();
    b.persist_bitmap().unwrap();
    assert_eq!(decide(&view(&a), &view(&b)), Decision::NoResync);
    assert_eq!(a.superblock().gen, b.superblock().gen);
}

#[test]
fn both_nodes_writing_while_apart_is_reported_as_split_brain_with_the_common_ancestor() {
    let (_da, mut a) = node(0);
    let (_db, mut b) = node(1);
    a.update_state(|g, _| g.new_current(0xAAAA)).unwrap();
    b.update_state(|g, _| g.new_current(0xBBBB)).unwrap();
    match decide(&view(&a), &view(&b)) {
        Decision::SplitBrain { evidence } => {
            let text = format!("{evidence:?}");
            assert!(
                text.contains("BitmapIdsEqual") && text.contains(&format!("{}", 0x5EED)),
                "{text}"
            );
        }
        other => panic!("expected split brain, got {other:?}"),
    }
}
