//! Unit tests of `rules`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use crate::EventStore;
use daemoneye_contract::event::{Change, EventEnvelope, EventKind, ProcessEvent};
use daemoneye_platform::{Argv, Credentials};

use super::*;

fn store() -> (tempfile::TempDir, EventStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = EventStore::open(&dir.path().join("events.db")).unwrap();
    (dir, store)
}

/// A `started` event of `/usr/bin/<name>`-like `exe` as uid 1000.
fn event(seq: u64, pid: u32, name: &str, exe: &str) -> EventEnvelope {
    let mut process = daemoneye_contract::testing::record(pid, 1_000 + u64::from(pid), name);
    let d = Arc::make_mut(&mut process.details);
    d.exe = Ok(PathBuf::from(exe));
    d.argv = Ok(Argv { args: vec![exe.to_owned(), "--flag".to_owned()], truncated: false });
    daemoneye_contract::testing::envelope("c1", 1, seq, EventKind::Started, process, 1_000 * seq)
}

fn with(mut env: EventEnvelope, f: impl FnOnce(&mut ProcessEvent)) -> EventEnvelope {
    f(&mut env.event);
    env
}

fn as_root(e: &mut ProcessEvent) {
    Arc::make_mut(&mut e.process.details).credentials = Ok(Credentials { uid: 0, euid: 0, gid: 0, egid: 0 });
}

/// The row id of each seq, in the store.
fn ids(store: &EventStore) -> HashMap<u64, i64> {
    let mut stmt = store.connection().prepare("SELECT seq, id FROM process_events").unwrap();
    stmt.query_map([], |r| Ok((r.get::<_, i64>(0)?.cast_unsigned(), r.get(1)?)))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap()
}

fn max_id(conn: &Connection) -> i64 {
    conn.query_row("SELECT max(id) FROM process_events", [], |r| r.get(0)).unwrap()
}

fn rule(name: &str, sql: &str) -> RuleSpec {
    RuleSpec {
        name: name.to_owned(),
        severity: Severity::Low,
        description: format!("{name} matched"),
        sql: sql.to_owned(),
        enabled: true,
    }
}

fn pairs(alerts: &[Alert]) -> Vec<(String, i64)> {
    let mut v: Vec<(String, i64)> = alerts.iter().map(|a| (a.rule.clone(), a.event_id)).collect();
    v.sort();
    v
}

fn alert_rows(conn: &Connection) -> i64 {
    conn.query_row("SELECT count(*) FROM alerts", [], |r| r.get(0)).unwrap()
}

#[test]
fn the_default_rules_compile_against_the_real_schema() {
    let (_dir, store) = store();
    let engine = RuleEngine::compile(store.connection(), &default_rules()).unwrap();
    assert_eq!(engine.len(), DEFAULT_RULES.len());
    for (name, verdict) in validate(&default_rules()) {
        assert_eq!(verdict, Ok(()), "{name}");
    }
}

#[test]
fn daemoneyes_own_executables_are_left_out_of_the_built_in_rules_by_path_and_hash() {
    use daemoneye_contract::event::HashOutcome;
    // A checkout built under /tmp: our binary lives in a temp dir.
    let dir = tempfile::Builder::new().tempdir_in("/tmp").unwrap();
    let ours = dir.path().join("procmond");
    std::fs::write(&ours, b"our program").unwrap();
    let copy = dir.path().join("copy");
    std::fs::create_dir(&copy).unwrap();
    std::fs::write(copy.join("procmond"), b"our program").unwrap();
    let own = Arc::new(crate::own::OwnBinaries::new([ours.clone()]));
    own.hash_all();
    let path = std::fs::canonicalize(&ours).unwrap().display().to_string();
    let elsewhere = std::fs::canonicalize(copy.join("procmond")).unwrap().display().to_string();
    let hash = |hex: String| move |e: &mut ProcessEvent| e.sha256 = Some(HashOutcome::Sha256(hex));
    let real = {
        use sha2::Digest;
        sha2::Sha256::digest(b"our program").iter().map(|b| format!("{b:02x}")).collect::<String>()
    };
    let root = |e: &mut ProcessEvent| as_root(e);
    let batch = vec![
        // 1, 2: ours as root, without a hash and with its own: nothing.
        with(event(1, 10, "procmond", &path), root),
        with(with(event(2, 11, "procmond", &path), root), hash(real.clone())),
        // 3: another program at our path: both rules.
        with(with(event(3, 12, "procmond", &path), root), hash("0".repeat(64))),
        // 4: our name and content, somewhere else: both rules.
        with(with(event(4, 13, "procmond", &elsewhere), root), hash(real.clone())),
    ];
    let (_db, mut store) = store();
    store.insert_batch(&batch).unwrap();
    let id = ids(&store);
    let conn = store.connection_mut();
    let mut engine = RuleEngine::compile(conn, &default_rules()).unwrap();
    crate::own::register(conn, own).unwrap();
    let alerts = engine.run(conn, 0, max_id(conn), 99_000).unwrap();
    let mut expected: Vec<(String, i64)> = [3, 4]
        .into_iter()
        .flat_map(|seq| {
            [("exe-in-temp-dir".to_owned(), id[&seq]), ("root-from-user-writable-dir".to_owned(), id[&seq])]
        })
        .collect();
    expected.sort();
    assert_eq!(pairs(&alerts), expected);
}

#[test]
fn each_default_rule_fires_on_its_pattern_and_nothing_else() {
    let (_dir, mut store) = store();
    let batch = vec![
        // 1: run from /tmp.
        event(1, 10, "x", "/tmp/x"),
        // 2: its file deleted.
        with(event(2, 11, "daemon", "/usr/sbin/daemon"), |e| {
            Arc::make_mut(&mut e.process.details).exe_deleted = Ok(true);
        }),
        // 3, 4: nginx, then a shell it started.
        event(3, 100, "nginx", "/usr/sbin/nginx"),
        with(event(4, 101, "sh", "/usr/bin/sh"), |e| e.process.ppid = 100),
        // 5: root from /home.
        with(event(5, 12, "tool", "/home/alice/tool"), as_root),
        // 6: nothing to see.
        event(6, 13, "sleep", "/usr/bin/sleep"),
        // 7: a shell started by a shell is not a web server's.
        with(event(7, 102, "bash", "/usr/bin/bash"), |e| e.process.ppid = 101),
        // 8: root from /home, but already running at start: not new.
        with(event(8, 14, "tool", "/home/alice/tool"), |e| {
            as_root(e);
            e.snapshot = true;
        }),
        // 9: a process from /tmp exits: not a start.
        with(event(9, 10, "x", "/tmp/x"), |e| e.kind = EventKind::Stopped),
        // 10: a credentials change of a /tmp process is no new program...
        with(event(10, 15, "y", "/tmp/y"), |e| {
            e.kind = EventKind::Modified;
            e.changes = vec![Change::Credentials];
        }),
        // 11: ... but an exec into one is.
        with(event(11, 16, "z", "/dev/shm/z"), |e| {
            e.kind = EventKind::Modified;
            e.changes = vec![Change::Exec];
        }),
        // 12: a file deleted while it runs, where the platform cannot
        // tell (exe_deleted column 0).
        with(event(12, 17, "old", "/usr/bin/old"), |e| {
            e.kind = EventKind::Modified;
            e.changes = vec![Change::ExeDeleted];
        }),
    ];
    store.insert_batch(&batch).unwrap();
    let id = ids(&store);
    let conn = store.connection_mut();
    let mut engine = RuleEngine::compile(conn, &default_rules()).unwrap();
    let alerts = engine.run(conn, 0, max_id(conn), 99_000).unwrap();
    let expected = |v: &[(&str, u64)]| {
        let mut v: Vec<(String, i64)> = v.iter().map(|(r, seq)| ((*r).to_owned(), id[seq])).collect();
        v.sort();
        v
    };
    assert_eq!(
        pairs(&alerts),
        expected(&[
            ("exe-in-temp-dir", 1),
            ("deleted-exe-running", 2),
            ("web-server-spawned-shell", 4),
            ("root-from-user-writable-dir", 5),
            ("exe-in-temp-dir", 10 + 1),
            ("deleted-exe-running", 12),
        ])
    );
    assert_eq!(alert_rows(conn), 6);

    // The alert carries the event's fields.
    let a = alerts.iter().find(|a| a.rule == "exe-in-temp-dir" && a.event_id == id[&1]).unwrap();
    assert_eq!(
        (a.collector_id.as_str(), a.pid, a.name.as_str(), a.exe.as_deref()),
        ("c1", 10, "x", Some("/tmp/x"))
    );
    assert_eq!(a.command_line.as_deref(), Some("/tmp/x --flag"));
    assert_eq!((a.severity, a.observed_unix_ms, a.raised_unix_ms), (Severity::High, 1_000, 99_000));
    assert_eq!(query_alerts(conn, &AlertQuery::default()).unwrap(), {
        let mut stored = alerts.clone();
        stored.sort_by_key(|a| a.id);
        stored
    });
    assert_eq!(RuleEngine::cursor(conn).unwrap(), max_id(conn));
}

#[test]
fn rows_outside_the_window_are_never_matched() {
    let (_dir, mut store) = store();
    store.insert_batch(&[1, 2, 3].map(|s| event(s, 10 + s as u32, "x", "/tmp/x"))).unwrap();
    let id = ids(&store);
    let conn = store.connection_mut();
    // A rule that returns every stored id, not only the batch's.
    let specs = [rule("everything", "SELECT id FROM process_events"), default_rules().remove(0)];
    let mut engine = RuleEngine::compile(conn, &specs).unwrap();
    let alerts = engine.run(conn, id[&1], id[&2], 5).unwrap();
    assert_eq!(
        pairs(&alerts),
        vec![("everything".to_owned(), id[&2]), ("exe-in-temp-dir".to_owned(), id[&2])]
    );
    // An empty window runs nothing and moves nothing.
    assert!(engine.run(conn, id[&3], id[&3], 5).unwrap().is_empty());
    assert_eq!(RuleEngine::cursor(conn).unwrap(), id[&2]);
}

#[test]
fn a_window_evaluated_twice_raises_each_alert_once() {
    let (_dir, mut store) = store();
    store.insert_batch(&[event(1, 10, "x", "/tmp/x"), event(2, 11, "y", "/usr/bin/y")]).unwrap();
    let conn = store.connection_mut();
    let through = max_id(conn);
    let mut engine = RuleEngine::compile(conn, &default_rules()).unwrap();
    assert_eq!(engine.run(conn, 0, through, 1).unwrap().len(), 1);
    assert_eq!(engine.run(conn, 0, through, 2).unwrap(), Vec::new());
    // A new engine (a restarted agent) too.
    let mut engine = RuleEngine::compile(conn, &default_rules()).unwrap();
    assert_eq!(engine.run(conn, 0, through, 3).unwrap(), Vec::new());
    assert_eq!(alert_rows(conn), 1);
    // The cursor never moves back.
    assert_eq!(engine.run(conn, 0, 1, 4).unwrap(), Vec::new());
    assert_eq!(RuleEngine::cursor(conn).unwrap(), through);
}

#[test]
fn a_rule_that_does_not_compile_is_refused_with_its_name_and_sqlites_message() {
    let (_dir, store) = store();
    let conn = store.connection();
    let cases = [
        ("typo", "SELEC id FROM new_events", "SELEC"),
        ("syntax", "SELECT id FROM new_events WHERE", "incomplete input"),
        ("syntax-mid", "SELECT id FROM new_events WHERE AND pid = 1", "syntax error"),
        ("column", "SELECT id FROM new_events WHERE colour = 'red'", "no such column: colour"),
        ("table", "SELECT id FROM processes", "no such table: processes"),
        ("empty", "  -- nothing\n", "nothing"),
        ("params", "SELECT id FROM new_events WHERE pid = ?1", "parameters"),
    ];
    for (name, sql, reason) in cases {
        let specs = [default_rules().remove(0), rule(name, sql)];
        let e = RuleEngine::compile(conn, &specs).unwrap_err();
        assert_eq!(e.name, name, "{e}");
        assert!(e.reason.contains(reason), "{name}: {e}");
        assert!(e.to_string().starts_with(&format!("rule {name}: ")), "{e}");
    }
    let dup = [rule("a", "SELECT id FROM new_events"), rule("a", "SELECT id FROM new_events")];
    assert_eq!(RuleEngine::compile(conn, &dup).unwrap_err().reason, "duplicate rule name");
    // A disabled rule is not checked.
    let off = RuleSpec { enabled: false, ..rule("off", "SELEC") };
    assert_eq!(RuleEngine::compile(conn, &[off]).unwrap().len(), 0);
}

#[test]
fn a_rule_that_writes_is_refused() {
    let (_dir, mut store) = store();
    store.insert_batch(&[event(1, 10, "x", "/tmp/x")]).unwrap();
    let conn = store.connection();
    for (name, sql) in [
        ("delete", "DELETE FROM process_events"),
        ("insert", "INSERT INTO alerts (rule) VALUES ('x') RETURNING id"),
        ("cte-delete", "WITH x AS (SELECT 1) DELETE FROM process_events RETURNING id"),
        ("two", "SELECT id FROM new_events; DELETE FROM process_events"),
        ("window", "UPDATE temp.rule_window SET lo = 0 RETURNING lo"),
        ("attach", "ATTACH DATABASE '/tmp/x.db' AS x"),
        ("pragma", "PRAGMA journal_mode = DELETE"),
        ("begin", "BEGIN"),
    ] {
        let e = RuleEngine::compile(conn, &[rule(name, sql)]).unwrap_err();
        assert_eq!(e.name, name, "{e}");
    }
    let e = RuleEngine::compile(conn, &[rule("delete", "DELETE FROM process_events")]).unwrap_err();
    assert!(e.reason.contains("read-only") || e.reason.contains("SELECT"), "{e}");
    let e = RuleEngine::compile(conn, &[rule("cte", "WITH x AS (SELECT 1) DELETE FROM process_events")])
        .unwrap_err();
    assert!(e.reason.contains("read-only"), "{e}");
    let e = RuleEngine::compile(conn, &[rule("two", "SELECT 1; DELETE FROM process_events")]).unwrap_err();
    assert!(e.reason.contains("one statement"), "{e}");
    let n: i64 = conn.query_row("SELECT count(*) FROM process_events", [], |r| r.get(0)).unwrap();
    assert_eq!(n, 1);
}

#[test]
fn a_rule_failing_at_run_time_does_not_stop_the_others() {
    let (_dir, mut store) = store();
    store.insert_batch(&[event(1, 10, "x", "/tmp/x")]).unwrap();
    let conn = store.connection_mut();
    let specs = [
        // Compiles, fails on the first row: a malformed JSON path.
        rule("broken", "SELECT id FROM new_events WHERE json_extract(argv, '$[') IS NULL"),
        // An id outside the batch is ignored.
        rule("older", "SELECT id FROM process_events WHERE id NOT IN (SELECT id FROM new_events)"),
        default_rules().remove(0),
    ];
    let mut engine = RuleEngine::compile(conn, &specs).unwrap();
    let alerts = engine.run(conn, 0, max_id(conn), 1).unwrap();
    assert_eq!(pairs(&alerts), vec![("exe-in-temp-dir".to_owned(), max_id(conn))]);
    assert_eq!(RuleEngine::cursor(conn).unwrap(), max_id(conn));
    let failures: Vec<u64> = engine.rules.iter().map(|r| r.failures).collect();
    assert_eq!(failures, [1, 0, 0]);
}

#[test]
fn a_rule_whose_first_column_is_not_the_event_id_is_refused() {
    let (_dir, store) = store();
    let conn = store.connection();
    for (name, sql, says) in [
        // The two a new user wrote: alerts on whichever events had
        // id == pid, and none at all.
        ("pid", "SELECT pid FROM new_events WHERE name = 'nc'", "new_events.pid"),
        ("name", "SELECT name FROM new_events WHERE name = 'nc'", "new_events.name"),
        ("watermark", "SELECT through FROM stream_watermarks", "stream_watermarks.through"),
        ("computed", "SELECT id + 0 FROM new_events", "computed"),
        ("constant", "SELECT 1", "computed"),
    ] {
        let e = RuleEngine::compile(conn, &[rule(name, sql)]).unwrap_err();
        assert!(e.reason.contains(says) && e.reason.contains("must be the event id"), "{name}: {e}");
        let verdict = validate(&[rule(name, sql)]).remove(0).1;
        assert!(verdict.is_err_and(|r| r.contains(says)), "validate {name}");
    }
    // The id through an alias, a join, a subquery and a CTE is the id.
    let ok = [
        rule("alias", "SELECT n.id AS event FROM new_events n"),
        rule("join", "SELECT n.id FROM new_events n JOIN process_events p ON p.pid = n.ppid"),
        rule("sub", "SELECT x.id FROM (SELECT id, name FROM new_events) x WHERE x.name = 'nc'"),
        rule("cte", "WITH x AS (SELECT id FROM new_events) SELECT id FROM x"),
    ];
    assert_eq!(RuleEngine::compile(conn, &ok).unwrap().len(), 4);
}

#[test]
fn validate_judges_each_rule_on_its_own() {
    let specs = [
        default_rules().remove(0),
        rule("bad", "SELECT id FROM new_events WHERE"),
        rule("writes", "DELETE FROM alerts"),
        RuleSpec { enabled: false, ..rule("off-but-bad", "SELECT nope FROM new_events") },
        rule("ok", "SELECT n.id FROM new_events n JOIN stream_watermarks w USING (collector_id)"),
        rule("ok", "SELECT 1"),
    ];
    let verdicts = validate(&specs);
    let names: Vec<&str> = verdicts.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["exe-in-temp-dir", "bad", "writes", "off-but-bad", "ok", "ok"]);
    assert_eq!(verdicts[0].1, Ok(()));
    assert!(verdicts[1].1.as_ref().unwrap_err().contains("incomplete input"), "{verdicts:?}");
    assert!(verdicts[2].1.is_err(), "{verdicts:?}");
    assert!(verdicts[3].1.as_ref().unwrap_err().contains("no such column"), "{verdicts:?}");
    assert_eq!(verdicts[4].1, Ok(()));
    assert_eq!(verdicts[5].1, Err("duplicate rule name".to_owned()));
    assert_eq!(RuleEngine::validate(&specs[..1]), vec![("exe-in-temp-dir".to_owned(), Ok(()))]);
}

/// Validation runs in memory: with `TMPDIR` naming a directory that
/// does not exist, or a read-only one (systemd's `ProtectSystem=strict`),
/// it still judges every rule, and creates nothing there. Runs this
/// test binary again as a child with that `TMPDIR` (the variable is
/// process-wide; the other tests' temporary directories need it).
#[test]
fn validation_needs_no_temporary_directory() {
    const CHILD: &str = "DAEMONEYE_TEST_VALIDATE_TMPDIR";
    const NAME: &str = "rules::tests::validation_needs_no_temporary_directory";
    if std::env::var_os(CHILD).is_some() {
        let mut specs = default_rules();
        specs.push(rule("typo", "SELECT id FROM no_such_table"));
        let verdicts = validate(&specs);
        assert_eq!(verdicts.len(), specs.len());
        for (name, verdict) in &verdicts[..specs.len() - 1] {
            assert_eq!(verdict, &Ok(()), "{name}");
        }
        let typo = verdicts[specs.len() - 1].1.as_ref().unwrap_err();
        assert!(typo.contains("no such table: no_such_table"), "{typo}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let read_only = dir.path().join("read-only");
    std::fs::create_dir(&read_only).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&read_only, std::fs::Permissions::from_mode(0o555)).unwrap();
    }
    for tmp in [dir.path().join("missing"), read_only.clone()] {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", NAME, "--nocapture", "--test-threads=1"])
            .env(CHILD, "1")
            .env("TMPDIR", &tmp)
            .output()
            .unwrap();
        let said = format!(
            "TMPDIR={}\n--- stdout\n{}--- stderr\n{}",
            tmp.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{said}");
        assert!(String::from_utf8_lossy(&out.stdout).contains("1 passed"), "{said}");
    }
    // Nothing was created there (root can write a 0555 directory).
    assert_eq!(std::fs::read_dir(&read_only).unwrap().count(), 0);
    assert!(!dir.path().join("missing").exists());
}

/// Never ends: an unbounded recursive CTE joined to the batch.
const ENDLESS: &str = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) \
                       SELECT n.id FROM new_events n, c WHERE c.x < 0";

/// Runs `(after, through]`, returning the alerts' (rule, seq) pairs and
/// how long it took.
fn timed_run(
    engine: &mut RuleEngine,
    conn: &mut Connection,
    after: i64,
    through: i64,
) -> (Vec<Alert>, Duration) {
    let started = Instant::now();
    let alerts = engine.run(conn, after, through, 7).unwrap();
    (alerts, started.elapsed())
}

#[test]
fn an_endless_rule_is_stopped_within_its_budget_and_disabled_after_three_batches() {
    let (_dir, mut store) = store();
    let budget = Duration::from_millis(100);
    let specs = [rule("endless", ENDLESS), default_rules().remove(0)];
    let mut engine = RuleEngine::compile(store.connection(), &specs).unwrap().with_budget(budget);
    assert_eq!(engine.budget(), budget);
    let mut after = 0;
    for batch in 1..=4u64 {
        store.insert_batch(&[event(batch, 10 + batch as u32, "x", "/tmp/x")]).unwrap();
        let conn = store.connection_mut();
        let through = max_id(conn);
        let (alerts, took) = timed_run(&mut engine, conn, after, through);
        // The other rule ran after the interrupted one, in the same
        // transaction, and the window is done (cursor moved).
        assert_eq!(pairs(&alerts), vec![("exe-in-temp-dir".to_owned(), through)], "batch {batch}");
        assert_eq!(RuleEngine::cursor(conn).unwrap(), through);
        assert_eq!(alert_rows(conn), i64::try_from(batch).unwrap());
        assert!(conn.is_autocommit(), "batch {batch}: the transaction is over");
        if batch <= 3 {
            // Stopped at its budget (checked every PROGRESS_STEPS
            // steps), not at the end of time.
            assert!(took >= budget, "batch {batch}: {took:?}");
            assert!(took < budget + Duration::from_secs(2), "batch {batch}: {took:?}");
            assert_eq!(engine.rules[0].overruns, u32::try_from(batch).unwrap());
        } else {
            // Disabled: not run at all.
            assert!(took < budget, "batch {batch}: {took:?}");
        }
        let expected: Vec<&str> = if batch >= 3 { vec!["endless"] } else { vec![] };
        assert_eq!(engine.disabled_rules(), expected, "batch {batch}");
        after = through;
    }
    // The progress handler is gone: a long query outside a run is not
    // interrupted.
    let n: i64 = store
        .connection()
        .query_row(
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 300000) \
             SELECT count(*) FROM c",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(n, 300_000);
}

#[test]
fn only_consecutive_overruns_disable_a_rule() {
    let (_dir, mut store) = store();
    // Slow (a billion steps) only over a batch holding a process named
    // `slow`.
    let slow = rule(
        "slow-sometimes",
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c \
         WHERE x < (SELECT count(*) FROM new_events WHERE name = 'slow') * 1000000000) \
         SELECT id FROM new_events WHERE (SELECT max(x) FROM c) > 0",
    );
    let mut engine =
        RuleEngine::compile(store.connection(), &[slow]).unwrap().with_budget(Duration::from_millis(50));
    let mut after = 0;
    for (batch, name) in ["slow", "slow", "fast", "slow", "slow", "fast", "slow", "slow", "slow", "fast"]
        .into_iter()
        .enumerate()
    {
        let seq = batch as u64 + 1;
        store.insert_batch(&[event(seq, 10 + seq as u32, name, "/usr/bin/x")]).unwrap();
        let conn = store.connection_mut();
        let through = max_id(conn);
        let (alerts, _) = timed_run(&mut engine, conn, after, through);
        after = through;
        // A fast batch raises its alert (while the rule is enabled).
        let expect_alert = name == "fast" && batch < 9;
        assert_eq!(alerts.len(), usize::from(expect_alert), "batch {batch}");
        let disabled = batch >= 8;
        assert_eq!(engine.disabled_rules().len(), usize::from(disabled), "batch {batch}");
    }
}

#[test]
fn validate_refuses_a_rule_that_does_not_end_over_an_empty_store() {
    let started = Instant::now();
    let endless = rule(
        "endless",
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) \
         SELECT id FROM new_events WHERE id IN (SELECT x FROM c WHERE x < 0)",
    );
    let verdicts = validate(&[endless, default_rules().remove(0)]);
    let reason = verdicts[0].1.as_ref().unwrap_err();
    assert!(reason.contains("time budget of 1000 ms"), "{reason}");
    assert_eq!(verdicts[1].1, Ok(()));
    assert!(started.elapsed() < DEFAULT_BUDGET + Duration::from_secs(3), "{:?}", started.elapsed());
    // Joined to the (empty) batch: SQLite still computes the CTE.
    let reason = validate(&[rule("endless", ENDLESS)]).remove(0).1.unwrap_err();
    assert!(reason.contains("time budget"), "{reason}");
}

#[test]
fn the_cursor_of_a_database_without_alert_tables_is_zero() {
    let (_dir, store) = store();
    assert_eq!(RuleEngine::cursor(store.connection()).unwrap(), 0);
    RuleEngine::compile(store.connection(), &[]).unwrap();
    assert_eq!(RuleEngine::cursor(store.connection()).unwrap(), 0);
}
