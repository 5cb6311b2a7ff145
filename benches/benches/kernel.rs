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

// The root of a bench target finds `mod x;` at `benches/x.rs`, where the
// other targets live: this one's modules are in `kernel/`.
#[path = "kernel/agent.rs"]
mod agent;
#[path = "kernel/forkstat.rs"]
mod forkstat;
#[path = "kernel/measure.rs"]
mod measure;
#[path = "kernel/seen.rs"]
mod seen;
#[path = "kernel/spawn.rs"]
mod spawn;
#[path = "kernel/store.rs"]
mod store;

use std::collections::HashMap;
use std::io::Write as _;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use daemoneye_benches::agent::Bins;
use daemoneye_benches::{
    Children, clock_ticks_per_sec, count_procs, cpu_of, dist_cells, env_num, modified_secs, now_us, pct,
    sleepers_or_skip, splitmix, status_kib,
};
use daemoneye_contract::control::EventSourceStatus;
use daemoneye_contract::event::{Change, EventKind, EventSource, ProcessEvent};

use self::agent::{fresh_status, procmond_pid, source_status, start_agent, status_client, stop_agent};
use self::forkstat::{Forkstat, read_forkstat};
use self::measure::{HostLoad, percent, share, thread_delta, threads_of};
use self::seen::{Seen, collect, tokens};
use self::spawn::{Tools, spawn_many, spawn_quiet};

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
