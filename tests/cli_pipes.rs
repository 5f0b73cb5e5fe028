//! A command whose reader went away (`twinvol status | head -1`, a closed stderr) ends quietly:
//! no panic, no "Broken pipe" message, exit by SIGPIPE as any Unix filter does (or success).

mod common;

use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Output, Stdio};

use common::{bin, scratch, sparse_file};

/// A pipe whose read end is already closed: every write to the other end fails with EPIPE.
fn closed_pipe() -> Stdio {
    let (read, write) = nix::unistd::pipe().expect("pipe");
    drop(read);
    Stdio::from(write)
}

/// Runs `twinvol ARGS` with stdout (or stderr) on a closed pipe; returns what it printed on the
/// other stream and its status.
fn run_with_closed(args: &[&str], closed_stdout: bool) -> Output {
    let mut cmd = Command::new(bin());
    cmd.args(args).stdin(Stdio::null());
    if closed_stdout {
        cmd.stdout(closed_pipe()).stderr(Stdio::piped());
    } else {
        cmd.stdout(Stdio::piped()).stderr(closed_pipe());
    }
    cmd.output().expect("twinvol runs")
}

fn assert_quiet_end(args: &[&str], out: &Output) {
    let other = String::from_utf8_lossy(if out.stdout.is_empty() {
        &out.stderr
    } else {
        &out.stdout
    })
    .into_owned();
    assert!(
        !other.contains("panicked") && !other.contains("Broken pipe"),
        "twinvol {args:?} complained about the closed pipe: {other}"
    );
    let sigpipe = out.status.signal() == Some(libc::SIGPIPE);
    assert!(
        out.status.success() || sigpipe,
        "twinvol {args:?} ended with {} (expected success or SIGPIPE): {other}",
        out.status
    );
}

#[test]
fn printing_commands_end_quietly_when_stdout_is_a_closed_pipe() {
    let d = scratch();
    let dev = sparse_file(d.path(), "vol.img", 64 << 20);
    let dev = dev.to_str().unwrap();
    let ok = Command::new(bin())
        .args(["create-md", "--device", dev])
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let status_file = d.path().join("status.json");
    // What `twinvol mirror --status-file` writes, cut down to a few fields: any text the
    // renderer prints meets the closed pipe.
    std::fs::write(
        &status_file,
        r#"{"volume":"data","node":"node-a","role":"secondary","disk":"up-to-date"}"#,
    )
    .unwrap();
    let status_file = status_file.to_str().unwrap();
    for args in [
        vec!["completions", "bash"],
        vec!["show-md", "--device", dev],
        vec!["show-md", "--device", dev, "--json"],
        vec!["dump-bitmap", "--device", dev],
        vec!["status", "--status-file", status_file],
        vec!["status", "--status-file", status_file, "--json"],
    ] {
        let out = run_with_closed(&args, true);
        assert_quiet_end(&args, &out);
    }
}

#[test]
fn an_error_message_on_a_closed_stderr_ends_quietly() {
    let args = ["check-config", "/nonexistent/twinvol.toml"];
    let out = run_with_closed(&args, false);
    assert!(!out.status.success(), "a missing file is an error");
    let sigpipe = out.status.signal() == Some(libc::SIGPIPE);
    assert!(
        sigpipe || out.status.code() == Some(1),
        "ended with {} instead of the error status or SIGPIPE",
        out.status
    );
    assert!(
        out.status.code() != Some(101),
        "panicked on the closed stderr"
    );
}
