//! Privilege separation for `run_as`, as OpenSSH and Postfix do it: two
//! processes, one small and privileged, one that does the work without
//! privileges.
//!
//! - **The privileged part** (this process, root; [`run_privileged`])
//!   keeps what needs root: it holds the data dir (root's, mode 0711 so
//!   the worker can reach its own subdirectory) and the agent's lock, and
//!   runs the [`Supervisor`] that spawns, signals, reaps, adopts and
//!   restarts the collectors, which run as root. It parses no bus traffic
//!   and opens no store.
//! - **The worker** (`daemoneye-agent --privsep-worker`, started by the
//!   privileged part with the `run_as` uid and gid and no supplementary
//!   group set by `exec`, in its own process group, stdin on one end of a
//!   socket pair): the broker, the store writer and rules, the monitor and
//!   the task coordinator, in `<data_dir>/agent/` (0700, owned by the
//!   `run_as` user: `events.db`, `run/broker.sock`). It never had root:
//!   its privileges are set before its first instruction runs, so no
//!   thread ever runs with them.
//!
//! The two talk over the socket pair in length-prefixed postcard frames
//! ([`ToWorker`], [`ToPrivileged`]): the worker asks to start the
//! collectors once its broker and store are up, to stop one (an
//! escalation) and to stop them all (shutdown); the privileged part
//! reports starts, exits and escalation steps, vouches for each
//! collector's process (pid and start time) to the worker's broker, and
//! forwards SIGTERM/SIGINT as [`ToWorker::Shutdown`]. The worker's end
//! of the socket is the only thing it holds from root: a frame that does
//! not decode, or one larger than [`MAX_FRAME`], ends the link with a log
//! line, never a panic. When the worker exits (or its end closes), the
//! privileged part kills and reaps what still runs and exits with the
//! worker's status (1 when it crashed); when the privileged part dies,
//! the worker shuts down.

use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use crossbeam_channel::{Receiver, Sender, bounded, select};
use daemoneye_bus::Vouchers;
use daemoneye_platform::files::ensure_owned_dir;
use daemoneye_platform::paths::{PidLock, PidLockError, create_private_dir};
use daemoneye_platform::threads::ended_unexpectedly;
use parking_lot::Mutex;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::config::AgentConfig;
use crate::supervisor::{Supervisor, SupervisorEvent, Voucher};

/// The hidden flag that makes `daemoneye-agent` the worker.
pub const WORKER_FLAG: &str = "--privsep-worker";

/// The largest frame either side accepts (the configuration is the
/// largest message).
pub const MAX_FRAME: u32 = 4 << 20;

/// What the privileged part tells the worker.
#[derive(Debug, Serialize, Deserialize)]
pub enum ToWorker {
    /// The first message: the configuration as the privileged part read
    /// and checked it.
    Hello(Hello),
    /// A collector started, failed to start, exited or took a stop step.
    Event(SupervisorEvent),
    /// `id` is to be accepted from this process only.
    Vouch {
        /// The collector.
        id: String,
        /// Its process.
        pid: u32,
        /// That process's start time, read by root (so the worker needs no
        /// access to root's processes to prove it).
        start_time: Option<u64>,
    },
    /// `id` is no longer held by `pid`.
    Revoke {
        /// The collector.
        id: String,
        /// Its former process.
        pid: u32,
    },
    /// Every collector is gone (the answer to [`ToPrivileged::StopAll`]).
    StoppedAll,
    /// SIGTERM or SIGINT reached the agent: shut down.
    Shutdown,
}

/// The worker's configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hello {
    /// agent.yaml's text (empty: the embedded default).
    pub config: Option<String>,
    /// Its name, for errors.
    pub file: String,
    /// Where relative collector binaries are found.
    pub exe_dir: PathBuf,
    /// `--data-dir`.
    pub data_dir: Option<PathBuf>,
    /// The log level in force.
    pub log_level: String,
}

impl Hello {
    /// The configuration it carries, parsed and checked as the
    /// privileged part did.
    pub fn config(&self) -> Result<AgentConfig, crate::config::ConfigError> {
        let mut cfg = match &self.config {
            Some(text) => AgentConfig::parse(text, &self.file, &self.exe_dir)?,
            None => AgentConfig::load(None, &self.exe_dir)?,
        };
        if let Some(dir) = &self.data_dir {
            cfg.data_dir = Some(dir.clone());
        }
        Ok(cfg)
    }
}

/// What the worker asks of the privileged part.
#[derive(Debug, Serialize, Deserialize)]
pub enum ToPrivileged {
    /// The broker and the store are up: start (or adopt) the collectors.
    Start,
    /// [`Supervisor::stop`].
    Stop {
        /// The collector.
        id: String,
        /// Only while it runs as this pid.
        pid: u32,
        /// Wait this long for its exit, then SIGKILL.
        grace: Duration,
        /// Then wait this long.
        kill_wait: Duration,
    },
    /// [`Supervisor::begin_shutdown`].
    BeginShutdown,
    /// [`Supervisor::shutdown`]; answered with [`ToWorker::StoppedAll`].
    StopAll {
        /// Already asked over RPC: no SIGTERM.
        stopping: Vec<String>,
        /// Wait this long, then SIGKILL.
        grace: Duration,
        /// Then wait this long.
        kill_wait: Duration,
    },
}

/// One end of the link: frames written under a lock (several threads
/// send), read by one thread.
#[derive(Debug)]
pub struct Link {
    writer: Mutex<UnixStream>,
}

impl Link {
    fn new(stream: &UnixStream) -> io::Result<Arc<Link>> {
        Ok(Arc::new(Link { writer: Mutex::new(stream.try_clone()?) }))
    }

    /// Sends one message; an error means the other side is gone.
    pub fn send<T: Serialize>(&self, msg: &T) -> io::Result<()> {
        let body = postcard::to_allocvec(msg).map_err(io::Error::other)?;
        let len = u32::try_from(body.len()).ok().filter(|l| *l <= MAX_FRAME).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("privsep message of {} bytes", body.len()))
        })?;
        let mut w = self.writer.lock();
        w.write_all(&len.to_le_bytes())?;
        w.write_all(&body)
    }
}

/// Reads one message; `Ok(None)` at a clean end of stream.
fn read_frame<T: DeserializeOwned>(r: &mut impl Read) -> io::Result<Option<T>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(len);
    if len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a privsep frame of {len} bytes (at most {MAX_FRAME})"),
        ));
    }
    let mut body = vec![0u8; len as usize];
    r.read_exact(&mut body)?;
    postcard::from_bytes(&body)
        .map(Some)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("undecodable privsep frame: {e}")))
}

/// Starts the thread that reads `stream` into a channel; the channel
/// disconnects at the end of the stream or on a bad frame (logged).
fn reader<T: DeserializeOwned + Send + 'static>(
    name: &str,
    mut stream: UnixStream,
) -> io::Result<(Receiver<T>, std::thread::JoinHandle<()>)> {
    let (tx, rx) = bounded(256);
    let who = name.to_owned();
    let thread = std::thread::Builder::new().name(name.to_owned()).spawn(move || {
        loop {
            match read_frame::<T>(&mut stream) {
                Ok(Some(m)) => {
                    // Blocks when the consumer lags: the other side then
                    // waits on the socket, nothing is dropped.
                    if tx.send(m).is_err() {
                        return;
                    }
                }
                Ok(None) => return,
                Err(e) => {
                    log::error!("{who}: {e}; closing the link");
                    return;
                }
            }
        }
    })?;
    Ok((rx, thread))
}

/// The collector vouchers of the privileged part: each vouch goes to the
/// worker's broker with the process's start time.
struct LinkVoucher(Arc<Link>);

impl Voucher for LinkVoucher {
    fn vouch(&self, id: &str, pid: u32) {
        let start_time = daemoneye_platform::process_start_time(pid);
        let msg = ToWorker::Vouch { id: id.to_owned(), pid, start_time };
        if let Err(e) = self.0.send(&msg) {
            log::warn!("cannot vouch for collector {id} (pid {pid}) to the worker: {e}");
        }
    }

    fn revoke(&self, id: &str, pid: u32) {
        let _ = self.0.send(&ToWorker::Revoke { id: id.to_owned(), pid });
    }
}

/// The `run_as` user.
#[derive(Debug, Clone, Copy)]
pub struct Account {
    /// Its uid.
    pub uid: u32,
    /// Its primary gid.
    pub gid: u32,
}

/// Looks `name` up; refuses root itself (that separates nothing).
pub fn account(name: &str) -> anyhow::Result<Account> {
    let user = nix::unistd::User::from_name(name)
        .with_context(|| format!("run_as: cannot look up user {name:?}"))?
        .with_context(|| format!("run_as: no user {name:?}"))?;
    anyhow::ensure!(!user.uid.is_root(), "run_as: {name:?} is root (uid 0): name an unprivileged user");
    Ok(Account { uid: user.uid.as_raw(), gid: user.gid.as_raw() })
}

/// The worker's directory, `<data_dir>/agent`: created 0700 and owned
/// by `account`. It sits in root's data dir, so only root can replace the
/// entry; a symlink or a file there is refused.
fn prepare_worker_dir(dir: &Path, account: Account) -> anyhow::Result<()> {
    match std::fs::symlink_metadata(dir) {
        Ok(m) if m.file_type().is_dir() => {}
        Ok(_) => anyhow::bail!("{} is not a directory (a symlink or a file): remove it", dir.display()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            create_private_dir(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        }
        Err(e) => return Err(e).with_context(|| format!("cannot inspect {}", dir.display())),
    }
    nix::unistd::chown(
        dir,
        Some(nix::unistd::Uid::from_raw(account.uid)),
        Some(nix::unistd::Gid::from_raw(account.gid)),
    )
    .with_context(|| format!("cannot give {} to uid {}", dir.display(), account.uid))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot set the mode of {}", dir.display()))?;
    Ok(())
}

/// Runs the privileged part: prepares the data dir, starts the worker as
/// `account`, serves its requests with a [`Supervisor`] until it exits,
/// and returns the exit status (the worker's; 1 when it crashed).
pub fn run_privileged(
    cfg: AgentConfig,
    hello: Hello,
    account: Account,
    shutdown: Receiver<()>,
    pids: Arc<Mutex<Vec<u32>>>,
) -> anyhow::Result<i32> {
    let data_dir = cfg.data_dir();
    // Root's and writable by nobody else (else refused); 0711: the worker
    // goes through it to its own directory, nobody lists it.
    ensure_owned_dir(&data_dir, 0o711).with_context(|| format!("data dir {}", data_dir.display()))?;
    let _lock = PidLock::acquire(&data_dir.join("daemoneye-agent.pid")).map_err(|e| match e {
        PidLockError::Held { .. } => {
            anyhow::anyhow!("another daemoneye-agent is running with data dir {}: {e}", data_dir.display())
        }
        e => anyhow::anyhow!("cannot take the agent's lock: {e}"),
    })?;
    prepare_worker_dir(&cfg.agent_dir(), account)?;

    let (mine, theirs) = UnixStream::pair().context("cannot create the privsep socket pair")?;
    let exe = std::env::current_exe().context("cannot find this executable to start the worker")?;
    let mut worker = Command::new(&exe)
        .arg(WORKER_FLAG)
        .uid(account.uid)
        .gid(account.gid)
        // A terminal's Ctrl-C reaches this process, which forwards it.
        .process_group(0)
        .current_dir("/")
        .stdin(Stdio::from(OwnedFd::from(theirs)))
        .spawn()
        .with_context(|| format!("cannot start the worker {}", exe.display()))?;
    log::info!(
        "privilege separation: the agent's work runs as uid {} gid {} in pid {}; this process (pid {}) keeps \
         root to start, signal and reap the collectors",
        account.uid,
        account.gid,
        worker.id(),
        std::process::id()
    );
    let link = Link::new(&mine)?;
    let served = serve(&cfg, &hello, account, &link, mine, &shutdown, &pids);
    if let Err(e) = &served {
        log::error!("privileged part: {e:#}; stopping the worker");
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(worker.id()).unwrap_or(i32::MAX)),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let status = worker.wait().context("cannot wait for the worker")?;
    served?;
    match status.code() {
        Some(0) => Ok(0),
        Some(c) => {
            log::error!("the worker (pid {}) exited with status {c}", worker.id());
            Ok(c)
        }
        None => {
            log::error!("the worker (pid {}) ended: {status}", worker.id());
            Ok(1)
        }
    }
}

/// Serves the worker until its end of the link closes; the collectors
/// still running then are killed and reaped (dropping the supervisor).
fn serve(
    cfg: &AgentConfig,
    hello: &Hello,
    account: Account,
    link: &Arc<Link>,
    stream: UnixStream,
    shutdown: &Receiver<()>,
    pids: &Arc<Mutex<Vec<u32>>>,
) -> anyhow::Result<()> {
    link.send(&ToWorker::Hello(hello.clone())).context("cannot configure the worker")?;
    let (requests, read_thread) = reader::<ToPrivileged>("agent-privsep-read", stream)?;
    let (ev_tx, ev_rx) = bounded::<SupervisorEvent>(256);
    let forward = {
        let link = link.clone();
        std::thread::Builder::new().name("agent-privsep-events".into()).spawn(move || {
            // Ends when the supervisor (every sender) is gone.
            for ev in ev_rx {
                if link.send(&ToWorker::Event(ev)).is_err() {
                    return;
                }
            }
        })?
    };
    let mut supervisor: Option<Arc<Supervisor>> = None;
    let mut stopping = None;
    let mut signalled = false;
    let mut dead = None;
    let watchdog = crossbeam_channel::tick(Duration::from_secs(1));
    // Disconnected when the signal thread ended (its sender is gone).
    let mut shutdown = shutdown.clone();
    loop {
        let mut ended = None;
        select! {
            recv(watchdog) -> _ => {
                if supervisor.as_ref().is_some_and(|s| s.thread_ended()) {
                    ended = Some("agent-supervisor");
                }
            }
            recv(shutdown) -> r => {
                if r.is_err() {
                    shutdown = crossbeam_channel::never();
                    ended = Some("agent-signals");
                } else if !signalled {
                    signalled = true;
                    log::info!("signal: asking the worker to shut down");
                    let _ = link.send(&ToWorker::Shutdown);
                }
            }
            recv(requests) -> req => match req {
                Ok(ToPrivileged::Start) if supervisor.is_none() => {
                    let voucher = Box::new(LinkVoucher(link.clone()));
                    let sup = Supervisor::start(cfg, ev_tx.clone(), pids.clone(), voucher, account.uid)?;
                    supervisor = Some(Arc::new(sup));
                }
                Ok(ToPrivileged::Start) => log::warn!("privsep: a second Start ignored"),
                Ok(ToPrivileged::Stop { id, pid, grace, kill_wait }) => {
                    if let Some(s) = &supervisor {
                        s.stop(&id, pid, grace, kill_wait);
                    }
                }
                Ok(ToPrivileged::BeginShutdown) => {
                    if let Some(s) = &supervisor {
                        s.begin_shutdown();
                    }
                }
                Ok(ToPrivileged::StopAll { stopping: asked, grace, kill_wait }) => {
                    let (sup, link) = (supervisor.clone(), link.clone());
                    // It waits up to grace + kill_wait: not on this thread,
                    // which keeps forwarding signals.
                    stopping = Some(std::thread::Builder::new().name("agent-privsep-stop".into()).spawn(move || {
                        if let Some(s) = sup {
                            s.shutdown(asked, grace, kill_wait);
                        }
                        let _ = link.send(&ToWorker::StoppedAll);
                    })?);
                }
                // The worker's end closed: it exited (or is exiting).
                Err(_) => break,
            }
        }
        if let Some(thread) = ended.filter(|_| dead.is_none()) {
            log::error!("{}: stopping the agent", ended_unexpectedly(thread));
            dead = Some(thread);
            let _ = link.send(&ToWorker::Shutdown);
        }
    }
    if let Some(t) = stopping {
        let _ = t.join();
    }
    // Kills and reaps what still runs; then the event channel closes.
    drop(supervisor);
    drop(ev_tx);
    let _ = forward.join();
    let _ = read_thread.join();
    match dead {
        Some(thread) => anyhow::bail!("{}", ended_unexpectedly(thread)),
        None => Ok(()),
    }
}

/// The worker's side of the link.
pub struct WorkerLink {
    /// Sends to the privileged part.
    pub link: Arc<Link>,
    /// What it sends (but [`ToWorker::Shutdown`], which goes to the
    /// worker's shutdown channel).
    pub incoming: Receiver<ToWorker>,
}

/// In the worker, before any other thread: reads the configuration from
/// the privileged part on stdin, then starts the thread that reads the
/// rest. `Shutdown`, and the end of the link (the privileged part is
/// gone), are sent to `stop`.
pub fn worker_start(stop: Sender<()>) -> anyhow::Result<(Hello, WorkerLink)> {
    let fd = {
        use std::os::fd::AsFd;
        io::stdin().as_fd().try_clone_to_owned().context("cannot take stdin")?
    };
    let mut stream = UnixStream::from(fd);
    anyhow::ensure!(
        !nix::unistd::geteuid().is_root(),
        "{WORKER_FLAG} runs without root (the privileged part starts it as run_as)"
    );
    let hello = match read_frame::<ToWorker>(&mut stream).context("cannot read the configuration")? {
        Some(ToWorker::Hello(h)) => h,
        Some(other) => anyhow::bail!("the privileged part sent {other:?} before its configuration"),
        None => {
            anyhow::bail!("stdin closed before the configuration (is this the privileged part's worker?)")
        }
    };
    let link = Link::new(&stream)?;
    let (raw, _thread) = reader::<ToWorker>("agent-privsep-read", stream)?;
    let (tx, incoming) = bounded(256);
    std::thread::Builder::new().name("agent-privsep-route".into()).spawn(move || {
        for m in raw.iter() {
            match m {
                ToWorker::Shutdown => {
                    let _ = stop.try_send(());
                }
                m => {
                    if tx.send(m).is_err() {
                        break;
                    }
                }
            }
        }
        log::warn!("the privileged part closed the link: shutting down");
        let _ = stop.try_send(());
    })?;
    Ok((hello, WorkerLink { link, incoming }))
}

/// The worker's stand-in for the supervisor thread: forwards the
/// supervisor's requests to the privileged part and its answers back.
pub(crate) fn remote(
    link: WorkerLink,
    requests: Receiver<crate::supervisor::Request>,
    events: Sender<SupervisorEvent>,
    vouchers: Vouchers,
) -> io::Result<std::thread::JoinHandle<()>> {
    use crate::supervisor::Request;
    std::thread::Builder::new().name("agent-privsep".into()).spawn(move || {
        let WorkerLink { link, mut incoming } = link;
        if let Err(e) = link.send(&ToPrivileged::Start) {
            log::error!("cannot ask the privileged part to start the collectors: {e}");
        }
        let mut done: Option<Sender<()>> = None;
        let mut gone = false;
        loop {
            select! {
                recv(requests) -> r => {
                    let msg = match r {
                        Ok(Request::Stop { id, pid, grace, kill_wait }) => ToPrivileged::Stop { id, pid, grace, kill_wait },
                        Ok(Request::BeginShutdown) => ToPrivileged::BeginShutdown,
                        Ok(Request::StopAll { stopping, grace, kill_wait, done: d }) => {
                            if gone {
                                // Nobody is left to stop anything.
                                let _ = d.send(());
                                continue;
                            }
                            done = Some(d);
                            ToPrivileged::StopAll { stopping, grace, kill_wait }
                        }
                        // The supervisor handle is dropped: the privileged
                        // part cleans up when this process exits.
                        Err(_) => return,
                    };
                    if !gone && let Err(e) = link.send(&msg) {
                        log::error!("privileged part unreachable: {e}");
                    }
                }
                recv(incoming) -> m => match m {
                    Ok(ToWorker::Event(e)) => {
                        // Bounded, as the local supervisor's; the monitor
                        // drains it.
                        let _ = events.send(e);
                    }
                    Ok(ToWorker::Vouch { id, pid, start_time }) => vouchers.vouch_as(&id, pid, start_time),
                    Ok(ToWorker::Revoke { id, pid }) => vouchers.revoke(&id, pid),
                    Ok(ToWorker::StoppedAll) => {
                        if let Some(d) = done.take() {
                            let _ = d.send(());
                        }
                    }
                    Ok(m @ (ToWorker::Hello(_) | ToWorker::Shutdown)) => {
                        log::warn!("privsep: unexpected {m:?} ignored");
                    }
                    Err(_) => {
                        // The privileged part is gone (the router asked
                        // for shutdown): nothing more comes from it.
                        gone = true;
                        incoming = crossbeam_channel::never();
                        if let Some(d) = done.take() {
                            let _ = d.send(());
                        }
                    }
                },
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_bad_ones_are_errors_not_panics() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let link = Link::new(&a).unwrap();
        link.send(&ToPrivileged::Stop {
            id: "c".into(),
            pid: 7,
            grace: Duration::from_secs(1),
            kill_wait: Duration::ZERO,
        })
        .unwrap();
        match read_frame::<ToPrivileged>(&mut b).unwrap() {
            Some(ToPrivileged::Stop { id, pid: 7, .. }) => assert_eq!(id, "c"),
            other => panic!("{other:?}"),
        }
        // A hostile length prefix: refused before anything is allocated.
        let mut hostile: &[u8] = &[0xff, 0xff, 0xff, 0xff];
        let e = read_frame::<ToWorker>(&mut hostile).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("4294967295 bytes"), "{e}");
        // A body that is not a message.
        let mut garbage: &[u8] = &[3, 0, 0, 0, 0xee, 0xee, 0xee];
        assert_eq!(read_frame::<ToWorker>(&mut garbage).unwrap_err().kind(), io::ErrorKind::InvalidData);
        // A torn frame is an error; a clean end is `None`.
        let mut torn: &[u8] = &[9, 0, 0, 0, 1];
        assert!(read_frame::<ToWorker>(&mut torn).is_err());
        let mut empty: &[u8] = &[];
        assert!(read_frame::<ToWorker>(&mut empty).unwrap().is_none());
    }

    #[test]
    fn the_worker_dir_refuses_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("elsewhere");
        std::fs::create_dir(&target).unwrap();
        let link = dir.path().join("agent");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let me = Account { uid: nix::unistd::getuid().as_raw(), gid: nix::unistd::getgid().as_raw() };
        let e = prepare_worker_dir(&link, me).unwrap_err();
        assert!(e.to_string().contains("not a directory"), "{e}");
        // A real directory is taken over with mode 0700.
        let real = dir.path().join("real");
        std::fs::create_dir(&real).unwrap();
        std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o777)).unwrap();
        prepare_worker_dir(&real, me).unwrap();
        assert_eq!(std::fs::metadata(&real).unwrap().permissions().mode() & 0o777, 0o700);
    }
}
