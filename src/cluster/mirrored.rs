//! [`MirroredControl`]: the cluster core's handle on a mirrored volume.
//!
//! A [`MirroredVolume`] lives on one data-path thread (its state sits in `Rc`/`RefCell`, and the
//! io_uring engine binds to the thread's ring). This module starts that thread, opens the
//! device and its metadata there, keeps the replication connection up (`volume::session`), and
//! serves commands from the cluster core over a channel: promote (the replication role change;
//! a promotion starts a new generation id), demote, start and stop the NBD export. At shutdown
//! a Secondary connected to its Primary marks its copy Outdated and tells the Primary before
//! the connection ends (a planned stop never leaves the Primary waiting for it). A snapshot
//! of the volume's status is refreshed every 100 ms so `role`, `disk_state` and `status` answer
//! without a round trip; commands refresh it before they reply, so the caller reads its own
//! change. Dropping the handle stops the export, persists the bitmap and closes the metadata
//! cleanly (the next start does not replay the activity log).

use std::rc::Rc;
use std::sync::{mpsc as std_mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use super::heartbeat::{DiskState, Role};
use super::volume::{VolumeControl, VolumeError, VolumeStatus};
use crate::config::VolumeConfig;
use crate::engine::{self, Engine, EngineKind};
use crate::meta::device::FileDevice;
use crate::nbd::export::{choose_engine, Listener};
use crate::nbd::server::{ServerConfig, Shared};
use crate::volume::{self, MirroredVolume};

/// How long a command may take before the caller gives up (a promotion writes metadata; a
/// stop drains the export's in-flight requests first).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// How long opening the device, the metadata and the runtime may take.
const OPEN_TIMEOUT: Duration = Duration::from_secs(60);
/// Snapshot refresh period.
const SNAPSHOT_EVERY: Duration = Duration::from_millis(100);
/// Bitmap persistence period (pages changed since the last write only).
const PERSIST_EVERY: Duration = Duration::from_secs(1);
/// How long a promotion waits for the replication link to stop showing the peer Primary.
const PEER_DEMOTION_WAIT: Duration = Duration::from_secs(3);

type Vol = MirroredVolume<Engine, FileDevice>;
type Reply<T> = std_mpsc::Sender<Result<T, String>>;

enum Command {
    Promote(bool, Reply<()>),
    Demote(Reply<()>),
    StartExport(Reply<String>),
    StopExport(Reply<()>),
    StartVerify(Reply<String>),
    MarkOutdated(Reply<bool>),
    PeerOutdated,
    RecordCleanStop(Reply<bool>),
    Resync(bool, Reply<String>),
    Shutdown,
}

/// What the data-path thread publishes.
#[derive(Debug, Clone)]
struct Snapshot {
    status: volume::VolumeStatus,
    export: Option<String>,
}

/// A mirrored volume driven by the cluster core.
///
/// Invariants: the volume is only touched on its own thread; the snapshot reflects every
/// command that has replied; `start_export` succeeds only while Primary; `demote` refuses
/// while exported; `promote(false)` refuses a copy that is not up to date (the volume's own
/// rule, which also refuses while the connected peer is Primary).
pub struct MirroredControl {
    name: String,
    on_disk_error: crate::config::DiskErrorPolicy,
    placement: super::mount::Placement,
    commands: mpsc::UnboundedSender<Command>,
    snapshot: Arc<Mutex<Snapshot>>,
    thread: Option<JoinHandle<()>>,
}

/// Maps the volume's disk word onto the cluster's disk state.
///
/// Only "up-to-date" may be promoted without force; "inconsistent" is a resync target or a
/// never-synced copy; "outdated" and "consistent" (complete but possibly behind) are Outdated.
pub fn disk_state_of(word: &str) -> DiskState {
    match word {
        "up-to-date" => DiskState::UpToDate,
        "inconsistent" => DiskState::Inconsistent,
        _ => DiskState::Outdated,
    }
}

fn role_of(r: volume::Role) -> Role {
    match r {
        volume::Role::Primary => Role::Primary,
        volume::Role::Secondary => Role::Secondary,
    }
}

impl MirroredControl {
    /// Opens the mirrored volume of `cfg` (which must have a `[volume.replication]` table) as
    /// node `node`, Secondary, and starts replicating. Fails with the reason the device,
    /// metadata, key or engine could not be opened.
    pub fn open(node: &str, cfg: VolumeConfig) -> Result<Self, VolumeError> {
        let name = cfg.name.clone();
        let err = |what: String| VolumeError {
            volume: name.clone(),
            what,
        };
        let kind = choose_engine(cfg.engine.forced()).map_err(|e| err(e.to_string()))?;
        let placement_cfg = cfg.clone();
        let on_disk_error = cfg
            .replication
            .as_ref()
            .map_or(crate::config::DiskErrorPolicy::PassThrough, |r| {
                r.on_disk_error
            });
        let (commands, rx) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = std_mpsc::channel::<Result<Arc<Mutex<Snapshot>>, String>>();
        let node = node.to_string();
        let thread = std::thread::Builder::new()
            .name(format!("volume-{name}"))
            .spawn(move || {
                let r = engine::block_on(kind, data_path(kind, node, cfg, rx, ready_tx.clone()));
                if let Err(e) = r {
                    let _ = ready_tx.send(Err(e.to_string()));
                }
            })
            .map_err(|e| err(format!("cannot start the volume thread: {e}")))?;
        match ready_rx.recv_timeout(OPEN_TIMEOUT) {
            Ok(Ok(snapshot)) => Ok(Self {
                name,
                on_disk_error,
                placement: super::mount::Placement::new(placement_cfg),
                commands,
                snapshot,
                thread: Some(thread),
            }),
            Ok(Err(why)) => {
                let _ = thread.join();
                Err(err(why))
            }
            Err(_) => Err(err(format!(
                "opening the device and metadata took longer than {} s",
                OPEN_TIMEOUT.as_secs()
            ))),
        }
    }

    fn err(&self, what: impl Into<String>) -> VolumeError {
        VolumeError {
            volume: self.name.clone(),
            what: what.into(),
        }
    }

    fn snapshot(&self) -> Option<Snapshot> {
        self.snapshot.lock().ok().map(|s| s.clone())
    }

    fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, VolumeError> {
        let (tx, rx) = std_mpsc::channel();
        self.commands
            .send(make(tx))
            .map_err(|_| self.err("the volume thread has stopped; see the log for why"))?;
        match rx.recv_timeout(COMMAND_TIMEOUT) {
            Ok(r) => r.map_err(|why| self.err(why)),
            Err(_) => Err(self.err(format!(
                "no answer from the volume thread within {} s",
                COMMAND_TIMEOUT.as_secs()
            ))),
        }
    }
}

impl VolumeControl for MirroredControl {
    fn name(&self) -> &str {
        &self.name
    }
    fn role(&self) -> Role {
        self.snapshot()
            .map_or(Role::Secondary, |s| role_of(s.status.role))
    }
    fn disk_state(&self) -> DiskState {
        self.snapshot()
            .map_or(DiskState::Outdated, |s| disk_state_of(s.status.disk))
    }
    fn promote(&mut self, force: bool) -> Result<(), VolumeError> {
        self.call(|r| Command::Promote(force, r))
    }
    fn demote(&mut self) -> Result<(), VolumeError> {
        self.call(Command::Demote)
    }
    fn start_export(&mut self) -> Result<String, VolumeError> {
        self.call(Command::StartExport)
    }
    fn stop_export(&mut self) -> Result<(), VolumeError> {
        self.call(Command::StopExport)
    }
    fn start_verify(&mut self) -> Result<String, VolumeError> {
        self.call(Command::StartVerify)
    }
    fn mark_outdated(&mut self) -> Result<bool, VolumeError> {
        self.call(Command::MarkOutdated)
    }
    fn peer_outdated(&mut self) {
        // No reply to wait for: the heartbeat loop must not block on the data path.
        let _ = self.commands.send(Command::PeerOutdated);
    }
    fn resync(&mut self, discard_local: bool) -> Result<String, VolumeError> {
        self.call(|r| Command::Resync(discard_local, r))
    }
    fn newest_proof(&self) -> Option<volume::NewestProof> {
        self.snapshot().and_then(|s| s.status.newest)
    }
    fn link_connected(&self) -> bool {
        self.snapshot()
            .is_some_and(|s| s.status.connection == volume::Connection::Connected)
    }
    fn record_clean_primary_stop(&mut self) -> Result<bool, VolumeError> {
        self.call(Command::RecordCleanStop)
    }
    fn wants_failover(&self) -> bool {
        self.on_disk_error == crate::config::DiskErrorPolicy::Failover
            && self.snapshot().is_some_and(|s| s.status.detached.is_some())
    }
    fn mount(&mut self) -> Result<Option<String>, VolumeError> {
        self.placement.up().map_err(|w| self.err(w))
    }
    fn unmount(&mut self) -> Result<Option<String>, VolumeError> {
        self.placement.down().map_err(|w| self.err(w))
    }
    fn status(&self) -> VolumeStatus {
        match self.snapshot() {
            Some(s) => VolumeStatus {
                name: self.name.clone(),
                role: role_of(s.status.role),
                disk: disk_state_of(s.status.disk),
                export: s.export.clone(),
                kind: format!("mirrored ({}) with {}", s.status.mode, peer_word(&s.status)),
                replication: Some(s.status),
            },
            None => VolumeStatus {
                name: self.name.clone(),
                role: Role::Secondary,
                disk: DiskState::Outdated,
                export: None,
                kind: "mirrored (status unavailable: the volume thread stopped)".into(),
                replication: None,
            },
        }
    }
}

fn peer_word(s: &volume::VolumeStatus) -> String {
    match &s.connection {
        volume::Connection::Connecting => "peer not connected".into(),
        volume::Connection::Connected => "peer connected".into(),
        volume::Connection::Refused { .. } => "peer connection refused (see replication)".into(),
    }
}

impl Drop for MirroredControl {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Shutdown);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The running NBD export of the volume.
struct Export {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    uri: String,
}

/// Everything on the data-path thread: open, replicate, serve commands until Shutdown.
async fn data_path(
    kind: EngineKind,
    node: String,
    cfg: VolumeConfig,
    mut commands: mpsc::UnboundedReceiver<Command>,
    ready: std_mpsc::Sender<Result<Arc<Mutex<Snapshot>>, String>>,
) {
    let (vol, link) = match volume::run::open_volume(kind, &node, &cfg) {
        Ok(v) => v,
        Err(e) => {
            let _ = ready.send(Err(e.to_string()));
            return;
        }
    };
    let vol: Rc<Vol> = Rc::new(vol);
    let snapshot = Arc::new(Mutex::new(Snapshot {
        status: vol.status(),
        export: None,
    }));
    let replication = {
        let vol = vol.clone();
        let name = cfg.name.clone();
        tokio::task::spawn_local(async move {
            if let Err(e) = volume::session::keep_connected(vol, link).await {
                tracing::error!(volume = %name, error = %e, "replication stopped; the volume runs unmirrored until the daemon restarts");
            }
        })
    };
    let _ = ready.send(Ok(snapshot.clone()));
    tracing::info!(volume = %cfg.name, engine = ?kind, "mirrored volume open (Secondary)");

    let mut export: Option<Export> = None;
    let publish = |export: &Option<Export>| {
        if let Ok(mut s) = snapshot.lock() {
            s.status = vol.status();
            s.export = export.as_ref().map(|e| e.uri.clone());
        }
    };
    let mut snap_tick = tokio::time::interval(SNAPSHOT_EVERY);
    let mut persist_tick = tokio::time::interval(PERSIST_EVERY);
    loop {
        tokio::select! {
            _ = snap_tick.tick() => publish(&export),
            _ = persist_tick.tick() => {
                if let Err(e) = vol.persist_bitmap() {
                    tracing::warn!(volume = %cfg.name, error = %e, "cannot persist the bitmap");
                }
            }
            cmd = commands.recv() => {
                let Some(cmd) = cmd else { break };
                match cmd {
                    Command::Promote(force, reply) => {
                        // The cluster promotes on the peer's heartbeat; the link to a peer that
                        // just demoted may still show it Primary for a moment.
                        if matches!(vol.promote_refusal(), Some(volume::VolumeError::PeerIsPrimary { .. }))
                            && !vol.wait_peer_not_primary(PEER_DEMOTION_WAIT).await
                        {
                            tracing::warn!(volume = %cfg.name, "the replication link still shows the peer Primary {} s after the cluster heard it step down", PEER_DEMOTION_WAIT.as_secs());
                        }
                        let before = vol.status();
                        let was_connected = before.connection == volume::Connection::Connected
                            && before.role == volume::Role::Secondary;
                        let mut r = vol.promote(force).map_err(|e| e.to_string());
                        if r.is_ok() && was_connected {
                            // The promotion drops the connection so the peer learns the new
                            // generation. Writes acknowledged before it is back would reach
                            // only this copy: wait for the reconnection (the peer is alive).
                            r = wait_reconnected(&vol, before.counters.connections).await;
                        }
                        publish(&export);
                        let _ = reply.send(r);
                    }
                    Command::Demote(reply) => {
                        let r = if export.is_some() {
                            Err("refusing to demote while exported; stop the export first".into())
                        } else {
                            vol.demote().map_err(|e| e.to_string())
                        };
                        publish(&export);
                        let _ = reply.send(r);
                    }
                    Command::StartExport(reply) => {
                        let r = match &export {
                            Some(e) => Ok(e.uri.clone()),
                            None if vol.role() != volume::Role::Primary => {
                                Err("refusing to export a Secondary volume".into())
                            }
                            None => match start_export(vol.clone(), &cfg).await {
                                Ok(e) => {
                                    let uri = e.uri.clone();
                                    export = Some(e);
                                    Ok(uri)
                                }
                                Err(why) => Err(why),
                            },
                        };
                        publish(&export);
                        let _ = reply.send(r);
                    }
                    Command::StopExport(reply) => {
                        let r = match export.take() {
                            Some(e) => stop_export(&vol, e).await,
                            None => Ok(()),
                        };
                        publish(&export);
                        let _ = reply.send(r);
                    }
                    Command::StartVerify(reply) => {
                        let v = vol.clone();
                        let task = tokio::task::spawn_local(async move { v.verify().await });
                        // The verify checks its preconditions before its first await.
                        tokio::task::yield_now().await;
                        let r = if task.is_finished() {
                            match task.await {
                                Ok(Ok(v)) => Ok(format!("verify done: {} differing block(s)", v.differing_blocks)),
                                Ok(Err(e)) => Err(e.to_string()),
                                Err(e) => Err(format!("verify task failed: {e}")),
                            }
                        } else {
                            Ok("verify started; its progress and result show in status".into())
                        };
                        publish(&export);
                        let _ = reply.send(r);
                    }
                    Command::MarkOutdated(reply) => {
                        let r = vol.mark_outdated().map_err(|e| e.to_string());
                        publish(&export);
                        let _ = reply.send(r);
                    }
                    Command::PeerOutdated => {
                        vol.peer_outdated();
                        publish(&export);
                    }
                    Command::RecordCleanStop(reply) => {
                        let r = vol.record_clean_primary_stop().map_err(|e| e.to_string());
                        publish(&export);
                        let _ = reply.send(r);
                    }
                    Command::Resync(discard_local, reply) => {
                        let r = if discard_local {
                            vol.discard_local_data().map(|()| {
                                "this copy was discarded; it is resynced in full from the peer".to_string()
                            }).map_err(|e| e.to_string())
                        } else {
                            vol.drop_session("operator resync");
                            Ok("reconnecting: dirty regions are resynced".into())
                        };
                        publish(&export);
                        let _ = reply.send(r);
                    }
                    Command::Shutdown => break,
                }
            }
        }
    }
    // Shutdown: the export first (in-flight requests drain), then replication (a Secondary
    // connected to the Primary marks its copy Outdated and tells the Primary first), then a
    // clean close of the metadata once nothing else holds the volume.
    if let Some(e) = export.take() {
        if let Err(why) = stop_export(&vol, e).await {
            tracing::warn!(volume = %cfg.name, %why, "stopping the export at shutdown");
        }
    }
    vol.leave_outdated().await;
    replication.abort();
    let _ = replication.await;
    for _ in 0..100 {
        if Rc::strong_count(&vol) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    match Rc::try_unwrap(vol) {
        Ok(vol) => match vol.close() {
            Ok(_) => tracing::info!(volume = %cfg.name, "metadata closed cleanly"),
            Err(e) => {
                tracing::error!(volume = %cfg.name, error = %e, "clean close failed; the next start replays the activity log")
            }
        },
        Err(vol) => {
            tracing::warn!(volume = %cfg.name, "volume still in use at shutdown; bitmap persisted, the activity log is replayed at the next start");
            let _ = vol.persist_bitmap();
        }
    }
}

/// How long a promotion waits for the connected peer to reconnect.
const RECONNECT_WAIT: Duration = Duration::from_secs(10);

/// Waits until the volume is connected again on a newer connection than `connections`.
/// A peer that does not come back within [`RECONNECT_WAIT`] is no reason to fail the
/// promotion: the volume then serves alone and marks what the peer misses (as after any
/// connection loss), and the log says so.
async fn wait_reconnected(vol: &Rc<Vol>, connections: u64) -> Result<(), String> {
    let t0 = std::time::Instant::now();
    loop {
        let s = vol.status();
        if s.connection == volume::Connection::Connected && s.counters.connections > connections {
            return Ok(());
        }
        if t0.elapsed() >= RECONNECT_WAIT {
            tracing::warn!(volume = %s.volume, "the peer did not reconnect after the promotion; serving alone, its copy is resynced when it returns");
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn start_export(vol: Rc<Vol>, cfg: &VolumeConfig) -> Result<Export, String> {
    let listener = Listener::bind(&super::volume::endpoint(cfg))
        .await
        .map_err(|e| e.to_string())?;
    let uri = listener.uri(&cfg.export.name);
    let (stop, mut stop_rx) = watch::channel(false);
    let server_cfg = ServerConfig {
        shutdown_grace: Duration::from_secs(2),
        ..ServerConfig::default()
    };
    let grace = server_cfg.shutdown_grace;
    let shared = Shared::new(vol, cfg.export.name.clone(), &server_cfg, stop_rx.clone());
    let task = tokio::task::spawn_local(crate::nbd::export::serve_on(
        listener,
        shared,
        grace,
        async move {
            let _ = stop_rx.changed().await;
        },
        || {},
    ));
    Ok(Export { stop, task, uri })
}

async fn stop_export(vol: &Rc<Vol>, e: Export) -> Result<(), String> {
    let _ = e.stop.send(true);
    e.task
        .await
        .map_err(|j| format!("export task failed: {j}"))?;
    crate::block::BlockTarget::flush(&**vol)
        .await
        .map_err(|e| format!("final flush failed: {e}"))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;
    use std::time::Instant;

    use super::*;
    use crate::cluster::demo::NbdClient;

    fn meta(args: &[&str]) {
        crate::meta::cli::run_words(args).unwrap();
    }

    fn free_port(ip: &str) -> u16 {
        std::net::TcpListener::bind((ip, 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    /// Node `me` of a pair on fresh 8 MiB devices that skip the initial sync.
    fn node_cfg(dir: &Path, me: &str, peer: &str, addrs: [&str; 2]) -> VolumeConfig {
        let dev = dir.join(format!("{me}.img"));
        std::fs::File::create(&dev)
            .unwrap()
            .set_len(8 << 20)
            .unwrap();
        let d = dev.to_str().unwrap();
        meta(&["create-md", "--device", d, "--granularity", "64K"]);
        meta(&[
            "new-current-uuid",
            "--clear-bitmap",
            "--uuid",
            "1234abcd",
            "--device",
            d,
        ]);
        let key = dir.join("key");
        std::fs::write(&key, [0x5au8; 32]).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let text = format!(
            "[node]\nid = \"{me}\"\n[[volume]]\nname = \"data\"\ndevice = \"{d}\"\nengine = \"sync\"\ncache = \"writeback\"\n[volume.export]\nsocket = \"{sock}\"\n[volume.replication]\naddress = \"{a}\"\npeer = \"{p}\"\npeer_id = \"{peer}\"\nkey_file = \"{key}\"\nping_timeout_secs = 2\n",
            sock = dir.join(format!("{me}.sock")).display(),
            a = addrs[0],
            p = addrs[1],
            key = key.display(),
        );
        crate::config::Config::parse(Path::new("t.toml"), &text)
            .unwrap()
            .volumes
            .remove(0)
    }

    fn wait(what: &str, mut ok: impl FnMut() -> bool) {
        let t = Instant::now();
        while !ok() {
            assert!(t.elapsed() < Duration::from_secs(20), "timed out: {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn connected(v: &MirroredControl) -> bool {
        v.status()
            .replication
            .is_some_and(|r| r.connection == volume::Connection::Connected)
    }

    fn block(i: u64) -> Vec<u8> {
        (0..4096u64).map(|j| (i * 31 + j) as u8).collect()
    }

    #[test]
    fn acknowledged_writes_are_on_the_peers_own_copy_and_the_peer_takes_over_with_a_new_generation()
    {
        let dir = tempfile::tempdir().unwrap();
        let pa = format!("127.0.0.1:{}", free_port("127.0.0.1"));
        let pb = format!("127.0.0.2:{}", free_port("127.0.0.2"));
        let mut a = MirroredControl::open("a", node_cfg(dir.path(), "a", "b", [&pa, &pb])).unwrap();
        let mut b = MirroredControl::open("b", node_cfg(dir.path(), "b", "a", [&pb, &pa])).unwrap();
        assert_eq!(a.role(), Role::Secondary);
        assert_eq!(a.disk_state(), DiskState::UpToDate);
        assert!(a.start_export().is_err(), "a Secondary must not export");
        wait("a and b connect", || connected(&a) && connected(&b));

        a.promote(false).unwrap();
        assert_eq!(
            a.role(),
            Role::Primary,
            "the snapshot shows the promotion at once"
        );
        let gen_a = a.status().replication.unwrap().current_generation;
        assert_ne!(
            gen_a,
            format!("{:016x}", 0x1234abcdu64),
            "promotion starts a generation"
        );
        assert!(connected(&a), "promote returns once the peer reconnected");
        let uri = a.start_export().unwrap();
        assert!(uri.contains("a.sock"), "{uri}");
        wait("a and b reconnect after the promotion", || {
            connected(&a) && connected(&b)
        });
        let mut c = NbdClient::connect(&dir.path().join("a.sock")).unwrap();
        for i in 0..64 {
            c.write(i * 4096, &block(i)).unwrap();
        }
        c.flush().unwrap();
        drop(c);
        // The wire counters: every write went out as a frame, and zstd shrank this
        // compressible pattern (default level 1).
        wait("the sent frames counted", || {
            a.status()
                .replication
                .is_some_and(|r| r.counters.frames_sent >= 64)
        });
        let c = a.status().replication.unwrap().counters;
        assert!(c.payload_bytes_sent >= 64 * 4096, "{c:?}");
        assert!(
            c.wire_bytes_sent > 0 && c.wire_bytes_sent < c.payload_bytes_sent / 2,
            "{c:?}"
        );
        // Sync mode: every acknowledged write is already in b's own file.
        let b_file = std::fs::read(dir.path().join("b.img")).unwrap();
        for i in 0..64u64 {
            let at = (i * 4096) as usize;
            assert_eq!(
                &b_file[at..at + 4096],
                &block(i)[..],
                "block {i} missing on b"
            );
        }
        assert!(
            b.promote(false).is_err(),
            "b must refuse while the connected peer is Primary"
        );
        assert!(a.demote().is_err(), "demote while exported is refused");

        // Switchover: a stands down, b takes the service.
        a.stop_export().unwrap();
        a.demote().unwrap();
        assert_eq!(a.role(), Role::Secondary);
        let t = Instant::now();
        while let Err(e) = b.promote(false) {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "b never promoted: {e}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let gen_b = b.status().replication.unwrap().current_generation;
        assert_ne!(gen_b, gen_a, "b's promotion starts its own generation");
        b.start_export().unwrap();
        let mut c = NbdClient::connect(&dir.path().join("b.sock")).unwrap();
        for i in 0..64 {
            assert_eq!(c.read(i * 4096, 4096).unwrap(), block(i), "block {i} on b");
        }
        c.write(100 * 4096, &block(100)).unwrap();
        c.flush().unwrap();
        drop(c);
        wait("a follows b", || {
            connected(&a)
                && a.status().replication.unwrap().current_generation == gen_b
                && a.disk_state() == DiskState::UpToDate
        });
        let a_file = std::fs::read(dir.path().join("a.img")).unwrap();
        assert_eq!(&a_file[100 * 4096..101 * 4096], &block(100)[..]);
        b.stop_export().unwrap();
        drop(b);
        drop(a);
    }

    /// A loop device over a fresh 8 MiB file, detached on drop.
    struct LoopDev(String, std::path::PathBuf);
    impl Drop for LoopDev {
        fn drop(&mut self) {
            let _ = std::process::Command::new("losetup")
                .args(["-d", &self.0])
                .status();
        }
    }

    fn loop_dev(dir: &Path, name: &str) -> LoopDev {
        let img = dir.join(format!("{name}.backing"));
        std::fs::File::create(&img)
            .unwrap()
            .set_len(8 << 20)
            .unwrap();
        let out = std::process::Command::new("losetup")
            .args(["--find", "--show"])
            .arg(&img)
            .output()
            .expect("losetup (util-linux) is needed");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        LoopDev(String::from_utf8_lossy(&out.stdout).trim().to_string(), img)
    }

    #[test]
    fn block_devices_with_internal_metadata_mirror_under_the_default_engine() {
        // Metadata at the device's tail is opened O_EXCL while the engine opens the same
        // device (O_DIRECT under io_uring): both must work together on a real block device.
        let dir = tempfile::tempdir().unwrap();
        let pa = format!("127.0.0.1:{}", free_port("127.0.0.1"));
        let pb = format!("127.0.0.2:{}", free_port("127.0.0.2"));
        let devs = [loop_dev(dir.path(), "a"), loop_dev(dir.path(), "b")];
        let mut cfgs = Vec::new();
        for (i, (me, peer)) in [("a", "b"), ("b", "a")].into_iter().enumerate() {
            let mut c = node_cfg(
                dir.path(),
                me,
                peer,
                if i == 0 { [&pa, &pb] } else { [&pb, &pa] },
            );
            meta(&["create-md", "--device", &devs[i].0, "--granularity", "64K"]);
            meta(&[
                "new-current-uuid",
                "--clear-bitmap",
                "--uuid",
                "1234abcd",
                "--device",
                &devs[i].0,
            ]);
            c.device = devs[i].0.clone().into();
            c.engine = crate::config::EngineChoice::Auto;
            c.cache = crate::engine::CacheMode::None;
            cfgs.push(c);
        }
        let mut a = MirroredControl::open("a", cfgs.remove(0)).unwrap();
        let b = MirroredControl::open("b", cfgs.remove(0)).unwrap();
        wait("connected", || connected(&a) && connected(&b));
        a.promote(false).unwrap();
        assert!(connected(&a), "promote returns once the peer reconnected");
        a.start_export().unwrap();
        wait("reconnected", || connected(&a) && connected(&b));
        let mut c = NbdClient::connect(&dir.path().join("a.sock")).unwrap();
        for i in 0..32 {
            c.write(i * 4096, &block(i)).unwrap();
        }
        c.flush().unwrap();
        drop(c);
        let b_data = std::fs::read(&devs[1].1).unwrap();
        for i in 0..32u64 {
            let at = (i * 4096) as usize;
            assert_eq!(
                &b_data[at..at + 4096],
                &block(i)[..],
                "block {i} on b's device"
            );
        }
        a.stop_export().unwrap();
        drop(b);
        drop(a);
    }

    #[test]
    fn a_volume_whose_metadata_is_missing_fails_to_open_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = node_cfg(dir.path(), "a", "b", ["127.0.0.1:1", "127.0.0.2:1"]);
        let bare = dir.path().join("bare.img");
        std::fs::File::create(&bare)
            .unwrap()
            .set_len(8 << 20)
            .unwrap();
        cfg.device = bare;
        let e = MirroredControl::open("a", cfg).err().expect("must fail");
        assert!(e.to_string().contains("metadata"), "{e}");
        assert!(e.to_string().contains("create-md"), "{e}");
    }
}
