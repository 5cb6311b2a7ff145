//! Integration tests of the `daemoneye-cli` binary: each test gets its own
//! temp data dir, runs the real binary against it (a missing or stale
//! socket, a real broker with a fake agent answering status, a store
//! filled here) and checks its output and exit status. A failing check
//! prints the command, its output and the dir listing. Children are killed
//! on drop, by their own pid.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, bounded, select};
use daemoneye_agent::api::{
    self, AGENT_CLIENT_ID, AgentState, AgentStatus, BrokerStatus, CollectorPhase, CollectorStatus,
    STATUS_TOPIC, StoreStatus,
};
use daemoneye_bus::{Broker, BrokerConfig, Client, ClientConfig};
use daemoneye_contract::event::{EventEnvelope, EventKind, HashOutcome};
use daemoneye_platform::{Argv, Unavailable};
use daemoneye_store::EventStore;

const BIN: &str = env!("CARGO_BIN_EXE_daemoneye-cli");
const WAIT: Duration = Duration::from_secs(10);

/// What one run of the CLI did.
struct Run {
    command: String,
    code: Option<i32>,
    stdout: String,
    stderr: String,
    listing: String,
}

impl Run {
    /// Everything needed to understand a failure.
    fn describe(&self) -> String {
        format!(
            "command: {}\nexit: {:?}\n--- stdout\n{}--- stderr\n{}--- dir\n{}",
            self.command, self.code, self.stdout, self.stderr, self.listing
        )
    }

    fn success(&self) -> &Run {
        assert_eq!(self.code, Some(0), "{}", self.describe());
        self
    }

    fn json_lines(&self) -> Vec<serde_json::Value> {
        self.stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}\n{}", self.describe())))
            .collect()
    }
}

fn listing(dir: &Path) -> String {
    let mut out = String::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            out.push_str(&format!("{}\n", entry.path().display()));
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(entry.path());
            }
        }
    }
    out
}

fn command(dir: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.arg("--data-dir").arg(dir).args(args).stdin(Stdio::null());
    cmd
}

/// Runs the CLI with `--data-dir <dir>` and `args`, to completion.
fn cli(dir: &Path, args: &[&str]) -> Run {
    let out = command(dir, args).output().expect("daemoneye-cli runs");
    Run {
        command: format!("{BIN} --data-dir {} {}", dir.display(), args.join(" ")),
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        listing: listing(dir),
    }
}

fn socket(dir: &Path) -> PathBuf {
    dir.join("run").join("broker.sock")
}

fn envelope(collector: &str, seq: u64, kind: EventKind, pid: u32, name: &str) -> EventEnvelope {
    let process = daemoneye_contract::testing::record(pid, seq, name);
    daemoneye_contract::testing::envelope(collector, 1, seq, kind, process, api::now_unix_ms())
}

/// A store with: sshd started (pid 10), bash started (11), bash stopped
/// (11), curl started (12), from collector "c1".
fn filled_store(dir: &Path) -> EventStore {
    let mut store = EventStore::open(&dir.join("events.db")).unwrap();
    store
        .insert_batch(&[
            envelope("c1", 1, EventKind::Started, 10, "sshd"),
            envelope("c1", 2, EventKind::Started, 11, "bash"),
            envelope("c1", 3, EventKind::Stopped, 11, "bash"),
            envelope("c1", 4, EventKind::Started, 12, "curl"),
        ])
        .unwrap();
    store
}

/// A spawned process, killed (by its own pid) and reaped on drop.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The lines of a child's pipe, read by a named thread.
fn lines(pipe: impl std::io::Read + Send + 'static, name: &str) -> (Receiver<String>, JoinHandle<()>) {
    let (tx, rx) = bounded(256);
    let thread = std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        })
        .unwrap();
    (rx, thread)
}

fn next_line(rx: &Receiver<String>, what: &str) -> String {
    rx.recv_timeout(WAIT).unwrap_or_else(|e| panic!("no {what} within {WAIT:?}: {e}"))
}

#[test]
fn status_without_a_socket_says_the_agent_is_not_running() {
    let dir = tempfile::tempdir().unwrap();
    let run = cli(dir.path(), &["status"]);
    assert_eq!(run.code, Some(2), "{}", run.describe());
    assert!(run.stderr.contains("agent not running at"), "{}", run.describe());
    assert!(run.stderr.contains(&socket(dir.path()).display().to_string()), "{}", run.describe());
    assert!(run.stderr.contains("no socket there"), "{}", run.describe());
}

#[test]
fn status_on_a_stale_socket_says_connection_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("run")).unwrap();
    drop(std::os::unix::net::UnixListener::bind(socket(dir.path())).unwrap());
    assert!(socket(dir.path()).exists());
    let run = cli(dir.path(), &["status"]);
    assert_eq!(run.code, Some(2), "{}", run.describe());
    assert!(run.stderr.contains("connection refused"), "{}", run.describe());
    assert!(run.stderr.contains("stale socket"), "{}", run.describe());
}

/// A fake agent: a real broker, and a client named like the agent that
/// answers every status request with `status`.
struct FakeAgent {
    // Field order: the stop sender is dropped (ending the thread) before
    // the join, and the thread before the broker.
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
    broker: Option<Broker>,
}

impl FakeAgent {
    fn start(dir: &Path, status: AgentStatus) -> FakeAgent {
        let broker = Broker::start(BrokerConfig::new(socket(dir))).unwrap();
        let client = Client::connect(ClientConfig::new(socket(dir), AGENT_CLIENT_ID)).unwrap();
        assert!(client.wait_connected(WAIT));
        let requests = client.subscribe(STATUS_TOPIC).unwrap();
        // The broker handles a connection's frames in order: once it answers
        // this, the subscription is in place.
        client.broker_stats(WAIT).unwrap();
        let (stop, stopped) = bounded::<()>(1);
        let thread = std::thread::Builder::new()
            .name("fake-agent".into())
            .spawn(move || {
                loop {
                    select! {
                        recv(requests.messages()) -> msg => match msg {
                            Ok(msg) => client.reply(&msg, &api::encode(&status)).unwrap(),
                            Err(_) => return,
                        },
                        recv(stopped) -> _ => return,
                    }
                }
            })
            .unwrap();
        FakeAgent { stop: Some(stop), thread: Some(thread), broker: Some(broker) }
    }
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Some(b) = self.broker.take() {
            b.shutdown();
        }
    }
}

fn collector(id: &str, phase: CollectorPhase, pid: Option<u32>) -> CollectorStatus {
    CollectorStatus {
        id: id.to_owned(),
        collector_type: "process-monitor".to_owned(),
        phase,
        pid,
        adopted: false,
        registered: pid.is_some(),
        heartbeat: None,
        missed_heartbeats: 0,
        restarts: 1,
        last_exit: None,
        escalation: Vec::new(),
        events_stored: 99,
        tasks: Default::default(),
    }
}

#[test]
fn status_shows_what_the_agent_answers() {
    let dir = tempfile::tempdir().unwrap();
    let status = AgentStatus {
        pid: 4242,
        version: "9.9.9".to_owned(),
        state: AgentState::SteadyState,
        state_since_unix_ms: api::now_unix_ms(),
        uptime_secs: 3_700,
        collectors: vec![
            collector("procmond-main", CollectorPhase::Running, Some(77)),
            collector("procmond-spare", CollectorPhase::Disabled, None),
        ],
        broker: BrokerStatus { socket: socket(dir.path()).display().to_string(), ..Default::default() },
        store: StoreStatus { events_committed: 1234, ..Default::default() },
        tasks: Default::default(),
        delivery: Vec::new(),
    };
    let _agent = FakeAgent::start(dir.path(), status);

    let run = cli(dir.path(), &["status", "--json"]);
    run.success();
    let json = run.json_lines();
    assert_eq!(json.len(), 1, "{}", run.describe());
    assert_eq!(json[0]["state"], "SteadyState", "{}", run.describe());
    assert_eq!(json[0]["pid"], 4242);
    let ids: Vec<&str> =
        json[0]["collectors"].as_array().unwrap().iter().map(|c| c["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["procmond-main", "procmond-spare"]);
    assert_eq!(json[0]["collectors"][0]["phase"], "running");
    assert_eq!(json[0]["store"]["events_committed"], 1234);

    let run = cli(dir.path(), &["status"]);
    run.success();
    for text in
        ["SteadyState", "procmond-main", "procmond-spare", "running", "disabled", "1234 events committed"]
    {
        assert!(run.stdout.contains(text), "{text}: {}", run.describe());
    }
}

#[test]
fn status_without_an_agent_on_the_bus_times_out_with_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(BrokerConfig::new(socket(dir.path()))).unwrap();
    let run = cli(dir.path(), &["status"]);
    assert_eq!(run.code, Some(2), "{}", run.describe());
    assert!(run.stderr.contains("did not answer in 3 s"), "{}", run.describe());
    broker.shutdown();
}

#[test]
fn events_are_filtered_and_printed_like_procmond_foreground() {
    let dir = tempfile::tempdir().unwrap();
    let _store = filled_store(dir.path());

    let run = cli(dir.path(), &["events"]);
    run.success();
    let all: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(all.len(), 4, "{}", run.describe());
    assert!(all[0].contains(" #1 started ") && all[0].contains("name=\"sshd\""), "{}", run.describe());
    assert!(all[3].contains(" #4 started ") && all[3].contains(" seq=4 "), "{}", run.describe());

    let seqs = |args: &[&str]| -> Vec<u64> {
        let mut full = vec!["--json", "events"];
        full.extend_from_slice(args);
        let run = cli(dir.path(), &full);
        run.success();
        run.json_lines().iter().map(|v| v["daemoneye"]["seq"].as_u64().unwrap()).collect()
    };
    assert_eq!(seqs(&["--name", "bash"]), [2, 3]);
    // Globs, as `ps --name` takes them.
    assert_eq!(seqs(&["--name", "ba*"]), [2, 3]);
    assert_eq!(seqs(&["--name", "*s*"]), [1, 2, 3]);
    assert_eq!(seqs(&["--name", "?url"]), [4]);
    assert_eq!(seqs(&["--name", "ssh"]), Vec::<u64>::new());
    assert_eq!(seqs(&["--pid", "10"]), [1]);
    assert_eq!(seqs(&["--kind", "stopped"]), [3]);
    assert_eq!(seqs(&["--kind", "started", "--name", "bash"]), [2]);
    assert_eq!(seqs(&["--collector", "c2"]), Vec::<u64>::new());
    assert_eq!(seqs(&["--since", "1h"]), [1, 2, 3, 4]);
    // The newest N, oldest first.
    assert_eq!(seqs(&["--limit", "2"]), [3, 4]);
    assert_eq!(seqs(&["--kind", "started", "--limit", "2"]), [2, 4]);

    let run = cli(dir.path(), &["events", "--json", "--pid", "12"]);
    let json = run.json_lines();
    assert_eq!(json[0]["daemoneye"]["collector_id"], "c1", "{}", run.describe());
    assert_eq!(json[0]["daemoneye"]["store_id"], 4, "{}", run.describe());
    assert_eq!(json[0]["process"]["name"], "curl", "{}", run.describe());

    let long = "*".repeat(257);
    let run = cli(dir.path(), &["events", "--name", &long]);
    assert_eq!(run.code, Some(1), "{}", run.describe());
    assert!(run.stderr.contains("--name: name pattern longer than 256 characters"), "{}", run.describe());
}

/// An event of pid 20 observed at 2024-05-01T12:34:56.789Z, hashed, with
/// arguments that hold spaces and quotes.
fn detailed_event() -> EventEnvelope {
    let mut env = envelope("c1", 5, EventKind::Started, 20, "sh");
    env.event.observed_unix_ms = 1_714_566_896_789;
    env.event.sha256 = Some(HashOutcome::Sha256("0123456789abcdef".repeat(4)));
    let mut d = (*env.event.process.details).clone();
    d.argv = Ok(Argv {
        args: vec!["sh".into(), "-c".into(), "echo 'a b'".into(), String::new()],
        truncated: false,
    });
    d.exe = Err(Unavailable::NotPermitted);
    env.event.process.details = std::sync::Arc::new(d);
    env
}

#[test]
fn event_lines_show_local_time_the_store_id_the_whole_hash_and_each_argument() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = filled_store(dir.path());
    store.insert_batch(&[detailed_event()]).unwrap();
    // +05:30 all year, as a POSIX rule.
    let out = command(dir.path(), &["events", "--pid", "20"]).env("TZ", "IST-5:30").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    let line = text.lines().next().unwrap_or_default();
    assert!(line.starts_with("2024-05-01T18:04:56.789+05:30 #5 started "), "{line}");
    assert!(line.contains(&format!(" sha256={} ", "0123456789abcdef".repeat(4))), "{line}");
    assert!(line.contains(" exe=-(not permitted) "), "{line}");
    assert!(line.ends_with(r#" argv=sh -c 'echo '\''a b'\''' ''"#), "{line}");
}

#[test]
fn event_json_is_flat_ecs_with_the_reason_for_each_missing_value() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = filled_store(dir.path());
    store.insert_batch(&[detailed_event()]).unwrap();
    let run = cli(dir.path(), &["events", "--json", "--pid", "20"]);
    run.success();
    for shape in ["\"Ok\"", "\"Err\"", "\"Sha256\"", "NotPermitted", "\"Started\""] {
        assert!(!run.stdout.contains(shape), "{shape}: {}", run.describe());
    }
    let v = &run.json_lines()[0];
    assert_eq!(v["@timestamp"], "2024-05-01T12:34:56.789Z", "{v}");
    assert_eq!(v["event"]["action"], "started", "{v}");
    assert_eq!(v["event"]["kind"], "event", "{v}");
    assert_eq!(v["process"]["pid"], 20, "{v}");
    assert_eq!(v["process"]["parent"]["pid"], 1, "{v}");
    assert_eq!(v["process"]["args"], serde_json::json!(["sh", "-c", "echo 'a b'", ""]), "{v}");
    assert_eq!(v["process"]["hash"]["sha256"], "0123456789abcdef".repeat(4), "{v}");
    assert!(v["process"]["executable"].is_null(), "{v}");
    assert_eq!(v["daemoneye"]["missing"]["process.executable"], "not_permitted", "{v}");
    assert_eq!(v["user"]["id"], "1000", "{v}");
    assert_eq!(v["daemoneye"]["store_id"], 5, "{v}");
}

#[test]
fn events_without_a_store_name_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let run = cli(dir.path(), &["events"]);
    assert_eq!(run.code, Some(1), "{}", run.describe());
    assert!(run.stderr.contains(&dir.path().join("events.db").display().to_string()), "{}", run.describe());
    assert!(run.stderr.contains("has not stored anything yet"), "{}", run.describe());
}

#[test]
fn events_follow_prints_new_events_from_the_bus_once() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(BrokerConfig::new(socket(dir.path()))).unwrap();
    let mut store = EventStore::open(&dir.path().join("events.db")).unwrap();
    store.insert_batch(&[envelope("c1", 1, EventKind::Started, 10, "sshd")]).unwrap();

    let mut child = command(dir.path(), &["events", "--follow", "--json", "--name", "sshd"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (stdout, _out_thread) = lines(child.stdout.take().unwrap(), "cli-stdout");
    let (stderr, _err_thread) = lines(child.stderr.take().unwrap(), "cli-stderr");
    let _child = KillOnDrop(child);

    // The stored event. The CLI subscribes before it reads the store, so
    // from here on it sees what is published.
    let first: serde_json::Value = serde_json::from_str(&next_line(&stdout, "stored event")).unwrap();
    assert_eq!(first["daemoneye"]["seq"], 1);

    let collector = Client::connect(ClientConfig::new(socket(dir.path()), "c1")).unwrap();
    assert!(collector.wait_connected(WAIT));
    let publish = |env: &EventEnvelope| {
        collector.publish_confirmed(env.event.kind.topic(), &env.encode()).unwrap();
    };
    // Ignored: a replay of what was printed, another name, and an event
    // this client may not speak for.
    publish(&envelope("c1", 1, EventKind::Started, 10, "sshd"));
    publish(&envelope("c1", 2, EventKind::Started, 11, "bash"));
    publish(&envelope("c2", 5, EventKind::Started, 10, "sshd"));
    publish(&envelope("c1", 3, EventKind::Stopped, 10, "sshd"));
    let next: serde_json::Value = serde_json::from_str(&next_line(&stdout, "followed event")).unwrap();
    let at = &next["daemoneye"];
    assert_eq!((at["collector_id"].as_str(), at["seq"].as_u64()), (Some("c1"), Some(3)), "{next}");
    assert_eq!(next["event"]["action"], "stopped");

    // The agent goes away: the CLI says so once and keeps waiting.
    collector.close();
    broker.shutdown();
    let mut said = Vec::new();
    while !said.last().is_some_and(|l: &String| l.contains("agent gone, waiting")) {
        said.push(stderr.recv_timeout(WAIT).unwrap_or_else(|_| panic!("no \"agent gone\" in {said:?}")));
    }
    assert!(stdout.try_recv().is_err());
}

#[test]
fn events_follow_before_the_agent_shows_what_is_stored_and_waits_for_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = EventStore::open(&dir.path().join("events.db")).unwrap();
    store.insert_batch(&[envelope("c1", 1, EventKind::Started, 10, "sshd")]).unwrap();

    // No agent: no socket yet.
    let mut child = command(dir.path(), &["events", "--follow", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (stdout, _out_thread) = lines(child.stdout.take().unwrap(), "cli-stdout");
    let (stderr, _err_thread) = lines(child.stderr.take().unwrap(), "cli-stderr");
    let mut child = KillOnDrop(child);
    let first: serde_json::Value = serde_json::from_str(&next_line(&stdout, "stored event")).unwrap();
    assert_eq!(first["daemoneye"]["seq"], 1);
    let said = next_line(&stderr, "the wait");
    assert!(said.contains("agent not running at") && said.contains("waiting for the agent"), "{said}");
    assert!(child.0.try_wait().unwrap().is_none(), "it must wait, not exit");

    // Stored while nobody listened (the agent starting, collectors
    // replaying), then the agent comes up and a new event is published.
    store.insert_batch(&[envelope("c1", 2, EventKind::Started, 11, "bash")]).unwrap();
    let broker = Broker::start(BrokerConfig::new(socket(dir.path()))).unwrap();
    let up = next_line(&stderr, "agent up");
    assert!(up.contains("agent up at"), "{up}");
    let caught_up: serde_json::Value = serde_json::from_str(&next_line(&stdout, "caught-up event")).unwrap();
    assert_eq!(caught_up["daemoneye"]["seq"], 2, "{caught_up}");
    assert_eq!(caught_up["daemoneye"]["store_id"], 2, "{caught_up}");
    let collector = Client::connect(ClientConfig::new(socket(dir.path()), "c1")).unwrap();
    assert!(collector.wait_connected(WAIT));
    let env = envelope("c1", 3, EventKind::Stopped, 11, "bash");
    collector.publish_confirmed(env.event.kind.topic(), &env.encode()).unwrap();
    let live: serde_json::Value = serde_json::from_str(&next_line(&stdout, "live event")).unwrap();
    assert_eq!(live["daemoneye"]["seq"], 3, "{live}");
    collector.close();
    broker.shutdown();
}

#[test]
fn alerts_are_read_from_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = filled_store(dir.path());
    let conn = store.connection();
    conn.execute_batch(daemoneye_agent::rules::ALERTS_SCHEMA).unwrap();
    let now = i64::try_from(api::now_unix_ms()).unwrap();
    for (rule, severity, pid, name, raised) in [
        ("exe-in-temp-dir", "high", 10, "sshd", now - 7_200_000),
        ("deleted-exe-running", "medium", 11, "bash", now - 1_000),
        ("root-from-user-writable-dir", "critical", 12, "curl", now),
    ] {
        conn.execute(
            "INSERT INTO alerts (rule, severity, description, event_id, collector_id, pid, name, exe,
                                 command_line, observed_ms, raised_ms)
             VALUES (?1, ?2, 'd', ?3, 'c1', ?3, ?4, '/tmp/x', NULL, ?5, ?5)",
            rusqlite::params![rule, severity, pid, name, raised],
        )
        .unwrap();
    }

    let rules = |args: &[&str]| -> Vec<String> {
        let mut full = vec!["alerts", "--json"];
        full.extend_from_slice(args);
        let run = cli(dir.path(), &full);
        run.success();
        run.json_lines().iter().map(|v| v["rule"].as_str().unwrap().to_owned()).collect()
    };
    assert_eq!(rules(&[]), ["exe-in-temp-dir", "deleted-exe-running", "root-from-user-writable-dir"]);
    assert_eq!(rules(&["--severity", "high"]), ["exe-in-temp-dir", "root-from-user-writable-dir"]);
    assert_eq!(rules(&["--since", "1h"]), ["deleted-exe-running", "root-from-user-writable-dir"]);
    assert_eq!(rules(&["--rule", "exe-in-temp-dir"]), ["exe-in-temp-dir"]);
    assert_eq!(rules(&["--limit", "1"]), ["root-from-user-writable-dir"]);

    let run = cli(dir.path(), &["alerts"]);
    run.success();
    let text: Vec<&str> = run.stdout.lines().collect();
    assert!(text[0].starts_with("TIME (UTC)") && text[0].contains("COLLECTOR"), "{}", run.describe());
    assert_eq!(text.len(), 4, "{}", run.describe());
    assert!(text[3].contains("critical") && text[3].contains("curl") && text[3].contains("/tmp/x"));
}

#[test]
fn bad_flag_values_are_refused_with_the_value_named() {
    let dir = tempfile::tempdir().unwrap();
    for (args, said) in [
        (&["events", "--since", "xyz"][..], "\"xyz\" is not a duration"),
        (&["events", "--kind", "foo"][..], "possible values: started, stopped, modified"),
        (&["alerts", "--severity", "extreme"][..], "possible values: low, medium, high, critical"),
        (&["events", "--pid", "many"][..], "invalid value 'many' for '--pid <N>'"),
        (&["--log-level", "loud", "status"][..], "\"loud\" is not one of"),
    ] {
        let run = cli(dir.path(), args);
        assert_ne!(run.code, Some(0), "{}", run.describe());
        assert!(run.stderr.contains(said), "{said}: {}", run.describe());
    }
}

#[test]
fn rules_are_listed_and_validated_from_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.yaml");
    let config_arg = config.to_str().unwrap();
    std::fs::write(
        &config,
        "rules:\n\
         \x20 - {name: shells, severity: low, sql: \"SELECT id FROM new_events WHERE name = 'sh'\"}\n\
         \x20 - {name: off, severity: low, sql: 'DELETE FROM alerts', enabled: false}\n",
    )
    .unwrap();
    let run = cli(dir.path(), &["--config", config_arg, "rules", "list", "--json"]);
    run.success();
    let rows = run.json_lines();
    let builtins = daemoneye_agent::rules::DEFAULT_RULES.len();
    assert_eq!(rows.len(), builtins + 2, "{}", run.describe());
    assert_eq!(rows[builtins]["name"], "shells");
    assert_eq!(rows[builtins]["source"], "config");
    assert_eq!(rows[builtins + 1]["enabled"], false);

    // The disabled rule is not run, so not checked.
    let run = cli(dir.path(), &["--config", config_arg, "rules", "validate"]);
    run.success();
    assert!(run.stdout.contains("OK     shells"), "{}", run.describe());
    assert!(run.stdout.contains("OK     exe-in-temp-dir"), "{}", run.describe());
    assert!(!run.stdout.contains(" off"), "{}", run.describe());

    // Checked in memory: a temporary directory that does not exist (or is
    // read-only, as under systemd's ProtectSystem=strict) is not needed.
    let out = command(dir.path(), &["--config", config_arg, "rules", "validate"])
        .env("TMPDIR", dir.path().join("no-such-tmp"))
        .output()
        .unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{said}");
    assert!(said.contains("OK     shells"), "{said}");

    std::fs::write(
        &config,
        "default_rules: false\n\
         rules:\n\
         \x20 - {name: writer, severity: high, sql: 'DELETE FROM alerts'}\n\
         \x20 - {name: typo, severity: high, sql: 'SELECT id FROM no_such_table'}\n\
         \x20 - {name: fine, severity: high, sql: 'SELECT id FROM new_events'}\n",
    )
    .unwrap();
    let run = cli(dir.path(), &["--config", config_arg, "rules", "validate"]);
    assert_eq!(run.code, Some(1), "{}", run.describe());
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{}", run.describe());
    assert!(lines[0].starts_with("ERROR  writer: must be a SELECT"), "{}", run.describe());
    assert!(
        lines[1].starts_with("ERROR  typo: ") && lines[1].contains("no_such_table"),
        "{}",
        run.describe()
    );
    assert_eq!(lines[2], "OK     fine");
    assert!(run.stderr.contains("2 of 3 active rules failed validation"), "{}", run.describe());

    let run = cli(dir.path(), &["--config", config_arg, "--json", "rules", "validate"]);
    assert_eq!(run.code, Some(1), "{}", run.describe());
    let verdicts = run.json_lines();
    assert_eq!(verdicts[0]["ok"], false);
    assert_eq!(verdicts[2], serde_json::json!({"rule": "fine", "ok": true, "error": null}));
}
