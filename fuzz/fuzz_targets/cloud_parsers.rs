//! Parsers of outside text in the cloud room: AWS error messages, CIDR blocks, record names,
//! `[cloud]` TOML, DNS answers. None may panic; accepted record names must stay accepted after normalising.
#![no_main]

use libfuzzer_sys::fuzz_target;
use twinvol::cloud::aws::error::quoted_id;
use twinvol::cloud::dns_wire::decode_answer;
use twinvol::cloud::vip_route::cidr_contains;
use twinvol::config::cloud::{check_record_name, CloudConfig};

fuzz_target!(|data: &[u8]| {
    if data.len() >= 2 {
        let id = u16::from_be_bytes([data[0], data[1]]);
        let _ = decode_answer(id, data);
    }
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Some(id) = quoted_id(text) {
        assert!(text.contains(&format!("'{id}'")));
    }
    let _ = cidr_contains(text, std::net::Ipv4Addr::new(10, 0, 0, 1));
    if check_record_name(text).is_ok() {
        assert!(text.ends_with('.') && !text.bytes().any(|b| b.is_ascii_uppercase()));
    }
    if let Ok(c) = toml::from_str::<CloudConfig>(text) {
        let _ = c.validate();
    }
});
