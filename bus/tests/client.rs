//! The blocking client against a real broker over a Unix socket in a temp
//! dir: publish/subscribe, queue groups, request/reply, confirmations,
//! bad input, and reconnecting with re-subscription after the broker is
//! stopped and started again.

use std::time::Duration;

use daemoneye_bus::{Broker, BrokerConfig, Client, ClientConfig, ClientError, ConnectionState, Strategy};

const WAIT: Duration = Duration::from_secs(10);

fn client(path: &std::path::Path, id: &str) -> Client {
    let mut cfg = ClientConfig::new(path, id);
    cfg.backoff_max = Duration::from_millis(200);
    cfg.outbox_limit_bytes = 4096;
    let c = Client::connect(cfg).expect("client");
    assert!(c.wait_connected(WAIT), "{id} never connected");
    c
}

#[test]
fn publish_subscribe_queue_and_request_reply() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("bus.sock");
    let _broker = Broker::start(BrokerConfig::new(&path)).expect("broker");
    let a = client(&path, "a");
    let b = client(&path, "b");
    let agent = client(&path, "agent");

    let sa = a.subscribe("events.process.+").expect("sub");
    let qa = a.queue_subscribe("tasks.proc", "workers", Strategy::RoundRobin).expect("qsub");
    let qb = b.queue_subscribe("tasks.proc", "workers", Strategy::RoundRobin).expect("qsub");
    let rpc = b.subscribe("control.collector.b").expect("sub");
    // A confirmed publish proves the subscriptions before it are in place.
    a.publish_confirmed("sync.a", b"").expect("confirm a");
    b.publish_confirmed("sync.b", b"").expect("confirm b");

    agent.publish("events.process.started", b"one").expect("publish");
    let m = sa.recv_timeout(WAIT).expect("delivered");
    assert_eq!((m.topic.as_str(), m.payload.as_slice()), ("events.process.started", &b"one"[..]));

    for i in 0..20u8 {
        agent.publish("tasks.proc", &[i]).expect("publish task");
    }
    agent.publish_confirmed("sync.agent", b"").expect("confirm");
    let mut got: Vec<u8> = Vec::new();
    for q in [&qa, &qb] {
        let mine: Vec<u8> =
            std::iter::from_fn(|| q.recv_timeout(Duration::from_millis(300))).map(|m| m.payload[0]).collect();
        assert_eq!(mine.len(), 10, "round robin splits 20 tasks 10/10");
        got.extend(mine);
    }
    got.sort_unstable();
    assert_eq!(got, (0..20).collect::<Vec<u8>>());

    // Request/reply: b answers on the request's reply_to.
    let responder = std::thread::spawn(move || {
        let req = rpc.recv_timeout(WAIT).expect("request");
        b.reply(&req, b"healthy").expect("reply");
        b
    });
    let reply = agent.request("control.collector.b", b"health?", WAIT).expect("reply");
    assert_eq!(reply.payload, b"healthy");
    let _b = responder.join().expect("responder");
    match agent.request("control.collector.nobody", b"?", WAIT) {
        Err(ClientError::NoResponders { topic }) => assert_eq!(topic, "control.collector.nobody"),
        other => panic!("expected NoResponders at once, got {other:?}"),
    }
    // The broker answers stats requests itself.
    let stats = agent.broker_stats(WAIT).expect("stats over the bus");
    assert_eq!(stats.connections, 3);
    assert!(stats.subscriptions >= 4 && stats.published >= 21, "{stats:?}");
    assert!(stats.queues.iter().any(|q| q.client_id == "agent"), "{stats:?}");
    assert!(matches!(agent.publish("Not A Topic", b""), Err(ClientError::BadTopic(_))));
    assert!(matches!(agent.subscribe("a.#.b"), Err(ClientError::BadTopic(_))));
}

#[test]
fn a_guessed_reply_inbox_is_ignored_and_the_real_reply_still_answers() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("bus.sock");
    let _broker = Broker::start(BrokerConfig::new(&path)).expect("broker");
    let agent = client(&path, "agent");
    let collector = client(&path, "collector");
    let forger = client(&path, "forger");
    let rpc = collector.subscribe("control.collector.c").expect("sub");
    collector.publish_confirmed("sync.c", b"").expect("confirm");
    let asker = std::thread::spawn(move || {
        let reply = agent.request("control.collector.c", b"health?", WAIT);
        (agent, reply)
    });
    let req = rpc.recv_timeout(WAIT).expect("request");
    let inbox = req.reply_to.clone().expect("reply_to");
    // The forger knows the client id and guesses request numbers, with and
    // without a token; none of it is taken for the answer.
    for guess in ["direct.agent.r1", "direct.agent.r1x0000000000000000", "direct.agent.r2x1"] {
        forger.publish_confirmed(guess, b"forged").expect("publish to an inbox");
    }
    assert_ne!(inbox, "direct.agent.r1", "the inbox carries a token");
    collector.reply(&req, b"real").expect("reply");
    let (_agent, reply) = asker.join().expect("asker");
    let reply = reply.expect("answered");
    assert_eq!((reply.payload.as_slice(), reply.from.as_str()), (&b"real"[..], "collector"));
}

#[test]
fn until_opened_only_the_first_clients_are_welcomed_and_the_others_retry() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("bus.sock");
    let mut cfg = BrokerConfig::new(&path);
    cfg.first_clients = Some(vec!["host".to_owned()]);
    let broker = Broker::start(cfg).expect("broker");
    let host = client(&path, "host");
    let sub = host.subscribe("events.#").expect("sub");
    host.publish_confirmed("sync.host", b"").expect("confirm");
    let mut guest_cfg = ClientConfig::new(&path, "guest");
    guest_cfg.backoff_max = Duration::from_millis(100);
    let guest = Client::connect(guest_cfg).expect("guest");
    // Refused for now, and retrying.
    assert!(!guest.wait_connected(Duration::from_millis(500)), "welcomed before the broker opened");
    assert_ne!(guest.state(), ConnectionState::Refused, "a retryable refusal");
    broker.open();
    assert!(guest.wait_connected(WAIT), "welcomed once open");
    guest.publish("events.first", b"1").expect("publish");
    let m = sub.recv_timeout(WAIT).expect("the host's subscription was in place");
    assert_eq!(m.from, "guest");
}

#[test]
fn reconnects_and_resubscribes_after_the_broker_restarts() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("bus.sock");
    let broker = Broker::start(BrokerConfig::new(&path)).expect("broker");
    let sub = client(&path, "collector");
    let publisher = client(&path, "agent");
    let events = sub.subscribe("events.#").expect("sub");
    sub.publish_confirmed("sync.s", b"").expect("confirm");
    publisher.publish("events.before", b"1").expect("publish");
    assert_eq!(events.recv_timeout(WAIT).expect("before").payload, b"1");

    broker.shutdown();
    assert!(sub.wait_state(WAIT, |s| s == ConnectionState::Disconnected), "subscriber saw the broker go");
    assert!(publisher.wait_state(WAIT, |s| s == ConnectionState::Disconnected));
    // While away, publishes wait in a bounded outbox.
    publisher.publish("events.away", b"queued").expect("outbox has room");
    let big = vec![0u8; 8192];
    assert!(matches!(publisher.publish("events.away", &big), Err(ClientError::BufferFull { limit: 4096 })));

    let _broker = Broker::start(BrokerConfig::new(&path)).expect("restart broker");
    assert!(sub.wait_connected(WAIT), "subscriber reconnected");
    assert!(publisher.wait_connected(WAIT), "publisher reconnected");
    sub.publish_confirmed("sync.s", b"").expect("confirm after reconnect");
    publisher.publish("events.after", b"2").expect("publish");
    // The subscription was re-established without the caller doing anything.
    let after: Vec<Vec<u8>> =
        std::iter::from_fn(|| events.recv_timeout(Duration::from_millis(500))).map(|m| m.payload).collect();
    assert!(after.contains(&b"2".to_vec()), "got {after:?}");
}

#[test]
fn block_backpressure_reaches_the_publisher_and_nothing_is_dropped() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("bus.sock");
    let broker =
        Broker::start(BrokerConfig { queue_limit_msgs: 16, ..BrokerConfig::new(&path) }).expect("broker");
    let mut cfg = ClientConfig::new(&path, "slow");
    cfg.subscription_capacity = 4;
    let slow = Client::connect(cfg).expect("client");
    assert!(slow.wait_connected(WAIT));
    let sub = slow.subscribe("flood").expect("subscribe");
    slow.publish_confirmed("sync.slow", b"").expect("confirm");
    let publisher = client(&path, "fast");
    const N: u32 = 3000;
    let sender = std::thread::spawn(move || {
        for i in 0..N {
            publisher.publish("flood", &[i.to_le_bytes().as_slice(), &[0u8; 252]].concat()).expect("publish");
        }
        publisher
    });
    // The subscriber reads nothing until the broker holds a full queue for
    // it: the push-back went through its channel, its socket and the
    // broker's queue.
    let deadline = std::time::Instant::now() + WAIT;
    while !broker.stats().queues.iter().any(|q| q.client_id == "slow" && q.messages >= 16) {
        assert!(
            std::time::Instant::now() < deadline,
            "no backpressure reached the broker: {:?}",
            broker.stats()
        );
        std::thread::yield_now();
    }
    let got: Vec<u32> = (0..N)
        .map(|_| sub.recv_timeout(WAIT).expect("every message arrives"))
        .map(|m| u32::from_le_bytes(m.payload[..4].try_into().expect("4 bytes")))
        .collect();
    assert_eq!(got, (0..N).collect::<Vec<_>>(), "all, in order");
    let _publisher = sender.join().expect("publisher");
    assert_eq!((slow.dropped(), broker.stats().dropped), (0, 0), "Block drops nothing anywhere");
}

#[test]
fn refusals_are_reported_at_once_and_oversize_is_refused_locally() {
    use daemoneye_bus::{ClientPermissions, Permissions};
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("bus.sock");
    let cfg = BrokerConfig {
        permissions: vec![ClientPermissions {
            client: "collector-1".into(),
            permissions: Permissions { publish: vec!["events.#".into()], subscribe: vec![] },
        }],
        max_frame: 4096,
        ..BrokerConfig::new(&path)
    };
    let _broker = Broker::start(cfg).expect("broker");
    let c = client(&path, "collector-1");
    let started = std::time::Instant::now();
    match c.publish_confirmed("control.collector.lifecycle", b"forged") {
        Err(ClientError::Refused { code: daemoneye_bus::ErrorCode::Forbidden, .. }) => {}
        other => panic!("expected Refused(Forbidden), got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(2), "the refusal came back at once, not by timeout");
    c.publish_confirmed("events.ok", b"fine").expect("allowed");
    // Larger than the broker's maximum frame: refused here, connection kept.
    assert!(matches!(
        c.publish("events.big", &vec![0u8; 8192]),
        Err(ClientError::TooLarge { max: 4096, .. })
    ));
    c.publish_confirmed("events.ok", b"still connected").expect("connection kept");
    assert_eq!(c.connections(), 1);

    let mut old = ClientConfig::new(&path, "x");
    old.client_id = "has.dot".into();
    assert!(
        matches!(Client::connect(old), Err(ClientError::BadTopic(_))),
        "ids with dots are refused locally"
    );
}

#[test]
fn an_undrained_block_subscription_does_not_hold_up_replies_or_acks() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("bus.sock");
    let _broker = Broker::start(BrokerConfig::new(&path)).expect("broker");
    let mut cfg = ClientConfig::new(&path, "agent");
    cfg.subscription_capacity = 16;
    let agent = Client::connect(cfg).expect("client");
    assert!(agent.wait_connected(WAIT));
    let events = agent.subscribe("events.#").expect("subscribe");
    let responder = client(&path, "collector");
    let rpc = responder.subscribe("rpc.collector").expect("rpc");
    responder.publish_confirmed("sync.r", b"").expect("confirm");
    agent.publish_confirmed("sync.a", b"").expect("confirm");
    for i in 0..64u8 {
        responder.publish("events.process.started", &[i]).expect("publish");
    }
    responder.publish_confirmed("sync.r", b"").expect("events routed");
    // The events subscription is full and not drained; a request and a
    // confirmed publish must still go through at once.
    let answer = std::thread::spawn(move || {
        let req = rpc.recv_timeout(WAIT).expect("request");
        responder.reply(&req, b"fine").expect("reply");
        responder
    });
    let started = std::time::Instant::now();
    assert_eq!(agent.request("rpc.collector", b"?", WAIT).expect("reply").payload, b"fine");
    agent.publish_confirmed("sync.a", b"").expect("ack not held up");
    assert!(started.elapsed() < Duration::from_secs(2), "held up behind the full subscription");
    let _responder = answer.join().expect("responder");
    // And nothing was dropped: all 64 events are there, in order.
    let got: Vec<u8> = (0..64).map(|_| events.recv_timeout(WAIT).expect("event").payload[0]).collect();
    assert_eq!(got, (0..64).collect::<Vec<u8>>());
    assert_eq!(agent.dropped(), 0);
    // Requests, too, are checked against the broker's maximum frame.
    assert!(matches!(
        agent.request("rpc.collector", &vec![0u8; 2 << 20], WAIT),
        Err(ClientError::TooLarge { .. })
    ));
}

#[test]
fn a_second_live_connection_cannot_take_a_client_id() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("bus.sock");
    let broker = Broker::start(BrokerConfig::new(&path)).expect("broker");
    let first = client(&path, "agent");
    let mut cfg = ClientConfig::new(&path, "agent");
    cfg.backoff_max = Duration::from_millis(100);
    let second = Client::connect(cfg).expect("client");
    assert!(!second.wait_connected(Duration::from_millis(500)), "the id is taken while the first is alive");
    assert!(broker.stats().refused >= 1);
    // Once the first leaves, the second gets in on a retry.
    drop(first);
    assert!(second.wait_connected(WAIT), "retried and connected after the first left");
    let tiny = BrokerConfig { queue_limit_msgs: 1, ..BrokerConfig::new(tmp.path().join("x.sock")) };
    assert!(matches!(Broker::start(tiny), Err(daemoneye_bus::BrokerError::Config(_))));
}

#[test]
fn a_sync_returns_after_every_earlier_delivery_is_in_the_subscription() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("bus.sock");
    let _broker = Broker::start(BrokerConfig::new(&path)).expect("broker");
    let mut cfg = ClientConfig::new(&path, "sub");
    cfg.subscription_capacity = 4096;
    let sub = Client::connect(cfg).expect("client");
    assert!(sub.wait_connected(WAIT));
    let pb = client(&path, "pub");
    let s = sub.subscribe("load.#").expect("sub");
    sub.sync().expect("the subscription is in place");

    // Routed before the sync starts: the publisher's last is confirmed.
    let payload = vec![7u8; 1024];
    for _ in 0..1999 {
        pb.publish("load.x", &payload).expect("publish");
    }
    pb.publish_confirmed("load.x", &payload).expect("confirm");
    sub.sync().expect("sync");
    assert_eq!(s.messages().try_iter().count(), 2000, "every delivery routed before the sync is there");

    // No connection, no sync.
    drop(_broker);
    assert!(sub.wait_state(WAIT, |st| st != ConnectionState::Connected));
    assert!(matches!(sub.sync(), Err(ClientError::Disconnected)), "{:?}", sub.sync());
}
