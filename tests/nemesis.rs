//! A randomized fault harness in the spirit of Jepsen: two `twinvol run` daemons in network
//! namespaces (one veth pair per path, nftables drops), each volume on a file system that fails
//! on command, a client writing through NBD to whichever node serves and logging every
//! acknowledged write, and a nemesis drawing schedules of faults from a seed: SIGKILL, SIGSTOP
//! past the peer timeout, two-way and one-way partitions, a cut replication link, clean
//! restarts, switchovers and disk errors.
//!
//! After each schedule the faults are healed and the pair must converge (one Primary, the other
//! an up-to-date, connected Secondary); then a checker proves:
//! - every acknowledged write reads back from the Primary, never an older value (a write that
//!   failed may or may not have landed; only versions the client attempted may be read);
//! - no two nodes accepted writes in the same interval (each node's Primary intervals, from its
//!   log, against the client's log of which node acknowledged each write);
//! - both copies are identical.
//!
//! `NEMESIS_SCHEDULES` (default 15, about three minutes) and `NEMESIS_SEED` (default 1; schedule i uses seed + i)
//! choose the run (`NEMESIS_KEEP=1` keeps the lab's directory and logs); `scripts/nemesis.sh`
//! runs as many as wanted. A summary line per schedule and
//! totals go to stdout (`--nocapture`); an anomaly fails the test naming its seed.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::mirror_pair::FaultyFs;
use nix::sys::signal::Signal;
use twinvol::cluster::control::Request;
use twinvol::cluster::demo::{data_crc, Lab, LabOptions, NbdClient};

const BIN: &str = env!("CARGO_BIN_EXE_twinvol");
/// 4 KiB slots the client writes (the first 2 MiB of the volume).
const SLOTS: u64 = 512;
const BLOCK: usize = 4096;

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// A xorshift64* generator: schedules are reproducible from their seed.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The block the client writes as `version` of `slot`: both numbers, then a pattern of them.
fn block_of(slot: u64, version: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK];
    b[..8].copy_from_slice(&slot.to_be_bytes());
    b[8..16].copy_from_slice(&version.to_be_bytes());
    let mut x = (slot << 32 ^ version) | 1;
    for chunk in b[16..].chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_be_bytes()[..chunk.len()]);
    }
    b
}

/// What a block read back holds: `None` for never written (all zero), else `(slot, version)`
/// when the whole block is that version's pattern; `Err` for anything else (a torn or
/// foreign block).
fn decode(b: &[u8]) -> Result<Option<(u64, u64)>, String> {
    if b.iter().all(|x| *x == 0) {
        return Ok(None);
    }
    let slot = u64::from_be_bytes(b[..8].try_into().map_err(|_| "short")?);
    let version = u64::from_be_bytes(b[8..16].try_into().map_err(|_| "short")?);
    if block_of(slot, version) != b {
        return Err(format!(
            "a torn or foreign block claiming slot {slot} version {version}"
        ));
    }
    Ok(Some((slot, version)))
}

/// The client's log.
#[derive(Default)]
struct ClientLog {
    /// Per slot: the newest acknowledged version.
    acked: HashMap<u64, u64>,
    /// Per slot: the newest version attempted (acknowledged or not).
    attempted: HashMap<u64, u64>,
    /// (node, unix µs) of every acknowledgement.
    acks: Vec<(usize, u64)>,
    /// Writes that returned an error (their outcome is unknown).
    failed: u64,
}

/// Writes through NBD to whichever node serves, until stopped; pauses on request.
fn client(
    l: Arc<Mutex<Lab>>,
    log: Arc<Mutex<ClientLog>>,
    pause: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    seed: u64,
) {
    let mut rng = Rng::new(seed ^ 0xC1E7);
    let mut versions: HashMap<u64, u64> = HashMap::new();
    'outer: while !stop.load(Ordering::SeqCst) {
        if pause.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        let target = {
            let l = l.lock().unwrap();
            (0..2)
                .find(|n| l.status(*n).is_some_and(|s| s["role"] == "primary"))
                .map(|n| (n, l.exports[n].clone()))
        };
        let Some((node, export)) = target else {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        };
        let Ok(mut c) = NbdClient::connect(&export) else {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        };
        while !stop.load(Ordering::SeqCst) && !pause.load(Ordering::SeqCst) {
            let slot = rng.below(SLOTS);
            let v = versions.entry(slot).or_insert(0);
            *v += 1;
            let version = *v;
            log.lock().unwrap().attempted.insert(slot, version);
            match c.write(slot * BLOCK as u64, &block_of(slot, version)) {
                Ok(()) => {
                    let mut g = log.lock().unwrap();
                    let a = g.acked.entry(slot).or_insert(0);
                    *a = (*a).max(version);
                    g.acks.push((node, now_us()));
                }
                Err(_) => {
                    log.lock().unwrap().failed += 1;
                    continue 'outer;
                }
            }
        }
    }
}

/// One kind of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Fault {
    KillPrimary,
    KillSecondary,
    StopPrimary,
    Partition,
    OneWay,
    CutReplication,
    CleanRestart,
    Switchover,
    DiskError,
}

const FAULTS: [Fault; 9] = [
    Fault::KillPrimary,
    Fault::KillSecondary,
    Fault::StopPrimary,
    Fault::Partition,
    Fault::OneWay,
    Fault::CutReplication,
    Fault::CleanRestart,
    Fault::Switchover,
    Fault::DiskError,
];

fn primary_of(l: &Lab) -> Option<usize> {
    (0..2).find(|n| l.status(*n).is_some_and(|s| s["role"] == "primary"))
}

/// A node went away (killed, stopped) at a time: its Primary interval ends there.
struct Down {
    node: usize,
    at_us: u64,
}

/// Applies `f`; returns a description. `broken[n]`: node n's disk failed in this schedule.
fn apply(
    l: &mut Lab,
    fs: &[FaultyFs; 2],
    broken: &mut [bool; 2],
    f: Fault,
    rng: &mut Rng,
    downs: &mut Vec<Down>,
) -> String {
    let p = primary_of(l);
    let any = rng.below(2) as usize;
    match f {
        Fault::KillPrimary | Fault::KillSecondary => {
            let n = match (f, p) {
                (Fault::KillPrimary, Some(p)) => p,
                (Fault::KillSecondary, Some(p)) => 1 - p,
                _ => any,
            };
            downs.push(Down {
                node: n,
                at_us: now_us(),
            });
            l.kill(n);
            format!("SIGKILL node {n}")
        }
        Fault::StopPrimary => {
            let n = p.unwrap_or(any);
            downs.push(Down {
                node: n,
                at_us: now_us(),
            });
            l.signal(n, Signal::SIGSTOP);
            format!("SIGSTOP node {n}")
        }
        Fault::Partition => {
            let _ = l.cut_path(0, true);
            let _ = l.cut_path(1, true);
            "two-way partition".into()
        }
        Fault::OneWay => {
            let _ = l.deafen(any, true);
            format!("node {any} hears nothing")
        }
        Fault::CutReplication => {
            let _ = l.cut_replication(any, true);
            format!("replication cut at node {any}")
        }
        Fault::CleanRestart => {
            downs.push(Down {
                node: any,
                at_us: now_us(),
            });
            l.stop(any);
            let _ = l.start(any);
            format!("clean restart of node {any}")
        }
        Fault::Switchover => {
            let r = p.map(|p| l.request(p, &Request::Switchover).map(|a| a.message));
            format!("switchover ({r:?})")
        }
        Fault::DiskError => {
            let n = p.unwrap_or(any);
            fs[n].fail("all");
            broken[n] = true;
            format!("disk of node {n} fails")
        }
    }
}

/// Lifts every fault and restarts every node that is not running; a node whose disk failed
/// is restarted as an operator would after replacing the disk (its metadata is reopened).
fn heal(l: &mut Lab, fs: &[FaultyFs; 2], broken: &mut [bool; 2], downs: &mut Vec<Down>) {
    for f in fs {
        f.fail("none");
    }
    let _ = l.cut_path(0, false);
    let _ = l.cut_path(1, false);
    for n in 0..2 {
        let _ = l.deafen(n, false);
        let _ = l.cut_replication(n, false);
        l.signal(n, Signal::SIGCONT);
    }
    for (n, broken) in broken.iter_mut().enumerate() {
        if std::mem::take(broken) && !l.exited(n) {
            downs.push(Down {
                node: n,
                at_us: now_us(),
            });
            l.stop(n);
        }
        if l.exited(n) {
            let _ = l.start(n);
        }
    }
}

/// Waits until one node serves and the other is an up-to-date, connected Secondary.
fn converged(l: &Lab, within: Duration) -> Option<usize> {
    let t0 = Instant::now();
    while t0.elapsed() < within {
        let s: Vec<Option<serde_json::Value>> = (0..2).map(|n| l.status(n)).collect();
        if let (Some(a), Some(b)) = (&s[0], &s[1]) {
            for (p, (sp, ss)) in [(0, (a, b)), (1, (b, a))] {
                let r = &sp["volumes"][0]["replication"];
                if sp["role"] == "primary"
                    && ss["role"] == "secondary"
                    && ss["volumes"][0]["disk"] == "up-to-date"
                    && r["connection"]["state"] == "connected"
                    && r["resync"].is_null()
                    && r["rpo_bytes"] == 0
                {
                    return Some(p);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

/// Microseconds since the epoch of a log line's leading RFC 3339 UTC timestamp.
fn log_time_us(line: &str) -> Option<u64> {
    let t = line.get(..27)?;
    let num = |r: std::ops::Range<usize>| t.get(r)?.parse::<i64>().ok();
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss, us) = (num(11..13)?, num(14..16)?, num(17..19)?, num(20..26)?);
    // Days from the civil date (Howard Hinnant's algorithm).
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hh * 3600 + mm * 60 + ss;
    u64::try_from(secs * 1_000_000 + us).ok()
}

/// Node `n`'s Primary intervals (µs), from its log and the harness's record of it going down.
fn primary_intervals(l: &Lab, n: usize, downs: &[Down], end: u64) -> Vec<(u64, u64)> {
    let mut events: Vec<(u64, bool)> = l
        .log(n)
        .lines()
        .filter_map(|line| {
            let up = line.contains("promoted to Primary");
            let down = line.contains("demoted to Secondary");
            (up || down).then(|| log_time_us(line).map(|t| (t, up)))?
        })
        .collect();
    events.extend(
        downs
            .iter()
            .filter(|d| d.node == n)
            .map(|d| (d.at_us, false)),
    );
    events.sort();
    let mut out = Vec::new();
    let mut since = None;
    for (t, up) in events {
        match (up, since) {
            (true, None) => since = Some(t),
            (false, Some(s)) => {
                out.push((s, t));
                since = None;
            }
            _ => {}
        }
    }
    if let Some(s) = since {
        out.push((s, end));
    }
    out
}

/// One anomaly: its kind and what was seen.
struct Anomaly {
    kind: &'static str,
    detail: String,
}

/// Checks the invariants after convergence with `primary` serving and the client paused.
fn check(
    l: &Lab,
    primary: usize,
    log: &ClientLog,
    downs: &[Down],
    anomalies: &mut Vec<Anomaly>,
) -> u64 {
    let mut c = match NbdClient::connect(&l.exports[primary]) {
        Ok(c) => c,
        Err(e) => {
            anomalies.push(Anomaly {
                kind: "no export",
                detail: format!("node {primary}: {e}"),
            });
            return 0;
        }
    };
    let size = c.size;
    let mut checked = 0;
    for slot in 0..SLOTS {
        let got = match c.read(slot * BLOCK as u64, BLOCK as u32) {
            Ok(b) => b,
            Err(e) => {
                anomalies.push(Anomaly {
                    kind: "read failed",
                    detail: format!("slot {slot}: {e}"),
                });
                continue;
            }
        };
        let acked = log.acked.get(&slot).copied();
        let attempted = log.attempted.get(&slot).copied().unwrap_or(0);
        match (decode(&got), acked) {
            (Err(why), _) => anomalies.push(Anomaly {
                kind: "corrupt block",
                detail: format!("slot {slot}: {why}"),
            }),
            (Ok(None), Some(v)) => anomalies.push(Anomaly {
                kind: "lost write",
                detail: format!(
                    "slot {slot}: version {v} was acknowledged, the block reads as never written"
                ),
            }),
            (Ok(Some((s, v))), _) if s != slot => anomalies.push(Anomaly {
                kind: "misplaced write",
                detail: format!("slot {slot} holds slot {s} version {v}"),
            }),
            (Ok(Some((_, v))), Some(a)) if v < a => anomalies.push(Anomaly {
                kind: "lost write",
                detail: format!("slot {slot}: reads version {v}, version {a} was acknowledged"),
            }),
            (Ok(Some((_, v))), _) if v > attempted => anomalies.push(Anomaly {
                kind: "phantom write",
                detail: format!("slot {slot}: reads version {v}, never attempted past {attempted}"),
            }),
            _ => {}
        }
        if acked.is_some() {
            checked += 1;
        }
    }
    drop(c);
    // Both copies identical (nothing is written while the client is paused).
    let crcs: Vec<std::io::Result<u32>> = (0..2).map(|n| data_crc(&l.volumes[n], size)).collect();
    if let (Ok(a), Ok(b)) = (&crcs[0], &crcs[1]) {
        if a != b {
            anomalies.push(Anomaly {
                kind: "copies differ",
                detail: format!("crc {a:08x} vs {b:08x}"),
            });
        }
    }
    // No two nodes accepted writes in the same interval.
    let end = now_us();
    let ia = primary_intervals(l, 0, downs, end);
    let ib = primary_intervals(l, 1, downs, end);
    for (a0, a1) in &ia {
        for (b0, b1) in &ib {
            let (s, e) = ((*a0).max(*b0), (*a1).min(*b1));
            if s >= e {
                continue;
            }
            let by = |n| {
                log.acks
                    .iter()
                    .filter(|(node, t)| *node == n && *t >= s && *t < e)
                    .count()
            };
            if by(0) > 0 && by(1) > 0 {
                anomalies.push(Anomaly {
                    kind: "two writers",
                    detail: format!(
                        "both nodes acknowledged writes between {s} and {e} µs ({} and {})",
                        by(0),
                        by(1)
                    ),
                });
            }
        }
    }
    checked
}

fn options() -> LabOptions {
    let mut o = LabOptions {
        interval_ms: 250,
        timeout_ms: 1000,
        netns: true,
        volume_size: 32 << 20,
        // Above the standby's takeover time: no write is acknowledged alone while the peer
        // could still take over without it.
        outdate_wait_ms: 5000,
        extra_replication: "on_disk_error = \"failover\"\n".into(),
        ..Default::default()
    };
    for n in &mut o.nodes {
        n.fence_delay_ms = 1000;
        n.isolation_grace_ms = 1000;
    }
    o
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn nemesis_schedules_never_lose_an_acknowledged_write_or_let_two_nodes_write() {
    let schedules = env_u64("NEMESIS_SCHEDULES", 15);
    let seed0 = env_u64("NEMESIS_SEED", 1);
    let d = tempfile::tempdir().unwrap();
    if std::env::var_os("NEMESIS_KEEP").is_some() {
        println!("nemesis: lab in {} (kept)", d.path().display());
    }
    let o = options();
    let mut lab = Lab::new(d.path(), Path::new(BIN), &o)
        .expect("network-namespace lab (needs root, iproute2, nftables)");
    // Each node's volume on a file system that fails on command.
    let fs = [0, 1].map(|n| {
        let f = FaultyFs::mount(&d.path().join(format!("faulty-{n}")));
        let img = f.mount.join("volume.img");
        std::fs::copy(&lab.volumes[n], &img).unwrap();
        std::fs::remove_file(&lab.volumes[n]).unwrap();
        std::os::unix::fs::symlink(&img, &lab.volumes[n]).unwrap();
        f
    });
    lab.start(0).unwrap();
    lab.start(1).unwrap();
    assert!(
        converged(&lab, Duration::from_secs(30)).is_some(),
        "the pair never formed:\n{}\n{}",
        lab.log(0),
        lab.log(1)
    );
    let lab = Arc::new(Mutex::new(lab));
    let log = Arc::new(Mutex::new(ClientLog::default()));
    let pause = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (l, g, p, s) = (lab.clone(), log.clone(), pause.clone(), stop.clone());
        std::thread::spawn(move || client(l, g, p, s, seed0))
    };
    let mut per_kind: HashMap<Fault, u64> = HashMap::new();
    let mut downs: Vec<Down> = Vec::new();
    let mut anomalies: Vec<(u64, Anomaly)> = Vec::new();
    let mut checked_total = 0u64;
    for i in 0..schedules {
        let seed = seed0 + i;
        let mut rng = Rng::new(seed);
        let mut said = Vec::new();
        let steps = 2 + rng.below(3);
        let mut broken = [false; 2];
        for _ in 0..steps {
            let f = FAULTS[rng.below(FAULTS.len() as u64) as usize];
            *per_kind.entry(f).or_default() += 1;
            let what = apply(
                &mut lab.lock().unwrap(),
                &fs,
                &mut broken,
                f,
                &mut rng,
                &mut downs,
            );
            said.push(what);
            std::thread::sleep(Duration::from_millis(800 + rng.below(3200)));
        }
        heal(&mut lab.lock().unwrap(), &fs, &mut broken, &mut downs);
        let primary = converged(&lab.lock().unwrap(), Duration::from_secs(60));
        pause.store(true, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(300));
        let mut found = Vec::new();
        let checked = match primary {
            None => {
                let l = lab.lock().unwrap();
                found.push(Anomaly {
                    kind: "no convergence",
                    detail: format!(
                        "node-a:\n{}\nnode-b:\n{}",
                        l.log_tail(0, 40),
                        l.log_tail(1, 40)
                    ),
                });
                0
            }
            Some(p) => {
                // Settled again after the pause: a write in flight at the pause may be pending.
                let p = converged(&lab.lock().unwrap(), Duration::from_secs(30)).unwrap_or(p);
                check(
                    &lab.lock().unwrap(),
                    p,
                    &log.lock().unwrap(),
                    &downs,
                    &mut found,
                )
            }
        };
        checked_total += checked;
        let g = log.lock().unwrap();
        println!(
            "schedule seed {seed}: {} | acknowledged writes {} (slots checked {checked}), failed writes {}, anomalies {}",
            said.join(", "),
            g.acks.len(),
            g.failed,
            found.len()
        );
        drop(g);
        for a in &found {
            println!("ANOMALY seed {seed}: {}: {}", a.kind, a.detail);
        }
        let stuck = primary.is_none();
        anomalies.extend(found.into_iter().map(|a| (seed, a)));
        pause.store(false, Ordering::SeqCst);
        if stuck {
            // The pair is not serving: later schedules would only report this one again.
            break;
        }
    }
    stop.store(true, Ordering::SeqCst);
    let _ = writer.join();
    let g = log.lock().unwrap();
    let mut kinds: Vec<String> = per_kind.iter().map(|(k, v)| format!("{k:?} {v}")).collect();
    kinds.sort();
    println!(
        "nemesis: {schedules} schedules from seed {seed0}; faults: {}; acknowledged writes {}, failed writes {}, slot checks {checked_total}; anomalies {}",
        kinds.join(", "),
        g.acks.len(),
        g.failed,
        anomalies.len()
    );
    if std::env::var_os("NEMESIS_KEEP").is_some() {
        std::mem::forget(d);
    }
    let report: Vec<String> = anomalies
        .iter()
        .map(|(seed, a)| format!("seed {seed}: {}: {}", a.kind, a.detail))
        .collect();
    assert!(anomalies.is_empty(), "anomalies:\n{}", report.join("\n"));
}
