//! `twinvol demo` and the two-node lab harness the integration tests share.
//!
//! [`Lab`] runs two daemons (`twinvol run`) on this machine: node-a on 127.0.0.1 (priority
//! 10), node-b on 127.0.0.2 (priority 20), two heartbeat paths each passing through a
//! relay in this process that a test can cut, an HTTP witness per node that a test can
//! switch off, and the `lab` cloud provider. Each node has its OWN file-backed volume with
//! internal metadata, mirrored synchronously to the peer over the replication path (TCP,
//! through a relay in this process that is cut with that path, as a real network cut would);
//! both start as zero-filled copies of one generation
//! (`new-current-uuid --clear-bitmap`), so no initial sync is needed. The demo checks that
//! the standby serves every write acknowledged on the old Primary from its own copy, and that
//! the returning node is resynced to an identical copy.

/// A line of the demo's report on stdout; a reader that went away (`| head`) does not stop
/// the demo (its nodes must still be stopped cleanly).
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

use std::io::{Read, Write};
use std::net::{SocketAddr, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::control::{self, Request};

/// Options of `twinvol demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Working directory (default: a new directory under /tmp).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Failovers to run and time (the active node is killed each time).
    #[arg(long, default_value_t = 1)]
    pub runs: u32,
    /// Heartbeat interval, milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub interval_ms: u64,
    /// Heartbeat timeout, milliseconds.
    #[arg(long, default_value_t = 3000)]
    pub timeout_ms: u64,
    /// The twinvol binary to run as the nodes (default: this executable).
    #[arg(long)]
    pub bin: Option<PathBuf>,
    /// Run each node in its own network namespace (two veth pairs; needs root, iproute2).
    #[arg(long)]
    pub netns: bool,
}

/// Per-node options of the lab.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// Start hook.
    pub start_hook: String,
    /// Fence mode text ("cloud" or "off").
    pub fence: String,
    /// Fence delay of the node, milliseconds.
    pub fence_delay_ms: u64,
    /// Isolation grace, milliseconds.
    pub isolation_grace_ms: u64,
    /// Check hook (quickCheck), run every 500 ms while Primary.
    pub check_hook: Option<String>,
    /// Recover hook, run after a failed check.
    pub recover_hook: Option<String>,
}

/// Lab options.
#[derive(Debug, Clone)]
pub struct LabOptions {
    /// Heartbeat interval, milliseconds.
    pub interval_ms: u64,
    /// Heartbeat timeout, milliseconds.
    pub timeout_ms: u64,
    /// Options of node-a and node-b.
    pub nodes: [NodeOptions; 2],
    /// Volume size in bytes.
    pub volume_size: u64,
    /// Run each node in its own network namespace joined by two veth pairs (one per path),
    /// cut paths with nftables drops; each node's witness answers on the host end of its own
    /// uplink veth (needs root, iproute2, nftables).
    pub netns: bool,
    /// `replication.outdate_wait_ms` of both nodes (0: not written, writes are not held).
    pub outdate_wait_ms: u64,
    /// More `[volume.replication]` lines for both nodes (e.g. `on_disk_error = "failover"`).
    pub extra_replication: String,
}

impl Default for LabOptions {
    fn default() -> Self {
        let n = NodeOptions {
            start_hook: "echo \"app started on $TWINVOL_NODE\" >> \"$TWINVOL_LAB/app.log\"".into(),
            fence: "cloud".into(),
            fence_delay_ms: 3000,
            isolation_grace_ms: 2000,
            check_hook: None,
            recover_hook: None,
        };
        Self {
            interval_ms: 1000,
            timeout_ms: 3000,
            nodes: [n.clone(), n],
            volume_size: 64 << 20,
            netns: false,
            outdate_wait_ms: 0,
            extra_replication: String::new(),
        }
    }
}

/// A UDP relay of one heartbeat path in one direction, which can be cut.
struct Relay {
    cut: Arc<AtomicBool>,
}

fn relay(listen: SocketAddr, from_ip: std::net::IpAddr, to: SocketAddr) -> std::io::Result<Relay> {
    let rx = UdpSocket::bind(listen)?;
    let tx = UdpSocket::bind(SocketAddr::new(from_ip, 0))?;
    let cut = Arc::new(AtomicBool::new(false));
    let c = cut.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1024];
        while let Ok((n, _)) = rx.recv_from(&mut buf) {
            if !c.load(Ordering::SeqCst) {
                let _ = tx.send_to(&buf[..n], to);
            }
        }
    });
    Ok(Relay { cut })
}

/// A TCP relay of the replication connection in one direction (on loopback the replication
/// path's traffic passes through it, so cutting that path cuts replication too, as on a real
/// network): connections it accepts are forwarded from `from_ip`; cut, it resets every open
/// connection and refuses new ones.
struct TcpRelay {
    cut: Arc<AtomicBool>,
    open: Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl TcpRelay {
    fn set_cut(&self, cut: bool) {
        self.cut.store(cut, Ordering::SeqCst);
        if cut {
            if let Ok(mut open) = self.open.lock() {
                for s in open.drain(..) {
                    let _ = s.shutdown(std::net::Shutdown::Both);
                }
            }
        }
    }
}

fn tcp_relay(
    listen: SocketAddr,
    from_ip: std::net::IpAddr,
    to: SocketAddr,
) -> std::io::Result<TcpRelay> {
    let l = std::net::TcpListener::bind(listen)?;
    let cut = Arc::new(AtomicBool::new(false));
    let open: Arc<std::sync::Mutex<Vec<std::net::TcpStream>>> = Arc::default();
    let (c, o) = (cut.clone(), open.clone());
    std::thread::spawn(move || {
        for client in l.incoming() {
            let Ok(client) = client else { continue };
            if c.load(Ordering::SeqCst) {
                continue; // dropped: the connection is reset
            }
            let server = (|| {
                let sock = socket2::Socket::new(
                    socket2::Domain::for_address(to),
                    socket2::Type::STREAM,
                    None,
                )?;
                sock.bind(&SocketAddr::new(from_ip, 0).into())?;
                sock.connect(&to.into())?;
                Ok::<_, std::io::Error>(std::net::TcpStream::from(sock))
            })();
            let Ok(server) = server else { continue };
            let pairs = [
                (client.try_clone(), server.try_clone()),
                (server.try_clone(), client.try_clone()),
            ];
            if let Ok(mut open) = o.lock() {
                open.push(client);
                open.push(server);
            }
            for (from, to) in pairs {
                let (Ok(mut from), Ok(mut to)) = (from, to) else {
                    continue;
                };
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut from, &mut to);
                    let _ = to.shutdown(std::net::Shutdown::Both);
                });
            }
        }
    });
    Ok(TcpRelay { cut, open })
}

/// An HTTP witness that answers 200, or nothing once switched off.
struct Witness {
    addr: SocketAddr,
    up: Arc<AtomicBool>,
}

fn witness(ip: &str) -> std::io::Result<Witness> {
    let l = std::net::TcpListener::bind((ip, 0))?;
    let addr = l.local_addr()?;
    let up = Arc::new(AtomicBool::new(true));
    let u = up.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            if !u.load(Ordering::SeqCst) {
                drop(s); // connection closed without an answer: not HTTP, not reachable
                continue;
            }
            let mut b = [0u8; 1024];
            let _ = s.read(&mut b);
            let _ =
                s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        }
    });
    Ok(Witness { addr, up })
}

/// Runs a metadata subcommand in this process; fails naming the command and why.
fn run_meta(args: &[&str]) -> std::io::Result<()> {
    crate::meta::cli::run_words(args)
        .map(|_| ())
        .map_err(|why| std::io::Error::other(format!("twinvol {}: {why}", args.join(" "))))
}

/// CRC32 of the first `len` bytes of `path` (a volume's data area).
pub fn data_crc(path: &Path, len: u64) -> std::io::Result<u32> {
    let mut f = std::fs::File::open(path)?.take(len);
    let mut h = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize())
}

/// Loads an nftables ruleset into namespace `ns` (`nft -f -`); fails naming `what`.
fn nft_apply(ns: &str, rules: &str, what: &str) -> std::io::Result<()> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .spawn()?;
    if let Some(mut i) = child.stdin.take() {
        i.write_all(rules.as_bytes())?;
    }
    if child.wait()?.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!("nft refused {what}")))
    }
}

/// Removes the nftables table `table` (family inet) in namespace `ns`.
fn nft_delete_table(ns: &str, table: &str) -> std::io::Result<()> {
    sh(&[
        "ip", "netns", "exec", ns, "nft", "delete", "table", "inet", table,
    ])
}

/// A free UDP port on `ip`. The probe socket stays in `held` until the caller drops it, so
/// ports picked while `held` lives are distinct: a port whose probe was already closed can be
/// handed out again (two heartbeat paths once got the same local port that way).
fn free_udp_port(ip: &str, held: &mut Vec<UdpSocket>) -> std::io::Result<u16> {
    let probe = UdpSocket::bind((ip, 0))?;
    let port = probe.local_addr()?.port();
    held.push(probe);
    Ok(port)
}

fn sh(args: &[&str]) -> std::io::Result<()> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| {
            std::io::Error::other(format!(
                "cannot run {}: {e} (install iproute2 and nftables)",
                args[0]
            ))
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "`{}` failed: {} (network-namespace tests need root, iproute2 and nftables)",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Two network namespaces joined by one veth pair per heartbeat path; removed on drop.
struct Netns {
    names: [String; 2],
    /// veths[p][n]: node n's end of path p.
    veths: [[String; 2]; 2],
    /// addrs[p][n]: node n's address on path p.
    addrs: [[String; 2]; 2],
    /// wveths[n]: node n's end of its uplink to the host, where its witness listens.
    wveths: [String; 2],
    /// witness_ips[n]: the host's address on node n's uplink (node n's witness).
    witness_ips: [String; 2],
}

impl Netns {
    fn new() -> std::io::Result<Self> {
        static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let c = COUNTER.fetch_add(1, Ordering::SeqCst);
        let id = (std::process::id() % 60) * 4 + c % 4;
        let names = [format!("tv{id}a"), format!("tv{id}b")];
        let veths = [
            [format!("tv{id}p0a"), format!("tv{id}p0b")],
            [format!("tv{id}p1a"), format!("tv{id}p1b")],
        ];
        let addrs = [
            [format!("10.100.{id}.1"), format!("10.100.{id}.2")],
            [format!("10.101.{id}.1"), format!("10.101.{id}.2")],
        ];
        let ns = Self {
            names,
            veths,
            addrs,
            wveths: [format!("tv{id}w0n"), format!("tv{id}w1n")],
            witness_ips: [format!("10.102.{id}.1"), format!("10.103.{id}.1")],
        };
        for n in &ns.names {
            let _ = sh(&["ip", "netns", "del", n]);
            sh(&["ip", "netns", "add", n])?;
            sh(&["ip", "-n", n, "link", "set", "lo", "up"])?;
        }
        for p in 0..2 {
            let [va, vb] = &ns.veths[p];
            sh(&["ip", "link", "add", va, "type", "veth", "peer", "name", vb])?;
            for n in 0..2 {
                let v = &ns.veths[p][n];
                sh(&["ip", "link", "set", v, "netns", &ns.names[n]])?;
                let a = format!("{}/24", ns.addrs[p][n]);
                sh(&["ip", "-n", &ns.names[n], "addr", "add", &a, "dev", v])?;
                sh(&["ip", "-n", &ns.names[n], "link", "set", v, "up"])?;
            }
        }
        // Each node's uplink to the host namespace, where its witness answers.
        for n in 0..2 {
            let (inner, host) = (&ns.wveths[n], format!("tv{id}w{n}h"));
            let _ = sh(&["ip", "link", "del", &host]);
            sh(&[
                "ip", "link", "add", inner, "type", "veth", "peer", "name", &host,
            ])?;
            sh(&["ip", "link", "set", inner, "netns", &ns.names[n]])?;
            let base = ns.witness_ips[n].trim_end_matches(".1").to_string();
            sh(&[
                "ip",
                "addr",
                "add",
                &format!("{}/24", ns.witness_ips[n]),
                "dev",
                &host,
            ])?;
            sh(&["ip", "link", "set", &host, "up"])?;
            sh(&[
                "ip",
                "-n",
                &ns.names[n],
                "addr",
                "add",
                &format!("{base}.2/24"),
                "dev",
                inner,
            ])?;
            sh(&["ip", "-n", &ns.names[n], "link", "set", inner, "up"])?;
        }
        Ok(ns)
    }

    fn cut(&self, p: usize, cut: bool) -> std::io::Result<()> {
        for n in 0..2 {
            let table = format!("tvcut{p}");
            if cut {
                let rules = format!(
                    "table inet {table} {{\n  chain input {{\n    type filter hook input priority 0; policy accept;\n    iifname \"{}\" drop\n  }}\n}}\n",
                    self.veths[p][n]
                );
                nft_apply(&self.names[n], &rules, "the drop rule")?;
            } else {
                nft_delete_table(&self.names[n], &table)?;
            }
        }
        Ok(())
    }
}

impl Netns {
    /// Drops (nftables, in node `n`'s namespace) everything node `n` receives on any of its
    /// interfaces (both heartbeat paths, replication, its witness uplink), and with `outbound`
    /// everything it sends too. `on = false` lifts it.
    fn isolate(&self, n: usize, on: bool, outbound: bool) -> std::io::Result<()> {
        if on {
            let set = format!(
                "{{ \"{}\", \"{}\", \"{}\" }}",
                self.veths[0][n], self.veths[1][n], self.wveths[n]
            );
            let out = if outbound {
                format!("  chain output {{\n    type filter hook output priority 0; policy accept;\n    oifname {set} drop\n  }}\n")
            } else {
                String::new()
            };
            let rules = format!(
                "table inet tviso {{\n  chain input {{\n    type filter hook input priority 0; policy accept;\n    iifname {set} drop\n  }}\n{out}}}\n"
            );
            nft_apply(&self.names[n], &rules, "the isolation rule")?;
            Ok(())
        } else {
            nft_delete_table(&self.names[n], "tviso")
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = sh(&["ip", "netns", "del", n]);
        }
    }
}

/// Unix milliseconds.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Two daemons on this machine.
pub struct Lab {
    /// Working directory.
    pub dir: PathBuf,
    bin: PathBuf,
    /// Config files of node-a and node-b.
    pub configs: [PathBuf; 2],
    /// Control sockets.
    pub sockets: [PathBuf; 2],
    /// NBD export sockets.
    pub exports: [PathBuf; 2],
    /// Each node's own volume file (data, then the metadata at its tail).
    pub volumes: [PathBuf; 2],
    children: [Option<Child>; 2],
    relays: Vec<(usize, Relay)>,
    /// Loopback only: the replication connections pass through these (cut with path 1).
    repl_relays: Vec<TcpRelay>,
    witnesses: [Witness; 2],
    netns: Option<Netns>,
}

/// Node names.
pub const NAMES: [&str; 2] = ["node-a", "node-b"];
const IPS: [&str; 2] = ["127.0.0.1", "127.0.0.2"];

impl Lab {
    /// Writes the configs, key, volume file, starts relays and witnesses (not the nodes).
    pub fn new(dir: &Path, bin: &Path, o: &LabOptions) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let key = dir.join("cluster.key");
        std::fs::write(&key, b"twinvol-demo-key-0123456789abcdef")?;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))?;
        // One generation id for both fresh copies (nonzero, not the "just created" id).
        let generation = format!(
            "{:x}",
            (unix_ms() << 16 ^ u64::from(std::process::id())) & 0x00ff_ffff_ffff_ffff | 1
        );
        let netns = if o.netns { Some(Netns::new()?) } else { None };
        // Loopback: witnesses on 127.0.0.1. Namespaces: node n's witness listens on the host end
        // of node n's uplink, so isolating the node's interfaces also cuts its witness.
        let witnesses = match &netns {
            Some(ns) => [witness(&ns.witness_ips[0])?, witness(&ns.witness_ips[1])?],
            None => [witness("127.0.0.1")?, witness("127.0.0.1")?],
        };
        let mut relays = Vec::new();
        // Per path: node i listens on IPS[i]:local; node i sends to a relay on IPS[1-i].
        let mut locals = [[0u16; 2]; 2];
        let mut relay_ports = [[0u16; 2]; 2];
        let mut ips = [
            [IPS[0].to_string(), IPS[1].to_string()],
            [IPS[0].to_string(), IPS[1].to_string()],
        ];
        if let Some(ns) = &netns {
            ips = ns.addrs.clone();
            locals = [[7790, 7791], [7790, 7791]];
            relay_ports = locals;
        } else {
            let mut held = Vec::new();
            for p in 0..2 {
                for n in 0..2 {
                    locals[n][p] = free_udp_port(IPS[n], &mut held)?;
                    relay_ports[n][p] = free_udp_port(IPS[1 - n], &mut held)?;
                }
            }
            // The relays and the daemons bind these ports next.
            drop(held);
        }
        for p in (0..2).filter(|_| netns.is_none()) {
            for n in 0..2 {
                let listen: SocketAddr = format!("{}:{}", IPS[1 - n], relay_ports[n][p])
                    .parse()
                    .map_err(std::io::Error::other)?;
                let to: SocketAddr = format!("{}:{}", IPS[1 - n], locals[1 - n][p])
                    .parse()
                    .map_err(std::io::Error::other)?;
                relays.push((
                    p,
                    relay(listen, IPS[n].parse().map_err(std::io::Error::other)?, to)?,
                ));
            }
        }
        let mut configs = [PathBuf::new(), PathBuf::new()];
        let mut sockets = [PathBuf::new(), PathBuf::new()];
        let mut exports = [PathBuf::new(), PathBuf::new()];
        let mut volumes = [PathBuf::new(), PathBuf::new()];
        // Replication addresses: the second ("replication") path's addresses. On loopback each
        // node reaches its peer through a relay (`repl_peer`), cut together with path 1.
        let mut repl = [String::new(), String::new()];
        for n in 0..2 {
            repl[n] = match &netns {
                Some(ns) => format!("{}:7800", ns.addrs[1][n]),
                None => {
                    let port = std::net::TcpListener::bind((IPS[n], 0))?
                        .local_addr()?
                        .port();
                    format!("{}:{port}", IPS[n])
                }
            };
        }
        let mut repl_peer = [repl[1].clone(), repl[0].clone()];
        let mut repl_relays = Vec::new();
        if netns.is_none() {
            for n in 0..2 {
                // Node n's connections to its peer: accepted on the peer's IP, forwarded from
                // node n's IP (the peer checks where a connection comes from).
                let listen: SocketAddr = format!("{}:0", IPS[1 - n])
                    .parse()
                    .map_err(std::io::Error::other)?;
                let l = std::net::TcpListener::bind(listen)?;
                let at = l.local_addr()?;
                drop(l);
                let to: SocketAddr = repl[1 - n].parse().map_err(std::io::Error::other)?;
                let from: std::net::IpAddr = IPS[n].parse().map_err(std::io::Error::other)?;
                repl_relays.push(tcp_relay(at, from, to)?);
                repl_peer[n] = at.to_string();
            }
        }
        for n in 0..2 {
            let nd = dir.join(NAMES[n]);
            std::fs::create_dir_all(&nd)?;
            sockets[n] = nd.join("control.sock");
            exports[n] = nd.join("data.sock");
            volumes[n] = nd.join("volume.img");
            std::fs::File::create(&volumes[n])?.set_len(o.volume_size)?;
            let dev = volumes[n].display().to_string();
            run_meta(&["create-md", "--device", &dev, "--granularity", "64K"])?;
            run_meta(&[
                "new-current-uuid",
                "--clear-bitmap",
                "--uuid",
                &generation,
                "--device",
                &dev,
            ])?;
            let volume = &volumes[n];
            let no = &o.nodes[n];
            let plan_file = dir.join(format!("{}-plan.jsonl", NAMES[n]));
            let witness_list = format!("[\"http://{}/\"]", witnesses[n].addr);
            let text = format!(
                r#"# twinvol lab node {name} (written by `twinvol demo`)
[node]
id = "{name}"

[[volume]]
name = "data"
device = "{volume}"   # this node's own copy; metadata at its tail
engine = "sync"
cache = "writeback"
[volume.export]
socket = "{export}"
[volume.replication]
address = "{raddr}"
peer = "{rpeer}"
peer_id = "{peer}"
key_file = "{key}"
mode = "sync"
ping_timeout_secs = 2
{outdate_wait}
[cluster]
peer = "{peer}"
priority = {prio}
peer_priority = {peer_prio}
key_file = "{key}"
heartbeat_interval_ms = {interval}
heartbeat_timeout_ms = {timeout}
fence = "{fence}"
fence_delay_ms = {fence_delay}
state_dir = "{state}"
control_socket = "{control}"

[[cluster.heartbeat]]
name = "service"
local = "{ip0}:{l0}"
peer = "{pip0}:{r0}"
priority = 1

[[cluster.heartbeat]]
name = "replication"
local = "{ip1}:{l1}"
peer = "{pip1}:{r1}"
priority = 2

[cluster.witness]
targets = {witness}
timeout_ms = 500
interval_ms = 500
isolation_grace_ms = {grace}

[cluster.hooks]
start = '{start}'
stop = 'echo "app stopped on $TWINVOL_NODE" >> "{dir}/app.log"'
timeout_ms = 5000
check_interval_ms = 500
{check}{recover}
[cluster.lab]
peer_pid_file = "{peer_pid}"
plan_file = "{plan}"
vip = "192.168.100.10"
record = "db.lab.internal."
"#,
                name = NAMES[n],
                peer = NAMES[1 - n],
                volume = volume.display(),
                export = exports[n].display(),
                raddr = repl[n],
                rpeer = repl_peer[n],
                prio = if n == 0 { 10 } else { 20 },
                peer_prio = if n == 0 { 20 } else { 10 },
                key = key.display(),
                interval = o.interval_ms,
                timeout = o.timeout_ms,
                fence = no.fence,
                fence_delay = no.fence_delay_ms,
                state = nd.display(),
                control = sockets[n].display(),
                ip0 = ips[0][n],
                pip0 = ips[0][1 - n],
                ip1 = ips[1][n],
                pip1 = ips[1][1 - n],
                l0 = locals[n][0],
                l1 = locals[n][1],
                r0 = relay_ports[n][0],
                r1 = relay_ports[n][1],
                witness = witness_list,
                outdate_wait = if o.outdate_wait_ms > 0 {
                    format!(
                        "outdate_wait_ms = {}\n{}",
                        o.outdate_wait_ms, o.extra_replication
                    )
                } else {
                    o.extra_replication.clone()
                },
                grace = no.isolation_grace_ms,
                start = no
                    .start_hook
                    .replace("$TWINVOL_LAB", &dir.display().to_string())
                    .replace('\'', "\""),
                dir = dir.display(),
                check = no.check_hook.as_ref().map_or(String::new(), |h| format!(
                    "check = '{}'\n",
                    h.replace("$TWINVOL_LAB", &dir.display().to_string())
                        .replace('\'', "\"")
                )),
                recover = no.recover_hook.as_ref().map_or(String::new(), |h| format!(
                    "recover = '{}'\n",
                    h.replace("$TWINVOL_LAB", &dir.display().to_string())
                        .replace('\'', "\"")
                )),
                peer_pid = dir.join(NAMES[1 - n]).join("twinvol.pid").display(),
                plan = plan_file.display(),
            );
            configs[n] = dir.join(format!("{}.toml", NAMES[n]));
            std::fs::write(&configs[n], text)?;
        }
        Ok(Self {
            dir: dir.into(),
            bin: bin.into(),
            configs,
            sockets,
            exports,
            volumes,
            children: [None, None],
            relays,
            repl_relays,
            witnesses,
            netns,
        })
    }

    /// Starts node `n` (0 = node-a, 1 = node-b); its log goes to `dir/node-x.log`.
    pub fn start(&mut self, n: usize) -> std::io::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{}.log", NAMES[n])))?;
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &ns.names[n]]).arg(&self.bin);
                c
            }
            None => Command::new(&self.bin),
        };
        let child = cmd
            .args(["run", "--config"])
            .arg(&self.configs[n])
            .env("TWINVOL_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.children[n] = Some(child);
        Ok(())
    }

    /// SIGKILLs node `n` and reaps it; returns the Unix ms just before the signal.
    pub fn kill(&mut self, n: usize) -> u64 {
        let t = unix_ms();
        if let Some(mut c) = self.children[n].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        t
    }

    /// Stops node `n` cleanly (SIGTERM, as `systemctl stop` does) and waits for it to exit;
    /// returns whether it exited with success.
    pub fn stop(&mut self, n: usize) -> bool {
        let Some(mut c) = self.children[n].take() else {
            return false;
        };
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        c.wait().map(|s| s.success()).unwrap_or(false)
    }

    /// Sends `sig` to node `n`'s process (e.g. SIGSTOP and SIGCONT to hang it); false when it
    /// is not running.
    pub fn signal(&self, n: usize, sig: nix::sys::signal::Signal) -> bool {
        match &self.children[n] {
            Some(c) => {
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), sig).is_ok()
            }
            None => false,
        }
    }

    /// Whether node `n`'s process has exited (e.g. fenced by its peer); reaps it.
    pub fn exited(&mut self, n: usize) -> bool {
        match &mut self.children[n] {
            None => true,
            Some(c) => matches!(c.try_wait(), Ok(Some(_))),
        }
    }

    /// Cuts (or restores) heartbeat path `p` in both directions; path 1 carries the
    /// replication connection too, which is cut with it.
    pub fn cut_path(&self, p: usize, cut: bool) -> std::io::Result<()> {
        if let Some(ns) = &self.netns {
            return ns.cut(p, cut);
        }
        for (path, r) in &self.relays {
            if *path == p {
                r.cut.store(cut, Ordering::SeqCst);
            }
        }
        if p == 1 {
            for r in &self.repl_relays {
                r.set_cut(cut);
            }
        }
        Ok(())
    }

    /// Isolates node `n` from everything (both heartbeat paths, replication, its witness) or
    /// lifts it: nftables drops in its namespace, or on loopback the relays and its witness.
    pub fn isolate(&self, n: usize, on: bool) -> std::io::Result<()> {
        if let Some(ns) = &self.netns {
            return ns.isolate(n, on, true);
        }
        self.witness_up(n, !on);
        self.cut_path(0, on)?;
        self.cut_path(1, on)
    }

    /// Cuts (or restores) only the replication connection (TCP port 7800) as seen by node `n`
    /// (network namespaces only): heartbeats keep flowing.
    pub fn cut_replication(&self, n: usize, on: bool) -> std::io::Result<()> {
        let Some(ns) = &self.netns else {
            return Err(std::io::Error::other(
                "cutting only replication needs the network-namespace lab",
            ));
        };
        if on {
            let rules = "table inet tvrepl {\n  chain input {\n    type filter hook input priority 0; policy accept;\n    tcp dport 7800 drop\n    tcp sport 7800 drop\n  }\n}\n";
            nft_apply(&ns.names[n], rules, "the replication drop rule")?;
            Ok(())
        } else {
            nft_delete_table(&ns.names[n], "tvrepl")
        }
    }

    /// One-way partition (network namespaces only): node `n` receives nothing on any interface
    /// but its packets still go out, so the peer keeps hearing it.
    pub fn deafen(&self, n: usize, on: bool) -> std::io::Result<()> {
        match &self.netns {
            Some(ns) => ns.isolate(n, on, false),
            None => Err(std::io::Error::other(
                "a one-way partition needs the network-namespace lab",
            )),
        }
    }

    /// Switches node `n`'s witness off (no answer) or on.
    pub fn witness_up(&self, n: usize, up: bool) {
        self.witnesses[n].up.store(up, Ordering::SeqCst);
    }

    /// Node `n`'s status, or `None` when it does not answer.
    pub fn status(&self, n: usize) -> Option<serde_json::Value> {
        control::call(&self.sockets[n], &Request::Status, Duration::from_secs(2))
            .ok()
            .map(|a| a.status)
    }

    /// Sends a control request to node `n`.
    pub fn request(&self, n: usize, r: &Request) -> Result<control::Answer, control::ControlError> {
        control::call(&self.sockets[n], r, Duration::from_secs(30))
    }

    /// Polls node `n` until `pred` holds on its status or `timeout` passes.
    pub fn wait_for(
        &self,
        n: usize,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Option<serde_json::Value> {
        let t0 = Instant::now();
        while t0.elapsed() < timeout {
            if let Some(s) = self.status(n) {
                if pred(&s) {
                    return Some(s);
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// Lines of node `n`'s plan file.
    pub fn plan(&self, n: usize) -> String {
        std::fs::read_to_string(self.dir.join(format!("{}-plan.jsonl", NAMES[n])))
            .unwrap_or_default()
    }

    /// Node `n`'s log.
    pub fn log(&self, n: usize) -> String {
        std::fs::read_to_string(self.dir.join(format!("{}.log", NAMES[n]))).unwrap_or_default()
    }

    /// The last `lines` lines of node `n`'s log (for errors: the lab's directory may be a
    /// temporary one that is gone by the time someone reads them).
    pub fn log_tail(&self, n: usize, lines: usize) -> String {
        let log = self.log(n);
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in self.children.iter_mut().flatten() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let t0 = Instant::now();
        for c in self.children.iter_mut().flatten() {
            while t0.elapsed() < Duration::from_secs(5) && matches!(c.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// True when a status says Primary.
pub fn is_primary(s: &serde_json::Value) -> bool {
    s["role"] == "primary"
}

/// A minimal NBD client (fixed newstyle, EXPORT_NAME, simple replies) for the demo's writes.
pub struct NbdClient {
    s: std::os::unix::net::UnixStream,
    cookie: u64,
    /// Export size.
    pub size: u64,
}

fn nbd_err(what: impl Into<String>) -> std::io::Error {
    std::io::Error::other(what.into())
}

impl NbdClient {
    /// Connects to a Unix socket export and negotiates the default export.
    pub fn connect(path: &Path) -> std::io::Result<Self> {
        let mut s = std::os::unix::net::UnixStream::connect(path)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut hello = [0u8; 18];
        s.read_exact(&mut hello)?;
        if &hello[..8] != b"NBDMAGIC" || hello[8..16] != 0x4948_4156_454F_5054u64.to_be_bytes() {
            return Err(nbd_err("not a newstyle NBD server"));
        }
        let flags = u16::from_be_bytes([hello[16], hello[17]]);
        let no_zeroes = flags & 2 != 0;
        let client_flags: u32 = 1 | if no_zeroes { 2 } else { 0 };
        s.write_all(&client_flags.to_be_bytes())?;
        let mut opt = Vec::new();
        opt.extend_from_slice(&0x4948_4156_454F_5054u64.to_be_bytes());
        opt.extend_from_slice(&1u32.to_be_bytes()); // NBD_OPT_EXPORT_NAME
        opt.extend_from_slice(&0u32.to_be_bytes()); // default export ""
        s.write_all(&opt)?;
        let mut info = [0u8; 10];
        s.read_exact(&mut info)?;
        if !no_zeroes {
            let mut z = [0u8; 124];
            s.read_exact(&mut z)?;
        }
        let mut size = [0u8; 8];
        size.copy_from_slice(&info[..8]);
        Ok(Self {
            s,
            cookie: 0,
            size: u64::from_be_bytes(size),
        })
    }

    fn request(
        &mut self,
        kind: u16,
        offset: u64,
        len: u32,
        data: &[u8],
    ) -> std::io::Result<Vec<u8>> {
        self.cookie += 1;
        let mut h = Vec::with_capacity(28 + data.len());
        h.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        h.extend_from_slice(&0u16.to_be_bytes());
        h.extend_from_slice(&kind.to_be_bytes());
        h.extend_from_slice(&self.cookie.to_be_bytes());
        h.extend_from_slice(&offset.to_be_bytes());
        h.extend_from_slice(&len.to_be_bytes());
        h.extend_from_slice(data);
        self.s.write_all(&h)?;
        let mut r = [0u8; 16];
        self.s.read_exact(&mut r)?;
        if r[..4] != 0x6744_6698u32.to_be_bytes() {
            return Err(nbd_err("unexpected reply magic"));
        }
        let err = u32::from_be_bytes([r[4], r[5], r[6], r[7]]);
        if r[8..16] != self.cookie.to_be_bytes() {
            return Err(nbd_err("reply cookie mismatch"));
        }
        if err != 0 {
            return Err(nbd_err(format!("server error {err}")));
        }
        let mut out = vec![0u8; if kind == 0 { len as usize } else { 0 }];
        self.s.read_exact(&mut out)?;
        Ok(out)
    }

    /// Writes `data` at `offset`; returns once the server acknowledged it.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.request(1, offset, data.len() as u32, data).map(|_| ())
    }
    /// Reads `len` bytes at `offset`.
    pub fn read(&mut self, offset: u64, len: u32) -> std::io::Result<Vec<u8>> {
        self.request(0, offset, len, &[])
    }
    /// Flushes.
    pub fn flush(&mut self) -> std::io::Result<()> {
        self.request(3, 0, 0, &[]).map(|_| ())
    }
}

/// The pattern of block `i` written in round `round`.
pub fn pattern(round: u32, i: u64) -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    let tag = format!("twinvol demo round {round} block {i} ");
    for (j, x) in b.iter_mut().enumerate() {
        *x = tag.as_bytes()[j % tag.len()];
    }
    b
}

/// Failover time statistics.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Timings {
    /// Each run, milliseconds from SIGKILL to the standby Primary, exported, hooks started.
    pub runs_ms: Vec<u64>,
    /// Median.
    pub median_ms: u64,
    /// Maximum.
    pub max_ms: u64,
}

/// Median and maximum of a sample.
pub fn timings(mut v: Vec<u64>) -> Timings {
    let runs = v.clone();
    v.sort_unstable();
    let median = if v.is_empty() {
        0
    } else if v.len() % 2 == 1 {
        v[v.len() / 2]
    } else {
        (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2
    };
    Timings {
        runs_ms: runs,
        median_ms: median,
        max_ms: v.last().copied().unwrap_or(0),
    }
}

/// Runs the demo; prints as it goes and ends with a report. Errors name the step.
pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    use anyhow::Context;
    let bin = match args.bin {
        Some(b) => b,
        None => std::env::current_exe().context("cannot find this executable; pass --bin")?,
    };
    let dir = match args.dir {
        Some(d) => d,
        None => std::env::temp_dir().join(format!("twinvol-demo-{}", std::process::id())),
    };
    let o = LabOptions {
        interval_ms: args.interval_ms,
        timeout_ms: args.timeout_ms,
        netns: args.netns,
        ..Default::default()
    };
    let deadline = Duration::from_millis(args.timeout_ms) + Duration::from_secs(20);
    say!("== twinvol demo in {}", dir.display());
    if args.netns {
        say!(
            "   two nodes in two network namespaces, one veth pair per heartbeat path, an uplink to each witness"
        );
    } else {
        say!("   two nodes on this machine: node-a 127.0.0.1 (priority 10), node-b 127.0.0.2 (priority 20)");
    }
    say!(
        "   heartbeats every {} ms on two paths, peer lost after {} ms; lab cloud provider",
        args.interval_ms,
        args.timeout_ms
    );
    let mut lab = Lab::new(&dir, &bin, &o).context("setting up the lab")?;
    say!(
        "   each node has its own volume ({}, {}), mirrored synchronously over the replication path;",
        lab.volumes[0].display(),
        lab.volumes[1].display()
    );
    say!("   both start as zero-filled copies of one generation, so no initial sync is needed");
    lab.start(0).context("starting node-a")?;
    lab.start(1).context("starting node-b")?;
    let s = lab.wait_for(0, deadline, is_primary).with_context(|| {
        format!(
            "node-a did not become Primary within {deadline:?}; the end of its log:\n{}",
            lab.log_tail(0, 30)
        )
    })?;
    say!(
        "\n== node-a is Primary (export {})",
        s["volumes"][0]["export"]
    );
    lab.wait_for(1, deadline, |s| {
        s["peer_view"]["state"] == "alive" && s["peer_view"]["role"] == "primary"
    })
    .with_context(|| {
        format!(
            "node-b does not see node-a; the end of its log:\n{}",
            lab.log_tail(1, 30)
        )
    })?;
    say!("== node-b is Secondary and sees node-a on both paths");

    let mut active = 0usize;
    let mut samples = Vec::new();
    let mut plan_seen = [0usize; 2];
    let blocks = 256u64;
    for round in 1..=args.runs {
        let standby = 1 - active;
        // Writes through NBD on the active node; every acknowledged write is logged.
        let mut c = NbdClient::connect(&lab.exports[active])
            .with_context(|| format!("connecting to {}'s export", NAMES[active]))?;
        let mut acked = Vec::new();
        for i in 0..blocks {
            c.write(i * 4096, &pattern(round, i)).context("NBD write")?;
            acked.push(i);
        }
        c.flush().context("NBD flush")?;
        drop(c);
        say!(
            "\n== round {round}: wrote and flushed {} blocks (4 KiB) through NBD on {}",
            acked.len(),
            NAMES[active]
        );
        let killed_at = lab.kill(active);
        say!("== SIGKILL {} at {killed_at}", NAMES[active]);
        let s = lab
            .wait_for(standby, deadline, is_primary)
            .with_context(|| {
                format!(
                    "{} did not take over; its log: {}, ending:\n{}",
                    NAMES[standby],
                    dir.join(format!("{}.log", NAMES[standby])).display(),
                    lab.log_tail(standby, 30)
                )
            })?;
        let at = s["primary_since_unix_ms"].as_u64().unwrap_or_else(unix_ms);
        let ms = at.saturating_sub(killed_at);
        samples.push(ms);
        say!(
            "== {} took over in {ms} ms (SIGKILL -> Primary, exported, start hook done)",
            NAMES[standby]
        );
        if let Some(steps) = s["last_sequence"]["steps"].as_array() {
            for st in steps {
                say!(
                    "     {:<18} {:>5} ms  {}",
                    st["name"].as_str().unwrap_or(""),
                    st["elapsed_ms"],
                    st["detail"].as_str().unwrap_or("")
                );
            }
        }
        say!(
            "   cloud plan of {} (lab provider: what it would change on AWS):",
            NAMES[standby]
        );
        let plan = lab.plan(standby);
        for l in plan.lines().skip(plan_seen[standby]) {
            say!("     {l}");
        }
        plan_seen[standby] = plan.lines().count();
        let mut c = NbdClient::connect(&lab.exports[standby])
            .context("connecting to the new Primary's export")?;
        let mut bad = 0;
        for &i in &acked {
            if c.read(i * 4096, 4096).context("NBD read")? != pattern(round, i) {
                bad += 1;
            }
        }
        drop(c);
        if bad > 0 {
            anyhow::bail!(
                "{bad} of {} acknowledged writes are missing on the new Primary",
                acked.len()
            );
        }
        say!(
            "== verified all {} acknowledged writes on {}'s own copy",
            acked.len(),
            NAMES[standby]
        );
        lab.start(active)
            .with_context(|| format!("restarting {}", NAMES[active]))?;
        lab.wait_for(active, deadline, |s| {
            s["peer_view"]["state"] == "alive"
                && s["peer_view"]["role"] == "primary"
                && s["role"] == "secondary"
        })
        .with_context(|| format!("{} did not come back as Secondary", NAMES[active]))?;
        say!(
            "== {} is back as Secondary (switchback = intelligent: the service stays on {})",
            NAMES[active],
            NAMES[standby]
        );
        // The returning node's copy missed the writes made since it died (and its activity
        // log marks its own last writes dirty): it resyncs from the new Primary.
        let s = lab
            .wait_for(active, deadline, |s| {
                let r = &s["volumes"][0]["replication"];
                s["volumes"][0]["disk"] == "up-to-date"
                    && r["connection"]["state"] == "connected"
                    && r["resync"].is_null()
            })
            .with_context(|| format!("{} did not finish its resync", NAMES[active]))?;
        let resynced = s["volumes"][0]["replication"]["counters"]["resync_bytes_applied"]
            .as_u64()
            .unwrap_or(0);
        let size = NbdClient::connect(&lab.exports[standby])
            .context("connecting to the Primary's export")?
            .size;
        let crcs = [
            data_crc(&lab.volumes[0], size).context("reading node-a's copy")?,
            data_crc(&lab.volumes[1], size).context("reading node-b's copy")?,
        ];
        if crcs[0] != crcs[1] {
            anyhow::bail!(
                "the copies differ after the resync: node-a crc32 {:08x}, node-b crc32 {:08x}",
                crcs[0],
                crcs[1]
            );
        }
        say!(
            "== {} resynced {} KiB from {} (the regions dirty on either side, not the whole {} MiB); both copies identical (crc32 {:08x})",
            NAMES[active],
            resynced / 1024,
            NAMES[standby],
            size >> 20,
            crcs[0]
        );
        active = standby;
    }
    let t = timings(samples);
    say!("\n== report");
    say!(
        "   failovers: {}   median {} ms   max {} ms   (heartbeat {} ms / timeout {} ms)",
        t.runs_ms.len(),
        t.median_ms,
        t.max_ms,
        args.interval_ms,
        args.timeout_ms
    );
    say!("   runs (ms): {:?}", t.runs_ms);
    say!(
        "   logs: {}/node-a.log, node-b.log; plans: node-a-plan.jsonl, node-b-plan.jsonl",
        dir.display()
    );
    say!("   demo PASSED");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_max_of_odd_and_even_samples() {
        let t = timings(vec![3000, 1000, 2000]);
        assert_eq!((t.median_ms, t.max_ms), (2000, 3000));
        let t = timings(vec![4, 1, 3, 2]);
        assert_eq!((t.median_ms, t.max_ms), (2, 4));
        assert_eq!(t.runs_ms, vec![4, 1, 3, 2]);
    }

    #[test]
    fn lab_configs_pass_validation() {
        let d = tempfile::tempdir().unwrap();
        let lab = Lab::new(d.path(), Path::new("/bin/false"), &LabOptions::default()).unwrap();
        for c in &lab.configs {
            let cfg = crate::config::Config::load(c).unwrap();
            assert_eq!(cfg.cluster.unwrap().heartbeats.len(), 2);
        }
    }
}
