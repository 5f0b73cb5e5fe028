//! NBD device names: /dev/nbdN <-> index N.

use std::path::{Path, PathBuf};

use super::error::KernelError;

/// Parses `/dev/nbdN` into `N`. Only the canonical form is accepted: the parent directory is
/// `/dev`, the name is `nbd` followed by decimal digits without a leading zero (the kernel
/// names them so), and no partition suffix (`/dev/nbd0p1` is a partition, not a device).
pub fn device_index(path: &Path) -> Result<u32, KernelError> {
    let bad = |reason| KernelError::BadDevicePath {
        path: path.to_path_buf(),
        reason,
    };
    if path.parent() != Some(Path::new("/dev")) {
        return Err(bad("the device must be given by its /dev path"));
    }
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| bad("the file name is not UTF-8"))?;
    let digits = name
        .strip_prefix("nbd")
        .ok_or_else(|| bad("the name does not start with `nbd`"))?;
    if digits.is_empty() {
        return Err(bad("the device number is missing"));
    }
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad("the device number must be decimal digits only (a partition like nbd0p1 cannot be attached)"));
    }
    if digits.len() > 1 && digits.starts_with('0') {
        return Err(bad("the device number has a leading zero"));
    }
    digits
        .parse::<u32>()
        .map_err(|_| bad("the device number is too large"))
}

/// The device path for index `index`: `/dev/nbd{index}`.
pub fn device_path(index: u32) -> PathBuf {
    PathBuf::from(format!("/dev/nbd{index}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn canonical_paths_parse_to_their_index() {
        assert_eq!(device_index(Path::new("/dev/nbd0")).unwrap(), 0);
        assert_eq!(device_index(Path::new("/dev/nbd15")).unwrap(), 15);
        assert_eq!(device_index(Path::new("/dev/nbd4095")).unwrap(), 4095);
    }

    #[test]
    fn non_nbd_paths_are_rejected_with_the_expected_form_in_the_message() {
        for (p, why) in [
            ("/dev/sda", "does not start"),
            ("/dev/nbd", "missing"),
            ("/dev/nbd0p1", "partition"),
            ("/dev/nbd01", "leading zero"),
            ("/dev/nbd-1", "decimal digits"),
            ("/dev/nbd99999999999", "too large"),
            ("nbd0", "/dev path"),
            ("/tmp/nbd0", "/dev path"),
            ("/dev/block/nbd0", "/dev path"),
        ] {
            let e = device_index(Path::new(p)).unwrap_err();
            let msg = e.to_string();
            assert!(msg.contains("expected /dev/nbdN"), "{p}: {msg}");
            assert!(msg.contains(why), "{p}: {msg}");
            assert!(msg.contains(p), "{p}: {msg}");
        }
    }

    proptest! {
        #[test]
        fn device_path_round_trips(index in any::<u32>()) {
            prop_assert_eq!(device_index(&device_path(index)).unwrap(), index);
        }

        #[test]
        fn arbitrary_names_never_panic(name in "\\PC{0,20}") {
            let _ = device_index(&Path::new("/dev").join(name));
        }
    }
}
