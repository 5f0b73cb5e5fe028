//! Two nodes of a mirrored volume as two `twinvol mirror` processes over loopback
//! (127.0.0.1 and 127.0.0.2): acknowledged writes survive a SIGKILL of the primary on the
//! secondary's disk (one writer at a time, and fio at queue depth 32), a reconnect copies only dirty regions, a bit-flipping link never corrupts
//! a disk, and split brain is refused or resolved exactly as the policy says.

mod common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::mirror_node::{
    fio_kill_rounds, key_file, pattern, write_key, xorshift, Client, FioPass, MirrorNode, FIO_DEV,
};
use common::mirror_pair::{
    data_size, device_on_small_fs, free_port, node, pair, pair_of, pair_sized, start_in_sync, DEV,
    IN_SYNC,
};
use common::{bin, scratch, sh};

const MIB: u64 = 1024 * 1024;

type Node = MirrorNode;

#[test]
fn every_acknowledged_sync_write_is_on_the_secondary_after_the_primary_is_sigkilled() {
    let dir = scratch();
    let (mut a, mut b) = pair(dir.path(), "", "");
    let size = start_in_sync(&mut a, &mut b);
    let slots = size / 4096;
    let mut next = xorshift(0x1234_5678);
    let mut seed = 1u64;
    for round in 0..4 {
        // Each round writes distinct 4 KiB slots (a slot is written once per round), so the
        // secondary must hold exactly the logged pattern for every acknowledged write.
        let acked: Arc<std::sync::Mutex<Vec<(u64, u64)>>> = Default::default();
        let stop = Arc::new(AtomicBool::new(false));
        let first_slot = round * (slots / 4);
        let writer = {
            let acked = acked.clone();
            let stop = stop.clone();
            let mut c = Client::connect(&a);
            let base_seed = seed;
            std::thread::spawn(move || {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) && i < slots / 4 {
                    let off = (first_slot + i) * 4096;
                    let s = base_seed + i;
                    match c.write(off, &pattern(s, 4096)) {
                        Ok(()) => acked.lock().unwrap().push((off, s)),
                        Err(_) => break,
                    }
                    i += 1;
                }
            })
        };
        std::thread::sleep(Duration::from_millis(100 + next() % 700));
        a.kill();
        stop.store(true, Ordering::Relaxed);
        writer.join().unwrap();
        let acked = acked.lock().unwrap().clone();
        assert!(
            !acked.is_empty(),
            "round {round}: no write was acknowledged before the kill"
        );
        seed += slots;
        let img = b.data(size);
        for (off, s) in &acked {
            let want = pattern(*s, 4096);
            assert!(
                img[*off as usize..*off as usize + 4096] == want[..],
                "round {round}: acknowledged write at {off} missing on the secondary ({} acked)",
                acked.len()
            );
        }
        eprintln!(
            "round {round}: {} acknowledged writes all on the secondary",
            acked.len()
        );
        // Bring the primary back (it crashed as primary: its activity-log extents resync).
        a.start(&["--primary"]);
        a.wait_connected_in_sync(IN_SYNC);
    }
    a.stop();
    b.stop();
    assert_eq!(
        a.data(size),
        b.data(size),
        "images differ after the crash rounds resynced"
    );
}

#[test]
fn fio_at_qd32_every_acknowledged_sync_write_is_on_the_secondary_after_the_primary_is_sigkilled() {
    common::require(&["fio"]);
    let dir = scratch();
    let (mut a, mut b) = pair_sized(dir.path(), FIO_DEV, "", "");
    let size = start_in_sync(&mut a, &mut b);
    // What the kernel of node a had already taken from the killed process still reaches
    // node b here (tests/mirror_netns.rs also drops what is on the wire).
    fio_kill_rounds(
        &mut a,
        &b,
        size,
        dir.path(),
        0x9e37_79b9,
        true,
        None,
        IN_SYNC,
    );
    a.stop();
    b.stop();
    assert!(
        a.data_checksum(size) == b.data_checksum(size),
        "images differ after the crash rounds resynced"
    );
}

/// The Secondary dies (SIGKILL) while fio writes at QD32 through the Primary, and comes back
/// while fio still writes: the Primary serves alone meanwhile, then resyncs what the
/// Secondary missed (the writes it had not acknowledged, and those written alone) while the
/// application keeps writing into the same region. At the end the two images are identical.
#[test]
fn fio_at_qd32_through_a_secondary_sigkill_and_a_resync_under_writes_images_end_identical() {
    common::require(&["fio"]);
    let dir = scratch();
    let (mut a, mut b) = pair_sized(dir.path(), FIO_DEV, "", "");
    let size = start_in_sync(&mut a, &mut b);
    for round in 0..3u32 {
        // 16 MiB of 4 KiB writes spread over the whole device.
        let fio = FioPass::start_part(&a, size, 16 * MIB, 77 + u64::from(round), dir.path(), round);
        std::thread::sleep(Duration::from_millis(200 + 150 * u64::from(round)));
        b.kill();
        std::thread::sleep(Duration::from_millis(300));
        b.start(&["--secondary"]);
        fio.finished(Duration::from_secs(120));
        let s = a.wait_connected_in_sync(IN_SYNC);
        eprintln!(
            "round {round}: resync sent {} bytes in all so far",
            s["counters"]["resync_bytes_sent"]
        );
    }
    a.stop();
    b.stop();
    assert!(
        a.data_checksum(size) == b.data_checksum(size),
        "images differ after the secondary's crashes resynced under writes"
    );
}

#[test]
fn reconnect_sends_only_the_dirty_regions_and_images_end_identical() {
    let dir = scratch();
    let (mut a, mut b) = pair(dir.path(), "", "");
    let size = start_in_sync(&mut a, &mut b);
    let mut c = Client::connect(&a);
    c.write(0, &pattern(7, 65536)).unwrap();
    // Cut the link: the secondary dies.
    b.kill();
    a.wait_for("peer lost", Duration::from_secs(10), |s| {
        s["connection"]["state"] != "connected"
    });
    // 40 scattered 4 KiB writes while disconnected: 40 dirty 64 KiB chunks at most.
    let before = a.status()["counters"]["resync_bytes_sent"]
        .as_u64()
        .unwrap();
    for i in 0..40u64 {
        c.write(i * (size / 40) + 8192, &pattern(100 + i, 4096))
            .unwrap();
    }
    c.flush().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let dirty = a.status()["rpo_bytes"].as_u64().unwrap();
    // 40 chunks written apart, plus at most the activity-log extents in flight at the cut.
    assert!(
        (40 * 65536..=48 * 65536).contains(&dirty),
        "dirty bytes {dirty}"
    );
    b.start(&["--secondary"]);
    let s = a.wait_connected_in_sync(IN_SYNC);
    let sent = s["counters"]["resync_bytes_sent"].as_u64().unwrap() - before;
    eprintln!("dirty {dirty} bytes, resync sent {sent} bytes of a {size} byte device");
    assert!(
        sent >= 40 * 4096 && sent <= dirty && sent < size / 20,
        "resync sent {sent} bytes for {dirty} dirty bytes"
    );
    drop(c);
    a.stop();
    b.stop();
    assert!(
        a.data(size) == b.data(size),
        "images differ after the resync"
    );
}

/// A TCP proxy from `listen` to `to`, binding its outgoing side to `from_ip`, that flips one
/// bit in the primary->secondary direction every `every` bytes after the first `skip`.
fn bit_flip_proxy(
    listen: SocketAddr,
    to: SocketAddr,
    from_ip: &str,
    skip: u64,
    every: u64,
    flips: Arc<AtomicU64>,
) {
    let l = TcpListener::bind(listen).unwrap();
    let from_ip = from_ip.to_string();
    std::thread::spawn(move || {
        for client in l.incoming() {
            let Ok(client) = client else { continue };
            let sock =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            sock.bind(&format!("{from_ip}:0").parse::<SocketAddr>().unwrap().into())
                .unwrap();
            if sock.connect(&to.into()).is_err() {
                continue;
            }
            let server: TcpStream = sock.into();
            let (mut c2, mut s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            // secondary (client side) -> primary: untouched.
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut c2, &mut s2);
                let _ = s2.shutdown(std::net::Shutdown::Write);
            });
            // primary -> secondary: flip bits.
            let flips = flips.clone();
            let (mut s3, mut c3) = (server, client);
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                let mut seen = 0u64;
                let mut next_flip = skip + every;
                loop {
                    let n = match s3.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if seen + n as u64 > next_flip {
                        let i = (next_flip - seen) as usize;
                        buf[i] ^= 0x10;
                        flips.fetch_add(1, Ordering::Relaxed);
                        next_flip += every;
                    }
                    seen += n as u64;
                    if c3.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = c3.shutdown(std::net::Shutdown::Write);
            });
        }
    });
}

#[test]
fn bit_flips_on_the_link_never_reach_a_disk_and_the_stream_recovers() {
    let dir = scratch();
    let k = write_key(dir.path());
    let a_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let b_addr: SocketAddr = format!("127.0.0.2:{}", free_port()).parse().unwrap();
    let proxy: SocketAddr = format!("127.0.0.3:{}", free_port()).parse().unwrap();
    // b connects to the proxy, which connects to a from b's IP (a accepts only its peer's IP).
    let mut a = node(dir.path(), ("a", "b"), (a_addr, b_addr), &k, DEV, "");
    let mut b = node(dir.path(), ("b", "a"), (b_addr, proxy), &k, DEV, "");
    for n in [&a, &b] {
        sh(&format!(
            "{} new-current-uuid --clear-bitmap --uuid 1234abcd --device {}",
            bin().display(),
            n.device.display()
        ));
    }
    let flips = Arc::new(AtomicU64::new(0));
    bit_flip_proxy(
        proxy,
        a_addr,
        "127.0.0.2",
        64 * 1024,
        8 * MIB,
        flips.clone(),
    );
    b.start(&["--secondary"]);
    a.start(&["--primary"]);
    a.wait_for("connected", Duration::from_secs(30), |s| {
        s["connection"]["state"] == "connected"
    });
    let size = data_size(&a);
    let mut c = Client::connect(&a);
    for i in 0..600u64 {
        let off = (i * 37 % (size / 65536)) * 65536;
        c.write(off, &pattern(i, 32768)).unwrap();
    }
    c.flush().unwrap();
    assert!(
        flips.load(Ordering::Relaxed) >= 2,
        "the proxy flipped too few bits to test anything"
    );
    // Every flip costs one reconnect and a resync of what was in flight; the stream must settle.
    // Settled = both sides connected, nothing unreplicated, no resync, seen on consecutive
    // polls of one snapshot each (the snapshots lag up to 100 ms and a late flip may still
    // cost a reconnect).
    let settled = || {
        let (sa, sb) = (a.status(), b.status());
        sa["connection"]["state"] == "connected"
            && sa["rpo_bytes"] == 0
            && sa["resync"].is_null()
            && sb["connection"]["state"] == "connected"
            && sb["resync"].is_null()
            && sb["disk"] == "up-to-date"
    };
    let t0 = Instant::now();
    let mut calm = 0;
    while calm < 5 {
        calm = if settled() { calm + 1 } else { 0 };
        if t0.elapsed() > Duration::from_secs(60) {
            let log = b.log_text();
            panic!(
                "the stream did not recover; a: {:#}\nb log tail:\n{}",
                a.status(),
                &log[log.len().saturating_sub(3000)..]
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let corrupt = b.status()["counters"]["corrupt_frames"].as_u64().unwrap();
    assert!(
        corrupt >= 1,
        "the secondary counted no corrupt frame: {:#}",
        b.status()
    );
    drop(c);
    a.stop();
    b.stop();
    assert!(
        a.data(size) == b.data(size),
        "a corrupt frame reached a disk: images differ"
    );
}

#[test]
fn different_keys_are_named_in_both_statuses_logged_once_and_never_shown() {
    let dir = scratch();
    let d = dir.path();
    let (key_a, key_b) = (
        "tv-test-key-AAAA-7f3e9c2b41d85a60",
        "tv-test-key-BBBB-0c6a5e8d27f91b34",
    );
    let (ka, kb) = (
        key_file(d, "a.key", key_a.as_bytes()),
        key_file(d, "b.key", key_b.as_bytes()),
    );
    let (mut a, mut b) = pair_of(d, (&ka, &kb), (DEV, DEV), ("", ""));
    for n in [&a, &b] {
        n.skip_initial_sync();
    }
    // Every log line, down to trace, is checked for the keys below.
    b.start_logging(&["--secondary"], "trace");
    a.start_logging(&["--primary"], "trace");
    // a listens: the peer failed to prove a's key; b connects: a refused b's proof.
    for (n, kind) in [(&a, "auth-failed"), (&b, "auth-rejected")] {
        let s = n.wait_for(
            "three failed attempts named in the status",
            Duration::from_secs(30),
            |s| s["link_error"]["attempts"].as_u64().unwrap_or(0) >= 3,
        );
        let e = &s["link_error"];
        assert_eq!(e["kind"], kind, "{s:#}");
        assert_eq!(e["needs_operator"], true, "{s:#}");
        let m = e["message"].as_str().unwrap();
        assert!(m.contains("replication.key_file"), "{m}");
        assert_eq!(s["connection"]["state"], "connecting", "{s:#}");
        assert_eq!(s["counters"]["connections"], 0, "{s:#}");
    }
    // A write on the Primary reaches only its own disk.
    let mut c = Client::connect(&a);
    let size = c.export.size;
    c.write(0, &pattern(9, 65536)).unwrap();
    c.flush().unwrap();
    drop(c);
    eprintln!("{:#}", b.status()["link_error"]);
    // What an operator sees.
    let out = Command::new(bin())
        .args(["status", "--status-file"])
        .arg(d.join("b.json"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{text}");
    eprintln!("{text}");
    assert!(text.contains("last error ("), "{text}");
    assert!(text.contains("the replication keys differ"), "{text}");
    assert!(
        text.contains("next step: retrying will not fix this"),
        "{text}"
    );
    // Each node logged the problem once at error level, however many attempts failed.
    for n in [&a, &b] {
        let errors = n.error_lines("replication.key_file");
        assert_eq!(
            errors,
            1,
            "{}: {errors} error lines about the key:\n{}",
            n.name,
            n.log_text()
        );
    }
    // Neither key, as text or hex, in any log line, status file or the status text.
    let hex = |k: &str| k.bytes().map(|b| format!("{b:02x}")).collect::<String>();
    let shown = [
        a.log_text(),
        b.log_text(),
        a.status().to_string(),
        b.status().to_string(),
        text,
    ];
    for k in [key_a, key_b] {
        for needle in [k.to_string(), hex(k), k[k.len() - 16..].to_string()] {
            for (i, t) in shown.iter().enumerate() {
                assert!(!t.contains(&needle), "key material in output {i}");
            }
        }
    }
    a.stop();
    b.stop();
    assert!(
        b.data(size).iter().all(|&x| x == 0),
        "b's disk changed without a connection"
    );
    // The same key on b: they connect, and the problem is gone from both statuses.
    key_file(d, "b.key", key_a.as_bytes());
    b.start(&["--secondary"]);
    a.start(&["--primary"]);
    let s = a.wait_connected_in_sync(IN_SYNC);
    assert!(s["link_error"].is_null(), "{s:#}");
    b.wait_for("the link error cleared", Duration::from_secs(10), |s| {
        s["connection"]["state"] == "connected" && s["link_error"].is_null()
    });
    assert_eq!(
        b.data(65536)[..],
        pattern(9, 65536)[..],
        "resynced after the fix"
    );
    a.stop();
    b.stop();
}

#[test]
fn devices_of_different_sizes_never_connect_and_both_statuses_say_why() {
    let dir = scratch();
    let d = dir.path();
    let k = write_key(d);
    let (mut a, mut b) = pair_of(d, (&k, &k), (DEV, 2 * DEV), ("", ""));
    a.start(&["--secondary"]);
    b.start(&["--secondary"]);
    for n in [&a, &b] {
        let s = n.wait_for(
            "the size mismatch in the status",
            Duration::from_secs(30),
            |s| s["link_error"]["needs_operator"] == true,
        );
        let m = s["link_error"]["message"].as_str().unwrap_or_default();
        assert!(m.contains("same device size"), "{s:#}");
        assert_eq!(s["counters"]["connections"], 0, "{s:#}");
        assert_eq!(s["connection"]["state"], "connecting", "{s:#}");
    }
    // Retries come every 2 s, as after a refusal; the log says it once per node.
    std::thread::sleep(Duration::from_secs(3));
    for n in [&a, &b] {
        assert_eq!(
            n.error_lines("same device size"),
            1,
            "{}:\n{}",
            n.name,
            n.log_text()
        );
    }
    a.stop();
    b.stop();
}

/// A tmpfs of a given size mounted on a directory, lazily unmounted when dropped.
#[test]
fn a_secondary_whose_disk_fails_writes_is_outdated_before_the_primary_completes_them() {
    let dir = scratch();
    let d = dir.path();
    let (mut a, mut b) = pair(d, "", "");
    let small = device_on_small_fs(&b, &d.join("small"), "16m");
    let size = start_in_sync(&mut a, &mut b);
    let gen_before = a.status()["current_generation"].clone();
    let mut c = Client::connect(&a);
    for i in 0..32u64 {
        c.write(i * MIB, &pattern(100 + i, MIB as usize))
            .unwrap_or_else(|e| panic!("write {i} failed on the Primary: {e}"));
    }
    c.flush().unwrap();
    drop(c);
    // Every write was acknowledged (sync mode): the counters are final once both status
    // files were rewritten (every 100 ms).
    std::thread::sleep(Duration::from_millis(500));
    let sb = b.status();
    assert_eq!(sb["disk"], "outdated", "{sb:#}");
    let errors_b = sb["counters"]["local_apply_errors"].as_u64().unwrap();
    assert!(errors_b > 0, "{sb:#}");
    let sa = a.status();
    assert_eq!(sa["connection"]["state"], "connected", "{sa:#}");
    assert_eq!(sa["disk"], "up-to-date", "{sa:#}");
    assert_ne!(
        sa["current_generation"], gen_before,
        "a new generation began on the Primary when the peer's copy fell behind"
    );
    assert_eq!(
        sa["counters"]["peer_write_errors"].as_u64().unwrap(),
        errors_b,
        "every failed write reached the Primary as a failure: {sa:#}"
    );
    assert!(
        sa["rpo_bytes"].as_u64().unwrap() > 0 && sa["rpo_seconds"].as_f64().unwrap() > 0.2,
        "the failed writes stay dirty and the RPO clock runs: {sa:#}"
    );
    // One error line per node, however many writes failed.
    for (n, what) in [
        (&a, "the peer failed to store a write"),
        (&b, "this copy failed to store a replicated write"),
    ] {
        let (lines, all, log) = (n.error_lines(what), n.error_lines(""), n.log_text());
        assert_eq!(lines, 1, "{}: {lines} lines of {what:?}:\n{log}", n.name);
        assert_eq!(
            all, 1,
            "{}: {all} error lines for {errors_b} failed writes:\n{log}",
            n.name
        );
    }
    // Both processes stop. The Outdated flag is on b's disk: a restart as Primary is refused.
    a.stop();
    b.stop();
    let out = Command::new(bin())
        .args(["mirror", "--config"])
        .arg(&b.config)
        .arg("--primary")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "b was promoted: {err}");
    assert!(
        err.contains("refusing to promote: this copy is outdated"),
        "{err}"
    );
    // Room on b's disk again: both come back, the dirty regions resync, both copies match.
    small.resize("128m");
    b.start(&["--secondary"]);
    a.start(&["--primary"]);
    let s = a.wait_connected_in_sync(IN_SYNC);
    assert!(
        s["counters"]["resync_bytes_sent"].as_u64().unwrap() >= errors_b * MIB,
        "the failed writes were resynced: {s:#}"
    );
    b.wait_for("b up to date", Duration::from_secs(30), |s| {
        s["disk"] == "up-to-date"
    });
    a.stop();
    b.stop();
    assert_eq!(
        a.data_checksum(size),
        b.data_checksum(size),
        "copies differ"
    );
    let got = b.data(32 * MIB);
    for i in 0..32u64 {
        let at = (i * MIB) as usize;
        assert!(
            got[at..at + MIB as usize] == pattern(100 + i, MIB as usize)[..],
            "MiB {i} differs on b"
        );
    }
}

#[test]
fn a_resync_target_whose_disk_fails_stays_inconsistent_until_a_resync_completes() {
    let dir = scratch();
    let d = dir.path();
    let (mut a, mut b) = pair(d, "", "");
    let small = device_on_small_fs(&b, &d.join("small"), "16m");
    let size = start_in_sync(&mut a, &mut b);
    // 32 MiB written while b is away: the resync when b returns overflows b's 16 MiB.
    b.stop();
    let mut c = Client::connect(&a);
    for i in 0..32u64 {
        c.write(i * MIB, &pattern(200 + i, MIB as usize)).unwrap();
    }
    c.flush().unwrap();
    drop(c);
    b.start(&["--secondary"]);
    let sb = b.wait_for(
        "resync data refused by b's device",
        Duration::from_secs(30),
        |s| s["counters"]["local_apply_errors"].as_u64().unwrap_or(0) > 0 && s["resync"].is_null(),
    );
    // The resync ran to its end, but b lacks regions: it must not call itself up to date.
    std::thread::sleep(Duration::from_millis(500));
    let sb2 = b.status();
    assert_eq!(sb2["disk"], "inconsistent", "{sb:#}\n{sb2:#}");
    let sa = a.status();
    assert!(sa["rpo_bytes"].as_u64().unwrap() > 0, "{sa:#}");
    for (n, what) in [
        (&a, "the peer could not finish the resync"),
        (&b, "this copy failed to store resync data"),
    ] {
        let lines = n.error_lines(what);
        assert_eq!(
            lines,
            1,
            "{}: {lines} lines of {what:?}:\n{}",
            n.name,
            n.log_text()
        );
    }
    // Room again; b comes back and the next resync completes it.
    small.resize("128m");
    b.stop();
    b.start(&["--secondary"]);
    a.wait_connected_in_sync(IN_SYNC);
    b.wait_for("b up to date", Duration::from_secs(30), |s| {
        s["disk"] == "up-to-date"
    });
    a.stop();
    b.stop();
    assert_eq!(
        a.data_checksum(size),
        b.data_checksum(size),
        "copies differ"
    );
}

fn split_brain(dir: &Path, policy: &str) -> (Node, Node, u64) {
    let extra = format!("split_brain_policy = \"{policy}\"");
    let (mut a, mut b) = pair(dir, &extra, &extra);
    let size = start_in_sync(&mut a, &mut b);
    a.stop();
    b.stop();
    // Apart: each side is promoted and writes.
    a.start(&["--primary"]);
    let mut c = Client::connect(&a);
    c.write(0, &pattern(1, 4096)).unwrap();
    c.flush().unwrap();
    drop(c);
    a.stop();
    b.start(&["--primary", "--force"]);
    if policy != "discard-zero-changes" {
        let mut c = Client::connect(&b);
        c.write(MIB, &pattern(2, 4096)).unwrap();
        c.flush().unwrap();
    }
    b.stop();
    (a, b, size)
}

#[test]
fn split_brain_with_disconnect_policy_copies_nothing_and_says_split_brain() {
    let dir = scratch();
    let (mut a, mut b, size) = split_brain(dir.path(), "disconnect");
    let (img_a, img_b) = (a.data(size), b.data(size));
    a.start(&["--primary"]);
    b.start(&["--secondary"]);
    let s = a.wait_for("split brain", Duration::from_secs(30), |s| {
        s["connection"]["refused"] == "split-brain"
    });
    eprintln!("{s:#}");
    assert!(
        s["link_error"].is_null(),
        "the refusal, not a link error, explains it: {s:#}"
    );
    b.wait_for("split brain", Duration::from_secs(30), |s| {
        s["connection"]["refused"] == "split-brain"
    });
    std::thread::sleep(Duration::from_secs(1));
    a.stop();
    b.stop();
    assert!(
        a.data(size) == img_a && b.data(size) == img_b,
        "data was overwritten"
    );
}

#[test]
fn split_brain_discard_node_resyncs_the_named_node_from_the_other() {
    let dir = scratch();
    let (mut a, mut b, size) = split_brain(dir.path(), "discard-node:b");
    let img_a = a.data(size);
    a.start(&["--primary"]);
    b.start(&["--secondary"]);
    a.wait_connected_in_sync(IN_SYNC);
    b.wait_for("resynced", Duration::from_secs(30), |s| {
        s["disk"] == "up-to-date"
            && s["resync"].is_null()
            && s["connection"]["state"] == "connected"
    });
    a.stop();
    b.stop();
    assert!(a.data(size) == img_a, "the surviving node's data changed");
    assert!(
        b.data(size) == img_a,
        "the discarded node was not resynced to the survivor"
    );
}

#[test]
fn split_brain_discard_zero_changes_resyncs_the_node_that_wrote_nothing() {
    let dir = scratch();
    let (mut a, mut b, size) = split_brain(dir.path(), "discard-zero-changes");
    let img_a = a.data(size);
    a.start(&["--primary"]);
    b.start(&["--secondary"]);
    a.wait_connected_in_sync(IN_SYNC);
    a.stop();
    b.stop();
    assert!(
        b.data(size) == img_a,
        "the node without changes was not resynced"
    );
}

#[test]
fn async_mode_never_holds_writes_for_a_stalled_peer_and_rpo_returns_to_zero() {
    let dir = scratch();
    let extra = "mode = \"async\"\nmax_inflight_bytes = 1048576";
    let (mut a, mut b) = pair(dir.path(), extra, extra);
    let size = start_in_sync(&mut a, &mut b);
    let mut c = Client::connect(&a);
    // Stall the peer: it reads nothing, so nothing is acknowledged.
    let bpid = nix::unistd::Pid::from_raw(b.child.as_ref().unwrap().id() as i32);
    nix::sys::signal::kill(bpid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let mut slowest = Duration::ZERO;
    let t0 = Instant::now();
    let mut max_inflight = 0;
    for i in 0..200u64 {
        let w = Instant::now();
        c.write((i * 65536) % (size - 65536), &pattern(500 + i, 65536))
            .unwrap();
        slowest = slowest.max(w.elapsed());
        if i % 20 == 0 {
            max_inflight = max_inflight.max(a.status()["inflight_bytes"].as_u64().unwrap());
        }
    }
    let wrote = t0.elapsed();
    std::thread::sleep(Duration::from_millis(300));
    let s = a.status();
    eprintln!("200 x 64 KiB in {wrote:?}, slowest {slowest:?}; status {s:#}");
    assert!(
        slowest < Duration::from_millis(500),
        "a write was held {slowest:?} by the stalled peer"
    );
    assert!(
        s["counters"]["ahead_events"].as_u64().unwrap() >= 1,
        "never went ahead"
    );
    assert!(
        max_inflight <= 1048576 + 65536,
        "queue {max_inflight} above its bound"
    );
    assert!(s["rpo_bytes"].as_u64().unwrap() > 0, "RPO not reported");
    assert!(
        s["rpo_seconds"].as_f64().unwrap() > 0.0,
        "RPO age not reported"
    );
    nix::sys::signal::kill(bpid, nix::sys::signal::Signal::SIGCONT).unwrap();
    let s = a.wait_connected_in_sync(IN_SYNC);
    assert_eq!(s["rpo_seconds"].as_f64().unwrap(), 0.0);
    drop(c);
    a.stop();
    b.stop();
    assert!(
        a.data(size) == b.data(size),
        "images differ after the async catch-up"
    );
}

#[test]
fn online_verify_finds_exactly_the_corrupted_block_and_repairs_it_while_serving() {
    let dir = scratch();
    let (mut a, mut b) = pair(dir.path(), "", "");
    let (actl, bctl) = (dir.path().join("a.ctl"), dir.path().join("b.ctl"));
    let (actl_s, bctl_s) = (actl.display().to_string(), bctl.display().to_string());
    b.start(&["--secondary", "--control-socket", &bctl_s]);
    a.start(&["--primary", "--control-socket", &actl_s]);
    a.wait_connected_in_sync(IN_SYNC);
    let size = data_size(&a);
    let mut c = Client::connect(&a);
    for i in 0..64u64 {
        c.write(i * MIB, &pattern(300 + i, 65536)).unwrap();
    }
    c.flush().unwrap();
    a.wait_connected_in_sync(IN_SYNC);
    // Corrupt one 4 KiB block of the secondary's image behind its back.
    let bad = 37 * MIB + 8192;
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&b.device)
            .unwrap();
        f.seek(SeekFrom::Start(bad)).unwrap();
        f.write_all(&[0xeeu8; 4096]).unwrap();
        f.sync_all().unwrap();
    }
    // The secondary refuses to run it: the Primary's copy is the reference.
    let refused = Command::new(bin())
        .args(["verify", "--control-socket", &bctl_s])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("on the Primary"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    // Service goes on during the verify: a writer keeps writing (never to the bad block).
    let before = a.status()["counters"]["resync_bytes_sent"]
        .as_u64()
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let writer = {
        let (stop, writes) = (stop.clone(), writes.clone());
        let mut c = Client::connect(&a);
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let off = (i * 7919 % 60) * MIB + 65536;
                c.write(off, &pattern(900 + i, 4096)).unwrap();
                i += 1;
                writes.store(i, Ordering::Relaxed);
            }
        })
    };
    let out = Command::new(bin())
        .args(["verify", "--control-socket", &actl_s])
        .output()
        .unwrap();
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "verify failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        a.log_text()
    );
    eprintln!(
        "{text}({} writes served during the verify)",
        writes.load(Ordering::Relaxed)
    );
    assert!(text.contains(": 1 differing block"), "{text}");
    assert!(
        writes.load(Ordering::Relaxed) > 0,
        "no write was served during the verify"
    );
    // A snapshot with the verify finished shows the repair resync already started.
    let s = a.wait_for("verify done, repaired", Duration::from_secs(30), |s| {
        s["verify"]["running"] == false
            && s["connection"]["state"] == "connected"
            && s["resync"].is_null()
            && s["rpo_bytes"] == 0
    });
    assert_eq!(s["verify"]["differing_blocks"], 1, "{s:#}");
    assert_eq!(s["verify"]["checked_bytes"].as_u64(), Some(size));
    assert_eq!(s["verify"]["running"], false);
    assert_eq!(
        s["counters"]["connections"], 1,
        "verify disconnected: {s:#}"
    );
    let sent = s["counters"]["resync_bytes_sent"].as_u64().unwrap() - before;
    assert_eq!(sent, 65536, "the repair resent {sent} bytes, not one chunk");
    // Nothing left to find.
    let again = common::sh_out(&format!(
        "{} verify --control-socket {actl_s}",
        bin().display()
    ));
    assert!(again.contains(": 0 differing block"), "{again}");
    drop(c);
    a.stop();
    b.stop();
    assert!(
        a.data(size) == b.data(size),
        "images differ after the verify repaired the block"
    );
}

#[test]
fn checksum_resync_after_a_crash_sends_only_the_chunk_that_differs() {
    let dir = scratch();
    let (mut a, mut b) = pair(dir.path(), "checksum_resync = true", "");
    let size = start_in_sync(&mut a, &mut b);
    let mut c = Client::connect(&a);
    // 40 writes 1 MiB apart: the last 16 activity-log extents stay hot.
    for i in 0..40u64 {
        c.write(i * MIB + 4096, &pattern(700 + i, 65536)).unwrap();
    }
    c.flush().unwrap();
    a.wait_connected_in_sync(IN_SYNC);
    drop(c);
    // Crash while idle: every acknowledged write is on both copies, but the restarted Primary
    // must resync its hot activity-log extents.
    a.kill();
    // One block in a hot extent differs on the secondary (as a write the crash cut short would).
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&b.device)
            .unwrap();
        f.seek(SeekFrom::Start(39 * MIB + 4096)).unwrap();
        f.write_all(&[0x33u8; 4096]).unwrap();
        f.sync_all().unwrap();
    }
    let before = b.status()["counters"]["resync_bytes_applied"]
        .as_u64()
        .unwrap();
    a.start(&["--primary"]);
    let s = a.wait_connected_in_sync(IN_SYNC);
    let sent = s["counters"]["resync_bytes_sent"].as_u64().unwrap();
    let in_sync = s["counters"]["resync_bytes_in_sync"].as_u64().unwrap();
    let dirty = sent + in_sync;
    eprintln!("crash resync: {dirty} dirty bytes, {sent} sent, {in_sync} found identical");
    assert!(
        dirty >= 8 * MIB,
        "the crash left only {dirty} dirty bytes: nothing to test"
    );
    assert_eq!(
        sent, 65536,
        "checksum resync sent {sent} of {dirty} dirty bytes where one chunk differs"
    );
    // The secondary's snapshot lags up to 100 ms.
    b.wait_for("resync bytes applied", Duration::from_secs(5), |s| {
        s["counters"]["resync_bytes_applied"].as_u64().unwrap_or(0) >= before + sent
    });
    let applied = b.status()["counters"]["resync_bytes_applied"]
        .as_u64()
        .unwrap()
        - before;
    assert_eq!(applied, sent, "the secondary wrote {applied} resync bytes");
    // The copy stays in sync afterwards: a new write and a verify-by-comparison.
    let mut c = Client::connect(&a);
    c.write(3 * MIB, &pattern(77, 8192)).unwrap();
    c.flush().unwrap();
    a.wait_connected_in_sync(IN_SYNC);
    drop(c);
    a.stop();
    b.stop();
    assert!(
        a.data(size) == b.data(size),
        "images differ after the checksum resync"
    );
}

#[test]
fn cuts_at_every_step_of_a_resync_converge_by_bitmap_never_by_a_full_sync() {
    let dir = scratch();
    let (mut a, mut b) = pair(dir.path(), "", "");
    let size = start_in_sync(&mut a, &mut b);
    let points = [
        "cut-during-bitmap-exchange",
        "cut-during-resync",
        "cut-before-resync-end",
        "cut-before-resync-end-ack",
    ];
    for (round, point) in points.into_iter().enumerate() {
        // b steps away; a writes 4 MiB that the resync at b's return must carry.
        b.stop();
        let mut c = Client::connect(&a);
        for i in 0..4u64 {
            let at = (8 + round as u64 * 4 + i) * MIB;
            c.write(at, &pattern(300 + at, MIB as usize)).unwrap();
        }
        c.flush().unwrap();
        drop(c);
        // b returns and its connection is cut at `point`; the pair must converge anyway.
        b.start_with(&["--secondary"], "info", &[("TWINVOL_FAILPOINTS", point)]);
        b.wait_for(point, IN_SYNC, |s| {
            s["disk"] == "up-to-date" && s["connection"]["state"] == "connected"
        });
        a.wait_connected_in_sync(IN_SYNC);
        assert!(
            b.log_text().lines().any(
                |l| l.contains("fail point fired") && l.contains(&format!("point=\"{point}\""))
            ),
            "{point} never fired:\n{}",
            b.log_text()
        );
    }
    let full = a
        .log_text()
        .lines()
        .filter(|l| l.contains("connection plan") && l.contains("full: true"))
        .count();
    assert_eq!(full, 0, "a cut made a full sync:\n{}", a.log_text());
    let sent = a.counter("resync_bytes_sent");
    assert!(
        sent < 40 * MIB,
        "bitmap resyncs carry what was written (16 MiB and the pieces cut), not the {} MiB device: {sent}",
        DEV / MIB
    );
    a.stop();
    b.stop();
    assert_eq!(
        a.data_checksum(size),
        b.data_checksum(size),
        "copies differ"
    );
}
