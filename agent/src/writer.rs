//! The store writer: the agent's thread (`agent-store`) that takes process
//! events off the bus, commits them to the SQLite event store in batches,
//! acknowledges every stream's committed watermark to its collector, runs
//! the detection rules over each committed batch and applies retention.
//!
//! # Guarantees
//!
//! - Nothing is acknowledged before it is committed. A [`StoreAck`] on
//!   `control.ack.<collector>` lets the collector delete those events from
//!   its WAL, so a failed commit is logged, counted and retried with
//!   backoff, holding its batch (and, through the broker's `Block`
//!   overflow, the collectors) until it succeeds; it is never skipped.
//! - The subscription uses `Overflow::Block`: the broker never drops an
//!   event on its way here. An event lost anyway (a collector restarted
//!   while the agent was away) is replayed from the collector's WAL and
//!   stored once (the store deduplicates by `(collector_id, stream_id,
//!   seq)`); duplicates are acknowledged too, which is how a replaying
//!   collector learns it may truncate.
//! - A collector speaks only for itself: an envelope or gap marker whose
//!   `collector_id` is not its publisher's bus id (the broker vouches for
//!   `Message::from`; collectors connect with their collector id) is
//!   refused, as is a payload that does not decode. Refusals are counted
//!   in `rejected` and logged at most once a minute per publisher.
//! - Every committed event is evaluated by the rules once: after each
//!   commit the rules run over the ids above `rule_cursor`, and at start
//!   over what a crash left unevaluated (see [`crate::rules`]). Each rule
//!   has a time budget per batch (`store.rule_budget_ms`): a rule over it
//!   is interrupted and skips that batch, which still commits, is
//!   acknowledged and is evaluated by the other rules; a rule over it in
//!   three consecutive batches is disabled until the agent restarts, and
//!   the writer raises an [`RULE_DISABLED_RULE`] alert naming it. A rule
//!   never holds the writer longer than its budget.
//! - Shutdown commits and acknowledges what the subscription already
//!   holds; it does not wait for the bus, which may be gone.
//!
//! Retention (`retention_days`, `max_events`) runs every 60 s and at start,
//! in chunks of at most [`daemoneye_store::PRUNE_CHUNK`] rows, each its own
//! transaction ([`Pruning`]): one chunk after each committed batch and
//! whenever nothing else is waiting, so a large prune never holds the
//! batches (and the collectors' acknowledgements) back for longer than one
//! chunk.
//!
//! Gap markers (`events.process.gap`, [`StreamGap`]) close the batch being
//! gathered: the events before a marker are committed before it is
//! settled, as the collector published them.
//!
//! Nothing a collector publishes blocks its stream: an event whose body
//! does not decode (a newer collector's, say) but whose head
//! (`collector_id`, `stream_id`, `seq`) does, and an event the store cannot
//! take, are settled as a gap with the reason (on the store's own
//! authority, [`EventStore::settle`]), so acknowledgements move past them.
//! What the store records itself (a stream's base, a store behind its
//! collector, a refuted gap) and what it refuses as implausible are logged.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, at, bounded, never, select_biased, tick};
use daemoneye_bus::{Client, ClientError, Message, Overflow, Subscription};
use daemoneye_contract::Version;
use daemoneye_contract::control::StoreAck;
use daemoneye_contract::event::{EventEnvelope, StreamGap};
use daemoneye_contract::render::printable;
use daemoneye_contract::topic;
use daemoneye_store::own::OwnBinaries;
use daemoneye_store::{BatchOutcome, EventStore, Pruning, Retention, StoreError, StreamWatermark};
use parking_lot::Mutex;

use crate::api::{self, Alert, StoreStatus};
use crate::config::{RuleSpec, StoreSpec};
use crate::rules::{RuleEngine, RuleError};

/// Logs the gaps the store recorded on its own.
fn log_gaps(gaps: &[(daemoneye_store::StreamGapKey, String)]) {
    for (g, reason) in gaps {
        log::warn!(
            "store writer: {}/{} events {}..={} recorded as a gap: {reason}",
            g.collector_id,
            g.stream_id,
            g.from,
            g.to
        );
    }
}

/// Agent alerts queued for the writer thread before more are only logged.
const SYSTEM_ALERTS: usize = 16;

/// The rule of the alert raised when a detection rule is disabled for
/// running over its time budget (its name is the alert's `name`).
pub const RULE_DISABLED_RULE: &str = "agent_rule_disabled";

/// How often retention runs (and once at start).
const RETENTION_PERIOD: Duration = Duration::from_secs(60);
/// First delay before a failed commit is retried; doubles up to
/// [`RETRY_MAX`].
const RETRY_MIN: Duration = Duration::from_millis(100);
/// Longest delay between two attempts of a failing commit.
const RETRY_MAX: Duration = Duration::from_secs(5);
/// Commit attempts at shutdown before what is left is given up (its
/// collectors replay it, since it was never acknowledged).
const SHUTDOWN_ATTEMPTS: u32 = 2;
/// The rules evaluate at most this many event ids per transaction, so a
/// long catch-up after a crash is many short transactions.
const RULE_CHUNK: i64 = 10_000;
/// A publisher's refusals are logged at most once per this period.
const REJECT_LOG_PERIOD: Duration = Duration::from_secs(60);
/// Publishers remembered for the refusal log's rate limit before the
/// stale ones are forgotten.
const REJECT_LOG_ENTRIES: usize = 1024;

/// What the store writer needs.
#[derive(Debug, Clone)]
pub struct WriterConfig {
    /// The event store (`<data_dir>/events.db`).
    pub database: PathBuf,
    /// Batching and retention.
    pub store: StoreSpec,
    /// The rules to run (enabled ones; disabled ones are skipped).
    pub rules: Vec<RuleSpec>,
    /// DaemonEye's own executables, which the built-in rules leave out
    /// (`daemoneye_self`).
    pub own: Arc<OwnBinaries>,
}

/// Why the store writer did not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WriterError {
    /// The event store did not open (the error names the file).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A rule was refused.
    #[error(transparent)]
    Rules(#[from] RuleError),
    /// Reading where the store and the rules stand failed.
    #[error("event store {}: {source}", path.display())]
    Sqlite {
        /// The database file.
        path: PathBuf,
        /// What SQLite reported.
        source: rusqlite::Error,
    },
    /// The bus refused the subscription to process events.
    #[error("cannot subscribe to {pattern}: {source}")]
    Subscribe {
        /// The pattern.
        pattern: &'static str,
        /// The bus error.
        source: ClientError,
    },
    /// The thread could not be spawned.
    #[error("cannot start the store writer thread: {0}")]
    Thread(std::io::Error),
}

/// The counters shared by the thread and the handle.
#[derive(Debug, Default)]
struct Counters {
    status: StoreStatus,
    /// Events committed per collector since start.
    per_collector: HashMap<String, u64>,
}

/// The handle of the store writer thread. Dropping it stops the thread
/// like [`StoreWriter::shutdown`].
pub struct StoreWriter {
    counters: Arc<Mutex<Counters>>,
    /// Alerts the agent raises itself (a collector's WAL full, its
    /// acknowledgements stalled), stored and published by the thread.
    alerts: Sender<SystemAlert>,
    // Field order: the stop sender is dropped before the thread is joined
    // (`Drop` sends on it first anyway).
    stop: Sender<()>,
    thread: Option<JoinHandle<()>>,
}

impl StoreWriter {
    /// Opens the store (creating it if missing), compiles the rules
    /// (refusing a bad one), evaluates the rows a crash left unevaluated
    /// (ids above `rule_cursor`, publishing their alerts), subscribes to
    /// process events and starts the thread `agent-store`.
    pub fn start(client: Arc<Client>, cfg: WriterConfig) -> Result<StoreWriter, WriterError> {
        let store = EventStore::open(&cfg.database)?;
        let rules = RuleEngine::compile(store.connection(), &cfg.rules)?.with_budget(cfg.store.rule_budget());
        let sqlite = |source| WriterError::Sqlite { path: cfg.database.clone(), source };
        daemoneye_store::own::register(store.connection(), cfg.own.clone()).map_err(sqlite)?;
        let rule_cursor = RuleEngine::cursor(store.connection()).map_err(sqlite)?;
        let max_id = max_id(store.connection()).map_err(sqlite)?;
        let sub = client
            .subscribe_with(topic::EVENTS.pattern(), None, Overflow::Block)
            .map_err(|source| WriterError::Subscribe { pattern: topic::EVENTS.pattern(), source })?;
        let counters = Arc::new(Mutex::new(Counters {
            status: StoreStatus {
                path: cfg.database.display().to_string(),
                rules: rules.len(),
                ..StoreStatus::default()
            },
            per_collector: HashMap::new(),
        }));
        log::info!(
            "event store {}: {} rules (time budget {} ms each per batch), rules evaluated through event \
             {rule_cursor}, last event {max_id}",
            cfg.database.display(),
            rules.len(),
            rules.budget().as_millis()
        );
        let mut actor = WriterActor {
            client,
            sub,
            store,
            rules,
            batch_max: cfg.store.batch_max.max(1),
            spec: cfg.store,
            counters: counters.clone(),
            events: Vec::new(),
            gap: None,
            batch_deadline: None,
            retry: None,
            rule_cursor,
            max_id,
            disabled_rules: 0,
            rejections: HashMap::new(),
            versions: HashMap::new(),
            bus_gone: false,
            retention: tick(RETENTION_PERIOD),
            pruning: None,
            prune_due: false,
        };
        if max_id > rule_cursor {
            log::info!("evaluating events ({rule_cursor}, {max_id}] committed before the agent stopped");
        }
        actor.evaluate();
        let (stop, stop_rx) = bounded(1);
        let (alerts, alerts_rx) = bounded(SYSTEM_ALERTS);
        let thread = std::thread::Builder::new()
            .name("agent-store".to_owned())
            .spawn(move || actor.run(stop_rx, alerts_rx))
            .map_err(WriterError::Thread)?;
        Ok(StoreWriter { counters, alerts, stop, thread: Some(thread) })
    }

    /// The writer's counters now.
    pub fn status(&self) -> StoreStatus {
        self.counters.lock().status.clone()
    }

    /// Raises an alert about a collector (rule `rule`, severity high): the
    /// thread stores it in `alerts` (with `event_id` 0 minus the time it
    /// was raised, since no event matches) and publishes it. Never blocks:
    /// with the thread's queue full the alert is logged here only.
    pub fn system_alert(&self, collector_id: &str, rule: &str, description: &str) {
        let alert = SystemAlert {
            collector_id: collector_id.to_owned(),
            rule: rule.to_owned(),
            name: collector_id.to_owned(),
            description: description.to_owned(),
        };
        if self.alerts.try_send(alert).is_err() {
            log::error!(
                "alert {rule} for collector {collector_id} not stored (the store writer is busy): {description}"
            );
        }
    }

    /// Raises an alert about the agent itself (rule `rule`, severity
    /// high, named `name`: an output, say), as [`StoreWriter::system_alert`].
    pub fn agent_alert(&self, rule: &str, name: &str, description: &str) {
        let alert = SystemAlert {
            collector_id: api::AGENT_CLIENT_ID.to_owned(),
            rule: rule.to_owned(),
            name: name.to_owned(),
            description: description.to_owned(),
        };
        if self.alerts.try_send(alert).is_err() {
            log::error!("alert {rule} for {name} not stored (the store writer is busy): {description}");
        }
    }

    /// Events of `collector_id` committed since start.
    pub fn events_stored(&self, collector_id: &str) -> u64 {
        self.counters.lock().per_collector.get(collector_id).copied().unwrap_or(0)
    }

    /// Whether the writer thread has ended (only a panic ends it before
    /// [`StoreWriter::shutdown`]): the agent's watchdog asks.
    pub fn thread_ended(&self) -> bool {
        self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Stops the thread: it commits and acknowledges the events already
    /// received (without waiting for more), then exits; this joins it.
    pub fn shutdown(self) {
        drop(self);
    }

    fn stop_and_join(&mut self) {
        // The channel holds one message; a full channel means a stop is
        // already on its way.
        let _ = self.stop.try_send(());
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            log::error!("the store writer thread panicked");
        }
    }
}

impl Drop for StoreWriter {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// What closes a batch: settled after its events.
enum Pending {
    /// A collector's gap marker.
    Marker(StreamGap),
    /// A number the store settles itself (an event it cannot take).
    Settle { collector_id: String, stream_id: u64, seq: u64, reason: String },
}

/// An alert the agent raises about a collector (or a rule), not about an
/// event.
#[derive(Debug, Clone)]
struct SystemAlert {
    collector_id: String,
    rule: String,
    /// The alert's `name`: the collector's id, or the disabled rule's name.
    name: String,
    description: String,
}

/// A failing commit waiting for its next attempt.
#[derive(Debug, Clone, Copy)]
struct Retry {
    at: Instant,
    delay: Duration,
}

/// The refusal log's memory of one publisher.
#[derive(Debug, Clone, Copy)]
struct RejectLog {
    logged: Instant,
    /// Refusals not logged since.
    suppressed: u64,
}

/// What the thread reacts to.
enum Event {
    /// A message from the subscription.
    Message(Message),
    /// The subscription closed: the bus client is gone.
    BusGone,
    /// The batch's gathering time is over, or a failed commit's backoff.
    Timer,
    /// Time to apply retention.
    Retention,
    /// Nothing waits: delete the next chunk of the retention pass.
    Prune,
    /// An alert the agent raises.
    Alert(SystemAlert),
    /// Stop (or the handle is gone).
    Stop,
}

/// The state of the `agent-store` thread.
struct WriterActor {
    client: Arc<Client>,
    sub: Subscription,
    store: EventStore,
    rules: RuleEngine,
    spec: StoreSpec,
    /// `spec.batch_max`, at least 1.
    batch_max: usize,
    counters: Arc<Mutex<Counters>>,
    /// The batch being gathered (or, with `retry` set, failing to commit).
    events: Vec<EventEnvelope>,
    /// A gap marker (or a number to settle) that closed the batch; settled
    /// after its events.
    gap: Option<Pending>,
    /// When the batch being gathered is committed at the latest.
    batch_deadline: Option<Instant>,
    /// Set while the batch fails to commit.
    retry: Option<Retry>,
    /// The highest event id the rules have evaluated.
    rule_cursor: i64,
    /// The highest event id committed (0: none).
    max_id: i64,
    /// Disabled rules already reported (alerted).
    disabled_rules: usize,
    rejections: HashMap<String, RejectLog>,
    /// The contract version each collector's events last came in: its
    /// acknowledgements go out in the same one, so a collector of the
    /// previous release reads them.
    versions: HashMap<String, Version>,
    bus_gone: bool,
    retention: Receiver<Instant>,
    /// The retention pass in progress.
    pruning: Option<Pruning>,
    /// A batch committed since the last chunk of `pruning`.
    prune_due: bool,
}

impl WriterActor {
    fn run(mut self, stop: Receiver<()>, alerts: Receiver<SystemAlert>) {
        self.start_prune();
        loop {
            match self.next_event(&stop, &alerts) {
                Event::Alert(a) => self.system_alert(a),
                Event::Stop => break,
                Event::Message(msg) => {
                    self.on_message(msg);
                    if self.events.len() >= self.batch_max || self.gap.is_some() {
                        self.commit();
                    }
                }
                Event::Timer => self.commit(),
                Event::Retention => self.start_prune(),
                Event::Prune => self.prune_step(),
                Event::BusGone => {
                    log::error!("store writer: the bus client is gone; no more events will arrive");
                    self.bus_gone = true;
                    self.commit();
                }
            }
            // One chunk per committed batch: a steady stream of events,
            // which leaves no idle moment, does not stall retention.
            if self.prune_due {
                self.prune_step();
            }
        }
        self.drain();
    }

    /// Messages are taken only while the batch has room and no commit is
    /// failing: otherwise they wait in the subscription and, past its
    /// capacity, the broker holds the collectors back.
    fn accepting(&self) -> bool {
        !self.bus_gone && self.retry.is_none() && self.gap.is_none() && self.events.len() < self.batch_max
    }

    fn next_event(&self, stop: &Receiver<()>, alerts: &Receiver<SystemAlert>) -> Event {
        let none = never();
        let messages = if self.accepting() { self.sub.messages() } else { &none };
        let wake = match (self.retry, self.batch_deadline) {
            (Some(r), _) => Some(r.at),
            (None, Some(deadline)) => Some(deadline),
            (None, None) => None,
        };
        let timer = wake.map_or_else(never, at);
        // Ready at once while a retention pass is in progress; last, so it
        // runs only when nothing else waits.
        let prune = if self.pruning.is_some() { at(Instant::now()) } else { never() };
        // Stop first; the timer before messages, so a steady stream of
        // events cannot hold a batch past its deadline.
        select_biased! {
            recv(stop) -> m => {
                if m.is_err() {
                    log::warn!("store writer: its handle is gone without a stop; stopping");
                }
                Event::Stop
            }
            recv(timer) -> _ => Event::Timer,
            recv(alerts) -> a => a.map_or(Event::Stop, Event::Alert),
            recv(messages) -> m => m.map_or(Event::BusGone, Event::Message),
            recv(self.retention) -> _ => Event::Retention,
            recv(prune) -> _ => Event::Prune,
        }
    }

    /// Decodes and checks one message and adds it to the batch.
    fn on_message(&mut self, msg: Message) {
        if msg.topic == topic::GAPS.pattern() {
            match topic::GAPS.decode_versioned(&msg) {
                Ok((gap, version)) if gap.collector_id == msg.from => {
                    self.versions.insert(msg.from.clone(), version);
                    self.gap = Some(Pending::Marker(gap));
                }
                Ok((gap, _)) => {
                    self.reject(&msg, &format!("a gap marker for collector {:?}", gap.collector_id));
                }
                Err(e) => self.reject(&msg, &format!("a gap marker that does not decode ({e})")),
            }
            return;
        }
        match topic::EVENTS.decode_versioned(&msg) {
            Ok((env, version)) => {
                if env.collector_id == msg.from && self.versions.get(&msg.from) != Some(&version) {
                    self.versions.insert(msg.from.clone(), version);
                }
                self.on_message_checked(&msg, env);
            }
            Err(e) => {
                self.reject(&msg, &format!("a payload that does not decode as an event ({e})"));
                // Its own number is settled, so its stream goes on.
                if let Some((collector_id, stream_id, seq)) =
                    daemoneye_contract::event::envelope_head(&msg.payload)
                    && collector_id == msg.from
                    && seq > 0
                    && i64::try_from(seq).is_ok()
                {
                    self.gap = Some(Pending::Settle {
                        collector_id,
                        stream_id,
                        seq,
                        reason: format!("the store could not decode the event: {e}"),
                    });
                }
            }
        }
    }

    /// Checks a decoded event and adds it to the batch.
    fn on_message_checked(&mut self, msg: &Message, env: EventEnvelope) {
        match env {
            env if env.collector_id != msg.from => {
                self.reject(msg, &format!("an event of collector {:?}", env.collector_id));
            }
            env if i64::try_from(env.seq).is_err() => {
                self.reject(msg, &format!("an event with seq {} (beyond the store's range)", env.seq));
            }
            env => {
                if self.events.is_empty() {
                    self.batch_deadline =
                        Some(Instant::now() + Duration::from_millis(self.spec.batch_wait_ms));
                }
                self.events.push(env);
            }
        }
    }

    /// Counts a refused message and logs it, at most once a minute per
    /// publisher.
    fn reject(&mut self, msg: &Message, what: &str) {
        self.counters.lock().status.rejected += 1;
        let now = Instant::now();
        if self.rejections.len() >= REJECT_LOG_ENTRIES {
            self.rejections.retain(|_, r| now.duration_since(r.logged) < REJECT_LOG_PERIOD);
        }
        match self.rejections.get_mut(&msg.from) {
            Some(r) if now.duration_since(r.logged) < REJECT_LOG_PERIOD => r.suppressed += 1,
            entry => {
                let suppressed = entry.map_or(0, |r| r.suppressed);
                let more = if suppressed > 0 {
                    format!(" ({suppressed} more refused from it since the last report)")
                } else {
                    String::new()
                };
                log::warn!(
                    "store writer: refused {what} published by {:?} on {}{more}; \
                     a collector may only publish its own events",
                    msg.from,
                    msg.topic
                );
                self.rejections.insert(msg.from.clone(), RejectLog { logged: now, suppressed: 0 });
            }
        }
    }

    /// Commits the batch, then the gap marker that closed it, acknowledging
    /// each; on failure keeps what is left and schedules a retry.
    fn commit(&mut self) {
        while !self.events.is_empty() {
            let before = self.max_id;
            match self.store.insert_batch(&self.events) {
                Ok(outcome) => {
                    self.events.clear();
                    self.committed(&outcome, before);
                    daemoneye_platform::threads::test_panic_point("agent-store");
                }
                // One event the store can never take (it does not encode):
                // settled as a gap with the reason, or the batch would fail
                // forever.
                Err(StoreError::Unstorable { collector_id, stream_id, seq, reason }) => {
                    log::error!(
                        "store writer: cannot store event {collector_id}/{stream_id}/{seq}: {reason}"
                    );
                    self.counters.lock().status.rejected += 1;
                    self.events.retain(|e| {
                        (e.collector_id.as_str(), e.stream_id, e.seq)
                            != (collector_id.as_str(), stream_id, seq)
                    });
                    if let Err(e) = self.store.settle(
                        &collector_id,
                        stream_id,
                        seq,
                        seq,
                        &format!("the store refused it: {reason}"),
                    ) {
                        log::error!(
                            "store writer: cannot record {collector_id}/{stream_id}/{seq} as a gap: {e}"
                        );
                    }
                }
                Err(e) => {
                    let n = self.events.len();
                    self.failed(&format!("commit of {n} events failed: {e}"));
                    return;
                }
            }
        }
        if let Some(pending) = &self.gap {
            let result = match pending {
                Pending::Marker(gap) => self.store.insert_gap(gap).map(|out| {
                    match &out.refused {
                        Some(why) => log::warn!(
                            "store writer: refused a gap marker of {}/{}: {why}",
                            gap.collector_id,
                            gap.stream_id
                        ),
                        None => log::warn!(
                            "collector {} lost events {}..={} of stream {} ({}); recorded in stream_gaps",
                            gap.collector_id,
                            gap.from,
                            gap.to,
                            gap.stream_id,
                            printable(&gap.reason)
                        ),
                    }
                    log_gaps(&out.gaps);
                    if out.refused.is_some() {
                        self.counters.lock().status.rejected += 1;
                    }
                    Some(out.watermark)
                }),
                Pending::Settle { collector_id, stream_id, seq, reason } => {
                    self.store.settle(collector_id, *stream_id, *seq, *seq, reason).inspect(|_| {
                        log::warn!(
                            "store writer: event {collector_id}/{stream_id}/{seq} settled as a gap: {}",
                            printable(reason)
                        );
                    })
                }
            };
            match result {
                Ok(watermark) => {
                    self.gap = None;
                    self.acknowledge(watermark.as_slice());
                }
                Err(e) => {
                    self.failed(&format!("recording a gap failed: {e}"));
                    return;
                }
            }
        }
        self.retry = None;
        self.batch_deadline = None;
    }

    /// Counts a failed commit and schedules the next attempt.
    fn failed(&mut self, what: &str) {
        self.counters.lock().status.errors += 1;
        let delay = self.retry.map_or(RETRY_MIN, |r| (r.delay * 2).min(RETRY_MAX));
        log::error!("store writer: {what}; retrying in {delay:?}, nothing is acknowledged until it succeeds");
        self.retry = Some(Retry { at: Instant::now() + delay, delay });
    }

    /// After a batch committed: count (first, so the status a collector
    /// reads after its acknowledgement includes the batch), acknowledge,
    /// run the rules.
    fn committed(&mut self, outcome: &BatchOutcome, before: i64) {
        let mut per_collector = Vec::new();
        if outcome.inserted > 0 {
            // This thread is the store's only writer, so the rows above the
            // previous highest id are this batch's.
            match self.new_rows_by_collector(before) {
                Ok((rows, max)) => {
                    per_collector = rows;
                    self.max_id = self.max_id.max(max);
                }
                Err(e) => log::warn!("store writer: cannot count the batch's rows per collector: {e}"),
            }
        }
        {
            let mut c = self.counters.lock();
            let s = &mut c.status;
            s.events_committed += outcome.inserted as u64;
            s.duplicates += outcome.duplicates as u64;
            s.batches += 1;
            s.last_commit_unix_ms = Some(api::now_unix_ms());
            for (collector, n) in per_collector {
                *c.per_collector.entry(collector).or_default() += n;
            }
        }
        log::debug!("store writer: committed {} events, {} duplicates", outcome.inserted, outcome.duplicates);
        log_gaps(&outcome.gaps);
        if !outcome.refused.is_empty() {
            self.counters.lock().status.rejected += outcome.refused.len() as u64;
            for (seq, why) in outcome.refused.iter().take(3) {
                log::warn!("store writer: refused event seq {seq}: {why}");
            }
        }
        self.acknowledge(&outcome.watermarks);
        self.evaluate();
        self.prune_due = self.pruning.is_some();
    }

    /// Rows with an id above `before`, counted per collector, and the
    /// highest id.
    fn new_rows_by_collector(&self, before: i64) -> rusqlite::Result<(Vec<(String, u64)>, i64)> {
        let conn = self.store.connection();
        let mut stmt = conn.prepare_cached(
            "SELECT collector_id, count(*), max(id) FROM process_events WHERE id > ?1 GROUP BY collector_id",
        )?;
        let mut max = before;
        let rows = stmt.query_map([before], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?.max(0).cast_unsigned(), r.get::<_, i64>(2)?))
        })?;
        let mut counts = Vec::new();
        for row in rows {
            let (collector, n, top) = row?;
            max = max.max(top);
            counts.push((collector, n));
        }
        Ok((counts, max))
    }

    /// Publishes a [`StoreAck`] for each watermark. A failed publish is
    /// logged: the collector keeps those events and replays them, and the
    /// replay (duplicates) is acknowledged again.
    fn acknowledge(&self, watermarks: &[StreamWatermark]) {
        for w in watermarks {
            let ack = StoreAck { stream_id: w.stream_id, through: w.through };
            let version = self.versions.get(&w.collector_id).copied().unwrap_or(Version::CURRENT);
            let bytes = topic::ACKS.encode_as(version, &ack);
            if let Err(e) = self.client.publish(&topic::ACKS.at(&w.collector_id), &bytes) {
                log::warn!(
                    "store writer: cannot acknowledge {}/{} through {}: {e}",
                    w.collector_id,
                    w.stream_id,
                    w.through
                );
            }
        }
    }

    /// Runs the rules over the committed events they have not seen yet, in
    /// chunks; on failure the cursor stays and the next commit retries.
    fn evaluate(&mut self) {
        while self.rule_cursor < self.max_id {
            let through = self.max_id.min(self.rule_cursor.saturating_add(RULE_CHUNK));
            let result =
                self.rules.run(self.store.connection_mut(), self.rule_cursor, through, api::now_unix_ms());
            self.report_disabled_rules();
            match result {
                Ok(alerts) => {
                    self.rule_cursor = through;
                    self.raise(alerts);
                }
                Err(e) => {
                    self.counters.lock().status.errors += 1;
                    log::error!(
                        "store writer: evaluating the rules over events ({}, {through}] failed: {e}; \
                         retrying after the next commit",
                        self.rule_cursor
                    );
                    return;
                }
            }
        }
    }

    /// Raises an alert for each rule disabled since the last call (the
    /// engine logged it at ERROR).
    fn report_disabled_rules(&mut self) {
        let disabled: Vec<String> =
            self.rules.disabled_rules().iter().skip(self.disabled_rules).map(|n| (*n).to_owned()).collect();
        self.disabled_rules += disabled.len();
        let budget = self.rules.budget().as_millis();
        for name in disabled {
            self.system_alert(SystemAlert {
                collector_id: api::AGENT_CLIENT_ID.to_owned(),
                rule: RULE_DISABLED_RULE.to_owned(),
                description: format!(
                    "rule {name} disabled: it ran over its time budget of {budget} ms (store.rule_budget_ms) \
                     in {} consecutive batches; it is not run until the agent restarts",
                    crate::rules::MAX_OVERRUNS
                ),
                name,
            });
        }
    }

    /// Logs and publishes new alerts.
    fn raise(&self, alerts: Vec<Alert>) {
        if alerts.is_empty() {
            return;
        }
        self.counters.lock().status.alerts_raised += alerts.len() as u64;
        for a in alerts {
            log::warn!(
                "alert {} {}: pid {} {} {}",
                a.severity.as_str(),
                a.rule,
                a.pid,
                printable(&a.name),
                printable(a.exe.as_deref().unwrap_or("-"))
            );
            if let Err(e) = topic::ALERTS.publish(&self.client, topic::ALERTS.pattern(), &a) {
                log::warn!(
                    "store writer: cannot publish alert {} ({}): {e}; it is in the store",
                    a.id,
                    a.rule
                );
            }
        }
    }

    /// Stores and publishes an alert the agent raised about a collector.
    fn system_alert(&mut self, a: SystemAlert) {
        let now = api::now_unix_ms();
        let raised = i64::try_from(now).unwrap_or(i64::MAX);
        // `(rule, event_id)` is unique: a second alert of the same rule in
        // the same millisecond (two rules disabled by one batch) takes the
        // next id down.
        let mut event_id = -raised;
        let mut id = 0;
        for _ in 0..SYSTEM_ALERTS {
            let inserted = self.store.connection().execute(
                "INSERT INTO alerts (rule, severity, description, event_id, collector_id, pid, name, exe,
                                     command_line, observed_ms, raised_ms)
                 VALUES (?1, 'high', ?2, ?3, ?4, 0, ?5, NULL, NULL, ?6, ?6)
                 ON CONFLICT (rule, event_id) DO NOTHING",
                rusqlite::params![a.rule, a.description, event_id, a.collector_id, a.name, raised],
            );
            match inserted {
                Ok(0) => event_id = event_id.saturating_sub(1),
                Ok(_) => {
                    id = self.store.connection().last_insert_rowid();
                    break;
                }
                Err(e) => {
                    self.counters.lock().status.errors += 1;
                    log::error!("store writer: cannot store alert {} for {}: {e}", a.rule, a.collector_id);
                    break;
                }
            }
        }
        self.raise(vec![Alert {
            id,
            rule: a.rule,
            severity: api::Severity::High,
            description: a.description,
            event_id,
            collector_id: a.collector_id,
            pid: 0,
            name: a.name,
            exe: None,
            command_line: None,
            observed_unix_ms: now,
            raised_unix_ms: now,
        }]);
    }

    /// Starts a retention pass (`retention_days` and `max_events`, 0 for
    /// none) and deletes its first chunk; a pass still in progress goes on
    /// instead.
    fn start_prune(&mut self) {
        if self.pruning.is_some() {
            return;
        }
        let retention = Retention {
            max_age: (self.spec.retention_days > 0)
                .then(|| Duration::from_secs(self.spec.retention_days.saturating_mul(86_400))),
            max_events: (self.spec.max_events > 0).then_some(self.spec.max_events),
        };
        if retention.max_age.is_none() && retention.max_events.is_none() {
            return;
        }
        self.pruning = Some(Pruning::new(&retention));
        self.prune_step();
    }

    /// Deletes the next chunk of the retention pass (one transaction).
    fn prune_step(&mut self) {
        self.prune_due = false;
        let Some(pruning) = &mut self.pruning else {
            return;
        };
        match self.store.prune_step(pruning) {
            Ok(n) => {
                self.counters.lock().status.pruned += n;
                if pruning.is_done() {
                    if pruning.deleted() > 0 {
                        log::info!(
                            "store writer: pruned {} events ({} transactions)",
                            pruning.deleted(),
                            pruning.transactions()
                        );
                    }
                    self.pruning = None;
                }
            }
            Err(e) => {
                self.counters.lock().status.errors += 1;
                log::warn!(
                    "store writer: pruning failed after {} events: {e}; trying again in {RETENTION_PERIOD:?}",
                    pruning.deleted()
                );
                self.pruning = None;
            }
        }
    }

    /// At shutdown: takes the messages the subscription already holds (not
    /// those arriving meanwhile), commits and acknowledges them, with a
    /// few attempts if the store fails.
    fn drain(&mut self) {
        let mut waiting = self.sub.messages().len();
        let mut failures = 0;
        loop {
            while waiting > 0 && self.gap.is_none() && self.events.len() < self.batch_max {
                waiting -= 1;
                match self.sub.messages().try_recv() {
                    Ok(msg) => self.on_message(msg),
                    Err(_) => waiting = 0,
                }
            }
            if self.events.is_empty() && self.gap.is_none() {
                break;
            }
            // This is the last chance: no backoff left to wait for.
            self.retry = None;
            self.commit();
            if self.retry.is_some() {
                failures += 1;
                if failures >= SHUTDOWN_ATTEMPTS {
                    log::error!(
                        "store writer: giving up on {} events at shutdown; they were not acknowledged, \
                         so their collectors will replay them",
                        self.events.len() + waiting
                    );
                    break;
                }
                // Waits without a timer thread; nothing else is served now.
                let _ = crossbeam_channel::after(RETRY_MIN).recv();
            }
        }
        log::info!("store writer stopped");
    }
}

/// The highest event id in the store, 0 if it has none.
fn max_id(conn: &rusqlite::Connection) -> rusqlite::Result<i64> {
    conn.query_row("SELECT max(id) FROM process_events", [], |r| r.get::<_, Option<i64>>(0))
        .map(|m| m.unwrap_or(0))
}
