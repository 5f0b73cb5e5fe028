//! `twinvol run` and its service manager: one daemon on loopback whose peer never answers,
//! started the way systemd starts a `Type=notify` unit with `WatchdogSec=` (a `NOTIFY_SOCKET`
//! the test binds, `WATCHDOG_USEC`), and scraped on its OpenMetrics endpoint.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[path = "support/openmetrics.rs"]
mod openmetrics;

const BIN: &str = env!("CARGO_BIN_EXE_twinvol");

fn free_tcp() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One HTTP GET; (status line, headers, body), or None if nothing listens yet.
fn http_get(port: u16, path: &str) -> Option<(String, String, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes())
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    Some((status.to_string(), headers.to_string(), body.to_string()))
}

fn free_udp() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A single node whose peer (on unused loopback ports) never answers; fence = "off", so it
/// stays Secondary. `extra` is appended to the `[cluster]` table.
struct Node {
    dir: tempfile::TempDir,
    config: PathBuf,
    control: PathBuf,
    child: Option<Child>,
}

impl Node {
    fn new(cluster_extra: &str) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let key = d.join("cluster.key");
        std::fs::write(&key, b"twinvol-test-key-0123456789abcdef").unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let volume = d.join("volume.img");
        std::fs::write(&volume, vec![0u8; 1 << 20]).unwrap();
        let control = d.join("control.sock");
        let text = format!(
            r#"[node]
id = "node-a"

[[volume]]
name = "data"
device = "{volume}"
engine = "sync"
cache = "writeback"
[volume.export]
socket = "{export}"

[cluster]
peer = "node-b"
priority = 10
peer_priority = 20
key_file = "{key}"
heartbeat_interval_ms = 200
heartbeat_timeout_ms = 1000
fence = "off"
state_dir = "{state}"
control_socket = "{control}"
{cluster_extra}

[[cluster.heartbeat]]
name = "service"
local = "127.0.0.1:{l0}"
peer = "127.0.0.1:{p0}"

[[cluster.heartbeat]]
name = "replication"
local = "127.0.0.1:{l1}"
peer = "127.0.0.1:{p1}"
"#,
            volume = volume.display(),
            export = d.join("data.sock").display(),
            key = key.display(),
            state = d.join("state").display(),
            control = control.display(),
            l0 = free_udp(),
            l1 = free_udp(),
            p0 = free_udp(),
            p1 = free_udp(),
        );
        let config = d.join("node-a.toml");
        std::fs::write(&config, text).unwrap();
        Node {
            dir,
            config,
            control,
            child: None,
        }
    }

    fn start(&mut self, env: &[(&str, &str)]) {
        let mut c = Command::new(BIN);
        c.args(["run", "--config"])
            .arg(&self.config)
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .env("TWINVOL_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.path().join("daemon.log")).unwrap());
        for (k, v) in env {
            c.env(k, v);
        }
        self.child = Some(c.spawn().expect("spawn twinvol run"));
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    /// SIGTERM, then the exit status within 20 s.
    fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("started");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let t0 = Instant::now();
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st;
            }
            if t0.elapsed() > Duration::from_secs(20) {
                let _ = child.kill();
                panic!("daemon did not stop on SIGTERM:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The service manager's end: a datagram socket in the node's directory.
fn notify_socket(dir: &Path) -> (UnixDatagram, PathBuf) {
    let path = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    (sock, path)
}

fn recv(sock: &UnixDatagram, timeout: Duration) -> Option<(Instant, String)> {
    sock.set_read_timeout(Some(timeout)).unwrap();
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf).ok()?;
    Some((
        Instant::now(),
        String::from_utf8_lossy(&buf[..n]).into_owned(),
    ))
}

#[test]
fn ready_is_sent_once_the_control_socket_is_bound_and_watchdog_pings_keep_half_the_timeout() {
    let mut node = Node::new("");
    let (manager, path) = notify_socket(node.dir.path());
    // WatchdogSec=1s: pings are due every 500 ms, a gap of 1 s gets the daemon killed.
    node.start(&[
        ("NOTIFY_SOCKET", path.to_str().unwrap()),
        ("WATCHDOG_USEC", "1000000"),
    ]);
    let (_, first) = recv(&manager, Duration::from_secs(30))
        .unwrap_or_else(|| panic!("no READY within 30 s:\n{}", node.log()));
    assert!(first.starts_with("READY=1\nSTATUS="), "{first:?}");
    assert!(
        first.contains("Secondary") && first.contains("peer node-b"),
        "{first:?}"
    );
    assert!(
        node.control.exists(),
        "READY came before the control socket was bound"
    );
    // The control socket answers right away.
    let a = twinvol::cluster::control::call(
        &node.control,
        &twinvol::cluster::control::Request::Status,
        Duration::from_secs(10),
    )
    .expect("control socket answers after READY");
    assert_eq!(a.status["role"], "secondary");

    // Three seconds of pings.
    let mut pings = vec![];
    let mut statuses = vec![];
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(3) {
        if let Some((at, msg)) = recv(&manager, Duration::from_millis(1500)) {
            if msg == "WATCHDOG=1" {
                pings.push(at);
            } else {
                statuses.push(msg);
            }
        }
    }
    assert!(
        (4..=8).contains(&pings.len()),
        "{} pings in 3 s at WATCHDOG_USEC=1000000 (expected about 6)",
        pings.len()
    );
    for w in pings.windows(2) {
        let gap = w[1] - w[0];
        assert!(
            gap < Duration::from_millis(1000),
            "a gap of {gap:?} between pings would let systemd kill the daemon"
        );
    }
    // The peer was never seen: the status line tells so once the heartbeat timeout passed.
    assert!(
        statuses.iter().all(|s| s.starts_with("STATUS=")),
        "{statuses:?}"
    );
    assert!(
        statuses.iter().any(|s| s.contains("LOST")),
        "no STATUS= update when the peer was declared lost: {statuses:?}"
    );

    let st = node.stop();
    assert!(st.success(), "exit {st}:\n{}", node.log());
    let mut rest = vec![];
    while let Some((_, m)) = recv(&manager, Duration::from_millis(200)) {
        rest.push(m);
    }
    assert!(
        rest.iter()
            .any(|m| m.starts_with("STOPPING=1\nSTATUS=stopping")),
        "no STOPPING=1 at shutdown: {rest:?}"
    );
}

#[test]
fn a_watchdog_meant_for_another_process_gets_no_pings_but_ready_still_comes() {
    let mut node = Node::new("");
    let (manager, path) = notify_socket(node.dir.path());
    node.start(&[
        ("NOTIFY_SOCKET", path.to_str().unwrap()),
        ("WATCHDOG_USEC", "200000"),
        ("WATCHDOG_PID", "1"),
    ]);
    let (_, first) = recv(&manager, Duration::from_secs(30))
        .unwrap_or_else(|| panic!("no READY within 30 s:\n{}", node.log()));
    assert!(first.starts_with("READY=1"), "{first:?}");
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_millis(1500) {
        if let Some((_, m)) = recv(&manager, Duration::from_millis(500)) {
            assert_ne!(m, "WATCHDOG=1", "pinged a watchdog meant for pid 1");
        }
    }
    assert!(node.stop().success(), "{}", node.log());
}

#[test]
fn the_daemon_metrics_endpoint_is_parsed_by_a_real_openmetrics_parser_and_shows_the_node_state() {
    let port = free_tcp();
    let mut node = Node::new(&format!("metrics_listen = \"127.0.0.1:{port}\""));
    node.start(&[]);
    // Wait until the endpoint answers and the peer (never there) is declared lost.
    let t0 = Instant::now();
    let (status, headers, body) = loop {
        if let Some(r) = http_get(port, "/metrics") {
            if r.2
                .contains("twinvol_peer_state{twinvol_peer_state=\"lost\"} 1")
            {
                break r;
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "no metrics with the peer lost within 30 s:\n{}",
            node.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(
        headers
            .to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text; version=1.0.0"),
        "{headers}"
    );
    let m = openmetrics::parse(&body);
    use openmetrics::{family, value};
    assert_eq!(
        value(
            &m,
            "twinvol_node_info",
            &[("node", "node-a"), ("peer", "node-b")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &m,
            "twinvol_node_role",
            &[("twinvol_node_role", "secondary")]
        ),
        1.0
    );
    assert_eq!(
        value(&m, "twinvol_node_role", &[("twinvol_node_role", "primary")]),
        0.0
    );
    assert_eq!(value(&m, "twinvol_heartbeat_paths_up", &[]), 0.0);
    assert_eq!(
        value(&m, "twinvol_heartbeat_path_up", &[("path", "service")]),
        0.0
    );
    assert_eq!(
        value(
            &m,
            "twinvol_heartbeats_received_total",
            &[("path", "replication")]
        ),
        0.0
    );
    // The peer was never heard since this daemon started: the start-up gate holds, so the node
    // neither fences nor asks the cloud about it (it waits for the peer or an operator).
    assert_eq!(
        value(
            &m,
            "twinvol_fence_state",
            &[("twinvol_fence_state", "idle")]
        ),
        1.0,
        "fence state idle at the start-up gate"
    );
    assert_eq!(
        value(
            &m,
            "twinvol_fence_state",
            &[("twinvol_fence_state", "peer-stopped")]
        ),
        0.0
    );
    assert_eq!(value(&m, "twinvol_failovers_total", &[]), 0.0);
    assert_eq!(
        value(
            &m,
            "twinvol_volume_role",
            &[("volume", "data"), ("twinvol_volume_role", "secondary")]
        ),
        1.0
    );
    assert_eq!(
        value(&m, "twinvol_volume_exported", &[("volume", "data")]),
        0.0
    );
    assert!(value(&m, "twinvol_uptime_seconds", &[]) > 0.0);
    assert_eq!(
        family(&m, "twinvol_uptime_seconds"),
        ("gauge".into(), "seconds".into())
    );
    assert_eq!(
        family(&m, "twinvol_failovers"),
        ("counter".into(), String::new())
    );
    assert_eq!(family(&m, "twinvol_peer_state").0, "stateset");
    assert_eq!(family(&m, "twinvol_node").0, "info");

    let (status, _, _) = http_get(port, "/").expect("answers /");
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    assert!(node.stop().success(), "{}", node.log());
}
