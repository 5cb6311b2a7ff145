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

use daemoneye_platform::{
    FileIdentity, ProcessDetails, ProcessKey, ProcessRecord, ProcessState, Unavailable,
};

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

    /// The processes of the last cycle, sanitized, in no order.
    pub fn records(&self) -> impl Iterator<Item = &ProcessRecord> {
        self.live.values().map(|t| &t.record)
    }

    /// The last cycle's record of `pid`, as an event would carry it
    /// (sanitized; cwd only with enhanced metadata). Should the tracker
    /// hold two identities with that pid (a cut list keeps a missing one),
    /// the newest.
    pub fn find(&self, pid: u32) -> Option<ProcessRecord> {
        let newest =
            self.live.values().filter(|t| t.record.pid == pid).max_by_key(|t| t.record.start_time)?;
        Some(self.for_event(newest.record.clone()))
    }

    /// Command lines sanitized so far (a steady cycle adds none).
    pub fn sanitized_count(&self) -> u64 {
        self.sanitized
    }

    /// Compares a new process list with the last one. `now_unix_ms` stamps
    /// the events. Stopped events come first, then Started, then Modified,
    /// each ordered by pid.
    pub fn update(&mut self, records: Vec<ProcessRecord>, now_unix_ms: u64) -> Vec<ProcessEvent> {
        self.update_with(records, now_unix_ms, true)
    }

    /// Like [`Tracker::update`]; with `complete` false (the list was cut
    /// at `max_processes`) a process missing from it is not taken for
    /// stopped: its Stopped waits for a complete list.
    pub fn update_with(
        &mut self,
        records: Vec<ProcessRecord>,
        now_unix_ms: u64,
        complete: bool,
    ) -> Vec<ProcessEvent> {
        let first = self.cycles == 0;
        self.cycles += 1;
        let mut stopped = Vec::new();
        let mut started = Vec::new();
        let mut modified = Vec::new();
        let mut seen: HashSet<ProcessKey> = HashSet::with_capacity(records.len());
        // Each distinct executable path is checked once per cycle.
        let mut on_disk: HashMap<PathBuf, OnDisk> = HashMap::new();
        let event = |tracker: &Tracker, kind, snapshot, changes, process| ProcessEvent {
            kind,
            snapshot,
            changes,
            observed_unix_ms: now_unix_ms,
            process: tracker.for_event(process),
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
                        started.push(event(self, EventKind::Started, first, Vec::new(), record.clone()));
                    }
                    // Not yet old enough: reported later, if it lives.
                    let reported = report || (first && old_enough);
                    self.live.insert(
                        key,
                        Tracked { record, raw: raw.details, reported, exe_change_reported: false },
                    );
                }
                Some(t) if raw.state == ProcessState::Zombie => {
                    // Exited, not yet reaped: its details are gone, not
                    // changed. Keep the last live record for the stop.
                    t.record.state = raw.state;
                }
                Some(_) => {
                    let mut t = self.live.remove(&key).unwrap_or_else(|| unreachable!());
                    let same_details = Arc::ptr_eq(&t.raw, &raw.details);
                    let details =
                        if same_details { t.record.details.clone() } else { self.clean(&raw.details) };
                    let record = self.strip(raw.clone(), details);
                    if !t.reported {
                        if old_enough {
                            started.push(event(self, EventKind::Started, false, Vec::new(), record.clone()));
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
                            modified.push(event(self, EventKind::Modified, false, changes, record.clone()));
                        }
                    }
                    t.record = record;
                    t.raw = raw.details;
                    self.live.insert(key, t);
                }
            }
        }

        let gone: Vec<ProcessKey> = if complete {
            self.live.keys().filter(|k| !seen.contains(k)).copied().collect()
        } else {
            Vec::new()
        };
        for key in gone {
            if let Some(t) = self.live.remove(&key)
                && t.reported
            {
                stopped.push(event(self, EventKind::Stopped, false, Vec::new(), t.record));
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
        // Only values both sides know are compared: a field turning
        // unreadable (a zombie loses its exe) is not a change.
        let exe_file_changed = match (&od.exe_file, &nd.exe_file) {
            (Ok(a), Ok(b)) => a.dev != b.dev || a.inode != b.inode,
            _ => false,
        };
        let exe_changed = matches!((&od.exe, &nd.exe), (Ok(a), Ok(b)) if a != b);
        // A new name alone is a rename (prctl PR_SET_NAME); with a new
        // command line too it is an exec of the same binary.
        let argv_changed = matches!((&od.argv, &nd.argv), (Ok(a), Ok(b)) if a != b);
        if exe_changed || exe_file_changed || (old.name != new.name && argv_changed) {
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
    /// Shares the platform's `Arc` when sanitizing changed nothing (most
    /// processes): the tracker then costs no second copy of the details.
    fn clean(&mut self, raw: &Arc<ProcessDetails>) -> Arc<ProcessDetails> {
        self.sanitized += 1;
        let Ok(argv) = &raw.argv else { return raw.clone() };
        let clean = self.sanitizer.sanitize(&argv.args).args;
        if clean == argv.args {
            return raw.clone();
        }
        let mut d = ProcessDetails::clone(raw);
        if let Ok(argv) = &mut d.argv {
            argv.args = clean;
        }
        Arc::new(d)
    }

    /// The event's copy of a record: without cwd unless enhanced metadata
    /// is on (stripped here, per event, so tracked records can share the
    /// platform's details).
    fn for_event(&self, mut record: ProcessRecord) -> ProcessRecord {
        if !self.enhanced && record.details.cwd.is_ok() {
            let mut d = ProcessDetails::clone(&record.details);
            d.cwd = Err(Unavailable::NotCollected);
            record.details = Arc::new(d);
        }
        record
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
    // Looked up by reference first: a steady cycle allocates no path.
    let on_disk = match cache.get(path.as_path()) {
        Some(state) => *state,
        None => *cache.entry(path.clone()).or_insert_with(|| stat_identity(path)),
    };
    match on_disk {
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use daemoneye_platform::{Argv, Credentials, ProcessDetails, Unavailable};

    use super::*;
    use crate::config::SanitizeConfig;
    use crate::testing::record;

    fn tracker(cfg: LifecycleConfig) -> Tracker {
        Tracker::new(cfg, Sanitizer::new(&SanitizeConfig::default()), false)
    }

    /// Lifecycle settings without the on-disk executable check (the fake
    /// records name files that do not exist here).
    fn no_disk() -> LifecycleConfig {
        LifecycleConfig { exe_changes: false, ..Default::default() }
    }

    fn kinds(events: &[ProcessEvent]) -> Vec<(EventKind, u32, Vec<Change>)> {
        events.iter().map(|e| (e.kind, e.process.pid, e.changes.clone())).collect()
    }

    fn with_details(mut r: ProcessRecord, f: impl FnOnce(&mut ProcessDetails)) -> ProcessRecord {
        let mut d = ProcessDetails::clone(&r.details);
        f(&mut d);
        r.details = Arc::new(d);
        r
    }

    #[test]
    fn the_first_cycle_is_a_marked_snapshot_and_steady_cycles_are_silent() {
        let mut t = tracker(no_disk());
        let list = vec![record(1, 10, "init"), record(2, 20, "sshd")];
        let events = t.update(list.clone(), 0);
        assert_eq!(kinds(&events), vec![(EventKind::Started, 1, vec![]), (EventKind::Started, 2, vec![])]);
        assert!(events.iter().all(|e| e.snapshot));
        assert!(t.update(list.clone(), 1).is_empty());
        assert!(t.update(list, 2).is_empty());

        let mut quiet =
            tracker(LifecycleConfig { snapshot_on_start: false, exe_changes: false, ..Default::default() });
        assert!(quiet.update(vec![record(1, 10, "init")], 0).is_empty());
        let events = quiet.update(vec![record(1, 10, "init"), record(3, 30, "new")], 1);
        assert_eq!(kinds(&events), vec![(EventKind::Started, 3, vec![])]);
        assert!(!events[0].snapshot);
    }

    #[test]
    fn pid_reuse_is_a_stop_and_a_start_never_a_modification() {
        let mut t = tracker(no_disk());
        t.update(vec![record(7, 100, "old")], 0);
        let events = t.update(vec![record(7, 200, "new")], 1);
        assert_eq!(kinds(&events), vec![(EventKind::Stopped, 7, vec![]), (EventKind::Started, 7, vec![])]);
        assert_eq!((events[0].process.start_time, events[1].process.start_time), (100, 200));
        assert_eq!(events[0].process.name, "old", "the stop carries the last record seen");
    }

    #[test]
    fn each_kind_of_modification_is_reported_with_its_reason() {
        let mut t = tracker(no_disk());
        let base = record(5, 50, "bash");
        t.update(vec![base.clone()], 0);

        let exec = with_details(base.clone(), |d| d.exe = Ok("/usr/bin/python3".into()));
        let mut exec = exec;
        exec.name = "python3".into();
        assert_eq!(
            kinds(&t.update(vec![exec.clone()], 1)),
            vec![(EventKind::Modified, 5, vec![Change::Exec])]
        );

        let creds = with_details(exec.clone(), |d| {
            d.credentials = Ok(Credentials { uid: 1000, euid: 0, gid: 1000, egid: 1000 })
        });
        assert_eq!(
            kinds(&t.update(vec![creds.clone()], 2)),
            vec![(EventKind::Modified, 5, vec![Change::Credentials])]
        );

        let mut orphan = creds.clone();
        orphan.ppid = 1234;
        assert_eq!(
            kinds(&t.update(vec![orphan.clone()], 3)),
            vec![(EventKind::Modified, 5, vec![Change::Reparent])]
        );

        // Several at once come as one event.
        let mut both = with_details(orphan.clone(), |d| {
            d.credentials = Ok(Credentials { uid: 0, euid: 0, gid: 0, egid: 0 })
        });
        both.ppid = 1;
        assert_eq!(
            kinds(&t.update(vec![both], 5)),
            vec![(EventKind::Modified, 5, vec![Change::Credentials, Change::Reparent])]
        );
    }

    #[test]
    fn the_platforms_deleted_flag_is_a_modification() {
        // The path is unknown (another user's process): only the flag tells.
        let hidden = with_details(record(6, 60, "worker"), |d| d.exe = Err(Unavailable::NotPermitted));
        let mut t = tracker(LifecycleConfig::default());
        t.update(vec![hidden.clone()], 0);
        let deleted = with_details(hidden, |d| d.exe_deleted = Ok(true));
        assert_eq!(
            kinds(&t.update(vec![deleted.clone()], 1)),
            vec![(EventKind::Modified, 6, vec![Change::ExeDeleted])]
        );
        assert!(t.update(vec![deleted], 2).is_empty());
    }

    #[test]
    fn a_zombie_or_a_rename_is_not_an_exec() {
        let mut t = tracker(no_disk());
        let live = record(30, 300, "worker");
        t.update(vec![live.clone()], 0);
        // prctl(PR_SET_NAME): new name, same binary and command line.
        let mut renamed = live.clone();
        renamed.name = "worker/3".into();
        assert!(t.update(vec![renamed.clone()], 1).is_empty());
        // Exited, not reaped: the platform can no longer read its details.
        let mut zombie = with_details(renamed.clone(), |d| {
            d.exe = Err(Unavailable::NotApplicable);
            d.exe_file = Err(Unavailable::NotApplicable);
            d.argv = Err(Unavailable::NotApplicable);
        });
        zombie.state = daemoneye_platform::ProcessState::Zombie;
        assert!(t.update(vec![zombie], 2).is_empty());
        let events = t.update(vec![], 3);
        assert_eq!(kinds(&events), vec![(EventKind::Stopped, 30, vec![])]);
        assert!(events[0].process.details.exe.is_ok(), "the stop carries the last live details");
    }

    #[test]
    fn a_cut_list_reports_no_stops() {
        let mut t = tracker(no_disk());
        t.update(vec![record(1, 1, "a"), record(2, 2, "b")], 0);
        assert!(t.update_with(vec![record(1, 1, "a")], 1, false).is_empty());
        assert_eq!(kinds(&t.update(vec![record(1, 1, "a")], 2)), vec![(EventKind::Stopped, 2, vec![])]);
    }

    #[test]
    fn command_line_rewrites_are_off_by_default_and_reported_when_enabled() {
        let rewrite = |r: &ProcessRecord| {
            with_details(r.clone(), |d| {
                d.argv = Ok(Argv { args: vec!["postgres: writer".into()], truncated: false })
            })
        };
        let base = record(9, 90, "postgres");
        let mut off = tracker(no_disk());
        off.update(vec![base.clone()], 0);
        assert!(off.update(vec![rewrite(&base)], 1).is_empty());

        let mut on =
            tracker(LifecycleConfig { command_line: true, exe_changes: false, ..Default::default() });
        on.update(vec![base.clone()], 0);
        assert_eq!(
            kinds(&on.update(vec![rewrite(&base)], 1)),
            vec![(EventKind::Modified, 9, vec![Change::CommandLine])]
        );
        // Credentials and reparent checks can be turned off too.
        let mut none = tracker(LifecycleConfig {
            credentials: false,
            reparent: false,
            exe_changes: false,
            ..Default::default()
        });
        none.update(vec![base.clone()], 0);
        let mut moved = with_details(base.clone(), |d| {
            d.credentials = Ok(Credentials { uid: 0, euid: 0, gid: 0, egid: 0 })
        });
        moved.ppid = 77;
        assert!(none.update(vec![moved], 1).is_empty());
    }

    #[test]
    fn an_executable_replaced_or_deleted_on_disk_is_reported_once() {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("daemon");
        std::fs::write(&exe, b"version 1").unwrap();
        let identity = daemoneye_platform::file_identity(&std::fs::metadata(&exe).unwrap()).unwrap();
        let running = with_details(record(11, 110, "daemon"), |d| {
            d.exe = Ok(exe.clone());
            d.exe_file = Ok(identity);
        });
        let mut t = tracker(LifecycleConfig::default());
        t.update(vec![running.clone()], 0);
        assert!(t.update(vec![running.clone()], 1).is_empty(), "unchanged file: nothing");

        // A package upgrade: a new file renamed over the path.
        let new = dir.path().join("daemon.new");
        std::fs::write(&new, b"version 2").unwrap();
        std::fs::rename(&new, &exe).unwrap();
        assert_eq!(
            kinds(&t.update(vec![running.clone()], 2)),
            vec![(EventKind::Modified, 11, vec![Change::ExeReplaced])]
        );
        assert!(t.update(vec![running.clone()], 3).is_empty(), "reported once");

        // Deleted under another running process.
        let other = with_details(record(12, 120, "daemon"), |d| {
            d.exe = Ok(exe.clone());
            d.exe_file = Ok(daemoneye_platform::file_identity(&std::fs::metadata(&exe).unwrap()).unwrap());
        });
        t.update(vec![running.clone(), other.clone()], 4);
        std::fs::remove_file(&exe).unwrap();
        assert_eq!(
            kinds(&t.update(vec![running.clone(), other], 5)),
            vec![(EventKind::Modified, 12, vec![Change::ExeDeleted])]
        );
    }

    #[test]
    fn command_lines_are_sanitized_once_per_identity() {
        let mut t = tracker(no_disk());
        let secret = with_details(record(3, 30, "mysql"), |d| {
            d.argv = Ok(Argv { args: vec!["mysql".into(), "--password=hunter2".into()], truncated: false })
        });
        let events = t.update(vec![secret.clone()], 0);
        let args = events[0].process.details.argv.clone().unwrap().args;
        assert!(!args.join(" ").contains("hunter2"), "{args:?}");
        assert_eq!(t.sanitized_count(), 1);
        for now in 1..5 {
            t.update(vec![secret.clone()], now);
        }
        assert_eq!(t.sanitized_count(), 1, "steady cycles reuse the sanitized details");
        // Without enhanced metadata, cwd and friends are not collected.
        assert_eq!(events[0].process.details.cwd, Err(Unavailable::NotCollected));
        assert_eq!(events[0].process.threads, Err(Unavailable::NotCollected));
    }

    #[test]
    fn young_processes_wait_for_min_age_and_short_lived_ones_leave_no_trace() {
        let mut t = tracker(LifecycleConfig { min_age_ms: 5_000, exe_changes: false, ..Default::default() });
        // record() says started_unix = 1_700_000_000 + start_time (seconds).
        let born = 1_700_000_100u64 * 1000;
        let young = record(20, 100, "job");
        let blip = record(21, 100, "blip");
        assert!(t.update(vec![young.clone(), blip], born + 1_000).is_empty());
        // The blip exits before it is old enough: no start, no stop.
        let events = t.update(vec![young.clone()], born + 6_000);
        assert_eq!(kinds(&events), vec![(EventKind::Started, 20, vec![])]);
        let events = t.update(vec![], born + 7_000);
        assert_eq!(kinds(&events), vec![(EventKind::Stopped, 20, vec![])]);
    }
}
