//! Frames: the 40-byte header, payload CRC32, per-frame zstd, and the streaming decoder
//! (docs/PROTOCOL.md, "Frame").
//!
//! Invariants:
//! - The header CRC covers header bytes 0..36; the payload CRC covers the *uncompressed* payload,
//!   computed before compression on the sender and after decompression on the receiver, so a
//!   corruption in memory, on the wire or in either compressor is caught.
//! - A payload is sent compressed only when that makes it strictly smaller.
//! - The decoder checks every length against its limit before it allocates, decompresses into a
//!   buffer of exactly the announced size, and never panics on any input.

use std::collections::VecDeque;
use std::io::IoSlice;

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::message::{Malformed, Message, MessageKind, Unencodable};

/// First four bytes of every frame: "TVRP" (twinvol replication protocol).
pub const MAGIC: u32 = 0x5456_5250;
/// Version of the frame layout (header, CRC and compression rules).
pub const FRAME_VERSION: u8 = 1;
/// Size of the frame header in bytes.
pub const HEADER_LEN: usize = 40;
/// Header flag: the payload is one zstd frame.
pub const FLAG_ZSTD: u16 = 1 << 0;
/// Default largest payload (uncompressed) a decoder accepts and an encoder produces: 16 MiB
/// of data plus room for the fixed fields.
pub const DEFAULT_MAX_PAYLOAD: u32 = (16 << 20) + 4096;
/// Payloads shorter than this are never compressed (zstd cannot win on them).
pub const MIN_COMPRESS_LEN: usize = 64;
/// Payloads at least this long are probed first: a [`PROBE_LEN`]-byte sample from their middle
/// is compressed, and unless it shrinks below 7/8 the payload goes raw without compressing the
/// rest (incompressible data then costs almost no zstd time).
pub const PROBE_FROM_LEN: usize = 64 * 1024;
/// Bytes compressed by the probe.
pub const PROBE_LEN: usize = 4096;
/// Bulk data (the bytes of a Data or ResyncData frame) at least this long is received into a
/// buffer of its own whose data starts at a multiple of [`BULK_ALIGN`]
/// ([`FrameDecoder::bulk_pending`]).
pub const BULK_MIN: usize = 64 * 1024;
/// Bulk data at least this long that goes raw without a compression attempt (no compression,
/// a closed [`CompressGate`], or a failed probe) is queued by reference ([`FrameQueue`]), not
/// copied: the socket write is then its only copy on the sending node. Shorter data is copied
/// in with its header (one segment per frame). Only the sender's memory use depends on this:
/// the bytes on the wire are the same either way.
pub const SEND_REF_MIN: usize = 4096;
/// Alignment of received bulk data: direct I/O on any device takes it without a copy.
pub const BULK_ALIGN: usize = 4096;
/// Compression attempts are judged in windows of at least this many payload bytes
/// ([`CompressGate`]).
pub const GATE_WINDOW_BYTES: u64 = 4 << 20;
/// After a window whose attempts saved less than 1/8 of their bytes, this many payload bytes
/// go raw without an attempt (and without a probe) before the next window.
pub const GATE_SKIP_BYTES: u64 = 256 << 20;
/// How many times poor windows in a row may double [`GATE_SKIP_BYTES`].
pub const GATE_MAX_BACKOFF: u32 = 4;

/// Whether compressing pays: zstd costs about 2 ms of CPU per MiB, and data that saves less
/// than 1/8 (fio's buffers save 9%) is not worth it on a replication link. Short payloads are
/// compressed without a probe, and a long one whose sample happened to compress is compressed
/// whole, so both are judged by their outcome; a long one whose sample does not compress counts
/// as an attempt that went raw (until it was counted, every incompressible 1 MiB write was probed:
/// 2.8% of the Primary's core during sync 1 MiB writes at 0.7 GB/s, docs/BENCHMARKS.md session
/// 7). Attempts are summed in windows of
/// [`GATE_WINDOW_BYTES`]; a window that saved less than 1/8 makes the next
/// [`GATE_SKIP_BYTES`] go raw untried (under 2% of the bytes are then tried); then a new
/// window tries again, so a workload that turns compressible is noticed. Each further poor
/// window in a row doubles the skip, up to [`GATE_MAX_BACKOFF`] doublings (4 GiB with the
/// defaults: under 0.1% of incompressible bytes tried); a window that saves resets it.
///
/// Invariant: `skip > 0` only after a window that saved less than 1/8; `poor_streak` counts
/// the poor windows since the last one that saved; `raw` and `wire` sum the current window's
/// attempts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompressGate {
    window: u64,
    skip_after_poor: u64,
    poor_streak: u32,
    skip: u64,
    raw: u64,
    wire: u64,
}

impl Default for CompressGate {
    fn default() -> Self {
        Self::new(GATE_WINDOW_BYTES, GATE_SKIP_BYTES)
    }
}

impl CompressGate {
    /// A gate judging windows of `window` bytes and skipping `skip` bytes after a poor one
    /// (doubled for each further poor window in a row, at most [`GATE_MAX_BACKOFF`] times).
    pub fn new(window: u64, skip: u64) -> Self {
        Self {
            window,
            skip_after_poor: skip,
            poor_streak: 0,
            skip: 0,
            raw: 0,
            wire: 0,
        }
    }

    /// Whether a payload of `len` bytes may be compressed (or probed); a refused one counts
    /// against the bytes to skip.
    pub fn admit(&mut self, len: usize) -> bool {
        if self.skip > 0 {
            self.skip = self.skip.saturating_sub(len as u64);
            return false;
        }
        true
    }

    /// Records one attempt: `raw` payload bytes became `wire` bytes (`raw` when it went raw).
    pub fn record(&mut self, raw: usize, wire: usize) {
        self.raw += raw as u64;
        self.wire += wire as u64;
        if self.raw >= self.window {
            if self.wire * 8 > self.raw * 7 {
                self.skip = self.skip_after_poor << self.poor_streak.min(GATE_MAX_BACKOFF);
                self.poor_streak = self.poor_streak.saturating_add(1);
            } else {
                self.poor_streak = 0;
            }
            (self.raw, self.wire) = (0, 0);
        }
    }
}

/// The decoded fixed header of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Message type.
    pub kind: MessageKind,
    /// [`FLAG_ZSTD`] or 0.
    pub flags: u16,
    /// Sequence number (0 for kinds without one).
    pub seq: u64,
    /// Byte offset (0 for kinds without one).
    pub offset: u64,
    /// Length of the payload after decompression.
    pub raw_len: u32,
    /// Length of the payload bytes that follow the header.
    pub wire_len: u32,
    /// CRC32 of the uncompressed payload.
    pub payload_crc: u32,
}

/// Why a byte stream could not be decoded. After any error the stream's framing is lost: the
/// connection must be reset (the decoder refuses further input with [`WireError::Poisoned`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The stream is not twinvol replication traffic, or it lost frame alignment.
    #[error("replication frame has bad magic {found:#010x} (want {MAGIC:#010x}): the peer is not twinvol or the stream is corrupt; check replication.peer points at the peer's replication port")]
    BadMagic {
        /// The four bytes found.
        found: u32,
    },
    /// The header was corrupted.
    #[error("replication frame header CRC mismatch (header says {expected:#010x}, computed {computed:#010x}): the link corrupted data; the connection is reset and the data resent")]
    HeaderCrc {
        /// The CRC in the header.
        expected: u32,
        /// The CRC of the bytes received.
        computed: u32,
    },
    /// The frame layout version is not one this build reads.
    #[error("replication frame version {found} is not supported (this build reads version {FRAME_VERSION}): run the same twinvol version on both nodes")]
    UnsupportedVersion {
        /// The version in the header.
        found: u8,
    },
    /// Reserved header flags were set.
    #[error("replication frame sets reserved flags {flags:#06x}: run the same twinvol version on both nodes")]
    ReservedFlags {
        /// The unknown flag bits.
        flags: u16,
    },
    /// The type code is not one this build knows.
    #[error("replication frame has unknown type {code:#04x}: run the same twinvol version on both nodes")]
    UnknownKind {
        /// The type code.
        code: u8,
    },
    /// A length exceeds the configured maximum (no allocation was made for it).
    #[error("replication frame of {len} bytes exceeds the limit of {max} bytes: the peer sends larger frames than this node accepts; align the frame size limits of both nodes")]
    Oversize {
        /// The announced length.
        len: u64,
        /// The limit.
        max: u32,
    },
    /// The header's lengths contradict each other (e.g. a raw frame whose two lengths differ).
    #[error("replication frame header is inconsistent: {problem}")]
    BadLengths {
        /// What contradicts what.
        problem: String,
    },
    /// The payload does not match its CRC: corrupted in the peer's memory, on the wire or in a
    /// compressor. The data is never written.
    #[error("replication payload CRC mismatch in {kind:?} frame seq {seq} offset {offset} (header says {expected:#010x}, computed {computed:#010x}): corrupted data refused; the connection is reset and the region resent")]
    PayloadCrc {
        /// Message type.
        kind: MessageKind,
        /// The frame's sequence number.
        seq: u64,
        /// The frame's byte offset.
        offset: u64,
        /// The CRC in the header.
        expected: u32,
        /// The CRC of the payload received.
        computed: u32,
    },
    /// The compressed payload could not be decompressed to exactly its announced size.
    #[error("replication payload of {kind:?} frame seq {seq} offset {offset} failed to decompress: {detail}; the connection is reset and the region resent")]
    Decompress {
        /// Message type.
        kind: MessageKind,
        /// The frame's sequence number.
        seq: u64,
        /// The frame's byte offset.
        offset: u64,
        /// The decompressor's account.
        detail: String,
    },
    /// The payload passed its CRC but is not a valid message.
    #[error(transparent)]
    Malformed(#[from] Malformed),
    /// An earlier error broke the stream's framing; the connection must be reset.
    #[error("replication stream already failed: reset the connection")]
    Poisoned,
}

/// Why a message could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// A field is out of its documented range.
    #[error(transparent)]
    Unencodable(#[from] Unencodable),
    /// The payload exceeds the frame limit; split the write.
    #[error("{kind:?} payload of {len} bytes exceeds the frame limit of {max} bytes: split it")]
    TooLarge {
        /// Message type.
        kind: MessageKind,
        /// Payload length.
        len: usize,
        /// The limit.
        max: u32,
    },
}

/// A codec setting twinvol cannot use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecConfigError {
    /// zstd does not offer this level.
    #[error("zstd level {level} is out of range {min}..={max}: set replication.compression_level to 0 (off) or 1..=19 (1 is fast, higher compresses more)")]
    Level {
        /// The level asked for.
        level: i32,
        /// zstd's lowest level.
        min: i32,
        /// zstd's highest level.
        max: i32,
    },
    /// The compressor could not be created.
    #[error("cannot create zstd compression context: {0}")]
    Zstd(String),
    /// The frame limit is below what a control message needs.
    #[error("max payload {0} is too small: use at least 65536 bytes")]
    MaxPayload(u32),
}

/// What one encoded frame cost on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameStats {
    /// Payload bytes before compression.
    pub raw_len: u32,
    /// Payload bytes on the wire.
    pub wire_len: u32,
    /// Whether the payload went compressed.
    pub compressed: bool,
}

impl FrameStats {
    /// Total bytes on the wire, header included.
    pub fn frame_len(&self) -> usize {
        HEADER_LEN + self.wire_len as usize
    }
}

/// Encoded frames waiting to be written, for vectored writes: small frames are packed into one
/// buffer, bulk data that goes raw is kept by reference, so a write's bytes are not copied on
/// their way to the socket.
///
/// Invariant: the byte stream to send is `done` (in order) followed by `open`; `done_len` is
/// the total length of `done`, and no segment in `done` is empty.
#[derive(Debug, Default)]
pub struct FrameQueue {
    done: VecDeque<Bytes>,
    done_len: usize,
    open: BytesMut,
}

impl FrameQueue {
    /// An empty queue.
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes queued.
    pub fn len(&self) -> usize {
        self.done_len + self.open.len()
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends a segment by reference after everything queued.
    fn push_segment(&mut self, b: Bytes) {
        if !self.open.is_empty() {
            let head = self.open.split().freeze();
            self.done_len += head.len();
            self.done.push_back(head);
        }
        if !b.is_empty() {
            self.done_len += b.len();
            self.done.push_back(b);
        }
    }

    /// Fills `dst` with the first queued segments in order; returns how many were filled.
    pub fn io_slices<'a>(&'a self, dst: &mut [IoSlice<'a>]) -> usize {
        let segs = self
            .done
            .iter()
            .map(|b| &b[..])
            .chain((!self.open.is_empty()).then_some(&self.open[..]));
        let mut n = 0;
        for (slot, seg) in dst.iter_mut().zip(segs) {
            *slot = IoSlice::new(seg);
            n += 1;
        }
        n
    }

    /// Drops the first `n` bytes (they were written). `n` is at most [`FrameQueue::len`].
    pub fn advance(&mut self, mut n: usize) {
        while n > 0 {
            let Some(front) = self.done.front_mut() else {
                let k = n.min(self.open.len());
                self.open.advance(k);
                return;
            };
            if n < front.len() {
                front.advance(n);
                self.done_len -= n;
                return;
            }
            n -= front.len();
            self.done_len -= front.len();
            self.done.pop_front();
        }
    }

    /// Drops everything queued.
    pub fn clear(&mut self) {
        self.done.clear();
        self.done_len = 0;
        self.open.clear();
    }

    /// Everything queued as one contiguous buffer (copies only when segments exist).
    pub fn into_contiguous(mut self) -> BytesMut {
        if self.done.is_empty() {
            return self.open;
        }
        let mut out = BytesMut::with_capacity(self.len());
        for b in self.done.drain(..) {
            out.extend_from_slice(&b);
        }
        out.extend_from_slice(&self.open);
        out
    }
}

/// Turns messages into frames.
pub struct FrameEncoder {
    max_payload: u32,
    compressor: Option<zstd::bulk::Compressor<'static>>,
    scratch: Vec<u8>,
    gate: CompressGate,
}

impl std::fmt::Debug for FrameEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameEncoder")
            .field("max_payload", &self.max_payload)
            .field("compress", &self.compressor.is_some())
            .finish()
    }
}

/// Whether a [`PROBE_LEN`] sample from the middle of `src` (`src.len() >= PROBE_LEN`)
/// compresses below 7/8 of its size.
fn probe_compresses(
    c: &mut zstd::bulk::Compressor<'static>,
    scratch: &mut Vec<u8>,
    src: &[u8],
) -> bool {
    let at = (src.len() / 2).min(src.len().saturating_sub(PROBE_LEN));
    let sample = &src[at..(at + PROBE_LEN).min(src.len())];
    let goal = sample.len() * 7 / 8;
    scratch.clear();
    scratch.reserve_exact(goal);
    matches!(c.compress_to_buffer(sample, scratch), Ok(n) if n < goal)
}

/// [`probe_compresses`] for a payload of `raw_len` bytes that `gate` admitted: a sample that
/// does not compress is recorded as an attempt whose outcome went raw, so incompressible
/// streams close the gate like failed compressions do.
fn probe_judged(
    gate: &mut CompressGate,
    c: &mut zstd::bulk::Compressor<'static>,
    scratch: &mut Vec<u8>,
    src: &[u8],
    raw_len: usize,
) -> bool {
    let promising = probe_compresses(c, scratch, src);
    if !promising {
        gate.record(raw_len, raw_len);
    }
    promising
}

/// Whether a payload of `raw_len` bytes gets a compression attempt: it is at least
/// [`MIN_COMPRESS_LEN`] long, `gate` admits it (consulted once, as `admit` counts refused bytes
/// against the skip), and from [`PROBE_FROM_LEN`] on a probe of `probe_src` passes.
fn attempt_judged(
    gate: &mut CompressGate,
    c: &mut zstd::bulk::Compressor<'static>,
    scratch: &mut Vec<u8>,
    probe_src: &[u8],
    raw_len: usize,
) -> bool {
    raw_len >= MIN_COMPRESS_LEN
        && gate.admit(raw_len)
        && (raw_len < PROBE_FROM_LEN || probe_judged(gate, c, scratch, probe_src, raw_len))
}

fn check_max_payload(max: u32) -> Result<(), CodecConfigError> {
    if max < 65536 {
        return Err(CodecConfigError::MaxPayload(max));
    }
    Ok(())
}

impl FrameEncoder {
    /// An encoder compressing at zstd `level` (0 = no compression) and refusing payloads
    /// above `max_payload` bytes.
    pub fn new(level: i32, max_payload: u32) -> Result<Self, CodecConfigError> {
        check_max_payload(max_payload)?;
        let compressor = if level == 0 {
            None
        } else {
            let range = zstd::compression_level_range();
            if !range.contains(&level) {
                return Err(CodecConfigError::Level {
                    level,
                    min: *range.start(),
                    max: *range.end(),
                });
            }
            Some(
                zstd::bulk::Compressor::new(level)
                    .map_err(|e| CodecConfigError::Zstd(e.to_string()))?,
            )
        };
        Ok(Self {
            max_payload,
            compressor,
            scratch: Vec::new(),
            gate: CompressGate::default(),
        })
    }

    /// Replaces the compression gate (tests use small windows).
    pub fn set_gate(&mut self, gate: CompressGate) {
        self.gate = gate;
    }

    /// Appends one frame carrying `msg` to `out`. On error `out` is left as it was.
    pub fn encode(&mut self, msg: &Message, out: &mut BytesMut) -> Result<FrameStats, EncodeError> {
        let mut q = FrameQueue {
            open: std::mem::take(out),
            ..FrameQueue::default()
        };
        let r = self.encode_into(msg, &mut q);
        *out = q.into_contiguous();
        r
    }

    /// Queues one frame carrying `msg`: the same bytes [`FrameEncoder::encode`] produces, with
    /// bulk data of at least [`SEND_REF_MIN`] bytes that goes raw without a compression attempt
    /// queued by reference (not copied).
    /// On error the queue is left as it was.
    pub fn encode_into(
        &mut self,
        msg: &Message,
        q: &mut FrameQueue,
    ) -> Result<FrameStats, EncodeError> {
        let out = &mut q.open;
        let start = out.len();
        out.put_bytes(0, HEADER_LEN);
        let mut bulk = match msg.encode_payload_split(out) {
            Ok(b) => b,
            Err(e) => {
                out.truncate(start);
                return Err(e.into());
            }
        };
        let lead = out.len() - start - HEADER_LEN;
        let raw_len = lead + bulk.as_ref().map_or(0, Bytes::len);
        if raw_len > self.max_payload as usize {
            out.truncate(start);
            return Err(EncodeError::TooLarge {
                kind: msg.kind(),
                len: raw_len,
                max: self.max_payload,
            });
        }
        let mut crc = crc32fast::Hasher::new();
        crc.update(&out[start + HEADER_LEN..]);
        if let Some(b) = &bulk {
            crc.update(b);
        }
        let payload_crc = crc.finalize();
        // Bulk data is copied in when the whole payload is to be compressed, or when it is
        // short; otherwise it stays by reference and goes raw. Every payload is judged once.
        let mut attempt = None;
        if let Some(b) = bulk.take() {
            if b.len() >= SEND_REF_MIN {
                let go = self.compressor.as_mut().is_some_and(|c| {
                    attempt_judged(&mut self.gate, c, &mut self.scratch, &b, raw_len)
                });
                attempt = Some(go);
                if go {
                    out.extend_from_slice(&b);
                } else {
                    bulk = Some(b);
                }
            } else {
                out.extend_from_slice(&b);
            }
        }
        let mut flags = 0;
        if let (Some(c), None) = (self.compressor.as_mut(), &bulk) {
            // Bulk data judged above is compressed as decided there; other payloads are
            // judged here.
            let go = attempt.unwrap_or_else(|| {
                let src = &out[start + HEADER_LEN..];
                attempt_judged(&mut self.gate, c, &mut self.scratch, src, raw_len)
            });
            if go {
                self.scratch.clear();
                // Room for one byte less than the raw payload: if zstd cannot fit, it fails
                // with "destination too small" and the frame goes raw.
                self.scratch.reserve_exact(raw_len - 1);
                let src = &out[start + HEADER_LEN..];
                let mut sent = raw_len;
                if let Ok(n) = c.compress_to_buffer(src, &mut self.scratch) {
                    if n < raw_len {
                        out.truncate(start + HEADER_LEN);
                        out.extend_from_slice(&self.scratch[..n]);
                        flags |= FLAG_ZSTD;
                        sent = n;
                    }
                }
                self.gate.record(raw_len, sent);
            }
        }
        let wire_len = match &bulk {
            Some(_) => raw_len,
            None => out.len() - start - HEADER_LEN,
        };
        let (seq, offset) = msg.header_fields();
        let header = FrameHeader {
            kind: msg.kind(),
            flags,
            seq,
            offset,
            raw_len: raw_len as u32,
            wire_len: wire_len as u32,
            payload_crc,
        };
        write_header(&header, &mut out[start..start + HEADER_LEN]);
        if let Some(b) = bulk {
            q.push_segment(b);
        }
        Ok(FrameStats {
            raw_len: raw_len as u32,
            wire_len: wire_len as u32,
            compressed: flags & FLAG_ZSTD != 0,
        })
    }

    /// One frame carrying `msg` as a fresh vector.
    pub fn encode_to_vec(&mut self, msg: &Message) -> Result<Vec<u8>, EncodeError> {
        let mut out = BytesMut::new();
        self.encode(msg, &mut out)?;
        Ok(out.to_vec())
    }
}

/// Writes `h` into the 40 bytes of `dst`, header CRC included.
fn write_header(h: &FrameHeader, dst: &mut [u8]) {
    let mut b = &mut dst[..];
    b.put_u32(MAGIC);
    b.put_u8(FRAME_VERSION);
    b.put_u8(h.kind as u8);
    b.put_u16(h.flags);
    b.put_u64(h.seq);
    b.put_u64(h.offset);
    b.put_u32(h.raw_len);
    b.put_u32(h.wire_len);
    b.put_u32(h.payload_crc);
    let crc = crc32fast::hash(&dst[..HEADER_LEN - 4]);
    dst[HEADER_LEN - 4..HEADER_LEN].copy_from_slice(&crc.to_be_bytes());
}

/// Parses and checks the header at the start of `raw` (at least [`HEADER_LEN`] bytes).
///
/// Order of checks: magic, header CRC, then fields, so that any corruption of a field is
/// reported as a CRC error rather than as a plausible wrong value.
pub fn parse_header(raw: &[u8], max_payload: u32) -> Result<FrameHeader, WireError> {
    let Some(raw) = raw.get(..HEADER_LEN) else {
        return Err(WireError::BadLengths {
            problem: format!(
                "{} bytes are too few for a {HEADER_LEN}-byte header",
                raw.len()
            ),
        });
    };
    let mut b = raw;
    let magic = b.get_u32();
    if magic != MAGIC {
        return Err(WireError::BadMagic { found: magic });
    }
    let computed = crc32fast::hash(&raw[..HEADER_LEN - 4]);
    let expected = u32::from_be_bytes([raw[36], raw[37], raw[38], raw[39]]);
    if computed != expected {
        return Err(WireError::HeaderCrc { expected, computed });
    }
    let version = b.get_u8();
    if version != FRAME_VERSION {
        return Err(WireError::UnsupportedVersion { found: version });
    }
    let code = b.get_u8();
    let flags = b.get_u16();
    if flags & !FLAG_ZSTD != 0 {
        return Err(WireError::ReservedFlags {
            flags: flags & !FLAG_ZSTD,
        });
    }
    let kind = MessageKind::from_code(code).ok_or(WireError::UnknownKind { code })?;
    let seq = b.get_u64();
    let offset = b.get_u64();
    let raw_len = b.get_u32();
    let wire_len = b.get_u32();
    let payload_crc = b.get_u32();
    for len in [raw_len, wire_len] {
        if len > max_payload {
            return Err(WireError::Oversize {
                len: len.into(),
                max: max_payload,
            });
        }
    }
    if flags & FLAG_ZSTD == 0 && wire_len != raw_len {
        return Err(WireError::BadLengths {
            problem: format!(
                "uncompressed frame with wire length {wire_len} != payload length {raw_len}"
            ),
        });
    }
    if flags & FLAG_ZSTD != 0 && wire_len >= raw_len {
        return Err(WireError::BadLengths {
            problem: format!(
                "compressed frame of {wire_len} bytes is not smaller than its payload of {raw_len}"
            ),
        });
    }
    Ok(FrameHeader {
        kind,
        flags,
        seq,
        offset,
        raw_len,
        wire_len,
        payload_crc,
    })
}

/// A pending frame's payload that the receiver may read into its own buffer
/// ([`FrameDecoder::bulk_pending`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BulkPlan {
    /// Payload bytes on the wire.
    pub wire_len: usize,
    /// Payload bytes before the bulk data (place the buffer so that this offset is aligned).
    pub lead: usize,
}

/// The lead of a frame whose payload is worth receiving into a buffer of its own: raw, of a
/// bulk kind, with at least [`BULK_MIN`] bytes after the lead.
fn bulk_lead(h: &FrameHeader) -> Option<usize> {
    let lead = h.kind.bulk_lead()?;
    (h.flags & FLAG_ZSTD == 0 && h.wire_len as usize >= lead + BULK_MIN).then_some(lead)
}

/// Streaming decoder: push received bytes in, pop whole messages out.
///
/// Invariant: a message is returned only after its header CRC and its payload CRC (over the
/// decompressed bytes) both matched and the payload decoded strictly.
pub struct FrameDecoder {
    buf: BytesMut,
    max_payload: u32,
    pending: Option<FrameHeader>,
    decompressor: Option<zstd::bulk::Decompressor<'static>>,
    failed: bool,
}

impl std::fmt::Debug for FrameDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameDecoder")
            .field("buffered", &self.buf.len())
            .field("max_payload", &self.max_payload)
            .field("pending", &self.pending)
            .field("failed", &self.failed)
            .finish()
    }
}

impl FrameDecoder {
    /// A decoder refusing payloads (compressed or not) above `max_payload` bytes.
    pub fn new(max_payload: u32) -> Result<Self, CodecConfigError> {
        check_max_payload(max_payload)?;
        Ok(Self {
            buf: BytesMut::new(),
            max_payload,
            pending: None,
            decompressor: None,
            failed: false,
        })
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The receive buffer, for reading from a socket into it without a copy
    /// (`AsyncReadExt::read_buf`). Only append to it.
    pub fn buffer_mut(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    /// Bytes received but not yet returned as messages.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Whether the decoder sits exactly between frames (no partial frame buffered).
    pub fn is_idle(&self) -> bool {
        self.buf.is_empty() && self.pending.is_none()
    }

    /// The next complete message, `Ok(None)` if more bytes are needed, or the first error
    /// (after which every call returns [`WireError::Poisoned`]).
    pub fn pop(&mut self) -> Result<Option<Message>, WireError> {
        self.poisoning(Self::pop_inner)
    }

    /// Runs `step` unless an earlier error poisoned the decoder; an error poisons it.
    fn poisoning<T>(
        &mut self,
        step: impl FnOnce(&mut Self) -> Result<T, WireError>,
    ) -> Result<T, WireError> {
        if self.failed {
            return Err(WireError::Poisoned);
        }
        let r = step(self);
        if r.is_err() {
            self.failed = true;
        }
        r
    }

    fn pop_inner(&mut self) -> Result<Option<Message>, WireError> {
        let header = match self.pending {
            Some(h) => h,
            None => {
                if self.buf.len() < HEADER_LEN {
                    return Ok(None);
                }
                let h = parse_header(&self.buf[..HEADER_LEN], self.max_payload)?;
                self.buf.advance(HEADER_LEN);
                if bulk_lead(&h).is_none() {
                    // Bounded by max_payload, checked above. (Bulk payloads are usually read
                    // into a buffer of their own, see `bulk_pending`.)
                    self.buf.reserve(h.wire_len as usize);
                }
                self.pending = Some(h);
                h
            }
        };
        if self.buf.len() < header.wire_len as usize {
            return Ok(None);
        }
        self.pending = None;
        let wire = self.buf.split_to(header.wire_len as usize).freeze();
        self.finish(header, wire).map(Some)
    }

    /// Where the receiver may put the rest of the pending frame's payload itself: `Some` when
    /// a raw Data or ResyncData frame with at least [`BULK_MIN`] bytes of bulk data has its
    /// header parsed and its payload not yet fully buffered. The caller then allocates
    /// [`BulkPlan::wire_len`] bytes placed so that byte [`BulkPlan::lead`] of the payload is
    /// aligned, moves what is buffered there ([`FrameDecoder::take_buffered`]), reads the rest
    /// from the stream, and hands the payload to [`FrameDecoder::finish_bulk`].
    pub fn bulk_pending(&self) -> Option<BulkPlan> {
        if self.failed {
            return None;
        }
        let h = self.pending?;
        let lead = bulk_lead(&h)?;
        (self.buf.len() < h.wire_len as usize).then_some(BulkPlan {
            wire_len: h.wire_len as usize,
            lead,
        })
    }

    /// Moves up to `dst.len()` buffered payload bytes of the pending frame to the start of
    /// `dst`; returns how many. Only between [`FrameDecoder::bulk_pending`] and
    /// [`FrameDecoder::finish_bulk`].
    pub fn take_buffered(&mut self, dst: &mut [u8]) -> usize {
        let n = dst.len().min(self.buf.len());
        dst[..n].copy_from_slice(&self.buf[..n]);
        self.buf.advance(n);
        n
    }

    /// Completes the pending frame with its whole wire payload, received by the caller:
    /// checked exactly like a frame received through [`FrameDecoder::push`].
    pub fn finish_bulk(&mut self, wire: Bytes) -> Result<Message, WireError> {
        self.poisoning(|d| match d.pending.take() {
            Some(h) if h.wire_len as usize == wire.len() => d.finish(h, wire),
            Some(h) => Err(WireError::BadLengths {
                problem: format!(
                    "bulk payload of {} bytes for a frame of {}",
                    wire.len(),
                    h.wire_len
                ),
            }),
            None => Err(WireError::BadLengths {
                problem: "bulk payload without a pending frame".into(),
            }),
        })
    }

    /// CRC check (after decompression) and decoding of one frame's wire payload.
    fn finish(&mut self, header: FrameHeader, wire: Bytes) -> Result<Message, WireError> {
        let payload = if header.flags & FLAG_ZSTD != 0 {
            self.decompress(&header, &wire)?
        } else {
            wire
        };
        let computed = crc32fast::hash(&payload);
        if computed != header.payload_crc {
            return Err(WireError::PayloadCrc {
                kind: header.kind,
                seq: header.seq,
                offset: header.offset,
                expected: header.payload_crc,
                computed,
            });
        }
        Ok(Message::decode_payload(
            header.kind,
            header.seq,
            header.offset,
            payload,
        )?)
    }

    fn decompress(&mut self, h: &FrameHeader, wire: &[u8]) -> Result<Bytes, WireError> {
        let err = |detail: String| WireError::Decompress {
            kind: h.kind,
            seq: h.seq,
            offset: h.offset,
            detail,
        };
        if self.decompressor.is_none() {
            self.decompressor =
                Some(zstd::bulk::Decompressor::new().map_err(|e| err(e.to_string()))?);
        }
        let Some(d) = self.decompressor.as_mut() else {
            return Err(err("no decompression context".into()));
        };
        // Capacity is the announced size (bounded by max_payload): zstd cannot write past it.
        let mut out = Vec::with_capacity(h.raw_len as usize);
        let n = d
            .decompress_to_buffer(wire, &mut out)
            .map_err(|e| err(e.to_string()))?;
        if n != h.raw_len as usize {
            return Err(err(format!(
                "produced {n} bytes, header announced {}",
                h.raw_len
            )));
        }
        Ok(Bytes::from(out))
    }
}
