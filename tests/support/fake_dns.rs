//! A fake DNS resolver on loopback UDP: answers A queries from a table (absent names:
//! NXDOMAIN), written independently of twinvol's codec. Counts queries.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::UdpSocket;

/// A running fake resolver.
pub struct FakeDns {
    /// Its address.
    pub addr: SocketAddr,
    /// name (lower case, trailing dot) -> addresses.
    pub table: Arc<Mutex<HashMap<String, Vec<Ipv4Addr>>>>,
    /// Queries received.
    pub queries: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeDns {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn qname(q: &[u8]) -> Option<(String, usize)> {
    let mut pos = 12;
    let mut name = String::new();
    loop {
        let len = *q.get(pos)? as usize;
        if len == 0 {
            return Some((name, pos + 1));
        }
        name.push_str(std::str::from_utf8(q.get(pos + 1..pos + 1 + len)?).ok()?);
        name.push('.');
        pos += 1 + len;
    }
}

impl FakeDns {
    /// Starts it.
    pub async fn start() -> FakeDns {
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = sock.local_addr().unwrap();
        let table: Arc<Mutex<HashMap<String, Vec<Ipv4Addr>>>> = Arc::default();
        let queries = Arc::new(AtomicU64::new(0));
        let (t, n) = (table.clone(), queries.clone());
        let task = tokio::spawn(async move {
            let mut buf = [0u8; 512];
            loop {
                let Ok((len, from)) = sock.recv_from(&mut buf).await else {
                    return;
                };
                n.fetch_add(1, Ordering::Relaxed);
                let q = &buf[..len];
                let Some((name, qend)) = qname(q) else {
                    continue;
                };
                let answers = t.lock().unwrap().get(&name.to_ascii_lowercase()).cloned();
                let rcode: u16 = if answers.is_some() { 0 } else { 3 };
                let ips = answers.unwrap_or_default();
                let mut m = Vec::new();
                m.extend_from_slice(&q[0..2]);
                m.extend_from_slice(&(0x8180u16 | rcode).to_be_bytes());
                m.extend_from_slice(&[0, 1]);
                m.extend_from_slice(&(ips.len() as u16).to_be_bytes());
                m.extend_from_slice(&[0, 0, 0, 0]);
                m.extend_from_slice(&q[12..qend + 4]);
                for ip in ips {
                    m.extend_from_slice(&[0xC0, 0x0C, 0, 1, 0, 1, 0, 0, 0, 30, 0, 4]);
                    m.extend_from_slice(&ip.octets());
                }
                let _ = sock.send_to(&m, from).await;
            }
        });
        FakeDns {
            addr,
            table,
            queries,
            task,
        }
    }

    /// Makes `name` resolve to `ips` (an empty list: NOERROR without records).
    pub fn set(&self, name: &str, ips: &[Ipv4Addr]) {
        self.table
            .lock()
            .unwrap()
            .insert(name.to_ascii_lowercase(), ips.to_vec());
    }

    /// Makes `name` NXDOMAIN.
    pub fn remove(&self, name: &str) {
        self.table
            .lock()
            .unwrap()
            .remove(&name.to_ascii_lowercase());
    }
}
