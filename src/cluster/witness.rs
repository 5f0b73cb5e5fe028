//! Partition resolution: HEAD requests to witness targets. A 2xx or 3xx answer from any
//! target means this node is not isolated.
//!
//! `http://` targets get a real HTTP/1.1 HEAD. `https://` targets are reached with a TCP
//! connection to the port only (this build carries no TLS client of its own): the probe
//! reports that it checked reachability, not an HTTP status.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::cluster::WitnessUrl;

/// The outcome of one probe.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Probe {
    /// The target URL.
    pub target: String,
    /// `Ok(detail)` when the target proves reachability, `Err(why)` otherwise.
    pub result: Result<String, String>,
}

/// Parses the status code of an HTTP/1.x status line; `None` for anything else.
pub fn status_code(head: &[u8]) -> Option<u16> {
    let line = head.split(|&b| b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?.trim_end();
    let mut it = line.split(' ');
    let version = it.next()?;
    if !version.starts_with("HTTP/1.") {
        return None;
    }
    let code = it.next()?;
    if code.len() != 3 {
        return None;
    }
    code.parse().ok()
}

/// Probes one target within `timeout`.
pub async fn probe(target: &str, timeout: Duration) -> Probe {
    let result = match tokio::time::timeout(timeout, probe_inner(target)).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
    };
    Probe {
        target: target.to_string(),
        result,
    }
}

async fn probe_inner(target: &str) -> Result<String, String> {
    let url = WitnessUrl::parse(target)?;
    let mut s = tokio::net::TcpStream::connect((url.host.as_str(), url.port))
        .await
        .map_err(|e| format!("cannot connect to {}:{}: {e}", url.host, url.port))?;
    if url.https {
        return Ok("TCP connect to the HTTPS port succeeded (no TLS client in this build)".into());
    }
    let req = format!(
        "HEAD {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: twinvol-witness\r\nConnection: close\r\n\r\n",
        url.path, url.host
    );
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| format!("sending HEAD: {e}"))?;
    let mut buf = vec![0u8; 512];
    let mut n = 0;
    while n < buf.len() && !buf[..n].contains(&b'\n') {
        let got = s
            .read(&mut buf[n..])
            .await
            .map_err(|e| format!("reading the answer: {e}"))?;
        if got == 0 {
            break;
        }
        n += got;
    }
    match status_code(&buf[..n]) {
        Some(c @ 200..=399) => Ok(format!("HTTP {c}")),
        Some(c) => Err(format!("HTTP {c} (a 2xx or 3xx answer is needed)")),
        None => Err("the answer is not HTTP".into()),
    }
}

/// Probes all targets concurrently; reachable when any succeeds.
pub async fn probe_all(targets: &[String], timeout: Duration) -> (bool, Vec<Probe>) {
    let probes = futures_util::future::join_all(targets.iter().map(|t| probe(t, timeout))).await;
    (probes.iter().any(|p| p.result.is_ok()), probes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn status_lines_are_parsed() {
        assert_eq!(status_code(b"HTTP/1.1 204 No Content\r\n"), Some(204));
        assert_eq!(status_code(b"HTTP/1.0 302 Found\r\n"), Some(302));
        assert_eq!(status_code(b"SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(status_code(b"HTTP/1.1 20"), None);
    }

    proptest! {
        #[test]
        fn status_parser_never_panics(b in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = status_code(&b);
        }
    }

    async fn http_server(answer: &'static str) -> String {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                let mut b = [0u8; 1024];
                let _ = s.read(&mut b).await;
                let _ = s.write_all(answer.as_bytes()).await;
            }
        });
        format!("http://{addr}/health")
    }

    #[tokio::test]
    async fn witness_answering_2xx_or_3xx_is_reachable_and_5xx_or_silence_is_not() {
        let ok = http_server("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").await;
        let redirect = http_server("HTTP/1.1 301 Moved\r\n\r\n").await;
        let broken = http_server("HTTP/1.1 503 Unavailable\r\n\r\n").await;
        let t = Duration::from_secs(2);
        assert!(probe(&ok, t).await.result.is_ok());
        assert!(probe(&redirect, t).await.result.is_ok());
        assert!(probe(&broken, t).await.result.unwrap_err().contains("503"));
        // A port nobody listens on.
        let dead = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            format!("http://{}/", l.local_addr().unwrap())
        };
        assert!(probe(&dead, t).await.result.is_err());
        let (any, probes) = probe_all(&[dead, ok], t).await;
        assert!(any);
        assert_eq!(probes.len(), 2);
    }
}
