//! Delivery with an explicit base, and its liveness, against the real
//! agent and procmond: a store restored from an older backup, a collector
//! whose data dir was wiped, a store that stops acknowledging (the test
//! holds the database's write lock), the WAL's cap, and the store's bus
//! client cut by the broker as a slow consumer. Every event ends up stored
//! once or recorded as a gap with its reason, and no stream stays stuck.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use daemoneye_agent::api::AgentState;
use daemoneye_store::EventStore;
use daemoneye_tests::{CollectorDef, System, wait_until};

/// A collection cycle, its commit and slack on a loaded 2-core machine.
const CYCLE: Duration = Duration::from_secs(40);

/// One stream of a collector as the store holds it.
#[derive(Debug)]
struct Stream {
    stream_id: u64,
    rows: u64,
    distinct: u64,
    max_seq: u64,
    watermark: u64,
    gaps: Vec<(u64, u64, String)>,
}

impl Stream {
    /// Every number from 1 to the watermark is stored once or in a gap
    /// with a reason, and nothing stored lies above the watermark.
    fn settled(&self) -> bool {
        let covered = |seq: u64| self.gaps.iter().any(|(f, t, r)| *f <= seq && seq <= *t && !r.is_empty());
        let gap_numbers: u64 = self.gaps.iter().map(|(f, t, _)| t - f + 1).sum();
        self.rows == self.distinct
            && self.max_seq <= self.watermark
            && self.rows + gap_numbers == self.watermark
            && (1..=self.watermark.min(100_000)).all(|s| covered(s) || s <= self.max_seq)
    }
}

fn streams(db: &Path, collector: &str) -> Vec<Stream> {
    let Ok(store) = EventStore::open_read_only(db) else { return Vec::new() };
    let conn = store.connection();
    let Ok(mut stmt) = conn.prepare(
        "SELECT w.stream_id, w.through,
                (SELECT count(*) FROM process_events e WHERE e.collector_id = w.collector_id AND e.stream_id = w.stream_id),
                (SELECT count(DISTINCT seq) FROM process_events e WHERE e.collector_id = w.collector_id AND e.stream_id = w.stream_id),
                (SELECT coalesce(max(seq), 0) FROM process_events e WHERE e.collector_id = w.collector_id AND e.stream_id = w.stream_id)
         FROM stream_watermarks w WHERE w.collector_id = ?1
         ORDER BY (SELECT min(id) FROM process_events e WHERE e.collector_id = w.collector_id AND e.stream_id = w.stream_id)",
    ) else {
        panic!("the streams query does not prepare");
    };
    let rows: Vec<(i64, i64, i64, i64, i64)> = stmt
        .query_map([collector], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)))
        .map(|it| it.filter_map(Result::ok).collect())
        .unwrap_or_default();
    rows.into_iter()
        .map(|(stream, through, rows, distinct, max)| {
            let stream_id = u64::from_ne_bytes(stream.to_ne_bytes());
            Stream {
                stream_id,
                rows: rows as u64,
                distinct: distinct as u64,
                max_seq: max as u64,
                watermark: through as u64,
                gaps: store.gaps(collector, stream_id).unwrap_or_default(),
            }
        })
        .collect()
}

/// Waits until every stream of `collector` is settled (and there are
/// `n` of them at least); returns them.
fn wait_settled(sys: &System, collector: &str, n: usize) -> Vec<Stream> {
    let db = sys.database();
    let ok = wait_until(CYCLE * 2, || {
        let s = streams(&db, collector);
        s.len() >= n && s.iter().all(|s| s.rows > 0 && s.settled())
    });
    let s = streams(&db, collector);
    assert!(ok, "streams of {collector} not settled: {s:#?}\n{}", sys.tail());
    s
}

/// Runs `n` short processes (each a Started and a Stopped event).
fn churn(n: u32) {
    let st = Command::new("sh")
        .arg("-c")
        .arg(format!("i=0; while [ $i -lt {n} ]; do /bin/true; i=$((i+1)); done"))
        .stdin(Stdio::null())
        .status()
        .expect("sh runs");
    assert!(st.success());
}

/// The test's hold on the store's write lock: the store writer's commits
/// wait (and fail with "database is locked", retried), so nothing is
/// acknowledged until it is dropped.
struct StoreLock(rusqlite::Connection);

impl StoreLock {
    fn take(db: &Path) -> StoreLock {
        let conn = rusqlite::Connection::open(db).expect("open the store");
        conn.busy_timeout(Duration::from_secs(30)).expect("busy timeout");
        conn.execute_batch("BEGIN IMMEDIATE").expect("the store's write lock");
        StoreLock(conn)
    }

    fn release(self) {
        self.0.execute_batch("COMMIT").expect("release the write lock");
    }
}

fn steady(sys: &mut System) {
    sys.wait_status(Duration::from_secs(30), "SteadyState", |s| s.state == AgentState::SteadyState);
}

#[test]
fn a_store_restored_from_an_older_backup_records_the_gap_and_moves_on() {
    let mut sys = System::start(&[CollectorDef::procmond("pm-b")], "");
    steady(&mut sys);
    wait_settled(&sys, "pm-b", 1);
    // The backup: the store as it is now.
    let backup = sys.dir.path().join("backup.db");
    {
        let conn = rusqlite::Connection::open(sys.database()).expect("open");
        conn.execute("VACUUM INTO ?1", [backup.to_str().expect("utf-8 path")]).expect("backup");
    }
    let before = streams(&backup, "pm-b")[0].watermark;
    // More events, committed and acknowledged, over a few cycles, so the
    // collector's checkpoints let it truncate its WAL past the backup.
    for round in 1..=3 {
        churn(30);
        let ok = wait_until(CYCLE, || {
            streams(&sys.database(), "pm-b").iter().any(|s| s.watermark >= before + 60 * round)
        });
        assert!(ok, "no progress after the backup\n{}", sys.tail());
        // A cycle later its checkpoint allows the truncation.
        let cycles = |s: &daemoneye_agent::api::AgentStatus| {
            s.collectors[0].heartbeat.as_ref().map_or(0, |h| h.cycles)
        };
        let now = cycles(&sys.wait_status(CYCLE, "a heartbeat", |s| cycles(s) > 0));
        sys.wait_status(CYCLE, "two more cycles", |s| cycles(s) >= now + 2);
    }
    assert_eq!(sys.stop(Duration::from_secs(30)).code(), Some(0));
    let acked = streams(&sys.database(), "pm-b")[0].watermark;
    // Restore: the store goes back, the collector keeps its WAL.
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", sys.database().display()));
    }
    std::fs::copy(&backup, sys.database()).expect("restore");
    sys.start_agent();
    steady(&mut sys);
    let moved = wait_until(CYCLE * 2, || {
        churn(5);
        streams(&sys.database(), "pm-b").first().is_some_and(|s| s.watermark > acked && s.settled())
    });
    let s = streams(&sys.database(), "pm-b");
    assert!(moved, "acknowledgements move past the restored store ({acked}): {s:#?}\n{}", sys.tail());
    let s = &s[0];
    assert!(
        s.gaps
            .iter()
            .any(|(from, _, reason)| *from == before + 1 && reason.contains("restored from an older backup")),
        "the numbers the restored store missed are a gap with its reason: {s:#?}"
    );
    // The collector's WAL no longer holds what the store settled.
    let status = sys.wait_status(CYCLE, "nothing left unacknowledged", |st| {
        st.delivery.iter().any(|d| d.collector_id == "pm-b" && d.status.base > acked)
    });
    assert!(!status.delivery[0].stalled, "{status:#?}");
    assert_eq!(sys.stop(Duration::from_secs(30)).code(), Some(0));
}

#[test]
fn a_collector_whose_data_dir_was_wiped_starts_a_new_stream_and_nothing_is_dropped() {
    let mut sys = System::start(&[CollectorDef::procmond("pm-w")], "");
    steady(&mut sys);
    let first = wait_settled(&sys, "pm-w", 1);
    assert_eq!(sys.stop(Duration::from_secs(30)).code(), Some(0));
    // Its WAL goes, but a stale STREAM file stays behind: the fresh WAL
    // must not restart at 1 in the old stream.
    let wal = sys.data_dir().join("collectors").join("pm-w").join("wal").join("pm-w");
    let stream_file = std::fs::read(wal.join("STREAM")).expect("STREAM file");
    std::fs::remove_dir_all(sys.data_dir().join("collectors").join("pm-w")).expect("wipe");
    std::fs::create_dir_all(&wal).expect("wal dir");
    std::fs::write(wal.join("STREAM"), stream_file).expect("stale STREAM");
    sys.start_agent();
    steady(&mut sys);
    let both = wait_settled(&sys, "pm-w", 2);
    assert_eq!(both.len(), 2, "{both:#?}");
    assert_ne!(both[0].stream_id, both[1].stream_id);
    let new = both.iter().find(|s| s.stream_id != first[0].stream_id).expect("a new stream");
    assert!(new.gaps.is_empty() && new.rows == new.watermark, "the new stream is whole from 1: {new:#?}");
    let old = both.iter().find(|s| s.stream_id == first[0].stream_id).expect("the old stream");
    assert!(old.watermark >= first[0].watermark && old.settled(), "{old:#?}");
    assert_eq!(sys.stop(Duration::from_secs(30)).code(), Some(0));
}

#[test]
fn a_store_that_stops_acknowledging_shows_in_status_and_drives_the_escalation() {
    let mut sys = System::start(&[CollectorDef::procmond("pm-s")], "delivery: {ack_stall_secs: 4}\n");
    steady(&mut sys);
    wait_settled(&sys, "pm-s", 1);
    // Acknowledged so far (a slow start may have stalled before the lock).
    let acked = sys
        .wait_status(CYCLE, "acknowledgements", |s| {
            s.delivery.iter().any(|d| d.status.base > 1 && !d.stalled)
        })
        .delivery[0]
        .status
        .base;
    let lock = StoreLock::take(&sys.database());
    let locked_at = daemoneye_agent::api::now_unix_ms();
    churn(20);
    let stalled = sys.wait_status(Duration::from_secs(30), "an acknowledgement stall", |s| {
        s.delivery.iter().any(|d| d.collector_id == "pm-s" && d.stalled && d.status.base >= acked)
    });
    let d = &stalled.delivery[0];
    assert!(d.status.unacknowledged > 0 && d.status.oldest_unacknowledged_ms > 0, "{d:#?}");
    let steps = sys.wait_status(Duration::from_secs(20), "the escalation's steps", |s| {
        let steps: Vec<&str> = s.collectors[0]
            .escalation
            .iter()
            .filter(|e| e.at_unix_ms >= locked_at)
            .map(|e| e.step.as_str())
            .collect();
        steps.contains(&"ack_stall") && steps.contains(&"health_check")
    });
    // The collector lives: the escalation ends at its answer, nobody is
    // killed for the store's stall.
    assert_eq!(steps.collectors[0].restarts, 0, "{steps:#?}");
    let out = sys.cli(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("pm-s delivery:") && text.contains("STALLED"), "{text}\n{}", sys.tail());
    assert!(sys.log().contains("failed, escalating"), "{}", sys.tail());
    lock.release();
    churn(5);
    sys.wait_status(CYCLE, "acknowledgements again", |s| s.delivery.iter().any(|d| !d.stalled));
    wait_settled(&sys, "pm-s", 1);
    let alerts = sys.cli(&["alerts", "--json"]);
    let alerts = String::from_utf8_lossy(&alerts.stdout);
    assert!(alerts.contains("collector_ack_stall"), "the stall is an alert: {alerts}\n{}", sys.tail());
    assert_eq!(sys.stop(Duration::from_secs(30)).code(), Some(0));
}

#[test]
fn the_wal_cap_refuses_counts_alerts_and_records_the_refused_events_as_a_gap() {
    let pm = CollectorDef::procmond("pm-c").args(&[
        "--interval",
        "5",
        "--log-level",
        "debug",
        "--wal-max-bytes",
        "1048576",
    ]);
    let mut sys = System::start(&[pm], "");
    steady(&mut sys);
    wait_settled(&sys, "pm-c", 1);
    let lock = StoreLock::take(&sys.database());
    // Unacknowledged events fill the 1 MiB WAL.
    let full = wait_until(Duration::from_secs(120), || {
        churn(200);
        sys.status()
            .is_some_and(|s| s.delivery.iter().any(|d| d.status.wal_full && d.status.events_refused > 0))
    });
    assert!(full, "the WAL never reached its cap: {:#?}\n{}", sys.status(), sys.tail());
    let out = sys.cli(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("FULL, cap reached"), "{text}");
    assert!(sys.log().contains("reached its cap"), "{}", sys.tail());
    lock.release();
    // Acknowledgements free space; the next events record the refused ones.
    let recorded = wait_until(CYCLE * 2, || {
        churn(5);
        streams(&sys.database(), "pm-c")
            .iter()
            .any(|s| s.gaps.iter().any(|(_, _, r)| r.contains("events refused: the WAL was at its cap")))
    });
    let wal = sys.data_dir().join("collectors/pm-c/wal/pm-c");
    let listing: Vec<(String, u64)> = std::fs::read_dir(&wal)
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| (e.file_name().to_string_lossy().into_owned(), e.metadata().map_or(0, |m| m.len())))
                .collect()
        })
        .unwrap_or_default();
    assert!(
        recorded,
        "no gap for the refused events: {:#?}\nWAL {listing:?}\ndelivery {:#?}\n{}",
        streams(&sys.database(), "pm-c"),
        sys.status().map(|s| s.delivery),
        sys.tail()
    );
    wait_settled(&sys, "pm-c", 1);
    let alerts = sys.cli(&["alerts", "--json"]);
    let alerts = String::from_utf8_lossy(&alerts.stdout);
    assert!(alerts.contains("collector_wal_full"), "the cap is an alert: {alerts}");
    let status = sys.wait_status(CYCLE, "below the cap", |s| s.delivery.iter().any(|d| !d.status.wal_full));
    assert!(status.delivery[0].status.wal_full_times >= 1, "{status:#?}");
    assert_eq!(sys.stop(Duration::from_secs(30)).code(), Some(0));
}

#[test]
fn the_store_cut_as_a_slow_consumer_loses_nothing() {
    // pm-n waits for the test before it starts: its stream is new when the
    // store's client is already backed up.
    let tmp = tempfile::tempdir().expect("tempdir");
    let go = tmp.path().join("go");
    let late = tmp.path().join("late-procmond");
    daemoneye_tests::write_collector_script(
        &late,
        &format!(
            "while [ ! -e {} ]; do sleep 0.1; done\nexec {} \"$@\"",
            go.display(),
            daemoneye_tests::bin("procmond").display()
        ),
    );
    // Long heartbeats: a collector held back by the store's full queue
    // (Block) misses them, and this test is not about the escalation.
    let mut n = CollectorDef::with_binary("pm-n", late).heartbeat(60);
    n.startup_timeout_secs = 300;
    let mut sys = System::start(&[CollectorDef::procmond("pm-l").heartbeat(60), n], "");
    sys.wait_status(Duration::from_secs(30), "pm-l registered", |s| s.collectors[0].registered);
    let lock = StoreLock::take(&sys.database());
    std::fs::write(&go, b"").expect("go");
    // Load until the broker cuts the store's client (its queue over the
    // limit for 10 s while the writer waits for the lock).
    let cut = wait_until(Duration::from_secs(240), || {
        churn(500);
        sys.log().contains("stayed over its queue limit")
    });
    assert!(cut, "the broker never cut a slow consumer\n{}", sys.tail());
    lock.release();
    churn(50);
    for id in ["pm-l", "pm-n"] {
        let s = wait_settled(&sys, id, 1);
        for stream in &s {
            assert!(
                stream.gaps.iter().all(|(_, _, r)| !r.is_empty()),
                "every gap has its reason: {stream:#?}"
            );
        }
        assert!(s.iter().all(|s| s.gaps.is_empty()), "nothing of {id} was lost: {s:#?}");
    }
    assert_eq!(sys.stop(Duration::from_secs(60)).code(), Some(0));
}
