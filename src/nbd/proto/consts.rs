//! Numbers from the NBD protocol specification (doc/proto.md). Everything on the wire is big-endian.

/// "NBDMAGIC": first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": newstyle marker after NBDMAGIC, and the prefix of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Prefix of every option reply.
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Prefix of every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Prefix of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Prefix of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags (server, 16 bits).
pub mod hs {
    /// The server speaks fixed newstyle.
    pub const FIXED_NEWSTYLE: u16 = 1 << 0;
    /// The server omits the 124 zero bytes after EXPORT_NAME when the client agrees.
    pub const NO_ZEROES: u16 = 1 << 1;
}

/// Client flags (32 bits).
pub mod cf {
    /// The client speaks fixed newstyle.
    pub const FIXED_NEWSTYLE: u32 = 1 << 0;
    /// The client wants no zero padding after EXPORT_NAME.
    pub const NO_ZEROES: u32 = 1 << 1;
}

/// Option numbers.
pub mod opt {
    /// Select an export and enter transmission (no error path).
    pub const EXPORT_NAME: u32 = 1;
    /// End negotiation.
    pub const ABORT: u32 = 2;
    /// List exports.
    pub const LIST: u32 = 3;
    /// Withdrawn.
    pub const PEEK_EXPORT: u32 = 4;
    /// Upgrade to TLS.
    pub const STARTTLS: u32 = 5;
    /// Describe an export.
    pub const INFO: u32 = 6;
    /// Describe an export and enter transmission.
    pub const GO: u32 = 7;
    /// Use structured replies.
    pub const STRUCTURED_REPLY: u32 = 8;
    /// List metadata contexts.
    pub const LIST_META_CONTEXT: u32 = 9;
    /// Select metadata contexts.
    pub const SET_META_CONTEXT: u32 = 10;
    /// 64-bit headers (not supported by twinvol).
    pub const EXTENDED_HEADERS: u32 = 11;
}

/// Option reply types.
pub mod rep {
    /// Success, end of this option's replies.
    pub const ACK: u32 = 1;
    /// One export of LIST.
    pub const SERVER: u32 = 2;
    /// One info block of INFO/GO.
    pub const INFO: u32 = 3;
    /// One metadata context.
    pub const META_CONTEXT: u32 = 4;
    /// Bit set on every error reply.
    pub const ERR_BIT: u32 = 1 << 31;
    /// Unknown option.
    pub const ERR_UNSUP: u32 = ERR_BIT | 1;
    /// Forbidden by policy.
    pub const ERR_POLICY: u32 = ERR_BIT | 2;
    /// Malformed option.
    pub const ERR_INVALID: u32 = ERR_BIT | 3;
    /// Not supported on this platform.
    pub const ERR_PLATFORM: u32 = ERR_BIT | 4;
    /// TLS required.
    pub const ERR_TLS_REQD: u32 = ERR_BIT | 5;
    /// No such export.
    pub const ERR_UNKNOWN: u32 = ERR_BIT | 6;
    /// Server shutting down.
    pub const ERR_SHUTDOWN: u32 = ERR_BIT | 7;
    /// Block size negotiation required.
    pub const ERR_BLOCK_SIZE_REQD: u32 = ERR_BIT | 8;
    /// Option data too large.
    pub const ERR_TOO_BIG: u32 = ERR_BIT | 9;
}

/// Info types in INFO/GO.
pub mod info {
    /// Size and transmission flags.
    pub const EXPORT: u16 = 0;
    /// Canonical export name.
    pub const NAME: u16 = 1;
    /// Human-readable description.
    pub const DESCRIPTION: u16 = 2;
    /// Minimum, preferred, maximum block sizes.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Transmission flags (16 bits, sent with the export size).
pub mod tf {
    /// Always set.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// Writes are refused.
    pub const READ_ONLY: u16 = 1 << 1;
    /// FLUSH supported.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// FUA supported.
    pub const SEND_FUA: u16 = 1 << 3;
    /// Rotational media.
    pub const ROTATIONAL: u16 = 1 << 4;
    /// TRIM supported.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// WRITE_ZEROES supported.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// DF (don't fragment) supported.
    pub const SEND_DF: u16 = 1 << 7;
    /// Several connections see one consistent device.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    /// RESIZE supported (not by twinvol).
    pub const SEND_RESIZE: u16 = 1 << 9;
    /// CACHE supported.
    pub const SEND_CACHE: u16 = 1 << 10;
    /// FAST_ZERO supported.
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
}

/// Command types.
pub mod cmd {
    /// Read.
    pub const READ: u16 = 0;
    /// Write (payload follows).
    pub const WRITE: u16 = 1;
    /// Disconnect.
    pub const DISC: u16 = 2;
    /// Flush.
    pub const FLUSH: u16 = 3;
    /// Trim.
    pub const TRIM: u16 = 4;
    /// Cache (prefetch).
    pub const CACHE: u16 = 5;
    /// Write zeroes.
    pub const WRITE_ZEROES: u16 = 6;
    /// Block status.
    pub const BLOCK_STATUS: u16 = 7;
    /// Resize (not supported).
    pub const RESIZE: u16 = 8;
}

/// Command flags.
pub mod cflag {
    /// Force unit access.
    pub const FUA: u16 = 1 << 0;
    /// Do not punch holes when zeroing.
    pub const NO_HOLE: u16 = 1 << 1;
    /// Do not fragment the read reply.
    pub const DF: u16 = 1 << 2;
    /// Return one extent only.
    pub const REQ_ONE: u16 = 1 << 3;
    /// Fail fast rather than write zeroes slowly.
    pub const FAST_ZERO: u16 = 1 << 4;
    /// Extended headers payload length (not supported).
    pub const PAYLOAD_LEN: u16 = 1 << 5;
}

/// Structured reply chunk types and flags.
pub mod chunk {
    /// Last chunk of this reply.
    pub const FLAG_DONE: u16 = 1 << 0;
    /// Empty chunk (only with DONE).
    pub const NONE: u16 = 0;
    /// Data at an offset.
    pub const OFFSET_DATA: u16 = 1;
    /// A hole at an offset.
    pub const OFFSET_HOLE: u16 = 2;
    /// Block status descriptors.
    pub const BLOCK_STATUS: u16 = 5;
    /// Error.
    pub const ERROR: u16 = (1 << 15) + 1;
    /// Error at an offset.
    pub const ERROR_OFFSET: u16 = (1 << 15) + 2;
}

/// Error values on the wire.
pub mod err {
    /// Operation not permitted.
    pub const EPERM: u32 = 1;
    /// Input/output error.
    pub const EIO: u32 = 5;
    /// Out of memory.
    pub const ENOMEM: u32 = 12;
    /// Invalid argument.
    pub const EINVAL: u32 = 22;
    /// No space left.
    pub const ENOSPC: u32 = 28;
    /// Value too large.
    pub const EOVERFLOW: u32 = 75;
    /// Not supported.
    pub const ENOTSUP: u32 = 95;
    /// Server shutting down.
    pub const ESHUTDOWN: u32 = 108;
}

/// `base:allocation` state bits.
pub mod state {
    /// Unallocated.
    pub const HOLE: u32 = 1 << 0;
    /// Reads as zeroes.
    pub const ZERO: u32 = 1 << 1;
}

/// The only metadata context twinvol offers.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// Context id twinvol assigns to `base:allocation`.
pub const BASE_ALLOCATION_ID: u32 = 1;
/// Longest string (export name, query) the spec allows.
pub const MAX_STRING: usize = 4096;
