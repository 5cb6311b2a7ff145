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

/// Broker settings.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// Path of the listening socket. Its directory is created with mode
    /// 0700 if missing; the socket gets mode 0600.
    pub socket: PathBuf,
    /// Largest frame body accepted (default 1 MiB).
    pub max_frame: u32,
    /// Connections accepted at once; accepting resumes below 90%.
    pub max_connections: usize,
    /// Peer uids allowed besides the broker's own and root.
    pub allowed_uids: Vec<u32>,
    /// A subscriber's outbound queue limit, in bytes.
    pub queue_limit_bytes: usize,
    /// A subscriber's outbound queue limit, in messages.
    pub queue_limit_msgs: usize,
    /// A subscriber over its queue limit for longer than this is
    /// disconnected.
    pub slow_consumer_deadline: Duration,
    /// Topic permissions by client: the first entry whose `client` matches
    /// applies. Clients no entry matches get `default_permissions`, and
    /// with `None` there they are unrestricted (apart from the inbox
    /// rules, which always hold).
    pub permissions: Vec<ClientPermissions>,
    /// Permissions of clients no entry of `permissions` matches.
    pub default_permissions: Option<Permissions>,
    /// When set, only these client ids are welcomed until
    /// [`Broker::open`] is called; the others are refused with
    /// `ErrorCode::Limit`, which clients retry. A host uses it to have its
    /// own subscriptions in place before anyone can publish (a message
    /// published before its subscriber exists is gone).
    pub first_clients: Option<Vec<String>>,
    /// Who may hold which client id; `None`: any id, first come, first
    /// served (no host that can vouch for processes).
    pub identities: Option<Identities>,
    /// Subscribers (exact ids or `prefix*`) whose `Overflow::Block` is
    /// honoured; anyone else asking for `Block` gets `DropOldest` (and the
    /// slow-consumer deadline), so no such subscriber ever pauses a
    /// publisher. `None`: everyone may block.
    pub block_allowed: Option<Vec<String>>,
    /// Connections one uid may hold, besides proven ones.
    pub max_connections_per_uid: usize,
    /// Connections one process may hold, besides proven ones (where the OS
    /// reports the peer's pid).
    pub max_connections_per_pid: usize,
    /// A welcomed connection that is not proven and has neither
    /// subscribed nor published for this long is closed; `None`: never.
    pub idle_timeout: Option<Duration>,
    /// A frame begun and not completed for this long (the broker waiting
    /// for its bytes) closes its connection: a half-sent frame must not
    /// pin its buffer forever.
    pub frame_timeout: Duration,
    /// The largest frame body accepted from a connection that is not
    /// proven (only with `identities`).
    pub unproven_max_frame: u32,
    /// The bytes buffered by the broker for every connection together
    /// (read and write buffers); above it, connections that are not proven
    /// are not read and deliveries that could be dropped are. `None`: no
    /// limit besides the per-connection ones.
    pub memory_limit_bytes: Option<usize>,
}

/// Which client ids the broker welcomes only from processes it can prove
/// (see the module docs). Ids match exactly or by prefix when they end in
/// `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identities {
    /// The host's pid (the agent: its own `std::process::id()`): ids in
    /// `own` are accepted only from this process.
    pub host_pid: u32,
    /// Ids only the host process may hold (the agent's clients).
    pub own: Vec<String>,
    /// Ids only the process vouched for them may hold (configured
    /// collectors, enabled or not: an id nobody is vouched for is
    /// refused).
    pub vouched: Vec<String>,
}

/// The processes vouched for collector ids: shared between the broker and
/// its host's supervisor, which vouches for each process it starts or
/// adopts and revokes at its exit.
#[derive(Debug, Clone, Default)]
pub struct Vouchers {
    table: Arc<Mutex<HashMap<String, Vouch>>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Vouch {
    pid: u32,
    start_time: Option<u64>,
}

impl Vouchers {
    /// From now on `client_id` is accepted from the process `pid` (as it
    /// is now: its start time is read here, so a process that later reuses
    /// the pid is not accepted), and from no other.
    pub fn vouch(&self, client_id: &str, pid: u32) {
        self.vouch_as(client_id, pid, daemoneye_platform::process_start_time(pid));
    }

    /// As [`Vouchers::vouch`], with the start time read by whoever started
    /// the process (a privileged supervisor in another process).
    pub fn vouch_as(&self, client_id: &str, pid: u32, start_time: Option<u64>) {
        if start_time.is_none() {
            log::warn!("bus: cannot read the start time of pid {pid} (vouched for {client_id})");
        }
        self.table.lock().insert(client_id.to_owned(), Vouch { pid, start_time });
    }

    /// `client_id` is no longer vouched for, if it was for `pid`.
    pub fn revoke(&self, client_id: &str, pid: u32) {
        let mut t = self.table.lock();
        if t.get(client_id).is_some_and(|v| v.pid == pid) {
            t.remove(client_id);
        }
    }

    /// Whether `pid` is, right now, the process vouched for `client_id`.
    fn proves(&self, client_id: &str, pid: u32) -> bool {
        let Some(v) = self.table.lock().get(client_id).copied() else { return false };
        v.pid == pid && v.start_time.is_some() && daemoneye_platform::process_start_time(pid) == v.start_time
    }

    /// Whether `pid` is vouched for some id (it is then outside the caps).
    fn vouched_pid(&self, pid: u32) -> bool {
        let found = self.table.lock().iter().find(|(_, v)| v.pid == pid).map(|(id, _)| id.clone());
        found.is_some_and(|id| self.proves(&id, pid))
    }
}

/// Whether `id` is `pattern` or starts with its prefix (`prefix*`).
fn id_matches(pattern: &str, id: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => id.starts_with(prefix),
        None => pattern == id,
    }
}

/// Connections proven processes may hold beyond `max_connections`.
const PROVEN_ROOM: usize = 64;
/// With identities, room kept in every cap for a process that holds no
/// connection yet (a CLI): a process cannot take the last few itself.
const FRESH_ROOM: usize = 4;
/// The longest asked-for id kept in an assigned one.
const MAX_ASKED_ID: usize = 64;

/// What a client may publish and subscribe to: topic patterns, in which
/// `{client_id}` stands for the client's own id (so one entry can give
/// every collector its own heartbeat topic and nobody else's).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Permissions {
    /// A publish is allowed when one of these patterns matches its topic.
    /// Replies to inboxes (`direct.…`) are always allowed.
    pub publish: Vec<String>,
    /// A subscription is allowed when one of these patterns covers it
    /// (matches every topic it could match).
    pub subscribe: Vec<String>,
}

/// Permissions for the clients whose id is `client`, or starts with it when
/// it ends in `*` (`procmond-*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientPermissions {
    /// An exact client id, or a prefix followed by `*`.
    pub client: String,
    /// What those clients may do.
    pub permissions: Permissions,
}

impl ClientPermissions {
    fn applies_to(&self, client_id: &str) -> bool {
        id_matches(&self.client, client_id)
    }
}

impl Permissions {
    /// The patterns with `{client_id}` replaced.
    fn resolve(&self, client_id: &str) -> Permissions {
        let sub = |v: &Vec<String>| v.iter().map(|p| p.replace("{client_id}", client_id)).collect();
        Permissions { publish: sub(&self.publish), subscribe: sub(&self.subscribe) }
    }

    fn check(&self) -> Result<(), String> {
        for p in self.resolve("x").publish.iter().chain(self.resolve("x").subscribe.iter()) {
            topic::validate_pattern(p).map_err(|e| format!("permission pattern {p:?}: {e}"))?;
        }
        Ok(())
    }
}

impl BrokerConfig {
    /// Defaults for a socket path.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        BrokerConfig {
            socket: socket.into(),
            max_frame: frame::DEFAULT_MAX_FRAME,
            max_connections: 256,
            allowed_uids: Vec::new(),
            queue_limit_bytes: 8 << 20,
            queue_limit_msgs: 65_536,
            slow_consumer_deadline: Duration::from_secs(10),
            permissions: Vec::new(),
            default_permissions: None,
            first_clients: None,
            identities: None,
            block_allowed: None,
            max_connections_per_uid: usize::MAX,
            max_connections_per_pid: usize::MAX,
            idle_timeout: None,
            frame_timeout: Duration::from_secs(10),
            unproven_max_frame: frame::DEFAULT_MAX_FRAME,
            memory_limit_bytes: None,
        }
    }
}

/// The topic on which the broker answers stats requests itself: publish
/// to it with a `reply_to` and the reply's payload is a postcard-encoded
/// [`BrokerStats`].
pub const STATS_TOPIC: &str = "bus.stats";

/// The sender named in the broker's own answers (stats). No client can
/// take this id: it is refused in `Hello`.
pub const BROKER_SENDER: &str = "bus";

/// The outbound queue of one connection.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueDepth {
    /// The client's id (empty before its `Hello`).
    pub client_id: String,
    /// Messages queued.
    pub messages: usize,
    /// Bytes queued.
    pub bytes: usize,
    /// Requests delivered to it and not answered yet (what `LeastLoaded`
    /// counts besides `messages`).
    pub awaiting: usize,
}

/// Counters, readable in-process while the broker runs, and over the bus
/// on [`STATS_TOPIC`].
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BrokerStats {
    /// Connections open now.
    pub connections: usize,
    /// Subscriptions now.
    pub subscriptions: usize,
    /// Messages delivered to subscribers.
    pub delivered: u64,
    /// Messages published.
    pub published: u64,
    /// Messages dropped by an overflow strategy.
    pub dropped: u64,
    /// Connections closed for a protocol error (bad frame, oversize
    /// prefix, wrong version, frames before `Hello`).
    pub protocol_errors: u64,
    /// Connections refused (peer uid not allowed, connection limit).
    pub refused: u64,
    /// Publish or subscribe attempts refused by topic rules.
    pub forbidden: u64,
    /// Subscribers disconnected for staying over their queue limit.
    pub slow_disconnects: u64,
    /// Every connection's outbound queue, as of the last poll iteration.
    pub queues: Vec<QueueDepth>,
    /// `Hello`s refused because the id is reserved for a process this one
    /// is not (protocol 5).
    pub unproven: u64,
    /// Connections closed for idling or for a frame left half-sent.
    pub timeouts: u64,
    /// Connections refused by the per-uid, per-pid or total caps.
    pub over_cap: u64,
}

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

/// How a read pass ended.
enum ReadOutcome {
    /// The read buffer reached its cap; more may be waiting.
    Capped,
    /// `WouldBlock`: everything available was read.
    Drained,
    /// The peer closed or the socket failed.
    Closed,
    /// Not read: gone, paused or closing.
    Skipped,
}

/// What the trie points at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    /// A broadcast subscription.
    Sub { conn: usize, sid: u64 },
    /// A queue group (one trie entry per group).
    Group(usize),
}

/// One message being routed.
struct Route<'a> {
    /// The publisher's id, named in the deliveries.
    sender: &'a str,
    topic: &'a str,
    payload: &'a [u8],
    reply_to: Option<&'a str>,
    /// A request's own choice of queue-group strategy.
    strategy: Option<Strategy>,
    /// A request: remember each delivery until it is answered.
    follow: bool,
}

struct Group {
    pattern: String,
    name: String,
    strategy: Strategy,
    members: Vec<(usize, u64)>,
    next: usize,
}

struct SubInfo {
    pattern: String,
    group: Option<usize>,
    overflow: Overflow,
}

enum ConnState {
    AwaitingHello,
    /// `acl`: the client's resolved permissions; `None` is unrestricted.
    Ready {
        /// Shared with the deliveries that name it as their sender.
        client_id: Arc<str>,
        acl: Option<Permissions>,
    },
}

struct Conn {
    stream: UnixStream,
    state: ConnState,
    uid: u32,
    /// The peer's pid from the kernel, where the OS reports it.
    pid: Option<u32>,
    /// The host's process or one vouched for (at accept), or welcomed
    /// with a proven id: outside the caps and the memory limit.
    proven: bool,
    /// The largest frame body accepted from it.
    max_frame: u32,
    /// Its `Overflow::Block` is honoured (`BrokerConfig::block_allowed`).
    may_block: bool,
    /// A configured peer (a `permissions` entry names it): its coming and
    /// going is logged at INFO; others' (a CLI call each) at DEBUG.
    known: bool,
    /// It has subscribed or published since its `Hello` (not idle).
    active: bool,
    /// When it was welcomed.
    welcomed_at: Option<Instant>,
    /// Since when the read buffer holds an incomplete frame (reset by
    /// each frame completed).
    partial_since: Option<Instant>,
    /// Not read because the broker's memory is over its limit.
    starved: bool,
    /// Read buffer; bytes `..rlen` are data, the rest is room.
    rbuf: Vec<u8>,
    rlen: usize,
    wbuf: Vec<u8>,
    /// Bytes of `wbuf` already written.
    wpos: usize,
    /// End offset in `wbuf` of every queued frame, oldest first.
    frame_ends: VecDeque<usize>,
    /// Offset in `wbuf` where the oldest queued frame starts. Invariant:
    /// `head <= wpos`; a frame has started to go out iff its start < wpos.
    head: usize,
    subs: HashMap<u64, SubInfo>,
    writable: bool,
    /// Close once the write buffer is flushed (after a fatal error frame).
    closing: bool,
    /// Reading paused: a subscriber this connection published to is full
    /// and uses `Block`.
    paused: bool,
    /// Publishers paused on this (full) subscriber.
    blocked: Vec<usize>,
    /// Reading paused because this connection's own queue is full.
    self_paused: bool,
    /// Since when this subscriber is over its queue limit.
    over_since: Option<Instant>,
    /// When the connection was accepted (a `Hello` is due promptly).
    accepted_at: Instant,
    /// The `reply_to` of every request delivered here and not answered
    /// yet (at most [`MAX_AWAITING`]).
    awaiting: HashSet<Box<str>>,
}

impl Conn {
    fn pending_bytes(&self) -> usize {
        self.wbuf.len() - self.wpos
    }

    /// Work as `LeastLoaded` sees it: requests delivered and not answered,
    /// plus messages still queued.
    fn load(&self) -> usize {
        self.awaiting.len() + self.frame_ends.len()
    }

    fn queue_frame(&mut self, f: &Frame<'_>, max: u32) -> bool {
        match frame::encode(f, &mut self.wbuf, max) {
            Ok(()) => {
                self.frame_ends.push_back(self.wbuf.len());
                true
            }
            Err(e) => {
                log::warn!("bus: cannot encode a frame: {e}");
                false
            }
        }
    }

    /// Drops the oldest queued frame that has not started to go out.
    /// Drops the oldest frames that have not started to go out until at
    /// most `max_bytes` and `max_msgs` are queued (or nothing unsent is
    /// left), in one pass: one move of the buffer, however many frames go.
    /// Returns how many were dropped.
    fn drop_oldest_to(&mut self, max_bytes: usize, max_msgs: usize) -> u64 {
        // The first frame that has not started: skip a half-sent head.
        let mut first = 0;
        let mut start = self.head;
        while first < self.frame_ends.len() && start < self.wpos {
            start = self.frame_ends[first];
            first += 1;
        }
        let (mut last, mut end) = (first, start);
        while last < self.frame_ends.len()
            && (self.wbuf.len() - self.wpos - (end - start) > max_bytes
                || self.frame_ends.len() - (last - first) > max_msgs)
        {
            end = self.frame_ends[last];
            last += 1;
        }
        if last == first {
            return 0;
        }
        let len = end - start;
        self.wbuf.drain(start..end);
        self.frame_ends.drain(first..last);
        for e in self.frame_ends.iter_mut().skip(first) {
            *e -= len;
        }
        (last - first) as u64
    }
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

    fn accept(&mut self) {
        while self.accepting {
            match self.listener.accept() {
                Ok((mut stream, _)) => {
                    let (uid, pid) = match daemoneye_platform::peer_credentials(&stream) {
                        Ok(c) => (c.uid, c.pid),
                        Err(e) => {
                            log::warn!("bus: cannot read peer credentials, refusing: {e}");
                            self.counters.refused += 1;
                            continue;
                        }
                    };
                    if uid != self.own_uid && uid != 0 && !self.cfg.allowed_uids.contains(&uid) {
                        log::warn!("bus: refused a connection from uid {uid}");
                        self.counters.refused += 1;
                        refuse(&mut stream, ErrorCode::Forbidden, &format!("uid {uid} may not connect"));
                        continue;
                    }
                    let proven = self.cfg.identities.as_ref().is_some_and(|ids| {
                        pid.is_some_and(|p| p == ids.host_pid || self.vouchers.vouched_pid(p))
                    });
                    if !proven && let Some(why) = self.over_cap(uid, pid) {
                        self.counters.refused += 1;
                        self.counters.over_cap += 1;
                        // A flood of these must not flood the log.
                        log::log!(
                            throttled(self.counters.over_cap),
                            "bus: refused a connection from uid {uid} pid {pid:?}: {why} ({} so far)",
                            self.counters.over_cap
                        );
                        // Limit: a client retries (a collector started a
                        // moment before its vouching, a CLI after a burst).
                        refuse(&mut stream, ErrorCode::Limit, &why);
                        continue;
                    }
                    let max_frame = if self.cfg.identities.is_some() {
                        self.cfg.unproven_max_frame.min(self.cfg.max_frame)
                    } else {
                        self.cfg.max_frame
                    };
                    let entry = self.conns.vacant_entry();
                    let idx = entry.key();
                    if let Err(e) = self.poll.registry().register(
                        &mut stream,
                        Token(idx + FIRST_CONN),
                        Interest::READABLE,
                    ) {
                        log::error!("bus: cannot register a connection: {e}");
                        continue;
                    }
                    entry.insert(Conn {
                        stream,
                        state: ConnState::AwaitingHello,
                        uid,
                        pid,
                        proven,
                        max_frame,
                        may_block: self.cfg.block_allowed.is_none(),
                        known: false,
                        active: false,
                        welcomed_at: None,
                        partial_since: None,
                        starved: false,
                        rbuf: Vec::new(),
                        rlen: 0,
                        wbuf: Vec::new(),
                        wpos: 0,
                        frame_ends: VecDeque::new(),
                        head: 0,
                        subs: HashMap::new(),
                        writable: false,
                        closing: false,
                        paused: false,
                        blocked: Vec::new(),
                        self_paused: false,
                        over_since: None,
                        accepted_at: Instant::now(),
                        awaiting: HashSet::new(),
                    });
                    // A peer may have written before we registered.
                    self.read(idx);
                    // The hard ceiling (file descriptors): proven
                    // processes have room beyond the cap of the others.
                    let ceiling = if self.cfg.identities.is_some() {
                        self.cfg.max_connections + PROVEN_ROOM
                    } else {
                        self.cfg.max_connections
                    };
                    if self.conns.len() >= ceiling {
                        log::warn!("bus: {} connections, not accepting more for now", self.conns.len());
                        self.accepting = false;
                        let _ = self.poll.registry().deregister(&mut self.listener);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::error!("bus: accept failed: {e}");
                    break;
                }
            }
        }
    }

    /// The id a `Hello` gets: `Ok(None)` the one asked for (no identities
    /// configured, or a reserved id this process proves), `Ok(Some(id))`
    /// one the broker assigns (an id nobody reserves), `Err` when the id
    /// is reserved for a process this one is not.
    fn identity(&mut self, asked: &str, pid: Option<u32>) -> Result<Option<String>, String> {
        let Some(ids) = &self.cfg.identities else { return Ok(None) };
        if ids.own.iter().any(|p| id_matches(p, asked)) {
            return if pid == Some(ids.host_pid) {
                Ok(None)
            } else {
                Err(format!(
                    "client id {asked} is reserved for the broker's host process (pid {}); this process cannot \
                     prove it",
                    ids.host_pid
                ))
            };
        }
        if ids.vouched.iter().any(|p| id_matches(p, asked)) {
            return if pid.is_some_and(|p| self.vouchers.proves(asked, p)) {
                Ok(None)
            } else {
                Err(format!(
                    "client id {asked} is reserved for the process its supervisor started; this process \
                     (pid {}) is not it",
                    pid.map_or_else(|| "unknown".to_owned(), |p| p.to_string())
                ))
            };
        }
        self.assigned += 1;
        let keep = asked.char_indices().nth(MAX_ASKED_ID).map_or(asked.len(), |(i, _)| i);
        Ok(Some(format!("bus-{}-{}", self.assigned, &asked[..keep])))
    }

    /// Why a connection that is not proven may not be accepted now: the
    /// total, per-uid and per-pid caps over connections that are not
    /// proven. With identities, a process that holds no connection yet
    /// finds `FRESH_ROOM` more in the total and per-uid caps, so one
    /// process cannot lock a CLI out.
    fn over_cap(&self, uid: u32, pid: Option<u32>) -> Option<String> {
        let (mut total, mut same_uid, mut same_pid) = (0, 0, 0);
        for (_, c) in self.conns.iter().filter(|(_, c)| !c.proven) {
            total += 1;
            same_uid += usize::from(c.uid == uid);
            same_pid += usize::from(pid.is_some() && c.pid == pid);
        }
        let room = if self.cfg.identities.is_some() && same_pid > 0 { FRESH_ROOM } else { 0 };
        let cap = |n: usize| n.saturating_sub(room).max(1);
        if total >= cap(self.cfg.max_connections) {
            return Some(format!("connection limit reached ({total} connections)"));
        }
        if same_uid >= cap(self.cfg.max_connections_per_uid) {
            return Some(format!("connection limit of uid {uid} reached ({same_uid} connections)"));
        }
        if same_pid >= self.cfg.max_connections_per_pid {
            return Some(format!("connection limit of one process reached ({same_pid} connections)"));
        }
        None
    }

    /// Reads until `WouldBlock` and handles every whole frame. Readiness
    /// is edge-triggered: stopping early (buffer cap) must not strand bytes
    /// in the kernel, so this loops until the socket is drained, the peer
    /// closed, or reading is paused.
    fn read(&mut self, idx: usize) {
        // Fairness: a connection gets a bounded number of read rounds per
        // poll iteration; if it still has data, it is resumed next
        // iteration (the poll then does not wait), so one flooding
        // publisher cannot starve the others.
        for _ in 0..READ_ROUNDS {
            match self.read_some(idx) {
                ReadOutcome::Capped => self.process_frames(idx),
                ReadOutcome::Drained => {
                    self.process_frames(idx);
                    return;
                }
                ReadOutcome::Closed => {
                    self.process_frames(idx);
                    self.close(idx);
                    return;
                }
                ReadOutcome::Skipped => return,
            }
        }
        if !self.resume.contains(&idx) {
            self.resume.push(idx);
        }
    }

    fn read_some(&mut self, idx: usize) -> ReadOutcome {
        let (lim_b, lim_m) = (self.cfg.queue_limit_bytes, self.cfg.queue_limit_msgs);
        let over_memory = self.cfg.memory_limit_bytes.is_some_and(|m| self.mem_used >= m);
        let Some(c) = self.conns.get_mut(idx) else { return ReadOutcome::Skipped };
        let max = c.max_frame;
        if c.paused || c.closing {
            return ReadOutcome::Skipped;
        }
        // Over the memory limit, only proven connections are read; the
        // others wait (their bytes stay in the kernel) until it frees.
        if over_memory && !c.proven {
            if !c.starved {
                c.starved = true;
                self.starved.push(idx);
            }
            return ReadOutcome::Skipped;
        }
        // A client that does not read what it is sent (replies, PubAcks,
        // deliveries) is not read either until it catches up, and its
        // slow-consumer clock runs: its queue never grows without bound.
        if c.pending_bytes() >= lim_b || c.frame_ends.len() >= lim_m {
            c.self_paused = true;
            c.over_since.get_or_insert_with(Instant::now);
            return ReadOutcome::Skipped;
        }
        loop {
            // Never hold more than one maximal frame plus a chunk.
            if c.rlen > max as usize + frame::LEN_PREFIX + READ_CHUNK {
                return ReadOutcome::Capped;
            }
            // The buffer only grows (zeroed once); reads fill it from
            // `rlen`, so no read pays for clearing memory.
            if c.rbuf.len() < c.rlen + READ_CHUNK {
                c.rbuf.resize(c.rlen + READ_CHUNK, 0);
            }
            match c.stream.read(&mut c.rbuf[c.rlen..]) {
                Ok(0) => return ReadOutcome::Closed,
                Ok(n) => {
                    c.rlen += n;
                    self.mem_used += n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return ReadOutcome::Drained,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return ReadOutcome::Closed,
            }
        }
    }

    fn process_frames(&mut self, idx: usize) {
        let (lim_b, lim_m) = (self.cfg.queue_limit_bytes, self.cfg.queue_limit_msgs);
        let mut used = 0;
        loop {
            let Some(c) = self.conns.get_mut(idx) else { return };
            // Per connection: a `Hello` may raise it (a proven id).
            let max = c.max_frame;
            if c.paused || c.closing {
                break;
            }
            if c.pending_bytes() >= lim_b || c.frame_ends.len() >= lim_m {
                c.self_paused = true;
                c.over_since.get_or_insert_with(Instant::now);
                break;
            }
            let rbuf = std::mem::take(&mut c.rbuf);
            let rlen = c.rlen;
            let step = match frame::decode(&rbuf[used..rlen], max) {
                Ok(Some((f, n))) => {
                    self.handle(idx, f);
                    Some(n)
                }
                Ok(None) => None,
                Err(e) => {
                    self.protocol_error(idx, &e);
                    None
                }
            };
            let Some(c) = self.conns.get_mut(idx) else { return };
            c.rbuf = rbuf;
            match step {
                Some(n) => used += n,
                None => break,
            }
        }
        if let Some(c) = self.conns.get_mut(idx) {
            let used = used.min(c.rlen);
            c.rbuf.copy_within(used..c.rlen, 0);
            c.rlen -= used;
            // The clock of a half-sent frame starts with its first bytes
            // held and restarts with every frame completed.
            if c.rlen == 0 {
                c.partial_since = None;
            } else if used > 0 || c.partial_since.is_none() {
                c.partial_since = Some(Instant::now());
            }
            // Do not pin the memory of one big frame.
            if c.rbuf.len() > 4 * READ_CHUNK && c.rlen < READ_CHUNK {
                c.rbuf.truncate(2 * READ_CHUNK);
                c.rbuf.shrink_to_fit();
            }
        }
    }

    fn protocol_error(&mut self, idx: usize, e: &FrameError) {
        log::warn!("bus: protocol error from connection {idx}, closing it: {e}");
        self.counters.protocol_errors += 1;
        self.fatal(idx, ErrorCode::Protocol, &e.to_string());
    }

    /// Sends an error frame and closes the connection after flushing.
    fn fatal(&mut self, idx: usize, code: ErrorCode, message: &str) {
        let max = self.cfg.max_frame;
        if let Some(c) = self.conns.get_mut(idx) {
            c.queue_frame(&Frame::Error { code, message, ack_id: None }, max);
            c.closing = true;
            self.dirty.push(idx);
        }
    }

    fn reply(&mut self, idx: usize, f: &Frame<'_>) {
        let max = self.cfg.max_frame;
        if let Some(c) = self.conns.get_mut(idx) {
            c.queue_frame(f, max);
            self.dirty.push(idx);
        }
    }

    fn handle(&mut self, idx: usize, f: Frame<'_>) {
        let ready = matches!(self.conns.get(idx).map(|c| &c.state), Some(ConnState::Ready { .. }));
        match (ready, f) {
            (false, Frame::Hello { protocol_version, client_id, pid }) => {
                if protocol_version != PROTOCOL_VERSION {
                    self.counters.protocol_errors += 1;
                    let msg = format!(
                        "protocol version {protocol_version} not supported (broker speaks {PROTOCOL_VERSION})"
                    );
                    log::warn!("bus: {client_id} (pid {pid}): {msg}");
                    return self.fatal(idx, ErrorCode::Version, &msg);
                }
                if topic::validate_topic(client_id).is_err() || client_id.contains('.') {
                    return self.fatal(idx, ErrorCode::BadTopic, "client id must be one topic segment");
                }
                if !self.open.load(Ordering::Acquire)
                    && !self.cfg.first_clients.as_ref().is_some_and(|ids| ids.iter().any(|i| i == client_id))
                {
                    log::debug!("bus: {client_id} (pid {pid}) asked to retry: the broker is not open yet");
                    return self.fatal(idx, ErrorCode::Limit, "the broker is starting; retry");
                }
                if client_id == BROKER_SENDER {
                    self.counters.refused += 1;
                    return self.fatal(idx, ErrorCode::Forbidden, "client id \"bus\" is the broker's own");
                }
                let (pid_now, uid) = self.conns.get(idx).map_or((None, 0), |c| (c.pid, c.uid));
                let (client_id, proven): (String, bool) = match self.identity(client_id, pid_now) {
                    Ok(Some(id)) => (id, false),
                    Ok(None) => (client_id.to_owned(), self.cfg.identities.is_some()),
                    Err(why) => {
                        self.counters.refused += 1;
                        self.counters.unproven += 1;
                        log::log!(
                            throttled(self.counters.unproven),
                            "bus: refused client id {client_id} from pid {pid_now:?} (uid {uid}): {why} ({} so far)",
                            self.counters.unproven
                        );
                        return self.fatal(idx, ErrorCode::Unproven, &why);
                    }
                };
                let taken = self.conns.iter().any(|(i, c)| {
                    i != idx
                        && matches!(&c.state, ConnState::Ready { client_id: id, .. } if **id == *client_id)
                });
                if taken {
                    // Another live connection has this id: its inbox and
                    // permissions are not to be shared.
                    self.counters.refused += 1;
                    log::warn!("bus: refused a second connection as {client_id} (pid {pid})");
                    // Limit, not Forbidden: a client reconnecting faster than the
                    // broker notices its old connection's close retries.
                    return self.fatal(idx, ErrorCode::Limit, "client id in use by a live connection");
                }
                let max_frame = self.cfg.max_frame;
                let may_block = self
                    .cfg
                    .block_allowed
                    .as_ref()
                    .is_none_or(|ids| ids.iter().any(|p| id_matches(p, &client_id)));
                if let Some(c) = self.conns.get_mut(idx) {
                    let named = self.cfg.permissions.iter().find(|p| p.applies_to(&client_id));
                    c.known = named.is_some();
                    let level = if c.known { log::Level::Info } else { log::Level::Debug };
                    log::log!(level, "bus: {client_id} connected (pid {:?}, uid {})", c.pid, c.uid);
                    let acl = named
                        .map(|p| &p.permissions)
                        .or(self.cfg.default_permissions.as_ref())
                        .map(|p| p.resolve(&client_id));
                    c.state = ConnState::Ready { client_id: Arc::from(client_id.as_str()), acl };
                    c.welcomed_at = Some(Instant::now());
                    c.may_block = may_block;
                    if proven {
                        c.proven = true;
                        c.max_frame = max_frame;
                    }
                }
                let max_frame = self.conns.get(idx).map_or(max_frame, |c| c.max_frame);
                self.reply(
                    idx,
                    &Frame::WelcomeAs {
                        protocol_version: PROTOCOL_VERSION,
                        max_frame,
                        max_deliver: self.cfg.max_frame,
                        client_id: &client_id,
                    },
                );
            }
            (false, _) => {
                self.counters.protocol_errors += 1;
                self.fatal(idx, ErrorCode::Protocol, "the first frame must be Hello");
            }
            (true, Frame::Subscribe { sid, pattern, mode, overflow }) => {
                self.mark_active(idx);
                self.subscribe(idx, sid, pattern, mode, overflow)
            }
            (true, Frame::Unsubscribe { sid }) => self.unsubscribe(idx, sid),
            (true, Frame::Publish { topic, payload, reply_to, ack_id }) => {
                self.mark_active(idx);
                // Every frame kind: an answer goes only to the publisher's
                // own inbox, never onto a topic its receiver would then
                // publish to with its own (larger) rights.
                if let Some(to) = reply_to
                    && (topic::validate_topic(to).is_err() || !self.own_inbox(idx, to))
                {
                    self.counters.forbidden += 1;
                    let message = "reply_to must be in the publisher's own inbox (direct.<client id>.…)";
                    return self.reply(idx, &Frame::Error { code: ErrorCode::Forbidden, message, ack_id });
                }
                if topic == STATS_TOPIC {
                    if !self.may_publish(idx, STATS_TOPIC) {
                        self.counters.forbidden += 1;
                        let message = "may not publish to bus.stats";
                        return self
                            .reply(idx, &Frame::Error { code: ErrorCode::Forbidden, message, ack_id });
                    }
                    return self.answer_stats(idx, reply_to, ack_id);
                }
                // A PubAck means routed: a refused publish gets its Error instead.
                if self.publish(idx, topic, payload, reply_to, ack_id, None).is_some()
                    && let Some(ack_id) = ack_id
                {
                    self.reply(idx, &Frame::PubAck { ack_id });
                }
            }
            (true, Frame::Request { topic, payload, reply_to, strategy }) => {
                self.mark_active(idx);
                if topic::validate_topic(reply_to).is_err() || !self.own_inbox(idx, reply_to) {
                    self.counters.forbidden += 1;
                    let message = "a request's reply_to must be in the requester's own inbox";
                    return self
                        .reply(idx, &Frame::Error { code: ErrorCode::Forbidden, message, ack_id: None });
                }
                // An inbox takes answers, not requests: a request into one
                // would sit in its owner's unanswered set and skew
                // `LeastLoaded` against it.
                if topic.starts_with("direct.") {
                    self.counters.forbidden += 1;
                    let message = "requests may not be sent to an inbox (direct.…)";
                    self.reply(idx, &Frame::Error { code: ErrorCode::Forbidden, message, ack_id: None });
                    let reason = NoReplyReason::Refused;
                    return self.reply(idx, &Frame::NoReply { reply_to, reason, responder: "" });
                }
                if topic == STATS_TOPIC {
                    if !self.may_publish(idx, STATS_TOPIC) {
                        self.counters.forbidden += 1;
                        let message = "may not publish to bus.stats";
                        self.reply(idx, &Frame::Error { code: ErrorCode::Forbidden, message, ack_id: None });
                        let reason = NoReplyReason::Refused;
                        return self.reply(idx, &Frame::NoReply { reply_to, reason, responder: "" });
                    }
                    return self.answer_stats(idx, Some(reply_to), None);
                }
                // The requester hears at once when nobody can answer.
                let reason = match self.publish(idx, topic, payload, Some(reply_to), None, Some(strategy)) {
                    None => NoReplyReason::Refused,
                    Some(0) => NoReplyReason::NoResponders,
                    Some(_) => return,
                };
                self.reply(idx, &Frame::NoReply { reply_to, reason, responder: "" });
            }
            (true, Frame::Ping(n)) => self.reply(idx, &Frame::Pong(n)),
            (true, Frame::Pong(_)) => {}
            (true, other) => {
                self.counters.protocol_errors += 1;
                let msg = format!("unexpected frame from a client: {}", kind(&other));
                self.fatal(idx, ErrorCode::Protocol, &msg);
            }
        }
    }

    fn subscribe(&mut self, idx: usize, sid: u64, pattern: &str, mode: Mode<'_>, overflow: Overflow) {
        if let Err(e) = topic::validate_pattern(pattern) {
            self.counters.forbidden += 1;
            return self.reply(
                idx,
                &Frame::Error { code: ErrorCode::BadTopic, message: &e.to_string(), ack_id: None },
            );
        }
        if !self.may_subscribe(idx, pattern) {
            self.counters.forbidden += 1;
            let msg = format!("may not subscribe to {pattern}");
            return self
                .reply(idx, &Frame::Error { code: ErrorCode::Forbidden, message: &msg, ack_id: None });
        }
        if let Mode::Queue { group, .. } = mode
            && (topic::validate_topic(group).is_err() || group.contains('.'))
        {
            self.counters.forbidden += 1;
            return self.reply(
                idx,
                &Frame::Error { code: ErrorCode::BadTopic, message: "bad queue group name", ack_id: None },
            );
        }
        let held = self.conns.get(idx).map_or(0, |c| c.subs.len() + usize::from(!c.subs.contains_key(&sid)));
        if held > MAX_SUBSCRIPTIONS {
            self.counters.forbidden += 1;
            let msg = format!("at most {MAX_SUBSCRIPTIONS} subscriptions per connection");
            return self.reply(idx, &Frame::Error { code: ErrorCode::Limit, message: &msg, ack_id: None });
        }
        // Re-using a sid replaces the old subscription.
        self.unsubscribe(idx, sid);
        let group = match mode {
            Mode::Broadcast => {
                // Validated above, so insertion cannot fail.
                let _ = self.trie.insert(pattern, Target::Sub { conn: idx, sid });
                None
            }
            Mode::Queue { group, strategy } => {
                let key = (pattern.to_owned(), group.to_owned());
                let gid = match self.group_index.get(&key) {
                    Some(&g) => g,
                    None => {
                        let g = self.groups.insert(Group {
                            pattern: key.0.clone(),
                            name: key.1.clone(),
                            strategy,
                            members: Vec::new(),
                            next: 0,
                        });
                        let _ = self.trie.insert(pattern, Target::Group(g));
                        self.group_index.insert(key, g);
                        g
                    }
                };
                self.groups[gid].members.push((idx, sid));
                Some(gid)
            }
        };
        if let Some(c) = self.conns.get_mut(idx) {
            // Block is a privilege: anyone else's full queue drops its
            // oldest (and the slow-consumer deadline applies), never
            // pausing a publisher.
            let overflow =
                if overflow == Overflow::Block && !c.may_block { Overflow::DropOldest } else { overflow };
            c.subs.insert(sid, SubInfo { pattern: pattern.to_owned(), group, overflow });
        }
    }

    fn unsubscribe(&mut self, idx: usize, sid: u64) {
        let Some(info) = self.conns.get_mut(idx).and_then(|c| c.subs.remove(&sid)) else { return };
        match info.group {
            None => {
                self.trie.remove(&info.pattern, |t| *t == Target::Sub { conn: idx, sid });
            }
            Some(gid) => {
                let g = &mut self.groups[gid];
                g.members.retain(|m| *m != (idx, sid));
                if g.members.is_empty() {
                    let g = self.groups.remove(gid);
                    self.group_index.remove(&(g.pattern.clone(), g.name));
                    self.trie.remove(&g.pattern, |t| *t == Target::Group(gid));
                }
            }
        }
    }

    /// Subscribe rules: everyone may use their own inbox `direct.<client_id>`
    /// (and the topics under it) and nobody else's; nobody may subscribe to
    /// everything; beyond that, the client's permissions decide.
    fn may_subscribe(&self, idx: usize, pattern: &str) -> bool {
        let Some(ConnState::Ready { client_id, acl }) = self.conns.get(idx).map(|c| &c.state) else {
            return false;
        };
        let mut segs = pattern.split('.');
        match segs.next() {
            Some("#") | Some("+") => false,
            Some("direct") => segs.next() == Some(&**client_id),
            _ => {
                acl.as_ref().is_none_or(|a| a.subscribe.iter().any(|allowed| topic::covers(allowed, pattern)))
            }
        }
    }

    /// Publish rules: replies to inboxes are always allowed; beyond that,
    /// the client's permissions decide.
    fn may_publish(&self, idx: usize, topic_name: &str) -> bool {
        let Some(ConnState::Ready { acl, .. }) = self.conns.get(idx).map(|c| &c.state) else {
            return false;
        };
        topic_name.starts_with("direct.")
            || acl
                .as_ref()
                .is_none_or(|a| a.publish.iter().any(|allowed| topic::matches(allowed, topic_name)))
    }

    /// Routes a publish: how many subscribers it found, `None` when it was
    /// refused. `strategy` is set for a `Request` (whose
    /// deliveries the broker follows), `Some(None)` meaning the groups' own.
    fn publish(
        &mut self,
        idx: usize,
        topic_name: &str,
        payload: &[u8],
        reply_to: Option<&str>,
        ack_id: Option<u64>,
        strategy: Option<Option<Strategy>>,
    ) -> Option<usize> {
        if let Err(e) = topic::validate_topic(topic_name) {
            self.counters.forbidden += 1;
            self.reply(idx, &Frame::Error { code: ErrorCode::BadTopic, message: &e.to_string(), ack_id });
            return None;
        }
        if !self.may_publish(idx, topic_name) {
            self.counters.forbidden += 1;
            let msg = format!("may not publish to {topic_name}");
            self.reply(idx, &Frame::Error { code: ErrorCode::Forbidden, message: &msg, ack_id });
            return None;
        }
        self.counters.published += 1;
        let sender = match self.conns.get_mut(idx) {
            Some(c) => {
                // An answer to a request delivered here: one less awaited.
                if !c.awaiting.is_empty() && c.awaiting.remove(topic_name) {
                    release(&mut self.holders, topic_name);
                }
                match &c.state {
                    ConnState::Ready { client_id, .. } => Arc::clone(client_id),
                    ConnState::AwaitingHello => Arc::from(""),
                }
            }
            None => Arc::from(""),
        };
        let route = Route {
            sender: &sender,
            topic: topic_name,
            payload,
            reply_to,
            strategy: strategy.flatten(),
            follow: strategy.is_some() && reply_to.is_some(),
        };
        Some(self.route(idx, &route))
    }

    /// Delivers a message to every matching subscription and one member of
    /// every matching queue group; returns how many subscribers it found
    /// (a delivery an overflow strategy then dropped included: there was
    /// someone to answer).
    /// `idx` is the publishing connection (for flow control).
    fn route(&mut self, idx: usize, r: &Route<'_>) -> usize {
        let mut targets = std::mem::take(&mut self.targets);
        targets.clear();
        self.trie.for_each_match(r.topic, |t| targets.push(*t));
        let mut found = 0;
        for t in &targets {
            let (conn, sid) = match *t {
                Target::Sub { conn, sid } => (conn, sid),
                Target::Group(gid) => match self.pick(gid, r.strategy) {
                    Some(m) => m,
                    None => continue,
                },
            };
            found += 1;
            self.deliver(idx, conn, sid, r);
        }
        self.targets = targets;
        found
    }

    /// A member of a group: by the request's strategy if it has one, else
    /// by the group's.
    fn pick(&mut self, gid: usize, strategy: Option<Strategy>) -> Option<(usize, u64)> {
        let g = self.groups.get_mut(gid)?;
        if g.members.is_empty() {
            return None;
        }
        let n = g.members.len();
        let i = match strategy.unwrap_or(g.strategy) {
            Strategy::RoundRobin => (g.next + 1) % n,
            Strategy::Random => {
                self.rng ^= self.rng << 13;
                self.rng ^= self.rng >> 7;
                self.rng ^= self.rng << 17;
                (self.rng % n as u64) as usize
            }
            Strategy::LeastLoaded => {
                // Ties go in turn: scan from the member after the last pick.
                let conns = &self.conns;
                let load = |m: &(usize, u64)| conns.get(m.0).map_or(usize::MAX, Conn::load);
                (1..=n).map(|k| (g.next + k) % n).min_by_key(|&i| load(&g.members[i])).unwrap_or(0)
            }
        };
        g.next = i;
        Some(g.members[i])
    }

    /// Queues one delivery; false when it was dropped.
    fn deliver(&mut self, from: usize, to: usize, sid: u64, r: &Route<'_>) -> bool {
        let (topic_name, payload) = (r.topic, r.payload);
        let (max, lim_b, lim_m) = (self.cfg.max_frame, self.cfg.queue_limit_bytes, self.cfg.queue_limit_msgs);
        let over_memory = self.cfg.memory_limit_bytes.is_some_and(|m| self.mem_used >= m);
        let Some(c) = self.conns.get_mut(to) else { return false };
        let overflow = c.subs.get(&sid).map_or(Overflow::DropNewest, |s| s.overflow);
        // Over the broker's memory limit every queue that may drop counts
        // as full; a (trusted) Block subscriber pushes back instead.
        let full = c.pending_bytes() >= lim_b
            || c.frame_ends.len() >= lim_m
            || (over_memory && overflow != Overflow::Block);
        if full {
            // Whatever the strategy, the slow-consumer clock starts now.
            if c.over_since.is_none() {
                c.over_since = Some(Instant::now());
            }
            match overflow {
                Overflow::DropNewest => {
                    self.counters.dropped += 1;
                    return false;
                }
                Overflow::Error => {
                    self.counters.dropped += 1;
                    let msg = format!("subscriber queue full, message on {topic_name} dropped");
                    self.reply(
                        from,
                        &Frame::Error { code: ErrorCode::Overflow, message: &msg, ack_id: None },
                    );
                    return false;
                }
                Overflow::DropOldest => {
                    // Make room down to half the limits, oldest first, in
                    // one pass: a full queue then takes many messages
                    // before the next (costly) move of its buffer.
                    let target_b = (lim_b / 2).saturating_sub(payload.len());
                    self.counters.dropped += c.drop_oldest_to(target_b, lim_m / 2);
                }
                Overflow::Block => {
                    // Deliver (the queue may exceed its limit by what one
                    // read of the publisher holds) and stop reading from
                    // the publisher until this subscriber drains.
                    if from != to && !c.blocked.contains(&from) {
                        c.blocked.push(from);
                    }
                    if from != to
                        && let Some(p) = self.conns.get_mut(from)
                    {
                        p.paused = true;
                    }
                }
            }
        }
        let Some(c) = self.conns.get_mut(to) else { return false };
        let f = Frame::Deliver { sid, topic: topic_name, payload, reply_to: r.reply_to, from: r.sender };
        if c.queue_frame(&f, max) {
            self.mem_used += payload.len();
            if r.follow
                && let Some(inbox) = r.reply_to
                && c.awaiting.len() < MAX_AWAITING
                && c.awaiting.insert(Box::from(inbox))
            {
                *self.holders.entry(Box::from(inbox)).or_default() += 1;
            }
            self.counters.delivered += 1;
            self.dirty.push(to);
            true
        } else {
            // Topic, payload and framing together exceed the maximum frame.
            self.counters.dropped += 1;
            false
        }
    }

    fn flush_dirty(&mut self) {
        // One entry per delivery: flush each connection once.
        self.dirty.sort_unstable();
        self.dirty.dedup();
        while let Some(idx) = self.dirty.pop() {
            self.flush(idx);
        }
    }

    fn flush(&mut self, idx: usize) {
        let (lim_b, lim_m) = (self.cfg.queue_limit_bytes, self.cfg.queue_limit_msgs);
        let Some(c) = self.conns.get_mut(idx) else { return };
        let mut failed = false;
        while c.wpos < c.wbuf.len() {
            match c.stream.write(&c.wbuf[c.wpos..]) {
                Ok(0) => {
                    failed = true;
                    break;
                }
                Ok(n) => c.wpos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        while let Some(&end) = c.frame_ends.front().filter(|&&e| e <= c.wpos) {
            c.frame_ends.pop_front();
            c.head = end;
        }
        if c.wpos == c.wbuf.len() {
            c.wbuf.clear();
            c.wpos = 0;
            c.head = 0;
            c.frame_ends.clear();
        } else if c.head > c.wbuf.len() / 2 {
            // Compact up to the start of the oldest frame still queued, so
            // a half-sent frame stays recognisable as started.
            let h = c.head;
            c.wbuf.drain(..h);
            c.frame_ends.iter_mut().for_each(|e| *e -= h);
            c.wpos -= h;
            c.head = 0;
        }
        let pending = c.pending_bytes();
        let below = pending < lim_b / 2 && c.frame_ends.len() < lim_m / 2;
        let under = pending < lim_b && c.frame_ends.len() < lim_m;
        // The slow-consumer clock stops only where the waiters would be
        // released: a subscriber hovering between half and full with
        // publishers blocked on it must still reach its deadline.
        let waiters = !c.blocked.is_empty() || c.self_paused;
        if below || (under && !waiters) {
            c.over_since = None;
        }
        let resume_self = below && std::mem::take(&mut c.self_paused);
        let want_write = pending > 0;
        if want_write != c.writable {
            c.writable = want_write;
            let interest =
                if want_write { Interest::READABLE | Interest::WRITABLE } else { Interest::READABLE };
            let _ = self.poll.registry().reregister(&mut c.stream, Token(idx + FIRST_CONN), interest);
        }
        let unblock = if below { std::mem::take(&mut c.blocked) } else { Vec::new() };
        let close = failed || (c.closing && pending == 0);
        for p in unblock {
            if let Some(pc) = self.conns.get_mut(p) {
                pc.paused = false;
            }
            // Frames already buffered, and bytes the kernel holds, wait.
            self.read(p);
        }
        if resume_self && !close {
            self.read(idx);
        }
        if close {
            self.close(idx);
        }
    }

    fn mark_active(&mut self, idx: usize) {
        if let Some(c) = self.conns.get_mut(idx) {
            c.active = true;
        }
    }

    /// Recomputes the bytes held in buffers. Over the limit, the
    /// connection that is not proven and has the most queued is closed (a
    /// subscriber that does not read; else the biggest half-read frame), until the rest
    /// fits: otherwise one hog would keep every other client that is not
    /// proven from being read. Below the limit, reads the connections that
    /// waited for memory.
    fn check_memory(&mut self) {
        let Some(limit) = self.cfg.memory_limit_bytes else { return };
        self.mem_used = self.conns.iter().map(|(_, c)| c.rlen + c.pending_bytes()).sum();
        while self.mem_used >= limit {
            // A write queue grows with a client that does not read; a read
            // buffer is bounded by a frame and drained by handling it. So
            // the biggest queue goes first, the biggest read buffer only
            // when no queue is left.
            let hog = self
                .conns
                .iter()
                .filter(|(_, c)| !c.proven)
                .map(|(i, c)| ((c.pending_bytes(), c.rlen), i))
                .max()
                .filter(|((queued, read), _)| queued + read > 0);
            let Some(((queued, read), idx)) = hog else { break };
            let held = queued + read;
            log::warn!(
                "bus: {} bytes buffered, over the limit of {limit}: closing connection {idx}, which held {held}",
                self.mem_used
            );
            self.counters.slow_disconnects += 1;
            self.close(idx);
            self.mem_used = self.mem_used.saturating_sub(held);
        }
        if self.mem_used < limit && !self.starved.is_empty() {
            for idx in std::mem::take(&mut self.starved) {
                if let Some(c) = self.conns.get_mut(idx) {
                    c.starved = false;
                }
                self.read(idx);
            }
        }
    }

    fn check_slow_consumers(&mut self) {
        // Idle connections and half-sent frames hold a slot and memory
        // for nothing.
        let (idle, frame_timeout) = (self.cfg.idle_timeout, self.cfg.frame_timeout);
        let timed_out: Vec<(usize, &'static str)> = self
            .conns
            .iter()
            .filter_map(|(i, c)| {
                let waiting_on_us = c.paused || c.self_paused || c.starved || c.closing;
                if !waiting_on_us && c.partial_since.is_some_and(|t| t.elapsed() > frame_timeout) {
                    return Some((i, "a frame was left half-sent"));
                }
                let idle_since = c.welcomed_at.filter(|_| !c.active && !c.proven);
                if idle.is_some_and(|d| idle_since.is_some_and(|t| t.elapsed() > d)) {
                    return Some((i, "idle (it neither subscribed nor published)"));
                }
                None
            })
            .collect();
        for (idx, why) in timed_out {
            log::warn!("bus: connection {idx} timed out: {why}; closing it");
            self.counters.timeouts += 1;
            let message = format!("timed out: {why}");
            self.fatal(idx, ErrorCode::Limit, &message);
            self.flush(idx);
            // A peer that does not read its error is closed all the same.
            if self.conns.contains(idx) {
                self.close(idx);
            }
        }
        // A connection that does not say Hello in time holds a slot for
        // nothing: with the cap, silent sockets could lock clients out.
        let mute: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                matches!(c.state, ConnState::AwaitingHello) && c.accepted_at.elapsed() > HELLO_DEADLINE
            })
            .map(|(i, _)| i)
            .collect();
        for idx in mute {
            log::warn!("bus: connection {idx} sent no Hello within {HELLO_DEADLINE:?}, closing it");
            self.counters.protocol_errors += 1;
            self.close(idx);
        }
        let deadline = self.cfg.slow_consumer_deadline;
        let slow: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| c.over_since.is_some_and(|t| t.elapsed() > deadline))
            .map(|(i, _)| i)
            .collect();
        for idx in slow {
            log::warn!(
                "bus: connection {idx} stayed over its queue limit for {deadline:?}, disconnecting it"
            );
            self.counters.slow_disconnects += 1;
            self.close(idx);
        }
    }

    fn close(&mut self, idx: usize) {
        let Some(c) = self.conns.get(idx) else { return };
        let sids: Vec<u64> = c.subs.keys().copied().collect();
        for sid in sids {
            self.unsubscribe(idx, sid);
        }
        let mut c = self.conns.remove(idx);
        let _ = self.poll.registry().deregister(&mut c.stream);
        if let ConnState::Ready { client_id, .. } = &c.state {
            let level = if c.known { log::Level::Info } else { log::Level::Debug };
            log::log!(level, "bus: {client_id} disconnected");
            // Its requesters need not wait out their timeouts; whether
            // someone else still holds the request decides if it may yet
            // be answered.
            for inbox in std::mem::take(&mut c.awaiting) {
                let reason = if release(&mut self.holders, &inbox) == 0 {
                    NoReplyReason::ResponderGone
                } else {
                    NoReplyReason::ResponderLeft
                };
                self.no_reply(&inbox, reason, client_id);
            }
        }
        for p in c.blocked {
            if let Some(pc) = self.conns.get_mut(p) {
                pc.paused = false;
            }
            self.read(p);
        }
        if !self.accepting && self.conns.len() * 10 < self.cfg.max_connections * 9 {
            self.accepting = true;
            if self.poll.registry().register(&mut self.listener, LISTENER, Interest::READABLE).is_ok() {
                self.accept();
            }
        }
    }

    /// Copies the counters to the shared stats; the queue depths too when
    /// `queues` is set or 100 ms have passed (building them walks every
    /// connection).
    fn publish_stats(&mut self, queues: bool) {
        self.counters.connections = self.conns.len();
        self.counters.subscriptions = self.conns.iter().map(|(_, c)| c.subs.len()).sum();
        let mut s = self.stats.lock();
        let snapshot = std::mem::take(&mut s.queues);
        *s = self.counters.clone();
        s.queues = snapshot;
        if !queues && self.queues_at.elapsed() < Duration::from_millis(100) {
            return;
        }
        self.queues_at = Instant::now();
        s.queues = self
            .conns
            .iter()
            .map(|(_, c)| QueueDepth {
                client_id: match &c.state {
                    ConnState::Ready { client_id, .. } => client_id.to_string(),
                    ConnState::AwaitingHello => String::new(),
                },
                messages: c.frame_ends.len(),
                bytes: c.pending_bytes(),
                awaiting: c.awaiting.len(),
            })
            .collect();
    }

    /// Tells the owner of the inbox `reply_to` that a request will not be
    /// answered by `responder`.
    fn no_reply(&mut self, reply_to: &str, reason: NoReplyReason, responder: &str) {
        let mut targets = std::mem::take(&mut self.targets);
        targets.clear();
        self.trie.for_each_match(reply_to, |t| targets.push(*t));
        for t in &targets {
            if let Target::Sub { conn, .. } = *t {
                self.reply(conn, &Frame::NoReply { reply_to, reason, responder });
            }
        }
        self.targets = targets;
    }

    /// Whether `topic_name` lies in the connection's own inbox.
    fn own_inbox(&self, idx: usize, topic_name: &str) -> bool {
        let Some(ConnState::Ready { client_id, .. }) = self.conns.get(idx).map(|c| &c.state) else {
            return false;
        };
        let mut segs = topic_name.split('.');
        segs.next() == Some("direct") && segs.next() == Some(&**client_id)
    }

    /// Answers a stats request: the encoded counters go to `reply_to`,
    /// which must be the requester's own inbox (otherwise the broker would
    /// publish on the requester's behalf where it may not).
    fn answer_stats(&mut self, idx: usize, reply_to: Option<&str>, ack_id: Option<u64>) {
        self.publish_stats(true);
        let stats = self.stats.lock().clone();
        match (reply_to, postcard::to_stdvec(&stats)) {
            (Some(to), Ok(bytes)) if topic::validate_topic(to).is_ok() && self.own_inbox(idx, to) => {
                let route = Route {
                    sender: BROKER_SENDER,
                    topic: to,
                    payload: &bytes,
                    reply_to: None,
                    strategy: None,
                    follow: false,
                };
                self.route(idx, &route);
            }
            (None, _) => {
                return self.reply(
                    idx,
                    &Frame::Error {
                        code: ErrorCode::BadTopic,
                        message: "bus.stats needs a reply_to",
                        ack_id,
                    },
                );
            }
            _ => {
                self.counters.forbidden += 1;
                let message = "bus.stats answers only to the requester's own inbox";
                return self.reply(idx, &Frame::Error { code: ErrorCode::Forbidden, message, ack_id });
            }
        }
        if let Some(ack_id) = ack_id {
            self.reply(idx, &Frame::PubAck { ack_id });
        }
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

/// One connection no longer holds `inbox`: the holders left.
fn release(holders: &mut HashMap<Box<str>, u32>, inbox: &str) -> u32 {
    let Some(n) = holders.get_mut(inbox) else { return 0 };
    *n = n.saturating_sub(1);
    let left = *n;
    if left == 0 {
        holders.remove(inbox);
    }
    left
}

fn kind(f: &Frame<'_>) -> &'static str {
    match f {
        Frame::Hello { .. } => "Hello",
        Frame::Welcome { .. } => "Welcome",
        Frame::Subscribe { .. } => "Subscribe",
        Frame::Unsubscribe { .. } => "Unsubscribe",
        Frame::Publish { .. } => "Publish",
        Frame::Deliver { .. } => "Deliver",
        Frame::PubAck { .. } => "PubAck",
        Frame::Error { .. } => "Error",
        Frame::Ping(_) => "Ping",
        Frame::Pong(_) => "Pong",
        Frame::Request { .. } => "Request",
        Frame::NoReply { .. } => "NoReply",
        Frame::WelcomeAs { .. } => "WelcomeAs",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_voucher_names_one_process_not_its_pid() {
        let v = Vouchers::default();
        let mut child = std::process::Command::new("sleep").arg("30").spawn().expect("spawn");
        let pid = child.id();
        v.vouch("col", pid);
        assert!(v.proves("col", pid));
        assert!(v.vouched_pid(pid));
        assert!(!v.proves("col", std::process::id()), "another process");
        assert!(!v.proves("other", pid), "another id");
        child.kill().expect("kill");
        child.wait().expect("reap");
        // Gone: whatever reuses the pid later has another start time (or
        // none can be read now).
        assert!(!v.proves("col", pid));
        // A stale start time never matches a live process.
        v.table.lock().insert("me".into(), Vouch { pid: std::process::id(), start_time: Some(u64::MAX) });
        assert!(!v.proves("me", std::process::id()));
        // Revoking takes only the vouched pid's entry.
        v.vouch("me", std::process::id());
        v.revoke("me", pid);
        assert!(v.proves("me", std::process::id()));
        v.revoke("me", std::process::id());
        assert!(!v.proves("me", std::process::id()));
    }
}
