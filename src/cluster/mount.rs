//! Kernel attach and filesystem mount of one volume while Primary: the bring-up steps between
//! "export" and the application's start hook, undone in reverse at teardown.
//!
//! - Attach (`[volume.attach]`): runs `twinvol attach <export socket> <device>` as a child of
//!   the daemon (it holds the kernel connection) and waits until the device reports a size.
//!   Detach runs `twinvol detach <device>` and reaps the child.
//! - Mount (`[volume.mount]`): `mount -t <fstype> -o <options> <source> <path>`; the source
//!   defaults to the attach device. Unmount refuses to force: a busy filesystem fails the step
//!   naming `fuser -vm <path>`, so no application loses data to a lazy unmount.
//!
//! Invariants: `up` either leaves everything configured attached and mounted, or undoes what
//! it did and fails; `down` is idempotent (nothing mounted / attached = nothing to do).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::config::VolumeConfig;

/// How long a kernel attach may take to show the device's size.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(15);

/// The attach child and mount state of one volume.
pub struct Placement {
    cfg: VolumeConfig,
    attach: Option<Child>,
}

/// Whether `path` is a mount point now (from /proc/self/mountinfo, octal escapes decoded).
pub fn is_mounted(path: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = path.to_string_lossy();
    text.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|mp| unescape_mountinfo(mp) == want)
}

/// Decodes the `\040`-style escapes of mountinfo fields.
pub fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') as u32 * 64
                + (b[i + 2] - b'0') as u32 * 8
                + (b[i + 3] - b'0') as u32;
            if let Ok(byte) = u8::try_from(v) {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn run(cmd: &mut Command, what: &str) -> Result<(), String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{what}: cannot run: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{what}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn device_size(dev: &Path) -> Option<u64> {
    let name = dev.file_name()?.to_str()?;
    std::fs::read_to_string(format!("/sys/block/{name}/size"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

impl Placement {
    /// Nothing attached or mounted yet.
    pub fn new(cfg: VolumeConfig) -> Self {
        Self { cfg, attach: None }
    }

    /// Whether the volume has an attach or a mount step at all.
    pub fn configured(&self) -> bool {
        self.cfg.attach.is_some() || self.cfg.mount.is_some()
    }

    fn mount_source(&self) -> Option<PathBuf> {
        let m = self.cfg.mount.as_ref()?;
        m.source
            .clone()
            .or_else(|| self.cfg.attach.as_ref().map(|a| a.device.clone()))
    }

    /// Attaches (if configured) then mounts (if configured). `Ok(None)`: nothing configured.
    pub fn up(&mut self) -> Result<Option<String>, String> {
        if !self.configured() {
            return Ok(None);
        }
        let mut done = Vec::new();
        self.attach_now()?;
        if let Some(a) = &self.cfg.attach {
            done.push(format!("attached {}", a.device.display()));
        }
        if let Some(m) = self.cfg.mount.clone() {
            let Some(src) = self.mount_source() else {
                return Err("mount: no source (config validation should have refused this)".into());
            };
            if let Err(e) = std::fs::create_dir_all(&m.path) {
                let _ = self.detach_now();
                return Err(format!("mount: cannot create {}: {e}", m.path.display()));
            }
            if !is_mounted(&m.path) {
                let r = run(
                    Command::new("mount")
                        .args(["-t", &m.fstype, "-o", &m.options])
                        .arg(&src)
                        .arg(&m.path),
                    &format!("mount {} on {}", src.display(), m.path.display()),
                );
                if let Err(e) = r {
                    let _ = self.detach_now();
                    return Err(format!(
                        "{e} (check the filesystem with fsck, or mount.fstype / mount.options)"
                    ));
                }
            }
            done.push(format!(
                "mounted {} on {} ({})",
                src.display(),
                m.path.display(),
                m.fstype
            ));
        }
        Ok(Some(done.join(", ")))
    }

    /// Unmounts (if mounted) then detaches (if attached). `Ok(None)`: nothing configured.
    pub fn down(&mut self) -> Result<Option<String>, String> {
        if !self.configured() {
            return Ok(None);
        }
        let mut done = Vec::new();
        if let Some(m) = &self.cfg.mount {
            if is_mounted(&m.path) {
                run(
                    Command::new("umount").arg(&m.path),
                    &format!("umount {}", m.path.display()),
                )
                .map_err(|e| {
                    format!(
                        "{e}; stop what uses it (`fuser -vm {}`) and unmount it by hand: the filesystem is still mounted",
                        m.path.display()
                    )
                })?;
                done.push(format!("unmounted {}", m.path.display()));
            }
        }
        if let Some(d) = self.detach_now()? {
            done.push(d);
        }
        Ok(Some(if done.is_empty() {
            "nothing was mounted or attached".into()
        } else {
            done.join(", ")
        }))
    }

    fn attach_now(&mut self) -> Result<(), String> {
        let Some(a) = self.cfg.attach.clone() else {
            return Ok(());
        };
        if self.attach.is_some() {
            return Ok(());
        }
        let Some(socket) = self.cfg.export.socket.clone() else {
            return Err("attach: the export has no Unix socket".into());
        };
        let exe =
            std::env::current_exe().map_err(|e| format!("attach: cannot find twinvol: {e}"))?;
        let mut child = Command::new(exe)
            .arg("attach")
            .arg(&socket)
            .arg(&a.device)
            .args(["--name", &self.cfg.export.name])
            .args(["--connections", &a.connections.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("attach: cannot start `twinvol attach`: {e}"))?;
        let t0 = Instant::now();
        loop {
            if device_size(&a.device).is_some_and(|s| s > 0) {
                self.attach = Some(child);
                return Ok(());
            }
            if let Ok(Some(status)) = child.try_wait() {
                let mut why = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut why);
                }
                return Err(format!(
                    "attach {} failed ({status}): {}",
                    a.device.display(),
                    why.trim()
                ));
            }
            if t0.elapsed() > ATTACH_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "attach {}: no size after {} s (is the nbd module loaded? `modprobe nbd`)",
                    a.device.display(),
                    ATTACH_TIMEOUT.as_secs()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn detach_now(&mut self) -> Result<Option<String>, String> {
        let (Some(a), Some(mut child)) = (self.cfg.attach.clone(), self.attach.take()) else {
            return Ok(None);
        };
        let r = std::env::current_exe()
            .map_err(|e| format!("detach: cannot find twinvol: {e}"))
            .and_then(|exe| {
                run(
                    Command::new(exe).arg("detach").arg(&a.device),
                    &format!("detach {}", a.device.display()),
                )
            });
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = child.try_wait() {
                return r.map(|()| Some(format!("detached {}", a.device.display())));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        r.map(|()| {
            Some(format!(
                "detached {} (attach process killed)",
                a.device.display()
            ))
        })
    }
}

impl Drop for Placement {
    fn drop(&mut self) {
        if let Some(mut c) = self.attach.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape_mountinfo(r"/srv/my\040data"), "/srv/my data");
        assert_eq!(unescape_mountinfo(r"/a\134b"), r"/a\b");
        assert_eq!(unescape_mountinfo(r"/plain"), "/plain");
        assert_eq!(unescape_mountinfo(r"/trailing\04"), r"/trailing\04");
    }

    #[test]
    fn the_root_filesystem_is_a_mount_point_and_a_fresh_directory_is_not() {
        assert!(is_mounted(Path::new("/")));
        let d = tempfile::tempdir().unwrap();
        assert!(!is_mounted(d.path()));
    }
}
