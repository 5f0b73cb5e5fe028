//! Fuzzes the whole NBD server (handshake + transmission) with a raw client byte stream, the
//! same input `twinvol export --stdio` reads. Seeds: fuzz/seeds/nbd-client-streams/.
//! Property: the server never panics or hangs, whatever the bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| twinvol_fuzz::nbd_stream(data));
