//! The control socket of `twinvol mirror` (`--control-socket PATH`, mode 0600) and the client
//! side of `twinvol verify`.
//!
//! Protocol: one request line per connection, answered by one JSON line.
//! - `verify` runs an online verify to the end and answers
//!   `{"ok":true,"verify":{...VerifyStatus...}}` (differing blocks are then being resynced),
//!   or `{"ok":false,"error":"..."}`.
//! - `status` answers `{"ok":true,"status":{...VolumeStatus...}}`.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;

use super::MirroredVolume;
use crate::block::BlockTarget;
use crate::meta::device::MetaDevice;

/// Longest request line accepted.
const MAX_REQUEST: usize = 256;

/// Errors of the control socket and of its client.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Another process listens on the path.
    #[error("control socket {0} is in use by another running process; stop it or choose another --control-socket")]
    InUse(PathBuf),
    /// Binding failed.
    #[error("cannot bind control socket {path}: {source}; check that the directory exists and is writable")]
    Bind {
        /// Path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The client could not reach the mirror process.
    #[error("cannot reach `twinvol mirror` on {path}: {source}; is it running with --control-socket {path}?")]
    Connect {
        /// Path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The exchange broke off or the answer is not JSON.
    #[error("control socket {path}: {why}")]
    Exchange {
        /// Path.
        path: PathBuf,
        /// What went wrong.
        why: String,
    },
    /// The mirror process refused or failed the request.
    #[error("{0}")]
    Refused(String),
}

/// Binds the control socket (a stale file nobody listens on is replaced; mode 0600).
pub fn bind(path: &Path) -> Result<UnixListener, ControlError> {
    use crate::ops::private_socket::{bind_private, BindError};
    bind_private(path).map_err(|e| match e {
        BindError::InUse => ControlError::InUse(path.into()),
        BindError::CreateDir(source) | BindError::Bind(source) | BindError::Chmod(source) => {
            ControlError::Bind {
                path: path.into(),
                source,
            }
        }
    })
}

/// Serves requests on `listener` forever (call on the volume's data-path thread).
pub async fn serve<T, D>(vol: Rc<MirroredVolume<T, D>>, listener: UnixListener)
where
    T: BlockTarget + 'static,
    D: MetaDevice + 'static,
{
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(error = %e, "control socket accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let vol = vol.clone();
        tokio::task::spawn_local(async move {
            let (r, mut w) = stream.into_split();
            let mut line = String::new();
            let mut r = tokio::io::BufReader::new(r).take(MAX_REQUEST as u64);
            if r.read_line(&mut line).await.is_err() {
                return;
            }
            let answer = answer(&vol, line.trim()).await;
            let mut text = answer.to_string();
            text.push('\n');
            let _ = w.write_all(text.as_bytes()).await;
        });
    }
}

async fn answer<T, D>(vol: &Rc<MirroredVolume<T, D>>, request: &str) -> serde_json::Value
where
    T: BlockTarget + 'static,
    D: MetaDevice + 'static,
{
    match request {
        "verify" => match vol.verify().await {
            Ok(v) => serde_json::json!({ "ok": true, "verify": v }),
            Err(e) => serde_json::json!({ "ok": false, "error": e.to_string() }),
        },
        "status" => serde_json::json!({ "ok": true, "status": vol.status() }),
        other => serde_json::json!({
            "ok": false,
            "error": format!("unknown control request {other:?}; use \"verify\" or \"status\""),
        }),
    }
}

/// Sends one request line and returns the JSON answer when it says `"ok": true`.
pub fn request(path: &Path, line: &str) -> Result<serde_json::Value, ControlError> {
    let mut s =
        std::os::unix::net::UnixStream::connect(path).map_err(|source| ControlError::Connect {
            path: path.into(),
            source,
        })?;
    let exchange = |why: String| ControlError::Exchange {
        path: path.into(),
        why,
    };
    s.write_all(format!("{line}\n").as_bytes())
        .map_err(|e| exchange(e.to_string()))?;
    let mut answer = String::new();
    BufReader::new(s)
        .read_line(&mut answer)
        .map_err(|e| exchange(e.to_string()))?;
    if answer.is_empty() {
        return Err(exchange(
            "the mirror process closed the connection without an answer".into(),
        ));
    }
    let v: serde_json::Value =
        serde_json::from_str(&answer).map_err(|e| exchange(format!("answer is not JSON: {e}")))?;
    if v["ok"] != true {
        return Err(ControlError::Refused(
            v["error"].as_str().unwrap_or("request refused").to_string(),
        ));
    }
    Ok(v)
}

/// Arguments of `twinvol verify`.
#[derive(Debug, Clone, clap::Args)]
pub struct VerifyArgs {
    /// The control socket of a running `twinvol mirror` (its --control-socket); without it the
    /// request goes to the `twinvol run` daemon (--socket / --config).
    #[arg(long)]
    pub control_socket: Option<PathBuf>,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `twinvol verify`: runs an online verify on the running mirror process and prints the
/// number of differing blocks (which are then resynced to the peer).
pub fn run_verify(a: VerifyArgs, out: &mut impl Write) -> Result<(), ControlError> {
    let Some(socket) = &a.control_socket else {
        return Err(ControlError::Refused(
            "no --control-socket given (the daemon path is taken by the CLI)".into(),
        ));
    };
    let v = request(socket, "verify")?;
    let r = &v["verify"];
    if a.json {
        let _ = writeln!(out, "{r}");
        return Ok(());
    }
    let differing = r["differing_blocks"].as_u64().unwrap_or(0);
    let _ = writeln!(
        out,
        "verified {} bytes in {}-byte blocks in {:.1} s: {differing} differing block(s){}",
        r["checked_bytes"].as_u64().unwrap_or(0),
        r["block_size"].as_u64().unwrap_or(0),
        r["elapsed_secs"].as_f64().unwrap_or(0.0),
        if differing > 0 {
            "; marked dirty and resyncing from this node (watch `resync` in the status)"
        } else {
            ""
        }
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_without_a_server_names_the_socket_and_the_fix() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("none.ctl");
        let e = request(&p, "verify").unwrap_err().to_string();
        assert!(
            e.contains("none.ctl") && e.contains("--control-socket"),
            "{e}"
        );
    }
}
