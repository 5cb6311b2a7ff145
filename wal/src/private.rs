//! The log's files are private to the user that writes it (Unix): the
//! directory (and every parent the log creates) is mode 0700 and every
//! file 0600 whatever the umask, files are created with `O_NOFOLLOW` (a
//! temporary file also with `O_EXCL`), and an existing directory must be
//! owned by this process's user and writable by it alone (else
//! [`Error::NotPrivate`]); one readable by others, or a file with a looser
//! mode (an older release made them 0755 and 0644), is tightened.
//!
//! Why: the records are the recent process history (command lines), which
//! `hidepid` hides from other users; and a lock works on a read-only
//! descriptor, so anyone who can open `LOCK` can hold it and keep the
//! writer from opening the log.
//!
//! The same rules as `daemoneye_platform::files`, written again here in a
//! few lines because this crate depends on nothing of DaemonEye's.
//! Elsewhere (Windows) files and directories are made plainly.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::Path;

use crate::error::{Error, Result, io_err};

/// Mode of the log's directory (Unix).
#[cfg(unix)]
const DIR_MODE: u32 = 0o700;
/// Mode of every file in it (Unix).
#[cfg(unix)]
const FILE_MODE: u32 = 0o600;

/// Creates `dir` and its missing parents, each mode 0700 whatever the
/// umask; returns whether `dir` was created.
pub(crate) fn create_dirs(dir: &Path) -> Result<bool> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        let mut missing = Vec::new();
        let mut at = Some(dir);
        while let Some(p) = at.filter(|p| !p.as_os_str().is_empty()) {
            match fs::metadata(p) {
                Ok(_) => break,
                Err(e) if e.kind() == io::ErrorKind::NotFound => missing.push(p),
                Err(e) => return Err(io_err("create directory", p)(e)),
            }
            at = p.parent();
        }
        let created = !missing.is_empty();
        for p in missing.into_iter().rev() {
            match fs::DirBuilder::new().mode(DIR_MODE).create(p) {
                Ok(()) => fs::set_permissions(p, fs::Permissions::from_mode(DIR_MODE))
                    .map_err(io_err("chmod", p))?,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io_err("create directory", p)(e)),
            }
        }
        Ok(created)
    }
    #[cfg(not(unix))]
    {
        if dir.is_dir() {
            return Ok(false);
        }
        fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
        Ok(true)
    }
}

/// Refuses a directory of another user or one others may write to;
/// tightens one others may read to 0700.
pub(crate) fn check_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let meta = fs::metadata(dir).map_err(io_err("stat", dir))?;
        let (owner, mode) = (meta.uid(), meta.mode() & 0o7777);
        let me = nix::unistd::geteuid().as_raw();
        let refuse = |why: String| {
            Err(Error::NotPrivate {
                path: dir.to_path_buf(),
                reason: format!(
                    "{why} (owner uid {owner}, mode {mode:04o}); it must belong to uid {me} and be writable by it alone"
                ),
            })
        };
        if owner != me {
            return refuse(format!("it belongs to uid {owner}, not to this process's uid {me}"));
        }
        if mode & 0o022 != 0 {
            return refuse("other users may write to it".to_owned());
        }
        if mode & 0o077 != 0 {
            fs::set_permissions(dir, fs::Permissions::from_mode(DIR_MODE)).map_err(io_err("chmod", dir))?;
            log::warn!(
                "WAL {}: was mode {mode:04o}, readable by other users: now {DIR_MODE:04o}",
                dir.display()
            );
        }
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
    }
    Ok(())
}

/// Opens the lock file, creating it if missing, for reading and writing:
/// 0600, never through a symbolic link, a regular file of this user's
/// (tightened to 0600 if it is looser).
pub(crate) fn open_lock(path: &Path) -> Result<File> {
    let mut opts = OpenOptions::new();
    opts.read(true).write(true).create(true).truncate(false);
    #[cfg(unix)]
    {
        use nix::fcntl::OFlag;
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(FILE_MODE).custom_flags((OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_NOCTTY).bits());
    }
    let file = opts.open(path).map_err(io_err("open", path))?;
    let meta = file.metadata().map_err(io_err("stat", path))?;
    if !meta.is_file() {
        return Err(Error::NotPrivate { path: path.to_path_buf(), reason: "not a regular file".into() });
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let me = nix::unistd::geteuid().as_raw();
        if meta.uid() != me {
            return Err(Error::NotPrivate {
                path: path.to_path_buf(),
                reason: format!("it belongs to uid {}, not to this process's uid {me}", meta.uid()),
            });
        }
        if meta.mode() & 0o7777 != FILE_MODE {
            file.set_permissions(fs::Permissions::from_mode(FILE_MODE)).map_err(io_err("chmod", path))?;
        }
    }
    Ok(file)
}

/// Creates a new file (`O_CREAT | O_EXCL`: an existing file or link there
/// is an error) for writing (appending with `append`), mode 0600 whatever
/// the umask. For temporary files renamed into place.
pub(crate) fn create_new(path: &Path, append: bool) -> Result<File> {
    let mut opts = OpenOptions::new();
    if append {
        opts.append(true);
    } else {
        opts.write(true);
    }
    opts.create_new(true);
    #[cfg(unix)]
    {
        use nix::fcntl::OFlag;
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(FILE_MODE).custom_flags(OFlag::O_NOFOLLOW.bits());
    }
    let file = opts.open(path).map_err(io_err("create", path))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let mode = file.metadata().map_err(io_err("stat", path))?.mode();
        if mode & 0o7777 != FILE_MODE {
            file.set_permissions(fs::Permissions::from_mode(FILE_MODE)).map_err(io_err("chmod", path))?;
        }
    }
    Ok(file)
}

/// Removes a leftover file at `path`, if any (a link is removed, never
/// followed).
pub(crate) fn remove_leftover(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("remove", path)(e)),
    }
}

/// Opens an existing file of the log for writing, never through a
/// symbolic link; `append` or not.
pub(crate) fn open_existing(path: &Path, append: bool) -> io::Result<File> {
    let mut opts = OpenOptions::new();
    if append {
        opts.append(true);
    } else {
        opts.write(true);
    }
    #[cfg(unix)]
    {
        use nix::fcntl::OFlag;
        use std::os::unix::fs::OpenOptionsExt;
        opts.custom_flags(OFlag::O_NOFOLLOW.bits());
    }
    opts.open(path)
}

/// Tightens an existing regular file of the log to 0600 (one an older
/// release made 0644); a link or anything else is left alone.
pub(crate) fn tighten(path: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let meta = match fs::symlink_metadata(path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err("stat", path)(e)),
        };
        if meta.file_type().is_file() && meta.mode() & 0o7777 != FILE_MODE {
            fs::set_permissions(path, fs::Permissions::from_mode(FILE_MODE))
                .map_err(io_err("chmod", path))?;
        }
    }
    #[cfg(not(unix))]
    {
        let _ = path;
    }
    Ok(())
}
