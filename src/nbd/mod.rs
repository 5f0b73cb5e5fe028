//! `nbd`: the NBD protocol (`proto`, pure), the server (`server`: sockets and the request loop)
//! and the `export` command that puts a local device behind it.
pub mod export;
pub mod proto;
pub mod server;
