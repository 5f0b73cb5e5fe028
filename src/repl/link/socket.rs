//! Replication sockets: bound to the configured local address (and interface) before
//! connecting or listening, with the socket options the data path needs.
//!
//! Invariant: a socket returned here is bound to `cfg.local`'s IP (the interface, when named,
//! via SO_BINDTODEVICE), so mirror traffic leaves through the dedicated ENI and no other.

use std::net::SocketAddr;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::{TcpSocket, TcpStream};

use super::error::{bind_problem, device_problem, LinkError};
use super::LinkConfig;

/// A TCP socket bound to `addr`, pinned to the configured interface, with buffer sizes set.
pub(super) fn bound_socket(
    cfg: &LinkConfig,
    addr: SocketAddr,
    listener: bool,
) -> Result<TcpSocket, LinkError> {
    let opt = |option: &'static str| move |source| LinkError::SocketOption { option, source };
    let s = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(opt("socket"))?;
    if listener {
        s.set_reuseaddr(true).map_err(opt("SO_REUSEADDR"))?;
    }
    if let Some(ifname) = &cfg.interface {
        SockRef::from(&s)
            .bind_device(Some(ifname.as_bytes()))
            .map_err(|source| LinkError::Device {
                interface: ifname.clone(),
                problem: device_problem(&source),
                source,
            })?;
    }
    let size = u32::try_from(cfg.socket_buffer).unwrap_or(u32::MAX);
    s.set_send_buffer_size(size).map_err(opt("SO_SNDBUF"))?;
    s.set_recv_buffer_size(size).map_err(opt("SO_RCVBUF"))?;
    // Linux reports twice the usable size; less than asked means net.core.{w,r}mem_max capped it.
    if s.send_buffer_size()
        .is_ok_and(|got| u64::from(got) < cfg.socket_buffer as u64)
    {
        tracing::warn!(
            requested = cfg.socket_buffer,
            "replication socket buffer capped by the kernel; raise net.core.wmem_max and net.core.rmem_max"
        );
    }
    s.bind(addr).map_err(|source| LinkError::Bind {
        addr,
        problem: bind_problem(&source),
        source,
    })?;
    Ok(s)
}

/// Options set on every connected replication stream (both ends).
pub(super) fn tune_stream(cfg: &LinkConfig, s: &TcpStream) -> Result<(), LinkError> {
    s.set_nodelay(true)
        .map_err(|source| LinkError::SocketOption {
            option: "TCP_NODELAY",
            source,
        })?;
    // The kernel counts keepalive times in whole seconds, minimum 1.
    let second = std::time::Duration::from_secs(1);
    let ka = TcpKeepalive::new()
        .with_time(cfg.keepalive.max(second))
        .with_interval(cfg.keepalive.div_f64(3.0).max(second))
        .with_retries(3);
    SockRef::from(s)
        .set_tcp_keepalive(&ka)
        .map_err(|source| LinkError::SocketOption {
            option: "TCP keepalive",
            source,
        })?;
    Ok(())
}
