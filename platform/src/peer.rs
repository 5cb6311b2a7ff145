//! Credentials of the process at the other end of a connected Unix
//! socket, as the kernel reports them (never as the peer claims them).

use serde::{Deserialize, Serialize};

/// Who is connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerCredentials {
    /// Effective user id of the peer when it connected.
    pub uid: u32,
    /// Effective group id of the peer when it connected.
    pub gid: u32,
    /// Process id of the peer, where the OS reports it (Linux).
    pub pid: Option<u32>,
}

/// Reads the peer's credentials of a connected Unix stream socket: Linux
/// `SO_PEERCRED`; `getpeereid` on the BSDs and macOS.
#[cfg(any(target_os = "linux", target_os = "android"))]
pub fn peer_credentials<F: std::os::fd::AsFd>(socket: &F) -> std::io::Result<PeerCredentials> {
    use nix::sys::socket::{getsockopt, sockopt};
    let c = getsockopt(socket, sockopt::PeerCredentials)?;
    Ok(PeerCredentials { uid: c.uid(), gid: c.gid(), pid: u32::try_from(c.pid()).ok().filter(|&p| p > 0) })
}

/// Reads the peer's credentials of a connected Unix stream socket: Linux
/// `SO_PEERCRED`; `getpeereid` on the BSDs and macOS, with the pid from
/// `LOCAL_PEERPID` on macOS. FreeBSD's `xucred` has `cr_pid` since 13,
/// but nix does not expose it: the pid is `None` there, so identities
/// that need a proven pid cannot be proven on FreeBSD yet.
#[cfg(any(target_os = "macos", target_os = "ios"))]
pub fn peer_credentials<F: std::os::fd::AsFd>(socket: &F) -> std::io::Result<PeerCredentials> {
    use nix::sys::socket::{getsockopt, sockopt};
    let (uid, gid) = nix::unistd::getpeereid(socket)?;
    let pid =
        getsockopt(socket, sockopt::LocalPeerPid).ok().and_then(|p| u32::try_from(p).ok()).filter(|&p| p > 0);
    Ok(PeerCredentials { uid: uid.as_raw(), gid: gid.as_raw(), pid })
}

/// Reads the peer's credentials of a connected Unix stream socket: Linux
/// `SO_PEERCRED`; `getpeereid` on the BSDs and macOS.
#[cfg(any(target_os = "freebsd", target_os = "dragonfly", target_os = "openbsd", target_os = "netbsd"))]
pub fn peer_credentials<F: std::os::fd::AsFd>(socket: &F) -> std::io::Result<PeerCredentials> {
    let (uid, gid) = nix::unistd::getpeereid(socket)?;
    Ok(PeerCredentials { uid: uid.as_raw(), gid: gid.as_raw(), pid: None })
}

/// Peer credentials are not implemented on this OS: every peer is refused.
#[cfg(all(
    unix,
    not(any(
        target_os = "linux",
        target_os = "android",
        target_os = "macos",
        target_os = "ios",
        target_os = "freebsd",
        target_os = "dragonfly",
        target_os = "openbsd",
        target_os = "netbsd"
    ))
))]
pub fn peer_credentials<F: std::os::fd::AsFd>(_socket: &F) -> std::io::Result<PeerCredentials> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "peer credentials are not implemented on this OS",
    ))
}

/// Whether [`peer_credentials`] reports the peer's pid on this OS (Linux,
/// Android, macOS, iOS): without it no connection can be tied to a process.
pub const PEER_PID_AVAILABLE: bool =
    cfg!(any(target_os = "linux", target_os = "android", target_os = "macos", target_os = "ios"));

/// When the process `pid` started, in an OS-specific unit that only has to
/// be comparable with itself (Linux: clock ticks since boot, field 22 of
/// `/proc/<pid>/stat`). With the pid it names one process: a pid reused
/// after the process died has another start time. `None` when the process
/// is gone or the OS gives no start time.
pub fn process_start_time(pid: u32) -> Option<u64> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        let stat = std::fs::read(format!("/proc/{pid}/stat")).ok()?;
        // The name sits in parentheses and may hold anything: count the
        // fields from the last `)`; starttime is the 20th after it.
        let close = stat.iter().rposition(|&b| b == b')')?;
        let rest = std::str::from_utf8(stat.get(close + 2..)?).ok()?;
        rest.split(' ').nth(19)?.trim_end().parse().ok()
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    {
        start_time_sysinfo(pid)
    }
}

/// The start time sysinfo reports (seconds since the epoch): the portable
/// path, compiled on Linux for its test.
#[cfg(any(test, not(any(target_os = "linux", target_os = "android"))))]
fn start_time_sysinfo(pid: u32) -> Option<u64> {
    let mut sys = sysinfo::System::new().ok()?;
    let p = sysinfo::Pid::from_u32(pid);
    sys.refresh_processes(sysinfo::ProcessesToUpdate::Some(&[p]), false);
    sys.process(p).map(sysinfo::Process::start_time)
}

/// The effective user id of this process.
pub fn effective_uid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    #[test]
    fn a_socket_pair_reports_this_process() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().expect("pair");
        let c = peer_credentials(&a).expect("credentials");
        assert_eq!(c.uid, nix::unistd::geteuid().as_raw());
        assert_eq!(c.gid, nix::unistd::getegid().as_raw());
        if cfg!(target_os = "linux") {
            assert_eq!(c.pid, Some(std::process::id()));
        }
    }

    #[test]
    fn a_start_time_names_one_process() {
        let me = process_start_time(std::process::id()).expect("own start time");
        assert_eq!(process_start_time(std::process::id()), Some(me));
        let mut child = std::process::Command::new("sleep").arg("5").spawn().expect("spawn");
        let theirs = process_start_time(child.id()).expect("child's start time");
        assert!(theirs >= me, "a later process cannot have started earlier");
        child.kill().expect("kill");
        child.wait().expect("wait");
        assert_eq!(process_start_time(u32::MAX), None);
        assert!(start_time_sysinfo(std::process::id()).is_some_and(|t| t > 0));
        assert_eq!(start_time_sysinfo(u32::MAX), None);
    }
}
