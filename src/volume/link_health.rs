//! Why a volume's replication link is down, for status and the log: the last failure to
//! connect, authenticate or keep the connection, whether only the operator can fix it, how
//! many attempts in a row failed the same way and since when. "The same way" is the same
//! kind of failure (`LinkError::kind`), not the same text: a message names the ephemeral
//! port of each attempt. Time is passed in, so the rules (what
//! counts as a repeat, when the problem is over) are unit tested without waiting.
//!
//! Without this, a node whose peer holds another key or runs another volume said
//! "connecting" forever, and the reason was in the log only (at debug level on the node that
//! connects, so not at all by default).

use std::time::Instant;

/// The link's current problem as status shows it (`link_error`).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LinkProblem {
    /// A stable name of the kind of failure (e.g. `auth-rejected`, `connect`), for alerts.
    pub kind: &'static str,
    /// The latest such failure, with the address and the setting to fix: the text of a link error or of
    /// the end of a session. Never key material (no link error carries any).
    pub message: String,
    /// Retrying will not fix it (keys, protocol version, volume or node identity, the
    /// configured addresses): the operator must act.
    pub needs_operator: bool,
    /// Consecutive attempts that failed with this kind of failure.
    pub attempts: u64,
    /// Seconds since the first of those attempts.
    pub since_secs: f64,
}

#[derive(Debug)]
struct Current {
    kind: &'static str,
    message: String,
    needs_operator: bool,
    attempts: u64,
    first: Instant,
}

/// The latest link failure since the last connection was made.
///
/// Invariant: empty after [`LinkHealth::connected`] until the next failure; `attempts` counts
/// the failures in a row of the same kind, and another kind starts again at 1; the message is
/// the latest failure's.
#[derive(Debug, Default)]
pub struct LinkHealth {
    current: Option<Current>,
}

impl LinkHealth {
    /// Records a failed attempt at `now`. Returns `true` when its kind differs from the
    /// failure before it (or there was none since the last connection): the caller logs the
    /// failure then, so a retry loop logs each problem once, not once per attempt.
    pub fn failed(
        &mut self,
        kind: &'static str,
        message: String,
        needs_operator: bool,
        now: Instant,
    ) -> bool {
        match &mut self.current {
            Some(c) if c.kind == kind => {
                c.attempts += 1;
                c.message = message;
                c.needs_operator = needs_operator;
                false
            }
            _ => {
                self.current = Some(Current {
                    kind,
                    message,
                    needs_operator,
                    attempts: 1,
                    first: now,
                });
                true
            }
        }
    }

    /// A connection was made (authenticated, same volume): the problem is over.
    pub fn connected(&mut self) {
        self.current = None;
    }

    /// The problem as of `now`, if the link has one.
    pub fn report(&self, now: Instant) -> Option<LinkProblem> {
        self.current.as_ref().map(|c| LinkProblem {
            kind: c.kind,
            message: c.message.clone(),
            needs_operator: c.needs_operator,
            attempts: c.attempts,
            since_secs: now.saturating_duration_since(c.first).as_secs_f64(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_repeated_failure_is_new_once_and_counts_its_attempts_from_the_first() {
        let t0 = Instant::now();
        let mut h = LinkHealth::default();
        assert_eq!(h.report(t0), None, "no problem before any failure");
        assert!(h.failed("auth", "keys differ".into(), true, t0));
        assert!(!h.failed(
            "auth",
            "keys differ".into(),
            true,
            t0 + Duration::from_secs(1)
        ));
        assert!(!h.failed(
            "auth",
            "keys differ".into(),
            true,
            t0 + Duration::from_secs(2)
        ));
        assert_eq!(
            h.report(t0 + Duration::from_secs(5)),
            Some(LinkProblem {
                kind: "auth",
                message: "keys differ".into(),
                needs_operator: true,
                attempts: 3,
                since_secs: 5.0,
            })
        );
    }

    #[test]
    fn the_same_kind_with_another_text_is_a_repeat_and_shows_the_latest_text() {
        let t0 = Instant::now();
        let mut h = LinkHealth::default();
        assert!(h.failed("auth", "peer 127.0.0.2:40001 failed".into(), true, t0));
        assert!(!h.failed("auth", "peer 127.0.0.2:40002 failed".into(), true, t0));
        let r = h.report(t0).unwrap();
        assert_eq!(
            (r.attempts, r.message.as_str()),
            (2, "peer 127.0.0.2:40002 failed")
        );
    }

    #[test]
    fn another_kind_replaces_the_problem_and_starts_again() {
        let t0 = Instant::now();
        let mut h = LinkHealth::default();
        h.failed("connect", "connection refused".into(), false, t0);
        h.failed("connect", "connection refused".into(), false, t0);
        let t1 = t0 + Duration::from_secs(3);
        assert!(h.failed("auth", "keys differ".into(), true, t1));
        let r = h.report(t1 + Duration::from_secs(1)).unwrap();
        assert_eq!(
            (r.message.as_str(), r.needs_operator),
            ("keys differ", true)
        );
        assert_eq!((r.attempts, r.since_secs), (1, 1.0));
        // Going back to the first kind is new again: each change is logged.
        assert!(h.failed("connect", "connection refused".into(), false, t1));
    }

    #[test]
    fn a_connection_ends_the_problem_and_the_same_failure_after_it_is_new() {
        let t0 = Instant::now();
        let mut h = LinkHealth::default();
        h.failed("auth", "keys differ".into(), true, t0);
        h.connected();
        assert_eq!(h.report(t0), None);
        assert!(
            h.failed("auth", "keys differ".into(), true, t0),
            "a new episode is logged again"
        );
        assert_eq!(h.report(t0).unwrap().attempts, 1);
    }

    #[test]
    fn a_report_before_the_first_attempt_time_is_zero_seconds_not_a_panic() {
        let t0 = Instant::now();
        let mut h = LinkHealth::default();
        h.failed("x", "x".into(), false, t0 + Duration::from_secs(10));
        assert_eq!(h.report(t0).unwrap().since_secs, 0.0);
    }
}
