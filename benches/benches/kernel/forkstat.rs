//! The peer: `forkstat -e exec,exit` with its output in a file, started
//! beside procmond, stopped, and its lines matched to our processes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::seen::Seen;

/// `forkstat -e exec,exit`, its output in a file.
pub(super) struct Forkstat {
    pub(super) child: Child,
    pub(super) out: PathBuf,
    pub(super) err: PathBuf,
    pub(super) version: String,
}

impl Forkstat {
    /// `None` (and why) when forkstat is not installed or fails to start.
    pub(super) fn start(dir: &Path) -> Result<Forkstat, String> {
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

    pub(super) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGINT (forkstat prints its statistics and exits), then waits up to
    /// 10 s; SIGKILL after that.
    pub(super) fn stop(&mut self) {
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
pub(super) struct ForkstatCounts {
    pub(super) exec_lines: u64,
    pub(super) exit_lines: u64,
    pub(super) nobufs: u64,
}

/// Reads forkstat's output: exec and exit lines of our pids (the token
/// must follow the program for the argv to count).
pub(super) fn read_forkstat(
    fs: &Forkstat,
    seen: &mut [Seen],
    by_pid: &HashMap<u32, usize>,
) -> ForkstatCounts {
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
