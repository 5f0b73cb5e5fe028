//! The two-node scenarios in two network namespaces, one veth pair per heartbeat path
//! ("service" and "replication"), paths cut with nftables drops. Needs root, iproute2 and
//! nftables: the lab set-up fails loudly (naming the command) when they are missing.
//! Each node reaches its witness over its own uplink veth to the host namespace; isolating a
//! node drops everything it receives on all its interfaces.

use std::path::Path;
use std::time::{Duration, Instant};

use twinvol::cluster::demo::{is_primary, Lab, LabOptions, NbdClient};

const BIN: &str = env!("CARGO_BIN_EXE_twinvol");
const A: usize = 0;
const B: usize = 1;

fn options() -> LabOptions {
    let mut o = LabOptions {
        interval_ms: 500,
        timeout_ms: 2000,
        netns: true,
        ..Default::default()
    };
    for n in &mut o.nodes {
        n.fence_delay_ms = 2000;
        n.isolation_grace_ms = 1000;
    }
    o
}

fn started(dir: &Path) -> Lab {
    started_with(dir, &options())
}

fn started_with(dir: &Path, o: &LabOptions) -> Lab {
    let mut l = Lab::new(dir, Path::new(BIN), o)
        .expect("network-namespace lab (needs root, iproute2, nftables)");
    l.start(A).unwrap();
    l.start(B).unwrap();
    let t = Duration::from_secs(20);
    l.wait_for(A, t, is_primary)
        .unwrap_or_else(|| panic!("node-a never became Primary:\n{}", l.log(A)));
    l.wait_for(B, t, |s| {
        s["peer_view"]["state"] == "alive"
            && s["peer_view"]["role"] == "primary"
            && s["paths"][0]["up"] == true
            && s["paths"][1]["up"] == true
    })
    .unwrap_or_else(|| panic!("node-b never saw node-a on both paths:\n{}", l.log(B)));
    l
}

fn role(l: &Lab, n: usize) -> Option<String> {
    l.status(n)
        .map(|s| s["role"].as_str().unwrap_or("").to_string())
}

#[test]
fn netns_one_path_dropped_by_nftables_is_a_warning_and_no_failover() {
    let d = tempfile::tempdir().unwrap();
    let l = started(d.path());
    l.cut_path(1, true).unwrap();
    let s = l
        .wait_for(B, Duration::from_secs(10), |s| s["paths"][1]["up"] == false)
        .expect("node-b never saw the replication path go down");
    assert_eq!(s["paths"][0]["up"], true);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(role(&l, A).as_deref(), Some("primary"));
    assert_eq!(role(&l, B).as_deref(), Some("secondary"));
    assert!(l.log(B).contains("heartbeat path DOWN"));
    l.cut_path(1, false).unwrap();
    l.wait_for(B, Duration::from_secs(10), |s| s["paths"][1]["up"] == true)
        .expect("the path came back");
}

#[test]
fn netns_killed_active_node_is_replaced_within_heartbeat_timeout_plus_2s() {
    let d = tempfile::tempdir().unwrap();
    let mut l = started(d.path());
    let before = l.status(B).unwrap();
    let killed = l.kill(A);
    let s = l
        .wait_for(B, Duration::from_secs(15), is_primary)
        .unwrap_or_else(|| panic!("node-b did not take over:\n{}", l.log(B)));
    let took = s["primary_since_unix_ms"].as_u64().unwrap() - killed;
    assert!(
        took <= 2000 + 2000,
        "failover took {took} ms:\n{}\nstatus of B before the kill: {before}\nA: {}",
        l.log(B),
        l.log(A)
    );
    assert!(l.plan(B).contains("\"fence\""));
    NbdClient::connect(&l.exports[B]).expect("node-b exports NBD");
}

#[test]
fn netns_all_paths_dropped_while_both_live_never_two_primaries() {
    let d = tempfile::tempdir().unwrap();
    let mut l = started(d.path());
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
    assert!(l.exited(A), "node-a was fenced");
    assert!(l.plan(B).contains("stopped peer process"), "{}", l.plan(B));
}

#[test]
fn netns_isolated_standby_never_promotes_or_fences_and_the_primary_keeps_serving() {
    let d = tempfile::tempdir().unwrap();
    let l = started(d.path());
    l.isolate(B, true).unwrap();
    l.wait_for(B, Duration::from_secs(15), |s| {
        s["peer_view"]["state"] == "lost" && s["witness"]["state"] == "unreachable"
    })
    .unwrap_or_else(|| panic!("node-b never saw itself cut off:\n{}", l.log(B)));
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(5) {
        assert_eq!(
            role(&l, B).as_deref(),
            Some("secondary"),
            "isolated node-b promoted"
        );
        assert_eq!(
            role(&l, A).as_deref(),
            Some("primary"),
            "node-a stopped serving"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let s = l.status(B).unwrap();
    assert!(s["reason"].as_str().unwrap().contains("isolated"), "{s}");
    assert!(
        !l.plan(B).contains("fence"),
        "an isolated node never fences: {}",
        l.plan(B)
    );
    NbdClient::connect(&l.exports[A])
        .expect("node-a still serves")
        .read(0, 4096)
        .unwrap();
}

#[test]
fn netns_isolated_primary_stops_its_service_and_the_standby_takes_over_after_fencing() {
    let d = tempfile::tempdir().unwrap();
    let mut l = started(d.path());
    l.isolate(A, true).unwrap();
    // node-b still reaches its witness: it fences node-a (the lab stops its process) and promotes.
    let s = l
        .wait_for(B, Duration::from_secs(20), is_primary)
        .unwrap_or_else(|| panic!("node-b never took over:\n{}", l.log(B)));
    assert!(s["volumes"][0]["export"].is_string(), "{s}");
    assert!(
        l.plan(B).contains("\"fence\""),
        "node-b fenced first: {}",
        l.plan(B)
    );
    assert!(l.exited(A), "the fenced node-a is stopped");
    // Before it was stopped, node-a saw itself isolated and never fenced node-b.
    assert!(!l.plan(A).contains("\"fence\""), "{}", l.plan(A));
    assert!(l.log(A).contains("no witness"), "{}", l.log(A));
}

#[test]
fn netns_one_way_partition_the_deaf_primary_stands_down_and_the_standby_takes_over() {
    // node-a (preferred, Primary) receives nothing but is still heard by node-b: node-b sees
    // it alive, so no fencing; node-a, cut off, stops its service and advertises that it
    // stands down, and node-b takes the service.
    let d = tempfile::tempdir().unwrap();
    let l = started(d.path());
    l.deafen(A, true).unwrap();
    let s = l
        .wait_for(B, Duration::from_secs(20), is_primary)
        .unwrap_or_else(|| {
            panic!(
                "node-b never took over:\n{}\nnode-a:\n{}",
                l.log(B),
                l.log(A)
            )
        });
    assert!(s["volumes"][0]["export"].is_string(), "{s}");
    assert_eq!(
        role(&l, A).as_deref(),
        Some("secondary"),
        "node-a stood down"
    );
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(3) {
        assert_eq!(role(&l, A).as_deref(), Some("secondary"), "two Primaries");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        !l.plan(B).contains("\"fence\""),
        "node-a was heard: no fencing needed"
    );
}

#[test]
fn netns_a_standby_cut_off_from_replication_is_outdated_and_never_promoted_with_stale_data() {
    // Only the replication link is cut: heartbeats still flow. node-a goes on serving alone
    // and says so in its heartbeats; node-b marks its copy Outdated. When node-a then dies,
    // node-b must not take the service with data that lacks acknowledged writes.
    let d = tempfile::tempdir().unwrap();
    let mut l = started(d.path());
    l.cut_replication(B, true).unwrap();
    let mut c = NbdClient::connect(&l.exports[A]).unwrap();
    for i in 0..64u64 {
        c.write(i * 4096, &[0xA5; 4096]).unwrap();
    }
    c.flush().unwrap();
    drop(c);
    l.wait_for(B, Duration::from_secs(20), |s| {
        s["volumes"][0]["disk"] == "outdated"
    })
    .unwrap_or_else(|| panic!("node-b never marked its copy outdated:\n{}", l.log(B)));
    l.kill(A);
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(8) {
        assert_eq!(
            role(&l, B).as_deref(),
            Some("secondary"),
            "an outdated copy was promoted:\n{}",
            l.log(B)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let s = l.status(B).unwrap();
    assert!(
        s["reason"].as_str().unwrap_or("").contains("Outdated"),
        "{s}"
    );
}

#[test]
fn netns_with_outdate_wait_no_write_is_acknowledged_alone_before_the_standby_is_outdated() {
    // replication.outdate_wait_ms closes the window the test above leaves: node-a holds the
    // first write it cannot replicate until node-b's heartbeat says its copy is Outdated, so
    // a write node-a acknowledged can never be missing from a copy node-b could promote.
    let d = tempfile::tempdir().unwrap();
    let mut o = options();
    o.outdate_wait_ms = 8000;
    let mut l = started_with(d.path(), &o);
    let mut c = NbdClient::connect(&l.exports[A]).unwrap();
    c.write(0, &[0x11; 4096]).unwrap();
    l.cut_replication(B, true).unwrap();
    let t0 = Instant::now();
    c.write(4096, &[0x5A; 4096]).unwrap();
    let took = t0.elapsed();
    let s = l.status(B).unwrap();
    assert_eq!(
        s["volumes"][0]["disk"], "outdated",
        "node-a acknowledged a write node-b lacks while node-b's copy was not outdated (after {took:?}):\n{}",
        l.log(A)
    );
    assert!(
        took < Duration::from_millis(7000),
        "the write was released by the deadline ({took:?}), not by node-b's heartbeat:\n{}",
        l.log(A)
    );
    // Once node-b is known outdated, writes complete at once.
    let t1 = Instant::now();
    for i in 2..34u64 {
        c.write(i * 4096, &[0x5A; 4096]).unwrap();
    }
    assert!(t1.elapsed() < Duration::from_secs(2), "{:?}", t1.elapsed());
    drop(c);
    l.kill(A);
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(role(&l, B).as_deref(), Some("secondary"), "{}", l.log(B));
}
