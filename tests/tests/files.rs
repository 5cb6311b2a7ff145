//! The files the daemons keep, against the other users of the host:
//! everything created is private whatever the umask; a data dir another
//! user owns or may write to is refused; root runs no collector binary
//! that another user could change.
//!
//! CI runs as root; these tests fail (not skip) when they cannot.
#![forbid(unsafe_code)]

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use daemoneye_agent::api::AgentState;
use daemoneye_tests::{CollectorDef, System, agent_yaml, bin, copy_executable, store_summary, wait_until};

fn require_root() {
    assert!(nix::unistd::geteuid().is_root(), "these tests need root: run them as root (CI does)");
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// The `Umask:` of a running process.
fn umask_of(pid: u32) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status.lines().find_map(|l| l.strip_prefix("Umask:")).expect("Umask").trim().to_owned()
}

/// Every file and directory under `dir` (and `dir` itself) whose mode is
/// not 0700 for a directory or 0600 for anything else, as "path mode".
fn not_private(dir: &Path) -> Vec<String> {
    let mut open = Vec::new();
    let mut dirs = vec![dir.to_owned()];
    let mode = |m: &std::fs::Metadata| m.mode() & 0o7777;
    let top = std::fs::symlink_metadata(dir).expect("data dir");
    if mode(&top) != 0o700 {
        open.push(format!("{} {:04o}", dir.display(), mode(&top)));
    }
    while let Some(dir) = dirs.pop() {
        // Removed meanwhile (a WAL segment, SQLite's journal): skipped.
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            let want = if meta.is_dir() { 0o700 } else { 0o600 };
            if mode(&meta) != want {
                open.push(format!("{} {:04o}", entry.path().display(), mode(&meta)));
            }
            if meta.is_dir() {
                dirs.push(entry.path());
            }
        }
    }
    open
}

#[test]
fn under_umask_000_every_directory_is_0700_and_every_file_0600() {
    let mut sys = System::create(&[CollectorDef::procmond("pm-modes")], "");
    let mut agent = Command::new("sh");
    agent
        .arg("-c")
        .arg("umask 000; exec \"$0\" \"$@\"")
        .arg(bin("daemoneye-agent"))
        .arg("--config")
        .arg(sys.dir.path().join("agent.yaml"));
    sys.spawn_agent(agent);
    sys.wait_status(Duration::from_secs(30), "SteadyState", |s| s.state == AgentState::SteadyState);
    // The umask is the one the daemons run with.
    assert_eq!(umask_of(sys.agent_pid()), "0000");
    let collectors = sys.collector_pids();
    assert_eq!(collectors.len(), 1, "{}", sys.tail());
    assert_eq!(umask_of(collectors[0]), "0000");
    let db = sys.database();
    assert!(
        wait_until(Duration::from_secs(30), || store_summary(&db)
            .iter()
            .any(|(c, n, _)| c == "pm-modes" && *n > 0)),
        "no events stored\n{}",
        sys.tail()
    );
    let running = not_private(&sys.data_dir());
    assert_eq!(sys.stop(Duration::from_secs(30)).code(), Some(0), "{}", sys.tail());
    // What a clean shutdown writes last (watermarks, checkpoints) too.
    let stopped = not_private(&sys.data_dir());
    assert!(running.is_empty() && stopped.is_empty(), "running: {running:?}\nstopped: {stopped:?}");
}

/// Runs the agent with `config` until it exits (at most 30 s).
fn agent_exit(config: &Path) -> Output {
    let mut child = Command::new(bin("daemoneye-agent"))
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("agent");
    let exited = wait_until(Duration::from_secs(30), || child.try_wait().ok().flatten().is_some());
    if !exited {
        let _ = child.kill();
    }
    let out = child.wait_with_output().expect("agent output");
    assert!(exited, "the agent did not exit: {}", String::from_utf8_lossy(&out.stderr));
    out
}

#[test]
fn a_data_dir_another_user_owns_or_may_write_to_is_refused() {
    require_root();
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let config = tmp.path().join("agent.yaml");
    std::fs::write(&config, agent_yaml(&data, &[], "")).expect("write agent.yaml");
    let cases: [(&str, u32, Option<u32>, &str); 3] = [
        ("world-writable", 0o777, None, "other users may write to it"),
        ("group-writable", 0o770, None, "other users may write to it"),
        ("another user's", 0o700, Some(65534), "it belongs to uid 65534"),
    ];
    for (what, mode, owner, said) in cases {
        std::fs::create_dir_all(&data).expect("mkdir");
        chmod(&data, mode);
        std::os::unix::fs::chown(&data, Some(owner.unwrap_or(0)), None).expect("chown");
        let out = agent_exit(&config);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{what}: {err}");
        assert!(
            err.contains(&format!("refusing directory {}", data.display())) && err.contains(said),
            "{what}: {err}"
        );
        // Refused, not repaired, and nothing made in it.
        let meta = std::fs::metadata(&data).expect("data dir");
        assert_eq!((meta.mode() & 0o7777, meta.uid()), (mode, owner.unwrap_or(0)), "{what}");
        assert_eq!(std::fs::read_dir(&data).expect("read_dir").count(), 0, "{what}");
        std::fs::remove_dir(&data).expect("rmdir");
    }
    // Only readable by others (an older release's 0755): tightened, and
    // the agent runs.
    let mut sys = System::create(&[], "");
    std::fs::create_dir(sys.data_dir()).expect("mkdir");
    chmod(&sys.data_dir(), 0o755);
    sys.start_agent();
    sys.wait_status(Duration::from_secs(30), "SteadyState", |s| s.state == AgentState::SteadyState);
    assert_eq!(std::fs::metadata(sys.data_dir()).expect("data dir").mode() & 0o7777, 0o700);
    assert!(sys.log().contains("was mode 0755, open to other users: now 0700"), "{}", sys.tail());
    assert_eq!(sys.stop(Duration::from_secs(30)).code(), Some(0), "{}", sys.tail());
}

#[test]
fn root_refuses_a_collector_binary_another_user_could_change() {
    require_root();
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("bin");
    std::fs::create_dir(&dir).expect("mkdir");
    chmod(&dir, 0o755);
    let binary = dir.join("procmond");
    copy_executable(&bin("procmond"), &binary);
    let config = tmp.path().join("agent.yaml");
    let yaml =
        agent_yaml(&tmp.path().join("data"), &[CollectorDef::with_binary("pm-bin", binary.clone())], "");
    std::fs::write(&config, yaml).expect("write agent.yaml");
    let refused = |what: &str, said: String| {
        let out = agent_exit(&config);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{what}: {err}");
        assert!(
            err.contains("invalid configuration")
                && err.contains("collectors[0].binary")
                && err.contains(&format!("refusing to run {} as root", binary.display()))
                && err.contains(&said),
            "{what}: {said:?} not in {err}"
        );
    };
    chmod(&dir, 0o777);
    refused(
        "a world-writable directory",
        format!("{} may be written by group or others (mode 0777)", dir.display()),
    );
    chmod(&dir, 0o755);
    chmod(&binary, 0o775);
    refused(
        "a group-writable binary",
        format!("{} may be written by group or others (mode 0775)", binary.display()),
    );
    chmod(&binary, 0o755);
    std::os::unix::fs::chown(&binary, Some(65534), None).expect("chown");
    refused("another user's binary", format!("{} belongs to uid 65534", binary.display()));
    std::os::unix::fs::chown(&binary, Some(0), None).expect("chown");

    // Checked again at every start: made writable while the agent runs,
    // the binary is not run again when the collector dies.
    let mut sys = System::start(&[CollectorDef::with_binary("pm-bin", binary.clone())], "");
    sys.wait_status(Duration::from_secs(30), "SteadyState", |s| s.state == AgentState::SteadyState);
    let pid = sys.collector_pids()[0];
    chmod(&dir, 0o777);
    daemoneye_tests::signal(pid, nix::sys::signal::Signal::SIGKILL);
    assert!(
        wait_until(Duration::from_secs(30), || sys
            .log()
            .contains(&format!("refusing to run {} as root", binary.display()))),
        "{}",
        sys.tail()
    );
    // Nothing runs it: the collector is down, and says why.
    let down = sys.wait_status(Duration::from_secs(10), "the collector down", |s| {
        s.collectors.iter().all(|c| c.pid.is_none())
    });
    let why = down.collectors[0].last_exit.as_deref().unwrap_or_default();
    assert!(why.contains("refusing to run"), "{why}");
    assert!(!daemoneye_tests::alive(pid));
    assert_eq!(sys.collector_pids(), [pid], "no other procmond took the lock");
    sys.stop(Duration::from_secs(30));
}
