//! The agent end to end: the release `daemoneye-agent` as a child process
//! with two procmond collectors (`pm-a` and `pm-b`, `--interval 5`,
//! heartbeats every 5 s, the built-in rules on), and its SQLite store
//! (`<data_dir>/events.db`) read from this harness through a read-only
//! connection. Two phases, each with its own agent in its own temp dir:
//!
//! - **latency**: once both collectors' first snapshots are committed,
//!   `DAEMONEYE_BENCH_MARKERS` (200) marker processes (`sleep 8`) are
//!   spawned at random moments over `DAEMONEYE_BENCH_MARKER_SECS` (60) s.
//!   The harness polls the store every 2 ms for new rows (`id >` the last
//!   one seen) and takes the start of the poll that first returns a
//!   marker's `started` row as the moment it was committed, per collector.
//!   Reported: spawn → committed (what an operator waits for), spawn →
//!   observed (`observed_ms`, stamped by procmond after its `/proc` walk)
//!   and observed → committed (procmond's WAL and fsync, the bus, the
//!   store writer's batch and its commit).
//! - **resources**: `DAEMONEYE_BENCH_PROCS` (10,000) `sleep 3600` children,
//!   then the agent. The snapshot's commit (every collector's snapshot
//!   rows ≥ N, then 2 s without another), the agent's CPU up to then, then
//!   `DAEMONEYE_BENCH_CYCLES` (6) collection intervals without any polling
//!   of the store: CPU (utime + stime and the CPU clock, whole process, and
//!   per thread from `schedstat`) of the agent and of each collector, RSS
//!   after. Then `DAEMONEYE_BENCH_LOADED_MARKERS` (100) markers over 30 s
//!   with the N children still there (0 skips this).
//!
//! `DAEMONEYE_BENCH_BATCH_WAIT_MS` sets the agent's `store.batch_wait_ms`
//! (default: the agent's own, 20 ms), for experiments.
//!
//! Every phase ends with SIGTERM to the agent (it stops its collectors);
//! a collector still alive after that, with the same start time, is
//! killed by its pid, and so is every child of this harness.
//!
//! Run: `cargo build --release -p procmond -p daemoneye-agent && cargo bench
//! -p daemoneye-benches --bench agent` (the bench runs the binaries of its
//! own target directory: `<target>/release/daemoneye-agent` and
//! `<target>/release/procmond`). A word after `--` runs one phase only:
//! `-- latency` or `-- resources`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use daemoneye_benches::agent::{Agent, Bins, COLLECTORS, INTERVAL_SECS, Shutdown};
use daemoneye_benches::{
    Children, Cpu, clock_ticks_per_sec, count_procs, cpu_of, dist_cells, env_num, host_busy_ticks, mib,
    modified_secs, now_us, pct, sleepers_or_skip, splitmix, stat_of, status_kib,
};
use rusqlite::{Connection, OpenFlags};

/// How often the store is read while markers are timed.
const POLL: Duration = Duration::from_millis(2);
/// A marker's life: longer than an interval and a cycle, so each collector
/// sees it once.
const MARKER_LIFE: Duration = Duration::from_secs(8);
/// The agent's temp dirs.
const PREFIX: &str = "daemoneye-bench-agent";

// ------------------------------------------------------------ /proc --

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

// ---------------------------------------------------------------- agent --

/// Starts the agent: the built-in rules on, heartbeats every interval,
/// and `DAEMONEYE_BENCH_BATCH_WAIT_MS` as the store writer's batch
/// gathering time when set (an experiment knob).
fn start_agent(bins: &Bins) -> Result<Agent, String> {
    let mut top = "default_rules: true\n".to_owned();
    if let Ok(ms) = std::env::var("DAEMONEYE_BENCH_BATCH_WAIT_MS") {
        top.push_str(&format!("store:\n  batch_wait_ms: {}\n", ms.trim().parse::<u64>().unwrap_or(20)));
    }
    Agent::start(PREFIX, bins, &top, &format!("    heartbeat_interval_secs: {INTERVAL_SECS}\n"))
}

// ---------------------------------------------------------------- store --

/// A read-only connection to the agent's store, reading new rows only.
struct Store {
    conn: Connection,
    last_id: i64,
    errors: u64,
}

/// What the harness reads of a row.
struct Row {
    /// Index in [`COLLECTORS`], or `usize::MAX` for another.
    collector: usize,
    pid: u32,
    started: bool,
    snapshot: bool,
    observed_ms: u64,
    name: String,
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

    /// Rows committed since the last call.
    fn new_rows(&mut self) -> Vec<Row> {
        let mut out = Vec::new();
        let Ok(mut stmt) = self.conn.prepare_cached(
            "SELECT id, collector_id, pid, kind, snapshot, observed_ms, name FROM process_events \
             WHERE id > ?1 ORDER BY id",
        ) else {
            self.errors += 1;
            return out;
        };
        let rows = stmt.query_map([self.last_id], |r| {
            let collector: String = r.get(1)?;
            let kind: String = r.get(3)?;
            Ok((
                r.get::<_, i64>(0)?,
                Row {
                    collector: COLLECTORS.iter().position(|c| *c == collector).unwrap_or(usize::MAX),
                    pid: r.get::<_, i64>(2)? as u32,
                    started: kind == "started",
                    snapshot: r.get::<_, i64>(4)? != 0,
                    observed_ms: r.get::<_, i64>(5)?.max(0) as u64,
                    name: r.get(6)?,
                },
            ))
        });
        match rows {
            Ok(rows) => {
                for row in rows {
                    match row {
                        Ok((id, row)) => {
                            self.last_id = id;
                            out.push(row);
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

/// The first snapshot of each collector, as committed.
#[derive(Default)]
struct Snapshot {
    /// When the first row of any collector was seen (Unix µs).
    first_row_us: u64,
    /// Per collector: snapshot rows, when the first and the last were seen
    /// (Unix µs), their `observed_ms`.
    rows: [u64; 2],
    first_us: [u64; 2],
    last_us: [u64; 2],
    observed_ms: [u64; 2],
}

/// Waits for the store, then for both collectors' snapshots: at least
/// `target` snapshot rows each, then `quiet` without another. Polls every
/// `poll`.
fn wait_for_snapshots(
    agent: &mut Agent,
    target: u64,
    poll: Duration,
    quiet: Duration,
) -> Result<(Store, Snapshot), String> {
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
    let mut snap = Snapshot::default();
    let mut last_new = Instant::now();
    loop {
        let at = now_us();
        for r in store.new_rows() {
            if snap.first_row_us == 0 {
                snap.first_row_us = at;
            }
            if r.collector < 2 && r.snapshot {
                let c = r.collector;
                if snap.rows[c] == 0 {
                    snap.first_us[c] = at;
                    snap.observed_ms[c] = r.observed_ms;
                }
                snap.rows[c] += 1;
                snap.last_us[c] = at;
                last_new = Instant::now();
            }
        }
        if snap.rows.iter().all(|&n| n >= target) && last_new.elapsed() >= quiet {
            return Ok((store, snap));
        }
        if let Some(why) = agent.exited() {
            return Err(why);
        }
        if Instant::now() > deadline {
            return Err(format!(
                "snapshots not committed within 120 s: {} / {} rows of {target}",
                snap.rows[0], snap.rows[1]
            ));
        }
        std::thread::sleep(poll);
    }
}

// -------------------------------------------------------------- markers --

/// A marker process and when each collector's `started` row was seen.
struct Marker {
    pid: u32,
    spawn_us: u64,
    spawn_took_us: u64,
    /// Per collector: (committed, Unix µs; `observed_ms`).
    seen: [Option<(u64, u64)>; 2],
}

struct MarkerRun {
    markers: Vec<Marker>,
    /// Start-to-start gaps between polls, µs.
    poll_gaps: Vec<u64>,
    /// Time a poll took, µs.
    poll_took: Vec<u64>,
    /// The harness's own CPU over the run, ms, and the run's length.
    own_cpu_ms: f64,
    span: Duration,
    store_errors: u64,
    /// CPU of the agent and of the collectors over the run, ms.
    agent_cpu_ms: f64,
    collectors_cpu_ms: f64,
    /// Busy CPU on the host over the run not spent by the agent, the
    /// collectors or this harness, ms.
    others_ms: f64,
}

/// Spawns `count` markers at random moments over `over`, polling the
/// store every [`POLL`], until each collector's `started` row of every
/// marker is seen (or a marker has been dead for 5 s).
fn run_markers(agent: &mut Agent, store: &mut Store, count: usize, over: Duration, seed: u64) -> MarkerRun {
    let tps = clock_ticks_per_sec();
    let mut state = seed;
    let span_us = over.as_micros().max(1) as u64;
    let mut offsets: Vec<u64> = (0..count).map(|_| splitmix(&mut state) % span_us).collect();
    offsets.sort_unstable();
    let mut kids = Children::default();
    let mut reaped: Vec<bool> = Vec::new();
    let mut markers: Vec<Marker> = Vec::with_capacity(count);
    let mut by_pid: HashMap<u32, usize> = HashMap::new();
    let (mut poll_gaps, mut poll_took) = (Vec::new(), Vec::new());
    let mut last_poll: Option<u64> = None;
    let mut last_reap = Instant::now();
    let (own0, busy0, cpus0) = (cpu_of(std::process::id()), host_busy_ticks(), agent.cpu());
    let t0 = Instant::now();
    let give_up = over + MARKER_LIFE + Duration::from_secs(5);
    // Rows committed before the first marker are of no interest.
    store.new_rows();
    loop {
        let elapsed = t0.elapsed().as_micros() as u64;
        while markers.len() < count && offsets[markers.len()] <= elapsed {
            let before = now_us();
            let spawned = Command::new("sleep")
                .arg(MARKER_LIFE.as_secs().to_string())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn();
            let took = now_us() - before;
            match spawned {
                Ok(c) => {
                    by_pid.insert(c.id(), markers.len());
                    markers.push(Marker {
                        pid: c.id(),
                        spawn_us: before,
                        spawn_took_us: took,
                        seen: [None; 2],
                    });
                    kids.0.push(c);
                    reaped.push(false);
                }
                Err(e) => {
                    eprintln!("marker {} not spawned: {e}", markers.len());
                    offsets.truncate(markers.len());
                    break;
                }
            }
        }
        let count = offsets.len();
        let start = now_us();
        for r in store.new_rows() {
            if r.collector >= 2 || !r.started || r.name != "sleep" {
                continue;
            }
            if let Some(&i) = by_pid.get(&r.pid) {
                let m = &mut markers[i];
                // Observed before it was spawned: an earlier process with this pid.
                if m.seen[r.collector].is_none() && r.observed_ms * 1000 + 1000 >= m.spawn_us {
                    m.seen[r.collector] = Some((start, r.observed_ms));
                }
            }
        }
        let end = now_us();
        poll_took.push(end - start);
        if let Some(prev) = last_poll {
            poll_gaps.push(start - prev);
        }
        last_poll = Some(start);
        if last_reap.elapsed() > Duration::from_millis(250) {
            for (c, done) in kids.0.iter_mut().zip(reaped.iter_mut()) {
                if !*done && matches!(c.try_wait(), Ok(Some(_))) {
                    *done = true;
                }
            }
            last_reap = Instant::now();
        }
        let all_seen = markers.len() == count && markers.iter().all(|m| m.seen.iter().all(Option::is_some));
        if all_seen || t0.elapsed() > give_up || agent.exited().is_some() {
            break;
        }
        let mut wake = Instant::now() + POLL.saturating_sub(Duration::from_micros(end - start));
        if markers.len() < count {
            wake = wake.min(t0 + Duration::from_micros(offsets[markers.len()]));
        }
        let now = Instant::now();
        if wake > now {
            std::thread::sleep(wake - now);
        }
    }
    let (own1, busy1, cpus1) = (cpu_of(std::process::id()), host_busy_ticks(), agent.cpu());
    let span = t0.elapsed();
    drop(kids);
    let tick_ms = 1000.0 / tps as f64;
    let ours: u64 =
        cpus1.iter().zip(&cpus0).map(|(b, a)| b.ticks - a.ticks).sum::<u64>() + own1.ticks - own0.ticks;
    let spent: Vec<f64> = cpus1.iter().zip(&cpus0).map(|(b, a)| b.ms_since(a, tps)).collect();
    MarkerRun {
        markers,
        poll_gaps,
        poll_took,
        own_cpu_ms: own1.ms_since(&own0, tps),
        span,
        store_errors: store.errors,
        agent_cpu_ms: spent[0],
        collectors_cpu_ms: spent[1..].iter().sum(),
        others_ms: (busy1 - busy0).saturating_sub(ours) as f64 * tick_ms,
    }
}

fn ms1(us: u64) -> String {
    format!("{:.1}", us as f64 / 1000.0)
}

/// One table row: n, p50, p90, p99, max in ms.
fn dist_row(what: &str, v: Vec<u64>) -> String {
    format!("| {what} | {} |", dist_cells(&v, 1))
}

fn report_markers(run: &MarkerRun) {
    let ms = &run.markers;
    let mut spawn_commit = Vec::new();
    let mut spawn_obs = Vec::new();
    let mut obs_commit = Vec::new();
    let mut per: [Vec<u64>; 2] = [Vec::new(), Vec::new()];
    let mut pipe_per: [Vec<u64>; 2] = [Vec::new(), Vec::new()];
    let mut first_of_two = Vec::new();
    let mut phases: [Vec<u64>; 2] = [Vec::new(), Vec::new()];
    for m in ms {
        for (c, seen) in m.seen.iter().enumerate() {
            let Some((committed, observed_ms)) = *seen else { continue };
            let observed_us = observed_ms * 1000;
            spawn_commit.push(committed.saturating_sub(m.spawn_us));
            spawn_obs.push(observed_us.saturating_sub(m.spawn_us));
            obs_commit.push(committed.saturating_sub(observed_us));
            per[c].push(committed.saturating_sub(m.spawn_us));
            pipe_per[c].push(committed.saturating_sub(observed_us));
            phases[c].push(observed_ms % (INTERVAL_SECS * 1000));
        }
        if let Some(first) = m.seen.iter().flatten().map(|s| s.0).min() {
            first_of_two.push(first.saturating_sub(m.spawn_us));
        }
    }
    let missing: Vec<usize> = (0..2).map(|c| ms.iter().filter(|m| m.seen[c].is_none()).count()).collect();
    println!("| path | n | p50 ms | p90 ms | p99 ms | max ms | min ms |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    println!("{}", dist_row("**spawn → committed** (both collectors)", spawn_commit));
    for (id, v) in COLLECTORS.iter().zip(&per) {
        println!("{}", dist_row(&format!("spawn → committed, {id} only"), v.clone()));
    }
    println!("{}", dist_row("spawn → committed, first of the two collectors", first_of_two));
    println!("{}", dist_row("spawn → observed (`observed_ms`)", spawn_obs));
    println!("{}", dist_row("**observed → committed** (both collectors)", obs_commit));
    for (id, v) in COLLECTORS.iter().zip(&pipe_per) {
        println!("{}", dist_row(&format!("observed → committed, {id} only"), v.clone()));
    }
    let phase_med = |v: &mut Vec<u64>| {
        v.sort_unstable();
        pct(v, 0.5)
    };
    let (pa, pb) = (phase_med(&mut phases[0]), phase_med(&mut phases[1]));
    let mut gaps = run.poll_gaps.clone();
    gaps.sort_unstable();
    let mut took = run.poll_took.clone();
    took.sort_unstable();
    let mut spawn_took: Vec<u64> = ms.iter().map(|m| m.spawn_took_us).collect();
    spawn_took.sort_unstable();
    println!();
    println!("| | |");
    println!("|---|---|");
    println!(
        "| markers | {} over {:.0} s; not seen: {} by {}, {} by {} |",
        ms.len(),
        run.span.as_secs_f64(),
        missing[0],
        COLLECTORS[0],
        missing[1],
        COLLECTORS[1]
    );
    // Markers of one cycle share that cycle's commit: the independent
    // samples of observed → committed are the cycles.
    let cycles: std::collections::BTreeSet<(usize, u64)> = ms
        .iter()
        .flat_map(|m| m.seen.iter().enumerate().filter_map(|(c, s)| s.map(|(_, o)| (c, o))))
        .collect();
    println!(
        "| cycles that carried markers (independent samples of observed → committed) | {} |",
        cycles.len()
    );
    // The slowest commits, with when their cycle ran (s into the run).
    let t0_ms = ms.first().map_or(0, |m| m.spawn_us / 1000);
    let mut slow: Vec<(u64, usize, u64)> = ms
        .iter()
        .flat_map(|m| m.seen.iter().enumerate().filter_map(|(c, s)| s.map(|(at, o)| (at - o * 1000, c, o))))
        .collect();
    slow.sort_unstable_by_key(|e| std::cmp::Reverse(*e));
    let mut listed = std::collections::HashSet::new();
    slow.retain(|e| listed.insert((e.1, e.2)));
    println!(
        "| slowest cycles, observed → committed (collector, s into the run) | {} |",
        slow.iter()
            .take(3)
            .map(|(d, c, o)| format!(
                "{} ms ({}, {:.1} s)",
                ms1(*d),
                COLLECTORS[*c],
                o.saturating_sub(t0_ms) as f64 / 1000.0
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let unseen: Vec<String> =
        ms.iter().filter(|m| m.seen.iter().any(Option::is_none)).take(5).map(|m| m.pid.to_string()).collect();
    if !unseen.is_empty() {
        println!("| markers not seen by both, first pids | {} |", unseen.join(", "));
    }
    println!(
        "| collectors' cycle phase (`observed_ms` mod {INTERVAL_SECS} s, median) | {}: {pa} ms, {}: {pb} ms |",
        COLLECTORS[0], COLLECTORS[1]
    );
    println!(
        "| poll gap start to start, p50 / p99 / max | {} / {} / {} ms ({} polls) |",
        ms1(pct(&gaps, 0.5)),
        ms1(pct(&gaps, 0.99)),
        ms1(gaps.last().copied().unwrap_or(0)),
        gaps.len() + 1
    );
    println!(
        "| poll query, p50 / p99 / max | {} / {} / {} µs; store read errors {} |",
        pct(&took, 0.5),
        pct(&took, 0.99),
        took.last().copied().unwrap_or(0),
        run.store_errors
    );
    println!(
        "| marker spawn (`Command::spawn`), p50 / max | {} / {} µs |",
        pct(&spawn_took, 0.5),
        spawn_took.last().copied().unwrap_or(0)
    );
    let share = |ms: f64| ms / run.span.as_secs_f64().max(1e-9) / 10.0;
    println!(
        "| CPU while timing: agent / both collectors / this harness (2 ms polls) | \
         {:.2}% / {:.2}% / {:.2}% of one core |",
        share(run.agent_cpu_ms),
        share(run.collectors_cpu_ms),
        share(run.own_cpu_ms)
    );
    println!(
        "| other load on the host while timing (not agent, collectors, harness) | {:.1}% of one core |",
        share(run.others_ms)
    );
}

// --------------------------------------------------------------- phases --

fn stop_and_report(agent: &mut Agent) -> Result<(), String> {
    let Shutdown { took, status, alive, log } = agent.shut_down()?;
    println!(
        "| SIGTERM → agent exited | {:.2} s, {status}; collectors still running after: {alive} |",
        took.as_secs_f64()
    );
    println!(
        "| agent log (info): lines / alerts / other WARN+ERROR | {} / {} / {} |",
        log.lines,
        log.alerts,
        log.bad.len()
    );
    log.print_bad();
    Ok(())
}

fn latency_phase(bins: &Bins, markers: usize, over: Duration) -> Result<(), String> {
    let host = count_procs();
    println!("\n## Latency: process start → committed ({host} processes on the host)\n");
    let mut agent = start_agent(bins)?;
    let (mut store, snap) =
        wait_for_snapshots(&mut agent, 1, Duration::from_millis(10), Duration::from_secs(1))?;
    agent.find_collectors()?;
    println!(
        "agent pid {}; first row committed {:.2} s after the agent was spawned; snapshots {} / {} rows",
        agent.pid(),
        snap.first_row_us.saturating_sub(agent.spawned_us) as f64 / 1e6,
        snap.rows[0],
        snap.rows[1]
    );
    let seed = now_us();
    println!("marker spawn times: seed {seed}\n");
    let run = run_markers(&mut agent, &mut store, markers, over, seed);
    if let Some(why) = agent.exited() {
        return Err(why);
    }
    report_markers(&run);
    stop_and_report(&mut agent)?;
    Ok(())
}

fn resource_phase(bins: &Bins, n: usize, cycles: u64, loaded_markers: usize) -> Result<(), String> {
    let Some((kids, took)) = sleepers_or_skip(&format!("resources with N={n}"), n, 200) else {
        return Ok(());
    };
    let tps = clock_ticks_per_sec();
    let host = count_procs();
    println!(
        "\n## Resources: 2 collectors, {n} sleeping children ({host} processes on the host; spawned in {:.1} s)\n",
        took.as_secs_f64()
    );
    let mut agent = start_agent(bins)?;
    let (pid, spawned_us) = (agent.pid(), agent.spawned_us);
    let (mut store, snap) =
        wait_for_snapshots(&mut agent, n as u64, Duration::from_millis(10), Duration::from_secs(2))?;
    let done_us = snap.last_us[0].max(snap.last_us[1]);
    let agent_cpu_snap = cpu_of(pid);
    let hwm_snap = status_kib(&pid.to_string(), "VmHWM");
    agent.find_collectors()?;
    let threads_snap = threads_of(pid);
    let coll_cpu_snap: Vec<Cpu> = agent.collectors.iter().map(|c| cpu_of(c.pid)).collect();

    // Steady: `cycles` intervals, the store not read.
    std::thread::sleep(Duration::from_secs(1));
    let (a0, th0, host0, own0) =
        (cpu_of(pid), threads_of(pid), host_busy_ticks(), cpu_of(std::process::id()));
    let c0: Vec<Cpu> = agent.collectors.iter().map(|c| cpu_of(c.pid)).collect();
    let w0 = Instant::now();
    std::thread::sleep(Duration::from_secs(cycles * INTERVAL_SECS));
    let (a1, th1, host1, own1) =
        (cpu_of(pid), threads_of(pid), host_busy_ticks(), cpu_of(std::process::id()));
    let c1: Vec<Cpu> = agent.collectors.iter().map(|c| cpu_of(c.pid)).collect();
    let window = w0.elapsed().as_secs_f64();
    if let Some(why) = agent.exited() {
        return Err(why);
    }
    let p = pid.to_string();
    let rss = [
        status_kib(&p, "VmRSS"),
        status_kib(&p, "VmHWM"),
        status_kib(&p, "RssAnon"),
        status_kib(&p, "RssFile"),
    ];
    let nthreads = threads_of(pid).len();
    let coll_rss: Vec<(u64, u64)> = agent
        .collectors
        .iter()
        .map(|c| (status_kib(&c.pid.to_string(), "VmRSS"), status_kib(&c.pid.to_string(), "VmHWM")))
        .collect();
    let window_rows = store.new_rows().len();
    let db_size = |suffix: &str| {
        let mut s = agent.db.clone().into_os_string();
        s.push(suffix);
        std::fs::metadata(PathBuf::from(s)).map_or(0, |m| m.len())
    };
    let (db, wal) = (db_size(""), db_size("-wal"));

    let secs = |us: u64| us as f64 / 1e6;
    println!("agent pid {pid}, {nthreads} threads; collectors {}", {
        let v: Vec<String> = agent.collectors.iter().map(|c| format!("{} pid {}", c.id, c.pid)).collect();
        v.join(", ")
    });
    println!();
    println!("| what | measured |");
    println!("|---|---:|");
    println!(
        "| agent spawned → first snapshot row committed | {:.2} s |",
        secs(snap.first_row_us.saturating_sub(spawned_us))
    );
    for (c, id) in COLLECTORS.iter().enumerate() {
        println!(
            "| {id}: snapshot rows; observed → first / last row committed | {}; {} / {} ms |",
            snap.rows[c],
            ms1(snap.first_us[c].saturating_sub(snap.observed_ms[c] * 1000)),
            ms1(snap.last_us[c].saturating_sub(snap.observed_ms[c] * 1000)),
        );
    }
    println!(
        "| both snapshots: first row → last row committed | {} ms ({} rows) |",
        ms1(done_us.saturating_sub(snap.first_row_us)),
        snap.rows[0] + snap.rows[1]
    );
    println!(
        "| agent CPU from spawn to snapshots committed ({:.1} s) | {:.0} ms |",
        secs(done_us.saturating_sub(spawned_us)),
        agent_cpu_snap.ms_since(&Cpu::default(), tps)
    );
    for (c, cpu) in agent.collectors.iter().zip(&coll_cpu_snap) {
        println!("| {} CPU from spawn to then | {:.0} ms |", c.id, cpu.ms_since(&Cpu::default(), tps));
    }
    println!("| agent VmHWM after the snapshots | {} |", mib(hwm_snap));
    let busy: Vec<String> = {
        let mut v: Vec<(&String, &u64)> = threads_snap.iter().collect();
        v.sort_by_key(|e| std::cmp::Reverse(*e.1));
        v.iter().take(5).map(|(k, ns)| format!("{k} {:.0}", **ns as f64 / 1e6)).collect()
    };
    println!("| agent threads' CPU to then, top 5, ms | {} |", busy.join(", "));
    let a_ms = a1.ms_since(&a0, tps);
    println!(
        "| **agent CPU over {cycles} intervals ({window:.1} s)** | {a_ms:.1} ms = **{:.3}% of one core** ({} ticks) |",
        a_ms / window / 10.0,
        a1.ticks - a0.ticks
    );
    let mut per_thread: Vec<(String, u64)> = th1
        .iter()
        .map(|(k, v)| (k.clone(), v.saturating_sub(th0.get(k).copied().unwrap_or(0))))
        .filter(|(_, v)| *v > 0)
        .collect();
    per_thread.sort_by_key(|e| std::cmp::Reverse(e.1));
    println!(
        "| agent threads in the window, ms | {} |",
        per_thread
            .iter()
            .map(|(k, ns)| format!("{k} {:.1}", *ns as f64 / 1e6))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut coll_ticks = 0;
    for ((c, x0), x1) in agent.collectors.iter().zip(&c0).zip(&c1) {
        let m = x1.ms_since(x0, tps);
        coll_ticks += x1.ticks - x0.ticks;
        println!("| {} CPU over the window | {m:.1} ms = {:.3}% of one core |", c.id, m / window / 10.0);
    }
    let others = (host1 - host0).saturating_sub(a1.ticks - a0.ticks + coll_ticks + own1.ticks - own0.ticks);
    println!(
        "| other load on the host in the window (not agent, collectors, harness) | {:.1}% of one core |",
        others as f64 / tps as f64 / window * 100.0
    );
    println!("| rows committed in the window | {window_rows} |");
    println!("| **agent RSS after the window: VmRSS / VmHWM** | **{} / {}** |", mib(rss[0]), mib(rss[1]));
    println!("| agent RSS: anonymous / file-backed | {} / {} |", mib(rss[2]), mib(rss[3]));
    for (c, (r, h)) in agent.collectors.iter().zip(&coll_rss) {
        println!("| {} VmRSS / VmHWM | {} / {} |", c.id, mib(*r), mib(*h));
    }
    println!(
        "| events.db / events.db-wal | {:.1} / {:.1} MiB |",
        db as f64 / 1048576.0,
        wal as f64 / 1048576.0
    );

    if loaded_markers > 0 {
        println!("\n### Latency with the {n} children still there\n");
        let run = run_markers(&mut agent, &mut store, loaded_markers, Duration::from_secs(30), now_us());
        if let Some(why) = agent.exited() {
            return Err(why);
        }
        report_markers(&run);
    }
    stop_and_report(&mut agent)?;
    drop(agent);
    drop(kids);
    Ok(())
}

fn main() -> ExitCode {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs it
    // without: then a smoke run (3 markers over 3 s, no resources),
    // skipped when the binaries are not built.
    let args: Vec<String> = std::env::args().skip(1).collect();
    let smoke = !args.iter().any(|a| a == "--bench");
    let only = args.iter().find(|a| !a.starts_with('-')).cloned();
    let Some(bins) = Bins::own().filter(|b| b.agent.is_file() && b.procmond.is_file()) else {
        let at = Bins::own().map_or("<target>/release".into(), |b| b.agent.display().to_string());
        if smoke {
            println!("agent bench: no binaries at {at}: smoke run skipped");
            return ExitCode::SUCCESS;
        }
        eprintln!(
            "agent bench: no daemoneye-agent or procmond binary at {at}: build them first: \
             cargo build --release -p procmond -p daemoneye-agent"
        );
        return ExitCode::FAILURE;
    };
    println!(
        "# agent benchmark ({} cores; {} modified at Unix {}, procmond at Unix {}; 2 collectors, interval {INTERVAL_SECS} s)",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        bins.agent.display(),
        modified_secs(&bins.agent),
        modified_secs(&bins.procmond)
    );
    let wants = |phase: &str| only.as_deref().is_none_or(|o| phase.contains(o));
    let result = if smoke {
        latency_phase(&bins, 3, Duration::from_secs(3))
    } else {
        let markers = env_num("DAEMONEYE_BENCH_MARKERS", 200) as usize;
        let over = Duration::from_secs(env_num("DAEMONEYE_BENCH_MARKER_SECS", 60));
        let n = env_num("DAEMONEYE_BENCH_PROCS", 10_000) as usize;
        let cycles = env_num("DAEMONEYE_BENCH_CYCLES", 6);
        let loaded = env_num("DAEMONEYE_BENCH_LOADED_MARKERS", 100) as usize;
        let mut r = Ok(());
        if wants("latency") {
            r = latency_phase(&bins, markers, over);
        }
        if r.is_ok() && wants("resources") {
            r = resource_phase(&bins, n, cycles, loaded);
        }
        r
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("agent bench: {e}");
            ExitCode::FAILURE
        }
    }
}
