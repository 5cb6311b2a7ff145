//! Where each output (the agent's forwarding to syslog, a file, ...)
//! stands: its durable cursor and its counters, in the table
//! `output_cursors` beside the events.
//!
//! # Guarantees
//!
//! - An output's cursor (`events_through`, `alerts_through`: the highest
//!   `process_events.id` and `alerts.id` it has finished with) moves only
//!   after its receiver accepted the batch, so after a crash the output
//!   resumes at the first row it had not delivered: at least once.
//! - Retention never deletes a row an output has not passed without
//!   counting it: [`crate::EventStore::prune_step`] adds the rows of each
//!   chunk above an output's `events_through` to its `lost`, in the same
//!   transaction as the delete. (A row the output was delivering at that
//!   moment is counted too: `lost` may overstate, never understate.)
//!
//! ```sql
//! CREATE TABLE output_cursors (
//!     name           TEXT    PRIMARY KEY,
//!     events_through INTEGER NOT NULL,  -- process_events.id
//!     alerts_through INTEGER NOT NULL,  -- alerts.id
//!     lost           INTEGER NOT NULL,  -- events pruned before it sent them
//!     lost_alerted   INTEGER NOT NULL,  -- `lost` when last alerted
//!     sent           INTEGER NOT NULL,  -- events and alerts accepted
//!     retried        INTEGER NOT NULL,  -- failed attempts
//!     resent         INTEGER NOT NULL,  -- documents sent again (duplicates' bound)
//!     state          TEXT    NOT NULL,  -- 'ok', 'retrying', 'stopped'
//!     last_error     TEXT,
//!     updated_ms     INTEGER NOT NULL   -- Unix milliseconds
//! ) WITHOUT ROWID;
//! ```
//!
//! The table is outside the rules' schema version: created (or, from a
//! release before `resent`, given that column) by every writable open
//! ([`create`]), read by the CLI only when present.

use rusqlite::{Connection, OptionalExtension, params};

/// The table (see the module docs).
pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS output_cursors (
    name           TEXT    PRIMARY KEY,
    events_through INTEGER NOT NULL,
    alerts_through INTEGER NOT NULL,
    lost           INTEGER NOT NULL DEFAULT 0,
    lost_alerted   INTEGER NOT NULL DEFAULT 0,
    sent           INTEGER NOT NULL DEFAULT 0,
    retried        INTEGER NOT NULL DEFAULT 0,
    resent         INTEGER NOT NULL DEFAULT 0,
    state          TEXT    NOT NULL DEFAULT 'ok',
    last_error     TEXT,
    updated_ms     INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
";

/// One output's row.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutputCursor {
    /// The output's name.
    pub name: String,
    /// The highest event row id it is done with.
    pub events_through: i64,
    /// The highest alert row id it is done with.
    pub alerts_through: i64,
    /// Events retention deleted before the output sent them.
    pub lost: u64,
    /// `lost` when the output last raised its alert about it.
    pub lost_alerted: u64,
    /// Events and alerts its receivers accepted.
    pub sent: u64,
    /// Failed delivery attempts.
    pub retried: u64,
    /// Documents sent again after a failure, or written again after a
    /// reconnect: a receiver may hold these twice (an upper bound on
    /// the duplicates, a crash of the agent's aside).
    pub resent: u64,
    /// `ok`, `retrying` or `stopped`.
    pub state: String,
    /// The last failure, if any since the last success.
    pub last_error: Option<String>,
    /// When the row was last written (Unix milliseconds).
    pub updated_ms: u64,
}

/// Creates the table when missing, and adds the columns a table made by
/// an earlier release lacks.
pub fn create(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(SCHEMA)?;
    if !has_resent(conn)? {
        conn.execute_batch("ALTER TABLE output_cursors ADD COLUMN resent INTEGER NOT NULL DEFAULT 0")?;
    }
    Ok(())
}

/// Whether the table has `resent` (a release before it made it).
fn has_resent(conn: &Connection) -> rusqlite::Result<bool> {
    let n: i64 = conn.query_row(
        "SELECT count(*) FROM pragma_table_info('output_cursors') WHERE name = 'resent'",
        [],
        |r| r.get(0),
    )?;
    Ok(n > 0)
}

/// Reads `name`'s row, creating it at the start (both cursors 0: a new
/// output sends what the store holds) when missing.
pub fn open_cursor(conn: &Connection, name: &str) -> rusqlite::Result<OutputCursor> {
    create(conn)?;
    conn.execute(
        "INSERT INTO output_cursors (name, events_through, alerts_through) VALUES (?1, 0, 0) \
         ON CONFLICT (name) DO NOTHING",
        params![name],
    )?;
    let mut all = read(conn, Some(name))?;
    all.pop().ok_or(rusqlite::Error::QueryReturnedNoRows)
}

/// Every output's row (`name: None`), or one; none when the table does not
/// exist (no agent with outputs wrote this store).
pub fn read(conn: &Connection, name: Option<&str>) -> rusqlite::Result<Vec<OutputCursor>> {
    let exists: Option<i64> = conn
        .query_row("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'output_cursors'", [], |r| {
            r.get(0)
        })
        .optional()?;
    if exists.is_none() {
        return Ok(Vec::new());
    }
    // A store an earlier release wrote, opened read-only: no `resent`.
    let resent = if has_resent(conn)? { "resent" } else { "0" };
    let mut stmt = conn.prepare(&format!(
        "SELECT name, events_through, alerts_through, lost, sent, retried, state, last_error, updated_ms, \
         lost_alerted, {resent} \
         FROM output_cursors WHERE ?1 IS NULL OR name = ?1 ORDER BY name"
    ))?;
    let u = |v: i64| u64::try_from(v).unwrap_or(0);
    let rows = stmt.query_map(params![name], |r| {
        Ok(OutputCursor {
            name: r.get(0)?,
            events_through: r.get(1)?,
            alerts_through: r.get(2)?,
            lost: u(r.get(3)?),
            sent: u(r.get(4)?),
            retried: u(r.get(5)?),
            state: r.get(6)?,
            last_error: r.get(7)?,
            updated_ms: u(r.get(8)?),
            lost_alerted: u(r.get(9)?),
            resent: u(r.get(10)?),
        })
    })?;
    rows.collect()
}

/// Writes the cursors and counters of `c` (not `lost`, which only
/// retention adds to; `lost_alerted` never goes down).
pub fn write(conn: &Connection, c: &OutputCursor) -> rusqlite::Result<()> {
    let i = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    conn.execute(
        "UPDATE output_cursors SET events_through = max(events_through, ?2), \
         alerts_through = max(alerts_through, ?3), sent = ?4, retried = ?5, state = ?6, last_error = ?7, \
         updated_ms = ?8, lost_alerted = max(lost_alerted, ?9), resent = ?10 WHERE name = ?1",
        params![
            c.name,
            c.events_through,
            c.alerts_through,
            i(c.sent),
            i(c.retried),
            c.state,
            c.last_error,
            i(c.updated_ms),
            i(c.lost_alerted),
            i(c.resent)
        ],
    )?;
    Ok(())
}

/// Inside a prune's transaction, before the rows of `temp.prune_ids` are
/// deleted: adds to each output's `lost` the ones it has not passed.
pub(crate) fn count_lost(tx: &Connection) -> rusqlite::Result<()> {
    tx.execute(
        "UPDATE output_cursors SET lost = lost + \
         (SELECT count(*) FROM temp.prune_ids WHERE id > output_cursors.events_through) \
         WHERE EXISTS (SELECT 1 FROM temp.prune_ids WHERE id > output_cursors.events_through)",
        [],
    )?;
    Ok(())
}

/// The lag of a cursor: the rows above it (a range of the primary key)
/// and the observed time of the oldest (`None` when there is none).
pub fn event_lag(conn: &Connection, events_through: i64) -> rusqlite::Result<(u64, Option<u64>)> {
    let (count, oldest): (i64, Option<i64>) = conn.query_row(
        "SELECT (SELECT count(*) FROM process_events WHERE id > ?1), \
         (SELECT observed_ms FROM process_events WHERE id > ?1 ORDER BY id LIMIT 1)",
        params![events_through],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    Ok((u64::try_from(count).unwrap_or(0), oldest.and_then(|t| u64::try_from(t).ok())))
}
