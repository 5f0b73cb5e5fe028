//! Parsers of outside bytes in the cluster room: heartbeat datagrams, witness HTTP status
//! lines, witness URLs, control requests. None may panic; a datagram that decodes must
//! re-encode to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| twinvol_fuzz::cluster_parsers(data));
