//! A pair of `twinvol mirror` nodes as the mirror suites set them up: node "a" on 127.0.0.1
//! (listens) and "b" on 127.0.0.2 (connects), their devices, and file systems that make a
//! device fail on command (a full tmpfs, or [`FaultyFs`]).

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::mirror_node::{write_key, Client, MirrorNode};
use super::sh;

const MIB: u64 = 1024 * 1024;
/// Device size of the mirror suites' pairs.
pub const DEV: u64 = 64 * MIB;

type Node = MirrorNode;

/// How long a pair may take to connect and settle.
pub const IN_SYNC: Duration = Duration::from_secs(60);

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Node `name` on 127.0.0.x (`address`), replicating with `peer` at `peer_addr`.
pub fn node(
    dir: &Path,
    (name, peer): (&'static str, &'static str),
    (address, peer_addr): (SocketAddr, SocketAddr),
    key: &Path,
    dev_size: u64,
    extra: &str,
) -> Node {
    let replication = format!(
        r#"address = "{address}"
peer = "{peer_addr}"
peer_id = "{peer}"
key_file = "{key}"
ping_timeout_secs = 2
{extra}"#,
        key = key.display()
    );
    MirrorNode::create(dir, name, dev_size, &replication, None)
}

/// Two nodes "a" (127.0.0.1, listens) and "b" (127.0.0.2, connects) on fresh [`DEV`]-byte
/// devices that skip the initial sync (both zero, same generation).
pub fn pair(dir: &Path, extra_a: &str, extra_b: &str) -> (Node, Node) {
    pair_sized(dir, DEV, extra_a, extra_b)
}

/// [`pair`] on devices of `dev_size` bytes.
pub fn pair_sized(dir: &Path, dev_size: u64, extra_a: &str, extra_b: &str) -> (Node, Node) {
    let k = write_key(dir);
    let (a, b) = pair_of(dir, (&k, &k), (dev_size, dev_size), (extra_a, extra_b));
    for n in [&a, &b] {
        n.skip_initial_sync();
    }
    (a, b)
}

/// Nodes "a" (127.0.0.1, listens) and "b" (127.0.0.2, connects), each with its own key file,
/// device size and extra replication settings, on fresh devices (no initial sync skipped).
pub fn pair_of(
    dir: &Path,
    (key_a, key_b): (&Path, &Path),
    (size_a, size_b): (u64, u64),
    (extra_a, extra_b): (&str, &str),
) -> (Node, Node) {
    let a_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let b_addr: SocketAddr = format!("127.0.0.2:{}", free_port()).parse().unwrap();
    let a = node(dir, ("a", "b"), (a_addr, b_addr), key_a, size_a, extra_a);
    let b = node(dir, ("b", "a"), (b_addr, a_addr), key_b, size_b, extra_b);
    (a, b)
}

/// Starts b as Secondary and a as Primary, waits until they are in sync; returns the data size.
pub fn start_in_sync(a: &mut Node, b: &mut Node) -> u64 {
    b.start(&["--secondary"]);
    a.start(&["--primary"]);
    a.wait_connected_in_sync(IN_SYNC);
    data_size(a)
}

pub fn data_size(node: &Node) -> u64 {
    let c = Client::connect(node);
    c.export.size
}

pub struct SmallFs(std::path::PathBuf);

impl SmallFs {
    pub fn mount(dir: &Path, size: &str) -> SmallFs {
        std::fs::create_dir_all(dir).unwrap();
        sh(&format!(
            "mount -t tmpfs -o size={size} twinvol-test {}",
            dir.display()
        ));
        SmallFs(dir.to_path_buf())
    }

    pub fn resize(&self, size: &str) {
        sh(&format!(
            "mount -o remount,size={size} {}",
            self.0.display()
        ));
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Moves `node`'s device onto a fresh tmpfs of `size` at `dir` (the device path becomes a
/// symlink): its sparse data region fills up after about `size` of writes and every further
/// write fails with ENOSPC, as a failing disk would fail them.
pub fn device_on_small_fs(node: &Node, dir: &Path, size: &str) -> SmallFs {
    let small = SmallFs::mount(dir, size);
    let img = small.0.join("device.img");
    sh(&format!(
        "cp --sparse=always {} {}",
        node.device.display(),
        img.display()
    ));
    std::fs::remove_file(&node.device).unwrap();
    std::os::unix::fs::symlink(&img, &node.device).unwrap();
    small
}

/// A FUSE file system (tests/support/faultyfs.py) that passes a backing directory through and
/// fails writes, reads or fsync on command; unmounted on drop.
pub struct FaultyFs {
    /// Where it is mounted.
    pub mount: PathBuf,
    child: Child,
}

impl FaultyFs {
    /// Mounts it at `dir/mnt` over `dir/backing`.
    pub fn mount(dir: &Path) -> FaultyFs {
        let venv = std::env::var("TWINVOL_VENV")
            .map(PathBuf::from)
            .unwrap_or_else(|_| {
                PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/twinvol-venv")
            });
        let python = venv.join("bin/python");
        assert!(
            python.exists(),
            "{} is missing: run scripts/test-deps.sh (it installs fusepy)",
            python.display()
        );
        let (backing, mount) = (dir.join("backing"), dir.join("mnt"));
        std::fs::create_dir_all(&backing).unwrap();
        std::fs::create_dir_all(&mount).unwrap();
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/support/faultyfs.py");
        let child = Command::new(python)
            .arg(script)
            .arg(&backing)
            .arg(&mount)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("faultyfs.log")).unwrap())
            .spawn()
            .expect("start faultyfs.py");
        let fs = FaultyFs { mount, child };
        let t0 = Instant::now();
        while !fs.mount.join(".faults").exists() {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "faultyfs did not mount: {}",
                std::fs::read_to_string(dir.join("faultyfs.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        fs
    }

    /// Sets the faults: "none", or any of "write", "read", "fsync", or "all".
    pub fn fail(&self, words: &str) {
        std::fs::write(self.mount.join(".faults"), words).unwrap();
    }
}

impl Drop for FaultyFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Moves `node`'s device into a [`FaultyFs`] at `dir` (the device path becomes a symlink).
pub fn device_on_faulty_fs(node: &Node, dir: &Path) -> FaultyFs {
    let fs = FaultyFs::mount(dir);
    let img = fs.mount.join("device.img");
    sh(&format!(
        "cp --sparse=always {} {}",
        node.device.display(),
        img.display()
    ));
    std::fs::remove_file(&node.device).unwrap();
    std::os::unix::fs::symlink(&img, &node.device).unwrap();
    fs
}
