//! Elastic IP: associated with the active node's ENI and private address.
//!
//! Invariants: association always names the ENI and the private address and allows
//! reassociation (the peer may still hold it); every association is verified with
//! `DescribeAddresses`; disassociation on deactivate only touches an association to this ENI.

use std::net::Ipv4Addr;

use tokio::time::Instant;

use crate::cloud::aws::{Api, AwsError, Deadline};
use crate::cloud::{DryRun, Health, Outcome, PlannedChange, Resource, ResourceReport};
use crate::config::cloud::EipConfig;

/// The observed state of an Elastic IP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EipState {
    /// Its public address.
    pub public_ip: Option<String>,
    /// The ENI it is associated with.
    pub eni: Option<String>,
    /// The private address it maps to.
    pub private_ip: Option<String>,
    /// The association, for disassociation.
    pub association_id: Option<String>,
}

impl EipState {
    /// True when associated with `eni` at `ip`.
    pub fn points_at(&self, eni: &str, ip: Ipv4Addr) -> bool {
        self.eni.as_deref() == Some(eni)
            && self.private_ip.as_deref() == Some(ip.to_string().as_str())
    }
    fn describe(&self) -> String {
        match (&self.eni, &self.private_ip) {
            (Some(e), Some(p)) => format!("{e} ({p})"),
            (Some(e), None) => e.clone(),
            _ => "not associated".into(),
        }
    }
}

/// The EIP's state; a missing allocation is [`AwsError::AllocationNotFound`].
pub async fn observe(api: &Api, e: &EipConfig, dl: Deadline) -> Result<EipState, AwsError> {
    let out = api
        .ec2("DescribeAddresses", &e.allocation_id, dl, || {
            api.ec2
                .describe_addresses()
                .allocation_ids(&e.allocation_id)
                .send()
        })
        .await?;
    let a = out
        .addresses()
        .first()
        .ok_or_else(|| AwsError::AllocationNotFound(e.allocation_id.clone()))?;
    // An empty string means "none" (moto answers that way after a disassociation).
    let some = |v: Option<&str>| v.filter(|s| !s.is_empty()).map(str::to_string);
    Ok(EipState {
        public_ip: some(a.public_ip()),
        eni: some(a.network_interface_id()),
        private_ip: some(a.private_ip_address()),
        association_id: some(a.association_id()),
    })
}

async fn associate(
    api: &Api,
    e: &EipConfig,
    eni: &str,
    ip: Ipv4Addr,
    dl: Deadline,
    dry_run: bool,
) -> Result<(), AwsError> {
    api.ec2("AssociateAddress", &e.allocation_id, dl, || {
        api.ec2
            .associate_address()
            .allocation_id(&e.allocation_id)
            .network_interface_id(eni)
            .private_ip_address(ip.to_string())
            .allow_reassociation(true)
            .dry_run(dry_run)
            .send()
    })
    .await
    .map(drop)
}

/// Associates the EIP with `eni`/`ip` unless it already is, then verifies.
pub async fn activate(
    api: &Api,
    e: &EipConfig,
    eni: &str,
    ip: Ipv4Addr,
    dl: Deadline,
) -> ResourceReport {
    let start = Instant::now();
    let res = Resource::ElasticIp(e.allocation_id.clone());
    let outcome = async {
        let before = observe(api, e, dl).await?;
        if before.points_at(eni, ip) {
            return Ok(Outcome::Unchanged);
        }
        associate(api, e, eni, ip, dl, false).await?;
        let after = observe(api, e, dl).await?;
        if after.points_at(eni, ip) {
            Ok(Outcome::Applied(format!("{} {} -> {eni} ({ip})", after.public_ip.as_deref().unwrap_or("?"), before.describe())))
        } else {
            Ok(Outcome::Failed(format!("AssociateAddress succeeded but DescribeAddresses shows {} associated with {}, expected {eni} ({ip})", e.allocation_id, after.describe())))
        }
    }
    .await
    .unwrap_or_else(|err: AwsError| Outcome::Failed(err.to_string()));
    ResourceReport::new(res, outcome, start.elapsed())
}

/// Disassociates the EIP if configured and associated with this ENI.
pub async fn deactivate(
    api: &Api,
    e: &EipConfig,
    eni: &str,
    dl: Deadline,
) -> Option<ResourceReport> {
    if !e.disassociate_on_deactivate {
        return None;
    }
    let start = Instant::now();
    let outcome = async {
        let st = observe(api, e, dl).await?;
        match (&st.eni, &st.association_id) {
            (Some(x), Some(assoc)) if x == eni => {
                api.ec2("DisassociateAddress", &e.allocation_id, dl, || {
                    api.ec2.disassociate_address().association_id(assoc).send()
                })
                .await?;
                Ok(Outcome::Applied(format!("disassociated from {eni}")))
            }
            _ => Ok(Outcome::Unchanged),
        }
    }
    .await
    .unwrap_or_else(|err: AwsError| Outcome::Failed(err.to_string()));
    Some(ResourceReport::new(
        Resource::ElasticIp(e.allocation_id.clone()),
        outcome,
        start.elapsed(),
    ))
}

/// Monitor: the EIP still exists and is associated with this ENI.
pub async fn check(api: &Api, e: &EipConfig, eni: &str, ip: Ipv4Addr, dl: Deadline) -> Health {
    match observe(api, e, dl).await {
        Ok(st) if st.points_at(eni, ip) => Health::Ok,
        Ok(st) => Health::Drift(format!(
            "The EIP {} ({}) is associated with {}, expected {eni} ({ip})",
            e.allocation_id,
            st.public_ip.as_deref().unwrap_or("?"),
            st.describe()
        )),
        Err(AwsError::AllocationNotFound(id)) => Health::Drift(format!(
            "The EIP address does not exist (EIP ALLOCATION ID={id})"
        )),
        Err(err) if err.is_unobservable() => Health::Unknown(err.to_string()),
        Err(err) => Health::Drift(err.to_string()),
    }
}

/// Plan: the current association and, if it would change, AssociateAddress with DryRun.
pub async fn plan(
    api: &Api,
    e: &EipConfig,
    eni: &str,
    ip: Ipv4Addr,
    dl: Deadline,
) -> Result<PlannedChange, AwsError> {
    let st = observe(api, e, dl).await?;
    let (change, dry_run) = if st.points_at(eni, ip) {
        (None, DryRun::NotOffered)
    } else {
        let verdict = match associate(api, e, eni, ip, dl, true).await {
            Ok(()) => DryRun::WouldSucceed,
            Err(err) if err.code() == Some("DryRunOperation") => DryRun::WouldSucceed,
            Err(err) => DryRun::WouldFail(err.to_string()),
        };
        (
            Some("AssociateAddress(AllowReassociation=true)".to_string()),
            verdict,
        )
    };
    Ok(PlannedChange {
        resource: Resource::ElasticIp(e.allocation_id.clone()),
        current: format!(
            "{} -> {}",
            st.public_ip.as_deref().unwrap_or("?"),
            st.describe()
        ),
        desired: format!("{eni} ({ip})"),
        change,
        dry_run,
    })
}
