//! VIP route: a /32 outside the VPC CIDR routed to the active node's ENI in every route table of
//! the VPC that carries it (plus the tables listed in config, where it is created if missing).
//!
//! Invariants: tables are found with one `DescribeRouteTables` (filters `vpc-id` and
//! `route.destination-cidr-block`); all tables are switched in parallel, always targeting the
//! ENI (never the instance: that fails on multi-ENI instances); a replace on a missing route
//! (InvalidParameterValue or InvalidRoute.NotFound) falls back to CreateRoute; every table gets
//! its own outcome, and switched tables are verified with one more batched describe.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::time::Duration;

use aws_sdk_ec2::types::{Filter, Route, RouteState};
use futures_util::future::join_all;
use tokio::time::Instant;

use crate::cloud::aws::{Api, AwsError, Deadline};
use crate::cloud::{DryRun, Health, Outcome, PlannedChange, Resource, ResourceReport};
use crate::config::cloud::VipRouteConfig;

/// Where a table sends the VIP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteTarget {
    /// The table has no route for the VIP.
    Missing,
    /// An ENI; `blackhole` when AWS marks the route unusable (ENI detached or deleted).
    Eni {
        /// The ENI id.
        id: String,
        /// Route state is `blackhole`.
        blackhole: bool,
    },
    /// Something else (instance, gateway, NAT, peering): described.
    Other(String),
}

impl std::fmt::Display for RouteTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RouteTarget::Missing => f.write_str("no route"),
            RouteTarget::Eni {
                id,
                blackhole: false,
            } => f.write_str(id),
            RouteTarget::Eni {
                id,
                blackhole: true,
            } => write!(f, "{id} (blackhole)"),
            RouteTarget::Other(o) => f.write_str(o),
        }
    }
}

/// One route table and where it sends the VIP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableRoute {
    /// `rtb-...`.
    pub table: String,
    /// Where the VIP goes.
    pub target: RouteTarget,
}

/// What a table needs for the VIP to reach `eni`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Already routed to `eni` and usable.
    Nothing,
    /// A route exists but points elsewhere: ReplaceRoute.
    Replace,
    /// No route: CreateRoute.
    Create,
}

/// Pure decision: the step a table needs.
pub fn step_for(target: &RouteTarget, eni: &str) -> Step {
    match target {
        RouteTarget::Eni {
            id,
            blackhole: false,
        } if id == eni => Step::Nothing,
        RouteTarget::Missing => Step::Create,
        _ => Step::Replace,
    }
}

/// Whether `ip` lies in `cidr` (`a.b.c.d/n`); `None` when `cidr` does not parse.
pub fn cidr_contains(cidr: &str, ip: Ipv4Addr) -> Option<bool> {
    let (net, len) = cidr.split_once('/')?;
    let net: Ipv4Addr = net.parse().ok()?;
    let len: u32 = len.parse().ok()?;
    if len > 32 {
        return None;
    }
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    Some(u32::from(net) & mask == u32::from(ip) & mask)
}

fn target_of(route: &Route) -> RouteTarget {
    let blackhole = matches!(route.state(), Some(RouteState::Blackhole));
    if let Some(eni) = route.network_interface_id() {
        return RouteTarget::Eni {
            id: eni.to_string(),
            blackhole,
        };
    }
    let other = route
        .instance_id()
        .or(route.gateway_id())
        .or(route.nat_gateway_id())
        .or(route.vpc_peering_connection_id())
        .or(route.transit_gateway_id())
        .unwrap_or("an unknown target");
    RouteTarget::Other(other.to_string())
}

/// One `DescribeRouteTables`: every table of the VPC whose routes hold the VIP, plus the
/// `expected` tables (reported [`RouteTarget::Missing`] when they do not hold it), sorted by id.
pub async fn observe(
    api: &Api,
    v: &VipRouteConfig,
    expected: &BTreeSet<String>,
    dl: Deadline,
) -> Result<Vec<TableRoute>, AwsError> {
    let dest = v.destination();
    let out = api
        .ec2("DescribeRouteTables", &v.vpc_id, dl, || {
            api.ec2
                .describe_route_tables()
                .filters(Filter::builder().name("vpc-id").values(&v.vpc_id).build())
                .filters(
                    Filter::builder()
                        .name("route.destination-cidr-block")
                        .values(&dest)
                        .build(),
                )
                .send()
        })
        .await?;
    let mut found = std::collections::BTreeMap::new();
    for t in out.route_tables() {
        let Some(id) = t.route_table_id() else {
            continue;
        };
        let target = t
            .routes()
            .iter()
            .find(|r| r.destination_cidr_block() == Some(dest.as_str()))
            .map_or(RouteTarget::Missing, target_of);
        found.insert(id.to_string(), target);
    }
    for id in expected {
        found.entry(id.clone()).or_insert(RouteTarget::Missing);
    }
    Ok(found
        .into_iter()
        .map(|(table, target)| TableRoute { table, target })
        .collect())
}

fn missing_route(e: &AwsError) -> bool {
    matches!(
        e.code(),
        Some("InvalidParameterValue" | "InvalidRoute.NotFound")
    )
}

async fn replace(
    api: &Api,
    table: &str,
    dest: &str,
    eni: &str,
    dl: Deadline,
    dry_run: bool,
) -> Result<(), AwsError> {
    api.ec2("ReplaceRoute", table, dl, || {
        api.ec2
            .replace_route()
            .route_table_id(table)
            .destination_cidr_block(dest)
            .network_interface_id(eni)
            .dry_run(dry_run)
            .send()
    })
    .await
    .map(drop)
}

async fn create(
    api: &Api,
    table: &str,
    dest: &str,
    eni: &str,
    dl: Deadline,
    dry_run: bool,
) -> Result<(), AwsError> {
    api.ec2("CreateRoute", table, dl, || {
        api.ec2
            .create_route()
            .route_table_id(table)
            .destination_cidr_block(dest)
            .network_interface_id(eni)
            .dry_run(dry_run)
            .send()
    })
    .await
    .map(drop)
}

/// Makes one table route `dest` to `eni`, with the missing-route fallbacks.
async fn switch(
    api: &Api,
    table: &TableRoute,
    dest: &str,
    eni: &str,
    dl: Deadline,
) -> ResourceReport {
    let start = Instant::now();
    let step = step_for(&table.target, eni);
    let result = match step {
        Step::Nothing => Ok(None),
        Step::Replace => match replace(api, &table.table, dest, eni, dl, false).await {
            Err(e) if missing_route(&e) => create(api, &table.table, dest, eni, dl, false)
                .await
                .map(|()| Some("CreateRoute")),
            r => r.map(|()| Some("ReplaceRoute")),
        },
        Step::Create => match create(api, &table.table, dest, eni, dl, false).await {
            Err(e) if e.code() == Some("RouteAlreadyExists") => {
                replace(api, &table.table, dest, eni, dl, false)
                    .await
                    .map(|()| Some("ReplaceRoute"))
            }
            r => r.map(|()| Some("CreateRoute")),
        },
    };
    let outcome = match result {
        Ok(None) => Outcome::Unchanged,
        Ok(Some(call)) => Outcome::Applied(format!("{dest}: {} -> {eni} ({call})", table.target)),
        Err(e) => Outcome::Failed(e.to_string()),
    };
    ResourceReport::new(
        Resource::RouteTable(table.table.clone()),
        outcome,
        start.elapsed(),
    )
}

/// Switches `tables` to `eni` in parallel and verifies the switched ones with one describe.
pub async fn switch_all(
    api: &Api,
    v: &VipRouteConfig,
    tables: &[TableRoute],
    eni: &str,
    dl: Deadline,
) -> Vec<ResourceReport> {
    let dest = v.destination();
    let mut reports = join_all(tables.iter().map(|t| switch(api, t, &dest, eni, dl))).await;
    if !reports
        .iter()
        .any(|r| matches!(r.outcome, Outcome::Applied(_)))
    {
        return reports;
    }
    let switched: BTreeSet<String> = reports
        .iter()
        .filter(|r| matches!(r.outcome, Outcome::Applied(_)))
        .map(|r| table_id(&r.resource))
        .collect();
    let verify_start = Instant::now();
    let seen = observe(api, v, &switched, dl).await;
    for r in reports
        .iter_mut()
        .filter(|r| matches!(r.outcome, Outcome::Applied(_)))
    {
        let id = table_id(&r.resource);
        match &seen {
            Ok(seen) => match seen.iter().find(|t| t.table == id) {
                Some(t) if step_for(&t.target, eni) == Step::Nothing => {}
                Some(t) => {
                    r.outcome = Outcome::Failed(format!("The routing for VIP {} was changed: right after the switch {id} routes it to {}, expected {eni}", v.vip, t.target))
                }
                None => r.outcome = Outcome::Failed(format!("The routing for VIP {} was changed: {id} vanished right after the switch", v.vip)),
            },
            Err(e) => {
                if let Outcome::Applied(what) = &r.outcome {
                    r.outcome = Outcome::Applied(format!("{what}; not verified: {e}"));
                }
            }
        }
        r.elapsed += verify_start.elapsed();
    }
    reports
}

fn table_id(r: &Resource) -> String {
    match r {
        Resource::RouteTable(id) => id.clone(),
        other => other.to_string(),
    }
}

/// Activation: every table holding the VIP, every listed and every `known` table, to `eni`.
/// `known` gains every table seen.
pub async fn activate(
    api: &Api,
    v: &VipRouteConfig,
    eni: &str,
    known: &mut BTreeSet<String>,
    dl: Deadline,
) -> Vec<ResourceReport> {
    let start = Instant::now();
    let expected: BTreeSet<String> = v
        .route_tables
        .iter()
        .cloned()
        .chain(known.iter().cloned())
        .collect();
    let tables = match observe(api, v, &expected, dl).await {
        Ok(t) => t,
        Err(e) => return unobserved(v, &expected, &e, start.elapsed()),
    };
    known.extend(tables.iter().map(|t| t.table.clone()));
    switch_all(api, v, &tables, eni, dl).await
}

fn unobserved(
    v: &VipRouteConfig,
    expected: &BTreeSet<String>,
    e: &AwsError,
    elapsed: Duration,
) -> Vec<ResourceReport> {
    let why = format!(
        "route tables of {} holding {} could not be listed: {e}",
        v.vpc_id,
        v.destination()
    );
    if expected.is_empty() {
        return vec![ResourceReport::new(
            Resource::RouteTable(format!("{}:*", v.vpc_id)),
            Outcome::Failed(why),
            elapsed,
        )];
    }
    expected
        .iter()
        .map(|t| {
            ResourceReport::new(
                Resource::RouteTable(t.clone()),
                Outcome::Failed(why.clone()),
                elapsed,
            )
        })
        .collect()
}

/// Monitor: where each table sends the VIP, with the repair step for drifted ones.
pub async fn check(
    api: &Api,
    v: &VipRouteConfig,
    eni: &str,
    known: &BTreeSet<String>,
    dl: Deadline,
) -> Vec<(Resource, Health, Option<TableRoute>)> {
    let expected: BTreeSet<String> = v
        .route_tables
        .iter()
        .cloned()
        .chain(known.iter().cloned())
        .collect();
    match observe(api, v, &expected, dl).await {
        Ok(tables) => tables
            .into_iter()
            .map(|t| {
                let health = match (step_for(&t.target, eni), &t.target) {
                    (Step::Nothing, _) => Health::Ok,
                    (_, RouteTarget::Missing) => Health::Drift(format!("The routing for VIP {} was changed: {} no longer holds a route for {}", v.vip, t.table, v.destination())),
                    (_, target) => Health::Drift(format!("The routing for VIP {} was changed: {} routes it to {target}, expected {eni}", v.vip, t.table)),
                };
                (Resource::RouteTable(t.table.clone()), health, Some(t))
            })
            .collect(),
        Err(e) => {
            let health = if e.is_unobservable() { Health::Unknown(e.to_string()) } else { Health::Drift(e.to_string()) };
            let ids: Vec<String> = if expected.is_empty() { vec![format!("{}:*", v.vpc_id)] } else { expected.into_iter().collect() };
            ids.into_iter().map(|t| (Resource::RouteTable(t), health.clone(), None)).collect()
        }
    }
}

/// Plan: what activation would do to each table, each change checked with EC2's DryRun.
pub async fn plan(
    api: &Api,
    v: &VipRouteConfig,
    eni: &str,
    known: &BTreeSet<String>,
    dl: Deadline,
) -> Result<Vec<PlannedChange>, AwsError> {
    let expected: BTreeSet<String> = v
        .route_tables
        .iter()
        .cloned()
        .chain(known.iter().cloned())
        .collect();
    let tables = observe(api, v, &expected, dl).await?;
    let dest = v.destination();
    let dry = |t: &TableRoute, step: Step| {
        let dest = dest.clone();
        let table = t.table.clone();
        async move {
            let r = match step {
                Step::Replace => replace(api, &table, &dest, eni, dl, true).await,
                Step::Create => create(api, &table, &dest, eni, dl, true).await,
                Step::Nothing => return DryRun::NotOffered,
            };
            match r {
                Ok(()) => DryRun::WouldSucceed,
                Err(e) if e.code() == Some("DryRunOperation") => DryRun::WouldSucceed,
                Err(e) => DryRun::WouldFail(e.to_string()),
            }
        }
    };
    let verdicts = join_all(tables.iter().map(|t| dry(t, step_for(&t.target, eni)))).await;
    Ok(tables
        .iter()
        .zip(verdicts)
        .map(|(t, dry_run)| {
            let step = step_for(&t.target, eni);
            PlannedChange {
                resource: Resource::RouteTable(t.table.clone()),
                current: format!("{dest} -> {}", t.target),
                desired: format!("{dest} -> {eni}"),
                change: match step {
                    Step::Nothing => None,
                    Step::Replace => Some("ReplaceRoute".into()),
                    Step::Create => Some("CreateRoute".into()),
                },
                dry_run,
            }
        })
        .collect())
}

/// Preflight: the VIP lies outside every CIDR block of the VPC.
pub async fn preflight_vpc(
    api: &Api,
    v: &VipRouteConfig,
    dl: Deadline,
) -> Result<String, AwsError> {
    let out = api
        .ec2("DescribeVpcs", &v.vpc_id, dl, || {
            api.ec2.describe_vpcs().vpc_ids(&v.vpc_id).send()
        })
        .await?;
    let vpc = out
        .vpcs()
        .first()
        .ok_or_else(|| AwsError::VpcNotFound(v.vpc_id.clone()))?;
    let mut cidrs: Vec<String> = vpc
        .cidr_block_association_set()
        .iter()
        .filter_map(|a| a.cidr_block().map(str::to_string))
        .collect();
    if let Some(c) = vpc.cidr_block() {
        if !cidrs.iter().any(|x| x == c) {
            cidrs.push(c.to_string());
        }
    }
    for c in &cidrs {
        if cidr_contains(c, v.vip) == Some(true) {
            return Err(AwsError::VipInsideVpc {
                vip: v.vip.to_string(),
                cidr: c.clone(),
                vpc: v.vpc_id.clone(),
            });
        }
    }
    Ok(format!(
        "VIP {} is outside {} ({})",
        v.vip,
        v.vpc_id,
        cidrs.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn blackhole_route_to_own_eni_is_replaced() {
        assert_eq!(
            step_for(
                &RouteTarget::Eni {
                    id: "eni-a".into(),
                    blackhole: true
                },
                "eni-a"
            ),
            Step::Replace
        );
        assert_eq!(
            step_for(
                &RouteTarget::Eni {
                    id: "eni-a".into(),
                    blackhole: false
                },
                "eni-a"
            ),
            Step::Nothing
        );
        assert_eq!(
            step_for(
                &RouteTarget::Eni {
                    id: "eni-b".into(),
                    blackhole: false
                },
                "eni-a"
            ),
            Step::Replace
        );
        assert_eq!(
            step_for(&RouteTarget::Other("i-1".into()), "eni-a"),
            Step::Replace
        );
        assert_eq!(step_for(&RouteTarget::Missing, "eni-a"), Step::Create);
    }

    #[test]
    fn cidr_membership() {
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        assert_eq!(cidr_contains("10.0.0.0/16", ip("10.0.255.1")), Some(true));
        assert_eq!(cidr_contains("10.0.0.0/16", ip("10.1.0.1")), Some(false));
        assert_eq!(cidr_contains("0.0.0.0/0", ip("1.2.3.4")), Some(true));
        assert_eq!(cidr_contains("10.0.0.0/33", ip("10.0.0.1")), None);
        assert_eq!(cidr_contains("garbage", ip("10.0.0.1")), None);
    }

    proptest! {
        #[test]
        fn an_address_is_in_its_own_slash_n(a in any::<u32>(), n in 0u32..=32) {
            let ip = Ipv4Addr::from(a);
            let mask = if n == 0 { 0 } else { u32::MAX << (32 - n) };
            let net = Ipv4Addr::from(a & mask);
            prop_assert_eq!(cidr_contains(&format!("{net}/{n}"), ip), Some(true));
        }

        #[test]
        fn cidr_parser_never_panics(s in ".{0,24}", a in any::<u32>()) {
            let _ = cidr_contains(&s, Ipv4Addr::from(a));
        }
    }
}
