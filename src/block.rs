//! The contract between an exporter (the NBD server, later the kernel attach) and what it exports.
//!
//! A [`BlockTarget`] is a byte-addressed device of fixed size. The NBD server only ever talks to
//! this trait, so a plain local file ([`crate::engine::Engine`]) and a mirrored volume can be
//! exported by the same code. Futures are not `Send`: the data path of a volume runs on one
//! thread (a tokio-uring ring or a current-thread runtime), see docs/ARCHITECTURE.md.

use crate::engine::buf::AlignedBuf;

/// What a target can do and how it wants to be addressed; fixed for the life of an export.
///
/// Invariant: `min_block <= preferred_block <= max_block`, all powers of two except `max_block`
/// which is a multiple of `preferred_block`; `size` is a multiple of `min_block`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetInfo {
    /// Exported size in bytes.
    pub size: u64,
    /// Smallest request granularity the target handles efficiently (512 or 4096).
    pub min_block: u32,
    /// Request granularity the target prefers.
    pub preferred_block: u32,
    /// Largest READ/WRITE payload accepted.
    pub max_block: u32,
    /// Writes are refused with EPERM.
    pub read_only: bool,
    /// The backing store is a spinning disk (from the block device's queue attributes).
    pub rotational: bool,
    /// FLUSH makes completed writes durable.
    pub can_flush: bool,
    /// Writes with FUA are durable when acknowledged.
    pub can_fua: bool,
    /// TRIM frees space (punch hole / BLKDISCARD).
    pub can_trim: bool,
    /// WRITE_ZEROES is efficient (no data transfer).
    pub can_zero: bool,
    /// WRITE_ZEROES with FAST_ZERO either zeroes quickly or fails at once with ENOTSUP.
    pub can_fast_zero: bool,
    /// CACHE (read-ahead hint) is understood.
    pub can_cache: bool,
    /// A FLUSH on one connection covers writes completed on every other connection, and
    /// all connections see the same data: the target is one shared object in one process.
    pub can_multi_conn: bool,
    /// Human-readable description for NBD_INFO_DESCRIPTION.
    pub description: String,
}

/// One run of a `base:allocation` map: `length` bytes that are all data, or all hole/zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes; never zero.
    pub length: u64,
    /// The run reads as zeroes and occupies no space (NBD_STATE_HOLE).
    pub hole: bool,
    /// The run reads as zeroes (NBD_STATE_ZERO).
    pub zero: bool,
}

/// Flags of a WRITE_ZEROES request, as the target needs them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    /// The client forbids deallocation (NBD_CMD_FLAG_NO_HOLE): zeroes must be allocated.
    pub no_hole: bool,
    /// Fail with ENOTSUP rather than fall back to writing zero buffers (NBD_CMD_FLAG_FAST_ZERO).
    pub fast: bool,
    /// Durable when acknowledged (NBD_CMD_FLAG_FUA).
    pub fua: bool,
}

/// An I/O failure as an exporter must report it: the errno that goes on the wire, and words for the log.
#[derive(Debug, thiserror::Error)]
#[error("{context}: {source}")]
pub struct BlockError {
    /// What was being done, e.g. "write 4096 bytes at offset 8192 of /dev/xvdf".
    pub context: String,
    /// The underlying operating-system error; its errno decides the NBD error code.
    #[source]
    pub source: std::io::Error,
}

impl BlockError {
    /// Wraps an I/O error with what was being done.
    pub fn new(context: impl Into<String>, source: std::io::Error) -> Self {
        Self {
            context: context.into(),
            source,
        }
    }

    /// An error with a specific errno (EINVAL, ENOTSUP, ...).
    pub fn errno(context: impl Into<String>, errno: i32) -> Self {
        Self::new(context, std::io::Error::from_raw_os_error(errno))
    }

    /// The raw errno, EIO when the error carries none.
    pub fn raw_errno(&self) -> i32 {
        self.source.raw_os_error().unwrap_or(libc::EIO)
    }
}

/// Result of target operations.
pub type BlockResult<T> = Result<T, BlockError>;

/// [`BlockTarget::write_bytes`] through a copy into one of the target's own buffers (for
/// targets, or requests, that cannot be written from shared memory as it is).
pub async fn write_copied<T: BlockTarget + ?Sized>(
    t: &T,
    offset: u64,
    data: &[u8],
    fua: bool,
) -> BlockResult<()> {
    let mut buf = t.alloc_buf_for_overwrite(data.len());
    buf.copy_from_slice(data);
    t.write(offset, buf, fua).await.0
}

/// A block device as the NBD server sees it. Every range passed in is already checked by the
/// caller to lie within `info().size`; implementations may rely on that.
///
/// Durability contract: after `write(.., fua=true)` or `flush()` returns `Ok`, the data survives a
/// power loss of this node (and, for a mirrored volume in sync mode, is on the peer's disk too).
#[allow(async_fn_in_trait)]
pub trait BlockTarget {
    /// Capabilities and geometry; constant for the life of the target.
    fn info(&self) -> &TargetInfo;

    /// A zeroed buffer of `len` bytes aligned for this target's direct I/O.
    fn alloc_buf(&self, len: usize) -> AlignedBuf;

    /// A buffer like [`BlockTarget::alloc_buf`] whose contents are unspecified, for data that is
    /// overwritten entirely (read targets, request payloads); may reuse freed buffers.
    fn alloc_buf_for_overwrite(&self, len: usize) -> AlignedBuf {
        self.alloc_buf(len)
    }

    /// Reads `buf.len()` bytes at `offset` into `buf` (which is returned either way).
    async fn read(&self, offset: u64, buf: AlignedBuf) -> (BlockResult<()>, AlignedBuf);

    /// Writes all of `buf` at `offset`; with `fua`, durable before returning.
    async fn write(&self, offset: u64, buf: AlignedBuf, fua: bool)
        -> (BlockResult<()>, AlignedBuf);

    /// Writes all of `data` at `offset` like [`BlockTarget::write`], from a shared buffer that
    /// other holders (a replication frame) may read at the same time. Targets that can write
    /// straight from it (an aligned buffer for direct I/O) avoid the copy this default makes.
    async fn write_bytes(&self, offset: u64, data: bytes::Bytes, fua: bool) -> BlockResult<()> {
        write_copied(self, offset, &data, fua).await
    }

    /// Makes every completed write durable.
    async fn flush(&self) -> BlockResult<()>;

    /// Discards a range (contents afterwards unspecified, usually zero).
    async fn trim(&self, offset: u64, len: u64, fua: bool) -> BlockResult<()>;

    /// Makes a range read as zeroes.
    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> BlockResult<()>;

    /// Hints that a range will be read soon.
    async fn cache(&self, offset: u64, len: u64) -> BlockResult<()>;

    /// Allocation map of `[offset, offset+len)`: at least one extent, lengths summing to at most
    /// `len` (the caller may ask again for the remainder).
    async fn block_status(&self, offset: u64, len: u64) -> BlockResult<Vec<Extent>>;
}

pub mod mem {
    //! [`MemTarget`]: a RAM disk implementing [`BlockTarget`], for tests, fuzzing and benchmarks
    //! of the layers above the engine.

    use std::cell::RefCell;

    use super::{BlockResult, BlockTarget, Extent, TargetInfo, ZeroFlags};
    use crate::engine::buf::AlignedBuf;

    /// A byte vector behind the block-target contract. Never fails; counts flushes.
    ///
    /// Invariant: `data.len() == info.size`.
    pub struct MemTarget {
        info: TargetInfo,
        data: RefCell<Vec<u8>>,
        flushes: std::cell::Cell<u64>,
    }

    impl MemTarget {
        /// A zeroed RAM disk of `size` bytes with every capability on.
        pub fn new(size: u64) -> Self {
            let info = TargetInfo {
                size,
                min_block: 1,
                preferred_block: 4096,
                max_block: 32 * 1024 * 1024,
                read_only: false,
                rotational: false,
                can_flush: true,
                can_fua: true,
                can_trim: true,
                can_zero: true,
                can_fast_zero: true,
                can_cache: true,
                can_multi_conn: true,
                description: "in-memory test disk".into(),
            };
            Self {
                info,
                data: RefCell::new(vec![0; size as usize]),
                flushes: Default::default(),
            }
        }

        /// A copy of the bytes in `[offset, offset+len)`.
        pub fn snapshot(&self, offset: u64, len: usize) -> Vec<u8> {
            self.data.borrow()[offset as usize..offset as usize + len].to_vec()
        }

        /// Number of flushes served.
        pub fn flushes(&self) -> u64 {
            self.flushes.get()
        }

        fn fill(&self, offset: u64, len: u64, byte: u8) {
            self.data.borrow_mut()[offset as usize..(offset + len) as usize].fill(byte);
        }
    }

    impl BlockTarget for MemTarget {
        fn info(&self) -> &TargetInfo {
            &self.info
        }
        fn alloc_buf(&self, len: usize) -> AlignedBuf {
            AlignedBuf::new(len, 512)
        }
        async fn read(&self, offset: u64, mut buf: AlignedBuf) -> (BlockResult<()>, AlignedBuf) {
            let n = buf.len();
            buf.copy_from_slice(&self.data.borrow()[offset as usize..offset as usize + n]);
            (Ok(()), buf)
        }
        async fn write(
            &self,
            offset: u64,
            buf: AlignedBuf,
            _fua: bool,
        ) -> (BlockResult<()>, AlignedBuf) {
            self.data.borrow_mut()[offset as usize..offset as usize + buf.len()]
                .copy_from_slice(&buf);
            (Ok(()), buf)
        }
        async fn flush(&self) -> BlockResult<()> {
            self.flushes.set(self.flushes.get() + 1);
            Ok(())
        }
        async fn trim(&self, offset: u64, len: u64, _fua: bool) -> BlockResult<()> {
            self.fill(offset, len, 0);
            Ok(())
        }
        async fn write_zeroes(&self, offset: u64, len: u64, _flags: ZeroFlags) -> BlockResult<()> {
            self.fill(offset, len, 0);
            Ok(())
        }
        async fn cache(&self, _offset: u64, _len: u64) -> BlockResult<()> {
            Ok(())
        }
        async fn block_status(&self, offset: u64, len: u64) -> BlockResult<Vec<Extent>> {
            // Runs of all-zero 4 KiB blocks are reported as zero (not holes: RAM is allocated).
            let data = self.data.borrow();
            let mut out: Vec<Extent> = Vec::new();
            let mut pos = offset;
            while pos < offset + len {
                let end = ((pos / 4096 + 1) * 4096).min(offset + len);
                let zero = data[pos as usize..end as usize].iter().all(|&b| b == 0);
                match out.last_mut() {
                    Some(e) if e.zero == zero => e.length += end - pos,
                    _ => out.push(Extent {
                        length: end - pos,
                        hole: false,
                        zero,
                    }),
                }
                pos = end;
            }
            Ok(out)
        }
    }
}
