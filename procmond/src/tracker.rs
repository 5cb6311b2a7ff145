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
//!
//! Two inputs feed it, both on the actor thread, so they cannot disagree:
//! whole process lists ([`Tracker::reconcile`], the poll) and the kernel
//! path's observations ([`Tracker::apply_kernel`]: a process read right
//! after its fork, exec or credential change, or its exit with the exit
//! status). With the kernel path on, a process list only reconciles:
//!
//! - A process that started at or after the list's `cutoff` (the walk's
//!   start, or the oldest fork the kernel path still holds) is the kernel
//!   path's to report: the list neither starts it nor stops it.
//! - A process the kernel path touched since [`Tracker::begin_walk`] is
//!   newer in the tracker than in the list: it is not diffed.
//! - An identity the kernel path stopped is remembered (a tombstone) for
//!   two walks, so a list that still shows it (a zombie, a walk that read
//!   it just before its exit) cannot start it again.
//!
//! Invariant: no identity gets two Started or two Stopped events.
//!
//! `max_processes` ([`Walk::max_processes`]): a longer list is cut to that
//! many compared processes, those not reported yet first, newest first
//! (start time, pid descending), then reported ones, so a fork flood cannot
//! hide what starts after it; stops still come from the whole list (a
//! reported process the cap left out is kept, not stopped, and not
//! refreshed until there is room); `last_cut()` says how much was left out.
//! The tracked set may then exceed the cap: the cap bounds per-walk work,
//! not memory (the walk has listed everything anyway).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use daemoneye_platform::{
    ExitStatus, FileIdentity, ProcessDetails, ProcessKey, ProcessRecord, ProcessState, Unavailable,
};

use crate::config::LifecycleConfig;
use crate::sanitize::Sanitizer;
use daemoneye_contract::event::{Change, EventKind, EventSource, LateWindow, ProcessEvent};

/// Why the kernel path read a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// It was forked and did not exec within the fork window.
    Fork,
    /// It executed a program.
    Exec,
    /// Its user or group ids changed.
    Credentials,
}

/// What the kernel path saw, in the order it happened.
#[derive(Debug, Clone, PartialEq)]
pub enum Observation {
    /// A process as read right after `cause` (details `Vanished` if it was
    /// gone before they could be read).
    Process {
        /// The record, unsanitized.
        record: ProcessRecord,
        /// What happened to it.
        cause: Cause,
    },
    /// A process ended.
    Exit(ExitObservation),
}

/// A process's exit as the kernel reported it.
#[derive(Debug, Clone, PartialEq)]
pub struct ExitObservation {
    /// The process id.
    pub pid: u32,
    /// Its start time, when the kernel path read it (else the tracker's
    /// live process with that pid is the one).
    pub start_time: Option<u64>,
    /// How it ended.
    pub status: ExitStatus,
    /// When (Unix ms).
    pub at_unix_ms: u64,
    /// What to report for a process never seen alive: pid, parent, name,
    /// start time as far as known, details `Vanished`.
    pub unseen: Option<ProcessRecord>,
}

/// How a process list is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Walk {
    /// At most this many processes of the list are compared (0: all); see
    /// [`Tracker::reconcile`] for which, and why stops still come from the
    /// whole list.
    pub max_processes: usize,
    /// The kernel path is on: what it touched since [`Tracker::begin_walk`]
    /// is newer than the list, what it stopped stays stopped, and an
    /// unknown zombie is its to report.
    pub kernel: bool,
    /// With the kernel path on: processes whose start time is at or after
    /// this are the kernel path's to report (see the module docs).
    pub cutoff: Option<u64>,
}

impl Walk {
    /// A whole list in poll mode.
    pub const POLL: Walk = Walk { max_processes: 0, kernel: false, cutoff: None };
}

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
    /// The walk during which the kernel path last updated it.
    touched: u64,
}

/// The lifecycle tracker. Owned by the actor thread.
pub struct Tracker {
    /// Boxed: the table holds a key and a pointer per bucket, not a whole
    /// record (a table is at most 7/8 full, up to twice the processes it
    /// holds, and the free buckets would each take a record's size).
    live: HashMap<ProcessKey, Box<Tracked>>,
    cfg: LifecycleConfig,
    sanitizer: Sanitizer,
    enhanced: bool,
    cycles: u64,
    sanitized: u64,
    /// Walks begun ([`Tracker::begin_walk`]).
    walk: u64,
    /// Identities the kernel path stopped, with the walk they were stopped
    /// in (kept two walks).
    tombstones: HashMap<ProcessKey, u64>,
    /// Processes the last list reported that the kernel path had missed.
    caught_by_poll: u64,
    /// Set by [`Tracker::restore`]: the next list is compared with the
    /// restored state, its events marked late with this window's start.
    restored_since: Option<u64>,
    /// How the last list was cut at `max_processes`.
    last_cut: Option<Cut>,
    /// The snapshot's Started events are handed out in chunks
    /// ([`Tracker::set_snapshot_in_chunks`]).
    chunked_snapshot: bool,
    /// The identities whose snapshot Started is still to hand out, last
    /// first, and the snapshot's time.
    pending: Vec<ProcessKey>,
    pending_at: u64,
}

/// A process list longer than `max_processes`, and how much of it was
/// compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cut {
    /// Processes the list held (after excluded pids).
    pub listed: usize,
    /// Processes compared (the cap).
    pub compared: usize,
}

impl Tracker {
    /// A tracker with nothing seen yet. Without `enhanced` metadata, cwd,
    /// session, threads and CPU time are left out (`NotCollected`).
    pub fn new(cfg: LifecycleConfig, sanitizer: Sanitizer, enhanced: bool) -> Tracker {
        Tracker {
            live: HashMap::new(),
            cfg,
            sanitizer,
            enhanced,
            cycles: 0,
            sanitized: 0,
            walk: 0,
            tombstones: HashMap::new(),
            caught_by_poll: 0,
            restored_since: None,
            last_cut: None,
            chunked_snapshot: false,
            pending: Vec::new(),
            pending_at: 0,
        }
    }

    /// With `on`, the first list's (the snapshot's) Started events are not
    /// returned by [`Tracker::reconcile`] but kept as identities and built
    /// on demand, in the same order, by [`Tracker::next_snapshot_events`]:
    /// a 10,000-process snapshot never has all its events in memory at
    /// once. Take them all before the tracker is given anything else.
    pub fn set_snapshot_in_chunks(&mut self, on: bool) {
        self.chunked_snapshot = on;
    }

    /// The next at most `max` snapshot Started events (see
    /// [`Tracker::set_snapshot_in_chunks`]); empty once all were taken.
    pub fn next_snapshot_events(&mut self, max: usize) -> Vec<ProcessEvent> {
        let n = self.pending.len().min(max);
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let Some(key) = self.pending.pop() else { break };
            if let Some(t) = self.live.get(&key) {
                let e = self.event(
                    EventKind::Started,
                    true,
                    Vec::new(),
                    t.record.clone(),
                    self.pending_at,
                    EventSource::Poll,
                );
                out.push(e);
            }
        }
        if self.pending.is_empty() {
            self.pending = Vec::new();
        }
        out
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
    /// hold two identities with that pid (a reused pid the kernel path
    /// started before a walk stopped the old one), the newest.
    pub fn find(&self, pid: u32) -> Option<ProcessRecord> {
        let newest =
            self.live.values().filter(|t| t.record.pid == pid).max_by_key(|t| t.record.start_time)?;
        Some(self.for_event(newest.record.clone()))
    }

    /// Bytes of the tracker's table, estimated for memory benchmarks
    /// (hashbrown: buckets a power of two, one control byte each) and of
    /// its boxed entries (glibc chunks): the records' inline part, not
    /// their heap (names, shared details).
    pub fn table_bytes(&self) -> usize {
        let cap = self.live.capacity();
        let buckets = if cap == 0 { 0 } else { (cap * 8 / 7).next_power_of_two() };
        buckets * (size_of::<(ProcessKey, Box<Tracked>)>() + 1)
            + self.live.len() * (size_of::<Tracked>() + 8).div_ceil(16) * 16
    }

    /// Command lines sanitized so far (a steady cycle adds none).
    pub fn sanitized_count(&self) -> u64 {
        self.sanitized
    }

    /// Compares a new process list with the last one. `now_unix_ms` stamps
    /// the events. Stopped events come first, then Started, then Modified,
    /// each ordered by pid.
    pub fn update(&mut self, records: Vec<ProcessRecord>, now_unix_ms: u64) -> Vec<ProcessEvent> {
        self.reconcile(records, now_unix_ms, Walk::POLL)
    }

    /// Like [`Tracker::update`], comparing at most `max_processes` of the
    /// list (0: all; see [`Tracker::reconcile`]).
    pub fn update_with(
        &mut self,
        records: Vec<ProcessRecord>,
        now_unix_ms: u64,
        max_processes: usize,
    ) -> Vec<ProcessEvent> {
        self.reconcile(records, now_unix_ms, Walk { max_processes, kernel: false, cutoff: None })
    }

    /// How the last list was cut at `max_processes` (`None`: it was not).
    pub fn last_cut(&self) -> Option<Cut> {
        self.last_cut
    }

    /// Marks the start of a walk over the process table: kernel
    /// observations applied from now on are newer than the list it yields.
    /// Tombstones older than the previous walk are dropped.
    pub fn begin_walk(&mut self) {
        self.walk += 1;
        let keep_from = self.walk.saturating_sub(1);
        self.tombstones.retain(|_, w| *w >= keep_from);
    }

    /// Whether a restored state waits for its first comparison.
    pub fn is_restored(&self) -> bool {
        self.restored_since.is_some()
    }

    /// The processes reported as running (sanitized), for a checkpoint.
    /// Borrowed: a checkpoint encodes them without copying any.
    pub fn reported(&self) -> Vec<&ProcessRecord> {
        self.live.values().filter(|t| t.reported).map(|t| &t.record).collect()
    }

    /// Takes the processes a previous run reported as running (from a
    /// checkpoint and the events after it), last known at `down_since_ms`.
    /// The next list is compared with them instead of being a snapshot:
    /// what ended meanwhile gets a Stopped, what started a Started, what
    /// changed a Modified, all marked late with the window
    /// `down_since_ms..now`; what was reported already is not re-sent.
    pub fn restore(&mut self, processes: Vec<ProcessRecord>, down_since_ms: u64) {
        for record in processes {
            let raw = record.details.clone();
            let t = Box::new(Tracked { record, raw, reported: true, exe_change_reported: false, touched: 0 });
            self.live.insert(t.record.key(), t);
        }
        self.restored_since = Some(down_since_ms);
    }

    /// Stopped events, marked late, for processes a previous run reported
    /// as running on another boot: they all ended, somewhere in `window`.
    pub fn stopped_late(&self, processes: Vec<ProcessRecord>, window: LateWindow) -> Vec<ProcessEvent> {
        processes
            .into_iter()
            .map(|p| {
                let mut e = self.event(
                    EventKind::Stopped,
                    false,
                    Vec::new(),
                    p,
                    window.before_unix_ms,
                    EventSource::Poll,
                );
                e.late = Some(window);
                e
            })
            .collect()
    }

    /// Processes that reconciliation reported (started, stopped or
    /// modified) because the kernel path had missed them, since start.
    pub fn caught_by_poll(&self) -> u64 {
        self.caught_by_poll
    }

    /// Identities remembered as stopped by the kernel path.
    pub fn tombstones(&self) -> usize {
        self.tombstones.len()
    }

    /// Compares a process list with what is tracked (see the module docs
    /// for what `walk.cutoff` changes). Stopped events come first, then
    /// Started, then Modified, each ordered by pid; all with source `poll`.
    ///
    /// With `walk.max_processes` set and a longer list, only that many of
    /// its processes are compared (sanitized, started, diffed), chosen so a
    /// flood of processes cannot hide new ones: first those not reported
    /// yet (new, or waiting for `min_age_ms`), then those reported already;
    /// within each, the newest first (start time, then pid, descending).
    /// Under a flood, what starts after it is still reported; what was
    /// reported before is kept, not refreshed until the list fits again.
    /// Stops still come from the whole list: a tracked process is stopped
    /// only if the list does not show it at all, never because the cap
    /// left it out. [`Tracker::last_cut`] tells how many were left out.
    pub fn reconcile(
        &mut self,
        mut records: Vec<ProcessRecord>,
        now_unix_ms: u64,
        walk: Walk,
    ) -> Vec<ProcessEvent> {
        let listed = records.len();
        let present: Option<HashSet<ProcessKey>> = if walk.max_processes > 0 && listed > walk.max_processes {
            let present = records.iter().map(ProcessRecord::key).collect();
            let reported = |r: &ProcessRecord| self.live.get(&r.key()).is_some_and(|t| t.reported);
            records.sort_by_cached_key(|r| {
                (reported(r), std::cmp::Reverse(r.start_time), std::cmp::Reverse(r.pid))
            });
            records.truncate(walk.max_processes);
            Some(present)
        } else {
            None
        };
        self.last_cut = present.as_ref().map(|_| Cut { listed, compared: records.len() });
        let late = self
            .restored_since
            .take()
            .map(|after| LateWindow { after_unix_ms: after, before_unix_ms: now_unix_ms });
        let first = self.cycles == 0 && late.is_none();
        self.cycles += 1;
        let kernel = walk.kernel;
        let kernels = |key: &ProcessKey| walk.cutoff.is_some_and(|c| key.start_time >= c);
        let mut stopped = Vec::new();
        // A snapshot starts nearly every process listed: its events get
        // their room at once (no doubling, no copy on the way).
        let chunked = first && self.chunked_snapshot;
        let mut started = Vec::with_capacity(if first && !chunked { records.len() } else { 0 });
        let mut modified = Vec::new();
        let mut seen: HashSet<ProcessKey> = HashSet::with_capacity(records.len());
        // Room for the whole list at once: a snapshot does not grow the
        // table step by step (each step a new table and the old one freed).
        self.live.reserve(records.len().saturating_sub(self.live.len()));
        // Each distinct executable path is checked once per cycle.
        let mut on_disk: HashMap<PathBuf, OnDisk> = HashMap::new();
        let event = |tracker: &Tracker, kind, snapshot, changes, process| {
            tracker.event(kind, snapshot, changes, process, now_unix_ms, EventSource::Poll)
        };

        for raw in records {
            let key = raw.key();
            if !seen.insert(key) {
                continue;
            }
            let old_enough = self.old_enough(&raw, now_unix_ms);
            match self.live.get_mut(&key) {
                None if kernel && (kernels(&key) || self.tombstones.contains_key(&key)) => {}
                // Exited before it was ever seen alive: with the kernel path
                // on, its exit is (or was) reported there.
                None if kernel && raw.state == ProcessState::Zombie => {}
                None => {
                    let details = self.clean(&raw.details);
                    let record = self.strip(raw.clone(), details);
                    let report = old_enough && (!first || self.cfg.snapshot_on_start);
                    if report {
                        if kernel && !first {
                            self.caught_by_poll += 1;
                        }
                        if chunked {
                            self.pending.push(key);
                        } else {
                            started.push(event(self, EventKind::Started, first, Vec::new(), record.clone()));
                        }
                    }
                    // Not yet old enough: reported later, if it lives.
                    let reported = report || (first && old_enough);
                    self.live.insert(
                        key,
                        Box::new(Tracked {
                            record,
                            raw: raw.details,
                            reported,
                            exe_change_reported: false,
                            touched: 0,
                        }),
                    );
                }
                // The kernel path saw it during the walk: its record is newer.
                Some(t) if kernel && t.touched == self.walk => {}
                Some(t) if raw.state == ProcessState::Zombie => {
                    // Exited, not yet reaped: its details are gone, not
                    // changed. Keep the last live record for the stop.
                    t.record.state = raw.state;
                }
                Some(_) => {
                    let mut t = self.live.remove(&key).unwrap_or_else(|| unreachable!());
                    if let Some(e) =
                        self.refresh(&mut t, raw, old_enough, &mut on_disk, now_unix_ms, EventSource::Poll)
                    {
                        if kernel {
                            self.caught_by_poll += 1;
                        }
                        match e.kind {
                            EventKind::Started => started.push(e),
                            _ => modified.push(e),
                        }
                    }
                    self.live.insert(key, t);
                }
            }
        }

        // Gone: in neither the compared part nor (when cut) the rest.
        let listed = |k: &ProcessKey| seen.contains(k) || present.as_ref().is_some_and(|p| p.contains(k));
        let gone: Vec<ProcessKey> = self
            .live
            .iter()
            .filter(|(k, t)| !(listed(k) || kernels(k) || (kernel && t.touched == self.walk)))
            .map(|(k, _)| *k)
            .collect();
        for key in gone {
            if let Some(t) = self.live.remove(&key)
                && t.reported
            {
                if kernel {
                    self.caught_by_poll += 1;
                    self.tombstones.insert(key, self.walk);
                }
                stopped.push(event(self, EventKind::Stopped, false, Vec::new(), t.record));
            }
        }
        if chunked {
            // Handed out by pid, as `started` would be: popped from the end.
            self.pending.sort_unstable_by(|a, b| b.cmp(a));
            self.pending_at = now_unix_ms;
        }
        for list in [&mut stopped, &mut started, &mut modified] {
            list.sort_by_key(|e| (e.process.pid, e.process.start_time));
        }
        // Into the largest list when it comes first (a snapshot's Started):
        // no second buffer of every event.
        let mut all = if stopped.is_empty() {
            started
        } else {
            stopped.extend(started);
            stopped
        };
        all.extend(modified);
        if late.is_some() {
            for e in &mut all {
                e.late = late;
            }
        }
        all
    }

    /// Applies the kernel path's observations, in order. Events carry
    /// source `kernel`; nothing already reported is reported again.
    pub fn apply_kernel(&mut self, observations: Vec<Observation>, now_unix_ms: u64) -> Vec<ProcessEvent> {
        let mut events = Vec::new();
        let mut on_disk: HashMap<PathBuf, OnDisk> = HashMap::new();
        for obs in observations {
            match obs {
                Observation::Process { record, cause } => {
                    let key = record.key();
                    if self.tombstones.contains_key(&key) {
                        continue;
                    }
                    let old_enough = self.old_enough(&record, now_unix_ms);
                    match self.live.remove(&key) {
                        Some(t) if cause == Cause::Fork || record.state == ProcessState::Zombie => {
                            // Nothing new: a fork read of a process already
                            // known, or a read that came after its exit.
                            self.live.insert(key, t);
                        }
                        Some(mut t) => {
                            t.touched = self.walk;
                            if let Some(e) = self.refresh(
                                &mut t,
                                record,
                                old_enough,
                                &mut on_disk,
                                now_unix_ms,
                                EventSource::Kernel,
                            ) {
                                events.push(e);
                            }
                            self.live.insert(key, t);
                        }
                        None => {
                            let details = self.clean(&record.details);
                            let rec = self.strip(record.clone(), details);
                            if old_enough {
                                events.push(self.event(
                                    EventKind::Started,
                                    false,
                                    Vec::new(),
                                    rec.clone(),
                                    now_unix_ms,
                                    EventSource::Kernel,
                                ));
                            }
                            self.live.insert(
                                key,
                                Box::new(Tracked {
                                    record: rec,
                                    raw: record.details,
                                    reported: old_enough,
                                    exe_change_reported: false,
                                    touched: self.walk,
                                }),
                            );
                        }
                    }
                }
                Observation::Exit(exit) => self.apply_exit(exit, now_unix_ms, &mut events),
            }
        }
        events
    }

    fn apply_exit(&mut self, exit: ExitObservation, now_unix_ms: u64, events: &mut Vec<ProcessEvent>) {
        let key = match exit.start_time {
            Some(start_time) => Some(ProcessKey { pid: exit.pid, start_time }),
            // The newest live identity with that pid: an older one would
            // have exited before the pid could be reused.
            None => self.live.keys().filter(|k| k.pid == exit.pid).max_by_key(|k| k.start_time).copied(),
        };
        let stop = |tracker: &Tracker, record| {
            let mut e = tracker.event(
                EventKind::Stopped,
                false,
                Vec::new(),
                record,
                exit.at_unix_ms,
                EventSource::Kernel,
            );
            e.exit = Some(exit.status);
            e
        };
        if let Some(key) = key
            && let Some(t) = self.live.remove(&key)
        {
            self.tombstones.insert(key, self.walk);
            if t.reported {
                events.push(stop(self, t.record));
            }
            return;
        }
        if key.is_some_and(|k| self.tombstones.contains_key(&k)) {
            return;
        }
        // Never seen alive: record what is known, invent nothing.
        let Some(mut unseen) = exit.unseen else { return };
        if unseen.name.is_empty()
            && let Some(parent) =
                self.live.values().filter(|t| t.record.pid == unseen.ppid).max_by_key(|t| t.record.start_time)
        {
            // Gone before its first read and before any exec: a forked
            // child still bears its parent's name.
            unseen.name = parent.record.name.clone();
        }
        let key = unseen.key();
        if self.tombstones.contains_key(&key) || self.cfg.min_age_ms > 0 {
            return;
        }
        self.tombstones.insert(key, self.walk);
        let details = self.clean(&unseen.details);
        let record = self.strip(unseen, details);
        events.push(self.event(
            EventKind::Started,
            false,
            Vec::new(),
            record.clone(),
            now_unix_ms,
            EventSource::Kernel,
        ));
        events.push(stop(self, record));
    }

    /// Whether a process is old enough to report (`min_age_ms`).
    fn old_enough(&self, raw: &ProcessRecord, now_unix_ms: u64) -> bool {
        self.cfg.min_age_ms == 0
            || raw.started_unix.map_or(true, |s| now_unix_ms.saturating_sub(s * 1000) >= self.cfg.min_age_ms)
    }

    /// Takes a new record of a tracked process: its deferred Started, or
    /// a Modified with what changed.
    fn refresh(
        &mut self,
        t: &mut Tracked,
        raw: ProcessRecord,
        old_enough: bool,
        on_disk: &mut HashMap<PathBuf, OnDisk>,
        now_unix_ms: u64,
        source: EventSource,
    ) -> Option<ProcessEvent> {
        let same_details = Arc::ptr_eq(&t.raw, &raw.details);
        let details = if same_details { t.record.details.clone() } else { self.clean(&raw.details) };
        let mut record = self.strip(raw.clone(), details);
        let mut out = None;
        if !t.reported {
            if old_enough {
                out = Some(self.event(
                    EventKind::Started,
                    false,
                    Vec::new(),
                    record.clone(),
                    now_unix_ms,
                    source,
                ));
                t.reported = true;
            }
        } else {
            let mut changes = self.diff(&t.record, &record);
            if self.cfg.exe_changes && !changes.contains(&Change::Exec) {
                if !t.exe_change_reported
                    && let Some(c) = exe_on_disk_change(&record, on_disk)
                {
                    if c == Change::ExeDeleted {
                        // The platform read the details before the file
                        // went: this event, the tracked record (and so the
                        // Stopped event and `inspect`) say it is deleted.
                        let mut d = ProcessDetails::clone(&record.details);
                        d.exe_deleted = Ok(true);
                        record.details = Arc::new(d);
                    }
                    changes.push(c);
                    t.exe_change_reported = true;
                }
            } else if changes.contains(&Change::Exec) {
                t.exe_change_reported = false;
            }
            if !changes.is_empty() {
                changes.sort();
                changes.dedup();
                out = Some(self.event(
                    EventKind::Modified,
                    false,
                    changes,
                    record.clone(),
                    now_unix_ms,
                    source,
                ));
            }
        }
        t.record = record;
        t.raw = raw.details;
        out
    }

    fn event(
        &self,
        kind: EventKind,
        snapshot: bool,
        changes: Vec<Change>,
        process: ProcessRecord,
        now_unix_ms: u64,
        source: EventSource,
    ) -> ProcessEvent {
        ProcessEvent {
            kind,
            snapshot,
            changes,
            observed_unix_ms: now_unix_ms,
            process: self.for_event(process),
            sha256: None,
            source,
            late: None,
            exit: None,
        }
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
        let clean = if argv.truncated {
            self.sanitizer.sanitize_cut(&argv.args).args
        } else {
            self.sanitizer.sanitize(&argv.args).args
        };
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
mod tests;
