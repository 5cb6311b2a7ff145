//! Process enumeration benchmark: spawns N sleeping children (N = 1,000
//! and 10,000 by default; `DAEMONEYE_BENCH_PROCS=1000,10000` to choose),
//! then measures in the same run a steady (warm) cycle and a first full
//! snapshot (cold) of each backend, a bare stat-only `/proc` walk (the
//! limit), `ps -e -o pid,ppid,uid,comm,args`, and the RSS added by the
//! enumeration state. Every child is killed by its own pid at the end.
//!
//! Run: `cargo bench -p daemoneye-benches --bench platform`.
#![forbid(unsafe_code)]

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use daemoneye_platform::{ProcessSource, SysinfoSource};

/// Kills and reaps every child on drop, by its own pid.
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
        }
        for c in &mut self.0 {
            let _ = c.wait();
        }
    }
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("VmRSS:")?.trim().strip_suffix("kB")?.trim().parse().ok())
        })
        .unwrap_or(0)
}

fn process_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max processes"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

fn pid_max() -> Option<u64> {
    std::fs::read_to_string("/proc/sys/kernel/pid_max").ok()?.trim().parse().ok()
}

fn count_procs() -> u64 {
    std::fs::read_dir("/proc")
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
                .count()
        })
        .unwrap_or(0) as u64
}

/// The limit: list `/proc` and read every `stat`, nothing else.
fn stat_only_walk(buf: &mut Vec<u8>) -> usize {
    let mut n = 0;
    let Ok(rd) = std::fs::read_dir("/proc") else { return 0 };
    let mut path = String::with_capacity(32);
    for e in rd.filter_map(Result::ok) {
        let name = e.file_name();
        let Some(name) = name.to_str().filter(|s| s.bytes().all(|b| b.is_ascii_digit())) else { continue };
        path.clear();
        path.push_str("/proc/");
        path.push_str(name);
        path.push_str("/stat");
        buf.clear();
        if std::fs::File::open(&path).and_then(|mut f| f.read_to_end(buf)).is_ok() {
            n += 1;
        }
    }
    n
}

/// Median and min of `runs` timings of `f`.
fn measure(runs: usize, mut f: impl FnMut() -> usize) -> (Duration, Duration, usize) {
    let mut t = Vec::with_capacity(runs);
    let mut seen = 0;
    for _ in 0..runs {
        let s = Instant::now();
        seen = f();
        t.push(s.elapsed());
    }
    t.sort();
    (t[t.len() / 2], t[0], seen)
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1e3)
}

fn bench_n(n: usize) {
    let before = count_procs();
    if let Some(limit) = process_limit()
        && before + n as u64 + 100 > limit
    {
        println!("N={n}: skipped, `ulimit -u` is {limit} and {before} processes exist");
        return;
    }
    if let Some(pm) = pid_max()
        && before + n as u64 + 100 > pm
    {
        println!("N={n}: skipped, pid_max is {pm}");
        return;
    }
    let spawned = Instant::now();
    let mut kids = Children(Vec::with_capacity(n));
    for i in 0..n {
        match Command::new("sleep")
            .arg("3600")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
        {
            Ok(c) => kids.0.push(c),
            Err(e) => {
                println!("N={n}: could spawn only {i} children ({e}); measuring with those");
                break;
            }
        }
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
    let (cold, cold_min, seen) = measure(runs.min(5), || {
        let mut s = daemoneye_platform::ProcFs::new().expect("procfs");
        s.refresh().expect("refresh").len()
    });
    row("procfs backend, cold (first snapshot)", cold, cold_min, seen);
    let mut procfs = daemoneye_platform::ProcFs::new().expect("procfs");
    procfs.refresh().expect("first");
    let (warm, warm_min, seen) = measure(runs, || procfs.refresh().expect("refresh").len());
    row("procfs backend, warm (steady cycle)", warm, warm_min, seen);
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
