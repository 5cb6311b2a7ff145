//! Trust on the bus (protocol 5), over real sockets with raw clients: ids
//! the broker can prove and ids it assigns, `reply_to` confined to the
//! publisher's inbox, `bus.stats` behind the permissions, `Block` only for
//! allowed subscribers, connection caps, idle and half-sent-frame
//! timeouts, and the client's check of the server's uid.
//!
//! The test process plays an unproven client by naming another process
//! (a `sleep` child it starts and kills) as the broker's host, and a
//! proven one by vouching for itself.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use daemoneye_bus::testing::RawConnection;
use daemoneye_bus::{
    Broker, BrokerConfig, Client, ClientConfig, ConnectionState, ErrorCode, Frame, Identities, Mode,
    Overflow, Permissions, encode,
};

const WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Got {
    Welcome { id: String, max_frame: u32 },
    Deliver { topic: String, from: String },
    PubAck(u64),
    Error(ErrorCode, String),
    Pong(u64),
    Other(String),
}

/// The owned copy of a received frame.
fn got(f: Frame<'_>) -> Got {
    match f {
        Frame::WelcomeAs { client_id, max_frame, .. } => Got::Welcome { id: client_id.to_owned(), max_frame },
        Frame::Deliver { topic, from, .. } => Got::Deliver { topic: topic.to_owned(), from: from.to_owned() },
        Frame::PubAck { ack_id } => Got::PubAck(ack_id),
        Frame::Error { code, message, .. } => Got::Error(code, message.to_owned()),
        Frame::Pong(n) => Got::Pong(n),
        other => Got::Other(format!("{other:?}")),
    }
}

struct Raw(RawConnection);

impl Raw {
    /// Connects, says Hello as `id` and returns the broker's first answer.
    fn hello(path: &Path, id: &str) -> (Raw, Got) {
        let mut r = Raw(RawConnection::connect(path).expect("connect"));
        r.send(&Frame::Hello { protocol_version: daemoneye_bus::PROTOCOL_VERSION, client_id: id, pid: 1 });
        let got = r.recv(WAIT).expect("an answer to Hello");
        (r, got)
    }

    /// Connects and expects to be welcomed; returns the id given.
    fn welcomed(path: &Path, id: &str) -> (Raw, String) {
        match Raw::hello(path, id) {
            (r, Got::Welcome { id, .. }) => (r, id),
            (_, other) => panic!("{id}: expected WelcomeAs, got {other:?}"),
        }
    }

    /// A write error is left for the next receive to show.
    fn send(&mut self, f: &Frame<'_>) {
        let _ = self.0.send(f);
    }

    fn sub(&mut self, sid: u64, pattern: &str, overflow: Overflow) {
        self.send(&Frame::Subscribe { sid, pattern, mode: Mode::Broadcast, overflow });
    }

    /// Handles everything sent before, returning what came back first.
    fn sync(&mut self, n: u64) -> Vec<Got> {
        self.0.sync(n, WAIT, got).unwrap_or_else(|before| panic!("no Pong {n}; got {before:?}"))
    }

    fn recv(&mut self, timeout: Duration) -> Option<Got> {
        self.0.recv(timeout, got)
    }

    /// Writes `n` publishes of `payload` to `topic`, then `Ping(ping)`, all
    /// at once from a thread through a clone of the stream: when the
    /// broker's push-back holds the writes up, it holds up only that thread.
    fn flood_from_thread(
        &self,
        topic: &'static str,
        payload: Vec<u8>,
        n: usize,
        ping: u64,
    ) -> JoinHandle<()> {
        let mut w = self.0.get_ref().try_clone().expect("clone");
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let publish = Frame::Publish { topic, payload: &payload, reply_to: None, ack_id: None };
            for _ in 0..n {
                encode(&publish, &mut bytes, 1 << 24).expect("encode");
            }
            encode(&Frame::Ping(ping), &mut bytes, 1 << 24).expect("encode");
            w.write_all(&bytes).expect("write");
        })
    }

    /// Whether the broker closed the connection within `timeout` (frames
    /// before the end are skipped).
    fn closed_within(&mut self, timeout: Duration) -> bool {
        self.0.closed_within(timeout)
    }
}

/// A process that stands for the broker's host, so this one is not it.
struct OtherProcess(std::process::Child);

impl OtherProcess {
    fn start() -> OtherProcess {
        OtherProcess(std::process::Command::new("sleep").arg("300").spawn().expect("spawn sleep"))
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for OtherProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn broker(dir: &Path, f: impl FnOnce(&mut BrokerConfig)) -> (Broker, PathBuf) {
    let path = dir.join("bus.sock");
    let mut cfg = BrokerConfig::new(&path);
    f(&mut cfg);
    (Broker::start(cfg).expect("broker"), path)
}

/// Waits for a condition the broker reaches asynchronously.
fn wait_for(cond: impl Fn() -> bool, what: &str) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn identities(host_pid: u32) -> Identities {
    Identities {
        host_pid,
        own: vec!["host*".into()],
        vouched: vec!["col-a".into(), "col-b".into(), "col-off".into()],
    }
}

#[test]
fn reserved_ids_need_proof_and_other_ids_are_assigned() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let host = OtherProcess::start();
    let other = OtherProcess::start();
    let (b, path) = broker(tmp.path(), |c| c.identities = Some(identities(host.pid())));
    let vouchers = b.vouchers();

    // The host's ids, from another process: refused, with the reason.
    match Raw::hello(&path, "host-store").1 {
        Got::Error(ErrorCode::Unproven, m) => {
            assert!(m.contains("host-store") && m.contains("reserved"), "{m}")
        }
        other => panic!("host id from a stranger: {other:?}"),
    }
    // A collector's id nobody vouched for (a disabled one), and one
    // vouched for another process (a restarting collector's window).
    vouchers.vouch("col-b", other.pid());
    for id in ["col-off", "col-a", "col-b"] {
        match Raw::hello(&path, id).1 {
            Got::Error(ErrorCode::Unproven, m) => assert!(m.contains(id), "{m}"),
            other => panic!("{id} unproven: {other:?}"),
        }
    }
    assert_eq!(b.stats().unproven, 4);

    // Vouched for this process: welcomed as asked, with the full frame.
    vouchers.vouch("col-a", std::process::id());
    let (mut col, id) = Raw::welcomed(&path, "col-a");
    assert_eq!(id, "col-a");
    // Only one holder at a time, even for the right process.
    assert!(matches!(Raw::hello(&path, "col-a").1, Got::Error(ErrorCode::Limit, _)));
    drop(col.sync(1));
    drop(col);
    // Revoked (the supervisor saw it exit): refused again.
    vouchers.revoke("col-a", std::process::id());
    let deadline = Instant::now() + WAIT;
    loop {
        match Raw::hello(&path, "col-a").1 {
            Got::Error(ErrorCode::Unproven, _) => break,
            // The old connection's close may not be seen yet.
            Got::Error(ErrorCode::Limit, _) if Instant::now() < deadline => {}
            other => panic!("revoked col-a: {other:?}"),
        }
    }

    // Any other id: one the broker assigns, unique and not reserved.
    let (mut cli, id1) = Raw::welcomed(&path, "cli-7");
    let (_cli2, id2) = Raw::welcomed(&path, "cli-7");
    assert!(id1.starts_with("bus-") && id1.ends_with("-cli-7"), "{id1}");
    assert_ne!(id1, id2);
    // Its inbox is the assigned id's, and deliveries name it so.
    cli.sub(1, &format!("direct.{id1}.#"), Overflow::DropNewest);
    cli.sub(2, "direct.cli-7.#", Overflow::DropNewest);
    cli.sub(3, "news", Overflow::DropNewest);
    let got = cli.sync(2);
    assert!(
        matches!(got.as_slice(), [Got::Error(ErrorCode::Forbidden, m)] if m.contains("direct.cli-7")),
        "{got:?}"
    );
    cli.send(&Frame::Publish { topic: "news", payload: b"x", reply_to: None, ack_id: None });
    let got = cli.sync(3);
    assert_eq!(got, [Got::Deliver { topic: "news".into(), from: id1.clone() }]);

    // The host itself proves its ids.
    let tmp2 = tempfile::tempdir().expect("tempdir");
    let (_b2, path2) = broker(tmp2.path(), |c| c.identities = Some(identities(std::process::id())));
    assert_eq!(Raw::welcomed(&path2, "host-store").1, "host-store");
}

#[test]
fn the_client_learns_its_assigned_id_and_requests_work_with_it() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let host = OtherProcess::start();
    let (_b, path) = broker(tmp.path(), |c| c.identities = Some(identities(host.pid())));
    let server = Client::connect(ClientConfig::new(&path, "server")).expect("client");
    let asker = Client::connect(ClientConfig::new(&path, "cli-1")).expect("client");
    assert!(server.wait_connected(WAIT) && asker.wait_connected(WAIT));
    assert!(asker.id().starts_with("bus-") && asker.id().ends_with("-cli-1"), "{}", asker.id());
    let sub = server.subscribe("svc.status").expect("subscribe");
    server.publish_confirmed("svc.sync", b"").expect("sync");
    let answering = std::thread::spawn(move || {
        let m = sub.recv_timeout(WAIT).expect("request");
        server.reply(&m, b"ok").expect("reply");
        (server, m.from)
    });
    let reply = asker.request("svc.status", b"?", WAIT).expect("reply");
    assert_eq!(reply.payload, b"ok");
    let (server, from) = answering.join().expect("server");
    assert_eq!(from, asker.id(), "the request names the assigned id");
    assert_eq!(reply.from, server.id());
    // A reserved id from a process that cannot prove it: refused with
    // Unproven, which the client retries (a collector may connect a moment
    // before its supervisor vouches for it); it never connects.
    let squatter = Client::connect(ClientConfig::new(&path, "host")).expect("client");
    assert!(!squatter.wait_connected(Duration::from_secs(1)));
    assert_eq!(squatter.state(), ConnectionState::Disconnected);
}

#[test]
fn reply_to_must_be_in_the_publishers_own_inbox_on_every_frame_kind() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (b, path) = broker(tmp.path(), |_| {});
    let (mut victim, _) = Raw::welcomed(&path, "victim");
    victim.sub(1, "control.lifecycle", Overflow::DropNewest);
    victim.sub(2, "status", Overflow::DropNewest);
    victim.sync(1);
    let (mut evil, _) = Raw::welcomed(&path, "evil");
    let forbidden_before = b.stats().forbidden;
    evil.send(&Frame::Publish {
        topic: "status",
        payload: b"?",
        reply_to: Some("control.lifecycle"),
        ack_id: Some(5),
    });
    evil.send(&Frame::Publish {
        topic: "status",
        payload: b"?",
        reply_to: Some("direct.victim.r1x2"),
        ack_id: Some(6),
    });
    evil.send(&Frame::Request {
        topic: "status",
        payload: b"?",
        reply_to: "control.lifecycle",
        strategy: None,
    });
    let got = evil.sync(2);
    assert_eq!(got.len(), 3, "{got:?}");
    assert!(got.iter().all(|g| matches!(g, Got::Error(ErrorCode::Forbidden, _))), "no PubAck: {got:?}");
    assert_eq!(b.stats().forbidden, forbidden_before + 3);
    assert_eq!(victim.sync(3), Vec::new(), "nothing reached the subscriber");
    // Its own inbox is fine.
    evil.send(&Frame::Publish {
        topic: "status",
        payload: b"?",
        reply_to: Some("direct.evil.r1x2"),
        ack_id: Some(7),
    });
    assert_eq!(evil.sync(4), [Got::PubAck(7)]);
    assert_eq!(victim.sync(5), [Got::Deliver { topic: "status".into(), from: "evil".into() }]);
}

#[test]
fn bus_stats_obeys_the_permissions() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (_b, path) = broker(tmp.path(), |c| {
        c.permissions = vec![daemoneye_bus::ClientPermissions {
            client: "operator".into(),
            permissions: Permissions { publish: vec!["bus.stats".into()], subscribe: Vec::new() },
        }];
        c.default_permissions = Some(Permissions { publish: vec!["events.#".into()], subscribe: Vec::new() });
    });
    let collector = Client::connect(ClientConfig::new(&path, "collector")).expect("client");
    let operator = Client::connect(ClientConfig::new(&path, "operator")).expect("client");
    assert!(collector.wait_connected(WAIT) && operator.wait_connected(WAIT));
    match collector.broker_stats(WAIT) {
        Err(daemoneye_bus::ClientError::Refused { .. }) => {}
        other => panic!("a collector read bus.stats: {other:?}"),
    }
    let (mut raw, _) = Raw::welcomed(&path, "raw");
    raw.send(&Frame::Publish {
        topic: "bus.stats",
        payload: b"",
        reply_to: Some("direct.raw.s"),
        ack_id: Some(1),
    });
    assert!(
        matches!(raw.sync(1).as_slice(), [Got::Error(ErrorCode::Forbidden, m)] if m.contains("bus.stats"))
    );
    assert!(operator.broker_stats(WAIT).expect("stats").connections >= 3);
}

#[test]
fn block_is_honoured_only_for_allowed_subscribers_and_never_pauses_a_publisher_otherwise() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (b, path) = broker(tmp.path(), |c| {
        c.block_allowed = Some(vec!["store".into()]);
        c.queue_limit_msgs = 16;
        c.slow_consumer_deadline = Duration::from_secs(2);
    });
    // A hostile Block subscriber that never reads.
    let (mut hostile, _) = Raw::welcomed(&path, "hostile");
    hostile.sub(1, "events.#", Overflow::Block);
    hostile.sync(1);
    let (mut publisher, _) = Raw::welcomed(&path, "publisher");
    let payload = vec![7u8; 32 * 1024];
    let started = Instant::now();
    // Far more than its queue and the kernel's buffers hold: a paused
    // publisher would get no Pong.
    for round in 0..20u64 {
        for _ in 0..16 {
            publisher.send(&Frame::Publish {
                topic: "events.x",
                payload: &payload,
                reply_to: None,
                ack_id: None,
            });
        }
        let got = publisher.sync(100 + round);
        assert!(got.is_empty(), "{got:?}");
    }
    assert!(started.elapsed() < Duration::from_secs(10), "the publisher was held up");
    assert!(b.stats().dropped > 0, "{:?}", b.stats());
    // Its own queue stays bounded: dropped down, never grown.
    let depth = b.stats().queues.iter().find(|q| q.client_id == "hostile").map(|q| q.messages);
    assert!(depth.is_none_or(|m| m <= 16), "{:?}", b.stats());

    drop(hostile);
    wait_for(|| b.stats().connections == 1, "the hostile subscriber gone");

    // The allowed subscriber's Block does push back.
    let (mut store, _) = Raw::welcomed(&path, "store");
    store.sub(1, "events.#", Overflow::Block);
    store.sync(1);
    // More than the kernel's socket buffers on both sides hold: the
    // writes happen on a thread, which the push-back holds up.
    const N: usize = 256;
    let writer = publisher.flood_from_thread("events.x", payload, N, 999);
    assert_eq!(publisher.recv(Duration::from_secs(1)), None, "paused behind the store");
    // The store drains: the publisher goes on, nothing dropped for it.
    let dropped = b.stats().dropped;
    let mut delivered = 0;
    while delivered < N {
        match store.recv(WAIT) {
            Some(Got::Deliver { .. }) => delivered += 1,
            other => panic!("store after {delivered}: {other:?}"),
        }
    }
    writer.join().expect("writer");
    assert_eq!(publisher.recv(WAIT), Some(Got::Pong(999)));
    assert_eq!(b.stats().dropped, dropped);
}

#[test]
fn connections_are_capped_per_process_and_uid_with_room_for_proven_ones() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let host = OtherProcess::start();
    let (b, path) = broker(tmp.path(), |c| {
        c.identities = Some(identities(host.pid()));
        c.max_connections = 100;
        c.max_connections_per_uid = 100;
        c.max_connections_per_pid = 3;
    });
    let held: Vec<Raw> = (0..3).map(|i| Raw::welcomed(&path, &format!("c{i}")).0).collect();
    match Raw::hello(&path, "c3").1 {
        Got::Error(ErrorCode::Limit, m) => assert!(m.contains("connection limit"), "{m}"),
        other => panic!("over the per-process cap: {other:?}"),
    }
    wait_for(|| b.stats().over_cap == 1, "over_cap counted");
    // A process vouched for (a collector) is outside the caps.
    b.vouchers().vouch("col-a", std::process::id());
    let (_col, id) = Raw::welcomed(&path, "col-a");
    assert_eq!(id, "col-a");
    drop(held);

    // The total cap, with room kept for a process holding none yet: this
    // one (holding some) gets total - FRESH_ROOM.
    let tmp2 = tempfile::tempdir().expect("tempdir");
    let (b2, path2) = broker(tmp2.path(), |c| {
        c.identities = Some(identities(host.pid()));
        c.max_connections = 6;
    });
    let first = Raw::welcomed(&path2, "a").0;
    let second = Raw::welcomed(&path2, "b").0;
    assert!(matches!(Raw::hello(&path2, "c").1, Got::Error(ErrorCode::Limit, _)), "{:?}", b2.stats());
    drop((first, second));
}

#[test]
fn idle_connections_and_half_sent_frames_time_out() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let host = OtherProcess::start();
    let (b, path) = broker(tmp.path(), |c| {
        c.identities = Some(identities(host.pid()));
        c.idle_timeout = Some(Duration::from_millis(300));
        c.frame_timeout = Duration::from_millis(500);
        c.max_frame = 16 << 20;
        c.unproven_max_frame = 1 << 20;
    });
    let (mut idle, _) = Raw::welcomed(&path, "idle");
    let (mut busy, busy_id) = Raw::welcomed(&path, "busy");
    busy.sub(1, &format!("direct.{busy_id}.#"), Overflow::DropNewest);
    assert!(idle.closed_within(Duration::from_secs(5)), "an idle connection is closed");
    assert_eq!(busy.sync(1), Vec::new(), "one that subscribed stays");

    // Half a frame, then silence (from a connection that is not idle).
    let (mut half, half_id) = Raw::welcomed(&path, "half");
    half.sub(1, &format!("direct.{half_id}.#"), Overflow::DropNewest);
    assert_eq!(half.sync(1), Vec::new());
    let mut bytes = Vec::new();
    encode(
        &Frame::Publish { topic: "x", payload: &[1u8; 4000], reply_to: None, ack_id: None },
        &mut bytes,
        1 << 20,
    )
    .expect("encode");
    half.0.get_mut().write_all(&bytes[..2000]).expect("write");
    let started = Instant::now();
    assert!(half.closed_within(Duration::from_secs(5)), "a half-sent frame is closed");
    assert!(started.elapsed() >= Duration::from_millis(400), "not before the timeout");
    wait_for(|| b.stats().timeouts >= 2, "two timeouts counted");

    // An unproven client's frames are capped at 1 MiB, whatever the
    // broker's own maximum: a 16 MiB prefix is refused from its 4 bytes.
    let (mut big, _) = Raw::welcomed(&path, "big");
    big.0.get_mut().write_all(&(16u32 << 20).to_le_bytes()).expect("write");
    match big.recv(WAIT) {
        Some(Got::Error(ErrorCode::Protocol, m)) => assert!(m.contains("exceeds"), "{m}"),
        other => panic!("oversize prefix: {other:?}"),
    }
    // A proven one gets the broker's maximum.
    b.vouchers().vouch("col-a", std::process::id());
    match Raw::hello(&path, "col-a").1 {
        Got::Welcome { max_frame, .. } => assert_eq!(max_frame, 16 << 20),
        other => panic!("{other:?}"),
    }
}

#[test]
fn the_client_speaks_only_to_a_socket_served_by_an_expected_uid() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (_b, path) = broker(tmp.path(), |_| {});
    let mut cfg = ClientConfig::new(&path, "wary");
    let me = daemoneye_platform::effective_uid();
    cfg.server_uids = vec![me.wrapping_add(4242)];
    let wary = Client::connect(cfg).expect("client");
    assert!(!wary.wait_connected(Duration::from_secs(1)), "connected to a server of an unexpected uid");
    let fine = Client::connect(ClientConfig::new(&path, "fine")).expect("client");
    assert!(fine.wait_connected(WAIT), "the default expects this uid (or root)");
}

#[test]
fn over_the_memory_limit_the_biggest_unproven_holder_is_cut_and_the_others_go_on() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let host = OtherProcess::start();
    let (b, path) = broker(tmp.path(), |c| {
        c.identities = Some(identities(host.pid()));
        c.memory_limit_bytes = Some(2 << 20);
        c.queue_limit_bytes = 64 << 20;
    });
    // A subscriber that never reads, its queue allowed to grow (by its
    // own limit) far beyond the broker's memory limit.
    let (mut hog, _) = Raw::welcomed(&path, "hog");
    hog.sub(1, "flood", Overflow::DropOldest);
    hog.sync(1);
    let (mut publisher, _) = Raw::welcomed(&path, "publisher");
    let payload = vec![3u8; 64 * 1024];
    let writer = publisher.flood_from_thread("flood", payload, 128, 77);
    // The hog reads nothing meanwhile (reading would make room).
    assert_eq!(publisher.recv(Duration::from_secs(10)), Some(Got::Pong(77)), "the publisher goes on");
    writer.join().expect("writer");
    let stats = b.stats();
    assert!(stats.slow_disconnects >= 1 && stats.connections == 1, "the hog is cut: {stats:?}");
    assert!(hog.closed_within(Duration::from_secs(10)), "the hog's connection is closed");
}
