//! One owner per device: [`DeviceClaim`] is held by every process that serves or writes a
//! volume device (`run`, `mirror`, `export`, the metadata writers), for as long as it may
//! touch it.
//!
//! - A block device is opened with `O_EXCL`: the kernel then refuses every other exclusive
//!   opener (another twinvol, a mount, device-mapper, md) with EBUSY, as DRBD claims its lower
//!   device.
//! - A regular file gets an exclusive `flock` on the claim's own descriptor.
//!
//! A refused claim names the device and the processes that have it open (read from
//! `/proc/*/fd`), so the message says which pid to stop.
//!
//! Invariant: while a [`DeviceClaim`] lives, no other process holds a claim on the same device
//! (same inode for files, same device number for block devices); it is released when dropped or
//! when the process dies.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// A process that has the device open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// Its pid.
    pub pid: u32,
    /// Its command name (`/proc/PID/comm`), or "?".
    pub comm: String,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid {} ({})", self.pid, self.comm)
    }
}

/// Why a device could not be claimed.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    /// Another owner holds the device.
    #[error("{device} is already in use by {}: one device has one owner; stop that process (or point this command at another device)", holders_text(.holders))]
    InUse {
        /// The device.
        device: PathBuf,
        /// The processes that have it open (empty: the kernel holds it, e.g. mounted).
        holders: Vec<Holder>,
    },
    /// The device could not be opened at all.
    #[error("cannot open {device}: {source} (check the path exists and that twinvol runs as root or owns it)")]
    Open {
        /// The device.
        device: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

fn holders_text(h: &[Holder]) -> String {
    if h.is_empty() {
        "the kernel or another exclusive opener (mounted, or part of device-mapper, md or a running twinvol)".into()
    } else {
        h.iter()
            .map(|x| x.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// An exclusive claim on one device, released on drop.
#[derive(Debug)]
pub struct DeviceClaim {
    _file: File,
    path: PathBuf,
}

impl DeviceClaim {
    /// Claims `path` (a block device or a regular file) for this process. A second claim of the
    /// same device, in this process or another, fails with [`ClaimError::InUse`].
    pub fn take(path: &Path) -> Result<Self, ClaimError> {
        let open_err = |source| ClaimError::Open {
            device: path.to_path_buf(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(open_err)?;
        let block = meta.file_type().is_block_device();
        let flags = libc::O_CLOEXEC | if block { libc::O_EXCL } else { 0 };
        let file = match std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(flags)
            .open(path)
        {
            Ok(f) => f,
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                return Err(ClaimError::InUse {
                    device: path.to_path_buf(),
                    holders: holders_of(path),
                })
            }
            Err(e) => return Err(open_err(e)),
        };
        if !block {
            // SAFETY: `file` is an open descriptor owned by this function; flock does not
            // touch memory.
            let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if r != 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                    return Err(ClaimError::InUse {
                        device: path.to_path_buf(),
                        holders: holders_of(path),
                    });
                }
                return Err(open_err(e));
            }
        }
        Ok(Self {
            _file: file,
            path: path.to_path_buf(),
        })
    }

    /// The device claimed.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The identity two paths share when they name the same device: the device number of a block
/// device, else the inode.
fn identity(m: &std::fs::Metadata) -> (bool, u64, u64) {
    if m.file_type().is_block_device() {
        (true, m.rdev(), 0)
    } else {
        (false, m.dev(), m.ino())
    }
}

/// Other processes with `path` open, from `/proc/*/fd` (best effort: processes this one may
/// not inspect are left out).
pub fn holders_of(path: &Path) -> Vec<Holder> {
    let Ok(target) = std::fs::metadata(path) else {
        return vec![];
    };
    let want = identity(&target);
    let me = std::process::id();
    let mut out = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        let holds = fds.flatten().any(|fd| {
            std::fs::metadata(fd.path())
                .map(|m| identity(&m) == want)
                .unwrap_or(false)
        });
        if holds {
            let comm = std::fs::read_to_string(p.path().join("comm"))
                .map(|c| c.trim().to_string())
                .unwrap_or_else(|_| "?".into());
            out.push(Holder { pid, comm });
        }
    }
    out.sort_by_key(|h| h.pid);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_claim_of_a_file_is_refused_until_the_first_is_dropped() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("vol.img");
        std::fs::write(&f, [0u8; 4096]).unwrap();
        let first = DeviceClaim::take(&f).unwrap();
        let e = DeviceClaim::take(&f).unwrap_err();
        assert!(matches!(e, ClaimError::InUse { .. }), "{e}");
        assert!(e.to_string().contains("vol.img"), "{e}");
        drop(first);
        DeviceClaim::take(&f).expect("free again after the drop");
    }

    #[test]
    fn a_hard_link_names_the_same_file_and_is_refused_too() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("vol.img");
        std::fs::write(&f, [0u8; 4096]).unwrap();
        let other = d.path().join("other-name.img");
        std::fs::hard_link(&f, &other).unwrap();
        let _first = DeviceClaim::take(&f).unwrap();
        assert!(DeviceClaim::take(&other).is_err());
    }

    #[test]
    fn a_missing_device_is_an_open_error_naming_it() {
        let e = DeviceClaim::take(Path::new("/nonexistent/dev")).unwrap_err();
        assert!(matches!(e, ClaimError::Open { .. }));
        assert!(e.to_string().contains("/nonexistent/dev"), "{e}");
    }
}
