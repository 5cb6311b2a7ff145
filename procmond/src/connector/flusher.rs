//! The flush thread (`procmond-flush`): publishes in sequence order from
//! the buffer or the WAL, takes the store's acknowledgements and truncates
//! the WAL through them, re-sends after a reconnection or a stall, and asks
//! the actor to slow down or restore its interval as the buffer fills.

use super::*;

/// Records re-read from the WAL at a time.
const REREAD_BATCH: usize = 1024;
/// Buffer fill that slows collection down.
const SLOW_AT: f64 = 0.70;
/// Buffer fill below which the interval is restored.
const RESTORE_BELOW: f64 = 0.50;

/// A gap marker for events `from..=to` that the WAL cannot give back.
fn gap(s: &Shared, from: u64, to: u64, reason: String) -> Item {
    log::error!("events {from}..={to} of stream {} are lost: {reason}; publishing a gap marker", s.stream_id);
    let gap = StreamGap {
        collector_id: s.collector_id.clone(),
        stream_id: s.stream_id,
        from,
        to,
        reason,
        position: None,
    };
    Item { seq: from, last: to, topic: GAP_TOPIC, bytes: gap.encode() }
}

/// The flush thread's state.
pub(super) struct Flusher {
    pub(super) shared: Arc<Shared>,
    pub(super) client: Arc<Client>,
    pub(super) actor: ActorSender,
    /// The next sequence number to publish.
    pub(super) next: u64,
    /// Records re-read from the WAL, from `next` on.
    pub(super) reread: VecDeque<Item>,
    /// An open WAL replay and the sequence number it yields next, kept
    /// between batches so a long backlog is read once, not rescanned.
    pub(super) replay: Option<(daemoneye_wal::Replay, u64)>,
    pub(super) seen_connections: u64,
    /// The highest sequence number ever sent: by this run, or (every record
    /// the WAL held at startup) by an earlier one.
    pub(super) max_sent: u64,
    pub(super) slowed: bool,
    /// Last time an acknowledgement advanced (or nothing was in flight).
    pub(super) last_progress: Instant,
    pub(super) ack_timeout: Duration,
    /// Acknowledgements ignored because the store did not send them.
    pub(super) foreign_acks: u64,
}

impl Flusher {
    pub(super) fn run(mut self, cmds: Receiver<Cmd>, notify: Receiver<()>, acks: Subscription) {
        let mut ack_rx = acks.messages().clone();
        let mut flush: Option<(Instant, Sender<Result<(), String>>)> = None;
        while !self.shared.stop.load(Ordering::Acquire) {
            select! {
                recv(cmds) -> cmd => match cmd {
                    Ok(Cmd::Flush { deadline, reply }) => flush = Some((deadline, reply)),
                    Ok(Cmd::Ack(ack)) => self.on_ack(ack),
                    Err(_) => break,
                },
                recv(notify) -> _ => {}
                recv(ack_rx) -> msg => match msg {
                    // Only the store truncates the WAL: an acknowledgement
                    // from anyone else (the broker names the sender) is
                    // ignored, whatever it says.
                    Ok(msg) if msg.from != control::STORE_CLIENT_ID => {
                        self.foreign_acks += 1;
                        if self.foreign_acks.is_power_of_two() {
                            log::warn!(
                                "ignored a store acknowledgement on {} from {:?}, not the store ({} so far)",
                                msg.topic,
                                msg.from,
                                self.foreign_acks
                            );
                        }
                    }
                    Ok(msg) => match daemoneye_contract::topic::ACKS.decode(&msg) {
                        Ok(ack) => self.on_ack(ack),
                        Err(e) => log::warn!("malformed store acknowledgement on {}: {e}", msg.topic),
                    },
                    // The client is closed or refused: stop selecting on it.
                    Err(_) => ack_rx = never(),
                },
                // Each wake-up costs tens of microseconds: look again soon
                // only while something waits to go out.
                recv(after(self.poll_interval(flush.is_some()))) -> _ => {}
            }
            self.check_connection();
            self.pump();
            self.backpressure();
            if let Some((deadline, _)) = &flush {
                let done = self.next >= self.shared.wal.next_seq();
                // Disconnected, nothing more can go out now; the WAL keeps it.
                let offline = self.client.state() != ConnectionState::Connected;
                if done || offline || Instant::now() >= *deadline {
                    let left = self.shared.wal.next_seq().saturating_sub(self.next);
                    let result = if done {
                        Ok(())
                    } else {
                        log::warn!(
                            "flush: {left} events not published before the deadline; they stay in the WAL"
                        );
                        Ok(())
                    };
                    if let Some((_, reply)) = flush.take() {
                        let _ = reply.try_send(result);
                    }
                }
            }
        }
        log::debug!("procmond-flush stopped at seq {}", self.next);
    }

    fn on_ack(&mut self, ack: StoreAck) {
        let s = &*self.shared;
        if ack.stream_id != s.stream_id {
            log::debug!("acknowledgement for stream {} ignored (ours is {})", ack.stream_id, s.stream_id);
            return;
        }
        let through = ack.through;
        if through <= s.acked.load(Ordering::Acquire) {
            return;
        }
        // Invariant: only what was sent (now, or by an earlier run) can be
        // acknowledged. Anything above is a confused or hostile peer, and
        // honouring it would delete records never delivered.
        if through > self.max_sent {
            log::error!(
                "acknowledgement through {through} for stream {} refused: only {} were ever sent",
                s.stream_id,
                self.max_sent
            );
            return;
        }
        // Invariant: the WAL keeps every event after the last checkpoint.
        let truncate = through.min(s.floor.load(Ordering::Acquire));
        let truncated = if truncate > s.wal.watermark() { s.wal.truncate_through(truncate) } else { Ok(()) };
        match truncated {
            Ok(()) => {
                s.acked.store(through, Ordering::Release);
                s.measure();
                self.last_progress = Instant::now();
                if self.next <= through {
                    // The store has them already (sent before a restart).
                    self.next = through + 1;
                    self.reread.clear();
                }
                log::debug!("store acknowledged through {through}; WAL truncated");
            }
            Err(e) => log::error!("WAL truncation through {through} failed: {e}"),
        }
    }

    /// After a (re)connection, or when acknowledgements stall, publishing
    /// restarts at the first unacknowledged record.
    fn check_connection(&mut self) {
        let n = self.client.connections();
        let acked = self.shared.acked.load(Ordering::Acquire);
        if n != self.seen_connections {
            self.seen_connections = n;
            if self.next > acked + 1 {
                log::info!("bus reconnected: re-sending unacknowledged events from seq {}", acked + 1);
            }
            self.rewind(acked + 1);
        } else if self.next > acked + 1 && self.last_progress.elapsed() > self.ack_timeout {
            log::warn!(
                "no acknowledgement for {:?} with {} events in flight: re-sending from seq {}",
                self.ack_timeout,
                self.next - acked - 1,
                acked + 1
            );
            self.rewind(acked + 1);
        } else if self.next == acked + 1 {
            self.last_progress = Instant::now();
        }
    }

    /// How long the thread sleeps when nothing wakes it: 100 ms while
    /// events wait to be published (a publish that timed out is retried),
    /// 1 s otherwise (reconnections are noticed within it).
    fn poll_interval(&self, flushing: bool) -> Duration {
        let backlog = self.next < self.shared.wal.next_seq() || !self.reread.is_empty();
        if backlog || flushing { Duration::from_millis(100) } else { Duration::from_secs(1) }
    }

    fn rewind(&mut self, to: u64) {
        self.next = to;
        self.reread.clear();
        self.replay = None;
        self.last_progress = Instant::now();
    }

    /// The record at `self.next`, from the buffer or the WAL.
    fn take_next(&mut self) -> Option<Item> {
        if let Some(item) = self.reread.pop_front() {
            return Some(item);
        }
        let s = &*self.shared;
        let mut buf = s.buffer.lock();
        // Buffered records the WAL already served are dropped.
        while buf.items.front().is_some_and(|i| i.seq < self.next) {
            if let Some(i) = buf.items.pop_front() {
                buf.bytes -= i.bytes.len();
            }
        }
        if let Some(front) = buf.items.front()
            && front.seq == self.next
        {
            let item = buf.items.pop_front()?;
            buf.bytes -= item.bytes.len();
            return Some(item);
        }
        let end = s.wal.next_seq();
        if self.next >= end {
            if buf.items.is_empty() && buf.spilled {
                buf.spilled = false;
                log::info!("send buffer caught up with the WAL");
            }
            return None;
        }
        // Re-read a batch up to the first buffered record (or the end),
        // continuing the open replay when it stands where we are.
        let upto = buf.items.front().map_or(end, |i| i.seq);
        drop(buf);
        // A replay sees only the records appended before it was opened: a
        // continued one that yields nothing is retried fresh before any
        // record counts as missing.
        let reused = self.replay.as_ref().is_some_and(|(_, pos)| *pos == self.next);
        if !reused {
            self.open_replay();
        }
        self.read_batch(upto);
        if reused && self.reread.is_empty() {
            self.open_replay();
            self.read_batch(upto);
        }
        if self.reread.is_empty() && self.next < upto {
            // Nothing readable even from a fresh replay (an I/O error,
            // logged): never guess that records are gone; try again later.
            return None;
        }
        self.reread.pop_front()
    }

    fn open_replay(&mut self) {
        self.replay = match self.shared.wal.replay_from(self.next) {
            Ok(replay) => Some((replay, self.next)),
            Err(e) => {
                log::error!("WAL re-read from {} failed: {e}", self.next);
                None
            }
        };
    }

    /// Moves records from the open replay into `reread`, up to `upto` (the
    /// first buffered record) or a batch; drops the replay once exhausted.
    fn read_batch(&mut self, upto: u64) {
        let Some((replay, pos)) = &mut self.replay else { return };
        let shared = &*self.shared;
        let mut exhausted = true;
        for rec in replay.by_ref() {
            match rec {
                Ok(rec) => {
                    *pos = rec.seq + 1;
                    if rec.seq >= upto {
                        exhausted = false;
                        break;
                    }
                    let expected = self.reread.back().map_or(self.next, |i| i.last + 1);
                    if rec.seq > expected {
                        // The WAL reported damage (logged below): those
                        // records are gone. Say so, in order.
                        self.reread.push_back(gap(
                            shared,
                            expected,
                            rec.seq - 1,
                            "lost to WAL damage".into(),
                        ));
                    }
                    if rec.payload.get(4) == Some(&codec::Kind::StreamGap.byte())
                        && let Ok(gap) = StreamGap::decode(&rec.payload)
                        && (gap.from, gap.to) == (rec.seq, rec.seq)
                    {
                        // A gap record of the WAL's own (events refused at its cap).
                        self.reread.push_back(Item {
                            seq: rec.seq,
                            last: rec.seq,
                            topic: GAP_TOPIC,
                            bytes: rec.payload,
                        });
                        continue;
                    }
                    match EventEnvelope::decode(&rec.payload) {
                        Ok(env) => self.reread.push_back(Item::event(rec.seq, env.event.kind, rec.payload)),
                        Err(e) => self.reread.push_back(gap(
                            shared,
                            rec.seq,
                            rec.seq,
                            format!("record does not decode: {e}"),
                        )),
                    }
                    if self.reread.len() >= REREAD_BATCH {
                        exhausted = false;
                        break;
                    }
                }
                Err(e) => log::error!("WAL damage while re-reading: {e}"),
            }
        }
        if exhausted {
            self.replay = None;
        }
    }

    fn pump(&mut self) {
        let s = self.shared.clone();
        while self.client.state() == ConnectionState::Connected && !s.stop.load(Ordering::Acquire) {
            let in_flight = self.next.saturating_sub(s.acked.load(Ordering::Acquire) + 1);
            if in_flight >= s.max_in_flight.load(Ordering::Acquire) {
                break;
            }
            let Some(item) = self.take_next() else { break };
            let stated = restate(item.topic, &item.bytes, s.position(), s.peer.get());
            let bytes = stated.as_deref().unwrap_or(&item.bytes);
            match self.client.publish(item.topic, bytes) {
                Ok(()) => {
                    self.next = item.last + 1;
                    self.max_sent = self.max_sent.max(item.last);
                    s.published.fetch_add(1, Ordering::AcqRel);
                }
                Err(e) => {
                    // Kept for the next try, in order.
                    self.reread.push_front(item);
                    log::debug!("publish paused: {e}");
                    break;
                }
            }
        }
    }

    fn backpressure(&mut self) {
        let level = self.shared.level();
        let want = if level >= SLOW_AT {
            Some(true)
        } else if level < RESTORE_BELOW {
            Some(false)
        } else {
            None
        };
        if let Some(slow) = want
            && slow != self.slowed
        {
            let adj = if slow { IntervalAdjustment::SlowDown } else { IntervalAdjustment::Restore };
            if self.actor.adjust_interval(adj).is_ok() {
                self.slowed = slow;
                log::info!(
                    "send buffer at {:.0}%: asked the collector to {}",
                    level * 100.0,
                    if slow { "slow down 1.5x" } else { "restore its interval" }
                );
            }
        }
    }
}

/// A WAL record (or gap marker) as it goes out: with the stream's
/// position, in the agent's version (version 1 and 2 agents get their own
/// layout, without the position). `None` if it does not decode: it goes
/// out as it is, and the store settles its number as a gap.
fn restate(topic: &str, bytes: &[u8], position: StreamPosition, version: Version) -> Option<Vec<u8>> {
    if topic == GAP_TOPIC {
        let gap = StreamGap { position: Some(position), ..StreamGap::decode(bytes).ok()? };
        Some(codec::encode_as(version, &gap))
    } else {
        let env = EventEnvelope { position: Some(position), ..EventEnvelope::decode(bytes).ok()? };
        Some(codec::encode_as(version, &env))
    }
}
