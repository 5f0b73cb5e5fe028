//! Two `twinvol mirror` nodes in two network namespaces joined by two veth pairs, "service"
//! and "replication"; replication is configured on the replication pair's addresses and pinned
//! to its veth (`interface`, SO_BINDTODEVICE). The interface counters
//! (/sys/class/net/<dev>/statistics, read inside each namespace) show where the mirror data went;
//! nftables drops cut the replication link (also at the moment node a is SIGKILLed, with fio's
//! writes in flight); `tc tbf` caps it below the write rate.
//!
//! Needs root, iproute2 (`ip`), nftables (`nft`) and `tc`: the set-up fails loudly, naming the
//! missing tool, rather than skipping.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::mirror_node::{fio_kill_rounds, pattern, write_key, Client, MirrorNode, FIO_DEV};
use common::{require, scratch, sh, sh_out};

const MIB: u64 = 1024 * 1024;
const SERVICE: usize = 0;
const REPLICATION: usize = 1;
const A: usize = 0;
const B: usize = 1;
const PORT: u16 = 7789;

/// Two namespaces joined by a service and a replication veth pair; removed on drop.
struct Lab {
    ns: [String; 2],
    /// veth[path][node]: node's end of the path.
    veth: [[String; 2]; 2],
    /// addr[path][node].
    addr: [[String; 2]; 2],
}

impl Lab {
    fn new() -> Lab {
        require(&["ip", "nft", "tc"]);
        assert!(
            nix::unistd::geteuid().is_root(),
            "tests/mirror_netns.rs creates network namespaces and needs root (run under sudo or in the CI container)"
        );
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let id = (std::process::id() % 50) * 5 + COUNTER.fetch_add(1, Ordering::SeqCst) % 5;
        let lab = Lab {
            ns: [format!("tm{id}a"), format!("tm{id}b")],
            veth: [
                [format!("tm{id}sa"), format!("tm{id}sb")],
                [format!("tm{id}ra"), format!("tm{id}rb")],
            ],
            addr: [
                [format!("10.110.{id}.1"), format!("10.110.{id}.2")],
                [format!("10.111.{id}.1"), format!("10.111.{id}.2")],
            ],
        };
        for n in &lab.ns {
            let _ = Command::new("ip").args(["netns", "del", n]).output();
            sh(&format!("ip netns add {n}"));
            sh(&format!("ip -n {n} link set lo up"));
        }
        for p in [SERVICE, REPLICATION] {
            let [va, vb] = &lab.veth[p];
            sh(&format!("ip link add {va} type veth peer name {vb}"));
            for n in [A, B] {
                let (ns, v, a) = (&lab.ns[n], &lab.veth[p][n], &lab.addr[p][n]);
                sh(&format!("ip link set {v} netns {ns}"));
                sh(&format!("ip -n {ns} addr add {a}/24 dev {v}"));
                sh(&format!("ip -n {ns} link set {v} up"));
            }
        }
        lab
    }

    /// A counter of `path`'s veth on `node`, read inside its namespace.
    fn counter(&self, node: usize, path: usize, which: &str) -> u64 {
        let text = sh_out(&format!(
            "ip netns exec {} cat /sys/class/net/{}/statistics/{which}",
            self.ns[node], self.veth[path][node]
        ));
        text.trim()
            .parse()
            .unwrap_or_else(|e| panic!("counter {which}: {text:?}: {e}"))
    }

    /// tx + rx bytes of `path` on `node`.
    fn bytes(&self, node: usize, path: usize) -> (u64, u64) {
        (
            self.counter(node, path, "tx_bytes"),
            self.counter(node, path, "rx_bytes"),
        )
    }

    /// Drops everything arriving on `node`'s replication veth (nftables), or removes the drop.
    fn cut_replication(&self, node: usize, cut: bool) {
        let (ns, v) = (&self.ns[node], &self.veth[REPLICATION][node]);
        if cut {
            let rules = format!(
                "table inet tmcut {{\n  chain input {{\n    type filter hook input priority 0; policy accept;\n    iifname \"{v}\" drop\n  }}\n}}\n"
            );
            let mut child = Command::new("ip")
                .args(["netns", "exec", ns, "nft", "-f", "-"])
                .stdin(Stdio::piped())
                .spawn()
                .unwrap();
            child
                .stdin
                .take()
                .unwrap()
                .write_all(rules.as_bytes())
                .unwrap();
            assert!(child.wait().unwrap().success(), "nft refused the drop rule");
        } else {
            sh(&format!("ip netns exec {ns} nft delete table inet tmcut"));
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for n in &self.ns {
            let _ = Command::new("ip").args(["netns", "del", n]).output();
        }
    }
}

/// One node: its files and its `twinvol mirror` process inside its namespace.
type Node = MirrorNode;

/// Node `n` of the lab: replication on its replication-pair address, pinned to that veth; a
/// fresh device that skips the initial sync.
fn node(dir: &Path, lab: &Lab, n: usize, dev_size: u64, extra: &str) -> Node {
    let (name, peer) = if n == A { ("a", "b") } else { ("b", "a") };
    let key = write_key(dir);
    let replication = format!(
        r#"address = "{address}:{PORT}"
peer = "{peer_addr}:{PORT}"
peer_id = "{peer}"
interface = "{veth}"
key_file = "{key}"
{extra}"#,
        key = key.display(),
        address = lab.addr[REPLICATION][n],
        peer_addr = lab.addr[REPLICATION][1 - n],
        veth = lab.veth[REPLICATION][n],
    );
    let node = MirrorNode::create(dir, name, dev_size, &replication, Some(lab.ns[n].clone()));
    node.skip_initial_sync();
    node
}

/// A started, connected pair: a Primary, b Secondary.
fn pair(dir: &Path, lab: &Lab, dev_size: u64, extra: &str) -> (Node, Node) {
    let mut a = node(dir, lab, A, dev_size, extra);
    let mut b = node(dir, lab, B, dev_size, extra);
    b.start(&["--secondary"]);
    a.start(&["--primary"]);
    a.wait_connected_in_sync(Duration::from_secs(30));
    (a, b)
}

#[test]
fn netns_mirror_data_crosses_the_replication_pair_only() {
    let lab = Lab::new();
    let dir = scratch();
    let (mut a, mut b) = pair(dir.path(), &lab, 128 * MIB, "ping_timeout_secs = 2");
    let mut c = Client::connect(&a);
    let size = c.export.size;
    let repl0 = lab.bytes(A, REPLICATION);
    let svc0 = [lab.bytes(A, SERVICE), lab.bytes(B, SERVICE)];
    let sent0 = a.counter("data_bytes_sent");
    let written = 32 * MIB;
    for i in 0..written / (64 * 1024) {
        c.write(i * 64 * 1024, &pattern(i + 1, 64 * 1024)).unwrap();
    }
    c.flush().unwrap();
    // Sync mode: every write was acknowledged by the peer; the snapshot lags up to 100 ms.
    a.wait_for("all writes counted", Duration::from_secs(10), |s| {
        s["counters"]["data_bytes_sent"].as_u64().unwrap_or(0) >= sent0 + written
    });
    a.wait_connected_in_sync(Duration::from_secs(30));
    let repl1 = lab.bytes(A, REPLICATION);
    let svc1 = [lab.bytes(A, SERVICE), lab.bytes(B, SERVICE)];
    let repl_tx = repl1.0 - repl0.0;
    let service: u64 = (0..2)
        .map(|n| (svc1[n].0 - svc0[n].0) + (svc1[n].1 - svc0[n].1))
        .sum();
    let sent = a.counter("data_bytes_sent") - sent0;
    eprintln!(
        "wrote {written} bytes: replication veth tx {repl_tx}, rx {}; service veths tx+rx {service}; data_bytes_sent {sent}",
        repl1.1 - repl0.1
    );
    assert!(
        sent >= written,
        "the primary sent {sent} data bytes for {written} written"
    );
    assert!(
        repl_tx >= written,
        "only {repl_tx} bytes left the primary on the replication pair for {written} bytes written"
    );
    assert!(
        service < written / 100,
        "the service pair carried {service} bytes: mirror data leaked off the replication pair"
    );
    drop(c);
    a.stop();
    b.stop();
    assert_eq!(
        a.data_checksum(size),
        b.data_checksum(size),
        "images differ after mirrored writes"
    );
}

/// The crash of an instance, not only of its process: the replication link stops carrying
/// anything (nftables drop on node b's replication veth) and node a is SIGKILLed 50-150 ms
/// later, while fio has 32 sync writes in flight. What node a's kernel still held for node b
/// is lost with it, so every write fio saw acknowledged must have been acknowledged by node b
/// before the cut. The writes in flight at the kill are on node a only; the devices' activity
/// log has 16 slots of 1 MiB for writes spread over 256 MiB, so it turns over all the time,
/// and the final comparison fails if it ever lets an extent go while a write in it is in
/// flight (an activity log that evicted the least recently used extent whatever was in flight
/// in it made the copies differ after the resync).
#[test]
fn netns_fio_acknowledged_sync_writes_survive_a_cut_link_and_a_sigkilled_primary() {
    crash_rounds_with_the_link_cut("", true);
}

/// The same crash in async mode: acknowledged writes may be missing on node b (that is the
/// mode's promise), but the resync after the restart must make both copies identical. The
/// 4 MiB queue bound makes node a go ahead too, and the 16-slot activity log makes it go
/// ahead to make room (`make_room_by_going_ahead`). Against an activity log that evicted
/// extents with writes in flight, this test and the sync one above both failed: the copies
/// differed.
#[test]
fn netns_async_mirror_resyncs_to_identical_copies_after_a_cut_link_and_a_sigkilled_primary() {
    crash_rounds_with_the_link_cut("mode = \"async\"\nmax_inflight_bytes = 4194304", false);
}

/// Three rounds: fio (one pass of 4 KiB random writes at QD32) through node a; the link cut;
/// node a SIGKILLed; fio's acknowledged writes checked on node a (and on node b when
/// `acked_on_peer`); the link restored and node a restarted as Primary until in sync. Then the
/// two images must be identical.
fn crash_rounds_with_the_link_cut(extra: &str, acked_on_peer: bool) {
    require(&["fio"]);
    let lab = Lab::new();
    let dir = scratch();
    let extra = format!("ping_timeout_secs = 2\n{extra}");
    let (mut a, mut b) = pair(dir.path(), &lab, FIO_DEV, &extra);
    let size = Client::connect(&a).export.size;
    let mut cut = |on: bool| lab.cut_replication(B, on);
    fio_kill_rounds(
        &mut a,
        &b,
        size,
        dir.path(),
        0x2545_f491,
        acked_on_peer,
        Some(&mut cut),
        Duration::from_secs(60),
    );
    a.stop();
    b.stop();
    let log = a.log_text();
    assert!(
        !log.contains("not in flight") && !log.contains("panicked"),
        "node a's activity-log bookkeeping failed:\n{log}"
    );
    assert!(
        a.data_checksum(size) == b.data_checksum(size),
        "images differ after the crash rounds resynced: the activity log let an extent go \
         while a write in it was in flight"
    );
}

#[test]
fn netns_cut_replication_link_resyncs_only_the_dirty_regions() {
    let lab = Lab::new();
    let dir = scratch();
    let (mut a, mut b) = pair(dir.path(), &lab, 256 * MIB, "ping_timeout_secs = 2");
    let size = Client::connect(&a).export.size;
    // 48 scattered 4 KiB slots, rewritten in a loop: at most 48 dirty 64 KiB chunks.
    let slots: Vec<u64> = (0..48u64).map(|k| k * (size / 48) + 8192).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let writer = {
        let (stop, done) = (stop.clone(), done.clone());
        let mut c = Client::connect(&a);
        std::thread::spawn(move || {
            let mut i = 0u64;
            let mut slowest = Duration::ZERO;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                c.write(slots[(i % 48) as usize], &pattern(1000 + i, 4096))
                    .expect("the primary keeps serving while the peer is cut off");
                slowest = slowest.max(t.elapsed());
                i += 1;
                done.store(i, Ordering::Relaxed);
            }
            c.flush().unwrap();
            slowest
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    lab.cut_replication(B, true);
    a.wait_for("peer lost", Duration::from_secs(10), |s| {
        s["connection"]["state"] != "connected"
    });
    let at_loss = done.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_secs(1));
    let after_loss = done.load(Ordering::Relaxed) - at_loss;
    stop.store(true, Ordering::Relaxed);
    let slowest = writer.join().unwrap();
    assert!(
        after_loss > 10,
        "only {after_loss} writes completed in the second after the peer was declared lost"
    );
    std::thread::sleep(Duration::from_millis(300));
    let dirty = a.status()["rpo_bytes"].as_u64().unwrap();
    assert!(
        (4096..=64 * 64 * 1024).contains(&dirty),
        "dirty bytes {dirty} after writing 48 slots"
    );
    let resync0 = a.counter("resync_bytes_sent");
    let tx0 = lab.bytes(A, REPLICATION).0;
    lab.cut_replication(B, false);
    let restored = Instant::now();
    let s = a.wait_connected_in_sync(Duration::from_secs(60));
    let resynced_in = restored.elapsed();
    let sent = s["counters"]["resync_bytes_sent"].as_u64().unwrap() - resync0;
    let wire = lab.bytes(A, REPLICATION).0 - tx0;
    eprintln!(
        "{} writes ({after_loss} after the loss, slowest {slowest:?}); dirty {dirty}; resync sent {sent}; replication veth tx {wire} bytes; device {size}; in sync {resynced_in:?} after the link came back",
        done.load(Ordering::Relaxed)
    );
    if std::env::var_os("TWINVOL_TEST_LOGS").is_some() {
        eprintln!("a:\n{}\nb:\n{}", a.log_text(), b.log_text());
    }
    assert!(
        sent <= dirty && sent >= dirty / 2,
        "resync sent {sent} bytes for {dirty} dirty bytes"
    );
    assert!(
        wire < dirty + dirty / 5 + 256 * 1024 && wire < size / 20,
        "{wire} bytes crossed the replication link for {dirty} dirty bytes of a {size} byte device"
    );
    a.stop();
    b.stop();
    assert_eq!(
        a.data_checksum(size),
        b.data_checksum(size),
        "images differ after the resync"
    );
}

#[test]
fn netns_async_over_a_capped_link_never_holds_writes_and_rpo_returns_to_zero() {
    let lab = Lab::new();
    let dir = scratch();
    let inflight_max = 2 * MIB;
    let extra =
        format!("mode = \"async\"\nmax_inflight_bytes = {inflight_max}\nping_timeout_secs = 5");
    let (mut a, mut b) = pair(dir.path(), &lab, 128 * MIB, &extra);
    // Cap the primary's replication egress at 40 Mbit/s (5 MB/s), far below the local write rate.
    sh(&format!(
        "ip netns exec {} tc qdisc add dev {} root tbf rate 40mbit burst 256kb latency 200ms",
        lab.ns[A], lab.veth[REPLICATION][A]
    ));
    let mut c = Client::connect(&a);
    let size = c.export.size;
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (sampling, status) = (sampling.clone(), a.status.clone());
        std::thread::spawn(move || {
            let (mut max_inflight, mut max_rpo, mut max_age) = (0u64, 0u64, 0f64);
            while sampling.load(Ordering::Relaxed) {
                if let Ok(t) = std::fs::read_to_string(&status) {
                    if let Ok(s) = serde_json::from_str::<serde_json::Value>(&t) {
                        max_inflight = max_inflight.max(s["inflight_bytes"].as_u64().unwrap_or(0));
                        max_rpo = max_rpo.max(s["rpo_bytes"].as_u64().unwrap_or(0));
                        max_age = max_age.max(s["rpo_seconds"].as_f64().unwrap_or(0.0));
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            (max_inflight, max_rpo, max_age)
        })
    };
    let burst = 48 * MIB;
    let mut lat = Vec::new();
    let t0 = Instant::now();
    for i in 0..burst / (64 * 1024) {
        let w = Instant::now();
        c.write((i * 64 * 1024) % size, &pattern(7 + i, 64 * 1024))
            .unwrap();
        lat.push(w.elapsed());
    }
    let took = t0.elapsed();
    let during = a.status();
    sampling.store(false, Ordering::Relaxed);
    let (max_inflight, max_rpo, max_age) = sampler.join().unwrap();
    lat.sort();
    let (p50, p99, slowest) = (
        lat[lat.len() / 2],
        lat[lat.len() * 99 / 100],
        lat[lat.len() - 1],
    );
    let rate = burst as f64 / took.as_secs_f64() / 1e6;
    eprintln!(
        "{burst} bytes in {took:?} ({rate:.0} MB/s; link cap 5 MB/s); write latency p50 {p50:?} p99 {p99:?} max {slowest:?}; max inflight {max_inflight}, max rpo {max_rpo} bytes / {max_age:.2} s; status after the burst {during:#}"
    );
    assert!(
        rate > 7.5,
        "the application wrote at {rate:.1} MB/s: held by the 5 MB/s link"
    );
    assert!(
        slowest < Duration::from_millis(300),
        "a write took {slowest:?}: held beyond the local write"
    );
    assert!(
        max_inflight <= inflight_max + 64 * 1024,
        "in-flight queue {max_inflight} above max_inflight_bytes {inflight_max}"
    );
    assert!(
        max_rpo > 0 && max_age > 0.0,
        "RPO not reported during the burst (max {max_rpo} bytes, {max_age} s)"
    );
    let s = a.wait_connected_in_sync(Duration::from_secs(90));
    assert_eq!(s["rpo_seconds"].as_f64().unwrap(), 0.0, "{s:#}");
    drop(c);
    a.stop();
    b.stop();
    assert_eq!(
        a.data_checksum(size),
        b.data_checksum(size),
        "images differ after the async catch-up"
    );
}
