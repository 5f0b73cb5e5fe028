//! `cloud`: the active node's network identity (VIP routes, Elastic IP, DNS record) and fencing
//! of the peer, behind the small [`Cloud`] trait the cluster core calls.
//!
//! Every call returns a typed report with one entry per resource (a route table, an EIP, a
//! record, the peer instance): a partial switch is visible table by table, never hidden behind
//! one error. Only [`aws`] exists as a provider; it is split by resource into [`vip_route`],
//! [`eip`], [`route53`], [`az`] and [`fence`], which share the client and deadline policy of
//! [`aws::api`].

use std::fmt;
use std::future::Future;
use std::time::Duration;

use serde::Serialize;

pub use crate::config::cloud::UnreachableAction;

pub mod aws;
pub mod az;
pub mod cli;
pub mod dns_wire;
pub mod eip;
pub mod fence;
pub mod lab;
pub mod resolve;
pub mod route53;
pub mod route53_failover;
pub mod vip_route;

/// One cloud resource a report speaks about.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(tag = "kind", content = "id", rename_all = "kebab-case")]
pub enum Resource {
    /// A VPC route table carrying the VIP route (`rtb-...`).
    RouteTable(String),
    /// An Elastic IP (`eipalloc-...`).
    ElasticIp(String),
    /// A DNS record (`name.` in zone).
    DnsRecord(String),
    /// An availability zone (`eu-west-1a`).
    AvailabilityZone(String),
    /// An EC2 instance (`i-...`), e.g. the fenced peer.
    Instance(String),
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Resource::RouteTable(id) => write!(f, "route table {id}"),
            Resource::ElasticIp(id) => write!(f, "Elastic IP {id}"),
            Resource::DnsRecord(id) => write!(f, "DNS record {id}"),
            Resource::AvailabilityZone(id) => write!(f, "availability zone {id}"),
            Resource::Instance(id) => write!(f, "instance {id}"),
        }
    }
}

/// What happened to one resource in an activation, deactivation, repair or fencing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", content = "detail", rename_all = "kebab-case")]
pub enum Outcome {
    /// The resource was changed and the change was verified; the text says what changed.
    Applied(String),
    /// The resource already was in the wanted state; nothing was changed.
    Unchanged,
    /// The change failed; the text is the classified error, naming the resource and the fix.
    Failed(String),
}

/// Whether a DNS change has reached every authoritative server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum Propagation {
    /// INSYNC was seen after this long.
    InSync {
        /// Time from the change to INSYNC.
        #[serde(with = "millis")]
        after: Duration,
    },
    /// Still PENDING when the bounded wait ended (or waiting was switched off).
    Pending {
        /// How long was waited.
        #[serde(with = "millis")]
        waited: Duration,
    },
}

/// The outcome of one resource, with its wall-clock cost.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ResourceReport {
    /// What.
    pub resource: Resource,
    /// What happened.
    pub outcome: Outcome,
    /// For DNS changes: propagation, reported apart from the change itself.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub propagation: Option<Propagation>,
    /// Time spent on this resource.
    #[serde(with = "millis")]
    pub elapsed: Duration,
}

impl ResourceReport {
    /// A report without propagation information.
    pub fn new(resource: Resource, outcome: Outcome, elapsed: Duration) -> Self {
        Self {
            resource,
            outcome,
            propagation: None,
            elapsed,
        }
    }
    /// True unless the outcome is [`Outcome::Failed`].
    pub fn succeeded(&self) -> bool {
        !matches!(self.outcome, Outcome::Failed(_))
    }
}

impl fmt::Display for ResourceReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.outcome {
            Outcome::Applied(what) => write!(f, "{}: applied ({what})", self.resource)?,
            Outcome::Unchanged => write!(f, "{}: unchanged", self.resource)?,
            Outcome::Failed(why) => write!(f, "{}: FAILED: {why}", self.resource)?,
        }
        match &self.propagation {
            Some(Propagation::InSync { after }) => {
                write!(f, "; propagated (INSYNC after {} ms)", after.as_millis())?
            }
            Some(Propagation::Pending { waited }) => write!(
                f,
                "; not yet propagated (PENDING after {} ms)",
                waited.as_millis()
            )?,
            None => {}
        }
        write!(f, " [{} ms]", self.elapsed.as_millis())
    }
}

/// The outcome of an activation, deactivation or fencing: one entry per resource.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    /// One entry per resource, in a stable order (sorted by resource).
    pub items: Vec<ResourceReport>,
    /// Wall-clock time of the whole operation.
    #[serde(with = "millis")]
    pub elapsed: Duration,
}

impl Report {
    /// True when no resource failed.
    pub fn succeeded(&self) -> bool {
        self.items.iter().all(ResourceReport::succeeded)
    }
    /// The failed entries.
    pub fn failures(&self) -> impl Iterator<Item = &ResourceReport> {
        self.items.iter().filter(|r| !r.succeeded())
    }
    /// The entry of one resource.
    pub fn get(&self, resource: &Resource) -> Option<&ResourceReport> {
        self.items.iter().find(|r| &r.resource == resource)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for item in &self.items {
            writeln!(f, "{item}")?;
        }
        let failed = self.failures().count();
        if failed == 0 {
            write!(
                f,
                "all {} resources done in {} ms",
                self.items.len(),
                self.elapsed.as_millis()
            )
        } else {
            write!(
                f,
                "{failed} of {} resources FAILED ({} ms)",
                self.items.len(),
                self.elapsed.as_millis()
            )
        }
    }
}

/// What a monitor saw of one resource.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "health", content = "detail", rename_all = "kebab-case")]
pub enum Health {
    /// As configured: points at this node.
    Ok,
    /// Observed, and not as configured; the text says what differs.
    Drift(String),
    /// Could not be observed (API unreachable, throttled, not authorised); the text says why.
    Unknown(String),
}

/// The outcome of one monitor cycle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CheckReport {
    /// One entry per observed resource.
    pub items: Vec<(Resource, Health)>,
    /// Repairs made because `reconcile` is on (empty otherwise).
    pub repairs: Vec<ResourceReport>,
    /// The configured action for [`Health::Unknown`] entries.
    pub on_unreachable: UnreachableAction,
}

impl CheckReport {
    /// True when every resource is [`Health::Ok`].
    pub fn all_ok(&self) -> bool {
        self.items.iter().all(|(_, h)| *h == Health::Ok)
    }
    /// Entries that drifted.
    pub fn drifted(&self) -> impl Iterator<Item = &(Resource, Health)> {
        self.items
            .iter()
            .filter(|(_, h)| matches!(h, Health::Drift(_)))
    }
    /// Entries that could not be observed.
    pub fn unknown(&self) -> impl Iterator<Item = &(Resource, Health)> {
        self.items
            .iter()
            .filter(|(_, h)| matches!(h, Health::Unknown(_)))
    }
    /// The health of one resource.
    pub fn get(&self, resource: &Resource) -> Option<&Health> {
        self.items
            .iter()
            .find(|(r, _)| r == resource)
            .map(|(_, h)| h)
    }
    /// True when the cluster should recover the local resources: drift that was not repaired,
    /// or an unobservable resource with `on_unreachable = "recover"`. Never asks for a failover.
    pub fn wants_local_recovery(&self) -> bool {
        let unrepaired = self.drifted().any(|(r, _)| {
            !self
                .repairs
                .iter()
                .any(|p| &p.resource == r && p.succeeded())
        });
        unrepaired
            || (self.on_unreachable == UnreachableAction::Recover
                && self.unknown().next().is_some())
    }
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (r, h) in &self.items {
            match h {
                Health::Ok => writeln!(f, "{r}: ok")?,
                Health::Drift(d) => writeln!(f, "{r}: DRIFT: {d}")?,
                Health::Unknown(d) => {
                    writeln!(f, "{r}: unknown: {d} (action: {:?})", self.on_unreachable)?
                }
            }
        }
        for p in &self.repairs {
            writeln!(f, "repair: {p}")?;
        }
        Ok(())
    }
}

/// What a dry run (EC2's `DryRun` parameter) said about a planned change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "dry_run", content = "detail", rename_all = "kebab-case")]
pub enum DryRun {
    /// The API offers no dry run for this change (Route 53) or none was needed.
    NotOffered,
    /// AWS said the call would succeed (`DryRunOperation`).
    WouldSucceed,
    /// AWS said the call would fail; the classified reason.
    WouldFail(String),
}

/// One line of `twinvol cloud plan`: a resource, what it is now, what activation would make it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlannedChange {
    /// What.
    pub resource: Resource,
    /// Current state, as observed.
    pub current: String,
    /// The state activation wants.
    pub desired: String,
    /// The API call activation would make; `None` when nothing would change.
    pub change: Option<String>,
    /// The dry-run verdict for that call.
    pub dry_run: DryRun,
}

impl fmt::Display for PlannedChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.change {
            None => write!(f, "  {}: {} (no change)", self.resource, self.current),
            Some(c) => {
                write!(
                    f,
                    "~ {}: {} -> {} via {c}",
                    self.resource, self.current, self.desired
                )?;
                match &self.dry_run {
                    DryRun::NotOffered => Ok(()),
                    DryRun::WouldSucceed => write!(f, " [dry run: would succeed]"),
                    DryRun::WouldFail(why) => write!(f, " [dry run: WOULD FAIL: {why}]"),
                }
            }
        }
    }
}

/// One line of `twinvol cloud preflight`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PreflightCheck {
    /// What was checked.
    pub name: String,
    /// What was found, or why it will not work (naming the fix).
    pub result: Result<String, String>,
}

impl fmt::Display for PreflightCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.result {
            Ok(s) => write!(f, "ok    {}: {s}", self.name),
            Err(e) => write!(f, "FAIL  {}: {e}", self.name),
        }
    }
}

/// The network identity and fencing of one node, as the cluster core sees it.
///
/// Invariants every implementation keeps: `activate` and `deactivate` are idempotent (a resource
/// already in the wanted state is reported [`Outcome::Unchanged`] and not touched); they finish
/// within the configured activation deadline and report every resource, including the ones the
/// deadline cut off; `check` never changes anything unless reconciling is configured, and an
/// unreachable API yields [`Health::Unknown`], never a failover by itself.
pub trait Cloud: Send + Sync {
    /// Points every resource (VIP routes, EIP, records) at this node.
    fn activate(&self) -> impl Future<Output = Report> + Send;
    /// Releases what this node holds where configured (EIP disassociation, record deletion).
    fn deactivate(&self) -> impl Future<Output = Report> + Send;
    /// One monitor cycle over every resource (and this node's availability zone).
    fn check(&self) -> impl Future<Output = CheckReport> + Send;
    /// Stops the peer instance and waits until it is stopped.
    fn fence_peer(&self) -> impl Future<Output = Report> + Send;
    /// Asks (without changing anything) whether the peer instance is stopped: the proof a
    /// standby needs to take over with `fence = "off"`. A provider that cannot tell answers
    /// [`PeerInstance::Unknown`], which is never proof.
    fn peer_instance(&self) -> impl Future<Output = PeerInstance> + Send {
        async { PeerInstance::Unknown("this cloud provider cannot query the peer instance".into()) }
    }
}

/// What the provider reports of the peer instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", content = "detail", rename_all = "kebab-case")]
pub enum PeerInstance {
    /// Stopped or terminated (the text says which and how it was learned): proof the peer
    /// serves nothing.
    Stopped(String),
    /// Running, pending or stopping: the peer may still serve.
    Running(String),
    /// The provider could not tell; the text names why and the fix.
    Unknown(String),
}

/// Runs `cloud.check()` every `interval` (the first at once; late ticks are delayed, never
/// bunched) and hands each report to `sink` until it returns `false`.
pub async fn monitor<C: Cloud>(
    cloud: &C,
    interval: Duration,
    mut sink: impl FnMut(CheckReport) -> bool,
) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        if !sink(cloud.check().await) {
            return;
        }
    }
}

mod millis {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A provider whose checks alternate between ok and unknown.
    struct Flaky(std::sync::atomic::AtomicU32);

    impl Cloud for Flaky {
        async fn activate(&self) -> Report {
            Report::default()
        }
        async fn deactivate(&self) -> Report {
            Report::default()
        }
        async fn check(&self) -> CheckReport {
            let n = self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let h = if n % 2 == 0 {
                Health::Ok
            } else {
                Health::Unknown("timeout".into())
            };
            CheckReport {
                items: vec![(Resource::AvailabilityZone("az-1".into()), h)],
                repairs: vec![],
                on_unreachable: UnreachableAction::Warn,
            }
        }
        async fn fence_peer(&self) -> Report {
            Report::default()
        }
    }

    #[tokio::test]
    async fn monitor_runs_cycles_until_the_sink_stops_it() {
        let cloud = Flaky(std::sync::atomic::AtomicU32::new(0));
        let mut seen = Vec::new();
        let start = tokio::time::Instant::now();
        monitor(&cloud, Duration::from_millis(30), |r| {
            seen.push(r.all_ok());
            seen.len() < 3
        })
        .await;
        assert_eq!(seen, vec![true, false, true]);
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(60) && took < Duration::from_millis(1000),
            "first cycle at once, then every 30 ms: {took:?}"
        );
    }

    #[test]
    fn report_with_one_failed_table_is_not_successful_and_names_it() {
        let r = Report {
            items: vec![
                ResourceReport::new(
                    Resource::RouteTable("rtb-1".into()),
                    Outcome::Applied("eni-a -> eni-b".into()),
                    Duration::ZERO,
                ),
                ResourceReport::new(
                    Resource::RouteTable("rtb-2".into()),
                    Outcome::Failed("You are not authorized".into()),
                    Duration::ZERO,
                ),
            ],
            elapsed: Duration::from_millis(5),
        };
        assert!(!r.succeeded());
        let text = r.to_string();
        assert!(
            text.contains("route table rtb-2: FAILED: You are not authorized"),
            "{text}"
        );
        assert!(text.contains("1 of 2 resources FAILED"), "{text}");
    }

    #[test]
    fn unreachable_api_asks_for_recovery_only_when_configured() {
        let mut c = CheckReport {
            items: vec![(
                Resource::ElasticIp("eipalloc-1".into()),
                Health::Unknown("timeout".into()),
            )],
            repairs: vec![],
            on_unreachable: UnreachableAction::Warn,
        };
        assert!(!c.wants_local_recovery());
        c.on_unreachable = UnreachableAction::Recover;
        assert!(c.wants_local_recovery());
    }

    #[test]
    fn repaired_drift_needs_no_recovery() {
        let t = Resource::RouteTable("rtb-1".into());
        let mut c = CheckReport {
            items: vec![(t.clone(), Health::Drift("changed".into()))],
            repairs: vec![],
            on_unreachable: UnreachableAction::Warn,
        };
        assert!(c.wants_local_recovery());
        c.repairs.push(ResourceReport::new(
            t,
            Outcome::Applied("fixed".into()),
            Duration::ZERO,
        ));
        assert!(!c.wants_local_recovery());
    }
}
