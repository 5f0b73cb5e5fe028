//! Transmission phase: request headers, their validation against the negotiated settings, and
//! reply encoding (simple and structured).

use super::consts::{
    cflag, chunk, cmd, err, state, tf, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC,
};
use super::handshake::Negotiated;
use crate::block::{Extent, TargetInfo, ZeroFlags};

/// Size of a request header on the wire.
pub const REQUEST_HEADER_LEN: usize = 28;
/// Size of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Size of a structured reply chunk header.
pub const CHUNK_HEADER_LEN: usize = 20;
/// Largest WRITE payload the server reads into memory; larger ones are drained and refused.
pub const MAX_WRITE_PAYLOAD: u32 = 32 * 1024 * 1024;

/// A request header as it came off the wire (not yet validated).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    /// Command flags.
    pub flags: u16,
    /// Command type.
    pub kind: u16,
    /// Opaque cookie echoed in the reply, byte-exact.
    pub cookie: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length (payload length for WRITE).
    pub length: u32,
}

impl RequestHeader {
    /// Bytes of payload that follow this header on the wire.
    pub fn payload_len(&self) -> u32 {
        if self.kind == cmd::WRITE {
            self.length
        } else {
            0
        }
    }

    /// Encodes the header (client side).
    pub fn encode(&self) -> [u8; REQUEST_HEADER_LEN] {
        let mut b = [0u8; REQUEST_HEADER_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b
    }
}

/// A stream that cannot be parsed further; the server closes the connection.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FramingError {
    /// The request did not start with the request magic.
    #[error("bad request magic {0:#010x} (desynchronised stream or not an NBD client)")]
    BadMagic(u32),
}

/// Parses one request header from the front of `buf`; `Ok(None)` when fewer than 28 bytes are there.
pub fn parse_request_header(buf: &[u8]) -> Result<Option<RequestHeader>, FramingError> {
    let Some(b) = buf.first_chunk::<REQUEST_HEADER_LEN>() else {
        return Ok(None);
    };
    let be32 = |r: std::ops::Range<usize>| u32::from_be_bytes(b[r].try_into().unwrap_or_default());
    let be16 = |r: std::ops::Range<usize>| u16::from_be_bytes(b[r].try_into().unwrap_or_default());
    let be64 = |r: std::ops::Range<usize>| u64::from_be_bytes(b[r].try_into().unwrap_or_default());
    let magic = be32(0..4);
    if magic != REQUEST_MAGIC {
        return Err(FramingError::BadMagic(magic));
    }
    Ok(Some(RequestHeader {
        flags: be16(4..6),
        kind: be16(6..8),
        cookie: be64(8..16),
        offset: be64(16..24),
        length: be32(24..28),
    }))
}

/// A validated command, ready to execute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Read `len` bytes.
    Read {
        /// Offset.
        offset: u64,
        /// Length.
        len: u32,
    },
    /// Write the payload.
    Write {
        /// Offset.
        offset: u64,
        /// Length.
        len: u32,
        /// Durable before the reply.
        fua: bool,
    },
    /// Close after in-flight requests finish; no reply.
    Disconnect,
    /// Make completed writes durable.
    Flush,
    /// Discard a range.
    Trim {
        /// Offset.
        offset: u64,
        /// Length.
        len: u32,
        /// Durable before the reply.
        fua: bool,
    },
    /// Prefetch a range.
    Cache {
        /// Offset.
        offset: u64,
        /// Length.
        len: u32,
    },
    /// Zero a range.
    WriteZeroes {
        /// Offset.
        offset: u64,
        /// Length.
        len: u32,
        /// How.
        flags: ZeroFlags,
    },
    /// Report allocation.
    BlockStatus {
        /// Offset.
        offset: u64,
        /// Length.
        len: u32,
        /// Only one extent.
        req_one: bool,
    },
}

/// Checks a request against the export and the negotiated settings.
///
/// Returns the command, or the NBD error to reply with (the connection stays up: for a
/// refused WRITE the caller must still consume the payload).
pub fn validate(h: &RequestHeader, n: &Negotiated, info: &TargetInfo) -> Result<Command, u32> {
    const KNOWN: u16 = cflag::FUA | cflag::NO_HOLE | cflag::DF | cflag::REQ_ONE | cflag::FAST_ZERO;
    if h.flags & !KNOWN != 0 {
        return Err(err::EINVAL);
    }
    let only_for = |flag: u16, kinds: &[u16]| h.flags & flag == 0 || kinds.contains(&h.kind);
    if !only_for(cflag::NO_HOLE, &[cmd::WRITE_ZEROES])
        || !only_for(cflag::FAST_ZERO, &[cmd::WRITE_ZEROES])
        || !only_for(cflag::DF, &[cmd::READ])
        || !only_for(cflag::REQ_ONE, &[cmd::BLOCK_STATUS])
    {
        return Err(err::EINVAL);
    }
    if h.flags & cflag::DF != 0 && !n.structured {
        return Err(err::EINVAL);
    }
    if h.flags & cflag::FAST_ZERO != 0 && n.flags & tf::SEND_FAST_ZERO == 0 {
        return Err(err::EINVAL);
    }
    let fua = h.flags & cflag::FUA != 0;
    let end = h.offset.checked_add(u64::from(h.length));
    let in_range = end.is_some_and(|e| e <= info.size);
    let writes = matches!(h.kind, cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES);
    if writes && info.read_only {
        return Err(err::EPERM);
    }
    let (offset, len) = (h.offset, h.length);
    match h.kind {
        cmd::READ => {
            if len > info.max_block {
                return Err(if n.structured {
                    err::EINVAL
                } else {
                    err::EOVERFLOW
                });
            }
            if !in_range {
                return Err(err::EINVAL);
            }
            Ok(Command::Read { offset, len })
        }
        cmd::WRITE => {
            if len > info.max_block {
                return Err(err::EINVAL);
            }
            if !in_range {
                return Err(err::ENOSPC);
            }
            Ok(Command::Write { offset, len, fua })
        }
        cmd::DISC => Ok(Command::Disconnect),
        cmd::FLUSH => Ok(Command::Flush),
        cmd::TRIM => {
            if !in_range {
                return Err(err::ENOSPC);
            }
            Ok(Command::Trim { offset, len, fua })
        }
        cmd::CACHE => {
            if !in_range {
                return Err(err::EINVAL);
            }
            Ok(Command::Cache { offset, len })
        }
        cmd::WRITE_ZEROES => {
            if !in_range {
                return Err(err::ENOSPC);
            }
            let flags = ZeroFlags {
                no_hole: h.flags & cflag::NO_HOLE != 0,
                fast: h.flags & cflag::FAST_ZERO != 0,
                fua,
            };
            Ok(Command::WriteZeroes { offset, len, flags })
        }
        cmd::BLOCK_STATUS => {
            if n.base_allocation.is_none() || len == 0 || !in_range {
                return Err(err::EINVAL);
            }
            Ok(Command::BlockStatus {
                offset,
                len,
                req_one: h.flags & cflag::REQ_ONE != 0,
            })
        }
        _ => Err(err::EINVAL),
    }
}

/// Appends a simple reply header (data, for a successful READ, follows separately).
pub fn push_simple_reply(out: &mut Vec<u8>, cookie: u64, error: u32) {
    out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
}

/// Appends a structured reply chunk header; `length` bytes of chunk payload follow.
pub fn push_chunk_header(out: &mut Vec<u8>, cookie: u64, flags: u16, kind: u16, length: u32) {
    out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&length.to_be_bytes());
}

/// Appends the header of a final OFFSET_DATA chunk carrying `data_len` bytes read at `offset`;
/// the caller sends the data right after.
pub fn push_read_chunk_header(out: &mut Vec<u8>, cookie: u64, offset: u64, data_len: u32) {
    push_chunk_header(
        out,
        cookie,
        chunk::FLAG_DONE,
        chunk::OFFSET_DATA,
        8 + data_len,
    );
    out.extend_from_slice(&offset.to_be_bytes());
}

/// Appends a final structured ERROR chunk with a message (truncated to 4096 bytes).
pub fn push_error_chunk(out: &mut Vec<u8>, cookie: u64, error: u32, message: &str) {
    let msg = &message.as_bytes()[..message.len().min(4096)];
    push_chunk_header(
        out,
        cookie,
        chunk::FLAG_DONE,
        chunk::ERROR,
        6 + msg.len() as u32,
    );
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg);
}

/// Appends a final BLOCK_STATUS chunk for `base:allocation`. Extents are clipped to `len`
/// bytes in total, merged when adjacent with equal flags, and cut to one with `req_one`.
pub fn push_block_status(
    out: &mut Vec<u8>,
    cookie: u64,
    context_id: u32,
    extents: &[Extent],
    len: u32,
    req_one: bool,
) {
    let mut descs: Vec<(u32, u32)> = Vec::new();
    let mut left = u64::from(len);
    for e in extents {
        if left == 0 {
            break;
        }
        let l = e.length.min(left);
        if l == 0 {
            continue;
        }
        left -= l;
        let flags = (if e.hole { state::HOLE } else { 0 }) | (if e.zero { state::ZERO } else { 0 });
        match descs.last_mut() {
            Some((pl, pf)) if *pf == flags => *pl += l as u32,
            _ => descs.push((l as u32, flags)),
        }
    }
    if descs.is_empty() {
        descs.push((len, 0));
    }
    if req_one {
        descs.truncate(1);
    }
    push_chunk_header(
        out,
        cookie,
        chunk::FLAG_DONE,
        chunk::BLOCK_STATUS,
        4 + 8 * descs.len() as u32,
    );
    out.extend_from_slice(&context_id.to_be_bytes());
    for (l, f) in descs {
        out.extend_from_slice(&l.to_be_bytes());
        out.extend_from_slice(&f.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::proto::handshake::ExportSpec;
    use proptest::prelude::*;

    fn info() -> TargetInfo {
        let mut i =
            crate::block::BlockTarget::info(&crate::block::mem::MemTarget::new(1 << 20)).clone();
        i.min_block = 512;
        i
    }

    fn negotiated(structured: bool) -> Negotiated {
        let spec = ExportSpec {
            name: String::new(),
            info: info(),
        };
        Negotiated {
            structured,
            base_allocation: structured.then_some(1),
            block_size_negotiated: true,
            flags: spec.transmission_flags(),
        }
    }

    fn req(kind: u16, flags: u16, offset: u64, length: u32) -> RequestHeader {
        RequestHeader {
            flags,
            kind,
            cookie: 7,
            offset,
            length,
        }
    }

    proptest! {
        #[test]
        fn request_header_round_trips(flags: u16, kind: u16, cookie: u64, offset: u64, length: u32) {
            let h = RequestHeader { flags, kind, cookie, offset, length };
            prop_assert_eq!(parse_request_header(&h.encode()), Ok(Some(h)));
        }

        #[test]
        fn simple_reply_round_trips(cookie: u64, error: u32) {
            use crate::nbd::proto::client::{parse_reply_header, ReplyHeader};
            let mut v = Vec::new();
            push_simple_reply(&mut v, cookie, error);
            prop_assert_eq!(parse_reply_header(&v), Ok(Some((ReplyHeader::Simple { error, cookie }, SIMPLE_REPLY_LEN))));
        }

        #[test]
        fn chunk_header_round_trips(cookie: u64, flags: u16, kind: u16, length: u32) {
            use crate::nbd::proto::client::{parse_reply_header, ReplyHeader};
            let mut v = Vec::new();
            push_chunk_header(&mut v, cookie, flags, kind, length);
            prop_assert_eq!(parse_reply_header(&v), Ok(Some((ReplyHeader::Chunk { flags, kind, cookie, length }, CHUNK_HEADER_LEN))));
        }

        #[test]
        fn option_reply_round_trips(option: u32, reply_type: u32, data in proptest::collection::vec(any::<u8>(), 0..300)) {
            use crate::nbd::proto::client::{parse_option_reply, OptionReply};
            let mut v = Vec::new();
            crate::nbd::proto::handshake::push_option_reply(&mut v, option, reply_type, &data);
            let n = v.len();
            prop_assert_eq!(parse_option_reply(&v), Ok(Some((OptionReply { option, reply_type, data: data.clone() }, n))));
            prop_assert_eq!(parse_option_reply(&v[..n - 1]), Ok(None));
        }

        #[test]
        fn error_chunks_carry_error_and_message(cookie: u64, error: u32, msg in "[ -~]{0,100}") {
            let mut v = Vec::new();
            push_error_chunk(&mut v, cookie, error, &msg);
            prop_assert_eq!(&v[20..24], &error.to_be_bytes());
            prop_assert_eq!(u16::from_be_bytes([v[24], v[25]]) as usize, msg.len());
            prop_assert_eq!(&v[26..], msg.as_bytes());
        }

        #[test]
        fn truncated_headers_need_more(n in 0usize..28) {
            let h = req(cmd::READ, 0, 0, 512).encode();
            prop_assert_eq!(parse_request_header(&h[..n]), Ok(None));
        }

        #[test]
        fn validate_never_accepts_out_of_range(kind in 0u16..10, flags: u16, offset: u64, length: u32) {
            let i = info();
            if let Ok(c) = validate(&req(kind, flags, offset, length), &negotiated(true), &i) {
                if !matches!(c, Command::Flush | Command::Disconnect) {
                    prop_assert!(offset.checked_add(u64::from(length)).is_some_and(|e| e <= i.size));
                }
            }
        }
    }

    #[test]
    fn bad_magic_is_a_framing_error() {
        let mut h = req(cmd::READ, 0, 0, 512).encode();
        h[0] ^= 1;
        assert!(matches!(
            parse_request_header(&h),
            Err(FramingError::BadMagic(_))
        ));
    }

    #[test]
    fn requests_are_checked_as_the_spec_says() {
        let n = negotiated(true);
        let i = info();
        assert_eq!(
            validate(&req(cmd::READ, 0, (1 << 20) - 512, 1024), &n, &i),
            Err(err::EINVAL)
        );
        assert_eq!(
            validate(&req(cmd::WRITE, 0, (1 << 20) - 512, 1024), &n, &i),
            Err(err::ENOSPC)
        );
        assert_eq!(
            validate(&req(cmd::WRITE, 0, 0, (32 << 20) + 1), &n, &i),
            Err(err::EINVAL)
        );
        assert_eq!(
            validate(&req(cmd::READ, 1 << 9, 0, 512), &n, &i),
            Err(err::EINVAL),
            "unknown flag bit 9"
        );
        assert_eq!(
            validate(&req(cmd::READ, cflag::NO_HOLE, 0, 512), &n, &i),
            Err(err::EINVAL)
        );
        assert_eq!(
            validate(&req(cmd::WRITE, cflag::DF, 0, 512), &n, &i),
            Err(err::EINVAL)
        );
        assert_eq!(
            validate(&req(cmd::READ, cflag::DF, 0, 512), &negotiated(false), &i),
            Err(err::EINVAL)
        );
        assert_eq!(
            validate(&req(cmd::BLOCK_STATUS, 0, 0, 512), &negotiated(false), &i),
            Err(err::EINVAL)
        );
        assert_eq!(
            validate(&req(cmd::BLOCK_STATUS, 0, 0, 0), &n, &i),
            Err(err::EINVAL)
        );
        assert_eq!(validate(&req(99, 0, 0, 0), &n, &i), Err(err::EINVAL));
        assert_eq!(
            validate(&req(cmd::READ, cflag::FUA, 0, 512), &n, &i),
            Ok(Command::Read {
                offset: 0,
                len: 512
            })
        );
        assert_eq!(
            validate(&req(cmd::READ, 0, u64::MAX, 512), &n, &i),
            Err(err::EINVAL),
            "offset overflow"
        );
        let mut ro = info();
        ro.read_only = true;
        assert_eq!(
            validate(&req(cmd::WRITE, 0, 0, 512), &n, &ro),
            Err(err::EPERM)
        );
        assert_eq!(
            validate(&req(cmd::TRIM, 0, 0, 512), &n, &ro),
            Err(err::EPERM)
        );
        assert_eq!(
            validate(
                &req(
                    cmd::WRITE_ZEROES,
                    cflag::NO_HOLE | cflag::FAST_ZERO | cflag::FUA,
                    0,
                    4096
                ),
                &n,
                &i
            ),
            Ok(Command::WriteZeroes {
                offset: 0,
                len: 4096,
                flags: ZeroFlags {
                    no_hole: true,
                    fast: true,
                    fua: true
                }
            })
        );
    }

    #[test]
    fn block_status_merges_clips_and_honours_req_one() {
        let ex = [
            Extent {
                length: 4096,
                hole: false,
                zero: false,
            },
            Extent {
                length: 4096,
                hole: false,
                zero: false,
            },
            Extent {
                length: 1 << 20,
                hole: true,
                zero: true,
            },
        ];
        let mut out = Vec::new();
        push_block_status(&mut out, 9, 1, &ex, 12288, false);
        assert_eq!(&out[20..24], &1u32.to_be_bytes());
        assert_eq!(&out[24..32], &[0, 0, 0x20, 0, 0, 0, 0, 0]);
        assert_eq!(&out[32..40], &[0, 0, 0x10, 0, 0, 0, 0, 3]);
        assert_eq!(out.len(), 40);
        let mut one = Vec::new();
        push_block_status(&mut one, 9, 1, &ex, 12288, true);
        assert_eq!(one.len(), 32);
    }
}
