//! Availability-zone monitor: the state of this node's AZ (`DescribeAvailabilityZones`).
//!
//! Invariant: an AZ that is not `available` is drift (the cluster recovers the local server);
//! an unknown AZ name is "Invalid availability zone: [..]"; an API that does not answer is
//! "unknown", never drift.

use aws_sdk_ec2::types::AvailabilityZoneState;

use crate::cloud::aws::{Api, AwsError, Deadline};
use crate::cloud::{Health, Resource};

/// The state of `az` as EC2 reports it.
pub async fn observe(api: &Api, az: &str, dl: Deadline) -> Result<String, AwsError> {
    let out = api
        .ec2("DescribeAvailabilityZones", az, dl, || {
            api.ec2.describe_availability_zones().zone_names(az).send()
        })
        .await;
    let out = match out {
        Err(e) if e.code() == Some("InvalidParameterValue") => {
            return Err(AwsError::InvalidAvailabilityZone(az.to_string()))
        }
        r => r?,
    };
    let zone = out
        .availability_zones()
        .iter()
        .find(|z| z.zone_name() == Some(az))
        .ok_or_else(|| AwsError::InvalidAvailabilityZone(az.to_string()))?;
    Ok(zone
        .state()
        .map_or("unknown", AvailabilityZoneState::as_str)
        .to_string())
}

/// Monitor: this node's AZ is `available`.
pub async fn check(api: &Api, az: &str, dl: Deadline) -> (Resource, Health) {
    let health = match observe(api, az, dl).await {
        Ok(state) if state == "available" => Health::Ok,
        Ok(state) => Health::Drift(format!("availability zone {az} is {state}, not available")),
        Err(e) if e.is_unobservable() => Health::Unknown(e.to_string()),
        Err(e) => Health::Drift(e.to_string()),
    };
    (Resource::AvailabilityZone(az.to_string()), health)
}
