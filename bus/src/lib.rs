//! The local event bus that connects the agent and every collector. It
//! knows nothing about processes: topics and bytes.
//!
//! # Protocol (version 5)
//!
//! A Unix domain stream socket carries frames: a `u32` little-endian body
//! length, then the body, a postcard-encoded [`Frame`]. The broker's
//! maximum frame size (default 1 MiB) bounds the length prefix; a larger
//! prefix closes that one connection with a logged protocol error before
//! anything is allocated for it.
//!
//! 0. Before it says anything, the client checks who serves the socket:
//!    the kernel's credentials of the listening process must name an
//!    expected uid (`DAEMONEYE_BROKER_UID`, else the client's own, or
//!    root).
//! 1. The client's first frame is `Hello { protocol_version, client_id,
//!    pid }`. The broker answers `WelcomeAs { protocol_version, max_frame,
//!    max_deliver, client_id }` or `Error` and closes. Who the peer is
//!    comes from the socket's peer credentials (uid, gid, pid), never from
//!    the frame. Any other frame first is a protocol error.
//!    Identities (a broker configured with them): an id reserved for the
//!    broker's host is welcomed only from the host's own pid; an id
//!    reserved for a collector only from the process its supervisor
//!    vouched for (pid and start time); either, asked for by another
//!    process, gets `Error { code: Unproven }` (retried: a collector may
//!    connect a moment before it is vouched for). Any other id is replaced
//!    by one the broker assigns, `bus-<n>-<asked>`: `WelcomeAs` names it,
//!    the client's inbox is `direct.<that id>`, and deliveries name it as
//!    `from`. `max_frame` is what the broker accepts from this client
//!    (1 MiB for one it cannot prove, when so configured), `max_deliver`
//!    the largest frame it may send.
//! 2. Then, in any order: `Subscribe { sid, pattern, mode, overflow }`
//!    (broadcast or a queue group), `Unsubscribe { sid }`, `Publish { topic,
//!    payload, reply_to, ack_id }` (a `PubAck { ack_id }` follows once it is
//!    routed), `Ping`/`Pong`. The broker sends `Deliver { sid, topic,
//!    payload, reply_to, from }` (`from`: the publisher's id) for matching subscriptions and `Error { code,
//!    message }` for refusals.
//! 3. Requests are `Request { topic, payload, reply_to, strategy }` with
//!    `reply_to` a topic in the requester's inbox; the responder publishes
//!    its answer there. A `Publish` with a `reply_to` obeys the same rule
//!    (protocol 5): no client can make another answer onto a topic it may
//!    not publish to itself. Every client may subscribe to its own inbox,
//!    `direct.<client_id>` and the topics under it, and nobody else's.
//!    The broker remembers, per connection, the requests delivered to it
//!    and not answered yet: that is the load `LeastLoaded` balances on, and
//!    when that connection leaves, each of those requesters gets
//!    `NoReply { reply_to, reason: ResponderGone, responder }`, so a caller
//!    can fail over at once instead of waiting out its timeout (or
//!    `ResponderLeft` while others that got the request still hold it: a
//!    plain request then keeps waiting for them, `request_all` hears of
//!    each departure). A request
//!    nobody subscribes to gets `NoReply { reason: NoResponders }` at once,
//!    a refused one `NoReply { reason: Refused }` besides the `Error`.
//!    `strategy` overrides the queue groups' own for that request.
//!
//! 4. Limits (protocol 5, where configured): a `bus.stats` request obeys
//!    the publish permissions; `Overflow::Block` is honoured only for
//!    allowed subscribers (anyone else gets `DropOldest`, so no such
//!    subscriber pauses a publisher); connections of clients the broker
//!    cannot prove are capped in total, per uid and per pid, closed when
//!    idle, and cut over the broker's memory limit; a frame left
//!    half-sent closes its connection.
//!
//! Version 5 on the wire: `WelcomeAs` (appended) replaces `Welcome`,
//! `ErrorCode::Unproven` is appended; a broker and a client of version 4
//! refuse each other with `Error { code: Version }` (the client then
//! stays `Refused`): both sides are built and upgraded together.
//!
//! Topics: see [`topic`]. Evolution: frame kinds are postcard enum
//! variants numbered in declaration order, which is not self-describing.
//! A later version therefore appends kinds and never changes the fields of
//! an existing kind: a kind that needs new fields is replaced by a new
//! kind. `Hello` and `Welcome` carry each side's version; each side sends
//! only kinds the other's version knows, and a broker refuses versions it
//! does not speak with `Error { code: Version }`.
//!
//! Built so far: topics, the frame codec, the [`Broker`] (a mio reactor on
//! one thread, see [`broker`]) and the blocking [`Client`] (see
//! [`client`]); for tests and probes, a hand-driven connection (see
//! [`testing`]).
#![forbid(unsafe_code)]
#![deny(missing_docs)]

#[cfg(unix)]
pub mod broker;
#[cfg(unix)]
pub mod client;
pub mod frame;
#[cfg(unix)]
pub mod testing;
pub mod topic;

#[cfg(unix)]
pub use crate::broker::{
    Broker, BrokerConfig, BrokerError, BrokerStats, ClientPermissions, Identities, Permissions, QueueDepth,
    STATS_TOPIC, Vouchers,
};
#[cfg(unix)]
pub use crate::client::{BROKER_UID_ENV, Client, ClientConfig, ClientError, ConnectionState, Subscription};

pub use crate::frame::{
    DEFAULT_MAX_FRAME, ErrorCode, Frame, FrameError, Message, Mode, NoReplyReason, Overflow,
    PROTOCOL_VERSION, Strategy, decode, encode,
};
pub use crate::topic::{TopicError, TopicTrie, validate_pattern, validate_topic};
