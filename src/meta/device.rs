//! [`MetaDevice`]: the small synchronous positional-I/O contract the metadata store needs,
//! implemented for files and block devices ([`FileDevice`]) and for a sparse in-memory
//! device that injects crashes, torn writes and flush failures ([`MemDevice`], for tests).
//!
//! Contract: offsets and lengths are multiples of 4 KiB; a write is durable only after a
//! later `flush` returned `Ok`; `len` is fixed while the device is open.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::engine::buf::AlignedBuf;
use crate::engine::claim::{ClaimError, DeviceClaim};

/// Alignment of every metadata I/O.
pub const META_ALIGN: u64 = 4096;

/// Positional, 4 KiB-aligned, synchronous I/O on the device holding a metadata area.
pub trait MetaDevice {
    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Writes all of `buf` at `offset` (not durable until [`Self::flush`]).
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()>;
    /// Makes every completed write durable.
    fn flush(&mut self) -> io::Result<()>;
    /// Device size in bytes.
    fn len(&self) -> u64;
    /// True for a zero-sized device.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn check_aligned(offset: u64, len: usize) -> io::Result<()> {
    if offset % META_ALIGN != 0 || len as u64 % META_ALIGN != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("metadata I/O at {offset}+{len} is not 4 KiB aligned"),
        ));
    }
    Ok(())
}

/// A file or block device opened for metadata I/O: O_DIRECT when the filesystem allows it
/// (tmpfs does not), durability through `fdatasync`.
///
/// Invariant: `len` is the size at open time; a device open for writing is claimed by this
/// process for as long as the value lives.
#[derive(Debug)]
pub struct FileDevice {
    file: File,
    len: u64,
    direct: bool,
    path: PathBuf,
    /// Held while open for writing: this process owns the device.
    _claim: Option<DeviceClaim>,
}

impl FileDevice {
    /// Opens `path` (a regular file or a block device) read-only or read-write. A device
    /// opened for writing is claimed first ([`DeviceClaim`]): it fails with
    /// [`ClaimError::InUse`] while the device is mounted or owned by another process (a
    /// running twinvol), and no other process can claim it while this one is open.
    pub fn open(path: &Path, writable: bool) -> Result<Self, ClaimError> {
        let open_err = |source| ClaimError::Open {
            device: path.to_path_buf(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(open_err)?;
        let ft = meta.file_type();
        if !ft.is_file() && !ft.is_block_device() {
            return Err(open_err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "neither a regular file nor a block device",
            )));
        }
        let claim = if writable {
            Some(DeviceClaim::take(path)?)
        } else {
            None
        };
        let open = |flags: i32| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(writable)
                .custom_flags(flags | libc::O_CLOEXEC)
                .open(path)
        };
        let (mut file, direct) = match open(libc::O_DIRECT) {
            Ok(f) => (f, true),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => (open(0).map_err(open_err)?, false),
            Err(e) => return Err(open_err(e)),
        };
        let len = file.seek(SeekFrom::End(0)).map_err(open_err)?;
        Ok(Self {
            file,
            len,
            direct,
            path: path.to_path_buf(),
            _claim: claim,
        })
    }

    /// Whether O_DIRECT is in use.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// The path opened.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl MetaDevice for FileDevice {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        check_aligned(offset, buf.len())?;
        let mut aligned = AlignedBuf::new(buf.len(), META_ALIGN as usize);
        self.file.read_exact_at(&mut aligned, offset)?;
        buf.copy_from_slice(&aligned);
        Ok(())
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        check_aligned(offset, buf.len())?;
        let aligned = AlignedBuf::from_slice(buf, META_ALIGN as usize);
        self.file.write_all_at(&aligned, offset)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn len(&self) -> u64 {
        self.len
    }
}

/// What a [`MemDevice`] does wrong, counted in writes since the plan was armed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fault {
    /// Behave.
    #[default]
    None,
    /// Power loss during write number `write` (1-based): its first `keep` bytes reach the
    /// medium, the rest and every later write are lost (while still answering `Ok`, like a
    /// volatile cache), and every flush from then on fails.
    CrashAt {
        /// Which write.
        write: u64,
        /// Bytes of it that persist (0 = dropped whole).
        keep: usize,
    },
    /// Every flush fails with EIO (writes still persist): an fsync error.
    FailFlush,
}

#[derive(Debug, Default)]
struct MemState {
    blocks: HashMap<u64, Box<[u8; 4096]>>,
    len: u64,
    writes: u64,
    flushes: u64,
    fault: Fault,
    crashed: bool,
    log: Vec<u64>,
}

/// A sparse in-memory device that injects crashes and torn writes. Clones share the same
/// medium, so a test keeps a handle to inspect or reopen what "survived".
///
/// Invariant: `blocks` holds only 4 KiB-aligned blocks below `len`; absent blocks read zero.
#[derive(Debug, Clone)]
pub struct MemDevice {
    state: Arc<Mutex<MemState>>,
}

impl MemDevice {
    /// A zero-filled device of `len` bytes (rounded down to 4 KiB).
    pub fn new(len: u64) -> Self {
        let state = MemState {
            len: len / META_ALIGN * META_ALIGN,
            ..Default::default()
        };
        Self {
            state: Arc::new(Mutex::new(state)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Arms a fault; the write counter restarts at 0.
    pub fn arm(&self, fault: Fault) {
        let mut s = self.lock();
        s.fault = fault;
        s.writes = 0;
        s.crashed = false;
        s.log.clear();
    }

    /// Offsets of the writes attempted since the last [`Self::arm`], in order.
    pub fn write_log(&self) -> Vec<u64> {
        self.lock().log.clone()
    }

    /// Writes attempted since the last [`Self::arm`] (or creation).
    pub fn writes(&self) -> u64 {
        self.lock().writes
    }

    /// Flushes attempted.
    pub fn flushes(&self) -> u64 {
        self.lock().flushes
    }

    /// Whether the armed crash happened.
    pub fn crashed(&self) -> bool {
        self.lock().crashed
    }

    /// A new, healthy device holding a copy of what is on the medium now (the disk after
    /// a reboot).
    pub fn reboot(&self) -> MemDevice {
        let s = self.lock();
        let state = MemState {
            blocks: s.blocks.clone(),
            len: s.len,
            ..Default::default()
        };
        MemDevice {
            state: Arc::new(Mutex::new(state)),
        }
    }

    /// Flips bits of one byte on the medium (a media error).
    pub fn corrupt(&self, offset: u64, xor: u8) {
        let mut s = self.lock();
        let block = s
            .blocks
            .entry(offset / META_ALIGN * META_ALIGN)
            .or_insert_with(|| Box::new([0; 4096]));
        block[(offset % META_ALIGN) as usize] ^= xor;
    }
}

impl MetaDevice for MemDevice {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        check_aligned(offset, buf.len())?;
        let s = self.lock();
        if offset + buf.len() as u64 > s.len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past the end of the device",
            ));
        }
        for (i, chunk) in buf.chunks_mut(4096).enumerate() {
            match s.blocks.get(&(offset + i as u64 * META_ALIGN)) {
                Some(b) => chunk.copy_from_slice(&b[..]),
                None => chunk.fill(0),
            }
        }
        Ok(())
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        check_aligned(offset, buf.len())?;
        let mut s = self.lock();
        if offset + buf.len() as u64 > s.len {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "write past the end of the device",
            ));
        }
        s.writes += 1;
        s.log.push(offset);
        let mut keep = buf.len();
        if let Fault::CrashAt { write, keep: k } = s.fault {
            if s.crashed || s.writes > write {
                return Ok(());
            }
            if s.writes == write {
                s.crashed = true;
                keep = k.min(buf.len());
            }
        }
        for (i, chunk) in buf[..keep].chunks(4096).enumerate() {
            let block = s
                .blocks
                .entry(offset + i as u64 * META_ALIGN)
                .or_insert_with(|| Box::new([0; 4096]));
            block[..chunk.len()].copy_from_slice(chunk);
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        let mut s = self.lock();
        s.flushes += 1;
        if s.crashed || s.fault == Fault::FailFlush {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        Ok(())
    }

    fn len(&self) -> u64 {
        self.lock().len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torn_write_keeps_only_the_prefix_and_later_writes_and_flushes_fail_silently_or_loudly() {
        let mut d = MemDevice::new(1 << 20);
        d.write_at(0, &[1; 4096]).unwrap();
        d.arm(Fault::CrashAt {
            write: 1,
            keep: 100,
        });
        d.write_at(0, &[2; 4096]).unwrap();
        d.write_at(4096, &[3; 4096]).unwrap();
        assert!(d.flush().is_err());
        let mut r = d.reboot();
        let mut buf = [0u8; 8192];
        r.read_at(0, &mut buf).unwrap();
        assert!(buf[..100].iter().all(|b| *b == 2));
        assert!(buf[100..4096].iter().all(|b| *b == 1));
        assert!(buf[4096..].iter().all(|b| *b == 0));
        assert!(r.flush().is_ok());
    }

    #[test]
    fn unaligned_io_is_refused() {
        let mut d = MemDevice::new(1 << 20);
        assert_eq!(
            d.write_at(1, &[0; 4096]).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        assert_eq!(
            d.read_at(0, &mut [0; 10]).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
    }

    #[test]
    fn file_device_round_trips_and_reports_its_size() {
        let f = tempfile::NamedTempFile::new_in(std::env::temp_dir()).unwrap();
        f.as_file().set_len(1 << 20).unwrap();
        let mut d = FileDevice::open(f.path(), true).unwrap();
        assert_eq!(d.len(), 1 << 20);
        d.write_at(8192, &[7; 4096]).unwrap();
        d.flush().unwrap();
        let mut buf = [0u8; 4096];
        d.read_at(8192, &mut buf).unwrap();
        assert_eq!(buf, [7; 4096]);
    }
}
