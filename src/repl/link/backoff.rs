//! Reconnect delays: exponential backoff with a cap and jitter, as a pure calculator.
//!
//! Invariant: every delay lies in `[base * (1 - jitter), base]` where
//! `base = min(max, initial * multiplier^attempt)`; delays never exceed `max`.

use std::time::Duration;

/// How reconnect delays grow.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BackoffPolicy {
    /// Delay before the first retry.
    pub initial: Duration,
    /// Largest delay.
    pub max: Duration,
    /// Growth factor per failed attempt (at least 1).
    pub multiplier: u32,
    /// Fraction (0.0..=1.0) of each delay that is randomised away, so two nodes restarted
    /// together do not retry in lock-step.
    pub jitter: f64,
}

impl Default for BackoffPolicy {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(200),
            max: Duration::from_secs(10),
            multiplier: 2,
            jitter: 0.5,
        }
    }
}

impl BackoffPolicy {
    /// The delay before retry number `attempt` (0-based) without jitter.
    pub fn base_delay(&self, attempt: u32) -> Duration {
        let factor = u64::from(self.multiplier.max(1))
            .checked_pow(attempt)
            .unwrap_or(u64::MAX);
        let nanos = (self.initial.as_nanos() as u64).saturating_mul(factor);
        Duration::from_nanos(nanos).min(self.max)
    }

    /// The delay before retry `attempt`, jittered by `unit` (a random number in `0.0..1.0`).
    pub fn delay(&self, attempt: u32, unit: f64) -> Duration {
        let jitter = self.jitter.clamp(0.0, 1.0);
        let unit = if unit.is_finite() {
            unit.clamp(0.0, 1.0)
        } else {
            0.0
        };
        self.base_delay(attempt).mul_f64(1.0 - jitter * unit)
    }
}

/// The retry state of one connection: counts failures, resets on success.
#[derive(Debug, Clone)]
pub struct Backoff {
    policy: BackoffPolicy,
    attempt: u32,
}

impl Backoff {
    /// A fresh state (next delay is the initial one).
    pub fn new(policy: BackoffPolicy) -> Self {
        Self { policy, attempt: 0 }
    }

    /// Failed attempts since the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    /// The delay to wait after one more failure, jittered by `unit` in `0.0..1.0`.
    pub fn next_delay(&mut self, unit: f64) -> Duration {
        let d = self.policy.delay(self.attempt, unit);
        self.attempt = self.attempt.saturating_add(1);
        d
    }

    /// The delay after one more failure, with jitter from the OS random generator.
    pub fn next_delay_random(&mut self) -> Duration {
        let unit = getrandom::u64()
            .map(|x| (x >> 11) as f64 / (1u64 << 53) as f64)
            .unwrap_or(0.5);
        self.next_delay(unit)
    }

    /// Back to the initial delay (after a successful connection).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> BackoffPolicy {
        BackoffPolicy {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(5),
            multiplier: 2,
            jitter: 0.5,
        }
    }

    #[test]
    fn backoff_doubles_until_the_cap_then_stays_there() {
        let mut b = Backoff::new(BackoffPolicy {
            jitter: 0.0,
            ..policy()
        });
        let ms: Vec<u128> = (0..10).map(|_| b.next_delay(0.7).as_millis()).collect();
        assert_eq!(ms, [100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000, 5000]);
    }

    #[test]
    fn huge_attempt_counts_do_not_overflow() {
        let p = policy();
        assert_eq!(p.base_delay(u32::MAX), p.max);
        assert_eq!(p.base_delay(64), p.max);
    }

    #[test]
    fn jitter_only_shortens_within_its_fraction() {
        let p = policy();
        for attempt in 0..12 {
            let base = p.base_delay(attempt);
            for unit in [0.0, 0.25, 0.5, 0.999, 1.0, f64::NAN, -3.0, 7.0] {
                let d = p.delay(attempt, unit);
                assert!(
                    d <= base && d >= base.mul_f64(0.5),
                    "attempt {attempt} unit {unit}: {d:?} vs {base:?}"
                );
            }
        }
    }

    #[test]
    fn reset_returns_to_the_initial_delay() {
        let mut b = Backoff::new(BackoffPolicy {
            jitter: 0.0,
            ..policy()
        });
        for _ in 0..5 {
            b.next_delay(0.0);
        }
        assert_eq!(b.attempts(), 5);
        b.reset();
        assert_eq!(b.next_delay(0.0), Duration::from_millis(100));
    }

    #[test]
    fn random_jitter_stays_in_bounds() {
        let mut b = Backoff::new(policy());
        for i in 0..20 {
            let base = policy().base_delay(i);
            let d = b.next_delay_random();
            assert!(d <= base && d >= base.mul_f64(0.5));
        }
    }
}
