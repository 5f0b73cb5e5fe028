//! A real OpenMetrics parser for the tests: python `prometheus_client`
//! (`prometheus_client.openmetrics.parser.text_string_to_metric_families`) from the test
//! virtualenv scripts/test-deps.sh fills. Missing parser = a failing test with the fix.
#![allow(dead_code)]

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

const SCRIPT: &str = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = {"families": [], "samples": []}
for f in text_string_to_metric_families(sys.stdin.read()):
    out["families"].append({"name": f.name, "type": f.type, "unit": f.unit, "help": f.documentation})
    for s in f.samples:
        out["samples"].append({"name": s.name, "labels": s.labels, "value": s.value})
print(json.dumps(out))
"#;

fn python() -> PathBuf {
    std::env::var_os("TWINVOL_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME is set"))
                .join(".cache/twinvol-venv")
        })
        .join("bin/python")
}

/// The parsed exposition: `families` (name, type, unit, help) and `samples` (name, labels,
/// value). Panics with the parser's complaint when the text is not valid OpenMetrics.
pub fn parse(text: &str) -> serde_json::Value {
    let py = python();
    assert!(
        py.exists(),
        "{} is missing: run scripts/test-deps.sh (it installs prometheus_client into ${{TWINVOL_VENV:-$HOME/.cache/twinvol-venv}})",
        py.display()
    );
    let mut child = Command::new(&py)
        .args(["-c", SCRIPT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", py.display()));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !err.contains("No module named 'prometheus_client'"),
        "prometheus_client is not installed in {}: run scripts/test-deps.sh",
        py.display()
    );
    assert!(
        out.status.success(),
        "the OpenMetrics parser refused the text: {err}\n--- text ---\n{text}"
    );
    serde_json::from_slice(&out.stdout).expect("parser output is JSON")
}

/// The value of the one sample named `name` whose labels include all of `labels`.
pub fn value(parsed: &serde_json::Value, name: &str, labels: &[(&str, &str)]) -> f64 {
    let hits: Vec<f64> = parsed["samples"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["name"] == name && labels.iter().all(|(k, v)| s["labels"][*k] == *v))
        .map(|s| s["value"].as_f64().unwrap())
        .collect();
    assert_eq!(
        hits.len(),
        1,
        "expected one sample {name}{labels:?}, found {hits:?} in {parsed}"
    );
    hits[0]
}

/// The family named `name`: (type, unit).
pub fn family(parsed: &serde_json::Value, name: &str) -> (String, String) {
    let f = parsed["families"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == name)
        .unwrap_or_else(|| panic!("no family {name} in {parsed}"));
    (
        f["type"].as_str().unwrap().to_string(),
        f["unit"].as_str().unwrap_or("").to_string(),
    )
}
