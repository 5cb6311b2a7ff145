//! Test harness for procmond: a real broker (the `bus` crate's) in a temp
//! dir, a fake agent written here (answers registration, can broadcast
//! BeginMonitoring, stores events in procmond's own SQLite store and
//! acknowledges them like the real agent), and a kill-on-drop wrapper for
//! the procmond binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, bounded, select, tick, unbounded};
use daemoneye_bus::{Broker, BrokerConfig, Client, ClientConfig, Message};
use daemoneye_contract::control::{
    self, Heartbeat, LifecycleCommand, RegistrationMessage, RegistrationResponse, RegistrationStatus,
    RpcRequest, RpcResponse, StoreAck,
};
use daemoneye_contract::event::{EVENTS_PATTERN, EventEnvelope, GAP_TOPIC, StreamGap};
use daemoneye_store::{EventStore, StreamWatermark};
use parking_lot::Mutex;

/// Starts a broker on `<dir>/bus/broker.sock`.
pub fn broker(dir: &Path) -> Broker {
    Broker::start(BrokerConfig::new(socket_path(dir))).expect("broker starts")
}

pub fn socket_path(dir: &Path) -> PathBuf {
    dir.join("bus").join("broker.sock")
}

/// Polls `cond` until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    let ticker = tick(Duration::from_millis(20));
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        let _ = ticker.recv();
    }
    cond()
}

/// What the fake agent saw.
#[derive(Default)]
pub struct Seen {
    pub registrations: Vec<RegistrationMessage>,
    pub events_received: u64,
    pub duplicates: u64,
    pub gaps: Vec<StreamGap>,
}

/// A fake agent: one client, one thread.
pub struct FakeAgent {
    pub client: Arc<Client>,
    pub store: Arc<Mutex<EventStore>>,
    pub seen: Arc<Mutex<Seen>>,
    pub heartbeats: Receiver<Heartbeat>,
    /// Answer registrations with `begin_monitoring` set.
    pub begin_on_register: Arc<AtomicBool>,
    /// Stop storing (and acknowledging) events: a stalled consumer.
    pub stalled: Arc<AtomicBool>,
    pub stored: Arc<AtomicU64>,
    stop: Sender<()>,
    thread: Option<JoinHandle<()>>,
}

impl FakeAgent {
    pub fn start(socket: &Path, db: &Path) -> FakeAgent {
        let client = Arc::new(
            Client::connect(ClientConfig::new(socket, daemoneye_contract::ids::AGENT_CLIENT_ID)).unwrap(),
        );
        // Acknowledgements are the store's word: its own client.
        let acker =
            Client::connect(ClientConfig::new(socket, daemoneye_contract::ids::STORE_CLIENT_ID)).unwrap();
        assert!(acker.wait_connected(Duration::from_secs(10)), "fake store connects");
        assert!(client.wait_connected(Duration::from_secs(10)), "fake agent connects");
        let store = Arc::new(Mutex::new(EventStore::open(db).unwrap()));
        let seen = Arc::new(Mutex::new(Seen::default()));
        let (hb_tx, heartbeats) = unbounded();
        let begin_on_register = Arc::new(AtomicBool::new(false));
        let stalled = Arc::new(AtomicBool::new(false));
        let stored = Arc::new(AtomicU64::new(0));
        let (stop, stop_rx) = bounded(1);
        let regs = client.subscribe(control::REGISTRATION_TOPIC).unwrap();
        let events = client.subscribe(EVENTS_PATTERN).unwrap();
        let hbs = client.subscribe(control::HEARTBEAT_PATTERN).unwrap();
        let thread = {
            let (client, store, seen, begin, stalled, stored) = (
                client.clone(),
                store.clone(),
                seen.clone(),
                begin_on_register.clone(),
                stalled.clone(),
                stored.clone(),
            );
            std::thread::spawn(move || {
                let poll = tick(Duration::from_millis(20));
                loop {
                    select! {
                        recv(stop_rx) -> _ => break,
                        recv(regs.messages()) -> m => if let Ok(m) = m {
                            answer_registration(&client, &m, &seen, begin.load(Ordering::SeqCst));
                        },
                        recv(hbs.messages()) -> m => if let Ok(hb) = m.map(|m| control::decode::<Heartbeat>(&m.payload)) {
                            match hb {
                                Ok(hb) => { let _ = hb_tx.send(hb); }
                                Err(e) => panic!("malformed heartbeat: {e}"),
                            }
                        },
                        recv(poll) -> _ => {}
                    }
                    if stalled.load(Ordering::SeqCst) {
                        continue;
                    }
                    // Commit what arrived in one batch, then acknowledge;
                    // gap markers are settled in order between batches.
                    let mut batch: Vec<EventEnvelope> = Vec::new();
                    let mut watermarks = Vec::new();
                    for m in events.messages().try_iter().take(2000) {
                        if m.topic == GAP_TOPIC {
                            watermarks.extend(commit(&store, &seen, &stored, &mut batch));
                            let gap = StreamGap::decode(&m.payload).expect("gap decodes");
                            seen.lock().gaps.push(gap.clone());
                            watermarks.push(store.lock().insert_gap(&gap).expect("gap commits").watermark);
                        } else {
                            batch.push(EventEnvelope::decode(&m.payload).expect("events decode"));
                        }
                    }
                    watermarks.extend(commit(&store, &seen, &stored, &mut batch));
                    for w in watermarks {
                        let ack = StoreAck { stream_id: w.stream_id, through: w.through };
                        let _ = acker.publish(&control::ack_topic(&w.collector_id), &control::encode(&ack));
                    }
                }
                drop((regs, events, hbs));
            })
        };
        FakeAgent {
            client,
            store,
            seen,
            heartbeats,
            begin_on_register,
            stalled,
            stored,
            stop,
            thread: Some(thread),
        }
    }

    pub fn begin_monitoring(&self) {
        self.client
            .publish(control::LIFECYCLE_TOPIC, &control::encode(&LifecycleCommand::BeginMonitoring))
            .unwrap();
    }

    pub fn rpc(&self, collector: &str, req: &RpcRequest, timeout: Duration) -> RpcResponse {
        let reply =
            self.client.request(&control::rpc_topic(collector), &control::encode(req), timeout).unwrap();
        control::decode(&reply.payload).unwrap()
    }

    /// Whether a HealthCheck RPC is answered Ok now.
    pub fn rpc_ok(&self, collector: &str) -> bool {
        self.client
            .request(
                &control::rpc_topic(collector),
                &control::encode(&RpcRequest::HealthCheck),
                Duration::from_secs(1),
            )
            .ok()
            .and_then(|m| control::decode::<RpcResponse>(&m.payload).ok())
            .is_some_and(|r| r.status == control::RpcStatus::Ok)
    }

    pub fn registrations(&self) -> usize {
        self.seen
            .lock()
            .registrations
            .iter()
            .filter(|r| matches!(r, RegistrationMessage::Register(_)))
            .count()
    }

    pub fn deregistrations(&self) -> usize {
        self.seen
            .lock()
            .registrations
            .iter()
            .filter(|r| matches!(r, RegistrationMessage::Deregister { .. }))
            .count()
    }
}

/// Commits a batch of events (if any) and returns the stream watermarks.
fn commit(
    store: &Mutex<EventStore>,
    seen: &Mutex<Seen>,
    stored: &AtomicU64,
    batch: &mut Vec<EventEnvelope>,
) -> Vec<StreamWatermark> {
    if batch.is_empty() {
        return Vec::new();
    }
    let outcome = store.lock().insert_batch(batch).expect("store commits");
    {
        let mut s = seen.lock();
        s.events_received += batch.len() as u64;
        s.duplicates += outcome.duplicates as u64;
    }
    stored.fetch_add(outcome.inserted as u64, Ordering::SeqCst);
    batch.clear();
    outcome.watermarks
}

fn answer_registration(client: &Client, m: &Message, seen: &Mutex<Seen>, begin: bool) {
    let msg: RegistrationMessage = control::decode(&m.payload).expect("registration decodes");
    seen.lock().registrations.push(msg);
    let resp = RegistrationResponse {
        status: RegistrationStatus::Accepted,
        message: None,
        begin_monitoring: begin,
        acknowledged_through: None,
    };
    client.reply(m, &control::encode(&resp)).unwrap();
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        let _ = self.stop.send(());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The procmond binary as a child, killed on drop (by its own pid).
pub struct Procmond {
    pub child: Child,
    pub stderr_path: PathBuf,
}

impl Procmond {
    /// Starts procmond in actor mode (socket given) or standalone.
    pub fn start(dir: &Path, socket: Option<&Path>, extra: &[&str]) -> Procmond {
        Procmond::start_with_env(dir, socket, extra, &[])
    }

    /// [`Procmond::start`] with these environment variables set too.
    pub fn start_with_env(
        dir: &Path,
        socket: Option<&Path>,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Procmond {
        let stderr_path = dir.join(format!("procmond-{:016x}.log", rand_u64()));
        let stderr = std::fs::File::create(&stderr_path).unwrap();
        let stdout = std::fs::File::create(stderr_path.with_extension("out")).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_procmond"));
        cmd.arg("--data-dir").arg(dir.join("data")).arg("--log-level").arg("debug");
        cmd.args(extra).stdin(Stdio::null()).stdout(stdout).stderr(stderr);
        cmd.env_remove("DAEMONEYE_BROKER_SOCKET");
        if let Some(s) = socket {
            cmd.env("DAEMONEYE_BROKER_SOCKET", s);
        }
        cmd.envs(env.iter().copied());
        Procmond { child: cmd.spawn().expect("procmond starts"), stderr_path }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let mut status = None;
        wait_until(timeout, || {
            status = self.child.try_wait().ok().flatten();
            status.is_some()
        });
        status
    }

    /// What it printed on stdout so far.
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(self.stderr_path.with_extension("out")).unwrap_or_default()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }
}

impl Drop for Procmond {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u8(0);
    h.finish()
}
