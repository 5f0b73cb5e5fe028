//! The connection handshake (docs/PROTOCOL.md, "Handshake"): Hellos, identity checks, and
//! mutual HMAC-SHA256 authentication, over any framed stream.
//!
//! Invariant: [`run`] returns `Ok` only when the peer proved it holds the key, its Hello names
//! this volume and this pair, and a protocol version is common. The acceptor sends its own proof
//! only after verifying the initiator's.

use tokio::io::{AsyncRead, AsyncWrite};

use super::error::LinkError;
use super::framed::Framed;
use crate::repl::wire::auth::{self, PreSharedKey, Role, Transcript};
use crate::repl::wire::{DisconnectReason, Hello, Message, MessageKind};

/// What the handshake learnt about the peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    /// The peer's Hello (generation ids, disk state, size, features) for the connect decision.
    pub hello: Hello,
    /// The protocol version both speak (the highest common one).
    pub version: u16,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Checks that `theirs` describes the partner `ours` expects; returns the common version, or
/// the reason to send and a detail naming both values and the fix.
pub fn check_peer_hello(ours: &Hello, theirs: &Hello) -> Result<u16, (DisconnectReason, String)> {
    let lo = ours.proto_min.max(theirs.proto_min);
    let hi = ours.proto_max.min(theirs.proto_max);
    if lo > hi {
        return Err((
            DisconnectReason::ProtocolVersion,
            format!(
                "no common protocol version (this node speaks {}..={}, peer {}..={}); upgrade the older node",
                ours.proto_min, ours.proto_max, theirs.proto_min, theirs.proto_max
            ),
        ));
    }
    if ours.volume_uuid != theirs.volume_uuid {
        return Err((
            DisconnectReason::VolumeMismatch,
            format!(
                "volume uuid {} here, {} on the peer; both nodes must serve the same volume (check the volume and replication.peer)",
                hex(&ours.volume_uuid),
                hex(&theirs.volume_uuid)
            ),
        ));
    }
    if theirs.node_id != ours.peer_node_id || theirs.peer_node_id != ours.node_id {
        return Err((
            DisconnectReason::NodeMismatch,
            format!(
                "this node {:?} expects peer {:?}, but the peer is {:?} expecting {:?}; fix node.id / the peer's node id in the config of both nodes",
                ours.node_id, ours.peer_node_id, theirs.node_id, theirs.peer_node_id
            ),
        ));
    }
    Ok(hi)
}

async fn expect<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut Framed<S>,
    expected: &'static str,
) -> Result<Message, LinkError> {
    let m = io.recv().await?;
    if let Message::Disconnect { reason, detail } = m {
        return Err(match reason {
            DisconnectReason::AuthFailed => LinkError::AuthRejectedByPeer { peer: io.peer() },
            _ => LinkError::PeerDisconnected {
                peer: io.peer(),
                reason,
                detail,
            },
        });
    }
    let kind = m.kind();
    let ok = matches!(
        (expected, kind),
        ("Hello", MessageKind::Hello)
            | ("AuthChallenge", MessageKind::AuthChallenge)
            | ("AuthResponse", MessageKind::AuthResponse)
    );
    if !ok {
        return Err(LinkError::Unexpected {
            peer: io.peer(),
            expected,
            got: kind,
        });
    }
    Ok(m)
}

async fn refuse<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut Framed<S>,
    reason: DisconnectReason,
    detail: &str,
) {
    // Best effort: the connection is closed right after either way.
    let _ = io
        .send(&Message::Disconnect {
            reason,
            detail: detail.to_string(),
        })
        .await;
    io.shutdown().await;
}

/// Runs the handshake as `role` with our Hello `ours`. No timeout here: the caller bounds it.
pub async fn run<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut Framed<S>,
    role: Role,
    key: &PreSharedKey,
    ours: &Hello,
) -> Result<PeerInfo, LinkError> {
    let peer = io.peer();
    let our_nonce = auth::new_nonce().map_err(|e| LinkError::Random(e.to_string()))?;
    io.queue(&Message::Hello(ours.clone()))?;
    io.queue(&Message::AuthChallenge { nonce: our_nonce })?;
    io.flush().await?;

    let Message::Hello(theirs) = expect(io, "Hello").await? else {
        return Err(LinkError::Unexpected {
            peer,
            expected: "Hello",
            got: MessageKind::Hello,
        });
    };
    let version = match check_peer_hello(ours, &theirs) {
        Ok(v) => v,
        Err((reason, detail)) => {
            refuse(io, reason, &detail).await;
            return Err(LinkError::Mismatch {
                peer,
                reason,
                detail,
            });
        }
    };
    let Message::AuthChallenge { nonce: their_nonce } = expect(io, "AuthChallenge").await? else {
        return Err(LinkError::Unexpected {
            peer,
            expected: "AuthChallenge",
            got: MessageKind::AuthChallenge,
        });
    };
    let (initiator_hello, acceptor_hello, initiator_nonce, acceptor_nonce) = match role {
        Role::Initiator => (ours, &theirs, &our_nonce, &their_nonce),
        Role::Acceptor => (&theirs, ours, &their_nonce, &our_nonce),
    };
    let t = Transcript {
        initiator_nonce,
        acceptor_nonce,
        initiator_hello,
        acceptor_hello,
    };
    let their_role = match role {
        Role::Initiator => Role::Acceptor,
        Role::Acceptor => Role::Initiator,
    };
    let our_proof = Message::AuthResponse {
        mac: auth::prove(key, role, &t),
    };
    if role == Role::Initiator {
        io.send(&our_proof).await?;
    }
    let Message::AuthResponse { mac } = expect(io, "AuthResponse").await? else {
        return Err(LinkError::Unexpected {
            peer,
            expected: "AuthResponse",
            got: MessageKind::AuthResponse,
        });
    };
    if !auth::verify(key, their_role, &t, &mac) {
        refuse(
            io,
            DisconnectReason::AuthFailed,
            "authentication failed: the replication keys differ",
        )
        .await;
        return Err(LinkError::AuthFailed { peer });
    }
    if role == Role::Acceptor {
        io.send(&our_proof).await?;
    }
    Ok(PeerInfo {
        hello: theirs,
        version,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repl::wire::{FrameDecoder, FrameEncoder, Generations, DEFAULT_MAX_PAYLOAD};

    fn hello(id: &str, peer: &str) -> Hello {
        Hello {
            proto_min: 1,
            proto_max: 1,
            volume_uuid: [0xab; 16],
            node_id: id.into(),
            peer_node_id: peer.into(),
            generations: Generations {
                current: 5,
                bitmap: 0,
                history1: 4,
                history2: 3,
            },
            disk_state: 2,
            bitmap_granularity: 4096,
            device_size: 1 << 30,
            features: 7,
        }
    }

    fn framed(s: tokio::io::DuplexStream) -> Framed<tokio::io::DuplexStream> {
        let addr = "127.0.0.1:7789".parse().unwrap();
        Framed::new(
            s,
            addr,
            FrameEncoder::new(1, DEFAULT_MAX_PAYLOAD).unwrap(),
            FrameDecoder::new(DEFAULT_MAX_PAYLOAD).unwrap(),
        )
    }

    async fn pair(
        ha: Hello,
        hb: Hello,
        ka: PreSharedKey,
        kb: PreSharedKey,
    ) -> (Result<PeerInfo, LinkError>, Result<PeerInfo, LinkError>) {
        let (a, b) = tokio::io::duplex(1 << 16);
        let (mut a, mut b) = (framed(a), framed(b));
        tokio::join!(
            run(&mut a, Role::Initiator, &ka, &ha),
            run(&mut b, Role::Acceptor, &kb, &hb)
        )
    }

    fn key(s: &str) -> PreSharedKey {
        PreSharedKey::new(s.as_bytes().to_vec()).unwrap()
    }

    #[tokio::test]
    async fn same_key_and_matching_hellos_authenticate_both_sides() {
        let (a, b) = pair(
            hello("a", "b"),
            hello("b", "a"),
            key("0123456789abcdef"),
            key("0123456789abcdef"),
        )
        .await;
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_eq!(a.hello, hello("b", "a"));
        assert_eq!(b.hello, hello("a", "b"));
        assert_eq!((a.version, b.version), (1, 1));
    }

    #[tokio::test]
    async fn highest_common_version_is_chosen() {
        let mut ha = hello("a", "b");
        (ha.proto_min, ha.proto_max) = (1, 3);
        let mut hb = hello("b", "a");
        (hb.proto_min, hb.proto_max) = (2, 5);
        let (a, b) = pair(ha, hb, key("0123456789abcdef"), key("0123456789abcdef")).await;
        assert_eq!((a.unwrap().version, b.unwrap().version), (3, 3));
    }

    #[tokio::test]
    async fn other_volume_is_refused_naming_both_uuids() {
        let mut hb = hello("b", "a");
        hb.volume_uuid = [0xcd; 16];
        let (a, b) = pair(
            hello("a", "b"),
            hb,
            key("0123456789abcdef"),
            key("0123456789abcdef"),
        )
        .await;
        for e in [a.unwrap_err(), b.unwrap_err()] {
            let t = e.to_string();
            assert!(
                t.contains(&"ab".repeat(16)) && t.contains(&"cd".repeat(16)),
                "{t}"
            );
        }
    }

    #[tokio::test]
    async fn wrong_peer_node_is_refused() {
        let (a, _b) = pair(
            hello("a", "b"),
            hello("c", "a"),
            key("0123456789abcdef"),
            key("0123456789abcdef"),
        )
        .await;
        let t = a.unwrap_err().to_string();
        assert!(t.contains("\"c\"") && t.contains("node.id"), "{t}");
    }

    #[tokio::test]
    async fn no_common_version_is_refused_with_both_ranges() {
        let mut hb = hello("b", "a");
        (hb.proto_min, hb.proto_max) = (2, 2);
        let (a, b) = pair(
            hello("a", "b"),
            hb,
            key("0123456789abcdef"),
            key("0123456789abcdef"),
        )
        .await;
        assert!(a.unwrap_err().to_string().contains("1..=1"));
        assert!(b.is_err());
    }
}
