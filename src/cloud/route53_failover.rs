//! Route 53 failover routing (`mode = "failover-routing"`): each node owns one failover A
//! record (PRIMARY or SECONDARY) tied to a Route 53 health check of its own health endpoint.
//! Route 53's data plane then answers with the healthy node, with no control-plane call at
//! failover time.
//!
//! Invariants: a node only writes its own record (set identifier `twinvol-primary` or
//! `twinvol-secondary`) and its own health check (found by a stable caller reference, so
//! repeated activations never create a second one); a record and health check that already
//! match are not touched; the record's value, TTL and health-check id are verified by the monitor.

use std::net::Ipv4Addr;
use std::time::Duration;

use aws_sdk_route53::types::{
    Change, ChangeAction, ChangeBatch, ChangeStatus, HealthCheckConfig, HealthCheckType,
    ResourceRecord, ResourceRecordSet, ResourceRecordSetFailover, RrType,
};
use tokio::time::Instant;

use crate::cloud::aws::{Api, AwsError, Deadline};
use crate::cloud::{DryRun, Health, Outcome, PlannedChange, Resource, ResourceReport};
use crate::config::cloud::{FailoverConfig, FailoverRole, RecordConfig};

fn role_name(role: FailoverRole) -> &'static str {
    match role {
        FailoverRole::Primary => "PRIMARY",
        FailoverRole::Secondary => "SECONDARY",
    }
}

/// The set identifier of a node's failover record.
pub fn set_identifier(role: FailoverRole) -> String {
    format!("twinvol-{}", role_name(role).to_ascii_lowercase())
}

/// The caller reference of a node's health check: stable per zone, name and role, at most 64 bytes.
pub fn caller_reference(r: &RecordConfig, role: FailoverRole) -> String {
    let mut h = crc32fast::Hasher::new();
    h.update(r.zone().as_bytes());
    h.update(b"/");
    h.update(r.name.as_bytes());
    format!(
        "twinvol-{}-{:08x}",
        role_name(role).to_ascii_lowercase(),
        h.finalize()
    )
}

fn resource(r: &RecordConfig, role: FailoverRole) -> Resource {
    Resource::DnsRecord(format!("{} A {} in {}", r.name, role_name(role), r.zone()))
}

/// A health check as found: id, probed address, port, path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundCheck {
    /// Health check id.
    pub id: String,
    /// Probed address.
    pub ip: Option<String>,
    /// Probed port.
    pub port: Option<i32>,
    /// Probed path.
    pub path: Option<String>,
}

/// This node's health check, found by caller reference (paging through `ListHealthChecks`).
pub async fn find_health_check(
    api: &Api,
    reference: &str,
    dl: Deadline,
) -> Result<Option<FoundCheck>, AwsError> {
    let mut marker: Option<String> = None;
    for _ in 0..50 {
        let m = marker.clone();
        let out = api
            .route53("ListHealthChecks", reference, dl, || {
                api.route53
                    .list_health_checks()
                    .set_marker(m.clone())
                    .send()
            })
            .await?;
        if let Some(hc) = out
            .health_checks()
            .iter()
            .find(|h| h.caller_reference() == reference)
        {
            let c = hc.health_check_config();
            return Ok(Some(FoundCheck {
                id: hc.id().to_string(),
                ip: c.and_then(|c| c.ip_address()).map(str::to_string),
                port: c.and_then(|c| c.port()),
                path: c.and_then(|c| c.resource_path()).map(str::to_string),
            }));
        }
        match out.next_marker() {
            Some(n) if out.is_truncated() => marker = Some(n.to_string()),
            _ => return Ok(None),
        }
    }
    Ok(None)
}

/// Creates or updates this node's health check; returns its id and whether it changed.
async fn ensure_health_check(
    api: &Api,
    r: &RecordConfig,
    fo: &FailoverConfig,
    ip: Ipv4Addr,
    dl: Deadline,
) -> Result<(String, bool), AwsError> {
    let reference = caller_reference(r, fo.role);
    let probe_ip = fo.health_ip.unwrap_or(ip).to_string();
    match find_health_check(api, &reference, dl).await? {
        Some(found)
            if found.ip.as_deref() == Some(probe_ip.as_str())
                && found.port == Some(i32::from(fo.health_port))
                && found.path.as_deref() == Some(fo.health_path.as_str()) =>
        {
            Ok((found.id, false))
        }
        Some(found) => {
            api.route53("UpdateHealthCheck", &found.id, dl, || {
                api.route53
                    .update_health_check()
                    .health_check_id(&found.id)
                    .ip_address(&probe_ip)
                    .port(i32::from(fo.health_port))
                    .resource_path(&fo.health_path)
                    .failure_threshold(fo.failure_threshold)
                    .send()
            })
            .await?;
            Ok((found.id, true))
        }
        None => {
            let config = HealthCheckConfig::builder()
                .r#type(HealthCheckType::Http)
                .ip_address(&probe_ip)
                .port(i32::from(fo.health_port))
                .resource_path(&fo.health_path)
                .request_interval(fo.request_interval_s)
                .failure_threshold(fo.failure_threshold)
                .build()
                .map_err(|e| AwsError::Unexpected {
                    action: "CreateHealthCheck",
                    resource: reference.clone(),
                    detail: e.to_string(),
                })?;
            let out = api
                .route53("CreateHealthCheck", &reference, dl, || {
                    api.route53
                        .create_health_check()
                        .caller_reference(&reference)
                        .health_check_config(config.clone())
                        .send()
                })
                .await?;
            let id = out
                .health_check()
                .map(|h| h.id().to_string())
                .ok_or_else(|| AwsError::Unexpected {
                    action: "CreateHealthCheck",
                    resource: reference.clone(),
                    detail: "no HealthCheck in the answer".into(),
                })?;
            Ok((id, true))
        }
    }
}

/// This node's failover record as Route 53 holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailoverRecord {
    /// TTL.
    pub ttl: Option<i64>,
    /// Values.
    pub values: Vec<String>,
    /// PRIMARY or SECONDARY.
    pub failover: Option<String>,
    /// Tied health check.
    pub health_check_id: Option<String>,
}

/// Reads this node's failover record (one `ListResourceRecordSets`).
pub async fn observe(
    api: &Api,
    r: &RecordConfig,
    role: FailoverRole,
    dl: Deadline,
) -> Result<Option<FailoverRecord>, AwsError> {
    let zone = r.zone();
    let sid = set_identifier(role);
    let out = api
        .route53("ListResourceRecordSets", zone, dl, || {
            api.route53
                .list_resource_record_sets()
                .hosted_zone_id(zone)
                .start_record_name(&r.name)
                .start_record_type(RrType::A)
                .max_items(20)
                .send()
        })
        .await?;
    let same_name = |a: &str| {
        a.trim_end_matches('.')
            .eq_ignore_ascii_case(r.name.trim_end_matches('.'))
    };
    Ok(out
        .resource_record_sets()
        .iter()
        .find(|s| {
            same_name(s.name())
                && *s.r#type() == RrType::A
                && s.set_identifier() == Some(sid.as_str())
        })
        .map(|s| FailoverRecord {
            ttl: s.ttl(),
            values: s
                .resource_records()
                .iter()
                .map(|v| v.value().to_string())
                .collect(),
            failover: s.failover().map(|f| f.as_str().to_string()),
            health_check_id: s.health_check_id().map(str::to_string),
        }))
}

fn matches(
    rec: &FailoverRecord,
    r: &RecordConfig,
    role: FailoverRole,
    ip: Ipv4Addr,
    hc: &str,
) -> bool {
    rec.ttl == Some(r.ttl)
        && rec.values == [ip.to_string()]
        && rec.failover.as_deref() == Some(role_name(role))
        && rec.health_check_id.as_deref() == Some(hc)
}

/// Ensures this node's health check and failover record, then waits (bounded) for INSYNC.
pub async fn activate(
    api: &Api,
    r: &RecordConfig,
    fo: &FailoverConfig,
    ip: Ipv4Addr,
    dl: Deadline,
) -> ResourceReport {
    let start = Instant::now();
    let mut report = ResourceReport::new(resource(r, fo.role), Outcome::Unchanged, Duration::ZERO);
    let result = async {
        let (hc, hc_changed) = ensure_health_check(api, r, fo, ip, dl).await?;
        let before = observe(api, r, fo.role, dl).await?;
        if !hc_changed
            && before
                .as_ref()
                .is_some_and(|b| matches(b, r, fo.role, ip, &hc))
        {
            return Ok(());
        }
        let unexpected = |e: aws_sdk_route53::error::BuildError| AwsError::Unexpected {
            action: "ChangeResourceRecordSets",
            resource: r.name.clone(),
            detail: e.to_string(),
        };
        let set = ResourceRecordSet::builder()
            .name(&r.name)
            .r#type(RrType::A)
            .ttl(r.ttl)
            .set_identifier(set_identifier(fo.role))
            .failover(match fo.role {
                FailoverRole::Primary => ResourceRecordSetFailover::Primary,
                FailoverRole::Secondary => ResourceRecordSetFailover::Secondary,
            })
            .health_check_id(&hc)
            .resource_records(
                ResourceRecord::builder()
                    .value(ip.to_string())
                    .build()
                    .map_err(unexpected)?,
            )
            .build()
            .map_err(unexpected)?;
        let batch = ChangeBatch::builder()
            .comment("twinvol failover record")
            .changes(
                Change::builder()
                    .action(ChangeAction::Upsert)
                    .resource_record_set(set)
                    .build()
                    .map_err(unexpected)?,
            )
            .build()
            .map_err(unexpected)?;
        let zone = r.zone();
        let out = api
            .route53("ChangeResourceRecordSets", zone, dl, || {
                api.route53
                    .change_resource_record_sets()
                    .hosted_zone_id(zone)
                    .change_batch(batch.clone())
                    .send()
            })
            .await?;
        let info = out.change_info().ok_or_else(|| AwsError::Unexpected {
            action: "ChangeResourceRecordSets",
            resource: r.name.clone(),
            detail: "no ChangeInfo".into(),
        })?;
        report.outcome = Outcome::Applied(format!(
            "UPSERT {} {} -> {ip} with health check {hc} (http://{}:{}{})",
            role_name(fo.role),
            set_identifier(fo.role),
            fo.health_ip.unwrap_or(ip),
            fo.health_port,
            fo.health_path
        ));
        let insync = *info.status() == ChangeStatus::Insync;
        report.propagation = Some(super::route53::propagation(api, r, info.id(), insync, dl).await);
        Ok::<(), AwsError>(())
    }
    .await;
    if let Err(e) = result {
        report.outcome = Outcome::Failed(e.to_string());
    }
    report.elapsed = start.elapsed();
    report
}

/// Monitor: the health check exists and the record holds this node's value, role and check.
pub async fn check(
    api: &Api,
    r: &RecordConfig,
    fo: &FailoverConfig,
    ip: Ipv4Addr,
    dl: Deadline,
) -> (Resource, Health) {
    let res = resource(r, fo.role);
    let observed = async {
        let hc = find_health_check(api, &caller_reference(r, fo.role), dl).await?;
        let rec = observe(api, r, fo.role, dl).await?;
        Ok::<_, AwsError>((hc, rec))
    }
    .await;
    let health = match observed {
        Err(e) if e.is_unobservable() => Health::Unknown(e.to_string()),
        Err(e) => Health::Drift(e.to_string()),
        Ok((None, _)) => Health::Drift(format!(
            "the Route 53 health check of {} {} does not exist (caller reference {})",
            r.name,
            role_name(fo.role),
            caller_reference(r, fo.role)
        )),
        Ok((_, None)) => Health::Drift(format!(
            "The resource record set in Amazon Route 53 does not exist: {} A {} ({})",
            r.name,
            role_name(fo.role),
            set_identifier(fo.role)
        )),
        Ok((Some(_), Some(rec))) if rec.values != [ip.to_string()] => Health::Drift(format!(
            "IP address different from the setting is registered: {} {} holds {}, expected {ip}",
            r.name,
            role_name(fo.role),
            rec.values.join(",")
        )),
        Ok((Some(hc), Some(rec))) if rec.health_check_id.as_deref() != Some(hc.id.as_str()) => {
            Health::Drift(format!(
                "{} {} is tied to health check {}, expected {}",
                r.name,
                role_name(fo.role),
                rec.health_check_id.as_deref().unwrap_or("none"),
                hc.id
            ))
        }
        Ok(_) => Health::Ok,
    };
    (res, health)
}

/// Plan: this node's record and health check now, and what activation would write.
pub async fn plan(
    api: &Api,
    r: &RecordConfig,
    fo: &FailoverConfig,
    ip: Ipv4Addr,
    dl: Deadline,
) -> Result<PlannedChange, AwsError> {
    let hc = find_health_check(api, &caller_reference(r, fo.role), dl).await?;
    let rec = observe(api, r, fo.role, dl).await?;
    let current = match (&hc, &rec) {
        (_, None) => "absent".to_string(),
        (_, Some(x)) => format!(
            "{} TTL {} check {}",
            x.values.join(","),
            x.ttl.unwrap_or(0),
            x.health_check_id.as_deref().unwrap_or("none")
        ),
    };
    let probe = fo.health_ip.unwrap_or(ip).to_string();
    let check_ok = hc.as_ref().is_some_and(|h| {
        h.ip.as_deref() == Some(probe.as_str())
            && h.port == Some(i32::from(fo.health_port))
            && h.path.as_deref() == Some(fo.health_path.as_str())
    });
    let same = check_ok
        && rec
            .as_ref()
            .zip(hc.as_ref())
            .is_some_and(|(x, h)| matches(x, r, fo.role, ip, &h.id));
    let change = match (&hc, same) {
        (_, true) => None,
        (None, false) => Some("CreateHealthCheck + ChangeResourceRecordSets UPSERT".to_string()),
        (Some(_), false) if !check_ok => {
            Some("UpdateHealthCheck + ChangeResourceRecordSets UPSERT".to_string())
        }
        (Some(_), false) => Some("ChangeResourceRecordSets UPSERT".to_string()),
    };
    Ok(PlannedChange {
        resource: resource(r, fo.role),
        current,
        desired: format!(
            "{ip} TTL {} {} checked at http://{probe}:{}{}",
            r.ttl,
            role_name(fo.role),
            fo.health_port,
            fo.health_path
        ),
        change,
        dry_run: DryRun::NotOffered,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(name: &str) -> RecordConfig {
        toml::from_str(&format!("zone_id = \"Z1\"\nname = \"{name}\"")).unwrap()
    }

    #[test]
    fn caller_reference_is_stable_short_and_distinct_per_role_and_name() {
        let a = rec("db.example.internal.");
        let p = caller_reference(&a, FailoverRole::Primary);
        assert_eq!(p, caller_reference(&a, FailoverRole::Primary));
        assert_ne!(p, caller_reference(&a, FailoverRole::Secondary));
        assert_ne!(
            p,
            caller_reference(&rec("db2.example.internal."), FailoverRole::Primary)
        );
        let long = rec(&format!("{}.example.", "a".repeat(60)));
        assert!(caller_reference(&long, FailoverRole::Secondary).len() <= 64);
    }
}
