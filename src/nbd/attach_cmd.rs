//! `twinvol attach` / `twinvol detach`: put an export behind /dev/nbdN.
//!
//! The kernel speaks only the transmission phase, so every socket handed to it is negotiated here
//! first (fixed newstyle, NBD_OPT_GO, simple replies — the kernel does not understand structured
//! ones). The export is either a running server's Unix socket, or a local device/file served by
//! this process on socket pairs from a data-path thread.

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;

use super::kernel::{self, AttachParams, KernelError};
use super::proto::client::{encode_info_request, encode_option, parse_option_reply};
use super::proto::consts::{cf, info, opt, rep, IHAVEOPT, NBDMAGIC};
use super::server::{serve_connection, ServerConfig, Shared};
use crate::block::BlockTarget;
use crate::engine::{CacheMode, Engine, EngineKind, OpenOptions};

/// Errors of attach/detach.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// Negotiating with the export failed.
    #[error("negotiating with the export {what}: {why}")]
    Negotiate {
        /// Which export.
        what: String,
        /// What went wrong.
        why: String,
    },
    /// Socket I/O failed.
    #[error("socket I/O with {what}: {source}")]
    Io {
        /// Which export.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The kernel side failed.
    #[error(transparent)]
    Kernel(#[from] KernelError),
    /// The local export could not be started.
    #[error(transparent)]
    Export(#[from] super::export::ExportError),
}

/// What `twinvol attach` needs.
#[derive(Debug, Clone)]
pub struct AttachOptions {
    /// A Unix socket of a running `twinvol export`, or a device/file to serve in-process.
    pub source: PathBuf,
    /// The /dev/nbdN device.
    pub device: PathBuf,
    /// Export name to ask for.
    pub name: String,
    /// Connections (the kernel spreads I/O over them when the export can multi-conn).
    pub connections: usize,
    /// Per-request timeout in the kernel.
    pub timeout: Duration,
    /// How long the kernel queues I/O while the server is away (restart without I/O errors).
    pub dead_conn_timeout: Duration,
    /// Engine for an in-process export.
    pub engine: Option<EngineKind>,
}

/// Size and flags learnt from NBD_OPT_GO.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    /// Export size in bytes.
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
    /// Preferred block size (512..=4096 for the kernel's logical block size).
    pub block_size: u32,
}

/// Negotiates one connection for the kernel (blocking): afterwards it is in transmission phase.
pub fn negotiate_for_kernel(
    s: &mut UnixStream,
    name: &str,
    what: &str,
) -> Result<Negotiated, AttachError> {
    let io = |source| AttachError::Io {
        what: what.to_string(),
        source,
    };
    let bad = |why: String| AttachError::Negotiate {
        what: what.to_string(),
        why,
    };
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).map_err(io)?;
    if greeting[0..8] != NBDMAGIC.to_be_bytes() || greeting[8..16] != IHAVEOPT.to_be_bytes() {
        return Err(bad("not a newstyle NBD server (bad greeting)".into()));
    }
    let mut hello = (cf::FIXED_NEWSTYLE | cf::NO_ZEROES).to_be_bytes().to_vec();
    hello.extend(encode_option(
        opt::GO,
        &encode_info_request(name, &[info::BLOCK_SIZE]),
    ));
    s.write_all(&hello).map_err(io)?;
    let mut buf = Vec::new();
    let mut got: Option<(u64, u16)> = None;
    let mut block_size = 512u32;
    loop {
        while let Some((r, n)) = parse_option_reply(&buf).map_err(|e| bad(e.to_string()))? {
            buf.drain(..n);
            if r.reply_type & rep::ERR_BIT != 0 {
                return Err(bad(format!(
                    "server refused NBD_OPT_GO ({:#x}): {}",
                    r.reply_type,
                    String::from_utf8_lossy(&r.data)
                )));
            }
            match r.reply_type {
                rep::INFO if r.data.len() >= 12 && r.data[0..2] == info::EXPORT.to_be_bytes() => {
                    let size = u64::from_be_bytes(r.data[2..10].try_into().unwrap_or_default());
                    let flags = u16::from_be_bytes([r.data[10], r.data[11]]);
                    got = Some((size, flags));
                }
                rep::INFO
                    if r.data.len() >= 14 && r.data[0..2] == info::BLOCK_SIZE.to_be_bytes() =>
                {
                    let min = u32::from_be_bytes(r.data[2..6].try_into().unwrap_or_default());
                    block_size = min.clamp(512, 4096).next_power_of_two();
                }
                rep::ACK => {
                    let (size, flags) =
                        got.ok_or_else(|| bad("no NBD_INFO_EXPORT before ACK".into()))?;
                    return Ok(Negotiated {
                        size,
                        flags,
                        block_size,
                    });
                }
                _ => {}
            }
        }
        let mut tmp = [0u8; 4096];
        let n = s.read(&mut tmp).map_err(io)?;
        if n == 0 {
            return Err(bad("server closed the connection during negotiation".into()));
        }
        buf.extend_from_slice(&tmp[..n]);
    }
}

fn is_socket(p: &Path) -> bool {
    std::fs::metadata(p)
        .map(|m| m.file_type().is_socket())
        .unwrap_or(false)
}

/// Attaches and blocks until the device is detached (`twinvol detach` or a disconnect).
pub fn run_attach(o: AttachOptions) -> Result<(), AttachError> {
    let what = o.source.display().to_string();
    let n = o.connections.max(1);
    let mut streams = Vec::with_capacity(n);
    let mut server_thread = None;
    if is_socket(&o.source) {
        for _ in 0..n {
            streams.push(
                UnixStream::connect(&o.source).map_err(|source| AttachError::Io {
                    what: what.clone(),
                    source,
                })?,
            );
        }
    } else {
        // Serve the device in-process: one socket pair per connection, server ends on a data-path
        // thread. Only a plain device: a mirrored volume's goes through its export.
        super::export::refuse_metadata_device(&o.source)?;
        let claim = crate::engine::claim::DeviceClaim::take(&o.source)
            .map_err(super::export::ExportError::from)?;
        let kind =
            super::export::choose_engine(o.engine).map_err(super::export::ExportError::from)?;
        let mut server_ends = Vec::with_capacity(n);
        for _ in 0..n {
            let (a, b) = UnixStream::pair().map_err(|source| AttachError::Io {
                what: what.clone(),
                source,
            })?;
            streams.push(a);
            server_ends.push(b);
        }
        let path = o.source.clone();
        let name = o.name.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        server_thread = Some(
            std::thread::Builder::new()
                .name("twinvol-data".into())
                .spawn(move || {
                    // Owned for as long as this thread serves the device.
                    let _claim = claim;
                    let r = crate::engine::block_on(kind, async move {
                        let mut open = OpenOptions::new(&path);
                        open.cache = CacheMode::None;
                        let engine = match Engine::open(kind, &open) {
                            Ok(e) => Rc::new(e),
                            Err(e) => {
                                let _ = ready_tx.send(Err(e.to_string()));
                                return;
                            }
                        };
                        let (_tx, rx) = tokio::sync::watch::channel(false);
                        let shared =
                            Shared::new(engine.clone(), name, &ServerConfig::default(), rx);
                        let mut set = tokio::task::JoinSet::new();
                        for s in server_ends {
                            let shared = shared.clone();
                            set.spawn_local(async move {
                                let _ = s.set_nonblocking(true);
                                let Ok(s) = tokio::net::UnixStream::from_std(s) else {
                                    return;
                                };
                                let (r, w) = s.into_split();
                                if let Err(e) = serve_connection(shared, r, w).await {
                                    tracing::info!(error = %e, "kernel connection ended");
                                }
                            });
                        }
                        let _ = ready_tx.send(Ok(()));
                        while set.join_next().await.is_some() {}
                        if let Err(e) = engine.flush().await {
                            tracing::error!(error = %e, "final flush failed");
                        }
                    });
                    if let Err(e) = r {
                        tracing::error!(error = %e, "data path runtime failed");
                    }
                })
                .map_err(|source| AttachError::Io {
                    what: what.clone(),
                    source,
                })?,
        );
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(why)) => return Err(AttachError::Negotiate { what, why }),
            Err(_) => {
                return Err(AttachError::Negotiate {
                    what,
                    why: "data path thread ended at start-up".into(),
                })
            }
        }
    }
    let mut negotiated = None;
    for s in &mut streams {
        negotiated = Some(negotiate_for_kernel(s, &o.name, &what)?);
    }
    let neg = negotiated.ok_or_else(|| AttachError::Negotiate {
        what: what.clone(),
        why: "no connection".into(),
    })?;
    let params = AttachParams {
        device: o.device.clone(),
        size: neg.size,
        block_size: neg.block_size,
        flags: neg.flags,
        timeout: o.timeout,
        dead_conn_timeout: o.dead_conn_timeout,
        backend_id: format!("twinvol:{what}"),
    };
    let fds: Vec<OwnedFd> = streams.into_iter().map(OwnedFd::from).collect();
    let attached = kernel::attach(&params, fds)?;
    crate::stderr_line!(
        "twinvol: {} attached to {what} ({} bytes); `twinvol detach {}` to release it",
        o.device.display(),
        neg.size,
        o.device.display()
    );
    attached.wait(Duration::from_secs(1))?;
    if let Some(t) = server_thread {
        let _ = t.join();
    }
    Ok(())
}

/// `twinvol detach /dev/nbdN`.
pub fn run_detach(device: &Path) -> Result<(), AttachError> {
    kernel::detach(device)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::mem::MemTarget;

    /// Serves a RAM disk named `name` on one end of a socket pair from a thread; returns the other end.
    fn mem_server(name: &str, size: u64) -> (UnixStream, std::thread::JoinHandle<()>) {
        let (client, server) = UnixStream::pair().unwrap();
        let name = name.to_string();
        let t = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            tokio::task::LocalSet::new().block_on(&rt, async move {
                let (_tx, rx) = tokio::sync::watch::channel(false);
                let shared = Shared::new(
                    Rc::new(MemTarget::new(size)),
                    name,
                    &ServerConfig::default(),
                    rx,
                );
                server.set_nonblocking(true).unwrap();
                let (r, w) = tokio::net::UnixStream::from_std(server)
                    .unwrap()
                    .into_split();
                let _ = serve_connection(shared, r, w).await;
            });
        });
        (client, t)
    }

    /// The kernel-facing negotiation against our own server, over a socket pair.
    #[test]
    fn negotiation_for_the_kernel_yields_size_flags_and_simple_replies() {
        let (mut client, t) = mem_server("k", 8 << 20);
        let n = negotiate_for_kernel(&mut client, "k", "test").unwrap();
        assert_eq!(n.size, 8 << 20);
        assert!(n.flags & super::super::proto::consts::tf::SEND_FLUSH != 0);
        // Transmission phase now: a READ gets a simple reply (no structured replies negotiated).
        let h = super::super::proto::transmission::RequestHeader {
            flags: 0,
            kind: 0,
            cookie: 42,
            offset: 0,
            length: 512,
        };
        client.write_all(&h.encode()).unwrap();
        let mut reply = [0u8; 16 + 512];
        client.read_exact(&mut reply).unwrap();
        assert_eq!(&reply[0..4], &0x6744_6698u32.to_be_bytes());
        assert_eq!(&reply[8..16], &42u64.to_be_bytes());
        drop(client);
        t.join().unwrap();
    }

    #[test]
    fn wrong_export_name_is_a_clear_error() {
        let (mut client, _t) = mem_server("k", 1 << 20);
        let e = negotiate_for_kernel(&mut client, "other", "test")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("refused NBD_OPT_GO") && e.contains("other"),
            "{e}"
        );
    }

    #[test]
    fn attaching_without_the_nbd_module_says_modprobe() {
        if Path::new("/dev/nbd0").exists() {
            return; // A host with the module: the opt-in test (tests/kernel_nbd.rs) covers it.
        }
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let img = dir.path().join("d.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let e = run_attach(AttachOptions {
            source: img,
            device: "/dev/nbd0".into(),
            name: String::new(),
            connections: 1,
            timeout: Duration::from_secs(30),
            dead_conn_timeout: Duration::from_secs(30),
            engine: Some(EngineKind::Sync),
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("modprobe nbd"), "{e}");
    }
}
