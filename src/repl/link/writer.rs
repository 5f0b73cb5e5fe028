//! The sending half of a replication connection on a thread of its own.
//!
//! Encoding (payload CRC, zstd) and the socket writes (on loopback or a fast ENI, the kernel's
//! copy and TCP processing) cost as much CPU as the rest of a write's path. On the volume's
//! data-path thread they would share one core with the NBD server and the local I/O; here they
//! run beside it. The thread owns a duplicate of the connection's socket, registered with a
//! small runtime of its own, and writes the messages of a channel in order: the channel's
//! order is the wire order, exactly as with an in-thread writer.
//!
//! Invariants: messages are written in the order they were sent to the channel; the thread
//! ends when every sender is dropped and the queue is written, when a write fails (then the
//! socket is shut down in both directions so the reader ends the session at once), or when
//! [`WriterThread::finish`] runs out of patience.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use super::framed::{FrameWriter, SendState, Traffic};
use super::LinkError;
use crate::repl::wire::Message;

/// Bytes batched into one vectored write at most.
const BATCH_BYTES: usize = 4 << 20;

/// How much lower than its creator's the writer's scheduling priority is (a nice increment)
/// when it is not on the application's path ([`WriterThread::spawn`]'s `background`).
///
/// Measured (docs/BENCHMARKS.md): with the Primary's data-path thread, its writer and
/// fio on one core, async 4k writes at QD32 reached 0.76x of the no-peer figure with a 90th
/// percentile latency of 3.2 ms against 0.9 ms with no peer: the writer, woken for every few
/// frames, preempted the thread that completes the application's writes. At +10 it runs when
/// that thread waits, and still gets about a tenth of a contended core (weights 1024 : 110).
pub const BACKGROUND_NICE: i32 = 10;

/// How long, in async mode ([`WriterThread::spawn`]'s `background`), a small batch of Data
/// frames and acks waits once for company before it is written.
///
/// Measured (docs/BENCHMARKS.md): async 4k writes at QD32 ran in one of two steady
/// states. In the good one each write of the Primary's writer carried about 24 frames; in the
/// bad one about 3.6, and the Secondary's acks came back as finely, so every few frames cost a
/// wake-up of the other node's thread in each direction (on this VM an inter-processor
/// interrupt and a VM exit each). Node a then spent 3.5-8 times the no-peer CPU per write and
/// the job ran at 0.19-0.36x of the no-peer figure. Nothing waits for these frames in async
/// mode, so the pause breaks the fine-grained exchange at a bounded cost: a write reaches the
/// peer at most this much later, and the reported RPO, which counts until the ack (itself
/// paused as long on the Secondary), at most twice this much higher.
pub const COALESCE_WAIT: Duration = Duration::from_micros(500);

/// A batch of at least this many bytes is written without waiting for company.
pub const COALESCE_BELOW: usize = 64 << 10;

/// Whether `m` may wait [`COALESCE_WAIT`] in async mode: the two streams no caller waits on
/// there (application writes are acknowledged after the local write; acks only retire the
/// Primary's in-flight queue). Everything else (flushes, barriers, resync, verify, pings,
/// disconnects) is written at once, and so is any batch that holds one of them.
fn may_wait(m: &Message) -> bool {
    matches!(m, Message::Data(_) | Message::Ack { .. })
}

/// Raises the calling thread's nice value by `increment` (Linux keeps nice per thread, so the
/// rest of the process keeps its priority); returns the new value.
///
/// Invariant: only ever lowers priority, which needs no privilege; never fails for
/// `increment >= 0` other than by an unexpected errno, which is returned.
pub fn lower_thread_priority(increment: i32) -> Result<i32, nix::errno::Errno> {
    nix::errno::Errno::clear();
    // SAFETY: nice(2) takes a plain integer and touches no memory of ours; -1 is a valid
    // result, so errno (cleared above) tells success from failure.
    let r = unsafe { libc::nice(increment.max(0)) };
    if r == -1 && nix::errno::Errno::last_raw() != 0 {
        return Err(nix::errno::Errno::last());
    }
    Ok(r)
}

/// Frames and bytes sent, shared with whoever reports them (cumulative over connections when
/// the same handle is passed to every connection's writer).
pub type SentTraffic = Arc<Mutex<Traffic>>;

/// Handle of a connection's writer thread.
#[derive(Debug)]
pub struct WriterThread {
    tx: Option<mpsc::UnboundedSender<Message>>,
    done: oneshot::Receiver<()>,
    stop: Option<oneshot::Sender<()>>,
}

impl WriterThread {
    /// Starts the writer for the connection whose receiving side keeps `stream`; messages sent
    /// to [`WriterThread::sender`] are written in order, and `total` grows by what is sent.
    /// `background`: no application write waits for what this writer sends (async mode), so
    /// it runs [`BACKGROUND_NICE`] lower than the data path it serves, and a small batch of
    /// Data frames and acks waits [`COALESCE_WAIT`] once for more before it is written.
    pub fn spawn(
        stream: &TcpStream,
        state: SendState,
        total: SentTraffic,
        background: bool,
    ) -> Result<Self, LinkError> {
        let peer = stream
            .peer_addr()
            .unwrap_or_else(|_| std::net::SocketAddr::from(([0, 0, 0, 0], 0)));
        let io_err = |source: std::io::Error| LinkError::Io { peer, source };
        let dup: std::net::TcpStream = socket2::SockRef::from(stream)
            .try_clone()
            .map_err(io_err)?
            .into();
        let (tx, rx) = mpsc::unbounded_channel();
        let (done_tx, done) = oneshot::channel();
        let (stop, stop_rx) = oneshot::channel();
        std::thread::Builder::new()
            .name("twinvol-repl-tx".into())
            .spawn(move || {
                if background {
                    if let Err(e) = lower_thread_priority(BACKGROUND_NICE) {
                        tracing::warn!(error = %e, "cannot lower the replication writer's priority; it keeps the data path's");
                    }
                }
                let coalesce = background.then_some(COALESCE_WAIT);
                run(dup, state, rx, stop_rx, total, coalesce);
                let _ = done_tx.send(());
            })
            .map_err(io_err)?;
        Ok(Self {
            tx: Some(tx),
            done,
            stop: Some(stop),
        })
    }

    /// A sender for messages to the peer.
    pub fn sender(&self) -> Option<mpsc::UnboundedSender<Message>> {
        self.tx.clone()
    }

    /// Lets the writer push what is queued (a final Disconnect, acks) for up to `grace` once
    /// every sender is gone, then stops it.
    pub async fn finish(mut self, grace: Duration) {
        drop(self.tx.take());
        if tokio::time::timeout(grace, &mut self.done).await.is_err() {
            if let Some(s) = self.stop.take() {
                let _ = s.send(());
            }
        }
    }
}

impl Drop for WriterThread {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

fn run(
    dup: std::net::TcpStream,
    state: SendState,
    rx: mpsc::UnboundedReceiver<Message>,
    stop: oneshot::Receiver<()>,
    total: SentTraffic,
    coalesce: Option<Duration>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the replication writer's runtime; closing the connection");
            let _ = dup.shutdown(std::net::Shutdown::Both);
            return;
        }
    };
    rt.block_on(async move {
        let io = match TcpStream::from_std(dup) {
            Ok(io) => io,
            Err(e) => {
                tracing::error!(error = %e, "cannot register the replication socket with the writer; closing the connection");
                return;
            }
        };
        let mut w = state.attach(io);
        tokio::select! {
            r = write_loop(&mut w, rx, &total, coalesce) => {
                if let Err(e) = r {
                    tracing::warn!(error = %e, "replication write failed; closing the connection");
                    let _ = socket2::SockRef::from(w.get_ref()).shutdown(std::net::Shutdown::Both);
                }
            }
            _ = stop => {}
        }
    });
}

/// Writes the channel's messages in order, batching whatever is ready up to [`BATCH_BYTES`]
/// into one vectored write; adds what was sent to `total` after every write. With `coalesce`,
/// a batch of only Data frames and acks smaller than [`COALESCE_BELOW`] first waits that long,
/// once, for more (so no message waits longer than that plus one write).
async fn write_loop(
    w: &mut FrameWriter<TcpStream>,
    mut rx: mpsc::UnboundedReceiver<Message>,
    total: &SentTraffic,
    coalesce: Option<Duration>,
) -> Result<(), LinkError> {
    // What this connection had counted at the last write: only the delta is added.
    let mut seen = Traffic::default();
    while let Some(m) = rx.recv().await {
        let mut streamed = may_wait(&m);
        w.queue(&m)?;
        take_ready(w, &mut rx, &mut streamed)?;
        if let Some(wait) = coalesce {
            if streamed && w.queued_bytes() < COALESCE_BELOW {
                // This thread and its runtime serve only this connection's writes: the pause
                // holds nothing else up (a stop request is seen right after it).
                std::thread::sleep(wait);
                take_ready(w, &mut rx, &mut streamed)?;
            }
        }
        w.flush().await?;
        let now = w.sent();
        if let Ok(mut t) = total.lock() {
            t.frames += now.frames - seen.frames;
            t.payload_bytes += now.payload_bytes - seen.payload_bytes;
            t.wire_bytes += now.wire_bytes - seen.wire_bytes;
            t.writes += now.writes - seen.writes;
        }
        seen = now;
    }
    Ok(())
}

/// Queues the messages already in the channel, up to [`BATCH_BYTES`]; `streamed` stays true
/// while every message queued may wait ([`may_wait`]).
fn take_ready(
    w: &mut FrameWriter<TcpStream>,
    rx: &mut mpsc::UnboundedReceiver<Message>,
    streamed: &mut bool,
) -> Result<(), LinkError> {
    while w.queued_bytes() < BATCH_BYTES {
        match rx.try_recv() {
            Ok(m) => {
                *streamed &= may_wait(&m);
                w.queue(&m)?;
            }
            Err(_) => break,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repl::wire::{Data, DataFlags};

    #[test]
    fn only_data_frames_and_acks_may_wait() {
        let data = Message::Data(Data {
            seq: 1,
            epoch: 0,
            offset: 0,
            flags: DataFlags(0),
            data: bytes::Bytes::from_static(&[7; 4096]),
        });
        assert!(may_wait(&data));
        assert!(may_wait(&Message::Ack { seq: 1, status: 0 }));
        assert!(!may_wait(&Message::Flush { seq: 2 }));
        assert!(!may_wait(&Message::Barrier { seq: 3, epoch: 1 }));
        assert!(!may_wait(&Message::ResyncDone { seq: 4 }));
    }
}
