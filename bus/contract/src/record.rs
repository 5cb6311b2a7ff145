//! The persisted form of a process record: the layout in which a process
//! travels in events and tasks and is kept in WALs and the store.
//!
//! `platform::ProcessRecord` stays the in-memory type (the backends fill
//! it, the tracker compares it); its serde derives no longer define any
//! format. The contract owns the layout here, field for field, with its
//! own enums ([`Unavailable`], [`ProcessState`], [`ExitStatus`]), and
//! converts from and to the platform's at the boundary: a change to
//! platform's types cannot change a byte on the wire or on disk, and a
//! change to this layout is a contract version bump (see [`crate::codec`]).
//!
//! The layout (postcard, in this order; `Field<T>` is `Result<T,
//! Unavailable>`) is version 1's, kept verbatim:
//! `pid: u32, ppid: u32, start_time: u64, started_unix: Field<u64>, name:
//! String, state: ProcessState, session: Field<u32>, threads: Field<u32>,
//! rss_bytes: u64, virtual_bytes: u64, cpu_time_ms: Field<u64>,
//! kernel_thread: bool, details: { exe: Field<path>, exe_file:
//! Field<{dev, inode, size: u64, mtime, ctime: i64}>, exe_deleted:
//! Field<bool>, argv: Field<{args: [String], truncated: bool}>, cwd:
//! Field<path>, credentials: Field<{uid, euid, gid, egid: u32}>, user:
//! Field<String> }`.
//!
//! Fields are used through `#[serde(with = …)]` on the contract's types, so
//! encoding borrows the in-memory record instead of copying it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use daemoneye_platform as p;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a field has no value (persisted form of `platform::Unavailable`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Unavailable {
    /// The OS refused.
    NotPermitted,
    /// Not provided on this OS or backend.
    NotSupported,
    /// The process exited while it was read.
    Vanished,
    /// Does not exist for this process.
    NotApplicable,
    /// An unexpected read error.
    Failed,
    /// Left out by configuration.
    NotCollected,
}

impl From<p::Unavailable> for Unavailable {
    fn from(u: p::Unavailable) -> Self {
        match u {
            p::Unavailable::NotPermitted => Unavailable::NotPermitted,
            p::Unavailable::NotSupported => Unavailable::NotSupported,
            p::Unavailable::Vanished => Unavailable::Vanished,
            p::Unavailable::NotApplicable => Unavailable::NotApplicable,
            p::Unavailable::NotCollected => Unavailable::NotCollected,
            // A reason the contract does not know yet is still a reason.
            _ => Unavailable::Failed,
        }
    }
}

impl From<Unavailable> for p::Unavailable {
    fn from(u: Unavailable) -> Self {
        match u {
            Unavailable::NotPermitted => p::Unavailable::NotPermitted,
            Unavailable::NotSupported => p::Unavailable::NotSupported,
            Unavailable::Vanished => p::Unavailable::Vanished,
            Unavailable::NotApplicable => p::Unavailable::NotApplicable,
            Unavailable::Failed => p::Unavailable::Failed,
            Unavailable::NotCollected => p::Unavailable::NotCollected,
        }
    }
}

/// A value or why it is missing.
pub type Field<T> = Result<T, Unavailable>;

fn out<'a, T, U>(f: &'a p::Field<T>, map: impl FnOnce(&'a T) -> U) -> Field<U> {
    f.as_ref().map(map).map_err(|u| (*u).into())
}

fn back<T, U>(f: Field<T>, map: impl FnOnce(T) -> U) -> p::Field<U> {
    f.map(map).map_err(Into::into)
}

/// The scheduler state (persisted form of `platform::ProcessState`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProcessState {
    /// Running or runnable.
    Running,
    /// Interruptible sleep.
    Sleeping,
    /// Uninterruptible sleep.
    DiskSleep,
    /// Stopped by a signal.
    Stopped,
    /// Stopped by a tracer.
    Traced,
    /// Exited, not reaped.
    Zombie,
    /// Being torn down.
    Dead,
    /// An idle kernel thread.
    Idle,
    /// Another state (the OS letter).
    Other(char),
}

impl From<p::ProcessState> for ProcessState {
    fn from(s: p::ProcessState) -> Self {
        match s {
            p::ProcessState::Running => ProcessState::Running,
            p::ProcessState::Sleeping => ProcessState::Sleeping,
            p::ProcessState::DiskSleep => ProcessState::DiskSleep,
            p::ProcessState::Stopped => ProcessState::Stopped,
            p::ProcessState::Traced => ProcessState::Traced,
            p::ProcessState::Zombie => ProcessState::Zombie,
            p::ProcessState::Dead => ProcessState::Dead,
            p::ProcessState::Idle => ProcessState::Idle,
            p::ProcessState::Other(c) => ProcessState::Other(c),
            _ => ProcessState::Other('?'),
        }
    }
}

impl From<ProcessState> for p::ProcessState {
    fn from(s: ProcessState) -> Self {
        match s {
            ProcessState::Running => p::ProcessState::Running,
            ProcessState::Sleeping => p::ProcessState::Sleeping,
            ProcessState::DiskSleep => p::ProcessState::DiskSleep,
            ProcessState::Stopped => p::ProcessState::Stopped,
            ProcessState::Traced => p::ProcessState::Traced,
            ProcessState::Zombie => p::ProcessState::Zombie,
            ProcessState::Dead => p::ProcessState::Dead,
            ProcessState::Idle => p::ProcessState::Idle,
            ProcessState::Other(c) => p::ProcessState::Other(c),
        }
    }
}

/// How a process ended (persisted form of `platform::ExitStatus`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitStatus {
    /// Its exit code.
    Code(i32),
    /// The signal that ended it.
    Signal {
        /// The signal number.
        signal: u32,
        /// A core was dumped.
        core_dumped: bool,
    },
}

impl From<p::ExitStatus> for ExitStatus {
    fn from(e: p::ExitStatus) -> Self {
        match e {
            p::ExitStatus::Code(c) => ExitStatus::Code(c),
            p::ExitStatus::Signal { signal, core_dumped } => ExitStatus::Signal { signal, core_dumped },
        }
    }
}

impl From<ExitStatus> for p::ExitStatus {
    fn from(e: ExitStatus) -> Self {
        match e {
            ExitStatus::Code(c) => p::ExitStatus::Code(c),
            ExitStatus::Signal { signal, core_dumped } => p::ExitStatus::Signal { signal, core_dumped },
        }
    }
}

#[derive(Serialize, Deserialize)]
struct FileIdentity {
    dev: u64,
    inode: u64,
    size: u64,
    mtime: i64,
    ctime: i64,
}

#[derive(Serialize, Deserialize)]
struct Credentials {
    uid: u32,
    euid: u32,
    gid: u32,
    egid: u32,
}

#[derive(Serialize)]
struct ArgvOut<'a> {
    args: &'a [String],
    truncated: bool,
}

#[derive(Deserialize)]
struct ArgvIn {
    args: Vec<String>,
    truncated: bool,
}

#[derive(Serialize)]
struct DetailsOut<'a> {
    exe: Field<&'a Path>,
    exe_file: Field<FileIdentity>,
    exe_deleted: Field<bool>,
    argv: Field<ArgvOut<'a>>,
    cwd: Field<&'a Path>,
    credentials: Field<Credentials>,
    user: Field<&'a str>,
}

#[derive(Deserialize)]
struct DetailsIn {
    exe: Field<PathBuf>,
    exe_file: Field<FileIdentity>,
    exe_deleted: Field<bool>,
    argv: Field<ArgvIn>,
    cwd: Field<PathBuf>,
    credentials: Field<Credentials>,
    user: Field<String>,
}

#[derive(Serialize)]
struct RecordOut<'a> {
    pid: u32,
    ppid: u32,
    start_time: u64,
    started_unix: Field<u64>,
    name: &'a str,
    state: ProcessState,
    session: Field<u32>,
    threads: Field<u32>,
    rss_bytes: u64,
    virtual_bytes: u64,
    cpu_time_ms: Field<u64>,
    kernel_thread: bool,
    details: DetailsOut<'a>,
}

#[derive(Deserialize)]
struct RecordIn {
    pid: u32,
    ppid: u32,
    start_time: u64,
    started_unix: Field<u64>,
    name: String,
    state: ProcessState,
    session: Field<u32>,
    threads: Field<u32>,
    rss_bytes: u64,
    virtual_bytes: u64,
    cpu_time_ms: Field<u64>,
    kernel_thread: bool,
    details: DetailsIn,
}

impl<'a> From<&'a p::ProcessRecord> for RecordOut<'a> {
    fn from(r: &'a p::ProcessRecord) -> Self {
        let d = &*r.details;
        RecordOut {
            pid: r.pid,
            ppid: r.ppid,
            start_time: r.start_time,
            started_unix: out(&r.started_unix, |v| *v),
            name: &r.name,
            state: r.state.into(),
            session: out(&r.session, |v| *v),
            threads: out(&r.threads, |v| *v),
            rss_bytes: r.rss_bytes,
            virtual_bytes: r.virtual_bytes,
            cpu_time_ms: out(&r.cpu_time_ms, |v| *v),
            kernel_thread: r.kernel_thread,
            details: DetailsOut {
                exe: out(&d.exe, |p| p.as_path()),
                exe_file: out(&d.exe_file, |f| FileIdentity {
                    dev: f.dev,
                    inode: f.inode,
                    size: f.size,
                    mtime: f.mtime,
                    ctime: f.ctime,
                }),
                exe_deleted: out(&d.exe_deleted, |v| *v),
                argv: out(&d.argv, |a| ArgvOut { args: &a.args, truncated: a.truncated }),
                cwd: out(&d.cwd, |p| p.as_path()),
                credentials: out(&d.credentials, |c| Credentials {
                    uid: c.uid,
                    euid: c.euid,
                    gid: c.gid,
                    egid: c.egid,
                }),
                user: out(&d.user, |u| u.as_str()),
            },
        }
    }
}

impl From<RecordIn> for p::ProcessRecord {
    fn from(r: RecordIn) -> Self {
        let d = r.details;
        p::ProcessRecord {
            pid: r.pid,
            ppid: r.ppid,
            start_time: r.start_time,
            started_unix: back(r.started_unix, |v| v),
            name: r.name,
            state: r.state.into(),
            session: back(r.session, |v| v),
            threads: back(r.threads, |v| v),
            rss_bytes: r.rss_bytes,
            virtual_bytes: r.virtual_bytes,
            cpu_time_ms: back(r.cpu_time_ms, |v| v),
            kernel_thread: r.kernel_thread,
            details: Arc::new(p::ProcessDetails {
                exe: back(d.exe, |v| v),
                exe_file: back(d.exe_file, |f| p::FileIdentity {
                    dev: f.dev,
                    inode: f.inode,
                    size: f.size,
                    mtime: f.mtime,
                    ctime: f.ctime,
                }),
                exe_deleted: back(d.exe_deleted, |v| v),
                argv: back(d.argv, |a| p::Argv { args: a.args, truncated: a.truncated }),
                cwd: back(d.cwd, |v| v),
                credentials: back(d.credentials, |c| p::Credentials {
                    uid: c.uid,
                    euid: c.euid,
                    gid: c.gid,
                    egid: c.egid,
                }),
                user: back(d.user, |v| v),
            }),
        }
    }
}

/// `#[serde(with)]` for a `platform::ProcessRecord` field.
pub mod process_record {
    use super::*;

    /// Writes the persisted form, borrowing the record.
    pub fn serialize<S: Serializer>(r: &p::ProcessRecord, s: S) -> Result<S::Ok, S::Error> {
        RecordOut::from(r).serialize(s)
    }

    /// Reads the persisted form into the in-memory record.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<p::ProcessRecord, D::Error> {
        RecordIn::deserialize(d).map(Into::into)
    }
}

/// `#[serde(with)]` for a `platform::Unavailable` field.
pub mod unavailable {
    use super::*;

    /// Writes the persisted form.
    pub fn serialize<S: Serializer>(u: &p::Unavailable, s: S) -> Result<S::Ok, S::Error> {
        Unavailable::from(*u).serialize(s)
    }

    /// Reads the persisted form.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<p::Unavailable, D::Error> {
        Unavailable::deserialize(d).map(Into::into)
    }
}

/// `#[serde(with)]` for an `Option<platform::ExitStatus>` field.
pub mod exit_status {
    use super::*;

    /// Writes the persisted form.
    pub fn serialize<S: Serializer>(e: &Option<p::ExitStatus>, s: S) -> Result<S::Ok, S::Error> {
        e.map(ExitStatus::from).serialize(s)
    }

    /// Reads the persisted form.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<p::ExitStatus>, D::Error> {
        Option::<ExitStatus>::deserialize(d).map(|e| e.map(Into::into))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    struct Wrap(#[serde(with = "process_record")] p::ProcessRecord);

    #[test]
    fn the_persisted_form_round_trips_and_matches_the_platform_layout_of_version_1() {
        let mut r = crate::testing::record(9, 90, "sshd");
        let mut d = (*r.details).clone();
        d.exe_file = Err(p::Unavailable::NotPermitted);
        d.cwd = Err(p::Unavailable::NotCollected);
        r.details = Arc::new(d);
        r.state = p::ProcessState::Other('W');
        let bytes = postcard::to_stdvec(&Wrap(r.clone())).unwrap();
        assert_eq!(postcard::from_bytes::<Wrap>(&bytes).unwrap().0, r);
        // Version 1 wrote platform's own derive: the same bytes.
        assert_eq!(bytes, postcard::to_stdvec(&r).unwrap());
    }
}
