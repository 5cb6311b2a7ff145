//! `run_as` as root: privilege separation. The agent's work (broker,
//! store, rules, monitor) runs as the unprivileged user from its first
//! instruction; the part that stays root still starts, escalates, kills,
//! restarts and stops the collectors, which run as root.
//!
//! CI runs as root; these tests fail (not skip) when they cannot.
#![forbid(unsafe_code)]

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use daemoneye_agent::api::AgentState;
use daemoneye_tests::{CollectorDef, System, alive, signal};
use nix::sys::signal::Signal;

/// uid 65534 (`nobody` on Debian): the `run_as` user.
const NOBODY: u32 = 65534;

/// Real, effective, saved uids and the permitted and effective
/// capability sets of `pid`, from /proc.
fn creds(pid: u32) -> (Vec<u32>, String, String) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let field = |name: &str| {
        status.lines().find_map(|l| l.strip_prefix(name)).map(str::trim).unwrap_or_default().to_owned()
    };
    let uids = field("Uid:").split_whitespace().take(3).map(|u| u.parse().expect("uid")).collect();
    (uids, field("CapPrm:"), field("CapEff:"))
}

fn parent(pid: u32) -> u32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let after = &stat[stat.rfind(')').expect("comm") + 2..];
    after.split_whitespace().nth(1).expect("ppid").parse().expect("ppid")
}

fn owner_mode(path: &Path) -> (u32, u32) {
    let m = std::fs::symlink_metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (m.uid(), m.mode() & 0o7777)
}

/// The system with `run_as: nobody`; its temp dir is traversable (0711)
/// so the worker reaches its own directory below it, as it would below
/// /var/lib.
fn system(collectors: &[CollectorDef]) -> System {
    assert!(nix::unistd::geteuid().is_root(), "run_as needs root: run these tests as root (CI does)");
    let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(NOBODY)).expect("getpwuid");
    let name = user.expect("uid 65534 has a name").name;
    let mut sys = System::create(collectors, &format!("run_as: {name}\n"));
    std::fs::set_permissions(sys.dir.path(), std::fs::Permissions::from_mode(0o711)).expect("chmod");
    sys.start_agent();
    sys
}

#[test]
fn run_as_runs_the_agent_unprivileged_and_still_escalates_restarts_and_stops_root_collectors() {
    let mut sys = system(&[CollectorDef::procmond("pm-ps").heartbeat(1)]);
    let steady =
        sys.wait_status(Duration::from_secs(30), "SteadyState", |s| s.state == AgentState::SteadyState);

    // The worker (the status's pid: the broker's host) never had root.
    let worker = steady.pid;
    assert_eq!(parent(worker), sys.agent_pid(), "the worker is the started agent's child");
    let (uids, prm, eff) = creds(worker);
    assert_eq!(uids, vec![NOBODY; 3], "worker uids");
    assert_eq!((prm.as_str(), eff.as_str()), ("0000000000000000", "0000000000000000"), "worker capabilities");
    // The privileged part keeps root; the collector runs as root, its child.
    assert_eq!(creds(sys.agent_pid()).0, vec![0; 3]);
    let pid = steady.collectors[0].pid.expect("collector pid");
    assert_eq!(creds(pid).0, vec![0; 3], "the collector keeps root");
    assert_eq!(parent(pid), sys.agent_pid(), "the privileged part spawned it");

    // The layout: root's data dir (traversable only), the worker's own
    // directory, root's collector directories.
    let data = sys.data_dir();
    assert_eq!(owner_mode(&data), (0, 0o711), "data dir");
    assert_eq!(owner_mode(&data.join("agent")), (NOBODY, 0o700), "worker dir");
    assert_eq!(owner_mode(&sys.database()).0, NOBODY, "the store is the worker's");
    assert_eq!(owner_mode(&sys.socket()).0, NOBODY, "the socket is the worker's");
    assert_eq!(owner_mode(&data.join("collectors").join("pm-ps")), (0, 0o700), "collector dir");
    let db = sys.database();
    assert!(
        daemoneye_tests::wait_until(Duration::from_secs(20), || !daemoneye_tests::store_summary(&db)
            .is_empty()),
        "events are stored\n{}",
        sys.tail()
    );

    // A hung root collector: the unprivileged monitor escalates, the
    // privileged part kills it and restarts it.
    signal(pid, Signal::SIGSTOP);
    let back = sys.wait_status(Duration::from_secs(40), "escalated and restarted", |s| {
        let c = &s.collectors[0];
        c.restarts >= 1 && c.registered && c.pid.is_some_and(|p| p != pid)
    });
    let steps: Vec<(&str, &str)> =
        back.collectors[0].escalation.iter().map(|s| (s.step.as_str(), s.outcome.as_str())).collect();
    assert!(
        steps.iter().any(|(step, outcome)| *step == "kill" && outcome.starts_with("SIGKILL sent")),
        "{steps:?}\n{}",
        sys.tail()
    );
    assert!(steps.iter().any(|(step, _)| *step == "restart"), "{steps:?}");
    assert!(!alive(pid), "the hung collector was killed");
    let again = back.collectors[0].pid.expect("new pid");
    assert_eq!(creds(again).0, vec![0; 3], "restarted with root");

    // Shutdown stops it, and both parts exit 0.
    let worker_pid = worker;
    assert_eq!(sys.stop(Duration::from_secs(30)).code(), Some(0), "{}", sys.tail());
    assert!(!alive(again), "shutdown stopped the collector\n{}", sys.tail());
    assert!(!alive(worker_pid), "the worker exited");
    let log = sys.log();
    for refused in ["EPERM", "not permitted", "unreachable", "privsep:"] {
        assert!(!log.contains(refused), "{refused:?} in the log\n{}", sys.tail());
    }
}

#[test]
fn the_privileged_part_exits_non_zero_and_stops_the_collectors_when_the_worker_dies() {
    let mut sys = system(&[CollectorDef::procmond("pm-pd")]);
    let steady =
        sys.wait_status(Duration::from_secs(30), "SteadyState", |s| s.state == AgentState::SteadyState);
    let collector = steady.collectors[0].pid.expect("collector pid");
    signal(steady.pid, Signal::SIGKILL);
    let mut agent = sys.agent.take().expect("agent");
    let mut status = None;
    assert!(
        daemoneye_tests::wait_until(Duration::from_secs(20), || {
            status = agent.try_wait().ok().flatten();
            status.is_some()
        }),
        "the privileged part outlived its worker\n{}",
        sys.tail()
    );
    assert_ne!(status.and_then(|s| s.code()), Some(0), "{}", sys.tail());
    assert!(!alive(collector), "its collectors were stopped\n{}", sys.tail());
    assert!(sys.log().contains("the worker"), "{}", sys.tail());
}
