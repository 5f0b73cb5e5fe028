//! twinvol: mirrored block volumes for two-node clusters, exported over NBD, with cloud failover.
//!
//! Rooms (see docs/ARCHITECTURE.md): `config` (TOML schema), `engine` (local disk I/O),
//! `block` (the contract between an exporter and what it exports), `nbd` (protocol, server,
//! kernel attach), `cloud` (network identity and fencing on AWS). Lower rooms never import higher ones.

/// Writes one line to stderr and ignores a failure (a closed or full stderr must not stop a
/// server: its log goes through `tracing`, this is only the human-facing banner).
#[macro_export]
macro_rules! stderr_line {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

pub mod block;
pub mod cloud;
pub mod cluster;
pub mod config;
pub mod engine;
pub mod failpoint;
pub mod fibhash;
pub mod meta;
pub mod nbd;
pub mod ops;
pub mod repl;
pub mod volume;
