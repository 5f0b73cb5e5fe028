//! `nbd`: the NBD protocol (`proto`, pure), the server (`server`: sockets and the request loop),
//! the `export` command that puts a local device behind it, and `kernel`: attaching an export to
//! a /dev/nbdN device through the kernel's generic-netlink family (ioctl fallback).
pub mod attach_cmd;
pub mod export;
pub mod kernel;
pub mod proto;
pub mod server;
