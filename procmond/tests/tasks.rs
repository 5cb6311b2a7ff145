//! Tasks through a real broker: the library actor with a fake process
//! list behind a `procmond-tasks` service (snapshots and their filters,
//! inspect, hash and the hash cache, malformed payloads, a busy or silent
//! actor), and two procmond binaries in one queue group splitting tasks.
// The harness (support/) runs a broker, whose transport is Unix sockets.
#![cfg(unix)]

mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use daemoneye_bus::{Broker, Client, ClientConfig};
use daemoneye_contract::control::{
    self, ConnectionStatus, FileHash, HealthData, ProcessDetail, ProcessList, RpcRequest, SnapshotFilter,
    TaskRequest, TaskResponse, TaskResult, TaskStatus,
};
use daemoneye_contract::event::{EventEnvelope, HashOutcome, ProcessEvent};
use daemoneye_platform::{Argv, Credentials, ProcessDetails, ProcessRecord, Unavailable};
use procmond::actor::{ActorHandle, ActorOptions, ActorSender, EventSink, SinkError, SinkStatus};
use procmond::config::CollectorConfig;
use procmond::registration::COLLECTOR_TYPE;
use procmond::task::{TaskCounters, TaskService, TaskServiceConfig};
use procmond::testing::{FakeSource, record};
use sha2::{Digest, Sha256};
use support::{FakeAgent, Procmond, broker, socket_path, wait_until};

const T: Duration = Duration::from_secs(10);

/// A sink that forgets every event: these tests look at tasks only.
struct NullSink;

impl EventSink for NullSink {
    fn submit(&mut self, _: Vec<ProcessEvent>) -> Result<Vec<EventEnvelope>, SinkError> {
        Ok(Vec::new())
    }
    fn status(&self) -> SinkStatus {
        SinkStatus {
            connection: ConnectionStatus::Connected,
            buffer_level_percent: 0.0,
            unacknowledged: 0,
            published: 0,
        }
    }
    fn set_max_in_flight(&mut self, _: usize) {}
    fn flush(&mut self, _: Duration) -> Result<(), String> {
        Ok(())
    }
}

/// The library actor over a [`FakeSource`], with its own bus client and
/// task service.
struct Collector {
    tx: ActorSender,
    source: FakeSource,
    service: Option<TaskService>,
    actor: Option<ActorHandle>,
    _client: Arc<Client>,
}

impl Collector {
    fn start(
        socket: &Path,
        id: &str,
        records: Vec<ProcessRecord>,
        tweak: impl FnOnce(&mut CollectorConfig),
    ) -> Self {
        let mut cfg = CollectorConfig::with_data_dir("/nonexistent-unused");
        cfg.collector_id = id.to_owned();
        cfg.interval = Duration::from_millis(50);
        // The fake records name executables that do not exist here.
        cfg.lifecycle.exe_changes = false;
        tweak(&mut cfg);
        let source = FakeSource::new();
        source.set(records);
        let counters = Arc::new(TaskCounters::default());
        let opts = ActorOptions {
            interval_floor: Duration::from_millis(10),
            tasks: Some(counters.clone()),
            ..Default::default()
        };
        let inbox = ActorHandle::channel();
        let tx = inbox.0.clone();
        let actor =
            ActorHandle::spawn(cfg, Box::new(source.clone()), Box::new(NullSink), inbox, opts).unwrap();
        let client = Arc::new(Client::connect(ClientConfig::new(socket, id)).unwrap());
        let service =
            TaskService::start(client.clone(), TaskServiceConfig::new(id), tx.clone(), counters).unwrap();
        Collector { tx, source, service: Some(service), actor: Some(actor), _client: client }
    }

    fn health(&self) -> HealthData {
        self.tx.health(T).unwrap()
    }

    /// Starts collecting and waits for the first cycle to end.
    fn begin(&self) {
        self.tx.begin_monitoring().unwrap();
        assert!(wait_until(T, || self.health().cycles >= 1), "a cycle ran");
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        drop(self.service.take());
        let _ = self.tx.graceful_shutdown(T);
        if let Some(actor) = self.actor.take() {
            actor.join();
        }
    }
}

/// A broker and the client that plays the agent.
struct Bus {
    dir: tempfile::TempDir,
    _broker: Broker,
    agent: Client,
}

impl Bus {
    fn start() -> Bus {
        let dir = tempfile::tempdir().unwrap();
        let broker = broker(dir.path());
        let agent = Client::connect(ClientConfig::new(
            socket_path(dir.path()),
            daemoneye_contract::ids::AGENT_CLIENT_ID,
        ))
        .unwrap();
        assert!(agent.wait_connected(T));
        Bus { dir, _broker: broker, agent }
    }

    fn socket(&self) -> PathBuf {
        socket_path(self.dir.path())
    }

    fn ask_raw(&self, payload: &[u8]) -> TaskResponse {
        let reply = self.agent.request(&control::task_topic(COLLECTOR_TYPE), payload, T).expect("an answer");
        control::decode(&reply.payload).expect("the answer decodes")
    }

    fn ask(&self, request: &TaskRequest) -> TaskResponse {
        self.ask_raw(&control::encode(request))
    }

    /// Waits until some collector answers tasks (the queue subscription
    /// reaches the broker after the service starts).
    fn wait_serving(&self) {
        let probe = control::encode(&TaskRequest::Inspect { pid: u32::MAX });
        let topic = control::task_topic(COLLECTOR_TYPE);
        assert!(
            wait_until(T, || self.agent.request(&topic, &probe, Duration::from_millis(500)).is_ok()),
            "a collector serves tasks"
        );
    }
}

fn with_details(mut r: ProcessRecord, f: impl FnOnce(&mut ProcessDetails)) -> ProcessRecord {
    let mut d = ProcessDetails::clone(&r.details);
    f(&mut d);
    r.details = Arc::new(d);
    r
}

/// A process of `user` (`uid`) running `exe` with `args`.
fn process(pid: u32, name: &str, user: &str, uid: u32, exe: &str, args: &[&str]) -> ProcessRecord {
    with_details(record(pid, 100 + u64::from(pid), name), |d| {
        d.user = Ok(user.to_owned());
        d.credentials = Ok(Credentials { uid, euid: uid, gid: uid, egid: uid });
        d.exe = Ok(PathBuf::from(exe));
        d.argv = Ok(Argv { args: args.iter().map(|a| (*a).to_owned()).collect(), truncated: false });
    })
}

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

fn list(r: &TaskResponse) -> &ProcessList {
    match &r.result {
        Some(TaskResult::Snapshot(list)) if r.status == TaskStatus::Ok => list,
        _ => panic!("not a snapshot: {r:?}"),
    }
}

fn pids(r: &TaskResponse) -> Vec<u32> {
    list(r).processes.iter().map(|p| p.pid).collect()
}

fn snapshot(filter: SnapshotFilter) -> TaskRequest {
    TaskRequest::Snapshot(filter)
}

#[test]
fn snapshot_filters_by_user_by_name_pattern_and_by_pid() {
    let bus = Bus::start();
    let records = vec![
        process(1, "systemd", "root", 0, "/usr/lib/systemd/systemd", &["/sbin/init"]),
        process(2, "sshd", "root", 0, "/usr/sbin/sshd", &["sshd: /usr/sbin/sshd -D"]),
        process(3, "bash", "alice", 1000, "/usr/bin/bash", &["-bash"]),
        process(4, "bash", "bob", 1001, "/usr/bin/bash", &["bash"]),
        process(
            5,
            "python3",
            "alice",
            1000,
            "/usr/bin/python3.12",
            &["python3", "app.py", "--password=hunter2"],
        ),
        // The kernel cuts names at 15 bytes; the executable's is whole.
        process(6, "chromium-browse", "alice", 1000, "/usr/lib/chromium/chromium-browser", &["chromium"]),
    ];
    let c = Collector::start(&bus.socket(), "c1", records, |_| {});
    bus.wait_serving();

    // Nothing is enumerated before BeginMonitoring: no list to give.
    let early = bus.ask(&snapshot(SnapshotFilter::default()));
    assert_eq!(early.status, TaskStatus::Failed, "{early:?}");
    assert!(early.message.as_deref().unwrap_or("").contains("no process list"), "{early:?}");
    assert!(early.retry, "another collector may have a list: {early:?}");
    c.begin();

    let all = bus.ask(&snapshot(SnapshotFilter::default()));
    assert_eq!(all.collector_id, "c1");
    assert_eq!(pids(&all), [1, 2, 3, 4, 5, 6]);
    assert!(list(&all).observed_unix_ms > 0);
    let py = &list(&all).processes[4];
    assert_eq!((py.ppid, py.user.as_deref(), py.uid, py.euid), (1, Ok("alice"), Ok(1000), Ok(1000)));
    assert_eq!(py.exe.as_deref(), Ok("/usr/bin/python3.12"));
    let line = py.command_line.as_deref().unwrap();
    assert!(line.starts_with("python3 app.py") && !line.contains("hunter2"), "sanitized: {line}");

    let by = |user: &str| SnapshotFilter { user: Some(user.into()), ..Default::default() };
    assert_eq!(pids(&bus.ask(&snapshot(by("alice")))), [3, 5, 6]);
    assert_eq!(pids(&bus.ask(&snapshot(by("1001")))), [4]);
    assert_eq!(pids(&bus.ask(&snapshot(by("0")))), [1, 2]);
    assert_eq!(pids(&bus.ask(&snapshot(by("mallory")))), [0u32; 0]);

    let named = |p: &str| SnapshotFilter { name_pattern: Some(p.into()), ..Default::default() };
    assert_eq!(pids(&bus.ask(&snapshot(named("?ash")))), [3, 4]);
    assert_eq!(pids(&bus.ask(&snapshot(named("*sh*")))), [2, 3, 4]);
    assert_eq!(pids(&bus.ask(&snapshot(named("chromium-browser")))), [6]);
    assert_eq!(pids(&bus.ask(&snapshot(named("python3.1?")))), [5]);
    assert_eq!(pids(&bus.ask(&snapshot(named("nothing*like*it")))), [0u32; 0]);

    let some = SnapshotFilter { pids: vec![5, 4, 99], ..Default::default() };
    assert_eq!(pids(&bus.ask(&snapshot(some))), [4, 5]);
    let every =
        SnapshotFilter { user: Some("alice".into()), name_pattern: Some("*a*".into()), pids: vec![3, 4, 5] };
    assert_eq!(pids(&bus.ask(&snapshot(every))), [3]);

    let too_long = named(&"*".repeat(control::MAX_NAME_PATTERN + 1));
    let refused = bus.ask(&snapshot(too_long));
    assert_eq!(refused.status, TaskStatus::Failed);
    assert!(refused.message.as_deref().unwrap_or("").contains("invalid filter"), "{refused:?}");

    // The list is the last cycle's: a process gone from it is gone here.
    let cycles = c.health().cycles;
    c.source.edit(|l| l.retain(|r| r.pid != 4));
    assert!(wait_until(T, || c.health().cycles > cycles + 1), "cycles ran");
    assert_eq!(pids(&bus.ask(&snapshot(SnapshotFilter::default()))), [1, 2, 3, 5, 6]);
}

#[test]
fn inspect_gives_the_full_record_and_hash_and_a_missing_pid_is_not_found() {
    let bus = Bus::start();
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("tool");
    let content: Vec<u8> = (0..100_000u32).map(|i| (i * 31 % 251) as u8).collect();
    std::fs::write(&exe, &content).unwrap();
    let identity = daemoneye_platform::file_identity(&std::fs::metadata(&exe).unwrap()).unwrap();
    // A pid no system has: the hasher reads the file through its path.
    let pid = u32::MAX - 7;
    let tool =
        with_details(process(pid, "tool", "alice", 1000, "/x", &["tool", "--token", "s3cr3t-value"]), |d| {
            d.exe = Ok(exe.clone());
            d.exe_file = Ok(identity);
        });
    let c = Collector::start(&bus.socket(), "c1", vec![record(1, 1, "init"), tool], |_| {});
    bus.wait_serving();
    c.begin();

    let answer = bus.ask(&TaskRequest::Inspect { pid });
    assert_eq!((answer.status, answer.collector_id.as_str()), (TaskStatus::Ok, "c1"), "{answer:?}");
    let Some(TaskResult::Inspect(detail)) = &answer.result else { panic!("{answer:?}") };
    let ProcessDetail { observed_unix_ms, process, sha256 } = detail.as_ref();
    assert!(*observed_unix_ms > 0);
    assert_eq!((process.pid, process.name.as_str()), (pid, "tool"));
    assert_eq!(process.details.exe.as_ref().ok(), Some(&exe));
    assert_eq!(*sha256, HashOutcome::Sha256(sha256_hex(&content)));
    let args = process.details.argv.as_ref().unwrap().args.join(" ");
    assert!(!args.contains("s3cr3t-value"), "sanitized: {args}");
    // As events carry it: no cwd without enhanced metadata.
    assert_eq!(process.details.cwd, Err(Unavailable::NotCollected));
    assert_eq!(c.health().hashes_computed, 1);

    // Asked again: the digest comes from the cache.
    let again = bus.ask(&TaskRequest::Inspect { pid });
    let Some(TaskResult::Inspect(detail)) = &again.result else { panic!("{again:?}") };
    assert_eq!(detail.sha256, HashOutcome::Sha256(sha256_hex(&content)));
    assert_eq!(c.health().hashes_computed, 1, "no second read");

    let missing = bus.ask(&TaskRequest::Inspect { pid: 4242 });
    assert_eq!((missing.status, missing.result.is_none()), (TaskStatus::NotFound, true), "{missing:?}");
    assert!(missing.message.as_deref().unwrap_or("").contains("4242"), "{missing:?}");
}

#[test]
fn hash_answers_from_the_cache_and_says_why_it_cannot() {
    let bus = Bus::start();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("data.bin");
    let content: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 253) as u8).collect();
    std::fs::write(&file, &content).unwrap();
    let big = dir.path().join("big.bin");
    std::fs::write(&big, vec![0u8; 600_000]).unwrap();
    // Hashing is off for events; tasks hash anyway.
    let c = Collector::start(&bus.socket(), "c1", vec![record(1, 1, "init")], |cfg| {
        cfg.hash.max_file_bytes = 500_000;
    });
    bus.wait_serving();
    let ask_hash = |path: &Path| bus.ask(&TaskRequest::Hash { path: path.to_str().unwrap().to_owned() });

    // Hash needs no process list: it is served before BeginMonitoring.
    let first = ask_hash(&file);
    assert_eq!(first.status, TaskStatus::Ok, "{first:?}");
    let expected = FileHash {
        path: file.to_str().unwrap().to_owned(),
        size: content.len() as u64,
        sha256: HashOutcome::Sha256(sha256_hex(&content)),
    };
    assert_eq!(first.result, Some(TaskResult::Hash(expected.clone())));
    assert_eq!(c.health().hashes_computed, 1);
    let second = ask_hash(&file);
    assert_eq!(second.result, Some(TaskResult::Hash(expected)));
    assert_eq!(c.health().hashes_computed, 1, "the second hash read nothing");

    let missing = ask_hash(&dir.path().join("nope"));
    assert_eq!(missing.status, TaskStatus::NotFound, "{missing:?}");
    let under_a_file = ask_hash(&file.join("child"));
    assert_eq!(under_a_file.status, TaskStatus::NotFound, "{under_a_file:?}");

    let large = ask_hash(&big);
    assert_eq!(large.status, TaskStatus::Failed, "{large:?}");
    assert!(large.message.as_deref().unwrap_or("").contains("over the hashing cap"), "{large:?}");
    assert!(
        matches!(
            &large.result,
            Some(TaskResult::Hash(FileHash {
                sha256: HashOutcome::TooLarge { size: 600_000, cap: 500_000 },
                ..
            }))
        ),
        "{large:?}"
    );

    let relative = bus.ask(&TaskRequest::Hash { path: "etc/passwd".into() });
    assert_eq!(relative.status, TaskStatus::Failed);
    assert!(relative.message.as_deref().unwrap_or("").contains("absolute"), "{relative:?}");
    let directory = ask_hash(dir.path());
    assert!(directory.message.as_deref().unwrap_or("").contains("not a regular file"), "{directory:?}");
    // A FIFO with no writer: refused at once, never opened.
    let fifo = dir.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let started = Instant::now();
    let piped = ask_hash(&fifo);
    assert_eq!(piped.status, TaskStatus::Failed);
    assert!(piped.message.as_deref().unwrap_or("").contains("not a regular file"), "{piped:?}");
    assert!(started.elapsed() < Duration::from_secs(5));

    // A symbolic link swapped in for the file, to a FIFO whose writer
    // waits in `open` for a reader: refused at once, and the FIFO is never
    // opened (the writer still waits).
    let fifo2 = dir.path().join("fifo2");
    nix::unistd::mkfifo(&fifo2, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let opened = Arc::new(AtomicBool::new(false));
    let writer = {
        let (fifo2, opened) = (fifo2.clone(), opened.clone());
        std::thread::spawn(move || {
            let f = std::fs::OpenOptions::new().write(true).open(&fifo2).unwrap();
            opened.store(true, Ordering::SeqCst);
            drop(f);
        })
    };
    let swapped = dir.path().join("swapped");
    std::fs::write(&swapped, b"innocent").unwrap();
    std::fs::remove_file(&swapped).unwrap();
    std::os::unix::fs::symlink(&fifo2, &swapped).unwrap();
    let started = Instant::now();
    let linked = ask_hash(&swapped);
    assert!(started.elapsed() < Duration::from_secs(5), "answered at once");
    assert_eq!(linked.status, TaskStatus::Failed, "{linked:?}");
    let text = linked.message.clone().unwrap_or_default();
    assert!(text.contains("symbolic link") && text.contains(&fifo2.display().to_string()), "{linked:?}");
    assert!(linked.result.is_none(), "{linked:?}");
    // And straight at the FIFO: refused by type, still never opened.
    assert!(ask_hash(&fifo2).message.as_deref().unwrap_or("").contains("is a FIFO, not a regular file"));
    std::thread::sleep(Duration::from_millis(200));
    assert!(!opened.load(Ordering::SeqCst), "the FIFO was opened for reading");
    drop(std::fs::File::open(&fifo2).unwrap()); // lets the writer go
    writer.join().unwrap();
    // A link to a regular file is not followed either; devices are refused.
    let to_file = dir.path().join("to-file");
    std::os::unix::fs::symlink(&file, &to_file).unwrap();
    let linked = ask_hash(&to_file);
    assert_eq!(linked.status, TaskStatus::Failed, "{linked:?}");
    assert!(linked.message.as_deref().unwrap_or("").contains("symbolic link"), "{linked:?}");
    for dev in ["/dev/zero", "/dev/null"] {
        let d = bus.ask(&TaskRequest::Hash { path: dev.into() });
        assert_eq!(d.status, TaskStatus::Failed, "{d:?}");
        assert!(
            d.message.as_deref().unwrap_or("").contains("is a character device, not a regular file"),
            "{d:?}"
        );
    }

    // Unreadable: only meaningful without root's override.
    if !nix::unistd::geteuid().is_root() {
        use std::os::unix::fs::PermissionsExt;
        let secret = dir.path().join("secret");
        std::fs::write(&secret, b"x").unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o000)).unwrap();
        assert_eq!(ask_hash(&secret).status, TaskStatus::NotPermitted);
    }
    assert_eq!(c.health().hashes_computed, 1, "refusals read nothing");
}

#[test]
fn a_malformed_task_is_answered_failed_and_the_next_is_served() {
    let bus = Bus::start();
    let c = Collector::start(&bus.socket(), "c1", vec![record(1, 1, "init"), record(2, 2, "sshd")], |_| {});
    bus.wait_serving();
    c.begin();
    let before = c.health();

    let not_a_task = control::encode(&RpcRequest::HealthCheck);
    let garbage: [&[u8]; 3] = [&[0xff, 0xff, 0xff, 0x07], &[], &not_a_task[..]];
    for payload in garbage {
        let answer = bus.ask_raw(payload);
        assert_eq!((answer.status, answer.collector_id.as_str()), (TaskStatus::Failed, "c1"), "{answer:?}");
        assert!(answer.message.as_deref().unwrap_or("").starts_with("malformed task: "), "{answer:?}");
        assert!(answer.result.is_none());
    }
    let next = bus.ask(&snapshot(SnapshotFilter { pids: vec![2], ..Default::default() }));
    assert_eq!(pids(&next), [2], "still serving");

    // Counted once each answer is sent: the last count may follow its
    // answer by a moment.
    let counted =
        |h: &HealthData| (h.tasks_served - before.tasks_served, h.tasks_failed - before.tasks_failed);
    assert!(wait_until(T, || counted(&c.health()) == (4, 3)), "{:?}", counted(&c.health()));
    let after = c.health();
    assert!(after.task_latency_avg_us > 0, "{after:?}");
}

/// A full actor inbox is answered "busy" at once; an actor that does not
/// answer in time is answered with the timeout.
#[test]
fn a_busy_or_silent_actor_is_answered_failed() {
    let bus = Bus::start();
    // An inbox no actor drains.
    let (tx, rx) = ActorHandle::channel();
    for _ in 0..procmond::actor::INBOX_CAPACITY {
        tx.begin_monitoring().unwrap();
    }
    let client = Arc::new(Client::connect(ClientConfig::new(bus.socket(), "c1")).unwrap());
    let mut cfg = TaskServiceConfig::new("c1");
    cfg.actor_timeout = Duration::from_millis(200);
    let counters = Arc::new(TaskCounters::default());
    let service = TaskService::start(client, cfg, tx, counters.clone()).unwrap();
    bus.wait_serving();

    let started = Instant::now();
    let busy = bus.ask(&TaskRequest::Inspect { pid: 1 });
    assert_eq!(busy.status, TaskStatus::Failed);
    assert!(busy.message.as_deref().unwrap_or("").starts_with("busy"), "{busy:?}");
    assert!(busy.retry, "busy is worth another member: {busy:?}");
    assert!(started.elapsed() < Duration::from_secs(2), "refused without waiting");

    // Room in the inbox, nobody reading it.
    while rx.try_recv().is_ok() {}
    let silent = bus.ask(&TaskRequest::Inspect { pid: 1 });
    assert_eq!(silent.status, TaskStatus::Failed);
    assert!(silent.message.as_deref().unwrap_or("").contains("did not answer"), "{silent:?}");
    assert_eq!(counters.served(), counters.failed(), "every answer was a failure");

    // Leaving answers what was delivered and joins the thread.
    drop(service);
    drop(rx);
}

/// Two procmond daemons of one type share the task group: each task is
/// answered once, by one of them, and round robin splits them evenly. When
/// one leaves, the other takes every task.
#[test]
fn two_procmond_in_one_group_split_the_tasks_and_answer_each_once() {
    let dir = tempfile::tempdir().unwrap();
    let _broker = broker(dir.path());
    let socket = socket_path(dir.path());
    let agent = FakeAgent::start(&socket, &dir.path().join("agent.db"));
    let mut a = Procmond::start(dir.path(), Some(&socket), &["--collector-id", "pm-a"]);
    let mut b = Procmond::start(dir.path(), Some(&socket), &["--collector-id", "pm-b"]);
    assert!(wait_until(T, || agent.registrations() == 2), "both registered: {}\n{}", a.log(), b.log());
    agent.begin_monitoring();
    let cycled = |id: &str| {
        agent.rpc_ok(id) && agent.rpc(id, &RpcRequest::HealthCheck, T).health.is_some_and(|h| h.cycles >= 1)
    };
    assert!(wait_until(T, || cycled("pm-a") && cycled("pm-b")), "both collect: {}\n{}", a.log(), b.log());

    let topic = control::task_topic(COLLECTOR_TYPE);
    let me = std::process::id();
    let mine = control::encode(&snapshot(SnapshotFilter { pids: vec![me], ..Default::default() }));
    let ask = |payload: &[u8]| -> TaskResponse {
        let reply = agent.client.request(&topic, payload, T).expect("an answer");
        control::decode(&reply.payload).expect("the answer decodes")
    };
    // Both members are in the group once each has answered a task.
    let mut seen = std::collections::BTreeSet::new();
    assert!(
        wait_until(T, || {
            if let Ok(reply) = agent.client.request(&topic, &mine, Duration::from_millis(500))
                && let Ok(answer) = control::decode::<TaskResponse>(&reply.payload)
            {
                seen.insert(answer.collector_id);
            }
            seen.len() == 2
        }),
        "both serve: {seen:?}"
    );

    let served = |id: &str| agent.rpc(id, &RpcRequest::HealthCheck, T).health.unwrap().tasks_served;
    let before = [served("pm-a"), served("pm-b")];
    let file = dir.path().join("payload");
    std::fs::write(&file, b"abc").unwrap();
    let hash = control::encode(&TaskRequest::Hash { path: file.to_str().unwrap().to_owned() });
    let mut answered = [0u64; 2];
    for i in 0..40 {
        let answer = if i % 2 == 0 { ask(&mine) } else { ask(&hash) };
        assert_eq!(answer.status, TaskStatus::Ok, "{answer:?}");
        match &answer.result {
            Some(TaskResult::Snapshot(list)) => {
                assert_eq!(list.processes.iter().map(|p| p.pid).collect::<Vec<_>>(), [me]);
            }
            Some(TaskResult::Hash(h)) => assert_eq!(h.sha256, HashOutcome::Sha256(sha256_hex(b"abc"))),
            other => panic!("{other:?}"),
        }
        match answer.collector_id.as_str() {
            "pm-a" => answered[0] += 1,
            "pm-b" => answered[1] += 1,
            other => panic!("answered by {other}"),
        }
    }
    // Each task was served once (the collectors' own counts agree with the
    // answers), and in turn.
    let after = [served("pm-a"), served("pm-b")];
    assert_eq!([after[0] - before[0], after[1] - before[1]], answered);
    assert_eq!(answered, [20, 20]);

    // pm-a leaves (graceful shutdown): pm-b takes every task.
    let bye = agent.rpc("pm-a", &RpcRequest::GracefulShutdown, Duration::from_secs(30));
    assert_eq!(bye.status, control::RpcStatus::Ok, "{bye:?}");
    assert_eq!(a.wait_exit(T).and_then(|s| s.code()), Some(0), "{}", a.log());
    for _ in 0..6 {
        assert_eq!(ask(&hash).collector_id, "pm-b");
    }
    let bye = agent.rpc("pm-b", &RpcRequest::GracefulShutdown, Duration::from_secs(30));
    assert_eq!(bye.status, control::RpcStatus::Ok, "{bye:?}");
    assert_eq!(b.wait_exit(T).and_then(|s| s.code()), Some(0), "{}", b.log());
}
