//! The replication messages and their payload encodings (docs/PROTOCOL.md, "Messages").
//!
//! Invariant: decoding is strict and canonical. Every field is range-checked, reserved bits must
//! be zero and no byte may trail the last field, so `decode(encode(m)) == m` and two different
//! byte strings never decode to the same message. The `seq` and `offset` of a message travel in
//! the frame header (covered by the header CRC), never in the payload.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Largest node name carried in a Hello (matches `node.id` in the config: 1-64 bytes).
pub const MAX_NODE_ID_LEN: usize = 64;
/// Largest human-readable detail carried in a Disconnect.
pub const MAX_DETAIL_LEN: usize = 1024;
/// Smallest block size of a digest list (verify, checksum resync).
pub const MIN_DIGEST_BLOCK: u32 = 512;
/// Largest block size of a digest list.
pub const MAX_DIGEST_BLOCK: u32 = 1 << 20;
/// Length of authentication nonces and MACs (HMAC-SHA256 output).
pub const AUTH_LEN: usize = 32;

/// The one-byte type code of a frame. Codes are stable: a new message gets a new code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum MessageKind {
    /// [`Hello`].
    Hello = 0x01,
    /// [`Message::AuthChallenge`].
    AuthChallenge = 0x02,
    /// [`Message::AuthResponse`].
    AuthResponse = 0x03,
    /// [`Data`].
    Data = 0x10,
    /// [`Message::Ack`].
    Ack = 0x11,
    /// [`Message::Barrier`].
    Barrier = 0x12,
    /// [`Message::Flush`].
    Flush = 0x13,
    /// [`BitmapChunk`].
    BitmapChunk = 0x20,
    /// [`ResyncRequest`].
    ResyncRequest = 0x30,
    /// [`ResyncData`].
    ResyncData = 0x31,
    /// [`Message::ResyncDone`].
    ResyncDone = 0x32,
    /// [`VerifyRequest`].
    VerifyRequest = 0x40,
    /// [`VerifyReply`].
    VerifyReply = 0x41,
    /// [`ReadRequest`].
    ReadRequest = 0x42,
    /// [`ReadReply`].
    ReadReply = 0x43,
    /// [`Message::Ping`].
    Ping = 0x50,
    /// [`Message::Pong`].
    Pong = 0x51,
    /// [`Message::Disconnect`].
    Disconnect = 0x7f,
}

impl MessageKind {
    /// For kinds whose payload may end in bulk data (the bytes of a write): how many payload
    /// bytes come before that data. Data: epoch, flags, length (16); ResyncData: length and
    /// form (5, the form being 0 = bytes); ReadReply: status and length (8).
    pub fn bulk_lead(self) -> Option<usize> {
        match self {
            MessageKind::Data => Some(16),
            MessageKind::ResyncData => Some(5),
            MessageKind::ReadReply => Some(8),
            _ => None,
        }
    }

    /// The kind for a type code, or `None` for a code this version does not know.
    pub fn from_code(code: u8) -> Option<Self> {
        use MessageKind::*;
        Some(match code {
            0x01 => Hello,
            0x02 => AuthChallenge,
            0x03 => AuthResponse,
            0x10 => Data,
            0x11 => Ack,
            0x12 => Barrier,
            0x13 => Flush,
            0x20 => BitmapChunk,
            0x30 => ResyncRequest,
            0x31 => ResyncData,
            0x32 => ResyncDone,
            0x40 => VerifyRequest,
            0x41 => VerifyReply,
            0x42 => ReadRequest,
            0x43 => ReadReply,
            0x50 => Ping,
            0x51 => Pong,
            0x7f => Disconnect,
            _ => return None,
        })
    }

    /// Whether frames of this kind carry a sequence number in the header.
    pub fn has_seq(self) -> bool {
        use MessageKind::*;
        matches!(
            self,
            Data | Ack
                | Barrier
                | Flush
                | ResyncRequest
                | ResyncData
                | ResyncDone
                | VerifyRequest
                | VerifyReply
                | ReadRequest
                | ReadReply
        )
    }

    /// Whether frames of this kind carry a byte offset in the header.
    pub fn has_offset(self) -> bool {
        use MessageKind::*;
        matches!(
            self,
            Data | BitmapChunk
                | ResyncRequest
                | ResyncData
                | VerifyRequest
                | VerifyReply
                | ReadRequest
                | ReadReply
        )
    }
}

/// The four generation identifiers of a node's copy (DRBD's UUID set), opaque here: the
/// metadata room owns their meaning and the connect decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Generations {
    /// Identifier of the data as it is now.
    pub current: u64,
    /// Identifier the dirty bitmap is relative to (0 when the bitmap is clean).
    pub bitmap: u64,
    /// Previous `bitmap` value.
    pub history1: u64,
    /// The one before.
    pub history2: u64,
}

/// Feature bits a node offers in its Hello; a feature is used only when both offer it.
pub mod features {
    /// Frames may be zstd-compressed.
    pub const ZSTD: u64 = 1 << 0;
    /// Checksum-based resync (ResyncRequest in checksum mode).
    pub const CHECKSUM_RESYNC: u64 = 1 << 1;
    /// Online verify (VerifyRequest/VerifyReply).
    pub const VERIFY: u64 = 1 << 2;
    /// Serves a detached Primary: answers ReadRequest and honours Data's LOCAL_MISSING.
    pub const DETACHED_PRIMARY: u64 = 1 << 3;
}

/// First message each side sends: who it is and what state its copy is in.
///
/// Invariant: `proto_min <= proto_max`, node ids are 1..=64 bytes of UTF-8.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Oldest protocol version this node speaks.
    pub proto_min: u16,
    /// Newest protocol version this node speaks.
    pub proto_max: u16,
    /// The volume both nodes must agree on.
    pub volume_uuid: [u8; 16],
    /// The sender's node id (`node.id`).
    pub node_id: String,
    /// The node id the sender expects to be talking to.
    pub peer_node_id: String,
    /// The sender's generation identifiers.
    pub generations: Generations,
    /// The sender's disk state, opaque here (owned by the metadata room).
    pub disk_state: u32,
    /// Bytes of device covered by one bit of the dirty bitmap.
    pub bitmap_granularity: u32,
    /// Usable size of the sender's device in bytes.
    pub device_size: u64,
    /// [`features`] bits offered.
    pub features: u64,
}

/// Flags of a [`Data`] frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DataFlags(pub u32);

impl DataFlags {
    /// The write must be durable on the peer before it is acknowledged (NBD FUA).
    pub const FUA: u32 = 1 << 0;
    /// Flush the peer's device before applying this write (NBD FLUSH ordering).
    pub const FLUSH: u32 = 1 << 1;
    /// The sender's own disk does not hold this write (it is detached after a disk error):
    /// the receiver, now the only copy with it, records the region dirty for the sender.
    pub const LOCAL_MISSING: u32 = 1 << 2;
    /// All defined bits; others are reserved and must be zero.
    pub const ALL: u32 = Self::FUA | Self::FLUSH | Self::LOCAL_MISSING;

    /// Whether FUA is set.
    pub fn fua(self) -> bool {
        self.0 & Self::FUA != 0
    }
    /// Whether FLUSH is set.
    pub fn flush(self) -> bool {
        self.0 & Self::FLUSH != 0
    }
    /// Whether LOCAL_MISSING is set.
    pub fn local_missing(self) -> bool {
        self.0 & Self::LOCAL_MISSING != 0
    }
}

/// Largest region one [`ReadRequest`] asks for (the NBD server's largest request).
pub const MAX_READ: u32 = 32 << 20;

/// A Primary whose disk failed (detached) reads a region from the peer's copy.
///
/// Invariant: `length` is in 1..=[`MAX_READ`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadRequest {
    /// Request number, echoed by the reply.
    pub seq: u64,
    /// Byte offset of the region.
    pub offset: u64,
    /// Length of the region.
    pub length: u32,
}

/// The answer to a [`ReadRequest`]: the bytes, or the errno of a failed read.
///
/// Invariant: `status == 0` and `data.len()` is the requested length, or `status != 0` and
/// `data` is empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadReply {
    /// The request number answered.
    pub seq: u64,
    /// Byte offset of the region.
    pub offset: u64,
    /// 0, or the errno of the peer's read.
    pub status: u32,
    /// The region's bytes (empty on failure).
    pub data: Bytes,
}

/// One application write to mirror.
///
/// Invariant: `data.len()` fits in u32 (the frame limit is far smaller).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Data {
    /// Sequence number; the peer applies frames in sequence order and acks this number.
    pub seq: u64,
    /// Write epoch: writes of one epoch may be reordered, epochs may not (closed by a Barrier).
    pub epoch: u64,
    /// Byte offset on the device.
    pub offset: u64,
    /// FUA / FLUSH.
    pub flags: DataFlags,
    /// The bytes to write (length = `data.len()`).
    pub data: Bytes,
}

/// One piece of a run-length-encoded dirty bitmap (opaque bytes here); a bitmap larger than a
/// frame is sent as consecutive chunks, see [`super::bitmap`].
///
/// Invariant: `offset + data.len() <= total_len`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapChunk {
    /// Position of `data` in the whole encoded bitmap.
    pub offset: u64,
    /// Length of the whole encoded bitmap.
    pub total_len: u64,
    /// The bytes at `offset`.
    pub data: Bytes,
}

/// Per-block CRC32 digests of a region.
///
/// Invariant: `block_size` is a power of two in 512..=1 MiB and
/// `crcs.len() == ceil(length / block_size)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digests {
    /// Bytes per digest (the last block may be shorter).
    pub block_size: u32,
    /// One CRC32 per block, in order.
    pub crcs: Vec<u32>,
}

/// How a resync source answers a [`ResyncRequest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResyncMode {
    /// Send the whole region.
    Plain,
    /// The requester's digests of the region: send only blocks that differ.
    Checksum(Digests),
}

/// A resync target asks for a region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResyncRequest {
    /// Request number, echoed by the answers.
    pub seq: u64,
    /// Byte offset of the region.
    pub offset: u64,
    /// Length of the region.
    pub length: u32,
    /// Plain or checksum mode.
    pub mode: ResyncMode,
}

/// What a [`ResyncData`] carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResyncPayload {
    /// The region's bytes.
    Bytes(Bytes),
    /// The region is already identical on both sides (checksum mode): nothing to write.
    InSync,
}

/// A resync source answers (part of) a request.
///
/// Invariant: for [`ResyncPayload::Bytes`], the byte count equals `length`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResyncData {
    /// The request number answered.
    pub seq: u64,
    /// Byte offset of this piece.
    pub offset: u64,
    /// Length of this piece.
    pub length: u32,
    /// Bytes, or "already in sync".
    pub payload: ResyncPayload,
}

/// Online verify: "send me your digests of this region".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyRequest {
    /// Request number, echoed by the reply.
    pub seq: u64,
    /// Byte offset of the region.
    pub offset: u64,
    /// Length of the region.
    pub length: u32,
    /// Bytes per digest (power of two, 512..=1 MiB).
    pub block_size: u32,
}

/// Online verify: the digests of a region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReply {
    /// The request number answered.
    pub seq: u64,
    /// Byte offset of the region.
    pub offset: u64,
    /// Length of the region.
    pub length: u32,
    /// The digests.
    pub digests: Digests,
}

/// Why a node ends the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DisconnectReason {
    /// Orderly shutdown or role change.
    Shutdown,
    /// The peer's authentication response was wrong (different pre-shared key).
    AuthFailed,
    /// No protocol version in common.
    ProtocolVersion,
    /// The peer serves another volume (volume UUID differs).
    VolumeMismatch,
    /// The peer is not the node configured as peer.
    NodeMismatch,
    /// Both copies were modified independently.
    SplitBrain,
    /// The copies share no history.
    UnrelatedData,
    /// The peer sent something this node could not accept (bad frame, CRC error, wrong order).
    ProtocolError,
    /// The peer did not answer in time.
    Timeout,
    /// A Secondary stops while connected: it marked its copy Outdated before sending this,
    /// so the Primary may complete writes without it (and need not wait for it).
    OutdatedStop,
    /// A code this version does not know (kept so it can be logged).
    Other(u16),
}

impl DisconnectReason {
    /// The wire code.
    pub fn code(self) -> u16 {
        use DisconnectReason::*;
        match self {
            Shutdown => 1,
            AuthFailed => 2,
            ProtocolVersion => 3,
            VolumeMismatch => 4,
            NodeMismatch => 5,
            SplitBrain => 6,
            UnrelatedData => 7,
            ProtocolError => 8,
            Timeout => 9,
            OutdatedStop => 10,
            Other(c) => c,
        }
    }

    /// The reason for a wire code (unknown codes become [`DisconnectReason::Other`]).
    pub fn from_code(code: u16) -> Self {
        use DisconnectReason::*;
        match code {
            1 => Shutdown,
            2 => AuthFailed,
            3 => ProtocolVersion,
            4 => VolumeMismatch,
            5 => NodeMismatch,
            6 => SplitBrain,
            7 => UnrelatedData,
            8 => ProtocolError,
            9 => Timeout,
            10 => OutdatedStop,
            c => Other(c),
        }
    }
}

/// Every message of the replication protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Identity and state; first message of each side.
    Hello(Hello),
    /// A fresh random nonce the peer must MAC (see [`super::auth`]).
    AuthChallenge {
        /// 32 random bytes.
        nonce: [u8; AUTH_LEN],
    },
    /// HMAC-SHA256 proof of the pre-shared key over the handshake transcript.
    AuthResponse {
        /// The MAC.
        mac: [u8; AUTH_LEN],
    },
    /// An application write.
    Data(Data),
    /// The peer made write/barrier/flush `seq` durable (status 0) or failed it (errno).
    Ack {
        /// The acknowledged sequence number.
        seq: u64,
        /// 0 on success, else an errno value.
        status: u32,
    },
    /// Closes write epoch `epoch`: no write of a later epoch is applied before all of it.
    Barrier {
        /// Sequence number (acked like a write).
        seq: u64,
        /// The epoch closed.
        epoch: u64,
    },
    /// Make everything applied so far durable on the peer's device.
    Flush {
        /// Sequence number (acked like a write).
        seq: u64,
    },
    /// Part of the sender's dirty bitmap.
    BitmapChunk(BitmapChunk),
    /// Resync: request a region.
    ResyncRequest(ResyncRequest),
    /// Resync: a region's bytes (or "in sync").
    ResyncData(ResyncData),
    /// Resync: the source sent every region of this resync and each was acknowledged; the
    /// target flushes, becomes consistent and acks `seq`.
    ResyncDone {
        /// Sequence number (acked like a write).
        seq: u64,
    },
    /// Verify: request digests.
    VerifyRequest(VerifyRequest),
    /// Verify: digests.
    VerifyReply(VerifyReply),
    /// A detached Primary reads from the peer's copy.
    ReadRequest(ReadRequest),
    /// The bytes of a [`ReadRequest`].
    ReadReply(ReadReply),
    /// Liveness probe.
    Ping {
        /// Echoed by the Pong.
        nonce: u64,
    },
    /// Answer to a Ping.
    Pong {
        /// The Ping's nonce.
        nonce: u64,
    },
    /// The sender closes the connection, and says why.
    Disconnect {
        /// Machine-readable reason.
        reason: DisconnectReason,
        /// Human-readable detail (at most 1024 bytes).
        detail: String,
    },
}

/// A payload that decoded to no valid message; the text says which field and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed {kind:?} message: {problem}")]
pub struct Malformed {
    /// The frame's type.
    pub kind: MessageKind,
    /// What is wrong.
    pub problem: String,
}

/// A message that cannot be encoded (a field out of its documented range).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot encode {kind:?} message: {problem}")]
pub struct Unencodable {
    /// The message's type.
    pub kind: MessageKind,
    /// What is out of range.
    pub problem: String,
}

fn check_block_size(bs: u32) -> Result<(), String> {
    if bs.is_power_of_two() && (MIN_DIGEST_BLOCK..=MAX_DIGEST_BLOCK).contains(&bs) {
        Ok(())
    } else {
        Err(format!(
            "block size {bs} is not a power of two in {MIN_DIGEST_BLOCK}..={MAX_DIGEST_BLOCK}"
        ))
    }
}

fn check_digests(length: u32, d: &Digests) -> Result<(), String> {
    check_block_size(d.block_size)?;
    let want = length.div_ceil(d.block_size) as usize;
    if d.crcs.len() != want {
        return Err(format!(
            "{} digests for {length} bytes of {}-byte blocks (want {want})",
            d.crcs.len(),
            d.block_size
        ));
    }
    Ok(())
}

fn check_read_length(length: u32) -> Result<(), String> {
    if (1..=MAX_READ).contains(&length) {
        Ok(())
    } else {
        Err(format!("read length {length} is not in 1..={MAX_READ}"))
    }
}

fn check_node_id(field: &str, s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > MAX_NODE_ID_LEN {
        return Err(format!(
            "{field} must be 1..={MAX_NODE_ID_LEN} bytes, is {}",
            s.len()
        ));
    }
    Ok(())
}

impl Message {
    /// This message's type code.
    pub fn kind(&self) -> MessageKind {
        match self {
            Message::Hello(_) => MessageKind::Hello,
            Message::AuthChallenge { .. } => MessageKind::AuthChallenge,
            Message::AuthResponse { .. } => MessageKind::AuthResponse,
            Message::Data(_) => MessageKind::Data,
            Message::Ack { .. } => MessageKind::Ack,
            Message::Barrier { .. } => MessageKind::Barrier,
            Message::Flush { .. } => MessageKind::Flush,
            Message::BitmapChunk(_) => MessageKind::BitmapChunk,
            Message::ResyncRequest(_) => MessageKind::ResyncRequest,
            Message::ResyncData(_) => MessageKind::ResyncData,
            Message::ResyncDone { .. } => MessageKind::ResyncDone,
            Message::VerifyRequest(_) => MessageKind::VerifyRequest,
            Message::VerifyReply(_) => MessageKind::VerifyReply,
            Message::ReadRequest(_) => MessageKind::ReadRequest,
            Message::ReadReply(_) => MessageKind::ReadReply,
            Message::Ping { .. } => MessageKind::Ping,
            Message::Pong { .. } => MessageKind::Pong,
            Message::Disconnect { .. } => MessageKind::Disconnect,
        }
    }

    /// The `(seq, offset)` pair carried in the frame header (0 where the kind has none).
    pub fn header_fields(&self) -> (u64, u64) {
        match self {
            Message::Data(d) => (d.seq, d.offset),
            Message::Ack { seq, .. }
            | Message::Barrier { seq, .. }
            | Message::Flush { seq }
            | Message::ResyncDone { seq } => (*seq, 0),
            Message::BitmapChunk(c) => (0, c.offset),
            Message::ResyncRequest(r) => (r.seq, r.offset),
            Message::ResyncData(r) => (r.seq, r.offset),
            Message::VerifyRequest(r) => (r.seq, r.offset),
            Message::VerifyReply(r) => (r.seq, r.offset),
            Message::ReadRequest(r) => (r.seq, r.offset),
            Message::ReadReply(r) => (r.seq, r.offset),
            _ => (0, 0),
        }
    }

    /// Appends the payload (everything but `seq`/`offset`) to `out`; refuses out-of-range fields.
    pub fn encode_payload(&self, out: &mut BytesMut) -> Result<(), Unencodable> {
        if let Some(bulk) = self.encode_payload_split(out)? {
            out.put_slice(&bulk);
        }
        Ok(())
    }

    /// Like [`Message::encode_payload`], but the bulk data that ends a Data or ResyncData
    /// payload (after [`MessageKind::bulk_lead`] bytes) is not copied: it is returned (a cheap
    /// clone) for the caller to send after what was appended to `out`.
    pub fn encode_payload_split(&self, out: &mut BytesMut) -> Result<Option<Bytes>, Unencodable> {
        let kind = self.kind();
        let bad = |problem: String| Unencodable { kind, problem };
        match self {
            Message::Hello(h) => {
                if h.proto_min > h.proto_max {
                    return Err(bad(format!(
                        "proto_min {} > proto_max {}",
                        h.proto_min, h.proto_max
                    )));
                }
                check_node_id("node_id", &h.node_id).map_err(bad)?;
                check_node_id("peer_node_id", &h.peer_node_id).map_err(bad)?;
                out.put_u16(h.proto_min);
                out.put_u16(h.proto_max);
                out.put_slice(&h.volume_uuid);
                out.put_u8(h.node_id.len() as u8);
                out.put_slice(h.node_id.as_bytes());
                out.put_u8(h.peer_node_id.len() as u8);
                out.put_slice(h.peer_node_id.as_bytes());
                let g = h.generations;
                for v in [g.current, g.bitmap, g.history1, g.history2] {
                    out.put_u64(v);
                }
                out.put_u32(h.disk_state);
                out.put_u32(h.bitmap_granularity);
                out.put_u64(h.device_size);
                out.put_u64(h.features);
            }
            Message::AuthChallenge { nonce } => out.put_slice(nonce),
            Message::AuthResponse { mac } => out.put_slice(mac),
            Message::Data(d) => {
                if d.flags.0 & !DataFlags::ALL != 0 {
                    return Err(bad(format!(
                        "reserved data flags {:#x}",
                        d.flags.0 & !DataFlags::ALL
                    )));
                }
                let len = u32::try_from(d.data.len())
                    .map_err(|_| bad("data longer than 4 GiB".into()))?;
                out.put_u64(d.epoch);
                out.put_u32(d.flags.0);
                out.put_u32(len);
                return Ok(Some(d.data.clone()));
            }
            Message::Ack { status, .. } => out.put_u32(*status),
            Message::Barrier { epoch, .. } => out.put_u64(*epoch),
            Message::Flush { .. } | Message::ResyncDone { .. } => {}
            Message::BitmapChunk(c) => {
                let end = c.offset.checked_add(c.data.len() as u64);
                if end.is_none_or(|e| e > c.total_len) {
                    return Err(bad(format!(
                        "chunk {}+{} beyond total {}",
                        c.offset,
                        c.data.len(),
                        c.total_len
                    )));
                }
                out.put_u64(c.total_len);
                out.put_slice(&c.data);
            }
            Message::ResyncRequest(r) => {
                out.put_u32(r.length);
                match &r.mode {
                    ResyncMode::Plain => out.put_u8(0),
                    ResyncMode::Checksum(d) => {
                        check_digests(r.length, d).map_err(bad)?;
                        out.put_u8(1);
                        put_digests(out, d);
                    }
                }
            }
            Message::ResyncData(r) => {
                out.put_u32(r.length);
                match &r.payload {
                    ResyncPayload::Bytes(b) => {
                        if b.len() != r.length as usize {
                            return Err(bad(format!("{} bytes for length {}", b.len(), r.length)));
                        }
                        out.put_u8(0);
                        return Ok(Some(b.clone()));
                    }
                    ResyncPayload::InSync => out.put_u8(1),
                }
            }
            Message::VerifyRequest(v) => {
                check_block_size(v.block_size).map_err(bad)?;
                out.put_u32(v.length);
                out.put_u32(v.block_size);
            }
            Message::VerifyReply(v) => {
                check_digests(v.length, &v.digests).map_err(bad)?;
                out.put_u32(v.length);
                put_digests(out, &v.digests);
            }
            Message::ReadRequest(r) => {
                check_read_length(r.length).map_err(bad)?;
                out.put_u32(r.length);
            }
            Message::ReadReply(r) => {
                let len = u32::try_from(r.data.len())
                    .ok()
                    .filter(|l| *l <= MAX_READ)
                    .ok_or_else(|| bad(format!("{} bytes, at most {MAX_READ}", r.data.len())))?;
                if r.status != 0 && len != 0 {
                    return Err(bad(format!("status {} with {len} bytes of data", r.status)));
                }
                out.put_u32(r.status);
                out.put_u32(len);
                return Ok(Some(r.data.clone()));
            }
            Message::Ping { nonce } | Message::Pong { nonce } => out.put_u64(*nonce),
            Message::Disconnect { reason, detail } => {
                if detail.len() > MAX_DETAIL_LEN {
                    return Err(bad(format!(
                        "detail is {} bytes, at most {MAX_DETAIL_LEN}",
                        detail.len()
                    )));
                }
                out.put_u16(reason.code());
                out.put_u16(detail.len() as u16);
                out.put_slice(detail.as_bytes());
            }
        }
        Ok(None)
    }

    /// Decodes a payload of type `kind` whose header carried `seq` and `offset`.
    ///
    /// `seq`/`offset` must be zero for kinds that have none (see [`MessageKind::has_seq`]).
    pub fn decode_payload(
        kind: MessageKind,
        seq: u64,
        offset: u64,
        payload: Bytes,
    ) -> Result<Message, Malformed> {
        let mut r = Reader { kind, buf: payload };
        if !kind.has_seq() && seq != 0 {
            return Err(r.bad(format!("header seq {seq} must be 0 for this type")));
        }
        if !kind.has_offset() && offset != 0 {
            return Err(r.bad(format!("header offset {offset} must be 0 for this type")));
        }
        let msg = match kind {
            MessageKind::Hello => {
                let proto_min = r.u16()?;
                let proto_max = r.u16()?;
                if proto_min > proto_max {
                    return Err(r.bad(format!("proto_min {proto_min} > proto_max {proto_max}")));
                }
                let volume_uuid = r.array::<16>()?;
                let node_id = r.node_id("node_id")?;
                let peer_node_id = r.node_id("peer_node_id")?;
                let generations = Generations {
                    current: r.u64()?,
                    bitmap: r.u64()?,
                    history1: r.u64()?,
                    history2: r.u64()?,
                };
                Message::Hello(Hello {
                    proto_min,
                    proto_max,
                    volume_uuid,
                    node_id,
                    peer_node_id,
                    generations,
                    disk_state: r.u32()?,
                    bitmap_granularity: r.u32()?,
                    device_size: r.u64()?,
                    features: r.u64()?,
                })
            }
            MessageKind::AuthChallenge => Message::AuthChallenge { nonce: r.array()? },
            MessageKind::AuthResponse => Message::AuthResponse { mac: r.array()? },
            MessageKind::Data => {
                let epoch = r.u64()?;
                let flags = r.u32()?;
                if flags & !DataFlags::ALL != 0 {
                    return Err(r.bad(format!(
                        "reserved data flags {:#x} set",
                        flags & !DataFlags::ALL
                    )));
                }
                let len = r.u32()?;
                let data = r.bytes(len as usize)?;
                Message::Data(Data {
                    seq,
                    epoch,
                    offset,
                    flags: DataFlags(flags),
                    data,
                })
            }
            MessageKind::Ack => Message::Ack {
                seq,
                status: r.u32()?,
            },
            MessageKind::Barrier => Message::Barrier {
                seq,
                epoch: r.u64()?,
            },
            MessageKind::Flush => Message::Flush { seq },
            MessageKind::ResyncDone => Message::ResyncDone { seq },
            MessageKind::BitmapChunk => {
                let total_len = r.u64()?;
                let data = r.rest();
                if offset
                    .checked_add(data.len() as u64)
                    .is_none_or(|e| e > total_len)
                {
                    return Err(r.bad(format!(
                        "chunk {offset}+{} beyond total {total_len}",
                        data.len()
                    )));
                }
                Message::BitmapChunk(BitmapChunk {
                    offset,
                    total_len,
                    data,
                })
            }
            MessageKind::ResyncRequest => {
                let length = r.u32()?;
                let mode = match r.u8()? {
                    0 => ResyncMode::Plain,
                    1 => {
                        let d = r.digests()?;
                        check_digests(length, &d).map_err(|p| r.bad(p))?;
                        ResyncMode::Checksum(d)
                    }
                    m => return Err(r.bad(format!("unknown resync mode {m}"))),
                };
                Message::ResyncRequest(ResyncRequest {
                    seq,
                    offset,
                    length,
                    mode,
                })
            }
            MessageKind::ResyncData => {
                let length = r.u32()?;
                let payload = match r.u8()? {
                    0 => ResyncPayload::Bytes(r.bytes(length as usize)?),
                    1 => ResyncPayload::InSync,
                    m => return Err(r.bad(format!("unknown resync payload form {m}"))),
                };
                Message::ResyncData(ResyncData {
                    seq,
                    offset,
                    length,
                    payload,
                })
            }
            MessageKind::VerifyRequest => {
                let length = r.u32()?;
                let block_size = r.u32()?;
                check_block_size(block_size).map_err(|p| r.bad(p))?;
                Message::VerifyRequest(VerifyRequest {
                    seq,
                    offset,
                    length,
                    block_size,
                })
            }
            MessageKind::VerifyReply => {
                let length = r.u32()?;
                let digests = r.digests()?;
                check_digests(length, &digests).map_err(|p| r.bad(p))?;
                Message::VerifyReply(VerifyReply {
                    seq,
                    offset,
                    length,
                    digests,
                })
            }
            MessageKind::ReadRequest => {
                let length = r.u32()?;
                check_read_length(length).map_err(|p| r.bad(p))?;
                Message::ReadRequest(ReadRequest {
                    seq,
                    offset,
                    length,
                })
            }
            MessageKind::ReadReply => {
                let status = r.u32()?;
                let len = r.u32()?;
                if len > MAX_READ {
                    return Err(r.bad(format!("{len} bytes, at most {MAX_READ}")));
                }
                if status != 0 && len != 0 {
                    return Err(r.bad(format!("status {status} with {len} bytes of data")));
                }
                let data = r.bytes(len as usize)?;
                Message::ReadReply(ReadReply {
                    seq,
                    offset,
                    status,
                    data,
                })
            }
            MessageKind::Ping => Message::Ping { nonce: r.u64()? },
            MessageKind::Pong => Message::Pong { nonce: r.u64()? },
            MessageKind::Disconnect => {
                let reason = DisconnectReason::from_code(r.u16()?);
                let len = r.u16()? as usize;
                if len > MAX_DETAIL_LEN {
                    return Err(r.bad(format!("detail of {len} bytes, at most {MAX_DETAIL_LEN}")));
                }
                let detail = r.string(len, "detail")?;
                Message::Disconnect { reason, detail }
            }
        };
        if r.buf.has_remaining() {
            return Err(r.bad(format!("{} bytes after the last field", r.buf.remaining())));
        }
        Ok(msg)
    }
}

fn put_digests(out: &mut BytesMut, d: &Digests) {
    out.put_u32(d.block_size);
    out.put_u32(d.crcs.len() as u32);
    for c in &d.crcs {
        out.put_u32(*c);
    }
}

/// Bounds-checked big-endian reader over a payload.
struct Reader {
    kind: MessageKind,
    buf: Bytes,
}

impl Reader {
    fn bad(&self, problem: String) -> Malformed {
        Malformed {
            kind: self.kind,
            problem,
        }
    }
    fn need(&self, n: usize) -> Result<(), Malformed> {
        if self.buf.remaining() < n {
            return Err(self.bad(format!(
                "truncated: need {n} more bytes, have {}",
                self.buf.remaining()
            )));
        }
        Ok(())
    }
    fn u8(&mut self) -> Result<u8, Malformed> {
        self.need(1)?;
        Ok(self.buf.get_u8())
    }
    fn u16(&mut self) -> Result<u16, Malformed> {
        self.need(2)?;
        Ok(self.buf.get_u16())
    }
    fn u32(&mut self) -> Result<u32, Malformed> {
        self.need(4)?;
        Ok(self.buf.get_u32())
    }
    fn u64(&mut self) -> Result<u64, Malformed> {
        self.need(8)?;
        Ok(self.buf.get_u64())
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], Malformed> {
        self.need(N)?;
        let mut a = [0u8; N];
        self.buf.copy_to_slice(&mut a);
        Ok(a)
    }
    fn bytes(&mut self, n: usize) -> Result<Bytes, Malformed> {
        self.need(n)?;
        Ok(self.buf.split_to(n))
    }
    fn rest(&mut self) -> Bytes {
        std::mem::take(&mut self.buf)
    }
    fn string(&mut self, n: usize, field: &str) -> Result<String, Malformed> {
        let b = self.bytes(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| self.bad(format!("{field} is not UTF-8")))
    }
    fn node_id(&mut self, field: &str) -> Result<String, Malformed> {
        let n = self.u8()? as usize;
        let s = self.string(n, field)?;
        check_node_id(field, &s).map_err(|p| self.bad(p))?;
        Ok(s)
    }
    fn digests(&mut self) -> Result<Digests, Malformed> {
        let block_size = self.u32()?;
        let count = self.u32()? as usize;
        // Check the count against the bytes present before allocating for it.
        let bytes = count
            .checked_mul(4)
            .ok_or_else(|| self.bad("digest count overflows".into()))?;
        self.need(bytes)?;
        let crcs = (0..count).map(|_| self.buf.get_u32()).collect();
        Ok(Digests { block_size, crcs })
    }
}
