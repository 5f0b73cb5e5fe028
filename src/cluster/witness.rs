//! Partition resolution: HEAD requests to witness targets. A 2xx or 3xx answer from any
//! target means this node is not isolated.
//!
//! `http://` targets get an HTTP/1.1 HEAD; `https://` targets the same HEAD over TLS (rustls,
//! the TLS stack the AWS SDK already carries), with the server certificate verified against
//! the system's roots plus an optional `ca_file`. A TLS or certificate failure makes the probe
//! fail: an interception proxy or a captive portal does not prove the node is connected.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::config::cluster::WitnessUrl;

/// The TLS client settings of HTTPS probes: trust anchors and protocol versions.
///
/// Invariant: holds at least one trust anchor (loading fails otherwise).
#[derive(Clone)]
pub struct Tls(Arc<rustls::ClientConfig>);

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tls")
    }
}

impl Tls {
    /// The system's roots (rustls-native-certs: /etc/ssl/certs, SSL_CERT_FILE/SSL_CERT_DIR)
    /// plus every certificate in `ca_file`. Errors name the file and the fix.
    pub fn load(ca_file: Option<&Path>) -> Result<Self, String> {
        let mut roots = rustls::RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        let (_added, _ignored) = roots.add_parsable_certificates(native.certs);
        if let Some(f) = ca_file {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(f)
                .map_err(|e| {
                    format!(
                        "cluster.witness.ca_file {}: {e}; give a PEM file of CA certificates",
                        f.display()
                    )
                })?
                .collect::<Result<_, _>>()
                .map_err(|e| {
                    format!(
                        "cluster.witness.ca_file {}: {e}; give a PEM file of CA certificates",
                        f.display()
                    )
                })?;
            if certs.is_empty() {
                return Err(format!(
                    "cluster.witness.ca_file {}: no certificate in it; give a PEM file of CA certificates",
                    f.display()
                ));
            }
            for c in certs {
                roots
                    .add(c)
                    .map_err(|e| format!("cluster.witness.ca_file {}: {e}", f.display()))?;
            }
        }
        if roots.is_empty() {
            return Err("no trusted CA certificate for https:// witness targets: install ca-certificates or set cluster.witness.ca_file".into());
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS set-up: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Self(Arc::new(cfg)))
    }
}

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

/// Probes one target within `timeout`; `tls` serves `https://` targets (without it they fail
/// saying so).
pub async fn probe(target: &str, timeout: Duration, tls: Option<&Tls>) -> Probe {
    let result = match tokio::time::timeout(timeout, probe_inner(target, tls)).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
    };
    Probe {
        target: target.to_string(),
        result,
    }
}

async fn probe_inner(target: &str, tls: Option<&Tls>) -> Result<String, String> {
    let url = WitnessUrl::parse(target)?;
    let s = tokio::net::TcpStream::connect((url.host.as_str(), url.port))
        .await
        .map_err(|e| format!("cannot connect to {}:{}: {e}", url.host, url.port))?;
    if !url.https {
        return head(s, &url).await.map(|c| format!("HTTP {c}"));
    }
    let Some(tls) = tls else {
        return Err("https:// target but no TLS client configured".into());
    };
    let name = ServerName::try_from(url.host.clone())
        .map_err(|e| format!("{:?} is not a valid TLS server name: {e}", url.host))?;
    let s = tokio_rustls::TlsConnector::from(tls.0.clone())
        .connect(name, s)
        .await
        .map_err(|e| format!("TLS with {}:{}: {e}", url.host, url.port))?;
    head(s, &url).await.map(|c| format!("HTTPS {c}"))
}

/// Sends a HEAD for `url` and returns the status code when it is 2xx or 3xx.
async fn head<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    url: &WitnessUrl,
) -> Result<u16, String> {
    let req = format!(
        "HEAD {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: twinvol-witness\r\nConnection: close\r\n\r\n",
        url.path, url.host
    );
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| format!("sending HEAD: {e}"))?;
    s.flush().await.map_err(|e| format!("sending HEAD: {e}"))?;
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
        Some(c @ 200..=399) => Ok(c),
        Some(c) => Err(format!("HTTP {c} (a 2xx or 3xx answer is needed)")),
        None => Err("the answer is not HTTP".into()),
    }
}

/// Probes all targets concurrently; reachable when any succeeds.
pub async fn probe_all(
    targets: &[String],
    timeout: Duration,
    tls: Option<&Tls>,
) -> (bool, Vec<Probe>) {
    let probes =
        futures_util::future::join_all(targets.iter().map(|t| probe(t, timeout, tls))).await;
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
        assert!(probe(&ok, t, None).await.result.is_ok());
        assert!(probe(&redirect, t, None).await.result.is_ok());
        assert!(probe(&broken, t, None)
            .await
            .result
            .unwrap_err()
            .contains("503"));
        // A port nobody listens on.
        let dead = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            format!("http://{}/", l.local_addr().unwrap())
        };
        assert!(probe(&dead, t, None).await.result.is_err());
        let (any, probes) = probe_all(&[dead, ok], t, None).await;
        assert!(any);
        assert_eq!(probes.len(), 2);
    }

    /// A test CA and a server certificate it signed for localhost / 127.0.0.1, made with the
    /// openssl CLI (scripts/test.sh installs it); fails loudly without it.
    /// Returns (CA certificate, server certificate, server key).
    fn test_pki(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
        let p = |n: &str| dir.join(n);
        let run = |args: &[&str]| {
            let out = std::process::Command::new("openssl")
                .current_dir(dir)
                .args(args)
                .output()
                .expect("the openssl CLI is needed (apt install openssl; scripts/test.sh does)");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        run(&[
            &["req", "-x509"][..],
            &ec,
            &[
                "-days",
                "1",
                "-subj",
                "/CN=twinvol test CA",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
            ],
        ]
        .concat());
        run(&[
            &["req"][..],
            &ec,
            &[
                "-subj",
                "/CN=localhost",
                "-keyout",
                "key.pem",
                "-out",
                "leaf.csr",
            ],
        ]
        .concat());
        std::fs::write(
            p("ext.cnf"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        run(&[
            "x509",
            "-req",
            "-in",
            "leaf.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            "ext.cnf",
            "-out",
            "cert.pem",
        ]);
        (p("ca.pem"), p("cert.pem"), p("key.pem"))
    }

    async fn https_server(ip: &str, cert: &Path, key: &Path, answer: &'static str) -> u16 {
        use rustls_pki_types::PrivateKeyDer;
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(key).unwrap();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        let l = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let (s, _) = l.accept().await.unwrap();
                let a = acceptor.clone();
                tokio::spawn(async move {
                    if let Ok(mut s) = a.accept(s).await {
                        let mut b = [0u8; 1024];
                        let _ = s.read(&mut b).await;
                        let _ = s.write_all(answer.as_bytes()).await;
                        let _ = s.shutdown().await;
                    }
                });
            }
        });
        port
    }

    #[tokio::test]
    async fn https_witness_is_verified_against_the_trust_anchors_and_answers_a_real_head() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, cert, key) = test_pki(dir.path());
        let ok = https_server(
            "127.0.0.1",
            &cert,
            &key,
            "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        )
        .await;
        let broken =
            https_server("127.0.0.1", &cert, &key, "HTTP/1.1 503 Unavailable\r\n\r\n").await;
        let t = Duration::from_secs(5);
        let trusting = Tls::load(Some(&ca)).unwrap();
        for host in ["localhost", "127.0.0.1"] {
            let p = probe(&format!("https://{host}:{ok}/"), t, Some(&trusting)).await;
            assert_eq!(p.result, Ok("HTTPS 200".into()), "{host}");
        }
        let p = probe(&format!("https://localhost:{broken}/"), t, Some(&trusting)).await;
        assert!(p.result.unwrap_err().contains("503"));
        // Without the CA the certificate is refused: no proof of connectivity.
        let system_only = Tls::load(None).unwrap_or_else(|_| {
            // A machine without system roots: trust an unrelated certificate instead.
            let other = tempfile::tempdir().unwrap();
            let (c, _, _) = test_pki(other.path());
            let t = Tls::load(Some(&c)).unwrap();
            std::mem::forget(other);
            t
        });
        let p = probe(&format!("https://localhost:{ok}/"), t, Some(&system_only)).await;
        let e = p.result.unwrap_err();
        assert!(
            e.contains("TLS") && e.to_lowercase().contains("certificate"),
            "{e}"
        );
        // A name the certificate does not carry is refused too.
        let other_ip = https_server("127.0.0.2", &cert, &key, "HTTP/1.1 200 OK\r\n\r\n").await;
        let p = probe(
            &format!("https://127.0.0.2:{other_ip}/"),
            t,
            Some(&trusting),
        )
        .await;
        let e = p.result.unwrap_err();
        assert!(
            e.contains("TLS"),
            "the certificate does not name 127.0.0.2: {e}"
        );
        // No TLS client at all: the probe fails saying so.
        let p = probe(&format!("https://localhost:{ok}/"), t, None).await;
        assert!(p.result.unwrap_err().contains("no TLS client"));
    }

    #[test]
    fn a_ca_file_without_certificates_is_refused_naming_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("empty.pem");
        std::fs::write(&f, "not a certificate\n").unwrap();
        let e = Tls::load(Some(&f)).unwrap_err();
        assert!(e.contains("cluster.witness.ca_file"), "{e}");
    }
}
