//! Fuzzes the parsers of netlink replies (`nbd::kernel::netlink`): message splitting, ack and
//! error classification, attribute walking, the controller's family-id reply and the nbd
//! driver's STATUS and CONNECT replies. Arbitrary bytes must never panic or read out of bounds.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| twinvol_fuzz::netlink_reply(data));
