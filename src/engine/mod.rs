//! `engine`: I/O on the local disk (an EBS volume, a partition or a regular file).
//!
//! One API over two backends, chosen once at start-up (Firecracker's `FileEngine` shape):
//! - `uring`: tokio-uring, one ring on the data-path thread; O_DIRECT unless told otherwise.
//! - `sync`: pread/pwrite on a small blocking pool, for hosts where io_uring is disabled
//!   (kernel.io_uring_disabled, seccomp profiles of container runtimes).
//!
//! The caller never branches on the backend: [`Engine`] holds either and offers the same calls.
//! Buffers are owned [`buf::AlignedBuf`]s that move into an operation and come back with its
//! result. [`Engine`] implements [`crate::block::BlockTarget`] (see `target.rs`), including
//! read-modify-write for requests that are not aligned for direct I/O.

pub mod buf;
pub mod claim;
mod file;
mod runtime;
mod sync;
mod target;
mod uring;

use std::path::{Path, PathBuf};

pub use file::{DeviceKind, Geometry};
pub use runtime::{block_on, probe_uring};

use crate::engine::buf::AlignedBuf;

/// Which backend does the I/O.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// io_uring through tokio-uring (default when the kernel allows it).
    Uring,
    /// pread/pwrite on a blocking thread pool.
    Sync,
}

impl std::fmt::Display for EngineKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            EngineKind::Uring => "uring",
            EngineKind::Sync => "sync",
        })
    }
}

/// Whether I/O bypasses the page cache.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum CacheMode {
    /// O_DIRECT: no page cache; requests must be aligned to the logical block size
    /// (unaligned ones are served by read-modify-write). The default for a replicated volume:
    /// what is acknowledged is on the device, not in RAM.
    None,
    /// Buffered I/O through the page cache; FLUSH and FUA still reach the disk (fdatasync / O_DSYNC).
    Writeback,
}

impl std::fmt::Display for CacheMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CacheMode::None => "none",
            CacheMode::Writeback => "writeback",
        })
    }
}

/// How to open a backing device or file.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// The device or file.
    pub path: PathBuf,
    /// Refuse writes (opened O_RDONLY).
    pub read_only: bool,
    /// Page-cache use.
    pub cache: CacheMode,
    /// Bytes at the end of the device reserved for internal metadata, not exported.
    pub reserved_tail: u64,
}

impl OpenOptions {
    /// Read-write, O_DIRECT, whole device.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            read_only: false,
            cache: CacheMode::None,
            reserved_tail: 0,
        }
    }
}

/// Errors opening a backing device.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The path could not be opened.
    #[error("cannot open {path}: {source} (check the path exists and that twinvol runs as root or owns it)")]
    Open {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Neither a regular file nor a block device.
    #[error("{path} is neither a regular file nor a block device; give an EBS volume (/dev/disk/by-id/...), a partition or a file")]
    NotABlockDevice {
        /// The path.
        path: PathBuf,
    },
    /// The size could not be determined or is unusable.
    #[error("{path}: {what}")]
    Geometry {
        /// The path.
        path: PathBuf,
        /// What is wrong and how to fix it.
        what: String,
    },
    /// io_uring was requested but the kernel refuses it.
    #[error("the io_uring engine is unavailable: {0} (check sysctl kernel.io_uring_disabled and the seccomp profile, or use --engine sync)")]
    UringUnavailable(String),
    /// A runtime could not be built.
    #[error("cannot start the {kind} I/O runtime: {source}")]
    Runtime {
        /// Which engine.
        kind: EngineKind,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The backend of an open device.
enum Backend {
    Uring(uring::UringFile),
    Sync(sync::SyncFile),
}

/// An open local device. Must be created and used on the data-path thread inside
/// [`block_on`] with the same [`EngineKind`].
///
/// Invariant: every request that reaches the backend is aligned to `geometry.alignment` in
/// offset, length and memory when `cache == CacheMode::None` (target.rs enforces it).
pub struct Engine {
    backend: Backend,
    files: file::Files,
    geometry: Geometry,
    kind: EngineKind,
    cache: CacheMode,
    read_only: bool,
    exported_size: u64,
    rmw_lock: std::sync::Arc<tokio::sync::RwLock<()>>,
    info: crate::block::TargetInfo,
}

impl Engine {
    /// Opens `opts.path` for `kind`. With `CacheMode::None` on a filesystem that refuses
    /// O_DIRECT (tmpfs), falls back to buffered I/O and logs a warning.
    pub fn open(kind: EngineKind, opts: &OpenOptions) -> Result<Self, EngineError> {
        let files = file::Files::open(opts)?;
        let geometry = files.geometry.clone();
        let cache = files.cache;
        let exported_size = geometry.size.checked_sub(opts.reserved_tail).ok_or_else(|| EngineError::Geometry {
            path: opts.path.clone(),
            what: format!(
                "device is {} bytes, smaller than the {} bytes reserved for metadata; use a larger device or external metadata",
                geometry.size, opts.reserved_tail
            ),
        })?;
        let backend = match kind {
            EngineKind::Uring => {
                Backend::Uring(
                    uring::UringFile::new(&files).map_err(|e| EngineError::Open {
                        path: opts.path.clone(),
                        source: e,
                    })?,
                )
            }
            EngineKind::Sync => Backend::Sync(sync::SyncFile::new(&files)),
        };
        let info = target::target_info(
            &geometry,
            cache,
            opts.read_only,
            exported_size,
            &opts.path,
            kind,
        );
        Ok(Self {
            backend,
            files,
            geometry,
            kind,
            cache,
            read_only: opts.read_only,
            exported_size,
            rmw_lock: Default::default(),
            info,
        })
    }

    /// Shares the read-modify-write lock with other engines open on the same device (one per
    /// data-path thread), so an unaligned write on one thread excludes aligned writes on all.
    pub fn with_rmw_lock(mut self, lock: std::sync::Arc<tokio::sync::RwLock<()>>) -> Self {
        self.rmw_lock = lock;
        self
    }

    /// The read-modify-write lock, to hand to engines opened on other threads.
    pub fn rmw_lock(&self) -> std::sync::Arc<tokio::sync::RwLock<()>> {
        self.rmw_lock.clone()
    }

    /// Which backend serves this device.
    pub fn kind(&self) -> EngineKind {
        self.kind
    }

    /// Page-cache mode actually in effect (may differ from the request, see [`Engine::open`]).
    pub fn cache(&self) -> CacheMode {
        self.cache
    }

    /// Size, block size, alignment and kind of the device.
    pub fn geometry(&self) -> &Geometry {
        &self.geometry
    }

    /// The path this engine was opened with.
    pub fn path(&self) -> &Path {
        &self.files.path
    }

    /// Bytes exported (device size minus any reserved tail).
    pub fn exported_size(&self) -> u64 {
        self.exported_size
    }

    /// Whether the device was opened read-only.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Reads `buf.len()` bytes at `offset`. Aligned requests only (see the struct invariant).
    pub async fn read_aligned(
        &self,
        offset: u64,
        buf: AlignedBuf,
    ) -> (std::io::Result<()>, AlignedBuf) {
        match &self.backend {
            Backend::Uring(f) => f.read_exact_at(offset, buf).await,
            Backend::Sync(f) => f.read_exact_at(offset, buf).await,
        }
    }

    /// Writes all of `buf` at `offset`; durable before returning when `fua`.
    pub async fn write_aligned(
        &self,
        offset: u64,
        buf: AlignedBuf,
        fua: bool,
    ) -> (std::io::Result<()>, AlignedBuf) {
        match &self.backend {
            Backend::Uring(f) => f.write_all_at(offset, buf, fua).await,
            Backend::Sync(f) => f.write_all_at(offset, buf, fua).await,
        }
    }

    /// Writes all of `data` at `offset` from a shared buffer; the caller checked the
    /// alignment (as for `write_aligned`).
    pub async fn write_bytes_aligned(
        &self,
        offset: u64,
        data: bytes::Bytes,
        fua: bool,
    ) -> std::io::Result<()> {
        match &self.backend {
            Backend::Uring(f) => f.write_bytes_at(offset, data, fua).await,
            Backend::Sync(f) => f.write_bytes_at(offset, data, fua).await,
        }
    }

    /// fdatasync: every completed write becomes durable.
    pub async fn sync_data(&self) -> std::io::Result<()> {
        match &self.backend {
            Backend::Uring(f) => f.sync_data().await,
            Backend::Sync(f) => f.sync_data().await,
        }
    }

    /// fallocate(2) on a regular file.
    pub async fn fallocate(&self, offset: u64, len: u64, mode: i32) -> std::io::Result<()> {
        match &self.backend {
            Backend::Uring(f) => f.fallocate(offset, len, mode).await,
            Backend::Sync(f) => f.fallocate(offset, len, mode).await,
        }
    }
}
