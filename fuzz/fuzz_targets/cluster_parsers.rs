//! Parsers of outside bytes in the cluster room: heartbeat datagrams, witness HTTP status
//! lines, witness URLs, control requests. None may panic; a datagram that decodes must
//! re-encode to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use twinvol::cluster::control::Request;
use twinvol::cluster::heartbeat::{decode, encode};
use twinvol::cluster::witness::status_code;
use twinvol::config::cluster::WitnessUrl;
use twinvol::repl::wire::auth::PreSharedKey;

fuzz_target!(|data: &[u8]| {
    let Ok(key) = PreSharedKey::new(vec![7; 32]) else { return };
    if let Ok(hb) = decode(data, &key) {
        assert_eq!(encode(&hb, &key), data);
    }
    let _ = status_code(data);
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(u) = WitnessUrl::parse(text) {
        assert!(!u.host.is_empty() && u.port != 0 && u.path.starts_with('/'));
    }
    let _ = serde_json::from_str::<Request>(text);
});
