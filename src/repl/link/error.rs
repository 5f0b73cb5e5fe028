//! Errors of the replication link. Each message names the address or interface involved and
//! the setting to fix. None contains key material.

use std::net::SocketAddr;
use std::time::Duration;

use crate::repl::wire::frame::{CodecConfigError, EncodeError};
use crate::repl::wire::{DisconnectReason, MessageKind, WireError};

/// Why a replication connection could not be made or kept.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The local replication address could not be bound.
    #[error("cannot bind {addr}: {problem} — check replication.address")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// What the kernel said, in words.
        problem: String,
        /// The kernel's error.
        #[source]
        source: std::io::Error,
    },
    /// The socket could not be pinned to the replication interface.
    #[error("cannot bind the replication socket to interface {interface:?}: {problem} — check replication.interface")]
    Device {
        /// The interface name.
        interface: String,
        /// What the kernel said, in words.
        problem: String,
        /// The kernel's error.
        #[source]
        source: std::io::Error,
    },
    /// A socket option could not be set.
    #[error("cannot set {option} on the replication socket: {source}")]
    SocketOption {
        /// The option.
        option: &'static str,
        /// The kernel's error.
        #[source]
        source: std::io::Error,
    },
    /// The TCP connection to the peer failed.
    #[error("cannot connect from {local} to peer {peer}: {source} — is twinvol running on the peer, and does its firewall/security group allow TCP port {} from this node? (check replication.peer)", peer.port())]
    Connect {
        /// Our bound address.
        local: SocketAddr,
        /// The peer's address.
        peer: SocketAddr,
        /// The kernel's error.
        #[source]
        source: std::io::Error,
    },
    /// The TCP connection did not complete in time.
    #[error("connecting to peer {peer} timed out after {after:?} — check the peer is up and packets to it are not dropped (replication.peer, security groups)")]
    ConnectTimeout {
        /// The peer's address.
        peer: SocketAddr,
        /// The timeout.
        after: Duration,
    },
    /// The listener failed to accept.
    #[error("accepting a replication connection on {local} failed: {source}")]
    Accept {
        /// Our listening address.
        local: SocketAddr,
        /// The kernel's error.
        #[source]
        source: std::io::Error,
    },
    /// A connection came from an address other than the configured peer and was closed unread.
    #[error("refused replication connection from {from}: only the configured peer {expected} may connect — check replication.peer on this node and replication.address on the other")]
    NotPeer {
        /// Where it came from.
        from: SocketAddr,
        /// The configured peer IP.
        expected: std::net::IpAddr,
    },
    /// The handshake did not finish in time.
    #[error("replication handshake with {peer} timed out after {after:?} — the peer accepted TCP but did not answer; is it a twinvol replication port?")]
    HandshakeTimeout {
        /// The peer's address.
        peer: SocketAddr,
        /// The timeout.
        after: Duration,
    },
    /// Reading or writing the socket failed.
    #[error("replication link to {peer}: {source}")]
    Io {
        /// The peer's address.
        peer: SocketAddr,
        /// The kernel's error.
        #[source]
        source: std::io::Error,
    },
    /// The peer closed the connection.
    #[error("peer {peer} closed the replication connection")]
    Closed {
        /// The peer's address.
        peer: SocketAddr,
    },
    /// The peer sent bytes that are not a valid frame (corruption or a foreign program).
    #[error("replication link to {peer}: {source}")]
    Wire {
        /// The peer's address.
        peer: SocketAddr,
        /// The decoding error.
        #[source]
        source: WireError,
    },
    /// A message could not be encoded.
    #[error("replication link to {peer}: {source}")]
    Encode {
        /// The peer's address.
        peer: SocketAddr,
        /// The encoding error.
        #[source]
        source: EncodeError,
    },
    /// The codec settings are unusable.
    #[error(transparent)]
    Codec(#[from] CodecConfigError),
    /// The peer did not prove knowledge of our key.
    #[error("peer {peer} failed authentication: it does not hold this node's replication key — install the same key file on both nodes (replication.key_file)")]
    AuthFailed {
        /// The peer's address.
        peer: SocketAddr,
    },
    /// The peer refused our proof of the key.
    #[error("peer {peer} refused this node's authentication: the replication keys differ — install the same key file on both nodes (replication.key_file)")]
    AuthRejectedByPeer {
        /// The peer's address.
        peer: SocketAddr,
    },
    /// The peer ended the connection and said why.
    #[error("peer {peer} disconnected: {reason:?}: {detail}")]
    PeerDisconnected {
        /// The peer's address.
        peer: SocketAddr,
        /// The reason code.
        reason: DisconnectReason,
        /// The peer's explanation.
        detail: String,
    },
    /// The Hellos do not describe the same pair and volume.
    #[error("peer {peer} is not this volume's partner: {detail}")]
    Mismatch {
        /// The peer's address.
        peer: SocketAddr,
        /// The reason sent to the peer.
        reason: DisconnectReason,
        /// Both values, and the fix.
        detail: String,
    },
    /// The peer sent a message out of place in the handshake.
    #[error("peer {peer} sent {got:?} during the handshake where {expected} was due — run the same twinvol version on both nodes")]
    Unexpected {
        /// The peer's address.
        peer: SocketAddr,
        /// What was due.
        expected: &'static str,
        /// What came.
        got: MessageKind,
    },
    /// The OS random generator failed.
    #[error("cannot read random bytes for the authentication nonce: {0}")]
    Random(String),
}

impl LinkError {
    /// A stable name for this kind of failure, the same for every attempt that fails this way
    /// (messages differ: they name each attempt's ephemeral port), for status and alerts.
    pub fn kind(&self) -> &'static str {
        self.class().0
    }

    /// Whether retrying cannot fix this: the nodes disagree on keys, protocol version, volume or
    /// node identity, or this node's own settings (address, interface, codec) are unusable.
    /// Everything else (the peer down or unreachable, a timeout, a broken or corrupted
    /// connection) may pass by itself.
    pub fn needs_operator(&self) -> bool {
        self.class().1
    }

    /// True when the peer's bytes failed frame verification (checksum, magic, length): the
    /// frame was refused before anything in it was used.
    pub fn is_corrupt_frame(&self) -> bool {
        matches!(self, Self::Wire { .. })
    }

    /// One row per variant: its [`Self::kind`] and [`Self::needs_operator`].
    fn class(&self) -> (&'static str, bool) {
        use DisconnectReason as R;
        match self {
            Self::Bind { .. } => ("bind", true),
            Self::Device { .. } => ("interface", true),
            Self::SocketOption { .. } => ("socket-option", true),
            Self::Connect { .. } => ("connect", false),
            Self::ConnectTimeout { .. } => ("connect-timeout", false),
            Self::Accept { .. } => ("accept", false),
            Self::NotPeer { .. } => ("not-peer", true),
            Self::HandshakeTimeout { .. } => ("handshake-timeout", false),
            Self::Io { .. } => ("io", false),
            Self::Closed { .. } => ("closed", false),
            Self::Wire { .. } => ("corrupt-frame", false),
            Self::Encode { .. } => ("encode", false),
            Self::Codec(_) => ("codec-settings", true),
            Self::AuthFailed { .. } => ("auth-failed", true),
            Self::AuthRejectedByPeer { .. } => ("auth-rejected", true),
            Self::PeerDisconnected { reason, .. } => (
                "peer-disconnected",
                matches!(
                    reason,
                    R::AuthFailed
                        | R::ProtocolVersion
                        | R::VolumeMismatch
                        | R::NodeMismatch
                        | R::SplitBrain
                        | R::UnrelatedData
                ),
            ),
            Self::Mismatch { .. } => ("mismatch", true),
            Self::Unexpected { .. } => ("unexpected-message", true),
            Self::Random(_) => ("random", false),
        }
    }
}

/// Turns a bind errno into words an operator can act on.
pub(super) fn bind_problem(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EADDRNOTAVAIL) => "address not on any interface".into(),
        Some(libc::EADDRINUSE) => {
            "address already in use (another twinvol or service holds this port)".into()
        }
        Some(libc::EACCES) => {
            "permission denied (ports below 1024 need CAP_NET_BIND_SERVICE)".into()
        }
        _ => e.to_string(),
    }
}

/// Turns an SO_BINDTODEVICE errno into words an operator can act on.
pub(super) fn device_problem(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ENODEV) => "no interface with this name on this node".into(),
        Some(libc::EPERM) => "permission denied (needs CAP_NET_RAW on this kernel)".into(),
        Some(libc::EINVAL) => "invalid interface name".into(),
        _ => e.to_string(),
    }
}
