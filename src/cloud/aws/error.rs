//! Classification of AWS SDK errors into the messages users of AWS HA agents know.
//!
//! Invariant: every error leaving the `cloud` room is an [`AwsError`] whose message names the
//! resource (route table, ENI, allocation, zone) and, where there is one, the fix.

use std::error::Error as StdError;
use std::fmt::Debug;
use std::time::Duration;

use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};

/// EC2 and Route 53 error codes that mean "slow down"; retried with jittered back-off.
pub const THROTTLING_CODES: &[&str] = &[
    "RequestLimitExceeded",
    "Throttling",
    "ThrottlingException",
    "PriorRequestNotComplete",
    "RequestThrottled",
    "EC2ThrottledException",
];

/// Errors of the AWS provider.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AwsError {
    /// No credentials could be found, or AWS refused them.
    #[error("AWS credentials are missing or wrong ({detail}); attach an instance profile to the instance, or set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile")]
    Credentials {
        /// What the SDK or AWS said.
        detail: String,
    },
    /// No region is configured and none could be discovered.
    #[error("no AWS region is configured ({detail}); set cloud.aws.region = \"eu-west-1\" (or \"self\"), or AWS_REGION")]
    Region {
        /// Why discovery failed.
        detail: String,
    },
    /// The VPC does not exist (wrong id or wrong region).
    #[error("The vpc ID '{0}' does not exist (check cloud.vip_route.vpc_id and the region)")]
    VpcNotFound(String),
    /// The ENI does not exist.
    #[error("The networkInterface ID '{0}' does not exist (check cloud.node.network_interface and the region)")]
    EniNotFound(String),
    /// The Elastic IP allocation does not exist.
    #[error(
        "The allocation ID '{0}' does not exist (check cloud.eip.allocation_id and the region)"
    )]
    AllocationNotFound(String),
    /// A route table does not exist.
    #[error("The routeTable ID '{0}' does not exist (check cloud.vip_route.route_tables and the region)")]
    RouteTableNotFound(String),
    /// An instance does not exist.
    #[error("The instance ID '{0}' does not exist (check the instance id and the region)")]
    InstanceNotFound(String),
    /// The hosted zone does not exist.
    #[error("No hosted zone found with ID: {0} (check cloud.route53 zone_id)")]
    HostedZoneNotFound(String),
    /// IAM refused the call.
    #[error("You are not authorized to perform this operation: {action} on {resource}; allow {service}:{action} on it in the node's IAM policy")]
    Unauthorized {
        /// `ec2` or `route53`.
        service: &'static str,
        /// API action, e.g. `ReplaceRoute`.
        action: &'static str,
        /// The resource it was called on, e.g. `rtb-0abc`.
        resource: String,
    },
    /// A step or the whole activation ran out of time.
    #[error("Command was not completed within {seconds} seconds: {action} on {resource} (Timeout occurred; check the endpoint, VPC endpoint, NAT or proxy, and the node's load)")]
    Timeout {
        /// The limit that fired.
        seconds: u64,
        /// API action.
        action: &'static str,
        /// The resource.
        resource: String,
    },
    /// The endpoint could not be reached, or the connection broke.
    #[error("cannot reach the {service} API for {action} on {resource}: {detail} (check the endpoint, VPC endpoint, NAT or proxy)")]
    Unreachable {
        /// `ec2` or `route53`.
        service: &'static str,
        /// API action.
        action: &'static str,
        /// The resource.
        resource: String,
        /// Transport error.
        detail: String,
    },
    /// Throttling persisted until the step deadline.
    #[error("{service} throttled {action} on {resource} ({code}) until the deadline; lower the monitor frequency or ask AWS for a higher limit")]
    Throttled {
        /// `ec2` or `route53`.
        service: &'static str,
        /// API action.
        action: &'static str,
        /// The resource.
        resource: String,
        /// The throttling code.
        code: String,
    },
    /// The VIP lies inside a CIDR block of the VPC: AWS routes such addresses itself.
    #[error("The VIP address {vip} belongs to a VPC subnet ({cidr} of {vpc}); choose an address outside every CIDR block of the VPC")]
    VipInsideVpc {
        /// The VIP.
        vip: String,
        /// The CIDR block holding it.
        cidr: String,
        /// The VPC.
        vpc: String,
    },
    /// The ENI forwards only its own addresses.
    #[error("Source/Dest check is enabled on {eni}: traffic to the VIP will be dropped; disable it (aws ec2 modify-network-interface-attribute --network-interface-id {eni} --no-source-dest-check); instances restored from an AMI come up with it enabled again")]
    SourceDestCheckEnabled {
        /// The ENI.
        eni: String,
    },
    /// The configured ENI is attached elsewhere.
    #[error("{eni} is attached to {attached}, not to this instance {instance}; set cloud.node.network_interface to an ENI of this instance (or \"self\")")]
    EniNotOnInstance {
        /// The ENI.
        eni: String,
        /// This instance.
        instance: String,
        /// Where it is attached ("nothing" if detached).
        attached: String,
    },
    /// The availability zone is unknown in the region.
    #[error("Invalid availability zone: [{0}]")]
    InvalidAvailabilityZone(String),
    /// IMDSv2 did not answer or answered nonsense.
    #[error("instance metadata (IMDSv2) {what}: {detail}; check that IMDS is enabled with http-tokens required and a hop limit of 2 for containers, or write the ids instead of \"self\"")]
    Imds {
        /// What was asked.
        what: String,
        /// Why it failed.
        detail: String,
    },
    /// AWS answered something twinvol does not expect.
    #[error("{action} on {resource} answered unexpectedly: {detail}")]
    Unexpected {
        /// API action.
        action: &'static str,
        /// The resource.
        resource: String,
        /// What was wrong.
        detail: String,
    },
    /// Any other AWS error, with its code and message.
    #[error("{action} on {resource} failed: {code}: {message}")]
    Api {
        /// API action.
        action: &'static str,
        /// The resource.
        resource: String,
        /// AWS error code.
        code: String,
        /// AWS error message.
        message: String,
    },
}

impl AwsError {
    /// True for errors that say nothing about the resource itself: the API could not be asked.
    /// A monitor reports these as "unknown", never as drift.
    pub fn is_unobservable(&self) -> bool {
        matches!(
            self,
            AwsError::Timeout { .. }
                | AwsError::Unreachable { .. }
                | AwsError::Throttled { .. }
                | AwsError::Credentials { .. }
                | AwsError::Unauthorized { .. }
                | AwsError::Region { .. }
        ) || matches!(self, AwsError::Api { code, .. } if code.starts_with("InternalError") || code == "ServiceUnavailable" || code == "Unavailable" || code == "InternalFailure")
    }

    /// The AWS error code, if the error came from an answer with one.
    pub fn code(&self) -> Option<&str> {
        match self {
            AwsError::Api { code, .. } | AwsError::Throttled { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// The context a call was made in, for the message.
#[derive(Debug, Clone, Copy)]
pub struct CallSite<'a> {
    /// `ec2` or `route53`.
    pub service: &'static str,
    /// API action.
    pub action: &'static str,
    /// The resource the call is about.
    pub resource: &'a str,
}

/// The first quoted id in an AWS message (`The vpc ID 'vpc-1' does not exist` -> `vpc-1`).
/// Quoted parts that are not ids (moto quotes a Python set: `'{'eipalloc-1'}'`) are skipped.
pub fn quoted_id(message: &str) -> Option<&str> {
    let parts: Vec<&str> = message.split('\'').collect();
    let inner = parts.get(1..parts.len().saturating_sub(1))?;
    inner.iter().copied().find(|p| {
        !p.is_empty()
            && p.bytes().any(|b| b.is_ascii_alphanumeric())
            && p.bytes().all(|b| {
                b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.' || b == b'/'
            })
    })
}

/// Maps an AWS error code and message to an [`AwsError`].
pub fn from_code(site: CallSite<'_>, code: &str, message: &str) -> AwsError {
    let id = || quoted_id(message).unwrap_or(site.resource).to_string();
    match code {
        "InvalidVpcID.NotFound" => AwsError::VpcNotFound(id()),
        "InvalidNetworkInterfaceID.NotFound" | "InvalidNetworkInterfaceId.Malformed" => {
            AwsError::EniNotFound(id())
        }
        "InvalidAllocationID.NotFound" => AwsError::AllocationNotFound(id()),
        "InvalidRouteTableID.NotFound" | "InvalidRouteTableId.NotFound" => {
            AwsError::RouteTableNotFound(id())
        }
        "InvalidInstanceID.NotFound" | "InvalidInstanceID.Malformed" => {
            AwsError::InstanceNotFound(id())
        }
        "NoSuchHostedZone" => AwsError::HostedZoneNotFound(site.resource.to_string()),
        "UnauthorizedOperation" | "AccessDenied" | "AccessDeniedException" | "OptInRequired" => {
            AwsError::Unauthorized {
                service: site.service,
                action: site.action,
                resource: site.resource.to_string(),
            }
        }
        "AuthFailure"
        | "InvalidClientTokenId"
        | "SignatureDoesNotMatch"
        | "UnrecognizedClientException"
        | "ExpiredToken"
        | "InvalidAccessKeyId" => AwsError::Credentials {
            detail: format!("{code}: {message}"),
        },
        c if THROTTLING_CODES.contains(&c) => AwsError::Throttled {
            service: site.service,
            action: site.action,
            resource: site.resource.to_string(),
            code: c.to_string(),
        },
        _ => AwsError::Api {
            action: site.action,
            resource: site.resource.to_string(),
            code: code.to_string(),
            message: message.to_string(),
        },
    }
}

fn chain(e: &dyn StdError) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Classifies an SDK error; `limit` is the step limit reported for SDK-level timeouts.
pub fn classify<E, R>(err: SdkError<E, R>, site: CallSite<'_>, limit: Duration) -> AwsError
where
    E: ProvideErrorMetadata + StdError + Send + Sync + 'static,
    R: Debug,
{
    let unreachable = |detail: String| AwsError::Unreachable {
        service: site.service,
        action: site.action,
        resource: site.resource.to_string(),
        detail,
    };
    let timeout = || AwsError::Timeout {
        seconds: limit.as_secs().max(1),
        action: site.action,
        resource: site.resource.to_string(),
    };
    let text = chain(&err);
    match &err {
        SdkError::TimeoutError(_) => timeout(),
        SdkError::DispatchFailure(d) if d.is_timeout() => timeout(),
        SdkError::DispatchFailure(_) => {
            if text.to_ascii_lowercase().contains("credential") {
                AwsError::Credentials { detail: text }
            } else {
                unreachable(text)
            }
        }
        SdkError::ServiceError(ctx) => {
            let e = ctx.err();
            match e.code() {
                Some(code) => from_code(site, code, e.message().unwrap_or("")),
                None => AwsError::Api {
                    action: site.action,
                    resource: site.resource.to_string(),
                    code: "Unknown".into(),
                    message: text,
                },
            }
        }
        SdkError::ConstructionFailure(_) => {
            let lower = text.to_ascii_lowercase();
            if lower.contains("region") {
                AwsError::Region { detail: text }
            } else if lower.contains("credential") {
                AwsError::Credentials { detail: text }
            } else {
                AwsError::Unexpected {
                    action: site.action,
                    resource: site.resource.to_string(),
                    detail: text,
                }
            }
        }
        // ResponseError: the connection broke mid-answer or the body was not AWS's.
        _ => unreachable(text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SITE: CallSite<'static> = CallSite {
        service: "ec2",
        action: "ReplaceRoute",
        resource: "rtb-0123",
    };

    #[test]
    fn unauthorized_names_action_and_route_table() {
        let e = from_code(
            SITE,
            "UnauthorizedOperation",
            "You are not authorized to perform this operation.",
        )
        .to_string();
        assert!(
            e.starts_with(
                "You are not authorized to perform this operation: ReplaceRoute on rtb-0123"
            ),
            "{e}"
        );
        assert!(e.contains("ec2:ReplaceRoute"), "{e}");
    }

    #[test]
    fn not_found_takes_the_id_from_the_aws_message() {
        let e = from_code(
            SITE,
            "InvalidVpcID.NotFound",
            "The vpc ID 'vpc-x' does not exist",
        );
        assert_eq!(e, AwsError::VpcNotFound("vpc-x".into()));
        assert!(e
            .to_string()
            .starts_with("The vpc ID 'vpc-x' does not exist"));
        let e = from_code(
            SITE,
            "InvalidNetworkInterfaceID.NotFound",
            "The networkInterface ID 'eni-9' does not exist",
        );
        assert!(e
            .to_string()
            .starts_with("The networkInterface ID 'eni-9' does not exist"));
    }

    #[test]
    fn quoted_python_set_yields_the_id_inside() {
        assert_eq!(
            quoted_id("Allocation ID '{'eipalloc-1a'}' not found."),
            Some("eipalloc-1a")
        );
        assert_eq!(quoted_id("no quotes"), None);
        assert_eq!(quoted_id("one ' quote"), None);
    }

    #[test]
    fn throttling_codes_are_classified_as_throttled() {
        for c in [
            "RequestLimitExceeded",
            "Throttling",
            "PriorRequestNotComplete",
        ] {
            assert!(
                matches!(from_code(SITE, c, ""), AwsError::Throttled { .. }),
                "{c}"
            );
            assert!(from_code(SITE, c, "").is_unobservable());
        }
    }

    #[test]
    fn unknown_codes_keep_code_and_message() {
        let e = from_code(SITE, "Gremlins", "it broke").to_string();
        assert_eq!(e, "ReplaceRoute on rtb-0123 failed: Gremlins: it broke");
    }

    proptest::proptest! {
        #[test]
        fn quoted_id_round_trips(id in "[a-z]{1,8}-[0-9a-f]{8,17}", pre in "[A-Za-z ]{0,20}", post in "[A-Za-z ]{0,20}") {
            let msg = format!("{pre}'{id}'{post}");
            proptest::prop_assert_eq!(quoted_id(&msg), Some(id.as_str()));
        }

        #[test]
        fn quoted_id_never_panics(msg in ".{0,64}") {
            let _ = quoted_id(&msg);
        }
    }
}
