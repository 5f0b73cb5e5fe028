//! A fake IMDSv2 on loopback: token required, a handful of meta-data paths.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A running fake IMDS.
pub struct FakeImds {
    /// Its URL.
    pub url: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeImds {
    fn drop(&mut self) {
        self.task.abort();
    }
}

const TOKEN: &str = "fake-imds-token";

impl FakeImds {
    /// Serves `paths` (relative to /latest/meta-data/) to requests carrying the session token.
    pub async fn start(paths: HashMap<String, String>) -> FakeImds {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        let paths = Arc::new(paths);
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    return;
                };
                let paths = paths.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    loop {
                        let mut chunk = [0u8; 4096];
                        let Ok(n) = s.read(&mut chunk).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&buf[..end]).to_string();
                            buf.drain(..end + 4);
                            let mut parts = head.split(' ');
                            let method = parts.next().unwrap_or("");
                            let path = parts.next().unwrap_or("");
                            let has_token = head.lines().any(|l| {
                                l.to_ascii_lowercase()
                                    .starts_with("x-aws-ec2-metadata-token:")
                                    && l.contains(TOKEN)
                            });
                            let (status, body) = if method == "PUT" && path == "/latest/api/token" {
                                ("200 OK", TOKEN.to_string())
                            } else if !has_token {
                                ("401 Unauthorized", String::new())
                            } else if let Some(v) = path
                                .strip_prefix("/latest/meta-data/")
                                .and_then(|p| paths.get(p))
                            {
                                ("200 OK", v.clone())
                            } else {
                                ("404 Not Found", String::new())
                            };
                            let resp = format!("HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nx-aws-ec2-metadata-token-ttl-seconds: 21600\r\nContent-Length: {}\r\n\r\n{body}", body.len());
                            if s.write_all(resp.as_bytes()).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        FakeImds { url, task }
    }
}
