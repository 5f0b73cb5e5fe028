//! Shared harness for tests that run the real `twinvol` binary against real NBD clients.
#![allow(dead_code)]

pub mod mirror_node;
pub mod mirror_pair;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// Path of the binary under test.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_twinvol"))
}

/// Fails loudly when a prerequisite tool is missing: these tests must run in CI.
pub fn require(tools: &[&str]) {
    for t in tools {
        let found = Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {t}"))
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        assert!(
            found,
            "required tool `{t}` is not installed: run scripts/test-deps.sh (README: test command)"
        );
    }
}

/// Runs a shell command, panicking with its output when it fails.
pub fn sh(cmd: &str) -> Output {
    let out = Command::new("bash")
        .arg("-c")
        .arg(cmd)
        .output()
        .expect("bash runs");
    assert!(
        out.status.success(),
        "command failed ({}): {cmd}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Stdout of a successful shell command as text.
pub fn sh_out(cmd: &str) -> String {
    String::from_utf8_lossy(&sh(cmd).stdout).into_owned()
}

/// A scratch directory on a real filesystem (O_DIRECT works there, unlike tmpfs).
pub fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("twinvol-test-")
        .tempdir_in("/var/tmp")
        .expect("scratch dir in /var/tmp")
}

/// Creates a sparse file of `size` bytes.
pub fn sparse_file(dir: &Path, name: &str, size: u64) -> PathBuf {
    let p = dir.join(name);
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(size).unwrap();
    p
}

/// A running `twinvol export` on a Unix socket; SIGKILLed on drop if still running.
pub struct Export {
    child: Option<Child>,
    /// Socket path.
    pub socket: PathBuf,
    /// Captured stderr file.
    pub log: PathBuf,
}

impl Export {
    /// Starts `twinvol export PATH --socket DIR/nbd.sock EXTRA...` and waits until it accepts.
    pub fn start(path: &Path, dir: &Path, extra: &[&str]) -> Export {
        let socket = dir.join(format!("nbd-{}.sock", std::process::id() ^ rand_suffix()));
        let log = socket.with_extension("log");
        let child = Command::new(bin())
            .arg("export")
            .arg(path)
            .arg("--socket")
            .arg(&socket)
            .args(extra)
            .env("TWINVOL_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn twinvol export");
        let e = Export {
            child: Some(child),
            socket,
            log,
        };
        e.wait_ready();
        e
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("twinvol export did not start; log:\n{}", self.log_text());
    }

    /// NBD URI of the export.
    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }

    /// What the server logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM and waits for the exit status (at most 30 s).
    pub fn stop(mut self) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        // SAFETY: kill(2) on our own child's pid has no memory effects.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "export did not stop within 30 s after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Export {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn rand_suffix() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(1);
    N.fetch_add(1, Ordering::Relaxed) << 16
}
