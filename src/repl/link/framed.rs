//! Replication frames over async byte streams: [`Framed`] over one stream (the handshake, where
//! turns alternate), then a [`FrameReader`] that keeps the stream and a [`FrameWriter`] over a
//! duplicate of it on the writer thread ([`Framed::detach_sender`], [`SendState::attach`]).
//!
//! Invariant: `recv` returns only messages the decoder fully verified; after an error the
//! connection must be dropped (the decoder stays poisoned). Detaching keeps bytes already
//! received. Counters count what crossed the socket, headers included.
//!
//! No copies of write data in user space: frames go out with vectored writes whose bulk
//! segments are the application's own buffers ([`FrameQueue`]), and a large Data or ResyncData
//! payload is read from the socket straight into an aligned buffer of its own, so its bytes
//! reach the disk with direct I/O as received.

use std::io::IoSlice;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, RawFd};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::error::LinkError;
use crate::engine::buf::AlignedBuf;
use crate::repl::wire::frame::{FrameQueue, BULK_ALIGN};
use crate::repl::wire::{FrameDecoder, FrameEncoder, Message};

/// Segments handed to one vectored write (at most the kernel's 1024): a Data frame of at
/// least [`SEND_REF_MIN`](crate::repl::wire::frame::SEND_REF_MIN) bytes that goes raw is two
/// segments (its header, its payload by reference), so one write carries up to 128 of them,
/// more than an async batch of 4 KiB writes usually holds (about 33 measured).
const IOV_BATCH: usize = 256;

/// How much the receive buffer grows per read.
const READ_CHUNK: usize = 64 * 1024;

/// Largest receive low-water mark set while a bulk payload arrives (a quarter of the socket's
/// receive buffer is the other bound: the sender can always fill that much, so a wait for it
/// always ends).
const LOW_WATER_MAX: usize = 4 << 20;

/// The receive low-water mark (SO_RCVLOWAT) of a TCP socket, raised while a bulk payload
/// arrives so the reader is woken once the rest of the payload is there, not for every
/// segment: on loopback and veth every wake-up of the receiving thread is work (and, in a VM,
/// an inter-processor interrupt) on the *sending* core.
///
/// Invariant: `set` is the value last given to the kernel (1, the kernel's default, when no
/// bulk payload is being read); a value is always at most `cap` = min(receive buffer / 4,
/// [`LOW_WATER_MAX`]), so the sender's window can always satisfy it. A non-blocking read still
/// returns whatever has arrived; only the readiness wake-ups wait for the mark.
#[derive(Debug)]
struct LowWater {
    fd: RawFd,
    cap: usize,
    set: usize,
}

impl LowWater {
    /// For the socket `fd` (which must outlive this value) whose receive buffer (as the kernel
    /// reports it) is `rcvbuf` bytes.
    fn new(fd: RawFd, rcvbuf: usize) -> Self {
        Self {
            fd,
            cap: (rcvbuf / 4).clamp(1, LOW_WATER_MAX),
            set: 1,
        }
    }

    /// Asks to be woken when `bytes` (bounded by the cap) can be read.
    fn want(&mut self, bytes: usize) -> Result<(), LinkError> {
        let v = bytes.clamp(1, self.cap);
        if v == self.set {
            return Ok(());
        }
        let c = libc::c_int::try_from(v).unwrap_or(libc::c_int::MAX);
        // SAFETY: c lives across the call and the length given is its size; the kernel
        // checks fd (owned by the stream this reader holds).
        let r = unsafe {
            libc::setsockopt(
                self.fd,
                libc::SOL_SOCKET,
                libc::SO_RCVLOWAT,
                (&c as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(LinkError::SocketOption {
                option: "SO_RCVLOWAT",
                source: std::io::Error::last_os_error(),
            });
        }
        self.set = v;
        Ok(())
    }
}

/// Bytes and frames that crossed one direction of a connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Frames.
    pub frames: u64,
    /// Payload bytes before compression (sending side only; 0 on the receiving side).
    pub payload_bytes: u64,
    /// Bytes on the socket (headers and compressed payloads).
    pub wire_bytes: u64,
    /// Vectored socket writes that carried them (sending side only): frames per write is how
    /// well the sender batches, and every write may wake the peer's reader.
    pub writes: u64,
}

/// Sending state independent of the stream.
#[derive(Debug)]
struct Tx {
    peer: SocketAddr,
    enc: FrameEncoder,
    out: FrameQueue,
    sent: Traffic,
}

impl Tx {
    fn queue(&mut self, msg: &Message) -> Result<(), LinkError> {
        let s = self
            .enc
            .encode_into(msg, &mut self.out)
            .map_err(|source| LinkError::Encode {
                peer: self.peer,
                source,
            })?;
        self.sent.frames += 1;
        self.sent.payload_bytes += u64::from(s.raw_len);
        self.sent.wire_bytes += s.frame_len() as u64;
        Ok(())
    }

    async fn flush<W: AsyncWrite + Unpin>(&mut self, io: &mut W) -> Result<(), LinkError> {
        let peer = self.peer;
        while !self.out.is_empty() {
            let mut iov = [IoSlice::new(&[]); IOV_BATCH];
            let k = self.out.io_slices(&mut iov);
            let n = io
                .write_vectored(&iov[..k])
                .await
                .map_err(|source| LinkError::Io { peer, source })?;
            if n == 0 {
                return Err(LinkError::Io {
                    peer,
                    source: std::io::ErrorKind::WriteZero.into(),
                });
            }
            self.out.advance(n);
            self.sent.writes += 1;
        }
        io.flush()
            .await
            .map_err(|source| LinkError::Io { peer, source })
    }
}

/// A bulk payload being read into its own aligned buffer: `buf[at..at + len]` is the payload,
/// of which `filled` bytes arrived.
#[derive(Debug)]
struct BulkRead {
    buf: AlignedBuf,
    at: usize,
    filled: usize,
    len: usize,
}

/// The byte count of a read from `peer`, with the end of the stream as [`LinkError::Closed`].
fn read_count(peer: SocketAddr, r: std::io::Result<usize>) -> Result<usize, LinkError> {
    match r {
        Ok(0) => Err(LinkError::Closed { peer }),
        Ok(n) => Ok(n),
        Err(source) => Err(LinkError::Io { peer, source }),
    }
}

/// Receiving state independent of the stream.
#[derive(Debug)]
struct Rx {
    peer: SocketAddr,
    dec: FrameDecoder,
    received: Traffic,
    /// Kept across cancelled `recv` calls, so no received byte is lost.
    bulk: Option<BulkRead>,
    /// Raised while a bulk payload arrives ([`FrameReader::wake_per_frame`]).
    low_water: Option<LowWater>,
}

impl Rx {
    /// The next message whose bytes are all buffered, verified; `None` when the stream must be
    /// read first (nothing complete buffered, or a bulk payload arriving).
    fn pop_buffered(&mut self) -> Option<Result<Message, LinkError>> {
        if self.bulk.is_some() {
            return None;
        }
        let peer = self.peer;
        match self.dec.pop() {
            Ok(Some(m)) => {
                self.received.frames += 1;
                Some(Ok(m))
            }
            Ok(None) => None,
            Err(source) => Some(Err(LinkError::Wire { peer, source })),
        }
    }

    async fn recv<R: AsyncRead + Unpin>(&mut self, io: &mut R) -> Result<Message, LinkError> {
        let peer = self.peer;
        loop {
            if let Some(b) = self.bulk.as_mut() {
                while b.filled < b.len {
                    if let Some(lw) = self.low_water.as_mut() {
                        lw.want(b.len - b.filled)?;
                    }
                    let dst = &mut b.buf[b.at + b.filled..b.at + b.len];
                    let n = read_count(peer, io.read(dst).await)?;
                    b.filled += n;
                    self.received.wire_bytes += n as u64;
                }
                if let Some(lw) = self.low_water.as_mut() {
                    lw.want(1)?;
                }
                if let Some(b) = self.bulk.take() {
                    let wire = b.buf.into_bytes().slice(b.at..b.at + b.len);
                    let m = self
                        .dec
                        .finish_bulk(wire)
                        .map_err(|source| LinkError::Wire { peer, source })?;
                    self.received.frames += 1;
                    return Ok(m);
                }
            }
            if let Some(r) = self.pop_buffered() {
                return r;
            }
            if let Some(plan) = self.dec.bulk_pending() {
                // The bulk data (after `lead` payload bytes) starts at a BULK_ALIGN boundary.
                let at = (BULK_ALIGN - plan.lead % BULK_ALIGN) % BULK_ALIGN;
                let mut buf = AlignedBuf::for_overwrite(at + plan.wire_len, BULK_ALIGN);
                let filled = self.dec.take_buffered(&mut buf[at..at + plan.wire_len]);
                self.bulk = Some(BulkRead {
                    buf,
                    at,
                    filled,
                    len: plan.wire_len,
                });
                continue;
            }
            let buf = self.dec.buffer_mut();
            buf.reserve(READ_CHUNK);
            let n = read_count(peer, io.read_buf(buf).await)?;
            self.received.wire_bytes += n as u64;
        }
    }
}

/// Frames in both directions over one stream.
#[derive(Debug)]
pub struct Framed<S> {
    io: S,
    tx: Tx,
    rx: Rx,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Framed<S> {
    /// Wraps `stream`; `peer` is used in errors only.
    pub fn new(stream: S, peer: SocketAddr, enc: FrameEncoder, dec: FrameDecoder) -> Self {
        Self {
            io: stream,
            tx: Tx {
                peer,
                enc,
                out: FrameQueue::new(),
                sent: Traffic::default(),
            },
            rx: Rx {
                peer,
                dec,
                received: Traffic::default(),
                bulk: None,
                low_water: None,
            },
        }
    }

    /// The peer's address.
    pub fn peer(&self) -> SocketAddr {
        self.tx.peer
    }

    /// The underlying stream.
    pub fn get_ref(&self) -> &S {
        &self.io
    }

    /// Encodes `msg` into the send buffer without writing it (see [`Framed::flush`]).
    pub fn queue(&mut self, msg: &Message) -> Result<(), LinkError> {
        self.tx.queue(msg)
    }

    /// Writes everything queued.
    pub async fn flush(&mut self) -> Result<(), LinkError> {
        self.tx.flush(&mut self.io).await
    }

    /// Encodes and writes one message.
    pub async fn send(&mut self, msg: &Message) -> Result<(), LinkError> {
        self.tx.queue(msg)?;
        self.tx.flush(&mut self.io).await
    }

    /// The next verified message. Cancel-safe: bytes read stay buffered for the next call.
    pub async fn recv(&mut self) -> Result<Message, LinkError> {
        self.rx.recv(&mut self.io).await
    }

    /// Traffic sent and received so far.
    pub fn traffic(&self) -> (Traffic, Traffic) {
        (self.tx.sent, self.rx.received)
    }

    /// Shuts the write side down (best effort).
    pub async fn shutdown(&mut self) {
        let _ = self.io.shutdown().await;
    }

    /// Keeps the stream for receiving and hands the sending state (encoder, queue, counters)
    /// out, for a writer on another thread over a duplicate of the socket
    /// ([`SendState::attach`]). Bytes already received stay with the reader.
    pub fn detach_sender(self) -> (FrameReader<S>, SendState) {
        (
            FrameReader {
                io: self.io,
                rx: self.rx,
            },
            SendState(self.tx),
        )
    }
}

/// The sending state of a connection without its stream ([`Framed::detach_sender`]).
#[derive(Debug)]
pub struct SendState(Tx);

impl SendState {
    /// A sending half writing to `io`.
    pub fn attach<W>(self, io: W) -> FrameWriter<W> {
        FrameWriter { io, tx: self.0 }
    }
}

/// The sending half of a split connection.
#[derive(Debug)]
pub struct FrameWriter<W> {
    io: W,
    tx: Tx,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    /// Encodes `msg` into the send buffer without writing it (batching).
    pub fn queue(&mut self, msg: &Message) -> Result<(), LinkError> {
        self.tx.queue(msg)
    }

    /// Bytes queued and not yet written.
    pub fn queued_bytes(&self) -> usize {
        self.tx.out.len()
    }

    /// Writes everything queued.
    pub async fn flush(&mut self) -> Result<(), LinkError> {
        self.tx.flush(&mut self.io).await
    }

    /// Encodes and writes one message.
    pub async fn send(&mut self, msg: &Message) -> Result<(), LinkError> {
        self.tx.queue(msg)?;
        self.tx.flush(&mut self.io).await
    }

    /// What was queued so far.
    pub fn sent(&self) -> Traffic {
        self.tx.sent
    }

    /// The stream.
    pub fn get_ref(&self) -> &W {
        &self.io
    }
}

/// The receiving half of a split connection.
#[derive(Debug)]
pub struct FrameReader<R> {
    io: R,
    rx: Rx,
}

impl<R: AsFd> FrameReader<R> {
    /// From now on, while a bulk payload (a large Data or ResyncData frame) arrives, the reader
    /// is woken when the rest of it is there (up to a quarter of the receive buffer at a time),
    /// not for every segment. Only for a TCP stream: SO_RCVLOWAT is a TCP option. Returns
    /// whether it took effect (it does not when the receive buffer cannot be read).
    pub fn wake_per_frame(&mut self) -> bool {
        self.rx.low_water = socket2::SockRef::from(&self.io)
            .recv_buffer_size()
            .ok()
            .map(|rcvbuf| LowWater::new(self.io.as_fd().as_raw_fd(), rcvbuf));
        self.rx.low_water.is_some()
    }
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// The next verified message. Cancel-safe: bytes read stay buffered for the next call.
    pub async fn recv(&mut self) -> Result<Message, LinkError> {
        self.rx.recv(&mut self.io).await
    }

    /// The next verified message if its bytes were already read, without touching the stream
    /// (no timer or clock is needed for it); `None` when [`FrameReader::recv`] must read.
    /// Messages come out in the same order either way.
    pub fn try_recv_buffered(&mut self) -> Option<Result<Message, LinkError>> {
        self.rx.pop_buffered()
    }

    /// Frames decoded and bytes read so far.
    pub fn received(&self) -> Traffic {
        self.rx.received
    }

    /// The stream.
    pub fn get_ref(&self) -> &R {
        &self.io
    }
}
