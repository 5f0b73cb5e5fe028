//! The run-length bitmap decoder must reject any byte string without panicking, and what it
//! accepts must re-encode to the same bytes (the encoding is canonical).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| twinvol_fuzz::meta_rle_decode(data));
