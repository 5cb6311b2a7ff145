//! Unit tests of opening: the schema as documented, migration from
//! version 1, refusals, pragmas and private files.

use daemoneye_contract::event::EventSource;

use crate::tests::*;
use crate::*;

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
    let source = include_str!("../lib.rs");
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

#[test]
fn an_output_table_from_before_resent_is_read_as_zero_and_gains_the_column_when_opened() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.db");
    drop(EventStore::open(&path).unwrap());
    {
        // The table as the release before `resent` made it, with a row.
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            "DROP TABLE output_cursors;
             CREATE TABLE output_cursors (name TEXT PRIMARY KEY, events_through INTEGER NOT NULL,
               alerts_through INTEGER NOT NULL, lost INTEGER NOT NULL DEFAULT 0,
               lost_alerted INTEGER NOT NULL DEFAULT 0, sent INTEGER NOT NULL DEFAULT 0,
               retried INTEGER NOT NULL DEFAULT 0, state TEXT NOT NULL DEFAULT 'ok', last_error TEXT,
               updated_ms INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID;
             INSERT INTO output_cursors (name, events_through, alerts_through, sent) VALUES ('siem', 7, 2, 9);",
        )
        .unwrap();
    }
    // The CLI reads it as it is.
    let old = outputs::read(EventStore::open_read_only(&path).unwrap().connection(), None).unwrap();
    assert_eq!((old[0].events_through, old[0].sent, old[0].resent), (7, 9, 0));
    // The agent's open adds the column; the row keeps its values.
    let store = EventStore::open(&path).unwrap();
    let mut c = outputs::open_cursor(store.connection(), "siem").unwrap();
    assert_eq!((c.events_through, c.alerts_through, c.sent, c.resent), (7, 2, 9, 0));
    c.resent = 5;
    outputs::write(store.connection(), &c).unwrap();
    assert_eq!(outputs::read(store.connection(), Some("siem")).unwrap()[0].resent, 5);
}
