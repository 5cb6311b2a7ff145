//! End-to-end tests that spawn the real DaemonEye binaries (agent, procmond,
//! cli) over real Unix sockets in temporary directories, kill them at the
//! worst moment and check that nothing is lost or doubled. The per-crate
//! tests live beside each crate; this crate holds the whole-system tests
//! (`tests/system.rs`) and their harness, here.
//!
//! The binaries are the ones `cargo test --workspace` builds into the
//! target directory (the agent's and procmond's own integration tests make
//! cargo build them); the harness finds them next to the test executable's
//! `deps/` directory and says how to build them when they are missing.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod forwarding;
pub mod frozen_v1;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crossbeam_channel::tick;
use daemoneye_agent::api::{self, AgentStatus, AgentTaskRequest, AgentTaskResponse};
use daemoneye_bus::{Client, ClientConfig};
use nix::sys::signal::Signal;
use nix::unistd::Pid;

/// A binary of the workspace, from the target directory of this test.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // <target>/<profile>/deps/<test>-<hash>
    let dir = exe.parent().and_then(Path::parent).expect("target profile dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run the tests with `cargo test --workspace` (which builds every binary), \
         or build it first with `cargo build -p procmond -p daemoneye-agent`",
        path.display()
    );
    path
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    let ticker = tick(Duration::from_millis(20));
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        let _ = ticker.recv();
    }
    cond()
}

/// Long enough for a 5 s collection cycle, its commit and some slack on a
/// loaded 2-core CI machine.
pub const CYCLE: Duration = Duration::from_secs(30);

/// Every collector's events are in the store exactly once, with every
/// sequence number from 1 to the highest, and acknowledged (within
/// [`CYCLE`]).
pub fn assert_exactly_once(sys: &System, ids: &[&str]) {
    let db = sys.database();
    let ok = wait_until(CYCLE, || {
        let s = store_summary(&db);
        let w = watermarks(&db);
        ids.iter().all(|id| {
            s.iter().any(|(c, n, exact)| c == id && *n > 0 && *exact)
                && w.iter().any(|(c, t)| c == id && s.iter().any(|(c2, n, _)| c2 == id && n == t))
        })
    });
    assert!(
        ok,
        "store (collector, events, exact): {:?}; watermarks {:?}\n{}",
        store_summary(&db),
        watermarks(&db),
        sys.tail()
    );
}

/// Polls `status` until what it returns satisfies `pred` or `timeout`
/// passes: whether it did, and the last status seen (if any).
pub fn poll_status(
    timeout: Duration,
    mut status: impl FnMut() -> Option<AgentStatus>,
    pred: impl Fn(&AgentStatus) -> bool,
) -> (bool, Option<AgentStatus>) {
    let mut last = None;
    let ok = wait_until(timeout, || {
        last = status();
        last.as_ref().is_some_and(&pred)
    });
    (ok, last)
}

/// Sends `sig` to a process this test started (by its own pid).
pub fn signal(pid: u32, sig: Signal) {
    let _ = nix::sys::signal::kill(Pid::from_raw(i32::try_from(pid).expect("pid")), sig);
}

/// Whether a process exists (and is not a zombie).
pub fn alive(pid: u32) -> bool {
    daemoneye_platform::process_alive(pid)
}

/// One collector in a test's agent.yaml.
pub struct CollectorDef {
    /// Its id.
    pub id: String,
    /// Its binary (procmond, or a wrapper).
    pub binary: PathBuf,
    /// Seconds the agent waits for its registration.
    pub startup_timeout_secs: u64,
    /// Its heartbeat period (3 missed start the escalation).
    pub heartbeat_interval_secs: u64,
    /// Its `args` in agent.yaml (default: a 5 s interval, debug logs).
    pub args: Vec<String>,
}

impl CollectorDef {
    /// A procmond with this id.
    pub fn procmond(id: &str) -> CollectorDef {
        CollectorDef::with_binary(id, bin("procmond"))
    }

    /// Another binary (a wrapper script) with this id.
    pub fn with_binary(id: &str, binary: PathBuf) -> CollectorDef {
        CollectorDef {
            id: id.to_owned(),
            binary,
            startup_timeout_secs: 20,
            heartbeat_interval_secs: 1,
            args: ["--interval", "5", "--log-level", "debug"].map(String::from).to_vec(),
        }
    }

    /// With these `args` instead of the default ones.
    pub fn args(mut self, args: &[&str]) -> CollectorDef {
        self.args = args.iter().map(|a| (*a).to_owned()).collect();
        self
    }

    /// With this heartbeat period (a test that stops a collector on
    /// purpose keeps the escalation away with a long one).
    pub fn heartbeat(mut self, secs: u64) -> CollectorDef {
        self.heartbeat_interval_secs = secs;
        self
    }
}

/// A test system: a temp dir with an agent.yaml, the agent as a child
/// (killed on drop, with the collectors it started, by their own pids).
pub struct System {
    /// The temp dir (config, data dir, logs).
    pub dir: tempfile::TempDir,
    /// The agent, when running.
    pub agent: Option<Child>,
    /// The agent's stdout and stderr (its log; the collectors' are in their data dirs).
    pub log: PathBuf,
    /// Client id counter for status requests.
    asked: u32,
    /// The `run_as` user's uid when the YAML sets one: the agent's files
    /// are then in `data/agent/`, and its broker is served by that uid.
    run_as: Option<u32>,
}

/// The YAML of a test agent: short heartbeats and escalation timeouts.
pub fn agent_yaml(data_dir: &Path, collectors: &[CollectorDef], extra: &str) -> String {
    let mut y = format!(
        "data_dir: {}\nlog_level: debug\nshutdown_timeout_secs: 10\n\
         escalation: {{health_check_timeout_secs: 1, graceful_shutdown_timeout_secs: 2, kill_timeout_secs: 2}}\n\
         collectors:\n",
        data_dir.display()
    );
    for c in collectors {
        // A flow sequence of double-quoted scalars: the arguments are the
        // test's own (no quote or backslash in them).
        let args: Vec<String> = c.args.iter().map(|a| format!("\"{a}\"")).collect();
        y.push_str(&format!(
            "  - id: {}\n    binary: {}\n    args: [{}]\n    \
             heartbeat_interval_secs: {}\n    startup_timeout_secs: {}\n    max_restarts: 10\n",
            c.id,
            c.binary.display(),
            args.join(", "),
            c.heartbeat_interval_secs,
            c.startup_timeout_secs
        ));
    }
    y.push_str(extra);
    y
}

impl System {
    /// Writes agent.yaml (with `extra` YAML appended) and starts the agent.
    pub fn start(collectors: &[CollectorDef], extra: &str) -> System {
        let mut s = System::create(collectors, extra);
        s.start_agent();
        s
    }

    /// Writes agent.yaml (with `extra` YAML appended) without starting the
    /// agent, so a test can lay out its data dir first (an older release's
    /// WAL or store); [`System::start_agent`] starts it.
    pub fn create(collectors: &[CollectorDef], extra: &str) -> System {
        let dir = tempfile::tempdir().expect("tempdir");
        let yaml = agent_yaml(&dir.path().join("data"), collectors, extra);
        std::fs::write(dir.path().join("agent.yaml"), yaml).expect("write agent.yaml");
        let run_as = extra.lines().find_map(|l| l.strip_prefix("run_as:")).map(|name| {
            let user =
                nix::unistd::User::from_name(name.trim()).expect("look up run_as").expect("run_as user");
            user.uid.as_raw()
        });
        System { log: dir.path().join("agent.log"), dir, agent: None, asked: 0, run_as }
    }

    /// The data dir.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The agent's own files: the data dir, or its `agent/` with `run_as`.
    pub fn agent_dir(&self) -> PathBuf {
        if self.run_as.is_some() { self.data_dir().join("agent") } else { self.data_dir() }
    }

    /// The broker socket.
    pub fn socket(&self) -> PathBuf {
        self.agent_dir().join("run").join("broker.sock")
    }

    /// The event store.
    pub fn database(&self) -> PathBuf {
        self.agent_dir().join("events.db")
    }

    /// A bus client configuration for this system's broker.
    fn client_config(&self, id: String) -> ClientConfig {
        let mut cfg = ClientConfig::new(self.socket(), id);
        cfg.server_uids.extend(self.run_as);
        cfg
    }

    /// Starts (or restarts) the agent; its stderr is appended to `log`.
    pub fn start_agent(&mut self) {
        let mut agent = Command::new(bin("daemoneye-agent"));
        agent.arg("--config").arg(self.dir.path().join("agent.yaml"));
        self.spawn_agent(agent);
    }

    /// Starts the agent with this command line instead, e.g. under a
    /// wrapper that ends by exec'ing the agent (so the child's pid, which
    /// [`System::stop`] and the drop signal, is the agent's); its stdout
    /// and stderr are appended to `log`.
    pub fn spawn_agent(&mut self, mut command: Command) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("log");
        let child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("{command:?} does not start: {e}"));
        self.agent = Some(child);
    }

    /// The agent's pid.
    pub fn agent_pid(&self) -> u32 {
        self.agent.as_ref().expect("agent running").id()
    }

    /// The agent's log so far, then each collector's own log.
    pub fn log(&self) -> String {
        let mut all = std::fs::read_to_string(&self.log).unwrap_or_default();
        for (id, text) in self.collector_logs() {
            all.push_str(&format!("--- collector {id}: collector.log ---\n{text}"));
        }
        all
    }

    /// Each collector's log (`<data dir>/collectors/<id>/collector.log`,
    /// where the agent sends its stdout and stderr), by id.
    pub fn collector_logs(&self) -> Vec<(String, String)> {
        let mut logs: Vec<(String, String)> = std::fs::read_dir(self.data_dir().join("collectors"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let text = std::fs::read_to_string(e.path().join("collector.log")).ok()?;
                Some((e.file_name().to_string_lossy().into_owned(), text))
            })
            .collect();
        logs.sort();
        logs
    }

    /// Asks the agent for its status over the bus (as a CLI would).
    pub fn status(&mut self) -> Option<AgentStatus> {
        if !self.socket().exists() {
            return None;
        }
        self.asked += 1;
        let id = format!("e2e-{}-{}", std::process::id(), self.asked);
        let client = Client::connect(self.client_config(id)).ok()?;
        if !client.wait_connected(Duration::from_secs(3)) {
            client.close();
            return None;
        }
        // In the current version, as the CLI asks (an empty request is
        // version 1's, answered without what later versions added).
        let request = daemoneye_contract::topic::STATUS.encode_request(&api::StatusRequest);
        let reply = client.request(api::STATUS_TOPIC, &request, Duration::from_secs(3));
        client.close();
        api::decode(&reply.ok()?.payload).ok()
    }

    /// Waits for a status that satisfies `pred`; panics with the last one
    /// and the log when it does not come.
    pub fn wait_status(
        &mut self,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&AgentStatus) -> bool,
    ) -> AgentStatus {
        let (ok, last) = poll_status(timeout, || self.status(), pred);
        assert!(
            ok,
            "{what}: not reached within {timeout:?}; last status {last:#?}\n--- log ---\n{}",
            self.tail()
        );
        last.expect("status")
    }

    /// The last 120 lines of the agent's log and the last 40 of each
    /// collector's.
    pub fn tail(&self) -> String {
        fn last(text: &str, n: usize) -> String {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        let mut out = last(&std::fs::read_to_string(&self.log).unwrap_or_default(), 120);
        for (id, text) in self.collector_logs() {
            out.push_str(&format!("\n--- collector {id}: collector.log ---\n{}", last(&text, 40)));
        }
        out
    }

    /// SIGTERM to the agent; waits for its exit and returns the status.
    pub fn stop(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let mut child = self.agent.take().expect("agent running");
        signal(child.id(), Signal::SIGTERM);
        let mut status = None;
        wait_until(timeout, || {
            status = child.try_wait().ok().flatten();
            status.is_some()
        });
        match status {
            Some(s) => s,
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the agent did not exit within {timeout:?} of SIGTERM\n{}", self.tail());
            }
        }
    }

    /// SIGKILL to the agent (its collectors keep running).
    pub fn kill_agent(&mut self) {
        if let Some(mut child) = self.agent.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// A bus client of this system's broker, as a local client (the CLI's
    /// permissions).
    pub fn client(&mut self) -> Client {
        self.asked += 1;
        let id = format!("e2e-{}-{}", std::process::id(), self.asked);
        let client = Client::connect(self.client_config(id)).expect("client");
        assert!(client.wait_connected(Duration::from_secs(10)), "no connection\n{}", self.tail());
        client
    }

    /// Runs `daemoneye-cli` against this system.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(bin("daemoneye-cli"))
            .arg("--config")
            .arg(self.dir.path().join("agent.yaml"))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("cli runs")
    }

    /// Pids of the collectors' processes, from their lock files.
    pub fn collector_pids(&self) -> Vec<u32> {
        let mut pids = Vec::new();
        let Ok(dirs) = std::fs::read_dir(self.data_dir().join("collectors")) else { return pids };
        for d in dirs.flatten() {
            let id = d.file_name().to_string_lossy().into_owned();
            if let Ok(s) = std::fs::read_to_string(d.path().join(format!("procmond-{id}.pid")))
                && let Ok(pid) = s.trim().parse()
            {
                pids.push(pid);
            }
        }
        pids
    }
}

impl Drop for System {
    fn drop(&mut self) {
        // A running agent stops its collectors itself (also those that
        // have no lock file yet, like a wrapper script before its exec).
        if let Some(mut child) = self.agent.take() {
            signal(child.id(), Signal::SIGTERM);
            if !wait_until(Duration::from_secs(20), || child.try_wait().ok().flatten().is_some()) {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        // Collectors that outlived it (a SIGKILLed agent leaves them).
        for pid in self.collector_pids() {
            if alive(pid) && is_procmond(pid) {
                signal(pid, Signal::SIGKILL);
            }
        }
    }
}

/// Asks the agent's task coordinator (as `daemoneye-cli` does) and decodes
/// its answer; panics on a bus failure.
pub fn ask_task(client: &Client, req: &AgentTaskRequest, timeout: Duration) -> AgentTaskResponse {
    let reply = client.request(api::TASK_TOPIC, &api::encode(req), timeout).expect("task answer");
    api::decode(&reply.payload).expect("decodable task answer")
}

/// Whether `pid` runs procmond (so a test never kills a stranger that
/// reused a pid from a stale lock file).
fn is_procmond(pid: u32) -> bool {
    daemoneye_platform::process_exe(pid)
        .is_some_and(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("procmond")))
}

/// Per collector: (events stored, distinct streams, whether each stream's
/// sequence numbers are exactly 1..=max with no gap and no duplicate).
pub fn store_summary(db: &Path) -> Vec<(String, i64, bool)> {
    let Ok(conn) = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
    else {
        return Vec::new();
    };
    let Ok(mut stmt) = conn.prepare(
        "SELECT collector_id, stream_id, count(*), count(DISTINCT seq), min(seq), max(seq)
         FROM process_events GROUP BY collector_id, stream_id ORDER BY collector_id",
    ) else {
        return Vec::new();
    };
    let rows: Vec<(String, i64, i64, i64, i64, i64)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)))
        .map(|it| it.filter_map(Result::ok).collect())
        .unwrap_or_default();
    let mut out: Vec<(String, i64, bool)> = Vec::new();
    for (c, _stream, n, distinct, min, max) in rows {
        let exact = n == distinct && min == 1 && max == n;
        match out.iter_mut().find(|(id, _, _)| *id == c) {
            Some(e) => {
                e.1 += n;
                e.2 &= exact;
            }
            None => out.push((c, n, exact)),
        }
    }
    out
}

/// Highest acknowledged sequence per collector (the store's watermarks).
pub fn watermarks(db: &Path) -> Vec<(String, i64)> {
    let Ok(conn) = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
    else {
        return Vec::new();
    };
    let Ok(mut stmt) =
        conn.prepare("SELECT collector_id, max(through) FROM stream_watermarks GROUP BY collector_id")
    else {
        return Vec::new();
    };
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .map(|it| it.filter_map(Result::ok).collect())
        .unwrap_or_default()
}

/// Copies an executable with `cp` (in its own process, so no descriptor
/// open for writing leaks into a fork of this multi-threaded test, which
/// would make the exec fail with ETXTBSY).
pub fn copy_executable(from: &Path, to: &Path) {
    let st = Command::new("cp").arg(from).arg(to).status().expect("run cp");
    assert!(st.success(), "cp {} {}: {st}", from.display(), to.display());
}

/// A shell script written by `sh` itself (for the same reason).
pub fn write_script(path: &Path, body: &str) {
    let st = Command::new("sh")
        .arg("-c")
        .arg("printf '%s\\n' \"$1\" > \"$2\" && chmod 755 \"$2\"")
        .arg("sh")
        .arg(format!("#!/bin/sh\n{body}"))
        .arg(path)
        .status()
        .expect("run sh");
    assert!(st.success(), "write {}: {st}", path.display());
}

/// A stand-in collector, a shell script: `--check-args` (the agent's
/// check before it starts anything) goes to procmond, which checks the
/// agent's arguments; anything else runs `body`.
pub fn write_collector_script(path: &Path, body: &str) {
    let check =
        format!("case \" $* \" in *\" --check-args \"*) exec {} \"$@\";; esac", bin("procmond").display());
    write_script(path, &format!("{check}\n{body}"));
}

/// The path of a program on PATH.
pub fn which(name: &str) -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|p| std::env::split_paths(&p).map(|d| d.join(name)).find(|p| p.exists()))
        .unwrap_or_else(|| panic!("{name} not on PATH"))
}
