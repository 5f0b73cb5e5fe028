//! Parsers of outside text in the cloud room: AWS error messages, CIDR blocks, record names,
//! `[cloud]` TOML, DNS answers. None may panic; accepted record names must stay accepted after normalising.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| twinvol_fuzz::cloud_parsers(data));
