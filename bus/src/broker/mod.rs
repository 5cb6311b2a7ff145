//! The broker: one named thread (`bus-broker`) running a mio reactor over
//! a Unix listening socket. Routing happens inline on that thread.
//!
//! Connections live in a slab keyed by token (`LISTENER` and `WAKER` are
//! fixed). Each connection owns a read buffer and a write buffer with the
//! end offset of every queued frame, so the queue is counted in messages
//! and bytes and `DropOldest` can drop whole frames that have not started
//! to go out. Frames for a connection are appended to its write buffer
//! during an iteration and flushed once at its end (one `write` for many
//! messages). Readiness is drained until `WouldBlock`; write interest is
//! registered only while a write buffer is non-empty.
//!
//! Identities (protocol 5): with [`BrokerConfig::identities`] set, the
//! broker knows each connection's pid and uid from the kernel and welcomes
//! an id reserved for its host (`own`) only from the host's own process,
//! and an id reserved for a collector (`vouched`) only from the process
//! its supervisor vouched for ([`Vouchers::vouch`]: pid and start time, so
//! a reused pid proves nothing). Any other id asked for is replaced by one
//! the broker assigns, `bus-<n>-<asked>`, which `WelcomeAs` tells the
//! client. Proven connections (the host's and vouched processes) are
//! outside the connection caps and get the full `max_frame`; the others
//! are capped in total, per uid and per pid (with room kept for a process
//! that holds no connection yet: a CLI), get `unproven_max_frame`, are
//! closed when idle, and are not read while the broker's memory is over
//! its limit. Without `identities` (a broker with no host that can vouch,
//! as in the bus's own tests) ids are first come, first served and these
//! caps are off unless set: the behaviour of protocol 4. On an OS whose
//! peer credentials carry no pid (FreeBSD with nix 0.31), nothing can be
//! proven: `start` turns identities off and logs an error.
//!
//! Layout: this module holds [`Broker`] (start, stop) and the reactor's
//! loop; `config` the settings, identities and permissions; `session`
//! accepting a client and dispatching its frames; `routing` subscriptions,
//! queue groups, delivery and request tracking; `conn` each connection's
//! buffers, flow control and closing; `stats` the counters.

mod config;
mod conn;
mod routing;
mod session;
mod stats;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::net::{UnixListener, UnixStream};
use mio::{Events, Interest, Poll, Token, Waker};
use parking_lot::Mutex;
use slab::Slab;

use crate::frame::{
    self, ErrorCode, Frame, FrameError, Mode, NoReplyReason, Overflow, PROTOCOL_VERSION, Strategy,
};
use crate::topic::{self, TopicTrie};

use self::config::*;
pub use self::config::{BrokerConfig, ClientPermissions, Identities, Permissions, Vouchers};
use self::conn::*;
use self::routing::*;
pub use self::stats::{BROKER_SENDER, BrokerStats, QueueDepth, STATS_TOPIC};

const LISTENER: Token = Token(0);

const WAKER: Token = Token(1);

const FIRST_CONN: usize = 2;

/// Time a new connection has to send its `Hello`.
const HELLO_DEADLINE: Duration = Duration::from_secs(5);

/// Subscriptions one connection may hold.
const MAX_SUBSCRIPTIONS: usize = 1024;

/// Unanswered requests remembered per connection; beyond this a
/// connection counts as saturated for `LeastLoaded` and its requesters
/// learn of its departure by their timeouts only.
const MAX_AWAITING: usize = 4096;

/// Read rounds (of up to a maximal frame plus a chunk each) one connection
/// gets per poll iteration.
const READ_ROUNDS: usize = 4;

/// Bytes read per `read` call.
const READ_CHUNK: usize = 64 * 1024;

/// Why the broker could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerError {
    /// Another broker answers on the socket path.
    #[error("a live broker is already listening on {}", path.display())]
    InUse {
        /// The socket path.
        path: PathBuf,
    },
    /// A setting is unusable (a malformed permission pattern).
    #[error("invalid broker configuration: {0}")]
    Config(String),
    /// An OS call failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The path concerned.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// A running broker. Dropping it shuts the broker down and joins its
/// thread.
pub struct Broker {
    socket: PathBuf,
    vouchers: Vouchers,
    stats: Arc<Mutex<BrokerStats>>,
    stop: Arc<AtomicBool>,
    open: Arc<AtomicBool>,
    waker: Arc<Waker>,
    thread: Option<JoinHandle<()>>,
}

impl Broker {
    /// Binds the socket and starts the reactor thread. A stale socket file
    /// left by a dead broker is replaced; a live broker is never displaced.
    pub fn start(mut cfg: BrokerConfig) -> Result<Broker, BrokerError> {
        if cfg.identities.is_some() && !daemoneye_platform::PEER_PID_AVAILABLE {
            // Nothing could be proven: every reserved id would be refused,
            // the host's own included. Said loudly, not silently.
            log::error!(
                "bus: this OS does not report a peer's pid, so client ids cannot be proven: identities are \
                 off (ids are first come, first served)"
            );
            cfg.identities = None;
        }
        for p in cfg.permissions.iter().map(|c| &c.permissions).chain(cfg.default_permissions.as_ref()) {
            p.check().map_err(BrokerError::Config)?;
        }
        // Resuming happens below half a limit, so a limit must leave room.
        if cfg.queue_limit_msgs < 2 || cfg.queue_limit_bytes < 2 {
            return Err(BrokerError::Config(format!(
                "queue limits of {} messages and {} bytes are too small (at least 2 messages and 2 bytes)",
                cfg.queue_limit_msgs, cfg.queue_limit_bytes
            )));
        }
        if cfg.max_connections == 0 {
            return Err(BrokerError::Config("max_connections must be at least 1".into()));
        }
        let path = cfg.socket.clone();
        let io_err = |op: &'static str, p: &Path| {
            let p = p.to_path_buf();
            move |source| BrokerError::Io { op, path: p, source }
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
            && !dir.exists()
        {
            std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
                .create(dir)
                .map_err(io_err("create directory", dir))?;
        }
        if path.exists() {
            if std::os::unix::net::UnixStream::connect(&path).is_ok() {
                return Err(BrokerError::InUse { path });
            }
            log::warn!("bus: replacing stale socket {}", path.display());
            std::fs::remove_file(&path).map_err(io_err("remove stale socket", &path))?;
        }
        let mut listener = UnixListener::bind(&path).map_err(io_err("bind", &path))?;
        set_mode(&path, 0o600).map_err(io_err("chmod", &path))?;
        let poll = Poll::new().map_err(io_err("create poll", &path))?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)
            .map_err(io_err("register", &path))?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER).map_err(io_err("create waker", &path))?);
        let stats = Arc::new(Mutex::new(BrokerStats::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let open = Arc::new(AtomicBool::new(cfg.first_clients.is_none()));
        let vouchers = Vouchers::default();
        let mut reactor = Reactor {
            poll,
            listener,
            accepting: true,
            conns: Slab::new(),
            trie: TopicTrie::new(),
            groups: Slab::new(),
            group_index: HashMap::new(),
            own_uid: daemoneye_platform::effective_uid(),
            stats: stats.clone(),
            counters: BrokerStats::default(),
            queues_at: Instant::now(),
            stop: stop.clone(),
            open: open.clone(),
            dirty: Vec::new(),
            resume: Vec::new(),
            targets: Vec::new(),
            holders: HashMap::new(),
            rng: 0x2545_f491_4f6c_dd1d ^ u64::from(std::process::id()),
            vouchers: vouchers.clone(),
            assigned: 0,
            mem_used: 0,
            starved: Vec::new(),
            cfg,
        };
        let thread = std::thread::Builder::new()
            .name("bus-broker".into())
            .spawn(move || reactor.run())
            .map_err(io_err("spawn broker thread", &path))?;
        Ok(Broker { socket: path, vouchers, stats, stop, open, waker, thread: Some(thread) })
    }

    /// Welcomes every client from now on (see
    /// [`BrokerConfig::first_clients`]).
    pub fn open(&self) {
        self.open.store(true, Ordering::Release);
    }

    /// Whether the reactor thread has ended (it panicked, or it was
    /// stopped): the host's watchdog asks.
    pub fn thread_ended(&self) -> bool {
        self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// The table through which the host vouches for the processes it
    /// starts (see [`Identities::vouched`]).
    pub fn vouchers(&self) -> Vouchers {
        self.vouchers.clone()
    }

    /// A copy of the counters (queue depths as of the last 100 ms).
    pub fn stats(&self) -> BrokerStats {
        self.stats.lock().clone()
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Flushes what it can, closes every connection, removes the socket
    /// file and joins the thread.
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Err(e) = self.waker.wake() {
            log::error!("bus: cannot wake the broker to stop it: {e}");
        }
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            log::error!("bus: broker thread panicked");
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// The level of the `n`th refusal of a kind: a warning for the 1st, 2nd,
/// 4th, 8th…, debug for the others, so a hostile flood cannot flood the
/// log (the counters keep the total).
fn throttled(n: u64) -> log::Level {
    if n.is_power_of_two() { log::Level::Warn } else { log::Level::Debug }
}

/// Best effort: tells a refused peer why, then drops the stream.
fn refuse(stream: &mut UnixStream, code: ErrorCode, message: &str) {
    let mut buf = Vec::new();
    let _ = frame::encode(&Frame::Error { code, message, ack_id: None }, &mut buf, 4096);
    let _ = stream.write(&buf);
}

fn set_mode(path: &Path, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

struct Reactor {
    poll: Poll,
    listener: UnixListener,
    accepting: bool,
    conns: Slab<Conn>,
    trie: TopicTrie<Target>,
    groups: Slab<Group>,
    group_index: HashMap<(String, String), usize>,
    own_uid: u32,
    stats: Arc<Mutex<BrokerStats>>,
    /// Counters kept on the reactor thread and copied into `stats` once
    /// per poll iteration (before flushing, so a peer that sees an effect
    /// can already read its count).
    counters: BrokerStats,
    /// When the queue depths were last snapshotted.
    queues_at: Instant,
    stop: Arc<AtomicBool>,
    /// Every client is welcomed (see `BrokerConfig::first_clients`).
    open: Arc<AtomicBool>,
    /// Connections with unread data left by the fairness bound.
    resume: Vec<usize>,
    /// Connections with something to flush this iteration.
    dirty: Vec<usize>,
    /// Scratch list of routing targets, reused.
    targets: Vec<Target>,
    /// How many connections hold each awaited inbox (the sum of the
    /// connections' `awaiting` sets), so a departure can tell whether
    /// anyone else may still answer.
    holders: HashMap<Box<str>, u32>,
    rng: u64,
    vouchers: Vouchers,
    /// Ids assigned so far (the `<n>` of `bus-<n>-<asked>`).
    assigned: u64,
    /// Bytes held in every connection's buffers, recomputed once per
    /// iteration and raised by each read in between.
    mem_used: usize,
    /// Connections not read while memory was over its limit.
    starved: Vec<usize>,
    cfg: BrokerConfig,
}

impl Reactor {
    fn run(&mut self) {
        let mut events = Events::with_capacity(1024);
        log::info!("bus: broker listening on {}", self.cfg.socket.display());
        while !self.stop.load(Ordering::Acquire) {
            let timeout = if self.resume.is_empty() {
                self.cfg.slow_consumer_deadline.min(Duration::from_secs(1))
            } else {
                Duration::ZERO
            };
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                log::error!("bus: poll failed, broker stops: {e}");
                break;
            }
            for ev in events.iter() {
                match ev.token() {
                    LISTENER => self.accept(),
                    WAKER => {}
                    Token(t) => {
                        let idx = t - FIRST_CONN;
                        if ev.is_writable() {
                            self.dirty.push(idx);
                        }
                        if ev.is_readable() || ev.is_read_closed() {
                            self.read(idx);
                        }
                    }
                }
            }
            for idx in std::mem::take(&mut self.resume) {
                self.read(idx);
            }
            self.publish_stats(false);
            self.flush_dirty();
            self.check_slow_consumers();
            self.check_memory();
        }
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let idxs: Vec<usize> = self.conns.iter().map(|(i, _)| i).collect();
        for &i in &idxs {
            self.fatal(i, ErrorCode::ShuttingDown, "broker shutting down");
        }
        // One best-effort flush: the peers may be gone or not reading.
        for &i in &idxs {
            if let Some(c) = self.conns.get_mut(i) {
                let _ = c.stream.write(&c.wbuf[c.wpos..]);
            }
        }
        self.conns.clear();
        self.publish_stats(true);
        let _ = std::fs::remove_file(&self.cfg.socket);
        log::info!("bus: broker stopped");
    }
}
