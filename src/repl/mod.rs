//! `repl`: mirroring a volume to the peer node.
//!
//! - [`wire`]: the replication protocol as pure functions over bytes (frames, CRC32, zstd,
//!   messages, HMAC authentication). No sockets, no clocks; property-tested and fuzzed.
//! - [`link`]: the TCP connection to the peer over the replication address (bind, socket
//!   options, reconnect backoff, peer filtering, the authenticated handshake).
//!
//! The sender/receiver/resync machinery is built on these two and lives in later modules.

pub mod link;
pub mod wire;
