//! The thin I/O part: a NETLINK_GENERIC socket that sends one request and collects the data
//! replies up to the kernel's acknowledgement. Everything it sends and reads goes through the
//! pure `codec` and `nbd_family` functions.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use super::codec::{classify, split_messages, Reply};
use crate::nbd::kernel::error::{netlink_hint, KernelError};

/// How long to wait for the kernel's answer before giving up (the nbd driver answers CONNECT
/// after it has started the device, which is quick; a stuck driver must not hang us).
pub const RECV_TIMEOUT: Duration = Duration::from_secs(10);

/// A data reply, copied out of the receive buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedGenlReply {
    /// `genlmsghdr.cmd`.
    pub cmd: u8,
    /// The attribute area.
    pub attrs: Vec<u8>,
}

/// An open NETLINK_GENERIC socket bound to a kernel-assigned port. Invariant: one request is
/// in flight at a time; sequence numbers increase by one per request.
#[derive(Debug)]
pub struct GenlSocket {
    fd: OwnedFd,
    next_seq: u32,
}

impl GenlSocket {
    /// Opens and binds the socket, with a receive timeout of [`RECV_TIMEOUT`].
    pub fn open() -> Result<Self, KernelError> {
        // SAFETY: socket(2) with constant arguments; the returned fd is checked before use.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_GENERIC,
            )
        };
        if raw < 0 {
            return Err(KernelError::NetlinkIo {
                op: "socket(AF_NETLINK, NETLINK_GENERIC)".into(),
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: `raw` is a freshly created, valid descriptor owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };

        // SAFETY: sockaddr_nl is plain old data; all-zero is a valid value (pid 0 = let the
        // kernel assign the port, no multicast groups).
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: `addr` is a valid sockaddr_nl and the length passed is its size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                std::ptr::addr_of!(addr).cast::<libc::sockaddr>(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(KernelError::NetlinkIo {
                op: "bind(AF_NETLINK)".into(),
                source: io::Error::last_os_error(),
            });
        }

        let tv = libc::timeval {
            tv_sec: RECV_TIMEOUT.as_secs() as libc::time_t,
            tv_usec: 0,
        };
        // SAFETY: `tv` is a valid timeval and the length passed is its size.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                std::ptr::addr_of!(tv).cast::<libc::c_void>(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(KernelError::NetlinkIo {
                op: "setsockopt(SO_RCVTIMEO)".into(),
                source: io::Error::last_os_error(),
            });
        }
        Ok(Self { fd, next_seq: 1 })
    }

    /// The sequence number the next request must carry.
    pub fn next_seq(&self) -> u32 {
        self.next_seq
    }

    /// Sends `message` (built with sequence number [`Self::next_seq`] and `NLM_F_ACK`) and
    /// returns the data replies that precede the acknowledgement. A negative errno from the
    /// kernel becomes [`KernelError::NetlinkRefused`] naming `request`.
    pub fn request(
        &mut self,
        request: &'static str,
        message: &[u8],
    ) -> Result<Vec<OwnedGenlReply>, KernelError> {
        let seq = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1);
        self.send(request, message)?;

        let mut replies = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = self.recv(request, &mut buf)?;
            let messages = split_messages(&buf[..n])
                .map_err(|source| KernelError::NetlinkReply { request, source })?;
            for msg in messages {
                if msg.seq != seq {
                    continue; // a stale answer to an earlier, timed-out request
                }
                match classify(&msg)
                    .map_err(|source| KernelError::NetlinkReply { request, source })?
                {
                    Reply::Ack | Reply::Done => return Ok(replies),
                    Reply::Error { errno } => {
                        return Err(KernelError::NetlinkRefused {
                            request: request.to_string(),
                            errno,
                            hint: netlink_hint(errno),
                        })
                    }
                    Reply::Noop => {}
                    Reply::Data(genl) => replies.push(OwnedGenlReply {
                        cmd: genl.cmd,
                        attrs: genl.attrs.to_vec(),
                    }),
                }
            }
        }
    }

    fn send(&self, request: &'static str, message: &[u8]) -> Result<(), KernelError> {
        // SAFETY: sockaddr_nl is plain old data; zero pid addresses the kernel.
        let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        loop {
            // SAFETY: `message` is a valid buffer of the length passed; `kernel` is a valid
            // sockaddr_nl of the size passed.
            let n = unsafe {
                libc::sendto(
                    self.fd.as_raw_fd(),
                    message.as_ptr().cast::<libc::c_void>(),
                    message.len(),
                    0,
                    std::ptr::addr_of!(kernel).cast::<libc::sockaddr>(),
                    std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
                )
            };
            if n >= 0 {
                return Ok(());
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(KernelError::NetlinkIo {
                    op: format!("send {request}"),
                    source: err,
                });
            }
        }
    }

    fn recv(&self, request: &'static str, buf: &mut [u8]) -> Result<usize, KernelError> {
        loop {
            // SAFETY: `buf` is a valid, writable buffer of the length passed.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast::<libc::c_void>(),
                    buf.len(),
                    libc::MSG_TRUNC,
                )
            };
            if n >= 0 {
                let n = n as usize;
                if n > buf.len() {
                    return Err(KernelError::NetlinkIo {
                        op: format!("receive the reply to {request}"),
                        source: io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("reply of {n} bytes truncated to {}", buf.len()),
                        ),
                    });
                }
                return Ok(n);
            }
            let err = io::Error::last_os_error();
            match err.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                    return Err(KernelError::NetlinkTimeout {
                        request,
                        secs: RECV_TIMEOUT.as_secs(),
                    })
                }
                _ => {
                    return Err(KernelError::NetlinkIo {
                        op: format!("receive the reply to {request}"),
                        source: err,
                    })
                }
            }
        }
    }
}
