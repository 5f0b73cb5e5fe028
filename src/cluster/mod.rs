//! `cluster`: the node daemon's failover logic.
//!
//! Pure parts (no sockets, no clocks of their own; tested with a fake clock):
//! - [`heartbeat`]: the authenticated UDP heartbeat datagram (codec + HMAC).
//! - [`liveness`]: per-path liveness and the peer's state (one path down = warning, all
//!   down = peer lost).
//! - [`decide`]: the failover decisions (fence, promote, demote), the start-up gate,
//!   partition resolution, the fence race guard and the promotion announcement.
//! - [`announce`]: heartbeat sequence numbers, acknowledgements, and whether the peer has
//!   heard this node's promotion announcement.
//!
//! Runtime parts:
//! - [`witness`]: HTTP HEAD probes of the witness targets.
//! - [`volume`]: the [`volume::VolumeControl`] seam to a volume, and the local (unmirrored) volume.
//! - [`mirrored`]: [`mirrored::MirroredControl`], the seam over the mirrored volume.
//! - [`bringup`]: ordered bring-up and teardown with application hooks, timed per step.
//! - [`mount`]: kernel attach and filesystem mount of a volume while Primary.
//! - [`control`]: the control socket protocol and status rendering.
//! - [`daemon`]: `twinvol run`, tying it all together.
//! - [`demo`]: `twinvol demo`, two nodes on one machine.

pub mod announce;
pub mod bringup;
pub mod control;
pub mod daemon;
pub mod decide;
pub mod demo;
pub mod heartbeat;
pub mod liveness;
pub mod mirrored;
pub mod mount;
pub mod volume;
pub mod witness;
