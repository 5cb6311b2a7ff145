//! The broker over real Unix sockets in a temp dir, driven by raw clients
//! that speak the frame codec directly: routing modes, overflow accounting,
//! hostile input, socket safety and shutdown.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use daemoneye_bus::testing::RawConnection;
use daemoneye_bus::{Broker, BrokerConfig, BrokerError, ErrorCode, Frame, Mode, Overflow, Strategy, encode};

/// An owned copy of the frames a test client receives.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Got {
    Welcome,
    Deliver { sid: u64, topic: String, payload: Vec<u8>, reply_to: Option<String>, from: String },
    PubAck(u64),
    Error(ErrorCode, String),
    Pong(u64),
    Other(String),
}

/// The owned copy of a received frame.
fn got(f: Frame<'_>) -> Got {
    match f {
        Frame::WelcomeAs { .. } => Got::Welcome,
        Frame::Deliver { sid, topic, payload, reply_to, from } => Got::Deliver {
            sid,
            topic: topic.to_owned(),
            payload: payload.to_vec(),
            reply_to: reply_to.map(str::to_owned),
            from: from.to_owned(),
        },
        Frame::PubAck { ack_id } => Got::PubAck(ack_id),
        Frame::Error { code, message, .. } => Got::Error(code, message.to_owned()),
        Frame::Pong(n) => Got::Pong(n),
        other => Got::Other(format!("{other:?}")),
    }
}

struct Raw(RawConnection);

impl Raw {
    fn connect(path: &Path) -> Raw {
        Raw(RawConnection::connect(path).expect("connect"))
    }

    /// Connects and completes the handshake.
    fn hello(path: &Path, id: &str) -> Raw {
        let mut r = Raw::connect(path);
        r.send(&Frame::Hello {
            protocol_version: daemoneye_bus::PROTOCOL_VERSION,
            client_id: id,
            pid: std::process::id(),
        });
        assert_eq!(r.recv(Duration::from_secs(5)), Some(Got::Welcome), "{id} handshake");
        r
    }

    fn send(&mut self, f: &Frame<'_>) {
        self.0.send(f).expect("write");
    }

    fn sub(&mut self, sid: u64, pattern: &str, mode: Mode<'_>, overflow: Overflow) {
        self.send(&Frame::Subscribe { sid, pattern, mode, overflow });
    }

    fn publish(&mut self, topic: &str, payload: &[u8]) {
        self.send(&Frame::Publish { topic, payload, reply_to: None, ack_id: None });
    }

    /// Everything sent before has been handled; what came back first.
    fn sync(&mut self, n: u64) -> Vec<Got> {
        self.0.sync(n, Duration::from_secs(5), got).unwrap_or_else(|_| panic!("no Pong {n}"))
    }

    /// The next frame, or `None` at timeout or end of stream.
    fn recv(&mut self, timeout: Duration) -> Option<Got> {
        self.0.recv(timeout, got)
    }

    /// Every delivery until `quiet` passes with nothing new.
    fn drain(&mut self, quiet: Duration) -> Vec<Got> {
        std::iter::from_fn(|| self.recv(quiet)).collect()
    }

    fn closed_by_broker(&mut self) -> bool {
        self.0.closed_within(Duration::from_secs(5))
    }
}

fn broker(dir: &Path, tweak: impl FnOnce(&mut BrokerConfig)) -> (Broker, PathBuf) {
    let path = dir.join("run").join("bus.sock");
    let mut cfg = BrokerConfig::new(&path);
    tweak(&mut cfg);
    (Broker::start(cfg).expect("start broker"), path)
}

fn delivered(got: &[Got]) -> Vec<(u64, Vec<u8>)> {
    got.iter()
        .filter_map(|g| match g {
            Got::Deliver { sid, payload, .. } => Some((*sid, payload.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn socket_is_private_stale_is_replaced_and_live_is_never_stolen() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().expect("tempdir");
    let (b, path) = broker(tmp.path(), |_| {});
    let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode(&path), 0o600);
    assert_eq!(mode(path.parent().expect("dir")), 0o700);
    match Broker::start(BrokerConfig::new(&path)) {
        Err(BrokerError::InUse { path: p }) => assert_eq!(p, path),
        Err(e) => panic!("expected InUse, got {e}"),
        Ok(_) => panic!("a live broker was displaced"),
    }
    b.shutdown();
    assert!(!path.exists(), "shutdown removes the socket");
    // A socket file left by a dead process is replaced.
    drop(std::os::unix::net::UnixListener::bind(&path).expect("stale"));
    assert!(path.exists());
    let b = Broker::start(BrokerConfig::new(&path)).expect("replaces a stale socket");
    let _ok = Raw::hello(&path, "after-stale");
    drop(b);
}

#[test]
fn broadcast_queue_groups_direct_inbox_and_request_reply() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (b, path) = broker(tmp.path(), |_| {});
    let mut subs: Vec<Raw> = (0..3).map(|i| Raw::hello(&path, &format!("sub-{i}"))).collect();
    for s in &mut subs {
        s.sub(1, "events.process.+", Mode::Broadcast, Overflow::Block);
        s.sub(
            2,
            "tasks.proc",
            Mode::Queue { group: "workers", strategy: Strategy::RoundRobin },
            Overflow::Block,
        );
        let _ = s.sync(0);
    }
    let mut publisher = Raw::hello(&path, "agent");
    publisher.sub(9, "direct.agent", Mode::Broadcast, Overflow::Block);
    publisher.publish("events.process.started", b"e1");
    publisher.publish("events.process.stopped", b"e2");
    publisher.publish("events.other", b"not matched");
    for i in 0..30u8 {
        publisher.publish("tasks.proc", &[i]);
    }
    let _ = publisher.sync(1);
    let mut all_tasks = Vec::new();
    for s in &mut subs {
        let got = delivered(&s.drain(Duration::from_millis(300)));
        let events: Vec<_> = got.iter().filter(|(sid, _)| *sid == 1).map(|(_, p)| p.clone()).collect();
        assert_eq!(
            events,
            vec![b"e1".to_vec(), b"e2".to_vec()],
            "broadcast reaches every subscriber, in order"
        );
        let tasks: Vec<u8> = got.iter().filter(|(sid, _)| *sid == 2).map(|(_, p)| p[0]).collect();
        assert_eq!(tasks.len(), 10, "round robin splits 30 tasks 10/10/10");
        all_tasks.extend(tasks);
    }
    all_tasks.sort_unstable();
    assert_eq!(all_tasks, (0..30).collect::<Vec<u8>>(), "each task goes to exactly one member");

    // Request/reply through the requester's direct inbox.
    subs[0].sub(3, "rpc.echo", Mode::Broadcast, Overflow::Block);
    let _ = subs[0].sync(2);
    publisher.send(&Frame::Publish {
        topic: "rpc.echo",
        payload: b"ping",
        reply_to: Some("direct.agent"),
        ack_id: None,
    });
    let req = subs[0].recv(Duration::from_secs(5)).expect("request");
    let Got::Deliver { reply_to: Some(inbox), payload, from, .. } = req else { panic!("{req:?}") };
    assert_eq!((inbox.as_str(), payload.as_slice()), ("direct.agent", &b"ping"[..]));
    assert_eq!(from, "agent", "a delivery names its publisher as the broker knows it");
    subs[0].publish(&inbox, b"pong");
    let reply = publisher.recv(Duration::from_secs(5)).expect("reply");
    assert_eq!(
        reply,
        Got::Deliver {
            sid: 9,
            topic: "direct.agent".into(),
            payload: b"pong".to_vec(),
            reply_to: None,
            from: "sub-0".into()
        }
    );

    // Nobody may read another client's inbox.
    subs[1].sub(4, "direct.agent", Mode::Broadcast, Overflow::Block);
    assert!(matches!(subs[1].recv(Duration::from_secs(5)), Some(Got::Error(ErrorCode::Forbidden, _))));
    let stats = b.stats();
    assert_eq!(stats.connections, 4);
    assert!(stats.forbidden >= 1);
}

#[test]
fn hostile_clients_are_cut_off_and_a_good_client_loses_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (b, path) = broker(tmp.path(), |c| c.max_frame = 64 * 1024);
    let mut good_sub = Raw::hello(&path, "good-sub");
    good_sub.sub(1, "events.#", Mode::Broadcast, Overflow::Block);
    let _ = good_sub.sync(0);
    let mut good_pub = Raw::hello(&path, "good-pub");

    let mut hello = Vec::new();
    encode(
        &Frame::Hello { protocol_version: daemoneye_bus::PROTOCOL_VERSION, client_id: "evil", pid: 1 },
        &mut hello,
        1 << 20,
    )
    .expect("enc");
    let mut publish = Vec::new();
    encode(
        &Frame::Publish { topic: "events.x", payload: b"p", reply_to: None, ack_id: None },
        &mut publish,
        1 << 20,
    )
    .expect("enc");
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("garbage", b"\x05\x00\x00\x00\xff\xfe\xfd\xfc\xfb".to_vec()),
        ("oversize prefix", u32::MAX.to_le_bytes().to_vec()),
        ("unknown kind", [hello.clone(), vec![1, 0, 0, 0, 200]].concat()),
        ("frame before hello", publish.clone()),
        ("wrong version", {
            let mut v = Vec::new();
            encode(&Frame::Hello { protocol_version: 99, client_id: "old", pid: 1 }, &mut v, 1 << 20)
                .expect("enc");
            v
        }),
        ("the broker's own sender id", {
            let mut v = Vec::new();
            encode(
                &Frame::Hello { protocol_version: daemoneye_bus::PROTOCOL_VERSION, client_id: "bus", pid: 1 },
                &mut v,
                1 << 20,
            )
            .expect("enc");
            v
        }),
        ("server frame from a client", {
            let mut v = hello.clone();
            encode(
                &Frame::Welcome { protocol_version: daemoneye_bus::PROTOCOL_VERSION, max_frame: 1 },
                &mut v,
                1 << 20,
            )
            .expect("enc");
            v
        }),
    ];
    let mut sent = 0u8;
    for (name, bytes) in &cases {
        let mut evil = Raw::connect(&path);
        evil.0.get_mut().write_all(bytes).expect("write hostile bytes");
        assert!(evil.closed_by_broker(), "{name}: the broker must close the connection");
        // The good pair keeps working between attacks.
        good_pub.publish("events.ok", &[sent]);
        sent += 1;
    }
    // A truncated frame followed by a hang-up.
    let mut evil = Raw::connect(&path);
    evil.0.get_mut().write_all(&hello[..hello.len() - 1]).expect("write");
    drop(evil);
    // Forbidden and malformed topics get an error, not a close.
    let mut rude = Raw::hello(&path, "rude");
    rude.publish("Bad Topic", b"x");
    assert!(matches!(rude.recv(Duration::from_secs(5)), Some(Got::Error(ErrorCode::BadTopic, _))));
    rude.sub(5, "#", Mode::Broadcast, Overflow::Block);
    assert!(matches!(rude.recv(Duration::from_secs(5)), Some(Got::Error(ErrorCode::Forbidden, _))));
    rude.send(&Frame::Ping(7));
    assert_eq!(rude.recv(Duration::from_secs(5)), Some(Got::Pong(7)), "still served after refusals");

    let _ = good_pub.sync(1);
    let got: Vec<u8> =
        delivered(&good_sub.drain(Duration::from_millis(300))).iter().map(|(_, p)| p[0]).collect();
    assert_eq!(got, (0..sent).collect::<Vec<u8>>(), "the good client saw every message, in order");
    let stats = b.stats();
    // The reserved id is a refusal; the other cases are protocol errors.
    assert!(stats.refused >= 1 && stats.protocol_errors >= cases.len() as u64 - 1, "{stats:?}");
}

const FLOOD: u64 = 200;

/// A subscriber with an 8-message queue, a publisher sending `FLOOD`
/// 32 KiB messages (big enough that the kernel's socket buffer takes only
/// a few). With `reader` the subscriber reads all along (Block needs it:
/// the publisher stalls until it does); without, it reads only after the
/// flood. Returns the broker's drop count, what the subscriber read, and
/// what the publisher got back.
fn flood(overflow: Overflow, reader: bool) -> (u64, Vec<Got>, Vec<Got>) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (b, path) = broker(tmp.path(), |c| {
        c.queue_limit_msgs = 8;
        c.queue_limit_bytes = 1 << 30;
    });
    let mut slow = Raw::hello(&path, "slow");
    slow.sub(1, "flood", Mode::Broadcast, overflow);
    let _ = slow.sync(0);
    let (mut stalled, reading) = if reader {
        (None, Some(std::thread::spawn(move || slow.drain(Duration::from_millis(1500)))))
    } else {
        (Some(slow), None)
    };
    let mut publisher = Raw::hello(&path, "flood-pub");
    for i in 0..FLOOD {
        let mut p = vec![7u8; 32 * 1024];
        p[..8].copy_from_slice(&i.to_le_bytes());
        publisher.publish("flood", &p);
    }
    let mut pub_frames = publisher.sync(1);
    pub_frames.extend(publisher.drain(Duration::from_millis(200)));
    let got = match (reading, stalled.as_mut()) {
        (Some(h), _) => h.join().expect("reader"),
        // Only now does the stalled subscriber read.
        (None, Some(s)) => s.drain(Duration::from_millis(500)),
        (None, None) => Vec::new(),
    };
    (b.stats().dropped, got, pub_frames)
}

fn seqs(got: &[Got]) -> Vec<u64> {
    delivered(got).iter().map(|(_, p)| u64::from_le_bytes(p[..8].try_into().expect("8 bytes"))).collect()
}

#[test]
fn overflow_strategies_account_for_every_message() {
    for overflow in [Overflow::DropNewest, Overflow::DropOldest, Overflow::Error] {
        let (dropped, got, pub_frames) = flood(overflow, false);
        let seqs = seqs(&got);
        assert!(dropped > 0, "{overflow:?}: a stalled subscriber must overflow");
        assert_eq!(seqs.len() as u64 + dropped, FLOOD, "{overflow:?}: received + dropped = published");
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{overflow:?}: order kept");
        match overflow {
            Overflow::DropNewest => assert_eq!(seqs[0], 0, "the oldest survive"),
            Overflow::DropOldest => assert_eq!(seqs.last().copied(), Some(FLOOD - 1), "the newest survive"),
            _ => {
                let errors =
                    pub_frames.iter().filter(|g| matches!(g, Got::Error(ErrorCode::Overflow, _))).count();
                assert_eq!(errors as u64, dropped, "one Error frame per dropped message");
            }
        }
    }
}

#[test]
fn block_strategy_applies_backpressure_and_drops_nothing() {
    let (dropped, got, _) = flood(Overflow::Block, true);
    assert_eq!(dropped, 0);
    assert_eq!(seqs(&got), (0..FLOOD).collect::<Vec<_>>(), "every message, in order");
}

#[test]
fn per_client_permissions_limit_publish_and_subscribe() {
    use daemoneye_bus::{ClientPermissions, Permissions};
    let tmp = tempfile::tempdir().expect("tempdir");
    let collectors = ClientPermissions {
        client: "collector-*".into(),
        permissions: Permissions {
            publish: vec!["events.process.#".into(), "control.health.heartbeat.{client_id}".into()],
            subscribe: vec!["control.collector.{client_id}".into(), "control.collector.lifecycle".into()],
        },
    };
    let (b, path) = broker(tmp.path(), |c| c.permissions = vec![collectors]);
    let mut agent = Raw::hello(&path, "agent");
    agent.sub(1, "+.process.started", Mode::Broadcast, Overflow::Block);
    assert!(matches!(agent.recv(Duration::from_secs(5)), Some(Got::Error(ErrorCode::Forbidden, _))));
    agent.sub(2, "control.health.heartbeat.+", Mode::Broadcast, Overflow::Block);
    agent.sub(3, "events.process.+", Mode::Broadcast, Overflow::Block);
    let _ = agent.sync(0);

    let mut c1 = Raw::hello(&path, "collector-1");
    c1.publish("events.process.started", b"ok");
    c1.publish("control.health.heartbeat.collector-1", b"own heartbeat");
    c1.publish("control.health.heartbeat.collector-2", b"forged");
    c1.publish("control.collector.lifecycle", b"not the agent");
    c1.sub(4, "control.collector.collector-1", Mode::Broadcast, Overflow::Block);
    c1.sub(5, "control.collector.+", Mode::Broadcast, Overflow::Block);
    c1.sub(6, "events.#", Mode::Broadcast, Overflow::Block);
    let before = c1.sync(1);
    let forbidden: Vec<&Got> =
        before.iter().filter(|g| matches!(g, Got::Error(ErrorCode::Forbidden, _))).collect();
    assert_eq!(forbidden.len(), 4, "two forged publishes and two wide subscriptions are refused: {before:?}");
    // The agent, with no entry, is unrestricted and may command collector-1.
    agent.publish("control.collector.collector-1", b"health?");
    let got = c1.recv(Duration::from_secs(5)).expect("command");
    assert!(matches!(&got, Got::Deliver { sid: 4, payload, .. } if payload == b"health?"), "{got:?}");
    let seen: Vec<Vec<u8>> =
        delivered(&agent.drain(Duration::from_millis(300))).into_iter().map(|(_, p)| p).collect();
    assert_eq!(
        seen,
        vec![b"ok".to_vec(), b"own heartbeat".to_vec()],
        "only the allowed publishes were routed"
    );
    assert!(b.stats().forbidden >= 5);

    let bad = BrokerConfig {
        default_permissions: Some(Permissions { publish: vec!["a.#.b".into()], subscribe: vec![] }),
        ..BrokerConfig::new(tmp.path().join("other.sock"))
    };
    assert!(matches!(Broker::start(bad), Err(BrokerError::Config(m)) if m.contains("a.#.b")));
}

#[test]
fn a_subscriber_over_its_limit_past_the_deadline_is_disconnected() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (b, path) = broker(tmp.path(), |c| {
        c.queue_limit_msgs = 4;
        c.slow_consumer_deadline = Duration::from_millis(300);
    });
    let mut stalled = Raw::hello(&path, "stalled");
    stalled.sub(1, "flood", Mode::Broadcast, Overflow::DropNewest);
    let _ = stalled.sync(0);
    let mut publisher = Raw::hello(&path, "pub");
    for _ in 0..64 {
        publisher.publish("flood", &vec![1u8; 32 * 1024]);
    }
    let _ = publisher.sync(1);
    // The subscriber reads nothing; the broker must give up on it rather
    // than hold its queue forever.
    let deadline = Instant::now() + Duration::from_secs(10);
    while b.stats().slow_disconnects == 0 {
        assert!(Instant::now() < deadline, "never disconnected: {:?}", b.stats());
        // Keep its queue full: the kernel's socket buffer soaks up the
        // first few messages.
        publisher.publish("flood", &vec![1u8; 32 * 1024]);
        let _ = publisher.sync(9);
    }
    assert_eq!(b.stats().slow_disconnects, 1);
    assert!(stalled.closed_by_broker(), "the slow subscriber's connection is closed");
    // The publisher is unaffected.
    assert_eq!(publisher.sync(2), Vec::new());
}

#[test]
fn the_connection_cap_pauses_accepting_and_resumes_below_ninety_percent() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (b, path) = broker(tmp.path(), |c| c.max_connections = 2);
    let first = Raw::hello(&path, "one");
    let _second = Raw::hello(&path, "two");
    // The third connects at the socket level (the kernel's backlog) but is
    // not served while the broker is at its cap.
    let mut third = Raw::connect(&path);
    third.send(&Frame::Hello {
        protocol_version: daemoneye_bus::PROTOCOL_VERSION,
        client_id: "three",
        pid: 3,
    });
    assert_eq!(third.recv(Duration::from_millis(500)), None, "served over the cap");
    assert_eq!(b.stats().connections, 2);
    drop(first);
    assert_eq!(third.recv(Duration::from_secs(5)), Some(Got::Welcome), "served once below 90% of the cap");
}
