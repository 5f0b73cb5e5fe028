//! `nbd::kernel`: pointing the kernel's NBD client (/dev/nbdN) at sockets our server serves.
//!
//! - [`attach()`], [`detach()`], [`reconnect()`], [`status()`], [`status_all()`] and [`AttachParams`]: the API `twinvol attach` /
//!   `detach` / `nbd-status` call. Netlink first, ioctls when the "nbd" family is missing.
//! - [`netlink`]: the generic-netlink family "nbd" (message codec pure, socket thin).
//! - [`ioctl`]: the `_IO(0xab, n)` fallback; NBD_DO_IT blocks on a thread of its own.
//! - [`process`]: [`prepare_process_for_attach`], to call from `main` before any thread starts.
//! - [`device`]: /dev/nbdN <-> N.
//!
//! Without the nbd driver every entry point returns [`KernelError::ModuleNotLoaded`], whose
//! message says to `modprobe nbd`. See docs/KERNEL.md.

pub mod attach;
pub mod device;
pub mod error;
pub mod ioctl;
pub mod netlink;
pub mod process;

pub use attach::{
    attach, detach, reconnect, status, status_all, AttachMethod, AttachParams, Attached,
};
pub use device::{device_index, device_path};
pub use error::KernelError;
pub use netlink::nbd_family::DeviceStatus;
pub use process::prepare_process_for_attach;
