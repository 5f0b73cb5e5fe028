//! Fencing: stop the peer instance (`StopInstances` with `Force`) and wait until it is stopped.
//!
//! Invariants: this node fences only while its own instance is `running` (the race guard of
//! fence_aws: of two nodes fencing each other, the one already stopping never wins); the wait is
//! bounded by the configured deadline and reports the last state seen when it runs out.

use std::time::Duration;

use aws_sdk_ec2::types::InstanceStateName;
use tokio::time::Instant;

use crate::cloud::aws::{Api, AwsError, Deadline};
use crate::cloud::{Outcome, Resource, ResourceReport};
use crate::config::cloud::FenceConfig;

/// States of `ids` (instance id, state name), one `DescribeInstances`.
pub async fn states(
    api: &Api,
    ids: &[&str],
    dl: Deadline,
) -> Result<Vec<(String, String)>, AwsError> {
    let label = ids.join(",");
    let out = api
        .ec2("DescribeInstances", &label, dl, || {
            api.ec2
                .describe_instances()
                .set_instance_ids(Some(ids.iter().map(|s| s.to_string()).collect()))
                .send()
        })
        .await?;
    let mut v = Vec::new();
    for r in out.reservations() {
        for i in r.instances() {
            let state = i
                .state()
                .and_then(|s| s.name())
                .map_or("unknown", InstanceStateName::as_str);
            v.push((
                i.instance_id().unwrap_or("?").to_string(),
                state.to_string(),
            ));
        }
    }
    Ok(v)
}

fn state_of<'a>(all: &'a [(String, String)], id: &str) -> Option<&'a str> {
    all.iter().find(|(i, _)| i == id).map(|(_, s)| s.as_str())
}

/// The peer's state from one `DescribeInstances` (no change is made): `stopped` and
/// `terminated` are proof it serves nothing; `stopping` is not (it may still flush and serve).
pub async fn peer_instance(api: &Api, f: &FenceConfig) -> crate::cloud::PeerInstance {
    use crate::cloud::PeerInstance;
    let peer = f.peer_instance_id.as_str();
    let dl = Deadline::after(Duration::from_secs(f.timeout_s.clamp(1, 10)));
    match states(api, &[peer], dl).await {
        Ok(all) => match state_of(&all, peer) {
            Some(s @ ("stopped" | "terminated")) => {
                PeerInstance::Stopped(format!("instance {peer} is {s} (DescribeInstances)"))
            }
            Some(s) => PeerInstance::Running(format!("instance {peer} is {s} (DescribeInstances)")),
            None => PeerInstance::Unknown(format!(
                "DescribeInstances does not list {peer}; check cloud.fence.peer_instance_id"
            )),
        },
        Err(e) => PeerInstance::Unknown(e.to_string()),
    }
}

/// Stops the peer and waits until EC2 reports it `stopped` (or `terminated`).
pub async fn fence(api: &Api, f: &FenceConfig, me: &str) -> ResourceReport {
    let start = Instant::now();
    let peer = f.peer_instance_id.as_str();
    let dl = Deadline::after(Duration::from_secs(f.timeout_s));
    let outcome = async {
        let all = states(api, &[me, peer], dl).await?;
        let mine = state_of(&all, me).unwrap_or("absent");
        if mine != "running" {
            return Ok(Outcome::Failed(format!("this node's instance {me} is {mine}, not running: refusing to fence the peer {peer}")));
        }
        let before = state_of(&all, peer).ok_or_else(|| AwsError::InstanceNotFound(peer.to_string()))?.to_string();
        if before == "stopped" || before == "terminated" {
            return Ok(Outcome::Unchanged);
        }
        api.ec2("StopInstances", peer, dl, || api.ec2.stop_instances().instance_ids(peer).force(true).send()).await?;
        let mut last = before.clone();
        loop {
            let now = states(api, &[peer], dl).await?;
            last = state_of(&now, peer).unwrap_or(&last).to_string();
            if last == "stopped" || last == "terminated" {
                return Ok(Outcome::Applied(format!("{before} -> {last} (StopInstances Force)")));
            }
            let pause = Duration::from_millis(f.poll_interval_ms);
            if pause >= dl.remaining() {
                return Err(AwsError::Timeout { seconds: f.timeout_s, action: "StopInstances", resource: format!("{peer} (still {last})") });
            }
            tokio::time::sleep(pause).await;
        }
    }
    .await
    .unwrap_or_else(|e: AwsError| Outcome::Failed(e.to_string()));
    ResourceReport::new(
        Resource::Instance(peer.to_string()),
        outcome,
        start.elapsed(),
    )
}
