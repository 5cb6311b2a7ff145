//! A client's session: accepting it (credentials, caps), its `Hello`
//! and the id it is welcomed as, and the dispatch of every frame it sends.

use super::*;

impl Reactor {
    pub(super) fn accept(&mut self) {
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
    pub(super) fn identity(&mut self, asked: &str, pid: Option<u32>) -> Result<Option<String>, String> {
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
    pub(super) fn over_cap(&self, uid: u32, pid: Option<u32>) -> Option<String> {
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

    pub(super) fn process_frames(&mut self, idx: usize) {
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

    pub(super) fn protocol_error(&mut self, idx: usize, e: &FrameError) {
        log::warn!("bus: protocol error from connection {idx}, closing it: {e}");
        self.counters.protocol_errors += 1;
        self.fatal(idx, ErrorCode::Protocol, &e.to_string());
    }

    /// Sends an error frame and closes the connection after flushing.
    pub(super) fn fatal(&mut self, idx: usize, code: ErrorCode, message: &str) {
        let max = self.cfg.max_frame;
        if let Some(c) = self.conns.get_mut(idx) {
            c.queue_frame(&Frame::Error { code, message, ack_id: None }, max);
            c.closing = true;
            self.dirty.push(idx);
        }
    }

    pub(super) fn reply(&mut self, idx: usize, f: &Frame<'_>) {
        let max = self.cfg.max_frame;
        if let Some(c) = self.conns.get_mut(idx) {
            c.queue_frame(f, max);
            self.dirty.push(idx);
        }
    }

    pub(super) fn handle(&mut self, idx: usize, f: Frame<'_>) {
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

    pub(super) fn mark_active(&mut self, idx: usize) {
        if let Some(c) = self.conns.get_mut(idx) {
            c.active = true;
        }
    }
}

pub(super) fn kind(f: &Frame<'_>) -> &'static str {
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
