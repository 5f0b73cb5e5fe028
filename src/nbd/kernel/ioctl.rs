//! The nbd driver's ioctl interface (every kernel with nbd), used when the netlink family is
//! missing. Request codes are `_IO(0xab, n)`: no direction bits and no size, the argument is
//! passed by value. (nix's `ioctl_write_int!` encodes `_IOW` and would be wrong here.)
//!
//! Sequence (as nbd-client does it): SET_BLKSIZE, SET_SIZE_BLOCKS, SET_TIMEOUT, SET_FLAGS,
//! SET_SOCK per socket, then DO_IT, which blocks until the device is disconnected and so runs on
//! a dedicated thread; after it returns, CLEAR_QUE and CLEAR_SOCK release the device.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use nix::request_code_none;
use nix::sys::ioctl::ioctl_num_type;

use super::error::{ioctl_hint, KernelError};

/// The ioctl type byte of the nbd driver.
pub const NBD_IOCTL_TYPE: u8 = 0xab;

/// Hands one connected socket (argument: fd) to the device.
pub const NBD_SET_SOCK: ioctl_num_type = request_code_none!(NBD_IOCTL_TYPE, 0);
/// Sets the logical block size in bytes.
pub const NBD_SET_BLKSIZE: ioctl_num_type = request_code_none!(NBD_IOCTL_TYPE, 1);
/// Sets the size in bytes (an unsigned long; prefer SET_SIZE_BLOCKS).
pub const NBD_SET_SIZE: ioctl_num_type = request_code_none!(NBD_IOCTL_TYPE, 2);
/// Runs the device; blocks until it is disconnected.
pub const NBD_DO_IT: ioctl_num_type = request_code_none!(NBD_IOCTL_TYPE, 3);
/// Releases the device's sockets.
pub const NBD_CLEAR_SOCK: ioctl_num_type = request_code_none!(NBD_IOCTL_TYPE, 4);
/// Fails queued requests (a no-op on current kernels, kept for old ones).
pub const NBD_CLEAR_QUE: ioctl_num_type = request_code_none!(NBD_IOCTL_TYPE, 5);
/// Logs the device state to the kernel log (a no-op on current kernels).
pub const NBD_PRINT_DEBUG: ioctl_num_type = request_code_none!(NBD_IOCTL_TYPE, 6);
/// Sets the size in blocks of the current block size.
pub const NBD_SET_SIZE_BLOCKS: ioctl_num_type = request_code_none!(NBD_IOCTL_TYPE, 7);
/// Asks the device to disconnect (DO_IT then returns).
pub const NBD_DISCONNECT: ioctl_num_type = request_code_none!(NBD_IOCTL_TYPE, 8);
/// Sets the request timeout in seconds.
pub const NBD_SET_TIMEOUT: ioctl_num_type = request_code_none!(NBD_IOCTL_TYPE, 9);
/// Sets the NBD transmission flags from the handshake.
pub const NBD_SET_FLAGS: ioctl_num_type = request_code_none!(NBD_IOCTL_TYPE, 10);

/// What the ioctl attach needs. Invariant (checked by `attach`): `size` is a non-zero multiple
/// of `block_size`, and there is at least one socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IoctlConfig {
    /// Logical block size in bytes.
    pub block_size: u32,
    /// Size in bytes.
    pub size: u64,
    /// Request timeout in seconds; 0 keeps the kernel's default.
    pub timeout_secs: u64,
    /// NBD transmission flags.
    pub flags: u16,
}

/// Issues one `_IO` request with a by-value argument.
fn nbd_ioctl(
    device_fd: BorrowedFd<'_>,
    device: &Path,
    op: &'static str,
    request: ioctl_num_type,
    arg: libc::c_ulong,
) -> Result<(), KernelError> {
    // SAFETY: every NBD request is `_IO`: the kernel reads `arg` as a plain integer and never
    // dereferences it, so no memory of ours is shared; the fd is valid for the call.
    #[allow(clippy::useless_conversion)]
    let rc = unsafe { libc::ioctl(device_fd.as_raw_fd(), request as _, arg) };
    if rc < 0 {
        let source = io::Error::last_os_error();
        let hint = ioctl_hint(source.raw_os_error().unwrap_or(0));
        return Err(KernelError::Ioctl {
            op,
            device: device.to_path_buf(),
            source,
            hint,
        });
    }
    Ok(())
}

/// Opens the device node read-write. A missing node means no module, or too few devices.
pub fn open_device(device: &Path) -> Result<File, KernelError> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(device)
    {
        Ok(f) => Ok(f),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if Path::new("/sys/module/nbd").exists() {
                Err(KernelError::DeviceMissing {
                    device: device.to_path_buf(),
                })
            } else {
                Err(KernelError::ModuleNotLoaded)
            }
        }
        Err(source) => Err(KernelError::OpenDevice {
            device: device.to_path_buf(),
            source,
        }),
    }
}

/// A device attached through ioctls: the thread blocked in `NBD_DO_IT`. Invariant: the
/// thread owns the device fd and the sockets until DO_IT returns, then clears the device.
#[derive(Debug)]
pub struct IoctlAttachment {
    device: PathBuf,
    thread: JoinHandle<Result<(), KernelError>>,
}

impl IoctlAttachment {
    /// Blocks until the device is disconnected (`detach`, or the server closing the sockets).
    pub fn wait(self) -> Result<(), KernelError> {
        self.thread
            .join()
            .map_err(|_| KernelError::ThreadPanicked {
                device: self.device.clone(),
            })?
    }

    /// Whether DO_IT has returned.
    pub fn is_finished(&self) -> bool {
        self.thread.is_finished()
    }
}

/// Configures `device` with `config` and `sockets` through ioctls and starts `NBD_DO_IT` on a
/// thread named `nbd-do-it`. If a configuration step fails the sockets are cleared again and
/// nothing keeps running.
pub fn attach_ioctl(
    device: &Path,
    config: &IoctlConfig,
    sockets: Vec<OwnedFd>,
) -> Result<IoctlAttachment, KernelError> {
    let file = open_device(device)?;
    if let Err(e) = configure(file.as_fd(), device, config, &sockets) {
        // Undo SET_SOCK calls that went through; ignore errors: the first error is the news.
        let _ = nbd_ioctl(file.as_fd(), device, "NBD_CLEAR_SOCK", NBD_CLEAR_SOCK, 0);
        return Err(e);
    }
    let thread_device = device.to_path_buf();
    let thread = std::thread::Builder::new()
        .name("nbd-do-it".into())
        .spawn(move || {
            let fd = file.as_fd();
            let result = nbd_ioctl(fd, &thread_device, "NBD_DO_IT", NBD_DO_IT, 0);
            let _ = nbd_ioctl(fd, &thread_device, "NBD_CLEAR_QUE", NBD_CLEAR_QUE, 0);
            let _ = nbd_ioctl(fd, &thread_device, "NBD_CLEAR_SOCK", NBD_CLEAR_SOCK, 0);
            drop(sockets);
            result
        })
        .map_err(|source| KernelError::SpawnThread {
            device: device.to_path_buf(),
            source,
        })?;
    Ok(IoctlAttachment {
        device: device.to_path_buf(),
        thread,
    })
}

fn configure(
    fd: BorrowedFd<'_>,
    device: &Path,
    config: &IoctlConfig,
    sockets: &[OwnedFd],
) -> Result<(), KernelError> {
    let blocks = config.size / u64::from(config.block_size);
    nbd_ioctl(
        fd,
        device,
        "NBD_SET_BLKSIZE",
        NBD_SET_BLKSIZE,
        libc::c_ulong::from(config.block_size),
    )?;
    nbd_ioctl(
        fd,
        device,
        "NBD_SET_SIZE_BLOCKS",
        NBD_SET_SIZE_BLOCKS,
        blocks as libc::c_ulong,
    )?;
    if config.timeout_secs > 0 {
        nbd_ioctl(
            fd,
            device,
            "NBD_SET_TIMEOUT",
            NBD_SET_TIMEOUT,
            config.timeout_secs as libc::c_ulong,
        )?;
    }
    nbd_ioctl(
        fd,
        device,
        "NBD_SET_FLAGS",
        NBD_SET_FLAGS,
        libc::c_ulong::from(config.flags),
    )?;
    for s in sockets {
        nbd_ioctl(
            fd,
            device,
            "NBD_SET_SOCK",
            NBD_SET_SOCK,
            s.as_raw_fd() as libc::c_ulong,
        )?;
    }
    Ok(())
}

/// Disconnects `device` through ioctls (from any process): DISCONNECT, then CLEAR_SOCK, as
/// `nbd-client -d` does. The attaching process's DO_IT then returns.
pub fn detach_ioctl(device: &Path) -> Result<(), KernelError> {
    let file = open_device(device)?;
    nbd_ioctl(file.as_fd(), device, "NBD_DISCONNECT", NBD_DISCONNECT, 0)?;
    nbd_ioctl(file.as_fd(), device, "NBD_CLEAR_SOCK", NBD_CLEAR_SOCK, 0)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::unnecessary_cast)] // ioctl_num_type is c_int on musl
    fn request_codes_are_io_without_direction_or_size() {
        assert_eq!(NBD_SET_SOCK as u64, 0xab00);
        assert_eq!(NBD_SET_BLKSIZE as u64, 0xab01);
        assert_eq!(NBD_SET_SIZE as u64, 0xab02);
        assert_eq!(NBD_DO_IT as u64, 0xab03);
        assert_eq!(NBD_CLEAR_SOCK as u64, 0xab04);
        assert_eq!(NBD_CLEAR_QUE as u64, 0xab05);
        assert_eq!(NBD_PRINT_DEBUG as u64, 0xab06);
        assert_eq!(NBD_SET_SIZE_BLOCKS as u64, 0xab07);
        assert_eq!(NBD_DISCONNECT as u64, 0xab08);
        assert_eq!(NBD_SET_TIMEOUT as u64, 0xab09);
        assert_eq!(NBD_SET_FLAGS as u64, 0xab0a);
    }

    #[test]
    #[allow(clippy::unnecessary_cast)]
    fn iow_encoding_would_differ_from_the_driver_codes() {
        // What `ioctl_write_int!` would produce: direction and size bits set.
        let iow = nix::request_code_write!(NBD_IOCTL_TYPE, 0, std::mem::size_of::<libc::c_int>());
        assert_ne!(iow as u64, NBD_SET_SOCK as u64);
        assert_eq!(iow as u64, 0x4004_ab00);
    }

    #[test]
    fn ioctl_attach_on_a_non_nbd_device_fails_with_the_ioctl_named_and_nothing_left_running() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let config = IoctlConfig {
            block_size: 4096,
            size: 1 << 20,
            timeout_secs: 30,
            flags: 1,
        };
        let err =
            attach_ioctl(Path::new("/dev/null"), &config, vec![OwnedFd::from(a)]).unwrap_err();
        match &err {
            KernelError::Ioctl { op, source, .. } => {
                assert_eq!(*op, "NBD_SET_BLKSIZE");
                assert_eq!(source.raw_os_error(), Some(libc::ENOTTY));
            }
            other => panic!("unexpected {other:?}"),
        }
        let msg = err.to_string();
        assert!(
            msg.contains("/dev/null") && msg.contains("not an NBD device"),
            "{msg}"
        );
        // The socket handed over was dropped: the peer sees end of file.
        use std::io::Read;
        let mut buf = [0u8; 1];
        assert_eq!((&b).read(&mut buf).unwrap(), 0);
    }

    #[test]
    fn missing_device_node_without_module_is_the_module_error() {
        if Path::new("/sys/module/nbd").exists() {
            let e = open_device(Path::new("/dev/nbd4000000")).unwrap_err();
            assert!(matches!(e, KernelError::DeviceMissing { .. }), "{e:?}");
        } else {
            let e = open_device(Path::new("/dev/nbd0")).unwrap_err();
            assert!(matches!(e, KernelError::ModuleNotLoaded), "{e:?}");
            assert!(e.to_string().contains("modprobe nbd"));
        }
    }
}
