//! `twinvol demo` runs in CI: two nodes, writes through NBD, kill, takeover, verification of
//! every acknowledged write, return of the old node, report.

#[test]
fn demo_runs_a_failover_and_its_verification_passes() {
    let d = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_twinvol"))
        .args([
            "demo",
            "--runs",
            "2",
            "--interval-ms",
            "500",
            "--timeout-ms",
            "2000",
            "--dir",
        ])
        .arg(d.path().join("demo"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("each node has its own volume"),
        "two copies, said clearly: {text}"
    );
    assert_eq!(
        text.matches("verified all 256 acknowledged writes on")
            .count(),
        2,
        "{text}"
    );
    assert_eq!(
        text.matches("both copies identical").count(),
        2,
        "the returning node is resynced each round: {text}"
    );
    assert!(
        text.contains("ReplaceRoute"),
        "the cloud plan is shown: {text}"
    );
    assert!(text.contains("failovers: 2"), "{text}");
    assert!(text.contains("demo PASSED"), "{text}");
}
