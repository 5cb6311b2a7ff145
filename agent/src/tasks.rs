//! The task coordinator: hands the tasks local clients ask for
//! (`daemoneye-cli ps`, `inspect`, `hash`) to collectors, with failover and
//! aggregation.
//!
//! Threads: `agent-tasks-<n>` workers (agent.yaml `tasks.workers`), all
//! taking requests from one subscription to [`TASK_TOPIC`] on the
//! coordinator's own bus client ([`TASKS_CLIENT_ID`]), so a task that waits
//! seconds for collectors never holds up heartbeats, registrations or the
//! store. Each worker serves one request at a time; more wait in the
//! subscription. Dropping the coordinator stops the workers: none starts a
//! request or an attempt after that, one waiting between attempts wakes at
//! once, one waiting for a collector ends with that attempt (at most
//! `tasks.attempt_timeout_ms`); requests still queued are answered
//! `Refused` ("the agent is shutting down").
//!
//! One collector ([`AgentTaskRequest::One`]): the task goes as a bus
//! request on `control.collector.task.<type>` to the queue group of that
//! type's collectors, with the task type's strategy (agent.yaml
//! `tasks.balance`; the bus lets a request choose it). An attempt ends
//! with an answer, a timeout, the broker's word that the member that got
//! it disconnected (at once, not at the timeout), or that no member is
//! connected. A timeout, a departure or a passing failure (`retry`: busy,
//! no list yet, shutting down) starts another attempt, which the broker
//! gives to a member as its strategy says (`LeastLoaded` avoids one that
//! still holds an unanswered task), until `tasks.max_attempts` or
//! `tasks.deadline_ms`; with nobody connected, or after a second passing
//! failure in a row, the next attempt waits a little first (200 ms,
//! doubling: a collector may be restarting or before its first cycle). The answer names the
//! serving collector and lists every attempt. Only a configured collector
//! of the task's type answers it, and only for itself: an answer whose
//! `collector_id` is not its sender (the broker vouches for the sender), or
//! from another type's collector, is ignored (and is an attempt).
//!
//! Every collector ([`AgentTaskRequest::All`], snapshots only): the
//! coordinator asks the monitor for the collectors of the type (its
//! status, over the bus), publishes the snapshot once on
//! `control.collector.task.<type>.all` (each collector subscribes on its
//! own) and gathers answers until every registered one has answered or
//! left, or `tasks.gather_timeout_ms` passes. Lists are merged by process
//! identity `(pid, start_time)`; each process says which collectors listed
//! it. Configured collectors that gave no list are named with the reason
//! (not registered and why, no answer in time, gone, failed or refused
//! answer): never silently missing.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError, bounded, select};
use daemoneye_bus::{Client, ClientError, Message, Subscription};
use daemoneye_contract::control::{self, SnapshotFilter, TaskRequest, TaskResponse, TaskResult, TaskStatus};
use daemoneye_contract::{PeerVersion, Version, topic};
use daemoneye_platform::ProcessKey;
use parking_lot::Mutex;

use crate::api::{
    self, AgentStatus, AgentTaskRequest, AgentTaskResponse, Attempt, CollectorAnswer, CollectorPhase,
    GatherOutcome, MergedProcess, MissingCollector, STATUS_TOPIC, TASK_TOPIC, TaskCounts, TaskOutcome,
    TasksStatus,
};
use crate::config::TasksSpec;

/// How long the coordinator waits for the monitor's list of collectors.
const STATUS_TIMEOUT: Duration = Duration::from_secs(2);

/// The first pause before retrying when no collector is connected, or
/// after a second passing failure in a row; it doubles per pause, within
/// the deadline.
const NO_MEMBER_PAUSE: Duration = Duration::from_millis(200);

/// Counters of the coordinator, read by the monitor for status.
#[derive(Default)]
pub struct TaskStats {
    inner: Mutex<StatsInner>,
}

#[derive(Default)]
struct StatsInner {
    totals: TasksStatus,
    /// Per collector: served, failed, summed latency (µs).
    collectors: HashMap<String, (u64, u64, u64)>,
}

impl TaskStats {
    /// The totals, with `balance` as configured.
    pub fn totals(&self, cfg: &TasksSpec) -> TasksStatus {
        TasksStatus { balance: cfg.balance.clone(), ..self.inner.lock().totals.clone() }
    }

    /// What one collector served for the agent.
    pub fn collector(&self, id: &str) -> TaskCounts {
        let g = self.inner.lock();
        let Some(&(served, failed, latency)) = g.collectors.get(id) else { return TaskCounts::default() };
        TaskCounts { served, failed, avg_latency_us: latency.checked_div(served).unwrap_or(0) }
    }

    fn update(&self, f: impl FnOnce(&mut TasksStatus)) {
        f(&mut self.inner.lock().totals);
    }

    /// An answer from `id` after `rtt`.
    fn answered(&self, id: &str, status: TaskStatus, rtt: Duration) {
        let mut g = self.inner.lock();
        let e = g.collectors.entry(id.to_owned()).or_default();
        e.0 += 1;
        e.1 += u64::from(status == TaskStatus::Failed);
        e.2 += rtt.as_micros() as u64;
    }

    /// `id` took a task and left without answering.
    fn lost(&self, id: &str) {
        self.inner.lock().collectors.entry(id.to_owned()).or_default().1 += 1;
    }
}

/// The coordinator's handle; dropping it stops and joins the workers and
/// refuses the requests still queued ("the agent is shutting down").
pub struct TaskCoordinator {
    // Field order: the stop sender is dropped before the workers join.
    stop: Option<Sender<()>>,
    workers: Vec<JoinHandle<()>>,
    shared: Arc<Worker>,
    sub: Subscription,
}

impl TaskCoordinator {
    /// Whether a worker thread has ended before the stop (a panic).
    pub fn thread_ended(&self) -> bool {
        self.workers.iter().any(JoinHandle::is_finished)
    }

    /// Subscribes to [`TASK_TOPIC`] and starts `cfg.workers` workers.
    /// `members` maps each configured collector id to its type: only
    /// those answer a task of their type.
    pub fn start(
        client: Arc<Client>,
        cfg: TasksSpec,
        members: HashMap<String, String>,
        stats: Arc<TaskStats>,
        collector_version: PeerVersion,
    ) -> anyhow::Result<TaskCoordinator> {
        let sub = client.subscribe(TASK_TOPIC)?;
        let (stop, stop_rx) = bounded::<()>(0);
        let shared = Arc::new(Worker { client, cfg, members, stats, stop: stop_rx, collector_version });
        let mut workers = Vec::new();
        for n in 0..shared.cfg.workers {
            let (w, requests) = (shared.clone(), sub.messages().clone());
            let handle = std::thread::Builder::new().name(format!("agent-tasks-{n}")).spawn(move || {
                // `select!` picks at random among ready arms: the stop is
                // checked before each request, so none starts after it.
                while !w.stopping() {
                    select! {
                        recv(requests) -> msg => match msg {
                            Ok(msg) if !w.stopping() => w.handle(&msg),
                            Ok(msg) => w.refuse(&msg),
                            Err(_) => break,
                        },
                        recv(w.stop) -> _ => break,
                    }
                }
            })?;
            workers.push(handle);
        }
        log::info!(
            "task coordinator: {} workers on {TASK_TOPIC}; balance snapshot {:?}, inspect {:?}, hash {:?}",
            shared.cfg.workers,
            shared.cfg.balance.snapshot,
            shared.cfg.balance.inspect,
            shared.cfg.balance.hash
        );
        Ok(TaskCoordinator { stop: Some(stop), workers, shared, sub })
    }
}

impl Drop for TaskCoordinator {
    fn drop(&mut self) {
        self.stop.take();
        for w in self.workers.drain(..) {
            if w.join().is_err() {
                log::error!("a task worker panicked");
            }
        }
        // Requests the broker routed here before the stop may still be on
        // the socket: a sync takes them into the subscription, so each is
        // refused rather than left to the broker's "responder gone".
        if let Err(e) = self.shared.client.sync() {
            log::debug!("task coordinator: no sync with the broker before stopping: {e}");
        }
        for msg in self.sub.messages().try_iter() {
            self.shared.refuse(&msg);
        }
    }
}

struct Worker {
    client: Arc<Client>,
    cfg: TasksSpec,
    /// Collector id → type, from agent.yaml.
    members: HashMap<String, String>,
    stats: Arc<TaskStats>,
    /// Disconnected when the coordinator stops.
    stop: Receiver<()>,
    /// Tasks are written in the oldest version among the registered
    /// collectors (kept by the monitor).
    collector_version: PeerVersion,
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

impl Worker {
    /// The coordinator is stopping.
    fn stopping(&self) -> bool {
        self.stop.try_recv() == Err(TryRecvError::Disconnected)
    }

    /// Answers a request that will not be served.
    fn refuse(&self, msg: &Message) {
        let refused = AgentTaskResponse::Refused("the agent is shutting down".into());
        if msg.reply_to.is_some()
            && let Err(e) = self.client.reply(msg, &answer(msg, &refused))
        {
            log::debug!("cannot refuse a task request from {}: {e}", msg.from);
        }
    }

    /// Why an answer from `from` does not count for a task of
    /// `collector_type`, if it does not: only a configured collector of
    /// that type, speaking for itself, answers.
    fn foreign(&self, from: &str, named: &str, collector_type: &str) -> Option<String> {
        if named != from {
            return Some(format!("answer naming {named:?} sent by {from:?}: ignored"));
        }
        match self.members.get(from) {
            Some(t) if t == collector_type => None,
            Some(t) => {
                Some(format!("answer from {from}, a {t} collector, to a {collector_type} task: ignored"))
            }
            None => Some(format!("answer from {from}, not a configured collector: ignored")),
        }
    }

    fn handle(&self, msg: &Message) {
        if msg.reply_to.is_none() {
            log::warn!("task request from {} without a reply inbox: ignored", msg.from);
            return;
        }
        self.stats.update(|t| t.requests += 1);
        let response = match topic::AGENT_TASKS.decode_request(msg).map(|(q, _)| q) {
            Err(e) => {
                log::warn!("malformed task request from {} ({} bytes): {e}", msg.from, msg.payload.len());
                AgentTaskResponse::Refused(format!("malformed task request: {e}"))
            }
            Ok(
                AgentTaskRequest::One { collector_type, .. } | AgentTaskRequest::All { collector_type, .. },
            ) if !valid_type(&collector_type) => AgentTaskResponse::Refused(format!(
                "bad collector type {collector_type:?} (letters, digits, '-' and '_')"
            )),
            Ok(AgentTaskRequest::One { collector_type, task }) => {
                AgentTaskResponse::One(self.one(&collector_type, &task))
            }
            Ok(AgentTaskRequest::All { collector_type, filter }) => {
                AgentTaskResponse::All(self.all(&collector_type, &filter))
            }
        };
        match self.client.reply(msg, &answer(msg, &response)) {
            Err(ClientError::TooLarge { len, max }) => {
                let refused = AgentTaskResponse::Refused(format!(
                    "the result of {len} bytes exceeds the bus's maximum message of {max} bytes; \
                     narrow the request (a user, a name pattern)"
                ));
                if let Err(e) = self.client.reply(msg, &answer(msg, &refused)) {
                    log::warn!("cannot answer a task request from {}: {e}", msg.from);
                }
            }
            Err(e) => log::warn!("cannot answer a task request from {}: {e}", msg.from),
            Ok(()) => {}
        }
    }

    /// One collector serves `task`, with failover (see the module docs).
    fn one(&self, collector_type: &str, task: &TaskRequest) -> TaskOutcome {
        let balance = match task {
            TaskRequest::Snapshot(_) => self.cfg.balance.snapshot,
            TaskRequest::Inspect { .. } => self.cfg.balance.inspect,
            TaskRequest::Hash { .. } => self.cfg.balance.hash,
        };
        let topic = control::task_topic(collector_type);
        let payload = topic::TASKS.request.encode_as(self.collector_version.get(), task);
        let started = Instant::now();
        let deadline = started + Duration::from_millis(self.cfg.deadline_ms);
        let per_attempt = Duration::from_millis(self.cfg.attempt_timeout_ms);
        let mut attempts: Vec<Attempt> = Vec::new();
        let mut pause = NO_MEMBER_PAUSE;
        // Passing failures (`retry` answers) in a row.
        let mut passing = 0;
        let outcome = |attempts, response: Option<TaskResponse>, error: Option<String>| TaskOutcome {
            served_by: response.as_ref().map(|r: &TaskResponse| r.collector_id.clone()),
            response,
            attempts,
            elapsed_ms: ms(started.elapsed()),
            error,
        };
        while attempts.len() < self.cfg.max_attempts as usize {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || self.stopping() {
                break;
            }
            if !attempts.is_empty() {
                self.stats.update(|t| t.failovers += 1);
            }
            let wait = per_attempt.min(left);
            let t0 = Instant::now();
            let reply = self.client.request_with(&topic, &payload, wait, Some(balance.strategy()));
            let took = t0.elapsed();
            let attempt = |collector: Option<&str>, outcome: String| Attempt {
                collector: collector.map(str::to_owned),
                outcome,
                elapsed_ms: ms(took),
            };
            match reply {
                Ok(m) => match control::decode::<TaskResponse>(&m.payload) {
                    Ok(r) if let Some(why) = self.foreign(&m.from, &r.collector_id, collector_type) => {
                        log::warn!("task: {why}");
                        attempts.push(attempt(Some(&m.from), why));
                    }
                    Ok(r) => {
                        self.stats.answered(&m.from, r.status, took);
                        let what = describe(&r);
                        attempts.push(attempt(Some(&m.from), what));
                        if r.status == TaskStatus::Failed && r.retry {
                            // Another member may well serve it: the first
                            // retry goes at once. A second passing failure
                            // in a row (every member busy, or none has a
                            // list yet) waits a little first.
                            passing += 1;
                            if passing >= 2 && !self.pause(&mut pause, deadline, attempts.len()) {
                                break;
                            }
                            continue;
                        }
                        self.stats.update(|t| t.answered += 1);
                        return outcome(attempts, Some(r), None);
                    }
                    Err(e) => {
                        log::warn!("undecodable task answer from {}: {e}", m.from);
                        attempts.push(attempt(Some(&m.from), format!("undecodable answer: {e}")));
                    }
                },
                Err(ClientError::Timeout(_)) => {
                    self.stats.update(|t| t.timeouts += 1);
                    attempts.push(attempt(None, format!("no answer within {} ms", ms(wait))));
                }
                Err(ClientError::ResponderGone { responder }) => {
                    self.stats.lost(&responder);
                    log::warn!("collector {responder} disconnected while serving a task; failing over");
                    attempts.push(attempt(Some(&responder), "disconnected before answering".to_owned()));
                }
                Err(e) => {
                    let why = match e {
                        ClientError::NoResponders { .. } => {
                            format!("no collector of type {collector_type} is connected")
                        }
                        e => format!("bus: {e}"),
                    };
                    attempts.push(attempt(None, why));
                    // Nobody to fail over to right now: a collector may be
                    // restarting.
                    if !self.pause(&mut pause, deadline, attempts.len()) {
                        break;
                    }
                }
            }
        }
        self.stats.update(|t| t.unanswered += 1);
        let last = attempts.last().map_or("none".to_owned(), |a| a.outcome.clone());
        let error = format!(
            "no collector of type {collector_type} served the task: {} attempt(s) in {} ms (limits: {} attempts, \
             {} ms); last: {last}",
            attempts.len(),
            ms(started.elapsed()),
            self.cfg.max_attempts,
            self.cfg.deadline_ms
        );
        log::warn!("{error}");
        outcome(attempts, None, Some(error))
    }

    /// Waits `pause` (doubling it) before another attempt, within the
    /// deadline; false when no attempt is left or the coordinator stops.
    fn pause(&self, pause: &mut Duration, deadline: Instant, attempts: usize) -> bool {
        if attempts >= self.cfg.max_attempts as usize {
            return false;
        }
        let nap = (*pause).min(deadline.saturating_duration_since(Instant::now()));
        *pause *= 2;
        self.stop.recv_timeout(nap) != Err(RecvTimeoutError::Disconnected)
    }

    /// Every registered collector of the type answers a snapshot (see the
    /// module docs).
    fn all(&self, collector_type: &str, filter: &SnapshotFilter) -> GatherOutcome {
        self.stats.update(|t| t.gathers += 1);
        let started = Instant::now();
        let mut missing = Vec::new();
        let mut waiting: HashSet<String> = HashSet::new();
        // Whether the monitor said which collectors to wait for.
        let mut known = false;
        match self
            .client
            .request(STATUS_TOPIC, &topic::STATUS.encode_request(&api::StatusRequest), STATUS_TIMEOUT)
            .map(|m| api::decode::<AgentStatus>(&m.payload))
        {
            Ok(Ok(status)) => {
                known = true;
                for c in status.collectors.iter().filter(|c| c.collector_type == collector_type) {
                    if c.registered {
                        waiting.insert(c.id.clone());
                    } else if c.phase != CollectorPhase::Disabled {
                        let exit =
                            c.last_exit.as_deref().map(|e| format!(", last exit: {e}")).unwrap_or_default();
                        let reason = format!("not registered ({}{exit})", c.phase.name());
                        missing.push(MissingCollector { collector_id: c.id.clone(), reason });
                    }
                }
            }
            Ok(Err(e)) => log::warn!("gather: undecodable status from the monitor: {e}"),
            Err(e) => {
                log::warn!("gather: the monitor did not say which collectors run ({e}); taking what answers")
            }
        }
        let window = Duration::from_millis(self.cfg.gather_timeout_ms);
        let payload = topic::TASKS_ALL
            .request
            .encode_as(self.collector_version.get(), &TaskRequest::Snapshot(filter.clone()));
        let mut gather = Gather::default();
        let mut unsent = None;
        match self.client.request_all(&control::task_broadcast_topic(collector_type), &payload, window) {
            Ok(replies) => loop {
                // Done once every registered collector has answered or
                // left; without the monitor's list, only the window ends it.
                if known && waiting.is_empty() {
                    break;
                }
                let reply = select! {
                    recv(replies) -> r => r,
                    recv(self.stop) -> _ => break,
                };
                match reply {
                    Ok(Ok(m)) => {
                        // Only an accepted answer settles a collector; a
                        // bad one is named with the reason.
                        let named = match control::decode::<TaskResponse>(&m.payload) {
                            Ok(r) => match self.foreign(&m.from, &r.collector_id, collector_type) {
                                None => {
                                    gather.add(r, started.elapsed(), &self.stats);
                                    None
                                }
                                Some(why) => Some(why),
                            },
                            Err(e) => Some(format!("undecodable answer: {e}")),
                        };
                        if let Some(why) = named {
                            log::warn!("snapshot of {collector_type}: {}: {why}", m.from);
                            if self.members.contains_key(&m.from) && !gather.answered(&m.from) {
                                missing.push(MissingCollector { collector_id: m.from.clone(), reason: why });
                            }
                        }
                        waiting.remove(&m.from);
                    }
                    Ok(Err(ClientError::ResponderGone { responder })) => {
                        self.stats.lost(&responder);
                        if waiting.remove(&responder) {
                            let reason = "disconnected before answering".to_owned();
                            missing.push(MissingCollector { collector_id: responder, reason });
                        }
                    }
                    // Nobody subscribes, or the window closed.
                    Ok(Err(_)) | Err(_) => break,
                }
            },
            Err(e) => {
                log::warn!("gather: cannot send the snapshot request: {e}");
                unsent = Some(format!("not asked: the agent's bus client failed: {e}"));
            }
        }
        let mut late: Vec<String> = waiting.into_iter().collect();
        late.sort();
        for id in late {
            let reason = unsent
                .clone()
                .unwrap_or_else(|| format!("no answer within {} ms", self.cfg.gather_timeout_ms));
            missing.push(MissingCollector { collector_id: id, reason });
        }
        for a in gather.answered.iter().filter(|a| a.status != TaskStatus::Ok) {
            let reason = format!("answered {:?}: {}", a.status, a.message.as_deref().unwrap_or(""));
            missing.push(MissingCollector { collector_id: a.collector_id.clone(), reason });
        }
        if !missing.is_empty() {
            self.stats.update(|t| t.partial_gathers += 1);
            let names: Vec<String> =
                missing.iter().map(|m| format!("{} ({})", m.collector_id, m.reason)).collect();
            log::info!("snapshot of {collector_type} without {}", names.join(", "));
        }
        let mut processes = gather.merged;
        processes.sort_unstable_by_key(|p| (p.process.pid, p.process.start_time));
        GatherOutcome { processes, answered: gather.answered, missing, elapsed_ms: ms(started.elapsed()) }
    }
}

/// Answers of a gathered snapshot, merged as they arrive.
#[derive(Default)]
struct Gather {
    answered: Vec<CollectorAnswer>,
    merged: Vec<MergedProcess>,
    index: HashMap<ProcessKey, usize>,
}

impl Gather {
    /// Whether `id` has answered already.
    fn answered(&self, id: &str) -> bool {
        self.answered.iter().any(|a| a.collector_id == id)
    }

    /// Adds an accepted answer (its sender checked); a second one from the
    /// same collector is ignored.
    fn add(&mut self, r: TaskResponse, latency: Duration, stats: &TaskStats) {
        if self.answered(&r.collector_id) {
            return;
        }
        stats.answered(&r.collector_id, r.status, latency);
        let at = u16::try_from(self.answered.len()).unwrap_or(u16::MAX);
        let (count, observed) = match r.result {
            Some(TaskResult::Snapshot(list)) if r.status == TaskStatus::Ok => {
                let n = list.processes.len() as u64;
                for p in list.processes {
                    match self.index.get(&p.key()) {
                        Some(&i) => self.merged[i].seen_by.push(at),
                        None => {
                            self.index.insert(p.key(), self.merged.len());
                            self.merged.push(MergedProcess { process: p, seen_by: vec![at] });
                        }
                    }
                }
                (n, Some(list.observed_unix_ms))
            }
            _ => (0, None),
        };
        self.answered.push(CollectorAnswer {
            collector_id: r.collector_id,
            status: r.status,
            message: r.message,
            processes: count,
            observed_unix_ms: observed,
            latency_ms: ms(latency),
        });
    }
}

/// A collector type is one topic segment.
fn valid_type(t: &str) -> bool {
    !t.is_empty() && t.len() <= 64 && t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// An answer in a few words, for the attempt list.
fn describe(r: &TaskResponse) -> String {
    let status = match r.status {
        TaskStatus::Ok => "ok",
        TaskStatus::NotFound => "not found",
        TaskStatus::NotPermitted => "not permitted",
        TaskStatus::Failed if r.retry => "unavailable",
        TaskStatus::Failed => "failed",
    };
    match &r.message {
        Some(m) => format!("{status}: {m}"),
        None => status.to_owned(),
    }
}
/// An answer to an `agent.task` request, in the version it was asked in.
fn answer(msg: &Message, response: &AgentTaskResponse) -> Vec<u8> {
    topic::AGENT_TASKS.encode_answer(Version::of(&msg.payload), response)
}
