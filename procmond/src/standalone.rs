//! Standalone mode's sink: with no broker (`DAEMONEYE_BROKER_SOCKET`
//! unset), the actor's events go straight into the SQLite event store, one
//! transaction per cycle. The stream is 0 and sequence numbers continue
//! from the highest one the store holds for this collector, so a restart
//! neither reuses nor skips numbers.

use std::path::Path;
use std::time::Duration;

use crate::actor::{EventSink, SinkError, SinkStatus};
use daemoneye_contract::control::ConnectionStatus;
use daemoneye_contract::event::{EventEnvelope, ProcessEvent};
use daemoneye_store::{EventStore, StoreError};

/// The stream id of standalone events.
pub const STANDALONE_STREAM: u64 = 0;

/// Writes events into the event store.
pub struct StoreSink {
    store: EventStore,
    collector_id: String,
    next_seq: u64,
    published: u64,
}

impl StoreSink {
    /// Opens (or creates) the store at `path`.
    pub fn open(path: &Path, collector_id: &str) -> Result<StoreSink, StoreError> {
        let store = EventStore::open(path)?;
        // Pruning deletes rows but keeps the watermark; numbers at or below
        // it would be taken for duplicates.
        let max = store.max_seq(collector_id, STANDALONE_STREAM)?.unwrap_or(0);
        let watermark = store.watermark(collector_id, STANDALONE_STREAM)?.unwrap_or(0);
        let next_seq = max.max(watermark) + 1;
        Ok(StoreSink { store, collector_id: collector_id.to_owned(), next_seq, published: 0 })
    }
}

impl EventSink for StoreSink {
    fn submit(&mut self, events: Vec<ProcessEvent>) -> Result<Vec<EventEnvelope>, SinkError> {
        let first = self.next_seq;
        let envelopes: Vec<EventEnvelope> = events
            .into_iter()
            .enumerate()
            .map(|(i, event)| EventEnvelope {
                collector_id: self.collector_id.clone(),
                stream_id: STANDALONE_STREAM,
                seq: first + i as u64,
                event,
                // The store is this process's own: it never guesses, it
                // is the stream's only writer.
                position: None,
            })
            .collect();
        let outcome = self.store.insert_batch(&envelopes).map_err(|e| SinkError::retry(e.to_string()))?;
        self.next_seq += envelopes.len() as u64;
        self.published += outcome.inserted as u64;
        Ok(envelopes)
    }

    fn status(&self) -> SinkStatus {
        SinkStatus {
            connection: ConnectionStatus::Standalone,
            buffer_level_percent: 0.0,
            unacknowledged: 0,
            published: self.published,
        }
    }

    fn set_max_in_flight(&mut self, _max: usize) {}

    fn flush(&mut self, _timeout: Duration) -> Result<(), String> {
        // Every batch was committed in its own transaction.
        Ok(())
    }

    fn position(&self) -> (u64, u64) {
        (STANDALONE_STREAM, self.next_seq.saturating_sub(1))
    }

    fn events_after(&mut self, seq: u64) -> Result<Vec<ProcessEvent>, String> {
        // The store's unique (collector_id, stream_id, seq) index serves it.
        let conn = self.store.connection();
        let mut stmt = conn
            .prepare(
                "SELECT seq, record FROM process_events \
                 WHERE collector_id = ?1 AND stream_id = ?2 AND seq > ?3 ORDER BY seq",
            )
            .map_err(|e| e.to_string())?;
        let seq = i64::try_from(seq).unwrap_or(i64::MAX);
        let rows = stmt
            .query_map(rusqlite::params![self.collector_id, STANDALONE_STREAM as i64, seq], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?))
            })
            .map_err(|e| e.to_string())?;
        let mut events = Vec::new();
        for row in rows {
            let (seq, record) = row.map_err(|e| e.to_string())?;
            match ProcessEvent::decode(&record) {
                Ok(event) => events.push(event),
                Err(e) => {
                    log::error!("stored event seq {seq} does not decode ({e}); left out of the restart state")
                }
            }
        }
        Ok(events)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::record;
    use daemoneye_contract::event::EventKind;
    use daemoneye_store::Retention;

    fn events(n: u32) -> Vec<ProcessEvent> {
        (0..n)
            .map(|i| ProcessEvent {
                kind: EventKind::Started,
                snapshot: false,
                changes: Vec::new(),
                observed_unix_ms: 1,
                process: record(i + 1, 1, "p"),
                sha256: None,
                source: daemoneye_contract::event::EventSource::Poll,
                late: None,
                exit: None,
            })
            .collect()
    }

    #[test]
    fn numbering_continues_after_a_restart_and_after_pruning() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("s.db");
        let mut sink = StoreSink::open(&db, "pm").unwrap();
        assert_eq!(sink.submit(events(3)).unwrap().last().unwrap().seq, 3);
        drop(sink);
        EventStore::open(&db).unwrap().prune(&Retention { max_age: None, max_events: Some(0) }).unwrap();
        let mut sink = StoreSink::open(&db, "pm").unwrap();
        let envs = sink.submit(events(2)).unwrap();
        assert_eq!(envs.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![4, 5]);
        assert_eq!(sink.status().published, 2, "stored, not taken for duplicates");
        assert_eq!(EventStore::open(&db).unwrap().count().unwrap(), 2);
    }
}
