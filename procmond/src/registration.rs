//! The registration manager (`procmond-registration` thread): registers
//! with the agent, listens for the lifecycle broadcast, sends heartbeats,
//! and deregisters on a graceful shutdown.
//!
//! Startup sequence in actor mode (procmond's side; the agent's loading
//! state machine is the other half):
//!
//! 1. main connects the bus client (it retries with backoff by itself, so
//!    a missing broker only delays what follows) and starts the actor in
//!    `WaitingForAgent`: nothing is enumerated yet.
//! 2. This thread subscribes to `control.collector.lifecycle` *before*
//!    registering, so the broadcast cannot slip between the two.
//! 3. Once connected, it sends a `Register` request on
//!    `control.collector.registration` (id, type, version, capabilities from
//!    the platform report, pid, heartbeat interval, stream id) and retries
//!    with exponential backoff and full jitter until the agent answers.
//!    Accepted: state `Registered`, "ready" is logged, heartbeats begin. A
//!    reply with `begin_monitoring` (the agent is past loading: a late or
//!    restarted collector) starts collection at once; `acknowledged_through`
//!    lets the connector truncate its WAL at once.
//! 4. `BeginMonitoring` on the lifecycle topic (or the RPC of that name)
//!    moves the actor to `Running`.
//! 5. After a reconnection it registers again (the agent may have
//!    restarted).
//!
//! States: Unregistered → Registering → Registered → Deregistering →
//! Unregistered; Failed when the agent rejects the collector (retried
//! after the longest backoff, 30 s).

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Sender, after, bounded, never, select, tick};
use daemoneye_bus::{Client, ClientError, ConnectionState};

use crate::actor::{ActorSender, RegistrationCell, unix_ms};
use daemoneye_contract::control::{
    self, ConnectionStatus, HealthData, HealthStatus, Heartbeat, HeartbeatMetrics, LifecycleCommand,
    RegistrationMessage, RegistrationRequest, RegistrationResponse, RegistrationState, RegistrationStatus,
};
use daemoneye_contract::{PeerVersion, Version, topic};

pub use daemoneye_contract::ids::COLLECTOR_TYPE;

/// Registration settings.
#[derive(Debug, Clone)]
pub struct RegistrationConfig {
    /// This collector's id.
    pub collector_id: String,
    /// How often heartbeats go out.
    pub heartbeat_interval: Duration,
    /// How long one registration request waits for the agent.
    pub request_timeout: Duration,
    /// First retry delay (doubles up to `backoff_max`, with full jitter).
    pub backoff_min: Duration,
    /// Longest retry delay.
    pub backoff_max: Duration,
    /// Capabilities to announce.
    pub capabilities: Vec<String>,
    /// The connector's stream id.
    pub stream_id: u64,
    /// The agent's contract version, shared with the connector: set by
    /// each registration from the version the agent answers in.
    pub peer_version: PeerVersion,
    /// Where the connector's stream stands: stated in the registration
    /// (base and next) and in every heartbeat (the lag, the WAL's cap).
    pub delivery: Option<crate::connector::DeliveryProbe>,
}

/// Something to call with an acknowledgement learnt from the agent's reply.
pub type AckHook = Box<dyn Fn(u64) + Send>;

enum Cmd {
    Deregister { reason: String, reply: Sender<()> },
}

/// The registration thread's handle; dropping it stops and joins it.
pub struct Registration {
    // Field order: the command sender goes before the thread is joined.
    cmds: Sender<Cmd>,
    stop: Sender<()>,
    thread: Option<JoinHandle<()>>,
}

impl Registration {
    /// Whether the thread has ended (a panic, before a shutdown): the
    /// main thread's watchdog asks.
    pub fn thread_ended(&self) -> bool {
        self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Subscribes to the lifecycle topic and starts the thread.
    pub fn start(
        cfg: RegistrationConfig,
        client: Arc<Client>,
        actor: ActorSender,
        cell: Arc<RegistrationCell>,
        on_ack: AckHook,
    ) -> Result<Registration, ClientError> {
        let lifecycle = client.subscribe(control::LIFECYCLE_TOPIC)?;
        let (cmds, cmd_rx) = bounded(4);
        let (stop, stop_rx) = bounded(1);
        let thread = std::thread::Builder::new()
            .name("procmond-registration".into())
            .spawn(move || {
                daemoneye_platform::threads::test_panic_point("procmond-registration");
                let mut m = Manager {
                    backoff: cfg.backoff_min,
                    cfg,
                    client,
                    actor,
                    cell,
                    on_ack,
                    registered_on: None,
                    retry_at: Instant::now(),
                    sequence: 0,
                    last_health: None,
                    rng: seed(),
                    disconnected_since: Some(Instant::now()),
                    warned_at: None,
                };
                let heartbeat = tick(m.cfg.heartbeat_interval);
                let mut lifecycle_rx = lifecycle.messages().clone();
                m.check();
                // A deadline, not a fresh timer per wake-up: heartbeats (or
                // any other message) arriving at least as often as the poll
                // interval must not starve the check that re-registers.
                let mut next_check = Instant::now() + m.poll_interval();
                loop {
                    if Instant::now() >= next_check {
                        m.check();
                        next_check = Instant::now() + m.poll_interval();
                    }
                    select! {
                        recv(cmd_rx) -> cmd => match cmd {
                            Ok(Cmd::Deregister { reason, reply }) => {
                                m.deregister(&reason);
                                let _ = reply.try_send(());
                            }
                            Err(_) => break,
                        },
                        recv(stop_rx) -> _ => break,
                        recv(lifecycle_rx) -> msg => match msg {
                            // Only the agent's word counts (the broker vouches for `from`).
                            Ok(msg) => match topic::LIFECYCLE.decode(&msg) {
                                Ok(LifecycleCommand::BeginMonitoring) => {
                                    log::info!("BeginMonitoring broadcast received");
                                    if let Err(e) = m.actor.begin_monitoring() {
                                        log::warn!("could not pass BeginMonitoring to the actor: {e}");
                                    }
                                }
                                Err(e) => log::warn!("malformed lifecycle command: {e}"),
                            },
                            // The client is closed or refused: stop selecting on it.
                            Err(_) => lifecycle_rx = never(),
                        },
                        recv(heartbeat) -> _ => m.heartbeat(),
                        // Quick while (re)registering, slow once registered:
                        // each wake-up costs tens of microseconds.
                        recv(after(next_check.saturating_duration_since(Instant::now()))) -> _ => {}
                    }
                }
                drop(lifecycle);
                log::debug!("procmond-registration stopped");
            })
            .map_err(|e| ClientError::Start(e.to_string()))?;
        Ok(Registration { cmds, stop, thread: Some(thread) })
    }

    /// Deregisters (waiting at most `timeout`); heartbeats stop.
    pub fn deregister(&self, reason: &str, timeout: Duration) {
        let (tx, rx) = bounded(1);
        if self.cmds.try_send(Cmd::Deregister { reason: reason.to_owned(), reply: tx }).is_ok() {
            let _ = rx.recv_timeout(timeout);
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let _ = self.stop.try_send(());
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            log::error!("procmond-registration thread panicked");
        }
    }
}

struct Manager {
    cfg: RegistrationConfig,
    client: Arc<Client>,
    actor: ActorSender,
    cell: Arc<RegistrationCell>,
    on_ack: AckHook,
    /// The connection (by the client's counter) registration succeeded on.
    registered_on: Option<u64>,
    retry_at: Instant,
    backoff: Duration,
    sequence: u64,
    last_health: Option<HealthData>,
    rng: u64,
    disconnected_since: Option<Instant>,
    warned_at: Option<Instant>,
}

impl Manager {
    fn check(&mut self) {
        let state = self.client.state();
        if state != ConnectionState::Connected {
            let since = *self.disconnected_since.get_or_insert_with(Instant::now);
            // Say so, then once every 30 s while it lasts.
            if since.elapsed() > Duration::from_secs(2)
                && self.warned_at.is_none_or(|w| w.elapsed() > Duration::from_secs(30))
            {
                log::warn!(
                    "broker unreachable for {:.0} s ({state:?}); retrying with backoff",
                    since.elapsed().as_secs_f64()
                );
                self.warned_at = Some(Instant::now());
            }
            return;
        }
        if self.disconnected_since.take().is_some() && self.warned_at.take().is_some() {
            log::info!("broker reachable again");
        }
        let conn = self.client.connections();
        let current = self.cell.get();
        let due = match current {
            RegistrationState::Registered => self.registered_on != Some(conn),
            RegistrationState::Deregistering => false,
            // Failed retries too, after the longest backoff: the agent may
            // have refused a duplicate of a registration it has not yet
            // timed out.
            RegistrationState::Failed | RegistrationState::Unregistered | RegistrationState::Registering => {
                true
            }
        };
        if due && Instant::now() >= self.retry_at {
            self.register(conn);
        }
    }

    fn poll_interval(&self) -> Duration {
        match self.cell.get() {
            RegistrationState::Registered => Duration::from_secs(1),
            _ => Duration::from_millis(250),
        }
    }

    /// Registers in the current version; an agent of an earlier release
    /// cannot read it and answers a rejection in its own version (version
    /// 1: headerless; version 2: headed), so then it registers again at
    /// once in that version and speaks it to that agent (events re-encoded
    /// by the connector, heartbeats here) until the next registration,
    /// which tries the current version again.
    fn register(&mut self, conn: u64) {
        self.cell.set(RegistrationState::Registering);
        let outcome = match self.request_registration(Version::CURRENT) {
            Ok((resp, older)) if resp.status == RegistrationStatus::Rejected && older < Version::CURRENT => {
                log::warn!(
                    "the agent speaks contract version {} (an older release): registering in it ({})",
                    older.number(),
                    resp.message.as_deref().unwrap_or("no reason given")
                );
                self.request_registration(older)
            }
            other => other,
        };
        if let Ok((_, version)) = &outcome {
            self.cfg.peer_version.set(*version);
        }
        let outcome = outcome.map(|(resp, _)| resp);
        self.registered(conn, outcome);
    }

    /// One registration request in `version`; the answer and the version
    /// it came in.
    fn request_registration(&mut self, version: Version) -> Result<(RegistrationResponse, Version), String> {
        let request = RegistrationMessage::Register(RegistrationRequest {
            collector_id: self.cfg.collector_id.clone(),
            collector_type: COLLECTOR_TYPE.to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            capabilities: self.cfg.capabilities.clone(),
            pid: std::process::id(),
            heartbeat_interval_ms: self.cfg.heartbeat_interval.as_millis() as u64,
            stream_id: self.cfg.stream_id,
            position: self.cfg.delivery.as_ref().map(|probe| {
                let d = probe.read();
                daemoneye_contract::event::StreamPosition { base: d.base, next: d.next }
            }),
        });
        let rpc = topic::REGISTRATION;
        self.client
            .request(rpc.pattern(), &rpc.request.encode_as(version, &request), self.cfg.request_timeout)
            .map_err(|e| e.to_string())
            .and_then(|msg| rpc.decode_answer(&msg).map_err(|e| e.to_string()))
    }

    fn registered(&mut self, conn: u64, outcome: Result<RegistrationResponse, String>) {
        match outcome {
            Ok(resp) if resp.status == RegistrationStatus::Accepted => {
                self.cell.set(RegistrationState::Registered);
                self.registered_on = Some(conn);
                self.backoff = self.cfg.backoff_min;
                log::info!("registered with the agent as {:?}; ready", self.cfg.collector_id);
                if let Some(through) = resp.acknowledged_through {
                    (self.on_ack)(through);
                }
                if resp.begin_monitoring
                    && let Err(e) = self.actor.begin_monitoring()
                {
                    log::warn!("could not pass BeginMonitoring to the actor: {e}");
                }
            }
            Ok(resp) => {
                self.cell.set(RegistrationState::Failed);
                self.retry_at = Instant::now() + self.cfg.backoff_max;
                log::error!(
                    "the agent rejected registration: {}; trying again in {:?}",
                    resp.message.as_deref().unwrap_or("no reason given"),
                    self.cfg.backoff_max
                );
            }
            Err(e) => {
                // Full jitter: a random wait in [0, backoff).
                let wait = self.backoff.mul_f64(self.random_unit());
                self.retry_at = Instant::now() + wait;
                self.backoff = (self.backoff * 2).min(self.cfg.backoff_max);
                log::warn!("registration failed: {e}; retrying in {:.2} s", wait.as_secs_f64());
            }
        }
    }

    fn deregister(&mut self, reason: &str) {
        if self.cell.get() != RegistrationState::Registered {
            self.cell.set(RegistrationState::Unregistered);
            return;
        }
        self.cell.set(RegistrationState::Deregistering);
        let msg = RegistrationMessage::Deregister {
            collector_id: self.cfg.collector_id.clone(),
            reason: reason.into(),
        };
        let bytes = topic::REGISTRATION.request.encode_as(self.cfg.peer_version.get(), &msg);
        match self.client.request(topic::REGISTRATION.pattern(), &bytes, self.cfg.request_timeout) {
            Ok(_) => log::info!("deregistered from the agent"),
            Err(e) => log::warn!("deregistration not confirmed: {e}"),
        }
        self.cell.set(RegistrationState::Unregistered);
    }

    fn heartbeat(&mut self) {
        if self.cell.get() != RegistrationState::Registered
            || self.client.state() != ConnectionState::Connected
        {
            return;
        }
        let (status, health) = match self.actor.health_report(Duration::from_secs(1)) {
            Ok(report) => {
                let h = report.data;
                // A walk cut at max_processes: working, but not seeing
                // everything (each such walk counts in `errors` too).
                let status = match h.status() {
                    HealthStatus::Healthy if report.walk_truncated => HealthStatus::Degraded,
                    status => status,
                };
                self.last_health = Some(h.clone());
                (status, Some(h))
            }
            Err(e) => {
                log::warn!("heartbeat: no health report from the actor ({e})");
                (HealthStatus::Degraded, self.last_health.clone())
            }
        };
        self.sequence += 1;
        let metrics = health.map_or(
            HeartbeatMetrics {
                processes_collected: 0,
                events_published: 0,
                buffer_level_percent: 0.0,
                connection_status: ConnectionStatus::Connected,
                cycles: 0,
                errors: 0,
                tasks_served: 0,
                tasks_failed: 0,
                task_latency_avg_us: 0,
                event_source: Default::default(),
            },
            |h| HeartbeatMetrics {
                processes_collected: h.processes,
                events_published: h.events_published,
                buffer_level_percent: h.buffer_level_percent,
                connection_status: h.connection,
                cycles: h.cycles,
                errors: h.errors,
                tasks_served: h.tasks_served,
                tasks_failed: h.tasks_failed,
                task_latency_avg_us: h.task_latency_avg_us,
                event_source: h.event_source.clone(),
            },
        );
        let delivery = self.cfg.delivery.as_ref().map(|probe| probe.read());
        // A full WAL refuses events: working, but not well.
        let status = match (&delivery, status) {
            (Some(d), HealthStatus::Healthy) if d.wal_full => HealthStatus::Degraded,
            (_, status) => status,
        };
        let hb = Heartbeat {
            collector_id: self.cfg.collector_id.clone(),
            sequence: self.sequence,
            timestamp_unix_ms: unix_ms(),
            status,
            metrics,
            delivery,
        };
        let bytes = topic::HEARTBEATS.encode_as(self.cfg.peer_version.get(), &hb);
        if let Err(e) = self.client.publish(&topic::HEARTBEATS.at(&self.cfg.collector_id), &bytes) {
            log::warn!("heartbeat {} not sent: {e}", self.sequence);
        }
    }

    /// A uniform number in [0, 1) (xorshift; jitter needs no strength).
    fn random_unit(&mut self) -> f64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.finish() | 1
}
