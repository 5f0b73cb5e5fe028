//! Ping timeouts as a pure state machine: when to send a Ping, when the peer counts as dead.
//!
//! Any frame received proves the peer alive (a busy link needs no pings). After `interval`
//! without traffic a Ping is due; if nothing at all arrives within `timeout` of the last frame
//! received, the peer is dead and the connection must be dropped (its region stays dirty).
//!
//! Invariant: [`Liveness::poll`] reports `Dead` exactly when `now - last_received >= timeout`.

use std::time::{Duration, Instant};

/// What the connection loop must do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LivenessAction {
    /// Nothing until this instant (then poll again).
    WaitUntil(Instant),
    /// Send `Ping { nonce }` now.
    SendPing(u64),
    /// The peer has been silent for the whole timeout: drop the connection.
    Dead {
        /// How long it was silent.
        silent_for: Duration,
    },
}

/// Liveness of one connection.
#[derive(Debug, Clone)]
pub struct Liveness {
    interval: Duration,
    timeout: Duration,
    last_received: Instant,
    ping_sent: Option<(u64, Instant)>,
    next_nonce: u64,
}

impl Liveness {
    /// Starts counting at `now`; pings after `interval` of silence, dead after `timeout`
    /// (`timeout` is raised to at least twice `interval`, so a ping always has time to return).
    pub fn new(now: Instant, interval: Duration, timeout: Duration) -> Self {
        Self {
            interval,
            timeout: timeout.max(interval.saturating_mul(2)),
            last_received: now,
            ping_sent: None,
            next_nonce: 1,
        }
    }

    /// A frame (of any kind) arrived at `now`.
    pub fn on_receive(&mut self, now: Instant) {
        self.last_received = self.last_received.max(now);
        self.ping_sent = None;
    }

    /// Round-trip time if this Pong answers the outstanding Ping.
    pub fn on_pong(&mut self, nonce: u64, now: Instant) -> Option<Duration> {
        let rtt = match self.ping_sent {
            Some((n, sent)) if n == nonce => Some(now.saturating_duration_since(sent)),
            _ => None,
        };
        self.on_receive(now);
        rtt
    }

    /// What to do at `now`.
    pub fn poll(&mut self, now: Instant) -> LivenessAction {
        let silent_for = now.saturating_duration_since(self.last_received);
        if silent_for >= self.timeout {
            return LivenessAction::Dead { silent_for };
        }
        let dead_at = self.last_received + self.timeout;
        match self.ping_sent {
            Some(_) => LivenessAction::WaitUntil(dead_at),
            None if silent_for >= self.interval => {
                let nonce = self.next_nonce;
                self.next_nonce = self.next_nonce.wrapping_add(1);
                self.ping_sent = Some((nonce, now));
                LivenessAction::SendPing(nonce)
            }
            None => LivenessAction::WaitUntil(self.last_received + self.interval),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn silent_peer_gets_one_ping_then_is_declared_dead_at_the_timeout() {
        let t0 = Instant::now();
        let mut l = Liveness::new(t0, 2 * S, 6 * S);
        assert_eq!(l.poll(t0 + S), LivenessAction::WaitUntil(t0 + 2 * S));
        assert_eq!(l.poll(t0 + 2 * S), LivenessAction::SendPing(1));
        assert_eq!(
            l.poll(t0 + 3 * S),
            LivenessAction::WaitUntil(t0 + 6 * S),
            "second ping while one is outstanding"
        );
        assert_eq!(
            l.poll(t0 + 6 * S),
            LivenessAction::Dead { silent_for: 6 * S }
        );
    }

    #[test]
    fn traffic_keeps_the_link_alive_without_pings() {
        let t0 = Instant::now();
        let mut l = Liveness::new(t0, 2 * S, 6 * S);
        for i in 1..20 {
            l.on_receive(t0 + i * S);
            assert_eq!(
                l.poll(t0 + i * S),
                LivenessAction::WaitUntil(t0 + (i + 2) * S)
            );
        }
    }

    #[test]
    fn pong_measures_round_trip_and_rearms() {
        let t0 = Instant::now();
        let mut l = Liveness::new(t0, 2 * S, 6 * S);
        let LivenessAction::SendPing(n) = l.poll(t0 + 2 * S) else {
            panic!("no ping due")
        };
        assert_eq!(
            l.on_pong(n + 100, t0 + 2 * S),
            None,
            "stale pong counted as rtt"
        );
        let LivenessAction::SendPing(n) = l.poll(t0 + 4 * S) else {
            panic!("no ping due")
        };
        assert_eq!(
            l.on_pong(n, t0 + 4 * S + Duration::from_millis(3)),
            Some(Duration::from_millis(3))
        );
        assert!(matches!(l.poll(t0 + 5 * S), LivenessAction::WaitUntil(_)));
    }

    #[test]
    fn timeout_below_interval_is_raised() {
        let t0 = Instant::now();
        let mut l = Liveness::new(t0, 5 * S, S);
        assert_eq!(l.poll(t0 + 2 * S), LivenessAction::WaitUntil(t0 + 5 * S));
        assert_eq!(l.poll(t0 + 5 * S), LivenessAction::SendPing(1));
        assert_eq!(l.poll(t0 + 9 * S), LivenessAction::WaitUntil(t0 + 10 * S));
        assert_eq!(
            l.poll(t0 + 10 * S),
            LivenessAction::Dead { silent_for: 10 * S }
        );
    }
}
