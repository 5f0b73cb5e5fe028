//! `twinvol mirror`: one node of a mirrored volume as a process.
//!
//! Opens the device and its metadata, takes the requested role, keeps the replication
//! connection up, exports the volume over NBD while Primary (per `[volume.export]`), and writes
//! a JSON status snapshot to `--status-file` every 100 ms. Signals: SIGTERM/SIGINT stop cleanly
//! (bitmap persisted, activity log emptied), SIGUSR1 promotes (without force), SIGUSR2 demotes.
//! With `--control-socket PATH`, requests such as `verify` are served there ([`super::control`]).

use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;

use tokio::sync::watch;

use super::{MirroredVolume, Role, Settings};
use crate::block::BlockTarget;
use crate::config::{Config, MetadataPlacement, VolumeConfig};
use crate::engine::{self, Engine, OpenOptions};
use crate::meta::device::{FileDevice, MetaDevice};
use crate::meta::store::MetaStore;
use crate::nbd::export::{choose_engine, serve_on, Endpoint, Listener};
use crate::nbd::server::{ServerConfig, Shared};
use crate::ops::status_file::StatusFile;
use crate::repl::link::{load_key_file, LinkConfig};

/// Arguments of `twinvol mirror`.
#[derive(Debug, Clone, clap::Args)]
pub struct MirrorArgs {
    /// Configuration file.
    #[arg(long, default_value = "/etc/twinvol/twinvol.toml")]
    pub config: PathBuf,
    /// The volume to run (default: the only one configured).
    #[arg(long)]
    pub volume: Option<String>,
    /// Start as Primary (export the volume).
    #[arg(long, conflicts_with = "secondary")]
    pub primary: bool,
    /// Start as Secondary (the default).
    #[arg(long)]
    pub secondary: bool,
    /// With --primary: promote even a copy that is not known to be up to date.
    #[arg(long, requires = "primary")]
    pub force: bool,
    /// Write the status snapshot (JSON) here, replaced atomically every 100 ms.
    #[arg(long)]
    pub status_file: Option<PathBuf>,
    /// Serve OpenMetrics on http://ADDR/metrics (e.g. 127.0.0.1:9465), refreshed every 100 ms.
    #[arg(long)]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Serve control requests (`twinvol verify --control-socket PATH`) on this Unix socket.
    #[arg(long)]
    pub control_socket: Option<PathBuf>,
}

/// Errors of `twinvol mirror`.
#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    /// Configuration.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The volume is not in the configuration.
    #[error("{config}: no volume named {name:?} with a [volume.replication] table; {fix}")]
    NoVolume {
        /// Config path.
        config: PathBuf,
        /// Name asked for.
        name: String,
        /// What to do.
        fix: String,
    },
    /// Opening metadata.
    #[error("volume {volume}: metadata on {path}: {why} (create it with `twinvol create-md --device ...` on both nodes)")]
    Meta {
        /// Volume.
        volume: String,
        /// Metadata path.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// The device (or its metadata device) is owned by another process.
    #[error("volume {volume}: {source}")]
    InUse {
        /// Volume.
        volume: String,
        /// Who holds it.
        #[source]
        source: crate::engine::claim::ClaimError,
    },
    /// The engine.
    #[error(transparent)]
    Engine(#[from] crate::engine::EngineError),
    /// Key or link setup.
    #[error("volume {volume}: replication: {why}")]
    Link {
        /// Volume.
        volume: String,
        /// Why.
        why: String,
    },
    /// The export listener.
    #[error(transparent)]
    Export(#[from] crate::nbd::export::ExportError),
    /// A role change failed.
    #[error(transparent)]
    Role(#[from] super::VolumeError),
    /// Signals.
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    /// The status file's writer thread.
    #[error("cannot start the thread that writes --status-file: {0}")]
    StatusFile(std::io::Error),
    /// The metrics endpoint.
    #[error(transparent)]
    Metrics(#[from] crate::ops::metrics::MetricsError),
    /// The control socket.
    #[error(transparent)]
    Control(#[from] super::control::ControlError),
}

fn pick_volume<'a>(
    cfg: &'a Config,
    path: &Path,
    name: Option<&str>,
) -> Result<&'a VolumeConfig, MirrorError> {
    let candidates: Vec<_> = cfg
        .volumes
        .iter()
        .filter(|v| v.replication.is_some())
        .collect();
    let found = match name {
        Some(n) => candidates.iter().find(|v| v.name == n).copied(),
        None if candidates.len() == 1 => Some(candidates[0]),
        None => None,
    };
    found.ok_or_else(|| MirrorError::NoVolume {
        config: path.into(),
        name: name.unwrap_or("").into(),
        fix: format!(
            "pass --volume with one of: {}",
            candidates
                .iter()
                .map(|v| v.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    })
}

/// Runs `twinvol mirror` until SIGTERM/SIGINT.
pub fn run(args: MirrorArgs) -> Result<(), MirrorError> {
    let cfg = Config::load(&args.config)?;
    let v = pick_volume(&cfg, &args.config, args.volume.as_deref())?.clone();
    let kind = choose_engine(v.engine.forced())?;
    engine::block_on(kind, serve(kind, cfg.node.id.clone(), v, args))?
}

/// The local leg of a mirrored volume: the device claimed and opened with the engine (its
/// metadata area, if internal, kept out of the data it serves) and its metadata store, plus the
/// data device's own claim when the metadata lives on another device. Call on the data-path
/// runtime.
pub fn open_local(
    kind: engine::EngineKind,
    volume: &str,
    device: &Path,
    metadata: &MetadataPlacement,
    cache: engine::CacheMode,
) -> Result<
    (
        Engine,
        MetaStore<FileDevice>,
        Option<crate::engine::claim::DeviceClaim>,
    ),
    MirrorError,
> {
    let meta_path = match metadata {
        MetadataPlacement::Internal => device.to_path_buf(),
        MetadataPlacement::External { device } => device.clone(),
    };
    let meta_err = |why: String| MirrorError::Meta {
        volume: volume.to_string(),
        path: meta_path.clone(),
        why,
    };
    let in_use = |source| MirrorError::InUse {
        volume: volume.to_string(),
        source,
    };
    let dev = FileDevice::open(&meta_path, true).map_err(|e| match e {
        busy @ crate::engine::claim::ClaimError::InUse { .. } => in_use(busy),
        other => meta_err(other.to_string()),
    })?;
    // The metadata device is claimed by `dev`; an external metadata area leaves the data device
    // to claim on its own.
    let data_claim = match metadata {
        MetadataPlacement::Internal => None,
        MetadataPlacement::External { .. } => {
            Some(crate::engine::claim::DeviceClaim::take(device).map_err(in_use)?)
        }
    };
    let (store, findings) = MetaStore::open(dev).map_err(|e| meta_err(e.to_string()))?;
    for f in findings {
        tracing::warn!(volume, finding = ?f, "metadata repaired at open");
    }
    let data_size = store.superblock().data_size;
    let mut open = OpenOptions::new(device);
    open.cache = cache;
    if matches!(metadata, MetadataPlacement::Internal) {
        open.reserved_tail = store.device().len().saturating_sub(data_size);
    }
    let local = Engine::open(kind, &open)?;
    if local.info().size != data_size {
        return Err(meta_err(format!(
            "the metadata describes {data_size} data bytes but the device exports {}",
            local.info().size
        )));
    }
    Ok((local, store, data_claim))
}

/// A mirrored volume opened from its configuration, Secondary and disconnected, plus the link
/// settings to run [`super::session::keep_connected`] with. Call on the data-path runtime
/// ([`engine::block_on`]): the io_uring engine binds to it.
pub fn open_volume(
    kind: engine::EngineKind,
    node: &str,
    v: &VolumeConfig,
) -> Result<(MirroredVolume<Engine, FileDevice>, LinkConfig), MirrorError> {
    let Some(r) = v.replication.clone() else {
        return Err(MirrorError::NoVolume {
            config: PathBuf::new(),
            name: v.name.clone(),
            fix: "add a [volume.replication] table".into(),
        });
    };
    let (local, store, data_claim) = open_local(kind, &v.name, &v.device, &r.metadata, v.cache)?;
    let key = load_key_file(&r.key_file).map_err(|e| MirrorError::Link {
        volume: v.name.clone(),
        why: e.to_string(),
    })?;
    let settings = Settings {
        volume: v.name.clone(),
        node: node.to_string(),
        peer: r.peer_id.clone(),
        mode: r.mode,
        max_inflight_bytes: r.max_inflight_bytes,
        resync_rate_max: r.resync_rate_max,
        resync_rate_min: r.resync_rate_min,
        split_brain_policy: r.split_brain_policy.clone(),
        ping_timeout: Duration::from_secs(r.ping_timeout_secs),
        checksum_resync: r.checksum_resync,
        outdate_wait: Duration::from_millis(r.outdate_wait_ms),
        on_disk_error: r.on_disk_error,
    };
    let vol = MirroredVolume::new(local, store, settings).holding(data_claim);
    let mut link_cfg = LinkConfig::new(r.address, r.peer, key, vol.hello());
    link_cfg.interface = r.interface.clone();
    link_cfg.compression_level = r.compression_level;
    Ok((vol, link_cfg))
}

async fn serve(
    kind: engine::EngineKind,
    node: String,
    v: VolumeConfig,
    args: MirrorArgs,
) -> Result<(), MirrorError> {
    let (vol, link_cfg) = open_volume(kind, &node, &v)?;
    let vol = Rc::new(vol);
    if args.primary {
        vol.promote(args.force)?;
    }
    let replication = {
        let vol = vol.clone();
        let name = v.name.clone();
        tokio::task::spawn_local(async move {
            if let Err(e) = super::session::keep_connected(vol, link_cfg).await {
                tracing::error!(volume = %name, error = %e, "replication stopped");
                crate::stderr_line!("twinvol: error: volume {name}: replication: {e}");
                std::process::exit(1);
            }
        })
    };
    let metrics = match args.metrics_listen {
        Some(addr) => {
            let published = crate::ops::metrics::Published::default();
            let server = crate::ops::metrics::MetricsServer::bind(addr, published.source()).await?;
            tracing::info!(%addr, "OpenMetrics endpoint listening on /metrics");
            tokio::task::spawn_local(server.run());
            Some(published)
        }
        None => None,
    };
    // The file is written on a thread of its own: a rename can wait for the disk, and this
    // thread completes the application's writes (crate::ops::status_file).
    let status_file = match &args.status_file {
        Some(p) => Some(Rc::new(
            StatusFile::spawn(p.clone()).map_err(MirrorError::StatusFile)?,
        )),
        None => None,
    };
    let status_task = (status_file.is_some() || metrics.is_some()).then(|| {
        let vol = vol.clone();
        let file = status_file.clone();
        tokio::task::spawn_local(async move {
            let mut persist_tick = 0u32;
            loop {
                let status = vol.status();
                if let Some(m) = &metrics {
                    m.publish_volume(&status);
                }
                if let Some(f) = &file {
                    f.publish(status);
                }
                persist_tick += 1;
                if persist_tick % 10 == 0 {
                    let _ = vol.persist_bitmap();
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    });
    let control_task = match &args.control_socket {
        Some(p) => {
            let l = super::control::bind(p)?;
            Some(tokio::task::spawn_local(super::control::serve(
                vol.clone(),
                l,
            )))
        }
        None => None,
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    spawn_signals(vol.clone(), stop_tx)?;
    let endpoint = crate::cluster::volume::endpoint(&v);
    export_while_primary(vol.clone(), endpoint, v.export.name.clone(), stop_rx).await?;
    // Shutdown: no write is in flight once the export loop returned.
    if let Some(f) = &status_file {
        f.publish(vol.status());
    }
    let _ = vol.local().flush().await;
    // A planned stop: a Secondary connected to its Primary marks its copy Outdated and tells
    // the Primary; a Primary with no peer connected records that it stopped as the newest copy.
    if !vol.leave_outdated().await && vol.status().connection != super::Connection::Connected {
        if let Err(e) = vol.record_clean_primary_stop() {
            tracing::error!(error = %e, "cannot record the clean stop of the Primary");
        }
    }
    // Stop the helpers, then close the metadata cleanly (activity log emptied, crashed-primary
    // flag cleared) once nothing else holds the volume.
    replication.abort();
    let _ = replication.await;
    if let Some(t) = status_task {
        t.abort();
        let _ = t.await;
    }
    // The last snapshot (published above) is in the file before the process ends.
    if let Some(f) = status_file.and_then(|f| Rc::try_unwrap(f).ok()) {
        f.finish();
    }
    if let Some(t) = control_task {
        t.abort();
        let _ = t.await;
        if let Some(p) = &args.control_socket {
            let _ = std::fs::remove_file(p);
        }
    }
    for _ in 0..100 {
        if Rc::strong_count(&vol) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    match Rc::try_unwrap(vol) {
        Ok(vol) => {
            if let Err(e) = vol.close() {
                tracing::error!(error = %e, "clean close of the metadata failed; the next start replays the activity log");
            }
        }
        Err(vol) => {
            tracing::warn!("volume still in use at shutdown; bitmap persisted, the activity log is replayed at the next start");
            let _ = vol.persist_bitmap();
        }
    }
    tracing::info!("mirror stopped");
    Ok(())
}

fn spawn_signals<T, D>(
    vol: Rc<MirroredVolume<T, D>>,
    stop: watch::Sender<bool>,
) -> Result<(), MirrorError>
where
    T: BlockTarget + 'static,
    D: MetaDevice + 'static,
{
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(MirrorError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(MirrorError::Signals)?;
    let mut usr1 = signal(SignalKind::user_defined1()).map_err(MirrorError::Signals)?;
    let mut usr2 = signal(SignalKind::user_defined2()).map_err(MirrorError::Signals)?;
    tokio::task::spawn_local(async move {
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = usr1.recv() => {
                    if let Err(e) = vol.promote(false) {
                        tracing::error!(error = %e, "promotion refused");
                    }
                }
                _ = usr2.recv() => {
                    if let Err(e) = vol.demote() {
                        tracing::error!(error = %e, "demotion failed");
                    }
                }
            }
        }
        let _ = stop.send(true);
    });
    Ok(())
}

/// Serves NBD on `endpoint` whenever the volume is Primary; returns when `stop` turns true.
pub async fn export_while_primary<T, D>(
    vol: Rc<MirroredVolume<T, D>>,
    endpoint: Endpoint,
    name: String,
    mut stop: watch::Receiver<bool>,
) -> Result<(), MirrorError>
where
    T: BlockTarget + 'static,
    D: MetaDevice + 'static,
{
    let cfg = ServerConfig::default();
    loop {
        if *stop.borrow() {
            return Ok(());
        }
        if vol.role() != Role::Primary {
            tokio::select! {
                _ = stop.changed() => {}
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
            continue;
        }
        let listener = Listener::bind(&endpoint).await?;
        crate::stderr_line!(
            "twinvol: volume {} Primary, serving {}",
            vol.settings().volume,
            listener.uri(&name)
        );
        let (conn_stop_tx, conn_stop_rx) = watch::channel(false);
        let shared = Shared::new(vol.clone(), name.clone(), &cfg, conn_stop_rx);
        // Until stopped, or until this node is no longer Primary.
        let mut until = stop.clone();
        let primary_ended = async {
            loop {
                tokio::select! {
                    _ = until.changed() => return,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {
                        if vol.role() != Role::Primary {
                            return;
                        }
                    }
                }
            }
        };
        serve_on(
            listener,
            shared,
            cfg.shutdown_grace,
            primary_ended,
            move || {
                let _ = conn_stop_tx.send(true);
            },
        )
        .await;
    }
}
