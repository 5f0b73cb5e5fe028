//! Disk errors on either leg of a `twinvol mirror` pair, injected by a FUSE file system that
//! fails writes, reads or fsync on command (tests/support/faultyfs.py): the Primary's failing
//! disk is detached and the peer serves everything (or the error reaches the application with
//! `on_disk_error = "pass-through"`); a Secondary whose flush fails is Outdated and resynced.

mod common;

use std::time::Duration;

use common::mirror_node::{pattern, Client};
use common::mirror_pair::{device_on_faulty_fs, pair, start_in_sync, IN_SYNC};
use common::scratch;

const MIB: u64 = 1024 * 1024;

#[test]
fn a_primary_whose_disk_fails_detaches_and_the_peer_serves_every_read_and_write() {
    let dir = scratch();
    let d = dir.path();
    let (mut a, mut b) = pair(d, "", "");
    let fs = device_on_faulty_fs(&a, &d.join("faulty"));
    let size = start_in_sync(&mut a, &mut b);
    let mut c = Client::connect(&a);
    for i in 0..8u64 {
        c.write(i * MIB, &pattern(500 + i, MIB as usize)).unwrap();
    }
    c.flush().unwrap();
    // a's disk fails every write, read and fsync from now on.
    fs.fail("all");
    for i in 8..16u64 {
        c.write(i * MIB, &pattern(500 + i, MIB as usize))
            .unwrap_or_else(|e| {
                panic!(
                    "write {i} reached the application as an error: {e}\n{}",
                    a.log_text()
                )
            });
    }
    c.flush().expect("the flush is served by the peer");
    for i in 0..16u64 {
        let got = c
            .read(i * MIB, MIB as u32)
            .expect("the read is served by the peer");
        assert!(
            got == pattern(500 + i, MIB as usize),
            "MiB {i} read back wrong"
        );
    }
    drop(c);
    let sa = a.wait_for("a detached", Duration::from_secs(10), |s| {
        s["disk"] == "detached"
    });
    assert!(
        sa["counters"]["local_disk_errors"].as_u64().unwrap() >= 1,
        "{sa:#}"
    );
    assert!(
        sa["detached"].as_str().unwrap().contains("failed"),
        "{sa:#}"
    );
    assert_eq!(a.error_lines("DETACHED"), 1, "said once:\n{}", a.log_text());
    assert!(
        b.log_text().contains("the Primary's disk is detached"),
        "b records that it alone holds the writes:\n{}",
        b.log_text()
    );
    // The disk is replaced; the service moves to b, and a's copy is resynced from b.
    fs.fail("none");
    a.stop();
    b.stop();
    b.start(&["--primary"]);
    a.start(&["--secondary"]);
    b.wait_connected_in_sync(IN_SYNC);
    a.wait_for("a resynced", IN_SYNC, |s| s["disk"] == "up-to-date");
    a.stop();
    b.stop();
    assert_eq!(
        a.data_checksum(size),
        b.data_checksum(size),
        "copies differ"
    );
    let got = a.data(16 * MIB);
    for i in 0..16u64 {
        let at = (i * MIB) as usize;
        assert!(
            got[at..at + MIB as usize] == pattern(500 + i, MIB as usize)[..],
            "MiB {i} differs on a's own copy after the resync"
        );
    }
}

#[test]
fn with_pass_through_a_primary_disk_error_reaches_the_application() {
    let dir = scratch();
    let d = dir.path();
    let (mut a, mut b) = pair(d, "on_disk_error = \"pass-through\"", "");
    let fs = device_on_faulty_fs(&a, &d.join("faulty"));
    start_in_sync(&mut a, &mut b);
    let mut c = Client::connect(&a);
    c.write(0, &pattern(1, 4096)).unwrap();
    fs.fail("write");
    assert!(
        c.write(4096, &pattern(2, 4096)).is_err(),
        "the write must fail with pass-through"
    );
    drop(c);
    let sa = a.wait_for("the error counted", Duration::from_secs(5), |s| {
        s["counters"]["local_disk_errors"].as_u64().unwrap_or(0) >= 1
    });
    assert_eq!(sa["disk"], "up-to-date", "not detached: {sa:#}");
    assert_eq!(
        a.error_lines("cannot be detached"),
        1,
        "said once, with the reason:\n{}",
        a.log_text()
    );
    fs.fail("none");
}

#[test]
fn a_secondary_whose_flush_fails_is_outdated_and_resyncs_what_it_acknowledged_since() {
    let dir = scratch();
    let d = dir.path();
    let (mut a, mut b) = pair(d, "", "");
    let fs = device_on_faulty_fs(&b, &d.join("faulty"));
    let size = start_in_sync(&mut a, &mut b);
    let mut c = Client::connect(&a);
    for i in 0..4u64 {
        c.write(i * MIB, &pattern(700 + i, MIB as usize)).unwrap();
    }
    c.flush().unwrap();
    // b acknowledges these writes, then fails to make them durable.
    for i in 4..8u64 {
        c.write(i * MIB, &pattern(700 + i, MIB as usize)).unwrap();
    }
    fs.fail("fsync");
    c.flush().expect("the Primary's own flush succeeds");
    drop(c);
    let sb = b.wait_for("b outdated", Duration::from_secs(10), |s| {
        s["disk"] == "outdated"
    });
    assert!(
        sb["counters"]["local_apply_errors"].as_u64().unwrap() >= 1,
        "{sb:#}"
    );
    a.wait_for(
        "a counts the peer's failed flush",
        Duration::from_secs(5),
        |s| s["counters"]["peer_write_errors"].as_u64().unwrap_or(0) >= 1,
    );
    // The device recovers; b reconnects and gets what it acknowledged since the good flush.
    fs.fail("none");
    let before = a.counter("resync_bytes_sent");
    b.stop();
    b.start(&["--secondary"]);
    a.wait_connected_in_sync(IN_SYNC);
    b.wait_for("b up to date", IN_SYNC, |s| s["disk"] == "up-to-date");
    assert!(
        a.counter("resync_bytes_sent") - before >= 4 * MIB,
        "the unflushed 4 MiB were resynced"
    );
    a.stop();
    b.stop();
    assert_eq!(
        a.data_checksum(size),
        b.data_checksum(size),
        "copies differ"
    );
}
