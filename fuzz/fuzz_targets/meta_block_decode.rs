//! Superblock, bitmap-page and activity-log decoders must reject any 4 KiB block without
//! panicking; what they accept must survive an encode/decode round trip unchanged (reserved
//! bytes are covered by the CRC but not re-encoded, so the comparison is on values).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| twinvol_fuzz::meta_block_decode(data));
