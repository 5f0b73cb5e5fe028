//! `twinvol mirror --metrics-listen`: a Primary whose peer never comes serves OpenMetrics that a
//! real parser accepts, with the RPO of the writes only it holds, the same values its status
//! file shows; `twinvol status --status-file` renders that file for people.

mod common;

#[path = "support/openmetrics.rs"]
mod openmetrics;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use common::bin;
use common::mirror_node::{write_key, MirrorNode};
use openmetrics::value;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn scrape(port: u16) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    (head.starts_with("HTTP/1.1 200")
        && head.contains("Content-Type: application/openmetrics-text; version=1.0.0"))
    .then(|| body.to_string())
}

#[test]
fn a_disconnected_primary_reports_its_rpo_on_the_metrics_endpoint_and_in_status() {
    let dir = common::scratch();
    let d = dir.path();
    let key = write_key(d);
    let replication = format!(
        r#"address = "127.0.0.1:{port}"
peer = "127.0.0.1:{peer_port}"
peer_id = "node-b"
key_file = "{key}"
ping_timeout_secs = 2"#,
        key = key.display(),
        port = free_port(),
        peer_port = free_port(),
    );
    let mut node = MirrorNode::create(d, "node-a", 64 << 20, &replication, None);
    let metrics_port = free_port();
    let metrics = format!("127.0.0.1:{metrics_port}");
    node.start(&["--metrics-listen", &metrics, "--primary", "--force"]);
    let (socket, status_file) = (node.socket.clone(), node.status.clone());
    let log_text = || node.log_text();
    let t0 = Instant::now();
    while !socket.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the Primary never exported:\n{}",
            log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Two writes in different 64 KiB chunks: the peer has neither.
    let mut c = twinvol::cluster::demo::NbdClient::connect(&socket).expect("NBD connect");
    c.write(0, &[0xa5; 4096]).unwrap();
    c.write(1 << 20, &[0x5a; 4096]).unwrap();
    c.flush().unwrap();
    drop(c);

    // Wait until the endpoint shows both chunks, then compare with the status file.
    let t0 = Instant::now();
    let m = loop {
        if let Some(text) = scrape(metrics_port) {
            let m = openmetrics::parse(&text);
            if value(&m, "twinvol_volume_rpo_bytes", &[("volume", "data")]) >= 131072.0 {
                break m;
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "no RPO on the metrics endpoint within 20 s:\n{}",
            log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let file: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&status_file).unwrap()).unwrap();
    let v = [("volume", "data")];
    assert_eq!(
        value(&m, "twinvol_volume_rpo_bytes", &v),
        file["rpo_bytes"].as_f64().unwrap()
    );
    assert_eq!(value(&m, "twinvol_volume_rpo_bytes", &v), 131072.0);
    assert!(value(&m, "twinvol_volume_rpo_seconds", &v) > 0.0);
    assert_eq!(
        value(
            &m,
            "twinvol_volume_role",
            &[("volume", "data"), ("twinvol_volume_role", "primary")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &m,
            "twinvol_volume_connection_state",
            &[
                ("volume", "data"),
                ("twinvol_volume_connection_state", "connected")
            ]
        ),
        0.0
    );
    assert_eq!(value(&m, "twinvol_volume_corrupt_frames_total", &v), 0.0);

    let out = Command::new(bin())
        .args(["status", "--status-file"])
        .arg(&status_file)
        .output()
        .unwrap();
    let t = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(t.starts_with("volume data on node-a: PRIMARY"), "{t}");
    assert!(t.contains("RPO 128.0 KiB"), "{t}");
}
