//! Mutual authentication with a pre-shared key: HMAC-SHA256 challenge-response
//! (docs/PROTOCOL.md, "Handshake").
//!
//! Each side sends a 32-byte random nonce; each side then proves knowledge of the key with
//! `HMAC(key, label || role || initiator nonce || acceptor nonce || both Hello payloads)`.
//! The role byte differs for the two sides, so a response can never be reflected back to its
//! sender; the nonces make every response fresh; the Hellos are bound into the MAC so they
//! cannot be altered in flight. Verification is constant-time.
//!
//! Invariant: the key bytes never leave [`PreSharedKey`] except into the HMAC: its `Debug`
//! prints `PreSharedKey(<redacted, N bytes>)` and no error of this crate contains them.

use bytes::BytesMut;
use hmac::{KeyInit, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use super::message::{Hello, Message, AUTH_LEN};

type HmacSha256 = hmac::Hmac<Sha256>;

/// Domain-separation label, so a MAC computed here means nothing in any other protocol.
const LABEL: &[u8] = b"twinvol replication auth v1";
/// Shortest key accepted (128 bits).
pub const MIN_KEY_LEN: usize = 16;
/// Longest key accepted.
pub const MAX_KEY_LEN: usize = 1024;

/// The pre-shared replication key. Redacted in `Debug`; compared in constant time; zeroed
/// when dropped.
#[derive(Clone)]
pub struct PreSharedKey(Vec<u8>);

impl PartialEq for PreSharedKey {
    fn eq(&self, other: &Self) -> bool {
        bool::from(self.0.ct_eq(&other.0))
    }
}

impl Eq for PreSharedKey {}

/// A key that cannot be used. The message states lengths only, never key bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// Too short or too long.
    #[error("replication key is {len} bytes; use {MIN_KEY_LEN}..={MAX_KEY_LEN} random bytes (e.g. `head -c 32 /dev/urandom | base64` into the key file)")]
    Length {
        /// The length given.
        len: usize,
    },
}

impl PreSharedKey {
    /// Wraps key bytes; refuses keys shorter than 16 or longer than 1024 bytes.
    pub fn new(bytes: Vec<u8>) -> Result<Self, KeyError> {
        if !(MIN_KEY_LEN..=MAX_KEY_LEN).contains(&bytes.len()) {
            let len = bytes.len();
            let mut bytes = bytes;
            wipe(&mut bytes);
            return Err(KeyError::Length { len });
        }
        Ok(Self(bytes))
    }

    /// Key length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Always false (an empty key is refused by [`PreSharedKey::new`]).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// HMAC-SHA256 under this key of `label` (domain separation) followed by `parts`, each
    /// preceded by its length; for other protocols sharing the key (cluster heartbeats).
    pub fn tag(&self, label: &[u8], parts: &[&[u8]]) -> [u8; 32] {
        let mut m = self.mac();
        m.update(label);
        for p in parts {
            m.update(&(p.len() as u32).to_be_bytes());
            m.update(p);
        }
        let mut out = [0u8; 32];
        out.copy_from_slice(&m.finalize().into_bytes());
        out
    }

    /// Whether `tag` is [`PreSharedKey::tag`] of the same input (constant-time).
    pub fn verify_tag(&self, label: &[u8], parts: &[&[u8]], tag: &[u8; 32]) -> bool {
        bool::from(self.tag(label, parts).ct_eq(tag))
    }

    fn mac(&self) -> HmacSha256 {
        match HmacSha256::new_from_slice(&self.0) {
            Ok(m) => m,
            // HMAC takes keys of every length (long ones are hashed): this arm cannot run.
            Err(_) => unreachable!("HMAC-SHA256 refused a key length"),
        }
    }
}

fn wipe(v: &mut [u8]) {
    for b in v.iter_mut() {
        // SAFETY: `b` is a valid, aligned, exclusive reference to a u8 of this slice; the
        // volatile write only keeps the compiler from eliding the zeroing.
        unsafe { std::ptr::write_volatile(b, 0) };
    }
}

impl Drop for PreSharedKey {
    fn drop(&mut self) {
        wipe(&mut self.0);
    }
}

impl std::fmt::Debug for PreSharedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PreSharedKey(<redacted, {} bytes>)", self.0.len())
    }
}

/// Which end of the connection computes a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The side that connected.
    Initiator,
    /// The side that accepted.
    Acceptor,
}

impl Role {
    fn byte(self) -> u8 {
        match self {
            Role::Initiator => b'I',
            Role::Acceptor => b'A',
        }
    }
}

/// Everything both sides said before authenticating; both compute the same transcript.
#[derive(Debug, Clone)]
pub struct Transcript<'a> {
    /// The initiator's challenge nonce.
    pub initiator_nonce: &'a [u8; AUTH_LEN],
    /// The acceptor's challenge nonce.
    pub acceptor_nonce: &'a [u8; AUTH_LEN],
    /// The initiator's Hello.
    pub initiator_hello: &'a Hello,
    /// The acceptor's Hello.
    pub acceptor_hello: &'a Hello,
}

fn hello_bytes(h: &Hello) -> Vec<u8> {
    let mut b = BytesMut::new();
    // A Hello that was sent or received has valid fields; an invalid one yields an empty
    // encoding here, which only makes the MAC differ (the handshake then fails closed).
    if Message::Hello(h.clone()).encode_payload(&mut b).is_err() {
        b.clear();
    }
    b.to_vec()
}

fn transcript_mac(key: &PreSharedKey, role: Role, t: &Transcript<'_>) -> HmacSha256 {
    let mut m = key.mac();
    m.update(LABEL);
    m.update(&[role.byte()]);
    m.update(t.initiator_nonce);
    m.update(t.acceptor_nonce);
    for h in [t.initiator_hello, t.acceptor_hello] {
        let b = hello_bytes(h);
        m.update(&(b.len() as u32).to_be_bytes());
        m.update(&b);
    }
    m
}

/// The response `role` sends to prove it holds `key`.
pub fn prove(key: &PreSharedKey, role: Role, t: &Transcript<'_>) -> [u8; AUTH_LEN] {
    let out = transcript_mac(key, role, t).finalize().into_bytes();
    let mut mac = [0u8; AUTH_LEN];
    mac.copy_from_slice(&out);
    mac
}

/// Whether `mac` is the response `role` must send for this transcript (constant-time).
pub fn verify(key: &PreSharedKey, role: Role, t: &Transcript<'_>, mac: &[u8; AUTH_LEN]) -> bool {
    let want = prove(key, role, t);
    bool::from(want.ct_eq(mac))
}

/// A fresh random nonce from the operating system's generator.
pub fn new_nonce() -> Result<[u8; AUTH_LEN], getrandom::Error> {
    let mut n = [0u8; AUTH_LEN];
    getrandom::fill(&mut n)?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repl::wire::message::Generations;

    fn hello(id: &str, peer: &str) -> Hello {
        Hello {
            proto_min: 1,
            proto_max: 1,
            volume_uuid: [7; 16],
            node_id: id.into(),
            peer_node_id: peer.into(),
            generations: Generations::default(),
            disk_state: 0,
            bitmap_granularity: 4096,
            device_size: 1 << 30,
            features: 0,
        }
    }

    fn key(b: u8) -> PreSharedKey {
        PreSharedKey::new(vec![b; 32]).unwrap()
    }

    #[test]
    fn key_debug_never_shows_key_bytes() {
        let k = PreSharedKey::new(b"super-secret-replication-key".to_vec()).unwrap();
        let d = format!("{k:?}");
        assert!(!d.contains("super-secret"), "{d}");
        assert!(d.contains("redacted"), "{d}");
        let e = PreSharedKey::new(b"short-secret".to_vec())
            .unwrap_err()
            .to_string();
        assert!(!e.contains("short-secret"), "{e}");
        assert!(e.contains("12 bytes"), "{e}");
    }

    #[test]
    fn same_key_verifies_other_key_and_other_role_do_not() {
        let (a, b) = (hello("a", "b"), hello("b", "a"));
        let (ni, na) = ([1; 32], [2; 32]);
        let t = Transcript {
            initiator_nonce: &ni,
            acceptor_nonce: &na,
            initiator_hello: &a,
            acceptor_hello: &b,
        };
        let mac = prove(&key(1), Role::Initiator, &t);
        assert!(verify(&key(1), Role::Initiator, &t, &mac));
        assert!(
            !verify(&key(2), Role::Initiator, &t, &mac),
            "wrong key accepted"
        );
        assert!(
            !verify(&key(1), Role::Acceptor, &t, &mac),
            "reflected response accepted"
        );
    }

    #[test]
    fn response_is_bound_to_nonces_and_hellos() {
        let (a, b) = (hello("a", "b"), hello("b", "a"));
        let (ni, na, other) = ([1; 32], [2; 32], [3; 32]);
        let t = Transcript {
            initiator_nonce: &ni,
            acceptor_nonce: &na,
            initiator_hello: &a,
            acceptor_hello: &b,
        };
        let mac = prove(&key(1), Role::Acceptor, &t);
        let replay = Transcript {
            acceptor_nonce: &other,
            ..t.clone()
        };
        assert!(
            !verify(&key(1), Role::Acceptor, &replay, &mac),
            "replayed response accepted"
        );
        let mut tampered = b.clone();
        tampered.generations.current = 99;
        let t2 = Transcript {
            acceptor_hello: &tampered,
            ..t.clone()
        };
        assert!(
            !verify(&key(1), Role::Acceptor, &t2, &mac),
            "altered Hello accepted"
        );
    }

    #[test]
    fn nonces_are_fresh() {
        assert_ne!(new_nonce().unwrap(), new_nonce().unwrap());
    }
}
