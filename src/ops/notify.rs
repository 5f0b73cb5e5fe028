//! `notify`: a small sd_notify client (`READY=1`, `STATUS=`, `WATCHDOG=1`, `STOPPING=1`).
//!
//! systemd passes `NOTIFY_SOCKET` (a filesystem path, or `@name` for an abstract socket) to a
//! `Type=notify` service; the service sends newline-separated `KEY=value` assignments in one
//! datagram. With `WatchdogSec=` systemd also passes `WATCHDOG_USEC` (the timeout) and
//! `WATCHDOG_PID` (the process it is meant for); the service must send `WATCHDOG=1` more often
//! than the timeout, conventionally at half of it ([`Watchdog::ping_interval`]).
//!
//! Encoding ([`encode`]) and the reading of the environment ([`Watchdog::from_lookup`],
//! [`Notifier::from_lookup`]) are pure; only [`Notifier::send`] does I/O. Outside systemd (no
//! `NOTIFY_SOCKET`) there is no notifier and nothing is sent: the daemon runs the same either way.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::PathBuf;
use std::time::Duration;

/// Errors of the notify protocol.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// `NOTIFY_SOCKET` is set to something that is neither an absolute path nor `@name`.
    #[error("NOTIFY_SOCKET={value:?} is neither an absolute path nor an abstract @name; start twinvol from its systemd unit or unset NOTIFY_SOCKET")]
    BadSocketName {
        /// The value found.
        value: String,
    },
    /// The datagram socket could not be created or addressed.
    #[error("cannot open a datagram socket for NOTIFY_SOCKET {socket}: {source}")]
    Socket {
        /// The socket, as given in `NOTIFY_SOCKET`.
        socket: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Sending to the service manager failed (it went away, or the socket is not a datagram socket).
    #[error("cannot notify the service manager at {socket}: {source}; is NOTIFY_SOCKET stale?")]
    Send {
        /// The socket, as given in `NOTIFY_SOCKET`.
        socket: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `WATCHDOG_USEC` or `WATCHDOG_PID` does not hold a positive decimal number.
    #[error("{var}={value:?} is not a positive decimal number; fix WatchdogSec= in the unit or unset {var}")]
    BadWatchdog {
        /// The variable.
        var: &'static str,
        /// Its value.
        value: String,
    },
}

/// One assignment sent to the service manager.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State<'a> {
    /// `READY=1`: start-up is complete (volumes open, roles decided).
    Ready,
    /// `STOPPING=1`: an orderly shutdown has begun.
    Stopping,
    /// `WATCHDOG=1`: the control loop is alive.
    Watchdog,
    /// `STATUS=...`: one line shown by `systemctl status`; newlines are sent as spaces.
    Status(&'a str),
}

/// Encodes assignments as one notify datagram: `KEY=value` lines joined by `\n`.
///
/// Invariant: the result has exactly one line per state, and no value spans two lines
/// (a newline inside a status would be read by systemd as a new assignment).
pub fn encode(states: &[State<'_>]) -> String {
    let lines: Vec<String> = states
        .iter()
        .map(|s| match s {
            State::Ready => "READY=1".to_string(),
            State::Stopping => "STOPPING=1".to_string(),
            State::Watchdog => "WATCHDOG=1".to_string(),
            State::Status(text) => format!("STATUS={}", text.replace(['\n', '\r'], " ")),
        })
        .collect();
    lines.join("\n")
}

/// Where the service manager listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotifyTarget {
    /// A socket file.
    Path(PathBuf),
    /// A Linux abstract socket name (written `@name` in `NOTIFY_SOCKET`, without the `@` here).
    Abstract(Vec<u8>),
}

impl NotifyTarget {
    /// Parses a `NOTIFY_SOCKET` value: `/absolute/path` or `@abstract-name`.
    pub fn parse(value: &OsStr) -> Result<Self, NotifyError> {
        let bytes = value.as_bytes();
        match bytes.first() {
            Some(b'/') => Ok(NotifyTarget::Path(PathBuf::from(value))),
            Some(b'@') if bytes.len() > 1 => Ok(NotifyTarget::Abstract(bytes[1..].to_vec())),
            _ => Err(NotifyError::BadSocketName {
                value: value.to_string_lossy().into_owned(),
            }),
        }
    }

    fn display(&self) -> String {
        match self {
            NotifyTarget::Path(p) => p.display().to_string(),
            NotifyTarget::Abstract(name) => format!("@{}", String::from_utf8_lossy(name)),
        }
    }

    fn socket_addr(&self) -> std::io::Result<SocketAddr> {
        match self {
            NotifyTarget::Path(p) => SocketAddr::from_pathname(p),
            NotifyTarget::Abstract(name) => {
                use std::os::linux::net::SocketAddrExt;
                SocketAddr::from_abstract_name(name)
            }
        }
    }
}

/// A connection to the service manager's notify socket.
///
/// Invariant: holds an unbound datagram socket and the manager's address; every [`send`](Self::send)
/// is one datagram, so assignments sent together are applied together.
#[derive(Debug)]
pub struct Notifier {
    socket: UnixDatagram,
    addr: SocketAddr,
    name: String,
}

impl Notifier {
    /// The notifier for this process, from `NOTIFY_SOCKET`; `None` when not started by systemd.
    pub fn from_env() -> Result<Option<Self>, NotifyError> {
        Self::from_lookup(|k| std::env::var_os(k))
    }

    /// Like [`from_env`](Self::from_env) with an explicit environment (for tests and embedding).
    pub fn from_lookup(
        lookup: impl Fn(&str) -> Option<OsString>,
    ) -> Result<Option<Self>, NotifyError> {
        match lookup("NOTIFY_SOCKET") {
            Some(v) if !v.is_empty() => Self::connect(&NotifyTarget::parse(&v)?).map(Some),
            _ => Ok(None),
        }
    }

    /// Opens a datagram socket towards `target` (nothing is sent yet).
    pub fn connect(target: &NotifyTarget) -> Result<Self, NotifyError> {
        let name = target.display();
        let err = |source| NotifyError::Socket {
            socket: name.clone(),
            source,
        };
        let addr = target.socket_addr().map_err(err)?;
        let socket = UnixDatagram::unbound().map_err(err)?;
        Ok(Notifier { socket, addr, name })
    }

    /// Sends the assignments in one datagram.
    pub fn send(&self, states: &[State<'_>]) -> Result<(), NotifyError> {
        let msg = encode(states);
        self.socket
            .send_to_addr(msg.as_bytes(), &self.addr)
            .map_err(|source| NotifyError::Send {
                socket: self.name.clone(),
                source,
            })?;
        Ok(())
    }

    /// `READY=1` with a status line.
    pub fn ready(&self, status: &str) -> Result<(), NotifyError> {
        self.send(&[State::Ready, State::Status(status)])
    }

    /// `STATUS=...` alone.
    pub fn status(&self, status: &str) -> Result<(), NotifyError> {
        self.send(&[State::Status(status)])
    }

    /// `WATCHDOG=1`.
    pub fn watchdog(&self) -> Result<(), NotifyError> {
        self.send(&[State::Watchdog])
    }

    /// `STOPPING=1` with a status line.
    pub fn stopping(&self, status: &str) -> Result<(), NotifyError> {
        self.send(&[State::Stopping, State::Status(status)])
    }
}

/// The watchdog systemd expects this process to feed.
///
/// Invariant: `timeout` is non-zero; [`ping_interval`](Self::ping_interval) is half of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Watchdog {
    /// `WatchdogSec=` of the unit: without a ping for this long, systemd kills and restarts us.
    pub timeout: Duration,
}

impl Watchdog {
    /// The watchdog for this process from `WATCHDOG_USEC`/`WATCHDOG_PID`; `None` when there is
    /// none, or when `WATCHDOG_PID` names another process (the variables were inherited).
    pub fn from_env() -> Result<Option<Self>, NotifyError> {
        Self::from_lookup(|k| std::env::var_os(k), std::process::id())
    }

    /// Like [`from_env`](Self::from_env) with an explicit environment and process id.
    pub fn from_lookup(
        lookup: impl Fn(&str) -> Option<OsString>,
        my_pid: u32,
    ) -> Result<Option<Self>, NotifyError> {
        let number = |var: &'static str, v: OsString| -> Result<u64, NotifyError> {
            let bad = || NotifyError::BadWatchdog {
                var,
                value: v.to_string_lossy().into_owned(),
            };
            let s = v.to_str().ok_or_else(bad)?;
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            match s.parse::<u64>() {
                Ok(n) if n > 0 => Ok(n),
                _ => Err(bad()),
            }
        };
        let Some(usec) = lookup("WATCHDOG_USEC").filter(|v| !v.is_empty()) else {
            return Ok(None);
        };
        if let Some(pid) = lookup("WATCHDOG_PID").filter(|v| !v.is_empty()) {
            if number("WATCHDOG_PID", pid)? != u64::from(my_pid) {
                return Ok(None);
            }
        }
        let usec = number("WATCHDOG_USEC", usec)?;
        Ok(Some(Watchdog {
            timeout: Duration::from_micros(usec),
        }))
    }

    /// How often to send `WATCHDOG=1`: half the timeout, as sd_watchdog_enabled(3) recommends.
    pub fn ping_interval(&self) -> Duration {
        self.timeout / 2
    }
}

/// The daemon's side of the service manager: the notifier and the watchdog of this process,
/// both optional, with send failures logged instead of returned (a service manager that went
/// away must never stop the data path).
///
/// Invariants: nothing is sent when `NOTIFY_SOCKET` is unset; a `STATUS=` line is sent only when
/// it differs from the last one sent; `WATCHDOG=1` is only sent when `WATCHDOG_USEC` names this
/// process.
#[derive(Debug, Default)]
pub struct ServiceManager {
    notifier: Option<Notifier>,
    watchdog: Option<Watchdog>,
    last_status: String,
    failed_sends: u64,
}

impl ServiceManager {
    /// The service manager of this process, from the environment; problems with the
    /// variables are logged and leave the part concerned disabled.
    pub fn from_env() -> Self {
        let notifier = Notifier::from_env().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "sd_notify disabled");
            None
        });
        let watchdog = Watchdog::from_env().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "systemd watchdog disabled");
            None
        });
        Self::new(notifier, watchdog)
    }

    /// A service manager with an explicit notifier and watchdog (tests, embedding).
    pub fn new(notifier: Option<Notifier>, watchdog: Option<Watchdog>) -> Self {
        Self {
            notifier,
            watchdog,
            last_status: String::new(),
            failed_sends: 0,
        }
    }

    /// How often [`watchdog`](Self::watchdog) must be called; `None` without a watchdog (or
    /// without a socket to send the pings to).
    pub fn ping_interval(&self) -> Option<Duration> {
        match (&self.notifier, &self.watchdog) {
            (Some(_), Some(w)) => Some(w.ping_interval()),
            _ => None,
        }
    }

    fn send(&mut self, states: &[State<'_>]) {
        let Some(n) = &self.notifier else { return };
        if let Err(e) = n.send(states) {
            self.failed_sends += 1;
            // The first failure and then one in a thousand: a vanished manager must not flood the log.
            if self.failed_sends % 1000 == 1 {
                tracing::warn!(error = %e, failed = self.failed_sends, "cannot notify systemd");
            }
        }
    }

    /// `READY=1` with `status`.
    pub fn ready(&mut self, status: &str) {
        self.last_status = status.to_string();
        self.send(&[State::Ready, State::Status(status)]);
    }

    /// `STATUS=status` if it differs from the last status sent.
    pub fn status(&mut self, status: &str) {
        if self.last_status != status {
            self.last_status = status.to_string();
            self.send(&[State::Status(status)]);
        }
    }

    /// `WATCHDOG=1` (only when there is a watchdog for this process).
    pub fn watchdog(&mut self) {
        if self.watchdog.is_some() {
            self.send(&[State::Watchdog]);
        }
    }

    /// `STOPPING=1` with `status`.
    pub fn stopping(&mut self, status: &str) {
        self.last_status = status.to_string();
        self.send(&[State::Stopping, State::Status(status)]);
    }

    /// Awaits `fut` while feeding the watchdog every [`ping_interval`](Self::ping_interval),
    /// for at most `limit`: a bring-up that waits on hooks and cloud calls (each with its own
    /// timeout) is not a hung daemon, but one stuck past `limit` is, and systemd then restarts it.
    /// Without a watchdog this is just `fut.await`.
    pub async fn fed_while<F: std::future::Future>(
        &mut self,
        limit: Duration,
        fut: F,
    ) -> F::Output {
        let Some(every) = self.ping_interval() else {
            return fut.await;
        };
        let deadline = tokio::time::Instant::now() + limit;
        let mut pings = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        pings.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut warned = false;
        tokio::pin!(fut);
        loop {
            tokio::select! {
                out = &mut fut => return out,
                _ = pings.tick() => {
                    if tokio::time::Instant::now() < deadline {
                        self.watchdog();
                    } else if !warned {
                        warned = true;
                        tracing::error!(limit_ms = limit.as_millis() as u64, "an operation of the control loop is stuck past its limit: no more watchdog pings, systemd will restart the daemon");
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
        let map: HashMap<String, OsString> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        move |k| map.get(k).cloned()
    }

    fn recv(sock: &UnixDatagram) -> String {
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 4096];
        let n = sock.recv(&mut buf).unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn ready_and_status_arrive_in_one_datagram_on_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let manager = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::from_lookup(env(&[("NOTIFY_SOCKET", path.to_str().unwrap())]))
            .unwrap()
            .expect("NOTIFY_SOCKET is set");
        n.ready("2 volumes open, role Primary").unwrap();
        assert_eq!(
            recv(&manager),
            "READY=1\nSTATUS=2 volumes open, role Primary"
        );
        n.watchdog().unwrap();
        assert_eq!(recv(&manager), "WATCHDOG=1");
        n.stopping("demoting data").unwrap();
        assert_eq!(recv(&manager), "STOPPING=1\nSTATUS=demoting data");
    }

    #[test]
    fn abstract_socket_names_starting_with_at_are_reached() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("twinvol-notify-test-{}", std::process::id());
        let manager =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
                .unwrap();
        let n = Notifier::from_lookup(env(&[("NOTIFY_SOCKET", &format!("@{name}"))]))
            .unwrap()
            .unwrap();
        n.status("resyncing 42%").unwrap();
        assert_eq!(recv(&manager), "STATUS=resyncing 42%");
    }

    #[test]
    fn no_notify_socket_means_no_notifier() {
        assert!(Notifier::from_lookup(env(&[])).unwrap().is_none());
        assert!(Notifier::from_lookup(env(&[("NOTIFY_SOCKET", "")]))
            .unwrap()
            .is_none());
    }

    #[test]
    fn relative_notify_socket_is_refused_with_the_value_named() {
        let e = Notifier::from_lookup(env(&[("NOTIFY_SOCKET", "run/notify")])).unwrap_err();
        assert!(e.to_string().contains("run/notify"), "{e}");
        assert!(NotifyTarget::parse(OsStr::new("@")).is_err());
    }

    #[test]
    fn a_vanished_manager_is_a_send_error_naming_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gone");
        let manager = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::connect(&NotifyTarget::Path(path.clone())).unwrap();
        drop(manager);
        std::fs::remove_file(&path).unwrap();
        let e = n.watchdog().unwrap_err();
        assert!(matches!(e, NotifyError::Send { .. }), "{e:?}");
        assert!(e.to_string().contains("gone"), "{e}");
    }

    #[test]
    fn newlines_in_a_status_never_start_a_new_assignment() {
        let msg = encode(&[State::Status("line one\nREADY=1\r\nx"), State::Watchdog]);
        assert_eq!(msg, "STATUS=line one READY=1  x\nWATCHDOG=1");
        assert_eq!(msg.lines().count(), 2);
    }

    #[test]
    fn watchdog_interval_is_half_the_timeout_for_our_pid() {
        let w = Watchdog::from_lookup(
            env(&[("WATCHDOG_USEC", "10000000"), ("WATCHDOG_PID", "4242")]),
            4242,
        )
        .unwrap()
        .unwrap();
        assert_eq!(w.timeout, Duration::from_secs(10));
        assert_eq!(w.ping_interval(), Duration::from_secs(5));
        // Without WATCHDOG_PID the watchdog is ours.
        let w = Watchdog::from_lookup(env(&[("WATCHDOG_USEC", "3000000")]), 1).unwrap();
        assert_eq!(w.unwrap().ping_interval(), Duration::from_millis(1500));
    }

    #[test]
    fn watchdog_meant_for_another_process_is_ignored() {
        let w = Watchdog::from_lookup(
            env(&[("WATCHDOG_USEC", "10000000"), ("WATCHDOG_PID", "1")]),
            4242,
        )
        .unwrap();
        assert_eq!(w, None);
        assert_eq!(Watchdog::from_lookup(env(&[]), 4242).unwrap(), None);
    }

    #[test]
    fn malformed_watchdog_values_are_errors_naming_the_variable() {
        for (k, v) in [
            ("WATCHDOG_USEC", "ten"),
            ("WATCHDOG_USEC", "0"),
            ("WATCHDOG_USEC", "-5"),
            ("WATCHDOG_USEC", "+5"),
            ("WATCHDOG_USEC", "99999999999999999999999"),
        ] {
            let e = Watchdog::from_lookup(env(&[(k, v)]), 1).unwrap_err();
            assert!(
                e.to_string().contains(k) && e.to_string().contains(v),
                "{e}"
            );
        }
        let e = Watchdog::from_lookup(env(&[("WATCHDOG_USEC", "1000"), ("WATCHDOG_PID", "x1")]), 1)
            .unwrap_err();
        assert!(e.to_string().contains("WATCHDOG_PID"), "{e}");
    }

    fn manager_with(path: &std::path::Path, timeout: Duration) -> ServiceManager {
        ServiceManager::new(
            Some(Notifier::connect(&NotifyTarget::Path(path.to_path_buf())).unwrap()),
            Some(Watchdog { timeout }),
        )
    }

    fn drain(sock: &UnixDatagram) -> Vec<String> {
        sock.set_nonblocking(true).unwrap();
        let mut out = vec![];
        let mut buf = [0u8; 4096];
        while let Ok(n) = sock.recv(&mut buf) {
            out.push(String::from_utf8(buf[..n].to_vec()).unwrap());
        }
        out
    }

    #[test]
    fn service_manager_sends_a_status_only_when_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let manager = UnixDatagram::bind(&path).unwrap();
        let mut sm = manager_with(&path, Duration::from_secs(10));
        sm.ready("Secondary; peer unknown");
        sm.status("Secondary; peer unknown");
        sm.status("Primary; peer lost");
        sm.status("Primary; peer lost");
        sm.stopping("stopping");
        assert_eq!(
            drain(&manager),
            vec![
                "READY=1\nSTATUS=Secondary; peer unknown",
                "STATUS=Primary; peer lost",
                "STOPPING=1\nSTATUS=stopping"
            ]
        );
    }

    #[test]
    fn without_notify_socket_the_service_manager_is_silent_and_has_no_ping_interval() {
        let mut sm = ServiceManager::new(
            None,
            Some(Watchdog {
                timeout: Duration::from_secs(2),
            }),
        );
        assert_eq!(sm.ping_interval(), None);
        sm.ready("x");
        sm.watchdog();
        let sm = ServiceManager::new(None, None);
        assert_eq!(sm.ping_interval(), None);
    }

    #[test]
    fn a_vanished_manager_does_not_fail_the_daemon() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gone");
        let manager = UnixDatagram::bind(&path).unwrap();
        let mut sm = manager_with(&path, Duration::from_secs(1));
        drop(manager);
        std::fs::remove_file(&path).unwrap();
        for _ in 0..3 {
            sm.watchdog();
        }
        assert_eq!(sm.failed_sends, 3);
    }

    #[tokio::test]
    async fn a_long_operation_is_fed_at_half_the_timeout_until_its_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let manager = UnixDatagram::bind(&path).unwrap();
        let mut sm = manager_with(&path, Duration::from_millis(400));
        // 900 ms of work, pings every 200 ms: 4 pings (200, 400, 600, 800 ms), fewer only if
        // this machine is so loaded that ticks are late, never more.
        let out = sm
            .fed_while(Duration::from_secs(60), async {
                tokio::time::sleep(Duration::from_millis(900)).await;
                7
            })
            .await;
        assert_eq!(out, 7);
        let pings = drain(&manager);
        assert!((2..=4).contains(&pings.len()), "{pings:?}");
        assert!(pings.iter().all(|p| p == "WATCHDOG=1"), "{pings:?}");
        // Stuck past its limit of 500 ms: pings at 200 and 400 ms only, then silence for
        // 1.5 s, long past the 400 ms timeout: systemd would kill it.
        let out = sm
            .fed_while(Duration::from_millis(500), async {
                tokio::time::sleep(Duration::from_millis(2000)).await;
                8
            })
            .await;
        assert_eq!(out, 8);
        let pings = drain(&manager);
        assert!((1..=2).contains(&pings.len()), "{pings:?}");
    }

    proptest::proptest! {
        #[test]
        fn any_watchdog_usec_is_a_positive_duration_or_an_error(usec in ".*", pid in "[0-9]{0,6}") {
            let w = Watchdog::from_lookup(
                env(&[("WATCHDOG_USEC", &usec), ("WATCHDOG_PID", &pid)]),
                4242,
            );
            if let Ok(Some(w)) = w {
                proptest::prop_assert!(w.timeout > Duration::ZERO);
                proptest::prop_assert!(w.ping_interval() <= w.timeout);
            }
        }

        #[test]
        fn usec_values_round_trip_to_durations(usec in 1u64..u64::MAX) {
            let w = Watchdog::from_lookup(env(&[("WATCHDOG_USEC", &usec.to_string())]), 1)
                .unwrap()
                .unwrap();
            proptest::prop_assert_eq!(w.timeout, Duration::from_micros(usec));
        }

        #[test]
        fn any_notify_socket_value_parses_or_is_refused_without_panicking(v in ".*") {
            match NotifyTarget::parse(OsStr::new(&v)) {
                Ok(NotifyTarget::Path(p)) => proptest::prop_assert!(p.is_absolute()),
                Ok(NotifyTarget::Abstract(name)) => {
                    proptest::prop_assert_eq!(format!("@{}", String::from_utf8_lossy(&name)), v)
                }
                Err(e) => proptest::prop_assert!(e.to_string().contains("NOTIFY_SOCKET")),
            }
        }

        #[test]
        fn any_status_encodes_to_exactly_one_line(text in ".*") {
            let msg = encode(&[State::Ready, State::Status(&text)]);
            proptest::prop_assert_eq!(msg.split('\n').count(), 2);
            proptest::prop_assert!(!msg.contains('\r'));
            let status_line = msg.split('\n').nth(1).unwrap_or_default();
            proptest::prop_assert!(status_line.starts_with("STATUS="));
        }
    }
}
