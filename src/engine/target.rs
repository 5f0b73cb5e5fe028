//! [`BlockTarget`] for a plain local device: alignment handling (read-modify-write for requests
//! that O_DIRECT cannot take as they are), TRIM / WRITE_ZEROES by fallocate or block ioctls,
//! and `base:allocation` from SEEK_DATA / SEEK_HOLE.

use std::path::Path;

use super::buf::AlignedBuf;
use super::file::{blk_range_ioctl, seek, willneed, DeviceKind, Geometry};
use super::{CacheMode, Engine, EngineKind};
use crate::block::{BlockError, BlockResult, BlockTarget, Extent, TargetInfo, ZeroFlags};

/// Largest READ/WRITE the export accepts (the NBD spec's recommended maximum).
pub const MAX_REQUEST: u32 = 32 * 1024 * 1024;
/// Zero buffers written at most this large at a time when zeroing must write data.
const ZERO_CHUNK: u64 = 1024 * 1024;

pub(super) fn target_info(
    g: &Geometry,
    cache: CacheMode,
    read_only: bool,
    size: u64,
    path: &Path,
    kind: EngineKind,
) -> TargetInfo {
    let file = g.kind == DeviceKind::File;
    TargetInfo {
        size,
        // Buffered I/O takes any byte range; direct I/O wants the device's alignment (smaller
        // requests still work through read-modify-write, only slower).
        min_block: if cache == CacheMode::Writeback {
            1
        } else {
            g.alignment
        },
        preferred_block: 4096,
        max_block: MAX_REQUEST,
        read_only,
        rotational: g.rotational,
        can_flush: true,
        can_fua: true,
        can_trim: true,
        can_zero: true,
        // Regular files zero with fallocate, which is fast or fails at once; a block device's
        // BLKZEROOUT may fall back to writing, so it is not advertised as fast.
        can_fast_zero: file,
        can_cache: true,
        // One process, one file: a flush (fdatasync) covers every connection's completed writes.
        can_multi_conn: true,
        description: format!(
            "twinvol export of {} ({kind} engine, cache={cache})",
            path.display()
        ),
    }
}

impl Engine {
    fn ctx(&self, what: &str, offset: u64, len: u64) -> String {
        format!(
            "{what} {len} bytes at offset {offset} of {}",
            self.files.path.display()
        )
    }

    fn align(&self) -> u64 {
        if self.cache == CacheMode::None {
            u64::from(self.geometry.alignment)
        } else {
            1
        }
    }

    fn is_aligned(&self, offset: u64, len: u64) -> bool {
        let a = self.align();
        offset % a == 0 && len % a == 0
    }

    /// Reads `[offset, offset+len)` when it is not aligned: through a covering aligned bounce buffer.
    async fn read_unaligned(
        &self,
        offset: u64,
        mut buf: AlignedBuf,
    ) -> (BlockResult<()>, AlignedBuf) {
        let a = self.align();
        let len = buf.len() as u64;
        let start = offset / a * a;
        let end = (offset + len).div_ceil(a) * a;
        let bounce = self.alloc_buf_for_overwrite((end - start) as usize);
        let (r, bounce) = self.read_aligned(start, bounce).await;
        if let Err(e) = r {
            return (Err(BlockError::new(self.ctx("read", offset, len), e)), buf);
        }
        let skip = (offset - start) as usize;
        buf.copy_from_slice(&bounce[skip..skip + len as usize]);
        (Ok(()), buf)
    }

    /// Read-modify-write of an unaligned range; holds the RMW lock exclusively so no aligned
    /// write to a shared block can land between its read and its write.
    async fn write_unaligned(
        &self,
        offset: u64,
        buf: AlignedBuf,
        fua: bool,
    ) -> (BlockResult<()>, AlignedBuf) {
        let _exclusive = self.rmw_lock.write().await;
        let a = self.align();
        let len = buf.len() as u64;
        let start = offset / a * a;
        let end = (offset + len).div_ceil(a) * a;
        let bounce = self.alloc_buf_for_overwrite((end - start) as usize);
        let (r, mut bounce) = self.read_aligned(start, bounce).await;
        if let Err(e) = r {
            return (
                Err(BlockError::new(
                    self.ctx("read-modify-write (read)", offset, len),
                    e,
                )),
                buf,
            );
        }
        let skip = (offset - start) as usize;
        bounce[skip..skip + len as usize].copy_from_slice(&buf);
        let (r, _) = self.write_aligned(start, bounce, fua).await;
        (
            r.map_err(|e| BlockError::new(self.ctx("read-modify-write (write)", offset, len), e)),
            buf,
        )
    }

    /// Writes zero buffers over a range (the fallback when no fast zeroing exists).
    async fn write_zero_buffers(&self, offset: u64, len: u64, fua: bool) -> BlockResult<()> {
        let mut done = 0;
        while done < len {
            let n = (len - done).min(ZERO_CHUNK);
            let buf = self.alloc_buf(n as usize);
            let (r, _) = self.write(offset + done, buf, fua).await;
            r?;
            done += n;
        }
        Ok(())
    }

    async fn blk_ioctl(&self, zero: bool, offset: u64, len: u64) -> std::io::Result<()> {
        let f = self.files.main.clone();
        tokio::task::spawn_blocking(move || blk_range_ioctl(&f, zero, offset, len))
            .await
            .map_err(|e| std::io::Error::other(format!("ioctl worker failed: {e}")))?
    }
}

fn unsupported(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL)
    )
}

impl BlockTarget for Engine {
    fn info(&self) -> &TargetInfo {
        &self.info
    }

    fn alloc_buf(&self, len: usize) -> AlignedBuf {
        AlignedBuf::new(len, self.geometry.alignment as usize)
    }

    fn alloc_buf_for_overwrite(&self, len: usize) -> AlignedBuf {
        AlignedBuf::for_overwrite(len, self.geometry.alignment as usize)
    }

    async fn read(&self, offset: u64, buf: AlignedBuf) -> (BlockResult<()>, AlignedBuf) {
        let len = buf.len() as u64;
        if !self.is_aligned(offset, len) || (buf.as_ptr() as usize) % (self.align() as usize) != 0 {
            return self.read_unaligned(offset, buf).await;
        }
        let (r, buf) = self.read_aligned(offset, buf).await;
        (
            r.map_err(|e| BlockError::new(self.ctx("read", offset, len), e)),
            buf,
        )
    }

    async fn write(
        &self,
        offset: u64,
        buf: AlignedBuf,
        fua: bool,
    ) -> (BlockResult<()>, AlignedBuf) {
        let len = buf.len() as u64;
        if self.read_only {
            return (
                Err(BlockError::errno(
                    self.ctx("write", offset, len),
                    libc::EPERM,
                )),
                buf,
            );
        }
        if self.cache == CacheMode::None {
            if !self.is_aligned(offset, len)
                || (buf.as_ptr() as usize) % (self.align() as usize) != 0
            {
                return self.write_unaligned(offset, buf, fua).await;
            }
            let _shared = self.rmw_lock.read().await;
            let (r, buf) = self.write_aligned(offset, buf, fua).await;
            return (
                r.map_err(|e| BlockError::new(self.ctx("write", offset, len), e)),
                buf,
            );
        }
        let (r, buf) = self.write_aligned(offset, buf, fua).await;
        (
            r.map_err(|e| BlockError::new(self.ctx("write", offset, len), e)),
            buf,
        )
    }

    async fn write_bytes(&self, offset: u64, data: bytes::Bytes, fua: bool) -> BlockResult<()> {
        let len = data.len() as u64;
        let direct_ok = self.cache != CacheMode::None
            || (self.is_aligned(offset, len)
                && (data.as_ptr() as usize) % (self.align() as usize) == 0);
        if self.read_only || !direct_ok {
            // Refusal and read-modify-write are the owned-buffer path's business.
            return crate::block::write_copied(self, offset, &data, fua).await;
        }
        // Like `write`: an aligned direct write shares the lock read-modify-writes take alone.
        let _shared = if self.cache == CacheMode::None {
            Some(self.rmw_lock.read().await)
        } else {
            None
        };
        self.write_bytes_aligned(offset, data, fua)
            .await
            .map_err(|e| BlockError::new(self.ctx("write", offset, len), e))
    }

    async fn flush(&self) -> BlockResult<()> {
        self.sync_data()
            .await
            .map_err(|e| BlockError::new(format!("flush of {}", self.files.path.display()), e))
    }

    async fn trim(&self, offset: u64, len: u64, fua: bool) -> BlockResult<()> {
        if self.read_only {
            return Err(BlockError::errno(
                self.ctx("trim", offset, len),
                libc::EPERM,
            ));
        }
        let r = match self.geometry.kind {
            DeviceKind::File => {
                // Only whole aligned blocks are punched; a partial head or tail is left as is
                // (TRIM is advisory: its contents afterwards are unspecified).
                let a = self.align().max(512);
                let start = offset.div_ceil(a) * a;
                let end = (offset + len) / a * a;
                if end <= start {
                    return Ok(());
                }
                let _shared = self.rmw_lock.read().await;
                self.fallocate(
                    start,
                    end - start,
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                )
                .await
            }
            DeviceKind::Block => {
                let a = u64::from(self.geometry.logical_block);
                let start = offset.div_ceil(a) * a;
                let end = (offset + len) / a * a;
                if end <= start {
                    return Ok(());
                }
                self.blk_ioctl(false, start, end - start).await
            }
        };
        match r {
            Ok(()) => {}
            // A device without discard support: TRIM is a hint, so succeed without doing anything.
            Err(e) if unsupported(&e) => return Ok(()),
            Err(e) => return Err(BlockError::new(self.ctx("trim", offset, len), e)),
        }
        if fua {
            self.flush().await?;
        }
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> BlockResult<()> {
        if self.read_only {
            return Err(BlockError::errno(
                self.ctx("write zeroes", offset, len),
                libc::EPERM,
            ));
        }
        let a = self.align();
        if !self.is_aligned(offset, len) {
            if flags.fast {
                return Err(BlockError::errno(
                    self.ctx("fast zero (unaligned)", offset, len),
                    libc::ENOTSUP,
                ));
            }
            // Zero the unaligned head and tail with data writes (RMW), the aligned middle quickly.
            let mid_start = offset.div_ceil(a) * a;
            let mid_end = (offset + len) / a * a;
            if mid_end <= mid_start {
                return self.write_zero_buffers(offset, len, flags.fua).await;
            }
            self.write_zero_buffers(offset, mid_start - offset, flags.fua)
                .await?;
            Box::pin(self.write_zeroes(mid_start, mid_end - mid_start, flags)).await?;
            return self
                .write_zero_buffers(mid_end, offset + len - mid_end, flags.fua)
                .await;
        }
        let r = match self.geometry.kind {
            DeviceKind::File => {
                let mode = if flags.no_hole {
                    libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
                } else {
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
                };
                let _shared = self.rmw_lock.read().await;
                self.fallocate(offset, len, mode).await
            }
            DeviceKind::Block => {
                if flags.fast {
                    return Err(BlockError::errno(
                        self.ctx("fast zero on a block device", offset, len),
                        libc::ENOTSUP,
                    ));
                }
                self.blk_ioctl(true, offset, len).await
            }
        };
        match r {
            Ok(()) => {
                if flags.fua {
                    self.flush().await?;
                }
                Ok(())
            }
            Err(e) if unsupported(&e) => {
                if flags.fast {
                    return Err(BlockError::errno(
                        self.ctx("fast zero", offset, len),
                        libc::ENOTSUP,
                    ));
                }
                self.write_zero_buffers(offset, len, flags.fua).await
            }
            Err(e) => Err(BlockError::new(self.ctx("write zeroes", offset, len), e)),
        }
    }

    async fn cache(&self, offset: u64, len: u64) -> BlockResult<()> {
        if self.cache == CacheMode::Writeback {
            willneed(&self.files.main, offset, len)
                .map_err(|e| BlockError::new(self.ctx("cache", offset, len), e))?;
        }
        // With O_DIRECT there is no page cache to warm: the hint is accepted and has no effect.
        Ok(())
    }

    async fn block_status(&self, offset: u64, len: u64) -> BlockResult<Vec<Extent>> {
        let end = offset + len;
        if self.geometry.kind == DeviceKind::Block {
            return Ok(vec![Extent {
                length: len,
                hole: false,
                zero: false,
            }]);
        }
        let f = &self.files.main;
        let err = |e| BlockError::new(self.ctx("block status", offset, len), e);
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end && out.len() < 1024 {
            let next_data = seek(f, pos, libc::SEEK_DATA)
                .map_err(err)?
                .unwrap_or(end)
                .min(end);
            if next_data > pos {
                out.push(Extent {
                    length: next_data - pos,
                    hole: true,
                    zero: true,
                });
                pos = next_data;
                continue;
            }
            let next_hole = seek(f, pos, libc::SEEK_HOLE)
                .map_err(err)?
                .unwrap_or(end)
                .min(end);
            let next_hole = next_hole.max(pos + 1);
            out.push(Extent {
                length: next_hole - pos,
                hole: false,
                zero: false,
            });
            pos = next_hole;
        }
        Ok(out)
    }
}
