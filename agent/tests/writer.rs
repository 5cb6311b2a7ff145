//! The store writer against a real broker on a socket in a temp dir, with
//! real clients playing the collectors: storage exactly once, the
//! acknowledgements, the refusals, gaps, alerts, the catch-up after a
//! crash, store failures and shutdown.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crossbeam_channel::tick;
use daemoneye_agent::api::{self, Alert};
use daemoneye_agent::config::{RuleSpec, StoreSpec};
use daemoneye_agent::rules::{self, AlertQuery, RuleEngine};
use daemoneye_agent::writer::{StoreWriter, WriterConfig};
use daemoneye_bus::{Broker, BrokerConfig, Client, ClientConfig, Message, Subscription};
use daemoneye_contract::control::{self, StoreAck};
use daemoneye_contract::event::{EventEnvelope, EventKind, GAP_TOPIC, StreamGap};
use daemoneye_store::{EventQuery, EventStore};

const WAIT: Duration = Duration::from_secs(15);

/// A broker, and where the store goes.
struct Harness {
    dir: tempfile::TempDir,
    _broker: Broker,
    socket: PathBuf,
}

impl Harness {
    fn new() -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("run").join("broker.sock");
        let broker = Broker::start(BrokerConfig::new(&socket)).expect("broker starts");
        Harness { dir, _broker: broker, socket }
    }

    fn db(&self) -> PathBuf {
        self.dir.path().join("data").join("events.db")
    }

    fn client(&self, id: &str) -> Arc<Client> {
        let c = Client::connect(ClientConfig::new(&self.socket, id)).expect("client");
        assert!(c.wait_connected(WAIT), "{id} never connected");
        Arc::new(c)
    }

    /// Starts a writer on its own client; returns once its subscription is
    /// in place.
    fn writer(&self, store: StoreSpec, rules: Vec<RuleSpec>) -> (Arc<Client>, StoreWriter) {
        let client = self.client(api::AGENT_CLIENT_ID);
        let cfg = WriterConfig { database: self.db(), store, rules, own: Arc::default() };
        let writer = StoreWriter::start(client.clone(), cfg).expect("writer starts");
        // A confirmed publish proves the subscriptions before it are in place.
        client.publish_confirmed("sync.writer", b"").unwrap();
        (client, writer)
    }

    /// An observer of acknowledgements and alerts.
    fn observer(&self) -> (Arc<Client>, Subscription, Subscription) {
        let c = self.client("observer");
        let acks = c.subscribe("control.ack.+").unwrap();
        let alerts = c.subscribe(api::ALERT_TOPIC).unwrap();
        c.publish_confirmed("sync.observer", b"").unwrap();
        (c, acks, alerts)
    }
}

fn quick() -> StoreSpec {
    StoreSpec { batch_wait_ms: 5, ..StoreSpec::default() }
}

/// A `started` event of `exe` as uid 1000.
fn envelope(collector: &str, stream: u64, seq: u64, exe: &str) -> EventEnvelope {
    let name = Path::new(exe).file_name().unwrap().to_str().unwrap();
    let pid = 1_000 + u32::try_from(seq).unwrap();
    let mut process = daemoneye_contract::testing::record(pid, 5_000 + seq, name);
    Arc::make_mut(&mut process.details).exe = Ok(PathBuf::from(exe));
    daemoneye_contract::testing::envelope(
        collector,
        stream,
        seq,
        EventKind::Started,
        process,
        api::now_unix_ms(),
    )
}

fn publish(c: &Client, env: &EventEnvelope) {
    c.publish(env.event.kind.topic(), &env.encode()).unwrap();
}

/// Acknowledgements received until one for `topic` through `through`,
/// that one included; `None` on timeout.
fn acks_until(sub: &Subscription, topic: &str, through: u64) -> Option<Vec<(String, StoreAck)>> {
    let deadline = Instant::now() + WAIT;
    let mut seen = Vec::new();
    while let Some(m) = sub.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        let ack: StoreAck = control::decode(&m.payload).expect("ack decodes");
        seen.push((m.topic.clone(), ack));
        if m.topic == topic && ack.through == through {
            return Some(seen);
        }
    }
    eprintln!("acks seen before the timeout: {seen:?}");
    None
}

fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    let ticker = tick(Duration::from_millis(10));
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        let _ = ticker.recv();
    }
    cond()
}

fn stored(db: &Path) -> Vec<(String, u64, u64)> {
    let store = EventStore::open_read_only(db).unwrap();
    store
        .query(&EventQuery::default())
        .unwrap()
        .into_iter()
        .map(|e| (e.collector_id, e.stream_id, e.seq))
        .collect()
}

fn decode_alert(m: &Message) -> Alert {
    api::decode(&m.payload).expect("alert decodes")
}

#[test]
fn events_are_stored_once_and_acknowledged_with_their_watermark() {
    let h = Harness::new();
    let (_obs, acks, _alerts) = h.observer();
    let (_wc, writer) = h.writer(quick(), Vec::new());
    let c1 = h.client("c1");

    // A duplicate and an out-of-order one.
    for seq in [1, 2, 3, 2, 5, 4] {
        publish(&c1, &envelope("c1", 7, seq, "/usr/bin/sleep"));
    }
    let seen = acks_until(&acks, "control.ack.c1", 5).expect("acknowledged through 5");
    assert!(seen.iter().all(|(t, a)| t == "control.ack.c1" && a.stream_id == 7), "{seen:?}");
    let throughs: Vec<u64> = seen.iter().map(|(_, a)| a.through).collect();
    assert!(throughs.windows(2).all(|w| w[0] <= w[1]), "acks never go back: {throughs:?}");
    let want: Vec<(String, u64, u64)> = (1..=5).map(|s| ("c1".to_owned(), 7, s)).collect();
    let mut got = stored(&h.db());
    got.sort();
    assert_eq!(got, want);

    let status = writer.status();
    assert_eq!((status.events_committed, status.duplicates, status.rejected), (5, 1, 0), "{status:?}");
    assert!(status.batches >= 1 && status.last_commit_unix_ms.is_some(), "{status:?}");
    assert_eq!(status.path, h.db().display().to_string());
    assert_eq!((writer.events_stored("c1"), writer.events_stored("c2")), (5, 0));

    // A replay of what is stored is acknowledged again, and not stored.
    publish(&c1, &envelope("c1", 7, 3, "/usr/bin/sleep"));
    acks_until(&acks, "control.ack.c1", 5).expect("the duplicate is acknowledged");
    assert_eq!(stored(&h.db()).len(), 5);
    assert_eq!(writer.status().duplicates, 2);
    writer.shutdown();
}

#[test]
fn a_collector_cannot_speak_for_another_and_garbage_is_refused() {
    let h = Harness::new();
    let (_obs, acks, _alerts) = h.observer();
    let (_wc, writer) = h.writer(quick(), Vec::new());
    let c1 = h.client("c1");

    // Client c1 claims to be c2, twice, then sends garbage.
    publish(&c1, &envelope("c2", 1, 1, "/usr/bin/sleep"));
    let gap = StreamGap {
        collector_id: "c2".into(),
        stream_id: 1,
        from: 1,
        to: 9,
        reason: "forged".into(),
        position: None,
    };
    c1.publish(GAP_TOPIC, &gap.encode()).unwrap();
    c1.publish("events.process.started", b"\xff\xff\xff not an envelope").unwrap();
    c1.publish(GAP_TOPIC, b"").unwrap();
    // Then its own event.
    publish(&c1, &envelope("c1", 1, 1, "/usr/bin/sleep"));

    let seen = acks_until(&acks, "control.ack.c1", 1).expect("c1's own event is acknowledged");
    assert!(seen.iter().all(|(t, _)| t == "control.ack.c1"), "nothing is acknowledged to c2: {seen:?}");
    assert_eq!(stored(&h.db()), vec![("c1".to_owned(), 1, 1)]);
    let status = writer.status();
    assert_eq!((status.rejected, status.events_committed), (4, 1), "{status:?}");
    let store = EventStore::open_read_only(&h.db()).unwrap();
    assert_eq!(store.watermark("c2", 1).unwrap(), None);
}

#[test]
fn a_gap_is_settled_in_order_and_acknowledged() {
    let h = Harness::new();
    let (_obs, acks, _alerts) = h.observer();
    let (_wc, writer) = h.writer(quick(), Vec::new());
    let c1 = h.client("c1");

    publish(&c1, &envelope("c1", 3, 1, "/usr/bin/sleep"));
    publish(&c1, &envelope("c1", 3, 2, "/usr/bin/sleep"));
    let gap = StreamGap {
        collector_id: "c1".into(),
        stream_id: 3,
        from: 3,
        to: 5,
        reason: "crc".into(),
        position: None,
    };
    c1.publish(GAP_TOPIC, &gap.encode()).unwrap();
    publish(&c1, &envelope("c1", 3, 6, "/usr/bin/sleep"));

    acks_until(&acks, "control.ack.c1", 6).expect("acknowledged past the gap");
    let seqs: Vec<u64> = stored(&h.db()).into_iter().map(|(_, _, s)| s).collect();
    assert_eq!(seqs, [1, 2, 6]);
    let store = EventStore::open_read_only(&h.db()).unwrap();
    let gaps: (i64, i64, String) = store
        .connection()
        .query_row("SELECT from_seq, to_seq, reason FROM stream_gaps WHERE collector_id = 'c1'", [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .unwrap();
    assert_eq!(gaps, (3, 5, "crc".to_owned()));
    assert_eq!(writer.status().rejected, 0);
}

#[test]
fn a_matching_event_raises_an_alert_on_the_bus_and_in_the_table() {
    let h = Harness::new();
    let (_obs, acks, alerts) = h.observer();
    let (_wc, writer) = h.writer(quick(), rules::default_rules());
    let c1 = h.client("c1");

    publish(&c1, &envelope("c1", 1, 1, "/usr/bin/sleep"));
    publish(&c1, &envelope("c1", 1, 2, "/tmp/dropper"));
    acks_until(&acks, "control.ack.c1", 2).expect("acknowledged");

    let alert = decode_alert(&alerts.recv_timeout(WAIT).expect("an alert on events.alert"));
    assert_eq!(alert.rule, "exe-in-temp-dir");
    assert_eq!((alert.collector_id.as_str(), alert.pid, alert.name.as_str()), ("c1", 1_002, "dropper"));
    assert_eq!(alert.exe.as_deref(), Some("/tmp/dropper"));
    assert!(alerts.recv_timeout(Duration::from_millis(200)).is_none(), "one alert only");

    let store = EventStore::open_read_only(&h.db()).unwrap();
    assert_eq!(rules::query_alerts(store.connection(), &AlertQuery::default()).unwrap(), vec![alert.clone()]);
    let event =
        store.query(&EventQuery { after_id: Some(alert.event_id - 1), limit: 1, ..Default::default() });
    assert_eq!(event.unwrap()[0].seq, 2);
    assert_eq!(RuleEngine::cursor(store.connection()).unwrap(), alert.event_id);
    let status = writer.status();
    assert_eq!((status.alerts_raised, status.rules), (1, rules::DEFAULT_RULES.len()), "{status:?}");
}

#[test]
fn a_restarted_writer_evaluates_what_was_committed_but_not_evaluated() {
    let h = Harness::new();
    // A previous agent committed two batches and evaluated only the first
    // before it died.
    {
        let mut store = EventStore::open(&h.db()).unwrap();
        store.insert_batch(&[envelope("c1", 1, 1, "/tmp/old")]).unwrap();
        let first: i64 =
            store.connection().query_row("SELECT max(id) FROM process_events", [], |r| r.get(0)).unwrap();
        let mut engine = RuleEngine::compile(store.connection(), &rules::default_rules()).unwrap();
        assert_eq!(engine.run(store.connection_mut(), 0, first, 1).unwrap().len(), 1);
        store
            .insert_batch(&[envelope("c1", 1, 2, "/usr/bin/sleep"), envelope("c1", 1, 3, "/dev/shm/new")])
            .unwrap();
    }
    let (_obs, _acks, alerts) = h.observer();
    let (_wc, writer) = h.writer(quick(), rules::default_rules());

    // Evaluated by `start` itself.
    let store = EventStore::open_read_only(&h.db()).unwrap();
    let all = rules::query_alerts(store.connection(), &AlertQuery::default()).unwrap();
    let exes: Vec<Option<&str>> = all.iter().map(|a| a.exe.as_deref()).collect();
    assert_eq!(exes, [Some("/tmp/old"), Some("/dev/shm/new")]);
    let alert = decode_alert(&alerts.recv_timeout(WAIT).expect("the catch-up's alert is published"));
    assert_eq!(alert, all[1]);
    assert_eq!(writer.status().alerts_raised, 1);
    assert_eq!(RuleEngine::cursor(store.connection()).unwrap(), all[1].event_id);
}

#[test]
fn shutdown_commits_and_acknowledges_what_was_received() {
    let h = Harness::new();
    let (_obs, acks, _alerts) = h.observer();
    // A batch that would wait ten minutes.
    let spec = StoreSpec { batch_wait_ms: 600_000, ..StoreSpec::default() };
    let (wc, writer) = h.writer(spec, Vec::new());
    let c1 = h.client("c1");
    let sync = wc.subscribe("sync.c1").unwrap();
    wc.publish_confirmed("sync.writer", b"").unwrap();

    for seq in 1..=3 {
        publish(&c1, &envelope("c1", 4, seq, "/usr/bin/sleep"));
    }
    // Delivered in order on the writer's connection: once the marker is
    // here, the events are in the writer's subscription (or its batch).
    c1.publish("sync.c1", b"").unwrap();
    sync.recv_timeout(WAIT).expect("the marker arrives");
    assert_eq!(writer.status().batches, 0, "still gathering");

    writer.shutdown();
    let seqs: Vec<u64> = stored(&h.db()).into_iter().map(|(_, _, s)| s).collect();
    assert_eq!(seqs, [1, 2, 3]);
    acks_until(&acks, "control.ack.c1", 3).expect("acknowledged at shutdown");
}

#[test]
fn a_failing_commit_is_retried_and_acknowledged_only_once_it_succeeds() {
    let h = Harness::new();
    let (_obs, acks, _alerts) = h.observer();
    let (_wc, writer) = h.writer(quick(), Vec::new());
    let c1 = h.client("c1");

    // Another connection holds the write lock: the writer's commit waits
    // out the store's busy timeout and fails.
    let locker = rusqlite::Connection::open(h.db()).unwrap();
    locker.execute_batch("BEGIN EXCLUSIVE").unwrap();
    publish(&c1, &envelope("c1", 1, 1, "/usr/bin/sleep"));
    assert!(wait_until(WAIT, || writer.status().errors >= 1), "{:?}", writer.status());
    assert!(acks.messages().try_recv().is_err(), "nothing acknowledged before the commit");
    assert_eq!(writer.status().events_committed, 0);

    locker.execute_batch("ROLLBACK").unwrap();
    acks_until(&acks, "control.ack.c1", 1).expect("acknowledged once committed");
    assert_eq!(stored(&h.db()), vec![("c1".to_owned(), 1, 1)]);
    assert_eq!(writer.status().events_committed, 1);
}

#[test]
fn a_bad_rule_stops_the_writer_from_starting() {
    let h = Harness::new();
    let client = h.client(api::AGENT_CLIENT_ID);
    let bad = RuleSpec {
        name: "broken".into(),
        severity: daemoneye_agent::config::Severity::Low,
        description: String::new(),
        sql: "SELECT id FROM new_events WHERE nope = 1".into(),
        enabled: true,
    };
    let cfg = WriterConfig { database: h.db(), store: quick(), rules: vec![bad], own: Arc::default() };
    let e = StoreWriter::start(client, cfg).err().expect("refused");
    let text = e.to_string();
    assert!(text.contains("rule broken") && text.contains("no such column: nope"), "{text}");
}

#[test]
fn retention_prunes_more_than_a_chunk_and_the_writer_keeps_committing() {
    let h = Harness::new();
    let total = 25_000u64;
    {
        let mut store = EventStore::open(&h.db()).unwrap();
        let all: Vec<u64> = (1..=total).collect();
        for batch in all.chunks(5_000) {
            let envs: Vec<EventEnvelope> =
                batch.iter().map(|s| envelope("c1", 1, *s, "/usr/bin/x")).collect();
            store.insert_batch(&envs).unwrap();
        }
    }
    let (_obs, acks, _alerts) = h.observer();
    let spec = StoreSpec { max_events: 1_000, ..quick() };
    let (_wc, writer) = h.writer(spec, Vec::new());
    // Acknowledged while (or after) the pass runs, chunk by chunk.
    let c1 = h.client("c1");
    publish(&c1, &envelope("c1", 1, total + 1, "/usr/bin/x"));
    acks_until(&acks, "control.ack.c1", total + 1).expect("acknowledged during the prune");
    assert!(
        wait_until(WAIT, || writer.status().pruned >= total - 1_000),
        "pruned {}",
        writer.status().pruned
    );
    let seqs: Vec<u64> = stored(&h.db()).into_iter().map(|(_, _, seq)| seq).collect();
    // The oldest beyond 1_000 at the boundary went; the new event stayed,
    // whether it came before the boundary was fixed (then seq total - 999
    // went too) or after.
    let pruned = writer.status().pruned;
    assert!(pruned == total - 1_000 || pruned == total - 999, "{pruned}");
    assert_eq!(seqs.len() as u64, total + 1 - pruned);
    assert_eq!(seqs.last(), Some(&(total + 1)));
    assert_eq!(seqs.first(), Some(&(pruned + 1)));
}

/// Every WARN and ERROR line logged in this test binary (by any test:
/// look for your own names).
fn captured_logs() -> &'static Mutex<Vec<(log::Level, String)>> {
    struct Capture;
    static LINES: OnceLock<Mutex<Vec<(log::Level, String)>>> = OnceLock::new();
    impl log::Log for Capture {
        fn enabled(&self, m: &log::Metadata<'_>) -> bool {
            m.level() <= log::Level::Warn
        }
        fn log(&self, r: &log::Record<'_>) {
            if self.enabled(r.metadata()) {
                let lines = LINES.get_or_init(Mutex::default);
                lines.lock().unwrap().push((r.level(), r.args().to_string()));
            }
        }
        fn flush(&self) {}
    }
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        log::set_boxed_logger(Box::new(Capture)).expect("the only logger");
        log::set_max_level(log::LevelFilter::Warn);
    });
    LINES.get_or_init(Mutex::default)
}

#[test]
fn an_endless_rule_is_stopped_at_its_budget_named_and_disabled_while_the_writer_keeps_committing() {
    let logs = captured_logs();
    let h = Harness::new();
    let (_obs, acks, alerts) = h.observer();
    let endless = RuleSpec {
        name: "endless-cte".into(),
        severity: daemoneye_agent::config::Severity::Low,
        description: String::new(),
        sql: "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) \
              SELECT n.id FROM new_events n, c WHERE c.x < 0"
            .into(),
        enabled: true,
    };
    let mut rules = rules::default_rules();
    rules.insert(0, endless);
    let budget = Duration::from_millis(100);
    let (_wc, writer) = h.writer(StoreSpec { rule_budget_ms: 100, ..quick() }, rules);
    let c1 = h.client("c1");
    for seq in 1..=5u64 {
        let started = Instant::now();
        publish(&c1, &envelope("c1", 1, seq, "/tmp/dropper"));
        // Stored and acknowledged (before the rules run).
        acks_until(&acks, "control.ack.c1", seq).expect("acknowledged");
        // The other rules still fire: the batch's alert, and at the third
        // overrun the alert saying the rule is disabled.
        let mut got: Vec<(String, String)> = Vec::new();
        let expected = if seq == 3 { 2 } else { 1 };
        while got.len() < expected {
            let a = decode_alert(&alerts.recv_timeout(WAIT).expect("an alert"));
            got.push((a.rule, a.name));
        }
        got.sort();
        let mut want = vec![("exe-in-temp-dir".to_owned(), "dropper".to_owned())];
        if seq == 3 {
            want.insert(0, ("agent_rule_disabled".to_owned(), "endless-cte".to_owned()));
        }
        assert_eq!(got, want, "batch {seq}");
        let took = started.elapsed();
        if seq <= 3 {
            assert!(took >= budget, "batch {seq}: {took:?}");
        }
        assert!(took < budget + Duration::from_secs(5), "batch {seq}: {took:?}");
    }
    assert_eq!(stored(&h.db()).len(), 5);
    assert_eq!(writer.status().events_committed, 5);

    let ours: Vec<(log::Level, String)> =
        logs.lock().unwrap().iter().filter(|(_, l)| l.contains("endless-cte")).cloned().collect();
    let warns = ours.iter().filter(|(lvl, l)| {
        *lvl == log::Level::Warn
            && l.contains("rule endless-cte: interrupted")
            && l.contains("time budget of 100 ms")
    });
    assert_eq!(warns.count(), 2, "{ours:#?}");
    let errors = ours.iter().filter(|(lvl, l)| {
        *lvl == log::Level::Error
            && l.contains("rule endless-cte: disabled")
            && l.contains("time budget of 100 ms")
    });
    assert_eq!(errors.count(), 1, "{ours:#?}");

    // On record: the agent's alert names the rule.
    let store = EventStore::open_read_only(&h.db()).unwrap();
    let q = AlertQuery { rule: Some("agent_rule_disabled".into()), ..AlertQuery::default() };
    let stored_alerts = rules::query_alerts(store.connection(), &q).unwrap();
    assert_eq!(stored_alerts.len(), 1);
    assert_eq!(
        (stored_alerts[0].name.as_str(), stored_alerts[0].collector_id.as_str()),
        ("endless-cte", api::AGENT_CLIENT_ID)
    );
    assert!(stored_alerts[0].description.contains("rule endless-cte disabled"), "{stored_alerts:?}");
}

/// `envelope` as a current collector holding `base..next` states it.
fn placed(collector: &str, stream: u64, seq: u64, base: u64, next: u64) -> EventEnvelope {
    EventEnvelope {
        position: Some(daemoneye_contract::event::StreamPosition { base, next }),
        ..envelope(collector, stream, seq, "/usr/bin/sleep")
    }
}

#[test]
fn an_undecodable_event_is_settled_as_a_gap_and_does_not_block_its_stream() {
    let h = Harness::new();
    let (_obs, acks, _alerts) = h.observer();
    let (_wc, writer) = h.writer(quick(), Vec::new());
    let c1 = h.client("c1");

    publish(&c1, &placed("c1", 4, 1, 1, 4));
    // Seq 2: a body this build cannot read (a newer collector's, say):
    // its head (collector, stream, seq) decodes, the rest is garbage.
    let mut bad = daemoneye_contract::codec::MAGIC.to_vec();
    bad.push(daemoneye_contract::codec::Kind::EventEnvelope.byte());
    bad.extend_from_slice(&3u16.to_le_bytes());
    bad.extend(postcard::to_stdvec(&("c1", 4u64, 2u64)).unwrap());
    bad.extend_from_slice(b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff");
    c1.publish("events.process.started", &bad).unwrap();
    publish(&c1, &placed("c1", 4, 3, 1, 4));

    acks_until(&acks, "control.ack.c1", 3).expect("acknowledged past the undecodable event");
    let seqs: Vec<u64> = stored(&h.db()).into_iter().map(|(_, _, s)| s).collect();
    assert_eq!(seqs, [1, 3]);
    let gaps = EventStore::open_read_only(&h.db()).unwrap().gaps("c1", 4).unwrap();
    assert_eq!(gaps.len(), 1, "{gaps:?}");
    assert_eq!((gaps[0].0, gaps[0].1), (2, 2));
    assert!(gaps[0].2.contains("could not decode"), "{gaps:?}");
    assert_eq!(writer.status().rejected, 1);
}

#[test]
fn a_forged_far_gap_does_not_make_the_store_drop_later_events() {
    let h = Harness::new();
    let (_obs, acks, _alerts) = h.observer();
    let (_wc, writer) = h.writer(quick(), Vec::new());
    let c1 = h.client("c1");

    publish(&c1, &placed("c1", 5, 1, 1, 3));
    publish(&c1, &placed("c1", 5, 2, 1, 3));
    // Outside what the collector states it produced: refused outright.
    let far = StreamGap {
        collector_id: "c1".into(),
        stream_id: 5,
        from: 3,
        to: 1 << 62,
        reason: "forged".into(),
        position: Some(daemoneye_contract::event::StreamPosition { base: 1, next: 3 }),
    };
    c1.publish(GAP_TOPIC, &far.encode()).unwrap();
    // With a position forged to cover it (or none, as an older collector
    // sends): recorded, and refuted by the real events that follow.
    let covered = StreamGap {
        position: Some(daemoneye_contract::event::StreamPosition { base: 1, next: (1 << 62) + 1 }),
        ..far.clone()
    };
    c1.publish(GAP_TOPIC, &covered.encode()).unwrap();
    for seq in 3..=6 {
        publish(&c1, &placed("c1", 5, seq, 3, 7));
    }
    acks_until(&acks, "control.ack.c1", 6).expect("the real events are acknowledged");
    let seqs: Vec<u64> = stored(&h.db()).into_iter().map(|(_, _, s)| s).collect();
    assert_eq!(seqs, [1, 2, 3, 4, 5, 6], "no real event dropped as a duplicate");
    let store = EventStore::open_read_only(&h.db()).unwrap();
    assert_eq!(store.watermark("c1", 5).unwrap(), Some(6));
    assert!(store.gaps("c1", 5).unwrap().is_empty(), "the forged gap is refuted");
    assert!(writer.status().rejected >= 1, "the implausible gap is counted");
}
