//! The generic-netlink family "nbd" (linux/include/uapi/linux/nbd-netlink.h): its constants,
//! the requests we send and the replies we read, as pure functions over bytes.
//!
//! Attribute types follow the driver's policy (drivers/block/nbd.c `nbd_attr_policy`):
//! INDEX is u32; SIZE_BYTES, BLOCK_SIZE_BYTES, TIMEOUT, SERVER_FLAGS, CLIENT_FLAGS and
//! DEAD_CONN_TIMEOUT are u64 (timeouts in seconds); BACKEND_IDENTIFIER is a string; SOCKETS
//! is a list of SOCK_ITEM, each holding a u32 SOCK_FD that the kernel looks up in the sending
//! process's file table.

use super::codec::{
    attributes, find, GenlMessage, GenlMessageBuilder, ParseError, NLM_F_ACK, NLM_F_REQUEST,
};

/// The family's name, resolved to an id with `CTRL_CMD_GETFAMILY`.
pub const NBD_GENL_FAMILY_NAME: &str = "nbd";
/// The family's protocol version.
pub const NBD_GENL_VERSION: u8 = 1;

/// Command: configure a device with sockets and start it.
pub const NBD_CMD_CONNECT: u8 = 1;
/// Command: disconnect a device.
pub const NBD_CMD_DISCONNECT: u8 = 2;
/// Command: change a running device (new sockets after a dead connection, timeouts).
pub const NBD_CMD_RECONFIGURE: u8 = 3;
/// Multicast event: a connection of a device died.
pub const NBD_CMD_LINK_DEAD: u8 = 4;
/// Command: report devices and whether they are connected.
pub const NBD_CMD_STATUS: u8 = 5;

/// Device index (u32): /dev/nbdN has index N.
pub const NBD_ATTR_INDEX: u16 = 1;
/// Device size in bytes (u64).
pub const NBD_ATTR_SIZE_BYTES: u16 = 2;
/// Logical block size in bytes (u64).
pub const NBD_ATTR_BLOCK_SIZE_BYTES: u16 = 3;
/// Request timeout in seconds (u64).
pub const NBD_ATTR_TIMEOUT: u16 = 4;
/// The NBD transmission flags from the handshake (u64).
pub const NBD_ATTR_SERVER_FLAGS: u16 = 5;
/// `NBD_CFLAG_*` client flags (u64).
pub const NBD_ATTR_CLIENT_FLAGS: u16 = 6;
/// Nested list of `NBD_SOCK_ITEM`.
pub const NBD_ATTR_SOCKETS: u16 = 7;
/// Seconds the device waits for a RECONFIGURE with new sockets when all connections died (u64).
pub const NBD_ATTR_DEAD_CONN_TIMEOUT: u16 = 8;
/// Nested list of `NBD_DEVICE_ITEM` (STATUS replies).
pub const NBD_ATTR_DEVICE_LIST: u16 = 9;
/// A string naming the backend; a RECONFIGURE must carry the same one (kernel 5.16+).
pub const NBD_ATTR_BACKEND_IDENTIFIER: u16 = 10;

/// One device in `NBD_ATTR_DEVICE_LIST` (nested).
pub const NBD_DEVICE_ITEM: u16 = 1;
/// The device's index (u32).
pub const NBD_DEVICE_INDEX: u16 = 1;
/// Whether the device is connected (u8, 0 or 1).
pub const NBD_DEVICE_CONNECTED: u16 = 2;

/// One socket in `NBD_ATTR_SOCKETS` (nested).
pub const NBD_SOCK_ITEM: u16 = 1;
/// The socket's file descriptor in the sending process (u32).
pub const NBD_SOCK_FD: u16 = 1;

/// What to send in `NBD_CMD_CONNECT`. Invariant (checked by `attach`, not here): `size_bytes`
/// is a non-zero multiple of `block_size`, and `socket_fds` is not empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectRequest {
    /// Device index; `None` lets the kernel choose a free device (reported in the reply).
    pub index: Option<u32>,
    /// Export size in bytes.
    pub size_bytes: u64,
    /// Logical block size in bytes.
    pub block_size: u64,
    /// NBD transmission flags (`NBD_FLAG_*`) from the handshake.
    pub server_flags: u64,
    /// Request timeout in seconds; `None` keeps the kernel's default (30 s).
    pub timeout_secs: Option<u64>,
    /// Dead-connection timeout in seconds; `None` keeps the kernel's default (0: fail at once).
    pub dead_conn_timeout_secs: Option<u64>,
    /// Backend identifier shown in /sys/block/nbdN/backend.
    pub backend_id: Option<String>,
    /// Socket file descriptors, already in the transmission phase.
    pub socket_fds: Vec<u32>,
}

/// What to send in `NBD_CMD_RECONFIGURE`: new sockets for a device whose connections died
/// (within its dead-connection timeout), and/or new timeouts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReconfigureRequest {
    /// Device index.
    pub index: u32,
    /// Request timeout in seconds, if it changes.
    pub timeout_secs: Option<u64>,
    /// Dead-connection timeout in seconds, if it changes.
    pub dead_conn_timeout_secs: Option<u64>,
    /// Replacement socket file descriptors (may be empty).
    pub socket_fds: Vec<u32>,
}

/// One device as reported by `NBD_CMD_STATUS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceStatus {
    /// The device index (/dev/nbdN).
    pub index: u32,
    /// Whether the device has a configuration (is attached).
    pub connected: bool,
}

fn put_sockets(b: &mut GenlMessageBuilder, fds: &[u32]) {
    let list = b.begin_nested(NBD_ATTR_SOCKETS);
    for &fd in fds {
        let item = b.begin_nested(NBD_SOCK_ITEM);
        b.put_u32(NBD_SOCK_FD, fd);
        b.end_nested(item);
    }
    b.end_nested(list);
}

fn request(family: u16, seq: u32, cmd: u8) -> GenlMessageBuilder {
    GenlMessageBuilder::new(
        family,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        cmd,
        NBD_GENL_VERSION,
    )
}

/// Builds `NBD_CMD_CONNECT`. Attribute order: INDEX, SIZE_BYTES, BLOCK_SIZE_BYTES,
/// SERVER_FLAGS, TIMEOUT, DEAD_CONN_TIMEOUT, BACKEND_IDENTIFIER, SOCKETS; absent options are
/// left out.
pub fn encode_connect(family: u16, seq: u32, req: &ConnectRequest) -> Vec<u8> {
    let mut b = request(family, seq, NBD_CMD_CONNECT);
    if let Some(index) = req.index {
        b.put_u32(NBD_ATTR_INDEX, index);
    }
    b.put_u64(NBD_ATTR_SIZE_BYTES, req.size_bytes);
    b.put_u64(NBD_ATTR_BLOCK_SIZE_BYTES, req.block_size);
    b.put_u64(NBD_ATTR_SERVER_FLAGS, req.server_flags);
    if let Some(t) = req.timeout_secs {
        b.put_u64(NBD_ATTR_TIMEOUT, t);
    }
    if let Some(t) = req.dead_conn_timeout_secs {
        b.put_u64(NBD_ATTR_DEAD_CONN_TIMEOUT, t);
    }
    if let Some(id) = &req.backend_id {
        b.put_str(NBD_ATTR_BACKEND_IDENTIFIER, id);
    }
    put_sockets(&mut b, &req.socket_fds);
    b.finish()
}

/// Builds `NBD_CMD_DISCONNECT` for device `index`.
pub fn encode_disconnect(family: u16, seq: u32, index: u32) -> Vec<u8> {
    let mut b = request(family, seq, NBD_CMD_DISCONNECT);
    b.put_u32(NBD_ATTR_INDEX, index);
    b.finish()
}

/// Builds `NBD_CMD_STATUS` for one device, or for every device when `index` is `None`.
pub fn encode_status(family: u16, seq: u32, index: Option<u32>) -> Vec<u8> {
    let mut b = request(family, seq, NBD_CMD_STATUS);
    if let Some(index) = index {
        b.put_u32(NBD_ATTR_INDEX, index);
    }
    b.finish()
}

/// Builds `NBD_CMD_RECONFIGURE`. SOCKETS is sent only when there are sockets to hand over.
pub fn encode_reconfigure(family: u16, seq: u32, req: &ReconfigureRequest) -> Vec<u8> {
    let mut b = request(family, seq, NBD_CMD_RECONFIGURE);
    b.put_u32(NBD_ATTR_INDEX, req.index);
    if let Some(t) = req.timeout_secs {
        b.put_u64(NBD_ATTR_TIMEOUT, t);
    }
    if let Some(t) = req.dead_conn_timeout_secs {
        b.put_u64(NBD_ATTR_DEAD_CONN_TIMEOUT, t);
    }
    if !req.socket_fds.is_empty() {
        put_sockets(&mut b, &req.socket_fds);
    }
    b.finish()
}

/// Reads the device list out of an `NBD_CMD_STATUS` reply. Items that carry no index are
/// skipped; a missing CONNECTED attribute reads as not connected. Nesting is accepted with or
/// without `NLA_F_NESTED` (the driver sends it without).
pub fn parse_status(reply: &GenlMessage<'_>) -> Result<Vec<DeviceStatus>, ParseError> {
    let attrs = attributes(reply.attrs)?;
    let list = find(&attrs, NBD_ATTR_DEVICE_LIST).ok_or(ParseError::MissingAttribute {
        request: "NBD_CMD_STATUS",
        attribute: "NBD_ATTR_DEVICE_LIST",
    })?;
    let mut out = Vec::new();
    for item in list.nested()? {
        if item.ty != NBD_DEVICE_ITEM {
            continue;
        }
        let fields = item.nested()?;
        let Some(index) = find(&fields, NBD_DEVICE_INDEX) else {
            continue;
        };
        let connected = match find(&fields, NBD_DEVICE_CONNECTED) {
            Some(c) => c.as_u8()? != 0,
            None => false,
        };
        out.push(DeviceStatus {
            index: index.as_u32()?,
            connected,
        });
    }
    Ok(out)
}

/// Reads the device index out of the driver's reply to `NBD_CMD_CONNECT`.
pub fn parse_connect_reply(reply: &GenlMessage<'_>) -> Result<u32, ParseError> {
    let attrs = attributes(reply.attrs)?;
    find(&attrs, NBD_ATTR_INDEX)
        .ok_or(ParseError::MissingAttribute {
            request: "NBD_CMD_CONNECT",
            attribute: "NBD_ATTR_INDEX",
        })?
        .as_u32()
}

/// Builds a STATUS reply the way the driver does (`genlmsg_put_reply`, nests opened with
/// `nla_nest_start_noflag` unless `nested_flag`). Not sent by twinvol: it exists so the
/// parser can be tested and fuzzed against the driver's exact layout.
pub fn encode_status_reply(
    family: u16,
    seq: u32,
    devices: &[DeviceStatus],
    nested_flag: bool,
) -> Vec<u8> {
    let mut b = GenlMessageBuilder::new(family, 0, seq, NBD_CMD_STATUS, NBD_GENL_VERSION);
    let list = b.begin_nested(NBD_ATTR_DEVICE_LIST);
    for d in devices {
        let item = b.begin_nested(NBD_DEVICE_ITEM);
        b.put_u32(NBD_DEVICE_INDEX, d.index);
        b.put_u8(NBD_DEVICE_CONNECTED, u8::from(d.connected));
        b.end_nested(item);
    }
    b.end_nested(list);
    let mut bytes = b.finish();
    if !nested_flag {
        clear_nested_flags(&mut bytes[super::codec::NLMSG_HDRLEN + super::codec::GENL_HDRLEN..]);
    }
    bytes
}

/// Runs every reply parser over `bytes` and discards the results: the entry point of the
/// fuzz target and of the "never panics" property test. Returns how many messages parsed.
pub fn parse_any_reply(bytes: &[u8]) -> usize {
    let Ok(messages) = super::codec::split_messages(bytes) else {
        return 0;
    };
    for msg in &messages {
        if let Ok(super::codec::Reply::Data(genl)) = super::codec::classify(msg) {
            let _ = parse_status(&genl);
            let _ = parse_connect_reply(&genl);
            let _ = super::codec::parse_family_id(&genl);
            if let Ok(attrs) = attributes(genl.attrs) {
                for a in &attrs {
                    let _ = a.nested();
                    let _ = a.as_str();
                }
            }
        }
    }
    messages.len()
}

/// Clears `NLA_F_NESTED` on every attribute of a well-formed area, recursing into nests
/// (a helper for [`encode_status_reply`], whose nests it knows).
fn clear_nested_flags(area: &mut [u8]) {
    let mut offset = 0;
    while offset + 4 <= area.len() {
        let len = u16::from_ne_bytes([area[offset], area[offset + 1]]) as usize;
        let ty = u16::from_ne_bytes([area[offset + 2], area[offset + 3]]);
        if len < 4 || offset + len > area.len() {
            return;
        }
        if ty & super::codec::NLA_F_NESTED != 0 {
            area[offset + 2..offset + 4]
                .copy_from_slice(&(ty & !super::codec::NLA_F_NESTED).to_ne_bytes());
            clear_nested_flags(&mut area[offset + 4..offset + len]);
        }
        offset += super::codec::align4(len);
    }
}

#[cfg(test)]
mod tests {
    use super::super::codec::{classify, split_messages, Reply, NLA_F_NESTED};
    use super::*;
    use proptest::prelude::*;

    const FAMILY: u16 = 0x1d;

    /// Hand-writes one attribute header + payload + padding, independent of the builder.
    fn attr(out: &mut Vec<u8>, ty: u16, payload: &[u8]) {
        out.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
        out.extend_from_slice(&ty.to_ne_bytes());
        out.extend_from_slice(payload);
        while out.len() % 4 != 0 {
            out.push(0);
        }
    }

    fn header(out: &mut Vec<u8>, len: u32, ty: u16, flags: u16, seq: u32, cmd: u8) {
        out.extend_from_slice(&len.to_ne_bytes());
        out.extend_from_slice(&ty.to_ne_bytes());
        out.extend_from_slice(&flags.to_ne_bytes());
        out.extend_from_slice(&seq.to_ne_bytes());
        out.extend_from_slice(&0u32.to_ne_bytes());
        out.extend_from_slice(&[cmd, 1, 0, 0]);
    }

    #[test]
    fn connect_message_matches_hand_computed_bytes() {
        let req = ConnectRequest {
            index: Some(3),
            size_bytes: 1 << 30,
            block_size: 4096,
            server_flags: 0x1 | 0x4 | 0x8, // HAS_FLAGS | SEND_FLUSH | SEND_FUA
            timeout_secs: Some(30),
            dead_conn_timeout_secs: Some(120),
            backend_id: Some("tv1".into()),
            socket_fds: vec![5, 6],
        };
        let got = encode_connect(FAMILY, 42, &req);

        // Lengths by hand: headers 20; INDEX 8; SIZE 12; BLKSIZE 12; FLAGS 12; TIMEOUT 12;
        // DEAD_CONN 12; BACKEND "tv1\0" 8; SOCKETS 4 + 2 * (SOCK_ITEM 4 + SOCK_FD 8) = 28.
        // Total 20 + 8 + 12*5 + 8 + 28 = 124.
        let mut want = Vec::new();
        header(&mut want, 124, FAMILY, 0x5, 42, 1);
        attr(&mut want, 1, &3u32.to_ne_bytes());
        attr(&mut want, 2, &(1u64 << 30).to_ne_bytes());
        attr(&mut want, 3, &4096u64.to_ne_bytes());
        attr(&mut want, 5, &0xdu64.to_ne_bytes());
        attr(&mut want, 4, &30u64.to_ne_bytes());
        attr(&mut want, 8, &120u64.to_ne_bytes());
        attr(&mut want, 10, b"tv1\0");
        want.extend_from_slice(&28u16.to_ne_bytes());
        want.extend_from_slice(&(7u16 | 0x8000).to_ne_bytes());
        for fd in [5u32, 6] {
            want.extend_from_slice(&12u16.to_ne_bytes());
            want.extend_from_slice(&(1u16 | 0x8000).to_ne_bytes());
            attr(&mut want, 1, &fd.to_ne_bytes());
        }
        assert_eq!(want.len(), 124);
        assert_eq!(got, want);
    }

    #[test]
    fn connect_without_options_carries_only_required_attributes() {
        let req = ConnectRequest {
            index: None,
            size_bytes: 512,
            block_size: 512,
            server_flags: 1,
            timeout_secs: None,
            dead_conn_timeout_secs: None,
            backend_id: None,
            socket_fds: vec![9],
        };
        let got = encode_connect(FAMILY, 1, &req);
        let mut want = Vec::new();
        header(&mut want, 20 + 36 + 16, FAMILY, 0x5, 1, 1);
        attr(&mut want, 2, &512u64.to_ne_bytes());
        attr(&mut want, 3, &512u64.to_ne_bytes());
        attr(&mut want, 5, &1u64.to_ne_bytes());
        want.extend_from_slice(&16u16.to_ne_bytes());
        want.extend_from_slice(&(7u16 | 0x8000).to_ne_bytes());
        want.extend_from_slice(&12u16.to_ne_bytes());
        want.extend_from_slice(&(1u16 | 0x8000).to_ne_bytes());
        attr(&mut want, 1, &9u32.to_ne_bytes());
        assert_eq!(got, want);
    }

    #[test]
    fn disconnect_message_matches_hand_computed_bytes() {
        let got = encode_disconnect(FAMILY, 8, 12);
        let mut want = Vec::new();
        header(&mut want, 28, FAMILY, 0x5, 8, 2);
        attr(&mut want, 1, &12u32.to_ne_bytes());
        assert_eq!(got, want);
    }

    #[test]
    fn status_message_for_one_device_and_for_all_devices() {
        let mut one = Vec::new();
        header(&mut one, 28, FAMILY, 0x5, 2, 5);
        attr(&mut one, 1, &0u32.to_ne_bytes());
        assert_eq!(encode_status(FAMILY, 2, Some(0)), one);

        let mut all = Vec::new();
        header(&mut all, 20, FAMILY, 0x5, 3, 5);
        assert_eq!(encode_status(FAMILY, 3, None), all);
    }

    #[test]
    fn reconfigure_message_matches_hand_computed_bytes() {
        let req = ReconfigureRequest {
            index: 1,
            timeout_secs: None,
            dead_conn_timeout_secs: Some(60),
            socket_fds: vec![11],
        };
        let got = encode_reconfigure(FAMILY, 4, &req);
        let mut want = Vec::new();
        header(&mut want, 20 + 8 + 12 + 16, FAMILY, 0x5, 4, 3);
        attr(&mut want, 1, &1u32.to_ne_bytes());
        attr(&mut want, 8, &60u64.to_ne_bytes());
        want.extend_from_slice(&16u16.to_ne_bytes());
        want.extend_from_slice(&(7u16 | 0x8000).to_ne_bytes());
        want.extend_from_slice(&12u16.to_ne_bytes());
        want.extend_from_slice(&(1u16 | 0x8000).to_ne_bytes());
        attr(&mut want, 1, &11u32.to_ne_bytes());
        assert_eq!(got, want);
    }

    #[test]
    fn reconfigure_without_sockets_sends_no_empty_socket_list() {
        let req = ReconfigureRequest {
            index: 2,
            timeout_secs: Some(5),
            dead_conn_timeout_secs: None,
            socket_fds: vec![],
        };
        let got = encode_reconfigure(FAMILY, 1, &req);
        let mut want = Vec::new();
        header(&mut want, 20 + 8 + 12, FAMILY, 0x5, 1, 3);
        attr(&mut want, 1, &2u32.to_ne_bytes());
        attr(&mut want, 4, &5u64.to_ne_bytes());
        assert_eq!(got, want);
    }

    /// The bytes the driver sends for STATUS with devices 0 (connected) and 1 (idle), written
    /// by hand: nests without NLA_F_NESTED, as `nla_nest_start_noflag` makes them.
    fn driver_status_reply() -> Vec<u8> {
        let mut item0 = Vec::new();
        attr(&mut item0, 1, &0u32.to_ne_bytes());
        attr(&mut item0, 2, &[1]);
        let mut item1 = Vec::new();
        attr(&mut item1, 1, &1u32.to_ne_bytes());
        attr(&mut item1, 2, &[0]);
        let mut list = Vec::new();
        attr(&mut list, 1, &item0);
        attr(&mut list, 1, &item1);
        let mut attrs = Vec::new();
        attr(&mut attrs, 9, &list);
        let mut msg = Vec::new();
        header(&mut msg, (20 + attrs.len()) as u32, FAMILY, 0, 77, 5);
        msg.extend_from_slice(&attrs);
        msg
    }

    #[test]
    fn status_reply_from_driver_parses_into_devices() {
        let bytes = driver_status_reply();
        let msgs = split_messages(&bytes).unwrap();
        let Reply::Data(genl) = classify(&msgs[0]).unwrap() else {
            panic!("not data")
        };
        assert_eq!(genl.cmd, NBD_CMD_STATUS);
        assert_eq!(
            parse_status(&genl).unwrap(),
            vec![
                DeviceStatus {
                    index: 0,
                    connected: true
                },
                DeviceStatus {
                    index: 1,
                    connected: false
                }
            ]
        );
    }

    #[test]
    fn status_reply_builder_reproduces_driver_layout() {
        let devices = [
            DeviceStatus {
                index: 0,
                connected: true,
            },
            DeviceStatus {
                index: 1,
                connected: false,
            },
        ];
        assert_eq!(
            encode_status_reply(FAMILY, 77, &devices, false),
            driver_status_reply()
        );
    }

    #[test]
    fn status_reply_with_nested_flags_parses_the_same() {
        let devices = [DeviceStatus {
            index: 7,
            connected: true,
        }];
        let bytes = encode_status_reply(FAMILY, 1, &devices, true);
        // the list attribute carries NLA_F_NESTED
        assert_ne!(u16::from_ne_bytes([bytes[22], bytes[23]]) & NLA_F_NESTED, 0);
        let msgs = split_messages(&bytes).unwrap();
        let Reply::Data(genl) = classify(&msgs[0]).unwrap() else {
            panic!("not data")
        };
        assert_eq!(parse_status(&genl).unwrap(), devices.to_vec());
    }

    #[test]
    fn status_reply_for_unknown_index_is_an_empty_list() {
        let bytes = encode_status_reply(FAMILY, 1, &[], false);
        let msgs = split_messages(&bytes).unwrap();
        let Reply::Data(genl) = classify(&msgs[0]).unwrap() else {
            panic!("not data")
        };
        assert_eq!(parse_status(&genl).unwrap(), vec![]);
    }

    #[test]
    fn status_reply_without_device_list_is_a_named_error() {
        let mut msg = Vec::new();
        header(&mut msg, 20, FAMILY, 0, 1, 5);
        let msgs = split_messages(&msg).unwrap();
        let Reply::Data(genl) = classify(&msgs[0]).unwrap() else {
            panic!("not data")
        };
        let err = parse_status(&genl).unwrap_err();
        assert!(err.to_string().contains("NBD_ATTR_DEVICE_LIST"), "{err}");
    }

    #[test]
    fn connect_reply_then_ack_in_one_buffer() {
        let mut buf = Vec::new();
        header(&mut buf, 28, FAMILY, 0, 5, 1);
        attr(&mut buf, 1, &4u32.to_ne_bytes());
        buf.extend_from_slice(&36u32.to_ne_bytes());
        buf.extend_from_slice(&2u16.to_ne_bytes());
        buf.extend_from_slice(&0x100u16.to_ne_bytes());
        buf.extend_from_slice(&5u32.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes());
        buf.extend_from_slice(&0i32.to_ne_bytes());
        buf.extend_from_slice(&[0; 16]);
        let msgs = split_messages(&buf).unwrap();
        assert_eq!(msgs.len(), 2);
        let Reply::Data(genl) = classify(&msgs[0]).unwrap() else {
            panic!("not data")
        };
        assert_eq!(parse_connect_reply(&genl).unwrap(), 4);
        assert_eq!(classify(&msgs[1]).unwrap(), Reply::Ack);
    }

    /// Reads a CONNECT request back with the reply parser's attribute functions (test helper:
    /// the kernel is the only real reader of these bytes).
    fn decode_connect(bytes: &[u8]) -> (u16, u32, ConnectRequest) {
        let msgs = split_messages(bytes).unwrap();
        assert_eq!(msgs.len(), 1);
        let Reply::Data(genl) = classify(&msgs[0]).unwrap() else {
            panic!("not data")
        };
        assert_eq!(
            (genl.cmd, genl.version),
            (NBD_CMD_CONNECT, NBD_GENL_VERSION)
        );
        let attrs = attributes(genl.attrs).unwrap();
        let u64_of = |ty| find(&attrs, ty).map(|a| a.as_u64().unwrap());
        let sockets = find(&attrs, NBD_ATTR_SOCKETS).unwrap();
        assert!(sockets.nested_flag);
        let socket_fds = sockets
            .nested()
            .unwrap()
            .iter()
            .map(|item| {
                assert_eq!(item.ty, NBD_SOCK_ITEM);
                assert!(item.nested_flag);
                let fields = item.nested().unwrap();
                find(&fields, NBD_SOCK_FD).unwrap().as_u32().unwrap()
            })
            .collect();
        let req = ConnectRequest {
            index: find(&attrs, NBD_ATTR_INDEX).map(|a| a.as_u32().unwrap()),
            size_bytes: u64_of(NBD_ATTR_SIZE_BYTES).unwrap(),
            block_size: u64_of(NBD_ATTR_BLOCK_SIZE_BYTES).unwrap(),
            server_flags: u64_of(NBD_ATTR_SERVER_FLAGS).unwrap(),
            timeout_secs: u64_of(NBD_ATTR_TIMEOUT),
            dead_conn_timeout_secs: u64_of(NBD_ATTR_DEAD_CONN_TIMEOUT),
            backend_id: find(&attrs, NBD_ATTR_BACKEND_IDENTIFIER)
                .map(|a| a.as_str().unwrap().to_string()),
            socket_fds,
        };
        (msgs[0].ty, msgs[0].seq, req)
    }

    fn arb_connect() -> impl Strategy<Value = ConnectRequest> {
        (
            proptest::option::of(any::<u32>()),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            proptest::option::of(any::<u64>()),
            proptest::option::of(any::<u64>()),
            proptest::option::of("[a-zA-Z0-9:/._-]{0,40}"),
            proptest::collection::vec(any::<u32>(), 0..16),
        )
            .prop_map(
                |(
                    index,
                    size_bytes,
                    block_size,
                    server_flags,
                    timeout_secs,
                    dead_conn_timeout_secs,
                    backend_id,
                    socket_fds,
                )| {
                    ConnectRequest {
                        index,
                        size_bytes,
                        block_size,
                        server_flags,
                        timeout_secs,
                        dead_conn_timeout_secs,
                        backend_id,
                        socket_fds,
                    }
                },
            )
    }

    proptest! {
        #[test]
        fn connect_request_round_trips_through_the_attribute_parser(
            req in arb_connect(), family in 0x11u16..0xffff, seq in any::<u32>()
        ) {
            let bytes = encode_connect(family, seq, &req);
            prop_assert_eq!(bytes.len() % 4, 0);
            prop_assert_eq!(u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize, bytes.len());
            let (got_family, got_seq, got) = decode_connect(&bytes);
            prop_assert_eq!(got_family, family);
            prop_assert_eq!(got_seq, seq);
            prop_assert_eq!(got, req);
        }

        #[test]
        fn status_reply_round_trips(
            devices in proptest::collection::vec((any::<u32>(), any::<bool>()), 0..64),
            nested_flag in any::<bool>(),
        ) {
            let devices: Vec<DeviceStatus> =
                devices.into_iter().map(|(index, connected)| DeviceStatus { index, connected }).collect();
            let bytes = encode_status_reply(FAMILY, 9, &devices, nested_flag);
            let msgs = split_messages(&bytes).unwrap();
            let Reply::Data(genl) = classify(&msgs[0]).unwrap() else { panic!("not data") };
            prop_assert_eq!(parse_status(&genl).unwrap(), devices);
        }

        #[test]
        fn arbitrary_reply_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            parse_any_reply(&bytes);
        }

        #[test]
        fn corrupted_status_reply_never_panics(
            devices in proptest::collection::vec((any::<u32>(), any::<bool>()), 1..8),
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        ) {
            let devices: Vec<DeviceStatus> =
                devices.into_iter().map(|(index, connected)| DeviceStatus { index, connected }).collect();
            let mut bytes = encode_status_reply(FAMILY, 9, &devices, false);
            for (at, value) in flips {
                let i = at.index(bytes.len());
                bytes[i] = value;
            }
            parse_any_reply(&bytes);
        }
    }
}
