//! One owner per device, and a mirrored volume's device never served behind its metadata's
//! back: a second process that opens a device someone serves is refused with the holder's pid;
//! `twinvol export` refuses a device with twinvol metadata unless told how to serve it.

mod common;

use std::process::Command;

use common::{bin, scratch, sh, sparse_file, Export};
use twinvol::cluster::demo::NbdClient;

fn twinvol(args: &[&str]) -> std::process::Output {
    Command::new(bin())
        .args(args)
        .env("TWINVOL_LOG", "warn")
        .output()
        .expect("twinvol runs")
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A file-backed volume device with metadata, in sync with its (absent) peer.
fn synced_volume(dir: &std::path::Path) -> String {
    let dev = sparse_file(dir, "vol.img", 32 << 20);
    let d = dev.to_str().unwrap().to_string();
    sh(&format!(
        "{b} create-md --device {d} --granularity 64K && {b} new-current-uuid --clear-bitmap --device {d}",
        b = bin().display()
    ));
    d
}

#[test]
fn a_second_export_of_a_served_device_is_refused_with_the_owners_pid() {
    let d = scratch();
    let dev = sparse_file(d.path(), "plain.img", 8 << 20);
    let first = Export::start(&dev, d.path(), &[]);
    let sock = d.path().join("second.sock");
    let out = twinvol(&[
        "export",
        dev.to_str().unwrap(),
        "--socket",
        sock.to_str().unwrap(),
    ]);
    assert!(!out.status.success(), "a second owner must be refused");
    let e = stderr(&out);
    assert!(e.contains("already in use by pid"), "{e}");
    assert!(e.contains("plain.img"), "names the device: {e}");
    assert!(!sock.exists(), "the second export never listened");
    // The first one is untouched and still serves.
    let mut c = NbdClient::connect(&first.socket).expect("the first export still serves");
    c.write(0, &[7; 4096]).unwrap();
    assert!(first.stop().success());
}

#[test]
fn metadata_writers_are_refused_while_the_device_is_served() {
    let d = scratch();
    let dev = synced_volume(d.path());
    let e = Export::start(
        std::path::Path::new(&dev),
        d.path(),
        &["--degraded-primary"],
    );
    for args in [
        vec!["create-md", "--force", "--device", &dev],
        vec!["new-current-uuid", "--clear-bitmap", "--device", &dev],
    ] {
        let out = twinvol(&args);
        assert!(!out.status.success(), "{args:?} must be refused");
        assert!(
            stderr(&out).contains("already in use by pid"),
            "{args:?}: {}",
            stderr(&out)
        );
    }
    assert!(e.stop().success());
    let out = twinvol(&["show-md", "--device", &dev]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn export_refuses_a_device_that_holds_twinvol_metadata_and_names_the_ways_to_serve_it() {
    let d = scratch();
    let dev = synced_volume(d.path());
    let sock = d.path().join("x.sock");
    let out = twinvol(&["export", &dev, "--socket", sock.to_str().unwrap()]);
    assert!(!out.status.success());
    let e = stderr(&out);
    assert!(e.contains("holds twinvol metadata"), "{e}");
    for fix in ["twinvol run", "--read-only", "--degraded-primary"] {
        assert!(e.contains(fix), "names `{fix}`: {e}");
    }
    assert!(!sock.exists());
}

#[test]
fn a_read_only_export_of_a_volume_device_serves_its_data_area_only() {
    let d = scratch();
    let dev = synced_volume(d.path());
    let show = String::from_utf8_lossy(&twinvol(&["show-md", "--device", &dev, "--json"]).stdout)
        .into_owned();
    let v: serde_json::Value = serde_json::from_str(&show).unwrap();
    let data_size = v["superblock"]["data_size"].as_u64().expect("data_size");
    assert!(data_size < 32 << 20, "the metadata takes the tail");
    let e = Export::start(std::path::Path::new(&dev), d.path(), &["--read-only"]);
    let c = NbdClient::connect(&e.socket).unwrap();
    assert_eq!(c.size, data_size, "the metadata area is not exported");
    drop(c);
    assert!(e.stop().success());
}

#[test]
fn a_degraded_primary_export_records_every_write_in_the_bitmap_under_a_new_generation() {
    let d = scratch();
    let fresh = sparse_file(d.path(), "fresh.img", 32 << 20);
    let f = fresh.to_str().unwrap();
    sh(&format!("{} create-md --device {f}", bin().display()));
    let sock = d.path().join("fresh.sock");
    let out = twinvol(&[
        "export",
        f,
        "--degraded-primary",
        "--socket",
        sock.to_str().unwrap(),
    ]);
    assert!(!out.status.success(), "a never-synced copy is not served");
    assert!(stderr(&out).contains("never synced"), "{}", stderr(&out));

    let dev = synced_volume(d.path());
    let before: serde_json::Value =
        serde_json::from_slice(&twinvol(&["show-md", "--device", &dev, "--json"]).stdout).unwrap();
    let e = Export::start(
        std::path::Path::new(&dev),
        d.path(),
        &["--degraded-primary"],
    );
    let mut c = NbdClient::connect(&e.socket).unwrap();
    c.write(1 << 20, &[0xab; 4096]).unwrap();
    c.write(5 << 20, &[0xcd; 8192]).unwrap();
    c.flush().unwrap();
    drop(c);
    let log = e.log.clone();
    assert!(
        e.stop().success(),
        "{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
    let after: serde_json::Value =
        serde_json::from_slice(&twinvol(&["show-md", "--device", &dev, "--json"]).stdout).unwrap();
    assert_ne!(
        after["superblock"]["gen"]["current"], before["superblock"]["gen"]["current"],
        "a new generation"
    );
    assert_eq!(
        after["superblock"]["gen"]["bitmap"], before["superblock"]["gen"]["current"],
        "the bitmap tracks what the peer (still at the old generation) lacks"
    );
    let bitmap =
        String::from_utf8_lossy(&twinvol(&["dump-bitmap", "--device", &dev]).stdout).into_owned();
    // 64 KiB chunks: the two writes dirty the chunks at 1 MiB and 5 MiB.
    let dirty: Vec<&str> = bitmap.lines().filter(|l| !l.starts_with('#')).collect();
    assert!(dirty.iter().any(|l| l.starts_with("1048576 ")), "{bitmap}");
    assert!(dirty.iter().any(|l| l.starts_with("5242880 ")), "{bitmap}");
}
