//! A Unix control socket only its owner (root) may connect to: created under umask 0177 so
//! there is no moment where others may connect, then set to mode 0600. A stale socket file
//! (nobody listening) is replaced; a live one is refused. Used by the daemon's control socket
//! and by `twinvol mirror --control-socket`.

use std::path::Path;

use tokio::net::UnixListener;

/// Why the socket could not be bound; each caller words it for its own setting.
#[derive(Debug)]
pub enum BindError {
    /// Another running process listens on the path.
    InUse,
    /// The parent directory could not be created.
    CreateDir(std::io::Error),
    /// bind(2) failed.
    Bind(std::io::Error),
    /// chmod 0600 failed.
    Chmod(std::io::Error),
}

/// Binds `path` as a private control socket (see the module doc).
pub fn bind_private(path: &Path) -> Result<UnixListener, BindError> {
    use std::os::unix::fs::PermissionsExt;
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(BindError::InUse);
        }
        let _ = std::fs::remove_file(path);
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(BindError::CreateDir)?;
    }
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let l = UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let l = l.map_err(BindError::Bind)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(BindError::Chmod)?;
    Ok(l)
}
