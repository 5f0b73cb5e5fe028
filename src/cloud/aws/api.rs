//! SDK clients and the call policy every AWS request goes through.
//!
//! Invariants: each client has explicit connect and read timeouts and the SDK's standard retry
//! mode with bounded attempts; every call runs under a [`Deadline`] (the earlier of the step
//! limit and the whole operation's limit); throttling that outlives the SDK's attempts is retried
//! here with full-jitter exponential back-off while the deadline allows; every other error is
//! classified into an [`AwsError`]. Calls are counted (operations, not HTTP attempts).

use std::error::Error as StdError;
use std::fmt::Debug;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region};
use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};
use tokio::time::Instant;

use super::error::{classify, AwsError, CallSite};
use crate::config::cloud::AwsConfig;

/// A point in time a call must finish by, and the limit (seconds) reported when it does not.
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    /// When.
    pub at: Instant,
    /// The configured limit behind `at`, for the message.
    pub limit: Duration,
}

impl Deadline {
    /// A deadline `limit` from now.
    pub fn after(limit: Duration) -> Self {
        Self {
            at: Instant::now() + limit,
            limit,
        }
    }
    /// The earlier of `self` and `limit` from now.
    pub fn step(&self, limit: Duration) -> Self {
        let own = Self::after(limit);
        if own.at < self.at {
            own
        } else {
            *self
        }
    }
    /// Time left (zero when passed).
    pub fn remaining(&self) -> Duration {
        self.at.saturating_duration_since(Instant::now())
    }
}

/// Counts of one operation (`service:Action`): issued, failed (any final error), throttled
/// (answers that asked to slow down, each retry counted).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct OpStats {
    /// Operations issued (retries of a throttled call count again).
    pub calls: u64,
    /// Operations that ended in an error.
    pub errors: u64,
    /// Throttling answers.
    pub throttles: u64,
}

/// Per-operation counters since start, keyed `service:Action` (e.g. `ec2:ReplaceRoute`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ApiStats {
    /// One entry per operation used so far.
    pub operations: std::collections::BTreeMap<String, OpStats>,
}

/// The two SDK clients and the policy around them. Cheap to clone (shared).
#[derive(Clone)]
pub struct Api {
    /// EC2 client.
    pub ec2: aws_sdk_ec2::Client,
    /// Route 53 client.
    pub route53: aws_sdk_route53::Client,
    step: Duration,
    calls: Arc<AtomicU64>,
    stats: Arc<std::sync::Mutex<ApiStats>>,
}

/// First back-off of twinvol's own throttling retry (after the SDK's attempts are spent).
const THROTTLE_BASE: Duration = Duration::from_millis(200);
/// Longest single back-off.
const THROTTLE_CAP: Duration = Duration::from_secs(5);

impl Api {
    /// Builds the clients: credentials and region the standard SDK way (environment, profile,
    /// instance profile over IMDSv2), with `region` overriding, and per-service endpoint overrides.
    pub async fn connect(
        cfg: &AwsConfig,
        region: Option<String>,
        imds: Option<aws_config::imds::Client>,
    ) -> Result<Self, AwsError> {
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(Duration::from_millis(cfg.connect_timeout_ms))
            .read_timeout(Duration::from_millis(cfg.read_timeout_ms))
            .operation_timeout(cfg.step_timeout())
            .build();
        let retry = RetryConfig::standard()
            .with_max_attempts(cfg.max_attempts)
            .with_initial_backoff(Duration::from_millis(100))
            .with_max_backoff(Duration::from_secs(2));
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .timeout_config(timeouts)
            .retry_config(retry);
        if let Some(p) = &cfg.profile {
            loader = loader.profile_name(p);
        }
        if let Some(r) = region {
            loader = loader.region(Region::new(r));
        }
        if let Some(imds) = imds {
            let mut chain =
                aws_config::default_provider::credentials::DefaultCredentialsChain::builder()
                    .imds_client(imds);
            if let Some(p) = &cfg.profile {
                chain = chain.profile_name(p);
            }
            loader = loader.credentials_provider(chain.build().await);
        }
        let sdk = loader.load().await;
        if sdk.region().is_none() {
            return Err(AwsError::Region {
                detail: "neither cloud.aws.region, AWS_REGION, the profile nor IMDS gave one"
                    .into(),
            });
        }
        let mut ec2 = aws_sdk_ec2::config::Builder::from(&sdk);
        if let Some(url) = &cfg.endpoints.ec2 {
            ec2 = ec2.endpoint_url(url);
        }
        let mut r53 = aws_sdk_route53::config::Builder::from(&sdk);
        if let Some(url) = &cfg.endpoints.route53 {
            r53 = r53.endpoint_url(url);
        }
        Ok(Self {
            ec2: aws_sdk_ec2::Client::from_conf(ec2.build()),
            route53: aws_sdk_route53::Client::from_conf(r53.build()),
            step: cfg.step_timeout(),
            calls: Arc::new(AtomicU64::new(0)),
            stats: Arc::default(),
        })
    }

    /// Operations issued so far (each counted once, whatever its retries).
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    /// Per-operation counters (calls, errors, throttles) since start.
    pub fn stats(&self) -> ApiStats {
        self.stats.lock().map(|s| s.clone()).unwrap_or_default()
    }

    fn count(&self, site: &CallSite<'_>, f: impl FnOnce(&mut OpStats)) {
        if let Ok(mut s) = self.stats.lock() {
            f(s.operations
                .entry(format!("{}:{}", site.service, site.action))
                .or_default());
        }
    }

    /// The step limit.
    pub fn step_limit(&self) -> Duration {
        self.step
    }

    /// Runs one EC2 operation under the step limit and `outer`.
    pub async fn ec2<T, E, R, F, Fut>(
        &self,
        action: &'static str,
        resource: &str,
        outer: Deadline,
        op: F,
    ) -> Result<T, AwsError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, SdkError<E, R>>>,
        E: ProvideErrorMetadata + StdError + Send + Sync + 'static,
        R: Debug,
    {
        self.call(
            CallSite {
                service: "ec2",
                action,
                resource,
            },
            outer,
            op,
        )
        .await
    }

    /// Runs one Route 53 operation under the step limit and `outer`.
    pub async fn route53<T, E, R, F, Fut>(
        &self,
        action: &'static str,
        resource: &str,
        outer: Deadline,
        op: F,
    ) -> Result<T, AwsError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, SdkError<E, R>>>,
        E: ProvideErrorMetadata + StdError + Send + Sync + 'static,
        R: Debug,
    {
        self.call(
            CallSite {
                service: "route53",
                action,
                resource,
            },
            outer,
            op,
        )
        .await
    }

    async fn call<T, E, R, F, Fut>(
        &self,
        site: CallSite<'_>,
        outer: Deadline,
        op: F,
    ) -> Result<T, AwsError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, SdkError<E, R>>>,
        E: ProvideErrorMetadata + StdError + Send + Sync + 'static,
        R: Debug,
    {
        let deadline = outer.step(self.step);
        let timeout = || AwsError::Timeout {
            seconds: deadline.limit.as_secs().max(1),
            action: site.action,
            resource: site.resource.to_string(),
        };
        let mut attempt: u32 = 0;
        loop {
            self.calls.fetch_add(1, Ordering::Relaxed);
            self.count(&site, |o| o.calls += 1);
            let result = match tokio::time::timeout_at(deadline.at, op()).await {
                Err(_) => {
                    self.count(&site, |o| o.errors += 1);
                    return Err(timeout());
                }
                Ok(r) => r,
            };
            let err = match result {
                Ok(v) => return Ok(v),
                Err(e) => classify(e, site, deadline.limit),
            };
            if !matches!(err, AwsError::Throttled { .. }) {
                self.count(&site, |o| o.errors += 1);
                return Err(err);
            }
            self.count(&site, |o| o.throttles += 1);
            let pause = full_jitter(attempt);
            if pause >= deadline.remaining() {
                self.count(&site, |o| o.errors += 1);
                tracing::warn!(
                    action = site.action,
                    resource = site.resource,
                    "throttled until the deadline"
                );
                return Err(err);
            }
            tracing::info!(
                action = site.action,
                resource = site.resource,
                pause_ms = pause.as_millis() as u64,
                "throttled; backing off"
            );
            tokio::time::sleep(pause).await;
            attempt = attempt.saturating_add(1);
        }
    }
}

/// Full-jitter exponential back-off: uniform in [0, min(cap, base * 2^attempt)].
pub fn full_jitter(attempt: u32) -> Duration {
    let ceiling = THROTTLE_BASE
        .saturating_mul(1u32 << attempt.min(16))
        .min(THROTTLE_CAP);
    let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(random_u64() % nanos.max(1))
}

fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_under_the_capped_ceiling() {
        for attempt in 0..40 {
            let ceiling = THROTTLE_BASE
                .saturating_mul(1u32 << attempt.min(16))
                .min(THROTTLE_CAP);
            for _ in 0..20 {
                assert!(full_jitter(attempt) <= ceiling);
            }
        }
    }

    #[test]
    fn jitter_is_not_constant() {
        let samples: std::collections::HashSet<_> = (0..50).map(|_| full_jitter(3)).collect();
        assert!(samples.len() > 10, "{samples:?}");
    }

    #[tokio::test]
    async fn step_deadline_never_outlives_the_outer_one() {
        let outer = Deadline::after(Duration::from_millis(50));
        let s = outer.step(Duration::from_secs(20));
        assert_eq!(s.limit, Duration::from_millis(50));
        let s = Deadline::after(Duration::from_secs(60)).step(Duration::from_secs(2));
        assert_eq!(s.limit, Duration::from_secs(2));
    }
}
