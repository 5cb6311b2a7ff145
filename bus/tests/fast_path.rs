//! The client's fast path (a caller encodes and writes its own frame when
//! the connection is live and nothing is queued ahead of it) against a real
//! broker: each caller's frames stay in order across the switch between
//! the fast path and the command channel (a subscribe just before a
//! publish, publishes racing reconnections), backpressure reaches a caller
//! that writes itself, and replies reach requesters however they race.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use daemoneye_bus::{Broker, BrokerConfig, Client, ClientConfig, ClientError, ConnectionState};

const WAIT: Duration = Duration::from_secs(10);

fn client(path: &std::path::Path, id: &str) -> Client {
    let mut cfg = ClientConfig::new(path, id);
    cfg.backoff_min = Duration::from_millis(5);
    cfg.backoff_max = Duration::from_millis(50);
    let c = Client::connect(cfg).expect("client");
    assert!(c.wait_connected(WAIT), "{id} never connected");
    c
}

fn seq(m: &daemoneye_bus::Message) -> u64 {
    u64::from_le_bytes(m.payload[..8].try_into().expect("8 bytes"))
}

#[test]
fn a_publish_right_after_a_subscribe_goes_out_after_it() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("bus.sock");
    let _broker = Broker::start(BrokerConfig::new(&path)).expect("broker");
    let c = client(&path, "c");
    // The Subscribe goes through the command channel; the publish that
    // follows must not overtake it on the fast path (the broker would
    // route it before the subscription exists).
    for i in 0..300 {
        let topic = format!("order.t{i}");
        let sub = c.subscribe(&topic).expect("subscribe");
        c.publish(&topic, b"x").expect("publish");
        assert!(sub.recv_timeout(WAIT).is_some(), "publish {i} overtook its subscription");
    }
}

#[test]
fn callers_sharing_a_client_keep_their_order_while_others_take_the_slow_path() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("bus.sock");
    let _broker = Broker::start(BrokerConfig::new(&path)).expect("broker");
    let mut cfg = ClientConfig::new(&path, "sub");
    cfg.subscription_capacity = 100_000;
    let sub = Client::connect(cfg).expect("client");
    assert!(sub.wait_connected(WAIT));
    let s = sub.subscribe("seq.#").expect("subscribe");
    sub.sync().expect("in place");
    let c = Arc::new(client(&path, "pub"));
    const N: u64 = 5000;
    let done = Arc::new(AtomicBool::new(false));
    // Subscriptions coming and going push commands into the channel, so
    // the publishers switch between the fast and the slow path.
    let churn = {
        let (c, done) = (c.clone(), done.clone());
        std::thread::spawn(move || {
            let mut i = 0;
            while !done.load(Ordering::Relaxed) {
                drop(c.subscribe(&format!("churn.{i}")).expect("subscribe"));
                i += 1;
            }
        })
    };
    let publishers: Vec<_> = (0..3u64)
        .map(|t| {
            let c = c.clone();
            std::thread::spawn(move || {
                for i in 0..N {
                    let mut p = i.to_le_bytes().to_vec();
                    p.push(t as u8);
                    c.publish(&format!("seq.{t}"), &p).expect("publish");
                }
                c.publish_confirmed(&format!("seq.{t}"), &u64::MAX.to_le_bytes()).expect("confirm");
            })
        })
        .collect();
    for p in publishers {
        p.join().expect("publisher");
    }
    done.store(true, Ordering::Relaxed);
    churn.join().expect("churn");
    sub.sync().expect("sync");
    let mut next = [0u64; 3];
    for m in s.messages().try_iter() {
        let t: usize = m.topic["seq.".len()..].parse().expect("thread");
        let n = seq(&m);
        if n == u64::MAX {
            assert_eq!(next[t], N, "thread {t}: every publish arrived before its confirmed one");
            next[t] = u64::MAX;
            continue;
        }
        assert_eq!(n, next[t], "thread {t}: out of order or lost");
        next[t] += 1;
    }
    assert_eq!(next, [u64::MAX; 3], "every thread's last message arrived");
}

#[test]
fn publishes_racing_reconnections_stay_in_order() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("bus.sock");
    let mut broker = Some(Broker::start(BrokerConfig::new(&path)).expect("broker"));
    // One client both publishes and subscribes: after a reconnect its
    // subscription is renewed ahead of its outbox and of anything
    // published after, so all of those come back, in order.
    let mut cfg = ClientConfig::new(&path, "loop");
    cfg.backoff_min = Duration::from_millis(5);
    cfg.backoff_max = Duration::from_millis(20);
    cfg.subscription_capacity = 1 << 20;
    let c = Arc::new(Client::connect(cfg).expect("client"));
    assert!(c.wait_connected(WAIT));
    let s = c.subscribe("loop.seq").expect("subscribe");
    c.sync().expect("in place");
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = {
        let (c, stop) = (c.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                match c.publish("loop.seq", &i.to_le_bytes()) {
                    Ok(()) => i += 1,
                    // The outbox is full while away: try again.
                    Err(ClientError::BufferFull { .. }) => std::thread::sleep(Duration::from_millis(1)),
                    Err(e) => panic!("publish {i}: {e}"),
                }
            }
            i
        })
    };
    for round in 0..4 {
        std::thread::sleep(Duration::from_millis(100));
        broker.take().expect("running").shutdown();
        assert!(c.wait_state(WAIT, |s| s == ConnectionState::Disconnected), "round {round}: saw it go");
        std::thread::sleep(Duration::from_millis(30));
        broker = Some(Broker::start(BrokerConfig::new(&path)).expect("restart"));
        assert!(c.wait_connected(WAIT), "round {round}: reconnected");
    }
    std::thread::sleep(Duration::from_millis(100));
    stop.store(true, Ordering::Relaxed);
    let sent = publisher.join().expect("publisher");
    c.publish_confirmed("loop.seq", &u64::MAX.to_le_bytes()).expect("confirm");
    c.sync().expect("sync");
    let got: Vec<u64> = s.messages().try_iter().map(|m| seq(&m)).collect();
    assert_eq!(got.last(), Some(&u64::MAX), "the last one arrived");
    let got = &got[..got.len() - 1];
    assert!(got.windows(2).all(|w| w[0] < w[1]), "reordered across a reconnection");
    // Only what was in flight (written, or in the write buffer) when a
    // broker went may be missing.
    assert_eq!(got.last(), Some(&(sent - 1)), "everything after the last reconnection arrived");
    assert_eq!(c.connections(), 5);
}

#[test]
fn a_full_write_buffer_makes_a_direct_writer_wait_and_nothing_is_lost() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("bus.sock");
    let broker =
        Broker::start(BrokerConfig { queue_limit_msgs: 16, ..BrokerConfig::new(&path) }).expect("broker");
    let mut cfg = ClientConfig::new(&path, "slow");
    cfg.subscription_capacity = 4;
    let slow = Client::connect(cfg).expect("client");
    assert!(slow.wait_connected(WAIT));
    let sub = slow.subscribe("flood").expect("subscribe");
    slow.sync().expect("in place");
    let mut cfg = ClientConfig::new(&path, "fast");
    cfg.write_limit_bytes = 64 * 1024;
    cfg.timeout = Duration::from_millis(300);
    let publisher = Client::connect(cfg).expect("client");
    assert!(publisher.wait_connected(WAIT));
    // Nobody reads: the broker's queue, its reading of the publisher, the
    // socket and the write buffer fill, and then a publish waits out its
    // timeout.
    let payload = [0u8; 1020];
    let mut sent = 0u32;
    let blocked = loop {
        let p = [sent.to_le_bytes().as_slice(), &payload].concat();
        let started = Instant::now();
        match publisher.publish("flood", &p) {
            Ok(()) => sent += 1,
            Err(ClientError::Timeout(_)) => break started.elapsed(),
            Err(e) => panic!("publish {sent}: {e}"),
        }
        assert!(sent < 1_000_000, "no backpressure reached the publisher");
    };
    assert!(blocked >= Duration::from_millis(250), "gave up after {blocked:?}, not its timeout");
    assert_eq!(publisher.state(), ConnectionState::Connected, "a full buffer is not a disconnection");
    // Every publish that returned Ok arrives, in order, once read.
    for i in 0..sent {
        let m = sub.recv_timeout(WAIT).expect("every accepted publish arrives");
        assert_eq!(u32::from_le_bytes(m.payload[..4].try_into().expect("4 bytes")), i);
    }
    publisher.publish_confirmed("flood", b"\xff\xff\xff\xffagain").expect("room again");
    assert_eq!(sub.recv_timeout(WAIT).expect("after").payload, b"\xff\xff\xff\xffagain");
    assert_eq!((slow.dropped(), broker.stats().dropped), (0, 0));
}

#[test]
fn replies_reach_requesters_however_they_race() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("bus.sock");
    let _broker = Broker::start(BrokerConfig::new(&path)).expect("broker");
    let responder = client(&path, "responder");
    let rpc = responder.subscribe("rpc.echo").expect("subscribe");
    responder.sync().expect("in place");
    let answering = std::thread::spawn(move || {
        while let Some(m) = rpc.recv_timeout(Duration::from_secs(2)) {
            responder.reply(&m, &m.payload).expect("reply");
        }
    });
    let requester = Arc::new(client(&path, "requester"));
    // The reply comes in while nobody waits on the channel (only polled
    // without blocking), and is kept for the caller.
    let rx = requester.request_all("rpc.echo", b"early", WAIT).expect("request_all");
    let deadline = Instant::now() + WAIT;
    while rx.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(rx.try_recv().expect("kept for the caller").expect("reply").payload, b"early");
    // Several callers of one client, each matched with its own reply.
    let callers: Vec<_> = (0..3u64)
        .map(|t| {
            let r = requester.clone();
            std::thread::spawn(move || {
                for i in 0..500u64 {
                    let q = [t.to_le_bytes(), i.to_le_bytes()].concat();
                    assert_eq!(r.request("rpc.echo", &q, WAIT).expect("reply").payload, q);
                }
            })
        })
        .collect();
    for c in callers {
        c.join().expect("caller");
    }
    answering.join().expect("responder");
}
