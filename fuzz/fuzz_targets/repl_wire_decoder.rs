//! Fuzzes `repl::wire::FrameDecoder`: arbitrary bytes, fed in arbitrary pieces, must never panic
//! or allocate beyond the frame limit, and every message accepted must re-encode to a frame
//! that decodes to the same message (the codec is canonical).
#![no_main]

use libfuzzer_sys::fuzz_target;
use twinvol::repl::wire::{FrameDecoder, FrameEncoder};

const MAX: u32 = 1 << 20;

fuzz_target!(|data: &[u8]| {
    // First byte picks the piece size, so split headers and payloads are exercised.
    let (step, bytes) = match data.split_first() {
        Some((s, rest)) => (usize::from(*s).max(1), rest),
        None => return,
    };
    let Ok(mut d) = FrameDecoder::new(MAX) else {
        return;
    };
    let Ok(mut enc) = FrameEncoder::new(0, MAX) else {
        return;
    };
    for piece in bytes.chunks(step) {
        d.push(piece);
        loop {
            match d.pop() {
                Ok(Some(m)) => {
                    let again = enc
                        .encode_to_vec(&m)
                        .expect("an accepted message must re-encode");
                    let mut d2 = FrameDecoder::new(MAX).expect("limit is valid");
                    d2.push(&again);
                    assert_eq!(d2.pop().expect("re-encoded frame decodes"), Some(m));
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});
