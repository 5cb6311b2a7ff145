//! A hostile local client against a real agent: a probe in this test
//! process speaks the wire protocol as a process the broker admits (same
//! uid), and tries what a review found possible before protocol 5 — take
//! a collector's id in its restart window, a disabled collector's id or
//! the store's, forge acknowledgements and gaps, make the agent answer
//! onto control topics, hold collectors back with a Block subscriber that
//! never reads, lock others out with idle connections, pin memory with
//! half-sent frames. Each is refused or harmless, and meanwhile the good
//! events are stored exactly once.
//!
//! Status is read through `daemoneye-cli status --json` (its own process),
//! so the probe's connections never stand in its way.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use daemoneye_agent::api::{AgentState, AgentStatus, CollectorPhase, STORE_CLIENT_ID};
use daemoneye_bus::testing::RawConnection;
use daemoneye_bus::{ErrorCode, Frame, Mode, Overflow};
use daemoneye_contract::control::{self, StoreAck};
use daemoneye_tests::{
    CYCLE, CollectorDef, System, assert_exactly_once, bin, poll_status, signal, store_summary, wait_until,
    watermarks,
};
use nix::sys::signal::Signal;

/// What the broker answered.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Got {
    Welcome(String),
    Deliver { topic: String, from: String },
    PubAck(u64),
    Error(ErrorCode, String),
    Pong(u64),
    Other(String),
}

/// The owned copy of a received frame.
fn got(f: Frame<'_>) -> Got {
    match f {
        Frame::WelcomeAs { client_id, .. } => Got::Welcome(client_id.to_owned()),
        Frame::Deliver { topic, from, .. } => Got::Deliver { topic: topic.to_owned(), from: from.to_owned() },
        Frame::PubAck { ack_id } => Got::PubAck(ack_id),
        Frame::Error { code, message, .. } => Got::Error(code, message.to_owned()),
        Frame::Pong(n) => Got::Pong(n),
        other => Got::Other(format!("{other:?}")),
    }
}

/// One raw connection of the probe.
struct Raw(RawConnection);

impl Raw {
    fn connect(path: &Path) -> Option<Raw> {
        let r = RawConnection::connect(path).ok()?;
        // A broker that stops reading must not hang the probe.
        r.get_ref().set_write_timeout(Some(Duration::from_secs(5))).ok()?;
        Some(Raw(r))
    }

    /// Connects and says Hello as `id`; the broker's first answer.
    fn hello(path: &Path, id: &str) -> (Option<Raw>, Option<Got>) {
        let Some(mut r) = Raw::connect(path) else { return (None, None) };
        r.send(&Frame::Hello { protocol_version: daemoneye_bus::PROTOCOL_VERSION, client_id: id, pid: 1 });
        let got = r.0.recv(Duration::from_secs(5), got);
        (Some(r), got)
    }

    /// Welcomed under some id (the broker assigns the probe's).
    fn welcomed(path: &Path, id: &str) -> Option<(Raw, String)> {
        match Raw::hello(path, id) {
            (Some(r), Some(Got::Welcome(id))) => Some((r, id)),
            _ => None,
        }
    }

    /// A write error is left for the next receive to show.
    fn send(&mut self, f: &Frame<'_>) {
        let _ = self.0.send(f);
    }

    fn sub(&mut self, pattern: &str, overflow: Overflow) {
        self.send(&Frame::Subscribe { sid: 1, pattern, mode: Mode::Broadcast, overflow });
    }

    /// Everything answered before the Pong to a Ping sent now.
    fn sync(&mut self, n: u64) -> Vec<Got> {
        self.0
            .sync(n, Duration::from_secs(10), got)
            .unwrap_or_else(|before| panic!("no Pong {n}; got {before:?}"))
    }
}

/// The agent's status through `daemoneye-cli status --json`.
fn cli_status(sys: &System) -> Option<AgentStatus> {
    let out = sys.cli(&["status", "--json"]);
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

fn wait_cli_status(
    sys: &System,
    timeout: Duration,
    what: &str,
    pred: impl Fn(&AgentStatus) -> bool,
) -> AgentStatus {
    let (ok, last) = poll_status(timeout, || cli_status(sys), pred);
    assert!(ok, "{what}: not reached within {timeout:?}; last status {last:#?}\n{}", sys.tail());
    last.expect("status")
}

/// The collector's WAL watermark (what it has truncated through).
fn wal_watermark(sys: &System, id: &str) -> u64 {
    let path = sys.data_dir().join("collectors").join(id).join("wal").join(id).join("WATERMARK");
    // magic (8) | seq (u64 LE) | crc32c (4): see wal/src/format.rs.
    std::fs::read(&path)
        .ok()
        .and_then(|b| b.get(8..16).map(|s| u64::from_le_bytes(s.try_into().unwrap_or([0; 8]))))
        .unwrap_or(0)
}

/// The agent's resident memory, KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// A few short-lived processes, so the collectors have events to send.
fn churn(n: usize) {
    for _ in 0..n {
        let _ = Command::new("true").stdin(Stdio::null()).status();
    }
}

fn steady(collectors: &[CollectorDef], extra: &str) -> System {
    let sys = System::start(collectors, extra);
    wait_cli_status(&sys, Duration::from_secs(40), "SteadyState", |s| {
        s.state == AgentState::SteadyState
            && s.collectors.iter().filter(|c| c.pid.is_some()).all(|c| c.registered)
    });
    sys
}

#[test]
fn ids_the_broker_cannot_prove_are_refused_even_in_a_restart_window() {
    // pm-off is configured but disabled: nobody holds its id.
    let disabled = format!("  - id: pm-off\n    binary: {}\n    enabled: false\n", bin("procmond").display());
    let sys = steady(&[CollectorDef::procmond("pm-a")], &disabled);
    let socket = sys.socket();
    for id in ["pm-off", STORE_CLIENT_ID, "daemoneye-agent", "daemoneye-agent-tasks", "pm-a"] {
        match Raw::hello(&socket, id).1 {
            Some(Got::Error(ErrorCode::Unproven, m)) => assert!(m.contains(id), "{m}"),
            other => panic!("{id} from the probe: {other:?}\n{}", sys.tail()),
        }
    }
    assert_exactly_once(&sys, &["pm-a"]);

    // SIGKILL the collector, and spam Hellos as pm-a through its restart
    // window (1 s backoff) until it is back.
    let status = cli_status(&sys).expect("status");
    let pid = status.collectors.iter().find(|c| c.id == "pm-a").and_then(|c| c.pid).expect("pm-a pid");
    let stop = Arc::new(AtomicBool::new(false));
    let (tries, welcomed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let spam = {
        let (stop, tries, welcomed, socket) = (stop.clone(), tries.clone(), welcomed.clone(), socket.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Acquire) {
                match Raw::hello(&socket, "pm-a").1 {
                    Some(Got::Welcome(id)) if id == "pm-a" => {
                        welcomed.fetch_add(1, Ordering::AcqRel);
                    }
                    _ => {}
                }
                tries.fetch_add(1, Ordering::AcqRel);
            }
        })
    };
    wait_until(Duration::from_secs(5), || tries.load(Ordering::Acquire) >= 10);
    signal(pid, Signal::SIGKILL);
    let back = wait_cli_status(&sys, Duration::from_secs(40), "pm-a restarted and registered", |s| {
        s.collectors
            .iter()
            .any(|c| c.id == "pm-a" && c.restarts >= 1 && c.registered && c.pid.is_some_and(|p| p != pid))
    });
    stop.store(true, Ordering::Release);
    spam.join().expect("spam thread");
    assert!(tries.load(Ordering::Acquire) > 10, "the probe tried: {}", tries.load(Ordering::Acquire));
    assert_eq!(welcomed.load(Ordering::Acquire), 0, "the probe was welcomed as pm-a");
    let c = back.collectors.iter().find(|c| c.id == "pm-a").expect("pm-a");
    assert_eq!(c.phase, CollectorPhase::Running, "{back:#?}");
    let log = sys.log();
    assert!(log.contains("is reserved for the process its supervisor started"), "{}", sys.tail());
    assert_exactly_once(&sys, &["pm-a"]);
}

#[test]
fn forged_acks_gaps_and_replies_onto_control_topics_change_nothing() {
    let sys = steady(&[CollectorDef::procmond("pm-a")], "");
    let socket = sys.socket();
    assert_exactly_once(&sys, &["pm-a"]);
    let (mut probe, probe_id) = Raw::welcomed(&socket, "probe").expect("the probe gets an assigned id");
    assert!(probe_id.starts_with("bus-") && probe_id.ends_with("-probe"), "{probe_id}");
    // It may follow alerts: an answer forged onto events.alert would show.
    let (mut watcher, _) = Raw::welcomed(&socket, "watcher").expect("watcher");
    watcher.sub("events.alert", Overflow::DropNewest);
    assert!(
        watcher.sync(1).iter().all(|g| matches!(g, Got::Deliver { from, .. } if from == STORE_CLIENT_ID))
    );

    let stored_before = watermarks(&sys.database()).iter().find(|(c, _)| c == "pm-a").map_or(0, |w| w.1);
    let ack = control::encode(&StoreAck { stream_id: 1, through: 1 << 62 });
    let gap = daemoneye_contract::event::StreamGap {
        collector_id: "pm-a".into(),
        stream_id: 1,
        from: 1,
        to: 1 << 62,
        reason: "forged".into(),
        position: None,
    };
    probe.send(&Frame::Publish {
        topic: &control::ack_topic("pm-a"),
        payload: &ack,
        reply_to: None,
        ack_id: Some(1),
    });
    probe.send(&Frame::Publish {
        topic: daemoneye_contract::event::GAP_TOPIC,
        payload: &gap.encode(),
        reply_to: None,
        ack_id: Some(2),
    });
    probe.send(&Frame::Publish {
        topic: "events.process.started",
        payload: b"forged",
        reply_to: None,
        ack_id: Some(3),
    });
    // The agent's privileged client must not answer onto control topics.
    for (n, to) in [(4, control::LIFECYCLE_TOPIC), (5, "events.alert"), (6, "control.collector.pm-a")] {
        probe.send(&Frame::Publish {
            topic: "agent.status",
            payload: b"",
            reply_to: Some(to),
            ack_id: Some(n),
        });
    }
    probe.send(&Frame::Request {
        topic: "agent.status",
        payload: b"",
        reply_to: control::LIFECYCLE_TOPIC,
        strategy: None,
    });
    let got = probe.sync(7);
    let refused = got.iter().filter(|g| matches!(g, Got::Error(ErrorCode::Forbidden, _))).count();
    assert_eq!(refused, 7, "{got:?}");
    assert!(!got.iter().any(|g| matches!(g, Got::PubAck(_))), "{got:?}");
    // The store's own alerts may come (built-in rules on a busy host):
    // anything else there was forged.
    let forged: Vec<Got> = watcher
        .sync(2)
        .into_iter()
        .filter(|g| !matches!(g, Got::Deliver { from, .. } if from == STORE_CLIENT_ID))
        .collect();
    assert_eq!(forged, Vec::new(), "nothing but the store's alerts reached events.alert");

    // Good events go on, stored exactly once; the collector's WAL was
    // never truncated past what the store holds.
    churn(20);
    let db = sys.database();
    assert!(
        wait_until(CYCLE, || watermarks(&db).iter().any(|(c, t)| c == "pm-a" && *t > stored_before)),
        "no events after the forgeries\n{}",
        sys.tail()
    );
    assert_exactly_once(&sys, &["pm-a"]);
    let stored = watermarks(&db).iter().find(|(c, _)| c == "pm-a").map_or(0, |w| w.1);
    assert!(wal_watermark(&sys, "pm-a") <= stored as u64, "WAL truncated past the store");
    let status = cli_status(&sys).expect("status");
    assert!(status.collectors.iter().all(|c| c.restarts == 0 && c.escalation.is_empty()), "{status:#?}");
}

#[test]
fn a_non_reading_block_subscriber_holds_no_collector_back() {
    // A small queue limit, so the stalled subscribers' queues fill with
    // what the collectors send (a Block honoured for them would then hold
    // the collectors' connections, heartbeats included).
    let sys = steady(
        &[CollectorDef::procmond("pm-a"), CollectorDef::procmond("pm-b")],
        "bus: {queue_limit_mib: 1}\n",
    );
    let socket = sys.socket();
    assert_exactly_once(&sys, &["pm-a", "pm-b"]);
    let before = store_summary(&sys.database());
    // A new Block subscriber on events.# every 3 s, none of them reading,
    // while processes come and go.
    let mut stalled = Vec::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(15) {
        if let Some((mut r, _)) = Raw::welcomed(&socket, "stall") {
            r.sub("events.#", Overflow::Block);
            stalled.push(r);
        }
        let round = Instant::now();
        while round.elapsed() < Duration::from_secs(3) {
            churn(10);
        }
    }
    // Heartbeats kept coming: nobody missed three, nobody was escalated or
    // restarted.
    let status = cli_status(&sys).expect("status");
    // Their queues did fill: what they could not take was dropped, not
    // held against the publishers.
    assert!(status.broker.dropped > 0, "{:?}", status.broker);
    for c in &status.collectors {
        assert!(c.registered && c.restarts == 0 && c.escalation.is_empty(), "{status:#?}\n{}", sys.tail());
        assert_eq!(c.phase, CollectorPhase::Running, "{status:#?}");
    }
    // And events flowed meanwhile, exactly once.
    let db = sys.database();
    assert!(
        wait_until(CYCLE, || {
            let now = store_summary(&db);
            ["pm-a", "pm-b"].iter().all(|id| {
                let n = |s: &[(String, i64, bool)]| s.iter().find(|(c, _, _)| c == id).map_or(0, |s| s.1);
                n(&now) > n(&before)
            })
        }),
        "no events stored behind the stalled subscribers\n{}",
        sys.tail()
    );
    assert_exactly_once(&sys, &["pm-a", "pm-b"]);
    drop(stalled);
}

#[test]
fn idle_connections_and_half_sent_frames_neither_lock_out_nor_bloat_the_agent() {
    let sys = steady(&[CollectorDef::procmond("pm-a")], "bus: {frame_timeout_secs: 2}\n");
    let socket = sys.socket();
    assert_exactly_once(&sys, &["pm-a"]);
    let agent = sys.agent_pid();

    // 250 idle connections: the broker holds the probe to its per-process
    // cap (16) and refuses the rest at once.
    let mut idle = Vec::new();
    let mut refused = 0;
    for _ in 0..250 {
        match Raw::hello(&socket, "idle") {
            (Some(r), Some(Got::Welcome(_))) => idle.push(r),
            (_, Some(Got::Error(ErrorCode::Limit, _)) | None) => refused += 1,
            (_, other) => panic!("idle connection: {other:?}"),
        }
    }
    assert_eq!(idle.len(), 16, "held: {} refused: {refused}", idle.len());
    // The CLI still gets in, and so does a restarting collector.
    let out = sys.cli(&["status"]);
    assert!(out.status.success(), "cli status: {}\n{}", String::from_utf8_lossy(&out.stderr), sys.tail());
    let pid = cli_status(&sys).and_then(|s| s.collectors[0].pid).expect("pm-a pid");
    signal(pid, Signal::SIGKILL);
    wait_cli_status(&sys, Duration::from_secs(40), "pm-a restarted and registered", |s| {
        s.collectors[0].restarts >= 1
            && s.collectors[0].registered
            && s.collectors[0].pid.is_some_and(|p| p != pid)
    });
    drop(idle);

    // Half-sent frames: 16 MiB ones are refused from their length prefix
    // (1 MiB for a client the broker cannot prove), and those within the
    // limit are cut after bus.frame_timeout_secs; the agent's memory does
    // not follow what the probe claims to send.
    let rss_before = rss_kib(agent);
    let mut cut = 0;
    for round in 0..4 {
        let mut half = Vec::new();
        for _ in 0..16 {
            // Retried while the broker has not yet seen the last round's
            // connections close (the per-process cap).
            let mut r = None;
            wait_until(Duration::from_secs(10), || {
                r = Raw::welcomed(&socket, "half").map(|(r, _)| r);
                r.is_some()
            });
            let mut r = r.expect("a connection within the per-process cap");
            // Not idle: it subscribed.
            r.sub("events.#", Overflow::DropOldest);
            let len: u32 = if round % 2 == 0 { 16 << 20 } else { (1 << 20) - 16 };
            let _ = r.0.get_mut().write_all(&len.to_le_bytes());
            let _ = r.0.get_mut().write_all(&vec![0xa5u8; 512 << 10]);
            half.push(r);
        }
        for r in &mut half {
            if r.0.closed_within(Duration::from_secs(10)) {
                cut += 1;
            }
        }
    }
    assert_eq!(cut, 64, "every half-sent frame was cut\n{}", sys.tail());
    let grown = rss_kib(agent).saturating_sub(rss_before);
    // The probe offered 64 × 16 MiB (half of them as 16 MiB frames).
    assert!(grown < 64 << 10, "the agent grew by {grown} KiB\n{}", sys.tail());
    let log = sys.log();
    assert!(log.contains("a frame was left half-sent"), "{}", sys.tail());
    assert!(log.contains("exceeds the maximum of 1048576"), "{}", sys.tail());
    assert_exactly_once(&sys, &["pm-a"]);
}
