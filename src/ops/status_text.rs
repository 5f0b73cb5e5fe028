//! `status_text`: the replication part of `twinvol status` for people.
//!
//! Pure functions of a status value: [`render_replication`] takes one mirrored volume's
//! snapshot (a serialised [`crate::volume::VolumeStatus`], as the daemon embeds it per volume
//! and `twinvol mirror --status-file` writes it) and returns indented lines: connection (and why
//! a connection was refused, with the operator's next step), this copy's disk state, the peer's
//! role and disk when known, mode, RPO in bytes and seconds, in-flight bytes, resync progress
//! with a bar, rate and ETA, and the error counters. [`render_mirror`] adds the heading line for
//! a `twinvol mirror` status file. The same value always gives the same text (snapshot tests in
//! tests/ops_status.rs).

use std::fmt::Write as _;

use serde_json::Value;

/// Width of the resync progress bar in characters.
const BAR: usize = 24;

/// Bytes with IEC units: `512 B`, `1.5 KiB`, `3.0 GiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

/// Seconds as `45s`, `2m05s`, `1h02m03s`, `3d04h`.
pub fn duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    if d > 0 {
        format!("{d}d{h:02}h")
    } else if h > 0 {
        format!("{h}h{m:02}m{s:02}s")
    } else if m > 0 {
        format!("{m}m{s:02}s")
    } else {
        format!("{s}s")
    }
}

/// A progress bar of `done` out of `total`: `[#########...............]`.
pub fn bar(done: u64, total: u64) -> String {
    let filled = if total == 0 {
        BAR
    } else {
        ((done.min(total) as u128 * BAR as u128) / total as u128) as usize
    };
    format!("[{}{}]", "#".repeat(filled), ".".repeat(BAR - filled))
}

fn s(v: &Value) -> String {
    match v {
        Value::String(x) => x.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

/// What a refused connection means and what the operator does about it.
fn refusal(c: &Value) -> (String, String) {
    match c["refused"].as_str().unwrap_or("") {
        "split-brain" => (
            "SPLIT BRAIN: both copies were written while the nodes were apart".into(),
            match c["hint"].as_str() {
                Some(h) if !h.is_empty() => h.to_string(),
                _ => "choose the copy to keep, then discard the other (docs/OPERATIONS.md, split-brain recovery)".into(),
            },
        ),
        "unrelated-data" => (
            "refused: the two disks never belonged to the same volume".into(),
            "check replication.peer / device on both nodes; initialise one side with create-md to start a full copy".into(),
        ),
        "source-inconsistent" => (
            "refused: the copy that would be the resync source is itself inconsistent".into(),
            "find the node with a complete copy and promote it (twinvol promote --force if needed)".into(),
        ),
        "target-is-primary" => (
            format!(
                "refused: the resync would overwrite {}, which is Primary",
                s(&c["node"])
            ),
            "demote that node first, then let the resync run".into(),
        ),
        "both-primary" => (
            "refused: both nodes are Primary".into(),
            "demote one of them (twinvol demote on the node to give up)".into(),
        ),
        "ambiguous" => (
            "refused: each side's generation is in the other's history; no side can be trusted as the source".into(),
            "choose the copy to keep as for a split brain (docs/OPERATIONS.md)".into(),
        ),
        other => (format!("refused: {other}"), String::new()),
    }
}

/// The replication state of one volume, each line starting with `indent`. `peer` is the
/// peer's (role, disk) when known (from the daemon's heartbeats); `None` prints nothing about it.
pub fn render_replication(r: &Value, peer: Option<(&str, &str)>, indent: &str) -> String {
    let mut o = String::new();
    let conn = r["connection"]["state"].as_str().unwrap_or("unknown");
    let peer_text = match peer {
        Some((role, disk)) => format!("; peer {role}, disk {disk}"),
        None => String::new(),
    };
    match conn {
        "connected" => {
            let _ = writeln!(o, "{indent}replication: connected{peer_text}");
        }
        "connecting" => {
            let _ = writeln!(
                o,
                "{indent}replication: DISCONNECTED, waiting for the peer{peer_text}"
            );
            let meanwhile = if r["role"] == "secondary" {
                "this copy gets none of the Primary's writes meanwhile"
            } else {
                "writes since are only on this node (RPO below)"
            };
            let _ = writeln!(
                o,
                "{indent}  {meanwhile}; they are resynced when the peer returns"
            );
            let e = &r["link_error"];
            if let Some(message) = e["message"].as_str() {
                let _ = writeln!(
                    o,
                    "{indent}  last error ({} attempt(s) in {}): {message}",
                    u(&e["attempts"]),
                    duration(e["since_secs"].as_f64().unwrap_or(0.0) as u64)
                );
                if e["needs_operator"] == true {
                    let _ = writeln!(
                        o,
                        "{indent}  next step: retrying will not fix this; correct the setting it names on one node"
                    );
                }
            }
        }
        "refused" => {
            let (what, fix) = refusal(&r["connection"]);
            let _ = writeln!(o, "{indent}replication: {what}{peer_text}");
            if !fix.is_empty() {
                let _ = writeln!(o, "{indent}  next step: {fix}");
            }
        }
        other => {
            let _ = writeln!(o, "{indent}replication: {other}{peer_text}");
        }
    }
    let mode = s(&r["mode"]);
    let _ = writeln!(
        o,
        "{indent}disk {}, mode {mode}{}",
        s(&r["disk"]),
        if r["ahead"] == true {
            ", AHEAD: the async queue overflowed; only the bitmap tracks writes until the peer catches up"
        } else {
            ""
        }
    );
    let rpo_secs = r["rpo_seconds"].as_f64().unwrap_or(0.0);
    let _ = writeln!(
        o,
        "{indent}RPO {} ({rpo_secs:.1} s{}), in flight {}",
        bytes(u(&r["rpo_bytes"])),
        if rpo_secs >= 60.0 {
            format!(" = {}", duration(rpo_secs as u64))
        } else {
            String::new()
        },
        bytes(u(&r["inflight_bytes"]))
    );
    let held = u(&r["held_writes"]);
    if held > 0 {
        let _ = writeln!(
            o,
            "{indent}HOLDING {held} write(s): not acknowledged until the peer's copy is outdated or the connection is back (replication.outdate_wait_ms)"
        );
    }
    let rs = &r["resync"];
    if rs.is_object() {
        let (total, done) = (u(&rs["total_bytes"]), u(&rs["done_bytes"]));
        let pct = if total == 0 {
            100.0
        } else {
            done.min(total) as f64 * 100.0 / total as f64
        };
        let eta = match rs["eta_secs"].as_u64() {
            Some(e) => format!("ETA {}", duration(e)),
            None => "ETA unknown".into(),
        };
        let _ = writeln!(
            o,
            "{indent}resync ({}): {} {pct:5.1}%  {} of {}, {} left, {}/s, {eta}",
            match rs["role"].as_str() {
                Some("source") => "sending to the peer",
                Some("target") => "receiving; this copy is Inconsistent until done",
                _ => "?",
            },
            bar(done, total),
            bytes(done),
            bytes(total),
            bytes(u(&rs["left_bytes"])),
            bytes(u(&rs["rate_bytes_per_sec"])),
        );
    }
    let c = &r["counters"];
    let corrupt = u(&c["corrupt_frames"]);
    let _ = writeln!(
        o,
        "{indent}sent {} (+{} resync), applied {} (+{} resync), corrupt frames {}{}, connections {}, ahead events {}",
        bytes(u(&c["data_bytes_sent"])),
        bytes(u(&c["resync_bytes_sent"])),
        bytes(u(&c["data_bytes_applied"])),
        bytes(u(&c["resync_bytes_applied"])),
        corrupt,
        if corrupt > 0 { " (!)" } else { "" },
        u(&c["connections"]),
        u(&c["ahead_events"]),
    );
    let (local_err, peer_err) = (u(&c["local_apply_errors"]), u(&c["peer_write_errors"]));
    if local_err + peer_err > 0 {
        let _ = writeln!(
            o,
            "{indent}write errors (!): {local_err} replicated write(s) failed on this disk, {peer_err} on the peer's; the failing copy is Outdated (Inconsistent if it was being resynced) until a resync completes (`twinvol resync` after fixing its device)"
        );
    }
    let payload = u(&c["payload_bytes_sent"]);
    if payload > 0 {
        let wire = u(&c["wire_bytes_sent"]);
        let _ = writeln!(
            o,
            "{indent}wire: {} for {} of payload in {} frames, {} writes (ratio {:.2})",
            bytes(wire),
            bytes(payload),
            u(&c["frames_sent"]),
            u(&c["writes_sent"]),
            wire as f64 / payload as f64
        );
    }
    let vf = &r["verify"];
    if vf.is_object() {
        let (done, total) = (u(&vf["checked_bytes"]), u(&vf["total_bytes"]));
        let _ = writeln!(
            o,
            "{indent}verify: {} {} of {}, {} differing block(s){}{}",
            if vf["running"] == true {
                "running"
            } else {
                "done"
            },
            bytes(done),
            bytes(total),
            u(&vf["differing_blocks"]),
            if u(&vf["differing_blocks"]) > 0 {
                " (marked and resynced)"
            } else {
                ""
            },
            match vf["error"].as_str() {
                Some(e) => format!("; stopped: {e}"),
                None => String::new(),
            }
        );
    }
    o
}

/// A `twinvol mirror` status file for people: a heading, then [`render_replication`].
pub fn render_mirror(status: &Value) -> String {
    let mut o = format!(
        "volume {} on {}: {}, generation {}\n",
        s(&status["volume"]),
        s(&status["node"]),
        s(&status["role"]).to_uppercase(),
        s(&status["current_generation"]),
    );
    o.push_str(&render_replication(status, None, "  "));
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_counts_use_iec_units() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(3 << 30), "3.0 GiB");
        assert_eq!(bytes(u64::MAX), "16.0 EiB");
    }

    #[test]
    fn durations_read_like_a_clock() {
        assert_eq!(duration(0), "0s");
        assert_eq!(duration(125), "2m05s");
        assert_eq!(duration(3723), "1h02m03s");
        assert_eq!(duration(3 * 86_400 + 4 * 3600), "3d04h");
    }

    #[test]
    fn the_bar_fills_in_proportion_and_never_overflows() {
        assert_eq!(bar(0, 100), format!("[{}]", ".".repeat(BAR)));
        assert_eq!(
            bar(50, 100),
            format!("[{}{}]", "#".repeat(12), ".".repeat(12))
        );
        assert_eq!(bar(200, 100), format!("[{}]", "#".repeat(BAR)));
        assert_eq!(bar(0, 0), format!("[{}]", "#".repeat(BAR)));
    }

    #[test]
    fn a_value_missing_fields_renders_without_panicking() {
        let t = render_mirror(&Value::Null);
        assert!(t.contains("replication: unknown"), "{t}");
    }

    #[test]
    fn a_link_error_is_shown_while_connecting_with_a_next_step_only_when_retrying_cannot_fix_it() {
        let status = |needs_operator: bool| {
            serde_json::json!({
                "connection": {"state": "connecting"},
                "link_error": {
                    "message": "peer 127.0.0.2:7790 refused this node's authentication: the replication keys differ",
                    "needs_operator": needs_operator,
                    "attempts": 7,
                    "since_secs": 125.4,
                },
            })
        };
        let t = render_replication(&status(true), None, "");
        assert!(
            t.contains("  last error (7 attempt(s) in 2m05s): peer 127.0.0.2:7790 refused this node's authentication: the replication keys differ\n"),
            "{t}"
        );
        assert!(t.contains("next step: retrying will not fix this"), "{t}");
        let t = render_replication(&status(false), None, "");
        assert!(t.contains("last error (7 attempt(s)"), "{t}");
        assert!(!t.contains("next step"), "{t}");
        let none = serde_json::json!({"connection": {"state": "connecting"}, "link_error": null});
        assert!(!render_replication(&none, None, "").contains("last error"));
        // A Secondary takes no writes of its own: it is the one missing them.
        let secondary =
            serde_json::json!({"connection": {"state": "connecting"}, "role": "secondary"});
        let t = render_replication(&secondary, None, "");
        assert!(
            t.contains("this copy gets none of the Primary's writes meanwhile"),
            "{t}"
        );
        assert!(!t.contains("writes since are only on this node"), "{t}");
    }

    #[test]
    fn write_errors_on_either_copy_are_shown_only_when_there_are_some() {
        let status = |local: u64, peer: u64| {
            serde_json::json!({
                "connection": {"state": "connected"},
                "counters": {"local_apply_errors": local, "peer_write_errors": peer},
            })
        };
        let t = render_replication(&status(0, 3), None, "");
        assert!(
            t.contains(
                "write errors (!): 0 replicated write(s) failed on this disk, 3 on the peer's"
            ),
            "{t}"
        );
        assert!(!render_replication(&status(0, 0), None, "").contains("write errors"));
    }

    proptest::proptest! {
        #[test]
        fn the_bar_always_has_its_width(done in proptest::num::u64::ANY, total in proptest::num::u64::ANY) {
            proptest::prop_assert_eq!(bar(done, total).chars().count(), BAR + 2);
        }
    }
}
