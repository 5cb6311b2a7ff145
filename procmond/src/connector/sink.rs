//! The actor's side of the connector, its [`EventSink`]: `submit` numbers
//! the events, appends them to the WAL (a gap marker first for events
//! refused at the cap) and queues them in the buffer, or marks it spilled;
//! and the status, flush, restart (`events_after`) and checkpoint calls.

use super::*;

impl EventSink for Connector {
    fn submit(&mut self, events: Vec<ProcessEvent>) -> Result<Vec<EventEnvelope>, SinkError> {
        let s = &*self.shared;
        // The buffer lock is held across the append so the flush thread
        // never sees a record in the WAL that is neither buffered nor
        // marked spilled.
        let mut buf = s.buffer.lock();
        if events.is_empty() {
            return Ok(Vec::new());
        }
        // Invariant: at the cap nothing is appended, and nothing refused
        // goes unrecorded (counted now, a gap marker once there is room).
        if s.wal_bytes.load(Ordering::Acquire) >= s.cap {
            s.measure();
        }
        if s.wal_bytes.load(Ordering::Acquire) >= s.cap {
            let now = crate::actor::unix_ms();
            let n = events.len() as u64;
            s.refused.fetch_add(n, Ordering::AcqRel);
            let mut lost = s.lost.lock();
            let (count, first_ms, _) = lost.unwrap_or((0, now, now));
            *lost = Some((count + n, first_ms, now));
            if !s.full.swap(true, Ordering::AcqRel) {
                s.full_times.fetch_add(1, Ordering::AcqRel);
                log::error!(
                    "WAL at its cap ({} of {} bytes, the store has not acknowledged): new events are refused \
                     and counted until it acknowledges",
                    s.wal_bytes.load(Ordering::Acquire),
                    s.cap
                );
            }
            return Ok(Vec::new());
        }
        let mut first = s.wal.next_seq();
        let mut payloads: Vec<Vec<u8>> = Vec::with_capacity(events.len() + 1);
        let mut gap_seq = None;
        let lost = *s.lost.lock();
        if let Some((count, first_ms, last_ms)) = lost {
            // The events refused at the cap, as one record of their own.
            let reason = format!(
                "{count} events refused: the WAL was at its cap ({} bytes) between Unix ms {first_ms} and \
                 {last_ms}",
                s.cap
            );
            let gap = StreamGap {
                collector_id: s.collector_id.clone(),
                stream_id: s.stream_id,
                from: first,
                to: first,
                reason,
                position: None,
            };
            payloads.push(gap.encode());
            gap_seq = Some(first);
            first += 1;
        }
        let envelopes: Vec<EventEnvelope> = events
            .into_iter()
            .enumerate()
            .map(|(i, event)| EventEnvelope {
                collector_id: s.collector_id.clone(),
                stream_id: s.stream_id,
                seq: first + i as u64,
                event,
                position: None,
            })
            .collect();
        payloads.extend(envelopes.iter().map(EventEnvelope::encode));
        let first = gap_seq.unwrap_or(first);
        let range = s.wal.append_batch(&payloads).map_err(|e| SinkError {
            fatal: matches!(e, daemoneye_wal::Error::Poisoned { .. }),
            message: format!("WAL append: {e}"),
        })?;
        if range.start != first {
            // Only this thread appends; anything else is a bug worth stopping for.
            return Err(SinkError {
                message: format!("WAL assigned {range:?}, expected {first}"),
                fatal: true,
            });
        }
        s.wal_bytes
            .fetch_add(payloads.iter().map(|p| p.len() as u64 + RECORD_OVERHEAD).sum(), Ordering::AcqRel);
        {
            let mut ages = s.ages.lock();
            if ages.len() < AGES_KEPT {
                ages.push_back((first, Instant::now()));
            }
        }
        let mut payloads = payloads.into_iter();
        if let Some(seq) = gap_seq {
            *s.lost.lock() = None;
            s.full.store(false, Ordering::Release);
            let bytes = payloads.next().unwrap_or_default();
            log::warn!("WAL below its cap again: the refused events are recorded as gap {seq}");
            if !buf.spilled && buf.bytes + bytes.len() <= s.limit {
                buf.bytes += bytes.len();
                buf.items.push_back(Item { seq, last: seq, topic: GAP_TOPIC, bytes });
            } else {
                buf.spilled = true;
            }
        } else if s.full.swap(false, Ordering::AcqRel) {
            log::warn!("WAL below its cap again");
        }
        for (env, bytes) in envelopes.iter().zip(payloads) {
            if !buf.spilled && buf.bytes + bytes.len() <= s.limit {
                buf.bytes += bytes.len();
                buf.items.push_back(Item::event(env.seq, env.event.kind, bytes));
            } else {
                if !buf.spilled {
                    log::warn!(
                        "send buffer full ({} bytes): events wait in the WAL from seq {}",
                        s.limit,
                        env.seq
                    );
                }
                buf.spilled = true;
            }
        }
        drop(buf);
        let _ = self.notify.try_send(());
        Ok(envelopes)
    }

    fn status(&self) -> SinkStatus {
        let s = &*self.shared;
        let appended = s.wal.next_seq().saturating_sub(1);
        SinkStatus {
            connection: if self.client.state() == ConnectionState::Connected {
                ConnectionStatus::Connected
            } else {
                ConnectionStatus::Disconnected
            },
            buffer_level_percent: s.level() * 100.0,
            unacknowledged: appended.saturating_sub(s.acked.load(Ordering::Acquire)),
            published: s.published.load(Ordering::Acquire),
        }
    }

    fn set_max_in_flight(&mut self, max: usize) {
        self.shared.max_in_flight.store(max.max(1) as u64, Ordering::Release);
        let _ = self.notify.try_send(());
    }

    fn flush(&mut self, timeout: Duration) -> Result<(), String> {
        let (tx, rx) = bounded(1);
        let deadline = Instant::now() + timeout;
        self.cmds
            .try_send(Cmd::Flush { deadline, reply: tx })
            .map_err(|_| "flush thread busy or gone".to_owned())?;
        let _ = self.notify.try_send(());
        let published = rx.recv_deadline(deadline + Duration::from_millis(500)).unwrap_or(Ok(()));
        // Under `Always` every append is durable already; this reports a
        // poisoned log.
        self.shared.wal.sync().map_err(|e| e.to_string())?;
        published
    }

    fn position(&self) -> (u64, u64) {
        (self.shared.stream_id, self.shared.wal.next_seq().saturating_sub(1))
    }

    fn events_after(&mut self, seq: u64) -> Result<Vec<ProcessEvent>, String> {
        let replay = self.shared.wal.replay_from(seq.saturating_add(1)).map_err(|e| e.to_string())?;
        let mut events = Vec::new();
        for rec in replay {
            match rec {
                Ok(rec) => match EventEnvelope::decode(&rec.payload) {
                    Ok(env) => events.push(env.event),
                    Err(e) => log::error!(
                        "WAL record {} does not decode ({e}); left out of the restart state",
                        rec.seq
                    ),
                },
                Err(e) => log::error!("WAL damage while reading the events after seq {seq}: {e}"),
            }
        }
        Ok(events)
    }

    fn checkpointed(&mut self, seq: u64) {
        let s = &*self.shared;
        let floor = s.floor.fetch_max(seq, Ordering::AcqRel).max(seq);
        // What the store acknowledged before this checkpoint can go now:
        // with a full WAL no new event (so no new acknowledgement) may come
        // to do it.
        let truncate = s.acked.load(Ordering::Acquire).min(floor);
        if truncate > s.wal.watermark() {
            match s.wal.truncate_through(truncate) {
                Ok(()) => s.measure(),
                Err(e) => log::error!("WAL truncation through {truncate} failed: {e}"),
            }
        }
    }
}
