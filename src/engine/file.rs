//! Opening a backing device: flags, geometry (size, logical block size, O_DIRECT alignment,
//! rotational) and the synchronous ioctls/lseeks both backends share.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{CacheMode, EngineError, OpenOptions};

// Linux block ioctls (include/uapi/linux/fs.h). libc does not export all of them on every arch.
/// BLKGETSIZE64 = _IOR(0x12, 114, size_t): device size in bytes.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
/// BLKSSZGET = _IO(0x12, 104): logical sector size.
const BLKSSZGET: libc::c_ulong = 0x1268;
/// BLKDISCARD = _IO(0x12, 119): discard a byte range given as u64[2].
const BLKDISCARD: libc::c_ulong = 0x1277;
/// BLKZEROOUT = _IO(0x12, 127): zero a byte range given as u64[2].
const BLKZEROOUT: libc::c_ulong = 0x127f;

/// What kind of object backs a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    /// A regular (possibly sparse) file.
    File,
    /// A block device (EBS volume, partition, loop device).
    Block,
}

/// Physical facts about a device, read once at open.
///
/// Invariant: `alignment` and `logical_block` are powers of two in 512..=4096.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Geometry {
    /// Device size in bytes.
    pub size: u64,
    /// Logical block size reported by the device (512 for files unless O_DIRECT demands more).
    pub logical_block: u32,
    /// Offset/length/memory alignment required by O_DIRECT on this device.
    pub alignment: u32,
    /// File or block device.
    pub kind: DeviceKind,
    /// A spinning disk (queue/rotational = 1).
    pub rotational: bool,
}

/// The open file descriptors of a device.
///
/// Invariant: `main` and `fua` refer to the same inode; `fua` was opened with O_DSYNC so a
/// completed write on it is durable, and with O_DIRECT iff `cache == CacheMode::None`.
pub(crate) struct Files {
    pub path: PathBuf,
    pub main: Arc<File>,
    pub fua: Arc<File>,
    pub geometry: Geometry,
    pub cache: CacheMode,
}

fn open_with(path: &Path, read_only: bool, extra_flags: i32) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(!read_only)
        .custom_flags(extra_flags | libc::O_CLOEXEC)
        .open(path)
}

impl Files {
    pub fn open(opts: &OpenOptions) -> Result<Self, EngineError> {
        let path = opts.path.clone();
        let open_err = |source| EngineError::Open {
            path: path.clone(),
            source,
        };
        let meta = std::fs::metadata(&path).map_err(open_err)?;
        let kind = if meta.file_type().is_block_device() {
            DeviceKind::Block
        } else if meta.file_type().is_file() {
            DeviceKind::File
        } else {
            return Err(EngineError::NotABlockDevice { path });
        };

        let mut cache = opts.cache;
        let main = match cache {
            CacheMode::None => match open_with(&path, opts.read_only, libc::O_DIRECT) {
                Ok(f) => f,
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    tracing::warn!(path = %path.display(), "the filesystem refuses O_DIRECT (tmpfs?); falling back to buffered I/O (cache=writeback)");
                    cache = CacheMode::Writeback;
                    open_with(&path, opts.read_only, 0).map_err(open_err)?
                }
                Err(e) => return Err(open_err(e)),
            },
            CacheMode::Writeback => open_with(&path, opts.read_only, 0).map_err(open_err)?,
        };
        let direct = if cache == CacheMode::None {
            libc::O_DIRECT
        } else {
            0
        };
        let fua = open_with(&path, opts.read_only, direct | libc::O_DSYNC).map_err(open_err)?;

        let (size, logical_block) = match kind {
            DeviceKind::Block => (
                blk_size(&main).map_err(open_err)?,
                blk_ssz(&main).map_err(open_err)?,
            ),
            DeviceKind::File => (meta.len(), 512),
        };
        let alignment = match (cache, kind) {
            (CacheMode::Writeback, _) => 512,
            (CacheMode::None, DeviceKind::Block) => logical_block.clamp(512, 4096),
            (CacheMode::None, DeviceKind::File) => probe_direct_alignment(&main, size),
        };
        let logical_block = logical_block.max(alignment);
        if cache == CacheMode::None && size % u64::from(alignment) != 0 {
            return Err(EngineError::Geometry {
                path,
                what: format!(
                    "size {size} is not a multiple of the {alignment}-byte block size required for direct I/O; \
                     resize the file (truncate -s) or use --cache writeback"
                ),
            });
        }
        if size == 0 {
            return Err(EngineError::Geometry {
                path,
                what: "size is 0 bytes; create it with a size (truncate -s 1G FILE)".into(),
            });
        }
        let rotational = rotational(&meta, kind);
        Ok(Self {
            path,
            main: Arc::new(main),
            fua: Arc::new(fua),
            geometry: Geometry {
                size,
                logical_block,
                alignment,
                kind,
                rotational,
            },
            cache,
        })
    }
}

fn blk_size(f: &File) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which is valid for the call.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), BLKGETSIZE64 as _, &mut size as *mut u64) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

fn blk_ssz(f: &File) -> io::Result<u32> {
    let mut ssz: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer, which is valid for the call.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), BLKSSZGET as _, &mut ssz as *mut libc::c_int) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(u32::try_from(ssz).unwrap_or(512).clamp(512, 4096))
}

/// O_DIRECT alignment of a regular file: try a 512-byte direct read; EINVAL means 4096.
fn probe_direct_alignment(f: &File, size: u64) -> u32 {
    if size < 4096 {
        return 512;
    }
    let mut buf = super::buf::AlignedBuf::new(512, 4096);
    // SAFETY: buf is valid for 512 writable bytes and outlives the call.
    let rc = unsafe { libc::pread(f.as_raw_fd(), buf.as_mut_ptr().cast(), 512, 0) };
    if rc < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
        4096
    } else {
        512
    }
}

/// Reads queue/rotational of the device (or of the device holding the file); false if unknown.
fn rotational(meta: &std::fs::Metadata, kind: DeviceKind) -> bool {
    use std::os::unix::fs::MetadataExt;
    let dev = if kind == DeviceKind::Block {
        meta.rdev()
    } else {
        meta.dev()
    };
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    for rel in ["queue/rotational", "../queue/rotational"] {
        let p = format!("/sys/dev/block/{major}:{minor}/{rel}");
        if let Ok(s) = std::fs::read_to_string(&p) {
            return s.trim() == "1";
        }
    }
    false
}

/// BLKDISCARD or BLKZEROOUT on a block device (blocking; call from a blocking thread).
pub(crate) fn blk_range_ioctl(f: &File, zero: bool, offset: u64, len: u64) -> io::Result<()> {
    let range: [u64; 2] = [offset, len];
    let req = if zero { BLKZEROOUT } else { BLKDISCARD };
    // SAFETY: the ioctl reads two u64 from the pointer, valid for the call.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), req as _, range.as_ptr()) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// lseek(SEEK_DATA / SEEK_HOLE); `Ok(None)` when there is no further data (ENXIO).
pub(crate) fn seek(f: &File, offset: u64, whence: i32) -> io::Result<Option<u64>> {
    let off =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
    // SAFETY: lseek on a valid fd has no memory effects.
    let rc = unsafe { libc::lseek(f.as_raw_fd(), off, whence) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(e);
    }
    Ok(Some(rc as u64))
}

/// posix_fadvise(WILLNEED): start read-ahead of a range.
pub(crate) fn willneed(f: &File, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: fadvise on a valid fd has no memory effects.
    let rc = unsafe {
        libc::posix_fadvise(
            f.as_raw_fd(),
            offset as libc::off_t,
            len as libc::off_t,
            libc::POSIX_FADV_WILLNEED,
        )
    };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(())
}
