//! A fault-injecting HTTP/1.1 proxy between the AWS SDK and moto.
//!
//! Each client request is read whole, classified (EC2 `Action=` form field, Route 53 REST path),
//! optionally answered with an injected fault, otherwise forwarded to moto on a fresh connection
//! (`Connection: close`) and the answer relayed (re-framed with Content-Length). Faults:
//! latency per request, errors (throttling, IAM denial, anything) on the first N matching
//! requests, dropped connections, hung answers, Route 53 changes kept PENDING for N polls.
//!
//! It also supplies one piece of AWS behaviour moto lacks: an EC2 request with `DryRun=true`
//! (that no injected error claims first, as IAM is checked before the dry run) is answered
//! `DryRunOperation` (HTTP 412) without reaching moto, which would otherwise perform it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// An error answer injected for matching requests.
#[derive(Debug, Clone)]
pub struct InjectedError {
    /// Action to match (`ReplaceRoute`, `GetChange`, ...); `*` matches all.
    pub action: String,
    /// Substring the request (path or body) must contain; empty matches all.
    pub needle: String,
    /// How many matching requests get it (u32::MAX: all).
    pub remaining: u32,
    /// HTTP status.
    pub status: u16,
    /// AWS error code.
    pub code: String,
    /// AWS error message.
    pub message: String,
}

/// What the proxy does wrong, changeable while it runs.
#[derive(Debug, Default)]
pub struct Faults {
    /// Added before forwarding every request.
    pub latency: Duration,
    /// Errors to inject.
    pub errors: Vec<InjectedError>,
    /// The next N requests (any action) are read, then the connection is closed unanswered.
    pub drop_next: u32,
    /// Requests of this action are never answered (held for 10 minutes).
    pub hang_action: Option<String>,
    /// GetChange (and ChangeResourceRecordSets) answers say PENDING for this many GetChange polls.
    pub pending_polls: u32,
    /// Answers of an action have `from` replaced by `to` (action, from, to).
    pub rewrites: Vec<(String, String, String)>,
}

/// Counts of what passed through.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    /// Requests received, by action.
    pub by_action: HashMap<String, u64>,
    /// Faults injected, by action.
    pub injected: HashMap<String, u64>,
}

impl Stats {
    /// All requests.
    pub fn total(&self) -> u64 {
        self.by_action.values().sum()
    }
    /// Requests of one action.
    pub fn of(&self, action: &str) -> u64 {
        self.by_action.get(action).copied().unwrap_or(0)
    }
}

/// A running proxy.
pub struct FaultProxy {
    /// Where the SDK should send requests (`http://127.0.0.1:port`).
    pub url: String,
    faults: Arc<Mutex<Faults>>,
    stats: Arc<Mutex<Stats>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FaultProxy {
    /// Starts a proxy in front of `upstream` on the current tokio runtime.
    pub async fn start(upstream: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let url = format!("http://{}", listener.local_addr().expect("proxy addr"));
        let faults = Arc::new(Mutex::new(Faults::default()));
        let stats = Arc::new(Mutex::new(Stats::default()));
        let (f, s) = (faults.clone(), stats.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(serve(sock, upstream, f.clone(), s.clone()));
            }
        });
        FaultProxy {
            url,
            faults,
            stats,
            task,
        }
    }

    /// Changes the faults.
    pub fn set(&self, change: impl FnOnce(&mut Faults)) {
        change(&mut self.faults.lock().unwrap());
    }

    /// Injects `code` on the first `n` requests of `action` whose path/body contains `needle`.
    pub fn inject(
        &self,
        action: &str,
        needle: &str,
        n: u32,
        status: u16,
        code: &str,
        message: &str,
    ) {
        self.set(|f| {
            f.errors.push(InjectedError {
                action: action.into(),
                needle: needle.into(),
                remaining: n,
                status,
                code: code.into(),
                message: message.into(),
            })
        });
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> Stats {
        self.stats.lock().unwrap().clone()
    }

    /// Zeroes the counters.
    pub fn reset_stats(&self) {
        *self.stats.lock().unwrap() = Stats::default();
    }
}

/// One parsed HTTP request.
struct Request {
    head: String,
    body: Vec<u8>,
}

impl Request {
    fn path(&self) -> &str {
        self.head
            .lines()
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .unwrap_or("")
    }
    fn method(&self) -> &str {
        self.head.split(' ').next().unwrap_or("")
    }
    fn is_route53(&self) -> bool {
        self.path().starts_with("/2013-04-01/")
    }
    fn action(&self) -> String {
        if self.is_route53() {
            let p = self.path().split('?').next().unwrap_or("");
            return match (self.method(), p) {
                ("GET", p) if p.starts_with("/2013-04-01/change/") => "GetChange",
                ("POST", p) if p.ends_with("/rrset/") || p.ends_with("/rrset") => {
                    "ChangeResourceRecordSets"
                }
                ("GET", p) if p.ends_with("/rrset") || p.ends_with("/rrset/") => {
                    "ListResourceRecordSets"
                }
                ("GET", p) if p.starts_with("/2013-04-01/hostedzone/") => "GetHostedZone",
                _ => "Route53Other",
            }
            .into();
        }
        let body = String::from_utf8_lossy(&self.body);
        body.split('&')
            .find_map(|kv| kv.strip_prefix("Action="))
            .unwrap_or("Unknown")
            .to_string()
    }
    fn contains(&self, needle: &str) -> bool {
        needle.is_empty()
            || self.head.contains(needle)
            || String::from_utf8_lossy(&self.body).contains(needle)
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// Reads one request; `None` at a clean end of the connection.
async fn read_request(sock: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Request> {
    loop {
        if let Some(end) = find(buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let len: usize = header(&head, "content-length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            while buf.len() < end + 4 + len {
                let mut chunk = [0u8; 16384];
                let n = sock.read(&mut chunk).await.ok()?;
                if n == 0 {
                    return None;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            let body = buf[end + 4..end + 4 + len].to_vec();
            buf.drain(..end + 4 + len);
            return Some(Request { head, body });
        }
        let mut chunk = [0u8; 16384];
        let n = sock.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn dechunk(mut body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = find(body, b"\r\n") else {
            return out;
        };
        let size = usize::from_str_radix(
            String::from_utf8_lossy(&body[..eol])
                .split(';')
                .next()
                .unwrap_or("0")
                .trim(),
            16,
        )
        .unwrap_or(0);
        if size == 0 || body.len() < eol + 2 + size {
            return out;
        }
        out.extend_from_slice(&body[eol + 2..eol + 2 + size]);
        body = &body[(eol + 2 + size + 2).min(body.len())..];
    }
}

async fn forward(req: &Request, upstream: SocketAddr) -> std::io::Result<(String, Vec<u8>)> {
    let mut up = TcpStream::connect(upstream).await?;
    let mut head = String::new();
    for (i, line) in req.head.lines().enumerate() {
        if i > 0 && line.to_ascii_lowercase().starts_with("connection:") {
            continue;
        }
        head.push_str(line);
        head.push_str("\r\n");
    }
    head.push_str("Connection: close\r\n\r\n");
    up.write_all(head.as_bytes()).await?;
    up.write_all(&req.body).await?;
    let mut raw = Vec::new();
    up.read_to_end(&mut raw).await?;
    let end = find(&raw, b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("upstream answer without header end"))?;
    let rhead = String::from_utf8_lossy(&raw[..end]).into_owned();
    let rest = &raw[end + 4..];
    let body = if header(&rhead, "transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        dechunk(rest)
    } else if let Some(len) = header(&rhead, "content-length").and_then(|v| v.parse::<usize>().ok())
    {
        rest[..len.min(rest.len())].to_vec()
    } else {
        rest.to_vec()
    };
    Ok((rhead, body))
}

fn respond(status_line: &str, extra_headers: &[String], body: &[u8]) -> Vec<u8> {
    let mut out = format!("{status_line}\r\n");
    for h in extra_headers {
        out.push_str(h);
        out.push_str("\r\n");
    }
    out.push_str(&format!(
        "Content-Length: {}\r\nConnection: keep-alive\r\n\r\n",
        body.len()
    ));
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

fn error_body(route53: bool, code: &str, message: &str) -> String {
    if route53 {
        format!(
            "<?xml version=\"1.0\"?>\n<ErrorResponse xmlns=\"https://route53.amazonaws.com/doc/2013-04-01/\"><Error><Type>Sender</Type><Code>{code}</Code><Message>{message}</Message></Error><RequestId>fault-proxy</RequestId></ErrorResponse>"
        )
    } else {
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{code}</Code><Message>{message}</Message></Error></Errors><RequestID>fault-proxy</RequestID></Response>"
        )
    }
}

async fn serve(
    mut sock: TcpStream,
    upstream: SocketAddr,
    faults: Arc<Mutex<Faults>>,
    stats: Arc<Mutex<Stats>>,
) {
    let mut buf = Vec::new();
    while let Some(req) = read_request(&mut sock, &mut buf).await {
        let action = req.action();
        *stats
            .lock()
            .unwrap()
            .by_action
            .entry(action.clone())
            .or_default() += 1;
        enum Plan {
            Drop,
            Hang,
            Error(u16, String, String),
            Forward {
                latency: Duration,
                pending: bool,
                rewrites: Vec<(String, String)>,
            },
        }
        let plan = {
            let mut f = faults.lock().unwrap();
            if f.drop_next > 0 {
                f.drop_next -= 1;
                Plan::Drop
            } else if f.hang_action.as_deref() == Some(action.as_str()) {
                Plan::Hang
            } else if let Some(e) = f.errors.iter_mut().find(|e| {
                e.remaining > 0
                    && (e.action == "*" || e.action == action)
                    && req.contains(&e.needle)
            }) {
                e.remaining = e.remaining.saturating_sub(1);
                Plan::Error(e.status, e.code.clone(), e.message.clone())
            } else if !req.is_route53()
                && String::from_utf8_lossy(&req.body).contains("DryRun=true")
            {
                Plan::Error(
                    412,
                    "DryRunOperation".into(),
                    "Request would have succeeded, but DryRun flag is set.".into(),
                )
            } else {
                let pending = match action.as_str() {
                    "GetChange" if f.pending_polls > 0 => {
                        f.pending_polls -= 1;
                        true
                    }
                    "ChangeResourceRecordSets" => f.pending_polls > 0,
                    _ => false,
                };
                let rewrites = f
                    .rewrites
                    .iter()
                    .filter(|(a, _, _)| *a == action)
                    .map(|(_, from, to)| (from.clone(), to.clone()))
                    .collect();
                Plan::Forward {
                    latency: f.latency,
                    pending,
                    rewrites,
                }
            }
        };
        if !matches!(plan, Plan::Forward { .. }) {
            *stats
                .lock()
                .unwrap()
                .injected
                .entry(action.clone())
                .or_default() += 1;
        }
        match plan {
            Plan::Drop => return,
            Plan::Hang => {
                tokio::time::sleep(Duration::from_secs(600)).await;
                return;
            }
            Plan::Error(status, code, message) => {
                let body = error_body(req.is_route53(), &code, &message);
                let reason = if status == 503 {
                    "Service Unavailable"
                } else if status == 403 {
                    "Forbidden"
                } else {
                    "Bad Request"
                };
                let out = respond(
                    &format!("HTTP/1.1 {status} {reason}"),
                    &["Content-Type: text/xml".into()],
                    body.as_bytes(),
                );
                if sock.write_all(&out).await.is_err() {
                    return;
                }
            }
            Plan::Forward {
                latency,
                pending,
                rewrites,
            } => {
                if !latency.is_zero() {
                    tokio::time::sleep(latency).await;
                }
                let Ok((rhead, mut body)) = forward(&req, upstream).await else {
                    return;
                };
                for (from, to) in rewrites {
                    body = String::from_utf8_lossy(&body)
                        .replace(&from, &to)
                        .into_bytes();
                }
                if pending {
                    let text = String::from_utf8_lossy(&body)
                        .replace("<Status>INSYNC</Status>", "<Status>PENDING</Status>");
                    body = text.into_bytes();
                }
                let mut lines = rhead.lines();
                let status_line = lines
                    .next()
                    .unwrap_or("HTTP/1.1 502 Bad Gateway")
                    .to_string();
                let keep: Vec<String> = lines
                    .filter(|l| {
                        let k = l
                            .split(':')
                            .next()
                            .unwrap_or("")
                            .trim()
                            .to_ascii_lowercase();
                        !matches!(
                            k.as_str(),
                            "content-length" | "transfer-encoding" | "connection" | "keep-alive"
                        )
                    })
                    .map(str::to_string)
                    .collect();
                if sock
                    .write_all(&respond(&status_line, &keep, &body))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
    }
}
