//! Unit tests of the store.

use std::path::PathBuf;
use std::sync::Arc;

use daemoneye_platform::{
    Argv, Credentials, FileIdentity, ProcessDetails, ProcessRecord, ProcessState, Unavailable,
};

use super::*;
use daemoneye_contract::event::{Change, EventSource, LateWindow};

pub(super) fn record(pid: u32, name: &str) -> ProcessRecord {
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

pub(super) fn event(kind: EventKind, pid: u32, name: &str, observed_ms: u64) -> ProcessEvent {
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

pub(super) fn env(collector: &str, stream: u64, seq: u64) -> EventEnvelope {
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

pub(super) fn envs(collector: &str, stream: u64, seqs: &[u64]) -> Vec<EventEnvelope> {
    seqs.iter().map(|&s| env(collector, stream, s)).collect()
}

pub(super) fn temp_store() -> (tempfile::TempDir, EventStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = EventStore::open(&dir.path().join("events.db")).unwrap();
    (dir, store)
}

pub(super) fn all(store: &EventStore) -> Vec<StoredEvent> {
    store.query(&EventQuery::default()).unwrap()
}

pub(super) fn seqs(events: &[StoredEvent]) -> Vec<u64> {
    events.iter().map(|e| e.seq).collect()
}

pub(super) fn wm(collector: &str, stream: u64, through: u64) -> StreamWatermark {
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
    assert_eq!(store.insert_gap(&gap(3, 4)).unwrap().watermark.through, 5, "the gap bridges to the stored 5");
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

    let c2 = store.query(&EventQuery { collector_id: Some("c2".to_owned()), ..Default::default() }).unwrap();
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
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?)))
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
fn a_corrupt_record_is_an_error_naming_its_row() {
    let (_dir, mut store) = temp_store();
    store.insert_batch(&envs("c1", 0, &[1, 2])).unwrap();
    let id = all(&store)[1].id;
    store.connection().execute("UPDATE process_events SET record = x'ff00ff' WHERE id = ?1", [id]).unwrap();
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
