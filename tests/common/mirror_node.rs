//! One `twinvol mirror` node as the mirror suites (tests/mirror.rs, tests/mirror_netns.rs) run
//! it: its device, config, status and log files, its process (optionally inside a network
//! namespace), and an NBD client on its export socket.

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{bin, sh, sparse_file};

const MIB: u64 = 1024 * 1024;

/// One node's files and process; the process is killed on drop.
pub struct MirrorNode {
    /// `node.id`.
    pub name: &'static str,
    /// Volume device (a sparse file with internal metadata at its tail).
    pub device: PathBuf,
    /// Configuration file.
    pub config: PathBuf,
    /// NBD export socket (while Primary).
    pub socket: PathBuf,
    /// `--status-file`.
    pub status: PathBuf,
    /// stderr of every run, appended.
    pub log: PathBuf,
    /// The running process.
    pub child: Option<Child>,
    /// Network namespace the process runs in (`ip netns exec`), if any.
    pub netns: Option<String>,
}

impl Drop for MirrorNode {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Writes the pre-shared key file both nodes use (mode 0600).
pub fn write_key(dir: &Path) -> PathBuf {
    key_file(dir, "key", &[0x5au8; 32])
}

/// A key file at `dir/name` holding `key` (mode 0600).
pub fn key_file(dir: &Path, name: &str, key: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, key).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

impl MirrorNode {
    /// Node `name` in `dir`: a `dev_size` device with metadata (64 KiB granularity, a small
    /// activity log) and a config for volume "data" (sync engine, export on `<name>.sock`)
    /// whose `[volume.replication]` table is `replication`.
    pub fn create(
        dir: &Path,
        name: &'static str,
        dev_size: u64,
        replication: &str,
        netns: Option<String>,
    ) -> MirrorNode {
        let device = sparse_file(dir, &format!("{name}.img"), dev_size);
        let socket = dir.join(format!("{name}.sock"));
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                r#"[node]
id = "{name}"

[[volume]]
name = "data"
device = "{dev}"
engine = "sync"
[volume.export]
socket = "{sock}"
[volume.replication]
{replication}
"#,
                dev = device.display(),
                sock = socket.display(),
            ),
        )
        .unwrap();
        sh(&format!(
            "{} create-md --device {} --granularity 64K --al-extents 16 --al-extent-size 1M",
            bin().display(),
            device.display()
        ));
        MirrorNode {
            name,
            device,
            socket,
            status: dir.join(format!("{name}.json")),
            log: dir.join(format!("{name}.log")),
            config,
            child: None,
            netns,
        }
    }

    /// Marks the device as one of a fresh pair that skips the initial sync (both zero, same
    /// generation id).
    pub fn skip_initial_sync(&self) {
        sh(&format!(
            "{} new-current-uuid --clear-bitmap --uuid 1234abcd --device {}",
            bin().display(),
            self.device.display()
        ));
    }

    /// Starts `twinvol mirror` with `role` (e.g. `--primary`) and waits for its first status
    /// snapshot (written after the signal handlers are installed).
    pub fn start(&mut self, role: &[&str]) {
        self.start_logging(role, "info");
    }

    /// [`Self::start`] with `TWINVOL_LOG` at `level` (e.g. `trace` to see every log line).
    pub fn start_logging(&mut self, role: &[&str], level: &str) {
        self.start_with(role, level, &[]);
    }

    /// [`Self::start`] with `TWINVOL_LOG` at `level` and extra environment variables (e.g.
    /// `TWINVOL_FAILPOINTS`).
    pub fn start_with(&mut self, role: &[&str], level: &str, env: &[(&str, &str)]) {
        let _ = std::fs::remove_file(&self.status);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        // `ip netns exec` execs the command: the child's pid is twinvol's.
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(bin());
                c
            }
            None => Command::new(bin()),
        };
        let child = cmd
            .arg("mirror")
            .arg("--config")
            .arg(&self.config)
            .arg("--status-file")
            .arg(&self.status)
            .args(role)
            .env("TWINVOL_LOG", level)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        self.wait_for("started", Duration::from_secs(20), |s| !s.is_null());
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// SIGTERM; the process must exit successfully with its metadata closed.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            )
            .unwrap();
            let st = c.wait().unwrap();
            assert!(
                !self.log_text().contains("volume still in use"),
                "{} did not close its metadata cleanly:\n{}",
                self.name,
                self.log_text()
            );
            assert!(
                st.success(),
                "{} did not stop cleanly: {st}\n{}",
                self.name,
                self.log_text()
            );
        }
    }

    /// Everything the process logged.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Error-level lines of the log that contain `what` ("" counts them all).
    pub fn error_lines(&self, what: &str) -> usize {
        self.log_text()
            .lines()
            .filter(|l| l.contains("ERROR") && l.contains(what))
            .count()
    }

    /// The latest status snapshot (`null` before the first).
    pub fn status(&self) -> serde_json::Value {
        let text = std::fs::read_to_string(&self.status).unwrap_or_else(|_| "null".into());
        serde_json::from_str(&text).unwrap_or(serde_json::Value::Null)
    }

    /// A counter of the status snapshot.
    pub fn counter(&self, name: &str) -> u64 {
        self.status()["counters"][name]
            .as_u64()
            .unwrap_or_else(|| panic!("{}: no counter {name}", self.name))
    }

    /// Polls the status until `ok`; fails with the status and the log after `timeout`.
    pub fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        ok: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let t0 = Instant::now();
        loop {
            let s = self.status();
            if ok(&s) {
                return s;
            }
            assert!(
                t0.elapsed() < timeout,
                "{}: {what} not reached in {timeout:?}; status {s:#}\nlog:\n{}",
                self.name,
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until connected, not resyncing, up to date and with nothing unreplicated.
    pub fn wait_connected_in_sync(&self, timeout: Duration) -> serde_json::Value {
        self.wait_for("connected, in sync", timeout, |s| {
            s["connection"]["state"] == "connected"
                && s["resync"].is_null()
                && s["disk"] == "up-to-date"
                && s["rpo_bytes"] == 0
        })
    }

    /// The data region (the metadata sits at the tail).
    pub fn data(&self, size: u64) -> Vec<u8> {
        let mut f = std::fs::File::open(&self.device).unwrap();
        let mut v = vec![0u8; size as usize];
        f.read_exact(&mut v).unwrap();
        v
    }

    /// CRC32 of the data region, with its length so that a short read cannot compare equal.
    pub fn data_checksum(&self, size: u64) -> (u64, u32) {
        let mut f = std::fs::File::open(&self.device).unwrap();
        let mut h = crc32fast::Hasher::new();
        let mut buf = vec![0u8; 4 * MIB as usize];
        let mut left = size;
        while left > 0 {
            let n = left.min(4 * MIB) as usize;
            f.read_exact(&mut buf[..n]).unwrap();
            h.update(&buf[..n]);
            left -= n as u64;
        }
        (size, h.finalize())
    }
}

/// A connected NBD client on a node's Unix export socket.
pub struct Client {
    s: std::os::unix::net::UnixStream,
    /// What the handshake announced.
    pub export: nbd::Export,
}

impl Client {
    /// Connects and negotiates, retrying for up to 20 s while the export comes up.
    pub fn connect(node: &MirrorNode) -> Client {
        let t0 = Instant::now();
        loop {
            if let Ok(mut s) = std::os::unix::net::UnixStream::connect(&node.socket) {
                if let Ok(export) = nbd::client::handshake(&mut s, b"") {
                    return Client { s, export };
                }
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "no NBD export on {}:\n{}",
                node.name,
                node.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Writes `data` at `offset`.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let mut c = nbd::client::NbdClient::new(&mut self.s, &self.export);
        c.seek(SeekFrom::Start(offset))?;
        c.write_all(data)
    }

    /// NBD FLUSH.
    pub fn flush(&mut self) -> std::io::Result<()> {
        nbd::client::NbdClient::new(&mut self.s, &self.export).flush()
    }

    /// Reads `len` bytes at `offset`.
    pub fn read(&mut self, offset: u64, len: u32) -> std::io::Result<Vec<u8>> {
        let mut c = nbd::client::NbdClient::new(&mut self.s, &self.export);
        c.seek(SeekFrom::Start(offset))?;
        let mut v = vec![0u8; len as usize];
        c.read_exact(&mut v)?;
        Ok(v)
    }
}

/// A xorshift64 sequence from `seed` (non-zero): the tests' random kill moments and seeds.
pub fn xorshift(mut x: u64) -> impl FnMut() -> u64 {
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}

/// Incompressible bytes (xorshift), different per seed.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut next = xorshift(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    (0..len).map(|_| next() as u8).collect()
}

/// Device size for [`FioPass`] (sparse): one pass of 4 KiB random writes over it takes
/// seconds even in a release build, so a kill within the first second lands while fio has
/// writes in flight.
pub const FIO_DEV: u64 = 256 * MIB;

/// fio writing 4 KiB blocks at random offsets at QD32 through a node's export: one pass over
/// the export (`io_size` = its size, and fio's random map writes each block once), every write
/// with its own random content (`refill_buffers`). A block's content on the Primary is
/// therefore that of the one write fio sent there. Its completion-latency log with
/// `log_offset` lists the offset of every write fio saw acknowledged; a write that failed is
/// not logged.
pub struct FioPass {
    child: Child,
    /// `--write_lat_log` prefix.
    log: PathBuf,
    /// fio's stderr: a file, not a pipe, so that however much fio reports about its dead
    /// server it never blocks on a full pipe nobody reads yet.
    stderr: PathBuf,
    round: u32,
}

impl FioPass {
    /// Starts the pass against `node`'s export of `size` bytes; fio's random sequence comes
    /// from `seed`; its logs go to `dir` (named after `round`).
    pub fn start(node: &MirrorNode, size: u64, seed: u64, dir: &Path, round: u32) -> FioPass {
        Self::start_part(node, size, size, seed, dir, round)
    }

    /// [`Self::start`] stopping after `io_bytes` (still each block at most once).
    pub fn start_part(
        node: &MirrorNode,
        size: u64,
        io_bytes: u64,
        seed: u64,
        dir: &Path,
        round: u32,
    ) -> FioPass {
        let log = dir.join(format!("fio-{round}"));
        let stderr = dir.join(format!("fio-{round}.stderr"));
        let err_file = std::fs::File::create(&stderr).unwrap();
        let child = Command::new("fio")
            .args([
                "--name=kill",
                "--ioengine=nbd",
                &format!("--uri=nbd+unix:///?socket={}", node.socket.display()),
                "--rw=randwrite",
                "--bs=4k",
                "--iodepth=32",
                &format!("--size={size}"),
                &format!("--io_size={io_bytes}"),
                &format!("--randseed={seed}"),
                "--refill_buffers",
                &format!("--write_lat_log={}", log.display()),
                "--log_offset=1",
                "--output-format=terse",
            ])
            .stdout(Stdio::null())
            .stderr(err_file)
            .spawn()
            .expect("fio starts (scripts/test-deps.sh installs it)");
        FioPass {
            child,
            log,
            stderr,
            round,
        }
    }

    /// What fio wrote to stderr so far.
    fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.stderr).unwrap_or_default()).into_owned()
    }

    /// fio's exit status once it ends within `timeout`; None (fio still running) otherwise.
    fn exited_within(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let t0 = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if t0.elapsed() > timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits (at most `timeout`) for fio to complete its writes without an error.
    pub fn finished(mut self, timeout: Duration) {
        let round = self.round;
        let Some(status) = self.exited_within(timeout) else {
            let _ = self.child.kill();
            panic!("round {round}: fio still running after {timeout:?}");
        };
        assert!(
            status.success(),
            "round {round}: fio failed ({status}):\n{}",
            self.stderr_text()
        );
    }

    /// Waits for fio to fail (its server was killed), then returns the offsets of the writes
    /// it saw acknowledged. Fails if fio completed its pass (nothing was in flight at the
    /// kill) or saw no write acknowledged.
    pub fn acknowledged_after_server_died(mut self) -> Vec<u64> {
        let round = self.round;
        let Some(status) = self.exited_within(Duration::from_secs(120)) else {
            // Everything that could tell why, before the kill: where each of fio's threads
            // sleeps, what its descriptors are, the state of its Unix sockets.
            let pid = self.child.id();
            let diag = std::process::Command::new("sh")
                    .arg("-c")
                    .arg(format!(
                        "for t in /proc/{pid}/task/*; do echo \"$t $(cat $t/comm) $(cat $t/wchan) $(cut -d' ' -f3 $t/stat)\"; done; \
                         ls -l /proc/{pid}/fd; ss -xp | grep 'pid={pid},' || true"
                    ))
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default();
            let _ = self.child.kill();
            let err = self.stderr_text();
            let from = err.char_indices().rev().nth(1999).map_or(0, |(i, _)| i);
            panic!(
                    "round {round}: fio still running 120 s after its server was killed\n{diag}\n{} bytes on stderr, ending:\n{}",
                    err.len(),
                    &err[from..]
                );
        };
        let stderr = self.stderr_text();
        assert!(
            !status.success(),
            "round {round}: fio completed its pass before the kill, so nothing was in flight \
             when the server died; stderr:\n{stderr}"
        );
        let path = self.log.with_file_name(format!("fio-{round}_clat.1.log"));
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("fio wrote no completion log {}: {e}", path.display()));
        // "time, latency, direction, size, offset, priority"; direction 1 is a write.
        let acked: Vec<u64> = text
            .lines()
            .map(|l| {
                let f: Vec<&str> = l.split(',').map(str::trim).collect();
                assert!(
                    f.len() >= 5 && f[2] == "1" && f[3] == "4096",
                    "unexpected fio log line {l:?}"
                );
                f[4].parse()
                    .unwrap_or_else(|e| panic!("fio log line {l:?}: {e}"))
            })
            .collect();
        assert!(
            !acked.is_empty(),
            "round {round}: no write acknowledged before the kill"
        );
        eprintln!(
            "round {round}: fio saw {} writes acknowledged at QD32 before: {}",
            acked.len(),
            stderr.lines().next().unwrap_or("")
        );
        acked
    }
}

/// Every 4 KiB write at `acked` is on the Primary's disk `a` (its block changed since
/// `before`, the image before the round) and, when `b` is given, the same on the Secondary's.
pub fn assert_acknowledged_on_both(
    acked: &[u64],
    before: &[u8],
    a: &[u8],
    b: Option<&[u8]>,
    round: u32,
) {
    for off in acked {
        let r = *off as usize..*off as usize + 4096;
        assert!(
            a[r.clone()] != before[r.clone()],
            "round {round}: acknowledged write at {off} is not on the primary's own disk"
        );
        assert!(
            b.is_none_or(|b| b[r.clone()] == a[r]),
            "round {round}: acknowledged write at {off} missing on the secondary ({} acknowledged)",
            acked.len()
        );
    }
}

/// Three crash rounds against a connected pair (`a` Primary, `b` Secondary, both in sync, data
/// `size` bytes): fio (one [`FioPass`]) through `a`; after 300-1000 ms, when `cut` is given,
/// `cut(true)` and 50-150 ms more; `a` SIGKILLed; every write fio saw acknowledged checked on
/// `a`, and on `b` when `acked_on_peer`; `cut(false)`; `a` restarted as Primary until in sync
/// (at most `in_sync`). The moments come from `seed`.
#[allow(clippy::too_many_arguments)]
pub fn fio_kill_rounds(
    a: &mut MirrorNode,
    b: &MirrorNode,
    size: u64,
    dir: &Path,
    seed: u64,
    acked_on_peer: bool,
    mut cut: Option<&mut dyn FnMut(bool)>,
    in_sync: Duration,
) {
    let mut next = xorshift(seed);
    for round in 0..3 {
        let before = b.data(size);
        let sent = a.counter("data_bytes_sent");
        let fio = FioPass::start(a, size, next() >> 32, dir, round);
        // The random moment counts from fio's first write reaching the mirror, not from
        // fio's start: on a loaded machine fio took longer than the shortest delay to connect,
        // and the kill then came before any write was acknowledged.
        a.wait_for("fio's first write sent", Duration::from_secs(30), |s| {
            s["counters"]["data_bytes_sent"].as_u64().unwrap_or(0) > sent
        });
        std::thread::sleep(Duration::from_millis(300 + next() % 700));
        if let Some(cut) = cut.as_mut() {
            cut(true);
            std::thread::sleep(Duration::from_millis(50 + next() % 100));
        }
        a.kill();
        let acked = fio.acknowledged_after_server_died();
        let img_b = acked_on_peer.then(|| b.data(size));
        assert_acknowledged_on_both(&acked, &before, &a.data(size), img_b.as_deref(), round);
        if let Some(cut) = cut.as_mut() {
            cut(false);
        }
        a.start(&["--primary"]);
        a.wait_connected_in_sync(in_sync);
    }
}
