//! `ops`: how twinvol fits into the machine it runs on, service-manager side.
//!
//! `notify` speaks the systemd readiness/watchdog protocol (`Type=notify`, `WatchdogSec=`) so
//! the unit in systemd/twinvol.service can tell "started" from "ready" and restart a hung daemon.
//! `health` is the HTTP endpoint Route 53 health checks probe in failover-routing mode.
//! `metrics` renders the status as OpenMetrics text and serves it on `GET /metrics`;
//! `status_text` renders the replication state of a volume for `twinvol status`; `private_socket`
//! binds the owner-only control sockets; `status_file` keeps `twinvol mirror --status-file` written
//! on a thread of its own.
//! Nothing here depends on the data path; the daemon calls it from its control loop.

pub mod health;
pub mod metrics;
pub mod notify;
pub mod private_socket;
pub mod status_file;
pub mod status_text;
