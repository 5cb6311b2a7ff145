//! Everything OS-specific in DaemonEye lives here, and only here: the
//! [`ProcessRecord`] model and process enumeration, privilege detection and
//! the privilege drop, peer credentials of a Unix socket, and the
//! platform report. This is the only crate that uses `cfg(target_os)`.
//!
//! Two [`ProcessSource`] backends:
//!
//! - [`ProcFs`] (Linux): a direct `/proc` walk that reads only `stat` (and
//!   stats the pid directory) for known processes, and `status`, `cmdline`,
//!   `exe` and `cwd` once per new or exec'd identity, through its opened
//!   `/proc/<pid>` directory (a first snapshot on two threads).
//! - [`SysinfoSource`]: the portable backend (macOS, Windows, FreeBSD, and
//!   a fallback on Linux).
//!
//! [`default_source`] picks the best one for the OS. Every optional field
//! of a record is a [`Field`]: the value, or why it is missing
//! ([`Unavailable`]), never an empty string.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

use serde::{Deserialize, Serialize};

pub mod clock;
#[cfg(target_os = "linux")]
mod cnproc;
pub mod files;
pub mod kernel;
// Read on FreeBSD; parsed (and tested) everywhere.
#[cfg_attr(not(target_os = "freebsd"), allow(dead_code))]
mod kinfo;
pub mod paths;
// Unix sockets and user ids: the bus's side of the platform.
#[cfg(unix)]
mod peer;
mod portable;
pub mod privilege;
#[cfg(target_os = "linux")]
mod procfs;
mod record;
pub mod signals;
#[cfg(unix)]
pub mod spawn;
pub mod threads;

pub use crate::kernel::{
    KernelEvent, KernelEventKind, KernelEventSource, KernelEventsAvailability, KernelSourceConfig,
    KernelWaker, ReadOutcome, Wakeup, kernel_events_availability, raise_thread_priority,
};
#[cfg(unix)]
pub use crate::peer::{
    PEER_PID_AVAILABLE, PeerCredentials, effective_uid, peer_credentials, process_start_time,
};
pub use crate::portable::SysinfoSource;
pub use crate::privilege::{PrivilegeReport, drop_privileges};
#[cfg(target_os = "linux")]
pub use crate::procfs::{DEFAULT_MAX_ARGV_BYTES, ProcFs};
pub use crate::record::{
    Argv, Credentials, DetailsInterner, ExitStatus, Field, FileIdentity, ProcessDetails, ProcessKey,
    ProcessRecord, ProcessState, Unavailable,
};

/// This host's name, as the OS gives it (`gethostname` on Unix), read
/// once; `None` when the OS does not say.
pub fn hostname() -> Option<&'static str> {
    static NAME: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    NAME.get_or_init(|| sysinfo::System::host_name().ok()).as_deref()
}

/// Errors of the platform layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An OS call on a file or directory failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: std::path::PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The OS or environment lacks what was asked for.
    #[error("not supported here: {what}")]
    NotSupported {
        /// What is missing.
        what: String,
    },
    /// Changing or checking privileges failed.
    #[error("privilege change failed at {op}: {source}")]
    Privilege {
        /// The step that failed.
        op: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Counters of the last enumeration cycle.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CycleStats {
    /// Entries listed by the OS.
    pub listed: u32,
    /// Processes that exited while being read (skipped, not errors).
    pub vanished: u32,
    /// Processes whose basic state could not be read (e.g. `hidepid`).
    pub unreadable: u32,
    /// Processes whose exec-time details were read this cycle (new or
    /// exec'd identities). Zero in a steady state.
    pub detail_reads: u32,
}

/// A way to enumerate every process of the host.
pub trait ProcessSource: Send {
    /// Name of the backend, for reports ("linux-procfs", "sysinfo").
    fn backend(&self) -> &'static str;
    /// Enumerates every process (never threads) as of now. A process that
    /// exits during the walk is left out; that is not an error.
    fn refresh(&mut self) -> Result<Vec<ProcessRecord>, Error>;
    /// Counters of the last [`ProcessSource::refresh`].
    fn last_cycle(&self) -> CycleStats;
    /// The [`ProcessRecord::start_time`] a process starting now would get
    /// (`None` where the backend cannot tell). A process whose start time
    /// is at or after a value read before a walk began started during it.
    fn start_time_now(&self) -> Option<u64> {
        None
    }
    /// Whether to read each process's working directory (on by default).
    /// Off, `cwd` is `NotCollected` and never read or kept: procmond
    /// reports it only with enhanced metadata. A backend that cannot leave
    /// it out ignores this.
    fn set_read_cwd(&mut self, on: bool) {
        let _ = on;
    }
    /// Bytes the backend keeps between refreshes, estimated (for memory
    /// benchmarks); `None` where it does not say (sysinfo's).
    fn state_bytes(&self) -> Option<usize> {
        None
    }
}

/// The best backend for this OS: `/proc` on Linux, sysinfo elsewhere.
pub fn default_source() -> Result<Box<dyn ProcessSource>, Error> {
    #[cfg(target_os = "linux")]
    {
        Ok(Box::new(ProcFs::new()?))
    }
    #[cfg(not(target_os = "linux"))]
    {
        Ok(Box::new(SysinfoSource::new()?))
    }
}

/// The identity of a file from its metadata, as every backend fills
/// [`ProcessDetails::exe_file`]: device, inode, size, and modification and
/// status-change times in whole seconds since the epoch. Compare an open
/// file's identity (from `File::metadata`) with a record's to know whether
/// it is the same file, unchanged.
///
/// `NotSupported` where std exposes no device and inode (Windows).
pub fn file_identity(meta: &std::fs::Metadata) -> Field<FileIdentity> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        Ok(FileIdentity {
            dev: meta.dev(),
            inode: meta.ino(),
            size: meta.size(),
            mtime: meta.mtime(),
            ctime: meta.ctime(),
        })
    }
    #[cfg(not(unix))]
    {
        let _ = meta;
        Err(Unavailable::NotSupported)
    }
}

/// The path to open to read the executable of process `pid`, whose record
/// names it `exe`.
///
/// Linux: `/proc/<pid>/exe`, which opens the very file the process runs,
/// even after it was deleted or replaced on disk (the kernel checks that
/// the caller may inspect the process, as for `ptrace`). Elsewhere: `exe`
/// itself, which may by now name another file; compare identities after
/// opening.
pub fn exe_read_path(pid: u32, exe: &std::path::Path) -> std::path::PathBuf {
    #[cfg(target_os = "linux")]
    {
        let _ = exe;
        std::path::PathBuf::from(format!("/proc/{pid}/exe"))
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = pid;
        exe.to_path_buf()
    }
}

/// Opens a file for reading without ever blocking in `open`.
///
/// A path can name a FIFO with no writer (whose `open` waits for one
/// forever) or a terminal; a path checked a moment ago can be swapped for
/// one. On Unix the file is opened with `O_NONBLOCK | O_NOCTTY`, which
/// changes nothing for reading a regular file; callers still compare the
/// open file's identity (`File::metadata`) with what they expect. Elsewhere
/// a plain `File::open`.
///
/// This follows symbolic links and opens whatever the path names, a
/// device included: for a path a user may control (process data, a task)
/// use [`files::open_regular_file`] instead.
pub fn open_for_reading(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    #[cfg(unix)]
    {
        use nix::fcntl::OFlag;
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags((OFlag::O_NONBLOCK | OFlag::O_NOCTTY).bits())
            .open(path)
    }
    #[cfg(not(unix))]
    {
        std::fs::File::open(path)
    }
}

/// An id of the current boot: process start times (and identities) are
/// comparable only within one boot. Linux: the kernel's random `boot_id`;
/// elsewhere the boot time in seconds.
pub fn boot_id() -> Option<String> {
    #[cfg(target_os = "linux")]
    {
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok().map(|s| s.trim().to_owned())
    }
    #[cfg(not(target_os = "linux"))]
    {
        sysinfo::System::boot_time().ok().map(|t| format!("boot-{t}"))
    }
}

/// Whether process `pid` exists and has not exited (a zombie has). For
/// tests and tools that watch processes they started; Linux reads
/// `/proc/<pid>/stat`, elsewhere sysinfo asks the kernel.
pub fn process_alive(pid: u32) -> bool {
    #[cfg(target_os = "linux")]
    {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|stat| stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')))
    }
    #[cfg(not(target_os = "linux"))]
    {
        one_process(pid, |p| {
            !matches!(p.status(), sysinfo::ProcessStatus::Zombie | sysinfo::ProcessStatus::Dead)
        })
        .unwrap_or(false)
    }
}

/// The executable of process `pid`, where this process may read it.
pub fn process_exe(pid: u32) -> Option<std::path::PathBuf> {
    #[cfg(target_os = "linux")]
    {
        std::fs::read_link(format!("/proc/{pid}/exe")).ok()
    }
    #[cfg(not(target_os = "linux"))]
    {
        one_process(pid, |p| p.exe().map(std::path::Path::to_path_buf)).flatten()
    }
}

/// `f` of process `pid` as sysinfo sees it now; `None` when it is gone.
#[cfg(not(target_os = "linux"))]
fn one_process<T>(pid: u32, f: impl FnOnce(&sysinfo::Process) -> T) -> Option<T> {
    let mut sys = sysinfo::System::new().ok()?;
    let p = sysinfo::Pid::from_u32(pid);
    let kind = sysinfo::ProcessRefreshKind::nothing().with_exe(sysinfo::UpdateKind::Always);
    sys.refresh_processes_specifics(sysinfo::ProcessesToUpdate::Some(&[p]), false, kind);
    sys.process(p).map(f)
}

/// What this host and process can do, for registration and health data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlatformReport {
    /// Operating system ("linux", "macos", "freebsd", "windows").
    pub os: String,
    /// OS or kernel version, when known.
    pub os_version: Option<String>,
    /// CPU architecture.
    pub arch: String,
    /// The backend [`default_source`] uses.
    pub backend: String,
    /// Record fields this backend fills on this OS (others are always
    /// `NotSupported`).
    pub supported_fields: Vec<String>,
    /// Whether this build was ever run on this OS by the project's CI.
    pub verified: bool,
    /// Privileges and what they hide.
    pub privileges: PrivilegeReport,
    /// Whether the kernel's process events can be had (see [`kernel`]).
    pub kernel_events: KernelEventsAvailability,
}

/// Describes this host and process.
pub fn platform_report() -> PlatformReport {
    let common = ["pid", "ppid", "start_time", "started_unix", "name", "state", "rss_bytes", "virtual_bytes"];
    let mut fields: Vec<&'static str> = common.to_vec();
    #[cfg(target_os = "linux")]
    let (backend, extra, verified): (&str, &[&'static str], bool) = (
        "linux-procfs",
        &[
            "session",
            "threads",
            "cpu_time_ms",
            "kernel_thread",
            "exe",
            "exe_file",
            "exe_deleted",
            "argv",
            "argv.truncated",
            "cwd",
            "credentials",
            "user",
        ],
        true,
    );
    #[cfg(all(unix, not(target_os = "linux")))]
    let (backend, extra, verified): (&str, &[&'static str], bool) = (
        "sysinfo",
        &["session", "cpu_time_ms", "exe", "exe_file", "exe_deleted", "argv", "cwd", "credentials", "user"],
        false,
    );
    #[cfg(not(unix))]
    let (backend, extra, verified): (&str, &[&'static str], bool) =
        ("sysinfo", &["cpu_time_ms", "exe", "exe_deleted", "argv", "cwd", "user"], false);
    fields.extend_from_slice(extra);
    PlatformReport {
        os: std::env::consts::OS.to_owned(),
        os_version: sysinfo::System::kernel_version().ok(),
        arch: std::env::consts::ARCH.to_owned(),
        backend: backend.to_owned(),
        supported_fields: fields.into_iter().map(str::to_owned).collect(),
        verified,
        privileges: privilege::detect(),
        kernel_events: kernel_events_availability(),
    }
}

#[cfg(all(test, unix))]
mod tests {
    use std::os::unix::fs::FileTypeExt;

    /// Without `O_NONBLOCK` this `open` would wait for a writer forever.
    #[test]
    fn a_fifo_without_a_writer_opens_at_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).expect("mkfifo");
        let file = super::open_for_reading(&fifo).expect("opens at once");
        assert!(file.metadata().expect("fstat").file_type().is_fifo());
    }
}
