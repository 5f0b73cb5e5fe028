//! `nbd`: the NBD protocol (`proto`, pure), the server (`server`, sockets and the request loop).
pub mod proto;
