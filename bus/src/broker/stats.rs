//! The broker's counters ([`BrokerStats`]), kept on the reactor thread,
//! copied out once per iteration and published on [`STATS_TOPIC`].

use super::*;

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

impl Reactor {
    /// Copies the counters to the shared stats; the queue depths too when
    /// `queues` is set or 100 ms have passed (building them walks every
    /// connection).
    pub(super) fn publish_stats(&mut self, queues: bool) {
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

    /// Answers a stats request: the encoded counters go to `reply_to`,
    /// which must be the requester's own inbox (otherwise the broker would
    /// publish on the requester's behalf where it may not).
    pub(super) fn answer_stats(&mut self, idx: usize, reply_to: Option<&str>, ack_id: Option<u64>) {
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
}
