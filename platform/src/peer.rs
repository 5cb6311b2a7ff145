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
/// `SO_PEERCRED`; `getpeereid` on the BSDs and macOS.
#[cfg(any(
    target_os = "macos",
    target_os = "ios",
    target_os = "freebsd",
    target_os = "dragonfly",
    target_os = "openbsd",
    target_os = "netbsd"
))]
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
}
