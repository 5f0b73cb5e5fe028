//! The `lab` provider: a cloud for one machine. Fencing stops the peer daemon found through
//! its pid file (as StopInstances stops an instance); activation and deactivation change
//! nothing and append the plan of network changes they would apply (VIP route, EIP, DNS
//! record) to a plan file, one JSON line per action, and keep it in memory for status.
//!
//! Invariant: fencing reports success only when the peer process is gone (or a zombie), so a
//! success is proof the peer no longer serves; a pid that is not a twinvol process is never
//! signalled.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{CheckReport, Outcome, Report, Resource, ResourceReport, UnreachableAction};
use crate::config::cluster::LabConfig;

/// The lab provider of one node.
pub struct LabCloud {
    node: String,
    peer: String,
    cfg: LabConfig,
    plan: Mutex<Vec<String>>,
}

fn alive(pid: i32) -> bool {
    // A zombie has stopped running; it only waits for its parent to reap it.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

fn is_twinvol(pid: i32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| {
            c.split(|&b| b == 0).next().is_some_and(|argv0| {
                Path::new(std::str::from_utf8(argv0).unwrap_or(""))
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("twinvol"))
            })
        })
        .unwrap_or(false)
}

impl LabCloud {
    /// The provider of node `node` whose peer is `peer`.
    pub fn new(node: &str, peer: &str, cfg: LabConfig) -> Self {
        Self {
            node: node.into(),
            peer: peer.into(),
            cfg,
            plan: Mutex::new(Vec::new()),
        }
    }

    /// The plan lines recorded so far.
    pub fn plan(&self) -> Vec<String> {
        self.plan.lock().map(|p| p.clone()).unwrap_or_default()
    }

    fn record(&self, action: &str, lines: &[String]) -> Result<(), String> {
        let entry = serde_json::json!({
            "node": self.node,
            "action": action,
            "unix_ms": std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            "changes": lines,
        });
        if let Ok(mut p) = self.plan.lock() {
            p.extend(lines.iter().cloned());
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.cfg.plan_file)
            .map_err(|e| {
                format!(
                    "cannot open plan file {}: {e}",
                    self.cfg.plan_file.display()
                )
            })?;
        writeln!(f, "{entry}").map_err(|e| format!("cannot write plan file: {e}"))
    }

    fn changes(&self, activate: bool) -> Vec<(Resource, String)> {
        let mut out = Vec::new();
        let vip = self
            .cfg
            .vip
            .clone()
            .unwrap_or_else(|| "192.168.100.10".into());
        if activate {
            out.push((
                Resource::RouteTable("rtb-lab".into()),
                format!(
                    "ReplaceRoute {vip}/32 -> eni-{} (was eni-{})",
                    self.node, self.peer
                ),
            ));
            out.push((
                Resource::ElasticIp("eipalloc-lab".into()),
                format!("AssociateAddress -> eni-{} (AllowReassociation)", self.node),
            ));
            if let Some(r) = &self.cfg.record {
                out.push((
                    Resource::DnsRecord(r.clone()),
                    format!("UPSERT A {r} -> {vip}, then wait for INSYNC"),
                ));
            }
        } else {
            out.push((
                Resource::ElasticIp("eipalloc-lab".into()),
                format!(
                    "leave associated with eni-{} until the peer takes it",
                    self.node
                ),
            ));
        }
        out
    }

    fn apply(&self, activate: bool) -> Report {
        let t0 = Instant::now();
        let changes = self.changes(activate);
        let lines: Vec<String> = changes.iter().map(|(r, c)| format!("{r}: {c}")).collect();
        let written = self.record(if activate { "activate" } else { "deactivate" }, &lines);
        for l in &lines {
            tracing::info!(plan = %l, "lab cloud: would apply");
        }
        let items = changes
            .into_iter()
            .map(|(r, c)| {
                let outcome = match &written {
                    Ok(()) => Outcome::Applied(format!("planned: {c}")),
                    Err(e) => Outcome::Failed(e.clone()),
                };
                ResourceReport::new(r, outcome, t0.elapsed())
            })
            .collect();
        Report {
            items,
            elapsed: t0.elapsed(),
        }
    }

    /// Stops the peer: SIGKILL to the pid in the pid file, then waits until it is gone.
    pub fn fence_sync(&self, deadline: Duration) -> Report {
        let t0 = Instant::now();
        let res = Resource::Instance(format!("lab:{}", self.peer));
        let outcome = fence_pid_file(&self.cfg.peer_pid_file, deadline);
        let _ = self.record(
            "fence",
            &[format!(
                "{res}: {}",
                match &outcome {
                    Outcome::Applied(s) => s.clone(),
                    Outcome::Unchanged => "already stopped".into(),
                    Outcome::Failed(s) => format!("FAILED: {s}"),
                }
            )],
        );
        Report {
            items: vec![ResourceReport::new(res, outcome, t0.elapsed())],
            elapsed: t0.elapsed(),
        }
    }
}

fn fence_pid_file(pid_file: &PathBuf, deadline: Duration) -> Outcome {
    let text = match std::fs::read_to_string(pid_file) {
        Ok(t) => t,
        // No pid file: the peer daemon is not running (it writes the file at start).
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Outcome::Unchanged,
        Err(e) => {
            return Outcome::Failed(format!(
                "cannot read the peer pid file {}: {e}; fix its permissions",
                pid_file.display()
            ))
        }
    };
    let Ok(pid) = text.trim().parse::<i32>() else {
        return Outcome::Failed(format!(
            "peer pid file {} does not hold a pid ({:?})",
            pid_file.display(),
            text.trim()
        ));
    };
    if pid <= 1 {
        return Outcome::Failed(format!(
            "peer pid file {} holds pid {pid}",
            pid_file.display()
        ));
    }
    if !alive(pid) {
        return Outcome::Unchanged;
    }
    if !is_twinvol(pid) {
        // The pid was reused by an unrelated process: the peer daemon is gone.
        return Outcome::Unchanged;
    }
    if let Err(e) = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    ) {
        if e != nix::errno::Errno::ESRCH {
            return Outcome::Failed(format!("cannot stop peer pid {pid}: {e}"));
        }
    }
    let t0 = Instant::now();
    while alive(pid) {
        if t0.elapsed() >= deadline {
            return Outcome::Failed(format!(
                "peer pid {pid} still running {} ms after SIGKILL",
                deadline.as_millis()
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Outcome::Applied(format!("stopped peer process {pid} (SIGKILL)"))
}

impl super::Cloud for LabCloud {
    async fn activate(&self) -> Report {
        self.apply(true)
    }
    async fn deactivate(&self) -> Report {
        self.apply(false)
    }
    async fn check(&self) -> CheckReport {
        CheckReport {
            items: vec![],
            repairs: vec![],
            on_unreachable: UnreachableAction::Warn,
        }
    }
    async fn fence_peer(&self) -> Report {
        tokio::task::block_in_place(|| self.fence_sync(Duration::from_secs(10)))
    }
    async fn peer_instance(&self) -> super::PeerInstance {
        let r = self.peer_instance_sync();
        let _ = self.record("peer-instance", &[format!("lab:{}: {r:?}", self.peer)]);
        r
    }
}

impl LabCloud {
    /// The peer "instance" state from its pid file: stopped when no twinvol process holds it.
    pub fn peer_instance_sync(&self) -> super::PeerInstance {
        use super::PeerInstance;
        let f = &self.cfg.peer_pid_file;
        let text = match std::fs::read_to_string(f) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return PeerInstance::Stopped(format!("no pid file {}", f.display()))
            }
            Err(e) => return PeerInstance::Unknown(format!("cannot read {}: {e}", f.display())),
        };
        match text.trim().parse::<i32>() {
            Ok(pid) if pid > 1 && alive(pid) && is_twinvol(pid) => {
                PeerInstance::Running(format!("peer process {pid} is running"))
            }
            Ok(pid) if pid > 1 => PeerInstance::Stopped(format!("peer process {pid} is gone")),
            _ => PeerInstance::Unknown(format!(
                "peer pid file {} does not hold a pid ({:?})",
                f.display(),
                text.trim()
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lab(dir: &Path) -> LabCloud {
        LabCloud::new(
            "node-b",
            "node-a",
            LabConfig {
                peer_pid_file: dir.join("a.pid"),
                plan_file: dir.join("plan.jsonl"),
                vip: Some("10.9.9.9".into()),
                record: Some("db.lab.".into()),
            },
        )
    }

    #[test]
    fn fencing_without_a_pid_file_reports_the_peer_already_stopped() {
        let d = tempfile::tempdir().unwrap();
        let r = lab(d.path()).fence_sync(Duration::from_secs(1));
        assert!(r.succeeded());
        assert_eq!(r.items[0].outcome, Outcome::Unchanged);
    }

    #[test]
    fn a_pid_that_is_not_twinvol_is_never_signalled() {
        let d = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        std::fs::write(d.path().join("a.pid"), child.id().to_string()).unwrap();
        let r = lab(d.path()).fence_sync(Duration::from_secs(1));
        assert_eq!(r.items[0].outcome, Outcome::Unchanged);
        assert!(child.try_wait().unwrap().is_none(), "sleep must still run");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn garbage_in_the_pid_file_fails_fencing_with_the_file_named() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("a.pid"), "not a pid").unwrap();
        let r = lab(d.path()).fence_sync(Duration::from_secs(1));
        assert!(!r.succeeded());
        assert!(r.to_string().contains("a.pid"), "{r}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn activation_records_the_plan_and_changes_nothing() {
        use crate::cloud::Cloud;
        let d = tempfile::tempdir().unwrap();
        let l = lab(d.path());
        let r = l.activate().await;
        assert!(r.succeeded());
        let text = std::fs::read_to_string(d.path().join("plan.jsonl")).unwrap();
        assert!(
            text.contains("ReplaceRoute 10.9.9.9/32 -> eni-node-b"),
            "{text}"
        );
        assert!(text.contains("UPSERT A db.lab."), "{text}");
        assert_eq!(l.plan().len(), 3);
    }
}
