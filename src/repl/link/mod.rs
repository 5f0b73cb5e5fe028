//! `repl::link`: the authenticated TCP connection to the peer over the replication network.
//!
//! - Connecting binds the configured local replication IP first (and the named interface with
//!   SO_BINDTODEVICE), so mirror traffic uses the dedicated ENI; then TCP_NODELAY, large socket
//!   buffers and TCP keepalive; then the handshake of docs/PROTOCOL.md under a timeout.
//! - Listening binds the same address; connections from any IP but the configured peer's are
//!   closed before a byte is read.
//! - [`connect_retrying`] reconnects with exponential backoff and jitter ([`backoff`]).
//! - [`liveness`] decides when to ping and when a silent peer is dead.
//!
//! Which side connects is the caller's choice (e.g. the node with the smaller id listens);
//! both sides speak the same protocol after the handshake.

pub mod backoff;
mod error;
mod framed;
pub mod handshake;
pub mod keyfile;
pub mod liveness;
mod socket;
pub mod writer;

#[cfg(test)]
pub(crate) mod tests;

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

pub use backoff::{Backoff, BackoffPolicy};
pub use error::LinkError;
pub use framed::{FrameReader, FrameWriter, Framed, SendState, Traffic};
pub use handshake::PeerInfo;
pub use keyfile::{load_key_file, KeyFileError};
pub use liveness::{Liveness, LivenessAction};
pub use writer::{SentTraffic, WriterThread};

use crate::repl::wire::auth::{PreSharedKey, Role};
use crate::repl::wire::{FrameDecoder, FrameEncoder, Hello, Message, DEFAULT_MAX_PAYLOAD};

/// Default socket send and receive buffer size.
pub const DEFAULT_SOCKET_BUFFER: usize = 4 << 20;

/// Everything needed to reach and authenticate the peer.
///
/// Invariant: holds the key only inside [`PreSharedKey`], so `Debug` of a config is safe to log.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// This node's replication address (`replication.address`): the listener binds it; an
    /// outgoing connection binds its IP with an ephemeral port.
    pub local: SocketAddr,
    /// The peer's replication address (`replication.peer`); only its IP may connect to us.
    pub peer: SocketAddr,
    /// Interface to pin the sockets to (`replication.interface`), e.g. the dedicated ENI `ens6`.
    pub interface: Option<String>,
    /// SO_SNDBUF / SO_RCVBUF in bytes.
    pub socket_buffer: usize,
    /// Idle time before TCP keepalive probes (at least 1 s).
    pub keepalive: Duration,
    /// Bound on the TCP connect.
    pub connect_timeout: Duration,
    /// Bound on the whole handshake.
    pub handshake_timeout: Duration,
    /// The pre-shared key.
    pub key: PreSharedKey,
    /// What this node says about itself.
    pub hello: Hello,
    /// zstd level for frames sent (0 = off).
    pub compression_level: i32,
    /// Largest frame payload sent or accepted.
    pub max_payload: u32,
}

impl LinkConfig {
    /// A config with default socket, timeout and codec settings.
    pub fn new(local: SocketAddr, peer: SocketAddr, key: PreSharedKey, hello: Hello) -> Self {
        Self {
            local,
            peer,
            interface: None,
            socket_buffer: DEFAULT_SOCKET_BUFFER,
            keepalive: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(10),
            key,
            hello,
            compression_level: 1,
            max_payload: DEFAULT_MAX_PAYLOAD,
        }
    }

    fn framed(&self, stream: TcpStream, peer: SocketAddr) -> Result<Framed<TcpStream>, LinkError> {
        let enc = FrameEncoder::new(self.compression_level, self.max_payload)?;
        let dec = FrameDecoder::new(self.max_payload)?;
        Ok(Framed::new(stream, peer, enc, dec))
    }

    async fn handshake(&self, mut io: Framed<TcpStream>, role: Role) -> Result<Link, LinkError> {
        let peer = io.peer();
        let after = self.handshake_timeout;
        match tokio::time::timeout(after, handshake::run(&mut io, role, &self.key, &self.hello))
            .await
        {
            Ok(Ok(info)) => Ok(Link { io, info }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(LinkError::HandshakeTimeout { peer, after }),
        }
    }
}

/// The receiving side of a [`Link`] whose sending side is a [`WriterThread`].
pub type ThreadedReader = FrameReader<TcpStream>;

/// An authenticated connection to the peer.
#[derive(Debug)]
pub struct Link {
    io: Framed<TcpStream>,
    info: PeerInfo,
}

impl Link {
    /// The peer's Hello and the negotiated protocol version.
    pub fn peer_info(&self) -> &PeerInfo {
        &self.info
    }

    /// The peer's socket address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.io.peer()
    }

    /// This end's socket address.
    pub fn local_addr(&self) -> Result<SocketAddr, LinkError> {
        self.io
            .get_ref()
            .local_addr()
            .map_err(|source| LinkError::Io {
                peer: self.io.peer(),
                source,
            })
    }

    /// The TCP stream (for inspecting socket options).
    pub fn stream(&self) -> &TcpStream {
        self.io.get_ref()
    }

    /// Traffic `(sent, received)` so far, handshake included.
    pub fn traffic(&self) -> (Traffic, Traffic) {
        self.io.traffic()
    }

    /// Splits into a reader on this thread and a writer on a thread of its own (encoding and
    /// socket writes beside the caller's work); `sent` grows by what the writer sends;
    /// `background`: the writer yields the CPU to the caller's work (see [`WriterThread::spawn`]).
    /// The reader is woken once per large frame ([`FrameReader::wake_per_frame`]).
    pub fn into_threaded(
        self,
        sent: SentTraffic,
        background: bool,
    ) -> Result<(PeerInfo, ThreadedReader, WriterThread), LinkError> {
        let peer = self.io.peer();
        let (mut reader, state) = self.io.detach_sender();
        if !reader.wake_per_frame() {
            tracing::debug!(%peer, "cannot read the replication socket's receive buffer; the reader is woken per segment");
        }
        let writer = WriterThread::spawn(reader.get_ref(), state, sent, background)?;
        Ok((self.info, reader, writer))
    }

    /// Sends one message.
    pub async fn send(&mut self, msg: &Message) -> Result<(), LinkError> {
        self.io.send(msg).await
    }

    /// Queues a message without writing (batching); [`Link::flush`] writes the batch.
    pub fn queue(&mut self, msg: &Message) -> Result<(), LinkError> {
        self.io.queue(msg)
    }

    /// Writes every queued message.
    pub async fn flush(&mut self) -> Result<(), LinkError> {
        self.io.flush().await
    }

    /// The next verified message.
    pub async fn recv(&mut self) -> Result<Message, LinkError> {
        self.io.recv().await
    }

    /// The next verified message, or `Ok(None)` when none arrives within `after` (the
    /// building block of ping timeouts). A partial frame stays buffered for the next call.
    pub async fn recv_timeout(&mut self, after: Duration) -> Result<Option<Message>, LinkError> {
        match tokio::time::timeout(after, self.io.recv()).await {
            Ok(r) => r.map(Some),
            Err(_) => Ok(None),
        }
    }
}

/// Connects to `cfg.peer` from `cfg.local`'s IP and runs the handshake as initiator.
pub async fn connect(cfg: &LinkConfig) -> Result<Link, LinkError> {
    let local = SocketAddr::new(cfg.local.ip(), 0);
    let s = socket::bound_socket(cfg, local, false)?;
    let bound = s.local_addr().unwrap_or(local);
    let stream = match tokio::time::timeout(cfg.connect_timeout, s.connect(cfg.peer)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(source)) => {
            return Err(LinkError::Connect {
                local: bound,
                peer: cfg.peer,
                source,
            })
        }
        Err(_) => {
            return Err(LinkError::ConnectTimeout {
                peer: cfg.peer,
                after: cfg.connect_timeout,
            })
        }
    };
    socket::tune_stream(cfg, &stream)?;
    let io = cfg.framed(stream, cfg.peer)?;
    cfg.handshake(io, Role::Initiator).await
}

/// Connects until it succeeds or `max_attempts` failed (`None`: forever), sleeping with
/// backoff between attempts; every failure is logged. Returns the last error when giving up.
pub async fn connect_retrying(
    cfg: &LinkConfig,
    policy: BackoffPolicy,
    max_attempts: Option<u32>,
) -> Result<Link, LinkError> {
    let mut backoff = Backoff::new(policy);
    loop {
        match connect(cfg).await {
            Ok(link) => return Ok(link),
            Err(e) => {
                let attempt = backoff.attempts() + 1;
                if max_attempts.is_some_and(|m| attempt >= m) {
                    return Err(e);
                }
                let delay = backoff.next_delay_random();
                tracing::warn!(peer = %cfg.peer, attempt, retry_in = ?delay, error = %e, "replication connect failed");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Accepts replication connections on `cfg.local`, from `cfg.peer`'s IP only.
#[derive(Debug)]
pub struct LinkListener {
    listener: TcpListener,
    cfg: LinkConfig,
}

impl LinkListener {
    /// Binds `cfg.local` (and the interface) and listens.
    pub fn bind(cfg: LinkConfig) -> Result<Self, LinkError> {
        let s = socket::bound_socket(&cfg, cfg.local, true)?;
        let listener = s.listen(16).map_err(|source| LinkError::Bind {
            addr: cfg.local,
            problem: source.to_string(),
            source,
        })?;
        Ok(Self { listener, cfg })
    }

    /// Replaces the Hello sent to the next connections (generation ids change while a
    /// volume runs; the listener outlives them).
    pub fn set_hello(&mut self, hello: Hello) {
        self.cfg.hello = hello;
    }

    /// The bound address (useful when `cfg.local` had port 0).
    pub fn local_addr(&self) -> Result<SocketAddr, LinkError> {
        self.listener
            .local_addr()
            .map_err(|source| LinkError::Accept {
                local: self.cfg.local,
                source,
            })
    }

    /// Accepts one connection and authenticates it.
    ///
    /// A connection from a non-peer IP is closed unread and reported as
    /// [`LinkError::NotPeer`]; like handshake failures this concerns one connection only, and
    /// the listener stays usable: log it and call `accept` again.
    pub async fn accept(&self) -> Result<Link, LinkError> {
        let (stream, from) = self
            .listener
            .accept()
            .await
            .map_err(|source| LinkError::Accept {
                local: self.cfg.local,
                source,
            })?;
        if from.ip() != self.cfg.peer.ip() {
            drop(stream);
            return Err(LinkError::NotPeer {
                from,
                expected: self.cfg.peer.ip(),
            });
        }
        socket::tune_stream(&self.cfg, &stream)?;
        let io = self.cfg.framed(stream, from)?;
        self.cfg.handshake(io, Role::Acceptor).await
    }
}
