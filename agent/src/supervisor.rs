//! The supervisor thread (`agent-supervisor`): it owns the collectors'
//! processes.
//!
//! - **Spawn.** Each enabled collector runs as a child with
//!   `DAEMONEYE_BROKER_SOCKET`, `DAEMONEYE_BROKER_UID` (the uid its client
//!   expects the broker's socket to be served by), `--collector-id`,
//!   `--data-dir` and `--heartbeat-interval` set by the agent.
//! - **Vouch.** The broker welcomes a collector's id only from the
//!   process vouched for it: the supervisor vouches for each process it
//!   spawns or adopts (pid and start time) and revokes at its exit, so
//!   nobody can take the id in a restart window.
//! - **Adopt.** A collector found running at start (its lock file
//!   `<data dir>/procmond-<id>.pid` is held: an agent that died without
//!   stopping it) is taken over rather than spawned twice. It reconnects
//!   to the new broker by itself and replays what the store has not
//!   acknowledged. Its liveness is the lock: when the lock can be taken,
//!   it is gone.
//! - **Log.** A collector's stdout and stderr go to its own
//!   `<data dir>/collector.log` (0600; rotated to `collector.log.1` past
//!   8 MiB), which outlives the agent; an exit with a status other than 0
//!   is reported with the last line it wrote there.
//! - **Check.** [`check_args`] runs the collector with `--check-args`
//!   before the agent starts (and for `--check-config`), so arguments it
//!   refuses are refused as configuration errors, in its own words.
//! - **Reap and restart.** Children are polled with `try_wait` every
//!   250 ms; an exit is logged with its status and reported to the
//!   monitor, and, with `auto_restart`, the collector is started again
//!   after a backoff (1 s, doubling to 30 s) unless it restarted
//!   `max_restarts` times within `restart_window_secs` already.
//! - **Stop.** On the monitor's request (escalation) or at shutdown: wait
//!   for the exit up to a grace period, then SIGKILL by the process's own
//!   pid, then wait again. Children still running when the supervisor is
//!   dropped are killed and reaped (kill-on-drop). A signal that fails is
//!   logged as a failure.
//! - **Privilege separation.** With `run_as`, this thread runs in the
//!   privileged part (root) and the worker's [`Supervisor::remote`]
//!   forwards the same requests to it over the privsep link
//!   (`privsep.rs`); the vouchers then travel over that link to the
//!   worker's broker ([`Voucher`]).

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, bounded, select, tick};
use daemoneye_bus::Vouchers;
use daemoneye_platform::paths::PidLock;
use daemoneye_platform::spawn::{Spawned, spawn as spawn_process};
use nix::errno::Errno;
use nix::sys::signal::Signal;
use parking_lot::Mutex;

use crate::config::{AgentConfig, CollectorSpec};

/// The environment variable that puts procmond in actor mode.
pub const BROKER_ENV: &str = "DAEMONEYE_BROKER_SOCKET";

/// How often children are polled for their exit.
const POLL: Duration = Duration::from_millis(250);

/// First delay before a restart; it doubles per restart in the window.
const BACKOFF_MIN: Duration = Duration::from_secs(1);
/// Longest delay before a restart.
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Who learns which process may hold a collector's id: the broker's
/// [`Vouchers`], or, in the privileged part, the worker's over the link.
pub trait Voucher: Send {
    /// `id` is to be accepted from `pid` only.
    fn vouch(&self, id: &str, pid: u32);
    /// `id` is no longer held by `pid`.
    fn revoke(&self, id: &str, pid: u32);
}

impl Voucher for Vouchers {
    fn vouch(&self, id: &str, pid: u32) {
        Vouchers::vouch(self, id, pid);
    }

    fn revoke(&self, id: &str, pid: u32) {
        Vouchers::revoke(self, id, pid);
    }
}

/// What the supervisor tells the monitor (and, under privilege
/// separation, the privileged part tells the worker over the link).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum SupervisorEvent {
    /// A process runs for the collector.
    Started {
        /// The collector.
        id: String,
        /// Its pid.
        pid: u32,
        /// Found running, not spawned.
        adopted: bool,
    },
    /// It could not be started.
    SpawnFailed {
        /// The collector.
        id: String,
        /// Why.
        reason: String,
    },
    /// Its process ended.
    Exited {
        /// The collector.
        id: String,
        /// How ("exit status 0", "signal 9 (SIGKILL)").
        status: String,
        /// Whether it will be started again.
        restart_in: Option<Duration>,
        /// Why not, when not.
        not_restarted: Option<String>,
    },
    /// A step of a stop: "SIGKILL sent", "exited".
    Step {
        /// The collector.
        id: String,
        /// kill, restart.
        step: String,
        /// What happened.
        outcome: String,
    },
}

/// Requests to the supervisor.
pub(crate) enum Request {
    /// Stop one collector if it still runs as `pid`: wait `grace` for its
    /// exit, then SIGKILL and wait `kill_wait`; then the restart policy
    /// applies.
    Stop { id: String, pid: u32, grace: Duration, kill_wait: Duration },
    /// Stop every collector and restart none: SIGTERM to those not in
    /// `stopping` (already asked over RPC), SIGKILL after `grace`; the
    /// reply comes when all are gone.
    StopAll { stopping: Vec<String>, grace: Duration, kill_wait: Duration, done: Sender<()> },
    /// No more restarts (the flag is set already; this tells the
    /// privileged part).
    BeginShutdown,
}

/// Handle to the supervisor thread.
pub struct Supervisor {
    tx: Sender<Request>,
    pids: Arc<Mutex<Vec<u32>>>,
    closing: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

enum Proc {
    /// Our child.
    Child(Spawned),
    /// Found running; its lock file says it lives.
    Adopted { pid: u32, lock: PathBuf },
}

impl Proc {
    fn pid(&self) -> u32 {
        match self {
            Proc::Child(c) => c.id(),
            Proc::Adopted { pid, .. } => *pid,
        }
    }

    /// `Some(status)` once it has ended.
    fn poll(&mut self) -> Option<String> {
        match self {
            Proc::Child(c) => match c.try_wait() {
                Ok(Some(s)) => Some(s.to_string()),
                Ok(None) => None,
                Err(e) => Some(format!("lost ({e})")),
            },
            Proc::Adopted { lock, .. } => match lock_holder(lock) {
                Some(_) => None,
                None => Some("ended (adopted; status unknown)".to_owned()),
            },
        }
    }

    /// SIGKILL; `Err` says why it was not delivered.
    fn kill(&mut self) -> Result<(), String> {
        self.signal(Signal::SIGKILL)
    }

    fn terminate(&mut self) -> Result<(), String> {
        self.signal(Signal::SIGTERM)
    }

    fn signal(&mut self, sig: Signal) -> Result<(), String> {
        let pid = self.pid();
        let sent = match self {
            Proc::Child(c) => c.signal(sig),
            Proc::Adopted { lock, .. } => {
                // Only while its lock is still held by that pid: never a
                // process that merely reuses the number.
                if lock_holder(lock) != Some(pid) {
                    return Err(format!("pid {pid} no longer holds {}", lock.display()));
                }
                let p = i32::try_from(pid).map_err(|_| format!("pid {pid} out of range"))?;
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), sig)
            }
        };
        match sent {
            Ok(()) => Ok(()),
            // Gone already (an exit the next poll reaps): nothing to do.
            Err(Errno::ESRCH) => Ok(()),
            Err(e) => Err(format!("{sig} to pid {pid} failed: {e}")),
        }
    }
}

/// The pid holding a collector's lock file (0 when its file names none),
/// or `None` when nobody holds it.
fn lock_holder(path: &Path) -> Option<u32> {
    PidLock::holder(path).map(|pid| pid.unwrap_or(0))
}

/// One supervised collector.
struct Slot {
    spec: CollectorSpec,
    data_dir: PathBuf,
    proc: Option<Proc>,
    /// Restart times within the window.
    restarts: VecDeque<Instant>,
    restart_at: Option<Instant>,
    /// A stop in progress: (SIGKILL at, give up waiting at).
    stopping: Option<(Instant, Option<Instant>)>,
}

struct Inner {
    slots: Vec<Slot>,
    /// The broker's table of vouched processes (or the link to it).
    vouchers: Box<dyn Voucher>,
    socket: PathBuf,
    /// The uid serving the broker's socket, for the collectors' check.
    broker_uid: u32,
    events: Sender<SupervisorEvent>,
    pids: Arc<Mutex<Vec<u32>>>,
    /// Shutting down: no restarts.
    closing: Arc<AtomicBool>,
}

impl Supervisor {
    /// Starts the thread and the enabled collectors.
    /// `pids` is kept up to date with the collectors' pids (for a
    /// last-resort kill from the signal thread); `vouchers` is the broker's
    /// table of the processes that may hold a collector's id; `broker_uid`
    /// the uid that serves the broker's socket.
    pub fn start(
        cfg: &AgentConfig,
        events: Sender<SupervisorEvent>,
        pids: Arc<Mutex<Vec<u32>>>,
        vouchers: Box<dyn Voucher>,
        broker_uid: u32,
    ) -> std::io::Result<Supervisor> {
        let slots = cfg
            .collectors
            .iter()
            .filter(|c| c.enabled)
            .map(|c| Slot {
                spec: c.clone(),
                data_dir: cfg.collector_data_dir(c),
                proc: None,
                restarts: VecDeque::new(),
                restart_at: None,
                stopping: None,
            })
            .collect();
        let closing = Arc::new(AtomicBool::new(false));
        let mut inner = Inner {
            slots,
            vouchers,
            socket: cfg.broker_socket(),
            broker_uid,
            events,
            pids: pids.clone(),
            closing: closing.clone(),
        };
        let (tx, rx) = bounded(16);
        let thread = std::thread::Builder::new().name("agent-supervisor".into()).spawn(move || {
            for i in 0..inner.slots.len() {
                inner.launch(i);
            }
            inner.run(&rx);
        })?;
        Ok(Supervisor { tx, pids, closing, thread: Some(thread) })
    }

    /// The worker's supervisor under privilege separation: the same
    /// requests, served by the privileged part's supervisor over `link`
    /// (which it asks to start the collectors now); its events arrive on
    /// `events` and its vouches go to `vouchers`.
    pub fn remote(
        link: crate::privsep::WorkerLink,
        events: Sender<SupervisorEvent>,
        vouchers: Vouchers,
    ) -> std::io::Result<Supervisor> {
        let (tx, rx) = bounded(16);
        let thread = crate::privsep::remote(link, rx, events, vouchers)?;
        let pids = Arc::new(Mutex::new(Vec::new()));
        Ok(Supervisor { tx, pids, closing: Arc::new(AtomicBool::new(false)), thread: Some(thread) })
    }

    /// Whether the supervisor thread (or, in the worker, the privsep
    /// link's) has ended before being told to.
    pub fn thread_ended(&self) -> bool {
        self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// From now on, exits are not restarted (the agent is shutting down).
    pub fn begin_shutdown(&self) {
        self.closing.store(true, Ordering::Release);
        let _ = self.tx.try_send(Request::BeginShutdown);
    }

    /// Pids of the collectors' processes now.
    pub fn pids(&self) -> Vec<u32> {
        self.pids.lock().clone()
    }

    /// Stops one collector (an escalation step) if it still runs as `pid`:
    /// waits `grace` for it to exit, then SIGKILLs it and waits
    /// `kill_wait`. The restart policy
    /// then applies as for any exit.
    pub fn stop(&self, id: &str, pid: u32, grace: Duration, kill_wait: Duration) {
        if self.tx.try_send(Request::Stop { id: id.to_owned(), pid, grace, kill_wait }).is_err() {
            log::warn!("supervisor busy or gone: cannot stop {id}");
        }
    }

    /// Stops every collector: SIGTERM to each not in `stopping` (those
    /// accepted a GracefulShutdown RPC; a signal now would cut their
    /// flush short), SIGKILL after `grace`, then reaps; returns when all
    /// are gone (or after `grace + kill_wait` more), and ends the thread.
    pub fn shutdown(&self, stopping: Vec<String>, grace: Duration, kill_wait: Duration) {
        let (done, wait) = bounded(1);
        if self.tx.send(Request::StopAll { stopping, grace, kill_wait, done }).is_ok() {
            let _ = wait.recv_timeout(grace + kill_wait + Duration::from_secs(2));
        }
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            // The thread ends when its command channel closes; it kills
            // and reaps what still runs.
            let (tx, _) = bounded(1);
            drop(std::mem::replace(&mut self.tx, tx));
            let _ = t.join();
        }
    }
}

impl Inner {
    fn run(&mut self, rx: &Receiver<Request>) {
        // Exits are polled (SIGCHLD is blocked for the signal thread):
        // 4 times a second.
        let ticker = tick(POLL);
        let logs = tick(LOG_CHECK);
        let mut all_done: Option<(Sender<()>, Instant)> = None;
        loop {
            select! {
                recv(rx) -> cmd => match cmd {
                    Ok(Request::Stop { id, pid, grace, kill_wait }) => {
                        // Only the process the escalation began with: a
                        // restarted one is left alone.
                        if let Some(s) = self.slots.iter_mut().find(|s| s.spec.id == id)
                            && s.proc.as_ref().is_some_and(|p| p.pid() == pid)
                        {
                            let now = Instant::now();
                            s.stopping = Some((now + grace, Some(now + grace + kill_wait)));
                        }
                    }
                    Ok(Request::BeginShutdown) => self.closing.store(true, Ordering::Release),
                    Ok(Request::StopAll { stopping, grace, kill_wait, done }) => {
                        self.closing.store(true, Ordering::Release);
                        let now = Instant::now();
                        for s in &mut self.slots {
                            s.restart_at = None;
                            if let Some(p) = &mut s.proc {
                                if !stopping.contains(&s.spec.id)
                                    && let Err(e) = p.terminate()
                                {
                                    log::error!("collector {}: {e}", s.spec.id);
                                }
                                s.stopping = Some((now + grace, None));
                            }
                        }
                        all_done = Some((done, now + grace + kill_wait));
                    }
                    Err(_) => {
                        self.kill_all();
                        return;
                    }
                },
                recv(ticker) -> _ => {}
                recv(logs) -> _ => {
                    for s in self.slots.iter().filter(|s| s.proc.is_some()) {
                        rotate_running_log(&s.data_dir);
                    }
                }
            }
            self.poll();
            if let Some((done, give_up)) = &all_done {
                let running: Vec<&str> =
                    self.slots.iter().filter(|s| s.proc.is_some()).map(|s| s.spec.id.as_str()).collect();
                if running.is_empty() || Instant::now() >= *give_up {
                    if !running.is_empty() {
                        log::error!("collectors still running after SIGKILL: {}", running.join(", "));
                    }
                    let _ = done.send(());
                    self.kill_all();
                    return;
                }
            }
        }
    }

    /// Reaps exits, runs stop deadlines and due restarts.
    fn poll(&mut self) {
        let now = Instant::now();
        for i in 0..self.slots.len() {
            let s = &mut self.slots[i];
            if let Some(p) = &mut s.proc {
                if let Some(mut status) = p.poll() {
                    // Why, in its own words: the last line it wrote (an
                    // exit it chose; a signal's victim said nothing of it).
                    if status.starts_with("exit status ")
                        && status != "exit status 0"
                        && let Some(line) = last_line(&log_path(&s.data_dir))
                    {
                        status = format!("{status}; its last words: {line}");
                    }
                    self.vouchers.revoke(&s.spec.id, p.pid());
                    s.proc = None;
                    s.stopping = None;
                    self.exited(i, status);
                    continue;
                }
                if let Some((kill_at, give_up)) = s.stopping
                    && now >= kill_at
                {
                    let id = s.spec.id.clone();
                    let outcome = match p.kill() {
                        Ok(()) => {
                            log::warn!(
                                "collector {id}: did not exit in time; SIGKILL sent to pid {}",
                                p.pid()
                            );
                            format!("SIGKILL sent to pid {}", p.pid())
                        }
                        Err(e) => {
                            log::error!("collector {id}: did not exit in time; {e}");
                            format!("FAILED: {e}")
                        }
                    };
                    s.stopping = give_up.map(|g| (g, None));
                    let _ = self.events.try_send(SupervisorEvent::Step { id, step: "kill".into(), outcome });
                }
            } else if s.restart_at.is_some_and(|at| now >= at) {
                s.restart_at = None;
                s.restarts.push_back(now);
                let _ = self.events.try_send(SupervisorEvent::Step {
                    id: s.spec.id.clone(),
                    step: "restart".into(),
                    outcome: "starting again".into(),
                });
                self.launch(i);
            }
        }
        self.publish_pids();
    }

    fn exited(&mut self, i: usize, status: String) {
        let closing = self.closing.load(Ordering::Acquire);
        let s = &mut self.slots[i];
        let id = s.spec.id.clone();
        let window = Duration::from_secs(s.spec.restart_window_secs);
        let now = Instant::now();
        while s.restarts.front().is_some_and(|t| now.duration_since(*t) > window) {
            s.restarts.pop_front();
        }
        let (restart_in, not_restarted) = if closing {
            (None, Some("the agent is shutting down".to_owned()))
        } else if !s.spec.auto_restart {
            (None, Some("auto_restart is off".to_owned()))
        } else if s.restarts.len() >= s.spec.max_restarts as usize {
            (
                None,
                Some(format!(
                    "restarted {} times within {} s (max_restarts); giving up",
                    s.restarts.len(),
                    s.spec.restart_window_secs
                )),
            )
        } else {
            let exp = u32::try_from(s.restarts.len()).unwrap_or(u32::MAX).min(5);
            let delay = (BACKOFF_MIN * 2u32.pow(exp)).min(BACKOFF_MAX);
            s.restart_at = Some(now + delay);
            (Some(delay), None)
        };
        match (&restart_in, &not_restarted) {
            (Some(d), _) if closing => log::info!("collector {id}: {status}; restart in {d:?}"),
            (Some(d), _) => log::warn!("collector {id}: {status}; restarting in {d:?}"),
            (None, Some(why)) if closing => log::info!("collector {id}: {status} ({why})"),
            (None, why) => {
                log::error!("collector {id}: {status}; not restarted: {}", why.as_deref().unwrap_or(""))
            }
        }
        let _ = self.events.try_send(SupervisorEvent::Exited { id, status, restart_in, not_restarted });
    }

    /// Adopts the collector's running process, or spawns one.
    fn launch(&mut self, i: usize) {
        let s = &mut self.slots[i];
        let id = s.spec.id.clone();
        let lock = s.data_dir.join(format!("procmond-{id}.pid"));
        if let Some(pid) = lock_holder(&lock).filter(|p| *p != 0) {
            log::warn!(
                "collector {id}: already running as pid {pid} (lock {}); adopting it: it reconnects and \
                 replays, logging to {}",
                lock.display(),
                log_path(&s.data_dir).display()
            );
            s.proc = Some(Proc::Adopted { pid, lock });
            self.vouchers.vouch(&id, pid);
            let _ = self.events.try_send(SupervisorEvent::Started { id, pid, adopted: true });
            return;
        }
        match spawn(&s.spec, &s.data_dir, &self.socket, self.broker_uid) {
            Ok(child) => {
                let pid = child.id();
                // Not reaped yet, so the pid cannot be reused before this.
                self.vouchers.vouch(&id, pid);
                log::info!(
                    "collector {id}: started {} as pid {pid}, logging to {}",
                    s.spec.binary.display(),
                    log_path(&s.data_dir).display()
                );
                s.proc = Some(Proc::Child(child));
                let _ = self.events.try_send(SupervisorEvent::Started { id, pid, adopted: false });
            }
            Err(e) => {
                let reason = format!("cannot start {}: {e}", s.spec.binary.display());
                log::error!("collector {id}: {reason}");
                let _ = self.events.try_send(SupervisorEvent::SpawnFailed { id, reason: reason.clone() });
                // A failed spawn counts as an exit for the restart policy.
                self.exited(i, reason);
            }
        }
        self.publish_pids();
    }

    fn publish_pids(&self) {
        let pids: Vec<u32> = self.slots.iter().filter_map(|s| s.proc.as_ref().map(Proc::pid)).collect();
        *self.pids.lock() = pids;
    }

    /// Kills and reaps every collector still running.
    fn kill_all(&mut self) {
        for s in &mut self.slots {
            if let Some(mut p) = s.proc.take() {
                self.vouchers.revoke(&s.spec.id, p.pid());
                log::warn!("collector {}: killing pid {}", s.spec.id, p.pid());
                if let Err(e) = p.kill() {
                    log::error!("collector {}: {e}", s.spec.id);
                }
                // Reaped within 5 s; a process stuck in the kernel (it
                // cannot die before its I/O returns) is left to init
                // rather than hang the agent's exit.
                if let Proc::Child(c) = &mut p {
                    let deadline = Instant::now() + Duration::from_secs(5);
                    while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
            }
        }
        self.publish_pids();
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// Starts a collector process: with no signal blocked (the agent blocks
/// SIGTERM and SIGINT for its signal thread; a collector must see them),
/// in its own process group (a Ctrl-C in the agent's terminal reaches the
/// agent only, which then stops the collectors in order).
fn spawn(spec: &CollectorSpec, data_dir: &Path, socket: &Path, broker_uid: u32) -> std::io::Result<Spawned> {
    daemoneye_platform::files::ensure_private_dir(data_dir)?;
    // Root runs only what root alone can change; the path checked is the
    // path run.
    let program = daemoneye_platform::files::trusted_executable(&spec.binary)?;
    let mut log = open_log(data_dir)?;
    {
        use std::io::Write;
        // Where this run begins, so its last words are never an earlier run's.
        writeln!(log, "{RUN_MARK}{} ---", program.display())?;
    }
    let uid = broker_uid.to_string();
    spawn_process(
        &program,
        &collector_args(spec, data_dir),
        &[(BROKER_ENV, socket.as_os_str()), (daemoneye_bus::BROKER_UID_ENV, std::ffi::OsStr::new(&uid))],
        true,
        Some(&log),
    )
}

/// The collector's command line: its own `args`, then what the agent sets.
fn collector_args(spec: &CollectorSpec, data_dir: &Path) -> Vec<std::ffi::OsString> {
    let mut args: Vec<std::ffi::OsString> = spec.args.iter().map(Into::into).collect();
    args.extend([
        "--collector-id".into(),
        spec.id.clone().into(),
        "--data-dir".into(),
        data_dir.as_os_str().to_owned(),
        "--heartbeat-interval".into(),
        spec.heartbeat_interval_secs.to_string().into(),
    ]);
    args
}

/// A collector's log: its stdout and stderr, `<data dir>/collector.log`.
/// It is the collector's own file, not the agent's stderr, so it outlives
/// the agent (an adopted collector keeps writing it).
pub fn log_path(data_dir: &Path) -> PathBuf {
    data_dir.join("collector.log")
}

/// The agent's line in a collector's log before each start.
const RUN_MARK: &str = "--- daemoneye-agent starts ";

/// A log past this size is rotated to `collector.log.1` (one kept).
const LOG_MAX_BYTES: u64 = 8 << 20;
/// How often the logs of running collectors are measured.
const LOG_CHECK: Duration = Duration::from_secs(30);

/// Opens the collector's log for appending (0600, never through a link),
/// rotating it first when it is over [`LOG_MAX_BYTES`].
fn open_log(data_dir: &Path) -> std::io::Result<std::fs::File> {
    let path = log_path(data_dir);
    if std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_file() && m.len() > LOG_MAX_BYTES) {
        std::fs::rename(&path, path.with_extension("log.1"))?;
    }
    daemoneye_platform::files::open_private_log(&path)
}

/// While the collector runs, its log is rotated in place: copied to
/// `collector.log.1`, then truncated (it writes with `O_APPEND`, so it
/// goes on at the new end). A line written between the copy and the
/// truncation is lost: the price of not asking the collector to reopen.
fn rotate_running_log(data_dir: &Path) {
    let path = log_path(data_dir);
    if !std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_file() && m.len() > LOG_MAX_BYTES) {
        return;
    }
    let old = path.with_extension("log.1");
    let rotated = daemoneye_platform::files::open_private_file(&path).and_then(|mut from| {
        let _ = std::fs::remove_file(&old);
        let mut to = daemoneye_platform::files::create_private_file(&old)?;
        std::io::copy(&mut from, &mut to)?;
        from.set_len(0)
    });
    if let Err(e) = rotated {
        log::warn!("cannot rotate {}: {e}", path.display());
    }
}

/// The last non-empty line the current run wrote to a log (from its last
/// 4 KiB), made printable and cut to 300 characters.
fn last_line(path: &Path) -> Option<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = daemoneye_platform::files::open_regular_file(path).ok()?;
    let len = file.metadata().ok()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(4096))).ok()?;
    let mut tail = Vec::new();
    file.read_to_end(&mut tail).ok()?;
    let text = String::from_utf8_lossy(&tail);
    let line = text.lines().rev().map(str::trim).find(|l| !l.is_empty())?;
    if line.starts_with(RUN_MARK) {
        return None;
    }
    let line: String = line.chars().take(300).collect();
    Some(daemoneye_contract::render::printable(&line).into_owned())
}

/// How long a collector may take to answer `--check-args`.
const CHECK_ARGS_TIMEOUT: Duration = Duration::from_secs(10);

/// Asks the collector itself whether it takes its command line: runs
/// `<binary> <args> <what the agent sets> --check-args` (it checks its
/// flags and config file, creates nothing, exits). `Err` says why not, in
/// the collector's words (its first `error:` line, else its last line);
/// `Ok(Some(note))` when it does not know `--check-args` (a collector of
/// an earlier release): its arguments could not be checked.
pub fn check_args(spec: &CollectorSpec, data_dir: &Path) -> Result<Option<String>, String> {
    use std::os::unix::process::CommandExt;
    let mut args = collector_args(spec, data_dir);
    args.push("--check-args".into());
    // As at a spawn: root runs only what root alone can change.
    let program = daemoneye_platform::files::trusted_executable(&spec.binary)
        .map_err(|e| format!("{}: {e}", spec.binary.display()))?;
    let child = std::process::Command::new(&program)
        .args(&args)
        // Its own group, so a timeout kills whatever it started too (a
        // child left holding the pipes would keep the wait from ending).
        .process_group(0)
        .env_remove(BROKER_ENV)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {} --check-args: {e}", spec.binary.display()))?;
    let pid = child.id();
    let (tx, rx) = bounded(1);
    let waiter = std::thread::Builder::new()
        .name("agent-check-args".into())
        .spawn(move || {
            let _ = tx.send(child.wait_with_output());
        })
        .map_err(|e| format!("cannot start a thread: {e}"))?;
    let out = match rx.recv_timeout(CHECK_ARGS_TIMEOUT) {
        Ok(out) => out,
        Err(_) => {
            if let Ok(p) = i32::try_from(pid) {
                let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(p), Signal::SIGKILL);
            }
            let _ = waiter.join();
            return Err(format!(
                "{} did not answer --check-args within {CHECK_ARGS_TIMEOUT:?} (is it a DaemonEye collector?)",
                spec.binary.display()
            ));
        }
    };
    let _ = waiter.join();
    let out = out.map_err(|e| format!("{} --check-args: {e}", spec.binary.display()))?;
    if out.status.success() {
        return Ok(None);
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let said = stderr
        .lines()
        .map(str::trim)
        .find(|l| l.contains("error:"))
        .or_else(|| stderr.lines().map(str::trim).rfind(|l| !l.is_empty()))
        .unwrap_or("(nothing on stderr)");
    if said.contains("--check-args") {
        return Ok(Some(format!(
            "{} does not know --check-args (an earlier release?): its arguments are not checked",
            spec.binary.display()
        )));
    }
    Err(format!(
        "{} refuses them ({}): {}",
        spec.binary.display(),
        out.status,
        daemoneye_contract::render::printable(said)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_words_are_the_current_runs_only_and_printable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = log_path(dir.path());
        assert_eq!(last_line(&log), None, "no log, no words");
        std::fs::write(&log, format!("{RUN_MARK}/bin/a ---\nfirst run's end\n\n{RUN_MARK}/bin/a ---\n  \n"))
            .expect("write");
        assert_eq!(last_line(&log), None, "the run wrote nothing: not the earlier run's words");
        std::fs::write(&log, format!("{RUN_MARK}/bin/a ---\nstarting\nerror: bad \x1b[31mthing\n\n"))
            .expect("write");
        let said = last_line(&log).expect("words");
        assert!(said.starts_with("error: bad ") && !said.contains('\x1b'), "{said:?}");
    }

    #[test]
    fn a_running_collectors_log_is_rotated_in_place_past_its_limit() {
        use std::io::Write;
        let dir = tempfile::tempdir().expect("tempdir");
        let mut log = open_log(dir.path()).expect("open");
        log.write_all(b"small\n").expect("write");
        rotate_running_log(dir.path());
        assert!(!dir.path().join("collector.log.1").exists(), "under the limit: left alone");
        let big = vec![b'x'; usize::try_from(LOG_MAX_BYTES).expect("size")];
        log.write_all(&big).expect("write");
        rotate_running_log(dir.path());
        let old = std::fs::metadata(dir.path().join("collector.log.1")).expect("rotated");
        assert_eq!(old.len(), LOG_MAX_BYTES + 6);
        // The writer goes on at the new end (O_APPEND), not at its old offset.
        log.write_all(b"after\n").expect("write");
        assert_eq!(std::fs::read_to_string(log_path(dir.path())).expect("read"), "after\n");
        // A log found too big at a start is renamed away before the open.
        drop(log);
        std::fs::write(log_path(dir.path()), &big).expect("write");
        std::fs::OpenOptions::new()
            .append(true)
            .open(log_path(dir.path()))
            .and_then(|mut f| f.write_all(b"!"))
            .expect("grow");
        let fresh = open_log(dir.path()).expect("open");
        assert_eq!(fresh.metadata().expect("stat").len(), 0);
    }
}
