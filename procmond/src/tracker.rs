//! The lifecycle tracker: turns successive process lists into Started,
//! Stopped and Modified events.
//!
//! Identity is [`ProcessKey`] `(pid, start_time)`: a reused pid has a new
//! start time, so it yields a Stopped for the old process and a Started for
//! the new one, never a Modified. The first cycle publishes every running
//! process as a Started marked `snapshot`, so a consumer that starts late
//! still knows what runs.
//!
//! Command lines are sanitized here, once per identity (and again after an
//! exec): the tracker keeps the sanitized details beside the platform's
//! shared `Arc` and reuses them while that `Arc` is unchanged, so a steady
//! cycle sanitizes nothing. Nothing unsanitized leaves this module.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use daemoneye_platform::{FileIdentity, ProcessDetails, ProcessKey, ProcessRecord, Unavailable};

use crate::config::LifecycleConfig;
use crate::event::{Change, EventKind, ProcessEvent};
use crate::sanitize::Sanitizer;

/// What the tracker remembers of one live process.
struct Tracked {
    /// The last record, with sanitized details.
    record: ProcessRecord,
    /// The platform's details the sanitized ones were made from.
    raw: Arc<ProcessDetails>,
    /// Whether its Started was reported (false while younger than
    /// `min_age_ms`).
    reported: bool,
    /// An exe replacement or deletion was reported already.
    exe_change_reported: bool,
}

/// The lifecycle tracker. Owned by the actor thread.
pub struct Tracker {
    live: HashMap<ProcessKey, Tracked>,
    cfg: LifecycleConfig,
    sanitizer: Sanitizer,
    enhanced: bool,
    cycles: u64,
    sanitized: u64,
}

impl Tracker {
    /// A tracker with nothing seen yet. Without `enhanced` metadata, cwd,
    /// session, threads and CPU time are left out (`NotCollected`).
    pub fn new(cfg: LifecycleConfig, sanitizer: Sanitizer, enhanced: bool) -> Tracker {
        Tracker { live: HashMap::new(), cfg, sanitizer, enhanced, cycles: 0, sanitized: 0 }
    }

    /// Replaces the lifecycle settings (hot reload, between cycles).
    pub fn set_config(&mut self, cfg: LifecycleConfig) {
        self.cfg = cfg;
    }

    /// Processes currently tracked.
    pub fn len(&self) -> usize {
        self.live.len()
    }

    /// Whether nothing is tracked.
    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }

    /// Command lines sanitized so far (a steady cycle adds none).
    pub fn sanitized_count(&self) -> u64 {
        self.sanitized
    }

    /// Compares a new process list with the last one. `now_unix_ms` stamps
    /// the events. Stopped events come first, then Started, then Modified,
    /// each ordered by pid.
    pub fn update(&mut self, records: Vec<ProcessRecord>, now_unix_ms: u64) -> Vec<ProcessEvent> {
        let first = self.cycles == 0;
        self.cycles += 1;
        let mut stopped = Vec::new();
        let mut started = Vec::new();
        let mut modified = Vec::new();
        let mut seen: HashSet<ProcessKey> = HashSet::with_capacity(records.len());
        // Each distinct executable path is checked once per cycle.
        let mut on_disk: HashMap<PathBuf, OnDisk> = HashMap::new();
        let event = |kind, snapshot, changes, process| ProcessEvent {
            kind,
            snapshot,
            changes,
            observed_unix_ms: now_unix_ms,
            process,
            sha256: None,
        };

        for raw in records {
            let key = raw.key();
            if !seen.insert(key) {
                continue;
            }
            let old_enough = self.cfg.min_age_ms == 0
                || raw
                    .started_unix
                    .map_or(true, |s| now_unix_ms.saturating_sub(s * 1000) >= self.cfg.min_age_ms);
            match self.live.get_mut(&key) {
                None => {
                    let details = self.clean(&raw.details);
                    let record = self.strip(raw.clone(), details);
                    let report = old_enough && (!first || self.cfg.snapshot_on_start);
                    if report {
                        started.push(event(EventKind::Started, first, Vec::new(), record.clone()));
                    }
                    // Not yet old enough: reported later, if it lives.
                    let reported = report || (first && old_enough);
                    self.live.insert(
                        key,
                        Tracked { record, raw: raw.details, reported, exe_change_reported: false },
                    );
                }
                Some(_) => {
                    let mut t = self.live.remove(&key).unwrap_or_else(|| unreachable!());
                    let same_details = Arc::ptr_eq(&t.raw, &raw.details);
                    let details =
                        if same_details { t.record.details.clone() } else { self.clean(&raw.details) };
                    let record = self.strip(raw.clone(), details);
                    if !t.reported {
                        if old_enough {
                            started.push(event(EventKind::Started, false, Vec::new(), record.clone()));
                            t.reported = true;
                        }
                    } else {
                        let mut changes = self.diff(&t.record, &record);
                        if self.cfg.exe_changes && !changes.contains(&Change::Exec) {
                            if !t.exe_change_reported
                                && let Some(c) = exe_on_disk_change(&record, &mut on_disk)
                            {
                                changes.push(c);
                                t.exe_change_reported = true;
                            }
                        } else if changes.contains(&Change::Exec) {
                            t.exe_change_reported = false;
                        }
                        if !changes.is_empty() {
                            changes.sort();
                            changes.dedup();
                            modified.push(event(EventKind::Modified, false, changes, record.clone()));
                        }
                    }
                    t.record = record;
                    t.raw = raw.details;
                    self.live.insert(key, t);
                }
            }
        }

        let gone: Vec<ProcessKey> = self.live.keys().filter(|k| !seen.contains(k)).copied().collect();
        for key in gone {
            if let Some(t) = self.live.remove(&key)
                && t.reported
            {
                stopped.push(event(EventKind::Stopped, false, Vec::new(), t.record));
            }
        }
        for list in [&mut stopped, &mut started, &mut modified] {
            list.sort_by_key(|e| (e.process.pid, e.process.start_time));
        }
        stopped.extend(started);
        stopped.extend(modified);
        stopped
    }

    /// What changed between two records of the same identity.
    fn diff(&self, old: &ProcessRecord, new: &ProcessRecord) -> Vec<Change> {
        let mut changes = Vec::new();
        let (od, nd) = (&old.details, &new.details);
        let exe_file_changed = match (&od.exe_file, &nd.exe_file) {
            (Ok(a), Ok(b)) => a.dev != b.dev || a.inode != b.inode,
            _ => false,
        };
        if old.name != new.name || od.exe != nd.exe || exe_file_changed {
            changes.push(Change::Exec);
        }
        if self.cfg.credentials
            && let (Ok(a), Ok(b)) = (&od.credentials, &nd.credentials)
            && a != b
        {
            changes.push(Change::Credentials);
        }
        if self.cfg.reparent && old.ppid != new.ppid {
            changes.push(Change::Reparent);
        }
        if self.cfg.exe_changes && od.exe_deleted == Ok(false) && nd.exe_deleted == Ok(true) {
            changes.push(Change::ExeDeleted);
        }
        if self.cfg.command_line
            && !changes.contains(&Change::Exec)
            && let (Ok(a), Ok(b)) = (&od.argv, &nd.argv)
            && a != b
        {
            changes.push(Change::CommandLine);
        }
        changes
    }

    /// Sanitized copy of a process's details (and without cwd unless
    /// enhanced metadata is on).
    fn clean(&mut self, raw: &Arc<ProcessDetails>) -> Arc<ProcessDetails> {
        self.sanitized += 1;
        let mut d = ProcessDetails::clone(raw);
        if let Ok(argv) = &mut d.argv {
            argv.args = self.sanitizer.sanitize(&argv.args).args;
        }
        if !self.enhanced {
            d.cwd = Err(Unavailable::NotCollected);
        }
        Arc::new(d)
    }

    /// The record with sanitized details and without the fields enhanced
    /// metadata adds, when it is off.
    fn strip(&self, mut record: ProcessRecord, details: Arc<ProcessDetails>) -> ProcessRecord {
        record.details = details;
        if !self.enhanced {
            record.session = Err(Unavailable::NotCollected);
            record.threads = Err(Unavailable::NotCollected);
            record.cpu_time_ms = Err(Unavailable::NotCollected);
        }
        record
    }
}

/// What a `stat` of an executable path found.
#[derive(Clone, Copy)]
enum OnDisk {
    Missing,
    Present(FileIdentity),
    /// Unreadable (permissions): neither deleted nor replaced.
    Unknown,
}

/// Whether the file at a running process's executable path is no longer
/// the file it runs: deleted (`ExeDeleted`) or replaced by another file
/// (`ExeReplaced`, e.g. a package upgrade). One `stat` per distinct path per
/// cycle; nothing is read.
fn exe_on_disk_change(record: &ProcessRecord, cache: &mut HashMap<PathBuf, OnDisk>) -> Option<Change> {
    let d = &record.details;
    let (Ok(path), Ok(running)) = (&d.exe, &d.exe_file) else { return None };
    if d.exe_deleted == Ok(true) {
        return None;
    }
    match *cache.entry(path.clone()).or_insert_with(|| stat_identity(path)) {
        OnDisk::Missing => Some(Change::ExeDeleted),
        OnDisk::Present(now) if now.dev != running.dev || now.inode != running.inode => {
            Some(Change::ExeReplaced)
        }
        OnDisk::Present(_) | OnDisk::Unknown => None,
    }
}

fn stat_identity(path: &Path) -> OnDisk {
    match std::fs::metadata(path) {
        Ok(meta) => daemoneye_platform::file_identity(&meta).map_or(OnDisk::Unknown, OnDisk::Present),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => OnDisk::Missing,
        Err(_) => OnDisk::Unknown,
    }
}
