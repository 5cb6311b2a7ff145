//! What this process may see of other users' processes, and a helper to
//! drop privileges for good.

use serde::{Deserialize, Serialize};

use crate::Error;

/// Bit of `CAP_DAC_READ_SEARCH` in a Linux capability set.
#[cfg(target_os = "linux")]
const CAP_DAC_READ_SEARCH: u32 = 2;
/// Bit of `CAP_SYS_PTRACE` in a Linux capability set.
#[cfg(target_os = "linux")]
const CAP_SYS_PTRACE: u32 = 19;

/// The privileges that decide which fields of other users' processes can
/// be read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrivilegeReport {
    /// Effective user id (`None` where ids are not numeric).
    pub euid: Option<u32>,
    /// Running as root (or an administrator on Windows).
    pub root: bool,
    /// Linux: `CAP_SYS_PTRACE` in the effective set (needed for other
    /// users' `exe`, `cwd` and `environ`). `None` off Linux.
    pub cap_sys_ptrace: Option<bool>,
    /// Linux: `CAP_DAC_READ_SEARCH` in the effective set (reading other
    /// users' files, e.g. to hash their executables). `None` off Linux.
    pub cap_dac_read_search: Option<bool>,
    /// Linux: the `hidepid` option of `/proc` (`None` when not set).
    pub proc_hidepid: Option<String>,
    /// Fields that will be missing (as not permitted) for processes of
    /// other users.
    pub missing_for_other_users: Vec<String>,
    /// One sentence for logs and health data.
    pub summary: String,
}

/// True when this process can read other users' process details.
pub fn is_privileged() -> bool {
    let r = detect();
    r.missing_for_other_users.is_empty()
}

/// Detects the privileges of this process.
pub fn detect() -> PrivilegeReport {
    #[cfg(target_os = "linux")]
    {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let cap_eff = status
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok());
        let hidepid = crate::procfs::proc_hidepid(std::path::Path::new("/proc/mounts"));
        from_linux(nix::unistd::geteuid().as_raw(), cap_eff, hidepid)
    }
    #[cfg(all(unix, not(target_os = "linux")))]
    {
        let euid = nix::unistd::geteuid().as_raw();
        let (missing, summary) = unprivileged_bsd(euid);
        PrivilegeReport {
            euid: Some(euid),
            root: euid == 0,
            cap_sys_ptrace: None,
            cap_dac_read_search: None,
            proc_hidepid: None,
            missing_for_other_users: missing.into_iter().map(str::to_owned).collect(),
            summary,
        }
    }
    #[cfg(not(unix))]
    {
        PrivilegeReport {
            euid: None,
            root: false,
            cap_sys_ptrace: None,
            cap_dac_read_search: None,
            proc_hidepid: None,
            missing_for_other_users: ["exe", "exe_file", "cwd", "argv", "user"].map(str::to_owned).to_vec(),
            // Whether the token is elevated takes a raw Win32 call, which
            // this crate forbids, and no maintained crate wraps it safely
            // (is_elevated: winapi 0.3, unchanged since 2019).
            summary: "administrator detection is not implemented on this OS; assuming unprivileged"
                .to_owned(),
        }
    }
}

/// What a non-root process cannot read of other users' processes on the
/// BSDs and macOS, and the sentence saying so (nothing missing for root).
/// FreeBSD hands out other users' executable paths, command lines and
/// credentials through sysctl `kern.proc`; only the working directory
/// needs root (and with `security.bsd.see_other_uids=0` their processes
/// are not listed at all). macOS gives a non-root process no path,
/// arguments, working directory or start time of another user's process.
#[cfg(all(unix, not(target_os = "linux")))]
fn unprivileged_bsd(euid: u32) -> (Vec<&'static str>, String) {
    if euid == 0 {
        return (Vec::new(), "running as root: all fields of all processes are readable".to_owned());
    }
    if cfg!(any(target_os = "macos", target_os = "ios")) {
        (
            vec!["exe", "exe_file", "cwd", "argv", "started_unix"],
            format!(
                "running as uid {euid}: other users' executables, command lines, working directories and \
                 start times are not readable"
            ),
        )
    } else {
        (
            vec!["cwd"],
            format!(
                "running as uid {euid}: other users' working directories need root (and their processes are \
                 not listed at all with security.bsd.see_other_uids=0)"
            ),
        )
    }
}

/// The Linux report from its inputs (separate so it can be tested with any
/// capability set).
#[cfg(target_os = "linux")]
pub(crate) fn from_linux(euid: u32, cap_eff: Option<u64>, hidepid: Option<String>) -> PrivilegeReport {
    let has = |bit: u32| cap_eff.map(|c| c & (1 << bit) != 0);
    let ptrace = has(CAP_SYS_PTRACE).unwrap_or(false);
    let dac = has(CAP_DAC_READ_SEARCH).unwrap_or(false);
    let mut missing = Vec::new();
    if hidepid.is_some() && !ptrace {
        // hidepid=1 hides the contents, hidepid=2/invisible the processes.
        missing.extend(["stat", "argv", "credentials", "exe", "exe_file", "cwd", "user"]);
    } else if !ptrace {
        missing.extend(["exe", "exe_file", "exe_deleted", "cwd"]);
    }
    if !dac {
        missing.push("sha256 of executables not readable by this user");
    }
    let summary = if missing.is_empty() {
        format!(
            "uid {euid} with CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH: all fields of all processes are readable"
        )
    } else {
        let mut s = format!(
            "uid {euid}, CAP_SYS_PTRACE {}, CAP_DAC_READ_SEARCH {}",
            if ptrace { "yes" } else { "no" },
            if dac { "yes" } else { "no" }
        );
        if let Some(h) = &hidepid {
            s.push_str(&format!(", /proc mounted with hidepid={h}"));
        }
        s.push_str(&format!("; for other users' processes these will be missing: {}", missing.join(", ")));
        s
    };
    PrivilegeReport {
        euid: Some(euid),
        root: euid == 0,
        cap_sys_ptrace: Some(ptrace),
        cap_dac_read_search: Some(dac),
        proc_hidepid: hidepid,
        missing_for_other_users: missing.into_iter().map(str::to_owned).collect(),
        summary,
    }
}

/// Drops this whole process to `uid`/`gid` for good: supplementary groups
/// are replaced by `gid`, then real, effective and saved group ids, then
/// user ids are set, in that order (the group change needs the privilege
/// the user change gives up). Afterwards it verifies, without changing
/// anything, that the ids are as asked, the groups are just `gid` and (on
/// Linux) no capability is left in the permitted, effective or ambient
/// sets. Call it before spawning threads that must not keep privileges.
///
/// If the final probe finds that root can be regained, the process aborts
/// rather than return as root.
#[cfg(all(unix, not(any(target_os = "macos", target_os = "ios"))))]
pub fn drop_privileges(uid: u32, gid: u32) -> Result<(), Error> {
    use nix::unistd::{Gid, Uid};
    let fail = |op: &'static str| move |e: nix::Error| Error::Privilege { op, source: e.into() };
    let (u, g) = (Uid::from_raw(uid), Gid::from_raw(gid));
    nix::unistd::setgroups(&[g]).map_err(fail("setgroups"))?;
    set_ids(u, g).map_err(|(op, e)| fail(op)(e))?;
    verify_dropped(u, g)?;
    if uid != 0 && nix::unistd::setuid(Uid::from_raw(0)).is_ok() {
        // The probe itself just made this process root again: never return
        // like that.
        log::error!("privilege drop to uid {uid} failed: root could be regained; aborting");
        std::process::abort();
    }
    Ok(())
}

/// On Apple systems the drop is refused: their `setgroups` is not in nix
/// (its group semantics differ), and keeping root's supplementary groups
/// would not be a drop. Start the daemon as the user instead.
#[cfg(any(target_os = "macos", target_os = "ios"))]
pub fn drop_privileges(uid: u32, gid: u32) -> Result<(), Error> {
    log::error!(
        "run_as (uid {uid}, gid {gid}) is not supported on macOS: root's supplementary groups cannot be \
         cleared; start the agent as that user instead"
    );
    Err(Error::Privilege { op: "setgroups", source: std::io::Error::from(std::io::ErrorKind::Unsupported) })
}

#[cfg(any(
    target_os = "linux",
    target_os = "android",
    target_os = "freebsd",
    target_os = "dragonfly",
    target_os = "openbsd"
))]
fn set_ids(u: nix::unistd::Uid, g: nix::unistd::Gid) -> Result<(), (&'static str, nix::Error)> {
    nix::unistd::setresgid(g, g, g).map_err(|e| ("setresgid", e))?;
    nix::unistd::setresuid(u, u, u).map_err(|e| ("setresuid", e))
}

/// Without `setres*id` (NetBSD): as root, `setgid`/`setuid` set the
/// real, effective and saved ids together.
#[cfg(all(
    unix,
    not(any(
        target_os = "linux",
        target_os = "android",
        target_os = "freebsd",
        target_os = "dragonfly",
        target_os = "openbsd",
        target_os = "macos",
        target_os = "ios"
    ))
))]
fn set_ids(u: nix::unistd::Uid, g: nix::unistd::Gid) -> Result<(), (&'static str, nix::Error)> {
    nix::unistd::setgid(g).map_err(|e| ("setgid", e))?;
    nix::unistd::setuid(u).map_err(|e| ("setuid", e))
}

#[cfg(all(unix, not(any(target_os = "macos", target_os = "ios"))))]
fn verify_dropped(u: nix::unistd::Uid, g: nix::unistd::Gid) -> Result<(), Error> {
    let bad = |what: String| Err(Error::Privilege { op: "verify", source: std::io::Error::other(what) });
    if (nix::unistd::getuid(), nix::unistd::geteuid()) != (u, u)
        || (nix::unistd::getgid(), nix::unistd::getegid()) != (g, g)
    {
        return bad("user or group ids did not change".into());
    }
    #[cfg(not(any(target_os = "macos", target_os = "ios")))]
    if let Ok(groups) = nix::unistd::getgroups()
        && groups.iter().any(|&x| x != g)
    {
        return bad(format!("supplementary groups remain: {groups:?}"));
    }
    #[cfg(target_os = "linux")]
    if !u.is_root() {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        for set in ["CapPrm:", "CapEff:", "CapAmb:"] {
            let v = status.lines().find_map(|l| l.strip_prefix(set)).map(str::trim).unwrap_or("?");
            if u64::from_str_radix(v, 16) != Ok(0) {
                return bad(format!("capabilities remain: {set} {v}"));
            }
        }
    }
    Ok(())
}

/// Privilege drop is not available on this OS.
#[cfg(not(unix))]
pub fn drop_privileges(_uid: u32, _gid: u32) -> Result<(), Error> {
    Err(Error::NotSupported { what: "dropping privileges".into() })
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn full_capabilities_miss_nothing() {
        let r = from_linux(0, Some(0x1ff_ffff_ffff), None);
        assert!(r.root && r.cap_sys_ptrace == Some(true) && r.cap_dac_read_search == Some(true));
        assert!(r.missing_for_other_users.is_empty(), "{r:?}");
    }

    #[test]
    fn no_capabilities_name_the_missing_fields() {
        let r = from_linux(65534, Some(0), None);
        assert!(!r.root);
        assert!(
            r.missing_for_other_users.iter().any(|f| f == "exe")
                && r.missing_for_other_users.iter().any(|f| f == "cwd")
        );
        assert!(r.summary.contains("CAP_SYS_PTRACE no"), "{}", r.summary);
        let only_ptrace = from_linux(1000, Some(1 << CAP_SYS_PTRACE), None);
        assert!(!only_ptrace.missing_for_other_users.iter().any(|f| f == "exe"));
        let hidden = from_linux(1000, Some(0), Some("2".into()));
        assert!(hidden.missing_for_other_users.iter().any(|f| f == "stat"), "{hidden:?}");
        assert!(hidden.summary.contains("hidepid=2"));
    }
}
