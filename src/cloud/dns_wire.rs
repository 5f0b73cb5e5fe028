//! A minimal DNS codec (RFC 1035) for the resolution monitor: one A query out, the A records of
//! the answer in. Sans-I/O: bytes in, values out.
//!
//! Invariants: [`encode_query`] only emits names it validated (labels 1..=63 bytes, name at most
//! 255 bytes on the wire); [`decode_answer`] never reads past the message, never follows
//! compression pointers (it only skips names), and rejects answers to another query id.

use std::net::Ipv4Addr;

/// Record type A.
pub const TYPE_A: u16 = 1;
/// Class IN.
pub const CLASS_IN: u16 = 1;
/// RCODE of a name that does not exist.
pub const RCODE_NXDOMAIN: u8 = 3;

/// Why a query could not be built or an answer not read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DnsWireError {
    /// The name cannot be put on the wire.
    #[error("{0:?} is not a valid DNS name (labels of 1-63 bytes, at most 253 characters)")]
    BadName(String),
    /// The answer ends early or is inconsistent.
    #[error("malformed DNS answer at byte {0}")]
    Malformed(usize),
    /// The answer belongs to another query.
    #[error("DNS answer id {got} does not match query id {want}")]
    IdMismatch {
        /// The query's id.
        want: u16,
        /// The answer's id.
        got: u16,
    },
    /// The message is a query, not a response.
    #[error("DNS message is not a response")]
    NotResponse,
    /// The answer did not fit in UDP.
    #[error("DNS answer truncated (TC bit); the resolver should answer over TCP")]
    Truncated,
}

/// A decoded answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// Response code (0 = no error, 3 = NXDOMAIN).
    pub rcode: u8,
    /// The A records of the answer section, in order.
    pub addresses: Vec<Ipv4Addr>,
}

/// Builds an A/IN query with recursion desired for `name` (trailing dot optional).
pub fn encode_query(id: u16, name: &str) -> Result<Vec<u8>, DnsWireError> {
    let bad = || DnsWireError::BadName(name.to_string());
    let body = name.strip_suffix('.').unwrap_or(name);
    if body.is_empty() || body.len() > 253 {
        return Err(bad());
    }
    let mut m = Vec::with_capacity(18 + body.len());
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&0x0100u16.to_be_bytes()); // RD
    m.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]); // QD=1, AN=NS=AR=0
    for label in body.split('.') {
        let len = u8::try_from(label.len()).map_err(|_| bad())?;
        if len == 0 || len > 63 {
            return Err(bad());
        }
        m.push(len);
        m.extend_from_slice(label.as_bytes());
    }
    m.push(0);
    m.extend_from_slice(&TYPE_A.to_be_bytes());
    m.extend_from_slice(&CLASS_IN.to_be_bytes());
    Ok(m)
}

fn u16_at(m: &[u8], pos: usize) -> Result<u16, DnsWireError> {
    m.get(pos..pos + 2)
        .map(|b| u16::from_be_bytes([b[0], b[1]]))
        .ok_or(DnsWireError::Malformed(pos))
}

/// Position after the (possibly compressed) name starting at `pos`.
fn skip_name(m: &[u8], mut pos: usize) -> Result<usize, DnsWireError> {
    for _ in 0..128 {
        let len = *m.get(pos).ok_or(DnsWireError::Malformed(pos))?;
        match len & 0xC0 {
            0xC0 => {
                return if pos + 2 <= m.len() {
                    Ok(pos + 2)
                } else {
                    Err(DnsWireError::Malformed(pos))
                }
            }
            0x00 if len == 0 => return Ok(pos + 1),
            0x00 => pos += 1 + usize::from(len),
            _ => return Err(DnsWireError::Malformed(pos)),
        }
    }
    Err(DnsWireError::Malformed(pos))
}

/// Reads the answer to query `id`: its RCODE and the A records of its answer section.
pub fn decode_answer(id: u16, m: &[u8]) -> Result<Answer, DnsWireError> {
    let got = u16_at(m, 0)?;
    if got != id {
        return Err(DnsWireError::IdMismatch { want: id, got });
    }
    let flags = u16_at(m, 2)?;
    if flags & 0x8000 == 0 {
        return Err(DnsWireError::NotResponse);
    }
    if flags & 0x0200 != 0 {
        return Err(DnsWireError::Truncated);
    }
    let rcode = (flags & 0x000F) as u8;
    let qd = u16_at(m, 4)?;
    let an = u16_at(m, 6)?;
    let mut pos = 12;
    for _ in 0..qd {
        pos = skip_name(m, pos)? + 4;
    }
    let mut addresses = Vec::new();
    for _ in 0..an {
        pos = skip_name(m, pos)?;
        let rtype = u16_at(m, pos)?;
        let class = u16_at(m, pos + 2)?;
        let rdlen = usize::from(u16_at(m, pos + 8)?);
        let start = pos + 10;
        let rdata = m
            .get(start..start + rdlen)
            .ok_or(DnsWireError::Malformed(start))?;
        if rtype == TYPE_A && class == CLASS_IN {
            let b: [u8; 4] = rdata
                .try_into()
                .map_err(|_| DnsWireError::Malformed(start))?;
            addresses.push(Ipv4Addr::from(b));
        }
        pos = start + rdlen;
    }
    Ok(Answer { rcode, addresses })
}

/// Builds the answer a resolver would send to `query` (for tests and fuzz seeds): the question
/// echoed, then one A record per address, names compressed to the question.
pub fn encode_answer(
    query: &[u8],
    rcode: u8,
    addresses: &[Ipv4Addr],
) -> Result<Vec<u8>, DnsWireError> {
    let qend = skip_name(query, 12)? + 4;
    let question = query.get(12..qend).ok_or(DnsWireError::Malformed(12))?;
    let mut m = Vec::with_capacity(qend + 16 * addresses.len());
    m.extend_from_slice(query.get(0..2).ok_or(DnsWireError::Malformed(0))?);
    m.extend_from_slice(&(0x8180u16 | u16::from(rcode & 0x0F)).to_be_bytes()); // QR RD RA
    let an = u16::try_from(addresses.len()).map_err(|_| DnsWireError::Malformed(6))?;
    m.extend_from_slice(&[0, 1]);
    m.extend_from_slice(&an.to_be_bytes());
    m.extend_from_slice(&[0, 0, 0, 0]);
    m.extend_from_slice(question);
    for a in addresses {
        m.extend_from_slice(&[0xC0, 12]);
        m.extend_from_slice(&TYPE_A.to_be_bytes());
        m.extend_from_slice(&CLASS_IN.to_be_bytes());
        m.extend_from_slice(&30u32.to_be_bytes());
        m.extend_from_slice(&4u16.to_be_bytes());
        m.extend_from_slice(&a.octets());
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn query_layout_matches_rfc_1035() {
        let q = encode_query(0xBEEF, "db.example.").unwrap();
        assert_eq!(&q[..12], &[0xBE, 0xEF, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&q[12..], b"\x02db\x07example\x00\x00\x01\x00\x01");
    }

    #[test]
    fn bad_names_are_refused() {
        assert!(encode_query(1, "").is_err());
        assert!(encode_query(1, "a..b.").is_err());
        assert!(encode_query(1, &format!("{}.x.", "a".repeat(64))).is_err());
    }

    #[test]
    fn nxdomain_and_foreign_ids_are_reported() {
        let q = encode_query(7, "nope.example.").unwrap();
        let a = encode_answer(&q, RCODE_NXDOMAIN, &[]).unwrap();
        assert_eq!(
            decode_answer(7, &a).unwrap(),
            Answer {
                rcode: 3,
                addresses: vec![]
            }
        );
        assert_eq!(
            decode_answer(8, &a),
            Err(DnsWireError::IdMismatch { want: 8, got: 7 })
        );
        assert_eq!(decode_answer(7, &q), Err(DnsWireError::NotResponse));
    }

    proptest! {
        #[test]
        fn answers_round_trip(id in any::<u16>(), labels in proptest::collection::vec("[a-z0-9-]{1,20}", 1..5), ips in proptest::collection::vec(any::<u32>(), 0..6)) {
            let name = format!("{}.", labels.join("."));
            let q = encode_query(id, &name).unwrap();
            let ips: Vec<Ipv4Addr> = ips.into_iter().map(Ipv4Addr::from).collect();
            let a = encode_answer(&q, 0, &ips).unwrap();
            prop_assert_eq!(decode_answer(id, &a).unwrap(), Answer { rcode: 0, addresses: ips });
        }

        #[test]
        fn decoding_arbitrary_bytes_never_panics(id in any::<u16>(), bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode_answer(id, &bytes);
        }

        #[test]
        fn truncating_an_answer_is_an_error_not_a_panic(cut in 0usize..60) {
            let q = encode_query(9, "db.example.internal.").unwrap();
            let a = encode_answer(&q, 0, &[Ipv4Addr::new(10, 0, 0, 1)]).unwrap();
            if cut < a.len() {
                prop_assert!(decode_answer(9, &a[..cut]).is_err());
            }
        }
    }
}
