//! The procmond binary end to end: actor mode against a real broker and a
//! fake agent (registration, BeginMonitoring gating, heartbeats, RPC,
//! graceful shutdown), SIGKILL at random moments with nothing lost or
//! doubled (also across a broker outage), standalone mode into SQLite, and
//! the command line's refusals.
// The harness (support/) runs a broker, whose transport is Unix sockets.
#![cfg(unix)]

mod support;

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use daemoneye_bus::{Client, ClientConfig};
use daemoneye_contract::control::{self, CollectorState, RegistrationMessage, RpcRequest, RpcStatus};
use daemoneye_contract::event::EventKind;
use daemoneye_store::{EventQuery, EventStore};
use procmond::config::ConfigUpdate;
use support::{FakeAgent, Procmond, broker, rand_u64, socket_path, wait_until};

const T: Duration = Duration::from_secs(10);

fn write_config(dir: &Path, text: &str) -> String {
    let path = dir.join("procmond.yaml");
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

/// Every sequence number of the collector's stream is in the store once,
/// from 1 to the last one its WAL assigned: nothing lost, nothing doubled.
fn assert_exactly_once(store: &EventStore, wal_dir: &Path) -> u64 {
    let survey = daemoneye_wal::inspect(wal_dir).unwrap();
    let last = survey.next_seq - 1;
    let rows: Vec<(i64, i64)> = store
        .connection()
        .prepare("SELECT stream_id, seq FROM process_events WHERE collector_id = 'procmond' ORDER BY seq")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let streams: std::collections::BTreeSet<i64> = rows.iter().map(|r| r.0).collect();
    assert_eq!(streams.len(), 1, "one stream: {streams:?}");
    let seqs: Vec<u64> = rows.iter().map(|r| r.1 as u64).collect();
    let expected: Vec<u64> = (1..=last).collect();
    if seqs != expected {
        let missing: Vec<u64> = expected.iter().filter(|s| !seqs.contains(s)).copied().take(20).collect();
        panic!("store has {} rows for {last} events; missing (first 20): {missing:?}", seqs.len());
    }
    last
}

#[test]
fn actor_mode_registers_waits_collects_heartbeats_answers_rpc_and_shuts_down() {
    let dir = tempfile::tempdir().unwrap();
    let _broker = broker(dir.path());
    let agent = FakeAgent::start(&socket_path(dir.path()), &dir.path().join("agent.db"));
    let config = write_config(dir.path(), "heartbeat_interval_ms: 300\n");
    let mut pm = Procmond::start(dir.path(), Some(&socket_path(dir.path())), &["--config", &config]);

    // Registers, then waits: nothing collected before BeginMonitoring.
    assert!(wait_until(T, || agent.registrations() == 1), "registered: {}", pm.log());
    match &agent.seen.lock().registrations[0] {
        RegistrationMessage::Register(r) => {
            assert_eq!((r.collector_id.as_str(), r.collector_type.as_str()), ("procmond", "process-monitor"));
            assert_eq!(r.pid, pm.child.id());
            assert!(r.capabilities.iter().any(|c| c.starts_with("backend:")), "{:?}", r.capabilities);
        }
        other => panic!("{other:?}"),
    }
    let h = agent.rpc("procmond", &RpcRequest::HealthCheck, T).health.unwrap();
    assert_eq!((h.state, h.cycles, h.events), (CollectorState::WaitingForAgent, 0, 0));
    // A heartbeat after registration: procmond has been up and waiting.
    let hb = agent.heartbeats.recv_timeout(T).expect("a heartbeat while waiting");
    assert_eq!((hb.metrics.cycles, hb.metrics.events_published), (0, 0), "{hb:?}");
    assert_eq!(agent.stored.load(Ordering::SeqCst), 0, "nothing published before BeginMonitoring");

    agent.begin_monitoring();
    assert!(wait_until(T, || agent.stored.load(Ordering::SeqCst) > 0), "snapshot stored: {}", pm.log());
    let h = agent.rpc("procmond", &RpcRequest::HealthCheck, T).health.unwrap();
    assert_eq!(h.state, CollectorState::Running);
    assert!(h.cycles >= 1 && h.processes > 0 && h.events > 0, "{h:?}");

    // Heartbeats: rising sequence numbers, real counts.
    // Heartbeats queued while the steps above ran arrive at once: skip them.
    while agent.heartbeats.try_recv().is_ok() {}
    let mut beats = Vec::new();
    let deadline = Instant::now() + T;
    while beats.len() < 4 && Instant::now() < deadline {
        if let Ok(hb) = agent.heartbeats.recv_timeout(Duration::from_millis(500)) {
            beats.push(hb);
        }
    }
    assert_eq!(beats.len(), 4, "4 heartbeats within {T:?}");
    for pair in beats.windows(2) {
        assert_eq!(pair[1].sequence, pair[0].sequence + 1);
    }
    let last = &beats[3];
    assert!(last.metrics.processes_collected > 0 && last.metrics.events_published > 0, "{last:?}");
    // Configured every 300 ms: the mean spacing of 3 intervals stays near
    // it (loose bounds: a loaded CI machine delays threads).
    let mean = Duration::from_millis((beats[3].timestamp_unix_ms - beats[0].timestamp_unix_ms) / 3);
    assert!(
        mean >= Duration::from_millis(150) && mean <= Duration::from_millis(1000),
        "mean interval {mean:?}"
    );

    // RPC: config refusals with reasons, a valid update, malformed input.
    let bad = agent.rpc(
        "procmond",
        &RpcRequest::UpdateConfig(ConfigUpdate { interval_secs: Some(1), ..Default::default() }),
        T,
    );
    assert_eq!(bad.status, RpcStatus::InvalidRequest);
    assert!(bad.message.as_deref().unwrap_or("").contains("5..=3600"), "{bad:?}");
    let restart = ConfigUpdate { collector_id: Some("other".into()), ..Default::default() };
    let bad = agent.rpc("procmond", &RpcRequest::UpdateConfig(restart), T);
    assert_eq!(bad.status, RpcStatus::InvalidRequest);
    assert!(bad.message.as_deref().unwrap_or("").contains("restart"), "{bad:?}");
    let ok = agent.rpc(
        "procmond",
        &RpcRequest::UpdateConfig(ConfigUpdate { interval_secs: Some(10), ..Default::default() }),
        T,
    );
    assert_eq!(ok.status, RpcStatus::Ok);
    let garbage = agent.client.request("control.collector.procmond", &[0xff, 0xff, 0xff, 0x07], T).unwrap();
    let garbage: daemoneye_contract::control::RpcResponse =
        daemoneye_contract::control::decode(&garbage.payload).unwrap();
    assert_eq!(garbage.status, RpcStatus::InvalidRequest);
    assert_eq!(agent.rpc("procmond", &RpcRequest::HealthCheck, T).status, RpcStatus::Ok, "still serving");

    // Graceful shutdown: reply Ok, deregistration, exit 0, everything delivered.
    let bye = agent.rpc("procmond", &RpcRequest::GracefulShutdown, Duration::from_secs(30));
    assert_eq!(bye.status, RpcStatus::Ok, "{bye:?}");
    let status = pm.wait_exit(T).expect("procmond exits");
    assert_eq!(status.code(), Some(0), "{}", pm.log());
    assert_eq!(agent.deregistrations(), 1);
    let wal_dir = dir.path().join("data/wal/procmond");
    let report = daemoneye_wal::inspect(&wal_dir).unwrap();
    assert!(report.is_healthy() && report.torn_tail.is_none(), "{report}");
    assert!(wait_until(T, || agent.stored.load(Ordering::SeqCst) == report.next_seq - 1));
    assert_exactly_once(&agent.store.lock(), &wal_dir);
}

/// Starts and reaps short-lived processes until dropped, so every
/// procmond cycle sees starts and stops.
struct Churn {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Churn {
    fn start() -> Churn {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut live: Vec<Child> = Vec::new();
            while !flag.load(Ordering::SeqCst) {
                live.push(Command::new("sleep").arg("0.7").stdout(Stdio::null()).spawn().unwrap());
                live.retain_mut(|c| c.try_wait().ok().flatten().is_none());
                std::thread::sleep(Duration::from_millis(100));
            }
            for mut c in live {
                let _ = c.kill();
                let _ = c.wait();
            }
        });
        Churn { stop, thread: Some(thread) }
    }
}

impl Drop for Churn {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn sigkill_at_random_moments_loses_nothing_and_doubles_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let socket = socket_path(dir.path());
    let mut the_broker = Some(broker(dir.path()));
    let agent = FakeAgent::start(&socket, &dir.path().join("agent.db"));
    agent.begin_on_register.store(true, Ordering::SeqCst);
    let _churn = Churn::start();
    let config = write_config(dir.path(), "heartbeat_interval_ms: 200\n");
    let args = ["--config", config.as_str(), "--interval", "5"];

    let kills = 15;
    for round in 0..kills {
        let mut pm = Procmond::start(dir.path(), Some(&socket), &args);
        // Kill anywhere from before registration to mid-publish.
        let wait = Duration::from_millis(50 + rand_u64() % 1200);
        std::thread::sleep(wait);
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pm.child.id() as i32),
            nix::sys::signal::SIGKILL,
        );
        let status = pm.wait_exit(T).expect("killed procmond is reaped");
        assert!(status.code().is_none(), "round {round}: exited by itself: {}", pm.log());
    }

    // A broker outage while procmond runs: events made meanwhile wait in
    // its WAL and arrive after the broker is back.
    let mut pm = Procmond::start(dir.path(), Some(&socket), &args);
    let before = agent.stored.load(Ordering::SeqCst);
    let cycles = |pm: &Procmond| pm.log().matches("procmond::actor::cycle] cycle ").count();
    // Its own first cycle, not only the previous runs' WAL replayed before
    // it registered: stopping the broker before the agent's "begin" would
    // leave it waiting, with no cycle to run during the outage.
    assert!(
        wait_until(T, || cycles(&pm) >= 1 && agent.stored.load(Ordering::SeqCst) > before),
        "snapshot stored: {}",
        pm.log()
    );
    let cycles_before = cycles(&pm);
    the_broker.take().unwrap().shutdown();
    // One cycle (every 5 s) runs with the broker down.
    assert!(wait_until(Duration::from_secs(15), || cycles(&pm) > cycles_before), "a cycle ran: {}", pm.log());
    let _broker = broker(dir.path());
    let stored_at_return = agent.stored.load(Ordering::SeqCst);
    assert!(
        wait_until(Duration::from_secs(20), || agent.stored.load(Ordering::SeqCst) > stored_at_return),
        "replayed after the outage: {}",
        pm.log()
    );
    // And one more kill after the outage.
    pm.kill();

    // A last run, stopped gracefully; then everything must be there once.
    let mut pm = Procmond::start(dir.path(), Some(&socket), &args);
    assert!(wait_until(T, || agent.rpc_ok("procmond")), "last run answers: {}", pm.log());
    let bye = agent.rpc("procmond", &RpcRequest::GracefulShutdown, Duration::from_secs(30));
    assert_eq!(bye.status, RpcStatus::Ok);
    assert_eq!(pm.wait_exit(T).and_then(|s| s.code()), Some(0), "{}", pm.log());
    let wal_dir = dir.path().join("data/wal/procmond");
    let last = daemoneye_wal::inspect(&wal_dir).unwrap().next_seq - 1;
    assert!(
        wait_until(Duration::from_secs(20), || agent.stored.load(Ordering::SeqCst) == last),
        "stored {} of {last}",
        agent.stored.load(Ordering::SeqCst)
    );
    let total = assert_exactly_once(&agent.store.lock(), &wal_dir);
    let seen = agent.seen.lock();
    eprintln!(
        "{kills} kills + outage: {total} events stored exactly once; {} received ({} duplicates dropped by the store)",
        seen.events_received, seen.duplicates
    );
    // Stops were published too.
    let stops = agent
        .store
        .lock()
        .query(&EventQuery { kind: Some(EventKind::Stopped), ..Default::default() })
        .unwrap();
    assert!(!stops.is_empty(), "stop events stored");
}

#[test]
fn standalone_mode_writes_events_to_sqlite_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("events.db");
    let token = format!("{}", 100_000 + rand_u64() % 800_000);
    let mut before = Command::new("sleep").arg(format!("{token}.5")).spawn().unwrap();
    let mut pm = Procmond::start(dir.path(), None, &["--database", db.to_str().unwrap(), "--interval", "5"]);
    let found = |pid: u32, snapshot: bool| {
        EventStore::open_read_only(&db).ok().is_some_and(|s| {
            s.query(&EventQuery { pid: Some(pid), kind: Some(EventKind::Started), ..Default::default() })
                .unwrap_or_default()
                .iter()
                .any(|e| e.event.snapshot == snapshot && e.event.process.name == "sleep")
        })
    };
    assert!(wait_until(T, || found(before.id(), true)), "snapshot has the earlier sleep: {}", pm.log());
    let child = Command::new("sleep").arg(format!("{token}.25")).spawn().unwrap();
    let pid = child.id();
    let mut after = Some(child);
    assert!(
        wait_until(Duration::from_secs(15), || found(pid, false)),
        "the next cycle saw the new sleep: {}",
        pm.log()
    );
    // Its command line is stored too.
    let store = EventStore::open_read_only(&db).unwrap();
    let ev = store.query(&EventQuery { pid: Some(pid), ..Default::default() }).unwrap();
    let argv = ev[0].event.process.details.argv.clone().unwrap().args;
    assert_eq!(argv, vec!["sleep".to_owned(), format!("{token}.25")]);

    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pm.child.id() as i32), nix::sys::signal::SIGTERM)
        .unwrap();
    assert_eq!(pm.wait_exit(T).and_then(|s| s.code()), Some(0), "{}", pm.log());
    for c in [Some(&mut before), after.as_mut()].into_iter().flatten() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

#[test]
fn a_second_procmond_with_the_same_id_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("events.db");
    let args = ["--database", db.to_str().unwrap()];
    let first = Procmond::start(dir.path(), None, &args);
    assert!(wait_until(T, || dir.path().join("data/procmond-procmond.pid").exists() && db.exists()));
    let mut second = Procmond::start(dir.path(), None, &args);
    assert_eq!(second.wait_exit(T).and_then(|s| s.code()), Some(1));
    assert!(
        second.log().contains("another procmond with collector id \"procmond\" is running"),
        "{}",
        second.log()
    );
    drop(first);
}

#[test]
fn the_command_line_refuses_bad_values_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&[&str], &str); 7] = [
        (&["--interval", "4"], "4 is out of range 5..=3600 seconds"),
        (&["--interval", "3601"], "out of range 5..=3600"),
        (&["--interval", "soon"], "not a whole number"),
        (&["--format", "xml"], "invalid value 'xml'"),
        (&["--log-level", "loud"], "not one of error"),
        (&["--collector-id", "Bad Id"], "collector_id"),
        (&["--config", "/nonexistent/procmond.yaml"], "/nonexistent/procmond.yaml"),
    ];
    for (args, message) in cases {
        let out = Command::new(env!("CARGO_BIN_EXE_procmond"))
            .arg("--data-dir")
            .arg(dir.path())
            .args(args)
            .env_remove("DAEMONEYE_BROKER_SOCKET")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} accepted");
        assert!(stderr.contains(message), "{args:?}: {stderr}");
    }
    let bad_yaml = write_config(dir.path(), "interval_secs: 10\nbogus_key: 1\n");
    let out = Command::new(env!("CARGO_BIN_EXE_procmond"))
        .args(["--data-dir", dir.path().to_str().unwrap(), "--config", &bad_yaml])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("bogus_key"));
}

#[test]
fn foreground_prints_one_readable_line_or_json_object_per_event() {
    let dir = tempfile::tempdir().unwrap();
    let token = format!("{}", 100_000 + rand_u64() % 800_000);
    let mut marker = Command::new("sleep").arg(format!("{token}.5")).spawn().unwrap();
    let pid = marker.id();
    for (format, check) in [("human", true), ("json", false)] {
        let db = dir.path().join(format!("{format}.db"));
        let pm = Procmond::start(
            dir.path(),
            None,
            &[
                "--foreground",
                "--format",
                format,
                "--database",
                db.to_str().unwrap(),
                "--collector-id",
                format,
            ],
        );
        assert!(wait_until(T, || pm.stdout().contains(&token)), "{format}: {}", pm.log());
        let out = pm.stdout();
        let line = out.lines().find(|l| l.contains(&token)).unwrap();
        if check {
            assert!(line.contains("started(snapshot)") && line.contains(&format!("pid={pid} ")), "{line}");
            assert!(line.contains("name=\"sleep\""), "{line}");
        } else {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(v["event"]["action"], "started");
            assert_eq!(v["process"]["pid"], pid);
            assert_eq!(v["daemoneye"]["collector_id"], "json");
            // Every line is one JSON object.
            for l in out.lines() {
                serde_json::from_str::<serde_json::Value>(l).unwrap();
            }
        }
    }
    let _ = marker.kill();
    let _ = marker.wait();
}

#[test]
fn a_command_line_cut_at_32_kib_keeps_no_part_of_the_secret_it_cut() {
    let dir = tempfile::tempdir().unwrap();
    let token = format!("cut{}", rand_u64());
    // `sh -c 'sleep 600; :' <filler> <url>`: the cmdline is cut at 32,768
    // bytes, 17 bytes into the URL, after "https://alice:s3c".
    let script = "sleep 600; :";
    let head = "sh\0-c\0".len() + script.len() + 1;
    let filler = format!("{token}{}", "x".repeat(32_768 - 17 - 1 - head - token.len()));
    let url = "https://alice:s3cretpassword@example.com/repo.git";
    // In its own process group, killed whole: `sleep` is sh's child, and
    // an orphaned one would hold the test's stdout (cargo's pipe) open.
    let mut child = Command::new("sh")
        .args(["-c", script, &filler, url])
        .process_group(0)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pm =
        Procmond::start(dir.path(), None, &["--foreground", "--format", "json", "--collector-id", "cut"]);
    let seen = wait_until(T, || pm.stdout().lines().any(|l| l.contains(&token)));
    let group = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::killpg(group, nix::sys::signal::SIGKILL);
    let _ = child.wait();
    assert!(seen, "{}", pm.log());
    let out = pm.stdout();
    let line = out.lines().find(|l| l.contains(&token)).unwrap();
    assert!(!line.contains("s3c") && !line.contains("alice:"), "a prefix of the password leaked");
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(v["daemoneye"]["process"]["args_truncated"], true, "{v}");
    let args: Vec<&str> =
        v["process"]["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    assert_eq!(args, ["sh", "-c", script, filler.as_str(), procmond::sanitize::REDACTED]);
}

#[test]
fn without_a_broker_it_retries_says_so_and_registers_once_one_appears() {
    let dir = tempfile::tempdir().unwrap();
    let socket = socket_path(dir.path());
    let pm = Procmond::start(dir.path(), Some(&socket), &[]);
    assert!(wait_until(T, || pm.log().contains("broker unreachable")), "{}", pm.log());
    let _broker = broker(dir.path());
    let agent = FakeAgent::start(&socket, &dir.path().join("agent.db"));
    assert!(wait_until(Duration::from_secs(20), || agent.registrations() >= 1), "{}", pm.log());
    let h = agent.rpc("procmond", &RpcRequest::HealthCheck, T).health.unwrap();
    assert_eq!(h.connection, daemoneye_contract::control::ConnectionStatus::Connected);
    assert_eq!(h.registration, daemoneye_contract::control::RegistrationState::Registered);
    assert!(pm.log().contains("broker reachable again"), "{}", pm.log());
}

#[test]
fn a_second_signal_exits_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let socket = socket_path(dir.path());
    let the_broker = broker(dir.path());
    let agent = FakeAgent::start(&socket, &dir.path().join("agent.db"));
    let mut pm = Procmond::start(dir.path(), Some(&socket), &[]);
    assert!(wait_until(T, || agent.registrations() == 1), "{}", pm.log());
    // The agent is replaced by a subscriber that never answers, so the
    // graceful shutdown waits for a deregistration reply that never comes
    // (up to 3 s; with no subscriber at all it would fail at once)...
    let silent = Client::connect(ClientConfig::new(&socket, "silent")).unwrap();
    assert!(silent.wait_connected(T), "silent connects");
    let _registrations = silent.subscribe(control::REGISTRATION_TOPIC).unwrap();
    // The broker reads a connection's frames in order: once it has
    // answered this, the subscription is in place.
    let conns = silent.broker_stats(T).expect("stats").connections;
    drop(agent);
    // Its two clients: control, and the store's acknowledgements.
    assert!(wait_until(T, || the_broker.stats().connections == conns - 2), "the agent leaves");
    let pid = nix::unistd::Pid::from_raw(pm.child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::SIGTERM).unwrap();
    assert!(wait_until(T, || pm.log().contains("shutting down: SIGTERM")), "{}", pm.log());
    // ...and a second signal cuts it short.
    let sent = Instant::now();
    nix::sys::signal::kill(pid, nix::sys::signal::SIGINT).unwrap();
    let status = pm.wait_exit(T).expect("exits");
    assert!(sent.elapsed() < Duration::from_millis(1500), "took {:?}", sent.elapsed());
    assert_eq!(status.code(), Some(130), "128 + SIGINT: {}", pm.log());
    assert!(pm.log().contains("second SIGINT: exiting now"), "{}", pm.log());
}

#[test]
fn a_thread_that_dies_stops_procmond_with_status_1_naming_it() {
    // Kernel events need root (CAP_NET_ADMIN), as in CI.
    let threads = [
        ("procmond-flush", "auto"),
        ("procmond-rpc", "auto"),
        ("procmond-tasks", "auto"),
        ("procmond-registration", "auto"),
        ("procmond-signals", "auto"),
        ("procmond-kernel", "kernel"),
    ];
    for (thread, events) in threads {
        let dir = tempfile::tempdir().unwrap();
        let socket = socket_path(dir.path());
        let _broker = broker(dir.path());
        let _agent = FakeAgent::start(&socket, &dir.path().join("agent.db"));
        let mut pm = Procmond::start_with_env(
            dir.path(),
            Some(&socket),
            &["--events", events],
            &[("DAEMONEYE_TEST_PANIC", thread)],
        );
        let status = pm.wait_exit(T);
        let log = pm.log();
        assert_eq!(status.and_then(|s| s.code()), Some(1), "{thread}: {log}");
        assert!(log.contains(&format!("DAEMONEYE_TEST_PANIC={thread}")), "{thread} did not panic: {log}");
        assert!(
            log.contains(&format!("thread {thread} ended unexpectedly"))
                && log.contains("a restart can recover"),
            "{thread}: {log}"
        );
    }
}
