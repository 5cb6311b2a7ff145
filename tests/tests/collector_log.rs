//! What the agent says about its collectors: their arguments are checked
//! by the collector itself before anything starts, a collector that dies
//! is named with its exit status and its last words, and its log is its
//! own file, which outlives the agent.
#![forbid(unsafe_code)]

use std::process::Command;
use std::time::Duration;

use daemoneye_agent::api::AgentState;
use daemoneye_tests::{
    CollectorDef, System, agent_yaml, alive, bin, wait_until, write_collector_script, write_script,
};

#[test]
fn check_config_asks_each_collector_about_its_arguments() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let check = |name: &str, collectors: &[CollectorDef]| {
        let path = tmp.path().join(name);
        std::fs::write(&path, agent_yaml(&data, collectors, "")).expect("write");
        let out =
            Command::new(bin("daemoneye-agent")).arg("--check-config").arg(&path).output().expect("agent");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        (out.status.code(), stdout, stderr)
    };

    // The case: a 1 s interval, which procmond refuses at start.
    let (code, stdout, stderr) =
        check("bad.yaml", &[CollectorDef::procmond("pm-bad").args(&["--interval", "1"])]);
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    assert!(
        stdout.contains("collector pm-bad: ERROR: ")
            && stdout.contains("invalid value '1' for '--interval")
            && stdout.contains("1 is out of range 5..=3600")
            && stdout.contains("configuration INVALID"),
        "procmond's own words: {stdout}"
    );
    // Started for real, the agent refuses it, naming the field.
    let out = Command::new(bin("daemoneye-agent"))
        .arg("--config")
        .arg(tmp.path().join("bad.yaml"))
        .output()
        .expect("agent");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("bad.yaml: collectors[0].args: ") && stderr.contains("1 is out of range"),
        "{stderr}"
    );
    assert!(!data.exists(), "a check creates nothing");

    // A good one is ok; a collector of an earlier release, which does not
    // know --check-args, is said not to be checked, and does not fail it.
    let legacy = tmp.path().join("legacy-collector");
    write_script(
        &legacy,
        &format!(
            "case \" $* \" in *\" --check-args \"*) echo \"error: unexpected argument '--check-args' found\" >&2; \
             exit 2;; esac\nexec {} \"$@\"",
            bin("procmond").display()
        ),
    );
    let (code, stdout, stderr) =
        check("good.yaml", &[CollectorDef::procmond("pm-ok"), CollectorDef::with_binary("legacy", legacy)]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("collector pm-ok: ok"), "{stdout}");
    assert!(
        stdout.contains("collector legacy: not checked: ") && stdout.contains("does not know --check-args"),
        "{stdout}"
    );

    // One that never answers is refused after the check's timeout, with
    // whatever it started (its own process group).
    let mute = tmp.path().join("mute");
    write_script(&mute, "sleep 600 &\nexec sleep 600");
    let (code, stdout, stderr) = check("mute.yaml", &[CollectorDef::with_binary("mute", mute)]);
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    assert!(
        stdout.contains("collector mute: ERROR: ") && stdout.contains("did not answer --check-args"),
        "{stdout}"
    );
}

#[test]
fn a_collector_that_dies_before_registering_is_named_with_its_status_and_last_words() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let boom = tmp.path().join("boom-collector");
    write_collector_script(&boom, "echo 'widget: starting'\necho 'fatal: no widget here' >&2\nexit 3");
    let mut sys = System::start(
        &[CollectorDef { startup_timeout_secs: 3, ..CollectorDef::with_binary("boom", boom) }],
        "",
    );
    let mut child = sys.agent.take().expect("agent");
    let mut status = None;
    wait_until(Duration::from_secs(60), || {
        status = child.try_wait().ok().flatten();
        status.is_some()
    });
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{}", sys.tail());
    let agent_log = std::fs::read_to_string(&sys.log).expect("agent log");
    assert!(
        agent_log
            .contains("collector boom: exit status 3; its last words: fatal: no widget here; restarting in"),
        "{agent_log}"
    );
    assert!(
        agent_log.contains(
            "boom (3 s; last exit: exit status 3; its last words: fatal: no widget here) did not register"
        ),
        "the startup failure says why: {agent_log}"
    );
    let path = sys.data_dir().join("collectors").join("boom").join("collector.log");
    assert!(
        agent_log.contains(&format!("logging to {}", path.display())),
        "the agent says where: {agent_log}"
    );
    // Its stdout and stderr are in its own log, not in the agent's.
    let own = std::fs::read_to_string(&path).expect("collector.log");
    assert!(own.contains("widget: starting\nfatal: no widget here\n"), "{own}");
    assert!(!agent_log.contains("widget: starting"), "{agent_log}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&path).expect("stat").permissions().mode() & 0o777, 0o600);
}

#[test]
fn an_adopted_collector_keeps_its_log_after_the_agent_is_killed() {
    let mut sys = System::start(&[CollectorDef::procmond("pm-l")], "");
    let first =
        sys.wait_status(Duration::from_secs(20), "SteadyState", |s| s.state == AgentState::SteadyState);
    let pid = first.collectors[0].pid.expect("pid");
    let path = sys.data_dir().join("collectors").join("pm-l").join("collector.log");
    let read = || std::fs::read_to_string(&path).unwrap_or_default();
    assert!(read().contains("bus client pm-l: connected to"), "{}", sys.tail());
    sys.kill_agent();
    // Orphaned, it goes on writing its own file: it sees the broker go.
    assert!(
        wait_until(Duration::from_secs(20), || read().contains("reconnecting")),
        "the collector logs the lost broker to its own file\n{}",
        sys.tail()
    );
    let before_restart = read().len();
    sys.start_agent();
    let back = sys.wait_status(Duration::from_secs(30), "adopted and registered", |s| {
        s.state == AgentState::SteadyState && s.collectors[0].registered
    });
    assert_eq!(back.collectors[0].pid, Some(pid), "adopted: {back:#?}");
    assert!(sys.log().contains(&format!("replays, logging to {}", path.display())), "{}", sys.tail());
    assert!(
        wait_until(Duration::from_secs(20), || read()[before_restart..].contains("connected to")),
        "the adopted collector's reconnection is in its log\n{}",
        sys.tail()
    );
    assert_eq!(sys.stop(Duration::from_secs(30)).code(), Some(0));
    assert!(wait_until(Duration::from_secs(10), || !alive(pid)), "the adopted collector stopped");
}

#[test]
fn each_thing_is_logged_once_and_a_cli_call_only_at_debug() {
    let mut sys = System::start(&[CollectorDef::procmond("pm-once")], "");
    sys.wait_status(Duration::from_secs(20), "SteadyState", |s| s.state == AgentState::SteadyState);
    let out = sys.cli(&["status"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(sys.stop(Duration::from_secs(30)).code(), Some(0));
    let agent_log = std::fs::read_to_string(&sys.log).expect("agent log");
    // A CLI call is a client of no configured name: its coming and going
    // is for debugging; a collector's is news.
    let cli_lines: Vec<&str> =
        agent_log.lines().filter(|l| l.contains("-cli-") && l.contains("connected")).collect();
    assert_eq!(cli_lines.len(), 2, "{agent_log}");
    assert!(cli_lines.iter().all(|l| l.contains(" DEBUG ")), "{cli_lines:#?}");
    assert!(
        agent_log.lines().any(|l| l.contains(" INFO ") && l.contains("bus: pm-once connected")),
        "{agent_log}"
    );
    // The WAL's recovery report, once per start.
    let (_, own) = sys.collector_logs().into_iter().find(|(id, _)| id == "pm-once").expect("collector.log");
    assert_eq!(own.matches(": recovered ").count(), 1, "{own}");

    // A fatal error is said once (the log is on stderr).
    let tmp = tempfile::tempdir().expect("tempdir");
    let file = tmp.path().join("not-a-dir");
    std::fs::write(&file, "").expect("write");
    let data = file.join("data");
    let out = Command::new(bin("daemoneye-agent")).arg("--data-dir").arg(&data).output().expect("agent");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let path = data.display().to_string();
    assert_eq!(stderr.lines().filter(|l| l.contains(&path)).count(), 1, "{stderr}");
}
