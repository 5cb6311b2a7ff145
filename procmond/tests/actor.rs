//! The collector actor in-process: each message, configuration updates and
//! their cycle boundary, startup gating on BeginMonitoring, a full inbox,
//! and backpressure through a real EventBusConnector, WAL and broker with
//! a stalled consumer.
// The harness (support/) runs a broker, whose transport is Unix sockets.
#![cfg(unix)]

mod support;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use daemoneye_contract::control::{CollectorState, ConnectionStatus};
use daemoneye_contract::event::{EventEnvelope, EventKind, ProcessEvent};
use parking_lot::Mutex;
use procmond::actor::{
    ActorError, ActorHandle, ActorMessage, ActorOptions, ActorSender, EventSink, IntervalAdjustment,
    SinkStatus,
};
use procmond::config::{CollectorConfig, ConfigUpdate};
use procmond::connector::{Connector, ConnectorConfig};
use procmond::testing::{FakeSource, record};
use support::{FakeAgent, socket_path, wait_until};

/// A sink that keeps events in memory.
#[derive(Clone, Default)]
struct VecSink {
    events: Arc<Mutex<Vec<EventEnvelope>>>,
    max_in_flight: Arc<Mutex<usize>>,
}

impl EventSink for VecSink {
    fn submit(
        &mut self,
        events: Vec<ProcessEvent>,
    ) -> Result<Vec<EventEnvelope>, procmond::actor::SinkError> {
        let mut all = self.events.lock();
        let first = all.len() as u64 + 1;
        let envs: Vec<EventEnvelope> = events
            .into_iter()
            .enumerate()
            .map(|(i, event)| EventEnvelope {
                collector_id: "t".into(),
                stream_id: 0,
                seq: first + i as u64,
                event,
                position: None,
            })
            .collect();
        all.extend(envs.iter().cloned());
        Ok(envs)
    }
    fn status(&self) -> SinkStatus {
        SinkStatus {
            connection: ConnectionStatus::Standalone,
            buffer_level_percent: 0.0,
            unacknowledged: 0,
            published: self.events.lock().len() as u64,
        }
    }
    fn set_max_in_flight(&mut self, max: usize) {
        *self.max_in_flight.lock() = max;
    }
    fn flush(&mut self, _: Duration) -> Result<(), String> {
        Ok(())
    }
}

const T: Duration = Duration::from_secs(5);

fn config(interval: Duration) -> CollectorConfig {
    let mut cfg = CollectorConfig::with_data_dir("/nonexistent-unused");
    cfg.interval = interval;
    // The fake records name executables that do not exist on this host.
    cfg.lifecycle.exe_changes = false;
    cfg
}

fn opts() -> ActorOptions {
    ActorOptions { interval_floor: Duration::from_millis(10), ..Default::default() }
}

fn spawn(interval: Duration) -> (ActorHandle, ActorSender, FakeSource, VecSink) {
    let source = FakeSource::new();
    source.set((1..=5).map(|p| record(p, 100 + u64::from(p), "init")).collect());
    let sink = VecSink::default();
    let inbox = ActorHandle::channel();
    let tx = inbox.0.clone();
    let actor =
        ActorHandle::spawn(config(interval), Box::new(source.clone()), Box::new(sink.clone()), inbox, opts())
            .unwrap();
    (actor, tx, source, sink)
}

#[test]
fn nothing_is_collected_before_begin_monitoring() {
    let (actor, tx, source, sink) = spawn(Duration::from_millis(20));
    // Health answers while waiting; no refresh happened.
    for _ in 0..5 {
        let h = tx.health(T).unwrap();
        assert_eq!(h.state, CollectorState::WaitingForAgent);
        assert_eq!(h.cycles, 0);
    }
    assert_eq!(source.refreshes(), 0);
    assert!(sink.events.lock().is_empty());

    tx.begin_monitoring().unwrap();
    assert!(wait_until(T, || sink.events.lock().len() == 5), "snapshot published");
    let h = tx.health(T).unwrap();
    assert_eq!(h.state, CollectorState::Running);
    assert!(h.cycles >= 1 && source.refreshes() >= 1);
    let events = sink.events.lock().clone();
    assert!(events.iter().all(|e| e.event.kind == EventKind::Started && e.event.snapshot));

    // A second BeginMonitoring changes nothing.
    tx.begin_monitoring().unwrap();
    assert_eq!(tx.health(T).unwrap().state, CollectorState::Running);

    // Lifecycle: a stop and a start without snapshot marks.
    source.edit(|l| {
        l.retain(|r| r.pid != 3);
        l.push(record(42, 999, "new"));
    });
    assert!(wait_until(T, || sink.events.lock().len() == 7));
    let events = sink.events.lock().clone();
    assert_eq!((events[5].event.kind, events[5].event.process.pid), (EventKind::Stopped, 3));
    assert_eq!(
        (events[6].event.kind, events[6].event.process.pid, events[6].event.snapshot),
        (EventKind::Started, 42, false)
    );

    tx.graceful_shutdown(T).unwrap();
    actor.join();
    // After the shutdown every request fails with ShuttingDown.
    assert_eq!(tx.health(T).unwrap_err(), ActorError::ShuttingDown);
    assert_eq!(tx.begin_monitoring().unwrap_err(), ActorError::ShuttingDown);
}

#[test]
fn a_full_inbox_refuses_without_blocking() {
    // No actor drains this inbox.
    let (tx, _rx) = ActorHandle::channel();
    for _ in 0..procmond::actor::INBOX_CAPACITY {
        tx.begin_monitoring().unwrap();
    }
    let started = std::time::Instant::now();
    assert_eq!(tx.begin_monitoring().unwrap_err(), ActorError::Busy);
    assert_eq!(tx.adjust_interval(IntervalAdjustment::SlowDown).unwrap_err(), ActorError::Busy);
    assert_eq!(tx.health(T).unwrap_err(), ActorError::Busy);
    assert!(started.elapsed() < Duration::from_secs(1), "refusals are immediate");
    // A request whose reply never comes times out instead of hanging.
    let (tx2, rx2) = ActorHandle::channel();
    assert_eq!(
        tx2.health(Duration::from_millis(100)).unwrap_err(),
        ActorError::Timeout(Duration::from_millis(100))
    );
    drop(rx2);
    assert_eq!(tx2.health(T).unwrap_err(), ActorError::ShuttingDown);
}

#[test]
fn every_update_config_error_is_refused_with_its_reason() {
    let (actor, tx, _source, sink) = spawn(Duration::from_millis(50));
    let cases: Vec<(ConfigUpdate, &str)> = vec![
        (ConfigUpdate { interval_ms: Some(1), ..Default::default() }, "interval"),
        (ConfigUpdate { interval_secs: Some(3601), ..Default::default() }, "interval"),
        (ConfigUpdate { max_events_in_flight: Some(0), ..Default::default() }, "max_events_in_flight"),
        (
            ConfigUpdate { collector_id: Some("other".into()), ..Default::default() },
            "collector_id cannot change",
        ),
        (ConfigUpdate { database: Some("/x.db".into()), ..Default::default() }, "database cannot change"),
        (ConfigUpdate { data_dir: Some("/x".into()), ..Default::default() }, "data_dir cannot change"),
        (ConfigUpdate { excluded_pids: Some(vec![7]), ..Default::default() }, "excluded_pids cannot change"),
    ];
    for (update, reason) in cases {
        match tx.update_config(update.clone(), T) {
            Err(ActorError::Refused(msg)) => assert!(msg.contains(reason), "{update:?}: {msg}"),
            other => panic!("{update:?}: expected a refusal, got {other:?}"),
        }
    }
    // Nothing changed; a valid update is accepted.
    assert_eq!(tx.health(T).unwrap().original_interval_ms, 50);
    tx.update_config(ConfigUpdate { max_events_in_flight: Some(5), ..Default::default() }, T).unwrap();
    // Not running yet: applied at once (no cycle to wait for).
    assert_eq!(*sink.max_in_flight.lock(), 5);
    tx.graceful_shutdown(T).unwrap();
    actor.join();
}

#[test]
fn hot_reload_takes_effect_at_the_next_cycle_boundary() {
    let (actor, tx, source, _sink) = spawn(Duration::from_millis(400));
    tx.begin_monitoring().unwrap();
    assert!(wait_until(T, || tx.health(T).unwrap().cycles == 1));
    let cycles_before = tx.health(T).unwrap().cycles;
    tx.update_config(ConfigUpdate { interval_ms: Some(1000), ..Default::default() }, T).unwrap();
    // Accepted, staged, not applied mid-cycle.
    let h = tx.health(T).unwrap();
    assert!(h.pending_config);
    assert_eq!((h.interval_ms, h.cycles), (400, cycles_before));
    // At the next cycle start it applies.
    assert!(wait_until(T, || !tx.health(T).unwrap().pending_config));
    let h = tx.health(T).unwrap();
    assert_eq!(h.interval_ms, 1000);
    assert_eq!(h.cycles, cycles_before + 1, "applied exactly at the boundary");
    let refreshes = source.refreshes();
    tx.graceful_shutdown(T).unwrap();
    actor.join();
    assert_eq!(source.refreshes(), refreshes, "no cycle after shutdown");
}

#[test]
fn adjust_interval_slows_and_restores() {
    let (actor, tx, _source, _sink) = spawn(Duration::from_millis(100));
    tx.begin_monitoring().unwrap();
    tx.adjust_interval(IntervalAdjustment::SlowDown).unwrap();
    let h = tx.health(T).unwrap();
    assert_eq!((h.interval_ms, h.original_interval_ms, h.backpressure_activations), (150, 100, 1));
    // Idempotent.
    tx.adjust_interval(IntervalAdjustment::SlowDown).unwrap();
    assert_eq!(tx.health(T).unwrap().backpressure_activations, 1);
    tx.adjust_interval(IntervalAdjustment::Restore).unwrap();
    assert_eq!(tx.health(T).unwrap().interval_ms, 100);
    tx.graceful_shutdown(T).unwrap();
    actor.join();
}

#[test]
fn messages_sent_raw_are_handled_one_at_a_time() {
    let (actor, tx, _source, _sink) = spawn(Duration::from_millis(100));
    let (reply, rx) = crossbeam_channel::bounded(1);
    tx.try_send(ActorMessage::HealthCheck { reply }).unwrap();
    assert_eq!(rx.recv_timeout(T).unwrap().data.state, CollectorState::WaitingForAgent);
    tx.graceful_shutdown(T).unwrap();
    actor.join();
}

/// Backpressure end to end: a consumer that stops reading pushes back
/// through the broker into the connector's buffer; past 70% the interval
/// goes to 1.5x, and once the consumer drains it is restored.
#[test]
fn a_stalled_consumer_slows_collection_and_draining_restores_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut bcfg = daemoneye_bus::BrokerConfig::new(socket_path(dir.path()));
    bcfg.queue_limit_bytes = 64 << 10;
    bcfg.slow_consumer_deadline = Duration::from_secs(120);
    let _broker = daemoneye_bus::Broker::start(bcfg).unwrap();
    let agent = FakeAgent::start(&socket_path(dir.path()), &dir.path().join("agent.db"));
    agent.stalled.store(true, Ordering::SeqCst);

    let mut ccfg = daemoneye_bus::ClientConfig::new(socket_path(dir.path()), "pm");
    ccfg.timeout = Duration::from_millis(100);
    ccfg.write_limit_bytes = 64 << 10;
    let client = Arc::new(daemoneye_bus::Client::connect(ccfg).unwrap());
    assert!(client.wait_connected(T));
    let inbox = ActorHandle::channel();
    let tx = inbox.0.clone();
    let connector = Connector::start(
        ConnectorConfig {
            collector_id: "pm".into(),
            buffer_bytes: 256 << 10,
            max_in_flight: 1_000_000,
            ack_timeout: Duration::from_secs(60),
            truncate_floor: None,
            wal_max_bytes: procmond::config::DEFAULT_WAL_MAX_BYTES,
        },
        &dir.path().join("wal"),
        client.clone(),
        tx.clone(),
    )
    .unwrap();
    // Every cycle replaces 50 processes: 100 events.
    let source = FakeSource::new();
    let mut cfg = config(Duration::from_millis(40));
    cfg.collector_id = "pm".into();
    let actor =
        ActorHandle::spawn(cfg, Box::new(churn(source.clone())), Box::new(connector), inbox, opts()).unwrap();
    tx.begin_monitoring().unwrap();

    assert!(
        wait_until(Duration::from_secs(30), || tx.health(T).unwrap().interval_ms == 60),
        "interval slowed to 1.5x: {:?}",
        tx.health(T)
    );
    let h = tx.health(T).unwrap();
    assert!(h.buffer_level_percent >= 50.0, "{h:?}");
    assert_eq!(h.original_interval_ms, 40);
    assert!(h.backpressure_activations >= 1);

    // The consumer drains: the interval comes back.
    agent.stalled.store(false, Ordering::SeqCst);
    assert!(
        wait_until(Duration::from_secs(60), || tx.health(T).unwrap().interval_ms == 40),
        "interval restored: {:?}",
        tx.health(T)
    );
    tx.graceful_shutdown(Duration::from_secs(30)).unwrap();
    actor.join();
    // Nothing was lost on the way: every appended event reached the store
    // (the final flush published the rest; acknowledgements may lag).
    let store = agent.store.clone();
    let survey = daemoneye_wal::inspect(&dir.path().join("wal")).unwrap();
    let last = survey.next_seq - 1;
    assert!(
        wait_until(Duration::from_secs(30), || agent.stored.load(Ordering::SeqCst) == last),
        "stored all {last}"
    );
    assert_eq!(store.lock().count().unwrap(), last);
}

/// A source whose every refresh lists a fresh set of 50 processes (100
/// events per cycle).
fn churn(source: FakeSource) -> impl daemoneye_platform::ProcessSource {
    struct Churn(FakeSource, u64);
    impl daemoneye_platform::ProcessSource for Churn {
        fn backend(&self) -> &'static str {
            "churn"
        }
        fn refresh(&mut self) -> Result<Vec<daemoneye_platform::ProcessRecord>, daemoneye_platform::Error> {
            self.1 += 1;
            let round = self.1;
            self.0.set((0..50).map(|i| record(10_000 + i, round * 1000 + u64::from(i), "worker")).collect());
            self.0.refresh()
        }
        fn last_cycle(&self) -> daemoneye_platform::CycleStats {
            daemoneye_platform::CycleStats::default()
        }
    }
    Churn(source, 0)
}

/// With hashing on, a new process's executable is hashed once; steady
/// cycles read no files, and a second process of the same binary is served
/// from the cache.
#[test]
fn hashing_reads_each_binary_once_and_nothing_in_steady_state() {
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("tool");
    std::fs::write(&exe, b"abc").unwrap();
    let identity = daemoneye_platform::file_identity(&std::fs::metadata(&exe).unwrap()).unwrap();
    let with_exe = |pid: u32| {
        let mut r = record(pid, 1, "tool");
        let mut d = daemoneye_platform::ProcessDetails::clone(&r.details);
        d.exe = Ok(exe.clone());
        d.exe_file = Ok(identity);
        r.details = Arc::new(d);
        r
    };
    let source = FakeSource::new();
    source.set(vec![with_exe(50)]);
    let sink = VecSink::default();
    let mut cfg = config(Duration::from_millis(20));
    cfg.compute_hashes = true;
    let inbox = ActorHandle::channel();
    let tx = inbox.0.clone();
    let actor =
        ActorHandle::spawn(cfg, Box::new(source.clone()), Box::new(sink.clone()), inbox, opts()).unwrap();
    tx.begin_monitoring().unwrap();
    assert!(wait_until(T, || tx.health(T).unwrap().cycles >= 5), "steady cycles ran");
    assert_eq!(tx.health(T).unwrap().hashes_computed, 1);
    source.edit(|l| l.push(with_exe(51)));
    assert!(wait_until(T, || sink.events.lock().len() == 2));
    let h = tx.health(T).unwrap();
    assert_eq!(h.hashes_computed, 1, "the second process of the same binary came from the cache");
    let sha = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
    for e in sink.events.lock().iter() {
        assert_eq!(e.event.sha256, Some(daemoneye_contract::event::HashOutcome::Sha256(sha.into())));
    }
    tx.graceful_shutdown(T).unwrap();
    actor.join();
}

/// A sink that fails for good (a poisoned WAL) stops the actor, so the
/// daemon exits and a restart recovers; a passing failure is retried.
#[test]
fn a_fatal_sink_error_stops_the_actor_and_a_passing_one_is_retried() {
    struct Flaky {
        fatal: bool,
        calls: Arc<Mutex<Vec<usize>>>,
    }
    impl EventSink for Flaky {
        fn submit(
            &mut self,
            events: Vec<ProcessEvent>,
        ) -> Result<Vec<EventEnvelope>, procmond::actor::SinkError> {
            let mut calls = self.calls.lock();
            calls.push(events.len());
            if self.fatal || calls.len() == 1 {
                return Err(procmond::actor::SinkError { message: "disk says no".into(), fatal: self.fatal });
            }
            Ok(Vec::new())
        }
        fn status(&self) -> SinkStatus {
            SinkStatus {
                connection: ConnectionStatus::Standalone,
                buffer_level_percent: 0.0,
                unacknowledged: 0,
                published: 0,
            }
        }
        fn set_max_in_flight(&mut self, _: usize) {}
        fn flush(&mut self, _: Duration) -> Result<(), String> {
            Ok(())
        }
    }
    for fatal in [false, true] {
        let source = FakeSource::new();
        source.set(vec![record(1, 1, "a"), record(2, 2, "b")]);
        let calls = Arc::new(Mutex::new(Vec::new()));
        let inbox = ActorHandle::channel();
        let tx = inbox.0.clone();
        let sink = Flaky { fatal, calls: calls.clone() };
        let actor = ActorHandle::spawn(
            config(Duration::from_millis(20)),
            Box::new(source.clone()),
            Box::new(sink),
            inbox,
            opts(),
        )
        .unwrap();
        tx.begin_monitoring().unwrap();
        if fatal {
            assert!(wait_until(T, || actor.is_finished()), "the actor stopped");
            assert_eq!(tx.health(T).unwrap_err(), ActorError::ShuttingDown);
            assert_eq!(*calls.lock(), vec![2]);
        } else {
            // The snapshot's 2 events come back with the next cycle's (none).
            assert!(wait_until(T, || calls.lock().len() >= 2));
            assert_eq!(calls.lock()[..2], [2, 2]);
            assert_eq!(tx.health(T).unwrap().errors, 1);
            tx.graceful_shutdown(T).unwrap();
        }
        actor.join();
    }
}
