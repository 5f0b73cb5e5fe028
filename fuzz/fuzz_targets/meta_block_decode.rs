//! Superblock, bitmap-page and activity-log decoders must reject any 4 KiB block without
//! panicking; what they accept must re-encode to the same block.
#![no_main]

use libfuzzer_sys::fuzz_target;
use twinvol::meta::format::{
    decode_al_block, decode_bitmap_page, decode_superblock, encode_al_block, encode_bitmap_page, encode_superblock,
    BLOCK,
};

fuzz_target!(|data: &[u8]| {
    let mut b = [0u8; BLOCK];
    let n = data.len().min(BLOCK);
    b[..n].copy_from_slice(&data[..n]);
    for slot in 0..2 {
        if let Ok(sb) = decode_superblock(&b, slot) {
            assert_eq!(encode_superblock(&sb), b);
        }
    }
    let uuid = [0u8; 16];
    if let Ok(words) = decode_bitmap_page(&b, &uuid, 0) {
        assert_eq!(encode_bitmap_page(&uuid, 0, &words), b);
    }
    if let Ok(rec) = decode_al_block(&b, &uuid, 1024, 0, 4) {
        assert_eq!(encode_al_block(&uuid, 1024, &rec), b);
    }
});
