//! `repl::wire`: the replication protocol as pure functions over bytes (docs/PROTOCOL.md).
//!
//! - [`frame`]: the 40-byte header, header and payload CRC32, per-frame zstd, the
//!   [`FrameEncoder`] and the streaming [`FrameDecoder`].
//! - [`message`]: every message and its payload layout.
//! - [`auth`]: the pre-shared key and the HMAC-SHA256 challenge-response.
//! - [`bitmap`]: carrying an opaque run-length-encoded bitmap over several frames.
//!
//! No sockets and no clocks here: `repl::link` moves the bytes.

pub mod auth;
pub mod bitmap;
pub mod frame;
pub mod message;

#[cfg(test)]
pub(crate) mod tests;

pub use frame::{
    FrameDecoder, FrameEncoder, FrameHeader, FrameStats, WireError, DEFAULT_MAX_PAYLOAD, HEADER_LEN,
};
pub use message::{
    BitmapChunk, Data, DataFlags, Digests, DisconnectReason, Generations, Hello, Message,
    MessageKind, ReadReply, ReadRequest, ResyncData, ResyncMode, ResyncPayload, ResyncRequest,
    VerifyReply, VerifyRequest, MAX_READ,
};

/// Protocol version (message semantics) this build speaks; negotiated in the Hello.
pub const PROTOCOL_VERSION: u16 = 1;
