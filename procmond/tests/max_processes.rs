//! `--max-processes` under a fork flood: every cut walk is reported (a
//! Degraded heartbeat, the errors counter, a warning), a process started
//! after the flood is still reported Started, nothing that still runs is
//! reported Stopped, and what ends is, even while the cap leaves it out.
#![cfg(target_os = "linux")]

mod support;

use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use daemoneye_contract::control::{HealthStatus, Heartbeat};
use daemoneye_contract::event::{EventKind, ProcessEvent};
use daemoneye_store::{EventQuery, EventStore};
use support::{FakeAgent, Procmond, broker, rand_u64, socket_path, wait_until};

/// Walks come every 5 s: a few of them.
const T: Duration = Duration::from_secs(30);
const CAP: usize = 20;
const FLOOD: usize = 40;

/// A `sleep` with an argument no other process has, killed (by its pid)
/// and reaped on drop, so a failing test leaves none behind.
struct Sleeper(Child);

impl Sleeper {
    fn id(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Sleeper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sleeper(token: u64, n: usize) -> Sleeper {
    Sleeper(Command::new("sleep").arg(format!("{token}.{n}")).stdout(Stdio::null()).spawn().unwrap())
}

/// The start time of a live process, as the procfs backend records it.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(") ")?;
    if rest.starts_with('Z') {
        return None;
    }
    rest.split(' ').nth(19)?.parse().ok()
}

fn events(store: &parking_lot::Mutex<EventStore>, pid: Option<u32>, kind: EventKind) -> Vec<ProcessEvent> {
    store
        .lock()
        .query(&EventQuery { pid, kind: Some(kind), ..Default::default() })
        .unwrap()
        .into_iter()
        .map(|e| e.event)
        .collect()
}

/// Every Stopped event names a process that no longer runs.
fn assert_no_false_stop(store: &parking_lot::Mutex<EventStore>) {
    for e in events(store, None, EventKind::Stopped) {
        let p = &e.process;
        assert_ne!(
            start_time(p.pid),
            Some(p.start_time),
            "Stopped for pid {} ({}), which still runs",
            p.pid,
            p.name
        );
    }
}

fn heartbeat_after(agent: &FakeAgent, since: Instant) -> Heartbeat {
    let deadline = Instant::now() + T;
    loop {
        let hb = agent
            .heartbeats
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("heartbeat");
        if Instant::now() > since + Duration::from_millis(600) {
            return hb;
        }
    }
}

#[test]
fn a_fork_flood_over_the_cap_is_reported_hides_no_new_process_and_stops_nothing_alive() {
    let dir = tempfile::tempdir().unwrap();
    let token = 100_000 + rand_u64() % 800_000;
    let _broker = broker(dir.path());
    let agent = FakeAgent::start(&socket_path(dir.path()), &dir.path().join("agent.db"));
    let config = dir.path().join("procmond.yaml");
    std::fs::write(&config, "heartbeat_interval_ms: 300\n").unwrap();
    // Started before procmond: reported (or kept) from the first walks on.
    let sentinel = sleeper(token, 0);
    let cap = CAP.to_string();
    let mut pm = Procmond::start(
        dir.path(),
        Some(&socket_path(dir.path())),
        &[
            "--config",
            config.to_str().unwrap(),
            "--events",
            "poll",
            "--interval",
            "5",
            "--max-processes",
            &cap,
        ],
    );
    assert!(wait_until(T, || agent.registrations() == 1), "registered: {}", pm.log());
    agent.begin_monitoring();
    assert!(wait_until(T, || agent.stored.load(Ordering::SeqCst) > 0), "first walk: {}", pm.log());

    // The host already lists more than 20 processes: the walk is cut, and
    // said to be.
    let hb = heartbeat_after(&agent, Instant::now());
    assert_eq!(hb.status, HealthStatus::Degraded, "{hb:?}");
    assert!(hb.metrics.errors >= 1 && hb.metrics.processes_collected == CAP as u64, "{hb:?}");
    assert!(pm.log().contains("walk truncated"), "{}", pm.log());

    // The flood, then a newcomer.
    let mut flood: Vec<Sleeper> = (1..=FLOOD).map(|n| sleeper(token, n)).collect();
    std::thread::sleep(Duration::from_millis(50));
    let newcomer = sleeper(token, 999);
    let started = |pid: u32| !events(&agent.store, Some(pid), EventKind::Started).is_empty();
    assert!(
        wait_until(T, || started(newcomer.id())),
        "the process started after the flood is reported: {}",
        pm.log()
    );
    // New processes come first, the newest first: the whole flood is
    // reported within a few walks.
    assert!(wait_until(T, || flood.iter().all(|c| started(c.id()))), "the flood is reported in time");
    assert!(started(sentinel.id()), "the sentinel was reported");
    assert_no_false_stop(&agent.store);

    // A few end (reaped, so not zombies): Stopped, although the cap leaves
    // most reported processes out of each walk.
    let ended: Vec<u32> = flood
        .drain(..5)
        .map(|c| {
            let pid = c.id();
            drop(c); // killed and reaped
            pid
        })
        .collect();
    assert!(
        wait_until(T, || ended
            .iter()
            .all(|&pid| !events(&agent.store, Some(pid), EventKind::Stopped).is_empty())),
        "what ended is reported Stopped: {}",
        pm.log()
    );
    assert_no_false_stop(&agent.store);
    for c in flood.iter().chain([&newcomer, &sentinel]) {
        assert!(
            events(&agent.store, Some(c.id()), EventKind::Stopped).is_empty(),
            "pid {} still runs",
            c.id()
        );
    }
    // Every cut walk counted, and still Degraded.
    let h = agent.rpc("procmond", &daemoneye_contract::control::RpcRequest::HealthCheck, T).health.unwrap();
    assert!(h.errors >= h.cycles && h.cycles >= 3, "{h:?}");
    let hb = heartbeat_after(&agent, Instant::now());
    assert_eq!(hb.status, HealthStatus::Degraded, "{hb:?}");
    // Warned once, not once per walk (walks come every 5 s; at most one
    // warning a minute).
    assert_eq!(pm.log().matches("walk truncated").count(), 1, "{}", pm.log());

    pm.kill();
}
