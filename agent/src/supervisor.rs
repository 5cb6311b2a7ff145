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
                if let Some(status) = p.poll() {
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
                "collector {id}: already running as pid {pid} (lock {}); adopting it: it reconnects and replays",
                lock.display()
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
                log::info!("collector {id}: started {} as pid {pid}", s.spec.binary.display());
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
    let mut args: Vec<std::ffi::OsString> = spec.args.iter().map(Into::into).collect();
    args.extend([
        "--collector-id".into(),
        spec.id.clone().into(),
        "--data-dir".into(),
        data_dir.as_os_str().to_owned(),
        "--heartbeat-interval".into(),
        spec.heartbeat_interval_secs.to_string().into(),
    ]);
    let uid = broker_uid.to_string();
    spawn_process(
        &program,
        &args,
        &[(BROKER_ENV, socket.as_os_str()), (daemoneye_bus::BROKER_UID_ENV, std::ffi::OsStr::new(&uid))],
        true,
    )
}
