//! The health endpoint Route 53 health checks probe (`mode = "failover-routing"`, see
//! `cloud::route53_failover`): HTTP 200 only while this node is Primary and healthy, 503
//! otherwise. Route 53 then fails DNS over on its data plane, without a control-plane call.
//!
//! Deliberately tiny: GET or HEAD of the configured path, one short answer, connection closed.
//! The answer depends only on a [`HealthState`] the daemon updates.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Largest request head read before answering 400 (a probe's request is a few hundred bytes).
const MAX_REQUEST: usize = 8 * 1024;
/// A client that sends nothing for this long is dropped.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// What the endpoint reports; shared between the daemon (writer) and the server (reader).
///
/// Invariant: the endpoint answers 200 exactly when the state is `PrimaryHealthy`.
#[derive(Debug, Default, Clone)]
pub struct HealthState(Arc<AtomicU8>);

/// The node's condition as the endpoint sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Not Primary (standby, starting, stopping).
    NotPrimary = 0,
    /// Primary, and every bring-up step and application check passes.
    PrimaryHealthy = 1,
    /// Primary, but a check is failing (the node is about to recover or fail over).
    PrimaryUnhealthy = 2,
}

impl HealthState {
    /// Sets the condition.
    pub fn set(&self, h: Health) {
        self.0.store(h as u8, Ordering::SeqCst);
    }

    /// The current condition.
    pub fn get(&self) -> Health {
        match self.0.load(Ordering::SeqCst) {
            1 => Health::PrimaryHealthy,
            2 => Health::PrimaryUnhealthy,
            _ => Health::NotPrimary,
        }
    }
}

/// Errors of the health endpoint.
#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    /// The listening socket could not be bound.
    #[error("cannot listen for health checks on {addr}: {source} (check cloud.route53 health_port and that the port is free)")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The status line and body for a request head, or `None` if the head is incomplete.
pub fn respond(head: &[u8], path: &str, state: Health) -> Option<(&'static str, &'static str)> {
    let end = head.windows(4).position(|w| w == b"\r\n\r\n")?;
    let line = std::str::from_utf8(&head[..end])
        .ok()
        .and_then(|h| h.lines().next())
        .unwrap_or("");
    let mut parts = line.split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let target = target.split('?').next().unwrap_or("");
    Some(match (method, target == path) {
        ("GET" | "HEAD", true) => match state {
            Health::PrimaryHealthy => ("200 OK", "primary healthy\n"),
            Health::PrimaryUnhealthy => ("503 Service Unavailable", "primary unhealthy\n"),
            Health::NotPrimary => ("503 Service Unavailable", "not primary\n"),
        },
        ("GET" | "HEAD", false) => ("404 Not Found", "not found\n"),
        _ => ("405 Method Not Allowed", "use GET or HEAD\n"),
    })
}

/// A bound health endpoint.
pub struct HealthServer {
    listener: tokio::net::TcpListener,
    path: String,
    state: HealthState,
}

impl HealthServer {
    /// Binds `addr`; serve with [`HealthServer::run`].
    pub async fn bind(
        addr: SocketAddr,
        path: &str,
        state: HealthState,
    ) -> Result<Self, HealthError> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| HealthError::Bind { addr, source })?;
        Ok(Self {
            listener,
            path: path.to_string(),
            state,
        })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Answers probes until the task is dropped.
    pub async fn run(self) {
        let path: Arc<str> = self.path.into();
        loop {
            let Ok((mut sock, _)) = self.listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let path = path.clone();
            let state = self.state.clone();
            tokio::spawn(async move {
                let mut head = Vec::with_capacity(512);
                let mut buf = [0u8; 1024];
                let answer = loop {
                    if let Some(a) = respond(&head, &path, state.get()) {
                        break Some(a);
                    }
                    if head.len() > MAX_REQUEST {
                        break Some(("400 Bad Request", "request too large\n"));
                    }
                    match tokio::time::timeout(READ_TIMEOUT, sock.read(&mut buf)).await {
                        Ok(Ok(n)) if n > 0 => head.extend_from_slice(&buf[..n]),
                        _ => break None,
                    }
                };
                if let Some((status, body)) = answer {
                    let head_only = head.starts_with(b"HEAD ");
                    let msg = format!(
                        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
                        body.len(),
                        if head_only { "" } else { body }
                    );
                    let _ = sock.write_all(msg.as_bytes()).await;
                    let _ = sock.shutdown().await;
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_healthy_primary_answers_200() {
        let req = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(
            respond(req, "/health", Health::PrimaryHealthy).unwrap().0,
            "200 OK"
        );
        assert!(respond(req, "/health", Health::NotPrimary)
            .unwrap()
            .0
            .starts_with("503"));
        assert!(respond(req, "/health", Health::PrimaryUnhealthy)
            .unwrap()
            .0
            .starts_with("503"));
        assert!(respond(
            b"GET /other HTTP/1.1\r\n\r\n",
            "/health",
            Health::PrimaryHealthy
        )
        .unwrap()
        .0
        .starts_with("404"));
        assert!(respond(
            b"POST /health HTTP/1.1\r\n\r\n",
            "/health",
            Health::PrimaryHealthy
        )
        .unwrap()
        .0
        .starts_with("405"));
        assert!(
            respond(
                b"GET /health HTTP/1.1\r\n",
                "/health",
                Health::PrimaryHealthy
            )
            .is_none(),
            "incomplete head"
        );
        assert_eq!(
            respond(
                b"GET /health?x=1 HTTP/1.1\r\n\r\n",
                "/health",
                Health::PrimaryHealthy
            )
            .unwrap()
            .0,
            "200 OK"
        );
    }

    #[test]
    fn the_endpoint_follows_the_node_state_over_tcp() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let state = HealthState::default();
            let srv = HealthServer::bind("127.0.0.1:0".parse().unwrap(), "/health", state.clone())
                .await
                .unwrap();
            let addr = srv.local_addr().unwrap();
            tokio::spawn(srv.run());
            let probe = || async move {
                let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
                s.write_all(b"GET /health HTTP/1.1\r\nHost: probe\r\n\r\n")
                    .await
                    .unwrap();
                let mut out = String::new();
                s.read_to_string(&mut out).await.unwrap();
                out
            };
            assert!(probe().await.starts_with("HTTP/1.1 503"));
            state.set(Health::PrimaryHealthy);
            assert!(probe().await.starts_with("HTTP/1.1 200"));
            state.set(Health::PrimaryUnhealthy);
            assert!(probe().await.starts_with("HTTP/1.1 503"));
        });
    }
}
