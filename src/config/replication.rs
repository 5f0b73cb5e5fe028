//! `[volume.replication]`: how a volume is mirrored to the peer node.
//!
//! Parsed by serde (unknown keys are errors); [`ReplicationConfig::validate`] checks values that
//! parse but cannot work and names the field and the fix.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// When the NBD reply is sent relative to the peer's copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ReplicationMode {
    /// DRBD protocol C: after the local write and the peer's ack that the data is on its disk.
    #[default]
    Sync,
    /// After the local write; the peer's copy trails by a bounded queue (the RPO).
    Async,
}

/// What a Primary does when its own disk fails a write, a read or a flush.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum DiskErrorPolicy {
    /// Mark this copy failed and serve every read and write through the peer's copy, which
    /// holds all of it (DRBD's `on-io-error detach`); the application sees no error.
    #[default]
    Detach,
    /// As `detach`, then hand the service over to the peer (the daemon stands down).
    Failover,
    /// Return the error to the application; the region is marked dirty for the resync.
    PassThrough,
}

/// What to do when both sides wrote independently (split brain).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
#[serde(into = "String")]
pub enum SplitBrainPolicy {
    /// Refuse to connect; an operator decides (default).
    #[default]
    Disconnect,
    /// If exactly one side wrote nothing since the split, it becomes the resync target.
    DiscardZeroChanges,
    /// The named node's changes are discarded: it becomes the resync target.
    DiscardNode(String),
}

impl From<SplitBrainPolicy> for String {
    fn from(p: SplitBrainPolicy) -> String {
        match p {
            SplitBrainPolicy::Disconnect => "disconnect".into(),
            SplitBrainPolicy::DiscardZeroChanges => "discard-zero-changes".into(),
            SplitBrainPolicy::DiscardNode(n) => format!("discard-node:{n}"),
        }
    }
}

impl std::str::FromStr for SplitBrainPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "disconnect" => Ok(Self::Disconnect),
            "discard-zero-changes" => Ok(Self::DiscardZeroChanges),
            _ => match s.strip_prefix("discard-node:") {
                Some(n) if !n.is_empty() => Ok(Self::DiscardNode(n.to_string())),
                _ => Err(format!(
                    "unknown split_brain_policy {s:?}; use \"disconnect\", \"discard-zero-changes\" or \"discard-node:<node id>\""
                )),
            },
        }
    }
}

impl<'de> Deserialize<'de> for SplitBrainPolicy {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Where the volume's metadata (bitmap, activity log, generation ids) lives.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase", tag = "kind", deny_unknown_fields)]
pub enum MetadataPlacement {
    /// At the tail of the data device (created by `twinvol create-md --device DEV`); the
    /// exported size shrinks by the metadata area.
    #[default]
    Internal,
    /// On a separate device, partition or file (`create-md --meta-device PATH`).
    External {
        /// The metadata device.
        device: PathBuf,
    },
}

/// `[volume.replication]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicationConfig {
    /// This node's replication address (IP:port on the dedicated interface).
    pub address: SocketAddr,
    /// The peer's replication address.
    pub peer: SocketAddr,
    /// The peer's node id (its `node.id`).
    pub peer_id: String,
    /// Interface to pin replication sockets to (SO_BINDTODEVICE), e.g. "ens6".
    #[serde(default)]
    pub interface: Option<String>,
    /// File holding the pre-shared key (at least 32 bytes; mode 0600).
    pub key_file: PathBuf,
    /// sync (protocol C) or async.
    #[serde(default)]
    pub mode: ReplicationMode,
    /// Async mode: bytes sent but not yet acknowledged before the volume goes "ahead".
    #[serde(default = "default_max_inflight")]
    pub max_inflight_bytes: u64,
    /// zstd level for frames (0 = off, 1..=19).
    #[serde(default = "default_level")]
    pub compression_level: i32,
    /// Resync rate ceiling in bytes per second.
    #[serde(default = "default_rate_max")]
    pub resync_rate_max: u64,
    /// Resync rate floor in bytes per second, kept even while the application writes.
    #[serde(default = "default_rate_min")]
    pub resync_rate_min: u64,
    /// Compare block CRCs before sending resync data (for resyncs after a crash).
    #[serde(default)]
    pub checksum_resync: bool,
    /// What to do on split brain.
    #[serde(default)]
    pub split_brain_policy: SplitBrainPolicy,
    /// Where the metadata is.
    #[serde(default)]
    pub metadata: MetadataPlacement,
    /// Seconds of silence before the peer counts as lost.
    #[serde(default = "default_ping_timeout")]
    pub ping_timeout_secs: u64,
    /// Sync mode, Primary, connection lost: how long a write's completion is held until the
    /// peer's copy is known to be Outdated (its heartbeat says so; needs `twinvol run`), or the
    /// connection is back, before it completes on this copy alone. 0 (default) holds nothing.
    /// Set it above the peer's takeover time (heartbeat timeout + fence) so that no write is
    /// acknowledged alone while the peer could still take over with a copy that lacks it.
    #[serde(default)]
    pub outdate_wait_ms: u64,
    /// What a Primary does when its own disk fails (`"detach"`, the default, `"failover"` or
    /// `"pass-through"`). Detaching needs a connected, up-to-date peer; otherwise the error
    /// goes to the application.
    #[serde(default)]
    pub on_disk_error: DiskErrorPolicy,
}

fn default_max_inflight() -> u64 {
    64 << 20
}
fn default_level() -> i32 {
    1
}
fn default_rate_max() -> u64 {
    250 << 20
}
fn default_rate_min() -> u64 {
    10 << 20
}
fn default_ping_timeout() -> u64 {
    5
}

/// A replication field that parses but cannot work: which field, what is wrong, what to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicationProblem {
    /// Field name below `replication.`.
    pub field: &'static str,
    /// What is wrong.
    pub problem: String,
    /// What to write instead.
    pub fix: String,
}

impl ReplicationConfig {
    /// Checks values; `node_id` is this node's `node.id`.
    pub fn validate(&self, node_id: &str) -> Result<(), ReplicationProblem> {
        let bad = |field, problem: String, fix: &str| ReplicationProblem {
            field,
            problem,
            fix: fix.into(),
        };
        if self.address == self.peer {
            return Err(bad(
                "peer",
                format!("{} is also this node's address", self.peer),
                "set peer to the other node's replication IP:port",
            ));
        }
        if self.address.port() == 0 || self.peer.port() == 0 {
            return Err(bad(
                "address",
                "port 0 cannot be reached by the peer".into(),
                "use a fixed port on both nodes, e.g. 7789",
            ));
        }
        if self.peer_id == node_id || !super::valid_ident(&self.peer_id) {
            return Err(bad(
                "peer_id",
                format!("{:?} is not the other node's id", self.peer_id),
                "set peer_id to the peer's node.id (1-64 letters, digits, '-' or '_'), different from this node's",
            ));
        }
        if !(0..=19).contains(&self.compression_level) {
            return Err(bad(
                "compression_level",
                format!("{} is out of range", self.compression_level),
                "use 0 (off) to 19; 1 is fast and usually enough",
            ));
        }
        if self.max_inflight_bytes < 1 << 20 {
            return Err(bad(
                "max_inflight_bytes",
                format!("{} is below 1 MiB", self.max_inflight_bytes),
                "use at least 1048576 (default 64 MiB)",
            ));
        }
        if self.resync_rate_min == 0 || self.resync_rate_min > self.resync_rate_max {
            return Err(bad(
                "resync_rate_min",
                format!(
                    "floor {} must be above 0 and at most resync_rate_max {}",
                    self.resync_rate_min, self.resync_rate_max
                ),
                "e.g. resync_rate_min = 10485760, resync_rate_max = 262144000",
            ));
        }
        if let SplitBrainPolicy::DiscardNode(n) = &self.split_brain_policy {
            if n != node_id && n != &self.peer_id {
                return Err(bad(
                    "split_brain_policy",
                    format!("discard-node:{n} names neither this node nor the peer"),
                    "use discard-node:<node.id of one of the two nodes>",
                ));
            }
        }
        if self.outdate_wait_ms > 0 && self.mode != ReplicationMode::Sync {
            return Err(bad(
                "outdate_wait_ms",
                format!(
                    "{} ms given in {:?} mode, where writes never wait for the peer",
                    self.outdate_wait_ms, self.mode
                ),
                "remove it, or set mode = \"sync\"",
            ));
        }
        if self.ping_timeout_secs == 0 {
            return Err(bad(
                "ping_timeout_secs",
                "0 would drop every connection".into(),
                "use a few seconds, e.g. 5",
            ));
        }
        Ok(())
    }
}
