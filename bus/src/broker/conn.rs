//! One connection's session I/O: its read and write buffers, the
//! frames queued in them, flow control (pausing, `Block`, dropping the
//! oldest), the memory limit, slow consumers and closing.
//!
//! # How the broker runs (the whole picture)
//!
//! `Broker::start(BrokerConfig)` binds the socket (directory 0700, socket
//! 0600; a stale socket is replaced, a live broker refused with `InUse`)
//! and runs the reactor on the `bus-broker` thread. Connections in a `Slab`
//! (tokens: 0 listener, 1 waker, 2.. connections). Peer uid from
//! `SO_PEERCRED`/`getpeereid` (via `platform`): the broker's own uid, root
//! and `allowed_uids` only. Identities (protocol 5,
//! `BrokerConfig::identities`; without them ids are first come, first
//! served, as in the bus's own tests): an `own` id (the agent's
//! `daemoneye-agent*`) is welcomed only from `host_pid`, a `vouched` id
//! (every configured collector, enabled or not) only from the process in
//! the `Vouchers` table (pid and start time,
//! `platform::process_start_time`), else `Error { Unproven }`; any other id
//! is replaced by `bus-<n>-<asked>`. Proven connections (the host's pid, a
//! vouched pid) are outside the caps and get the full `max_frame`; the
//! others get `unproven_max_frame`, are capped in total, per uid and per
//! pid (a process holding none finds 4 more places), closed after
//! `idle_timeout` without a subscribe or publish, not read while the
//! buffers of all connections exceed `memory_limit_bytes` (the unproven one
//! holding the most is then closed). A frame left half-sent for
//! `frame_timeout` closes its connection. `Block` is honoured only for
//! `block_allowed` subscribers (the agent: its store); anyone else's is
//! `DropOldest`. Per connection: a read buffer capped at one maximal frame
//! plus a chunk, a write buffer with the end offset of each queued frame
//! (so queues count messages and bytes, and `DropOldest` drops whole unsent
//! frames), write interest only while non-empty. Routing is inline: the
//! trie yields broadcast subscriptions and queue groups (one trie entry per
//! group; RoundRobin, LeastLoaded, Random); each `Deliver` is appended to
//! the target's write buffer and every dirty connection is flushed once per
//! poll iteration. Overflow per subscription: `Block` pauses reading from
//! the publisher until the subscriber drains below half its limit;
//! `DropOldest`, `DropNewest`, `Error` (an `Error` frame to the publisher
//! per drop); drops are counted. A subscriber over its limit past
//! `slow_consumer_deadline` is disconnected. Protocol errors (bad frame,
//! oversize prefix, wrong version, frames before `Hello`) send an `Error`
//! and close that connection only. Fairness: a connection gets at most 4
//! read rounds per poll iteration and is resumed next iteration (the poll
//! then does not wait). A connection that does not read what it is sent is
//! not read either until it catches up, and its slow-consumer clock runs.
//! The clock stops only below half the limit while publishers are blocked
//! on it, so a blocked publisher is released either by the subscriber
//! draining or by its disconnection. At most 1024 subscriptions per
//! connection; a connection has 5 s to say `Hello`; a client id held by a
//! live connection is refused (`Limit`, so the client retries); queue
//! limits below 2 are refused at start. `DropOldest` drops down to half the
//! limits in one pass, so a full queue pays one buffer move per many
//! messages. Connection cap: a connection over a cap is refused with `Error
//! { Limit }`; accepting stops at the hard ceiling (`max_connections` plus
//! 64 for proven processes) and resumes below 90%. Shutdown: an
//! `AtomicBool` plus the waker; the thread sends `ShuttingDown`, flushes
//! once, removes the socket and is joined by `Broker::drop`.

use super::*;

/// How a read pass ended.
pub(super) enum ReadOutcome {
    /// The read buffer reached its cap; more may be waiting.
    Capped,
    /// `WouldBlock`: everything available was read.
    Drained,
    /// The peer closed or the socket failed.
    Closed,
    /// Not read: gone, paused or closing.
    Skipped,
}

pub(super) enum ConnState {
    AwaitingHello,
    /// `acl`: the client's resolved permissions; `None` is unrestricted.
    Ready {
        /// Shared with the deliveries that name it as their sender.
        client_id: Arc<str>,
        acl: Option<Permissions>,
    },
}

pub(super) struct Conn {
    pub(super) stream: UnixStream,
    pub(super) state: ConnState,
    pub(super) uid: u32,
    /// The peer's pid from the kernel, where the OS reports it.
    pub(super) pid: Option<u32>,
    /// The host's process or one vouched for (at accept), or welcomed
    /// with a proven id: outside the caps and the memory limit.
    pub(super) proven: bool,
    /// The largest frame body accepted from it.
    pub(super) max_frame: u32,
    /// Its `Overflow::Block` is honoured (`BrokerConfig::block_allowed`).
    pub(super) may_block: bool,
    /// A configured peer (a `permissions` entry names it): its coming and
    /// going is logged at INFO; others' (a CLI call each) at DEBUG.
    pub(super) known: bool,
    /// It has subscribed or published since its `Hello` (not idle).
    pub(super) active: bool,
    /// When it was welcomed.
    pub(super) welcomed_at: Option<Instant>,
    /// Since when the read buffer holds an incomplete frame (reset by
    /// each frame completed).
    pub(super) partial_since: Option<Instant>,
    /// Not read because the broker's memory is over its limit.
    pub(super) starved: bool,
    /// Read buffer; bytes `..rlen` are data, the rest is room.
    pub(super) rbuf: Vec<u8>,
    pub(super) rlen: usize,
    pub(super) wbuf: Vec<u8>,
    /// Bytes of `wbuf` already written.
    pub(super) wpos: usize,
    /// End offset in `wbuf` of every queued frame, oldest first.
    pub(super) frame_ends: VecDeque<usize>,
    /// Offset in `wbuf` where the oldest queued frame starts. Invariant:
    /// `head <= wpos`; a frame has started to go out iff its start < wpos.
    pub(super) head: usize,
    pub(super) subs: HashMap<u64, SubInfo>,
    pub(super) writable: bool,
    /// Close once the write buffer is flushed (after a fatal error frame).
    pub(super) closing: bool,
    /// Reading paused: a subscriber this connection published to is full
    /// and uses `Block`.
    pub(super) paused: bool,
    /// Publishers paused on this (full) subscriber.
    pub(super) blocked: Vec<usize>,
    /// Reading paused because this connection's own queue is full.
    pub(super) self_paused: bool,
    /// Since when this subscriber is over its queue limit.
    pub(super) over_since: Option<Instant>,
    /// When the connection was accepted (a `Hello` is due promptly).
    pub(super) accepted_at: Instant,
    /// The `reply_to` of every request delivered here and not answered
    /// yet (at most [`MAX_AWAITING`]).
    pub(super) awaiting: HashSet<Box<str>>,
}

impl Conn {
    pub(super) fn pending_bytes(&self) -> usize {
        self.wbuf.len() - self.wpos
    }

    /// Work as `LeastLoaded` sees it: requests delivered and not answered,
    /// plus messages still queued.
    pub(super) fn load(&self) -> usize {
        self.awaiting.len() + self.frame_ends.len()
    }

    pub(super) fn queue_frame(&mut self, f: &Frame<'_>, max: u32) -> bool {
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
    pub(super) fn drop_oldest_to(&mut self, max_bytes: usize, max_msgs: usize) -> u64 {
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

impl Reactor {
    /// Reads until `WouldBlock` and handles every whole frame. Readiness
    /// is edge-triggered: stopping early (buffer cap) must not strand bytes
    /// in the kernel, so this loops until the socket is drained, the peer
    /// closed, or reading is paused.
    pub(super) fn read(&mut self, idx: usize) {
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

    pub(super) fn read_some(&mut self, idx: usize) -> ReadOutcome {
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

    pub(super) fn flush_dirty(&mut self) {
        // One entry per delivery: flush each connection once.
        self.dirty.sort_unstable();
        self.dirty.dedup();
        while let Some(idx) = self.dirty.pop() {
            self.flush(idx);
        }
    }

    pub(super) fn flush(&mut self, idx: usize) {
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

    /// Recomputes the bytes held in buffers. Over the limit, the
    /// connection that is not proven and has the most queued is closed (a
    /// subscriber that does not read; else the biggest half-read frame), until the rest
    /// fits: otherwise one hog would keep every other client that is not
    /// proven from being read. Below the limit, reads the connections that
    /// waited for memory.
    pub(super) fn check_memory(&mut self) {
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

    pub(super) fn check_slow_consumers(&mut self) {
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

    pub(super) fn close(&mut self, idx: usize) {
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
}
