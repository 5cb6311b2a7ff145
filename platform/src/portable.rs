//! The portable backend over sysinfo: the path on macOS, Windows and
//! FreeBSD, and a fallback on Linux.
//!
//! One `System` lives across cycles and is refreshed with the cheapest
//! `ProcessRefreshKind` that fills the record: memory, CPU and the
//! executable path every cycle (the path is how an exec in place shows:
//! sysinfo never renames a process); command line, working directory and
//! user only when not set yet (`OnlyIfNotSet`), and again after an exec;
//! tasks not listed (`without_tasks`). Userland threads that sysinfo still
//! reports are filtered out; kernel threads are processes.
//!
//! The identity's start time is sysinfo's (whole seconds since the epoch),
//! except on FreeBSD: microseconds since the epoch from the kernel's
//! record ([`crate::kinfo`]), which also gives the real and effective gids
//! that sysinfo gets wrong. A process whose record is gone, or names
//! another start second, exited (or its pid was reused) after sysinfo
//! listed it and is left out of the cycle. Where the record cannot be
//! read at all, the seconds are used, times 1,000,000 (the same unit).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use sysinfo::{ProcessRefreshKind, ProcessStatus, ProcessesToUpdate, System, ThreadKind, UpdateKind, Users};

use crate::kinfo::Kinfo;
use crate::record::{
    Argv, Credentials, Field, ProcessDetails, ProcessKey, ProcessRecord, ProcessState, Unavailable,
};
use crate::{CycleStats, Error, ProcessSource};

/// What the backend remembers of an identity between cycles.
struct Known {
    /// The executable path when the details were read.
    exe: Option<std::path::PathBuf>,
    name: String,
    details: Arc<ProcessDetails>,
}

/// The sysinfo process source.
pub struct SysinfoSource {
    sys: System,
    users: Users,
    known: HashMap<ProcessKey, Known>,
    stats: CycleStats,
    privileged: bool,
    /// Whether a failed read of the kernel's record was logged (once).
    kinfo_warned: bool,
}

/// A listed process's identity start time, and the kernel's record where
/// one was read (FreeBSD).
#[derive(Debug, Clone, Copy)]
struct Ident {
    start_time: u64,
    kinfo: Option<Kinfo>,
}

impl SysinfoSource {
    /// A new source; the first refresh reads everything.
    pub fn new() -> Result<SysinfoSource, Error> {
        let unsupported = |e: sysinfo::Error| Error::NotSupported { what: format!("sysinfo: {e}") };
        Ok(SysinfoSource {
            sys: System::new().map_err(unsupported)?,
            users: Users::new_with_refreshed_list().map_err(unsupported)?,
            known: HashMap::new(),
            stats: CycleStats::default(),
            privileged: crate::privilege::is_privileged(),
            kinfo_warned: false,
        })
    }
}

/// The identity of a listed process; `None` when it is gone since.
/// `warned`: whether a failed read was logged already.
#[cfg(target_os = "freebsd")]
fn ident(warned: &mut bool, pid: u32, p: &sysinfo::Process) -> Option<Ident> {
    match crate::kinfo::read(pid) {
        Ok(k) if k.start_secs == p.start_time() => Some(Ident { start_time: k.start_us, kinfo: Some(k) }),
        // Exited, or the pid is another process's by now.
        Ok(_) | Err(crate::kinfo::ReadError::Gone) => None,
        Err(crate::kinfo::ReadError::Other(why)) => {
            if !*warned {
                *warned = true;
                log::warn!(
                    "{why}: start times in whole seconds (a pid reused within one second keeps its identity) and sysinfo's gids"
                );
            }
            Some(Ident { start_time: p.start_time().saturating_mul(1_000_000), kinfo: None })
        }
    }
}

/// The identity of a listed process: sysinfo's start time.
#[cfg(not(target_os = "freebsd"))]
fn ident(_warned: &mut bool, _pid: u32, p: &sysinfo::Process) -> Option<Ident> {
    Some(Ident { start_time: p.start_time(), kinfo: None })
}

fn user_name(users: &mut Users, uid: &sysinfo::Uid) -> Field<String> {
    if users.get_user_by_id(uid).is_none() {
        users.refresh();
    }
    users.get_user_by_id(uid).map(|u| u.name().to_owned()).ok_or(Unavailable::NotApplicable)
}

/// Reads the exec-time details of one process (`kinfo`: the kernel's
/// record, where read).
fn details(
    users: &mut Users,
    privileged: bool,
    p: &sysinfo::Process,
    kinfo: Option<&Kinfo>,
) -> ProcessDetails {
    // An empty answer from sysinfo means it could not read the field;
    // unprivileged that is a refusal, privileged it is genuinely absent.
    let absent = if privileged { Unavailable::NotApplicable } else { Unavailable::NotPermitted };
    let exe = p.exe().map(Path::to_path_buf).ok_or(absent);
    let exe_file = match &exe {
        Ok(path) => std::fs::metadata(path)
            .map_err(|e| Unavailable::from_io(&e))
            .and_then(|m| crate::file_identity(&m)),
        Err(e) => Err(*e),
    };
    let exe_deleted = match &exe {
        Ok(path) => Ok(!path.exists()),
        Err(e) => Err(*e),
    };
    let argv = if p.cmd().is_empty() {
        Err(absent)
    } else {
        Ok(Argv {
            args: p.cmd().iter().map(|a| a.to_string_lossy().into_owned()).collect(),
            truncated: false,
        })
    };
    let cwd = p.cwd().map(Path::to_path_buf).ok_or(absent);
    let credentials = credentials(p, kinfo);
    let user = match p.user_id() {
        Some(uid) => user_name(users, uid),
        None => Err(absent),
    };
    ProcessDetails { exe, exe_file, exe_deleted, argv, cwd, credentials, user }
}

/// sysinfo's ids, with the kernel record's gids where there is one
/// (FreeBSD: sysinfo's effective gid is the saved gid).
#[cfg(unix)]
fn credentials(p: &sysinfo::Process, kinfo: Option<&Kinfo>) -> Field<Credentials> {
    let (Some(uid), Some(gid)) = (p.user_id(), p.group_id()) else { return Err(Unavailable::NotPermitted) };
    let euid = p.effective_user_id().map_or(**uid, |u| **u);
    let egid = p.effective_group_id().map_or(*gid, |g| *g);
    let (gid, egid) = match kinfo {
        Some(k) => (k.rgid, k.egid.unwrap_or(egid)),
        None => (*gid, egid),
    };
    Ok(Credentials { uid: **uid, euid, gid, egid })
}

#[cfg(not(unix))]
fn credentials(_: &sysinfo::Process, _: Option<&Kinfo>) -> Field<Credentials> {
    // Windows identities are SIDs, not numeric ids.
    Err(Unavailable::NotSupported)
}

fn state(s: ProcessStatus) -> ProcessState {
    match s {
        ProcessStatus::Run => ProcessState::Running,
        ProcessStatus::Sleep => ProcessState::Sleeping,
        ProcessStatus::Idle => ProcessState::Idle,
        ProcessStatus::Stop => ProcessState::Stopped,
        ProcessStatus::Tracing => ProcessState::Traced,
        ProcessStatus::Zombie => ProcessState::Zombie,
        ProcessStatus::Dead => ProcessState::Dead,
        ProcessStatus::UninterruptibleDiskSleep => ProcessState::DiskSleep,
        _ => ProcessState::Other('?'),
    }
}

/// A start time in Unix seconds as sysinfo gives it: 0 is what it says
/// when the OS would not tell (macOS, another user's process without
/// root), not 1970.
fn started_unix(secs: u64) -> Result<u64, Unavailable> {
    if secs > 0 { Ok(secs) } else { Err(Unavailable::NotPermitted) }
}

impl ProcessSource for SysinfoSource {
    fn backend(&self) -> &'static str {
        "sysinfo"
    }

    fn refresh(&mut self) -> Result<Vec<ProcessRecord>, Error> {
        // The executable path is refreshed every cycle: sysinfo sets a
        // process's name once, so a changed path is the only sign of an
        // exec in place.
        let kind = ProcessRefreshKind::nothing()
            .with_memory()
            .with_cpu()
            .with_exe(UpdateKind::Always)
            .with_cmd(UpdateKind::OnlyIfNotSet)
            .with_cwd(UpdateKind::OnlyIfNotSet)
            .with_user(UpdateKind::OnlyIfNotSet)
            .without_tasks();
        self.sys.refresh_processes_specifics(ProcessesToUpdate::All, true, kind);
        let warned = &mut self.kinfo_warned;
        let idents: HashMap<sysinfo::Pid, Ident> = self
            .sys
            .processes()
            .iter()
            .filter_map(|(pid, p)| Some((*pid, ident(warned, pid.as_u32(), p)?)))
            .collect();
        let execd: Vec<sysinfo::Pid> = self
            .sys
            .processes()
            .iter()
            .filter(|(pid, p)| {
                idents.get(*pid).is_some_and(|i| {
                    let key = ProcessKey { pid: pid.as_u32(), start_time: i.start_time };
                    self.known.get(&key).is_some_and(|k| k.exe.as_deref() != p.exe())
                })
            })
            .map(|(pid, _)| *pid)
            .collect();
        if !execd.is_empty() {
            let always = ProcessRefreshKind::nothing()
                .with_cmd(UpdateKind::Always)
                .with_cwd(UpdateKind::Always)
                .with_user(UpdateKind::Always)
                .without_tasks();
            self.sys.refresh_processes_specifics(ProcessesToUpdate::Some(&execd), false, always);
        }
        self.stats = CycleStats::default();
        let mut out = Vec::with_capacity(self.sys.processes().len());
        let mut seen = HashMap::with_capacity(self.known.len());
        for (pid, p) in self.sys.processes() {
            self.stats.listed += 1;
            let kernel_thread = match p.thread_kind() {
                Some(ThreadKind::Userland) => continue,
                Some(ThreadKind::Kernel) => true,
                None => false,
            };
            // Gone since sysinfo listed it.
            let Some(ident) = idents.get(pid) else { continue };
            let pid = pid.as_u32();
            let key = ProcessKey { pid, start_time: ident.start_time };
            let known = match self.known.remove(&key) {
                Some(k) if k.exe.as_deref() == p.exe() => k,
                previous => {
                    self.stats.detail_reads += 1;
                    // After an exec, sysinfo's name is the old program's:
                    // name the process after its new executable.
                    let name = match (&previous, p.exe().and_then(Path::file_name)) {
                        (Some(_), Some(file)) => file.to_string_lossy().into_owned(),
                        _ => p.name().to_string_lossy().into_owned(),
                    };
                    Known {
                        exe: p.exe().map(Path::to_path_buf),
                        name,
                        details: Arc::new(details(&mut self.users, self.privileged, p, ident.kinfo.as_ref())),
                    }
                }
            };
            out.push(ProcessRecord {
                pid,
                ppid: p.parent().map_or(0, |pp| pp.as_u32()),
                start_time: ident.start_time,
                started_unix: started_unix(p.start_time()),
                name: known.name.clone(),
                state: state(p.status()),
                session: p.session_id().map(|s| s.as_u32()).ok_or(Unavailable::NotSupported),
                threads: Err(Unavailable::NotSupported),
                rss_bytes: p.memory(),
                virtual_bytes: p.virtual_memory(),
                cpu_time_ms: Ok(p.accumulated_cpu_time()),
                kernel_thread,
                details: known.details.clone(),
            });
            seen.insert(key, known);
        }
        self.known = seen;
        Ok(out)
    }

    fn last_cycle(&self) -> CycleStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_start_time_of_zero_is_not_permitted_not_1970() {
        assert_eq!(started_unix(0), Err(Unavailable::NotPermitted));
        assert_eq!(started_unix(1_700_000_000), Ok(1_700_000_000));
    }
}
