//! CPU accounting: procmond's threads, the harness's reaped children and
//! the host's other load over a window; and the report's percentages.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use daemoneye_benches::{clock_ticks_per_sec, cpu_of, host_busy_ticks, stat_of};

pub(super) fn percent(a: usize, of: usize) -> String {
    format!("{a} ({:.2}%)", a as f64 * 100.0 / of.max(1) as f64)
}

pub(super) fn share(ms: f64, over: Duration) -> f64 {
    ms / over.as_secs_f64().max(1e-9) / 10.0
}

/// CPU time of each thread of a process by thread name, in ns
/// (`/proc/<pid>/task/<tid>/schedstat`; threads of the same name summed).
pub(super) fn threads_of(pid: u32) -> BTreeMap<String, u64> {
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

pub(super) fn thread_delta(a: &BTreeMap<String, u64>, b: &BTreeMap<String, u64>) -> String {
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
pub(super) fn reaped_children_ticks() -> u64 {
    stat_of("self").map_or(0, |(_, f)| f.get(13).copied().unwrap_or(0) + f.get(14).copied().unwrap_or(0))
}

/// The host's busy CPU over a window, split into `ours` (pids), the
/// harness's reaped children, and the rest.
pub(super) struct HostLoad {
    pub(super) busy: u64,
    pub(super) ours: Vec<(u32, u64)>,
    pub(super) children: u64,
    pub(super) at: Instant,
}

impl HostLoad {
    pub(super) fn start(pids: &[u32]) -> HostLoad {
        HostLoad {
            busy: host_busy_ticks(),
            ours: pids.iter().map(|&p| (p, cpu_of(p).ticks)).collect(),
            children: reaped_children_ticks(),
            at: Instant::now(),
        }
    }

    /// % of one core: the reaped children, and everything else not in
    /// `ours`.
    pub(super) fn percent(&self) -> (f64, f64) {
        let tps = clock_ticks_per_sec();
        let ours: u64 = self.ours.iter().map(|&(p, t)| cpu_of(p).ticks.saturating_sub(t)).sum();
        let children = reaped_children_ticks().saturating_sub(self.children);
        let others = host_busy_ticks().saturating_sub(self.busy).saturating_sub(ours + children);
        let to_pct = |t: u64| t as f64 / tps as f64 / self.at.elapsed().as_secs_f64().max(1e-9) * 100.0;
        (to_pct(children), to_pct(others))
    }

    pub(super) fn others_percent(&self) -> f64 {
        self.percent().1
    }
}
