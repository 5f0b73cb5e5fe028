//! The status snapshot of one mirrored volume: a plain serialisable value for `twinvol status`,
//! the cluster daemon and tests. Taking it never blocks the data path.

use crate::repl::resync::ProgressReport;

use super::link_health::LinkProblem;
use super::plan::Refusal;

/// Role of this node for a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Serves the volume; its writes are mirrored to the peer.
    Primary,
    /// Receives the primary's writes; refuses exports and writes of its own.
    Secondary,
}

/// The replication connection.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case", tag = "state")]
pub enum Connection {
    /// Waiting for the peer (listening or connecting).
    Connecting,
    /// Connected and replicating (maybe resyncing).
    Connected,
    /// The last connection was refused; the reason stays until the next attempt succeeds.
    Refused {
        /// Why.
        #[serde(flatten)]
        refusal: Refusal,
    },
}

/// Which way a running resync copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ResyncRole {
    /// This node sends.
    Source,
    /// This node receives; its copy is Inconsistent until done.
    Target,
}

/// A resync in progress.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ResyncStatus {
    /// Direction from this node's view.
    pub role: ResyncRole,
    /// Bytes done, left, rate, ETA (source side; the target reports bytes received).
    #[serde(flatten)]
    pub progress: ProgressReport,
}

/// Counters since the process started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counters {
    /// Application write bytes sent to the peer in Data frames.
    pub data_bytes_sent: u64,
    /// Resync bytes sent to the peer.
    pub resync_bytes_sent: u64,
    /// Resync bytes not sent because checksum resync found them identical on the peer.
    pub resync_bytes_in_sync: u64,
    /// Data bytes applied from the peer (Data frames).
    pub data_bytes_applied: u64,
    /// Resync bytes applied from the peer.
    pub resync_bytes_applied: u64,
    /// Frames refused because a CRC (or any framing check) failed; never written.
    pub corrupt_frames: u64,
    /// Connections established (handshake and plan done).
    pub connections: u64,
    /// Times async mode went "ahead" (queue over its bound).
    pub ahead_events: u64,
    /// Replication frames sent (every message, all connections).
    #[serde(default)]
    pub frames_sent: u64,
    /// Bytes of those frames before compression (payloads as the application wrote them).
    #[serde(default)]
    pub payload_bytes_sent: u64,
    /// Bytes of those frames on the wire (headers + compressed or raw payloads);
    /// `wire_bytes_sent / payload_bytes_sent` is the compression ratio.
    #[serde(default)]
    pub wire_bytes_sent: u64,
    /// Socket writes that carried those frames: `frames_sent / writes_sent` is how well the
    /// sender batches (each write may wake the peer's reader).
    #[serde(default)]
    pub writes_sent: u64,
    /// Application writes that waited for an activity-log slot because every slot they could
    /// take held writes in flight (more than `--al-extents` extents busy at once: raise it
    /// with `create-md` if this keeps growing). Async mode goes ahead instead of waiting for
    /// the peer, so there it counts only waits for local writes to end.
    #[serde(default)]
    pub activity_log_waits: u64,
    /// Replicated writes this node failed to store (Secondary): each left this copy Outdated
    /// (Inconsistent when it was a resync write).
    #[serde(default)]
    pub local_apply_errors: u64,
    /// Writes the peer acknowledged with an error (Primary): each stayed dirty here, and the
    /// peer's copy is Outdated (Inconsistent during a resync) until a resync completes.
    #[serde(default)]
    pub peer_write_errors: u64,
    /// Errors of this node's own disk on the Primary (each detaches it, or goes to the
    /// application when it cannot be detached).
    #[serde(default)]
    pub local_disk_errors: u64,
}

/// Why this node's own metadata says its copy is the newest of the pair, so that it may
/// promote after a start without having heard its peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NewestProof {
    /// It was Primary when it stopped cleanly, with no peer able to take over.
    PrimaryAtCleanStop,
    /// It recorded the peer's copy Outdated (the peer said so, or stopped while connected).
    PeerOutdated,
}

impl std::fmt::Display for NewestProof {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NewestProof::PrimaryAtCleanStop => {
                "it was Primary at a clean stop with no peer to hand over to"
            }
            NewestProof::PeerOutdated => "it recorded the peer's copy as Outdated",
        })
    }
}

/// Everything an operator or the cluster daemon needs about one volume.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct VolumeStatus {
    /// Volume name.
    pub volume: String,
    /// This node.
    pub node: String,
    /// Role.
    pub role: Role,
    /// Replication connection.
    pub connection: Connection,
    /// This copy: "up-to-date", "consistent", "inconsistent" or "outdated".
    pub disk: &'static str,
    /// "sync" or "async".
    pub mode: &'static str,
    /// Async: the volume stopped sending data because the queue overflowed.
    pub ahead: bool,
    /// Bytes written here that the peer may not have (dirty-bitmap granularity).
    pub rpo_bytes: u64,
    /// Age of the oldest write the peer may not have, in seconds (0 when none).
    pub rpo_seconds: f64,
    /// Bytes sent but not yet acknowledged.
    pub inflight_bytes: u64,
    /// Sync mode with `outdate_wait_ms`: writes whose completion waits until the peer's copy
    /// is known outdated or the connection is back.
    pub held_writes: u64,
    /// The peer's copy is known outdated since the connection was lost (writes complete
    /// alone without waiting).
    pub peer_outdated: bool,
    /// The resync in progress, if any.
    pub resync: Option<ResyncStatus>,
    /// Counters.
    pub counters: Counters,
    /// The running or last online verify (`twinvol verify`), if any since the start.
    pub verify: Option<VerifyStatus>,
    /// Current generation id (hex).
    pub current_generation: String,
    /// Why the replication link is down: the last failure since the last connection (cleared
    /// when a connection is made or the plan refuses one, which `connection` then explains).
    pub link_error: Option<LinkProblem>,
    /// Why this copy's metadata says it is the newest of the pair, if it does (the start-up
    /// gate lets such a node promote without having heard its peer).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub newest: Option<NewestProof>,
    /// This Primary's disk failed and was detached (why): its reads and writes are served
    /// by the peer's copy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detached: Option<String>,
    /// Since the connection was lost this node, as Primary, wrote alone or had writes in
    /// flight: the peer's copy may lack acknowledged writes (its heartbeats say so until the
    /// peer is connected again, whatever this node's role by then).
    #[serde(default)]
    pub wrote_alone: bool,
}

/// An online verify (`twinvol verify`): progress while running, the result after.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct VerifyStatus {
    /// Still walking the device.
    pub running: bool,
    /// Bytes compared so far.
    pub checked_bytes: u64,
    /// Bytes to compare (the device).
    pub total_bytes: u64,
    /// Bytes per compared block.
    pub block_size: u32,
    /// Blocks that differed from the peer's copy in chunks believed in sync: marked dirty
    /// and resynced from this node.
    pub differing_blocks: u64,
    /// Bytes of differing blocks in chunks that were dirty already (a resync copies them).
    pub skipped_dirty_bytes: u64,
    /// Seconds the walk took so far.
    pub elapsed_secs: f64,
    /// Why the verify stopped early, if it did.
    pub error: Option<String>,
}
