//! The io_uring backend: tokio-uring file operations on the data-path thread's ring.
//! Owned [`AlignedBuf`]s go into the ring and come back with the completion.

use std::io;

use tokio_uring::buf::BoundedBuf;

use super::buf::AlignedBuf;
use super::file::Files;

/// Ring-based I/O. `!Send`: lives on the thread whose ring opened it.
pub(crate) struct UringFile {
    main: tokio_uring::fs::File,
    fua: tokio_uring::fs::File,
}

impl UringFile {
    /// Wraps duplicates of the device's descriptors (the std files stay open for ioctls).
    pub fn new(files: &Files) -> io::Result<Self> {
        let main = files.main.try_clone()?;
        let fua = files.fua.try_clone()?;
        Ok(Self {
            main: tokio_uring::fs::File::from_std(main),
            fua: tokio_uring::fs::File::from_std(fua),
        })
    }

    /// The descriptor a write goes through: the O_DSYNC one for FUA.
    fn for_write(&self, fua: bool) -> &tokio_uring::fs::File {
        if fua {
            &self.fua
        } else {
            &self.main
        }
    }

    /// Reads exactly `buf.len()` bytes; bytes past the end of file read as zeroes.
    pub async fn read_exact_at(
        &self,
        offset: u64,
        buf: AlignedBuf,
    ) -> (io::Result<()>, AlignedBuf) {
        let want = buf.len();
        let mut buf = buf;
        let mut done = 0usize;
        while done < want {
            let (r, slice) = self
                .main
                .read_at(buf.slice(done..want), offset + done as u64)
                .await;
            buf = slice.into_inner();
            match r {
                Ok(0) => {
                    buf[done..want].fill(0);
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    buf.set_len(want);
                    return (Err(e), buf);
                }
            }
        }
        buf.set_len(want);
        (Ok(()), buf)
    }

    /// Writes all of `buf`; through the O_DSYNC descriptor when `fua`.
    pub async fn write_all_at(
        &self,
        offset: u64,
        buf: AlignedBuf,
        fua: bool,
    ) -> (io::Result<()>, AlignedBuf) {
        let file = self.for_write(fua);
        let (r, slice) = file.write_all_at(buf.slice(..), offset).await;
        (r, slice.into_inner())
    }

    /// Writes all of `data` at `offset` straight from the shared buffer (no copy).
    pub async fn write_bytes_at(
        &self,
        offset: u64,
        data: bytes::Bytes,
        fua: bool,
    ) -> io::Result<()> {
        let file = self.for_write(fua);
        let (r, _) = file.write_all_at(data, offset).await;
        r
    }

    pub async fn sync_data(&self) -> io::Result<()> {
        self.main.sync_data().await
    }

    pub async fn fallocate(&self, offset: u64, len: u64, mode: i32) -> io::Result<()> {
        self.main.fallocate(offset, len, mode).await
    }
}
