//! DaemonEye's own executables, recognised by path and hash, so the
//! built-in rules do not alert on the agent, its collectors and its tools
//! (a checkout built under `/tmp` runs all of them from a temporary
//! directory, which `exe-in-temp-dir` and `root-from-user-writable-dir`
//! are about).
//!
//! Rules read it as the SQL function `daemoneye_self(exe, sha256)`
//! (registered on every connection rules run or are checked on; with no
//! [`OwnBinaries`] given it is never true). It is true when `exe` is the
//! canonical path of one of DaemonEye's executables and:
//!
//! - the event has a `sha256` (the collector hashes executables): it is
//!   the SHA-256 of the file at that path, computed by
//!   [`OwnBinaries::hash_all`] (a thread of its own at the agent's start:
//!   a debug build is 80 MB); until that is done, as below;
//! - the event has no hash: the file at that path is unchanged since the
//!   agent started (same device, inode, size, mtime and ctime, which only
//!   a write, a rename over it or a change of owner or mode alter).
//!
//! A name alone never matches: a program called `procmond` elsewhere, or
//! one swapped in at our path, is alerted on as any other.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use rusqlite::Connection;
use rusqlite::functions::FunctionFlags;

/// The SQL function's name.
pub const FUNCTION: &str = "daemoneye_self";

/// What identifies a file's content without reading it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Identity {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl Identity {
    fn of(path: &Path) -> Option<Identity> {
        let m = std::fs::metadata(path).ok()?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
            Some(Identity {
                dev: m.dev(),
                ino: m.ino(),
                size: m.size(),
                mtime_ns: ns(m.mtime(), m.mtime_nsec()),
                ctime_ns: ns(m.ctime(), m.ctime_nsec()),
            })
        }
        #[cfg(not(unix))]
        {
            let ns = m
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| i128::try_from(d.as_nanos()).unwrap_or(i128::MAX));
            Some(Identity { dev: 0, ino: 0, size: m.len(), mtime_ns: ns, ctime_ns: ns })
        }
    }
}

/// One executable of ours.
#[derive(Debug)]
struct Own {
    /// Canonical, as the kernel reports a process's executable.
    path: String,
    /// As found when the agent started.
    identity: Identity,
    /// Its SHA-256 (lowercase hex) once hashed; `None` inside when it
    /// changed before or while it was read.
    sha256: OnceLock<Option<String>>,
}

/// DaemonEye's executables on this host (see the module docs).
#[derive(Debug, Default)]
pub struct OwnBinaries {
    entries: Vec<Own>,
}

impl OwnBinaries {
    /// These executables, as they are now: each path is made canonical and
    /// its file identity taken (cheap: no file is read). Paths that do not
    /// exist, are not regular files or are named twice are left out.
    pub fn new(paths: impl IntoIterator<Item = PathBuf>) -> OwnBinaries {
        let mut entries: Vec<Own> = Vec::new();
        for p in paths {
            let Ok(path) = std::fs::canonicalize(&p) else { continue };
            if !std::fs::metadata(&path).is_ok_and(|m| m.is_file()) {
                continue;
            }
            let (Some(text), Some(identity)) = (path.to_str(), Identity::of(&path)) else { continue };
            if entries.iter().all(|e| e.path != text) {
                entries.push(Own { path: text.to_owned(), identity, sha256: OnceLock::new() });
            }
        }
        OwnBinaries { entries }
    }

    /// The canonical paths recognised.
    pub fn paths(&self) -> Vec<&str> {
        self.entries.iter().map(|e| e.path.as_str()).collect()
    }

    /// Hashes every file not hashed yet. A file that changed since
    /// [`OwnBinaries::new`] (or while it was read) gets no hash, so no
    /// event matches it. Reads each whole file: run it off the hot path.
    pub fn hash_all(&self) {
        for e in &self.entries {
            e.sha256.get_or_init(|| {
                let digest = sha256_file(Path::new(&e.path));
                let same = Identity::of(Path::new(&e.path)).as_ref() == Some(&e.identity);
                match digest {
                    Ok(d) if same => Some(d),
                    Ok(_) => {
                        log::warn!("{} changed since the agent started: its events are not ours", e.path);
                        None
                    }
                    Err(err) => {
                        log::warn!("cannot hash {}: {err}", e.path);
                        None
                    }
                }
            });
        }
    }

    /// Whether an event with this executable and hash is one of ours.
    pub fn is_own(&self, exe: Option<&str>, sha256: Option<&str>) -> bool {
        let Some(e) = exe.and_then(|x| self.entries.iter().find(|e| e.path == x)) else {
            return false;
        };
        match (sha256, e.sha256.get()) {
            (Some(theirs), Some(Some(ours))) => theirs.eq_ignore_ascii_case(ours),
            (Some(_), Some(None)) => false,
            // Not hashed yet, or no hash in the event: unchanged since start.
            _ => Identity::of(Path::new(&e.path)).as_ref() == Some(&e.identity),
        }
    }
}

/// The SHA-256 of a regular file (never through a link), lowercase hex.
fn sha256_file(path: &Path) -> std::io::Result<String> {
    use sha2::Digest;
    use std::io::Read;
    let mut file = daemoneye_platform::files::open_regular_file(path)?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Registers [`FUNCTION`] on `conn` for `own` (replacing an earlier one).
pub fn register(conn: &Connection, own: Arc<OwnBinaries>) -> rusqlite::Result<()> {
    conn.create_scalar_function(FUNCTION, 2, FunctionFlags::SQLITE_UTF8, move |ctx| {
        let exe: Option<String> = ctx.get(0)?;
        let sha256: Option<String> = ctx.get(1)?;
        Ok(own.is_own(exe.as_deref(), sha256.as_deref()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_executable_is_ours_by_path_and_hash_never_by_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ours = dir.path().join("procmond");
        std::fs::write(&ours, b"our program").expect("write");
        let other = dir.path().join("elsewhere");
        std::fs::create_dir(&other).expect("mkdir");
        std::fs::write(other.join("procmond"), b"our program").expect("write");
        let own = OwnBinaries::new([ours.clone(), dir.path().join("missing"), dir.path().to_owned()]);
        let path = std::fs::canonicalize(&ours).expect("canonical").display().to_string();
        assert_eq!(own.paths(), [path.as_str()], "only existing regular files");
        let hash = sha256_file(&ours).expect("hash");
        assert_eq!(hash.len(), 64);

        // Without a hash in the event: the file unchanged since the start.
        assert!(own.is_own(Some(&path), None));
        // Another path with the same name (and content) is not ours.
        let elsewhere = std::fs::canonicalize(other.join("procmond")).expect("canonical");
        assert!(!own.is_own(Some(&elsewhere.display().to_string()), Some(&hash)));
        assert!(!own.is_own(None, Some(&hash)));
        // With a hash: it must be the file's.
        own.hash_all();
        assert!(own.is_own(Some(&path), Some(&hash)));
        assert!(own.is_own(Some(&path), Some(&hash.to_uppercase())));
        assert!(!own.is_own(Some(&path), Some(&"0".repeat(64))), "another program at our path");

        // Swapped: a new file at the path is not ours, hash or none.
        std::fs::remove_file(&ours).expect("rm");
        std::fs::write(&ours, b"our program").expect("write again");
        assert!(!own.is_own(Some(&path), None), "a new inode");
        let fresh = OwnBinaries::new([ours.clone()]);
        std::fs::write(&ours, b"changed!!!!").expect("rewrite");
        fresh.hash_all();
        assert!(
            !fresh.is_own(Some(&path), Some(&sha256_file(&ours).expect("hash"))),
            "changed before the hash"
        );
    }

    #[test]
    fn the_sql_function_answers_for_the_registered_set_and_nothing_without_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ours = dir.path().join("daemoneye-agent");
        std::fs::write(&ours, b"x").expect("write");
        let path = std::fs::canonicalize(&ours).expect("canonical").display().to_string();
        let conn = Connection::open_in_memory().expect("db");
        register(&conn, Arc::new(OwnBinaries::default())).expect("register");
        let ask = |conn: &Connection| -> bool {
            conn.query_row("SELECT daemoneye_self(?1, NULL)", [&path], |r| r.get(0)).expect("query")
        };
        assert!(!ask(&conn), "no set: nothing is ours");
        register(&conn, Arc::new(OwnBinaries::new([ours]))).expect("register");
        assert!(ask(&conn));
        let null: bool =
            conn.query_row("SELECT daemoneye_self(NULL, NULL)", [], |r| r.get(0)).expect("query");
        assert!(!null);
    }
}
