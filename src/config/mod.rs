//! `config`: the TOML schema of /etc/twinvol/twinvol.toml, loading, and validation whose errors
//! name the field and the fix.
//!
//! Unknown fields are errors (a misspelt key must never be silently ignored). Validation that
//! needs no I/O lives in [`Config::validate`]; it never touches devices or the network.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::engine::{CacheMode, EngineKind};

pub mod cloud;
pub mod replication;

pub use cloud::CloudConfig;
pub use replication::{
    DiskErrorPolicy, MetadataPlacement, ReplicationConfig, ReplicationMode, SplitBrainPolicy,
};
pub mod cluster;

pub use cluster::ClusterConfig;

/// Errors loading a configuration file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source} (pass --config with the right path)")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The TOML is malformed, a field has the wrong type, or a field is unknown.
    #[error("config {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's account, naming the key, line and column.
        message: String,
    },
    /// A field has a value twinvol cannot use.
    #[error("config {path}: field `{field}`: {problem}; {fix}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Dotted path of the field, e.g. `volume[0].device`.
        field: String,
        /// What is wrong with the value.
        problem: String,
        /// What to write instead.
        fix: String,
    },
}

/// Engine choice in a config file: a specific backend, or probe at start-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineChoice {
    /// io_uring if the kernel allows it, else sync (the choice is logged).
    #[default]
    Auto,
    /// Always io_uring; fail if unavailable.
    Uring,
    /// Always the blocking-pool backend.
    Sync,
}

impl EngineChoice {
    /// The forced backend, if any.
    pub fn forced(self) -> Option<EngineKind> {
        match self {
            EngineChoice::Auto => None,
            EngineChoice::Uring => Some(EngineKind::Uring),
            EngineChoice::Sync => Some(EngineKind::Sync),
        }
    }
}

/// The whole file.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This node.
    pub node: NodeConfig,
    /// Volumes served by this node (at least one).
    #[serde(rename = "volume")]
    pub volumes: Vec<VolumeConfig>,
    /// Network identity and fencing in the cloud (`[cloud]`); absent: none is moved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud: Option<CloudConfig>,
    /// The node daemon (`[cluster]`): peer, heartbeats, witness, fencing; absent: no daemon.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterConfig>,
}

/// Identity of this node.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Short name of this node, unique in the pair (letters, digits, '-', '_').
    pub id: String,
}

/// One volume: a local device and how it is exported.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeConfig {
    /// Name of the volume (letters, digits, '-', '_'); used in device links and status.
    pub name: String,
    /// Backing device. Use a stable name: /dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_vol...
    pub device: PathBuf,
    /// I/O backend.
    #[serde(default)]
    pub engine: EngineChoice,
    /// Page-cache mode.
    #[serde(default = "default_cache")]
    pub cache: CacheMode,
    /// How the volume is exported over NBD.
    #[serde(default)]
    pub export: ExportConfig,
    /// Mirroring to the peer (`[volume.replication]`); absent: a local-only volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication: Option<ReplicationConfig>,
    /// Kernel attach of the export to /dev/nbdN while Primary (`[volume.attach]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attach: Option<AttachConfig>,
    /// Filesystem mount while Primary (`[volume.mount]`), after the attach.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mount: Option<MountConfig>,
}

/// `[volume.attach]`: the bring-up attaches the volume's export (its Unix socket) to a kernel
/// NBD device with `twinvol attach`, and detaches it at teardown.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct AttachConfig {
    /// The kernel device, e.g. /dev/nbd0.
    pub device: PathBuf,
    /// Connections the kernel spreads I/O over (default 1).
    #[serde(default = "default_attach_connections")]
    pub connections: usize,
}

fn default_attach_connections() -> usize {
    1
}

/// `[volume.mount]`: the bring-up mounts a filesystem after the attach and unmounts it at
/// teardown (before the detach).
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct MountConfig {
    /// The mount point (created if missing).
    pub path: PathBuf,
    /// Filesystem type, e.g. "ext4" or "xfs".
    pub fstype: String,
    /// Mount options (default "defaults").
    #[serde(default = "default_mount_options")]
    pub options: String,
    /// What to mount; default: the `[volume.attach]` device.
    #[serde(default)]
    pub source: Option<PathBuf>,
}

fn default_mount_options() -> String {
    "defaults".into()
}

fn default_cache() -> CacheMode {
    CacheMode::None
}

/// NBD export settings of a volume.
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExportConfig {
    /// Unix socket path to listen on.
    pub socket: Option<PathBuf>,
    /// TCP address to listen on (loopback unless the operator says otherwise).
    pub listen: Option<SocketAddr>,
    /// Export name clients ask for; empty by default.
    #[serde(default)]
    pub name: String,
    /// Refuse writes.
    #[serde(default)]
    pub read_only: bool,
}

fn valid_ident(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

impl Config {
    /// Reads, parses and validates a file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Parses and validates TOML text; `path` is used in messages only.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.into(),
            message: e.to_string(),
        })?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Checks values that parse but cannot work. Warnings (not errors) are logged.
    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |field: String, problem: String, fix: &str| ConfigError::Invalid {
            path: path.into(),
            field,
            problem,
            fix: fix.into(),
        };
        if !valid_ident(&self.node.id) {
            return Err(invalid(
                "node.id".into(),
                format!("{:?} is not a valid node name", self.node.id),
                "use 1-64 letters, digits, '-' or '_', e.g. id = \"node-a\"",
            ));
        }
        if self.volumes.is_empty() {
            return Err(invalid(
                "volume".into(),
                "no volume is configured".into(),
                "add a [[volume]] table with name and device",
            ));
        }
        if let Some(c) = &self.cloud {
            c.validate()
                .map_err(|e| invalid(e.field, e.problem, &e.fix))?;
        }
        if let Some(c) = &self.cluster {
            c.validate(&self.node.id)
                .map_err(|e| invalid(e.field, e.problem, &e.fix))?;
        }
        let mut names = std::collections::HashSet::new();
        for (i, v) in self.volumes.iter().enumerate() {
            if !valid_ident(&v.name) {
                return Err(invalid(
                    format!("volume[{i}].name"),
                    format!("{:?} is not a valid volume name", v.name),
                    "use 1-64 letters, digits, '-' or '_', e.g. name = \"data\"",
                ));
            }
            if !names.insert(v.name.as_str()) {
                return Err(invalid(
                    format!("volume[{i}].name"),
                    format!("{:?} is used twice", v.name),
                    "give every volume its own name",
                ));
            }
            if !v.device.is_absolute() {
                return Err(invalid(
                    format!("volume[{i}].device"),
                    format!("{} is not an absolute path", v.device.display()),
                    "use a stable absolute path such as /dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_vol0123...",
                ));
            }
            if unstable_device_name(&v.device) {
                tracing::warn!(
                    volume = %v.name,
                    device = %v.device.display(),
                    "device names like /dev/nvmeXnY change across reboots; use /dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_vol... instead"
                );
            }
            if v.export.socket.is_none() && v.export.listen.is_none() {
                return Err(invalid(
                    format!("volume[{i}].export"),
                    "neither socket nor listen is set".into(),
                    "set export.socket = \"/run/twinvol/<volume>.sock\" or export.listen = \"127.0.0.1:10809\"",
                ));
            }
            if let Some(r) = &v.replication {
                r.validate(&self.node.id).map_err(|p| {
                    invalid(
                        format!("volume[{i}].replication.{}", p.field),
                        p.problem,
                        &p.fix,
                    )
                })?;
            }
            if let Some(a) = &v.attach {
                let d = a.device.to_string_lossy();
                let index = d.strip_prefix("/dev/nbd").unwrap_or("");
                if index.is_empty() || !index.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(invalid(
                        format!("volume[{i}].attach.device"),
                        format!("{} is not an NBD device", a.device.display()),
                        "use /dev/nbdN (modprobe nbd creates them)",
                    ));
                }
                if v.export.socket.is_none() {
                    return Err(invalid(
                        format!("volume[{i}].attach"),
                        "kernel attach connects to the export's Unix socket, and none is set"
                            .into(),
                        "set export.socket = \"/run/twinvol/<volume>.sock\"",
                    ));
                }
                if !(1..=16).contains(&a.connections) {
                    return Err(invalid(
                        format!("volume[{i}].attach.connections"),
                        format!("{} is out of range", a.connections),
                        "use 1..16",
                    ));
                }
            }
            if let Some(m) = &v.mount {
                if !m.path.is_absolute() || m.path == Path::new("/") {
                    return Err(invalid(
                        format!("volume[{i}].mount.path"),
                        format!("{} is not an absolute path below /", m.path.display()),
                        "use a dedicated directory such as /srv/data",
                    ));
                }
                if m.source.is_none() && v.attach.is_none() {
                    return Err(invalid(
                        format!("volume[{i}].mount.source"),
                        "nothing to mount: no source and no [volume.attach] device".into(),
                        "add [volume.attach] device = \"/dev/nbd0\" (the mount then uses it) or set mount.source",
                    ));
                }
                if m.fstype.is_empty() || m.fstype.contains(char::is_whitespace) {
                    return Err(invalid(
                        format!("volume[{i}].mount.fstype"),
                        format!("{:?} is not a filesystem type", m.fstype),
                        "e.g. fstype = \"ext4\" or \"xfs\"",
                    ));
                }
            }
            if v.export.name.len() > 4096 || v.export.name.contains('\0') {
                return Err(invalid(
                    format!("volume[{i}].export.name"),
                    "export names must be at most 4096 bytes without NUL".into(),
                    "use a short name or leave it empty",
                ));
            }
        }
        Ok(())
    }
}

/// True for kernel names that are not stable across reboots on Nitro instances (/dev/nvme1n1).
pub fn unstable_device_name(p: &Path) -> bool {
    let s = p.to_string_lossy();
    s.strip_prefix("/dev/nvme")
        .is_some_and(|rest| rest.contains('n') && !rest.contains('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[node]
id = "node-a"

[[volume]]
name = "data"
device = "/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_vol0123"
[volume.export]
socket = "/run/twinvol/data.sock"
"#;

    #[test]
    fn good_config_loads_with_defaults() {
        let c = Config::parse(Path::new("t.toml"), GOOD).unwrap();
        assert_eq!(c.volumes[0].engine, EngineChoice::Auto);
        assert_eq!(c.volumes[0].cache, CacheMode::None);
        assert_eq!(c.volumes[0].export.name, "");
    }

    #[test]
    fn attach_and_mount_are_checked_naming_the_field_and_the_fix() {
        let err = |extra: &str| {
            Config::parse(Path::new("t.toml"), &format!("{GOOD}{extra}"))
                .unwrap_err()
                .to_string()
        };
        let e = err("[volume.mount]\npath = \"/srv/data\"\nfstype = \"ext4\"\n");
        assert!(
            e.contains("volume[0].mount.source") && e.contains("[volume.attach]"),
            "{e}"
        );
        let e = err("[volume.attach]\ndevice = \"/dev/sdb\"\n");
        assert!(
            e.contains("volume[0].attach.device") && e.contains("/dev/nbdN"),
            "{e}"
        );
        let e = err("[volume.attach]\ndevice = \"/dev/nbd0\"\n[volume.mount]\npath = \"srv\"\nfstype = \"ext4\"\n");
        assert!(e.contains("volume[0].mount.path"), "{e}");
        let ok = format!("{GOOD}[volume.attach]\ndevice = \"/dev/nbd0\"\n[volume.mount]\npath = \"/srv/data\"\nfstype = \"xfs\"\n");
        let c = Config::parse(Path::new("t.toml"), &ok).unwrap();
        assert_eq!(c.volumes[0].mount.as_ref().unwrap().options, "defaults");
        assert_eq!(c.volumes[0].attach.as_ref().unwrap().connections, 1);
    }

    #[test]
    fn unknown_field_is_named() {
        let text = GOOD.replace("name = \"data\"", "name = \"data\"\ndevcie = \"/x\"");
        let e = Config::parse(Path::new("t.toml"), &text)
            .unwrap_err()
            .to_string();
        assert!(e.contains("devcie"), "{e}");
    }

    #[test]
    fn relative_device_names_field_and_fix() {
        let text = GOOD.replace(
            "/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_vol0123",
            "disk.img",
        );
        let e = Config::parse(Path::new("t.toml"), &text)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("volume[0].device") && e.contains("/dev/disk/by-id"),
            "{e}"
        );
    }

    #[test]
    fn missing_export_endpoint_is_refused() {
        let text = GOOD.replace("socket = \"/run/twinvol/data.sock\"", "");
        let e = Config::parse(Path::new("t.toml"), &text)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("volume[0].export") && e.contains("listen"),
            "{e}"
        );
    }

    #[test]
    fn bad_engine_value_is_named() {
        let text = GOOD.replace("name = \"data\"", "name = \"data\"\nengine = \"aio\"");
        let e = Config::parse(Path::new("t.toml"), &text)
            .unwrap_err()
            .to_string();
        assert!(e.contains("aio") && e.contains("engine"), "{e}");
    }

    #[test]
    fn aws_example_config_loads() {
        let p = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/aws.toml"));
        let c = Config::load(p).unwrap();
        let cloud = c.cloud.expect("[cloud] is parsed");
        assert_eq!(cloud.node.instance_id, "self");
        assert_eq!(cloud.records[0].name, "db.example.internal.");
    }

    #[test]
    fn bad_cloud_field_is_named_with_file_and_fix() {
        let text = format!("{GOOD}\n[cloud]\nprovider = \"aws\"\n[[cloud.route53]]\nzone_id = \"Z1\"\nname = \"db.example\"\n");
        let e = Config::parse(Path::new("t.toml"), &text)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("config t.toml: field `cloud.route53[0].name`"),
            "{e}"
        );
        assert!(e.contains("trailing dot"), "{e}");
    }

    const REPL: &str = r#"
[volume.replication]
address = "10.0.1.10:7789"
peer = "10.0.1.11:7789"
peer_id = "node-b"
key_file = "/etc/twinvol/key"
"#;

    #[test]
    fn replication_table_loads_with_defaults() {
        let c = Config::parse(Path::new("t.toml"), &format!("{GOOD}{REPL}")).unwrap();
        let r = c.volumes[0].replication.as_ref().unwrap();
        assert_eq!(r.mode, ReplicationMode::Sync);
        assert_eq!(r.split_brain_policy, SplitBrainPolicy::Disconnect);
        assert_eq!(r.metadata, MetadataPlacement::Internal);
        assert_eq!(r.compression_level, 1);
    }

    #[test]
    fn replication_policy_and_external_metadata_parse() {
        let text = format!(
            "{GOOD}{REPL}mode = \"async\"\nsplit_brain_policy = \"discard-node:node-b\"\nmetadata = {{ kind = \"external\", device = \"/dev/xvdg\" }}\n"
        );
        let c = Config::parse(Path::new("t.toml"), &text).unwrap();
        let r = c.volumes[0].replication.as_ref().unwrap();
        assert_eq!(r.mode, ReplicationMode::Async);
        assert_eq!(
            r.split_brain_policy,
            SplitBrainPolicy::DiscardNode("node-b".into())
        );
        assert_eq!(
            r.metadata,
            MetadataPlacement::External {
                device: "/dev/xvdg".into()
            }
        );
    }

    #[test]
    fn outdate_wait_parses_in_sync_mode_and_is_refused_in_async_mode() {
        let c = Config::parse(
            Path::new("t.toml"),
            &format!("{GOOD}{REPL}outdate_wait_ms = 15000\n"),
        )
        .unwrap();
        let r = c.volumes[0].replication.as_ref().unwrap();
        assert_eq!(r.outdate_wait_ms, 15000);
        let c = Config::parse(Path::new("t.toml"), &format!("{GOOD}{REPL}")).unwrap();
        assert_eq!(
            c.volumes[0].replication.as_ref().unwrap().outdate_wait_ms,
            0
        );
        let text = format!("{GOOD}{REPL}mode = \"async\"\noutdate_wait_ms = 15000\n");
        let e = Config::parse(Path::new("t.toml"), &text)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("outdate_wait_ms") && e.contains("mode = \"sync\""),
            "{e}"
        );
    }

    #[test]
    fn bad_split_brain_policy_names_the_choices() {
        let text = format!("{GOOD}{REPL}split_brain_policy = \"newest\"\n");
        let e = Config::parse(Path::new("t.toml"), &text)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("discard-zero-changes") && e.contains("newest"),
            "{e}"
        );
    }

    #[test]
    fn discard_node_of_a_stranger_is_refused() {
        let text = format!("{GOOD}{REPL}split_brain_policy = \"discard-node:node-z\"\n");
        let e = Config::parse(Path::new("t.toml"), &text)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("volume[0].replication.split_brain_policy") && e.contains("node-z"),
            "{e}"
        );
    }

    #[test]
    fn rate_floor_above_ceiling_is_refused() {
        let text = format!("{GOOD}{REPL}resync_rate_min = 200\nresync_rate_max = 100\n");
        let e = Config::parse(Path::new("t.toml"), &text)
            .unwrap_err()
            .to_string();
        assert!(e.contains("replication.resync_rate_min"), "{e}");
    }

    #[test]
    fn peer_equal_to_own_address_is_refused() {
        let text = format!("{GOOD}{REPL}").replace("10.0.1.11:7789", "10.0.1.10:7789");
        let e = Config::parse(Path::new("t.toml"), &text)
            .unwrap_err()
            .to_string();
        assert!(e.contains("replication.peer"), "{e}");
    }

    #[test]
    fn mirror_example_config_loads() {
        let p = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/mirror.toml"));
        let c = Config::load(p).unwrap();
        let r = c.volumes[0]
            .replication
            .as_ref()
            .expect("[volume.replication] is parsed");
        assert_eq!(r.peer_id, "node-b");
        assert_eq!(r.interface.as_deref(), Some("ens6"));
    }

    #[test]
    fn nvme_kernel_names_are_unstable() {
        assert!(unstable_device_name(Path::new("/dev/nvme1n1")));
        assert!(!unstable_device_name(Path::new(
            "/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_vol1"
        )));
    }
}
