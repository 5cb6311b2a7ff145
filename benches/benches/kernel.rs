//! procmond's kernel event path (Linux proc connector) end to end: the
//! release `daemoneye-agent` with one procmond collector (`pm`) as child
//! processes, the agent's store (`<data_dir>/events.db`) read through a
//! read-only connection and every row's `record` decoded
//! ([`ProcessEvent::decode`]: kind, source, exit status, argv, exe), and
//! forkstat (same kernel interface) beside it as the peer. Each phase has
//! its own agent in its own temp dir, with the built-in rules on (the
//! packaged default; the programs run are the system's, so no rule fires):
//!
//! - **storm**: `DAEMONEYE_BENCH_STORM` (10,000) processes started as fast
//!   as `DAEMONEYE_BENCH_STORM_THREADS` (4) threads can spawn and reap
//!   them: `/usr/bin/true` with a unique token (`true k<run>x<i>`), its
//!   pid recorded. procmond runs with `--events kernel` (interval 30 s,
//!   heartbeats every 1 s), and `forkstat -e exec,exit` (stdout to a file)
//!   runs in the same storm. Counted per process: procmond's Started (or
//!   Modified exec) and Stopped rows, how many carry the full argv and the
//!   exe path, and the exit status; forkstat's exec and exit lines for the
//!   same pids and how many show the token; procmond's counters (kernel
//!   events, overruns, resyncs, caught by poll) from `agent.status` before
//!   and after, and forkstat's `nobufs` lines (its ENOBUFS).
//! - **latency-kernel**: `DAEMONEYE_BENCH_LAT_COUNT` (500) processes
//!   (`sleep 0.05<token digits>`: about 50 ms)
//!   spawned at `DAEMONEYE_BENCH_LAT_RATE` (50) per second on average
//!   (Poisson arrivals, so not in step with earlier processes' exits);
//!   the store is polled every 2 ms for new rows (as the agent bench does)
//!   and the start of the poll that first returns a process's Started row
//!   is the moment it was committed. The spawn instant is taken just
//!   before `Command::spawn` (whose fork and exec follow). procmond with
//!   `--events kernel`, interval 30 s.
//! - **latency-poll**: the same with `--events poll --interval 5` (the
//!   floor; the packaged 30 s would be six times longer) and processes
//!   that outlive the interval (`sleep 6.0<token digits>`).
//! - **cpu-busy**: `DAEMONEYE_BENCH_BUSY_RATE` (1,000) `true <token>`
//!   per second for `DAEMONEYE_BENCH_BUSY_SECS` (10) s from 8 paced
//!   threads; procmond's CPU (utime + stime and its CPU clock) over the
//!   spawning window; kernel mode (the default, `--events auto`),
//!   interval 30 s. Tokens captured are counted as in the storm.
//! - **cpu-idle**: `DAEMONEYE_BENCH_IDLE_PROCS` (1,000) `sleep 3600`
//!   children, then the agent with the packaged defaults (kernel mode,
//!   interval 30 s, heartbeats 30 s); after the snapshot, procmond's CPU
//!   over `DAEMONEYE_BENCH_IDLE_SECS` (60) s, with the processes other
//!   users started meanwhile counted from the store.
//! - **cpu-idle-poll**: the same with `--events poll`, for contrast: the
//!   walk and the heartbeats without the kernel path.
//!
//! `DAEMONEYE_BENCH_PROCMOND_ARGS` adds arguments to every procmond (split
//! at whitespace), for experiments (e.g. `--config <file>` with another
//! `kernel_events` section).
//!
//! Every phase ends with SIGTERM to the agent (it stops its collector); a
//! collector still alive after that, with the same start time, is killed
//! by its pid, and so is every child of this harness (forkstat by SIGINT,
//! then SIGKILL).
//!
//! Run (as root: the proc connector needs CAP_NET_ADMIN; forkstat from
//! `apt-get install -y forkstat`): `cargo build --release -p procmond -p
//! daemoneye-agent && cargo bench -p daemoneye-benches --bench kernel`. A
//! word after `--` runs the phases whose name contains it (`storm`,
//! `latency`, `latency-poll`, `cpu`, `cpu-idle`, ...).

use std::collections::{BTreeMap, HashMap};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use daemoneye_agent::api::{self, AgentStatus, STATUS_TOPIC};
use daemoneye_benches::agent::{Agent, Bins};
use daemoneye_benches::{
    Children, clock_ticks_per_sec, count_procs, cpu_of, dist_cells, env_num, host_busy_ticks, modified_secs,
    now_us, pct, sleepers_or_skip, splitmix, stat_of, status_kib,
};
use daemoneye_bus::{Client, ClientConfig};
use daemoneye_contract::control::EventSourceStatus;
use daemoneye_contract::event::{Change, EventKind, EventSource, ProcessEvent};
use rusqlite::{Connection, OpenFlags};

/// The agent's temp dirs.
const PREFIX: &str = "daemoneye-bench-kernel";
/// The one collector.
const ID: &str = "pm";
/// How often the store is read while latencies are timed.
const POLL: Duration = Duration::from_millis(2);
/// Spawning threads of the cpu-busy phase (each waits for its child).
const BUSY_THREADS: usize = 8;
/// The packaged interval (procmond's default).
const DEFAULT_INTERVAL_SECS: u64 = 30;

// ---------------------------------------------------------------- tools --

/// The programs run: `true` and `sleep` of the system (canonical paths,
/// so the exe procmond reads can be compared), by pid and a unique token
/// in their argv. Not copies in a temp dir: the agent's built-in rules
/// would raise an alert for every one of them.
struct Tools {
    /// `/usr/bin/true` (or `/bin/true`).
    storm: PathBuf,
    /// `/usr/bin/sleep` (or `/bin/sleep`).
    sleep: PathBuf,
}

impl Tools {
    fn new() -> Result<Tools, String> {
        let find = |name: &str| {
            ["/usr/bin", "/bin"]
                .iter()
                .map(|d| Path::new(d).join(name))
                .find(|p| p.is_file())
                .and_then(|p| p.canonicalize().ok())
                .ok_or_else(|| format!("no {name} in /usr/bin or /bin"))
        };
        Ok(Tools { storm: find("true")?, sleep: find("sleep")? })
    }
}

fn spawn_quiet(exe: &Path, arg: &str) -> std::io::Result<Child> {
    Command::new(exe).arg(arg).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn()
}

// ---------------------------------------------------------------- agent --

/// agent.yaml with the one collector `pm`, `args` passed to procmond.
fn yaml(data: &Path, procmond: &Path, args: &[&str], heartbeat_secs: u64) -> String {
    let args: Vec<String> = args.iter().map(|a| format!("{a:?}")).collect();
    format!(
        "data_dir: {:?}\nlog_level: info\ncollectors:\n  - id: {ID}\n    binary: {:?}\n    args: [{}]\n    \
         heartbeat_interval_secs: {heartbeat_secs}\n",
        data.display().to_string(),
        procmond.display().to_string(),
        args.join(", ")
    )
}

/// The agent with `pm` started with `args`, its store open, its first
/// snapshot committed (at least `snapshot_rows` rows, then 1 s without
/// another), the collector found.
fn start_agent(
    bins: &Bins,
    args: &[&str],
    heartbeat_secs: u64,
    snapshot_rows: u64,
) -> Result<(Agent, Store), String> {
    // `DAEMONEYE_BENCH_PROCMOND_ARGS`: more arguments for procmond (split
    // at whitespace), for experiments, e.g. `--config <file>`.
    let extra = std::env::var("DAEMONEYE_BENCH_PROCMOND_ARGS").unwrap_or_default();
    let args: Vec<&str> = args.iter().copied().chain(extra.split_whitespace()).collect();
    let mut agent =
        Agent::start_with(PREFIX, bins, |data| yaml(data, &bins.procmond, &args, heartbeat_secs))?;
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut store = loop {
        if let Some(why) = agent.exited() {
            return Err(why);
        }
        if let Some(s) = Store::open(&agent.db) {
            break s;
        }
        if Instant::now() > deadline {
            return Err(format!("no store at {} within 120 s", agent.db.display()));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let (mut rows, mut last_new) = (0u64, Instant::now());
    loop {
        let n = store.new_events().iter().filter(|(_, e)| e.snapshot).count() as u64;
        if n > 0 {
            rows += n;
            last_new = Instant::now();
        }
        if rows >= snapshot_rows.max(1) && last_new.elapsed() >= Duration::from_secs(1) {
            break;
        }
        if let Some(why) = agent.exited() {
            return Err(why);
        }
        if Instant::now() > deadline {
            return Err(format!("snapshot not committed within 120 s ({rows} rows)"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    agent.find_collectors_of(&[ID])?;
    Ok((agent, store))
}

fn procmond_pid(agent: &Agent) -> u32 {
    agent.collectors.first().map_or(0, |c| c.pid)
}

/// A bus client of the agent's broker, for `agent.status`.
fn status_client(agent: &Agent) -> Result<Client, String> {
    let mut cfg = ClientConfig::new(&agent.socket, format!("bench-kernel-{}", std::process::id()));
    cfg.timeout = Duration::from_secs(5);
    cfg.backoff_max = Duration::from_millis(100);
    let client = Client::connect(cfg).map_err(|e| e.to_string())?;
    if !client.wait_connected(Duration::from_secs(30)) {
        return Err(format!("not welcomed by the broker at {}", agent.socket.display()));
    }
    Ok(client)
}

/// `pm`'s event source counters as of its last heartbeat, and when that
/// heartbeat arrived (Unix ms).
fn source_status(client: &Client) -> Result<(EventSourceStatus, u64), String> {
    let m = client
        .request(STATUS_TOPIC, b"", Duration::from_secs(5))
        .map_err(|e| format!("agent.status: {e}"))?;
    let s: AgentStatus = api::decode(&m.payload).map_err(|e| format!("bad status: {e}"))?;
    let hb = s
        .collectors
        .iter()
        .find(|c| c.id == ID)
        .and_then(|c| c.heartbeat.clone())
        .ok_or("no heartbeat from pm yet")?;
    Ok((hb.event_source, hb.received_unix_ms))
}

/// Waits for a heartbeat received after `after_ms` (Unix ms).
fn fresh_status(client: &Client, after_ms: u64) -> Result<EventSourceStatus, String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (s, at) = source_status(client)?;
        if at > after_ms || Instant::now() > deadline {
            return Ok(s);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn stop_agent(agent: &mut Agent) -> Result<(), String> {
    let sd = agent.shut_down()?;
    let text = std::fs::read_to_string(&agent.log).unwrap_or_default();
    let overrun_lines = text.lines().filter(|l| l.contains("kernel event overrun")).count();
    let dropped_lines = text.lines().filter(|l| l.contains("not taking kernel events")).count();
    println!(
        "SIGTERM → agent exited in {:.2} s ({}); collector still running after: {}; log: {} lines, \
         {} WARN/ERROR (not alerts), {overrun_lines} \"kernel event overrun\", {dropped_lines} \"not taking \
         kernel events\"",
        sd.took.as_secs_f64(),
        sd.status,
        sd.alive,
        sd.log.lines,
        sd.log.bad.len()
    );
    sd.log.print_bad();
    Ok(())
}

// ---------------------------------------------------------------- store --

/// A read-only connection to the agent's store, reading new rows only.
struct Store {
    conn: Connection,
    last_id: i64,
    errors: u64,
}

impl Store {
    /// `None` until the file and its table exist.
    fn open(path: &Path) -> Option<Store> {
        if !path.is_file() {
            return None;
        }
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(path, flags).ok()?;
        conn.busy_timeout(Duration::from_millis(100)).ok()?;
        conn.query_row("SELECT count(*) FROM process_events WHERE id < 0", [], |_| Ok(())).ok()?;
        Some(Store { conn, last_id: 0, errors: 0 })
    }

    /// Events committed since the last call, decoded from their `record`,
    /// with their collector id.
    fn new_events(&mut self) -> Vec<(String, ProcessEvent)> {
        let mut out = Vec::new();
        let Ok(mut stmt) = self
            .conn
            .prepare_cached("SELECT id, collector_id, record FROM process_events WHERE id > ?1 ORDER BY id")
        else {
            self.errors += 1;
            return out;
        };
        let rows = stmt.query_map([self.last_id], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?, r.get::<_, Vec<u8>>(2)?))
        });
        match rows {
            Ok(rows) => {
                for row in rows {
                    match row {
                        Ok((id, collector, record)) => {
                            self.last_id = id;
                            match ProcessEvent::decode(&record) {
                                Ok(e) => out.push((collector, e)),
                                Err(_) => self.errors += 1,
                            }
                        }
                        Err(_) => {
                            self.errors += 1;
                            break;
                        }
                    }
                }
            }
            Err(_) => self.errors += 1,
        }
        out
    }
}

// --------------------------------------------------------------- tokens --

/// What was seen of one of our processes.
#[derive(Default, Clone)]
struct Seen {
    pid: u32,
    token: String,
    /// procmond: a Started (or Modified exec) row.
    started: bool,
    /// ... of which one carries `[<exe>, <token>]`, untruncated.
    argv_full: bool,
    /// ... and the exe path.
    exe_ok: bool,
    /// ... sources of the rows that showed it start (kernel, poll).
    start_src: [bool; 2],
    started_rows: u32,
    /// Each start row: kind, source, name, start time, argv (for the
    /// report of a process with two).
    rows: Vec<String>,
    /// procmond: a Stopped row, with exit status 0.
    stopped: bool,
    exit_ok: bool,
    /// forkstat: exec line, with the token; exit line.
    fs_exec: bool,
    fs_argv: bool,
    fs_exit: bool,
}

/// Applies the store's events to our processes (by pid; events observed
/// before `since_ms` are of an earlier process with that pid).
fn apply_events(
    seen: &mut [Seen],
    by_pid: &HashMap<u32, usize>,
    exe: &Path,
    events: &[(String, ProcessEvent)],
    since_ms: u64,
) {
    for (collector, e) in events {
        if collector != ID || e.snapshot || e.observed_unix_ms + 1000 < since_ms {
            continue;
        }
        let Some(&i) = by_pid.get(&e.process.pid) else { continue };
        let s = &mut seen[i];
        let src = usize::from(e.source == EventSource::Poll);
        match e.kind {
            EventKind::Started | EventKind::Modified => {
                if e.kind == EventKind::Modified && !e.changes.contains(&Change::Exec) {
                    continue;
                }
                if e.kind == EventKind::Started {
                    s.started_rows += 1;
                }
                s.rows.push(format!(
                    "{} {} name={:?} start_time={} argv={:?} observed_ms={}",
                    e.kind,
                    e.source.as_str(),
                    e.process.name,
                    e.process.start_time,
                    e.process.details.argv.as_ref().map(|a| a.args.join(" ")),
                    e.observed_unix_ms
                ));
                s.started = true;
                s.start_src[src] = true;
                let d = &e.process.details;
                if let Ok(argv) = &d.argv
                    && !argv.truncated
                    && argv.args.len() == 2
                    && argv.args[1] == s.token
                {
                    s.argv_full = true;
                }
                if d.exe.as_ref().is_ok_and(|p| p == exe) {
                    s.exe_ok = true;
                }
            }
            EventKind::Stopped => {
                s.stopped = true;
                if e.exit == Some(daemoneye_platform::ExitStatus::Code(0)) {
                    s.exit_ok = true;
                }
            }
        }
    }
}

// ------------------------------------------------------------- forkstat --

/// `forkstat -e exec,exit`, its output in a file.
struct Forkstat {
    child: Child,
    out: PathBuf,
    err: PathBuf,
    version: String,
}

impl Forkstat {
    /// `None` (and why) when forkstat is not installed or fails to start.
    fn start(dir: &Path) -> Result<Forkstat, String> {
        let version = Command::new("forkstat")
            .arg("-h")
            .output()
            .map_err(|e| format!("forkstat not found ({e}): apt-get install -y forkstat"))?;
        let version =
            String::from_utf8_lossy(&version.stdout).lines().next().unwrap_or("forkstat").trim().to_owned();
        let out = dir.join("forkstat.out");
        let err = dir.join("forkstat.err");
        let child = Command::new("forkstat")
            .args(["-e", "exec,exit"])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).map_err(|e| e.to_string())?)
            .stderr(std::fs::File::create(&err).map_err(|e| e.to_string())?)
            .spawn()
            .map_err(|e| format!("cannot start forkstat: {e}"))?;
        Ok(Forkstat { child, out, err, version })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGINT (forkstat prints its statistics and exits), then waits up to
    /// 10 s; SIGKILL after that.
    fn stop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(10) {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Forkstat {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// What forkstat printed, beyond our processes.
#[derive(Default)]
struct ForkstatCounts {
    exec_lines: u64,
    exit_lines: u64,
    nobufs: u64,
}

/// Reads forkstat's output: exec and exit lines of our pids (the token
/// must follow the program for the argv to count).
fn read_forkstat(fs: &Forkstat, seen: &mut [Seen], by_pid: &HashMap<u32, usize>) -> ForkstatCounts {
    let text = std::fs::read_to_string(&fs.out).unwrap_or_default();
    let mut c = ForkstatCounts::default();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() >= 2 && f[1] == "recv" && line.contains("nobufs") {
            c.nobufs += 1;
            continue;
        }
        if f.len() < 3 {
            continue;
        }
        let pid = f[2].parse::<u32>().ok();
        match (f[1], pid) {
            ("exec", Some(pid)) => {
                c.exec_lines += 1;
                if let Some(&i) = by_pid.get(&pid) {
                    let s = &mut seen[i];
                    s.fs_exec = true;
                    if f.get(4).is_some_and(|t| *t == s.token) {
                        s.fs_argv = true;
                    }
                }
            }
            ("exit", Some(pid)) => {
                c.exit_lines += 1;
                if let Some(&i) = by_pid.get(&pid) {
                    seen[i].fs_exit = true;
                }
            }
            _ => {}
        }
    }
    c
}

// ------------------------------------------------------------ spawning --

/// Spawns `n` `exe <prefix><i>` from `threads` threads, each process
/// reaped before its thread spawns the next, at `rate` per second overall
/// (0: as fast as they can). Returns the tokens' pids (`None`: not
/// spawned) and how long it took.
fn spawn_many(exe: &Path, prefix: &str, n: usize, threads: usize, rate: u64) -> (Vec<Option<u32>>, Duration) {
    let threads = threads.max(1);
    let t0 = Instant::now();
    let per_thread_gap = (rate > 0).then(|| Duration::from_secs_f64(threads as f64 / rate as f64));
    let results: Vec<Vec<(usize, Option<u32>)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    let mut out = Vec::with_capacity(n / threads + 1);
                    for (k, i) in (t..n).step_by(threads).enumerate() {
                        if let Some(gap) = per_thread_gap {
                            // Offsets spread the threads over one gap.
                            let due = t0 + gap.mul_f64(k as f64 + t as f64 / threads as f64);
                            let now = Instant::now();
                            if due > now {
                                std::thread::sleep(due - now);
                            }
                        }
                        match spawn_quiet(exe, &format!("{prefix}{i}")) {
                            Ok(mut c) => {
                                out.push((i, Some(c.id())));
                                let _ = c.wait();
                            }
                            Err(_) => out.push((i, None)),
                        }
                    }
                    out
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_default()).collect()
    });
    let took = t0.elapsed();
    let mut pids = vec![None; n];
    for (i, pid) in results.into_iter().flatten() {
        pids[i] = pid;
    }
    (pids, took)
}

/// The tokens' records, and the pid map.
fn tokens(prefix: &str, pids: &[Option<u32>]) -> (Vec<Seen>, HashMap<u32, usize>) {
    let mut seen = Vec::with_capacity(pids.len());
    let mut by_pid = HashMap::new();
    for (i, pid) in pids.iter().enumerate() {
        let Some(pid) = *pid else { continue };
        by_pid.insert(pid, seen.len());
        seen.push(Seen { pid, token: format!("{prefix}{i}"), ..Seen::default() });
    }
    (seen, by_pid)
}

/// Reads the store until every token has Started and Stopped, or nothing
/// of ours came for `quiet`, or `max` passed.
fn collect(
    store: &mut Store,
    seen: &mut [Seen],
    by_pid: &HashMap<u32, usize>,
    exe: &Path,
    since_ms: u64,
    quiet: Duration,
    max: Duration,
) -> Duration {
    let t = Instant::now();
    let mut last_new = Instant::now();
    loop {
        let events = store.new_events();
        let before = seen.iter().filter(|s| s.started).count() + seen.iter().filter(|s| s.stopped).count();
        apply_events(seen, by_pid, exe, &events, since_ms);
        let after = seen.iter().filter(|s| s.started).count() + seen.iter().filter(|s| s.stopped).count();
        if after > before {
            last_new = Instant::now();
        }
        if after == 2 * seen.len() || last_new.elapsed() >= quiet || t.elapsed() >= max {
            return t.elapsed();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn percent(a: usize, of: usize) -> String {
    format!("{a} ({:.2}%)", a as f64 * 100.0 / of.max(1) as f64)
}

fn share(ms: f64, over: Duration) -> f64 {
    ms / over.as_secs_f64().max(1e-9) / 10.0
}

/// CPU time of each thread of a process by thread name, in ns
/// (`/proc/<pid>/task/<tid>/schedstat`; threads of the same name summed).
fn threads_of(pid: u32) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return out };
    for e in rd.filter_map(Result::ok) {
        let tid = e.file_name().to_string_lossy().into_owned();
        let Some((comm, _)) = stat_of(&format!("{pid}/task/{tid}")) else { continue };
        let ns = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0);
        *out.entry(comm).or_default() += ns;
    }
    out
}

fn thread_delta(a: &BTreeMap<String, u64>, b: &BTreeMap<String, u64>) -> String {
    let mut v: Vec<(String, u64)> = b
        .iter()
        .map(|(k, v)| (k.clone(), v.saturating_sub(a.get(k).copied().unwrap_or(0))))
        .filter(|e| e.1 > 0)
        .collect();
    v.sort_by_key(|e| std::cmp::Reverse(e.1));
    v.iter().map(|(k, ns)| format!("{k} {:.1}", *ns as f64 / 1e6)).collect::<Vec<_>>().join(", ")
}

/// CPU of this harness's reaped children (`cutime` + `cstime` of
/// `/proc/self/stat`), in clock ticks: the processes it spawned and waited
/// for.
fn reaped_children_ticks() -> u64 {
    stat_of("self").map_or(0, |(_, f)| f.get(13).copied().unwrap_or(0) + f.get(14).copied().unwrap_or(0))
}

/// The host's busy CPU over a window, split into `ours` (pids), the
/// harness's reaped children, and the rest.
struct HostLoad {
    busy: u64,
    ours: Vec<(u32, u64)>,
    children: u64,
    at: Instant,
}

impl HostLoad {
    fn start(pids: &[u32]) -> HostLoad {
        HostLoad {
            busy: host_busy_ticks(),
            ours: pids.iter().map(|&p| (p, cpu_of(p).ticks)).collect(),
            children: reaped_children_ticks(),
            at: Instant::now(),
        }
    }

    /// % of one core: the reaped children, and everything else not in
    /// `ours`.
    fn percent(&self) -> (f64, f64) {
        let tps = clock_ticks_per_sec();
        let ours: u64 = self.ours.iter().map(|&(p, t)| cpu_of(p).ticks.saturating_sub(t)).sum();
        let children = reaped_children_ticks().saturating_sub(self.children);
        let others = host_busy_ticks().saturating_sub(self.busy).saturating_sub(ours + children);
        let to_pct = |t: u64| t as f64 / tps as f64 / self.at.elapsed().as_secs_f64().max(1e-9) * 100.0;
        (to_pct(children), to_pct(others))
    }

    fn others_percent(&self) -> f64 {
        self.percent().1
    }
}

// --------------------------------------------------------------- phases --

fn storm_phase(bins: &Bins, tools: &Tools, n: usize, threads: usize) -> Result<(), String> {
    let tps = clock_ticks_per_sec();
    println!(
        "\n## Storm: {n} processes, {threads} spawning threads ({} processes on the host)\n",
        count_procs()
    );
    let (mut agent, mut store) = start_agent(bins, &["--events", "kernel"], 1, 1)?;
    let client = status_client(&agent)?;
    let pm = procmond_pid(&agent);
    let mut fs = match Forkstat::start(agent.dir()) {
        Ok(f) => Some(f),
        Err(why) => {
            println!("forkstat: {why}; measuring procmond alone");
            None
        }
    };
    // forkstat loads its process cache, then subscribes.
    std::thread::sleep(Duration::from_secs(1));
    if let Some(f) = &mut fs
        && let Ok(Some(status)) = f.child.try_wait()
    {
        return Err(format!(
            "forkstat exited ({status}): {}",
            std::fs::read_to_string(&f.err).unwrap_or_default()
        ));
    }
    let fs_pid = fs.as_ref().map_or(0, Forkstat::pid);
    let (before, _) = source_status(&client)?;
    store.new_events();
    let mut pids_cpu = vec![pm, agent.pid(), std::process::id()];
    if fs_pid != 0 {
        pids_cpu.push(fs_pid);
    }
    let load = HostLoad::start(&pids_cpu);
    let (pm0, ag0, fs0, th0) = (cpu_of(pm), cpu_of(agent.pid()), cpu_of(fs_pid), threads_of(pm));
    let prefix = format!("k{}x", std::process::id());
    let since_ms = now_us() / 1000;
    let (pids, took) = spawn_many(&tools.storm, &prefix, n, threads, 0);
    // The last events reach both tools within milliseconds; the window
    // for CPU ends 1 s after the storm.
    std::thread::sleep(Duration::from_secs(1));
    let window = Duration::from_millis(now_us() / 1000 - since_ms);
    let (pm1, ag1, fs1, th1) = (cpu_of(pm), cpu_of(agent.pid()), cpu_of(fs_pid), threads_of(pm));
    let (children, others) = load.percent();
    if let Some(f) = &mut fs {
        f.stop();
    }
    let (mut seen, by_pid) = tokens(&prefix, &pids);
    let waited = collect(
        &mut store,
        &mut seen,
        &by_pid,
        &tools.storm,
        since_ms,
        Duration::from_secs(3),
        Duration::from_secs(60),
    );
    let after = fresh_status(&client, now_us() / 1000)?;
    let fsc = fs.as_ref().map(|f| read_forkstat(f, &mut seen, &by_pid));
    if let Some(why) = agent.exited() {
        return Err(why);
    }

    let spawned = seen.len();
    println!(
        "spawned {spawned} of {n} in {:.2} s: {:.0} processes/s; storm end → last of ours in the store: \
         waited {:.1} s (until all were in, or 3 s without one)",
        took.as_secs_f64(),
        spawned as f64 / took.as_secs_f64(),
        waited.as_secs_f64()
    );
    let cnt = |f: &dyn Fn(&Seen) -> bool| seen.iter().filter(|s| f(s)).count();
    let p = |k: usize| percent(k, spawned);
    println!();
    println!("| of our {spawned} processes | procmond | forkstat |");
    println!("|---|---:|---:|");
    let fsv = |k: usize| if fsc.is_some() { p(k) } else { "–".to_owned() };
    println!(
        "| **start seen** (procmond: Started or Modified exec row; forkstat: exec line) | **{}** | **{}** |",
        p(cnt(&|s| s.started)),
        fsv(cnt(&|s| s.fs_exec))
    );
    println!(
        "| start seen with the full argv (`[<exe>, <token>]`; forkstat: the token on the exec line) | {} | {} |",
        p(cnt(&|s| s.argv_full)),
        fsv(cnt(&|s| s.fs_argv))
    );
    println!("| start seen with the exe path | {} | – |", p(cnt(&|s| s.exe_ok)));
    println!(
        "| **exit seen** (Stopped row; exit line) | **{}** | **{}** |",
        p(cnt(&|s| s.stopped)),
        fsv(cnt(&|s| s.fs_exit))
    );
    println!("| exit with its status (0) | {} | {} |", p(cnt(&|s| s.exit_ok)), fsv(cnt(&|s| s.fs_exit)));
    println!(
        "| **both start and exit** | **{}** | **{}** |",
        p(cnt(&|s| s.started && s.stopped)),
        fsv(cnt(&|s| s.fs_exec && s.fs_exit))
    );
    println!(
        "| neither | {} | {} |",
        p(cnt(&|s| !s.started && !s.stopped)),
        fsv(cnt(&|s| !s.fs_exec && !s.fs_exit))
    );
    if fsc.is_some() {
        println!(
            "| start seen by forkstat, not by procmond / the reverse | {} / {} | |",
            cnt(&|s| s.fs_exec && !s.started),
            cnt(&|s| s.started && !s.fs_exec)
        );
        println!(
            "| full argv shown by forkstat, not by procmond / the reverse | {} / {} | |",
            cnt(&|s| s.fs_argv && !s.argv_full),
            cnt(&|s| s.argv_full && !s.fs_argv)
        );
        println!(
            "| exit seen by forkstat, not by procmond / the reverse | {} / {} | |",
            cnt(&|s| s.fs_exit && !s.stopped),
            cnt(&|s| s.stopped && !s.fs_exit)
        );
    }
    println!(
        "| start rows by source: kernel / poll; tokens with 2+ Started rows | {} / {}; {} | |",
        cnt(&|s| s.start_src[0]),
        cnt(&|s| s.start_src[1]),
        cnt(&|s| s.started_rows > 1)
    );
    let d = |f: fn(&EventSourceStatus) -> u64| f(&after).saturating_sub(f(&before));
    let (fs_nobufs, fs_lines) = fsc.as_ref().map_or(("–".to_owned(), "–".to_owned()), |c| {
        (c.nobufs.to_string(), format!("{} exec, {} exit lines (all processes)", c.exec_lines, c.exit_lines))
    });
    println!(
        "| kernel events received during the storm (all kinds, all processes) | {} | {fs_lines} |",
        d(|s| s.kernel_events)
    );
    println!(
        "| **overruns** (procmond: ENOBUFS counter; forkstat: `nobufs` lines) | **{}** | **{fs_nobufs}** |",
        d(|s| s.overruns)
    );
    println!(
        "| resyncs / caught by poll (procmond) | {} / {} | |",
        d(|s| s.resyncs),
        d(|s| s.caught_by_poll)
    );
    println!(
        "| CPU over the storm + 1 s ({:.1} s), % of one core | {:.1}% (agent {:.1}%) | {} |",
        window.as_secs_f64(),
        share(pm1.ms_since(&pm0, tps), window),
        share(ag1.ms_since(&ag0, tps), window),
        if fs_pid != 0 {
            format!("{:.1}%", share(fs1.ms_since(&fs0, tps), window))
        } else {
            "–".to_owned()
        }
    );
    println!("| procmond threads' CPU over it, ms | {} | |", thread_delta(&th0, &th1));
    println!("| the spawned processes themselves (reaped children) | {children:.1}% of one core | |");
    println!(
        "| other load on the host over it (not procmond, agent, forkstat, harness, children) | {others:.1}% of one core | |"
    );
    println!("| store read errors | {} | |", store.errors);
    let missed: Vec<String> = seen
        .iter()
        .filter(|s| !s.started || !s.stopped)
        .take(8)
        .map(|s| {
            format!(
                "{}{}{}",
                s.pid,
                if s.started { "" } else { " no-start" },
                if s.stopped { "" } else { " no-exit" }
            )
        })
        .collect();
    if !missed.is_empty() {
        println!("\nprocmond missed (first pids): {}", missed.join(", "));
    }
    for s in seen.iter().filter(|s| s.started_rows > 1).take(3) {
        println!("\npid {} ({}) has {} Started rows:", s.pid, s.token, s.started_rows);
        for r in &s.rows {
            println!("    {r}");
        }
    }
    if let Some(f) = &fs {
        let err = std::fs::read_to_string(&f.err).unwrap_or_default();
        if !err.trim().is_empty() {
            println!("forkstat stderr: {}", err.trim());
        }
        println!("forkstat: {} (`forkstat -e exec,exit`, stdout to a file)", f.version);
    }
    stop_agent(&mut agent)
}

/// One paced latency run.
fn latency_phase(bins: &Bins, tools: &Tools, poll: bool, count: usize, rate: u64) -> Result<(), String> {
    let (args, base, interval): (&[&str], &str, u64) = if poll {
        (&["--events", "poll", "--interval", "5"], "6.0", 5)
    } else {
        (&["--events", "kernel"], "0.05", DEFAULT_INTERVAL_SECS)
    };
    println!(
        "\n## Latency, {}: {count} processes at {rate}/s, spawn → Started row committed ({} processes on the host)\n",
        if poll { "--events poll --interval 5" } else { "--events kernel (interval 30 s)" },
        count_procs()
    );
    let (mut agent, mut store) = start_agent(bins, args, DEFAULT_INTERVAL_SECS, 1)?;
    let pm = procmond_pid(&agent);
    let run = std::process::id() % 1000;
    // Poisson arrivals (exponential gaps): spawns are not in step with
    // the exits of earlier ones, which close procmond's batches.
    let seed = now_us();
    let mut state = seed;
    let mut at = 0.0f64;
    let offsets: Vec<Duration> = (0..count)
        .map(|_| {
            let u = (splitmix(&mut state) >> 11) as f64 / (1u64 << 53) as f64;
            at += -(1.0 - u).ln() / rate.max(1) as f64;
            Duration::from_secs_f64(at)
        })
        .collect();
    let life = if poll { 6.0 } else { 0.05 };
    let give_up = offsets.last().copied().unwrap_or_default()
        + Duration::from_secs_f64(life)
        + Duration::from_secs(interval + 10);
    let mut kids = Children::default();
    let mut spawn_us: Vec<u64> = Vec::with_capacity(count);
    let mut spawn_took: Vec<u64> = Vec::with_capacity(count);
    let mut tokens: Vec<String> = Vec::with_capacity(count);
    let mut by_pid: HashMap<u32, usize> = HashMap::new();
    // Per process: (committed at, Unix µs; observed_ms; source; argv full).
    let mut seen: Vec<Option<(u64, u64, EventSource, bool)>> = Vec::with_capacity(count);
    let (mut poll_gaps, mut last_poll) = (Vec::new(), None::<u64>);
    store.new_events();
    let load = HostLoad::start(&[pm, agent.pid(), std::process::id()]);
    let (pm0, ag0) = (cpu_of(pm), cpu_of(agent.pid()));
    let t0 = Instant::now();
    let mut last_reap = Instant::now();
    let mut spawn_errors = 0;
    loop {
        while spawn_us.len() < count && t0 + offsets[spawn_us.len()] <= Instant::now() {
            let i = spawn_us.len();
            let token = format!("{base}{run:03}{i:05}");
            let before = now_us();
            let r = spawn_quiet(&tools.sleep, &token);
            spawn_took.push(now_us() - before);
            spawn_us.push(before);
            tokens.push(token);
            seen.push(None);
            match r {
                Ok(c) => {
                    by_pid.insert(c.id(), i);
                    kids.0.push(c);
                }
                Err(_) => spawn_errors += 1,
            }
        }
        let start = now_us();
        for (collector, e) in store.new_events() {
            if collector != ID || e.snapshot {
                continue;
            }
            let exec = e.kind == EventKind::Started
                || (e.kind == EventKind::Modified && e.changes.contains(&Change::Exec));
            if !exec {
                continue;
            }
            if let Some(&i) = by_pid.get(&e.process.pid)
                && seen[i].is_none()
                && e.observed_unix_ms * 1000 + 1000 >= spawn_us[i]
            {
                let argv_full =
                    e.process.details.argv.as_ref().is_ok_and(|a| a.args.last() == Some(&tokens[i]));
                seen[i] = Some((start, e.observed_unix_ms, e.source, argv_full));
            }
        }
        if let Some(prev) = last_poll {
            poll_gaps.push(start - prev);
        }
        last_poll = Some(start);
        if last_reap.elapsed() > Duration::from_millis(250) {
            for c in &mut kids.0 {
                let _ = c.try_wait();
            }
            last_reap = Instant::now();
        }
        let done = spawn_us.len() == count && by_pid.values().all(|&i| seen[i].is_some());
        if done || t0.elapsed() > give_up {
            break;
        }
        if let Some(why) = agent.exited() {
            return Err(why);
        }
        let mut wake = Instant::now() + POLL;
        if spawn_us.len() < count {
            wake = wake.min(t0 + offsets[spawn_us.len()]);
        }
        let now = Instant::now();
        if wake > now {
            std::thread::sleep(wake - now);
        }
    }
    let span = t0.elapsed();
    let tps = clock_ticks_per_sec();
    let (pm1, ag1) = (cpu_of(pm), cpu_of(agent.pid()));
    let others = load.others_percent();
    drop(kids);
    let mut spawn_commit = Vec::new();
    let mut spawn_obs = Vec::new();
    let mut obs_commit = Vec::new();
    let (mut kernel, mut polled, mut argv_full) = (0, 0, 0);
    for (i, s) in seen.iter().enumerate() {
        let Some((at, obs_ms, src, full)) = *s else { continue };
        spawn_commit.push(at.saturating_sub(spawn_us[i]));
        spawn_obs.push((obs_ms * 1000).saturating_sub(spawn_us[i]));
        obs_commit.push(at.saturating_sub(obs_ms * 1000));
        if src == EventSource::Kernel {
            kernel += 1;
        } else {
            polled += 1;
        }
        argv_full += usize::from(full);
    }
    let spawned = by_pid.len();
    let n_seen = spawn_commit.len();
    println!("| path | n | p50 ms | p90 ms | p99 ms | max ms | min ms |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    println!("| **spawn → Started committed** | {} |", dist_cells(&spawn_commit, 1));
    println!("| spawn → observed (`observed_unix_ms`, ms resolution) | {} |", dist_cells(&spawn_obs, 1));
    println!("| observed → committed | {} |", dist_cells(&obs_commit, 1));
    let mut gaps = poll_gaps;
    gaps.sort_unstable();
    spawn_took.sort_unstable();
    println!();
    println!("| | |");
    println!("|---|---|");
    println!(
        "| processes | {spawned} spawned ({spawn_errors} failed) over {:.1} s (Poisson, seed {seed}); \
         Started seen {n_seen}, missing {} |",
        offsets.last().copied().unwrap_or_default().as_secs_f64(),
        spawned - n_seen
    );
    println!("| Started rows by source: kernel / poll | {kernel} / {polled} |");
    println!("| with the full argv | {} |", percent(argv_full, n_seen));
    println!(
        "| `Command::spawn` call, p50 / max | {} / {} µs |",
        pct(&spawn_took, 0.5),
        spawn_took.last().copied().unwrap_or(0)
    );
    println!(
        "| poll gap start to start, p50 / p99 / max | {:.1} / {:.1} / {:.1} ms |",
        pct(&gaps, 0.5) as f64 / 1e3,
        pct(&gaps, 0.99) as f64 / 1e3,
        gaps.last().copied().unwrap_or(0) as f64 / 1e3
    );
    println!(
        "| CPU over the run: procmond / agent | {:.2}% / {:.2}% of one core |",
        share(pm1.ms_since(&pm0, tps), span),
        share(ag1.ms_since(&ag0, tps), span)
    );
    println!("| other load on the host (not procmond, agent, harness) | {others:.1}% of one core |");
    stop_agent(&mut agent)
}

fn cpu_busy_phase(bins: &Bins, tools: &Tools, rate: u64, secs: u64) -> Result<(), String> {
    let n = (rate * secs) as usize;
    println!(
        "\n## CPU at {rate} execs/s for {secs} s (kernel mode: --events auto, interval 30 s; {} processes on the host)\n",
        count_procs()
    );
    let (mut agent, mut store) = start_agent(bins, &[], 1, 1)?;
    let client = status_client(&agent)?;
    let pm = procmond_pid(&agent);
    std::thread::sleep(Duration::from_secs(2));
    let (before, _) = source_status(&client)?;
    store.new_events();
    let tps = clock_ticks_per_sec();
    let load = HostLoad::start(&[pm, agent.pid(), std::process::id()]);
    let (pm0, ag0, own0, th0) = (cpu_of(pm), cpu_of(agent.pid()), cpu_of(std::process::id()), threads_of(pm));
    let prefix = format!("b{}x", std::process::id());
    let since_ms = now_us() / 1000;
    let t0 = Instant::now();
    let (pids, took) = spawn_many(&tools.storm, &prefix, n, BUSY_THREADS, rate);
    // The last batch: the kernel thread waits up to 10 ms, then the WAL.
    std::thread::sleep(Duration::from_millis(200));
    let window = t0.elapsed();
    let (pm1, ag1, own1, th1) = (cpu_of(pm), cpu_of(agent.pid()), cpu_of(std::process::id()), threads_of(pm));
    let (children, others) = load.percent();
    let (mut seen, by_pid) = tokens(&prefix, &pids);
    collect(
        &mut store,
        &mut seen,
        &by_pid,
        &tools.storm,
        since_ms,
        Duration::from_secs(3),
        Duration::from_secs(60),
    );
    let after = fresh_status(&client, now_us() / 1000)?;
    if let Some(why) = agent.exited() {
        return Err(why);
    }
    let pm_ms = pm1.ms_since(&pm0, tps);
    let spawned = seen.len();
    let cnt = |f: &dyn Fn(&Seen) -> bool| seen.iter().filter(|s| f(s)).count();
    let d = |f: fn(&EventSourceStatus) -> u64| f(&after).saturating_sub(f(&before));
    println!("| what | measured |");
    println!("|---|---:|");
    println!(
        "| spawned | {spawned} in {:.2} s = {:.0}/s |",
        took.as_secs_f64(),
        spawned as f64 / took.as_secs_f64()
    );
    println!(
        "| **procmond CPU over the window ({:.2} s)** | {pm_ms:.0} ms = **{:.2}% of one core** ({} ticks) |",
        window.as_secs_f64(),
        share(pm_ms, window),
        pm1.ticks - pm0.ticks
    );
    println!("| procmond CPU per exec | {:.1} µs |", pm_ms * 1000.0 / spawned.max(1) as f64);
    println!("| procmond threads, ms | {} |", thread_delta(&th0, &th1));
    println!("| agent CPU | {:.2}% of one core |", share(ag1.ms_since(&ag0, tps), window));
    println!("| harness CPU (spawning) | {:.1}% of one core |", share(own1.ms_since(&own0, tps), window));
    println!("| the spawned processes themselves (reaped children) | {children:.1}% of one core |");
    println!(
        "| other load on the host (not procmond, agent, harness, children) | {others:.1}% of one core |"
    );
    println!(
        "| of ours: start seen / with full argv / exit seen / both | {} / {} / {} / {} |",
        percent(cnt(&|s| s.started), spawned),
        percent(cnt(&|s| s.argv_full), spawned),
        percent(cnt(&|s| s.stopped), spawned),
        percent(cnt(&|s| s.started && s.stopped), spawned)
    );
    println!(
        "| kernel events / overruns / resyncs / caught by poll (whole run) | {} / {} / {} / {} |",
        d(|s| s.kernel_events),
        d(|s| s.overruns),
        d(|s| s.resyncs),
        d(|s| s.caught_by_poll)
    );
    println!(
        "| procmond VmRSS / VmHWM after | {} / {} KiB |",
        status_kib(&pm.to_string(), "VmRSS"),
        status_kib(&pm.to_string(), "VmHWM")
    );
    stop_agent(&mut agent)
}

fn cpu_idle_phase(bins: &Bins, procs: usize, secs: u64, poll: bool) -> Result<(), String> {
    let Some((kids, took)) = sleepers_or_skip(&format!("cpu-idle with N={procs}"), procs, 200) else {
        return Ok(());
    };
    println!(
        "\n## CPU at idle: {procs} sleeping children ({} processes on the host; spawned in {:.1} s), \
         {} (interval 30 s, heartbeats 30 s), {secs} s\n",
        count_procs(),
        took.as_secs_f64(),
        if poll { "--events poll, for contrast" } else { "packaged defaults: kernel mode" }
    );
    let args: &[&str] = if poll { &["--events", "poll"] } else { &[] };
    let (mut agent, mut store) = start_agent(bins, args, DEFAULT_INTERVAL_SECS, procs as u64)?;
    let pm = procmond_pid(&agent);
    let client = status_client(&agent)?;
    std::thread::sleep(Duration::from_secs(2));
    store.new_events();
    let tps = clock_ticks_per_sec();
    // The first heartbeat (30 s after registration), for the counters.
    let wait = Instant::now();
    let status0 = loop {
        match source_status(&client) {
            Ok(s) => break Some(s),
            Err(_) if !poll && wait.elapsed() < Duration::from_secs(40) => {
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(_) => break None,
        }
    };
    let load = HostLoad::start(&[pm, agent.pid(), std::process::id()]);
    let (pm0, ag0, th0) = (cpu_of(pm), cpu_of(agent.pid()), threads_of(pm));
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(secs));
    let window = t0.elapsed();
    let (pm1, ag1, th1) = (cpu_of(pm), cpu_of(agent.pid()), threads_of(pm));
    let others = load.others_percent();
    let status1 = source_status(&client).ok();
    let events = store.new_events();
    if let Some(why) = agent.exited() {
        return Err(why);
    }
    let ours: Vec<&ProcessEvent> = events.iter().filter(|(c, _)| c == ID).map(|(_, e)| e).collect();
    let started = ours.iter().filter(|e| e.kind == EventKind::Started).count();
    let stopped = ours.iter().filter(|e| e.kind == EventKind::Stopped).count();
    let pm_ms = pm1.ms_since(&pm0, tps);
    println!("| what | measured |");
    println!("|---|---:|");
    println!(
        "| **procmond CPU over {:.1} s** | {pm_ms:.1} ms = **{:.3}% of one core** ({} ticks) |",
        window.as_secs_f64(),
        share(pm_ms, window),
        pm1.ticks - pm0.ticks
    );
    println!("| procmond threads, ms | {} |", thread_delta(&th0, &th1));
    println!("| agent CPU | {:.3}% of one core |", share(ag1.ms_since(&ag0, tps), window));
    println!(
        "| events committed in the window (other users' processes): Started / Stopped / all | {started} / {stopped} / {} |",
        ours.len()
    );
    if !poll {
        // Heartbeats come every 30 s: the counters between the last one
        // before the window and the last one in it.
        match (status0, status1) {
            (Some((a, at0)), Some((b, at1))) if at1 > at0 => println!(
                "| kernel events received (all kinds, threads included), per s, between heartbeats {:.0} s apart | {:.1} |",
                (at1 - at0) as f64 / 1e3,
                b.kernel_events.saturating_sub(a.kernel_events) as f64 * 1e3 / (at1 - at0) as f64
            ),
            _ => println!("| kernel events received per s | no two heartbeats |"),
        }
    }
    println!("| other load on the host (not procmond, agent, harness) | {others:.1}% of one core |");
    println!(
        "| procmond VmRSS / VmHWM | {} / {} KiB |",
        status_kib(&pm.to_string(), "VmRSS"),
        status_kib(&pm.to_string(), "VmHWM")
    );
    stop_agent(&mut agent)?;
    drop(agent);
    drop(kids);
    Ok(())
}

/// Hard links (or copies) of the agent, the CLI and procmond in a new
/// directory beside them, so that a rebuild during the run (cargo replaces
/// the files) does not change what is measured. Not in a temp dir: the
/// agent's built-in rules flag executables there.
fn pin(bins: &Bins) -> Result<(Bins, tempfile::TempDir), String> {
    let dir = bins.agent.parent().ok_or("no directory")?;
    let pinned =
        tempfile::Builder::new().prefix("bench-kernel-bins-").tempdir_in(dir).map_err(|e| e.to_string())?;
    for from in [&bins.agent, &bins.cli, &bins.procmond] {
        if !from.is_file() {
            continue;
        }
        let to = pinned.path().join(from.file_name().ok_or("no file name")?);
        if std::fs::hard_link(from, &to).is_err() {
            std::fs::copy(from, &to).map_err(|e| format!("{}: {e}", from.display()))?;
        }
    }
    Ok((Bins::in_dir(pinned.path()), pinned))
}

fn main() -> ExitCode {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs it
    // without: then a smoke run (a storm of 200, 20 paced processes),
    // skipped when the binaries are not built.
    let args: Vec<String> = std::env::args().skip(1).collect();
    let smoke = !args.iter().any(|a| a == "--bench");
    let only = args.iter().find(|a| !a.starts_with('-')).cloned();
    let Some(bins) = Bins::own().filter(|b| b.agent.is_file() && b.procmond.is_file()) else {
        let at = Bins::own().map_or("<target>/release".into(), |b| b.agent.display().to_string());
        if smoke {
            println!("kernel bench: no binaries at {at}: smoke run skipped");
            return ExitCode::SUCCESS;
        }
        eprintln!(
            "kernel bench: no daemoneye-agent or procmond binary at {at}: build them first: \
             cargo build --release -p procmond -p daemoneye-agent"
        );
        return ExitCode::FAILURE;
    };
    // The binaries as they are now: others may rebuild them while this
    // runs.
    let (bins, _pinned) = match pin(&bins) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("kernel bench: cannot pin the binaries: {e}");
            return ExitCode::FAILURE;
        }
    };
    let tools = match Tools::new() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("kernel bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "# kernel events benchmark ({} cores; {} modified at Unix {}, procmond at Unix {}; one collector)",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        bins.agent.display(),
        modified_secs(&bins.agent),
        modified_secs(&bins.procmond)
    );
    let _ = std::io::stdout().flush();
    let wants = |phase: &str| only.as_deref().is_none_or(|o| phase.contains(o));
    let result = if smoke {
        storm_phase(&bins, &tools, 200, 2).and_then(|()| latency_phase(&bins, &tools, false, 20, 50))
    } else {
        let storm = env_num("DAEMONEYE_BENCH_STORM", 10_000) as usize;
        let threads = env_num("DAEMONEYE_BENCH_STORM_THREADS", 4) as usize;
        let lat = env_num("DAEMONEYE_BENCH_LAT_COUNT", 500) as usize;
        let rate = env_num("DAEMONEYE_BENCH_LAT_RATE", 50);
        let busy_rate = env_num("DAEMONEYE_BENCH_BUSY_RATE", 1000);
        let busy_secs = env_num("DAEMONEYE_BENCH_BUSY_SECS", 10);
        let idle_procs = env_num("DAEMONEYE_BENCH_IDLE_PROCS", 1000) as usize;
        let idle_secs = env_num("DAEMONEYE_BENCH_IDLE_SECS", 60);
        type Phase<'a> = Box<dyn Fn() -> Result<(), String> + 'a>;
        let phases: [(&str, Phase); 6] = [
            ("storm", Box::new(|| storm_phase(&bins, &tools, storm, threads))),
            ("latency-kernel", Box::new(|| latency_phase(&bins, &tools, false, lat, rate))),
            ("latency-poll", Box::new(|| latency_phase(&bins, &tools, true, lat, rate))),
            ("cpu-busy", Box::new(|| cpu_busy_phase(&bins, &tools, busy_rate, busy_secs))),
            ("cpu-idle", Box::new(|| cpu_idle_phase(&bins, idle_procs, idle_secs, false))),
            ("cpu-idle-poll", Box::new(|| cpu_idle_phase(&bins, idle_procs, idle_secs, true))),
        ];
        let mut r = Ok(());
        for (name, f) in &phases {
            if wants(name) {
                let _ = std::io::stdout().flush();
                r = f();
                if r.is_err() {
                    break;
                }
            }
        }
        r
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kernel bench: {e}");
            ExitCode::FAILURE
        }
    }
}
