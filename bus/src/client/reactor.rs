//! The reactor thread (`bus-client`): it connects and reconnects with
//! backoff, says `Hello`, re-subscribes, takes the handle's commands, reads
//! and dispatches frames (handing replies and confirmations to the callers
//! waiting on them), and flushes the shared write buffer (`wire`) when the
//! socket is writable.

use super::*;

pub(super) enum Cmd {
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

pub(super) struct Shared {
    pub(super) state: Mutex<ConnectionState>,
    pub(super) changed: Condvar,
    pub(super) next_sid: AtomicU64,
    pub(super) outbox_bytes: AtomicUsize,
    /// Deliveries dropped because a subscription's channel was full.
    pub(super) dropped: AtomicU64,
    /// Times the broker welcomed this client (1 after the first connect).
    pub(super) connects: AtomicU64,
    /// The broker's maximum frame body, from its last `Welcome`.
    pub(super) max_frame: AtomicU32,
    /// The largest frame the broker may send (its `WelcomeAs`).
    pub(super) max_deliver: AtomicU32,
    /// The client's id on the bus (the broker's `WelcomeAs`).
    pub(super) id: Mutex<String>,
    /// Set by `close`/drop: the reactor stops even if its command queue is
    /// not being drained.
    pub(super) closing: AtomicBool,
    /// The write side, shared with the callers' fast path.
    pub(super) wire: Mutex<Wire>,
    /// Notified when the write buffer has room again (or the connection
    /// went): callers waiting for room look again.
    pub(super) room: Condvar,
    /// Keys (from the OS's randomness, via std's `RandomState`) that make
    /// each request's inbox topic unguessable: a reply can be sent only by
    /// whoever saw the request.
    pub(super) inbox_keys: std::collections::hash_map::RandomState,
}

impl Shared {
    pub(super) fn set(&self, s: ConnectionState) {
        let mut st = self.state.lock();
        // Refused and Closed are final.
        if *st != s && *st != ConnectionState::Closed && *st != ConnectionState::Refused {
            *st = s;
            self.changed.notify_all();
        }
    }
}

pub(super) struct SubEntry {
    pub(super) pattern: String,
    pub(super) group: Option<(String, Strategy)>,
    pub(super) overflow: Overflow,
    pub(super) tx: Sender<Message>,
    /// Block only: deliveries waiting for room in `tx`, oldest first.
    pub(super) parked: VecDeque<Message>,
}

pub(super) struct ClientReactor {
    pub(super) poll: Poll,
    pub(super) cmds: Receiver<Cmd>,
    pub(super) shared: Arc<Shared>,
    /// The socket while connected, also in [`Wire`] for writing.
    pub(super) stream: Option<Arc<UnixStream>>,
    /// The id the broker welcomed this client as (asked for, until then).
    pub(super) id: String,
    pub(super) welcomed: bool,
    /// Read buffer; bytes `..rlen` are data.
    pub(super) rbuf: Vec<u8>,
    pub(super) rlen: usize,
    /// Unread data may remain (a full Block subscription, or the cap).
    pub(super) pending_read: bool,
    pub(super) subs: HashMap<u64, SubEntry>,
    /// Encoded publishes made while away.
    pub(super) outbox: VecDeque<Vec<u8>>,
    pub(super) backoff: Duration,
    pub(super) next_attempt: Instant,
    pub(super) rng: u64,
    pub(super) cfg: ClientConfig,
    pub(super) closing: bool,
}

impl ClientReactor {
    pub(super) fn run(&mut self) {
        let mut events = Events::with_capacity(64);
        loop {
            let now = Instant::now();
            let mut timeout = Duration::from_secs(1);
            if self.stream.is_none() {
                timeout = timeout.min(self.next_attempt.saturating_duration_since(now));
            }
            if self.pending_read {
                // Waiting for the application to make room: look again soon.
                timeout = timeout.min(Duration::from_millis(1));
            }
            {
                let mut w = self.shared.wire.lock();
                if let Some(d) = w.requests.values().map(|r| r.deadline).min() {
                    timeout = timeout.min(d.saturating_duration_since(now));
                }
                w.next_wake = Some(now + timeout);
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
            self.shared.wire.lock().expire_requests();
            self.flush();
        }
        {
            let mut w = self.shared.wire.lock();
            w.reset(&ClientError::Closed);
            self.shared.room.notify_all();
        }
        self.stream = None;
        self.shared.set(ConnectionState::Closed);
    }

    pub(super) fn random(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    pub(super) fn try_connect(&mut self) {
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
                let s = Arc::new(s);
                self.stream = Some(s.clone());
                self.welcomed = false;
                self.rlen = 0;
                let mut w = self.shared.wire.lock();
                w.stream = Some(s);
                w.live = false;
                w.wbuf.clear();
                w.wpos = 0;
                w.encode(&Frame::Hello {
                    protocol_version: PROTOCOL_VERSION,
                    client_id: &self.cfg.client_id,
                    pid: std::process::id(),
                });
            }
            Err(e) => {
                log::debug!("bus client {}: connect {}: {e}", self.cfg.client_id, self.cfg.socket.display());
                self.schedule_retry();
            }
        }
    }

    /// Exponential backoff with full jitter: wait a random time in
    /// [0, backoff), then double the backoff up to its maximum.
    pub(super) fn schedule_retry(&mut self) {
        let ceiling = self.backoff.as_micros().max(1) as u64;
        let wait = Duration::from_micros(self.random() % ceiling);
        self.next_attempt = Instant::now() + wait;
        self.backoff = (self.backoff * 2).min(self.cfg.backoff_max);
    }

    pub(super) fn disconnected(&mut self, why: &str) {
        {
            // What was written but not acknowledged cannot be confirmed
            // now; callers waiting for room go the slow way (the outbox).
            let mut w = self.shared.wire.lock();
            w.reset(&ClientError::Disconnected);
            self.shared.room.notify_all();
        }
        if let Some(mut s) = self.stream.take() {
            // The only reference left (callers use the wire's, under its
            // lock, and it is gone).
            if let Some(s) = Arc::get_mut(&mut s) {
                let _ = self.poll.registry().deregister(s);
            }
            log::warn!("bus client {}: disconnected ({why}); reconnecting", self.cfg.client_id);
        }
        self.welcomed = false;
        self.shared.set(ConnectionState::Disconnected);
        self.schedule_retry();
    }

    pub(super) fn take_commands(&mut self) {
        // Under the wire's lock from taking a command to encoding it: a
        // caller that finds the channel empty under it knows every earlier
        // command is in the write buffer (its frames stay in order).
        let shared = self.shared.clone();
        let mut w = shared.wire.lock();
        // Stop taking publishes while the socket is backed up: the handle's
        // bounded channel then fills and `publish` waits (backpressure).
        while w.pending() < self.cfg.write_limit_bytes {
            let Ok(cmd) = self.cmds.try_recv() else { break };
            self.command(cmd, &mut w);
            if self.closing {
                break;
            }
        }
    }

    pub(super) fn command(&mut self, cmd: Cmd, w: &mut Wire) {
        match cmd {
            Cmd::Publish { topic, payload, reply_to, confirm } => {
                if self.welcomed {
                    w.publish(&topic, &payload, reply_to.as_deref(), confirm);
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
                    send_subscribe(w, sid, &entry);
                }
                self.subs.insert(sid, entry);
            }
            Cmd::Unsubscribe { sid } => {
                if self.subs.remove(&sid).is_some() && self.welcomed {
                    w.encode(&Frame::Unsubscribe { sid });
                }
            }
            Cmd::Sync { confirm } => {
                if !self.welcomed {
                    let _ = confirm.send(Err(ClientError::Disconnected));
                    return;
                }
                w.sync(confirm);
            }
            Cmd::Request { topic, payload, timeout, strategy, reply, many } => {
                if !self.welcomed {
                    let _ = reply.send(Err(ClientError::Disconnected));
                    return;
                }
                let r = Req { topic: &topic, payload: &payload, timeout, strategy, reply, many };
                w.request(&self.shared.inbox_keys, r);
            }
            Cmd::Close => self.closing = true,
        }
    }

    /// Reads and handles what the broker sent. Stops early, leaving the
    /// rest in the kernel (and so pushing back on the broker), when a
    /// `Block` subscription's channel is full or the read buffer is at its
    /// cap; `pending_read` then makes the loop come back soon.
    pub(super) fn read(&mut self) {
        self.pending_read = false;
        let parked_full = self.unpark();
        let mut closed = None;
        let cap = READ_CAP.max(self.shared.max_deliver.load(Ordering::Acquire) as usize + 4 + READ_CHUNK);
        if parked_full || !self.process_rbuf(&mut closed) {
            self.pending_read = true;
        } else if let Some(s) = self.stream.as_deref() {
            let mut s: &UnixStream = s;
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
    pub(super) fn unpark(&mut self) -> bool {
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
    pub(super) fn process_rbuf(&mut self, closed: &mut Option<String>) -> bool {
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

    pub(super) fn handle(&mut self, f: Frame<'_>) {
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
                // Live (callers may write) only once the subscriptions
                // and the outbox are ahead of them in the buffer.
                let mut w = self.shared.wire.lock();
                w.id = client_id.to_owned();
                w.encode(&Frame::Subscribe {
                    sid: INBOX_SID,
                    pattern: &inbox,
                    mode: Mode::Broadcast,
                    overflow: Overflow::Block,
                });
                for (sid, e) in &self.subs {
                    send_subscribe(&mut w, *sid, e);
                }
                for buf in self.outbox.drain(..) {
                    self.shared.outbox_bytes.fetch_sub(buf.len(), Ordering::AcqRel);
                    w.wbuf.extend_from_slice(&buf);
                }
                w.live = true;
                drop(w);
                log::info!("bus client {}: connected to {}", self.cfg.client_id, self.cfg.socket.display());
                self.shared.connects.fetch_add(1, Ordering::AcqRel);
                self.shared.set(ConnectionState::Connected);
            }
            Frame::Deliver { sid: INBOX_SID, topic, payload, reply_to, from } => {
                let mut w = self.shared.wire.lock();
                let Some(n) = w.pending_for(topic, from, &self.cfg.client_id) else { return };
                // A `request_all` hands over one answer per responder: a
                // responder that floods the inbox costs it nothing more.
                if let Some(p) = w.requests.get_mut(&n)
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
                w.answer(n, Ok(msg), false, &self.cfg.client_id);
            }
            Frame::NoReply { reply_to, reason, responder } => {
                let mut w = self.shared.wire.lock();
                let Some(n) = w.pending_for(reply_to, "bus", &self.cfg.client_id) else { return };
                let many = w.requests.get(&n).is_some_and(|p| p.many);
                let e = match reason {
                    NoReplyReason::NoResponders => {
                        let topic = w.requests.get(&n).map(|p| p.topic.clone()).unwrap_or_default();
                        ClientError::NoResponders { topic }
                    }
                    // A `request_all` hears of every departure; a request
                    // fails only when nobody that got it is left.
                    NoReplyReason::ResponderLeft if !many => return,
                    NoReplyReason::ResponderGone | NoReplyReason::ResponderLeft => {
                        ClientError::ResponderGone { responder: responder.to_owned() }
                    }
                    NoReplyReason::Refused => {
                        let topic = w.requests.get(&n).map(|p| p.topic.clone()).unwrap_or_default();
                        let message = format!("request on {topic} refused (see the broker's error)");
                        ClientError::Refused { code: ErrorCode::Forbidden, message }
                    }
                };
                let last = !matches!(reason, NoReplyReason::ResponderGone | NoReplyReason::ResponderLeft);
                w.answer(n, Err(e), last, &self.cfg.client_id);
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
                let mut w = self.shared.wire.lock();
                while let Some((id, tx)) = w.acks.pop_front() {
                    if id == ack_id {
                        let _ = tx.send(Ok(()));
                        break;
                    }
                    let _ = tx.send(Err(ClientError::Disconnected));
                }
            }
            Frame::Error { code, message, ack_id } => {
                log::warn!("bus client {}: broker error {code:?}: {message}", self.cfg.client_id);
                let mut w = self.shared.wire.lock();
                if let Some(id) = ack_id
                    && let Some(pos) = w.acks.iter().position(|(a, _)| *a == id)
                    && let Some((_, tx)) = w.acks.remove(pos)
                {
                    let _ = tx.send(Err(ClientError::Refused { code, message: message.to_owned() }));
                }
                drop(w);
                if !self.welcomed
                    && matches!(code, ErrorCode::Forbidden | ErrorCode::Version | ErrorCode::BadTopic)
                {
                    log::error!("bus client {}: refused by the broker: {message}", self.cfg.client_id);
                    self.shared.set(ConnectionState::Refused);
                    self.closing = true;
                }
            }
            Frame::Ping(n) => self.shared.wire.lock().encode(&Frame::Pong(n)),
            _ => {}
        }
    }

    pub(super) fn flush(&mut self) {
        let res = {
            let mut w = self.shared.wire.lock();
            let before = w.pending();
            let res = w.write_out();
            if w.pending() < before {
                self.shared.room.notify_all();
            }
            res
        };
        if let Err(why) = res {
            self.disconnected(&why);
        }
    }
}

fn send_subscribe(w: &mut Wire, sid: u64, e: &SubEntry) {
    let mode = match &e.group {
        None => Mode::Broadcast,
        Some((g, strategy)) => Mode::Queue { group: g, strategy: *strategy },
    };
    w.encode(&Frame::Subscribe { sid, pattern: &e.pattern, mode, overflow: e.overflow });
}
