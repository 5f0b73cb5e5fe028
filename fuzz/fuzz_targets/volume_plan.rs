//! Fuzzes `volume::plan` and `meta::gen::decide` with arbitrary generation ids, flags, node
//! ids, roles and split-brain policies; see `twinvol_fuzz::volume_plan` for the invariants.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| twinvol_fuzz::volume_plan(data));
