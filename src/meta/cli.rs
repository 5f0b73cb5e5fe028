//! The metadata subcommands: `create-md`, `show-md`, `dump-bitmap`, `new-current-uuid`,
//! `wipe-md`.
//! `main.rs` parses [`MetaCommand`] and calls [`run`]; everything printed goes to `out`.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use super::al::{self, AlGeometry};
use super::bitmap::{DirtyBitmap, Granularity};
use super::device::{FileDevice, MetaDevice};
use super::format::{self, Placement};
use super::gen::{self, DiskFlags, GenIds};
use super::store::{self, CreateOptions, Inspection, MetaStore, StoreError};

/// Where the metadata of a volume is.
#[derive(Debug, Clone, clap::Args)]
pub struct MetaLocation {
    /// The data device (EBS volume by /dev/disk/by-id/..., partition or file). Holds the
    /// metadata at its tail unless --meta-device is given.
    #[arg(long, value_name = "PATH")]
    pub device: PathBuf,
    /// A separate device, partition or file holding the metadata (external metadata).
    #[arg(long, value_name = "PATH")]
    pub meta_device: Option<PathBuf>,
}

impl MetaLocation {
    /// The path holding the metadata.
    pub fn meta_path(&self) -> &Path {
        self.meta_device.as_deref().unwrap_or(&self.device)
    }
}

/// Metadata subcommands.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum MetaCommand {
    /// Write fresh metadata (clean bitmap, empty activity log, "just created" generation).
    CreateMd {
        /// Devices.
        #[command(flatten)]
        location: MetaLocation,
        /// Bytes per bitmap bit: a power of two from 4K to 1M.
        #[arg(long, default_value = "64K", value_parser = parse_size)]
        granularity: u64,
        /// Number of hot extents in the activity log (resync after a primary crash is bounded by
        /// al-extents x al-extent-size).
        #[arg(long, default_value_t = al::DEFAULT_SLOTS)]
        al_extents: u32,
        /// Size of one activity-log extent: a power of two from 1M to 1G.
        #[arg(long, default_value = "4M", value_parser = parse_size)]
        al_extent_size: u64,
        /// This node's id.
        #[arg(long, default_value_t = 0)]
        node_id: u32,
        /// The peer's id.
        #[arg(long, default_value_t = 1)]
        peer_node_id: u32,
        /// Overwrite existing twinvol metadata (its bitmap and generation ids are lost).
        #[arg(long)]
        force: bool,
    },
    /// Erase the metadata (both superblock slots are zeroed): the device is a plain device
    /// again. Its bitmap and generation ids are lost; the data area is untouched.
    WipeMd {
        /// Devices.
        #[command(flatten)]
        location: MetaLocation,
        /// Required: the volume's mirror state is lost.
        #[arg(long)]
        force: bool,
    },
    /// Show the metadata: state (fresh, clean, dirty, corrupted), generation ids, flags.
    ShowMd {
        /// Devices.
        #[command(flatten)]
        location: MetaLocation,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the dirty regions (the bitmap after activity-log recovery) as byte ranges.
    DumpBitmap {
        /// Devices.
        #[command(flatten)]
        location: MetaLocation,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Start a new data generation. With --clear-bitmap: declare this disk identical to the
    /// peer's (skip the initial full sync for volumes restored from the same snapshot or AMI).
    NewCurrentUuid {
        /// Devices.
        #[command(flatten)]
        location: MetaLocation,
        /// Clear the bitmap and mark the disk up to date; run on both nodes with the same --uuid.
        #[arg(long)]
        clear_bitmap: bool,
        /// Allow --clear-bitmap on metadata that is not freshly created (see the warning).
        #[arg(long)]
        force: bool,
        /// The new current generation id in hex (default: random). Give the peer the id printed
        /// on the first node.
        #[arg(long, value_parser = parse_hex_id)]
        uuid: Option<u64>,
    },
}

/// Errors of the metadata subcommands.
#[derive(Debug, thiserror::Error)]
pub enum MetaCliError {
    /// A path could not be opened.
    #[error("cannot open {path}: {source} (check the path exists; use /dev/disk/by-id/... names, run as root)")]
    Open {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The device is mounted or owned by another process (a running twinvol).
    #[error("{0}; stop it before changing the metadata")]
    Busy(#[source] crate::engine::claim::ClaimError),
    /// Reading or writing the metadata failed.
    #[error("{path}: {source}")]
    Store {
        /// The metadata path.
        path: PathBuf,
        /// Why.
        #[source]
        source: StoreError,
    },
    /// create-md over existing metadata without --force.
    #[error("{path} already holds twinvol metadata for volume {volume}; add --force to overwrite it (its dirty bitmap and generation ids are lost)")]
    Exists {
        /// The metadata path.
        path: PathBuf,
        /// Its volume uuid.
        volume: String,
    },
    /// An argument with an unusable value.
    #[error("--{arg} {value}: {why}")]
    BadArgument {
        /// Argument name.
        arg: &'static str,
        /// Its value.
        value: String,
        /// What is wrong and what to give instead.
        why: String,
    },
    /// new-current-uuid --clear-bitmap on metadata that is not fresh.
    #[error("refusing --clear-bitmap: {why}; if both disks are known to be identical (restored from the same snapshot and never written), add --force")]
    Refused {
        /// Why the metadata is not fresh.
        why: String,
    },
    /// show-md found no valid superblock.
    #[error(
        "{path}: the metadata is corrupted or absent (both superblock slots refused, see above)"
    )]
    Corrupted {
        /// The metadata path.
        path: PathBuf,
    },
    /// Writing the output failed.
    #[error("writing output: {0}")]
    Output(#[from] io::Error),
}

/// Parses a byte size: a number with an optional K/M/G suffix (KiB, MiB, GiB; powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    let (num, mult) = [
        ("kib", 1u64 << 10),
        ("mib", 1 << 20),
        ("gib", 1 << 30),
        ("k", 1 << 10),
        ("m", 1 << 20),
        ("g", 1 << 30),
    ]
    .iter()
    .find_map(|(suf, m)| lower.strip_suffix(suf).map(|n| (n.trim().to_string(), *m)))
    .unwrap_or((lower.clone(), 1));
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| {
            format!("'{t}' is not a size; give bytes or a number with K, M or G (e.g. 64K, 4M)")
        })
}

/// Parses a generation id in hex (optional 0x prefix); 0 and 4 are reserved.
pub fn parse_hex_id(s: &str) -> Result<u64, String> {
    let t = s.trim().trim_start_matches("0x").trim_start_matches("0X");
    match u64::from_str_radix(t, 16) {
        Ok(v) if v != 0 && v != gen::JUST_CREATED => Ok(v),
        Ok(_) => Err(format!(
            "'{s}' is a reserved generation id (0 and 4); use another or omit --uuid"
        )),
        Err(_) => Err(format!(
            "'{s}' is not a hex generation id (e.g. 0x9f3a52c4e1d07b68)"
        )),
    }
}

fn open_dev(path: &Path, writable: bool) -> Result<FileDevice, MetaCliError> {
    use crate::engine::claim::ClaimError;
    FileDevice::open(path, writable).map_err(|e| match e {
        ClaimError::Open { source, .. } => MetaCliError::Open {
            path: path.to_path_buf(),
            source,
        },
        busy @ ClaimError::InUse { .. } => MetaCliError::Busy(busy),
    })
}

fn store_err(path: &Path) -> impl FnOnce(StoreError) -> MetaCliError + '_ {
    move |source| MetaCliError::Store {
        path: path.to_path_buf(),
        source,
    }
}

/// Runs one metadata subcommand given as command-line words (e.g. `["create-md", "--device",
/// "/dev/xvdf"]`), as `twinvol <words>` would, and returns what it printed. For harnesses
/// (the demo lab, tests) that prepare volumes without a separate process.
pub fn run_words(words: &[&str]) -> Result<String, String> {
    #[derive(clap::Parser)]
    struct Words {
        #[command(subcommand)]
        cmd: MetaCommand,
    }
    let w = <Words as clap::Parser>::try_parse_from(
        std::iter::once("twinvol").chain(words.iter().copied()),
    )
    .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    run(w.cmd, &mut out).map_err(|e| e.to_string())?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// Runs one metadata subcommand, printing to `out`.
pub fn run(cmd: MetaCommand, out: &mut dyn Write) -> Result<(), MetaCliError> {
    match cmd {
        MetaCommand::CreateMd {
            location,
            granularity,
            al_extents,
            al_extent_size,
            node_id,
            peer_node_id,
            force,
        } => create_md(
            &location,
            granularity,
            al_extents,
            al_extent_size,
            node_id,
            peer_node_id,
            force,
            out,
        ),
        MetaCommand::WipeMd { location, force } => wipe_md(&location, force, out),
        MetaCommand::ShowMd { location, json } => show_md(&location, json, out),
        MetaCommand::DumpBitmap { location, json } => dump_bitmap(&location, json, out),
        MetaCommand::NewCurrentUuid {
            location,
            clear_bitmap,
            force,
            uuid,
        } => new_current_uuid(&location, clear_bitmap, force, uuid, out),
    }
}

/// Zeroes both superblock slots (claimed device), after checking they hold twinvol metadata.
fn wipe_md(location: &MetaLocation, force: bool, out: &mut dyn Write) -> Result<(), MetaCliError> {
    let path = location.meta_path();
    let mut dev = open_dev(path, true)?;
    let found = store::probe(&mut dev).map_err(store_err(path))?;
    if found == store::Probed::Nothing {
        writeln!(
            out,
            "{}: no twinvol metadata; nothing to wipe",
            path.display()
        )
        .map_err(MetaCliError::Output)?;
        return Ok(());
    }
    if !force {
        return Err(MetaCliError::BadArgument {
            arg: "force",
            value: "absent".into(),
            why: format!(
                "{} holds twinvol metadata; add --force to erase it (its bitmap and generation ids are lost, the data is kept)",
                path.display()
            ),
        });
    }
    let len = dev.len();
    let zero = [0u8; format::BLOCK];
    for slot in 0..2u8 {
        let Some(at) = format::superblock_offset_on_device(len, slot) else {
            continue;
        };
        dev.write_at(at, &zero)
            .map_err(|source| MetaCliError::Store {
                path: path.to_path_buf(),
                source: StoreError::Io {
                    what: format!("erasing superblock slot {slot} at offset {at}"),
                    source,
                },
            })?;
    }
    dev.flush().map_err(|source| MetaCliError::Store {
        path: path.to_path_buf(),
        source: StoreError::Io {
            what: "flushing the erased superblocks".into(),
            source,
        },
    })?;
    writeln!(out, "{}: twinvol metadata erased", path.display()).map_err(MetaCliError::Output)?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn create_md(
    location: &MetaLocation,
    granularity: u64,
    al_extents: u32,
    al_extent_size: u64,
    node_id: u32,
    peer_node_id: u32,
    force: bool,
    out: &mut dyn Write,
) -> Result<(), MetaCliError> {
    let granularity = u32::try_from(granularity)
        .ok()
        .and_then(|g| Granularity::new(g).ok())
        .ok_or_else(|| MetaCliError::BadArgument {
            arg: "granularity",
            value: granularity.to_string(),
            why: "must be a power of two from 4K to 1M".into(),
        })?;
    let al = AlGeometry::new(al_extent_size, u64::from(al_extents)).map_err(|e| {
        MetaCliError::BadArgument {
            arg: "al-extents/--al-extent-size",
            value: format!("{al_extents} x {al_extent_size}"),
            why: e.to_string(),
        }
    })?;
    if al_extent_size < u64::from(granularity.bytes()) {
        return Err(MetaCliError::BadArgument {
            arg: "al-extent-size",
            value: al_extent_size.to_string(),
            why: "must be at least the bitmap granularity".into(),
        });
    }
    let meta_path = location.meta_path().to_path_buf();
    let external_data_size = match &location.meta_device {
        Some(_) => Some(open_dev(&location.device, false)?.len()),
        None => None,
    };
    let mut dev = open_dev(&meta_path, true)?;
    if let Ok(existing) = store::inspect(&mut dev) {
        if !force {
            return Err(MetaCliError::Exists {
                path: meta_path,
                volume: format::uuid_string(&existing.superblock.volume_uuid),
            });
        }
    }
    let opts = CreateOptions {
        volume_uuid: None,
        node_id,
        peer_node_id,
        granularity,
        al,
        external_data_size,
    };
    let store = MetaStore::create(dev, &opts).map_err(store_err(&meta_path))?;
    let sb = store.superblock();
    writeln!(out, "created twinvol metadata on {}", meta_path.display())?;
    writeln!(
        out,
        "  volume uuid:   {}",
        format::uuid_string(&sb.volume_uuid)
    )?;
    writeln!(out, "  placement:     {}", placement_words(sb.placement))?;
    writeln!(
        out,
        "  data size:     {} ({})",
        sb.data_size,
        human(sb.data_size)
    )?;
    writeln!(
        out,
        "  metadata area: {} bytes at offset {}",
        sb.area_size,
        store.area_start()
    )?;
    writeln!(
        out,
        "  bitmap:        one bit per {}",
        human(u64::from(sb.granularity.bytes()))
    )?;
    writeln!(
        out,
        "  activity log:  {} x {}",
        sb.al.slots(),
        human(u64::from(sb.al.extent_size()))
    )?;
    if sb.placement == Placement::Internal {
        writeln!(
            out,
            "  note: the last {} bytes of {} now hold metadata; create filesystems on the twinvol export, not on the device",
            store.device().len() - sb.data_size,
            meta_path.display()
        )?;
    }
    Ok(())
}

fn placement_words(p: Placement) -> &'static str {
    match p {
        Placement::Internal => "internal (tail of the data device)",
        Placement::External => "external (separate metadata device)",
    }
}

/// `1.5 GiB`-style rendering.
fn human(n: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

/// The state `show-md` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum MdState {
    /// As create-md left it.
    Fresh,
    /// Nothing to resync.
    Clean,
    /// Some regions must be resynced.
    Dirty,
    /// No valid superblock.
    Corrupted,
}

/// What `show-md --json` prints.
#[derive(Debug, serde::Serialize)]
pub struct ShowMd {
    /// Metadata path.
    pub path: PathBuf,
    /// State.
    pub state: MdState,
    /// The superblock, if one is valid.
    pub superblock: Option<format::Superblock>,
    /// Names of the set flags.
    pub flags: Vec<&'static str>,
    /// Chunks to resync (bitmap after activity-log recovery).
    pub dirty_chunks: u64,
    /// Bytes to resync.
    pub dirty_bytes: u64,
    /// Extents in the activity log.
    pub al_hot_extents: usize,
    /// Problems found (corrupted blocks by name).
    pub findings: Vec<String>,
}

fn summarize(path: &Path, ins: &Inspection) -> ShowMd {
    let bm = ins.recovered_bitmap();
    let hot = ins.al.table.iter().filter(|e| **e != al::EMPTY).count();
    let state = if ins.is_fresh() {
        MdState::Fresh
    } else if bm.dirty_chunks() == 0 {
        MdState::Clean
    } else {
        MdState::Dirty
    };
    ShowMd {
        path: path.to_path_buf(),
        state,
        superblock: Some(ins.superblock.clone()),
        flags: ins.superblock.flags.names(),
        dirty_chunks: bm.dirty_chunks(),
        dirty_bytes: bm.dirty_bytes(),
        al_hot_extents: hot,
        findings: ins.findings.iter().map(|f| f.to_string()).collect(),
    }
}

fn show_md(location: &MetaLocation, json: bool, out: &mut dyn Write) -> Result<(), MetaCliError> {
    let path = location.meta_path();
    let mut dev = open_dev(path, false)?;
    let report = match store::inspect(&mut dev) {
        Ok(ins) => {
            let mut r = summarize(path, &ins);
            if let (Some(_), Placement::External) =
                (&location.meta_device, ins.superblock.placement)
            {
                let data_len = open_dev(&location.device, false)?.len();
                if data_len < ins.superblock.data_size {
                    r.findings.push(format!(
                        "the data device {} has {data_len} bytes but the metadata covers {}: wrong device, or it shrank",
                        location.device.display(),
                        ins.superblock.data_size
                    ));
                }
            }
            r
        }
        Err(StoreError::NoSuperblock { a, b }) => {
            let report = ShowMd {
                path: path.to_path_buf(),
                state: MdState::Corrupted,
                superblock: None,
                flags: Vec::new(),
                dirty_chunks: 0,
                dirty_bytes: 0,
                al_hot_extents: 0,
                findings: vec![a.to_string(), b.to_string()],
            };
            print_show(&report, json, out)?;
            return Err(MetaCliError::Corrupted {
                path: path.to_path_buf(),
            });
        }
        Err(e) => return Err(store_err(path)(e)),
    };
    print_show(&report, json, out)
}

fn hex(v: u64) -> String {
    format!("{v:016x}")
}

fn print_show(r: &ShowMd, json: bool, out: &mut dyn Write) -> Result<(), MetaCliError> {
    if json {
        serde_json::to_writer_pretty(&mut *out, r).map_err(io::Error::other)?;
        writeln!(out)?;
        return Ok(());
    }
    writeln!(out, "metadata: {}", r.path.display())?;
    match r.state {
        MdState::Fresh => writeln!(
            out,
            "state: fresh (created, never written; new-current-uuid --clear-bitmap is allowed)"
        )?,
        MdState::Clean => writeln!(out, "state: clean (nothing to resync)")?,
        MdState::Dirty => writeln!(
            out,
            "state: dirty ({} chunks, {} to resync; {} extents in the activity log)",
            r.dirty_chunks,
            human(r.dirty_bytes),
            r.al_hot_extents
        )?,
        MdState::Corrupted => writeln!(
            out,
            "state: corrupted (no valid superblock; this is not usable twinvol metadata)"
        )?,
    }
    if let Some(sb) = &r.superblock {
        writeln!(out, "volume uuid: {}", format::uuid_string(&sb.volume_uuid))?;
        writeln!(out, "node id: {} (peer {})", sb.node_id, sb.peer_node_id)?;
        writeln!(out, "placement: {}", placement_words(sb.placement))?;
        writeln!(out, "data size: {} ({})", sb.data_size, human(sb.data_size))?;
        writeln!(
            out,
            "bitmap granularity: {}",
            human(u64::from(sb.granularity.bytes()))
        )?;
        writeln!(
            out,
            "activity log: {} x {}",
            sb.al.slots(),
            human(u64::from(sb.al.extent_size()))
        )?;
        let g = &sb.gen;
        writeln!(
            out,
            "generation: current {} bitmap {} history {} {}",
            hex(g.current),
            hex(g.bitmap),
            hex(g.history[0]),
            hex(g.history[1])
        )?;
        let flags = if r.flags.is_empty() {
            "(none)".to_string()
        } else {
            r.flags.join(", ")
        };
        writeln!(out, "flags: {flags}")?;
        writeln!(out, "superblock sequence: {}", sb.seq)?;
    }
    for f in &r.findings {
        let prefix = if r.state == MdState::Corrupted {
            "error"
        } else {
            "warning"
        };
        writeln!(out, "{prefix}: {f}")?;
    }
    Ok(())
}

fn dump_bitmap(
    location: &MetaLocation,
    json: bool,
    out: &mut dyn Write,
) -> Result<(), MetaCliError> {
    let path = location.meta_path();
    let mut dev = open_dev(path, false)?;
    let ins = store::inspect(&mut dev).map_err(store_err(path))?;
    let bm: DirtyBitmap = ins.recovered_bitmap();
    if json {
        #[derive(serde::Serialize)]
        struct Dump {
            granularity: u32,
            data_size: u64,
            dirty_chunks: u64,
            dirty_bytes: u64,
            runs: Vec<[u64; 2]>,
        }
        let d = Dump {
            granularity: bm.geometry().granularity().bytes(),
            data_size: bm.geometry().device_size(),
            dirty_chunks: bm.dirty_chunks(),
            dirty_bytes: bm.dirty_bytes(),
            runs: bm
                .dirty_runs()
                .map(|r| [r.start, r.end - r.start])
                .collect(),
        };
        serde_json::to_writer_pretty(&mut *out, &d).map_err(io::Error::other)?;
        writeln!(out)?;
        return Ok(());
    }
    writeln!(
        out,
        "# offset length (bytes; dirty regions after activity-log recovery)"
    )?;
    for r in bm.dirty_runs() {
        writeln!(out, "{} {}", r.start, r.end - r.start)?;
    }
    writeln!(
        out,
        "# {} dirty chunks of {}, {} of {}",
        bm.dirty_chunks(),
        bm.geometry().chunks(),
        human(bm.dirty_bytes()),
        human(bm.geometry().device_size())
    )?;
    for f in &ins.findings {
        writeln!(out, "# warning: {f}")?;
    }
    Ok(())
}

fn new_current_uuid(
    location: &MetaLocation,
    clear_bitmap: bool,
    force: bool,
    uuid: Option<u64>,
    out: &mut dyn Write,
) -> Result<(), MetaCliError> {
    let path = location.meta_path();
    let mut dev = open_dev(path, true)?;
    let ins = store::inspect(&mut dev).map_err(store_err(path))?;
    let id = match uuid {
        Some(id) => id,
        None => {
            gen::random_id().map_err(|e| MetaCliError::Output(io::Error::other(e.to_string())))?
        }
    };
    if clear_bitmap && !ins.is_fresh() {
        let bm = ins.recovered_bitmap();
        let why = format!(
            "the metadata on {} is not freshly created (generation {}, {} dirty chunks, flags: {})",
            path.display(),
            hex(ins.superblock.gen.current),
            bm.dirty_chunks(),
            ins.superblock.flags.names().join(", ")
        );
        if !force {
            return Err(MetaCliError::Refused { why });
        }
        writeln!(out, "WARNING: --force: {why}.")?;
        writeln!(
            out,
            "WARNING: this discards the record of {} that may differ from the peer and the generation history. \
             If this disk and the peer's are not byte-identical, those differences are never resynchronised: \
             reads will return different data depending on which node is primary, and a later failover can \
             silently lose or corrupt data. Continue only if both disks were restored from the same snapshot \
             or AMI and nothing has written to either since.",
            human(bm.dirty_bytes())
        )?;
    }
    let (mut st, _) = MetaStore::open(dev).map_err(store_err(path))?;
    let old = st.superblock().gen;
    if clear_bitmap {
        let geometry = st.bitmap().geometry();
        st.replace_bitmap(DirtyBitmap::new(geometry))
            .map_err(store_err(path))?;
        st.update_state(|g, f| {
            let history = if old.current == gen::JUST_CREATED {
                [0, 0]
            } else {
                [old.current, old.history[0]]
            };
            *g = GenIds {
                current: id,
                bitmap: 0,
                history,
            };
            f.set(
                DiskFlags::CONSISTENT | DiskFlags::UP_TO_DATE | DiskFlags::INITIAL_SYNC_DONE,
                true,
            );
            f.set(DiskFlags::OUTDATED, false);
        })
        .map_err(store_err(path))?;
        st.close_clean().map_err(store_err(path))?;
        writeln!(
            out,
            "new current generation id {} (bitmap cleared, disk marked up to date)",
            hex(id)
        )?;
        writeln!(
            out,
            "run on the peer, with its own device paths: twinvol new-current-uuid --clear-bitmap --uuid {}",
            hex(id)
        )?;
    } else {
        st.update_state(|g, _| g.new_current(id))
            .map_err(store_err(path))?;
        let new = st.superblock().gen;
        writeln!(
            out,
            "new current generation id {} (was {}; bitmap id {})",
            hex(new.current),
            hex(old.current),
            hex(new.bitmap)
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: MetaCommand,
    }

    fn parse(args: &[&str]) -> Result<MetaCommand, clap::Error> {
        Cli::try_parse_from(std::iter::once("twinvol").chain(args.iter().copied())).map(|c| c.cmd)
    }

    fn run_str(args: &[&str]) -> (Result<(), MetaCliError>, String) {
        let mut out = Vec::new();
        let r = run(parse(args).unwrap(), &mut out);
        (r, String::from_utf8(out).unwrap())
    }

    fn disk(dir: &tempfile::TempDir, name: &str, size: u64) -> String {
        let p = dir.path().join(name);
        std::fs::File::create(&p).unwrap().set_len(size).unwrap();
        p.to_str().unwrap().to_string()
    }

    const MIB: u64 = 1 << 20;

    #[test]
    fn wipe_md_needs_force_then_leaves_a_plain_device_with_its_data() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("vol.img");
        std::fs::write(&f, vec![0x5au8; 16 << 20]).unwrap();
        let p = f.to_str().unwrap();
        run_words(&["create-md", "--device", p]).unwrap();
        let e = run_words(&["wipe-md", "--device", p]).unwrap_err();
        assert!(e.contains("--force"), "{e}");
        run_words(&["wipe-md", "--device", p, "--force"]).unwrap();
        let mut dev = FileDevice::open(&f, false).unwrap();
        assert_eq!(store::probe(&mut dev).unwrap(), store::Probed::Nothing);
        let data = std::fs::read(&f).unwrap();
        assert!(
            data[..1 << 20].iter().all(|b| *b == 0x5a),
            "the data area is kept"
        );
        let again = run_words(&["wipe-md", "--device", p]).unwrap();
        assert!(again.contains("nothing to wipe"), "{again}");
    }

    #[test]
    fn show_md_on_fresh_metadata_says_fresh() {
        let dir = tempfile::tempdir().unwrap();
        let d = disk(&dir, "data.img", 64 * MIB);
        let (r, out) = run_str(&["create-md", "--device", &d]);
        r.unwrap();
        assert!(out.contains("placement:     internal"), "{out}");
        let (r, out) = run_str(&["show-md", "--device", &d]);
        r.unwrap();
        assert!(out.contains("state: fresh"), "{out}");
        assert!(!out.contains("warning"), "{out}");
    }

    #[test]
    fn show_md_on_metadata_with_logged_writes_says_dirty() {
        let dir = tempfile::tempdir().unwrap();
        let d = disk(&dir, "data.img", 64 * MIB);
        run_str(&["create-md", "--device", &d, "--granularity", "4K"])
            .0
            .unwrap();
        {
            let (mut st, _) =
                MetaStore::open(FileDevice::open(Path::new(&d), true).unwrap()).unwrap();
            st.mark_dirty(8 * MIB, 4096).unwrap();
            st.prepare_write(8 * MIB, 4096).unwrap();
            // crash: no persist, no clean close
        }
        let (r, out) = run_str(&["show-md", "--device", &d]);
        r.unwrap();
        assert!(
            out.contains(
                "state: dirty (1024 chunks, 4.0 MiB to resync; 1 extents in the activity log)"
            ),
            "{out}"
        );
        let (r, out) = run_str(&["dump-bitmap", "--device", &d]);
        r.unwrap();
        assert!(
            out.contains(&format!("\n{} {}\n", 8 * MIB, 4 * MIB)),
            "{out}"
        );
        let (r, out) = run_str(&["show-md", "--device", &d, "--json"]);
        r.unwrap();
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["state"], "dirty");
        assert_eq!(v["dirty_bytes"], 4 * MIB);
    }

    #[test]
    fn show_md_on_corrupted_metadata_says_corrupted_and_names_both_slots() {
        let dir = tempfile::tempdir().unwrap();
        let d = disk(&dir, "data.img", 64 * MIB);
        run_str(&["create-md", "--device", &d]).0.unwrap();
        let len = 64 * MIB;
        let f = std::fs::OpenOptions::new().write(true).open(&d).unwrap();
        use std::os::unix::fs::FileExt;
        f.write_all_at(&[0xAB], len - 8192 + 300).unwrap();
        let (r, out) = run_str(&["show-md", "--device", &d]);
        r.unwrap();
        assert!(
            out.contains("warning: superblock slot A is corrupted: stored CRC32"),
            "{out}"
        );
        f.write_all_at(&[0xAB], len - 4096 + 300).unwrap();
        let (r, out) = run_str(&["show-md", "--device", &d]);
        assert!(matches!(r, Err(MetaCliError::Corrupted { .. })));
        assert!(out.contains("state: corrupted"), "{out}");
        assert!(
            out.contains("error: superblock slot B is corrupted"),
            "{out}"
        );
    }

    #[test]
    fn show_md_on_a_device_without_metadata_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let d = disk(&dir, "blank.img", 8 * MIB);
        let (r, out) = run_str(&["show-md", "--device", &d]);
        assert!(matches!(r, Err(MetaCliError::Corrupted { .. })));
        assert!(
            out.contains("superblock slot A is blank (never written)"),
            "{out}"
        );
    }

    #[test]
    fn wrong_paths_and_arguments_get_clear_errors() {
        let (r, _) = run_str(&["show-md", "--device", "/nonexistent/disk"]);
        let e = r.unwrap_err().to_string();
        assert!(
            e.starts_with("cannot open /nonexistent/disk: No such file or directory"),
            "{e}"
        );
        let (r, _) = run_str(&["show-md", "--device", "/dev/null"]);
        assert!(r
            .unwrap_err()
            .to_string()
            .contains("neither a regular file nor a block device"));
        let dir = tempfile::tempdir().unwrap();
        let d = disk(&dir, "data.img", 64 * MIB);
        let (r, _) = run_str(&["create-md", "--device", &d, "--granularity", "3K"]);
        assert!(r
            .unwrap_err()
            .to_string()
            .contains("--granularity 3072: must be a power of two from 4K to 1M"));
        let (r, _) = run_str(&["create-md", "--device", &d, "--al-extents", "0"]);
        assert!(matches!(r, Err(MetaCliError::BadArgument { .. })));
        let e = parse(&["create-md", "--device", &d, "--granularity", "lots"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("'lots' is not a size"), "{e}");
        let e = parse(&["new-current-uuid", "--device", &d, "--uuid", "4"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("reserved generation id"), "{e}");
        let tiny = disk(&dir, "tiny.img", 16 * 1024);
        let (r, _) = run_str(&["create-md", "--device", &tiny]);
        assert!(r.unwrap_err().to_string().contains("too small"));
    }

    #[test]
    fn create_md_over_existing_metadata_needs_force() {
        let dir = tempfile::tempdir().unwrap();
        let d = disk(&dir, "data.img", 64 * MIB);
        run_str(&["create-md", "--device", &d]).0.unwrap();
        let (r, _) = run_str(&["create-md", "--device", &d]);
        assert!(matches!(r, Err(MetaCliError::Exists { .. })));
        run_str(&["create-md", "--device", &d, "--force"])
            .0
            .unwrap();
    }

    #[test]
    fn external_metadata_records_the_data_device_size() {
        let dir = tempfile::tempdir().unwrap();
        let d = disk(&dir, "data.img", 256 * MIB);
        let m = disk(&dir, "meta.img", MIB);
        run_str(&["create-md", "--device", &d, "--meta-device", &m])
            .0
            .unwrap();
        let (r, out) = run_str(&["show-md", "--device", &d, "--meta-device", &m, "--json"]);
        r.unwrap();
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["superblock"]["data_size"], 256 * MIB);
        assert_eq!(v["superblock"]["placement"], "external");
    }

    #[test]
    fn clear_bitmap_is_allowed_on_fresh_metadata_and_both_sides_then_agree() {
        let dir = tempfile::tempdir().unwrap();
        let a = disk(&dir, "a.img", 64 * MIB);
        let b = disk(&dir, "b.img", 64 * MIB);
        run_str(&[
            "create-md",
            "--device",
            &a,
            "--node-id",
            "0",
            "--peer-node-id",
            "1",
        ])
        .0
        .unwrap();
        run_str(&[
            "create-md",
            "--device",
            &b,
            "--node-id",
            "1",
            "--peer-node-id",
            "0",
        ])
        .0
        .unwrap();
        let (r, out) = run_str(&["new-current-uuid", "--device", &a, "--clear-bitmap"]);
        r.unwrap();
        let id = out.split("--uuid ").nth(1).unwrap().trim().to_string();
        run_str(&[
            "new-current-uuid",
            "--device",
            &b,
            "--clear-bitmap",
            "--uuid",
            &id,
        ])
        .0
        .unwrap();
        let read = |p: &str| {
            store::inspect(&mut FileDevice::open(Path::new(p), false).unwrap())
                .unwrap()
                .superblock
        };
        let (sa, sb) = (read(&a), read(&b));
        let na = gen::NodeGen {
            node_id: 0,
            ids: sa.gen,
            flags: sa.flags,
        };
        let nb = gen::NodeGen {
            node_id: 1,
            ids: sb.gen,
            flags: sb.flags,
        };
        assert_eq!(gen::decide(&na, &nb), gen::Decision::NoResync);
        assert!(sa
            .flags
            .has(DiskFlags::UP_TO_DATE | DiskFlags::INITIAL_SYNC_DONE));
        let (_, out) = run_str(&["show-md", "--device", &a]);
        assert!(out.contains("state: clean"), "{out}");
    }

    #[test]
    fn clear_bitmap_on_used_metadata_is_refused_unless_forced_with_a_warning() {
        let dir = tempfile::tempdir().unwrap();
        let d = disk(&dir, "data.img", 64 * MIB);
        run_str(&["create-md", "--device", &d]).0.unwrap();
        {
            let (mut st, _) =
                MetaStore::open(FileDevice::open(Path::new(&d), true).unwrap()).unwrap();
            st.mark_dirty(0, 4096).unwrap();
            st.prepare_write(0, 4096).unwrap();
        }
        let (r, _) = run_str(&["new-current-uuid", "--device", &d, "--clear-bitmap"]);
        let e = r.unwrap_err().to_string();
        assert!(
            e.starts_with("refusing --clear-bitmap: the metadata on"),
            "{e}"
        );
        assert!(e.contains("add --force"), "{e}");
        let (r, out) = run_str(&[
            "new-current-uuid",
            "--device",
            &d,
            "--clear-bitmap",
            "--force",
        ]);
        r.unwrap();
        assert!(
            out.contains(
                "WARNING: this discards the record of 4.0 MiB that may differ from the peer"
            ),
            "{out}"
        );
        assert!(out.contains("silently lose or corrupt data"), "{out}");
        let (_, out) = run_str(&["show-md", "--device", &d]);
        assert!(out.contains("state: clean"), "{out}");
    }

    #[test]
    fn new_current_uuid_without_clear_moves_the_old_current_to_the_bitmap_id() {
        let dir = tempfile::tempdir().unwrap();
        let d = disk(&dir, "data.img", 64 * MIB);
        run_str(&["create-md", "--device", &d]).0.unwrap();
        run_str(&[
            "new-current-uuid",
            "--device",
            &d,
            "--clear-bitmap",
            "--uuid",
            "0xaaaa",
        ])
        .0
        .unwrap();
        let (r, out) = run_str(&["new-current-uuid", "--device", &d, "--uuid", "bbbb"]);
        r.unwrap();
        assert!(out.contains("new current generation id 000000000000bbbb (was 000000000000aaaa; bitmap id 000000000000aaaa)"), "{out}");
    }

    #[test]
    fn external_metadata_with_a_smaller_data_device_is_flagged() {
        let dir = tempfile::tempdir().unwrap();
        let d = disk(&dir, "data.img", 256 * MIB);
        let small = disk(&dir, "small.img", 128 * MIB);
        let m = disk(&dir, "meta.img", MIB);
        run_str(&["create-md", "--device", &d, "--meta-device", &m])
            .0
            .unwrap();
        let (r, out) = run_str(&["show-md", "--device", &small, "--meta-device", &m]);
        r.unwrap();
        assert!(out.contains("warning: the data device"), "{out}");
        assert!(out.contains("wrong device, or it shrank"), "{out}");
    }

    #[test]
    fn meta_commands_flatten_into_a_parent_cli() {
        // How main.rs is expected to wire them: `twinvol create-md ...` etc.
        #[derive(Debug, clap::Parser)]
        struct Top {
            #[command(subcommand)]
            cmd: TopCmd,
        }
        #[derive(Debug, clap::Subcommand)]
        enum TopCmd {
            #[command(flatten)]
            Meta(MetaCommand),
            /// Another subcommand of the binary.
            Run,
        }
        let t =
            Top::try_parse_from(["twinvol", "show-md", "--device", "/dev/x", "--json"]).unwrap();
        assert!(matches!(
            t.cmd,
            TopCmd::Meta(MetaCommand::ShowMd { json: true, .. })
        ));
        let t = Top::try_parse_from([
            "twinvol",
            "new-current-uuid",
            "--device",
            "/d",
            "--clear-bitmap",
            "--force",
        ])
        .unwrap();
        assert!(matches!(
            t.cmd,
            TopCmd::Meta(MetaCommand::NewCurrentUuid {
                clear_bitmap: true,
                force: true,
                ..
            })
        ));
        assert!(matches!(
            Top::try_parse_from(["twinvol", "run"]).unwrap().cmd,
            TopCmd::Run
        ));
    }

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("4MiB"), Ok(4 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("4X").is_err());
    }
}
