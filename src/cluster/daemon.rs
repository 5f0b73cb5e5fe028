//! `twinvol run`: the node daemon. Thin runtime around the pure parts: UDP sockets feed
//! [`PeerMonitor`], a witness task feeds [`WitnessView`], and every tick the
//! [`Controller`] decides; fencing, bring-up and teardown are carried out here, and the
//! control socket answers `twinvol status/promote/demote/switchover`.
//!
//! Files under `state_dir`: `twinvol.pid` (this daemon's pid; the peer's lab provider fences
//! through it) and `role.json` (the last role and whether the node stands down, persisted on
//! every change; at start the node is always Secondary and the old role is only reported).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UdpSocket, UnixListener};
use tokio::sync::{mpsc, oneshot, watch};

use super::announce::Announcer;
use super::bringup::{self, HookResult, Hooks, Sequence};
use super::control::{Answer, Request};
use super::decide::{Action, Controller, FenceState, Inputs, NewestProof, Params, WitnessView};
use super::heartbeat::{
    self, DiskState, Heartbeat, Role, FLAG_CANNOT_PROMOTE, FLAG_PEER_OUTDATED, FLAG_PROMOTING,
    FLAG_WANTS_PRIMARY, FLAG_YIELDING,
};
use super::liveness::{Event, PeerMonitor, PeerView};
use super::mirrored::MirroredControl;
use super::volume::{LocalVolume, VolumeControl, VolumeStatus};
use super::witness::{self, Probe};
use crate::cloud::lab::LabCloud;
use crate::cloud::{
    CheckReport, Cloud, Outcome, Report, Resource, ResourceReport, UnreachableAction,
};
use crate::config::{ClusterConfig, Config};
use crate::repl::wire::auth::PreSharedKey;

/// Why the daemon could not start (or stopped).
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// No `[cluster]` table.
    #[error("config has no [cluster] table: add one with peer, priority, heartbeat paths, state_dir and control_socket (see examples/lab-node-a.toml)")]
    NoCluster,
    /// The heartbeat key could not be loaded.
    #[error("cluster.key_file: {0}")]
    Key(#[from] crate::repl::link::keyfile::KeyFileError),
    /// A socket or file could not be set up.
    #[error("{what}: {source} ({fix})")]
    Setup {
        /// What was being set up.
        what: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
        /// What to do.
        fix: &'static str,
    },
    /// The cloud provider could not be set up.
    #[error("cloud provider: {0}")]
    Cloud(String),
    /// The witness prober could not be set up (TLS trust anchors).
    #[error("witness: {0}")]
    Witness(String),
    /// A volume could not be opened (device, metadata, replication key or engine).
    #[error("{0}; fix the volume's configuration or metadata (`twinvol show-md`), then restart")]
    Volume(super::volume::VolumeError),
}

/// The cloud provider the daemon uses.
pub enum ClusterCloud {
    /// No provider: no network identity is moved; fencing fails (no proof).
    None,
    /// The lab provider.
    Lab(LabCloud),
    /// AWS.
    Aws(Box<crate::cloud::aws::AwsCloud>),
}

impl Cloud for ClusterCloud {
    async fn activate(&self) -> Report {
        match self {
            ClusterCloud::None => Report::default(),
            ClusterCloud::Lab(l) => l.activate().await,
            ClusterCloud::Aws(a) => a.activate().await,
        }
    }
    async fn deactivate(&self) -> Report {
        match self {
            ClusterCloud::None => Report::default(),
            ClusterCloud::Lab(l) => l.deactivate().await,
            ClusterCloud::Aws(a) => a.deactivate().await,
        }
    }
    async fn check(&self) -> CheckReport {
        match self {
            ClusterCloud::None => CheckReport {
                items: vec![],
                repairs: vec![],
                on_unreachable: UnreachableAction::Warn,
            },
            ClusterCloud::Lab(l) => l.check().await,
            ClusterCloud::Aws(a) => a.check().await,
        }
    }
    async fn fence_peer(&self) -> Report {
        match self {
            ClusterCloud::None => Report {
                items: vec![ResourceReport::new(
                    Resource::Instance("peer".into()),
                    Outcome::Failed("no cloud provider configured to fence with: add [cloud] or [cluster.lab], or set cluster.fence = \"off\"".into()),
                    Duration::ZERO,
                )],
                elapsed: Duration::ZERO,
            },
            ClusterCloud::Lab(l) => l.fence_peer().await,
            ClusterCloud::Aws(a) => a.fence_peer().await,
        }
    }
    async fn peer_instance(&self) -> crate::cloud::PeerInstance {
        match self {
            ClusterCloud::None => crate::cloud::PeerInstance::Unknown(
                "no cloud provider configured to ask: add [cloud] (with [cloud.fence] peer_instance_id) or [cluster.lab]".into(),
            ),
            ClusterCloud::Lab(l) => l.peer_instance().await,
            ClusterCloud::Aws(a) => a.peer_instance().await,
        }
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn setup_err(what: String, fix: &'static str) -> impl FnOnce(std::io::Error) -> DaemonError {
    move |source| DaemonError::Setup { what, source, fix }
}

/// One path's line in status.
#[derive(Debug, Clone, serde::Serialize)]
struct PathStatus {
    name: String,
    local: SocketAddr,
    peer: SocketAddr,
    up: bool,
    received: u64,
    refused: u64,
    last_rx_ms_ago: Option<u64>,
}

/// Everything `twinvol status --json` prints.
#[derive(Debug, Clone, serde::Serialize)]
struct Status {
    node: String,
    priority: u16,
    role: Role,
    yielding: bool,
    wants_primary: bool,
    peer: String,
    peer_view: PeerView,
    paths: Vec<PathStatus>,
    witness: WitnessView,
    witness_probes: Vec<Probe>,
    fence: FenceState,
    reason: String,
    /// The peer was heard since this daemon started (the start-up gate is passed).
    heard_since_start: bool,
    /// Why this node's metadata says its copy is the newest, if it does.
    newest: Option<NewestProof>,
    /// This node announces a promotion and waits for the peer to acknowledge it.
    promoting: bool,
    /// Misconfigurations seen (authenticated heartbeats from an unexpected address, node or
    /// path; two processes sending as the peer), newest last.
    misconfigured: Vec<String>,
    volumes: Vec<VolumeStatus>,
    last_sequence: Option<Sequence>,
    primary_since_unix_ms: Option<u64>,
    last_failover_ms: Option<u64>,
    failovers: u64,
    previous_role: Option<Role>,
    cloud_plan: Vec<String>,
    /// The last cloud monitor cycle (runs only while Primary: everything points elsewhere on
    /// a Secondary).
    cloud_check: Option<CloudCheck>,
    /// AWS API calls, errors and throttles per operation since start (AWS provider only).
    cloud_api: Option<crate::cloud::aws::api::ApiStats>,
    uptime_ms: u64,
}

/// One cloud monitor cycle as status shows it.
#[derive(Debug, Clone, serde::Serialize)]
struct CloudCheck {
    /// When it finished.
    unix_ms: u64,
    /// How long it took.
    elapsed_ms: u64,
    /// Each resource and what was found.
    items: Vec<CloudItem>,
    /// Repairs made (cloud.monitor.reconcile).
    repairs: Vec<String>,
}

#[derive(Debug, Clone, serde::Serialize)]
struct CloudItem {
    resource: String,
    /// "ok", "drift" or "unknown".
    health: &'static str,
    detail: String,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct RoleFile {
    role: Role,
    yielding: bool,
    unix_ms: u64,
}

/// Local state the heartbeat sender advertises. Every change notifies the sender, which
/// sends a round at once (a state change is announced without waiting for the interval);
/// `nudge` is bumped to send one without a change (answering a peer's change).
#[derive(Debug, Clone, Copy)]
struct Advert {
    role: Role,
    disk: DiskState,
    flags: u8,
    nudge: u64,
}

enum Msg {
    Heartbeat(usize, Result<Heartbeat, String>),
    /// An authenticated heartbeat that does not fit the configuration (address, node, path).
    Misconfigured(usize, String),
    Witness(bool, Vec<Probe>),
    Fenced(Report),
    CloudChecked(CheckReport, Duration),
    PeerInstance(crate::cloud::PeerInstance),
    Control(Request, oneshot::Sender<Answer>),
}

struct Node {
    cfg: ClusterConfig,
    node_id: String,
    volumes: Vec<Box<dyn VolumeControl>>,
    cloud: Arc<ClusterCloud>,
    hooks: Hooks,
    monitor: PeerMonitor,
    controller: Controller,
    witness: WitnessView,
    probes: Vec<Probe>,
    start: Instant,
    last_sequence: Option<Sequence>,
    primary_since: Option<u64>,
    peer_lost_at: Option<Instant>,
    last_failover_ms: Option<u64>,
    /// Completed failovers (peer lost, then Primary here) since start.
    failovers: u64,
    /// The last cloud monitor cycle.
    cloud_check: Option<CloudCheck>,
    /// Stopping cleanly: advertise "stands down" (not persisted, unlike an operator demote).
    leaving: bool,
    /// When the next cloud monitor cycle is due (while Primary), and whether one runs now.
    next_cloud_check: Option<Instant>,
    cloud_check_running: bool,
    /// Seconds between cloud monitor cycles.
    cloud_check_every: Duration,
    previous_role: Option<Role>,
    advert: watch::Sender<Advert>,
    next_check: Option<Instant>,
    tx: mpsc::Sender<Msg>,
    /// What the Route 53 health endpoint answers (failover-routing mode).
    health: crate::ops::health::HealthState,
    /// Heartbeat sequence numbers and acknowledgements (shared with the sender task).
    announcer: Arc<std::sync::Mutex<Announcer>>,
    /// The peer's (role, disk, flags) in its newest heartbeat: a change is answered at once.
    peer_state: Option<(Role, DiskState, u8)>,
    /// Misconfigurations seen, each once (the status shows them).
    misconfigured: Vec<String>,
}

impl Node {
    fn role(&self) -> Role {
        if self.volumes.iter().any(|v| v.role() == Role::Primary) {
            Role::Primary
        } else {
            Role::Secondary
        }
    }
    fn disk(&self) -> DiskState {
        self.volumes
            .iter()
            .map(|v| v.disk_state())
            .find(|d| *d != DiskState::UpToDate)
            .unwrap_or(DiskState::UpToDate)
    }
    fn now(&self) -> Duration {
        self.start.elapsed()
    }

    /// The one-line state `systemctl status` shows (sd_notify `STATUS=`): role and peer.
    fn sd_status(&self) -> String {
        let peer = match self.monitor.view() {
            PeerView::Alive(p) => format!("alive as {:?}", p.role),
            PeerView::Unknown => "not seen yet".into(),
            PeerView::Lost => "LOST".into(),
        };
        format!(
            "{:?}{}, peer {} {peer}, {} volume(s)",
            self.role(),
            if self.controller.yielding() {
                " (standing down)"
            } else {
                ""
            },
            self.cfg.peer,
            self.volumes.len()
        )
    }

    /// A mirrored volume here is disconnected and wrote alone while Primary (it may have
    /// acknowledged writes the peer lacks), whatever its role now: a Primary that stood down
    /// right after writing alone must still tell its peer that its copy is behind.
    fn peer_lacks_writes(&self) -> bool {
        self.volumes.iter().any(|v| {
            v.status().replication.is_some_and(|r| {
                r.connection != crate::volume::Connection::Connected && r.wrote_alone
            })
        })
    }

    /// The peer's heartbeat says its copy is not UpToDate (it cannot be promoted without
    /// force): tell the disconnected mirrored volumes that do not know it yet, so writes they
    /// hold (`replication.outdate_wait_ms`) complete.
    fn peer_is_outdated(&mut self) {
        for v in self.volumes.iter_mut() {
            let tell = v.status().replication.is_some_and(|r| {
                r.connection != crate::volume::Connection::Connected && !r.peer_outdated
            });
            if tell {
                v.peer_outdated();
            }
        }
    }

    /// The Primary reported writes this node lacks: outdate the mirrored copies here.
    fn peer_says_outdated(&mut self) {
        let mut changed = false;
        for v in self.volumes.iter_mut() {
            match tokio::task::block_in_place(|| v.mark_outdated()) {
                Ok(c) => changed |= c,
                Err(e) => tracing::error!(error = %e, "cannot mark the copy outdated"),
            }
        }
        if changed {
            self.publish();
        }
    }

    /// This node hears no peer and reaches no witness: it may be the one cut off.
    fn cut_off(&self) -> bool {
        self.monitor.view() == PeerView::Lost
            && matches!(self.witness, WitnessView::Unreachable { .. })
    }

    /// What the heartbeats advertise. A node that is cut off also advertises that it stands
    /// down: when the partition is one-way (this node cannot hear the peer, the peer still
    /// hears it), the peer then takes the service instead of waiting for this preferred but
    /// isolated node, which never promotes.
    fn advert(&self) -> Advert {
        let mut flags = 0;
        if self.controller.yielding() || self.cut_off() || self.leaving {
            flags |= FLAG_YIELDING;
        }
        if self.cut_off() || self.leaving {
            flags |= FLAG_CANNOT_PROMOTE;
        }
        if self.controller.wants_primary() {
            flags |= FLAG_WANTS_PRIMARY;
        }
        if self.peer_lacks_writes() {
            flags |= FLAG_PEER_OUTDATED;
        }
        if self.controller.promoting() {
            flags |= FLAG_PROMOTING;
        }
        Advert {
            role: self.role(),
            disk: self.disk(),
            flags,
            nudge: 0,
        }
    }

    /// Publishes the advert; the sender sends a round at once when role, disk or flags
    /// changed.
    fn advertise(&self) {
        let a = self.advert();
        self.advert.send_if_modified(|cur| {
            let changed = cur.flags != a.flags || cur.role != a.role || cur.disk != a.disk;
            *cur = Advert {
                nudge: cur.nudge,
                ..a
            };
            changed
        });
    }

    /// Why every mirrored volume's metadata says its copy is the newest (the first volume's
    /// reason), or `None` when one does not or there is no mirrored volume.
    fn newest(&self) -> Option<NewestProof> {
        let mut proof = None;
        for v in self
            .volumes
            .iter()
            .filter(|v| v.status().replication.is_some())
        {
            match v.newest_proof() {
                None => return None,
                Some(p) => {
                    proof.get_or_insert(p);
                }
            }
        }
        proof
    }

    /// A replication link to the peer is connected (the peer's process is alive).
    fn link_connected(&self) -> bool {
        self.volumes.iter().any(|v| v.link_connected())
    }

    /// Records a misconfiguration once (logged at error level the first time).
    fn misconfigured(&mut self, what: String) {
        if !self.misconfigured.contains(&what) {
            tracing::error!(problem = %what, "MISCONFIGURATION");
            self.misconfigured.push(what);
            if self.misconfigured.len() > 8 {
                self.misconfigured.remove(0);
            }
        }
    }

    /// A verified heartbeat from the peer on path `i`.
    fn on_heartbeat(&mut self, i: usize, hb: Heartbeat) {
        if hb.flags & FLAG_PEER_OUTDATED != 0 && self.role() == Role::Secondary {
            self.peer_says_outdated();
        }
        let now = self.now();
        for ev in self.monitor.on_heartbeat(now, i, &hb) {
            self.log_event(ev);
        }
        if !self.monitor.is_newest(&hb) {
            return;
        }
        if let Ok(mut a) = self.announcer.lock() {
            a.heard(&hb);
        }
        // A change of the peer's state is answered at once (it may be waiting for this node
        // to acknowledge its promotion announcement).
        let state = (hb.role, hb.disk, hb.flags);
        if self.peer_state.is_some_and(|p| p != state) {
            self.advert
                .send_modify(|a| a.nudge = a.nudge.wrapping_add(1));
        }
        self.peer_state = Some(state);
        // Only the newest state counts: a stale "outdated" must not release writes.
        if hb.disk != DiskState::UpToDate && self.role() == Role::Primary {
            self.peer_is_outdated();
        }
    }

    fn publish(&self) {
        let a = self.advert();
        self.advert.send_replace(a);
        self.health.set(if a.role == Role::Primary {
            crate::ops::health::Health::PrimaryHealthy
        } else {
            crate::ops::health::Health::NotPrimary
        });
        let rf = RoleFile {
            role: a.role,
            yielding: self.controller.yielding(),
            unix_ms: unix_ms(),
        };
        let path = self.cfg.state_dir.join("role.json");
        if let Ok(text) = serde_json::to_string(&rf) {
            if crate::ops::status_file::replace_file(&path, text.as_bytes()).is_err() {
                tracing::warn!(path = %path.display(), "cannot persist the role");
            }
        }
    }

    fn status(&self) -> Status {
        let now = self.now();
        let paths = self
            .cfg
            .heartbeats
            .iter()
            .zip(self.monitor.paths())
            .map(|(h, p)| PathStatus {
                name: h.name.clone(),
                local: h.local,
                peer: h.peer,
                up: p.up,
                received: p.received,
                refused: p.refused,
                last_rx_ms_ago: p.last_rx.map(|t| now.saturating_sub(t).as_millis() as u64),
            })
            .collect();
        Status {
            node: self.node_id.clone(),
            priority: self.cfg.priority,
            role: self.role(),
            yielding: self.controller.yielding(),
            wants_primary: self.controller.wants_primary(),
            peer: self.cfg.peer.clone(),
            peer_view: self.monitor.view(),
            paths,
            witness: self.witness,
            witness_probes: self.probes.clone(),
            fence: self.controller.fence_state().clone(),
            reason: self.controller.reason().to_string(),
            heard_since_start: self.monitor.heard_since_start(),
            newest: self.newest(),
            promoting: self.controller.promoting(),
            misconfigured: self.misconfigured.clone(),
            volumes: self.volumes.iter().map(|v| v.status()).collect(),
            last_sequence: self.last_sequence.clone(),
            primary_since_unix_ms: self.primary_since,
            last_failover_ms: self.last_failover_ms,
            failovers: self.failovers,
            previous_role: self.previous_role,
            cloud_plan: match &*self.cloud {
                ClusterCloud::Lab(l) => l.plan(),
                _ => vec![],
            },
            cloud_check: self.cloud_check.clone(),
            cloud_api: match &*self.cloud {
                ClusterCloud::Aws(a) => Some(a.api().stats()),
                _ => None,
            },
            uptime_ms: now.as_millis() as u64,
        }
    }

    /// Runs `f` on the named volume (or every volume); the message lists each outcome.
    fn each_volume(
        &mut self,
        name: Option<&str>,
        mut f: impl FnMut(&mut Box<dyn VolumeControl>) -> Result<String, super::volume::VolumeError>,
    ) -> (bool, String) {
        let mut lines = Vec::new();
        let mut ok = true;
        for v in self.volumes.iter_mut() {
            if name.is_some_and(|n| n != v.name()) {
                continue;
            }
            match tokio::task::block_in_place(|| f(v)) {
                Ok(m) => lines.push(format!("volume {}: {m}", v.name())),
                Err(e) => {
                    ok = false;
                    lines.push(e.to_string());
                }
            }
        }
        if lines.is_empty() {
            return (
                false,
                format!("no volume named {:?}", name.unwrap_or_default()),
            );
        }
        (ok, lines.join("; "))
    }

    fn answer(&self, ok: bool, message: impl Into<String>) -> Answer {
        Answer {
            ok,
            message: message.into(),
            status: serde_json::to_value(self.status()).unwrap_or(serde_json::Value::Null),
        }
    }

    async fn promote(&mut self, force: bool, why: &str) -> bool {
        tracing::info!(reason = why, force, "promoting: bring-up starts");
        let cloud = self.cloud.clone();
        let cloud_ref = match &*cloud {
            ClusterCloud::None => None,
            c => Some(c),
        };
        let seq = bringup::bring_up(&mut self.volumes, &self.hooks, cloud_ref, force).await;
        let ok = seq.succeeded();
        if ok {
            self.primary_since = Some(unix_ms());
            if let Some(t) = self.peer_lost_at.take() {
                let ms = t.elapsed().as_millis() as u64;
                self.last_failover_ms = Some(ms);
                self.failovers += 1;
                tracing::info!(
                    failover_ms = ms,
                    "failover complete: Primary, exported, hooks started"
                );
            }
            self.next_check =
                Some(Instant::now() + Duration::from_millis(self.cfg.hooks.check_interval_ms));
            tracing::info!(
                elapsed_ms = seq.elapsed_ms,
                "bring-up complete: this node is Primary"
            );
        } else {
            tracing::error!(failed_at = ?seq.failed_at, "bring-up FAILED; the node was left Secondary and unexported");
            // Do not try again in a loop: stand down so the peer (if any) may take over,
            // and the operator sees the failed step in status.
            self.controller.stand_down();
        }
        self.controller.promotion_done();
        self.last_sequence = Some(seq);
        self.publish();
        ok
    }

    async fn demote(&mut self, why: &str) {
        tracing::warn!(reason = why, "demoting: teardown starts");
        let cloud = self.cloud.clone();
        let cloud_ref = match &*cloud {
            ClusterCloud::None => None,
            c => Some(c),
        };
        let seq = bringup::tear_down(&mut self.volumes, &self.hooks, cloud_ref).await;
        self.primary_since = None;
        self.next_check = None;
        self.last_sequence = Some(seq);
        self.publish();
    }

    async fn control(&mut self, req: Request) -> Answer {
        let peer = self.monitor.view();
        match req {
            Request::Status => self.answer(true, "status"),
            Request::Promote { force } => {
                if self.role() == Role::Primary {
                    return self.answer(true, "already Primary");
                }
                if let PeerView::Alive(s) = peer {
                    if s.role == Role::Primary {
                        return self.answer(false, "refused: the peer is Primary; run `twinvol switchover` (or demote the peer) first");
                    }
                    if s.promoting {
                        return self.answer(false, "refused: the peer has announced its own promotion; wait for it, or demote it first");
                    }
                    if !force && self.disk() != DiskState::UpToDate {
                        return self.answer(
                            false,
                            format!(
                                "refused: disk is {:?}; `twinvol promote --force` accepts it",
                                self.disk()
                            ),
                        );
                    }
                    // The peer is alive: the promotion is announced first, and carried out
                    // once the peer acknowledged it (it then never promotes at the same time).
                    self.controller.request_promotion(force);
                    self.advertise();
                    return self.answer(true, "promotion announced to the peer; it completes once the peer acknowledges it");
                }
                let proof = matches!(
                    self.controller.fence_state(),
                    FenceState::Fenced | FenceState::PeerStopped(_)
                );
                if !force && !proof {
                    let why = if self.monitor.heard_since_start() {
                        "the peer is not reachable and was not fenced, so it may still serve"
                    } else {
                        "the peer has not been heard since this daemon started, so it may hold newer data or still serve"
                    };
                    return self.answer(false, format!("refused: {why}; check that it is stopped, then run `twinvol promote --force`"));
                }
                if !force && self.disk() != DiskState::UpToDate {
                    return self.answer(
                        false,
                        format!(
                            "refused: disk is {:?}; `twinvol promote --force` accepts it",
                            self.disk()
                        ),
                    );
                }
                if force {
                    let generations: Vec<String> = self
                        .volumes
                        .iter()
                        .filter_map(|v| {
                            v.status().replication.map(|r| {
                                format!("{} at generation {}", v.name(), r.current_generation)
                            })
                        })
                        .collect();
                    tracing::warn!(
                        copies = %generations.join(", "),
                        peer_heard = self.monitor.heard_since_start(),
                        "FORCED PROMOTION by the operator: disk-state and proof checks bypassed. Writes the peer acknowledged that this copy lacks are lost for the service, and if the peer also wrote, the next connection is a split brain"
                    );
                }
                self.controller.clear_operator_flags();
                let ok = self.promote(force, "operator promote").await;
                self.answer(
                    ok,
                    if ok {
                        "promoted"
                    } else {
                        "bring-up failed (see last_sequence)"
                    },
                )
            }
            Request::Demote => {
                self.controller.stand_down();
                if self.role() == Role::Primary {
                    self.demote("operator demote").await;
                    self.answer(true, "demoted; standing down for the peer")
                } else {
                    self.publish();
                    self.answer(true, "Secondary; standing down for the peer")
                }
            }
            Request::Verify { volume } => {
                let (ok, msg) = self.each_volume(volume.as_deref(), |v| v.start_verify());
                self.answer(ok, msg)
            }
            Request::Resync {
                volume,
                discard_local,
            } => {
                if discard_local && self.role() == Role::Primary {
                    return self.answer(false, "refused: this node is Primary; its data is the service's. Run `twinvol resync --discard-local` on the node whose changes are to be lost");
                }
                let (ok, msg) = self.each_volume(volume.as_deref(), |v| v.resync(discard_local));
                self.publish();
                self.answer(ok, msg)
            }
            Request::Switchover => match (self.role(), peer) {
                (Role::Primary, PeerView::Alive(s))
                    if s.role == Role::Secondary && s.disk == DiskState::UpToDate =>
                {
                    self.controller.stand_down();
                    self.demote("operator switchover").await;
                    self.answer(true, "handed over: the peer takes the service")
                }
                (Role::Primary, _) => self.answer(
                    false,
                    "refused: the peer is not alive as an UpToDate Secondary",
                ),
                (Role::Secondary, PeerView::Alive(s)) if s.role == Role::Primary => {
                    self.controller.request_handover();
                    self.publish();
                    self.answer(true, "asked the peer to hand over")
                }
                (Role::Secondary, PeerView::Alive(_)) => {
                    self.controller.request_promotion(false);
                    self.publish();
                    self.answer(
                        true,
                        "both Secondary: this node announces its promotion and takes the service once the peer acknowledges",
                    )
                }
                (Role::Secondary, _) => self.answer(
                    false,
                    "refused: the peer is not reachable; use `twinvol promote`",
                ),
            },
        }
    }

    async fn check_application(&mut self) {
        let Some(at) = self.next_check else { return };
        if Instant::now() < at || self.role() != Role::Primary {
            return;
        }
        self.next_check =
            Some(Instant::now() + Duration::from_millis(self.cfg.hooks.check_interval_ms));
        let Some(check) = self.cfg.hooks.check.clone() else {
            return;
        };
        let t = self.hooks.timeout;
        if let HookResult::Failed(why) =
            bringup::run_hook("check", &check, &self.hooks.env, t).await
        {
            tracing::warn!(%why, "application check failed; trying recover");
            let recovered = match &self.cfg.hooks.recover {
                Some(r) => matches!(
                    bringup::run_hook("recover", r, &self.hooks.env, t).await,
                    HookResult::Ok(_)
                ),
                None => false,
            };
            if recovered {
                tracing::info!("application recovered in place");
            } else {
                self.controller.stand_down();
                self.demote(
                    "application check failed and could not be recovered: failing over to the peer",
                )
                .await;
            }
        }
    }

    /// Starts a cloud monitor cycle when one is due (Primary only, one at a time).
    fn maybe_check_cloud(&mut self) {
        if matches!(&*self.cloud, ClusterCloud::None)
            || self.role() != Role::Primary
            || self.cloud_check_running
        {
            if self.role() != Role::Primary {
                self.next_cloud_check = None;
            }
            return;
        }
        let now = Instant::now();
        // The first cycle a few seconds after becoming Primary (activation just set everything).
        let due = *self
            .next_cloud_check
            .get_or_insert(now + Duration::from_secs(5).min(self.cloud_check_every));
        if now < due {
            return;
        }
        self.cloud_check_running = true;
        self.next_cloud_check = Some(now + self.cloud_check_every);
        let cloud = self.cloud.clone();
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let t0 = Instant::now();
            let r = cloud.check().await;
            let _ = tx.send(Msg::CloudChecked(r, t0.elapsed())).await;
        });
    }

    fn cloud_checked(&mut self, r: CheckReport, elapsed: Duration) {
        self.cloud_check_running = false;
        let items = r
            .items
            .iter()
            .map(|(res, h)| {
                let (health, detail) = match h {
                    crate::cloud::Health::Ok => ("ok", String::new()),
                    crate::cloud::Health::Drift(d) => ("drift", d.clone()),
                    crate::cloud::Health::Unknown(d) => ("unknown", d.clone()),
                };
                if health == "drift" {
                    tracing::warn!(resource = %res, %detail, "cloud resource drifted from this node");
                }
                CloudItem {
                    resource: res.to_string(),
                    health,
                    detail,
                }
            })
            .collect();
        self.cloud_check = Some(CloudCheck {
            unix_ms: unix_ms(),
            elapsed_ms: elapsed.as_millis() as u64,
            items,
            repairs: r.repairs.iter().map(|x| x.to_string()).collect(),
        });
    }

    /// A volume's disk failed and its policy is `failover`: hand the service over to a peer
    /// that can take it (alive, Secondary, UpToDate); until then the volume keeps serving
    /// through the peer's copy.
    async fn fail_over_a_failed_disk(&mut self) {
        if self.role() != Role::Primary || !self.volumes.iter().any(|v| v.wants_failover()) {
            return;
        }
        let PeerView::Alive(s) = self.monitor.view() else {
            return;
        };
        if s.role != Role::Secondary || s.disk != DiskState::UpToDate || s.cannot_promote {
            return;
        }
        self.controller.stand_down();
        self.demote("this node's disk failed (on_disk_error = \"failover\"): handing the service over to the peer").await;
    }

    async fn tick(&mut self) {
        self.maybe_check_cloud();
        self.fail_over_a_failed_disk().await;
        self.advertise();
        let now = self.now();
        for ev in self.monitor.tick(now) {
            self.log_event(ev);
        }
        self.check_application().await;
        let peer = self.monitor.view();
        let intent_acked = match (peer, self.announcer.lock()) {
            (PeerView::Alive(s), Ok(a)) => a.intent_acked(&s),
            _ => false,
        };
        let inputs = Inputs {
            now,
            role: self.role(),
            disk: self.disk(),
            peer,
            witness: self.witness,
            heard_since_start: self.monitor.heard_since_start(),
            newest: self.newest(),
            link_connected: self.link_connected(),
            intent_acked,
            copies_compared: self
                .volumes
                .iter()
                .filter(|v| v.status().replication.is_some())
                .all(|v| v.link_connected()),
        };
        let before = self.controller.reason().to_string();
        let was_yielding = self.controller.yielding();
        let action = self.controller.decide(inputs);
        if self.controller.reason() != before {
            tracing::info!(decision = self.controller.reason(), "decision");
        }
        if was_yielding != self.controller.yielding() {
            // The stand-down ended (the peer serves): persisted in role.json.
            self.publish();
        }
        // An announcement raised or withdrawn goes out at once.
        self.advertise();
        match action {
            Action::None => {}
            Action::Fence => {
                tracing::warn!("fencing the peer");
                let cloud = self.cloud.clone();
                let tx = self.tx.clone();
                tokio::spawn(async move {
                    let r = cloud.fence_peer().await;
                    let _ = tx.send(Msg::Fenced(r)).await;
                });
            }
            Action::QueryPeer => {
                tracing::warn!("peer lost with fence = \"off\": asking the cloud whether the peer instance is stopped");
                let cloud = self.cloud.clone();
                let tx = self.tx.clone();
                tokio::spawn(async move {
                    let r = cloud.peer_instance().await;
                    let _ = tx.send(Msg::PeerInstance(r)).await;
                });
            }
            Action::Promote => {
                let why = self.controller.reason().to_string();
                let force = self.controller.promotion_forced();
                let peer_down = matches!(
                    self.controller.fence_state(),
                    FenceState::Fenced | FenceState::PeerStopped(_)
                );
                self.promote(force, &why).await;
                if self.role() == Role::Primary {
                    if peer_down {
                        // The old Primary is stopped: nothing this node writes alone can be
                        // lost by its promotion, so no write waits for it (and the fact is
                        // recorded for the start-up gate).
                        for v in self.volumes.iter_mut() {
                            v.peer_outdated();
                        }
                    }
                    self.controller.clear_operator_flags();
                    self.publish();
                }
            }
            Action::Demote => {
                let why = self.controller.reason().to_string();
                self.demote(&why).await;
            }
        }
    }

    fn log_event(&mut self, ev: Event) {
        match ev {
            Event::PathUp(i) => {
                tracing::info!(path = %self.cfg.heartbeats[i].name, "heartbeat path up")
            }
            Event::PathDown(i) => {
                let up = self.monitor.paths().iter().filter(|p| p.up).count();
                tracing::warn!(path = %self.cfg.heartbeats[i].name, paths_up = up, "heartbeat path DOWN")
            }
            Event::PeerFound => {
                self.peer_lost_at = None;
                tracing::info!(peer = %self.cfg.peer, "peer found")
            }
            Event::PeerLost => {
                self.peer_lost_at = Some(Instant::now());
                tracing::warn!(peer = %self.cfg.peer, "PEER LOST: no heartbeat on any path")
            }
            Event::TwoSenders { earlier, current } => self.misconfigured(format!(
                "two processes send heartbeats as node {} (incarnations {earlier:016x} and {current:016x}): a second daemon runs with the peer's configuration, or old datagrams are replayed",
                self.cfg.peer
            )),
        }
    }
}

fn bind_udp(addr: SocketAddr) -> Result<UdpSocket, DaemonError> {
    let s = std::net::UdpSocket::bind(addr).map_err(setup_err(
        format!("cannot bind heartbeat socket {addr}"),
        "check cluster.heartbeat[].local is an address of this node and the port is free",
    ))?;
    s.set_nonblocking(true)
        .map_err(setup_err("heartbeat socket".into(), "report a bug"))?;
    UdpSocket::from_std(s).map_err(setup_err("heartbeat socket".into(), "report a bug"))
}

fn bind_control(path: &Path) -> Result<UnixListener, DaemonError> {
    use crate::ops::private_socket::{bind_private, BindError};
    bind_private(path).map_err(|e| match e {
        BindError::InUse => DaemonError::Setup {
            what: format!("control socket {}", path.display()),
            source: std::io::Error::from(std::io::ErrorKind::AddrInUse),
            fix: "another twinvol daemon uses it; stop it or set cluster.control_socket",
        },
        BindError::CreateDir(source) => DaemonError::Setup {
            what: format!("cannot create {}", path.parent().unwrap_or(path).display()),
            source,
            fix: "check permissions",
        },
        BindError::Bind(source) => DaemonError::Setup {
            what: format!("cannot bind control socket {}", path.display()),
            source,
            fix: "check the directory exists and is writable",
        },
        BindError::Chmod(source) => DaemonError::Setup {
            what: format!("cannot chmod 0600 {}", path.display()),
            source,
            fix: "check permissions",
        },
    })
}

async fn build_cloud(cfg: &Config, cl: &ClusterConfig) -> Result<ClusterCloud, DaemonError> {
    if let Some(lab) = &cl.lab {
        return Ok(ClusterCloud::Lab(LabCloud::new(
            &cfg.node.id,
            &cl.peer,
            lab.clone(),
        )));
    }
    if let Some(c) = &cfg.cloud {
        let aws = crate::cloud::aws::AwsCloud::connect(c)
            .await
            .map_err(|e| DaemonError::Cloud(e.to_string()))?;
        return Ok(ClusterCloud::Aws(Box::new(aws)));
    }
    Ok(ClusterCloud::None)
}

/// Builds the volumes of a config: a [`MirroredControl`] for each `[[volume]]` with a
/// `[volume.replication]` table (opened now: device, metadata and key are checked at start),
/// a [`LocalVolume`] for the others. All start Secondary.
pub fn build_volumes(cfg: &Config) -> Result<Vec<Box<dyn VolumeControl>>, DaemonError> {
    let mut out: Vec<Box<dyn VolumeControl>> = Vec::new();
    for v in &cfg.volumes {
        if v.replication.is_some() {
            let m = MirroredControl::open(&cfg.node.id, v.clone()).map_err(DaemonError::Volume)?;
            out.push(Box::new(m));
        } else {
            out.push(Box::new(LocalVolume::new(v.clone())));
        }
    }
    Ok(out)
}

/// Runs the daemon until SIGTERM/SIGINT (then tears the service down if Primary).
/// Starts the HTTP health endpoint of every Route 53 record in failover-routing mode (one per
/// distinct port); Route 53 health checks probe it and get 200 only while this node is Primary.
async fn start_health_endpoints(
    cfg: &Config,
) -> Result<crate::ops::health::HealthState, DaemonError> {
    use crate::ops::health::{HealthServer, HealthState};
    let state = HealthState::default();
    let mut ports = Vec::new();
    for r in cfg.cloud.iter().flat_map(|c| c.records.iter()) {
        let Some(fo) = &r.failover else { continue };
        if ports.contains(&fo.health_port) {
            continue;
        }
        ports.push(fo.health_port);
        let addr = SocketAddr::from(([0, 0, 0, 0], fo.health_port));
        let server = HealthServer::bind(addr, &fo.health_path, state.clone())
            .await
            .map_err(|e| {
                let source = match e {
                    crate::ops::health::HealthError::Bind { source, .. } => source,
                };
                DaemonError::Setup {
                    what: format!("cannot listen for Route 53 health checks on {addr}"),
                    source,
                    fix: "free the port or change failover.health_port of the cloud.route53 record",
                }
            })?;
        tracing::info!(%addr, path = %fo.health_path, "Route 53 health endpoint listening");
        tokio::spawn(server.run());
    }
    Ok(state)
}

/// Starts the OpenMetrics endpoint: every scrape asks the control loop for a fresh status.
async fn start_metrics(addr: SocketAddr, tx: mpsc::Sender<Msg>) -> Result<(), DaemonError> {
    use crate::ops::metrics::{MetricsError, MetricsServer, Scrape};
    let source = move || -> Scrape {
        let tx = tx.clone();
        Box::pin(async move {
            let (otx, orx) = oneshot::channel();
            tx.send(Msg::Control(Request::Status, otx))
                .await
                .map_err(|_| "the daemon is stopping".to_string())?;
            let a = orx
                .await
                .map_err(|_| "the daemon is stopping".to_string())?;
            Ok(crate::ops::metrics::render_node(&a.status))
        })
    };
    let server = MetricsServer::bind(addr, Arc::new(source))
        .await
        .map_err(|e| match e {
            MetricsError::Bind { source, .. } => DaemonError::Setup {
                what: format!("cannot listen for metrics scrapes on {addr}"),
                source,
                fix: "free the port or change cluster.metrics_listen",
            },
        })?;
    tracing::info!(%addr, "OpenMetrics endpoint listening on /metrics");
    tokio::spawn(server.run());
    Ok(())
}

pub async fn run(cfg: Config) -> Result<(), DaemonError> {
    let cl = cfg.cluster.clone().ok_or(DaemonError::NoCluster)?;
    let key: Arc<PreSharedKey> = Arc::new(crate::repl::link::keyfile::load_key_file(&cl.key_file)?);
    std::fs::create_dir_all(&cl.state_dir).map_err(setup_err(
        format!("cannot create state_dir {}", cl.state_dir.display()),
        "check cluster.state_dir and permissions",
    ))?;
    // The volumes first: their devices are claimed, so a second daemon pointed at them by
    // mistake stops here, before it sends a heartbeat or touches the pid file.
    let volumes = build_volumes(&cfg)?;
    let control = bind_control(&cl.control_socket)?;
    let pid_file = cl.state_dir.join("twinvol.pid");
    std::fs::write(&pid_file, std::process::id().to_string()).map_err(setup_err(
        format!("cannot write {}", pid_file.display()),
        "check cluster.state_dir permissions",
    ))?;
    let previous: Option<RoleFile> = std::fs::read_to_string(cl.state_dir.join("role.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    if let Some(p) = &previous {
        tracing::info!(previous_role = ?p.role, yielding = p.yielding, "starting as Secondary (role before the restart shown)");
    }

    let sockets: Vec<Arc<UdpSocket>> = cl
        .heartbeats
        .iter()
        .map(|h| bind_udp(h.local).map(Arc::new))
        .collect::<Result<_, _>>()?;
    let cloud = Arc::new(build_cloud(&cfg, &cl).await?);

    let (tx, mut rx) = mpsc::channel::<Msg>(1024);
    let (advert_tx, mut advert_rx) = watch::channel(Advert {
        role: Role::Secondary,
        disk: DiskState::UpToDate,
        flags: 0,
        nudge: 0,
    });
    let announcer = {
        let mut incarnation = [0u8; 8];
        let _ = getrandom::fill(&mut incarnation);
        let incarnation = u64::from_be_bytes(incarnation) ^ unix_ms();
        Arc::new(std::sync::Mutex::new(Announcer::new(
            &cfg.node.id,
            cl.priority,
            incarnation,
        )))
    };

    // Heartbeat sender: one round per interval, and one at once when the advertised state
    // changes; the same sequence number on every path.
    {
        let sockets = sockets.clone();
        let key = key.clone();
        let paths: Vec<SocketAddr> = cl.heartbeats.iter().map(|h| h.peer).collect();
        let interval = cl.interval();
        let announcer = announcer.clone();
        tokio::spawn(async move {
            let mut t = tokio::time::interval(interval);
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = t.tick() => {}
                    changed = advert_rx.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        // The next periodic round counts from this one.
                        t.reset();
                    }
                }
                let a = *advert_rx.borrow_and_update();
                let round = match announcer.lock() {
                    Ok(mut ann) => ann.next_round(a.role, a.disk, a.flags),
                    Err(_) => return,
                };
                for (i, (s, peer)) in sockets.iter().zip(&paths).enumerate() {
                    let hb = Heartbeat {
                        path: i as u8,
                        ..round.clone()
                    };
                    let bytes = heartbeat::encode(&hb, &key);
                    if let Err(e) = s.send_to(&bytes, peer).await {
                        tracing::debug!(path = i, error = %e, "heartbeat send failed");
                    }
                }
            }
        });
    }
    // Receivers: a datagram counts only if its MAC verifies, from the configured peer address
    // on that path, with the peer's node id and that path's index. An authenticated one that
    // fails the rest is a misconfiguration (another node with this cluster's key, a wrong
    // address, or a second daemon), reported rather than ignored.
    for (i, s) in sockets.iter().enumerate() {
        let s = s.clone();
        let key = key.clone();
        let tx = tx.clone();
        let want_peer = cl.heartbeats[i].peer;
        let path_name = cl.heartbeats[i].name.clone();
        let peer_id = cl.peer.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            loop {
                let Ok((n, from)) = s.recv_from(&mut buf).await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let msg = match heartbeat::decode(&buf[..n], &key) {
                    Ok(hb) if from.ip() != want_peer.ip() => Msg::Misconfigured(i, format!(
                        "path {path_name}: an authenticated heartbeat of node {:?} came from {from}, but cluster.heartbeat[{i}].peer is {want_peer}: another node uses this cluster's key, or the peer's address is configured wrong",
                        hb.node_id
                    )),
                    Ok(hb) if hb.node_id != peer_id || hb.path as usize != i => Msg::Misconfigured(i, format!(
                        "path {path_name}: an authenticated heartbeat from {from} says node {:?} on path {}, expected node {peer_id:?} on path {i}: check cluster.peer and the order of [[cluster.heartbeat]] on both nodes",
                        hb.node_id, hb.path
                    )),
                    Ok(hb) => Msg::Heartbeat(i, Ok(hb)),
                    Err(e) => Msg::Heartbeat(i, Err(format!("from {from}: {e}"))),
                };
                if tx.send(msg).await.is_err() {
                    return;
                }
            }
        });
    }
    // Witness prober.
    if !cl.witness.targets.is_empty() {
        let tls = if cl.witness.targets.iter().any(|t| t.starts_with("https://"))
            || cl.witness.ca_file.is_some()
        {
            Some(witness::Tls::load(cl.witness.ca_file.as_deref()).map_err(DaemonError::Witness)?)
        } else {
            None
        };
        let tx = tx.clone();
        let targets = cl.witness.targets.clone();
        let timeout = Duration::from_millis(cl.witness.timeout_ms);
        let interval = Duration::from_millis(cl.witness.interval_ms);
        tokio::spawn(async move {
            loop {
                let (ok, probes) = witness::probe_all(&targets, timeout, tls.as_ref()).await;
                if tx.send(Msg::Witness(ok, probes)).await.is_err() {
                    return;
                }
                tokio::time::sleep(interval).await;
            }
        });
    }
    // Control socket.
    {
        let tx = tx.clone();
        tokio::spawn(async move {
            loop {
                let Ok((conn, _)) = control.accept().await else {
                    continue;
                };
                let tx = tx.clone();
                tokio::spawn(async move {
                    let (r, mut w) = conn.into_split();
                    let mut line = String::new();
                    if BufReader::new(r).read_line(&mut line).await.is_err() {
                        return;
                    }
                    let answer = match serde_json::from_str::<Request>(&line) {
                        Ok(req) => {
                            let (otx, orx) = oneshot::channel();
                            if tx.send(Msg::Control(req, otx)).await.is_err() {
                                return;
                            }
                            match orx.await {
                                Ok(a) => a,
                                Err(_) => return,
                            }
                        }
                        Err(e) => Answer {
                            ok: false,
                            message: format!("bad request: {e}; send {{\"cmd\":\"status\"}}"),
                            status: serde_json::Value::Null,
                        },
                    };
                    if let Ok(mut text) = serde_json::to_string(&answer) {
                        text.push('\n');
                        let _ = w.write_all(text.as_bytes()).await;
                    }
                });
            }
        });
    }

    let hooks = Hooks {
        start: cl.hooks.start.clone(),
        stop: cl.hooks.stop.clone(),
        timeout: Duration::from_millis(cl.hooks.timeout_ms),
        env: vec![
            ("TWINVOL_NODE".into(), cfg.node.id.clone()),
            (
                "TWINVOL_VOLUMES".into(),
                cfg.volumes
                    .iter()
                    .map(|v| v.name.as_str())
                    .collect::<Vec<_>>()
                    .join(" "),
            ),
        ],
    };
    let params = Params {
        priority: cl.priority,
        peer_priority: cl.peer_priority,
        fence: cl.fence,
        fence_delay: Duration::from_millis(cl.fence_delay_ms),
        fence_retry: Duration::from_secs(5),
        isolation_grace: Duration::from_millis(cl.witness.isolation_grace_ms),
        switchback: cl.switchback,
    };
    let mut controller = Controller::new(params);
    if previous.as_ref().is_some_and(|p| p.yielding) {
        controller.stand_down();
    }
    if let Some(addr) = cl.metrics_listen {
        start_metrics(addr, tx.clone()).await?;
    }
    let mut node = Node {
        node_id: cfg.node.id.clone(),
        volumes,
        cloud,
        hooks,
        monitor: PeerMonitor::new(cl.heartbeats.len(), cl.timeout()),
        controller,
        witness: if cl.witness.targets.is_empty() {
            WitnessView::Disabled
        } else {
            WitnessView::Unknown
        },
        probes: vec![],
        start: Instant::now(),
        last_sequence: None,
        primary_since: None,
        peer_lost_at: None,
        last_failover_ms: None,
        failovers: 0,
        cloud_check: None,
        leaving: false,
        next_cloud_check: None,
        cloud_check_running: false,
        cloud_check_every: Duration::from_secs(
            cfg.cloud
                .as_ref()
                .map_or(30, |c| c.monitor.interval_s.max(1)),
        ),
        previous_role: previous.map(|p| p.role),
        advert: advert_tx,
        next_check: None,
        tx,
        cfg: cl.clone(),
        health: start_health_endpoints(&cfg).await?,
        announcer,
        peer_state: None,
        misconfigured: Vec::new(),
    };
    node.publish();
    tracing::info!(node = %node.node_id, peer = %cl.peer, priority = cl.priority, paths = cl.heartbeats.len(), "twinvol daemon running");
    // Sockets bound, volumes built, role decided (Secondary until the controller says otherwise).
    let mut sm = crate::ops::notify::ServiceManager::from_env();
    sm.ready(&node.sd_status());
    let watchdog_on = sm.ping_interval().is_some();
    let mut watchdog =
        tokio::time::interval(sm.ping_interval().unwrap_or(Duration::from_secs(3600)));
    watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // A bring-up or teardown waits on hooks (each bounded by hooks.timeout_ms) and cloud calls;
    // the watchdog is fed meanwhile, but not past this bound.
    let operation_limit = Duration::from_millis(cl.hooks.timeout_ms) * 4 + Duration::from_secs(120);

    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())
        .map_err(setup_err("signal handler".into(), "report a bug"))?;
    let mut int = signal(SignalKind::interrupt())
        .map_err(setup_err("signal handler".into(), "report a bug"))?;
    let mut ticker = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = watchdog.tick(), if watchdog_on => sm.watchdog(),
            _ = ticker.tick() => sm.fed_while(operation_limit, node.tick()).await,
            Some(m) = rx.recv() => match m {
                Msg::Heartbeat(i, Ok(hb)) => node.on_heartbeat(i, hb),
                Msg::Heartbeat(i, Err(why)) => {
                    node.monitor.refused(i);
                    tracing::debug!(path = i, %why, "heartbeat refused");
                }
                Msg::Misconfigured(i, what) => {
                    node.monitor.refused(i);
                    node.misconfigured(what);
                }
                Msg::Witness(ok, probes) => {
                    node.witness = match (ok, node.witness) {
                        (true, _) => WitnessView::Reachable,
                        (false, w @ WitnessView::Unreachable { .. }) => w,
                        (false, _) => {
                            tracing::warn!("no witness target reachable");
                            WitnessView::Unreachable { since: node.now() }
                        }
                    };
                    node.probes = probes;
                }
                Msg::Fenced(report) => {
                    let ok = report.succeeded();
                    tracing::warn!(report = %report.to_string().replace('\n', "; "), ok, "fencing finished");
                    let r = if ok { Ok(()) } else { Err(report.failures().map(|f| f.to_string()).collect::<Vec<_>>().join("; ")) };
                    node.controller.fence_done(node.now(), r);
                }
                Msg::CloudChecked(report, elapsed) => node.cloud_checked(report, elapsed),
                Msg::PeerInstance(answer) => {
                    tracing::warn!(?answer, "peer instance state");
                    node.controller.peer_instance_done(node.now(), answer);
                }
                Msg::Control(req, reply) => {
                    let a = sm.fed_while(operation_limit, node.control(req)).await;
                    let _ = reply.send(a);
                }
            },
        }
        sm.status(&node.sd_status());
    }
    tracing::info!("stopping");
    sm.stopping(&format!("stopping: {}", node.sd_status()));
    // A clean stop stands down first: the peer hears "Secondary, stands down" and takes the
    // service without fencing this instance (a vanished Primary would be fenced).
    node.leaving = true;
    if node.role() == Role::Primary {
        let peer_can_take_over =
            matches!(node.monitor.view(), PeerView::Alive(_)) || node.link_connected();
        let why = if peer_can_take_over {
            "daemon stopping: handing the service over to the peer"
        } else {
            // Nobody to hand over to: the service stops here, and this copy is recorded as
            // the newest so that this node may start it again alone.
            for v in node.volumes.iter_mut() {
                if let Err(e) = tokio::task::block_in_place(|| v.record_clean_primary_stop()) {
                    tracing::error!(error = %e, "cannot record the clean stop of the Primary");
                }
            }
            "daemon stopping with no peer to hand the service over to: the service stops"
        };
        sm.fed_while(operation_limit, node.demote(why)).await;
    } else {
        node.publish();
    }
    if matches!(node.monitor.view(), PeerView::Alive(_)) {
        // Keep heartbeating (the sender task runs on) and answering the peer's heartbeats
        // (it announces its promotion and waits for this node's acknowledgement) until the
        // peer serves, or a heartbeat timeout has passed.
        let linger = Duration::from_millis(
            cl.heartbeat_timeout_ms
                .max(cl.heartbeat_interval_ms.saturating_mul(2)),
        );
        tracing::info!(
            linger_ms = linger.as_millis() as u64,
            "standing down: waiting for the peer to take the service before exit"
        );
        let deadline = tokio::time::Instant::now() + linger;
        let mut seen_heartbeat = false;
        loop {
            let peer_serves =
                matches!(node.monitor.view(), PeerView::Alive(s) if s.role == Role::Primary);
            // Judged on a heartbeat processed since the stop began, not on an older one.
            if peer_serves && seen_heartbeat {
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => break,
                Some(m) = rx.recv() => match m {
                    Msg::Heartbeat(i, Ok(hb)) => {
                        node.on_heartbeat(i, hb);
                        seen_heartbeat = true;
                    }
                    Msg::Control(_, reply) => {
                        let _ = reply.send(node.answer(false, "the daemon is stopping"));
                    }
                    _ => {}
                },
            }
        }
    }
    let _ = std::fs::remove_file(&cl.control_socket);
    let _ = std::fs::remove_file(&pid_file);
    Ok(())
}

/// The control socket of a config file (for the `status`/`promote`/... subcommands).
pub fn control_socket_of(config: &Path) -> Result<PathBuf, anyhow::Error> {
    let cfg = Config::load(config)?;
    cfg.cluster.map(|c| c.control_socket).ok_or_else(|| {
        anyhow::anyhow!("{} has no [cluster] table; pass --socket", config.display())
    })
}
