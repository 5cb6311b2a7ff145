//! The SQLite event store: where process events are kept, deduplicated by
//! `(collector_id, stream_id, seq)`, and where the per-stream committed
//! watermark lives. procmond's standalone mode writes its events straight
//! into it; the agent's store writer commits batches received from the bus
//! and then publishes each stream's watermark (which lets the collector
//! truncate its WAL), and the agent's detection rules run SQL over these
//! tables through [`EventStore::connection`].
//!
//! This crate (`daemoneye-store`) holds the store, its retention
//! ([`Retention`], [`EventStore::prune`], in bounded chunks: [`Pruning`])
//! and the detection rules ([`rules`]), so the agent, the CLI and
//! procmond's standalone mode share them without the agent or the CLI
//! linking any collector code. Records are the contract's
//! (`daemoneye_contract::event`).
//!
//! # Guarantees
//!
//! - A batch is one transaction: after a crash it is wholly present or
//!   wholly absent. The database runs in WAL journal mode with
//!   `synchronous=FULL`, so a committed batch survives power loss. This
//!   matters because a committed watermark is acknowledged to the
//!   collector, which then deletes those records from its own WAL: the
//!   store is the only copy left.
//! - Each `(collector_id, stream_id, seq)` is kept once: a replayed event
//!   is counted as a duplicate and not stored again, even after its row was
//!   pruned (see [Watermarks](#watermarks)).
//! - The `record` column (the whole [`ProcessEvent`] in the contract's
//!   encoding, `daemoneye_contract::codec`: a header with kind and
//!   version, then postcard; rows from schema 1 and 2 hold headerless
//!   version 1 blobs, read as they are) is the
//!   source of truth and what [`EventStore::query`] decodes; the other
//!   columns are a flat, indexed view of it for SQL. A record that fails
//!   to decode is reported as [`StoreError::Corrupt`] naming its row id,
//!   never a panic.
//!
//! # Schema (version 3, in `PRAGMA user_version`)
//!
//! Detection rules are written against this schema; changing a column is a
//! schema version bump. A database with a newer version than
//! [`SCHEMA_VERSION`] is refused ([`StoreError::SchemaVersion`]).
//!
//! A version 1 database is migrated by [`EventStore::open`], in the same
//! immediate transaction that reads its version: version 2 appended the
//! columns from `source` to `late_before_ms` to `process_events` (`ALTER
//! TABLE … ADD COLUMN`, so the result is the table below, column for
//! column) and nothing else. The rows it had read `source = 'poll'`,
//! `late = 0` and NULL for the rest, which is what their `record` decodes
//! to. Version 3 changed no column: new `record` blobs carry the
//! contract's header (kind, version); a version 2 database only has its
//! version raised, and its headerless blobs are read as version 1 records.
//! [`EventStore::open_read_only`] does not migrate: it refuses an older
//! database until the agent (or standalone procmond) has opened it for
//! writing.
//!
//! ```sql
//! CREATE TABLE process_events (
//!     id             INTEGER PRIMARY KEY AUTOINCREMENT,
//!     collector_id   TEXT    NOT NULL,
//!     stream_id      INTEGER NOT NULL,
//!     seq            INTEGER NOT NULL,
//!     kind           TEXT    NOT NULL CHECK (kind IN ('started', 'stopped', 'modified')),
//!     snapshot       INTEGER NOT NULL,  -- 0 or 1
//!     changes        TEXT    NOT NULL,  -- e.g. 'exec,credentials'; '' if none
//!     observed_ms    INTEGER NOT NULL,  -- Unix milliseconds
//!     pid            INTEGER NOT NULL,
//!     ppid           INTEGER NOT NULL,
//!     start_time     INTEGER NOT NULL,  -- the backend's unit (identity with pid)
//!     started_unix   INTEGER,           -- Unix seconds
//!     name           TEXT    NOT NULL,
//!     exe            TEXT,
//!     exe_deleted    INTEGER,           -- 0 or 1
//!     argv           TEXT,              -- JSON array of strings, sanitized
//!     argv_truncated INTEGER NOT NULL,  -- 0 or 1 (0 when argv is NULL)
//!     cwd            TEXT,
//!     uid            INTEGER,
//!     euid           INTEGER,
//!     gid            INTEGER,
//!     egid           INTEGER,
//!     user           TEXT,
//!     state          TEXT    NOT NULL,
//!     rss_bytes      INTEGER NOT NULL,
//!     sha256         TEXT,              -- lowercase hex, only when hashed
//!     record         BLOB    NOT NULL,  -- postcard of the ProcessEvent
//!     source         TEXT    NOT NULL DEFAULT 'poll' CHECK (source IN ('poll', 'kernel')),
//!     exit_code      INTEGER,           -- stopped events of the kernel path
//!     exit_signal    INTEGER,           -- stopped events of the kernel path
//!     late           INTEGER NOT NULL DEFAULT 0,  -- 0 or 1
//!     late_after_ms  INTEGER,           -- Unix milliseconds, only when late
//!     late_before_ms INTEGER,           -- Unix milliseconds, only when late
//!     UNIQUE (collector_id, stream_id, seq)
//! );
//! CREATE INDEX process_events_observed_ms ON process_events (observed_ms);
//! CREATE INDEX process_events_pid ON process_events (pid);
//! CREATE INDEX process_events_name ON process_events (name);
//! CREATE INDEX process_events_kind ON process_events (kind);
//!
//! CREATE TABLE stream_watermarks (
//!     collector_id TEXT    NOT NULL,
//!     stream_id    INTEGER NOT NULL,
//!     through      INTEGER NOT NULL,
//!     PRIMARY KEY (collector_id, stream_id)
//! ) WITHOUT ROWID;
//!
//! -- Sequence numbers a collector reported lost (WAL damage): settled,
//! -- never to be stored, recorded so the loss stays visible.
//! CREATE TABLE stream_gaps (
//!     collector_id TEXT    NOT NULL,
//!     stream_id    INTEGER NOT NULL,
//!     from_seq     INTEGER NOT NULL,
//!     to_seq       INTEGER NOT NULL,
//!     reason       TEXT    NOT NULL,
//!     observed_ms  INTEGER NOT NULL,
//!     PRIMARY KEY (collector_id, stream_id, from_seq)
//! ) WITHOUT ROWID;
//! ```
//!
//! Column notes:
//!
//! - NULL means the field was unavailable (the reason is in `record`);
//!   missing is never an empty string. `uid`, `euid`, `gid` and `egid` are
//!   all NULL or all set.
//! - `kind` and `changes` use [`EventKind::as_str`] and [`Change::as_str`].
//!   `state` is one of `running`, `sleeping`, `disk_sleep`, `stopped`,
//!   `traced`, `zombie`, `dead`, `idle`, `other:<letter>` or `unknown`.
//! - `exe` and `cwd` replace non-UTF-8 bytes (the exact path is in
//!   `record`). `sha256` is set only for a successful hash; too large,
//!   deferred and unreadable executables leave it NULL.
//! - `stream_id` is the `u64` stored bit for bit in SQLite's signed 64-bit
//!   integer, so ids above `i64::MAX` read as negative in SQL (the API
//!   converts back). Counters and times (`observed_ms`, `start_time`,
//!   `started_unix`, `rss_bytes`, `late_after_ms`, `late_before_ms`)
//!   beyond `i64::MAX` are clamped to it in their columns; `seq` must fit
//!   (a WAL counts from 1).
//! - `id` is `AUTOINCREMENT` so it is never reused, not even after pruning
//!   empties the table: a `--follow` reader that polls with `id > last`
//!   would otherwise miss new rows.
//! - `source` is [`EventSource::as_str`](daemoneye_contract::event::EventSource::as_str):
//!   `kernel` for what the kernel's process events reported as it
//!   happened, `poll` for what the periodic walk found (the first
//!   snapshot, every event in poll mode, and in kernel mode what the
//!   kernel path missed).
//! - `exit_code` (0–255) and `exit_signal` say how a process ended: at
//!   most one is set, and only on a `stopped` event that carries its exit
//!   status (the kernel path's; the walk cannot know it). Whether a core
//!   was dumped is in `record`.
//! - `late` is 1 for a change that happened while the collector was not
//!   running, found at its restart; it happened after `late_after_ms` and
//!   before `late_before_ms`, which are NULL unless `late` is 1.
//!
//! # Watermarks
//!
//! `stream_watermarks.through` is the highest `seq` such that every `seq`
//! up to it is settled: committed, or recorded in `stream_gaps` with a
//! reason. The store never guesses where a stream starts: a collector
//! states its base with every event, gap marker and registration
//! ([`StreamPosition`]: the lowest `seq` it still holds, and the next it
//! will assign), and
//!
//! - a stream the store has never seen starts at that base: everything
//!   below it is recorded as a gap ([`REASON_BEFORE_BASE`]) and the
//!   watermark waits for the base itself. So a stream's first events lost
//!   on the way (the broker cut the store's client while they were
//!   queued) hold the watermark back until the collector's replay brings
//!   them; they are never skipped.
//! - a store behind its collector (restored from an older backup: its
//!   watermark is below `base - 1`) records the numbers in between as a
//!   gap ([`REASON_BEHIND`]) and moves on, so acknowledgements advance
//!   and the collector's WAL stops growing.
//! - a store ahead of its collector (a watermark at or above the
//!   collector's `next`: the collector cannot have produced what the store
//!   settled) refuses the collector's events loudly instead of dropping
//!   them as duplicates. A collector makes a fresh stream id with every
//!   fresh WAL, so only a confused or forged collector gets here.
//! - an event or gap marker outside `base..next` is refused: a collector
//!   can neither settle numbers it has not produced nor send back numbers
//!   it no longer holds.
//! - an event that arrives at a number a recorded gap covers, with no row
//!   there, refutes the gap (a collector never sends a number it declared
//!   lost): the gap is cut before it, the watermark falls back below it and
//!   the event is stored. A forged far gap (to 2^62, say) therefore never
//!   makes the store drop the real events that follow.
//!
//! A collector of an earlier release states no position: a stream it
//! starts is based on the lowest `seq` of the first batch that carries it,
//! minus 1 (that release's behaviour), and its gap markers are taken as
//! they come. A gap (an event lost on the bus) holds the watermark back
//! until the collector's replay fills it.
//!
//! Pruning deletes rows but never watermarks, and [`EventStore::insert_batch`]
//! treats any `seq <= through` as a duplicate without looking for its row.
//! So an acknowledged event whose row was pruned is still recognised when a
//! collector replays it (a collector may replay acknowledged records if it
//! crashed before recording the acknowledgement), and is not stored twice.
//! The consequence: a stream's sequence numbers are never reused, which the
//! WAL guarantees.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod open;
pub mod outputs;
pub mod own;
mod retention;
mod row;
pub mod rules;
mod streams;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use daemoneye_platform::{ExitStatus, ProcessState};
use rusqlite::types::Value;
use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior, params};

use open::{SCHEMA, configure, create_parent, create_private_file, init_schema, open_error, user_version};
pub use retention::{PRUNE_CHUNK, Pruning};
use row::EventRow;
use streams::{advance, gap_at, latest, place, record_gap, refute};

use daemoneye_contract::event::{
    EventEnvelope, EventKind, HashOutcome, ProcessEvent, StreamGap, StreamPosition,
};

/// The schema version this build creates and reads (`PRAGMA user_version`).
pub const SCHEMA_VERSION: u32 = 3;

/// How long a statement waits for another connection's lock before it
/// fails with "database is locked".
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The reason recorded for the numbers below a new stream's base.
pub const REASON_BEFORE_BASE: &str =
    "before the collector's base: acknowledged to another store or lost before this store saw the stream";
/// The reason recorded when the store is behind its collector.
pub const REASON_BEHIND: &str = "the collector no longer holds these: acknowledged to another store or lost \
     (was this store restored from an older backup?)";

/// The recorded gap that covers `?3`, if any: its start and end.
const SELECT_GAP_AT: &str = "
SELECT from_seq, to_seq FROM stream_gaps
WHERE collector_id = ?1 AND stream_id = ?2 AND from_seq <= ?3 AND to_seq >= ?3
ORDER BY to_seq DESC LIMIT 1";

/// The furthest end of a recorded gap that covers `?3`.
const SELECT_GAP_COVERING: &str = "
SELECT MAX(to_seq) FROM stream_gaps
WHERE collector_id = ?1 AND stream_id = ?2 AND from_seq <= ?3 AND to_seq >= ?3";

const INSERT_GAP: &str = "
INSERT INTO stream_gaps (collector_id, stream_id, from_seq, to_seq, reason, observed_ms)
VALUES (?1, ?2, ?3, ?4, ?5, ?6)
ON CONFLICT (collector_id, stream_id, from_seq) DO NOTHING";

/// The insert of one event. A conflict on the dedup key is ignored (and
/// counted by the caller); any other constraint failure is an error, not a
/// silent skip.
const INSERT_EVENT: &str = "
INSERT INTO process_events (
    collector_id, stream_id, seq, kind, snapshot, changes, observed_ms,
    pid, ppid, start_time, started_unix, name, exe, exe_deleted, argv,
    argv_truncated, cwd, uid, euid, gid, egid, user, state, rss_bytes,
    sha256, record, source, exit_code, exit_signal, late, late_after_ms,
    late_before_ms
) VALUES (
    ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16,
    ?17, ?18, ?19, ?20, ?21, ?22, ?23, ?24, ?25, ?26, ?27, ?28, ?29, ?30,
    ?31, ?32
) ON CONFLICT (collector_id, stream_id, seq) DO NOTHING";

const SELECT_WATERMARK: &str =
    "SELECT through FROM stream_watermarks WHERE collector_id = ?1 AND stream_id = ?2";

const UPSERT_WATERMARK: &str = "
INSERT INTO stream_watermarks (collector_id, stream_id, through) VALUES (?1, ?2, ?3)
ON CONFLICT (collector_id, stream_id) DO UPDATE SET through = excluded.through";

/// Sequence numbers above a watermark, in order; walked only while they
/// are contiguous (the dedup key's index serves it as a range scan).
const SELECT_SEQS_ABOVE: &str = "
SELECT seq FROM process_events
WHERE collector_id = ?1 AND stream_id = ?2 AND seq > ?3
ORDER BY seq";

/// Errors of the event store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// An SQLite call failed after the store was open (including "database
    /// is locked" once the busy timeout ran out).
    #[error("event store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// SQLite failed while opening or initializing the database (not a
    /// database, permission denied, read-only file system, ...).
    #[error("cannot open event store {}: {source}", path.display())]
    Open {
        /// The database file.
        path: PathBuf,
        /// What SQLite reported.
        source: rusqlite::Error,
    },
    /// [`EventStore::open_read_only`] was given a file that does not exist.
    #[error("event store {} does not exist", path.display())]
    NotFound {
        /// The database file.
        path: PathBuf,
    },
    /// The database's schema version is not the one this build knows: a
    /// newer DaemonEye wrote it, or (version 0, read-only open) the file is
    /// not an initialized event store.
    #[error("event store schema version {found} is not supported (this build uses version {supported})")]
    SchemaVersion {
        /// The version in the file (`PRAGMA user_version`).
        found: u32,
        /// [`SCHEMA_VERSION`].
        supported: u32,
    },
    /// A row's `record` blob does not decode (or one of its key columns is
    /// out of range).
    #[error("event store row {id} is corrupt: {reason}")]
    Corrupt {
        /// The row's `id`.
        id: i64,
        /// Why it could not be read.
        reason: String,
    },
    /// An event that cannot be stored: its `seq` is beyond SQLite's integer
    /// range, or it failed to encode. Nothing of its batch was committed.
    #[error("cannot store event {collector_id}/{stream_id}/{seq}: {reason}")]
    Unstorable {
        /// The event's collector.
        collector_id: String,
        /// The event's stream.
        stream_id: u64,
        /// The event's sequence number.
        seq: u64,
        /// Why.
        reason: String,
    },
    /// A file system operation around the database failed (creating its
    /// directory or file, checking that it exists).
    #[error("event store {}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// The committed watermark of one stream: every `seq` from the stream's
/// base through `through` is in the store.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StreamWatermark {
    /// The collector.
    pub collector_id: String,
    /// Its stream.
    pub stream_id: u64,
    /// The highest contiguously committed sequence number.
    pub through: u64,
}

/// What [`EventStore::insert_batch`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchOutcome {
    /// Events stored.
    pub inserted: usize,
    /// Events ignored because the store already had (or had acknowledged
    /// and since pruned) their `(collector_id, stream_id, seq)`.
    pub duplicates: usize,
    /// The watermark of every stream the batch touched, changed or not, in
    /// order of first appearance in the batch: what to acknowledge.
    pub watermarks: Vec<StreamWatermark>,
    /// Events refused as implausible (outside the position their collector
    /// stated, or a stream the store is ahead of), with the reason: not
    /// stored, not settled.
    pub refused: Vec<(u64, String)>,
    /// Gaps the store recorded itself (a base, a store behind, a refuted
    /// gap), with their reasons, for the log.
    pub gaps: Vec<(StreamGapKey, String)>,
}

/// A range of one stream's sequence numbers.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StreamGapKey {
    /// The collector.
    pub collector_id: String,
    /// The stream.
    pub stream_id: u64,
    /// First number.
    pub from: u64,
    /// Last number (inclusive).
    pub to: u64,
}

/// What [`EventStore::insert_gap`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GapOutcome {
    /// The stream's watermark: what to acknowledge.
    pub watermark: StreamWatermark,
    /// Why the gap was refused, if it was (nothing changed).
    pub refused: Option<String>,
    /// Gaps the store recorded itself on the way (a base, a store behind).
    pub gaps: Vec<(StreamGapKey, String)>,
}

/// A filter for [`EventStore::query`]; every set field must match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventQuery {
    /// Observed at or after this time (Unix milliseconds).
    pub since_ms: Option<u64>,
    /// Observed strictly before this time (Unix milliseconds).
    pub until_ms: Option<u64>,
    /// This process id.
    pub pid: Option<u32>,
    /// A glob (`*` any run of characters, `?` one, nothing else special,
    /// case-sensitive) matched against the process name or the file name
    /// of its executable, as `ps --name` (`control::glob_match`).
    pub name: Option<String>,
    /// This kind of event.
    pub kind: Option<EventKind>,
    /// From this collector.
    pub collector_id: Option<String>,
    /// Rows with an `id` greater than this (a `--follow` cursor).
    pub after_id: Option<i64>,
    /// At most this many rows, the lowest ids first; 0 means no limit.
    pub limit: usize,
}

/// One stored event, decoded from its row's `record`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    /// The row id (increasing in commit order, never reused).
    pub id: i64,
    /// The collector that saw it.
    pub collector_id: String,
    /// Its stream.
    pub stream_id: u64,
    /// Its position in the stream.
    pub seq: u64,
    /// The event.
    pub event: ProcessEvent,
}

/// How much history [`EventStore::prune`] keeps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retention {
    /// Delete events observed longer ago than this.
    pub max_age: Option<Duration>,
    /// Keep at most this many events, deleting the oldest (lowest ids).
    pub max_events: Option<u64>,
}

/// The SQLite event store. One connection; not shared between threads
/// (the agent gives it to its store writer thread; readers open their
/// own, which WAL mode lets run beside the writer).
#[derive(Debug)]
pub struct EventStore {
    conn: Connection,
    path: PathBuf,
}

/// A stream touched by a batch, while the batch is applied.
struct Touched<'a> {
    collector_id: &'a str,
    stream_id: u64,
    /// The watermark before the batch, if the store knew the stream.
    stored: Option<u64>,
    /// The lowest `seq` of this stream in the batch.
    min_seq: u64,
    /// The latest position the batch states for it (bases only rise).
    position: Option<StreamPosition>,
    /// The watermark this batch starts from (after base gaps, refuted
    /// gaps), set once placed.
    through: u64,
}

/// The `WHERE` conditions of an [`EventQuery`] and their values.
fn filters(q: &EventQuery) -> (Vec<&'static str>, Vec<Value>) {
    let mut conditions: Vec<&'static str> = Vec::new();
    let mut values: Vec<Value> = Vec::new();
    if let Some(since) = q.since_ms {
        conditions.push("observed_ms >= ?");
        values.push(Value::Integer(clamp_i64(since)));
    }
    if let Some(until) = q.until_ms {
        conditions.push("observed_ms < ?");
        values.push(Value::Integer(clamp_i64(until)));
    }
    if let Some(pid) = q.pid {
        conditions.push("pid = ?");
        values.push(Value::Integer(i64::from(pid)));
    }
    if let Some(pattern) = &q.name {
        // The glob of `ps --name` (`control::glob_match`: `*`, `?`, every
        // other character itself) as SQLite's GLOB, whose `[` opens a
        // class: `[[]` is a literal `[`. Against the name, or the file name
        // of the executable (the text after its last `/`).
        conditions.push("(name GLOB ? OR substr(exe, length(rtrim(exe, replace(exe, '/', ''))) + 1) GLOB ?)");
        let glob = pattern.replace('[', "[[]");
        values.push(Value::Text(glob.clone()));
        values.push(Value::Text(glob));
    }
    if let Some(kind) = q.kind {
        conditions.push("kind = ?");
        values.push(Value::Text(kind.as_str().to_owned()));
    }
    if let Some(collector_id) = &q.collector_id {
        conditions.push("collector_id = ?");
        values.push(Value::Text(collector_id.clone()));
    }
    if let Some(after) = q.after_id {
        conditions.push("id > ?");
        values.push(Value::Integer(after));
    }
    (conditions, values)
}

fn where_clause(sql: &mut String, conditions: &[&str]) {
    if !conditions.is_empty() {
        sql.push_str(" WHERE ");
        sql.push_str(&conditions.join(" AND "));
    }
}

impl EventStore {
    /// Opens the store at `path` for reading and writing, creating the
    /// database (and its parent directory, mode 0700 on Unix) if missing.
    /// A new database file is created with mode 0600 on Unix; SQLite gives
    /// its `-wal` and `-shm` files the same mode.
    ///
    /// Sets WAL journal mode, `synchronous=FULL`, a 5 s busy timeout and
    /// foreign keys on, and creates the schema in an empty database.
    pub fn open(path: &Path) -> Result<EventStore, StoreError> {
        create_parent(path)?;
        create_private_file(path)?;
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let mut conn = Connection::open_with_flags(path, flags).map_err(|e| open_error(path, e))?;
        configure(&conn).map_err(|e| open_error(path, e))?;
        init_schema(&mut conn, path)?;
        // Outside the versioned schema (the rules do not read it).
        outputs::create(&conn).map_err(|e| open_error(path, e))?;
        Ok(EventStore { conn, path: path.to_owned() })
    }

    /// An empty store of the current schema held in memory (SQLite's
    /// `:memory:`, temporary tables and sorts in memory too), gone when it
    /// is dropped: what rules are checked against ([`rules::validate`]).
    /// It touches no file, so it needs no writable (or trustworthy)
    /// temporary directory. [`EventStore::path`] is `:memory:`.
    pub fn open_in_memory() -> Result<EventStore, StoreError> {
        let path = Path::new(":memory:");
        let mut conn = Connection::open_in_memory().map_err(|e| open_error(path, e))?;
        conn.execute_batch("PRAGMA temp_store = MEMORY; PRAGMA foreign_keys = ON;")
            .map_err(|e| open_error(path, e))?;
        let tx = conn.transaction().map_err(|e| open_error(path, e))?;
        tx.execute_batch(SCHEMA).map_err(|e| open_error(path, e))?;
        outputs::create(&tx).map_err(|e| open_error(path, e))?;
        tx.pragma_update(None, "user_version", SCHEMA_VERSION).map_err(|e| open_error(path, e))?;
        tx.commit().map_err(|e| open_error(path, e))?;
        Ok(EventStore { conn, path: path.to_owned() })
    }

    /// Opens an existing store read-only (the CLI). Fails with
    /// [`StoreError::NotFound`] if the file does not exist, and with
    /// [`StoreError::SchemaVersion`] if it is not an event store of this
    /// schema version. Writes through this store fail.
    pub fn open_read_only(path: &Path) -> Result<EventStore, StoreError> {
        match std::fs::metadata(path) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StoreError::NotFound { path: path.to_owned() });
            }
            Err(source) => return Err(StoreError::Io { path: path.to_owned(), source }),
        }
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(path, flags).map_err(|e| open_error(path, e))?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(|e| open_error(path, e))?;
        let found = user_version(&conn).map_err(|e| open_error(path, e))?;
        if found != SCHEMA_VERSION {
            return Err(StoreError::SchemaVersion { found, supported: SCHEMA_VERSION });
        }
        Ok(EventStore { conn, path: path.to_owned() })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The connection, for SQL over the tables (detection rules). Its
    /// schema is in the module docs.
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// The connection, mutably: [`rules::RuleEngine::run`] installs
    /// SQLite's progress handler on it for the rules' time budget.
    pub fn connection_mut(&mut self) -> &mut Connection {
        &mut self.conn
    }

    /// Stores a batch in one transaction and advances the watermark of
    /// every stream it touches (see [Watermarks](#watermarks) for where a
    /// stream starts and what is refused).
    ///
    /// An event whose `(collector_id, stream_id, seq)` is already stored,
    /// or whose `seq` is at or below its stream's watermark (even if its
    /// row was pruned) and not inside a recorded gap, is ignored and
    /// counted in [`BatchOutcome::duplicates`]. On error nothing of the
    /// batch is committed.
    pub fn insert_batch(&mut self, batch: &[EventEnvelope]) -> Result<BatchOutcome, StoreError> {
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut outcome = BatchOutcome::default();
        let mut touched: Vec<Touched<'_>> = Vec::new();
        let mut index: HashMap<(&str, u64), usize> = HashMap::new();
        {
            let mut select_watermark = tx.prepare_cached(SELECT_WATERMARK)?;
            for env in batch {
                let key = (env.collector_id.as_str(), env.stream_id);
                match index.get(&key) {
                    Some(&i) => {
                        let t = &mut touched[i];
                        t.min_seq = t.min_seq.min(env.seq);
                        t.position = latest(t.position, env.position);
                    }
                    None => {
                        let stored: Option<i64> = select_watermark
                            .query_row(params![env.collector_id, stream_to_sql(env.stream_id)], |row| {
                                row.get(0)
                            })
                            .optional()?;
                        let stored = stored.map(|w| to_u64(w, 0)).transpose()?;
                        index.insert(key, touched.len());
                        touched.push(Touched {
                            collector_id: &env.collector_id,
                            stream_id: env.stream_id,
                            stored,
                            min_seq: env.seq,
                            position: env.position,
                            through: 0,
                        });
                    }
                }
            }
            for t in &mut touched {
                t.through = place(
                    &tx,
                    t.collector_id,
                    t.stream_id,
                    t.stored,
                    t.position,
                    t.min_seq,
                    &mut outcome.gaps,
                )?;
            }

            let mut insert = tx.prepare_cached(INSERT_EVENT)?;
            for env in batch {
                let t = &mut touched[index[&(env.collector_id.as_str(), env.stream_id)]];
                if let Some(p) = env.position
                    && !p.covers(env.seq, env.seq)
                {
                    outcome.refused.push((
                        env.seq,
                        format!("seq {} outside what its collector holds ({}..{})", env.seq, p.base, p.next),
                    ));
                    continue;
                }
                if env.seq <= t.through {
                    // Invariant: seq <= watermark was settled once, even
                    // if pruning has since deleted its row, unless a
                    // recorded gap says it was lost and here it is.
                    let stream_sql = stream_to_sql(env.stream_id);
                    let covering = gap_at(&tx, &env.collector_id, stream_sql, env.seq)?;
                    let covered = covering.is_some();
                    if let Some((from, to, reason)) = covering
                        && EventRow::new(env)?.insert(&mut insert)? > 0
                    {
                        refute(&tx, &env.collector_id, stream_sql, from, to, env.seq, &reason)?;
                        outcome.gaps.push((
                            StreamGapKey {
                                collector_id: env.collector_id.clone(),
                                stream_id: env.stream_id,
                                from,
                                to,
                            },
                            format!("refuted by event {} (the gap is cut before it): {reason}", env.seq),
                        ));
                        t.through = t.through.min(env.seq - 1);
                        outcome.inserted += 1;
                        continue;
                    }
                    let ahead = t.position.zip(t.stored).is_some_and(|(p, w)| w >= p.next);
                    if ahead && !covered {
                        outcome.refused.push((
                            env.seq,
                            "the store is ahead of its collector (it settled numbers the collector has not \
                             produced): a collector that reuses a stream id?"
                                .to_owned(),
                        ));
                    } else {
                        outcome.duplicates += 1;
                    }
                    continue;
                }
                let row = EventRow::new(env)?;
                if row.insert(&mut insert)? == 0 {
                    outcome.duplicates += 1;
                } else {
                    outcome.inserted += 1;
                }
            }

            let mut upsert = tx.prepare_cached(UPSERT_WATERMARK)?;
            for stream in &touched {
                let stream_sql = stream_to_sql(stream.stream_id);
                let through = advance(&tx, stream.collector_id, stream_sql, stream.through)?;
                if stream.stored != Some(through) {
                    upsert.execute(params![stream.collector_id, stream_sql, seq_floor(through)])?;
                }
                outcome.watermarks.push(StreamWatermark {
                    collector_id: stream.collector_id.to_owned(),
                    stream_id: stream.stream_id,
                    through,
                });
            }
        }
        tx.commit()?;
        Ok(outcome)
    }

    /// Records that a collector lost events `gap.from..=gap.to` (its WAL
    /// was damaged, or its WAL was full): they count as settled, so the
    /// stream's watermark moves past them, and the loss stays on record in
    /// `stream_gaps`. A gap outside the position its collector states is
    /// refused (nothing changes). Returns the stream's watermark.
    pub fn insert_gap(&mut self, gap: &StreamGap) -> Result<GapOutcome, StoreError> {
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let stream_sql = stream_to_sql(gap.stream_id);
        let stored: Option<i64> = tx
            .prepare_cached(SELECT_WATERMARK)?
            .query_row(params![gap.collector_id, stream_sql], |row| row.get(0))
            .optional()?;
        let stored = stored.map(|w| to_u64(w, 0)).transpose()?;
        let mut outcome = GapOutcome {
            watermark: StreamWatermark {
                collector_id: gap.collector_id.clone(),
                stream_id: gap.stream_id,
                through: stored.unwrap_or(0),
            },
            refused: None,
            gaps: Vec::new(),
        };
        if let Some(p) = gap.position
            && !p.covers(gap.from, gap.to)
        {
            outcome.refused = Some(format!(
                "gap {}..={} outside what its collector holds ({}..{})",
                gap.from, gap.to, p.base, p.next
            ));
            return Ok(outcome);
        }
        if gap.from > gap.to || gap.from == 0 || i64::try_from(gap.to).is_err() {
            outcome.refused =
                Some(format!("gap {}..={} is not a range of sequence numbers", gap.from, gap.to));
            return Ok(outcome);
        }
        let base =
            place(&tx, &gap.collector_id, gap.stream_id, stored, gap.position, gap.from, &mut outcome.gaps)?;
        record_gap(&tx, &gap.collector_id, stream_sql, gap.from, gap.to, &gap.reason)?;
        let through = advance(&tx, &gap.collector_id, stream_sql, base)?;
        if stored != Some(through) {
            tx.prepare_cached(UPSERT_WATERMARK)?.execute(params![
                gap.collector_id,
                stream_sql,
                seq_floor(through)
            ])?;
        }
        tx.commit()?;
        outcome.watermark.through = through;
        Ok(outcome)
    }

    /// Settles `from..=to` of a stream as lost with `reason`, on the
    /// store's own authority: an event its collector published that the
    /// store refused or could not decode, so it never blocks its stream.
    /// Returns the stream's watermark, or `None` for a stream the store
    /// has not placed yet (the gap is recorded; the watermark starts with
    /// the first event that states its base).
    pub fn settle(
        &mut self,
        collector_id: &str,
        stream_id: u64,
        from: u64,
        to: u64,
        reason: &str,
    ) -> Result<Option<StreamWatermark>, StoreError> {
        if from == 0 || from > to || i64::try_from(to).is_err() {
            return Ok(None);
        }
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let stream_sql = stream_to_sql(stream_id);
        let stored: Option<i64> = tx
            .prepare_cached(SELECT_WATERMARK)?
            .query_row(params![collector_id, stream_sql], |row| row.get(0))
            .optional()?;
        let stored = stored.map(|w| to_u64(w, 0)).transpose()?;
        record_gap(&tx, collector_id, stream_sql, from, to, reason)?;
        let through = match stored {
            Some(w) => {
                let through = advance(&tx, collector_id, stream_sql, w)?;
                if through != w {
                    tx.prepare_cached(UPSERT_WATERMARK)?.execute(params![
                        collector_id,
                        stream_sql,
                        seq_floor(through)
                    ])?;
                }
                Some(StreamWatermark { collector_id: collector_id.to_owned(), stream_id, through })
            }
            None => None,
        };
        tx.commit()?;
        Ok(through)
    }

    /// The recorded gaps of a stream, `(from, to, reason)`, in order.
    pub fn gaps(&self, collector_id: &str, stream_id: u64) -> Result<Vec<(u64, u64, String)>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT from_seq, to_seq, reason FROM stream_gaps
             WHERE collector_id = ?1 AND stream_id = ?2 ORDER BY from_seq",
        )?;
        let rows = stmt.query_map(params![collector_id, stream_to_sql(stream_id)], |r| {
            Ok((to_u64(r.get(0)?, 0)?, to_u64(r.get(1)?, 1)?, r.get::<_, String>(2)?))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The committed watermark of a stream, or `None` if the store has
    /// never stored an event of it.
    pub fn watermark(&self, collector_id: &str, stream_id: u64) -> Result<Option<u64>, StoreError> {
        let through: Option<i64> = self
            .conn
            .prepare_cached(SELECT_WATERMARK)?
            .query_row(params![collector_id, stream_to_sql(stream_id)], |row| row.get(0))
            .optional()?;
        Ok(through.map(|w| to_u64(w, 0)).transpose()?)
    }

    /// The highest `seq` of a stream among the stored rows (pruned rows do
    /// not count; see [`EventStore::watermark`]), or `None` if it has none.
    pub fn max_seq(&self, collector_id: &str, stream_id: u64) -> Result<Option<u64>, StoreError> {
        let max: Option<i64> = self.conn.query_row(
            "SELECT MAX(seq) FROM process_events WHERE collector_id = ?1 AND stream_id = ?2",
            params![collector_id, stream_to_sql(stream_id)],
            |row| row.get(0),
        )?;
        Ok(max.map(|m| to_u64(m, 0)).transpose()?)
    }

    /// The newest `limit` events matching `q` (every match with 0),
    /// oldest first; [`EventStore::query`] returns the oldest.
    pub fn query_newest(&self, q: &EventQuery, limit: usize) -> Result<Vec<StoredEvent>, StoreError> {
        let mut q = q.clone();
        if limit > 0 {
            // The `limit`-th newest match, if there are that many.
            let (conditions, mut values) = filters(&q);
            let mut sql = String::from("SELECT id FROM process_events");
            where_clause(&mut sql, &conditions);
            sql.push_str(" ORDER BY id DESC LIMIT 1 OFFSET ?");
            values.push(Value::Integer(i64::try_from(limit - 1).unwrap_or(i64::MAX)));
            let cursor: Option<i64> =
                self.conn.query_row(&sql, rusqlite::params_from_iter(values), |r| r.get(0)).optional()?;
            if let Some(id) = cursor {
                q.after_id = Some(q.after_id.map_or(id - 1, |a| a.max(id - 1)));
            }
        }
        q.limit = limit;
        self.query(&q)
    }

    /// The events matching `q`, by increasing `id`, decoded from their
    /// `record`. A record that does not decode fails the query with
    /// [`StoreError::Corrupt`].
    pub fn query(&self, q: &EventQuery) -> Result<Vec<StoredEvent>, StoreError> {
        let mut sql = String::from("SELECT id, collector_id, stream_id, seq, record FROM process_events");
        let (conditions, mut values) = filters(q);
        where_clause(&mut sql, &conditions);
        sql.push_str(" ORDER BY id");
        if q.limit > 0 {
            sql.push_str(" LIMIT ?");
            values.push(Value::Integer(i64::try_from(q.limit).unwrap_or(i64::MAX)));
        }

        let mut stmt = self.conn.prepare_cached(&sql)?;
        let mut rows = stmt.query(rusqlite::params_from_iter(values))?;
        let mut events = Vec::new();
        while let Some(row) = rows.next()? {
            let id: i64 = row.get(0)?;
            let collector_id: String = row.get(1)?;
            let stream_id = stream_from_sql(row.get(2)?);
            let seq: i64 = row.get(3)?;
            let seq = u64::try_from(seq)
                .map_err(|_| StoreError::Corrupt { id, reason: format!("negative seq {seq}") })?;
            let record = row.get_ref(4)?;
            let bytes = record.as_blob().map_err(|_| StoreError::Corrupt {
                id,
                reason: format!("record is {}, not a blob", record.data_type()),
            })?;
            let event = ProcessEvent::decode(bytes)
                .map_err(|e| StoreError::Corrupt { id, reason: format!("record does not decode: {e}") })?;
            events.push(StoredEvent { id, collector_id, stream_id, seq, event });
        }
        Ok(events)
    }

    /// The number of stored events.
    pub fn count(&self) -> Result<u64, StoreError> {
        let n: i64 = self.conn.query_row("SELECT COUNT(*) FROM process_events", [], |row| row.get(0))?;
        Ok(to_u64(n, 0)?)
    }
}

/// A stream id as stored: the same 64 bits, read as signed.
fn stream_to_sql(stream_id: u64) -> i64 {
    i64::from_ne_bytes(stream_id.to_ne_bytes())
}

/// The inverse of [`stream_to_sql`].
fn stream_from_sql(stored: i64) -> u64 {
    u64::from_ne_bytes(stored.to_ne_bytes())
}

/// A count or time for a column, clamped to SQLite's integer range.
fn clamp_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A watermark as a bound on `seq`. Every stored `seq` fits in an `i64`
/// (larger ones are refused), so clamping loses nothing.
fn seq_floor(through: u64) -> i64 {
    clamp_i64(through)
}

/// A column value that must not be negative.
fn to_u64(v: i64, column: usize) -> rusqlite::Result<u64> {
    u64::try_from(v).map_err(|_| rusqlite::Error::IntegralValueOutOfRange(column, v))
}

#[cfg(test)]
mod tests;
