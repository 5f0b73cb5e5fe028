//! The bring-up's mount step on a real filesystem: an ext4 image on a loop device (root,
//! util-linux losetup/mount, e2fsprogs; fails loudly without them). The kernel-attach half of
//! the step needs /dev/nbd, which this lab kernel lacks: it is covered by the opt-in kernel
//! tests (TWINVOL_KERNEL_NBD=1, tests/kernel_nbd.rs).

use std::path::Path;
use std::process::Command;

use twinvol::cluster::mount::is_mounted;
use twinvol::cluster::volume::{LocalVolume, VolumeControl};

fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{} is needed (scripts/test.sh installs it): {e}", args[0]));
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

struct Loop(String);
impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

#[test]
fn mount_step_mounts_the_filesystem_refuses_a_busy_unmount_and_unmounts_when_free() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("fs.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    sh(&["mkfs.ext4", "-q", "-F", img.to_str().unwrap()]);
    let dev = Loop(sh(&["losetup", "--find", "--show", img.to_str().unwrap()]));
    let mnt = dir.path().join("mnt");
    let data = dir.path().join("data.img");
    std::fs::File::create(&data)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let text = format!(
        "[node]\nid = \"a\"\n[[volume]]\nname = \"data\"\ndevice = \"{}\"\nengine = \"sync\"\ncache = \"writeback\"\n[volume.export]\nsocket = \"{}\"\n[volume.mount]\npath = \"{}\"\nfstype = \"ext4\"\noptions = \"noatime\"\nsource = \"{}\"\n",
        data.display(),
        dir.path().join("data.sock").display(),
        mnt.display(),
        dev.0
    );
    let cfg = twinvol::config::Config::parse(Path::new("t.toml"), &text)
        .unwrap()
        .volumes
        .remove(0);
    let mut v = LocalVolume::new(cfg);
    v.promote(false).unwrap();
    v.start_export().unwrap();
    let detail = v.mount().unwrap().expect("a mount is configured");
    assert!(
        detail.contains("mounted") && detail.contains("ext4"),
        "{detail}"
    );
    assert!(is_mounted(&mnt));
    std::fs::write(mnt.join("hello"), b"world").unwrap();
    assert_eq!(
        v.mount().unwrap().map(|_| is_mounted(&mnt)),
        Some(true),
        "mount is idempotent"
    );

    // A process working inside the filesystem keeps it busy: no forced or lazy unmount.
    let mut busy = Command::new("sleep")
        .arg("30")
        .current_dir(&mnt)
        .spawn()
        .unwrap();
    let e = v.unmount().unwrap_err().to_string();
    assert!(e.contains("fuser -vm"), "{e}");
    assert!(is_mounted(&mnt), "still mounted after a refused unmount");
    busy.kill().unwrap();
    busy.wait().unwrap();

    let detail = v.unmount().unwrap().unwrap();
    assert!(detail.contains("unmounted"), "{detail}");
    assert!(!is_mounted(&mnt));
    assert_eq!(
        v.unmount().unwrap().as_deref(),
        Some("nothing was mounted or attached"),
        "unmount is idempotent"
    );
    v.stop_export().unwrap();
    v.demote().unwrap();
    // The data written through the mount is on the filesystem image.
    v.promote(false).unwrap();
    v.start_export().unwrap();
    v.mount().unwrap();
    assert_eq!(std::fs::read(mnt.join("hello")).unwrap(), b"world");
    v.unmount().unwrap();
    v.stop_export().unwrap();
}
