//! Wire frames: a `u32` little-endian length, then a postcard-encoded
//! [`Frame`]. Encoder and decoder live side by side.
//!
//! Guarantees: a length prefix above the maximum frame size is refused
//! from its four bytes alone, before anything is buffered or allocated for
//! the body; a body that does not decode, or decodes with bytes left over,
//! is an error, never a panic; decoding borrows strings and payloads from
//! the read buffer instead of copying them.

use serde::{Deserialize, Serialize};

/// The protocol version this crate speaks, sent in `Hello` and `Welcome`.
pub const PROTOCOL_VERSION: u16 = 5;
/// Default maximum frame size (body bytes), a broker setting.
pub const DEFAULT_MAX_FRAME: u32 = 1 << 20;
/// Bytes of the length prefix.
pub const LEN_PREFIX: usize = 4;

/// A message delivered to a subscription: what a `Deliver` frame carries,
/// owned. Here rather than beside the client (Unix only) so the contract
/// decodes deliveries on every OS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The topic it was published on.
    pub topic: String,
    /// The payload.
    pub payload: Vec<u8>,
    /// Where a reply goes, for requests.
    pub reply_to: Option<String>,
    /// The publisher's client id, vouched for by the broker (see
    /// [`Frame::Deliver`]).
    pub from: String,
}

/// How a subscription shares the messages it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Strategy {
    /// Members in turn.
    RoundRobin,
    /// The member with the least work as the broker sees it: requests
    /// delivered to it and not answered yet, plus messages still queued
    /// for it (ties go in turn).
    LeastLoaded,
    /// A member chosen at random.
    Random,
}

/// What a subscriber does with a matching message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Mode<'a> {
    /// Every broadcast subscriber gets a copy.
    Broadcast,
    /// One member of the named group gets it.
    Queue {
        /// The group name.
        group: &'a str,
        /// How the member is chosen (the group's first subscriber sets it;
        /// a `Request` may choose for itself).
        strategy: Strategy,
    },
}

/// What a subscriber's queue does when it is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Overflow {
    /// Stop reading from the publisher until there is room (backpressure).
    Block,
    /// Drop the oldest queued message to make room.
    DropOldest,
    /// Drop the new message.
    DropNewest,
    /// Drop the new message and send the publisher an `Error` frame.
    Error,
}

/// Error codes carried by `Error` frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ErrorCode {
    /// The frame could not be decoded, or came out of order.
    Protocol,
    /// The peer's protocol version is not supported.
    Version,
    /// The peer is not allowed to connect, publish or subscribe there.
    Forbidden,
    /// A topic or pattern is malformed.
    BadTopic,
    /// A subscriber's queue was full (overflow strategy `Error`).
    Overflow,
    /// A limit was reached (connections, subscriptions).
    Limit,
    /// The broker is shutting down.
    ShuttingDown,
    /// The client asked for an id that only a process the broker can
    /// prove may hold (the agent's own, a collector's), and it is not that
    /// process (protocol version 5). A collector started a moment before
    /// its supervisor vouched for it retries.
    Unproven,
}

/// One message on the wire. Kinds are postcard enum variants, numbered in
/// declaration order: a later protocol version appends kinds (and replaces
/// a kind whose fields change with a new one), and a peer sends only the
/// kinds of the version both sides announced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Frame<'a> {
    /// First frame of a client.
    Hello {
        /// The client's protocol version.
        protocol_version: u16,
        /// A unique client id, also its direct inbox `direct.<client_id>`.
        client_id: &'a str,
        /// The client's pid as it claims it (credentials come from the
        /// socket, never from here).
        pid: u32,
    },
    /// The broker accepted the `Hello`.
    Welcome {
        /// The broker's protocol version.
        protocol_version: u16,
        /// The largest frame body the broker accepts.
        max_frame: u32,
    },
    /// Subscribe `sid` (chosen by the client) to a pattern.
    Subscribe {
        /// Subscription id, unique per connection.
        sid: u64,
        /// The pattern.
        pattern: &'a str,
        /// Broadcast or queue group.
        #[serde(borrow)]
        mode: Mode<'a>,
        /// What to do when this subscriber's queue is full.
        overflow: Overflow,
    },
    /// Drop a subscription.
    Unsubscribe {
        /// The subscription id.
        sid: u64,
    },
    /// Publish a message.
    Publish {
        /// The topic (no wildcards).
        topic: &'a str,
        /// The message.
        #[serde(borrow, with = "serde_bytes")]
        payload: &'a [u8],
        /// Where replies go (a request).
        reply_to: Option<&'a str>,
        /// Ask for a `PubAck` with this id once routed.
        ack_id: Option<u64>,
    },
    /// A message for one of the client's subscriptions.
    Deliver {
        /// The subscription it matched.
        sid: u64,
        /// The topic it was published on.
        topic: &'a str,
        /// The message.
        #[serde(borrow, with = "serde_bytes")]
        payload: &'a [u8],
        /// Where replies go.
        reply_to: Option<&'a str>,
        /// The publisher's client id, as the broker knows it from its
        /// `Hello` (ids are unique among live connections), or `"bus"` for
        /// the broker's own answers. Receivers use it to check that a
        /// payload speaks for its sender. Added in protocol version 2.
        from: &'a str,
    },
    /// The broker routed the publish with this id.
    PubAck {
        /// The publish's `ack_id`.
        ack_id: u64,
    },
    /// Something went wrong.
    Error {
        /// What kind of failure.
        code: ErrorCode,
        /// A sentence for logs.
        message: &'a str,
        /// The `ack_id` of the publish this refuses, when it asked for a
        /// `PubAck` (so a confirmed publish learns of its refusal at once).
        ack_id: Option<u64>,
    },
    /// Liveness probe.
    Ping(u64),
    /// Answer to `Ping`.
    Pong(u64),
    /// Publish a request (protocol version 3): like `Publish` with a
    /// `reply_to`, which must be in the requester's own inbox, and the
    /// broker follows it: the requester hears with `NoReply` when nobody
    /// took it or a subscriber it was delivered to left without answering.
    Request {
        /// The topic (no wildcards).
        topic: &'a str,
        /// The message.
        #[serde(borrow, with = "serde_bytes")]
        payload: &'a [u8],
        /// Where replies go: a topic under `direct.<requester id>`.
        reply_to: &'a str,
        /// How queue groups pick a member for this request; `None`: the
        /// group's own strategy.
        strategy: Option<Strategy>,
    },
    /// A request will not be answered by someone (protocol version 3).
    NoReply {
        /// The request's `reply_to`.
        reply_to: &'a str,
        /// Why.
        reason: NoReplyReason,
        /// The subscriber that left (`ResponderGone`, `ResponderLeft`), or
        /// empty.
        responder: &'a str,
    },
    /// The broker accepted the `Hello` (protocol version 5, replacing
    /// `Welcome`): the client's id on the bus may differ from the one it
    /// asked for. A client that cannot prove an id reserved for the agent
    /// or a collector gets one the broker assigns, `bus-<n>-<asked>`; its
    /// inbox is `direct.<client_id>`, and `Deliver.from` names it so.
    WelcomeAs {
        /// The broker's protocol version.
        protocol_version: u16,
        /// The largest frame body the broker accepts from this client.
        max_frame: u32,
        /// The largest frame body the broker may send it (its own
        /// maximum), which the client's reads must hold.
        max_deliver: u32,
        /// The client's id on the bus from now on.
        client_id: &'a str,
    },
}

/// Why a [`Frame::NoReply`] was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NoReplyReason {
    /// No subscription or queue group matched the request's topic.
    NoResponders,
    /// A subscriber the request was delivered to disconnected before it
    /// published to the request's `reply_to`, and no other subscriber
    /// holds the request: nobody will answer it.
    ResponderGone,
    /// The broker refused the request (its topic, or the requester's
    /// permissions); an `Error` frame says why.
    Refused,
    /// A subscriber the request was delivered to disconnected before
    /// answering, but others that got it may still answer (protocol
    /// version 4).
    ResponderLeft,
}

/// Why bytes are not a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// A length prefix above the maximum frame size.
    #[error("frame length {len} exceeds the maximum of {max} bytes")]
    Oversize {
        /// The length prefix.
        len: u32,
        /// The maximum.
        max: u32,
    },
    /// The body is not a valid frame (unknown kind, bad field, trailing
    /// bytes).
    #[error("malformed frame of {len} bytes: {reason}")]
    Malformed {
        /// Body length.
        len: u32,
        /// What postcard said.
        reason: String,
    },
}

/// Appends `frame`, length-prefixed, to `out`. Fails only if the body
/// would exceed `max` bytes (nothing is appended then).
pub fn encode(frame: &Frame<'_>, out: &mut Vec<u8>, max: u32) -> Result<(), FrameError> {
    // TODO(bus reactor): encode straight into the connection's write
    // buffer; this intermediate Vec costs one allocation per frame.
    let body =
        postcard::to_stdvec(frame).map_err(|e| FrameError::Malformed { len: 0, reason: e.to_string() })?;
    let len = u32::try_from(body.len()).unwrap_or(u32::MAX);
    if len > max {
        return Err(FrameError::Oversize { len, max });
    }
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&body);
    Ok(())
}

/// Decodes the first frame in `buf`. `Ok(None)`: more bytes are needed
/// (the prefix has already been checked against `max`). On success, also
/// returns how many bytes the frame took.
pub fn decode(buf: &[u8], max: u32) -> Result<Option<(Frame<'_>, usize)>, FrameError> {
    let Some(prefix) = buf.get(..LEN_PREFIX) else { return Ok(None) };
    let len = u32::from_le_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]);
    // Invariant: the prefix is bounded before it decides anything else.
    if len > max {
        return Err(FrameError::Oversize { len, max });
    }
    let end = LEN_PREFIX + len as usize;
    let Some(body) = buf.get(LEN_PREFIX..end) else { return Ok(None) };
    match postcard::take_from_bytes::<Frame<'_>>(body) {
        Ok((frame, [])) => Ok(Some((frame, end))),
        Ok((_, rest)) => {
            Err(FrameError::Malformed { len, reason: format!("{} bytes after the frame", rest.len()) })
        }
        Err(e) => Err(FrameError::Malformed { len, reason: e.to_string() }),
    }
}
