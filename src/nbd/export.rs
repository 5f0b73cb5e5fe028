//! `twinvol export`: serve one local device or file over NBD on a Unix socket, TCP, or stdio.
//!
//! Picks the engine (probe, or forced), opens the device on the data-path thread, binds the
//! listener, and runs the server until SIGTERM/SIGINT, then drains in-flight work and flushes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Duration;

use tokio::sync::watch;

use super::server::{serve_connection, ServerConfig, Shared};
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
}

/// Errors of the export command.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// Opening the device or starting the runtime failed.
    #[error(transparent)]
    Engine(#[from] EngineError),
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
    /// Signal handlers could not be installed.
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    /// The final flush failed: some acknowledged writes may not be durable.
    #[error("final flush failed: {0}")]
    Flush(crate::block::BlockError),
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
pub fn run(opts: ExportOptions) -> Result<(), ExportError> {
    let kind = choose_engine(opts.engine)?;
    engine::block_on(kind, serve(kind, opts))?
}

async fn serve(kind: EngineKind, opts: ExportOptions) -> Result<(), ExportError> {
    let mut open = OpenOptions::new(&opts.path);
    open.read_only = opts.read_only;
    open.cache = opts.cache;
    let engine = Rc::new(Engine::open(kind, &open)?);
    let (tx, rx) = watch::channel(false);
    let shared = Shared::new(engine.clone(), opts.name.clone(), &opts.server, rx);
    let info = engine.info();
    tracing::info!(
        path = %opts.path.display(),
        size = info.size,
        engine = %kind,
        cache = %engine.cache(),
        min_block = info.min_block,
        "export ready"
    );

    if opts.endpoint == Endpoint::Stdio {
        let r = serve_connection(shared, tokio::io::stdin(), tokio::io::stdout()).await;
        if let Err(e) = r {
            tracing::info!(error = %e, "stdio connection ended");
        }
        return engine.flush().await.map_err(ExportError::Flush);
    }

    let listener = Listener::bind(&opts.endpoint).await?;
    eprintln!(
        "twinvol: serving {} on {}",
        opts.path.display(),
        listener.uri(&opts.name)
    );
    spawn_signal_watch(tx)?;
    let mut shutdown = shared.shutdown.clone();
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok((r, w, peer)) => {
                    tracing::debug!(%peer, "client connected");
                    let s = shared.clone();
                    conns.spawn_local(async move {
                        if let Err(e) = serve_connection(s, r, w).await {
                            tracing::info!(%peer, error = %e, "connection ended");
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
    tracing::info!(connections = conns.len(), grace = ?opts.server.shutdown_grace, "shutting down: finishing in-flight requests");
    let drained = tokio::time::timeout(opts.server.shutdown_grace, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            left = conns.len(),
            "grace period over; closing remaining connections"
        );
        conns.shutdown().await;
    }
    listener.cleanup();
    engine.flush().await.map_err(ExportError::Flush)?;
    tracing::info!("export stopped cleanly");
    Ok(())
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

type BoxRead = Box<dyn tokio::io::AsyncRead + Unpin>;
type BoxWrite = Box<dyn tokio::io::AsyncWrite + Unpin>;

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

    /// Accepts one client, split into read and write halves.
    pub async fn accept(&self) -> std::io::Result<(BoxRead, BoxWrite, String)> {
        match self {
            Listener::Unix(l, _) => {
                let (s, _) = l.accept().await?;
                let (r, w) = s.into_split();
                Ok((Box::new(r), Box::new(w), "unix".into()))
            }
            Listener::Tcp(l) => {
                let (s, peer) = l.accept().await?;
                s.set_nodelay(true)?;
                let (r, w) = s.into_split();
                Ok((Box::new(r), Box::new(w), peer.to_string()))
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
