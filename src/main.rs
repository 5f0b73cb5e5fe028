//! The `twinvol` command line: parses arguments, then calls one library function per subcommand.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, CommandFactory, Parser, Subcommand};
use twinvol::engine::{CacheMode, EngineKind};
use twinvol::nbd::export::{self, Endpoint, ExportOptions};

#[derive(Parser)]
#[command(
    name = "twinvol",
    version,
    about = "Mirrored block volumes with NBD export and cloud failover"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve a local device or file over NBD (Unix socket, TCP or stdio).
    Export(ExportArgs),
    /// Attach an export to a kernel NBD device (/dev/nbdN); stays in the foreground until detached.
    Attach(AttachArgs),
    /// Detach a kernel NBD device.
    Detach {
        /// The device, e.g. /dev/nbd0.
        device: PathBuf,
    },
    /// Metadata: create-md, show-md, dump-bitmap, new-current-uuid.
    #[command(flatten)]
    Meta(twinvol::meta::cli::MetaCommand),
    /// AWS network identity: preflight, plan (dry run), apply, check.
    Cloud {
        /// Configuration file with a [cloud] table.
        #[arg(long, default_value = "/etc/twinvol/twinvol.toml")]
        config: PathBuf,
        #[command(subcommand)]
        command: twinvol::cloud::cli::CloudCommand,
    },
    /// Run one node of a mirrored volume: replication, and the NBD export while Primary.
    Mirror(twinvol::volume::run::MirrorArgs),
    /// Online verify of a running `twinvol mirror`: compare block digests with the peer, resync differing blocks.
    Verify {
        #[command(flatten)]
        args: twinvol::volume::control::VerifyArgs,
        #[command(flatten)]
        ctl: CtlArgs,
        /// Only this volume (daemon).
        #[arg(long)]
        volume: Option<String>,
    },
    /// Resync now through the running daemon: reconnect and copy what is dirty. With
    /// --discard-local (Secondary only) this node's copy is thrown away and copied in full from
    /// the peer: the split-brain recovery on the node whose changes are to be lost.
    Resync {
        #[command(flatten)]
        ctl: CtlArgs,
        /// Only this volume.
        #[arg(long)]
        volume: Option<String>,
        /// Throw this node's data away and copy the peer's.
        #[arg(long)]
        discard_local: bool,
    },
    /// Run the node daemon: heartbeats, partition resolution, fencing, failover, control socket.
    Run {
        /// Configuration file with a [cluster] table.
        #[arg(long, default_value = "/etc/twinvol/twinvol.toml")]
        config: PathBuf,
    },
    /// Show the running daemon's status (or a `twinvol mirror` status file).
    Status {
        #[command(flatten)]
        ctl: CtlArgs,
        /// Print JSON for machines.
        #[arg(long, conflicts_with = "watch")]
        json: bool,
        /// Redraw every SECS seconds (default 2) until interrupted.
        #[arg(long, value_name = "SECS", num_args = 0..=1, default_missing_value = "2")]
        watch: Option<u64>,
        /// Read the status a `twinvol mirror --status-file PATH` process writes instead of asking
        /// the daemon.
        #[arg(long, value_name = "PATH", conflicts_with = "socket")]
        status_file: Option<PathBuf>,
    },
    /// Bring the service up on this node (refused while the peer is Primary).
    Promote {
        #[command(flatten)]
        ctl: CtlArgs,
        /// Accept a disk that is not UpToDate and a peer that is unreachable but not fenced.
        #[arg(long)]
        force: bool,
    },
    /// Take the service down on this node and stand down for the peer.
    Demote {
        #[command(flatten)]
        ctl: CtlArgs,
    },
    /// Move the service to the other node.
    Switchover {
        #[command(flatten)]
        ctl: CtlArgs,
    },
    /// Two nodes on this machine: write through NBD, kill the active node, watch the failover.
    Demo(twinvol::cluster::demo::DemoArgs),
    /// Load and validate configuration files; prints nothing but errors and warnings.
    CheckConfig {
        /// Files to check.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Write the man pages (twinvol.1, twinvol-SUBCOMMAND.1) into DIR (packaging).
    #[command(hide = true)]
    GenMan {
        /// Existing output directory.
        dir: PathBuf,
    },
    /// Print the completion script for SHELL on stdout (packaging).
    #[command(hide = true)]
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Args)]
struct CtlArgs {
    /// Configuration file naming the control socket.
    #[arg(long, default_value = "/etc/twinvol/twinvol.toml")]
    config: PathBuf,
    /// The control socket (overrides --config).
    #[arg(long)]
    socket: Option<PathBuf>,
}

impl CtlArgs {
    /// The control socket: --socket, else the one --config names.
    fn socket(&self) -> anyhow::Result<PathBuf> {
        match &self.socket {
            Some(s) => Ok(s.clone()),
            None => twinvol::cluster::daemon::control_socket_of(&self.config),
        }
    }
}

fn run_control(
    ctl: CtlArgs,
    req: twinvol::cluster::control::Request,
    json: bool,
) -> anyhow::Result<()> {
    let socket = ctl.socket()?;
    let a = twinvol::cluster::control::call(&socket, &req, std::time::Duration::from_secs(120))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&a.status)?);
    } else {
        if !matches!(req, twinvol::cluster::control::Request::Status) {
            println!("{}", a.message);
        }
        print!("{}", twinvol::cluster::control::render(&a.status));
    }
    if !a.ok {
        anyhow::bail!("{}", a.message);
    }
    Ok(())
}

/// `twinvol verify` against the daemon: starts the verify, waits until every targeted volume's
/// verify has finished, prints each result.
fn run_daemon_verify(ctl: CtlArgs, volume: Option<String>, json: bool) -> anyhow::Result<()> {
    use twinvol::cluster::control::{call, Request};
    let socket = ctl.socket()?;
    let t = std::time::Duration::from_secs(30);
    let a = call(
        &socket,
        &Request::Verify {
            volume: volume.clone(),
        },
        t,
    )?;
    if !a.ok {
        anyhow::bail!("{}", a.message);
    }
    eprintln!("{}", a.message);
    loop {
        let s = call(&socket, &Request::Status, t)?.status;
        let vols: Vec<&serde_json::Value> = s["volumes"]
            .as_array()
            .map(|v| {
                v.iter()
                    .filter(|x| volume.as_deref().is_none_or(|n| x["name"] == n))
                    .filter(|x| x["replication"].is_object())
                    .collect()
            })
            .unwrap_or_default();
        if vols
            .iter()
            .all(|v| v["replication"]["verify"]["running"] != true)
        {
            for v in vols {
                let r = &v["replication"]["verify"];
                if json {
                    println!("{}", serde_json::json!({"volume": v["name"], "verify": r}));
                } else {
                    println!(
                        "volume {}: verified {} bytes, {} differing block(s){}{}",
                        v["name"].as_str().unwrap_or("?"),
                        r["checked_bytes"].as_u64().unwrap_or(0),
                        r["differing_blocks"].as_u64().unwrap_or(0),
                        if r["differing_blocks"].as_u64().unwrap_or(0) > 0 {
                            "; marked dirty and resyncing to the peer"
                        } else {
                            ""
                        },
                        r["error"]
                            .as_str()
                            .map_or(String::new(), |e| format!("; stopped: {e}"))
                    );
                }
            }
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
}

/// One look at the status: (JSON value, text for people).
fn fetch_status(
    ctl: &CtlArgs,
    status_file: Option<&std::path::Path>,
) -> anyhow::Result<(serde_json::Value, String)> {
    if let Some(p) = status_file {
        let text = std::fs::read_to_string(p).map_err(|e| {
            anyhow::anyhow!(
                "cannot read status file {}: {e} (is `twinvol mirror --status-file {}` running?)",
                p.display(),
                p.display()
            )
        })?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| anyhow::anyhow!("status file {} is not JSON: {e}", p.display()))?;
        let t = twinvol::ops::status_text::render_mirror(&v);
        return Ok((v, t));
    }
    let socket = ctl.socket()?;
    let a = twinvol::cluster::control::call(
        &socket,
        &twinvol::cluster::control::Request::Status,
        std::time::Duration::from_secs(30),
    )?;
    let t = twinvol::cluster::control::render(&a.status);
    Ok((a.status, t))
}

fn run_status(
    ctl: CtlArgs,
    json: bool,
    watch: Option<u64>,
    status_file: Option<PathBuf>,
) -> anyhow::Result<()> {
    let Some(secs) = watch else {
        let (v, t) = fetch_status(&ctl, status_file.as_deref())?;
        if json {
            println!("{}", serde_json::to_string_pretty(&v)?);
        } else {
            print!("{t}");
        }
        return Ok(());
    };
    let every = std::time::Duration::from_secs(secs.max(1));
    loop {
        let body = match fetch_status(&ctl, status_file.as_deref()) {
            Ok((_, t)) => t,
            Err(e) => format!("error: {e:#}\n"),
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        // Home, clear screen, then the frame: a terminal redraws in place.
        print!(
            "\x1b[H\x1b[2Jevery {}s (Ctrl-C to stop), unix time {now}\n\n{body}",
            every.as_secs()
        );
        std::io::Write::flush(&mut std::io::stdout())?;
        std::thread::sleep(every);
    }
}

fn run_daemon(config: PathBuf) -> anyhow::Result<()> {
    let cfg = twinvol::config::Config::load(&config)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(twinvol::cluster::daemon::run(cfg))?;
    Ok(())
}

#[derive(Args)]
struct ExportArgs {
    /// Device or file to export (a regular file must already have its size).
    path: PathBuf,
    /// Listen on this Unix socket.
    #[arg(long, conflicts_with_all = ["listen", "stdio"])]
    socket: Option<PathBuf>,
    /// Listen on this TCP address (e.g. 127.0.0.1:10809).
    #[arg(long, conflicts_with = "stdio")]
    listen: Option<SocketAddr>,
    /// Speak NBD on stdin/stdout with one client (for fuzzing and inetd-style use).
    #[arg(long)]
    stdio: bool,
    /// Export name clients ask for (default: the empty name).
    #[arg(long, default_value = "")]
    name: String,
    /// Refuse writes. On a mirrored volume's device only its data area is served.
    #[arg(long)]
    read_only: bool,
    /// Serve a mirrored volume's device (one with twinvol metadata) as a Primary without its
    /// peer: refused unless the copy is up to date; starts a new generation and records every
    /// write in the dirty bitmap, so the peer is resynced from this copy later.
    #[arg(long, conflicts_with_all = ["read_only", "stdio", "threads"])]
    degraded_primary: bool,
    /// Force the I/O engine (default: io_uring if the kernel allows it, else sync).
    #[arg(long, value_enum)]
    engine: Option<EngineKind>,
    /// Page-cache mode: none = O_DIRECT, writeback = buffered.
    #[arg(long, value_enum, default_value_t = CacheMode::None)]
    cache: CacheMode,
    /// Data-path threads, each with its own io_uring ring (default: one per core, at most 4).
    #[arg(long)]
    threads: Option<usize>,
    /// Seconds in-flight requests may take after SIGTERM.
    #[arg(long, default_value_t = 10)]
    shutdown_grace: u64,
}

#[derive(Args)]
struct AttachArgs {
    /// A running export's Unix socket, or a device/file to serve from this process.
    source: PathBuf,
    /// The kernel device, e.g. /dev/nbd0.
    device: PathBuf,
    /// Export name to ask for.
    #[arg(long, default_value = "")]
    name: String,
    /// Connections for the kernel to spread I/O over.
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// Kernel request timeout in seconds.
    #[arg(long, default_value_t = 30)]
    timeout: u64,
    /// Seconds the kernel queues I/O while the server is away (restart without I/O errors).
    #[arg(long, default_value_t = 60)]
    dead_conn_timeout: u64,
    /// Engine for an in-process export.
    #[arg(long, value_enum)]
    engine: Option<EngineKind>,
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TWINVOL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

fn run_export(a: ExportArgs) -> anyhow::Result<()> {
    let endpoint = match (a.socket, a.listen, a.stdio) {
        (Some(p), _, _) => Endpoint::Unix(p),
        (None, Some(addr), _) => Endpoint::Tcp(addr),
        (None, None, true) => Endpoint::Stdio,
        (None, None, false) => {
            anyhow::bail!("say where to listen: --socket PATH, --listen HOST:PORT or --stdio")
        }
    };
    let server = twinvol::nbd::server::ServerConfig {
        shutdown_grace: std::time::Duration::from_secs(a.shutdown_grace),
        ..Default::default()
    };
    use twinvol::meta::store::Probed;
    // A mirrored volume's device is served only with its metadata in the loop (or read-only,
    // its data area alone).
    let probed = export::probe_device(&a.path)?;
    let reserved_tail = match (&probed, a.degraded_primary) {
        (Probed::Metadata { .. }, true) => {
            twinvol::volume::degraded::run(twinvol::volume::degraded::DegradedOptions {
                path: a.path,
                endpoint,
                name: a.name,
                engine: a.engine,
                cache: a.cache,
                server,
            })?;
            return Ok(());
        }
        (_, true) => anyhow::bail!(
            "{} holds no valid twinvol metadata: --degraded-primary serves a mirrored volume's device only (export a plain device without it)",
            a.path.display()
        ),
        (Probed::Nothing, false) => 0,
        (
            Probed::Metadata {
                device_len,
                data_size,
                ..
            },
            false,
        ) if a.read_only => device_len.saturating_sub(*data_size),
        (Probed::Metadata { .. } | Probed::Damaged(_), false) => {
            export::refuse_probed(&a.path, &probed)?;
            0
        }
    };
    export::run(ExportOptions {
        path: a.path,
        endpoint,
        name: a.name,
        read_only: a.read_only,
        engine: a.engine,
        cache: a.cache,
        server,
        threads: a.threads.unwrap_or_else(export::default_threads),
        reserved_tail,
    })?;
    Ok(())
}

fn run_attach(a: AttachArgs) -> anyhow::Result<()> {
    use std::time::Duration;
    twinvol::nbd::attach_cmd::run_attach(twinvol::nbd::attach_cmd::AttachOptions {
        source: a.source,
        device: a.device,
        name: a.name,
        connections: a.connections,
        timeout: Duration::from_secs(a.timeout),
        dead_conn_timeout: Duration::from_secs(a.dead_conn_timeout),
        engine: a.engine,
    })?;
    Ok(())
}

fn run_cloud(config: PathBuf, command: twinvol::cloud::cli::CloudCommand) -> anyhow::Result<()> {
    let cfg = twinvol::config::Config::load(&config)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let ok = rt.block_on(async {
        let mut out = std::io::stdout();
        twinvol::cloud::cli::run(command, &cfg, &mut out).await
    })?;
    if !ok {
        anyhow::bail!("the cloud report shows a problem (see above)");
    }
    Ok(())
}

/// Commands that print a result and exit end quietly when their reader goes away
/// (`twinvol status | head -1`): SIGPIPE gets its default action back, as for any Unix filter.
/// Long-running commands keep Rust's default (SIGPIPE ignored): a client or a log reader that
/// goes away must not kill a server, and they treat EPIPE as an error of that one stream.
fn prints_and_exits(c: &Command) -> bool {
    !matches!(
        c,
        Command::Export(_)
            | Command::Attach(_)
            | Command::Mirror(_)
            | Command::Run { .. }
            | Command::Demo(_)
    )
}

fn default_sigpipe() {
    // SAFETY: called in `main` before any thread starts; SIG_DFL is a valid disposition for
    // SIGPIPE and no handler of ours is replaced.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if prints_and_exits(&cli.command) {
        default_sigpipe();
    }
    // A process that serves a kernel block device must be an IO flusher, locked in memory and
    // unattractive to the OOM killer, set before any thread starts (docs/KERNEL.md).
    let prepare = matches!(cli.command, Command::Attach(_))
        .then(twinvol::nbd::kernel::prepare_process_for_attach);
    init_logging();
    if let Some(Err(e)) = prepare {
        tracing::warn!(error = %e, "process preparation for kernel attach incomplete: I/O may deadlock under memory pressure");
    }
    let result = match cli.command {
        Command::Export(a) => run_export(a),
        Command::Attach(a) => run_attach(a),
        Command::Detach { device } => {
            twinvol::nbd::attach_cmd::run_detach(&device).map_err(Into::into)
        }
        Command::Meta(cmd) => {
            twinvol::meta::cli::run(cmd, &mut std::io::stdout().lock()).map_err(Into::into)
        }
        Command::Cloud { config, command } => run_cloud(config, command),
        Command::Mirror(a) => twinvol::volume::run::run(a).map_err(Into::into),
        Command::Verify { args, ctl, volume } => {
            if args.control_socket.is_some() {
                twinvol::volume::control::run_verify(args, &mut std::io::stdout().lock())
                    .map_err(Into::into)
            } else {
                run_daemon_verify(ctl, volume, args.json)
            }
        }
        Command::Resync {
            ctl,
            volume,
            discard_local,
        } => run_control(
            ctl,
            twinvol::cluster::control::Request::Resync {
                volume,
                discard_local,
            },
            false,
        ),
        Command::Run { config } => run_daemon(config),
        Command::Status {
            ctl,
            json,
            watch,
            status_file,
        } => run_status(ctl, json, watch, status_file),
        Command::Promote { ctl, force } => run_control(
            ctl,
            twinvol::cluster::control::Request::Promote { force },
            false,
        ),
        Command::Demote { ctl } => {
            run_control(ctl, twinvol::cluster::control::Request::Demote, false)
        }
        Command::Switchover { ctl } => {
            run_control(ctl, twinvol::cluster::control::Request::Switchover, false)
        }
        Command::Demo(a) => twinvol::cluster::demo::run(a),
        Command::CheckConfig { files } => files.iter().try_for_each(|f| {
            twinvol::config::Config::load(f)?;
            Ok(())
        }),
        Command::GenMan { dir } => clap_mangen::generate_to(Cli::command(), &dir)
            .map_err(|e| anyhow::anyhow!("writing man pages into {}: {e}", dir.display())),
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "twinvol",
                &mut std::io::stdout(),
            );
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("twinvol: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
