//! The kernel event thread (`procmond-kernel`): owns the platform's
//! [`KernelEventSource`], turns fork, exec, credential and exit events into
//! [`Observation`]s, and hands them to the actor in batches.
//!
//! - On an exec it reads the process at once (`/proc/<pid>` through one
//!   opened directory), while it still runs. A fork is held for
//!   [`KernelConfig::fork_window`]: most children exec within it, and then
//!   one Started carries the new program; a child that does not is read
//!   when the window closes. A process gone before it could be read is
//!   still reported, with its details `Vanished`.
//! - It never blocks on the actor: batches go out with `try_send` on a
//!   bounded channel; while that is full the next batch grows
//!   (coalescing), and past [`KernelConfig::max_batch`] observations it is
//!   dropped and a resync requested, so the actor's next walk recovers
//!   what was lost. Kernel overruns request a resync too. Both are counted.
//! - Barrier: the actor asks for a sync before and after each walk (see
//!   [`crate::tracker`]); the thread drains the socket, sends what it holds,
//!   then [`KernelMessage::Synced`] with the start time of the oldest fork
//!   it still holds — in the same channel, so the actor takes everything
//!   in the order it happened.
//!
//! Shutdown: dropping [`KernelHandle`] sets a flag, wakes the thread
//! through the source's waker and joins it.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError, bounded};
use daemoneye_platform::{
    KernelEvent, KernelEventKind, KernelEventSource, KernelWaker, ProcessDetails, ProcessRecord,
    ProcessState, Unavailable, Wakeup,
};

use crate::tracker::{Cause, ExitObservation, Observation};

/// Batches the channel to the actor holds.
pub const CHANNEL_CAPACITY: usize = 64;
/// Datagrams read per wake-up before other work (forks due, batches).
const READ_CHUNK: usize = 256;
/// How long an exited pid is remembered, so a fork event that arrives
/// after its exit (events from different CPUs) is not taken for a new
/// process.
const EXITED_MEMORY: Duration = Duration::from_secs(2);
/// How long observations wait to be sent together: each batch the actor
/// takes is one WAL append and fsync, so a storm must not send one per
/// event. Well under the 50 ms budget from exec to the agent's store.
const BATCH_WAIT: Duration = Duration::from_millis(10);
/// A batch this large goes at once.
const BATCH_MAX: usize = 1024;
/// How long a sync may spend reading a backlog.
const SYNC_READ_LIMIT: Duration = Duration::from_secs(3);
/// How long a fork that could not be read waits for its exit event.
const UNREAD_FORK_LIMIT: Duration = Duration::from_secs(5);
/// How often the exited pids are pruned (each is kept [`EXITED_MEMORY`] to
/// this much longer): not at every wake-up, where in a storm (thousands of
/// exits within [`EXITED_MEMORY`]) walking them all took a quarter of the
/// thread's time.
const EXITED_PRUNE_EVERY: Duration = Duration::from_millis(250);

/// Settings of the kernel thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelConfig {
    /// How long a forked child may take to exec before it is reported as
    /// it is.
    pub fork_window: Duration,
    /// Observations held while the actor takes no batch; past it they are
    /// dropped and a resync requested.
    pub max_batch: usize,
    /// Nice levels to raise the thread's priority by (0: none).
    pub priority_boost: u8,
}

impl Default for KernelConfig {
    fn default() -> Self {
        KernelConfig { fork_window: Duration::from_millis(25), max_batch: 100_000, priority_boost: 10 }
    }
}

/// What the thread sends the actor, in order.
#[derive(Debug)]
pub enum KernelMessage {
    /// Observations, in the order they happened.
    Batch(Vec<Observation>),
    /// Events were lost: reconcile soon.
    Resync {
        /// Why.
        reason: &'static str,
    },
    /// The answer to a sync request: every event queued in the socket when
    /// it came was handed over in the batches before this message.
    Synced {
        /// The start time of the oldest fork still held (not yet reported).
        oldest_pending: Option<u64>,
    },
}

/// Counters shared with the actor's health reports.
#[derive(Debug, Default)]
pub struct KernelStats {
    /// Events received (all kinds, threads included).
    pub received: AtomicU64,
    /// Kernel overruns (`ENOBUFS`).
    pub overruns: AtomicU64,
    /// Resyncs requested (overruns, dropped batches).
    pub resyncs: AtomicU64,
    /// Observations dropped because the actor did not keep up.
    pub dropped: AtomicU64,
    /// Datagrams refused as malformed or foreign.
    pub malformed: AtomicU64,
}

/// The actor's side of the link.
pub struct KernelLink {
    /// Batches, resync requests and sync answers, in order.
    pub rx: Receiver<KernelMessage>,
    /// Sync requests: the `CLOCK_MONOTONIC` instant each was made.
    pub sync: Sender<u64>,
    /// Wakes the thread after a sync request.
    pub waker: KernelWaker,
    /// Counters.
    pub stats: Arc<KernelStats>,
}

/// What a sync hands over.
#[derive(Debug, Default)]
pub struct Synced {
    /// Every observation up to the sync, in order.
    pub observations: Vec<Observation>,
    /// The start time of the oldest fork the thread still holds.
    pub oldest_pending: Option<u64>,
    /// A resync was asked for meanwhile.
    pub resync: Option<&'static str>,
    /// The thread answered within the timeout.
    pub answered: bool,
}

impl KernelLink {
    /// Asks the thread to drain the socket and hand over what it holds,
    /// and collects everything up to its answer (at most `timeout`).
    pub fn sync(&self, timeout: Duration) -> Synced {
        let mut out = Synced::default();
        let now = daemoneye_platform::clock::monotonic_ns().unwrap_or(u64::MAX);
        if self.sync.try_send(now).is_err() {
            return out;
        }
        self.waker.wake();
        let deadline = Instant::now() + timeout;
        while let Ok(msg) = self.rx.recv_deadline(deadline) {
            match msg {
                KernelMessage::Batch(b) => out.observations.extend(b),
                KernelMessage::Resync { reason } => out.resync = Some(reason),
                KernelMessage::Synced { oldest_pending } => {
                    out.oldest_pending = oldest_pending;
                    out.answered = true;
                    break;
                }
            }
        }
        out
    }
}

/// The thread's handle. Dropping it stops and joins the thread.
pub struct KernelHandle {
    stop: Arc<AtomicBool>,
    waker: KernelWaker,
    thread: Option<JoinHandle<()>>,
}

impl KernelHandle {
    /// Whether the thread has ended (a panic, before a shutdown): the
    /// main thread's watchdog asks.
    pub fn thread_ended(&self) -> bool {
        self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Starts `procmond-kernel` over an opened source; returns the handle
    /// and the actor's side of the link.
    pub fn start(
        source: KernelEventSource,
        cfg: KernelConfig,
    ) -> std::io::Result<(KernelHandle, KernelLink)> {
        let (tx, rx) = bounded(CHANNEL_CAPACITY);
        let (sync_tx, sync_rx) = bounded(4);
        let stats = Arc::new(KernelStats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let waker = source.waker();
        let worker = Worker {
            source,
            cfg,
            tx,
            sync_rx,
            syncs_owed: 0,
            last_at_ns: 0,
            stats: stats.clone(),
            stop: stop.clone(),
            pending: HashMap::new(),
            known: HashMap::new(),
            exited: HashMap::new(),
            next_prune: Instant::now() + EXITED_PRUNE_EVERY,
            batch: Vec::new(),
            batch_since: None,
            resync: None,
            events: Vec::with_capacity(READ_CHUNK),
        };
        let thread =
            std::thread::Builder::new().name("procmond-kernel".into()).spawn(move || worker.run())?;
        let link = KernelLink { rx, sync: sync_tx, waker: waker.clone(), stats };
        Ok((KernelHandle { stop, waker, thread: Some(thread) }, link))
    }
}

impl Drop for KernelHandle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.waker.wake();
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            log::error!("kernel event thread panicked");
        }
    }
}

/// A forked process not reported yet.
struct Pending {
    at_ns: u64,
    ppid: u32,
    due: Instant,
}

struct Worker {
    source: KernelEventSource,
    cfg: KernelConfig,
    tx: Sender<KernelMessage>,
    sync_rx: Receiver<u64>,
    /// Sync requests not answered yet (the channel was full).
    syncs_owed: usize,
    /// The latest event instant read so far.
    last_at_ns: u64,
    stats: Arc<KernelStats>,
    stop: Arc<AtomicBool>,
    /// Forks waiting for an exec or their window's end, by pid.
    pending: HashMap<u32, Pending>,
    /// Start times of the processes this thread read, by pid, with the
    /// instant of the event that first showed them.
    known: HashMap<u32, (u64, u64)>,
    /// Recently exited pids and the instant of their exit.
    exited: HashMap<u32, (u64, Instant)>,
    /// When `exited` is pruned next.
    next_prune: Instant,
    /// Observations not yet handed over.
    batch: Vec<Observation>,
    /// When the oldest of them was made.
    batch_since: Option<Instant>,
    /// A resync to request, once the channel has room.
    resync: Option<&'static str>,
    events: Vec<KernelEvent>,
}

impl Worker {
    fn run(mut self) {
        daemoneye_platform::threads::test_panic_point("procmond-kernel");
        if self.cfg.priority_boost > 0 {
            match daemoneye_platform::raise_thread_priority(i32::from(self.cfg.priority_boost)) {
                Ok(nice) => log::info!("kernel event thread runs at nice {nice}"),
                Err(why) => log::info!("kernel event thread priority not raised ({why})"),
            }
        }
        log::info!(
            "kernel event thread started ({}, receive buffer {} bytes)",
            self.source.backend(),
            self.source.receive_buffer_bytes()
        );
        while !self.stop.load(Ordering::Acquire) {
            match self.source.wait(self.next_deadline()) {
                Ok(Wakeup::Readable) => {
                    self.read();
                }
                Ok(Wakeup::Woken | Wakeup::Timeout) => {}
                Err(e) => {
                    log::error!("kernel event source failed: {e}; the poll alone reports from now on");
                    break;
                }
            }
            self.expire_forks(Instant::now());
            self.answer_syncs();
            self.send();
        }
        log::info!("kernel event thread stopped");
    }

    /// When the next fork falls due, or a short retry while the actor has
    /// not taken what is held.
    fn next_deadline(&self) -> Option<Instant> {
        let fork = self.pending.values().map(|p| p.due).min();
        let owed = self.resync.is_some() || self.syncs_owed > 0;
        let retry = owed.then(|| Instant::now() + Duration::from_millis(5));
        let batch = self.batch_since.map(|since| since + BATCH_WAIT);
        [fork, retry, batch].into_iter().flatten().min()
    }

    /// Reads a chunk of events and handles them; true when the socket
    /// had no more.
    fn read(&mut self) -> bool {
        let mut events = std::mem::take(&mut self.events);
        events.clear();
        let mut drained = true;
        match self.source.read(&mut events, READ_CHUNK) {
            Ok(outcome) => {
                drained = outcome.drained;
                self.stats.malformed.fetch_add(outcome.malformed + outcome.foreign, Ordering::Relaxed);
                if outcome.overruns > 0 {
                    self.stats.overruns.fetch_add(outcome.overruns, Ordering::Relaxed);
                    log::warn!("kernel event overrun: the kernel dropped events; a resync will recover them");
                    // Exits may be among the lost: what this thread knows
                    // of pids may be stale.
                    self.known.clear();
                    self.request_resync("kernel overrun");
                }
            }
            Err(e) => log::warn!("reading kernel events: {e}"),
        }
        self.stats.received.fetch_add(events.len() as u64, Ordering::Relaxed);
        for e in events.drain(..) {
            self.last_at_ns = self.last_at_ns.max(e.at_ns);
            self.handle(e);
        }
        self.events = events;
        if drained {
            // Everything up to now has been read.
            self.last_at_ns = self.last_at_ns.max(daemoneye_platform::clock::monotonic_ns().unwrap_or(0));
        }
        drained
    }

    fn handle(&mut self, event: KernelEvent) {
        let at = event.at_ns;
        match event.kind {
            KernelEventKind::Fork { parent_tgid, child_pid, child_tgid, .. } if child_pid == child_tgid => {
                // Events from different CPUs may arrive out of order: a
                // fork older than the exit, or than the exec, already seen
                // of this pid is stale.
                let stale = self.exited.get(&child_pid).is_some_and(|(exit_at, _)| *exit_at >= at)
                    || self.known.get(&child_pid).is_some_and(|(_, seen_at)| *seen_at >= at);
                if !stale {
                    let due = Instant::now() + self.cfg.fork_window;
                    self.pending.insert(child_pid, Pending { at_ns: at, ppid: parent_tgid, due });
                }
            }
            KernelEventKind::Exec { pid, tgid } if pid == tgid => {
                let pending = self.pending.remove(&pid);
                let record = match self.read_or_brief(pid) {
                    Some(r) => r,
                    // Reported already (read when its fork window closed)
                    // and gone before its exec could be read: its exit
                    // reports it. A record made up from the exec's time
                    // would be a second identity, and the first would be
                    // left for the walk to stop.
                    None if pending.is_none() && self.known.contains_key(&pid) => return,
                    None => {
                        let (ppid, born) = pending.as_ref().map_or((0, at), |p| (p.ppid, p.at_ns));
                        self.unseen(pid, ppid, self.source.start_time_at(born))
                    }
                };
                self.known.insert(pid, (record.start_time, at));
                self.batch.push(Observation::Process { record, cause: Cause::Exec });
            }
            KernelEventKind::Uid { pid, tgid, .. } | KernelEventKind::Gid { pid, tgid, .. }
                if pid == tgid =>
            {
                // A held fork is read when it is reported; a process gone
                // meanwhile has its exit coming.
                if !self.pending.contains_key(&pid)
                    && let Ok(record) = self.source.read_process(pid)
                {
                    self.known.insert(pid, (record.start_time, at));
                    self.batch.push(Observation::Process { record, cause: Cause::Credentials });
                }
            }
            KernelEventKind::Exit { pid, tgid, status, parent_tgid, .. } if pid == tgid => {
                let pending = self.pending.remove(&pid);
                let known = self.known.remove(&pid);
                self.exited.insert(pid, (at, Instant::now()));
                let unseen = if known.is_some() {
                    None
                } else {
                    // Never read: the zombie's `stat` if it is still there
                    // (and not a newer process on a reused pid), else what
                    // the fork said.
                    let exit_ticks = self.source.start_time_at(at);
                    let brief = self.source.read_brief(pid).ok().filter(|r| r.start_time <= exit_ticks);
                    match (brief, &pending) {
                        (Some(mut r), _) => {
                            r.details = Arc::new(ProcessDetails::vanished());
                            Some(r)
                        }
                        (None, Some(p)) => Some(self.unseen(pid, p.ppid, self.source.start_time_at(p.at_ns))),
                        (None, None) => None,
                    }
                };
                let start_time = known.map(|(st, _)| st).or(unseen.as_ref().map(|r| r.start_time));
                let _ = parent_tgid;
                self.batch.push(Observation::Exit(ExitObservation {
                    pid,
                    start_time,
                    status,
                    at_unix_ms: self.source.unix_ms_at(at),
                    unseen,
                }));
            }
            // Threads, names (a rename is not an exec), sessions, tracers.
            _ => {}
        }
    }

    /// Reads `pid` now; if it has exited, its zombie's `stat` with every
    /// detail `Vanished`; `None` if nothing of it is left.
    fn read_or_brief(&mut self, pid: u32) -> Option<ProcessRecord> {
        match self.source.read_process(pid) {
            Ok(mut r) => {
                if r.state == ProcessState::Zombie {
                    // Read after its exit: its details are gone.
                    r.details = Arc::new(ProcessDetails::vanished());
                }
                Some(r)
            }
            Err(_) => self.source.read_brief(pid).ok().map(|mut r| {
                r.details = Arc::new(ProcessDetails::vanished());
                r
            }),
        }
    }

    /// A record of a process gone before anything of it could be read.
    /// Its name stays empty (the tracker gives a forked child its parent's
    /// name, which it still had).
    fn unseen(&self, pid: u32, ppid: u32, start_time: u64) -> ProcessRecord {
        ProcessRecord {
            pid,
            ppid,
            start_time,
            started_unix: Err(Unavailable::Vanished),
            name: String::new(),
            state: ProcessState::Dead,
            session: Err(Unavailable::Vanished),
            threads: Err(Unavailable::Vanished),
            rss_bytes: 0,
            virtual_bytes: 0,
            cpu_time_ms: Err(Unavailable::Vanished),
            kernel_thread: false,
            details: Arc::new(ProcessDetails::vanished()),
        }
    }

    /// Reports forks whose window closed without an exec.
    fn expire_forks(&mut self, now: Instant) {
        let due: Vec<u32> = self.pending.iter().filter(|(_, p)| p.due <= now).map(|(pid, _)| *pid).collect();
        for pid in due {
            match self.source.read_process(pid) {
                Ok(record) if record.state != ProcessState::Zombie => {
                    self.pending.remove(&pid);
                    self.known.insert(pid, (record.start_time, now_ns_hint(&record)));
                    self.batch.push(Observation::Process { record, cause: Cause::Fork });
                }
                // Gone, or exited: its exit event reports it. One that never
                // comes (lost) is let go after a while; the walk recovers.
                _ => {
                    if self.pending.get(&pid).is_some_and(|p| now.duration_since(p.due) > UNREAD_FORK_LIMIT) {
                        self.pending.remove(&pid);
                    }
                }
            }
        }
        if now >= self.next_prune {
            self.exited.retain(|_, (_, when)| now.duration_since(*when) < EXITED_MEMORY);
            self.next_prune = now + EXITED_PRUNE_EVERY;
        }
    }

    /// For each sync request, reads until every event from before the
    /// request has been read: the socket is empty, or an event stamped
    /// after the request came (the kernel queues them in time order, give
    /// or take the microseconds between CPUs). Bounded in time, so a
    /// thread far behind still answers. The answer follows the batch in the
    /// channel, once there is room.
    fn answer_syncs(&mut self) {
        let mut since = None;
        while let Ok(at) = self.sync_rx.try_recv() {
            self.syncs_owed += 1;
            since = since.max(Some(at));
        }
        let Some(since) = since else { return };
        let give_up = Instant::now() + SYNC_READ_LIMIT;
        while self.last_at_ns < since && Instant::now() < give_up {
            if self.read() {
                break;
            }
        }
    }

    fn request_resync(&mut self, reason: &'static str) {
        self.stats.resyncs.fetch_add(1, Ordering::Relaxed);
        self.resync = Some(reason);
    }

    /// Hands over what is held (once it is old or large enough, or a sync
    /// is owed), then owed sync answers, never waiting.
    fn send(&mut self) {
        if self.batch.is_empty() {
            self.batch_since = None;
        } else if self.batch_since.is_none() {
            self.batch_since = Some(Instant::now());
        }
        let due = self.syncs_owed > 0
            || self.batch.len() >= BATCH_MAX
            || self.batch_since.is_some_and(|since| since.elapsed() >= BATCH_WAIT);
        if due && !self.batch.is_empty() {
            let batch = std::mem::take(&mut self.batch);
            match self.tx.try_send(KernelMessage::Batch(batch)) {
                Ok(()) => self.batch_since = None,
                Err(TrySendError::Full(KernelMessage::Batch(b))) => {
                    self.batch = b;
                    if self.batch.len() > self.cfg.max_batch {
                        let lost = self.batch.len() as u64;
                        self.stats.dropped.fetch_add(lost, Ordering::Relaxed);
                        log::warn!(
                            "the actor is not taking kernel events: {lost} dropped; a resync will recover them"
                        );
                        self.batch.clear();
                        self.known.clear();
                        self.request_resync("the actor fell behind");
                    }
                }
                Err(_) => {}
            }
        }
        if !self.batch.is_empty() {
            return;
        }
        if let Some(reason) = self.resync
            && self.tx.try_send(KernelMessage::Resync { reason }).is_ok()
        {
            self.resync = None;
        }
        while self.syncs_owed > 0 {
            let oldest_pending =
                self.pending.values().map(|p| p.at_ns).min().map(|at| self.source.start_time_at(at));
            if self.tx.try_send(KernelMessage::Synced { oldest_pending }).is_err() {
                break;
            }
            self.syncs_owed -= 1;
        }
    }
}

/// A stand-in instant for a process read at its fork window's end: later
/// than any stale fork of it could be.
fn now_ns_hint(_record: &ProcessRecord) -> u64 {
    daemoneye_platform::clock::monotonic_ns().unwrap_or(u64::MAX)
}
