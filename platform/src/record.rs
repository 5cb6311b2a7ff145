//! The process record every backend fills, and the reasons a field can be
//! missing. Missing is never an empty string: each optional field is a
//! [`Field`], either the value or why it is absent.

use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Why a field has no value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Unavailable {
    /// The OS refused (another user's process without the capability).
    NotPermitted,
    /// This OS or backend does not provide the field.
    NotSupported,
    /// The process exited while it was being read.
    Vanished,
    /// The field does not exist for this process (a kernel thread has no
    /// executable; a zombie has no command line).
    NotApplicable,
    /// An unexpected read error (logged where it happened).
    Failed,
    /// Readable, but left out by configuration (procmond without
    /// `--enhanced-metadata`).
    NotCollected,
}

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Unavailable::NotPermitted => "not permitted",
            Unavailable::NotSupported => "not supported on this OS",
            Unavailable::Vanished => "process vanished",
            Unavailable::NotApplicable => "not applicable",
            Unavailable::Failed => "read failed",
            Unavailable::NotCollected => "not collected",
        })
    }
}

impl Unavailable {
    /// Classifies an I/O error met while reading a process's files.
    pub fn from_io(e: &std::io::Error) -> Unavailable {
        match e.kind() {
            std::io::ErrorKind::PermissionDenied => Unavailable::NotPermitted,
            // ESRCH (3): the process is gone.
            std::io::ErrorKind::NotFound => Unavailable::Vanished,
            _ if e.raw_os_error() == Some(3) => Unavailable::Vanished,
            _ => Unavailable::Failed,
        }
    }
}

/// A value, or the reason it is missing.
pub type Field<T> = Result<T, Unavailable>;

/// The identity of a process: a pid alone is reused by the OS, a pid with
/// its start time is not. Two records with the same pid and different start
/// times are different processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ProcessKey {
    /// Process id.
    pub pid: u32,
    /// Start time in the backend's native unit (see
    /// [`ProcessRecord::start_time`]).
    pub start_time: u64,
}

/// Identity of an executable file: enough to know whether it is the same
/// file, unchanged, without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FileIdentity {
    /// Device id.
    pub dev: u64,
    /// Inode number.
    pub inode: u64,
    /// Size in bytes.
    pub size: u64,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
    /// Status change time, seconds since the epoch.
    pub ctime: i64,
}

/// A command line as the process set it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Argv {
    /// The arguments, program first; non-UTF-8 bytes replaced.
    pub args: Vec<String>,
    /// True when the command line was longer than the reader's cap and was
    /// cut.
    pub truncated: bool,
}

/// The scheduler state of a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ProcessState {
    /// Running or runnable.
    Running,
    /// Interruptible sleep.
    Sleeping,
    /// Uninterruptible (disk) sleep.
    DiskSleep,
    /// Stopped by a signal.
    Stopped,
    /// Stopped by a tracer.
    Traced,
    /// Exited, not yet reaped.
    Zombie,
    /// Being torn down.
    Dead,
    /// An idle kernel thread.
    Idle,
    /// A state this crate does not name (the OS letter).
    Other(char),
}

impl ProcessState {
    /// Maps a Linux `/proc/<pid>/stat` state letter.
    pub fn from_letter(c: char) -> ProcessState {
        match c {
            'R' => ProcessState::Running,
            'S' => ProcessState::Sleeping,
            'D' => ProcessState::DiskSleep,
            'T' => ProcessState::Stopped,
            't' => ProcessState::Traced,
            'Z' => ProcessState::Zombie,
            'X' | 'x' => ProcessState::Dead,
            'I' => ProcessState::Idle,
            other => ProcessState::Other(other),
        }
    }
}

/// The credentials of a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Credentials {
    /// Real user id.
    pub uid: u32,
    /// Effective user id.
    pub euid: u32,
    /// Real group id.
    pub gid: u32,
    /// Effective group id.
    pub egid: u32,
}

/// The parts of a process that change only on exec or a credential change.
/// Backends read them once per identity and share them between cycles, so
/// a steady cycle neither re-reads nor re-allocates them. Hashable, so a
/// backend can keep one copy of identical details (see
/// [`DetailsInterner`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ProcessDetails {
    /// Path of the executable (without the " (deleted)" marker).
    pub exe: Field<PathBuf>,
    /// Identity of the executable file.
    pub exe_file: Field<FileIdentity>,
    /// The executable was deleted or replaced on disk while running.
    pub exe_deleted: Field<bool>,
    /// The command line.
    pub argv: Field<Argv>,
    /// Working directory when the details were read (it is not followed
    /// through later `chdir` calls).
    pub cwd: Field<PathBuf>,
    /// Real and effective user and group ids, as of exec or the last
    /// change of the effective ids (Linux backend: a change of only the
    /// real ids is seen at the next exec or effective-id change).
    pub credentials: Field<Credentials>,
    /// Name of the real user.
    pub user: Field<String>,
}

impl ProcessDetails {
    /// Details of a process that was gone before they could be read: every
    /// field `Vanished`. Nothing is guessed.
    pub fn vanished() -> ProcessDetails {
        let gone = Unavailable::Vanished;
        ProcessDetails {
            exe: Err(gone),
            exe_file: Err(gone),
            exe_deleted: Err(gone),
            argv: Err(gone),
            cwd: Err(gone),
            credentials: Err(gone),
            user: Err(gone),
        }
    }
}

/// One shared copy per distinct [`ProcessDetails`]: processes that run the
/// same program with the same command line, directory and user (a pool of
/// workers, a shell's children) hold one allocation between them instead
/// of one each. Sharing is invisible but for [`Arc::ptr_eq`]: equal
/// details are equal whichever copy a record holds.
#[derive(Debug, Default)]
pub struct DetailsInterner {
    set: std::collections::HashSet<Arc<ProcessDetails>>,
}

impl DetailsInterner {
    /// The shared copy of `details` (this one, when it is the first).
    pub fn intern(&mut self, details: ProcessDetails) -> Arc<ProcessDetails> {
        if let Some(shared) = self.set.get(&details) {
            return shared.clone();
        }
        let shared = Arc::new(details);
        self.set.insert(shared.clone());
        shared
    }

    /// The shared copy of details already in an `Arc` (that one, when it
    /// is the first).
    pub fn intern_arc(&mut self, details: Arc<ProcessDetails>) -> Arc<ProcessDetails> {
        if let Some(shared) = self.set.get(&details) {
            return shared.clone();
        }
        self.set.insert(details.clone());
        details
    }

    /// Forgets the details no one else holds any more.
    pub fn prune(&mut self) {
        self.set.retain(|d| Arc::strong_count(d) > 1);
    }

    /// Distinct details held.
    pub fn len(&self) -> usize {
        self.set.len()
    }

    /// Whether none are held.
    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ExitStatus {
    /// It exited with this code (0–255).
    Code(i32),
    /// A signal ended it.
    Signal {
        /// The signal number.
        signal: u32,
        /// A core dump was written.
        core_dumped: bool,
    },
}

impl ExitStatus {
    /// Decodes a `wait(2)` status word (what the kernel keeps as the task's
    /// exit code): a signal in the low 7 bits, the core flag in bit 7, the
    /// exit code in bits 8–15.
    pub fn from_wait_status(status: u32) -> ExitStatus {
        match status & 0x7f {
            0 => ExitStatus::Code(((status >> 8) & 0xff) as i32),
            signal => ExitStatus::Signal { signal, core_dumped: status & 0x80 != 0 },
        }
    }
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitStatus::Code(code) => write!(f, "exit {code}"),
            ExitStatus::Signal { signal, core_dumped: false } => write!(f, "signal {signal}"),
            ExitStatus::Signal { signal, core_dumped: true } => write!(f, "signal {signal} (core dumped)"),
        }
    }
}

/// One process, as one enumeration cycle saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessRecord {
    /// Process id.
    pub pid: u32,
    /// Parent process id (0 for the roots).
    pub ppid: u32,
    /// Start time, the identity half that survives pid reuse. Linux `/proc`
    /// backend: clock ticks since boot. sysinfo backend: seconds since the
    /// epoch; on FreeBSD microseconds (the kernel's `ki_start`). Compare
    /// start times only within one backend.
    pub start_time: u64,
    /// Start time in seconds since the epoch, for people.
    pub started_unix: Field<u64>,
    /// Short process name (Linux: `comm`, cut to 15 bytes for programs,
    /// possibly mid-character; kernel threads' names can be longer and
    /// follow their current work queue).
    pub name: String,
    /// Scheduler state.
    pub state: ProcessState,
    /// Session id.
    pub session: Field<u32>,
    /// Number of threads.
    pub threads: Field<u32>,
    /// Resident set size in bytes.
    pub rss_bytes: u64,
    /// Virtual size in bytes.
    pub virtual_bytes: u64,
    /// User plus system CPU time in milliseconds.
    pub cpu_time_ms: Field<u64>,
    /// A kernel thread (no executable, no command line).
    pub kernel_thread: bool,
    /// Exec-time details, shared between cycles.
    pub details: Arc<ProcessDetails>,
}

impl ProcessRecord {
    /// The identity of this process.
    pub fn key(&self) -> ProcessKey {
        ProcessKey { pid: self.pid, start_time: self.start_time }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn details(args: &[&str], user: &str) -> ProcessDetails {
        ProcessDetails {
            exe: Ok(PathBuf::from("/usr/bin/sleep")),
            exe_file: Ok(FileIdentity { dev: 1, inode: 2, size: 3, mtime: 4, ctime: 5 }),
            exe_deleted: Ok(false),
            argv: Ok(Argv { args: args.iter().map(|a| a.to_string()).collect(), truncated: false }),
            cwd: Err(Unavailable::NotCollected),
            credentials: Ok(Credentials { uid: 0, euid: 0, gid: 0, egid: 0 }),
            user: Ok(user.into()),
        }
    }

    #[test]
    fn equal_details_share_one_allocation_and_unheld_ones_are_let_go() {
        let mut interner = DetailsInterner::default();
        let a = interner.intern(details(&["sleep", "3600"], "root"));
        let b = interner.intern(details(&["sleep", "3600"], "root"));
        assert!(Arc::ptr_eq(&a, &b), "same values: one copy");
        let other_user = interner.intern(details(&["sleep", "3600"], "daemon"));
        let other_args = interner.intern(details(&["sleep", "36", "00"], "root"));
        let empty = interner.intern(details(&[], "root"));
        assert!(!Arc::ptr_eq(&a, &other_user) && !Arc::ptr_eq(&a, &other_args) && !Arc::ptr_eq(&a, &empty));
        assert_eq!(interner.len(), 4);
        // An Arc made elsewhere with the same values gives way to the
        // shared one; a new value is taken as is.
        let c = interner.intern_arc(Arc::new(details(&["sleep", "3600"], "root")));
        assert!(Arc::ptr_eq(&a, &c));
        let fresh = Arc::new(details(&["ls"], "root"));
        assert!(Arc::ptr_eq(&interner.intern_arc(fresh.clone()), &fresh));
        // Only what no one else holds is let go.
        drop((other_user, other_args));
        interner.prune();
        assert_eq!(interner.len(), 3, "a (held thrice), empty, fresh");
        drop((a, b, c, empty, fresh));
        interner.prune();
        assert!(interner.is_empty());
    }
}
