//! Continuity across restarts, with the real binary: procmond is SIGKILLed,
//! processes start and end while it is down, and after its restart those
//! get late Started and Stopped events while nothing it reported before is
//! sent again — through the WAL and the agent (actor mode) and through its
//! own SQLite store (standalone).
// The harness (support/) runs a broker, whose transport is Unix sockets.
#![cfg(unix)]

mod support;

use std::path::Path;
use std::process::{Child, Command};
use std::sync::atomic::Ordering;
use std::time::Duration;

use daemoneye_contract::event::{EventKind, ProcessEvent};
use daemoneye_store::{EventQuery, EventStore};
use support::{FakeAgent, Procmond, broker, rand_u64, socket_path, wait_until};

const T: Duration = Duration::from_secs(20);

/// A `sleep` with a unique argument, killed (by its own pid) on drop.
struct Sleeper(Child);

impl Sleeper {
    fn start(token: &str, n: u32) -> Sleeper {
        Sleeper(Command::new("sleep").arg(format!("{token}.{n}")).spawn().expect("sleep starts"))
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }

    fn end(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Sleeper {
    fn drop(&mut self) {
        self.end();
    }
}

fn events_of(store: &EventStore, pid: u32) -> Vec<ProcessEvent> {
    store
        .query(&EventQuery { pid: Some(pid), ..Default::default() })
        .unwrap_or_default()
        .into_iter()
        .filter(|e| e.event.process.name == "sleep")
        .map(|e| e.event)
        .collect()
}

fn count(events: &[ProcessEvent], kind: EventKind) -> usize {
    events.iter().filter(|e| e.kind == kind).count()
}

/// Runs the scenario; `store` reads what the collector delivered so far.
fn scenario(dir: &Path, start: &dyn Fn() -> Procmond, store: &dyn Fn() -> Option<EventStore>) {
    let token = format!("{}", 100_000 + rand_u64() % 800_000);
    let started = |pid: u32| store().is_some_and(|s| count(&events_of(&s, pid), EventKind::Started) >= 1);
    let stopped = |pid: u32| store().is_some_and(|s| count(&events_of(&s, pid), EventKind::Stopped) >= 1);

    let throughout = Sleeper::start(&token, 1);
    let mut ends_while_down = Sleeper::start(&token, 2);
    let mut pm = start();
    assert!(wait_until(T, || started(throughout.pid()) && started(ends_while_down.pid())), "{}", pm.log());
    // Reported after the first checkpoint: only the WAL (or store) holds it.
    let before_kill = Sleeper::start(&token, 3);
    assert!(wait_until(T, || started(before_kill.pid())), "{}", pm.log());
    assert!(dir.join("data/procmond-procmond.checkpoint").exists(), "a checkpoint was written");

    pm.kill();
    ends_while_down.end();
    let starts_while_down = Sleeper::start(&token, 4);
    let killed_at = procmond::actor::unix_ms();

    let pm = start();
    assert!(
        wait_until(T, || stopped(ends_while_down.pid()) && started(starts_while_down.pid())),
        "late events: {}",
        pm.log()
    );
    assert!(pm.log().contains("restored"), "{}", pm.log());
    let s = store().expect("store");
    let late_stop = events_of(&s, ends_while_down.pid());
    assert_eq!(count(&late_stop, EventKind::Stopped), 1, "{late_stop:?}");
    let stop = late_stop.iter().find(|e| e.kind == EventKind::Stopped).unwrap();
    let window = stop.late.expect("the stop is marked late");
    assert!(
        window.after_unix_ms <= killed_at && window.before_unix_ms >= killed_at,
        "{window:?} vs {killed_at}"
    );
    let late_start = events_of(&s, starts_while_down.pid());
    assert_eq!(count(&late_start, EventKind::Started), 1, "{late_start:?}");
    assert!(late_start[0].late.is_some() && !late_start[0].snapshot, "{late_start:?}");
    // Nothing reported before the crash is reported again.
    for (who, pid) in [("throughout", throughout.pid()), ("before_kill", before_kill.pid())] {
        let events = events_of(&s, pid);
        assert_eq!(count(&events, EventKind::Started), 1, "{who}: {events:?}");
        assert_eq!(count(&events, EventKind::Stopped), 0, "{who}: {events:?}");
    }
    assert!(
        s.query(&EventQuery::default()).unwrap().iter().filter(|e| e.event.snapshot).count()
            == s.query(&EventQuery::default())
                .unwrap()
                .iter()
                .filter(|e| e.event.snapshot && e.event.observed_unix_ms < killed_at)
                .count(),
        "no snapshot after the restart"
    );
}

#[test]
fn a_restart_reports_what_changed_while_down_late_through_the_wal_and_resends_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let socket = socket_path(dir.path());
    let _broker = broker(dir.path());
    let agent = FakeAgent::start(&socket, &dir.path().join("agent.db"));
    agent.begin_on_register.store(true, Ordering::SeqCst);
    let start = || Procmond::start(dir.path(), Some(&socket), &["--interval", "5"]);
    let store = agent.store.clone();
    let read = move || EventStore::open_read_only(store.lock().path()).ok();
    scenario(dir.path(), &start, &read);
    assert_eq!(agent.seen.lock().gaps.len(), 0, "no gaps");
}

#[test]
fn a_restart_reports_what_changed_while_down_late_in_standalone_mode() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("events.db");
    let start =
        || Procmond::start(dir.path(), None, &["--interval", "5", "--database", db.to_str().unwrap()]);
    let read = || EventStore::open_read_only(&db).ok();
    scenario(dir.path(), &start, &read);
}
