//! Starting a daemon's child process in a clean signal state.
//!
//! The daemons block SIGTERM, SIGINT and SIGUSR1 in every thread (see
//! [`crate::signals`]) and `std::process::Command` passes that mask on to
//! the children, which then never see a SIGTERM. [`spawn`] starts the
//! child with `posix_spawn` instead, with an empty signal mask, SIGPIPE
//! back to its default action (Rust ignores it), stdin on `/dev/null`,
//! and, when asked, in a process group of its own. Where `posix_spawn` is
//! not wrapped (other Unixes), it falls back to `Command`, and the child
//! inherits the mask.

use std::ffi::{OsStr, OsString};
use std::path::Path;

use nix::sys::signal::Signal;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// It exited with this status.
    Code(i32),
    /// A signal ended it.
    Signal(i32),
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Exit::Code(c) => write!(f, "exit status {c}"),
            Exit::Signal(s) => match Signal::try_from(s) {
                Ok(name) => write!(f, "signal {s} ({name})"),
                Err(_) => write!(f, "signal {s}"),
            },
        }
    }
}

/// A child process; dropping it does not kill it (see [`Spawned::kill`]).
#[derive(Debug)]
pub struct Spawned {
    pid: Pid,
    exit: Option<Exit>,
}

impl Spawned {
    /// Its pid.
    pub fn id(&self) -> u32 {
        self.pid.as_raw().unsigned_abs()
    }

    /// `Some` once it has ended (and is reaped).
    pub fn try_wait(&mut self) -> std::io::Result<Option<Exit>> {
        if self.exit.is_none() {
            self.exit = reap(self.pid, Some(WaitPidFlag::WNOHANG))?;
        }
        Ok(self.exit)
    }

    /// Waits for it to end.
    pub fn wait(&mut self) -> std::io::Result<Exit> {
        loop {
            if let Some(e) = self.try_wait()? {
                return Ok(e);
            }
            if let Some(e) = reap(self.pid, None)? {
                self.exit = Some(e);
                return Ok(e);
            }
        }
    }

    /// Sends it a signal, unless it was already reaped (its pid may then
    /// belong to someone else: `Ok`, nothing sent). An error is the OS's
    /// refusal (`EPERM`), for the caller to report.
    pub fn signal(&mut self, sig: Signal) -> nix::Result<()> {
        if self.exit.is_none() {
            return nix::sys::signal::kill(self.pid, sig);
        }
        Ok(())
    }

    /// SIGKILL.
    pub fn kill(&mut self) -> nix::Result<()> {
        self.signal(Signal::SIGKILL)
    }
}

fn reap(pid: Pid, flags: Option<WaitPidFlag>) -> std::io::Result<Option<Exit>> {
    match waitpid(pid, flags) {
        Ok(WaitStatus::Exited(_, code)) => Ok(Some(Exit::Code(code))),
        Ok(WaitStatus::Signaled(_, sig, _)) => Ok(Some(Exit::Signal(sig as i32))),
        Ok(_) => Ok(None),
        Err(nix::errno::Errno::EINTR) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Starts `program` with `args`, the current environment plus `env`, stdin
/// on `/dev/null`, stdout and stderr on `output` (inherited without it);
/// in a new process group when `own_group` is set.
pub fn spawn(
    program: &Path,
    args: &[OsString],
    env: &[(&str, &OsStr)],
    own_group: bool,
    output: Option<&std::fs::File>,
) -> std::io::Result<Spawned> {
    imp::spawn(program, args, env, own_group, output)
}

#[cfg(any(target_os = "linux", target_os = "freebsd", target_os = "macos"))]
mod imp {
    use std::ffi::{CString, OsStr, OsString};
    use std::os::fd::AsRawFd;
    use std::os::unix::ffi::OsStrExt;
    use std::path::Path;

    use nix::spawn::{PosixSpawnAttr, PosixSpawnFileActions, PosixSpawnFlags, posix_spawn};
    use nix::sys::signal::{SigSet, Signal};
    use nix::unistd::Pid;

    use super::Spawned;

    fn cstring(s: &OsStr) -> std::io::Result<CString> {
        CString::new(s.as_bytes()).map_err(|_| std::io::Error::other("a NUL byte in an argument or variable"))
    }

    /// `NAME=value`.
    fn variable(name: &OsStr, value: &OsStr) -> std::io::Result<CString> {
        let bytes = [name.as_bytes(), b"=", value.as_bytes()].concat();
        CString::new(bytes).map_err(|_| std::io::Error::other("a NUL byte in an environment variable"))
    }

    pub fn spawn(
        program: &Path,
        args: &[OsString],
        env: &[(&str, &OsStr)],
        own_group: bool,
        output: Option<&std::fs::File>,
    ) -> std::io::Result<Spawned> {
        let mut argv = vec![cstring(program.as_os_str())?];
        for a in args {
            argv.push(cstring(a)?);
        }
        let mut envp = Vec::new();
        for (k, v) in std::env::vars_os() {
            if !env.iter().any(|(name, _)| OsStr::new(name) == k) {
                envp.push(variable(&k, &v)?);
            }
        }
        for (k, v) in env {
            envp.push(variable(OsStr::new(k), v)?);
        }
        // Opened close-on-exec here; dup2 onto fd 0 clears that in the child.
        let devnull = std::fs::File::open("/dev/null")?;
        let mut actions = PosixSpawnFileActions::init()?;
        actions.add_dup2(devnull.as_raw_fd(), 0)?;
        if let Some(out) = output {
            actions.add_dup2(out.as_raw_fd(), 1)?;
            actions.add_dup2(out.as_raw_fd(), 2)?;
        }
        let mut attr = PosixSpawnAttr::init()?;
        let mut flags = PosixSpawnFlags::POSIX_SPAWN_SETSIGMASK | PosixSpawnFlags::POSIX_SPAWN_SETSIGDEF;
        if own_group {
            flags |= PosixSpawnFlags::POSIX_SPAWN_SETPGROUP;
            attr.set_pgroup(Pid::from_raw(0))?;
        }
        attr.set_flags(flags)?;
        attr.set_sigmask(&SigSet::empty())?;
        let mut defaults = SigSet::empty();
        for s in [Signal::SIGPIPE, Signal::SIGTERM, Signal::SIGINT, Signal::SIGUSR1] {
            defaults.add(s);
        }
        attr.set_sigdefault(&defaults)?;
        let pid = posix_spawn(program, &actions, &attr, &argv, &envp)?;
        Ok(Spawned { pid, exit: None })
    }
}

#[cfg(not(any(target_os = "linux", target_os = "freebsd", target_os = "macos")))]
mod imp {
    use std::ffi::{OsStr, OsString};
    use std::os::unix::process::CommandExt;
    use std::path::Path;

    use super::Spawned;

    pub fn spawn(
        program: &Path,
        args: &[OsString],
        env: &[(&str, &OsStr)],
        own_group: bool,
        output: Option<&std::fs::File>,
    ) -> std::io::Result<Spawned> {
        let mut cmd = std::process::Command::new(program);
        cmd.args(args).envs(env.iter().map(|(k, v)| (k, v))).stdin(std::process::Stdio::null());
        if let Some(out) = output {
            cmd.stdout(out.try_clone()?).stderr(out.try_clone()?);
        }
        if own_group {
            cmd.process_group(0);
        }
        let child = cmd.spawn()?;
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
        // The `Child` is forgotten; the pid is reaped with waitpid.
        drop(child);
        Ok(Spawned { pid, exit: None })
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn a_child_starts_with_no_blocked_signal_in_its_own_group_and_dies_of_sigterm() {
        // The caller's mask, as a daemon has it.
        let mut set = nix::sys::signal::SigSet::empty();
        set.add(Signal::SIGTERM);
        let old = set.thread_swap_mask(nix::sys::signal::SigmaskHow::SIG_BLOCK).expect("mask");
        let spawned = spawn(Path::new("/bin/sh"), &["-c".into(), "exec sleep 30".into()], &[], true, None);
        old.thread_set_mask().expect("restore");
        let mut child = spawned.expect("spawn");
        let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).expect("status");
        let blocked = status.lines().find(|l| l.starts_with("SigBlk:")).expect("SigBlk");
        assert_eq!(blocked.split_whitespace().nth(1), Some("0000000000000000"), "{blocked}");
        let pgid = nix::unistd::getpgid(Some(Pid::from_raw(child.id() as i32))).expect("pgid");
        assert_eq!(pgid.as_raw().unsigned_abs(), child.id(), "its own process group");
        child.signal(Signal::SIGTERM).expect("SIGTERM");
        assert_eq!(child.wait().expect("wait"), Exit::Signal(15));
        assert_eq!(Exit::Signal(15).to_string(), "signal 15 (SIGTERM)");
        assert_eq!(child.try_wait().expect("again"), Some(Exit::Signal(15)), "reaped once, remembered");
    }

    #[test]
    fn the_environment_is_passed_with_the_additions_and_the_output_goes_to_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("out");
        let file = std::fs::File::create(&out).expect("create");
        let script = "echo \"$DE_TEST_VAR\"; echo on-stderr >&2";
        let mut child = spawn(
            Path::new("/bin/sh"),
            &["-c".into(), script.into()],
            &[("DE_TEST_VAR", OsStr::new("x y"))],
            false,
            Some(&file),
        )
        .expect("spawn");
        assert_eq!(child.wait().expect("wait"), Exit::Code(0));
        assert_eq!(std::fs::read_to_string(&out).expect("read"), "x y\non-stderr\n");
        assert!(
            spawn(Path::new("/nonexistent/x"), &[], &[], false, None).is_err(),
            "a missing program is an error"
        );
    }
}
