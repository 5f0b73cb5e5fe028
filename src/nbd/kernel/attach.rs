//! `attach`, `detach`, `status`: the kernel's NBD client pointed at sockets we serve.
//!
//! Netlink first (kernel 4.12+: dead-connection timeout, backend identifier, the process may
//! exit after attaching); ioctls when the "nbd" family is missing (DO_IT blocks a thread of
//! this process for as long as the device is attached).

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::device::device_index;
use super::error::KernelError;
use super::ioctl::{attach_ioctl, detach_ioctl, IoctlAttachment, IoctlConfig};
use super::netlink::nbd_family::{ConnectRequest, DeviceStatus, ReconfigureRequest};
use super::netlink::NbdNetlink;

/// What to attach. Invariants checked by [`attach`]: `device` is /dev/nbdN; `block_size` is a
/// power of two from 512 to 65536; `size` is a non-zero multiple of `block_size`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachParams {
    /// The device, /dev/nbdN.
    pub device: PathBuf,
    /// Export size in bytes (from the handshake).
    pub size: u64,
    /// Logical block size in bytes (the export's preferred block size, usually 4096).
    pub block_size: u32,
    /// NBD transmission flags from the handshake (`NBD_FLAG_*`, including HAS_FLAGS).
    pub flags: u16,
    /// How long the kernel waits for one request before it declares the connection dead
    /// (whole seconds, rounded up; zero keeps the kernel's default of 30 s).
    pub timeout: Duration,
    /// How long the kernel holds I/O when every connection is dead, waiting for new sockets
    /// (`reconfigure`), instead of failing it (whole seconds, rounded up; zero fails at once).
    /// Netlink only.
    pub dead_conn_timeout: Duration,
    /// Names the backend in /sys/block/nbdN/backend; a reconnecting server must send the same.
    /// Netlink only.
    pub backend_id: String,
}

/// Which kernel interface attached the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachMethod {
    /// Generic netlink: the kernel owns the configuration.
    Netlink,
    /// ioctls: a thread of this process is blocked in NBD_DO_IT.
    Ioctl,
}

/// An attached device. Dropping it does not detach: call [`detach`] (or let the server close
/// the sockets). Invariant: `index` is the device's index and `method` the interface used.
#[derive(Debug)]
pub struct Attached {
    /// The device path.
    pub device: PathBuf,
    /// Its index (N of /dev/nbdN).
    pub index: u32,
    /// How it was attached.
    pub method: AttachMethod,
    ioctl: Option<IoctlAttachment>,
}

impl Attached {
    /// Blocks until the device is detached. With ioctls this joins the DO_IT thread; with
    /// netlink it asks the kernel for the device's status every `poll` until it is no longer
    /// connected.
    pub fn wait(self, poll: Duration) -> Result<(), KernelError> {
        if let Some(ioctl) = self.ioctl {
            return ioctl.wait();
        }
        let mut nl = NbdNetlink::open()?;
        loop {
            let connected = nl
                .status(Some(self.index))?
                .iter()
                .any(|d| d.index == self.index && d.connected);
            if !connected {
                return Ok(());
            }
            std::thread::sleep(poll);
        }
    }
}

/// The most sockets one device takes (keeps the CONNECT message well inside netlink's 16-bit
/// attribute lengths; real deployments use one per CPU at most).
pub const MAX_SOCKETS: usize = 1024;

/// The longest backend identifier accepted (the kernel shows it in sysfs; keep it short).
pub const MAX_BACKEND_ID_LEN: usize = 1024;

/// Rounds a duration up to whole seconds (a sub-second timeout must not become "none").
pub fn whole_seconds(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// Checks `params` and `sockets` against what the kernel accepts; returns the device index.
pub fn validate(params: &AttachParams, sockets: &[OwnedFd]) -> Result<u32, KernelError> {
    let index = device_index(&params.device)?;
    let invalid = |what: String| KernelError::InvalidParams {
        device: params.device.clone(),
        what,
    };
    let bs = params.block_size;
    if !bs.is_power_of_two() || !(512..=65536).contains(&bs) {
        return Err(invalid(format!(
            "block size {bs} must be a power of two from 512 to 65536"
        )));
    }
    if params.size == 0 || params.size % u64::from(bs) != 0 {
        return Err(invalid(format!(
            "size {} must be a non-zero multiple of the block size {bs}",
            params.size
        )));
    }
    if sockets.is_empty() {
        return Err(invalid("at least one connected socket is needed".into()));
    }
    if sockets.len() > MAX_SOCKETS {
        return Err(invalid(format!(
            "{} sockets given, at most {MAX_SOCKETS} are supported",
            sockets.len()
        )));
    }
    if params.backend_id.len() > MAX_BACKEND_ID_LEN {
        return Err(invalid(format!(
            "the backend identifier is {} bytes long, at most {MAX_BACKEND_ID_LEN} are allowed",
            params.backend_id.len()
        )));
    }
    if params.backend_id.contains('\0') {
        return Err(invalid(
            "the backend identifier must not contain NUL bytes".into(),
        ));
    }
    Ok(index)
}

/// The CONNECT request for `params` and the socket descriptors `fds`.
pub fn connect_request(params: &AttachParams, index: u32, fds: Vec<u32>) -> ConnectRequest {
    ConnectRequest {
        index: Some(index),
        size_bytes: params.size,
        block_size: u64::from(params.block_size),
        server_flags: u64::from(params.flags),
        timeout_secs: Some(whole_seconds(params.timeout)).filter(|&t| t > 0),
        dead_conn_timeout_secs: Some(whole_seconds(params.dead_conn_timeout)).filter(|&t| t > 0),
        backend_id: Some(params.backend_id.clone()).filter(|s| !s.is_empty()),
        socket_fds: fds,
    }
}

/// Attaches `params.device` to `sockets`, which must already be in the transmission phase
/// (handshake done; the other end is served by our server). Netlink first; when the "nbd"
/// family is missing, ioctls. Without the nbd driver: [`KernelError::ModuleNotLoaded`].
///
/// With netlink the kernel keeps its own references to the sockets and ours are closed on
/// return; with ioctls the DO_IT thread owns them until the device is detached.
pub fn attach(params: &AttachParams, sockets: Vec<OwnedFd>) -> Result<Attached, KernelError> {
    let index = validate(params, &sockets)?;
    match NbdNetlink::open() {
        Ok(mut nl) => {
            let fds = sockets.iter().map(|s| s.as_raw_fd() as u32).collect();
            let got = nl.connect(&connect_request(params, index, fds))?;
            tracing::info!(device = %params.device.display(), index = got, "attached through netlink");
            Ok(Attached {
                device: params.device.clone(),
                index: got,
                method: AttachMethod::Netlink,
                ioctl: None,
            })
        }
        Err(KernelError::ModuleNotLoaded) => {
            tracing::info!(device = %params.device.display(), "no nbd netlink family; trying the ioctl interface");
            if !params.dead_conn_timeout.is_zero() || !params.backend_id.is_empty() {
                tracing::warn!("the ioctl interface has no dead-connection timeout or backend identifier; they are ignored");
            }
            let config = IoctlConfig {
                block_size: params.block_size,
                size: params.size,
                timeout_secs: whole_seconds(params.timeout),
                flags: params.flags,
            };
            let ioctl = attach_ioctl(&params.device, &config, sockets)?;
            tracing::info!(device = %params.device.display(), index, "attached through ioctls");
            Ok(Attached {
                device: params.device.clone(),
                index,
                method: AttachMethod::Ioctl,
                ioctl: Some(ioctl),
            })
        }
        Err(e) => Err(e),
    }
}

/// Detaches `device` (from any process): netlink DISCONNECT, or the ioctls when the family is
/// missing.
pub fn detach(device: &Path) -> Result<(), KernelError> {
    let index = device_index(device)?;
    match NbdNetlink::open() {
        Ok(mut nl) => nl.disconnect(index),
        Err(KernelError::ModuleNotLoaded) => detach_ioctl(device),
        Err(e) => Err(e),
    }
}

/// Hands new sockets (in the transmission phase) to an attached device whose connections
/// died: the kernel replaces dead connections with them (netlink RECONFIGURE). This is how a
/// restarted server takes over within the device's dead-connection timeout without the
/// filesystem seeing I/O errors. The kernel silently ignores sockets beyond the number of dead
/// connections. Needs the netlink interface: with ioctls a device cannot be reconnected.
pub fn reconnect(device: &Path, sockets: Vec<OwnedFd>) -> Result<(), KernelError> {
    let index = device_index(device)?;
    if sockets.is_empty() || sockets.len() > MAX_SOCKETS {
        return Err(KernelError::InvalidParams {
            device: device.to_path_buf(),
            what: format!(
                "{} sockets given, between 1 and {MAX_SOCKETS} are needed",
                sockets.len()
            ),
        });
    }
    let mut nl = NbdNetlink::open()?;
    nl.reconfigure(&ReconfigureRequest {
        index,
        timeout_secs: None,
        dead_conn_timeout_secs: None,
        socket_fds: sockets.iter().map(|s| s.as_raw_fd() as u32).collect(),
    })
}

/// The kernel's view of device `index` (netlink STATUS): `None` when no such device exists.
pub fn status(index: u32) -> Result<Option<DeviceStatus>, KernelError> {
    let mut nl = NbdNetlink::open()?;
    Ok(nl
        .status(Some(index))?
        .into_iter()
        .find(|d| d.index == index))
}

/// Every NBD device the kernel knows, with whether it is connected (netlink STATUS).
pub fn status_all() -> Result<Vec<DeviceStatus>, KernelError> {
    NbdNetlink::open()?.status(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::kernel::error::MODULE_NOT_LOADED;

    fn params() -> AttachParams {
        AttachParams {
            device: PathBuf::from("/dev/nbd0"),
            size: 64 << 20,
            block_size: 4096,
            flags: 0x1 | 0x4 | 0x8,
            timeout: Duration::from_secs(30),
            dead_conn_timeout: Duration::from_millis(120_500),
            backend_id: "twinvol:/srv/vol.img".into(),
        }
    }

    fn socket() -> OwnedFd {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        OwnedFd::from(a)
    }

    #[test]
    fn connect_request_carries_params_with_timeouts_rounded_up_to_seconds() {
        let req = connect_request(&params(), 0, vec![7]);
        assert_eq!(req.index, Some(0));
        assert_eq!(req.size_bytes, 64 << 20);
        assert_eq!(req.block_size, 4096);
        assert_eq!(req.server_flags, 0xd);
        assert_eq!(req.timeout_secs, Some(30));
        assert_eq!(req.dead_conn_timeout_secs, Some(121));
        assert_eq!(req.backend_id.as_deref(), Some("twinvol:/srv/vol.img"));
        assert_eq!(req.socket_fds, vec![7]);
    }

    #[test]
    fn zero_timeouts_and_empty_backend_are_left_to_kernel_defaults() {
        let p = AttachParams {
            timeout: Duration::ZERO,
            dead_conn_timeout: Duration::ZERO,
            backend_id: String::new(),
            ..params()
        };
        let req = connect_request(&p, 0, vec![7]);
        assert_eq!(
            (req.timeout_secs, req.dead_conn_timeout_secs, req.backend_id),
            (None, None, None)
        );
        assert_eq!(whole_seconds(Duration::from_nanos(1)), 1);
    }

    #[test]
    fn size_not_a_multiple_of_block_size_is_rejected_before_touching_the_kernel() {
        let p = AttachParams {
            size: 4096 * 10 + 512,
            ..params()
        };
        let e = validate(&p, &[socket()]).unwrap_err();
        assert!(
            e.to_string().contains("multiple of the block size 4096"),
            "{e}"
        );
    }

    #[test]
    fn odd_block_sizes_are_rejected() {
        for bs in [0, 256, 1000, 3072, 131072] {
            let p = AttachParams {
                block_size: bs,
                size: 1 << 20,
                ..params()
            };
            let e = validate(&p, &[socket()]).unwrap_err();
            assert!(e.to_string().contains("power of two"), "{bs}: {e}");
        }
    }

    #[test]
    fn overlong_backend_identifier_is_rejected() {
        let p = AttachParams {
            backend_id: "x".repeat(MAX_BACKEND_ID_LEN + 1),
            ..params()
        };
        let e = validate(&p, &[socket()]).unwrap_err();
        assert!(
            e.to_string()
                .contains("backend identifier is 1025 bytes long"),
            "{e}"
        );
    }

    #[test]
    fn attach_without_sockets_is_rejected() {
        let e = validate(&params(), &[]).unwrap_err();
        assert!(
            e.to_string().contains("at least one connected socket"),
            "{e}"
        );
    }

    #[test]
    fn bad_device_path_is_rejected_before_touching_the_kernel() {
        let p = AttachParams {
            device: PathBuf::from("/dev/sdb"),
            ..params()
        };
        let e = attach(&p, vec![socket()]).unwrap_err();
        assert!(matches!(e, KernelError::BadDevicePath { .. }), "{e:?}");
    }

    /// On a kernel without the nbd driver, attach tries netlink, falls back to ioctls, finds
    /// no /dev/nbd0, and reports the module error. (Where the module is loaded this test must
    /// not attach a real device to a socket nobody serves, so it checks detach of a device
    /// that is not attached instead.)
    #[test]
    fn attach_without_nbd_module_reports_modprobe_hint() {
        if Path::new("/sys/module/nbd").exists() {
            let e = detach(Path::new("/dev/nbd4000000"));
            assert!(
                e.is_err(),
                "detaching a device that does not exist must fail"
            );
            return;
        }
        let e = attach(&params(), vec![socket()]).unwrap_err();
        assert!(matches!(e, KernelError::ModuleNotLoaded), "{e:?}");
        assert_eq!(e.to_string(), MODULE_NOT_LOADED);
        let e = detach(Path::new("/dev/nbd0")).unwrap_err();
        assert_eq!(e.to_string(), MODULE_NOT_LOADED);
        let e = status(0).unwrap_err();
        assert_eq!(e.to_string(), MODULE_NOT_LOADED);
        let e = status_all().unwrap_err();
        assert_eq!(e.to_string(), MODULE_NOT_LOADED);
        let e = reconnect(Path::new("/dev/nbd0"), vec![socket()]).unwrap_err();
        assert_eq!(e.to_string(), MODULE_NOT_LOADED);
    }
}
