//! `[cluster]`: the peer, node priorities, heartbeat paths, witness targets, fencing,
//! switchback, application hooks, state directory and control socket of the node daemon.
//!
//! Everything here is checked without I/O by [`ClusterConfig::validate`]; errors name the
//! field and the fix.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::cloud::CloudFieldError;

/// The `[cluster]` table.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// The peer node's `[node] id`.
    pub peer: String,
    /// This node's priority, 1..=999; lower is preferred (it starts Primary when both are up).
    pub priority: u16,
    /// The peer's priority; must differ from ours.
    pub peer_priority: u16,
    /// File holding the pre-shared key that authenticates heartbeats (16..1024 bytes; the
    /// replication key may be reused).
    pub key_file: PathBuf,
    /// Two or more heartbeat paths (one per network interface).
    #[serde(rename = "heartbeat")]
    pub heartbeats: Vec<HeartbeatPath>,
    /// Heartbeat send interval, milliseconds (default 1000).
    #[serde(default = "default_interval_ms")]
    pub heartbeat_interval_ms: u64,
    /// A path without a valid heartbeat for this long is down; all paths down = peer lost
    /// (milliseconds, default 5000).
    #[serde(default = "default_timeout_ms")]
    pub heartbeat_timeout_ms: u64,
    /// Partition resolution: reachable targets prove this node is not isolated.
    #[serde(default)]
    pub witness: WitnessConfig,
    /// `"cloud"`: stop the peer through the cloud provider before promoting; `"off"`: never
    /// fence (then a lost peer is never taken over without `promote --force`).
    #[serde(default)]
    pub fence: FenceMode,
    /// How long the less-preferred node waits before fencing, milliseconds (default 3000),
    /// so that two nodes never fence each other.
    #[serde(default = "default_fence_delay_ms")]
    pub fence_delay_ms: u64,
    /// `"intelligent"` (stay put after a failover) or `"automatic"` (move back to the
    /// preferred node once it is back and up to date).
    #[serde(default)]
    pub switchback: Switchback,
    /// Application hooks run during bring-up and teardown.
    #[serde(default)]
    pub hooks: HooksConfig,
    /// Directory for the role file and the pid file (`twinvol.pid`).
    pub state_dir: PathBuf,
    /// Control socket (Unix, mode 0600) of `twinvol status/promote/demote/switchover`.
    pub control_socket: PathBuf,
    /// The `lab` cloud provider (one machine, no AWS): used instead of `[cloud]` when present.
    pub lab: Option<LabConfig>,
    /// Serve OpenMetrics on `http://ADDR/metrics` (e.g. `"127.0.0.1:9464"`); absent: no endpoint.
    /// Loopback keeps it on the node; the status it shows is not secret but not for the world.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
}

/// One heartbeat path: a local UDP address and the peer's.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HeartbeatPath {
    /// Name in status and logs (e.g. "service", "replication").
    pub name: String,
    /// Local address heartbeats are sent from and received on.
    pub local: SocketAddr,
    /// The peer's address on this path.
    pub peer: SocketAddr,
    /// Lower is preferred; status lists paths in this order.
    #[serde(default = "default_path_priority")]
    pub priority: u16,
}

/// Witness targets (HTTP or HTTPS HEAD expecting 2xx/3xx).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WitnessConfig {
    /// URLs, e.g. `https://ec2.eu-west-1.amazonaws.com/`; empty: witness disabled (the node
    /// then counts as never isolated: only sensible with fence = "cloud").
    #[serde(default)]
    pub targets: Vec<String>,
    /// Timeout of one probe, milliseconds (default 2000).
    #[serde(default = "default_witness_timeout_ms")]
    pub timeout_ms: u64,
    /// Interval between probe rounds, milliseconds (default 2000).
    #[serde(default = "default_witness_interval_ms")]
    pub interval_ms: u64,
    /// An active node isolated (no witness, no peer) for this long stops its service,
    /// milliseconds (default 10000).
    #[serde(default = "default_isolation_grace_ms")]
    pub isolation_grace_ms: u64,
    /// Extra trust anchors (PEM) for `https://` targets, e.g. a private CA; the system's
    /// roots are always trusted.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

impl Default for WitnessConfig {
    fn default() -> Self {
        Self {
            targets: Vec::new(),
            timeout_ms: default_witness_timeout_ms(),
            interval_ms: default_witness_interval_ms(),
            isolation_grace_ms: default_isolation_grace_ms(),
            ca_file: None,
        }
    }
}

/// Fencing mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FenceMode {
    /// Fence through the cloud provider (StopInstances on AWS, kill the peer in the lab).
    #[default]
    Cloud,
    /// Never fence.
    Off,
}

/// Switchback policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Switchback {
    /// Stay on the node that took over; the operator runs `twinvol switchover`.
    #[default]
    Intelligent,
    /// Move back when the preferred node returns up to date.
    Automatic,
}

/// Application hooks (LifeKeeper's generic application kit: restore, remove, quickCheck,
/// recover). Each is run as `sh -c CMD` with `TWINVOL_NODE` and `TWINVOL_VOLUMES` set.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HooksConfig {
    /// Starts the application (restore); a failure stops bring-up.
    pub start: Option<String>,
    /// Stops the application (remove).
    pub stop: Option<String>,
    /// Checks the application (quickCheck), every `check_interval_ms` while Primary.
    pub check: Option<String>,
    /// Repairs the application in place (recover) after a failed check; if it fails too, the
    /// node stands down so the peer takes over.
    pub recover: Option<String>,
    /// Time limit of each hook, milliseconds (default 30000).
    #[serde(default = "default_hook_timeout_ms")]
    pub timeout_ms: u64,
    /// Interval of the check hook, milliseconds (default 10000).
    #[serde(default = "default_check_interval_ms")]
    pub check_interval_ms: u64,
}

impl Default for HooksConfig {
    fn default() -> Self {
        Self {
            start: None,
            stop: None,
            check: None,
            recover: None,
            timeout_ms: default_hook_timeout_ms(),
            check_interval_ms: default_check_interval_ms(),
        }
    }
}

/// The lab provider: fencing stops the peer daemon found through its pid file; network
/// changes are only written as a plan.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LabConfig {
    /// The peer daemon's pid file (its `state_dir/twinvol.pid`).
    pub peer_pid_file: PathBuf,
    /// File the plan of network changes is appended to (one JSON line per action).
    pub plan_file: PathBuf,
    /// The VIP this pair would route to the active node (plan text only).
    #[serde(default)]
    pub vip: Option<String>,
    /// The DNS record this pair would point at the active node (plan text only).
    #[serde(default)]
    pub record: Option<String>,
}

/// A parsed witness URL: scheme, host, port and path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WitnessUrl {
    /// True for `https://`.
    pub https: bool,
    /// Host name or address (brackets of IPv6 literals removed).
    pub host: String,
    /// Port (80 / 443 when not written).
    pub port: u16,
    /// Path with query, at least `/`.
    pub path: String,
}

impl WitnessUrl {
    /// Parses `http://host[:port][/path]` or `https://...`; the error says what is wrong.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (https, rest) = if let Some(r) = s.strip_prefix("http://") {
            (false, r)
        } else if let Some(r) = s.strip_prefix("https://") {
            (true, r)
        } else {
            return Err(format!("{s:?} does not start with http:// or https://"));
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if authority.is_empty()
            || authority.contains('@')
            || authority.contains(char::is_whitespace)
        {
            return Err(format!("{s:?} has no usable host"));
        }
        let default_port = if https { 443 } else { 80 };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let Some((h, after)) = v6.split_once(']') else {
                return Err(format!("{s:?}: unclosed [ in the host"));
            };
            let port = match after.strip_prefix(':') {
                Some(p) => p.parse().map_err(|_| format!("{s:?}: bad port {p:?}"))?,
                None if after.is_empty() => default_port,
                None => return Err(format!("{s:?}: junk after the host")),
            };
            (h.to_string(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (
                    h.to_string(),
                    p.parse().map_err(|_| format!("{s:?}: bad port {p:?}"))?,
                ),
                None => (authority.to_string(), default_port),
            }
        };
        if host.is_empty() || port == 0 || path.contains(char::is_whitespace) {
            return Err(format!(
                "{s:?} has an empty host, port 0 or spaces in the path"
            ));
        }
        Ok(Self {
            https,
            host,
            port,
            path: path.to_string(),
        })
    }
}

fn default_interval_ms() -> u64 {
    1_000
}
fn default_timeout_ms() -> u64 {
    5_000
}
fn default_fence_delay_ms() -> u64 {
    3_000
}
fn default_path_priority() -> u16 {
    1
}
fn default_witness_timeout_ms() -> u64 {
    2_000
}
fn default_witness_interval_ms() -> u64 {
    2_000
}
fn default_isolation_grace_ms() -> u64 {
    10_000
}
fn default_hook_timeout_ms() -> u64 {
    30_000
}
fn default_check_interval_ms() -> u64 {
    10_000
}

fn bad(field: &str, problem: impl Into<String>, fix: &str) -> CloudFieldError {
    CloudFieldError {
        field: field.into(),
        problem: problem.into(),
        fix: fix.into(),
    }
}

impl ClusterConfig {
    /// Heartbeat interval.
    pub fn interval(&self) -> Duration {
        Duration::from_millis(self.heartbeat_interval_ms)
    }
    /// Heartbeat timeout.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.heartbeat_timeout_ms)
    }

    /// Checks values that parse but cannot work; no I/O. `node_id` is this node's id.
    pub fn validate(&self, node_id: &str) -> Result<(), CloudFieldError> {
        if self.peer == node_id || self.peer.is_empty() {
            return Err(bad(
                "cluster.peer",
                format!("{:?} is not another node's id", self.peer),
                "write the peer's [node] id, e.g. peer = \"node-b\"",
            ));
        }
        for (field, p) in [
            ("cluster.priority", self.priority),
            ("cluster.peer_priority", self.peer_priority),
        ] {
            if !(1..=999).contains(&p) {
                return Err(bad(
                    field,
                    format!("{p} is outside 1..=999"),
                    "use 1..=999; lower is preferred, e.g. 10 and 20",
                ));
            }
        }
        if self.priority == self.peer_priority {
            return Err(bad(
                "cluster.peer_priority",
                format!("both nodes have priority {}", self.priority),
                "give the nodes different priorities, e.g. 10 and 20",
            ));
        }
        if self.heartbeats.len() < 2 {
            return Err(bad(
                "cluster.heartbeat",
                format!("{} heartbeat path(s) configured", self.heartbeats.len()),
                "add two or more [[cluster.heartbeat]] tables, one per network interface (e.g. service and replication)",
            ));
        }
        let mut names = std::collections::HashSet::new();
        let mut locals = std::collections::HashSet::new();
        for (i, h) in self.heartbeats.iter().enumerate() {
            if h.name.is_empty() || !names.insert(h.name.as_str()) {
                return Err(bad(
                    &format!("cluster.heartbeat[{i}].name"),
                    format!("{:?} is empty or used twice", h.name),
                    "give every path its own name, e.g. \"service\" and \"replication\"",
                ));
            }
            if !locals.insert(h.local) {
                return Err(bad(
                    &format!("cluster.heartbeat[{i}].local"),
                    format!("{} is used by two paths", h.local),
                    "give every path its own local address or port",
                ));
            }
            if h.local.port() == 0 || h.peer.port() == 0 {
                return Err(bad(
                    &format!("cluster.heartbeat[{i}]"),
                    "port 0 is not a fixed port",
                    "use a fixed UDP port such as 7790 on both sides",
                ));
            }
        }
        if self.heartbeat_interval_ms == 0
            || self.heartbeat_timeout_ms < 2 * self.heartbeat_interval_ms
        {
            return Err(bad(
                "cluster.heartbeat_timeout_ms",
                format!(
                    "interval {} ms and timeout {} ms: the timeout must cover at least two intervals",
                    self.heartbeat_interval_ms, self.heartbeat_timeout_ms
                ),
                "use e.g. heartbeat_interval_ms = 1000 and heartbeat_timeout_ms = 5000",
            ));
        }
        for (i, t) in self.witness.targets.iter().enumerate() {
            if let Err(e) = WitnessUrl::parse(t) {
                return Err(bad(
                    &format!("cluster.witness.targets[{i}]"),
                    e,
                    "write http://host[:port]/path or https://host[:port]/path",
                ));
            }
        }
        if self.witness.timeout_ms == 0 || self.witness.interval_ms == 0 {
            return Err(bad(
                "cluster.witness.timeout_ms",
                "witness timeout and interval must be above zero",
                "use e.g. timeout_ms = 2000, interval_ms = 2000",
            ));
        }
        if self.hooks.timeout_ms == 0 || self.hooks.check_interval_ms == 0 {
            return Err(bad(
                "cluster.hooks.timeout_ms",
                "hook timeout and check interval must be above zero",
                "use e.g. timeout_ms = 30000, check_interval_ms = 10000",
            ));
        }
        if !self.state_dir.is_absolute() {
            return Err(bad(
                "cluster.state_dir",
                format!("{} is not an absolute path", self.state_dir.display()),
                "use e.g. state_dir = \"/var/lib/twinvol\"",
            ));
        }
        if let Some(addr) = self.metrics_listen {
            if addr.port() == 0 {
                return Err(bad(
                    "cluster.metrics_listen",
                    format!("{addr} has port 0, which no scraper can find"),
                    "use a fixed port, e.g. metrics_listen = \"127.0.0.1:9464\"",
                ));
            }
        }
        if !self.control_socket.is_absolute() {
            return Err(bad(
                "cluster.control_socket",
                format!("{} is not an absolute path", self.control_socket.display()),
                "use e.g. control_socket = \"/run/twinvol/control.sock\"",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::path::Path;

    fn example(name: &str) -> String {
        std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("examples")
                .join(name),
        )
        .unwrap()
    }

    fn err_of(text: &str) -> String {
        Config::parse(Path::new("t.toml"), text)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn metrics_listen_is_optional_and_a_bad_value_names_the_field() {
        let base = example("lab-node-a.toml");
        let c = Config::parse(Path::new("t.toml"), &base).unwrap();
        assert_eq!(c.cluster.unwrap().metrics_listen, None);
        let with = |v: &str| {
            base.replacen(
                "control_socket =",
                &format!("metrics_listen = {v}\ncontrol_socket ="),
                1,
            )
        };
        let c = Config::parse(Path::new("t.toml"), &with("\"127.0.0.1:9464\"")).unwrap();
        assert_eq!(
            c.cluster.unwrap().metrics_listen,
            Some("127.0.0.1:9464".parse().unwrap())
        );
        let e = err_of(&with("\"localhost\""));
        assert!(e.contains("metrics_listen"), "{e}");
        let e = err_of(&with("\"127.0.0.1:0\""));
        assert!(
            e.contains("cluster.metrics_listen") && e.contains("fixed port"),
            "{e}"
        );
    }

    #[test]
    fn lab_examples_load_with_their_cluster_tables() {
        for f in ["lab-node-a.toml", "lab-node-b.toml"] {
            let c = Config::parse(Path::new(f), &example(f)).unwrap();
            let cl = c.cluster.unwrap();
            assert_eq!(cl.heartbeats.len(), 2);
            assert!(cl.lab.is_some());
        }
    }

    #[test]
    fn equal_priorities_are_refused_naming_the_field_and_fix() {
        let t = example("lab-node-a.toml").replace("peer_priority = 20", "peer_priority = 10");
        let e = err_of(&t);
        assert!(
            e.contains("cluster.peer_priority") && e.contains("different priorities"),
            "{e}"
        );
    }

    #[test]
    fn a_single_heartbeat_path_is_refused() {
        let t = example("lab-node-a.toml");
        let cut = t
            .find("[[cluster.heartbeat]]\nname = \"replication\"")
            .unwrap();
        let end = t.find("[cluster.witness]").unwrap();
        let t = format!("{}{}", &t[..cut], &t[end..]);
        let e = err_of(&t);
        assert!(
            e.contains("cluster.heartbeat") && e.contains("two or more"),
            "{e}"
        );
    }

    #[test]
    fn priority_outside_1_to_999_is_refused() {
        let e = err_of(&example("lab-node-a.toml").replace("priority = 10 ", "priority = 1000 "));
        assert!(
            e.contains("cluster.priority") && e.contains("1..=999"),
            "{e}"
        );
    }

    #[test]
    fn bad_witness_url_is_named() {
        let e = err_of(&example("lab-node-a.toml").replace("http://10.0.0.1/", "ftp://x/"));
        assert!(
            e.contains("cluster.witness.targets[0]") && e.contains("http://"),
            "{e}"
        );
    }

    #[test]
    fn timeout_shorter_than_two_intervals_is_refused() {
        let e = err_of(
            &example("lab-node-a.toml")
                .replace("heartbeat_timeout_ms = 5000", "heartbeat_timeout_ms = 1500"),
        );
        assert!(e.contains("cluster.heartbeat_timeout_ms"), "{e}");
    }

    #[test]
    fn witness_urls_parse_with_default_ports() {
        let u = WitnessUrl::parse("https://ec2.eu-west-1.amazonaws.com").unwrap();
        assert_eq!(
            (u.https, u.host.as_str(), u.port, u.path.as_str()),
            (true, "ec2.eu-west-1.amazonaws.com", 443, "/")
        );
        let u = WitnessUrl::parse("http://[::1]:8080/h?x=1").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("::1", 8080, "/h?x=1")
        );
        assert!(WitnessUrl::parse("http://host:0/").is_err());
        assert!(WitnessUrl::parse("http:///").is_err());
    }
}
