//! Named fault points, as raft-engine's `fail_point!`: the data path calls [`hit`] where a
//! test needs to cut the replication connection at a precise step (a resync's end, a bitmap
//! exchange). Inert unless the environment variable `TWINVOL_FAILPOINTS` names the point when
//! the process starts: a comma-separated list of `name` (fires once) or `name*N` (N times).
//!
//! Invariant: without the variable, [`hit`] is always false and costs one atomic load.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

/// The environment variable naming the armed points.
pub const ENV: &str = "TWINVOL_FAILPOINTS";

fn armed() -> &'static Mutex<HashMap<String, u32>> {
    static ARMED: OnceLock<Mutex<HashMap<String, u32>>> = OnceLock::new();
    ARMED.get_or_init(|| Mutex::new(parse(&std::env::var(ENV).unwrap_or_default())))
}

/// The points and counts a `TWINVOL_FAILPOINTS` value arms (malformed counts count once).
pub fn parse(spec: &str) -> HashMap<String, u32> {
    spec.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| match s.split_once('*') {
            Some((name, n)) => (name.to_string(), n.parse().unwrap_or(1)),
            None => (s.to_string(), 1),
        })
        .collect()
}

/// Whether the point `name` fires now (each firing uses up one of its count); logged.
pub fn hit(name: &str) -> bool {
    let Ok(mut armed) = armed().lock() else {
        return false;
    };
    match armed.get_mut(name) {
        Some(n) if *n > 0 => {
            *n -= 1;
            tracing::warn!(point = name, left = *n, "fail point fired ({ENV})");
            true
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spec_arms_each_named_point_with_its_count() {
        let m = parse(" cut-a , cut-b*3,,bad*x");
        assert_eq!(m.get("cut-a"), Some(&1));
        assert_eq!(m.get("cut-b"), Some(&3));
        assert_eq!(m.get("bad"), Some(&1));
        assert_eq!(m.len(), 3);
        assert!(parse("").is_empty());
    }
}
