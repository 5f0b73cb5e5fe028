//! The control socket protocol: one JSON request line, one JSON answer line.
//!
//! The socket is a Unix socket created with mode 0600 (root only when the daemon runs as
//! root). Requests: `{"cmd":"status"}`, `{"cmd":"promote","force":false}`, `{"cmd":"demote"}`,
//! `{"cmd":"switchover"}`, `{"cmd":"verify","volume":null}`,
//! `{"cmd":"resync","volume":null,"discard_local":false}`. Answers:
//! `{"ok":bool,"message":"...","status":{...}}`.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A request to the daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub enum Request {
    /// Report status.
    Status,
    /// Bring the service up here; `force` overrides the disk-state and proof checks (never
    /// the check that the peer is not Primary).
    Promote {
        /// Logged loudly.
        #[serde(default)]
        force: bool,
    },
    /// Take the service down here and stand down for the peer.
    Demote,
    /// Move the service to the other node.
    Switchover,
    /// Start an online verify of the mirrored volumes (or the named one); the result
    /// appears in status (`volumes[].replication.verify`).
    Verify {
        /// Only this volume.
        #[serde(default)]
        volume: Option<String>,
    },
    /// Resync now: reconnect the replication link(s) and resync what is dirty. With
    /// `discard_local` (Secondary only): this node's copy is thrown away and fully resynced
    /// from the peer, the manual split-brain recovery on the node whose changes are lost.
    Resync {
        /// Only this volume.
        #[serde(default)]
        volume: Option<String>,
        /// Discard this node's data.
        #[serde(default)]
        discard_local: bool,
    },
}

/// The daemon's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Answer {
    /// Whether the request was carried out (or accepted).
    pub ok: bool,
    /// What happened, or why not.
    pub message: String,
    /// The status after the request.
    pub status: serde_json::Value,
}

/// Errors talking to the daemon.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// No daemon listens there.
    #[error("cannot reach the twinvol daemon at {path}: {source} (is `twinvol run` running? pass --socket or --config)")]
    Connect {
        /// The socket.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The exchange failed.
    #[error("talking to the daemon at {path}: {what}")]
    Exchange {
        /// The socket.
        path: String,
        /// What failed.
        what: String,
    },
}

/// Sends one request and waits (up to `timeout`) for the answer.
pub fn call(socket: &Path, req: &Request, timeout: Duration) -> Result<Answer, ControlError> {
    let path = socket.display().to_string();
    let ex = |what: String| ControlError::Exchange {
        path: path.clone(),
        what,
    };
    let mut s = std::os::unix::net::UnixStream::connect(socket).map_err(|source| {
        ControlError::Connect {
            path: path.clone(),
            source,
        }
    })?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| ex(e.to_string()))?;
    let mut line = serde_json::to_string(req).map_err(|e| ex(e.to_string()))?;
    line.push('\n');
    s.write_all(line.as_bytes())
        .map_err(|e| ex(e.to_string()))?;
    let mut answer = String::new();
    BufReader::new(&s)
        .read_line(&mut answer)
        .map_err(|e| ex(format!("no answer: {e}")))?;
    serde_json::from_str(&answer).map_err(|e| ex(format!("bad answer: {e}")))
}

/// Renders a status value (as sent by the daemon) for people.
pub fn render(status: &serde_json::Value) -> String {
    use std::fmt::Write as _;
    let s = |v: &serde_json::Value| match v {
        serde_json::Value::String(x) => x.clone(),
        serde_json::Value::Null => "-".into(),
        other => other.to_string(),
    };
    let mut o = String::new();
    let _ = writeln!(
        o,
        "node {} (priority {}): {}{}",
        s(&status["node"]),
        s(&status["priority"]),
        s(&status["role"]).to_uppercase(),
        if status["yielding"] == true {
            " (standing down for the peer)"
        } else {
            ""
        }
    );
    let peer = &status["peer_view"];
    let peer_text = match peer["state"].as_str() {
        Some("alive") => format!("alive, {} {}", s(&peer["role"]), s(&peer["disk"])),
        Some(x) => x.to_string(),
        None => "-".into(),
    };
    let _ = writeln!(o, "peer {}: {peer_text}", s(&status["peer"]));
    if let Some(paths) = status["paths"].as_array() {
        for p in paths {
            let _ = writeln!(
                o,
                "  heartbeat {:<12} {}  received {} refused {}{}",
                s(&p["name"]),
                if p["up"] == true { "up  " } else { "DOWN" },
                s(&p["received"]),
                s(&p["refused"]),
                match p["last_rx_ms_ago"].as_u64() {
                    Some(ms) => format!("  last {ms} ms ago"),
                    None => String::new(),
                }
            );
        }
    }
    let _ = writeln!(o, "witness: {}", s(&status["witness"]["state"]));
    if let Some(probes) = status["witness_probes"].as_array() {
        for p in probes {
            let r = &p["result"];
            let text = if let Some(ok) = r.get("Ok") {
                format!("ok: {}", s(ok))
            } else {
                format!("FAILED: {}", s(&r["Err"]))
            };
            let _ = writeln!(o, "  {} {text}", s(&p["target"]));
        }
    }
    let _ = writeln!(o, "fencing: {}", s(&status["fence"]["state"]));
    let _ = writeln!(o, "decision: {}", s(&status["reason"]));
    if let Some(vols) = status["volumes"].as_array() {
        for v in vols {
            let _ = writeln!(
                o,
                "volume {}: {} {} [{}] export {}",
                s(&v["name"]),
                s(&v["role"]),
                s(&v["disk"]),
                s(&v["kind"]),
                s(&v["export"])
            );
            if v["replication"].is_object() {
                let peer_known = (peer["state"] == "alive").then(|| {
                    (
                        peer["role"].as_str().unwrap_or("?"),
                        peer["disk"].as_str().unwrap_or("?"),
                    )
                });
                o.push_str(&crate::ops::status_text::render_replication(
                    &v["replication"],
                    peer_known,
                    "  ",
                ));
            }
        }
    }
    if let Some(seq) = status["last_sequence"].as_object() {
        let _ = writeln!(
            o,
            "last {}: {} in {} ms",
            s(&seq["kind"]),
            match seq.get("failed_at") {
                Some(serde_json::Value::String(f)) => format!("FAILED at {f}"),
                _ => "done".into(),
            },
            s(&seq["elapsed_ms"])
        );
        if let Some(steps) = seq["steps"].as_array() {
            for st in steps {
                let _ = writeln!(
                    o,
                    "  {} {:<24} {:>6} ms  {}",
                    if st["ok"] == true { "ok  " } else { "FAIL" },
                    s(&st["name"]),
                    s(&st["elapsed_ms"]),
                    s(&st["detail"])
                );
            }
        }
    }
    if let Some(ms) = status["last_failover_ms"].as_u64() {
        let _ = writeln!(
            o,
            "last failover: peer lost -> Primary in {ms} ms ({} since start)",
            status["failovers"].as_u64().unwrap_or(1)
        );
    }
    if let Some(c) = status["cloud_check"].as_object() {
        let ago = c
            .get("unix_ms")
            .and_then(|v| v.as_u64())
            .map(|at| crate::cluster::demo::unix_ms().saturating_sub(at) / 1000);
        let _ = writeln!(
            o,
            "cloud resources (last check {}, {} ms):",
            ago.map_or("-".into(), |a| format!("{a} s ago")),
            s(&c["elapsed_ms"])
        );
        for it in c["items"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
            let h = s(&it["health"]);
            let _ = writeln!(
                o,
                "  {:<8} {}{}",
                h.to_uppercase(),
                s(&it["resource"]),
                match it["detail"].as_str() {
                    Some(d) if !d.is_empty() => format!(": {d}"),
                    _ => String::new(),
                }
            );
        }
        for r in c["repairs"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
            let _ = writeln!(o, "  repaired {}", s(r));
        }
    }
    if let Some(ops) = status["cloud_api"]["operations"].as_object() {
        let (mut calls, mut errors, mut throttles) = (0, 0, 0);
        for v in ops.values() {
            calls += v["calls"].as_u64().unwrap_or(0);
            errors += v["errors"].as_u64().unwrap_or(0);
            throttles += v["throttles"].as_u64().unwrap_or(0);
        }
        let _ = writeln!(
            o,
            "AWS API: {calls} calls, {errors} errors, {throttles} throttled (per operation: --json or /metrics)"
        );
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_as_json_lines() {
        for r in [
            Request::Status,
            Request::Promote { force: true },
            Request::Demote,
            Request::Switchover,
        ] {
            let t = serde_json::to_string(&r).unwrap();
            assert!(!t.contains('\n'));
            assert_eq!(serde_json::from_str::<Request>(&t).unwrap(), r);
        }
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"cmd":"promote"}"#).unwrap(),
            Request::Promote { force: false }
        );
    }

    #[test]
    fn unknown_commands_are_refused() {
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"format-disk"}"#).is_err());
    }

    #[test]
    fn status_rendering_names_role_peer_and_failed_step() {
        let v = serde_json::json!({
            "node": "node-a", "priority": 10, "role": "secondary", "yielding": false,
            "peer": "node-b", "peer_view": {"state": "lost"},
            "paths": [{"name": "service", "up": false, "received": 3, "refused": 0}],
            "witness": {"state": "reachable"}, "fence": {"state": "idle"},
            "reason": "peer lost but fence = \"off\"",
            "volumes": [{"name": "data", "role": "secondary", "disk": "up-to-date", "kind": "local", "export": null}],
            "last_sequence": {"kind": "bring-up", "failed_at": "hook start", "elapsed_ms": 12,
                "steps": [{"name": "hook start", "ok": false, "elapsed_ms": 5, "detail": "exit 3"}]}
        });
        let t = render(&v);
        assert!(t.contains("node node-a (priority 10): SECONDARY"), "{t}");
        assert!(t.contains("peer node-b: lost"), "{t}");
        assert!(t.contains("DOWN"), "{t}");
        assert!(t.contains("FAILED at hook start"), "{t}");
    }
}
