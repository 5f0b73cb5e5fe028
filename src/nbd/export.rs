//! `twinvol export`: serve one local device or file over NBD on a Unix socket, TCP, or stdio.
//!
//! Picks the engine (probe, or forced), opens the device on the data-path thread, binds the
//! listener, and runs the server until SIGTERM/SIGINT, then drains in-flight work and flushes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Duration;

use std::sync::Arc;

use tokio::sync::{mpsc, watch};

use super::server::{budget_for, serve_connection, ServerConfig, Shared};
use crate::block::BlockTarget;
use crate::engine::{self, CacheMode, Engine, EngineError, EngineKind, OpenOptions};

/// Where the export listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A Unix domain socket path.
    Unix(PathBuf),
    /// A TCP address.
    Tcp(SocketAddr),
    /// One client on stdin/stdout (for fuzzing and inetd-style use).
    Stdio,
}

/// Everything `twinvol export` needs.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// Device or file to serve.
    pub path: PathBuf,
    /// Listening endpoint.
    pub endpoint: Endpoint,
    /// Export name ("" = default).
    pub name: String,
    /// Refuse writes.
    pub read_only: bool,
    /// Force an engine; `None` probes io_uring and falls back to sync.
    pub engine: Option<EngineKind>,
    /// Page-cache mode.
    pub cache: CacheMode,
    /// Server tuning.
    pub server: ServerConfig,
    /// Data-path threads (each with its own ring); at least 1.
    pub threads: usize,
    /// Bytes at the device's end that are not served (a twinvol metadata area, served
    /// read-only without it).
    pub reserved_tail: u64,
}

/// Default number of data-path threads: one per core, at most 4.
pub fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(4)
}

/// Errors of the export command.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// Opening the device or starting the runtime failed.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// Another process owns the device.
    #[error(transparent)]
    InUse(#[from] crate::engine::claim::ClaimError),
    /// The device is a mirrored volume's: its metadata must see every write.
    #[error("{path} holds twinvol metadata ({detail}): serving it as a plain device would write behind its dirty bitmap, and the two copies could differ with nothing recording where. Run it with `twinvol run` (or `twinvol mirror`); `twinvol export --read-only` serves its data area only; `twinvol export --degraded-primary` serves it as a Primary without its peer, recording every write for the resync")]
    HoldsMetadata {
        /// The device.
        path: PathBuf,
        /// What was found.
        detail: String,
    },
    /// The metadata could not be looked for.
    #[error("{path}: {source}")]
    Probe {
        /// The device.
        path: PathBuf,
        /// Why.
        #[source]
        source: crate::meta::store::StoreError,
    },
    /// The listener could not be created.
    #[error("cannot listen on {endpoint}: {source} ({fix})")]
    Listen {
        /// The endpoint.
        endpoint: String,
        /// Why.
        #[source]
        source: std::io::Error,
        /// What to do.
        fix: &'static str,
    },
    /// The socket path is served by another live process.
    #[error("{0} is in use by another server; stop it or choose another --socket")]
    SocketInUse(PathBuf),
    /// Signal handlers or a data-path thread could not be set up.
    #[error("cannot set up the process (signal handlers or threads): {0}")]
    Signals(std::io::Error),
    /// A data-path thread could not open the device.
    #[error("a data-path thread could not open the device (see the log above)")]
    WorkerStart,
    /// The final flush failed: some acknowledged writes may not be durable.
    #[error("final flush failed: {0}")]
    Flush(crate::block::BlockError),
}

/// What the device's tail holds (twinvol metadata or not), as an export decides on it.
pub fn probe_device(path: &std::path::Path) -> Result<crate::meta::store::Probed, ExportError> {
    crate::meta::store::probe_path(path).map_err(|source| ExportError::Probe {
        path: path.to_path_buf(),
        source,
    })
}

/// Refuses a device that holds twinvol metadata (or what is left of it): only the mirrored
/// volume may write it.
pub fn refuse_metadata_device(path: &std::path::Path) -> Result<(), ExportError> {
    refuse_probed(path, &probe_device(path)?)
}

/// [`refuse_metadata_device`] for a device already probed.
pub fn refuse_probed(
    path: &std::path::Path,
    probed: &crate::meta::store::Probed,
) -> Result<(), ExportError> {
    use crate::meta::store::Probed;
    let detail = match probed {
        Probed::Nothing => return Ok(()),
        Probed::Metadata {
            data_size, current, ..
        } => format!("{data_size} data bytes, generation {current:016x}"),
        Probed::Damaged(why) => format!("damaged: {why}"),
    };
    Err(ExportError::HoldsMetadata {
        path: path.to_path_buf(),
        detail,
    })
}

/// Picks the engine: the forced one, or io_uring when the kernel allows it, else sync.
pub fn choose_engine(forced: Option<EngineKind>) -> Result<EngineKind, EngineError> {
    match forced {
        Some(EngineKind::Uring) => {
            engine::probe_uring().map_err(EngineError::UringUnavailable)?;
            Ok(EngineKind::Uring)
        }
        Some(EngineKind::Sync) => Ok(EngineKind::Sync),
        None => match engine::probe_uring() {
            Ok(()) => Ok(EngineKind::Uring),
            Err(why) => {
                tracing::warn!(reason = %why, "io_uring unavailable; using the sync engine");
                Ok(EngineKind::Sync)
            }
        },
    }
}

/// Runs the export until a signal (or, for stdio, until the client leaves).
///
/// With `threads > 1`, every data-path thread runs its own runtime (its own io_uring ring) and
/// its own descriptors of the device; accepted connections are dealt round-robin. The threads
/// share the payload byte budget and the read-modify-write lock, and FLUSH (fdatasync) acts on
/// the inode, so CAN_MULTI_CONN holds across threads as it does within one.
pub fn run(opts: ExportOptions) -> Result<(), ExportError> {
    // Held until the export has stopped: this process owns the device.
    let _claim = crate::engine::claim::DeviceClaim::take(&opts.path)?;
    let kind = choose_engine(opts.engine)?;
    if opts.endpoint == Endpoint::Stdio {
        return engine::block_on(kind, serve_stdio(kind, opts))?;
    }
    let threads = opts.threads.max(1);
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let budget = budget_for(&opts.server);
    let rmw: Arc<tokio::sync::RwLock<()>> = Default::default();
    let (ready_tx, ready_rx) = mpsc::unbounded_channel();
    let mut senders = Vec::with_capacity(threads);
    let mut receivers = Vec::with_capacity(threads);
    for _ in 0..threads {
        let (tx, rx) = mpsc::unbounded_channel::<StdConn>();
        senders.push(tx);
        receivers.push(rx);
    }
    let own = receivers.remove(0);
    let mut handles = Vec::new();
    for (i, conns) in receivers.into_iter().enumerate() {
        let w = Worker {
            index: i + 1,
            kind,
            opts: opts.clone(),
            budget: budget.clone(),
            rmw: rmw.clone(),
            shutdown: shutdown_rx.clone(),
            ready: ready_tx.clone(),
        };
        let h = std::thread::Builder::new()
            .name(format!("twinvol-data-{}", i + 1))
            .spawn(move || engine::block_on(kind, w.run(conns)))
            .map_err(ExportError::Signals)?;
        handles.push(h);
    }
    let w0 = Worker {
        index: 0,
        kind,
        opts: opts.clone(),
        budget,
        rmw,
        shutdown: shutdown_rx,
        ready: ready_tx,
    };
    let result = engine::block_on(
        kind,
        accept_loop(opts, w0, own, senders, shutdown_tx, ready_rx, threads),
    )?;
    for h in handles {
        match h.join() {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::error!(error = %e, "data-path thread failed"),
            Ok(Err(e)) => tracing::error!(error = %e, "data-path runtime failed"),
            Err(_) => tracing::error!("data-path thread panicked"),
        }
    }
    result
}

async fn serve_stdio(kind: EngineKind, opts: ExportOptions) -> Result<(), ExportError> {
    let engine = Rc::new(Engine::open(kind, &open_options(&opts))?);
    let (_tx, rx) = watch::channel(false);
    let shared = Shared::new(engine.clone(), opts.name.clone(), &opts.server, rx);
    if let Err(e) = serve_connection(shared, tokio::io::stdin(), tokio::io::stdout()).await {
        tracing::info!(error = %e, "stdio connection ended");
    }
    engine.flush().await.map_err(ExportError::Flush)
}

fn open_options(opts: &ExportOptions) -> OpenOptions {
    let mut open = OpenOptions::new(&opts.path);
    open.read_only = opts.read_only;
    open.cache = opts.cache;
    open.reserved_tail = opts.reserved_tail;
    open
}

/// An accepted connection on its way to a data-path thread.
enum StdConn {
    Unix(std::os::unix::net::UnixStream),
    Tcp(std::net::TcpStream, std::net::SocketAddr),
}

impl StdConn {
    fn into_tokio(self) -> std::io::Result<(BoxRead, BoxWrite, String)> {
        match self {
            StdConn::Unix(s) => {
                enlarge_send_buffer(&s);
                let (r, w) = tokio::net::UnixStream::from_std(s)?.into_split();
                Ok((Box::new(r), Box::new(w), "unix".into()))
            }
            StdConn::Tcp(s, peer) => {
                let s = tokio::net::TcpStream::from_std(s)?;
                s.set_nodelay(true)?;
                let (r, w) = s.into_split();
                Ok((Box::new(r), Box::new(w), peer.to_string()))
            }
        }
    }
}

/// Send buffer of accepted Unix sockets. On AF_UNIX streams the sender's buffer bounds what is
/// queued, and the default (~208 KiB) splits every 1 MiB READ reply into several wake-ups.
const UNIX_SEND_BUFFER: usize = 4 * 1024 * 1024;

/// Raises the socket's send buffer (SO_SNDBUFFORCE when permitted, else SO_SNDBUF up to
/// net.core.wmem_max). Best effort: a smaller buffer only costs throughput.
fn enlarge_send_buffer(s: &std::os::unix::net::UnixStream) {
    use nix::sys::socket::{setsockopt, sockopt};
    if setsockopt(s, sockopt::SndBufForce, &UNIX_SEND_BUFFER).is_err() {
        let _ = setsockopt(s, sockopt::SndBuf, &UNIX_SEND_BUFFER);
    }
}

/// One data-path thread: its own engine on the device, serving the connections it is dealt.
struct Worker {
    index: usize,
    kind: EngineKind,
    opts: ExportOptions,
    budget: Arc<tokio::sync::Semaphore>,
    rmw: Arc<tokio::sync::RwLock<()>>,
    shutdown: watch::Receiver<bool>,
    ready: mpsc::UnboundedSender<Result<crate::block::TargetInfo, String>>,
}

impl Worker {
    async fn run(self, mut conns: mpsc::UnboundedReceiver<StdConn>) -> Result<(), ExportError> {
        let engine = match Engine::open(self.kind, &open_options(&self.opts)) {
            Ok(e) => Rc::new(e.with_rmw_lock(self.rmw.clone())),
            Err(e) => {
                let _ = self.ready.send(Err(e.to_string()));
                return Err(e.into());
            }
        };
        let _ = self.ready.send(Ok(engine.info().clone()));
        let shared = Shared::new(
            engine.clone(),
            self.opts.name.clone(),
            &self.opts.server,
            self.shutdown.clone(),
        )
        .with_budget(self.budget.clone());
        let mut set = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                c = conns.recv() => match c {
                    Some(c) => {
                        let s = shared.clone();
                        let index = self.index;
                        set.spawn_local(async move {
                            match c.into_tokio() {
                                Ok((r, w, peer)) => {
                                    tracing::debug!(%peer, thread = index, "client connected");
                                    if let Err(e) = serve_connection(s, r, w).await {
                                        tracing::info!(%peer, error = %e, "connection ended");
                                    }
                                }
                                Err(e) => tracing::warn!(error = %e, "cannot adopt an accepted connection"),
                            }
                        });
                    }
                    None => break,
                },
                Some(_) = set.join_next(), if !set.is_empty() => {}
            }
        }
        let grace = self.opts.server.shutdown_grace;
        if !set.is_empty() {
            tracing::info!(
                thread = self.index,
                connections = set.len(),
                ?grace,
                "finishing in-flight requests"
            );
        }
        let drained =
            tokio::time::timeout(grace, async { while set.join_next().await.is_some() {} }).await;
        if drained.is_err() {
            tracing::warn!(
                thread = self.index,
                left = set.len(),
                "grace period over; closing remaining connections"
            );
            set.shutdown().await;
        }
        engine.flush().await.map_err(ExportError::Flush)
    }
}

async fn accept_loop(
    opts: ExportOptions,
    w0: Worker,
    own: mpsc::UnboundedReceiver<StdConn>,
    senders: Vec<mpsc::UnboundedSender<StdConn>>,
    shutdown_tx: watch::Sender<bool>,
    mut ready: mpsc::UnboundedReceiver<Result<crate::block::TargetInfo, String>>,
    threads: usize,
) -> Result<(), ExportError> {
    let kind = w0.kind;
    let mut shutdown = w0.shutdown.clone();
    let worker0 = tokio::task::spawn_local(w0.run(own));
    let mut info = None;
    for _ in 0..threads {
        match ready.recv().await {
            Some(Ok(i)) => info = Some(i),
            Some(Err(_)) | None => {
                let _ = shutdown_tx.send(true);
                drop(senders);
                return match worker0.await {
                    Ok(Err(e)) => Err(e),
                    _ => Err(ExportError::WorkerStart),
                };
            }
        }
    }
    if let Some(info) = &info {
        tracing::info!(path = %opts.path.display(), size = info.size, engine = %kind, cache = %opts.cache,
            min_block = info.min_block, threads, "export ready");
    }
    let listener = match Listener::bind(&opts.endpoint).await {
        Ok(l) => l,
        Err(e) => {
            drop(senders);
            let _ = worker0.await;
            return Err(e);
        }
    };
    crate::stderr_line!(
        "twinvol: serving {} on {}",
        opts.path.display(),
        listener.uri(&opts.name)
    );
    spawn_signal_watch(shutdown_tx)?;
    let mut next = 0usize;
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            accepted = listener.accept_std() => match accepted {
                Ok(conn) => {
                    // Deal round-robin; a thread that has gone away is skipped.
                    let mut conn = Some(conn);
                    for _ in 0..senders.len() {
                        let i = next % senders.len();
                        next += 1;
                        match senders[i].send(conn.take().expect("connection present")) {
                            Ok(()) => break,
                            Err(mpsc::error::SendError(c)) => conn = Some(c),
                        }
                    }
                    if conn.is_some() {
                        tracing::error!("no data-path thread is running; stopping");
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
    tracing::info!(
        "shutting down: no new connections; in-flight requests finish, new ones get ESHUTDOWN"
    );
    drop(senders);
    listener.cleanup();
    let r = match worker0.await {
        Ok(r) => r,
        Err(e) => Err(ExportError::Flush(crate::block::BlockError::new(
            "data-path thread 0",
            std::io::Error::other(e.to_string()),
        ))),
    };
    if r.is_ok() {
        tracing::info!("export stopped cleanly");
    }
    r
}

fn spawn_signal_watch(tx: watch::Sender<bool>) -> Result<(), ExportError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(ExportError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(ExportError::Signals)?;
    tokio::task::spawn_local(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
        let _ = tx.send(true);
    });
    Ok(())
}

/// The read half of an accepted connection.
pub type BoxRead = Box<dyn tokio::io::AsyncRead + Unpin>;
/// The write half of an accepted connection.
pub type BoxWrite = Box<dyn tokio::io::AsyncWrite + Unpin>;

/// A bound listener of either kind.
pub enum Listener {
    /// Unix socket and its path (removed on cleanup).
    Unix(tokio::net::UnixListener, PathBuf),
    /// TCP.
    Tcp(tokio::net::TcpListener),
}

impl Listener {
    /// Binds `endpoint`; a stale Unix socket file (nobody listening) is replaced.
    pub async fn bind(endpoint: &Endpoint) -> Result<Self, ExportError> {
        match endpoint {
            Endpoint::Unix(path) => {
                if path.exists() {
                    if tokio::net::UnixStream::connect(path).await.is_ok() {
                        return Err(ExportError::SocketInUse(path.clone()));
                    }
                    let _ = std::fs::remove_file(path);
                }
                let l =
                    tokio::net::UnixListener::bind(path).map_err(|source| ExportError::Listen {
                        endpoint: path.display().to_string(),
                        source,
                        fix: "check that the directory exists and is writable",
                    })?;
                Ok(Listener::Unix(l, path.clone()))
            }
            Endpoint::Tcp(addr) => {
                let l = tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|source| ExportError::Listen {
                        endpoint: addr.to_string(),
                        source,
                        fix: "check the address is local and the port is free",
                    })?;
                Ok(Listener::Tcp(l))
            }
            Endpoint::Stdio => unreachable!("stdio has no listener"),
        }
    }

    /// Accepts one client on the calling thread, split into read and write halves.
    pub async fn accept(&self) -> std::io::Result<(BoxRead, BoxWrite, String)> {
        self.accept_std().await?.into_tokio()
    }

    /// Accepts one client, as a std socket that any data-path thread can adopt.
    async fn accept_std(&self) -> std::io::Result<StdConn> {
        match self {
            Listener::Unix(l, _) => {
                let (s, _) = l.accept().await?;
                Ok(StdConn::Unix(s.into_std()?))
            }
            Listener::Tcp(l) => {
                let (s, peer) = l.accept().await?;
                Ok(StdConn::Tcp(s.into_std()?, peer))
            }
        }
    }

    /// An NBD URI clients can use (nbdinfo, nbdcopy, qemu).
    pub fn uri(&self, name: &str) -> String {
        match self {
            Listener::Unix(_, p) => format!("nbd+unix:///{name}?socket={}", p.display()),
            Listener::Tcp(l) => match l.local_addr() {
                Ok(a) => format!("nbd://{a}/{name}"),
                Err(_) => "nbd://(unknown)".into(),
            },
        }
    }

    /// Removes the socket file of a Unix listener.
    pub fn cleanup(&self) {
        if let Listener::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Serves every client `listener` accepts with `shared`, on the calling thread, until `stop`
/// completes. Then removes the listener's socket, calls `closing` (which must make `shared`'s
/// shutdown signal true, if `stop` did not already), waits up to `grace` for the open
/// connections to finish their requests, and cuts the rest. Returns when no connection task is
/// left: a final flush after this covers every acknowledged write.
pub async fn serve_on<T: BlockTarget + 'static>(
    listener: Listener,
    shared: Shared<T>,
    grace: Duration,
    stop: impl std::future::Future<Output = ()>,
    closing: impl FnOnce(),
) {
    let mut conns = tokio::task::JoinSet::new();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok((r, w, peer)) => {
                    let s = shared.clone();
                    conns.spawn_local(async move {
                        if let Err(e) = serve_connection(s, r, w).await {
                            tracing::debug!(%peer, error = %e, "NBD connection ended");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    listener.cleanup();
    closing();
    if tokio::time::timeout(grace, async { while conns.join_next().await.is_some() {} })
        .await
        .is_err()
    {
        conns.shutdown().await;
    }
}
