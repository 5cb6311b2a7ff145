//! The release `daemoneye-agent` as a child process of a benchmark, with
//! two procmond collectors (`pm-a` and `pm-b`) in its own temp dir: the
//! binaries to run, its agent.yaml, its collector processes (found under
//! it in `/proc`), and its shutdown by SIGTERM with a check that the
//! collectors are gone. Shared by the `agent` and `tasks` benches.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{Cpu, cpu_of, exited_with_log, now_us, start_time_of, stat_of};

/// The collectors' interval, in seconds (procmond's floor).
pub const INTERVAL_SECS: u64 = 5;
/// The two collectors of the agent.
pub const COLLECTORS: [&str; 2] = ["pm-a", "pm-b"];

/// The binaries a bench runs: `daemoneye-agent`, `daemoneye-cli` and
/// `procmond` of one directory.
pub struct Bins {
    /// `daemoneye-agent`.
    pub agent: PathBuf,
    /// `daemoneye-cli`.
    pub cli: PathBuf,
    /// `procmond`.
    pub procmond: PathBuf,
}

impl Bins {
    /// The binaries of `dir`.
    pub fn in_dir(dir: &Path) -> Bins {
        Bins {
            agent: dir.join("daemoneye-agent"),
            cli: dir.join("daemoneye-cli"),
            procmond: dir.join("procmond"),
        }
    }

    /// The binaries of the running bench's own target directory (the bench
    /// runs from `<target>/release/deps`).
    pub fn own() -> Option<Bins> {
        let exe = std::env::current_exe().ok()?;
        Some(Bins::in_dir(exe.parent()?.parent()?))
    }
}

/// agent.yaml for an agent with its data in `data_dir` and the two
/// [`COLLECTORS`] running `procmond` every [`INTERVAL_SECS`]: `top` (whole
/// lines) goes before `collectors:`, `per_collector` (whole lines, indented
/// by four spaces) after each collector's `args`.
pub fn agent_yaml(data_dir: &Path, procmond: &Path, top: &str, per_collector: &str) -> String {
    let mut s = format!("data_dir: {:?}\nlog_level: info\n{top}", data_dir.display().to_string());
    s.push_str("collectors:\n");
    for id in COLLECTORS {
        s.push_str(&format!(
            "  - id: {id}\n    binary: {:?}\n    args: [\"--interval\", \"{INTERVAL_SECS}\"]\n{per_collector}",
            procmond.display().to_string()
        ));
    }
    s
}

/// A collector the agent started, known by pid and start time.
pub struct Collector {
    /// Its `--collector-id`.
    pub id: String,
    /// Its pid.
    pub pid: u32,
    /// Its start time (field 22 of `/proc/<pid>/stat`).
    pub start: u64,
}

/// The agent child, in a temp dir of its own (removed with it). On drop:
/// killed and reaped if still running, and any collector still alive (same
/// pid, same start time) killed by its pid.
pub struct Agent {
    child: Child,
    reaped: bool,
    /// Its agent.yaml.
    pub cfg: PathBuf,
    /// Its log (the agent's stderr).
    pub log: PathBuf,
    /// Its event store, `<data_dir>/events.db`.
    pub db: PathBuf,
    /// Its broker's socket, `<data_dir>/run/broker.sock`.
    pub socket: PathBuf,
    /// When it was spawned, Unix µs.
    pub spawned_us: u64,
    /// Its collectors, once [`Agent::find_collectors`] has found them.
    pub collectors: Vec<Collector>,
    // Last: removed after the agent is gone.
    dir: tempfile::TempDir,
}

/// What the agent's log holds (see [`Agent::log_summary`]).
pub struct LogSummary {
    /// Lines.
    pub lines: usize,
    /// Alerts (logged at WARN).
    pub alerts: usize,
    /// The WARN and ERROR lines that are not alerts.
    pub bad: Vec<String>,
    /// The gathered snapshots that lacked a collector (logged at INFO).
    pub partial: Vec<String>,
}

impl LogSummary {
    /// Prints the first 10 of [`LogSummary::bad`], indented.
    pub fn print_bad(&self) {
        for l in self.bad.iter().take(10) {
            println!("    {l}");
        }
    }
}

/// How the agent stopped (see [`Agent::shut_down`]).
pub struct Shutdown {
    /// From SIGTERM to its exit.
    pub took: Duration,
    /// Its exit status.
    pub status: String,
    /// The collectors still running after it: their ids, or `none`.
    pub alive: String,
    /// Its log.
    pub log: LogSummary,
}

impl Agent {
    /// Writes agent.yaml ([`agent_yaml`] with `top` and `per_collector`) in
    /// a new temp dir named `prefix…` and starts the agent on it, its
    /// stderr to `agent.log` there.
    pub fn start(prefix: &str, bins: &Bins, top: &str, per_collector: &str) -> Result<Agent, String> {
        Agent::start_with(prefix, bins, |data| agent_yaml(data, &bins.procmond, top, per_collector))
    }

    /// Like [`Agent::start`], with the whole agent.yaml written by `yaml`
    /// from the data dir (`<temp dir>/data`, which it should name as
    /// `data_dir`).
    pub fn start_with(
        prefix: &str,
        bins: &Bins,
        yaml: impl FnOnce(&Path) -> String,
    ) -> Result<Agent, String> {
        let dir = tempfile::Builder::new().prefix(prefix).tempdir().map_err(|e| e.to_string())?;
        let data = dir.path().join("data");
        let cfg = dir.path().join("agent.yaml");
        std::fs::write(&cfg, yaml(&data)).map_err(|e| e.to_string())?;
        let log = dir.path().join("agent.log");
        let stderr = std::fs::File::create(&log).map_err(|e| e.to_string())?;
        let spawned_us = now_us();
        let child = Command::new(&bins.agent)
            .arg("--config")
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bins.agent.display()))?;
        Ok(Agent {
            child,
            reaped: false,
            cfg,
            log,
            db: data.join("events.db"),
            socket: data.join("run").join("broker.sock"),
            spawned_us,
            collectors: Vec::new(),
            dir,
        })
    }

    /// Its temp dir (private to this user).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Exited already? Then its status and the tail of its log.
    pub fn exited(&mut self) -> Option<String> {
        let status = self.child.try_wait().ok().flatten()?;
        self.reaped = true;
        Some(exited_with_log("daemoneye-agent", status, &self.log))
    }

    /// Finds the agent's children that carry `--collector-id`: the two
    /// [`COLLECTORS`].
    pub fn find_collectors(&mut self) -> Result<(), String> {
        self.find_collectors_of(&COLLECTORS)
    }

    /// Finds the agent's children that carry `--collector-id`: exactly
    /// `ids`, kept in that order.
    pub fn find_collectors_of(&mut self, ids: &[&str]) -> Result<(), String> {
        let me = u64::from(self.pid());
        let mut found = Vec::new();
        let rd = std::fs::read_dir("/proc").map_err(|e| e.to_string())?;
        for e in rd.filter_map(Result::ok) {
            let name = e.file_name().to_string_lossy().into_owned();
            let Ok(pid) = name.parse::<u32>() else { continue };
            let Some((_, f)) = stat_of(&name) else { continue };
            if f.get(1) != Some(&me) {
                continue;
            }
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let args: Vec<String> =
                cmdline.split(|&b| b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
            if let Some(i) = args.iter().position(|a| a == "--collector-id")
                && let Some(id) = args.get(i + 1)
            {
                found.push(Collector { id: id.clone(), pid, start: f.get(19).copied().unwrap_or(0) });
            }
        }
        found.sort_by_key(|c| ids.iter().position(|id| *id == c.id).unwrap_or(usize::MAX));
        if found.len() != ids.len() || found.iter().zip(ids).any(|(c, id)| c.id != *id) {
            return Err(format!(
                "found {} collector processes under the agent, not {}",
                found.len(),
                ids.len()
            ));
        }
        self.collectors = found;
        Ok(())
    }

    /// CPU of the agent and of each collector now.
    pub fn cpu(&self) -> Vec<Cpu> {
        std::iter::once(self.pid()).chain(self.collectors.iter().map(|c| c.pid)).map(cpu_of).collect()
    }

    /// SIGTERM, then waits for the exit: how long it took and the status.
    pub fn stop(&mut self, timeout: Duration) -> Result<(Duration, String), String> {
        let pid = nix::unistd::Pid::from_raw(self.pid() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).map_err(|e| e.to_string())?;
        let t = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().map_err(|e| e.to_string())? {
                self.reaped = true;
                return Ok((t.elapsed(), status.to_string()));
            }
            if t.elapsed() > timeout {
                return Err(format!("the agent did not exit within {timeout:?} of SIGTERM"));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Collectors still running (same pid and start time).
    pub fn collectors_alive(&self) -> Vec<&str> {
        self.collectors
            .iter()
            .filter(|c| start_time_of(c.pid) == Some(c.start))
            .map(|c| c.id.as_str())
            .collect()
    }

    /// The agent's log: lines, alerts, the other WARN and ERROR lines, and
    /// the partial gathers.
    pub fn log_summary(&self) -> LogSummary {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let alerts = text.lines().filter(|l| l.contains("] alert ")).count();
        let bad: Vec<String> = text
            .lines()
            .filter(|l| (l.contains(" WARN ") || l.contains(" ERROR ")) && !l.contains("] alert "))
            .map(str::to_owned)
            .collect();
        let partial: Vec<String> =
            text.lines().filter(|l| l.contains("] snapshot of ")).map(str::to_owned).collect();
        LogSummary { lines: text.lines().count(), alerts, bad, partial }
    }

    /// Stops the agent ([`Agent::stop`], 60 s at most), then checks that
    /// its collectors are gone and reads its log.
    pub fn shut_down(&mut self) -> Result<Shutdown, String> {
        let (took, status) = self.stop(Duration::from_secs(60))?;
        let alive = self.collectors_alive();
        let alive = if alive.is_empty() { "none".to_owned() } else { alive.join(", ") };
        Ok(Shutdown { took, status, alive, log: self.log_summary() })
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if !self.reaped {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        for c in &self.collectors {
            if start_time_of(c.pid) == Some(c.start) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(c.pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}
