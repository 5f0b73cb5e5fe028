//! Fuzzes `repl::wire::FrameDecoder` (seeds: fuzz/seeds/repl-wire-frames).
//!
//! Properties: arbitrary bytes never panic the decoder; feeding the same bytes whole or in
//! small pieces yields the same messages and fails at the same point; every accepted message
//! re-encodes to a frame that decodes to the same message (the codec is canonical).
#![no_main]

use libfuzzer_sys::fuzz_target;
use twinvol::repl::wire::{FrameDecoder, FrameEncoder, Message};

const MAX: u32 = 1 << 20;

/// Feeds `bytes` in pieces of `step` and collects messages until the first error (`true`).
fn run(bytes: &[u8], step: usize) -> (Vec<Message>, bool) {
    let mut d = FrameDecoder::new(MAX).expect("limit is valid");
    let mut out = Vec::new();
    for piece in bytes.chunks(step.max(1)) {
        d.push(piece);
        loop {
            match d.pop() {
                Ok(Some(m)) => out.push(m),
                Ok(None) => break,
                Err(_) => return (out, true),
            }
        }
    }
    (out, false)
}

fuzz_target!(|data: &[u8]| {
    let whole = run(data, data.len());
    let pieces = run(data, 1 + data.len() % 61);
    assert_eq!(whole, pieces, "split changed the outcome");
    let mut enc = FrameEncoder::new(0, MAX).expect("limit is valid");
    for m in whole.0 {
        let again = enc
            .encode_to_vec(&m)
            .expect("an accepted message must re-encode");
        assert_eq!(run(&again, again.len()), (vec![m], false));
    }
});
