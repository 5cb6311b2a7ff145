//! Tasks across real processes: `daemoneye-agent` with three procmond
//! children on a real broker socket in a temp dir, asked through the bus
//! as `daemoneye-cli` asks it (and through the CLI itself): load
//! balancing, failover when a member is SIGKILLed, aggregation with a
//! member stopped, `ps --tree` against a tree the test spawned, and bad
//! requests.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use daemoneye_agent::api::{
    AgentState, AgentTaskRequest, AgentTaskResponse, CollectorPhase, GatherOutcome, TaskOutcome,
};
use daemoneye_bus::Client;
use daemoneye_contract::control::{SnapshotFilter, TaskRequest, TaskStatus};
use daemoneye_tests::{CollectorDef, System, ask_task, signal, wait_until, write_script};
use nix::sys::signal::Signal;

const TYPE: &str = "process-monitor";
const WAIT: Duration = Duration::from_secs(30);

fn three(heartbeat: u64) -> Vec<CollectorDef> {
    ["pm-a", "pm-b", "pm-c"].iter().map(|id| CollectorDef::procmond(id).heartbeat(heartbeat)).collect()
}

/// Starts the system and waits until every collector runs.
fn steady(collectors: &[CollectorDef], extra: &str) -> System {
    let mut sys = System::start(collectors, extra);
    sys.wait_status(WAIT, "every collector running", |s| {
        s.state == AgentState::SteadyState && s.collectors.iter().all(|c| c.phase == CollectorPhase::Running)
    });
    sys
}

fn hash_task(path: &str) -> AgentTaskRequest {
    AgentTaskRequest::One { collector_type: TYPE.into(), task: TaskRequest::Hash { path: path.into() } }
}

fn one(client: &Client, req: &AgentTaskRequest) -> TaskOutcome {
    match ask_task(client, req, WAIT) {
        AgentTaskResponse::One(o) => o,
        other => panic!("expected a single answer, got {other:?}"),
    }
}

fn gather(client: &Client, filter: SnapshotFilter) -> GatherOutcome {
    let req = AgentTaskRequest::All { collector_type: TYPE.into(), filter };
    match ask_task(client, &req, WAIT) {
        AgentTaskResponse::All(g) => g,
        other => panic!("expected a gathered answer, got {other:?}"),
    }
}

/// A small file to hash (a debug build's binaries take longer than a
/// task's hashing budget).
fn small_file(sys: &System) -> String {
    let path = sys.dir.path().join("hash-me");
    std::fs::write(&path, b"daemoneye task test\n".repeat(200)).expect("write");
    path.display().to_string()
}

/// The pid of a collector, from the agent's status.
fn pid_of(sys: &mut System, id: &str) -> u32 {
    let s = sys.wait_status(WAIT, "status", |_| true);
    s.collectors.iter().find(|c| c.id == id).and_then(|c| c.pid).expect("collector pid")
}

#[test]
fn round_robin_splits_300_tasks_100_100_100_and_status_counts_them() {
    let extra = "tasks:\n  balance: {hash: round_robin}\n";
    let mut sys = steady(&three(1), extra);
    let client = sys.client();
    let procmond = small_file(&sys);
    let mut served: HashMap<String, u32> = HashMap::new();
    for i in 0..300 {
        let o = one(&client, &hash_task(&procmond));
        let r = o.response.as_ref().unwrap_or_else(|| panic!("task {i}: {o:?}"));
        assert_eq!(r.status, TaskStatus::Ok, "task {i}: {o:?}");
        assert_eq!(o.attempts.len(), 1, "task {i} needed no failover: {o:?}");
        *served.entry(o.served_by.clone().expect("served by")).or_default() += 1;
    }
    for id in ["pm-a", "pm-b", "pm-c"] {
        assert_eq!(served.get(id), Some(&100), "{served:?}");
    }
    // Status: per collector, the agent's count at once; the collector's own
    // with its next heartbeats.
    let status = sys.wait_status(WAIT, "task counts in heartbeats", |s| {
        s.collectors.iter().all(|c| c.heartbeat.as_ref().is_some_and(|h| h.tasks_served >= 100))
    });
    for c in &status.collectors {
        assert_eq!((c.tasks.served, c.tasks.failed), (100, 0), "{c:?}");
        assert!(c.tasks.avg_latency_us > 0, "{c:?}");
    }
    assert_eq!((status.tasks.requests, status.tasks.answered, status.tasks.failovers), (300, 300, 0));
    let text = sys.cli(&["status"]);
    let out = String::from_utf8_lossy(&text.stdout);
    assert!(out.contains("TASKS (FAILED, AVG)") && out.contains("100 (0, "), "{out}");
    assert!(out.contains("balance snapshot LeastLoaded, inspect LeastLoaded, hash RoundRobin"), "{out}");
}

#[test]
fn least_loaded_favours_the_idle_members_over_a_stalled_one() {
    // Long heartbeats: the stalled member is not escalated during the test.
    let extra = "tasks: {attempt_timeout_ms: 1000, balance: {hash: least_loaded}}\n";
    let mut sys = steady(&three(30), extra);
    let stalled = pid_of(&mut sys, "pm-b");
    let client = sys.client();
    let procmond = small_file(&sys);
    signal(stalled, Signal::SIGSTOP);
    let mut served: HashMap<String, u32> = HashMap::new();
    let mut timeouts = 0;
    for i in 0..60 {
        let o = one(&client, &hash_task(&procmond));
        assert_eq!(o.response.as_ref().map(|r| r.status), Some(TaskStatus::Ok), "task {i}: {o:?}");
        timeouts += o.attempts.iter().filter(|a| a.collector.is_none()).count();
        *served.entry(o.served_by.clone().expect("served by")).or_default() += 1;
    }
    // The stalled member got at most one task (before it held one it had
    // not answered); everything else went to the idle two, evenly.
    assert!(timeouts <= 1, "{timeouts} timeouts; {served:?}");
    assert_eq!(served.get("pm-b"), None, "{served:?}");
    let (a, c) = (served.get("pm-a").copied().unwrap_or(0), served.get("pm-c").copied().unwrap_or(0));
    assert_eq!(a + c, 60);
    assert!(a.abs_diff(c) <= 1, "ties go in turn: {served:?}");
    // The broker sees the stalled member's unanswered task.
    let stats = client.broker_stats(WAIT).expect("stats");
    let held = stats.queues.iter().find(|q| q.client_id == "pm-b").map_or(0, |q| q.awaiting);
    assert_eq!(held, timeouts, "{stats:?}");
    signal(stalled, Signal::SIGCONT);
}

#[test]
fn a_sigkilled_member_fails_over_and_every_task_completes_within_its_deadline() {
    let extra = "tasks: {attempt_timeout_ms: 5000, deadline_ms: 8000, balance: {hash: round_robin}}\n";
    let mut sys = steady(&three(30), extra);
    let victim = pid_of(&mut sys, "pm-b");
    let procmond = small_file(&sys);
    // Four clients keep tasks running all along.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let (client, stop, path) = (sys.client(), stop.clone(), procmond.clone());
            std::thread::spawn(move || {
                let mut done = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) || done.len() < 50 {
                    done.push(one(&client, &hash_task(&path)));
                }
                done
            })
        })
        .collect();
    // Stop the victim so it holds a task when it dies, then kill it.
    signal(victim, Signal::SIGSTOP);
    let observer = sys.client();
    let holds = wait_until(WAIT, || {
        observer
            .broker_stats(WAIT)
            .is_ok_and(|s| s.queues.iter().any(|q| q.client_id == "pm-b" && q.awaiting > 0))
    });
    assert!(holds, "pm-b never held a task\n{}", sys.tail());
    signal(victim, Signal::SIGKILL);
    let status = sys.wait_status(WAIT, "the dead member in status", |s| {
        s.collectors.iter().any(|c| {
            c.id == "pm-b" && c.last_exit.as_deref() == Some("signal 9 (SIGKILL)") && c.tasks.failed >= 1
        })
    });
    // The task it took and never answered counts against it (above).
    assert!(status.collectors.iter().any(|c| c.id == "pm-b" && c.restarts >= 1), "{status:#?}");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let outcomes: Vec<TaskOutcome> = workers.into_iter().flat_map(|w| w.join().expect("worker")).collect();

    let mut failed_over = 0;
    for o in &outcomes {
        assert_eq!(o.response.as_ref().map(|r| r.status), Some(TaskStatus::Ok), "{o:?}");
        assert!(o.elapsed_ms <= 8000 + 500, "within its deadline: {o:?}");
        if o.attempts.len() > 1 {
            let first = &o.attempts[0];
            assert_eq!(first.collector.as_deref(), Some("pm-b"), "{o:?}");
            assert_eq!(first.outcome, "disconnected before answering", "{o:?}");
            failed_over += 1;
        }
    }
    assert!(failed_over >= 1, "the task pm-b held was failed over: {} tasks", outcomes.len());
    assert_eq!(status.tasks.timeouts, 0, "failover came from the broker's word, not a timeout");
}

#[test]
fn a_gathered_snapshot_merges_the_lists_and_names_the_stopped_collector() {
    let extra = "tasks: {gather_timeout_ms: 1500}\n";
    let mut sys = steady(&three(30), extra);
    let client = sys.client();
    // Every collector has a list once each has completed a cycle.
    let full = wait_until(WAIT, || {
        let g = gather(&client, SnapshotFilter::default());
        g.missing.is_empty() && g.answered.iter().all(|a| a.status == TaskStatus::Ok)
    });
    assert!(full, "{:?}\n{}", gather(&client, SnapshotFilter::default()), sys.tail());
    let g = gather(&client, SnapshotFilter::default());
    assert_eq!(g.answered.len(), 3);
    // Three collectors on one host list the same processes: merged once,
    // seen by all three.
    let agent = g.processes.iter().find(|p| p.process.pid == sys.agent_pid()).expect("the agent is listed");
    assert_eq!(agent.seen_by.len(), 3, "{agent:?}");
    let mut keys: Vec<_> = g.processes.iter().map(|p| p.process.key()).collect();
    let n = keys.len();
    keys.dedup();
    assert_eq!(keys.len(), n, "each identity once");

    let stopped = pid_of(&mut sys, "pm-c");
    signal(stopped, Signal::SIGSTOP);
    let partial = gather(&client, SnapshotFilter::default());
    let answered: Vec<&str> = partial.answered.iter().map(|a| a.collector_id.as_str()).collect();
    assert!(answered.contains(&"pm-a") && answered.contains(&"pm-b") && !answered.contains(&"pm-c"));
    assert_eq!(partial.missing.len(), 1, "{:?}", partial.missing);
    assert_eq!(partial.missing[0].collector_id, "pm-c");
    assert_eq!(partial.missing[0].reason, "no answer within 1500 ms");
    assert!(!partial.processes.is_empty());
    // The CLI prints the list and names the missing collector.
    let out = sys.cli(&["ps"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("partial result: collector pm-c missing: no answer within 1500 ms"), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with("PID") && stdout.contains("pm-a,pm-b"), "{stdout}");
    let json = sys.cli(&["ps", "--json"]);
    let stderr = String::from_utf8_lossy(&json.stderr);
    assert!(stderr.contains("partial result: collector pm-c missing"), "{stderr}");
    // One document per process, each naming who listed it.
    let docs: Vec<serde_json::Value> = json
        .stdout
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).expect("json"))
        .collect();
    assert!(docs.len() > 1, "{}", String::from_utf8_lossy(&json.stdout));
    assert!(docs.iter().all(|d| d["daemoneye"]["seen_by"].as_array().is_some_and(|s| !s.is_empty())));
    signal(stopped, Signal::SIGCONT);
}

/// A process tree the test owns: root script → mid script → sleep, and
/// root → sleep.
struct Tree {
    root: Child,
}

impl Drop for Tree {
    fn drop(&mut self) {
        // The scripts are in their own process group.
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(i32::try_from(self.root.id()).expect("pid")),
            Signal::SIGKILL,
        );
        let _ = self.root.wait();
    }
}

const HOSTILE_ARG: &str = "x\n1 forged (root) line\u{1b}[2J";

#[test]
fn ps_tree_shows_a_spawned_tree_under_its_parents() {
    let mut sys = steady(&[CollectorDef::procmond("pm-a")], "");
    let tmp = tempfile::tempdir().expect("tempdir");
    let (root, mid) = (tmp.path().join("e2e-tree-root"), tmp.path().join("e2e-tree-mid"));
    write_script(&mid, "sleep 301 &\nwait");
    write_script(&root, &format!("{} &\nsleep 302 &\nwait", mid.display()));
    let tree = Tree {
        root: {
            use std::os::unix::process::CommandExt;
            // A hostile argument: a forged line and a terminal escape.
            Command::new(&root).arg(HOSTILE_ARG).process_group(0).stdin(Stdio::null()).spawn().expect("tree")
        },
    };
    let root_pid = tree.root.id();
    let client = sys.client();
    // Wait for a cycle that saw the whole tree: root, mid and two sleeps.
    let mut g = None;
    let seen = wait_until(WAIT, || {
        let got = gather(&client, SnapshotFilter::default());
        let kids = |ppid: u32| got.processes.iter().filter(move |p| p.process.ppid == ppid).count();
        let mid_pid =
            got.processes.iter().find(|p| p.process.ppid == root_pid && p.process.name == "e2e-tree-mid");
        let whole = kids(root_pid) == 2 && mid_pid.is_some_and(|m| kids(m.process.pid) == 1);
        g = Some(got);
        whole
    });
    assert!(seen, "tree not seen: {g:?}");
    let g = g.expect("list");
    let out = sys.cli(&["ps", "--tree"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    // (depth, pid) of every line: the pid is the first number after the
    // tree drawing, three characters per level.
    let lines: Vec<(usize, u32)> = text
        .lines()
        .map(|l| {
            let at = l
                .chars()
                .position(|c| c.is_ascii_digit())
                .unwrap_or_else(|| panic!("a line without a pid: {l:?}\n{text}"));
            let pid = l.chars().skip(at).take_while(char::is_ascii_digit).collect::<String>();
            (at / 3, pid.parse().expect("pid"))
        })
        .collect();
    let by_pid: HashMap<u32, u32> = g.processes.iter().map(|p| (p.process.pid, p.process.ppid)).collect();
    let ours: Vec<u32> = by_pid.iter().filter(|&(_, pp)| *pp == root_pid).map(|(p, _)| *p).collect();
    let mut checked = 0;
    for (i, &(depth, pid)) in lines.iter().enumerate() {
        let Some(&ppid) = by_pid.get(&pid) else { continue };
        if !(ours.contains(&pid) || ours.contains(&ppid)) {
            continue;
        }
        // The nearest line above one level up is the parent.
        let parent = lines[..i].iter().rev().find(|(d, _)| *d + 1 == depth).map(|(_, p)| *p);
        assert_eq!(parent, Some(ppid), "line {i} (pid {pid}) not under its parent:\n{text}");
        checked += 1;
    }
    assert_eq!(checked, 3, "mid and two sleeps placed:\n{text}");
    assert!(text.contains(&format!("{root_pid} e2e-tree-root")), "{text}");
    // Printed escaped, on the root's own line.
    let root_line =
        text.lines().find(|l| l.contains(&format!("{root_pid} e2e-tree-root"))).expect("root line");
    assert!(root_line.ends_with(r"x\n1 forged (root) line\u{1b}[2J"), "{root_line}");
    assert!(!text.contains('\u{1b}'), "{text}");
    // The name filter reaches the collectors.
    let json = sys.cli(&["ps", "--name", "e2e-tree-*", "--json"]);
    let docs: Vec<serde_json::Value> = json
        .stdout
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).expect("json"))
        .collect();
    let mut names: Vec<&str> = docs.iter().map(|p| p["process"]["name"].as_str().unwrap()).collect();
    names.sort_unstable();
    assert_eq!(names, ["e2e-tree-mid", "e2e-tree-root"]);
    drop(tree);
}

#[test]
fn bad_requests_get_clear_answers_and_serving_goes_on() {
    let mut sys = steady(
        &[CollectorDef::procmond("pm-a").heartbeat(30)],
        "tasks: {attempt_timeout_ms: 1500, deadline_ms: 3000}\n",
    );
    let client = sys.client();
    // Garbage on the agent's task topic.
    let reply = client.request("agent.task", &[0xff, 0xff, 0xff], WAIT).expect("an answer");
    match daemoneye_agent::api::decode::<AgentTaskResponse>(&reply.payload).expect("decodes") {
        AgentTaskResponse::Refused(why) => assert!(why.starts_with("malformed task request"), "{why}"),
        other => panic!("{other:?}"),
    }
    let bad_type =
        AgentTaskRequest::One { collector_type: "a.b".into(), task: TaskRequest::Inspect { pid: 1 } };
    assert!(
        matches!(ask_task(&client, &bad_type, WAIT), AgentTaskResponse::Refused(w) if w.contains("bad collector type"))
    );
    // Still serving.
    let me = std::process::id();
    let out = sys.cli(&["inspect", &me.to_string()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        text.contains(&format!("pid            {me}")) && text.contains("served by      pm-a (1 attempt"),
        "{text}"
    );
    // Not found, and a file that is not there: exit 1 with the reason.
    let out = sys.cli(&["inspect", "4000000"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found: pid 4000000"), "{:?}", out);
    let out = sys.cli(&["hash", "/nonexistent/e2e"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no such file: /nonexistent/e2e"), "{:?}", out);
    let file = small_file(&sys);
    let out = sys.cli(&["hash", &file]);
    let line = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success() && line.trim_end().ends_with(&format!("  {file}")), "{line}");
    assert_eq!(line.split_whitespace().next().map(str::len), Some(64), "{line}");
    // No collector can serve: the only one is stopped.
    let pid = pid_of(&mut sys, "pm-a");
    signal(pid, Signal::SIGSTOP);
    let out = sys.cli(&["inspect", "1"]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("no collector of type process-monitor served the task"), "{err}");
    assert!(err.contains("attempt 1: -: no answer within 1500 ms"), "{err}");
    let out = sys.cli(&["ps"]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("no collector gave a process list") && err.contains("pm-a: no answer within"),
        "{err}"
    );
    signal(pid, Signal::SIGCONT);
    // The agent down: exit 2.
    assert!(sys.stop(WAIT).success());
    let out = sys.cli(&["ps"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("agent not running"), "{out:?}");
}
