//! Process enumeration benchmark: spawns N sleeping children (N = 1,000
//! and 10,000 by default; `DAEMONEYE_BENCH_PROCS=1000,10000` to choose),
//! then measures in the same run a steady (warm) cycle and a first full
//! snapshot (cold; for procfs also kept on one thread) of each backend, a
//! bare stat-only `/proc` walk (the limit), `ps -e -o pid,ppid,uid,comm,args`,
//! and the RSS added by the enumeration state. Every child is killed by its own pid at the end.
//!
//! Run: `cargo bench -p daemoneye-benches --bench platform`.
#![forbid(unsafe_code)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use daemoneye_benches::{count_procs, measure, ms, no_room_for, rss_kib, spawn_sleepers, stat_only_walk};
use daemoneye_platform::{ProcessSource, SysinfoSource};

fn bench_n(n: usize) {
    if let Some(why) = no_room_for(n) {
        println!("N={n}: skipped, {why}");
        return;
    }
    let spawned = Instant::now();
    let (kids, failed) = spawn_sleepers(n);
    if let Some(why) = failed {
        println!("N={n}: {why}; measuring with those");
    }
    let total = count_procs();
    println!(
        "\n## N = {n} sleeping children ({total} processes on the host; spawned in {:.1} s)\n",
        spawned.elapsed().as_secs_f64()
    );
    let runs = if n >= 5000 { 7 } else { 15 };
    let mut buf = Vec::with_capacity(1024);
    let (limit, limit_min, seen) = measure(runs, || stat_only_walk(&mut buf));
    println!("| what | median ms | min ms | processes | vs stat-only walk |");
    println!("|---|---:|---:|---:|---:|");
    let row = |what: &str, med: Duration, min: Duration, seen: usize| {
        println!(
            "| {what} | {} | {} | {seen} | {:.2}x |",
            ms(med),
            ms(min),
            med.as_secs_f64() / limit.as_secs_f64()
        );
    };
    row("stat-only /proc walk (the limit)", limit, limit_min, seen);

    let rss0 = rss_kib();
    // The OS's own backend (`/proc` on Linux) first, then sysinfo.
    let (cold, cold_min, seen) = measure(runs.min(5), || {
        let mut s = daemoneye_platform::default_source().expect("default backend");
        s.refresh().expect("refresh").len()
    });
    let mut procfs = daemoneye_platform::default_source().expect("default backend");
    let name = procfs.backend();
    row(&format!("{name} backend, cold (first snapshot)"), cold, cold_min, seen);
    procfs.refresh().expect("first");
    let (warm, warm_min, seen) = measure(runs, || procfs.refresh().expect("refresh").len());
    row(&format!("{name} backend, warm (steady cycle)"), warm, warm_min, seen);
    let rss_procfs = rss_kib().saturating_sub(rss0);
    let reads = procfs.last_cycle().detail_reads;

    let rss1 = rss_kib();
    let (scold, scold_min, seen) = measure(runs.min(3), || {
        let mut s = SysinfoSource::new().expect("sysinfo");
        s.refresh().expect("refresh").len()
    });
    row("sysinfo backend, cold", scold, scold_min, seen);
    let mut sys = SysinfoSource::new().expect("sysinfo");
    sys.refresh().expect("first");
    let (swarm, swarm_min, seen) = measure(runs, || sys.refresh().expect("refresh").len());
    row("sysinfo backend, warm", swarm, swarm_min, seen);
    let rss_sys = rss_kib().saturating_sub(rss1);

    // procfs's first snapshot kept on one thread (it splits a large one
    // across two), outside the RSS windows above.
    #[cfg(target_os = "linux")]
    {
        let (cold1, cold1_min, seen) = measure(runs.min(5), || {
            let mut s = daemoneye_platform::ProcFs::new().expect("procfs");
            s.set_parallel_snapshot(false);
            s.refresh().expect("refresh").len()
        });
        row("linux-procfs backend, cold, one thread", cold1, cold1_min, seen);
    }

    let (ps, ps_min, seen) = measure(runs.min(5), || {
        Command::new("ps")
            .args(["-e", "-o", "pid,ppid,uid,comm,args"])
            .stderr(Stdio::null())
            .output()
            .map(|o| o.stdout.split(|&b| b == b'\n').count().saturating_sub(2))
            .unwrap_or(0)
    });
    row("`ps -e -o pid,ppid,uid,comm,args`", ps, ps_min, seen);
    println!();
    println!("- procfs warm cycle re-read details of {reads} processes (0 = steady state)");
    println!("- RSS added by the procfs backend's state: {} KiB; by sysinfo's: {} KiB", rss_procfs, rss_sys);
    println!("- this harness's RSS now: {} KiB (includes {} Child handles)", rss_kib(), kids.0.len());
    drop(procfs);
    drop(sys);
    drop(kids);
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs it with
    // no such flag: then only a tiny smoke run.
    let smoke = !std::env::args().any(|a| a == "--bench");
    let ns: Vec<usize> = if smoke {
        vec![20]
    } else {
        std::env::var("DAEMONEYE_BENCH_PROCS")
            .unwrap_or_else(|_| "1000,10000".into())
            .split(',')
            .filter_map(|s| s.trim().parse().ok())
            .collect()
    };
    println!(
        "# platform enumeration benchmark ({} cores)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    for n in ns {
        bench_n(n);
    }
}
