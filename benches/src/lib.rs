//! Benchmarks of DaemonEye's components live in `benches/` of this crate
//! (run them with `cargo bench -p daemoneye-benches`); the numbers and the
//! commands that produced them are recorded in `BENCHMARKS.md` at the
//! repository root. This library holds the helpers several benchmarks
//! share: sleeping children to enumerate, `/proc` readings, a stat-only
//! `/proc` walk (the limit for a collection cycle), and timing; and, in
//! [`agent`], the agent as a child process with its collectors.
#![forbid(unsafe_code)]

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub mod agent;

/// Child processes, each killed and reaped on drop by its own pid.
#[derive(Default)]
pub struct Children(pub Vec<Child>);

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

/// Why `n` more processes cannot be spawned here (`ulimit -u`, `pid_max`),
/// or `None` when there is room (with a margin of 100).
pub fn no_room_for(n: usize) -> Option<String> {
    let before = count_procs();
    if let Some(limit) = process_limit()
        && before + n as u64 + 100 > limit
    {
        return Some(format!("`ulimit -u` is {limit} and {before} processes exist"));
    }
    if let Some(pm) = pid_max()
        && before + n as u64 + 100 > pm
    {
        return Some(format!("pid_max is {pm}"));
    }
    None
}

/// Spawns up to `n` `sleep 3600` children. When a spawn fails the ones
/// already running are kept and the error is returned beside them.
pub fn spawn_sleepers(n: usize) -> (Children, Option<String>) {
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
            Err(e) => return (kids, Some(format!("could spawn only {i} children ({e})"))),
        }
    }
    (kids, None)
}

/// Makes room for `n` `sleep 3600` children and spawns them: when
/// [`no_room_for`] `n + margin` processes, prints `<skip>: skipped, <why>`
/// and returns `None`; when a spawn fails, prints so and keeps the ones
/// running. Returns the children and how long spawning them took.
pub fn sleepers_or_skip(skip: &str, n: usize, margin: usize) -> Option<(Children, Duration)> {
    if let Some(why) = no_room_for(n + margin) {
        println!("{skip}: skipped, {why}");
        return None;
    }
    let t = Instant::now();
    let (kids, failed) = spawn_sleepers(n);
    if let Some(why) = failed {
        println!("N={n}: {why}; measuring with those");
    }
    Some((kids, t.elapsed()))
}

/// A `kB` line of `/proc/<pid>/status` (`VmRSS`, `VmHWM`, `RssAnon`, ...)
/// in KiB; `pid` is a number or `self`. 0 when unreadable.
pub fn status_kib(pid: &str, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix(key)?.strip_prefix(':')?.trim().strip_suffix("kB")?.trim().parse().ok()
            })
        })
        .unwrap_or(0)
}

/// This process's resident set, in KiB.
pub fn rss_kib() -> u64 {
    status_kib("self", "VmRSS")
}

/// `ulimit -u` of this process.
pub fn process_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max processes"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// The kernel's `pid_max`.
pub fn pid_max() -> Option<u64> {
    std::fs::read_to_string("/proc/sys/kernel/pid_max").ok()?.trim().parse().ok()
}

/// The command name and the fields after it of `/proc/<path>/stat`
/// (`path`: `<pid>` or `<pid>/task/<tid>`; index 0 is field 3, the state;
/// a field that is not a number is 0).
pub fn stat_of(path: &str) -> Option<(String, Vec<u64>)> {
    let s = std::fs::read_to_string(format!("/proc/{path}/stat")).ok()?;
    let (open, close) = (s.find('(')?, s.rfind(')')?);
    let comm = s.get(open + 1..close)?.to_owned();
    Some((comm, s[close + 1..].split_whitespace().map(|v| v.parse().unwrap_or(0)).collect()))
}

/// The start time of a process (field 22), to tell it from a later
/// process with the same pid.
pub fn start_time_of(pid: u32) -> Option<u64> {
    stat_of(&pid.to_string()).and_then(|(_, f)| f.get(19).copied())
}

/// Processes on the host (numeric entries of `/proc`).
pub fn count_procs() -> u64 {
    std::fs::read_dir("/proc")
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
                .count()
        })
        .unwrap_or(0) as u64
}

/// The limit: list `/proc` and read every `stat`, nothing else. Returns
/// how many were read; `buf` is reused between calls.
pub fn stat_only_walk(buf: &mut Vec<u8>) -> usize {
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

/// Median and min of `runs` timings of `f`, and what its last run
/// returned.
pub fn measure(runs: usize, mut f: impl FnMut() -> usize) -> (Duration, Duration, usize) {
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

/// Nearest-rank percentile `p` (0 to 1) of sorted values; 0 when empty.
pub fn pct(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// The count, p50, p90, p99, max and min of `v` (µs, in any order) as
/// the cells of a Markdown table row, in ms with `decimals` decimals:
/// `n | p50 | p90 | p99 | max | min`.
pub fn dist_cells(v: &[u64], decimals: usize) -> String {
    let mut v = v.to_vec();
    v.sort_unstable();
    let ms = |us: u64| format!("{:.*}", decimals, us as f64 / 1000.0);
    format!(
        "{} | {} | {} | {} | {} | {}",
        v.len(),
        ms(pct(&v, 0.5)),
        ms(pct(&v, 0.9)),
        ms(pct(&v, 0.99)),
        ms(v.last().copied().unwrap_or(0)),
        ms(v.first().copied().unwrap_or(0)),
    )
}

/// Why a child (`name`) is gone: its exit status and the last 20 lines
/// of its log.
pub fn exited_with_log(name: &str, status: std::process::ExitStatus, log: &std::path::Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let tail: Vec<&str> = text.lines().rev().take(20).collect();
    format!(
        "{name} exited ({status}); last lines of {}:\n{}",
        log.display(),
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    )
}

/// The process counts (`DAEMONEYE_BENCH_PROCS`, default 1,000 and
/// 10,000) and steady cycles (`DAEMONEYE_BENCH_CYCLES`, default 6) of a
/// procmond bench.
pub fn procs_and_cycles() -> (Vec<usize>, usize) {
    let ns = std::env::var("DAEMONEYE_BENCH_PROCS")
        .unwrap_or_else(|_| "1000,10000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    (ns, env_num("DAEMONEYE_BENCH_CYCLES", 6) as usize)
}

/// A number from the environment variable `name`, else `default`.
pub fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(default)
}

/// A pseudo-random stream (splitmix64): the next value of `state`.
pub fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The wall clock, Unix µs.
pub fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

/// The wall clock, Unix ms.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// When a file was last modified, in Unix seconds (0 when unknown).
pub fn modified_secs(p: &std::path::Path) -> u64 {
    std::fs::metadata(p)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs())
}

/// Milliseconds with two decimals.
pub fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1e3)
}

/// A process's CPU time so far: clock ticks of `/proc/<pid>/stat` (utime +
/// stime) and, where the kernel gives it, its CPU clock in nanoseconds.
#[derive(Clone, Copy, Default, Debug)]
pub struct Cpu {
    /// utime + stime, in clock ticks.
    pub ticks: u64,
    /// The process CPU clock (`clock_getcpuclockid`), in nanoseconds.
    pub ns: Option<u64>,
}

impl Cpu {
    /// CPU time between two readings, in ms: the CPU clock when both have
    /// it, else the ticks (`tps` per second).
    pub fn ms_since(&self, before: &Cpu, tps: u64) -> f64 {
        match (before.ns, self.ns) {
            (Some(a), Some(b)) => b.saturating_sub(a) as f64 / 1e6,
            _ => self.ticks.saturating_sub(before.ticks) as f64 * 1000.0 / tps as f64,
        }
    }
}

/// The CPU time of `pid` now (zero ticks when it is gone).
pub fn cpu_of(pid: u32) -> Cpu {
    let ticks = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // Fields after the command name (which may hold spaces) start at
            // field 3; utime and stime are fields 14 and 15.
            let rest = &s[s.rfind(')')? + 1..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0);
    Cpu { ticks, ns: daemoneye_platform::clock::process_cpu_ns(pid) }
}

/// Busy clock ticks of every CPU of the host (`/proc/stat`: user, nice,
/// system, irq, softirq, steal).
pub fn host_busy_ticks() -> u64 {
    std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            let f: Vec<u64> =
                s.lines().next()?.split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
            Some([0, 1, 2, 5, 6, 7].iter().filter_map(|&i| f.get(i)).sum())
        })
        .unwrap_or(0)
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`, 100 when unknown).
pub fn clock_ticks_per_sec() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .and_then(|v| u64::try_from(v).ok())
        .filter(|&v| v > 0)
        .unwrap_or(100)
}

/// KiB as "12.3 MiB".
pub fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}
