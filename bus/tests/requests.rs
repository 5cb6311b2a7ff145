//! Requests the broker follows (protocol 4), against a real broker over a
//! Unix socket in a temp dir: no responders, a responder that leaves
//! without answering (alone, or one of several that got the request),
//! `LeastLoaded` by unanswered requests, a request's own strategy, and
//! `request_all` gathering every subscriber's answer.

use std::time::{Duration, Instant};

use daemoneye_bus::{Broker, BrokerConfig, Client, ClientConfig, ClientError, Strategy, Subscription};

const WAIT: Duration = Duration::from_secs(10);

fn client(path: &std::path::Path, id: &str) -> Client {
    let mut cfg = ClientConfig::new(path, id);
    cfg.backoff_max = Duration::from_millis(200);
    let c = Client::connect(cfg).expect("client");
    assert!(c.wait_connected(WAIT), "{id} never connected");
    c
}

/// A broker on a socket in a fresh temp dir (kept alive by the caller).
fn broker() -> (tempfile::TempDir, std::path::PathBuf, Broker) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("bus.sock");
    let broker = Broker::start(BrokerConfig::new(&path)).expect("broker");
    (tmp, path, broker)
}

/// A member that answers every request with its own id, on a thread;
/// returns when its subscription closes.
fn answer_all(c: Client, sub: Subscription) -> std::thread::JoinHandle<usize> {
    std::thread::spawn(move || {
        let mut n = 0;
        while let Ok(m) = sub.messages().recv() {
            n += 1;
            if c.reply(&m, b"ok").is_err() {
                break;
            }
        }
        n
    })
}

#[test]
fn a_responder_that_leaves_without_answering_is_reported_at_once() {
    let (_tmp, path, _broker) = broker();
    let agent = client(&path, "agent");
    let worker = client(&path, "worker");
    let sub = worker.queue_subscribe("tasks.x", "g", Strategy::RoundRobin).expect("qsub");
    worker.publish_confirmed("sync", b"").expect("sync");

    let leaver = std::thread::spawn(move || {
        // Take the request, then disconnect without answering.
        let m = sub.recv_timeout(WAIT).expect("request delivered");
        drop(sub);
        worker.close();
        m.from
    });
    let started = Instant::now();
    let long = Duration::from_secs(30);
    match agent.request("tasks.x", b"work", long) {
        Err(ClientError::ResponderGone { responder }) => assert_eq!(responder, "worker"),
        other => panic!("expected ResponderGone, got {other:?}"),
    }
    assert!(started.elapsed() < long / 3, "reported after {:?}, not at the timeout", started.elapsed());
    assert_eq!(leaver.join().expect("leaver"), "agent", "the delivery names the requester");
    // Nobody is left in the group.
    match agent.request("tasks.x", b"work", long) {
        Err(ClientError::NoResponders { topic }) => assert_eq!(topic, "tasks.x"),
        other => panic!("expected NoResponders, got {other:?}"),
    }
}

/// Two plain subscribers of `topic`, both past their subscription.
fn two_subscribers(path: &std::path::Path, topic: &str, ids: [&str; 2]) -> [(Client, Subscription); 2] {
    ids.map(|id| {
        let c = client(path, id);
        let sub = c.subscribe(topic).expect("sub");
        c.publish_confirmed("sync", b"").expect("sync");
        (c, sub)
    })
}

/// Closes a subscriber and waits until the broker has seen it leave (its
/// news, queued before the stats reply, has then reached `asker`).
fn leave(asker: &Client, (c, sub): (Client, Subscription)) {
    let before = asker.broker_stats(WAIT).expect("stats").connections;
    drop(sub);
    c.close();
    let deadline = Instant::now() + WAIT;
    while asker.broker_stats(WAIT).expect("stats").connections != before - 1 {
        assert!(Instant::now() < deadline, "the broker never saw it leave");
    }
}

#[test]
fn a_request_held_by_several_fails_only_when_the_last_of_them_leaves() {
    let (_tmp, path, _broker) = broker();
    let agent = client(&path, "agent");
    let long = Duration::from_secs(30);
    std::thread::scope(|s| {
        // One of two leaves without answering; the other still answers.
        let [leaver, (keeper, keeper_sub)] = two_subscribers(&path, "svc.z", ["leaver", "keeper"]);
        let asked = s.spawn(|| agent.request("svc.z", b"q1", long));
        leaver.1.recv_timeout(WAIT).expect("delivered to the leaver");
        let m = keeper_sub.recv_timeout(WAIT).expect("delivered to the keeper");
        leave(&agent, leaver);
        keeper.reply(&m, b"kept").expect("reply");
        let answer = asked.join().expect("requester").expect("answered by the one left");
        assert_eq!((answer.from.as_str(), answer.payload.as_slice()), ("keeper", &b"kept"[..]));
        drop((keeper_sub, keeper));

        // Both leave: the first departure is not the end, the second is.
        let [first, second] = two_subscribers(&path, "svc.w", ["first", "second"]);
        let started = Instant::now();
        let asked = s.spawn(|| agent.request("svc.w", b"q2", long));
        first.1.recv_timeout(WAIT).expect("delivered to the first");
        second.1.recv_timeout(WAIT).expect("delivered to the second");
        leave(&agent, first);
        assert!(!asked.is_finished(), "failed while the second still held it");
        leave(&agent, second);
        match asked.join().expect("requester") {
            Err(ClientError::ResponderGone { responder }) => assert_eq!(responder, "second"),
            other => panic!("expected ResponderGone, got {other:?}"),
        }
        assert!(started.elapsed() < long / 3, "reported after {:?}", started.elapsed());
    });
}

#[test]
fn least_loaded_avoids_a_member_with_unanswered_requests_and_a_request_may_choose_it() {
    let (_tmp, path, _broker) = broker();
    let agent = client(&path, "agent");
    // The group itself is round robin (its first member says so).
    let stalled = client(&path, "stalled");
    let stalled_sub = stalled.queue_subscribe("tasks.y", "g", Strategy::RoundRobin).expect("qsub");
    let idle = client(&path, "idle");
    let idle_sub = idle.queue_subscribe("tasks.y", "g", Strategy::LeastLoaded).expect("qsub");
    stalled.publish_confirmed("sync", b"").expect("sync");
    idle.publish_confirmed("sync", b"").expect("sync");
    let idle_thread = answer_all(idle, idle_sub);

    // Round robin (the group's own): the stalled member gets its turn and
    // does not answer.
    let mut timed_out = 0;
    for _ in 0..2 {
        match agent.request("tasks.y", b"rr", Duration::from_millis(300)) {
            Ok(m) => assert_eq!(m.from, "idle"),
            Err(ClientError::Timeout(_)) => timed_out += 1,
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(timed_out, 1, "round robin sends one of two to the stalled member");
    // LeastLoaded by the request's choice: the stalled member has an
    // unanswered request, so every one goes to the idle member.
    for i in 0..50 {
        let m = agent
            .request_with("tasks.y", b"ll", WAIT, Some(Strategy::LeastLoaded))
            .unwrap_or_else(|e| panic!("request {i}: {e}"));
        assert_eq!(m.from, "idle", "request {i}");
    }
    // Once the stalled member answers what it holds, it is even again and
    // ties go in turn.
    let held = stalled_sub.recv_timeout(WAIT).expect("the held request");
    assert_eq!(held.payload, b"rr");
    stalled.reply(&held, b"late").expect("late reply");
    stalled.publish_confirmed("sync", b"").expect("sync");
    let stalled_thread = answer_all(stalled, stalled_sub);
    let mut from = std::collections::HashMap::<String, u32>::new();
    for _ in 0..20 {
        let m = agent.request_with("tasks.y", b"ll", WAIT, Some(Strategy::LeastLoaded)).expect("reply");
        *from.entry(m.from).or_default() += 1;
    }
    assert_eq!(from.get("stalled"), Some(&10), "{from:?}");
    assert_eq!(from.get("idle"), Some(&10), "{from:?}");
    drop(agent);
    drop(stalled_thread);
    drop(idle_thread);
}

#[test]
fn request_all_gathers_every_answer_and_names_who_left() {
    let (_tmp, path, _broker) = broker();
    let agent = client(&path, "agent");
    let mut threads = Vec::new();
    for id in ["c1", "c2"] {
        let c = client(&path, id);
        let sub = c.subscribe("tasks.all").expect("sub");
        c.publish_confirmed("sync", b"").expect("sync");
        threads.push(answer_all(c, sub));
    }
    let silent = client(&path, "silent");
    let silent_sub = silent.subscribe("tasks.all").expect("sub");
    silent.publish_confirmed("sync", b"").expect("sync");

    let window = Duration::from_secs(5);
    let started = Instant::now();
    let replies = agent.request_all("tasks.all", b"everyone", window).expect("request_all");
    let mut answered = Vec::new();
    let mut gone = Vec::new();
    while answered.len() + gone.len() < 3 {
        match replies.recv_timeout(WAIT).expect("an answer or news") {
            Ok(m) => answered.push(m.from),
            Err(ClientError::ResponderGone { responder }) => gone.push(responder),
            Err(e) => panic!("{e}"),
        }
        if answered.len() == 2 && gone.is_empty() {
            // The third got it and leaves without answering.
            silent_sub.recv_timeout(WAIT).expect("delivered to the silent one too");
            drop(silent_sub);
            silent.close();
            break;
        }
    }
    match replies.recv_timeout(WAIT).expect("news of the silent one") {
        Err(ClientError::ResponderGone { responder }) => gone.push(responder),
        other => panic!("{other:?}"),
    }
    answered.sort();
    assert_eq!(answered, ["c1", "c2"]);
    assert_eq!(gone, ["silent"]);
    assert!(started.elapsed() < window, "all known before the window closed");
    // The channel closes at the end of the window.
    assert!(replies.recv_timeout(WAIT).is_err());
    assert!(started.elapsed() >= window);

    match agent.request_all("nobody.listens", b"?", window).expect("sent").recv_timeout(WAIT) {
        Ok(Err(ClientError::NoResponders { .. })) => {}
        other => panic!("expected NoResponders, got {other:?}"),
    }
}

#[test]
fn refused_requests_fail_at_once_and_an_inbox_takes_no_requests() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("bus.sock");
    let mut cfg = BrokerConfig::new(&path);
    cfg.default_permissions = Some(daemoneye_bus::Permissions {
        // bus.stats obeys the permissions too (protocol 5).
        publish: vec!["allowed.#".into(), daemoneye_bus::STATS_TOPIC.into()],
        subscribe: vec!["allowed.#".into()],
    });
    let _broker = Broker::start(cfg).expect("broker");
    let asker = client(&path, "asker");
    let worker = client(&path, "worker");
    let sub = worker.queue_subscribe("allowed.work", "g", Strategy::LeastLoaded).expect("qsub");
    worker.publish_confirmed("allowed.sync", b"").expect("sync");
    let long = Duration::from_secs(30);
    let started = Instant::now();
    // Not allowed to publish there; and into someone's inbox, where it
    // would sit unanswered and make the owner look loaded.
    for topic in ["forbidden.work", "direct.worker.r1x0"] {
        match asker.request(topic, b"?", long) {
            Err(ClientError::Refused { message, .. }) => assert!(message.contains(topic), "{message}"),
            other => panic!("{topic}: expected Refused, got {other:?}"),
        }
    }
    assert!(started.elapsed() < long / 3, "refused at once, not at the timeout");
    let stats = asker.broker_stats(WAIT).expect("stats");
    let held = stats.queues.iter().find(|q| q.client_id == "worker").map(|q| q.awaiting);
    assert_eq!(held, Some(0), "{stats:?}");
    // A responder that answers twice is handed over once by request_all.
    let twice = std::thread::spawn(move || {
        let m = sub.recv_timeout(WAIT).expect("request");
        worker.reply(&m, b"one").expect("reply");
        worker.reply(&m, b"two").expect("reply");
        (worker, sub)
    });
    let replies = asker.request_all("allowed.work", b"all", Duration::from_secs(2)).expect("sent");
    let got: Vec<Vec<u8>> = replies.iter().map(|r| r.expect("a reply").payload).collect();
    assert_eq!(got, [b"one".to_vec()]);
    let _ = twice.join().expect("responder");
}

#[test]
fn random_spreads_requests_over_every_member_in_no_fixed_order() {
    let (_tmp, path, _broker) = broker();
    let agent = client(&path, "agent");
    let mut members = Vec::new();
    for id in ["m1", "m2", "m3"] {
        let c = client(&path, id);
        let sub = c.queue_subscribe("tasks.r", "g", Strategy::RoundRobin).expect("qsub");
        c.publish_confirmed("sync", b"").expect("sync");
        members.push(answer_all(c, sub));
    }
    let picks: Vec<String> = (0..300)
        .map(|_| agent.request_with("tasks.r", b"?", WAIT, Some(Strategy::Random)).expect("reply").from)
        .collect();
    for id in ["m1", "m2", "m3"] {
        let n = picks.iter().filter(|p| *p == id).count();
        assert!((50..=150).contains(&n), "{id} got {n} of 300");
    }
    // Not the group's round robin: some member is picked twice in a row.
    assert!(picks.windows(2).any(|w| w[0] == w[1]), "a strict rotation");
    drop(agent);
    drop(members);
}
