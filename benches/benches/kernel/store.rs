//! A read-only connection to the agent's store (`events.db`), reading the
//! rows committed since the last read.

use std::path::Path;
use std::time::Duration;

use daemoneye_contract::event::ProcessEvent;
use rusqlite::{Connection, OpenFlags};

/// A read-only connection to the agent's store, reading new rows only.
pub(super) struct Store {
    pub(super) conn: Connection,
    pub(super) last_id: i64,
    pub(super) errors: u64,
}

impl Store {
    /// `None` until the file and its table exist.
    pub(super) fn open(path: &Path) -> Option<Store> {
        if !path.is_file() {
            return None;
        }
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(path, flags).ok()?;
        conn.busy_timeout(Duration::from_millis(100)).ok()?;
        conn.query_row("SELECT count(*) FROM process_events WHERE id < 0", [], |_| Ok(())).ok()?;
        Some(Store { conn, last_id: 0, errors: 0 })
    }

    /// Events committed since the last call, decoded from their `record`,
    /// with their collector id.
    pub(super) fn new_events(&mut self) -> Vec<(String, ProcessEvent)> {
        let mut out = Vec::new();
        let Ok(mut stmt) = self
            .conn
            .prepare_cached("SELECT id, collector_id, record FROM process_events WHERE id > ?1 ORDER BY id")
        else {
            self.errors += 1;
            return out;
        };
        let rows = stmt.query_map([self.last_id], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?, r.get::<_, Vec<u8>>(2)?))
        });
        match rows {
            Ok(rows) => {
                for row in rows {
                    match row {
                        Ok((id, collector, record)) => {
                            self.last_id = id;
                            match ProcessEvent::decode(&record) {
                                Ok(e) => out.push((collector, e)),
                                Err(_) => self.errors += 1,
                            }
                        }
                        Err(_) => {
                            self.errors += 1;
                            break;
                        }
                    }
                }
            }
            Err(_) => self.errors += 1,
        }
        out
    }
}
