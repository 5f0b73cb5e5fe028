//! The fuzz corpora stay runnable without cargo-fuzz, nightly or a sanitizer: every seed in
//! `fuzz/seeds/` goes through the very function its cargo-fuzz target calls
//! (`fuzz/src/lib.rs`, included below), with the same assertions. A seed that once crashed a
//! target stays in its directory as a regression input.

#[path = "../fuzz/src/lib.rs"]
mod fuzz_bodies;

use std::path::{Path, PathBuf};

/// A target: its name, the function libFuzzer calls, and its seed directories under
/// `fuzz/seeds/` (the first named after the target; older ones kept by their original name).
type Target = (&'static str, fn(&[u8]), &'static [&'static str]);

const TARGETS: &[Target] = &[
    (
        "nbd_stream",
        fuzz_bodies::nbd_stream,
        &["nbd_stream", "nbd-client-streams"],
    ),
    (
        "netlink_reply",
        fuzz_bodies::netlink_reply,
        &["netlink_reply"],
    ),
    (
        "repl_wire_decoder",
        fuzz_bodies::repl_wire_decoder,
        &["repl_wire_decoder", "repl-wire-frames"],
    ),
    (
        "meta_rle_decode",
        fuzz_bodies::meta_rle_decode,
        &["meta_rle_decode"],
    ),
    (
        "meta_block_decode",
        fuzz_bodies::meta_block_decode,
        &["meta_block_decode"],
    ),
    (
        "cloud_parsers",
        fuzz_bodies::cloud_parsers,
        &["cloud_parsers"],
    ),
    (
        "cluster_parsers",
        fuzz_bodies::cluster_parsers,
        &["cluster_parsers"],
    ),
    ("volume_plan", fuzz_bodies::volume_plan, &["volume_plan"]),
];

fn seed_files(dirs: &[&str]) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds");
    let mut files = Vec::new();
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(root.join(dir)) else {
            continue;
        };
        for e in entries {
            let path = e.expect("readable seed directory").path();
            if path.is_file() {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

#[test]
fn every_fuzz_target_has_seeds_in_the_repository() {
    for (name, _, dirs) in TARGETS {
        assert!(
            !seed_files(dirs).is_empty(),
            "no seeds for fuzz target {name} in fuzz/seeds/{dirs:?}"
        );
    }
}

#[test]
fn every_seed_passes_its_fuzz_target_without_a_panic() {
    let mut failures = Vec::new();
    let mut count = 0;
    for (name, body, dirs) in TARGETS {
        for path in seed_files(dirs) {
            let data = std::fs::read(&path).expect("readable seed");
            count += 1;
            if std::panic::catch_unwind(|| body(&data)).is_err() {
                failures.push(format!("{name}: {}", path.display()));
            }
        }
    }
    assert!(count > 0, "no seeds found under fuzz/seeds");
    assert!(
        failures.is_empty(),
        "seeds failing their target: {failures:#?}"
    );
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(5_000))]

    /// The plan invariants of the `volume_plan` target (antisymmetric decision, agreeing
    /// plans, no Primary overwritten, no copy from inconsistent or unrelated data) on
    /// arbitrary inputs, in CI.
    #[test]
    fn volume_plan_invariants_hold_for_arbitrary_inputs(
        data in proptest::collection::vec(proptest::num::u8::ANY, 0..48)
    ) {
        fuzz_bodies::volume_plan(&data);
    }
}
