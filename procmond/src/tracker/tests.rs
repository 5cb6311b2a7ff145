//! Unit tests of `tracker`.

use std::sync::Arc;

use daemoneye_platform::{Argv, Credentials, ExitStatus, ProcessDetails, Unavailable};

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
    assert_eq!(kinds(&t.update(vec![exec.clone()], 1)), vec![(EventKind::Modified, 5, vec![Change::Exec])]);

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
fn a_cut_list_stops_only_what_it_does_not_show_and_starts_the_newest() {
    let mut t = tracker(no_disk());
    let old = [record(1, 1, "init"), record(2, 2, "sshd"), record(3, 3, "cron")];
    t.update(old.to_vec(), 0);
    assert_eq!(t.last_cut(), None);
    // A flood of 5 (start times 10..14) and, after it, a new process
    // (start time 20, a low reused pid), with a cap of 4; cron is gone.
    let flood: Vec<ProcessRecord> = (0..5).map(|i| record(100 + i, 10 + u64::from(i), "flood")).collect();
    let mut list = vec![old[0].clone(), old[1].clone(), record(7, 20, "newcomer")];
    list.extend(flood.iter().cloned());
    let events = t.update_with(list.clone(), 1, 4);
    assert_eq!(t.last_cut(), Some(Cut { listed: 8, compared: 4 }));
    // cron stopped (the list does not show it); init and sshd, left
    // out by the cap, were not; the newest new ones started.
    assert_eq!(
        kinds(&events),
        vec![
            (EventKind::Stopped, 3, vec![]),
            (EventKind::Started, 7, vec![]),
            (EventKind::Started, 102, vec![]),
            (EventKind::Started, 103, vec![]),
            (EventKind::Started, 104, vec![])
        ]
    );
    // Next cycle: the rest of the flood, then the reported ones.
    let events = t.update_with(list.clone(), 2, 4);
    assert_eq!(kinds(&events), vec![(EventKind::Started, 100, vec![]), (EventKind::Started, 101, vec![])]);
    assert_eq!(t.len(), 8);
    // The list fits again: nothing more, nothing stopped.
    assert!(t.update_with(list.clone(), 3, 0).is_empty());
    assert_eq!(t.last_cut(), None);
    // A tracked process left out by the cap that then exits: stopped,
    // since the whole list no longer shows it.
    list.retain(|r| r.pid != 1);
    let events = t.update_with(list, 4, 2);
    assert_eq!(kinds(&events), vec![(EventKind::Stopped, 1, vec![])]);
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

    let mut on = tracker(LifecycleConfig { command_line: true, exe_changes: false, ..Default::default() });
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
    let mut moved =
        with_details(base.clone(), |d| d.credentials = Ok(Credentials { uid: 0, euid: 0, gid: 0, egid: 0 }));
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
    let events = t.update(vec![running.clone(), other.clone()], 5);
    assert_eq!(kinds(&events), vec![(EventKind::Modified, 12, vec![Change::ExeDeleted])]);
    // The platform read `exe_deleted: false` before the file went; the
    // event, the later cycles and the stop say what the change says.
    assert_eq!(events[0].process.details.exe_deleted, Ok(true));
    assert!(t.update(vec![running.clone(), other], 6).is_empty(), "reported once");
    let stopped = t.update(vec![running.clone()], 7);
    assert_eq!(kinds(&stopped), vec![(EventKind::Stopped, 12, vec![])]);
    assert_eq!(stopped[0].process.details.exe_deleted, Ok(true));
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
fn a_command_line_cut_at_the_limit_loses_its_cut_word_not_half_a_secret() {
    let mut t = tracker(no_disk());
    let cut = with_details(record(4, 40, "git"), |d| {
        d.argv =
            Ok(Argv { args: vec!["git".into(), "clone".into(), "https://alice:s3c".into()], truncated: true })
    });
    let events = t.update(vec![cut], 0);
    let argv = events[0].process.details.argv.clone().unwrap();
    assert_eq!(argv.args, ["git", "clone", crate::sanitize::REDACTED]);
    assert!(argv.truncated);
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

fn exec(r: ProcessRecord) -> Observation {
    Observation::Process { record: r, cause: Cause::Exec }
}

fn exit(pid: u32, start_time: Option<u64>, code: i32) -> Observation {
    Observation::Exit(ExitObservation {
        pid,
        start_time,
        status: ExitStatus::Code(code),
        at_unix_ms: 9,
        unseen: None,
    })
}

fn sources(events: &[ProcessEvent]) -> Vec<(EventKind, u32, EventSource)> {
    events.iter().map(|e| (e.kind, e.process.pid, e.source)).collect()
}

#[test]
fn kernel_observations_start_modify_and_stop_once_each() {
    let mut t = tracker(no_disk());
    t.update(vec![record(1, 1, "init")], 0);
    // A fork read at its window's end, then its exec: Started, then
    // Modified(exec), both from the kernel.
    let forked = record(50, 500, "bash");
    let events = t.apply_kernel(vec![Observation::Process { record: forked.clone(), cause: Cause::Fork }], 1);
    assert_eq!(sources(&events), vec![(EventKind::Started, 50, EventSource::Kernel)]);
    let mut execd = with_details(forked.clone(), |d| d.exe = Ok("/usr/bin/curl".into()));
    execd.name = "curl".into();
    let events = t.apply_kernel(vec![exec(execd.clone()), exec(execd.clone())], 2);
    assert_eq!(
        kinds(&events),
        vec![(EventKind::Modified, 50, vec![Change::Exec])],
        "the same exec twice is one event"
    );
    // A fork read of something known says nothing.
    assert!(t.apply_kernel(vec![Observation::Process { record: execd, cause: Cause::Fork }], 3).is_empty());
    let events = t.apply_kernel(vec![exit(50, Some(500), 3), exit(50, Some(500), 3)], 4);
    assert_eq!(sources(&events), vec![(EventKind::Stopped, 50, EventSource::Kernel)]);
    assert_eq!(events[0].exit, Some(ExitStatus::Code(3)));
    assert_eq!(events[0].process.name, "curl", "the stop carries the last record");
    // An exit without a start time stops the live process of that pid.
    t.apply_kernel(vec![exec(record(60, 600, "nc"))], 5);
    let events = t.apply_kernel(vec![exit(60, None, 0)], 6);
    assert_eq!(sources(&events), vec![(EventKind::Stopped, 60, EventSource::Kernel)]);
}

#[test]
fn a_process_gone_before_it_was_read_is_still_recorded() {
    let mut t = tracker(no_disk());
    t.update(vec![record(1, 1, "sshd")], 0);
    let mut unseen = record(70, 700, "");
    unseen.ppid = 1;
    unseen.details = Arc::new(ProcessDetails::vanished());
    let obs = Observation::Exit(ExitObservation {
        pid: 70,
        start_time: None,
        status: ExitStatus::Signal { signal: 9, core_dumped: false },
        at_unix_ms: 5,
        unseen: Some(unseen),
    });
    let events = t.apply_kernel(vec![obs.clone()], 5);
    assert_eq!(
        sources(&events),
        vec![(EventKind::Started, 70, EventSource::Kernel), (EventKind::Stopped, 70, EventSource::Kernel)]
    );
    assert_eq!(events[0].process.name, "sshd", "a forked child bears its parent's name");
    assert_eq!(events[0].process.details.argv, Err(Unavailable::Vanished));
    assert_eq!(events[1].exit, Some(ExitStatus::Signal { signal: 9, core_dumped: false }));
    assert!(t.apply_kernel(vec![obs], 6).is_empty(), "never twice");
}

#[test]
fn reconciliation_reports_only_what_the_kernel_path_missed() {
    let mut t = tracker(no_disk());
    let walk = |cutoff| Walk { max_processes: 0, kernel: true, cutoff: Some(cutoff) };
    t.begin_walk();
    t.reconcile(vec![record(1, 1, "init"), record(2, 2, "cron")], 0, Walk { cutoff: None, ..walk(0) });
    // The kernel saw 10 start and 2 exit.
    t.apply_kernel(vec![exec(record(10, 100, "job")), exit(2, Some(2), 0)], 1);
    t.begin_walk();
    // The walk still lists 2 (read just before its exit): no second
    // start. It lists 11 (missed by the kernel path: caught, source
    // poll) and 12 (started after the cutoff: the kernel's to report).
    // It misses 10 (exited, exit lost in an overrun: stopped by poll).
    let events = t.reconcile(
        vec![record(1, 1, "init"), record(2, 2, "cron"), record(11, 110, "miner"), record(12, 300, "late")],
        2,
        walk(200),
    );
    assert_eq!(
        sources(&events),
        vec![(EventKind::Stopped, 10, EventSource::Poll), (EventKind::Started, 11, EventSource::Poll)]
    );
    assert_eq!(t.caught_by_poll(), 2);
    // A kernel exit after the poll stopped it is not a second stop.
    assert!(t.apply_kernel(vec![exit(10, Some(100), 0)], 3).is_empty());
    // 12 is not stopped for being missing from a list either.
    t.apply_kernel(vec![exec(record(12, 300, "late"))], 4);
    t.begin_walk();
    let events = t.reconcile(vec![record(1, 1, "init"), record(11, 110, "miner")], 5, walk(250));
    assert!(events.is_empty(), "{:?}", kinds(&events));
}

#[test]
fn what_the_kernel_saw_during_a_walk_is_newer_than_the_walk() {
    let mut t = tracker(no_disk());
    let walk = Walk { max_processes: 0, kernel: true, cutoff: Some(1_000) };
    t.reconcile(vec![record(5, 50, "sh")], 0, Walk { cutoff: None, ..walk });
    t.begin_walk();
    // The walk read sh; then sh exec'd sleep (applied at the barrier).
    let mut sleep = with_details(record(5, 50, "sleep"), |d| d.exe = Ok("/usr/bin/sleep".into()));
    sleep.name = "sleep".into();
    let events = t.apply_kernel(vec![exec(sleep)], 1);
    assert_eq!(kinds(&events), vec![(EventKind::Modified, 5, vec![Change::Exec])]);
    assert!(
        t.reconcile(vec![record(5, 50, "sh")], 2, walk).is_empty(),
        "the older walk record changes nothing"
    );
}

#[test]
fn a_restored_state_reports_only_what_changed_while_down_marked_late() {
    let mut t = tracker(no_disk());
    // Reported before the restart: 1 (still runs), 2 (ended meanwhile).
    t.restore(vec![record(1, 1, "init"), record(2, 2, "job")], 1_000);
    assert!(t.is_restored());
    // 3 started meanwhile.
    let events = t.update(vec![record(1, 1, "init"), record(3, 3, "new")], 5_000);
    assert_eq!(kinds(&events), vec![(EventKind::Stopped, 2, vec![]), (EventKind::Started, 3, vec![])]);
    let window = LateWindow { after_unix_ms: 1_000, before_unix_ms: 5_000 };
    assert!(events.iter().all(|e| e.late == Some(window) && !e.snapshot), "{events:?}");
    assert!(!t.is_restored());
    // Afterwards, nothing is late.
    let events = t.update(vec![record(1, 1, "init")], 6_000);
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].late, None);
    // After a reboot everything reported ended.
    let stops = t.stopped_late(vec![record(9, 9, "old")], window);
    assert_eq!((stops[0].kind, stops[0].late), (EventKind::Stopped, Some(window)));
}

#[test]
fn a_snapshot_in_chunks_is_the_same_events_in_the_same_order() {
    // Listed out of pid order, one pid twice (a reused pid), a duplicate
    // line, and a secret to sanitize.
    let mut secret = record(4, 40, "curl");
    secret = with_details(secret, |d| {
        d.argv =
            Ok(Argv { args: vec!["curl".into(), "--password".into(), "hunter2".into()], truncated: false })
    });
    let list = vec![
        record(9, 90, "nine"),
        record(3, 30, "three"),
        secret,
        record(3, 31, "three-again"),
        record(9, 90, "nine"),
        record(1, 10, "init"),
    ];
    let mut whole = tracker(no_disk());
    let expected = whole.update(list.clone(), 7);
    let mut chunked = tracker(no_disk());
    chunked.set_snapshot_in_chunks(true);
    assert!(chunked.update(list.clone(), 7).is_empty(), "the snapshot waits to be taken");
    let mut got = Vec::new();
    loop {
        let chunk = chunked.next_snapshot_events(2);
        assert!(chunk.len() <= 2);
        if chunk.is_empty() {
            break;
        }
        got.extend(chunk);
    }
    assert_eq!(got.len(), 5);
    assert_eq!(got, expected);
    assert!(got.iter().all(|e| e.snapshot && e.observed_unix_ms == 7));
    // Only the snapshot is chunked: later cycles return their events.
    let mut next = list;
    next.retain(|r| r.pid != 1);
    let stops = chunked.update(next, 8);
    assert_eq!(kinds(&stops), vec![(EventKind::Stopped, 1, vec![])]);
    assert!(chunked.next_snapshot_events(10).is_empty());
}
