//! The run-length bitmap decoder must reject any byte string without panicking, and what it
//! accepts must re-encode to the same bytes (the encoding is canonical).
#![no_main]

use libfuzzer_sys::fuzz_target;
use twinvol::meta::bitmap::{BitmapGeometry, DirtyBitmap, Granularity};

fuzz_target!(|data: &[u8]| {
    let Ok(g) = Granularity::new(4096) else { return };
    let Ok(geometry) = BitmapGeometry::new(64 << 20, g) else { return };
    if let Ok(bm) = DirtyBitmap::decode_rle(data, geometry) {
        assert_eq!(bm.encode_rle(), data);
    }
});
