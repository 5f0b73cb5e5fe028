//! Two `twinvol run` daemons on loopback (node-a 127.0.0.1, node-b 127.0.0.2), two heartbeat
//! paths each through a relay the test can cut, an HTTP witness per node the test can switch
//! off, and the lab cloud provider. Requires 127.0.0.2 on the loopback interface (Linux has
//! the whole 127/8); setting up the lab fails loudly otherwise.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::mirror_pair::FaultyFs;

use twinvol::cluster::control::Request;
use twinvol::cluster::demo::{is_primary, Lab, LabOptions, NbdClient};

const BIN: &str = env!("CARGO_BIN_EXE_twinvol");
const A: usize = 0;
const B: usize = 1;

fn options() -> LabOptions {
    let mut o = LabOptions {
        interval_ms: 500,
        timeout_ms: 2000,
        ..Default::default()
    };
    for n in &mut o.nodes {
        n.fence_delay_ms = 2000;
        n.isolation_grace_ms = 1000;
    }
    o
}

fn lab(dir: &Path, o: &LabOptions) -> Lab {
    Lab::new(dir, Path::new(BIN), o).expect("lab setup (needs 127.0.0.2 on loopback)")
}

/// Starts both nodes and waits for node-a Primary and node-b seeing it.
fn started(dir: &Path, o: &LabOptions) -> Lab {
    let mut l = lab(dir, o);
    l.start(A).unwrap();
    l.start(B).unwrap();
    let t = Duration::from_secs(20);
    l.wait_for(A, t, is_primary)
        .unwrap_or_else(|| panic!("node-a never became Primary:\n{}", l.log(A)));
    l.wait_for(B, t, |s| {
        s["peer_view"]["state"] == "alive" && s["peer_view"]["role"] == "primary"
    })
    .unwrap_or_else(|| panic!("node-b never saw node-a Primary:\n{}", l.log(B)));
    l
}

fn role(l: &Lab, n: usize) -> Option<String> {
    l.status(n)
        .map(|s| s["role"].as_str().unwrap_or("").to_string())
}

/// Watches both nodes for `d`; panics if both ever report Primary at once.
fn never_two_primaries(l: &Lab, d: Duration) {
    let t0 = Instant::now();
    while t0.elapsed() < d {
        let (a, b) = (role(l, A), role(l, B));
        assert!(
            !(a.as_deref() == Some("primary") && b.as_deref() == Some("primary")),
            "two Primaries serving at once"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn one_cut_heartbeat_path_is_a_warning_and_no_failover() {
    let d = tempfile::tempdir().unwrap();
    let l = started(d.path(), &options());
    l.cut_path(0, true).unwrap();
    let s = l
        .wait_for(B, Duration::from_secs(10), |s| s["paths"][0]["up"] == false)
        .expect("node-b never saw the service path go down");
    assert_eq!(s["paths"][1]["up"], true, "the other path stays up");
    never_two_primaries(&l, Duration::from_secs(4));
    assert_eq!(role(&l, A).as_deref(), Some("primary"));
    assert_eq!(role(&l, B).as_deref(), Some("secondary"));
    assert_eq!(l.status(B).unwrap()["peer_view"]["state"], "alive");
    assert!(l.log(B).contains("heartbeat path DOWN"), "{}", l.log(B));
    assert!(
        !l.plan(B).contains("fence"),
        "no fencing over one lost path"
    );
}

#[test]
fn killed_active_node_is_replaced_within_heartbeat_timeout_plus_2s_and_the_export_serves() {
    let d = tempfile::tempdir().unwrap();
    let o = options();
    let mut l = started(d.path(), &o);
    let mut c = NbdClient::connect(&l.exports[A]).unwrap();
    c.write(0, &[0x5a; 4096]).unwrap();
    c.flush().unwrap();
    drop(c);
    let killed = l.kill(A);
    let s = l
        .wait_for(B, Duration::from_secs(15), is_primary)
        .unwrap_or_else(|| panic!("node-b did not take over:\n{}", l.log(B)));
    let took = s["primary_since_unix_ms"].as_u64().unwrap() - killed;
    assert!(
        took <= o.timeout_ms + 2000,
        "failover took {took} ms (timeout {} ms + 2 s allowed)",
        o.timeout_ms
    );
    assert!(
        l.plan(B).contains("\"fence\""),
        "fenced before promotion: {}",
        l.plan(B)
    );
    assert!(l.plan(B).contains("ReplaceRoute"), "cloud plan recorded");
    let mut c = NbdClient::connect(&l.exports[B]).expect("node-b exports NBD");
    assert_eq!(c.read(0, 4096).unwrap(), vec![0x5a; 4096]);
    assert!(std::fs::read_to_string(d.path().join("app.log"))
        .unwrap()
        .contains("app started on node-b"));
}

#[test]
fn all_paths_cut_while_both_live_the_standby_fences_the_primary_before_promoting() {
    let d = tempfile::tempdir().unwrap();
    let mut l = started(d.path(), &options());
    l.cut_path(0, true).unwrap();
    l.cut_path(1, true).unwrap();
    let t0 = Instant::now();
    let mut promoted = false;
    while t0.elapsed() < Duration::from_secs(15) && !promoted {
        let (a, b) = (role(&l, A), role(&l, B));
        assert!(
            !(a.as_deref() == Some("primary") && b.as_deref() == Some("primary")),
            "two Primaries serving at once"
        );
        promoted = b.as_deref() == Some("primary");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(promoted, "node-b never promoted:\n{}", l.log(B));
    assert!(l.exited(A), "node-a was fenced (its process stopped)");
    assert!(
        l.plan(B).contains("stopped peer process"),
        "node-b's plan shows the fence: {}",
        l.plan(B)
    );
}

#[test]
fn nodes_that_never_heard_each_other_neither_fence_nor_promote_until_they_meet() {
    // Both start with every path cut (and replication with it): neither knows whether the
    // other holds newer data or serves, so neither fences nor promotes (the start-up gate).
    let d = tempfile::tempdir().unwrap();
    let mut l = lab(d.path(), &options());
    l.cut_path(0, true).unwrap();
    l.cut_path(1, true).unwrap();
    l.start(A).unwrap();
    l.start(B).unwrap();
    for n in [A, B] {
        l.wait_for(n, Duration::from_secs(15), |s| {
            s["peer_view"]["state"] == "lost"
                && s["reason"].as_str().unwrap_or("").contains("start-up gate")
        })
        .unwrap_or_else(|| panic!("{} does not name the gate:\n{}", n, l.log(n)));
    }
    never_two_primaries(&l, Duration::from_secs(5)); // longer than node-b's fence delay
    for n in [A, B] {
        assert_eq!(role(&l, n).as_deref(), Some("secondary"));
        assert!(!l.exited(n), "nobody was fenced");
        assert!(!l.plan(n).contains("\"fence\""), "{}", l.plan(n));
        let reason = l.status(n).unwrap()["reason"].to_string();
        assert!(reason.contains("promote --force"), "{reason}");
    }
    // They meet: the preferred node takes the service, exactly one Primary.
    l.cut_path(0, false).unwrap();
    l.cut_path(1, false).unwrap();
    l.wait_for(A, Duration::from_secs(15), is_primary)
        .unwrap_or_else(|| panic!("node-a never promoted:\n{}", l.log(A)));
    never_two_primaries(&l, Duration::from_secs(2));
}

#[test]
fn failing_start_hook_stops_bring_up_and_leaves_the_node_safe_with_a_clear_status() {
    let d = tempfile::tempdir().unwrap();
    let mut o = options();
    o.nodes[A].start_hook = "echo 'database refused to start' >&2; exit 7".into();
    let mut l = lab(d.path(), &o);
    l.start(A).unwrap(); // alone: the start-up gate holds until the operator forces it
    l.wait_for(A, Duration::from_secs(15), |s| {
        s["reason"].as_str().unwrap_or("").contains("start-up gate")
    })
    .unwrap_or_else(|| panic!("node-a does not wait at the gate:\n{}", l.log(A)));
    let a = l.request(A, &Request::Promote { force: true }).unwrap();
    assert!(!a.ok, "the bring-up fails at the hook: {}", a.message);
    let s = l
        .wait_for(A, Duration::from_secs(15), |s| {
            s["last_sequence"]["failed_at"].is_string()
        })
        .unwrap_or_else(|| panic!("no failed bring-up:\n{}", l.log(A)));
    assert_eq!(s["last_sequence"]["failed_at"], "hook start");
    assert_eq!(s["role"], "secondary");
    assert!(s["volumes"][0]["export"].is_null(), "volume not exported");
    assert!(!l.exports[A].exists(), "export socket removed");
    let text = s.to_string();
    assert!(text.contains("database refused to start"), "{text}");
    assert!(
        !l.plan(A).contains("activate"),
        "no cloud change: {}",
        l.plan(A)
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(role(&l, A).as_deref(), Some("secondary"), "no retry loop");
}

#[test]
fn isolated_standby_never_promotes() {
    let d = tempfile::tempdir().unwrap();
    let l = started(d.path(), &options());
    l.witness_up(B, false);
    l.wait_for(B, Duration::from_secs(10), |s| {
        s["witness"]["state"] == "unreachable"
    })
    .expect("node-b never noticed its witness is gone");
    l.cut_path(0, true).unwrap();
    l.cut_path(1, true).unwrap();
    never_two_primaries(&l, Duration::from_secs(7));
    let s = l.status(B).unwrap();
    assert_eq!(s["role"], "secondary");
    assert!(s["reason"].as_str().unwrap().contains("isolated"), "{s}");
    assert_eq!(
        role(&l, A).as_deref(),
        Some("primary"),
        "node-a keeps serving"
    );
    assert!(
        !l.plan(B).contains("fence"),
        "an isolated node never fences"
    );
}

#[test]
fn isolated_primary_stops_its_service_after_the_grace() {
    let d = tempfile::tempdir().unwrap();
    let mut o = options();
    o.nodes[B].fence = "off".into(); // node-b must not kill node-a before we see it demote
    let l = started(d.path(), &o);
    l.witness_up(A, false);
    l.wait_for(A, Duration::from_secs(10), |s| {
        s["witness"]["state"] == "unreachable"
    })
    .expect("node-a never noticed its witness is gone");
    l.cut_path(0, true).unwrap();
    l.cut_path(1, true).unwrap();
    let s = l
        .wait_for(A, Duration::from_secs(10), |s| s["role"] == "secondary")
        .unwrap_or_else(|| panic!("isolated node-a kept serving:\n{}", l.log(A)));
    assert!(s["reason"].as_str().unwrap().contains("isolated"), "{s}");
    assert!(s["volumes"][0]["export"].is_null());
    never_two_primaries(&l, Duration::from_secs(2));
    let b = l.status(B).unwrap();
    assert!(b["reason"].as_str().unwrap().contains("no proof"), "{b}");
}

#[test]
fn switchover_moves_the_service_and_status_works_from_the_command_line() {
    let d = tempfile::tempdir().unwrap();
    let l = started(d.path(), &options());
    let a = l.request(A, &Request::Switchover).unwrap();
    assert!(a.ok, "{}", a.message);
    l.wait_for(B, Duration::from_secs(10), is_primary)
        .unwrap_or_else(|| panic!("node-b did not take over:\n{}", l.log(B)));
    never_two_primaries(&l, Duration::from_secs(2));
    assert_eq!(role(&l, A).as_deref(), Some("secondary"));
    let out = std::process::Command::new(BIN)
        .args(["status", "--config"])
        .arg(&l.configs[A])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("node node-a (priority 10): SECONDARY"),
        "{text}"
    );
}

#[test]
fn failed_application_check_is_recovered_in_place_first_and_fails_over_when_recover_fails() {
    let d = tempfile::tempdir().unwrap();
    let mut o = options();
    o.nodes[A].check_hook = Some("test ! -f $TWINVOL_LAB/broken".into());
    // Recovers once (removes the fault), fails every later time.
    o.nodes[A].recover_hook = Some(
        "test ! -f $TWINVOL_LAB/recovered-once && touch $TWINVOL_LAB/recovered-once && rm -f $TWINVOL_LAB/broken".into(),
    );
    let l = started(d.path(), &o);
    let broken = d.path().join("broken");
    std::fs::write(&broken, b"").unwrap();
    let t0 = Instant::now();
    while broken.exists() && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!broken.exists(), "recover hook never ran:\n{}", l.log(A));
    never_two_primaries(&l, Duration::from_secs(2));
    assert_eq!(
        role(&l, A).as_deref(),
        Some("primary"),
        "recovered in place, no failover"
    );
    std::fs::write(&broken, b"").unwrap();
    l.wait_for(B, Duration::from_secs(10), is_primary)
        .unwrap_or_else(|| {
            panic!(
                "node-b did not take over after recover failed:\n{}",
                l.log(A)
            )
        });
    assert_eq!(role(&l, A).as_deref(), Some("secondary"));
    assert!(
        l.log(A).contains("application check failed"),
        "{}",
        l.log(A)
    );
}

#[test]
fn fence_off_the_standby_takes_over_only_when_the_cloud_reports_the_peer_stopped() {
    let d = tempfile::tempdir().unwrap();
    let mut o = options();
    for n in &mut o.nodes {
        n.fence = "off".into();
    }
    let mut l = started(d.path(), &o);
    // Every path cut while both live: the peer's instance runs, so no proof, no promotion.
    l.cut_path(0, true).unwrap();
    l.cut_path(1, true).unwrap();
    l.wait_for(B, Duration::from_secs(10), |s| {
        s["reason"].as_str().unwrap_or("").contains("no proof")
    })
    .unwrap_or_else(|| panic!("node-b never said it lacks proof:\n{}", l.log(B)));
    never_two_primaries(&l, Duration::from_secs(3));
    assert_eq!(role(&l, B).as_deref(), Some("secondary"));
    assert!(!l.exited(A), "fence = off: nobody stops node-a");
    assert!(
        !l.plan(B).contains("\"fence\""),
        "fence = off never fences: {}",
        l.plan(B)
    );
    assert!(
        l.plan(B).contains("is running"),
        "the query is recorded: {}",
        l.plan(B)
    );
    // Now node-a really stops: the next query reports it stopped, which is proof.
    l.cut_path(0, false).unwrap();
    l.cut_path(1, false).unwrap();
    l.wait_for(B, Duration::from_secs(10), |s| {
        s["peer_view"]["state"] == "alive"
    })
    .expect("node-b sees node-a again");
    l.kill(A);
    let s = l
        .wait_for(B, Duration::from_secs(20), is_primary)
        .unwrap_or_else(|| panic!("node-b never took over:\n{}", l.log(B)));
    let steps = s["last_sequence"].to_string();
    assert!(steps.contains("export"), "{steps}");
    assert!(
        l.log(B).contains("reported stopped"),
        "the proof is named in the log:\n{}",
        l.log(B)
    );
}

/// CRC32 of a node's data area (the export's size; metadata sits after it).
fn data_crc(l: &Lab, n: usize, size: u64) -> u32 {
    twinvol::cluster::demo::data_crc(&l.volumes[n], size).unwrap()
}

#[test]
fn verify_through_the_daemon_finds_a_corrupted_block_and_resync_discard_local_recopies_the_standby()
{
    let d = tempfile::tempdir().unwrap();
    let l = started(d.path(), &options());
    let mut c = NbdClient::connect(&l.exports[A]).unwrap();
    let size = c.size;
    for i in 0..64u64 {
        c.write(i * 4096, &vec![(i as u8) ^ 0x5a; 4096]).unwrap();
    }
    c.flush().unwrap();
    drop(c);
    // Damage one block of node-b's copy behind replication's back.
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&l.volumes[B])
            .unwrap();
        f.seek(SeekFrom::Start(8 * 4096)).unwrap();
        f.write_all(&[0xEE; 4096]).unwrap();
        f.sync_all().unwrap();
    }
    assert_ne!(data_crc(&l, A, size), data_crc(&l, B, size));
    let out = std::process::Command::new(BIN)
        .args(["verify", "--socket"])
        .arg(&l.sockets[A])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("1 differing block(s)"), "{text}");
    let t0 = Instant::now();
    while data_crc(&l, A, size) != data_crc(&l, B, size) {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the differing block was never resynced:\n{}",
            l.log(A)
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // The Primary's data is the service's: discarding it is refused.
    let a = l
        .request(
            A,
            &Request::Resync {
                volume: None,
                discard_local: true,
            },
        )
        .unwrap();
    assert!(!a.ok && a.message.contains("Primary"), "{}", a.message);
    // On the standby it throws the copy away and copies the whole device back.
    let before = l.status(B).unwrap()["volumes"][0]["replication"]["counters"]
        ["resync_bytes_applied"]
        .as_u64()
        .unwrap_or(0);
    let a = l
        .request(
            B,
            &Request::Resync {
                volume: None,
                discard_local: true,
            },
        )
        .unwrap();
    assert!(a.ok, "{}", a.message);
    let s = l
        .wait_for(B, Duration::from_secs(30), |s| {
            let r = &s["volumes"][0]["replication"];
            s["volumes"][0]["disk"] == "up-to-date"
                && r["connection"]["state"] == "connected"
                && r["resync"].is_null()
                && r["counters"]["resync_bytes_applied"].as_u64().unwrap_or(0) >= before + size
        })
        .unwrap_or_else(|| panic!("node-b was not fully resynced:\n{}", l.log(B)));
    assert_eq!(s["role"], "secondary");
    assert_eq!(data_crc(&l, A, size), data_crc(&l, B, size));
    assert_eq!(
        role(&l, A).as_deref(),
        Some("primary"),
        "the service never moved"
    );
}

#[test]
fn a_clean_stop_of_the_primary_hands_the_service_over_without_fencing_it() {
    // `systemctl stop twinvol` on the Primary: it tears down, tells the peer it stands down,
    // and the peer takes over while it is still heard, so nobody stops its instance.
    let d = tempfile::tempdir().unwrap();
    let mut l = started(d.path(), &options());
    assert!(l.stop(A), "node-a exits cleanly:\n{}", l.log(A));
    let s = l
        .wait_for(B, Duration::from_secs(15), is_primary)
        .unwrap_or_else(|| panic!("node-b never took over:\n{}", l.log(B)));
    assert!(s["volumes"][0]["export"].is_string(), "{s}");
    assert!(
        !l.plan(B).contains("\"fence\""),
        "a cleanly stopped node is not fenced: {}",
        l.plan(B)
    );
    assert!(l.log(A).contains("standing down"), "{}", l.log(A));
    // Back, it stays Secondary behind the new Primary and resyncs.
    l.start(A).unwrap();
    l.wait_for(A, Duration::from_secs(20), |s| {
        s["role"] == "secondary"
            && s["peer_view"]["role"] == "primary"
            && s["volumes"][0]["disk"] == "up-to-date"
    })
    .unwrap_or_else(|| panic!("node-a did not come back behind node-b:\n{}", l.log(A)));
}

/// `twinvol show-md --json` of node `n`'s volume (the node must be stopped or the read is of
/// its last persisted state).
fn show_md(l: &Lab, n: usize) -> serde_json::Value {
    let out = std::process::Command::new(BIN)
        .args(["show-md", "--json", "--device"])
        .arg(&l.volumes[n])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn block(i: u64) -> Vec<u8> {
    (0..4096u64).map(|j| (i * 131 + j * 7) as u8).collect()
}

#[test]
fn a_cleanly_stopped_secondary_is_outdated_and_never_promotes_alone_with_its_stale_copy() {
    let d = tempfile::tempdir().unwrap();
    let mut o = options();
    o.outdate_wait_ms = 15_000;
    let mut l = started(d.path(), &o);
    l.wait_for(B, Duration::from_secs(15), |s| {
        s["volumes"][0]["disk"] == "up-to-date"
            && s["volumes"][0]["replication"]["connection"]["state"] == "connected"
    })
    .unwrap_or_else(|| panic!("node-b never in sync:\n{}", l.log(B)));
    // The documented upgrade path: stop the Secondary cleanly.
    assert!(l.stop(B), "node-b exits cleanly:\n{}", l.log(B));
    let flags = show_md(&l, B)["flags"].to_string();
    assert!(flags.contains("outdated"), "node-b marked itself: {flags}");
    // node-a was told before node-b left: its first write does not wait for node-b.
    let mut c = NbdClient::connect(&l.exports[A]).unwrap();
    let t = Instant::now();
    c.write(0, &block(0)).unwrap();
    let first = t.elapsed();
    assert!(
        first < Duration::from_secs(1),
        "the first write after the planned stop took {first:?} (outdate_wait_ms is 15 s)"
    );
    for i in 1..32 {
        c.write(i * 4096, &block(i)).unwrap();
    }
    c.flush().unwrap();
    drop(c);
    l.wait_for(A, Duration::from_secs(5), |s| {
        s["volumes"][0]["replication"]["newest"] == "peer-outdated"
    })
    .unwrap_or_else(|| panic!("node-a did not record node-b outdated:\n{}", l.log(A)));
    // node-a dies; the stale node-b boots alone: it must not serve its old copy.
    l.kill(A);
    l.start(B).unwrap();
    l.wait_for(B, Duration::from_secs(15), |s| {
        s["peer_view"]["state"] == "lost"
    })
    .unwrap_or_else(|| panic!("node-b never gave up on node-a:\n{}", l.log(B)));
    never_two_primaries(&l, Duration::from_secs(5));
    let s = l.status(B).unwrap();
    assert_eq!(s["role"], "secondary", "{s}");
    assert_eq!(s["volumes"][0]["disk"], "outdated", "{s}");
    assert!(
        s["reason"].as_str().unwrap().contains("--force"),
        "status names the way out: {s}"
    );
    assert!(!l.plan(B).contains("\"fence\""), "{}", l.plan(B));
    // node-a returns: it takes the service back with every write, and node-b is resynced.
    l.start(A).unwrap();
    l.wait_for(A, Duration::from_secs(20), is_primary)
        .unwrap_or_else(|| panic!("node-a did not take the service back:\n{}", l.log(A)));
    l.wait_for(B, Duration::from_secs(20), |s| {
        s["volumes"][0]["disk"] == "up-to-date"
    })
    .unwrap_or_else(|| panic!("node-b was not resynced:\n{}", l.log(B)));
    let mut c = NbdClient::connect(&l.exports[A]).unwrap();
    for i in 0..32 {
        assert_eq!(c.read(i * 4096, 4096).unwrap(), block(i), "block {i}");
    }
    drop(c);
    never_two_primaries(&l, Duration::from_secs(1));
}

#[test]
fn after_a_fencing_failover_the_new_primary_acknowledges_its_first_write_at_once() {
    let d = tempfile::tempdir().unwrap();
    let mut o = options();
    o.outdate_wait_ms = 15_000;
    let mut l = started(d.path(), &o);
    l.kill(A);
    l.wait_for(B, Duration::from_secs(15), is_primary)
        .unwrap_or_else(|| panic!("node-b did not take over:\n{}", l.log(B)));
    assert!(l.plan(B).contains("\"fence\""), "{}", l.plan(B));
    let mut c = NbdClient::connect(&l.exports[B]).unwrap();
    let t = Instant::now();
    c.write(8192, &block(2)).unwrap();
    let first = t.elapsed();
    assert!(
        first < Duration::from_secs(1),
        "the new Primary held its first write {first:?}: the old one is fenced, nothing waits for it"
    );
    l.wait_for(B, Duration::from_secs(5), |s| {
        s["volumes"][0]["replication"]["newest"] == "peer-outdated"
    })
    .unwrap_or_else(|| {
        panic!(
            "node-b did not record the fenced node-a outdated:\n{}",
            l.log(B)
        )
    });
}

/// A copy of node `n`'s configuration with its own state directory, control socket,
/// heartbeat and replication ports: what a second daemon started by mistake looks like.
fn second_config(l: &Lab, n: usize, dir: &Path) -> std::path::PathBuf {
    let text = std::fs::read_to_string(&l.configs[n]).unwrap();
    let port = || {
        std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let out: Vec<String> = text
        .lines()
        .map(|line| {
            let t = line.trim_start();
            if t.starts_with("state_dir = ") {
                format!("state_dir = \"{}\"", dir.join("state").display())
            } else if t.starts_with("control_socket = ") {
                format!(
                    "control_socket = \"{}\"",
                    dir.join("control.sock").display()
                )
            } else if t.starts_with("local = ") || t.starts_with("address = ") {
                let key = t.split(' ').next().unwrap_or("local");
                let ip = if n == A { "127.0.0.1" } else { "127.0.0.2" };
                format!("{key} = \"{ip}:{}\"", port())
            } else {
                line.to_string()
            }
        })
        .collect();
    let p = dir.join("second.toml");
    std::fs::write(&p, out.join("\n")).unwrap();
    p
}

#[test]
fn a_second_daemon_on_the_same_device_is_refused_and_nobody_is_fenced() {
    let d = tempfile::tempdir().unwrap();
    let l = started(d.path(), &options());
    let second_dir = d.path().join("second");
    std::fs::create_dir_all(&second_dir).unwrap();
    let cfg = second_config(&l, A, &second_dir);
    let log = second_dir.join("second.log");
    let mut child = std::process::Command::new(BIN)
        .args(["run", "--config"])
        .arg(&cfg)
        .env("TWINVOL_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if t0.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let err = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        status.is_some_and(|s| !s.success()),
        "the second daemon must stop at once with an error, it ran on: {err}"
    );
    let pid = std::fs::read_to_string(d.path().join("node-a").join("twinvol.pid")).unwrap();
    assert!(
        err.contains(&format!("already in use by pid {}", pid.trim())),
        "names the owner (pid {pid}): {err}"
    );
    never_two_primaries(&l, Duration::from_secs(4));
    assert_eq!(role(&l, A).as_deref(), Some("primary"));
    assert_eq!(l.status(B).unwrap()["peer_view"]["role"], "primary");
    for n in [A, B] {
        assert!(!l.plan(n).contains("\"fence\""), "{}", l.plan(n));
    }
    assert!(!second_dir.join("state").join("twinvol.pid").exists());
}

#[test]
fn with_on_disk_error_failover_a_primary_whose_disk_fails_hands_the_service_to_the_peer() {
    let d = tempfile::tempdir().unwrap();
    let mut o = options();
    o.extra_replication = "on_disk_error = \"failover\"\n".into();
    let mut l = lab(d.path(), &o);
    // node-a's volume lives on a file system that fails on command.
    let fs = FaultyFs::mount(&d.path().join("faulty"));
    let img = fs.mount.join("volume.img");
    std::fs::copy(&l.volumes[A], &img).unwrap();
    std::fs::remove_file(&l.volumes[A]).unwrap();
    std::os::unix::fs::symlink(&img, &l.volumes[A]).unwrap();
    l.start(A).unwrap();
    l.start(B).unwrap();
    l.wait_for(A, Duration::from_secs(20), is_primary)
        .unwrap_or_else(|| panic!("node-a never promoted:\n{}", l.log(A)));
    l.wait_for(B, Duration::from_secs(20), |s| {
        s["volumes"][0]["disk"] == "up-to-date"
            && s["volumes"][0]["replication"]["connection"]["state"] == "connected"
    })
    .unwrap_or_else(|| panic!("node-b never in sync:\n{}", l.log(B)));
    let mut c = NbdClient::connect(&l.exports[A]).unwrap();
    for i in 0..8 {
        c.write(i * 4096, &block(i)).unwrap();
    }
    c.flush().unwrap();
    fs.fail("all");
    // This write meets the failed disk: it is served by node-b's copy, and node-a hands over.
    c.write(8 * 4096, &block(8)).unwrap_or_else(|e| {
        panic!(
            "the write reached the application as an error: {e}\n{}",
            l.log(A)
        )
    });
    drop(c);
    l.wait_for(B, Duration::from_secs(20), is_primary)
        .unwrap_or_else(|| {
            panic!(
                "node-b never took over:\n{}\nnode-a:\n{}",
                l.log(B),
                l.log(A)
            )
        });
    never_two_primaries(&l, Duration::from_secs(2));
    let a = l.status(A).unwrap();
    assert_eq!(a["role"], "secondary", "{a}");
    assert!(
        l.log(A).contains("handing the service over"),
        "{}",
        l.log(A)
    );
    assert!(
        !l.plan(B).contains("\"fence\""),
        "a live node is not fenced: {}",
        l.plan(B)
    );
    let mut c = NbdClient::connect(&l.exports[B]).unwrap();
    for i in 0..9 {
        assert_eq!(
            c.read(i * 4096, 4096).unwrap(),
            block(i),
            "block {i} on node-b"
        );
    }
    fs.fail("none");
}

#[test]
fn an_authenticated_heartbeat_from_an_unexpected_address_is_reported_as_a_misconfiguration() {
    use twinvol::cluster::heartbeat::{self, Ack, DiskState, Heartbeat, Role, VERSION};
    let d = tempfile::tempdir().unwrap();
    let l = started(d.path(), &options());
    // A node holding this cluster's key (a third machine, a copied configuration) sends
    // node-b's heartbeats to node-a from an address that is not node-b's.
    let key = twinvol::repl::link::keyfile::load_key_file(&d.path().join("cluster.key")).unwrap();
    let config = std::fs::read_to_string(&l.configs[A]).unwrap();
    let local = config
        .lines()
        .find_map(|line| line.trim().strip_prefix("local = "))
        .map(|v| v.trim_matches('"').to_string())
        .expect("node-a's first heartbeat address");
    let hb = Heartbeat {
        node_id: "node-b".into(),
        path: 0,
        role: Role::Secondary,
        disk: DiskState::UpToDate,
        flags: 0,
        priority: 20,
        incarnation: 0x5eed,
        seq: 1,
        ack: Ack::default(),
        version: VERSION,
    };
    let s = std::net::UdpSocket::bind("127.0.0.3:0").expect("127.0.0.3 on loopback");
    for seq in 1..4 {
        let bytes = heartbeat::encode(&Heartbeat { seq, ..hb.clone() }, &key);
        s.send_to(&bytes, &local).unwrap();
    }
    let st = l
        .wait_for(A, Duration::from_secs(10), |s| {
            s["misconfigured"].as_array().is_some_and(|m| {
                m.iter()
                    .any(|x| x.as_str().unwrap_or("").contains("127.0.0.3"))
            })
        })
        .unwrap_or_else(|| panic!("node-a did not report it:\n{}", l.log(A)));
    let text = st["misconfigured"].to_string();
    assert!(
        text.contains("another node uses this cluster's key"),
        "{text}"
    );
    assert_eq!(
        l.log(A).matches("MISCONFIGURATION").count(),
        1,
        "logged once:\n{}",
        l.log(A)
    );
    // Nothing else changed: the forged heartbeats were not taken as node-b's.
    never_two_primaries(&l, Duration::from_secs(1));
    assert_eq!(role(&l, A).as_deref(), Some("primary"));
}
