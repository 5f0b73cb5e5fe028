//! A VPC world in moto, built through the SDK directly (never through the fault proxy): public
//! and private route tables holding the VIP, two instances with one ENI each, an Elastic IP and
//! a private hosted zone.

use aws_sdk_ec2::types::{AttributeBooleanValue, DomainType, Filter};
use aws_sdk_route53::types::{HostedZoneConfig, Vpc, VpcRegion};

use twinvol::config::cloud::CloudConfig;

/// The VIP used throughout (outside the VPC's 10.0.0.0/16).
pub const VIP: &str = "192.168.100.10";
/// The record name.
pub const RECORD: &str = "db.example.internal.";

/// Sets fake static credentials and turns IMDS off, once per test binary.
pub fn fake_aws_env() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        std::env::set_var("AWS_ACCESS_KEY_ID", "testing");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "testing");
        std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
        std::env::set_var("AWS_CONFIG_FILE", "/nonexistent/twinvol-test-aws-config");
        std::env::set_var(
            "AWS_SHARED_CREDENTIALS_FILE",
            "/nonexistent/twinvol-test-aws-credentials",
        );
        std::env::remove_var("AWS_PROFILE");
        std::env::remove_var("AWS_SESSION_TOKEN");
    });
}

/// One node of the pair.
#[derive(Debug, Clone)]
pub struct Node {
    /// Instance id.
    pub instance: String,
    /// Its (only) ENI.
    pub eni: String,
    /// The ENI's private address.
    pub ip: String,
    /// Its AZ.
    pub az: String,
}

/// The world.
pub struct World {
    /// EC2 client straight to moto.
    pub ec2: aws_sdk_ec2::Client,
    /// Route 53 client straight to moto.
    pub r53: aws_sdk_route53::Client,
    /// The VPC.
    pub vpc: String,
    /// Public, private-a, private-b tables: all hold the VIP.
    pub tables: Vec<String>,
    /// The VPC's main table: does not hold the VIP.
    pub main_table: String,
    /// Node A.
    pub a: Node,
    /// Node B.
    pub b: Node,
    /// EIP allocation.
    pub alloc: String,
    /// EIP public address.
    pub eip: String,
    /// Hosted zone id (without /hostedzone/).
    pub zone: String,
}

/// SDK clients with fake static credentials, straight to `url`.
pub fn clients(url: &str) -> (aws_sdk_ec2::Client, aws_sdk_route53::Client) {
    let creds = aws_sdk_ec2::config::Credentials::new("testing", "testing", None, None, "test");
    let ec2 = aws_sdk_ec2::Config::builder()
        .behavior_version(aws_sdk_ec2::config::BehaviorVersion::latest())
        .region(aws_sdk_ec2::config::Region::new("us-east-1"))
        .credentials_provider(creds.clone())
        .endpoint_url(url)
        .build();
    let r53 = aws_sdk_route53::Config::builder()
        .behavior_version(aws_sdk_route53::config::BehaviorVersion::latest())
        .region(aws_sdk_route53::config::Region::new("us-east-1"))
        .credentials_provider(creds)
        .endpoint_url(url)
        .build();
    (
        aws_sdk_ec2::Client::from_conf(ec2),
        aws_sdk_route53::Client::from_conf(r53),
    )
}

async fn node(ec2: &aws_sdk_ec2::Client, subnet: &str, az: &str) -> Node {
    let out = ec2
        .run_instances()
        .image_id("ami-12c6146b")
        .instance_type(aws_sdk_ec2::types::InstanceType::T3Micro)
        .min_count(1)
        .max_count(1)
        .subnet_id(subnet)
        .send()
        .await
        .unwrap();
    let inst = &out.instances()[0];
    let ni = &inst.network_interfaces()[0];
    let eni = ni.network_interface_id().unwrap().to_string();
    ec2.modify_network_interface_attribute()
        .network_interface_id(&eni)
        .source_dest_check(AttributeBooleanValue::builder().value(false).build())
        .send()
        .await
        .unwrap();
    Node {
        instance: inst.instance_id().unwrap().into(),
        eni,
        ip: ni.private_ip_address().unwrap().into(),
        az: az.into(),
    }
}

impl World {
    /// Builds the world; the VIP routes start at node B (left over from an earlier activation).
    pub async fn build(moto_url: &str) -> World {
        fake_aws_env();
        let (ec2, r53) = clients(moto_url);
        let vpc = ec2
            .create_vpc()
            .cidr_block("10.0.0.0/16")
            .send()
            .await
            .unwrap()
            .vpc()
            .unwrap()
            .vpc_id()
            .unwrap()
            .to_string();
        let subnet = |cidr: &'static str, az: &'static str| {
            let ec2 = ec2.clone();
            let vpc = vpc.clone();
            async move {
                ec2.create_subnet()
                    .vpc_id(vpc)
                    .cidr_block(cidr)
                    .availability_zone(az)
                    .send()
                    .await
                    .unwrap()
                    .subnet()
                    .unwrap()
                    .subnet_id()
                    .unwrap()
                    .to_string()
            }
        };
        let sa = subnet("10.0.1.0/24", "us-east-1a").await;
        let sb = subnet("10.0.2.0/24", "us-east-1b").await;
        let a = node(&ec2, &sa, "us-east-1a").await;
        let b = node(&ec2, &sb, "us-east-1b").await;
        let igw = ec2
            .create_internet_gateway()
            .send()
            .await
            .unwrap()
            .internet_gateway()
            .unwrap()
            .internet_gateway_id()
            .unwrap()
            .to_string();
        ec2.attach_internet_gateway()
            .internet_gateway_id(&igw)
            .vpc_id(&vpc)
            .send()
            .await
            .unwrap();
        let main_table = ec2
            .describe_route_tables()
            .filters(Filter::builder().name("vpc-id").values(&vpc).build())
            .send()
            .await
            .unwrap()
            .route_tables()[0]
            .route_table_id()
            .unwrap()
            .to_string();
        let mut tables = Vec::new();
        for i in 0..3 {
            let t = ec2
                .create_route_table()
                .vpc_id(&vpc)
                .send()
                .await
                .unwrap()
                .route_table()
                .unwrap()
                .route_table_id()
                .unwrap()
                .to_string();
            if i == 0 {
                ec2.create_route()
                    .route_table_id(&t)
                    .destination_cidr_block("0.0.0.0/0")
                    .gateway_id(&igw)
                    .send()
                    .await
                    .unwrap();
            }
            ec2.create_route()
                .route_table_id(&t)
                .destination_cidr_block(format!("{VIP}/32"))
                .network_interface_id(&b.eni)
                .send()
                .await
                .unwrap();
            tables.push(t);
        }
        tables.sort();
        let addr = ec2
            .allocate_address()
            .domain(DomainType::Vpc)
            .send()
            .await
            .unwrap();
        let zone = r53
            .create_hosted_zone()
            .name("example.internal.")
            .caller_reference(format!("twinvol-{}", std::process::id()))
            .vpc(
                Vpc::builder()
                    .vpc_region(VpcRegion::UsEast1)
                    .vpc_id(&vpc)
                    .build(),
            )
            .hosted_zone_config(HostedZoneConfig::builder().private_zone(true).build())
            .send()
            .await
            .unwrap()
            .hosted_zone()
            .unwrap()
            .id()
            .trim_start_matches("/hostedzone/")
            .to_string();
        World {
            ec2,
            r53,
            vpc,
            tables,
            main_table,
            a,
            b,
            alloc: addr.allocation_id().unwrap().into(),
            eip: addr.public_ip().unwrap().into(),
            zone,
        }
    }

    /// The TOML of `[cloud]` for `me` (fencing `peer`), with both APIs at `url`.
    pub fn toml(&self, me: &Node, peer: &Node, url: &str) -> String {
        format!(
            r#"
provider = "aws"
[aws]
region = "us-east-1"
step_timeout_s = 10
activation_timeout_s = 30
max_attempts = 3
[aws.endpoints]
ec2 = "{url}"
route53 = "{url}"
[node]
instance_id = "{inst}"
network_interface = "{eni}"
[vip_route]
vip = "{VIP}"
vpc_id = "{vpc}"
[eip]
allocation_id = "{alloc}"
disassociate_on_deactivate = true
[[route53]]
zone_id = "{zone}"
name = "{RECORD}"
ttl = 30
insync_poll_interval_s = 0.05
insync_timeout_s = 5
[fence]
peer_instance_id = "{peer}"
timeout_s = 10
poll_interval_ms = 100
[monitor]
interval_s = 5
"#,
            inst = me.instance,
            eni = me.eni,
            vpc = self.vpc,
            alloc = self.alloc,
            zone = self.zone,
            peer = peer.instance,
        )
    }

    /// The parsed and validated config for `me`, changed by `edit`.
    pub fn config(
        &self,
        me: &Node,
        peer: &Node,
        url: &str,
        edit: impl FnOnce(&mut CloudConfig),
    ) -> CloudConfig {
        let mut c: CloudConfig = toml::from_str(&self.toml(me, peer, url)).unwrap();
        edit(&mut c);
        c.validate()
            .unwrap_or_else(|e| panic!("test config invalid: {e:?}"));
        c
    }

    /// Where each VIP table routes the VIP (table, eni or "-").
    pub async fn vip_targets(&self) -> Vec<(String, String)> {
        let out = self
            .ec2
            .describe_route_tables()
            .filters(Filter::builder().name("vpc-id").values(&self.vpc).build())
            .send()
            .await
            .unwrap();
        let mut v: Vec<(String, String)> = out
            .route_tables()
            .iter()
            .map(|t| {
                let target = t
                    .routes()
                    .iter()
                    .find(|r| r.destination_cidr_block() == Some(&format!("{VIP}/32")))
                    .map_or("-".to_string(), |r| {
                        r.network_interface_id().unwrap_or("?").to_string()
                    });
                (t.route_table_id().unwrap().to_string(), target)
            })
            .collect();
        v.sort();
        v
    }

    /// Where the VIP goes in the three VIP tables.
    pub async fn vip_tables_point_at(&self, eni: &str) -> bool {
        let t = self.vip_targets().await;
        self.tables
            .iter()
            .all(|id| t.iter().any(|(i, e)| i == id && e == eni))
    }

    /// The ENI the EIP is associated with.
    pub async fn eip_eni(&self) -> Option<String> {
        let out = self
            .ec2
            .describe_addresses()
            .allocation_ids(&self.alloc)
            .send()
            .await
            .unwrap();
        out.addresses()[0]
            .network_interface_id()
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    }

    /// The record's values.
    pub async fn record_values(&self) -> Vec<String> {
        let out = self
            .r53
            .list_resource_record_sets()
            .hosted_zone_id(&self.zone)
            .send()
            .await
            .unwrap();
        out.resource_record_sets()
            .iter()
            .filter(|s| s.name() == RECORD && s.r#type().as_str() == "A")
            .flat_map(|s| s.resource_records().iter().map(|r| r.value().to_string()))
            .collect()
    }

    /// Points one table's VIP route at `eni` behind twinvol's back.
    pub async fn hijack(&self, table: &str, eni: &str) {
        self.ec2
            .replace_route()
            .route_table_id(table)
            .destination_cidr_block(format!("{VIP}/32"))
            .network_interface_id(eni)
            .send()
            .await
            .unwrap();
    }
}
