//! Privilege detection and the privilege drop, for real: this binary
//! re-runs itself as a child, either under `setpriv --reuid=65534` (an
//! unprivileged user with no capabilities) to enumerate another user's
//! process, or as root to call `drop_privileges`. It owns `main`
//! (`harness = false`). A case that cannot run here (not root, no setpriv)
//! says why instead of passing silently.
#![forbid(unsafe_code)]

#[cfg(unix)]
fn main() -> std::process::ExitCode {
    unix::main()
}

#[cfg(not(unix))]
fn main() {
    println!("privilege: not run, uids and setuid are Unix only");
}

#[cfg(unix)]
mod unix {
    use std::process::{Command, ExitCode};

    use daemoneye_platform::{ProcessSource, SysinfoSource, drop_privileges, privilege};

    const CHILD_ENV: &str = "DAEMONEYE_PLATFORM_CHILD";
    const TARGET_ENV: &str = "DAEMONEYE_PLATFORM_TARGET";

    fn child(mode: &str) -> ExitCode {
        match mode {
            "report" => {
                let target: u32 = std::env::var(TARGET_ENV).ok().and_then(|s| s.parse().ok()).unwrap_or(1);
                let r = privilege::detect();
                println!(
                    "root={} ptrace={:?} missing={}",
                    r.root,
                    r.cap_sys_ptrace,
                    r.missing_for_other_users.join(",")
                );
                let mut sources: Vec<Box<dyn ProcessSource>> =
                    vec![Box::new(SysinfoSource::new().expect("sysinfo"))];
                // The OS's own backend too, where it is not sysinfo.
                let native = daemoneye_platform::default_source().expect("default backend");
                if native.backend() != sources[0].backend() {
                    sources.push(native);
                }
                for mut s in sources {
                    let recs = s.refresh().expect("refresh as an unprivileged user");
                    let Some(t) = recs.iter().find(|r| r.pid == target) else {
                        println!("{} target=missing", s.backend());
                        continue;
                    };
                    println!(
                        "{} exe={:?} cwd={:?} argv_ok={} creds_ok={}",
                        s.backend(),
                        t.details.exe.as_ref().err(),
                        t.details.cwd.as_ref().err(),
                        t.details.argv.is_ok(),
                        t.details.credentials.is_ok()
                    );
                }
                ExitCode::SUCCESS
            }
            "drop" => match drop_privileges(65534, 65534) {
                Ok(()) => {
                    let regain = nix::unistd::setuid(nix::unistd::Uid::from_raw(0)).is_ok();
                    println!(
                        "uid={} euid={} gid={} egid={} regain={regain}",
                        nix::unistd::getuid(),
                        nix::unistd::geteuid(),
                        nix::unistd::getgid(),
                        nix::unistd::getegid()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    println!("error={e}");
                    ExitCode::FAILURE
                }
            },
            "kernel" => {
                println!("kernel_events={:?}", daemoneye_platform::kernel_events_availability());
                ExitCode::SUCCESS
            }
            other => {
                eprintln!("unknown child mode {other}");
                ExitCode::FAILURE
            }
        }
    }

    fn run_child(prefix: &[&str], mode: &str) -> Result<String, String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut cmd = match prefix.split_first() {
            Some((p, rest)) => {
                let mut c = Command::new(p);
                c.args(rest).arg(&exe);
                c
            }
            None => Command::new(&exe),
        };
        let out = cmd
            .env(CHILD_ENV, mode)
            .env(TARGET_ENV, std::process::id().to_string())
            .output()
            .map_err(|e| format!("cannot run child: {e}"))?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            return Err(format!(
                "child {mode} failed ({}): {stdout}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(stdout)
    }

    /// Each case: Ok(Some(msg)) passed, Ok(None) could not run here (said
    /// why), Err failed.
    type Case = fn() -> Result<Option<String>, String>;

    fn report_as_current_user() -> Result<Option<String>, String> {
        let r = privilege::detect();
        if r.summary.is_empty() {
            return Err("empty summary".into());
        }
        if nix::unistd::geteuid().is_root() && cfg!(target_os = "linux") {
            let full = r.cap_sys_ptrace == Some(true) && r.cap_dac_read_search == Some(true);
            if !r.root || (full != r.missing_for_other_users.is_empty()) {
                return Err(format!("root report inconsistent: {r:?}"));
            }
        }
        Ok(Some(format!("current user: {}", r.summary)))
    }

    fn setpriv_available() -> Result<(), String> {
        if !nix::unistd::geteuid().is_root() {
            return Err("not running as root, so setpriv cannot switch users".into());
        }
        match Command::new("setpriv").arg("--version").output() {
            Ok(o) if o.status.success() => Ok(()),
            _ => Err("setpriv (util-linux) is not installed".into()),
        }
    }

    fn enumerate_as_nobody() -> Result<Option<String>, String> {
        if let Err(why) = setpriv_available() {
            println!("privilege: skipped enumeration as uid 65534: {why}");
            return Ok(None);
        }
        let prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"];
        let out = match run_child(&prefix, "report") {
            Ok(o) => o,
            Err(e) if e.contains("Permission denied") => {
                println!(
                    "privilege: skipped enumeration as uid 65534: the test binary is not reachable by it ({e})"
                );
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        let first = out.lines().next().unwrap_or_default();
        if !first.starts_with("root=false ptrace=Some(false)") || !first.contains("exe") {
            return Err(format!("unprivileged report wrong: {out}"));
        }
        #[cfg(target_os = "linux")]
        {
            // This harness runs as root: uid 65534 may read its command line
            // and status, but not its exe or cwd links.
            use daemoneye_platform::Unavailable;
            let denied = format!(
                "exe=Some({:?}) cwd=Some({:?})",
                Unavailable::NotPermitted,
                Unavailable::NotPermitted
            );
            let procfs = out
                .lines()
                .find(|l| l.starts_with("linux-procfs"))
                .ok_or(format!("no procfs line: {out}"))?;
            if !procfs.contains(&denied)
                || !procfs.contains("argv_ok=true")
                || !procfs.contains("creds_ok=true")
            {
                return Err(format!("procfs fields as uid 65534: {procfs}"));
            }
            let sys =
                out.lines().find(|l| l.starts_with("sysinfo")).ok_or(format!("no sysinfo line: {out}"))?;
            if !sys.contains(&format!("exe=Some({:?})", Unavailable::NotPermitted)) {
                return Err(format!("sysinfo fields as uid 65534: {sys}"));
            }
        }
        Ok(Some(format!("as uid 65534: {}", out.lines().collect::<Vec<_>>().join(" | "))))
    }

    /// The kernel's process events: refused to uid 65534 without
    /// capabilities (reported as needing CAP_NET_ADMIN), available to it with
    /// an ambient CAP_NET_ADMIN, as to root.
    fn kernel_events_as_nobody() -> Result<Option<String>, String> {
        if !cfg!(target_os = "linux") {
            let got = daemoneye_platform::kernel_events_availability();
            return match got {
                daemoneye_platform::KernelEventsAvailability::NotThisOs => Ok(Some("not this OS".into())),
                other => Err(format!("expected NotThisOs, got {other:?}")),
            };
        }
        if let Err(why) = setpriv_available() {
            println!("privilege: skipped kernel events as uid 65534: {why}");
            return Ok(None);
        }
        let nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"];
        let with_cap = [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=+net_admin",
            "--ambient-caps=+net_admin",
        ];
        let root = daemoneye_platform::kernel_events_availability();
        if root == daemoneye_platform::KernelEventsAvailability::NotInitialPidNamespace {
            println!("privilege: skipped kernel events as uid 65534: not in the initial PID namespace");
            return Ok(None);
        }
        if root != daemoneye_platform::KernelEventsAvailability::Available {
            return Err(format!("as root: {root:?}"));
        }
        let (plain, capable) = match (run_child(&nobody, "kernel"), run_child(&with_cap, "kernel")) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(e), _) | (_, Err(e)) if e.contains("Permission denied") => {
                println!(
                    "privilege: skipped kernel events as uid 65534: the test binary is not reachable by it ({e})"
                );
                return Ok(None);
            }
            (Err(e), _) | (_, Err(e)) => return Err(e),
        };
        if plain.trim() != "kernel_events=NeedsCapNetAdmin" {
            return Err(format!("uid 65534 without capabilities: {plain}"));
        }
        if capable.trim() != "kernel_events=Available" {
            return Err(format!("uid 65534 with CAP_NET_ADMIN: {capable}"));
        }
        Ok(Some("root: available; uid 65534: needs CAP_NET_ADMIN, available with it".into()))
    }

    fn drop_to_nobody() -> Result<Option<String>, String> {
        if !nix::unistd::geteuid().is_root() {
            println!("privilege: skipped drop_privileges: not running as root");
            return Ok(None);
        }
        let out = run_child(&[], "drop")?;
        if out.trim() != "uid=65534 euid=65534 gid=65534 egid=65534 regain=false" {
            return Err(format!("after drop: {out}"));
        }
        Ok(Some(format!("drop_privileges: {}", out.trim())))
    }

    pub fn main() -> ExitCode {
        if let Ok(mode) = std::env::var(CHILD_ENV) {
            return child(&mode);
        }
        let cases: [(&str, Case); 4] = [
            ("report_as_current_user", report_as_current_user),
            ("enumerate_as_nobody", enumerate_as_nobody),
            ("kernel_events_as_nobody", kernel_events_as_nobody),
            ("drop_to_nobody", drop_to_nobody),
        ];
        let (mut passed, mut failed, mut skipped) = (0, 0, 0);
        for (name, case) in cases {
            match case() {
                Ok(Some(msg)) => {
                    passed += 1;
                    println!("test {name} ... ok ({msg})");
                }
                Ok(None) => skipped += 1,
                Err(e) => {
                    failed += 1;
                    println!("test {name} ... FAILED: {e}");
                }
            }
        }
        println!("privilege: {passed} passed, {failed} failed, {skipped} skipped");
        if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE }
    }
}
