//! Opt-in: attaches a real /dev/nbdN to `twinvol export`, puts ext4 on it, and checks that
//! what was written survives unmount, fsck and detach.
//!
//! Runs only with `TWINVOL_KERNEL_NBD=1`, as root, on a kernel with the nbd module loaded
//! (`modprobe nbd`), with e2fsprogs installed. The device defaults to /dev/nbd0; set
//! `TWINVOL_NBD_DEVICE=/dev/nbdN` to use another. See docs/KERNEL.md.
//!
//! Without `TWINVOL_KERNEL_NBD=1` it prints why it is skipped and returns: the CI machine's
//! kernel has no nbd module. The netlink messages and ioctl codes are unit-tested everywhere
//! (`cargo test --lib nbd::kernel`).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const TWINVOL: &str = env!("CARGO_BIN_EXE_twinvol");
const VOLUME_SIZE: u64 = 256 << 20;

/// Runs a command to completion; panics with its output when it fails.
fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e} (is it installed?)"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "`{program} {}` failed ({}):\n{text}",
        args.join(" "),
        out.status
    );
    text
}

/// Polls `cond` every 100 ms until it holds or `limit` passes.
fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The device's size in 512-byte sectors as the block layer sees it (0 when not attached).
fn sectors(device: &Path) -> u64 {
    let name = device
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("nbd0");
    fs::read_to_string(format!("/sys/block/{name}/size"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// Undoes whatever was set up, in reverse order, even when an assertion fails midway.
struct Cleanup {
    device: PathBuf,
    mountpoint: PathBuf,
    mounted: bool,
    attached: bool,
    attach: Option<Child>,
    export: Option<Child>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if self.mounted {
            let _ = Command::new("umount").arg(&self.mountpoint).status();
        }
        if self.attached {
            let _ = Command::new(TWINVOL)
                .arg("detach")
                .arg(&self.device)
                .status();
        }
        for child in [self.attach.as_mut(), self.export.as_mut()]
            .into_iter()
            .flatten()
        {
            if let Ok(None) = child.try_wait() {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }
}

/// Waits up to `limit` for a child to exit by itself; returns whether it did.
fn exits_within(child: &mut Child, limit: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Ok(Some(_)) = child.try_wait() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

#[test]
fn ext4_on_attached_nbd_device_survives_umount_fsck_and_detach() {
    if std::env::var("TWINVOL_KERNEL_NBD").as_deref() != Ok("1") {
        eprintln!(
            "SKIPPED kernel_nbd: this kernel has no nbd module (set TWINVOL_KERNEL_NBD=1 on a machine \
             where `modprobe nbd` works and /dev/nbd0 exists, as root, to run it)"
        );
        return;
    }
    let device =
        PathBuf::from(std::env::var("TWINVOL_NBD_DEVICE").unwrap_or_else(|_| "/dev/nbd0".into()));
    assert!(
        device.exists(),
        "{} does not exist: run `modprobe nbd`",
        device.display()
    );
    assert_eq!(
        sectors(&device),
        0,
        "{} is already in use: detach it first",
        device.display()
    );

    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("volume.img");
    let socket = dir.path().join("export.sock");
    let mountpoint = dir.path().join("mnt");
    fs::create_dir(&mountpoint).unwrap();
    fs::File::create(&backing)
        .unwrap()
        .set_len(VOLUME_SIZE)
        .unwrap();

    let mut cleanup = Cleanup {
        device: device.clone(),
        mountpoint: mountpoint.clone(),
        mounted: false,
        attached: false,
        attach: None,
        export: None,
    };

    // 1. The export, in the background.
    cleanup.export = Some(
        Command::new(TWINVOL)
            .arg("export")
            .arg(&backing)
            .arg("--socket")
            .arg(&socket)
            .stdin(Stdio::null())
            .spawn()
            .expect("start twinvol export"),
    );
    wait_for("the export socket", Duration::from_secs(10), || {
        socket.exists()
    });

    // 2. Attach. `twinvol attach` may return once the kernel holds the socket (netlink) or
    //    keep running while the device is attached (ioctl fallback): both are fine.
    cleanup.attach = Some(
        Command::new(TWINVOL)
            .arg("attach")
            .arg(&socket)
            .arg(&device)
            .stdin(Stdio::null())
            .spawn()
            .expect("start twinvol attach"),
    );
    cleanup.attached = true;
    wait_for(
        "the device to get its size",
        Duration::from_secs(20),
        || sectors(&device) > 0,
    );
    assert_eq!(
        sectors(&device) * 512,
        VOLUME_SIZE,
        "the device size must be the export size"
    );
    if let Some(Some(status)) = cleanup.attach.as_mut().map(|c| c.try_wait().ok().flatten()) {
        assert!(status.success(), "twinvol attach exited with {status}");
    }

    let dev = device.to_str().unwrap();
    let mnt = mountpoint.to_str().unwrap();

    // 3. A filesystem, files written through it.
    run("mkfs.ext4", &["-q", "-F", dev]);
    run("mount", &[dev, mnt]);
    cleanup.mounted = true;
    let payload: Vec<u8> = (0..8u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    {
        let mut f = fs::File::create(mountpoint.join("payload.bin")).unwrap();
        f.write_all(&payload).unwrap();
        f.sync_all().unwrap();
    }
    fs::write(
        mountpoint.join("hello.txt"),
        b"twinvol over the kernel nbd client\n",
    )
    .unwrap();
    run("sync", &[]);
    run("umount", &[mnt]);
    cleanup.mounted = false;

    // 4. The filesystem is clean.
    run("fsck.ext4", &["-f", "-n", dev]);

    // 5. Mounted again, the files read back identical.
    run("mount", &["-o", "ro", dev, mnt]);
    cleanup.mounted = true;
    assert_eq!(fs::read(mountpoint.join("payload.bin")).unwrap(), payload);
    assert_eq!(
        fs::read(mountpoint.join("hello.txt")).unwrap(),
        b"twinvol over the kernel nbd client\n"
    );
    run("umount", &[mnt]);
    cleanup.mounted = false;

    // 6. Detach: the device goes away, and `twinvol attach` (if still running) exits cleanly.
    run(TWINVOL, &["detach", dev]);
    cleanup.attached = false;
    wait_for("the device to detach", Duration::from_secs(20), || {
        sectors(&device) == 0
    });
    if let Some(attach) = cleanup.attach.as_mut() {
        assert!(
            exits_within(attach, Duration::from_secs(20)),
            "twinvol attach did not exit after detach"
        );
        let status = attach.wait().unwrap();
        assert!(
            status.success(),
            "twinvol attach exited with {status} after detach"
        );
    }

    // 7. The data reached the backing file: the ext4 superblock magic (0xEF53 at byte 1080).
    let image = fs::read(&backing).unwrap();
    assert_eq!(
        &image[1080..1082],
        &[0x53, 0xef],
        "no ext4 superblock in the backing file"
    );
}
