//! `[cloud]`: how the active node's network identity is moved on AWS (VIP routes, Elastic IP,
//! Route 53 record), how the peer is fenced, and how those resources are monitored.
//!
//! Everything here is checked without I/O by [`CloudConfig::validate`]; ids that may be
//! discovered at start-up over IMDSv2 are written `"self"`.

use std::net::Ipv4Addr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Written instead of an id to have it discovered over IMDSv2 at start-up.
pub const SELF: &str = "self";

/// The `[cloud]` table.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CloudConfig {
    /// The provider; only `"aws"` exists.
    pub provider: Provider,
    /// AWS account access, endpoints and time limits.
    #[serde(default)]
    pub aws: AwsConfig,
    /// This node's instance and ENI.
    #[serde(default)]
    pub node: CloudNodeConfig,
    /// The VIP routed to the active node in the VPC's route tables.
    pub vip_route: Option<VipRouteConfig>,
    /// The Elastic IP moved to the active node.
    pub eip: Option<EipConfig>,
    /// Route 53 records pointing at the active node.
    #[serde(default, rename = "route53")]
    pub records: Vec<RecordConfig>,
    /// Fencing of the peer instance.
    pub fence: Option<FenceConfig>,
    /// Monitors of the resources above.
    #[serde(default)]
    pub monitor: MonitorConfig,
}

/// Cloud provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    /// Amazon Web Services.
    Aws,
}

/// Account access, endpoints and time limits.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AwsConfig {
    /// Region name, `"self"` (from IMDSv2) or absent (the SDK's chain: AWS_REGION, profile, IMDS).
    pub region: Option<String>,
    /// Named profile of ~/.aws/config; absent: the default chain (environment, profile, instance profile).
    pub profile: Option<String>,
    /// Endpoint overrides (VPC endpoints, tests).
    #[serde(default)]
    pub endpoints: EndpointConfig,
    /// Connect timeout of one HTTP attempt, milliseconds.
    #[serde(default = "default_connect_ms")]
    pub connect_timeout_ms: u64,
    /// Read timeout of one HTTP attempt, milliseconds.
    #[serde(default = "default_read_ms")]
    pub read_timeout_ms: u64,
    /// Attempts per call in the SDK's standard retry mode (1 = no retry).
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Deadline of one step (one API call including its retries and throttling back-off), seconds.
    #[serde(default = "default_step_s")]
    pub step_timeout_s: u64,
    /// Deadline of a whole activation or deactivation, seconds.
    #[serde(default = "default_activation_s")]
    pub activation_timeout_s: u64,
}

fn default_connect_ms() -> u64 {
    3_000
}
fn default_read_ms() -> u64 {
    10_000
}
fn default_max_attempts() -> u32 {
    3
}
fn default_step_s() -> u64 {
    20
}
fn default_activation_s() -> u64 {
    150
}

impl Default for AwsConfig {
    fn default() -> Self {
        Self {
            region: None,
            profile: None,
            endpoints: EndpointConfig::default(),
            connect_timeout_ms: default_connect_ms(),
            read_timeout_ms: default_read_ms(),
            max_attempts: default_max_attempts(),
            step_timeout_s: default_step_s(),
            activation_timeout_s: default_activation_s(),
        }
    }
}

impl AwsConfig {
    /// Deadline of one step.
    pub fn step_timeout(&self) -> Duration {
        Duration::from_secs(self.step_timeout_s)
    }
    /// Deadline of a whole activation.
    pub fn activation_timeout(&self) -> Duration {
        Duration::from_secs(self.activation_timeout_s)
    }
}

/// Endpoint overrides, each a full URL (`https://vpce-....ec2.us-east-1.vpce.amazonaws.com`).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointConfig {
    /// EC2 API endpoint.
    pub ec2: Option<String>,
    /// Route 53 API endpoint.
    pub route53: Option<String>,
    /// Instance metadata service (IMDSv2) endpoint; default http://169.254.169.254.
    pub imds: Option<String>,
}

/// This node's identity in EC2.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CloudNodeConfig {
    /// `i-...` or `"self"`.
    #[serde(default = "self_id")]
    pub instance_id: String,
    /// The ENI that carries the service: `eni-...` or `"self"` (the device-index-0 ENI, found by MAC over IMDSv2).
    #[serde(default = "self_id")]
    pub network_interface: String,
}

fn self_id() -> String {
    SELF.into()
}

impl Default for CloudNodeConfig {
    fn default() -> Self {
        Self {
            instance_id: self_id(),
            network_interface: self_id(),
        }
    }
}

/// A /32 VIP outside the VPC CIDR, routed to the active node's ENI.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VipRouteConfig {
    /// The virtual IP address.
    pub vip: Ipv4Addr,
    /// The VPC whose route tables carry it.
    pub vpc_id: String,
    /// Tables that must carry the route even when it is missing (it is created there).
    /// Every table of the VPC that already holds the VIP is switched as well.
    #[serde(default)]
    pub route_tables: Vec<String>,
}

impl VipRouteConfig {
    /// The route's destination, `a.b.c.d/32`.
    pub fn destination(&self) -> String {
        format!("{}/32", self.vip)
    }
}

/// An Elastic IP associated with the active node's ENI.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EipConfig {
    /// `eipalloc-...`.
    pub allocation_id: String,
    /// Private address of the ENI it maps to; default: the ENI's primary private address.
    pub private_ip: Option<Ipv4Addr>,
    /// Disassociate it when the service is deactivated on this node.
    #[serde(default)]
    pub disassociate_on_deactivate: bool,
}

/// What an A record points at.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RecordValue {
    /// The node's primary private address (of the configured ENI).
    NodeIp,
    /// The VIP of `[cloud.vip_route]`.
    Vip,
    /// The public address of `[cloud.eip]`.
    Eip,
    /// A fixed address.
    Address(Ipv4Addr),
}

/// One Route 53 A record.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RecordConfig {
    /// Hosted zone id, `Z...` (with or without `/hostedzone/`).
    pub zone_id: String,
    /// Record name: lower-case FQDN with a trailing dot, e.g. `db.example.internal.`.
    pub name: String,
    /// TTL in seconds (10..=86400; 10..60 keeps clients' caches short).
    #[serde(default = "default_ttl")]
    pub ttl: i64,
    /// What the record points at.
    #[serde(default = "default_value")]
    pub value: RecordValue,
    /// Delete the record when the service is deactivated (default: leave it; the next switch only changes the address).
    #[serde(default)]
    pub delete_on_deactivate: bool,
    /// Interval between GetChange polls while waiting for INSYNC, seconds (fractions allowed).
    #[serde(default = "default_poll_interval")]
    pub insync_poll_interval_s: f64,
    /// Longest wait for INSYNC, seconds; 0 = do not wait.
    #[serde(default = "default_poll_total")]
    pub insync_timeout_s: f64,
    /// Also check that the name resolves to the value through this resolver (`10.0.0.2:53`,
    /// the VPC's Route 53 Resolver); absent: no resolution check.
    #[serde(default)]
    pub resolver: Option<std::net::SocketAddr>,
    /// Seconds after this node changed the record before the first resolution check (a query
    /// before the record exists caches NXDOMAIN for the negative-caching TTL).
    #[serde(default = "default_resolve_delay")]
    pub resolve_delay_s: f64,
    /// How the name follows the active node.
    #[serde(default)]
    pub mode: RecordMode,
    /// This node's failover record and health check (`mode = "failover-routing"` only).
    pub failover: Option<FailoverConfig>,
}

/// How a record follows the active node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RecordMode {
    /// One A record, UPSERTed to the active node's address at activation.
    #[default]
    Simple,
    /// Route 53 failover routing: each node keeps its own PRIMARY or SECONDARY record tied to a
    /// Route 53 health check of its twinvol health endpoint; Route 53's data plane answers with
    /// the healthy one, even when its control plane (us-east-1) cannot be reached.
    FailoverRouting,
}

/// This node's side of a failover-routing record.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FailoverConfig {
    /// `primary` or `secondary`: which failover record this node owns.
    pub role: FailoverRole,
    /// Port of this node's health endpoint (HTTP 200 only while Primary and healthy).
    pub health_port: u16,
    /// Path of the health endpoint.
    #[serde(default = "default_health_path")]
    pub health_path: String,
    /// Address Route 53's checkers probe; default: the record's value for this node.
    pub health_ip: Option<Ipv4Addr>,
    /// Seconds between probes: 10 or 30.
    #[serde(default = "default_request_interval")]
    pub request_interval_s: i32,
    /// Failed probes before unhealthy, 1..=10.
    #[serde(default = "default_failure_threshold")]
    pub failure_threshold: i32,
}

/// Which failover record a node owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FailoverRole {
    /// Answered while its health check is healthy.
    Primary,
    /// Answered while the primary's health check is unhealthy.
    Secondary,
}

fn default_health_path() -> String {
    "/health".into()
}
fn default_request_interval() -> i32 {
    10
}
fn default_failure_threshold() -> i32 {
    3
}

fn default_resolve_delay() -> f64 {
    60.0
}

fn default_ttl() -> i64 {
    30
}
fn default_value() -> RecordValue {
    RecordValue::NodeIp
}
fn default_poll_interval() -> f64 {
    2.0
}
fn default_poll_total() -> f64 {
    120.0
}

impl RecordConfig {
    /// The zone id without the `/hostedzone/` prefix.
    pub fn zone(&self) -> &str {
        self.zone_id.trim_start_matches("/hostedzone/")
    }
    /// Poll interval for INSYNC.
    pub fn poll_interval(&self) -> Duration {
        Duration::from_secs_f64(self.insync_poll_interval_s)
    }
    /// Longest wait for INSYNC.
    pub fn insync_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.insync_timeout_s)
    }
    /// Delay before the first resolution check after a change.
    pub fn resolve_delay(&self) -> Duration {
        Duration::from_secs_f64(self.resolve_delay_s)
    }
}

/// Fencing of the peer by stopping its instance.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FenceConfig {
    /// The peer's instance, `i-...`.
    pub peer_instance_id: String,
    /// Longest wait for the peer to reach `stopped`, seconds.
    #[serde(default = "default_fence_timeout")]
    pub timeout_s: u64,
    /// Interval between DescribeInstances polls, milliseconds.
    #[serde(default = "default_fence_poll_ms")]
    pub poll_interval_ms: u64,
}

fn default_fence_timeout() -> u64 {
    120
}
fn default_fence_poll_ms() -> u64 {
    1_000
}

/// What a monitor does when the AWS API does not answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UnreachableAction {
    /// Log a warning and keep going (endpoint maintenance must not cause a failover).
    #[default]
    Warn,
    /// Ask the cluster to recover the local resources.
    Recover,
    /// Do nothing.
    Ignore,
}

/// Monitors of the cloud resources.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MonitorConfig {
    /// Seconds between checks.
    #[serde(default = "default_monitor_interval")]
    pub interval_s: u64,
    /// Re-apply a resource found drifted (default: observe and report only).
    #[serde(default)]
    pub reconcile: bool,
    /// Action when the API does not answer.
    #[serde(default)]
    pub on_unreachable: UnreachableAction,
    /// Check the state of this node's availability zone.
    #[serde(default = "yes")]
    pub availability_zone: bool,
}

fn default_monitor_interval() -> u64 {
    30
}
fn yes() -> bool {
    true
}

impl Default for MonitorConfig {
    fn default() -> Self {
        Self {
            interval_s: default_monitor_interval(),
            reconcile: false,
            on_unreachable: UnreachableAction::Warn,
            availability_zone: true,
        }
    }
}

/// A field of `[cloud]` that cannot work: the dotted field, what is wrong, and what to write instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudFieldError {
    /// Dotted path, e.g. `cloud.route53[0].name`.
    pub field: String,
    /// What is wrong with the value.
    pub problem: String,
    /// What to write instead.
    pub fix: String,
}

fn bad(
    field: impl Into<String>,
    problem: impl Into<String>,
    fix: impl Into<String>,
) -> CloudFieldError {
    CloudFieldError {
        field: field.into(),
        problem: problem.into(),
        fix: fix.into(),
    }
}

/// True for `prefix-` followed by 8 or 17 lower-case hex digits (EC2 resource ids).
pub fn valid_ec2_id(id: &str, prefix: &str) -> bool {
    id.strip_prefix(prefix)
        .and_then(|r| r.strip_prefix('-'))
        .is_some_and(|hex| {
            (hex.len() == 8 || hex.len() == 17)
                && hex
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        })
}

/// Checks a Route 53 record name: a lower-case FQDN with a trailing dot, labels of 1..=63
/// letters, digits or '-' (a leading `*.` wildcard label is allowed), at most 255 bytes.
pub fn check_record_name(name: &str) -> Result<(), String> {
    if name.len() > 255 {
        return Err(format!("{name:?} is longer than 255 bytes"));
    }
    let Some(body) = name.strip_suffix('.') else {
        return Err(format!("{name:?} has no trailing dot"));
    };
    if name.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(format!("{name:?} is not lower case"));
    }
    let labels: Vec<&str> = body.split('.').collect();
    if labels.len() < 2 {
        return Err(format!("{name:?} is not a fully qualified name"));
    }
    for (i, l) in labels.iter().enumerate() {
        let ok_chars = l
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        let wildcard = i == 0 && *l == "*";
        if !wildcard
            && (l.is_empty() || l.len() > 63 || !ok_chars || l.starts_with('-') || l.ends_with('-'))
        {
            return Err(format!("{name:?} has an invalid label {l:?}"));
        }
    }
    Ok(())
}

fn check_id(field: &str, id: &str, prefix: &str, allow_self: bool) -> Result<(), CloudFieldError> {
    if (allow_self && id == SELF) || valid_ec2_id(id, prefix) {
        return Ok(());
    }
    let fix = if allow_self {
        format!(
            "write the {prefix}-... id (8 or 17 hex digits) or \"self\" to discover it over IMDSv2"
        )
    } else {
        format!("write the {prefix}-... id (8 or 17 hex digits) as shown by the EC2 console")
    };
    Err(bad(field, format!("{id:?} is not a {prefix}- id"), fix))
}

fn check_endpoint(field: &str, url: &Option<String>) -> Result<(), CloudFieldError> {
    match url {
        Some(u) if !(u.starts_with("https://") || u.starts_with("http://")) || u.len() < 10 => {
            Err(bad(
                field,
                format!("{u:?} is not an http(s) URL"),
                "write a full URL such as \"https://ec2.eu-west-1.amazonaws.com\"",
            ))
        }
        _ => Ok(()),
    }
}

impl CloudConfig {
    /// Checks values that parse but cannot work; no I/O.
    pub fn validate(&self) -> Result<(), CloudFieldError> {
        let a = &self.aws;
        if let Some(r) = &a.region {
            let ok = r == SELF
                || (r.len() <= 32
                    && r.split('-').count() >= 3
                    && r.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'));
            if !ok {
                return Err(bad("cloud.aws.region", format!("{r:?} is not a region name"), "write e.g. \"eu-west-1\", \"self\", or remove it to use AWS_REGION / the profile"));
            }
        }
        check_endpoint("cloud.aws.endpoints.ec2", &a.endpoints.ec2)?;
        check_endpoint("cloud.aws.endpoints.route53", &a.endpoints.route53)?;
        check_endpoint("cloud.aws.endpoints.imds", &a.endpoints.imds)?;
        if a.connect_timeout_ms == 0 || a.read_timeout_ms == 0 {
            return Err(bad(
                "cloud.aws.connect_timeout_ms",
                "timeouts must be above zero",
                "use e.g. connect_timeout_ms = 3000, read_timeout_ms = 10000",
            ));
        }
        if !(1..=10).contains(&a.max_attempts) {
            return Err(bad(
                "cloud.aws.max_attempts",
                format!("{} is outside 1..=10", a.max_attempts),
                "use 3 (the SDK's standard mode)",
            ));
        }
        if a.step_timeout_s == 0 || a.activation_timeout_s < a.step_timeout_s {
            return Err(bad(
                "cloud.aws.activation_timeout_s",
                format!("step_timeout_s = {} and activation_timeout_s = {} do not fit", a.step_timeout_s, a.activation_timeout_s),
                "give each step at least 1 s and the whole activation at least one step, e.g. 20 and 150",
            ));
        }
        check_id("cloud.node.instance_id", &self.node.instance_id, "i", true)?;
        check_id(
            "cloud.node.network_interface",
            &self.node.network_interface,
            "eni",
            true,
        )?;
        if let Some(v) = &self.vip_route {
            check_id("cloud.vip_route.vpc_id", &v.vpc_id, "vpc", false)?;
            for (i, t) in v.route_tables.iter().enumerate() {
                check_id(
                    &format!("cloud.vip_route.route_tables[{i}]"),
                    t,
                    "rtb",
                    false,
                )?;
            }
            let o = v.vip.octets();
            if v.vip.is_unspecified()
                || v.vip.is_broadcast()
                || v.vip.is_multicast()
                || v.vip.is_loopback()
                || o[0] == 169 && o[1] == 254
            {
                return Err(bad(
                    "cloud.vip_route.vip",
                    format!("{} cannot be routed", v.vip),
                    "choose an unused private address outside every VPC CIDR, e.g. 192.168.100.10",
                ));
            }
        }
        if let Some(e) = &self.eip {
            check_id(
                "cloud.eip.allocation_id",
                &e.allocation_id,
                "eipalloc",
                false,
            )?;
        }
        for (i, r) in self.records.iter().enumerate() {
            let f = |k: &str| format!("cloud.route53[{i}].{k}");
            let z = r.zone();
            if z.is_empty()
                || z.len() > 32
                || !z
                    .bytes()
                    .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
            {
                return Err(bad(
                    f("zone_id"),
                    format!("{:?} is not a hosted zone id", r.zone_id),
                    "write the zone id as shown by Route 53, e.g. \"Z0123456789ABCDEFGHIJ\"",
                ));
            }
            check_record_name(&r.name).map_err(|p| {
                bad(
                    f("name"),
                    p,
                    format!(
                        "write a lower-case FQDN with a trailing dot, e.g. {:?}",
                        suggest_name(&r.name)
                    ),
                )
            })?;
            if !(10..=86_400).contains(&r.ttl) {
                return Err(bad(
                    f("ttl"),
                    format!("{} is outside 10..=86400", r.ttl),
                    "use 10-60 s for a fast switch",
                ));
            }
            if !(r.insync_poll_interval_s.is_finite()
                && (0.05..=60.0).contains(&r.insync_poll_interval_s))
            {
                return Err(bad(
                    f("insync_poll_interval_s"),
                    format!("{} is outside 0.05..=60", r.insync_poll_interval_s),
                    "use 2",
                ));
            }
            if !(r.insync_timeout_s.is_finite() && (0.0..=900.0).contains(&r.insync_timeout_s)) {
                return Err(bad(
                    f("insync_timeout_s"),
                    format!("{} is outside 0..=900", r.insync_timeout_s),
                    "use 120 (Route 53 takes up to ~60 s)",
                ));
            }
            if !(r.resolve_delay_s.is_finite() && (0.0..=3600.0).contains(&r.resolve_delay_s)) {
                return Err(bad(
                    f("resolve_delay_s"),
                    format!("{} is outside 0..=3600", r.resolve_delay_s),
                    "use 60 (longer than Route 53 propagation)",
                ));
            }
            match (r.mode, &r.failover) {
                (RecordMode::FailoverRouting, None) => {
                    return Err(bad(
                        f("failover"),
                        "mode = \"failover-routing\" needs this node's failover table",
                        "add failover = { role = \"primary\", health_port = 8080 }",
                    ));
                }
                (RecordMode::Simple, Some(_)) => {
                    return Err(bad(
                        f("failover"),
                        "is set but mode is \"simple\"",
                        "set mode = \"failover-routing\" or remove failover",
                    ));
                }
                (RecordMode::FailoverRouting, Some(fo)) => {
                    if !fo.health_path.starts_with('/') || fo.health_path.len() > 255 {
                        return Err(bad(
                            f("failover.health_path"),
                            format!("{:?} is not an absolute path", fo.health_path),
                            "write e.g. \"/health\"",
                        ));
                    }
                    if fo.request_interval_s != 10 && fo.request_interval_s != 30 {
                        return Err(bad(
                            f("failover.request_interval_s"),
                            format!("{} is neither 10 nor 30", fo.request_interval_s),
                            "Route 53 probes every 10 or 30 s",
                        ));
                    }
                    if !(1..=10).contains(&fo.failure_threshold) {
                        return Err(bad(
                            f("failover.failure_threshold"),
                            format!("{} is outside 1..=10", fo.failure_threshold),
                            "use 3",
                        ));
                    }
                    if fo.health_port == 0 {
                        return Err(bad(
                            f("failover.health_port"),
                            "0 is not a port",
                            "write the port of twinvol's health endpoint",
                        ));
                    }
                }
                (RecordMode::Simple, None) => {}
            }
            if r.value == RecordValue::Vip && self.vip_route.is_none() {
                return Err(bad(
                    f("value"),
                    "\"vip\" but [cloud.vip_route] is absent",
                    "add [cloud.vip_route] or use value = \"node-ip\"",
                ));
            }
            if r.value == RecordValue::Eip && self.eip.is_none() {
                return Err(bad(
                    f("value"),
                    "\"eip\" but [cloud.eip] is absent",
                    "add [cloud.eip] or use value = \"node-ip\"",
                ));
            }
        }
        if let Some(fc) = &self.fence {
            check_id(
                "cloud.fence.peer_instance_id",
                &fc.peer_instance_id,
                "i",
                false,
            )?;
            if fc.peer_instance_id == self.node.instance_id {
                return Err(bad(
                    "cloud.fence.peer_instance_id",
                    "is this node's own instance",
                    "write the peer's instance id",
                ));
            }
            if fc.timeout_s == 0 || fc.poll_interval_ms == 0 {
                return Err(bad(
                    "cloud.fence.timeout_s",
                    "timeout and poll interval must be above zero",
                    "use timeout_s = 120, poll_interval_ms = 1000",
                ));
            }
        }
        if self.monitor.interval_s == 0 {
            return Err(bad(
                "cloud.monitor.interval_s",
                "0 is not an interval",
                "use e.g. 30",
            ));
        }
        if self.vip_route.is_none()
            && self.eip.is_none()
            && self.records.is_empty()
            && self.fence.is_none()
        {
            return Err(bad(
                "cloud",
                "no resource is configured",
                "add [cloud.vip_route], [cloud.eip], [[cloud.route53]] or [cloud.fence]",
            ));
        }
        Ok(())
    }
}

fn suggest_name(name: &str) -> String {
    let mut s = name.trim().to_ascii_lowercase();
    if !s.ends_with('.') {
        s.push('.');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<CloudConfig, String> {
        let c: CloudConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        c.validate()
            .map_err(|e| format!("{}: {}; {}", e.field, e.problem, e.fix))?;
        Ok(c)
    }

    const GOOD: &str = r#"
provider = "aws"
[aws]
region = "eu-west-1"
[node]
instance_id = "i-0123456789abcdef0"
network_interface = "eni-0123456789abcdef0"
[vip_route]
vip = "192.168.100.10"
vpc_id = "vpc-01234567"
route_tables = ["rtb-01234567"]
[eip]
allocation_id = "eipalloc-01234567"
[[route53]]
zone_id = "Z0123456789ABC"
name = "db.example.internal."
value = "vip"
"#;

    #[test]
    fn good_cloud_table_loads_with_defaults() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.records[0].ttl, 30);
        assert_eq!(c.records[0].poll_interval(), Duration::from_secs(2));
        assert_eq!(c.records[0].insync_timeout(), Duration::from_secs(120));
        assert!(!c.monitor.reconcile);
        assert_eq!(c.monitor.on_unreachable, UnreachableAction::Warn);
        assert_eq!(c.vip_route.unwrap().destination(), "192.168.100.10/32");
    }

    #[test]
    fn record_name_without_trailing_dot_names_field_and_fix() {
        let e = parse(&GOOD.replace("db.example.internal.", "DB.example.internal")).unwrap_err();
        assert!(
            e.contains("cloud.route53[0].name") && e.contains("\"db.example.internal.\""),
            "{e}"
        );
    }

    #[test]
    fn upper_case_record_name_is_refused() {
        let e = parse(&GOOD.replace("db.example.internal.", "Db.example.internal.")).unwrap_err();
        assert!(e.contains("not lower case"), "{e}");
    }

    #[test]
    fn single_label_record_name_is_not_fqdn() {
        assert!(check_record_name("db.")
            .unwrap_err()
            .contains("fully qualified"));
        assert!(check_record_name("*.svc.example.").is_ok());
        assert!(check_record_name("a..b.").is_err());
    }

    #[test]
    fn unknown_key_in_cloud_is_named() {
        let e = parse(&GOOD.replace("[eip]", "[eip]\nallocation = \"x\"")).unwrap_err();
        assert!(e.contains("allocation"), "{e}");
    }

    #[test]
    fn malformed_ids_name_the_field() {
        let e = parse(&GOOD.replace("vpc-01234567", "vpc-xyz")).unwrap_err();
        assert!(e.contains("cloud.vip_route.vpc_id"), "{e}");
        let e = parse(&GOOD.replace("rtb-01234567", "rtb-1")).unwrap_err();
        assert!(e.contains("cloud.vip_route.route_tables[0]"), "{e}");
        let e = parse(&GOOD.replace("i-0123456789abcdef0", "i-zz")).unwrap_err();
        assert!(e.contains("\"self\""), "{e}");
    }

    #[test]
    fn self_ids_are_accepted() {
        let c = parse(
            &GOOD
                .replace("\"i-0123456789abcdef0\"", "\"self\"")
                .replace("\"eni-0123456789abcdef0\"", "\"self\""),
        )
        .unwrap();
        assert_eq!(c.node.instance_id, SELF);
    }

    #[test]
    fn vip_value_without_vip_route_is_refused() {
        let text = GOOD.replace("[vip_route]\nvip = \"192.168.100.10\"\nvpc_id = \"vpc-01234567\"\nroute_tables = [\"rtb-01234567\"]\n", "");
        let e = parse(&text).unwrap_err();
        assert!(e.contains("cloud.route53[0].value"), "{e}");
    }

    #[test]
    fn ttl_out_of_range_is_refused() {
        let e = parse(&GOOD.replace("value = \"vip\"", "value = \"vip\"\nttl = 1")).unwrap_err();
        assert!(e.contains("cloud.route53[0].ttl"), "{e}");
    }

    #[test]
    fn literal_address_value_parses() {
        let c =
            parse(&GOOD.replace("value = \"vip\"", "value = { address = \"10.1.2.3\" }")).unwrap();
        assert_eq!(
            c.records[0].value,
            RecordValue::Address(Ipv4Addr::new(10, 1, 2, 3))
        );
    }

    #[test]
    fn failover_routing_needs_this_nodes_failover_table() {
        let e = parse(&GOOD.replace(
            "value = \"vip\"",
            "value = \"vip\"\nmode = \"failover-routing\"",
        ))
        .unwrap_err();
        assert!(e.contains("cloud.route53[0].failover"), "{e}");
        let c = parse(&GOOD.replace(
            "value = \"vip\"",
            "value = \"vip\"\nmode = \"failover-routing\"\nfailover = { role = \"secondary\", health_port = 8080 }",
        ))
        .unwrap();
        let fo = c.records[0].failover.as_ref().unwrap();
        assert_eq!(
            (fo.role, fo.health_path.as_str(), fo.request_interval_s),
            (FailoverRole::Secondary, "/health", 10)
        );
        let e = parse(&GOOD.replace(
            "value = \"vip\"",
            "value = \"vip\"\nmode = \"failover-routing\"\nfailover = { role = \"primary\", health_port = 8080, request_interval_s = 15 }",
        ))
        .unwrap_err();
        assert!(e.contains("request_interval_s"), "{e}");
    }

    proptest::proptest! {
        #[test]
        fn suggested_name_of_a_valid_lowercase_name_is_itself(labels in proptest::collection::vec("[a-z0-9]{1,20}", 2..5)) {
            let name = format!("{}.", labels.join("."));
            proptest::prop_assert!(check_record_name(&name).is_ok());
            proptest::prop_assert_eq!(suggest_name(&name), name);
        }
    }
}
