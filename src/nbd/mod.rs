//! `nbd`: the NBD protocol (`proto`, pure), the server (`server`, sockets and the request loop),
//! kernel attach (`kernel`: /dev/nbdN through netlink or ioctls).
pub mod kernel;
pub mod proto;
