//! Replication frames over async byte streams: [`Framed`] over one stream (the handshake, where
//! turns alternate), or split into a [`FrameWriter`] and a [`FrameReader`] (a sender task and an
//! ack-reader task on one connection).
//!
//! Invariant: `recv` returns only messages the decoder fully verified; after an error the
//! connection must be dropped (the decoder stays poisoned). Splitting keeps bytes already
//! received. Counters count what crossed the socket, headers included.

use std::net::SocketAddr;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::error::LinkError;
use crate::repl::wire::{FrameDecoder, FrameEncoder, Message};

/// How much the receive buffer grows per read.
const READ_CHUNK: usize = 64 * 1024;

/// Bytes and frames that crossed one direction of a connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Frames.
    pub frames: u64,
    /// Payload bytes before compression (sending side only; 0 on the receiving side).
    pub payload_bytes: u64,
    /// Bytes on the socket (headers and compressed payloads).
    pub wire_bytes: u64,
}

/// Sending state independent of the stream.
#[derive(Debug)]
struct Tx {
    peer: SocketAddr,
    enc: FrameEncoder,
    out: BytesMut,
    sent: Traffic,
}

impl Tx {
    fn queue(&mut self, msg: &Message) -> Result<(), LinkError> {
        let s = self
            .enc
            .encode(msg, &mut self.out)
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
        io.write_all(&self.out)
            .await
            .map_err(|source| LinkError::Io { peer, source })?;
        self.out.clear();
        io.flush()
            .await
            .map_err(|source| LinkError::Io { peer, source })
    }
}

/// Receiving state independent of the stream.
#[derive(Debug)]
struct Rx {
    peer: SocketAddr,
    dec: FrameDecoder,
    received: Traffic,
}

impl Rx {
    async fn recv<R: AsyncRead + Unpin>(&mut self, io: &mut R) -> Result<Message, LinkError> {
        let peer = self.peer;
        loop {
            if let Some(m) = self
                .dec
                .pop()
                .map_err(|source| LinkError::Wire { peer, source })?
            {
                self.received.frames += 1;
                return Ok(m);
            }
            let buf = self.dec.buffer_mut();
            buf.reserve(READ_CHUNK);
            let n = io
                .read_buf(buf)
                .await
                .map_err(|source| LinkError::Io { peer, source })?;
            if n == 0 {
                return Err(LinkError::Closed { peer });
            }
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
                out: BytesMut::new(),
                sent: Traffic::default(),
            },
            rx: Rx {
                peer,
                dec,
                received: Traffic::default(),
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

    /// Splits into halves with `split_io` (e.g. `TcpStream::into_split`), keeping buffered
    /// bytes and counters.
    pub fn split_with<R, W>(
        self,
        split_io: impl FnOnce(S) -> (R, W),
    ) -> (FrameReader<R>, FrameWriter<W>) {
        let (r, w) = split_io(self.io);
        (
            FrameReader { io: r, rx: self.rx },
            FrameWriter { io: w, tx: self.tx },
        )
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
}

/// The receiving half of a split connection.
#[derive(Debug)]
pub struct FrameReader<R> {
    io: R,
    rx: Rx,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// The next verified message. Cancel-safe: bytes read stay buffered for the next call.
    pub async fn recv(&mut self) -> Result<Message, LinkError> {
        self.rx.recv(&mut self.io).await
    }

    /// Frames decoded and bytes read so far.
    pub fn received(&self) -> Traffic {
        self.rx.received
    }
}
