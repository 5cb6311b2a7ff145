//! The EventBusConnector against a real broker and a fake agent: events
//! appended while the consumer is stalled overflow the in-memory buffer
//! into the WAL and are re-read from it in order, once each.
// The harness (support/) runs a broker, whose transport is Unix sockets.
#![cfg(unix)]

mod support;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use daemoneye_contract::event::{EventKind, ProcessEvent};
use daemoneye_contract::testing::record;
use procmond::actor::{ActorHandle, EventSink};
use procmond::connector::{Connector, ConnectorConfig};
use support::{FakeAgent, broker, socket_path, wait_until};

fn event(pid: u32) -> ProcessEvent {
    ProcessEvent {
        kind: EventKind::Started,
        snapshot: false,
        changes: Vec::new(),
        observed_unix_ms: 1,
        process: record(pid, u64::from(pid), "spill"),
        sha256: None,
        source: daemoneye_contract::event::EventSource::Poll,
        late: None,
        exit: None,
    }
}

/// A bus client for "pm", an actor sender nobody reads (AdjustInterval
/// requests are refused once it is full), and a plain connector config.
type Inbox = crossbeam_channel::Receiver<procmond::actor::ActorMessage>;

fn parts(
    dir: &std::path::Path,
) -> (Arc<daemoneye_bus::Client>, procmond::actor::ActorSender, Inbox, ConnectorConfig) {
    let client =
        daemoneye_bus::Client::connect(daemoneye_bus::ClientConfig::new(socket_path(dir), "pm")).unwrap();
    let (actor_tx, actor_rx) = ActorHandle::channel();
    let cfg = ConnectorConfig {
        collector_id: "pm".into(),
        buffer_bytes: 1 << 20,
        max_in_flight: 100,
        ack_timeout: Duration::from_secs(600),
        truncate_floor: None,
        wal_max_bytes: procmond::config::DEFAULT_WAL_MAX_BYTES,
    };
    (Arc::new(client), actor_tx, actor_rx, cfg)
}

#[test]
fn a_spilled_backlog_is_reread_from_the_wal_in_order_and_once() {
    let dir = tempfile::tempdir().unwrap();
    let _broker = broker(dir.path());
    let agent = FakeAgent::start(&socket_path(dir.path()), &dir.path().join("agent.db"));
    agent.stalled.store(true, Ordering::SeqCst);
    let mut ccfg = daemoneye_bus::ClientConfig::new(socket_path(dir.path()), "pm");
    ccfg.timeout = Duration::from_millis(50);
    let client = Arc::new(daemoneye_bus::Client::connect(ccfg).unwrap());
    assert!(client.wait_connected(Duration::from_secs(5)));
    // Nobody reads the actor inbox here: AdjustInterval requests are
    // simply refused once it is full.
    let (actor_tx, _actor_rx) = ActorHandle::channel();
    let mut connector = Connector::start(
        ConnectorConfig {
            collector_id: "pm".into(),
            buffer_bytes: 64 << 10,
            max_in_flight: 1_000_000,
            ack_timeout: Duration::from_secs(600),
            truncate_floor: None,
            wal_max_bytes: procmond::config::DEFAULT_WAL_MAX_BYTES,
        },
        &dir.path().join("wal"),
        client.clone(),
        actor_tx,
    )
    .unwrap();
    // 40 batches of 250: far more than the buffer holds; appends go on
    // while the flush thread re-reads, so continued replays run dry.
    let mut expected = 0u64;
    for batch in 0..40u32 {
        let envs = connector.submit((0..250).map(|i| event(batch * 1000 + i)).collect()).unwrap();
        assert_eq!(envs.first().unwrap().seq, expected + 1, "sequence numbers are contiguous");
        expected += envs.len() as u64;
        if batch == 10 {
            agent.stalled.store(false, Ordering::SeqCst);
        }
    }
    assert!(
        wait_until(Duration::from_secs(60), || agent.stored.load(Ordering::SeqCst) == expected),
        "stored {} of {expected}",
        agent.stored.load(Ordering::SeqCst)
    );
    let seen = agent.seen.lock();
    assert_eq!(seen.duplicates, 0, "nothing was sent twice");
    assert_eq!(seen.events_received, expected);
    drop(seen);
    // Acknowledged: the WAL is truncated through the store's watermark.
    assert!(wait_until(Duration::from_secs(10), || connector.status().unacknowledged == 0));
    connector.shutdown().unwrap();
    let report = daemoneye_wal::inspect(&dir.path().join("wal")).unwrap();
    assert_eq!(report.watermark, expected);
}

#[test]
fn without_a_broker_events_wait_in_the_wal_and_health_says_disconnected() {
    let dir = tempfile::tempdir().unwrap();
    let (client, actor_tx, _inbox, cfg) = parts(dir.path());
    let mut connector =
        Connector::start(cfg.clone(), &dir.path().join("wal"), client.clone(), actor_tx.clone()).unwrap();
    connector.submit((0..10).map(event).collect()).unwrap();
    let status = connector.status();
    assert_eq!(status.connection, daemoneye_contract::control::ConnectionStatus::Disconnected);
    assert_eq!((status.unacknowledged, status.published), (10, 0));
    assert!(status.buffer_level_percent > 0.0);
    // A flush while disconnected returns at once; the WAL keeps them.
    let started = std::time::Instant::now();
    connector.flush(Duration::from_secs(10)).unwrap();
    assert!(started.elapsed() < Duration::from_secs(2));
    let stream = connector.stream_id();
    connector.shutdown().unwrap();
    // A restart finds them and the same stream.
    let connector = Connector::start(cfg, &dir.path().join("wal"), client, actor_tx).unwrap();
    assert_eq!(connector.stream_id(), stream);
    assert_eq!(connector.status().unacknowledged, 10);
}

/// A record that no longer decodes (a bit flip the CRC caught would be
/// a gap of its own; an incompatible layout after an upgrade is this)
/// becomes a gap marker: the store settles it, acknowledges past it, and
/// the WAL is truncated instead of re-sending forever.
#[test]
fn an_undecodable_wal_record_becomes_a_gap_and_delivery_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let wal_dir = dir.path().join("wal");
    {
        // A WAL left by an earlier run: event 1, garbage 2, event 3.
        let (wal, _) = daemoneye_wal::Wal::open(&wal_dir, daemoneye_wal::WalOptions::default()).unwrap();
        std::fs::write(wal_dir.join("STREAM"), "77\n").unwrap();
        let env = |seq| daemoneye_contract::event::EventEnvelope {
            collector_id: "pm".into(),
            stream_id: 77,
            seq,
            event: event(seq as u32),
            position: None,
        };
        wal.append_batch(&[env(1).encode(), vec![0xff; 7], env(3).encode()]).unwrap();
        wal.close().unwrap();
    }
    let _broker = broker(dir.path());
    let agent = FakeAgent::start(&socket_path(dir.path()), &dir.path().join("agent.db"));
    let (client, actor_tx, _inbox, cfg) = parts(dir.path());
    let connector = Connector::start(cfg, &wal_dir, client, actor_tx).unwrap();
    assert_eq!(connector.stream_id(), 77);
    assert!(
        wait_until(Duration::from_secs(10), || connector.status().unacknowledged == 0),
        "{:?}",
        connector.status()
    );
    assert_eq!(agent.stored.load(Ordering::SeqCst), 2);
    let gaps = agent.seen.lock().gaps.clone();
    assert_eq!(gaps.len(), 1);
    assert_eq!((gaps[0].from, gaps[0].to, gaps[0].stream_id), (2, 2, 77));
    assert!(gaps[0].reason.contains("does not decode"), "{:?}", gaps[0]);
    assert_eq!(agent.store.lock().watermark("pm", 77).unwrap(), Some(3));
    connector.shutdown().unwrap();
    assert_eq!(daemoneye_wal::inspect(&wal_dir).unwrap().watermark, 3);
}

/// An acknowledgement above anything ever sent is refused: honouring it
/// would delete records that never reached the store.
#[test]
fn an_ack_above_what_was_sent_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (client, actor_tx, _inbox, cfg) = parts(dir.path());
    let mut connector =
        Connector::start(cfg.clone(), &dir.path().join("wal"), client.clone(), actor_tx.clone()).unwrap();
    connector.submit((0..10).map(event).collect()).unwrap();
    // Nothing was published (no broker): an ack through 1,000,000 — or
    // through 5 — is a lie.
    (connector.ack_hook())(1_000_000);
    (connector.ack_hook())(5);
    // The flush command queues behind both acks on the flush thread's
    // channel: once it is answered, the acks have been handled.
    connector.flush(Duration::from_secs(5)).unwrap();
    assert_eq!(connector.status().unacknowledged, 10);
    connector.shutdown().unwrap();
    assert_eq!(daemoneye_wal::inspect(&dir.path().join("wal")).unwrap().watermark, 0);
    // After a restart the records count as sent by the earlier run, so the
    // store may acknowledge them (it may have them from before the crash).
    let connector = Connector::start(cfg, &dir.path().join("wal"), client, actor_tx).unwrap();
    (connector.ack_hook())(5);
    assert!(wait_until(Duration::from_secs(5), || connector.status().unacknowledged == 5));
}

/// Only the store truncates the WAL: a `StoreAck` from any other bus
/// client (the broker names the sender) changes nothing, even one that is
/// allowed to publish on the ack topic.
#[test]
fn a_store_ack_from_anyone_but_the_store_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let _broker = broker(dir.path());
    let (client, actor_tx, _inbox, cfg) = parts(dir.path());
    assert!(client.wait_connected(Duration::from_secs(5)));
    let mut connector =
        Connector::start(cfg, &dir.path().join("wal"), client.clone(), actor_tx.clone()).unwrap();
    connector.submit((0..10).map(event).collect()).unwrap();
    connector.flush(Duration::from_secs(5)).unwrap();
    assert_eq!(connector.status().unacknowledged, 10);
    let ack = daemoneye_contract::control::encode(&daemoneye_contract::control::StoreAck {
        stream_id: connector.stream_id(),
        through: 10,
    });
    let topic = daemoneye_contract::control::ack_topic("pm");
    let intruder =
        daemoneye_bus::Client::connect(daemoneye_bus::ClientConfig::new(socket_path(dir.path()), "intruder"))
            .unwrap();
    assert!(intruder.wait_connected(Duration::from_secs(5)));
    intruder.publish_confirmed(&topic, &ack).unwrap();
    // Routed before the store's (one broker, one subscription, in order):
    // had the intruder's ack through 10 been taken, the store's through 4
    // would change nothing and nothing would be left unacknowledged.
    let store = daemoneye_bus::Client::connect(daemoneye_bus::ClientConfig::new(
        socket_path(dir.path()),
        daemoneye_contract::ids::STORE_CLIENT_ID,
    ))
    .unwrap();
    assert!(store.wait_connected(Duration::from_secs(5)));
    let partial = daemoneye_contract::control::encode(&daemoneye_contract::control::StoreAck {
        stream_id: connector.stream_id(),
        through: 4,
    });
    store.publish_confirmed(&topic, &partial).unwrap();
    assert!(wait_until(Duration::from_secs(5), || connector.status().unacknowledged != 10));
    assert_eq!(connector.status().unacknowledged, 6, "an intruder's ack was taken");
    connector.shutdown().unwrap();
    assert_eq!(daemoneye_wal::inspect(&dir.path().join("wal")).unwrap().watermark, 4);
}
