//! A JSON status snapshot kept in a file, written on a thread of its own.
//!
//! `twinvol mirror --status-file F` replaces F every 100 ms (write `F.tmp`, then rename over
//! F, so a reader never sees half a file). Those are file-system metadata operations, and on
//! ext4 a rename over an existing file can wait for the journal or for the disk: measured
//! (docs/BENCHMARKS.md) the data-path thread sat 0.4 s in `rename(2)`, in D state
//! in `submit_bio_wait`, while fio's writes through NBD stopped. Here the caller only hands a
//! snapshot over; a thread of this module writes it.
//!
//! Invariants: [`StatusFile::publish`] never waits for the file system (it takes a mutex that
//! the writer holds only to move a snapshot in or out); only the newest snapshot is kept, so a
//! slow disk delays the file, never the caller, and memory stays one snapshot; a snapshot
//! published before [`StatusFile::finish`] is written before `finish` returns.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

/// What the writer thread and the publishers share.
#[derive(Debug)]
struct Slot<T> {
    /// The newest snapshot not yet written.
    pending: Option<T>,
    /// No more snapshots will come: write what is pending and end.
    closed: bool,
}

type Shared<T> = Arc<(Mutex<Slot<T>>, Condvar)>;

/// Handle of the writer thread; dropping it lets the thread write the pending snapshot and end
/// (without waiting for it; [`StatusFile::finish`] waits).
#[derive(Debug)]
pub struct StatusFile<T> {
    shared: Shared<T>,
    thread: Option<JoinHandle<()>>,
}

/// Replaces `path` with `text` atomically: `path` with the extension `tmp` is written, then
/// renamed over `path`, so a reader sees the old text or the new one, never part of either.
/// Also used for the daemon's `role.json`.
pub fn replace_file(path: &Path, text: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

impl<T: serde::Serialize + Send + 'static> StatusFile<T> {
    /// Starts the thread that keeps `path` holding the newest published snapshot as
    /// pretty-printed JSON. A failed write is logged once (and its recovery once), not every
    /// time, and never stops the thread.
    pub fn spawn(path: PathBuf) -> std::io::Result<Self> {
        let mut failing = false;
        Self::spawn_with(move |s: &T| {
            let r = serde_json::to_vec_pretty(s)
                .map_err(std::io::Error::other)
                .and_then(|text| replace_file(&path, &text));
            match (r, failing) {
                (Err(e), false) => {
                    failing = true;
                    tracing::warn!(path = %path.display(), error = %e, "cannot write the status file; retrying with every snapshot (check the directory exists and is writable)");
                }
                (Ok(()), true) => {
                    failing = false;
                    tracing::info!(path = %path.display(), "status file written again");
                }
                _ => {}
            }
        })
    }
}

impl<T: Send + 'static> StatusFile<T> {
    /// Starts the writer thread with `write` as what is done with each snapshot (the file
    /// write in [`StatusFile::spawn`]; tests pass their own).
    pub fn spawn_with(mut write: impl FnMut(&T) + Send + 'static) -> std::io::Result<Self> {
        let shared: Shared<T> = Arc::new((
            Mutex::new(Slot {
                pending: None,
                closed: false,
            }),
            Condvar::new(),
        ));
        let theirs = shared.clone();
        let thread = std::thread::Builder::new()
            .name("twinvol-status".into())
            .spawn(move || loop {
                let next = {
                    let (lock, cv) = &*theirs;
                    let Ok(mut slot) = lock.lock() else { return };
                    while slot.pending.is_none() && !slot.closed {
                        slot = match cv.wait(slot) {
                            Ok(s) => s,
                            Err(_) => return,
                        };
                    }
                    match slot.pending.take() {
                        Some(s) => s,
                        None => return, // closed, nothing left
                    }
                };
                write(&next);
            })?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// Hands `snapshot` to the writer, replacing any snapshot it has not written yet.
    pub fn publish(&self, snapshot: T) {
        let (lock, cv) = &*self.shared;
        if let Ok(mut slot) = lock.lock() {
            slot.pending = Some(snapshot);
            cv.notify_one();
        }
    }

    /// Writes what is pending, then stops the thread and waits for it (shutdown; this is the
    /// one call that waits for the file system).
    pub fn finish(mut self) {
        self.close();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl<T> StatusFile<T> {
    /// Tells the writer no more snapshots come: it writes what is pending and ends.
    fn close(&self) {
        let (lock, cv) = &*self.shared;
        if let Ok(mut slot) = lock.lock() {
            slot.closed = true;
            cv.notify_one();
        }
    }
}

impl<T> Drop for StatusFile<T> {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    #[test]
    fn publishing_does_not_wait_for_a_write_that_is_stuck_and_only_the_newest_snapshot_follows() {
        // The first write blocks until the test releases it, like a rename stuck on the disk.
        let (entered_tx, entered) = mpsc::channel::<u32>();
        let (release, released) = mpsc::channel::<()>();
        let written = Arc::new(Mutex::new(Vec::new()));
        let w = written.clone();
        let f = StatusFile::spawn_with(move |s: &u32| {
            let _ = entered_tx.send(*s);
            if *s == 0 {
                let _ = released.recv();
            }
            w.lock().unwrap().push(*s);
        })
        .unwrap();
        f.publish(0);
        assert_eq!(entered.recv_timeout(Duration::from_secs(5)), Ok(0));
        // The writer is stuck in snapshot 0's write: publishing must not wait for it.
        let start = Instant::now();
        for s in 1..=1000 {
            f.publish(s);
        }
        assert!(
            start.elapsed() < Duration::from_millis(500),
            "1000 publishes took {:?} while the writer was stuck",
            start.elapsed()
        );
        release.send(()).unwrap();
        f.finish();
        // Snapshot 0, then only the newest one: nothing queued up behind the stuck write.
        assert_eq!(*written.lock().unwrap(), vec![0, 1000]);
    }

    #[test]
    fn the_file_holds_the_last_snapshot_published_before_finish() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.json");
        let f = StatusFile::spawn(p.clone()).unwrap();
        for n in 0..50u32 {
            f.publish(serde_json::json!({ "n": n }));
        }
        f.finish();
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        assert_eq!(v["n"], 49);
        assert!(
            !p.with_extension("tmp").exists(),
            "the temporary file is renamed away"
        );
    }

    #[test]
    fn a_failing_write_does_not_stop_the_writer() {
        let d = tempfile::tempdir().unwrap();
        let missing = d.path().join("not-yet").join("a.json");
        let f = StatusFile::spawn(missing.clone()).unwrap();
        // Two snapshots, each waited for until the writer took it: the writer takes the second
        // only after its attempt at the first, which failed (the directory does not exist).
        let deadline = Instant::now() + Duration::from_secs(5);
        for _ in 0..2 {
            f.publish(serde_json::json!({ "n": 1 }));
            while f.shared.0.lock().unwrap().pending.is_some() {
                assert!(
                    Instant::now() < deadline,
                    "the writer never took the snapshot"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        assert!(!missing.exists());
        std::fs::create_dir(missing.parent().unwrap()).unwrap();
        f.publish(serde_json::json!({ "n": 2 }));
        f.finish();
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&missing).unwrap()).unwrap();
        assert_eq!(v["n"], 2);
    }
}
