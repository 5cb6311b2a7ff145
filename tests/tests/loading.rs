//! The loading state machine under a stuck collector: a warm start (the
//! agent restarted while its collectors ran) holds nobody back; a cold
//! start waits for every collector and names the one it waits for.
#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

use daemoneye_agent::api::{AgentState, CollectorPhase};
use daemoneye_tests::{CollectorDef, System, alive, bin, signal, wait_until, write_collector_script};
use nix::sys::signal::Signal;

#[test]
fn after_an_agent_restart_a_stopped_adopted_collector_holds_up_no_other() {
    let mut stuck = CollectorDef::procmond("pm-stuck").heartbeat(30);
    stuck.startup_timeout_secs = 6;
    let mut sys = System::start(&[stuck, CollectorDef::procmond("pm-fresh").heartbeat(30)], "");
    let first =
        sys.wait_status(Duration::from_secs(30), "SteadyState", |s| s.state == AgentState::SteadyState);
    let pid_of = |id: &str| first.collectors.iter().find(|c| c.id == id).and_then(|c| c.pid).expect("pid");
    let (stuck_pid, fresh_pid) = (pid_of("pm-stuck"), pid_of("pm-fresh"));
    sys.kill_agent();
    // One collector hangs (adopted, it will never register); the other
    // is gone (spawned afresh).
    signal(stuck_pid, Signal::SIGSTOP);
    signal(fresh_pid, Signal::SIGKILL);
    assert!(wait_until(Duration::from_secs(10), || !alive(fresh_pid)), "pm-fresh killed");
    let restarted = Instant::now();
    sys.start_agent();
    let steady = sys.wait_status(Duration::from_secs(20), "the fresh collector monitoring", |s| {
        s.state == AgentState::SteadyState
            && s.collectors
                .iter()
                .any(|c| c.id == "pm-fresh" && c.registered && c.phase == CollectorPhase::Running)
    });
    let waited = restarted.elapsed();
    let stuck_now = steady.collectors.iter().find(|c| c.id == "pm-stuck").expect("pm-stuck");
    assert!(stuck_now.adopted && !stuck_now.registered, "pm-stuck is adopted and silent: {stuck_now:#?}");
    // Not held up to pm-stuck's startup timeout (6 s) or beyond.
    assert!(waited < Duration::from_secs(6), "the fresh collector waited {waited:?}\n{}", sys.tail());
    assert!(sys.log().contains("warm start"), "{}", sys.tail());
    // The stuck one is stopped after its startup timeout and restarted.
    let back = sys.wait_status(Duration::from_secs(40), "pm-stuck restarted", |s| {
        s.collectors
            .iter()
            .any(|c| c.id == "pm-stuck" && c.registered && c.pid.is_some_and(|p| p != stuck_pid))
    });
    assert!(!alive(stuck_pid), "the hung collector was killed");
    assert_eq!(back.state, AgentState::SteadyState);
    assert_eq!(sys.stop(Duration::from_secs(30)).code(), Some(0));
}

#[test]
fn a_cold_start_names_the_collector_it_waits_for_and_fails_at_its_startup_timeout() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // Stops itself before it becomes procmond: it never registers.
    let hang = tmp.path().join("hanging-procmond");
    write_collector_script(&hang, &format!("kill -STOP $$\nexec {} \"$@\"", bin("procmond").display()));
    let mut stuck = CollectorDef::with_binary("pm-hang", hang);
    stuck.startup_timeout_secs = 8;
    let mut sys = System::start(&[stuck, CollectorDef::procmond("pm-ok")], "");
    let loading = sys.wait_status(Duration::from_secs(20), "pm-ok registered", |s| {
        s.collectors.iter().any(|c| c.id == "pm-ok" && c.registered)
    });
    assert_eq!(loading.state, AgentState::Loading, "a cold start waits for all");
    let hung = loading.collectors.iter().find(|c| c.id == "pm-hang").expect("pm-hang");
    assert!(!hung.registered && hung.phase == CollectorPhase::Starting, "named in the status: {hung:#?}");
    let pid = hung.pid.expect("the supervisor's pid for it");
    let named = format!("waiting for pm-hang (pid {pid})");
    assert!(wait_until(Duration::from_secs(10), || sys.log().contains(&named)), "{named:?}\n{}", sys.tail());
    let mut agent = sys.agent.take().expect("agent");
    let mut status = None;
    assert!(
        wait_until(Duration::from_secs(30), || {
            status = agent.try_wait().ok().flatten();
            status.is_some()
        }),
        "the start did not fail\n{}",
        sys.tail()
    );
    assert_eq!(status.and_then(|s| s.code()), Some(1));
    assert!(sys.log().contains("pm-hang (8 s) did not register"), "{}", sys.tail());
    assert!(!alive(pid), "the hung collector was stopped");
}
