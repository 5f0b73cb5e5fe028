//! Metadata costs:
//! 1. dirty tracking of one 4 KiB random write that hits the activity log (timed);
//! 2. metadata writes per 100,000 uniformly random 4 KiB writes across 1 GiB and 100 GiB,
//!    from the activity-log model and counted on the real store over an in-memory device
//!    (computed, not timed; printed to stderr and checked to agree).
//!
//! Run: `cargo bench --bench meta`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use twinvol::meta::al::{self, ActivityLog, AlGeometry, WritePlan};
use twinvol::meta::bitmap::{BitmapGeometry, DirtyBitmap, Granularity};
use twinvol::meta::device::MemDevice;
use twinvol::meta::format::BM_BITS_PER_PAGE;
use twinvol::meta::store::{CreateOptions, MetaStore, Prepared};

const GIB: u64 = 1 << 30;

/// splitmix64: a small deterministic generator for offsets.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn offset_4k(&mut self, region: u64) -> u64 {
        (self.next() % (region / 4096)) * 4096
    }
}

fn hot_log_and_bitmap(region: u64) -> (ActivityLog, DirtyBitmap) {
    let g = AlGeometry::default();
    let mut log = ActivityLog::new(g);
    for e in 0..region / u64::from(g.extent_size()) {
        if let Ok(WritePlan::Transaction(u)) = log.access(e * u64::from(g.extent_size()), 1) {
            log.apply(&u);
        }
    }
    let bm = DirtyBitmap::new(BitmapGeometry::new(100 * GIB, Granularity::DEFAULT).unwrap());
    (log, bm)
}

fn dirty_tracking_on_al_hit(c: &mut Criterion) {
    let region = GIB;
    let (mut log, mut bm) = hot_log_and_bitmap(region);
    let mut rng = Rng(1);
    c.bench_function("meta/al_hit+bitmap_set 4KiB random (pure)", |b| {
        b.iter(|| {
            let off = rng.offset_4k(region);
            bm.set(off, 4096).unwrap();
            let hit = log.access(black_box(off), 4096).unwrap();
            debug_assert_eq!(hit, WritePlan::Hit);
            black_box(hit);
        })
    });

    // CPU cost of planning a miss with a full 1024-slot log (victim choice + record);
    // the transaction write itself is device time, not measured here.
    let (mut full, _) = hot_log_and_bitmap(4 * GIB);
    let mut rng = Rng(3);
    let mut seq = 0;
    c.bench_function(
        "meta/al_miss plan+record+apply, full 1024-slot log (CPU only)",
        |b| {
            b.iter(|| {
                let off = 4 * GIB + rng.offset_4k(96 * GIB);
                if let WritePlan::Transaction(u) = full.access(off, 4096).unwrap() {
                    seq += 1;
                    black_box(full.record(seq, &u));
                    full.apply(&u);
                }
            })
        },
    );

    let dev = MemDevice::new(101 * GIB);
    let opts = CreateOptions {
        external_data_size: Some(100 * GIB),
        ..Default::default()
    };
    let mut store = MetaStore::create(dev, &opts).unwrap();
    for e in 0..region / (4 << 20) {
        store.prepare_write(e * (4 << 20), 4096).unwrap();
        store.complete_write(e * (4 << 20), 4096);
    }
    let mut rng = Rng(2);
    c.bench_function(
        "meta/store mark_dirty+prepare_write+complete_write 4KiB random, AL hit",
        |b| {
            b.iter(|| {
                let off = rng.offset_4k(region);
                store.mark_dirty(off, 4096).unwrap();
                let written = store.prepare_write(black_box(off), 4096).unwrap();
                debug_assert_eq!(written, Prepared::Ready(0));
                // The bits are set: the write may leave the log's count at once.
                black_box(store.complete_write(off, 4096));
                black_box(written);
            })
        },
    );
}

fn metadata_writes_per_100k(c: &mut Criterion) {
    let _ = c;
    for (name, region) in [("1 GiB", GIB), ("100 GiB", 100 * GIB)] {
        let mut rng = Rng(42);
        let model = al::simulate(
            AlGeometry::default(),
            Granularity::DEFAULT.shift(),
            BM_BITS_PER_PAGE,
            100_000,
            4096,
            || rng.offset_4k(region),
        )
        .unwrap();

        // The same stream on the real store (bits stay dirty: peer disconnected).
        let dev = MemDevice::new(101 * GIB);
        let opts = CreateOptions {
            external_data_size: Some(100 * GIB),
            ..Default::default()
        };
        let mut store = MetaStore::create(dev.clone(), &opts).unwrap();
        dev.arm(twinvol::meta::device::Fault::None);
        let mut rng = Rng(42);
        for _ in 0..100_000 {
            let off = rng.offset_4k(region);
            store.mark_dirty(off, 4096).unwrap();
            let prepared = store.prepare_write(off, 4096).unwrap();
            assert!(matches!(prepared, Prepared::Ready(_)), "{prepared:?}");
            store.complete_write(off, 4096);
        }
        let store_writes = dev.writes();
        let flushes = dev.flushes();
        eprintln!(
            "meta/metadata writes per 100,000 random 4 KiB writes across {name}: {} (AL transactions {}, bitmap pages {}, hits {}); real store: {} block writes, {} flushes",
            model.al_transactions + model.bitmap_page_writes,
            model.al_transactions,
            model.bitmap_page_writes,
            model.hits,
            store_writes,
            flushes,
        );
        assert_eq!(
            store_writes,
            model.al_transactions + model.bitmap_page_writes,
            "model and store disagree"
        );
    }
}

criterion_group!(benches, dirty_tracking_on_al_hit, metadata_writes_per_100k);
criterion_main!(benches);
