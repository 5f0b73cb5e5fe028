//! Resync pacing and progress as pure values (no clocks read here: callers pass `now`).
//!
//! - [`RateController`]: a token bucket whose rate is the configured maximum while the
//!   application is quiet and drops to the configured floor while it writes, so application
//!   I/O never starves and is never starved (DRBD's c-max-rate / c-min-rate).
//! - [`Progress`]: bytes done and left, rate and ETA of one resync, for status.
//! - [`pieces`]: cuts a dirty byte run into resync requests of bounded size.

use std::ops::Range;
use std::time::{Duration, Instant};

/// How long application writes count as "recent" for the rate choice.
pub const APP_ACTIVITY_WINDOW: Duration = Duration::from_millis(200);

/// Token bucket for resync bytes.
///
/// Invariant: `min_rate <= max_rate`, both > 0; the bucket never holds more than
/// `burst` bytes of credit, so an idle period does not allow an unbounded burst.
#[derive(Debug, Clone)]
pub struct RateController {
    max_rate: u64,
    min_rate: u64,
    burst: u64,
    credit: f64,
    last: Instant,
    last_app_write: Option<Instant>,
}

impl RateController {
    /// A controller allowing `max_rate` bytes/s when the application is idle and `min_rate`
    /// while it writes. Rates of 0 are raised to 1.
    pub fn new(max_rate: u64, min_rate: u64, now: Instant) -> Self {
        let max_rate = max_rate.max(1);
        let min_rate = min_rate.clamp(1, max_rate);
        Self {
            max_rate,
            min_rate,
            burst: (max_rate / 10).max(1 << 20),
            credit: 0.0,
            last: now,
            last_app_write: None,
        }
    }

    /// An application write happened at `now`.
    pub fn on_app_write(&mut self, now: Instant) {
        self.last_app_write = Some(now);
    }

    /// The rate in force at `now`.
    pub fn current_rate(&self, now: Instant) -> u64 {
        match self.last_app_write {
            Some(t) if now.saturating_duration_since(t) < APP_ACTIVITY_WINDOW => self.min_rate,
            _ => self.max_rate,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        let rate = self.current_rate(now) as f64;
        self.credit = (self.credit + dt * rate).min(self.burst as f64);
    }

    /// Takes `bytes` of credit: returns how long to wait before sending them (zero when the
    /// credit suffices). The credit may go negative, so the wait is paid once.
    pub fn take(&mut self, bytes: u64, now: Instant) -> Duration {
        self.refill(now);
        self.credit -= bytes as f64;
        if self.credit >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.credit / self.current_rate(now) as f64)
        }
    }
}

/// Progress of one resync.
///
/// Invariant: `done <= total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Bytes to copy when the resync started.
    pub total: u64,
    /// Bytes acknowledged by the target.
    pub done: u64,
    /// When the resync started.
    pub started: Instant,
}

/// A progress snapshot for status output.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct ProgressReport {
    /// Bytes to copy in all.
    pub total_bytes: u64,
    /// Bytes copied and acknowledged.
    pub done_bytes: u64,
    /// Bytes left.
    pub left_bytes: u64,
    /// Average rate so far, bytes per second.
    pub rate_bytes_per_sec: u64,
    /// Estimated seconds to completion at that rate (`None` before the first byte).
    pub eta_secs: Option<u64>,
}

impl Progress {
    /// A resync of `total` bytes starting at `now`.
    pub fn new(total: u64, now: Instant) -> Self {
        Self {
            total,
            done: 0,
            started: now,
        }
    }

    /// `bytes` more were acknowledged.
    pub fn advance(&mut self, bytes: u64) {
        self.done = (self.done + bytes).min(self.total);
    }

    /// The snapshot at `now`.
    pub fn report(&self, now: Instant) -> ProgressReport {
        let secs = now.saturating_duration_since(self.started).as_secs_f64();
        let rate = if secs > 0.0 {
            (self.done as f64 / secs) as u64
        } else {
            0
        };
        let left = self.total - self.done;
        ProgressReport {
            total_bytes: self.total,
            done_bytes: self.done,
            left_bytes: left,
            rate_bytes_per_sec: rate,
            eta_secs: (rate > 0).then(|| left.div_ceil(rate)),
        }
    }
}

/// Cuts `run` into consecutive pieces of at most `max` bytes, each starting at a multiple of
/// `align` (the bitmap granularity) except possibly the first; `max` is rounded down to a
/// multiple of `align` (at least one `align`).
pub fn pieces(run: Range<u64>, max: u64, align: u64) -> impl Iterator<Item = Range<u64>> {
    let align = align.max(1);
    let max = (max / align).max(1) * align;
    let mut pos = run.start;
    std::iter::from_fn(move || {
        if pos >= run.end {
            return None;
        }
        let next_boundary = (pos / max + 1) * max;
        let end = next_boundary.min(run.end);
        let r = pos..end;
        pos = end;
        Some(r)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn idle_application_gets_the_maximum_rate_and_busy_gets_the_floor() {
        let t0 = Instant::now();
        let mut rc = RateController::new(100 << 20, 10 << 20, t0);
        assert_eq!(rc.current_rate(t0), 100 << 20);
        rc.on_app_write(t0);
        assert_eq!(rc.current_rate(t0 + Duration::from_millis(10)), 10 << 20);
        assert_eq!(rc.current_rate(t0 + Duration::from_secs(1)), 100 << 20);
    }

    #[test]
    fn sending_at_the_cap_waits_for_the_cap() {
        let t0 = Instant::now();
        let mut rc = RateController::new(1 << 20, 1 << 20, t0);
        // 10 MiB at 1 MiB/s with at most 1 MiB of burst: about 9-10 s of waiting in all.
        let mut now = t0;
        for _ in 0..10 {
            let w = rc.take(1 << 20, now);
            now += w;
        }
        let spent = now - t0;
        assert!(
            spent >= Duration::from_secs(8) && spent <= Duration::from_secs(10),
            "{spent:?}"
        );
    }

    #[test]
    fn floor_still_advances_while_the_application_writes() {
        let t0 = Instant::now();
        let mut rc = RateController::new(100 << 20, 10 << 20, t0);
        let mut now = t0;
        let mut sent = 0u64;
        while now < t0 + Duration::from_secs(2) {
            rc.on_app_write(now);
            now += rc.take(1 << 20, now);
            sent += 1 << 20;
        }
        // About the floor: 10 MiB/s for 2 s.
        assert!((15 << 20..=25 << 20).contains(&sent), "{sent}");
    }

    #[test]
    fn progress_reports_left_rate_and_eta() {
        let t0 = Instant::now();
        let mut p = Progress::new(100, t0);
        assert_eq!(p.report(t0).eta_secs, None);
        p.advance(50);
        let r = p.report(t0 + Duration::from_secs(5));
        assert_eq!(
            (r.done_bytes, r.left_bytes, r.rate_bytes_per_sec, r.eta_secs),
            (50, 50, 10, Some(5))
        );
        p.advance(1000);
        assert_eq!(p.report(t0 + Duration::from_secs(6)).left_bytes, 0);
    }

    proptest! {
        #[test]
        fn pieces_tile_the_run_within_bounds(start in 0u64..1_000_000, len in 1u64..5_000_000,
                                              max in 1u64..2_000_000, align_shift in 9u32..17) {
            let align = 1u64 << align_shift;
            let run = start..start + len;
            let ps: Vec<_> = pieces(run.clone(), max, align).collect();
            let cap = (max / align).max(1) * align;
            prop_assert_eq!(ps.first().unwrap().start, run.start);
            prop_assert_eq!(ps.last().unwrap().end, run.end);
            for w in ps.windows(2) {
                prop_assert_eq!(w[0].end, w[1].start);
                prop_assert_eq!(w[1].start % align, 0);
            }
            for p in &ps {
                prop_assert!(p.end > p.start && p.end - p.start <= cap);
            }
        }
    }
}
