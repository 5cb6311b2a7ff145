//! The kernel event source, end to end: the agent's collector walks the
//! process table every 30 s, yet a process that lives five milliseconds
//! is recorded (the kernel's process events report its start and its
//! exit as they happen), stored with its source and exit code, and raises
//! the built-in `exe-in-temp-dir` alert. CI runs as root on a kernel with
//! the proc connector, so a collector that falls back to polling fails
//! this test with its reason.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use daemoneye_agent::api::AgentState;
use daemoneye_tests::{CollectorDef, System, copy_executable, store_summary, wait_until, which};

/// How long the probe's events and alert may take to reach the store: far
/// less than the 30 s walk, with room for a loaded 2-core machine. The
/// walk cannot help: the probe is gone long before any walk.
const DELIVERY: Duration = Duration::from_secs(15);

/// One stored event of the probe: kind, source, exe, exit code, exit
/// signal, changes.
type Row = (String, String, Option<String>, Option<i64>, Option<i64>, String);

/// The probe's rows stored after row `after`, oldest first.
fn rows_of(db: &Path, pid: u32, after: i64) -> Vec<Row> {
    let Ok(conn) = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
    else {
        return Vec::new();
    };
    let Ok(mut stmt) = conn.prepare(
        "SELECT kind, source, exe, exit_code, exit_signal, changes FROM process_events \
         WHERE pid = ?1 AND id > ?2 ORDER BY id",
    ) else {
        return Vec::new();
    };
    stmt.query_map(rusqlite::params![pid, after], |r| {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?))
    })
    .map(|it| it.filter_map(Result::ok).collect())
    .unwrap_or_default()
}

/// The highest row id in the store (0 when empty or unreadable).
fn max_id(db: &Path) -> i64 {
    rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .and_then(|c| c.query_row("SELECT coalesce(max(id), 0) FROM process_events", [], |r| r.get(0)))
        .unwrap_or(0)
}

/// The JSON lines a CLI command printed.
fn json_lines(stdout: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(stdout).lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

#[test]
fn a_process_that_lives_milliseconds_is_stored_from_the_kernel_source_and_raises_an_alert() {
    // The agent's default collector: one procmond walking every 30 s with
    // the default event source (auto).
    let mut sys = System::start(
        &[CollectorDef::procmond("procmond").args(&["--interval", "30", "--log-level", "debug"])],
        "",
    );
    sys.wait_status(Duration::from_secs(30), "SteadyState", |s| s.state == AgentState::SteadyState);

    // Its event source as `daemoneye-cli status --json` reports it, once a
    // heartbeat carries it (kernel, or poll with the fallback's reason).
    let mut status = serde_json::Value::Null;
    let known = wait_until(Duration::from_secs(20), || {
        status = json_lines(&sys.cli(&["status", "--json"]).stdout).pop().unwrap_or_default();
        let es = &status["collectors"][0]["heartbeat"]["event_source"];
        es["source"] == "Kernel" || es["fallback_reason"].is_string()
    });
    let es = &status["collectors"][0]["heartbeat"]["event_source"];
    assert!(
        known && es["source"] == "Kernel",
        "the collector does not use the kernel event source: source {}, fallback reason {}\n\
         status: {status}\n--- log ---\n{}",
        es["source"],
        es["fallback_reason"],
        sys.tail()
    );
    let text = String::from_utf8_lossy(&sys.cli(&["status"]).stdout).into_owned();
    assert!(text.contains("\nprocmond events: kernel, "), "{text}");

    // The first walk's snapshot is stored: the collector is past its start.
    let db = sys.database();
    assert!(
        wait_until(Duration::from_secs(30), || store_summary(&db).iter().any(|(_, n, _)| *n > 0)),
        "no snapshot stored\n{}",
        sys.tail()
    );
    let before = max_id(&db);

    // The probe: sleep, copied to a directory of its own under /tmp (the
    // rule's directories), living about 5 ms.
    let tmp = tempfile::Builder::new().prefix("de-kernel-").tempdir_in("/tmp").expect("tempdir in /tmp");
    let probe = tmp.path().join("de-blink");
    copy_executable(&which("sleep"), &probe);
    let mut child = Command::new(&probe).arg("0.005").stdin(Stdio::null()).spawn().expect("probe starts");
    let pid = child.id();
    let exit = child.wait().expect("probe exits");
    assert!(exit.success(), "{} 0.005: {exit}", probe.display());
    let probe_exe = probe.to_string_lossy().into_owned();

    let mut alerts = Vec::new();
    let mut rows = Vec::new();
    let delivered = wait_until(DELIVERY, || {
        alerts = json_lines(&sys.cli(&["alerts", "--json", "--rule", "exe-in-temp-dir"]).stdout);
        rows = rows_of(&db, pid, before);
        alerts.iter().any(|a| a["pid"] == pid) && rows.iter().any(|r| r.0 == "stopped")
    });
    assert!(
        delivered,
        "within {DELIVERY:?}: exe-in-temp-dir alerts {alerts:?}; stored events of pid {pid}: {rows:?}\n\
         --- log ---\n{}",
        sys.tail()
    );
    let alert = alerts.iter().find(|a| a["pid"] == pid).expect("alert");
    assert_eq!(alert["exe"].as_str(), Some(probe_exe.as_str()), "{alert}");
    assert_eq!(alert["collector_id"], "procmond", "{alert}");

    // Stored once each, from the kernel: its start (with the exec, or the
    // fork and then the exec when the exec came after the fork window)
    // and its exit with code 0.
    assert!(rows.iter().all(|r| r.1 == "kernel"), "{rows:?}");
    let kinds: Vec<&str> = rows.iter().map(|r| r.0.as_str()).filter(|k| *k != "modified").collect();
    assert_eq!(kinds, ["started", "stopped"], "{rows:?}");
    assert!(
        rows.iter().any(|r| r.2.as_deref() == Some(probe_exe.as_str())
            && (r.0 == "started" || r.5.split(',').any(|c| c == "exec"))),
        "no start or exec of {probe_exe}: {rows:?}"
    );
    let stopped = rows.iter().find(|r| r.0 == "stopped").expect("stopped");
    assert_eq!((stopped.3, stopped.4), (Some(0), None), "{rows:?}");

    // `daemoneye-cli events` shows where they came from and the exit.
    let out = sys.cli(&["events", "--pid", &pid.to_string()]);
    let lines = String::from_utf8_lossy(&out.stdout).into_owned();
    let stop_line = lines.lines().find(|l| l.contains(" stopped ")).unwrap_or_default();
    assert!(stop_line.contains(" exit=0 ") && stop_line.contains(" source=kernel "), "{lines}");

    assert_eq!(sys.stop(Duration::from_secs(30)).code(), Some(0));
}
