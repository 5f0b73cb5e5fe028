//! The portable backend: positional reads and writes on tokio's blocking thread pool.
//! Used where io_uring is disabled; the pool size is bounded by the runtime (see runtime.rs).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use super::buf::AlignedBuf;
use super::file::Files;

/// Blocking-pool I/O on a shared file.
pub(crate) struct SyncFile {
    main: Arc<File>,
    fua: Arc<File>,
}

/// Runs `f` on the blocking pool; a panicked or cancelled worker becomes an EIO.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| io::Error::other(format!("I/O worker failed: {e}")))
}

/// Reads exactly `buf.len()` bytes; bytes past the end of file read as zeroes.
pub(crate) fn pread_exact(f: &File, offset: u64, buf: &mut [u8]) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => {
                buf[done..].fill(0);
                return Ok(());
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl SyncFile {
    pub fn new(files: &Files) -> Self {
        Self {
            main: files.main.clone(),
            fua: files.fua.clone(),
        }
    }

    /// The file a write goes through: the O_DSYNC one for FUA.
    fn for_write(&self, fua: bool) -> Arc<File> {
        if fua {
            self.fua.clone()
        } else {
            self.main.clone()
        }
    }

    pub async fn read_exact_at(
        &self,
        offset: u64,
        mut buf: AlignedBuf,
    ) -> (io::Result<()>, AlignedBuf) {
        let f = self.main.clone();
        let r = blocking(move || {
            let r = pread_exact(&f, offset, &mut buf);
            (r, buf)
        })
        .await;
        match r {
            Ok(pair) => pair,
            Err(e) => (Err(e), AlignedBuf::new(0, 512)),
        }
    }

    pub async fn write_all_at(
        &self,
        offset: u64,
        buf: AlignedBuf,
        fua: bool,
    ) -> (io::Result<()>, AlignedBuf) {
        let f = self.for_write(fua);
        let r = blocking(move || {
            let r = f.write_all_at(&buf, offset);
            (r, buf)
        })
        .await;
        match r {
            Ok(pair) => pair,
            Err(e) => (Err(e), AlignedBuf::new(0, 512)),
        }
    }

    /// Writes all of `data` at `offset` from the shared buffer (no copy).
    pub async fn write_bytes_at(
        &self,
        offset: u64,
        data: bytes::Bytes,
        fua: bool,
    ) -> io::Result<()> {
        let f = self.for_write(fua);
        blocking(move || f.write_all_at(&data, offset)).await?
    }

    pub async fn sync_data(&self) -> io::Result<()> {
        let f = self.main.clone();
        blocking(move || f.sync_data()).await?
    }

    pub async fn fallocate(&self, offset: u64, len: u64, mode: i32) -> io::Result<()> {
        let f = self.main.clone();
        blocking(move || fallocate_blocking(&f, offset, len, mode)).await?
    }
}

/// fallocate(2), blocking.
pub(crate) fn fallocate_blocking(f: &File, offset: u64, len: u64, mode: i32) -> io::Result<()> {
    // SAFETY: fallocate on a valid fd has no memory effects.
    let rc = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            mode,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
