//! The collector actor: one thread (`procmond-actor`) that owns every piece
//! of collection state — the process source, the lifecycle tracker, the
//! hasher, the configuration — and handles one message at a time.
//!
//! States: `WaitingForAgent → Running → ShuttingDown → Stopped`. In
//! `WaitingForAgent` nothing is enumerated; `BeginMonitoring` starts the
//! first cycle at once, then one every interval (fixed rate from each
//! cycle's start). Messages arrive between cycles, so every message is
//! handled at a cycle boundary; a valid `UpdateConfig` is answered at once
//! and takes effect when the next cycle starts (staged, applied as a
//! whole). Tasks from the agent (`Task`, see [`crate::task`]) are answered
//! the same way, one at a time between cycles, from the last cycle's
//! process list and the hasher's cache. `AdjustInterval` (from the EventBusConnector) slows the interval
//! to 1.5x the configured one under backpressure and restores it.
//!
//! The inbox is `bounded(100)`. Senders never block: a full inbox is a
//! logged warning and an error (`ActorError::Busy`) to the caller. Requests
//! carry a `bounded(1)` reply channel, waited on with a timeout.
//!
//! # Events and the cycle
//!
//! With `--events auto|kernel|poll` (default auto) and the kernel source on,
//! Started, Stopped (with the exit status) and Modified come from
//! `procmond-kernel` as they happen (source `kernel`), and every interval
//! the cycle reconciles: barrier (apply what the kernel thread holds), walk,
//! barrier (what happened during the walk is newer than it), compare.
//! Processes that started at or after the first barrier (or the oldest fork
//! still held) are the kernel path's; what the walk finds that the kernel
//! path missed (an overrun) is reported with source `poll` and counted
//! (`caught_by_poll`). An overrun or a dropped batch asks for an early walk
//! (at most one per second). The first walk takes everything it lists.
//! Health and heartbeats carry `EventSourceStatus` (source, fallback
//! reason, kernel events, overruns, resyncs, caught by poll).
//!
//! A walk cut at `max_processes` counts in `errors` (health and heartbeat),
//! makes the heartbeat `Degraded` while the last walk was cut
//! (`HealthReport`, the actor's answer: `HealthData` of contract version 3
//! has no field for it), and is logged (a WARN at most once a minute with
//! the count since the last; INFO when the list fits again).

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{
    Receiver, RecvTimeoutError, Sender, TrySendError, after, bounded, never, select_biased,
};
use daemoneye_platform::ProcessSource;

use crate::config::{CollectorConfig, ConfigError, ConfigUpdate};
use crate::hash::Hasher;
use crate::kernel::{KernelLink, KernelMessage};
use crate::sanitize::Sanitizer;
use crate::task::{TaskContext, TaskCounters};
use crate::tracker::{Observation, Tracker, Walk};
use daemoneye_contract::control::{
    CollectorState, ConnectionStatus, EventSourceStatus, HealthData, RegistrationState, TaskRequest,
    TaskResponse,
};
use daemoneye_contract::event::{Change, EventEnvelope, EventKind, EventSource, ProcessEvent};

/// Capacity of the actor's inbox.
pub const INBOX_CAPACITY: usize = 100;
/// The backpressure slow-down factor.
pub const SLOW_DOWN_FACTOR: f64 = 1.5;

/// Why a message to the actor did not get an answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ActorError {
    /// The inbox is full (100 messages): try again later.
    #[error("collector actor is busy: its inbox of {INBOX_CAPACITY} messages is full")]
    Busy,
    /// The actor is shutting down or stopped.
    #[error("collector actor is shutting down")]
    ShuttingDown,
    /// No reply in time.
    #[error("collector actor did not answer within {0:?}")]
    Timeout(Duration),
    /// The request was refused (a configuration error, a failed flush).
    #[error("{0}")]
    Refused(String),
}

/// A backpressure adjustment from the EventBusConnector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IntervalAdjustment {
    /// The send buffer passed 70%: run every 1.5x the configured interval.
    SlowDown,
    /// The send buffer fell below 50%: back to the configured interval.
    Restore,
}

/// The actor's messages.
pub enum ActorMessage {
    /// Report health.
    HealthCheck {
        /// Where the report goes.
        reply: Sender<HealthReport>,
    },
    /// Validate now, apply at the next cycle boundary.
    UpdateConfig {
        /// The change.
        update: ConfigUpdate,
        /// The validation result.
        reply: Sender<Result<(), ConfigError>>,
    },
    /// Finish, flush the sink (buffer and WAL), stop.
    GracefulShutdown {
        /// Answered once flushed; the thread then ends.
        reply: Sender<Result<(), String>>,
    },
    /// Start collecting (from the agent, via the lifecycle broadcast or RPC).
    BeginMonitoring,
    /// Slow down or restore (from the EventBusConnector).
    AdjustInterval(IntervalAdjustment),
    /// A task from the agent (snapshot, inspect, hash).
    Task {
        /// The task.
        request: TaskRequest,
        /// The answer, whatever its status.
        reply: Sender<TaskResponse>,
    },
}

/// The actor's health: the contract's [`HealthData`], and what it has no
/// field for (contract version 3).
#[derive(Debug, Clone, PartialEq)]
pub struct HealthReport {
    /// What the RPC answers and the heartbeat is made of.
    pub data: HealthData,
    /// The last walk listed more than `max_processes` processes and was
    /// cut (each such walk also counts in `data.errors`): the heartbeat
    /// then says `Degraded`.
    pub walk_truncated: bool,
}

/// Where events go: the EventBusConnector (WAL, then bus) or, standalone,
/// the SQLite store.
pub trait EventSink: Send {
    /// Makes a cycle's events durable (WAL or store) and queues them for
    /// delivery; returns them with their sequence numbers.
    fn submit(&mut self, events: Vec<ProcessEvent>) -> Result<Vec<EventEnvelope>, SinkError>;
    /// Delivery status for health reports.
    fn status(&self) -> SinkStatus;
    /// Changes the limit of events published but not acknowledged.
    fn set_max_in_flight(&mut self, max: usize);
    /// Delivers what it can within `timeout` and makes everything durable.
    fn flush(&mut self, timeout: Duration) -> Result<(), String>;
    /// The stream events go to, and the last sequence number given in it
    /// (0: none yet).
    fn position(&self) -> (u64, u64) {
        (0, 0)
    }
    /// The events of this stream after `seq`, in order: with a checkpoint
    /// through `seq`, what a restart needs to know what it reported (see
    /// [`crate::checkpoint`]). Records that cannot be read are logged and
    /// left out.
    fn events_after(&mut self, seq: u64) -> Result<Vec<ProcessEvent>, String> {
        let _ = seq;
        Ok(Vec::new())
    }
    /// What was reported through `seq` is checkpointed: the sink must keep
    /// every event after it, and may let go of those before.
    fn checkpointed(&mut self, seq: u64) {
        let _ = seq;
    }
}

/// Why a sink refused a batch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct SinkError {
    /// What went wrong.
    pub message: String,
    /// The sink cannot accept anything any more (a poisoned WAL: only a
    /// restart, which reopens and recovers it, is safe). The actor stops.
    pub fatal: bool,
}

impl SinkError {
    /// An error the next cycle may not meet again.
    pub fn retry(message: impl Into<String>) -> SinkError {
        SinkError { message: message.into(), fatal: false }
    }
}

/// A sink's delivery status.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SinkStatus {
    /// The bus link (or standalone).
    pub connection: ConnectionStatus,
    /// Fill of the in-memory send buffer, 0–100.
    pub buffer_level_percent: f64,
    /// Events durable but not yet acknowledged by the store.
    pub unacknowledged: u64,
    /// Events handed to the bus (or store) since start.
    pub published: u64,
}

/// The registration state, written by the registration thread and read
/// by health reports.
#[derive(Debug, Default)]
pub struct RegistrationCell(AtomicU8);

impl RegistrationCell {
    /// Records a state.
    pub fn set(&self, state: RegistrationState) {
        self.0.store(state as u8, Ordering::Release);
    }

    /// The current state.
    pub fn get(&self) -> RegistrationState {
        match self.0.load(Ordering::Acquire) {
            1 => RegistrationState::Registering,
            2 => RegistrationState::Registered,
            3 => RegistrationState::Deregistering,
            4 => RegistrationState::Failed,
            _ => RegistrationState::Unregistered,
        }
    }
}

/// A cloneable way to message the actor; never blocks.
#[derive(Clone)]
pub struct ActorSender {
    tx: Sender<ActorMessage>,
}

impl ActorSender {
    /// Sends without blocking: a full inbox is a warning and `Busy`.
    pub fn try_send(&self, msg: ActorMessage) -> Result<(), ActorError> {
        match self.tx.try_send(msg) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => {
                log::warn!("collector actor inbox full ({INBOX_CAPACITY}); message refused");
                Err(ActorError::Busy)
            }
            Err(TrySendError::Disconnected(_)) => Err(ActorError::ShuttingDown),
        }
    }

    fn ask<T>(
        &self,
        timeout: Duration,
        make: impl FnOnce(Sender<T>) -> ActorMessage,
    ) -> Result<T, ActorError> {
        let (tx, rx) = bounded(1);
        self.try_send(make(tx))?;
        match rx.recv_timeout(timeout) {
            Ok(v) => Ok(v),
            Err(RecvTimeoutError::Timeout) => Err(ActorError::Timeout(timeout)),
            Err(RecvTimeoutError::Disconnected) => Err(ActorError::ShuttingDown),
        }
    }

    /// Asks for a health report.
    pub fn health(&self, timeout: Duration) -> Result<HealthData, ActorError> {
        self.health_report(timeout).map(|r| r.data)
    }

    /// Asks for a health report, with what [`HealthData`] cannot carry.
    pub fn health_report(&self, timeout: Duration) -> Result<HealthReport, ActorError> {
        self.ask(timeout, |reply| ActorMessage::HealthCheck { reply })
    }

    /// Asks for a configuration change; `Refused` carries the validation
    /// error.
    pub fn update_config(&self, update: ConfigUpdate, timeout: Duration) -> Result<(), ActorError> {
        self.ask(timeout, |reply| ActorMessage::UpdateConfig { update, reply })?
            .map_err(|e| ActorError::Refused(e.to_string()))
    }

    /// Asks for a graceful shutdown and waits until the sink is flushed.
    pub fn graceful_shutdown(&self, timeout: Duration) -> Result<(), ActorError> {
        self.ask(timeout, |reply| ActorMessage::GracefulShutdown { reply })?.map_err(ActorError::Refused)
    }

    /// Asks the actor to serve a task.
    pub fn task(&self, request: TaskRequest, timeout: Duration) -> Result<TaskResponse, ActorError> {
        self.ask(timeout, |reply| ActorMessage::Task { request, reply })
    }

    /// Starts collection.
    pub fn begin_monitoring(&self) -> Result<(), ActorError> {
        self.try_send(ActorMessage::BeginMonitoring)
    }

    /// Slows down or restores the interval.
    pub fn adjust_interval(&self, adjustment: IntervalAdjustment) -> Result<(), ActorError> {
        self.try_send(ActorMessage::AdjustInterval(adjustment))
    }
}

/// Called with every event once it is durable (for `--foreground`).
pub type EventObserver = Box<dyn FnMut(&EventEnvelope) + Send>;

/// Settings of the actor that are not collector configuration.
pub struct ActorOptions {
    /// Shortest interval accepted by `UpdateConfig` (5 s in the daemon).
    pub interval_floor: Duration,
    /// Registration state for health reports (none: standalone).
    pub registration: Option<Arc<RegistrationCell>>,
    /// Sees every event after it is durable.
    pub observer: Option<EventObserver>,
    /// Start in `Running` (standalone mode) instead of `WaitingForAgent`.
    pub start_running: bool,
    /// The task service's counters, for health reports (none: no task
    /// service, the counters read 0).
    pub tasks: Option<Arc<TaskCounters>>,
    /// The kernel event thread's link (none: the walk alone reports).
    pub kernel: Option<KernelLink>,
    /// Why kernel events are not used although they were wanted.
    pub kernel_fallback: Option<String>,
    /// The checkpoint file for continuity across restarts (none: every
    /// start is a snapshot).
    pub checkpoint: Option<std::path::PathBuf>,
}

impl Default for ActorOptions {
    fn default() -> Self {
        ActorOptions {
            interval_floor: Duration::from_secs(*crate::config::INTERVAL_RANGE_SECS.start()),
            registration: None,
            observer: None,
            start_running: false,
            tasks: None,
            kernel: None,
            kernel_fallback: None,
            checkpoint: None,
        }
    }
}

/// How long a walk waits for the kernel thread to hand over what it holds
/// (it may have a backlog to read first: at most 3 s of it).
const SYNC_TIMEOUT: Duration = Duration::from_secs(4);
/// The soonest a resync follows the previous walk.
const RESYNC_GAP: Duration = Duration::from_secs(1);

/// The actor thread's handle. Dropping it does not stop the actor: send
/// `GracefulShutdown` (or drop every sender) and call [`ActorHandle::join`].
pub struct ActorHandle {
    // Field order: the sender goes before the thread is joined.
    sender: ActorSender,
    thread: Option<JoinHandle<()>>,
}

impl ActorHandle {
    /// Creates the inbox: the sender for other threads, the receiver for
    /// [`ActorHandle::spawn`].
    pub fn channel() -> (ActorSender, Receiver<ActorMessage>) {
        let (tx, rx) = bounded(INBOX_CAPACITY);
        (ActorSender { tx }, rx)
    }

    /// Starts the actor thread. The configuration must be valid.
    pub fn spawn(
        cfg: CollectorConfig,
        source: Box<dyn ProcessSource>,
        sink: Box<dyn EventSink>,
        inbox: (ActorSender, Receiver<ActorMessage>),
        opts: ActorOptions,
    ) -> std::io::Result<ActorHandle> {
        let (sender, rx) = inbox;
        let actor = Actor::new(cfg, source, sink, opts);
        let thread =
            std::thread::Builder::new().name("procmond-actor".into()).spawn(move || actor.run(rx))?;
        Ok(ActorHandle { sender, thread: Some(thread) })
    }

    /// A sender for other threads.
    pub fn sender(&self) -> ActorSender {
        self.sender.clone()
    }

    /// Waits for the thread to end (after `GracefulShutdown`).
    pub fn join(mut self) {
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            log::error!("collector actor thread panicked");
        }
    }

    /// Whether the thread has ended.
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }
}

struct Counters {
    cycles: u64,
    events: u64,
    errors: u64,
    backpressure_activations: u64,
    processes: u64,
    last_cycle_us: u64,
    last_collection_unix_ms: Option<u64>,
}

struct Actor {
    cfg: CollectorConfig,
    staged: Option<CollectorConfig>,
    state: CollectorState,
    source: Box<dyn ProcessSource>,
    sink: Box<dyn EventSink>,
    tracker: Tracker,
    hasher: Hasher,
    slowed: bool,
    next_cycle: Option<Instant>,
    /// Events a failed submit left behind: retried first next cycle.
    unsent: Vec<ProcessEvent>,
    opts: ActorOptions,
    n: Counters,
    /// The kernel event link, taken out of `opts` (none: poll only).
    kernel: Option<KernelLink>,
    /// When the last walk started.
    last_walk: Option<Instant>,
    /// Events produced when the last checkpoint was written (none yet).
    checkpointed_at_events: Option<u64>,
    /// Walks cut at `max_processes`.
    cuts: Cuts,
}

/// Walks cut at `max_processes`, and their rate-limited warning.
#[derive(Default)]
struct Cuts {
    total: u64,
    since_warning: u64,
    last_warning: Option<Instant>,
}

/// The warning about walks cut at `max_processes` comes at most this often.
const CUT_WARNING_EVERY: Duration = Duration::from_secs(60);

/// Events per sink submission (one WAL append each).
const SUBMIT_CHUNK: usize = 1024;

/// Events kept for a retry when the sink fails, at most.
const MAX_UNSENT: usize = 100_000;

impl Actor {
    fn new(
        cfg: CollectorConfig,
        source: Box<dyn ProcessSource>,
        sink: Box<dyn EventSink>,
        opts: ActorOptions,
    ) -> Actor {
        let tracker =
            Tracker::new(cfg.lifecycle.clone(), Sanitizer::new(&cfg.sanitize), cfg.enhanced_metadata);
        let hasher = Hasher::new(&cfg.hash);
        let state =
            if opts.start_running { CollectorState::Running } else { CollectorState::WaitingForAgent };
        let next_cycle = opts.start_running.then(Instant::now);
        let mut opts = opts;
        let kernel = opts.kernel.take();
        Actor {
            cfg,
            staged: None,
            state,
            source,
            sink,
            tracker,
            hasher,
            slowed: false,
            next_cycle,
            unsent: Vec::new(),
            opts,
            n: Counters {
                cycles: 0,
                events: 0,
                errors: 0,
                backpressure_activations: 0,
                processes: 0,
                last_cycle_us: 0,
                last_collection_unix_ms: None,
            },
            kernel,
            last_walk: None,
            checkpointed_at_events: None,
            cuts: Cuts::default(),
        }
    }

    fn interval(&self) -> Duration {
        if self.slowed { self.cfg.interval.mul_f64(SLOW_DOWN_FACTOR) } else { self.cfg.interval }
    }

    fn run(mut self, inbox: Receiver<ActorMessage>) {
        log::info!("collector actor started in state {:?}", self.state);
        while self.state != CollectorState::Stopped {
            let kernel_rx = self.kernel.as_ref().map(|k| k.rx.clone());
            let kernel_rx = kernel_rx.as_ref();
            let deadline = match self.next_cycle {
                Some(at) => after(at.saturating_duration_since(Instant::now())),
                None => never(),
            };
            // Control messages first; kernel batches before the next walk.
            select_biased! {
                recv(inbox) -> msg => match msg {
                    Ok(msg) => self.handle(msg),
                    Err(_) => {
                        log::error!("collector actor inbox closed without a shutdown; stopping");
                        break;
                    }
                },
                recv(kernel_rx.unwrap_or(&never())) -> msg => match msg {
                    Ok(msg) => self.kernel_message(msg),
                    Err(_) => self.kernel_lost(),
                },
                recv(deadline) -> _ => self.cycle(),
            }
        }
        // Requests that raced with the shutdown get an answer, not silence:
        // their reply senders drop here, which callers see as ShuttingDown.
        drop(inbox);
        log::info!("collector actor stopped");
    }

    /// A batch or a resync request from the kernel thread.
    fn kernel_message(&mut self, msg: KernelMessage) {
        match msg {
            KernelMessage::Batch(mut observations) => {
                // Behind: take what else is queued too, for one submission.
                let more: Vec<KernelMessage> =
                    self.kernel.as_ref().map(|k| k.rx.try_iter().take(16).collect()).unwrap_or_default();
                let mut rest = Vec::new();
                for m in more {
                    match m {
                        KernelMessage::Batch(b) => observations.extend(b),
                        other => rest.push(other),
                    }
                }
                self.apply_kernel(observations);
                for m in rest {
                    self.kernel_message(m);
                }
            }
            // The answer to a sync that timed out: nothing to do.
            KernelMessage::Synced { .. } => {}
            KernelMessage::Resync { reason } => {
                // An early walk, but not more often than RESYNC_GAP.
                if let Some(at) = self.next_cycle {
                    let soonest = self.last_walk.map_or_else(Instant::now, |w| w + RESYNC_GAP);
                    log::info!("resync requested ({reason}): reconciling with a walk");
                    self.next_cycle = Some(at.min(soonest.max(Instant::now())));
                }
            }
        }
    }

    /// The kernel thread ended on its own: the walk alone reports now.
    fn kernel_lost(&mut self) {
        log::error!("the kernel event thread stopped; events come from the periodic walk alone from now on");
        self.kernel = None;
        self.opts.kernel_fallback = Some("the kernel event thread stopped".into());
    }

    /// Applies kernel observations once the first walk has set the scene;
    /// before it (waiting for the agent) they are not monitoring yet.
    fn apply_kernel(&mut self, observations: Vec<Observation>) {
        if self.state != CollectorState::Running || self.n.cycles == 0 {
            return;
        }
        let mut events = Vec::new();
        self.apply_kernel_now(observations, &mut events);
        self.deliver(events);
    }

    /// Everything the kernel thread and its channel hold, in order; and
    /// the start time of the oldest fork it still holds.
    fn kernel_sync(&mut self) -> (Vec<Observation>, Option<u64>) {
        let Some(link) = &self.kernel else { return (Vec::new(), None) };
        let synced = link.sync(SYNC_TIMEOUT);
        if !synced.answered {
            log::warn!(
                "the kernel event thread did not answer within {SYNC_TIMEOUT:?}; walking without its barrier"
            );
        }
        if let Some(reason) = synced.resync {
            self.kernel_message(KernelMessage::Resync { reason });
        }
        (synced.observations, synced.oldest_pending)
    }

    fn handle(&mut self, msg: ActorMessage) {
        match msg {
            ActorMessage::HealthCheck { reply } => {
                let report =
                    HealthReport { data: self.health(), walk_truncated: self.tracker.last_cut().is_some() };
                let _ = reply.try_send(report);
            }
            ActorMessage::UpdateConfig { update, reply } => {
                let result = self.stage(&update);
                let _ = reply.try_send(result);
            }
            ActorMessage::GracefulShutdown { reply } => {
                self.state = CollectorState::ShuttingDown;
                log::info!("graceful shutdown: flushing events");
                let result = self.flush_unsent().and_then(|()| self.sink.flush(Duration::from_secs(10)));
                if result.is_ok() {
                    self.checkpoint();
                }
                if let Err(e) = &result {
                    log::error!("graceful shutdown: flush failed: {e}");
                }
                self.state = CollectorState::Stopped;
                let _ = reply.try_send(result);
            }
            ActorMessage::BeginMonitoring => {
                if self.state == CollectorState::WaitingForAgent {
                    log::info!("BeginMonitoring received: collection starts");
                    self.state = CollectorState::Running;
                    self.next_cycle = Some(Instant::now());
                } else {
                    log::debug!("BeginMonitoring in state {:?}: ignored", self.state);
                }
            }
            ActorMessage::Task { request, reply } => {
                let started = Instant::now();
                let response = crate::task::execute(
                    request,
                    TaskContext {
                        collector_id: &self.cfg.collector_id,
                        tracker: &self.tracker,
                        hasher: &mut self.hasher,
                        observed_unix_ms: self.n.last_collection_unix_ms,
                    },
                );
                log::debug!("task answered {:?} in {} us", response.status, started.elapsed().as_micros());
                // The service may have given up waiting: nobody to tell.
                let _ = reply.try_send(response);
            }
            ActorMessage::AdjustInterval(adj) => {
                let slow = adj == IntervalAdjustment::SlowDown;
                if slow != self.slowed {
                    self.slowed = slow;
                    if slow {
                        self.n.backpressure_activations += 1;
                    }
                    log::info!(
                        "backpressure: collection interval {} to {:?} (configured {:?})",
                        if slow { "slowed" } else { "restored" },
                        self.interval(),
                        self.cfg.interval
                    );
                    // Invariant: the next cycle is at most one (new) interval away.
                    if let Some(at) = self.next_cycle {
                        let latest = Instant::now() + self.interval();
                        self.next_cycle = Some(at.min(latest));
                    }
                }
            }
        }
    }

    /// Validates an update against the configuration it will apply to.
    fn stage(&mut self, update: &ConfigUpdate) -> Result<(), ConfigError> {
        let base = self.staged.as_ref().unwrap_or(&self.cfg);
        let next = base.updated(update)?;
        next.validate(self.opts.interval_floor)?;
        log::info!("configuration update accepted; applies at the next cycle boundary");
        if self.state == CollectorState::Running {
            self.staged = Some(next);
        } else {
            // No cycle runs: this is a boundary already.
            self.apply(next);
        }
        Ok(())
    }

    fn apply(&mut self, next: CollectorConfig) {
        if next.interval != self.cfg.interval {
            log::info!("collection interval {:?} -> {:?}", self.cfg.interval, next.interval);
        }
        self.tracker.set_config(next.lifecycle.clone());
        self.hasher.set_config(&next.hash);
        if next.max_events_in_flight != self.cfg.max_events_in_flight {
            self.sink.set_max_in_flight(next.max_events_in_flight);
        }
        self.cfg = next;
    }

    fn health(&self) -> HealthData {
        let sink = self.sink.status();
        HealthData {
            collector_id: self.cfg.collector_id.clone(),
            state: self.state,
            interval_ms: self.interval().as_millis() as u64,
            original_interval_ms: self.cfg.interval.as_millis() as u64,
            connection: sink.connection,
            event_source: self.event_source_status(),
            registration: self
                .opts
                .registration
                .as_ref()
                .map_or(RegistrationState::Unregistered, |r| r.get()),
            buffer_level_percent: sink.buffer_level_percent,
            unacknowledged_events: sink.unacknowledged,
            last_collection_unix_ms: self.n.last_collection_unix_ms,
            last_cycle_us: self.n.last_cycle_us,
            processes: self.n.processes,
            cycles: self.n.cycles,
            events: self.n.events,
            events_published: sink.published,
            errors: self.n.errors,
            backpressure_activations: self.n.backpressure_activations,
            hashes_computed: self.hasher.files_read(),
            pending_config: self.staged.is_some(),
            tasks_served: self.opts.tasks.as_ref().map_or(0, |t| t.served()),
            tasks_failed: self.opts.tasks.as_ref().map_or(0, |t| t.failed()),
            task_latency_avg_us: self.opts.tasks.as_ref().map_or(0, |t| t.avg_latency_us()),
        }
    }

    fn event_source_status(&self) -> EventSourceStatus {
        let mut status = EventSourceStatus {
            source: if self.kernel.is_some() { EventSource::Kernel } else { EventSource::Poll },
            fallback_reason: self.opts.kernel_fallback.clone(),
            caught_by_poll: self.tracker.caught_by_poll(),
            ..EventSourceStatus::default()
        };
        if let Some(k) = &self.kernel {
            use std::sync::atomic::Ordering::Relaxed;
            status.kernel_events = k.stats.received.load(Relaxed);
            status.overruns = k.stats.overruns.load(Relaxed);
            status.resyncs = k.stats.resyncs.load(Relaxed);
        }
        status
    }

    /// One collection cycle: apply a staged configuration, enumerate,
    /// track, hash, submit. With kernel events it is a reconciliation:
    /// a barrier before the walk (what happened before it is applied),
    /// the walk, a barrier after it (what happened during it is applied,
    /// and is newer than the walk), then the comparison.
    fn cycle(&mut self) {
        let start = Instant::now();
        if let Some(next) = self.staged.take() {
            self.apply(next);
        }
        self.next_cycle = Some(start + self.interval());
        self.last_walk = Some(start);
        let mut events = if self.n.cycles == 0 { self.restore() } else { Vec::new() };
        // The first walk is a snapshot, unless a restart restored what was
        // reported before: then it is compared with that.
        let first = self.n.cycles == 0 && !self.tracker.is_restored();
        let mut cutoff = None;
        if self.kernel.is_some() {
            let (before, oldest_pending) = self.kernel_sync();
            // Before the first walk nothing is monitored yet: it takes every
            // process it lists (the kernel's events before it were not
            // applied, so it cannot leave any to them).
            if self.n.cycles > 0 {
                self.apply_kernel_now(before, &mut events);
                let now = self.source.start_time_now();
                cutoff = match (now, oldest_pending) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
            }
        }
        self.tracker.begin_walk();
        let mut records = match self.source.refresh() {
            Ok(r) => r,
            Err(e) => {
                self.n.errors += 1;
                log::error!("process enumeration failed: {e}");
                self.deliver(events);
                return;
            }
        };
        if !self.cfg.excluded_pids.is_empty() {
            records.retain(|r| !self.cfg.excluded_pids.contains(&r.pid));
        }
        let records_len = records.len();
        // Over max_processes the tracker compares the newest unreported
        // processes first and still stops only what the whole list lacks.
        let walk = Walk { max_processes: self.cfg.max_processes, kernel: self.kernel.is_some(), cutoff };
        let during = if self.kernel.is_some() { self.kernel_sync().0 } else { Vec::new() };
        if first {
            // The snapshot first, then what happened during the walk.
            events.extend(self.tracker.reconcile(records, unix_ms(), walk));
            self.apply_kernel_now(during, &mut events);
        } else {
            self.apply_kernel_now(during, &mut events);
            events.extend(self.tracker.reconcile(records, unix_ms(), walk));
        }
        self.n.cycles += 1;
        self.n.processes = self.tracker.last_cut().map_or(records_len, |c| c.compared) as u64;
        self.note_cut();
        self.deliver(events);
        self.checkpoint();
        self.n.last_cycle_us = start.elapsed().as_micros() as u64;
        self.n.last_collection_unix_ms = Some(unix_ms());
        log::debug!(
            "cycle {}: {} processes in {} us, {} tracked",
            self.n.cycles,
            self.n.processes,
            self.n.last_cycle_us,
            self.tracker.len()
        );
    }

    /// Counts a walk cut at `max_processes` (an error in health reports;
    /// the heartbeat says Degraded while the last walk was cut) and warns,
    /// at most once a minute with the count since the last warning; says
    /// when the list fits again.
    fn note_cut(&mut self) {
        let Some(cut) = self.tracker.last_cut() else {
            if self.cuts.since_warning > 0 || self.cuts.last_warning.is_some() {
                log::info!(
                    "the process list fits in max_processes {} again ({} processes)",
                    self.cfg.max_processes,
                    self.n.processes
                );
                self.cuts.since_warning = 0;
                self.cuts.last_warning = None;
            }
            return;
        };
        self.n.errors += 1;
        self.cuts.total += 1;
        self.cuts.since_warning += 1;
        let due = self.cuts.last_warning.is_none_or(|at| at.elapsed() >= CUT_WARNING_EVERY);
        if due {
            log::warn!(
                "walk truncated: {} processes listed, over max_processes {}: {} were not compared this cycle \
                 ({} truncated cycle(s) since the last warning, {} since start); new processes are compared \
                 first, and only processes the whole list lacks are reported Stopped",
                cut.listed,
                self.cfg.max_processes,
                cut.listed - cut.compared,
                self.cuts.since_warning,
                self.cuts.total
            );
            self.cuts.since_warning = 0;
            self.cuts.last_warning = Some(Instant::now());
        }
    }

    /// Rebuilds what a previous run reported from the checkpoint and the
    /// sink's events after it. Returns late Stopped events when the host
    /// rebooted meanwhile (everything it reported ended).
    fn restore(&mut self) -> Vec<ProcessEvent> {
        let Some(path) = self.opts.checkpoint.clone() else { return Vec::new() };
        let cp = match crate::checkpoint::read(&path) {
            Ok(Some(cp)) => cp,
            Ok(None) => {
                log::info!("no checkpoint at {}: the first walk is a snapshot", path.display());
                return Vec::new();
            }
            Err(e) => {
                self.n.errors += 1;
                log::error!("checkpoint unusable ({e}): the first walk is a snapshot");
                return Vec::new();
            }
        };
        let (stream, _) = self.sink.position();
        if cp.stream_id != stream || cp.backend != self.source.backend() {
            log::warn!(
                "checkpoint of stream {} ({}) does not belong to stream {stream} ({}): the first walk is a snapshot",
                cp.stream_id,
                cp.backend,
                self.source.backend()
            );
            return Vec::new();
        }
        let mut state: std::collections::HashMap<_, _> =
            cp.processes.into_iter().map(|p| (p.key(), p)).collect();
        let mut down_since = cp.written_unix_ms;
        let after = match self.sink.events_after(cp.through_seq) {
            Ok(events) => events,
            Err(e) => {
                self.n.errors += 1;
                log::error!("reading the events after checkpoint seq {}: {e}", cp.through_seq);
                Vec::new()
            }
        };
        let replayed = after.len();
        for e in after {
            down_since = down_since.max(e.observed_unix_ms);
            match e.kind {
                EventKind::Stopped => state.remove(&e.process.key()),
                EventKind::Started | EventKind::Modified => state.insert(e.process.key(), e.process),
            };
        }
        let processes: Vec<_> = state.into_values().collect();
        if daemoneye_platform::boot_id().as_deref() != Some(cp.boot_id.as_str()) {
            log::info!(
                "the host rebooted since the checkpoint: the {} processes reported then all ended (late Stopped); the first walk is a snapshot",
                processes.len()
            );
            let window = daemoneye_contract::event::LateWindow {
                after_unix_ms: down_since,
                before_unix_ms: unix_ms(),
            };
            return self.tracker.stopped_late(processes, window);
        }
        log::info!(
            "restored {} reported processes from the checkpoint through seq {} and {replayed} events after it; \
             what changed while procmond was down is reported late",
            processes.len(),
            cp.through_seq
        );
        self.tracker.restore(processes, down_since);
        Vec::new()
    }

    /// Saves what was reported, when something was since the last save and
    /// every event is durable (a failed submit leaves the state ahead).
    fn checkpoint(&mut self) {
        let Some(path) = self.opts.checkpoint.clone() else { return };
        if !self.unsent.is_empty() || self.checkpointed_at_events == Some(self.n.events) {
            return;
        }
        let (stream_id, through_seq) = self.sink.position();
        let cp = crate::checkpoint::Checkpoint {
            boot_id: daemoneye_platform::boot_id().unwrap_or_default(),
            backend: self.source.backend().to_owned(),
            stream_id,
            through_seq,
            written_unix_ms: unix_ms(),
            processes: self.tracker.reported(),
        };
        match crate::checkpoint::write(&path, &cp) {
            Ok(()) => {
                self.checkpointed_at_events = Some(self.n.events);
                self.sink.checkpointed(through_seq);
                log::debug!("checkpoint: {} processes through seq {through_seq}", cp.processes.len());
            }
            Err(e) => {
                self.n.errors += 1;
                log::error!("checkpoint not written: {e}");
            }
        }
    }

    fn apply_kernel_now(&mut self, mut observations: Vec<Observation>, events: &mut Vec<ProcessEvent>) {
        if !self.cfg.excluded_pids.is_empty() {
            observations.retain(|o| match o {
                Observation::Process { record, .. } => !self.cfg.excluded_pids.contains(&record.pid),
                Observation::Exit(x) => !self.cfg.excluded_pids.contains(&x.pid),
            });
        }
        if !observations.is_empty() {
            events.extend(self.tracker.apply_kernel(observations, unix_ms()));
        }
    }

    /// Hashes what needs it, counts, and submits (with what a failed
    /// submit left).
    fn deliver(&mut self, mut events: Vec<ProcessEvent>) {
        if self.cfg.compute_hashes && !events.is_empty() {
            self.hasher.start_cycle();
            for e in &mut events {
                let wants = e.kind == EventKind::Started
                    || (e.kind == EventKind::Modified && e.changes.contains(&Change::Exec));
                if wants {
                    let d = &e.process.details;
                    e.sha256 = Some(self.hasher.hash(e.process.pid, &d.exe, &d.exe_file));
                }
            }
        }
        self.n.events += events.len() as u64;
        if !self.unsent.is_empty() {
            let mut all = std::mem::take(&mut self.unsent);
            all.extend(events);
            events = all;
        }
        if !events.is_empty() {
            self.submit(events);
        }
    }

    /// Hands a cycle's events to the sink in chunks of [`SUBMIT_CHUNK`]
    /// (one WAL append and fsync each), so a 10,000-process snapshot never
    /// has all its encoded copies in memory at once. What a chunk failure
    /// leaves is kept, in order, for the next cycle.
    fn submit(&mut self, mut events: Vec<ProcessEvent>) {
        while !events.is_empty() {
            let rest = events.split_off(events.len().min(SUBMIT_CHUNK));
            let chunk = std::mem::replace(&mut events, rest);
            let kept = chunk.clone();
            match self.sink.submit(chunk) {
                Ok(envelopes) => {
                    if let Some(observe) = &mut self.opts.observer {
                        envelopes.iter().for_each(&mut *observe);
                    }
                }
                Err(e) if e.fatal => {
                    self.n.errors += 1;
                    log::error!(
                        "{} events could not be made durable ({e}); stopping so a restart can recover",
                        kept.len() + events.len()
                    );
                    self.state = CollectorState::Stopped;
                    return;
                }
                Err(e) => {
                    self.n.errors += 1;
                    log::error!(
                        "{} events could not be made durable ({e}); retrying next cycle",
                        kept.len() + events.len()
                    );
                    let mut unsent = kept;
                    unsent.append(&mut events);
                    if unsent.len() > MAX_UNSENT {
                        let lost = unsent.len() - MAX_UNSENT;
                        log::error!("dropping the {lost} oldest undeliverable events (over {MAX_UNSENT})");
                        unsent.drain(..lost);
                    }
                    self.unsent = unsent;
                    return;
                }
            }
        }
    }

    fn flush_unsent(&mut self) -> Result<(), String> {
        if self.unsent.is_empty() {
            return Ok(());
        }
        let events = std::mem::take(&mut self.unsent);
        self.sink.submit(events).map(|_| ()).map_err(|e| e.message)
    }
}

/// Now, in Unix milliseconds.
pub fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
