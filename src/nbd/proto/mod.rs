//! `nbd::proto`: the NBD protocol (the NBD project's doc/proto.md) as pure functions over bytes.
//! No sockets, no clocks: bytes in, typed messages and bytes to send out. The server
//! (`nbd::server`) drives these; tests and fuzz targets drive them directly.
//!
//! - [`handshake`]: the fixed-newstyle negotiation as a state machine (server side).
//! - [`transmission`]: request headers, their validation, and reply encoding.
//! - [`client`]: the client side of the same messages, for tests, fuzzing and `twinvol attach`.

pub mod client;
pub mod consts;
pub mod handshake;
pub mod transmission;

/// Maps an errno from the local I/O stack to the error values the NBD spec allows on the wire.
pub fn errno_to_nbd(errno: i32) -> u32 {
    use consts::err::*;
    match errno {
        libc::EPERM | libc::EROFS | libc::EACCES => EPERM,
        libc::EIO => EIO,
        libc::ENOMEM => ENOMEM,
        libc::EINVAL => EINVAL,
        libc::ENOSPC | libc::EDQUOT | libc::EFBIG => ENOSPC,
        libc::EOVERFLOW => EOVERFLOW,
        libc::EOPNOTSUPP => ENOTSUP,
        libc::ESHUTDOWN => ESHUTDOWN,
        _ => EIO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_mapping_uses_only_wire_values() {
        let allowed = [1, 5, 12, 22, 28, 75, 95, 108];
        for e in 0..200 {
            assert!(allowed.contains(&errno_to_nbd(e)), "errno {e}");
        }
        assert_eq!(errno_to_nbd(libc::EROFS), 1);
        assert_eq!(errno_to_nbd(libc::EOPNOTSUPP), 95);
    }
}
