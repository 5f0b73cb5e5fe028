//! The I/O engine as a block target, for both backends and both cache modes: random aligned and
//! unaligned reads/writes against a model, zeroing and trimming, allocation map, and concurrent
//! read-modify-write next to aligned writes (no lost update).

use std::rc::Rc;

use proptest::prelude::*;
use twinvol::block::{BlockTarget, ZeroFlags};
use twinvol::engine::{block_on, CacheMode, Engine, EngineKind, OpenOptions};

const SIZE: u64 = 1 << 20;

fn kinds() -> Vec<EngineKind> {
    let mut v = vec![EngineKind::Sync];
    if twinvol::engine::probe_uring().is_ok() {
        v.push(EngineKind::Uring);
    } else {
        panic!("io_uring unavailable on this host: the uring engine cannot be tested");
    }
    v
}

fn scratch_file(size: u64) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::Builder::new()
        .prefix("twinvol-engine-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let p = dir.path().join("disk.img");
    std::fs::File::create(&p).unwrap().set_len(size).unwrap();
    (dir, p)
}

#[derive(Debug, Clone)]
enum Op {
    Write { off: u64, len: usize, byte: u8 },
    Zero { off: u64, len: u64, no_hole: bool },
    Trim { off: u64, len: u64 },
}

fn arb_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..SIZE - 70_000, 1usize..70_000, any::<u8>()).prop_map(|(off, len, byte)| Op::Write { off, len, byte }),
        1 => (0..SIZE / 2, 1u64..100_000, any::<bool>()).prop_map(|(off, len, no_hole)| Op::Zero { off, len, no_hole }),
        1 => (0..SIZE / 2, 1u64..100_000).prop_map(|(off, len)| Op::Trim { off, len }),
    ]
}

fn run_ops(kind: EngineKind, cache: CacheMode, ops: &[Op]) -> Result<(), TestCaseError> {
    let (_dir, path) = scratch_file(SIZE);
    let mut opts = OpenOptions::new(&path);
    opts.cache = cache;
    let r = block_on(kind, async {
        let e = Engine::open(kind, &opts).unwrap();
        let mut model = vec![0u8; SIZE as usize];
        for op in ops {
            match *op {
                Op::Write { off, len, byte } => {
                    let mut buf = e.alloc_buf(len);
                    buf.fill(byte);
                    e.write(off, buf, false).await.0.unwrap();
                    model[off as usize..off as usize + len].fill(byte);
                }
                Op::Zero { off, len, no_hole } => {
                    e.write_zeroes(
                        off,
                        len,
                        ZeroFlags {
                            no_hole,
                            fast: false,
                            fua: false,
                        },
                    )
                    .await
                    .unwrap();
                    model[off as usize..(off + len) as usize].fill(0);
                }
                Op::Trim { off, len } => {
                    // TRIM contents are unspecified; the model follows what a read returns afterwards
                    // but the bytes outside the range must be untouched.
                    e.trim(off, len, false).await.unwrap();
                    let (_, back) = e.read(off, e.alloc_buf(len as usize)).await;
                    model[off as usize..(off + len) as usize].copy_from_slice(&back);
                }
            }
        }
        e.flush().await.unwrap();
        let (r, back) = e.read(0, e.alloc_buf(SIZE as usize)).await;
        r.unwrap();
        (back.to_vec(), model)
    })
    .unwrap();
    prop_assert!(r.0 == r.1, "{kind} {cache}: device differs from the model");
    let on_disk = std::fs::read(&path).unwrap();
    prop_assert!(
        on_disk == r.1,
        "{kind} {cache}: file differs from the model"
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn random_unaligned_io_matches_a_model_on_every_engine_and_cache_mode(ops in proptest::collection::vec(arb_op(), 1..12)) {
        for kind in kinds() {
            for cache in [CacheMode::None, CacheMode::Writeback] {
                run_ops(kind, cache, &ops)?;
            }
        }
    }
}

#[test]
fn concurrent_read_modify_write_never_loses_a_neighbouring_aligned_write() {
    for kind in kinds() {
        let (_dir, path) = scratch_file(SIZE);
        let opts = OpenOptions::new(&path);
        block_on(kind, async {
            let e = Rc::new(Engine::open(kind, &opts).unwrap());
            let align = e.geometry().alignment as u64;
            assert!(align >= 512);
            let mut tasks = Vec::new();
            // In every block, one unaligned 1-byte write (RMW) races an aligned write of the
            // *next* block and an aligned write of the same block's other half is never lost.
            for i in 0..64u64 {
                let e1 = e.clone();
                tasks.push(tokio::task::spawn_local(async move {
                    let mut b = e1.alloc_buf(1);
                    b[0] = 0xee;
                    e1.write(i * 2 * align + 3, b, false).await.0.unwrap();
                }));
                let e2 = e.clone();
                tasks.push(tokio::task::spawn_local(async move {
                    let mut b = e2.alloc_buf(align as usize);
                    b.fill(0x77);
                    e2.write((i * 2 + 1) * align, b, false).await.0.unwrap();
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
            let (r, back) = e.read(0, e.alloc_buf((128 * align) as usize)).await;
            r.unwrap();
            for i in 0..64usize {
                let a = align as usize;
                assert_eq!(
                    back[i * 2 * a + 3],
                    0xee,
                    "{kind}: RMW byte in block {}",
                    2 * i
                );
                assert!(
                    back[(i * 2 + 1) * a..(i * 2 + 2) * a]
                        .iter()
                        .all(|&b| b == 0x77),
                    "{kind}: aligned block {} lost",
                    2 * i + 1
                );
            }
        })
        .unwrap();
    }
}

#[test]
fn block_status_reports_holes_and_data_of_a_sparse_file() {
    for kind in kinds() {
        let (_dir, path) = scratch_file(SIZE);
        let opts = OpenOptions::new(&path);
        block_on(kind, async {
            let e = Engine::open(kind, &opts).unwrap();
            let mut b = e.alloc_buf(65536);
            b.fill(1);
            e.write(262_144, b, true).await.0.unwrap();
            let ex = e.block_status(0, SIZE).await.unwrap();
            assert!(
                ex[0].hole && ex[0].zero && ex[0].length == 262_144,
                "{kind}: {ex:?}"
            );
            assert!(!ex[1].hole && ex[1].length >= 65536, "{kind}: {ex:?}");
            assert_eq!(ex.iter().map(|x| x.length).sum::<u64>(), SIZE);
            // Punching makes it a hole again.
            e.write_zeroes(262_144, 65536, ZeroFlags::default())
                .await
                .unwrap();
            let ex = e.block_status(0, SIZE).await.unwrap();
            assert_eq!(ex.len(), 1, "{kind}: {ex:?}");
        })
        .unwrap();
    }
}

#[test]
fn fast_zero_on_an_unaligned_range_fails_fast_with_enotsup() {
    let (_dir, path) = scratch_file(SIZE);
    let opts = OpenOptions::new(&path);
    block_on(EngineKind::Sync, async {
        let e = Engine::open(EngineKind::Sync, &opts).unwrap();
        let err = e
            .write_zeroes(
                7,
                100,
                ZeroFlags {
                    fast: true,
                    ..Default::default()
                },
            )
            .await
            .unwrap_err();
        assert_eq!(err.raw_errno(), libc::ENOTSUP);
    })
    .unwrap();
}

#[test]
fn opening_bad_paths_gives_clear_errors() {
    let e = Engine::open(EngineKind::Sync, &OpenOptions::new("/nonexistent/disk.img"))
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("/nonexistent/disk.img") && e.contains("cannot open"),
        "{e}"
    );
    let e = Engine::open(EngineKind::Sync, &OpenOptions::new("/dev/null"))
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("neither a regular file nor a block device"),
        "{e}"
    );
    let (_dir, path) = scratch_file(1000);
    let e = Engine::open(EngineKind::Sync, &OpenOptions::new(&path))
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("not a multiple") && e.contains("--cache writeback"),
        "{e}"
    );
    let (_dir2, empty) = scratch_file(0);
    let e = Engine::open(EngineKind::Sync, &OpenOptions::new(&empty))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("size is 0"), "{e}");
}
