//! The blocking client: a handle whose methods block at most until their
//! timeout, over a reactor thread (`bus-client`) that owns the socket.
//!
//! The handle sends commands on a bounded channel and wakes the reactor.
//! The reactor connects, says `Hello`, and after `Welcome` subscribes
//! everything the handle asked for (again after every reconnect). When the
//! connection drops it reconnects with exponential backoff and full jitter
//! (a fleet of collectors must not stampede a restarted broker). Publishes
//! made while away wait in a bounded outbox (`BufferFull` past its limit,
//! never unbounded memory); publishes made while connected go straight to
//! the write buffer, and when the broker applies backpressure the reactor
//! stops taking commands, so `publish` blocks up to its timeout.
//!
//! Before saying `Hello` the client checks that the socket is served by
//! an expected uid (the kernel's peer credentials of the listening
//! process; [`ClientConfig::server_uids`]), so a socket put in the
//! broker's place by someone else gets nothing. The broker's `WelcomeAs`
//! names the client's id on the bus, which may be one the broker assigned
//! ([`Client::id`]); the inbox and request topics use it.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError, bounded};
use mio::net::UnixStream;
use mio::{Events, Interest, Poll, Token, Waker};
use parking_lot::{Condvar, Mutex};

pub use crate::frame::Message;
use crate::frame::{self, ErrorCode, Frame, Mode, NoReplyReason, Overflow, PROTOCOL_VERSION, Strategy};
use crate::topic::{self, TopicError};

const STREAM: Token = Token(0);
const WAKER: Token = Token(1);
/// Subscription id of the client's own inbox, `direct.<client_id>.#`.
const INBOX_SID: u64 = 0;
/// Bytes read per `read` call.
const READ_CHUNK: usize = 64 * 1024;
/// Read-buffer size at which reading pauses until frames are handled (at
/// least one maximal frame of the broker's plus a chunk).
const READ_CAP: usize = 4 << 20;
/// Deliveries held per Block subscription whose channel is full, before
/// the client stops reading the socket (pushing back on the broker).
/// Frames for other subscriptions, replies and acks keep flowing until
/// then.
const PARK_LIMIT: usize = 1024;
/// Replies a `request_all` holds for its caller; more are dropped (and
/// logged) while the caller does not take them.
const MAX_REPLIES: usize = 1024;

/// The environment variable naming the uid the broker runs as: a
/// supervisor passes it to the processes it starts, and
/// [`ClientConfig::new`] then expects that uid (or root) to serve the
/// socket.
pub const BROKER_UID_ENV: &str = "DAEMONEYE_BROKER_UID";

/// Client settings.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The broker's socket.
    pub socket: PathBuf,
    /// This client's id: one topic segment, unique on the bus.
    pub client_id: String,
    /// First reconnect delay; doubles up to `backoff_max`.
    pub backoff_min: Duration,
    /// Longest reconnect delay.
    pub backoff_max: Duration,
    /// Bytes of publishes kept while disconnected.
    pub outbox_limit_bytes: usize,
    /// Bytes queued for the socket before `publish` waits (backpressure).
    pub write_limit_bytes: usize,
    /// Messages buffered per subscription before new ones are dropped
    /// (and counted).
    pub subscription_capacity: usize,
    /// How long `publish` and the other calls wait at most.
    pub timeout: Duration,
    /// The uids the broker may run as: a socket served by another uid is
    /// not spoken to (the client retries, as for a broker that is not
    /// there). Default: `$DAEMONEYE_BROKER_UID` when set, else this
    /// process's effective uid; root always.
    pub server_uids: Vec<u32>,
}

impl ClientConfig {
    /// Defaults for a socket and a client id.
    pub fn new(socket: impl Into<PathBuf>, client_id: impl Into<String>) -> Self {
        ClientConfig {
            socket: socket.into(),
            client_id: client_id.into(),
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(5),
            outbox_limit_bytes: 1 << 20,
            write_limit_bytes: 4 << 20,
            subscription_capacity: 1024,
            timeout: Duration::from_secs(5),
            server_uids: default_server_uids(),
        }
    }
}

/// `$DAEMONEYE_BROKER_UID` (or this process's effective uid) and root.
fn default_server_uids() -> Vec<u32> {
    let expected = std::env::var(BROKER_UID_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<u32>().ok())
        .unwrap_or_else(daemoneye_platform::effective_uid);
    if expected == 0 { vec![0] } else { vec![expected, 0] }
}

/// Where the client stands with the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionState {
    /// Not connected; retrying with backoff.
    Disconnected,
    /// Connected and welcomed; subscriptions are in place.
    Connected,
    /// The broker refused this client (version, uid, id); not retrying.
    Refused,
    /// `close` was called.
    Closed,
}

/// Errors of client calls.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The client was closed (or its thread is gone).
    #[error("bus client is closed")]
    Closed,
    /// Disconnected, and the outbox for publishes made while away is full.
    #[error("bus client is disconnected and its outbox of {limit} bytes is full")]
    BufferFull {
        /// The outbox limit.
        limit: usize,
    },
    /// No answer (or no room) within the timeout.
    #[error("bus call timed out after {0:?}")]
    Timeout(Duration),
    /// A malformed topic or pattern.
    #[error(transparent)]
    BadTopic(#[from] TopicError),
    /// The broker refused the call or the client.
    #[error("broker refused: {code:?}: {message}")]
    Refused {
        /// The broker's code.
        code: ErrorCode,
        /// Its message.
        message: String,
    },
    /// The message is larger than the broker accepts (its `Welcome` said).
    #[error("message of {len} bytes exceeds the broker's maximum frame of {max} bytes")]
    TooLarge {
        /// Topic and payload bytes.
        len: usize,
        /// The broker's maximum frame body.
        max: u32,
    },
    /// The connection dropped before the call was confirmed.
    #[error("connection to the broker dropped before the call was confirmed")]
    Disconnected,
    /// The reactor thread could not start.
    #[error("bus client could not start: {0}")]
    Start(String),
    /// Nobody subscribes to the request's topic (the broker said so at
    /// once).
    #[error("no subscriber for {topic}")]
    NoResponders {
        /// The request's topic.
        topic: String,
    },
    /// The subscriber the request was delivered to disconnected without
    /// answering (the broker said so).
    #[error("{responder} disconnected before answering")]
    ResponderGone {
        /// Its client id.
        responder: String,
    },
}

enum Cmd {
    Publish {
        topic: String,
        payload: Vec<u8>,
        reply_to: Option<String>,
        confirm: Option<Sender<Result<(), ClientError>>>,
    },
    Subscribe {
        sid: u64,
        pattern: String,
        group: Option<(String, Strategy)>,
        overflow: Overflow,
        tx: Sender<Message>,
    },
    Unsubscribe {
        sid: u64,
    },
    /// A `Ping` whose `Pong` answers `confirm`.
    Sync {
        confirm: Sender<Result<(), ClientError>>,
    },
    Request {
        topic: String,
        payload: Vec<u8>,
        timeout: Duration,
        strategy: Option<Strategy>,
        reply: Sender<Result<Message, ClientError>>,
        /// Keep taking replies until the timeout (`request_all`).
        many: bool,
    },
    Close,
}

struct Shared {
    state: Mutex<ConnectionState>,
    changed: Condvar,
    next_sid: AtomicU64,
    outbox_bytes: AtomicUsize,
    /// Deliveries dropped because a subscription's channel was full.
    dropped: AtomicU64,
    /// Times the broker welcomed this client (1 after the first connect).
    connects: AtomicU64,
    /// The broker's maximum frame body, from its last `Welcome`.
    max_frame: AtomicU32,
    /// The largest frame the broker may send (its `WelcomeAs`).
    max_deliver: AtomicU32,
    /// The client's id on the bus (the broker's `WelcomeAs`).
    id: Mutex<String>,
    /// Set by `close`/drop: the reactor stops even if its command queue is
    /// not being drained.
    closing: AtomicBool,
}

impl Shared {
    fn set(&self, s: ConnectionState) {
        let mut st = self.state.lock();
        // Refused and Closed are final.
        if *st != s && *st != ConnectionState::Closed && *st != ConnectionState::Refused {
            *st = s;
            self.changed.notify_all();
        }
    }
}

/// A subscription: messages arrive on `messages`. Dropping it
/// unsubscribes.
pub struct Subscription {
    sid: u64,
    rx: Receiver<Message>,
    cmds: Sender<Cmd>,
    waker: Arc<Waker>,
}

impl Subscription {
    /// The bounded channel of delivered messages.
    pub fn messages(&self) -> &Receiver<Message> {
        &self.rx
    }

    /// Waits for the next message up to `timeout`.
    pub fn recv_timeout(&self, timeout: Duration) -> Option<Message> {
        self.rx.recv_timeout(timeout).ok()
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if self.cmds.try_send(Cmd::Unsubscribe { sid: self.sid }).is_ok() {
            let _ = self.waker.wake();
        }
    }
}

/// A connection to the bus. Every method takes `&self`; share it by
/// reference or `Arc`. Dropping it closes the connection and joins the
/// reactor thread.
pub struct Client {
    shared: Arc<Shared>,
    // Field order: the command sender goes before the thread is joined.
    cmds: Sender<Cmd>,
    waker: Arc<Waker>,
    cfg: ClientConfig,
    thread: Option<JoinHandle<()>>,
}

impl Client {
    /// Starts the client; it connects in the background and keeps
    /// reconnecting. Use [`Client::wait_connected`] to wait for the broker.
    pub fn connect(cfg: ClientConfig) -> Result<Client, ClientError> {
        if cfg.client_id.contains('.') {
            return Err(TopicError::BadChar { topic: cfg.client_id.clone(), ch: '.' }.into());
        }
        topic::validate_topic(&cfg.client_id)?;
        let poll = Poll::new().map_err(|e| ClientError::Start(e.to_string()))?;
        let waker =
            Arc::new(Waker::new(poll.registry(), WAKER).map_err(|e| ClientError::Start(e.to_string()))?);
        let (cmds, rx) = bounded(1024);
        let shared = Arc::new(Shared {
            state: Mutex::new(ConnectionState::Disconnected),
            changed: Condvar::new(),
            next_sid: AtomicU64::new(1),
            outbox_bytes: AtomicUsize::new(0),
            dropped: AtomicU64::new(0),
            connects: AtomicU64::new(0),
            max_frame: AtomicU32::new(frame::DEFAULT_MAX_FRAME),
            max_deliver: AtomicU32::new(frame::DEFAULT_MAX_FRAME),
            id: Mutex::new(cfg.client_id.clone()),
            closing: AtomicBool::new(false),
        });
        let mut reactor = ClientReactor {
            poll,
            cmds: rx,
            shared: shared.clone(),
            stream: None,
            id: cfg.client_id.clone(),
            welcomed: false,
            rbuf: Vec::new(),
            rlen: 0,
            pending_read: false,
            wbuf: Vec::new(),
            wpos: 0,
            subs: HashMap::new(),
            outbox: VecDeque::new(),
            acks: VecDeque::new(),
            next_ack: 1,
            requests: HashMap::new(),
            next_req: 1,
            inbox_keys: std::collections::hash_map::RandomState::new(),
            backoff: cfg.backoff_min,
            next_attempt: Instant::now(),
            rng: 0x9e37_79b9_7f4a_7c15 ^ u64::from(std::process::id()) ^ (cfg.client_id.len() as u64) << 32,
            cfg: cfg.clone(),
            closing: false,
        };
        let thread = std::thread::Builder::new()
            .name(format!("bus-client-{}", cfg.client_id))
            .spawn(move || reactor.run())
            .map_err(|e| ClientError::Start(e.to_string()))?;
        Ok(Client { shared, cmds, waker, cfg, thread: Some(thread) })
    }

    /// This client's id on the bus: the one the broker's last `WelcomeAs`
    /// gave (an id the broker assigned, `bus-<n>-<asked>`, unless this
    /// process proved the id it asked for), the asked one before.
    pub fn id(&self) -> String {
        self.shared.id.lock().clone()
    }

    /// Whether the client's reactor thread has ended (it panicked, or
    /// the client was closed): the host's watchdog asks.
    pub fn thread_ended(&self) -> bool {
        self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// The connection state now.
    pub fn state(&self) -> ConnectionState {
        *self.shared.state.lock()
    }

    /// Waits until connected (true) or `timeout` passes (false).
    pub fn wait_connected(&self, timeout: Duration) -> bool {
        self.wait_state(timeout, |s| s == ConnectionState::Connected)
    }

    /// Waits until the state satisfies `pred`, up to `timeout`.
    pub fn wait_state(&self, timeout: Duration, pred: impl Fn(ConnectionState) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.state.lock();
        while !pred(*st) {
            if self.shared.changed.wait_until(&mut st, deadline).timed_out() {
                return pred(*st);
            }
        }
        true
    }

    /// How many times the broker has welcomed this client: 1 after the
    /// first connection, one more per reconnect. Unlike `state`, a quick
    /// disconnect and reconnect cannot be missed.
    pub fn connections(&self) -> u64 {
        self.shared.connects.load(Ordering::Acquire)
    }

    /// Messages dropped so far because a subscription's channel was full.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    fn send(&self, cmd: Cmd) -> Result<(), ClientError> {
        match self.cmds.send_timeout(cmd, self.cfg.timeout) {
            Ok(()) => {
                let _ = self.waker.wake();
                Ok(())
            }
            Err(crossbeam_channel::SendTimeoutError::Timeout(_)) => {
                log::warn!(
                    "bus client {}: command queue full for {:?}",
                    self.cfg.client_id,
                    self.cfg.timeout
                );
                Err(ClientError::Timeout(self.cfg.timeout))
            }
            Err(crossbeam_channel::SendTimeoutError::Disconnected(_)) => Err(ClientError::Closed),
        }
    }

    /// Refuses a message the broker's maximum frame cannot hold.
    fn check_size(&self, bytes: usize) -> Result<(), ClientError> {
        // Room for the frame's own fields (kind, lengths, options).
        let max = self.shared.max_frame.load(Ordering::Acquire);
        if bytes + 64 > max as usize {
            return Err(ClientError::TooLarge { len: bytes, max });
        }
        Ok(())
    }

    fn check_open(&self, bytes: usize) -> Result<(), ClientError> {
        self.check_size(bytes)?;
        match self.state() {
            ConnectionState::Closed | ConnectionState::Refused => Err(ClientError::Closed),
            ConnectionState::Disconnected
                if self.shared.outbox_bytes.load(Ordering::Acquire) + bytes > self.cfg.outbox_limit_bytes =>
            {
                Err(ClientError::BufferFull { limit: self.cfg.outbox_limit_bytes })
            }
            _ => Ok(()),
        }
    }

    /// Publishes a message. While disconnected it waits in the outbox.
    pub fn publish(&self, topic: &str, payload: &[u8]) -> Result<(), ClientError> {
        topic::validate_topic(topic)?;
        self.check_open(payload.len() + topic.len())?;
        self.send(Cmd::Publish {
            topic: topic.to_owned(),
            payload: payload.to_vec(),
            reply_to: None,
            confirm: None,
        })
    }

    /// Publishes and waits for the broker's `PubAck` (routed, not stored).
    /// A refusal (`Forbidden`, `BadTopic`) comes back as `Refused` at once;
    /// `Disconnected` means it was not sent, or not confirmed before the
    /// connection dropped.
    pub fn publish_confirmed(&self, topic: &str, payload: &[u8]) -> Result<(), ClientError> {
        topic::validate_topic(topic)?;
        self.check_open(payload.len() + topic.len())?;
        // Never queued while away: a confirmation is only worth waiting
        // for on a live connection, and an error must mean "not sent".
        if self.state() != ConnectionState::Connected {
            return Err(ClientError::Disconnected);
        }
        let (tx, rx) = bounded(1);
        self.send(Cmd::Publish {
            topic: topic.to_owned(),
            payload: payload.to_vec(),
            reply_to: None,
            confirm: Some(tx),
        })?;
        rx.recv_timeout(self.cfg.timeout).map_err(|_| ClientError::Timeout(self.cfg.timeout))?
    }

    /// Waits until the broker has answered a ping: everything the broker
    /// sent this client before it (deliveries of earlier publishes and
    /// requests) has then been handed to the subscriptions. A barrier for
    /// a responder that stops: after it, what is in its subscriptions is
    /// all that was routed to it. `Disconnected` on no live connection.
    pub fn sync(&self) -> Result<(), ClientError> {
        if self.state() != ConnectionState::Connected {
            return Err(ClientError::Disconnected);
        }
        let (tx, rx) = bounded(1);
        self.send(Cmd::Sync { confirm: tx })?;
        rx.recv_timeout(self.cfg.timeout).map_err(|_| ClientError::Timeout(self.cfg.timeout))?
    }

    /// Answers a request message on its `reply_to` topic.
    pub fn reply(&self, request: &Message, payload: &[u8]) -> Result<(), ClientError> {
        match &request.reply_to {
            Some(to) => self.publish(to, payload),
            None => Err(ClientError::Refused {
                code: ErrorCode::BadTopic,
                message: "message has no reply_to".into(),
            }),
        }
    }

    /// Sends a request and waits for its reply up to `timeout`.
    pub fn request(&self, topic: &str, payload: &[u8], timeout: Duration) -> Result<Message, ClientError> {
        self.request_with(topic, payload, timeout, None)
    }

    /// Sends a request and waits for its reply up to `timeout`; a queue
    /// group picks the member by `strategy` (`None`: the group's own).
    /// Fails at once with `NoResponders` when nobody subscribes to the
    /// topic, with `Refused` when the broker refuses it (permissions, an
    /// inbox as the topic), and with `ResponderGone` when the subscriber
    /// that got it (the last of them, if several did) disconnects before
    /// answering.
    pub fn request_with(
        &self,
        topic: &str,
        payload: &[u8],
        timeout: Duration,
        strategy: Option<Strategy>,
    ) -> Result<Message, ClientError> {
        let rx = self.send_request(topic, payload, timeout, strategy, false)?;
        match rx.recv_timeout(timeout + Duration::from_millis(100)) {
            // The reactor expires requests without knowing their timeout.
            Ok(Err(ClientError::Timeout(_))) | Err(_) => Err(ClientError::Timeout(timeout)),
            Ok(r) => r,
        }
    }

    /// Sends a request that every subscriber may answer: the channel gets
    /// each responder's first reply as it comes (later ones from the same
    /// responder are dropped), `ResponderGone` for each subscriber that got
    /// the request and disconnected without answering, `NoResponders` if
    /// nobody subscribes, and is closed `window` after the call (or at
    /// once after `NoResponders`). The caller decides when it has enough.
    pub fn request_all(
        &self,
        topic: &str,
        payload: &[u8],
        window: Duration,
    ) -> Result<Receiver<Result<Message, ClientError>>, ClientError> {
        self.send_request(topic, payload, window, None, true)
    }

    fn send_request(
        &self,
        topic: &str,
        payload: &[u8],
        timeout: Duration,
        strategy: Option<Strategy>,
        many: bool,
    ) -> Result<Receiver<Result<Message, ClientError>>, ClientError> {
        topic::validate_topic(topic)?;
        // The reply inbox travels too.
        self.check_size(payload.len() + topic.len() + self.cfg.client_id.len() + 32)?;
        if self.state() != ConnectionState::Connected {
            return Err(ClientError::Disconnected);
        }
        let (tx, rx) = if many { bounded(MAX_REPLIES) } else { bounded(1) };
        let payload = payload.to_vec();
        self.send(Cmd::Request { topic: topic.to_owned(), payload, timeout, strategy, reply: tx, many })?;
        Ok(rx)
    }

    /// Asks the broker for its counters (see [`crate::broker::STATS_TOPIC`]).
    pub fn broker_stats(&self, timeout: Duration) -> Result<crate::broker::BrokerStats, ClientError> {
        let reply = self.request(crate::broker::STATS_TOPIC, b"", timeout)?;
        postcard::from_bytes(&reply.payload).map_err(|e| ClientError::Refused {
            code: ErrorCode::Protocol,
            message: format!("bad stats reply: {e}"),
        })
    }

    /// Subscribes to a pattern (broadcast): every matching message.
    pub fn subscribe(&self, pattern: &str) -> Result<Subscription, ClientError> {
        self.subscribe_with(pattern, None, Overflow::Block)
    }

    /// Joins a queue group: one member of the group gets each message.
    pub fn queue_subscribe(
        &self,
        pattern: &str,
        group: &str,
        strategy: Strategy,
    ) -> Result<Subscription, ClientError> {
        topic::validate_topic(group)?;
        self.subscribe_with(pattern, Some((group.to_owned(), strategy)), Overflow::Block)
    }

    /// Subscribes with a chosen group and broker-side overflow strategy.
    pub fn subscribe_with(
        &self,
        pattern: &str,
        group: Option<(String, Strategy)>,
        overflow: Overflow,
    ) -> Result<Subscription, ClientError> {
        topic::validate_pattern(pattern)?;
        let sid = self.shared.next_sid.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = bounded(self.cfg.subscription_capacity);
        self.send(Cmd::Subscribe { sid, pattern: pattern.to_owned(), group, overflow, tx })?;
        Ok(Subscription { sid, rx, cmds: self.cmds.clone(), waker: self.waker.clone() })
    }

    /// Closes the connection (after flushing what it can) and joins the
    /// reactor thread.
    pub fn close(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.shared.closing.store(true, Ordering::Release);
        let _ = self.cmds.try_send(Cmd::Close);
        let _ = self.waker.wake();
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            log::error!("bus client {}: reactor thread panicked", self.cfg.client_id);
        }
        self.shared.set(ConnectionState::Closed);
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A request waiting for its replies.
struct Pending {
    /// Where replies (and `NoReply` news) go.
    reply: Sender<Result<Message, ClientError>>,
    deadline: Instant,
    /// The token of its inbox topic.
    token: u64,
    topic: String,
    /// Replies are taken until the deadline, not just the first.
    many: bool,
    /// `many`: who has answered (one answer per responder is handed over).
    answered: HashSet<String>,
}

struct SubEntry {
    pattern: String,
    group: Option<(String, Strategy)>,
    overflow: Overflow,
    tx: Sender<Message>,
    /// Block only: deliveries waiting for room in `tx`, oldest first.
    parked: VecDeque<Message>,
}

struct ClientReactor {
    poll: Poll,
    cmds: Receiver<Cmd>,
    shared: Arc<Shared>,
    stream: Option<UnixStream>,
    /// The id the broker welcomed this client as (asked for, until then).
    id: String,
    welcomed: bool,
    /// Read buffer; bytes `..rlen` are data.
    rbuf: Vec<u8>,
    rlen: usize,
    /// Unread data may remain (a full Block subscription, or the cap).
    pending_read: bool,
    wbuf: Vec<u8>,
    wpos: usize,
    subs: HashMap<u64, SubEntry>,
    /// Encoded publishes made while away.
    outbox: VecDeque<Vec<u8>>,
    /// Confirmations awaited (publishes' `PubAck`s and syncs' `Pong`s,
    /// numbered from one counter), in the order they were sent; the
    /// broker answers in that order.
    acks: VecDeque<(u64, Sender<Result<(), ClientError>>)>,
    next_ack: u64,
    /// Pending requests by number: the reply channel, the deadline and the
    /// inbox token.
    requests: HashMap<u64, Pending>,
    next_req: u64,
    /// Keys (from the OS's randomness, via std's `RandomState`) that make
    /// each request's inbox topic unguessable: a reply can be sent only by
    /// whoever saw the request.
    inbox_keys: std::collections::hash_map::RandomState,
    backoff: Duration,
    next_attempt: Instant,
    rng: u64,
    cfg: ClientConfig,
    closing: bool,
}

impl ClientReactor {
    fn run(&mut self) {
        let mut events = Events::with_capacity(64);
        loop {
            let now = Instant::now();
            let mut timeout = Duration::from_secs(1);
            if self.stream.is_none() {
                timeout = timeout.min(self.next_attempt.saturating_duration_since(now));
            }
            if let Some(d) = self.requests.values().map(|r| r.deadline).min() {
                timeout = timeout.min(d.saturating_duration_since(now));
            }
            if self.pending_read {
                // Waiting for the application to make room: look again soon.
                timeout = timeout.min(Duration::from_millis(1));
            }
            if let Err(e) = self.poll.poll(&mut events, Some(timeout))
                && e.kind() != io::ErrorKind::Interrupted
            {
                log::error!("bus client {}: poll failed: {e}", self.cfg.client_id);
                break;
            }
            let mut readable = false;
            for ev in events.iter() {
                if ev.token() == STREAM {
                    readable |= ev.is_readable() || ev.is_read_closed() || ev.is_error();
                }
            }
            if readable || self.pending_read {
                self.read();
            }
            if self.shared.closing.load(Ordering::Acquire) {
                self.closing = true;
            }
            self.take_commands();
            if self.closing {
                self.flush();
                break;
            }
            if self.stream.is_none() && Instant::now() >= self.next_attempt {
                self.try_connect();
            }
            self.expire_requests();
            self.flush();
        }
        self.fail_pending(ClientError::Closed);
        self.shared.set(ConnectionState::Closed);
    }

    fn random(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    fn try_connect(&mut self) {
        match std::os::unix::net::UnixStream::connect(&self.cfg.socket).and_then(|s| {
            s.set_nonblocking(true)?;
            Ok(s)
        }) {
            Ok(std_stream) => {
                // Who serves the socket, from the kernel: an unexpected
                // uid gets no Hello (and none of our publishes).
                match daemoneye_platform::peer_credentials(&std_stream) {
                    Ok(c) if self.cfg.server_uids.contains(&c.uid) => {}
                    Ok(c) => {
                        log::error!(
                            "bus client {}: {} is served by uid {}, not by {:?}; not connecting",
                            self.cfg.client_id,
                            self.cfg.socket.display(),
                            c.uid,
                            self.cfg.server_uids
                        );
                        return self.schedule_retry();
                    }
                    Err(e) => {
                        log::error!(
                            "bus client {}: cannot read the broker's credentials: {e}",
                            self.cfg.client_id
                        );
                        return self.schedule_retry();
                    }
                }
                let mut s = UnixStream::from_std(std_stream);
                if let Err(e) =
                    self.poll.registry().register(&mut s, STREAM, Interest::READABLE | Interest::WRITABLE)
                {
                    log::error!("bus client {}: register: {e}", self.cfg.client_id);
                    return self.schedule_retry();
                }
                self.stream = Some(s);
                self.welcomed = false;
                self.rlen = 0;
                self.wbuf.clear();
                self.wpos = 0;
                let hello = Frame::Hello {
                    protocol_version: PROTOCOL_VERSION,
                    client_id: &self.cfg.client_id,
                    pid: std::process::id(),
                };
                let _ = frame::encode(&hello, &mut self.wbuf, u32::MAX);
            }
            Err(e) => {
                log::debug!("bus client {}: connect {}: {e}", self.cfg.client_id, self.cfg.socket.display());
                self.schedule_retry();
            }
        }
    }

    /// Exponential backoff with full jitter: wait a random time in
    /// [0, backoff), then double the backoff up to its maximum.
    fn schedule_retry(&mut self) {
        let ceiling = self.backoff.as_micros().max(1) as u64;
        let wait = Duration::from_micros(self.random() % ceiling);
        self.next_attempt = Instant::now() + wait;
        self.backoff = (self.backoff * 2).min(self.cfg.backoff_max);
    }

    fn disconnected(&mut self, why: &str) {
        if let Some(mut s) = self.stream.take() {
            let _ = self.poll.registry().deregister(&mut s);
            log::warn!("bus client {}: disconnected ({why}); reconnecting", self.cfg.client_id);
        }
        self.welcomed = false;
        self.wbuf.clear();
        self.wpos = 0;
        // What was written but not acknowledged cannot be confirmed now.
        for (_, tx) in self.acks.drain(..) {
            let _ = tx.send(Err(ClientError::Disconnected));
        }
        for (_, p) in self.requests.drain() {
            let _ = p.reply.try_send(Err(ClientError::Disconnected));
        }
        self.shared.set(ConnectionState::Disconnected);
        self.schedule_retry();
    }

    fn take_commands(&mut self) {
        // Stop taking publishes while the socket is backed up: the handle's
        // bounded channel then fills and `publish` waits (backpressure).
        while self.wbuf.len() - self.wpos < self.cfg.write_limit_bytes {
            let Ok(cmd) = self.cmds.try_recv() else { break };
            self.command(cmd);
            if self.closing {
                break;
            }
        }
    }

    fn command(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Publish { topic, payload, reply_to, confirm } => {
                let ack_id = confirm.as_ref().map(|_| {
                    self.next_ack += 1;
                    self.next_ack
                });
                let f = Frame::Publish {
                    topic: &topic,
                    payload: &payload,
                    reply_to: reply_to.as_deref(),
                    ack_id,
                };
                if self.welcomed {
                    if let (Some(id), Some(tx)) = (ack_id, confirm) {
                        self.acks.push_back((id, tx));
                    }
                    let _ = frame::encode(&f, &mut self.wbuf, u32::MAX);
                } else {
                    if let Some(tx) = confirm {
                        // Not sent: the caller hears so and may retry.
                        let _ = tx.send(Err(ClientError::Disconnected));
                        return;
                    }
                    let mut buf = Vec::new();
                    let away = Frame::Publish {
                        topic: &topic,
                        payload: &payload,
                        reply_to: reply_to.as_deref(),
                        ack_id: None,
                    };
                    let _ = frame::encode(&away, &mut buf, u32::MAX);
                    self.shared.outbox_bytes.fetch_add(buf.len(), Ordering::AcqRel);
                    self.outbox.push_back(buf);
                }
            }
            Cmd::Subscribe { sid, pattern, group, overflow, tx } => {
                let entry = SubEntry { pattern, group, overflow, tx, parked: VecDeque::new() };
                if self.welcomed {
                    self.send_subscribe(sid, &entry);
                }
                self.subs.insert(sid, entry);
            }
            Cmd::Unsubscribe { sid } => {
                if self.subs.remove(&sid).is_some() && self.welcomed {
                    let _ = frame::encode(&Frame::Unsubscribe { sid }, &mut self.wbuf, u32::MAX);
                }
            }
            Cmd::Sync { confirm } => {
                if !self.welcomed {
                    let _ = confirm.send(Err(ClientError::Disconnected));
                    return;
                }
                self.next_ack += 1;
                self.acks.push_back((self.next_ack, confirm));
                let _ = frame::encode(&Frame::Ping(self.next_ack), &mut self.wbuf, u32::MAX);
            }
            Cmd::Request { topic, payload, timeout, strategy, reply, many } => {
                if !self.welcomed {
                    let _ = reply.send(Err(ClientError::Disconnected));
                    return;
                }
                let n = self.next_req;
                self.next_req += 1;
                let token = std::hash::BuildHasher::hash_one(&self.inbox_keys, n);
                let inbox = format!("direct.{}.r{n}x{token:016x}", self.id);
                let f = Frame::Request { topic: &topic, payload: &payload, reply_to: &inbox, strategy };
                let _ = frame::encode(&f, &mut self.wbuf, u32::MAX);
                let deadline = Instant::now() + timeout;
                let answered = HashSet::new();
                self.requests.insert(n, Pending { reply, deadline, token, topic, many, answered });
            }
            Cmd::Close => self.closing = true,
        }
    }

    fn send_subscribe(&mut self, sid: u64, e: &SubEntry) {
        let mode = match &e.group {
            None => Mode::Broadcast,
            Some((g, strategy)) => Mode::Queue { group: g, strategy: *strategy },
        };
        let _ = frame::encode(
            &Frame::Subscribe { sid, pattern: &e.pattern, mode, overflow: e.overflow },
            &mut self.wbuf,
            u32::MAX,
        );
    }

    /// Reads and handles what the broker sent. Stops early, leaving the
    /// rest in the kernel (and so pushing back on the broker), when a
    /// `Block` subscription's channel is full or the read buffer is at its
    /// cap; `pending_read` then makes the loop come back soon.
    fn read(&mut self) {
        self.pending_read = false;
        let parked_full = self.unpark();
        let mut closed = None;
        let cap = READ_CAP.max(self.shared.max_deliver.load(Ordering::Acquire) as usize + 4 + READ_CHUNK);
        if parked_full || !self.process_rbuf(&mut closed) {
            self.pending_read = true;
        } else if let Some(s) = self.stream.as_mut() {
            loop {
                if self.rlen >= cap {
                    self.pending_read = true;
                    break;
                }
                if self.rbuf.len() < self.rlen + READ_CHUNK {
                    self.rbuf.resize(self.rlen + READ_CHUNK, 0);
                }
                match s.read(&mut self.rbuf[self.rlen..]) {
                    Ok(0) => {
                        closed = Some("broker closed the connection".to_owned());
                        break;
                    }
                    Ok(n) => self.rlen += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        closed = Some(e.to_string());
                        break;
                    }
                }
            }
            if !self.process_rbuf(&mut closed) {
                self.pending_read = true;
            }
        }
        if self.subs.values().any(|e| !e.parked.is_empty()) {
            // Come back soon to hand parked deliveries over.
            self.pending_read = true;
        }
        if let Some(why) = closed {
            self.disconnected(&why);
        }
    }

    /// Hands parked deliveries to their channels as room appears; true when
    /// some Block subscription is still at its parking limit.
    fn unpark(&mut self) -> bool {
        let mut full = false;
        for e in self.subs.values_mut() {
            while let Some(m) = e.parked.pop_front() {
                match e.tx.try_send(m) {
                    Ok(()) => {}
                    Err(TrySendError::Full(m)) => {
                        e.parked.push_front(m);
                        break;
                    }
                    // The Subscription was dropped: nobody wants these.
                    Err(TrySendError::Disconnected(_)) => e.parked.clear(),
                }
            }
            full |= e.parked.len() >= PARK_LIMIT;
        }
        full
    }

    /// Handles the whole frames in the read buffer; false when it stopped
    /// because a `Block` subscription reached its parking limit.
    fn process_rbuf(&mut self, closed: &mut Option<String>) -> bool {
        let rbuf = std::mem::take(&mut self.rbuf);
        let max = self.shared.max_deliver.load(Ordering::Acquire);
        let mut used = 0;
        let mut all = true;
        loop {
            match frame::decode(&rbuf[used..self.rlen], max) {
                Ok(Some((f, n))) => {
                    let sid = if let Frame::Deliver { sid, .. } = f { Some(sid) } else { None };
                    used += n;
                    self.handle(f);
                    if sid.and_then(|s| self.subs.get(&s)).is_some_and(|e| e.parked.len() >= PARK_LIMIT) {
                        all = false;
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    *closed = Some(format!("bad frame from broker: {e}"));
                    used = self.rlen;
                    break;
                }
            }
        }
        self.rbuf = rbuf;
        self.rbuf.copy_within(used..self.rlen, 0);
        self.rlen -= used;
        all
    }

    fn handle(&mut self, f: Frame<'_>) {
        match f {
            Frame::WelcomeAs { max_frame, max_deliver, client_id, .. } => {
                self.welcomed = true;
                self.shared.max_frame.store(max_frame, Ordering::Release);
                self.shared.max_deliver.store(max_deliver.max(max_frame), Ordering::Release);
                if client_id != self.cfg.client_id {
                    log::info!(
                        "bus client {}: the broker knows this client as {client_id}",
                        self.cfg.client_id
                    );
                }
                self.id = client_id.to_owned();
                *self.shared.id.lock() = client_id.to_owned();
                self.backoff = self.cfg.backoff_min;
                let inbox = format!("direct.{}.#", self.id);
                let _ = frame::encode(
                    &Frame::Subscribe {
                        sid: INBOX_SID,
                        pattern: &inbox,
                        mode: Mode::Broadcast,
                        overflow: Overflow::Block,
                    },
                    &mut self.wbuf,
                    u32::MAX,
                );
                let sids: Vec<u64> = self.subs.keys().copied().collect();
                for sid in sids {
                    if let Some(e) = self.subs.remove(&sid) {
                        self.send_subscribe(sid, &e);
                        self.subs.insert(sid, e);
                    }
                }
                for buf in self.outbox.drain(..) {
                    self.shared.outbox_bytes.fetch_sub(buf.len(), Ordering::AcqRel);
                    self.wbuf.extend_from_slice(&buf);
                }
                log::info!("bus client {}: connected to {}", self.cfg.client_id, self.cfg.socket.display());
                self.shared.connects.fetch_add(1, Ordering::AcqRel);
                self.shared.set(ConnectionState::Connected);
            }
            Frame::Deliver { sid: INBOX_SID, topic, payload, reply_to, from } => {
                let Some(n) = self.pending_for(topic, from) else { return };
                // A `request_all` hands over one answer per responder: a
                // responder that floods the inbox costs it nothing more.
                if let Some(p) = self.requests.get_mut(&n)
                    && p.many
                    && !p.answered.insert(from.to_owned())
                {
                    log::debug!("bus client {}: a second answer from {from} dropped", self.cfg.client_id);
                    return;
                }
                let msg = Message {
                    topic: topic.to_owned(),
                    payload: payload.to_vec(),
                    reply_to: reply_to.map(str::to_owned),
                    from: from.to_owned(),
                };
                self.answer(n, Ok(msg), false);
            }
            Frame::NoReply { reply_to, reason, responder } => {
                let Some(n) = self.pending_for(reply_to, "bus") else { return };
                let many = self.requests.get(&n).is_some_and(|p| p.many);
                let e = match reason {
                    NoReplyReason::NoResponders => {
                        let topic = self.requests.get(&n).map(|p| p.topic.clone()).unwrap_or_default();
                        ClientError::NoResponders { topic }
                    }
                    // A `request_all` hears of every departure; a request
                    // fails only when nobody that got it is left.
                    NoReplyReason::ResponderLeft if !many => return,
                    NoReplyReason::ResponderGone | NoReplyReason::ResponderLeft => {
                        ClientError::ResponderGone { responder: responder.to_owned() }
                    }
                    NoReplyReason::Refused => {
                        let topic = self.requests.get(&n).map(|p| p.topic.clone()).unwrap_or_default();
                        let message = format!("request on {topic} refused (see the broker's error)");
                        ClientError::Refused { code: ErrorCode::Forbidden, message }
                    }
                };
                let last = !matches!(reason, NoReplyReason::ResponderGone | NoReplyReason::ResponderLeft);
                self.answer(n, Err(e), last);
            }
            Frame::Deliver { sid, topic, payload, reply_to, from } => {
                let Some(e) = self.subs.get_mut(&sid) else { return };
                let msg = Message {
                    topic: topic.to_owned(),
                    payload: payload.to_vec(),
                    reply_to: reply_to.map(str::to_owned),
                    from: from.to_owned(),
                };
                if e.overflow == Overflow::Block {
                    // Never dropped: parked behind earlier ones if the
                    // channel is full (and reading stops at the limit).
                    if !e.parked.is_empty() {
                        e.parked.push_back(msg);
                    } else if let Err(TrySendError::Full(m)) = e.tx.try_send(msg) {
                        e.parked.push_back(m);
                    }
                    return;
                }
                match e.tx.try_send(msg) {
                    Ok(()) => {}
                    Err(TrySendError::Full(_)) => {
                        self.shared.dropped.fetch_add(1, Ordering::Relaxed);
                        log::warn!(
                            "bus client {}: subscription {sid} is full, message dropped",
                            self.cfg.client_id
                        );
                    }
                    // The subscription was dropped; its Unsubscribe is on the way.
                    Err(TrySendError::Disconnected(_)) => {}
                }
            }
            Frame::PubAck { ack_id } | Frame::Pong(ack_id) => {
                while let Some((id, tx)) = self.acks.pop_front() {
                    if id == ack_id {
                        let _ = tx.send(Ok(()));
                        break;
                    }
                    let _ = tx.send(Err(ClientError::Disconnected));
                }
            }
            Frame::Error { code, message, ack_id } => {
                log::warn!("bus client {}: broker error {code:?}: {message}", self.cfg.client_id);
                if let Some(id) = ack_id
                    && let Some(pos) = self.acks.iter().position(|(a, _)| *a == id)
                    && let Some((_, tx)) = self.acks.remove(pos)
                {
                    let _ = tx.send(Err(ClientError::Refused { code, message: message.to_owned() }));
                }
                if !self.welcomed
                    && matches!(code, ErrorCode::Forbidden | ErrorCode::Version | ErrorCode::BadTopic)
                {
                    log::error!("bus client {}: refused by the broker: {message}", self.cfg.client_id);
                    self.shared.set(ConnectionState::Refused);
                    self.closing = true;
                }
            }
            Frame::Ping(n) => {
                let _ = frame::encode(&Frame::Pong(n), &mut self.wbuf, u32::MAX);
            }
            _ => {}
        }
    }

    fn flush(&mut self) {
        let Some(s) = self.stream.as_mut() else { return };
        let mut failed = None;
        while self.wpos < self.wbuf.len() {
            match s.write(&self.wbuf[self.wpos..]) {
                Ok(0) => {
                    failed = Some("write returned 0".to_owned());
                    break;
                }
                Ok(n) => self.wpos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    failed = Some(e.to_string());
                    break;
                }
            }
        }
        if self.wpos == self.wbuf.len() {
            self.wbuf.clear();
            self.wpos = 0;
        }
        if let Some(why) = failed {
            self.disconnected(&why);
        }
    }

    /// The pending request an inbox topic `...r<n>x<token>` belongs to. A
    /// reply whose token does not match its request (a guess) is dropped,
    /// and the request still waits.
    fn pending_for(&self, topic: &str, from: &str) -> Option<u64> {
        let parsed = topic
            .rsplit('.')
            .next()
            .and_then(|t| t.strip_prefix('r'))
            .and_then(|t| t.split_once('x'))
            .and_then(|(n, tok)| Some((n.parse::<u64>().ok()?, u64::from_str_radix(tok, 16).ok()?)));
        let matching = parsed.filter(|(n, tok)| self.requests.get(n).is_some_and(|r| r.token == *tok));
        if parsed.is_some() && matching.is_none() {
            log::debug!(
                "bus client {}: dropped a reply from {from} to an unknown or finished request {topic}",
                self.cfg.client_id
            );
        }
        matching.map(|(n, _)| n)
    }

    /// Hands a reply (or news of one that will not come) to request `n`; a
    /// single request ends with it, a `request_all` only when `last`.
    fn answer(&mut self, n: u64, r: Result<Message, ClientError>, last: bool) {
        let Some(p) = self.requests.get(&n) else { return };
        if !p.many || last {
            if let Some(p) = self.requests.remove(&n) {
                let _ = p.reply.try_send(r);
            }
            return;
        }
        if p.reply.try_send(r).is_err() {
            log::warn!(
                "bus client {}: more than {MAX_REPLIES} replies to one request, or nobody reading; dropped",
                self.cfg.client_id
            );
        }
    }

    fn expire_requests(&mut self) {
        let now = Instant::now();
        let expired: Vec<u64> =
            self.requests.iter().filter(|(_, r)| r.deadline <= now).map(|(n, _)| *n).collect();
        for n in expired {
            if let Some(p) = self.requests.remove(&n)
                && !p.many
            {
                // A `request_all` ends by its channel closing.
                let _ = p.reply.try_send(Err(ClientError::Timeout(Duration::ZERO)));
            }
        }
    }

    fn fail_pending(&mut self, e: ClientError) {
        for (_, tx) in self.acks.drain(..) {
            let _ = tx.send(Err(e.clone()));
        }
        for (_, p) in self.requests.drain() {
            let _ = p.reply.try_send(Err(e.clone()));
        }
    }
}
