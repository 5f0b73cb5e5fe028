//! moto in server mode, started from the test virtualenv on a free loopback port.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running moto_server; killed on drop.
pub struct Moto {
    child: Child,
    /// Its address.
    pub addr: SocketAddr,
}

impl Moto {
    /// The virtualenv scripts/test-deps.sh installs moto into.
    pub fn venv() -> PathBuf {
        std::env::var_os("TWINVOL_VENV")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(std::env::var_os("HOME").expect("HOME is set"))
                    .join(".cache/twinvol-venv")
            })
    }

    /// Starts moto_server; panics with the install command when it is missing.
    pub fn start() -> Moto {
        let bin = Self::venv().join("bin/moto_server");
        assert!(
            bin.exists(),
            "{} is missing: run scripts/test-deps.sh (it installs moto[server] into ${{TWINVOL_VENV:-$HOME/.cache/twinvol-venv}})",
            bin.display()
        );
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let child = Command::new(&bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let mut moto = Moto { child, addr };
        let start = Instant::now();
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if let Ok(Some(status)) = moto.child.try_wait() {
                panic!("moto_server exited at start-up: {status}");
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "moto_server did not listen on {addr} within 60 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        moto
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
