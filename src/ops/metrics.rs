//! `metrics`: the OpenMetrics endpoint (`GET /metrics`) of `twinvol run` and `twinvol mirror`.
//!
//! Rendering is pure: [`render_node`] takes the daemon's status value (what
//! `twinvol status --json` prints) and [`render_volume`] a mirror's [`VolumeStatus`] snapshot
//! (what `twinvol mirror --status-file` writes), and both return OpenMetrics 1.0 text: every
//! family with `# TYPE` and `# HELP` (and `# UNIT` when it has one, the name ending in it),
//! states as `stateset` families, the text ending in `# EOF`. Metric and label names are fixed
//! here; label values (volume and path names) are escaped.
//!
//! [`MetricsServer`] is a tiny HTTP/1.1 server: `GET`/`HEAD /metrics` answers with content type
//! [`CONTENT_TYPE`], anything else 404/405, one request per connection. Where the text comes
//! from is a [`Source`]: the daemon asks its control loop for a fresh status per scrape (a hung
//! loop shows as a failing scrape), the mirror publishes its 100 ms snapshot.
//!
//! [`VolumeStatus`]: crate::volume::VolumeStatus

use std::fmt::Write as _;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The content type of the answer (OpenMetrics text format 1.0.0).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The path scraped.
pub const PATH: &str = "/metrics";
/// Largest request head read before answering 400.
const MAX_REQUEST: usize = 8 * 1024;
/// A client that sends nothing for this long is dropped.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// A status that takes longer than this to obtain fails the scrape with 503.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);

/// Volume disk states, in the order they are listed.
const DISK_STATES: [&str; 4] = ["up-to-date", "consistent", "inconsistent", "outdated"];
/// Roles.
const ROLES: [&str; 2] = ["primary", "secondary"];

/// The type of a metric family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Gauge,
    Counter,
    StateSet,
    Info,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Gauge => "gauge",
            Kind::Counter => "counter",
            Kind::StateSet => "stateset",
            Kind::Info => "info",
        }
    }
}

struct Family {
    name: &'static str,
    kind: Kind,
    unit: Option<&'static str>,
    help: &'static str,
    samples: Vec<String>,
}

/// Collects samples per family and writes them family by family (OpenMetrics requires the
/// samples of a family to be contiguous).
///
/// Invariant: a family name is registered once with one kind, unit and help; a unit is always
/// the name's last component; families without samples are not written.
#[derive(Default)]
struct Writer {
    families: Vec<Family>,
}

type Labels<'a> = &'a [(&'a str, &'a str)];

/// Escapes a label value: backslash, double quote and newline.
fn escape(v: &str) -> String {
    let mut o = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => o.push_str("\\\\"),
            '"' => o.push_str("\\\""),
            '\n' => o.push_str("\\n"),
            c => o.push(c),
        }
    }
    o
}

fn label_text(labels: Labels<'_>, extra: Option<(&str, &str)>) -> String {
    let all: Vec<String> = labels
        .iter()
        .copied()
        .chain(extra)
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .collect();
    if all.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", all.join(","))
    }
}

/// A number as OpenMetrics writes it.
fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v == f64::INFINITY {
        "+Inf".into()
    } else if v == f64::NEG_INFINITY {
        "-Inf".into()
    } else {
        format!("{v}")
    }
}

impl Writer {
    fn family(
        &mut self,
        name: &'static str,
        kind: Kind,
        unit: Option<&'static str>,
        help: &'static str,
    ) -> &mut Family {
        debug_assert!(unit.is_none_or(|u| name.ends_with(&format!("_{u}"))));
        let i = match self.families.iter().position(|f| f.name == name) {
            Some(i) => i,
            None => {
                self.families.push(Family {
                    name,
                    kind,
                    unit,
                    help,
                    samples: vec![],
                });
                self.families.len() - 1
            }
        };
        &mut self.families[i]
    }

    fn gauge(
        &mut self,
        name: &'static str,
        unit: Option<&'static str>,
        help: &'static str,
        labels: Labels<'_>,
        v: f64,
    ) {
        let line = format!("{name}{} {}", label_text(labels, None), number(v));
        self.family(name, Kind::Gauge, unit, help)
            .samples
            .push(line);
    }

    fn counter(
        &mut self,
        name: &'static str,
        unit: Option<&'static str>,
        help: &'static str,
        labels: Labels<'_>,
        v: u64,
    ) {
        let line = format!("{name}_total{} {v}", label_text(labels, None));
        self.family(name, Kind::Counter, unit, help)
            .samples
            .push(line);
    }

    /// One sample per state, 1 for `current` and 0 for the others; a `current` outside
    /// `states` is added as its own state so nothing is hidden.
    fn stateset(
        &mut self,
        name: &'static str,
        help: &'static str,
        labels: Labels<'_>,
        states: &[&str],
        current: &str,
    ) {
        let mut all: Vec<&str> = states.to_vec();
        if !all.contains(&current) {
            all.push(current);
        }
        let lines: Vec<String> = all
            .iter()
            .map(|s| {
                format!(
                    "{name}{} {}",
                    label_text(labels, Some((name, s))),
                    u8::from(*s == current)
                )
            })
            .collect();
        self.family(name, Kind::StateSet, None, help)
            .samples
            .extend(lines);
    }

    fn info(&mut self, name: &'static str, help: &'static str, labels: Labels<'_>) {
        let line = format!("{name}_info{} 1", label_text(labels, None));
        self.family(name, Kind::Info, None, help).samples.push(line);
    }

    fn finish(self) -> String {
        let mut o = String::new();
        for f in self.families.iter().filter(|f| !f.samples.is_empty()) {
            let _ = writeln!(o, "# TYPE {} {}", f.name, f.kind.name());
            if let Some(u) = f.unit {
                let _ = writeln!(o, "# UNIT {} {u}", f.name);
            }
            let _ = writeln!(o, "# HELP {} {}", f.name, f.help);
            for s in &f.samples {
                o.push_str(s);
                o.push('\n');
            }
        }
        o.push_str("# EOF\n");
        o
    }
}

fn text<'a>(v: &'a Value, default: &'a str) -> &'a str {
    v.as_str().unwrap_or(default)
}

fn num(v: &Value) -> Option<f64> {
    v.as_f64()
}

/// The metrics of one mirrored volume's replication status (a serialised
/// [`crate::volume::VolumeStatus`]), labelled `volume=...`.
fn replication(w: &mut Writer, labels: Labels<'_>, r: &Value) {
    let conn = text(&r["connection"]["state"], "unknown");
    w.stateset(
        "twinvol_volume_connection_state",
        "Replication connection of the volume.",
        labels,
        &["connecting", "connected", "refused"],
        conn,
    );
    if conn == "refused" {
        w.stateset(
            "twinvol_volume_connection_refused_reason",
            "Why the last replication connection was refused (split-brain needs the operator).",
            labels,
            &[
                "split-brain",
                "unrelated-data",
                "source-inconsistent",
                "target-is-primary",
                "both-primary",
                "ambiguous",
            ],
            text(&r["connection"]["refused"], "unknown"),
        );
    }
    let link_error = &r["link_error"];
    w.gauge(
        "twinvol_volume_link_failed_attempts",
        None,
        "Attempts in a row that failed to connect the replication link the same way (0 once connected).",
        labels,
        num(&link_error["attempts"]).unwrap_or(0.0),
    );
    w.gauge(
        "twinvol_volume_link_needs_operator",
        None,
        "1 while the replication link fails in a way retrying cannot fix (keys, version, identity, addresses).",
        labels,
        if link_error["needs_operator"] == true { 1.0 } else { 0.0 },
    );
    w.stateset(
        "twinvol_volume_mode",
        "Replication mode: sync acknowledges writes after the peer has them, async before.",
        labels,
        &["sync", "async"],
        text(&r["mode"], "unknown"),
    );
    w.gauge(
        "twinvol_volume_ahead",
        None,
        "1 while async replication is ahead: the queue overflowed and only the bitmap tracks writes.",
        labels,
        if r["ahead"] == true { 1.0 } else { 0.0 },
    );
    let gauges: [(&'static str, Option<&'static str>, &'static str, &str); 4] = [
        (
            "twinvol_volume_rpo_bytes",
            Some("bytes"),
            "Bytes written here the peer may not have (bitmap granularity).",
            "rpo_bytes",
        ),
        (
            "twinvol_volume_rpo_seconds",
            Some("seconds"),
            "Age of the oldest write the peer may not have; 0 when it has all.",
            "rpo_seconds",
        ),
        (
            "twinvol_volume_inflight_bytes",
            Some("bytes"),
            "Bytes sent to the peer and not yet acknowledged.",
            "inflight_bytes",
        ),
        (
            "twinvol_volume_held_writes",
            None,
            "Writes not acknowledged until the peer's copy is outdated or the connection is back (outdate_wait_ms).",
            "held_writes",
        ),
    ];
    for (name, unit, help, key) in gauges {
        if let Some(v) = num(&r[key]) {
            w.gauge(name, unit, help, labels, v);
        }
    }
    let resync = &r["resync"];
    w.gauge(
        "twinvol_volume_resync_active",
        None,
        "1 while a resync runs.",
        labels,
        if resync.is_object() { 1.0 } else { 0.0 },
    );
    if resync.is_object() {
        w.stateset(
            "twinvol_volume_resync_role",
            "Direction of the running resync: source sends, target receives.",
            labels,
            &["source", "target"],
            text(&resync["role"], "unknown"),
        );
        let gauges: [(&'static str, Option<&'static str>, &'static str, &str); 5] = [
            (
                "twinvol_volume_resync_total_bytes",
                Some("bytes"),
                "Bytes the running resync copies in all.",
                "total_bytes",
            ),
            (
                "twinvol_volume_resync_done_bytes",
                Some("bytes"),
                "Bytes the running resync has copied.",
                "done_bytes",
            ),
            (
                "twinvol_volume_resync_left_bytes",
                Some("bytes"),
                "Bytes the running resync still has to copy.",
                "left_bytes",
            ),
            (
                "twinvol_volume_resync_rate_bytes_per_second",
                None,
                "Average resync rate so far, bytes per second.",
                "rate_bytes_per_sec",
            ),
            (
                "twinvol_volume_resync_eta_seconds",
                Some("seconds"),
                "Estimated time to the end of the resync at that rate.",
                "eta_secs",
            ),
        ];
        for (name, unit, help, key) in gauges {
            if let Some(v) = num(&resync[key]) {
                w.gauge(name, unit, help, labels, v);
            }
        }
    }
    let c = &r["counters"];
    let counters: [(&'static str, Option<&'static str>, &'static str, &str); 15] = [
        (
            "twinvol_volume_data_sent_bytes",
            Some("bytes"),
            "Application write bytes sent to the peer.",
            "data_bytes_sent",
        ),
        (
            "twinvol_volume_resync_sent_bytes",
            Some("bytes"),
            "Resync bytes sent to the peer.",
            "resync_bytes_sent",
        ),
        (
            "twinvol_volume_data_applied_bytes",
            Some("bytes"),
            "Write bytes received from the peer and applied here.",
            "data_bytes_applied",
        ),
        (
            "twinvol_volume_resync_applied_bytes",
            Some("bytes"),
            "Resync bytes received from the peer and applied here.",
            "resync_bytes_applied",
        ),
        (
            "twinvol_volume_corrupt_frames",
            None,
            "Replication frames refused because a CRC or framing check failed (never written).",
            "corrupt_frames",
        ),
        (
            "twinvol_volume_local_apply_errors",
            None,
            "Replicated writes this node failed to store (each left this copy Outdated, or Inconsistent during a resync).",
            "local_apply_errors",
        ),
        (
            "twinvol_volume_peer_write_errors",
            None,
            "Writes the peer failed to store (each stayed dirty here; the peer's copy is Outdated, or Inconsistent during a resync).",
            "peer_write_errors",
        ),
        (
            "twinvol_volume_connections",
            None,
            "Replication connections established.",
            "connections",
        ),
        (
            "twinvol_volume_ahead_events",
            None,
            "Times async replication went ahead (queue overflow).",
            "ahead_events",
        ),
        (
            "twinvol_volume_frames_sent",
            None,
            "Replication frames sent.",
            "frames_sent",
        ),
        (
            "twinvol_volume_writes_sent",
            None,
            "Socket writes that carried the replication frames sent.",
            "writes_sent",
        ),
        (
            "twinvol_volume_payload_sent_bytes",
            Some("bytes"),
            "Bytes of the frames sent, before compression.",
            "payload_bytes_sent",
        ),
        (
            "twinvol_volume_wire_sent_bytes",
            Some("bytes"),
            "Bytes of the frames sent, on the wire (headers, compressed or raw payloads).",
            "wire_bytes_sent",
        ),
        (
            "twinvol_volume_resync_in_sync_bytes",
            Some("bytes"),
            "Checksum resync: dirty bytes found identical on both copies and not sent.",
            "resync_bytes_in_sync",
        ),
        (
            "twinvol_volume_activity_log_waits",
            None,
            "Application writes that waited for an activity-log slot (every slot had writes in flight).",
            "activity_log_waits",
        ),
    ];
    for (name, unit, help, key) in counters {
        if let Some(v) = c[key].as_u64() {
            w.counter(name, unit, help, labels, v);
        }
    }
    if let (Some(wire), Some(payload)) = (
        c["wire_bytes_sent"].as_u64(),
        c["payload_bytes_sent"].as_u64(),
    ) {
        if payload > 0 {
            w.gauge(
                "twinvol_volume_wire_ratio",
                Some("ratio"),
                "Wire bytes / payload bytes sent so far (below 1: compression saves).",
                labels,
                wire as f64 / payload as f64,
            );
        }
    }
    let vf = &r["verify"];
    if vf.is_object() {
        w.gauge(
            "twinvol_volume_verify_running",
            None,
            "1 while an online verify walks the device.",
            labels,
            if vf["running"] == true { 1.0 } else { 0.0 },
        );
        if let (Some(done), Some(total)) =
            (vf["checked_bytes"].as_u64(), vf["total_bytes"].as_u64())
        {
            w.gauge(
                "twinvol_volume_verify_progress_ratio",
                Some("ratio"),
                "Fraction of the device the last online verify compared.",
                labels,
                if total == 0 {
                    0.0
                } else {
                    done as f64 / total as f64
                },
            );
        }
        if let Some(n) = vf["differing_blocks"].as_u64() {
            w.gauge(
                "twinvol_volume_verify_differing_blocks",
                None,
                "Blocks the last online verify found different from the peer (then resynced).",
                labels,
                n as f64,
            );
        }
    }
}

fn volume_role_and_disk(w: &mut Writer, labels: Labels<'_>, role: &str, disk: &str) {
    w.stateset(
        "twinvol_volume_role",
        "Role of this node for the volume.",
        labels,
        &ROLES,
        role,
    );
    w.stateset(
        "twinvol_volume_disk_state",
        "State of this node's copy of the volume.",
        labels,
        &DISK_STATES,
        disk,
    );
}

/// OpenMetrics text for one `twinvol mirror` process: `status` is its snapshot (a serialised
/// [`crate::volume::VolumeStatus`], as written to `--status-file`).
pub fn render_volume(status: &Value) -> String {
    let mut w = Writer::default();
    let name = text(&status["volume"], "");
    let labels: &[(&str, &str)] = &[("volume", name)];
    volume_role_and_disk(
        &mut w,
        labels,
        text(&status["role"], "unknown"),
        text(&status["disk"], "unknown"),
    );
    replication(&mut w, labels, status);
    w.finish()
}

/// OpenMetrics text for the node daemon: `status` is the value its control socket answers
/// (`twinvol status --json`).
pub fn render_node(status: &Value) -> String {
    let mut w = Writer::default();
    w.info(
        "twinvol_node",
        "This node and its peer.",
        &[
            ("node", text(&status["node"], "")),
            ("peer", text(&status["peer"], "")),
        ],
    );
    w.stateset(
        "twinvol_node_role",
        "Role of this node in the cluster.",
        &[],
        &ROLES,
        text(&status["role"], "unknown"),
    );
    w.gauge(
        "twinvol_node_standing_down",
        None,
        "1 while this node stands down for the peer (operator demote or switchover).",
        &[],
        if status["yielding"] == true { 1.0 } else { 0.0 },
    );
    let peer = &status["peer_view"];
    w.stateset(
        "twinvol_peer_state",
        "The peer as the heartbeats show it.",
        &[],
        &["alive", "unknown", "lost"],
        text(&peer["state"], "unknown"),
    );
    if peer["state"] == "alive" {
        w.stateset(
            "twinvol_peer_role",
            "Role the peer advertises in its heartbeats.",
            &[],
            &ROLES,
            text(&peer["role"], "unknown"),
        );
        w.stateset(
            "twinvol_peer_disk_state",
            "Disk state the peer advertises in its heartbeats.",
            &[],
            &DISK_STATES,
            text(&peer["disk"], "unknown"),
        );
    }
    let paths = status["paths"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    w.gauge(
        "twinvol_heartbeat_paths_up",
        None,
        "Heartbeat paths with a valid heartbeat within the timeout.",
        &[],
        paths.iter().filter(|p| p["up"] == true).count() as f64,
    );
    for p in paths {
        let labels: &[(&str, &str)] = &[("path", text(&p["name"], ""))];
        w.gauge(
            "twinvol_heartbeat_path_up",
            None,
            "1 while the heartbeat path is up.",
            labels,
            if p["up"] == true { 1.0 } else { 0.0 },
        );
        if let Some(v) = p["received"].as_u64() {
            w.counter(
                "twinvol_heartbeats_received",
                None,
                "Valid heartbeats received on the path.",
                labels,
                v,
            );
        }
        if let Some(v) = p["refused"].as_u64() {
            w.counter(
                "twinvol_heartbeats_refused",
                None,
                "Datagrams refused on the path (bad key, wrong node or sender).",
                labels,
                v,
            );
        }
        if let Some(ms) = p["last_rx_ms_ago"].as_u64() {
            w.gauge(
                "twinvol_heartbeat_last_received_age_seconds",
                Some("seconds"),
                "Time since the last valid heartbeat on the path.",
                labels,
                ms as f64 / 1000.0,
            );
        }
    }
    w.stateset(
        "twinvol_witness_state",
        "What the witness probes last said.",
        &[],
        &["disabled", "unknown", "reachable", "unreachable"],
        text(&status["witness"]["state"], "unknown"),
    );
    w.stateset(
        "twinvol_fence_state",
        "Progress of fencing the peer (querying / peer-stopped: fence = \"off\", asking the cloud whether the peer instance is stopped).",
        &[],
        &[
            "idle",
            "waiting",
            "in-progress",
            "fenced",
            "querying",
            "peer-stopped",
            "failed",
        ],
        text(&status["fence"]["state"], "unknown"),
    );
    w.counter(
        "twinvol_failovers",
        None,
        "Completed failovers: the peer was lost and this node became Primary.",
        &[],
        status["failovers"].as_u64().unwrap_or(0),
    );
    if let Some(ms) = status["last_failover_ms"].as_u64() {
        w.gauge(
            "twinvol_last_failover_duration_seconds",
            Some("seconds"),
            "Last failover: time from peer lost to Primary with the service up.",
            &[],
            ms as f64 / 1000.0,
        );
    }
    let seq = &status["last_sequence"];
    if seq.is_object() {
        let kind = text(&seq["kind"], "");
        w.gauge(
            "twinvol_last_sequence_failed",
            None,
            "1 when a step of the last bring-up or teardown failed.",
            &[("sequence", kind)],
            if seq["failed_at"].is_string() {
                1.0
            } else {
                0.0
            },
        );
        if let Some(ms) = seq["elapsed_ms"].as_u64() {
            w.gauge(
                "twinvol_last_sequence_duration_seconds",
                Some("seconds"),
                "Duration of the last bring-up or teardown.",
                &[("sequence", kind)],
                ms as f64 / 1000.0,
            );
        }
        for st in seq["steps"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
            if let Some(ms) = st["elapsed_ms"].as_u64() {
                w.gauge(
                    "twinvol_last_sequence_step_duration_seconds",
                    Some("seconds"),
                    "Duration of each step of the last bring-up or teardown.",
                    &[("sequence", kind), ("step", text(&st["name"], ""))],
                    ms as f64 / 1000.0,
                );
            }
        }
    }
    if let Some(c) = status["cloud_check"].as_object() {
        for it in c
            .get("items")
            .and_then(|v| v.as_array())
            .map(Vec::as_slice)
            .unwrap_or(&[])
        {
            w.stateset(
                "twinvol_cloud_resource_health",
                "Last cloud monitor cycle (Primary only): does the resource point at this node.",
                &[("resource", text(&it["resource"], ""))],
                &["ok", "drift", "unknown"],
                text(&it["health"], "unknown"),
            );
        }
        if let Some(ms) = c.get("elapsed_ms").and_then(|v| v.as_u64()) {
            w.gauge(
                "twinvol_cloud_check_duration_seconds",
                Some("seconds"),
                "Duration of the last cloud monitor cycle.",
                &[],
                ms as f64 / 1000.0,
            );
        }
    }
    if let Some(ops) = status["cloud_api"]["operations"].as_object() {
        for (op, v) in ops {
            let (service, action) = op.split_once(':').unwrap_or(("", op.as_str()));
            let labels: &[(&str, &str)] = &[("service", service), ("action", action)];
            w.counter(
                "twinvol_aws_api_calls",
                None,
                "AWS API operations issued (a throttled retry counts again).",
                labels,
                v["calls"].as_u64().unwrap_or(0),
            );
            w.counter(
                "twinvol_aws_api_errors",
                None,
                "AWS API operations that ended in an error.",
                labels,
                v["errors"].as_u64().unwrap_or(0),
            );
            w.counter(
                "twinvol_aws_api_throttles",
                None,
                "AWS API throttling answers (RequestLimitExceeded, Throttling, ...).",
                labels,
                v["throttles"].as_u64().unwrap_or(0),
            );
        }
    }
    if let Some(ms) = status["uptime_ms"].as_u64() {
        w.gauge(
            "twinvol_uptime_seconds",
            Some("seconds"),
            "Time since the daemon started.",
            &[],
            ms as f64 / 1000.0,
        );
    }
    for v in status["volumes"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[])
    {
        let labels: &[(&str, &str)] = &[("volume", text(&v["name"], ""))];
        let r = &v["replication"];
        let (role, disk) = if r.is_object() {
            (text(&r["role"], "unknown"), text(&r["disk"], "unknown"))
        } else {
            (text(&v["role"], "unknown"), text(&v["disk"], "unknown"))
        };
        volume_role_and_disk(&mut w, labels, role, disk);
        w.gauge(
            "twinvol_volume_exported",
            None,
            "1 while the volume is exported over NBD here.",
            labels,
            if v["export"].is_string() { 1.0 } else { 0.0 },
        );
        if r.is_object() {
            replication(&mut w, labels, r);
        }
    }
    w.finish()
}

/// One scrape: the rendered text, or why there is none (answered with 503).
pub type Scrape = Pin<Box<dyn Future<Output = Result<String, String>> + Send>>;
/// Where a scrape's text comes from.
pub type Source = Arc<dyn Fn() -> Scrape + Send + Sync>;

/// A source serving the latest published text (the mirror publishes every 100 ms).
///
/// Invariant: before the first publish, scrapes fail with 503 rather than show empty values.
#[derive(Clone)]
pub struct Published(Arc<tokio::sync::watch::Sender<Option<String>>>);

impl Default for Published {
    fn default() -> Self {
        Self(Arc::new(tokio::sync::watch::Sender::new(None)))
    }
}

impl Published {
    /// Replaces the text served.
    pub fn publish(&self, text: String) {
        self.0.send_replace(Some(text));
    }

    /// Renders and publishes a mirror's snapshot; a snapshot that does not serialise is skipped.
    pub fn publish_volume(&self, status: &crate::volume::VolumeStatus) {
        if let Ok(v) = serde_json::to_value(status) {
            self.publish(render_volume(&v));
        }
    }

    /// The source to serve from.
    pub fn source(&self) -> Source {
        let rx = self.0.subscribe();
        Arc::new(move || {
            let text = rx.borrow().clone();
            Box::pin(async move { text.ok_or_else(|| "no status yet".to_string()) })
        })
    }
}

/// Errors of the metrics endpoint.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The listening socket could not be bound.
    #[error("cannot listen for metrics scrapes on {addr}: {source} (free the port or change cluster.metrics_listen / --metrics-listen)")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// What a request head asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `GET /metrics` (or `HEAD`: headers only).
    Metrics {
        /// HEAD: no body.
        head_only: bool,
    },
    /// Another path.
    NotFound,
    /// Another method.
    BadMethod,
}

/// Routes a request head; `None` while it is incomplete (no blank line yet).
pub fn route(head: &[u8]) -> Option<Route> {
    let end = head.windows(4).position(|w| w == b"\r\n\r\n")?;
    let line = std::str::from_utf8(&head[..end])
        .ok()
        .and_then(|h| h.lines().next())
        .unwrap_or("");
    let mut parts = line.split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let target = target.split('?').next().unwrap_or("");
    Some(match (method, target == PATH) {
        ("GET", true) => Route::Metrics { head_only: false },
        ("HEAD", true) => Route::Metrics { head_only: true },
        ("GET" | "HEAD", false) => Route::NotFound,
        _ => Route::BadMethod,
    })
}

/// A bound metrics endpoint.
pub struct MetricsServer {
    listener: tokio::net::TcpListener,
    source: Source,
}

impl MetricsServer {
    /// Binds `addr`; serve with [`MetricsServer::run`].
    pub async fn bind(addr: SocketAddr, source: Source) -> Result<Self, MetricsError> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| MetricsError::Bind { addr, source })?;
        Ok(Self { listener, source })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Answers scrapes until the task is dropped.
    pub async fn run(self) {
        loop {
            let Ok((sock, _)) = self.listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            tokio::spawn(answer(sock, self.source.clone()));
        }
    }
}

async fn answer(mut sock: tokio::net::TcpStream, source: Source) {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let r = loop {
        if let Some(r) = route(&head) {
            break r;
        }
        if head.len() > MAX_REQUEST {
            return reply(
                &mut sock,
                "400 Bad Request",
                "text/plain",
                "request too large\n",
                false,
            )
            .await;
        }
        match tokio::time::timeout(READ_TIMEOUT, sock.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => head.extend_from_slice(&buf[..n]),
            _ => return,
        }
    };
    match r {
        Route::Metrics { head_only } => match tokio::time::timeout(SCRAPE_TIMEOUT, source()).await {
            Ok(Ok(text)) => reply(&mut sock, "200 OK", CONTENT_TYPE, &text, head_only).await,
            Ok(Err(why)) => {
                let body = format!("no metrics: {why}\n");
                reply(
                    &mut sock,
                    "503 Service Unavailable",
                    "text/plain",
                    &body,
                    head_only,
                )
                .await
            }
            Err(_) => reply(
                &mut sock,
                "503 Service Unavailable",
                "text/plain",
                "no metrics: the status did not arrive within 5 s (is the control loop stuck?)\n",
                head_only,
            )
            .await,
        },
        Route::NotFound => {
            reply(
                &mut sock,
                "404 Not Found",
                "text/plain",
                "not found: scrape /metrics\n",
                false,
            )
            .await
        }
        Route::BadMethod => {
            reply(
                &mut sock,
                "405 Method Not Allowed",
                "text/plain",
                "use GET\n",
                false,
            )
            .await
        }
    }
}

async fn reply(
    sock: &mut tokio::net::TcpStream,
    status: &str,
    content_type: &str,
    body: &str,
    head_only: bool,
) {
    let msg = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
        body.len(),
        if head_only { "" } else { body }
    );
    let _ = sock.write_all(msg.as_bytes()).await;
    let _ = sock.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repl::resync::ProgressReport;
    use crate::volume::status::{Connection, Counters, ResyncRole, ResyncStatus, Role};
    use crate::volume::VolumeStatus;

    fn mirror_status() -> VolumeStatus {
        VolumeStatus {
            volume: "data".into(),
            node: "node-a".into(),
            role: Role::Primary,
            connection: Connection::Connected,
            disk: "up-to-date",
            mode: "async",
            ahead: true,
            rpo_bytes: 1 << 20,
            rpo_seconds: 2.5,
            inflight_bytes: 65536,
            held_writes: 2,
            peer_outdated: false,
            resync: Some(ResyncStatus {
                role: ResyncRole::Source,
                progress: ProgressReport {
                    total_bytes: 1000,
                    done_bytes: 250,
                    left_bytes: 750,
                    rate_bytes_per_sec: 50,
                    eta_secs: Some(15),
                },
            }),
            counters: Counters {
                data_bytes_sent: 11,
                resync_bytes_sent: 22,
                data_bytes_applied: 33,
                resync_bytes_applied: 44,
                corrupt_frames: 3,
                connections: 2,
                ahead_events: 1,
                resync_bytes_in_sync: 55,
                frames_sent: 0,
                payload_bytes_sent: 0,
                wire_bytes_sent: 0,
                writes_sent: 0,
                activity_log_waits: 6,
                local_apply_errors: 0,
                peer_write_errors: 2,
                local_disk_errors: 0,
            },
            current_generation: "00ff".into(),
            link_error: None,
            newest: None,
            detached: None,
            wrote_alone: false,
            verify: None,
        }
    }

    fn sample<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
        text.lines()
            .find(|l| l.starts_with(prefix) && l[prefix.len()..].starts_with(' '))
            .map(|l| &l[prefix.len() + 1..])
    }

    #[test]
    fn a_mirror_snapshot_renders_every_replication_metric_with_its_value() {
        let t = render_volume(&serde_json::to_value(mirror_status()).unwrap());
        assert!(t.ends_with("# EOF\n"), "{t}");
        let v = |p: &str| sample(&t, p).unwrap_or_else(|| panic!("{p} missing in\n{t}"));
        assert_eq!(v("twinvol_volume_rpo_bytes{volume=\"data\"}"), "1048576");
        assert_eq!(v("twinvol_volume_rpo_seconds{volume=\"data\"}"), "2.5");
        assert_eq!(v("twinvol_volume_inflight_bytes{volume=\"data\"}"), "65536");
        assert_eq!(v("twinvol_volume_held_writes{volume=\"data\"}"), "2");
        assert_eq!(
            v("twinvol_volume_resync_left_bytes{volume=\"data\"}"),
            "750"
        );
        assert_eq!(
            v("twinvol_volume_resync_rate_bytes_per_second{volume=\"data\"}"),
            "50"
        );
        assert_eq!(
            v("twinvol_volume_corrupt_frames_total{volume=\"data\"}"),
            "3"
        );
        assert_eq!(
            v("twinvol_volume_data_sent_bytes_total{volume=\"data\"}"),
            "11"
        );
        assert_eq!(
            v("twinvol_volume_data_applied_bytes_total{volume=\"data\"}"),
            "33"
        );
        assert_eq!(v("twinvol_volume_ahead_events_total{volume=\"data\"}"), "1");
        assert_eq!(
            v("twinvol_volume_activity_log_waits_total{volume=\"data\"}"),
            "6"
        );
        assert_eq!(v("twinvol_volume_ahead{volume=\"data\"}"), "1");
        assert_eq!(
            v("twinvol_volume_connection_state{volume=\"data\",twinvol_volume_connection_state=\"connected\"}"),
            "1"
        );
        assert_eq!(
            v("twinvol_volume_connection_state{volume=\"data\",twinvol_volume_connection_state=\"connecting\"}"),
            "0"
        );
        assert_eq!(
            v("twinvol_volume_role{volume=\"data\",twinvol_volume_role=\"primary\"}"),
            "1"
        );
        assert!(t.contains("# TYPE twinvol_volume_rpo_bytes gauge\n# UNIT twinvol_volume_rpo_bytes bytes\n# HELP twinvol_volume_rpo_bytes "), "{t}");
        assert!(
            t.contains("# TYPE twinvol_volume_corrupt_frames counter\n"),
            "{t}"
        );
    }

    #[test]
    fn every_family_is_contiguous_and_declared_once_before_its_samples() {
        let t = render_volume(&serde_json::to_value(mirror_status()).unwrap());
        let mut seen: Vec<String> = vec![];
        let mut current = String::new();
        for l in t.lines() {
            if let Some(rest) = l.strip_prefix("# TYPE ") {
                let name = rest.split(' ').next().unwrap().to_string();
                assert!(!seen.contains(&name), "{name} declared twice");
                seen.push(name.clone());
                current = name;
            } else if !l.starts_with('#') {
                assert!(l.starts_with(&current), "{l} outside its family {current}");
            }
        }
    }

    #[test]
    fn a_split_brain_refusal_is_a_stateset_naming_the_reason() {
        let mut s = serde_json::to_value(mirror_status()).unwrap();
        s["connection"] =
            serde_json::json!({"state": "refused", "refused": "split-brain", "hint": "x"});
        s["resync"] = Value::Null;
        let t = render_volume(&s);
        assert!(t.contains("twinvol_volume_connection_refused_reason{volume=\"data\",twinvol_volume_connection_refused_reason=\"split-brain\"} 1"), "{t}");
        assert!(
            t.contains("twinvol_volume_resync_active{volume=\"data\"} 0"),
            "{t}"
        );
        assert!(!t.contains("twinvol_volume_resync_left_bytes"), "{t}");
    }

    #[test]
    fn a_link_error_shows_its_attempts_and_whether_the_operator_must_act() {
        let mut s = serde_json::to_value(mirror_status()).unwrap();
        let t = render_volume(&s);
        assert!(
            t.contains("twinvol_volume_link_failed_attempts{volume=\"data\"} 0\n"),
            "{t}"
        );
        assert!(
            t.contains("twinvol_volume_link_needs_operator{volume=\"data\"} 0\n"),
            "{t}"
        );
        s["connection"] = serde_json::json!({"state": "connecting"});
        s["link_error"] = serde_json::json!({"kind": "auth-rejected", "message": "keys differ",
            "needs_operator": true, "attempts": 4, "since_secs": 3.5});
        let t = render_volume(&s);
        assert!(
            t.contains("twinvol_volume_link_failed_attempts{volume=\"data\"} 4\n"),
            "{t}"
        );
        assert!(
            t.contains("twinvol_volume_link_needs_operator{volume=\"data\"} 1\n"),
            "{t}"
        );
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        let mut s = serde_json::to_value(mirror_status()).unwrap();
        s["volume"] = Value::from("we\"ird\nname");
        let t = render_volume(&s);
        assert!(t.contains("volume=\"we\\\"ird\\nname\""), "{t}");
        assert_eq!(t.matches("# EOF").count(), 1);
    }

    #[test]
    fn requests_are_routed_by_method_and_path() {
        assert_eq!(route(b"GET /metrics HTTP/1.1\r\nHost: x\r\n"), None);
        assert_eq!(
            route(b"GET /metrics HTTP/1.1\r\n\r\n"),
            Some(Route::Metrics { head_only: false })
        );
        assert_eq!(
            route(b"HEAD /metrics?x=1 HTTP/1.0\r\n\r\n"),
            Some(Route::Metrics { head_only: true })
        );
        assert_eq!(route(b"GET / HTTP/1.1\r\n\r\n"), Some(Route::NotFound));
        assert_eq!(
            route(b"POST /metrics HTTP/1.1\r\n\r\n"),
            Some(Route::BadMethod)
        );
    }

    #[test]
    fn numbers_use_openmetrics_spelling() {
        assert_eq!(number(f64::NAN), "NaN");
        assert_eq!(number(f64::INFINITY), "+Inf");
        assert_eq!(number(3.0), "3");
        assert_eq!(number(0.25), "0.25");
    }

    #[tokio::test]
    async fn the_server_answers_get_metrics_with_the_openmetrics_content_type() {
        let p = Published::default();
        let server = MetricsServer::bind("127.0.0.1:0".parse().unwrap(), p.source())
            .await
            .unwrap();
        let addr = server.local_addr().unwrap();
        tokio::spawn(server.run());
        let get = |path: &'static str| async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        assert!(
            get("/metrics").await.starts_with("HTTP/1.1 503"),
            "no status yet"
        );
        p.publish_volume(&mirror_status());
        let a = get("/metrics").await;
        assert!(a.starts_with("HTTP/1.1 200 OK\r\n"), "{a}");
        assert!(
            a.contains(&format!("Content-Type: {CONTENT_TYPE}\r\n")),
            "{a}"
        );
        assert!(a.ends_with("# EOF\n"), "{a}");
        assert!(get("/").await.starts_with("HTTP/1.1 404"));
    }

    proptest::proptest! {
        #[test]
        fn any_label_value_stays_inside_its_quotes(v in ".*") {
            let e = escape(&v);
            proptest::prop_assert!(!e.contains('\n'));
            // Every quote is escaped: removing escaped pairs leaves no quote.
            let mut chars = e.chars();
            while let Some(c) = chars.next() {
                if c == '\\' {
                    let n = chars.next();
                    proptest::prop_assert!(matches!(n, Some('\\' | '"' | 'n')));
                } else {
                    proptest::prop_assert_ne!(c, '"');
                }
            }
        }
    }
}
