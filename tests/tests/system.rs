//! The whole system, as an operator runs it: `daemoneye-agent` with real
//! procmond children on a real broker socket in a temp dir, killed and
//! restarted at the worst moments, checked through the store, the agent's
//! status on the bus, its log and `daemoneye-cli`.

use std::process::{Command, Stdio};
use std::time::Duration;

use daemoneye_agent::api::{AgentState, CollectorPhase};
use daemoneye_tests::{
    CYCLE, CollectorDef, System, alive, assert_exactly_once, bin, copy_executable, signal, store_summary,
    wait_until, which, write_collector_script,
};
use nix::sys::signal::Signal;

#[test]
fn two_collectors_register_before_begin_monitoring_and_both_store_events() {
    // pm-b registers two seconds late: the agent must wait for it.
    let tmp = tempfile::tempdir().expect("tempdir");
    let slow = tmp.path().join("slow-procmond");
    write_collector_script(&slow, &format!("sleep 2\nexec {} \"$@\"", bin("procmond").display()));
    let mut sys =
        System::start(&[CollectorDef::procmond("pm-a"), CollectorDef::with_binary("pm-b", slow)], "");
    let loading = sys.wait_status(Duration::from_secs(20), "pm-a registered", |s| {
        s.collectors.iter().any(|c| c.id == "pm-a" && c.registered)
    });
    if !loading.collectors.iter().all(|c| c.registered) {
        assert_eq!(loading.state, AgentState::Loading, "no BeginMonitoring before pm-b registers");
    }
    let steady =
        sys.wait_status(Duration::from_secs(20), "SteadyState", |s| s.state == AgentState::SteadyState);
    assert!(
        steady.collectors.iter().all(|c| c.registered && c.phase == CollectorPhase::Running),
        "{steady:#?}"
    );
    let log = sys.log();
    let sent = log.find("BeginMonitoring sent").expect("BeginMonitoring logged");
    for id in ["pm-a", "pm-b"] {
        let reg = log.find(&format!("collector {id} registered")).expect("registration logged");
        assert!(reg < sent, "{id} registered after BeginMonitoring was sent\n{}", sys.tail());
    }
    assert_exactly_once(&sys, &["pm-a", "pm-b"]);
    let status = sys.wait_status(CYCLE, "heartbeats and stored counts", |s| {
        s.collectors.iter().all(|c| c.heartbeat.is_some() && c.events_stored > 0)
    });
    assert!(status.store.events_committed > 0, "{status:#?}");
    assert_eq!(sys.stop(Duration::from_secs(30)).code(), Some(0));
}

#[test]
fn a_sigkilled_collector_is_restarted_and_every_event_is_stored_once() {
    let mut sys = System::start(&[CollectorDef::procmond("pm-k")], "");
    let first =
        sys.wait_status(Duration::from_secs(20), "SteadyState", |s| s.state == AgentState::SteadyState);
    let pid = first.collectors[0].pid.expect("collector pid");
    // Let it commit its snapshot, then spawn processes and kill it while
    // they come and go.
    assert_exactly_once(&sys, &["pm-k"]);
    let mut churn: Vec<std::process::Child> =
        (0..5).map(|_| Command::new("sleep").arg("7").stdin(Stdio::null()).spawn().expect("sleep")).collect();
    signal(pid, Signal::SIGKILL);
    let restarted = sys.wait_status(Duration::from_secs(30), "restarted and registered", |s| {
        let c = &s.collectors[0];
        c.restarts >= 1 && c.registered && c.pid.is_some_and(|p| p != pid)
    });
    assert!(
        restarted.collectors[0].last_exit.as_deref().is_some_and(|e| e.contains("SIGKILL")),
        "{restarted:#?}"
    );
    // The new process collects a cycle with the churn still visible.
    let before = store_summary(&sys.database()).first().map_or(0, |s| s.1);
    assert!(
        wait_until(CYCLE, || store_summary(&sys.database()).first().is_some_and(|s| s.1 > before)),
        "no events after the restart\n{}",
        sys.tail()
    );
    for c in &mut churn {
        let _ = c.kill();
        let _ = c.wait();
    }
    assert_exactly_once(&sys, &["pm-k"]);
    assert_eq!(sys.stop(Duration::from_secs(30)).code(), Some(0));
}

#[test]
fn a_hung_collector_is_escalated_killed_and_restarted() {
    let mut sys = System::start(&[CollectorDef::procmond("pm-h")], "");
    let first =
        sys.wait_status(Duration::from_secs(20), "SteadyState", |s| s.state == AgentState::SteadyState);
    let pid = first.collectors[0].pid.expect("collector pid");
    // Stopped, it misses heartbeats and answers no RPC.
    signal(pid, Signal::SIGSTOP);
    let degraded = sys.wait_status(Duration::from_secs(10), "degraded", |s| {
        s.collectors[0].phase == CollectorPhase::Degraded || s.collectors[0].missed_heartbeats >= 1
    });
    assert!(degraded.collectors[0].missed_heartbeats >= 1, "{degraded:#?}");
    let back = sys.wait_status(Duration::from_secs(40), "escalated and restarted", |s| {
        let c = &s.collectors[0];
        c.restarts >= 1 && c.registered && c.pid.is_some_and(|p| p != pid)
    });
    let steps: Vec<&str> = back.collectors[0].escalation.iter().map(|s| s.step.as_str()).collect();
    for step in ["health_check", "graceful_shutdown", "kill", "exited", "restart"] {
        assert!(steps.contains(&step), "escalation step {step} missing: {steps:?}\n{}", sys.tail());
    }
    assert!(!alive(pid), "the hung process was killed");
    let log = sys.log();
    assert!(log.contains("3 heartbeats missed; failed, escalating"), "{}", sys.tail());
    assert!(log.contains("SIGKILL sent to pid"), "{}", sys.tail());
    assert_exactly_once(&sys, &["pm-h"]);
    assert_eq!(sys.stop(Duration::from_secs(30)).code(), Some(0));
}

#[test]
fn a_sigkilled_agent_is_restarted_and_the_collectors_reconnect_and_replay() {
    let mut sys = System::start(&[CollectorDef::procmond("pm-r")], "");
    let first =
        sys.wait_status(Duration::from_secs(20), "SteadyState", |s| s.state == AgentState::SteadyState);
    let pid = first.collectors[0].pid.expect("collector pid");
    assert_exactly_once(&sys, &["pm-r"]);
    sys.kill_agent();
    // The collector lives on, collecting into its WAL while nobody listens.
    let churn = Command::new("sleep").arg("20").stdin(Stdio::null()).spawn().expect("sleep");
    let churn_pid = churn.id();
    assert!(alive(pid), "the collector outlives the agent");
    sys.start_agent();
    let back = sys.wait_status(Duration::from_secs(30), "adopted and registered", |s| {
        s.state == AgentState::SteadyState && s.collectors[0].registered
    });
    assert_eq!(back.collectors[0].pid, Some(pid), "the running collector is adopted, not spawned twice");
    assert!(back.collectors[0].adopted, "{back:#?}");
    // The process started while the agent was down arrives.
    let db = sys.database();
    let seen = wait_until(CYCLE, || {
        rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .and_then(|c| {
                c.query_row(
                    "SELECT count(*) FROM process_events WHERE pid = ?1 AND kind = 'started'",
                    [churn_pid],
                    |r| r.get::<_, i64>(0),
                )
            })
            .is_ok_and(|n| n == 1)
    });
    let mut churn = churn;
    let _ = churn.kill();
    let _ = churn.wait();
    assert!(seen, "the process started while the agent was down is stored once\n{}", sys.tail());
    assert_exactly_once(&sys, &["pm-r"]);
    // The adopted collector is stopped with the agent.
    assert_eq!(sys.stop(Duration::from_secs(30)).code(), Some(0));
    assert!(wait_until(Duration::from_secs(10), || !alive(pid)), "the adopted collector stopped");
}

#[test]
fn a_rule_fires_on_a_matching_process_and_the_cli_lists_the_alert() {
    let rule = "rules:\n  - name: e2e-probe-started\n    severity: high\n    description: the test's probe ran\n    \
                sql: \"SELECT id FROM new_events WHERE kind = 'started' AND name = 'de-probe'\"\n";
    let mut sys = System::start(&[CollectorDef::procmond("pm-alert")], rule);
    sys.wait_status(Duration::from_secs(20), "SteadyState", |s| s.state == AgentState::SteadyState);
    let probe = sys.dir.path().join("de-probe");
    copy_executable(&which("sleep"), &probe);
    let mut child = Command::new(&probe).arg("30").stdin(Stdio::null()).spawn().expect("probe");
    let probe_pid = child.id();
    let mut alerts = Vec::new();
    let found = wait_until(CYCLE, || {
        let out = sys.cli(&["alerts", "--json"]);
        alerts = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .collect();
        alerts.iter().any(|a| a["rule"] == "e2e-probe-started" && a["pid"] == probe_pid)
    });
    let _ = child.kill();
    let _ = child.wait();
    assert!(found, "alert for pid {probe_pid} in `daemoneye-cli alerts --json`: {alerts:?}\n{}", sys.tail());
    let a = alerts.iter().find(|a| a["rule"] == "e2e-probe-started").expect("alert");
    assert_eq!(a["severity"], "high");
    assert_eq!(a["collector_id"], "pm-alert");
    assert!(sys.log().contains("alert high e2e-probe-started"), "the alert is logged");
    let status = sys.status().expect("status");
    assert!(status.store.alerts_raised >= 1, "{status:#?}");
    assert_eq!(sys.stop(Duration::from_secs(30)).code(), Some(0));
}

#[test]
fn sigterm_stops_every_collector_exits_zero_and_leaves_nothing_behind() {
    let mut sys = System::start(&[CollectorDef::procmond("pm-t1"), CollectorDef::procmond("pm-t2")], "");
    let s = sys.wait_status(Duration::from_secs(20), "SteadyState", |s| s.state == AgentState::SteadyState);
    let pids: Vec<u32> = s.collectors.iter().filter_map(|c| c.pid).collect();
    assert_eq!(pids.len(), 2);
    assert_exactly_once(&sys, &["pm-t1", "pm-t2"]);
    let code = sys.stop(Duration::from_secs(30));
    assert_eq!(code.code(), Some(0), "{}", sys.tail());
    for pid in pids {
        assert!(!alive(pid), "collector pid {pid} left behind");
    }
    let log = sys.log();
    assert!(log.contains("collector pm-t1: shut down gracefully"), "{}", sys.tail());
    assert!(log.contains("collector pm-t2 deregistered"), "{}", sys.tail());
    assert!(!sys.socket().exists(), "the broker removed its socket");
    // Everything the collectors sent was acknowledged before they left.
    assert_exactly_once(&sys, &["pm-t1", "pm-t2"]);
    // And the CLI now says so, clearly.
    let out = sys.cli(&["status"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("agent not running at") && err.contains("broker.sock"), "{err}");
}

#[test]
fn bad_configurations_are_refused_with_the_field_named() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let procmond = bin("procmond");
    let plain = tmp.path().join("plain");
    std::fs::write(&plain, "not a program").expect("write");
    let p = procmond.display();
    let cases: Vec<(String, &str)> = vec![
        (
            format!("collectors:\n  - {{id: a, binary: {p}}}\n  - {{id: a, binary: {p}}}\n"),
            "collectors[1].id",
        ),
        ("collectors:\n  - {id: a, binary: /nonexistent/procmond}\n".into(), "collectors[0].binary"),
        (format!("collectors:\n  - {{id: a, binary: {}}}\n", plain.display()), "collectors[0].binary"),
        (
            format!("collectors:\n  - {{id: a, binary: {p}, startup_timeout_secs: 0}}\n"),
            "startup_timeout_secs",
        ),
        (
            format!("collectors:\n  - {{id: a, binary: {p}, heartbeat_interval_secs: 0}}\n"),
            "heartbeat_interval_secs",
        ),
        (format!("collectors:\n  - {{id: a, binary: {p}, colour: red}}\n"), "colour"),
        (format!("collectors:\n  - {{id: a, type: network-monitor, binary: {p}}}\n"), "collectors[0].type"),
        // procmond itself refuses these (`--check-args`), in its words.
        (
            format!("collectors:\n  - {{id: a, binary: {p}, args: [--interval, \"1\"]}}\n"),
            "collectors[0].args: ",
        ),
        ("colour: red\n".into(), "colour"),
        (format!("collectors:\n  - {{id: a, binary: {p}, args: [--data-dir, /x]}}\n"), "collectors[0].args"),
        ("escalation: {kill_timeout_secs: 0}\n".into(), "escalation.kill_timeout_secs"),
        ("rules:\n  - {name: broken, severity: high, sql: 'SELEKT id FROM new_events'}\n".into(), "broken"),
        ("rules:\n  - {name: writes, severity: high, sql: 'DELETE FROM process_events'}\n".into(), "writes"),
    ];
    for (i, (yaml, field)) in cases.iter().enumerate() {
        let path = tmp.path().join(format!("bad-{i}.yaml"));
        let full = format!("data_dir: {}\n{yaml}", tmp.path().join(format!("data-{i}")).display());
        std::fs::write(&path, full).expect("write");
        let out = Command::new(bin("daemoneye-agent")).arg("--config").arg(&path).output().expect("agent");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "case {i} ({yaml}): {err}");
        assert!(
            err.contains(field) && err.contains("invalid configuration"),
            "case {i}: {field} not in: {err}"
        );
        assert!(err.contains(&path.display().to_string()), "case {i}: the file is named: {err}");
        assert!(!tmp.path().join(format!("data-{i}")).join("run").exists(), "case {i}: nothing was started");
    }
}

#[test]
fn the_packaged_configuration_checks_as_readme_says_from_a_checkout() {
    // The sample names `procmond` beside the agent, as built here.
    let sample = concat!(env!("CARGO_MANIFEST_DIR"), "/../packaging/agent.yaml");
    // Its data_dir is the default: a temp dir instead, so nothing outside
    // it is touched.
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().to_str().expect("utf-8");
    for args in [vec!["--check-config", sample], vec!["--config", sample, "--check-config"]] {
        let out = Command::new(bin("daemoneye-agent"))
            .args(&args)
            .args(["--data-dir", data])
            .output()
            .expect("agent");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {stdout}{}", String::from_utf8_lossy(&out.stderr));
        assert!(
            stdout.contains("configuration ok") && stdout.contains("rule netcat-started: ok"),
            "{stdout}"
        );
    }
    // An empty file is valid, and said to do nothing.
    let empty = tmp.path().join("empty.yaml");
    std::fs::write(&empty, "").expect("write");
    let out = Command::new(bin("daemoneye-agent"))
        .arg("--check-config")
        .arg(&empty)
        .args(["--data-dir", data])
        .output()
        .expect("agent");
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("enables no collector"), "{out:?}");
    // Two different files is a usage error.
    let out = Command::new(bin("daemoneye-agent"))
        .args(["--config", "/nonexistent.yaml", "--check-config", sample])
        .output()
        .expect("agent");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("name two files"));
}

#[test]
fn a_collector_that_never_registers_fails_the_startup_and_is_stopped() {
    // A "collector" that runs but never speaks on the bus.
    let tmp = tempfile::tempdir().expect("tempdir");
    let mute = tmp.path().join("mute-collector");
    write_collector_script(&mute, "exec sleep 120");
    let mut sys = System::start(
        &[CollectorDef { startup_timeout_secs: 3, ..CollectorDef::with_binary("mute", mute) }],
        "",
    );
    // The agent gives up after its startup timeout, stops it (SIGTERM:
    // it never registered, so no RPC reaches it) and exits 1.
    let mut child = sys.agent.take().expect("agent");
    let mut status = None;
    wait_until(Duration::from_secs(60), || {
        status = child.try_wait().ok().flatten();
        status.is_some()
    });
    let log = sys.log();
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{}", sys.tail());
    assert!(log.contains("-> StartupFailed: collector(s) mute (3 s) did not register"), "{}", sys.tail());
    let pid: u32 = log
        .split("collector mute: started ")
        .nth(1)
        .and_then(|rest| rest.split("as pid ").nth(1))
        .and_then(|p| p.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|p| p.parse().ok())
        .expect("the collector's pid in the log");
    assert!(!alive(pid), "the mute collector was stopped");
    assert!(log.contains("collector mute: signal 15 (SIGTERM)"), "stopped by SIGTERM\n{}", sys.tail());
    assert!(!sys.socket().exists(), "the broker is gone");
}

#[test]
fn a_dead_thread_stops_the_agent_with_a_failure_naming_it() {
    // The test hook panics the store writer after its first commit, the
    // signal thread as it starts.
    for thread in ["agent-store", "agent-signals"] {
        let mut sys = System::create(&[CollectorDef::procmond("pm-panic")], "");
        let mut agent = Command::new(bin("daemoneye-agent"));
        agent.arg("--config").arg(sys.dir.path().join("agent.yaml")).env("DAEMONEYE_TEST_PANIC", thread);
        sys.spawn_agent(agent);
        let mut child = sys.agent.take().expect("agent");
        let mut status = None;
        assert!(
            wait_until(Duration::from_secs(30), || {
                status = child.try_wait().ok().flatten();
                status.is_some()
            }),
            "the agent kept running with a dead {thread}\n{}",
            sys.tail()
        );
        assert_eq!(status.and_then(|s| s.code()), Some(1), "{thread}: {}", sys.tail());
        let log = sys.log();
        assert!(log.contains(&format!("DAEMONEYE_TEST_PANIC={thread}")), "{}", sys.tail());
        assert!(log.contains(&format!("thread {thread} ended unexpectedly")), "{}", sys.tail());
        // It stopped its collector on the way out.
        for pid in sys.collector_pids() {
            assert!(!alive(pid), "collector {pid} outlived the agent\n{}", sys.tail());
        }
    }
}

#[test]
fn a_walk_cut_by_max_processes_shows_in_the_status_and_raises_an_alert() {
    // Far fewer than any machine runs (this test alone runs more).
    let mut sys =
        System::start(&[CollectorDef::procmond("pm-cap").args(&["--max-processes", "3"]).heartbeat(1)], "");
    let status = sys.wait_status(Duration::from_secs(30), "a Degraded heartbeat", |s| {
        s.collectors.iter().any(|c| c.heartbeat.as_ref().is_some_and(|h| h.status == "degraded"))
    });
    let hb = status.collectors[0].heartbeat.clone().expect("heartbeat");
    assert!(hb.errors > 0, "a cut walk counts as an error: {hb:?}");
    let db = sys.database();
    let alerts = || -> Vec<String> {
        let Ok(conn) = rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        else {
            return Vec::new();
        };
        let Ok(mut stmt) = conn.prepare(
            "SELECT description FROM alerts WHERE rule = 'collector_degraded' AND collector_id = 'pm-cap'",
        ) else {
            return Vec::new();
        };
        stmt.query_map([], |r| r.get(0)).map(|it| it.filter_map(Result::ok).collect()).unwrap_or_default()
    };
    assert!(wait_until(Duration::from_secs(30), || !alerts().is_empty()), "no alert\n{}", sys.tail());
    // Once, although every heartbeat since says Degraded.
    std::thread::sleep(Duration::from_secs(3));
    let raised = alerts();
    assert_eq!(raised.len(), 1, "{raised:?}");
    assert!(raised[0].contains("--max-processes"), "{}", raised[0]);
    assert!(sys.log().contains("walk truncated"), "{}", sys.tail());
    assert_eq!(sys.stop(Duration::from_secs(30)).code(), Some(0), "{}", sys.tail());
}

#[test]
fn a_checkout_built_under_tmp_does_not_alert_on_itself() {
    // The quick start from a checkout in /tmp: the agent, procmond and the
    // CLI all run from a temporary directory.
    let bins = tempfile::Builder::new().prefix("daemoneye-checkout").tempdir_in("/tmp").expect("tempdir");
    for name in ["daemoneye-agent", "procmond", "daemoneye-cli"] {
        copy_executable(&bin(name), &bins.path().join(name));
    }
    // The control: another program from the same directory is alerted on.
    let other = bins.path().join("other-program");
    copy_executable(&which("sleep"), &other);
    let mut sys = System::create(&[CollectorDef::with_binary("pm-q", bins.path().join("procmond"))], "");
    let mut agent = Command::new(bins.path().join("daemoneye-agent"));
    agent.arg("--config").arg(sys.dir.path().join("agent.yaml"));
    sys.spawn_agent(agent);
    sys.wait_status(Duration::from_secs(20), "SteadyState", |s| s.state == AgentState::SteadyState);
    let mut cli = Command::new(bins.path().join("daemoneye-cli"))
        .arg("--config")
        .arg(sys.dir.path().join("agent.yaml"))
        .args(["events", "--follow"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("cli");
    let mut control = Command::new(&other).arg("30").spawn().expect("control");
    let canonical = std::fs::canonicalize(bins.path()).expect("canonical");
    let exe = |name: &str| canonical.join(name).display().to_string();
    let db = sys.database();
    let query = |sql: &str, exe: &str| -> i64 {
        rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .and_then(|c| c.query_row(sql, [exe], |r| r.get(0)))
            .unwrap_or(0)
    };
    let alerted = wait_until(2 * CYCLE, || {
        query(
            "SELECT count(*) FROM alerts WHERE rule = 'exe-in-temp-dir' AND exe = ?1",
            &exe("other-program"),
        ) > 0
            && ["daemoneye-agent", "procmond", "daemoneye-cli"].iter().all(|name| {
                query("SELECT count(*) FROM process_events WHERE kind = 'started' AND exe = ?1", &exe(name))
                    > 0
            })
    });
    let _ = cli.kill();
    let _ = cli.wait();
    let _ = control.kill();
    let _ = control.wait();
    assert!(alerted, "the control is alerted on, and our three programs were seen\n{}", sys.tail());
    // Let the batch with our own programs' events go through the rules.
    assert_eq!(sys.stop(Duration::from_secs(30)).code(), Some(0));
    let ours: i64 = rusqlite::Connection::open(&db)
        .and_then(|c| {
            c.query_row(
                "SELECT count(*) FROM alerts WHERE exe GLOB ?1 || '/*' AND exe != ?2",
                [canonical.display().to_string(), exe("other-program")],
                |r| r.get(0),
            )
        })
        .expect("alerts");
    assert_eq!(ours, 0, "no alert about DaemonEye's own programs\n{}", sys.tail());
}
