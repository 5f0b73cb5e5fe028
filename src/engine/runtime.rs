//! The data-path runtime: a tokio-uring ring, or a current-thread tokio runtime for the sync
//! backend. Both offer `tokio::task::spawn_local`, tokio sockets and timers, so code above the
//! engine is identical under either.

use std::future::Future;

use super::{EngineError, EngineKind};

/// Submission-queue depth of the ring: enough for 4 clients x QD32 plus flushes.
const RING_ENTRIES: u32 = 512;
/// Upper bound of blocking threads for the sync backend (and for ioctls of either backend).
const MAX_BLOCKING_THREADS: usize = 16;

/// Checks that this process may create an io_uring (kernel.io_uring_disabled, seccomp).
pub fn probe_uring() -> Result<(), String> {
    io_uring_probe::probe()
}

mod io_uring_probe {
    /// Creates and immediately drops a tiny ring.
    pub fn probe() -> Result<(), String> {
        let mut b = tokio_uring::builder();
        b.entries(4);
        match tokio_uring::Runtime::new(&b) {
            Ok(rt) => {
                drop(rt);
                Ok(())
            }
            Err(e) => Err(e.to_string()),
        }
    }
}

/// Runs `fut` to completion on the calling thread under the runtime `kind` needs.
/// Inside, `tokio::task::spawn_local` may be used for `!Send` tasks.
pub fn block_on<F: Future>(kind: EngineKind, fut: F) -> Result<F::Output, EngineError> {
    match kind {
        EngineKind::Uring => {
            let mut b = tokio_uring::builder();
            b.entries(RING_ENTRIES);
            let rt = tokio_uring::Runtime::new(&b)
                .map_err(|source| EngineError::Runtime { kind, source })?;
            Ok(rt.block_on(fut))
        }
        EngineKind::Sync => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .max_blocking_threads(MAX_BLOCKING_THREADS)
                .build()
                .map_err(|source| EngineError::Runtime { kind, source })?;
            let local = tokio::task::LocalSet::new();
            Ok(local.block_on(&rt, fut))
        }
    }
}
