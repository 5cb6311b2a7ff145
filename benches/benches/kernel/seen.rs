//! Our processes, by token and pid, and what the store's rows showed of
//! each, read until all are in (forkstat's lines are added by the
//! `forkstat` module).

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use daemoneye_contract::event::{Change, EventKind, EventSource, ProcessEvent};

use super::ID;
use super::store::Store;

/// What was seen of one of our processes.
#[derive(Default, Clone)]
pub(super) struct Seen {
    pub(super) pid: u32,
    pub(super) token: String,
    /// procmond: a Started (or Modified exec) row.
    pub(super) started: bool,
    /// ... of which one carries `[<exe>, <token>]`, untruncated.
    pub(super) argv_full: bool,
    /// ... and the exe path.
    pub(super) exe_ok: bool,
    /// ... sources of the rows that showed it start (kernel, poll).
    pub(super) start_src: [bool; 2],
    pub(super) started_rows: u32,
    /// Each start row: kind, source, name, start time, argv (for the
    /// report of a process with two).
    pub(super) rows: Vec<String>,
    /// procmond: a Stopped row, with exit status 0.
    pub(super) stopped: bool,
    pub(super) exit_ok: bool,
    /// forkstat: exec line, with the token; exit line.
    pub(super) fs_exec: bool,
    pub(super) fs_argv: bool,
    pub(super) fs_exit: bool,
}

/// Applies the store's events to our processes (by pid; events observed
/// before `since_ms` are of an earlier process with that pid).
pub(super) fn apply_events(
    seen: &mut [Seen],
    by_pid: &HashMap<u32, usize>,
    exe: &Path,
    events: &[(String, ProcessEvent)],
    since_ms: u64,
) {
    for (collector, e) in events {
        if collector != ID || e.snapshot || e.observed_unix_ms + 1000 < since_ms {
            continue;
        }
        let Some(&i) = by_pid.get(&e.process.pid) else { continue };
        let s = &mut seen[i];
        let src = usize::from(e.source == EventSource::Poll);
        match e.kind {
            EventKind::Started | EventKind::Modified => {
                if e.kind == EventKind::Modified && !e.changes.contains(&Change::Exec) {
                    continue;
                }
                if e.kind == EventKind::Started {
                    s.started_rows += 1;
                }
                s.rows.push(format!(
                    "{} {} name={:?} start_time={} argv={:?} observed_ms={}",
                    e.kind,
                    e.source.as_str(),
                    e.process.name,
                    e.process.start_time,
                    e.process.details.argv.as_ref().map(|a| a.args.join(" ")),
                    e.observed_unix_ms
                ));
                s.started = true;
                s.start_src[src] = true;
                let d = &e.process.details;
                if let Ok(argv) = &d.argv
                    && !argv.truncated
                    && argv.args.len() == 2
                    && argv.args[1] == s.token
                {
                    s.argv_full = true;
                }
                if d.exe.as_ref().is_ok_and(|p| p == exe) {
                    s.exe_ok = true;
                }
            }
            EventKind::Stopped => {
                s.stopped = true;
                if e.exit == Some(daemoneye_platform::ExitStatus::Code(0)) {
                    s.exit_ok = true;
                }
            }
        }
    }
}

/// The tokens' records, and the pid map.
pub(super) fn tokens(prefix: &str, pids: &[Option<u32>]) -> (Vec<Seen>, HashMap<u32, usize>) {
    let mut seen = Vec::with_capacity(pids.len());
    let mut by_pid = HashMap::new();
    for (i, pid) in pids.iter().enumerate() {
        let Some(pid) = *pid else { continue };
        by_pid.insert(pid, seen.len());
        seen.push(Seen { pid, token: format!("{prefix}{i}"), ..Seen::default() });
    }
    (seen, by_pid)
}

/// Reads the store until every token has Started and Stopped, or nothing
/// of ours came for `quiet`, or `max` passed.
pub(super) fn collect(
    store: &mut Store,
    seen: &mut [Seen],
    by_pid: &HashMap<u32, usize>,
    exe: &Path,
    since_ms: u64,
    quiet: Duration,
    max: Duration,
) -> Duration {
    let t = Instant::now();
    let mut last_new = Instant::now();
    loop {
        let events = store.new_events();
        let before = seen.iter().filter(|s| s.started).count() + seen.iter().filter(|s| s.stopped).count();
        apply_events(seen, by_pid, exe, &events, since_ms);
        let after = seen.iter().filter(|s| s.started).count() + seen.iter().filter(|s| s.stopped).count();
        if after > before {
            last_new = Instant::now();
        }
        if after == 2 * seen.len() || last_new.elapsed() >= quiet || t.elapsed() >= max {
            return t.elapsed();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
