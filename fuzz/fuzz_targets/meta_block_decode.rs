//! Superblock, bitmap-page and activity-log decoders must reject any 4 KiB block without
//! panicking; what they accept must survive an encode/decode round trip unchanged (reserved
//! bytes are covered by the CRC but not re-encoded, so the comparison is on values).
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
            assert_eq!(decode_superblock(&encode_superblock(&sb), slot).ok(), Some(sb));
        }
    }
    let uuid = [0u8; 16];
    if let Ok(words) = decode_bitmap_page(&b, &uuid, 0) {
        assert_eq!(decode_bitmap_page(&encode_bitmap_page(&uuid, 0, &words), &uuid, 0).ok(), Some(words));
    }
    if let Ok(rec) = decode_al_block(&b, &uuid, 1024, 0, 4) {
        assert_eq!(decode_al_block(&encode_al_block(&uuid, 1024, &rec), &uuid, 1024, 0, 4).ok(), Some(rec));
    }
});
