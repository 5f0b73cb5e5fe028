//! The seam between the cluster core and a volume: [`VolumeControl`].
//!
//! The cluster core only asks a volume for its role and disk state and tells it to promote,
//! demote, start or stop its export. Implementations:
//! - [`super::mirrored::MirroredControl`]: a volume with a `[volume.replication]` table
//!   (promote = the replication role change with a new generation id; disk state = the
//!   replication disk state).
//! - [`LocalVolume`]: a local unmirrored device (`engine`) whose NBD export (`nbd::server`)
//!   runs only while Primary. Its disk is always UpToDate.
//! - [`FakeVolume`]: a test double that records calls and can be told to fail.

use std::path::PathBuf;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::watch;

use super::heartbeat::{DiskState, Role};
use crate::config::VolumeConfig;
use crate::engine::{Engine, OpenOptions};
use crate::nbd::export::{choose_engine, Endpoint, Listener};
use crate::nbd::server::{ServerConfig, Shared};

/// A volume step that failed; the message names the volume and the cause.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("volume {volume}: {what}")]
pub struct VolumeError {
    /// The volume's name.
    pub volume: String,
    /// What failed and why.
    pub what: String,
}

/// What status shows of one volume.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct VolumeStatus {
    /// Name.
    pub name: String,
    /// Role.
    pub role: Role,
    /// Disk state.
    pub disk: DiskState,
    /// NBD URI while exported.
    pub export: Option<String>,
    /// Kind of volume (e.g. "local (unmirrored)").
    pub kind: String,
    /// Replication state of a mirrored volume (None for a local volume): connection, RPO,
    /// resync progress, counters.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replication: Option<crate::volume::VolumeStatus>,
}

/// The cluster core's handle on one volume.
///
/// Invariants every implementation keeps: `start_export` only succeeds while Primary;
/// `demote` refuses while exported (stop the export first); `stop_export` and `demote` are
/// idempotent; `promote(false)` refuses a disk that is not UpToDate.
pub trait VolumeControl: Send {
    /// The volume's name.
    fn name(&self) -> &str;
    /// Current role.
    fn role(&self) -> Role;
    /// Current disk state.
    fn disk_state(&self) -> DiskState;
    /// Makes the volume writable here; `force` accepts a disk that is not UpToDate.
    fn promote(&mut self, force: bool) -> Result<(), VolumeError>;
    /// Makes the volume read-only here (Secondary).
    fn demote(&mut self) -> Result<(), VolumeError>;
    /// Starts serving NBD; returns the URI.
    fn start_export(&mut self) -> Result<String, VolumeError>;
    /// Stops serving NBD (in-flight requests drain, then a flush).
    fn stop_export(&mut self) -> Result<(), VolumeError>;
    /// Status for `twinvol status`.
    fn status(&self) -> VolumeStatus;
    /// Attaches the export to its kernel device and mounts the filesystem, as configured
    /// (`[volume.attach]`, `[volume.mount]`); `Ok(None)` when neither is. Called after
    /// `start_export`.
    fn mount(&mut self) -> Result<Option<String>, VolumeError> {
        Ok(None)
    }
    /// Unmounts and detaches (idempotent); `Ok(None)` when nothing is configured. Called
    /// before `stop_export`.
    fn unmount(&mut self) -> Result<Option<String>, VolumeError> {
        Ok(None)
    }
    /// The peer Primary reported writes this copy lacks: mark it Outdated (mirrored
    /// volumes; a no-op for others). Returns whether it changed.
    fn mark_outdated(&mut self) -> Result<bool, VolumeError> {
        Ok(false)
    }
    /// The peer's copy cannot be promoted without force any more (its heartbeat reports it
    /// not UpToDate, or this node fenced the peer before promoting) while this node is
    /// Primary: writes this copy completes alone can no longer be lost by a promotion of the
    /// peer (mirrored volumes release writes held by `replication.outdate_wait_ms` and record
    /// the fact for the start-up gate; a no-op for others).
    fn peer_outdated(&mut self) {}
    /// Why this volume's metadata says its copy is the newest of the pair (the start-up gate's
    /// proof), if it does; `None` for a volume without a peer copy.
    fn newest_proof(&self) -> Option<crate::volume::NewestProof> {
        None
    }
    /// Whether a replication link to the peer is connected now (proof the peer is alive).
    fn link_connected(&self) -> bool {
        false
    }
    /// This Primary's disk failed and was detached, and the volume's `on_disk_error` is
    /// `"failover"`: the node should hand the service over to its peer.
    fn wants_failover(&self) -> bool {
        false
    }
    /// This Primary stops cleanly and no peer can take the service over: record it, so the
    /// node may promote after its next start without hearing its peer. Returns whether it was
    /// recorded.
    fn record_clean_primary_stop(&mut self) -> Result<bool, VolumeError> {
        Ok(false)
    }
    /// Starts an online verify against the peer (mirrored volumes only); the result shows in
    /// the status. Returns what was started.
    fn start_verify(&mut self) -> Result<String, VolumeError> {
        Err(VolumeError {
            volume: self.name().to_string(),
            what: "not a mirrored volume: nothing to verify against".into(),
        })
    }
    /// Reconnects and resyncs; with `discard_local`, throws this Secondary's copy away and
    /// resyncs it fully from the peer (mirrored volumes only).
    fn resync(&mut self, discard_local: bool) -> Result<String, VolumeError> {
        let _ = discard_local;
        Err(VolumeError {
            volume: self.name().to_string(),
            what: "not a mirrored volume: nothing to resync from".into(),
        })
    }
}

struct RunningExport {
    stop: watch::Sender<bool>,
    thread: JoinHandle<Result<(), String>>,
    uri: String,
}

/// A local, unmirrored volume whose NBD export runs while Primary.
pub struct LocalVolume {
    cfg: VolumeConfig,
    role: Role,
    export: Option<RunningExport>,
    grace: Duration,
    placement: super::mount::Placement,
}

impl LocalVolume {
    /// A Secondary, unexported volume of `cfg` (the device is opened on export).
    pub fn new(cfg: VolumeConfig) -> Self {
        Self {
            placement: super::mount::Placement::new(cfg.clone()),
            cfg,
            role: Role::Secondary,
            export: None,
            grace: Duration::from_secs(2),
        }
    }

    fn err(&self, what: impl Into<String>) -> VolumeError {
        VolumeError {
            volume: self.cfg.name.clone(),
            what: what.into(),
        }
    }
}

/// Where a volume's NBD export listens: its socket, else its TCP address (config validation
/// refuses a volume with neither; the fallback is the conventional socket path).
pub(crate) fn endpoint(cfg: &VolumeConfig) -> Endpoint {
    match (&cfg.export.socket, cfg.export.listen) {
        (Some(p), _) => Endpoint::Unix(p.clone()),
        (None, Some(a)) => Endpoint::Tcp(a),
        // Config validation refuses a volume with neither.
        (None, None) => Endpoint::Unix(PathBuf::from(format!("/run/twinvol/{}.sock", cfg.name))),
    }
}

async fn serve_until(
    cfg: VolumeConfig,
    kind: crate::engine::EngineKind,
    grace: Duration,
    mut stop: watch::Receiver<bool>,
    ready: std::sync::mpsc::Sender<Result<String, String>>,
) -> Result<(), String> {
    // Owned for as long as it is served.
    let _claim = match crate::engine::claim::DeviceClaim::take(&cfg.device) {
        Ok(c) => c,
        Err(e) => {
            let _ = ready.send(Err(e.to_string()));
            return Err(e.to_string());
        }
    };
    let mut open = OpenOptions::new(&cfg.device);
    open.read_only = cfg.export.read_only;
    open.cache = cfg.cache;
    let engine = match Engine::open(kind, &open) {
        Ok(e) => Rc::new(e),
        Err(e) => {
            let _ = ready.send(Err(e.to_string()));
            return Err(e.to_string());
        }
    };
    let listener = match Listener::bind(&endpoint(&cfg)).await {
        Ok(l) => l,
        Err(e) => {
            let _ = ready.send(Err(e.to_string()));
            return Err(e.to_string());
        }
    };
    let server_cfg = ServerConfig {
        shutdown_grace: grace,
        ..ServerConfig::default()
    };
    let shared = Shared::new(
        engine.clone(),
        cfg.export.name.clone(),
        &server_cfg,
        stop.clone(),
    );
    let _ = ready.send(Ok(listener.uri(&cfg.export.name)));
    crate::nbd::export::serve_on(
        listener,
        shared,
        grace,
        async move {
            let _ = stop.changed().await;
        },
        || {},
    )
    .await;
    crate::block::BlockTarget::flush(&*engine)
        .await
        .map_err(|e| format!("final flush failed: {e}"))
}

impl VolumeControl for LocalVolume {
    fn name(&self) -> &str {
        &self.cfg.name
    }
    fn role(&self) -> Role {
        self.role
    }
    fn disk_state(&self) -> DiskState {
        DiskState::UpToDate
    }
    fn promote(&mut self, _force: bool) -> Result<(), VolumeError> {
        self.role = Role::Primary;
        Ok(())
    }
    fn demote(&mut self) -> Result<(), VolumeError> {
        if self.export.is_some() {
            return Err(self.err("refusing to demote while exported; stop the export first"));
        }
        self.role = Role::Secondary;
        Ok(())
    }
    fn start_export(&mut self) -> Result<String, VolumeError> {
        if self.role != Role::Primary {
            return Err(self.err("refusing to export a Secondary volume"));
        }
        if let Some(e) = &self.export {
            return Ok(e.uri.clone());
        }
        let kind = choose_engine(self.cfg.engine.forced()).map_err(|e| self.err(e.to_string()))?;
        let (stop, stop_rx) = watch::channel(false);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let cfg = self.cfg.clone();
        let grace = self.grace;
        let thread = std::thread::Builder::new()
            .name(format!("export-{}", self.cfg.name))
            .spawn(move || {
                crate::engine::block_on(kind, serve_until(cfg, kind, grace, stop_rx, ready_tx))
                    .map_err(|e| e.to_string())?
            })
            .map_err(|e| self.err(format!("cannot start the export thread: {e}")))?;
        match ready_rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Ok(uri)) => {
                self.export = Some(RunningExport {
                    stop,
                    thread,
                    uri: uri.clone(),
                });
                Ok(uri)
            }
            Ok(Err(why)) => {
                let _ = thread.join();
                Err(self.err(format!("export failed: {why}")))
            }
            Err(_) => {
                let _ = stop.send(true);
                Err(self.err("export did not become ready within 30 s"))
            }
        }
    }
    fn stop_export(&mut self) -> Result<(), VolumeError> {
        let Some(e) = self.export.take() else {
            return Ok(());
        };
        let _ = e.stop.send(true);
        match e.thread.join() {
            Ok(Ok(())) => Ok(()),
            Ok(Err(why)) => Err(self.err(format!("export stopped with an error: {why}"))),
            Err(_) => Err(self.err("export thread panicked")),
        }
    }
    fn status(&self) -> VolumeStatus {
        VolumeStatus {
            name: self.cfg.name.clone(),
            role: self.role,
            disk: DiskState::UpToDate,
            export: self.export.as_ref().map(|e| e.uri.clone()),
            kind: "local (unmirrored)".into(),
            replication: None,
        }
    }
    fn mount(&mut self) -> Result<Option<String>, VolumeError> {
        self.placement.up().map_err(|w| self.err(w))
    }
    fn unmount(&mut self) -> Result<Option<String>, VolumeError> {
        self.placement.down().map_err(|w| self.err(w))
    }
}

/// Calls a [`FakeVolume`] received, for assertions.
#[derive(Debug, Default)]
pub struct FakeLog {
    /// Calls in order ("promote", "demote", "start_export", "stop_export").
    pub calls: Vec<String>,
}

/// A test double: keeps role and export state, records calls, fails on request.
pub struct FakeVolume {
    name: String,
    role: Role,
    disk: DiskState,
    exported: bool,
    /// Calls made.
    pub log: Arc<Mutex<FakeLog>>,
    /// Make `start_export` fail with this message.
    pub fail_export: Option<String>,
    /// What `mount` answers: `None` = nothing configured, `Some(Ok)` / `Some(Err)` otherwise.
    pub mount_answer: Option<Result<String, String>>,
}

impl FakeVolume {
    /// A Secondary, UpToDate, unexported fake.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.into(),
            role: Role::Secondary,
            disk: DiskState::UpToDate,
            exported: false,
            log: Arc::default(),
            fail_export: None,
            mount_answer: None,
        }
    }
    /// Sets the disk state.
    pub fn with_disk(mut self, d: DiskState) -> Self {
        self.disk = d;
        self
    }
    fn record(&self, c: &str) {
        if let Ok(mut l) = self.log.lock() {
            l.calls.push(c.into());
        }
    }
}

impl VolumeControl for FakeVolume {
    fn name(&self) -> &str {
        &self.name
    }
    fn role(&self) -> Role {
        self.role
    }
    fn disk_state(&self) -> DiskState {
        self.disk
    }
    fn promote(&mut self, force: bool) -> Result<(), VolumeError> {
        self.record("promote");
        if self.disk != DiskState::UpToDate && !force {
            return Err(VolumeError {
                volume: self.name.clone(),
                what: format!("disk is {:?}; promote with --force", self.disk),
            });
        }
        self.role = Role::Primary;
        Ok(())
    }
    fn demote(&mut self) -> Result<(), VolumeError> {
        self.record("demote");
        if self.exported {
            return Err(VolumeError {
                volume: self.name.clone(),
                what: "exported".into(),
            });
        }
        self.role = Role::Secondary;
        Ok(())
    }
    fn start_export(&mut self) -> Result<String, VolumeError> {
        self.record("start_export");
        if let Some(why) = &self.fail_export {
            return Err(VolumeError {
                volume: self.name.clone(),
                what: why.clone(),
            });
        }
        if self.role != Role::Primary {
            return Err(VolumeError {
                volume: self.name.clone(),
                what: "not Primary".into(),
            });
        }
        self.exported = true;
        Ok(format!("fake://{}", self.name))
    }
    fn stop_export(&mut self) -> Result<(), VolumeError> {
        self.record("stop_export");
        self.exported = false;
        Ok(())
    }
    fn status(&self) -> VolumeStatus {
        VolumeStatus {
            name: self.name.clone(),
            role: self.role,
            disk: self.disk,
            export: self.exported.then(|| format!("fake://{}", self.name)),
            kind: "fake".into(),
            replication: None,
        }
    }
    fn mount(&mut self) -> Result<Option<String>, VolumeError> {
        let Some(a) = self.mount_answer.clone() else {
            return Ok(None);
        };
        self.record("mount");
        a.map(Some).map_err(|what| VolumeError {
            volume: self.name.clone(),
            what,
        })
    }
    fn unmount(&mut self) -> Result<Option<String>, VolumeError> {
        if self.mount_answer.is_none() {
            return Ok(None);
        }
        self.record("unmount");
        Ok(Some("unmounted".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(dir: &std::path::Path) -> VolumeConfig {
        let dev = dir.join("vol.img");
        std::fs::write(&dev, vec![0u8; 1 << 20]).unwrap();
        let text = format!(
            "[node]\nid = \"a\"\n[[volume]]\nname = \"data\"\ndevice = \"{}\"\nengine = \"sync\"\ncache = \"writeback\"\n[volume.export]\nsocket = \"{}\"\n",
            dev.display(),
            dir.join("data.sock").display()
        );
        crate::config::Config::parse(std::path::Path::new("t.toml"), &text)
            .unwrap()
            .volumes
            .remove(0)
    }

    #[test]
    fn local_volume_exports_only_while_primary_and_stops_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let mut v = LocalVolume::new(cfg(dir.path()));
        assert!(v.start_export().is_err(), "a Secondary must not export");
        v.promote(false).unwrap();
        let uri = v.start_export().unwrap();
        assert!(uri.contains("data.sock"), "{uri}");
        assert!(std::os::unix::net::UnixStream::connect(dir.path().join("data.sock")).is_ok());
        assert!(v.demote().is_err(), "demote while exported is refused");
        v.stop_export().unwrap();
        assert!(!dir.path().join("data.sock").exists());
        v.demote().unwrap();
        assert_eq!(v.status().role, Role::Secondary);
        assert_eq!(v.status().export, None);
    }
}
