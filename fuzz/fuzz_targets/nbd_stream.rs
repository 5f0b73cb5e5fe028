//! Fuzzes the whole NBD server (handshake + transmission) with a raw client byte stream, the
//! same input `twinvol export --stdio` reads. Seeds: fuzz/seeds/nbd-client-streams/.
//! Property: the server never panics or hangs, whatever the bytes.
#![no_main]

use std::rc::Rc;

use libfuzzer_sys::fuzz_target;
use twinvol::block::mem::MemTarget;
use twinvol::nbd::server::{serve_connection, ServerConfig, Shared};

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().expect("runtime");
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async {
        let (_tx, rx) = tokio::sync::watch::channel(false);
        let shared = Shared::new(Rc::new(MemTarget::new(1 << 20)), String::new(), &ServerConfig::default(), rx);
        let _ = serve_connection(shared, data, tokio::io::sink()).await;
    });
});
