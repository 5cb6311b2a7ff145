//! Routing: subscriptions in the topic trie, queue groups and their
//! strategies, permissions checks, delivery, and the tracking of requests
//! until they are answered.
//!
//! # Topic rules
//!
//! Topic rules: a client may subscribe to its own inbox
//! `direct.<client_id>` (and topics under it) and no other, and never to a
//! pattern starting with a wildcard. `BrokerConfig::permissions` gives
//! clients (by exact id or `prefix*`) publish and subscribe allow-lists of
//! patterns, with `{client_id}` for their own topics; a subscription must
//! be covered by an allowed pattern (`topic::covers`); inbox replies
//! (`direct.…`) may always be published. A `reply_to`, on a `Publish` as on
//! a `Request`, must lie in the publisher's own inbox; `bus.stats` obeys
//! the publish permissions. Clients without an entry get
//! `default_permissions` (none: unrestricted). Refusals are `Error {
//! Forbidden }` frames and a counter; a refused publish gets no `PubAck`.
//!
//! # Requests the broker follows
//!
//! Requests the broker follows (protocol 4): a `Request` frame's `reply_to`
//! must be in the requester's own inbox. Each connection a request is
//! delivered to remembers its `reply_to` in an `awaiting` set (at most
//! 4096) until that connection publishes to it; `LeastLoaded` picks the
//! member with the least `awaiting + queued frames` (ties in turn from the
//! last pick), so a member that holds a task it has not answered (stalled,
//! stopped) is passed over. When a connection closes, each inbox in its
//! `awaiting` set gets `NoReply { ResponderGone, responder }` (sent to the
//! inbox's subscriber, found through the trie), so a caller fails over at
//! once; while other connections still hold that inbox (a plain request
//! reaches every subscriber; the reactor counts holders per inbox) the
//! reason is `ResponderLeft` instead, which a plain request ignores and
//! `request_all` reports as a departure; a request that matched nobody gets
//! `NoReply { NoResponders }` at once, a refused one (permissions, an inbox
//! as its topic) `NoReply { Refused }` besides the `Error`. A request may
//! name its own strategy for the queue groups it reaches (the agent's
//! per-task-type choice); without one the group's (its first member's)
//! applies. `awaiting` is also in the stats (`QueueDepth::awaiting`).

use super::*;

/// What the trie points at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Target {
    /// A broadcast subscription.
    Sub { conn: usize, sid: u64 },
    /// A queue group (one trie entry per group).
    Group(usize),
}

/// One message being routed.
pub(super) struct Route<'a> {
    /// The publisher's id, named in the deliveries.
    pub(super) sender: &'a str,
    pub(super) topic: &'a str,
    pub(super) payload: &'a [u8],
    pub(super) reply_to: Option<&'a str>,
    /// A request's own choice of queue-group strategy.
    pub(super) strategy: Option<Strategy>,
    /// A request: remember each delivery until it is answered.
    pub(super) follow: bool,
}

pub(super) struct Group {
    pub(super) pattern: String,
    pub(super) name: String,
    pub(super) strategy: Strategy,
    pub(super) members: Vec<(usize, u64)>,
    pub(super) next: usize,
}

pub(super) struct SubInfo {
    pub(super) pattern: String,
    pub(super) group: Option<usize>,
    pub(super) overflow: Overflow,
}

impl Reactor {
    pub(super) fn subscribe(
        &mut self,
        idx: usize,
        sid: u64,
        pattern: &str,
        mode: Mode<'_>,
        overflow: Overflow,
    ) {
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

    pub(super) fn unsubscribe(&mut self, idx: usize, sid: u64) {
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
    pub(super) fn may_subscribe(&self, idx: usize, pattern: &str) -> bool {
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
    pub(super) fn may_publish(&self, idx: usize, topic_name: &str) -> bool {
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
    pub(super) fn publish(
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
    pub(super) fn route(&mut self, idx: usize, r: &Route<'_>) -> usize {
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
    pub(super) fn pick(&mut self, gid: usize, strategy: Option<Strategy>) -> Option<(usize, u64)> {
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
    pub(super) fn deliver(&mut self, from: usize, to: usize, sid: u64, r: &Route<'_>) -> bool {
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

    /// Tells the owner of the inbox `reply_to` that a request will not be
    /// answered by `responder`.
    pub(super) fn no_reply(&mut self, reply_to: &str, reason: NoReplyReason, responder: &str) {
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
    pub(super) fn own_inbox(&self, idx: usize, topic_name: &str) -> bool {
        let Some(ConnState::Ready { client_id, .. }) = self.conns.get(idx).map(|c| &c.state) else {
            return false;
        };
        let mut segs = topic_name.split('.');
        segs.next() == Some("direct") && segs.next() == Some(&**client_id)
    }
}

/// One connection no longer holds `inbox`: the holders left.
pub(super) fn release(holders: &mut HashMap<Box<str>, u32>, inbox: &str) -> u32 {
    let Some(n) = holders.get_mut(inbox) else { return 0 };
    *n = n.saturating_sub(1);
    let left = *n;
    if left == 0 {
        holders.remove(inbox);
    }
    left
}
