//! Generic-netlink framing as pure functions: building request messages and splitting and
//! reading the kernel's replies. No sockets here (see `socket.rs`): bytes in, values out.
//!
//! Layout (linux/netlink.h, linux/genetlink.h), all integers in host byte order:
//! ```text
//! nlmsghdr  { u32 len; u16 type; u16 flags; u32 seq; u32 pid }   16 bytes
//! genlmsghdr{ u8 cmd; u8 version; u16 reserved }                  4 bytes
//! nlattr    { u16 len; u16 type } + payload, padded to 4 bytes   (len excludes the padding)
//! ```
//! A nested attribute is an `nlattr` whose payload is more attributes; requests mark it with
//! `NLA_F_NESTED` in the type, parsers accept it with or without (the nbd driver replies
//! without the flag).

/// Size of `struct nlmsghdr`.
pub const NLMSG_HDRLEN: usize = 16;
/// Size of `struct genlmsghdr`.
pub const GENL_HDRLEN: usize = 4;
/// Size of `struct nlattr`.
pub const NLA_HDRLEN: usize = 4;

/// `nlmsg_type` of an error or acknowledgement.
pub const NLMSG_ERROR: u16 = 2;
/// `nlmsg_type` closing a multi-part dump.
pub const NLMSG_DONE: u16 = 3;
/// `nlmsg_type` to be ignored.
pub const NLMSG_NOOP: u16 = 1;
/// `nlmsg_type` reporting lost data.
pub const NLMSG_OVERRUN: u16 = 4;

/// The message is a request.
pub const NLM_F_REQUEST: u16 = 0x1;
/// Ask for an acknowledgement (an `NLMSG_ERROR` with error 0) after the request is handled.
pub const NLM_F_ACK: u16 = 0x4;

/// The attribute's payload is a list of attributes.
pub const NLA_F_NESTED: u16 = 1 << 15;
/// The attribute's payload is in network byte order.
pub const NLA_F_NET_BYTEORDER: u16 = 1 << 14;
/// The bits of `nla_type` that hold the type number.
pub const NLA_TYPE_MASK: u16 = !(NLA_F_NESTED | NLA_F_NET_BYTEORDER);

/// The generic-netlink controller's fixed family id.
pub const GENL_ID_CTRL: u16 = 0x10;
/// Controller command: look up a family by name.
pub const CTRL_CMD_GETFAMILY: u8 = 3;
/// Controller command: reply carrying a family's description.
pub const CTRL_CMD_NEWFAMILY: u8 = 1;
/// Controller attribute: the family id (u16).
pub const CTRL_ATTR_FAMILY_ID: u16 = 1;
/// Controller attribute: the family name (NUL-terminated string).
pub const CTRL_ATTR_FAMILY_NAME: u16 = 2;
/// Version of the controller protocol we speak.
pub const CTRL_VERSION: u8 = 1;

/// Rounds `len` up to the 4-byte alignment netlink uses for messages and attributes.
pub const fn align4(len: usize) -> usize {
    (len + 3) & !3
}

/// A malformed netlink reply. Replies come from the kernel, but the parser treats them as
/// outside bytes: it never panics and never reads past the buffer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// A message header claims a length shorter than the header or longer than what was read.
    #[error("netlink message at byte {offset} has length {len}, but {available} bytes are available (need at least 16)")]
    BadMessageLength {
        /// Offset of the header in the receive buffer.
        offset: usize,
        /// The length the header claims.
        len: usize,
        /// Bytes left in the buffer from `offset`.
        available: usize,
    },
    /// A generic-netlink message too short to hold its 4-byte `genlmsghdr`.
    #[error("generic-netlink message of {len} bytes is too short for its 4-byte header")]
    ShortGenlHeader {
        /// Payload length after the `nlmsghdr`.
        len: usize,
    },
    /// An `NLMSG_ERROR` message too short to hold its error number.
    #[error("netlink error message of {len} bytes is too short for its 4-byte error number")]
    ShortErrorMessage {
        /// Payload length after the `nlmsghdr`.
        len: usize,
    },
    /// An attribute header claims a length shorter than the header or longer than its container.
    #[error("netlink attribute at byte {offset} has length {len}, but {available} bytes are available (need at least 4)")]
    BadAttributeLength {
        /// Offset of the attribute within its container.
        offset: usize,
        /// The length the attribute claims.
        len: usize,
        /// Bytes left in the container from `offset`.
        available: usize,
    },
    /// An attribute's payload does not have the size its type requires.
    #[error("netlink attribute type {ty} has a {len}-byte payload, expected {expected}")]
    BadAttributeSize {
        /// Attribute type (flags masked off).
        ty: u16,
        /// Payload size found.
        len: usize,
        /// Payload size required.
        expected: usize,
    },
    /// A reply lacks an attribute it must carry.
    #[error("netlink reply to {request} lacks attribute {attribute}")]
    MissingAttribute {
        /// Which request was answered.
        request: &'static str,
        /// Which attribute is missing.
        attribute: &'static str,
    },
    /// A string attribute that is not valid UTF-8.
    #[error("netlink attribute type {ty} holds a string that is not UTF-8")]
    BadString {
        /// Attribute type (flags masked off).
        ty: u16,
    },
}

/// Builds one generic-netlink request message. Invariant: after [`GenlMessageBuilder::finish`]
/// the `nlmsg_len` field equals the buffer length, which is a multiple of 4, and every nested
/// attribute's length covers exactly the attributes added between its begin and end.
#[derive(Debug, Clone)]
pub struct GenlMessageBuilder {
    buf: Vec<u8>,
}

/// Marks where a nested attribute starts; hand it back to [`GenlMessageBuilder::end_nested`].
#[must_use = "a nested attribute must be closed with end_nested"]
#[derive(Debug)]
pub struct NestStart(usize);

impl GenlMessageBuilder {
    /// Starts a request to `family` (a generic-netlink family id) with `flags` (`NLM_F_*`),
    /// sequence number `seq`, command `cmd` and family protocol `version`. The port id is left
    /// 0: the kernel fills in the sender's.
    pub fn new(family: u16, flags: u16, seq: u32, cmd: u8, version: u8) -> Self {
        let mut buf = Vec::with_capacity(64);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_len, patched by finish()
        buf.extend_from_slice(&family.to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_pid
        buf.extend_from_slice(&[cmd, version, 0, 0]);
        Self { buf }
    }

    /// Appends an attribute with a raw payload, padded with zeros to 4 bytes.
    /// Precondition: the payload is at most 65531 bytes (`nla_len` is 16 bits); callers bound
    /// what they put in (see `attach::validate`), a longer one would be refused by the kernel.
    pub fn put_bytes(&mut self, ty: u16, payload: &[u8]) -> &mut Self {
        let len = NLA_HDRLEN + payload.len();
        let len16 = u16::try_from(len).unwrap_or(u16::MAX);
        self.buf.extend_from_slice(&len16.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(payload);
        self.pad();
        self
    }

    /// Appends a u8 attribute.
    pub fn put_u8(&mut self, ty: u16, value: u8) -> &mut Self {
        self.put_bytes(ty, &[value])
    }

    /// Appends a u16 attribute (host byte order).
    pub fn put_u16(&mut self, ty: u16, value: u16) -> &mut Self {
        self.put_bytes(ty, &value.to_ne_bytes())
    }

    /// Appends a u32 attribute (host byte order).
    pub fn put_u32(&mut self, ty: u16, value: u32) -> &mut Self {
        self.put_bytes(ty, &value.to_ne_bytes())
    }

    /// Appends a u64 attribute (host byte order).
    pub fn put_u64(&mut self, ty: u16, value: u64) -> &mut Self {
        self.put_bytes(ty, &value.to_ne_bytes())
    }

    /// Appends a NUL-terminated string attribute (`NLA_STRING` / `NLA_NUL_STRING`).
    pub fn put_str(&mut self, ty: u16, value: &str) -> &mut Self {
        let mut payload = Vec::with_capacity(value.len() + 1);
        payload.extend_from_slice(value.as_bytes());
        payload.push(0);
        self.put_bytes(ty, &payload)
    }

    /// Opens a nested attribute of type `ty` (sent with `NLA_F_NESTED`).
    pub fn begin_nested(&mut self, ty: u16) -> NestStart {
        let start = self.buf.len();
        self.buf.extend_from_slice(&0u16.to_ne_bytes()); // nla_len, patched by end_nested()
        self.buf
            .extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
        NestStart(start)
    }

    /// Closes a nested attribute: its length now covers everything added since it was opened.
    /// Precondition as for [`Self::put_bytes`]: the nest holds at most 65531 bytes.
    pub fn end_nested(&mut self, start: NestStart) -> &mut Self {
        let len = self.buf.len() - start.0;
        let len16 = u16::try_from(len).unwrap_or(u16::MAX);
        self.buf[start.0..start.0 + 2].copy_from_slice(&len16.to_ne_bytes());
        self
    }

    /// Finishes the message: patches `nlmsg_len` and returns the bytes to send.
    pub fn finish(mut self) -> Vec<u8> {
        let len = u32::try_from(self.buf.len()).unwrap_or(u32::MAX);
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }

    fn pad(&mut self) {
        let padded = align4(self.buf.len());
        self.buf.resize(padded, 0);
    }
}

/// One netlink message borrowed from a receive buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NlMessage<'a> {
    /// `nlmsg_type`: a family id, or one of `NLMSG_ERROR`, `NLMSG_DONE`, ...
    pub ty: u16,
    /// `nlmsg_flags`.
    pub flags: u16,
    /// `nlmsg_seq`: the sequence number of the request this answers.
    pub seq: u32,
    /// `nlmsg_pid`.
    pub pid: u32,
    /// The bytes after the 16-byte header, up to `nlmsg_len` (padding excluded).
    pub payload: &'a [u8],
}

/// Splits a receive buffer into its netlink messages. Every message must be complete: a
/// truncated one is an error, not silently dropped.
pub fn split_messages(buf: &[u8]) -> Result<Vec<NlMessage<'_>>, ParseError> {
    let mut out = Vec::new();
    let mut offset = 0;
    while offset < buf.len() {
        let available = buf.len() - offset;
        if available < NLMSG_HDRLEN {
            return Err(ParseError::BadMessageLength {
                offset,
                len: available,
                available,
            });
        }
        let h = &buf[offset..];
        let len = u32::from_ne_bytes([h[0], h[1], h[2], h[3]]) as usize;
        if len < NLMSG_HDRLEN || len > available {
            return Err(ParseError::BadMessageLength {
                offset,
                len,
                available,
            });
        }
        out.push(NlMessage {
            ty: u16::from_ne_bytes([h[4], h[5]]),
            flags: u16::from_ne_bytes([h[6], h[7]]),
            seq: u32::from_ne_bytes([h[8], h[9], h[10], h[11]]),
            pid: u32::from_ne_bytes([h[12], h[13], h[14], h[15]]),
            payload: &h[NLMSG_HDRLEN..len],
        });
        offset += align4(len).min(available);
    }
    Ok(out)
}

/// What one reply message means for the request that caused it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply<'a> {
    /// `NLMSG_ERROR` with error 0: the request succeeded; nothing more will come for it.
    Ack,
    /// `NLMSG_ERROR` with a negative errno: the request failed with `errno` (positive here).
    Error {
        /// The positive errno, e.g. `libc::ENOENT`.
        errno: i32,
    },
    /// `NLMSG_DONE`: end of a multi-part reply.
    Done,
    /// `NLMSG_NOOP` or `NLMSG_OVERRUN`: nothing for the caller.
    Noop,
    /// A generic-netlink data message (a reply from the family).
    Data(GenlMessage<'a>),
}

/// A generic-netlink message: command, version and its attribute bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GenlMessage<'a> {
    /// The family id (`nlmsg_type`).
    pub family: u16,
    /// `genlmsghdr.cmd`.
    pub cmd: u8,
    /// `genlmsghdr.version`.
    pub version: u8,
    /// The attribute area; read it with [`attributes`].
    pub attrs: &'a [u8],
}

/// Classifies one message: ack, error, end of dump, or a data reply.
pub fn classify<'a>(msg: &NlMessage<'a>) -> Result<Reply<'a>, ParseError> {
    match msg.ty {
        NLMSG_ERROR => {
            let p = msg.payload;
            if p.len() < 4 {
                return Err(ParseError::ShortErrorMessage { len: p.len() });
            }
            let error = i32::from_ne_bytes([p[0], p[1], p[2], p[3]]);
            if error == 0 {
                Ok(Reply::Ack)
            } else {
                // The kernel sends -errno; a positive value would be a kernel bug, keep it as is.
                Ok(Reply::Error {
                    errno: error.checked_neg().unwrap_or(i32::MAX),
                })
            }
        }
        NLMSG_DONE => Ok(Reply::Done),
        NLMSG_NOOP | NLMSG_OVERRUN => Ok(Reply::Noop),
        family => {
            let p = msg.payload;
            if p.len() < GENL_HDRLEN {
                return Err(ParseError::ShortGenlHeader { len: p.len() });
            }
            Ok(Reply::Data(GenlMessage {
                family,
                cmd: p[0],
                version: p[1],
                attrs: &p[GENL_HDRLEN..],
            }))
        }
    }
}

/// One attribute borrowed from an attribute area.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attribute<'a> {
    /// The type number with `NLA_F_NESTED` / `NLA_F_NET_BYTEORDER` masked off.
    pub ty: u16,
    /// Whether the sender marked it `NLA_F_NESTED` (the nbd driver's replies do not).
    pub nested_flag: bool,
    /// The payload (padding excluded).
    pub payload: &'a [u8],
}

impl<'a> Attribute<'a> {
    fn exact<const N: usize>(&self) -> Result<[u8; N], ParseError> {
        <[u8; N]>::try_from(self.payload).map_err(|_| ParseError::BadAttributeSize {
            ty: self.ty,
            len: self.payload.len(),
            expected: N,
        })
    }

    /// The payload as a u8.
    pub fn as_u8(&self) -> Result<u8, ParseError> {
        Ok(self.exact::<1>()?[0])
    }

    /// The payload as a u16 (host byte order).
    pub fn as_u16(&self) -> Result<u16, ParseError> {
        Ok(u16::from_ne_bytes(self.exact()?))
    }

    /// The payload as a u32 (host byte order).
    pub fn as_u32(&self) -> Result<u32, ParseError> {
        Ok(u32::from_ne_bytes(self.exact()?))
    }

    /// The payload as a u64 (host byte order).
    pub fn as_u64(&self) -> Result<u64, ParseError> {
        Ok(u64::from_ne_bytes(self.exact()?))
    }

    /// The payload as a string, up to the first NUL (or the whole payload if there is none).
    pub fn as_str(&self) -> Result<&'a str, ParseError> {
        let end = self
            .payload
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.payload.len());
        std::str::from_utf8(&self.payload[..end]).map_err(|_| ParseError::BadString { ty: self.ty })
    }

    /// The attributes nested in this one's payload.
    pub fn nested(&self) -> Result<Vec<Attribute<'a>>, ParseError> {
        attributes(self.payload)
    }
}

/// Splits an attribute area into its attributes. A truncated attribute is an error; trailing
/// padding shorter than an attribute header after the last one is accepted.
pub fn attributes(area: &[u8]) -> Result<Vec<Attribute<'_>>, ParseError> {
    let mut out = Vec::new();
    let mut offset = 0;
    while offset + NLA_HDRLEN <= area.len() {
        let available = area.len() - offset;
        let a = &area[offset..];
        let len = u16::from_ne_bytes([a[0], a[1]]) as usize;
        if len < NLA_HDRLEN || len > available {
            return Err(ParseError::BadAttributeLength {
                offset,
                len,
                available,
            });
        }
        let raw_ty = u16::from_ne_bytes([a[2], a[3]]);
        out.push(Attribute {
            ty: raw_ty & NLA_TYPE_MASK,
            nested_flag: raw_ty & NLA_F_NESTED != 0,
            payload: &a[NLA_HDRLEN..len],
        });
        offset += align4(len).min(available);
    }
    if offset < area.len() && area[offset..].iter().any(|&b| b != 0) {
        let available = area.len() - offset;
        return Err(ParseError::BadAttributeLength {
            offset,
            len: available,
            available,
        });
    }
    Ok(out)
}

/// Finds the first attribute of type `ty`.
pub fn find<'a, 'b>(attrs: &'b [Attribute<'a>], ty: u16) -> Option<&'b Attribute<'a>> {
    attrs.iter().find(|a| a.ty == ty)
}

/// Builds the controller request that looks up a family id by name (`CTRL_CMD_GETFAMILY`).
pub fn encode_get_family(seq: u32, name: &str) -> Vec<u8> {
    let mut b = GenlMessageBuilder::new(
        GENL_ID_CTRL,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        CTRL_CMD_GETFAMILY,
        CTRL_VERSION,
    );
    b.put_str(CTRL_ATTR_FAMILY_NAME, name);
    b.finish()
}

/// Reads the family id out of the controller's `CTRL_CMD_NEWFAMILY` reply.
pub fn parse_family_id(reply: &GenlMessage<'_>) -> Result<u16, ParseError> {
    let attrs = attributes(reply.attrs)?;
    find(&attrs, CTRL_ATTR_FAMILY_ID)
        .ok_or(ParseError::MissingAttribute {
            request: "CTRL_CMD_GETFAMILY",
            attribute: "CTRL_ATTR_FAMILY_ID",
        })?
        .as_u16()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ne16(v: u16) -> [u8; 2] {
        v.to_ne_bytes()
    }
    fn ne32(v: u32) -> [u8; 4] {
        v.to_ne_bytes()
    }

    #[test]
    fn get_family_request_matches_hand_computed_bytes() {
        let got = encode_get_family(7, "nbd");
        let mut want = Vec::new();
        want.extend_from_slice(&ne32(28)); // 16 nlmsghdr + 4 genlmsghdr + 8 attr ("nbd\0")
        want.extend_from_slice(&ne16(0x10)); // GENL_ID_CTRL
        want.extend_from_slice(&ne16(0x5)); // NLM_F_REQUEST | NLM_F_ACK
        want.extend_from_slice(&ne32(7)); // seq
        want.extend_from_slice(&ne32(0)); // pid
        want.extend_from_slice(&[3, 1, 0, 0]); // CTRL_CMD_GETFAMILY, version 1
        want.extend_from_slice(&ne16(8)); // nla_len = 4 + 4
        want.extend_from_slice(&ne16(2)); // CTRL_ATTR_FAMILY_NAME
        want.extend_from_slice(b"nbd\0");
        assert_eq!(got, want);
    }

    #[test]
    fn attribute_payloads_are_padded_to_four_bytes_and_len_excludes_padding() {
        let mut b = GenlMessageBuilder::new(0x20, NLM_F_REQUEST, 1, 9, 1);
        b.put_u8(1, 0xaa).put_str(2, "abcde");
        let got = b.finish();
        // header 20 + u8 attr (5 -> 8) + str attr (4 + 6 = 10 -> 12) = 40
        assert_eq!(got.len(), 40);
        assert_eq!(&got[0..4], &ne32(40));
        assert_eq!(&got[20..22], &ne16(5)); // 4 + 1, padding not counted
        assert_eq!(&got[22..24], &ne16(1));
        assert_eq!(&got[24..28], &[0xaa, 0, 0, 0]);
        assert_eq!(&got[28..30], &ne16(10));
        assert_eq!(&got[32..40], b"abcde\0\0\0");
    }

    #[test]
    fn ack_is_an_error_message_with_error_zero() {
        let mut msg = Vec::new();
        msg.extend_from_slice(&ne32(36));
        msg.extend_from_slice(&ne16(NLMSG_ERROR));
        msg.extend_from_slice(&ne16(0x100)); // NLM_F_CAPPED
        msg.extend_from_slice(&ne32(9));
        msg.extend_from_slice(&ne32(1234));
        msg.extend_from_slice(&0i32.to_ne_bytes());
        msg.extend_from_slice(&[0u8; 16]); // echoed request header
        let msgs = split_messages(&msg).unwrap();
        assert_eq!(msgs.len(), 1);
        assert_eq!(msgs[0].seq, 9);
        assert_eq!(classify(&msgs[0]).unwrap(), Reply::Ack);
    }

    #[test]
    fn negative_errno_in_error_message_becomes_positive_errno() {
        let mut msg = Vec::new();
        msg.extend_from_slice(&ne32(36));
        msg.extend_from_slice(&ne16(NLMSG_ERROR));
        msg.extend_from_slice(&ne16(0));
        msg.extend_from_slice(&ne32(3));
        msg.extend_from_slice(&ne32(0));
        msg.extend_from_slice(&(-libc::ENOENT).to_ne_bytes());
        msg.extend_from_slice(&[0u8; 16]);
        let msgs = split_messages(&msg).unwrap();
        assert_eq!(
            classify(&msgs[0]).unwrap(),
            Reply::Error {
                errno: libc::ENOENT
            }
        );
    }

    #[test]
    fn family_id_is_read_from_newfamily_reply_among_other_attributes() {
        let mut b = GenlMessageBuilder::new(GENL_ID_CTRL, 0, 1, CTRL_CMD_NEWFAMILY, 2);
        b.put_str(CTRL_ATTR_FAMILY_NAME, "nbd")
            .put_u16(CTRL_ATTR_FAMILY_ID, 0x1c)
            .put_u32(3, 1);
        let bytes = b.finish();
        let msgs = split_messages(&bytes).unwrap();
        let Reply::Data(genl) = classify(&msgs[0]).unwrap() else {
            panic!("not data")
        };
        assert_eq!(genl.cmd, CTRL_CMD_NEWFAMILY);
        assert_eq!(parse_family_id(&genl).unwrap(), 0x1c);
    }

    #[test]
    fn reply_without_family_id_is_a_named_error() {
        let mut b = GenlMessageBuilder::new(GENL_ID_CTRL, 0, 1, CTRL_CMD_NEWFAMILY, 2);
        b.put_str(CTRL_ATTR_FAMILY_NAME, "nbd");
        let bytes = b.finish();
        let msgs = split_messages(&bytes).unwrap();
        let Reply::Data(genl) = classify(&msgs[0]).unwrap() else {
            panic!("not data")
        };
        let err = parse_family_id(&genl).unwrap_err();
        assert!(err.to_string().contains("CTRL_ATTR_FAMILY_ID"), "{err}");
    }

    #[test]
    fn two_messages_in_one_buffer_are_both_returned() {
        let a = encode_get_family(1, "nbd");
        let b = encode_get_family(2, "x");
        let mut buf = a.clone();
        buf.extend_from_slice(&b);
        let msgs = split_messages(&buf).unwrap();
        assert_eq!(msgs.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![1, 2]);
    }

    #[test]
    fn truncated_message_is_an_error_not_a_panic() {
        let a = encode_get_family(1, "nbd");
        for cut in 1..a.len() {
            assert!(split_messages(&a[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn attribute_longer_than_its_container_is_rejected() {
        let mut area = Vec::new();
        area.extend_from_slice(&ne16(12));
        area.extend_from_slice(&ne16(1));
        area.extend_from_slice(&[0; 4]);
        assert!(matches!(
            attributes(&area),
            Err(ParseError::BadAttributeLength { len: 12, .. })
        ));
    }

    #[test]
    fn wrong_sized_integer_attribute_is_rejected() {
        let mut b = GenlMessageBuilder::new(0x20, 0, 1, 1, 1);
        b.put_u8(1, 5);
        let bytes = b.finish();
        let attrs = attributes(&bytes[20..]).unwrap();
        assert_eq!(
            attrs[0].as_u32(),
            Err(ParseError::BadAttributeSize {
                ty: 1,
                len: 1,
                expected: 4
            })
        );
    }
}
