//! Self-discovery over IMDSv2: instance id, availability zone, region, and ENIs by MAC.
//!
//! Invariant: only IMDSv2 (session token) is used, with explicit timeouts; the endpoint is the
//! configured one, or the SDK's default (AWS_EC2_METADATA_SERVICE_ENDPOINT, else the link-local
//! address).

use std::time::Duration;

use super::error::AwsError;
use crate::config::cloud::AwsConfig;

/// What IMDS says about this instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelfIdentity {
    /// `i-...`.
    pub instance_id: String,
    /// e.g. `eu-west-1a`.
    pub availability_zone: String,
    /// e.g. `eu-west-1`.
    pub region: String,
    /// (device number, MAC, ENI id), sorted by device number.
    pub interfaces: Vec<(u32, String, String)>,
}

impl SelfIdentity {
    /// The ENI at device index 0 (the primary interface).
    pub fn primary_eni(&self) -> Option<&str> {
        self.interfaces
            .iter()
            .find(|(d, _, _)| *d == 0)
            .or(self.interfaces.first())
            .map(|(_, _, e)| e.as_str())
    }
}

/// An IMDSv2 client with the configured endpoint and timeouts.
pub fn client(cfg: &AwsConfig) -> Result<aws_config::imds::Client, AwsError> {
    let mut b = aws_config::imds::Client::builder()
        .connect_timeout(Duration::from_millis(cfg.connect_timeout_ms))
        .read_timeout(Duration::from_millis(cfg.read_timeout_ms))
        .max_attempts(cfg.max_attempts);
    if let Some(url) = &cfg.endpoints.imds {
        b = b.endpoint(url).map_err(|e| AwsError::Imds {
            what: format!("endpoint {url}"),
            detail: e.to_string(),
        })?;
    }
    Ok(b.build())
}

async fn get(c: &aws_config::imds::Client, path: &str) -> Result<String, AwsError> {
    c.get(format!("/latest/meta-data/{path}"))
        .await
        .map(|s| s.as_ref().trim().to_string())
        .map_err(|e| AwsError::Imds {
            what: format!("/latest/meta-data/{path}"),
            detail: super::error_chain(&e),
        })
}

/// Asks IMDSv2 who this instance is.
pub async fn discover(c: &aws_config::imds::Client) -> Result<SelfIdentity, AwsError> {
    let instance_id = get(c, "instance-id").await?;
    let availability_zone = get(c, "placement/availability-zone").await?;
    let region = match get(c, "placement/region").await {
        Ok(r) => r,
        Err(_) => availability_zone
            .trim_end_matches(|ch: char| ch.is_ascii_lowercase())
            .to_string(),
    };
    let macs = get(c, "network/interfaces/macs/").await?;
    let mut interfaces = Vec::new();
    for mac in macs
        .lines()
        .map(|l| l.trim().trim_end_matches('/'))
        .filter(|l| !l.is_empty())
    {
        let eni = get(c, &format!("network/interfaces/macs/{mac}/interface-id")).await?;
        let dev = get(c, &format!("network/interfaces/macs/{mac}/device-number")).await?;
        let dev = dev.parse::<u32>().map_err(|_| AwsError::Imds {
            what: format!("device-number of {mac}"),
            detail: format!("{dev:?} is not a number"),
        })?;
        interfaces.push((dev, mac.to_string(), eni));
    }
    interfaces.sort();
    if !instance_id.starts_with("i-") {
        return Err(AwsError::Imds {
            what: "instance-id".into(),
            detail: format!("{instance_id:?} is not an instance id"),
        });
    }
    Ok(SelfIdentity {
        instance_id,
        availability_zone,
        region,
        interfaces,
    })
}
