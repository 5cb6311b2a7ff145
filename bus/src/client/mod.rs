//! The blocking client: a handle whose methods block at most until their
//! timeout, over a reactor thread (`bus-client`) that owns the socket.
//!
//! The reactor connects, says `Hello`, and after `Welcome` subscribes
//! everything the handle asked for (again after every reconnect). When the
//! connection drops it reconnects with exponential backoff and full jitter
//! (a fleet of collectors must not stampede a restarted broker).
//!
//! Two paths lead to the socket. The fast path: the write buffer, with
//! the confirmations awaited and the requests pending, sits behind one
//! short lock shared by the handle and the reactor (`wire`); when the
//! connection is live (welcomed, re-subscribed, the outbox handed over)
//! and no command of the handle's is queued ahead, a `publish`,
//! `publish_confirmed`, `sync` or `request` encodes its frame in place into
//! the buffer and writes it from the calling thread (non-blocking; the
//! reactor flushes the rest when the socket is writable). The reactor takes
//! commands under the same lock, so a caller that finds the channel empty
//! knows everything it sent before is already in the buffer: one caller's
//! frames stay in order across the two paths. The slow path, a command on
//! a bounded channel and a wake-up of the reactor, serves subscriptions
//! and everything while disconnected. Publishes made while away wait in a
//! bounded outbox (`BufferFull` past its limit, never unbounded memory).
//! Backpressure: past `write_limit_bytes` unwritten, a caller waits for
//! room (up to its timeout) and the reactor stops taking commands, so
//! `publish` blocks up to its timeout either way. Replies and
//! confirmations are still read by the reactor, which hands each straight
//! to the caller waiting on it.
//!
//! Before saying `Hello` the client checks that the socket is served by
//! an expected uid (the kernel's peer credentials of the listening
//! process; [`ClientConfig::server_uids`]), so a socket put in the
//! broker's place by someone else gets nothing. The broker's `WelcomeAs`
//! names the client's id on the bus, which may be one the broker assigned
//! ([`Client::id`]); the inbox and request topics use it.
//!
//! Layout: this module holds the handle ([`Client`], [`Subscription`]) and
//! its configuration and errors; `wire` the shared write side and the fast
//! path; `reactor` the thread that owns the socket's reading, connecting
//! and flushing; `requests` the requests in flight until their replies.

mod reactor;
mod requests;
mod wire;

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

use self::reactor::*;
use self::requests::*;
use self::wire::*;

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
            wire: Mutex::new(Wire::new(cfg.client_id.clone())),
            room: Condvar::new(),
            inbox_keys: std::collections::hash_map::RandomState::new(),
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
            subs: HashMap::new(),
            outbox: VecDeque::new(),
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
        if self.try_fast(Out::Publish { topic, payload, confirm: None })?.is_ok() {
            return Ok(());
        }
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
        if let Err(Out::Publish { confirm: Some(tx), .. }) =
            self.try_fast(Out::Publish { topic, payload, confirm: Some(tx) })?
        {
            self.send(Cmd::Publish {
                topic: topic.to_owned(),
                payload: payload.to_vec(),
                reply_to: None,
                confirm: Some(tx),
            })?;
        }
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
        if let Err(Out::Sync { confirm }) = self.try_fast(Out::Sync { confirm: tx })? {
            self.send(Cmd::Sync { confirm })?;
        }
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
        let r = Req { topic, payload, timeout, strategy, reply: tx, many };
        if let Err(Out::Request(r)) = self.try_fast(Out::Request(r))? {
            let Req { reply, .. } = r;
            let payload = payload.to_vec();
            self.send(Cmd::Request { topic: topic.to_owned(), payload, timeout, strategy, reply, many })?;
        }
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
