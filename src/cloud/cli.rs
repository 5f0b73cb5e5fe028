//! `twinvol cloud ...`: preflight, plan, apply and check of the `[cloud]` resources from the
//! command line. main.rs parses [`CloudCommand`] and calls [`run`].
//!
//! Invariant: `preflight`, `plan` and `check` (without `--reconcile`) change nothing; `plan`
//! uses EC2's DryRun for every change it lists.

use std::io::Write;

use anyhow::Context;

use crate::cloud::aws::AwsCloud;
use crate::cloud::Cloud;
use crate::config::Config;

/// The `cloud` subcommands.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum CloudCommand {
    /// Check credentials, endpoints, ids, Source/Dest check, VIP placement and permissions.
    Preflight {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Show what `apply` would change (EC2 changes verified with DryRun); changes nothing.
    Plan {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Point the VIP routes, Elastic IP and records at this node (or release them).
    Apply {
        /// Release instead: disassociate the EIP / delete records where configured.
        #[arg(long)]
        deactivate: bool,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Run one monitor cycle and report drift.
    Check {
        /// Repair drift (re-apply the drifted resources).
        #[arg(long)]
        reconcile: bool,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// Runs one subcommand against `config`'s `[cloud]` table, writing the report to `out`.
/// Returns `Ok(true)` when everything succeeded (preflight all ok, apply without failure,
/// check all ok), `Ok(false)` when the report shows a problem.
pub async fn run(
    command: CloudCommand,
    config: &Config,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<bool> {
    let cloud_cfg = config
        .cloud
        .as_ref()
        .context("the config has no [cloud] table; add one (see examples/aws.toml)")?;
    let cloud = AwsCloud::connect(cloud_cfg)
        .await
        .context("connecting to AWS")?;
    let me = cloud.identity();
    let json = |out: &mut (dyn Write + Send), v: &dyn erased::Json| -> anyhow::Result<()> {
        writeln!(out, "{}", v.to_json()?)?;
        Ok(())
    };
    match command {
        CloudCommand::Preflight { json: as_json } => {
            let checks = cloud.preflight().await;
            if as_json {
                json(out, &checks)?;
            } else {
                writeln!(
                    out,
                    "node {} {} ({}, {})",
                    me.instance_id, me.eni, me.private_ip, me.availability_zone
                )?;
                for c in &checks {
                    writeln!(out, "{c}")?;
                }
            }
            Ok(checks.iter().all(|c| c.result.is_ok()))
        }
        CloudCommand::Plan { json: as_json } => {
            let plan = cloud.plan().await?;
            if as_json {
                json(out, &plan)?;
            } else {
                for p in &plan {
                    writeln!(out, "{p}")?;
                }
                let n = plan.iter().filter(|p| p.change.is_some()).count();
                writeln!(out, "{n} change(s) planned; nothing was changed")?;
            }
            Ok(plan
                .iter()
                .all(|p| !matches!(p.dry_run, crate::cloud::DryRun::WouldFail(_))))
        }
        CloudCommand::Apply {
            deactivate,
            json: as_json,
        } => {
            let report = if deactivate {
                cloud.deactivate().await
            } else {
                cloud.activate().await
            };
            if as_json {
                json(out, &report)?;
            } else {
                writeln!(out, "{report}")?;
            }
            Ok(report.succeeded())
        }
        CloudCommand::Check {
            reconcile,
            json: as_json,
        } => {
            let report = cloud.check_with(reconcile).await;
            if as_json {
                json(out, &report)?;
            } else {
                write!(out, "{report}")?;
            }
            Ok(report.all_ok() || (reconcile && !report.wants_local_recovery()))
        }
    }
}

mod erased {
    /// Object-safe JSON rendering.
    pub trait Json {
        fn to_json(&self) -> serde_json::Result<String>;
    }
    impl<T: serde::Serialize> Json for T {
        fn to_json(&self) -> serde_json::Result<String> {
            serde_json::to_string_pretty(self)
        }
    }
}
