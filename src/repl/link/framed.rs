//! A byte stream carrying replication frames: encoder and decoder around any async stream.
//!
//! Invariant: `recv` returns only messages the decoder fully verified; after an error the
//! stream must be dropped (the decoder stays poisoned).

use std::net::SocketAddr;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::error::LinkError;
use crate::repl::wire::{FrameDecoder, FrameEncoder, Message};

/// How much the receive buffer grows per read.
const READ_CHUNK: usize = 64 * 1024;

/// Frames over one async byte stream, with the peer's address for error messages.
#[derive(Debug)]
pub struct Framed<S> {
    stream: S,
    peer: SocketAddr,
    enc: FrameEncoder,
    dec: FrameDecoder,
    out: BytesMut,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Framed<S> {
    /// Wraps `stream`; `peer` is used in errors only.
    pub fn new(stream: S, peer: SocketAddr, enc: FrameEncoder, dec: FrameDecoder) -> Self {
        Self {
            stream,
            peer,
            enc,
            dec,
            out: BytesMut::new(),
        }
    }

    /// The peer's address.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// The underlying stream.
    pub fn get_ref(&self) -> &S {
        &self.stream
    }

    /// Encodes `msg` into the send buffer without writing it (see [`Framed::flush`]).
    pub fn queue(&mut self, msg: &Message) -> Result<(), LinkError> {
        self.enc
            .encode(msg, &mut self.out)
            .map_err(|source| LinkError::Encode {
                peer: self.peer,
                source,
            })?;
        Ok(())
    }

    /// Writes everything queued.
    pub async fn flush(&mut self) -> Result<(), LinkError> {
        let peer = self.peer;
        self.stream
            .write_all(&self.out)
            .await
            .map_err(|source| LinkError::Io { peer, source })?;
        self.out.clear();
        self.stream
            .flush()
            .await
            .map_err(|source| LinkError::Io { peer, source })
    }

    /// Encodes and writes one message.
    pub async fn send(&mut self, msg: &Message) -> Result<(), LinkError> {
        self.queue(msg)?;
        self.flush().await
    }

    /// The next verified message from the peer.
    pub async fn recv(&mut self) -> Result<Message, LinkError> {
        let peer = self.peer;
        loop {
            if let Some(m) = self
                .dec
                .pop()
                .map_err(|source| LinkError::Wire { peer, source })?
            {
                return Ok(m);
            }
            let buf = self.dec.buffer_mut();
            buf.reserve(READ_CHUNK);
            let n = self
                .stream
                .read_buf(buf)
                .await
                .map_err(|source| LinkError::Io { peer, source })?;
            if n == 0 {
                return Err(LinkError::Closed { peer });
            }
        }
    }

    /// Shuts the write side down (best effort).
    pub async fn shutdown(&mut self) {
        let _ = self.stream.shutdown().await;
    }
}
