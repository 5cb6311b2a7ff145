//! Opening a database: its private directory and file, the pragmas, the
//! schema (created, or migrated from version 1 and 2, in the crate docs'
//! Schema) and its version check.

use super::*;

/// The schema a new database is created with (version 3); documented in
/// the module docs, keep both in step (a test compares them).
pub(super) const SCHEMA: &str = "
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
pub(super) const MIGRATE_V1_TO_V2: &str = "
ALTER TABLE process_events ADD COLUMN source TEXT NOT NULL DEFAULT 'poll' CHECK (source IN ('poll', 'kernel'));
ALTER TABLE process_events ADD COLUMN exit_code INTEGER;
ALTER TABLE process_events ADD COLUMN exit_signal INTEGER;
ALTER TABLE process_events ADD COLUMN late INTEGER NOT NULL DEFAULT 0;
ALTER TABLE process_events ADD COLUMN late_after_ms INTEGER;
ALTER TABLE process_events ADD COLUMN late_before_ms INTEGER;
";

pub(super) fn open_error(path: &Path, source: rusqlite::Error) -> StoreError {
    StoreError::Open { path: path.to_owned(), source }
}

/// Creates the database's directory if missing (0700 on Unix: the events
/// hold command lines and user names).
pub(super) fn create_parent(path: &Path) -> Result<(), StoreError> {
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
pub(super) fn create_private_file(path: &Path) -> Result<(), StoreError> {
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
pub(super) fn configure(conn: &Connection) -> rusqlite::Result<()> {
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

pub(super) fn user_version(conn: &Connection) -> rusqlite::Result<u32> {
    let v: i64 = conn.query_row("PRAGMA user_version", [], |row| row.get(0))?;
    // user_version is a signed 32-bit integer; a negative one is nothing
    // this build wrote, so it reads as "newer".
    Ok(u32::try_from(v).unwrap_or(u32::MAX))
}

/// Creates the schema in an empty database, migrates a version 1 or 2 one, or
/// checks the version of an existing one. Immediate, so two processes
/// opening a file at once do not both create (or migrate) it: the second
/// reads the version the first committed.
pub(super) fn init_schema(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
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
mod tests;
