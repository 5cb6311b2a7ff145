//! Default filesystem locations per OS: the system data directory when this
//! process may write there, otherwise a per-user one, so a daemon started
//! by an unprivileged user on a fresh machine works without flags.

use std::path::{Path, PathBuf};

/// The system-wide data directory of this OS.
pub fn system_data_dir() -> PathBuf {
    #[cfg(target_os = "windows")]
    {
        PathBuf::from(std::env::var_os("ProgramData").unwrap_or_else(|| "C:\\ProgramData".into()))
            .join("DaemonEye")
    }
    #[cfg(any(target_os = "freebsd", target_os = "openbsd", target_os = "netbsd", target_os = "dragonfly"))]
    {
        PathBuf::from("/var/db/daemoneye")
    }
    #[cfg(not(any(
        target_os = "windows",
        target_os = "freebsd",
        target_os = "openbsd",
        target_os = "netbsd",
        target_os = "dragonfly"
    )))]
    {
        PathBuf::from("/var/lib/daemoneye")
    }
}

/// The per-user data directory: `$XDG_DATA_HOME/daemoneye`, else
/// `~/.local/share/daemoneye` (`~/Library/Application Support/DaemonEye` on
/// macOS, `%LOCALAPPDATA%\DaemonEye` on Windows); `None` without a home.
pub fn user_data_dir() -> Option<PathBuf> {
    #[cfg(target_os = "windows")]
    {
        std::env::var_os("LOCALAPPDATA").map(|d| PathBuf::from(d).join("DaemonEye"))
    }
    #[cfg(target_os = "macos")]
    {
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join("Library/Application Support/DaemonEye"))
    }
    #[cfg(not(any(target_os = "windows", target_os = "macos")))]
    {
        if let Some(xdg) = std::env::var_os("XDG_DATA_HOME").filter(|x| Path::new(x).is_absolute()) {
            return Some(PathBuf::from(xdg).join("daemoneye"));
        }
        std::env::var_os("HOME")
            .filter(|h| !h.is_empty())
            .map(|h| PathBuf::from(h).join(".local/share/daemoneye"))
    }
}

/// The data directory to use when none is configured: the system one if it
/// exists and is writable by this process (or can be created), else the
/// per-user one, else the system one (the caller's error then names it).
pub fn default_data_dir() -> PathBuf {
    let system = system_data_dir();
    if writable(&system) {
        return system;
    }
    user_data_dir().unwrap_or(system)
}

/// Whether a directory exists and accepts a new file, or can be created.
fn writable(dir: &Path) -> bool {
    if !dir.exists() {
        return std::fs::create_dir_all(dir).is_ok();
    }
    let probe = dir.join(format!(".write-test-{}", std::process::id()));
    match std::fs::File::create(&probe) {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            true
        }
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_absolute() {
        // default_data_dir() may create the system directory: not called
        // here (tests touch nothing outside their temp dirs).
        assert!(system_data_dir().is_absolute());
        assert!(user_data_dir().is_none_or(|d| d.is_absolute()));
    }

    #[test]
    fn writable_sees_a_temp_dir_and_creates_a_missing_one() {
        let tmp = tempfile::tempdir().unwrap();
        assert!(writable(tmp.path()));
        assert!(writable(&tmp.path().join("a/b")));
        assert!(tmp.path().join("a/b").is_dir());
    }
}
