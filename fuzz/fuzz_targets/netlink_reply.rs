//! Fuzzes the parsers of netlink replies (`nbd::kernel::netlink`): message splitting, ack and
//! error classification, attribute walking, the controller's family-id reply and the nbd
//! driver's STATUS and CONNECT replies. Arbitrary bytes must never panic or read out of bounds.
#![no_main]

use libfuzzer_sys::fuzz_target;
use twinvol::nbd::kernel::netlink::nbd_family::parse_any_reply;

fuzz_target!(|data: &[u8]| {
    let _ = parse_any_reply(data);
});
