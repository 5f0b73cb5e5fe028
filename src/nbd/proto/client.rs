//! The client side of the same messages: option encoding and reply parsing. Used by tests, the
//! fuzz target and by `twinvol attach` when it negotiates with a running server.

use super::consts::{IHAVEOPT, REPLY_MAGIC, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC};

/// Encodes one option: IHAVEOPT, option number, length, data.
pub fn encode_option(option: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(16 + data.len());
    v.extend_from_slice(&IHAVEOPT.to_be_bytes());
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

/// Data of NBD_OPT_INFO / NBD_OPT_GO.
pub fn encode_info_request(name: &str, requests: &[u16]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&(name.len() as u32).to_be_bytes());
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(&(requests.len() as u16).to_be_bytes());
    for r in requests {
        v.extend_from_slice(&r.to_be_bytes());
    }
    v
}

/// Data of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT.
pub fn encode_meta_request(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&(name.len() as u32).to_be_bytes());
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        v.extend_from_slice(&(q.len() as u32).to_be_bytes());
        v.extend_from_slice(q.as_bytes());
    }
    v
}

/// One option reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionReply {
    /// The option answered.
    pub option: u32,
    /// Reply type (ACK, INFO, ERR_*, ...).
    pub reply_type: u32,
    /// Reply data.
    pub data: Vec<u8>,
}

/// A server stream the client cannot parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ClientParseError {
    /// Wrong magic at the start of a reply.
    #[error("bad reply magic {0:#x}")]
    BadMagic(u64),
}

/// Parses one option reply from the front of `buf`: `Ok(Some((reply, consumed)))`, or `Ok(None)` if incomplete.
pub fn parse_option_reply(buf: &[u8]) -> Result<Option<(OptionReply, usize)>, ClientParseError> {
    let Some(h) = buf.first_chunk::<20>() else {
        return Ok(None);
    };
    let magic = u64::from_be_bytes(h[0..8].try_into().unwrap_or_default());
    if magic != REPLY_MAGIC {
        return Err(ClientParseError::BadMagic(magic));
    }
    let option = u32::from_be_bytes(h[8..12].try_into().unwrap_or_default());
    let reply_type = u32::from_be_bytes(h[12..16].try_into().unwrap_or_default());
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap_or_default()) as usize;
    if buf.len() < 20 + len {
        return Ok(None);
    }
    Ok(Some((
        OptionReply {
            option,
            reply_type,
            data: buf[20..20 + len].to_vec(),
        },
        20 + len,
    )))
}

/// The header of a transmission reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    /// A simple reply (16 bytes); READ data follows on success.
    Simple {
        /// Error (0 = success).
        error: u32,
        /// Cookie of the request.
        cookie: u64,
    },
    /// A structured reply chunk (20 bytes); `length` bytes of payload follow.
    Chunk {
        /// Chunk flags (DONE).
        flags: u16,
        /// Chunk type.
        kind: u16,
        /// Cookie of the request.
        cookie: u64,
        /// Payload length.
        length: u32,
    },
}

/// Parses a reply header from the front of `buf`: `Ok(Some((header, header_len)))` or `Ok(None)`.
pub fn parse_reply_header(buf: &[u8]) -> Result<Option<(ReplyHeader, usize)>, ClientParseError> {
    let Some(m) = buf.first_chunk::<4>() else {
        return Ok(None);
    };
    match u32::from_be_bytes(*m) {
        SIMPLE_REPLY_MAGIC => {
            let Some(h) = buf.first_chunk::<16>() else {
                return Ok(None);
            };
            let error = u32::from_be_bytes(h[4..8].try_into().unwrap_or_default());
            let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap_or_default());
            Ok(Some((ReplyHeader::Simple { error, cookie }, 16)))
        }
        STRUCTURED_REPLY_MAGIC => {
            let Some(h) = buf.first_chunk::<20>() else {
                return Ok(None);
            };
            let flags = u16::from_be_bytes(h[4..6].try_into().unwrap_or_default());
            let kind = u16::from_be_bytes(h[6..8].try_into().unwrap_or_default());
            let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap_or_default());
            let length = u32::from_be_bytes(h[16..20].try_into().unwrap_or_default());
            Ok(Some((
                ReplyHeader::Chunk {
                    flags,
                    kind,
                    cookie,
                    length,
                },
                20,
            )))
        }
        other => Err(ClientParseError::BadMagic(u64::from(other))),
    }
}
