//! Loading the pre-shared replication key from its file (`replication.key_file`).
//!
//! Invariant: the key is refused unless only its owner can read the file, and no error (or
//! log line) ever contains the file's contents.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::repl::wire::auth::{KeyError, PreSharedKey};

/// Why the key file cannot be used. Messages name the file and the fix, never the contents.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// The file could not be read.
    #[error("cannot read replication key file {path}: {source} — create it on both nodes with the same content (e.g. `head -c 32 /dev/urandom | base64 > {path}; chmod 600 {path}`)")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Group or others may read or write the file.
    #[error("replication key file {path} has mode {mode:04o}: others may read it — run `chmod 600 {path}`")]
    Permissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The contents are not a usable key.
    #[error("replication key file {path}: {source}")]
    Key {
        /// The file.
        path: PathBuf,
        /// What is wrong (length only).
        #[source]
        source: KeyError,
    },
}

/// Reads the key from `path`. Trailing whitespace (the newline editors and `echo` add) is not
/// part of the key, so a key written either way is the same on both nodes.
pub fn load_key_file(path: &Path) -> Result<PreSharedKey, KeyFileError> {
    let read_err = |source| KeyFileError::Read {
        path: path.into(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(read_err)?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(KeyFileError::Permissions {
            path: path.into(),
            mode,
        });
    }
    let mut bytes = std::fs::read(path).map_err(read_err)?;
    while bytes.last().is_some_and(|b| b.is_ascii_whitespace()) {
        bytes.pop();
    }
    PreSharedKey::new(bytes).map_err(|source| KeyFileError::Key {
        path: path.into(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn key_file(contents: &[u8], mode: u32) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(contents).unwrap();
        std::fs::set_permissions(f.path(), std::fs::Permissions::from_mode(mode)).unwrap();
        f
    }

    #[test]
    fn key_with_and_without_trailing_newline_is_the_same_key() {
        let a =
            load_key_file(key_file(b"c2VjcmV0LXJlcGxpY2F0aW9uLWtleQ==\n", 0o600).path()).unwrap();
        let b = load_key_file(key_file(b"c2VjcmV0LXJlcGxpY2F0aW9uLWtleQ==", 0o400).path()).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn world_readable_key_file_is_refused_with_chmod_fix_and_no_contents() {
        let f = key_file(b"world-readable-secret-key-material", 0o644);
        let e = load_key_file(f.path()).unwrap_err().to_string();
        assert!(
            e.contains("chmod 600")
                && e.contains("0644")
                && e.contains(&f.path().display().to_string()),
            "{e}"
        );
        assert!(!e.contains("world-readable-secret"), "{e}");
    }

    #[test]
    fn short_key_is_refused_naming_its_length_not_its_bytes() {
        let f = key_file(b"tiny-secret\n", 0o600);
        let e = load_key_file(f.path()).unwrap_err().to_string();
        assert!(e.contains("11 bytes") && !e.contains("tiny-secret"), "{e}");
    }

    #[test]
    fn missing_key_file_names_the_path_and_how_to_create_it() {
        let e = load_key_file(Path::new("/nonexistent/twinvol/repl.key"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("/nonexistent/twinvol/repl.key") && e.contains("chmod 600"),
            "{e}"
        );
    }
}
