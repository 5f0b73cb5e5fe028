//! `twinvol export --degraded-primary`: a mirrored volume's device served without its peer.
//!
//! The device is claimed and its metadata opened as `twinvol run` would; the copy is promoted
//! as a failover would promote it (refused unless it is up to date), which starts a new
//! generation; with no peer session, every write is recorded in the dirty bitmap before it is
//! issued. When the pair meets again the connection plan finds this copy ahead of the peer's by
//! its bitmap and resyncs the peer from it. Only the data area is served, never the metadata
//! behind it. The initramfs early attach uses it: it runs before the daemon can.
//!
//! Invariant: no write reaches the device without its chunks being dirty in the bitmap (the
//! mirrored volume's disconnected-Primary path), and the metadata is closed cleanly at exit.

use std::path::PathBuf;
use std::rc::Rc;
use std::time::Duration;

use super::run::{open_local, MirrorError};
use super::{MirroredVolume, Settings};
use crate::config::{MetadataPlacement, ReplicationMode, SplitBrainPolicy};
use crate::engine::{self, CacheMode, EngineKind};
use crate::nbd::export::{choose_engine, serve_on, Endpoint, ExportError, Listener};
use crate::nbd::server::{ServerConfig, Shared};

/// What `twinvol export --degraded-primary` needs.
#[derive(Debug, Clone)]
pub struct DegradedOptions {
    /// The mirrored volume's device (internal metadata at its tail).
    pub path: PathBuf,
    /// Where to listen (a Unix socket or TCP; not stdio).
    pub endpoint: Endpoint,
    /// Export name.
    pub name: String,
    /// Forced engine, or probe.
    pub engine: Option<EngineKind>,
    /// Page-cache mode.
    pub cache: CacheMode,
    /// Server tuning.
    pub server: ServerConfig,
}

/// Errors of the degraded export.
#[derive(Debug, thiserror::Error)]
pub enum DegradedError {
    /// Opening the device, its metadata or the engine.
    #[error(transparent)]
    Open(#[from] MirrorError),
    /// The promotion was refused (the copy is not up to date) or its metadata write failed.
    #[error("{0} (a degraded Primary serves only an up-to-date copy; start the pair with `twinvol run` to resync it)")]
    Promote(#[from] super::VolumeError),
    /// The listener or the engine choice.
    #[error(transparent)]
    Export(#[from] ExportError),
    /// Stdio has no listener to serve a volume on.
    #[error("--degraded-primary serves on --socket or --listen, not --stdio")]
    Stdio,
    /// The clean close of the metadata failed.
    #[error("closing the metadata of {path}: {source} (the next start replays the activity log)")]
    Close {
        /// The device.
        path: PathBuf,
        /// Why.
        #[source]
        source: crate::meta::store::StoreError,
    },
}

/// Serves the volume until SIGTERM/SIGINT, then drains, persists the bitmap and closes the
/// metadata cleanly.
pub fn run(opts: DegradedOptions) -> Result<(), DegradedError> {
    if opts.endpoint == Endpoint::Stdio {
        return Err(DegradedError::Stdio);
    }
    let kind = choose_engine(opts.engine).map_err(ExportError::from)?;
    engine::block_on(kind, serve(kind, opts))
        .map_err(|e| DegradedError::Export(ExportError::from(e)))?
}

async fn serve(kind: EngineKind, opts: DegradedOptions) -> Result<(), DegradedError> {
    let label = opts.path.display().to_string();
    let (local, store, claim) = open_local(
        kind,
        &label,
        &opts.path,
        &MetadataPlacement::Internal,
        opts.cache,
    )?;
    let settings = Settings {
        volume: label.clone(),
        node: "degraded-primary".into(),
        peer: "none".into(),
        mode: ReplicationMode::Sync,
        max_inflight_bytes: 0,
        resync_rate_max: 0,
        resync_rate_min: 0,
        split_brain_policy: SplitBrainPolicy::Disconnect,
        ping_timeout: Duration::from_secs(1),
        checksum_resync: false,
        outdate_wait: Duration::ZERO,
        // No peer to detach to: a disk error goes to the application.
        on_disk_error: crate::config::DiskErrorPolicy::PassThrough,
    };
    let vol = Rc::new(MirroredVolume::new(local, store, settings).holding(claim));
    vol.promote(false)?;
    tracing::warn!(device = %label, generation = %vol.status().current_generation, "serving as a DEGRADED Primary without its peer: every write is recorded in the bitmap; the peer is resynced from this copy when the pair meets again");
    let listener = Listener::bind(&opts.endpoint).await?;
    crate::stderr_line!(
        "twinvol: serving {} as a degraded Primary on {}",
        label,
        listener.uri(&opts.name)
    );
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let shared = Shared::new(vol.clone(), opts.name.clone(), &opts.server, stop_rx);
    let stop = async {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => std::future::pending::<()>().await,
        }
    };
    serve_on(
        listener,
        shared,
        opts.server.shutdown_grace,
        stop,
        move || {
            let _ = stop_tx.send(true);
        },
    )
    .await;
    if let Err(e) = crate::block::BlockTarget::flush(&*vol).await {
        tracing::error!(error = %e, "final flush failed: some acknowledged writes may not be durable");
    }
    for _ in 0..100 {
        if Rc::strong_count(&vol) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    match Rc::try_unwrap(vol) {
        Ok(v) => v
            .close()
            .map(|_| ())
            .map_err(|source| DegradedError::Close {
                path: opts.path.clone(),
                source,
            }),
        Err(v) => {
            tracing::warn!("volume still in use at exit; bitmap persisted, the activity log is replayed at the next start");
            let _ = v.persist_bitmap();
            Ok(())
        }
    }
}
