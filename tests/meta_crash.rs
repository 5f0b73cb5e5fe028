//! Crash safety of the metadata store: a fault-injecting device tears or drops writes at
//! every point of a workload (either superblock slot, mid bitmap page, mid activity-log
//! transaction), then the metadata is reopened from what reached the medium. Reopening must
//! succeed from the last good copy, and every region whose data write may have been issued
//! (and not since acknowledged by the peer) must be dirty: never a false "clean".

use std::collections::BTreeSet;

use twinvol::meta::al::AlGeometry;
use twinvol::meta::bitmap::Granularity;
use twinvol::meta::device::{Fault, MemDevice};
use twinvol::meta::format::{BlockId, FormatError, BLOCK};
use twinvol::meta::gen::GenIds;
use twinvol::meta::store::{inspect, CreateOptions, Finding, MetaStore, Prepared, StoreError};

const MIB: u64 = 1 << 20;
const GRAN: u64 = 4096;
const DEVICE: u64 = 300 * MIB;

#[derive(Debug, Clone, Copy)]
enum Op {
    /// A data write: mark dirty, log, then (if Ok) the data goes out.
    Write(u64, u64),
    /// The peer acknowledged a range: both copies equal.
    Ack(u64, u64),
    /// Background bitmap flush.
    Persist,
    /// Promotion while disconnected: a new current generation id.
    NewCurrent(u64),
    /// Clean shutdown and start again (the log is emptied, bits persisted).
    CloseAndReopen,
    /// Start again without a clean shutdown (the process restarts; the log is replayed).
    Reopen,
}

/// What must hold after a crash.
#[derive(Debug, Default, Clone)]
struct Model {
    /// Chunks that may differ from the peer.
    must_be_dirty: BTreeSet<u64>,
    /// Generation ids of the last update that returned Ok.
    committed: Option<GenIds>,
    /// Generation ids of an update that was interrupted.
    in_flight: Option<GenIds>,
}

fn opts() -> CreateOptions {
    opts_with_extent(MIB)
}

/// 4 KiB granularity; 4 hot extents of `extent` bytes. With 4 MiB extents (16 bitmap words)
/// some extents straddle two bitmap pages (508 words each).
fn opts_with_extent(extent: u64) -> CreateOptions {
    CreateOptions {
        volume_uuid: Some([3; 16]),
        granularity: Granularity::new(GRAN as u32).unwrap(),
        al: AlGeometry::new(extent, 4).unwrap(),
        ..Default::default()
    }
}

/// A deterministic workload over 300 MiB (3 bitmap pages at 4 KiB) with a 4-extent log,
/// so evictions, page writes and superblock updates all happen.
fn workload(seed: u64, n: usize) -> Vec<Op> {
    let mut x = seed;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let data = 290 * MIB;
    (0..n)
        .map(|i| {
            let r = next();
            let off = (r % (data / GRAN - 40)) * GRAN + (r >> 40) % 3 * 512;
            let len = 4096 + (r >> 50) % 3 * 4096;
            match i % 10 {
                3 => Op::Ack(off, len),
                4 if i % 40 == 4 => Op::CloseAndReopen,
                8 if i % 40 == 18 => Op::Reopen,
                6 => Op::Persist,
                9 => Op::NewCurrent(0x1000 + i as u64),
                _ => Op::Write(off, len),
            }
        })
        .collect()
}

fn chunks(off: u64, len: u64) -> std::ops::Range<u64> {
    off / GRAN..(off + len).div_ceil(GRAN)
}

/// Runs `ops` until the first error (the process dies with the machine).
fn run(store: MetaStore<MemDevice>, ops: &[Op], model: &mut Model) -> Result<(), StoreError> {
    let mut store = store;
    model.committed = Some(store.superblock().gen);
    for op in ops {
        match *op {
            Op::Write(off, len) => {
                store.mark_dirty(off, len)?;
                let prepared = store.prepare_write(off, len)?;
                assert!(
                    matches!(prepared, Prepared::Ready(_)),
                    "write {off}+{len}: {prepared:?} although no write is in flight"
                );
                model.must_be_dirty.extend(chunks(off, len));
                // The data write goes out and ends; its bits are set, so the log may let it go.
                assert!(store.complete_write(off, len));
            }
            Op::Ack(off, len) => {
                store.clear_dirty(off, len)?;
                let covered = off.div_ceil(GRAN)..(off + len) / GRAN;
                for c in covered {
                    model.must_be_dirty.remove(&c);
                }
            }
            Op::Persist => {
                store.persist_bitmap()?;
            }
            Op::NewCurrent(id) => {
                let mut next = store.superblock().gen;
                next.new_current(id);
                model.in_flight = Some(next);
                store.update_state(|g, _| g.new_current(id))?;
                model.committed = Some(next);
                model.in_flight = None;
            }
            Op::CloseAndReopen => {
                let dev = store.close_clean()?;
                store = MetaStore::open(dev)?.0;
            }
            Op::Reopen => {
                let dev = store.device().clone();
                drop(store);
                store = MetaStore::open(dev)?.0;
            }
        }
    }
    Ok(())
}

fn check_reopen(dev: &MemDevice, model: &Model, what: &str) {
    let (store, _findings) =
        MetaStore::open(dev.reboot()).unwrap_or_else(|e| panic!("{what}: reopen failed: {e}"));
    let bm = store.bitmap();
    for c in &model.must_be_dirty {
        assert!(
            bm.test_chunk(*c),
            "{what}: chunk {c} was written but is clean after the crash"
        );
    }
    let gen = store.superblock().gen;
    assert!(
        Some(gen) == model.committed || Some(gen) == model.in_flight,
        "{what}: generation ids {gen:?} are neither the committed {:?} nor the in-flight {:?}",
        model.committed,
        model.in_flight
    );
}

fn fresh_store() -> (MemDevice, MetaStore<MemDevice>) {
    fresh_store_with(&opts())
}

fn fresh_store_with(o: &CreateOptions) -> (MemDevice, MetaStore<MemDevice>) {
    let dev = MemDevice::new(DEVICE);
    let store = MetaStore::create(dev.clone(), o).unwrap();
    (dev, store)
}

#[test]
fn crash_at_every_metadata_write_never_loses_a_dirty_region() {
    crash_everywhere(&opts(), 0x9E37_79B9_7F4A_7C15);
}

#[test]
fn crash_at_every_metadata_write_with_extents_straddling_bitmap_pages() {
    crash_everywhere(&opts_with_extent(4 * MIB), 0x2545_F491_4F6C_DD1D);
}

fn crash_everywhere(o: &CreateOptions, seed: u64) {
    let ops = workload(seed, 120);
    let (dev, store) = fresh_store_with(o);
    dev.arm(Fault::None);
    run(store, &ops, &mut Model::default()).unwrap();
    let total = dev.writes();
    assert!(
        total > 60,
        "the workload should cause many metadata writes, got {total}"
    );
    let mut crashes = 0;
    for write in 1..=total {
        // Cuts inside each block kind's meaningful bytes (the rest of a block is zeros).
        for keep in [0, 20, 40, 84, 600, BLOCK] {
            let (dev, store) = fresh_store_with(o);
            dev.arm(Fault::CrashAt { write, keep });
            let mut model = Model::default();
            let r = run(store, &ops, &mut model);
            assert!(
                r.is_err(),
                "crash at write {write} must surface as an error before the workload ends"
            );
            crashes += 1;
            check_reopen(
                &dev,
                &model,
                &format!("crash at write {write} keeping {keep} bytes"),
            );
        }
    }
    assert_eq!(crashes, total * 6);
}

/// Finds the index (1-based) of the first write at `offset` in a fault-free run of `ops`.
fn first_write_at(ops: &[Op], offset: u64) -> u64 {
    let (dev, store) = fresh_store();
    dev.arm(Fault::None);
    run(store, ops, &mut Model::default()).unwrap();
    dev.write_log()
        .iter()
        .position(|o| *o == offset)
        .map(|i| i as u64 + 1)
        .expect("workload writes there")
}

fn layout_offsets() -> (u64, twinvol::meta::format::AreaLayout) {
    let (dev, _s) = fresh_store();
    let ins = inspect(&mut dev.reboot()).unwrap();
    (ins.area_start, ins.layout)
}

#[test]
fn torn_superblock_write_in_either_slot_loads_the_other_slot() {
    // Only generation changes write the superblock here, so every superblock write changes
    // its contents (a clean close rewriting identical bytes would make a tear invisible).
    let ops: Vec<Op> = workload(7, 60)
        .into_iter()
        .filter(|o| !matches!(o, Op::CloseAndReopen | Op::Reopen))
        .collect();
    let (start, layout) = layout_offsets();
    for slot in 0..2u8 {
        let at = first_write_at(&ops, start + layout.superblock_offset(slot));
        let (dev, store) = fresh_store();
        // Cut inside the current generation id (bytes 80..88): the rest of the slot is old.
        dev.arm(Fault::CrashAt {
            write: at,
            keep: 84,
        });
        let mut model = Model::default();
        assert!(run(store, &ops, &mut model).is_err());
        let ins = inspect(&mut dev.reboot()).unwrap();
        assert!(
            ins.findings.iter().any(|f| matches!(f, Finding::SuperblockSlot(FormatError::Crc { block: BlockId::SuperblockSlot(s), .. }) if *s == slot)),
            "slot {slot}: torn superblock not reported: {:?}",
            ins.findings
        );
        assert_eq!(
            Some(ins.superblock.gen),
            model.committed,
            "the last good copy is loaded"
        );
        check_reopen(&dev, &model, &format!("torn superblock slot {slot}"));
        // Reopening repairs the torn slot.
        let rebooted = dev.reboot();
        drop(MetaStore::open(rebooted.clone()).unwrap());
        let after = inspect(&mut rebooted.reboot()).unwrap();
        assert!(after.findings.is_empty(), "{:?}", after.findings);
        assert_eq!(Some(after.superblock.gen), model.committed);
    }
}

#[test]
fn torn_bitmap_page_is_reported_and_its_chunks_are_dirty() {
    let ops = workload(11, 80);
    let (start, layout) = layout_offsets();
    let page = (0..layout.bitmap_pages)
        .find(|p| {
            let (dev, store) = fresh_store();
            dev.arm(Fault::None);
            run(store, &ops, &mut Model::default()).unwrap();
            dev.write_log()
                .contains(&(start + layout.bitmap_page_offset(*p)))
        })
        .expect("the workload writes a bitmap page");
    let at = first_write_at(&ops, start + layout.bitmap_page_offset(page));
    let (dev, store) = fresh_store();
    dev.arm(Fault::CrashAt {
        write: at,
        keep: 2048,
    });
    let mut model = Model::default();
    assert!(run(store, &ops, &mut model).is_err());
    let ins = inspect(&mut dev.reboot()).unwrap();
    assert!(
        ins.findings.iter().any(|f| matches!(f, Finding::BitmapPage(FormatError::Crc { block: BlockId::BitmapPage(p), .. }) if *p == page)),
        "torn bitmap page {page} not reported: {:?}",
        ins.findings
    );
    let bits = twinvol::meta::format::BM_BITS_PER_PAGE;
    let bm = ins.recovered_bitmap();
    for c in [page * bits, page * bits + bits / 2] {
        if c < bm.geometry().chunks() {
            assert!(bm.test_chunk(c), "chunk {c} of the torn page must be dirty");
        }
    }
    check_reopen(&dev, &model, "torn bitmap page");
}

#[test]
fn torn_activity_log_transaction_keeps_the_previous_log_and_all_issued_writes_dirty() {
    let ops = workload(13, 60);
    let (start, layout) = layout_offsets();
    let ring: Vec<u64> = (0..layout.al_blocks)
        .map(|i| start + layout.al_block_offset(i))
        .collect();
    let (dev, store) = fresh_store();
    dev.arm(Fault::None);
    run(store, &ops, &mut Model::default()).unwrap();
    let log = dev.write_log();
    let al_writes: Vec<u64> = log
        .iter()
        .enumerate()
        .filter(|(_, o)| ring.contains(o))
        .map(|(i, _)| i as u64 + 1)
        .collect();
    assert!(al_writes.len() > 5);
    for &at in al_writes.iter().skip(2).take(4) {
        let (dev, store) = fresh_store();
        // Cut after the sequence number: the counts and entries are the old block's.
        dev.arm(Fault::CrashAt {
            write: at,
            keep: 40,
        });
        let mut model = Model::default();
        assert!(run(store, &ops, &mut model).is_err());
        let ins = inspect(&mut dev.reboot()).unwrap();
        assert!(
            ins.findings
                .iter()
                .any(|f| matches!(f, Finding::AlBlock(FormatError::Crc { .. }))),
            "torn AL block not reported: {:?}",
            ins.findings
        );
        assert!(
            ins.al.complete,
            "one torn transaction must not lose the log"
        );
        check_reopen(&dev, &model, &format!("torn AL transaction at write {at}"));
    }
}

#[test]
fn corrupted_blocks_are_reported_by_name_and_never_accepted() {
    let (dev, mut store) = fresh_store();
    store.mark_dirty(10 * MIB, 4096).unwrap();
    store.prepare_write(10 * MIB, 4096).unwrap();
    store.persist_bitmap().unwrap();
    let (start, layout) = (
        store.area_start(),
        inspect(&mut dev.reboot()).unwrap().layout,
    );
    drop(store);

    dev.corrupt(start + layout.superblock_offset(0) + 200, 0x10);
    dev.corrupt(start + layout.bitmap_page_offset(2) + 500, 0x01);
    let ins = inspect(&mut dev.reboot()).unwrap();
    let names: Vec<String> = ins.findings.iter().map(|f| f.to_string()).collect();
    assert!(
        names
            .iter()
            .any(|n| n.starts_with("superblock slot A is corrupted: stored CRC32")),
        "{names:?}"
    );
    assert!(
        names
            .iter()
            .any(|n| n.starts_with("bitmap page 2 is corrupted")),
        "{names:?}"
    );
    let bm = ins.recovered_bitmap();
    assert!(
        bm.test_chunk(2 * twinvol::meta::format::BM_BITS_PER_PAGE),
        "a corrupted page counts as dirty"
    );
    assert!(bm.is_dirty(10 * MIB, 4096).unwrap());

    dev.corrupt(start + layout.superblock_offset(1) + 300, 0x20);
    match inspect(&mut dev.reboot()) {
        Err(StoreError::NoSuperblock { a, b })
            if matches!(*a, FormatError::Crc { .. }) && matches!(*b, FormatError::Crc { .. }) => {}
        other => panic!("both slots corrupted must be refused, got {other:?}"),
    }
}

#[test]
fn unrecoverable_activity_log_makes_the_whole_device_dirty() {
    let (dev, store) = fresh_store();
    let (start, ring) = (
        store.area_start(),
        inspect(&mut dev.reboot()).unwrap().layout,
    );
    drop(store);
    for i in 0..ring.al_blocks {
        dev.corrupt(start + ring.al_block_offset(i) + 64, 0xff);
    }
    let (s, findings) = MetaStore::open(dev.reboot()).unwrap();
    assert!(findings.contains(&Finding::AlIncomplete));
    assert_eq!(s.bitmap().dirty_chunks(), s.bitmap().geometry().chunks());
}
