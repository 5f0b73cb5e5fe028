//! DNS resolution monitor: asks a given resolver for a record's A addresses over UDP and
//! compares them with the address the record should hold.
//!
//! Invariants: one query, bounded by a timeout; answers to other ids are ignored; the monitor
//! is not run before the configured delay after this node changed the record (an early query
//! would cache NXDOMAIN for the zone's negative-caching TTL).

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use tokio::net::UdpSocket;

use crate::cloud::dns_wire::{decode_answer, encode_query, RCODE_NXDOMAIN};
use crate::cloud::{Health, Resource};

/// The A addresses of `name` according to `resolver`; the error says why there are none.
pub async fn resolve_a(
    resolver: SocketAddr,
    name: &str,
    timeout: Duration,
) -> Result<Vec<Ipv4Addr>, String> {
    let id = u16::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos())
            & 0xFFFF,
    )
    .unwrap_or(0);
    let query = encode_query(id, name).map_err(|e| e.to_string())?;
    let bind: SocketAddr = if resolver.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = UdpSocket::bind(bind)
        .await
        .map_err(|e| format!("cannot open a UDP socket: {e}"))?;
    sock.connect(resolver)
        .await
        .map_err(|e| format!("cannot reach {resolver}: {e}"))?;
    sock.send(&query)
        .await
        .map_err(|e| format!("cannot send to {resolver}: {e}"))?;
    let wait = async {
        let mut buf = [0u8; 1500];
        loop {
            let n = sock
                .recv(&mut buf)
                .await
                .map_err(|e| format!("no answer from {resolver}: {e}"))?;
            match decode_answer(id, &buf[..n]) {
                Err(crate::cloud::dns_wire::DnsWireError::IdMismatch { .. }) => continue,
                Err(e) => return Err(e.to_string()),
                Ok(a) if a.rcode == RCODE_NXDOMAIN => return Err("NXDOMAIN".into()),
                Ok(a) if a.rcode != 0 => return Err(format!("RCODE {}", a.rcode)),
                Ok(a) if a.addresses.is_empty() => return Err("no A record in the answer".into()),
                Ok(a) => return Ok(a.addresses),
            }
        }
    };
    tokio::time::timeout(timeout, wait).await.map_err(|_| {
        format!(
            "no answer from {resolver} within {} ms",
            timeout.as_millis()
        )
    })?
}

/// Monitor: `name` resolves through `resolver` to exactly `expected`.
pub async fn check(
    resolver: SocketAddr,
    name: &str,
    expected: Ipv4Addr,
    timeout: Duration,
) -> (Resource, Health) {
    let resource = Resource::DnsRecord(format!("{name} via {resolver}"));
    let health = match resolve_a(resolver, name, timeout).await {
        Ok(a) if a == [expected] => Health::Ok,
        Ok(a) => Health::Drift(format!(
            "IP address resolved from the DNS resolver is different from the setting: {name} resolves to {} via {resolver}, expected {expected}",
            a.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
        )),
        Err(why) => Health::Drift(format!("Failed to resolve domain name: {name} via {resolver}: {why}")),
    };
    (resource, health)
}
