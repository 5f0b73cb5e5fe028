//! `nbd::server`: sockets and the request loop around `nbd::proto`.
//!
//! One connection = one reader loop and one writer task on the data-path thread. The reader
//! decodes requests and spawns one local task per request, so many requests are in flight and
//! complete out of order; every reply goes through the writer task, which batches small replies
//! into one write. A byte budget shared by all connections bounds the memory held by payloads.
//!
//! Shutdown (SIGTERM): listeners stop accepting, in-flight requests finish, new requests get
//! ESHUTDOWN until the client disconnects or the grace period ends.

use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};

use super::proto::consts::{cmd, err, BASE_ALLOCATION_ID};
use super::proto::handshake::{greeting, ExportSpec, Outcome, ServerHandshake};
use super::proto::transmission::{
    parse_request_header, push_block_status, push_error_chunk, push_read_chunk_header,
    push_simple_reply, validate, Command, RequestHeader, REQUEST_HEADER_LEN,
};
use super::proto::{errno_to_nbd, handshake::Negotiated};
use crate::block::BlockTarget;
use crate::engine::buf::AlignedBuf;

/// Bytes of request payload and read data all connections together may hold (bounds RSS).
pub const DEFAULT_BUDGET_BYTES: usize = 48 * 1024 * 1024;
/// Replies whose data is at least this large are written directly instead of being copied into a batch.
const DIRECT_WRITE_THRESHOLD: usize = 64 * 1024;
/// Read buffer of a connection.
const READ_BUFFER: usize = 256 * 1024;
/// Write payloads at least this large are read straight from the socket into their own buffer
/// (after what the read buffer already holds), and the request header after one is read without
/// read-ahead, so the bulk of a large write is never copied through the read buffer.
const DIRECT_READ_THRESHOLD: u32 = 64 * 1024;

/// Settings of a server, the same for every connection.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// How long in-flight work may take after shutdown starts before connections are dropped.
    pub shutdown_grace: Duration,
    /// Budget of payload bytes held in memory across connections.
    pub budget_bytes: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            shutdown_grace: Duration::from_secs(10),
            budget_bytes: DEFAULT_BUDGET_BYTES,
        }
    }
}

/// Why a connection ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// Socket I/O failed.
    #[error("connection I/O: {0}")]
    Io(#[from] std::io::Error),
    /// Negotiation ended without an export being selected.
    #[error("negotiation ended: {0}")]
    Handshake(#[from] super::proto::handshake::HandshakeError),
    /// The client's stream could not be parsed.
    #[error("protocol error: {0}")]
    Framing(#[from] super::proto::transmission::FramingError),
}

/// State shared by all connections of a server.
pub struct Shared<T> {
    /// The exported device.
    pub target: Rc<T>,
    /// Name and capabilities.
    pub spec: Rc<ExportSpec>,
    /// Payload byte budget (permits are KiB).
    pub budget: Arc<Semaphore>,
    /// Becomes true when the server shuts down.
    pub shutdown: watch::Receiver<bool>,
}

impl<T> Clone for Shared<T> {
    fn clone(&self) -> Self {
        Self {
            target: self.target.clone(),
            spec: self.spec.clone(),
            budget: self.budget.clone(),
            shutdown: self.shutdown.clone(),
        }
    }
}

impl<T: BlockTarget + 'static> Shared<T> {
    /// Shared state for a server of `target` under `name`.
    pub fn new(
        target: Rc<T>,
        name: String,
        cfg: &ServerConfig,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        let spec = Rc::new(ExportSpec {
            name,
            info: target.info().clone(),
        });
        Self {
            target,
            spec,
            budget: budget_for(cfg),
            shutdown,
        }
    }

    /// The same, drawing on a byte budget shared with other data-path threads.
    pub fn with_budget(mut self, budget: Arc<Semaphore>) -> Self {
        self.budget = budget;
        self
    }
}

/// A payload byte budget for `cfg` (permits are KiB; at least one maximum-size request fits).
pub fn budget_for(cfg: &ServerConfig) -> Arc<Semaphore> {
    let permits = (cfg.budget_bytes / 1024).clamp(33 * 1024, Semaphore::MAX_PERMITS);
    Arc::new(Semaphore::new(permits))
}

/// One item for the writer task: bytes to send and, for reads, the data that follows.
struct Out {
    head: Vec<u8>,
    data: Option<AlignedBuf>,
    _permit: Option<OwnedSemaphorePermit>,
}

/// Serves one client on a byte stream (socket, stdio, or an in-memory pipe in tests).
pub async fn serve_connection<T, R, W>(
    shared: Shared<T>,
    reader: R,
    mut writer: W,
) -> Result<(), ConnError>
where
    T: BlockTarget + 'static,
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + 'static,
{
    let mut reader = BufReader::with_capacity(READ_BUFFER, reader);
    writer.write_all(&greeting()).await?;
    writer.flush().await?;
    let negotiated = negotiate(&shared, &mut reader, &mut writer).await?;
    transmission(shared, reader, writer, negotiated).await
}

async fn negotiate<T, R, W>(
    shared: &Shared<T>,
    reader: &mut BufReader<R>,
    writer: &mut W,
) -> Result<Negotiated, ConnError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut hs = ServerHandshake::new((*shared.spec).clone());
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let step = hs.feed(&buf);
        buf.drain(..step.consumed);
        if !step.output.is_empty() {
            writer.write_all(&step.output).await?;
            writer.flush().await?;
        }
        match step.outcome {
            Outcome::NeedMore => {}
            Outcome::Transmission(n) => {
                debug_assert!(
                    buf.is_empty(),
                    "wanted() keeps transmission bytes out of the handshake buffer"
                );
                return Ok(n);
            }
            Outcome::Close(e) => return Err(e.into()),
        }
        // Never read past the current option: pipelined transmission requests stay in the BufReader.
        let want = hs.wanted(&buf).clamp(1, chunk.len());
        let n = reader.read(&mut chunk[..want]).await?;
        if n == 0 {
            return Err(ConnError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn transmission<T, R, W>(
    shared: Shared<T>,
    mut reader: BufReader<R>,
    writer: W,
    n: Negotiated,
) -> Result<(), ConnError>
where
    T: BlockTarget + 'static,
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel::<Out>();
    let writer_task = tokio::task::spawn_local(write_replies(writer, rx));
    let n = Rc::new(n);
    let mut header = [0u8; REQUEST_HEADER_LEN];
    // After a large write the next request is probably one too: its header is read without
    // read-ahead so that its payload lands in its own buffer and not in the read buffer.
    let mut after_large_write = false;
    let result: Result<(), ConnError> = loop {
        match read_request_bytes(&mut reader, &mut header, after_large_write).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break Ok(()),
            Err(e) => break Err(e.into()),
        }
        let h = match parse_request_header(&header) {
            Ok(Some(h)) => h,
            Ok(None) => unreachable!("a full header was read"),
            Err(e) => break Err(e.into()),
        };
        let shutting_down = *shared.shutdown.borrow();
        let cmd = match validate(&h, &n, &shared.spec.info) {
            Ok(Command::Disconnect) => break Ok(()),
            Ok(_) if shutting_down => Err(err::ESHUTDOWN),
            other => other,
        };
        let cmd = match cmd {
            Ok(c) => c,
            Err(e) => {
                if let Err(io) = drain(&mut reader, h.payload_len()).await {
                    break Err(io.into());
                }
                let mut head = Vec::new();
                reply_error(&mut head, &h, &n, e, "request refused");
                if tx
                    .send(Out {
                        head,
                        data: None,
                        _permit: None,
                    })
                    .is_err()
                {
                    break Ok(());
                }
                continue;
            }
        };
        let permit = match cmd {
            Command::Read { len, .. } | Command::Write { len, .. } => {
                let kib = (len as usize).div_ceil(1024).max(1) as u32;
                match shared.budget.clone().acquire_many_owned(kib).await {
                    Ok(p) => Some(p),
                    Err(_) => break Ok(()),
                }
            }
            _ => None,
        };
        let payload = if let Command::Write { len, .. } = cmd {
            let mut buf = shared.target.alloc_buf_for_overwrite(len as usize);
            after_large_write = len >= DIRECT_READ_THRESHOLD;
            if let Err(e) = read_request_bytes(&mut reader, &mut buf, after_large_write).await {
                break Err(e.into());
            }
            Some(buf)
        } else {
            after_large_write = false;
            None
        };
        let task_shared = shared.clone();
        let task_n = n.clone();
        let task_tx = tx.clone();
        tokio::task::spawn_local(async move {
            let out = execute(&task_shared, &task_n, h, cmd, payload, permit).await;
            let _ = task_tx.send(out);
        });
    };
    drop(tx);
    // The writer ends when every in-flight request has sent its reply.
    match writer_task.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e.into()),
        Err(e) => {
            return Err(ConnError::Io(std::io::Error::other(format!(
                "reply writer failed: {e}"
            ))))
        }
    }
    result
}

/// Fills `out` from `reader`; fails with `UnexpectedEof` if the stream ends first. With
/// `direct`, what the buffer holds is taken and the rest is read straight from the underlying
/// stream without read-ahead (the buffer is empty afterwards unless it held more than
/// `out.len()`); otherwise through the buffer, which reads ahead.
async fn read_request_bytes<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
    out: &mut [u8],
    direct: bool,
) -> std::io::Result<()> {
    if !direct {
        return reader.read_exact(out).await.map(|_| ());
    }
    let held = reader.buffer().len().min(out.len());
    out[..held].copy_from_slice(&reader.buffer()[..held]);
    reader.consume(held);
    if held < out.len() {
        reader.get_mut().read_exact(&mut out[held..]).await?;
    }
    Ok(())
}

/// Reads and discards `len` payload bytes of a refused request.
async fn drain<R: AsyncRead + Unpin>(reader: &mut BufReader<R>, len: u32) -> std::io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    let copied = tokio::io::copy(
        &mut (&mut *reader).take(u64::from(len)),
        &mut tokio::io::sink(),
    )
    .await?;
    if copied < u64::from(len) {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

fn reply_error(out: &mut Vec<u8>, h: &RequestHeader, n: &Negotiated, error: u32, msg: &str) {
    if n.structured && matches!(h.kind, cmd::READ | cmd::BLOCK_STATUS) {
        push_error_chunk(out, h.cookie, error, msg);
    } else {
        push_simple_reply(out, h.cookie, error);
    }
}

async fn execute<T: BlockTarget>(
    shared: &Shared<T>,
    n: &Negotiated,
    h: RequestHeader,
    cmd: Command,
    payload: Option<AlignedBuf>,
    permit: Option<OwnedSemaphorePermit>,
) -> Out {
    let t = &*shared.target;
    let mut head = Vec::with_capacity(32);
    let result = match cmd {
        Command::Read { offset, len } => {
            let buf = t.alloc_buf_for_overwrite(len as usize);
            let (r, buf) = t.read(offset, buf).await;
            match r {
                Ok(()) => {
                    if n.structured {
                        push_read_chunk_header(&mut head, h.cookie, offset, len);
                    } else {
                        push_simple_reply(&mut head, h.cookie, 0);
                    }
                    return Out {
                        head,
                        data: Some(buf),
                        _permit: permit,
                    };
                }
                Err(e) => Err(e),
            }
        }
        Command::Write { offset, fua, .. } => match payload {
            Some(buf) => t.write(offset, buf, fua).await.0,
            None => Err(crate::block::BlockError::errno(
                "write without payload",
                libc::EINVAL,
            )),
        },
        Command::Flush => t.flush().await,
        Command::Trim { offset, len, fua } => t.trim(offset, u64::from(len), fua).await,
        Command::Cache { offset, len } => t.cache(offset, u64::from(len)).await,
        Command::WriteZeroes { offset, len, flags } => {
            t.write_zeroes(offset, u64::from(len), flags).await
        }
        Command::BlockStatus {
            offset,
            len,
            req_one,
        } => match t.block_status(offset, u64::from(len)).await {
            Ok(extents) => {
                let id = n.base_allocation.unwrap_or(BASE_ALLOCATION_ID);
                push_block_status(&mut head, h.cookie, id, &extents, len, req_one);
                return Out {
                    head,
                    data: None,
                    _permit: permit,
                };
            }
            Err(e) => Err(e),
        },
        Command::Disconnect => Ok(()),
    };
    match result {
        Ok(()) => push_simple_reply(&mut head, h.cookie, 0),
        Err(e) => {
            let errno = errno_to_nbd(e.raw_errno());
            if errno != err::ENOTSUP {
                tracing::warn!(error = %e, "request failed");
            }
            reply_error(&mut head, &h, n, errno, &e.to_string());
        }
    }
    Out {
        head,
        data: None,
        _permit: permit,
    }
}

/// Writes replies in arrival order, coalescing small ones into one syscall.
async fn write_replies<W: AsyncWrite + Unpin>(
    mut w: W,
    mut rx: mpsc::UnboundedReceiver<Out>,
) -> std::io::Result<()> {
    let mut batch: Vec<u8> = Vec::with_capacity(256 * 1024);
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(out) = next.take() {
            batch.extend_from_slice(&out.head);
            if let Some(data) = &out.data {
                if data.len() >= DIRECT_WRITE_THRESHOLD {
                    w.write_all(&batch).await?;
                    batch.clear();
                    w.write_all(data).await?;
                } else {
                    batch.extend_from_slice(data);
                }
            }
            drop(out);
            if batch.len() < 192 * 1024 {
                next = rx.try_recv().ok();
            }
        }
        if !batch.is_empty() {
            w.write_all(&batch).await?;
            batch.clear();
        }
        w.flush().await?;
    }
    let _ = w.shutdown().await;
    Ok(())
}
