//! The task path end to end: the release `daemoneye-agent` as a child
//! process with two procmond collectors (`pm-a` and `pm-b`, `--interval
//! 5`, heartbeats at the agent's default), and this harness as a local bus
//! client (`bench-tasks-<pid>`) asking the agent's task coordinator on
//! `agent.task`, as `daemoneye-cli ps`, `inspect` and `hash` do: client →
//! broker → coordinator → broker → one procmond (queue group) or both
//! (broadcast) → coordinator → client. agent.yaml's `tasks` is
//! `{gather_timeout_ms: 10000, attempt_timeout_ms: 10000, deadline_ms:
//! 20000}` so that no large snapshot is cut. Two phases, each with its own
//! agent in its own temp dir:
//!
//! - **roundtrip** (the host's own processes, about 70): once each
//!   collector has answered an `inspect` of the agent's pid with a complete
//!   hash (its first cycle has run and the hash cache holds the agent's
//!   executable; that first answer, which reads and hashes the file, is
//!   reported apart), `DAEMONEYE_BENCH_REQUESTS` (2,000) sequential
//!   requests of each kind: `bus.stats` (answered by the broker: the
//!   client's floor) and `agent.status` (the agent's monitor, no
//!   collector) for context, `inspect` (a hash cache hit) and `hash` of a
//!   4 KiB file (a cache hit after the first); then
//!   `DAEMONEYE_BENCH_SNAPSHOTS` (20) snapshots from one collector and
//!   gathered from both, `inspect`s in an open loop (as below, over half
//!   the time: each finds the threads of the path asleep, as a lone
//!   `daemoneye-cli inspect` does), and `DAEMONEYE_BENCH_CLI_RUNS` (3)
//!   runs of `daemoneye-cli ps --json`.
//! - **snapshot**: `DAEMONEYE_BENCH_PROCS` (10,000) `sleep 3600` children,
//!   then the agent; once both collectors list them and the store has
//!   committed their snapshots: gathered and single-collector snapshots
//!   (20 each, a random pause of 0–250 ms before each, so they arrive at
//!   different moments of the collection interval; CPU of the agent, the
//!   collectors and this harness read around each), 2,000 back-to-back
//!   `inspect`s, then `inspect`s in an open loop: Poisson arrivals at
//!   `DAEMONEYE_BENCH_INSPECT_RATE` (25) per second over
//!   `DAEMONEYE_BENCH_INSPECT_SECS` (20) s, each on its own thread, so a
//!   request held up by a collection cycle delays no later one and the
//!   share of requests that meet a cycle is not understated; and the CLI.
//!
//! Every answer must be `Ok` (a gathered snapshot: both collectors listed,
//! none missing); anything else is counted, shown, and makes the run fail.
//! procmond answers tasks between collection cycles: an answer whose
//! `observed_unix_ms` (the end of the cycle it was served after) is not
//! before the moment the request was sent waited for that cycle, and the
//! harness counts those.
//!
//! Every phase ends with SIGTERM to the agent (it stops its collectors); a
//! collector still alive after that, with the same start time, is killed
//! by its pid, and so is every child of this harness.
//!
//! Run: `cargo build --release -p procmond -p daemoneye-agent && cargo bench
//! -p daemoneye-benches --bench tasks` (the bench runs the binaries of its
//! own target directory: `<target>/release/daemoneye-agent`,
//! `daemoneye-cli` and `procmond`). A word after `--` runs one phase only:
//! `-- roundtrip` or `-- snapshot`. `DAEMONEYE_BENCH_BIN_DIR` runs the
//! binaries of another directory (e.g. a debug build's), for comparisons.
//! `cargo test --benches` runs a smoke run (the round trips, 20 requests
//! each) with the binaries next to the test, or skips it when they are
//! missing.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use daemoneye_agent::api::{
    self, AgentStatus, AgentTaskRequest, AgentTaskResponse, GatherOutcome, STATUS_TOPIC, TASK_TOPIC,
};
use daemoneye_benches::agent::{Agent, Bins, COLLECTORS, INTERVAL_SECS, Shutdown};
use daemoneye_benches::{
    Cpu, clock_ticks_per_sec, count_procs, cpu_of, dist_cells, env_num, host_busy_ticks, modified_secs,
    now_ms, pct, sleepers_or_skip, splitmix,
};
use daemoneye_bus::{Client, ClientConfig};
use daemoneye_contract::control::{SnapshotFilter, TaskRequest, TaskResponse, TaskResult, TaskStatus};
use daemoneye_contract::event::HashOutcome;

/// The collectors' type.
const TYPE: &str = "process-monitor";
/// How long the harness waits for any one answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// agent.yaml's `tasks`.
const TASKS_YAML: &str = "tasks: {gather_timeout_ms: 10000, attempt_timeout_ms: 10000, deadline_ms: 20000}";

/// The binaries: those of this bench's target directory, or of
/// `DAEMONEYE_BENCH_BIN_DIR` (an experiment knob: other builds, a debug
/// one, of the binaries).
fn binaries() -> Option<Bins> {
    std::env::var_os("DAEMONEYE_BENCH_BIN_DIR").map_or_else(Bins::own, |d| Some(Bins::in_dir(Path::new(&d))))
}

// ---------------------------------------------------------------- agent --

/// The agent (agent.yaml's `tasks` is [`TASKS_YAML`]) started, and this
/// harness connected to its broker.
struct Started {
    agent: Agent,
    client: Client,
    /// When the agent was spawned.
    spawned: Instant,
    /// Host ticks and this harness's CPU before the agent was spawned, and
    /// when (for [`other_load`]).
    since: (u64, Cpu, Instant),
}

fn start(bins: &Bins) -> Result<Started, String> {
    let since = (host_busy_ticks(), cpu_of(std::process::id()), Instant::now());
    let mut agent = Agent::start("daemoneye-bench-tasks", bins, &format!("{TASKS_YAML}\n"), "")?;
    let spawned = Instant::now();
    let client = connect(&mut agent)?;
    Ok(Started { agent, client, spawned, since })
}

/// A bus client of the agent's broker, as a local client (the CLI's
/// permissions), once the broker welcomes it.
fn connect(agent: &mut Agent) -> Result<Client, String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !agent.socket.exists() {
        if let Some(why) = agent.exited() {
            return Err(why);
        }
        if Instant::now() > deadline {
            return Err(format!("no broker socket at {} within 60 s", agent.socket.display()));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut cfg = ClientConfig::new(&agent.socket, format!("bench-tasks-{}", std::process::id()));
    cfg.timeout = ANSWER_TIMEOUT;
    // Collectors and local clients are welcomed once the agent opens
    // its broker; the client retries until then.
    cfg.backoff_max = Duration::from_millis(100);
    let client = Client::connect(cfg).map_err(|e| e.to_string())?;
    if !client.wait_connected(Duration::from_secs(60)) {
        return Err(format!(
            "not welcomed by the broker at {} ({:?})",
            agent.socket.display(),
            client.state()
        ));
    }
    Ok(client)
}

// -------------------------------------------------------------- asking --

/// One answer: when the request was sent (Unix ms), the round trip (µs,
/// to the reply's bytes in hand), the reply's size, the decoding time (µs)
/// and the decoded answer.
struct Answer {
    sent_ms: u64,
    rtt_us: u64,
    bytes: usize,
    decode_us: u64,
    resp: AgentTaskResponse,
}

fn ask(client: &Client, req: &[u8]) -> Result<Answer, String> {
    let sent_ms = now_ms();
    let t = Instant::now();
    let reply = client.request(TASK_TOPIC, req, ANSWER_TIMEOUT).map_err(|e| format!("agent.task: {e}"))?;
    let rtt_us = t.elapsed().as_micros() as u64;
    let t = Instant::now();
    let resp = api::decode::<AgentTaskResponse>(&reply.payload).map_err(|e| format!("bad answer: {e}"))?;
    let decode_us = t.elapsed().as_micros() as u64;
    Ok(Answer { sent_ms, rtt_us, bytes: reply.payload.len(), decode_us, resp })
}

fn one(task: TaskRequest) -> Vec<u8> {
    api::encode(&AgentTaskRequest::One { collector_type: TYPE.into(), task })
}

fn gathered() -> Vec<u8> {
    api::encode(&AgentTaskRequest::All { collector_type: TYPE.into(), filter: SnapshotFilter::default() })
}

/// The collector's answer to a one-collector task when it is `Ok` (and,
/// for a hash or an inspect, with a complete SHA-256); else why not.
fn ok_one(resp: &AgentTaskResponse) -> Result<&TaskResponse, String> {
    let o = match resp {
        AgentTaskResponse::One(o) => o,
        AgentTaskResponse::Refused(why) => return Err(format!("refused: {why}")),
        AgentTaskResponse::All(_) => return Err("a gathered answer to a single task".into()),
    };
    let Some(r) = &o.response else {
        return Err(format!("no answer: {}", o.error.as_deref().unwrap_or("?")));
    };
    if r.status != TaskStatus::Ok {
        return Err(format!(
            "{} answered {:?}: {}",
            r.collector_id,
            r.status,
            r.message.as_deref().unwrap_or("")
        ));
    }
    let sha = match &r.result {
        Some(TaskResult::Inspect(d)) => Some(&d.sha256),
        Some(TaskResult::Hash(h)) => Some(&h.sha256),
        _ => None,
    };
    match sha {
        Some(HashOutcome::Sha256(_)) | None => Ok(r),
        Some(other) => Err(format!("{} answered Ok with hash {other:?}", r.collector_id)),
    }
}

/// A gathered snapshot with both collectors listed and none missing.
fn ok_all(resp: &AgentTaskResponse) -> Result<&GatherOutcome, String> {
    match resp {
        AgentTaskResponse::All(g)
            if g.missing.is_empty()
                && g.answered.len() == COLLECTORS.len()
                && g.answered.iter().all(|a| a.status == TaskStatus::Ok) =>
        {
            Ok(g)
        }
        AgentTaskResponse::All(g) => Err(format!(
            "gathered: answered {:?}, missing {:?}",
            g.answered.iter().map(|a| (&a.collector_id, a.status)).collect::<Vec<_>>(),
            g.missing.iter().map(|m| format!("{}: {}", m.collector_id, m.reason)).collect::<Vec<_>>()
        )),
        AgentTaskResponse::Refused(why) => Err(format!("refused: {why}")),
        AgentTaskResponse::One(_) => Err("a single answer to a gathered snapshot".into()),
    }
}

/// When the cycle that an answer was served after ended (Unix ms).
fn observed_ms(r: &TaskResponse) -> Option<u64> {
    match &r.result {
        Some(TaskResult::Snapshot(l)) => Some(l.observed_unix_ms),
        Some(TaskResult::Inspect(d)) => Some(d.observed_unix_ms),
        _ => None,
    }
}

/// The agent's status (its monitor answers).
fn status(client: &Client) -> Result<AgentStatus, String> {
    let m = client.request(STATUS_TOPIC, b"", ANSWER_TIMEOUT).map_err(|e| format!("agent.status: {e}"))?;
    api::decode(&m.payload).map_err(|e| format!("bad status: {e}"))
}

/// Per collector, the agent's count of its answers and their summed round
/// trip (agent → collector → agent, µs), from the mean the status gives.
fn agent_side(client: &Client) -> BTreeMap<String, (u64, u64)> {
    status(client)
        .map(|s| {
            s.collectors
                .iter()
                .map(|c| (c.id.clone(), (c.tasks.served, c.tasks.served * c.tasks.avg_latency_us)))
                .collect()
        })
        .unwrap_or_default()
}

/// The agent's mean round trip to the collectors between two readings
/// of [`agent_side`], µs.
fn agent_side_mean(
    before: &BTreeMap<String, (u64, u64)>,
    after: &BTreeMap<String, (u64, u64)>,
) -> Option<u64> {
    let (mut n, mut sum) = (0, 0);
    for (id, (served, total)) in after {
        let (s0, t0) = before.get(id).copied().unwrap_or((0, 0));
        n += served - s0;
        sum += total.saturating_sub(t0);
    }
    sum.checked_div(n)
}

/// Asks `task` until each collector has answered it `Ok` with a complete
/// hash (its first cycle ran, its hash cache holds the file). Returns, per
/// collector, its first `Ok` answer: the round trip (µs) and the serving
/// attempt as the agent timed it (agent ⇄ collector, µs; the round trip
/// may also hold earlier attempts and the coordinator's pause when no
/// collector had joined the task group yet).
type Firsts = BTreeMap<String, (u64, u64)>;

fn warm_up(client: &Client, agent: &mut Agent, task: &TaskRequest) -> Result<Firsts, String> {
    let req = one(task.clone());
    let mut first = Firsts::new();
    let attempt_us = |resp: &AgentTaskResponse| match resp {
        AgentTaskResponse::One(o) => o.attempts.last().map_or(0, |a| a.elapsed_ms * 1000),
        _ => 0,
    };
    let mut complete: BTreeMap<String, bool> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut last = String::new();
    while complete.len() < COLLECTORS.len() || complete.values().any(|c| !c) {
        if let Some(why) = agent.exited() {
            return Err(why);
        }
        if Instant::now() > deadline {
            return Err(format!(
                "no complete answer of both collectors to {task:?} within 90 s; last: {last}"
            ));
        }
        match ask(client, &req) {
            Ok(a) => match (&a.resp, ok_one(&a.resp)) {
                (_, Ok(r)) => {
                    first.entry(r.collector_id.clone()).or_insert((a.rtt_us, attempt_us(&a.resp)));
                    complete.insert(r.collector_id.clone(), true);
                }
                (AgentTaskResponse::One(o), Err(why)) => {
                    if let Some(r) = o.response.as_ref().filter(|r| r.status == TaskStatus::Ok) {
                        // Ok, the hash deferred: the budget ran out.
                        first.entry(r.collector_id.clone()).or_insert((a.rtt_us, attempt_us(&a.resp)));
                        complete.entry(r.collector_id.clone()).or_insert(false);
                    }
                    last = why;
                    std::thread::sleep(Duration::from_millis(50));
                }
                (_, Err(why)) => {
                    last = why;
                    std::thread::sleep(Duration::from_millis(50));
                }
            },
            Err(e) => {
                last = e;
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    Ok(first)
}

// ------------------------------------------------------------ figures --

/// µs as ms with two decimals.
fn ms2(us: u64) -> String {
    format!("{:.2}", us as f64 / 1000.0)
}

/// One table row: n, p50, p90, p99, max, min (ms), then notes.
fn row(what: &str, v: &[u64], notes: &str) {
    println!("| {what} | {} | {notes} |", dist_cells(v, 2));
}

fn header() {
    println!("| request | n | p50 ms | p90 ms | p99 ms | max ms | min ms | notes |");
    println!("|---|---:|---:|---:|---:|---:|---:|---|");
}

/// Failures seen, with the first few messages kept.
#[derive(Default)]
struct Failures {
    count: usize,
    first: Vec<String>,
}

impl Failures {
    fn add(&mut self, what: &str, why: String) {
        self.count += 1;
        if self.first.len() < 5 {
            self.first.push(format!("{what}: {why}"));
        }
    }
}

/// One-collector requests; every answer checked: the round trips (µs),
/// who served how many, the answers with more than one attempt, the waits
/// for a cycle (µs, for the answers that waited), the agent's own round
/// trip to the collector (the last attempt's `elapsed_ms`, in µs), and
/// CPU per request when asked for.
#[derive(Default)]
struct OneRun {
    rtt: Vec<u64>,
    served_by: BTreeMap<String, u64>,
    retried: u64,
    waited: Vec<u64>,
    bytes: usize,
    decode: Vec<u64>,
    processes: usize,
    agent_side: Vec<u64>,
    /// The round trips of the answers that did not wait for a cycle.
    clear: Vec<u64>,
    /// Summed CPU of the agent, of both collectors, and of this harness, ms.
    cpu_ms: [f64; 3],
}

impl OneRun {
    fn record(&mut self, name: &str, a: Result<Answer, String>, fails: &mut Failures) {
        let a = match a {
            Ok(a) => a,
            Err(e) => return fails.add(name, e),
        };
        match ok_one(&a.resp) {
            Ok(r) => {
                *self.served_by.entry(r.collector_id.clone()).or_default() += 1;
                match observed_ms(r).filter(|&o| o >= a.sent_ms) {
                    Some(o) => self.waited.push(a.rtt_us.min((o - a.sent_ms) * 1000)),
                    None => self.clear.push(a.rtt_us),
                }
                if let Some(TaskResult::Snapshot(l)) = &r.result {
                    self.processes = l.processes.len();
                }
            }
            Err(why) => fails.add(name, why),
        }
        if let AgentTaskResponse::One(o) = &a.resp {
            self.retried += u64::from(o.attempts.len() > 1);
            if let Some(last) = o.attempts.last() {
                self.agent_side.push(last.elapsed_ms * 1000);
            }
        }
        self.rtt.push(a.rtt_us);
        self.decode.push(a.decode_us);
        self.bytes = a.bytes;
    }
}

/// `n` sequential requests, each after a random pause of up to `pause_ms`;
/// with `cpu`, the CPU of the agent, its collectors and this harness is
/// read around each.
fn run_one(
    client: &Client,
    task: TaskRequest,
    n: usize,
    pause_ms: u64,
    seed: &mut u64,
    cpu: Option<&Agent>,
    fails: &mut Failures,
) -> OneRun {
    let req = one(task.clone());
    let name = format!("{task:?}");
    let tps = clock_ticks_per_sec();
    let mut run = OneRun::default();
    for _ in 0..n {
        if pause_ms > 0 {
            std::thread::sleep(Duration::from_micros(splitmix(seed) % (pause_ms * 1000)));
        }
        let before = cpu.map(|a| (a.cpu(), cpu_of(std::process::id())));
        let a = ask(client, &req);
        if let (Some(agent), Some((c0, own0))) = (cpu, before) {
            let (c1, own1) = (agent.cpu(), cpu_of(std::process::id()));
            run.cpu_ms[0] += c1[0].ms_since(&c0[0], tps);
            run.cpu_ms[1] += c1.iter().zip(&c0).skip(1).map(|(b, a)| b.ms_since(a, tps)).sum::<f64>();
            run.cpu_ms[2] += own1.ms_since(&own0, tps);
        }
        run.record(&name, a, fails);
    }
    run
}

/// Requests at Poisson arrivals of `rate` per second over `secs`, each on
/// its own thread: open loop, so a request that waits for a cycle holds
/// up no later one, and the share of requests that meet a cycle is the
/// share of time the collectors spend in one.
fn run_open(
    client: &Client,
    task: TaskRequest,
    rate: f64,
    secs: u64,
    seed: &mut u64,
    fails: &mut Failures,
) -> (OneRun, usize) {
    let req = one(task.clone());
    let name = format!("{task:?}");
    let t0 = Instant::now();
    let end = Duration::from_secs(secs);
    let mut at = Duration::ZERO;
    let mut most_in_flight = 0;
    let in_flight = std::sync::atomic::AtomicUsize::new(0);
    let answers: Vec<Result<Answer, String>> = std::thread::scope(|s| {
        let mut handles = Vec::new();
        loop {
            // Exponential gaps: -ln(U) / rate, U in (0, 1].
            let u = ((splitmix(seed) >> 11) + 1) as f64 / (1u64 << 53) as f64;
            at += Duration::from_secs_f64(-u.ln() / rate);
            if at >= end {
                break;
            }
            std::thread::sleep(at.saturating_sub(t0.elapsed()));
            let n = in_flight.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            most_in_flight = most_in_flight.max(n);
            let (req, in_flight) = (&req, &in_flight);
            handles.push(s.spawn(move || {
                let a = ask(client, req);
                in_flight.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                a
            }));
        }
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err("thread panicked".into()))).collect()
    });
    let mut run = OneRun::default();
    for a in answers {
        run.record(&name, a, fails);
    }
    (run, most_in_flight)
}

fn served_note(run: &OneRun) -> String {
    let by: Vec<String> = run.served_by.iter().map(|(k, v)| format!("{k} {v}")).collect();
    format!("served by {}; with a failover {}", by.join(" / "), run.retried)
}

/// Gathered snapshots, each after a pause of up to `pause_ms`.
struct AllRun {
    rtt: Vec<u64>,
    decode: Vec<u64>,
    bytes: usize,
    merged: usize,
    per_collector: Vec<u64>,
    seen_by_one: usize,
    /// The last answer's cycle ends per collector (Unix ms).
    observed: Vec<(String, u64)>,
    /// Per request, the slowest collector's latency as the agent saw it.
    slowest_ms: Vec<u64>,
    waited: usize,
    agent_cpu_ms: f64,
    collectors_cpu_ms: f64,
    own_cpu_ms: f64,
}

fn run_all(
    client: &Client,
    agent: &Agent,
    n: usize,
    pause_ms: u64,
    seed: &mut u64,
    fails: &mut Failures,
) -> AllRun {
    let req = gathered();
    let tps = clock_ticks_per_sec();
    let mut run = AllRun {
        rtt: Vec::with_capacity(n),
        decode: Vec::with_capacity(n),
        bytes: 0,
        merged: 0,
        per_collector: Vec::new(),
        observed: Vec::new(),
        seen_by_one: 0,
        slowest_ms: Vec::new(),
        waited: 0,
        agent_cpu_ms: 0.0,
        collectors_cpu_ms: 0.0,
        own_cpu_ms: 0.0,
    };
    for _ in 0..n {
        if pause_ms > 0 {
            std::thread::sleep(Duration::from_micros(splitmix(seed) % (pause_ms * 1000)));
        }
        let (c0, own0) = (agent.cpu(), cpu_of(std::process::id()));
        let a = ask(client, &req);
        let (c1, own1) = (agent.cpu(), cpu_of(std::process::id()));
        run.agent_cpu_ms += c1[0].ms_since(&c0[0], tps);
        run.collectors_cpu_ms += c1.iter().zip(&c0).skip(1).map(|(b, a)| b.ms_since(a, tps)).sum::<f64>();
        run.own_cpu_ms += own1.ms_since(&own0, tps);
        match a {
            Ok(a) => {
                match ok_all(&a.resp) {
                    Ok(g) => {
                        run.merged = g.processes.len();
                        run.per_collector = g.answered.iter().map(|c| c.processes).collect();
                        run.observed = g
                            .answered
                            .iter()
                            .filter_map(|c| Some((c.collector_id.clone(), c.observed_unix_ms?)))
                            .collect();
                        run.observed.sort();
                        run.seen_by_one = g.processes.iter().filter(|p| p.seen_by.len() < 2).count();
                        run.slowest_ms.push(g.answered.iter().map(|c| c.latency_ms).max().unwrap_or(0));
                        if g.answered.iter().any(|c| c.observed_unix_ms.is_some_and(|o| o >= a.sent_ms)) {
                            run.waited += 1;
                        }
                    }
                    Err(why) => fails.add("gathered snapshot", why),
                }
                run.rtt.push(a.rtt_us);
                run.decode.push(a.decode_us);
                run.bytes = a.bytes;
            }
            Err(e) => fails.add("gathered snapshot", e),
        }
    }
    run
}

/// `daemoneye-cli --config <agent.yaml> --json ps`, `runs` times: wall
/// time from spawn to exit (µs) and the output's size.
fn run_cli(bins: &Bins, agent: &Agent, runs: usize, fails: &mut Failures) -> (Vec<u64>, usize, usize) {
    let (mut t, mut bytes, mut lines) = (Vec::new(), 0, 0);
    for _ in 0..runs {
        let s = Instant::now();
        let out = Command::new(&bins.cli)
            .arg("--config")
            .arg(&agent.cfg)
            .arg("--json")
            .arg("ps")
            .stdin(Stdio::null())
            .output();
        let took = s.elapsed().as_micros() as u64;
        match out {
            Ok(o) if o.status.success() => {
                t.push(took);
                bytes = o.stdout.len();
                lines = o.stdout.iter().filter(|&&b| b == b'\n').count();
            }
            Ok(o) => fails.add(
                "daemoneye-cli ps --json",
                format!("{}: {}", o.status, String::from_utf8_lossy(&o.stderr).trim()),
            ),
            Err(e) => fails.add("daemoneye-cli ps --json", e.to_string()),
        }
    }
    (t, bytes, lines)
}

/// Sequential requests answered by the broker or the agent's monitor (no
/// collector): round trips in µs.
fn run_plain(client: &Client, n: usize, status_topic: bool, fails: &mut Failures) -> Vec<u64> {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let r = if status_topic {
            client.request(STATUS_TOPIC, b"", ANSWER_TIMEOUT).map(|_| ())
        } else {
            client.broker_stats(ANSWER_TIMEOUT).map(|_| ())
        };
        match r {
            Ok(()) => v.push(t.elapsed().as_micros() as u64),
            Err(e) => fails.add(if status_topic { "agent.status" } else { "bus.stats" }, e.to_string()),
        }
    }
    v
}

// --------------------------------------------------------------- phases --

fn stop_and_report(agent: &mut Agent, client: &Client) -> Result<(), String> {
    if let Ok(s) = status(client) {
        let t = &s.tasks;
        println!(
            "\nagent's task counters: requests {}, answered {}, unanswered {}, failovers {}, timeouts {}, \
             gathers {}, partial gathers {}",
            t.requests, t.answered, t.unanswered, t.failovers, t.timeouts, t.gathers, t.partial_gathers
        );
    }
    let Shutdown { took, status, alive, log } = agent.shut_down()?;
    println!(
        "SIGTERM → agent exited in {:.2} s, {status}; collectors still running after: {alive}",
        took.as_secs_f64()
    );
    println!("agent log (info): {} lines, {} WARN/ERROR lines (alerts aside)", log.lines, log.bad.len());
    log.print_bad();
    for l in log.partial.iter().take(3) {
        println!("    partial gather: {l}");
    }
    Ok(())
}

/// The host's busy time since `since` (host ticks and this harness's CPU
/// then), less the agent's and its collectors' (all of it: they started
/// after) and this harness's, as a share of one core.
fn other_load(agent: &Agent, since: (u64, Cpu, Instant)) -> String {
    let (host0, own0, t0) = since;
    let ours: u64 = agent.cpu().iter().map(|c| c.ticks).sum::<u64>() + cpu_of(std::process::id()).ticks;
    let others = host_busy_ticks().saturating_sub(host0).saturating_sub(ours.saturating_sub(own0.ticks));
    let pct = others as f64 / clock_ticks_per_sec() as f64 / t0.elapsed().as_secs_f64() * 100.0;
    format!(
        "other load on the host during the phase (not the agent, its collectors, this harness): {pct:.1}% of one core"
    )
}

fn report_failures(fails: &Failures) -> Result<(), String> {
    if fails.count == 0 {
        println!("every answer Ok");
        return Ok(());
    }
    println!("**{} answers not Ok**; first ones:", fails.count);
    for f in &fails.first {
        println!("    {f}");
    }
    Err(format!("{} answers were not Ok", fails.count))
}

/// Settings of a run.
struct Plan {
    requests: usize,
    snapshots: usize,
    cli_runs: usize,
    procs: usize,
    inspect_secs: u64,
    inspect_rate: f64,
}

fn roundtrip_phase(bins: &Bins, plan: &Plan) -> Result<(), String> {
    let Started { mut agent, client, spawned, since } = start(bins)?;
    let pid = agent.pid();
    let inspect = TaskRequest::Inspect { pid };
    let cold = warm_up(&client, &mut agent, &inspect)?;
    let ready = spawned.elapsed();
    agent.find_collectors()?;
    // A small file to hash (the temp dir is private to this user).
    let file = agent.dir().join("small.bin");
    std::fs::write(&file, (0..4096u32).map(|i| (i % 251) as u8).collect::<Vec<u8>>())
        .map_err(|e| e.to_string())?;
    let hash = TaskRequest::Hash { path: file.display().to_string() };
    let cold_hash = warm_up(&client, &mut agent, &hash)?;
    let exe_size = std::fs::metadata(&bins.agent).map_or(0, |m| m.len());
    println!(
        "\n## Round trips: 2 collectors, {} processes on the host\n\nagent pid {pid}; both collectors \
         answered an inspect of it with a complete hash {:.2} s after the agent was spawned\n",
        count_procs(),
        ready.as_secs_f64()
    );
    let cold_note = |m: &Firsts| {
        m.iter()
            .map(|(k, (rtt, attempt))| {
                format!("{k} {} ms (agent ⇄ collector {} ms)", ms2(*rtt), attempt / 1000)
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "first Ok inspect per collector, round trip (its hash cache is cold: it reads and hashes the agent's \
         {:.1} MiB executable): {}",
        exe_size as f64 / 1048576.0,
        cold_note(&cold)
    );
    println!("first hash of the 4 KiB file per collector (cache miss): {}\n", cold_note(&cold_hash));

    let mut fails = Failures::default();
    let mut seed = now_ms();
    let n = plan.requests;
    let stats = run_plain(&client, n, false, &mut fails);
    let st = run_plain(&client, n, true, &mut fails);
    let b0 = agent_side(&client);
    let ins = run_one(&client, inspect.clone(), n, 0, &mut seed, None, &mut fails);
    let b1 = agent_side(&client);
    let hs = run_one(&client, hash, n, 0, &mut seed, None, &mut fails);
    let b2 = agent_side(&client);
    let snapshot = TaskRequest::Snapshot(SnapshotFilter::default());
    let single = run_one(&client, snapshot, plan.snapshots, 0, &mut seed, None, &mut fails);
    let all = run_all(&client, &agent, plan.snapshots, 0, &mut seed, &mut fails);
    let idle_secs = plan.inspect_secs / 2;
    let (open, _) = run_open(&client, inspect.clone(), plan.inspect_rate, idle_secs, &mut seed, &mut fails);
    let (cli, cli_bytes, _) = run_cli(bins, &agent, plan.cli_runs, &mut fails);
    if let Some(why) = agent.exited() {
        return Err(why);
    }
    let mean = |a, b| agent_side_mean(a, b).map_or("?".to_owned(), ms2);
    header();
    row("`bus.stats` (the broker answers: the client's floor)", &stats, "");
    row("`agent.status` (the agent's monitor, no collector)", &st, "");
    row(
        "**inspect** (agent's pid; hash cache hit)",
        &ins.rtt,
        &format!(
            "{}; answer {} B; agent ⇄ collector mean {} ms; waited for a cycle {}",
            served_note(&ins),
            ins.bytes,
            mean(&b0, &b1),
            ins.waited.len()
        ),
    );
    row(
        "**hash** of a 4 KiB file (cache hit)",
        &hs.rtt,
        &format!("{}; answer {} B; agent ⇄ collector mean {} ms", served_note(&hs), hs.bytes, mean(&b1, &b2)),
    );
    row(
        &format!("inspect, open loop: Poisson arrivals, {}/s over {idle_secs} s", plan.inspect_rate),
        &open.rtt,
        &format!("{}; waited for a cycle {}", served_note(&open), open.waited.len()),
    );
    row(
        "snapshot, one collector",
        &single.rtt,
        &format!("{} processes, {} B; {}", single.processes, single.bytes, served_note(&single)),
    );
    row(
        "snapshot gathered from both",
        &all.rtt,
        &format!("{} merged ({:?} per collector), {} B", all.merged, all.per_collector, all.bytes),
    );
    row("`daemoneye-cli --json ps` (spawn to exit)", &cli, &format!("{cli_bytes} B of JSON"));
    println!("\n{}", other_load(&agent, since));
    report_failures(&fails).and(stop_and_report(&mut agent, &client))
}

fn snapshot_phase(bins: &Bins, plan: &Plan) -> Result<(), String> {
    let n = plan.procs;
    let Some((kids, took)) = sleepers_or_skip(&format!("snapshot with N={n}"), n, 200) else {
        return Ok(());
    };
    let spawn_secs = took.as_secs_f64();
    let Started { mut agent, client, spawned, since } = start(bins)?;
    let mut fails = Failures::default();
    // Both collectors list the children...
    let want = kids.0.len();
    let deadline = Instant::now() + Duration::from_secs(120);
    let req = gathered();
    loop {
        if let Some(why) = agent.exited() {
            return Err(why);
        }
        if let Ok(a) = ask(&client, &req)
            && let Ok(g) = ok_all(&a.resp)
            && g.answered.iter().all(|c| c.processes >= want as u64)
        {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("the collectors did not list {want} children within 120 s"));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let listed = spawned.elapsed();
    // ... and the store has committed their snapshots (nothing new for 1 s).
    let mut committed = (0, Instant::now());
    while committed.1.elapsed() < Duration::from_secs(1) {
        let c = status(&client)?.store.events_committed;
        if c != committed.0 || c < 2 * want as u64 {
            committed = (c, Instant::now());
        }
        if Instant::now() > deadline {
            return Err(format!("the store did not settle within 120 s ({} events)", committed.0));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let settled = spawned.elapsed();
    agent.find_collectors()?;
    let pid = agent.pid();
    let inspect = TaskRequest::Inspect { pid };
    warm_up(&client, &mut agent, &inspect)?;
    println!(
        "\n## Snapshots: 2 collectors, {want} sleeping children ({} processes on the host; spawned in {spawn_secs:.1} \
         s)\n\nagent pid {pid}; both collectors listed the children {:.2} s after the agent was spawned, \
         the store had committed {} events at {:.2} s\n",
        count_procs(),
        listed.as_secs_f64(),
        committed.0,
        settled.as_secs_f64()
    );
    let mut seed = now_ms();
    let all = run_all(&client, &agent, plan.snapshots, 250, &mut seed, &mut fails);
    let snapshot = TaskRequest::Snapshot(SnapshotFilter::default());
    let single = run_one(&client, snapshot, plan.snapshots, 250, &mut seed, Some(&agent), &mut fails);
    let b0 = agent_side(&client);
    let ins = run_one(&client, inspect.clone(), plan.requests, 0, &mut seed, None, &mut fails);
    let b1 = agent_side(&client);
    let (open, most_in_flight) =
        run_open(&client, inspect.clone(), plan.inspect_rate, plan.inspect_secs, &mut seed, &mut fails);
    let (cli, cli_bytes, cli_lines) = run_cli(bins, &agent, plan.cli_runs, &mut fails);
    if let Some(why) = agent.exited() {
        return Err(why);
    }
    let per = |ms: f64, k: usize| ms / k.max(1) as f64;
    header();
    row(
        "**snapshot gathered from both**",
        &all.rtt,
        &format!(
            "{} merged ({:?} per collector; {} seen by one only), **{} B**; waited for a cycle {}",
            all.merged, all.per_collector, all.seen_by_one, all.bytes, all.waited
        ),
    );
    let slowest: Vec<u64> = all.slowest_ms.iter().map(|m| m * 1000).collect();
    row("  of which the slower collector's answer, as the agent saw it", &slowest, "ms resolution");
    row("  decoding the answer in the client (postcard)", &all.decode, "");
    row(
        "**snapshot, one collector**",
        &single.rtt,
        &format!(
            "{} processes, **{} B**; {}; waited for a cycle {}",
            single.processes,
            single.bytes,
            served_note(&single),
            single.waited.len()
        ),
    );
    row("  of which agent ⇄ collector, as the agent saw it", &single.agent_side, "ms resolution");
    row("  decoding the answer in the client", &single.decode, "");
    row(
        "**inspect**, back to back",
        &ins.rtt,
        &format!(
            "{}; agent ⇄ collector mean {} ms; waited for a cycle {}",
            served_note(&ins),
            agent_side_mean(&b0, &b1).map_or("?".to_owned(), ms2),
            ins.waited.len()
        ),
    );
    let mut waited = open.waited.clone();
    waited.sort_unstable();
    row(
        &format!(
            "**inspect**, open loop: Poisson arrivals, {}/s over {} s",
            plan.inspect_rate, plan.inspect_secs
        ),
        &open.rtt,
        &format!(
            "{}; at most {most_in_flight} in flight; waited for a cycle {} ({:.1}%), the wait p50 / max \
             {} / {} ms",
            served_note(&open),
            waited.len(),
            waited.len() as f64 * 100.0 / open.rtt.len().max(1) as f64,
            ms2(pct(&waited, 0.5)),
            ms2(waited.last().copied().unwrap_or(0))
        ),
    );
    row("  of which those that met no cycle", &open.clear, "");
    row(
        "`daemoneye-cli --json ps` (spawn to exit)",
        &cli,
        &format!("{cli_bytes} B of JSON, {cli_lines} line(s)"),
    );
    println!(
        "\nCPU per gathered snapshot: agent {:.1} ms, both collectors {:.1} ms, this harness {:.1} ms",
        per(all.agent_cpu_ms, plan.snapshots),
        per(all.collectors_cpu_ms, plan.snapshots),
        per(all.own_cpu_ms, plan.snapshots)
    );
    println!(
        "CPU per one-collector snapshot: agent {:.1} ms, the collectors {:.1} ms, this harness {:.1} ms",
        per(single.cpu_ms[0], plan.snapshots),
        per(single.cpu_ms[1], plan.snapshots),
        per(single.cpu_ms[2], plan.snapshots)
    );
    if let [(a, x), (b, y)] = all.observed.as_slice() {
        // The two collectors' last cycle ends, modulo the interval.
        let i = (INTERVAL_SECS * 1000) as i64;
        let d = ((*y as i64 - *x as i64) % i + i + i / 2) % i - i / 2;
        println!("cycle ends: {b} {d:+} ms from {a} (the last gathered snapshot's answers)");
    }
    println!("{}\n", other_load(&agent, since));
    let r = report_failures(&fails).and(stop_and_report(&mut agent, &client));
    drop(agent);
    drop(kids);
    r
}

fn main() -> ExitCode {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs it
    // without: then a smoke run (a few requests, no 10,000 children),
    // skipped when the binaries are not built.
    let args: Vec<String> = std::env::args().skip(1).collect();
    let smoke = !args.iter().any(|a| a == "--bench");
    let only = args.iter().find(|a| !a.starts_with('-')).cloned();
    let Some(bins) = binaries().filter(|b| b.agent.is_file() && b.procmond.is_file() && b.cli.is_file())
    else {
        let at = binaries().and_then(|b| b.agent.parent().map(Path::to_path_buf));
        let at = at.map_or("<target>/release".into(), |p| p.display().to_string());
        if smoke {
            println!("tasks bench: no binaries in {at}: smoke run skipped");
            return ExitCode::SUCCESS;
        }
        eprintln!(
            "tasks bench: no daemoneye-agent, daemoneye-cli or procmond binary in {at}: build them first: \
             cargo build --release -p procmond -p daemoneye-agent"
        );
        return ExitCode::FAILURE;
    };
    println!(
        "# tasks benchmark ({} cores; {} modified at Unix {}, procmond at Unix {}; 2 collectors, interval \
         {INTERVAL_SECS} s; {TASKS_YAML})",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        bins.agent.display(),
        modified_secs(&bins.agent),
        modified_secs(&bins.procmond)
    );
    let plan = if smoke {
        Plan { requests: 20, snapshots: 2, cli_runs: 1, procs: 0, inspect_secs: 0, inspect_rate: 1.0 }
    } else {
        Plan {
            requests: env_num("DAEMONEYE_BENCH_REQUESTS", 2_000) as usize,
            snapshots: env_num("DAEMONEYE_BENCH_SNAPSHOTS", 20) as usize,
            cli_runs: env_num("DAEMONEYE_BENCH_CLI_RUNS", 3) as usize,
            procs: env_num("DAEMONEYE_BENCH_PROCS", 10_000) as usize,
            inspect_secs: env_num("DAEMONEYE_BENCH_INSPECT_SECS", 20),
            inspect_rate: env_num("DAEMONEYE_BENCH_INSPECT_RATE", 25).max(1) as f64,
        }
    };
    let wants = |phase: &str| only.as_deref().is_none_or(|o| phase.contains(o));
    let mut result = Ok(());
    if wants("roundtrip") {
        result = roundtrip_phase(&bins, &plan);
    }
    if result.is_ok() && !smoke && wants("snapshot") {
        result = snapshot_phase(&bins, &plan);
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tasks bench: {e}");
            ExitCode::FAILURE
        }
    }
}
