//! The heartbeat datagram: a pure codec, authenticated with the pre-shared key.
//!
//! Layout (big-endian): magic `TVHB` (4) | version (1) | path index (1) | role (1) | disk (1) |
//! flags (1) | node id length (1) | priority (2) | incarnation (8) | sequence (8) |
//! [version 2: acknowledged incarnation (8) | acknowledged sequence (8)] | node id |
//! HMAC-SHA256 (32) over everything before it.
//!
//! Version 2 adds the acknowledgement: the newest heartbeat the sender has received from its
//! peer (the peer's incarnation and sequence number). A node announcing a promotion
//! ([`FLAG_PROMOTING`]) knows from it when the peer has heard the announcement. Version 1
//! datagrams (no acknowledgement) are still decoded, and a node answers a version-1 peer in
//! version 1, so a pair can be upgraded one node at a time.
//!
//! Invariant: [`decode`] returns a [`Heartbeat`] only for a datagram whose MAC verifies under
//! the key; anything else is an error and changes no state.

use crate::repl::wire::auth::PreSharedKey;

/// First bytes of every heartbeat.
pub const MAGIC: [u8; 4] = *b"TVHB";
/// The version sent to peers that speak it (version 1 is still understood).
pub const VERSION: u8 = 2;
/// The version without acknowledgements.
pub const VERSION_1: u8 = 1;
const LABEL: &[u8] = b"twinvol heartbeat v1";
const FIXED_V1: usize = 4 + 1 + 1 + 1 + 1 + 1 + 1 + 2 + 8 + 8;
const FIXED_V2: usize = FIXED_V1 + 8 + 8;
const MAC_LEN: usize = 32;
/// Longest node id carried.
pub const MAX_NODE_ID: usize = 64;

/// A node's role as carried in heartbeats and status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Not serving.
    Secondary,
    /// Serving (volume writable, exported, applications running).
    Primary,
}

/// Whether the node's data may be promoted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiskState {
    /// Complete and current.
    UpToDate,
    /// Being resynced or otherwise incomplete; promotion only with force.
    Inconsistent,
    /// Possibly behind the peer.
    Outdated,
}

/// Flag: this node stands down for the peer (operator demote or switchover).
pub const FLAG_YIELDING: u8 = 1;
/// Flag: this node asks the peer to hand over (operator switchover on the standby).
pub const FLAG_WANTS_PRIMARY: u8 = 2;
/// Flag: this Primary has acknowledged writes its peer does not have (a mirrored volume is
/// disconnected with unreplicated bytes): the peer's copy is outdated and must not be promoted.
pub const FLAG_PEER_OUTDATED: u8 = 4;
/// Flag: this Secondary announces that it is about to promote; it waits until the peer's
/// heartbeat acknowledges one carrying this flag, and the peer does not promote meanwhile.
pub const FLAG_PROMOTING: u8 = 8;
/// Flag: this node will not promote whatever it hears (it is stopping, or it hears nothing
/// from the peer and reaches no witness): a peer promoting now need not wait for its
/// acknowledgement, which may never come (a one-way partition).
pub const FLAG_CANNOT_PROMOTE: u8 = 16;

/// The newest heartbeat a node has received from its peer, echoed in its own heartbeats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Ack {
    /// The peer's incarnation (0: nothing received yet).
    pub incarnation: u64,
    /// The peer's sequence number in that incarnation.
    pub seq: u64,
}

/// One heartbeat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heartbeat {
    /// Sender's node id.
    pub node_id: String,
    /// Index of the path in the sender's configuration (same order on both nodes).
    pub path: u8,
    /// Sender's role.
    pub role: Role,
    /// Sender's disk state.
    pub disk: DiskState,
    /// FLAG_* bits.
    pub flags: u8,
    /// Sender's node priority.
    pub priority: u16,
    /// Random per daemon start; sequence numbers restart with a new incarnation.
    pub incarnation: u64,
    /// Increases by one per send round (the same value goes out on every path).
    pub seq: u64,
    /// The newest heartbeat received from the peer (version 2; default in version 1).
    pub ack: Ack,
    /// Wire version: [`VERSION`], or [`VERSION_1`] for a peer that speaks only that.
    pub version: u8,
}

/// Why a datagram was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Too short, wrong magic or version, or inconsistent lengths.
    #[error("not a twinvol heartbeat ({0})")]
    Malformed(&'static str),
    /// The MAC does not verify: a different key or a forged/damaged datagram.
    #[error("heartbeat MAC does not verify: the peer uses a different cluster.key_file, or the datagram was altered")]
    BadMac,
}

/// Encodes and authenticates a heartbeat in `hb.version` (version 1 leaves the acknowledgement
/// out); node ids longer than [`MAX_NODE_ID`] are cut.
pub fn encode(hb: &Heartbeat, key: &PreSharedKey) -> Vec<u8> {
    let id = &hb.node_id.as_bytes()[..hb.node_id.len().min(MAX_NODE_ID)];
    let v1 = hb.version == VERSION_1;
    let mut b = Vec::with_capacity(FIXED_V2 + id.len() + MAC_LEN);
    b.extend_from_slice(&MAGIC);
    b.push(if v1 { VERSION_1 } else { VERSION });
    b.push(hb.path);
    b.push(match hb.role {
        Role::Secondary => 0,
        Role::Primary => 1,
    });
    b.push(match hb.disk {
        DiskState::UpToDate => 0,
        DiskState::Inconsistent => 1,
        DiskState::Outdated => 2,
    });
    b.push(hb.flags);
    b.push(id.len() as u8);
    b.extend_from_slice(&hb.priority.to_be_bytes());
    b.extend_from_slice(&hb.incarnation.to_be_bytes());
    b.extend_from_slice(&hb.seq.to_be_bytes());
    if !v1 {
        b.extend_from_slice(&hb.ack.incarnation.to_be_bytes());
        b.extend_from_slice(&hb.ack.seq.to_be_bytes());
    }
    b.extend_from_slice(id);
    let tag = key.tag(LABEL, &[&b]);
    b.extend_from_slice(&tag);
    b
}

/// Decodes and verifies a datagram.
pub fn decode(buf: &[u8], key: &PreSharedKey) -> Result<Heartbeat, DecodeError> {
    if buf.len() < FIXED_V1 + MAC_LEN {
        return Err(DecodeError::Malformed("too short"));
    }
    if buf[..4] != MAGIC {
        return Err(DecodeError::Malformed("bad magic"));
    }
    let (version, fixed) = match buf[4] {
        VERSION_1 => (VERSION_1, FIXED_V1),
        VERSION => (VERSION, FIXED_V2),
        _ => return Err(DecodeError::Malformed("unknown version")),
    };
    let id_len = buf[9] as usize;
    if id_len > MAX_NODE_ID || buf.len() != fixed + id_len + MAC_LEN {
        return Err(DecodeError::Malformed("length mismatch"));
    }
    let body = &buf[..fixed + id_len];
    let mut tag = [0u8; MAC_LEN];
    tag.copy_from_slice(&buf[fixed + id_len..]);
    if !key.verify_tag(LABEL, &[body], &tag) {
        return Err(DecodeError::BadMac);
    }
    let role = match buf[6] {
        0 => Role::Secondary,
        1 => Role::Primary,
        _ => return Err(DecodeError::Malformed("unknown role")),
    };
    let disk = match buf[7] {
        0 => DiskState::UpToDate,
        1 => DiskState::Inconsistent,
        2 => DiskState::Outdated,
        _ => return Err(DecodeError::Malformed("unknown disk state")),
    };
    let u64_at = |i: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&buf[i..i + 8]);
        u64::from_be_bytes(a)
    };
    let node_id = std::str::from_utf8(&buf[fixed..fixed + id_len])
        .map_err(|_| DecodeError::Malformed("node id is not UTF-8"))?
        .to_string();
    let ack = if version == VERSION_1 {
        Ack::default()
    } else {
        Ack {
            incarnation: u64_at(FIXED_V1),
            seq: u64_at(FIXED_V1 + 8),
        }
    };
    Ok(Heartbeat {
        node_id,
        path: buf[5],
        role,
        disk,
        flags: buf[8],
        priority: u16::from_be_bytes([buf[10], buf[11]]),
        incarnation: u64_at(12),
        seq: u64_at(20),
        ack,
        version,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(b: u8) -> PreSharedKey {
        PreSharedKey::new(vec![b; 32]).unwrap()
    }

    fn hb() -> Heartbeat {
        Heartbeat {
            node_id: "node-a".into(),
            path: 1,
            role: Role::Primary,
            disk: DiskState::UpToDate,
            flags: FLAG_YIELDING,
            priority: 10,
            incarnation: 0xfeed,
            seq: 42,
            ack: Ack {
                incarnation: 0xbeef,
                seq: 7,
            },
            version: VERSION,
        }
    }

    #[test]
    fn a_version_1_heartbeat_round_trips_without_its_acknowledgement() {
        let k = key(1);
        let mut h = hb();
        h.version = VERSION_1;
        let bytes = encode(&h, &k);
        assert_eq!(bytes[4], 1);
        assert_eq!(bytes.len(), FIXED_V1 + h.node_id.len() + MAC_LEN);
        h.ack = Ack::default();
        assert_eq!(decode(&bytes, &k).unwrap(), h);
    }

    #[test]
    fn heartbeat_round_trips_under_the_same_key() {
        let k = key(1);
        assert_eq!(decode(&encode(&hb(), &k), &k).unwrap(), hb());
    }

    #[test]
    fn heartbeat_under_another_key_is_refused() {
        assert_eq!(
            decode(&encode(&hb(), &key(1)), &key(2)),
            Err(DecodeError::BadMac)
        );
    }

    #[test]
    fn any_flipped_bit_is_refused() {
        let k = key(3);
        let good = encode(&hb(), &k);
        for i in 0..good.len() * 8 {
            let mut b = good.clone();
            b[i / 8] ^= 1 << (i % 8);
            assert!(decode(&b, &k).is_err(), "bit {i} flipped was accepted");
        }
    }

    proptest! {
        #[test]
        fn any_heartbeat_round_trips(id in "[a-z0-9_-]{1,64}", path: u8, primary: bool, disk in 0u8..3,
                                     flags: u8, priority: u16, inc: u64, seq: u64,
                                     ack_inc: u64, ack_seq: u64) {
            let k = key(9);
            let h = Heartbeat {
                node_id: id, path,
                role: if primary { Role::Primary } else { Role::Secondary },
                disk: [DiskState::UpToDate, DiskState::Inconsistent, DiskState::Outdated][disk as usize],
                flags, priority, incarnation: inc, seq,
                ack: Ack { incarnation: ack_inc, seq: ack_seq },
                version: VERSION,
            };
            prop_assert_eq!(decode(&encode(&h, &k), &k).unwrap(), h);
        }

        #[test]
        fn arbitrary_bytes_never_panic_and_never_verify(b in proptest::collection::vec(any::<u8>(), 0..200)) {
            prop_assert!(decode(&b, &key(5)).is_err());
        }
    }
}
