//! `repl`: mirroring a volume to the peer node.
//!
//! - [`wire`]: the replication protocol as pure functions over bytes (frames, CRC32, zstd,
//!   messages, HMAC authentication). No sockets, no clocks; property-tested and fuzzed.
//! - [`link`]: the TCP connection to the peer over the replication address (bind, socket
//!   options, reconnect backoff, peer filtering, the authenticated handshake).
//!
//! - [`resync`]: resync pacing (rate controller) and progress, pure.
//! - [`verify`]: block digests and their comparison (online verify, checksum resync), pure.
//!
//! The sender, the ordered apply and the resync loop of a volume live in `volume::session`.

pub mod link;
pub mod resync;
pub mod verify;
pub mod wire;
