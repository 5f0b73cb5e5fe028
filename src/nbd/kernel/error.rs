//! Errors of kernel attach: each message names what failed and what to do about it.

use std::path::PathBuf;

use super::netlink::codec::ParseError;

/// The message shown whenever the nbd driver is absent (no "nbd" netlink family and no
/// /dev/nbdN node).
pub const MODULE_NOT_LOADED: &str = "the nbd kernel module is not loaded: run `modprobe nbd` \
(package linux-modules-extra on some distributions); check that /dev/nbd0 exists";

/// Why attaching, detaching or querying an NBD device, or preparing the process, failed.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// Neither the netlink family nor the device node exists.
    #[error("{MODULE_NOT_LOADED}")]
    ModuleNotLoaded,

    /// The device path is not of the form /dev/nbdN.
    #[error("`{path}` is not an NBD device: expected /dev/nbdN with N a device number (e.g. /dev/nbd0); {reason}")]
    BadDevicePath {
        /// The path given.
        path: PathBuf,
        /// What is wrong with it.
        reason: &'static str,
    },

    /// The module is loaded but this device node does not exist.
    #[error("{} does not exist although the nbd module is loaded: load it with more devices \
(`modprobe nbd nbds_max=N`) or pick an existing /dev/nbdN", device.display())]
    DeviceMissing {
        /// The device path.
        device: PathBuf,
    },

    /// Attach parameters the kernel would refuse.
    #[error("invalid attach parameters for {}: {what}", device.display())]
    InvalidParams {
        /// The device path.
        device: PathBuf,
        /// Which parameter and why.
        what: String,
    },

    /// A socket operation on the netlink socket failed.
    #[error("netlink {op} failed: {source}")]
    NetlinkIo {
        /// What was being done (e.g. "socket(NETLINK_GENERIC)", "send NBD_CMD_CONNECT").
        op: String,
        /// The operating-system error.
        #[source]
        source: std::io::Error,
    },

    /// The kernel refused a netlink request.
    #[error("the kernel refused {request}: {} ({hint})", std::io::Error::from_raw_os_error(*errno))]
    NetlinkRefused {
        /// The request (e.g. "NBD_CMD_CONNECT for /dev/nbd0").
        request: String,
        /// The positive errno the kernel returned.
        errno: i32,
        /// What to check for this errno.
        hint: &'static str,
    },

    /// The kernel's reply could not be parsed.
    #[error("malformed netlink reply to {request}: {source}")]
    NetlinkReply {
        /// The request that was answered.
        request: &'static str,
        /// What is wrong with the bytes.
        #[source]
        source: ParseError,
    },

    /// No reply came within the receive timeout.
    #[error(
        "no netlink reply to {request} within {secs} s: the nbd driver may be stuck; check dmesg"
    )]
    NetlinkTimeout {
        /// The request.
        request: &'static str,
        /// The timeout in seconds.
        secs: u64,
    },

    /// Opening the device node failed.
    #[error("cannot open {}: {source} (run as root; check the device node's permissions)", device.display())]
    OpenDevice {
        /// The device path.
        device: PathBuf,
        /// The operating-system error.
        #[source]
        source: std::io::Error,
    },

    /// An NBD ioctl failed.
    #[error("ioctl {op} on {} failed: {source} ({hint})", device.display())]
    Ioctl {
        /// The ioctl name (e.g. "NBD_SET_SOCK").
        op: &'static str,
        /// The device path.
        device: PathBuf,
        /// The operating-system error.
        #[source]
        source: std::io::Error,
        /// What to check for this error.
        hint: &'static str,
    },

    /// Starting the thread that runs NBD_DO_IT failed.
    #[error("cannot start the NBD_DO_IT thread for {}: {source}", device.display())]
    SpawnThread {
        /// The device path.
        device: PathBuf,
        /// The operating-system error.
        #[source]
        source: std::io::Error,
    },

    /// The NBD_DO_IT thread panicked.
    #[error("the NBD_DO_IT thread for {} panicked", device.display())]
    ThreadPanicked {
        /// The device path.
        device: PathBuf,
    },

    /// One step of [`super::process::prepare_process_for_attach`] failed.
    #[error("cannot {step}: {source}; {hint}")]
    ProcessPreparation {
        /// The step (e.g. "set PR_SET_IO_FLUSHER").
        step: &'static str,
        /// The operating-system error.
        #[source]
        source: std::io::Error,
        /// What to check.
        hint: &'static str,
    },
}

/// What to check when the kernel refuses a netlink request with `errno`.
pub fn netlink_hint(errno: i32) -> &'static str {
    match errno {
        libc::EPERM | libc::EACCES => "nbd netlink commands need CAP_SYS_ADMIN: run as root",
        libc::EBUSY => {
            "the device is already attached: `twinvol detach` it first or pick another /dev/nbdN"
        }
        libc::EINVAL => {
            "the nbd driver rejected a parameter or the device state: `dmesg | grep nbd` says which"
        }
        libc::ENOENT => "no such family or device",
        libc::ENOTSOCK | libc::EBADF => {
            "a socket handed to the kernel is not an open stream socket"
        }
        libc::EOPNOTSUPP => {
            "the kernel's nbd driver does not support this command: upgrade the kernel"
        }
        _ => "see `dmesg | grep nbd`",
    }
}

/// What to check when an NBD ioctl fails with `errno`.
pub fn ioctl_hint(errno: i32) -> &'static str {
    match errno {
        libc::ENOTTY | libc::EINVAL => {
            "the device is not an NBD device, or the driver rejected the value"
        }
        libc::EBUSY => {
            "the device is already attached: `twinvol detach` it first or pick another /dev/nbdN"
        }
        libc::EPERM | libc::EACCES => "NBD ioctls need CAP_SYS_ADMIN: run as root",
        _ => "see `dmesg | grep nbd`",
    }
}
