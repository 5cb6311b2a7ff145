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

pub mod outputs;
pub mod own;
pub mod rules;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use daemoneye_platform::{ExitStatus, ProcessState};
use rusqlite::types::Value;
use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior, params};

use daemoneye_contract::event::{
    EventEnvelope, EventKind, HashOutcome, ProcessEvent, StreamGap, StreamPosition,
};

/// The schema version this build creates and reads (`PRAGMA user_version`).
pub const SCHEMA_VERSION: u32 = 3;

/// How long a statement waits for another connection's lock before it
/// fails with "database is locked".
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The schema a new database is created with (version 3); documented in
/// the module docs, keep both in step (a test compares them).
const SCHEMA: &str = "
CREATE TABLE process_events (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    collector_id   TEXT    NOT NULL,
    stream_id      INTEGER NOT NULL,
    seq            INTEGER NOT NULL,
    kind           TEXT    NOT NULL CHECK (kind IN ('started', 'stopped', 'modified')),
    snapshot       INTEGER NOT NULL,
    changes        TEXT    NOT NULL,
    observed_ms    INTEGER NOT NULL,
    pid            INTEGER NOT NULL,
    ppid           INTEGER NOT NULL,
    start_time     INTEGER NOT NULL,
    started_unix   INTEGER,
    name           TEXT    NOT NULL,
    exe            TEXT,
    exe_deleted    INTEGER,
    argv           TEXT,
    argv_truncated INTEGER NOT NULL,
    cwd            TEXT,
    uid            INTEGER,
    euid           INTEGER,
    gid            INTEGER,
    egid           INTEGER,
    user           TEXT,
    state          TEXT    NOT NULL,
    rss_bytes      INTEGER NOT NULL,
    sha256         TEXT,
    record         BLOB    NOT NULL,
    source         TEXT    NOT NULL DEFAULT 'poll' CHECK (source IN ('poll', 'kernel')),
    exit_code      INTEGER,
    exit_signal    INTEGER,
    late           INTEGER NOT NULL DEFAULT 0,
    late_after_ms  INTEGER,
    late_before_ms INTEGER,
    UNIQUE (collector_id, stream_id, seq)
);
CREATE INDEX process_events_observed_ms ON process_events (observed_ms);
CREATE INDEX process_events_pid ON process_events (pid);
CREATE INDEX process_events_name ON process_events (name);
CREATE INDEX process_events_kind ON process_events (kind);
CREATE TABLE stream_watermarks (
    collector_id TEXT    NOT NULL,
    stream_id    INTEGER NOT NULL,
    through      INTEGER NOT NULL,
    PRIMARY KEY (collector_id, stream_id)
) WITHOUT ROWID;
CREATE TABLE stream_gaps (
    collector_id TEXT    NOT NULL,
    stream_id    INTEGER NOT NULL,
    from_seq     INTEGER NOT NULL,
    to_seq       INTEGER NOT NULL,
    reason       TEXT    NOT NULL,
    observed_ms  INTEGER NOT NULL,
    PRIMARY KEY (collector_id, stream_id, from_seq)
) WITHOUT ROWID;
";

/// From version 1 to 2: the columns version 2 appended to
/// `process_events`, declared as in [`SCHEMA`] (whose table they complete
/// column for column). The defaults give every version 1 row what its
/// record decodes to: source `poll`, not late, no exit status.
const MIGRATE_V1_TO_V2: &str = "
ALTER TABLE process_events ADD COLUMN source TEXT NOT NULL DEFAULT 'poll' CHECK (source IN ('poll', 'kernel'));
ALTER TABLE process_events ADD COLUMN exit_code INTEGER;
ALTER TABLE process_events ADD COLUMN exit_signal INTEGER;
ALTER TABLE process_events ADD COLUMN late INTEGER NOT NULL DEFAULT 0;
ALTER TABLE process_events ADD COLUMN late_after_ms INTEGER;
ALTER TABLE process_events ADD COLUMN late_before_ms INTEGER;
";

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
        conn.execute_batch(outputs::SCHEMA).map_err(|e| open_error(path, e))?;
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
        tx.execute_batch(outputs::SCHEMA).map_err(|e| open_error(path, e))?;
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

    /// Deletes events beyond `retention`: those observed longer than
    /// `max_age` ago, then the oldest (lowest ids) beyond `max_events`.
    /// Returns the number of rows deleted. Watermarks are kept, so a
    /// pruned event replayed by its collector is still a duplicate.
    ///
    /// Deletes in chunks of at most [`PRUNE_CHUNK`] rows, each its own
    /// transaction (see [`Pruning`]); [`EventStore::prune_step`] does one
    /// chunk, for a caller with other writes to make between them.
    pub fn prune(&mut self, retention: &Retention) -> Result<u64, StoreError> {
        let mut pruning = Pruning::new(retention);
        self.prune_all(&mut pruning)
    }

    /// [`EventStore::prune`] with the current time given.
    #[cfg(test)]
    fn prune_at(&mut self, retention: &Retention, now_ms: u64) -> Result<u64, StoreError> {
        let mut pruning = Pruning::at(retention, now_ms);
        self.prune_all(&mut pruning)
    }

    fn prune_all(&mut self, pruning: &mut Pruning) -> Result<u64, StoreError> {
        while !pruning.is_done() {
            self.prune_step(pruning)?;
        }
        if pruning.deleted > 0 {
            log::debug!(
                "pruned {} events from {} in {} transactions",
                pruning.deleted,
                self.path.display(),
                pruning.transactions
            );
        }
        Ok(pruning.deleted)
    }

    /// Deletes the next chunk of `pruning` (at most its chunk size, in one
    /// immediate transaction) and returns how many rows it deleted; with
    /// [`Pruning::is_done`] nothing is left. A phase with nothing to delete
    /// may end with a step that deletes nothing. On error nothing of the
    /// chunk is deleted and `pruning` is where it was.
    pub fn prune_step(&mut self, pruning: &mut Pruning) -> Result<u64, StoreError> {
        let chunk = clamp_i64(pruning.chunk as u64);
        // A limit not set is no phase.
        if pruning.phase == PrunePhase::Age && pruning.cutoff_ms.is_none() {
            pruning.phase = PrunePhase::Count(None);
        }
        if matches!(pruning.phase, PrunePhase::Count(_)) && pruning.max_events.is_none() {
            pruning.phase = PrunePhase::Done;
        }
        let deleted = match pruning.phase {
            PrunePhase::Done => return Ok(0),
            PrunePhase::Age => {
                let Some(cutoff) = pruning.cutoff_ms else {
                    return Ok(0);
                };
                // Through the observed_ms index: a chunk reads what it
                // deletes, not the table.
                let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                let n = delete_counted(
                    &tx,
                    "SELECT id FROM process_events WHERE observed_ms < ?1 LIMIT ?2",
                    params![cutoff, chunk],
                )?;
                tx.commit()?;
                if n < pruning.chunk {
                    pruning.phase = PrunePhase::Count(None);
                }
                n
            }
            PrunePhase::Count(boundary) => {
                let Some(max_events) = pruning.max_events else {
                    return Ok(0);
                };
                let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                // The id of the newest row that must go, if there are more
                // than max_events rows (fixed once the age phase is over,
                // so rows committed between chunks are not counted in).
                let boundary = match boundary {
                    Some(b) => b,
                    None => {
                        let found: Option<i64> = tx
                            .query_row(
                                "SELECT id FROM process_events ORDER BY id DESC LIMIT 1 OFFSET ?1",
                                params![clamp_i64(max_events)],
                                |r| r.get(0),
                            )
                            .optional()?;
                        let Some(b) = found else {
                            tx.commit()?;
                            pruning.phase = PrunePhase::Done;
                            return Ok(0);
                        };
                        b
                    }
                };
                let n = delete_counted(
                    &tx,
                    "SELECT id FROM process_events WHERE id <= ?1 ORDER BY id LIMIT ?2",
                    params![boundary, chunk],
                )?;
                tx.commit()?;
                pruning.phase =
                    if n < pruning.chunk { PrunePhase::Done } else { PrunePhase::Count(Some(boundary)) };
                n
            }
        };
        pruning.transactions += 1;
        let n = u64::try_from(deleted).unwrap_or(u64::MAX);
        pruning.deleted = pruning.deleted.saturating_add(n);
        Ok(n)
    }
}

/// Deletes the rows `select` names (one column of ids) inside `tx`, after
/// adding the ones each output has not sent to its `lost`
/// ([`outputs`]): the ids go through `temp.prune_ids`, so the count and
/// the delete see the same rows.
fn delete_counted(tx: &Connection, select: &str, params: impl rusqlite::Params) -> rusqlite::Result<usize> {
    tx.execute_batch(
        "CREATE TEMP TABLE IF NOT EXISTS prune_ids (id INTEGER PRIMARY KEY); DELETE FROM temp.prune_ids;",
    )?;
    tx.execute(&format!("INSERT INTO temp.prune_ids {select}"), params)?;
    outputs::count_lost(tx)?;
    let n = tx.execute("DELETE FROM process_events WHERE id IN (SELECT id FROM temp.prune_ids)", [])?;
    tx.execute("DELETE FROM temp.prune_ids", [])?;
    Ok(n)
}

/// Rows [`EventStore::prune`] deletes per transaction.
pub const PRUNE_CHUNK: usize = 10_000;

/// A retention pass in progress ([`EventStore::prune_step`]). It deletes in
/// chunks of at most [`PRUNE_CHUNK`] rows, each its own transaction, so a
/// large prune (the first after an upgrade, a lowered `max_events`) never
/// holds the write lock long, and the store writer commits batches between
/// chunks. First the events observed before the cutoff (now minus
/// `max_age`, fixed when the pass starts), through the `observed_ms` index;
/// then, by id ranges from the lowest, the oldest beyond `max_events`, the
/// boundary id fixed when the age phase is over: what one prune at that
/// moment would keep. Rows committed during the pass are newer than that
/// boundary; the next pass counts them.
#[derive(Debug, Clone)]
pub struct Pruning {
    cutoff_ms: Option<i64>,
    max_events: Option<u64>,
    phase: PrunePhase,
    chunk: usize,
    deleted: u64,
    transactions: u64,
}

/// Where a [`Pruning`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PrunePhase {
    /// Deleting events older than the cutoff.
    Age,
    /// Deleting the oldest ids up to the boundary (`None`: not found yet).
    Count(Option<i64>),
    Done,
}

impl Pruning {
    /// A pass of `retention` from now.
    pub fn new(retention: &Retention) -> Pruning {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        Pruning::at(retention, now_ms)
    }

    /// A pass of `retention` at `now_ms` (Unix milliseconds).
    fn at(retention: &Retention, now_ms: u64) -> Pruning {
        let cutoff_ms = retention.max_age.map(|max_age| {
            let age_ms = u64::try_from(max_age.as_millis()).unwrap_or(u64::MAX);
            clamp_i64(now_ms.saturating_sub(age_ms))
        });
        let phase = if cutoff_ms.is_none() && retention.max_events.is_none() {
            PrunePhase::Done
        } else {
            PrunePhase::Age
        };
        Pruning {
            cutoff_ms,
            max_events: retention.max_events,
            phase,
            chunk: PRUNE_CHUNK,
            deleted: 0,
            transactions: 0,
        }
    }

    /// Nothing is left to delete.
    pub fn is_done(&self) -> bool {
        self.phase == PrunePhase::Done
    }

    /// Rows deleted so far.
    pub fn deleted(&self) -> u64 {
        self.deleted
    }

    /// Transactions (chunks) committed so far.
    pub fn transactions(&self) -> u64 {
        self.transactions
    }
}

/// The column values of one event, borrowed from its envelope where they
/// can be.
struct EventRow<'a> {
    env: &'a EventEnvelope,
    seq: i64,
    changes: String,
    exe: Option<String>,
    argv: Option<String>,
    argv_truncated: bool,
    cwd: Option<String>,
    credentials: [Option<u32>; 4],
    state: String,
    sha256: Option<&'a str>,
    record: Vec<u8>,
}

impl<'a> EventRow<'a> {
    fn new(env: &'a EventEnvelope) -> Result<EventRow<'a>, StoreError> {
        let unstorable = |reason: String| StoreError::Unstorable {
            collector_id: env.collector_id.clone(),
            stream_id: env.stream_id,
            seq: env.seq,
            reason,
        };
        let seq = i64::try_from(env.seq).map_err(|_| unstorable("seq is beyond i64::MAX".to_owned()))?;
        let record = env.event.encode();
        let event = &env.event;
        let d = &event.process.details;
        let changes: Vec<&str> = event.changes.iter().map(|c| c.as_str()).collect();
        let (argv, argv_truncated) = match &d.argv {
            // Serializing a list of strings cannot fail.
            Ok(argv) => (serde_json::to_string(&argv.args).ok(), argv.truncated),
            Err(_) => (None, false),
        };
        let credentials = match &d.credentials {
            Ok(c) => [Some(c.uid), Some(c.euid), Some(c.gid), Some(c.egid)],
            Err(_) => [None; 4],
        };
        let sha256 = match &event.sha256 {
            Some(HashOutcome::Sha256(hex)) => Some(hex.as_str()),
            _ => None,
        };
        Ok(EventRow {
            env,
            seq,
            changes: changes.join(","),
            exe: d.exe.as_ref().ok().map(|p| p.to_string_lossy().into_owned()),
            argv,
            argv_truncated,
            cwd: d.cwd.as_ref().ok().map(|p| p.to_string_lossy().into_owned()),
            credentials,
            state: state_name(event.process.state),
            sha256,
            record,
        })
    }

    /// Runs [`INSERT_EVENT`]; returns the rows inserted (0 for a
    /// duplicate).
    fn insert(&self, stmt: &mut rusqlite::CachedStatement<'_>) -> rusqlite::Result<usize> {
        let env = self.env;
        let event = &env.event;
        let p = &event.process;
        let d = &p.details;
        let [uid, euid, gid, egid] = self.credentials;
        let (exit_code, exit_signal) = match event.exit {
            Some(ExitStatus::Code(code)) => (Some(code), None),
            Some(ExitStatus::Signal { signal, .. }) => (None, Some(signal)),
            None => (None, None),
        };
        stmt.execute(params![
            env.collector_id,
            stream_to_sql(env.stream_id),
            self.seq,
            event.kind.as_str(),
            event.snapshot,
            self.changes,
            clamp_i64(event.observed_unix_ms),
            p.pid,
            p.ppid,
            clamp_i64(p.start_time),
            p.started_unix.ok().map(clamp_i64),
            p.name,
            self.exe,
            d.exe_deleted.ok(),
            self.argv,
            self.argv_truncated,
            self.cwd,
            uid,
            euid,
            gid,
            egid,
            d.user.as_ref().ok(),
            self.state,
            clamp_i64(p.rss_bytes),
            self.sha256,
            self.record,
            event.source.as_str(),
            exit_code,
            exit_signal,
            event.late.is_some(),
            event.late.map(|w| clamp_i64(w.after_unix_ms)),
            event.late.map(|w| clamp_i64(w.before_unix_ms)),
        ])
    }
}

/// The `state` column's value.
fn state_name(state: ProcessState) -> String {
    match state {
        ProcessState::Running => "running".to_owned(),
        ProcessState::Sleeping => "sleeping".to_owned(),
        ProcessState::DiskSleep => "disk_sleep".to_owned(),
        ProcessState::Stopped => "stopped".to_owned(),
        ProcessState::Traced => "traced".to_owned(),
        ProcessState::Zombie => "zombie".to_owned(),
        ProcessState::Dead => "dead".to_owned(),
        ProcessState::Idle => "idle".to_owned(),
        ProcessState::Other(letter) => format!("other:{letter}"),
        _ => "unknown".to_owned(),
    }
}

/// A stream id as stored: the same 64 bits, read as signed.
/// The later of two stated positions (bases and next numbers only rise).
fn latest(a: Option<StreamPosition>, b: Option<StreamPosition>) -> Option<StreamPosition> {
    match (a, b) {
        (Some(a), Some(b)) => Some(if (b.base, b.next) >= (a.base, a.next) { b } else { a }),
        (a, b) => a.or(b),
    }
}

/// Where a stream's watermark starts for what a collector sends now (see
/// [Watermarks](#watermarks)): its stored watermark, with what lies below
/// the collector's stated base recorded as a gap.
fn place(
    tx: &rusqlite::Transaction<'_>,
    collector_id: &str,
    stream_id: u64,
    stored: Option<u64>,
    position: Option<StreamPosition>,
    min_seq: u64,
    gaps: &mut Vec<(StreamGapKey, String)>,
) -> Result<u64, StoreError> {
    let stream_sql = stream_to_sql(stream_id);
    let mut record = |from: u64, to: u64, reason: &str| -> Result<(), StoreError> {
        record_gap(tx, collector_id, stream_sql, from, to, reason)?;
        gaps.push((
            StreamGapKey { collector_id: collector_id.to_owned(), stream_id, from, to },
            reason.to_owned(),
        ));
        Ok(())
    };
    match (stored, position) {
        // A collector of an earlier release: its first seq, minus 1.
        (None, None) => Ok(min_seq.saturating_sub(1)),
        (None, Some(p)) => {
            if p.base > 1 {
                record(1, p.base - 1, REASON_BEFORE_BASE)?;
            }
            Ok(0)
        }
        (Some(w), Some(p)) if p.base <= p.next && w.saturating_add(1) < p.base => {
            record(w + 1, p.base - 1, REASON_BEHIND)?;
            Ok(w)
        }
        (Some(w), _) => Ok(w),
    }
}

/// Records `from..=to` as lost with `reason` (kept once per start).
fn record_gap(
    tx: &rusqlite::Transaction<'_>,
    collector_id: &str,
    stream_sql: i64,
    from: u64,
    to: u64,
    reason: &str,
) -> Result<(), StoreError> {
    let observed = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
    tx.prepare_cached(INSERT_GAP)?.execute(params![
        collector_id,
        stream_sql,
        seq_floor(from),
        seq_floor(to),
        reason,
        observed
    ])?;
    Ok(())
}

/// The recorded gap that covers `seq`: start, end, reason.
fn gap_at(
    tx: &rusqlite::Transaction<'_>,
    collector_id: &str,
    stream_sql: i64,
    seq: u64,
) -> Result<Option<(u64, u64, String)>, StoreError> {
    let found: Option<(i64, i64)> = tx
        .prepare_cached(SELECT_GAP_AT)?
        .query_row(params![collector_id, stream_sql, seq_floor(seq)], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    let Some((from, to)) = found else { return Ok(None) };
    let reason: String = tx.query_row(
        "SELECT reason FROM stream_gaps WHERE collector_id = ?1 AND stream_id = ?2 AND from_seq = ?3",
        params![collector_id, stream_sql, from],
        |r| r.get(0),
    )?;
    Ok(Some((to_u64(from, 0)?, to_u64(to, 1)?, reason)))
}

/// Cuts the gap `from..=to` before `seq`, which an event just proved was
/// not lost: what lay below stays recorded, the rest goes (an event above
/// will refute it again, or the watermark walks over stored rows).
fn refute(
    tx: &rusqlite::Transaction<'_>,
    collector_id: &str,
    stream_sql: i64,
    from: u64,
    to: u64,
    seq: u64,
    reason: &str,
) -> Result<(), StoreError> {
    tx.execute(
        "DELETE FROM stream_gaps WHERE collector_id = ?1 AND stream_id = ?2 AND from_seq = ?3",
        params![collector_id, stream_sql, seq_floor(from)],
    )?;
    if from < seq {
        record_gap(tx, collector_id, stream_sql, from, seq - 1, reason)?;
    }
    let _ = to;
    tx.execute(
        "UPDATE stream_watermarks SET through = MIN(through, ?3) WHERE collector_id = ?1 AND stream_id = ?2",
        params![collector_id, stream_sql, seq_floor(seq - 1)],
    )?;
    Ok(())
}

/// Walks a stream's watermark up from `through` over contiguous stored
/// sequence numbers and recorded gaps.
fn advance(
    tx: &rusqlite::Transaction<'_>,
    collector_id: &str,
    stream_sql: i64,
    mut through: u64,
) -> Result<u64, StoreError> {
    let mut seqs_above = tx.prepare_cached(SELECT_SEQS_ABOVE)?;
    let mut gap_covering = tx.prepare_cached(SELECT_GAP_COVERING)?;
    loop {
        let mut rows = seqs_above.query(params![collector_id, stream_sql, seq_floor(through)])?;
        while let Some(row) = rows.next()? {
            let seq = to_u64(row.get(0)?, 0)?;
            if Some(seq) != through.checked_add(1) {
                break;
            }
            through = seq;
        }
        drop(rows);
        let Some(next) = through.checked_add(1) else { return Ok(through) };
        let end: Option<i64> =
            gap_covering.query_row(params![collector_id, stream_sql, seq_floor(next)], |row| row.get(0))?;
        match end.map(|e| to_u64(e, 0)).transpose()? {
            Some(end) if end > through => through = end,
            _ => return Ok(through),
        }
    }
}

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

fn open_error(path: &Path, source: rusqlite::Error) -> StoreError {
    StoreError::Open { path: path.to_owned(), source }
}

/// Creates the database's directory if missing (0700 on Unix: the events
/// hold command lines and user names).
fn create_parent(path: &Path) -> Result<(), StoreError> {
    let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) else {
        return Ok(());
    };
    if parent.is_dir() {
        return Ok(());
    }
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(parent).map_err(|source| StoreError::Io { path: parent.to_owned(), source })
}

/// Creates the database file empty with mode 0600 (Unix) if it does not
/// exist, so SQLite (which creates with 0644 less the umask) never makes
/// it readable by others. An empty file is a new database to SQLite.
fn create_private_file(path: &Path) -> Result<(), StoreError> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    match options.open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(StoreError::Io { path: path.to_owned(), source }),
    }
}

/// The connection settings of a writable store.
fn configure(conn: &Connection) -> rusqlite::Result<()> {
    conn.busy_timeout(BUSY_TIMEOUT)?;
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        // Still durable (synchronous=FULL), but readers block the writer.
        log::warn!("event store: journal_mode is {mode}, not wal (file system without shared memory?)");
    }
    // FULL, not NORMAL: in WAL mode NORMAL may lose the last commits on
    // power loss, and a commit is acknowledged to collectors, which then
    // delete their copy.
    conn.execute_batch("PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;")
}

fn user_version(conn: &Connection) -> rusqlite::Result<u32> {
    let v: i64 = conn.query_row("PRAGMA user_version", [], |row| row.get(0))?;
    // user_version is a signed 32-bit integer; a negative one is nothing
    // this build wrote, so it reads as "newer".
    Ok(u32::try_from(v).unwrap_or(u32::MAX))
}

/// Creates the schema in an empty database, migrates a version 1 or 2 one, or
/// checks the version of an existing one. Immediate, so two processes
/// opening a file at once do not both create (or migrate) it: the second
/// reads the version the first committed.
fn init_schema(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    let tx =
        conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(|e| open_error(path, e))?;
    let found = user_version(&tx).map_err(|e| open_error(path, e))?;
    match found {
        0 => {
            tx.execute_batch(SCHEMA).map_err(|e| open_error(path, e))?;
            tx.pragma_update(None, "user_version", SCHEMA_VERSION).map_err(|e| open_error(path, e))?;
            tx.commit().map_err(|e| open_error(path, e))?;
            log::info!("created event store {} (schema version {SCHEMA_VERSION})", path.display());
            Ok(())
        }
        1 | 2 => {
            // Invariant: the new columns and the version change commit
            // together, so a crash leaves the old version intact or
            // version 3 whole.
            if found == 1 {
                tx.execute_batch(MIGRATE_V1_TO_V2).map_err(|e| open_error(path, e))?;
            }
            // Version 3 changed no column: its `record` blobs carry the
            // contract's header. Rows written before (headerless version
            // 1 blobs) are read as they are, so nothing is rewritten; the
            // bump keeps a previous release, which cannot read the new
            // blobs, from opening the file.
            tx.pragma_update(None, "user_version", SCHEMA_VERSION).map_err(|e| open_error(path, e))?;
            tx.commit().map_err(|e| open_error(path, e))?;
            log::info!("migrated event store {} from schema {found} to {SCHEMA_VERSION}", path.display());
            Ok(())
        }
        SCHEMA_VERSION => Ok(()),
        found => Err(StoreError::SchemaVersion { found, supported: SCHEMA_VERSION }),
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::sync::Arc;

    use daemoneye_platform::{
        Argv, Credentials, FileIdentity, ProcessDetails, ProcessRecord, ProcessState, Unavailable,
    };

    use super::*;
    use daemoneye_contract::event::{Change, EventSource, LateWindow};

    fn record(pid: u32, name: &str) -> ProcessRecord {
        ProcessRecord {
            pid,
            ppid: 1,
            start_time: 10_000 + u64::from(pid),
            started_unix: Ok(1_700_000_000),
            name: name.to_owned(),
            state: ProcessState::Sleeping,
            session: Ok(1),
            threads: Ok(2),
            rss_bytes: 4096,
            virtual_bytes: 8192,
            cpu_time_ms: Ok(15),
            kernel_thread: false,
            details: Arc::new(ProcessDetails {
                exe: Ok(PathBuf::from(format!("/usr/bin/{name}"))),
                exe_file: Ok(FileIdentity { dev: 1, inode: 42, size: 1000, mtime: 5, ctime: 6 }),
                exe_deleted: Ok(false),
                argv: Ok(Argv { args: vec![name.to_owned(), "--flag".to_owned()], truncated: false }),
                cwd: Ok(PathBuf::from("/home/alice")),
                credentials: Ok(Credentials { uid: 1000, euid: 0, gid: 100, egid: 100 }),
                user: Ok("alice".to_owned()),
            }),
        }
    }

    fn event(kind: EventKind, pid: u32, name: &str, observed_ms: u64) -> ProcessEvent {
        ProcessEvent {
            kind,
            snapshot: false,
            changes: Vec::new(),
            observed_unix_ms: observed_ms,
            process: record(pid, name),
            sha256: Some(HashOutcome::Sha256("ab".repeat(32))),
            source: daemoneye_contract::event::EventSource::Kernel,
            late: None,
            exit: Some(daemoneye_platform::ExitStatus::Code(3)),
        }
    }

    fn env(collector: &str, stream: u64, seq: u64) -> EventEnvelope {
        EventEnvelope {
            collector_id: collector.to_owned(),
            stream_id: stream,
            seq,
            event: event(EventKind::Started, 100 + (seq % 1_000) as u32, "proc", seq.saturating_mul(1_000)),
            position: None,
        }
    }

    /// An event of a current collector that holds `base..next`.
    fn placed(stream: u64, seq: u64, base: u64, next: u64) -> EventEnvelope {
        EventEnvelope { position: Some(StreamPosition { base, next }), ..env("c", stream, seq) }
    }

    fn placed_gap(stream: u64, from: u64, to: u64, base: u64, next: u64) -> StreamGap {
        StreamGap {
            collector_id: "c".into(),
            stream_id: stream,
            from,
            to,
            reason: "damage".into(),
            position: Some(StreamPosition { base, next }),
        }
    }

    #[test]
    fn a_new_stream_starts_at_its_stated_base_and_never_skips_what_it_missed() {
        let (_dir, mut store) = temp_store();
        // The store's first sight of the stream is seq 7, but the collector
        // still holds 4..: 4..6 were lost on the way (a cut subscription).
        let out = store.insert_batch(&[placed(1, 7, 4, 9), placed(1, 8, 4, 9)]).unwrap();
        assert_eq!(out.inserted, 2);
        assert_eq!(out.watermarks, vec![wm("c", 1, 3)], "waits for 4, never acknowledges past it");
        assert_eq!(store.gaps("c", 1).unwrap(), vec![(1, 3, REASON_BEFORE_BASE.to_owned())]);
        // The replay brings them.
        let out = store.insert_batch(&[placed(1, 4, 4, 9), placed(1, 5, 4, 9), placed(1, 6, 4, 9)]).unwrap();
        assert_eq!(out.watermarks, vec![wm("c", 1, 8)]);
        // A base of 1: no gap at all.
        store.insert_batch(&[placed(2, 1, 1, 2)]).unwrap();
        assert!(store.gaps("c", 2).unwrap().is_empty());
        assert_eq!(store.watermark("c", 2).unwrap(), Some(1));
    }

    #[test]
    fn a_store_behind_its_collector_records_the_gap_and_moves_on() {
        let (_dir, mut store) = temp_store();
        store.insert_batch(&[placed(1, 1, 1, 3), placed(1, 2, 1, 3)]).unwrap();
        // Restored from a backup taken at 2; the collector has moved on to
        // 50 (49 acknowledged to the store as it was before the restore).
        let out = store.insert_batch(&[placed(1, 50, 50, 52), placed(1, 51, 50, 52)]).unwrap();
        assert_eq!(out.watermarks, vec![wm("c", 1, 51)]);
        assert_eq!(store.gaps("c", 1).unwrap(), vec![(3, 49, REASON_BEHIND.to_owned())]);
        // A gap marker states the base as well.
        let out = store.insert_gap(&placed_gap(1, 60, 60, 60, 61)).unwrap();
        assert_eq!(out.watermark.through, 60);
        assert_eq!(out.gaps[0].0.from, 52);
    }

    #[test]
    fn implausible_events_and_gaps_are_refused() {
        let (_dir, mut store) = temp_store();
        store.insert_batch(&[placed(1, 1, 1, 3)]).unwrap();
        // Beyond what the collector says it produced, below what it holds.
        let out = store.insert_batch(&[placed(1, 9, 1, 3)]).unwrap();
        assert_eq!((out.inserted, out.refused.len()), (0, 1), "{out:?}");
        let out = store.insert_batch(&[placed(1, 1, 2, 4)]).unwrap();
        assert_eq!((out.inserted, out.duplicates, out.refused.len()), (0, 0, 1), "{out:?}");
        let out = store.insert_gap(&placed_gap(1, 2, 1 << 62, 1, 3)).unwrap();
        assert!(out.refused.is_some());
        assert_eq!(out.watermark.through, 1);
        assert!(store.gaps("c", 1).unwrap().is_empty());
    }

    #[test]
    fn a_forged_far_gap_does_not_blind_the_stream() {
        let (_dir, mut store) = temp_store();
        store.insert_batch(&[placed(1, 1, 1, 5), placed(1, 2, 1, 5)]).unwrap();
        // A forger states a position that covers its gap; so does an
        // older collector without a position.
        let forged = placed_gap(1, 3, 1 << 62, 1, (1 << 62) + 1);
        assert_eq!(store.insert_gap(&forged).unwrap().watermark.through, 1 << 62);
        let old = StreamGap { position: None, ..placed_gap(2, 1, 1 << 62, 0, 0) };
        assert_eq!(store.insert_gap(&old).unwrap().watermark.through, 1 << 62);
        // The real events that follow are stored, not dropped as duplicates.
        let out = store.insert_batch(&[placed(1, 3, 1, 5), placed(1, 4, 1, 5)]).unwrap();
        assert_eq!((out.inserted, out.duplicates), (2, 0), "{out:?}");
        assert_eq!(out.watermarks, vec![wm("c", 1, 4)]);
        assert!(store.gaps("c", 1).unwrap().is_empty(), "the gap is refuted");
        let out = store.insert_batch(&envs("c", 2, &[1, 2])).unwrap();
        assert_eq!((out.inserted, out.watermarks[0].through), (2, 2));
        assert_eq!(seqs(&all(&store)), vec![1, 2, 3, 4, 1, 2]);
        // A replay of what is stored stays a duplicate.
        let out = store.insert_batch(&[placed(1, 3, 1, 5)]).unwrap();
        assert_eq!((out.inserted, out.duplicates), (0, 1));
    }

    #[test]
    fn settled_numbers_unblock_a_stream() {
        let (_dir, mut store) = temp_store();
        assert_eq!(store.settle("c", 1, 1, 1, "undecodable").unwrap(), None, "not placed yet");
        store.insert_batch(&[placed(1, 2, 1, 3)]).unwrap();
        assert_eq!(store.watermark("c", 1).unwrap(), Some(2), "the settled 1 counts");
        store.insert_batch(&[placed(1, 4, 1, 5)]).unwrap();
        assert_eq!(store.settle("c", 1, 3, 3, "refused").unwrap(), Some(wm("c", 1, 4)));
        let gaps = store.gaps("c", 1).unwrap();
        assert_eq!(gaps.iter().map(|g| g.2.as_str()).collect::<Vec<_>>(), ["undecodable", "refused"]);
    }

    fn envs(collector: &str, stream: u64, seqs: &[u64]) -> Vec<EventEnvelope> {
        seqs.iter().map(|&s| env(collector, stream, s)).collect()
    }

    fn temp_store() -> (tempfile::TempDir, EventStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = EventStore::open(&dir.path().join("events.db")).unwrap();
        (dir, store)
    }

    fn all(store: &EventStore) -> Vec<StoredEvent> {
        store.query(&EventQuery::default()).unwrap()
    }

    fn seqs(events: &[StoredEvent]) -> Vec<u64> {
        events.iter().map(|e| e.seq).collect()
    }

    fn wm(collector: &str, stream: u64, through: u64) -> StreamWatermark {
        StreamWatermark { collector_id: collector.to_owned(), stream_id: stream, through }
    }

    #[test]
    fn gaps_settle_lost_sequence_numbers_and_stay_on_record() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = EventStore::open(&dir.path().join("e.db")).unwrap();
        let gap = |from, to| StreamGap {
            collector_id: "c".into(),
            stream_id: 1,
            from,
            to,
            reason: "damage".into(),
            position: None,
        };
        store.insert_batch(&envs("c", 1, &[1, 2, 5])).unwrap();
        assert_eq!(store.watermark("c", 1).unwrap(), Some(2));
        assert_eq!(
            store.insert_gap(&gap(3, 4)).unwrap().watermark.through,
            5,
            "the gap bridges to the stored 5"
        );
        let out = store.insert_batch(&envs("c", 1, &[5, 6])).unwrap();
        assert_eq!((out.inserted, out.duplicates), (1, 1));
        assert_eq!(out.watermarks[0].through, 6);
        // A gap first on a new stream of an older collector sets its base;
        // events then follow.
        let g2 = StreamGap { stream_id: 2, ..gap(10, 12) };
        assert_eq!(store.insert_gap(&g2).unwrap().watermark.through, 12);
        assert_eq!(store.insert_batch(&envs("c", 2, &[13])).unwrap().watermarks[0].through, 13);
        // An out-of-order gap is kept until the watermark reaches it.
        assert_eq!(store.insert_gap(&gap(8, 9)).unwrap().watermark.through, 6);
        assert_eq!(store.insert_batch(&envs("c", 1, &[7])).unwrap().watermarks[0].through, 9);
        let rows: i64 =
            store.connection().query_row("SELECT COUNT(*) FROM stream_gaps", [], |r| r.get(0)).unwrap();
        assert_eq!(rows, 3);
    }

    #[test]
    fn inserted_events_query_back_equal() {
        let (_dir, mut store) = temp_store();
        let mut batch = envs("c1", 7, &[1, 2]);
        batch[1].event.kind = EventKind::Modified;
        batch[1].event.changes = vec![Change::Exec, Change::Credentials];
        batch[1].event.sha256 = Some(HashOutcome::TooLarge { size: 10, cap: 5 });
        let outcome = store.insert_batch(&batch).unwrap();
        assert_eq!(
            outcome,
            BatchOutcome {
                inserted: 2,
                duplicates: 0,
                watermarks: vec![wm("c1", 7, 2)],
                ..BatchOutcome::default()
            }
        );

        let stored = all(&store);
        assert_eq!(stored.len(), 2);
        for (s, e) in stored.iter().zip(&batch) {
            assert_eq!((s.collector_id.as_str(), s.stream_id, s.seq), ("c1", 7, e.seq));
            assert_eq!(s.event, e.event);
        }
        assert!(stored[0].id < stored[1].id);
        assert_eq!(store.count().unwrap(), 2);
        assert_eq!(store.max_seq("c1", 7).unwrap(), Some(2));
        assert_eq!(store.max_seq("c1", 8).unwrap(), None);
    }

    #[test]
    fn columns_hold_plain_values_and_null_for_unavailable() {
        let (_dir, mut store) = temp_store();
        let mut full = env("c1", 0, 1);
        full.event.kind = EventKind::Modified;
        full.event.changes = vec![Change::Exec, Change::ExeDeleted];
        let mut bare = env("c1", 0, 2);
        bare.event.process.state = ProcessState::Other('W');
        bare.event.process.started_unix = Err(Unavailable::NotPermitted);
        bare.event.sha256 = Some(HashOutcome::Deferred);
        bare.event.process.details = Arc::new(ProcessDetails {
            exe: Err(Unavailable::NotPermitted),
            exe_file: Err(Unavailable::NotPermitted),
            exe_deleted: Err(Unavailable::NotPermitted),
            argv: Err(Unavailable::NotApplicable),
            cwd: Err(Unavailable::NotPermitted),
            credentials: Err(Unavailable::Vanished),
            user: Err(Unavailable::NotSupported),
        });
        store.insert_batch(&[full, bare]).unwrap();

        type Row = (
            String,
            String,
            Option<i64>,
            Option<String>,
            Option<bool>,
            Option<String>,
            bool,
            Option<String>,
            (Option<i64>, Option<i64>, Option<String>),
            String,
            Option<String>,
        );
        let mut stmt = store
            .connection()
            .prepare(
                "SELECT kind, changes, started_unix, exe, exe_deleted, argv, argv_truncated, cwd, \
                 uid, euid, user, state, sha256 FROM process_events ORDER BY seq",
            )
            .unwrap();
        let rows: Vec<Row> = stmt
            .query_map([], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                    r.get(7)?,
                    (r.get(8)?, r.get(9)?, r.get(10)?),
                    r.get(11)?,
                    r.get(12)?,
                ))
            })
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(
            rows[0],
            (
                "modified".to_owned(),
                "exec,exe_deleted".to_owned(),
                Some(1_700_000_000),
                Some("/usr/bin/proc".to_owned()),
                Some(false),
                Some(r#"["proc","--flag"]"#.to_owned()),
                false,
                Some("/home/alice".to_owned()),
                (Some(1000), Some(0), Some("alice".to_owned())),
                "sleeping".to_owned(),
                Some("ab".repeat(32)),
            )
        );
        assert_eq!(
            rows[1],
            (
                "started".to_owned(),
                String::new(),
                None,
                None,
                None,
                None,
                false,
                None,
                (None, None, None),
                "other:W".to_owned(),
                None,
            )
        );
        let (pid, rss): (i64, i64) = store
            .connection()
            .query_row("SELECT pid, rss_bytes FROM process_events WHERE seq = 1", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        assert_eq!((pid, rss), (101, 4096));
    }

    #[test]
    fn duplicates_are_ignored_and_counted_within_across_batches_and_after_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.db");
        let mut store = EventStore::open(&path).unwrap();
        let outcome = store.insert_batch(&envs("c1", 0, &[1, 2, 2, 3])).unwrap();
        assert_eq!((outcome.inserted, outcome.duplicates), (3, 1));

        let outcome = store.insert_batch(&envs("c1", 0, &[2, 3, 4])).unwrap();
        assert_eq!((outcome.inserted, outcome.duplicates), (1, 2));
        assert_eq!(outcome.watermarks, vec![wm("c1", 0, 4)]);
        drop(store);

        let mut store = EventStore::open(&path).unwrap();
        let outcome = store.insert_batch(&envs("c1", 0, &[1, 4, 5])).unwrap();
        assert_eq!((outcome.inserted, outcome.duplicates), (1, 2));
        assert_eq!(seqs(&all(&store)), vec![1, 2, 3, 4, 5]);
        assert_eq!(store.watermark("c1", 0).unwrap(), Some(5));
    }

    #[test]
    fn a_duplicate_above_the_watermark_is_found_by_its_row() {
        let (_dir, mut store) = temp_store();
        store.insert_batch(&envs("c1", 0, &[1, 3])).unwrap();
        assert_eq!(store.watermark("c1", 0).unwrap(), Some(1));
        let outcome = store.insert_batch(&envs("c1", 0, &[3])).unwrap();
        assert_eq!((outcome.inserted, outcome.duplicates), (0, 1));
        assert_eq!(outcome.watermarks, vec![wm("c1", 0, 1)]);
    }

    #[test]
    fn the_watermark_advances_only_while_contiguous() {
        let (_dir, mut store) = temp_store();
        let outcome = store.insert_batch(&envs("c1", 0, &[1, 2, 4])).unwrap();
        assert_eq!(outcome.watermarks, vec![wm("c1", 0, 2)]);
        assert_eq!(store.watermark("c1", 0).unwrap(), Some(2));

        let outcome = store.insert_batch(&envs("c1", 0, &[3])).unwrap();
        assert_eq!(outcome.watermarks, vec![wm("c1", 0, 4)]);

        // Unchanged watermarks are still reported.
        let outcome = store.insert_batch(&envs("c1", 0, &[6])).unwrap();
        assert_eq!(outcome.watermarks, vec![wm("c1", 0, 4)]);
        let outcome = store.insert_batch(&envs("c1", 0, &[4])).unwrap();
        assert_eq!((outcome.inserted, outcome.duplicates), (0, 1));
        assert_eq!(outcome.watermarks, vec![wm("c1", 0, 4)]);
        let outcome = store.insert_batch(&envs("c1", 0, &[5])).unwrap();
        assert_eq!(outcome.watermarks, vec![wm("c1", 0, 6)]);
        assert_eq!(store.watermark("c1", 1).unwrap(), None);
    }

    #[test]
    fn a_new_stream_starts_below_its_first_seq() {
        let (_dir, mut store) = temp_store();
        // A wiped store receiving a replay from seq 501 makes progress.
        let outcome = store.insert_batch(&envs("c1", 9, &[501])).unwrap();
        assert_eq!(outcome.watermarks, vec![wm("c1", 9, 501)]);
        let outcome = store.insert_batch(&envs("c1", 9, &[502])).unwrap();
        assert_eq!(outcome.watermarks, vec![wm("c1", 9, 502)]);

        // Base is the first batch's lowest seq minus 1, whatever the order.
        let outcome = store.insert_batch(&envs("c1", 10, &[503, 501, 502, 505])).unwrap();
        assert_eq!(outcome.watermarks, vec![wm("c1", 10, 503)]);

        // A first batch whose lowest seq is 501 leaves the base at 500: seq
        // 500 arriving later is below the watermark.
        let outcome = store.insert_batch(&envs("c1", 11, &[501, 503])).unwrap();
        assert_eq!(outcome.watermarks, vec![wm("c1", 11, 501)]);
        let outcome = store.insert_batch(&envs("c1", 11, &[500])).unwrap();
        assert_eq!((outcome.inserted, outcome.duplicates), (0, 1));
    }

    #[test]
    fn streams_and_collectors_are_independent() {
        let (_dir, mut store) = temp_store();
        let mut batch = envs("c1", 0, &[1, 2]);
        batch.extend(envs("c2", 0, &[1, 3]));
        batch.extend(envs("c1", 1, &[1]));
        batch.extend(envs("c1", u64::MAX, &[7]));
        let outcome = store.insert_batch(&batch).unwrap();
        assert_eq!((outcome.inserted, outcome.duplicates), (6, 0));
        assert_eq!(
            outcome.watermarks,
            vec![wm("c1", 0, 2), wm("c2", 0, 1), wm("c1", 1, 1), wm("c1", u64::MAX, 7)]
        );
        assert_eq!(store.watermark("c2", 0).unwrap(), Some(1));
        assert_eq!(store.watermark("c1", u64::MAX).unwrap(), Some(7));
        assert_eq!(store.max_seq("c2", 0).unwrap(), Some(3));

        let c2 =
            store.query(&EventQuery { collector_id: Some("c2".to_owned()), ..Default::default() }).unwrap();
        assert_eq!(seqs(&c2), vec![1, 3]);
        let max_stream = all(&store).into_iter().find(|e| e.seq == 7).unwrap();
        assert_eq!(max_stream.stream_id, u64::MAX);
    }

    #[test]
    fn query_filters_combine() {
        let (_dir, mut store) = temp_store();
        let mut batch = Vec::new();
        for (seq, kind, pid, name) in [
            (1, EventKind::Started, 10, "sshd"),
            (2, EventKind::Started, 11, "bash"),
            (3, EventKind::Modified, 11, "bash"),
            (4, EventKind::Stopped, 10, "sshd"),
            (5, EventKind::Started, 12, "curl"),
        ] {
            let mut e = env("c1", 0, seq);
            e.event = event(kind, pid, name, 1_000 * seq);
            batch.push(e);
        }
        batch.push(EventEnvelope { collector_id: "c2".to_owned(), ..env("c1", 0, 6) });
        store.insert_batch(&batch).unwrap();

        let q = |q: EventQuery| seqs(&store.query(&q).unwrap());
        assert_eq!(q(EventQuery { pid: Some(11), ..Default::default() }), vec![2, 3]);
        assert_eq!(q(EventQuery { name: Some("sshd".to_owned()), ..Default::default() }), vec![1, 4]);
        assert_eq!(q(EventQuery { name: Some("ssh".to_owned()), ..Default::default() }), Vec::<u64>::new());
        assert_eq!(q(EventQuery { kind: Some(EventKind::Started), ..Default::default() }), vec![1, 2, 5, 6]);
        assert_eq!(
            q(EventQuery { since_ms: Some(2_000), until_ms: Some(4_000), ..Default::default() }),
            vec![2, 3]
        );
        assert_eq!(q(EventQuery { collector_id: Some("c2".to_owned()), ..Default::default() }), vec![6]);
        assert_eq!(
            q(EventQuery { kind: Some(EventKind::Started), since_ms: Some(2_000), ..Default::default() }),
            vec![2, 5, 6]
        );
        assert_eq!(q(EventQuery { limit: 2, ..Default::default() }), vec![1, 2]);
        assert_eq!(q(EventQuery { since_ms: Some(u64::MAX), ..Default::default() }), Vec::<u64>::new());

        // Following: poll with the last id seen.
        let first = store.query(&EventQuery { limit: 3, ..Default::default() }).unwrap();
        let cursor = first.last().unwrap().id;
        assert_eq!(q(EventQuery { after_id: Some(cursor), ..Default::default() }), vec![4, 5, 6]);
        assert_eq!(q(EventQuery { after_id: Some(cursor), limit: 1, ..Default::default() }), vec![4]);
    }

    #[test]
    fn prune_by_age_deletes_old_events_and_keeps_watermarks() {
        let (_dir, mut store) = temp_store();
        store.insert_batch(&envs("c1", 0, &[1, 2, 3, 4, 5])).unwrap();
        // Observed at 1 s .. 5 s; now is 10 s; keep the last 7 s.
        let retention = Retention { max_age: Some(Duration::from_secs(7)), max_events: None };
        assert_eq!(store.prune_at(&retention, 10_000).unwrap(), 2);
        assert_eq!(seqs(&all(&store)), vec![3, 4, 5]);
        assert_eq!(store.watermark("c1", 0).unwrap(), Some(5));
        assert_eq!(store.prune_at(&retention, 10_000).unwrap(), 0);

        // The real clock: these events are from 1970.
        assert_eq!(store.prune(&retention).unwrap(), 3);
        assert_eq!(store.count().unwrap(), 0);
        assert_eq!(store.prune(&Retention::default()).unwrap(), 0);
    }

    #[test]
    fn prune_by_count_keeps_the_newest() {
        let (_dir, mut store) = temp_store();
        store.insert_batch(&envs("c1", 0, &[1, 2, 3, 4, 5])).unwrap();
        let keep = |n| Retention { max_age: None, max_events: Some(n) };
        assert_eq!(store.prune(&keep(10)).unwrap(), 0);
        assert_eq!(store.prune(&keep(2)).unwrap(), 3);
        assert_eq!(seqs(&all(&store)), vec![4, 5]);
        assert_eq!(store.prune(&keep(0)).unwrap(), 2);
        assert_eq!(store.count().unwrap(), 0);

        // Ids are never reused, even after the table was emptied.
        store.insert_batch(&envs("c1", 0, &[6])).unwrap();
        assert!(all(&store)[0].id > 5);
    }

    #[test]
    fn retention_counts_what_each_output_had_not_sent() {
        let (_dir, mut store) = temp_store();
        store.insert_batch(&envs("c1", 0, &[1, 2, 3, 4, 5, 6])).unwrap();
        let conn = store.connection();
        let mut behind = outputs::open_cursor(conn, "behind").unwrap();
        let mut ahead = outputs::open_cursor(conn, "ahead").unwrap();
        let ids: Vec<i64> = all(&store).iter().map(|e| e.id).collect();
        behind.events_through = ids[1];
        ahead.events_through = ids[5];
        outputs::write(conn, &behind).unwrap();
        outputs::write(conn, &ahead).unwrap();
        // The 4 oldest go: 2 of them the lagging output had not sent.
        let keep = Retention { max_age: None, max_events: Some(2) };
        assert_eq!(store.prune(&keep).unwrap(), 4);
        let rows = outputs::read(store.connection(), None).unwrap();
        let lost: Vec<(&str, u64)> = rows.iter().map(|r| (r.name.as_str(), r.lost)).collect();
        assert_eq!(lost, [("ahead", 0), ("behind", 2)]);
        // A cursor never moves back.
        behind.events_through = 0;
        outputs::write(store.connection(), &behind).unwrap();
        assert_eq!(outputs::read(store.connection(), Some("behind")).unwrap()[0].events_through, ids[1]);
        // The lag: rows above the cursor and the oldest one's time.
        let (n, oldest) = outputs::event_lag(store.connection(), ids[1]).unwrap();
        assert_eq!(n, 2);
        assert!(oldest.is_some());
        assert_eq!(outputs::event_lag(store.connection(), ids[5]).unwrap(), (0, None));
    }

    #[test]
    fn a_prune_larger_than_a_chunk_deletes_exactly_its_rows_in_several_transactions() {
        let (_dir, mut store) = temp_store();
        let total = 25_000u64;
        let seqs_all: Vec<u64> = (1..=total).collect();
        for batch in seqs_all.chunks(5_000) {
            store.insert_batch(&envs("c1", 0, batch)).unwrap();
        }
        let commits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = commits.clone();
        store
            .connection_mut()
            .commit_hook(Some(move || {
                counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                false
            }))
            .unwrap();
        // Observed at seq seconds; now is 20 s past the last: the age
        // phase deletes seqs 1..=12_345 (two chunks), the count phase the
        // oldest beyond 1_000 of what is left (11_655 rows: two chunks).
        let retention =
            Retention { max_age: Some(Duration::from_secs(total - 12_345 + 20)), max_events: Some(1_000) };
        let now_ms = (total + 20) * 1_000;
        assert_eq!(store.prune_at(&retention, now_ms).unwrap(), total - 1_000);
        assert_eq!(commits.load(std::sync::atomic::Ordering::Relaxed), 4);
        assert_eq!(seqs(&all(&store)), (total - 999..=total).collect::<Vec<_>>());
        assert_eq!(store.watermark("c1", 0).unwrap(), Some(total));

        // Step by step: no chunk over PRUNE_CHUNK, each its own transaction.
        store.connection_mut().commit_hook(None::<fn() -> bool>).unwrap();
        let mut pruning = Pruning::at(&Retention { max_age: None, max_events: Some(0) }, now_ms);
        let mut steps = Vec::new();
        while !pruning.is_done() {
            steps.push(store.prune_step(&mut pruning).unwrap());
        }
        assert_eq!(steps, [1_000]);
        assert_eq!((pruning.deleted(), pruning.transactions()), (1_000, 1));
        assert_eq!(store.count().unwrap(), 0);
    }

    #[test]
    fn chunked_pruning_keeps_the_semantics_of_one_delete() {
        let (_dir, mut store) = temp_store();
        // Observed out of id order (late events, several collectors).
        let observed = |seq: u64| (seq * 7_919 % 50) * 1_000;
        let batch: Vec<EventEnvelope> = (1..=40)
            .map(|seq| {
                let mut e = env("c1", 0, seq);
                e.event.observed_unix_ms = observed(seq);
                e
            })
            .collect();
        store.insert_batch(&batch).unwrap();
        let ids: Vec<(i64, u64)> = all(&store).iter().map(|e| (e.id, e.seq)).collect();
        // Now 30 s, keep 10 s: observed before 20 s goes, then all but
        // the newest 9 ids of what is left.
        let retention = Retention { max_age: Some(Duration::from_secs(10)), max_events: Some(9) };
        let young: Vec<(i64, u64)> =
            ids.iter().copied().filter(|(_, seq)| observed(*seq) >= 20_000).collect();
        let expected: Vec<u64> = young[young.len() - 9..].iter().map(|(_, seq)| *seq).collect();

        let mut pruning = Pruning::at(&retention, 30_000);
        pruning.chunk = 3;
        let mut steps = Vec::new();
        let mut later = 41;
        while !pruning.is_done() {
            steps.push(store.prune_step(&mut pruning).unwrap());
            // The writer commits between chunks: rows committed during the
            // count phase are newer than its boundary and stay.
            if matches!(pruning.phase, PrunePhase::Count(Some(_))) && later < 43 {
                let mut e = env("c1", 0, later);
                e.event.observed_unix_ms = 25_000;
                store.insert_batch(&[e]).unwrap();
                later += 1;
            }
        }
        assert!(steps.iter().all(|n| *n <= 3), "{steps:?}");
        assert!(steps.len() > 5, "{steps:?}");
        assert_eq!(pruning.deleted(), 40 - 9);
        assert_eq!(pruning.deleted(), steps.iter().sum::<u64>());
        let mut kept = expected.clone();
        kept.extend([41, 42]);
        assert_eq!(seqs(&all(&store)), kept);

        // The same rows as one delete (a single chunk) would keep.
        let (_dir2, mut other) = temp_store();
        other.insert_batch(&batch).unwrap();
        let mut pruning = Pruning::at(&retention, 30_000);
        pruning.chunk = usize::MAX / 2;
        other.prune_step(&mut pruning).unwrap();
        other.prune_step(&mut pruning).unwrap();
        assert!(pruning.is_done());
        assert_eq!(pruning.transactions(), 2);
        assert_eq!(seqs(&all(&other)), expected);
    }

    #[test]
    fn pruned_events_at_or_below_the_watermark_are_still_duplicates() {
        let (_dir, mut store) = temp_store();
        store.insert_batch(&envs("c1", 0, &[1, 2, 3])).unwrap();
        store.prune(&Retention { max_age: None, max_events: Some(0) }).unwrap();
        assert_eq!(store.count().unwrap(), 0);
        assert_eq!(store.max_seq("c1", 0).unwrap(), None);

        let outcome = store.insert_batch(&envs("c1", 0, &[2, 3, 4])).unwrap();
        assert_eq!((outcome.inserted, outcome.duplicates), (1, 2));
        assert_eq!(outcome.watermarks, vec![wm("c1", 0, 4)]);
        assert_eq!(seqs(&all(&store)), vec![4]);
    }

    #[test]
    fn open_read_only_reads_and_refuses_what_it_cannot() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.db");
        match EventStore::open_read_only(&path) {
            Err(StoreError::NotFound { path: p }) => assert_eq!(p, path),
            other => panic!("expected NotFound, got {other:?}"),
        }
        assert!(!path.exists());

        let mut store = EventStore::open(&path).unwrap();
        store.insert_batch(&envs("c1", 0, &[1, 2])).unwrap();
        let mut reader = EventStore::open_read_only(&path).unwrap();
        assert_eq!(seqs(&all(&reader)), vec![1, 2]);
        // A reader sees later commits of the writer.
        store.insert_batch(&envs("c1", 0, &[3])).unwrap();
        assert_eq!(reader.count().unwrap(), 3);
        assert!(matches!(reader.insert_batch(&envs("c1", 0, &[4])), Err(StoreError::Sqlite(_))));
        drop(store);

        let empty = dir.path().join("empty.db");
        std::fs::write(&empty, b"").unwrap();
        assert!(matches!(
            EventStore::open_read_only(&empty),
            Err(StoreError::SchemaVersion { found: 0, supported: SCHEMA_VERSION })
        ));
    }

    #[test]
    fn the_database_runs_in_wal_mode_with_full_sync() {
        let (_dir, store) = temp_store();
        let conn = store.connection();
        let mode: String = conn.query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap();
        assert_eq!(mode, "wal");
        // 2 is FULL.
        let sync: i64 = conn.query_row("PRAGMA synchronous", [], |r| r.get(0)).unwrap();
        assert_eq!(sync, 2);
        let fk: i64 = conn.query_row("PRAGMA foreign_keys", [], |r| r.get(0)).unwrap();
        assert_eq!(fk, 1);
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
        assert_eq!(version, i64::from(SCHEMA_VERSION));
    }

    /// The version 1 schema, as the previous release created it
    /// (`git show d1c5f64:procmond/src/store.rs`).
    const SCHEMA_V1: &str = "
CREATE TABLE process_events (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    collector_id   TEXT    NOT NULL,
    stream_id      INTEGER NOT NULL,
    seq            INTEGER NOT NULL,
    kind           TEXT    NOT NULL CHECK (kind IN ('started', 'stopped', 'modified')),
    snapshot       INTEGER NOT NULL,
    changes        TEXT    NOT NULL,
    observed_ms    INTEGER NOT NULL,
    pid            INTEGER NOT NULL,
    ppid           INTEGER NOT NULL,
    start_time     INTEGER NOT NULL,
    started_unix   INTEGER,
    name           TEXT    NOT NULL,
    exe            TEXT,
    exe_deleted    INTEGER,
    argv           TEXT,
    argv_truncated INTEGER NOT NULL,
    cwd            TEXT,
    uid            INTEGER,
    euid           INTEGER,
    gid            INTEGER,
    egid           INTEGER,
    user           TEXT,
    state          TEXT    NOT NULL,
    rss_bytes      INTEGER NOT NULL,
    sha256         TEXT,
    record         BLOB    NOT NULL,
    UNIQUE (collector_id, stream_id, seq)
);
CREATE INDEX process_events_observed_ms ON process_events (observed_ms);
CREATE INDEX process_events_pid ON process_events (pid);
CREATE INDEX process_events_name ON process_events (name);
CREATE INDEX process_events_kind ON process_events (kind);
CREATE TABLE stream_watermarks (
    collector_id TEXT    NOT NULL,
    stream_id    INTEGER NOT NULL,
    through      INTEGER NOT NULL,
    PRIMARY KEY (collector_id, stream_id)
) WITHOUT ROWID;
CREATE TABLE stream_gaps (
    collector_id TEXT    NOT NULL,
    stream_id    INTEGER NOT NULL,
    from_seq     INTEGER NOT NULL,
    to_seq       INTEGER NOT NULL,
    reason       TEXT    NOT NULL,
    observed_ms  INTEGER NOT NULL,
    PRIMARY KEY (collector_id, stream_id, from_seq)
) WITHOUT ROWID;
";

    /// The SQL of the `sql` block in the module docs, comments dropped and
    /// whitespace collapsed.
    fn normalized(sql: &str) -> String {
        let code: Vec<&str> = sql.lines().map(|l| l.split_once("--").map_or(l, |(code, _)| code)).collect();
        code.join(" ").split_whitespace().collect::<Vec<_>>().join(" ")
    }

    #[test]
    fn the_documented_schema_is_the_one_created() {
        let source = include_str!("lib.rs");
        let docs: Vec<&str> = source
            .lines()
            .map_while(|l| l.strip_prefix("//!"))
            .skip_while(|l| l.trim() != "```sql")
            .skip(1)
            .take_while(|l| l.trim() != "```")
            .collect();
        assert!(docs.len() > 40, "the sql block of the module docs was not found");
        assert_eq!(normalized(&docs.join("\n")), normalized(SCHEMA));
    }

    /// `(name, type, notnull, default, pk)` of every column, in order.
    type Columns = Vec<(String, String, bool, Option<String>, bool)>;

    fn columns(conn: &Connection) -> Columns {
        let mut stmt = conn.prepare("PRAGMA table_info(process_events)").unwrap();
        stmt.query_map([], |r| Ok((r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    /// An event row as version 1 wrote it: its record in the version 1
    /// layout (the fields before `source`).
    fn insert_v1_row(conn: &Connection, seq: u64, kind: EventKind, pid: u32) {
        let e = event(kind, pid, "old", 1_000 * seq);
        let record =
            postcard::to_stdvec(&(e.kind, e.snapshot, &e.changes, e.observed_unix_ms, &e.process, &e.sha256))
                .unwrap();
        conn.execute(
            "INSERT INTO process_events (collector_id, stream_id, seq, kind, snapshot, changes, \
             observed_ms, pid, ppid, start_time, name, argv_truncated, state, rss_bytes, record) \
             VALUES ('c1', 0, ?1, ?2, 0, '', ?3, ?4, 1, 7, 'old', 0, 'sleeping', 4096, ?5)",
            params![seq as i64, kind.as_str(), (1_000 * seq) as i64, pid, record],
        )
        .unwrap();
    }

    #[test]
    fn a_version_1_database_is_migrated_and_keeps_its_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(SCHEMA_V1).unwrap();
            insert_v1_row(&conn, 1, EventKind::Started, 500);
            insert_v1_row(&conn, 2, EventKind::Stopped, 500);
            conn.execute("INSERT INTO stream_watermarks VALUES ('c1', 0, 2)", []).unwrap();
            conn.pragma_update(None, "user_version", 1).unwrap();
        }
        // A reader does not migrate.
        assert!(matches!(
            EventStore::open_read_only(&path),
            Err(StoreError::SchemaVersion { found: 1, supported: SCHEMA_VERSION })
        ));

        let mut store = EventStore::open(&path).unwrap();
        let conn = store.connection();
        let version: u32 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        // The migrated table is the one a new database gets, column for
        // column.
        let (_fresh_dir, fresh) = temp_store();
        assert_eq!(columns(conn), columns(fresh.connection()));
        let check = conn.execute("UPDATE process_events SET source = 'ebpf' WHERE seq = 1", []);
        assert!(check.unwrap_err().to_string().contains("CHECK"), "the migrated column keeps its CHECK");

        // The old rows: decoded as poll events, not late, without an exit.
        let old = all(&store);
        assert_eq!(seqs(&old), vec![1, 2]);
        for s in &old {
            assert_eq!((s.event.source, s.event.late, s.event.exit), (EventSource::Poll, None, None));
            assert_eq!(s.event.process.name, "old");
        }
        assert_eq!(old[1].event.kind, EventKind::Stopped);
        let defaulted: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM process_events WHERE source = 'poll' AND late = 0 \
                 AND exit_code IS NULL AND exit_signal IS NULL \
                 AND late_after_ms IS NULL AND late_before_ms IS NULL",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(defaulted, 2);

        // New rows take the new columns; the stream goes on from its
        // watermark.
        let mut stopped = env("c1", 0, 3);
        stopped.event.kind = EventKind::Stopped;
        let outcome = store.insert_batch(&[env("c1", 0, 2), stopped]).unwrap();
        assert_eq!((outcome.inserted, outcome.duplicates), (1, 1));
        assert_eq!(outcome.watermarks, vec![wm("c1", 0, 3)]);
        let (source, exit_code): (String, Option<i64>) = store
            .connection()
            .query_row("SELECT source, exit_code FROM process_events WHERE seq = 3", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        assert_eq!((source.as_str(), exit_code), ("kernel", Some(3)));
        drop(store);

        // Opened again, it is simply version 2; a reader now opens it.
        let store = EventStore::open(&path).unwrap();
        assert_eq!(store.count().unwrap(), 3);
        let reader = EventStore::open_read_only(&path).unwrap();
        assert_eq!(seqs(&all(&reader)), vec![1, 2, 3]);
        assert_eq!(all(&reader)[2].event.exit, Some(ExitStatus::Code(3)));
    }

    #[test]
    fn a_failed_migration_leaves_version_1_intact() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(SCHEMA_V1).unwrap();
            insert_v1_row(&conn, 1, EventKind::Started, 500);
            // A column the migration adds is already there: its ALTER
            // fails half way through the script.
            conn.execute("ALTER TABLE process_events ADD COLUMN late_after_ms INTEGER", []).unwrap();
            conn.pragma_update(None, "user_version", 1).unwrap();
        }
        match EventStore::open(&path) {
            Err(e @ StoreError::Open { .. }) => assert!(e.to_string().contains("late_after_ms"), "{e}"),
            other => panic!("expected Open, got {other:?}"),
        }
        let conn = Connection::open(&path).unwrap();
        let version: u32 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
        assert_eq!(version, 1);
        let names: Vec<String> = columns(&conn).into_iter().map(|c| c.0).collect();
        assert!(!names.iter().any(|n| n == "source" || n == "exit_code"), "{names:?}");
    }

    #[test]
    fn source_exit_status_and_late_window_fill_their_columns() {
        let (_dir, mut store) = temp_store();
        let mut batch = envs("c1", 0, &[1, 2, 3, 4, 5]);
        // 1: a kernel Stopped that exited with 3 (the helper's default).
        batch[0].event.kind = EventKind::Stopped;
        // 2: killed by a signal, core dumped.
        batch[1].event.kind = EventKind::Stopped;
        batch[1].event.exit = Some(ExitStatus::Signal { signal: 11, core_dumped: true });
        // 3: the walk's Started: no exit status.
        batch[2].event.source = EventSource::Poll;
        batch[2].event.exit = None;
        // 4: stopped while the collector was down.
        batch[3].event.kind = EventKind::Stopped;
        batch[3].event.source = EventSource::Poll;
        batch[3].event.exit = None;
        batch[3].event.late =
            Some(LateWindow { after_unix_ms: 1_700_000_000_000, before_unix_ms: 1_700_000_060_000 });
        // 5: a window beyond SQLite's integers is clamped.
        batch[4].event.exit = Some(ExitStatus::Code(0));
        batch[4].event.late = Some(LateWindow { after_unix_ms: 0, before_unix_ms: u64::MAX });
        store.insert_batch(&batch).unwrap();

        type Row = (String, String, Option<i64>, Option<i64>, bool, Option<i64>, Option<i64>);
        let rows: Vec<Row> = store
            .connection()
            .prepare(
                "SELECT kind, source, exit_code, exit_signal, late, late_after_ms, late_before_ms \
                 FROM process_events ORDER BY seq",
            )
            .unwrap()
            .query_map([], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?))
            })
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let row = |kind: &str, source: &str, code, signal, late, after, before| -> Row {
            (kind.to_owned(), source.to_owned(), code, signal, late, after, before)
        };
        assert_eq!(
            rows,
            vec![
                row("stopped", "kernel", Some(3), None, false, None, None),
                row("stopped", "kernel", None, Some(11), false, None, None),
                row("started", "poll", None, None, false, None, None),
                row("stopped", "poll", None, None, true, Some(1_700_000_000_000), Some(1_700_000_060_000)),
                row("started", "kernel", Some(0), None, true, Some(0), Some(i64::MAX)),
            ]
        );
        // The record keeps what the columns flatten.
        let stored = all(&store);
        for (s, e) in stored.iter().zip(&batch) {
            assert_eq!(s.event, e.event);
        }
        // Rules can select on them.
        let kernel_exits: i64 = store
            .connection()
            .query_row(
                "SELECT COUNT(*) FROM process_events WHERE source = 'kernel' AND kind = 'stopped' \
                 AND exit_code IS NOT NULL",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(kernel_exits, 1);
        // The CHECK holds.
        let bad = store.connection().execute("UPDATE process_events SET source = 'ebpf' WHERE seq = 1", []);
        assert!(bad.unwrap_err().to_string().contains("CHECK"));
    }

    #[test]
    fn a_newer_schema_version_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.db");
        let store = EventStore::open(&path).unwrap();
        store.connection().pragma_update(None, "user_version", 99).unwrap();
        drop(store);
        for result in [EventStore::open(&path), EventStore::open_read_only(&path)] {
            match result {
                Err(e @ StoreError::SchemaVersion { found: 99, supported: SCHEMA_VERSION }) => {
                    assert!(e.to_string().contains("99"), "{e}");
                }
                other => panic!("expected SchemaVersion, got {other:?}"),
            }
        }
    }

    #[test]
    fn a_corrupt_record_is_an_error_naming_its_row() {
        let (_dir, mut store) = temp_store();
        store.insert_batch(&envs("c1", 0, &[1, 2])).unwrap();
        let id = all(&store)[1].id;
        store
            .connection()
            .execute("UPDATE process_events SET record = x'ff00ff' WHERE id = ?1", [id])
            .unwrap();
        match store.query(&EventQuery::default()) {
            Err(StoreError::Corrupt { id: bad, reason }) => {
                assert_eq!(bad, id);
                assert!(reason.contains("decode"), "{reason}");
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
        // The rows before it still read.
        assert_eq!(seqs(&store.query(&EventQuery { limit: 1, ..Default::default() }).unwrap()), vec![1]);

        store.connection().execute("UPDATE process_events SET record = 'text' WHERE id = ?1", [id]).unwrap();
        assert!(
            matches!(store.query(&EventQuery::default()), Err(StoreError::Corrupt { id: bad, .. }) if bad == id)
        );
    }

    #[test]
    fn an_unstorable_seq_fails_the_whole_batch() {
        let (_dir, mut store) = temp_store();
        let mut batch = envs("c1", 0, &[1]);
        batch.push(env("c1", 0, u64::MAX));
        match store.insert_batch(&batch) {
            Err(StoreError::Unstorable { seq, .. }) => assert_eq!(seq, u64::MAX),
            other => panic!("expected Unstorable, got {other:?}"),
        }
        assert_eq!(store.count().unwrap(), 0);
        assert_eq!(store.watermark("c1", 0).unwrap(), None);
    }

    #[cfg(unix)]
    #[test]
    fn open_creates_a_private_directory_and_file() {
        use std::os::unix::fs::PermissionsExt;

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/b/events.db");
        let _store = EventStore::open(&path).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir.path().join("a")), 0o700);
        assert_eq!(mode(&dir.path().join("a/b")), 0o700);
        assert_eq!(mode(&path), 0o600);
    }

    #[test]
    fn open_names_the_file_when_it_is_not_a_database() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.db");
        std::fs::write(&path, vec![0x5a; 4096]).unwrap();
        match EventStore::open(&path) {
            Err(e @ StoreError::Open { .. }) => assert!(e.to_string().contains("events.db"), "{e}"),
            other => panic!("expected Open, got {other:?}"),
        }
    }
}
