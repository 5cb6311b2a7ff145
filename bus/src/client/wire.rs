//! The write side of the connection, shared by the handle and the reactor
//! behind one short lock: the socket (while connected), the write buffer,
//! and what must be registered before a frame goes out (confirmations
//! awaited, requests pending). A caller whose way is clear encodes its
//! frame straight into the buffer and writes it itself (the fast path, no
//! thread hop); the reactor flushes what is left when the socket is
//! writable again.

use super::*;

/// Compact the write buffer once this many bytes of it were written.
const COMPACT_AT: usize = 64 * 1024;

pub(super) struct Wire {
    /// The socket while connected (the reactor holds the other reference
    /// and reads through it).
    pub(super) stream: Option<Arc<UnixStream>>,
    /// Welcomed, re-subscribed and the outbox handed over: a caller may
    /// write here itself (when no command is queued ahead of it).
    pub(super) live: bool,
    /// Bytes for the socket; `..wpos` are written.
    pub(super) wbuf: Vec<u8>,
    pub(super) wpos: usize,
    /// Confirmations awaited (publishes' `PubAck`s and syncs' `Pong`s,
    /// numbered from one counter), in the order they were sent; the
    /// broker answers in that order.
    pub(super) acks: VecDeque<(u64, Sender<Result<(), ClientError>>)>,
    pub(super) next_ack: u64,
    /// Pending requests by number: the reply channel, the deadline and the
    /// inbox token.
    pub(super) requests: HashMap<u64, Pending>,
    pub(super) next_req: u64,
    /// The id the broker welcomed this client as (asked for, until then):
    /// request inboxes are under it.
    pub(super) id: String,
    /// When the reactor will look at request deadlines next (a
    /// `request_all` due earlier wakes it).
    pub(super) next_wake: Option<Instant>,
}

impl Wire {
    pub(super) fn new(id: String) -> Wire {
        Wire {
            stream: None,
            live: false,
            wbuf: Vec::new(),
            wpos: 0,
            acks: VecDeque::new(),
            next_ack: 1,
            requests: HashMap::new(),
            next_req: 1,
            id,
            next_wake: None,
        }
    }

    /// Bytes queued and not yet written.
    pub(super) fn pending(&self) -> usize {
        self.wbuf.len() - self.wpos
    }

    /// Appends `f`, length-prefixed, encoded in place (no intermediate
    /// buffer). Nothing is appended if it cannot be encoded.
    pub(super) fn encode(&mut self, f: &Frame<'_>) {
        let start = self.wbuf.len();
        self.wbuf.extend_from_slice(&[0; frame::LEN_PREFIX]);
        match postcard::serialize_with_flavor(f, Append(&mut self.wbuf)) {
            Ok(()) => {
                let len = u32::try_from(self.wbuf.len() - start - frame::LEN_PREFIX).unwrap_or(u32::MAX);
                self.wbuf[start..start + frame::LEN_PREFIX].copy_from_slice(&len.to_le_bytes());
            }
            // None of our frames: postcard fails only on types it cannot
            // encode.
            Err(e) => {
                log::error!("bus client {}: cannot encode a frame: {e}", self.id);
                self.wbuf.truncate(start);
            }
        }
    }

    /// Writes what it can without blocking; an error is the connection's
    /// end (the reactor's flush meets it again and reconnects).
    pub(super) fn write_out(&mut self) -> Result<(), String> {
        let Some(s) = self.stream.as_deref() else { return Ok(()) };
        let mut s: &UnixStream = s;
        let mut res = Ok(());
        while self.wpos < self.wbuf.len() {
            match s.write(&self.wbuf[self.wpos..]) {
                Ok(0) => {
                    res = Err("write returned 0".to_owned());
                    break;
                }
                Ok(n) => self.wpos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    res = Err(e.to_string());
                    break;
                }
            }
        }
        if self.wpos == self.wbuf.len() {
            self.wbuf.clear();
            self.wpos = 0;
        } else if self.wpos >= COMPACT_AT {
            self.wbuf.drain(..self.wpos);
            self.wpos = 0;
        }
        res
    }

    /// The connection is gone: nothing more is written, and what was
    /// written but not confirmed or answered cannot be now.
    pub(super) fn reset(&mut self, e: &ClientError) {
        self.stream = None;
        self.live = false;
        self.wbuf.clear();
        self.wpos = 0;
        for (_, tx) in self.acks.drain(..) {
            let _ = tx.send(Err(e.clone()));
        }
        for (_, p) in self.requests.drain() {
            let _ = p.reply.try_send(Err(e.clone()));
        }
    }
}

/// A postcard output that appends to a `Vec` it borrows: frames are
/// encoded straight into the write buffer.
struct Append<'a>(&'a mut Vec<u8>);

impl postcard::ser_flavors::Flavor for Append<'_> {
    type Output = ();

    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        self.0.extend_from_slice(data);
        Ok(())
    }

    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.0.push(data);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<()> {
        Ok(())
    }
}

/// A caller's frame on the fast path.
pub(super) enum Out<'a> {
    Publish { topic: &'a str, payload: &'a [u8], confirm: Option<Sender<Result<(), ClientError>>> },
    Sync { confirm: Sender<Result<(), ClientError>> },
    Request(Req<'a>),
}

pub(super) struct Req<'a> {
    pub(super) topic: &'a str,
    pub(super) payload: &'a [u8],
    pub(super) timeout: Duration,
    pub(super) strategy: Option<Strategy>,
    pub(super) reply: Sender<Result<Message, ClientError>>,
    pub(super) many: bool,
}

impl Wire {
    /// Encodes a request and registers it (before it can be answered: both
    /// under the lock the reactor takes to match replies).
    pub(super) fn request(&mut self, keys: &std::collections::hash_map::RandomState, r: Req<'_>) {
        let n = self.next_req;
        self.next_req += 1;
        let token = std::hash::BuildHasher::hash_one(keys, n);
        let inbox = format!("direct.{}.r{n}x{token:016x}", self.id);
        self.encode(&Frame::Request {
            topic: r.topic,
            payload: r.payload,
            reply_to: &inbox,
            strategy: r.strategy,
        });
        let deadline = Instant::now() + r.timeout;
        let p = Pending {
            reply: r.reply,
            deadline,
            token,
            topic: r.topic.to_owned(),
            many: r.many,
            answered: HashSet::new(),
        };
        self.requests.insert(n, p);
    }

    /// Encodes a publish, registering its confirmation first.
    pub(super) fn publish(
        &mut self,
        topic: &str,
        payload: &[u8],
        reply_to: Option<&str>,
        confirm: Option<Sender<Result<(), ClientError>>>,
    ) {
        let ack_id = confirm.map(|tx| {
            self.next_ack += 1;
            self.acks.push_back((self.next_ack, tx));
            self.next_ack
        });
        self.encode(&Frame::Publish { topic, payload, reply_to, ack_id });
    }

    /// Encodes a `Ping` whose `Pong` answers `confirm`.
    pub(super) fn sync(&mut self, confirm: Sender<Result<(), ClientError>>) {
        self.next_ack += 1;
        self.acks.push_back((self.next_ack, confirm));
        self.encode(&Frame::Ping(self.next_ack));
    }
}

impl Client {
    /// The fast path: when the connection is live and no command of the
    /// handle's is queued ahead (so a caller's frames stay in order across
    /// the switch between the paths), the caller encodes its frame into the
    /// write buffer and writes it itself. A full buffer makes it wait for
    /// room up to the timeout (backpressure). `Err(out)`: take the slow
    /// path (the command channel; the outbox while away).
    pub(super) fn try_fast<'a>(&self, out: Out<'a>) -> Result<Result<(), Out<'a>>, ClientError> {
        let limit = self.cfg.write_limit_bytes;
        let mut w = self.shared.wire.lock();
        let mut deadline = None;
        loop {
            // The reactor drains commands under this lock: an empty
            // channel here means every earlier command is in the buffer.
            if !w.live || !self.cmds.is_empty() {
                return Ok(Err(out));
            }
            if w.pending() < limit {
                break;
            }
            let d = *deadline.get_or_insert_with(|| Instant::now() + self.cfg.timeout);
            if self.shared.room.wait_until(&mut w, d).timed_out()
                && w.live
                && self.cmds.is_empty()
                && w.pending() >= limit
            {
                log::warn!("bus client {}: write buffer full for {:?}", self.cfg.client_id, self.cfg.timeout);
                return Err(ClientError::Timeout(self.cfg.timeout));
            }
        }
        // Bytes already waiting are the reactor's to flush (it is about to,
        // or the socket is full and it hears when there is room).
        let idle = w.pending() == 0;
        let mut wake = false;
        match out {
            Out::Publish { topic, payload, confirm } => w.publish(topic, payload, None, confirm),
            Out::Sync { confirm } => w.sync(confirm),
            Out::Request(r) => {
                let deadline = Instant::now() + r.timeout;
                wake = r.many && w.next_wake.is_none_or(|t| deadline < t);
                w.request(&self.shared.inbox_keys, r);
            }
        }
        if idle && w.write_out().is_err() {
            wake = true;
        }
        drop(w);
        if wake {
            let _ = self.waker.wake();
        }
        Ok(Ok(()))
    }
}
