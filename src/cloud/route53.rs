//! Route 53: an A record pointing at the active node (its IP, the VIP or the EIP).
//!
//! Invariants: the record is written with one UPSERT (never a delete-then-create gap); the
//! change is reported "applied" as soon as Route 53 accepts it and "propagated" separately,
//! after a bounded poll of `GetChange` (interval and total from config, never longer than the
//! activation deadline); a record already holding the value and TTL is not touched; deletion on
//! deactivate only removes a record that holds this node's value.

use std::net::Ipv4Addr;
use std::time::Duration;

use aws_sdk_route53::types::{
    Change, ChangeAction, ChangeBatch, ChangeStatus, ResourceRecord, ResourceRecordSet, RrType,
};
use tokio::time::Instant;

use crate::cloud::aws::{Api, AwsError, Deadline};
use crate::cloud::route53_failover as failover;
use crate::cloud::{DryRun, Health, Outcome, PlannedChange, Propagation, Resource, ResourceReport};
use crate::config::cloud::{FailoverConfig, RecordConfig, RecordMode};

/// The failover side of `r` when it is in failover-routing mode.
fn failover_of(r: &RecordConfig) -> Option<&FailoverConfig> {
    r.failover
        .as_ref()
        .filter(|_| r.mode == RecordMode::FailoverRouting)
}

/// The observed A record: TTL and values; `None` when the record does not exist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordState {
    /// TTL in seconds.
    pub ttl: Option<i64>,
    /// The addresses.
    pub values: Vec<String>,
}

impl RecordState {
    /// True when the record holds exactly `ip` with `ttl`.
    pub fn is(&self, ip: Ipv4Addr, ttl: i64) -> bool {
        self.ttl == Some(ttl) && self.values.len() == 1 && self.values[0] == ip.to_string()
    }
}

fn resource(r: &RecordConfig) -> Resource {
    Resource::DnsRecord(format!("{} A in {}", r.name, r.zone()))
}

/// Route 53 answers names with `\052` for `*` and keeps case as stored; compare normalised.
fn same_name(a: &str, b: &str) -> bool {
    let norm = |s: &str| {
        s.replace("\\052", "*")
            .trim_end_matches('.')
            .to_ascii_lowercase()
    };
    norm(a) == norm(b)
}

/// The record as Route 53 holds it (one `ListResourceRecordSets`).
pub async fn observe(
    api: &Api,
    r: &RecordConfig,
    dl: Deadline,
) -> Result<Option<RecordState>, AwsError> {
    let zone = r.zone();
    let out = api
        .route53("ListResourceRecordSets", zone, dl, || {
            api.route53
                .list_resource_record_sets()
                .hosted_zone_id(zone)
                .start_record_name(&r.name)
                .start_record_type(RrType::A)
                .max_items(1)
                .send()
        })
        .await?;
    Ok(out
        .resource_record_sets()
        .iter()
        .find(|s| same_name(s.name(), &r.name) && *s.r#type() == RrType::A)
        .map(|s| RecordState {
            ttl: s.ttl(),
            values: s
                .resource_records()
                .iter()
                .map(|v| v.value().to_string())
                .collect(),
        }))
}

fn record_set(
    r: &RecordConfig,
    ttl: Option<i64>,
    values: &[String],
) -> Result<ResourceRecordSet, AwsError> {
    let unexpected = |e: aws_sdk_route53::error::BuildError| AwsError::Unexpected {
        action: "ChangeResourceRecordSets",
        resource: r.name.clone(),
        detail: e.to_string(),
    };
    let mut b = ResourceRecordSet::builder()
        .name(&r.name)
        .r#type(RrType::A)
        .set_ttl(ttl);
    for v in values {
        b = b.resource_records(
            ResourceRecord::builder()
                .value(v)
                .build()
                .map_err(unexpected)?,
        );
    }
    b.build().map_err(unexpected)
}

async fn change(
    api: &Api,
    r: &RecordConfig,
    action: ChangeAction,
    set: ResourceRecordSet,
    dl: Deadline,
) -> Result<(String, bool), AwsError> {
    let zone = r.zone();
    let unexpected = |detail: String| AwsError::Unexpected {
        action: "ChangeResourceRecordSets",
        resource: r.name.clone(),
        detail,
    };
    let batch = ChangeBatch::builder()
        .comment("twinvol")
        .changes(
            Change::builder()
                .action(action)
                .resource_record_set(set)
                .build()
                .map_err(|e| unexpected(e.to_string()))?,
        )
        .build()
        .map_err(|e| unexpected(e.to_string()))?;
    let out = api
        .route53("ChangeResourceRecordSets", zone, dl, || {
            api.route53
                .change_resource_record_sets()
                .hosted_zone_id(zone)
                .change_batch(batch.clone())
                .send()
        })
        .await?;
    let info = out
        .change_info()
        .ok_or_else(|| unexpected("no ChangeInfo in the answer".into()))?;
    Ok((
        info.id().to_string(),
        *info.status() == ChangeStatus::Insync,
    ))
}

/// Polls `GetChange` every `interval` until INSYNC, `total` has passed, or `dl` is near.
pub async fn wait_insync(
    api: &Api,
    change_id: &str,
    interval: Duration,
    total: Duration,
    dl: Deadline,
) -> Result<Propagation, AwsError> {
    let start = Instant::now();
    let give_up = (start + total).min(dl.at);
    loop {
        let now = Instant::now();
        if now >= give_up {
            return Ok(Propagation::Pending {
                waited: start.elapsed(),
            });
        }
        tokio::time::sleep(interval.min(give_up - now)).await;
        let out = api
            .route53("GetChange", change_id, dl, || {
                api.route53.get_change().id(change_id).send()
            })
            .await?;
        if out
            .change_info()
            .is_some_and(|i| *i.status() == ChangeStatus::Insync)
        {
            return Ok(Propagation::InSync {
                after: start.elapsed(),
            });
        }
    }
}

/// How far a change accepted just now has propagated: INSYNC at once, or after a bounded wait.
/// A failed GetChange is reported as not yet propagated (the change itself is in).
pub async fn propagation(
    api: &Api,
    r: &RecordConfig,
    change_id: &str,
    insync: bool,
    dl: Deadline,
) -> Propagation {
    let upserted = Instant::now();
    if insync {
        return Propagation::InSync {
            after: upserted.elapsed(),
        };
    }
    match wait_insync(api, change_id, r.poll_interval(), r.insync_timeout(), dl).await {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(record = %r.name, error = %e, "GetChange failed; propagation unknown");
            Propagation::Pending {
                waited: upserted.elapsed(),
            }
        }
    }
}

/// UPSERTs the record to `ip` unless it already holds it, then waits (bounded) for INSYNC.
pub async fn activate(api: &Api, r: &RecordConfig, ip: Ipv4Addr, dl: Deadline) -> ResourceReport {
    if let Some(fo) = failover_of(r) {
        return failover::activate(api, r, fo, ip, dl).await;
    }
    let start = Instant::now();
    let mut report = ResourceReport::new(resource(r), Outcome::Unchanged, Duration::ZERO);
    let result = async {
        let before = observe(api, r, dl).await?;
        if before.as_ref().is_some_and(|b| b.is(ip, r.ttl)) {
            return Ok(());
        }
        let (id, insync) = change(
            api,
            r,
            ChangeAction::Upsert,
            record_set(r, Some(r.ttl), &[ip.to_string()])?,
            dl,
        )
        .await?;
        let was = before.map_or("absent".to_string(), |b| b.values.join(","));
        report.outcome = Outcome::Applied(format!("UPSERT {was} -> {ip} TTL {} ({id})", r.ttl));
        report.propagation = Some(propagation(api, r, &id, insync, dl).await);
        Ok::<(), AwsError>(())
    }
    .await;
    if let Err(e) = result {
        report.outcome = Outcome::Failed(e.to_string());
    }
    report.elapsed = start.elapsed();
    report
}

/// Deletes the record if configured and it holds `ip`.
pub async fn deactivate(
    api: &Api,
    r: &RecordConfig,
    ip: Ipv4Addr,
    dl: Deadline,
) -> Option<ResourceReport> {
    if failover_of(r).is_some() {
        // Failover records stay: the health check turns unhealthy when this node is not Primary.
        return None;
    }
    if !r.delete_on_deactivate {
        return None;
    }
    let start = Instant::now();
    let outcome = async {
        match observe(api, r, dl).await? {
            Some(st) if st.values.iter().any(|v| *v == ip.to_string()) => {
                change(
                    api,
                    r,
                    ChangeAction::Delete,
                    record_set(r, st.ttl, &st.values)?,
                    dl,
                )
                .await?;
                Ok(Outcome::Applied(format!(
                    "deleted {} -> {}",
                    r.name,
                    st.values.join(",")
                )))
            }
            _ => Ok(Outcome::Unchanged),
        }
    }
    .await
    .unwrap_or_else(|e: AwsError| Outcome::Failed(e.to_string()));
    Some(ResourceReport::new(resource(r), outcome, start.elapsed()))
}

/// Monitor: the record exists and holds `ip`.
pub async fn check(api: &Api, r: &RecordConfig, ip: Ipv4Addr, dl: Deadline) -> (Resource, Health) {
    if let Some(fo) = failover_of(r) {
        return failover::check(api, r, fo, ip, dl).await;
    }
    let health = match observe(api, r, dl).await {
        Ok(Some(st)) if st.values.len() == 1 && st.values[0] == ip.to_string() => Health::Ok,
        Ok(Some(st)) => Health::Drift(format!(
            "IP address different from the setting is registered: {} holds {}, expected {ip}",
            r.name,
            st.values.join(",")
        )),
        Ok(None) => Health::Drift(format!(
            "The resource record set in Amazon Route 53 does not exist: {} A in {}",
            r.name,
            r.zone()
        )),
        Err(e) if e.is_unobservable() => Health::Unknown(e.to_string()),
        Err(e) => Health::Drift(e.to_string()),
    };
    (resource(r), health)
}

/// Plan: the record now and the UPSERT activation would make (Route 53 has no dry run).
pub async fn plan(
    api: &Api,
    r: &RecordConfig,
    ip: Ipv4Addr,
    dl: Deadline,
) -> Result<PlannedChange, AwsError> {
    if let Some(fo) = failover_of(r) {
        return failover::plan(api, r, fo, ip, dl).await;
    }
    let st = observe(api, r, dl).await?;
    let current = st.as_ref().map_or("absent".into(), |s| {
        format!("{} TTL {}", s.values.join(","), s.ttl.unwrap_or(0))
    });
    let same = st.as_ref().is_some_and(|s| s.is(ip, r.ttl));
    Ok(PlannedChange {
        resource: resource(r),
        current,
        desired: format!("{ip} TTL {}", r.ttl),
        change: (!same).then(|| "ChangeResourceRecordSets UPSERT".to_string()),
        dry_run: DryRun::NotOffered,
    })
}

/// Preflight: the hosted zone exists and can be read.
pub async fn preflight(api: &Api, r: &RecordConfig, dl: Deadline) -> Result<String, AwsError> {
    let zone = r.zone();
    let out = api
        .route53("GetHostedZone", zone, dl, || {
            api.route53.get_hosted_zone().id(zone).send()
        })
        .await?;
    let hz = out
        .hosted_zone()
        .ok_or_else(|| AwsError::HostedZoneNotFound(zone.to_string()))?;
    let zone_name = hz.name();
    if !same_name(&r.name, zone_name)
        && !r
            .name
            .trim_end_matches('.')
            .ends_with(&format!(".{}", zone_name.trim_end_matches('.')))
    {
        return Err(AwsError::Unexpected {
            action: "GetHostedZone",
            resource: zone.to_string(),
            detail: format!(
                "record {} is not inside the zone {zone_name}; fix cloud.route53 name or zone_id",
                r.name
            ),
        });
    }
    let private = hz.config().is_some_and(|c| c.private_zone());
    Ok(format!(
        "zone {zone} ({zone_name}, {}) holds {}",
        if private { "private" } else { "public" },
        r.name
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_compare_without_case_trailing_dot_or_escaped_star() {
        assert!(same_name("db.example.internal.", "DB.example.internal"));
        assert!(same_name("\\052.svc.example.", "*.svc.example."));
        assert!(!same_name("db.example.", "db2.example."));
    }

    #[test]
    fn record_state_matches_only_single_value_and_ttl() {
        let ip = Ipv4Addr::new(10, 0, 0, 1);
        assert!(RecordState {
            ttl: Some(30),
            values: vec!["10.0.0.1".into()]
        }
        .is(ip, 30));
        assert!(!RecordState {
            ttl: Some(60),
            values: vec!["10.0.0.1".into()]
        }
        .is(ip, 30));
        assert!(!RecordState {
            ttl: Some(30),
            values: vec!["10.0.0.1".into(), "10.0.0.2".into()]
        }
        .is(ip, 30));
    }
}
