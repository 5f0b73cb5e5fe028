//! Preparing the process that serves a kernel-attached NBD device.
//!
//! When the kernel writes back dirty pages of /dev/nbdN under memory pressure, those writes
//! travel through this process. If this process then needs memory (a page fault, an
//! allocation, a swap-in) the kernel may try to reclaim it by writing back more nbd pages,
//! which wait for this process: a deadlock. Three settings break the cycle:
//! - `PR_SET_IO_FLUSHER`: allocations of this thread (and threads it creates afterwards) do not
//!   recurse into I/O reclaim (PF_MEMALLOC_NOIO) and are not throttled like ordinary writers.
//!   It is per thread, inherited at creation: set it in `main` before any thread starts.
//! - `mlockall(MCL_CURRENT | MCL_FUTURE)`: our pages are never swapped out, so serving a
//!   request never waits for swap-in.
//! - a low `oom_score_adj`: the OOM killer picks other processes before the one that is
//!   writing the memory of everyone else back to disk.

use std::io;

use super::error::KernelError;

/// `prctl` option (linux/prctl.h, kernel 5.6+) that marks the thread as an I/O flusher.
pub const PR_SET_IO_FLUSHER: libc::c_int = 57;
/// `prctl` option that reads the flag back.
pub const PR_GET_IO_FLUSHER: libc::c_int = 58;

/// The `oom_score_adj` set by [`prepare_process_for_attach`]: low, but not -1000 (which would
/// make the process unkillable even when it is the one leaking).
pub const ATTACH_OOM_SCORE_ADJ: i32 = -900;

const CAP_HINT: &str = "needs CAP_SYS_RESOURCE: run as root or add CAP_SYS_RESOURCE to AmbientCapabilities in the systemd unit";

/// Marks the calling thread as an I/O flusher (`prctl(PR_SET_IO_FLUSHER, 1)`).
pub fn set_io_flusher() -> Result<(), KernelError> {
    // SAFETY: prctl with integer arguments only; no memory is passed.
    let rc = unsafe {
        libc::prctl(
            PR_SET_IO_FLUSHER,
            1 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
    if rc < 0 {
        let source = io::Error::last_os_error();
        let hint = match source.raw_os_error() {
            Some(libc::EINVAL) => {
                "the kernel is older than 5.6 and has no PR_SET_IO_FLUSHER: upgrade the kernel"
            }
            _ => CAP_HINT,
        };
        return Err(KernelError::ProcessPreparation {
            step: "set PR_SET_IO_FLUSHER",
            source,
            hint,
        });
    }
    Ok(())
}

/// Whether the calling thread is marked as an I/O flusher.
pub fn is_io_flusher() -> Result<bool, KernelError> {
    // SAFETY: prctl with integer arguments only; no memory is passed.
    let rc = unsafe {
        libc::prctl(
            PR_GET_IO_FLUSHER,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
    if rc < 0 {
        return Err(KernelError::ProcessPreparation {
            step: "read PR_GET_IO_FLUSHER",
            source: io::Error::last_os_error(),
            hint: CAP_HINT,
        });
    }
    Ok(rc == 1)
}

/// Locks all current and future pages of the process in RAM.
pub fn lock_all_memory() -> Result<(), KernelError> {
    use nix::sys::mman::{mlockall, MlockAllFlags};
    mlockall(MlockAllFlags::MCL_CURRENT | MlockAllFlags::MCL_FUTURE).map_err(|errno| KernelError::ProcessPreparation {
        step: "lock memory with mlockall(MCL_CURRENT | MCL_FUTURE)",
        source: io::Error::from(errno),
        hint: "raise the locked-memory limit: LimitMEMLOCK=infinity in the systemd unit (or `ulimit -l unlimited`), \
               or grant CAP_IPC_LOCK",
    })
}

/// Checks an `oom_score_adj` value against the kernel's range (-1000..=1000).
pub fn check_oom_score_adj(value: i32) -> Result<(), KernelError> {
    if (-1000..=1000).contains(&value) {
        Ok(())
    } else {
        Err(KernelError::ProcessPreparation {
            step: "set oom_score_adj",
            source: io::Error::from_raw_os_error(libc::EINVAL),
            hint: "the value must lie in -1000..=1000",
        })
    }
}

/// Writes `value` to /proc/self/oom_score_adj.
pub fn set_oom_score_adj(value: i32) -> Result<(), KernelError> {
    check_oom_score_adj(value)?;
    std::fs::write("/proc/self/oom_score_adj", value.to_string()).map_err(|source| KernelError::ProcessPreparation {
        step: "write /proc/self/oom_score_adj",
        source,
        hint: "lowering the OOM score needs CAP_SYS_RESOURCE (or OOMScoreAdjust= in the systemd unit)",
    })
}

/// Reads /proc/self/oom_score_adj.
pub fn oom_score_adj() -> Result<i32, KernelError> {
    let text = std::fs::read_to_string("/proc/self/oom_score_adj").map_err(|source| {
        KernelError::ProcessPreparation {
            step: "read /proc/self/oom_score_adj",
            source,
            hint: "is /proc mounted?",
        }
    })?;
    text.trim()
        .parse()
        .map_err(|_| KernelError::ProcessPreparation {
            step: "parse /proc/self/oom_score_adj",
            source: io::Error::new(
                io::ErrorKind::InvalidData,
                format!("not an integer: {text:?}"),
            ),
            hint: "is /proc a real procfs?",
        })
}

/// The number of threads of this process (the `Threads:` line of /proc/self/status), if it
/// can be read.
pub fn thread_count() -> Option<usize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Prepares the process that will serve a kernel-attached device: I/O flusher, all memory
/// locked, `oom_score_adj` = [`ATTACH_OOM_SCORE_ADJ`]. Each failure says what to check.
///
/// Call it from `main` **before any thread starts** (before building a tokio runtime):
/// `PR_SET_IO_FLUSHER` applies to the calling thread and to threads it creates afterwards,
/// never to threads that already exist. A warning is logged if other threads already run.
pub fn prepare_process_for_attach() -> Result<(), KernelError> {
    if let Some(n) = thread_count().filter(|&n| n > 1) {
        tracing::warn!(threads = n, "prepare_process_for_attach called with threads already running: they are not I/O flushers");
    }
    set_io_flusher()?;
    lock_all_memory()?;
    set_oom_score_adj(ATTACH_OOM_SCORE_ADJ)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    const CHILD_ENV: &str = "TWINVOL_TEST_PROCESS_PREP_CHILD";

    /// Runs the named test of this module in a child process (a fresh copy of the test binary)
    /// with `CHILD_ENV` set, so the settings never touch the test runner itself.
    fn run_in_child(test: &str) -> (bool, String) {
        let module = module_path!()
            .split_once("::")
            .map(|(_, rest)| rest)
            .unwrap_or(module_path!());
        let exe = std::env::current_exe().unwrap();
        let out = Command::new(exe)
            .args([
                &format!("{module}::{test}"),
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, "1")
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    fn status_kib(field: &str) -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with(field)).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    /// Whether this process holds capability `bit` (CapEff of /proc/self/status).
    fn has_capability(bit: u32) -> bool {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let hex = status
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .unwrap()
            .trim();
        u64::from_str_radix(hex, 16).unwrap() & (1 << bit) != 0
    }

    const CAP_IPC_LOCK: u32 = 14;
    const CAP_SYS_RESOURCE: u32 = 24;

    #[test]
    fn prepare_process_sets_io_flusher_locks_memory_and_lowers_oom_score() {
        if std::env::var_os(CHILD_ENV).is_some() {
            // The child: a process of its own, so mlockall and the OOM score stay here.
            match prepare_process_for_attach() {
                Ok(()) => println!(
                    "CHILD-RESULT ok flusher={} vmlck_kib={} oom={}",
                    is_io_flusher().unwrap(),
                    status_kib("VmLck:"),
                    oom_score_adj().unwrap()
                ),
                Err(e) => println!("CHILD-RESULT err {e}"),
            }
            return;
        }
        let (ok, out) =
            run_in_child("prepare_process_sets_io_flusher_locks_memory_and_lowers_oom_score");
        assert!(ok, "child failed:\n{out}");
        if has_capability(CAP_SYS_RESOURCE) && has_capability(CAP_IPC_LOCK) {
            assert!(
                out.contains("CHILD-RESULT ok flusher=true"),
                "with the capabilities every step must succeed:\n{out}"
            );
            assert!(out.contains("oom=-900"), "{out}");
            assert!(
                !out.contains("vmlck_kib=0 "),
                "mlockall locked nothing:\n{out}"
            );
        } else {
            // Root in a container without CAP_SYS_RESOURCE (as on the CI machine): the first
            // step fails and says which capability is missing.
            assert!(
                out.contains("CHILD-RESULT err cannot set PR_SET_IO_FLUSHER"),
                "{out}"
            );
            assert!(
                out.contains("CAP_SYS_RESOURCE"),
                "the error must say what to check:\n{out}"
            );
        }
        // This process was not touched.
        assert_ne!(oom_score_adj().unwrap(), ATTACH_OOM_SCORE_ADJ);
    }

    #[test]
    fn each_preparation_step_succeeds_exactly_when_its_privilege_is_held() {
        if std::env::var_os(CHILD_ENV).is_some() {
            println!("STEP flusher={}", set_io_flusher().is_ok());
            match lock_all_memory() {
                Ok(()) => println!("STEP mlock=true vmlck_kib={}", status_kib("VmLck:")),
                Err(e) => println!("STEP mlock=false {e}"),
            }
            let lowered = set_oom_score_adj(ATTACH_OOM_SCORE_ADJ);
            println!(
                "STEP lower={} {}",
                lowered.is_ok(),
                lowered.err().map(|e| e.to_string()).unwrap_or_default()
            );
            // Raising the score needs no privilege: write and read back.
            set_oom_score_adj(500).unwrap();
            println!("STEP raised readback={}", oom_score_adj().unwrap());
            return;
        }
        let runner_score = oom_score_adj().unwrap();
        let (ok, out) =
            run_in_child("each_preparation_step_succeeds_exactly_when_its_privilege_is_held");
        assert!(ok, "child failed:\n{out}");
        let sys_resource = has_capability(CAP_SYS_RESOURCE);
        assert!(
            out.contains(&format!("STEP flusher={sys_resource}")),
            "{out}"
        );
        assert!(out.contains(&format!("STEP lower={sys_resource}")), "{out}");
        if !sys_resource {
            assert!(
                out.contains("lowering the OOM score needs CAP_SYS_RESOURCE"),
                "{out}"
            );
        }
        if has_capability(CAP_IPC_LOCK) {
            assert!(out.contains("STEP mlock=true"), "{out}");
            assert!(
                !out.contains("vmlck_kib=0\n"),
                "mlockall locked nothing:\n{out}"
            );
        } else {
            assert!(
                out.contains("LimitMEMLOCK=infinity") || out.contains("STEP mlock=true"),
                "{out}"
            );
        }
        assert!(out.contains("STEP raised readback=500"), "{out}");
        assert_eq!(
            oom_score_adj().unwrap(),
            runner_score,
            "the test runner's own score was changed"
        );
    }

    #[test]
    fn oom_score_adj_outside_kernel_range_is_rejected_without_writing() {
        for v in [-1001, 1001, i32::MIN, i32::MAX] {
            let e = check_oom_score_adj(v).unwrap_err();
            assert!(e.to_string().contains("-1000..=1000"), "{e}");
        }
        assert!(check_oom_score_adj(ATTACH_OOM_SCORE_ADJ).is_ok());
    }

    #[test]
    fn failure_messages_name_what_to_check() {
        let e = KernelError::ProcessPreparation {
            step: "lock memory with mlockall(MCL_CURRENT | MCL_FUTURE)",
            source: io::Error::from_raw_os_error(libc::ENOMEM),
            hint: "raise the locked-memory limit: LimitMEMLOCK=infinity in the systemd unit",
        };
        let msg = e.to_string();
        assert!(msg.starts_with("cannot lock memory with mlockall"), "{msg}");
        assert!(msg.contains("LimitMEMLOCK=infinity"), "{msg}");
    }
}
