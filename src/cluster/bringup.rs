//! Ordered bring-up on promotion and teardown in reverse, each step timed and logged.
//!
//! Bring-up: volumes Primary -> NBD exports -> kernel attach and filesystem mount (where
//! configured, [`super::mount`]) -> application start hook -> cloud activation.
//! Teardown: cloud deactivation -> application stop hook -> unmount and detach -> exports
//! stopped -> volumes Secondary.
//!
//! Invariant: a failed bring-up step stops the sequence, names the step, and undoes every
//! step already done, so the node is left safe: no volume exported or Primary, and no cloud
//! change (cloud activation is the last step, so a failure before it never touched the cloud).

use std::time::{Duration, Instant};

use super::volume::VolumeControl;
use crate::cloud::Cloud;

/// One timed step.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Step {
    /// What ("promote data", "export data", "hook start", "cloud activate", ...).
    pub name: String,
    /// Whether it succeeded.
    pub ok: bool,
    /// Milliseconds it took.
    pub elapsed_ms: u64,
    /// What happened (URI, hook output, cloud report, error).
    pub detail: String,
}

/// The record of one bring-up or teardown.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Sequence {
    /// "bring-up" or "teardown".
    pub kind: String,
    /// Steps in the order run (undo steps after a failure included).
    pub steps: Vec<Step>,
    /// The step that failed, if any.
    pub failed_at: Option<String>,
    /// Total milliseconds.
    pub elapsed_ms: u64,
}

impl Sequence {
    /// True when no step failed.
    pub fn succeeded(&self) -> bool {
        self.failed_at.is_none()
    }
}

/// The outcome of a hook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HookResult {
    /// Exit status 0; the output's last line.
    Ok(String),
    /// Non-zero exit, signal, timeout or spawn failure; the reason.
    Failed(String),
}

/// Runs `sh -c cmd` with the given environment; killed after `timeout`.
pub async fn run_hook(
    name: &str,
    cmd: &str,
    env: &[(String, String)],
    timeout: Duration,
) -> HookResult {
    let mut c = tokio::process::Command::new("/bin/sh");
    c.arg("-c").arg(cmd).kill_on_drop(true);
    c.stdin(std::process::Stdio::null());
    for (k, v) in env {
        c.env(k, v);
    }
    let child = match tokio::time::timeout(timeout, c.output()).await {
        Ok(Ok(o)) => o,
        Ok(Err(e)) => return HookResult::Failed(format!("hook {name} ({cmd}): cannot run: {e}")),
        Err(_) => {
            return HookResult::Failed(format!(
                "hook {name} ({cmd}): timed out after {} ms and was killed",
                timeout.as_millis()
            ))
        }
    };
    let last = |b: &[u8]| {
        String::from_utf8_lossy(b)
            .lines()
            .last()
            .unwrap_or("")
            .chars()
            .take(200)
            .collect::<String>()
    };
    if child.status.success() {
        HookResult::Ok(last(&child.stdout))
    } else {
        HookResult::Failed(format!(
            "hook {name} ({cmd}) failed: {}{}",
            child.status,
            match last(&child.stderr) {
                s if s.is_empty() => String::new(),
                s => format!(": {s}"),
            }
        ))
    }
}

/// The hooks and their time limit.
#[derive(Debug, Clone, Default)]
pub struct Hooks {
    /// Start (restore).
    pub start: Option<String>,
    /// Stop (remove).
    pub stop: Option<String>,
    /// Time limit of each.
    pub timeout: Duration,
    /// Environment passed to hooks.
    pub env: Vec<(String, String)>,
}

struct Recorder {
    seq: Sequence,
    start: Instant,
}

impl Recorder {
    fn new(kind: &str) -> Self {
        Self {
            seq: Sequence {
                kind: kind.into(),
                ..Default::default()
            },
            start: Instant::now(),
        }
    }
    fn push(&mut self, name: String, t0: Instant, r: Result<String, String>) -> bool {
        let elapsed_ms = t0.elapsed().as_millis() as u64;
        let ok = r.is_ok();
        let detail = match r {
            Ok(d) | Err(d) => d,
        };
        if ok {
            tracing::info!(step = %name, elapsed_ms, %detail, "{} step done", self.seq.kind);
        } else {
            tracing::error!(step = %name, elapsed_ms, %detail, "{} step FAILED", self.seq.kind);
            if self.seq.failed_at.is_none() {
                self.seq.failed_at = Some(name.clone());
            }
        }
        self.seq.steps.push(Step {
            name,
            ok,
            elapsed_ms,
            detail,
        });
        ok
    }
    fn finish(mut self) -> Sequence {
        self.seq.elapsed_ms = self.start.elapsed().as_millis() as u64;
        self.seq
    }
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Done {
    Nothing,
    Promoted(usize),
    Exported(usize),
    Mounted(usize),
    Started,
}

/// Brings the service up; on failure undoes what was done (see the module invariant).
pub async fn bring_up<C: Cloud>(
    volumes: &mut [Box<dyn VolumeControl>],
    hooks: &Hooks,
    cloud: Option<&C>,
    force: bool,
) -> Sequence {
    let mut rec = Recorder::new("bring-up");
    let mut done = Done::Nothing;
    // Volumes whose mount was tried (the last may be half done: attached, not mounted).
    let mut mounts_tried = 0;
    'up: {
        for (i, v) in volumes.iter_mut().enumerate() {
            let t0 = Instant::now();
            let r = tokio::task::block_in_place(|| v.promote(force));
            if !rec.push(
                format!("promote {}", v.name()),
                t0,
                r.map(|()| "Primary".into()).map_err(|e| e.to_string()),
            ) {
                break 'up;
            }
            done = Done::Promoted(i + 1);
        }
        for (i, v) in volumes.iter_mut().enumerate() {
            let t0 = Instant::now();
            let r = tokio::task::block_in_place(|| v.start_export());
            if !rec.push(
                format!("export {}", v.name()),
                t0,
                r.map_err(|e| e.to_string()),
            ) {
                break 'up;
            }
            done = Done::Exported(i + 1);
        }
        for (i, v) in volumes.iter_mut().enumerate() {
            let t0 = Instant::now();
            mounts_tried = i + 1;
            match tokio::task::block_in_place(|| v.mount()) {
                Ok(None) => {}
                Ok(Some(detail)) => {
                    rec.push(format!("mount {}", v.name()), t0, Ok(detail));
                }
                Err(e) => {
                    rec.push(format!("mount {}", v.name()), t0, Err(e.to_string()));
                    break 'up;
                }
            }
            done = Done::Mounted(i + 1);
        }
        if let Some(cmd) = &hooks.start {
            let t0 = Instant::now();
            let r = match run_hook("start", cmd, &hooks.env, hooks.timeout).await {
                HookResult::Ok(o) => Ok(o),
                HookResult::Failed(e) => Err(e),
            };
            if !rec.push("hook start".into(), t0, r) {
                break 'up;
            }
        }
        done = Done::Started;
        if let Some(c) = cloud {
            let t0 = Instant::now();
            let report = c.activate().await;
            let ok = report.succeeded();
            let text = report.to_string().replace('\n', "; ");
            if !rec.push(
                "cloud activate".into(),
                t0,
                if ok { Ok(text) } else { Err(text) },
            ) {
                break 'up;
            }
        }
        return rec.finish();
    }
    // Undo in reverse: what was done, and only that.
    if done >= Done::Started {
        if let Some(cmd) = &hooks.stop {
            let t0 = Instant::now();
            let r = match run_hook("stop", cmd, &hooks.env, hooks.timeout).await {
                HookResult::Ok(o) => Ok(o),
                HookResult::Failed(e) => Err(e),
            };
            rec.push("undo: hook stop".into(), t0, r);
        }
    }
    for v in volumes.iter_mut().take(mounts_tried).rev() {
        let t0 = Instant::now();
        if let Some(r) = tokio::task::block_in_place(|| v.unmount()).transpose() {
            rec.push(
                format!("undo: unmount {}", v.name()),
                t0,
                r.map_err(|e| e.to_string()),
            );
        }
    }
    let exported = match done {
        Done::Exported(n) => n,
        Done::Mounted(_) | Done::Started => volumes.len(),
        _ => 0,
    };
    for v in volumes.iter_mut().take(exported).rev() {
        let t0 = Instant::now();
        let r = tokio::task::block_in_place(|| v.stop_export());
        rec.push(
            format!("undo: stop export {}", v.name()),
            t0,
            r.map(|()| "stopped".into()).map_err(|e| e.to_string()),
        );
    }
    // Every volume that may be Primary is demoted (including the one whose promote failed).
    for v in volumes.iter_mut().rev() {
        let _ = tokio::task::block_in_place(|| v.stop_export());
        if v.role() == super::heartbeat::Role::Primary {
            let t0 = Instant::now();
            let r = tokio::task::block_in_place(|| v.demote());
            rec.push(
                format!("undo: demote {}", v.name()),
                t0,
                r.map(|()| "Secondary".into()).map_err(|e| e.to_string()),
            );
        }
    }
    let _ = done;
    rec.finish()
}

/// Takes the service down in reverse order. Every step runs even if an earlier one failed
/// (a stuck stop hook must not keep the volume exported); failures are recorded.
pub async fn tear_down<C: Cloud>(
    volumes: &mut [Box<dyn VolumeControl>],
    hooks: &Hooks,
    cloud: Option<&C>,
) -> Sequence {
    let mut rec = Recorder::new("teardown");
    if let Some(c) = cloud {
        let t0 = Instant::now();
        let report = c.deactivate().await;
        let ok = report.succeeded();
        let text = report.to_string().replace('\n', "; ");
        rec.push(
            "cloud deactivate".into(),
            t0,
            if ok { Ok(text) } else { Err(text) },
        );
    }
    if let Some(cmd) = &hooks.stop {
        let t0 = Instant::now();
        let r = match run_hook("stop", cmd, &hooks.env, hooks.timeout).await {
            HookResult::Ok(o) => Ok(o),
            HookResult::Failed(e) => Err(e),
        };
        rec.push("hook stop".into(), t0, r);
    }
    for v in volumes.iter_mut().rev() {
        let t0 = Instant::now();
        if let Some(r) = tokio::task::block_in_place(|| v.unmount()).transpose() {
            rec.push(
                format!("unmount {}", v.name()),
                t0,
                r.map_err(|e| e.to_string()),
            );
        }
    }
    for v in volumes.iter_mut().rev() {
        let t0 = Instant::now();
        let r = tokio::task::block_in_place(|| v.stop_export());
        rec.push(
            format!("stop export {}", v.name()),
            t0,
            r.map(|()| "stopped".into()).map_err(|e| e.to_string()),
        );
    }
    for v in volumes.iter_mut().rev() {
        let t0 = Instant::now();
        let r = tokio::task::block_in_place(|| v.demote());
        rec.push(
            format!("demote {}", v.name()),
            t0,
            r.map(|()| "Secondary".into()).map_err(|e| e.to_string()),
        );
    }
    rec.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cloud::{CheckReport, Report, UnreachableAction};
    use crate::cluster::heartbeat::Role;
    use crate::cluster::volume::FakeVolume;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Default)]
    struct CountingCloud {
        activations: AtomicUsize,
    }

    impl Cloud for CountingCloud {
        async fn activate(&self) -> Report {
            self.activations.fetch_add(1, Ordering::SeqCst);
            Report::default()
        }
        async fn deactivate(&self) -> Report {
            Report::default()
        }
        async fn check(&self) -> CheckReport {
            CheckReport {
                items: vec![],
                repairs: vec![],
                on_unreachable: UnreachableAction::Warn,
            }
        }
        async fn fence_peer(&self) -> Report {
            Report::default()
        }
    }

    fn hooks(start: &str) -> Hooks {
        Hooks {
            start: Some(start.into()),
            stop: Some("true".into()),
            timeout: Duration::from_secs(5),
            env: vec![],
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bring_up_runs_every_step_in_order_and_activates_the_cloud_last() {
        let v = FakeVolume::new("data");
        let log = v.log.clone();
        let mut vols: Vec<Box<dyn VolumeControl>> = vec![Box::new(v)];
        let cloud = CountingCloud::default();
        let seq = bring_up(&mut vols, &hooks("echo started"), Some(&cloud), false).await;
        assert!(seq.succeeded(), "{seq:?}");
        let names: Vec<_> = seq.steps.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "promote data",
                "export data",
                "hook start",
                "cloud activate"
            ]
        );
        assert_eq!(seq.steps[2].detail, "started");
        assert_eq!(cloud.activations.load(Ordering::SeqCst), 1);
        assert_eq!(log.lock().unwrap().calls, ["promote", "start_export"]);
        assert_eq!(vols[0].role(), Role::Primary);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn mount_runs_after_the_export_and_before_the_start_hook_and_unmount_before_the_export_stops(
    ) {
        let mut v = FakeVolume::new("data");
        v.mount_answer = Some(Ok("mounted /dev/nbd0 on /srv/data (ext4)".into()));
        let log = v.log.clone();
        let mut vols: Vec<Box<dyn VolumeControl>> = vec![Box::new(v)];
        let seq = bring_up::<CountingCloud>(&mut vols, &hooks("echo started"), None, false).await;
        let names: Vec<_> = seq.steps.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            ["promote data", "export data", "mount data", "hook start"]
        );
        let seq = tear_down::<CountingCloud>(&mut vols, &hooks("true"), None).await;
        let names: Vec<_> = seq.steps.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "hook stop",
                "unmount data",
                "stop export data",
                "demote data"
            ]
        );
        assert_eq!(
            log.lock().unwrap().calls,
            [
                "promote",
                "start_export",
                "mount",
                "unmount",
                "stop_export",
                "demote"
            ]
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn failing_mount_stops_bring_up_before_the_hooks_and_undoes_the_export() {
        let mut v = FakeVolume::new("data");
        v.mount_answer = Some(Err("mount /dev/nbd0 on /srv/data: wrong fs type".into()));
        let log = v.log.clone();
        let mut vols: Vec<Box<dyn VolumeControl>> = vec![Box::new(v)];
        let cloud = CountingCloud::default();
        let seq = bring_up(&mut vols, &hooks("echo started"), Some(&cloud), false).await;
        assert_eq!(seq.failed_at.as_deref(), Some("mount data"));
        assert!(!seq.steps.iter().any(|s| s.name == "hook start"), "{seq:?}");
        assert_eq!(
            cloud.activations.load(Ordering::SeqCst),
            0,
            "no cloud change"
        );
        let calls = log.lock().unwrap().calls.clone();
        assert_eq!(
            &calls[..4],
            ["promote", "start_export", "mount", "unmount"],
            "{calls:?}"
        );
        assert_eq!(vols[0].role(), Role::Secondary);
        assert_eq!(vols[0].status().export, None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn failing_start_hook_stops_bring_up_and_leaves_the_node_safe() {
        let v = FakeVolume::new("data");
        let mut vols: Vec<Box<dyn VolumeControl>> = vec![Box::new(v)];
        let cloud = CountingCloud::default();
        let seq = bring_up(
            &mut vols,
            &hooks("echo 'db will not start' >&2; exit 3"),
            Some(&cloud),
            false,
        )
        .await;
        assert_eq!(seq.failed_at.as_deref(), Some("hook start"));
        let failed = seq.steps.iter().find(|s| !s.ok).unwrap();
        assert!(
            failed.detail.contains("db will not start"),
            "{}",
            failed.detail
        );
        assert_eq!(
            cloud.activations.load(Ordering::SeqCst),
            0,
            "no cloud change"
        );
        assert_eq!(vols[0].role(), Role::Secondary);
        assert_eq!(vols[0].status().export, None, "volume not exported");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hook_that_hangs_is_killed_at_its_timeout() {
        let mut h = hooks("sleep 30");
        h.timeout = Duration::from_millis(300);
        let t0 = Instant::now();
        let mut vols: Vec<Box<dyn VolumeControl>> = vec![Box::new(FakeVolume::new("data"))];
        let seq = bring_up::<CountingCloud>(&mut vols, &h, None, false).await;
        assert!(t0.elapsed() < Duration::from_secs(5));
        assert!(
            seq.steps.iter().any(|s| s.detail.contains("timed out")),
            "{seq:?}"
        );
        assert_eq!(vols[0].role(), Role::Secondary);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn failing_export_demotes_the_volume_again() {
        let mut v = FakeVolume::new("data");
        v.fail_export = Some("socket dir missing".into());
        let mut vols: Vec<Box<dyn VolumeControl>> = vec![Box::new(v)];
        let seq = bring_up::<CountingCloud>(&mut vols, &hooks("true"), None, false).await;
        assert_eq!(seq.failed_at.as_deref(), Some("export data"));
        assert_eq!(vols[0].role(), Role::Secondary);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn teardown_runs_in_reverse_order() {
        let mut vols: Vec<Box<dyn VolumeControl>> = vec![Box::new(FakeVolume::new("data"))];
        let cloud = CountingCloud::default();
        assert!(bring_up(&mut vols, &hooks("true"), Some(&cloud), false)
            .await
            .succeeded());
        let seq = tear_down(&mut vols, &hooks("true"), Some(&cloud)).await;
        let names: Vec<_> = seq.steps.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "cloud deactivate",
                "hook stop",
                "stop export data",
                "demote data"
            ]
        );
        assert_eq!(vols[0].role(), Role::Secondary);
    }
}
