//! The programs run (the system's `true` and `sleep`) and how they are
//! spawned: one at a time, quietly, or many from paced threads.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The programs run: `true` and `sleep` of the system (canonical paths,
/// so the exe procmond reads can be compared), by pid and a unique token
/// in their argv. Not copies in a temp dir: the agent's built-in rules
/// would raise an alert for every one of them.
pub(super) struct Tools {
    /// `/usr/bin/true` (or `/bin/true`).
    pub(super) storm: PathBuf,
    /// `/usr/bin/sleep` (or `/bin/sleep`).
    pub(super) sleep: PathBuf,
}

impl Tools {
    pub(super) fn new() -> Result<Tools, String> {
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

pub(super) fn spawn_quiet(exe: &Path, arg: &str) -> std::io::Result<Child> {
    Command::new(exe).arg(arg).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn()
}

/// Spawns `n` `exe <prefix><i>` from `threads` threads, each process
/// reaped before its thread spawns the next, at `rate` per second overall
/// (0: as fast as they can). Returns the tokens' pids (`None`: not
/// spawned) and how long it took.
pub(super) fn spawn_many(
    exe: &Path,
    prefix: &str,
    n: usize,
    threads: usize,
    rate: u64,
) -> (Vec<Option<u32>>, Duration) {
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
