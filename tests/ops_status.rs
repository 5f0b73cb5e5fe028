//! What an operator sees of a mirrored volume in each state: the `twinvol status` text
//! (snapshot files under tests/snapshots/) and the OpenMetrics text (parsed by a real
//! OpenMetrics parser, values checked), both rendered from the same typed
//! `twinvol::volume::VolumeStatus` the mirror produces.
//!
//! To accept a deliberate change of the text: `TWINVOL_UPDATE_SNAPSHOTS=1 cargo test --test
//! ops_status`, then review the diff of tests/snapshots/.

#[path = "support/openmetrics.rs"]
mod openmetrics;

use std::path::PathBuf;

use openmetrics::{family, value};
use twinvol::meta::gen::SplitBrainEvidence;
use twinvol::ops::{metrics, status_text};
use twinvol::repl::resync::ProgressReport;
use twinvol::volume::plan::Refusal;
use twinvol::volume::{Connection, Counters, ResyncRole, ResyncStatus, Role, VolumeStatus};

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

fn base() -> VolumeStatus {
    VolumeStatus {
        volume: "data".into(),
        node: "node-a".into(),
        role: Role::Primary,
        connection: Connection::Connected,
        disk: "up-to-date",
        mode: "sync",
        ahead: false,
        rpo_bytes: 0,
        rpo_seconds: 0.0,
        inflight_bytes: 128 * 1024,
        held_writes: 0,
        peer_outdated: false,
        resync: None,
        counters: Counters {
            data_bytes_sent: 12 * GIB,
            resync_bytes_sent: 0,
            data_bytes_applied: 0,
            resync_bytes_applied: 0,
            corrupt_frames: 0,
            connections: 1,
            ahead_events: 0,
            resync_bytes_in_sync: 0,
            frames_sent: 0,
            payload_bytes_sent: 0,
            wire_bytes_sent: 0,
            writes_sent: 0,
            activity_log_waits: 0,
            local_apply_errors: 0,
            peer_write_errors: 0,
            local_disk_errors: 0,
        },
        current_generation: "7a3f00c19e2b4d11".into(),
        link_error: None,
        newest: None,
        detached: None,
        wrote_alone: false,
        verify: None,
    }
}

fn connected_up_to_date() -> VolumeStatus {
    base()
}

/// The peer went away 42 s ago; every write since is only here.
fn disconnected() -> VolumeStatus {
    VolumeStatus {
        connection: Connection::Connecting,
        rpo_bytes: 96 * MIB,
        rpo_seconds: 42.4,
        inflight_bytes: 0,
        ..base()
    }
}

/// The peer is back and this node copies the 40 GiB it missed.
fn resyncing() -> VolumeStatus {
    let mut s = VolumeStatus {
        rpo_bytes: 30 * GIB,
        rpo_seconds: 600.0,
        resync: Some(ResyncStatus {
            role: ResyncRole::Source,
            progress: ProgressReport {
                total_bytes: 40 * GIB,
                done_bytes: 10 * GIB,
                left_bytes: 30 * GIB,
                rate_bytes_per_sec: 200 * MIB,
                eta_secs: Some(153),
            },
        }),
        ..base()
    };
    s.counters.resync_bytes_sent = 10 * GIB;
    s.counters.connections = 2;
    s
}

/// Both nodes were Primary while apart; the connection is refused until the operator chooses.
fn split_brain() -> VolumeStatus {
    VolumeStatus {
        connection: Connection::Refused {
            refusal: Refusal::SplitBrain {
                evidence: SplitBrainEvidence::BitmapIdsEqual {
                    common: 0x11,
                    local_current: 0x22,
                    peer_current: 0x33,
                },
                hint: "no data was copied; choose the copy to discard: set split_brain_policy = \"discard-node:<id>\" on both nodes, demote that node, and restart replication".into(),
            },
        },
        rpo_bytes: 2 * GIB,
        rpo_seconds: 3725.0,
        inflight_bytes: 0,
        ..base()
    }
}

/// Async mode overflowed its queue: the peer gets the data again through a resync later.
fn async_ahead() -> VolumeStatus {
    let mut s = VolumeStatus {
        mode: "async",
        ahead: true,
        rpo_bytes: 640 * MIB,
        rpo_seconds: 3.2,
        inflight_bytes: 64 * MIB,
        ..base()
    };
    s.counters.ahead_events = 2;
    s.counters.corrupt_frames = 1;
    s
}

fn snapshot(name: &str, actual: &str) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/snapshots")
        .join(format!("{name}.txt"));
    if std::env::var_os("TWINVOL_UPDATE_SNAPSHOTS").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; write it with TWINVOL_UPDATE_SNAPSHOTS=1 and review it",
            path.display()
        )
    });
    assert_eq!(
        actual, expected,
        "status text for {name} changed (TWINVOL_UPDATE_SNAPSHOTS=1 accepts it):\n{actual}"
    );
}

fn text(s: &VolumeStatus) -> String {
    status_text::render_mirror(&serde_json::to_value(s).unwrap())
}

fn scrape(s: &VolumeStatus) -> serde_json::Value {
    openmetrics::parse(&metrics::render_volume(&serde_json::to_value(s).unwrap()))
}

const V: (&str, &str) = ("volume", "data");

fn state(m: &serde_json::Value, family: &str, s: &str) -> f64 {
    value(m, family, &[V, (family, s)])
}

#[test]
fn connected_and_up_to_date() {
    let s = connected_up_to_date();
    let t = text(&s);
    snapshot("status_connected", &t);
    assert!(t.contains("replication: connected"), "{t}");
    let m = scrape(&s);
    assert_eq!(
        state(&m, "twinvol_volume_connection_state", "connected"),
        1.0
    );
    assert_eq!(
        state(&m, "twinvol_volume_connection_state", "connecting"),
        0.0
    );
    assert_eq!(state(&m, "twinvol_volume_disk_state", "up-to-date"), 1.0);
    assert_eq!(state(&m, "twinvol_volume_role", "primary"), 1.0);
    assert_eq!(state(&m, "twinvol_volume_mode", "sync"), 1.0);
    assert_eq!(value(&m, "twinvol_volume_rpo_bytes", &[V]), 0.0);
    assert_eq!(value(&m, "twinvol_volume_inflight_bytes", &[V]), 131072.0);
    assert_eq!(
        value(&m, "twinvol_volume_data_sent_bytes_total", &[V]),
        (12 * GIB) as f64
    );
    assert_eq!(value(&m, "twinvol_volume_resync_active", &[V]), 0.0);
    assert_eq!(
        family(&m, "twinvol_volume_rpo_bytes"),
        ("gauge".into(), "bytes".into())
    );
    assert_eq!(
        family(&m, "twinvol_volume_data_sent_bytes"),
        ("counter".into(), "bytes".into())
    );
    assert_eq!(family(&m, "twinvol_volume_connection_state").0, "stateset");
}

#[test]
fn disconnected_with_the_rpo_growing() {
    let s = disconnected();
    let t = text(&s);
    snapshot("status_disconnected", &t);
    assert!(t.contains("DISCONNECTED"), "{t}");
    assert!(t.contains("RPO 96.0 MiB (42.4 s)"), "{t}");
    let m = scrape(&s);
    assert_eq!(
        state(&m, "twinvol_volume_connection_state", "connecting"),
        1.0
    );
    assert_eq!(
        value(&m, "twinvol_volume_rpo_bytes", &[V]),
        (96 * MIB) as f64
    );
    assert_eq!(value(&m, "twinvol_volume_rpo_seconds", &[V]), 42.4);
    assert_eq!(
        family(&m, "twinvol_volume_rpo_seconds"),
        ("gauge".into(), "seconds".into())
    );
}

#[test]
fn resyncing_as_the_source_shows_progress_rate_and_eta() {
    let s = resyncing();
    let t = text(&s);
    snapshot("status_resyncing", &t);
    assert!(t.contains(" 25.0%"), "{t}");
    assert!(t.contains("200.0 MiB/s, ETA 2m33s"), "{t}");
    let m = scrape(&s);
    assert_eq!(value(&m, "twinvol_volume_resync_active", &[V]), 1.0);
    assert_eq!(state(&m, "twinvol_volume_resync_role", "source"), 1.0);
    assert_eq!(
        value(&m, "twinvol_volume_resync_left_bytes", &[V]),
        (30 * GIB) as f64
    );
    assert_eq!(
        value(&m, "twinvol_volume_resync_done_bytes", &[V]),
        (10 * GIB) as f64
    );
    assert_eq!(
        value(&m, "twinvol_volume_resync_rate_bytes_per_second", &[V]),
        (200 * MIB) as f64
    );
    assert_eq!(value(&m, "twinvol_volume_resync_eta_seconds", &[V]), 153.0);
    assert_eq!(
        value(&m, "twinvol_volume_resync_sent_bytes_total", &[V]),
        (10 * GIB) as f64
    );
}

#[test]
fn split_brain_refusal_names_the_next_step() {
    let s = split_brain();
    let t = text(&s);
    snapshot("status_split_brain", &t);
    assert!(t.contains("SPLIT BRAIN"), "{t}");
    assert!(t.contains("next step: no data was copied"), "{t}");
    let m = scrape(&s);
    assert_eq!(state(&m, "twinvol_volume_connection_state", "refused"), 1.0);
    assert_eq!(
        state(
            &m,
            "twinvol_volume_connection_refused_reason",
            "split-brain"
        ),
        1.0
    );
    assert_eq!(
        state(
            &m,
            "twinvol_volume_connection_refused_reason",
            "both-primary"
        ),
        0.0
    );
    assert_eq!(value(&m, "twinvol_volume_rpo_seconds", &[V]), 3725.0);
}

#[test]
fn async_ahead_shows_the_overflow_and_the_in_flight_bytes() {
    let s = async_ahead();
    let t = text(&s);
    snapshot("status_async_ahead", &t);
    assert!(t.contains("mode async, AHEAD"), "{t}");
    assert!(t.contains("corrupt frames 1 (!)"), "{t}");
    let m = scrape(&s);
    assert_eq!(value(&m, "twinvol_volume_ahead", &[V]), 1.0);
    assert_eq!(state(&m, "twinvol_volume_mode", "async"), 1.0);
    assert_eq!(value(&m, "twinvol_volume_ahead_events_total", &[V]), 2.0);
    assert_eq!(value(&m, "twinvol_volume_corrupt_frames_total", &[V]), 1.0);
    assert_eq!(
        value(&m, "twinvol_volume_inflight_bytes", &[V]),
        (64 * MIB) as f64
    );
}

/// The daemon's status with one mirrored volume: node lines, then the volume's replication
/// state with the peer's role and disk from the heartbeats; metrics from the same value.
#[test]
fn the_daemon_status_shows_the_replication_of_each_mirrored_volume() {
    let status = serde_json::json!({
        "node": "node-a", "priority": 10, "role": "primary", "yielding": false,
        "peer": "node-b",
        "peer_view": {"state": "alive", "role": "secondary", "disk": "inconsistent",
                      "priority": 20, "yielding": false, "wants_primary": false},
        "paths": [
            {"name": "service", "up": true, "received": 120, "refused": 0, "last_rx_ms_ago": 310},
            {"name": "replication", "up": false, "received": 80, "refused": 2}
        ],
        "witness": {"state": "reachable"}, "witness_probes": [],
        "fence": {"state": "idle"}, "reason": "Primary; peer alive",
        "volumes": [{"name": "data", "role": "primary", "disk": "up-to-date",
                     "export": "nbd+unix:///data?socket=/run/twinvol/data.sock",
                     "kind": "mirrored",
                     "replication": serde_json::to_value(resyncing()).unwrap()}],
        "last_sequence": {"kind": "bring-up", "failed_at": null, "elapsed_ms": 1840,
            "steps": [{"name": "fence peer", "ok": true, "elapsed_ms": 1200, "detail": "stopped"},
                      {"name": "hook start", "ok": true, "elapsed_ms": 640, "detail": "exit 0"}]},
        "primary_since_unix_ms": 1_700_000_000_000u64, "last_failover_ms": 6200,
        "failovers": 1, "previous_role": null, "cloud_plan": [], "uptime_ms": 86_400_000u64
    });
    let t = twinvol::cluster::control::render(&status);
    snapshot("status_daemon_mirrored", &t);
    assert!(
        t.contains("replication: connected; peer secondary, disk inconsistent"),
        "{t}"
    );
    let m = openmetrics::parse(&metrics::render_node(&status));
    assert_eq!(value(&m, "twinvol_heartbeat_paths_up", &[]), 1.0);
    assert_eq!(
        value(
            &m,
            "twinvol_heartbeats_refused_total",
            &[("path", "replication")]
        ),
        2.0
    );
    assert_eq!(
        value(
            &m,
            "twinvol_heartbeat_last_received_age_seconds",
            &[("path", "service")]
        ),
        0.31
    );
    assert_eq!(
        value(
            &m,
            "twinvol_peer_disk_state",
            &[("twinvol_peer_disk_state", "inconsistent")]
        ),
        1.0
    );
    assert_eq!(value(&m, "twinvol_failovers_total", &[]), 1.0);
    assert_eq!(
        value(&m, "twinvol_last_failover_duration_seconds", &[]),
        6.2
    );
    assert_eq!(
        value(
            &m,
            "twinvol_last_sequence_step_duration_seconds",
            &[("sequence", "bring-up"), ("step", "fence peer")]
        ),
        1.2
    );
    assert_eq!(value(&m, "twinvol_volume_exported", &[V]), 1.0);
    assert_eq!(
        value(&m, "twinvol_volume_resync_left_bytes", &[V]),
        (30 * GIB) as f64
    );
}

#[test]
fn the_daemon_status_shows_each_cloud_resource_check_and_the_aws_api_counters() {
    let status = serde_json::json!({
        "node": "node-a", "priority": 10, "role": "primary", "peer": "node-b",
        "peer_view": {"state": "lost"}, "paths": [], "witness": {"state": "reachable"},
        "fence": {"state": "idle"}, "reason": "Primary", "volumes": [],
        "failovers": 0, "uptime_ms": 60_000u64,
        "cloud_check": {"unix_ms": 1_700_000_000_000u64, "elapsed_ms": 420,
            "items": [
                {"resource": "route table rtb-0a", "health": "ok", "detail": ""},
                {"resource": "Elastic IP eipalloc-1", "health": "drift",
                 "detail": "associated with eni-peer, not eni-self"},
                {"resource": "DNS record db.example.com.", "health": "unknown",
                 "detail": "Route 53 did not answer within 5 s"}],
            "repairs": []},
        "cloud_api": {"operations": {
            "ec2:DescribeRouteTables": {"calls": 7, "errors": 0, "throttles": 2},
            "ec2:AssociateAddress": {"calls": 1, "errors": 1, "throttles": 0}}}
    });
    let t = twinvol::cluster::control::render(&status);
    assert!(t.contains("cloud resources (last check"), "{t}");
    assert!(t.contains("OK       route table rtb-0a"), "{t}");
    assert!(
        t.contains("DRIFT    Elastic IP eipalloc-1: associated with eni-peer, not eni-self"),
        "{t}"
    );
    assert!(t.contains("UNKNOWN  DNS record db.example.com."), "{t}");
    assert!(t.contains("AWS API: 8 calls, 1 errors, 2 throttled"), "{t}");
    let m = openmetrics::parse(&metrics::render_node(&status));
    assert_eq!(
        value(
            &m,
            "twinvol_cloud_resource_health",
            &[
                ("resource", "Elastic IP eipalloc-1"),
                ("twinvol_cloud_resource_health", "drift")
            ]
        ),
        1.0
    );
    assert_eq!(value(&m, "twinvol_cloud_check_duration_seconds", &[]), 0.42);
    assert_eq!(
        value(
            &m,
            "twinvol_aws_api_throttles_total",
            &[("service", "ec2"), ("action", "DescribeRouteTables")]
        ),
        2.0
    );
    assert_eq!(
        value(
            &m,
            "twinvol_aws_api_errors_total",
            &[("service", "ec2"), ("action", "AssociateAddress")]
        ),
        1.0
    );
}

#[test]
fn an_online_verify_result_and_checksum_resync_savings_are_shown() {
    let mut s = base();
    s.role = Role::Secondary;
    s.counters.resync_bytes_in_sync = 16_711_680;
    s.counters.frames_sent = 1000;
    s.counters.payload_bytes_sent = 100 << 20;
    s.counters.wire_bytes_sent = 21 << 20;
    s.counters.writes_sent = 40;
    s.verify = Some(twinvol::volume::status::VerifyStatus {
        running: false,
        checked_bytes: 256 << 20,
        total_bytes: 256 << 20,
        block_size: 4096,
        differing_blocks: 1,
        skipped_dirty_bytes: 0,
        elapsed_secs: 1.5,
        error: None,
    });
    let t = text(&s);
    assert!(
        t.contains(
            "verify: done 256.0 MiB of 256.0 MiB, 1 differing block(s) (marked and resynced)"
        ),
        "{t}"
    );
    let m = scrape(&s);
    assert_eq!(
        value(&m, "twinvol_volume_verify_differing_blocks", &[V]),
        1.0
    );
    assert_eq!(value(&m, "twinvol_volume_verify_progress_ratio", &[V]), 1.0);
    assert_eq!(
        value(&m, "twinvol_volume_resync_in_sync_bytes_total", &[V]),
        16_711_680.0
    );
    assert!(
        t.contains(
            "wire: 21.0 MiB for 100.0 MiB of payload in 1000 frames, 40 writes (ratio 0.21)"
        ),
        "{t}"
    );
    assert_eq!(value(&m, "twinvol_volume_wire_ratio", &[V]), 0.21);
    assert_eq!(value(&m, "twinvol_volume_frames_sent_total", &[V]), 1000.0);
    assert_eq!(value(&m, "twinvol_volume_writes_sent_total", &[V]), 40.0);
}

const BIN: &str = env!("CARGO_BIN_EXE_twinvol");

/// `twinvol status --status-file` reads what `twinvol mirror --status-file` writes.
#[test]
fn status_reads_a_mirror_status_file_as_text_json_and_watch() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("data.status.json");
    let s = split_brain();
    std::fs::write(&file, serde_json::to_vec_pretty(&s).unwrap()).unwrap();
    let out = std::process::Command::new(BIN)
        .args(["status", "--status-file"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8(out.stdout).unwrap(), text(&s));

    let out = std::process::Command::new(BIN)
        .args(["status", "--json", "--status-file"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v, serde_json::to_value(&s).unwrap());

    // --watch 1: the screen is cleared and redrawn every second, a failed read shows as a
    // frame with the error (the mirror may be restarting), not as an exit.
    let mut child = std::process::Command::new(BIN)
        .args(["status", "--watch", "1", "--status-file"])
        .arg(&file)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    std::fs::remove_file(&file).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1200));
    child.kill().unwrap();
    let out = child.wait_with_output().unwrap();
    let t = String::from_utf8(out.stdout).unwrap();
    let frames: Vec<&str> = t.split("\x1b[H\x1b[2J").filter(|f| !f.is_empty()).collect();
    assert!(frames.len() >= 2, "{t:?}");
    assert!(frames[0].contains("SPLIT BRAIN"), "{t:?}");
    assert!(
        frames
            .last()
            .unwrap()
            .contains("error: cannot read status file"),
        "{t:?}"
    );

    let out = std::process::Command::new(BIN)
        .args(["status", "--status-file"])
        .arg(dir.path().join("missing.json"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("twinvol mirror --status-file"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn held_writes_are_shown_in_the_text_and_the_metrics() {
    let s = VolumeStatus {
        held_writes: 3,
        ..disconnected()
    };
    let t = text(&s);
    assert!(
        t.contains("HOLDING 3 write(s)") && t.contains("outdate_wait_ms"),
        "{t}"
    );
    assert!(!text(&disconnected()).contains("HOLDING"));
    assert_eq!(value(&scrape(&s), "twinvol_volume_held_writes", &[V]), 3.0);
}
