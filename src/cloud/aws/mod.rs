//! `aws`: the AWS provider of [`Cloud`]: this node's identity (configured or discovered over
//! IMDSv2), the SDK clients ([`api`]), error classification ([`error`]), and the orchestration of
//! the per-resource modules (VIP routes, EIP and records switched concurrently under one
//! activation deadline).

use std::collections::{BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::sync::Mutex;

use futures_util::future::join_all;
use tokio::time::Instant;

pub mod api;
pub mod error;
pub mod imds;

pub use api::{Api, Deadline};
pub use error::AwsError;

use crate::cloud::{az, eip, fence, resolve, route53, vip_route};
use crate::cloud::{
    CheckReport, Cloud, Health, Outcome, PlannedChange, PreflightCheck, Report, Resource,
    ResourceReport,
};
use crate::config::cloud::{CloudConfig, RecordConfig, RecordValue, SELF};

/// What this node is in EC2, resolved once at [`AwsCloud::connect`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeIdentity {
    /// `i-...`.
    pub instance_id: String,
    /// The ENI the VIP route and the EIP point at.
    pub eni: String,
    /// The ENI's primary private address.
    pub private_ip: Ipv4Addr,
    /// The ENI's availability zone.
    pub availability_zone: String,
    /// The ENI's VPC.
    pub vpc_id: String,
    /// Source/Dest check of the ENI as last seen.
    pub source_dest_check: bool,
    /// The instance the ENI is attached to.
    pub attached_to: Option<String>,
}

/// The AWS provider for one node.
pub struct AwsCloud {
    api: Api,
    cfg: CloudConfig,
    me: NodeIdentity,
    /// Public address of the configured EIP (for records with `value = "eip"`).
    eip_public: Option<Ipv4Addr>,
    /// Route tables seen holding the VIP; the monitor expects them to keep it.
    known_tables: Mutex<BTreeSet<String>>,
    /// When this node last changed each record (by name): the resolution monitor waits after it.
    record_changed: Mutex<HashMap<String, Instant>>,
}

fn parse_ip(s: Option<&str>, what: &str, resource: &str) -> Result<Ipv4Addr, AwsError> {
    s.and_then(|s| s.parse().ok())
        .ok_or_else(|| AwsError::Unexpected {
            action: "Describe",
            resource: resource.to_string(),
            detail: format!("no IPv4 {what} in the answer ({s:?})"),
        })
}

/// Reads an ENI: (private IP, AZ, VPC, source/dest check, attached instance).
pub async fn describe_eni(api: &Api, eni: &str, dl: Deadline) -> Result<NodeIdentity, AwsError> {
    let out = api
        .ec2("DescribeNetworkInterfaces", eni, dl, || {
            api.ec2
                .describe_network_interfaces()
                .network_interface_ids(eni)
                .send()
        })
        .await?;
    let n = out
        .network_interfaces()
        .first()
        .ok_or_else(|| AwsError::EniNotFound(eni.to_string()))?;
    Ok(NodeIdentity {
        instance_id: String::new(),
        eni: eni.to_string(),
        private_ip: parse_ip(n.private_ip_address(), "private address", eni)?,
        availability_zone: n.availability_zone().unwrap_or_default().to_string(),
        vpc_id: n.vpc_id().unwrap_or_default().to_string(),
        source_dest_check: n.source_dest_check().unwrap_or(true),
        attached_to: n
            .attachment()
            .and_then(|a| a.instance_id())
            .map(str::to_string),
    })
}

impl AwsCloud {
    /// Builds the clients and resolves this node's identity (IMDSv2 for ids written "self",
    /// then one `DescribeNetworkInterfaces`; one `DescribeAddresses` if a record points at the EIP).
    pub async fn connect(cfg: &CloudConfig) -> Result<Self, AwsError> {
        let wants_imds = cfg.aws.region.as_deref() == Some(SELF)
            || cfg.node.instance_id == SELF
            || cfg.node.network_interface == SELF;
        let imds_client = match (&cfg.aws.endpoints.imds, wants_imds) {
            (Some(_), _) | (None, true) => Some(imds::client(&cfg.aws)?),
            (None, false) => None,
        };
        let discovered = match (&imds_client, wants_imds) {
            (Some(c), true) => Some(imds::discover(c).await?),
            _ => None,
        };
        let region = match cfg.aws.region.as_deref() {
            Some(SELF) => discovered.as_ref().map(|d| d.region.clone()),
            other => other.map(str::to_string),
        };
        let api = Api::connect(
            &cfg.aws,
            region,
            imds_client.filter(|_| cfg.aws.endpoints.imds.is_some()),
        )
        .await?;
        let instance_id = match (cfg.node.instance_id.as_str(), &discovered) {
            (SELF, Some(d)) => d.instance_id.clone(),
            (id, _) => id.to_string(),
        };
        let eni = match (cfg.node.network_interface.as_str(), &discovered) {
            (SELF, Some(d)) => d
                .primary_eni()
                .ok_or_else(|| AwsError::Imds {
                    what: "network/interfaces/macs/".into(),
                    detail: "no interface listed".into(),
                })?
                .to_string(),
            (id, _) => id.to_string(),
        };
        let dl = Deadline::after(cfg.aws.activation_timeout());
        let mut me = describe_eni(&api, &eni, dl).await?;
        me.instance_id = instance_id;
        let eip_public = match &cfg.eip {
            Some(e) if cfg.records.iter().any(|r| r.value == RecordValue::Eip) => {
                let st = eip::observe(&api, e, dl).await?;
                Some(parse_ip(
                    st.public_ip.as_deref(),
                    "public address",
                    &e.allocation_id,
                )?)
            }
            _ => None,
        };
        let known = cfg
            .vip_route
            .as_ref()
            .map(|v| v.route_tables.iter().cloned().collect())
            .unwrap_or_default();
        Ok(Self {
            api,
            cfg: cfg.clone(),
            me,
            eip_public,
            known_tables: Mutex::new(known),
            record_changed: Mutex::new(HashMap::new()),
        })
    }

    /// This node's identity.
    pub fn identity(&self) -> &NodeIdentity {
        &self.me
    }

    /// The clients (for call counts and tests).
    pub fn api(&self) -> &Api {
        &self.api
    }

    /// The configuration in force.
    pub fn config(&self) -> &CloudConfig {
        &self.cfg
    }

    fn known(&self) -> BTreeSet<String> {
        self.known_tables
            .lock()
            .map(|k| k.clone())
            .unwrap_or_default()
    }

    fn remember(&self, tables: impl IntoIterator<Item = String>) {
        if let Ok(mut k) = self.known_tables.lock() {
            k.extend(tables);
        }
    }

    /// The address a record points at.
    pub fn record_ip(&self, r: &RecordConfig) -> Ipv4Addr {
        match &r.value {
            RecordValue::NodeIp => self.me.private_ip,
            RecordValue::Vip => self
                .cfg
                .vip_route
                .as_ref()
                .map_or(self.me.private_ip, |v| v.vip),
            RecordValue::Eip => self.eip_public.unwrap_or(self.me.private_ip),
            RecordValue::Address(a) => *a,
        }
    }

    fn eip_private_ip(&self) -> Ipv4Addr {
        self.cfg
            .eip
            .as_ref()
            .and_then(|e| e.private_ip)
            .unwrap_or(self.me.private_ip)
    }

    fn deadline(&self) -> Deadline {
        Deadline::after(self.cfg.aws.activation_timeout())
    }

    /// Everything that must hold before an activation can work, each named with its fix.
    pub async fn preflight(&self) -> Vec<PreflightCheck> {
        let dl = self.deadline();
        let mut checks = Vec::new();
        let eni = describe_eni(&self.api, &self.me.eni, dl)
            .await
            .map(|mut n| {
                n.instance_id.clone_from(&self.me.instance_id);
                n
            });
        let check = |name: &str, r: Result<String, AwsError>| PreflightCheck {
            name: name.into(),
            result: r.map_err(|e| e.to_string()),
        };
        checks.push(check(
            "credentials and EC2 endpoint",
            eni.as_ref()
                .map(|_| "EC2 answered DescribeNetworkInterfaces".to_string())
                .map_err(Clone::clone),
        ));
        if let Ok(n) = &eni {
            checks.push(check(
                "ENI belongs to this instance",
                match &n.attached_to {
                    Some(i) if *i == self.me.instance_id => {
                        Ok(format!("{} is attached to {i}", n.eni))
                    }
                    other => Err(AwsError::EniNotOnInstance {
                        eni: n.eni.clone(),
                        instance: self.me.instance_id.clone(),
                        attached: other.clone().unwrap_or_else(|| "nothing".into()),
                    }),
                },
            ));
        }
        if let Some(v) = &self.cfg.vip_route {
            if let Ok(n) = &eni {
                checks.push(check(
                    "Source/Dest check disabled",
                    if n.source_dest_check {
                        Err(AwsError::SourceDestCheckEnabled { eni: n.eni.clone() })
                    } else {
                        Ok(format!("disabled on {}", n.eni))
                    },
                ));
            }
            checks.push(check(
                "VIP outside the VPC CIDR",
                vip_route::preflight_vpc(&self.api, v, dl).await,
            ));
            checks.push(check(
                "route tables holding the VIP",
                vip_route::observe(&self.api, v, &self.known(), dl).await.map(|t| {
                    if t.is_empty() {
                        format!("none yet holds {} (list them in cloud.vip_route.route_tables to create the route)", v.destination())
                    } else {
                        t.iter().map(|t| format!("{} -> {}", t.table, t.target)).collect::<Vec<_>>().join(", ")
                    }
                }),
            ));
        }
        if let Some(e) = &self.cfg.eip {
            checks.push(check(
                "Elastic IP allocation",
                eip::observe(&self.api, e, dl)
                    .await
                    .map(|s| format!("{} {} ", e.allocation_id, s.public_ip.unwrap_or_default())),
            ));
        }
        for r in &self.cfg.records {
            checks.push(check(
                &format!("hosted zone of {}", r.name),
                route53::preflight(&self.api, r, dl).await,
            ));
        }
        if self.cfg.monitor.availability_zone && !self.me.availability_zone.is_empty() {
            checks.push(check(
                "availability zone",
                az::observe(&self.api, &self.me.availability_zone, dl)
                    .await
                    .map(|s| format!("{} is {s}", self.me.availability_zone)),
            ));
        }
        if let Some(f) = &self.cfg.fence {
            checks.push(check(
                "peer instance for fencing",
                fence::states(&self.api, &[f.peer_instance_id.as_str()], dl)
                    .await
                    .and_then(|s| {
                        s.first()
                            .map(|(i, st)| format!("{i} is {st}"))
                            .ok_or_else(|| AwsError::InstanceNotFound(f.peer_instance_id.clone()))
                    }),
            ));
        }
        checks
    }

    /// What activation would change, without changing anything (EC2 changes checked with DryRun).
    pub async fn plan(&self) -> Result<Vec<PlannedChange>, AwsError> {
        let dl = self.deadline();
        let mut out = Vec::new();
        if let Some(v) = &self.cfg.vip_route {
            out.extend(vip_route::plan(&self.api, v, &self.me.eni, &self.known(), dl).await?);
        }
        if let Some(e) = &self.cfg.eip {
            out.push(eip::plan(&self.api, e, &self.me.eni, self.eip_private_ip(), dl).await?);
        }
        for r in &self.cfg.records {
            out.push(route53::plan(&self.api, r, self.record_ip(r), dl).await?);
        }
        Ok(out)
    }

    /// True when the resolution monitor may query `r`: its delay has passed since this node
    /// last changed the record (or this node never changed it).
    fn resolution_due(&self, r: &RecordConfig) -> bool {
        self.record_changed
            .lock()
            .map(|m| {
                m.get(&r.name)
                    .is_none_or(|t| t.elapsed() >= r.resolve_delay())
            })
            .unwrap_or(true)
    }

    fn note_record_changes(&self, items: &[ResourceReport]) {
        for (r, item) in self.cfg.records.iter().zip(items) {
            self.note_record_changes_of(r, item);
        }
    }

    fn note_record_changes_of(&self, r: &RecordConfig, item: &ResourceReport) {
        if matches!(item.outcome, Outcome::Applied(_)) {
            if let Ok(mut m) = self.record_changed.lock() {
                m.insert(r.name.clone(), Instant::now());
            }
        }
    }

    /// One monitor cycle; repairs drift when `reconcile` (or the config) says so.
    pub async fn check_with(&self, reconcile: bool) -> CheckReport {
        let dl = self.deadline();
        let known = self.known();
        let eni = self.me.eni.as_str();
        let routes = async {
            match &self.cfg.vip_route {
                Some(v) => vip_route::check(&self.api, v, eni, &known, dl).await,
                None => Vec::new(),
            }
        };
        let eip_health = async {
            match &self.cfg.eip {
                Some(e) => Some((
                    Resource::ElasticIp(e.allocation_id.clone()),
                    eip::check(&self.api, e, eni, self.eip_private_ip(), dl).await,
                )),
                None => None,
            }
        };
        let records = join_all(
            self.cfg
                .records
                .iter()
                .map(|r| route53::check(&self.api, r, self.record_ip(r), dl)),
        );
        let zone = async {
            if self.cfg.monitor.availability_zone && !self.me.availability_zone.is_empty() {
                Some(az::check(&self.api, &self.me.availability_zone, dl).await)
            } else {
                None
            }
        };
        let lookup_timeout = std::time::Duration::from_millis(self.cfg.aws.read_timeout_ms);
        let lookups = join_all(
            self.cfg
                .records
                .iter()
                .filter(|r| self.resolution_due(r))
                .filter_map(|r| {
                    r.resolver.map(|server| {
                        resolve::check(server, &r.name, self.record_ip(r), lookup_timeout)
                    })
                }),
        );
        let (routes, eip_health, records, zone, lookups) =
            tokio::join!(routes, eip_health, records, zone, lookups);
        let mut items: Vec<(Resource, Health)> = routes
            .iter()
            .map(|(r, h, _)| (r.clone(), h.clone()))
            .collect();
        items.extend(eip_health.clone());
        items.extend(records.iter().cloned());
        items.extend(zone);
        items.extend(lookups);
        for (r, h) in &items {
            match h {
                Health::Ok => {}
                Health::Drift(d) => tracing::error!(resource = %r, "{d}"),
                Health::Unknown(d) => match self.cfg.monitor.on_unreachable {
                    crate::cloud::UnreachableAction::Ignore => {}
                    _ => tracing::warn!(resource = %r, "cannot observe: {d}"),
                },
            }
        }
        let mut repairs = Vec::new();
        if reconcile || self.cfg.monitor.reconcile {
            if let Some(v) = &self.cfg.vip_route {
                let drifted: Vec<_> = routes
                    .into_iter()
                    .filter(|(_, h, _)| matches!(h, Health::Drift(_)))
                    .filter_map(|(_, _, t)| t)
                    .collect();
                if !drifted.is_empty() {
                    repairs.extend(vip_route::switch_all(&self.api, v, &drifted, eni, dl).await);
                }
            }
            if let (Some(e), Some((_, Health::Drift(_)))) = (&self.cfg.eip, &eip_health) {
                repairs.push(eip::activate(&self.api, e, eni, self.eip_private_ip(), dl).await);
            }
            for (r, (_, h)) in self.cfg.records.iter().zip(&records) {
                if matches!(h, Health::Drift(_)) {
                    let repair = route53::activate(&self.api, r, self.record_ip(r), dl).await;
                    self.note_record_changes_of(r, &repair);
                    repairs.push(repair);
                }
            }
        }
        CheckReport {
            items,
            repairs,
            on_unreachable: self.cfg.monitor.on_unreachable,
        }
    }
}

impl Cloud for AwsCloud {
    async fn activate(&self) -> Report {
        let start = Instant::now();
        let dl = self.deadline();
        let eni = self.me.eni.as_str();
        let routes = async {
            match &self.cfg.vip_route {
                Some(v) => {
                    let mut known = self.known();
                    let r = vip_route::activate(&self.api, v, eni, &mut known, dl).await;
                    self.remember(known);
                    r
                }
                None => Vec::new(),
            }
        };
        let eip = async {
            match &self.cfg.eip {
                Some(e) => Some(eip::activate(&self.api, e, eni, self.eip_private_ip(), dl).await),
                None => None,
            }
        };
        let records = join_all(
            self.cfg
                .records
                .iter()
                .map(|r| route53::activate(&self.api, r, self.record_ip(r), dl)),
        );
        let (mut items, eip, records) = tokio::join!(routes, eip, records);
        self.note_record_changes(&records);
        items.extend(eip);
        items.extend(records);
        log_report("activate", &items);
        Report {
            items,
            elapsed: start.elapsed(),
        }
    }

    async fn deactivate(&self) -> Report {
        let start = Instant::now();
        let dl = self.deadline();
        let eip = async {
            match &self.cfg.eip {
                Some(e) => eip::deactivate(&self.api, e, &self.me.eni, dl).await,
                None => None,
            }
        };
        let records = join_all(
            self.cfg
                .records
                .iter()
                .map(|r| route53::deactivate(&self.api, r, self.record_ip(r), dl)),
        );
        let (eip, records) = tokio::join!(eip, records);
        let items: Vec<ResourceReport> = eip
            .into_iter()
            .chain(records.into_iter().flatten())
            .collect();
        log_report("deactivate", &items);
        Report {
            items,
            elapsed: start.elapsed(),
        }
    }

    async fn check(&self) -> CheckReport {
        self.check_with(false).await
    }

    async fn fence_peer(&self) -> Report {
        let start = Instant::now();
        let items = match &self.cfg.fence {
            Some(f) => vec![fence::fence(&self.api, f, &self.me.instance_id).await],
            None => Vec::new(),
        };
        log_report("fence", &items);
        Report {
            items,
            elapsed: start.elapsed(),
        }
    }

    async fn peer_instance(&self) -> crate::cloud::PeerInstance {
        match &self.cfg.fence {
            Some(f) => fence::peer_instance(&self.api, f).await,
            None => crate::cloud::PeerInstance::Unknown(
                "no [cloud.fence] table: set peer_instance_id so the peer's state can be queried"
                    .into(),
            ),
        }
    }
}

fn log_report(op: &str, items: &[ResourceReport]) {
    for i in items {
        match &i.outcome {
            Outcome::Failed(why) => tracing::error!(op, resource = %i.resource, "{why}"),
            _ => tracing::info!(op, "{i}"),
        }
    }
}

/// The text of an error and its sources.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
