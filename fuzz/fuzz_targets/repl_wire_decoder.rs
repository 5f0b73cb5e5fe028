//! Fuzzes `repl::wire::FrameDecoder` (seeds: fuzz/seeds/repl-wire-frames).
//!
//! Properties: arbitrary bytes never panic the decoder; feeding the same bytes whole or in
//! small pieces yields the same messages and fails at the same point; every accepted message
//! re-encodes to a frame that decodes to the same message (the codec is canonical).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| twinvol_fuzz::repl_wire_decoder(data));
