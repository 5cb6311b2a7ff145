//! Default filesystem locations per OS: the system data directory when this
//! process may write there, otherwise a per-user one, so a daemon started
//! by an unprivileged user on a fresh machine works without flags.

use std::path::{Path, PathBuf};

/// The system-wide data directory of this OS (`/var/lib/daemoneye`;
/// `/var/db/daemoneye` on the BSDs, `/Library/Application Support/DaemonEye`
/// on macOS, `%ProgramData%\\DaemonEye` on Windows).
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
    #[cfg(target_os = "macos")]
    {
        PathBuf::from("/Library/Application Support/DaemonEye")
    }
    #[cfg(not(any(
        target_os = "windows",
        target_os = "macos",
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

/// Whether a directory exists and accepts a new file, or can be created
/// (mode 0700, as [`create_private_dir`] makes it).
fn writable(dir: &Path) -> bool {
    if !dir.exists() {
        return create_private_dir(dir).is_ok();
    }
    let probe = dir.join(format!(".write-test-{}", std::process::id()));
    match crate::files::create_private_file(&probe) {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            true
        }
        Err(_) => false,
    }
}

/// The longest Unix socket path this OS takes, in bytes: the size of
/// `sockaddr_un.sun_path` less its terminating NUL (108 on Linux, 104 on
/// the BSDs and macOS).
pub const MAX_SOCKET_PATH: usize =
    if cfg!(any(target_os = "linux", target_os = "android")) { 107 } else { 103 };

/// Refuses a Unix socket path the OS cannot bind or connect to, with a
/// message naming the path, its length and the limit (binding one fails
/// with an obscure "path must be shorter than SUN_LEN" or `ENAMETOOLONG`).
pub fn check_socket_path(path: &Path) -> Result<(), String> {
    let len = path.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        return Err(format!(
            "socket path {} is {len} bytes; this OS allows at most {MAX_SOCKET_PATH}: use a shorter data_dir or set broker_socket",
            path.display()
        ));
    }
    Ok(())
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
    fn a_socket_path_over_the_limit_is_refused_with_its_length() {
        let at_limit = PathBuf::from(format!("/{}", "s".repeat(MAX_SOCKET_PATH - 1)));
        assert_eq!(check_socket_path(&at_limit), Ok(()));
        let over = PathBuf::from(format!("/{}", "s".repeat(MAX_SOCKET_PATH)));
        let e = check_socket_path(&over).unwrap_err();
        assert!(e.contains(&format!("{} bytes", MAX_SOCKET_PATH + 1)) && e.contains("at most"), "{e}");
        // The limit is the OS's: one byte more cannot be bound.
        #[cfg(unix)]
        {
            let dir = tempfile::tempdir().unwrap();
            let mut name = dir.path().to_path_buf();
            let room = MAX_SOCKET_PATH - name.as_os_str().len() - 1;
            name.push("s".repeat(room));
            assert!(std::os::unix::net::UnixListener::bind(&name).is_ok(), "at the limit it binds");
            name.set_file_name("s".repeat(room + 1));
            assert!(check_socket_path(&name).is_err());
            assert!(std::os::unix::net::UnixListener::bind(&name).is_err(), "one more byte does not");
        }
    }

    #[test]
    fn writable_sees_a_temp_dir_and_creates_a_missing_one() {
        let tmp = tempfile::tempdir().unwrap();
        assert!(writable(tmp.path()));
        assert!(writable(&tmp.path().join("a/b")));
        assert!(tmp.path().join("a/b").is_dir());
    }
}

/// Creates a directory (and its missing parents) with mode 0700 on Unix,
/// whatever the umask: the daemons' data holds command lines and the bus
/// socket. An existing directory is left as it is; to also refuse one
/// that is another user's or that others may write to, and tighten a
/// readable one, use [`crate::files::ensure_private_dir`].
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    crate::files::create_missing_dirs(dir)
}

/// A pid file held with an exclusive lock for the life of the process:
/// one daemon per file. It is never removed: unlinking it at exit would
/// let a starting daemon lock the old inode while a third one creates and
/// locks a new file. A file left behind is not locked, so the next daemon
/// takes it over and writes its own pid.
#[derive(Debug)]
pub struct PidLock {
    _file: std::fs::File,
}

/// Why a [`PidLock`] was not taken.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PidLockError {
    /// Another process holds it.
    #[error("held by pid {} (lock file {})", pid.map_or("?".to_owned(), |p| p.to_string()), path.display())]
    Held {
        /// The holder, as its file says.
        pid: Option<u32>,
        /// The lock file.
        path: PathBuf,
    },
    /// It could not be opened or written.
    #[error("lock file {}: {source}", path.display())]
    Io {
        /// The lock file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl PidLock {
    /// Takes the lock at `path` and writes this process's pid into it. The
    /// file is made with [`crate::files::open_private_file`]: mode 0600
    /// (another user can neither read it nor open it to hold its lock),
    /// never through a symbolic link, and one left with a looser mode is
    /// tightened.
    pub fn acquire(path: &Path) -> Result<PidLock, PidLockError> {
        use std::io::Write;
        let io = |source| PidLockError::Io { path: path.to_owned(), source };
        let mut file = crate::files::open_private_file(path).map_err(io)?;
        if file.try_lock().is_err() {
            return Err(PidLockError::Held { pid: read_pid(path), path: path.to_owned() });
        }
        file.set_len(0).map_err(io)?;
        writeln!(file, "{}", std::process::id()).map_err(io)?;
        file.sync_all().map_err(io)?;
        Ok(PidLock { _file: file })
    }

    /// Who holds the lock at `path`: `Some(pid)` while a process holds it
    /// (`Some(None)` when its file names no pid), `None` when nobody does
    /// or there is no file. Probing takes the lock for an instant when it
    /// is free.
    pub fn holder(path: &Path) -> Option<Option<u32>> {
        let file = std::fs::File::open(path).ok()?;
        match file.try_lock() {
            Ok(()) => None,
            Err(std::fs::TryLockError::WouldBlock) => Some(read_pid(path)),
            Err(std::fs::TryLockError::Error(_)) => None,
        }
    }
}

fn read_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok().and_then(|s| s.trim().parse().ok())
}

#[cfg(test)]
mod lock_tests {
    use super::*;

    #[test]
    fn a_pid_lock_is_exclusive_names_its_holder_and_is_free_after_drop() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a").join("d.pid");
        create_private_dir(path.parent().expect("parent")).expect("dir");
        assert_eq!(PidLock::holder(&path), None, "no file, no holder");
        let lock = PidLock::acquire(&path).expect("first");
        assert_eq!(PidLock::holder(&path), Some(Some(std::process::id())));
        match PidLock::acquire(&path) {
            Err(PidLockError::Held { pid, .. }) => assert_eq!(pid, Some(std::process::id())),
            other => panic!("second lock: {other:?}"),
        }
        drop(lock);
        // A child another test forks at this moment holds a copy of the
        // descriptor (and so the lock) until its exec closes it: wait for
        // that, briefly.
        let until = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while PidLock::holder(&path).is_some() && std::time::Instant::now() < until {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(PidLock::holder(&path), None, "released with its holder");
        assert!(PidLock::acquire(&path).is_ok(), "taken over");
    }
}
