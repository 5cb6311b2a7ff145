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

mod cycle;

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
        let mut tracker =
            Tracker::new(cfg.lifecycle.clone(), Sanitizer::new(&cfg.sanitize), cfg.enhanced_metadata);
        // The snapshot's events are built a chunk at a time as they are
        // submitted (see `cycle`), not all at once.
        tracker.set_snapshot_in_chunks(true);
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
}

/// Now, in Unix milliseconds.
pub fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
