//! The monitor thread (`agent-monitor`): the loading state machine, the
//! collectors' registrations and heartbeats, heartbeat escalation, and the
//! answers to `agent.status`. It owns every collector's state; the
//! supervisor reports process starts and exits to it over a channel.
//!
//! **Loading.** `Loading` (collectors spawned; waiting until every enabled
//! collector has registered, at most its `startup_timeout_secs`) →
//! `Ready` → `BeginMonitoring` broadcast on `control.collector.lifecycle` →
//! `SteadyState`. A collector that misses the deadline gives
//! `StartupFailed { reason }`, and the agent shuts down with exit status 1. A collector that registers later (after a
//! restart, or re-registering after a reconnection) gets
//! `begin_monitoring: true` in its registration reply. Every transition is
//! logged.
//!
//! **Identity.** A registration, deregistration or heartbeat is accepted
//! only from the bus client whose id is the collector id it names (the
//! broker vouches for the sender), and only for a configured collector.
//!
//! **Heartbeats.** A heartbeat is late after the collector's interval
//! (from its registration) plus 10%. One or two missed: `Degraded`; three:
//! `Failed`, and an escalation starts in its own thread
//! (`agent-escalate-<id>`): a HealthCheck RPC (an answer ends the
//! escalation; one that says the collector still waits for the agent is
//! followed by a BeginMonitoring RPC), a GracefulShutdown RPC, then the supervisor waits for the
//! exit, SIGKILLs, waits again; the exit is then restarted by the
//! supervisor's policy. Each step, with its outcome, is logged and kept in
//! the collector's status.
//!
//! **Delivery liveness.** Each heartbeat (version 3) states the stream's
//! [`DeliveryStatus`]: unacknowledged events, the age of the oldest, the
//! base, the WAL's size and cap. Two more failures start the escalation:
//! an acknowledgement stall (events unacknowledged, the oldest older than
//! `delivery.ack_stall_secs`, and the base not moved for as long by the
//! agent's clock; an alert `collector_ack_stall`, step `ack_stall`; a
//! health check answer ends it, since a living collector is not what
//! stalls: restarting it would not help), raised once until the base
//! moves; and `Unhealthy` in three heartbeats in a row (step `unhealthy`;
//! an answer does not end it: the collector is restarted). A rise of the
//! heartbeat's `wal_full_times` raises the alert `collector_wal_full`
//! (logged at ERROR, stored by the store writer); a heartbeat that turns
//! from Healthy to Degraded or Unhealthy (the collector's own verdict: a
//! walk cut by `--max-processes`, say) raises `collector_degraded`, at most
//! once in 10 minutes per collector. A collector of an
//! earlier release sends no delivery status: none of this applies to it.

mod escalation;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, at, bounded, select};
use daemoneye_bus::{Broker, Client, Message};
use daemoneye_contract::control::{
    DeliveryStatus, HealthStatus, Heartbeat, RegistrationMessage, RegistrationResponse, RegistrationStatus,
};
use daemoneye_contract::{PeerVersion, Version, topic};

use crate::api::{
    self, AgentState, AgentStatus, BrokerStatus, CollectorDelivery, CollectorPhase, CollectorStatus,
    EscalationStep, HeartbeatInfo,
};
use crate::config::{AgentConfig, CollectorSpec};
use crate::supervisor::{Supervisor, SupervisorEvent};
use crate::tasks::TaskStats;
use crate::writer::StoreWriter;
use escalation::STEPS_KEPT;

/// The rule name of the alert raised when a collector's WAL is full.
pub const WAL_FULL_RULE: &str = "collector_wal_full";
/// The rule name of the alert raised when a collector's heartbeat turns
/// from Healthy to Degraded or Unhealthy (its own verdict: a walk cut by
/// `--max-processes`, say).
pub const DEGRADED_RULE: &str = "collector_degraded";
/// At most one [`DEGRADED_RULE`] alert per collector this often.
const DEGRADED_ALERT_EVERY: Duration = Duration::from_secs(600);
/// The rule name of the alert raised when a collector's acknowledgements
/// stall.
pub const ACK_STALL_RULE: &str = "collector_ack_stall";

/// Why the monitor ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A shutdown was asked for.
    Shutdown,
    /// Startup failed; the agent exits with status 1.
    StartupFailed(String),
    /// The monitor thread died (a bug); the agent exits with status 1.
    Crashed,
}

struct Entry {
    spec: CollectorSpec,
    phase: CollectorPhase,
    pid: Option<u32>,
    adopted: bool,
    registered: bool,
    /// The heartbeat period it registered with.
    interval: Duration,
    /// When the last heartbeat (or the registration) arrived.
    last_seen: Instant,
    heartbeat: Option<HeartbeatInfo>,
    missed: u32,
    restarts: u32,
    last_exit: Option<String>,
    escalation: Vec<EscalationStep>,
    escalating: bool,
    /// Set when the process being escalated exits: its escalation thread
    /// then stops before its next step.
    cancel: Arc<AtomicBool>,
    /// The contract version it registered in: what the agent sends it
    /// (RPCs, lifecycle commands) is encoded in that version, so a
    /// collector of the previous release reads it.
    version: Version,
    /// Its delivery as the last heartbeat stated it.
    delivery: Option<DeliveryStatus>,
    /// Its acknowledgements stall (see `delivery.ack_stall_secs`); set
    /// when the failure is raised, cleared when they move again.
    stalled: bool,
    /// The base its heartbeats last stated, and since when (the agent's
    /// own clock): acknowledgements progress when the base moves.
    base_since: Option<(u64, Instant)>,
    /// The base when the stall was raised.
    stalled_base: u64,
    /// Consecutive heartbeats that said `Unhealthy`.
    unhealthy: u32,
    /// The WAL-cap count of the last heartbeat: a rise is an alert.
    wal_full_seen: u64,
    /// When a turn to a Degraded or Unhealthy heartbeat was last alerted.
    degraded_alerted: Option<Instant>,
}

impl Entry {
    fn step(&mut self, step: &str, outcome: String) {
        log::warn!("collector {}: escalation: {step}: {outcome}", self.spec.id);
        if self.escalation.len() >= STEPS_KEPT {
            self.escalation.remove(0);
        }
        self.escalation.push(EscalationStep {
            step: step.to_owned(),
            outcome,
            at_unix_ms: api::now_unix_ms(),
        });
    }
}

/// Requests to the monitor thread.
enum Control {
    /// A status snapshot, for the metrics file.
    Status(Sender<AgentStatus>),
    /// State ShuttingDown: keep answering, start no escalation; replies
    /// with the ids of the registered collectors.
    BeginShutdown(Sender<Vec<String>>),
    /// End the thread.
    Stop,
}

/// What the escalation thread reports.
struct StepReport {
    id: String,
    step: &'static str,
    outcome: String,
    /// The escalation is over.
    done: bool,
}

/// Everything the monitor works with.
pub struct MonitorParts {
    /// The configuration.
    pub config: AgentConfig,
    /// The agent's bus client.
    pub client: Arc<Client>,
    /// The broker (for its counters).
    pub broker: Arc<Broker>,
    /// The store writer (for its counters).
    pub writer: Arc<StoreWriter>,
    /// The supervisor.
    pub supervisor: Arc<Supervisor>,
    /// Process starts and exits.
    pub supervisor_events: Receiver<SupervisorEvent>,
    /// The task coordinator's counters.
    pub tasks: Arc<TaskStats>,
    /// The oldest contract version among the registered collectors, kept
    /// by the monitor: the task coordinator and the shutdown RPCs write in
    /// it, so a collector of the previous release reads them.
    pub collector_version: PeerVersion,
}

/// A channel whose sender ended: logged once, then never ready.
fn gone<T>(what: &str) -> Receiver<T> {
    log::error!("monitor: {what} stopped sending; ignoring it from now on");
    crossbeam_channel::never()
}

/// Asks the monitor thread for what `agent.status` would answer.
#[derive(Clone)]
pub struct StatusProbe {
    tx: Sender<Control>,
}

impl StatusProbe {
    /// The status, or `None` when the monitor did not answer within
    /// `timeout` (busy, or gone). Never blocks the monitor: a full
    /// control channel is `None` at once.
    pub fn status(&self, timeout: Duration) -> Option<AgentStatus> {
        let (reply, answer) = bounded(1);
        self.tx.try_send(Control::Status(reply)).ok()?;
        answer.recv_timeout(timeout).ok()
    }
}

/// Handle to the monitor thread.
pub struct Monitor {
    stop: Sender<Control>,
    thread: Option<JoinHandle<Outcome>>,
}

impl Monitor {
    /// Subscribes and starts the thread. `ended` receives the outcome as
    /// soon as the monitor decides the agent must stop (startup failure).
    pub fn start(parts: MonitorParts, ended: Sender<Outcome>) -> anyhow::Result<Monitor> {
        let client = parts.client.clone();
        let regs = client.subscribe(topic::REGISTRATION.pattern())?;
        let hbs = client.subscribe(topic::HEARTBEATS.pattern())?;
        let status = client.subscribe(api::STATUS_TOPIC)?;
        // Room for a stop beside a status request (`StatusProbe` has
        // at most one queued).
        let (stop, stop_rx) = bounded(4);
        let thread = std::thread::Builder::new().name("agent-monitor".into()).spawn(move || {
            let mut m = State::new(parts);
            let (steps_tx, steps_rx) = bounded::<StepReport>(64);
            log::info!("agent state: Loading (waiting for {} collector(s) to register)", m.enabled());
            let mut failed = None;
            // A channel whose sender is gone (its thread ended: the
            // agent's watchdog stops the agent) is replaced by `never`, so
            // the loop never spins on it.
            let mut supervised = m.supervisor_events.clone();
            let (mut regs_rx, mut hbs_rx, mut status_rx) =
                (regs.messages().clone(), hbs.messages().clone(), status.messages().clone());
            let outcome = loop {
                select! {
                    recv(stop_rx) -> c => match c {
                        Ok(Control::BeginShutdown(reply)) => {
                            m.set_state(AgentState::ShuttingDown);
                            let ids = m.entries.iter().filter(|e| e.registered).map(|e| e.spec.id.clone());
                            let _ = reply.try_send(ids.collect());
                        }
                        Ok(Control::Status(reply)) => {
                            let _ = reply.try_send(m.status());
                        }
                        _ => break Outcome::Shutdown,
                    },
                    recv(regs_rx) -> msg => match msg {
                        Ok(msg) => m.registration(&msg),
                        Err(_) => regs_rx = gone("the bus client (registrations)"),
                    },
                    recv(hbs_rx) -> msg => match msg {
                        Ok(msg) => m.heartbeat(&msg),
                        Err(_) => hbs_rx = gone("the bus client (heartbeats)"),
                    },
                    recv(status_rx) -> msg => match msg {
                        Ok(msg) => m.answer_status(&msg),
                        Err(_) => status_rx = gone("the bus client (status)"),
                    },
                    recv(supervised) -> ev => match ev {
                        Ok(ev) => m.supervised(ev),
                        Err(_) => supervised = gone("the supervisor"),
                    },
                    recv(steps_rx) -> r => if let Ok(r) = r { m.escalation_step(r) },
                    // Wakes up only for the next deadline (heartbeat
                    // lateness, a startup timeout), not on a fixed tick.
                    recv(at(m.next_wake())) -> _ => {}
                }
                if let Some(reason) = m.check(&steps_tx) {
                    // Keep answering (collectors deregister while the
                    // agent stops them) until told to stop.
                    let _ = ended.try_send(Outcome::StartupFailed(reason.clone()));
                    failed = Some(reason);
                }
            };
            let outcome = match failed {
                Some(reason) => Outcome::StartupFailed(reason),
                None => outcome,
            };
            m.set_state(AgentState::ShuttingDown);
            m.join_escalations();
            drop((regs, hbs, status));
            outcome
        })?;
        Ok(Monitor { stop, thread: Some(thread) })
    }

    /// Enters ShuttingDown: registrations, heartbeats and status are still
    /// answered (collectors deregister while they stop), escalations are
    /// not started any more. Returns the registered collectors' ids.
    pub fn begin_shutdown(&self) -> Vec<String> {
        let (tx, rx) = bounded(1);
        if self.stop.send_timeout(Control::BeginShutdown(tx), Duration::from_secs(5)).is_err() {
            return Vec::new();
        }
        rx.recv_timeout(Duration::from_secs(5)).unwrap_or_default()
    }

    /// A handle that asks the monitor for status snapshots.
    pub fn probe(&self) -> StatusProbe {
        StatusProbe { tx: self.stop.clone() }
    }

    /// Whether the monitor thread has ended before being told to.
    pub fn thread_ended(&self) -> bool {
        self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Stops the thread and returns why it ended.
    pub fn stop(mut self) -> Outcome {
        let _ = self.stop.try_send(Control::Stop);
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(outcome)) => outcome,
            Some(Err(_)) => Outcome::Crashed,
            None => Outcome::Shutdown,
        }
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = self.stop.try_send(Control::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct State {
    parts: MonitorParts,
    supervisor_events: Receiver<SupervisorEvent>,
    state: AgentState,
    state_since: u64,
    started: Instant,
    entries: Vec<Entry>,
    escalations: Vec<JoinHandle<()>>,
    /// A collector was adopted at start (the agent restarted while its
    /// collectors ran): a warm start waits for nobody.
    warm: bool,
    /// When Loading last named the collectors it waits for.
    waiting_logged: Instant,
}

/// How often Loading names the collectors it still waits for.
const WAITING_LOG: Duration = Duration::from_secs(5);

impl State {
    fn new(parts: MonitorParts) -> State {
        let now = Instant::now();
        let entries: Vec<Entry> = parts
            .config
            .collectors
            .iter()
            .map(|c| Entry {
                spec: c.clone(),
                phase: if c.enabled { CollectorPhase::Starting } else { CollectorPhase::Disabled },
                pid: None,
                adopted: false,
                registered: false,
                interval: Duration::from_secs(c.heartbeat_interval_secs),
                last_seen: now,
                heartbeat: None,
                missed: 0,
                restarts: 0,
                last_exit: None,
                escalation: Vec::new(),
                escalating: false,
                cancel: Arc::new(AtomicBool::new(false)),
                version: Version::CURRENT,
                delivery: None,
                stalled: false,
                base_since: None,
                stalled_base: 0,
                unhealthy: 0,
                wal_full_seen: 0,
                degraded_alerted: None,
            })
            .collect();
        State {
            supervisor_events: parts.supervisor_events.clone(),
            parts,
            state: AgentState::Loading,
            state_since: api::now_unix_ms(),
            started: now,
            entries,
            escalations: Vec::new(),
            warm: false,
            waiting_logged: now,
        }
    }

    /// The next moment `check` may have something to do: the earliest
    /// heartbeat lateness or startup deadline, at most a second away.
    fn next_wake(&self) -> Instant {
        let now = Instant::now();
        let mut wake = now + Duration::from_secs(1);
        for e in self.entries.iter().filter(|e| e.spec.enabled) {
            let startup = Duration::from_secs(e.spec.startup_timeout_secs);
            // Only what `check` acts on in the current state, so a passed
            // deadline is always consumed (never a busy loop).
            let at = match self.state {
                AgentState::Loading if !e.registered => self.started + startup,
                AgentState::SteadyState if e.registered && !e.escalating => {
                    let late = e.interval + e.interval / 10;
                    e.last_seen + late * (e.missed + 1)
                }
                AgentState::SteadyState
                    if e.phase == CollectorPhase::Starting && !e.escalating && e.pid.is_some() =>
                {
                    e.last_seen + startup
                }
                _ => continue,
            };
            wake = wake.min(at.max(now));
        }
        wake
    }

    fn enabled(&self) -> usize {
        self.entries.iter().filter(|e| e.spec.enabled).count()
    }

    fn set_state(&mut self, state: AgentState) {
        if self.state == state {
            return;
        }
        match &state {
            AgentState::StartupFailed { reason } => {
                log::error!("agent state: {} -> StartupFailed: {reason}", self.state.name())
            }
            s => log::info!("agent state: {} -> {}", self.state.name(), s.name()),
        }
        self.state = state;
        self.state_since = api::now_unix_ms();
    }

    /// The oldest version among the registered collectors (published to
    /// the shared [`MonitorParts::collector_version`]).
    fn collector_version(&self) -> Version {
        let v = self.entries.iter().filter(|e| e.registered).fold(Version::CURRENT, |v, e| v.min(e.version));
        self.parts.collector_version.set(v);
        v
    }

    fn entry(&mut self, id: &str) -> Option<&mut Entry> {
        self.entries.iter_mut().find(|e| e.spec.id == id)
    }

    /// A registration request: accepted from the collector itself, for a
    /// configured and enabled id.
    fn registration(&mut self, msg: &Message) {
        // Answered in the version it was asked in.
        let version = Version::of(&msg.payload);
        let parsed = topic::REGISTRATION.decode_request(msg).map(|(m, _)| m);
        let in_steady_state = self.state == AgentState::SteadyState;
        let (id, reply) = match parsed {
            Err(e) => {
                log::warn!("undecodable registration from bus client {:?}: {e}", msg.from);
                (None, reject(format!("undecodable registration: {e}")))
            }
            Ok(RegistrationMessage::Register(req)) => {
                if req.collector_id != msg.from {
                    log::warn!(
                        "registration for {:?} refused: sent by bus client {:?}",
                        req.collector_id,
                        msg.from
                    );
                    (None, reject("a collector may register only itself".into()))
                } else if let Some(e) = self.entry(&req.collector_id).filter(|e| e.spec.enabled) {
                    // An adopted collector monitored before this agent
                    // started: it goes on at once.
                    let steady = in_steady_state || e.adopted;
                    let first = !e.registered;
                    e.registered = true;
                    e.escalating = false;
                    e.interval = Duration::from_millis(req.heartbeat_interval_ms.max(100));
                    e.last_seen = Instant::now();
                    e.missed = 0;
                    e.version = version;
                    // The supervisor's pid stands; a collector claiming
                    // another one is logged.
                    if e.pid.is_some_and(|p| p != req.pid) {
                        log::warn!(
                            "collector {} registered with pid {} but runs as pid {}",
                            req.collector_id,
                            req.pid,
                            e.pid.unwrap_or_default()
                        );
                    }
                    e.pid = e.pid.or(Some(req.pid));
                    e.phase = if steady { CollectorPhase::Running } else { CollectorPhase::Registered };
                    let position = match req.position {
                        Some(p) => format!("stream {} from seq {} to {}", req.stream_id, p.base, p.next),
                        None => format!("stream {}, no delivery base (an earlier release)", req.stream_id),
                    };
                    log::info!(
                        "collector {} registered (pid {}, {} {}, heartbeat every {:?}, {position}){}",
                        req.collector_id,
                        req.pid,
                        req.collector_type,
                        req.version,
                        e.interval,
                        if steady { "; sent BeginMonitoring in the reply" } else { "" }
                    );
                    if !first {
                        log::info!("collector {} re-registered", req.collector_id);
                    }
                    (
                        Some(req.collector_id.clone()),
                        RegistrationResponse {
                            status: RegistrationStatus::Accepted,
                            message: None,
                            begin_monitoring: steady,
                            acknowledged_through: None,
                        },
                    )
                } else {
                    log::warn!(
                        "registration from unknown or disabled collector {:?} refused",
                        req.collector_id
                    );
                    (
                        None,
                        reject(format!("collector {:?} is not configured in agent.yaml", req.collector_id)),
                    )
                }
            }
            Ok(RegistrationMessage::Deregister { collector_id, reason }) => {
                if collector_id == msg.from
                    && let Some(e) = self.entry(&collector_id)
                {
                    log::info!("collector {collector_id} deregistered: {reason}");
                    e.registered = false;
                    e.phase = CollectorPhase::Stopped;
                    (Some(collector_id), accept())
                } else {
                    log::warn!("deregistration of {collector_id:?} by bus client {:?} refused", msg.from);
                    (None, reject("a collector may deregister only itself".into()))
                }
            }
        };
        let _ = id;
        self.collector_version();
        if let Err(e) = self.parts.client.reply(msg, &topic::REGISTRATION.encode_answer(version, &reply)) {
            log::warn!("cannot answer a registration: {e}");
        }
    }

    fn heartbeat(&mut self, msg: &Message) {
        let hb: Heartbeat = match topic::HEARTBEATS.decode(msg) {
            Ok(hb) => hb,
            Err(e) => {
                log::warn!("undecodable heartbeat on {} from {:?}: {e}", msg.topic, msg.from);
                return;
            }
        };
        if hb.collector_id != msg.from || msg.topic != topic::HEARTBEATS.at(&hb.collector_id) {
            log::warn!("heartbeat for {:?} from bus client {:?} ignored", hb.collector_id, msg.from);
            return;
        }
        let steady = self.state == AgentState::SteadyState;
        let writer = self.parts.writer.clone();
        let Some(e) = self.entry(&hb.collector_id) else {
            log::debug!("heartbeat from unconfigured collector {:?}", hb.collector_id);
            return;
        };
        if e.missed > 0 {
            log::info!("collector {}: heartbeats resumed after {} missed", e.spec.id, e.missed);
        }
        e.missed = 0;
        e.last_seen = Instant::now();
        if e.registered && !e.escalating && !e.stalled {
            e.phase = if steady { CollectorPhase::Running } else { CollectorPhase::Registered };
        }
        e.unhealthy = if hb.status == HealthStatus::Unhealthy { e.unhealthy.saturating_add(1) } else { 0 };
        let mut wal_full = None;
        if let Some(d) = &hb.delivery {
            if d.wal_full_times > e.wal_full_seen {
                wal_full = Some(d.clone());
            }
            e.wal_full_seen = d.wal_full_times;
        }
        if let Some(d) = &hb.delivery
            && e.base_since.is_none_or(|(base, _)| base != d.base)
        {
            e.base_since = Some((d.base, Instant::now()));
        }
        e.delivery = hb.delivery.clone();
        if let Some(d) = wal_full {
            let text = format!(
                "the WAL of collector {} reached its cap ({} of {} bytes, {} time(s) since it started): \
                 new events are refused ({} so far) and recorded as a gap once the store acknowledges",
                hb.collector_id, d.wal_bytes, d.wal_cap_bytes, d.wal_full_times, d.events_refused
            );
            log::error!("{text}");
            writer.system_alert(&hb.collector_id, WAL_FULL_RULE, &text);
        }
        // The collector's own verdict turned bad: say so once (at most
        // every DEGRADED_ALERT_EVERY while it flaps).
        let was_healthy = e.heartbeat.as_ref().is_none_or(|h| h.status == "healthy");
        if hb.status != HealthStatus::Healthy
            && was_healthy
            && e.degraded_alerted.is_none_or(|t| t.elapsed() >= DEGRADED_ALERT_EVERY)
        {
            e.degraded_alerted = Some(Instant::now());
            let text = format!(
                "collector {} reports itself {:?} ({} errors since it started, {} processes in its last walk): \
                 its log says why (a walk cut by --max-processes, unreadable processes, a failing event source)",
                hb.collector_id, hb.status, hb.metrics.errors, hb.metrics.processes_collected
            );
            log::warn!("{text}");
            writer.system_alert(&hb.collector_id, DEGRADED_RULE, &text);
        }
        e.heartbeat = Some(HeartbeatInfo {
            sequence: hb.sequence,
            status: match hb.status {
                HealthStatus::Healthy => "healthy",
                HealthStatus::Degraded => "degraded",
                HealthStatus::Unhealthy => "unhealthy",
            }
            .to_owned(),
            received_unix_ms: api::now_unix_ms(),
            processes_collected: hb.metrics.processes_collected,
            events_published: hb.metrics.events_published,
            buffer_level_percent: hb.metrics.buffer_level_percent,
            cycles: hb.metrics.cycles,
            errors: hb.metrics.errors,
            tasks_served: hb.metrics.tasks_served,
            tasks_failed: hb.metrics.tasks_failed,
            task_latency_avg_us: hb.metrics.task_latency_avg_us,
            event_source: hb.metrics.event_source.clone(),
        });
    }

    fn supervised(&mut self, ev: SupervisorEvent) {
        match ev {
            SupervisorEvent::Started { id, pid, adopted } => {
                self.warm |= adopted && self.state == AgentState::Loading;
                if let Some(e) = self.entry(&id) {
                    e.pid = Some(pid);
                    e.adopted = adopted;
                    if !e.registered {
                        e.phase = CollectorPhase::Starting;
                    }
                    e.last_seen = Instant::now();
                }
            }
            SupervisorEvent::SpawnFailed { id, reason } => {
                if let Some(e) = self.entry(&id) {
                    e.last_exit = Some(reason);
                }
            }
            SupervisorEvent::Exited { id, status, restart_in, not_restarted } => {
                if let Some(e) = self.entry(&id) {
                    e.pid = None;
                    e.registered = false;
                    e.missed = 0;
                    e.last_exit = Some(status.clone());
                    e.phase = if restart_in.is_some() {
                        CollectorPhase::Restarting
                    } else {
                        CollectorPhase::Stopped
                    };
                    if restart_in.is_some() {
                        e.restarts += 1;
                    }
                    let escalating = e.escalating;
                    e.escalating = escalating && restart_in.is_some();
                    // Whatever the escalation still had to do is moot.
                    e.cancel.store(true, Ordering::Release);
                    if escalating {
                        let outcome = match (&restart_in, &not_restarted) {
                            (Some(d), _) => format!("{status}; restart in {d:?}"),
                            (None, why) => {
                                format!("{status}; not restarted: {}", why.as_deref().unwrap_or(""))
                            }
                        };
                        e.step("exited", outcome);
                    }
                }
            }
            SupervisorEvent::Step { id, step, outcome } => {
                if let Some(e) = self.entry(&id)
                    && e.escalating
                {
                    e.step(&step, outcome);
                    if step == "restart" {
                        e.escalating = false;
                    }
                }
            }
        }
    }

    fn answer_status(&mut self, msg: &Message) {
        if msg.reply_to.is_none() {
            return;
        }
        let status = self.status();
        let version = Version::of(&msg.payload);
        if let Err(e) = self.parts.client.reply(msg, &topic::STATUS.encode_answer(version, &status)) {
            log::debug!("cannot answer a status request: {e}");
        }
    }

    /// What `agent.status` answers.
    fn status(&self) -> AgentStatus {
        let b = self.parts.broker.stats();
        let writer = &self.parts.writer;
        AgentStatus {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            state: self.state.clone(),
            state_since_unix_ms: self.state_since,
            uptime_secs: self.started.elapsed().as_secs(),
            collectors: self
                .entries
                .iter()
                .map(|e| CollectorStatus {
                    id: e.spec.id.clone(),
                    collector_type: e.spec.collector_type.clone(),
                    phase: e.phase,
                    pid: e.pid,
                    adopted: e.adopted,
                    registered: e.registered,
                    heartbeat: e.heartbeat.clone(),
                    missed_heartbeats: e.missed,
                    restarts: e.restarts,
                    last_exit: e.last_exit.clone(),
                    escalation: e.escalation.clone(),
                    events_stored: writer.events_stored(&e.spec.id),
                    tasks: self.parts.tasks.collector(&e.spec.id),
                })
                .collect(),
            broker: BrokerStatus {
                socket: self.parts.broker.socket().display().to_string(),
                connections: b.connections,
                subscriptions: b.subscriptions,
                published: b.published,
                delivered: b.delivered,
                dropped: b.dropped,
                forbidden: b.forbidden,
                refused: b.refused,
                protocol_errors: b.protocol_errors,
            },
            store: writer.status(),
            tasks: self.parts.tasks.totals(&self.parts.config.tasks),
            delivery: self
                .entries
                .iter()
                .filter_map(|e| {
                    Some(CollectorDelivery {
                        collector_id: e.spec.id.clone(),
                        status: e.delivery.clone()?,
                        ack_stall_secs: self.parts.config.delivery.ack_stall_secs,
                        stalled: e.stalled,
                    })
                })
                .collect(),
        }
    }
}

fn reject(message: String) -> RegistrationResponse {
    RegistrationResponse {
        status: RegistrationStatus::Rejected,
        message: Some(message),
        begin_monitoring: false,
        acknowledged_through: None,
    }
}

fn accept() -> RegistrationResponse {
    RegistrationResponse {
        status: RegistrationStatus::Accepted,
        message: None,
        begin_monitoring: false,
        acknowledged_through: None,
    }
}
